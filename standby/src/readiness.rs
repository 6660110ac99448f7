//! Readiness checks: proof that the mirror recovers, without touching it.
//!
//! One routine proves recoverability for everyone: [`recover_and_verify`]
//! runs catastrophic recovery on an environment directory and `db_verify`s
//! every database in it. `promote` runs it in place; the readiness check
//! ([`run_check`]) runs it on a clone made by [`clone_environment`], and
//! `verify-archive` can run it on a copy of a backup. The clone holds every
//! file of the directory except `.tandem` — exactly what promote's recovery
//! would see, old logs and nested databases included — with the log cut at
//! the durable end, so a log still being appended is cut at a record
//! boundary. Database files in the mirror never change once installed and
//! log bytes before the durable end never change, so the clone is
//! consistent even while `run` keeps streaming; a base that changes under
//! the clone (a rebase swap) makes it start over.

pub mod cold;
pub mod verified;

use crate::state::{StandbyDir, META_DIR};
use anyhow::{bail, Context, Result};
use serde::{Deserialize, Serialize};
use std::fs::File;
use std::io::{Read, Write};
use std::path::Path;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Mutex;
use std::time::{Duration, Instant};
use tandem_shared::bdb::{BdbTools, RecoveryReport};
use tandem_shared::envlayout::{is_database_part, EnvLayout, DB_CONFIG};
use tandem_shared::logfile::parse_log_file_name;
use tandem_shared::LogPosition;

const CHECK_DIR: &str = "check";
const REPORT_FILE: &str = "check.json";
/// Recovery gets a bigger cache: it halved the time to replay 1 GB of log
/// (BDB-NOTES.md §5). The clone's DB_CONFIG gets it for good; promote adds it to
/// the environment's only while its recovery runs (`db_recover` removes
/// the regions afterwards, so applications keep their own cache), and
/// thereby replays at the rate the check measured.
pub(crate) const RECOVERY_CACHE: &str = "set_cachesize 0 268435456 1";
/// A rebase swapping files in while the clone is taken makes it start
/// over; past this many tries the check reports the failure.
const CLONE_TRIES: usize = 3;
/// Replay rates of this many passing checks are kept for the estimate.
/// One check's wall time carries the CPU contention of its moment: on the
/// project's loaded 2 cores the same recovery (the same CPU seconds within
/// 7%) took 0.57 s and 1.57 s minutes apart. A median over a few checks is
/// not thrown by one of them.
pub const RATE_HISTORY: usize = 5;

#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq)]
pub struct CheckReport {
    pub ok: bool,
    pub unix_ms: u64,
    /// Whole check: clone, recovery, verify.
    pub seconds: f64,
    pub recovery_seconds: f64,
    /// `db_verify` of every database after the recovery: with the replay
    /// rate, what the status's promotion estimate is made of.
    #[serde(default)]
    pub verify_seconds: f64,
    /// CPU seconds of those `db_verify` runs, all together.
    #[serde(default)]
    pub verify_cpu_seconds: Option<f64>,
    pub durable_lsn: LogPosition,
    pub recovered_to: Option<LogPosition>,
    /// Log bytes the recovery replayed (what a promotion would replay now).
    pub log_bytes: u64,
    /// CPU seconds (user + system) the recovery used: the work itself,
    /// unlike `recovery_seconds` independent of other load on the machine.
    /// Well below `recovery_seconds`, the recovery waited for a CPU.
    #[serde(default)]
    pub recovery_cpu_seconds: Option<f64>,
    /// Replay rates (log bytes per second of recovery) of the last few
    /// passing checks, oldest first, this one included when it passed:
    /// what the status's promotion estimate takes the median of.
    #[serde(default)]
    pub replay_rates: Vec<f64>,
    /// The same checks' log bytes per CPU second of recovery: what an
    /// urgent promote replays at, whatever else the machine runs.
    #[serde(default)]
    pub replay_cpu_rates: Vec<f64>,
    pub databases_verified: usize,
    pub error: Option<String>,
    /// Where the check's [`verified::VerifiedRecord`] says the log was
    /// verified to, when it wrote one: promote then verifies only what
    /// changed since.
    #[serde(default)]
    pub verified_to: Option<LogPosition>,
    /// The share (by size) of the databases promote would still verify if
    /// no log arrived after the check, and if the log went on writing what
    /// it wrote since the last checkpoint (for the estimate).
    #[serde(default)]
    pub verify_share_idle: Option<f64>,
    #[serde(default)]
    pub verify_share_writing: Option<f64>,
    /// Why the check recorded nothing for promote to rely on, if so.
    #[serde(default)]
    pub unverified_because: Option<String>,
    /// The base the check ran on: a failure counts against that base only
    /// (status says not recoverable until a check passes or the base is
    /// replaced).
    #[serde(default)]
    pub base_id: Option<String>,
    /// What a promote's recovery reads from disk when the page cache holds
    /// none of the mirror, read once more bypassing the cache ([`cold`]):
    /// the log it replays (bytes, seconds), and the pages that log names
    /// (how many, seconds). `None` when the file system refuses uncached
    /// reads, or the log could not be read for its pages.
    #[serde(default)]
    pub cold_log_bytes: u64,
    #[serde(default)]
    pub cold_log_seconds: Option<f64>,
    #[serde(default)]
    pub cold_pages: u64,
    #[serde(default)]
    pub cold_page_seconds: Option<f64>,
    /// Promote's proof that the databases it does not verify again hold
    /// what this check verified ([`verified::BeforeRecovery::select`]: the
    /// log after the check, the pages recovery changed), rehearsed on the
    /// recovered clone: the verify phase of a promote that verifies
    /// nothing again.
    #[serde(default)]
    pub selection_seconds: Option<f64>,
    /// One small file written durably (written, fsynced, renamed, its
    /// directory fsynced), as this check wrote its verified record:
    /// promote makes a few such writes (the recovery's `DB_CONFIG` and its
    /// saved original, put back after), and under other writers' load each
    /// waits for the file system's journal.
    #[serde(default)]
    pub durable_write_seconds: Option<f64>,
}

/// What [`recover_and_verify`] proved.
#[derive(Debug, Clone)]
pub struct Proof {
    pub recovery: RecoveryReport,
    pub databases_verified: usize,
    /// Wall time of the `db_verify` runs, all databases.
    pub verify_duration: Duration,
    /// CPU time of the recovery (see [`CheckReport::recovery_cpu_seconds`]).
    pub recovery_cpu: Option<Duration>,
    /// CPU time of the `db_verify` runs, all together.
    pub verify_cpu: Option<Duration>,
}

/// Runs one check and records it in `.tandem/check.json`.
pub fn run_check(dir: &StandbyDir) -> CheckReport {
    let started = Instant::now();
    let base_id = dir
        .load_state()
        .ok()
        .and_then(|s| s.base.map(|b| b.base_id));
    let previous = last_check(dir);
    let mut report = check(dir).unwrap_or_else(|e| CheckReport {
        error: Some(format!("{e:#}")),
        base_id,
        ..Default::default()
    });
    report.replay_rates = history(
        previous.as_ref().map(|p| &p.replay_rates),
        report.replay_rate(),
    );
    report.replay_cpu_rates = history(
        previous.as_ref().map(|p| &p.replay_cpu_rates),
        report.replay_cpu_rate(),
    );
    report.unix_ms = tandem_shared::now_unix_ms();
    report.seconds = started.elapsed().as_secs_f64();
    let _ = std::fs::remove_dir_all(dir.meta().join(CHECK_DIR));
    if !report.ok {
        verified::remove(dir);
    }
    if let Ok(bytes) = serde_json::to_vec_pretty(&report) {
        let _ = tandem_shared::durable::write_file_atomic(&dir.meta().join(REPORT_FILE), &bytes);
    }
    if report.ok {
        tracing::info!(recovered_to = ?report.recovered_to, secs = report.seconds, "readiness check passed");
    } else {
        tracing::error!(
            error = report.error.as_deref().unwrap_or("?"),
            "READINESS CHECK FAILED: the standby might not recover"
        );
    }
    report
}

/// The previous check's rates, with this check's appended when it
/// measured one: the last [`RATE_HISTORY`], oldest first.
fn history(previous: Option<&Vec<f64>>, rate: Option<f64>) -> Vec<f64> {
    let mut rates = previous.cloned().unwrap_or_default();
    rates.extend(rate);
    let drop = rates.len().saturating_sub(RATE_HISTORY);
    rates.drain(..drop);
    rates
}

/// The least log a check's recovery must replay for its time to count as a
/// replay rate. Below it the time is mostly recovery's fixed costs (its
/// start, cache region, checkpoint and fsyncs), which a load on the
/// machine stretches: measured 2026-12-07 on a 4 GiB mirror, a check's
/// recovery of 0.8 MiB took 0.052 s, promote's of the same log 0.013 s
/// warm; as a "rate" of 15.6 MB/s it made the estimate 45 % high.
const TIMED_LOG_LEAST_BYTES: u64 = 16 << 20;

impl CheckReport {
    /// Log bytes per second of this check's recovery, if it passed and
    /// replayed enough log, for long enough, to time.
    pub fn replay_rate(&self) -> Option<f64> {
        (self.ok && self.recovery_seconds > 0.05 && self.log_bytes >= TIMED_LOG_LEAST_BYTES)
            .then(|| self.log_bytes as f64 / self.recovery_seconds)
    }

    /// Log bytes per CPU second of this check's recovery, likewise.
    pub fn replay_cpu_rate(&self) -> Option<f64> {
        let cpu = self.recovery_cpu_seconds?;
        (self.ok && cpu > 0.05 && self.log_bytes >= TIMED_LOG_LEAST_BYTES)
            .then(|| self.log_bytes as f64 / cpu)
    }
}

/// The last recorded check, if any.
pub fn last_check(dir: &StandbyDir) -> Option<CheckReport> {
    std::fs::read(dir.meta().join(REPORT_FILE))
        .ok()
        .and_then(|b| serde_json::from_slice(&b).ok())
}

/// The mirror cloned into `clone` while no rebase swapped its base: the
/// state and tail it was cloned at, and the signatures of the database
/// files nothing wrote meanwhile.
fn clone_settled(
    dir: &StandbyDir,
    clone: &Path,
) -> Result<(
    crate::state::StandbyState,
    crate::mirror::logwriter::LogTail,
    std::collections::BTreeMap<String, verified::Signature>,
)> {
    let mut tries = 0;
    loop {
        let state = dir.load_state()?;
        let tail = dir.scan_tail(&state)?;
        if !state.is_recoverable(tail.durable) {
            bail!("the standby is not recoverable yet (its base copy or the log it needs is incomplete)");
        }
        let before = mirror_signatures(&dir.root);
        let _ = std::fs::remove_dir_all(clone);
        clone_environment(&dir.root, Path::new(&state.log_dir), tail.durable, clone)?;
        let after = dir.load_state()?;
        if after.base == state.base && after.pending_swap == state.pending_swap {
            // Only files nothing wrote while they were cloned count as
            // verified, nor any written too recently for the ctime to tell
            // a later write apart (the kernel stamps it from a clock that
            // ticks every few milliseconds).
            let now = mirror_signatures(&dir.root);
            let settled = tandem_shared::now_unix_ms() as i128 * 1_000_000 - 1_000_000_000;
            let signatures = before
                .into_iter()
                .filter(|(n, s)| now.get(n) == Some(s) && s.ctime_ns < settled)
                .collect();
            return Ok((state, tail, signatures));
        }
        tries += 1;
        if tries >= CLONE_TRIES {
            bail!("the base changed {tries} times while it was being cloned (rebases under way); try again");
        }
    }
}

fn check(dir: &StandbyDir) -> Result<CheckReport> {
    let clone = dir.meta().join(CHECK_DIR);
    let (state, tail, signatures) = clone_settled(dir, &clone)?;
    let base = state.base.as_ref().context("no base")?;
    // At the normal priority: the check must not take the CPU from the
    // machine's other work. Its CPU seconds tell what an urgent promote
    // will take.
    let proof = recover_and_verify(&clone, &BdbTools::default())?;
    let mut report = CheckReport {
        ok: true,
        recovery_seconds: proof.recovery.duration.as_secs_f64(),
        recovery_cpu_seconds: proof.recovery_cpu.map(|d| d.as_secs_f64()),
        verify_cpu_seconds: proof.verify_cpu.map(|d| d.as_secs_f64()),
        verify_seconds: proof.verify_duration.as_secs_f64(),
        durable_lsn: tail.durable,
        recovered_to: proof.recovery.recovered_to,
        log_bytes: base.log_start.bytes_until(tail.durable, tail.lg_max),
        databases_verified: proof.databases_verified,
        base_id: Some(base.base_id.clone()),
        ..Default::default()
    };
    let recorded = verified::record(
        dir,
        &state,
        &clone,
        tail.durable,
        proof.recovery.recovered_to,
        &signatures,
    )
    .and_then(|r| {
        let started = Instant::now();
        verified::store(dir, &r)
            .map(|()| {
                report.durable_write_seconds = Some(started.elapsed().as_secs_f64());
                r
            })
            .map_err(|e| e.to_string())
    });
    match recorded {
        Ok(r) => {
            report.verified_to = Some(r.verified_to);
            report.verify_share_idle = Some(r.verify_share(true));
            report.verify_share_writing = Some(r.verify_share(false));
            report.selection_seconds = verified::rehearse_selection(
                &r,
                &clone,
                &clone.join(&state.log_dir),
                proof.recovery.recovered_to,
            )
            .ok()
            .map(|d| d.as_secs_f64());
        }
        Err(why) => {
            tracing::info!(%why, "the check recorded nothing for promote to skip: promote verifies every database");
            verified::remove(dir);
            report.unverified_because = Some(why);
        }
    }
    measure_cold_reads(&mut report, dir, &state, tail.durable);
    Ok(report)
}

/// Reads what a cold promote's recovery would read from the mirror,
/// bypassing the page cache ([`cold`]), into `report`: the log files the
/// clone held (recovery reads every one of them) and the pages the log
/// from the base's start names. A file system that refuses uncached reads
/// leaves the figures unknown.
fn measure_cold_reads(
    report: &mut CheckReport,
    dir: &StandbyDir,
    state: &crate::state::StandbyState,
    durable: LogPosition,
) {
    let log_dir = dir.log_dir(state);
    let log: Vec<(std::path::PathBuf, u64)> = EnvLayout::open(&dir.root)
        .and_then(|l| l.log_files())
        .unwrap_or_default()
        .into_iter()
        .filter(|&n| n <= durable.file)
        .filter_map(|n| {
            let path = log_dir.join(tandem_shared::logfile::log_file_name(n));
            let len = if n == durable.file {
                u64::from(durable.offset)
            } else {
                std::fs::metadata(&path).ok()?.len()
            };
            Some((path, len))
        })
        .collect();
    match cold::log_reads(&log) {
        Ok((bytes, took)) => {
            report.cold_log_bytes = bytes;
            report.cold_log_seconds = Some(took.as_secs_f64());
        }
        Err(e) => {
            tracing::info!(error = %e, "uncached reads refused: the estimate counts no cold reads");
            return;
        }
    }
    // From the start of the base's first log file, as the check's record
    // reads it (a file's start is a record boundary).
    let Some(start) = state
        .base
        .as_ref()
        .map(|b| LogPosition::new(b.log_start.file, 0))
    else {
        return;
    };
    let files: std::collections::HashMap<String, (std::path::PathBuf, u32, u64)> =
        database_names(&dir.root)
            .map(|(names, _)| names)
            .unwrap_or_default()
            .into_iter()
            .filter_map(|name| {
                let path = dir.root.join(&name);
                let uid = verified::uid_of(&path)?;
                let page_size = crate::scrub::digests::page_size_of(&path).ok()?;
                let len = std::fs::metadata(&path).ok()?.len();
                Some((uid, (path, page_size, len)))
            })
            .collect();
    let pages = match cold::pages_named(&log_dir, start, durable, &files) {
        Ok(p) => p,
        Err(why) => {
            tracing::info!(%why, "the log's pages are unknown: the estimate counts no cold page reads");
            return;
        }
    };
    if let Ok((count, took)) = cold::page_reads(&pages) {
        report.cold_pages = count;
        report.cold_page_seconds = Some(took.as_secs_f64());
    }
}

/// Signatures of the database files in the mirror at `root` (none if it
/// cannot be listed: nothing is then taken as verified).
fn mirror_signatures(root: &Path) -> std::collections::BTreeMap<String, verified::Signature> {
    database_names(root)
        .map(|(names, _)| names)
        .unwrap_or_default()
        .into_iter()
        .filter_map(|n| Some((n.clone(), verified::signature(&root.join(&n)).ok()?)))
        .collect()
}

/// Clones the environment directory `root` into `clone` (which must not
/// exist or be empty): every file except Tandem's `.tandem`, log files of
/// `log_dir` (relative to `root`) only up to `durable` (later files left
/// out, the last one cut there), and a `DB_CONFIG` with a bigger cache for
/// the recovery. Files that vanish while it runs are left out (the caller
/// checks that the base did not change).
pub fn clone_environment(
    root: &Path,
    log_dir: &Path,
    durable: LogPosition,
    clone: &Path,
) -> Result<()> {
    std::fs::create_dir_all(clone).with_context(|| format!("creating {}", clone.display()))?;
    clone_tree(root, clone, Path::new(""), log_dir, durable)?;
    let mut config = std::fs::read_to_string(clone.join(DB_CONFIG)).unwrap_or_default();
    if !config.contains("set_cachesize") {
        config.push_str(&format!("\n{RECOVERY_CACHE}\n"));
        std::fs::write(clone.join(DB_CONFIG), config)?;
    }
    Ok(())
}

fn clone_tree(
    root: &Path,
    clone: &Path,
    rel: &Path,
    log_dir: &Path,
    durable: LogPosition,
) -> Result<()> {
    let from_dir = root.join(rel);
    let entries =
        std::fs::read_dir(&from_dir).with_context(|| format!("listing {}", from_dir.display()))?;
    for entry in entries {
        let entry = entry.with_context(|| format!("listing {}", from_dir.display()))?;
        let name = entry.file_name();
        if rel.as_os_str().is_empty() && name == META_DIR {
            continue;
        }
        let child = rel.join(&name);
        let (from, to) = (root.join(&child), clone.join(&child));
        let meta = match std::fs::symlink_metadata(&from) {
            Ok(m) => m,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => continue,
            Err(e) => return Err(e).with_context(|| format!("reading {}", from.display())),
        };
        if meta.is_dir() {
            std::fs::create_dir_all(&to)?;
            clone_tree(root, clone, &child, log_dir, durable)?;
            continue;
        }
        if meta.file_type().is_symlink() {
            // Recovery would follow it; so does the clone (a link to the
            // same target), without copying what lies outside.
            let target = std::fs::read_link(&from)?;
            std::os::unix::fs::symlink(target, &to)?;
            continue;
        }
        if !meta.is_file() {
            continue;
        }
        let log_no = (rel == log_dir)
            .then(|| name.to_str().and_then(parse_log_file_name))
            .flatten();
        let limit = match log_no {
            Some(n) if n > durable.file => continue,
            Some(n) if n == durable.file => Some(u64::from(durable.offset)),
            _ => None,
        };
        match clone_file(&from, &to, limit) {
            Ok(()) => {}
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
            Err(e) => return Err(e).with_context(|| format!("cloning {}", child.display())),
        }
    }
    Ok(())
}

/// Catastrophic recovery in `home`, then `db_verify` of every database in
/// it (at any depth; partitions and queue extents through their database),
/// in parallel where there are several, with `tools` (promote's are
/// [`BdbTools::urgent`]). Writes into `home`: run it on a clone, or in
/// place only to promote.
pub fn recover_and_verify(home: &Path, tools: &BdbTools) -> Result<Proof> {
    let (recovery, recovery_cpu) = recover(home, tools)?;
    let (databases, _) = database_names(home)?;
    let (verify_duration, verify_cpu) = verify_databases(tools, home, &databases)?;
    Ok(Proof {
        recovery,
        databases_verified: databases.len(),
        verify_duration,
        recovery_cpu,
        verify_cpu,
    })
}

/// Catastrophic recovery in `home`, and its CPU time.
pub fn recover(home: &Path, tools: &BdbTools) -> Result<(RecoveryReport, Option<Duration>)> {
    let cpu_before = children_cpu();
    let recovery = tools
        .recover_catastrophic(home)
        .context("catastrophic recovery failed")?;
    let cpu = cpu_before
        .zip(children_cpu())
        .map(|(before, after)| after.saturating_sub(before));
    Ok((recovery, cpu))
}

/// The databases of the environment in `home` that `db_verify` checks
/// (partitions and queue extents through their database), largest first,
/// and whether there are such parts.
pub fn database_names(home: &Path) -> Result<(Vec<String>, bool)> {
    let files = EnvLayout::open(home)?.database_files()?;
    let has_parts = files.iter().any(|f| is_database_part(&f.name));
    let mut databases: Vec<String> = files
        .into_iter()
        .map(|f| f.name)
        .filter(|n| !is_database_part(n))
        .collect();
    // Largest first: the workers then finish together instead of one
    // starting the biggest database last.
    databases.sort_by_cached_key(|n| {
        std::cmp::Reverse(std::fs::metadata(home.join(n)).map_or(0, |m| m.len()))
    });
    Ok((databases, has_parts))
}

/// `db_verify` of `databases` in parallel: wall and CPU time.
pub fn verify_databases(
    tools: &BdbTools,
    home: &Path,
    databases: &[String],
) -> Result<(Duration, Option<Duration>)> {
    let started = Instant::now();
    let cpu_before = children_cpu();
    verify_all(tools, home, databases)?;
    let cpu = cpu_before
        .zip(children_cpu())
        .map(|(before, after)| after.saturating_sub(before));
    Ok((started.elapsed(), cpu))
}

/// User plus system CPU time of every child process reaped so far. Around
/// one `db_recover` it measures that recovery; a child another thread
/// reaps meanwhile (the standby's own `db_archive`, a few milliseconds)
/// would count too, erring high.
fn children_cpu() -> Option<Duration> {
    let mut usage = std::mem::MaybeUninit::<libc::rusage>::zeroed();
    // SAFETY: getrusage only writes the struct it is given.
    if unsafe { libc::getrusage(libc::RUSAGE_CHILDREN, usage.as_mut_ptr()) } != 0 {
        return None;
    }
    // SAFETY: it succeeded, so it filled the struct (zeroed before anyway).
    let usage = unsafe { usage.assume_init() };
    let time = |t: libc::timeval| {
        Duration::from_secs(t.tv_sec.max(0) as u64) + Duration::from_micros(t.tv_usec.max(0) as u64)
    };
    Some(time(usage.ru_utime) + time(usage.ru_stime))
}

fn verify_all(tools: &BdbTools, home: &Path, databases: &[String]) -> Result<()> {
    let workers = std::thread::available_parallelism()
        .map_or(1, |n| n.get())
        .min(databases.len())
        .max(1);
    let next = AtomicUsize::new(0);
    let failures = Mutex::new(Vec::new());
    std::thread::scope(|s| {
        for _ in 0..workers {
            s.spawn(|| loop {
                let i = next.fetch_add(1, Ordering::Relaxed);
                let Some(name) = databases.get(i) else {
                    break;
                };
                if let Err(e) = tools.verify(home, name) {
                    if let Ok(mut f) = failures.lock() {
                        f.push(format!("db_verify of {name}: {e}"));
                    }
                }
            });
        }
    });
    let mut failures = failures.into_inner().unwrap_or_default();
    failures.sort();
    if !failures.is_empty() {
        bail!("{}", failures.join("; "));
    }
    Ok(())
}

/// Clones `from` to `to`: a reflink of the whole file where possible,
/// otherwise a copy; with `limit`, only the first `limit` bytes, the rest
/// of the original size left as zeros (a hole).
fn clone_file(from: &Path, to: &Path, limit: Option<u64>) -> std::io::Result<()> {
    if let Some(parent) = to.parent() {
        std::fs::create_dir_all(parent)?;
    }
    let src = File::open(from)?;
    let size = src.metadata()?.len();
    let dst = File::create(to)?;
    if limit.is_none() {
        // FICLONE: share the blocks, copy-on-write (btrfs, xfs).
        if rustix::fs::ioctl_ficlone(&dst, &src).is_ok() {
            return Ok(());
        }
    }
    let mut reader = src.take(limit.unwrap_or(size));
    let mut writer = std::io::BufWriter::with_capacity(1 << 20, &dst);
    std::io::copy(&mut reader, &mut writer)?;
    writer.flush()?;
    drop(writer);
    dst.set_len(size)?;
    // On disk before the recovery runs: otherwise the recovery's own fsync
    // of each database writes back the whole clone, and its wall and CPU
    // time (what the promotion estimate is made of) grow with the size of
    // the environment instead of with the log (measured: 0.55 s and 0.06 s
    // of CPU for 0.4 MiB of log on a 1 GiB clone; promote's recovery of the
    // same log on the clean mirror took 0.02 s).
    dst.sync_data()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_rate_history_keeps_the_last_passing_checks() {
        let passed = |secs: f64| CheckReport {
            ok: true,
            recovery_seconds: secs,
            log_bytes: 100 << 20,
            ..Default::default()
        };
        let replay_rates = |last: Option<&CheckReport>, r: &CheckReport| {
            history(last.map(|l| &l.replay_rates), r.replay_rate())
        };
        let mut last: Option<CheckReport> = None;
        for secs in [1.0, 2.0, 4.0, 5.0, 10.0, 20.0] {
            let mut r = passed(secs);
            r.replay_rates = replay_rates(last.as_ref(), &r);
            last = Some(r);
        }
        let last = last.unwrap();
        let mib = f64::from(1 << 20);
        assert_eq!(
            last.replay_rates,
            [50.0, 25.0, 20.0, 10.0, 5.0].map(|r| r * mib).to_vec()
        );
        // A failed check, or one too short to time, keeps the history as
        // it was: a failure is not a replay rate.
        let failed = CheckReport {
            error: Some("x".into()),
            ..Default::default()
        };
        assert_eq!(replay_rates(Some(&last), &failed), last.replay_rates);
        assert_eq!(replay_rates(Some(&last), &passed(0.01)), last.replay_rates);
        assert_eq!(replay_rates(None, &passed(2.0)), vec![50.0 * mib]);
        // Nor is the time of a recovery of little log: its fixed costs.
        let short = CheckReport {
            log_bytes: 1 << 20,
            ..passed(2.0)
        };
        assert_eq!(replay_rates(Some(&last), &short), last.replay_rates);
    }

    #[test]
    fn recover_and_verify_reports_the_recovery_s_cpu_time() {
        // An empty directory recovers (BDB finds no log and writes one).
        let env = tempfile::tempdir().unwrap();
        let proof = recover_and_verify(env.path(), &BdbTools::default().urgent()).unwrap();
        let cpu = proof.recovery_cpu.expect("getrusage works on Linux");
        // A process was started and reaped: some CPU, and never more than
        // the recovery's wall time allows on the cores there are.
        let cores = std::thread::available_parallelism().map_or(1, |n| n.get());
        assert!(cpu <= proof.recovery.duration * cores as u32, "{cpu:?}");
        assert_eq!(proof.databases_verified, 0);
    }

    #[test]
    fn the_clone_holds_everything_but_tandem_state_and_cuts_the_log() {
        let root = tempfile::tempdir().unwrap();
        let out = tempfile::tempdir().unwrap();
        let r = root.path();
        std::fs::create_dir_all(r.join(".tandem/incoming")).unwrap();
        std::fs::create_dir_all(r.join("sub/deeper")).unwrap();
        std::fs::create_dir_all(r.join("logs")).unwrap();
        std::fs::write(r.join(".tandem/state"), b"s").unwrap();
        std::fs::write(r.join("sub/deeper/x.db"), b"x").unwrap();
        std::fs::write(r.join("stray.txt"), b"t").unwrap();
        std::fs::write(r.join("logs/log.0000000003"), b"old log").unwrap();
        std::fs::write(r.join("logs/log.0000000004"), b"0123456789").unwrap();
        std::fs::write(r.join("logs/log.0000000005"), b"beyond").unwrap();
        let clone = out.path().join("c");
        clone_environment(r, Path::new("logs"), LogPosition::new(4, 4), &clone).unwrap();
        assert!(!clone.join(".tandem").exists());
        assert_eq!(std::fs::read(clone.join("sub/deeper/x.db")).unwrap(), b"x");
        assert_eq!(std::fs::read(clone.join("stray.txt")).unwrap(), b"t");
        assert_eq!(
            std::fs::read(clone.join("logs/log.0000000003")).unwrap(),
            b"old log"
        );
        assert_eq!(
            std::fs::read(clone.join("logs/log.0000000004")).unwrap(),
            b"0123\0\0\0\0\0\0"
        );
        assert!(!clone.join("logs/log.0000000005").exists());
        assert!(std::fs::read_to_string(clone.join(DB_CONFIG))
            .unwrap()
            .contains("set_cachesize"));
    }
}
