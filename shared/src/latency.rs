//! Timing the log's path, stage by stage: a stage stamps the log positions
//! it reached with the moment it reached them ([`Stamps`]); a later stage
//! that covers a position takes the stamps up to it and observes, for each,
//! the time in between into a histogram. Both daemons serve those
//! histograms as metrics, so an operator (or the bench) can see which stage
//! of commit → durable carries the tail: the primary's log watcher, the
//! session's send, the standby's write and fsync, its ack, the commit
//! waiter's wake-up.
//!
//! The hot path pays one short lock and a few atomic adds per chunk or
//! ack; the queue of stamps is bounded, so a stage that never comes (a
//! standby that went away) costs nothing but the oldest stamps.

use crate::metrics::{exponential_buckets, Histogram};
use crate::LogPosition;
use std::collections::VecDeque;
use std::sync::Mutex;
use std::time::{Duration, Instant};

/// Stamps kept at most; beyond that the oldest go (they are then not
/// timed). At 20,000 commits/s a stage would have to trail by a second.
const MAX_STAMPS: usize = 16_384;

/// A histogram of stage latencies: 100 µs to ~3 s in steps of 1.5×,
/// fine enough to tell a 5 ms p99 from a 10 ms one.
pub fn stage_histogram() -> Histogram {
    Histogram::new(exponential_buckets(0.0001, 1.5, 26))
}

/// Log positions and when a stage reached them, oldest first.
#[derive(Debug, Default)]
pub struct Stamps {
    queue: Mutex<VecDeque<(LogPosition, Instant)>>,
}

impl Stamps {
    /// Notes that the stage reached `pos` at `at`. A position at or below
    /// the newest stamp is ignored (the first moment counts).
    pub fn stamp(&self, pos: LogPosition, at: Instant) {
        let Ok(mut q) = self.queue.lock() else { return };
        if q.back().is_some_and(|(p, _)| *p >= pos) {
            return;
        }
        if q.len() >= MAX_STAMPS {
            q.pop_front();
        }
        q.push_back((pos, at));
    }

    /// A later stage covers everything up to `pos` (inclusive) at `now`:
    /// removes those stamps and observes each one's wait into `h`. Returns
    /// how many were observed.
    pub fn reached(&self, pos: LogPosition, now: Instant, h: &Histogram) -> usize {
        let Ok(mut q) = self.queue.lock() else {
            return 0;
        };
        let mut n = 0;
        while let Some(&(p, at)) = q.front() {
            if p > pos {
                break;
            }
            q.pop_front();
            h.observe(secs(now.saturating_duration_since(at)));
            n += 1;
        }
        n
    }

    /// Observes, for each stamp beyond `after` up to `upto` (inclusive),
    /// the time until `now`, and keeps the stamps (another stage times
    /// them again later). Returns how many were observed.
    pub fn observe_between(
        &self,
        after: LogPosition,
        upto: LogPosition,
        now: Instant,
        h: &Histogram,
    ) -> usize {
        let Ok(q) = self.queue.lock() else { return 0 };
        let start = q.partition_point(|(p, _)| *p <= after);
        let mut n = 0;
        for &(p, at) in q.range(start..) {
            if p > upto {
                break;
            }
            h.observe(secs(now.saturating_duration_since(at)));
            n += 1;
        }
        n
    }

    /// Forgets every stamp (a session ended: what it sent will not be acked).
    pub fn clear(&self) {
        if let Ok(mut q) = self.queue.lock() {
            q.clear();
        }
    }

    pub fn len(&self) -> usize {
        self.queue.lock().map(|q| q.len()).unwrap_or(0)
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

/// The moment something last happened (an ack arrived, a position was
/// published), for the stage that reacts to it.
#[derive(Debug, Default)]
pub struct LastEvent {
    at: Mutex<Option<(LogPosition, Instant)>>,
}

impl LastEvent {
    pub fn set(&self, pos: LogPosition, at: Instant) {
        if let Ok(mut a) = self.at.lock() {
            *a = Some((pos, at));
        }
    }

    /// When the last event happened, if it was at `pos` or beyond.
    pub fn at_or_beyond(&self, pos: LogPosition) -> Option<Instant> {
        let a = self.at.lock().ok()?;
        a.filter(|(p, _)| *p >= pos).map(|(_, at)| at)
    }
}

fn secs(d: Duration) -> f64 {
    d.as_secs_f64()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn count(h: &Histogram) -> u64 {
        // The sum of the bucket counts, through the text encoding the
        // metrics page uses.
        let mut page = crate::metrics::MetricsPage::default();
        page.histogram("h", "test", h);
        page.finish()
            .lines()
            .find_map(|l| l.strip_prefix("h_count "))
            .and_then(|v| v.trim().parse().ok())
            .unwrap_or(0)
    }

    #[test]
    fn a_later_stage_times_each_stamp_it_covers_once() {
        let s = Stamps::default();
        let t0 = Instant::now();
        let at = |f, o| LogPosition::new(f, o);
        s.stamp(at(1, 100), t0);
        s.stamp(at(1, 200), t0);
        // Not beyond the newest: ignored.
        s.stamp(at(1, 150), t0);
        s.stamp(at(2, 28), t0);
        let h = stage_histogram();
        assert_eq!(s.observe_between(at(1, 100), at(2, 28), t0, &h), 2);
        assert_eq!(s.len(), 3, "observe_between keeps the stamps");
        assert_eq!(s.reached(at(1, 250), t0 + Duration::from_millis(3), &h), 2);
        assert_eq!(s.reached(at(1, 250), t0, &h), 0, "each stamp is timed once");
        assert_eq!(s.len(), 1);
        assert_eq!(count(&h), 4);
        s.clear();
        assert!(s.is_empty());
    }

    #[test]
    fn the_queue_is_bounded() {
        let s = Stamps::default();
        let t0 = Instant::now();
        for i in 0..(MAX_STAMPS as u32 + 10) {
            s.stamp(LogPosition::new(1, i + 1), t0);
        }
        assert_eq!(s.len(), MAX_STAMPS);
    }

    #[test]
    fn the_last_event_answers_only_for_positions_it_covers() {
        let e = LastEvent::default();
        let t0 = Instant::now();
        assert!(e.at_or_beyond(LogPosition::ZERO).is_none());
        e.set(LogPosition::new(3, 10), t0);
        assert_eq!(e.at_or_beyond(LogPosition::new(3, 10)), Some(t0));
        assert!(e.at_or_beyond(LogPosition::new(3, 11)).is_none());
    }
}
