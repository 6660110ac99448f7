//! What the last readiness check verified, so that promote verifies only
//! what changed since: the databases the log after the check changes, and
//! any database whose file is not byte for byte what was verified.
//!
//! A passing check records ([`record`]) in `.tandem/verified.json`:
//! - the end of the log its recovery replayed (`verified_to`, BDB's own
//!   "last valid LSN", which must be the durable end the clone was cut
//!   at) and a digest of the record before it;
//! - which log file ids named which files (from the `__dbreg_register`
//!   records since the last checkpoint, BDB-NOTES.md §7: every open file is
//!   registered again at each checkpoint) and the files that transactions
//!   still open at `verified_to` wrote: the check's recovery undid those,
//!   a later one may not;
//! - per database file: its signature in the mirror (device, inode, size,
//!   mtime, ctime: any write changes the ctime), and the pages the check's
//!   recovery changed (compared with the page digests recorded when the
//!   file was written, [`crate::scrub::digests`]), with a digest of their
//!   contents after recovery.
//!
//! Promote ([`Selection`]) then verifies a database unless all of these
//! hold: the record is for the current base and epoch history, the file's
//! signature is unchanged (so the bytes recovery starts from are the ones
//! the check started from: the scrub proves them against what the primary
//! sent), no record after `verified_to` (up to where promote's recovery
//! ended) names the file and no transaction open at `verified_to` wrote it
//! (so recovery replays the same records on it: the same pages), and the
//! pages recovery changed hold exactly what was verified. Any doubt — no
//! record, another base, a file id nobody registered, a record type the
//! reader does not know, a file operation, partitions or queue extents, a
//! scrub that found damage — means every database is verified, as before.

use crate::state::{StandbyDir, StandbyState};
use serde::{Deserialize, Serialize};
use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::fs::File;
use std::os::unix::fs::MetadataExt;
use std::path::Path;
use tandem_shared::logrecords::{file_uid, read_range, RecordKind};
use tandem_shared::pages::{page_digests, read_at_most, PAGE_DIGEST_LEN};
use tandem_shared::LogPosition;

const RECORD_FILE: &str = "verified.json";
/// Bytes read at a time when digesting files.
const READ_CHUNK: usize = 4 << 20;

/// What identifies a file's contents without reading them: any write
/// through the kernel moves its ctime, which nobody can set back.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct Signature {
    pub dev: u64,
    pub ino: u64,
    pub size: u64,
    pub mtime_ns: i128,
    pub ctime_ns: i128,
}

pub fn signature(path: &Path) -> std::io::Result<Signature> {
    let m = std::fs::metadata(path)?;
    Ok(Signature {
        dev: m.dev(),
        ino: m.ino(),
        size: m.size(),
        mtime_ns: i128::from(m.mtime()) * 1_000_000_000 + i128::from(m.mtime_nsec()),
        ctime_ns: i128::from(m.ctime()) * 1_000_000_000 + i128::from(m.ctime_nsec()),
    })
}

/// One database file as the check verified it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct VerifiedFile {
    pub name: String,
    /// The unique id in its meta page (hex), as `__dbreg_register` names it.
    pub uid: String,
    /// The mirror's file before and after the clone was taken.
    pub base: Signature,
    pub page_size: u32,
    /// Its size after the check's recovery.
    pub size_after: u64,
    /// Pages the check's recovery changed: `[first, first + count)` ranges.
    pub changed: Vec<(u64, u64)>,
    /// blake3 of those pages after the recovery, in order.
    pub changed_blake3: String,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct VerifiedRecord {
    pub base_id: String,
    pub epoch: u64,
    pub history: usize,
    pub unix_ms: u64,
    pub verified_to: LogPosition,
    pub last_record: LogPosition,
    pub last_record_blake3: String,
    /// Log file id → the uids it named since the checkpoint (hex).
    pub file_ids: BTreeMap<i32, BTreeSet<String>>,
    /// uids of the files transactions open at `verified_to` wrote.
    pub open_uids: BTreeSet<String>,
    /// uids of every file the log since the checkpoint wrote: what a log
    /// still being written is likely to touch again (for the estimate).
    pub written_uids: BTreeSet<String>,
    pub files: Vec<VerifiedFile>,
}

fn path(dir: &StandbyDir) -> std::path::PathBuf {
    dir.meta().join(RECORD_FILE)
}

pub fn load(dir: &StandbyDir) -> Option<VerifiedRecord> {
    serde_json::from_slice(&std::fs::read(path(dir)).ok()?).ok()
}

pub fn store(dir: &StandbyDir, record: &VerifiedRecord) -> std::io::Result<()> {
    let bytes = serde_json::to_vec(record)?;
    tandem_shared::durable::write_file_atomic(&path(dir), &bytes)
}

/// A check that did not pass leaves no record: promote verifies everything.
pub fn remove(dir: &StandbyDir) {
    let _ = std::fs::remove_file(path(dir));
}

/// The uid in the meta page of the database file at `path`.
pub(crate) fn uid_of(path: &Path) -> Option<String> {
    let mut head = [0u8; 128];
    let n = read_at_most(&File::open(path).ok()?, &mut head, 0).ok()?;
    file_uid(&head[..n]).map(|u| tandem_shared::to_hex(&u))
}

/// What the log from the last checkpoint before `end` says: file ids,
/// files written, and the files of transactions still open at `end`.
pub(crate) struct LogSince {
    pub(crate) file_ids: BTreeMap<i32, BTreeSet<String>>,
    pub(crate) written: BTreeSet<i32>,
    pub(crate) open: BTreeSet<i32>,
    pub(crate) last_record: Option<(LogPosition, String)>,
}

/// The `ckp_lsn` of the last checkpoint record before `end`, looking back
/// no further than log file `first`.
pub(crate) fn last_checkpoint(
    log_dir: &Path,
    first: u32,
    end: LogPosition,
) -> Result<LogPosition, String> {
    for file in (first..=end.file).rev() {
        let to = if file == end.file {
            end
        } else {
            LogPosition::new(file + 1, 0)
        };
        let mut found = None;
        read_range(log_dir, LogPosition::new(file, 0), to, |r, _| {
            if let RecordKind::Checkpoint { ckp_lsn } = r.kind {
                found = Some(ckp_lsn);
            }
        })
        .map_err(|e| e.to_string())?;
        if let Some(ckp) = found {
            if ckp < LogPosition::new(first, 0) {
                return Err(format!(
                    "the last checkpoint starts at {ckp}, before the mirror's log"
                ));
            }
            return Ok(ckp);
        }
    }
    Err("no checkpoint in the mirror's log".into())
}

pub(crate) fn read_since(
    log_dir: &Path,
    from: LogPosition,
    end: LogPosition,
) -> Result<LogSince, String> {
    let mut since = LogSince {
        file_ids: BTreeMap::new(),
        written: BTreeSet::new(),
        open: BTreeSet::new(),
        last_record: None,
    };
    let mut txns: HashMap<u32, BTreeSet<i32>> = HashMap::new();
    let mut doubt = None;
    read_range(log_dir, from, end, |r, bytes| {
        since.last_record = Some((r.lsn, blake3::hash(bytes).to_hex().to_string()));
        match &r.kind {
            RecordKind::Page { fileid } => {
                since.written.insert(*fileid);
                if r.txnid != 0 {
                    txns.entry(r.txnid).or_default().insert(*fileid);
                }
            }
            RecordKind::Register { fileid, uid, .. } => {
                since
                    .file_ids
                    .entry(*fileid)
                    .or_default()
                    .insert(tandem_shared::to_hex(uid));
            }
            RecordKind::Resolve { .. } => {
                txns.remove(&r.txnid);
            }
            RecordKind::Child { child } => {
                if let Some(files) = txns.remove(child) {
                    txns.entry(r.txnid).or_default().extend(files);
                }
            }
            RecordKind::Doubt { why } => {
                doubt.get_or_insert_with(|| format!("{} at {}", why, r.lsn));
            }
            RecordKind::Checkpoint { .. } | RecordKind::Harmless => {}
        }
    })
    .map_err(|e| e.to_string())?;
    if let Some(why) = doubt {
        return Err(why);
    }
    since.open = txns.into_values().flatten().collect();
    Ok(since)
}

/// The uids a set of log file ids names, or why it cannot tell.
pub(crate) fn uids(
    map: &BTreeMap<i32, BTreeSet<String>>,
    ids: &BTreeSet<i32>,
) -> Result<BTreeSet<String>, String> {
    let mut out = BTreeSet::new();
    for id in ids {
        let named = map
            .get(id)
            .ok_or_else(|| format!("log file id {id} was never registered"))?;
        out.extend(named.iter().cloned());
    }
    Ok(out)
}

/// Page digests of the file at `path`.
fn digests(path: &Path, page_size: u32) -> std::io::Result<(Vec<u8>, u64)> {
    let f = File::open(path)?;
    let page = page_size as usize;
    let mut buf = vec![0u8; (READ_CHUNK / page).max(1) * page];
    let (mut at, mut out) = (0u64, Vec::new());
    loop {
        let n = read_at_most(&f, &mut buf, at)?;
        out.extend_from_slice(&page_digests(&buf[..n], page));
        at += n as u64;
        if n < buf.len() {
            return Ok((out, at));
        }
    }
}

/// Where a page's bytes mean nothing: BDB does not clear a new page's
/// buffer, so recovery leaves whatever the cache held in a page's free
/// space, and two recoveries of the same log differ there (measured). For
/// btree and hash pages the free space lies between the index array and
/// the first item (`entries` at byte 20, `hf_offset` at 22, the index from
/// byte 26 on), for an overflow page after its data, for an invalid page
/// after its header. `db_verify` does not read it either. Other pages, and
/// files with checksums (whose header is longer), are compared whole.
fn free_space(page: &[u8]) -> Option<std::ops::Range<usize>> {
    const HEADER: usize = 26;
    let (entries, hf) = (
        usize::from(u16::from_le_bytes([*page.get(20)?, *page.get(21)?])),
        usize::from(u16::from_le_bytes([*page.get(22)?, *page.get(23)?])),
    );
    let range = match page.get(25)? {
        2..=6 | 12 | 13 => HEADER + 2 * entries..hf,
        7 => HEADER + hf..page.len(),
        0 => HEADER..page.len(),
        _ => return None,
    };
    (range.start <= range.end && range.end <= page.len()).then_some(range)
}

/// Whether the database file's meta page says its pages carry checksums.
fn has_checksums(path: &Path) -> bool {
    let mut head = [0u8; 27];
    File::open(path)
        .and_then(|f| read_at_most(&f, &mut head, 0))
        .map_or(true, |n| n < head.len() || head[26] & 0x01 != 0)
}

/// blake3 of the pages in `ranges` of the file at `path`, each without its
/// free space (unless the file has checksums).
fn ranges_blake3(path: &Path, page_size: u32, ranges: &[(u64, u64)]) -> std::io::Result<String> {
    let whole = has_checksums(path);
    let f = File::open(path)?;
    let page = u64::from(page_size);
    let mut h = blake3::Hasher::new();
    let mut buf = Vec::new();
    for &(first, count) in ranges {
        let mut done = 0;
        while done < count {
            let n = (count - done).min((READ_CHUNK as u64 / page).max(1));
            buf.resize((n * page) as usize, 0);
            let got = read_at_most(&f, &mut buf, (first + done) * page)?;
            for p in buf[..got].chunks_mut(page_size as usize) {
                if let Some(r) = free_space(p).filter(|_| !whole) {
                    p[r].fill(0);
                }
                h.update(p);
            }
            done += n;
        }
    }
    Ok(h.finalize().to_hex().to_string())
}

/// The page ranges where `after` differs from `before` (or has pages
/// `before` lacks).
fn changed_ranges(before: &[u8], after: &[u8]) -> Vec<(u64, u64)> {
    let mut out: Vec<(u64, u64)> = Vec::new();
    for (i, d) in after.chunks(PAGE_DIGEST_LEN).enumerate() {
        let at = i * PAGE_DIGEST_LEN;
        if before.get(at..at + PAGE_DIGEST_LEN) == Some(d) {
            continue;
        }
        let i = i as u64;
        match out.last_mut() {
            Some((first, count)) if *first + *count == i => *count += 1,
            _ => out.push((i, 1)),
        }
    }
    out
}

/// Builds the record of a check that passed: `clone` was recovered to
/// `recovered_to` and every database in it verified; `before` holds the
/// signatures of the mirror's database files from before the clone, each
/// still the same after it.
pub fn record(
    dir: &StandbyDir,
    state: &StandbyState,
    clone: &Path,
    durable: LogPosition,
    recovered_to: Option<LogPosition>,
    before: &BTreeMap<String, Signature>,
) -> Result<VerifiedRecord, String> {
    let base = state.base.as_ref().ok_or("no base")?;
    if recovered_to != Some(durable) {
        return Err(format!(
            "the check's recovery ended at {recovered_to:?}, not at the durable end {durable}"
        ));
    }
    let log_dir = dir.log_dir(state);
    let ckp = last_checkpoint(&log_dir, base.log_start.file, durable)?;
    let since = read_since(&log_dir, ckp, durable)?;
    let (last_record, last_record_blake3) = since
        .last_record
        .clone()
        .ok_or("no log record since the checkpoint")?;
    let mut files = Vec::new();
    for (name, sig) in before {
        let after = clone.join(name);
        let page_size = crate::scrub::digests::page_size_of(&after).map_err(|e| e.to_string())?;
        let uid = uid_of(&after).ok_or_else(|| format!("{name} has no meta page"))?;
        let (post, size_after) = digests(&after, page_size).map_err(|e| format!("{name}: {e}"))?;
        let recorded = crate::scrub::digests::load(dir, name)
            .ok()
            .flatten()
            .filter(|r| r.base_id == base.base_id && r.page_size == page_size);
        let pre = match recorded {
            Some(r) => r.digests,
            None => {
                digests(&dir.root.join(name), page_size)
                    .map_err(|e| format!("{name}: {e}"))?
                    .0
            }
        };
        let changed = changed_ranges(&pre, &post);
        let changed_blake3 =
            ranges_blake3(&after, page_size, &changed).map_err(|e| format!("{name}: {e}"))?;
        files.push(VerifiedFile {
            name: name.clone(),
            uid,
            base: *sig,
            page_size,
            size_after,
            changed,
            changed_blake3,
        });
    }
    Ok(VerifiedRecord {
        base_id: base.base_id.clone(),
        epoch: state.epoch,
        history: state.history.len(),
        unix_ms: tandem_shared::now_unix_ms(),
        verified_to: durable,
        last_record,
        last_record_blake3,
        open_uids: uids(&since.file_ids, &since.open)?,
        written_uids: uids(&since.file_ids, &since.written)?,
        file_ids: since.file_ids,
        files,
    })
}

impl VerifiedRecord {
    /// The share of the check's `db_verify` work that promote would repeat:
    /// by size, of the files the open transactions wrote (`idle`: no log
    /// after the check), else of every file the log recently wrote.
    pub fn verify_share(&self, idle: bool) -> f64 {
        let touched = if idle {
            &self.open_uids
        } else {
            &self.written_uids
        };
        let total: u64 = self.files.iter().map(|f| f.size_after).sum();
        let part: u64 = self
            .files
            .iter()
            .filter(|f| touched.contains(&f.uid))
            .map(|f| f.size_after)
            .sum();
        if total == 0 {
            1.0
        } else {
            part as f64 / total as f64
        }
    }
}

/// Which databases a promote verifies, and why the others need not be.
#[derive(Debug, Clone, Default)]
pub struct Selection {
    /// Databases to `db_verify`.
    pub verify: Vec<String>,
    /// Databases proven to hold what the last check verified.
    pub skipped: Vec<String>,
    /// Why every database is verified, when they are.
    pub everything_because: Option<String>,
}

/// The part of the selection made before recovery: which files still hold
/// the bytes the check started from (recovery changes them).
pub struct BeforeRecovery {
    record: Result<VerifiedRecord, String>,
    unchanged: BTreeSet<String>,
}

/// Before promote's recovery: compares the signatures of `databases` (and
/// whether the environment is one the selection understands: `has_parts`,
/// partitions or queue extents, it does not).
pub fn before_recovery(
    dir: &StandbyDir,
    state: &StandbyState,
    databases: &[String],
    has_parts: bool,
) -> BeforeRecovery {
    let record = check_record(dir, state, has_parts);
    let mut unchanged = BTreeSet::new();
    if let Ok(r) = &record {
        for f in &r.files {
            if databases.contains(&f.name)
                && signature(&dir.root.join(&f.name)).ok() == Some(f.base)
            {
                unchanged.insert(f.name.clone());
            }
        }
    }
    BeforeRecovery { record, unchanged }
}

fn check_record(
    dir: &StandbyDir,
    state: &StandbyState,
    has_parts: bool,
) -> Result<VerifiedRecord, String> {
    let record = load(dir).ok_or("no readiness check recorded what it verified")?;
    let base = state.base.as_ref().ok_or("no base")?;
    if record.base_id != base.base_id {
        return Err("the last verified check ran on another base".into());
    }
    if record.epoch != state.epoch || record.history != state.history.len() {
        return Err("the epoch history changed since the last verified check".into());
    }
    if has_parts {
        return Err("the environment has partitioned or queue-extent databases".into());
    }
    if let Some(s) = crate::scrub::last_report(dir) {
        if s.base_id == base.base_id && !s.ok {
            return Err("the last scrub found damage".into());
        }
    }
    Ok(record)
}

impl BeforeRecovery {
    /// Verifies every database, for `why`.
    pub fn everything(why: &str) -> Self {
        Self {
            record: Err(why.to_owned()),
            unchanged: BTreeSet::new(),
        }
    }

    /// After promote's recovery, which ended the log at `recovered_to`:
    /// the databases to verify.
    pub fn select(
        self,
        home: &Path,
        log_dir: &Path,
        recovered_to: Option<LogPosition>,
        databases: &[String],
    ) -> Selection {
        let everything = |why: String| Selection {
            verify: databases.to_vec(),
            skipped: Vec::new(),
            everything_because: Some(why),
        };
        let record = match self.record {
            Ok(r) => r,
            Err(why) => return everything(why),
        };
        let touched = match touched_since(&record, log_dir, recovered_to) {
            Ok(t) => t,
            Err(why) => return everything(why),
        };
        let files: HashMap<&str, &VerifiedFile> =
            record.files.iter().map(|f| (f.name.as_str(), f)).collect();
        let mut selection = Selection::default();
        for name in databases {
            let why = match files.get(name.as_str()) {
                _ if !self.unchanged.contains(name) => Some("its file changed since the check"),
                None => Some("the check did not verify it"),
                Some(f) if touched.contains(&f.uid) => Some("the log after the check writes it"),
                Some(f) if !holds_what_was_verified(home, f) => {
                    Some("recovery left other pages than the check's")
                }
                Some(_) => None,
            };
            match why {
                None => selection.skipped.push(name.clone()),
                Some(why) => {
                    tracing::info!(database = %name, why, "verifying again");
                    selection.verify.push(name.clone());
                }
            }
        }
        selection
    }
}

/// Times the reads promote's selection makes after its recovery
/// ([`BeforeRecovery::select`]: the log after the verified end, the pages
/// recovery changed in every file), on `home`, an environment recovered to
/// `recovered_to` as the record says (the check's clone): what a promote
/// that verifies nothing again spends in its verify phase besides
/// `db_verify`. An error where promote would verify everything.
pub fn rehearse_selection(
    record: &VerifiedRecord,
    home: &Path,
    log_dir: &Path,
    recovered_to: Option<LogPosition>,
) -> Result<std::time::Duration, String> {
    let started = std::time::Instant::now();
    touched_since(record, log_dir, recovered_to)?;
    for f in &record.files {
        holds_what_was_verified(home, f);
    }
    Ok(started.elapsed())
}

/// uids of the files recovery may have treated otherwise than the check's:
/// those the log after `verified_to` names, and those of the transactions
/// open there.
fn touched_since(
    record: &VerifiedRecord,
    log_dir: &Path,
    recovered_to: Option<LogPosition>,
) -> Result<BTreeSet<String>, String> {
    let end = recovered_to.ok_or("recovery did not say where the log ended")?;
    if end < record.verified_to {
        return Err(format!(
            "recovery ended the log at {end}, before the verified {}",
            record.verified_to
        ));
    }
    // The record before the verified end is still the one verified.
    let mut same = false;
    read_range(
        log_dir,
        record.last_record,
        record.verified_to,
        |r, bytes| {
            same = r.lsn == record.last_record
                && blake3::hash(bytes).to_hex().as_str() == record.last_record_blake3;
        },
    )
    .map_err(|e| e.to_string())?;
    if !same {
        return Err("the log before the verified end changed".into());
    }
    let mut file_ids = record.file_ids.clone();
    let after = writes_between(log_dir, &mut file_ids, record.verified_to, end)?;
    let mut touched = uids(&file_ids, &after.written)?;
    touched.extend(record.open_uids.iter().cloned());
    Ok(touched)
}

/// What the log from `from` to `to` writes.
pub(crate) struct Writes {
    /// The log file ids of the pages its records change.
    pub(crate) written: BTreeSet<i32>,
}

/// The file ids the records from `from` to `to` write, adding the ids they
/// register to `file_ids`; an error for a record the reader cannot rule
/// out writing anything (a file operation, an unknown type).
pub(crate) fn writes_between(
    log_dir: &Path,
    file_ids: &mut BTreeMap<i32, BTreeSet<String>>,
    from: LogPosition,
    to: LogPosition,
) -> Result<Writes, String> {
    let mut w = Writes {
        written: BTreeSet::new(),
    };
    let mut doubt = None;
    read_range(log_dir, from, to, |r, _| match &r.kind {
        RecordKind::Page { fileid } => {
            w.written.insert(*fileid);
        }
        RecordKind::Register { fileid, uid, .. } => {
            file_ids
                .entry(*fileid)
                .or_default()
                .insert(tandem_shared::to_hex(uid));
        }
        RecordKind::Doubt { why } => {
            doubt.get_or_insert_with(|| format!("{} at {}", why, r.lsn));
        }
        _ => {}
    })
    .map_err(|e| e.to_string())?;
    match doubt {
        Some(why) => Err(why),
        None => Ok(w),
    }
}

/// Whether the file after promote's recovery has the size and the changed
/// pages the check verified (the rest is what the check started from).
fn holds_what_was_verified(home: &Path, f: &VerifiedFile) -> bool {
    let path = home.join(&f.name);
    let size = std::fs::metadata(&path).map(|m| m.len()).ok();
    size == Some(f.size_after)
        && ranges_blake3(&path, f.page_size, &f.changed)
            .ok()
            .as_deref()
            == Some(f.changed_blake3.as_str())
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::FileExt;

    #[test]
    fn changed_ranges_join_neighbours_and_count_new_pages() {
        let d = |bytes: &[u8]| -> Vec<u8> {
            bytes.iter().flat_map(|b| [*b; PAGE_DIGEST_LEN]).collect()
        };
        assert_eq!(changed_ranges(&d(b"abcd"), &d(b"abcd")), vec![]);
        assert_eq!(
            changed_ranges(&d(b"abcd"), &d(b"xbyz")),
            vec![(0, 1), (2, 2)]
        );
        assert_eq!(changed_ranges(&d(b"ab"), &d(b"abcd")), vec![(2, 2)]);
    }

    #[test]
    fn free_space_is_between_the_index_and_the_items() {
        let mut page = vec![0u8; 4096];
        page[25] = 5; // btree leaf
        page[20..22].copy_from_slice(&3u16.to_le_bytes());
        page[22..24].copy_from_slice(&4000u16.to_le_bytes());
        assert_eq!(free_space(&page), Some(32..4000));
        // A header that makes no sense: compared whole.
        page[22..24].copy_from_slice(&10u16.to_le_bytes());
        assert_eq!(free_space(&page), None);
        page[25] = 9; // btree meta
        assert_eq!(free_space(&page), None);
    }

    #[test]
    fn a_write_changes_the_signature() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("f");
        std::fs::write(&p, vec![0u8; 8192]).unwrap();
        let before = signature(&p).unwrap();
        File::options()
            .write(true)
            .open(&p)
            .unwrap()
            .write_at(&[1], 5000)
            .unwrap();
        assert_ne!(signature(&p).unwrap(), before);
    }
}
