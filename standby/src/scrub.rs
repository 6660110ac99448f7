//! Scrubbing the mirror at rest: a bit flipped on the standby's disk is
//! found while the primary can still heal it, not at promotion.
//!
//! Why a scrub is needed: a flipped byte in a database page can pass both
//! `db_verify` and the readiness check while a value silently changes, and
//! a flipped log byte fails recovery while nothing else notices. Neither
//! BDB nor the readiness check proves that the mirror still holds what the
//! primary sent. The scrub does, reading the mirror only:
//! - every page of every file of the base is compared with the digest
//!   recorded when the file was written ([`digests`]): the mirror's
//!   database files never change between bases;
//! - every log file of the base is walked as one record chain (BDB's
//!   record checksums, each record's `prev`, and each file's first record
//!   pointing at the last record of the file before) up to the durable end:
//!   log bytes before it never change.
//!
//! Pages are read past the page cache (`POSIX_FADV_DONTNEED` first), so
//! the scrub sees what the disk holds, not what was written. A failure is
//! logged (`SCRUB FAILED`), recorded in `.tandem/scrub.json`, and makes
//! status say not recoverable until a later scrub passes; inside `run`,
//! the follow loop's scrub scheduler asks the primary for what repairs it.
//!
//! One file of about 650 lines on purpose: the page pass, the log pass and
//! the report they fill share the pacing and stop logic; the digests
//! recorded at write time live in [`digests`].

pub mod digests;

use crate::state::{BaseState, StandbyDir, StandbyState};
use serde::{Deserialize, Serialize};
use std::fs::File;
use std::io;
use std::os::unix::fs::FileExt;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};
use tandem_shared::durable::ControlFileError;
use tandem_shared::logfile::{self, walk, walk_file, PERSIST_RECORD_LEN};
use tandem_shared::pages::{page_digests, read_at_most};
use tandem_shared::wirepath;
use tandem_shared::LogPosition;

/// `run --scrub-interval-secs` default: a whole pass every hour.
pub const DEFAULT_INTERVAL_SECS: u64 = 3600;
/// Read rate of a scrub inside `run`: well below what a disk gives, so the
/// log stream's fsyncs never queue behind it (64 MiB/s reads 100 GiB in
/// under half an hour).
pub const RUN_BYTES_PER_SEC: u64 = 64 << 20;
const REPORT_FILE: &str = "scrub.json";
/// Damage listed in a report; the count covers the rest.
const MAX_LISTED: usize = 20;

/// One piece of damage a scrub found.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "snake_case")]
pub enum Damage {
    /// A page differs from the digest recorded when the file was written.
    Page { file: String, page: u64 },
    /// The file's size differs from the size recorded.
    Size {
        file: String,
        recorded: u64,
        found: u64,
    },
    /// A file of the base (or its recorded digests) cannot be read.
    Unreadable { file: String, error: String },
    /// The log's record chain breaks before the durable end.
    Log {
        file: String,
        at: LogPosition,
        why: String,
    },
}

impl Damage {
    /// Damage a new base heals, not a rebase: a rebase keeps the log.
    pub fn in_log(&self) -> bool {
        matches!(self, Damage::Log { .. })
    }
}

impl std::fmt::Display for Damage {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Damage::Page { file, page } => write!(
                f,
                "{file} page {page}: differs from the digest recorded when it was written"
            ),
            Damage::Size {
                file,
                recorded,
                found,
            } => write!(f, "{file}: {found} bytes, {recorded} were written"),
            Damage::Unreadable { file, error } => write!(f, "{file}: {error}"),
            Damage::Log { file, at, why } => write!(f, "{file} at {at}: {why}"),
        }
    }
}

/// The outcome of one scrub, kept in `.tandem/scrub.json`.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct ScrubReport {
    pub ok: bool,
    pub unix_ms: u64,
    pub seconds: f64,
    /// The base scrubbed (a rebase or new base replaces what was damaged).
    pub base_id: String,
    pub database_files: usize,
    pub pages: u64,
    pub log_files: usize,
    /// The log chain verified up to here: the durable end when it is known.
    pub log_verified_to: LogPosition,
    pub bytes_read: u64,
    /// Files without recorded digests (written by an older Tandem, or
    /// installed just before a crash): digested now, checked next time.
    pub recorded_now: Vec<String>,
    /// The first damage found (at most 20), and how much there was.
    pub damage: Vec<Damage>,
    pub damage_count: u64,
    /// Scrubs of this directory that found damage, this one included.
    pub failures_total: u64,
    /// The scrub itself could not run (e.g. the state is unreadable).
    pub error: Option<String>,
}

impl ScrubReport {
    fn add(&mut self, d: Damage) {
        tracing::error!(damage = %d, "SCRUB FAILED: {d}");
        self.damage_count += 1;
        if self.damage.len() < MAX_LISTED {
            self.damage.push(d);
        }
    }

    /// One line for status and logs.
    pub fn summary(&self) -> String {
        if let Some(e) = &self.error {
            return format!("could not scrub: {e}");
        }
        let mut s = format!(
            "{} damaged: {}",
            self.damage_count,
            self.damage
                .first()
                .map(ToString::to_string)
                .unwrap_or_default()
        );
        if self.damage_count > 1 {
            s.push_str(", ...");
        }
        s
    }
}

#[derive(Debug, thiserror::Error)]
pub enum ScrubError {
    #[error(transparent)]
    State(#[from] ControlFileError),
    #[error("{what}: {source}")]
    Io { what: String, source: io::Error },
}

/// How one scrub runs.
#[derive(Debug, Clone, Default)]
pub struct ScrubOptions {
    /// The durable end of the log and the base it was read with: the chain
    /// must verify up to here. `None` when unknown (then the last file
    /// verifies up to wherever its records end, which cannot tell damage
    /// from the end). An end read with another base is ignored: a new base
    /// may have started since, and its log is shorter.
    pub durable: Option<(String, LogPosition)>,
    /// Read at most this many bytes per second (`None`: as fast as the disk).
    pub bytes_per_sec: Option<u64>,
    /// Set: stop reading and discard the scrub (`run` is shutting down; a
    /// paced pass over a large mirror must not hold up its exit).
    pub stop: Option<Arc<AtomicBool>>,
}

/// Scrubs once and records the report. `None` when it found damage while
/// the base changed under it (a rebase swapped files in): the findings may
/// describe files that are gone, so they are dropped and the caller scrubs
/// again; `None` too when stopped.
pub fn scrub_once(dir: &StandbyDir, opts: &ScrubOptions) -> Option<ScrubReport> {
    let started = Instant::now();
    let mut report = match scan(dir, opts) {
        Ok(Some(r)) => r,
        Ok(None) => {
            tracing::info!("the base changed during the scrub; its result is discarded");
            return None;
        }
        Err(e) => {
            tracing::error!(error = %e, "SCRUB FAILED: cannot scrub");
            ScrubReport {
                error: Some(e.to_string()),
                ..Default::default()
            }
        }
    };
    report.ok = report.damage_count == 0 && report.error.is_none();
    report.unix_ms = tandem_shared::now_unix_ms();
    report.seconds = started.elapsed().as_secs_f64();
    report.failures_total =
        last_report(dir).map_or(0, |r| r.failures_total) + u64::from(!report.ok);
    match serde_json::to_vec_pretty(&report) {
        Ok(bytes) => {
            if let Err(e) = digests::write_durably(&dir.meta().join(REPORT_FILE), &bytes) {
                tracing::error!(error = %e, "cannot record the scrub's report");
            }
        }
        Err(e) => tracing::error!(error = %e, "cannot encode the scrub's report"),
    }
    if report.ok {
        tracing::info!(files = report.database_files, pages = report.pages, log_files = report.log_files,
            log_verified_to = %report.log_verified_to, secs = report.seconds, "scrub passed");
    } else {
        tracing::error!(summary = %report.summary(), "SCRUB FAILED: the mirror is not recoverable until healed");
    }
    Some(report)
}

/// A one-off scrub (`tandem-standby scrub`): unpaced, up to the durable end
/// a `run` published, read again if a rebase swapped files in meanwhile.
pub fn scrub_now(dir: &StandbyDir) -> Result<ScrubReport, ScrubError> {
    let state = dir.load_state()?;
    let opts = ScrubOptions {
        durable: published_durable(dir, &state),
        ..Default::default()
    };
    for _ in 0..3 {
        if let Some(r) = scrub_once(dir, &opts) {
            return Ok(r);
        }
    }
    Err(ScrubError::Io {
        what: "scrubbing".into(),
        source: io::Error::other("the base kept changing while it was read; try again"),
    })
}

/// The last recorded scrub, if any.
pub fn last_report(dir: &StandbyDir) -> Option<ScrubReport> {
    std::fs::read(dir.meta().join(REPORT_FILE))
        .ok()
        .and_then(|b| serde_json::from_slice(&b).ok())
}

/// The durable end a running (or last) `run` published in its status, if it
/// describes the current base: what a one-off scrub must find verified.
pub fn published_durable(dir: &StandbyDir, state: &StandbyState) -> Option<(String, LogPosition)> {
    // The two fields it needs, not the status type: the scrub sits below
    // the status that reports it.
    #[derive(serde::Deserialize)]
    struct Published {
        base_id: Option<String>,
        durable_lsn: LogPosition,
    }
    let s: Published = std::fs::read(dir.status_path())
        .ok()
        .and_then(|b| serde_json::from_slice(&b).ok())?;
    let base = state.base.as_ref()?;
    (s.base_id.as_deref() == Some(base.base_id.as_str()) && s.durable_lsn >= base.log_start)
        .then(|| (base.base_id.clone(), s.durable_lsn))
}

fn scan(dir: &StandbyDir, opts: &ScrubOptions) -> Result<Option<ScrubReport>, ScrubError> {
    let state = dir.load_state()?;
    let Some(base) = state.base.clone() else {
        return Ok(Some(ScrubReport::default()));
    };
    if state.pending_swap.is_some() {
        return Ok(None);
    }
    let mut report = ScrubReport {
        base_id: base.base_id.clone(),
        ..Default::default()
    };
    let mut pacer = Pacer::new(opts.bytes_per_sec, opts.stop.clone());
    for name in &base.complete_files {
        scrub_file(dir, &base, name, &mut report, &mut pacer);
        if pacer.stopped {
            return Ok(None);
        }
    }
    let durable = opts
        .durable
        .as_ref()
        .filter(|(id, _)| *id == base.base_id)
        .map(|(_, end)| *end);
    scrub_log(dir, &state, &base, durable, &mut report, &mut pacer)?;
    if pacer.stopped {
        return Ok(None);
    }
    let now = dir.load_state()?;
    let same = now.pending_swap.is_none()
        && now
            .base
            .as_ref()
            .is_some_and(|b| b.base_id == base.base_id && b.log_start == base.log_start);
    // Damage found while files were being replaced may be the replacement
    // itself: read again. A clean pass stands (what it read matched), or a
    // large mirror under steady rebases would never finish one.
    Ok((same || report.damage_count == 0).then_some(report))
}

fn scrub_file(
    dir: &StandbyDir,
    base: &BaseState,
    name: &str,
    report: &mut ScrubReport,
    pacer: &mut Pacer,
) {
    let unreadable = |error: String| Damage::Unreadable {
        file: name.to_owned(),
        error,
    };
    let path = match wirepath::resolve_under(&dir.root, name) {
        Ok(p) => p,
        Err(e) => return report.add(unreadable(e.to_string())),
    };
    let record = match digests::load(dir, name) {
        Ok(Some(r)) if r.base_id == base.base_id => r,
        Ok(_) => {
            match digests::record_file(dir, &base.base_id, name, &path) {
                Ok(()) => {
                    tracing::warn!(file = name, "no page digests were recorded for this file: recorded them now, the next scrub checks against them");
                    report.recorded_now.push(name.to_owned());
                }
                Err(e) => report.add(unreadable(e.to_string())),
            }
            return;
        }
        Err(e) => return report.add(unreadable(e.to_string())),
    };
    let f = match File::open(&path) {
        Ok(f) => f,
        Err(e) => return report.add(unreadable(format!("cannot open: {e}"))),
    };
    report.database_files += 1;
    let found = f.metadata().map_or(0, |m| m.len());
    if found != record.size {
        report.add(Damage::Size {
            file: name.to_owned(),
            recorded: record.size,
            found,
        });
    }
    drop_cached(&f, 0, found);
    let page = record.page_size.max(1) as usize;
    let mut buf = vec![0u8; (digests::READ_CHUNK / page).max(1) * page];
    let mut at = 0u64;
    while at < found.min(record.size) {
        let n = match read_at_most(&f, &mut buf, at) {
            Ok(0) => break,
            Ok(n) => n,
            Err(e) => return report.add(unreadable(format!("read at {at}: {e}"))),
        };
        let first = at / page as u64;
        for (i, d) in page_digests(&buf[..n], page)
            .chunks(tandem_shared::pages::PAGE_DIGEST_LEN)
            .enumerate()
        {
            let n = first + i as u64;
            if record.page(n).is_some_and(|want| want != d) {
                report.add(Damage::Page {
                    file: name.to_owned(),
                    page: n,
                });
            }
        }
        report.pages += n.div_ceil(page) as u64;
        report.bytes_read += n as u64;
        pacer.pace(n as u64);
        if pacer.stopped {
            return;
        }
        at += n as u64;
    }
}

/// Walks the base's log files as one chain, up to `durable` when known.
// Long function: one walk over the chain; the previous record and the durable end are the loop's
// state.
fn scrub_log(
    dir: &StandbyDir,
    state: &StandbyState,
    base: &BaseState,
    durable: Option<LogPosition>,
    report: &mut ScrubReport,
    pacer: &mut Pacer,
) -> Result<(), ScrubError> {
    let log_dir = match state.log_dir.as_str() {
        "" => dir.root.clone(),
        rel => match wirepath::resolve_under(&dir.root, rel) {
            Ok(p) => p,
            Err(e) => {
                report.add(Damage::Unreadable {
                    file: rel.to_owned(),
                    error: e.to_string(),
                });
                return Ok(());
            }
        },
    };
    let held = held_log_files(&log_dir, base.log_start.file).map_err(|source| ScrubError::Io {
        what: format!("listing {}", log_dir.display()),
        source,
    })?;
    let Some(&last) = held.last() else {
        if let Some(end) = durable.filter(|d| *d > base.log_start) {
            report.add(Damage::Log {
                file: logfile::log_file_name(base.log_start.file),
                at: base.log_start,
                why: format!("missing: the log is durable up to {end}"),
            });
        }
        return Ok(());
    };
    let end_file = durable.map_or(last, |d| d.file.max(base.log_start.file));
    let mut expected_prev: Option<u32> = None;
    for n in base.log_start.file..=end_file {
        let name = logfile::log_file_name(n);
        let at0 = LogPosition::new(n, 0);
        let damage = |at: LogPosition, why: String| Damage::Log {
            file: name.clone(),
            at,
            why,
        };
        if n > last {
            report.add(damage(at0, "missing: the log is durable past it".into()));
            return Ok(());
        }
        let f = match File::open(log_dir.join(&name)) {
            Ok(f) => f,
            Err(e) => {
                report.add(damage(at0, format!("cannot open: {e}")));
                return Ok(());
            }
        };
        let must_reach = durable.filter(|d| d.file == n).map(|d| d.offset);
        drop_cached(&f, 0, must_reach.map_or(0, u64::from));
        let w = walk_file(&f, expected_prev).map_err(|source| ScrubError::Io {
            what: format!("reading {name}"),
            source,
        })?;
        report.log_files += 1;
        report.bytes_read += u64::from(w.end);
        report.log_verified_to = LogPosition::new(n, w.end);
        pacer.pace(u64::from(w.end));
        if pacer.stopped {
            return Ok(());
        }
        let why = || format!("{:?} after {} verified records", w.stop, w.records);
        if n < end_file {
            // The next file's first record points at this file's last one:
            // a walk that ended before it met damage, not the file's end.
            match first_record_prev(&log_dir.join(logfile::log_file_name(n + 1))) {
                Some(next_prev) if w.last_record != Some(next_prev) => {
                    report.add(damage(LogPosition::new(n, w.end), why()));
                    expected_prev = Some(next_prev);
                }
                Some(next_prev) => {
                    // The mirror writes only verified records into zeros:
                    // anything else after the last one is damage too.
                    if let Some(at) = first_non_zero(&f, w.end) {
                        report.add(damage(
                            LogPosition::new(n, at),
                            "a non-zero byte after the file's last record".into(),
                        ));
                    }
                    expected_prev = Some(next_prev);
                }
                // Damage in the next file's first record: its own walk says so.
                None => expected_prev = w.last_record,
            }
        } else if let Some(offset) = must_reach.filter(|o| w.end < *o) {
            report.add(damage(
                LogPosition::new(n, w.end),
                format!("{}, but the log is durable up to offset {offset}", why()),
            ));
        }
    }
    if let Some(d) = durable.filter(|d| report.log_verified_to > *d) {
        report.log_verified_to = d;
    }
    Ok(())
}

/// The base's log files from `first` on, while they are contiguous.
fn held_log_files(log_dir: &std::path::Path, first: u32) -> io::Result<Vec<u32>> {
    let mut numbers: Vec<u32> = std::fs::read_dir(log_dir)?
        .flatten()
        .filter_map(|e| {
            e.file_name()
                .to_str()
                .and_then(logfile::parse_log_file_name)
        })
        .filter(|n| *n >= first)
        .collect();
    numbers.sort_unstable();
    let run = numbers
        .iter()
        .enumerate()
        .take_while(|(i, n)| **n == first + *i as u32)
        .count();
    numbers.truncate(run);
    Ok(numbers)
}

/// The offset of the first non-zero byte of `f` from `from` on, if any.
fn first_non_zero(f: &File, from: u32) -> Option<u32> {
    let mut buf = vec![0u8; 1 << 20];
    let mut at = u64::from(from);
    loop {
        let n = read_at_most(f, &mut buf, at).ok()?;
        if let Some(i) = buf[..n].iter().position(|b| *b != 0) {
            return u32::try_from(at + i as u64).ok();
        }
        if n < buf.len() {
            return None;
        }
        at += n as u64;
    }
}

/// The `prev` of a log file's first record, if that record verifies.
fn first_record_prev(path: &std::path::Path) -> Option<u32> {
    let f = File::open(path).ok()?;
    let mut buf = vec![0u8; PERSIST_RECORD_LEN as usize];
    f.read_exact_at(&mut buf, 0).ok()?;
    let w = walk(&buf, 0, None);
    (w.records == 1).then(|| u32::from_le_bytes([buf[0], buf[1], buf[2], buf[3]]))
}

/// Drops the file's clean cached pages in `[offset, offset + len)` (0: to
/// the end) so the next read comes from the disk: a bit flipped at rest is
/// invisible while the page cache still holds what was written.
fn drop_cached(f: &File, offset: u64, len: u64) {
    // Advisory: a failure only means the read may come from the cache.
    let _ = rustix::fs::fadvise(
        f,
        offset,
        std::num::NonZeroU64::new(len),
        rustix::fs::Advice::DontNeed,
    );
}

/// Keeps a scrub's reads under a byte rate, and notices a stop request.
struct Pacer {
    bytes_per_sec: Option<u64>,
    started: Instant,
    bytes: u64,
    stop: Option<Arc<AtomicBool>>,
    stopped: bool,
}

/// A paced wait sleeps in slices this long, so a stop is seen quickly.
const STOP_CHECK: Duration = Duration::from_millis(100);

impl Pacer {
    fn new(bytes_per_sec: Option<u64>, stop: Option<Arc<AtomicBool>>) -> Self {
        Self {
            bytes_per_sec: bytes_per_sec.filter(|r| *r > 0),
            started: Instant::now(),
            bytes: 0,
            stop,
            stopped: false,
        }
    }

    fn pace(&mut self, n: u64) {
        self.bytes += n;
        let due = self.bytes_per_sec.map_or(Duration::ZERO, |rate| {
            Duration::from_secs_f64(self.bytes as f64 / rate as f64)
        });
        loop {
            self.stopped = self
                .stop
                .as_ref()
                .is_some_and(|s| s.load(Ordering::Relaxed));
            match due.checked_sub(self.started.elapsed()) {
                Some(wait) if !self.stopped && !wait.is_zero() => {
                    std::thread::sleep(wait.min(STOP_CHECK))
                }
                _ => return,
            }
        }
    }
}

/// `Hello.new_base_request`: why the standby needs a new base, when the
/// last scrub found damage in the log of the base it still holds.
pub fn new_base_request(dir: &StandbyDir, base_id: Option<&str>) -> String {
    let report = last_report(dir);
    new_base_reason(report.as_ref(), base_id).unwrap_or_default()
}

pub fn new_base_reason(report: Option<&ScrubReport>, base_id: Option<&str>) -> Option<String> {
    let report = report.filter(|r| !r.ok)?;
    if base_id? != report.base_id {
        return None;
    }
    let damage = report.damage.iter().find(|d| d.in_log())?;
    Some(format!("scrub found damage in {damage}"))
}

/// The status line about the last scrub.
pub fn render(report: Option<&ScrubReport>) -> String {
    let ago = |ms: u64| tandem_shared::now_unix_ms().saturating_sub(ms) as f64 / 1000.0;
    match report {
        None => "last scrub:   none yet\n".into(),
        Some(r) if r.ok => format!(
            "last scrub:   passed {:.1} s ago ({} pages, log verified to {})\n",
            ago(r.unix_ms),
            r.pages,
            r.log_verified_to
        ),
        Some(r) => format!(
            "last scrub:   FAILED {:.1} s ago: {} (healed by a rebase or new base from the primary; not recoverable until a scrub passes)\n",
            ago(r.unix_ms),
            r.summary()
        ),
    }
}

impl std::fmt::Display for ScrubReport {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        if !self.ok {
            let mut first = true;
            for d in &self.damage {
                if !first {
                    writeln!(f)?;
                }
                first = false;
                write!(f, "SCRUB FAILED: {d}")?;
            }
            return Ok(());
        }
        write!(
            f,
            "scrub passed: {} database files ({} pages) as written, {} log files verified to {}",
            self.database_files, self.pages, self.log_files, self.log_verified_to
        )?;
        if !self.recorded_now.is_empty() {
            write!(
                f,
                "; no digests were recorded for {} (recorded now)",
                self.recorded_now.join(", ")
            )?;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests;
