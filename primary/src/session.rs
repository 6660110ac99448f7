//! One standby's stream. The standby says what it holds (`Hello`); the
//! session claims its name in the registry, decides where to start (see
//! [`crate::plan`]: continue, new base, or refuse), then runs three duties
//! side by side until the standby goes away or the primary stops:
//!
//! - the base copy ([`crate::base_copy`]), on a blocking thread;
//! - the log: every verified record from the base boundary or the resume
//!   point on, following the live tail;
//! - heartbeats carrying the primary's end of log, for lag.
//!
//! All three feed one bounded channel, so a slow standby slows the readers
//! instead of filling memory. A session ends by joining all three; the
//! registry's guard marks the standby disconnected when the last of them
//! lets go of it.

use crate::base_copy::{base_boundary, ship_base, BaseCommand};
use crate::context::Shared;
use crate::log_watch::LogEnd;
use crate::outbox::{io_status, send, Outbox};
use crate::plan::{Plan, Refusal};
use crate::registry::SessionGuard;
use std::collections::{BTreeMap, BTreeSet};
use std::fs::File;
use std::io;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::{Duration, Instant};
use tandem_shared::latency::Stamps;
use tandem_shared::logfile::read_verified;
use tandem_shared::wire::{
    primary_message::Kind, standby_message, BaseStart, Heartbeat, Hello, LogChunk, StandbyMessage,
    Welcome,
};
use tandem_shared::{LogPosition, MAX_CHUNK};
use tokio::sync::watch;
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;
use tonic::{Status, Streaming};

/// How long a standby has to say Hello after connecting.
const HELLO_TIMEOUT: Duration = Duration::from_secs(10);

// Long function: a session's life in order (Hello, rejoin digests, start, the loop over the
// standby's messages, the end), each step one call.
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
    let guard = match shared.registry.claim(&name, &peer) {
        Ok(g) => Arc::new(g),
        Err(e) => {
            tracing::error!(standby = %name, %peer, error = %e, "refusing a standby: its name is in use");
            let _ = tx.send(Err(Status::already_exists(e.to_string()))).await;
            return;
        }
    };
    let rejoin = if hello.rejoin {
        match crate::rejoin::rejoin_digests(&mut inbound).await {
            Ok(d) => d,
            Err(status) => {
                tracing::warn!(standby = %name, %peer, error = %status, "a rejoining standby did not send its page digests");
                let _ = tx.send(Err(status)).await;
                return;
            }
        }
    } else {
        crate::rejoin::RejoinDigests::default()
    };
    if let Some(why) = shared.fenced() {
        let _ = tx
            .send(Err(Status::unavailable(format!(
                "this primary is fenced and ships nothing: {why}"
            ))))
            .await;
        return;
    }
    let started = start(&shared, &guard, &peer, &hello, &tx, rejoin).await;
    // Refusals the operator must act on (fenced, diverged, another
    // environment), not a stream that failed on its way.
    let refused = started
        .as_ref()
        .err()
        .filter(|s| s.code() == tonic::Code::FailedPrecondition)
        .map(|s| s.message().to_owned());
    shared
        .registry
        .hello_seen(&name, &peer, hello.epoch, refused.as_deref());
    match started {
        Ok(duties) => {
            let fenced = tokio::select! {
                _ = follow_acks(&shared, &guard, &mut inbound, &duties) => None,
                _ = shared.until_fenced() => shared.fenced(),
            };
            duties.join().await;
            if let Some(why) = fenced {
                tracing::error!(standby = %name, reason = %why, "fenced: ending the standby's stream");
                let _ = tx
                    .send(Err(Status::unavailable(format!(
                        "this primary fenced itself: {why}"
                    ))))
                    .await;
            }
            if shared.stop.is_cancelled() {
                let _ = tx
                    .send(Err(Status::unavailable("the primary is shutting down")))
                    .await;
            }
        }
        Err(status) => {
            let _ = tx.send(Err(status)).await;
        }
    }
    drop(guard);
    tracing::info!(standby = %name, %peer, "standby disconnected");
}

/// The running duties of one session.
struct Duties {
    log: JoinHandle<()>,
    heartbeats: JoinHandle<()>,
    base: JoinHandle<()>,
    commands: std::sync::mpsc::Sender<BaseCommand>,
    /// Stops the base copy between chunks (it runs on a blocking thread,
    /// which `abort` cannot stop).
    stop: CancellationToken,
    /// Ends of the log chunks sent, when they went out, for the time until
    /// the standby's ack covers them.
    sent: Arc<Stamps>,
}

impl Duties {
    async fn join(self) {
        self.log.abort();
        self.heartbeats.abort();
        self.stop.cancel();
        drop(self.commands);
        for t in [self.log, self.heartbeats, self.base] {
            if let Err(e) = t.await {
                if e.is_panic() {
                    tracing::error!(error = %e, "a session task panicked");
                }
            }
        }
    }
}

/// Checks the Hello, decides where to start, and starts the duties.
async fn start(
    shared: &Arc<Shared>,
    guard: &Arc<SessionGuard>,
    peer: &str,
    hello: &Hello,
    tx: &Outbox,
    rejoin: crate::rejoin::RejoinDigests,
) -> Result<Duties, Status> {
    let name = guard.name();
    check_hello(shared, name, peer, hello)?;
    let plan = plan_or_refuse(shared, name, peer, hello)?;
    let start = match plan {
        Plan::Resume { from, prev } => {
            tracing::info!(standby = %name, %peer, %from, "standby connected; resuming");
            send(tx, welcome(shared, hello, tx, true)).await?;
            Start {
                base_id: hello.base_id.clone(),
                from,
                prev,
                complete: hello.complete_files.iter().cloned().collect(),
                files_done: hello.base_files_done,
                theirs: rejoin.pages,
            }
        }
        plan => new_base(shared, name, peer, hello, tx, plan, rejoin).await?,
    };
    shared.counters.sessions.fetch_add(1, Ordering::Relaxed);
    tokio::task::block_in_place(|| guard.started(&start.base_id, start.from));
    if start.files_done && hello.consistent_at.is_some_and(|c| start.from >= c.into()) {
        // A resumed standby with a complete base proved (the digest of its
        // last record) that it holds this log up to `from` durably, past
        // the point where its base became consistent: that counts for
        // commit waiters, though it sends no ack for it.
        guard.holds(start.from);
    }
    Ok(spawn_duties(shared, guard, tx, start))
}

/// Where a session starts: the base it continues or begins, and the log.
struct Start {
    base_id: String,
    from: LogPosition,
    prev: Option<u32>,
    /// Files of the base the standby holds complete.
    complete: BTreeSet<String>,
    files_done: bool,
    /// The standby's page digests, for a rejoin's page delta.
    theirs: BTreeMap<String, Vec<u8>>,
}

/// Refuses a Hello this primary must not serve: another protocol, a
/// standby that has seen a newer epoch (this primary is fenced), another
/// environment.
fn check_hello(shared: &Shared, name: &str, peer: &str, hello: &Hello) -> Result<(), Status> {
    let id = &shared.identity;
    if hello.protocol_version != tandem_shared::wire::PROTOCOL_VERSION {
        return Err(Status::failed_precondition(format!(
            "protocol version {} is not supported (this primary speaks {})",
            hello.protocol_version,
            tandem_shared::wire::PROTOCOL_VERSION
        )));
    }
    if hello.epoch > id.epoch {
        shared
            .counters
            .fenced_hellos
            .fetch_add(1, Ordering::Relaxed);
        tracing::error!(
            standby = %name, %peer, standby_epoch = hello.epoch, our_epoch = id.epoch,
            "FENCED: this standby has seen epoch {} but this primary is at epoch {}: a standby was promoted past \
             this primary. Not shipping to it. Stop the application on this machine; it is no longer the primary",
            hello.epoch, id.epoch
        );
        return Err(Status::failed_precondition(format!(
            "FENCED: the standby has seen epoch {} but this primary is at epoch {}: a newer primary exists and \
             this one is fenced. Nothing was sent. Point the standby at the current primary",
            hello.epoch, id.epoch
        )));
    }
    if !hello.env_id.is_empty() && hello.env_id != id.env_id {
        return Err(Status::failed_precondition(format!(
            "environment mismatch: the standby's directory belongs to environment {}, this primary serves {}",
            hello.env_id, id.env_id
        )));
    }
    Ok(())
}

/// The plan for this standby, or the refusal, logged.
fn plan_or_refuse(shared: &Shared, name: &str, peer: &str, hello: &Hello) -> Result<Plan, Status> {
    let id = &shared.identity;
    match tokio::task::block_in_place(|| {
        crate::plan::plan(&shared.layout, hello, id.epoch, &id.history)
    }) {
        Ok(p) => Ok(p),
        Err(r) => {
            match &r {
                Refusal::Diverged(d) => tracing::error!(
                    standby = %name, %peer, standby_end = %d.standby, primary_end = %d.primary_end,
                    beyond_bytes = ?d.beyond, "DIVERGED: {d}"
                ),
                Refusal::Unavailable(why) => tracing::error!(
                    standby = %name, %peer, error = %why,
                    "cannot read the log to plan this standby's stream; refusing for now (it retries), no new base"
                ),
                Refusal::HistoryUnknown { .. } => {
                    tracing::error!(standby = %name, %peer, "DIVERGED: {r}")
                }
            }
            Err(r.into())
        }
    }
}

/// A new base (or a rejoin's page-delta base): the Welcome, then the
/// BaseStart at the base boundary.
async fn new_base(
    shared: &Arc<Shared>,
    name: &str,
    peer: &str,
    hello: &Hello,
    tx: &Outbox,
    plan: Plan,
    rejoin: crate::rejoin::RejoinDigests,
) -> Result<Start, Status> {
    let mut theirs = Some(rejoin.pages);
    let (reason, discard_after) = match plan {
        Plan::Rejoin {
            reason,
            discard_after,
        } => {
            tracing::warn!(standby = %name, %peer, %discard_after, "REJOIN: {reason}; sending a page-delta new base");
            (reason, Some(discard_after.into()))
        }
        Plan::NewBase { reason } => {
            // Digests are only for a rejoin's page delta.
            theirs = None;
            (reason, None)
        }
        Plan::Resume { .. } => unreachable!("start resumes; it calls new_base for the others"),
    };
    let mut from = tokio::task::block_in_place(|| base_boundary(shared))?;
    if discard_after.is_some() {
        // The standby finds where the histories part by comparing
        // its log with this one: start at the newest file both share.
        let shared_file = tokio::task::block_in_place(|| {
            crate::rejoin::newest_shared_log_file(&shared.layout, &rejoin.log_files, from)
        });
        from = LogPosition::new(shared_file, 0);
    }
    let base_id = crate::identity::random_id();
    tracing::info!(standby = %name, %peer, %reason, base = %base_id, boundary = %from, "standby connected; starting a new base");
    send(tx, welcome(shared, hello, tx, false)).await?;
    send(
        tx,
        Kind::BaseStart(BaseStart {
            base_id: base_id.clone(),
            log_start: Some(from.into()),
            reason,
            rebase: false,
            discard_after,
        }),
    )
    .await?;
    Ok(Start {
        base_id,
        from,
        prev: None,
        complete: BTreeSet::new(),
        files_done: false,
        theirs: theirs.unwrap_or_default(),
    })
}

/// Starts the session's duties: the log, the base, the heartbeats.
fn spawn_duties(
    shared: &Arc<Shared>,
    guard: &Arc<SessionGuard>,
    tx: &Outbox,
    start: Start,
) -> Duties {
    let Start {
        from,
        prev,
        complete,
        files_done,
        theirs,
        ..
    } = start;
    let (commands, base_commands) = std::sync::mpsc::channel();
    let stop = shared.stop.child_token();
    let sent = Arc::new(Stamps::default());
    let log = {
        let (shared, tx, sent) = (shared.clone(), tx.clone(), sent.clone());
        let name = guard.name().to_owned();
        tokio::spawn(async move {
            if let Err(status) = ship_log(&shared, &tx, &name, from, prev, &sent).await {
                let _ = tx.send(Err(status)).await;
            }
        })
    };
    let base = {
        let (shared, tx, guard, stop) = (shared.clone(), tx.clone(), guard.clone(), stop.clone());
        tokio::task::spawn_blocking(move || {
            let r = ship_base(
                &shared,
                &tx,
                &guard,
                &stop,
                complete,
                files_done,
                &theirs,
                base_commands,
            );
            if let Err(status) = r {
                let _ = tx.blocking_send(Err(status));
            }
        })
    };
    let heartbeats = {
        let (shared, tx) = (shared.clone(), tx.clone());
        tokio::spawn(async move { heartbeats(&shared, &tx).await })
    };
    Duties {
        log,
        heartbeats,
        base,
        commands,
        stop,
        sent,
    }
}

/// The Welcome, which also fixes the session's chunk encoding.
fn welcome(shared: &Shared, hello: &Hello, tx: &Outbox, resume: bool) -> Kind {
    let encoding = shared.compression.choose(&hello.accept_encodings);
    tx.negotiated(encoding);
    tx.set_page_checked(hello.page_checked_chunks);
    Kind::Welcome(Welcome {
        encoding: encoding.to_owned(),
        env_id: shared.identity.env_id.clone(),
        epoch: shared.identity.epoch,
        log_dir: tandem_shared::envlayout::rel_name(&shared.layout.log_dir_rel()),
        resume,
        history: shared.identity.history.iter().map(Into::into).collect(),
    })
}

async fn follow_acks(
    shared: &Shared,
    guard: &SessionGuard,
    inbound: &mut Streaming<StandbyMessage>,
    duties: &Duties,
) {
    let commands = &duties.commands;
    let name = guard.name();
    loop {
        let next = tokio::select! {
            m = inbound.message() => m,
            _ = shared.stop.cancelled() => return,
        };
        match next {
            Ok(Some(StandbyMessage {
                kind: Some(standby_message::Kind::Ack(ack)),
            })) => {
                if let Some(p) = ack.durable {
                    let now = Instant::now();
                    let p: LogPosition = p.into();
                    guard.acked(p, ack.archived.map(Into::into), ack.promotable);
                    note_ack(shared, &duties.sent, p, now);
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

/// Times an ack that covers `p`, received at `now`: from the sends it
/// covers, and (first ack of any standby) from the watcher's stamps.
fn note_ack(shared: &Shared, sent: &Stamps, p: LogPosition, now: Instant) {
    let t = &shared.timing;
    sent.reached(p, now, &t.send_to_ack);
    t.noticed.reached(p, now, &t.notice_to_ack);
    shared.waits.acked.set(p, now);
}

/// Ships the log from `pos` on to standby `name`, following the live
/// tail: reads verified records, sends them, waits for the watcher; its
/// position and last record are the loop's state. Each chunk's end goes
/// into `sent` as it goes out. The tests' hold point `hold-ship` cuts the
/// link to one standby before a chunk (nothing without `test-hooks`).
async fn ship_log(
    shared: &Shared,
    tx: &Outbox,
    name: &str,
    mut pos: LogPosition,
    mut prev: Option<u32>,
    sent: &Stamps,
) -> Result<(), Status> {
    let mut ends = shared.log_end.clone();
    let mut open: Option<(u32, File, u64)> = None;
    let mut unreadable_header = 0u32;
    loop {
        if open.as_ref().map(|o| o.0) != Some(pos.file) {
            match open_log(shared, &mut ends, pos.file).await? {
                Some(o) => open = Some(o),
                None => continue,
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
        check_header(shared, pos, &r, &mut unreadable_header)?;
        if !r.bytes.is_empty() {
            let data = bytes::Bytes::from(r.bytes);
            shared
                .counters
                .log_bytes
                .fetch_add(data.len() as u64, Ordering::Relaxed);
            let chunk = LogChunk {
                file: pos.file,
                offset: pos.offset,
                blake3: shared.digest(&data),
                data,
                file_size: *size,
                ..Default::default()
            };
            tandem_coord::test_hook::hold("hold-ship", name, pos).await;
            send(tx, Kind::LogChunk(chunk)).await?;
            let (now, end) = (Instant::now(), LogPosition::new(pos.file, r.walk.end));
            let t = &shared.timing;
            t.noticed.observe_between(pos, end, now, &t.notice_to_send);
            sent.stamp(end, now);
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

/// Opens log file `file` for shipping, with its size; `None` when it does
/// not exist yet (after waiting a moment for the watcher). Missing while a
/// newer file exists is a log gap: a new base is needed.
async fn open_log(
    shared: &Shared,
    ends: &mut watch::Receiver<LogEnd>,
    file: u32,
) -> Result<Option<(u32, File, u64)>, Status> {
    match File::open(shared.layout.log_path(file)) {
        Ok(f) => {
            let size = f
                .metadata()
                .map_err(|e| io_status("stat log file", e))?
                .len();
            Ok(Some((file, f, size)))
        }
        Err(e) if e.kind() == io::ErrorKind::NotFound => {
            let newest = shared
                .layout
                .log_files()
                .map_err(|e| Status::internal(e.to_string()))?
                .last()
                .copied();
            if newest.is_some_and(|n| n > file) {
                let name = shared.layout.log_name(file);
                tracing::error!(file = %name, "log gap: a log file was removed before it was shipped");
                return Err(Status::data_loss(format!(
                    "log gap: {name} was removed from the primary before it was shipped; a new base is needed"
                )));
            }
            wait_for_log(ends).await;
            Ok(None)
        }
        Err(e) => Err(io_status("open log file", e)),
    }
}

/// A file whose header stays unreadable (not a moment's torn read: it
/// does not verify for over a second, `unreadable` reads in a row) is not
/// a log Tandem can ship, e.g. an encrypted environment's.
fn check_header(
    shared: &Shared,
    pos: LogPosition,
    r: &tandem_shared::logfile::VerifiedRecords,
    unreadable: &mut u32,
) -> Result<(), Status> {
    *unreadable = match r.walk.stop {
        tandem_shared::logfile::WalkStop::Invalid(_) if pos.offset == 0 && r.bytes.is_empty() => {
            *unreadable + 1
        }
        _ => 0,
    };
    if *unreadable > 50 {
        if let tandem_shared::logfile::WalkStop::Invalid(why) = r.walk.stop {
            let name = shared.layout.log_name(pos.file);
            tracing::error!(file = %name, why, "cannot read the log: encrypted or not a Berkeley DB 5.3 log");
            return Err(Status::failed_precondition(format!(
                "{name} does not start with a Berkeley DB 5.3 log header ({why}); encrypted environments are not supported"
            )));
        }
    }
    Ok(())
}

/// Waits for the watcher to see new log, or a little while at most (the
/// watcher may be behind a file switch this session already saw).
async fn wait_for_log(ends: &mut watch::Receiver<LogEnd>) {
    let _ = tokio::time::timeout(Duration::from_millis(20), ends.changed()).await;
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
