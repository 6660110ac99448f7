//! The standby's connection loop: dial the primary, say what the mirror
//! holds, apply what arrives, fsync, acknowledge; on any failure, reconnect
//! and resume from what is durable. Only errors no retry can fix (another
//! environment, a newer epoch, a promoted directory) end the loop.

use crate::mirror::{ApplyError, Mirror};
use crate::state::{DirLock, StandbyDir};
use crate::status::StandbyStatus;
use std::sync::{Arc, Mutex};
use std::time::Duration;
use tandem_shared::tls::TlsFiles;
use tandem_shared::wire::{
    primary_message::Kind, standby_message, Ack, Hello, RebaseRequest, StandbyMessage,
    PROTOCOL_VERSION,
};
use tandem_shared::{now_unix_ms, LogPosition};
use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;

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
}

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

/// Flush and acknowledge at least this often while data streams in.
const SYNC_EVERY_BYTES: u64 = 8 << 20;
const STATUS_EVERY: Duration = Duration::from_millis(200);

type Live = Arc<Mutex<StandbyStatus>>;

fn update(live: &Live, f: impl FnOnce(&mut StandbyStatus)) {
    if let Ok(mut s) = live.lock() {
        f(&mut s);
    }
}

/// Follows the primary until `shutdown` resolves or a permanent error.
pub async fn run(
    cfg: StandbyConfig,
    shutdown: impl std::future::Future<Output = ()>,
) -> Result<(), FollowError> {
    let dir = StandbyDir::new(&cfg.dir);
    let lock: DirLock = dir
        .lock()
        .map_err(|e| FollowError::Refused(e.to_string()))?;
    let mut mirror = tokio::task::block_in_place(|| Mirror::open(dir.clone()))
        .map_err(|e| anyhow::anyhow!(e))?;
    mirror.archive_hold_cap = cfg.archive_hold_cap_bytes;
    if let Some(p) = &mirror.state.promoted {
        return Err(FollowError::Refused(format!(
            "{} was promoted (epoch {}, {}); a promoted directory never follows a primary again",
            cfg.dir.display(),
            p.epoch,
            p.kind
        )));
    }
    let live: Live = Arc::new(Mutex::new(StandbyStatus {
        running: true,
        pid: Some(std::process::id()),
        primary: Some(cfg.primary.clone()),
        durable_lsn: mirror.tail.durable,
        ..Default::default()
    }));
    update(&live, |s| {
        s.lg_max = mirror.tail.lg_max;
        s.last_check = crate::readiness::last_check(&dir);
        s.fill_from_state(&mirror.state);
    });
    let writer = tokio::spawn(write_status_forever(dir.clone(), live.clone()));
    if let Some(addr) = cfg.metrics_listen {
        let (for_metrics, for_status) = (live.clone(), live.clone());
        let pages = tandem_shared::metrics::AdminPages {
            metrics: Box::new(move || crate::metrics::render(&for_metrics)),
            status_json: Box::new(move || {
                for_status
                    .lock()
                    .ok()
                    .and_then(|s| serde_json::to_string_pretty(&*s).ok())
                    .unwrap_or_default()
            }),
        };
        let bound = tandem_shared::metrics::serve(addr, pages)
            .await
            .map_err(anyhow::Error::from)?;
        tracing::info!(%bound, "serving metrics");
    }

    tandem_shared::sdnotify::ready();
    let checker = cfg
        .check_interval
        .map(|every| tokio::spawn(check_forever(dir.clone(), live.clone(), every)));
    tokio::pin!(shutdown);
    let mut backoff = Duration::from_millis(100);
    let result = loop {
        let outcome = tokio::select! {
            _ = &mut shutdown => break Ok(()),
            r = session(&cfg, &mut mirror, &live) => r,
        };
        update(&live, |s| s.connected = false);
        match outcome {
            Ok(()) => tracing::info!("primary closed the stream; reconnecting"),
            Err(SessionError::Refused(why)) => break Err(FollowError::Refused(why)),
            Err(SessionError::Retry { why, immediately }) => {
                update(&live, |s| s.last_error = Some(why.clone()));
                if immediately {
                    backoff = Duration::from_millis(100);
                }
                tracing::warn!(error = %why, retry_in_ms = backoff.as_millis() as u64, "stream interrupted");
            }
        }
        update(&live, |s| s.reconnects += 1);
        tokio::select! {
            _ = &mut shutdown => break Ok(()),
            _ = tokio::time::sleep(backoff) => {}
        }
        backoff = (backoff * 2).min(Duration::from_secs(5));
    };
    // Whatever was written is made durable before exiting.
    let _ = tokio::task::block_in_place(|| mirror.sync());
    update(&live, |s| {
        s.running = false;
        s.connected = false;
        s.durable_lsn = mirror.tail.durable;
    });
    writer.abort();
    if let Some(c) = checker {
        c.abort();
    }
    write_status(&dir, &live);
    drop(lock);
    result
}

enum SessionError {
    Refused(String),
    Retry { why: String, immediately: bool },
}

fn retry(why: impl ToString) -> SessionError {
    SessionError::Retry {
        why: why.to_string(),
        immediately: false,
    }
}

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
        durable: Some(mirror.tail.durable.into()),
        last_record_digest: mirror.tail.last_record_digest.clone().into(),
        new_base_request: String::new(),
    }
}

/// One connection, until it ends.
async fn session(
    cfg: &StandbyConfig,
    mirror: &mut Mirror,
    live: &Live,
) -> Result<(), SessionError> {
    let mut client = tandem_shared::client::connect(
        &cfg.primary,
        cfg.server_name.as_deref(),
        &cfg.tls,
        Duration::from_secs(5),
    )
    .await
    .map_err(retry)?;
    mirror.begin_session();
    let (tx, rx) = mpsc::channel::<StandbyMessage>(64);
    let _ = tx.try_send(StandbyMessage {
        kind: Some(standby_message::Kind::Hello(hello(cfg, mirror))),
    });
    let mut inbound = match client.stream(ReceiverStream::new(rx)).await {
        Ok(r) => r.into_inner(),
        Err(status) => return Err(classify(status)),
    };
    tracing::info!(primary = %cfg.primary, durable = %mirror.tail.durable, "connected to the primary");
    let mut rebase_asked: Option<std::time::Instant> = None;
    // Sent once per session at least: the primary remembers the last one.
    let mut archived_sent: Option<Option<LogPosition>> = None;
    update(live, |s| {
        s.connected = true;
        s.last_contact_unix_ms = now_unix_ms();
    });
    loop {
        let first = match inbound.message().await {
            Ok(Some(m)) => m,
            Ok(None) => return Ok(()),
            Err(status) => return Err(classify(status)),
        };
        // Apply everything that is already here, then fsync once: one
        // fsync per batch, not per chunk.
        let mut batch = vec![first];
        let mut pending: u64 = 0;
        loop {
            let mut end_of_batch = false;
            for m in batch.drain(..) {
                let Some(kind) = m.kind else { continue };
                note_message(live, &kind);
                let welcome = matches!(kind, Kind::Welcome(_));
                let applied = tokio::task::block_in_place(|| mirror.apply(kind));
                match applied {
                    Ok(a) => {
                        if welcome {
                            remember_follow_config(&mirror.dir, cfg);
                        }
                        pending += a.log_bytes;
                        update(live, |s| {
                            s.log_bytes_received += a.log_bytes;
                            s.file_bytes_received += a.file_bytes;
                        });
                    }
                    Err(e) => return Err(rejected(e, live, mirror)),
                }
            }
            if pending >= SYNC_EVERY_BYTES {
                end_of_batch = true;
            } else {
                match tokio::time::timeout(Duration::ZERO, inbound.message()).await {
                    Ok(Ok(Some(m))) => batch.push(m),
                    Ok(Ok(None)) => end_of_batch = true,
                    Ok(Err(status)) => return Err(classify(status)),
                    Err(_) => end_of_batch = true,
                }
            }
            if end_of_batch {
                break;
            }
        }
        let durable =
            tokio::task::block_in_place(|| mirror.sync()).map_err(|e| rejected(e, live, mirror))?;
        // The status writer re-reads the archive's registration; the loop
        // wakes at least on every heartbeat, so a moving archive is
        // reported while the log is idle too.
        let archived = live.lock().ok().and_then(|s| s.archived_lsn);
        // Not before the standby holds any log: an Ack of position zero
        // would tell the primary's retention to keep every file.
        if pending > 0 || (archived_sent != Some(archived) && durable > LogPosition::ZERO) {
            let ack = Ack {
                durable: Some(durable.into()),
                archived: archived.map(Into::into),
            };
            if tx
                .try_send(StandbyMessage {
                    kind: Some(standby_message::Kind::Ack(ack)),
                })
                .is_ok()
            {
                archived_sent = Some(archived);
            }
        }
        if let Some(report) = tokio::task::block_in_place(|| mirror.finish_rebase())
            .map_err(|e| rejected(e, live, mirror))?
        {
            update(live, |s| {
                s.rebases += 1;
                s.last_rebase = Some(report);
            });
            rebase_asked = None;
        }
        let retry_due =
            rebase_asked.is_none_or(|at: std::time::Instant| at.elapsed() > REBASE_RETRY);
        if retry_due
            && mirror.rebase.is_none()
            && mirror.rebase_due(cfg.rebase_after_bytes, cfg.rebase_after_secs)
        {
            rebase_asked = Some(std::time::Instant::now());
            request_rebase(mirror, &tx)
                .await
                .map_err(|e| rejected(e, live, mirror))?;
        }
        update(live, |s| {
            s.durable_lsn = durable;
            s.last_contact_unix_ms = now_unix_ms();
            s.compute_lag();
            s.fill_from_state(&mirror.state);
        });
    }
}

/// A rebase request not answered by then is asked again.
const REBASE_RETRY: Duration = Duration::from_secs(120);

/// Sends the page digests of the mirror's files, then the request.
async fn request_rebase(
    mirror: &Mirror,
    tx: &mpsc::Sender<StandbyMessage>,
) -> Result<(), ApplyError> {
    let base = mirror
        .state
        .base
        .as_ref()
        .map(|b| b.base_id.clone())
        .unwrap_or_default();
    let log_start = mirror
        .state
        .base
        .as_ref()
        .map(|b| b.log_start)
        .unwrap_or_default();
    let digests = tokio::task::block_in_place(|| mirror.page_digests())?;
    tracing::info!(base = %base, durable = %mirror.tail.durable, "the log since the base passed the threshold: asking for a rebase");
    for d in digests {
        if tx
            .send(StandbyMessage {
                kind: Some(standby_message::Kind::PageDigests(d)),
            })
            .await
            .is_err()
        {
            return Ok(());
        }
    }
    let _ = tx
        .send(StandbyMessage {
            kind: Some(standby_message::Kind::RebaseRequest(RebaseRequest {
                base_id: base,
                log_start: Some(log_start.into()),
            })),
        })
        .await;
    Ok(())
}

/// What a message tells about the primary and the base copy's progress.
fn note_message(live: &Live, kind: &Kind) {
    match kind {
        Kind::Heartbeat(h) => update(live, |s| {
            s.primary_end_lsn = s
                .primary_end_lsn
                .max(h.primary_end.unwrap_or_default().into());
            s.last_contact_unix_ms = now_unix_ms();
            s.compute_lag();
        }),
        Kind::BaseStart(_) => update(live, |s| {
            s.base_copy_active = true;
            s.base_copy_done_bytes = 0;
            s.base_copy_total_bytes = 0;
            s.base_copy_started_unix_ms = now_unix_ms();
        }),
        Kind::FileStart(f) if f.base_bytes_left > 0 => update(live, |s| {
            // A copy resumed by a new process has no BaseStart: it starts here.
            if !s.base_copy_active {
                s.base_copy_active = true;
                s.base_copy_done_bytes = 0;
                s.base_copy_started_unix_ms = now_unix_ms();
            }
            s.base_copy_total_bytes = s.base_copy_done_bytes + f.base_bytes_left;
        }),
        Kind::FileChunk(c) => update(live, |s| s.note_base_copy_bytes(c.data.len() as u64)),
        Kind::FileSame(f) => update(live, |s| s.note_base_copy_bytes(f.len)),
        Kind::BaseFilesDone(_) => update(live, |s| {
            s.base_copy_active = false;
            s.base_copy_done_bytes = s.base_copy_total_bytes;
        }),
        Kind::LogChunk(c) => update(live, |s| {
            s.lg_max = (c.file_size as u32).saturating_add(1);
            let end = LogPosition::new(c.file, c.offset + c.data.len() as u32);
            if end > s.primary_end_lsn {
                s.primary_end_lsn = end;
            }
            s.compute_lag();
        }),
        _ => {}
    }
}

fn rejected(e: ApplyError, live: &Live, mirror: &Mirror) -> SessionError {
    update(live, |s| {
        s.rejected_messages += 1;
        if matches!(e, ApplyError::Digest { .. }) {
            s.digest_failures += 1;
        }
        s.fill_from_state(&mirror.state);
    });
    if e.is_permanent() {
        tracing::error!(error = %e, "refusing the primary's data");
        return SessionError::Refused(e.to_string());
    }
    tracing::error!(error = %e, "rejected a message from the primary; nothing after the last acknowledged position was kept, re-requesting");
    // A corrupted chunk is worth an immediate retry; anything else may be
    // persistent, so back off.
    let immediately = matches!(e, ApplyError::Digest { .. });
    SessionError::Retry {
        why: e.to_string(),
        immediately,
    }
}

fn classify(status: tonic::Status) -> SessionError {
    // The status message alone can be "transport error"; its causes say why.
    let msg = tandem_shared::client::chain(&status);
    match status.code() {
        tonic::Code::FailedPrecondition => {
            SessionError::Refused(format!("the primary refused this standby: {msg}"))
        }
        tonic::Code::DataLoss => SessionError::Retry {
            why: format!("the primary reported lost log: {msg}"),
            immediately: true,
        },
        _ => retry(format!("{}: {msg}", status.code())),
    }
}

async fn write_status_forever(dir: StandbyDir, live: Live) {
    let mut tick = tokio::time::interval(STATUS_EVERY);
    loop {
        tick.tick().await;
        write_status(&dir, &live);
    }
}

/// Informational, so written atomically but without fsync.
fn write_status(dir: &StandbyDir, live: &Live) {
    // File reads outside the lock the session takes for every message.
    let archive = crate::archive_hold::observe(dir);
    let Ok(mut s) = live.lock().map(|mut s| {
        s.set_archive(archive);
        s.clone()
    }) else {
        return;
    };
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
/// is logged, shown in status and metrics, and streaming goes on.
async fn check_forever(dir: StandbyDir, live: Live, every: Duration) {
    let mut tick = tokio::time::interval(every);
    tick.tick().await;
    loop {
        tick.tick().await;
        let recoverable = live.lock().map(|s| s.recoverable).unwrap_or(false);
        if !recoverable {
            continue;
        }
        let d = dir.clone();
        if let Ok(report) =
            tokio::task::spawn_blocking(move || crate::readiness::run_check(&d)).await
        {
            update(&live, |s| s.last_check = Some(report));
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
