//! `tandem-standby`: parses flags and config, then hands over to the library.
//!
//! Exit codes: 0 success; 1 failure; 2 bad usage or configuration;
//! 3 refused for good (another environment, a newer primary, a promoted
//! directory, a directory already in use); 4 `promote` refused for now (the
//! primary is reachable and an application still has its environment
//! open, or the standby could not catch up with it): nothing was changed.

use anyhow::{Context, Result};
use clap::{Args, Parser, Subcommand};
use serde::{Deserialize, Serialize};
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;
use tandem_shared::telemetry::{self, LogFormat};
use tandem_shared::tls::TlsFiles;
use tandem_standby::archive::{
    self, restore, verify, ArchiveOptions, ArchiveReport, RestoreOptions, RestoreReport,
    VerifyReport,
};
use tandem_standby::follow::{self, FollowError, StandbyConfig};
use tandem_standby::promote::{self, PromoteOptions};
use tandem_standby::scrub;
use tandem_standby::state::StandbyDir;
use tandem_standby::status;

const EXIT_USAGE: u8 = 2;
const EXIT_REFUSED: u8 = 3;
/// `promote` refused, nothing changed; it can succeed once the cause is gone.
const EXIT_REFUSED_FOR_NOW: u8 = 4;

#[derive(Parser)]
#[command(
    name = "tandem-standby",
    version,
    about = "Keep a durable, recoverable mirror of a Berkeley DB environment streamed by tandem-primary; promote it on command."
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

// Parsed once per process: the size of the largest variant costs nothing.
#[allow(clippy::large_enum_variant)]
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
    /// Promote DIR: stop following for good, run catastrophic recovery and
    /// db_verify, record a new epoch.
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
    },
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
        /// The archive directory, created if missing.
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
        /// Skip the recovery proof of a new backup (hashes and the log chain
        /// are still checked).
        #[arg(long)]
        no_verify: bool,
        /// Where the recovery proof runs [default: the system temp directory].
        #[arg(long)]
        scratch: Option<PathBuf>,
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
        /// A backup (holds MANIFEST.json) or an archive directory.
        target: PathBuf,
        /// With an archive directory: verify every backup, not just the newest.
        #[arg(long)]
        all: bool,
        /// Where the scratch copy goes [default: the system temp directory].
        #[arg(long)]
        scratch: Option<PathBuf>,
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
        /// A backup directory, or an archive directory.
        #[arg(long)]
        from: PathBuf,
        /// The new environment home (must not exist, or be empty).
        #[arg(long, value_name = "NEWENV")]
        to: PathBuf,
        /// Restore to this time instead of the end of the backup.
        #[arg(long, value_name = "TIME")]
        until: Option<String>,
        /// Print JSON instead of text.
        #[arg(long)]
        json: bool,
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
    /// Serve the admin endpoint over plain HTTP on this address, e.g.
    /// 127.0.0.1:9401: Prometheus metrics at /metrics, the status as JSON at
    /// /status. Keep it on a private address.
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
    /// Scrub the mirror every N seconds: every page against the digests
    /// recorded when it was written, every log record up to the durable end,
    /// read at a paced 64 MiB/s. Damage makes status say not recoverable
    /// and asks the primary to heal it; 0 turns it off [default: 3600].
    #[arg(long)]
    #[serde(skip_serializing_if = "Option::is_none")]
    scrub_interval_secs: Option<u64>,
    /// Most MiB of log kept for a continuous archive (`archive --follow`)
    /// that has not copied it yet; past it the oldest are deleted, loudly,
    /// so a stopped archiver cannot fill this disk [default: 10240].
    #[arg(long)]
    #[serde(skip_serializing_if = "Option::is_none")]
    archive_hold_cap_mib: Option<u64>,
    /// Log format: human or json [default: human].
    #[arg(long)]
    #[serde(skip_serializing_if = "Option::is_none")]
    log_format: Option<LogFormat>,
    /// Discard what this directory holds once the primary's new base has
    /// fully arrived (staged beside it; the directory stays recoverable
    /// until then). Only for a standby refused as "diverged" that you chose
    /// not to promote: its transactions the primary lacks are lost. Not
    /// read from the config file, so it applies to this run only.
    #[arg(long)]
    #[serde(skip)]
    start_over: bool,
}

fn main() -> ExitCode {
    tandem_shared::keep_freed_memory();
    let cli = Cli::parse();
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
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
                println!(
                    "{}",
                    serde_json::to_string_pretty(&report).unwrap_or_default()
                );
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
                Err(anyhow::anyhow!(
                    "readiness check failed: {}",
                    report.error.unwrap_or_default()
                ))
            }
        }
        Command::Scrub { dir, json } => {
            telemetry::init(LogFormat::Human);
            scrub(&dir, json).await
        }
        Command::Promote {
            dir,
            json,
            catch_up_timeout_secs,
            force,
        } => {
            telemetry::init(LogFormat::Human);
            let opts = PromoteOptions {
                catch_up_timeout: Duration::from_secs(catch_up_timeout_secs),
                force,
            };
            let dir = StandbyDir::new(&dir);
            match tokio::task::spawn_blocking(move || promote::promote(&dir, &opts)).await {
                Ok(Ok(report)) => print_promotion(&report, json),
                Ok(Err(e)) if e.downcast_ref::<promote::Refused>().is_some() => {
                    eprintln!("tandem-standby: promote refused: {e:#}");
                    return ExitCode::from(EXIT_REFUSED_FOR_NOW);
                }
                Ok(Err(e)) => Err(e),
                Err(e) => Err(anyhow::anyhow!(e)),
            }
        }
        // clap makes --to and --release exclusive, and one of them required.
        Command::Archive {
            dir,
            to,
            release: _,
            keep,
            keep_days,
            follow,
            no_verify,
            scratch,
            json,
        } => {
            telemetry::init(LogFormat::Human);
            match to {
                None => release_archive(&dir),
                Some(to) => {
                    archive(
                        ArchiveOptions {
                            dir,
                            archive: to,
                            keep,
                            keep_days,
                            verify: !no_verify,
                            scratch,
                        },
                        follow,
                        json,
                    )
                    .await
                }
            }
        }
        Command::VerifyArchive {
            target,
            all,
            scratch,
            json,
        } => {
            telemetry::init(LogFormat::Human);
            let reports = tokio::task::spawn_blocking(move || -> Result<Vec<VerifyReport>> {
                let backups = verify::resolve_backups(&target, all)?;
                Ok(backups
                    .iter()
                    .map(|b| verify::verify_backup(b, scratch.as_deref()))
                    .collect())
            });
            match reports.await {
                Ok(Ok(reports)) => print_verify(&reports, json),
                Ok(Err(e)) => Err(e),
                Err(e) => Err(anyhow::anyhow!(e)),
            }
        }
        Command::Restore {
            from,
            to,
            until,
            json,
        } => {
            telemetry::init(LogFormat::Human);
            if let Some(t) = &until {
                if let Err(e) = archive::parse_time(t) {
                    eprintln!("tandem-standby: error: {e}");
                    return ExitCode::from(EXIT_USAGE);
                }
            }
            let opts = RestoreOptions { from, to, until };
            match tokio::task::spawn_blocking(move || restore::restore(&opts)).await {
                Ok(Ok(report)) => print_restore(&report, json),
                Ok(Err(e)) => Err(anyhow::Error::new(e)
                    .context("restore refused or failed; the target was not created")),
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
        Ok(c) => StandbyConfig {
            start_over: flags.start_over,
            ..c
        },
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
    let need = |v: Option<PathBuf>, name: &str| {
        v.with_context(|| format!("--{name} is required (or `{name}` in the config file)"))
    };
    let primary = a
        .primary
        .context("--primary is required (or `primary` in the config file)")?;
    tandem_shared::client::validate_url(&primary)?;
    let tls = TlsFiles {
        cert: need(a.cert, "cert")?,
        key: need(a.key, "key")?,
        ca: need(a.ca, "ca")?,
    };
    // Unreadable certificates are a configuration error, not a reason to retry.
    tls.client_config("check")?;
    Ok(StandbyConfig {
        dir: need(a.dir, "dir")?,
        primary,
        server_name: a.server_name,
        tls,
        name: a.name.unwrap_or_else(hostname),
        metrics_listen: a.metrics_listen,
        check_interval: match a.check_interval_secs.unwrap_or(300) {
            0 => None,
            n => Some(Duration::from_secs(n)),
        },
        rebase_after_bytes: a.rebase_after_mib.unwrap_or(1024) << 20,
        rebase_after_secs: a.rebase_after_secs.unwrap_or(0),
        scrub_interval: match a
            .scrub_interval_secs
            .unwrap_or(tandem_standby::scrub::DEFAULT_INTERVAL_SECS)
        {
            0 => None,
            n => Some(Duration::from_secs(n)),
        },
        archive_hold_cap_bytes: a
            .archive_hold_cap_mib
            .map_or(tandem_standby::archive_hold::DEFAULT_CAP_BYTES, |m| m << 20),
        start_over: false,
        primary_silence: follow::DEFAULT_PRIMARY_SILENCE,
    })
}

fn hostname() -> String {
    std::fs::read_to_string("/proc/sys/kernel/hostname")
        .map(|s| s.trim().to_owned())
        .unwrap_or_else(|_| "standby".into())
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
        println!(
            "{} is already promoted ({}, epoch {}); nothing to do",
            r.env, r.kind, r.epoch
        );
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

/// `archive --release`.
fn release_archive(dir: &Path) -> Result<()> {
    let standby = StandbyDir::new(dir);
    if !standby.meta().is_dir() {
        anyhow::bail!("{} is not a standby directory", dir.display());
    }
    tandem_standby::archive_hold::release(&standby).context("releasing the archive's hold")?;
    println!(
        "released: {} no longer holds log files for an archive",
        dir.display()
    );
    Ok(())
}

async fn archive(opts: ArchiveOptions, follow: Option<u64>, json: bool) -> Result<()> {
    match follow {
        None => match tokio::task::spawn_blocking(move || archive::archive_once(&opts)).await {
            Ok(Ok(report)) => print_archive(&report, json),
            Ok(Err(e)) => {
                Err(anyhow::Error::new(e).context("archive failed; nothing was published"))
            }
            Err(e) => Err(anyhow::anyhow!(e)),
        },
        Some(secs) => {
            let stop = Arc::new(AtomicBool::new(false));
            let flag = stop.clone();
            tokio::spawn(async move {
                tandem_shared::shutdown_signal().await;
                flag.store(true, Ordering::SeqCst);
            });
            let every = Duration::from_secs(secs);
            let rounds = tokio::task::spawn_blocking(move || {
                archive::follow(&opts, every, &stop, |r| match r {
                    Ok(report) => {
                        let _ = print_archive(report, json);
                    }
                    // Text mode: the error is already logged on stderr.
                    Err(e) if json => println!(
                        "{}",
                        serde_json::json!({ "action": "error", "error": e.to_string() })
                    ),
                    Err(_) => {}
                })
            });
            rounds.await.map_err(|e| anyhow::anyhow!(e))
        }
    }
}

fn print_archive(r: &ArchiveReport, json: bool) -> Result<()> {
    if json {
        println!("{}", serde_json::to_string(r)?);
        return Ok(());
    }
    match r.action.as_str() {
        "unchanged" => println!("{}: unchanged, log ends at {}", r.backup, r.log_end),
        action => println!(
            "{action} {}: {} files, {} bytes, log {} .. {}, {} commits ({} .. {}); {}{}",
            r.backup,
            r.files,
            r.bytes,
            r.log_start,
            r.log_end,
            r.commits,
            r.first_commit.as_deref().unwrap_or("-"),
            r.last_commit.as_deref().unwrap_or("-"),
            if r.verified {
                format!("proven recoverable (recovery {:.2} s)", r.recovery_seconds)
            } else {
                "not recovery-tested".into()
            },
            if r.removed.is_empty() {
                String::new()
            } else {
                format!("; retention deleted {}", r.removed.join(", "))
            },
        ),
    }
    Ok(())
}

fn print_verify(reports: &[VerifyReport], json: bool) -> Result<()> {
    if json {
        println!("{}", serde_json::to_string_pretty(reports)?);
    } else {
        for r in reports {
            if r.ok {
                println!(
                    "OK {}: {} files, {} bytes match the manifest; log {} .. {}; recovered to {} in {:.2} s; {} databases verified; restorable {} .. {}",
                    r.backup,
                    r.files,
                    r.bytes,
                    r.log_start,
                    r.log_end,
                    r.recovered_to.map(|l| l.to_string()).unwrap_or_else(|| "-".into()),
                    r.recovery_seconds,
                    r.databases_verified,
                    r.earliest_restore.as_deref().unwrap_or("-"),
                    r.last_commit.as_deref().unwrap_or("-"),
                );
            } else {
                println!("FAILED {}: {}", r.backup, r.error.as_deref().unwrap_or("?"));
                for p in &r.problems {
                    println!("  {p}");
                }
            }
        }
    }
    let failed = reports.iter().filter(|r| !r.ok).count();
    if failed > 0 {
        anyhow::bail!("{failed} of {} backups failed verification", reports.len());
    }
    Ok(())
}

fn print_restore(r: &RestoreReport, json: bool) -> Result<()> {
    if json {
        println!("{}", serde_json::to_string_pretty(r)?);
    } else {
        println!(
            "restored {} into {}{}: recovered to {}, {} databases verified, recovery {:.2} s, total {:.2} s\nApplications can now open {} as their environment home.",
            r.backup,
            r.target,
            r.until.as_deref().map(|u| format!(" as of {u} (last commit kept: {})", r.last_commit_kept.as_deref().unwrap_or("-"))).unwrap_or_default(),
            r.recovered_to.map(|l| l.to_string()).unwrap_or_else(|| "-".into()),
            r.databases_verified,
            r.recovery_seconds,
            r.seconds,
            r.target
        );
    }
    Ok(())
}

/// `scrub`: one unpaced pass, reading the mirror only.
async fn scrub(dir: &Path, json: bool) -> Result<()> {
    let standby = StandbyDir::new(dir);
    if !standby.meta().is_dir() {
        anyhow::bail!("{} is not a standby directory", dir.display());
    }
    let report = tokio::task::spawn_blocking(move || scrub::scrub_now(&standby)).await??;
    if json {
        println!("{}", serde_json::to_string_pretty(&report)?);
    } else if report.ok {
        println!(
            "scrub passed: {} database files ({} pages) as written, {} log files verified to {}{}",
            report.database_files,
            report.pages,
            report.log_files,
            report.log_verified_to,
            if report.recorded_now.is_empty() {
                String::new()
            } else {
                format!(
                    "; no digests were recorded for {} (recorded now)",
                    report.recorded_now.join(", ")
                )
            }
        );
    }
    if report.ok {
        return Ok(());
    }
    if !json {
        for d in &report.damage {
            println!("SCRUB FAILED: {d}");
        }
    }
    Err(anyhow::anyhow!("scrub failed: {}", report.summary()))
}
