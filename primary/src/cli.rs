//! `tandem-primary`'s flags: each defined once, with the help that teaches
//! it. A default that `run` applies lives in the library as a constant, and
//! a test below checks that the help states the same value.

use clap::{Args, Parser, Subcommand};
use serde::{Deserialize, Serialize};
use std::net::SocketAddr;
use std::path::PathBuf;
use tandem_shared::telemetry::LogFormat;

#[derive(Parser)]
#[command(
    name = "tandem-primary",
    version,
    about = "Stream a live Berkeley DB environment to Tandem standbys over mutual TLS."
)]
pub struct Cli {
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Subcommand)]
pub enum Command {
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
pub const EXIT_TIMEOUT: u8 = 5;
/// Exit code of `wait-durable` when no primary serves the environment.
pub const EXIT_NO_PRIMARY: u8 = 6;
/// Exit code of `run` when etcd refuses this primary: a standby was
/// promoted past its epoch, or another primary holds the leader key.
pub const EXIT_REFUSED_BY_ETCD: u8 = 7;

#[derive(Args)]
pub struct WaitArgs {
    /// The environment the primary serves.
    #[arg(long)]
    pub env: PathBuf,
    /// Log position of a record, FILE/OFFSET or [FILE][OFFSET] (e.g. a commit
    /// token's LSN) [default: the environment's last log record now].
    #[arg(long)]
    pub lsn: Option<String>,
    /// How many connected standbys must hold it.
    #[arg(long, default_value_t = tandem_primary::wait::DEFAULT_STANDBYS)]
    pub standbys: usize,
    /// How long to wait, in milliseconds.
    #[arg(long, default_value_t = tandem_primary::wait::DEFAULT_TIMEOUT_MS)]
    pub timeout_ms: u64,
    /// The primary's wait socket [default: ENV/.tandem-primary/wait.sock].
    #[arg(long)]
    pub wait_socket: Option<PathBuf>,
    /// Print JSON instead of text.
    #[arg(long)]
    pub json: bool,
}

/// Every `run` option; each can also come from the TOML file given with
/// --config (same names, e.g. `listen = "0.0.0.0:7400"`). Flags win.
#[derive(Args, Serialize, Deserialize, Default)]
#[serde(deny_unknown_fields, rename_all = "kebab-case")]
pub struct RunArgs {
    /// TOML file with any of these options.
    #[arg(long)]
    #[serde(skip)]
    pub config: Option<PathBuf>,
    /// The Berkeley DB environment home to serve.
    #[arg(long)]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub env: Option<PathBuf>,
    /// Address to listen on for standbys, e.g. 0.0.0.0:7400 (port 0 picks a free port).
    #[arg(long)]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub listen: Option<SocketAddr>,
    /// This primary's certificate (PEM).
    #[arg(long)]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub cert: Option<PathBuf>,
    /// This primary's private key (PEM).
    #[arg(long)]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub key: Option<PathBuf>,
    /// CA that standby certificates must chain to (PEM).
    #[arg(long)]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub ca: Option<PathBuf>,
    /// Where the primary keeps its identity and lock [default: ENV/.tandem-primary].
    #[arg(long)]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub state_dir: Option<PathBuf>,
    /// How often to look for new log records, in milliseconds [default: 2].
    #[arg(long)]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub poll_interval_ms: Option<u64>,
    /// How often to tell standbys the primary's end of log, in milliseconds [default: 500].
    #[arg(long)]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub heartbeat_interval_ms: Option<u64>,
    /// How often to look for newly created database files, in milliseconds [default: 2000].
    #[arg(long)]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub rescan_interval_ms: Option<u64>,
    /// Serve the admin endpoint over plain HTTP on this address, e.g.
    /// 127.0.0.1:9400: Prometheus metrics at /metrics, the status as JSON at
    /// /status. Keep it on a private address.
    #[arg(long)]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub metrics_listen: Option<SocketAddr>,
    /// Remove log files from the environment once BDB no longer needs them
    /// (db_archive lists them) and every known standby has acknowledged them
    /// durably. Off by default: Tandem then never changes the environment.
    #[arg(long, num_args = 0..=1, default_missing_value = "true")]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub retention: Option<bool>,
    /// With --retention: most log MiB kept for lagging or offline standbys;
    /// past it the laggard is dropped loudly and later needs a new base [default: 10240].
    #[arg(long)]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub retention_cap_mib: Option<u64>,
    /// With --retention: seconds between retention passes [default: 10].
    #[arg(long)]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub retention_interval_secs: Option<u64>,
    /// Log format: human or json [default: human].
    #[arg(long)]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub log_format: Option<LogFormat>,
    /// Compress chunks with zstd for standbys that offer it (auto), chosen
    /// per chunk, the level following the link; or never (off) [default: auto].
    #[arg(long)]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub compression: Option<tandem_shared::compress::Compression>,
    /// Testing only: corrupt the digest of the Nth chunk sent. Exists only
    /// in a build with the cargo feature `test-hooks` (what the tests use).
    #[cfg(feature = "test-hooks")]
    #[arg(long, hide = true)]
    #[serde(skip)]
    pub fault_corrupt_chunk: Option<u64>,
    /// Unix socket where applications wait for commits to be durable on
    /// standbys (owner-only; see README "Waiting for a commit")
    /// [default: STATE_DIR/wait.sock].
    #[arg(long)]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub wait_socket: Option<PathBuf>,
    /// Write the address actually bound (useful with port 0) to this file.
    #[arg(long)]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub bound_addr_file: Option<PathBuf>,
    #[command(flatten)]
    #[serde(flatten)]
    pub cluster: tandem_coord::args::ClusterArgs,
    #[command(flatten)]
    #[serde(flatten)]
    pub etcd: EtcdArgs,
    /// The `--etcd-*` timing, beside (not inside) `etcd`: serde cannot
    /// refuse unknown keys through two levels of flatten.
    #[command(flatten)]
    #[serde(flatten)]
    pub timing: tandem_coord::timing::TimingArgs,
}

/// The primary's own etcd flags, beside the shared
/// [`tandem_coord::args::ClusterArgs`] (`--etcd`, `--cluster`,
/// `--advertise-url`).
#[derive(Args, Serialize, Deserialize, Default)]
#[serde(rename_all = "kebab-case")]
pub struct EtcdArgs {
    /// This primary's name in etcd [default: the host name].
    #[arg(long)]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub name: Option<String>,
    /// Shell command run when the primary fences itself (to stop the
    /// application here); TANDEM_FENCE_REASON says why. Its exit status is
    /// logged and shown in status.
    #[arg(long, value_name = "CMD")]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub on_fence: Option<String>,
}

#[derive(Args)]
pub struct StatusArgs {
    /// The primary to ask, e.g. https://primary.example:7400.
    #[arg(long)]
    pub primary: String,
    /// Client certificate (PEM), e.g. the standby's.
    #[arg(long)]
    pub cert: PathBuf,
    #[arg(long)]
    pub key: PathBuf,
    #[arg(long)]
    pub ca: PathBuf,
    /// Name in the primary's certificate [default: the host of --primary].
    #[arg(long)]
    pub server_name: Option<String>,
    /// Print JSON instead of text.
    #[arg(long)]
    pub json: bool,
}

#[cfg(test)]
mod tests {
    use super::Cli;
    use clap::CommandFactory;

    /// Each option's help text: from its flag line to the next flag line.
    fn option_help(subcommand: &str, flag: &str) -> String {
        let mut cmd = Cli::command();
        let sub = cmd
            .find_subcommand_mut(subcommand)
            .expect("subcommand exists");
        let help = sub.render_long_help().to_string();
        let mut lines = help
            .lines()
            .skip_while(|l| !l.trim_start().starts_with(flag));
        let first = lines.next().unwrap_or_default().to_owned();
        let rest = lines.take_while(|l| !l.trim_start().starts_with('-'));
        std::iter::once(first)
            .chain(rest.map(str::to_owned))
            .collect::<Vec<_>>()
            .join(" ")
    }

    /// The fault hook exists only in the tests' build (feature
    /// `test-hooks`); a release build refuses the flag.
    #[test]
    fn the_fault_flag_exists_only_with_the_test_hooks() {
        use clap::Parser;
        let parsed = Cli::try_parse_from(["tandem-primary", "run", "--fault-corrupt-chunk", "2"]);
        assert_eq!(parsed.is_ok(), cfg!(feature = "test-hooks"));
    }

    /// The etcd timing keys of a config file reach the flattened
    /// `TimingArgs`; a misspelt one is refused.
    #[test]
    fn the_timing_keys_are_read_from_the_config_file() {
        use super::RunArgs;
        let dir = tempfile::tempdir().unwrap();
        let good = dir.path().join("good.toml");
        std::fs::write(&good, "etcd-ttl-secs = 4\netcd-fence-margin-ms = 300\n").unwrap();
        let a: RunArgs =
            tandem_shared::config::merge_with_file(&RunArgs::default(), Some(&good)).unwrap();
        assert_eq!(a.timing.etcd_ttl_secs, Some(4));
        assert_eq!(a.timing.etcd_fence_margin_ms, Some(300));
        let bad = dir.path().join("bad.toml");
        std::fs::write(&bad, "etcd-ttl-sec = 4\n").unwrap();
        let e = tandem_shared::config::merge_with_file(&RunArgs::default(), Some(&bad));
        assert!(e.is_err());
    }

    #[test]
    fn the_help_states_the_defaults_run_applies() {
        use tandem_primary::{retention, server};
        for (sub, flag, value) in [
            (
                "run",
                "--poll-interval-ms",
                server::DEFAULT_POLL_INTERVAL_MS,
            ),
            (
                "run",
                "--heartbeat-interval-ms",
                server::DEFAULT_HEARTBEAT_INTERVAL_MS,
            ),
            (
                "run",
                "--rescan-interval-ms",
                server::DEFAULT_RESCAN_INTERVAL_MS,
            ),
            ("run", "--retention-cap-mib", retention::DEFAULT_CAP_MIB),
            (
                "run",
                "--retention-interval-secs",
                retention::DEFAULT_INTERVAL_SECS,
            ),
            (
                "wait-durable",
                "--timeout-ms",
                tandem_primary::wait::DEFAULT_TIMEOUT_MS,
            ),
        ] {
            let text = option_help(sub, flag);
            assert!(
                text.contains(&format!("[default: {value}]")),
                "{sub} {flag}: the help must say [default: {value}]: {text}"
            );
        }
        for (sub, flag, value) in [
            ("run", "--log-format", "human"),
            ("run", "--compression", "auto"),
            ("run", "--state-dir", "ENV/.tandem-primary"),
            ("run", "--wait-socket", "STATE_DIR/wait.sock"),
            ("wait-durable", "--standbys", "1"),
        ] {
            let text = option_help(sub, flag);
            assert!(
                text.contains(&format!("[default: {value}]")),
                "{sub} {flag}: the help must say [default: {value}]: {text}"
            );
        }
        assert_eq!(
            tandem_shared::telemetry::LogFormat::default(),
            tandem_shared::telemetry::LogFormat::Human
        );
        assert_eq!(
            tandem_shared::compress::Compression::default(),
            tandem_shared::compress::Compression::Auto
        );
        assert_eq!(tandem_primary::wait::DEFAULT_STANDBYS, 1);
        assert_eq!(
            tandem_primary::server::DEFAULT_STATE_DIR_NAME,
            ".tandem-primary"
        );
    }
}
