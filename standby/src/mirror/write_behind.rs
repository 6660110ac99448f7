//! Write-behind for a file being received: the disk writes a base copy's
//! bytes while the next chunks arrive, instead of all at once in the fsync
//! that ends the file.
//!
//! Without it, a file's bytes sit dirty in the page cache until `FileEnd`,
//! whose fsync then writes the whole file while nothing else moves: the
//! network and the disk take turns (measured: the copy kept less than one
//! of two cores busy). Here every chunk's writeback is started as soon as it
//! is written (`sync_file_range(SYNC_FILE_RANGE_WRITE)`, which does not
//! wait), and the receiver waits only for bytes written more than
//! [`WINDOW`] ago: the disk stays busy, the fsync at the end finds little
//! left to do, and the dirty pages one copy holds stay bounded however
//! large the environment (a 10 GiB file never sits dirty in memory).
//!
//! This is only scheduling: nothing here is a durability claim. A file still
//! becomes visible only after the receiver's fsync, rename and directory
//! fsync, exactly as before (`sync_file_range` neither flushes metadata nor
//! the disk's cache).

use std::fs::File;
use std::io;
use std::os::fd::AsRawFd;

/// Bytes of a file that may be written but not yet on their way to disk
/// before the receiver waits for the oldest of them: enough to keep the
/// disk's queue full (tens of MB/s per MiB of latency), small against memory.
pub const WINDOW: u64 = 32 << 20;

/// How far a file's writeback has been started and waited for.
#[derive(Debug, Default)]
pub struct WriteBehind {
    /// Writeback started for `[0, started)`.
    started: u64,
    /// Writeback waited for on `[0, waited)`.
    waited: u64,
    /// The file system does not support it: write-behind is off.
    off: bool,
}

impl WriteBehind {
    /// Bytes `[0, written)` of `file` have been written: starts their
    /// writeback, and waits for what was written more than [`WINDOW`] ago.
    pub fn wrote(&mut self, file: &File, written: u64) -> io::Result<()> {
        if self.off {
            return Ok(());
        }
        if written > self.started {
            self.range(file, self.started, written, libc::SYNC_FILE_RANGE_WRITE)?;
            self.started = written;
        }
        let upto = written.saturating_sub(WINDOW);
        if upto > self.waited {
            self.range(
                file,
                self.waited,
                upto,
                libc::SYNC_FILE_RANGE_WAIT_BEFORE
                    | libc::SYNC_FILE_RANGE_WRITE
                    | libc::SYNC_FILE_RANGE_WAIT_AFTER,
            )?;
            self.waited = upto;
        }
        Ok(())
    }

    /// Writeback started so far (for tests).
    #[cfg(test)]
    pub fn started(&self) -> u64 {
        self.started
    }

    /// Writeback waited for so far (for tests).
    #[cfg(test)]
    pub fn waited(&self) -> u64 {
        self.waited
    }

    fn range(&mut self, file: &File, from: u64, to: u64, flags: libc::c_uint) -> io::Result<()> {
        let (Ok(at), Ok(len)) = (i64::try_from(from), i64::try_from(to - from)) else {
            return Err(io::Error::from(io::ErrorKind::InvalidInput));
        };
        // SAFETY: a plain system call on a descriptor we own; no memory.
        let r = unsafe { libc::sync_file_range(file.as_raw_fd(), at, len, flags) };
        if r == 0 {
            return Ok(());
        }
        let e = io::Error::last_os_error();
        match e.raw_os_error() {
            // A file system or kernel without it: the final fsync does all
            // the work, as it always did.
            Some(libc::ENOSYS | libc::EINVAL | libc::ESPIPE | libc::EOPNOTSUPP) => {
                self.off = true;
                Ok(())
            }
            Some(libc::EINTR) => Ok(()),
            // EIO and the like: the disk refused the bytes; the fsync would
            // say the same, later.
            _ => Err(e),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::{WriteBehind, WINDOW};
    use std::os::unix::fs::FileExt;

    #[test]
    fn writeback_is_started_for_every_chunk_and_awaited_one_window_behind() {
        let dir = tempfile::tempdir().expect("tempdir");
        let f = std::fs::File::create(dir.path().join("f")).expect("create");
        let mut wb = WriteBehind::default();
        let chunk = vec![7u8; 1 << 20];
        let mut written = 0u64;
        while written < WINDOW + (3 << 20) {
            f.write_all_at(&chunk, written).expect("write");
            written += chunk.len() as u64;
            wb.wrote(&f, written).expect("write-behind");
            assert_eq!(
                wb.started(),
                written,
                "every chunk's writeback starts at once"
            );
            assert_eq!(wb.waited(), written.saturating_sub(WINDOW));
        }
        assert_eq!(wb.waited(), 3 << 20);
        // Nothing new written: nothing to do.
        wb.wrote(&f, written).expect("again");
        assert_eq!(wb.started(), written);
    }
}
