//! Promotion: turn the mirror into an environment applications open.
//!
//! 1. If a standby runs on the directory and is connected, wait until it
//!    holds everything the primary has (a switchover); if it is not
//!    connected, use what is durable (a failover). Then stop it.
//! 2. Take the directory for good (a promoted directory refuses `run`).
//! 3. Catastrophic recovery in place, then `db_verify` of every database.
//! 4. Record the promotion durably with a new epoch (the fencing token).

use crate::mirror::{is_recoverable, scan_tail};
use crate::state::{Promotion, StandbyDir};
use crate::status::StandbyStatus;
use anyhow::{bail, Context, Result};
use serde::Serialize;
use std::fs::File;
use std::os::fd::AsRawFd;
use std::time::{Duration, Instant};
use tandem_shared::bdb::BdbTools;
use tandem_shared::envlayout::DB_CONFIG;
use tandem_shared::LogPosition;

#[derive(Debug, Clone, Serialize)]
pub struct PromoteReport {
    pub env: String,
    pub kind: String,
    pub epoch: u64,
    pub recovered_to: Option<LogPosition>,
    pub durable_lsn: LogPosition,
    pub primary_end_lsn: LogPosition,
    pub recovery_seconds: f64,
    pub total_seconds: f64,
    pub already_promoted: bool,
    pub databases_verified: usize,
}

/// How long a switchover waits for the standby to catch up.
pub struct PromoteOptions {
    pub catch_up_timeout: Duration,
}

pub fn promote(dir: &StandbyDir, opts: &PromoteOptions) -> Result<PromoteReport> {
    let started = Instant::now();
    if !dir.meta().exists() {
        bail!(
            "{} is not a Tandem standby directory (no .tandem inside)",
            dir.root.display()
        );
    }
    // Only one promote at a time, for the whole procedure.
    let guard = File::options()
        .create(true)
        .truncate(false)
        .write(true)
        .open(dir.meta().join("promote.lock"))
        .context("opening the promote lock")?;
    // SAFETY: flock on an fd we own.
    if unsafe { libc::flock(guard.as_raw_fd(), libc::LOCK_EX | libc::LOCK_NB) } != 0 {
        bail!(
            "another promote is already running on {}",
            dir.root.display()
        );
    }

    let state = dir.load_state()?;
    if let Some(p) = &state.promoted {
        return Ok(PromoteReport {
            env: dir.root.display().to_string(),
            kind: p.kind.clone(),
            epoch: p.epoch,
            recovered_to: p.recovered_to,
            durable_lsn: p.recovered_to.unwrap_or_default(),
            primary_end_lsn: LogPosition::ZERO,
            recovery_seconds: 0.0,
            total_seconds: started.elapsed().as_secs_f64(),
            already_promoted: true,
            databases_verified: 0,
        });
    }

    let (kind, primary_end) = stop_follower(dir, opts)?;
    let _lock = dir.lock().context("taking the standby directory")?;
    let mut state = dir.load_state()?;
    let tail = scan_tail(dir, &state)?;
    if !is_recoverable(&state, tail.durable) {
        bail!(
            "the standby is not recoverable yet: {}; nothing was changed",
            match &state.base {
                None => "it holds no base".to_owned(),
                Some(b) if !b.files_done => "its base copy is incomplete".to_owned(),
                Some(b) => format!(
                    "its log ends at {} but the base needs it up to {}",
                    tail.durable,
                    b.consistent_at.unwrap_or_default()
                ),
            }
        );
    }
    tracing::info!(%kind, durable = %tail.durable, "running catastrophic recovery");
    let tools = BdbTools::default();
    let report = tools.recover_catastrophic(&dir.root).context(
        "catastrophic recovery failed; the directory is left as it was after recovery ran",
    )?;
    let databases: Vec<String> = state
        .base
        .as_ref()
        .map(|b| {
            b.complete_files
                .iter()
                .filter(|n| *n != DB_CONFIG)
                .cloned()
                .collect()
        })
        .unwrap_or_default();
    for db in &databases {
        tools
            .verify(&dir.root, db)
            .with_context(|| format!("db_verify of {db} failed after recovery"))?;
    }
    let epoch = state.epoch + 1;
    state.epoch = epoch;
    state.promoted = Some(Promotion {
        epoch,
        unix_ms: tandem_shared::now_unix_ms(),
        kind: kind.clone(),
        recovered_to: report.recovered_to,
    });
    dir.store_state(&state)?;
    tracing::info!(%kind, epoch, recovered_to = ?report.recovered_to, "promoted");
    Ok(PromoteReport {
        env: dir.root.display().to_string(),
        kind,
        epoch,
        recovered_to: report.recovered_to,
        durable_lsn: tail.durable,
        primary_end_lsn: primary_end,
        recovery_seconds: report.duration.as_secs_f64(),
        total_seconds: started.elapsed().as_secs_f64(),
        already_promoted: false,
        databases_verified: databases.len(),
    })
}

/// Waits for a running, connected standby to catch up, then stops it.
/// When none runs but the directory knows its primary, one is started just
/// for the catch-up. Returns "switchover" when the standby held everything
/// the primary had, otherwise "failover".
fn stop_follower(dir: &StandbyDir, opts: &PromoteOptions) -> Result<(String, LogPosition)> {
    let since = tandem_shared::now_unix_ms();
    let mut child = None;
    let pid = match dir.lock_holder() {
        Some(pid) => pid,
        None => match spawn_catch_up(dir)? {
            Some(c) => {
                let pid = c.id();
                child = Some(c);
                pid
            }
            None => {
                tracing::warn!("no standby runs on this directory and no primary is recorded: promoting with what is durable (failover)");
                let end = crate::status::read(dir)
                    .map(|s| s.primary_end_lsn)
                    .unwrap_or_default();
                return Ok(("failover".into(), end));
            }
        },
    };
    let deadline = Instant::now() + opts.catch_up_timeout;
    let mut kind = "failover".to_owned();
    let mut end = LogPosition::ZERO;
    // Caught up = nothing left to fetch, and the primary's end has not
    // moved for over a second (the application on it has stopped).
    let mut stable_since: Option<(LogPosition, Instant)> = None;
    while Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(100));
        let s: StandbyStatus = crate::status::read(dir)?;
        // Only a status written by that process since promote began counts.
        if s.pid != Some(pid) || s.updated_unix_ms < since {
            continue;
        }
        end = s.primary_end_lsn;
        if !s.connected {
            if child.is_none() || s.last_error.is_some() {
                tracing::warn!(error = s.last_error.as_deref().unwrap_or("-"), "the standby is not connected to its primary: promoting with what is durable (failover)");
                break;
            }
            continue;
        }
        if s.lag_bytes == Some(0) && s.durable_lsn >= s.primary_end_lsn {
            match stable_since {
                Some((at, since))
                    if at == s.primary_end_lsn
                        && since.elapsed() >= Duration::from_millis(1200) =>
                {
                    kind = "switchover".into();
                    break;
                }
                Some((at, _)) if at == s.primary_end_lsn => {}
                _ => stable_since = Some((s.primary_end_lsn, Instant::now())),
            }
        } else {
            stable_since = None;
        }
    }
    if kind != "switchover" && Instant::now() >= deadline {
        tracing::warn!("the standby did not catch up within the timeout: promoting with what is durable (failover)");
    }
    // SAFETY: sending SIGTERM to the pid that holds our directory's lock.
    unsafe { libc::kill(pid as i32, libc::SIGTERM) };
    let stop_deadline = Instant::now() + Duration::from_secs(30);
    while dir.lock_holder().is_some() {
        if Instant::now() > stop_deadline {
            bail!("the running standby (pid {pid}) did not stop within 30 s");
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    if let Some(mut c) = child {
        let _ = c.wait();
    }
    Ok((kind, end))
}

/// Starts `tandem-standby run` with the configuration the directory last
/// followed with, to fetch what the primary still has.
fn spawn_catch_up(dir: &StandbyDir) -> Result<Option<std::process::Child>> {
    let Ok(bytes) = std::fs::read(dir.meta().join(crate::follow::FOLLOW_CONFIG_FILE)) else {
        return Ok(None);
    };
    let fc: crate::follow::FollowConfig =
        serde_json::from_slice(&bytes).context("reading .tandem/follow.json")?;
    let log = File::create(dir.meta().join("promote-catch-up.log"))?;
    let mut cmd = std::process::Command::new(std::env::current_exe()?);
    cmd.arg("run").arg("--dir").arg(&dir.root).args([
        "--primary",
        &fc.primary,
        "--name",
        &fc.name,
        "--check-interval-secs",
        "0",
    ]);
    cmd.arg("--cert")
        .arg(&fc.tls.cert)
        .arg("--key")
        .arg(&fc.tls.key)
        .arg("--ca")
        .arg(&fc.tls.ca);
    if let Some(n) = &fc.server_name {
        cmd.args(["--server-name", n]);
    }
    tracing::info!(primary = %fc.primary, "no standby runs on this directory: starting one to fetch what the primary still has");
    let child = cmd
        .stdin(std::process::Stdio::null())
        .stdout(log.try_clone()?)
        .stderr(log)
        .spawn()
        .context("starting the catch-up standby")?;
    let deadline = Instant::now() + Duration::from_secs(10);
    while dir.lock_holder() != Some(child.id()) {
        if Instant::now() > deadline {
            bail!(
                "the catch-up standby did not start; see {}",
                dir.meta().join("promote-catch-up.log").display()
            );
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    Ok(Some(child))
}
