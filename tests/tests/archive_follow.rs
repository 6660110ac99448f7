//! Issue 4: the continuous archive (`tandem-standby archive --follow`): the
//! latest backup kept current while the standby streams, and a rebase that
//! must not cut the log out of it. One backup taken and restored is in
//! `archive.rs`. Real binaries, real Berkeley DB, mutual TLS on loopback.

use anyhow::{ensure, Context, Result};
use std::ffi::OsStr;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;
use tandem_tests::archive_cmd::{pair, restore, standby_cmd, stop_extended_follower, verify, LONG};
use tandem_tests::bdb;
use tandem_tests::harness::*;

#[test]
fn follow_keeps_the_latest_backup_current() -> Result<()> {
    let p = pair(1000)?;
    let s = &p.s;
    let mut cmd = Command::new(bin("tandem-standby"));
    cmd.args(["archive", "--json", "--follow", "1", "--dir"])
        .arg(s.path("standby"))
        .arg("--to")
        .arg(s.path("archive"));
    let mut follower = Proc::spawn("archive --follow", cmd, &s.path("follow.log"))?;
    let newest = |archive: &Path| -> Result<Option<PathBuf>> {
        // Published backups only: not the hidden one being built.
        let mut names: Vec<PathBuf> = std::fs::read_dir(archive)?
            .flatten()
            .filter(|e| !e.file_name().to_string_lossy().starts_with('.'))
            .map(|e| e.path())
            .filter(|p| p.join("MANIFEST.json").exists())
            .collect();
        names.sort();
        Ok(names.pop())
    };
    wait_for("the first backup", LONG, || {
        Ok(newest(&s.path("archive")).unwrap_or(None).is_some())
    })?;
    let first = newest(&s.path("archive"))?.context("backup")?;
    let last = bdb::run_workload(&s.path("env"), &workload(4000, 500))?;
    wait_caught_up(&s.path("standby"), &s.path("env"), LONG)?;
    let end = primary_log_end(&s.path("env"))?;
    wait_for("the backup to reach the primary's end", LONG, || {
        let m: serde_json::Value =
            serde_json::from_slice(&std::fs::read(first.join("MANIFEST.json"))?)?;
        Ok(lsn_of(&m["log_end"]) == end)
    })?;
    stop_extended_follower(&mut follower, Duration::from_secs(30))?;
    assert_eq!(
        newest(&s.path("archive"))?,
        Some(first.clone()),
        "the same backup was extended"
    );
    let v = verify(&s.path("archive"))?;
    ensure!(v.ok(), "verify-archive failed: {}{}", v.stdout, v.stderr);
    let r = restore(&first, &s.path("restored"), None, &[])?;
    ensure!(r.ok(), "restore failed: {}{}", r.stdout, r.stderr);
    assert_eq!(bdb::check(&s.path("restored"))?, last);
    drop(p.standby);
    Ok(())
}

/// Published backups, oldest first, with their manifests.
fn backups(archive: &Path) -> Result<Vec<(PathBuf, serde_json::Value)>> {
    let mut out: Vec<(PathBuf, serde_json::Value)> = Vec::new();
    for e in std::fs::read_dir(archive)?.flatten() {
        let manifest = e.path().join("MANIFEST.json");
        if !e.file_name().to_string_lossy().starts_with('.') && manifest.exists() {
            out.push((e.path(), serde_json::from_slice(&std::fs::read(manifest)?)?));
        }
    }
    out.sort_by(|a, b| a.0.cmp(&b.0));
    Ok(out)
}

#[test]
fn a_rebase_does_not_cut_the_log_out_of_a_continuous_archive() -> Result<()> {
    let s = Scratch::new()?;
    bdb::run_workload(&s.path("env"), &workload(1000, 500))?;
    let primary = start_primary(s.root(), &s.path("env"), &s.certs, "127.0.0.1:0", &[])?;
    let rebase = ["--check-interval-secs", "0", "--rebase-after-mib", "2"];
    let _standby = start_standby(
        s.root(),
        &s.path("standby"),
        &primary.url(),
        &s.certs,
        &rebase,
    )?;
    wait_caught_up(&s.path("standby"), &s.path("env"), LONG)?;
    let follow = |n: u32| -> Result<Proc> {
        let mut cmd = Command::new(bin("tandem-standby"));
        cmd.args(["archive", "--json", "--no-verify", "--follow", "1", "--dir"])
            .arg(s.path("standby"))
            .arg("--to")
            .arg(s.path("archive"));
        Proc::spawn("archive --follow", cmd, &s.path(&format!("follow-{n}.log")))
    };
    let mut archiver = follow(1)?;
    wait_for("the first backup", LONG, || {
        Ok(standby_status(&s.path("standby"))?["archived_lsn"].is_object())
    })?;
    assert!(archiver.stop(LONG)?.success());
    let (first, m) = backups(&s.path("archive"))?.pop().context("a backup")?;
    let first_end = lsn_of(&m["log_end"]);

    // With the archiver stopped, the standby rebases past the archive's end:
    // the logs it no longer needs wait for the archive instead of vanishing.
    let last = bdb::run_workload(&s.path("env"), &workload(8000, 500))?;
    wait_caught_up(&s.path("standby"), &s.path("env"), LONG)?;
    wait_for("a rebase past the archive's end", LONG, || {
        let st = standby_status(&s.path("standby"))?;
        Ok(st["rebases"].as_u64().unwrap_or(0) > 0 && st["base_id"] != m["base_id"])
    })?;
    let st = standby_status(&s.path("standby"))?;
    assert!(
        st["archive_held_log_bytes"].as_u64().unwrap_or(0) > 0,
        "the rebase must hold the unarchived logs: {st}"
    );
    // No held file is in the environment, where recovery would read it.
    let mirror_first = tandem_shared::envlayout::EnvLayout::open(&s.path("standby"))?
        .log_files()?
        .first()
        .copied()
        .unwrap_or(0);
    assert!(
        mirror_first > first_end.file,
        "the mirror still starts at log {mirror_first}"
    );

    // The archiver returns: it finishes the old backup across the rebase,
    // then starts one of the new base, and lets the held logs go.
    let end = primary_log_end(&s.path("env"))?;
    let mut archiver = follow(2)?;
    wait_for("a backup of the new base, up to the end", LONG, || {
        Ok(backups(&s.path("archive"))?
            .last()
            .is_some_and(|(_, m)| m["base_id"] != json_str(&first) && lsn_of(&m["log_end"]) == end))
    })?;
    assert!(archiver.stop(LONG)?.success());
    wait_for("the held logs to go", LONG, || {
        Ok(standby_status(&s.path("standby"))?["archive_held_log_bytes"] == 0)
    })?;
    let all = backups(&s.path("archive"))?;
    assert_eq!(all.len(), 2, "{all:?}");
    let (old, new) = (&all[0].1, &all[1].1);
    assert_eq!(all[0].0, first);
    assert!(
        lsn_of(&old["log_end"]) >= lsn_of(&new["log_start"]),
        "a gap between the backups: {} < {}",
        lsn_of(&old["log_end"]),
        lsn_of(&new["log_start"])
    );
    let v = standby_cmd(
        [
            OsStr::new("verify-archive"),
            OsStr::new("--all"),
            s.path("archive").as_os_str(),
        ],
        &[],
    )?;
    ensure!(v.ok(), "verify-archive failed: {}{}", v.stdout, v.stderr);
    // The old backup alone restores every transaction: its base plus the
    // log across the rebase.
    let r = restore(&first, &s.path("restored"), None, &[])?;
    ensure!(r.ok(), "restore failed: {}{}", r.stdout, r.stderr);
    assert_eq!(bdb::check(&s.path("restored"))?, last);

    // Released, the standby no longer holds anything for an archive.
    let rel = standby_cmd(
        [
            OsStr::new("archive"),
            OsStr::new("--release"),
            OsStr::new("--dir"),
            s.path("standby").as_os_str(),
        ],
        &[],
    )?;
    ensure!(rel.ok(), "release failed: {}{}", rel.stdout, rel.stderr);
    wait_for("the registration to go", LONG, || {
        Ok(standby_status(&s.path("standby"))?["archived_lsn"].is_null())
    })?;
    drop(primary);
    Ok(())
}

fn json_str(backup: &Path) -> String {
    std::fs::read(backup.join("MANIFEST.json"))
        .ok()
        .and_then(|b| serde_json::from_slice::<serde_json::Value>(&b).ok())
        .and_then(|m| m["base_id"].as_str().map(str::to_owned))
        .unwrap_or_default()
}
