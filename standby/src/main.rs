//! `tandem-standby`: parses flags and config, then hands over to the library.
//!
//! Exit codes: 0 success; 1 failure; 2 bad usage or configuration;
//! 3 refused for good (another environment, a newer primary, a promoted
//! directory, a directory already in use); 4 `promote` refused for now (the
//! primary is reachable and an application still has its environment
//! open, or the standby could not catch up with it): nothing was changed.

mod cli;

use anyhow::{Context, Result};
use clap::Parser;
use cli::{Cli, Command, RunArgs};
use serde::Serialize;
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;
use tandem_shared::telemetry::{self, LogFormat};
use tandem_shared::tls::TlsFiles;
use tandem_standby::archive::{
    self, restore, verify, ArchiveOptions, RestoreOptions, VerifyReport,
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
            full_verify,
        } => {
            telemetry::init(LogFormat::Human);
            let opts = PromoteOptions {
                catch_up_timeout: Duration::from_secs(catch_up_timeout_secs),
                force,
                full_verify,
            };
            let dir = StandbyDir::new(&dir);
            match tokio::task::spawn_blocking(move || promote::promote(&dir, &opts)).await {
                Ok(Ok(report)) => print_report(&report, json),
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
                Ok(Ok(report)) => print_report(&report, json),
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
            rejoin: flags.rejoin,
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
        check_interval: match a
            .check_interval_secs
            .unwrap_or(follow::DEFAULT_CHECK_INTERVAL_SECS)
        {
            0 => None,
            n => Some(Duration::from_secs(n)),
        },
        rebase_after_bytes: a
            .rebase_after_mib
            .unwrap_or(follow::DEFAULT_REBASE_AFTER_MIB)
            << 20,
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
        rejoin: false,
        primary_silence: follow::DEFAULT_PRIMARY_SILENCE,
        compression: a.compression.unwrap_or_default(),
    })
}

fn hostname() -> String {
    std::fs::read_to_string("/proc/sys/kernel/hostname")
        .map(|s| s.trim().to_owned())
        .unwrap_or_else(|_| "standby".into())
}

/// Prints a report as text (its `Display`) or as JSON.
fn print_report<R: Serialize + std::fmt::Display>(r: &R, json: bool) -> Result<()> {
    if json {
        println!("{}", serde_json::to_string_pretty(r)?);
    } else {
        println!("{r}");
    }
    Ok(())
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
            Ok(Ok(report)) => print_report(&report, json),
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
                    Ok(report) => match serde_json::to_string(report) {
                        Ok(line) if json => println!("{line}"),
                        _ => println!("{report}"),
                    },
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

/// `verify-archive`: every report, then a failure if any failed.
fn print_verify(reports: &[VerifyReport], json: bool) -> Result<()> {
    if json {
        println!("{}", serde_json::to_string_pretty(reports)?);
    } else {
        for r in reports {
            println!("{r}");
        }
    }
    let failed = reports.iter().filter(|r| !r.ok).count();
    if failed > 0 {
        anyhow::bail!("{failed} of {} backups failed verification", reports.len());
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
    print_report(&report, json)?;
    if report.ok {
        return Ok(());
    }
    Err(anyhow::anyhow!("scrub failed: {}", report.summary()))
}
