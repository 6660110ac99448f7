//! Who has a Berkeley DB environment open, from `/proc/*/maps`.
//!
//! Every process that opens a `DB_ENV` (without `DB_PRIVATE` or
//! `DB_SYSTEM_MEM`) maps the environment's region files `HOME/__db.NNN`
//! for as long as it keeps it open, whether or not it is writing right now.
//! A process that maps them can commit; one that does not, cannot. This is
//! how a switchover knows the application is stopped, instead of guessing
//! from a quiet log.
//!
//! Linux only. Processes whose maps cannot be read (another user's, without
//! the privilege to look) are not seen: run `tandem-primary` as the
//! environment's owner or as root.

use std::io;
use std::path::{Path, PathBuf};

#[derive(Debug, thiserror::Error)]
pub enum EnvUsersError {
    #[error("{path}: {source}")]
    Io { path: PathBuf, source: io::Error },
}

/// A process that has the environment open.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct EnvUser {
    pub pid: u32,
    /// The process name (`/proc/PID/comm`).
    pub name: String,
}

impl std::fmt::Display for EnvUser {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "pid {} ({})", self.pid, self.name)
    }
}

/// The processes, other than the caller, that map a region file of the
/// environment whose home is `home`.
pub fn env_users(home: &Path) -> Result<Vec<EnvUser>, EnvUsersError> {
    scan(home, false)
}

/// Like [`env_users`], and not the caller's children either: for a caller
/// whose only children are the BDB tools it runs (they join the
/// environment briefly and commit nothing), such as `tandem-primary`.
pub fn env_users_but_my_children(home: &Path) -> Result<Vec<EnvUser>, EnvUsersError> {
    scan(home, true)
}

fn scan(home: &Path, skip_children: bool) -> Result<Vec<EnvUser>, EnvUsersError> {
    let home = home.canonicalize().map_err(|source| EnvUsersError::Io {
        path: home.to_path_buf(),
        source,
    })?;
    let me = std::process::id();
    let proc_dir = Path::new("/proc");
    let entries = std::fs::read_dir(proc_dir).map_err(|source| EnvUsersError::Io {
        path: proc_dir.to_path_buf(),
        source,
    })?;
    let mut out = Vec::new();
    for entry in entries.flatten() {
        let Some(pid) = entry
            .file_name()
            .to_str()
            .and_then(|s| s.parse::<u32>().ok())
        else {
            continue;
        };
        if pid == me || (skip_children && parent_of(pid) == Some(me)) {
            continue;
        }
        // A process can exit, or be another user's, between listing and
        // reading: either way there is nothing to read.
        let Ok(maps) = std::fs::read_to_string(entry.path().join("maps")) else {
            continue;
        };
        if maps.lines().any(|l| maps_region_file(l, &home)) {
            let name = std::fs::read_to_string(entry.path().join("comm"))
                .map(|s| s.trim().to_owned())
                .unwrap_or_else(|_| "?".into());
            out.push(EnvUser { pid, name });
        }
    }
    out.sort_by_key(|u| u.pid);
    Ok(out)
}

/// Does this `/proc/PID/maps` line map `HOME/__db.*`? The path is the
/// sixth field and runs to the end of the line (it may hold spaces, and
/// ends in " (deleted)" for a removed file, still mapped and still usable).
fn maps_region_file(line: &str, home: &Path) -> bool {
    let Some(path) = line
        .splitn(6, char::is_whitespace)
        .nth(5)
        .map(str::trim_start)
    else {
        return false;
    };
    let path = Path::new(path.strip_suffix(" (deleted)").unwrap_or(path));
    path.parent() == Some(home)
        && path
            .file_name()
            .and_then(|n| n.to_str())
            .is_some_and(crate::envlayout::is_region_file)
}

/// The parent pid, from `/proc/PID/stat` (the field after the
/// parenthesised name, which may itself hold spaces or parentheses).
fn parent_of(pid: u32) -> Option<u32> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    let after = stat.rsplit_once(')')?.1;
    after.split_whitespace().nth(1)?.parse().ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_region_file_paths_from_maps_lines() {
        let home = Path::new("/srv/my env");
        let line =
            |p: &str| format!("7f0000000000-7f0000010000 rw-s 00000000 08:01 1234       {p}");
        assert!(maps_region_file(&line("/srv/my env/__db.001"), home));
        assert!(maps_region_file(
            &line("/srv/my env/__db.003 (deleted)"),
            home
        ));
        assert!(!maps_region_file(&line("/srv/my env/data.db"), home));
        assert!(!maps_region_file(&line("/srv/my env/sub/__db.001"), home));
        assert!(!maps_region_file(&line("/srv/other/__db.001"), home));
        assert!(!maps_region_file(
            "7f0000000000-7f0000010000 rw-p 00000000 00:00 0",
            home
        ));
    }

    #[test]
    fn my_own_parent_is_known() {
        assert_eq!(
            parent_of(std::process::id()),
            Some(std::os::unix::process::parent_id())
        );
    }
}
