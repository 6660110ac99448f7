//! `tandem-primary`: parses flags and config, then hands over to the library.

use anyhow::{Context, Result};
use clap::{Args, Parser, Subcommand};
use serde::{Deserialize, Serialize};
use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;
use tandem_primary::server::{serve, PrimaryConfig};
use tandem_shared::telemetry::{self, LogFormat};
use tandem_shared::tls::TlsFiles;

#[derive(Parser)]
#[command(
    name = "tandem-primary",
    version,
    about = "Stream a live Berkeley DB environment to Tandem standbys over mutual TLS."
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Serve the environment to standbys until SIGTERM or Ctrl-C.
    ///
    /// Exit codes: 0 stopped; 1 failure; 2 bad usage; 7 refused by etcd
    /// (with --etcd: a standby was promoted past this primary's epoch, or
    /// another primary holds the cluster's leader key).
    ///
    /// Ships every database file (read in whole pages, each read twice until
    /// stable) and every log record from the base boundary on, then follows
    /// the log as BDB writes it. Without --retention it changes none of the
    /// environment's files: it reads them, runs `db_archive` to find the base
    /// boundary, and keeps its own state in ENV/.tandem-primary.
    Run(Box<RunArgs>),
    /// Write a CA and certificates for a primary/standby pair.
    ///
    /// Writes ca.pem, primary.pem, primary-key.pem, standby.pem and
    /// standby-key.pem into --out. Both certificates name every --name, so
    /// use the host name (or IP address) standbys will dial.
    Certs {
        /// Directory to write into (created if missing).
        #[arg(long)]
        out: PathBuf,
        /// Host names or IP addresses for the certificates (repeatable).
        #[arg(long = "name", required = true)]
        names: Vec<String>,
    },
    /// Show the primary's end of log and its standbys, from a running primary.
    Status(StatusArgs),
    /// Wait until the log up to a position is fsynced on K standbys.
    ///
    /// Asks the primary running for ENV, on its wait socket, and returns
    /// when K connected standbys acknowledged the log record at --lsn (by
    /// default the environment's last record now, so everything committed
    /// before this command started) as durable. Nothing falls back: with no
    /// standby connected, or fewer than K, it waits --timeout-ms and fails.
    ///
    /// Exit codes: 0 durable; 5 timed out (the message says why: no standby
    /// connected, fewer than K, or not acknowledged yet); 6 no primary runs
    /// for ENV (nothing listens on the wait socket); 1 any other failure;
    /// 2 bad usage.
    WaitDurable(WaitArgs),
}

/// Exit code of `wait-durable` when the wait timed out.
const EXIT_TIMEOUT: u8 = 5;
/// Exit code of `wait-durable` when no primary serves the environment.
const EXIT_NO_PRIMARY: u8 = 6;

#[derive(Args)]
struct WaitArgs {
    /// The environment the primary serves.
    #[arg(long)]
    env: PathBuf,
    /// Log position of a record, FILE/OFFSET or [FILE][OFFSET] (e.g. a commit
    /// token's LSN) [default: the environment's last log record now].
    #[arg(long)]
    lsn: Option<String>,
    /// How many connected standbys must hold it.
    #[arg(long, default_value_t = 1)]
    standbys: usize,
    /// How long to wait, in milliseconds.
    #[arg(long, default_value_t = 10_000)]
    timeout_ms: u64,
    /// The primary's wait socket [default: ENV/.tandem-primary/wait.sock].
    #[arg(long)]
    wait_socket: Option<PathBuf>,
    /// Print JSON instead of text.
    #[arg(long)]
    json: bool,
}

/// Every `run` option; each can also come from the TOML file given with
/// --config (same names, e.g. `listen = "0.0.0.0:7400"`). Flags win.
#[derive(Args, Serialize, Deserialize, Default)]
#[serde(deny_unknown_fields, rename_all = "kebab-case")]
struct RunArgs {
    /// TOML file with any of these options.
    #[arg(long)]
    #[serde(skip)]
    config: Option<PathBuf>,
    /// The Berkeley DB environment home to serve.
    #[arg(long)]
    #[serde(skip_serializing_if = "Option::is_none")]
    env: Option<PathBuf>,
    /// Address to listen on for standbys, e.g. 0.0.0.0:7400 (port 0 picks a free port).
    #[arg(long)]
    #[serde(skip_serializing_if = "Option::is_none")]
    listen: Option<SocketAddr>,
    /// This primary's certificate (PEM).
    #[arg(long)]
    #[serde(skip_serializing_if = "Option::is_none")]
    cert: Option<PathBuf>,
    /// This primary's private key (PEM).
    #[arg(long)]
    #[serde(skip_serializing_if = "Option::is_none")]
    key: Option<PathBuf>,
    /// CA that standby certificates must chain to (PEM).
    #[arg(long)]
    #[serde(skip_serializing_if = "Option::is_none")]
    ca: Option<PathBuf>,
    /// Where the primary keeps its identity and lock [default: ENV/.tandem-primary].
    #[arg(long)]
    #[serde(skip_serializing_if = "Option::is_none")]
    state_dir: Option<PathBuf>,
    /// How often to look for new log records, in milliseconds [default: 2].
    #[arg(long)]
    #[serde(skip_serializing_if = "Option::is_none")]
    poll_interval_ms: Option<u64>,
    /// How often to tell standbys the primary's end of log, in milliseconds [default: 500].
    #[arg(long)]
    #[serde(skip_serializing_if = "Option::is_none")]
    heartbeat_interval_ms: Option<u64>,
    /// How often to look for newly created database files, in milliseconds [default: 2000].
    #[arg(long)]
    #[serde(skip_serializing_if = "Option::is_none")]
    rescan_interval_ms: Option<u64>,
    /// Serve the admin endpoint over plain HTTP on this address, e.g.
    /// 127.0.0.1:9400: Prometheus metrics at /metrics, the status as JSON at
    /// /status. Keep it on a private address.
    #[arg(long)]
    #[serde(skip_serializing_if = "Option::is_none")]
    metrics_listen: Option<SocketAddr>,
    /// Remove log files from the environment once BDB no longer needs them
    /// (db_archive lists them) and every known standby has acknowledged them
    /// durably. Off by default: Tandem then never changes the environment.
    #[arg(long, num_args = 0..=1, default_missing_value = "true")]
    #[serde(skip_serializing_if = "Option::is_none")]
    retention: Option<bool>,
    /// With --retention: most log MiB kept for lagging or offline standbys;
    /// past it the laggard is dropped loudly and later needs a new base [default: 10240].
    #[arg(long)]
    #[serde(skip_serializing_if = "Option::is_none")]
    retention_cap_mib: Option<u64>,
    /// With --retention: seconds between retention passes [default: 10].
    #[arg(long)]
    #[serde(skip_serializing_if = "Option::is_none")]
    retention_interval_secs: Option<u64>,
    /// Log format: human or json [default: human].
    #[arg(long)]
    #[serde(skip_serializing_if = "Option::is_none")]
    log_format: Option<LogFormat>,
    /// Compress chunks with zstd for standbys that offer it (auto), chosen
    /// per chunk, the level following the link; or never (off) [default: auto].
    #[arg(long)]
    #[serde(skip_serializing_if = "Option::is_none")]
    compression: Option<tandem_shared::compress::Compression>,
    /// Testing only: corrupt the digest of the Nth chunk sent.
    #[arg(long, hide = true)]
    #[serde(skip)]
    fault_corrupt_chunk: Option<u64>,
    /// Unix socket where applications wait for commits to be durable on
    /// standbys (owner-only; see README "Waiting for a commit")
    /// [default: STATE_DIR/wait.sock].
    #[arg(long)]
    #[serde(skip_serializing_if = "Option::is_none")]
    wait_socket: Option<PathBuf>,
    /// Write the address actually bound (useful with port 0) to this file.
    #[arg(long)]
    #[serde(skip_serializing_if = "Option::is_none")]
    bound_addr_file: Option<PathBuf>,
    #[command(flatten)]
    #[serde(flatten)]
    etcd: EtcdArgs,
}

/// Automatic failover (README "Automatic failover with etcd"). Without
/// --etcd the primary behaves as if etcd did not exist.
#[derive(Args, Serialize, Deserialize, Default)]
#[serde(rename_all = "kebab-case")]
struct EtcdArgs {
    /// etcd endpoints, comma-separated (e.g. http://10.0.0.1:2379,...): hold
    /// the cluster's leader key under a lease, publish this primary's
    /// address, epoch and end of log, and fence when the lease cannot be
    /// renewed in time. Requires --cluster.
    #[arg(long, value_name = "URL,URL,...", requires = "cluster")]
    #[serde(skip_serializing_if = "Option::is_none")]
    etcd: Option<String>,
    /// The cluster's name in etcd (its keys live under /tandem/NAME/).
    #[arg(long)]
    #[serde(skip_serializing_if = "Option::is_none")]
    cluster: Option<String>,
    /// This primary's name in etcd [default: the host name].
    #[arg(long)]
    #[serde(skip_serializing_if = "Option::is_none")]
    name: Option<String>,
    /// The URL standbys reach this primary at, published in etcd
    /// [default: https://BOUND_ADDRESS].
    #[arg(long)]
    #[serde(skip_serializing_if = "Option::is_none")]
    advertise_url: Option<String>,
    /// Lease time to live, in seconds: a primary that cannot renew for this
    /// long is replaced. Must satisfy loop_wait + 2 × retry_timeout ≤ ttl
    /// [default: 10].
    #[arg(long)]
    #[serde(skip_serializing_if = "Option::is_none")]
    etcd_ttl_secs: Option<u64>,
    /// Pause between rounds of renewing and publishing, in ms [default: 2000].
    #[arg(long)]
    #[serde(skip_serializing_if = "Option::is_none")]
    etcd_loop_wait_ms: Option<u64>,
    /// Bound on one etcd request, in ms [default: 3000].
    #[arg(long)]
    #[serde(skip_serializing_if = "Option::is_none")]
    etcd_retry_timeout_ms: Option<u64>,
    /// The primary fences this long before etcd could expire its lease,
    /// counted from the send time of the last renewal etcd answered, in ms
    /// [default: 1000].
    #[arg(long)]
    #[serde(skip_serializing_if = "Option::is_none")]
    etcd_fence_margin_ms: Option<u64>,
    /// Shell command run when the primary fences itself (to stop the
    /// application here); TANDEM_FENCE_REASON says why. Its exit status is
    /// logged and shown in status.
    #[arg(long, value_name = "CMD")]
    #[serde(skip_serializing_if = "Option::is_none")]
    on_fence: Option<String>,
}

impl EtcdArgs {
    fn config(self) -> Result<Option<tandem_primary::leadership::EtcdConfig>> {
        use tandem_coord::timing::*;
        let Some(list) = self.etcd else {
            return Ok(None);
        };
        let timing = Timing {
            ttl: Duration::from_secs(self.etcd_ttl_secs.unwrap_or(DEFAULT_TTL_SECS)),
            loop_wait: Duration::from_millis(
                self.etcd_loop_wait_ms.unwrap_or(DEFAULT_LOOP_WAIT_MS),
            ),
            retry_timeout: Duration::from_millis(
                self.etcd_retry_timeout_ms
                    .unwrap_or(DEFAULT_RETRY_TIMEOUT_MS),
            ),
            fence_margin: Duration::from_millis(
                self.etcd_fence_margin_ms.unwrap_or(DEFAULT_FENCE_MARGIN_MS),
            ),
        };
        timing.validate()?;
        let name = self.name.unwrap_or_else(tandem_shared::hostname);
        if !tandem_coord::records::valid_name(&name) {
            anyhow::bail!("bad --name {name:?}: use letters, digits, '-', '_' and '.'");
        }
        Ok(Some(tandem_primary::leadership::EtcdConfig {
            endpoints: tandem_coord::parse_endpoints(&list)?,
            cluster: self
                .cluster
                .context("--etcd needs --cluster (or `cluster` in the config file)")?,
            name,
            advertise: self.advertise_url,
            timing,
            on_fence: self.on_fence,
        }))
    }
}

/// Exit code of `run` when etcd refuses this primary: a standby was
/// promoted past its epoch, or another primary holds the leader key.
const EXIT_REFUSED_BY_ETCD: u8 = 7;

#[derive(Args)]
struct StatusArgs {
    /// The primary to ask, e.g. https://primary.example:7400.
    #[arg(long)]
    primary: String,
    /// Client certificate (PEM), e.g. the standby's.
    #[arg(long)]
    cert: PathBuf,
    #[arg(long)]
    key: PathBuf,
    #[arg(long)]
    ca: PathBuf,
    /// Name in the primary's certificate [default: the host of --primary].
    #[arg(long)]
    server_name: Option<String>,
    /// Print JSON instead of text.
    #[arg(long)]
    json: bool,
}

fn main() -> ExitCode {
    tandem_shared::keep_freed_memory();
    let cli = Cli::parse();
    if let Command::WaitDurable(a) = cli.command {
        return wait_durable(a);
    }
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(r) => r,
        Err(e) => {
            eprintln!("tandem-primary: cannot start the runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    match runtime.block_on(dispatch(cli.command)) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e)
            if e.downcast_ref::<tandem_primary::leadership::Refusal>()
                .is_some() =>
        {
            eprintln!("tandem-primary: refused: {e:#}");
            ExitCode::from(EXIT_REFUSED_BY_ETCD)
        }
        Err(e) => {
            eprintln!("tandem-primary: error: {e:#}");
            ExitCode::FAILURE
        }
    }
}

async fn dispatch(command: Command) -> Result<()> {
    match command {
        Command::Run(args) => run(*args).await,
        Command::Certs { out, names } => {
            tandem_shared::tls::generate(&out, &names)?;
            println!(
                "wrote {} into {}",
                tandem_shared::tls::GENERATED.join(", "),
                out.display()
            );
            Ok(())
        }
        Command::Status(args) => status(args).await,
        Command::WaitDurable(_) => unreachable!("handled before the runtime starts"),
    }
}

async fn run(flags: RunArgs) -> Result<()> {
    let fault = flags.fault_corrupt_chunk;
    let a: RunArgs = tandem_shared::config::merge_with_file(&flags, flags.config.as_deref())?;
    telemetry::init(a.log_format.unwrap_or_default());
    let need = |v: Option<PathBuf>, name: &str| {
        v.with_context(|| format!("--{name} is required (or `{name}` in the config file)"))
    };
    let env = need(a.env, "env")?;
    let cfg = PrimaryConfig {
        state_dir: a.state_dir.unwrap_or_else(|| env.join(".tandem-primary")),
        listen: a
            .listen
            .context("--listen is required (or `listen` in the config file)")?,
        tls: TlsFiles {
            cert: need(a.cert, "cert")?,
            key: need(a.key, "key")?,
            ca: need(a.ca, "ca")?,
        },
        poll_interval: Duration::from_millis(a.poll_interval_ms.unwrap_or(2).max(1)),
        heartbeat_interval: Duration::from_millis(a.heartbeat_interval_ms.unwrap_or(500).max(10)),
        rescan_interval: Duration::from_millis(a.rescan_interval_ms.unwrap_or(2000).max(10)),
        metrics_listen: a.metrics_listen,
        corrupt_chunk: fault,
        compression: a.compression.unwrap_or_default(),
        retention: a.retention.unwrap_or(false).then(|| {
            tandem_primary::retention::RetentionConfig {
                cap_bytes: a.retention_cap_mib.unwrap_or(10240) << 20,
                interval: Duration::from_secs(a.retention_interval_secs.unwrap_or(10).max(1)),
            }
        }),
        wait_socket: a.wait_socket,
        etcd: a.etcd.config()?,
        env,
    };
    let addr_file = a.bound_addr_file;
    serve(cfg, tandem_shared::shutdown_signal(), move |bound| {
        if let Some(path) = addr_file {
            if let Err(e) = tandem_shared::durable::write_file_atomic(&path, bound.to_string().as_bytes()) {
                tracing::error!(error = %e, path = %path.display(), "cannot write the bound address");
            }
        }
    })
    .await
}

async fn status(a: StatusArgs) -> Result<()> {
    let tls = TlsFiles {
        cert: a.cert,
        key: a.key,
        ca: a.ca,
    };
    let mut client = tandem_shared::client::connect(
        &a.primary,
        a.server_name.as_deref(),
        &tls,
        Duration::from_secs(5),
    )
    .await?;
    let s = client
        .status(tandem_shared::wire::StatusRequest {})
        .await
        .context("asking for status")?
        .into_inner();
    if a.json {
        println!(
            "{}",
            serde_json::to_string_pretty(&tandem_primary::metrics::status_document(&s))?
        );
        return Ok(());
    }
    let end: tandem_shared::LogPosition = s.end.unwrap_or_default().into();
    println!(
        "role:        primary\nenvironment: {}\nepoch:       {}\nend of log:  {end}",
        s.env_id, s.epoch
    );
    let history: Vec<tandem_shared::epochs::EpochStart> =
        s.history.iter().map(Into::into).collect();
    println!("history:     {}", tandem_shared::epochs::describe(&history));
    if s.fenced_hellos > 0 {
        println!(
            "FENCED:      {} standby Hellos came from a newer epoch: a standby was promoted past this primary; stop the application here",
            s.fenced_hellos
        );
    }
    if let Some(c) = &s.coordination {
        if c.fenced {
            println!(
                "etcd:        FENCED in cluster {} as {}: {} (ships nothing, refuses commit waits; fenced {} time(s); last --on-fence: {})",
                c.cluster,
                c.name,
                c.fence_reason,
                c.fences,
                if c.on_fence_outcome.is_empty() { "never ran" } else { &c.on_fence_outcome }
            );
        } else {
            println!(
                "etcd:        leading cluster {} as {}, lease valid for {} ms more",
                c.cluster, c.name, c.lease_remaining_ms
            );
        }
        if !c.last_failover.is_empty() {
            println!("last failover: {}", c.last_failover);
        }
    }
    if !s.retention_blocked.is_empty() {
        println!("RETENTION BLOCKED: {}", s.retention_blocked);
    }
    if s.standbys.is_empty() {
        println!("standbys:    none has connected");
    }
    for b in &s.standbys {
        let acked: tandem_shared::LogPosition = b.acked.unwrap_or_default().into();
        println!(
            "standby {}: {} from {}, durable at {acked}, lag {} bytes, {}",
            b.name,
            if b.connected {
                "connected"
            } else {
                "disconnected"
            },
            b.peer,
            b.lag_bytes,
            if b.dropped {
                "DROPPED for exceeding the retention cap: it will need a new base".to_owned()
            } else {
                format!(
                    "holds back {} bytes of log ({} of them only for its archive)",
                    b.held_back_bytes, b.held_for_archive_bytes
                )
            }
        );
        match b.archived {
            Some(a) => {
                let a: tandem_shared::LogPosition = a.into();
                let released = if b.archive_released_below > 0 {
                    format!(
                        "; RELEASED: files below {} were removed before it archived them",
                        b.archive_released_below
                    )
                } else {
                    String::new()
                };
                println!("  archive: holds the log up to {a}{released}");
            }
            None => println!("  archive: none registered"),
        }
        if !b.refused.is_empty() {
            println!("  REFUSED (epoch {}): {}", b.epoch, b.refused);
        }
    }
    Ok(())
}

fn wait_durable(a: WaitArgs) -> ExitCode {
    use tandem_primary::wait::client::{self, ClientError, Reply};
    let fail = |code: u8, e: &dyn std::fmt::Display| {
        eprintln!("tandem-primary: {e}");
        ExitCode::from(code)
    };
    let socket = a.wait_socket.clone().unwrap_or_else(|| {
        a.env
            .join(".tandem-primary")
            .join(tandem_primary::wait::socket::SOCKET_NAME)
    });
    let lsn = match &a.lsn {
        Some(s) => match client::parse_lsn(s) {
            Some(p) => p,
            None => {
                return fail(
                    2,
                    &format!("bad --lsn {s:?}: expected FILE/OFFSET or [FILE][OFFSET]"),
                )
            }
        },
        None => match client::last_record(&a.env) {
            Ok(p) => p,
            Err(e) => return fail(1, &e),
        },
    };
    let req = tandem_primary::wait::WaitRequest {
        lsn,
        k: a.standbys,
        timeout: Duration::from_millis(a.timeout_ms),
    };
    let reply = match client::request(&socket, &req) {
        Ok(r) => r,
        Err(e @ ClientError::NoPrimary { .. }) => return fail(EXIT_NO_PRIMARY, &e),
        Err(e) => return fail(1, &e),
    };
    let pos =
        |p: tandem_shared::LogPosition| serde_json::json!({"file": p.file, "offset": p.offset});
    let (code, doc, text) = match &reply {
        Reply::Durable { at, holding } => (
            0,
            serde_json::json!({"outcome": "durable", "lsn": pos(lsn), "durable_lsn": pos(*at), "standbys": holding}),
            format!("durable: {} is on {holding} standby(s) (their durable end {at})", lsn),
        ),
        Reply::TimedOut { best, connected, reason } => (
            EXIT_TIMEOUT,
            serde_json::json!({"outcome": "timeout", "lsn": pos(lsn), "best_durable_lsn": pos(*best), "connected": connected, "reason": reason}),
            format!(
                "NOT durable on {} standby(s) after {} ms: {reason} (best durable end {best}, {connected} connected)",
                a.standbys, a.timeout_ms
            ),
        ),
        Reply::Error(m) => (
            1,
            serde_json::json!({"outcome": "error", "lsn": pos(lsn), "message": m}),
            format!("the primary refused the request: {m}"),
        ),
    };
    if a.json {
        println!("{doc}");
    } else if code == 0 {
        println!("{text}");
    } else {
        eprintln!("tandem-primary: {text}");
    }
    ExitCode::from(code)
}
