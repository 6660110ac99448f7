//! Issue 11 (finding 1) and issue 15, primary side: the primary never
//! answers doubt with a new base. An I/O error while it plans a session is
//! retried, a standby whose log does not continue the primary's is refused
//! as diverged (the operator chooses), a standby name belongs to one
//! standby at a time, and SIGTERM ends the primary promptly.

use anyhow::{Context, Result};
use std::path::Path;
use std::process::Command;
use std::time::{Duration, Instant};
use tandem_shared::LogPosition;
use tandem_tests::bdb::{self, WorkloadOptions};
use tandem_tests::harness::*;

const LONG: Duration = Duration::from_secs(180);

fn base_id(dir: &Path) -> Result<String> {
    Ok(standby_status(dir)?["base_id"]
        .as_str()
        .unwrap_or_default()
        .to_owned())
}

fn newest_log(env: &Path) -> Result<std::path::PathBuf> {
    let layout = tandem_shared::envlayout::EnvLayout::open(env)?;
    let newest = *layout.log_files()?.last().context("no log file")?;
    Ok(layout.log_path(newest))
}

#[test]
fn an_unreadable_log_on_the_primary_is_retried_never_answered_with_a_new_base() -> Result<()> {
    let Pair {
        s,
        primary,
        mut standby,
    } = pair(&workload(500, 200))?;
    wait_caught_up(&s.path("standby"), &s.path("env"), LONG)?;
    let first_base = base_id(&s.path("standby"))?;
    assert!(standby.stop(LONG)?.success());
    // The log file the standby resumes in becomes unreadable: a directory
    // stands where it was (listed and opened, but every read fails), the
    // way a failing disk or a mount in trouble would answer.
    let log = newest_log(&s.path("env"))?;
    let aside = log.with_extension("aside");
    std::fs::rename(&log, &aside)?;
    std::fs::create_dir(&log)?;
    let mut standby = start_standby(
        s.root(),
        &s.path("standby"),
        &primary.url(),
        &s.certs,
        &["--check-interval-secs", "0"],
    )?;
    let refused = "cannot read the log to plan this standby's stream";
    wait_for("the primary to refuse twice", LONG, || {
        Ok(primary.proc.log_text().matches(refused).count() >= 2)
    })?;
    assert!(
        standby.is_running(),
        "the standby must retry: {}",
        standby.log_text()
    );
    assert_eq!(base_id(&s.path("standby"))?, first_base);
    // The disk recovers: the standby resumes where it was.
    std::fs::remove_dir(&log)?;
    std::fs::rename(&aside, &log)?;
    let last = bdb::run_workload(&s.path("env"), &workload(200, 200))?;
    wait_caught_up(&s.path("standby"), &s.path("env"), LONG)?;
    assert_eq!(base_id(&s.path("standby"))?, first_base);
    let text = primary.proc.log_text();
    assert_eq!(
        text.matches("starting a new base").count(),
        1,
        "only the first base may be sent: {text}"
    );
    assert_eq!(
        recover_copy(&s.path("standby"), &s.path("recovered"))?,
        last
    );
    Ok(())
}

#[test]
fn a_primary_rolled_back_refuses_its_standby_as_diverged_and_sends_no_base() -> Result<()> {
    let s = Scratch::new()?;
    bdb::run_workload(&s.path("env"), &workload(1000, 200))?;
    let mut primary = start_primary(s.root(), &s.path("env"), &s.certs, "127.0.0.1:0", &[])?;
    let listen = primary.addr.to_string();
    let mut standby = start_standby(
        s.root(),
        &s.path("standby"),
        &primary.url(),
        &s.certs,
        &["--check-interval-secs", "0", "--rebase-after-mib", "0"],
    )?;
    wait_caught_up(&s.path("standby"), &s.path("env"), LONG)?;
    // An early copy of the primary's environment, identity included: the
    // backup an operator restores, or what a disk that lost its unsynced
    // log comes back with.
    assert!(primary.proc.stop(LONG)?.success());
    let status = Command::new("cp")
        .arg("-a")
        .arg(s.path("env"))
        .arg(s.path("env-early"))
        .status()?;
    assert!(status.success());
    let mut primary = start_primary(s.root(), &s.path("env"), &s.certs, &listen, &[])?;
    bdb::run_workload(&s.path("env"), &workload(2000, 200))?;
    wait_caught_up(&s.path("standby"), &s.path("env"), LONG)?;
    let held = lsn_of(&standby_status(&s.path("standby"))?["durable_lsn"]);
    let first_base = base_id(&s.path("standby"))?;
    assert!(primary.proc.stop(LONG)?.success());
    std::fs::remove_dir_all(s.path("env"))?;
    std::fs::rename(s.path("env-early"), s.path("env"))?;
    let end = primary_log_end(&s.path("env"))?;
    assert!(end < held, "the copy must be behind: {end} vs {held}");
    let primary = start_primary(s.root(), &s.path("env"), &s.certs, &listen, &[])?;
    wait_for("the primary to refuse the standby", LONG, || {
        Ok(primary.proc.log_text().contains("DIVERGED"))
    })?;
    let text = primary.proc.log_text();
    let line = text
        .lines()
        .find(|l| l.contains("DIVERGED"))
        .unwrap_or_default();
    for needle in [
        "diverged:".to_owned(),
        held.to_string(),
        end.to_string(),
        "--start-over".into(),
        "promote".into(),
        "bytes of log beyond".into(),
    ] {
        assert!(line.contains(&needle), "{needle:?} missing from: {line}");
    }
    assert!(
        !text.contains("starting a new base"),
        "no new base may be offered: {text}"
    );
    // The standby heard the refusal and kept what it holds.
    wait_for("the standby to hear the refusal", LONG, || {
        Ok(standby.log_text().contains("diverged:"))
    })?;
    assert_eq!(base_id(&s.path("standby"))?, first_base);
    assert_eq!(
        lsn_of(&standby_status(&s.path("standby"))?["durable_lsn"]),
        held
    );
    let _ = standby.stop(LONG);
    Ok(())
}

#[test]
fn a_second_standby_under_a_connected_name_is_refused() -> Result<()> {
    let Pair {
        s,
        primary,
        mut standby,
    } = pair(&workload(300, 200))?;
    wait_caught_up(&s.path("standby"), &s.path("env"), LONG)?;
    let peer = primary_status(&primary, &s.certs)?["standbys"][0]["peer"].clone();
    // start_standby names every standby "test-standby".
    let second = start_standby(
        s.root(),
        &s.path("standby2"),
        &primary.url(),
        &s.certs,
        &["--check-interval-secs", "0"],
    )?;
    wait_for("the second standby to be refused", LONG, || {
        Ok(second.log_text().contains("already connected"))
    })?;
    let log = second.log_text();
    assert!(
        log.contains(peer.as_str().unwrap_or("?")),
        "the refusal must name the peer holding the name: {log}"
    );
    let st = primary_status(&primary, &s.certs)?;
    assert_eq!(st["standbys"].as_array().map(Vec::len), Some(1), "{st}");
    assert_eq!(st["standbys"][0]["peer"], peer, "{st}");
    assert!(
        !primary
            .proc
            .log_text()
            .contains("now holds a different base"),
        "the slot must not change hands while its holder is connected"
    );
    // The first standby is undisturbed.
    bdb::run_workload(&s.path("env"), &workload(200, 200))?;
    wait_caught_up(&s.path("standby"), &s.path("env"), LONG)?;
    // Once the holder is gone, the name is free; the takeover is logged.
    assert!(standby.stop(LONG)?.success());
    wait_caught_up(&s.path("standby2"), &s.path("env"), LONG)?;
    assert!(primary
        .proc
        .log_text()
        .contains("now holds a different base"));
    Ok(())
}

#[test]
fn sigterm_ends_a_primary_with_a_standby_and_retention_within_seconds() -> Result<()> {
    let s = Scratch::new()?;
    bdb::run_workload(&s.path("env"), &workload(500, 200))?;
    let args = ["--retention", "--retention-interval-secs", "1"];
    let mut primary = start_primary(s.root(), &s.path("env"), &s.certs, "127.0.0.1:0", &args)?;
    let _standby = start_standby(
        s.root(),
        &s.path("standby"),
        &primary.url(),
        &s.certs,
        &["--check-interval-secs", "0"],
    )?;
    wait_caught_up(&s.path("standby"), &s.path("env"), LONG)?;
    // The application keeps committing: the session is shipping log.
    let mut w = s.spawn_workload(
        &WorkloadOptions {
            rate: 500,
            ..workload(100_000, 200)
        },
        "w.log",
    )?;
    wait_for("log shipping under way", LONG, || {
        Ok(
            lsn_of(&standby_status(&s.path("standby"))?["durable_lsn"]) > LogPosition::new(0, 0)
                && primary_log_end(&s.path("env"))? > LogPosition::new(1, 0),
        )
    })?;
    let started = Instant::now();
    let exit = primary.proc.stop(Duration::from_secs(30))?;
    let took = started.elapsed();
    eprintln!("the primary exited {exit} {took:?} after SIGTERM");
    assert!(exit.success(), "{}", primary.proc.log_text());
    assert!(
        took < Duration::from_secs(8),
        "SIGTERM must end the primary within seconds, took {took:?}: {}",
        primary.proc.log_text()
    );
    assert!(primary.proc.log_text().contains("stopped"));
    w.kill9()?;
    Ok(())
}
