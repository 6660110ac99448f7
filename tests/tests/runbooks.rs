//! The README's runbooks work when followed literally: each block marked
//! `<!-- runbook: NAME -->` is run by bash, as written, with `STANDBY_DIR`
//! set and the freshly built binaries first on PATH.

use anyhow::{bail, Context, Result};
use std::process::Command;
use std::time::Duration;
use tandem_tests::bdb::{self, WorkloadOptions};
use tandem_tests::harness::*;

const LONG: Duration = Duration::from_secs(120);

fn runbook(name: &str) -> Result<String> {
    let readme = std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/../README.md"))?;
    let marker = format!("<!-- runbook: {name} -->");
    let after = readme
        .split_once(&marker)
        .with_context(|| format!("no runbook {name} in the README"))?
        .1;
    let block = after
        .split_once("```sh\n")
        .context("no sh block after the marker")?
        .1;
    Ok(block
        .split_once("```")
        .context("unterminated block")?
        .0
        .to_owned())
}

fn run_runbook(name: &str, standby_dir: &std::path::Path) -> Result<String> {
    let script = runbook(name)?;
    let bins = bin("tandem-standby")
        .parent()
        .context("binary directory")?
        .to_path_buf();
    let path = format!(
        "{}:{}",
        bins.display(),
        std::env::var("PATH").unwrap_or_default()
    );
    let out = Command::new("bash")
        .args(["-euo", "pipefail", "-c", &script])
        .env("STANDBY_DIR", standby_dir)
        .env("PATH", path)
        .output()?;
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    if !out.status.success() {
        bail!("runbook {name} failed:\n{script}\n{text}");
    }
    Ok(text)
}

fn workload(txns: u64) -> WorkloadOptions {
    WorkloadOptions {
        txns,
        checkpoint_every: 500,
        lg_max: 1 << 20,
        ..Default::default()
    }
}

#[test]
fn switchover_runbook() -> Result<()> {
    let s = Scratch::new()?;
    bdb::run_workload(&s.path("env"), &workload(1000))?;
    let primary = start_primary(s.root(), &s.path("env"), &s.certs, "127.0.0.1:0", &[])?;
    let _standby = start_standby(s.root(), &s.path("standby"), &primary.url(), &s.certs, &[])?;
    // The application runs, then is stopped (the runbook's first step).
    let last = bdb::run_workload(&s.path("env"), &workload(6000))?;
    let out = run_runbook("switchover", &s.path("standby"))?;
    assert!(out.contains("switchover"), "{out}");
    assert_eq!(bdb::check(&s.path("standby"))?, last);
    Ok(())
}

#[test]
fn failover_runbook() -> Result<()> {
    let s = Scratch::new()?;
    bdb::run_workload(&s.path("env"), &workload(1000))?;
    let mut primary = start_primary(s.root(), &s.path("env"), &s.certs, "127.0.0.1:0", &[])?;
    let _standby = start_standby(s.root(), &s.path("standby"), &primary.url(), &s.certs, &[])?;
    let last = bdb::run_workload(&s.path("env"), &workload(3000))?;
    wait_caught_up(&s.path("standby"), &s.path("env"), LONG)?;
    primary.proc.kill9()?;
    run_runbook("failover", &s.path("standby"))?;
    assert_eq!(bdb::check(&s.path("standby"))?, last);
    Ok(())
}

#[test]
fn check_runbook() -> Result<()> {
    let s = Scratch::new()?;
    bdb::run_workload(&s.path("env"), &workload(2000))?;
    let primary = start_primary(s.root(), &s.path("env"), &s.certs, "127.0.0.1:0", &[])?;
    let _standby = start_standby(s.root(), &s.path("standby"), &primary.url(), &s.certs, &[])?;
    wait_caught_up(&s.path("standby"), &s.path("env"), LONG)?;
    let out = run_runbook("check", &s.path("standby"))?;
    assert!(out.contains("recoverable"), "{out}");
    Ok(())
}
