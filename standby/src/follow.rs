//! `tandem-standby run`: follow the primary until told to stop or refused.
//!
//! The work is a pipeline per connection (see [`session`]): a reader takes
//! messages off the network under a silence deadline, a bounded queue hands
//! them to the applier ([`applier`], one blocking task that owns the
//! [`Mirror`], applies, fsyncs and publishes what is durable), and an acker
//! sends back only what the applier published. On any failure the session
//! ends, the mirror comes back to this loop, and it reconnects and resumes
//! from what is durable. Only errors no retry can fix (another environment,
//! a newer epoch, a promoted directory) end the loop.
//!
//! Status has one channel (`tokio::sync::watch`) and each part of it one
//! writer: the reader the link (connected, last contact, the primary's end),
//! the applier the mirror (durable position, counters, base copy, rebase),
//! this loop the lifecycle (reconnects, last error), the status writer the
//! archive registration, the checker the last readiness check. The status
//! file, `/status` and `/metrics` read snapshots of it, with lag computed at
//! the moment they are read.
//!
//! Shutdown is one signal (`stop`): the session's reader stops, the applier
//! drains its queue and fsyncs, the status writer and the readiness checker
//! finish what they are doing and are joined, the final status is written,
//! and the directory lock is released last.

mod applier;
mod heal;
mod session;
mod session_error;

use crate::mirror::Mirror;
use crate::state::{DirLock, StandbyDir};
use crate::status::StandbyStatus;
use std::sync::Arc;
use std::time::Duration;
use tandem_shared::now_unix_ms;
use tandem_shared::tls::TlsFiles;
use tandem_shared::wire::{Hello, PROTOCOL_VERSION};
use tokio::sync::watch;

#[derive(Debug, Clone)]
pub struct StandbyConfig {
    pub dir: std::path::PathBuf,
    pub primary: String,
    pub server_name: Option<String>,
    pub tls: TlsFiles,
    pub name: String,
    pub metrics_listen: Option<std::net::SocketAddr>,
    /// How often to prove the mirror recovers (None: never).
    pub check_interval: Option<Duration>,
    /// Ask for a rebase when the log since the base passes this many bytes
    /// (0: never) ...
    pub rebase_after_bytes: u64,
    /// ... or when the base is older than this many seconds (0: never).
    pub rebase_after_secs: u64,
    /// Most log bytes kept for a continuous archive.
    pub archive_hold_cap_bytes: u64,
    /// Ask for a new base that replaces what the mirror holds (`run
    /// --start-over`).
    pub start_over: bool,
    /// Accept a directory whose log went beyond the primary's history and
    /// bring it up to date with a page-delta new base (`run --rejoin`).
    pub rejoin: bool,
    /// How often to scrub the mirror (None: never).
    pub scrub_interval: Option<Duration>,
    /// No message from the primary for this long ends the session ("no
    /// word from the primary"): the primary sends a heartbeat every
    /// `--heartbeat-ms` (500 ms by default), so this is many heartbeats.
    pub primary_silence: Duration,
    /// `--compression`: whether the Hello offers zstd.
    pub compression: tandem_shared::compress::Compression,
}

/// `run --check-interval-secs` by default.
pub const DEFAULT_CHECK_INTERVAL_SECS: u64 = 300;
/// `run --rebase-after-mib` by default.
pub const DEFAULT_REBASE_AFTER_MIB: u64 = 1024;

/// The silence deadline by default: ten of the primary's default heartbeats.
pub const DEFAULT_PRIMARY_SILENCE: Duration = Duration::from_secs(5);

/// Why `run` stopped for good.
#[derive(Debug, thiserror::Error)]
pub enum FollowError {
    /// The operator must act: another environment, a newer primary, or a
    /// promoted directory.
    #[error("{0}")]
    Refused(String),
    #[error(transparent)]
    Other(#[from] anyhow::Error),
}

const STATUS_EVERY: Duration = Duration::from_millis(200);

/// The live status; see the module doc for who writes which part.
pub(crate) type StatusTx = Arc<watch::Sender<StandbyStatus>>;

/// What status readers see: the live status with lag computed now.
fn snapshot(status: &watch::Receiver<StandbyStatus>) -> StandbyStatus {
    let mut s = status.borrow().clone();
    s.compute_lag(now_unix_ms(), s.primary_silence_ms);
    s
}

/// Follows the primary until `shutdown` resolves or a permanent error.
// Long function: the reconnect loop (session, how it ended, backoff, shutdown), whole so every
// way out is visible.
pub async fn run(
    cfg: StandbyConfig,
    shutdown: impl std::future::Future<Output = ()>,
) -> Result<(), FollowError> {
    let dir = StandbyDir::new(&cfg.dir);
    let adopt = refuse_foreign(&dir, cfg.rejoin)?;
    let lock: DirLock = dir
        .lock()
        .map_err(|e| FollowError::Refused(e.to_string()))?;
    // A promoted directory that has served as primary since rejoins like
    // an old primary's home (a switchback).
    let promoted = cfg.rejoin
        && dir
            .load_state()
            .is_ok_and(|s| s.promoted.is_some() && s.base.is_some());
    if adopt || promoted {
        tokio::task::block_in_place(|| crate::rejoin::adopt_old_primary(&dir))
            .map_err(FollowError::Refused)?;
    }
    let mut mirror = tokio::task::block_in_place(|| Mirror::open(dir.clone()))
        .map_err(|e| anyhow::anyhow!(e))?;
    mirror.archive_hold_cap = cfg.archive_hold_cap_bytes;
    mirror.start_over = cfg.start_over;
    mirror.rejoin = cfg.rejoin;
    mirror.accepts_zstd = cfg.compression == tandem_shared::compress::Compression::Auto;
    if let Some(p) = &mirror.state.promoted {
        return Err(FollowError::Refused(format!(
            "{} was promoted (epoch {}, {}); a promoted directory never follows a primary again",
            cfg.dir.display(),
            p.epoch,
            p.kind
        )));
    }
    let mut initial = StandbyStatus {
        running: true,
        pid: Some(std::process::id()),
        primary: Some(cfg.primary.clone()),
        durable_lsn: mirror.tail().durable,
        lg_max: mirror.tail().lg_max,
        primary_silence_ms: cfg.primary_silence.as_millis() as u64,
        last_check: crate::readiness::last_check(&dir),
        scrub: crate::scrub::last_report(&dir),
        rejoining: mirror.rejoin,
        discarded: crate::rejoin::reports(&dir),
        ..Default::default()
    };
    initial.fill_from_state(&mirror.state);
    let status: StatusTx = Arc::new(watch::Sender::new(initial));
    let (stop_tx, stop) = watch::channel(false);
    let timing = Arc::new(crate::timing::FollowTiming::default());

    let mut admin = None;
    if let Some(addr) = cfg.metrics_listen {
        let (for_metrics, for_status) = (status.subscribe(), status.subscribe());
        let etcd_dir = dir.clone();
        let timing = timing.clone();
        let pages = tandem_shared::metrics::AdminPages {
            metrics: Box::new(move || {
                crate::metrics::render(
                    &snapshot(&for_metrics),
                    crate::status::etcd::read_status(&etcd_dir).as_ref(),
                    &timing,
                )
            }),
            status_json: Box::new(move || {
                serde_json::to_string_pretty(&snapshot(&for_status)).unwrap_or_default()
            }),
        };
        let server = tandem_shared::metrics::serve(addr, pages)
            .await
            .map_err(anyhow::Error::from)?;
        tracing::info!(bound = %server.bound, "serving metrics");
        admin = Some(server);
    }
    let writer = tokio::spawn(write_status_forever(
        dir.clone(),
        status.clone(),
        stop.clone(),
    ));
    tandem_shared::sdnotify::ready();
    let checker = cfg.check_interval.map(|every| {
        tokio::spawn(check_forever(
            dir.clone(),
            status.clone(),
            every,
            stop.clone(),
        ))
    });
    let scrubber = cfg.scrub_interval.map(|every| {
        tokio::spawn(heal::scrub_forever(
            dir.clone(),
            status.clone(),
            every,
            stop.clone(),
        ))
    });

    let follower = {
        let (cfg, status, stop) = (cfg.clone(), status.clone(), stop.clone());
        tokio::spawn(async move { follow(cfg, mirror, status, stop, timing).await })
    };
    tokio::pin!(follower);
    tokio::pin!(shutdown);
    let joined = tokio::select! {
        _ = &mut shutdown => None,
        j = &mut follower => Some(j),
    };
    let _ = stop_tx.send(true);
    let joined = match joined {
        Some(j) => j,
        None => follower.await,
    };
    let (mut mirror, result) =
        joined.map_err(|e| anyhow::anyhow!("the follow task failed: {e}"))?;
    // Whatever was written is made durable before exiting.
    if let Err(e) = tokio::task::block_in_place(|| mirror.sync()) {
        tracing::error!(error = %e, "final fsync failed");
    }
    let _ = writer.await;
    for task in checker.into_iter().chain(scrubber) {
        let _ = task.await;
    }
    status.send_modify(|s| {
        s.running = false;
        s.connected = false;
        s.durable_lsn = mirror.tail().durable;
    });
    write_status(&dir, &status);
    if let Some(server) = admin {
        server.stop().await;
    }
    drop(mirror);
    drop(lock);
    result
}

/// What the mirror holds, for the primary to decide where to start.
fn hello(cfg: &StandbyConfig, mirror: &Mirror) -> Hello {
    let base = mirror.state.base.as_ref();
    Hello {
        protocol_version: PROTOCOL_VERSION,
        standby_name: cfg.name.clone(),
        env_id: mirror.state.env_id.clone().unwrap_or_default(),
        epoch: mirror.state.epoch,
        base_id: base.map(|b| b.base_id.clone()).unwrap_or_default(),
        complete_files: base
            .map(|b| b.complete_files.iter().cloned().collect())
            .unwrap_or_default(),
        base_files_done: base.is_some_and(|b| b.files_done),
        durable: Some(mirror.tail().durable.into()),
        last_record_digest: mirror.tail().last_record_digest.clone().into(),
        new_base_request: mirror.new_base_request(),
        rejoin: mirror.rejoin,
        accept_encodings: cfg.compression.offers(),
        page_checked_chunks: true,
        consistent_at: base
            .filter(|b| b.files_done)
            .and_then(|b| b.consistent_at)
            .map(Into::into),
    }
}

/// A directory with no standby state that holds anything (an environment,
/// most likely: an old primary's home, a restored backup) is never taken
/// over by a first base, which would write the primary's files over it.
/// Checked before the lock, so nothing in it changes. With `--rejoin`, an
/// old primary's home is taken over by a rejoin: `Ok(true)`.
fn refuse_foreign(dir: &StandbyDir, rejoin: bool) -> Result<bool, FollowError> {
    if dir.state_path().exists() {
        return Ok(false);
    }
    let Ok(entries) = std::fs::read_dir(&dir.root) else {
        return Ok(false); // missing: created empty by the lock
    };
    let mut names: Vec<String> = entries
        .flatten()
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .filter(|n| n != crate::state::META_DIR && n != "lost+found")
        .collect();
    if names.is_empty() {
        return Ok(false);
    }
    if rejoin && dir.root.join(crate::rejoin::OLD_PRIMARY_STATE).is_dir() {
        return Ok(true);
    }
    names.sort();
    let shown = names.iter().take(5).cloned().collect::<Vec<_>>().join(", ");
    let more = if names.len() > 5 { ", ..." } else { "" };
    let what = format!(
        "{} holds files ({shown}{more}) but no standby state: it is not a standby of any primary, and          Tandem never writes a base over files it did not put there. Nothing was changed.",
        dir.root.display()
    );
    Err(FollowError::Refused(if rejoin {
        format!(
            "{what} --rejoin takes over a standby directory whose log went beyond the primary's, or an old \
             primary's home (with its {} state directory); this is neither",
            crate::rejoin::OLD_PRIMARY_STATE
        )
    } else {
        format!(
            "{what} Point --dir at an empty directory, or at this primary's standby directory; for a \
             standby whose log went beyond the primary's, or an old primary's home, use --rejoin"
        )
    }))
}

/// Sessions one after another, until `stop` or a refusal.
async fn follow(
    cfg: StandbyConfig,
    mut mirror: Mirror,
    status: StatusTx,
    mut stop: watch::Receiver<bool>,
    timing: Arc<crate::timing::FollowTiming>,
) -> (Mirror, Result<(), FollowError>) {
    let mut backoff = Duration::from_millis(100);
    loop {
        let (back, outcome) = session::run(&cfg, mirror, &status, stop.clone(), &timing).await;
        mirror = back;
        status.send_modify(|s| s.connected = false);
        if *stop.borrow() {
            return (mirror, Ok(()));
        }
        match outcome {
            Ok(()) => tracing::info!("primary closed the stream; reconnecting"),
            Err(session_error::SessionError::Refused(why)) => {
                status.send_modify(|s| s.last_error = Some(format!("refused: {why}")));
                return (mirror, Err(FollowError::Refused(why)));
            }
            Err(session_error::SessionError::Retry { why, immediately }) => {
                status.send_modify(|s| s.last_error = Some(why.clone()));
                if immediately {
                    backoff = Duration::from_millis(100);
                }
                tracing::warn!(error = %why, retry_in_ms = backoff.as_millis() as u64, "stream interrupted");
            }
        }
        status.send_modify(|s| s.reconnects += 1);
        tokio::select! {
            _ = stop.wait_for(|s| *s) => return (mirror, Ok(())),
            _ = tokio::time::sleep(backoff) => {}
        }
        backoff = (backoff * 2).min(Duration::from_secs(5));
    }
}

async fn write_status_forever(dir: StandbyDir, status: StatusTx, mut stop: watch::Receiver<bool>) {
    let mut tick = tokio::time::interval(STATUS_EVERY);
    loop {
        tokio::select! {
            _ = tick.tick() => {}
            _ = stop.wait_for(|s| *s) => return,
        }
        let d = dir.clone();
        // File reads, off the runtime's threads.
        let Ok((archive, drill)) = tokio::task::spawn_blocking(move || {
            (
                crate::archive_hold::observe(&d),
                crate::archive::drill::last_report(&d),
            )
        })
        .await
        else {
            continue;
        };
        status.send_if_modified(|s| {
            let before = (s.archive.clone(), s.archived_lsn, s.archive_held_log_bytes);
            s.set_archive(archive);
            let drill_moved = s.archive_drill != drill;
            s.archive_drill = drill;
            drill_moved || before != (s.archive.clone(), s.archived_lsn, s.archive_held_log_bytes)
        });
        let d = dir.clone();
        let s = status.clone();
        let _ = tokio::task::spawn_blocking(move || write_status(&d, &s)).await;
    }
}

/// Informational, so written atomically but without fsync.
fn write_status(dir: &StandbyDir, status: &StatusTx) {
    let mut s = snapshot(&status.subscribe());
    s.updated_unix_ms = now_unix_ms();
    let Ok(bytes) = serde_json::to_vec_pretty(&s) else {
        return;
    };
    let tmp = dir.meta().join("status.json.tmp");
    if std::fs::write(&tmp, bytes).is_ok() {
        let _ = std::fs::rename(&tmp, dir.status_path());
    }
}

/// Readiness checks on a timer, once the mirror is recoverable. A failure
/// is logged, shown in status and metrics, and streaming goes on. A check
/// under way when `stop` comes is finished, not abandoned: the directory
/// lock is released only after it.
async fn check_forever(
    dir: StandbyDir,
    status: StatusTx,
    every: Duration,
    mut stop: watch::Receiver<bool>,
) {
    let mut tick = tokio::time::interval(every);
    tick.tick().await;
    loop {
        tokio::select! {
            _ = tick.tick() => {}
            _ = stop.wait_for(|s| *s) => return,
        }
        if !status.borrow().recoverable {
            continue;
        }
        let d = dir.clone();
        if let Ok(report) =
            tokio::task::spawn_blocking(move || crate::readiness::run_check(&d)).await
        {
            status.send_modify(|s| {
                s.recoverable &= report.ok;
                s.last_check = Some(report);
            });
        }
    }
}

/// Where this directory follows from, so `promote` can catch up even when
/// no `run` is running.
#[derive(serde::Serialize, serde::Deserialize)]
pub struct FollowConfig {
    pub primary: String,
    pub server_name: Option<String>,
    pub tls: TlsFiles,
    pub name: String,
}

pub const FOLLOW_CONFIG_FILE: &str = "follow.json";

fn remember_follow_config(dir: &StandbyDir, cfg: &StandbyConfig) {
    let fc = FollowConfig {
        primary: cfg.primary.clone(),
        server_name: cfg.server_name.clone(),
        tls: cfg.tls.clone(),
        name: cfg.name.clone(),
    };
    if let Ok(bytes) = serde_json::to_vec_pretty(&fc) {
        if let Err(e) =
            tandem_shared::durable::write_file_atomic(&dir.meta().join(FOLLOW_CONFIG_FILE), &bytes)
        {
            tracing::warn!(error = %e, "cannot record the follow configuration");
        }
    }
}
