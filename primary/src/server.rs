//! The top of the primary: builds the shared context, starts the log
//! watcher, retention and the gRPC service, and shuts them down in order.
//!
//! The service only serves: a session per standby stream (tracked, so
//! shutdown can join them), status, switchover. Shutdown is one
//! cancellation token: sessions end their streams, the server drains,
//! sessions, retention and the log watcher are joined (each within a
//! bound), and the environment lock is released last.

pub use crate::context::{Counters, Shared};
use crate::identity::{PrimaryState, Promoted};
use crate::log_watch;
use crate::outbox::Outbox;
use crate::registry::StandbyRegistry;
use crate::session;
use anyhow::{Context, Result};
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;
use tandem_shared::bdb::BdbTools;
use tandem_shared::envlayout::EnvLayout;
use tandem_shared::tls::TlsFiles;
use tandem_shared::wire::replication_server::{Replication, ReplicationServer};
use tandem_shared::wire::{
    PrimaryMessage, PrimaryStatus, StandbyMessage, StatusRequest, SwitchoverReply,
    SwitchoverRequest,
};
use tandem_shared::MAX_MESSAGE_BYTES;
use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tonic::{Request, Response, Status, Streaming};

/// How long shutdown waits for each stage (sessions, retention, the log
/// watcher) before it goes on without it.
const SHUTDOWN_STAGE: Duration = Duration::from_secs(5);

/// `--state-dir`'s default: this directory under the environment home.
pub const DEFAULT_STATE_DIR_NAME: &str = ".tandem-primary";
/// `--poll-interval-ms`: how often the log is looked at for new records.
pub const DEFAULT_POLL_INTERVAL_MS: u64 = 2;
/// The shortest poll interval `run` accepts (a smaller one is raised).
pub const MIN_POLL_INTERVAL_MS: u64 = 1;
/// `--heartbeat-interval-ms`: how often standbys hear the end of log.
pub const DEFAULT_HEARTBEAT_INTERVAL_MS: u64 = 500;
/// `--rescan-interval-ms`: how often new database files are looked for.
pub const DEFAULT_RESCAN_INTERVAL_MS: u64 = 2000;
/// The shortest heartbeat or rescan interval `run` accepts.
pub const MIN_INTERVAL_MS: u64 = 10;

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
    /// `--fault-corrupt-chunk` (feature `test-hooks` only): corrupt the
    /// digest of the Nth chunk sent.
    #[cfg(feature = "test-hooks")]
    pub corrupt_chunk: Option<u64>,
    /// Remove shipped, inactive log files from the environment (off: None).
    pub retention: Option<crate::retention::RetentionConfig>,
    /// `--compression`: use zstd with standbys that offer it.
    pub compression: tandem_shared::compress::Compression,
    /// The wait socket [default: STATE_DIR/wait.sock].
    pub wait_socket: Option<PathBuf>,
    /// `--etcd`: hold the cluster's leader key, fence without it.
    pub etcd: Option<crate::leadership::EtcdConfig>,
}

struct Service {
    shared: Arc<Shared>,
    sessions: TaskTracker,
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
        self.sessions.spawn(session::run(
            self.shared.clone(),
            peer,
            request.into_inner(),
            Outbox::new(tx, self.shared.wire.clone()),
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
        request: Request<SwitchoverRequest>,
    ) -> Result<Response<SwitchoverReply>, Status> {
        crate::switchover::prepare(&self.shared, request.into_inner())
            .await
            .map(Response::new)
    }
}

/// Runs the primary until `shutdown` resolves. `on_bound` learns the
/// listening address (useful with port 0).
// Long function: the start-up steps in order (state, leadership, tasks,
// listener), each a call; the etcd leadership steps made it longer.
pub async fn serve(
    cfg: PrimaryConfig,
    shutdown: impl std::future::Future<Output = ()> + Send,
    on_bound: impl FnOnce(SocketAddr),
) -> Result<()> {
    let (layout, state) = open_environment(&cfg)?;
    let tls = cfg.tls.server_config().context("loading TLS files")?;
    let stop = CancellationToken::new();
    // Every way out of this function, early errors included, stops the
    // tasks started below.
    let _stop_on_return = stop.clone().drop_guard();
    let timing = Arc::new(crate::timing::LogTiming::default());
    let (log_end, watcher) = log_watch::spawn(
        layout.clone(),
        cfg.poll_interval,
        stop.clone(),
        timing.clone(),
    )
    .context("starting the log watcher")?;
    let tools = BdbTools::default();
    let registry = Arc::new(StandbyRegistry::open(&cfg.state_dir));
    // After the state directory's lock: a second primary on this
    // environment never gets here to look at our socket.
    let (incoming, bound) = listen(cfg.listen)?;
    // Before anything is served: a primary etcd has moved past never serves.
    let leadership = match cfg.etcd.clone() {
        Some(e) => {
            Some(crate::leadership::Leadership::start(e, state.identity.clone(), bound).await?)
        }
        None => None,
    };
    let (wait_socket, wait_server, waits) =
        serve_waits(&cfg, &registry, leadership.clone(), &stop)?;
    let shared = Arc::new(Shared {
        leadership: leadership.clone(),
        layout: layout.clone(),
        identity: state.identity.clone(),
        log_end,
        tools: tools.clone(),
        heartbeat_interval: cfg.heartbeat_interval,
        rescan_interval: cfg.rescan_interval,
        #[cfg(feature = "test-hooks")]
        corrupt_chunk: cfg.corrupt_chunk,
        counters: Counters::default(),
        compression: cfg.compression,
        wire: Default::default(),
        registry: registry.clone(),
        waits: waits.clone(),
        timing,
        stop: stop.clone(),
    });
    let coordination = leadership
        .clone()
        .map(|l| tokio::spawn(l.run(shared.log_end.clone(), stop.clone())));
    let retention = cfg.retention.clone().map(|r| {
        let task = crate::retention::run(registry, layout, tools, r, stop.clone());
        tokio::spawn(task)
    });
    let sessions = TaskTracker::new();
    let admin = match cfg.metrics_listen {
        Some(addr) => Some(serve_admin(addr, &shared).await?),
        None => None,
    };
    tracing::info!(
        listen = %bound, wait_socket = %wait_socket.path.display(), env = %cfg.env.display(), env_id = %state.identity.env_id, epoch = state.identity.epoch,
        "tandem-primary listening"
    );
    on_bound(bound);
    tandem_shared::sdnotify::ready();
    let service = Service {
        shared,
        sessions: sessions.clone(),
    };
    let server = grpc(tls, service, incoming, shutdown, stop.clone())?;
    let served = until_closed(server, &stop).await;
    // Also on a serving error: everything below must stop either way.
    stop.cancel();
    Background {
        sessions,
        retention,
        wait_server,
        wait_socket,
        watcher,
    }
    .stop_in_order()
    .await;
    if let Some(c) = coordination {
        let _ = tokio::time::timeout(SHUTDOWN_STAGE, c).await;
    }
    served.context("serving")?;
    if let Some(server) = admin {
        server.stop().await;
    }
    // Last: the lock keeps a second primary off the environment until
    // every task above has stopped touching it.
    drop(state);
    tracing::info!("stopped");
    if let Some(refusal) = leadership.and_then(|l| l.superseded()) {
        return Err(refusal.into());
    }
    Ok(())
}

/// The gRPC server over mutual TLS, until `shutdown` or `stop`; either
/// cancels `stop`, which ends every session's stream.
fn grpc(
    tls: tonic::transport::ServerTlsConfig,
    service: Service,
    incoming: tonic::transport::server::TcpIncoming,
    shutdown: impl std::future::Future<Output = ()> + Send,
    stop: CancellationToken,
) -> Result<impl std::future::Future<Output = Result<(), tonic::transport::Error>>> {
    let service = ReplicationServer::new(service)
        .max_decoding_message_size(MAX_MESSAGE_BYTES)
        .max_encoding_message_size(MAX_MESSAGE_BYTES);
    Ok(tonic::transport::Server::builder()
        .tls_config(tls)
        .context("TLS configuration")?
        .initial_stream_window_size(Some(tandem_shared::STREAM_WINDOW))
        .initial_connection_window_size(Some(tandem_shared::STREAM_WINDOW * 2))
        .max_frame_size(Some(tandem_shared::MAX_FRAME))
        .http2_keepalive_interval(Some(tandem_shared::client::KEEPALIVE_INTERVAL))
        .http2_keepalive_timeout(Some(tandem_shared::client::KEEPALIVE_TIMEOUT))
        .add_service(service)
        .serve_with_incoming_shutdown(incoming, async move {
            tokio::select! {
                _ = shutdown => {}
                _ = stop.cancelled() => {}
            }
            tracing::info!("shutting down");
            stop.cancel();
        }))
}

/// The environment, checked shippable, and the primary's state (identity,
/// epoch, history; adopted from a promotion recorded in it), locked.
fn open_environment(cfg: &PrimaryConfig) -> Result<(EnvLayout, PrimaryState)> {
    let layout = EnvLayout::open(&cfg.env)
        .with_context(|| format!("opening environment {}", cfg.env.display()))?;
    layout.database_files().context("the environment holds a file Tandem cannot ship, and a standby without it would not recover")?;
    let promoted = promoted(&cfg.env)?;
    let state = PrimaryState::open(&cfg.state_dir, promoted.as_ref())?;
    Ok((layout, state))
}

/// The standbys' listening socket, and the address it is bound to.
fn listen(addr: SocketAddr) -> Result<(tonic::transport::server::TcpIncoming, SocketAddr)> {
    let incoming = tonic::transport::server::TcpIncoming::bind(addr)
        .with_context(|| format!("listening on {addr}"))?
        .with_nodelay(Some(true));
    let bound = incoming.local_addr().context("local address")?;
    Ok((incoming, bound))
}

/// Graceful shutdown waits for every connection to close; a peer that
/// keeps one open must not hold the primary up past [`SHUTDOWN_STAGE`]
/// after `stop`.
async fn until_closed(
    server: impl std::future::Future<Output = Result<(), tonic::transport::Error>>,
    stop: &CancellationToken,
) -> Result<(), tonic::transport::Error> {
    tokio::select! {
        r = server => r,
        _ = async {
            stop.cancelled().await;
            tokio::time::sleep(SHUTDOWN_STAGE).await;
        } => {
            tracing::warn!("connections did not close in time; closing them");
            Ok(())
        }
    }
}

/// The wait socket (`--wait-socket`, by default in the state directory)
/// and the task answering on it.
fn serve_waits(
    cfg: &PrimaryConfig,
    registry: &StandbyRegistry,
    leadership: Option<Arc<crate::leadership::Leadership>>,
    stop: &CancellationToken,
) -> Result<(
    crate::wait::socket::WaitSocket,
    tokio::task::JoinHandle<()>,
    Arc<crate::wait::WaitStats>,
)> {
    let socket_path = cfg
        .wait_socket
        .clone()
        .unwrap_or_else(|| cfg.state_dir.join(crate::wait::socket::SOCKET_NAME));
    let (wait_listener, wait_socket) = crate::wait::socket::bind(&socket_path)?;
    let waits = Arc::new(crate::wait::WaitStats::default());
    let wait_server = tokio::spawn(crate::wait::socket::serve(
        wait_listener,
        registry.durable_acks(),
        waits.clone(),
        leadership,
        stop.clone(),
    ));
    Ok((wait_socket, wait_server, waits))
}

/// The admin endpoint (metrics and status as JSON) on `addr`.
async fn serve_admin(
    addr: SocketAddr,
    shared: &Arc<Shared>,
) -> Result<tandem_shared::metrics::AdminServer> {
    let for_metrics = shared.clone();
    let for_status = shared.clone();
    let pages = tandem_shared::metrics::AdminPages {
        metrics: Box::new(move || crate::metrics::render(&for_metrics)),
        status_json: Box::new(move || crate::metrics::status_json(&for_status)),
    };
    let server = tandem_shared::metrics::serve(addr, pages).await?;
    tracing::info!(bound = %server.bound, "serving metrics");
    Ok(server)
}

/// The tasks `serve` started beside the gRPC server, stopped in order
/// once it ended (each stage bounded by [`SHUTDOWN_STAGE`]).
struct Background {
    sessions: TaskTracker,
    retention: Option<tokio::task::JoinHandle<()>>,
    wait_server: tokio::task::JoinHandle<()>,
    wait_socket: crate::wait::socket::WaitSocket,
    watcher: std::thread::JoinHandle<()>,
}

impl Background {
    async fn stop_in_order(self) {
        let sessions = self.sessions;
        sessions.close();
        if tokio::time::timeout(SHUTDOWN_STAGE, sessions.wait())
            .await
            .is_err()
        {
            tracing::warn!(
                left = sessions.len(),
                "standby sessions did not end in time; exiting without them"
            );
        }
        if let Some(r) = self.retention {
            // A pass in progress runs to its end (it may be removing files).
            if tokio::time::timeout(SHUTDOWN_STAGE, r).await.is_err() {
                tracing::warn!("the retention pass did not end in time; exiting without it");
            }
        }
        if tokio::time::timeout(SHUTDOWN_STAGE, self.wait_server)
            .await
            .is_err()
        {
            tracing::warn!("wait clients did not end in time; exiting without them");
        }
        drop(self.wait_socket);
        let watcher = self.watcher;
        let joined = tokio::task::spawn_blocking(move || watcher.join());
        if tokio::time::timeout(SHUTDOWN_STAGE, joined).await.is_err() {
            tracing::warn!("the log watcher did not stop in time; exiting without it");
        }
    }
}

/// What a promotion recorded, when a primary is started on a promoted
/// standby's directory: the new primary keeps the environment's identity
/// and history and is ahead of the one it replaced, so standbys that have
/// seen it refuse the old one and the others can follow it.
fn promoted(env: &std::path::Path) -> Result<Option<Promoted>> {
    let path = env.join(".tandem").join("state");
    // Read as plain JSON: only these fields matter here, whatever the
    // standby state's format version.
    let v = match tandem_shared::durable::ControlFile::load::<serde_json::Value>(&path, u32::MAX) {
        Ok(Some(v)) => v,
        Ok(None) => return Ok(None),
        Err(e) => {
            tracing::warn!(error = %e, "cannot read the standby state in the environment; starting as if it was never a standby");
            return Ok(None);
        }
    };
    let Some(epoch) = v["promoted"]["epoch"].as_u64() else {
        return Ok(None);
    };
    let history = match v.get("history") {
        Some(h) => serde_json::from_value(h.clone())
            .with_context(|| format!("reading the epoch history in {}", path.display()))?,
        None => Vec::new(),
    };
    Ok(Some(Promoted {
        env_id: v["env_id"]
            .as_str()
            .map(str::to_owned)
            .unwrap_or_else(crate::identity::random_id),
        epoch,
        history,
    }))
}
