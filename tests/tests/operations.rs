//! Issue: make Tandem pleasant to run — lag you can see (status and
//! metrics), configuration files that mirror the flags.

use anyhow::Result;
use std::path::Path;
use std::process::Command;
use std::time::Duration;
use tandem_tests::bdb::{self, WorkloadOptions};
use tandem_tests::harness::*;

const LONG: Duration = Duration::from_secs(120);

/// The JSON body of the admin endpoint's /status.
fn remote_status(addr: &str) -> Result<serde_json::Value> {
    let text = http_get(addr, "/status")?;
    let body = text
        .split_once("\r\n\r\n")
        .map(|(_, b)| b)
        .unwrap_or_default();
    Ok(serde_json::from_str(body)?)
}

#[test]
fn lag_rises_under_load_and_returns_to_zero_in_status_and_metrics() -> Result<()> {
    let s = Scratch::new()?;
    bdb::run_workload(
        &s.path("env"),
        &WorkloadOptions {
            txns: 1000,
            ..Default::default()
        },
    )?;
    let primary = start_primary(s.root(), &s.path("env"), &s.certs, "127.0.0.1:0", &[])?;
    let metrics = free_addr()?;
    let _standby = start_standby(
        s.root(),
        &s.path("standby"),
        &primary.url(),
        &s.certs,
        &["--metrics-listen", &metrics],
    )?;
    wait_caught_up(&s.path("standby"), &s.path("env"), LONG)?;
    // The base copy's progress ends complete: every byte the primary listed.
    let files: u64 = bdb::WORKLOAD_DBS
        .iter()
        .filter_map(|f| std::fs::metadata(s.path("env").join(f)).ok())
        .map(|m| m.len())
        .sum();
    wait_for("the base copy's progress to be reported", LONG, || {
        let st = standby_status(&s.path("standby"))?;
        Ok(st["base_copy_active"] == false
            && st["base_copy_done_bytes"] == st["base_copy_total_bytes"]
            && st["base_copy_total_bytes"].as_u64() >= Some(files))
    })?;
    let w = WorkloadOptions {
        txns: 60_000,
        checkpoint_every: 500,
        lg_max: 1 << 20,
        ..Default::default()
    };
    let mut w = Proc::spawn("workload", w.command(&s.path("env")), &s.path("w.log"))?;
    let (mut max_status_lag, mut max_metric_lag) = (0u64, 0f64);
    wait_for("the workload to end", LONG, || {
        track(&s, &metrics, &mut max_status_lag, &mut max_metric_lag)?;
        Ok(!w.is_running())
    })?;
    let last = bdb::parse_done(&w.log_text()).unwrap_or(0);
    wait_for("the standby to catch up", LONG, || {
        track(&s, &metrics, &mut max_status_lag, &mut max_metric_lag)?;
        let st = standby_status(&s.path("standby"))?;
        Ok(lsn_of(&st["durable_lsn"]) == primary_log_end(&s.path("env"))? && st["lag_bytes"] == 0)
    })?;
    assert!(
        max_status_lag > 0,
        "status must have shown lag while catching up"
    );
    assert!(
        max_metric_lag > 0.0,
        "metrics must have shown lag while catching up"
    );
    let st = standby_status(&s.path("standby"))?;
    assert_eq!(st["lag_bytes"], 0);
    assert_eq!(st["lag_seconds"], 0.0);
    wait_for("metrics to show no lag", LONG, || {
        Ok(metric(&scrape_metrics(&metrics)?, "tandem_standby_lag_bytes").ok() == Some(0.0))
    })?;
    let m = scrape_metrics(&metrics)?;
    assert!(metric(&m, "tandem_standby_log_bytes_received_total").unwrap_or(0.0) > 0.0);
    assert_eq!(metric(&m, "tandem_standby_connected").ok(), Some(1.0));
    let text = http_get(&metrics, "/metrics")?;
    assert!(text.contains("# TYPE tandem_standby_lag_seconds gauge"));
    // The same status, remotely, from the admin endpoint.
    let remote = remote_status(&metrics)?;
    assert_eq!(remote["lag_bytes"], 0);
    assert_eq!(
        lsn_of(&remote["durable_lsn"]),
        primary_log_end(&s.path("env"))?
    );
    assert_eq!(
        recover_copy(&s.path("standby"), &s.path("recovered"))?,
        last
    );
    Ok(())
}

/// Records the largest lag seen in status and in metrics.
fn track(s: &Scratch, metrics: &str, status_lag: &mut u64, metric_lag: &mut f64) -> Result<()> {
    let st = standby_status(&s.path("standby"))?;
    *status_lag = (*status_lag).max(st["lag_bytes"].as_u64().unwrap_or(0));
    if let Ok(m) = scrape_metrics(metrics) {
        *metric_lag = metric_lag.max(metric(&m, "tandem_standby_lag_bytes").unwrap_or(0.0));
    }
    Ok(())
}

#[test]
fn a_config_file_behaves_like_flags_and_bad_keys_are_named() -> Result<()> {
    let s = Scratch::new()?;
    bdb::run_workload(
        &s.path("env"),
        &WorkloadOptions {
            txns: 2000,
            ..Default::default()
        },
    )?;
    let c = |f: &str| s.certs.dir.join(f).display().to_string();
    let addr_file = s.path("primary.addr");
    let primary_toml = format!(
        "env = {:?}\nlisten = \"127.0.0.1:0\"\ncert = {:?}\nkey = {:?}\nca = {:?}\nbound-addr-file = {:?}\npoll-interval-ms = 5\n",
        s.path("env"), c("primary.pem"), c("primary-key.pem"), c("ca.pem"), addr_file
    );
    std::fs::write(s.path("primary.toml"), primary_toml)?;
    let mut cmd = Command::new(bin("tandem-primary"));
    cmd.arg("run").arg("--config").arg(s.path("primary.toml"));
    let mut primary = Proc::spawn("tandem-primary", cmd, &s.path("primary.log"))?;
    wait_for("the primary to listen", LONG, || {
        Ok(addr_file.exists() || !primary.is_running())
    })?;
    let url = format!("https://{}", std::fs::read_to_string(&addr_file)?.trim());

    let standby_toml = format!(
        "dir = {:?}\nprimary = {url:?}\ncert = {:?}\nkey = {:?}\nca = {:?}\nname = \"from-config\"\ncheck-interval-secs = 0\n",
        s.path("standby"), c("standby.pem"), c("standby-key.pem"), c("ca.pem")
    );
    std::fs::write(s.path("standby.toml"), &standby_toml)?;
    let mut cmd = Command::new(bin("tandem-standby"));
    cmd.arg("run").arg("--config").arg(s.path("standby.toml"));
    let _standby = Proc::spawn("tandem-standby", cmd, &s.path("standby.log"))?;
    wait_caught_up(&s.path("standby"), &s.path("env"), LONG)?;
    assert_eq!(
        recover_copy(&s.path("standby"), &s.path("recovered"))?,
        2000
    );

    // An unknown key and a bad value are errors that name them (exit 2).
    std::fs::write(
        s.path("bad.toml"),
        format!("{standby_toml}primray = \"x\"\n"),
    )?;
    let out = Command::new(bin("tandem-standby"))
        .arg("run")
        .arg("--config")
        .arg(s.path("bad.toml"))
        .output()?;
    assert_eq!(out.status.code(), Some(2));
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("primray"),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    std::fs::write(s.path("bad.toml"), "check-interval-secs = \"often\"\n")?;
    let out = Command::new(bin("tandem-standby"))
        .arg("run")
        .arg("--config")
        .arg(s.path("bad.toml"))
        .output()?;
    assert_eq!(out.status.code(), Some(2));
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("check-interval-secs"),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    // Flags win over the file.
    let out = Command::new(bin("tandem-standby"))
        .arg("run")
        .arg("--config")
        .arg(s.path("standby.toml"))
        .args(["--primary", "http://not-tls"])
        .output()?;
    assert!(!out.status.success());
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("not-tls"),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    // The shipped examples parse: the first complaint is about a path of
    // this machine (no such certificate), not about a key or a value.
    let contrib = Path::new(env!("CARGO_MANIFEST_DIR")).join("../contrib/config");
    for (exe, file) in [
        ("tandem-standby", "standby.toml"),
        ("tandem-primary", "primary.toml"),
    ] {
        let out = Command::new(bin(exe))
            .arg("run")
            .arg("--config")
            .arg(contrib.join(file))
            .output()?;
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(
            !out.status.success() && !err.contains("unknown") && !err.contains("invalid"),
            "{file}: {err}"
        );
    }
    primary.stop(LONG)?;
    Ok(())
}
