//! The applier: the one task that owns the mirror during a session. It
//! applies what the reader queued, fsyncs once per batch (when the queue is
//! empty, or after `SYNC_EVERY_BYTES` of log or `SYNC_EVERY`), then publishes: the durable
//! position for the acker, and the mirror's part of the status. It also
//! finishes rebases and asks for them when due.
//!
//! It runs on a blocking thread: applying is file I/O and fsync.

use super::session_error::{retry, SessionError};
use super::{StandbyConfig, StatusTx};
use crate::mirror::{ApplyError, Mirror};
use crate::status::StandbyStatus;
use crate::timing::FollowTiming;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};
use tandem_shared::wire::{primary_message::Kind, standby_message, RebaseRequest, StandbyMessage};
use tandem_shared::{now_unix_ms, LogPosition};
use tokio::sync::{mpsc, watch};

/// Flush and acknowledge at least this often while data streams in (a
/// queue that never empties would otherwise never be acknowledged): the
/// primary's retention counts what is acknowledged, and a standby whose
/// acks trail by more than its cap (4 MiB in tests) is dropped although
/// it holds the log.
const SYNC_EVERY_BYTES: u64 = 2 << 20;
const SYNC_EVERY: Duration = Duration::from_millis(200);
/// A rebase request not answered by then is asked again.
const REBASE_RETRY: Duration = Duration::from_secs(120);
/// How often a blocked send to the primary looks whether the session ended.
const SEND_POLL: Duration = Duration::from_millis(10);

pub(super) struct Applier {
    pub cfg: StandbyConfig,
    pub status: StatusTx,
    pub out: mpsc::Sender<StandbyMessage>,
    /// What is durable, for the acker: only positions after an fsync, and
    /// whether a promotion would hold them ([`Mirror::promotable`]).
    pub durable: watch::Sender<Option<(LogPosition, bool)>>,
    /// Set when the reader ended: a send to the primary then gives up.
    pub reader_done: Arc<AtomicBool>,
    /// What this session's Hello asked for (`Hello.new_base_request`).
    pub asked_new_base: String,
    /// The stages' histograms (the reader stamps what it received).
    pub timing: Arc<FollowTiming>,
}

impl Applier {
    /// Applies until the reader closes the queue or something is refused.
    /// The mirror comes back either way, with everything written fsynced.
    pub fn run(
        self,
        mut mirror: Mirror,
        mut queued: mpsc::Receiver<Kind>,
    ) -> (Mirror, Result<(), SessionError>) {
        let r = self.apply_all(&mut mirror, &mut queued);
        let r = r.and_then(|()| self.sync(&mut mirror).map(|_| ()));
        (mirror, r)
    }

    fn apply_all(
        &self,
        mirror: &mut Mirror,
        queued: &mut mpsc::Receiver<Kind>,
    ) -> Result<(), SessionError> {
        let mut rebase_asked: Option<Instant> = None;
        while let Some(first) = queued.blocking_recv() {
            let mut pending = 0u64;
            let started = Instant::now();
            let mut next = Some(first);
            while let Some(kind) = next {
                pending += self.apply(mirror, kind)?;
                next = if pending >= SYNC_EVERY_BYTES || started.elapsed() >= SYNC_EVERY {
                    None
                } else {
                    queued.try_recv().ok()
                };
            }
            // A staged base is swapped in before the ack that reaches its
            // consistent point goes out: until the swap is recorded, a
            // promotion recovers the old mirror, which lacks that log.
            let fsync = Instant::now();
            mirror.sync().map_err(|e| self.rejected(e, mirror))?;
            if pending > 0 {
                let took = fsync.elapsed().as_secs_f64();
                self.timing.log_fsync.observe(took);
            }
            let swapped = mirror
                .finish_rebase()
                .map_err(|e| self.rejected(e, mirror))?;
            self.sync(mirror)?;
            if let Some(report) = swapped {
                // The new base changes what a promotion would replay.
                self.status.send_modify(|s| {
                    s.rebases += 1;
                    s.rejoining = mirror.rejoin;
                    s.discarded.extend(report.discarded.clone());
                    s.last_rebase = Some(report);
                    s.fill_from_state(&mirror.state);
                });
                rebase_asked = None;
            }
            let retry_due = rebase_asked.is_none_or(|at| at.elapsed() > REBASE_RETRY);
            if retry_due
                && mirror.rebase.is_none()
                && mirror.rebase_due(self.cfg.rebase_after_bytes, self.cfg.rebase_after_secs)
            {
                rebase_asked = Some(Instant::now());
                let log_start = mirror.state.base.as_ref().map(|b| b.log_start);
                tracing::info!(durable = %mirror.tail().durable, "the log since the base passed the threshold: asking for a rebase");
                self.request_rebase(mirror, log_start.unwrap_or_default())
                    .map_err(|e| self.rejected(e, mirror))?;
            }
            // Healing what a scrub found: log damage needs a new base, which
            // only a Hello can ask for; a damaged page, a rebase (sharing the
            // scheduled rebase's timer: one request in flight).
            let status = self.status.subscribe();
            if let Some(why) =
                super::heal::reconnect_for_new_base(&status, mirror, &self.asked_new_base)
            {
                return Err(retry(why));
            }
            if let Some(log_start) = super::heal::rebase_due(&status, mirror, &mut rebase_asked) {
                self.request_rebase(mirror, log_start)
                    .map_err(|e| self.rejected(e, mirror))?;
            }
        }
        Ok(())
    }

    /// Applies one message; returns the log bytes it wrote.
    fn apply(&self, mirror: &mut Mirror, kind: Kind) -> Result<u64, SessionError> {
        self.status.send_modify(|s| note_base_copy(s, &kind));
        let welcome = matches!(kind, Kind::Welcome(_));
        let a = mirror.apply(kind).map_err(|e| self.rejected(e, mirror))?;
        if welcome {
            super::remember_follow_config(&mirror.dir, &self.cfg);
            // A primary that continues the log ends a rejoin at once.
            self.status.send_modify(|s| s.rejoining = mirror.rejoin);
        }
        if a.log_bytes > 0 || a.file_bytes > 0 {
            self.status.send_modify(|s| {
                s.log_bytes_received += a.log_bytes;
                s.file_bytes_received += a.file_bytes;
            });
        }
        Ok(a.log_bytes)
    }

    /// Fsyncs, then publishes the durable position and the mirror's state.
    fn sync(&self, mirror: &mut Mirror) -> Result<LogPosition, SessionError> {
        let durable = mirror.sync().map_err(|e| self.rejected(e, mirror))?;
        self.status.send_modify(|s| {
            // The mirror's own end, not the Ack's: while a replacement base
            // is staged the Ack reports the staged log, but the directory
            // (what status and `recoverable` describe) is the mirror.
            s.durable_lsn = mirror.tail().durable;
            if s.lg_max == 0 {
                s.lg_max = mirror.tail().lg_max;
            }
            s.fill_from_state(&mirror.state);
            s.note_progress();
        });
        let now = Instant::now();
        let t = &self.timing;
        t.received.reached(durable, now, &t.receive_to_durable);
        t.published.set(durable, now);
        self.durable
            .send_replace(Some((durable, mirror.promotable())));
        Ok(durable)
    }

    /// Sends the page digests of the mirror's files as they are now, then
    /// the request; the primary sends no rebase that starts at or before
    /// `log_start`.
    fn request_rebase(&self, mirror: &Mirror, log_start: LogPosition) -> Result<(), ApplyError> {
        let base_id = mirror
            .state
            .base
            .as_ref()
            .map(|b| b.base_id.clone())
            .unwrap_or_default();
        let digests = mirror.page_digests()?;
        for d in digests {
            if !self.send(standby_message::Kind::PageDigests(d)) {
                return Ok(());
            }
        }
        self.send(standby_message::Kind::RebaseRequest(RebaseRequest {
            base_id,
            log_start: Some(log_start.into()),
            log_files: Vec::new(),
        }));
        Ok(())
    }

    /// Sends to the primary, waiting while the outbox is full; false if the
    /// session ended meanwhile (a blocking send could wait forever on a
    /// stream nobody drains any more).
    fn send(&self, kind: standby_message::Kind) -> bool {
        let mut msg = StandbyMessage { kind: Some(kind) };
        loop {
            match self.out.try_send(msg) {
                Ok(()) => return true,
                Err(mpsc::error::TrySendError::Full(back)) => {
                    if self.reader_done.load(Ordering::SeqCst) {
                        return false;
                    }
                    msg = back;
                    std::thread::sleep(SEND_POLL);
                }
                Err(mpsc::error::TrySendError::Closed(_)) => return false,
            }
        }
    }

    fn rejected(&self, e: ApplyError, mirror: &Mirror) -> SessionError {
        self.status.send_modify(|s| {
            s.rejected_messages += 1;
            if matches!(e, ApplyError::Digest { .. }) {
                s.digest_failures += 1;
            }
            s.fill_from_state(&mirror.state);
        });
        if e.is_permanent() {
            tracing::error!(error = %e, "refusing the primary's data");
            return SessionError::Refused(e.to_string());
        }
        tracing::error!(error = %e, "rejected a message from the primary; nothing after the last acknowledged position was kept, re-requesting");
        // A corrupted chunk is worth an immediate retry; anything else may be
        // persistent, so back off.
        if matches!(e, ApplyError::Digest { .. }) {
            SessionError::Retry {
                why: e.to_string(),
                immediately: true,
            }
        } else {
            retry(e)
        }
    }
}

/// What a message read off the network tells about the primary (the
/// reader's part of the status): it was heard from, and where its log ends.
pub(super) fn note_contact(s: &mut StandbyStatus, kind: &Kind) {
    let now = now_unix_ms();
    s.last_contact_unix_ms = now;
    match kind {
        Kind::Heartbeat(h) => {
            s.primary_end_lsn = s
                .primary_end_lsn
                .max(h.primary_end.unwrap_or_default().into());
        }
        Kind::LogChunk(c) => {
            s.lg_max = (c.file_size as u32).saturating_add(1);
            let end = LogPosition::new(c.file, c.offset + c.data.len() as u32);
            s.primary_end_lsn = s.primary_end_lsn.max(end);
        }
        _ => {}
    }
    s.note_progress();
}

/// The base copy's progress (the applier's part of the status).
fn note_base_copy(s: &mut StandbyStatus, kind: &Kind) {
    match kind {
        Kind::BaseStart(_) => {
            s.base_copy_active = true;
            s.base_copy_done_bytes = 0;
            s.base_copy_total_bytes = 0;
            s.base_copy_started_unix_ms = now_unix_ms();
        }
        Kind::FileStart(f) if f.base_bytes_left > 0 => {
            // A copy resumed by a new process has no BaseStart: it starts here.
            if !s.base_copy_active {
                s.base_copy_active = true;
                s.base_copy_done_bytes = 0;
                s.base_copy_started_unix_ms = now_unix_ms();
            }
            s.base_copy_total_bytes = s.base_copy_done_bytes + f.base_bytes_left;
        }
        // The file's bytes, not the wire's: a compressed chunk says how
        // many it holds (the mirror refuses one whose size lies).
        Kind::FileChunk(c) if c.raw_len > 0 => s.note_base_copy_bytes(c.raw_len),
        Kind::FileChunk(c) => s.note_base_copy_bytes(c.data.len() as u64),
        Kind::FileSame(f) => s.note_base_copy_bytes(f.len),
        Kind::BaseFilesDone(_) => {
            s.base_copy_active = false;
            s.base_copy_done_bytes = s.base_copy_total_bytes;
        }
        _ => {}
    }
}
