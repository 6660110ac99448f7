//! `tandem-standby`: parses flags and config, then hands over to the library.
//!
//! Exit codes: 0 success; 1 failure; 2 bad usage or configuration;
//! 3 refused for good (another environment, a newer primary, a promoted
//! directory, a directory already in use).

use anyhow::{Context, Result};
use clap::{Args, Parser, Subcommand};
use serde::{Deserialize, Serialize};
use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;
use tandem_shared::telemetry::{self, LogFormat};
use tandem_shared::tls::TlsFiles;
use tandem_standby::follow::{self, FollowError, StandbyConfig};
use tandem_standby::promote::{self, PromoteOptions};
use tandem_standby::state::StandbyDir;
use tandem_standby::status;

const EXIT_USAGE: u8 = 2;
const EXIT_REFUSED: u8 = 3;

#[derive(Parser)]
#[command(name = "tandem-standby", version, about = "Keep a durable, recoverable mirror of a Berkeley DB environment streamed by tandem-primary; promote it on command.")]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Follow a primary until SIGTERM or Ctrl-C.
    ///
    /// DIR becomes a mirror of the primary's environment home (same layout),
    /// never touched by recovery; Tandem's own state lives in DIR/.tandem.
    /// Reconnects and resumes from what is durable after any interruption.
    Run(RunArgs),
    /// Show role, connection, positions and lag (works whether or not `run` is running).
    Status {
        #[arg(long)]
        dir: PathBuf,
        /// Print JSON instead of text.
        #[arg(long)]
        json: bool,
    },
    /// Prove once, now, that DIR recovers: clone it into DIR/.tandem/check,
    /// run catastrophic recovery and db_verify there. DIR itself is only
    /// read, so this is safe while `run` streams. Exit 1 if the check fails.
    Check {
        #[arg(long)]
        dir: PathBuf,
        /// Print JSON instead of text.
        #[arg(long)]
        json: bool,
    },
    /// Promote DIR: catch up if the primary is reachable, stop following for
    /// good, run catastrophic recovery and db_verify, record a new epoch.
    ///
    /// Afterwards DIR is an environment applications open in place of the
    /// primary's. Tandem cannot stop the old application: make sure nothing
    /// writes to the old primary any more.
    Promote {
        #[arg(long)]
        dir: PathBuf,
        /// Print JSON instead of text.
        #[arg(long)]
        json: bool,
        /// How long to wait for a running standby to catch up, in seconds.
        #[arg(long, default_value_t = 30)]
        catch_up_timeout_secs: u64,
    },
}

/// Every `run` option; each can also come from the TOML file given with
/// --config (same names). Flags win.
#[derive(Args, Serialize, Deserialize, Default)]
#[serde(deny_unknown_fields, rename_all = "kebab-case")]
struct RunArgs {
    /// TOML file with any of these options.
    #[arg(long)]
    #[serde(skip)]
    config: Option<PathBuf>,
    /// The standby directory (an environment home mirror, on the failover disk).
    #[arg(long)]
    #[serde(skip_serializing_if = "Option::is_none")]
    dir: Option<PathBuf>,
    /// The primary to follow, e.g. https://primary.example:7400.
    #[arg(long)]
    #[serde(skip_serializing_if = "Option::is_none")]
    primary: Option<String>,
    /// Name expected in the primary's certificate [default: the host of --primary].
    #[arg(long)]
    #[serde(skip_serializing_if = "Option::is_none")]
    server_name: Option<String>,
    /// This standby's certificate (PEM).
    #[arg(long)]
    #[serde(skip_serializing_if = "Option::is_none")]
    cert: Option<PathBuf>,
    /// This standby's private key (PEM).
    #[arg(long)]
    #[serde(skip_serializing_if = "Option::is_none")]
    key: Option<PathBuf>,
    /// CA that the primary's certificate must chain to (PEM).
    #[arg(long)]
    #[serde(skip_serializing_if = "Option::is_none")]
    ca: Option<PathBuf>,
    /// Name the primary shows for this standby [default: the host name].
    #[arg(long)]
    #[serde(skip_serializing_if = "Option::is_none")]
    name: Option<String>,
    /// Serve Prometheus metrics over HTTP on this address, e.g. 127.0.0.1:9401.
    #[arg(long)]
    #[serde(skip_serializing_if = "Option::is_none")]
    metrics_listen: Option<std::net::SocketAddr>,
    /// Prove the mirror recovers every N seconds (clone, db_recover -c,
    /// db_verify; the mirror is only read); 0 turns it off [default: 300].
    #[arg(long)]
    #[serde(skip_serializing_if = "Option::is_none")]
    check_interval_secs: Option<u64>,
    /// Ask the primary for a fresh base once the log a promotion would
    /// replay passes this many MiB, so promotion time stays bounded; only
    /// pages that changed are sent; 0 turns it off [default: 1024].
    #[arg(long)]
    #[serde(skip_serializing_if = "Option::is_none")]
    rebase_after_mib: Option<u64>,
    /// Also rebase when the base is older than this many seconds; 0 turns
    /// it off [default: 0].
    #[arg(long)]
    #[serde(skip_serializing_if = "Option::is_none")]
    rebase_after_secs: Option<u64>,
    /// Log format: human or json [default: human].
    #[arg(long)]
    #[serde(skip_serializing_if = "Option::is_none")]
    log_format: Option<LogFormat>,
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let runtime = match tokio::runtime::Builder::new_multi_thread().enable_all().build() {
        Ok(r) => r,
        Err(e) => {
            eprintln!("tandem-standby: cannot start the runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    runtime.block_on(dispatch(cli.command))
}

async fn dispatch(command: Command) -> ExitCode {
    let result = match command {
        Command::Run(flags) => return run(flags).await,
        Command::Status { dir, json } => show_status(&dir, json),
        Command::Check { dir, json } => {
            let report = tandem_standby::readiness::run_check(&StandbyDir::new(&dir));
            if json {
                println!("{}", serde_json::to_string_pretty(&report).unwrap_or_default());
            } else if report.ok {
                println!(
                    "recoverable: recovered to {} in {:.2} s ({} bytes of log replayed, {} databases verified)",
                    report.recovered_to.map(|l| l.to_string()).unwrap_or("-".into()),
                    report.recovery_seconds,
                    report.log_bytes,
                    report.databases_verified
                );
            }
            if report.ok {
                Ok(())
            } else {
                Err(anyhow::anyhow!("readiness check failed: {}", report.error.unwrap_or_default()))
            }
        }
        Command::Promote { dir, json, catch_up_timeout_secs } => {
            telemetry::init(LogFormat::Human);
            let opts = PromoteOptions { catch_up_timeout: Duration::from_secs(catch_up_timeout_secs) };
            let dir = StandbyDir::new(&dir);
            match tokio::task::spawn_blocking(move || promote::promote(&dir, &opts)).await {
                Ok(Ok(report)) => print_promotion(&report, json),
                Ok(Err(e)) => Err(e),
                Err(e) => Err(anyhow::anyhow!(e)),
            }
        }
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("tandem-standby: error: {e:#}");
            ExitCode::FAILURE
        }
    }
}

async fn run(flags: RunArgs) -> ExitCode {
    let a: RunArgs = match tandem_shared::config::merge_with_file(&flags, flags.config.as_deref()) {
        Ok(a) => a,
        Err(e) => {
            eprintln!("tandem-standby: error: {e}");
            return ExitCode::from(EXIT_USAGE);
        }
    };
    telemetry::init(a.log_format.unwrap_or_default());
    let cfg = match config(a) {
        Ok(c) => c,
        Err(e) => {
            eprintln!("tandem-standby: error: {e:#}");
            return ExitCode::from(EXIT_USAGE);
        }
    };
    match follow::run(cfg, tandem_shared::shutdown_signal()).await {
        Ok(()) => ExitCode::SUCCESS,
        Err(FollowError::Refused(why)) => {
            eprintln!("tandem-standby: refused: {why}");
            ExitCode::from(EXIT_REFUSED)
        }
        Err(FollowError::Other(e)) => {
            eprintln!("tandem-standby: error: {e:#}");
            ExitCode::FAILURE
        }
    }
}

fn config(a: RunArgs) -> Result<StandbyConfig> {
    let need = |v: Option<PathBuf>, name: &str| v.with_context(|| format!("--{name} is required (or `{name}` in the config file)"));
    Ok(StandbyConfig {
        dir: need(a.dir, "dir")?,
        primary: a.primary.context("--primary is required (or `primary` in the config file)")?,
        server_name: a.server_name,
        tls: TlsFiles { cert: need(a.cert, "cert")?, key: need(a.key, "key")?, ca: need(a.ca, "ca")? },
        name: a.name.unwrap_or_else(hostname),
        metrics_listen: a.metrics_listen,
        check_interval: match a.check_interval_secs.unwrap_or(300) {
            0 => None,
            n => Some(Duration::from_secs(n)),
        },
        rebase_after_bytes: a.rebase_after_mib.unwrap_or(1024) << 20,
        rebase_after_secs: a.rebase_after_secs.unwrap_or(0),
    })
}

fn hostname() -> String {
    std::fs::read_to_string("/proc/sys/kernel/hostname").map(|s| s.trim().to_owned()).unwrap_or_else(|_| "standby".into())
}

fn show_status(dir: &std::path::Path, json: bool) -> Result<()> {
    let s = status::read(&StandbyDir::new(dir))?;
    if json {
        println!("{}", serde_json::to_string_pretty(&s)?);
    } else {
        print!("{}", status::render(&s));
    }
    Ok(())
}

fn print_promotion(r: &promote::PromoteReport, json: bool) -> Result<()> {
    if json {
        println!("{}", serde_json::to_string_pretty(r)?);
    } else if r.already_promoted {
        println!("{} is already promoted ({}, epoch {}); nothing to do", r.env, r.kind, r.epoch);
    } else {
        println!(
            "promoted {} ({}): epoch {}, recovered to {}, {} databases verified, recovery {:.2} s, total {:.2} s\nApplications can now open {} as their environment home.",
            r.env,
            r.kind,
            r.epoch,
            r.recovered_to.map(|l| l.to_string()).unwrap_or_else(|| "-".into()),
            r.databases_verified,
            r.recovery_seconds,
            r.total_seconds,
            r.env
        );
    }
    Ok(())
}
