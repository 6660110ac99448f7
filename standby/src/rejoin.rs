//! `run --rejoin`: what a directory whose log went beyond the primary's
//! history discards, found and set aside before the page-delta new base
//! replaces it.
//!
//! The primary names the last position it knows both logs agree on, at
//! most (it sees only the standby's end and last record). The standby
//! narrows that down once the new base's log has arrived: log records are
//! the same bytes wherever the two histories agree, so the first byte where
//! its own log and the staged one differ lies in the first record they do
//! not share. Everything from the start of that record to the standby's end
//! is discarded: it is counted (bytes, committed transactions) and its log
//! files are copied to `.tandem/discarded/<unix ms>-from-<file>-<offset>/` with a `report.json`,
//! before the swap, and kept until the operator removes them.

use crate::state::{StandbyDir, StandbyState};
use serde::{Deserialize, Serialize};
use std::fs::File;
use std::io;
use std::path::{Path, PathBuf};
use tandem_shared::durable::{fsync_dir, write_file_atomic};
use tandem_shared::logfile::{log_file_name, read_verified, RECORD_HEADER_LEN};
use tandem_shared::wire::LogFileDigest;
use tandem_shared::LogPosition;

/// What the Hello of `run --rejoin` asks, for logs and the staging decision.
pub const REJOIN_REASON: &str = "the operator asked to rejoin (--rejoin)";

/// Where discarded log is kept.
pub const DISCARDED_DIR: &str = "discarded";
const REPORT_FILE: &str = "report.json";

// BDB 5.3 `__txn_regop` (txn.src): rectype 10, opcode (u32 at 16) 1 = commit.
const REC_TXN_REGOP: u32 = 10;
const TXN_COMMIT: u32 = 1;

/// What a rejoin discarded.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct DiscardReport {
    /// The discarded log: `[from, to)`.
    pub from: LogPosition,
    pub to: LogPosition,
    pub bytes: u64,
    /// Commit records (`__txn_regop`, commit) in the discarded range.
    pub committed_transactions: u64,
    /// Where the discarded log files are kept, relative to the directory.
    pub kept_in: String,
    pub unix_ms: u64,
}

impl std::fmt::Display for DiscardReport {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "discarded {} committed transactions in [{}, {}) ({} bytes of log), kept in {}",
            self.committed_transactions, self.from, self.to, self.bytes, self.kept_in
        )
    }
}

fn u32_at(b: &[u8], at: usize) -> Option<u32> {
    b.get(at..at + 4)
        .map(|s| u32::from_le_bytes([s[0], s[1], s[2], s[3]]))
}

/// The verified records of log file `path` up to `limit` (the whole file
/// when `None`).
fn verified(path: &Path, limit: Option<u32>) -> io::Result<Vec<u8>> {
    let f = match File::open(path) {
        Ok(f) => f,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(Vec::new()),
        Err(e) => return Err(e),
    };
    let max = limit.map_or(u32::MAX as usize, |l| l as usize);
    let mut r = read_verified(&f, 0, None, max)?;
    r.bytes.truncate(max);
    Ok(r.bytes)
}

/// Record start offsets in a buffer of verified records read from offset 0.
fn record_starts(bytes: &[u8]) -> impl Iterator<Item = (usize, usize)> + '_ {
    let mut pos = 0usize;
    std::iter::from_fn(move || {
        let len = u32_at(bytes, pos + 4)? as usize;
        if len == 0 || pos + len > bytes.len() {
            return None;
        }
        let at = pos;
        pos += len;
        Some((at, len))
    })
}

/// The first position where `old` (the directory's log up to `old_end`)
/// and `new` (the staged log from file `new_first` up to `new_end`) stop
/// agreeing, no later than `hint` (the primary's). Always a record boundary
/// of the old log.
pub fn agreed_point(
    old_dir: &Path,
    new_dir: &Path,
    new_first: u32,
    new_end: LogPosition,
    old_end: LogPosition,
    hint: LogPosition,
) -> io::Result<LogPosition> {
    let mut found = hint.min(old_end);
    for n in new_first..=new_end.file.min(old_end.file) {
        let limit = |end: LogPosition| (n == end.file).then_some(end.offset);
        let old = verified(&old_dir.join(log_file_name(n)), limit(old_end))?;
        let new = verified(&new_dir.join(log_file_name(n)), limit(new_end))?;
        let common = old.len().min(new.len());
        let differs = old[..common]
            .iter()
            .zip(&new[..common])
            .position(|(a, b)| a != b);
        let at = match differs {
            Some(i) => i,
            None if old.len() == new.len() && n < new_end.file.min(old_end.file) => continue,
            None => common,
        };
        // The start of the old record that holds byte `at` (or ends there).
        let start = record_starts(&old)
            .take_while(|(s, _)| *s < at)
            .filter(|(s, len)| s + len > at)
            .map(|(s, _)| s)
            .next()
            .unwrap_or(at);
        found = found.min(LogPosition::new(n, start as u32));
        break;
    }
    Ok(found)
}

/// Bytes and committed transactions in the log `[from, to)` of `log_dir`.
pub fn count(log_dir: &Path, from: LogPosition, to: LogPosition) -> io::Result<(u64, u64)> {
    let (mut bytes, mut commits) = (0u64, 0u64);
    for n in from.file..=to.file {
        let limit = (n == to.file).then_some(to.offset);
        let records = verified(&log_dir.join(log_file_name(n)), limit)?;
        let skip = if n == from.file { from.offset } else { 0 } as usize;
        for (at, len) in record_starts(&records).filter(|(at, _)| *at >= skip) {
            bytes += len as u64;
            let body = &records[at + RECORD_HEADER_LEN as usize..at + len];
            if at > 0
                && u32_at(body, 0) == Some(REC_TXN_REGOP)
                && u32_at(body, 16) == Some(TXN_COMMIT)
            {
                commits += 1;
            }
        }
    }
    Ok((bytes, commits))
}

/// Per log file of the mirror, the blake3 of its verified records (the
/// last file up to the durable end), for the primary to find the newest
/// file both histories share.
pub fn log_file_digests(
    dir: &StandbyDir,
    state: &StandbyState,
    end: LogPosition,
) -> io::Result<Vec<LogFileDigest>> {
    let Some(base) = &state.base else {
        return Ok(Vec::new());
    };
    let log_dir = dir.log_dir(state);
    let mut out = Vec::new();
    for n in base.log_start.file..=end.file {
        let limit = (n == end.file).then_some(end.offset);
        let records = verified(&log_dir.join(log_file_name(n)), limit)?;
        if records.is_empty() {
            continue;
        }
        out.push(LogFileDigest {
            file: n,
            len: records.len() as u32,
            blake3: blake3::hash(&records).as_bytes().to_vec().into(),
        });
    }
    Ok(out)
}

/// The identity an old primary left in its home (`.tandem-primary/identity`,
/// written by `tandem-primary`); only the fields a rejoin needs.
#[derive(Deserialize)]
struct OldPrimaryIdentity {
    env_id: String,
    epoch: u64,
    #[serde(default)]
    history: Vec<tandem_shared::epochs::EpochStart>,
}

/// The primary's state directory inside its home, by default.
pub const OLD_PRIMARY_STATE: &str = ".tandem-primary";
const OLD_PRIMARY_IDENTITY_VERSION: u32 = 2;

/// `run --rejoin` on an old primary's home (an environment, no standby
/// state): records it as a standby directory holding that environment as
/// its base (the environment's files untouched), so the rejoin can send
/// only the pages that differ. Refused while any process maps the
/// environment's region files, or without the old primary's identity.
// Long function: its refusals, then the adoption, in order; each refusal names what it found.
pub fn adopt_old_primary(dir: &StandbyDir) -> Result<(), String> {
    let root = &dir.root;
    let users = tandem_shared::envusers::env_users(root).map_err(|e| {
        format!(
            "cannot tell whether a process has {} open: {e}",
            root.display()
        )
    })?;
    if !users.is_empty() {
        let who: Vec<String> = users.iter().map(ToString::to_string).collect();
        return Err(format!(
            "{} is open by {}: stop the application (and tandem-primary) on this environment before it rejoins. \
             Nothing was changed",
            root.display(),
            who.join(", ")
        ));
    }
    let id_path = root.join(OLD_PRIMARY_STATE).join("identity");
    // A promoted standby directory knows its identity even if no primary
    // ran on it.
    let promoted = dir.load_state().ok().filter(|s| s.promoted.is_some());
    let id: OldPrimaryIdentity =
        tandem_shared::durable::ControlFile::load(&id_path, OLD_PRIMARY_IDENTITY_VERSION)
            .map_err(|e| format!("reading {}: {e}", id_path.display()))?
            .filter(|id: &OldPrimaryIdentity| promoted.as_ref().is_none_or(|s| id.epoch >= s.epoch))
            .or(promoted.and_then(|s| {
                Some(OldPrimaryIdentity {
                    env_id: s.env_id?,
                    epoch: s.epoch,
                    history: s.history,
                })
            }))
            .ok_or_else(|| {
                format!(
                    "{} holds files but neither standby state nor a primary's identity ({}): Tandem cannot tell which \
                     environment it is, so it does not take it over. Nothing was changed",
                    root.display(),
                    id_path.display()
                )
            })?;
    let layout = tandem_shared::envlayout::EnvLayout::open(root).map_err(|e| e.to_string())?;
    let logs = layout.log_files().map_err(|e| e.to_string())?;
    let (Some(&first), Some(&last)) = (logs.first(), logs.last()) else {
        return Err(format!("{} holds no log files", root.display()));
    };
    let end = File::open(layout.log_path(last))
        .and_then(|f| tandem_shared::logfile::walk_file(&f, None))
        .map_err(|e| format!("reading {}: {e}", layout.log_name(last)))?
        .end;
    let mut files: std::collections::BTreeSet<String> = layout
        .database_files()
        .map_err(|e| e.to_string())?
        .into_iter()
        .map(|f| f.name)
        .collect();
    if root.join(tandem_shared::envlayout::DB_CONFIG).is_file() {
        files.insert(tandem_shared::envlayout::DB_CONFIG.to_owned());
    }
    let now = tandem_shared::now_unix_ms();
    move_leftovers(dir, &discarded_root(dir).join(format!("{now}-old-primary")))
        .map_err(|e| format!("moving the old primary's region files and state aside: {e}"))?;
    let state = crate::state::StandbyState {
        env_id: Some(id.env_id),
        epoch: id.epoch,
        log_dir: tandem_shared::envlayout::rel_name(&layout.log_dir_rel()),
        base: Some(crate::state::BaseState {
            base_id: format!("old-primary-{now}"),
            log_start: LogPosition::new(first, 0),
            complete_files: files,
            files_done: true,
            consistent_at: Some(LogPosition::new(last, end)),
            started_unix_ms: now,
        }),
        history: id.history,
        ..Default::default()
    };
    dir.create().map_err(|e| e.to_string())?;
    dir.store_state(&state).map_err(|e| e.to_string())?;
    tracing::warn!(dir = %root.display(), epoch = state.epoch, log_start = %LogPosition::new(first, 0), end = %LogPosition::new(last, end),
        "REJOIN: taking over an old primary's home as a standby directory; its files stay as they are until the primary's page-delta base is complete");
    Ok(())
}

/// Moves what an old primary's home holds that no base owns (BDB's region
/// files `__db.*`, no process mapping them, and the old primary's state
/// directory) into `keep_in`: never left to confuse a later recovery or
/// primary, never deleted. The environment's data is not touched.
pub fn move_leftovers(dir: &StandbyDir, keep_in: &Path) -> io::Result<()> {
    let Ok(entries) = std::fs::read_dir(&dir.root) else {
        return Ok(());
    };
    let mut moved = false;
    for e in entries.flatten() {
        let name = e.file_name().to_string_lossy().into_owned();
        if name.starts_with("__db.") || name == OLD_PRIMARY_STATE {
            std::fs::create_dir_all(keep_in)?;
            std::fs::rename(e.path(), keep_in.join(&name))?;
            moved = true;
        }
    }
    if moved {
        fsync_dir(keep_in)?;
        fsync_dir(&dir.root)?;
    }
    Ok(())
}

/// Copies the database files of the `old` base that the `new` one does not
/// own (the swap removes them) into `kept_in/files/`.
pub fn keep_unowned(
    dir: &StandbyDir,
    old: &crate::state::BaseState,
    new: &crate::state::BaseState,
    kept_in: &str,
) -> io::Result<()> {
    let keep = dir.root.join(kept_in).join("files");
    for name in old.complete_files.difference(&new.complete_files) {
        let (Ok(src), Ok(dst)) = (
            tandem_shared::wirepath::resolve_under(&dir.root, name),
            tandem_shared::wirepath::resolve_under(&keep, name),
        ) else {
            continue;
        };
        if !src.is_file() || dst.is_file() {
            continue;
        }
        if let Some(parent) = dst.parent() {
            std::fs::create_dir_all(parent)?;
        }
        std::fs::copy(&src, &dst)?;
        File::open(&dst)?.sync_all()?;
        tracing::warn!(file = %name, kept_in = %keep.display(), "REJOIN: the new base does not hold this file; kept a copy");
    }
    Ok(())
}

/// The directory's discarded-log area.
pub fn discarded_root(dir: &StandbyDir) -> PathBuf {
    dir.meta().join(DISCARDED_DIR)
}

/// Every discard report kept in the directory, oldest first.
pub fn reports(dir: &StandbyDir) -> Vec<DiscardReport> {
    let Ok(entries) = std::fs::read_dir(discarded_root(dir)) else {
        return Vec::new();
    };
    let mut out: Vec<DiscardReport> = entries
        .flatten()
        .filter_map(|e| std::fs::read(e.path().join(REPORT_FILE)).ok())
        .filter_map(|b| serde_json::from_slice(&b).ok())
        .collect();
    out.sort_by_key(|r| r.unix_ms);
    out
}

/// Finds what the directory's log holds beyond the primary's history,
/// counts it, copies its log files to `.tandem/discarded/<unix ms>-from-<file>-<offset>/` and
/// records the report there (all durable), before anything is replaced.
/// A rerun after a crash that finds the same range already kept reuses it.
pub fn set_aside(
    dir: &StandbyDir,
    old_log_dir: &Path,
    old_end: LogPosition,
    from: LogPosition,
) -> io::Result<Option<DiscardReport>> {
    if from >= old_end {
        return Ok(None);
    }
    if let Some(r) = reports(dir)
        .into_iter()
        .find(|r| r.from == from && r.to == old_end)
    {
        return Ok(Some(r));
    }
    let (bytes, committed_transactions) = count(old_log_dir, from, old_end)?;
    let unix_ms = tandem_shared::now_unix_ms();
    let name = format!("{unix_ms}-from-{}-{}", from.file, from.offset);
    let root = discarded_root(dir);
    let keep = root.join(&name);
    std::fs::create_dir_all(&keep)?;
    for n in from.file..=old_end.file {
        let src = old_log_dir.join(log_file_name(n));
        if src.exists() {
            let dst = keep.join(log_file_name(n));
            std::fs::copy(&src, &dst)?;
            File::open(&dst)?.sync_all()?;
        }
    }
    let report = DiscardReport {
        from,
        to: old_end,
        bytes,
        committed_transactions,
        kept_in: format!("{}/{DISCARDED_DIR}/{name}", crate::state::META_DIR),
        unix_ms,
    };
    let json = serde_json::to_vec_pretty(&report).map_err(io::Error::other)?;
    write_file_atomic(&keep.join(REPORT_FILE), &json)?;
    fsync_dir(&root)?;
    fsync_dir(&dir.meta())?;
    Ok(Some(report))
}

#[cfg(test)]
mod tests {
    use super::*;
    use tandem_shared::logfile::synth;

    fn regop() -> Vec<u8> {
        let mut b = vec![0u8; 24];
        b[0..4].copy_from_slice(&REC_TXN_REGOP.to_le_bytes());
        b[16..20].copy_from_slice(&TXN_COMMIT.to_le_bytes());
        b
    }

    #[test]
    fn the_agreed_point_is_the_first_record_the_logs_do_not_share() {
        let (old, new) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
        let other = vec![5u8; 40];
        let mut theirs = regop();
        theirs[23] = 9;
        let ours = regop();
        let a: Vec<&[u8]> = vec![&other, &ours, &ours, &ours];
        let b: Vec<&[u8]> = vec![&other, &ours, &theirs];
        let img_a = synth::file(0, 1 << 16, &a, 4096);
        let img_b = synth::file(0, 1 << 16, &b, 4096);
        std::fs::write(old.path().join(log_file_name(1)), &img_a).unwrap();
        std::fs::write(new.path().join(log_file_name(1)), &img_b).unwrap();
        let end_a = tandem_shared::logfile::walk(&img_a, 0, None).end;
        let end_b = tandem_shared::logfile::walk(&img_b, 0, None).end;
        // persist record (28 bytes), other (12 + 40), regop (12 + 24).
        let shared_end = 28 + 52 + 36;
        let p = agreed_point(
            old.path(),
            new.path(),
            1,
            LogPosition::new(1, end_b),
            LogPosition::new(1, end_a),
            LogPosition::new(1, end_a),
        )
        .unwrap();
        assert_eq!(p, LogPosition::new(1, shared_end));
        let (bytes, commits) = count(old.path(), p, LogPosition::new(1, end_a)).unwrap();
        assert_eq!((bytes, commits), (u64::from(end_a - shared_end), 2));
        // The primary's hint wins when it is earlier.
        let p = agreed_point(
            old.path(),
            new.path(),
            1,
            LogPosition::new(1, end_b),
            LogPosition::new(1, end_a),
            LogPosition::new(1, 28),
        )
        .unwrap();
        assert_eq!(p, LogPosition::new(1, 28));
    }
}
