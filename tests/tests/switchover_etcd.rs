//! Breaking a planned switchover through etcd at its worst moments (issue
//! #20's follow-ups), with the test hooks' pause points
//! (`tandem_coord::test_hook`) holding the target there:
//! - etcd stops between the target's claim and the leader-key move: the
//!   command says the outcome is unknown (exit 8), nothing changed, and
//!   once etcd is back the old primary leads again and a new switchover
//!   goes through;
//! - etcd stops just after the leader key moved, so the target never
//!   learns it: it gives up with its directory unchanged, and when etcd is
//!   back it sees the key on its own lease and finishes the switchover;
//! - the target is killed -9 after it promoted, before it served: `run
//!   --etcd` under another name is refused (exit 3, nothing changed), and
//!   under its own name it finishes the job and serves.
//!
//! Every one checks that never two primaries act (sampled every 100 ms),
//! what the new primary holds is exactly what the old one committed, the
//! old primary stops (exit 7) and the other standby follows the new one
//! with no database byte re-sent.

use anyhow::{bail, Context, Result};
use std::time::Duration;
use tandem_tests::bdb;
use tandem_tests::etcd::EtcdCluster;
use tandem_tests::etcd_trio::{switchover, Trio};
use tandem_tests::harness::*;

const LONG: Duration = Duration::from_secs(120);

fn etcd() -> Result<EtcdCluster> {
    if !tandem_tests::etcd::etcd_available() {
        bail!("etcd is not installed: run scripts/setup");
    }
    EtcdCluster::start()
}

fn stop_etcd(etcd: &mut EtcdCluster) -> Result<()> {
    for i in 0..tandem_tests::etcd::MEMBERS {
        etcd.kill(i)?;
    }
    Ok(())
}

fn start_etcd(etcd: &mut EtcdCluster) -> Result<()> {
    for i in 0..tandem_tests::etcd::MEMBERS {
        etcd.restart(i)?;
    }
    etcd.wait_healthy(LONG)
}

/// The committed transactions of an environment, read from a copy.
fn committed(t: &Trio, env: &std::path::Path, copy: &str) -> Result<u64> {
    copy_env(env, &t.s.path(copy))?;
    bdb::check(&t.s.path(copy))
}

/// The end of every switchover here: the other standby follows the new
/// primary at epoch 2, the sampler never saw two primaries acting, and the
/// new primary (directory `new`) holds exactly the old primary's commits.
fn follows_and_holds_the_prefix(
    t: &mut Trio,
    etcd: &EtcdCluster,
    follower: usize,
    new: &str,
    sampler: tandem_tests::etcd::LeaderSampler,
) -> Result<()> {
    let mut f = t.standbys.remove(follower);
    t.wait_follows(follower, &mut f, etcd, 2)?;
    sampler.finish()?;
    assert_eq!(
        committed(t, &t.s.path(new), "new")?,
        committed(t, &t.s.path("env"), "old")?
    );
    Ok(())
}

#[test]
fn etcd_lost_between_the_claim_and_the_key_move_changes_nothing() -> Result<()> {
    let mut etcd = etcd()?;
    let mut t = Trio::start(&etcd, ["before-take-over", ""])?;
    let sampler = t.sampler()?;
    let mut cmd = t.spawn_switchover(
        &etcd,
        &["--to", "s1", "--timeout-secs", "6"],
        "switchover.log",
    )?;
    t.wait_paused("before-take-over")?;
    stop_etcd(&mut etcd)?;
    t.resume("before-take-over")?;
    // The command cannot learn the outcome: it says so, with its own code.
    let code = cmd.wait_exit(LONG)?.code();
    let out = cmd.log_text();
    assert_eq!(code, Some(8), "{out}");
    assert!(
        out.contains("outcome UNKNOWN") && out.contains("etcdctl get /tandem/c1/leader"),
        "{out}"
    );
    // s1 gave up with its directory unchanged and follows again.
    let log = t.standbys[0].log.clone();
    wait_while_running("s1 to give up", LONG, &mut t.standbys[0], || {
        Ok(std::fs::read_to_string(&log)?
            .contains("etcd did not answer whether the leader key moved"))
    })?;
    let st = standby_status(&t.s.path("s1"))?;
    assert!(st["role"] == "standby" && st["epoch"] == 1, "{st}");

    // etcd returns: the old primary leads again at its epoch.
    start_etcd(&mut etcd)?;
    wait_for("p1 to lead again", LONG, || {
        let c = &primary_status(&t.primary, &t.s.certs)?["etcd"];
        Ok(c["leading"] == true && c["fenced"] == false)
    })?;
    let leader = etcd.get_json("/tandem/c1/leader")?.context("leader")?;
    assert!(leader["name"] == "p1" && leader["epoch"] == 1, "{leader}");
    let epoch = etcd.get_json("/tandem/c1/epoch")?.context("epoch")?;
    assert!(epoch["epoch"] == 1 && epoch["name"] == "p1", "{epoch}");

    // The request left behind counts as failed: a new switchover (to s2,
    // whose hooks are not armed) goes through.
    let (code, out) = switchover(&etcd.endpoints(), &["--to", "s2"])?;
    assert_eq!(code, Some(0), "{out}");
    assert!(out.contains("switched over: s2 (epoch 2)"), "{out}");
    let status = t.primary.proc.wait_exit(LONG)?;
    assert_eq!(status.code(), Some(7), "{}", t.primary.proc.log_text());
    follows_and_holds_the_prefix(&mut t, &etcd, 0, "s2", sampler)
}

#[test]
fn a_take_over_whose_answer_was_lost_is_finished_when_etcd_returns() -> Result<()> {
    let mut etcd = etcd()?;
    let mut t = Trio::start(&etcd, ["lose-take-over-answer", ""])?;
    let sampler = t.sampler()?;
    let mut cmd = t.spawn_switchover(
        &etcd,
        &["--to", "s1", "--catch-up-timeout-secs", "10"],
        "switchover.log",
    )?;
    t.wait_paused("lose-take-over-answer")?;
    let leader = etcd.get_json("/tandem/c1/leader")?.context("leader")?;
    assert!(leader["name"] == "s1" && leader["epoch"] == 2, "{leader}");
    stop_etcd(&mut etcd)?;
    t.resume("lose-take-over-answer")?;
    let log = t.standbys[0].log.clone();
    wait_while_running("s1 to give up", LONG, &mut t.standbys[0], || {
        Ok(std::fs::read_to_string(&log)?
            .contains("etcd did not answer whether the leader key moved"))
    })?;
    let st = standby_status(&t.s.path("s1"))?;
    assert!(st["role"] == "standby" && st["epoch"] == 1, "{st}");

    // etcd returns: s1 sees the key on its own lease and finishes.
    start_etcd(&mut etcd)?;
    let code = cmd.wait_exit(LONG)?.code();
    let out = cmd.log_text();
    assert_eq!(code, Some(0), "{out}");
    assert!(out.contains("switched over: s1 (epoch 2)"), "{out}");
    let status = t.primary.proc.wait_exit(LONG)?;
    assert_eq!(status.code(), Some(7), "{}", t.primary.proc.log_text());
    assert!(
        t.standbys[0]
            .log_text()
            .contains("lost take-over succeeded: finishing the switchover"),
        "{}",
        t.standbys[0].log_text()
    );
    follows_and_holds_the_prefix(&mut t, &etcd, 1, "s1", sampler)
}

#[test]
fn a_target_killed_after_it_promoted_finishes_on_restart_under_its_own_name_only() -> Result<()> {
    let etcd = etcd()?;
    let mut t = Trio::start(&etcd, ["before-serve", ""])?;
    let sampler = t.sampler()?;
    let mut cmd = t.spawn_switchover(&etcd, &["--to", "s1"], "switchover.log")?;
    t.wait_paused("before-serve")?;
    t.standbys[0].kill9()?;
    let status = t.primary.proc.wait_exit(LONG)?;
    assert_eq!(status.code(), Some(7), "{}", t.primary.proc.log_text());
    let dir = t.s.path("s1");
    let st = standby_status(&dir)?;
    assert!(st["role"] == "promoted" && st["epoch"] == 2, "{st}");

    // Under another name it may not serve: refused, nothing changed.
    let before = dir_digest(&dir)?;
    let mut other = t.start_standby_named(&etcd, 0, "s9", "")?;
    let code = other.wait_exit(LONG)?.code();
    let log = other.log_text();
    assert_eq!(code, Some(3), "{log}");
    assert!(log.contains("taken by s1, not by s9"), "{log}");
    assert_eq!(dir_digest(&dir)?, before);

    // Under its own name it finishes the job and serves.
    let mut again = t.start_standby(&etcd, 0, "")?;
    let code = cmd.wait_exit(LONG)?.code();
    let out = cmd.log_text();
    assert_eq!(code, Some(0), "{out}\n{}", again.log_text());
    assert!(out.contains("switched over: s1 (epoch 2)"), "{out}");
    assert!(again.is_running(), "{}", again.log_text());
    follows_and_holds_the_prefix(&mut t, &etcd, 1, "s1", sampler)
}
