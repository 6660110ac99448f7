//! Small durable-directory helpers shared by the mirror's parts.

use std::io;
use std::path::Path;
use tandem_shared::durable::fsync_dir;

pub(crate) fn remove_if_exists(p: &Path) -> io::Result<()> {
    match std::fs::remove_file(p) {
        Err(e) if e.kind() != io::ErrorKind::NotFound => Err(e),
        _ => Ok(()),
    }
}

/// Creates `dir` (under `root`) and fsyncs each new directory's parent.
pub(crate) fn create_dirs_durably(root: &Path, dir: &Path) -> io::Result<()> {
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
