//! Issue 11, the fault campaign, short run: about two minutes of random
//! faults against a primary, two standbys and a real BDB workload, with
//! every promise checked after each round (see `tandem_tests::faults`).
//!
//! Every fault kind by default. Environment:
//! - `TANDEM_FAULTS`: comma-separated kinds, or `all`;
//! - `TANDEM_FAULTS_SECONDS`: length of the run (default 120);
//! - `TANDEM_FAULTS_SEED`: another seed (default 7, a fixed sequence of
//!   faults, so a red suite means a regression, not a new draw; random
//!   draws are the long runs' job: `scripts/faults --seconds 3600`).

use anyhow::{Context, Result};
use tandem_tests::faults::{self, Config, Fault};

/// Every kind: kills of either daemon or the application, a rolled-back
/// primary, a full standby disk, cut, stalled, slow and lossy links, bytes
/// flipped at rest in a database page or the log, and promotions (with the
/// application stopped, running, or the primary dead).
const ALL: &str = "all";

#[test]
fn a_short_fault_campaign_breaks_no_promise() -> Result<()> {
    let kinds = std::env::var("TANDEM_FAULTS").unwrap_or_else(|_| ALL.into());
    let seconds = match std::env::var("TANDEM_FAULTS_SECONDS") {
        Ok(s) => s.parse().context("TANDEM_FAULTS_SECONDS")?,
        Err(_) => 120,
    };
    let mut cfg = Config {
        seconds: Some(seconds),
        faults: Fault::parse_list(&kinds)?,
        ..Config::default()
    };
    cfg.seed = match std::env::var("TANDEM_FAULTS_SEED") {
        Ok(seed) => seed.parse().context("TANDEM_FAULTS_SEED")?,
        Err(_) => 7,
    };
    let report = faults::run(cfg)?;
    let table = faults::render(&report);
    println!("{table}");
    assert!(
        report.error.is_none(),
        "the campaign stopped early:\n{table}"
    );
    assert!(report.violations.is_empty(), "promises broken:\n{table}");
    assert!(
        report.rounds >= 3,
        "too few rounds to mean anything:\n{table}"
    );
    assert!(
        report
            .checks
            .get("standby copies recovered and checked")
            .copied()
            .unwrap_or(0)
            >= report.rounds,
        "rounds went unchecked:\n{table}"
    );
    Ok(())
}

/// Issue #20: the etcd world (`scripts/faults --etcd`), each etcd kind once
/// in order: an automatic failover after kill -9 of the application and the
/// primary, the primary cut off from etcd until a standby promotes itself,
/// the etcd quorum lost, one etcd member killed. Never two leaders (sampled
/// every 100 ms), no waited commit lost, the usual copy checks.
/// `TANDEM_ETCD_FAULTS` / `TANDEM_ETCD_FAULTS_ROUNDS` change the kinds and
/// the number of rounds.
#[test]
fn a_short_etcd_fault_campaign_breaks_no_promise() -> Result<()> {
    if !tandem_tests::etcd::etcd_available() {
        anyhow::bail!("etcd is not installed: run scripts/setup (Debian's etcd-server)");
    }
    let kinds = std::env::var("TANDEM_ETCD_FAULTS")
        .unwrap_or_else(|_| "auto-failover,etcd-isolate,etcd-quorum,etcd-member".into());
    let faults = Fault::parse_list_for(&kinds, true)?;
    let rounds = match std::env::var("TANDEM_ETCD_FAULTS_ROUNDS") {
        Ok(s) => s.parse().context("TANDEM_ETCD_FAULTS_ROUNDS")?,
        Err(_) => faults.len() as u64,
    };
    let cfg = Config {
        seed: 20,
        rounds: Some(rounds),
        faults,
        etcd: true,
        in_order: true,
        ..Config::default()
    };
    let report = faults::run(cfg)?;
    let table = faults::render(&report);
    println!("{table}");
    assert!(
        report.error.is_none(),
        "the campaign stopped early:\n{table}"
    );
    assert!(report.violations.is_empty(), "promises broken:\n{table}");
    let checked = |k: &str| report.checks.get(k).copied().unwrap_or(0);
    assert!(
        checked("automatic promotions") >= 2 && checked("leader samples (never two leaders)") > 20,
        "the failovers went unchecked:\n{table}"
    );
    Ok(())
}
