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
        matches!(
            self,
            ApplyError::IdentityMismatch { .. } | ApplyError::Fenced { .. }
        )
    }
}

fn is_disk_full(e: &io::Error) -> bool {
    e.raw_os_error() == Some(libc::ENOSPC) || e.raw_os_error() == Some(libc::EDQUOT)
}

fn io_err(what: impl Into<String>) -> impl FnOnce(io::Error) -> ApplyError {
    let what = what.into();
    move |source| {
        if is_disk_full(&source) {
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

/// A rebase in progress.
#[derive(Debug, Clone, Default)]
pub struct Rebase {
    pub base: BaseState,
    /// Bytes received over the network for the new base.
    pub sent_bytes: u64,
    /// Bytes copied from the standby's own files (FileSame).
    pub reused_bytes: u64,
}

/// A finished rebase, for logs and status.
#[derive(Debug, Clone, Default, serde::Serialize, serde::Deserialize, PartialEq)]
pub struct RebaseReport {
    pub base_id: String,
    pub log_start: LogPosition,
    pub sent_bytes: u64,
    pub reused_bytes: u64,
    pub removed_log_files: usize,
    pub unix_ms: u64,
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
    /// A rebase being received: the new base, staged beside the current one.
    pub rebase: Option<Rebase>,
    incoming: Option<Incoming>,
    open_log: Option<(u32, File)>,
    dirty: bool,
    /// `tail` as of the last fsync (or open, or new base): where the next
    /// session resumes (see `begin_session`).
    synced_tail: LogTail,
    /// Most log bytes kept for a continuous archive ([`crate::archive_hold`]).
    pub archive_hold_cap: u64,
}

impl Mirror {
    /// Opens the mirror for writing. Bytes past the verified end of the last
    /// log file (a write cut short) are zeroed so BDB never reads them.
    pub fn open(dir: StandbyDir) -> Result<Self, ApplyError> {
        dir.create()
            .map_err(io_err("creating the standby directory"))?;
        let state = dir.load_state()?;
        let tail = scan_tail(&dir, &state).map_err(io_err("reading the standby's log"))?;
        clear_incoming(&dir).map_err(io_err("clearing incoming files"))?;
        let mut m = Self {
            dir,
            state,
            synced_tail: tail.clone(),
            tail,
            rebase: None,
            incoming: None,
            open_log: None,
            dirty: false,
            archive_hold_cap: crate::archive_hold::DEFAULT_CAP_BYTES,
        };
        m.zero_past_end()
            .map_err(io_err("clearing a partial log write"))?;
        if let Some(new) = m.state.pending_swap.clone() {
            tracing::warn!(base = %new.base_id, "finishing an interrupted rebase swap");
            m.swap_in(new)?;
        }
        let _ = std::fs::remove_dir_all(m.dir.rebase_dir());
        Ok(m)
    }

    fn zero_past_end(&self) -> io::Result<()> {
        let end = self.tail.written;
        if end.file == 0 || self.state.base.is_none() {
            return Ok(());
        }
        let path = self.checked_log_path(end.file).map_err(io::Error::other)?;
        let Ok(f) = OpenOptions::new().read(true).write(true).open(&path) else {
            return Ok(());
        };
        let mut probe = [0u8; 16];
        let n = f.read_at(&mut probe, u64::from(end.offset))?;
        if probe[..n].iter().all(|b| *b == 0) {
            return Ok(());
        }
        let len = f.metadata()?.len().saturating_sub(u64::from(end.offset));
        // SAFETY: fallocate on an fd we own; punching keeps the size.
        let rc = unsafe {
            libc::fallocate(
                f.as_raw_fd(),
                libc::FALLOC_FL_PUNCH_HOLE | libc::FALLOC_FL_KEEP_SIZE,
                i64::from(end.offset),
                len as i64,
            )
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
        if self.rebase.take().is_some() {
            tracing::info!("abandoning an unfinished rebase; the standby will ask again");
            let _ = std::fs::remove_dir_all(self.dir.rebase_dir());
        }
        // A session that ended early (a refused message, a broken stream)
        // may have written verified records after the last fsync without
        // acknowledging them. The Hello must describe one point: its durable
        // position *and* the digest of the record before it, but
        // `last_record_digest` belongs to `written`. With the two apart the
        // primary sees "a different history" and starts a new base (deleting
        // this one), or, at the start of a file, resumes at `durable` and
        // every chunk is refused as a gap, forever. Go back to the last
        // fsync, as the refusal says ("nothing after the last acknowledged
        // position was kept"); the primary sends the rest again.
        if self.tail.written != self.tail.durable {
            self.tail = self.synced_tail.clone();
            self.open_log = None;
            self.dirty = false;
        }
    }

    /// The path of log file `number`, refusing a symlink anywhere on the
    /// way (the log directory or the file): a link planted in the directory
    /// must not redirect a write, or the zeroing of a torn tail, out of it.
    /// The log directory, refused if reached through a symlink: old logs
    /// are removed by listing it, which must never delete files outside the
    /// standby directory.
    fn checked_log_dir(&self) -> Result<PathBuf, PathError> {
        match self.state.log_dir.as_str() {
            "" => Ok(self.dir.root.clone()),
            rel => wirepath::resolve_under(&self.dir.root, rel),
        }
    }

    fn checked_log_path(&self, number: u32) -> Result<PathBuf, PathError> {
        let name = logfile::log_file_name(number);
        let rel = if self.state.log_dir.is_empty() {
            name
        } else {
            format!("{}/{}", self.state.log_dir, name)
        };
        wirepath::resolve_under(&self.dir.root, &rel)
    }

    fn save(&mut self) -> Result<(), ApplyError> {
        let Err(e) = self.dir.store_state(&self.state) else {
            return Ok(());
        };
        // Not stored: go back to what is, so that nothing (a Hello, the
        // status) claims a state that is not on disk, e.g. "base files done"
        // after a BaseFilesDone that met a full disk.
        if let Ok(stored) = self.dir.load_state() {
            self.state = stored;
        }
        match e {
            ControlFileError::Io { source, .. } if is_disk_full(&source) => {
                Err(ApplyError::DiskFull("saving the standby's state".into()))
            }
            e => Err(e.into()),
        }
    }

    /// Applies one message from the primary.
    pub fn apply(&mut self, kind: Kind) -> Result<Applied, ApplyError> {
        match kind {
            Kind::Welcome(w) => {
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
                    return Err(ApplyError::Protocol(format!(
                        "base log start {start} is not the start of a log file"
                    )));
                }
                if self.state.env_id.is_none() {
                    return Err(ApplyError::Protocol("BaseStart before Welcome".into()));
                }
                if b.rebase {
                    if !self.state.base.as_ref().is_some_and(|cur| cur.files_done) {
                        return Err(ApplyError::Protocol(
                            "a rebase needs a complete current base".into(),
                        ));
                    }
                    let _ = std::fs::remove_dir_all(self.dir.rebase_dir());
                    std::fs::create_dir_all(self.dir.rebase_dir())
                        .map_err(io_err("creating the rebase directory"))?;
                    tracing::info!(base = %b.base_id, log_start = %start, "rebase started: staging a new base beside the current one");
                    let base = BaseState {
                        base_id: b.base_id,
                        log_start: start,
                        started_unix_ms: tandem_shared::now_unix_ms(),
                        ..Default::default()
                    };
                    self.rebase = Some(Rebase {
                        base,
                        ..Default::default()
                    });
                } else {
                    self.rebase = None;
                    self.start_base(b.base_id, start)?;
                }
                Ok(Applied::default())
            }
            Kind::FileStart(f) => {
                self.base()?;
                if let Some(open) = &self.incoming {
                    return Err(ApplyError::Protocol(format!(
                        "FileStart for {} while {} is incomplete",
                        f.name, open.name
                    )));
                }
                let path = wirepath::resolve_under(&self.dir.root, &f.name)?;
                let kind = FileKind::try_from(f.kind)
                    .map_err(|_| ApplyError::Protocol(format!("unknown file kind {}", f.kind)))?;
                let leaf = path
                    .file_name()
                    .and_then(|n| n.to_str())
                    .unwrap_or_default();
                let ok_kind = match kind {
                    FileKind::Config => f.name == DB_CONFIG,
                    FileKind::Database => {
                        leaf != DB_CONFIG
                            && parse_log_file_name(leaf).is_none()
                            && !leaf.starts_with("__db")
                    }
                };
                if !ok_kind {
                    return Err(ApplyError::Protocol(format!(
                        "{} cannot be sent as a {:?} file",
                        f.name, kind
                    )));
                }
                if f.size > MAX_FILE_SIZE {
                    return Err(ApplyError::TooLarge {
                        name: f.name,
                        size: f.size,
                    });
                }
                let temp = self
                    .dir
                    .incoming()
                    .join(&blake3::hash(f.name.as_bytes()).to_hex()[..24]);
                let file = OpenOptions::new()
                    .write(true)
                    .create(true)
                    .truncate(true)
                    .open(&temp)
                    .map_err(io_err(format!("creating {}", temp.display())))?;
                self.incoming = Some(Incoming {
                    name: f.name,
                    temp,
                    file,
                    size: f.size,
                    written: 0,
                });
                Ok(Applied::default())
            }
            Kind::FileChunk(c) => {
                let Some(inc) = self.incoming.as_mut().filter(|i| i.name == c.name) else {
                    return Err(ApplyError::UnknownFile(c.name));
                };
                let len = c.data.len() as u64;
                if c.offset != inc.written {
                    return Err(ApplyError::OutOfOrder {
                        name: c.name,
                        expected: inc.written,
                        got: c.offset,
                    });
                }
                if c.offset + len > inc.size {
                    return Err(ApplyError::PastDeclaredSize {
                        name: c.name,
                        offset: c.offset,
                        len,
                        size: inc.size,
                    });
                }
                if blake3::hash(&c.data).as_bytes()[..] != c.blake3[..] {
                    return Err(ApplyError::Digest {
                        what: format!("{} at offset {}", c.name, c.offset),
                    });
                }
                inc.file
                    .write_all_at(&c.data, c.offset)
                    .map_err(io_err(format!("writing {}", inc.name)))?;
                inc.written += len;
                if let Some(r) = self.rebase.as_mut() {
                    r.sent_bytes += len;
                }
                Ok(Applied {
                    file_bytes: len,
                    log_bytes: 0,
                })
            }
            Kind::FileSame(f) => {
                let Some(inc) = self.incoming.as_mut().filter(|i| i.name == f.name) else {
                    return Err(ApplyError::UnknownFile(f.name));
                };
                let Some(rebase) = self.rebase.as_mut() else {
                    return Err(ApplyError::Protocol("FileSame outside a rebase".into()));
                };
                if f.offset != inc.written {
                    return Err(ApplyError::OutOfOrder {
                        name: f.name,
                        expected: inc.written,
                        got: f.offset,
                    });
                }
                if f.offset.checked_add(f.len).is_none_or(|end| end > inc.size)
                    || f.len > tandem_shared::MAX_CHUNK as u64 * 64
                {
                    return Err(ApplyError::PastDeclaredSize {
                        name: f.name,
                        offset: f.offset,
                        len: f.len,
                        size: inc.size,
                    });
                }
                let source = wirepath::resolve_under(&self.dir.root, &f.name)?;
                let mut buf = vec![0u8; f.len as usize];
                File::open(&source)
                    .and_then(|src| src.read_exact_at(&mut buf, f.offset))
                    .map_err(|e| {
                        ApplyError::Protocol(format!(
                            "FileSame for {} [{}..+{}] is not in the standby's copy: {e}",
                            f.name, f.offset, f.len
                        ))
                    })?;
                let base_id = self.state.base.as_ref().map_or("", |b| b.base_id.as_str());
                crate::scrub::digests::check_reused(&self.dir, base_id, &f.name, f.offset, &buf)
                    .map_err(ApplyError::Protocol)?;
                inc.file
                    .write_all_at(&buf, f.offset)
                    .map_err(io_err(format!("writing {}", inc.name)))?;
                inc.written += f.len;
                rebase.reused_bytes += f.len;
                Ok(Applied::default())
            }
            Kind::FileEnd(e) => {
                let Some(inc) = self.incoming.take_if(|i| i.name == e.name) else {
                    return Err(ApplyError::UnknownFile(e.name));
                };
                if e.size != inc.written {
                    return Err(ApplyError::Protocol(format!(
                        "{} ended at {} bytes but {} arrived",
                        e.name, e.size, inc.written
                    )));
                }
                if self.rebase.is_some() {
                    self.stage(inc)?;
                } else {
                    self.install(inc)?;
                }
                Ok(Applied::default())
            }
            Kind::BaseFilesDone(d) => {
                let at: LogPosition = d.consistent_at.unwrap_or_default().into();
                if let Some(r) = self.rebase.as_mut() {
                    r.base.files_done = true;
                    r.base.consistent_at = Some(at);
                    tracing::info!(consistent_at = %at, sent = r.sent_bytes, reused = r.reused_bytes, "rebase files complete");
                    return Ok(Applied::default());
                }
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

    /// Drops the old base (its files and logs) and records the new one.
    fn start_base(&mut self, base_id: String, log_start: LogPosition) -> Result<(), ApplyError> {
        let log_dir = self.checked_log_dir()?;
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
            crate::archive_hold::retire_logs(&self.dir, &log_dir, u32::MAX, self.archive_hold_cap)
                .map_err(io_err("removing the old base's log files"))?;
            fsync_dir(&self.dir.root).map_err(io_err("fsync of the standby directory"))?;
        }
        self.incoming = None;
        self.open_log = None;
        self.dirty = false;
        self.tail = LogTail {
            written: log_start,
            durable: log_start,
            ..Default::default()
        };
        self.synced_tail = self.tail.clone();
        self.state.base = Some(BaseState {
            base_id,
            log_start,
            started_unix_ms: tandem_shared::now_unix_ms(),
            ..Default::default()
        });
        self.save()
    }

    /// Makes a received file of a rebase durable under `.tandem/rebase/`.
    fn stage(&mut self, inc: Incoming) -> Result<(), ApplyError> {
        inc.file
            .sync_all()
            .map_err(io_err(format!("fsync of {}", inc.name)))?;
        drop(inc.file);
        let staged = wirepath::resolve_under(&self.dir.rebase_dir(), &inc.name)?;
        let parent = staged
            .parent()
            .unwrap_or(&self.dir.rebase_dir())
            .to_path_buf();
        create_dirs_durably(&self.dir.rebase_dir(), &parent)
            .map_err(io_err("creating a rebase directory"))?;
        std::fs::rename(&inc.temp, &staged).map_err(io_err(format!("staging {}", inc.name)))?;
        fsync_dir(&parent).map_err(io_err("fsync of a directory"))?;
        if let Some(r) = self.rebase.as_mut() {
            r.base.complete_files.insert(inc.name);
        }
        Ok(())
    }

    /// Swaps a complete rebase in once the log covers it. Every moment of
    /// the swap is recoverable: files copied at different times recover
    /// with the log from the earliest base boundary (BDB.md §7), and the
    /// old base's logs are removed only after the last file is in place.
    pub fn finish_rebase(&mut self) -> Result<Option<RebaseReport>, ApplyError> {
        let ready = self.rebase.as_ref().is_some_and(|r| {
            r.base.files_done && r.base.consistent_at.is_some_and(|c| self.tail.durable >= c)
        });
        if !ready {
            return Ok(None);
        }
        let Some(r) = self.rebase.take() else {
            return Ok(None);
        };
        self.state.pending_swap = Some(r.base.clone());
        self.save()?;
        let removed = self.swap_in(r.base.clone())?;
        let report = RebaseReport {
            base_id: r.base.base_id,
            log_start: r.base.log_start,
            sent_bytes: r.sent_bytes,
            reused_bytes: r.reused_bytes,
            removed_log_files: removed,
            unix_ms: tandem_shared::now_unix_ms(),
        };
        tracing::info!(base = %report.base_id, log_start = %report.log_start, sent = report.sent_bytes, reused = report.reused_bytes,
            removed_logs = removed, "rebase complete");
        Ok(Some(report))
    }

    /// Moves the staged files into place (idempotent), records the new
    /// base, then drops what it no longer needs. Returns log files removed.
    fn swap_in(&mut self, new: BaseState) -> Result<usize, ApplyError> {
        for name in &new.complete_files {
            let staged = wirepath::resolve_under(&self.dir.rebase_dir(), name)?;
            if !staged.exists() {
                continue; // moved before an interruption
            }
            let path = wirepath::resolve_under(&self.dir.root, name)?;
            let parent = path.parent().unwrap_or(&self.dir.root).to_path_buf();
            create_dirs_durably(&self.dir.root, &parent)
                .map_err(io_err(format!("creating the directory of {name}")))?;
            std::fs::rename(&staged, &path).map_err(io_err(format!("moving {name} into place")))?;
            fsync_dir(&parent).map_err(io_err("fsync of a directory"))?;
        }
        crate::scrub::digests::on_swap_in(&self.dir, &new)
            .map_err(io_err("recording the new base's page digests"))?;
        let old = self.state.base.replace(new.clone());
        self.state.pending_swap = None;
        self.save()?;
        if let Some(old) = old {
            for name in old.complete_files.difference(&new.complete_files) {
                if let Ok(p) = wirepath::resolve_under(&self.dir.root, name) {
                    remove_if_exists(&p).map_err(io_err(format!("removing {name}")))?;
                }
            }
        }
        let log_dir = self.checked_log_dir()?;
        let (deleted, held) = crate::archive_hold::retire_logs(
            &self.dir,
            &log_dir,
            new.log_start.file,
            self.archive_hold_cap,
        )
        .map_err(io_err("removing log files the new base does not need"))?;
        if held > 0 {
            tracing::info!(held, "log files the continuous archive has not copied yet were moved to .tandem/archive-hold");
        }
        let removed = deleted + held;
        let _ = std::fs::remove_dir_all(self.dir.rebase_dir());
        Ok(removed)
    }

    /// Is it time to ask for a rebase? (The base is complete, none is under
    /// way, and the log since the base or its age passed a threshold.)
    pub fn rebase_due(&self, after_bytes: u64, after_secs: u64) -> bool {
        let Some(base) = self.state.base.as_ref().filter(|b| b.files_done) else {
            return false;
        };
        if self.rebase.is_some()
            || !self.recoverable()
            || base.log_start.file >= self.tail.durable.file
        {
            return false;
        }
        let bytes = base
            .log_start
            .bytes_until(self.tail.durable, self.tail.lg_max.max(1));
        let age_ms = tandem_shared::now_unix_ms().saturating_sub(base.started_unix_ms);
        (after_bytes > 0 && bytes >= after_bytes)
            || (after_secs > 0 && base.started_unix_ms > 0 && age_ms >= after_secs * 1000)
    }

    /// Page digests of the base's database files, for a RebaseRequest.
    pub fn page_digests(&self) -> Result<Vec<tandem_shared::wire::PageDigests>, ApplyError> {
        let mut out = Vec::new();
        let Some(base) = &self.state.base else {
            return Ok(out);
        };
        for name in base.complete_files.iter().filter(|n| *n != DB_CONFIG) {
            let path = wirepath::resolve_under(&self.dir.root, name)?;
            let Some(meta) = tandem_shared::envlayout::read_db_meta(&path)
                .map_err(io_err(format!("reading {name}")))?
            else {
                continue;
            };
            let f = File::open(&path).map_err(io_err(format!("opening {name}")))?;
            let page = meta.page_size as usize;
            let per_message =
                (tandem_shared::MAX_CHUNK / 2 / tandem_shared::pages::PAGE_DIGEST_LEN).max(1);
            let mut buf = vec![0u8; page * per_message];
            let mut first_page = 0u64;
            loop {
                let n = tandem_shared::pages::read_at_most(&f, &mut buf, first_page * page as u64)
                    .map_err(io_err(format!("reading {name}")))?;
                if n == 0 {
                    break;
                }
                let digests = tandem_shared::pages::page_digests(&buf[..n], page);
                out.push(tandem_shared::wire::PageDigests {
                    name: name.clone(),
                    page_size: meta.page_size,
                    first_page,
                    digests: digests.into(),
                });
                first_page += n.div_ceil(page) as u64;
                if n < buf.len() {
                    break;
                }
            }
        }
        Ok(out)
    }

    /// Makes a received file durable and gives it its name.
    fn install(&mut self, inc: Incoming) -> Result<(), ApplyError> {
        inc.file
            .sync_all()
            .map_err(io_err(format!("fsync of {}", inc.name)))?;
        drop(inc.file);
        // Resolve again: a symlink may have appeared since FileStart.
        let path = wirepath::resolve_under(&self.dir.root, &inc.name)?;
        let parent = path.parent().unwrap_or(&self.dir.root).to_path_buf();
        create_dirs_durably(&self.dir.root, &parent)
            .map_err(io_err(format!("creating the directory of {}", inc.name)))?;
        std::fs::rename(&inc.temp, &path)
            .map_err(io_err(format!("renaming {} into place", inc.name)))?;
        fsync_dir(&parent).map_err(io_err("fsync of a directory"))?;
        let base_id = self.base()?.base_id.clone();
        crate::scrub::digests::on_install(&self.dir, &base_id, &inc.name, &path).map_err(
            io_err(format!("recording the page digests of {}", inc.name)),
        )?;
        self.base_mut()?.complete_files.insert(inc.name);
        self.save()
    }

    fn append_log(
        &mut self,
        file_no: u32,
        offset: u32,
        data: &[u8],
        digest: &[u8],
        file_size: u64,
    ) -> Result<Applied, ApplyError> {
        self.base()?;
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
        if next_file {
            self.sync()?; // the previous file is complete: make it durable first
        }
        if offset == 0 {
            self.create_log_file(file_no, data, file_size)?;
        } else {
            let f = self.log_file(file_no)?;
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
    fn create_log_file(
        &mut self,
        file_no: u32,
        data: &[u8],
        file_size: u64,
    ) -> Result<(), ApplyError> {
        let name = logfile::log_file_name(file_no);
        let rel = if self.state.log_dir.is_empty() {
            name.clone()
        } else {
            format!("{}/{}", self.state.log_dir, name)
        };
        let path = wirepath::resolve_under(&self.dir.root, &rel)?;
        let temp = self.dir.incoming().join(&name);
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
        let parent = path.parent().unwrap_or(&self.dir.root).to_path_buf();
        create_dirs_durably(&self.dir.root, &parent)
            .map_err(io_err("creating the log directory"))?;
        std::fs::rename(&temp, &path).map_err(io_err(format!("renaming {name} into place")))?;
        fsync_dir(&parent).map_err(io_err("fsync of the log directory"))?;
        self.open_log = Some((file_no, f));
        self.dirty = false;
        Ok(())
    }

    fn log_file(&mut self, file_no: u32) -> Result<&File, ApplyError> {
        if self.open_log.as_ref().map(|o| o.0) != Some(file_no) {
            let path = self.checked_log_path(file_no)?;
            let f = OpenOptions::new()
                .read(true)
                .write(true)
                .open(&path)
                .map_err(io_err(format!("opening {}", path.display())))?;
            self.open_log = Some((file_no, f));
        }
        Ok(&self.open_log.as_ref().expect("just set").1)
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
        self.synced_tail = self.tail.clone();
        Ok(self.tail.durable)
    }

    /// Is the mirror a recoverable environment right now?
    pub fn recoverable(&self) -> bool {
        is_recoverable(&self.state, self.tail.durable)
    }
}

pub fn is_recoverable(state: &StandbyState, durable: LogPosition) -> bool {
    state
        .base
        .as_ref()
        .is_some_and(|b| b.files_done && b.consistent_at.is_some_and(|c| durable >= c))
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
    let Some(base) = &state.base else {
        return Ok(LogTail::default());
    };
    let start = base.log_start;
    let log_dir = dir.log_dir(state);
    let mut numbers: Vec<u32> = match std::fs::read_dir(&log_dir) {
        Ok(entries) => entries
            .flatten()
            .filter_map(|e| e.file_name().to_str().and_then(parse_log_file_name))
            .collect(),
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
        return Ok(LogTail {
            written: start,
            durable: start,
            ..Default::default()
        });
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
    Ok(LogTail {
        written: end,
        durable: end,
        last_record: w.last_record,
        last_record_digest: digest,
        lg_max: w.header.map_or(0, |h| h.lg_max),
    })
}
#[cfg(test)]
#[path = "mirror_tests.rs"]
mod tests;
