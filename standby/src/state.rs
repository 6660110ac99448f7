//! The standby's durable state, kept in `DIR/.tandem/state` (BDB ignores
//! the hidden directory): which environment it mirrors, the highest epoch it
//! has seen and the epoch history (where each promotion began in the log),
//! the base it holds and whether it was promoted. The log position
//! is not stored here: it is read from the log files themselves (the end of
//! their verified record chain), so it can never disagree with them.

use crate::mirror::logwriter::{scan_log_tail, LogTail};
use serde::{Deserialize, Serialize};
use std::collections::BTreeSet;
use std::fs::File;
use std::io;
use std::os::fd::AsRawFd;
use std::path::{Path, PathBuf};
use tandem_shared::durable::{ControlFile, ControlFileError};
use tandem_shared::epochs::EpochStart;
use tandem_shared::LogPosition;

pub const META_DIR: &str = ".tandem";
const STATE_FILE: &str = "state";
const LOCK_FILE: &str = "lock";
pub const STATUS_FILE: &str = "status.json";
pub const INCOMING_DIR: &str = "incoming";
const FORMAT_VERSION: u32 = 1;

#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq, Eq)]
pub struct StandbyState {
    /// The environment this directory mirrors; set on first contact.
    pub env_id: Option<String>,
    /// Highest epoch seen (from the primary, or made by a promotion).
    pub epoch: u64,
    /// Log directory relative to the home, from the primary's `DB_CONFIG`.
    pub log_dir: String,
    pub base: Option<BaseState>,
    /// A staged base (a rebase, or a replacement base) whose files are all
    /// in `.tandem/rebase/` and are being moved into place. Until the swap
    /// ends, `base` still names the base being replaced (so its files can
    /// be removed) and `.tandem/rebase/` is never cleared: a staged file
    /// missing from it was moved. Finished before anything else (at open,
    /// at session start, before a new base or rebase starts).
    #[serde(default)]
    pub pending_swap: Option<BaseState>,
    /// For a pending swap of a replacement base: its own log, staged too,
    /// which replaces every log file of the old base. `None`: a rebase,
    /// whose log is the mirror's.
    #[serde(default)]
    pub pending_swap_log: Option<StagedLog>,
    pub promoted: Option<Promotion>,
    /// Every epoch after the environment's first, oldest first: from the
    /// primary's Welcome, plus the one this directory's promotion made.
    /// A primary started on a promoted directory adopts it.
    #[serde(default)]
    pub history: Vec<EpochStart>,
}

impl StandbyState {
    /// Is a directory in this state, with its log durable to `durable`, a
    /// recoverable environment? Not while a swap is pending: a replacement
    /// base is half in place until the swap is finished.
    pub fn is_recoverable(&self, durable: LogPosition) -> bool {
        self.pending_swap.is_none()
            && self
                .base
                .as_ref()
                .is_some_and(|b| b.files_done && b.consistent_at.is_some_and(|c| durable >= c))
    }
}

#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq, Eq)]
pub struct BaseState {
    pub base_id: String,
    /// First log position the base needs (BDB-NOTES.md §7).
    pub log_start: LogPosition,
    /// Files of the base that are complete, fsynced and under their name.
    pub complete_files: BTreeSet<String>,
    /// Every file present when the base started has arrived.
    pub files_done: bool,
    /// With the log up to here, the base is recoverable.
    pub consistent_at: Option<LogPosition>,
    /// When the base started (for the rebase age threshold).
    #[serde(default)]
    pub started_unix_ms: u64,
}

/// The log files `first..=last` of a replacement base, staged under
/// `.tandem/rebase/<log_dir>/`.
#[derive(Debug, Clone, Copy, Default, Serialize, Deserialize, PartialEq, Eq)]
pub struct StagedLog {
    pub first: u32,
    pub last: u32,
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct Promotion {
    pub epoch: u64,
    pub unix_ms: u64,
    pub kind: String,
    pub recovered_to: Option<LogPosition>,
}

/// Paths inside a standby directory.
#[derive(Debug, Clone)]
pub struct StandbyDir {
    pub root: PathBuf,
}

impl StandbyDir {
    pub fn new(root: &Path) -> Self {
        Self {
            root: root.to_path_buf(),
        }
    }
    pub fn meta(&self) -> PathBuf {
        self.root.join(META_DIR)
    }
    pub fn state_path(&self) -> PathBuf {
        self.meta().join(STATE_FILE)
    }
    pub fn status_path(&self) -> PathBuf {
        self.meta().join(STATUS_FILE)
    }
    pub fn incoming(&self) -> PathBuf {
        self.meta().join(INCOMING_DIR)
    }
    /// Where a rebase or a replacement base stages its files (and, for a
    /// replacement base, its log) until it is complete.
    pub fn rebase_dir(&self) -> PathBuf {
        self.meta().join("rebase")
    }
    /// Where log files past a break in the record chain are kept.
    pub fn broken_log_dir(&self) -> PathBuf {
        self.meta().join("broken-log")
    }
    /// Reads the end of the mirror's log from the files (read-only, no
    /// fsync): the verified end of the newest log file of the base. For
    /// status, readiness, promote and the archive, which read a directory
    /// `run` may own.
    pub fn scan_tail(&self, state: &StandbyState) -> io::Result<LogTail> {
        let Some(base) = &state.base else {
            return Ok(LogTail::default());
        };
        scan_log_tail(&self.log_dir(state), base.log_start)
    }

    pub fn log_dir(&self, state: &StandbyState) -> PathBuf {
        self.root.join(&state.log_dir)
    }

    pub fn load_state(&self) -> Result<StandbyState, ControlFileError> {
        Ok(ControlFile::load(&self.state_path(), FORMAT_VERSION)?.unwrap_or_default())
    }

    pub fn store_state(&self, state: &StandbyState) -> Result<(), ControlFileError> {
        ControlFile::store(&self.state_path(), FORMAT_VERSION, state)
    }

    /// Creates the directory and its metadata directory if needed.
    pub fn create(&self) -> std::io::Result<()> {
        std::fs::create_dir_all(self.incoming())
    }

    /// Takes the directory's exclusive lock (held by `run` and `promote`)
    /// and writes this process's pid into the lock file for
    /// [`StandbyDir::lock_holder`]. Errors name the holder's pid when
    /// there is one.
    ///
    /// An open-file-description lock (F_OFD_SETLK), not a classic fcntl
    /// lock: a classic lock is dropped when the process closes *any*
    /// descriptor of the file, so an in-process `lock_holder` (status,
    /// promote's checks) silently released it; an OFD lock lives exactly
    /// as long as this [`DirLock`]'s descriptor, and conflicts with other
    /// descriptions in the same process too.
    pub fn lock(&self) -> Result<DirLock, LockError> {
        self.create().map_err(LockError::Io)?;
        let mut file = File::options()
            .create(true)
            .truncate(false)
            .read(true)
            .write(true)
            .open(self.meta().join(LOCK_FILE))
            .map_err(LockError::Io)?;
        let mut fl = flock_struct(libc::F_WRLCK as i16);
        // SAFETY: fcntl with a valid fd and a properly initialised flock.
        if unsafe { libc::fcntl(file.as_raw_fd(), libc::F_OFD_SETLK, &mut fl) } != 0 {
            return Err(LockError::Held {
                pid: self.lock_holder(),
            });
        }
        write_pid(&mut file).map_err(LockError::Io)?;
        Ok(DirLock { _file: file })
    }

    /// The pid of the process holding the lock, if any (F_OFD_GETLK: asks
    /// without taking it, so `status` never gets in `run`'s way). OFD
    /// locks have no owning pid, so the holder's pid is the one it wrote
    /// into the file; `None` also while a new holder has not written it.
    pub fn lock_holder(&self) -> Option<u32> {
        let path = self.meta().join(LOCK_FILE);
        let file = File::open(&path).ok()?;
        let mut fl = flock_struct(libc::F_RDLCK as i16);
        // SAFETY: as above.
        if unsafe { libc::fcntl(file.as_raw_fd(), libc::F_OFD_GETLK, &mut fl) } != 0 {
            return None;
        }
        if fl.l_type == libc::F_UNLCK as i16 {
            return None;
        }
        std::fs::read_to_string(&path).ok()?.trim().parse().ok()
    }
}

fn write_pid(file: &mut File) -> io::Result<()> {
    use std::io::{Seek, Write};
    file.set_len(0)?;
    file.rewind()?;
    writeln!(file, "{}", std::process::id())?;
    file.sync_data()
}

fn flock_struct(kind: i16) -> libc::flock {
    // SAFETY: flock is plain data; zero is a valid value for every field
    // (l_pid must be 0 for OFD locks).
    let mut fl: libc::flock = unsafe { std::mem::zeroed() };
    fl.l_type = kind;
    fl.l_whence = libc::SEEK_SET as i16;
    fl
}

/// Held while a process owns the standby directory.
#[derive(Debug)]
pub struct DirLock {
    _file: File,
}

#[derive(Debug, thiserror::Error)]
pub enum LockError {
    #[error("the standby directory is in use by another tandem-standby process{}", .pid.map(|p| format!(" (pid {p})")).unwrap_or_default())]
    Held { pid: Option<u32> },
    #[error("cannot lock the standby directory: {0}")]
    Io(std::io::Error),
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The trap the OFD lock closes: with a classic fcntl lock, the
    /// holder's own `lock_holder` call (which opens and closes the file)
    /// released the lock, and a second `lock` in the same process
    /// succeeded.
    #[test]
    fn the_lock_survives_the_holders_own_queries_and_excludes_a_second_holder() {
        let tmp = tempfile::tempdir().expect("tempdir");
        let dir = StandbyDir::new(tmp.path());
        assert_eq!(dir.lock_holder(), None);
        let lock = dir.lock().expect("first lock");
        for _ in 0..3 {
            assert_eq!(dir.lock_holder(), Some(std::process::id()));
        }
        match dir.lock() {
            Err(LockError::Held { pid }) => assert_eq!(pid, Some(std::process::id())),
            other => panic!("second lock in the same process: {other:?}"),
        }
        drop(lock);
        assert_eq!(dir.lock_holder(), None);
        let _again = dir.lock().expect("lock after release");
    }
}
