//! Issue 11, the fault campaign, short run: about two minutes of random
//! faults against a primary, two standbys and a real BDB workload, with
//! every promise checked after each round (see `tandem_tests::faults`).
//!
//! The fault kinds default to those whose fixes have landed; the lead
//! widens the set as fixes merge. Environment:
//! - `TANDEM_FAULTS`: comma-separated kinds, or `all`;
//! - `TANDEM_FAULTS_SECONDS`: length of the run (default 120);
//! - `TANDEM_FAULTS_SEED`: replay a seed printed by an earlier run.

use anyhow::{Context, Result};
use tandem_tests::faults::{self, Config, Fault};

/// Kinds that break no promise today: kills of a standby or the
/// application, a full standby disk, cut, slow and lossy links, promotions
/// with the application stopped or the primary dead. Left out until fixed:
/// kill-primary (a restarted primary removes log its standbys still need,
/// reproduced with and without the `primary` branch; seed
/// 12823922468141155335 replays it), rollback (finding 1), link-stall
/// (finding 7), flip-db / flip-log (the scrub), promote-live (finding 3).
const LANDED: &str =
    "kill-standby,kill-app,disk-full,link-cut,link-delay,link-lossy,promote-failover,promote-planned";

#[test]
fn a_short_fault_campaign_breaks_no_promise() -> Result<()> {
    let kinds = std::env::var("TANDEM_FAULTS").unwrap_or_else(|_| LANDED.into());
    let seconds = match std::env::var("TANDEM_FAULTS_SECONDS") {
        Ok(s) => s.parse().context("TANDEM_FAULTS_SECONDS")?,
        Err(_) => 120,
    };
    let mut cfg = Config {
        seconds: Some(seconds),
        faults: Fault::parse_list(&kinds)?,
        ..Config::default()
    };
    if let Ok(seed) = std::env::var("TANDEM_FAULTS_SEED") {
        cfg.seed = seed.parse().context("TANDEM_FAULTS_SEED")?;
    }
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
