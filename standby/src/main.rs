//! `tandem-standby`: parses flags and config, then hands over to the library.
//!
//! Exit codes: 0 success; 1 failure; 2 bad usage or configuration;
//! 3 refused for good (another environment, a newer primary, a promoted
//! directory, a directory already in use); 4 `promote` refused for now (the
//! primary is reachable and an application still has its environment
//! open, or the standby could not catch up with it): nothing was changed;
//! 8 `switchover`: the outcome is unknown, etcd did not answer (the message
//! says what to check).

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
    self, remote, restore, verify, ArchiveOptions, Bucket, BucketOptions, BucketUrl, Location,
    RestoreOptions, VerifyReport,
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
/// `switchover` cannot tell whether the leader key moved: etcd did not answer.
const EXIT_OUTCOME_UNKNOWN: u8 = 8;

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
    let code = runtime.block_on(dispatch(cli.command));
    runtime.shutdown_timeout(tandem_shared::EXIT_GRACE);
    code
}

/// One call per subcommand; each says how it ends (an exit code).
async fn dispatch(command: Command) -> ExitCode {
    match command {
        Command::Run(flags) => run(flags).await,
        Command::Status { dir, json } => exit_with(show_status(&dir, json)),
        Command::Switchover(a) => {
            telemetry::init(LogFormat::Human);
            switchover_cmd(a).await
        }
        Command::Check { dir, json } => exit_with(check(&dir, json)),
        Command::Scrub { dir, json } => {
            telemetry::init(LogFormat::Human);
            exit_with(scrub(&dir, json).await)
        }
        Command::Promote {
            dir,
            json,
            catch_up_timeout_secs,
            force,
            full_verify,
        } => {
            let opts = PromoteOptions {
                catch_up_timeout: Duration::from_secs(catch_up_timeout_secs),
                force,
                full_verify,
                elected: false,
                handover: None,
            };
            promote_cmd(StandbyDir::new(&dir), opts, json).await
        }
        // clap makes --to and --release exclusive, and one of them required.
        Command::Archive {
            dir,
            to,
            release: _,
            keep,
            keep_days,
            follow,
            drill_every,
            no_verify,
            scratch,
            bucket,
            json,
        } => {
            telemetry::init(LogFormat::Human);
            let Some(to) = to else {
                return exit_with(release_archive(&dir));
            };
            let opts = ArchiveOptions {
                dir,
                archive: PathBuf::new(),
                keep,
                keep_days,
                verify: !no_verify,
                scratch,
                drill_every: drill_every.map(Duration::from_secs),
            };
            archive_cmd(&to, opts, bucket.into(), follow, json).await
        }
        Command::VerifyArchive {
            target,
            all,
            scratch,
            bucket,
            json,
        } => {
            telemetry::init(LogFormat::Human);
            verify_archive(target, all, scratch, bucket.into(), json).await
        }
        Command::Restore {
            from,
            to,
            until,
            bucket,
            json,
        } => {
            telemetry::init(LogFormat::Human);
            restore_cmd(from, to, until, bucket.into(), json).await
        }
    }
}

/// `check`: the readiness check, once.
fn check(dir: &Path, json: bool) -> Result<()> {
    let report = tandem_standby::readiness::run_check(&StandbyDir::new(dir));
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

/// `switchover`: exits [`EXIT_REFUSED_FOR_NOW`] when it refused and
/// changed nothing, [`EXIT_OUTCOME_UNKNOWN`] when etcd did not answer in
/// time to tell, [`EXIT_USAGE`] for bad flags or config.
async fn switchover_cmd(a: cli::SwitchoverArgs) -> ExitCode {
    let from_file = match &a.config {
        None => RunArgs::default(),
        Some(p) => match tandem_shared::config::merge_with_file(&RunArgs::default(), Some(p)) {
            Ok(r) => r,
            Err(e) => return usage_error(e),
        },
    };
    let e = from_file.cluster.clone();
    let Some(list) = a.etcd.or(e.etcd) else {
        return usage_error("--etcd is required (or `etcd` in --config)");
    };
    let Some(cluster) = a.cluster.or(e.cluster) else {
        return usage_error("--cluster is required (or `cluster` in --config)");
    };
    let options = tandem_coord::parse_endpoints(&list)
        .map_err(anyhow::Error::from)
        .and_then(|endpoints| {
            let timing = from_file.timing.timing()?;
            Ok(tandem_standby::switchover::SwitchoverOptions {
                endpoints,
                cluster,
                to: a.to,
                catch_up_timeout: Duration::from_secs(a.catch_up_timeout_secs),
                timeout: Duration::from_secs(a.timeout_secs),
                max_lag_bytes: a
                    .max_lag_bytes
                    .unwrap_or(tandem_standby::failover::DEFAULT_MAX_LAG_BYTES),
                timing,
            })
        });
    let options = match options {
        Ok(o) => o,
        Err(e) => return usage_error(format!("{e:#}")),
    };
    match tandem_standby::switchover::switchover(&options).await {
        Ok(report) => exit_with(print_report(&report, a.json)),
        Err(e)
            if e.downcast_ref::<tandem_standby::switchover::Refused>()
                .is_some() =>
        {
            eprintln!("tandem-standby: {e:#}");
            ExitCode::from(EXIT_REFUSED_FOR_NOW)
        }
        Err(e)
            if e.downcast_ref::<tandem_standby::switchover::Unknown>()
                .is_some() =>
        {
            eprintln!("tandem-standby: {e:#}");
            ExitCode::from(EXIT_OUTCOME_UNKNOWN)
        }
        Err(e) => exit_with(Err(e)),
    }
}

/// `promote`: exits [`EXIT_REFUSED_FOR_NOW`] when it refused and changed
/// nothing.
async fn promote_cmd(dir: StandbyDir, opts: PromoteOptions, json: bool) -> ExitCode {
    telemetry::init(LogFormat::Human);
    exit_with(
        match tokio::task::spawn_blocking(move || promote::promote(&dir, &opts)).await {
            Ok(Ok(report)) => print_report(&report, json),
            Ok(Err(e)) if e.downcast_ref::<promote::Refused>().is_some() => {
                eprintln!("tandem-standby: promote refused: {e:#}");
                return ExitCode::from(EXIT_REFUSED_FOR_NOW);
            }
            Ok(Err(e)) => Err(e),
            Err(e) => Err(anyhow::anyhow!(e)),
        },
    )
}

/// `archive --to`: a directory or a bucket (`opts.archive` is set here).
async fn archive_cmd(
    to: &Path,
    opts: ArchiveOptions,
    bucket: BucketOptions,
    follow: Option<u64>,
    json: bool,
) -> ExitCode {
    let result = match Location::parse(to) {
        Err(e) => return usage_error(e),
        Ok(Location::Dir(to)) => {
            archive(
                ArchiveOptions {
                    archive: to,
                    ..opts
                },
                follow,
                json,
            )
            .await
        }
        Ok(Location::Bucket(url)) => archive_bucket(&url, &bucket, opts, follow, json).await,
    };
    exit_with(result)
}

/// `verify-archive`: every backup named (in a directory or a bucket),
/// each verified.
async fn verify_archive(
    target: PathBuf,
    all: bool,
    scratch: Option<PathBuf>,
    bucket: BucketOptions,
    json: bool,
) -> ExitCode {
    let url = match Location::parse(&target) {
        Err(e) => return usage_error(e),
        Ok(Location::Bucket(url)) => Some(url),
        Ok(Location::Dir(_)) => None,
    };
    if let Some(url) = url {
        let reports = async {
            let b = Bucket::open(&url, &bucket)?;
            Ok::<_, anyhow::Error>(remote::verify_bucket(&b, all, scratch.as_deref()).await?)
        };
        return exit_with(reports.await.and_then(|r| print_verify(&r, json)));
    }
    let target = match Location::parse(&target) {
        Ok(Location::Dir(p)) => p,
        _ => target,
    };
    let reports = tokio::task::spawn_blocking(move || -> Result<Vec<VerifyReport>> {
        let backups = verify::resolve_backups(&target, all)?;
        Ok(backups
            .iter()
            .map(|b| verify::verify_backup(b, scratch.as_deref()))
            .collect())
    });
    exit_with(match reports.await {
        Ok(Ok(reports)) => print_verify(&reports, json),
        Ok(Err(e)) => Err(e),
        Err(e) => Err(anyhow::anyhow!(e)),
    })
}

/// `restore`: from a directory or a bucket; a bad `--until` is a usage
/// error ([`EXIT_USAGE`]).
async fn restore_cmd(
    from: PathBuf,
    to: PathBuf,
    until: Option<String>,
    bucket: BucketOptions,
    json: bool,
) -> ExitCode {
    if let Some(t) = &until {
        if let Err(e) = archive::parse_time(t) {
            eprintln!("tandem-standby: error: {e}");
            return ExitCode::from(EXIT_USAGE);
        }
    }
    let from = match Location::parse(&from) {
        Err(e) => return usage_error(e),
        Ok(l) => l,
    };
    let restored = match from {
        Location::Dir(from) => {
            let opts = RestoreOptions { from, to, until };
            tokio::task::spawn_blocking(move || restore::restore(&opts))
                .await
                .map_err(|e| anyhow::anyhow!(e))
                .and_then(|r| r.map_err(anyhow::Error::new))
        }
        Location::Bucket(url) => {
            let opts = RestoreOptions {
                from: PathBuf::from(url.to_string()),
                to,
                until,
            };
            async {
                let b = Bucket::open(&url, &bucket)?;
                Ok(remote::restore_from_bucket(&b, &opts).await?)
            }
            .await
        }
    };
    exit_with(
        restored
            .context("restore refused or failed; the target was not created")
            .and_then(|report| print_report(&report, json)),
    )
}

fn exit_with(result: Result<()>) -> ExitCode {
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("tandem-standby: error: {e:#}");
            ExitCode::FAILURE
        }
    }
}

fn usage_error(e: impl std::fmt::Display) -> ExitCode {
    eprintln!("tandem-standby: error: {e}");
    ExitCode::from(EXIT_USAGE)
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
    let etcd = (a.cluster.clone(), a.etcd.clone());
    let timing = a.timing.clone();
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
    let failover = match failover_config(&etcd.0, &etcd.1, &timing, &cfg) {
        Ok(f) => f,
        Err(e) => {
            eprintln!("tandem-standby: error: {e:#}");
            return ExitCode::from(EXIT_USAGE);
        }
    };
    if let Some(f) = failover {
        return run_with_etcd(cfg, f).await;
    }
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

fn failover_config(
    c: &tandem_coord::args::ClusterArgs,
    a: &cli::EtcdArgs,
    timing: &tandem_coord::timing::TimingArgs,
    cfg: &StandbyConfig,
) -> Result<Option<tandem_standby::failover::FailoverConfig>> {
    let Some(list) = &c.etcd else {
        return Ok(None);
    };
    let timing = timing.timing()?;
    if !tandem_coord::records::valid_name(&cfg.name) {
        anyhow::bail!(
            "with --etcd, --name {:?} must use letters, digits, '-', '_' and '.'",
            cfg.name
        );
    }
    Ok(Some(tandem_standby::failover::FailoverConfig {
        endpoints: tandem_coord::parse_endpoints(list)?,
        cluster: c.cluster.clone().context("--etcd needs --cluster")?,
        name: cfg.name.clone(),
        timing,
        max_lag_bytes: a
            .failover_max_lag_bytes
            .unwrap_or(tandem_standby::failover::DEFAULT_MAX_LAG_BYTES),
        on_promote: a.on_promote.clone(),
        promote_listen: a.promote_listen.context("--etcd needs --promote-listen")?,
        advertise: c.advertise_url.clone(),
    }))
}

/// `run --etcd`: follows whichever primary etcd names, and promotes by
/// itself when it wins an election or is asked for a planned switchover;
/// then becomes that primary (exec of the `tandem-primary` next to this
/// binary, which adopts the lease).
async fn run_with_etcd(
    mut cfg: StandbyConfig,
    f: tandem_standby::failover::FailoverConfig,
) -> ExitCode {
    use tandem_standby::failover::Coordinator;
    let dir = StandbyDir::new(&cfg.dir);
    let mut coord = match Coordinator::start(f.clone(), &dir).await {
        Ok(c) => c,
        Err(e) => {
            eprintln!("tandem-standby: error: cannot start with etcd: {e:#}");
            return ExitCode::FAILURE;
        }
    };
    if let Ok(Some(p)) = dir.load_state().map(|s| s.promoted) {
        return resume_promoted(&coord, &cfg, &f, &dir, p).await;
    }
    let signal = tandem_shared::shutdown_signal();
    tokio::pin!(signal);
    loop {
        match follow_until_event(&mut coord, &cfg, &dir, &mut signal).await {
            Next::Exit(code) => return code,
            Next::Follow(url) => {
                tracing::warn!(from = %cfg.primary, to = %url, "etcd names the primary that serves: following it");
                cfg.primary = url;
            }
            Next::Again => {}
            Next::Serve(p) => return serve_promoted(&coord, &cfg, &f, *p).await,
        }
    }
}

/// `run --etcd` on a directory promoted through etcd that died before it
/// served: it finishes and serves only while etcd still holds its epoch,
/// taken by itself, with nobody else on the leader key
/// ([`tandem_coord::resume::may_serve`]); otherwise it refuses (exit 3),
/// nothing changed.
async fn resume_promoted(
    coord: &tandem_standby::failover::Coordinator,
    cfg: &StandbyConfig,
    f: &tandem_standby::failover::FailoverConfig,
    dir: &StandbyDir,
    p: tandem_standby::state::Promotion,
) -> ExitCode {
    let snap = match coord.cluster.snapshot().await {
        Ok(s) => s,
        Err(e) => {
            eprintln!("tandem-standby: error: this directory was promoted (epoch {}); cannot reach etcd to learn whether it may serve: {e}", p.epoch);
            return ExitCode::FAILURE;
        }
    };
    if let Err(why) = tandem_coord::resume::may_serve(&snap.view, &f.name, p.epoch) {
        eprintln!("tandem-standby: refused: this directory was promoted ({}, epoch {}) and does not follow a primary again; it may not serve either: {why}", p.kind, p.epoch);
        return ExitCode::from(EXIT_REFUSED);
    }
    let from = coord
        .cluster
        .last_failover()
        .await
        .ok()
        .flatten()
        .filter(|r| r.kind == "switchover" && r.name == f.name && r.epoch == p.epoch);
    tracing::warn!(epoch = p.epoch, kind = %p.kind, "this directory was promoted and etcd still holds its epoch for it: finishing and serving");
    let reason = format!(
        "{} to epoch {} recorded at {} ms, finished after a restart",
        p.kind, p.epoch, p.unix_ms
    );
    let old = old_primary(cfg, from.as_ref().and_then(|r| r.from_address.clone()));
    match tandem_standby::handover::finish(
        &coord.cluster,
        dir,
        from.and_then(|r| r.from_lease),
        old,
        reason,
    )
    .await
    {
        Ok(done) => serve_promoted(coord, cfg, f, done).await,
        Err(e) => promotion_failed(coord, dir, &p.kind, &e).await,
    }
}

/// What the etcd standby does after one follower's life.
enum Next {
    Exit(ExitCode),
    Follow(String),
    /// Follow the same primary again (a switchover failed, nothing changed).
    Again,
    Serve(Box<tandem_standby::handover::Promoted>),
}

/// Runs a follower until etcd asks for something (or it ends), and does it.
async fn follow_until_event(
    coord: &mut tandem_standby::failover::Coordinator,
    cfg: &StandbyConfig,
    dir: &StandbyDir,
    signal: &mut std::pin::Pin<&mut impl std::future::Future<Output = ()>>,
) -> Next {
    use tandem_standby::failover::Event;
    let (tx, rx) = tokio::sync::oneshot::channel::<()>();
    let follower = tokio::spawn(follow::run(cfg.clone(), async {
        let _ = rx.await;
    }));
    tokio::pin!(follower);
    let event = tokio::select! {
        _ = signal.as_mut() => None,
        e = coord.next_event(dir, &cfg.primary) => Some(e),
        r = &mut follower => return Next::Exit(follower_exit(r)),
    };
    let stop = Arc::new(std::sync::Mutex::new(Some(tx)));
    let stop_follower = {
        let stop = stop.clone();
        move || {
            if let Some(tx) = stop.lock().ok().and_then(|mut t| t.take()) {
                let _ = tx.send(());
            }
        }
    };
    let next = match event {
        None => Next::Exit(ExitCode::SUCCESS),
        Some(Event::Follow(url)) => Next::Follow(url),
        Some(Event::Vacant) => {
            stop_follower();
            let _ = (&mut follower).await;
            return unfollowed_until_event(coord, dir, signal).await;
        }
        Some(Event::Won { epoch, reason }) => {
            // The follower must have released the directory first; it is
            // awaited here once, so this arm returns.
            stop_follower();
            let _ = (&mut follower).await;
            return won(coord, dir, epoch, reason).await;
        }
        Some(Event::TakenOver {
            epoch,
            from_lease,
            from_address,
        }) => {
            stop_follower();
            let _ = (&mut follower).await;
            let old = old_primary(cfg, from_address);
            return taken_over(coord, dir, epoch, from_lease, old).await;
        }
        Some(Event::Switchover(req)) => {
            let old = old_primary(cfg, None);
            let stopper = stop_follower.clone();
            let done =
                tandem_standby::handover::carry_out(coord, dir, *req, old, Box::new(stopper)).await;
            match done {
                Ok(p) => Next::Serve(Box::new(p)),
                Err(f) if !f.leader_moved => {
                    tracing::error!(error = %format!("{:#}", f.error), "the switchover failed; nothing changed: following the primary again");
                    Next::Again
                }
                Err(f) => Next::Exit(promotion_failed(coord, dir, "switchover", &f.error).await),
            }
        }
    };
    stop_follower();
    let _ = follower.await;
    next
}

/// This standby won the election (its follower stopped): promote, serve.
async fn won(
    coord: &tandem_standby::failover::Coordinator,
    dir: &StandbyDir,
    epoch: u64,
    reason: String,
) -> Next {
    match promote_elected(coord, dir, epoch, reason).await {
        Ok(p) => Next::Serve(Box::new(p)),
        Err(code) => Next::Exit(code),
    }
}

/// A take-over whose answer was lost succeeded after all (its follower
/// stopped): finish the switchover from `old`, serve.
async fn taken_over(
    coord: &tandem_standby::failover::Coordinator,
    dir: &StandbyDir,
    epoch: u64,
    from_lease: Option<i64>,
    old: tandem_standby::handover::OldPrimary,
) -> Next {
    let reason = format!(
        "planned switchover to epoch {epoch}, finished after its take-over's answer was lost"
    );
    match tandem_standby::handover::finish(&coord.cluster, dir, from_lease, old, reason).await {
        Ok(p) => Next::Serve(Box::new(p)),
        Err(e) => Next::Exit(promotion_failed(coord, dir, "switchover", &e).await),
    }
}

/// The leader key went and this standby stopped following the old
/// primary ([`tandem_standby::failover::Event::Vacant`]): rounds until it
/// wins or etcd names a primary that serves (the old one back too), then
/// follows it. A switchover or a lost take-over's answer (both need a
/// leader) are answered while following again.
async fn unfollowed_until_event(
    coord: &mut tandem_standby::failover::Coordinator,
    dir: &StandbyDir,
    signal: &mut std::pin::Pin<&mut impl std::future::Future<Output = ()>>,
) -> Next {
    use tandem_standby::failover::Event;
    tracing::info!("the leader key went: stopped following the old primary");
    loop {
        let event = tokio::select! {
            _ = signal.as_mut() => return Next::Exit(ExitCode::SUCCESS),
            e = coord.next_event(dir, "") => e,
        };
        return match event {
            Event::Vacant => continue,
            Event::Follow(url) => Next::Follow(url),
            Event::Won { epoch, reason } => won(coord, dir, epoch, reason).await,
            Event::Switchover(_) | Event::TakenOver { .. } => Next::Again,
        };
    }
}

/// How to ask the old primary whether it stopped acting: at `address`
/// (from etcd), or the primary this standby follows.
fn old_primary(
    cfg: &StandbyConfig,
    address: Option<String>,
) -> tandem_standby::handover::OldPrimary {
    tandem_standby::handover::OldPrimary {
        url: address.unwrap_or_else(|| cfg.primary.clone()),
        server_name: cfg.server_name.clone(),
        tls: cfg.tls.clone(),
    }
}

fn follower_exit(r: Result<Result<(), FollowError>, tokio::task::JoinError>) -> ExitCode {
    match r {
        Ok(Ok(())) => ExitCode::SUCCESS,
        Ok(Err(FollowError::Refused(why))) => {
            eprintln!("tandem-standby: refused: {why}");
            ExitCode::from(EXIT_REFUSED)
        }
        Ok(Err(FollowError::Other(e))) => {
            eprintln!("tandem-standby: error: {e:#}");
            ExitCode::FAILURE
        }
        Err(e) => {
            eprintln!("tandem-standby: error: {e}");
            ExitCode::FAILURE
        }
    }
}

/// The promotion after winning an election: from what is durable.
async fn promote_elected(
    coord: &tandem_standby::failover::Coordinator,
    dir: &StandbyDir,
    epoch: u64,
    reason: String,
) -> Result<tandem_standby::handover::Promoted, ExitCode> {
    let report = match tandem_standby::handover::promote_from_durable(dir).await {
        Ok(r) => r,
        Err(e) => return Err(promotion_failed(coord, dir, "election", &e).await),
    };
    if report.epoch != epoch {
        tracing::error!(
            promoted = report.epoch,
            elected = epoch,
            "the promotion's epoch differs from the elected one"
        );
    }
    Ok(tandem_standby::handover::Promoted { report, reason })
}

/// The leader key is this standby's, and its promotion failed: says so
/// everywhere an operator looks, and gives the leader key up.
async fn promotion_failed(
    coord: &tandem_standby::failover::Coordinator,
    dir: &StandbyDir,
    how: &str,
    e: &anyhow::Error,
) -> ExitCode {
    tracing::error!(error = %format!("{e:#}"), won_by = how, "the promotion FAILED after the leader key moved to this standby; the cluster needs an operator (README \"Automatic failover with etcd\")");
    coord.promotion_failed(dir, how, e).await;
    let _ = coord.cluster.revoke(coord.lease).await;
    eprintln!("tandem-standby: error: promotion failed after the leader key moved to this standby ({how}): {e:#}");
    ExitCode::FAILURE
}

/// Runs `--on-promote`, retires the member record and becomes the primary.
async fn serve_promoted(
    coord: &tandem_standby::failover::Coordinator,
    cfg: &StandbyConfig,
    f: &tandem_standby::failover::FailoverConfig,
    p: tandem_standby::handover::Promoted,
) -> ExitCode {
    let report = &p.report;
    tracing::warn!(epoch = report.epoch, kind = %report.kind, reason = %p.reason, "promoted through etcd");
    tandem_coord::test_hook::pause("before-serve").await;
    if let Some(cmd) = &f.on_promote {
        tandem_coord::hook::run(
            "on-promote",
            cmd,
            &[
                ("TANDEM_ENV", cfg.dir.display().to_string()),
                ("TANDEM_EPOCH", report.epoch.to_string()),
                ("TANDEM_FAILOVER_REASON", p.reason.clone()),
                ("TANDEM_PROMOTION_KIND", report.kind.clone()),
            ],
        )
        .await;
    }
    coord.retire_member_record().await;
    exec_primary(cfg, f)
}

/// Replaces this process with `tandem-primary run` on the promoted
/// directory; it keeps the lease alive from here on.
fn exec_primary(cfg: &StandbyConfig, f: &tandem_standby::failover::FailoverConfig) -> ExitCode {
    use std::os::unix::process::CommandExt;
    let exe = match std::env::current_exe() {
        Ok(p) => p.with_file_name("tandem-primary"),
        Err(e) => {
            eprintln!("tandem-standby: error: cannot find tandem-primary: {e}");
            return ExitCode::FAILURE;
        }
    };
    let t = f.timing;
    let mut cmd = std::process::Command::new(&exe);
    cmd.arg("run")
        .arg("--env")
        .arg(&cfg.dir)
        .arg("--listen")
        .arg(f.promote_listen.to_string())
        .arg("--cert")
        .arg(&cfg.tls.cert)
        .arg("--key")
        .arg(&cfg.tls.key)
        .arg("--ca")
        .arg(&cfg.tls.ca)
        .arg("--etcd")
        .arg(f.endpoints.join(","))
        .arg("--cluster")
        .arg(&f.cluster)
        .arg("--name")
        .arg(&f.name)
        .arg("--etcd-ttl-secs")
        .arg(t.ttl.as_secs().to_string())
        .arg("--etcd-loop-wait-ms")
        .arg(t.loop_wait.as_millis().to_string())
        .arg("--etcd-retry-timeout-ms")
        .arg(t.retry_timeout.as_millis().to_string())
        .arg("--etcd-fence-margin-ms")
        .arg(t.fence_margin.as_millis().to_string());
    if let Some(u) = &f.advertise {
        cmd.arg("--advertise-url").arg(u);
    }
    tracing::warn!(exe = %exe.display(), listen = %f.promote_listen, "serving as primary");
    let e = cmd.exec();
    eprintln!("tandem-standby: error: cannot start {}: {e}", exe.display());
    ExitCode::FAILURE
}

fn hostname() -> String {
    tandem_shared::hostname()
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
    let standby = StandbyDir::new(dir);
    let s = status::read(&standby)?;
    // Read from the file: the round's state needs no lock.
    let etcd = tandem_standby::failover::read_status(&standby);
    if json {
        // Flattened, not a serde_json::Value: the fields keep their order
        // (scripts grep the text, e.g. the switchback runbook).
        #[derive(Serialize)]
        struct WithEtcd<'a> {
            #[serde(flatten)]
            status: &'a status::StandbyStatus,
            etcd: Option<tandem_standby::failover::RoundStatus>,
        }
        let doc = WithEtcd { status: &s, etcd };
        println!("{}", serde_json::to_string_pretty(&doc)?);
    } else {
        print!("{}", status::render(&s));
        if let Some(r) = &etcd {
            let now = tandem_shared::now_unix_ms();
            print!("{}", tandem_standby::failover::render_status(r, now));
        }
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
                archive::follow(&opts, every, &stop, |r| print_round(r, json))
            });
            rounds.await.map_err(|e| anyhow::anyhow!(e))
        }
    }
}

/// `archive --to s3://…` (once; `--follow` comes in a later step).
async fn archive_bucket(
    url: &BucketUrl,
    bucket: &BucketOptions,
    opts: ArchiveOptions,
    follow: Option<u64>,
    json: bool,
) -> Result<()> {
    let b = Bucket::open(url, bucket)?;
    if let Some(secs) = follow {
        let stop = Arc::new(AtomicBool::new(false));
        let flag = stop.clone();
        tokio::spawn(async move {
            tandem_shared::shutdown_signal().await;
            flag.store(true, Ordering::SeqCst);
        });
        let every = Duration::from_secs(secs);
        return Ok(
            remote::follow_to_bucket(&opts, &b, every, &stop, |r| print_round(r, json)).await?,
        );
    }
    match remote::archive_to_bucket(&opts, &b).await {
        Ok(report) => print_report(&report, json),
        Err(e) => Err(anyhow::Error::new(e).context("archive failed; no backup was published")),
    }
}

/// One `--follow` round's outcome on stdout (one JSON object with --json).
fn print_round(r: &Result<archive::ArchiveReport, archive::ArchiveError>, json: bool) {
    match r {
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
