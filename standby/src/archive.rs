//! Archival copies of the standby's mirror, for point-in-time restore
//! (`tandem-standby archive`; `verify-archive` and `restore` are in
//! [`crate::restore`]).
//!
//! A backup is a directory `ARCHIVE/<UTC time>-<base id>/` that is an
//! environment home on its own: the base's database files and `DB_CONFIG`
//! under their names, and every log file from the base's first log file to
//! the mirror's durable end, the last one cut at that end (the rest of its
//! size zeros, like BDB's pre-allocated files). `MANIFEST.json` lists each
//! file with its size and blake3, the environment and base it came from,
//! the log range and the commit times found in the log, and a digest over
//! all of that.
//!
//! Consistency while `run` streams (the same reasoning as
//! [`crate::readiness`]): database files in the mirror never change once
//! installed, and log bytes before the durable end never change, so a copy
//! of the base's files plus the log up to a durable end read beforehand is
//! a recoverable set (BDB.md §7). Two things can still move under the copy:
//! a rebase swaps in other database files and removes old logs, and a
//! promotion runs recovery in place. The state file is re-read after the
//! copy (a changed base, a pending swap or a promotion throws the copy away
//! and it is taken again) and each database file must have the same size
//! and mtime after it was read as before. The mirror is only read; in the
//! standby directory's `.tandem`, the archiver writes `archive.json` (its
//! last report) and, with `--follow`, its registration and the log files
//! held for it ([`crate::archive_hold`]).
//!
//! Writes are durable and atomic: a backup is built in a hidden temp
//! directory inside ARCHIVE, every file and directory fsynced, optionally
//! proven recoverable, then renamed into place and ARCHIVE fsynced. Files in
//! a published backup are never modified: `--follow` extends the latest
//! backup by building its successor beside it (hard links for the files
//! that did not change, fresh copies of the extended last log file and the
//! new ones, a new manifest) and swapping the two directories atomically
//! (`renameat2(RENAME_EXCHANGE)`).
//!
//! Locks in ARCHIVE (flock): `.tandem-archive.writer` is held by whoever
//! builds backups, so two archivers never interleave; `.tandem-archive.lock`
//! is held shared by readers (`verify-archive`, `restore`) while they read a
//! backup's files and exclusively while a backup is published, swapped or
//! deleted.

use crate::mirror::{is_recoverable, scan_tail};
use crate::state::{BaseState, StandbyDir, StandbyState};
use serde::{Deserialize, Serialize};
use std::collections::BTreeSet;
use std::fs::{self, File, OpenOptions};
use std::io::{self, Read, Write};
use std::os::fd::AsRawFd;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};
use tandem_shared::bdb::BdbError;
use tandem_shared::durable::{fsync_dir, ControlFileError};
use tandem_shared::envlayout::{rel_name, DB_CONFIG};
use tandem_shared::logfile::{
    log_file_name, read_verified, WalkStop, PERSIST_RECORD_LEN, RECORD_HEADER_LEN,
};
use tandem_shared::wirepath::{self, PathError};
use tandem_shared::LogPosition;

pub const MANIFEST_FILE: &str = "MANIFEST.json";
pub const MANIFEST_FORMAT: &str = "tandem-backup/1";
/// Held shared while reading a backup, exclusively while changing which
/// backups exist.
pub const PUBLISH_LOCK: &str = ".tandem-archive.lock";
/// Held by the one process building backups in an archive.
pub const WRITER_LOCK: &str = ".tandem-archive.writer";
/// Directories being built or deleted; removed by the next writer.
pub const TEMP_PREFIX: &str = ".tandem-tmp-";
/// The last archive report, in the standby's `.tandem`.
pub const REPORT_FILE: &str = "archive.json";
/// How often a copy is retried when the standby's base moves under it.
const COPY_ATTEMPTS: u32 = 3;
const BUF: usize = 1 << 20;

// BDB 5.3 log record types and layout (txn.src; checked against
// db5.3_printlog in the tests): every record body starts with rectype u32,
// txnid u32, prev_lsn (2 x u32).
const REC_TXN_REGOP: u32 = 10;
const REC_TXN_CKP: u32 = 11;
/// `__txn_regop.opcode` of a commit.
const TXN_COMMIT: u32 = 1;

#[derive(Debug, thiserror::Error)]
pub enum ArchiveError {
    #[error("{what}: {source}")]
    Io { what: String, source: io::Error },
    #[error("{0} is not a Tandem standby directory (no .tandem inside)")]
    NotAStandby(PathBuf),
    #[error("{0} was promoted: it is a live environment now, not a mirror; archive it from a standby of its own")]
    Promoted(PathBuf),
    #[error("the standby is not recoverable yet ({0}); nothing was archived")]
    NotRecoverable(String),
    #[error("the standby's base kept changing while it was copied ({attempts} attempts); nothing was archived, try again")]
    SourceChanged { attempts: u32 },
    #[error("{path}: {why}")]
    Manifest { path: PathBuf, why: String },
    #[error("{}: integrity check failed: {}", .backup.display(), .problems.iter().map(|p| p.to_string()).collect::<Vec<_>>().join("; "))]
    Integrity {
        backup: PathBuf,
        problems: Vec<Problem>,
    },
    #[error("{file}: {why}")]
    LogChain { file: String, why: String },
    #[error("{what}: {source}")]
    Bdb { what: String, source: BdbError },
    #[error("refused file name: {0}")]
    Path(#[from] PathError),
    #[error("no backups in {0} (a backup is a directory holding {MANIFEST_FILE})")]
    NoBackups(PathBuf),
    #[error("{0} exists and is not empty: restore only into a new or empty directory")]
    TargetNotEmpty(PathBuf),
    #[error("{requested} is outside the restorable window {from} .. {to} of {backup}: {why}")]
    OutsideWindow {
        backup: String,
        requested: String,
        from: String,
        to: String,
        why: String,
    },
    #[error("no point-in-time restore from {backup}: {why}")]
    NoPointInTime { backup: String, why: String },
    #[error("cannot read the time {input:?}: {why}")]
    BadTime { input: String, why: String },
    #[error("{0}")]
    Check(String),
    #[error(transparent)]
    State(#[from] ControlFileError),
}

pub(crate) fn io_err(what: impl Into<String>) -> impl FnOnce(io::Error) -> ArchiveError {
    let what = what.into();
    move |source| ArchiveError::Io { what, source }
}

/// One thing wrong with a backup's files, each naming the file.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(tag = "problem", rename_all = "snake_case")]
pub enum Problem {
    Missing {
        file: String,
    },
    Extra {
        file: String,
    },
    Size {
        file: String,
        expected: u64,
        found: u64,
    },
    Altered {
        file: String,
        expected: String,
        found: String,
    },
    Unreadable {
        file: String,
        error: String,
    },
}

impl std::fmt::Display for Problem {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Problem::Missing { file } => write!(f, "{file}: missing"),
            Problem::Extra { file } => write!(f, "{file}: extra file, not in the manifest"),
            Problem::Size {
                file,
                expected,
                found,
            } => write!(f, "{file}: {found} bytes, the manifest says {expected}"),
            Problem::Altered {
                file,
                expected,
                found,
            } => {
                write!(
                    f,
                    "{file}: altered (blake3 {}…, the manifest says {}…)",
                    &found[..found.len().min(16)],
                    &expected[..expected.len().min(16)]
                )
            }
            Problem::Unreadable { file, error } => write!(f, "{file}: unreadable: {error}"),
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum FileKind {
    Database,
    Config,
    Log,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ManifestFile {
    /// Path relative to the backup (= environment home), '/'-separated.
    pub name: String,
    pub kind: FileKind,
    pub size: u64,
    pub blake3: String,
}

/// `MANIFEST.json`. `digest` is the blake3 of the compact JSON of the
/// manifest with `digest` empty.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Manifest {
    pub format: String,
    pub env_id: String,
    pub base_id: String,
    pub epoch: u64,
    /// The standby directory it was copied from (informational).
    pub source: String,
    pub created_unix_ms: u64,
    /// Last extended by `--follow` (= created otherwise).
    pub updated_unix_ms: u64,
    /// Log directory relative to the home ("" = the home).
    pub log_dir: String,
    pub log_start: LogPosition,
    /// End of the verified log: the last log file holds records up to here.
    pub log_end: LogPosition,
    pub lg_max: u32,
    /// Commit records (`__txn_regop`, opcode commit) in the log.
    pub commits: u64,
    pub first_commit_unix: Option<i64>,
    pub last_commit_unix: Option<i64>,
    /// Timestamp of the first checkpoint whose ckp_lsn is at or after the
    /// first log record: `db_recover -t` refuses earlier times.
    pub earliest_checkpoint_unix: Option<i64>,
    pub files: Vec<ManifestFile>,
    pub digest: String,
}

impl Manifest {
    pub fn compute_digest(&self) -> String {
        let mut body = self.clone();
        body.digest = String::new();
        // Serializing plain structs, strings and integers cannot fail.
        let bytes = serde_json::to_vec(&body).unwrap_or_default();
        blake3::hash(&bytes).to_hex().to_string()
    }

    pub fn seal(&mut self) {
        self.digest = self.compute_digest();
    }

    /// The earliest time `restore --until` accepts: no earlier than the
    /// first commit in the log (older commits are baked into the database
    /// files and cannot be undone) and no earlier than BDB's own limit.
    pub fn earliest_restore_unix(&self) -> Option<i64> {
        window_start(self.first_commit_unix, self.earliest_checkpoint_unix)
    }

    pub fn databases(&self) -> impl Iterator<Item = &ManifestFile> {
        self.files.iter().filter(|f| f.kind == FileKind::Database)
    }

    pub fn log_path(&self, home: &Path, number: u32) -> PathBuf {
        home.join(&self.log_dir).join(log_file_name(number))
    }

    /// Parses and checks a manifest: format, digest, file names, log range.
    pub fn parse(bytes: &[u8], path: &Path) -> Result<Self, ArchiveError> {
        let bad = |why: String| ArchiveError::Manifest {
            path: path.to_path_buf(),
            why,
        };
        let m: Manifest = serde_json::from_slice(bytes)
            .map_err(|e| bad(format!("not a readable manifest (damaged?): {e}")))?;
        if m.format != MANIFEST_FORMAT {
            return Err(bad(format!(
                "format {:?} is not {MANIFEST_FORMAT:?}",
                m.format
            )));
        }
        let computed = m.compute_digest();
        if computed != m.digest {
            return Err(bad(format!("manifest digest mismatch: the manifest was altered or damaged (recorded {}, computed {computed})", m.digest)));
        }
        let mut seen = BTreeSet::new();
        for f in &m.files {
            wirepath::validate(&f.name).map_err(|e| bad(format!("refused file name: {e}")))?;
            if f.name == MANIFEST_FILE {
                return Err(bad(format!("lists {MANIFEST_FILE} as a file")));
            }
            if !seen.insert(f.name.as_str()) {
                return Err(bad(format!("lists {} twice", f.name)));
            }
        }
        if !m.log_dir.is_empty() {
            wirepath::validate(&m.log_dir)
                .map_err(|e| bad(format!("refused log directory: {e}")))?;
        }
        if m.log_start.file == 0 || m.log_end.file < m.log_start.file {
            return Err(bad(format!(
                "impossible log range {} .. {}",
                m.log_start, m.log_end
            )));
        }
        let logs: BTreeSet<&str> = m
            .files
            .iter()
            .filter(|f| f.kind == FileKind::Log)
            .map(|f| f.name.as_str())
            .collect();
        for n in m.log_start.file..=m.log_end.file {
            let name = log_rel_name(&m.log_dir, n);
            if !logs.contains(name.as_str()) {
                return Err(bad(format!(
                    "the log range {} .. {} needs {name}, which it does not list",
                    m.log_start, m.log_end
                )));
            }
        }
        if logs.len() as u64 != u64::from(m.log_end.file - m.log_start.file) + 1 {
            return Err(bad("lists log files outside its log range".into()));
        }
        Ok(m)
    }

    pub fn to_bytes(&self) -> Vec<u8> {
        let mut out = serde_json::to_vec_pretty(self).unwrap_or_default();
        out.push(b'\n');
        out
    }
}

pub fn window_start(first_commit: Option<i64>, earliest_checkpoint: Option<i64>) -> Option<i64> {
    Some(first_commit?.max(earliest_checkpoint?))
}

/// Reads and checks `backup/MANIFEST.json`.
pub fn read_manifest(backup: &Path) -> Result<Manifest, ArchiveError> {
    let path = backup.join(MANIFEST_FILE);
    let bytes = fs::read(&path).map_err(|e| ArchiveError::Manifest {
        path: path.clone(),
        why: format!("cannot read it: {e}"),
    })?;
    Manifest::parse(&bytes, &path)
}

pub fn log_rel_name(log_dir: &str, number: u32) -> String {
    rel_name(&Path::new(log_dir).join(log_file_name(number)))
}

// ---------------------------------------------------------------- times

/// Days since 1970-01-01 of a proleptic Gregorian date (H. Hinnant).
pub fn days_from_civil(y: i64, m: u32, d: u32) -> i64 {
    let y = if m <= 2 { y - 1 } else { y };
    let era = y.div_euclid(400);
    let yoe = y - era * 400;
    let mp = i64::from((m + 9) % 12);
    let doy = (153 * mp + 2) / 5 + i64::from(d) - 1;
    let doe = yoe * 365 + yoe / 4 - yoe / 100 + doy;
    era * 146_097 + doe - 719_468
}

/// (year, month, day) of a day count since 1970-01-01.
pub fn civil_from_days(z: i64) -> (i64, u32, u32) {
    let z = z + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z - era * 146_097;
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = (doy - (153 * mp + 2) / 5 + 1) as u32;
    let m = if mp < 10 { mp + 3 } else { mp - 9 } as u32;
    (yoe + era * 400 + i64::from(m <= 2), m, d)
}

/// UTC fields (year, month, day, hour, minute, second) of a unix time.
pub fn utc_fields(unix: i64) -> (i64, u32, u32, u32, u32, u32) {
    let (y, m, d) = civil_from_days(unix.div_euclid(86_400));
    let s = unix.rem_euclid(86_400);
    (
        y,
        m,
        d,
        (s / 3600) as u32,
        (s / 60 % 60) as u32,
        (s % 60) as u32,
    )
}

/// `2026-11-25T19:57:28Z`.
pub fn rfc3339(unix: i64) -> String {
    let (y, mo, d, h, mi, s) = utc_fields(unix);
    format!("{y:04}-{mo:02}-{d:02}T{h:02}:{mi:02}:{s:02}Z")
}

/// BDB's `db_recover -t` form `CCYYMMDDhhmm.SS`, in UTC: run db_recover
/// with `TZ=UTC0` so it reads it as UTC (it reads local time).
pub fn bdb_time_utc(unix: i64) -> String {
    let (y, mo, d, h, mi, s) = utc_fields(unix);
    format!("{y:04}{mo:02}{d:02}{h:02}{mi:02}.{s:02}")
}

fn backup_name(unix_ms: u64, base_id: &str) -> String {
    let secs = (unix_ms / 1000) as i64;
    let (y, mo, d, h, mi, s) = utc_fields(secs);
    let base: String = base_id
        .chars()
        .filter(|c| c.is_ascii_alphanumeric())
        .take(12)
        .collect();
    format!(
        "{y:04}{mo:02}{d:02}T{h:02}{mi:02}{s:02}.{:03}Z-{base}",
        unix_ms % 1000
    )
}

/// The creation time (unix ms) a backup's directory name carries, or
/// `None` if the name is not a backup's.
pub fn parse_backup_name(name: &str) -> Option<u64> {
    let b = name.as_bytes();
    if b.len() < 21 || b[8] != b'T' || b[15] != b'.' || b[19] != b'Z' || b[20] != b'-' {
        return None;
    }
    let digits = |r: std::ops::Range<usize>| -> Option<u32> {
        let s = name.get(r)?;
        s.bytes()
            .all(|c| c.is_ascii_digit())
            .then(|| s.parse().ok())?
    };
    let (y, mo, d) = (digits(0..4)?, digits(4..6)?, digits(6..8)?);
    let (h, mi, s, ms) = (
        digits(9..11)?,
        digits(11..13)?,
        digits(13..15)?,
        digits(16..19)?,
    );
    if !(1..=12).contains(&mo) || !(1..=31).contains(&d) || h > 23 || mi > 59 || s > 59 {
        return None;
    }
    if !name[21..]
        .bytes()
        .all(|c| c.is_ascii_alphanumeric() || c == b'-')
    {
        return None;
    }
    let days = days_from_civil(i64::from(y), mo, d);
    let secs = days * 86_400 + i64::from(h * 3600 + mi * 60 + s);
    u64::try_from(secs).ok().map(|s| s * 1000 + u64::from(ms))
}

// ---------------------------------------------------------------- listing

#[derive(Debug, Clone)]
pub struct BackupEntry {
    pub name: String,
    pub path: PathBuf,
    pub created_unix_ms: u64,
}

/// The backups in an archive directory, oldest first: directories named
/// like a backup that hold a manifest (readable or not).
pub fn list_backups(archive: &Path) -> Result<Vec<BackupEntry>, ArchiveError> {
    let mut out = Vec::new();
    let entries = match fs::read_dir(archive) {
        Ok(e) => e,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(out),
        Err(e) => return Err(io_err(format!("listing {}", archive.display()))(e)),
    };
    for e in entries {
        let e = e.map_err(io_err(format!("listing {}", archive.display())))?;
        let Some(name) = e.file_name().to_str().map(str::to_owned) else {
            continue;
        };
        let Some(created) = parse_backup_name(&name) else {
            continue;
        };
        let path = e.path();
        let is_dir = fs::symlink_metadata(&path)
            .map(|m| m.is_dir())
            .unwrap_or(false);
        if is_dir && fs::symlink_metadata(path.join(MANIFEST_FILE)).is_ok() {
            out.push(BackupEntry {
                name,
                path,
                created_unix_ms: created,
            });
        }
    }
    out.sort_by(|a, b| a.name.cmp(&b.name));
    Ok(out)
}

// ---------------------------------------------------------------- locks

/// An flock held until dropped.
pub struct ArchiveLock {
    _file: File,
}

/// Takes lock `name` in `archive` (blocking). Readers pass `create =
/// false`: with no lock file, no writer ever ran there, and nothing is
/// written.
pub fn lock_archive(
    archive: &Path,
    name: &str,
    exclusive: bool,
    create: bool,
) -> Result<Option<ArchiveLock>, ArchiveError> {
    let path = archive.join(name);
    let file = if create {
        OpenOptions::new()
            .create(true)
            .truncate(false)
            .read(true)
            .write(true)
            .open(&path)
    } else {
        File::open(&path)
    };
    let file = match file {
        Ok(f) => f,
        Err(e) if !create && e.kind() == io::ErrorKind::NotFound => return Ok(None),
        Err(e) => return Err(io_err(format!("opening {}", path.display()))(e)),
    };
    let op = if exclusive {
        libc::LOCK_EX
    } else {
        libc::LOCK_SH
    };
    loop {
        // SAFETY: flock on an fd we own.
        if unsafe { libc::flock(file.as_raw_fd(), op) } == 0 {
            return Ok(Some(ArchiveLock { _file: file }));
        }
        let e = io::Error::last_os_error();
        if e.kind() != io::ErrorKind::Interrupted {
            return Err(io_err(format!("locking {}", path.display()))(e));
        }
    }
}

// ---------------------------------------------------------------- files

/// Copies `from` into the new file `to`, hashing what `to` ends up holding:
/// with `limit`, only the first `limit` bytes, the rest of `from`'s size
/// left as zeros (a hole). `to` is fsynced. When `stable` is set, `from`
/// must have the same size and mtime after the copy as before it.
pub fn copy_hashed(
    from: &Path,
    to: &Path,
    limit: Option<u64>,
    stable: bool,
) -> Result<(u64, blake3::Hash), ArchiveError> {
    let what = |verb: &str| format!("{verb} {}", from.display());
    let src = File::open(from).map_err(io_err(what("opening")))?;
    let before = src.metadata().map_err(io_err(what("reading")))?;
    let size = before.len();
    let copy_len = limit.unwrap_or(size).min(size);
    if let Some(parent) = to.parent() {
        fs::create_dir_all(parent).map_err(io_err(format!("creating {}", parent.display())))?;
    }
    let dst = OpenOptions::new()
        .write(true)
        .create_new(true)
        .open(to)
        .map_err(io_err(format!("creating {}", to.display())))?;
    let mut hasher = blake3::Hasher::new();
    let mut reader = (&src).take(copy_len);
    let mut writer = io::BufWriter::with_capacity(BUF, &dst);
    let mut buf = vec![0u8; BUF];
    let mut copied = 0u64;
    loop {
        let n = match reader.read(&mut buf) {
            Ok(0) => break,
            Ok(n) => n,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
            Err(e) => return Err(io_err(what("reading"))(e)),
        };
        hasher.update(&buf[..n]);
        writer
            .write_all(&buf[..n])
            .map_err(io_err(format!("writing {}", to.display())))?;
        copied += n as u64;
    }
    writer
        .flush()
        .map_err(io_err(format!("writing {}", to.display())))?;
    drop(writer);
    if copied != copy_len {
        return Err(ArchiveError::Check(format!(
            "{} shrank while it was copied ({copied} of {copy_len} bytes)",
            from.display()
        )));
    }
    if size > copied {
        dst.set_len(size)
            .map_err(io_err(format!("sizing {}", to.display())))?;
        hash_zeros(&mut hasher, size - copied);
    }
    dst.sync_all()
        .map_err(io_err(format!("fsync of {}", to.display())))?;
    if stable {
        let after = src.metadata().map_err(io_err(what("reading")))?;
        if after.len() != before.len()
            || after.mtime() != before.mtime()
            || after.mtime_nsec() != before.mtime_nsec()
        {
            return Err(ArchiveError::Check(format!(
                "{} changed while it was copied",
                from.display()
            )));
        }
    }
    Ok((size, hasher.finalize()))
}

fn hash_zeros(hasher: &mut blake3::Hasher, mut len: u64) {
    let zeros = [0u8; 64 * 1024];
    while len > 0 {
        let n = len.min(zeros.len() as u64) as usize;
        hasher.update(&zeros[..n]);
        len -= n as u64;
    }
}

/// Size and blake3 of a file (of its first `limit` bytes with `limit`).
pub fn hash_file(path: &Path, limit: Option<u64>) -> io::Result<(u64, blake3::Hash)> {
    let f = File::open(path)?;
    let size = f.metadata()?.len();
    let mut reader = f.take(limit.unwrap_or(u64::MAX));
    let mut hasher = blake3::Hasher::new();
    let mut buf = vec![0u8; BUF];
    let mut total = 0u64;
    loop {
        let n = match reader.read(&mut buf) {
            Ok(0) => break,
            Ok(n) => n,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
            Err(e) => return Err(e),
        };
        hasher.update(&buf[..n]);
        total += n as u64;
    }
    Ok((
        if limit.is_some() { total } else { size },
        hasher.finalize(),
    ))
}

/// Fsyncs every file and directory under `root`, and `root` itself.
pub fn fsync_tree(root: &Path) -> io::Result<()> {
    for e in fs::read_dir(root)? {
        let e = e?;
        let t = e.file_type()?;
        if t.is_dir() {
            fsync_tree(&e.path())?;
        } else if t.is_file() {
            File::open(e.path())?.sync_all()?;
        }
    }
    fsync_dir(root)
}

/// Regular files under `root`, as '/'-separated relative names; anything
/// else that is not a directory (symlinks, sockets) is listed too, so it
/// shows up as unexpected.
pub fn list_files(root: &Path) -> io::Result<BTreeSet<String>> {
    let mut out = BTreeSet::new();
    let mut stack = vec![root.to_path_buf()];
    while let Some(d) = stack.pop() {
        for e in fs::read_dir(&d)? {
            let e = e?;
            let p = e.path();
            if e.file_type()?.is_dir() {
                stack.push(p);
            } else if let Ok(rel) = p.strip_prefix(root) {
                out.insert(rel_name(rel));
            }
        }
    }
    Ok(out)
}

/// Checks a backup's files against its manifest without writing anything:
/// missing, extra, resized and altered files, each named.
pub fn check_files(backup: &Path, m: &Manifest) -> Result<(Vec<Problem>, u64), ArchiveError> {
    let mut problems = Vec::new();
    let mut on_disk =
        list_files(backup).map_err(io_err(format!("listing {}", backup.display())))?;
    on_disk.remove(MANIFEST_FILE);
    let mut bytes = 0;
    for f in &m.files {
        if !on_disk.remove(&f.name) {
            problems.push(Problem::Missing {
                file: f.name.clone(),
            });
            continue;
        }
        let path = backup.join(wirepath::validate(&f.name)?);
        match hash_file(&path, None) {
            Ok((size, _)) if size != f.size => problems.push(Problem::Size {
                file: f.name.clone(),
                expected: f.size,
                found: size,
            }),
            Ok((size, hash)) => {
                bytes += size;
                let found = hash.to_hex().to_string();
                if found != f.blake3 {
                    problems.push(Problem::Altered {
                        file: f.name.clone(),
                        expected: f.blake3.clone(),
                        found,
                    });
                }
            }
            Err(e) => problems.push(Problem::Unreadable {
                file: f.name.clone(),
                error: e.to_string(),
            }),
        }
    }
    problems.extend(on_disk.into_iter().map(|file| Problem::Extra { file }));
    Ok((problems, bytes))
}

/// Copies a checked backup into `dest` (which must not hold its files),
/// comparing every file's blake3 with the manifest again on the way.
pub fn copy_backup(backup: &Path, m: &Manifest, dest: &Path) -> Result<u64, ArchiveError> {
    let mut bytes = 0;
    for f in &m.files {
        let rel = wirepath::validate(&f.name)?;
        let (size, hash) = copy_hashed(&backup.join(&rel), &dest.join(&rel), None, false)?;
        let found = hash.to_hex().to_string();
        if size != f.size || found != f.blake3 {
            return Err(ArchiveError::Integrity {
                backup: backup.to_path_buf(),
                problems: vec![Problem::Altered {
                    file: f.name.clone(),
                    expected: f.blake3.clone(),
                    found,
                }],
            });
        }
        bytes += size;
    }
    Ok(bytes)
}

// ---------------------------------------------------------------- log scan

/// What a walk over a run of log files found.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct LogSummary {
    pub end: LogPosition,
    pub lg_max: u32,
    pub records: u64,
    pub commits: u64,
    pub first_commit_unix: Option<i64>,
    pub last_commit_unix: Option<i64>,
    pub earliest_checkpoint_unix: Option<i64>,
}

fn u32_at(b: &[u8], at: usize) -> Option<u32> {
    b.get(at..at + 4)
        .map(|s| u32::from_le_bytes([s[0], s[1], s[2], s[3]]))
}

/// Walks log files `first..=last` in `log_dir` as one verified record
/// chain: every record's checksum and back-pointer, across file
/// boundaries. With `end`, the last file's records must end exactly there.
/// Collects commit timestamps and BDB's earliest point-in-time limit: the
/// timestamp of the first checkpoint whose ckp_lsn is at or after
/// `ckp_floor` (default: the first record after the first file's persist
/// record, which is where `db_recover` starts reading).
pub fn scan_logs(
    log_dir: &Path,
    first: u32,
    last: u32,
    end: Option<u32>,
    ckp_floor: Option<LogPosition>,
) -> Result<LogSummary, ArchiveError> {
    scan_log_chain(
        &|n| log_dir.join(log_file_name(n)),
        first,
        last,
        end,
        ckp_floor,
        false,
    )
}

/// [`scan_logs`] over files found by `path_of`. With `stop_at_break`, a
/// later file that is missing or does not continue the chain ends the walk
/// (the summary's `end` says where) instead of failing it.
fn scan_log_chain(
    path_of: &dyn Fn(u32) -> PathBuf,
    first: u32,
    last: u32,
    end: Option<u32>,
    ckp_floor: Option<LogPosition>,
    stop_at_break: bool,
) -> Result<LogSummary, ArchiveError> {
    let mut s = LogSummary::default();
    let floor = ckp_floor.unwrap_or(LogPosition::new(first, PERSIST_RECORD_LEN));
    let mut prev_last: Option<u32> = None;
    for n in first..=last {
        let name = log_file_name(n);
        let chain = |why: String| ArchiveError::LogChain {
            file: name.clone(),
            why,
        };
        let f = match File::open(path_of(n)) {
            Ok(f) => f,
            Err(e) if stop_at_break && n > first && e.kind() == io::ErrorKind::NotFound => break,
            Err(e) => return Err(io_err(format!("opening {name}"))(e)),
        };
        let mut expected = if n == first { None } else { prev_last };
        let mut from = 0u32;
        let mut last_record = None;
        loop {
            let v = read_verified(&f, from, expected, 4 << 20)
                .map_err(io_err(format!("reading {name}")))?;
            if from == 0 {
                match (v.walk.records, v.walk.header) {
                    (0, _) if stop_at_break && n > first => return Ok(s),
                    (0, _) => {
                        return Err(chain(match v.walk.stop {
                            WalkStop::Invalid(why) if n > first => {
                                format!("does not continue log.{:010}: {why}", n - 1)
                            }
                            WalkStop::Invalid(why) => why.to_owned(),
                            _ => "holds no log records".to_owned(),
                        }))
                    }
                    (_, Some(h)) if s.lg_max == 0 => s.lg_max = h.lg_max,
                    _ => {}
                }
            }
            let mut pos = 0usize;
            while pos < v.bytes.len() {
                let len = u32_at(&v.bytes, pos + 4).unwrap_or(0) as usize;
                let at = LogPosition::new(n, from + pos as u32);
                if let Some(body) = v
                    .bytes
                    .get(pos + RECORD_HEADER_LEN as usize..pos + len)
                    .filter(|_| at.offset != 0)
                {
                    inspect_record(body, floor, &mut s);
                }
                pos += len.max(1);
            }
            s.records += u64::from(v.walk.records);
            if v.walk.records == 0 {
                break;
            }
            last_record = v.walk.last_record;
            expected = v.walk.last_record;
            from = v.walk.end;
            if !matches!(
                v.walk.stop,
                WalkStop::EndOfBuffer | WalkStop::Incomplete { .. }
            ) {
                break;
            }
        }
        if n == last {
            if let Some(want) = end {
                if from != want {
                    return Err(chain(format!(
                        "its verified records end at offset {from}, expected {want}"
                    )));
                }
            }
        }
        prev_last = last_record;
        s.end = LogPosition::new(n, from);
    }
    Ok(s)
}

fn inspect_record(body: &[u8], floor: LogPosition, s: &mut LogSummary) {
    match u32_at(body, 0) {
        Some(REC_TXN_REGOP) => {
            if let (Some(TXN_COMMIT), Some(ts)) = (u32_at(body, 16), u32_at(body, 20)) {
                let ts = i64::from(ts as i32);
                s.commits += 1;
                s.first_commit_unix.get_or_insert(ts);
                s.last_commit_unix = Some(s.last_commit_unix.map_or(ts, |l| l.max(ts)));
            }
        }
        Some(REC_TXN_CKP) => {
            if let (Some(file), Some(offset), Some(ts)) =
                (u32_at(body, 16), u32_at(body, 20), u32_at(body, 32))
            {
                if s.earliest_checkpoint_unix.is_none() && LogPosition::new(file, offset) >= floor {
                    s.earliest_checkpoint_unix = Some(i64::from(ts as i32));
                }
            }
        }
        _ => {}
    }
}

// ---------------------------------------------------------------- archive

#[derive(Debug, Clone)]
pub struct ArchiveOptions {
    pub dir: PathBuf,
    pub archive: PathBuf,
    /// Newest backups to keep (at least 1).
    pub keep: u32,
    /// Also delete backups older than this many days.
    pub keep_days: Option<f64>,
    /// Prove a new backup recovers (scratch copy, db_recover -c, db_verify)
    /// before publishing it.
    pub verify: bool,
    pub scratch: Option<PathBuf>,
}

#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq)]
pub struct ArchiveReport {
    /// "created", "extended" or "unchanged".
    pub action: String,
    pub backup: String,
    pub env_id: String,
    pub base_id: String,
    pub log_start: LogPosition,
    pub log_end: LogPosition,
    pub files: usize,
    pub bytes: u64,
    pub commits: u64,
    pub first_commit: Option<String>,
    pub last_commit: Option<String>,
    pub earliest_restore: Option<String>,
    /// Copying from the mirror (and fsync).
    pub copy_seconds: f64,
    /// The recovery proof, when it ran.
    pub verified: bool,
    pub verify_seconds: f64,
    pub recovery_seconds: f64,
    pub seconds: f64,
    /// Backups deleted by retention.
    pub removed: Vec<String>,
    pub unix_ms: u64,
}

/// A consistent view of the mirror.
#[derive(Debug, Clone)]
struct Snapshot {
    state: StandbyState,
    base: BaseState,
    env_id: String,
    durable: LogPosition,
}

fn take_snapshot(dir: &StandbyDir) -> Result<Snapshot, ArchiveError> {
    if !dir.meta().is_dir() {
        return Err(ArchiveError::NotAStandby(dir.root.clone()));
    }
    let state = dir.load_state()?;
    if state.promoted.is_some() {
        return Err(ArchiveError::Promoted(dir.root.clone()));
    }
    if state.pending_swap.is_some() {
        return Err(ArchiveError::NotRecoverable("a rebase is being swapped in (by `run`, or by `run` when it next starts); try again shortly".into()));
    }
    let tail = scan_tail(dir, &state).map_err(io_err("reading the standby's log"))?;
    let (Some(base), Some(env_id)) = (state.base.clone(), state.env_id.clone()) else {
        return Err(ArchiveError::NotRecoverable("it holds no base".into()));
    };
    if !is_recoverable(&state, tail.durable) {
        return Err(ArchiveError::NotRecoverable(if base.files_done {
            format!(
                "its log ends at {} but the base needs it up to {}",
                tail.durable,
                base.consistent_at.unwrap_or_default()
            )
        } else {
            "its base copy is incomplete".into()
        }));
    }
    Ok(Snapshot {
        state,
        base,
        env_id,
        durable: tail.durable,
    })
}

/// Is the base the snapshot saw still the standby's base, with no swap
/// and no promotion under way?
fn source_unchanged(dir: &StandbyDir, snap: &Snapshot) -> Result<bool, ArchiveError> {
    let now = dir.load_state()?;
    if now.promoted.is_some() {
        return Err(ArchiveError::Promoted(dir.root.clone()));
    }
    Ok(now.pending_swap.is_none()
        && now.base.as_ref().is_some_and(|b| {
            b.base_id == snap.base.base_id && b.log_start == snap.base.log_start && b.files_done
        }))
}

fn temp_dir_in(archive: &Path, tag: &str) -> Result<PathBuf, ArchiveError> {
    for i in 0..100u32 {
        let p = archive.join(format!(
            "{TEMP_PREFIX}{tag}-{}-{}-{i}",
            std::process::id(),
            tandem_shared::now_unix_ms()
        ));
        match fs::create_dir(&p) {
            Ok(()) => return Ok(p),
            Err(e) if e.kind() == io::ErrorKind::AlreadyExists => continue,
            Err(e) => return Err(io_err(format!("creating {}", p.display()))(e)),
        }
    }
    Err(ArchiveError::Check(format!(
        "cannot create a temporary directory in {}",
        archive.display()
    )))
}

/// Removes a directory tree, ignoring "already gone".
fn remove_tree(p: &Path) -> io::Result<()> {
    match fs::remove_dir_all(p) {
        Err(e) if e.kind() != io::ErrorKind::NotFound => Err(e),
        _ => Ok(()),
    }
}

/// Removes what an interrupted writer left (call with the writer lock).
fn clean_temps(archive: &Path) -> Result<(), ArchiveError> {
    for e in fs::read_dir(archive)
        .map_err(io_err(format!("listing {}", archive.display())))?
        .flatten()
    {
        if e.file_name()
            .to_str()
            .is_some_and(|n| n.starts_with(TEMP_PREFIX))
        {
            tracing::info!(path = %e.path().display(), "removing an unfinished backup left by an interrupted archiver");
            remove_tree(&e.path()).map_err(io_err(format!("removing {}", e.path().display())))?;
        }
    }
    Ok(())
}

/// Copies the snapshot's files from the mirror into `temp`.
fn copy_snapshot(
    dir: &StandbyDir,
    snap: &Snapshot,
    temp: &Path,
) -> Result<Vec<ManifestFile>, ArchiveError> {
    let mut files = Vec::new();
    for name in &snap.base.complete_files {
        let src = wirepath::resolve_under(&dir.root, name)?;
        let (size, hash) = copy_hashed(&src, &temp.join(wirepath::validate(name)?), None, true)?;
        let kind = if name == DB_CONFIG {
            FileKind::Config
        } else {
            FileKind::Database
        };
        files.push(ManifestFile {
            name: name.clone(),
            kind,
            size,
            blake3: hash.to_hex().to_string(),
        });
    }
    files.extend(copy_logs(
        &log_source(dir, &snap.state, false),
        &snap.state.log_dir,
        snap.base.log_start.file,
        snap.durable,
        temp,
    )?);
    Ok(files)
}

/// Where the archiver reads log file N: the mirror, or first the files
/// the mirror retired for the archive (when finishing an older backup).
fn log_source(dir: &StandbyDir, state: &StandbyState, held_first: bool) -> impl Fn(u32) -> PathBuf {
    let mirror = dir.log_dir(state);
    let held = crate::archive_hold::hold_dir(dir);
    move |n| {
        let name = log_file_name(n);
        match held.join(&name) {
            p if held_first && p.exists() => p,
            _ => mirror.join(name),
        }
    }
}

/// Copies log files `from..=end.file`, the last up to `end`.
fn copy_logs(
    source: &dyn Fn(u32) -> PathBuf,
    log_dir: &str,
    from: u32,
    end: LogPosition,
    temp: &Path,
) -> Result<Vec<ManifestFile>, ArchiveError> {
    let mut files = Vec::new();
    for n in from..=end.file {
        let name = log_rel_name(log_dir, n);
        let src = source(n);
        let limit = (n == end.file).then_some(u64::from(end.offset));
        let (size, hash) = copy_hashed(&src, &temp.join(wirepath::validate(&name)?), limit, false)?;
        files.push(ManifestFile {
            name,
            kind: FileKind::Log,
            size,
            blake3: hash.to_hex().to_string(),
        });
    }
    Ok(files)
}

/// Builds a new backup of the mirror in a temp directory of the archive.
/// Returns the temp directory and its manifest.
fn build_backup(dir: &StandbyDir, archive: &Path) -> Result<(PathBuf, Manifest), ArchiveError> {
    for attempt in 1..=COPY_ATTEMPTS {
        let snap = take_snapshot(dir)?;
        let temp = temp_dir_in(archive, "new")?;
        let copied = copy_snapshot(dir, &snap, &temp);
        if !source_unchanged(dir, &snap)? {
            tracing::info!(
                attempt,
                "the standby's base changed during the copy; copying again"
            );
            remove_tree(&temp).map_err(io_err("removing a temporary directory"))?;
            continue;
        }
        let result = copied.and_then(|mut files| {
            let log_dir = temp.join(&snap.state.log_dir);
            let summary = scan_logs(
                &log_dir,
                snap.base.log_start.file,
                snap.durable.file,
                Some(snap.durable.offset),
                None,
            )?;
            files.sort_by(|a, b| a.name.cmp(&b.name));
            let now = tandem_shared::now_unix_ms();
            let mut m = Manifest {
                format: MANIFEST_FORMAT.into(),
                env_id: snap.env_id.clone(),
                base_id: snap.base.base_id.clone(),
                epoch: snap.state.epoch,
                source: dir.root.display().to_string(),
                created_unix_ms: now,
                updated_unix_ms: now,
                log_dir: snap.state.log_dir.clone(),
                log_start: snap.base.log_start,
                log_end: snap.durable,
                lg_max: summary.lg_max,
                commits: summary.commits,
                first_commit_unix: summary.first_commit_unix,
                last_commit_unix: summary.last_commit_unix,
                earliest_checkpoint_unix: summary.earliest_checkpoint_unix,
                files,
                digest: String::new(),
            };
            m.seal();
            write_manifest_and_sync(&temp, &m)?;
            Ok(m)
        });
        return match result {
            Ok(m) => Ok((temp, m)),
            Err(e) => {
                let _ = remove_tree(&temp);
                Err(e)
            }
        };
    }
    Err(ArchiveError::SourceChanged {
        attempts: COPY_ATTEMPTS,
    })
}

fn write_manifest_and_sync(temp: &Path, m: &Manifest) -> Result<(), ArchiveError> {
    let path = temp.join(MANIFEST_FILE);
    let mut f = OpenOptions::new()
        .write(true)
        .create_new(true)
        .open(&path)
        .map_err(io_err(format!("creating {}", path.display())))?;
    f.write_all(&m.to_bytes())
        .map_err(io_err(format!("writing {}", path.display())))?;
    f.sync_all()
        .map_err(io_err(format!("fsync of {}", path.display())))?;
    fsync_tree(temp).map_err(io_err(format!("fsync of {}", temp.display())))
}

fn report_from(action: &str, backup: &Path, m: &Manifest) -> ArchiveReport {
    ArchiveReport {
        action: action.into(),
        backup: backup.display().to_string(),
        env_id: m.env_id.clone(),
        base_id: m.base_id.clone(),
        log_start: m.log_start,
        log_end: m.log_end,
        files: m.files.len(),
        bytes: m.files.iter().map(|f| f.size).sum(),
        commits: m.commits,
        first_commit: m.first_commit_unix.map(rfc3339),
        last_commit: m.last_commit_unix.map(rfc3339),
        earliest_restore: m.earliest_restore_unix().map(rfc3339),
        unix_ms: tandem_shared::now_unix_ms(),
        ..Default::default()
    }
}

/// Creates the archive directory if needed. An archive inside the
/// standby directory is refused: it would put files into the mirror.
fn create_archive_dir(opts: &ArchiveOptions) -> Result<(), ArchiveError> {
    let archive = &opts.archive;
    if !archive.is_dir() {
        fs::create_dir_all(archive).map_err(io_err(format!("creating {}", archive.display())))?;
        if let Some(parent) = archive.parent().filter(|p| !p.as_os_str().is_empty()) {
            fsync_dir(parent).map_err(io_err(format!("fsync of {}", parent.display())))?;
        }
    }
    let canon =
        |p: &Path| fs::canonicalize(p).map_err(io_err(format!("resolving {}", p.display())));
    if let (Ok(dir), Ok(archive)) = (canon(&opts.dir), canon(archive)) {
        if archive.starts_with(&dir) {
            return Err(ArchiveError::Check(format!(
                "the archive {} is inside the standby directory {}: put it elsewhere (another disk is best)",
                archive.display(),
                dir.display()
            )));
        }
    }
    Ok(())
}

/// Archives the standby once: a new backup, then retention.
pub fn archive_once(opts: &ArchiveOptions) -> Result<ArchiveReport, ArchiveError> {
    create_archive_dir(opts)?;
    let _writer = lock_archive(&opts.archive, WRITER_LOCK, true, true)?;
    clean_temps(&opts.archive)?;
    let report = new_backup(opts)?;
    record_report(opts, &report);
    Ok(report)
}

fn record_report(opts: &ArchiveOptions, report: &ArchiveReport) {
    let dir = StandbyDir::new(&opts.dir);
    if let Ok(bytes) = serde_json::to_vec_pretty(report) {
        if let Err(e) =
            tandem_shared::durable::write_file_atomic(&dir.meta().join(REPORT_FILE), &bytes)
        {
            tracing::warn!(error = %e, "could not record the archive report in .tandem");
        }
    }
}

/// Builds, proves and publishes a new backup (with the writer lock held).
fn new_backup(opts: &ArchiveOptions) -> Result<ArchiveReport, ArchiveError> {
    let started = Instant::now();
    let dir = StandbyDir::new(&opts.dir);
    let (temp, m) = build_backup(&dir, &opts.archive)?;
    let copy_seconds = started.elapsed().as_secs_f64();
    let mut report = report_from("created", &temp, &m);
    report.copy_seconds = copy_seconds;
    if opts.verify {
        let proof = crate::restore::prove_recovers(&temp, &m, opts.scratch.as_deref());
        match proof {
            Ok(p) => {
                report.verified = true;
                report.verify_seconds = p.seconds;
                report.recovery_seconds = p.recovery_seconds;
            }
            Err(e) => {
                let _ = remove_tree(&temp);
                return Err(ArchiveError::Check(format!(
                    "the new backup did not prove recoverable, so it was not kept: {e}"
                )));
            }
        }
    }
    let published = {
        let _publish = lock_archive(&opts.archive, PUBLISH_LOCK, true, true)?;
        let published = publish_new(&opts.archive, &temp, m.created_unix_ms, &m.base_id);
        if published.is_err() {
            let _ = remove_tree(&temp);
        }
        let published = published?;
        match apply_retention(&opts.archive, opts.keep, opts.keep_days, &published) {
            Ok(removed) => report.removed = removed,
            // The new backup is in place; only the clean-up failed.
            Err(e) => {
                tracing::error!(error = %e, "retention failed: old backups were not all deleted")
            }
        }
        published
    };
    report.backup = published.display().to_string();
    report.seconds = started.elapsed().as_secs_f64();
    tracing::info!(backup = %report.backup, log_end = %m.log_end, bytes = report.bytes, removed = report.removed.len(), "backup written");
    Ok(report)
}

/// Renames a built backup into place under a fresh name.
fn publish_new(
    archive: &Path,
    temp: &Path,
    created_ms: u64,
    base_id: &str,
) -> Result<PathBuf, ArchiveError> {
    let name = backup_name(created_ms, base_id);
    for i in 1..100u32 {
        let candidate = if i == 1 {
            archive.join(&name)
        } else {
            archive.join(format!("{name}-{i}"))
        };
        if fs::symlink_metadata(&candidate).is_ok() {
            continue;
        }
        match fs::rename(temp, &candidate) {
            Ok(()) => {
                fsync_dir(archive).map_err(io_err(format!("fsync of {}", archive.display())))?;
                return Ok(candidate);
            }
            Err(e) if matches!(e.raw_os_error(), Some(libc::ENOTEMPTY) | Some(libc::EEXIST)) => {
                continue
            }
            Err(e) => {
                return Err(io_err(format!(
                    "renaming the new backup to {}",
                    candidate.display()
                ))(e))
            }
        }
    }
    Err(ArchiveError::Check(format!(
        "no free backup name for {name} in {}",
        archive.display()
    )))
}

/// Which backups retention deletes: those beyond the newest `keep`, and
/// those older than `keep_days`; never the newest. `backups` is oldest
/// first, as (name, created unix ms).
pub fn select_expired(
    backups: &[(String, u64)],
    keep: u32,
    keep_days: Option<f64>,
    now_ms: u64,
) -> Vec<String> {
    let n = backups.len();
    let keep = keep.max(1) as usize;
    backups
        .iter()
        .enumerate()
        .filter(|(i, (_, created))| {
            let from_newest = n - 1 - i;
            let too_old = keep_days
                .is_some_and(|d| (now_ms.saturating_sub(*created) as f64) > d * 86_400_000.0);
            from_newest > 0 && (from_newest >= keep || too_old)
        })
        .map(|(_, (name, _))| name.clone())
        .collect()
}

/// Deletes expired backups (with the publish lock held). `just_made` is
/// never deleted, whatever the clock says.
fn apply_retention(
    archive: &Path,
    keep: u32,
    keep_days: Option<f64>,
    just_made: &Path,
) -> Result<Vec<String>, ArchiveError> {
    let backups: Vec<(String, u64)> = list_backups(archive)?
        .into_iter()
        .map(|b| (b.name, b.created_unix_ms))
        .collect();
    let mut removed = Vec::new();
    for name in select_expired(&backups, keep, keep_days, tandem_shared::now_unix_ms()) {
        let path = archive.join(&name);
        if path == just_made {
            continue;
        }
        // Out of the listing atomically first, then deleted.
        let doomed = archive.join(format!("{TEMP_PREFIX}del-{name}"));
        fs::rename(&path, &doomed).map_err(io_err(format!("retiring {}", path.display())))?;
        fsync_dir(archive).map_err(io_err(format!("fsync of {}", archive.display())))?;
        remove_tree(&doomed).map_err(io_err(format!("deleting {}", doomed.display())))?;
        tracing::info!(backup = %name, "retention: deleted an old backup");
        removed.push(name);
    }
    Ok(removed)
}

// ---------------------------------------------------------------- follow

/// One round of `archive --follow`: extend the latest backup with the log
/// the standby received since, or start a new backup when there is none
/// or the standby's base changed.
pub fn follow_round(opts: &ArchiveOptions) -> Result<ArchiveReport, ArchiveError> {
    create_archive_dir(opts)?;
    let _writer = lock_archive(&opts.archive, WRITER_LOCK, true, true)?;
    clean_temps(&opts.archive)?;
    let dir = StandbyDir::new(&opts.dir);
    let snap = take_snapshot(&dir)?;
    let latest = list_backups(&opts.archive)?.pop();
    let current = latest.and_then(|b| match read_manifest(&b.path) {
        Ok(m) => Some((b, m)),
        Err(e) => {
            tracing::warn!(error = %e, "the latest backup's manifest is unreadable: starting a new backup");
            None
        }
    });
    let report = match current {
        Some((b, m))
            if m.env_id == snap.env_id
                && m.base_id == snap.base.base_id
                && m.log_start == snap.base.log_start
                && m.log_end <= snap.durable =>
        {
            if m.log_end == snap.durable {
                report_from("unchanged", &b.path, &m)
            } else {
                match extend_backup(&dir, opts, &b, &m, false)? {
                    Some(r) => r,
                    None => new_backup(opts)?,
                }
            }
        }
        Some((b, m)) if m.env_id == snap.env_id => {
            // The standby moved to another base: first carry the previous
            // backup as far as the log goes, so point-in-time restore has
            // no gap between it and the new one.
            if let Err(e) = extend_backup(&dir, opts, &b, &m, true) {
                tracing::warn!(backup = %b.name, error = %e, "could not finish the previous backup with the log held for it");
            }
            new_backup(opts)?
        }
        _ => new_backup(opts)?,
    };
    if report.action != "unchanged" {
        record_report(opts, &report);
    }
    register_hold(&dir, opts, report.log_end)?;
    Ok(report)
}

/// Records how far the archive reaches, so the standby (and through its
/// Ack the primary) keeps the log after it; then drops held files the
/// archive no longer needs.
fn register_hold(
    dir: &StandbyDir,
    opts: &ArchiveOptions,
    log_end: LogPosition,
) -> Result<(), ArchiveError> {
    let hold = crate::archive_hold::ArchiveHold {
        archive: opts.archive.display().to_string(),
        log_end,
        updated_unix_ms: tandem_shared::now_unix_ms(),
    };
    // An unchanged round rewrites (and fsyncs) nothing.
    if crate::archive_hold::load(dir)
        .is_none_or(|h| h.archive != hold.archive || h.log_end != log_end)
    {
        crate::archive_hold::store(dir, &hold)
            .map_err(io_err("recording the archive's position in .tandem"))?;
    }
    crate::archive_hold::delete_held(dir, log_end.file)
        .map_err(io_err("deleting log files held for the archive"))
}

/// Builds the successor of backup `b` (its files hard-linked, the last log
/// file and newer ones copied) and swaps it in. Normally the log comes from
/// the mirror, up to its durable end, while the mirror still holds `b`'s
/// base. With `finish`, the mirror has moved to another base and the log
/// comes first from the files retired for the archive
/// ([`crate::archive_hold`]), as far as the record chain continues. `None`
/// when there is nothing to extend with, or the filesystem cannot swap
/// directories atomically: the caller then writes a new backup.
fn extend_backup(
    dir: &StandbyDir,
    opts: &ArchiveOptions,
    b: &BackupEntry,
    m: &Manifest,
    finish: bool,
) -> Result<Option<ArchiveReport>, ArchiveError> {
    let started = Instant::now();
    for attempt in 1..=COPY_ATTEMPTS {
        let snap = take_snapshot(dir)?;
        let source = log_source(dir, &snap.state, finish);
        let end = if finish {
            match scan_log_chain(&source, m.log_end.file, snap.durable.file, None, None, true) {
                Ok(reach) => reach.end.min(snap.durable),
                Err(e) => {
                    tracing::warn!(backup = %b.name, error = %e, "the log after this backup's end is no longer on the standby: it stays as it is");
                    return Ok(None);
                }
            }
        } else if snap.base.base_id != m.base_id {
            return Ok(None);
        } else {
            snap.durable
        };
        if end <= m.log_end {
            return Ok(None);
        }
        let temp = temp_dir_in(&opts.archive, "extend")?;
        let built = build_extension(&source, &snap, b, m, end, &temp);
        if !finish && !source_unchanged(dir, &snap)? {
            tracing::info!(
                attempt,
                "the standby's base changed during the copy; copying again"
            );
            remove_tree(&temp).map_err(io_err("removing a temporary directory"))?;
            continue;
        }
        let new_m = match built {
            Ok(new_m) => new_m,
            Err(e) => {
                let _ = remove_tree(&temp);
                return Err(e);
            }
        };
        let copy_seconds = started.elapsed().as_secs_f64();
        let swapped = {
            let _publish = lock_archive(&opts.archive, PUBLISH_LOCK, true, true)?;
            exchange_dirs(&temp, &b.path)
        };
        match swapped {
            Ok(()) => {
                fsync_dir(&opts.archive)
                    .map_err(io_err(format!("fsync of {}", opts.archive.display())))?;
                // `temp` now holds the previous version.
                remove_tree(&temp).map_err(io_err(format!("removing {}", temp.display())))?;
            }
            Err(e)
                if matches!(
                    e.raw_os_error(),
                    Some(libc::EINVAL) | Some(libc::ENOSYS) | Some(libc::EOPNOTSUPP)
                ) =>
            {
                tracing::warn!(error = %e, "this filesystem cannot swap directories atomically: writing a new backup instead of extending");
                let _ = remove_tree(&temp);
                return Ok(None);
            }
            Err(e) => {
                let _ = remove_tree(&temp);
                return Err(io_err(format!(
                    "swapping the extended backup into {}",
                    b.path.display()
                ))(e));
            }
        }
        let mut report = report_from("extended", &b.path, &new_m);
        report.copy_seconds = copy_seconds;
        report.seconds = started.elapsed().as_secs_f64();
        tracing::info!(backup = %b.name, from = %m.log_end, to = %new_m.log_end, finished = finish, "backup extended");
        return Ok(Some(report));
    }
    Err(ArchiveError::SourceChanged {
        attempts: COPY_ATTEMPTS,
    })
}

fn build_extension(
    source: &dyn Fn(u32) -> PathBuf,
    snap: &Snapshot,
    b: &BackupEntry,
    m: &Manifest,
    end: LogPosition,
    temp: &Path,
) -> Result<Manifest, ArchiveError> {
    let old_last = m.log_end.file;
    let old_last_name = log_rel_name(&m.log_dir, old_last);
    let mut files = Vec::new();
    for f in &m.files {
        if f.name == old_last_name {
            continue;
        }
        let rel = wirepath::validate(&f.name)?;
        let to = temp.join(&rel);
        if let Some(parent) = to.parent() {
            fs::create_dir_all(parent).map_err(io_err(format!("creating {}", parent.display())))?;
        }
        fs::hard_link(b.path.join(&rel), &to).map_err(io_err(format!("linking {}", f.name)))?;
        files.push(f.clone());
    }
    files.extend(copy_logs(source, &m.log_dir, old_last, end, temp)?);
    // The mirror's copy of the old last file must start with exactly the
    // bytes the backup holds.
    let rel = wirepath::validate(&old_last_name)?;
    let limit = Some(u64::from(m.log_end.offset));
    let (_, ours) =
        hash_file(&b.path.join(&rel), limit).map_err(io_err(format!("reading {old_last_name}")))?;
    let (_, theirs) =
        hash_file(&temp.join(&rel), limit).map_err(io_err(format!("reading {old_last_name}")))?;
    if ours != theirs {
        return Err(ArchiveError::Check(format!(
            "{old_last_name} in the standby no longer starts with the bytes backed up in {}: start a new backup",
            b.path.display()
        )));
    }
    let floor = Some(LogPosition::new(m.log_start.file, PERSIST_RECORD_LEN));
    let log_dir_old = b.path.join(&m.log_dir);
    let log_dir_new = temp.join(&m.log_dir);
    let before = scan_logs(
        &log_dir_old,
        old_last,
        old_last,
        Some(m.log_end.offset),
        floor,
    )?;
    let after = scan_logs(&log_dir_new, old_last, end.file, Some(end.offset), floor)?;
    files.sort_by(|a, b| a.name.cmp(&b.name));
    let mut new_m = Manifest {
        updated_unix_ms: tandem_shared::now_unix_ms(),
        log_end: end,
        commits: m.commits - before.commits.min(m.commits) + after.commits,
        first_commit_unix: m.first_commit_unix.or(after.first_commit_unix),
        last_commit_unix: match (m.last_commit_unix, after.last_commit_unix) {
            (Some(a), Some(b)) => Some(a.max(b)),
            (a, b) => a.or(b),
        },
        earliest_checkpoint_unix: m
            .earliest_checkpoint_unix
            .or(after.earliest_checkpoint_unix),
        epoch: snap.state.epoch.max(m.epoch),
        files,
        ..m.clone()
    };
    new_m.seal();
    write_manifest_and_sync(temp, &new_m)?;
    Ok(new_m)
}

fn exchange_dirs(a: &Path, b: &Path) -> io::Result<()> {
    use std::ffi::CString;
    use std::os::unix::ffi::OsStrExt;
    let ca = CString::new(a.as_os_str().as_bytes())
        .map_err(|_| io::Error::from(io::ErrorKind::InvalidInput))?;
    let cb = CString::new(b.as_os_str().as_bytes())
        .map_err(|_| io::Error::from(io::ErrorKind::InvalidInput))?;
    // SAFETY: two valid NUL-terminated paths; AT_FDCWD for relative ones.
    let rc = unsafe {
        libc::renameat2(
            libc::AT_FDCWD,
            ca.as_ptr(),
            libc::AT_FDCWD,
            cb.as_ptr(),
            libc::RENAME_EXCHANGE,
        )
    };
    if rc == 0 {
        Ok(())
    } else {
        Err(io::Error::last_os_error())
    }
}

/// `archive --follow`: a round every `every` until `stop` is set. Each
/// round's outcome goes to `report`; a failed round is retried next time.
pub fn follow(
    opts: &ArchiveOptions,
    every: Duration,
    stop: &AtomicBool,
    mut report: impl FnMut(&Result<ArchiveReport, ArchiveError>),
) {
    while !stop.load(Ordering::SeqCst) {
        let started = Instant::now();
        let result = follow_round(opts);
        if let Err(e) = &result {
            tracing::error!(error = %e, "archive round failed; retrying next round");
        }
        report(&result);
        let next = started + every;
        while !stop.load(Ordering::SeqCst) {
            let now = Instant::now();
            if now >= next {
                break;
            }
            std::thread::sleep((next - now).min(Duration::from_millis(100)));
        }
    }
}

#[cfg(test)]
#[path = "archive_tests.rs"]
mod tests;
