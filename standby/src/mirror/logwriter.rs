//! The log writer: appends verified log records to one destination (the
//! mirror, or the staging area of a replacement base), makes them durable,
//! and is the only place that says how far the log is durable.
//!
//! Rules it enforces:
//! - bytes are written only if they continue the verified record chain
//!   exactly where the log ends (record 0 of file n points at the last
//!   record of file n-1), after their blake3 matches;
//! - a new log file appears under its name only once it holds its first
//!   records durably; the previous file is fsynced before it;
//! - `durable` moves only in [`LogWriter::sync`], after the fsync;
//! - at open ([`LogWriter::recover`]) every log file of the base and its
//!   directory are fsynced *before* anything counts as durable (bytes a
//!   crash left in the page cache are not on disk until then), and the
//!   record chain is verified across all files, not only the last: a break
//!   before the end is where the durable log ends, loudly, and files past it
//!   are moved out of the environment to `.tandem/broken-log/`.

use crate::mirror::apply_error::Applied;
use crate::mirror::apply_error::ApplyError;
use crate::mirror::dirs::create_dirs_durably;
use std::fs::{File, OpenOptions};
use std::io;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use tandem_shared::durable::fsync_dir;
use tandem_shared::ioerror::io_err;
use tandem_shared::logfile::{self, parse_log_file_name, walk, walk_file, WalkStop};
use tandem_shared::wirepath::{self, PathError};
use tandem_shared::LogPosition;

/// The end of a log.
#[derive(Debug, Clone, Default)]
pub struct LogTail {
    /// Just past the last record written (fsynced or not).
    pub written: LogPosition,
    /// Just past the last record known to be on disk (acknowledgeable).
    pub durable: LogPosition,
    /// Offset of the last record in `written.file` (or, at offset 0, in the
    /// file before it): the next record's `prev`.
    pub last_record: Option<u32>,
    /// blake3 of the last record, for the resume handshake.
    pub last_record_digest: Vec<u8>,
    /// The log file size from the newest file's header (0 if unknown).
    pub lg_max: u32,
}

impl LogTail {
    fn at(start: LogPosition) -> Self {
        Self {
            written: start,
            durable: start,
            ..Default::default()
        }
    }
}

/// Appends to the log under `root/log_dir`.
#[derive(Debug)]
pub struct LogWriter {
    root: PathBuf,
    log_dir: String,
    /// Where a new file is prepared before it gets its name.
    scratch: PathBuf,
    tail: LogTail,
    /// `tail` as of the last fsync (or open): where a session resumes.
    synced: LogTail,
    open_log: Option<(u32, File)>,
    dirty: bool,
}

impl LogWriter {
    /// An empty log that starts at `start` (a new base).
    pub fn empty(root: &Path, log_dir: &str, scratch: &Path, start: LogPosition) -> Self {
        Self {
            root: root.to_path_buf(),
            log_dir: log_dir.to_owned(),
            scratch: scratch.to_path_buf(),
            tail: LogTail::at(start),
            synced: LogTail::at(start),
            open_log: None,
            dirty: false,
        }
    }

    /// Opens an existing log after a restart: fsyncs it, verifies the chain
    /// across every file from `start`, moves files past a break aside, and
    /// zeroes bytes past the verified end of the last file (a write cut
    /// short) so BDB never reads them.
    pub fn recover(
        root: &Path,
        log_dir: &str,
        scratch: &Path,
        start: LogPosition,
        broken_dir: &Path,
    ) -> Result<Self, ApplyError> {
        let mut w = Self::empty(root, log_dir, scratch, start);
        let dir = w.checked_dir()?;
        let numbers = run_from(&dir, start.file).map_err(io_err("listing the standby's log"))?;
        let mut paths = Vec::with_capacity(numbers.len());
        for n in &numbers {
            paths.push(w.checked_path(*n)?);
        }
        let chain = verify_chain(&numbers, &paths, start, true)
            .map_err(io_err("verifying the standby's log"))?;
        if dir.is_dir() {
            fsync_dir(&dir).map_err(io_err("fsync of the log directory"))?;
        }
        if !chain.past_break.is_empty() {
            tracing::error!(
                durable_end = %chain.tail.durable,
                files = ?chain.past_break,
                "THE STANDBY'S LOG RECORD CHAIN IS BROKEN before its last file: it is durable only up to \
                 the break; the files after it are moved to .tandem/broken-log (outside the environment) \
                 and the primary sends the log again from the break"
            );
            create_dirs_durably(broken_dir, broken_dir)
                .map_err(io_err("creating the broken-log directory"))?;
            for n in &chain.past_break {
                let from = w.checked_path(*n)?;
                std::fs::rename(&from, broken_dir.join(logfile::log_file_name(*n)))
                    .map_err(io_err(format!("moving log file {n} past the break aside")))?;
            }
            fsync_dir(&dir).map_err(io_err("fsync of the log directory"))?;
            fsync_dir(broken_dir).map_err(io_err("fsync of the broken-log directory"))?;
        }
        w.tail = chain.tail.clone();
        w.synced = chain.tail;
        w.zero_past_end()
            .map_err(io_err("clearing a partial log write"))?;
        Ok(w)
    }

    pub fn tail(&self) -> &LogTail {
        &self.tail
    }

    /// The log now lives under another root (a staged log swapped into the
    /// mirror): files are reopened from there.
    pub fn rehome(&mut self, root: &Path) {
        self.root = root.to_path_buf();
        self.open_log = None;
    }

    /// The log directory, refused if reached through a symlink: old logs
    /// are removed by listing it, which must never touch files outside.
    pub fn checked_dir(&self) -> Result<PathBuf, PathError> {
        checked_log_dir(&self.root, &self.log_dir)
    }

    /// The path of log file `number`, refusing a symlink anywhere on the
    /// way: a link planted in the directory must not redirect a write, or
    /// the zeroing of a torn tail, out of it.
    pub fn checked_path(&self, number: u32) -> Result<PathBuf, PathError> {
        checked_log_path(&self.root, &self.log_dir, number)
    }

    fn zero_past_end(&self) -> io::Result<()> {
        let end = self.tail.written;
        if end.file == 0 {
            return Ok(());
        }
        let path = self.checked_path(end.file).map_err(io::Error::other)?;
        let Ok(f) = OpenOptions::new().read(true).write(true).open(&path) else {
            return Ok(());
        };
        let mut probe = [0u8; 16];
        let n = f.read_at(&mut probe, u64::from(end.offset))?;
        if probe[..n].iter().all(|b| *b == 0) {
            return Ok(());
        }
        let len = f.metadata()?.len().saturating_sub(u64::from(end.offset));
        // Punching keeps the size; where the filesystem cannot, write zeros.
        let punched = rustix::fs::fallocate(
            &f,
            rustix::fs::FallocateFlags::PUNCH_HOLE | rustix::fs::FallocateFlags::KEEP_SIZE,
            u64::from(end.offset),
            len,
        );
        if punched.is_err() {
            let zeros = vec![0u8; len.min(1 << 20) as usize];
            let mut at = u64::from(end.offset);
            let stop = at + len;
            while at < stop {
                let n = zeros.len().min((stop - at) as usize);
                f.write_all_at(&zeros[..n], at)?;
                at += n as u64;
            }
        }
        f.sync_data()
    }

    /// Forgets what was written since the last fsync (a session that ended
    /// early may have written verified records it never acknowledged).
    ///
    /// The Hello must describe one point: its durable position *and* the
    /// digest of the record before it, but `last_record_digest` belongs to
    /// `written`. With the two apart the primary sees "a different history",
    /// or, at the start of a file, resumes at `durable` and every chunk is
    /// refused as a gap, forever. The primary sends the rest again.
    pub fn rewind_to_synced(&mut self) {
        if self.tail.written != self.tail.durable {
            self.tail = self.synced.clone();
            self.open_log = None;
            self.dirty = false;
        }
    }

    /// Appends one chunk of log records.
    pub fn append(
        &mut self,
        file_no: u32,
        offset: u32,
        data: &[u8],
        digest: &[u8],
        file_size: u64,
    ) -> Result<Applied, ApplyError> {
        let at = LogPosition::new(file_no, offset);
        let cur = self.tail.written;
        let continues = at == cur;
        let next_file = file_no == cur.file + 1 && offset == 0 && cur.offset > 0;
        if !(continues || next_file) {
            return Err(ApplyError::LogGap {
                expected: cur,
                got: at,
            });
        }
        if blake3::hash(data).as_bytes()[..] != digest[..] {
            return Err(ApplyError::Digest {
                what: format!("log chunk at {at}"),
            });
        }
        if data.is_empty() {
            return Err(ApplyError::InvalidLog {
                at,
                why: "empty chunk".into(),
            });
        }
        // The record chain continues across files: record 0 of file n
        // points at the last record of file n-1.
        let w = walk(data, offset, self.tail.last_record);
        if w.stop != WalkStop::EndOfBuffer || w.end as usize != offset as usize + data.len() {
            let why = match w.stop {
                WalkStop::Invalid(why) => why.to_string(),
                other => format!("{other:?} after {} verified bytes", w.end - offset),
            };
            return Err(ApplyError::InvalidLog { at, why });
        }
        if u64::from(w.end) > file_size.max(u64::from(w.end)) || file_size > u64::from(u32::MAX) {
            return Err(ApplyError::InvalidLog {
                at,
                why: format!("declared file size {file_size} is impossible"),
            });
        }
        if offset == 0 {
            // Resolved before anything is written: a refused name changes nothing.
            let path = self.checked_path(file_no)?;
            if next_file {
                self.sync()?; // the previous file is complete: make it durable first
            }
            self.create_file(file_no, &path, data, file_size)?;
        } else {
            let f = self.file(file_no)?;
            f.write_all_at(data, u64::from(offset))
                .map_err(io_err(format!("writing log file {file_no}")))?;
            self.dirty = true;
        }
        let last = w.last_record.unwrap_or(offset);
        if let Some(h) = w.header {
            self.tail.lg_max = h.lg_max;
        }
        self.tail.written = LogPosition::new(file_no, w.end);
        self.tail.last_record = Some(last);
        self.tail.last_record_digest = blake3::hash(&data[(last - offset) as usize..])
            .as_bytes()
            .to_vec();
        Ok(Applied {
            log_bytes: data.len() as u64,
            file_bytes: 0,
        })
    }

    /// A new log file appears under its name only once it holds its first
    /// records durably, pre-allocated to the primary's size like BDB's own.
    fn create_file(
        &mut self,
        file_no: u32,
        path: &Path,
        data: &[u8],
        file_size: u64,
    ) -> Result<(), ApplyError> {
        let name = logfile::log_file_name(file_no);
        let temp = self.scratch.join(&name);
        let f = OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(true)
            .open(&temp)
            .map_err(io_err(format!("creating {name}")))?;
        f.write_all_at(data, 0)
            .map_err(io_err(format!("writing {name}")))?;
        f.set_len(file_size.max(data.len() as u64))
            .map_err(io_err(format!("sizing {name}")))?;
        f.sync_all().map_err(io_err(format!("fsync of {name}")))?;
        let parent = path.parent().unwrap_or(&self.root).to_path_buf();
        create_dirs_durably(&self.root, &parent).map_err(io_err("creating the log directory"))?;
        std::fs::rename(&temp, path).map_err(io_err(format!("renaming {name} into place")))?;
        fsync_dir(&parent).map_err(io_err("fsync of the log directory"))?;
        self.open_log = Some((file_no, f));
        self.dirty = false;
        Ok(())
    }

    /// The open log file `file_no`; the path is resolved (and checked)
    /// only when the file is not open yet, not for every chunk.
    fn file(&mut self, file_no: u32) -> Result<&File, ApplyError> {
        if self.open_log.as_ref().map(|o| o.0) != Some(file_no) {
            let path = self.checked_path(file_no)?;
            let f = OpenOptions::new()
                .read(true)
                .write(true)
                .open(&path)
                .map_err(io_err(format!("opening {}", path.display())))?;
            self.open_log = Some((file_no, f));
        }
        match &self.open_log {
            Some((_, f)) => Ok(f),
            None => Err(ApplyError::Protocol(format!(
                "log file {file_no} is not open"
            ))),
        }
    }

    /// Makes everything written durable. Returns the new durable position.
    pub fn sync(&mut self) -> Result<LogPosition, ApplyError> {
        if self.dirty {
            if let Some((n, f)) = &self.open_log {
                f.sync_data()
                    .map_err(io_err(format!("fsync of log file {n}")))?;
            }
            self.dirty = false;
        }
        self.tail.durable = self.tail.written;
        self.synced = self.tail.clone();
        Ok(self.tail.durable)
    }
}

pub fn checked_log_dir(root: &Path, log_dir: &str) -> Result<PathBuf, PathError> {
    match log_dir {
        "" => Ok(root.to_path_buf()),
        rel => wirepath::resolve_under(root, rel),
    }
}

pub fn checked_log_path(root: &Path, log_dir: &str, number: u32) -> Result<PathBuf, PathError> {
    let name = logfile::log_file_name(number);
    let rel = if log_dir.is_empty() {
        name
    } else {
        format!("{log_dir}/{name}")
    };
    wirepath::resolve_under(root, &rel)
}

/// Log file numbers in `dir`, ascending.
pub fn log_numbers(dir: &Path) -> io::Result<Vec<u32>> {
    let mut numbers: Vec<u32> = match std::fs::read_dir(dir) {
        Ok(entries) => entries
            .flatten()
            .filter_map(|e| e.file_name().to_str().and_then(parse_log_file_name))
            .collect(),
        Err(e) if e.kind() == io::ErrorKind::NotFound => Vec::new(),
        Err(e) => return Err(e),
    };
    numbers.sort_unstable();
    Ok(numbers)
}

/// The log files of a base: from `first` on, the contiguous run first, then
/// any later (orphaned) numbers, which are past the chain by definition.
fn run_from(dir: &Path, first: u32) -> io::Result<Vec<u32>> {
    Ok(log_numbers(dir)?
        .into_iter()
        .filter(|n| *n >= first)
        .collect())
}

struct Chain {
    tail: LogTail,
    /// Files present but not part of the verified chain.
    past_break: Vec<u32>,
}

/// Walks the files `numbers` (ascending, from the base's first file) and
/// returns where the verified chain ends. `full`: every file is fsynced and
/// walked with its `prev` link to the one before; otherwise only the newest
/// of the contiguous run is read (a cheap read-only view for status).
fn verify_chain(
    numbers: &[u32],
    paths: &[PathBuf],
    start: LogPosition,
    full: bool,
) -> io::Result<Chain> {
    let contiguous = numbers
        .iter()
        .enumerate()
        .take_while(|(i, n)| **n == start.file + *i as u32)
        .count();
    let mut chain = Chain {
        tail: LogTail::at(start),
        past_break: numbers[contiguous..].to_vec(),
    };
    let first = if full {
        0
    } else {
        contiguous.saturating_sub(1)
    };
    let mut prev: Option<u32> = None;
    for i in first..contiguous {
        let f = File::open(&paths[i])?;
        if full {
            f.sync_all()?;
        }
        // The base's first file links back to a file the standby never
        // held; every later one must link to the last record before it.
        let w = walk_file(&f, if i == 0 || !full { None } else { prev })?;
        if i > 0 && full && w.records == 0 {
            chain.past_break = numbers[i..].to_vec();
            break;
        }
        let digest = match w.last_record {
            Some(at) => {
                let mut rec = vec![0u8; (w.end - at) as usize];
                f.read_exact_at(&mut rec, u64::from(at))?;
                blake3::hash(&rec).as_bytes().to_vec()
            }
            None => Vec::new(),
        };
        let end = LogPosition::new(numbers[i], w.end);
        chain.tail = LogTail {
            written: end,
            durable: end,
            last_record: w.last_record,
            last_record_digest: digest,
            lg_max: w.header.map_or(chain.tail.lg_max, |h| h.lg_max),
        };
        prev = w.last_record;
        if w.last_record.is_none() {
            // Not even a persist record: nothing after it can link.
            chain.past_break = numbers[i + 1..].to_vec();
            break;
        }
    }
    Ok(chain)
}

/// Reads the end of a base's log from the files, read-only and without
/// fsync: the verified end of the newest file of the contiguous run from
/// `start`. For status and the tools that read a directory `run` may own;
/// the writer's own open verifies the whole chain.
pub fn scan_log_tail(log_dir: &Path, start: LogPosition) -> io::Result<LogTail> {
    let numbers = run_from(log_dir, start.file)?;
    let paths: Vec<PathBuf> = numbers
        .iter()
        .map(|n| log_dir.join(logfile::log_file_name(*n)))
        .collect();
    Ok(verify_chain(&numbers, &paths, start, false)?.tail)
}
