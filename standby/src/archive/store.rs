//! The archive directory on disk: which backups exist, its locks, and the
//! file operations every job shares (hashed copies, integrity checks,
//! fsync of whole trees, temp directories, the atomic directory swap).
//!
//! Locks in ARCHIVE (flock): [`WRITER_LOCK`] is held by whoever builds
//! backups, so two archivers never interleave; [`PUBLISH_LOCK`] is held
//! shared by readers (`verify-archive`, `restore`) while they read a
//! backup's files and exclusively while a backup is published, swapped or
//! deleted.

use super::manifest::{Manifest, MANIFEST_FILE};
use super::time::parse_backup_name;
use serde::Serialize;
use std::collections::BTreeSet;
use std::fs::{self, File, OpenOptions};
use std::io::{self, Read, Write};
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use tandem_shared::durable::fsync_dir;
pub use tandem_shared::durable::remove_tree;
use tandem_shared::envlayout::rel_name;
use tandem_shared::ioerror::{io_err, IoError};
use tandem_shared::wirepath::{self, PathError};

/// Held shared while reading a backup, exclusively while changing which
/// backups exist.
pub const PUBLISH_LOCK: &str = ".tandem-archive.lock";
/// Held by the one process building backups in an archive.
pub const WRITER_LOCK: &str = ".tandem-archive.writer";
/// Directories being built or deleted; removed by the next writer.
pub const TEMP_PREFIX: &str = ".tandem-tmp-";
const BUF: usize = 1 << 20;

/// A file operation on an archive or a backup that failed.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error(transparent)]
    Io(#[from] IoError),
    #[error("refused file name: {0}")]
    Path(#[from] PathError),
    #[error("{}: integrity check failed: {}", .backup.display(), .problems.iter().map(|p| p.to_string()).collect::<Vec<_>>().join("; "))]
    Integrity {
        backup: PathBuf,
        problems: Vec<Problem>,
    },
    /// A source file changed while it was copied.
    #[error("{0}")]
    Unstable(String),
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

// ---------------------------------------------------------------- listing

#[derive(Debug, Clone)]
pub struct BackupEntry {
    pub name: String,
    pub path: PathBuf,
    pub created_unix_ms: u64,
}

/// The backups in an archive directory, oldest first: directories named
/// like a backup that hold a manifest (readable or not).
pub fn list_backups(archive: &Path) -> Result<Vec<BackupEntry>, StoreError> {
    let mut out = Vec::new();
    let entries = match fs::read_dir(archive) {
        Ok(e) => e,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(out),
        Err(e) => return Err(io_err(format!("listing {}", archive.display()))(e).into()),
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

/// The archive a backup directory belongs to.
pub fn archive_of(backup: &Path) -> PathBuf {
    backup
        .parent()
        .map(Path::to_path_buf)
        .unwrap_or_else(|| PathBuf::from("."))
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
) -> Result<Option<ArchiveLock>, StoreError> {
    use rustix::fs::{flock, FlockOperation};
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
        Err(e) => return Err(io_err(format!("opening {}", path.display()))(e).into()),
    };
    let op = if exclusive {
        FlockOperation::LockExclusive
    } else {
        FlockOperation::LockShared
    };
    loop {
        match flock(&file, op) {
            Ok(()) => return Ok(Some(ArchiveLock { _file: file })),
            Err(rustix::io::Errno::INTR) => continue,
            Err(e) => return Err(io_err(format!("locking {}", path.display()))(e.into()).into()),
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
) -> Result<(u64, blake3::Hash), StoreError> {
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
            Err(e) => return Err(io_err(what("reading"))(e).into()),
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
        return Err(StoreError::Unstable(format!(
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
            return Err(StoreError::Unstable(format!(
                "{} changed while it was copied",
                from.display()
            )));
        }
    }
    Ok((size, hasher.finalize()))
}

pub(crate) fn hash_zeros(hasher: &mut blake3::Hasher, mut len: u64) {
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
pub fn check_files(backup: &Path, m: &Manifest) -> Result<(Vec<Problem>, u64), StoreError> {
    check_files_as(backup, m, true)
}

/// [`check_files`] without reading the files: missing, extra and resized
/// files only. For a reader that hashes every byte as it copies it
/// ([`copy_backup`]), which names an altered file then.
pub fn check_listing(backup: &Path, m: &Manifest) -> Result<Vec<Problem>, StoreError> {
    Ok(check_files_as(backup, m, false)?.0)
}

fn check_files_as(
    backup: &Path,
    m: &Manifest,
    read_bytes: bool,
) -> Result<(Vec<Problem>, u64), StoreError> {
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
        let read = match read_bytes {
            true => hash_file(&path, None),
            false => fs::metadata(&path).map(|md| (md.len(), blake3::Hash::from([0; 32]))),
        };
        match read {
            Ok((size, _)) if size != f.size => problems.push(Problem::Size {
                file: f.name.clone(),
                expected: f.size,
                found: size,
            }),
            Ok((size, _)) if !read_bytes => bytes += size,
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
/// comparing every file's blake3 with the manifest on the way: the first
/// altered file is an error naming it.
pub fn copy_backup(backup: &Path, m: &Manifest, dest: &Path) -> Result<u64, StoreError> {
    let (bytes, problems) = copy_checked(backup, m, dest, true)?;
    if !problems.is_empty() {
        return Err(StoreError::Integrity {
            backup: backup.to_path_buf(),
            problems,
        });
    }
    Ok(bytes)
}

/// Copies every file of a backup into `dest`, hashing each as it is copied
/// (one read), and names each one whose blake3 or size is not the
/// manifest's (only the first with `first_only`). The listing is checked
/// before ([`check_listing`]).
pub fn copy_checked(
    backup: &Path,
    m: &Manifest,
    dest: &Path,
    first_only: bool,
) -> Result<(u64, Vec<Problem>), StoreError> {
    let (mut bytes, mut problems) = (0, Vec::new());
    for f in &m.files {
        let rel = wirepath::validate(&f.name)?;
        let (size, hash) = copy_hashed(&backup.join(&rel), &dest.join(&rel), None, false)?;
        let found = hash.to_hex().to_string();
        if size != f.size || found != f.blake3 {
            problems.push(Problem::Altered {
                file: f.name.clone(),
                expected: f.blake3.clone(),
                found,
            });
            if first_only {
                break;
            }
        }
        bytes += size;
    }
    Ok((bytes, problems))
}

// ---------------------------------------------------------------- directories

/// A fresh directory `<TEMP_PREFIX><tag>-…` in the archive.
pub fn temp_dir_in(archive: &Path, tag: &str) -> Result<PathBuf, StoreError> {
    // Kept: the caller publishes it by renaming, or removes it; one an
    // interrupted writer left is removed by `clean_temps`.
    let dir = tempfile::Builder::new()
        .prefix(&format!("{TEMP_PREFIX}{tag}-"))
        .tempdir_in(archive)
        .map_err(io_err(format!(
            "creating a temporary directory in {}",
            archive.display()
        )))?;
    Ok(dir.keep())
}

/// Removes what an interrupted writer left (call with the writer lock).
pub fn clean_temps(archive: &Path) -> Result<(), StoreError> {
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

/// Swaps two directories atomically (`renameat2(RENAME_EXCHANGE)`).
/// Filesystems without it fail with EINVAL (or ENOSYS, EOPNOTSUPP).
pub fn exchange_dirs(a: &Path, b: &Path) -> io::Result<()> {
    use rustix::fs::{renameat_with, RenameFlags, CWD};
    renameat_with(CWD, a, CWD, b, RenameFlags::EXCHANGE).map_err(io::Error::from)
}

/// Did a rename fail because its target exists (a non-empty directory)?
pub fn target_exists(e: &io::Error) -> bool {
    use rustix::io::Errno;
    matches!(
        Errno::from_io_error(e),
        Some(Errno::NOTEMPTY | Errno::EXIST)
    )
}

/// Is this error a filesystem saying it cannot swap directories?
pub fn cannot_exchange(e: &io::Error) -> bool {
    use rustix::io::Errno;
    matches!(
        Errno::from_io_error(e),
        Some(Errno::INVAL | Errno::NOSYS | Errno::OPNOTSUPP)
    )
}

#[cfg(test)]
mod tests {
    use super::*;
    use rustix::fs::{flock, FlockOperation};

    /// Whether another open file description could take `op` on the lock
    /// file now (flock conflicts between descriptions, even in a process).
    fn could_take(path: &Path, op: FlockOperation) -> bool {
        let f = File::open(path).unwrap();
        flock(&f, op).is_ok()
    }

    #[test]
    fn the_writer_lock_excludes_and_readers_share() {
        let d = tempfile::tempdir().unwrap();
        assert!(
            lock_archive(d.path(), PUBLISH_LOCK, false, false)
                .unwrap()
                .is_none(),
            "a reader creates nothing where no writer ever ran"
        );
        let path = d.path().join(WRITER_LOCK);
        let held = lock_archive(d.path(), WRITER_LOCK, true, true).unwrap();
        assert!(!could_take(&path, FlockOperation::NonBlockingLockShared));
        drop(held);
        assert!(could_take(&path, FlockOperation::NonBlockingLockExclusive));
        let shared = lock_archive(d.path(), WRITER_LOCK, false, true).unwrap();
        assert!(could_take(&path, FlockOperation::NonBlockingLockShared));
        assert!(!could_take(&path, FlockOperation::NonBlockingLockExclusive));
        drop(shared);
    }

    #[test]
    fn exchange_swaps_two_directories() {
        let d = tempfile::tempdir().unwrap();
        let (a, b) = (d.path().join("a"), d.path().join("b"));
        fs::create_dir(&a).unwrap();
        fs::create_dir(&b).unwrap();
        fs::write(a.join("x"), b"from a").unwrap();
        fs::write(b.join("x"), b"from b").unwrap();
        match exchange_dirs(&a, &b) {
            Ok(()) => {
                assert_eq!(fs::read(a.join("x")).unwrap(), b"from b");
                assert_eq!(fs::read(b.join("x")).unwrap(), b"from a");
            }
            // A filesystem without RENAME_EXCHANGE: the caller falls back.
            Err(e) => assert!(cannot_exchange(&e), "{e}"),
        }
        let e = fs::rename(&a, &b).unwrap_err();
        assert!(target_exists(&e), "{e}");
    }
}
