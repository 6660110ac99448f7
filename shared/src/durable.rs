//! Durable writes. A file is made durable by fsyncing it; its name is made
//! durable by fsyncing the directory that holds it (rename and create are
//! directory operations, see fsync(2): "Calling fsync() does not necessarily
//! ensure that the entry in the directory containing the file has also
//! reached disk"). Control files are written partial, fsync, rename, fsync
//! the directory, so a crash leaves either the old or the new file.

use serde::{de::DeserializeOwned, Serialize};
use std::fs::{File, OpenOptions};
use std::io::{self, Write};
use std::path::{Path, PathBuf};

pub fn fsync_dir(dir: &Path) -> io::Result<()> {
    File::open(dir)?.sync_all()
}

/// Removes a directory tree; "already gone" is done too. True if there
/// was one to remove.
pub fn remove_tree(dir: &Path) -> io::Result<bool> {
    match std::fs::remove_dir_all(dir) {
        Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(false),
        Err(e) => Err(e),
        Ok(()) => Ok(true),
    }
}

/// [`remove_tree`], then fsyncs the parent so the removal is durable
/// before anything that depends on it.
pub fn remove_tree_durably(dir: &Path) -> io::Result<()> {
    if !remove_tree(dir)? {
        return Ok(());
    }
    match dir.parent() {
        Some(parent) if parent.is_dir() => fsync_dir(parent),
        _ => Ok(()),
    }
}

/// Replaces `path` with `bytes` atomically and durably.
pub fn write_file_atomic(path: &Path, bytes: &[u8]) -> io::Result<()> {
    let partial = partial_path(path);
    {
        let mut f = OpenOptions::new()
            .write(true)
            .create(true)
            .truncate(true)
            .open(&partial)?;
        f.write_all(bytes)?;
        f.sync_all()?;
    }
    std::fs::rename(&partial, path)?;
    // A bare file name has an empty parent: the current directory.
    let dir = path
        .parent()
        .filter(|p| !p.as_os_str().is_empty())
        .unwrap_or(Path::new("."));
    fsync_dir(dir)
}

fn partial_path(path: &Path) -> PathBuf {
    let mut s = path.as_os_str().to_owned();
    s.push(".partial");
    PathBuf::from(s)
}

#[derive(Debug, thiserror::Error)]
pub enum ControlFileError {
    #[error("{path}: {source}")]
    Io { path: PathBuf, source: io::Error },
    #[error("{path}: not a Tandem control file (bad header)")]
    BadHeader { path: PathBuf },
    #[error("{path}: format version {found} is newer than this Tandem understands ({supported})")]
    TooNew {
        path: PathBuf,
        found: u32,
        supported: u32,
    },
    #[error("{path}: checksum mismatch: the file is corrupt")]
    Checksum { path: PathBuf },
    #[error("{path}: {source}")]
    Parse {
        path: PathBuf,
        source: serde_json::Error,
    },
}

const MAGIC: &str = "TANDEM-CONTROL";

/// A small durable state file: a header line with magic, format version and
/// the blake3 of the body, then the body as JSON (readable by operators).
pub struct ControlFile;

impl ControlFile {
    pub fn store<T: Serialize>(
        path: &Path,
        version: u32,
        value: &T,
    ) -> Result<(), ControlFileError> {
        let body = serde_json::to_vec_pretty(value).map_err(|source| ControlFileError::Parse {
            path: path.into(),
            source,
        })?;
        let mut out = format!("{MAGIC} v{version} {}\n", blake3::hash(&body).to_hex()).into_bytes();
        out.extend_from_slice(&body);
        out.push(b'\n');
        write_file_atomic(path, &out).map_err(|source| ControlFileError::Io {
            path: path.into(),
            source,
        })
    }

    /// `Ok(None)` if the file does not exist.
    pub fn load<T: DeserializeOwned>(
        path: &Path,
        supported: u32,
    ) -> Result<Option<T>, ControlFileError> {
        let bytes = match std::fs::read(path) {
            Ok(b) => b,
            Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(None),
            Err(source) => {
                return Err(ControlFileError::Io {
                    path: path.into(),
                    source,
                })
            }
        };
        let bad = || ControlFileError::BadHeader { path: path.into() };
        let nl = bytes.iter().position(|&b| b == b'\n').ok_or_else(bad)?;
        let header = std::str::from_utf8(&bytes[..nl]).map_err(|_| bad())?;
        let mut parts = header.split(' ');
        if parts.next() != Some(MAGIC) {
            return Err(bad());
        }
        let version: u32 = parts
            .next()
            .and_then(|v| v.strip_prefix('v'))
            .and_then(|v| v.parse().ok())
            .ok_or_else(bad)?;
        if version > supported {
            return Err(ControlFileError::TooNew {
                path: path.into(),
                found: version,
                supported,
            });
        }
        let digest = parts.next().ok_or_else(bad)?;
        let body = bytes[nl + 1..]
            .strip_suffix(b"\n")
            .unwrap_or(&bytes[nl + 1..]);
        if blake3::hash(body).to_hex().as_str() != digest {
            return Err(ControlFileError::Checksum { path: path.into() });
        }
        serde_json::from_slice(body)
            .map(Some)
            .map_err(|source| ControlFileError::Parse {
                path: path.into(),
                source,
            })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[derive(Serialize, serde::Deserialize, Debug, PartialEq)]
    struct S {
        a: u32,
        b: String,
    }

    #[test]
    fn round_trips_and_detects_corruption() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("state");
        assert!(ControlFile::load::<S>(&p, 1).unwrap().is_none());
        let s = S {
            a: 7,
            b: "x".into(),
        };
        ControlFile::store(&p, 1, &s).unwrap();
        assert_eq!(ControlFile::load::<S>(&p, 1).unwrap(), Some(s));
        let mut bytes = std::fs::read(&p).unwrap();
        let i = bytes.len() - 5;
        bytes[i] ^= 1;
        std::fs::write(&p, &bytes).unwrap();
        assert!(matches!(
            ControlFile::load::<S>(&p, 1),
            Err(ControlFileError::Checksum { .. })
        ));
    }

    #[test]
    fn refuses_a_newer_format() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("state");
        ControlFile::store(
            &p,
            3,
            &S {
                a: 1,
                b: String::new(),
            },
        )
        .unwrap();
        assert!(matches!(
            ControlFile::load::<S>(&p, 2),
            Err(ControlFileError::TooNew { found: 3, .. })
        ));
    }
}
