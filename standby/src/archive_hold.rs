//! Keeping the log a continuous archive has not copied yet.
//!
//! `tandem-standby archive --follow` registers itself in the standby
//! directory (`.tandem/archive-hold.json`, rewritten after every round with
//! the end of the log it has archived). While it is registered:
//!
//! - the standby reports that position in its Ack, and a primary with
//!   retention on keeps every log file from it on (see the primary's
//!   `retention`);
//! - log files the mirror stops needing (a rebase, or a new base) are not
//!   deleted if the archive lacks them: they move to `.tandem/archive-hold/`,
//!   outside the environment (recovery never sees them), where the archiver
//!   finishes the previous backup with them and then deletes them.
//!
//! `tandem-standby archive --dir DIR --release` ends the registration and
//! deletes the held files.

use crate::state::StandbyDir;
use serde::{Deserialize, Serialize};
use std::io;
use std::path::{Path, PathBuf};
use tandem_shared::durable::{fsync_dir, write_file_atomic};
use tandem_shared::logfile::{log_file_name, parse_log_file_name};
use tandem_shared::LogPosition;

const HOLD_FILE: &str = "archive-hold.json";
const HOLD_DIR: &str = "archive-hold";

/// A continuous archive's registration.
#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq, Eq)]
pub struct ArchiveHold {
    /// The archive directory, for operators.
    pub archive: String,
    /// The archive holds the log up to here.
    pub log_end: LogPosition,
    /// When `log_end` last moved.
    pub updated_unix_ms: u64,
}

pub fn hold_dir(dir: &StandbyDir) -> PathBuf {
    dir.meta().join(HOLD_DIR)
}

/// The registration, if any. An unreadable one holds everything (position
/// 0): keeping logs too long is recoverable, deleting them is not.
pub fn load(dir: &StandbyDir) -> Option<ArchiveHold> {
    let bytes = match std::fs::read(dir.meta().join(HOLD_FILE)) {
        Ok(b) => b,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return None,
        Err(e) => {
            tracing::warn!(error = %e, "cannot read the archive registration; holding every log file for the archive");
            return Some(ArchiveHold::default());
        }
    };
    Some(serde_json::from_slice(&bytes).unwrap_or_else(|e| {
        tracing::warn!(error = %e, "the archive registration is damaged; holding every log file for the archive");
        ArchiveHold::default()
    }))
}

pub fn store(dir: &StandbyDir, hold: &ArchiveHold) -> io::Result<()> {
    write_file_atomic(
        &dir.meta().join(HOLD_FILE),
        &serde_json::to_vec_pretty(hold)?,
    )
}

/// Ends the registration and deletes the held log files.
pub fn release(dir: &StandbyDir) -> io::Result<()> {
    match std::fs::remove_file(dir.meta().join(HOLD_FILE)) {
        Err(e) if e.kind() != io::ErrorKind::NotFound => return Err(e),
        _ => {}
    }
    delete_held(dir, u32::MAX)?;
    fsync_dir(&dir.meta())
}

/// Numbers of the log files held for the archive, ascending.
pub fn held_files(dir: &StandbyDir) -> Vec<u32> {
    let mut out: Vec<u32> = match std::fs::read_dir(hold_dir(dir)) {
        Ok(entries) => entries
            .flatten()
            .filter_map(|e| e.file_name().to_str().and_then(parse_log_file_name))
            .collect(),
        Err(_) => Vec::new(),
    };
    out.sort_unstable();
    out
}

/// The registration and the bytes held for it, for status.
pub fn observe(dir: &StandbyDir) -> (Option<ArchiveHold>, u64) {
    (load(dir), held_bytes(dir))
}

pub fn held_bytes(dir: &StandbyDir) -> u64 {
    held_files(dir)
        .iter()
        .filter_map(|n| std::fs::metadata(hold_dir(dir).join(log_file_name(*n))).ok())
        .map(|m| m.len())
        .sum()
}

/// Deletes held files numbered below `below`.
pub fn delete_held(dir: &StandbyDir, below: u32) -> io::Result<()> {
    let held = hold_dir(dir);
    for n in held_files(dir).into_iter().filter(|n| *n < below) {
        match std::fs::remove_file(held.join(log_file_name(n))) {
            Err(e) if e.kind() != io::ErrorKind::NotFound => return Err(e),
            _ => {}
        }
    }
    if held.is_dir() {
        fsync_dir(&held)?;
    }
    Ok(())
}

/// Most log bytes held for an archive by default; past it the oldest held
/// files are deleted (a stopped archiver must not fill the standby's disk
/// and stop replication).
pub const DEFAULT_CAP_BYTES: u64 = 10 << 30;

/// Takes the mirror's log files numbered below `below` out of `log_dir`:
/// those a registered archive still lacks move to the hold directory (at
/// most `cap_bytes` of them), the rest are deleted. Returns (deleted, held).
pub fn retire_logs(
    dir: &StandbyDir,
    log_dir: &Path,
    below: u32,
    cap_bytes: u64,
) -> io::Result<(usize, usize)> {
    let keep_from = load(dir).map(|h| h.log_end.file);
    let mut numbers: Vec<u32> = match std::fs::read_dir(log_dir) {
        Ok(entries) => entries
            .flatten()
            .filter_map(|e| e.file_name().to_str().and_then(parse_log_file_name))
            .filter(|n| *n < below)
            .collect(),
        Err(e) if e.kind() == io::ErrorKind::NotFound => Vec::new(),
        Err(e) => return Err(e),
    };
    numbers.sort_unstable();
    let held_dir = hold_dir(dir);
    let (mut deleted, mut held) = (0, 0);
    for n in numbers {
        let path = log_dir.join(log_file_name(n));
        let target = held_dir.join(log_file_name(n));
        // A file already held is an older history the archive needs more
        // than this one (held files are only removed once archived).
        if keep_from.is_some_and(|from| n >= from) && !target.exists() {
            std::fs::create_dir_all(&held_dir)?;
            std::fs::rename(&path, &target)?;
            held += 1;
        } else {
            match std::fs::remove_file(&path) {
                Err(e) if e.kind() != io::ErrorKind::NotFound => return Err(e),
                _ => deleted += 1,
            }
        }
    }
    if held > 0 {
        fsync_dir(&held_dir)?;
        fsync_dir(&dir.meta())?;
        enforce_cap(dir, cap_bytes)?;
    }
    fsync_dir(log_dir)?;
    Ok((deleted, held))
}

/// Deletes the oldest held files while they exceed `cap_bytes`, loudly.
fn enforce_cap(dir: &StandbyDir, cap_bytes: u64) -> io::Result<()> {
    let held_dir = hold_dir(dir);
    let sizes: Vec<(u32, u64)> = held_files(dir)
        .into_iter()
        .map(|n| {
            (
                n,
                std::fs::metadata(held_dir.join(log_file_name(n))).map_or(0, |m| m.len()),
            )
        })
        .collect();
    let mut total: u64 = sizes.iter().map(|(_, len)| len).sum();
    let mut below = 0;
    for (n, len) in sizes {
        if total <= cap_bytes {
            break;
        }
        total -= len;
        below = n + 1;
    }
    if below > 0 {
        tracing::error!(
            below = %log_file_name(below), cap_bytes,
            "RELEASING ARCHIVE HOLD on the standby: the continuous archive is further behind than --archive-hold-cap-mib \
             allows; held log files before this one are deleted, so point-in-time restore will have a gap there: \
             check `tandem-standby archive --follow`"
        );
        delete_held(dir, below)?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn touch_logs(dir: &Path, numbers: &[u32]) {
        std::fs::create_dir_all(dir).unwrap();
        for n in numbers {
            std::fs::write(dir.join(log_file_name(*n)), format!("log {n}")).unwrap();
        }
    }

    #[test]
    fn without_a_registration_retired_logs_are_deleted() {
        let t = tempfile::tempdir().unwrap();
        let dir = StandbyDir::new(t.path());
        dir.create().unwrap();
        touch_logs(t.path(), &[1, 2, 3]);
        assert_eq!(
            retire_logs(&dir, t.path(), 3, DEFAULT_CAP_BYTES).unwrap(),
            (2, 0)
        );
        assert!(held_files(&dir).is_empty());
        assert!(t.path().join(log_file_name(3)).exists());
    }

    #[test]
    fn logs_the_archive_lacks_move_to_the_hold_and_an_older_held_copy_wins() {
        let t = tempfile::tempdir().unwrap();
        let dir = StandbyDir::new(t.path());
        dir.create().unwrap();
        store(
            &dir,
            &ArchiveHold {
                archive: "/a".into(),
                log_end: LogPosition::new(2, 100),
                updated_unix_ms: 0,
            },
        )
        .unwrap();
        std::fs::create_dir_all(hold_dir(&dir)).unwrap();
        std::fs::write(hold_dir(&dir).join(log_file_name(3)), "older 3").unwrap();
        touch_logs(t.path(), &[1, 2, 3, 4]);
        assert_eq!(
            retire_logs(&dir, t.path(), 4, DEFAULT_CAP_BYTES).unwrap(),
            (2, 1)
        );
        assert_eq!(held_files(&dir), vec![2, 3]);
        assert_eq!(
            std::fs::read_to_string(hold_dir(&dir).join(log_file_name(3))).unwrap(),
            "older 3"
        );
        assert!(!t.path().join(log_file_name(2)).exists());
        release(&dir).unwrap();
        assert!(load(&dir).is_none() && held_files(&dir).is_empty());
    }

    #[test]
    fn a_damaged_registration_holds_everything() {
        let t = tempfile::tempdir().unwrap();
        let dir = StandbyDir::new(t.path());
        dir.create().unwrap();
        std::fs::write(dir.meta().join(HOLD_FILE), b"{not json").unwrap();
        touch_logs(t.path(), &[1, 2]);
        assert_eq!(
            retire_logs(&dir, t.path(), 3, DEFAULT_CAP_BYTES).unwrap(),
            (0, 2)
        );
    }

    #[test]
    fn past_the_cap_the_oldest_held_files_go() {
        let t = tempfile::tempdir().unwrap();
        let dir = StandbyDir::new(t.path());
        dir.create().unwrap();
        store(
            &dir,
            &ArchiveHold {
                archive: "/a".into(),
                log_end: LogPosition::new(1, 28),
                updated_unix_ms: 0,
            },
        )
        .unwrap();
        touch_logs(t.path(), &[1, 2, 3, 4]); // 5 bytes each
        assert_eq!(retire_logs(&dir, t.path(), 5, 10).unwrap(), (0, 4));
        assert_eq!(held_files(&dir), vec![3, 4]);
    }
}
