//! Writes a database file being received: on a thread of its own, with
//! direct I/O (`O_DIRECT`) where the file system allows it, so that the
//! receiver checks the next chunk while the disk writes this one, and the
//! bytes never pass through the page cache.
//!
//! Why not the page cache: a buffered `pwrite` copies every byte into
//! page-cache pages the kernel must first find. On this project's VMs
//! memory freed to the host (free page reporting) is faulted back in page by
//! page when the kernel reuses it, and that copy was measured at 2 of the
//! standby's 3 CPU-seconds per GiB of a base copy (perf: 42 % of both
//! daemons' samples in `copy_folio_from_iter_atomic`); `dd` into a fresh
//! file shows the same (1.5 s of system time per GiB after a few idle
//! seconds, 0.25 s right after a free). Direct writes take the bytes from a
//! few reused, aligned buffers instead: no page-cache copy, no dirty pages
//! to write back later (the 10 GiB base no longer evicts the primary's
//! cache or anything else), and on any machine one memory copy less.
//!
//! What this changes and what not: only the bytes' path to the disk. The
//! receiver hands a chunk to [`FileWriter::write`] only after its blake3
//! matched, as before; a file is still placed under its name only after
//! [`FileWriter::finish`] returned (every write done) and the receiver's
//! `fsync` (which makes direct writes durable too: it commits the extents
//! they allocated and flushes the disk's cache), rename and directory
//! fsync. A write error (a full disk) is reported by the next call, still
//! before anything is placed.
//!
//! Direct I/O needs the buffer, the file offset and the length aligned to
//! the device's block: the part of a write that is not (a file's short
//! tail, `DB_CONFIG`, a file system without `O_DIRECT` such as an old
//! tmpfs, which refuses the open) is written through the page cache with
//! write-behind ([`crate::mirror::write_behind`]), exactly as before.

use crate::mirror::write_behind::WriteBehind;
use std::fs::{File, OpenOptions};
use std::io;
use std::os::unix::fs::{FileExt, OpenOptionsExt};
use std::path::Path;
use std::sync::mpsc;
use std::thread::JoinHandle;

/// Alignment of direct writes (buffer address, file offset, length): a
/// multiple of every block size Linux file systems use here (512, 4096).
pub const ALIGN: usize = 4096;
/// Bytes gathered before they are handed to the writing thread: larger
/// writes keep the disk busier than 1 MiB chunks one at a time (measured
/// with `dd oflag=direct`: 4 MiB writes 30 % faster than 1 MiB ones).
pub const BUFFER: usize = 4 << 20;
/// Buffers per file: one being filled, the others being written. Bounds
/// the bytes received but not yet written (and the memory) to
/// `BUFFERS * BUFFER`.
pub const BUFFERS: usize = 3;

/// A buffer whose data starts on an [`ALIGN`] boundary.
struct Aligned {
    raw: Vec<u8>,
    /// Where the aligned data starts in `raw`.
    start: usize,
    len: usize,
    /// Bytes it holds when full (a multiple of [`ALIGN`]).
    cap: usize,
}

impl Aligned {
    fn new(cap: usize) -> Self {
        let raw = vec![0u8; cap + ALIGN];
        let start = raw.as_ptr().align_offset(ALIGN);
        Self {
            raw,
            start,
            len: 0,
            cap,
        }
    }

    fn data(&self) -> &[u8] {
        &self.raw[self.start..self.start + self.len]
    }

    /// Appends what fits of `data`; returns how much.
    fn fill(&mut self, data: &[u8]) -> usize {
        let n = (self.cap - self.len).min(data.len());
        let at = self.start + self.len;
        self.raw[at..at + n].copy_from_slice(&data[..n]);
        self.len += n;
        n
    }
}

/// One write for the thread: `buf` at `offset`.
struct Job {
    buf: Aligned,
    offset: u64,
}

/// Appends to one file through a writing thread. Dropping it without
/// [`Self::finish`] waits for the thread (nothing keeps writing into a file
/// the receiver is about to remove).
pub struct FileWriter {
    /// The buffer being filled, at file offset `written - filling.len`.
    filling: Option<Aligned>,
    /// Bytes handed over so far (written, being written, or in `filling`).
    written: u64,
    jobs: Option<mpsc::SyncSender<Job>>,
    /// Buffers coming back from the thread, or its first write error.
    done: mpsc::Receiver<io::Result<Aligned>>,
    /// Buffers back from the thread, ready to fill.
    free: Vec<Aligned>,
    /// Buffers made so far (at most [`BUFFERS`]), and their size.
    made: usize,
    buffer: usize,
    thread: Option<JoinHandle<WriteSide>>,
    /// The thread's write error, kept to be returned again (io::Error is
    /// not Clone): its raw OS error when it has one (ENOSPC stays ENOSPC).
    failed: Option<(io::ErrorKind, Option<i32>, String)>,
}

impl std::fmt::Debug for FileWriter {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("FileWriter")
            .field("written", &self.written)
            .finish_non_exhaustive()
    }
}

/// A finished file: its (buffered) descriptor, for the receiver's fsync.
pub struct Finished {
    pub file: File,
    /// Bytes that went to the disk directly (the rest through the page cache).
    pub direct_bytes: u64,
}

/// What the writing thread owns.
struct WriteSide {
    file: File,
    direct: Option<File>,
    direct_bytes: u64,
    behind: WriteBehind,
}

impl FileWriter {
    /// Creates (truncates) `path` and starts its writing thread. `size`:
    /// the bytes expected (a small file gets small buffers).
    pub fn create(path: &Path, size: u64) -> io::Result<Self> {
        let file = OpenOptions::new()
            .write(true)
            .create(true)
            .truncate(true)
            .open(path)?;
        // A second descriptor for the aligned part; without it (EINVAL: the
        // file system has no direct I/O) every byte goes through `file`.
        let direct = OpenOptions::new()
            .write(true)
            .custom_flags(libc::O_DIRECT)
            .open(path)
            .ok();
        let side = WriteSide {
            file,
            direct,
            direct_bytes: 0,
            behind: WriteBehind::default(),
        };
        let (jobs, jobs_rx) = mpsc::sync_channel::<Job>(BUFFERS);
        let (done_tx, done) = mpsc::channel();
        let thread = std::thread::Builder::new()
            .name("file-writer".into())
            .spawn(move || side.run(jobs_rx, done_tx))?;
        Ok(Self {
            filling: None,
            written: 0,
            jobs: Some(jobs),
            done,
            free: Vec::new(),
            made: 0,
            buffer: usize::try_from(size)
                .unwrap_or(BUFFER)
                .clamp(ALIGN, BUFFER)
                .next_multiple_of(ALIGN),
            thread: Some(thread),
            failed: None,
        })
    }

    /// Bytes handed to [`Self::write`] so far.
    #[cfg(test)]
    pub fn written(&self) -> u64 {
        self.written
    }

    /// Appends `data` (already checked) at [`Self::written`]. Returns the
    /// error of an earlier write, if any: nothing after it counts.
    pub fn write(&mut self, mut data: &[u8]) -> io::Result<()> {
        self.collect()?;
        while !data.is_empty() {
            // A full buffer goes to the thread only once more bytes follow:
            // the last buffer of a file waits for `finish`, so a FileEnd
            // refused before it (a planted symlink) leaves the last bytes
            // unwritten, whatever the file's size.
            let mut buf = match self.filling.take() {
                Some(b) if b.len < b.cap => b,
                Some(full) => {
                    self.hand_over(full)?;
                    self.free_buffer()?
                }
                None => self.free_buffer()?,
            };
            let n = buf.fill(data);
            data = &data[n..];
            self.written += n as u64;
            self.filling = Some(buf);
        }
        Ok(())
    }

    /// Writes everything handed over and waits for it; returns the file
    /// for the receiver's fsync.
    pub fn finish(mut self) -> io::Result<Finished> {
        self.collect()?;
        if let Some(buf) = self.filling.take() {
            self.hand_over(buf)?;
        }
        drop(self.jobs.take());
        let side = self
            .thread
            .take()
            .map(JoinHandle::join)
            .transpose()
            .map_err(|_| io::Error::other("the file-writing thread panicked"))?
            .ok_or_else(|| io::Error::other("the file-writing thread is gone"))?;
        // Its last word: an error after the last buffer it gave back.
        self.collect()?;
        Ok(Finished {
            file: side.file,
            direct_bytes: side.direct_bytes,
        })
    }

    /// A buffer to fill: one given back, a new one while fewer than
    /// [`BUFFERS`] exist, else the next one the thread gives back (waiting
    /// for its write: the back-pressure).
    fn free_buffer(&mut self) -> io::Result<Aligned> {
        if let Some(b) = self.free.pop() {
            return Ok(b);
        }
        if self.made < BUFFERS {
            self.made += 1;
            return Ok(Aligned::new(self.buffer));
        }
        match self.done.recv() {
            Ok(r) => self.take_back(r),
            Err(_) => Err(self.failure()),
        }
    }

    fn hand_over(&mut self, buf: Aligned) -> io::Result<()> {
        let offset = self.written - buf.len as u64;
        let sent = match &self.jobs {
            Some(jobs) => jobs.send(Job { buf, offset }).is_ok(),
            None => false,
        };
        if sent {
            Ok(())
        } else {
            // The thread stopped: it sent its error before it did.
            self.collect()?;
            Err(self.failure())
        }
    }

    /// Takes the buffers the thread gave back (without waiting); the
    /// thread's error, if it reported one.
    fn collect(&mut self) -> io::Result<()> {
        self.failed()?;
        while let Ok(r) = self.done.try_recv() {
            let b = self.take_back(r)?;
            self.free.push(b);
        }
        Ok(())
    }

    fn take_back(&mut self, r: io::Result<Aligned>) -> io::Result<Aligned> {
        match r {
            Ok(mut b) => {
                b.len = 0;
                Ok(b)
            }
            Err(e) => {
                self.failed = Some((e.kind(), e.raw_os_error(), e.to_string()));
                Err(e)
            }
        }
    }

    fn failed(&self) -> io::Result<()> {
        match &self.failed {
            None => Ok(()),
            Some((kind, raw, msg)) => Err(match raw {
                Some(code) => io::Error::from_raw_os_error(*code),
                None => io::Error::new(*kind, msg.clone()),
            }),
        }
    }

    fn failure(&self) -> io::Error {
        self.failed()
            .err()
            .unwrap_or_else(|| io::Error::other("the file-writing thread ended"))
    }
}

impl Drop for FileWriter {
    fn drop(&mut self) {
        drop(self.jobs.take());
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

impl WriteSide {
    fn run(
        mut self,
        jobs: mpsc::Receiver<Job>,
        done: mpsc::Sender<io::Result<Aligned>>,
    ) -> WriteSide {
        while let Ok(job) = jobs.recv() {
            match self.write(job.buf.data(), job.offset) {
                Ok(()) => {
                    if done.send(Ok(job.buf)).is_err() {
                        break;
                    }
                }
                Err(e) => {
                    let _ = done.send(Err(e));
                    break; // nothing after a failed write is written
                }
            }
        }
        self
    }

    /// Writes `data` at `offset`: its aligned part directly when it can,
    /// the rest through the page cache.
    fn write(&mut self, data: &[u8], offset: u64) -> io::Result<()> {
        let mut done = 0;
        let aligned =
            offset.is_multiple_of(ALIGN as u64) && (data.as_ptr() as usize).is_multiple_of(ALIGN);
        if let (true, Some(direct)) = (aligned, &self.direct) {
            let whole = data.len() - data.len() % ALIGN;
            while done < whole {
                match direct.write_at(&data[done..whole], offset + done as u64) {
                    Ok(0) => break,
                    Ok(n) => {
                        done += n;
                        self.direct_bytes += n as u64;
                        if !n.is_multiple_of(ALIGN) {
                            break; // the rest is no longer aligned
                        }
                    }
                    Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                    Err(e) if e.raw_os_error() == Some(libc::EINVAL) => {
                        // This file system or device wants another
                        // alignment: the page cache for the rest of the file.
                        self.direct = None;
                        break;
                    }
                    Err(e) => return Err(e),
                }
            }
        }
        if done < data.len() {
            self.file
                .write_all_at(&data[done..], offset + done as u64)?;
            self.behind.wrote(&self.file, offset + data.len() as u64)?;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::{FileWriter, BUFFER};

    /// Whatever the cut (aligned chunks, odd sizes, a short tail), the file
    /// holds exactly the bytes written, in order.
    #[test]
    fn the_file_holds_exactly_what_was_written() {
        let dir = tempfile::tempdir().expect("tempdir");
        for cuts in [
            vec![1 << 20; 9],
            vec![4096, 1, 4095, BUFFER, 3 * BUFFER + 17, 100],
            vec![7],
            vec![],
        ] {
            // Buffers of 4 MiB, and of 8 KiB (a size hint of 5000 bytes).
            for hint in [1 << 30, 5000] {
                let path = dir.path().join("f");
                let mut w = FileWriter::create(&path, hint).expect("create");
                let mut all = Vec::new();
                for (i, len) in cuts.iter().enumerate() {
                    let piece: Vec<u8> = (0..*len)
                        .map(|j| (j.wrapping_mul(31) ^ (i * 7)) as u8)
                        .collect();
                    w.write(&piece).expect("write");
                    all.extend_from_slice(&piece);
                }
                assert_eq!(w.written(), all.len() as u64);
                let done = w.finish().expect("finish");
                done.file.sync_all().expect("fsync");
                assert_eq!(std::fs::read(&path).expect("read"), all, "cuts {cuts:?}");
                if direct_io_works(dir.path()) && all.len() >= BUFFER {
                    // The aligned part went around the page cache.
                    assert!(done.direct_bytes >= BUFFER as u64, "cuts {cuts:?}");
                }
            }
        }
    }

    fn direct_io_works(dir: &std::path::Path) -> bool {
        use std::os::unix::fs::OpenOptionsExt;
        std::fs::OpenOptions::new()
            .write(true)
            .create(true)
            .truncate(true)
            .custom_flags(libc::O_DIRECT)
            .open(dir.join("probe"))
            .is_ok()
    }

    /// A write that fails (a full disk: /dev/full answers ENOSPC) is
    /// reported by a later call with its OS error, never lost, and the
    /// writer stops there.
    #[test]
    fn a_failed_write_is_reported_with_its_os_error() {
        let mut w =
            FileWriter::create(std::path::Path::new("/dev/full"), 1 << 30).expect("open /dev/full");
        let piece = vec![1u8; 1 << 20];
        let mut failed = None;
        for _ in 0..64 {
            if let Err(e) = w.write(&piece) {
                failed = Some(e);
                break;
            }
        }
        let e = match failed {
            Some(e) => e,
            None => w.finish().err().expect("finish reports the failed write"),
        };
        assert_eq!(e.raw_os_error(), Some(libc::ENOSPC), "{e}");
    }

    /// A file system without direct I/O (tmpfs on older kernels) gets every
    /// byte through the page cache: the same file.
    #[test]
    fn without_direct_io_every_byte_goes_through_the_page_cache() {
        let dir = match tempfile::tempdir_in("/dev/shm") {
            Ok(d) => d,
            Err(_) => return, // no tmpfs here: the other test covers ext4
        };
        let path = dir.path().join("f");
        let mut w = FileWriter::create(&path, 1 << 30).expect("create");
        let data: Vec<u8> = (0..(BUFFER * 2 + 12345)).map(|i| (i % 251) as u8).collect();
        w.write(&data).expect("write");
        let done = w.finish().expect("finish");
        if !direct_io_works(dir.path()) {
            assert_eq!(done.direct_bytes, 0);
        }
        assert_eq!(std::fs::read(&path).expect("read"), data);
    }
}
