//! `tandem-standby`'s flags: each defined once, with the help that teaches
//! it. A default that `run` applies lives in the library as a constant, and
//! a test below checks that the help states the same value.

use clap::{Args, Parser, Subcommand};
use serde::{Deserialize, Serialize};
use std::path::PathBuf;
use tandem_shared::telemetry::LogFormat;

#[derive(Parser)]
#[command(
    name = "tandem-standby",
    version,
    about = "Keep a durable, recoverable mirror of a Berkeley DB environment streamed by tandem-primary; promote it on command."
)]
pub struct Cli {
    #[command(subcommand)]
    pub command: Command,
}

// Parsed once per process: the size of the largest variant costs nothing.
#[allow(clippy::large_enum_variant)]
#[derive(Subcommand)]
pub enum Command {
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
    /// Promote DIR: stop following for good, run catastrophic recovery and
    /// db_verify (of what changed since the last readiness check), record a
    /// new epoch.
    ///
    /// If the primary DIR follows is reachable, promote asks it first: while
    /// any process has the primary's environment open (an application that
    /// can still commit), promote refuses and changes nothing (exit 4); once
    /// none has, it catches up to the primary's end of log and promotes as a
    /// switchover, confirmed by the primary. If the primary is unreachable,
    /// it promotes what is durable (a failover). Afterwards DIR is an
    /// environment applications open in place of the primary's.
    Promote {
        #[arg(long)]
        dir: PathBuf,
        /// Print JSON instead of text.
        #[arg(long)]
        json: bool,
        /// How long a switchover waits for the standby to catch up with the
        /// primary's end of log, in seconds; past it promote refuses (exit 4).
        #[arg(long, default_value_t = 30)]
        catch_up_timeout_secs: u64,
        /// Promote even though the primary says an application still has its
        /// environment open: a failover from what is durable, and whatever
        /// that application commits afterwards is lost. Stop it first.
        #[arg(long)]
        force: bool,
        /// db_verify every database after recovery. Without it (the
        /// default), promote verifies only the databases the log changed
        /// since the last passing readiness check and any whose file is not
        /// what that check verified, and every database whenever it cannot
        /// prove that (no such check, another base, an unknown log record).
        #[arg(long)]
        full_verify: bool,
    },
    /// Planned switchover through etcd: the primary hands over to a standby
    /// with nothing lost, the leader key moved in one etcd transaction.
    ///
    /// Stop the application on the primary first. The target (--to, or the
    /// most caught-up standby, ties by name) must run `run --etcd` in the
    /// cluster; its run catches up, asks the primary as `promote` does (no
    /// process may have its environment open, and the standby must hold its
    /// end of log), then moves the leader key to itself (a transaction on
    /// the epoch key's revision and the primary's lease: no election can
    /// start meanwhile), promotes as a switchover and serves on its
    /// --promote-listen. The old primary fences itself and stops (exit 7);
    /// the other standbys follow the new one. Exit 4: refused, nothing
    /// changed (the reason is printed); 1: etcd unreachable or no outcome.
    Switchover(SwitchoverArgs),
    /// Write a self-contained, verified backup of the standby into a new
    /// subdirectory of ARCHIVE, for restores to any point in its log.
    ///
    /// The backup (ARCHIVE/<UTC time>-<base id>/) is an environment home of
    /// its own: the base's database files, DB_CONFIG, and every log file from
    /// the base's first to the standby's durable end, with MANIFEST.json
    /// (size and blake3 of each file, environment, base, log range, first and
    /// last commit time, and a digest of it all). It is built in a temp
    /// directory, fsynced, proven to recover (a scratch copy, db_recover -c,
    /// db_verify) and only then renamed into place. The mirror is only read,
    /// so this is safe while `run` streams: replication does not stop.
    ///
    /// Retention, after each new backup: backups beyond the newest --keep,
    /// and those older than --keep-days, are deleted; the newest never is.
    /// Use one ARCHIVE per environment.
    ///
    /// With --follow SECS it keeps running (until SIGTERM or Ctrl-C): every
    /// SECS seconds it extends the latest backup with the log received since
    /// (files never change once written: the extended backup is built beside
    /// it and swapped in atomically), and starts a new backup when the
    /// standby's base changed. Extensions are checked (hashes, log chain) but
    /// not recovered; run verify-archive for that proof.
    ///
    /// --follow also registers the archive with the standby, so no log is
    /// lost to it: the standby keeps log files the archive has not copied
    /// yet when a rebase would drop them (in DIR/.tandem/archive-hold, where
    /// the next round finishes the previous backup with them), and reports
    /// the archive's position to the primary, whose --retention then keeps
    /// them too. The registration outlives the process (a stopped archiver
    /// holds logs back, up to the primary's cap); end it with --release.
    Archive {
        /// The standby directory (only read; a report goes to DIR/.tandem/archive.json).
        #[arg(long)]
        dir: PathBuf,
        /// The archive: a directory (a path or file:///PATH, created if
        /// missing) or s3://BUCKET/PREFIX in S3-compatible object storage
        /// (the backup is built and proven in --scratch, then uploaded; its
        /// manifest is written last, create-only, so archivers never
        /// overwrite each other's backups).
        #[arg(long, value_name = "ARCHIVE", required_unless_present = "release")]
        to: Option<PathBuf>,
        /// End a --follow archive's registration with DIR (stop the archiver
        /// first): logs are no longer held for it, held ones are deleted.
        #[arg(long, conflicts_with_all = ["to", "follow"])]
        release: bool,
        /// Keep this many newest backups; delete older ones.
        #[arg(long, default_value_t = 7, value_parser = clap::value_parser!(u32).range(1..))]
        keep: u32,
        /// Also delete backups older than this many days (never the newest).
        #[arg(long, value_name = "DAYS")]
        keep_days: Option<f64>,
        /// Keep running; every SECS seconds extend the latest backup with the
        /// new log, or start a new backup when the standby's base changed.
        #[arg(long, value_name = "SECS", value_parser = clap::value_parser!(u64).range(1..))]
        follow: Option<u64>,
        /// With --follow: every SECS, restore the newest backup into --scratch
        /// (downloaded, for a bucket), run db_recover -c and db_verify there,
        /// and record the outcome (status, metric
        /// tandem_standby_archive_last_verified_restore_timestamp_seconds)
        /// [default: no drills].
        #[arg(long, value_name = "SECS", requires = "follow", value_parser = clap::value_parser!(u64).range(1..))]
        drill_every: Option<u64>,
        /// Skip the recovery proof of a new backup (hashes and the log chain
        /// are still checked).
        #[arg(long)]
        no_verify: bool,
        /// Where the recovery proof runs, and where a backup for a bucket is
        /// staged [default: the system temp directory].
        #[arg(long)]
        scratch: Option<PathBuf>,
        #[command(flatten)]
        bucket: BucketArgs,
        /// Print JSON instead of text (one object per round with --follow).
        #[arg(long)]
        json: bool,
    },
    /// Prove a backup is intact and recovers (exit 1 if not).
    ///
    /// Checks every file against the manifest (missing, extra, altered files
    /// and a manifest that does not match its digest are each named), walks
    /// the log as one verified record chain, then runs db_recover -c and
    /// db_verify of every database on a scratch copy. The backup itself is
    /// only read.
    ///
    /// TARGET is a backup directory, or an archive directory: then its newest
    /// backup is verified (every backup with --all). Exit 0 only if all is well.
    VerifyArchive {
        /// A backup (holds MANIFEST.json), an archive directory, or
        /// s3://BUCKET/PREFIX (its backups are downloaded into --scratch).
        target: PathBuf,
        /// With an archive directory: verify every backup, not just the newest.
        #[arg(long)]
        all: bool,
        /// Where the scratch copy goes [default: the system temp directory].
        #[arg(long)]
        scratch: Option<PathBuf>,
        #[command(flatten)]
        bucket: BucketArgs,
        /// Print JSON instead of text.
        #[arg(long)]
        json: bool,
    },
    /// Prove once, now, that every page and log record of DIR is what was
    /// written: each page of each database file against the digests recorded
    /// when it arrived, the log as one checksummed record chain up to the
    /// durable end. DIR is only read (safe while `run` streams; a running
    /// standby picks the result up and asks the primary to heal damage).
    /// The report goes to DIR/.tandem/scrub.json. Exit 1 if damage is found.
    Scrub {
        #[arg(long)]
        dir: PathBuf,
        /// Print JSON instead of text.
        #[arg(long)]
        json: bool,
    },
    /// Restore a backup into a new environment home that applications open.
    ///
    /// Nothing is written until the backup passed its checks (every file
    /// against the manifest, the log chain) and TIME is inside its window.
    /// The backup is then copied beside NEWENV, recovered (db_recover -c,
    /// with --until: -t), db_verify'd, and renamed to NEWENV, which must not
    /// exist or be empty. FROM is a backup, or an archive directory: then the
    /// newest backup (with --until, the newest whose window holds TIME).
    ///
    /// --until keeps exactly the transactions whose commit was stamped at or
    /// before TIME (BDB stamps commits in whole seconds, with the primary's
    /// clock) and rolls back the rest. TIME is one of:
    ///
    ///   @1795636648              unix seconds
    ///   2026-11-25T19:57:28Z     RFC 3339 (or with an offset, +02:00)
    ///   "2026-11-25 19:57:28"    local time of this host
    ///   202611251957.28          BDB's [[CC]YY]MMDDhhmm[.SS], local time
    ///
    /// The window runs from the backup's first commit (or its first
    /// checkpoint, if later: db_recover -t needs one) to its last commit;
    /// a TIME outside it is refused.
    #[command(verbatim_doc_comment)]
    Restore {
        /// A backup directory, an archive directory, or s3://BUCKET/PREFIX
        /// (downloaded in parallel beside NEWENV, every byte checked).
        #[arg(long)]
        from: PathBuf,
        /// The new environment home (must not exist, or be empty).
        #[arg(long, value_name = "NEWENV")]
        to: PathBuf,
        /// Restore to this time instead of the end of the backup.
        #[arg(long, value_name = "TIME")]
        until: Option<String>,
        #[command(flatten)]
        bucket: BucketArgs,
        /// Print JSON instead of text.
        #[arg(long)]
        json: bool,
    },
}

/// `switchover`'s options; --etcd and --cluster can come from a standby's
/// `run` TOML file (--config: its `etcd` and `cluster` keys).
#[derive(Args)]
pub struct SwitchoverArgs {
    /// The standby's `run` TOML file: its `etcd`, `cluster` and etcd timing
    /// keys are used unless given as flags.
    #[arg(long)]
    pub config: Option<PathBuf>,
    /// etcd endpoints, comma-separated.
    #[arg(long, value_name = "URL,URL,...")]
    pub etcd: Option<String>,
    /// The cluster's name in etcd.
    #[arg(long)]
    pub cluster: Option<String>,
    /// The standby that takes over (its --name) [default: the most
    /// caught-up standby publishing in the cluster, ties by name].
    #[arg(long, value_name = "NAME")]
    pub to: Option<String>,
    /// How long the target may take to catch up with the primary's end of
    /// log before it gives up (nothing changed), in seconds.
    #[arg(long, default_value_t = 30)]
    pub catch_up_timeout_secs: u64,
    /// The request's deadline, in seconds: the target must pick it up and
    /// move the leader key within it (its claim can only shorten it, to the
    /// catch-up timeout + 10 s); after it the request counts as failed for
    /// everyone and is withdrawn, nothing changed. Once the key moved, how
    /// long to wait for the new primary to serve. If etcd does not answer
    /// by the deadline the outcome is unknown (exit 8).
    #[arg(long, default_value_t = 60)]
    pub timeout_secs: u64,
    /// Most bytes the target may be behind the primary's published end of
    /// log when asked [default: 16777216].
    #[arg(long)]
    pub max_lag_bytes: Option<u64>,
    /// Print JSON instead of text.
    #[arg(long)]
    pub json: bool,
}

/// How to reach an s3:// archive. Credentials come from the usual AWS
/// environment variables (AWS_ACCESS_KEY_ID, AWS_SECRET_ACCESS_KEY,
/// AWS_SESSION_TOKEN; AWS_REGION, AWS_ENDPOINT_URL), which these flags
/// override. Plain http:// endpoints are refused unless on loopback or
/// AWS_ALLOW_HTTP=true.
#[derive(Args, Debug, Clone, Default)]
pub struct BucketArgs {
    /// S3 endpoint, e.g. http://127.0.0.1:9000 for a local server
    /// [default: $AWS_ENDPOINT_URL, else AWS for the region].
    #[arg(long, value_name = "URL")]
    pub s3_endpoint: Option<String>,
    /// Region [default: $AWS_REGION, else us-east-1].
    #[arg(long, value_name = "REGION")]
    pub s3_region: Option<String>,
    /// How long one request to the object store is retried (5xx answers,
    /// resets, timeouts; with backoff) before the operation fails; a
    /// failed --follow round is tried again next round [default: 120].
    #[arg(long, value_name = "SECS")]
    pub s3_retry_secs: Option<u64>,
}

impl From<BucketArgs> for tandem_standby::archive::BucketOptions {
    fn from(a: BucketArgs) -> Self {
        Self {
            endpoint: a.s3_endpoint,
            region: a.s3_region,
            retry_timeout: a.s3_retry_secs.map(std::time::Duration::from_secs),
        }
    }
}

/// Every `run` option; each can also come from the TOML file given with
/// --config (same names). Flags win.
#[derive(Args, Serialize, Deserialize, Default)]
#[serde(deny_unknown_fields, rename_all = "kebab-case")]
pub struct RunArgs {
    /// TOML file with any of these options.
    #[arg(long)]
    #[serde(skip)]
    pub config: Option<PathBuf>,
    /// The standby directory (an environment home mirror, on the failover disk).
    #[arg(long)]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub dir: Option<PathBuf>,
    /// The primary to follow, e.g. https://primary.example:7400.
    #[arg(long)]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub primary: Option<String>,
    /// Name expected in the primary's certificate [default: the host of --primary].
    #[arg(long)]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub server_name: Option<String>,
    /// This standby's certificate (PEM).
    #[arg(long)]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub cert: Option<PathBuf>,
    /// This standby's private key (PEM).
    #[arg(long)]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub key: Option<PathBuf>,
    /// CA that the primary's certificate must chain to (PEM).
    #[arg(long)]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub ca: Option<PathBuf>,
    /// Name the primary shows for this standby [default: the host name].
    #[arg(long)]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub name: Option<String>,
    /// Serve the admin endpoint over plain HTTP on this address, e.g.
    /// 127.0.0.1:9401: Prometheus metrics at /metrics, the status as JSON at
    /// /status. Keep it on a private address.
    #[arg(long)]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub metrics_listen: Option<std::net::SocketAddr>,
    /// Prove the mirror recovers every N seconds (clone, db_recover -c,
    /// db_verify; the mirror is only read); 0 turns it off [default: 300].
    #[arg(long)]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub check_interval_secs: Option<u64>,
    /// Ask the primary for a fresh base once the log a promotion would
    /// replay passes this many MiB, so promotion time stays bounded; only
    /// pages that changed are sent; 0 turns it off [default: 1024].
    #[arg(long)]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub rebase_after_mib: Option<u64>,
    /// Also rebase when the base is older than this many seconds; 0 turns
    /// it off [default: 0].
    #[arg(long)]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub rebase_after_secs: Option<u64>,
    /// Scrub the mirror every N seconds: every page against the digests
    /// recorded when it was written, every log record up to the durable end,
    /// read at a paced 64 MiB/s. Damage makes status say not recoverable
    /// and asks the primary to heal it; 0 turns it off [default: 3600].
    #[arg(long)]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub scrub_interval_secs: Option<u64>,
    /// Most MiB of log kept for a continuous archive (`archive --follow`)
    /// that has not copied it yet; past it the oldest are deleted, loudly,
    /// so a stopped archiver cannot fill this disk [default: 10240].
    #[arg(long)]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub archive_hold_cap_mib: Option<u64>,
    /// Offer zstd to the primary (auto), which then compresses the chunks
    /// worth it; or receive everything as it is (off) [default: auto].
    #[arg(long)]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub compression: Option<tandem_shared::compress::Compression>,
    /// Log format: human or json [default: human].
    #[arg(long)]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub log_format: Option<LogFormat>,
    /// Discard what this directory holds once the primary's new base has
    /// fully arrived (staged beside it; the directory stays recoverable
    /// until then). Only for a standby refused as "diverged" that you chose
    /// not to promote: its transactions the primary lacks are lost. Not
    /// read from the config file, so it applies to this run only.
    #[arg(long)]
    #[serde(skip)]
    pub start_over: bool,
    /// Take over a standby directory whose log went beyond this primary's
    /// history (a standby that was ahead, or promoted and written on): it
    /// is brought up to date with a page-delta new base (only pages that
    /// differ are sent), staged beside it and swapped in complete. What its
    /// log holds beyond the primary's history is reported (range, bytes,
    /// committed transactions) and its log files kept in
    /// DIR/.tandem/discarded/ until you remove them. A primary that can
    /// continue the directory's log just continues it. Not read from the
    /// config file, so it applies to this run only.
    #[arg(long, conflicts_with = "start_over")]
    #[serde(skip)]
    pub rejoin: bool,
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

/// The standby's own etcd flags, beside the shared
/// [`tandem_coord::args::ClusterArgs`] (`--etcd`, `--cluster`,
/// `--advertise-url`). Without --etcd the standby never promotes by itself.
#[derive(Args, Serialize, Deserialize, Default, Clone)]
#[serde(rename_all = "kebab-case")]
pub struct EtcdArgs {
    /// After promoting, serve as primary on this address (tandem-primary
    /// run, with this standby's certificates and --name). Required with
    /// --etcd.
    #[arg(long)]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub promote_listen: Option<std::net::SocketAddr>,
    /// Most bytes of log behind the primary's last published end of log
    /// that a standby may lack and still promote by itself [default: 16777216].
    #[arg(long)]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub failover_max_lag_bytes: Option<u64>,
    /// Shell command run after promoting, before serving (to start the
    /// application on the promoted environment); TANDEM_ENV names it.
    #[arg(long, value_name = "CMD")]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub on_promote: Option<String>,
}

#[cfg(test)]
mod tests {
    use super::Cli;
    use clap::CommandFactory;

    #[test]
    fn the_help_states_the_defaults_run_applies() {
        let mut cmd = Cli::command();
        let run = cmd.find_subcommand_mut("run").expect("run exists");
        let help = run.render_long_help().to_string();
        // Each option's text: from its flag line to the next flag line.
        let text_of = |flag: &str| -> String {
            let mut lines = help
                .lines()
                .skip_while(|l| !l.trim_start().starts_with(flag));
            let first = lines.next().unwrap_or_default().to_owned();
            let rest = lines.take_while(|l| !l.trim_start().starts_with('-'));
            std::iter::once(first)
                .chain(rest.map(str::to_owned))
                .collect::<Vec<_>>()
                .join(" ")
        };
        for (flag, value) in [
            (
                "--check-interval-secs",
                tandem_standby::follow::DEFAULT_CHECK_INTERVAL_SECS,
            ),
            (
                "--rebase-after-mib",
                tandem_standby::follow::DEFAULT_REBASE_AFTER_MIB,
            ),
            (
                "--scrub-interval-secs",
                tandem_standby::scrub::DEFAULT_INTERVAL_SECS,
            ),
            (
                "--archive-hold-cap-mib",
                tandem_standby::archive_hold::DEFAULT_CAP_BYTES >> 20,
            ),
        ] {
            let text = text_of(flag);
            assert!(
                text.contains(&format!("[default: {value}]")),
                "{flag}: the help must say [default: {value}]: {text}"
            );
        }
    }
}
