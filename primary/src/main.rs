//! `tandem-primary`: parses flags and config, then hands over to the library.

mod cli;

use anyhow::{Context, Result};
use clap::Parser;
use cli::{Cli, Command, RunArgs, StatusArgs, WaitArgs, EXIT_NO_PRIMARY, EXIT_TIMEOUT};
use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;
use tandem_primary::retention;
use tandem_primary::server::{self, serve, PrimaryConfig};
use tandem_shared::telemetry;
use tandem_shared::tls::TlsFiles;

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
    let outcome = runtime.block_on(dispatch(cli.command));
    runtime.shutdown_timeout(tandem_shared::EXIT_GRACE);
    match outcome {
        Ok(()) => ExitCode::SUCCESS,
        Err(e)
            if e.downcast_ref::<tandem_primary::leadership::Refusal>()
                .is_some() =>
        {
            eprintln!("tandem-primary: refused: {e:#}");
            ExitCode::from(cli::EXIT_REFUSED_BY_ETCD)
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
    #[cfg(feature = "test-hooks")]
    let fault = flags.fault_corrupt_chunk;
    let a: RunArgs = tandem_shared::config::merge_with_file(&flags, flags.config.as_deref())?;
    telemetry::init(a.log_format.unwrap_or_default());
    let need = |v: Option<PathBuf>, name: &str| {
        v.with_context(|| format!("--{name} is required (or `{name}` in the config file)"))
    };
    let env = need(a.env, "env")?;
    let cfg = PrimaryConfig {
        state_dir: a
            .state_dir
            .unwrap_or_else(|| env.join(server::DEFAULT_STATE_DIR_NAME)),
        listen: a
            .listen
            .context("--listen is required (or `listen` in the config file)")?,
        tls: TlsFiles {
            cert: need(a.cert, "cert")?,
            key: need(a.key, "key")?,
            ca: need(a.ca, "ca")?,
        },
        poll_interval: Duration::from_millis(
            a.poll_interval_ms
                .unwrap_or(server::DEFAULT_POLL_INTERVAL_MS)
                .max(server::MIN_POLL_INTERVAL_MS),
        ),
        heartbeat_interval: Duration::from_millis(
            a.heartbeat_interval_ms
                .unwrap_or(server::DEFAULT_HEARTBEAT_INTERVAL_MS)
                .max(server::MIN_INTERVAL_MS),
        ),
        rescan_interval: Duration::from_millis(
            a.rescan_interval_ms
                .unwrap_or(server::DEFAULT_RESCAN_INTERVAL_MS)
                .max(server::MIN_INTERVAL_MS),
        ),
        metrics_listen: a.metrics_listen,
        #[cfg(feature = "test-hooks")]
        corrupt_chunk: fault,
        compression: a.compression.unwrap_or_default(),
        retention: a
            .retention
            .unwrap_or(false)
            .then(|| retention::RetentionConfig {
                cap_bytes: a.retention_cap_mib.unwrap_or(retention::DEFAULT_CAP_MIB) << 20,
                interval: Duration::from_secs(
                    a.retention_interval_secs
                        .unwrap_or(retention::DEFAULT_INTERVAL_SECS)
                        .max(1),
                ),
            }),
        wait_socket: a.wait_socket,
        etcd: etcd_config(a.cluster, a.etcd, &a.timing)?,
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

fn etcd_config(
    c: tandem_coord::args::ClusterArgs,
    a: cli::EtcdArgs,
    timing: &tandem_coord::timing::TimingArgs,
) -> Result<Option<tandem_primary::leadership::EtcdConfig>> {
    let Some(list) = c.etcd else {
        return Ok(None);
    };
    let timing = timing.timing()?;
    let name = a.name.unwrap_or_else(tandem_shared::hostname);
    if !tandem_coord::records::valid_name(&name) {
        anyhow::bail!("bad --name {name:?}: use letters, digits, '-', '_' and '.'");
    }
    Ok(Some(tandem_primary::leadership::EtcdConfig {
        endpoints: tandem_coord::parse_endpoints(&list)?,
        cluster: c
            .cluster
            .context("--etcd needs --cluster (or `cluster` in the config file)")?,
        name,
        advertise: c.advertise_url,
        timing,
        on_fence: a.on_fence,
    }))
}

// Long function: prints the status text, one line per field, in the order an operator reads it.
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
            .join(server::DEFAULT_STATE_DIR_NAME)
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
