//! One standby's stream. The standby says what it holds (`Hello`); the
//! session either continues from there or starts a new base, then runs
//! three duties side by side until the standby goes away:
//!
//! - the base copy: every database file (and `DB_CONFIG`), read in stable
//!   pages, then a rescan now and then for databases created later;
//! - the log: every verified record from the base boundary or the resume
//!   point on, following the live tail;
//! - heartbeats carrying the primary's end of log, for lag.
//!
//! All three feed one bounded channel, so a slow standby slows the readers
//! instead of filling memory.

use crate::log_watch::LogEnd;
use crate::server::Shared;
use std::collections::{BTreeMap, BTreeSet};
use std::fs::File;
use std::io;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;
use tandem_shared::envlayout::DB_CONFIG;
use tandem_shared::logfile::{read_verified, walk_file};
use tandem_shared::pages::read_stable_pages;
use tandem_shared::wire::{
    primary_message::Kind, standby_message, BaseFilesDone, BaseStart, FileChunk, FileEnd, FileKind,
    FileSame, FileStart, Heartbeat, Hello, LogChunk, PageDigests, PrimaryMessage, StandbyMessage,
    Welcome,
};
use tandem_shared::{LogPosition, MAX_CHUNK};
use tokio::sync::{mpsc, watch};
use tonic::{Status, Streaming};

pub type Outbox = mpsc::Sender<Result<PrimaryMessage, Status>>;

/// How long a standby has to say Hello after connecting.
const HELLO_TIMEOUT: Duration = Duration::from_secs(10);

/// Where the log stream starts.
#[derive(Debug, Clone, PartialEq, Eq)]
enum Plan {
    Resume {
        from: LogPosition,
        prev: Option<u32>,
    },
    NewBase {
        reason: String,
    },
}

fn msg(kind: Kind) -> Result<PrimaryMessage, Status> {
    Ok(PrimaryMessage { kind: Some(kind) })
}

async fn send(tx: &Outbox, kind: Kind) -> Result<(), Status> {
    tx.send(msg(kind))
        .await
        .map_err(|_| Status::cancelled("standby went away"))
}

fn io_status(what: &str, e: io::Error) -> Status {
    Status::internal(format!("{what}: {e}"))
}

pub async fn run(
    shared: Arc<Shared>,
    peer: String,
    mut inbound: Streaming<StandbyMessage>,
    tx: Outbox,
) {
    let hello = match tokio::time::timeout(HELLO_TIMEOUT, inbound.message()).await {
        Ok(Ok(Some(StandbyMessage {
            kind: Some(standby_message::Kind::Hello(h)),
        }))) => h,
        Ok(Ok(_)) => {
            let _ = tx
                .send(Err(Status::invalid_argument(
                    "the first message must be Hello",
                )))
                .await;
            return;
        }
        Ok(Err(e)) => {
            tracing::warn!(%peer, error = %e, "standby stream failed before Hello");
            // Tell the standby why (e.g. its message was over the size limit
            // or could not be decoded); otherwise it sees the stream end
            // without a word. If it is gone, this goes nowhere.
            let _ = tx.send(Err(e)).await;
            return;
        }
        Err(_) => {
            let _ = tx
                .send(Err(Status::deadline_exceeded("no Hello within 10 s")))
                .await;
            return;
        }
    };
    let name = if hello.standby_name.is_empty() {
        peer.clone()
    } else {
        hello.standby_name.clone()
    };
    match start(&shared, &name, &peer, &hello, &tx).await {
        Ok((tasks, commands)) => {
            follow_acks(&shared, &name, &mut inbound, commands).await;
            for t in tasks {
                t.abort();
            }
            if *shared.stopping.borrow() {
                let _ = tx
                    .send(Err(Status::unavailable("the primary is shutting down")))
                    .await;
            }
        }
        Err(status) => {
            let _ = tx.send(Err(status)).await;
        }
    }
    shared.standby_disconnected(&name);
    tracing::info!(standby = %name, %peer, "standby disconnected");
}

/// Checks the Hello, decides where to start, and starts the duties.
async fn start(
    shared: &Arc<Shared>,
    name: &str,
    peer: &str,
    hello: &Hello,
    tx: &Outbox,
) -> Result<
    (
        Vec<tokio::task::JoinHandle<()>>,
        std::sync::mpsc::Sender<BaseCommand>,
    ),
    Status,
> {
    let id = &shared.identity;
    if hello.protocol_version != tandem_shared::wire::PROTOCOL_VERSION {
        return Err(Status::failed_precondition(format!(
            "protocol version {} is not supported (this primary speaks {})",
            hello.protocol_version,
            tandem_shared::wire::PROTOCOL_VERSION
        )));
    }
    if hello.epoch > id.epoch {
        tracing::error!(
            standby = %name, standby_epoch = hello.epoch, our_epoch = id.epoch,
            "FENCED: this standby has seen a newer epoch: a standby was promoted past this primary. \
             Not shipping to it. Stop the application on this machine; it is no longer the primary."
        );
        return Err(Status::failed_precondition(format!(
            "fenced: the standby has seen epoch {} but this primary is at epoch {}; a newer primary exists",
            hello.epoch, id.epoch
        )));
    }
    if !hello.env_id.is_empty() && hello.env_id != id.env_id {
        return Err(Status::failed_precondition(format!(
            "environment mismatch: the standby's directory belongs to environment {}, this primary serves {}",
            hello.env_id, id.env_id
        )));
    }
    let plan = tokio::task::block_in_place(|| plan(shared, hello));
    let (base_id, from, prev, complete, files_done) = match plan {
        Plan::Resume { from, prev } => {
            tracing::info!(standby = %name, %peer, %from, "standby connected; resuming");
            send(tx, welcome(shared, true)).await?;
            let complete: BTreeSet<String> = hello.complete_files.iter().cloned().collect();
            (
                hello.base_id.clone(),
                from,
                prev,
                complete,
                hello.base_files_done,
            )
        }
        Plan::NewBase { reason } => {
            let from = tokio::task::block_in_place(|| base_boundary(shared))?;
            let base_id = crate::identity::random_id();
            tracing::info!(standby = %name, %peer, %reason, base = %base_id, boundary = %from, "standby connected; starting a new base");
            send(tx, welcome(shared, false)).await?;
            send(
                tx,
                Kind::BaseStart(BaseStart {
                    base_id: base_id.clone(),
                    log_start: Some(from.into()),
                    reason,
                    rebase: false,
                }),
            )
            .await?;
            (base_id, from, None, BTreeSet::new(), false)
        }
    };
    shared.standby_connected(name, peer, &base_id, from);

    let mut tasks = Vec::new();
    let (commands, base_commands) = std::sync::mpsc::channel();
    {
        let (shared, tx) = (shared.clone(), tx.clone());
        tasks.push(tokio::spawn(async move {
            if let Err(status) = ship_log(&shared, &tx, from, prev).await {
                let _ = tx.send(Err(status)).await;
            }
        }));
    }
    {
        let (shared, tx) = (shared.clone(), tx.clone());
        tasks.push(tokio::task::spawn_blocking(move || {
            if let Err(status) = ship_base(&shared, &tx, complete, files_done, base_commands) {
                let _ = tx.blocking_send(Err(status));
            }
        }));
    }
    {
        let (shared, tx) = (shared.clone(), tx.clone());
        tasks.push(tokio::spawn(async move { heartbeats(&shared, &tx).await }));
    }
    Ok((tasks, commands))
}

fn welcome(shared: &Shared, resume: bool) -> Kind {
    Kind::Welcome(Welcome {
        env_id: shared.identity.env_id.clone(),
        epoch: shared.identity.epoch,
        log_dir: tandem_shared::envlayout::rel_name(&shared.layout.log_dir_rel()),
        resume,
    })
}

/// What the standby asks of the base task.
pub enum BaseCommand {
    Digests(PageDigests),
    /// With where the standby's current base starts.
    Rebase(LogPosition),
}

async fn follow_acks(
    shared: &Shared,
    name: &str,
    inbound: &mut Streaming<StandbyMessage>,
    commands: std::sync::mpsc::Sender<BaseCommand>,
) {
    let mut stopping = shared.stopping.clone();
    loop {
        let next = tokio::select! {
            m = inbound.message() => m,
            _ = stopping.wait_for(|s| *s) => return,
        };
        match next {
            Ok(Some(StandbyMessage {
                kind: Some(standby_message::Kind::Ack(ack)),
            })) => {
                if let Some(p) = ack.durable {
                    shared.standby_acked(name, p.into(), ack.archived.map(Into::into));
                }
            }
            Ok(Some(StandbyMessage {
                kind: Some(standby_message::Kind::PageDigests(d)),
            })) => {
                let _ = commands.send(BaseCommand::Digests(d));
            }
            Ok(Some(StandbyMessage {
                kind: Some(standby_message::Kind::RebaseRequest(r)),
            })) => {
                tracing::info!(standby = %name, "standby asked for a rebase");
                let _ = commands.send(BaseCommand::Rebase(r.log_start.unwrap_or_default().into()));
            }
            Ok(Some(_)) => {
                tracing::warn!(standby = %name, "unexpected message from standby; ignored")
            }
            Ok(None) => return,
            Err(e) => {
                tracing::debug!(standby = %name, error = %e, "standby stream ended");
                return;
            }
        }
    }
}

/// Can the standby's log be continued, or does it need a new base?
fn plan(shared: &Shared, hello: &Hello) -> Plan {
    let new_base = |reason: String| Plan::NewBase { reason };
    if hello.base_id.is_empty() {
        return new_base("the standby holds no base yet".into());
    }
    let d: LogPosition = hello.durable.unwrap_or_default().into();
    if d.file == 0 {
        return new_base("the standby holds no log position".into());
    }
    let files = match shared.layout.log_files() {
        Ok(f) => f,
        Err(e) => return new_base(format!("cannot list the primary's log files: {e}")),
    };
    let newest = files.last().copied().unwrap_or(0);
    let missing: Vec<u32> = (d.file..=newest.max(d.file))
        .filter(|n| files.binary_search(n).is_err())
        .collect();
    if !missing.is_empty() {
        let names: Vec<String> = missing
            .iter()
            .take(5)
            .map(|n| shared.layout.log_name(*n))
            .collect();
        return new_base(format!(
            "log files the standby needs to continue from {d} are gone from the primary ({}{}); they were removed before \
             they were shipped, so the standby's copy cannot be continued",
            names.join(", "),
            if missing.len() > 5 { ", ..." } else { "" }
        ));
    }
    if d.offset == 0 {
        return Plan::Resume {
            from: d,
            prev: None,
        };
    }
    let check = || -> io::Result<Plan> {
        let f = File::open(shared.layout.log_path(d.file))?;
        let r = read_verified(&f, 0, None, d.offset as usize)?;
        if r.walk.end != d.offset {
            return Ok(new_base(format!("the standby's log ends at {d}, which is not a record boundary of the primary's log")));
        }
        let last = r.walk.last_record.unwrap_or(0) as usize;
        if !hello.last_record_digest.is_empty()
            && blake3::hash(&r.bytes[last..]).as_bytes()[..] != hello.last_record_digest[..]
        {
            return Ok(new_base(format!(
                "the standby's last log record before {d} differs from the primary's"
            )));
        }
        Ok(Plan::Resume {
            from: d,
            prev: r.walk.last_record,
        })
    };
    match check() {
        Ok(p) => p,
        Err(e) => new_base(format!("cannot read the primary's log at {d}: {e}")),
    }
}

/// The first log file a base copy taken now needs: the one holding the last
/// checkpoint's `ckp_lsn`, i.e. the first file `db_archive` does not list
/// (BDB.md §7). Without a checkpoint, every log file is needed.
fn base_boundary(shared: &Shared) -> Result<LogPosition, Status> {
    let files = shared
        .layout
        .log_files()
        .map_err(|e| Status::internal(e.to_string()))?;
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
    Ok(LogPosition::new(first, 0))
}

/// Ships the log from `pos` on, following the live tail.
async fn ship_log(
    shared: &Shared,
    tx: &Outbox,
    mut pos: LogPosition,
    mut prev: Option<u32>,
) -> Result<(), Status> {
    let mut ends = shared.log_end.clone();
    let mut open: Option<(u32, File, u64)> = None;
    let mut unreadable_header = 0u32;
    loop {
        if open.as_ref().map(|o| o.0) != Some(pos.file) {
            match File::open(shared.layout.log_path(pos.file)) {
                Ok(f) => {
                    let size = f
                        .metadata()
                        .map_err(|e| io_status("stat log file", e))?
                        .len();
                    open = Some((pos.file, f, size));
                }
                Err(e) if e.kind() == io::ErrorKind::NotFound => {
                    let newest = shared
                        .layout
                        .log_files()
                        .map_err(|e| Status::internal(e.to_string()))?
                        .last()
                        .copied();
                    if newest.is_some_and(|n| n > pos.file) {
                        let name = shared.layout.log_name(pos.file);
                        tracing::error!(file = %name, "log gap: a log file was removed before it was shipped");
                        return Err(Status::data_loss(format!(
                            "log gap: {name} was removed from the primary before it was shipped; a new base is needed"
                        )));
                    }
                    wait_for_log(&mut ends).await;
                    continue;
                }
                Err(e) => return Err(io_status("open log file", e)),
            }
        }
        let Some((_, file, size)) = open.as_ref() else {
            continue;
        };
        // When the watcher has verified further in this file, read up to
        // there only: reading on would read the zero-filled, pre-allocated
        // tail. Otherwise (the watcher is behind, or in an older file) read
        // whatever the file has.
        let watched = ends.borrow().end;
        let max = match watched.offset.checked_sub(pos.offset) {
            Some(ahead) if watched.file == pos.file && ahead > 0 => (ahead as usize).min(MAX_CHUNK),
            _ => MAX_CHUNK,
        };
        let r = tokio::task::block_in_place(|| read_verified(file, pos.offset, prev, max))
            .map_err(|e| io_status("read log", e))?;
        // A file whose header stays unreadable (not a moment's torn read:
        // it does not verify for over a second) is not a log Tandem can
        // ship, e.g. an encrypted environment's.
        unreadable_header = match r.walk.stop {
            tandem_shared::logfile::WalkStop::Invalid(_)
                if pos.offset == 0 && r.bytes.is_empty() =>
            {
                unreadable_header + 1
            }
            _ => 0,
        };
        if unreadable_header > 50 {
            if let tandem_shared::logfile::WalkStop::Invalid(why) = r.walk.stop {
                let name = shared.layout.log_name(pos.file);
                tracing::error!(file = %name, why, "cannot read the log: encrypted or not a Berkeley DB 5.3 log");
                return Err(Status::failed_precondition(format!(
                    "{name} does not start with a Berkeley DB 5.3 log header ({why}); encrypted environments are not supported"
                )));
            }
        }
        if !r.bytes.is_empty() {
            let data = bytes::Bytes::from(r.bytes);
            shared
                .counters
                .log_bytes
                .fetch_add(data.len() as u64, Ordering::Relaxed);
            let chunk = LogChunk {
                file: pos.file,
                offset: pos.offset,
                blake3: digest(shared, &data),
                data,
                file_size: *size,
            };
            send(tx, Kind::LogChunk(chunk)).await?;
            pos.offset = r.walk.end;
            prev = r.walk.last_record;
            // Caught up with the watcher: a read now would mostly find the
            // zero tail. Wait for it to see more (or the usual timeout, so
            // a stalled watcher only slows this session down).
            if watched.file == pos.file && watched.offset == pos.offset {
                wait_for_log(&mut ends).await;
            }
            continue;
        }
        // BDB finishes a file before it creates the next, so once a newer
        // one exists and this one reads no further, this one is complete.
        // (The watcher being past this file counts: the next file may have
        // been removed, a gap the open below reports.)
        if ends.borrow().end.file > pos.file || shared.layout.log_path(pos.file + 1).exists() {
            let again =
                tokio::task::block_in_place(|| read_verified(file, pos.offset, prev, MAX_CHUNK))
                    .map_err(|e| io_status("read log", e))?;
            // Never past a file nothing was read from: BDB writes no empty log file.
            if again.bytes.is_empty() && pos.offset > 0 {
                pos = LogPosition::new(pos.file + 1, 0);
            }
            continue;
        }
        wait_for_log(&mut ends).await;
    }
}

/// Waits for the watcher to see new log, or a little while at most (the
/// watcher may be behind a file switch this session already saw).
async fn wait_for_log(ends: &mut watch::Receiver<LogEnd>) {
    let _ = tokio::time::timeout(Duration::from_millis(20), ends.changed()).await;
}

fn digest(shared: &Shared, data: &[u8]) -> bytes::Bytes {
    let mut d = blake3::hash(data).as_bytes().to_vec();
    // Test-only fault injection: corrupt the digest of the Nth chunk so the
    // standby sees a chunk whose bytes do not match (as if flipped in
    // transit, below TLS).
    let n = shared.counters.chunks.fetch_add(1, Ordering::Relaxed) + 1;
    if shared.corrupt_chunk == Some(n) {
        tracing::warn!(chunk = n, "fault injection: corrupting this chunk's digest");
        d[0] ^= 0xff;
    }
    bytes::Bytes::from(d)
}

/// Ships the database files the standby does not have, then rescans for
/// databases created later and serves rebase requests.
fn ship_base(
    shared: &Shared,
    tx: &Outbox,
    mut sent: BTreeSet<String>,
    files_done: bool,
    commands: std::sync::mpsc::Receiver<BaseCommand>,
) -> Result<(), Status> {
    if !files_done {
        ship_files(shared, tx, &mut sent, &BTreeMap::new())?;
    }
    // Page digests of the standby's files, collected for a rebase.
    let mut theirs: BTreeMap<String, Vec<u8>> = BTreeMap::new();
    loop {
        match commands.recv_timeout(shared.rescan_interval) {
            Ok(BaseCommand::Digests(d)) => {
                let at = d.first_page as usize * tandem_shared::pages::PAGE_DIGEST_LEN;
                let v = theirs.entry(d.name).or_default();
                if v.len() < at + d.digests.len() {
                    v.resize(at + d.digests.len(), 0);
                }
                v[at..at + d.digests.len()].copy_from_slice(&d.digests);
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
                        base_id,
                        log_start: Some(log_start.into()),
                        reason: "rebase requested by the standby".into(),
                        rebase: true,
                    }),
                )?;
                let mut fresh = BTreeSet::new();
                ship_files(shared, tx, &mut fresh, &theirs)?;
                sent = fresh;
                theirs.clear();
                continue;
            }
            Err(std::sync::mpsc::RecvTimeoutError::Timeout) => {}
            Err(std::sync::mpsc::RecvTimeoutError::Disconnected) => return Ok(()),
        }
        if tx.is_closed() {
            return Ok(());
        }
        for (name, kind, page_size) in list_unsent(shared, &sent)? {
            tracing::info!(file = %name, "new database file; shipping it");
            ship_file(shared, tx, &name, kind, page_size, None, None)?;
            sent.insert(name);
        }
    }
}

/// Database files (and DB_CONFIG) not in `sent`.
fn list_unsent(
    shared: &Shared,
    sent: &BTreeSet<String>,
) -> Result<Vec<(String, FileKind, u32)>, Status> {
    let mut out = Vec::new();
    if shared.layout.home.join(DB_CONFIG).is_file() && !sent.contains(DB_CONFIG) {
        out.push((DB_CONFIG.to_owned(), FileKind::Config, 4096));
    }
    for f in shared
        .layout
        .database_files()
        .map_err(|e| Status::internal(e.to_string()))?
    {
        if !sent.contains(&f.name) {
            out.push((f.name, FileKind::Database, f.page_size));
        }
    }
    Ok(out)
}

/// A base's file copy: every file not yet sent, then BaseFilesDone.
fn ship_files(
    shared: &Shared,
    tx: &Outbox,
    sent: &mut BTreeSet<String>,
    theirs: &BTreeMap<String, Vec<u8>>,
) -> Result<(), Status> {
    let started = std::time::Instant::now();
    let (mut bytes, mut skipped) = (0, 0);
    let files = list_unsent(shared, sent)?;
    let sizes: Vec<u64> = files
        .iter()
        .map(|(name, _, _)| std::fs::metadata(shared.layout.home.join(name)).map_or(0, |m| m.len()))
        .collect();
    for (i, (name, kind, page_size)) in files.into_iter().enumerate() {
        let after: u64 = sizes[i + 1..].iter().sum();
        let (b, s) = ship_file(
            shared,
            tx,
            &name,
            kind,
            page_size,
            theirs.get(&name).map(Vec::as_slice),
            Some(after),
        )?;
        bytes += b;
        skipped += s;
        sent.insert(name);
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

fn blocking_send(tx: &Outbox, kind: Kind) -> Result<(), Status> {
    tx.blocking_send(msg(kind))
        .map_err(|_| Status::cancelled("standby went away"))
}

/// Ships one file in stable, page-aligned chunks. Pages whose digest
/// matches the standby's copy (`theirs`, during a rebase) are sent as
/// FileSame instead of bytes. `after`: bytes of the files that follow it in
/// this base copy (for the standby's progress); `None` for a file that
/// appeared after the copy. Returns (bytes sent, skipped).
fn ship_file(
    shared: &Shared,
    tx: &Outbox,
    name: &str,
    kind: FileKind,
    page_size: u32,
    theirs: Option<&[u8]>,
    after: Option<u64>,
) -> Result<(u64, u64), Status> {
    let (in_base, after) = (after.is_some(), after.unwrap_or(0));
    let path = shared.layout.home.join(name);
    let file = match File::open(&path) {
        Ok(f) => f,
        // Removed since it was listed: nothing to ship.
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok((0, 0)),
        Err(e) => return Err(io_status(&format!("open {}", path.display()), e)),
    };
    let size = file.metadata().map_err(|e| io_status("stat", e))?.len();
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
    let mut second_read = Vec::new();
    while offset < size {
        let want = chunk_len.min((size - offset) as usize);
        let data = read_stable_pages(&file, offset, want, page, &mut second_read)
            .map_err(|e| io_status(&format!("read {name}"), e))?;
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
                blocking_send(
                    tx,
                    Kind::FileChunk(FileChunk {
                        name: name.to_owned(),
                        offset: run_offset,
                        blake3: digest(shared, &bytes),
                        data: bytes,
                    }),
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

/// Walks the newest log file now (not the watcher's possibly older view).
fn current_log_end(shared: &Shared) -> io::Result<LogPosition> {
    let files = shared.layout.log_files().map_err(io::Error::other)?;
    let Some(&newest) = files.last() else {
        return Ok(LogPosition::ZERO);
    };
    let w = walk_file(&File::open(shared.layout.log_path(newest))?, None)?;
    Ok(LogPosition::new(newest, w.end))
}

async fn heartbeats(shared: &Shared, tx: &Outbox) {
    let mut tick = tokio::time::interval(shared.heartbeat_interval);
    loop {
        tick.tick().await;
        let end = shared.log_end.borrow().end;
        let hb = Heartbeat {
            primary_end: Some(end.into()),
            unix_ms: tandem_shared::now_unix_ms(),
        };
        if send(tx, Kind::Heartbeat(hb)).await.is_err() {
            return;
        }
    }
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
}
