//! Issue 12: roles change without a full copy. A promotion keeps the
//! environment's identity and records where its epoch began; the other
//! standbys follow the promoted one from what they hold (no file re-sent),
//! a standby that holds log beyond that point is refused with its
//! directory unchanged, and the old primary is fenced. Real binaries, real
//! Berkeley DB, mutual TLS on loopback.

use anyhow::{ensure, Context, Result};
use std::path::Path;
use std::time::Duration;
use tandem_tests::bdb::{self, WORKLOAD_DBS};
use tandem_tests::harness::*;
use tandem_tests::refusal::{quiet_workload, stored, NO_CHECKS};

const LONG: Duration = Duration::from_secs(180);
/// `tandem-standby run` refused for good (the operator must act).
const EXIT_REFUSED: i32 = 3;

/// A primary on `env` (holding `txns` transactions) and standbys "a" and
/// "b" in `a` and `b`, both holding its whole log.
fn primary_with_two_standbys(s: &Scratch, txns: u64) -> Result<(Primary, Proc, Proc)> {
    bdb::run_workload(&s.path("env"), &quiet_workload(txns))?;
    let p = start_primary(s.root(), &s.path("env"), &s.certs, "127.0.0.1:0", &[])?;
    let mut a = start_standby_as(s.root(), &s.path("a"), &p.url(), &s.certs, "a", &NO_CHECKS)?;
    let mut b = start_standby_as(s.root(), &s.path("b"), &p.url(), &s.certs, "b", &NO_CHECKS)?;
    wait_caught_up_running(&s.path("a"), &s.path("env"), LONG, &mut a)?;
    wait_caught_up_running(&s.path("b"), &s.path("env"), LONG, &mut b)?;
    Ok((p, a, b))
}

/// Runs `tandem-standby run` on `dir` against `url` and waits for it to be
/// refused; returns its log.
fn refused_run(s: &Scratch, dir: &Path, url: &str, name: &str) -> Result<String> {
    let mut run = start_standby_as(s.root(), dir, url, &s.certs, name, &NO_CHECKS)?;
    let code = run.wait_exit(LONG)?;
    let log = run.log_text();
    ensure!(
        code.code() == Some(EXIT_REFUSED),
        "expected a refusal, got {code}: {log}"
    );
    Ok(log)
}

/// Recovers a copy of the standby directory and proves it holds exactly
/// the environment `env`'s committed transactions (1..=last, same bytes).
fn assert_holds_exactly(
    s: &Scratch,
    standby: &Path,
    env: &Path,
    last: u64,
    tag: &str,
) -> Result<()> {
    let copy = s.path(&format!("recovered-{tag}"));
    assert_eq!(recover_copy(standby, &copy)?, last, "{tag}");
    assert_eq!(bdb::check(env)?, last, "{tag}");
    ensure!(
        bdb::db_dump_all(env, &WORKLOAD_DBS)? == bdb::db_dump_all(&copy, &WORKLOAD_DBS)?,
        "{tag}: the standby's databases differ from the primary's"
    );
    Ok(())
}

#[test]
fn other_standbys_follow_a_promoted_one_and_refuse_the_old_primary() -> Result<()> {
    let s = Scratch::new()?;
    let (mut p, mut a, mut b) = primary_with_two_standbys(&s, 3000)?;
    let (a_dir, b_dir) = (s.path("a"), s.path("b"));
    // The application commits more and stops; both standbys hold it all.
    bdb::run_workload(&s.path("env"), &quiet_workload(4000))?;
    wait_caught_up_running(&a_dir, &s.path("env"), LONG, &mut a)?;
    wait_caught_up_running(&b_dir, &s.path("env"), LONG, &mut b)?;
    let b_before = standby_status(&b_dir)?;
    let b_base = b_before["base_id"].clone();
    let env_id = b_before["env_id"].clone();

    // Switchover to A; P's daemon stops (the operator's maintenance).
    let report = promote_json(&a_dir)?;
    assert_eq!(report["kind"], "switchover", "{report}");
    assert_eq!(report["epoch"], 2, "{report}");
    let x = lsn_of(&report["durable_lsn"]);
    let _ = a.wait_exit(LONG);
    p.proc.stop(LONG)?;
    let a_state = standby_status(&a_dir)?;
    assert_eq!(a_state["env_id"], env_id, "the promotion kept the identity");
    assert_eq!(a_state["history"][0]["epoch"], 2, "{a_state}");
    assert_eq!(lsn_of(&a_state["history"][0]["start"]), x, "{a_state}");

    // A primary on A; B is pointed at it and continues from what it holds.
    let new_p = start_primary(s.root(), &a_dir, &s.certs, "127.0.0.1:0", &[])?;
    let st = primary_status(&new_p, &s.certs)?;
    assert_eq!((&st["env_id"], &st["epoch"]), (&env_id, &2.into()), "{st}");
    assert_eq!(lsn_of(&st["history"][0]["start_lsn"]), x, "{st}");
    b.stop(LONG)?;
    let mut b = start_standby_as(s.root(), &b_dir, &new_p.url(), &s.certs, "b", &NO_CHECKS)?;
    let last = bdb::run_workload(&a_dir, &quiet_workload(2000))?;
    wait_caught_up_running(&b_dir, &a_dir, LONG, &mut b)?;
    let b_now = standby_status(&b_dir)?;
    assert_eq!(b_now["file_bytes_received"], 0, "B was sent files: {b_now}");
    assert_eq!(b_now["base_id"], b_base, "B took a new base: {b_now}");
    assert_eq!(b_now["epoch"], 2, "{b_now}");
    assert_eq!(lsn_of(&b_now["history"][0]["start"]), x, "{b_now}");
    assert!(
        b_now["log_bytes_received"].as_u64().unwrap_or(0) > 0,
        "{b_now}"
    );
    let db_bytes: u64 = WORKLOAD_DBS
        .iter()
        .map(|d| std::fs::metadata(a_dir.join(d)).map(|m| m.len()))
        .sum::<std::io::Result<u64>>()?;
    eprintln!(
        "B followed the promoted A: {} file bytes and {} log bytes received, databases {db_bytes} bytes",
        b_now["file_bytes_received"], b_now["log_bytes_received"]
    );
    b.stop(LONG)?;
    assert_holds_exactly(&s, &b_dir, &a_dir, last, "after-follow")?;

    // The old primary comes back, with an application committing on it.
    let old_p = start_primary(s.root(), &s.path("env"), &s.certs, "127.0.0.1:0", &[])?;
    let mut app = Proc::spawn(
        "old application",
        tandem_tests::bdb::WorkloadOptions {
            txns: 0,
            seconds: Some(600),
            rate: 50,
            ..quiet_workload(0)
        }
        .command(&s.path("env")),
        &s.path("old-application.log"),
    )?;
    let before = stored(&b_dir)?;
    let log = refused_run(&s, &b_dir, &old_p.url(), "b")?;
    assert!(log.contains("FENCED"), "{log}");
    assert_eq!(
        before,
        stored(&b_dir)?,
        "a fenced standby's directory changed"
    );
    wait_for("the old primary to log FENCED", LONG, || {
        Ok(old_p.proc.log_text().contains("FENCED"))
    })?;
    let st = primary_status(&old_p, &s.certs)?;
    assert!(st["fenced_hellos"].as_u64().unwrap_or(0) >= 1, "{st}");
    let b_info = st["standbys"]
        .as_array()
        .and_then(|v| v.iter().find(|b| b["name"] == "b"))
        .cloned()
        .context("the old primary's status lacks standby b")?;
    assert!(
        b_info["refused"]
            .as_str()
            .unwrap_or("")
            .starts_with("FENCED"),
        "{st}"
    );
    assert_eq!(b_info["epoch"], 2, "{st}");
    app.stop(LONG)?;

    // B still follows the new primary to its end.
    let mut b = start_standby_as(s.root(), &b_dir, &new_p.url(), &s.certs, "b", &NO_CHECKS)?;
    let last = bdb::run_workload(&a_dir, &quiet_workload(1000))?;
    wait_caught_up_running(&b_dir, &a_dir, LONG, &mut b)?;
    assert_eq!(standby_status(&b_dir)?["file_bytes_received"], 0);
    b.stop(LONG)?;
    assert_holds_exactly(&s, &b_dir, &a_dir, last, "after-fencing")?;
    Ok(())
}

#[test]
fn a_standby_ahead_of_the_promoted_one_is_refused_unchanged() -> Result<()> {
    let s = Scratch::new()?;
    let (mut p, mut a, mut b) = primary_with_two_standbys(&s, 3000)?;
    let (a_dir, b_dir) = (s.path("a"), s.path("b"));
    // A stops following; B keeps receiving what the application commits.
    a.stop(LONG)?;
    bdb::run_workload(&s.path("env"), &quiet_workload(1500))?;
    wait_caught_up_running(&b_dir, &s.path("env"), LONG, &mut b)?;
    b.stop(LONG)?;
    // P's machine is gone: A is promoted by failover from what it holds.
    p.proc.kill9()?;
    let report = promote_json(&a_dir)?;
    assert_eq!(report["kind"], "failover", "{report}");
    let x = lsn_of(&report["durable_lsn"]);
    let b_end = lsn_of(&standby_status(&b_dir)?["durable_lsn"]);
    assert!(b_end > x, "B ({b_end}) must be ahead of A ({x})");

    let new_p = start_primary(s.root(), &a_dir, &s.certs, "127.0.0.1:0", &[])?;
    let before = stored(&b_dir)?;
    let log = refused_run(&s, &b_dir, &new_p.url(), "b")?;
    assert_eq!(
        before,
        stored(&b_dir)?,
        "a refused standby's directory changed"
    );
    for needle in [
        "diverged".to_owned(),
        x.to_string(),
        b_end.to_string(),
        "--rejoin".into(),
        "promote".into(),
    ] {
        assert!(log.contains(&needle), "lacks {needle}: {log}");
    }
    let st = primary_status(&new_p, &s.certs)?;
    let b_info = st["standbys"]
        .as_array()
        .and_then(|v| v.iter().find(|b| b["name"] == "b"))
        .cloned()
        .context("the new primary's status lacks standby b")?;
    assert!(
        b_info["refused"]
            .as_str()
            .unwrap_or("")
            .starts_with("diverged"),
        "{st}"
    );
    // Refused again on a second try: nothing about the first one stuck.
    let log = refused_run(&s, &b_dir, &new_p.url(), "b")?;
    assert!(log.contains("diverged"), "{log}");
    assert_eq!(before, stored(&b_dir)?);
    Ok(())
}
