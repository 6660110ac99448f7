//! The primary's gRPC service: accepts standbys over mutual TLS and runs a
//! session for each; answers status requests.

use crate::identity::{PrimaryIdentity, PrimaryState};
use crate::log_watch::{self, LogEnd};
use crate::session;
use anyhow::{Context, Result};
use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;
use tandem_shared::bdb::BdbTools;
use tandem_shared::envlayout::EnvLayout;
use tandem_shared::tls::TlsFiles;
use tandem_shared::wire::replication_server::{Replication, ReplicationServer};
use tandem_shared::wire::{
    PrimaryMessage, PrimaryStatus, StandbyInfo, StandbyMessage, StatusRequest, SwitchoverReply,
    SwitchoverRequest,
};
use tandem_shared::{LogPosition, MAX_MESSAGE_BYTES};
use tokio::sync::{mpsc, watch};
use tokio_stream::wrappers::ReceiverStream;
use tonic::{Request, Response, Status, Streaming};

/// Everything `tandem-primary run` needs, after flags and config file are
/// merged.
#[derive(Debug, Clone)]
pub struct PrimaryConfig {
    pub env: PathBuf,
    pub listen: SocketAddr,
    pub tls: TlsFiles,
    pub state_dir: PathBuf,
    pub poll_interval: Duration,
    pub heartbeat_interval: Duration,
    pub rescan_interval: Duration,
    pub metrics_listen: Option<SocketAddr>,
    /// Test-only: corrupt the digest of the Nth chunk sent.
    pub corrupt_chunk: Option<u64>,
    /// Remove shipped, inactive log files from the environment (off: None).
    pub retention: Option<crate::retention::RetentionConfig>,
}

#[derive(Debug, Default)]
pub struct Counters {
    pub file_bytes: AtomicU64,
    pub log_bytes: AtomicU64,
    pub chunks: AtomicU64,
    pub sessions: AtomicU64,
}

/// What the primary knows of a standby. Kept in the state directory so a
/// restarted primary still holds back the logs an offline standby needs,
/// like a replication slot.
#[derive(Debug, Clone, Default, serde::Serialize, serde::Deserialize)]
pub struct StandbyRecord {
    pub peer: String,
    #[serde(skip)]
    pub connected: bool,
    pub base_id: String,
    pub acked: LogPosition,
    pub last_contact_unix_ms: u64,
    /// Dropped for holding back more log than the cap allows: its logs are
    /// no longer kept, and it will need a new base.
    #[serde(default)]
    pub dropped: bool,
    /// End of the log archived by the standby's continuous archive; `None`
    /// when it has none registered.
    #[serde(default)]
    pub archived: Option<LogPosition>,
    /// The archive fell behind by more than the cap: files below this were
    /// removed without waiting for it (0: never).
    #[serde(default)]
    pub archive_released_below: u32,
    /// Log bytes kept only for this standby.
    #[serde(skip)]
    pub held_back_bytes: u64,
    /// Of those, bytes kept only because its archive lacks them.
    #[serde(skip)]
    pub held_for_archive_bytes: u64,
}

impl StandbyRecord {
    /// First log file this standby still needs on the primary: the one its
    /// acknowledged position is in, or an earlier one its archive lacks.
    pub fn needs_from(&self) -> u32 {
        match self.archived {
            Some(a) => self.acked.file.min(a.file.max(self.archive_released_below)),
            None => self.acked.file,
        }
    }
}

/// State shared by every session of one primary.
pub struct Shared {
    pub layout: EnvLayout,
    pub identity: PrimaryIdentity,
    pub log_end: watch::Receiver<LogEnd>,
    pub tools: BdbTools,
    pub heartbeat_interval: Duration,
    pub rescan_interval: Duration,
    pub corrupt_chunk: Option<u64>,
    pub counters: Counters,
    pub standbys: Mutex<BTreeMap<String, StandbyRecord>>,
    /// Turns true when the primary shuts down: sessions end their streams,
    /// so the server's graceful shutdown does not wait on them forever.
    pub stopping: watch::Receiver<bool>,
}

impl Shared {
    fn with_standby(&self, name: &str, f: impl FnOnce(&mut StandbyRecord)) {
        if let Ok(mut map) = self.standbys.lock() {
            f(map.entry(name.to_owned()).or_default());
        }
    }

    pub fn standby_connected(&self, name: &str, peer: &str, base_id: &str, from: LogPosition) {
        self.counters.sessions.fetch_add(1, Ordering::Relaxed);
        self.with_standby(name, |r| {
            r.peer = peer.to_owned();
            r.connected = true;
            r.base_id = base_id.to_owned();
            r.acked = from;
            r.dropped = false;
            r.last_contact_unix_ms = tandem_shared::now_unix_ms();
        });
    }

    pub fn standby_acked(&self, name: &str, at: LogPosition, archived: Option<LogPosition>) {
        self.with_standby(name, |r| {
            r.acked = at;
            r.archived = archived;
            r.last_contact_unix_ms = tandem_shared::now_unix_ms();
        });
    }

    pub fn standby_disconnected(&self, name: &str) {
        self.with_standby(name, |r| r.connected = false);
    }

    pub fn status(&self) -> PrimaryStatus {
        let end = *self.log_end.borrow();
        let standbys = self
            .standbys
            .lock()
            .map(|m| {
                m.iter()
                    .map(|(name, r)| StandbyInfo {
                        name: name.clone(),
                        peer: r.peer.clone(),
                        connected: r.connected,
                        acked: Some(r.acked.into()),
                        lag_bytes: r.acked.bytes_until(end.end, end.lg_max),
                        last_contact_unix_ms: r.last_contact_unix_ms,
                        base_id: r.base_id.clone(),
                        held_back_bytes: r.held_back_bytes,
                        dropped: r.dropped,
                        archived: r.archived.map(Into::into),
                        held_for_archive_bytes: r.held_for_archive_bytes,
                        archive_released_below: r.archive_released_below,
                    })
                    .collect()
            })
            .unwrap_or_default();
        PrimaryStatus {
            env_id: self.identity.env_id.clone(),
            epoch: self.identity.epoch,
            end: Some(end.end.into()),
            standbys,
        }
    }
}

struct Service {
    shared: Arc<Shared>,
}

#[tonic::async_trait]
impl Replication for Service {
    type StreamStream = ReceiverStream<Result<PrimaryMessage, Status>>;

    async fn stream(
        &self,
        request: Request<Streaming<StandbyMessage>>,
    ) -> Result<Response<Self::StreamStream>, Status> {
        let peer = request
            .remote_addr()
            .map(|a| a.to_string())
            .unwrap_or_else(|| "unknown".into());
        let (tx, rx) = mpsc::channel(16);
        tokio::spawn(session::run(
            self.shared.clone(),
            peer,
            request.into_inner(),
            tx,
        ));
        Ok(Response::new(ReceiverStream::new(rx)))
    }

    async fn status(
        &self,
        _request: Request<StatusRequest>,
    ) -> Result<Response<PrimaryStatus>, Status> {
        Ok(Response::new(self.shared.status()))
    }

    async fn prepare_switchover(
        &self,
        _request: Request<SwitchoverRequest>,
    ) -> Result<Response<SwitchoverReply>, Status> {
        Err(Status::unimplemented("not yet"))
    }
}

/// Runs the primary until `shutdown` resolves. `on_bound` learns the
/// listening address (useful with port 0).
pub async fn serve(
    cfg: PrimaryConfig,
    shutdown: impl std::future::Future<Output = ()> + Send,
    on_bound: impl FnOnce(SocketAddr),
) -> Result<()> {
    let layout = EnvLayout::open(&cfg.env)
        .with_context(|| format!("opening environment {}", cfg.env.display()))?;
    let state = PrimaryState::open(&cfg.state_dir, promoted_epoch(&cfg.env))?;
    let tls = cfg.tls.server_config().context("loading TLS files")?;
    let log_end = log_watch::spawn(layout.clone(), cfg.poll_interval);
    let (stop, stopping) = watch::channel(false);
    let shared = Arc::new(Shared {
        layout,
        identity: state.identity.clone(),
        log_end,
        tools: BdbTools::default(),
        heartbeat_interval: cfg.heartbeat_interval,
        rescan_interval: cfg.rescan_interval,
        corrupt_chunk: cfg.corrupt_chunk,
        counters: Counters::default(),
        standbys: Mutex::new(crate::retention::load_standbys(&cfg.state_dir)),
        stopping,
    });
    if let Some(r) = cfg.retention.clone() {
        crate::retention::spawn(shared.clone(), cfg.state_dir.clone(), r);
    }
    let incoming = tonic::transport::server::TcpIncoming::bind(cfg.listen)
        .with_context(|| format!("listening on {}", cfg.listen))?
        .with_nodelay(Some(true));
    let bound = incoming.local_addr().context("local address")?;
    if let Some(addr) = cfg.metrics_listen {
        let shared = shared.clone();
        let for_status = shared.clone();
        let pages = tandem_shared::metrics::AdminPages {
            metrics: Box::new(move || crate::metrics::render(&shared)),
            status_json: Box::new(move || crate::metrics::status_json(&for_status)),
        };
        let bound = tandem_shared::metrics::serve(addr, pages).await?;
        tracing::info!(%bound, "serving metrics");
    }
    tracing::info!(
        listen = %bound, env = %cfg.env.display(), env_id = %state.identity.env_id, epoch = state.identity.epoch,
        "tandem-primary listening"
    );
    on_bound(bound);
    tandem_shared::sdnotify::ready();
    let service = ReplicationServer::new(Service { shared })
        .max_decoding_message_size(MAX_MESSAGE_BYTES)
        .max_encoding_message_size(MAX_MESSAGE_BYTES);
    tonic::transport::Server::builder()
        .tls_config(tls)
        .context("TLS configuration")?
        .initial_stream_window_size(Some(tandem_shared::STREAM_WINDOW))
        .initial_connection_window_size(Some(tandem_shared::STREAM_WINDOW * 2))
        .http2_keepalive_interval(Some(tandem_shared::client::KEEPALIVE_INTERVAL))
        .http2_keepalive_timeout(Some(tandem_shared::client::KEEPALIVE_TIMEOUT))
        .add_service(service)
        .serve_with_incoming_shutdown(incoming, async move {
            shutdown.await;
            let _ = stop.send(true);
        })
        .await
        .context("serving")?;
    drop(state);
    Ok(())
}

/// The epoch of a promoted standby directory, when a primary is started on
/// one: the new primary must be ahead of the one it replaced, so standbys
/// that have seen it refuse the old one.
fn promoted_epoch(env: &std::path::Path) -> u64 {
    let path = env.join(".tandem").join("state");
    match tandem_shared::durable::ControlFile::load::<serde_json::Value>(&path, u32::MAX) {
        Ok(Some(v)) => v["promoted"]["epoch"].as_u64().unwrap_or(0),
        _ => 0,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_standby_needs_the_log_from_what_it_or_its_archive_lacks() {
        let mut r = StandbyRecord {
            acked: LogPosition::new(9, 100),
            ..Default::default()
        };
        assert_eq!(r.needs_from(), 9);
        r.archived = Some(LogPosition::new(4, 28));
        assert_eq!(r.needs_from(), 4);
        // Released past the cap: the archive no longer holds files below 7.
        r.archive_released_below = 7;
        assert_eq!(r.needs_from(), 7);
        // An archive ahead of the standby never extends what it needs.
        r.archived = Some(LogPosition::new(12, 0));
        assert_eq!(r.needs_from(), 9);
    }
}
