//! File names that arrive from the network. A name is accepted only if it
//! stays inside the standby's directory: relative, no `..`, no `.`-prefixed
//! component (Tandem's own state lives in `.tandem`), and no symlink on the
//! way that could lead out.

use std::io;
use std::path::{Component, Path, PathBuf};

pub const MAX_NAME_LEN: usize = 1024;

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum PathError {
    #[error("empty file name")]
    Empty,
    #[error("file name {0:?} is longer than {MAX_NAME_LEN} bytes")]
    TooLong(String),
    #[error("file name {0:?} is absolute")]
    Absolute(String),
    #[error("file name {0:?} contains '..' or '.'")]
    Dots(String),
    #[error("file name {0:?} has a hidden component (reserved for Tandem's state)")]
    Hidden(String),
    #[error("file name {0:?} contains a NUL or backslash")]
    BadCharacter(String),
    #[error("file name {name:?} goes through symlink {link:?}")]
    Symlink { name: String, link: PathBuf },
    #[error("file name {name:?}: {what}")]
    Io { name: String, what: String },
}

/// Checks a wire name and returns it as a relative path.
pub fn validate(name: &str) -> Result<PathBuf, PathError> {
    if name.is_empty() {
        return Err(PathError::Empty);
    }
    if name.len() > MAX_NAME_LEN {
        return Err(PathError::TooLong(name.chars().take(64).collect()));
    }
    if name.contains('\0') || name.contains('\\') {
        return Err(PathError::BadCharacter(name.to_owned()));
    }
    let path = Path::new(name);
    let mut out = PathBuf::new();
    for c in path.components() {
        match c {
            Component::Normal(s) => {
                if s.to_string_lossy().starts_with('.') {
                    return Err(PathError::Hidden(name.to_owned()));
                }
                out.push(s);
            }
            Component::RootDir | Component::Prefix(_) => {
                return Err(PathError::Absolute(name.to_owned()))
            }
            Component::ParentDir | Component::CurDir => {
                return Err(PathError::Dots(name.to_owned()))
            }
        }
    }
    // `Path::components` silently drops "./" in the middle; refuse it anyway.
    if name.split('/').any(|part| part == "." || part == "..") {
        return Err(PathError::Dots(name.to_owned()));
    }
    Ok(out)
}

/// Resolves a validated relative path under `root`, refusing any existing
/// component that is a symlink, so a planted link cannot redirect a write.
pub fn resolve_under(root: &Path, name: &str) -> Result<PathBuf, PathError> {
    let rel = validate(name)?;
    let mut at = root.to_path_buf();
    for c in rel.components() {
        at.push(c);
        match std::fs::symlink_metadata(&at) {
            Ok(m) if m.file_type().is_symlink() => {
                return Err(PathError::Symlink {
                    name: name.to_owned(),
                    link: at,
                });
            }
            Ok(_) => {}
            Err(e) if e.kind() == io::ErrorKind::NotFound => {}
            Err(e) => {
                return Err(PathError::Io {
                    name: name.to_owned(),
                    what: e.to_string(),
                })
            }
        }
    }
    Ok(at)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn accepts_plain_relative_names() {
        assert_eq!(validate("data.db").unwrap(), PathBuf::from("data.db"));
        assert_eq!(
            validate("logs/log.0000000001").unwrap(),
            PathBuf::from("logs/log.0000000001")
        );
    }

    #[test]
    fn refuses_names_that_leave_the_directory() {
        assert_eq!(validate(""), Err(PathError::Empty));
        assert!(matches!(
            validate("/etc/passwd"),
            Err(PathError::Absolute(_))
        ));
        assert!(matches!(validate("../x.db"), Err(PathError::Dots(_))));
        assert!(matches!(validate("a/../../x.db"), Err(PathError::Dots(_))));
        assert!(matches!(validate("a/./x.db"), Err(PathError::Dots(_))));
        assert!(matches!(
            validate(".tandem/state"),
            Err(PathError::Hidden(_))
        ));
        assert!(matches!(validate("a\0b"), Err(PathError::BadCharacter(_))));
        assert!(matches!(
            validate(&"a".repeat(2000)),
            Err(PathError::TooLong(_))
        ));
    }

    #[test]
    fn refuses_a_path_through_a_symlink() {
        let root = tempfile::tempdir().unwrap();
        let outside = tempfile::tempdir().unwrap();
        std::os::unix::fs::symlink(outside.path(), root.path().join("data")).unwrap();
        assert!(matches!(
            resolve_under(root.path(), "data/x.db"),
            Err(PathError::Symlink { .. })
        ));
        std::os::unix::fs::symlink(outside.path().join("f"), root.path().join("f.db")).unwrap();
        assert!(matches!(
            resolve_under(root.path(), "f.db"),
            Err(PathError::Symlink { .. })
        ));
        assert_eq!(
            resolve_under(root.path(), "ok.db").unwrap(),
            root.path().join("ok.db")
        );
    }
}
