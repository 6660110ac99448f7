//! One I/O error type for every crate: what was being done (which names
//! the file) and the system's error. The crates' error enums hold it as a
//! variant (`Io(IoError)`, converted with `?`), so a failed file operation
//! reads the same everywhere: `reading x.db: No such file or directory`.
//!
//! ```ignore
//! std::fs::read(&path).map_err(io_err(format!("reading {}", path.display())))?;
//! ```

use std::io;

/// A file operation that failed: `what` says which, naming the file.
#[derive(Debug, thiserror::Error)]
#[error("{what}: {source}")]
pub struct IoError {
    pub what: String,
    #[source]
    pub source: io::Error,
}

impl IoError {
    pub fn new(what: impl Into<String>, source: io::Error) -> Self {
        Self {
            what: what.into(),
            source,
        }
    }

    /// The disk (or the user's quota) is full: no retry helps until space
    /// is freed.
    pub fn is_disk_full(&self) -> bool {
        is_disk_full(&self.source)
    }
}

/// ENOSPC or EDQUOT.
pub fn is_disk_full(e: &io::Error) -> bool {
    e.raw_os_error() == Some(libc::ENOSPC) || e.raw_os_error() == Some(libc::EDQUOT)
}

/// For `map_err`: turns an `io::Error` into an [`IoError`] naming `what`.
pub fn io_err(what: impl Into<String>) -> impl FnOnce(io::Error) -> IoError {
    let what = what.into();
    move |source| IoError { what, source }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn it_names_what_failed_and_knows_a_full_disk() {
        let e = io_err("writing x.db")(io::Error::from_raw_os_error(libc::ENOSPC));
        assert!(e.is_disk_full());
        assert!(e.to_string().starts_with("writing x.db: "), "{e}");
        let e = IoError::new("reading y", io::Error::from(io::ErrorKind::NotFound));
        assert!(!e.is_disk_full());
        assert!(std::error::Error::source(&e).is_some());
    }
}
