//! Issue: prove the standby can recover, promote it safely, fence the old
//! primary. Real binaries, real Berkeley DB, mutual TLS on loopback.

use anyhow::{ensure, Context, Result};
use std::path::Path;
use std::process::Command;
use std::time::Duration;
use tandem_tests::bdb::{self, WorkloadOptions, WORKLOAD_DBS};
use tandem_tests::harness::*;

const LONG: Duration = Duration::from_secs(120);
const NO_CHECKS: [&str; 2] = ["--check-interval-secs", "0"];

/// The report's per-phase breakdown is there, and its phases add up to the
/// total (no timing is asserted: speed is the benchmark's business).
fn assert_phases_add_up(report: &serde_json::Value) -> Result<()> {
    let phases = report["phases"]
        .as_object()
        .with_context(|| format!("no phases in {report}"))?;
    let names = [
        "ask_primary",
        "catch_up",
        "stop_standby",
        "finish_swap",
        "recovery",
        "verify",
        "record",
    ];
    let mut sum = 0.0;
    for name in names {
        let v = phases[name]
            .as_f64()
            .with_context(|| format!("phase {name} missing in {report}"))?;
        ensure!(v >= 0.0, "phase {name} is negative: {report}");
        sum += v;
    }
    ensure!(phases.len() == names.len(), "unexpected phases: {report}");
    let total = report["total_seconds"].as_f64().context("total_seconds")?;
    ensure!(
        (sum - total).abs() < 1e-3,
        "the phases add up to {sum} s, the total is {total} s: {report}"
    );
    ensure!(
        report["phases"]["recovery"].as_f64() <= report["recovery_seconds"].as_f64(),
        "{report}"
    );
    Ok(())
}

/// Promote runs its recovery with a bigger cache in `DB_CONFIG`, and must
/// leave the environment's own configuration exactly as the primary's.
fn assert_db_config_as_primary(p: &Pair) -> Result<()> {
    let read = |dir: &Path| std::fs::read(dir.join("DB_CONFIG")).ok();
    ensure!(
        read(&p.s.path("standby")) == read(&p.s.path("env")),
        "promote changed DB_CONFIG"
    );
    ensure!(
        !p.s.path("standby/.tandem/promote-db-config.json").exists(),
        "promote left its saved DB_CONFIG behind"
    );
    Ok(())
}

fn pair(initial: u64) -> Result<Pair> {
    tandem_tests::harness::pair(&workload(initial, 500))
}

#[test]
fn failover_after_kill9_holds_every_acknowledged_transaction() -> Result<()> {
    for (trial, kill_after) in [1500u64, 6000, 11000].into_iter().enumerate() {
        let kill_after = kill_after + rand::random::<u64>() % 1000;
        let mut p = pair(1000)?;
        let lsns = p.s.path("commits.lsn");
        let opts = WorkloadOptions {
            txns: 0,
            seconds: Some(120),
            lsn_log: Some(lsns.clone()),
            ..workload(0, 500)
        };
        let mut w = Proc::spawn(
            "workload",
            opts.command(&p.s.path("env")),
            &p.s.path("workload.log"),
        )?;
        wait_for("commits", LONG, || {
            Ok(bdb::read_lsn_log(&lsns)
                .map(|v| v.len() as u64)
                .unwrap_or(0)
                >= kill_after)
        })?;
        // The primary's machine dies: application and primary at once.
        w.kill9()?;
        p.primary.proc.kill9()?;
        wait_for("the standby to notice", LONG, || {
            Ok(standby_status(&p.s.path("standby"))?["connected"] == false)
        })?;
        let acked = lsn_of(&standby_status(&p.s.path("standby"))?["durable_lsn"]);
        let commits = bdb::read_lsn_log(&lsns)?;
        let last_logged = commits.last().map_or(0, |c| c.0);
        let must_have = commits
            .iter()
            .filter(|(_, f, o)| tandem_shared::LogPosition::new(*f, *o) <= acked)
            .map(|c| c.0)
            .max()
            .unwrap_or(0);

        let (status, report, stderr) = promote(&p.s.path("standby"), &[])?;
        ensure!(status.success(), "trial {trial}: promote failed: {stderr}");
        assert_eq!(report["kind"], "failover", "trial {trial}: {report}");
        assert_phases_add_up(&report)?;
        assert_db_config_as_primary(&p)?;
        let m = bdb::check(&p.s.path("standby")).with_context(|| format!("trial {trial}"))?;
        // A prefix: nothing the primary did not commit (the LSN log trails
        // commits by at most the one transaction being logged at the kill),
        // and nothing the standby had acknowledged is missing.
        assert!(
            m >= must_have,
            "trial {trial}: promoted holds 1..{m} but the standby acknowledged up to {must_have}"
        );
        assert!(
            m <= last_logged + 1,
            "trial {trial}: promoted holds 1..{m}, more than was committed ({last_logged})"
        );
        // Applications open it and go on.
        let next = bdb::run_workload(&p.s.path("standby"), &workload(10, 500))?;
        assert_eq!(next, m + 10);
        assert_eq!(bdb::check(&p.s.path("standby"))?, m + 10);
        drop(p.standby);
    }
    Ok(())
}

#[test]
fn planned_switchover_keeps_every_transaction_and_fences_the_directory() -> Result<()> {
    let p = pair(1000)?;
    let last = bdb::run_workload(&p.s.path("env"), &workload(8000, 500))?;
    let (status, report, stderr) = promote(&p.s.path("standby"), &[])?;
    ensure!(status.success(), "promote failed: {stderr}");
    assert_eq!(report["kind"], "switchover", "{report}");
    assert_eq!(report["epoch"], 2);
    assert!(report["databases_verified"].as_u64().unwrap_or(0) >= 3);
    assert_phases_add_up(&report)?;
    assert_db_config_as_primary(&p)?;
    assert_eq!(bdb::check(&p.s.path("standby"))?, last);
    assert_eq!(
        bdb::db_dump_all(&p.s.path("env"), &WORKLOAD_DBS)?,
        bdb::db_dump_all(&p.s.path("standby"), &WORKLOAD_DBS)?
    );

    // Twice: says so, changes nothing.
    let (status, report, _) = promote(&p.s.path("standby"), &[])?;
    assert!(status.success());
    assert_eq!(report["already_promoted"], true);
    let st = standby_status(&p.s.path("standby"))?;
    assert_eq!(st["role"], "promoted");

    // A promoted directory refuses to follow again.
    let mut again = start_standby(
        p.s.root(),
        &p.s.path("standby"),
        &p.primary.url(),
        &p.s.certs,
        &[],
    )?;
    let code = again.wait_exit(Duration::from_secs(30))?;
    assert_eq!(code.code(), Some(3), "{}", again.log_text());
    assert!(
        again.log_text().contains("was promoted"),
        "{}",
        again.log_text()
    );
    Ok(())
}

#[test]
fn promote_without_a_running_standby_catches_up_from_the_primary() -> Result<()> {
    let mut p = pair(1000)?;
    p.standby.stop(Duration::from_secs(30))?;
    let last = bdb::run_workload(&p.s.path("env"), &workload(5000, 500))?;
    let (status, report, stderr) = promote(&p.s.path("standby"), &[])?;
    ensure!(status.success(), "promote failed: {stderr}");
    assert_eq!(report["kind"], "switchover", "{report}");
    assert_eq!(bdb::check(&p.s.path("standby"))?, last);
    Ok(())
}

#[test]
fn the_old_primary_stops_shipping_to_a_standby_of_the_new_one() -> Result<()> {
    let p = pair(2000)?;
    let (status, _, stderr) = promote(&p.s.path("standby"), &[])?;
    ensure!(status.success(), "promote failed: {stderr}");
    // The promoted directory becomes the new primary, at the new epoch.
    let new_primary = start_primary(
        p.s.root(),
        &p.s.path("standby"),
        &p.s.certs,
        "127.0.0.1:0",
        &[],
    )?;
    let mut s2 = start_standby(
        p.s.root(),
        &p.s.path("standby2"),
        &new_primary.url(),
        &p.s.certs,
        &NO_CHECKS,
    )?;
    wait_for("the second standby", LONG, || {
        Ok(standby_status(&p.s.path("standby2"))?["recoverable"] == true)
    })?;
    assert_eq!(standby_status(&p.s.path("standby2"))?["epoch"], 2);
    s2.stop(Duration::from_secs(30))?;
    let before = dir_digest(&p.s.path("standby2"))?;

    // Pointed at the old primary by mistake: both sides refuse.
    let mut wrong = start_standby(
        p.s.root(),
        &p.s.path("standby2"),
        &p.primary.url(),
        &p.s.certs,
        &NO_CHECKS,
    )?;
    let code = wrong.wait_exit(Duration::from_secs(30))?;
    assert_eq!(code.code(), Some(3), "{}", wrong.log_text());
    assert!(wrong.log_text().contains("fenced"), "{}", wrong.log_text());
    wait_for("the old primary to log it", LONG, || {
        Ok(p.primary.proc.log_text().contains("FENCED"))
    })?;
    assert_eq!(before, dir_digest(&p.s.path("standby2"))?);
    Ok(())
}

#[test]
fn readiness_checks_prove_recovery_without_changing_the_mirror() -> Result<()> {
    let s = Scratch::new()?;
    bdb::run_workload(&s.path("env"), &workload(3000, 500))?;
    let (_primary, mut standby) = start_pair(&s, &["--check-interval-secs", "1"])?;
    let mut w = s.spawn_workload(&workload(20_000, 500), "workload.log")?;
    // Periodic checks run while the log streams in.
    wait_for("a passing periodic check", LONG, || {
        Ok(standby_status(&s.path("standby"))?["last_check"]["ok"] == true)
    })?;
    assert!(w.wait_exit(LONG)?.success());
    wait_caught_up(&s.path("standby"), &s.path("env"), LONG)?;
    standby.stop(Duration::from_secs(30))?;

    let mirror = |d: &Path| -> Result<_> {
        Ok(dir_digest(d)?
            .into_iter()
            .filter(|(k, _)| !k.starts_with(".tandem/") || k == ".tandem/state")
            .collect::<Vec<_>>())
    };
    let before = mirror(&s.path("standby"))?;
    let out = Command::new(bin("tandem-standby"))
        .args(["check", "--json", "--dir"])
        .arg(s.path("standby"))
        .output()?;
    ensure!(
        out.status.success(),
        "check failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let report: serde_json::Value = serde_json::from_slice(&out.stdout)?;
    assert_eq!(report["ok"], true);
    assert_eq!(
        lsn_of(&report["durable_lsn"]),
        primary_log_end(&s.path("env"))?
    );
    assert!(report["recovered_to"].is_object());
    assert_eq!(
        before,
        mirror(&s.path("standby"))?,
        "a readiness check changed the mirror"
    );
    let st = standby_status(&s.path("standby"))?;
    assert!(st["replay_log_bytes"].as_u64().unwrap_or(0) > 0);
    assert!(st["replay_estimate_seconds"].as_f64().unwrap_or(-1.0) >= 0.0);
    Ok(())
}
