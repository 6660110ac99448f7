//! Running `tandem-standby archive`, `verify-archive` and `restore` for the
//! archive tests (`archive.rs`: one backup taken, verified, restored;
//! `archive_follow.rs`: the continuous archive), and the pair they archive.

use crate::harness::bin;
use crate::harness::Pair;
use anyhow::{ensure, Context, Result};
use std::ffi::OsStr;
use std::path::Path;
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
