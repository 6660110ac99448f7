//! Why the mirror refused a message from the primary, or failed to store
//! it. Its own module so the mirror's parts (log writer, file receiver,
//! swap) share one error type without importing each other.

use tandem_shared::durable::ControlFileError;
use tandem_shared::ioerror::IoError;
use tandem_shared::wirepath::PathError;
use tandem_shared::LogPosition;

/// Largest database file the standby accepts (a sanity bound on FileStart).
pub const MAX_FILE_SIZE: u64 = 1 << 40;

#[derive(Debug, thiserror::Error)]
pub enum ApplyError {
    #[error("refused file name: {0}")]
    Path(#[from] PathError),
    #[error("chunk for unknown file {0:?} (no FileStart for it)")]
    UnknownFile(String),
    #[error(
        "chunk for {name} at offset {offset} + {len} bytes runs past its declared size {size}"
    )]
    PastDeclaredSize {
        name: String,
        offset: u64,
        len: u64,
        size: u64,
    },
    #[error("chunk for {name} at offset {got}, expected offset {expected}")]
    OutOfOrder {
        name: String,
        expected: u64,
        got: u64,
    },
    #[error("blake3 mismatch for {what}: the chunk was corrupted in transit and was not written")]
    Digest { what: String },
    #[error("log chunk at {got} does not continue the standby's log, which ends at {expected}")]
    LogGap {
        expected: LogPosition,
        got: LogPosition,
    },
    #[error("log chunk at {at} is not a run of complete, verified records: {why}")]
    InvalidLog { at: LogPosition, why: String },
    #[error("file {name} of {size} bytes is larger than the {MAX_FILE_SIZE}-byte limit")]
    TooLarge { name: String, size: u64 },
    #[error("environment mismatch: this directory mirrors environment {ours}, the primary serves {theirs}")]
    IdentityMismatch { ours: String, theirs: String },
    #[error(
        "FENCED: this standby has seen epoch {ours}, the primary is at the older epoch {theirs}: a standby was \
         promoted past it, so it is fenced: a newer primary exists. Nothing was written. Point this standby at the current primary"
    )]
    Fenced { ours: u64, theirs: u64 },
    /// The primary's epoch history gives an epoch another start than the
    /// one this standby knows: two promotions made the same epoch.
    #[error("{0}. Nothing was written; find out which primary is current before pointing this standby at it")]
    HistoryConflict(#[from] tandem_shared::epochs::HistoryConflict),
    /// The primary offered a new base although this standby holds log the
    /// primary's history does not continue (a primary rolled back, restored
    /// from an older copy, or that lost its unsynced tail).
    #[error(
        "diverged: the primary offers a new base whose log starts at {primary_start}, but this standby \
         holds {holds}, durable to {standby_end} ({beyond_bytes} bytes of log at or beyond the primary's \
         start); taking the new base would discard them. Nothing was changed. Either promote this standby \
         (it may hold transactions the primary lost), or discard what it holds with \
         `tandem-standby run --start-over`"
    )]
    Diverged {
        primary_start: LogPosition,
        standby_end: LogPosition,
        beyond_bytes: u64,
        holds: String,
    },
    #[error("protocol violation: {0}")]
    Protocol(String),
    #[error("disk full while {0}: nothing after the last acknowledged position was kept; free space and the standby resumes")]
    DiskFull(String),
    /// Not a full disk: that is [`ApplyError::DiskFull`] (see the `From`).
    #[error(transparent)]
    Io(IoError),
    #[error(transparent)]
    State(#[from] ControlFileError),
}

impl ApplyError {
    /// Errors that no retry can fix: the operator must act.
    pub fn is_permanent(&self) -> bool {
        matches!(
            self,
            ApplyError::IdentityMismatch { .. }
                | ApplyError::Fenced { .. }
                | ApplyError::HistoryConflict(_)
                | ApplyError::Diverged { .. }
        )
    }
}

/// A full disk (ENOSPC, EDQUOT) is `DiskFull` naming what was being done,
/// any other I/O error `Io`: `map_err(io_err(what))?` in the mirror's parts.
impl From<IoError> for ApplyError {
    fn from(e: IoError) -> Self {
        if e.is_disk_full() {
            ApplyError::DiskFull(e.what)
        } else {
            ApplyError::Io(e)
        }
    }
}

/// What applying a message changed.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct Applied {
    pub log_bytes: u64,
    pub file_bytes: u64,
}
