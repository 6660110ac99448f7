//! Issue 21: promote verifies only what changed since the last verified
//! readiness check, and must still never open an environment a full
//! `db_verify` would reject. Each case damages a copy of the same stopped
//! mirror at one moment (before a check, between the check and promote,
//! in pages the log after the check writes or not) and promotes it twice:
//! as it is, and with `--full-verify` (what promote did before). Both must
//! end the same way: both promote, holding the same data, or both refuse.

use anyhow::{ensure, Context, Result};
use std::os::unix::fs::{FileExt, MetadataExt};
use std::path::Path;
use std::process::Command;
use std::time::Duration;
use tandem_tests::bdb::{self, WORKLOAD_DBS};
use tandem_tests::harness::*;

const LONG: Duration = Duration::from_secs(120);

fn standby(args: &[&str], dir: &Path) -> Result<(bool, serde_json::Value, String)> {
    let out = Command::new(bin("tandem-standby"))
        .args(args)
        .arg("--dir")
        .arg(dir)
        .output()?;
    Ok((
        out.status.success(),
        serde_json::from_slice(&out.stdout).unwrap_or(serde_json::Value::Null),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    ))
}

fn check(dir: &Path) -> Result<serde_json::Value> {
    Ok(standby(&["check", "--json"], dir)?.1)
}

/// Flips `mask` into byte `at` of page `page` of `db` (4 KiB pages).
fn flip(dir: &Path, db: &str, page: u64, at: u64, mask: u8) -> Result<()> {
    let f = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open(dir.join(db))?;
    let mut b = [0u8; 1];
    f.read_exact_at(&mut b, page * 4096 + at)?;
    b[0] ^= mask;
    f.write_all_at(&b, page * 4096 + at)?;
    Ok(())
}

/// What a promote ended with: promoted (and then what the databases hold),
/// or refused.
#[derive(Debug, PartialEq)]
enum Outcome {
    Promoted { dumps: Vec<u8> },
    Refused,
}

fn promote(dir: &Path, full: bool) -> Result<(Outcome, serde_json::Value)> {
    let mut args = vec!["promote", "--json"];
    if full {
        args.push("--full-verify");
    }
    let (ok, mut report, stderr) = standby(&args, dir)?;
    report["stderr"] = stderr.clone().into();
    if !ok {
        ensure!(
            stderr.contains("did not prove recoverable"),
            "promote failed otherwise than by refusing: {stderr}"
        );
        return Ok((Outcome::Refused, report));
    }
    Ok((
        Outcome::Promoted {
            dumps: bdb::db_dump_all(dir, &WORKLOAD_DBS)?,
        },
        report,
    ))
}

/// A copy of a whole standby directory, `.tandem` included (new inodes:
/// the copy's verified record no longer matches its files).
fn copy_all(from: &Path, to: &Path) -> Result<()> {
    ensure!(Command::new("cp")
        .arg("-a")
        .arg(from)
        .arg(to)
        .status()?
        .success());
    Ok(())
}

/// A copy of `mirror` named `name` with a readiness check of its own.
fn checked(s: &Scratch, mirror: &Path, name: &str) -> Result<std::path::PathBuf> {
    let dir = s.path(name);
    copy_all(mirror, &dir)?;
    // The check takes no file changed in the last second as verified (its
    // ctime could not tell a write in the same clock tick apart).
    wait_for("the copy to be a second old", LONG, || {
        let m = std::fs::metadata(dir.join("data.db"))?;
        let ctime = std::time::UNIX_EPOCH + Duration::new(m.ctime() as u64, m.ctime_nsec() as u32);
        Ok(ctime.elapsed().unwrap_or_default() > Duration::from_millis(1100))
    })?;
    let c = check(&dir)?;
    ensure!(c["ok"] == true && c["verified_to"].is_object(), "{c}");
    Ok(dir)
}

/// Damages `dir` and a copy of it alike, promotes `dir` as it is and the
/// copy with `--full-verify`; both must end alike. Returns the outcome and
/// the selective promote's report.
fn both_ways(
    s: &Scratch,
    dir: &Path,
    damage: impl Fn(&Path) -> Result<()>,
) -> Result<(Outcome, serde_json::Value)> {
    let full = s.path(&format!(
        "{}-full",
        dir.file_name().context("name")?.to_string_lossy()
    ));
    copy_all(dir, &full)?;
    damage(dir)?;
    damage(&full)?;
    let (a, report) = promote(dir, false)?;
    let (b, _) = promote(&full, true)?;
    ensure!(
        a == b,
        "{}: promote {} but with --full-verify {}: {report}",
        dir.display(),
        describe(&a),
        describe(&b)
    );
    Ok((a, report))
}

fn describe(o: &Outcome) -> &'static str {
    match o {
        Outcome::Promoted { .. } => "promoted",
        Outcome::Refused => "refused",
    }
}

#[test]
fn promote_skips_only_what_the_check_verified_and_refuses_what_full_verify_refuses() -> Result<()> {
    let mut p = pair(&workload(3000, 300))?;
    bdb::run_workload(&p.s.path("env"), &workload(1000, 300))?;
    wait_caught_up_running(&p.s.path("standby"), &p.s.path("env"), LONG, &mut p.standby)?;
    p.standby.stop(Duration::from_secs(30))?;
    // Promote finds no primary: a failover from what is durable.
    p.primary.proc.kill9()?;
    let mirror = p.s.path("standby");
    let s = &p.s;

    // Nothing changed since the check: nothing is verified again.
    let clean = checked(s, &mirror, "clean")?;
    let (o, r) = both_ways(s, &clean, |_| Ok(()))?;
    ensure!(matches!(o, Outcome::Promoted { .. }), "{r}");
    ensure!(
        r["databases_verified"] == 0 && r["databases_unchanged"] == 3,
        "{r}"
    );
    ensure!(
        bdb::check(&clean)? == 4000,
        "the promoted copy misses transactions"
    );

    // Between the check and promote: the page type of a data.db page, a
    // hash.db page's entry count, a value byte deep in a meta.db leaf.
    // No log came after the check: only the files' signatures catch these.
    let mut refused = 0;
    for (name, db, page, at, mask) in [
        ("type", "data.db", 1, 25, 0x70),
        ("entries", "hash.db", 2, 20, 0x5a),
        ("value", "meta.db", 1, 4000, 0x01),
    ] {
        let dir = checked(s, &mirror, name)?;
        let (o, r) = both_ways(s, &dir, |d| flip(d, db, page, at, mask))?;
        ensure!(
            r["verified_everything_because"].is_null() || o == Outcome::Refused,
            "{name}: {r}"
        );
        match o {
            Outcome::Refused => refused += 1,
            Outcome::Promoted { .. } => ensure!(r["databases_verified"] == 1, "{name}: {r}"),
        }
    }
    ensure!(
        refused >= 1,
        "no damage was caught by db_verify: the test proves nothing"
    );

    // Before a check: the check fails and leaves no record; promote
    // verifies everything and refuses, as before.
    let before = s.path("before");
    copy_all(&mirror, &before)?;
    flip(&before, "data.db", 1, 25, 0x70)?;
    let c = check(&before)?;
    ensure!(c["ok"] == false, "a check passed on a damaged page: {c}");
    ensure!(!before.join(".tandem/verified.json").exists());
    let (o, r) = both_ways(s, &before, |_| Ok(()))?;
    ensure!(o == Outcome::Refused, "{r}");

    // Log after the check: the databases it writes are verified again, and
    // a damaged page there is refused as before.
    let primary = start_primary(s.root(), &s.path("env"), &s.certs, "127.0.0.1:0", &[])?;
    let mut tails = Vec::new();
    for name in ["tail", "tail-type"] {
        let dir = checked(s, &mirror, name)?;
        let mut st = start_standby(
            s.root(),
            &dir,
            &primary.url(),
            &s.certs,
            &["--check-interval-secs", "0"],
        )?;
        if name == "tail" {
            bdb::run_workload(&s.path("env"), &workload(200, 300))?;
        }
        wait_caught_up_running(&dir, &s.path("env"), LONG, &mut st)?;
        st.stop(Duration::from_secs(30))?;
        tails.push(dir);
    }
    let mut primary = primary;
    primary.proc.kill9()?;
    let (o, r) = both_ways(s, &tails[0], |_| Ok(()))?;
    ensure!(matches!(o, Outcome::Promoted { .. }), "{r}");
    ensure!(r["databases_verified"] == 3, "the log wrote all three: {r}");
    let (o, r) = both_ways(s, &tails[1], |d| flip(d, "data.db", 1, 25, 0x70))?;
    ensure!(o == Outcome::Refused, "{r}");
    Ok(())
}

/// A record copied with the files proves nothing about the copy: it names
/// the inodes, so promote verifies every database of the copy.
#[test]
fn a_record_copied_with_the_files_proves_nothing() -> Result<()> {
    let mut p = pair(&workload(1500, 300))?;
    p.standby.stop(Duration::from_secs(30))?;
    p.primary.proc.kill9()?;
    let mirror = p.s.path("standby");
    ensure!(check(&mirror)?["ok"] == true);
    let copy = p.s.path("copy");
    copy_all(&mirror, &copy)?;
    let (ok, r, e) = standby(&["promote", "--json"], &copy)?;
    ensure!(ok, "{e}");
    ensure!(
        r["databases_unchanged"] == 0 && r["databases_verified"] == 3,
        "{r}"
    );
    ensure!(
        r["verified_everything_because"].is_null(),
        "the record is for this base: only the files' signatures differ: {r}"
    );
    Ok(())
}
