//! Issue 11, finding 3: promote cannot split the brain. While the primary
//! is reachable and an application has its environment open, promote
//! refuses and changes nothing; once the application stopped, it promotes
//! as a switchover confirmed by the primary; `--force` fails over anyway.
//! Real binaries, real Berkeley DB, mutual TLS on loopback.

use anyhow::{ensure, Context, Result};
use std::time::Duration;
use tandem_shared::envusers::env_users;
use tandem_tests::bdb::{self, WorkloadOptions};
use tandem_tests::harness::*;

const LONG: Duration = Duration::from_secs(180);
/// `tandem-standby promote` refused for now, nothing changed.
const EXIT_REFUSED_FOR_NOW: i32 = 4;

/// An application committing slowly on the primary: quiet for longer than
/// any silence heuristic, but still able to commit.
fn slow_application(p: &Pair) -> Result<Proc> {
    let opts = WorkloadOptions {
        txns: 0,
        seconds: Some(600),
        rate: 2,
        ..workload(0, 500)
    };
    let app = Proc::spawn(
        "application",
        opts.command(&p.s.path("env")),
        &p.s.path("application.log"),
    )?;
    let pid = app.pid();
    wait_for("the application to open the environment", LONG, || {
        Ok(env_users(&p.s.path("env"))?.iter().any(|u| u.pid == pid))
    })?;
    Ok(app)
}

#[test]
fn env_users_names_a_process_holding_the_environment_open() -> Result<()> {
    let s = Scratch::new()?;
    let env = s.path("env");
    bdb::run_workload(&env, &workload(100, 500))?;
    assert_eq!(env_users(&env)?, vec![], "nobody has it open yet");
    // Holds a transaction open, committing nothing, until signalled.
    let opts = WorkloadOptions {
        txns: 0,
        open_txn: Some((101, -1)),
        quiet: true,
        ..workload(0, 500)
    };
    let mut app = Proc::spawn("holder", opts.command(&env), &s.path("holder.log"))?;
    wait_for("the transaction to be held open", LONG, || {
        Ok(app.log_text().contains("OPEN"))
    })?;
    let users = env_users(&env)?;
    assert!(
        users.iter().any(|u| u.pid == app.pid()),
        "{users:?} lacks pid {}",
        app.pid()
    );
    assert!(users.iter().all(|u| u.pid != std::process::id()));
    app.stop(LONG)?;
    assert_eq!(env_users(&env)?, vec![], "it closed the environment");
    Ok(())
}

#[test]
fn promote_refuses_while_an_application_can_commit_then_switches_over() -> Result<()> {
    let mut p = pair(&workload(1000, 500))?;
    let dir = p.s.path("standby");
    let mut app = slow_application(&p)?;

    let (status, _, stderr) = promote(&dir, &[])?;
    assert_eq!(status.code(), Some(EXIT_REFUSED_FOR_NOW), "{stderr}");
    assert!(stderr.contains(&format!("pid {}", app.pid())), "{stderr}");
    assert!(stderr.contains("Stop the application"), "{stderr}");
    // The standby was left following: it still receives the commits.
    let st = standby_status(&dir)?;
    assert_eq!(st["role"], "standby", "{st}");
    let before = lsn_of(&st["durable_lsn"]);
    wait_for("the standby to keep following", LONG, || {
        let st = standby_status(&dir)?;
        Ok(st["running"] == true && lsn_of(&st["durable_lsn"]) > before)
    })?;

    // Without a running standby: refused too, and not one byte changes.
    p.standby.stop(LONG)?;
    let digest = dir_digest(&dir)?;
    let (status, _, stderr) = promote(&dir, &[])?;
    assert_eq!(status.code(), Some(EXIT_REFUSED_FOR_NOW), "{stderr}");
    assert_eq!(
        digest,
        dir_digest(&dir)?,
        "a refused promote changed the directory"
    );
    assert_eq!(standby_status(&dir)?["running"], false);

    // The operator stops the application: a switchover with every commit.
    app.stop(LONG)?;
    let last = bdb::parse_done(&app.log_text()).context("the application's DONE line")?;
    let (status, report, stderr) = promote(&dir, &[])?;
    ensure!(status.success(), "promote failed: {stderr}");
    assert_eq!(report["kind"], "switchover", "{report}");
    assert_eq!(bdb::check(&dir)?, last);
    Ok(())
}

#[test]
fn force_promotes_as_a_failover_while_the_application_runs() -> Result<()> {
    let p = pair(&workload(1000, 500))?;
    let dir = p.s.path("standby");
    let mut app = slow_application(&p)?;
    let (status, report, stderr) = promote(&dir, &["--force"])?;
    ensure!(status.success(), "promote --force failed: {stderr}");
    assert_eq!(report["kind"], "failover", "{report}");
    assert!(stderr.contains("FORCED"), "{stderr}");
    let m = bdb::check(&dir)?;
    assert!(m >= 1000, "promoted holds 1..{m}");
    app.stop(LONG)?;
    let last = bdb::parse_done(&app.log_text()).context("the application's DONE line")?;
    assert!(
        m <= last,
        "promoted holds 1..{m}, more than was committed ({last})"
    );
    Ok(())
}
