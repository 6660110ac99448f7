//! Swapping a staged base into the mirror: a rebase (new database files
//! over the same log) or a replacement base (new files *and* a new log,
//! after a gap or when the operator started over).
//!
//! The swap is a sequence of durable steps, each of which can be repeated,
//! so an interrupted swap is always finished from what is on disk:
//! 1. the staged base is recorded as `pending_swap` (with its staged log
//!    range, for a replacement base) while `base` still names the old one;
//! 2. each staged file is renamed over its place, then its directory
//!    fsynced; a staged file that is missing was moved, because the staging
//!    area is never cleared while a swap is pending;
//! 3. what the new base does not own is removed: the old base's other
//!    database files, its log files before the new start (kept aside for a
//!    continuous archive that lacks them, see [`crate::archive_hold`]) and,
//!    for a replacement base, its log files after the new log's last;
//! 4. the new base is recorded and the pending swap cleared;
//! 5. the staging area is removed.
//!
//! A rebase's directory is recoverable at every step (files copied at
//! different times recover with the log from the earliest base boundary,
//! BDB-NOTES.md §7, and the old logs go only after every file is in place). A
//! replacement base is not recoverable between 2 and 4, which is why a
//! pending swap is finished before anything else reads or changes the
//! directory: at open, at session start, before a new base or rebase, and
//! by `promote`.

use crate::mirror::apply_error::ApplyError;
use crate::mirror::dirs::{create_dirs_durably, remove_if_exists};
use crate::mirror::logwriter::{checked_log_dir, log_numbers};
use crate::state::{StandbyDir, StandbyState};
use std::io;
use tandem_shared::durable::remove_tree_durably;
use tandem_shared::durable::{fsync_dir, ControlFileError};
use tandem_shared::ioerror::{io_err, is_disk_full};
use tandem_shared::logfile::log_file_name;
use tandem_shared::wirepath;

/// The swap's durable steps, counted so tests can fail each one in turn.
#[derive(Debug, Default)]
pub struct Steps {
    /// Fail before the step after this many (tests only).
    #[cfg(test)]
    pub fail_after: Option<usize>,
}

impl Steps {
    pub fn step(&mut self, what: &str) -> Result<(), ApplyError> {
        #[cfg(test)]
        if let Some(left) = self.fail_after.as_mut() {
            if *left == 0 {
                return Err(ApplyError::Io(tandem_shared::IoError::new(
                    format!("injected failure before {what}"),
                    io::Error::other("injected by a test"),
                )));
            }
            *left -= 1;
        }
        let _ = what;
        Ok(())
    }
}

/// Stores the state. Not stored: goes back to what is, so that nothing (a
/// Hello, the status) claims a state that is not on disk, e.g. "base files
/// done" after a BaseFilesDone that met a full disk.
pub fn save_state(dir: &StandbyDir, state: &mut StandbyState) -> Result<(), ApplyError> {
    let Err(e) = dir.store_state(state) else {
        return Ok(());
    };
    if let Ok(stored) = dir.load_state() {
        *state = stored;
    }
    match e {
        ControlFileError::Io { source, .. } if is_disk_full(&source) => {
            Err(ApplyError::DiskFull("saving the standby's state".into()))
        }
        e => Err(e.into()),
    }
}

/// Finishes the pending swap recorded in `state` (steps 2 to 5; repeating
/// a step that was done is harmless). Returns the number of log files the
/// new base no longer needs that were removed or held for the archive.
pub fn finish(
    dir: &StandbyDir,
    state: &mut StandbyState,
    archive_hold_cap: u64,
    steps: &mut Steps,
) -> Result<usize, ApplyError> {
    let Some(new) = state.pending_swap.clone() else {
        return Ok(0);
    };
    let staged_log = state.pending_swap_log;
    let (root, staging) = (dir.root.clone(), dir.rebase_dir());
    for name in &new.complete_files {
        let staged = wirepath::resolve_under(&staging, name)?;
        if !staged.exists() {
            continue; // moved before an interruption
        }
        steps.step(&format!("moving {name} into place"))?;
        let path = wirepath::resolve_under(&root, name)?;
        let parent = path.parent().unwrap_or(&root).to_path_buf();
        create_dirs_durably(&root, &parent)
            .map_err(io_err(format!("creating the directory of {name}")))?;
        std::fs::rename(&staged, &path).map_err(io_err(format!("moving {name} into place")))?;
        fsync_dir(&parent).map_err(io_err("fsync of a directory"))?;
    }
    // Idempotent: a swap finished after a crash records the same digests.
    crate::scrub::digests::on_swap_in(dir, &new)
        .map_err(io_err("recording the new base's page digests"))?;
    let log_dir = checked_log_dir(&root, &state.log_dir)?;
    if let Some(log) = staged_log {
        let staged_dir = checked_log_dir(&staging, &state.log_dir)?;
        create_dirs_durably(&root, &log_dir).map_err(io_err("creating the log directory"))?;
        for n in log.first..=log.last {
            let from = staged_dir.join(log_file_name(n));
            if !from.exists() {
                continue;
            }
            steps.step(&format!("moving log file {n} into place"))?;
            std::fs::rename(&from, log_dir.join(log_file_name(n)))
                .map_err(io_err(format!("moving log file {n} into place")))?;
            fsync_dir(&log_dir).map_err(io_err("fsync of the log directory"))?;
        }
    }
    if let Some(old) = &state.base {
        for name in old.complete_files.difference(&new.complete_files) {
            let Ok(p) = wirepath::resolve_under(&root, name) else {
                continue;
            };
            steps.step(&format!("removing {name}"))?;
            remove_if_exists(&p).map_err(io_err(format!("removing {name}")))?;
            fsync_dir(p.parent().unwrap_or(&root)).map_err(io_err("fsync of a directory"))?;
        }
    }
    steps.step("retiring old log files")?;
    let (deleted, held) =
        crate::archive_hold::retire_logs(dir, &log_dir, new.log_start.file, archive_hold_cap)
            .map_err(io_err("removing log files the new base does not need"))?;
    if held > 0 {
        tracing::info!(held, "log files the continuous archive has not copied yet were moved to .tandem/archive-hold");
    }
    let mut removed = deleted + held;
    if let Some(log) = staged_log {
        removed += remove_logs_after(&log_dir, log.last, steps)?;
    }
    state.base = Some(new);
    state.pending_swap = None;
    state.pending_swap_log = None;
    steps.step("recording the new base")?;
    save_state(dir, state)?;
    steps.step("removing the staging area")?;
    remove_tree_durably(&staging).map_err(io_err("removing the staging area"))?;
    Ok(removed)
}

/// Removes the old history's log files after a replacement base's last.
fn remove_logs_after(
    log_dir: &std::path::Path,
    last: u32,
    steps: &mut Steps,
) -> Result<usize, ApplyError> {
    let mut removed = 0;
    let numbers = log_numbers(log_dir).map_err(io_err("listing the log directory"))?;
    for n in numbers.into_iter().filter(|n| *n > last) {
        steps.step(&format!("removing old log file {n}"))?;
        match std::fs::remove_file(log_dir.join(log_file_name(n))) {
            Ok(()) => removed += 1,
            Err(e) if e.kind() == io::ErrorKind::NotFound => {}
            Err(e) => return Err(io_err(format!("removing old log file {n}"))(e).into()),
        }
    }
    if removed > 0 {
        fsync_dir(log_dir).map_err(io_err("fsync of the log directory"))?;
    }
    Ok(removed)
}
