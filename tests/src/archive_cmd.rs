//! Running `tandem-standby archive`, `verify-archive` and `restore` for the
//! archive tests (`archive.rs`: one backup taken, verified, restored;
//! `archive_follow.rs`: the continuous archive), and the pair they archive.

use crate::bdb;
use crate::harness::{bin, wait_for, Pair, Proc, Scratch};
use anyhow::{ensure, Context, Result};
use std::ffi::OsStr;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

pub const LONG: Duration = Duration::from_secs(120);

/// What one `tandem-standby` command did.
pub struct Run {
    pub code: Option<i32>,
    pub stdout: String,
    pub stderr: String,
    pub json: serde_json::Value,
    pub secs: f64,
}

impl Run {
    pub fn ok(&self) -> bool {
        self.code == Some(0)
    }
}

pub fn standby_cmd<I, S>(args: I, env: &[(&str, &str)]) -> Result<Run>
where
    I: IntoIterator<Item = S>,
    S: AsRef<OsStr>,
{
    let started = Instant::now();
    let mut cmd = Command::new(bin("tandem-standby"));
    cmd.args(args);
    for (k, v) in env {
        cmd.env(k, v);
    }
    let out = cmd.output().context("running tandem-standby")?;
    let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
    Ok(Run {
        code: out.status.code(),
        json: serde_json::from_str(&stdout).unwrap_or(serde_json::Value::Null),
        stdout,
        stderr: String::from_utf8_lossy(&out.stderr).into_owned(),
        secs: started.elapsed().as_secs_f64(),
    })
}

pub fn archive(dir: &Path, to: &Path, extra: &[&str]) -> Result<Run> {
    let mut args: Vec<&OsStr> = vec![
        "archive".as_ref(),
        "--json".as_ref(),
        "--dir".as_ref(),
        dir.as_ref(),
        "--to".as_ref(),
        to.as_ref(),
    ];
    args.extend(extra.iter().map(OsStr::new));
    let r = standby_cmd(args, &[])?;
    ensure!(r.ok(), "archive failed: {}{}", r.stdout, r.stderr);
    Ok(r)
}

pub fn verify(target: &Path) -> Result<Run> {
    standby_cmd(
        [
            OsStr::new("verify-archive"),
            OsStr::new("--json"),
            target.as_os_str(),
        ],
        &[],
    )
}

pub fn restore(from: &Path, to: &Path, until: Option<&str>, env: &[(&str, &str)]) -> Result<Run> {
    let mut args: Vec<&OsStr> = vec![
        "restore".as_ref(),
        "--json".as_ref(),
        "--from".as_ref(),
        from.as_ref(),
        "--to".as_ref(),
        to.as_ref(),
    ];
    if let Some(u) = until {
        args.extend(["--until".as_ref(), OsStr::new(u)]);
    }
    standby_cmd(args, env)
}

pub fn pair(initial: u64) -> Result<Pair> {
    crate::harness::pair(&crate::harness::workload(initial, 500))
}

/// The workload running on the pair's primary while a backup is taken:
/// 20,000 transactions at 3,000 a second, each commit's LSN logged to
/// `commits.lsn` (returned), once 3,000 are logged.
pub fn hot_workload(s: &Scratch) -> Result<(Proc, PathBuf)> {
    let lsns = s.path("commits.lsn");
    let opts = bdb::WorkloadOptions {
        lsn_log: Some(lsns.clone()),
        rate: 3000,
        ..crate::harness::workload(20_000, 500)
    };
    let w = s.spawn_workload(&opts, "workload.log")?;
    wait_for("commits", LONG, || {
        Ok(bdb::read_lsn_log(&lsns).map(|v| v.len()).unwrap_or(0) >= 3000)
    })?;
    Ok((w, lsns))
}

/// Stops a `--follow` archiver and checks it ended well, having extended
/// its backup at least once.
pub fn stop_extended_follower(follower: &mut Proc, timeout: Duration) -> Result<()> {
    let status = follower.stop(timeout)?;
    ensure!(status.success(), "{}", follower.log_text());
    ensure!(
        follower.log_text().contains("\"action\":\"extended\""),
        "{}",
        follower.log_text()
    );
    Ok(())
}
