//! How the mirror takes a new base: a first one in place, any other staged
//! beside it under `.tandem/rebase/` and swapped in, crash-safely, only
//! when complete (see the rules in [`super`]).

use super::{Mirror, Rebase, RebaseReport};
use crate::mirror::apply_error::ApplyError;
use crate::mirror::dirs::create_dirs_durably;
use crate::mirror::logwriter::{checked_log_dir, LogWriter};
use crate::mirror::swap;
use crate::rejoin;
use crate::state::{BaseState, StagedLog};
use tandem_shared::durable::fsync_dir;
use tandem_shared::durable::remove_tree_durably;
use tandem_shared::ioerror::io_err;
use tandem_shared::LogPosition;

impl Mirror {
    /// Starts staging a base beside the current one under `.tandem/rebase/`
    /// (with its own log when it `replaces` the mirror's history).
    pub(super) fn stage(
        &mut self,
        base_id: String,
        start: LogPosition,
        replaces: bool,
    ) -> Result<(), ApplyError> {
        self.files.forget();
        self.staged_log = None;
        let staging = self.dir.rebase_dir();
        remove_tree_durably(&staging).map_err(io_err("clearing the staging area"))?;
        // Its entry durable: a pending swap counts a staged file that is
        // missing as moved, so the area must not vanish in a crash.
        create_dirs_durably(&self.dir.meta(), &staging)
            .map_err(io_err("creating the staging area"))?;
        if replaces {
            self.staged_log = Some(LogWriter::empty(
                &staging,
                &self.state.log_dir,
                &self.dir.incoming(),
                start,
            ));
        }
        self.rebase = Some(Rebase {
            base: BaseState {
                base_id,
                log_start: start,
                started_unix_ms: tandem_shared::now_unix_ms(),
                ..Default::default()
            },
            replaces,
            ..Default::default()
        });
        Ok(())
    }

    /// Takes a first base, or replaces one that holds nothing (no complete
    /// file, no log): there is nothing to stage it beside.
    pub(super) fn start_base(
        &mut self,
        base_id: String,
        log_start: LogPosition,
    ) -> Result<(), ApplyError> {
        let log_dir = checked_log_dir(&self.dir.root, &self.state.log_dir)?;
        self.rebase = None;
        self.staged_log = None;
        if let Some(old) = self.state.base.take() {
            tracing::warn!(old = %old.base_id, new = %base_id, "replacing a base that holds nothing yet");
            // Record "no base" first: a crash midway must not leave a state
            // that names files already deleted.
            self.save()?;
            crate::archive_hold::retire_logs(&self.dir, &log_dir, u32::MAX, self.archive_hold_cap)
                .map_err(io_err("removing the old base's log files"))?;
            fsync_dir(&self.dir.root).map_err(io_err("fsync of the standby directory"))?;
        }
        self.files.forget();
        self.log = LogWriter::empty(
            &self.dir.root,
            &self.state.log_dir,
            &self.dir.incoming(),
            log_start,
        );
        self.state.base = Some(BaseState {
            base_id,
            log_start,
            started_unix_ms: tandem_shared::now_unix_ms(),
            ..Default::default()
        });
        self.start_over = false;
        self.save()
    }

    /// Swaps a complete staged base in once its log covers it (the
    /// mirror's log for a rebase, its own staged log for a replacement).
    /// Returns `None` while it is not complete.
    pub fn finish_rebase(&mut self) -> Result<Option<RebaseReport>, ApplyError> {
        if let Some(w) = self.staged_log.as_mut() {
            w.sync()?;
        }
        let durable = match &self.staged_log {
            Some(w) => w.tail().durable,
            None => self.log.tail().durable,
        };
        let ready = self.rebase.as_ref().is_some_and(|r| {
            r.base.files_done && r.base.consistent_at.is_some_and(|c| durable >= c)
        });
        if !ready {
            return Ok(None);
        }
        let discarded = self.set_aside_discarded()?;
        let Some(r) = self.rebase.take() else {
            return Ok(None);
        };
        let staged_log = self.staged_log.take();
        let log_range = staged_log.as_ref().map(|w| StagedLog {
            first: r.base.log_start.file,
            last: w.tail().durable.file,
        });
        // Everything staged is on disk before the swap is recorded.
        fsync_dir(&self.dir.rebase_dir()).map_err(io_err("fsync of the staging area"))?;
        self.state.pending_swap = Some(r.base.clone());
        self.state.pending_swap_log = log_range;
        self.steps.step("recording the swap")?;
        self.save()?;
        let swapped = swap::finish(
            &self.dir,
            &mut self.state,
            self.archive_hold_cap,
            &mut self.steps,
        );
        // Recorded (even if a cleanup step after it failed): the mirror's
        // log is now the staged one. Not recorded: the pending swap is
        // finished, and the log reopened, at the next session or open.
        if self.state.pending_swap.is_none() {
            if let Some(mut w) = staged_log {
                w.rehome(&self.dir.root);
                self.log = w;
                self.start_over = false;
                self.rejoin = false;
            }
        }
        let removed = swapped?;
        let report = RebaseReport {
            base_id: r.base.base_id,
            log_start: r.base.log_start,
            sent_bytes: r.sent_bytes,
            reused_bytes: r.reused_bytes,
            removed_log_files: removed,
            unix_ms: tandem_shared::now_unix_ms(),
            discarded,
        };
        tracing::info!(base = %report.base_id, log_start = %report.log_start, sent = report.sent_bytes, reused = report.reused_bytes,
            removed_logs = removed, replaced_history = r.replaces, "staged base swapped in");
        Ok(Some(report))
    }

    /// A rejoin's replacement base is complete: before it is swapped in,
    /// finds where the mirror's log leaves the staged one's history (no
    /// later than the primary's `discard_after`) and sets what lies beyond
    /// aside, with the database files the new base does not own.
    fn set_aside_discarded(&mut self) -> Result<Option<rejoin::DiscardReport>, ApplyError> {
        let (Some(r), Some(staged)) = (self.rebase.as_ref(), self.staged_log.as_ref()) else {
            return Ok(None);
        };
        if !(r.replaces && self.rejoin) {
            return Ok(None);
        }
        let (dir, state, new) = (&self.dir, &self.state, &r.base);
        let old_end = self.log.tail().durable;
        let old_dir = checked_log_dir(&dir.root, &state.log_dir)?;
        let new_dir = checked_log_dir(&dir.rebase_dir(), &state.log_dir)?;
        let report = rejoin::agreed_point(
            &old_dir,
            &new_dir,
            new.log_start.file,
            staged.tail().durable,
            old_end,
            r.discard_after.unwrap_or(old_end),
        )
        .and_then(|from| rejoin::set_aside(dir, &old_dir, old_end, from))
        .map_err(io_err("setting the discarded log aside"))?;
        if let (Some(d), Some(old)) = (&report, &state.base) {
            rejoin::keep_unowned(dir, old, new, &d.kept_in)
                .map_err(io_err("keeping files the new base does not own"))?;
            tracing::warn!(from = %d.from, to = %d.to, bytes = d.bytes, committed = d.committed_transactions,
                kept_in = %d.kept_in, "REJOIN: {d}");
        }
        Ok(report)
    }

    /// Is it time to ask for a rebase? (The base is complete, none is under
    /// way, and the log since the base or its age passed a threshold.)
    pub fn rebase_due(&self, after_bytes: u64, after_secs: u64) -> bool {
        let Some(base) = self.state.base.as_ref().filter(|b| b.files_done) else {
            return false;
        };
        if self.rebase.is_some()
            || !self.recoverable()
            || base.log_start.file >= self.log.tail().durable.file
        {
            return false;
        }
        let bytes = base
            .log_start
            .bytes_until(self.log.tail().durable, self.log.tail().lg_max.max(1));
        let age_ms = tandem_shared::now_unix_ms().saturating_sub(base.started_unix_ms);
        (after_bytes > 0 && bytes >= after_bytes)
            || (after_secs > 0 && base.started_unix_ms > 0 && age_ms >= after_secs * 1000)
    }
}
