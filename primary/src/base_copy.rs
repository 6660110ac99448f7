//! The base copy of one session: every database file (and `DB_CONFIG`),
//! read in stable pages, then a rescan now and then for databases created
//! later, and rebases when the standby asks. Runs on a blocking thread;
//! it ends when the session drops its command channel or the primary stops.

use crate::context::Shared;
use crate::outbox::{blocking_send, io_status, Outbox};
use crate::registry::SessionGuard;
use std::collections::{BTreeMap, BTreeSet};
use std::fs::File;
use std::io;
use std::sync::atomic::Ordering;
use tandem_shared::envlayout::DB_CONFIG;
use tandem_shared::logfile::walk_file;
use tandem_shared::pages::{PageProof, StablePageReader};
use tandem_shared::wire::{
    primary_message::Kind, BaseFilesDone, BaseStart, FileChunk, FileEnd, FileKind, FileSame,
    FileStart, PageDigests,
};
use tandem_shared::{LogPosition, MAX_CHUNK};
use tokio_util::sync::CancellationToken;
use tonic::Status;

/// What the standby asks of the base task.
pub enum BaseCommand {
    Digests(PageDigests),
    /// With where the standby's current base starts.
    Rebase(LogPosition),
}

/// The first log file a base copy taken now needs: the one holding the last
/// checkpoint's `ckp_lsn`, i.e. the first file `db_archive` does not list
/// (BDB-NOTES.md §7). Without a checkpoint, every log file is needed.
pub fn base_boundary(shared: &Shared) -> Result<LogPosition, Status> {
    let files = shared
        .layout
        .log_files()
        .map_err(|e| Status::unavailable(e.to_string()))?;
    let Some(&newest) = files.last() else {
        return Err(Status::unavailable(format!(
            "no log files in {}: is this a transactional Berkeley DB environment?",
            shared.layout.log_dir().display()
        )));
    };
    let inactive = shared
        .tools
        .inactive_logs(&shared.layout.home)
        .unwrap_or_else(|e| {
            tracing::warn!(error = %e, "db_archive failed; the base will include every log file");
            Vec::new()
        });
    let first = files
        .iter()
        .copied()
        .find(|n| !inactive.contains(n))
        .unwrap_or(newest);
    let after_gap = first_after_last_gap(&files);
    if after_gap > first {
        // A base cannot start before a hole in the log: shipping would hit
        // it, report lost log and start the same base again, forever. (With
        // a hole, `db_archive` may list nothing.) If BDB's checkpoint is
        // before the hole the base will not recover; the standby's
        // readiness check says so.
        tracing::warn!(
            first = %shared.layout.log_name(first), after_gap = %shared.layout.log_name(after_gap),
            "the primary's log has a hole (files removed out of order): the base starts after it"
        );
    }
    Ok(LogPosition::new(first.max(after_gap), 0))
}

/// The first log file after the last hole in `files` (sorted), or the
/// first file when there is none.
fn first_after_last_gap(files: &[u32]) -> u32 {
    files
        .windows(2)
        .rev()
        .find(|w| w[1] != w[0] + 1)
        .map(|w| w[1])
        .or(files.first().copied())
        .unwrap_or(0)
}

/// Ships the database files the standby does not have (pages a rejoining
/// standby has, by `rejoin_digests`, as FileSame), then rescans for
/// databases created later and serves rebase requests.
#[allow(clippy::too_many_arguments)]
pub fn ship_base(
    shared: &Shared,
    tx: &Outbox,
    guard: &SessionGuard,
    stop: &CancellationToken,
    mut sent: BTreeSet<String>,
    files_done: bool,
    rejoin_digests: &BTreeMap<String, Vec<u8>>,
    commands: std::sync::mpsc::Receiver<BaseCommand>,
) -> Result<(), Status> {
    if !files_done {
        ship_files(shared, tx, stop, &mut sent, rejoin_digests)?;
    }
    // Page digests of the standby's files, collected for a rebase.
    let mut theirs: BTreeMap<String, Vec<u8>> = BTreeMap::new();
    loop {
        match commands.recv_timeout(shared.rescan_interval) {
            Ok(BaseCommand::Digests(d)) => {
                merge_digests(&mut theirs, d);
                continue;
            }
            Ok(BaseCommand::Rebase(current)) => {
                let log_start = base_boundary(shared)?;
                if log_start.file <= current.file {
                    tracing::warn!(
                        boundary = %log_start, current = %current,
                        "rebase requested but BDB still needs the log from the standby's current base on \
                         (no checkpoint since, or a long-running transaction): not rebasing"
                    );
                    theirs.clear();
                    continue;
                }
                let base_id = crate::identity::random_id();
                tracing::info!(base = %base_id, %log_start, "rebase: sending a fresh base, only pages the standby lacks");
                blocking_send(
                    tx,
                    Kind::BaseStart(BaseStart {
                        base_id: base_id.clone(),
                        log_start: Some(log_start.into()),
                        reason: "rebase requested by the standby".into(),
                        rebase: true,
                        discard_after: None,
                    }),
                )?;
                guard.rebased(&base_id);
                let mut fresh = BTreeSet::new();
                ship_files(shared, tx, stop, &mut fresh, &theirs)?;
                sent = fresh;
                theirs.clear();
                continue;
            }
            Err(std::sync::mpsc::RecvTimeoutError::Timeout) => {}
            Err(std::sync::mpsc::RecvTimeoutError::Disconnected) => return Ok(()),
        }
        if tx.is_closed() || stop.is_cancelled() {
            return Ok(());
        }
        for file in list_unsent(shared, &sent)? {
            tracing::info!(file = %file.name, "new database file; shipping it");
            ship_file(shared, tx, stop, &file, None, None)?;
            sent.insert(file.name);
        }
    }
}

/// Adds one PageDigests message to the standby's digests by file.
pub fn merge_digests(theirs: &mut BTreeMap<String, Vec<u8>>, d: PageDigests) {
    let at = d.first_page as usize * tandem_shared::pages::PAGE_DIGEST_LEN;
    let v = theirs.entry(d.name).or_default();
    if v.len() < at + d.digests.len() {
        v.resize(at + d.digests.len(), 0);
    }
    v[at..at + d.digests.len()].copy_from_slice(&d.digests);
}

/// A file a base copy ships, and how its pages are read.
struct ToShip {
    name: String,
    kind: FileKind,
    page_size: u32,
    proof: PageProof,
}

/// Database files (and DB_CONFIG) not in `sent`.
fn list_unsent(shared: &Shared, sent: &BTreeSet<String>) -> Result<Vec<ToShip>, Status> {
    let mut out = Vec::new();
    if shared.layout.home.join(DB_CONFIG).is_file() && !sent.contains(DB_CONFIG) {
        out.push(ToShip {
            name: DB_CONFIG.to_owned(),
            kind: FileKind::Config,
            page_size: 4096,
            proof: PageProof::TwoReads,
        });
    }
    for f in shared
        .layout
        .database_files()
        .map_err(|e| Status::internal(e.to_string()))?
    {
        if !sent.contains(&f.name) {
            out.push(ToShip {
                name: f.name,
                kind: FileKind::Database,
                page_size: f.page_size,
                proof: f.proof,
            });
        }
    }
    Ok(out)
}

/// Warns when some databases' pages have only the two-read proof on a file
/// system where two reads can both be torn (BDB-NOTES.md §13).
fn warn_of_unproven_pages(shared: &Shared, files: &[ToShip]) {
    let weak: Vec<&str> = files
        .iter()
        .filter(|f| f.kind == FileKind::Database && f.proof == PageProof::TwoReads)
        .map(|f| f.name.as_str())
        .collect();
    if !weak.is_empty() && !tandem_shared::pages::two_reads_prove_pages(&shared.layout.home) {
        tracing::warn!(databases = ?weak, "these databases have no page checksums and this file system (not ext4, btrfs, tmpfs or XFS) cannot make a page being written wait for the copy: a page can be copied torn if the application is descheduled while writing it; create databases with DB_CHKSUM (DB->set_flags) so that every page is proven by its checksum");
    }
}

/// A base's file copy: every file not yet sent, then BaseFilesDone.
fn ship_files(
    shared: &Shared,
    tx: &Outbox,
    stop: &CancellationToken,
    sent: &mut BTreeSet<String>,
    theirs: &BTreeMap<String, Vec<u8>>,
) -> Result<(), Status> {
    let started = std::time::Instant::now();
    let (mut bytes, mut skipped) = (0, 0);
    let files = list_unsent(shared, sent)?;
    warn_of_unproven_pages(shared, &files);
    let sizes: Vec<u64> = files
        .iter()
        .map(|f| std::fs::metadata(shared.layout.home.join(&f.name)).map_or(0, |m| m.len()))
        .collect();
    for (i, file) in files.into_iter().enumerate() {
        let after: u64 = sizes[i + 1..].iter().sum();
        let theirs = theirs.get(&file.name).map(Vec::as_slice);
        let (b, s) = ship_file(shared, tx, stop, &file, theirs, Some(after))?;
        bytes += b;
        skipped += s;
        sent.insert(file.name);
    }
    // Read after the copy: WAL puts every copied page's log record
    // before this point.
    let consistent_at = current_log_end(shared).map_err(|e| io_status("read end of log", e))?;
    tracing::info!(files = sent.len(), bytes, skipped, secs = started.elapsed().as_secs_f64(), %consistent_at, "base copy sent");
    blocking_send(
        tx,
        Kind::BaseFilesDone(BaseFilesDone {
            consistent_at: Some(consistent_at.into()),
        }),
    )
}

/// Ships one file in stable, page-aligned chunks. Pages whose digest
/// matches the standby's copy (`theirs`, during a rebase) are sent as
/// FileSame instead of bytes. `after`: bytes of the files that follow it in
/// this base copy (for the standby's progress); `None` for a file that
/// appeared after the copy. Returns (bytes sent, skipped).
// Long function: one loop over a file's chunks (stable read, skip as FileSame or send,
// progress); its position and counts are the loop's state.
fn ship_file(
    shared: &Shared,
    tx: &Outbox,
    stop: &CancellationToken,
    to_ship: &ToShip,
    theirs: Option<&[u8]>,
    after: Option<u64>,
) -> Result<(u64, u64), Status> {
    let (name, kind, page_size) = (to_ship.name.as_str(), to_ship.kind, to_ship.page_size);
    let (in_base, after) = (after.is_some(), after.unwrap_or(0));
    let path = shared.layout.home.join(name);
    let file = match File::open(&path) {
        Ok(f) => f,
        // Removed since it was listed: nothing to ship.
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok((0, 0)),
        Err(e) => return Err(io_status(&format!("open {}", path.display()), e)),
    };
    let size = file.metadata().map_err(|e| io_status("stat", e))?.len();
    advise_sequential(&file);
    blocking_send(
        tx,
        Kind::FileStart(FileStart {
            name: name.to_owned(),
            size,
            kind: kind as i32,
            page_size,
            base_bytes_left: if in_base { size + after } else { 0 },
        }),
    )?;
    let page = page_size.max(512) as usize;
    let chunk_len = (MAX_CHUNK / page).max(1) * page;
    let (mut offset, mut sent, mut skipped) = (0u64, 0u64, 0u64);
    let mut reader = StablePageReader::new(page, to_ship.proof);
    let mut ahead = ReadAhead::default();
    while offset < size {
        if stop.is_cancelled() {
            return Err(Status::cancelled("the session is ending"));
        }
        let want = chunk_len.min((size - offset) as usize);
        let data = reader
            .read(&file, offset, want)
            .map_err(|e| io_status(&format!("read {name}"), e))?;
        let (once, again) = reader.take_counts();
        let counters = &shared.counters;
        counters.pages_read_once.fetch_add(once, Ordering::Relaxed);
        counters
            .pages_read_again
            .fetch_add(again, Ordering::Relaxed);
        ahead.advise(&file, offset + data.len() as u64, size);
        // Owned by the message from here on: runs are slices of it, not copies.
        let data = bytes::Bytes::from(data);
        if data.is_empty() {
            break; // the file shrank while we read it
        }
        let len = data.len() as u64;
        for (run_offset, run_len, same) in runs(&data, offset, page, theirs) {
            if same {
                blocking_send(
                    tx,
                    Kind::FileSame(FileSame {
                        name: name.to_owned(),
                        offset: run_offset,
                        len: run_len as u64,
                    }),
                )?;
                skipped += run_len as u64;
            } else {
                let start = (run_offset - offset) as usize;
                let bytes = data.slice(start..start + run_len);
                shared
                    .counters
                    .file_bytes
                    .fetch_add(run_len as u64, Ordering::Relaxed);
                // Cut at the page size the standby cuts at (FileStart's).
                let pages = (tx.page_checked() && page == page_size as usize).then_some(page);
                blocking_send(
                    tx,
                    Kind::FileChunk(file_chunk(shared, name, run_offset, bytes, pages)),
                )?;
                sent += run_len as u64;
            }
        }
        offset += len;
    }
    blocking_send(
        tx,
        Kind::FileEnd(FileEnd {
            name: name.to_owned(),
            size: offset,
        }),
    )?;
    Ok((sent, skipped))
}

/// The one place a chunk of a database file is encoded for the wire: the
/// digest is over the bytes as read, and the message owns them (a slice of
/// the read buffer, not a copy). With `page` (the standby checks chunks by
/// their pages), a chunk that starts on a page boundary carries
/// `pages_blake3` instead of `blake3`.
fn file_chunk(
    shared: &Shared,
    name: &str,
    offset: u64,
    data: bytes::Bytes,
    page: Option<usize>,
) -> FileChunk {
    let mut chunk = FileChunk {
        name: name.to_owned(),
        offset,
        ..Default::default()
    };
    match page.filter(|&p| offset.is_multiple_of(p as u64)) {
        Some(p) => chunk.pages_blake3 = shared.pages_digest(&data, p),
        None => chunk.blake3 = shared.digest(&data),
    }
    chunk.data = data;
    chunk
}

/// Splits a chunk read at `offset` into runs of pages that are the same as
/// the standby's (`true`) or not, as (file offset, length, same).
fn runs(data: &[u8], offset: u64, page: usize, theirs: Option<&[u8]>) -> Vec<(u64, usize, bool)> {
    use tandem_shared::pages::{page_digests, PAGE_DIGEST_LEN};
    let Some(theirs) = theirs else {
        return vec![(offset, data.len(), false)];
    };
    let ours = page_digests(data, page);
    let first_page = (offset / page as u64) as usize;
    let mut out: Vec<(u64, usize, bool)> = Vec::new();
    for (i, chunk) in data.chunks(page).enumerate() {
        let d = &ours[i * PAGE_DIGEST_LEN..(i + 1) * PAGE_DIGEST_LEN];
        let at = (first_page + i) * PAGE_DIGEST_LEN;
        // A short last page is never "the same": its length may differ.
        let same = chunk.len() == page && theirs.get(at..at + PAGE_DIGEST_LEN) == Some(d);
        match out.last_mut() {
            Some(last) if last.2 == same => last.1 += chunk.len(),
            _ => out.push((offset + (i * page) as u64, chunk.len(), same)),
        }
    }
    out
}

/// Tells the kernel the file is read front to back once (a larger
/// read-ahead window). A hint only; failing is harmless.
fn advise_sequential(file: &File) {
    let _ = rustix::fs::fadvise(file, 0, None, rustix::fs::Advice::Sequential);
}

/// Bytes of a file asked from the disk ahead of the chunk being read.
const READ_AHEAD: u64 = 8 << 20;

/// Keeps the disk reading [`READ_AHEAD`] bytes past the chunk just read
/// (`POSIX_FADV_WILLNEED` starts the reads and returns), so that a copy
/// from a cold cache reads the next chunks while this one is checked,
/// hashed and sent, instead of waiting for each read in turn.
#[derive(Default)]
struct ReadAhead {
    /// Reads asked for up to here.
    asked: u64,
}

impl ReadAhead {
    fn advise(&mut self, file: &File, read_to: u64, size: u64) {
        if let Some((from, len)) = self.next(read_to, size) {
            let _ = rustix::fs::fadvise(file, from, Some(len), rustix::fs::Advice::WillNeed);
        }
    }

    /// The range to ask for after reading up to `read_to`, if any.
    fn next(&mut self, read_to: u64, size: u64) -> Option<(u64, std::num::NonZeroU64)> {
        let want = (read_to + READ_AHEAD).min(size);
        // Ask in steps of half the window (one call per few chunks), and
        // for the file's tail once.
        if want <= self.asked || (want < size && want <= self.asked + READ_AHEAD / 2) {
            return None;
        }
        let from = self.asked.max(read_to);
        self.asked = want;
        std::num::NonZeroU64::new(want.saturating_sub(from)).map(|len| (from, len))
    }
}

/// Walks the newest log file now (not the watcher's possibly older view).
fn current_log_end(shared: &Shared) -> io::Result<LogPosition> {
    let files = shared.layout.log_files().map_err(io::Error::other)?;
    let Some(&newest) = files.last() else {
        return Ok(LogPosition::ZERO);
    };
    let w = walk_file(&File::open(shared.layout.log_path(newest))?, None)?;
    Ok(LogPosition::new(newest, w.end))
}

#[cfg(test)]
mod tests {
    use super::runs;
    use tandem_shared::pages::page_digests;

    #[test]
    fn runs_skip_pages_the_standby_has() {
        let mut data = vec![1u8; 4096 * 4];
        let theirs = page_digests(&data, 4096);
        data[4096 * 2 + 7] = 9; // page 2 changed
        assert_eq!(
            runs(&data, 0, 4096, Some(&theirs)),
            vec![(0, 8192, true), (8192, 4096, false), (12288, 4096, true)]
        );
        assert_eq!(runs(&data, 0, 4096, None), vec![(0, 16384, false)]);
        // The same pages later in the file are compared with their own index.
        assert_eq!(
            runs(&data[8192..], 8192, 4096, Some(&theirs)),
            vec![(8192, 4096, false), (12288, 4096, true)]
        );
    }

    #[test]
    fn read_ahead_covers_every_byte_once_and_stays_a_window_ahead() {
        const MIB: u64 = 1 << 20;
        let size = 37 * MIB + 5;
        let mut ahead = super::ReadAhead::default();
        let (mut covered, mut calls) = (MIB, 0);
        let mut read_to = 0;
        while read_to < size {
            read_to = (read_to + MIB).min(size);
            if let Some((from, len)) = ahead.next(read_to, size) {
                // Contiguous, never behind what was read, never past the end.
                assert_eq!(from, covered.max(read_to));
                covered = from + len.get();
                assert!(covered <= size);
                calls += 1;
            }
            // At least half a window ahead, or to the end.
            assert!(covered >= (read_to + super::READ_AHEAD / 2).min(size));
        }
        assert_eq!(covered, size);
        assert!(
            calls < 12,
            "one call per few chunks, not per chunk: {calls}"
        );
    }

    #[test]
    fn a_base_never_starts_before_a_hole_in_the_log() {
        assert_eq!(super::first_after_last_gap(&[3, 4, 5]), 3);
        assert_eq!(super::first_after_last_gap(&[3, 4, 7, 8, 10]), 10);
        assert_eq!(super::first_after_last_gap(&[3, 4, 7, 8]), 7);
        assert_eq!(super::first_after_last_gap(&[]), 0);
    }
}
