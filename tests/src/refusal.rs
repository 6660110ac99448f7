//! Helpers shared by the refusal tests (`bad_input.rs`, `tls_refusals.rs`,
//! `hostile_primary.rs`), whose requirement is "Bad input gets a clear
//! error and changes nothing": a primary and a standby directory that
//! mirrors it (`synced`), their workload (`quiet_workload`), and `stored`, the digest
//! every test that has a standby directory takes before and after to prove
//! it unchanged.

use crate::bdb::{self, WorkloadOptions};
use crate::harness::*;
use anyhow::{ensure, Context, Result};
use std::collections::BTreeMap;
use std::path::Path;
use std::process::Command;
use std::time::Duration;
use tandem_shared::logfile::{self, walk_file};

pub const LONG: Duration = Duration::from_secs(60);
/// No periodic readiness check: it would write its clone under `.tandem`.
pub const NO_CHECKS: [&str; 2] = ["--check-interval-secs", "0"];

/// The harness's [`workload`] (a checkpoint every 500 commits) without
/// its output.
pub fn quiet_workload(txns: u64) -> WorkloadOptions {
    WorkloadOptions {
        quiet: true,
        ..workload(txns, 500)
    }
}

/// What the standby directory holds, by content (`harness::dir_digest`),
/// less `.tandem/follow.json`: that file records where `run` last followed
/// from (rewritten on every accepted Welcome), it is configuration, not
/// mirrored data.
pub fn stored(dir: &Path) -> Result<BTreeMap<String, String>> {
    let mut d = dir_digest(dir)?;
    d.remove(".tandem/follow.json");
    Ok(d)
}

pub fn primary_command(env: &Path, certs: &Certs) -> Command {
    let mut cmd = Command::new(bin("tandem-primary"));
    cmd.arg("run")
        .arg("--env")
        .arg(env)
        .args(["--listen", "127.0.0.1:0"]);
    for (flag, file) in [
        ("--cert", "primary.pem"),
        ("--key", "primary-key.pem"),
        ("--ca", "ca.pem"),
    ] {
        cmd.arg(flag).arg(certs.dir.join(file));
    }
    cmd
}

pub fn count(text: &str, pat: &str) -> usize {
    text.matches(pat).count()
}

/// The last `n` lines of a log, for failure messages.
pub fn tail(text: &str, n: usize) -> String {
    let lines: Vec<&str> = text.lines().collect();
    lines[lines.len().saturating_sub(n)..].join("\n")
}

/// `harness::start_primary` with extra environment variables.
pub fn start_primary_env(
    s: &Scratch,
    env: &Path,
    certs: &Certs,
    tag: &str,
    vars: &[(&str, &str)],
) -> Result<Primary> {
    let addr_file = s.path(&format!("primary-{tag}.addr"));
    let mut cmd = primary_command(env, certs);
    cmd.arg("--bound-addr-file")
        .arg(&addr_file)
        .envs(vars.iter().copied());
    let mut proc = Proc::spawn(
        "tandem-primary",
        cmd,
        &s.path(&format!("primary-{tag}.log")),
    )?;
    let mut addr = None;
    wait_for("the primary to listen", LONG, || {
        ensure!(
            proc.is_running(),
            "tandem-primary exited: {}",
            proc.log_text()
        );
        addr = std::fs::read_to_string(&addr_file)
            .ok()
            .and_then(|a| a.trim().parse().ok());
        Ok(addr.is_some())
    })?;
    Ok(Primary {
        proc,
        addr: addr.context("bound address")?,
        env: env.into(),
    })
}

/// A primary serving a workload's environment and a standby directory that
/// mirrors it completely (the standby is stopped again).
pub fn synced(txns: u64) -> Result<(Scratch, Primary)> {
    synced_env(txns, &[])
}

pub fn synced_env(txns: u64, vars: &[(&str, &str)]) -> Result<(Scratch, Primary)> {
    let s = Scratch::new()?;
    bdb::run_workload(&s.path("env"), &quiet_workload(txns))?;
    let primary = start_primary_env(&s, &s.path("env"), &s.certs, "synced", vars)?;
    let mut standby = start_standby(
        s.root(),
        &s.path("standby"),
        &primary.url(),
        &s.certs,
        &NO_CHECKS,
    )?;
    wait_caught_up(&s.path("standby"), &s.path("env"), LONG)?;
    let status = standby.stop(LONG)?;
    ensure!(
        status.success(),
        "standby did not stop cleanly: {}",
        standby.log_text()
    );
    Ok((s, primary))
}

pub fn runtime() -> Result<tokio::runtime::Runtime> {
    Ok(tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()?)
}

/// The newest log file of a directory and where its verified records end.
pub fn log_end(dir: &Path) -> Result<(u32, logfile::Walk)> {
    let newest = std::fs::read_dir(dir)?
        .flatten()
        .filter_map(|e| {
            e.file_name()
                .to_str()
                .and_then(logfile::parse_log_file_name)
        })
        .max()
        .context("no log file")?;
    Ok((
        newest,
        walk_file(
            &std::fs::File::open(dir.join(logfile::log_file_name(newest)))?,
            None,
        )?,
    ))
}
