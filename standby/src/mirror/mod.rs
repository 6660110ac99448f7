//! The standby's pristine mirror of the primary's environment: applies what
//! the primary sends, after checking it, and never lets recovery touch it.
//! A facade over its parts, one duty each (all private to the crate):
//!
//! - [`logwriter`]: appends verified log records, fsyncs them, and is the
//!   only one that says how far the log is durable;
//! - [`receiver`]: receives database files into a destination (the mirror,
//!   or the staging area), with [`file_writer`] writing them on a thread of
//!   their own around the page cache ([`write_behind`] for what goes
//!   through it) and [`base_files`] recording what a base's files hold;
//! - [`swap`]: swaps a complete staged base in, crash-safely;
//! - [`bases`]: how a base is started, staged and swapped in;
//! - [`apply_error`]: what applying a message can fail with;
//! - [`dirs`]: durable creation and removal of directories;
//! - `tests`: `Mirror::apply` driven with crafted messages, one file per
//!   topic under `mirror/tests/`.
//!
//! Rules this module enforces:
//! - **it never discards what it holds on its own**: once the mirror holds
//!   anything (a base with complete files, or any log), a new base from the
//!   primary is taken only if its log starts past the standby's durable end
//!   (the primary removed log the standby never got: nothing it holds is
//!   contradicted) or the operator asked to start over (`run
//!   --start-over`); otherwise it is refused for good
//!   ([`ApplyError::Diverged`]) with the directory unchanged;
//! - a replacement base, like a rebase, is staged beside the mirror (its
//!   files *and* its log, under `.tandem/rebase/`) and swapped in only when
//!   complete: files done and its log durable up to `consistent_at`. Until
//!   then the mirror stays recoverable and untouched; acknowledgements
//!   report the staged log's durable position (it is durable, and it is the
//!   primary's history). A staged base is abandoned when its session ends;
//! - a pending swap is finished before anything else: at open, at session
//!   start, and before a new base or rebase starts;
//! - at open, the base's database files, log files and their directories
//!   are fsynced before anything counts as durable, and the log's record
//!   chain is verified across every file.
//!
//! `apply` is a dispatch: one method per message kind (`on_welcome`,
//! `on_base_start`, ...) holds that kind's checks; the work is in the
//! modules they call, and how a base is started, staged and swapped in is
//! in `mirror/bases.rs`.

pub(crate) mod apply_error;
pub(crate) mod base_files;
mod bases;
pub(crate) mod dirs;
pub(crate) mod file_writer;
pub(crate) mod logwriter;
pub(crate) mod receiver;
pub(crate) mod swap;
pub(crate) mod write_behind;

pub use crate::mirror::apply_error::{Applied, ApplyError};
use crate::mirror::dirs::remove_if_exists;
pub use crate::mirror::logwriter::LogTail;
use crate::mirror::logwriter::{checked_log_dir, LogWriter};
use crate::mirror::receiver::FileReceiver;
use crate::mirror::swap::{save_state, Steps};
use crate::state::{BaseState, StandbyDir, StandbyState};
use std::io;
use tandem_shared::durable::remove_tree_durably;
use tandem_shared::epochs::EpochStart;
use tandem_shared::ioerror::io_err;
use tandem_shared::wire::primary_message::Kind;
use tandem_shared::wire::{
    BaseFilesDone, BaseStart, FileChunk, FileEnd, FileSame, FileStart, LogChunk, Welcome,
};
use tandem_shared::wirepath;
use tandem_shared::LogPosition;

/// What the Hello says when the operator asked to start over.
pub const START_OVER_REQUEST: &str = "the operator asked to start over (--start-over)";

/// A staged base being received: a rebase, or a replacement base.
#[derive(Debug, Clone, Default)]
pub struct Rebase {
    pub base: BaseState,
    /// Bytes received over the network for the new base.
    pub sent_bytes: u64,
    /// Bytes copied from the standby's own files (FileSame).
    pub reused_bytes: u64,
    /// A replacement base: its log is its own (staged too), not the
    /// continuation of the mirror's.
    pub replaces: bool,
    /// A rejoin's replacement base: where the primary says the mirror's
    /// log leaves its history, at most.
    pub discard_after: Option<LogPosition>,
}

/// A finished rebase (or replacement base), for logs and status.
#[derive(Debug, Clone, Default, serde::Serialize, serde::Deserialize, PartialEq)]
pub struct RebaseReport {
    pub base_id: String,
    pub log_start: LogPosition,
    pub sent_bytes: u64,
    pub reused_bytes: u64,
    pub removed_log_files: usize,
    pub unix_ms: u64,
    /// A rejoin: what the mirror's log held beyond the primary's history.
    #[serde(default)]
    pub discarded: Option<crate::rejoin::DiscardReport>,
}

pub struct Mirror {
    pub dir: StandbyDir,
    pub state: StandbyState,
    /// A staged base being received, beside the current one.
    pub rebase: Option<Rebase>,
    /// The mirror's log.
    log: LogWriter,
    /// A replacement base's own log, staged (only with `rebase.replaces`).
    staged_log: Option<LogWriter>,
    files: FileReceiver,
    /// Most log bytes kept for a continuous archive ([`crate::archive_hold`]).
    pub archive_hold_cap: u64,
    /// The operator asked to start over (`run --start-over`): a new base may
    /// replace what the mirror holds. Cleared once one has.
    pub start_over: bool,
    /// The operator asked to rejoin (`run --rejoin`): as `start_over`, but
    /// the new base is a page delta against the mirror's files, and what
    /// the mirror's log holds beyond the primary's history is set aside
    /// (see [`crate::rejoin`]). Cleared once the primary continues the
    /// mirror's log or the new base is swapped in.
    pub rejoin: bool,
    /// This standby offered zstd in its Hello (`--compression auto`); a
    /// zstd chunk without that offer is a protocol violation.
    pub accepts_zstd: bool,
    steps: Steps,
}

impl Mirror {
    /// Opens the mirror for writing: finishes an interrupted swap, makes
    /// what is on disk durable, and finds the verified end of the log.
    pub fn open(dir: StandbyDir) -> Result<Self, ApplyError> {
        dir.create()
            .map_err(io_err("creating the standby directory"))?;
        let mut state = dir.load_state()?;
        clear_incoming(&dir).map_err(io_err("clearing incoming files"))?;
        let mut steps = Steps::default();
        if let Some(new) = &state.pending_swap {
            tracing::warn!(base = %new.base_id, "finishing an interrupted swap of a staged base");
            swap::finish(
                &dir,
                &mut state,
                crate::archive_hold::DEFAULT_CAP_BYTES,
                &mut steps,
            )?;
        } else {
            remove_tree_durably(&dir.rebase_dir()).map_err(io_err("clearing the staging area"))?;
        }
        base_files::make_durable(&dir, &state)?;
        let log = open_log(&dir, &state)?;
        Ok(Self {
            dir,
            state,
            rebase: None,
            log,
            staged_log: None,
            files: FileReceiver::default(),
            archive_hold_cap: crate::archive_hold::DEFAULT_CAP_BYTES,
            start_over: false,
            rejoin: false,
            accepts_zstd: true,
            steps,
        })
    }

    /// The end of the mirror's log (not of a staged one).
    pub fn tail(&self) -> &LogTail {
        self.log.tail()
    }

    /// What the Hello asks for: a new base, and why (empty: nothing).
    pub fn new_base_request(&self) -> String {
        if self.start_over {
            START_OVER_REQUEST.into()
        } else {
            crate::scrub::new_base_request(
                &self.dir,
                self.state.base.as_ref().map(|b| b.base_id.as_str()),
            )
        }
    }

    /// Starts a session: finishes a pending swap, forgets a file being
    /// received and a staged base (the primary starts them again), and goes
    /// back to the last fsync so the Hello describes one durable point.
    pub fn begin_session(&mut self) {
        self.files.forget();
        if self.state.pending_swap.is_some() {
            if let Err(e) = self.finish_pending_swap() {
                tracing::error!(error = %e, "cannot finish the interrupted swap yet; no new base starts until it is");
            }
        }
        if let Some(r) = self.rebase.take() {
            tracing::info!(base = %r.base.base_id, replaces = r.replaces, "abandoning an unfinished staged base; the primary sends it again");
            self.staged_log = None;
        }
        // Never while a swap is pending: a staged file missing from the
        // area counts as moved.
        if self.state.pending_swap.is_none() {
            let _ = remove_tree_durably(&self.dir.rebase_dir());
        }
        self.log.rewind_to_synced();
    }

    /// Finishes a swap left pending by a failure, then reopens the log of
    /// the base it installed.
    fn finish_pending_swap(&mut self) -> Result<usize, ApplyError> {
        if self.state.pending_swap.is_none() {
            return Ok(0);
        }
        self.rebase = None;
        self.staged_log = None;
        let replaces = self.state.pending_swap_log.is_some();
        let removed = swap::finish(
            &self.dir,
            &mut self.state,
            self.archive_hold_cap,
            &mut self.steps,
        )?;
        self.log = open_log(&self.dir, &self.state)?;
        if replaces {
            self.start_over = false; // a new base has replaced the mirror
        }
        Ok(removed)
    }

    fn save(&mut self) -> Result<(), ApplyError> {
        save_state(&self.dir, &mut self.state)
    }

    /// Applies one message from the primary.
    pub fn apply(&mut self, kind: Kind) -> Result<Applied, ApplyError> {
        // Chunks are decoded here, before their digest is checked against
        // the original bytes and before anything is written.
        let kind = tandem_shared::compress::decode_kind(kind, self.accepts_zstd)
            .map_err(|e| ApplyError::Protocol(e.to_string()))?;
        match kind {
            Kind::Welcome(w) => self.on_welcome(w),
            Kind::BaseStart(b) => self.on_base_start(b),
            Kind::FileStart(f) => self.on_file_start(f),
            Kind::FileChunk(c) => self.on_file_chunk(c),
            Kind::FileSame(f) => self.on_file_same(f),
            Kind::FileEnd(e) => self.on_file_end(e),
            Kind::BaseFilesDone(d) => self.on_base_files_done(d),
            Kind::LogChunk(c) => self.on_log_chunk(c),
            Kind::Heartbeat(_) => Ok(Applied::default()),
        }
    }

    /// Welcome: checks the primary's identity, epoch, history and log
    /// directory, and records them.
    fn on_welcome(&mut self, w: Welcome) -> Result<Applied, ApplyError> {
        if let Some(ours) = &self.state.env_id {
            if *ours != w.env_id {
                return Err(ApplyError::IdentityMismatch {
                    ours: ours.clone(),
                    theirs: w.env_id,
                });
            }
        }
        if self.state.epoch > w.epoch {
            return Err(ApplyError::Fenced {
                ours: self.state.epoch,
                theirs: w.epoch,
            });
        }
        let theirs: Vec<EpochStart> = w.history.iter().map(Into::into).collect();
        tandem_shared::epochs::check_agrees(&self.state.history, &theirs)?;
        let history = tandem_shared::epochs::merge(&self.state.history, theirs);
        if !w.log_dir.is_empty() {
            wirepath::validate(&w.log_dir)?;
        }
        if self.state.base.is_some() && w.log_dir != self.state.log_dir {
            return Err(ApplyError::Protocol(format!(
                "the primary's log directory changed from {:?} to {:?}",
                self.state.log_dir, w.log_dir
            )));
        }
        let changed = self.state.env_id.as_deref() != Some(w.env_id.as_str())
            || self.state.epoch != w.epoch
            || self.state.log_dir != w.log_dir
            || self.state.history != history;
        if w.resume {
            // The primary continues this log: nothing to discard.
            self.rejoin = false;
        }
        if changed {
            self.state.env_id = Some(w.env_id);
            self.state.epoch = w.epoch;
            self.state.log_dir = w.log_dir;
            self.state.history = history;
            self.save()?;
        }
        Ok(Applied::default())
    }

    /// BaseStart: a first base, a rebase, or a replacement base (taken
    /// only when it contradicts nothing the standby holds, or the
    /// operator asked).
    fn on_base_start(&mut self, b: BaseStart) -> Result<Applied, ApplyError> {
        let start: LogPosition = b.log_start.unwrap_or_default().into();
        if start.file == 0 || start.offset != 0 {
            return Err(ApplyError::Protocol(format!(
                "base log start {start} is not the start of a log file"
            )));
        }
        if self.state.env_id.is_none() {
            return Err(ApplyError::Protocol("BaseStart before Welcome".into()));
        }
        // Refused before anything changes: old logs are removed by
        // listing this directory.
        checked_log_dir(&self.dir.root, &self.state.log_dir)?;
        self.finish_pending_swap()?;
        if b.rebase {
            if !self.state.base.as_ref().is_some_and(|cur| cur.files_done) {
                return Err(ApplyError::Protocol(
                    "a rebase needs a complete current base".into(),
                ));
            }
            self.stage(b.base_id, start, false)?;
            tracing::info!(log_start = %start, "rebase started: staging a new base beside the current one");
        } else if let Some(holds) = self.holds() {
            let end = self.log.tail().durable;
            let mut asked = self.new_base_request();
            if asked.is_empty() && self.rejoin {
                asked = crate::rejoin::REJOIN_REASON.into();
            }
            if start <= end && asked.is_empty() {
                return Err(ApplyError::Diverged {
                    primary_start: start,
                    standby_end: end,
                    beyond_bytes: start.bytes_until(end, self.log.tail().lg_max.max(1)),
                    holds,
                });
            }
            let why = if start > end {
                "its log starts past the standby's durable end (log the standby never got was removed)"
            } else {
                asked.as_str()
            };
            tracing::warn!(base = %b.base_id, log_start = %start, durable = %end, reason = %b.reason,
                "the primary sends a new base; taking it because {why}: staging it beside the current mirror, which stays as it is until the new base is complete");
            self.stage(b.base_id, start, true)?;
            if let Some(r) = self.rebase.as_mut() {
                r.discard_after = b.discard_after.map(Into::into);
            }
        } else {
            self.start_base(b.base_id, start)?;
        }
        Ok(Applied::default())
    }

    /// FileStart: a database file of the base starts.
    fn on_file_start(&mut self, f: FileStart) -> Result<Applied, ApplyError> {
        self.base()?;
        self.files.start(&self.dir.root, &self.dir.incoming(), f)?;
        Ok(Applied::default())
    }

    /// FileChunk: bytes of the file being received.
    fn on_file_chunk(&mut self, c: FileChunk) -> Result<Applied, ApplyError> {
        let len = self.files.chunk(c)?;
        if let Some(r) = self.rebase.as_mut() {
            r.sent_bytes += len;
        }
        Ok(Applied {
            file_bytes: len,
            log_bytes: 0,
        })
    }

    /// FileSame: a range of a staged file that the mirror's own file
    /// already holds.
    fn on_file_same(&mut self, f: FileSame) -> Result<Applied, ApplyError> {
        // A replacement base refers to the mirror's files only in a
        // rejoin, whose Hello sent their digests.
        let rejoin = self.rejoin;
        if self.rebase.as_ref().is_none_or(|r| r.replaces && !rejoin) {
            return Err(ApplyError::Protocol("FileSame outside a rebase".into()));
        }
        let base_id = self.base()?.base_id.clone();
        let dir = &self.dir;
        let len = self.files.same(&dir.root, f, |name, offset, data| {
            crate::scrub::digests::check_reused(dir, &base_id, name, offset, data)
        })?;
        if let Some(r) = self.rebase.as_mut() {
            r.reused_bytes += len;
        }
        Ok(Applied::default())
    }

    /// FileEnd: the file is complete: placed under its name, fsynced, recorded.
    fn on_file_end(&mut self, e: FileEnd) -> Result<Applied, ApplyError> {
        if let Some(r) = self.rebase.as_mut() {
            let placed = self.files.end(e, &self.dir.rebase_dir())?;
            r.base.complete_files.insert(placed.name);
            return Ok(Applied::default());
        }
        let placed = self.files.end(e, &self.dir.root)?;
        let base_id = self.base()?.base_id.clone();
        let name = placed.name.clone();
        base_files::record_page_digests(&self.dir, &base_id, placed)
            .map_err(io_err(format!("recording the page digests of {name}")))?;
        self.base_mut()?.complete_files.insert(name);
        self.save()?;
        Ok(Applied::default())
    }

    /// BaseFilesDone: every file of the base has arrived.
    fn on_base_files_done(&mut self, d: BaseFilesDone) -> Result<Applied, ApplyError> {
        let at: LogPosition = d.consistent_at.unwrap_or_default().into();
        if let Some(r) = self.rebase.as_mut() {
            r.base.files_done = true;
            r.base.consistent_at = Some(at);
            tracing::info!(consistent_at = %at, sent = r.sent_bytes, reused = r.reused_bytes, "staged base files complete");
            return Ok(Applied::default());
        }
        let base = self.base_mut()?;
        base.files_done = true;
        base.consistent_at = Some(at);
        self.save()?;
        tracing::info!(consistent_at = %at, "base files complete");
        Ok(Applied::default())
    }

    /// LogChunk: log records, appended by the log writer (the staged
    /// one during a replacement base).
    fn on_log_chunk(&mut self, c: LogChunk) -> Result<Applied, ApplyError> {
        self.base()?;
        let log = self.staged_log.as_mut().unwrap_or(&mut self.log);
        log.append(c.file, c.offset, &c.data, &c.blake3, c.file_size)
    }

    fn base(&self) -> Result<&BaseState, ApplyError> {
        self.state
            .base
            .as_ref()
            .ok_or_else(|| ApplyError::Protocol("file or log data before BaseStart".into()))
    }

    fn base_mut(&mut self) -> Result<&mut BaseState, ApplyError> {
        self.state
            .base
            .as_mut()
            .ok_or_else(|| ApplyError::Protocol("file or log data before BaseStart".into()))
    }

    /// What the mirror holds that a new base would discard, or `None` if
    /// it holds nothing (no base, or one without a complete file or log).
    fn holds(&self) -> Option<String> {
        let base = self.state.base.as_ref()?;
        let end = self.log.tail().durable;
        if base.complete_files.is_empty() && end <= base.log_start {
            return None;
        }
        Some(format!(
            "base {} ({} complete file(s){}) with log from {} to {}",
            base.base_id,
            base.complete_files.len(),
            if base.files_done {
                ", all of them"
            } else {
                ", copy unfinished"
            },
            base.log_start,
            end
        ))
    }

    /// Page digests of the base's database files, for a RebaseRequest.
    pub fn page_digests(&self) -> Result<Vec<tandem_shared::wire::PageDigests>, ApplyError> {
        match &self.state.base {
            Some(base) => base_files::page_digests(&self.dir, base),
            None => Ok(Vec::new()),
        }
    }

    /// Makes everything written durable. Returns the position to
    /// acknowledge: the staged log's while a replacement base is staged
    /// (it is durable, and it is the primary's history), else the mirror's.
    pub fn sync(&mut self) -> Result<LogPosition, ApplyError> {
        let mirror = self.log.sync()?;
        match self.staged_log.as_mut() {
            Some(w) => w.sync(),
            None => Ok(mirror),
        }
    }

    /// Would a promotion now hold what [`Mirror::sync`] returns? Not while
    /// a replacement base is staged (sync reports its log, which the
    /// mirror does not hold until the swap), nor before the mirror is
    /// recoverable.
    pub fn promotable(&self) -> bool {
        self.staged_log.is_none() && self.recoverable()
    }

    /// Is the mirror a recoverable environment right now?
    pub fn recoverable(&self) -> bool {
        self.state.is_recoverable(self.log.tail().durable)
    }

    #[cfg(test)]
    fn fail_after_steps(&mut self, n: Option<usize>) {
        self.steps.fail_after = n;
    }
}

/// Finishes a swap a crashed `run` left pending (for `promote`, which must
/// not recover a half-swapped directory). The caller holds the lock.
pub fn finish_interrupted_swap(dir: &StandbyDir) -> Result<(), ApplyError> {
    let mut state = dir.load_state()?;
    if state.pending_swap.is_some() {
        tracing::warn!("finishing an interrupted swap of a staged base first");
        swap::finish(
            dir,
            &mut state,
            crate::archive_hold::DEFAULT_CAP_BYTES,
            &mut Steps::default(),
        )?;
    }
    Ok(())
}

/// The log writer of the base in `state`, after fsync and verification.
fn open_log(dir: &StandbyDir, state: &StandbyState) -> Result<LogWriter, ApplyError> {
    match &state.base {
        Some(b) => LogWriter::recover(
            &dir.root,
            &state.log_dir,
            &dir.incoming(),
            b.log_start,
            &dir.broken_log_dir(),
        ),
        None => Ok(LogWriter::empty(
            &dir.root,
            &state.log_dir,
            &dir.incoming(),
            LogPosition::ZERO,
        )),
    }
}

fn clear_incoming(dir: &StandbyDir) -> io::Result<()> {
    for e in std::fs::read_dir(dir.incoming())?.flatten() {
        remove_if_exists(&e.path())?;
    }
    Ok(())
}

#[cfg(test)]
mod tests;
