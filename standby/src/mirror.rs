//! The standby's pristine mirror of the primary's environment: applies what
//! the primary sends, after checking it, and never lets recovery touch it.
//!
//! Rules this module enforces:
//! - a chunk is written only after its blake3 digest matches;
//! - a file name is accepted only if it stays inside the directory;
//! - database files are received under `.tandem/incoming/` and appear under
//!   their name only when complete and fsynced (then the directory is
//!   fsynced);
//! - log bytes must continue the verified record chain exactly where the
//!   mirror's log ends, and are fsynced before they are acknowledged.

use crate::state::{BaseState, StandbyDir, StandbyState};
use std::fs::{File, OpenOptions};
use std::io;
use std::os::fd::AsRawFd;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use tandem_shared::durable::{fsync_dir, ControlFileError};
use tandem_shared::envlayout::DB_CONFIG;
use tandem_shared::logfile::{self, parse_log_file_name, walk, walk_file, WalkStop};
use tandem_shared::wire::{primary_message::Kind, FileKind};
use tandem_shared::wirepath::{self, PathError};
use tandem_shared::LogPosition;

/// Largest database file the standby accepts (a sanity bound on FileStart).
const MAX_FILE_SIZE: u64 = 1 << 40;

#[derive(Debug, thiserror::Error)]
pub enum ApplyError {
    #[error("refused file name: {0}")]
    Path(#[from] PathError),
    #[error("chunk for unknown file {0:?} (no FileStart for it)")]
    UnknownFile(String),
    #[error("chunk for {name} at offset {offset} + {len} bytes runs past its declared size {size}")]
    PastDeclaredSize { name: String, offset: u64, len: u64, size: u64 },
    #[error("chunk for {name} at offset {got}, expected offset {expected}")]
    OutOfOrder { name: String, expected: u64, got: u64 },
    #[error("blake3 mismatch for {what}: the chunk was corrupted in transit and was not written")]
    Digest { what: String },
    #[error("log chunk at {got} does not continue the standby's log, which ends at {expected}")]
    LogGap { expected: LogPosition, got: LogPosition },
    #[error("log chunk at {at} is not a run of complete, verified records: {why}")]
    InvalidLog { at: LogPosition, why: String },
    #[error("file {name} of {size} bytes is larger than the {MAX_FILE_SIZE}-byte limit")]
    TooLarge { name: String, size: u64 },
    #[error("environment mismatch: this directory mirrors environment {ours}, the primary serves {theirs}")]
    IdentityMismatch { ours: String, theirs: String },
    #[error("fenced: this standby has seen epoch {ours}, the primary is at epoch {theirs} (a newer primary exists)")]
    Fenced { ours: u64, theirs: u64 },
    #[error("protocol violation: {0}")]
    Protocol(String),
    #[error("disk full while {0}: nothing after the last acknowledged position was kept; free space and the standby resumes")]
    DiskFull(String),
    #[error("{what}: {source}")]
    Io { what: String, source: io::Error },
    #[error(transparent)]
    State(#[from] ControlFileError),
}

impl ApplyError {
    /// Errors that no retry can fix: the operator must act.
    pub fn is_permanent(&self) -> bool {
        matches!(self, ApplyError::IdentityMismatch { .. } | ApplyError::Fenced { .. })
    }
}

fn io_err(what: impl Into<String>) -> impl FnOnce(io::Error) -> ApplyError {
    let what = what.into();
    move |source| {
        if source.raw_os_error() == Some(libc::ENOSPC) || source.raw_os_error() == Some(libc::EDQUOT) {
            ApplyError::DiskFull(what)
        } else {
            ApplyError::Io { what, source }
        }
    }
}

/// A database file being received.
struct Incoming {
    name: String,
    temp: PathBuf,
    file: File,
    size: u64,
    written: u64,
}

/// The end of the mirror's log.
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

/// What applying a message changed.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct Applied {
    pub log_bytes: u64,
    pub file_bytes: u64,
}

pub struct Mirror {
    pub dir: StandbyDir,
    pub state: StandbyState,
    pub tail: LogTail,
    incoming: Option<Incoming>,
    open_log: Option<(u32, File)>,
    dirty: bool,
}

impl Mirror {
    /// Opens the mirror for writing. Bytes past the verified end of the last
    /// log file (a write cut short) are zeroed so BDB never reads them.
    pub fn open(dir: StandbyDir) -> Result<Self, ApplyError> {
        dir.create().map_err(io_err("creating the standby directory"))?;
        let state = dir.load_state()?;
        let tail = scan_tail(&dir, &state).map_err(io_err("reading the standby's log"))?;
        clear_incoming(&dir).map_err(io_err("clearing incoming files"))?;
        let m = Self { dir, state, tail, incoming: None, open_log: None, dirty: false };
        m.zero_past_end().map_err(io_err("clearing a partial log write"))?;
        Ok(m)
    }

    fn zero_past_end(&self) -> io::Result<()> {
        let end = self.tail.written;
        if end.file == 0 || self.state.base.is_none() {
            return Ok(());
        }
        let path = self.log_path(end.file);
        let Ok(f) = OpenOptions::new().read(true).write(true).open(&path) else { return Ok(()) };
        let mut probe = [0u8; 16];
        let n = f.read_at(&mut probe, u64::from(end.offset))?;
        if probe[..n].iter().all(|b| *b == 0) {
            return Ok(());
        }
        let len = f.metadata()?.len().saturating_sub(u64::from(end.offset));
        // SAFETY: fallocate on an fd we own; punching keeps the size.
        let rc = unsafe {
            libc::fallocate(f.as_raw_fd(), libc::FALLOC_FL_PUNCH_HOLE | libc::FALLOC_FL_KEEP_SIZE, i64::from(end.offset), len as i64)
        };
        if rc != 0 {
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

    /// Forgets a file that was being received when the last connection
    /// ended: the primary sends it again from its start.
    pub fn begin_session(&mut self) {
        if let Some(inc) = self.incoming.take() {
            let _ = std::fs::remove_file(&inc.temp);
        }
    }

    fn log_path(&self, number: u32) -> PathBuf {
        self.dir.log_dir(&self.state).join(logfile::log_file_name(number))
    }

    fn save(&self) -> Result<(), ApplyError> {
        Ok(self.dir.store_state(&self.state)?)
    }

    /// Applies one message from the primary.
    pub fn apply(&mut self, kind: Kind) -> Result<Applied, ApplyError> {
        match kind {
            Kind::Welcome(w) => {
                if let Some(ours) = &self.state.env_id {
                    if *ours != w.env_id {
                        return Err(ApplyError::IdentityMismatch { ours: ours.clone(), theirs: w.env_id });
                    }
                }
                if self.state.epoch > w.epoch {
                    return Err(ApplyError::Fenced { ours: self.state.epoch, theirs: w.epoch });
                }
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
                    || self.state.log_dir != w.log_dir;
                if changed {
                    self.state.env_id = Some(w.env_id);
                    self.state.epoch = w.epoch;
                    self.state.log_dir = w.log_dir;
                    self.save()?;
                }
                Ok(Applied::default())
            }
            Kind::BaseStart(b) => {
                let start: LogPosition = b.log_start.unwrap_or_default().into();
                if start.file == 0 || start.offset != 0 {
                    return Err(ApplyError::Protocol(format!("base log start {start} is not the start of a log file")));
                }
                if self.state.env_id.is_none() {
                    return Err(ApplyError::Protocol("BaseStart before Welcome".into()));
                }
                self.start_base(b.base_id, start)?;
                Ok(Applied::default())
            }
            Kind::FileStart(f) => {
                self.base()?;
                if let Some(open) = &self.incoming {
                    return Err(ApplyError::Protocol(format!("FileStart for {} while {} is incomplete", f.name, open.name)));
                }
                let path = wirepath::resolve_under(&self.dir.root, &f.name)?;
                let kind = FileKind::try_from(f.kind).map_err(|_| ApplyError::Protocol(format!("unknown file kind {}", f.kind)))?;
                let leaf = path.file_name().and_then(|n| n.to_str()).unwrap_or_default();
                let ok_kind = match kind {
                    FileKind::Config => f.name == DB_CONFIG,
                    FileKind::Database => leaf != DB_CONFIG && parse_log_file_name(leaf).is_none() && !leaf.starts_with("__db"),
                };
                if !ok_kind {
                    return Err(ApplyError::Protocol(format!("{} cannot be sent as a {:?} file", f.name, kind)));
                }
                if f.size > MAX_FILE_SIZE {
                    return Err(ApplyError::TooLarge { name: f.name, size: f.size });
                }
                let temp = self.dir.incoming().join(blake3::hash(f.name.as_bytes()).to_hex()[..24].to_string());
                let file = OpenOptions::new()
                    .write(true)
                    .create(true)
                    .truncate(true)
                    .open(&temp)
                    .map_err(io_err(format!("creating {}", temp.display())))?;
                self.incoming = Some(Incoming { name: f.name, temp, file, size: f.size, written: 0 });
                Ok(Applied::default())
            }
            Kind::FileChunk(c) => {
                let Some(inc) = self.incoming.as_mut().filter(|i| i.name == c.name) else {
                    return Err(ApplyError::UnknownFile(c.name));
                };
                let len = c.data.len() as u64;
                if c.offset != inc.written {
                    return Err(ApplyError::OutOfOrder { name: c.name, expected: inc.written, got: c.offset });
                }
                if c.offset + len > inc.size {
                    return Err(ApplyError::PastDeclaredSize { name: c.name, offset: c.offset, len, size: inc.size });
                }
                if blake3::hash(&c.data).as_bytes()[..] != c.blake3[..] {
                    return Err(ApplyError::Digest { what: format!("{} at offset {}", c.name, c.offset) });
                }
                inc.file.write_all_at(&c.data, c.offset).map_err(io_err(format!("writing {}", inc.name)))?;
                inc.written += len;
                Ok(Applied { file_bytes: len, log_bytes: 0 })
            }
            Kind::FileEnd(e) => {
                let Some(inc) = self.incoming.take_if(|i| i.name == e.name) else {
                    return Err(ApplyError::UnknownFile(e.name));
                };
                if e.size != inc.written {
                    return Err(ApplyError::Protocol(format!("{} ended at {} bytes but {} arrived", e.name, e.size, inc.written)));
                }
                self.install(inc)?;
                Ok(Applied::default())
            }
            Kind::BaseFilesDone(d) => {
                let at: LogPosition = d.consistent_at.unwrap_or_default().into();
                let base = self.base_mut()?;
                base.files_done = true;
                base.consistent_at = Some(at);
                self.save()?;
                tracing::info!(consistent_at = %at, "base files complete");
                Ok(Applied::default())
            }
            Kind::LogChunk(c) => self.append_log(c.file, c.offset, &c.data, &c.blake3, c.file_size),
            Kind::Heartbeat(_) => Ok(Applied::default()),
        }
    }

    fn base(&self) -> Result<&BaseState, ApplyError> {
        self.state.base.as_ref().ok_or_else(|| ApplyError::Protocol("file or log data before BaseStart".into()))
    }

    fn base_mut(&mut self) -> Result<&mut BaseState, ApplyError> {
        self.state.base.as_mut().ok_or_else(|| ApplyError::Protocol("file or log data before BaseStart".into()))
    }

    /// Drops the old base (its files and logs) and records the new one.
    fn start_base(&mut self, base_id: String, log_start: LogPosition) -> Result<(), ApplyError> {
        if let Some(old) = self.state.base.take() {
            tracing::warn!(old = %old.base_id, new = %base_id, "replacing the standby's base: it is not recoverable until the new base is complete");
            // Record "no base" first: a crash midway must not leave a state
            // that names files already deleted.
            self.save()?;
            for name in &old.complete_files {
                if let Ok(p) = wirepath::resolve_under(&self.dir.root, name) {
                    remove_if_exists(&p).map_err(io_err(format!("removing {name}")))?;
                }
            }
            let log_dir = self.dir.log_dir(&self.state);
            if let Ok(entries) = std::fs::read_dir(&log_dir) {
                for e in entries.flatten() {
                    if e.file_name().to_str().and_then(parse_log_file_name).is_some() {
                        remove_if_exists(&e.path()).map_err(io_err("removing an old log file"))?;
                    }
                }
            }
            fsync_dir(&self.dir.root).map_err(io_err("fsync of the standby directory"))?;
        }
        self.incoming = None;
        self.open_log = None;
        self.dirty = false;
        self.tail = LogTail { written: log_start, durable: log_start, ..Default::default() };
        self.state.base = Some(BaseState { base_id, log_start, ..Default::default() });
        self.save()
    }

    /// Makes a received file durable and gives it its name.
    fn install(&mut self, inc: Incoming) -> Result<(), ApplyError> {
        inc.file.sync_all().map_err(io_err(format!("fsync of {}", inc.name)))?;
        drop(inc.file);
        // Resolve again: a symlink may have appeared since FileStart.
        let path = wirepath::resolve_under(&self.dir.root, &inc.name)?;
        let parent = path.parent().unwrap_or(&self.dir.root).to_path_buf();
        create_dirs_durably(&self.dir.root, &parent).map_err(io_err(format!("creating the directory of {}", inc.name)))?;
        std::fs::rename(&inc.temp, &path).map_err(io_err(format!("renaming {} into place", inc.name)))?;
        fsync_dir(&parent).map_err(io_err("fsync of a directory"))?;
        self.base_mut()?.complete_files.insert(inc.name);
        self.save()
    }

    fn append_log(&mut self, file_no: u32, offset: u32, data: &[u8], digest: &[u8], file_size: u64) -> Result<Applied, ApplyError> {
        self.base()?;
        let at = LogPosition::new(file_no, offset);
        let cur = self.tail.written;
        let continues = at == cur;
        let next_file = file_no == cur.file + 1 && offset == 0 && cur.offset > 0;
        if !(continues || next_file) {
            return Err(ApplyError::LogGap { expected: cur, got: at });
        }
        if blake3::hash(data).as_bytes()[..] != digest[..] {
            return Err(ApplyError::Digest { what: format!("log chunk at {at}") });
        }
        if data.is_empty() {
            return Err(ApplyError::InvalidLog { at, why: "empty chunk".into() });
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
            return Err(ApplyError::InvalidLog { at, why: format!("declared file size {file_size} is impossible") });
        }
        if next_file {
            self.sync()?; // the previous file is complete: make it durable first
        }
        if offset == 0 {
            self.create_log_file(file_no, data, file_size)?;
        } else {
            let f = self.log_file(file_no)?;
            f.write_all_at(data, u64::from(offset)).map_err(io_err(format!("writing log file {file_no}")))?;
            self.dirty = true;
        }
        let last = w.last_record.unwrap_or(offset);
        self.tail.written = LogPosition::new(file_no, w.end);
        self.tail.last_record = Some(last);
        self.tail.last_record_digest = blake3::hash(&data[(last - offset) as usize..]).as_bytes().to_vec();
        Ok(Applied { log_bytes: data.len() as u64, file_bytes: 0 })
    }

    /// A new log file appears under its name only once it holds its first
    /// records durably, pre-allocated to the primary's size like BDB's own.
    fn create_log_file(&mut self, file_no: u32, data: &[u8], file_size: u64) -> Result<(), ApplyError> {
        let name = logfile::log_file_name(file_no);
        let rel = if self.state.log_dir.is_empty() { name.clone() } else { format!("{}/{}", self.state.log_dir, name) };
        let path = wirepath::resolve_under(&self.dir.root, &rel)?;
        let temp = self.dir.incoming().join(&name);
        let f = OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(true)
            .open(&temp)
            .map_err(io_err(format!("creating {name}")))?;
        f.write_all_at(data, 0).map_err(io_err(format!("writing {name}")))?;
        f.set_len(file_size.max(data.len() as u64)).map_err(io_err(format!("sizing {name}")))?;
        f.sync_all().map_err(io_err(format!("fsync of {name}")))?;
        let parent = path.parent().unwrap_or(&self.dir.root).to_path_buf();
        create_dirs_durably(&self.dir.root, &parent).map_err(io_err("creating the log directory"))?;
        std::fs::rename(&temp, &path).map_err(io_err(format!("renaming {name} into place")))?;
        fsync_dir(&parent).map_err(io_err("fsync of the log directory"))?;
        self.open_log = Some((file_no, f));
        self.dirty = false;
        Ok(())
    }

    fn log_file(&mut self, file_no: u32) -> Result<&File, ApplyError> {
        if self.open_log.as_ref().map(|o| o.0) != Some(file_no) {
            let path = self.log_path(file_no);
            let f = OpenOptions::new().read(true).write(true).open(&path).map_err(io_err(format!("opening {}", path.display())))?;
            self.open_log = Some((file_no, f));
        }
        Ok(&self.open_log.as_ref().expect("just set").1)
    }

    /// Makes everything written durable. Returns the new durable position.
    pub fn sync(&mut self) -> Result<LogPosition, ApplyError> {
        if self.dirty {
            if let Some((n, f)) = &self.open_log {
                f.sync_data().map_err(io_err(format!("fsync of log file {n}")))?;
            }
            self.dirty = false;
        }
        self.tail.durable = self.tail.written;
        Ok(self.tail.durable)
    }

    /// Is the mirror a recoverable environment right now?
    pub fn recoverable(&self) -> bool {
        is_recoverable(&self.state, self.tail.durable)
    }
}

pub fn is_recoverable(state: &StandbyState, durable: LogPosition) -> bool {
    state.base.as_ref().is_some_and(|b| b.files_done && b.consistent_at.is_some_and(|c| durable >= c))
}

fn remove_if_exists(p: &Path) -> io::Result<()> {
    match std::fs::remove_file(p) {
        Err(e) if e.kind() != io::ErrorKind::NotFound => Err(e),
        _ => Ok(()),
    }
}

fn clear_incoming(dir: &StandbyDir) -> io::Result<()> {
    for e in std::fs::read_dir(dir.incoming())?.flatten() {
        remove_if_exists(&e.path())?;
    }
    Ok(())
}

/// Creates `dir` (under `root`) and fsyncs each new directory's parent.
fn create_dirs_durably(root: &Path, dir: &Path) -> io::Result<()> {
    if dir.is_dir() {
        return Ok(());
    }
    let mut missing = Vec::new();
    let mut at = dir.to_path_buf();
    while !at.is_dir() && at.starts_with(root) {
        missing.push(at.clone());
        if !at.pop() {
            break;
        }
    }
    for d in missing.iter().rev() {
        std::fs::create_dir(d)?;
        fsync_dir(d.parent().unwrap_or(root))?;
    }
    Ok(())
}

/// Reads the end of the mirror's log from the files (read-only): the
/// verified end of the newest log file of the base.
pub fn scan_tail(dir: &StandbyDir, state: &StandbyState) -> io::Result<LogTail> {
    let Some(base) = &state.base else { return Ok(LogTail::default()) };
    let start = base.log_start;
    let log_dir = dir.log_dir(state);
    let mut numbers: Vec<u32> = match std::fs::read_dir(&log_dir) {
        Ok(entries) => entries.flatten().filter_map(|e| e.file_name().to_str().and_then(parse_log_file_name)).collect(),
        Err(e) if e.kind() == io::ErrorKind::NotFound => Vec::new(),
        Err(e) => return Err(e),
    };
    numbers.sort_unstable();
    // The contiguous run from the base's first file.
    let mut last = None;
    for n in numbers.iter().copied().filter(|n| *n >= start.file) {
        match last {
            None if n == start.file => last = Some(n),
            Some(l) if n == l + 1 => last = Some(n),
            _ => break,
        }
    }
    let Some(last) = last else {
        return Ok(LogTail { written: start, durable: start, ..Default::default() });
    };
    let f = File::open(log_dir.join(logfile::log_file_name(last)))?;
    let w = walk_file(&f, None)?;
    let end = LogPosition::new(last, w.end);
    let digest = match w.last_record {
        Some(at) => {
            let mut rec = vec![0u8; (w.end - at) as usize];
            f.read_exact_at(&mut rec, u64::from(at))?;
            blake3::hash(&rec).as_bytes().to_vec()
        }
        None => Vec::new(),
    };
    Ok(LogTail { written: end, durable: end, last_record: w.last_record, last_record_digest: digest, lg_max: w.header.map_or(0, |h| h.lg_max) })
}
