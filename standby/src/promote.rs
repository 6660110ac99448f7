//! Promotion: turn the mirror into an environment applications open.
//!
//! 1. Decide what kind of promotion this is, from the primary's own answer
//!    (`PrepareSwitchover`), never from a quiet log:
//!    - the recorded primary is reachable and a process still has its
//!      environment open: refuse, change nothing (an application there can
//!      still commit: promoting would split the brain), unless `--force`;
//!    - reachable and nobody has it open: catch up until the standby holds
//!      the primary's end of log, ask again, and promote as a switchover
//!      only when the primary says it is safe;
//!    - unreachable (or no primary recorded), or the promotion was won in
//!      an etcd election (the old primary is fenced): a failover from what
//!      is durable.
//!
//!    Then stop the follower.
//! 2. Take the directory for good (a promoted directory refuses `run`).
//! 3. Prove it recovers, in place: catastrophic recovery, then `db_verify`
//!    of every database the log changed since the last readiness check
//!    verified a clone, or whose file is not what that check verified
//!    ([`verified`]: every database when in any doubt, as the check does).
//! 4. Record the promotion durably with a new epoch (the fencing token)
//!    and where it began: the durable end of log X before recovery, and the
//!    digest of the last record before X. Recovery appends its own records
//!    after X (BDB-NOTES.md §4), so the new primary's log is the old one's up
//!    to X; the environment keeps its identity, and other standbys that
//!    hold no log past X follow the new primary without a new base.
//!
//! Promotion time is downtime: the report splits it into phases
//! ([`PromotePhases`]), one connection serves every question to the primary
//! ([`ask`]), the recovery gets the readiness check's cache
//! ([`recovery_cache`]) and the databases are verified in parallel.

mod ask;
mod recovery_cache;

use crate::follow::FollowConfig;
use crate::readiness::verified::{self, BeforeRecovery};
use crate::state::{Promotion, StandbyDir};
use crate::status::StandbyStatus;
use anyhow::{bail, Context, Result};
use ask::{Answer, Primary};
use recovery_cache::{boost_recovery_cache, restore_db_config};
use serde::Serialize;
use std::fs::File;
use std::time::{Duration, Instant};
use tandem_shared::wire::SwitchoverReply;
use tandem_shared::LogPosition;

/// How long promote waits to reach the recorded primary before it counts
/// as gone.
const PRIMARY_TIMEOUT: Duration = Duration::from_secs(5);
/// How often promote looks whether the standby caught up, and whether the
/// stopped standby released the directory: both are cheap reads, and every
/// interval is downtime.
const CATCH_UP_POLL: Duration = Duration::from_millis(10);
const STOP_POLL: Duration = Duration::from_millis(5);

#[derive(Debug, Clone, Serialize)]
pub struct PromoteReport {
    pub env: String,
    pub kind: String,
    pub epoch: u64,
    pub recovered_to: Option<LogPosition>,
    pub durable_lsn: LogPosition,
    pub primary_end_lsn: LogPosition,
    pub recovery_seconds: f64,
    /// CPU seconds the recovery used, as the readiness check reports them:
    /// the same work as the check's, whatever the load (BDB-NOTES.md §5).
    pub recovery_cpu_seconds: Option<f64>,
    pub total_seconds: f64,
    pub already_promoted: bool,
    pub databases_verified: usize,
    /// Databases not verified again: they hold byte for byte what the last
    /// readiness check verified ([`verified`]).
    pub databases_unchanged: usize,
    /// Why every database was verified, when it was.
    pub verified_everything_because: Option<String>,
    /// Where the time went; the phases add up to `total_seconds`.
    pub phases: PromotePhases,
}

/// Seconds spent in each step of a promote, in order. Every instant from
/// the start to the end of the promote counts in exactly one phase.
#[derive(Debug, Clone, Default, Serialize, PartialEq)]
pub struct PromotePhases {
    /// Reading the directory, and asking the primary (`PrepareSwitchover`)
    /// or finding it unreachable.
    pub ask_primary: f64,
    /// Waiting for the standby to hold the primary's end of log, and
    /// asking again (zero when it already held it).
    pub catch_up: f64,
    /// Stopping the standby running on the directory.
    pub stop_standby: f64,
    /// Taking the directory, finishing an interrupted swap, reading the
    /// durable end.
    pub finish_swap: f64,
    /// Catastrophic recovery (`db_recover -c`).
    pub recovery: f64,
    /// `db_verify` of the databases the log changed since the last
    /// verified readiness check (of every database without one).
    pub verify: f64,
    /// Recording the promotion durably.
    pub record: f64,
}

impl PromotePhases {
    pub fn sum(&self) -> f64 {
        self.ask_primary
            + self.catch_up
            + self.stop_standby
            + self.finish_swap
            + self.recovery
            + self.verify
            + self.record
    }
}

/// Splits the promote's wall time into its phases: each [`Clock::lap`]
/// charges the time since the previous one to a phase.
struct Clock {
    started: Instant,
    last: Instant,
}

impl Clock {
    fn new(started: Instant) -> Self {
        Self {
            started,
            last: started,
        }
    }

    fn lap(&mut self) -> f64 {
        let now = Instant::now();
        let d = now.duration_since(self.last).as_secs_f64();
        self.last = now;
        d
    }

    /// The time up to the last lap, so the phases add up to it exactly.
    fn total(&self) -> f64 {
        self.last.duration_since(self.started).as_secs_f64()
    }
}

pub struct PromoteOptions {
    /// How long a switchover waits for the standby to catch up.
    pub catch_up_timeout: Duration,
    /// Promote even while the primary says an application has its
    /// environment open (a failover: whatever it commits is lost).
    pub force: bool,
    /// Verify every database, even those the last readiness check proved.
    pub full_verify: bool,
    /// An etcd election made this promotion (`run --etcd`): the old
    /// primary's lease expired, so its own clock fenced it before, and it
    /// ships nothing and answers no commit wait. Promote from what is
    /// durable without asking it: a catch-up from a fenced primary can
    /// never end (found by the fault campaign: a primary cut off from etcd
    /// but not from the standbys left the winner waiting for it, its
    /// promotion failed and nobody served), and a dead machine's address
    /// may take a connect timeout to answer.
    pub elected: bool,
    /// A planned switchover through etcd, carried out by the standby
    /// running in this process ([`crate::handover`]). Promote then accepts
    /// only a switchover the primary confirmed (never a failover), stops
    /// that standby through `stop_follower` (not SIGTERM, which would reach
    /// this process), and calls `take_over` with the primary's end of log
    /// before it changes anything in the directory: an error there aborts
    /// the promote with the directory as it was.
    pub handover: Option<Handover>,
}

/// See [`PromoteOptions::handover`].
pub struct Handover {
    pub stop_follower: Box<dyn Fn() + Send + Sync>,
    pub take_over: Box<dyn Fn(LogPosition) -> Result<()> + Send + Sync>,
}

/// Promote refused to act, and changed nothing: the primary is reachable
/// and a switchover would not be safe. Retrying after the cause is removed
/// (the application stopped) can succeed, unlike a refusal for good.
#[derive(Debug, thiserror::Error)]
#[error("{0}")]
pub struct Refused(pub String);

// Long function: the promotion's steps in order (lock, pending swap, catch-up, ask the primary,
// recover, record); the order is the safety argument.
pub fn promote(dir: &StandbyDir, opts: &PromoteOptions) -> Result<PromoteReport> {
    let started = Instant::now();
    if !dir.meta().exists() {
        bail!(
            "{} is not a Tandem standby directory (no .tandem inside)",
            dir.root.display()
        );
    }
    // Only one promote at a time, for the whole procedure. The lock is on
    // the metadata directory itself, so a refused promote leaves no file
    // behind.
    let guard = File::open(dir.meta()).context("opening .tandem for the promote lock")?;
    if rustix::fs::flock(&guard, rustix::fs::FlockOperation::NonBlockingLockExclusive).is_err() {
        bail!(
            "another promote is already running on {}",
            dir.root.display()
        );
    }

    let state = dir.load_state()?;
    if let Some(p) = &state.promoted {
        return Ok(PromoteReport {
            env: dir.root.display().to_string(),
            kind: p.kind.clone(),
            epoch: p.epoch,
            recovered_to: p.recovered_to,
            durable_lsn: p.recovered_to.unwrap_or_default(),
            primary_end_lsn: LogPosition::ZERO,
            recovery_seconds: 0.0,
            recovery_cpu_seconds: None,
            total_seconds: started.elapsed().as_secs_f64(),
            already_promoted: true,
            databases_verified: 0,
            databases_unchanged: 0,
            verified_everything_because: None,
            phases: PromotePhases::default(),
        });
    }

    let mut clock = Clock::new(started);
    let mut phases = PromotePhases::default();
    let (kind, primary_end, child) = decide(dir, opts, &mut clock, &mut phases)?;
    if let Some(h) = &opts.handover {
        if kind != "switchover" {
            stop_child(child);
            return Err(Refused(
                "the primary did not confirm a switchover (it became unreachable): nothing was changed. If it died, automatic failover takes over once its lease expires".into(),
            )
            .into());
        }
        (h.stop_follower)();
        stop_running(dir, child, false)?;
        (h.take_over)(primary_end)?;
    } else {
        stop_running(dir, child, true)?;
    }
    phases.stop_standby = clock.lap();
    let _lock = dir.lock().context("taking the standby directory")?;
    crate::mirror::finish_interrupted_swap(dir)?;
    // A promote that died during its recovery left the bigger cache in.
    restore_db_config(dir)?;
    let mut state = dir.load_state()?;
    let tail = dir.scan_tail(&state)?;
    if !state.is_recoverable(tail.durable) {
        bail!(
            "the standby is not recoverable yet: {}; nothing was changed",
            match &state.base {
                None => "it holds no base".to_owned(),
                Some(b) if !b.files_done => "its base copy is incomplete".to_owned(),
                Some(b) => format!(
                    "its log ends at {} but the base needs it up to {}",
                    tail.durable,
                    b.consistent_at.unwrap_or_default()
                ),
            }
        );
    }
    phases.finish_swap = clock.lap();
    // Which files still hold what the last readiness check verified: read
    // before recovery writes into them.
    let (before, has_parts) = crate::readiness::database_names(&dir.root)?;
    let pending = if opts.full_verify {
        BeforeRecovery::everything("--full-verify")
    } else {
        verified::before_recovery(dir, &state, &before, has_parts)
    };
    tracing::info!(%kind, durable = %tail.durable, "running catastrophic recovery");
    let boosted = boost_recovery_cache(dir)?;
    // Promotion time is downtime: its recovery goes ahead of other work.
    let tools = tandem_shared::bdb::BdbTools::default().urgent();
    let recovered = crate::readiness::recover(&dir.root, &tools);
    if boosted {
        restore_db_config(dir)?;
    }
    const UNPROVEN: &str =
        "the directory did not prove recoverable; it is left as it was after recovery ran";
    let (recovery, recovery_cpu) = recovered.context(UNPROVEN)?;
    // The recovery phase is BDB's own time; the rest of the lap (restoring
    // DB_CONFIG) counts with the verify.
    let lap = clock.lap();
    phases.recovery = recovery.duration.as_secs_f64().min(lap);
    let (databases, _) = crate::readiness::database_names(&dir.root)?;
    let selection = pending.select(
        &dir.root,
        &dir.log_dir(&state),
        recovery.recovered_to,
        &databases,
    );
    match &selection.everything_because {
        Some(why) => tracing::info!(%why, databases = databases.len(), "verifying every database"),
        None => tracing::info!(
            verify = ?selection.verify, skipped = selection.skipped.len(),
            "verifying the databases changed since the last verified readiness check"
        ),
    }
    crate::readiness::verify_databases(&tools, &dir.root, &selection.verify).context(UNPROVEN)?;
    phases.verify = clock.lap() + (lap - phases.recovery);
    let epoch = state.epoch + 1;
    state.epoch = epoch;
    state.history.retain(|e| e.epoch < epoch);
    state.history.push(tandem_shared::epochs::EpochStart {
        epoch,
        start: tail.durable,
        prev_record_digest: tail.last_record_digest.clone(),
    });
    state.promoted = Some(Promotion {
        epoch,
        unix_ms: tandem_shared::now_unix_ms(),
        kind: kind.clone(),
        recovered_to: recovery.recovered_to,
    });
    dir.store_state(&state)?;
    phases.record = clock.lap();
    let p = &phases;
    tracing::info!(
        %kind, epoch, starts_at = %tail.durable, recovered_to = ?recovery.recovered_to,
        history = %tandem_shared::epochs::describe(&state.history), total_s = clock.total(),
        ask_primary_s = p.ask_primary, catch_up_s = p.catch_up, stop_standby_s = p.stop_standby,
        finish_swap_s = p.finish_swap, recovery_s = p.recovery, verify_s = p.verify, record_s = p.record,
        "promoted"
    );
    Ok(PromoteReport {
        env: dir.root.display().to_string(),
        kind,
        epoch,
        recovered_to: recovery.recovered_to,
        durable_lsn: tail.durable,
        primary_end_lsn: primary_end,
        recovery_seconds: recovery.duration.as_secs_f64(),
        recovery_cpu_seconds: recovery_cpu.map(|d| d.as_secs_f64()),
        total_seconds: clock.total(),
        already_promoted: false,
        databases_verified: selection.verify.len(),
        databases_unchanged: selection.skipped.len(),
        verified_everything_because: selection.everything_because,
        phases,
    })
}

fn follow_config(dir: &StandbyDir) -> Result<Option<FollowConfig>> {
    match std::fs::read(dir.meta().join(crate::follow::FOLLOW_CONFIG_FILE)) {
        Ok(bytes) => Ok(Some(
            serde_json::from_slice(&bytes).context("reading .tandem/follow.json")?,
        )),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
        Err(e) => Err(e).context("reading .tandem/follow.json"),
    }
}

/// What promote does next: the kind, the primary's end, and the catch-up
/// standby promote started, if any (the caller stops whatever runs).
type Decision = (String, LogPosition, Option<std::process::Child>);

/// Decides switchover or failover (or refuses), catching up first when
/// the primary is reachable and nobody has its environment open.
fn decide(
    dir: &StandbyDir,
    opts: &PromoteOptions,
    clock: &mut Clock,
    phases: &mut PromotePhases,
) -> Result<Decision> {
    let status = crate::status::read(dir)?;
    if opts.elected {
        tracing::warn!("elected through etcd: the old primary is fenced; promoting with what is durable (failover)");
        phases.ask_primary = clock.lap();
        return Ok(("failover".into(), status.primary_end_lsn, None));
    }
    let Some(fc) = follow_config(dir)? else {
        tracing::warn!(
            "no primary is recorded for this directory: promoting with what is durable (failover)"
        );
        phases.ask_primary = clock.lap();
        return Ok(("failover".into(), status.primary_end_lsn, None));
    };
    let mut primary = Primary::new(&fc);
    let answer = primary.ask(status.durable_lsn);
    phases.ask_primary = clock.lap();
    let reply = match answer {
        Answer::Unreachable(why) => {
            tracing::warn!(primary = %fc.primary, error = %why, "the primary is unreachable: promoting with what is durable (failover)");
            return Ok(("failover".into(), status.primary_end_lsn, None));
        }
        Answer::Reply(r) => r,
    };
    let state = dir.load_state()?;
    if let Some(ours) = state.env_id.as_ref().filter(|id| **id != reply.env_id) {
        if !opts.force {
            return Err(Refused(format!(
                "the primary at {} now serves another environment ({}, this standby mirrors {ours}): it cannot confirm a switchover of this one. Nothing was changed; check which machine is the primary, or use --force to fail over from what is durable",
                fc.primary, reply.env_id
            ))
            .into());
        }
        tracing::error!(primary = %fc.primary, theirs = %reply.env_id, %ours, "FORCED PROMOTION: the recorded primary serves another environment; promoting as a failover");
        return Ok(("failover".into(), status.primary_end_lsn, None));
    }
    if !reply.env_users.is_empty() {
        return refuse_or_force(opts, &fc, &reply, None);
    }
    if reply.safe {
        return Ok(("switchover".into(), end_of(&reply), None));
    }
    let decision = catch_up(dir, opts, &fc, &mut primary, end_of(&reply));
    phases.catch_up = clock.lap();
    decision
}

/// Nobody can commit on the primary any more: waits until the standby
/// holds the rest (starting one when none runs), then asks again.
fn catch_up(
    dir: &StandbyDir,
    opts: &PromoteOptions,
    fc: &FollowConfig,
    primary: &mut Primary,
    mut target: LogPosition,
) -> Result<Decision> {
    let child = match dir.lock_holder() {
        Some(_) => None,
        None => Some(spawn_catch_up(dir, fc)?),
    };
    let pid = dir
        .lock_holder()
        .context("the standby stopped during the catch-up")?;
    let since = tandem_shared::now_unix_ms();
    let deadline = Instant::now() + opts.catch_up_timeout;
    tracing::info!(primary = %fc.primary, end = %target, "no application has the primary's environment open: catching up for a switchover");
    loop {
        if Instant::now() >= deadline {
            stop_child(child);
            return Err(Refused(format!(
                "the standby did not catch up with the primary's end of log ({target}) within {} s; the primary is reachable, so promote did not fail over. Nothing was promoted; retry, raise --catch-up-timeout-secs, or use --force for a failover from what is durable",
                opts.catch_up_timeout.as_secs()
            ))
            .into());
        }
        let s: StandbyStatus = crate::status::read(dir)?;
        // Only a status written by that process since promote began counts.
        if s.pid != Some(pid) || s.updated_unix_ms < since || s.durable_lsn < target {
            if dir.lock_holder() != Some(pid) {
                bail!("the standby (pid {pid}) stopped during the catch-up; nothing was promoted");
            }
            // The status file is rewritten every 200 ms and is cheap to
            // read: a short poll costs little and wastes no downtime.
            std::thread::sleep(CATCH_UP_POLL);
            continue;
        }
        match primary.ask(s.durable_lsn) {
            Answer::Unreachable(why) => {
                tracing::warn!(error = %why, "the primary became unreachable during the catch-up: promoting with what is durable (failover)");
                return Ok(("failover".into(), target, child));
            }
            Answer::Reply(r) if !r.env_users.is_empty() => {
                return refuse_or_force(opts, fc, &r, child);
            }
            Answer::Reply(r) if r.safe => {
                return Ok(("switchover".into(), end_of(&r), child));
            }
            Answer::Reply(r) => target = end_of(&r).max(target),
        }
    }
}

fn end_of(reply: &SwitchoverReply) -> LogPosition {
    reply.end.map(Into::into).unwrap_or_default()
}

/// An application has the primary's environment open: refuse, or with
/// `--force` fail over anyway.
fn refuse_or_force(
    opts: &PromoteOptions,
    fc: &FollowConfig,
    reply: &SwitchoverReply,
    child: Option<std::process::Child>,
) -> Result<Decision> {
    let users = reply.env_users.join(", ");
    if opts.force {
        tracing::error!(primary = %fc.primary, %users, "FORCED PROMOTION while the primary's environment is open by {users}: promoting as a failover; anything they commit from now on is lost, and both environments accept writes until they are stopped");
        return Ok(("failover".into(), end_of(reply), child));
    }
    // A standby promote started for the catch-up goes; one the operator
    // runs keeps following.
    stop_child(child);
    Err(Refused(format!(
        "the primary ({}) is reachable and its environment is still open by {users}: an application there can still commit, and promoting now would leave two writable primaries. Stop the application on the primary machine, then run promote again (or use --force to promote anyway, losing what it commits). Nothing was changed. ({})",
        fc.primary, reply.reason
    ))
    .into())
}

/// Stops the standby running on the directory, if any (SIGTERM when
/// `signal`; otherwise it was asked to stop already), and waits until it
/// released it; reaps `child` if promote started it.
fn stop_running(dir: &StandbyDir, child: Option<std::process::Child>, signal: bool) -> Result<()> {
    if let Some(pid) = dir.lock_holder() {
        // The pid that holds our directory's lock.
        if signal {
            terminate(pid);
        }
        let stop_deadline = Instant::now() + Duration::from_secs(30);
        while dir.lock_holder().is_some() {
            if Instant::now() > stop_deadline {
                bail!("the running standby (pid {pid}) did not stop within 30 s");
            }
            std::thread::sleep(STOP_POLL);
        }
    }
    if let Some(mut c) = child {
        let _ = c.wait();
    }
    Ok(())
}

/// Stops the catch-up standby promote started, if any (SIGTERM: it
/// finishes what it is writing and releases the directory).
fn stop_child(child: Option<std::process::Child>) {
    if let Some(mut c) = child {
        terminate(c.id());
        let _ = c.wait();
    }
}

/// Starts `tandem-standby run` with the configuration the directory last
/// followed with, to fetch what the primary still has.
fn spawn_catch_up(dir: &StandbyDir, fc: &FollowConfig) -> Result<std::process::Child> {
    let log = File::create(dir.meta().join("promote-catch-up.log"))?;
    let mut cmd = std::process::Command::new(std::env::current_exe()?);
    cmd.arg("run").arg("--dir").arg(&dir.root).args([
        "--primary",
        &fc.primary,
        "--name",
        &fc.name,
        "--check-interval-secs",
        "0",
    ]);
    cmd.arg("--cert")
        .arg(&fc.tls.cert)
        .arg("--key")
        .arg(&fc.tls.key)
        .arg("--ca")
        .arg(&fc.tls.ca);
    if let Some(n) = &fc.server_name {
        cmd.args(["--server-name", n]);
    }
    tracing::info!(primary = %fc.primary, "no standby runs on this directory: starting one to fetch what the primary still has");
    let child = cmd
        .stdin(std::process::Stdio::null())
        .stdout(log.try_clone()?)
        .stderr(log)
        .spawn()
        .context("starting the catch-up standby")?;
    let deadline = Instant::now() + Duration::from_secs(60);
    while dir.lock_holder() != Some(child.id()) {
        if Instant::now() > deadline {
            bail!(
                "the catch-up standby did not start; see {}",
                dir.meta().join("promote-catch-up.log").display()
            );
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    Ok(child)
}

impl std::fmt::Display for PromoteReport {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        if self.already_promoted {
            return write!(
                f,
                "{} is already promoted ({}, epoch {}); nothing to do",
                self.env, self.kind, self.epoch
            );
        }
        writeln!(
            f,
            "promoted {} ({}): epoch {}, recovered to {}, {} databases verified ({} unchanged since the last readiness check), recovery {:.2} s, total {:.2} s",
            self.env,
            self.kind,
            self.epoch,
            self.recovered_to.map(|l| l.to_string()).unwrap_or_else(|| "-".into()),
            self.databases_verified,
            self.databases_unchanged,
            self.recovery_seconds,
            self.total_seconds,
        )?;
        let p = &self.phases;
        writeln!(
            f,
            "time: ask primary {:.2} s, catch-up {:.2} s, stop standby {:.2} s, finish swap {:.2} s, recovery {:.2} s, verify {:.2} s, record {:.2} s",
            p.ask_primary, p.catch_up, p.stop_standby, p.finish_swap, p.recovery, p.verify, p.record
        )?;
        write!(
            f,
            "Applications can now open {} as their environment home.",
            self.env
        )
    }
}

/// Asks process `pid` to stop (SIGTERM); one already gone is fine.
fn terminate(pid: u32) {
    if let Some(pid) = i32::try_from(pid)
        .ok()
        .and_then(rustix::process::Pid::from_raw)
    {
        let _ = rustix::process::kill_process(pid, rustix::process::Signal::TERM);
    }
}
