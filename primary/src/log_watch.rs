//! Follows the end of the environment's verified log: the newest log file,
//! walked record by record (BDB-NOTES.md §2: the file size says nothing). One
//! watcher per primary publishes the end on a `watch` channel; sessions wake
//! on it instead of polling the disk themselves.

use crate::timing::LogTiming;
use std::fs::File;
use std::sync::Arc;
use std::time::{Duration, Instant};
use tandem_shared::envlayout::EnvLayout;
use tandem_shared::logfile::{read_verified, walk_file, walk_from};
use tandem_shared::LogPosition;
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;

#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct LogEnd {
    /// Just past the last verified record of the newest log file.
    pub end: LogPosition,
    /// From the newest file's persist record; 0 until one was read.
    pub lg_max: u32,
}

struct Tail {
    file_no: u32,
    file: File,
    end: u32,
    last_record: Option<u32>,
    lg_max: u32,
    /// Reads in a row that found nothing new.
    idle_reads: u32,
}

/// Idle reads between two listings of the log directory, which find a next
/// file removed before the watcher reached it (retention or an operator
/// removing the log of a dropped standby). Without them the watcher would
/// wait for that file forever and every session with it.
const LIST_EVERY_IDLE_READS: u32 = 50;

fn open_tail(layout: &EnvLayout, file_no: u32, prev: Option<u32>) -> std::io::Result<Tail> {
    let file = File::open(layout.log_path(file_no))?;
    let w = walk_file(&file, prev)?;
    Ok(Tail {
        file_no,
        file,
        end: w.end,
        last_record: w.last_record,
        lg_max: w.header.map_or(0, |h| h.lg_max),
        idle_reads: 0,
    })
}

/// Starts the watcher; it stops when `stop` is cancelled (within a poll
/// interval) and the handle joins it. The channel holds `LogEnd::default()`
/// until a log file exists. Each new end is stamped in `timing.noticed`.
pub fn spawn(
    layout: EnvLayout,
    poll: Duration,
    stop: CancellationToken,
    timing: Arc<LogTiming>,
) -> std::io::Result<(watch::Receiver<LogEnd>, std::thread::JoinHandle<()>)> {
    let (tx, rx) = watch::channel(LogEnd::default());
    let handle = std::thread::Builder::new()
        .name("log-watch".into())
        .spawn(move || {
            let mut tail: Option<Tail> = None;
            let mut warned = false;
            // Idle, the poll slows down to IDLE_FACTOR times the interval;
            // the first new record brings it back to full speed.
            let mut idle_polls = 0u32;
            while !tx.is_closed() && !stop.is_cancelled() {
                match step(&layout, &mut tail, &tx) {
                    Ok(moved) => {
                        if moved {
                            timing.noticed.stamp(tx.borrow().end, Instant::now());
                        }
                        warned = false;
                        idle_polls = if moved { 0 } else { idle_polls.saturating_add(1) };
                    }
                    Err(e) => {
                        if !warned {
                            tracing::warn!(error = %e, "reading the end of the log failed; retrying");
                            warned = true;
                        }
                        tail = None;
                    }
                }
                let factor = if idle_polls > IDLE_AFTER_POLLS { IDLE_FACTOR } else { 1 };
                let asked = poll * factor;
                let slept = Instant::now();
                std::thread::sleep(asked);
                if factor == 1 {
                    let late = slept.elapsed().saturating_sub(asked);
                    timing.watch_late.observe(late.as_secs_f64());
                }
            }
        })?;
    Ok((rx, handle))
}

/// Polls without news before the watcher slows down, and by how much.
const IDLE_AFTER_POLLS: u32 = 500;
const IDLE_FACTOR: u32 = 5;

/// One look at the end of the log; true if it moved.
fn step(
    layout: &EnvLayout,
    tail: &mut Option<Tail>,
    tx: &watch::Sender<LogEnd>,
) -> std::io::Result<bool> {
    let t = match tail {
        Some(t) => t,
        None => {
            let files = layout.log_files().map_err(std::io::Error::other)?;
            let Some(&newest) = files.last() else {
                return Ok(false);
            };
            tail.insert(open_tail(layout, newest, None)?)
        }
    };
    // A newer file means BDB finished this one: read it to its end once
    // more (on from what is already verified), then follow the new one.
    if layout.log_path(t.file_no + 1).exists() {
        let w = walk_from(&t.file, t.end, t.last_record)?;
        let next = open_tail(layout, t.file_no + 1, w.last_record)?;
        *t = next;
    } else {
        let r = read_verified(&t.file, t.end, t.last_record, tandem_shared::MAX_CHUNK)?;
        if r.walk.records > 0 {
            t.end = r.walk.end;
            t.last_record = r.walk.last_record;
            t.idle_reads = 0;
        } else {
            t.idle_reads += 1;
            if t.idle_reads >= LIST_EVERY_IDLE_READS {
                t.idle_reads = 0;
                let files = layout.log_files().map_err(std::io::Error::other)?;
                if let Some(&newest) = files.last().filter(|n| **n > t.file_no + 1) {
                    tracing::warn!(
                        from = %layout.log_name(t.file_no), to = %layout.log_name(newest),
                        "the next log file is gone; following the newest"
                    );
                    *t = open_tail(layout, newest, None)?;
                }
            }
        }
    }
    let now = LogEnd {
        end: LogPosition::new(t.file_no, t.end),
        lg_max: t.lg_max,
    };
    Ok(tx.send_if_modified(|cur| {
        let changed = *cur != now;
        *cur = now;
        changed
    }))
}

#[cfg(test)]
mod tests {
    use super::*;
    use tandem_shared::logfile::synth;

    #[test]
    fn the_watcher_follows_past_a_next_file_that_was_removed() {
        let dir = tempfile::tempdir().unwrap();
        let write = |n: u32| {
            let image = synth::file(0, 1 << 16, &[b"one", b"two"], 4096);
            std::fs::write(dir.path().join(format!("log.{n:010}")), image).unwrap();
        };
        write(1);
        let layout = EnvLayout::open(dir.path()).unwrap();
        let (tx, rx) = watch::channel(LogEnd::default());
        let mut tail = None;
        step(&layout, &mut tail, &tx).unwrap();
        assert_eq!(rx.borrow().end.file, 1);
        // Files 2 and 3 were written and 2 removed before the next look.
        write(3);
        for _ in 0..LIST_EVERY_IDLE_READS {
            step(&layout, &mut tail, &tx).unwrap();
        }
        assert_eq!(rx.borrow().end.file, 3);
        assert!(rx.borrow().end.offset > 0);
    }
}
