//! The scrub inside `run` ([`crate::scrub`] does the checking): when it runs, and what it asks the primary for
//! when it finds damage.
//!
//! - Damage in a database file is healed by a rebase: the standby sends the
//!   digests of its pages as they are now, damaged ones included, so the
//!   primary re-sends every page that differs, and the swap replaces the
//!   damaged file whole. Asked for at once, and again every minute until a
//!   rebase is under way.
//! - Damage in the log needs a new base (a rebase keeps the log from its
//!   boundary on): the standby reconnects and says so in
//!   `Hello.new_base_request`.
//!
//! After a rebase or new base swapped in, the scrub runs again at once:
//! status says recoverable only once a scrub passed.

use super::StatusTx;
use crate::mirror::Mirror;
use crate::scrub::{self, last_report, scrub_once, ScrubOptions, ScrubReport, RUN_BYTES_PER_SEC};
use crate::state::StandbyDir;
use crate::status::StandbyStatus;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};
use tandem_shared::LogPosition;
use tokio::sync::watch;

/// A heal request not answered by a rebase is asked again after this.
const HEAL_RETRY: Duration = Duration::from_secs(60);
/// How often the scheduler looks at the time, the base and the report
/// file (a one-off `tandem-standby scrub` may have written one).
const POLL: Duration = Duration::from_secs(1);
/// A scrub discarded because the base changed under it is retried after
/// this: soon, since under steady rebases (one a second in tests) a longer
/// wait meant hardly any scrub completed.
const DISCARDED_RETRY: Duration = Duration::from_secs(1);
/// The first scrub of a process waits this long (or the interval, if
/// shorter): a `run` that is refused at its first contact (another
/// environment, a newer epoch) leaves the directory as it found it.
const STARTUP_GRACE: Duration = Duration::from_secs(30);

/// Stops the scrub under way when the scheduler is dropped (aborted).
struct StopOnDrop(Arc<AtomicBool>);

impl Drop for StopOnDrop {
    fn drop(&mut self) {
        self.0.store(true, Ordering::Relaxed);
    }
}

type Live = watch::Receiver<StandbyStatus>;

/// Looks at the last scrub without copying it: this runs after every batch
/// the session applies.
fn with_scrub<T>(live: &Live, f: impl FnOnce(&ScrubReport) -> Option<T>) -> Option<T> {
    live.borrow().scrub.as_ref().and_then(f)
}

/// Scrubs the mirror every `every`, counted from the last recorded scrub
/// (a restart does not postpone it), once the base's files are complete;
/// at once after a failed scrub when the base has changed since (a rebase
/// healed it, or not). Runs until `stop`, which stops a scrub under way.
pub async fn scrub_forever(
    dir: StandbyDir,
    status: StatusTx,
    every: Duration,
    mut stop_signal: watch::Receiver<bool>,
) {
    let mut tick = tokio::time::interval(POLL);
    let mut not_before = Instant::now() + every.min(STARTUP_GRACE);
    let stop = Arc::new(AtomicBool::new(false));
    let _stop_on_drop = StopOnDrop(stop.clone());
    loop {
        tokio::select! {
            _ = tick.tick() => {}
            _ = stop_signal.wait_for(|s| *s) => return,
        }
        let on_disk = last_report(&dir);
        let mut current = None;
        status.send_if_modified(|s| {
            // A one-off scrub's newer report counts here too.
            let newer = on_disk.as_ref().map(|r| r.unix_ms) > s.scrub.as_ref().map(|r| r.unix_ms);
            if newer {
                s.scrub = on_disk.clone();
                s.recoverable &= on_disk.as_ref().is_none_or(|r| r.ok);
            }
            current = Some((
                s.scrub.clone(),
                s.base_id.clone().unwrap_or_default(),
                !matches!(s.phase.as_str(), "no base" | "copying base" | "promoted"),
                s.durable_lsn,
            ));
            newer
        });
        let Some((current, base_id, complete, durable)) = current else {
            return;
        };
        if !complete || Instant::now() < not_before {
            continue;
        }
        let due = match &current {
            None => true,
            Some(r) if !r.ok && r.base_id != base_id => true,
            Some(r) => {
                tandem_shared::now_unix_ms().saturating_sub(r.unix_ms) >= every.as_millis() as u64
            }
        };
        if !due {
            continue;
        }
        let (d, opts) = (
            dir.clone(),
            ScrubOptions {
                durable: Some((base_id, durable)).filter(|(_, d)| *d > LogPosition::ZERO),
                bytes_per_sec: Some(RUN_BYTES_PER_SEC),
                stop: Some(stop.clone()),
            },
        );
        match tokio::task::spawn_blocking(move || scrub_once(&d, &opts)).await {
            Ok(Some(report)) => status.send_modify(|s| {
                s.recoverable &= report.ok;
                s.scrub = Some(report);
            }),
            Ok(None) | Err(_) => not_before = Instant::now() + DISCARDED_RETRY,
        }
    }
}

/// The last scrub found damage in a database file of the current base and
/// no rebase is under way: ask for one now (or again, after `HEAL_RETRY`).
/// `asked` is the session's time of its last rebase request, scheduled or
/// not: two requests in flight would make the primary answer the second
/// with page digests of files the first one has since replaced.
///
/// Returns the `log_start` to put in the request: one file before the
/// base's start. The primary skips a rebase that would start no later than
/// `log_start` (pointless for a scheduled rebase); a heal needs one even at
/// the same boundary, and must never get one that starts earlier than the
/// log the standby holds, which this still refuses.
pub fn rebase_due(
    live: &Live,
    mirror: &Mirror,
    asked: &mut Option<Instant>,
) -> Option<LogPosition> {
    let base = mirror.state.base.as_ref().filter(|b| b.files_done)?;
    let damaged_db = with_scrub(live, |r| {
        let found = !r.ok && r.base_id == base.base_id && r.damage.iter().any(|d| !d.in_log());
        found.then_some(())
    });
    if damaged_db.is_none() || mirror.rebase.is_some() {
        return None;
    }
    if asked.is_some_and(|at| at.elapsed() < HEAL_RETRY) {
        return None;
    }
    *asked = Some(Instant::now());
    tracing::warn!(base = %base.base_id, "the scrub found damage in a database file: asking the primary for a rebase to heal it");
    Some(LogPosition::new(base.log_start.file.saturating_sub(1), 0))
}

/// The scrub found log damage since this session's Hello, which did not ask
/// for a new base: end the session so the next Hello asks. Only once the
/// recorded report says so, or the next Hello would not ask either.
pub fn reconnect_for_new_base(live: &Live, mirror: &Mirror, asked: &str) -> Option<String> {
    if !asked.is_empty() {
        return None;
    }
    let base_id = mirror.state.base.as_ref().map(|b| b.base_id.as_str());
    with_scrub(live, |r| scrub::new_base_reason(Some(r), base_id))?;
    let why = scrub::new_base_request(&mirror.dir, base_id);
    (!why.is_empty()).then(|| format!("reconnecting to ask for a new base: {why}"))
}
