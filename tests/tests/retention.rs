//! Issue: move shipped logs off the primary safely. Logs are removed only
//! when BDB no longer needs them and the standby holds them; an offline
//! standby holds them back up to a cap; a log removed behind Tandem's back
//! leads to a new base, never to a standby that silently lacks it.

use anyhow::Result;
use std::process::Command;
use std::time::Duration;
use tandem_tests::bdb::{self, WorkloadOptions, WORKLOAD_DBS};
use tandem_tests::harness::*;

const LONG: Duration = Duration::from_secs(180);
const QUIET: [&str; 4] = ["--check-interval-secs", "0", "--rebase-after-mib", "0"];

fn workload(txns: u64) -> WorkloadOptions {
    WorkloadOptions { txns, checkpoint_every: 200, lg_max: 1 << 20, ..Default::default() }
}

fn log_count(env: &std::path::Path) -> Result<usize> {
    Ok(tandem_shared::envlayout::EnvLayout::open(env)?.log_files()?.len())
}

fn base_id(dir: &std::path::Path) -> Result<String> {
    Ok(standby_status(dir)?["base_id"].as_str().unwrap_or_default().to_owned())
}

#[test]
fn retention_keeps_the_log_directory_bounded_without_losing_a_file() -> Result<()> {
    let s = Scratch::new()?;
    bdb::run_workload(&s.path("env"), &workload(1000))?;
    let args = ["--retention", "--retention-interval-secs", "1", "--retention-cap-mib", "64"];
    let primary = start_primary(s.root(), &s.path("env"), &s.certs, "127.0.0.1:0", &args)?;
    let _standby = start_standby(s.root(), &s.path("standby"), &primary.url(), &s.certs, &QUIET)?;
    wait_for("the base copy", LONG, || Ok(standby_status(&s.path("standby"))?["recoverable"] == true))?;
    let first_base = base_id(&s.path("standby"))?;
    let mut w = Proc::spawn("workload", WorkloadOptions { rate: 3000, ..workload(36_000) }.command(&s.path("env")), &s.path("w.log"))?;
    let mut most = 0;
    while w.is_running() {
        most = most.max(log_count(&s.path("env"))?);
        std::thread::sleep(Duration::from_millis(100));
    }
    assert!(w.wait_exit(LONG)?.success());
    let last = bdb::parse_done(&w.log_text()).unwrap_or(0);
    wait_caught_up(&s.path("standby"), &s.path("env"), LONG)?;
    wait_for("a retention pass", LONG, || Ok(log_count(&s.path("env"))? <= 4))?;
    let end = primary_log_end(&s.path("env"))?;
    eprintln!("generated {} log files; at most {most} were on the primary at once", end.file);
    // Bounded: what is on disk at once does not grow with what was written
    // (about 6 MB/s here, one retention pass a second).
    assert!(end.file > 40 && most * 3 < end.file as usize, "the primary's log directory must stay bounded: {most} of {}", end.file);
    // No file was ever removed before the standby had it: no gap, so no
    // second base, and the standby recovers every transaction.
    assert_eq!(base_id(&s.path("standby"))?, first_base);
    assert_eq!(recover_copy(&s.path("standby"), &s.path("recovered"))?, last);
    Ok(())
}

#[test]
fn an_offline_standby_holds_logs_back_up_to_the_cap_then_is_dropped() -> Result<()> {
    let s = Scratch::new()?;
    bdb::run_workload(&s.path("env"), &workload(1000))?;
    let args = ["--retention", "--retention-interval-secs", "1", "--retention-cap-mib", "4"];
    let primary = start_primary(s.root(), &s.path("env"), &s.certs, "127.0.0.1:0", &args)?;
    let mut standby = start_standby(s.root(), &s.path("standby"), &primary.url(), &s.certs, &QUIET)?;
    wait_caught_up(&s.path("standby"), &s.path("env"), LONG)?;
    let first_base = base_id(&s.path("standby"))?;
    standby.stop(LONG)?;
    // While offline, the logs it needs stay (a little below the cap).
    bdb::run_workload(&s.path("env"), &workload(1000))?;
    wait_for("the primary to account for what it holds back", LONG, || {
        Ok(primary_status(&s, &primary)?["standbys"][0]["held_back_bytes"].as_u64().unwrap_or(0) > 0)
    })?;
    assert_eq!(primary_status(&s, &primary)?["standbys"][0]["dropped"], false);
    // Past the cap, it is dropped loudly and its logs go.
    bdb::run_workload(&s.path("env"), &workload(6000))?;
    wait_for("the standby to be dropped", LONG, || Ok(primary.proc.log_text().contains("DROPPING STANDBY")))?;
    wait_for("logs to be removed", LONG, || Ok(log_count(&s.path("env"))? <= 6))?;
    assert_eq!(primary_status(&s, &primary)?["standbys"][0]["dropped"], true);
    // It comes back to a new base and ends identical.
    let _standby = start_standby(s.root(), &s.path("standby"), &primary.url(), &s.certs, &QUIET)?;
    wait_caught_up(&s.path("standby"), &s.path("env"), LONG)?;
    assert_ne!(base_id(&s.path("standby"))?, first_base);
    let copy = s.path("recovered");
    assert_eq!(recover_copy(&s.path("standby"), &copy)?, 8000);
    assert_eq!(bdb::db_dump_all(&s.path("env"), &WORKLOAD_DBS)?, bdb::db_dump_all(&copy, &WORKLOAD_DBS)?);
    Ok(())
}

fn primary_status(s: &Scratch, p: &Primary) -> Result<serde_json::Value> {
    let c = |f: &str| s.certs.dir.join(f);
    let out = Command::new(bin("tandem-primary"))
        .args(["status", "--json", "--primary", &p.url()])
        .arg("--cert").arg(c("standby.pem")).arg("--key").arg(c("standby-key.pem")).arg("--ca").arg(c("ca.pem"))
        .output()?;
    anyhow::ensure!(out.status.success(), "primary status failed: {}", String::from_utf8_lossy(&out.stderr));
    Ok(serde_json::from_slice(&out.stdout)?)
}

#[test]
fn a_log_removed_behind_tandems_back_leads_to_a_new_base() -> Result<()> {
    let s = Scratch::new()?;
    bdb::run_workload(&s.path("env"), &workload(1000))?;
    let primary = start_primary(s.root(), &s.path("env"), &s.certs, "127.0.0.1:0", &[])?;
    let mut standby = start_standby(s.root(), &s.path("standby"), &primary.url(), &s.certs, &QUIET)?;
    wait_caught_up(&s.path("standby"), &s.path("env"), LONG)?;
    let first_base = base_id(&s.path("standby"))?;
    standby.stop(LONG)?;
    // The application (or an operator) removes logs the standby never got.
    bdb::run_workload(&s.path("env"), &workload(5000))?;
    let out = Command::new("db5.3_archive").args(["-d", "-h"]).arg(s.path("env")).output()?;
    assert!(out.status.success());
    let _standby = start_standby(s.root(), &s.path("standby"), &primary.url(), &s.certs, &QUIET)?;
    wait_caught_up(&s.path("standby"), &s.path("env"), LONG)?;
    assert_ne!(base_id(&s.path("standby"))?, first_base, "a gap must lead to a new base");
    assert!(primary.proc.log_text().contains("are gone from the primary"), "the primary must say which files were lost");
    assert_eq!(recover_copy(&s.path("standby"), &s.path("recovered"))?, 6000);
    Ok(())
}
