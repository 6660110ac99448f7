//! One connection to the primary, as a pipeline:
//!
//! ```text
//! network ─ reader ─(bounded queue)─ applier ─(watch: durable)─ acker ─ network
//! ```
//!
//! The reader owns the receiving half: it takes messages off the stream,
//! notes the contact (the primary's end, when it was last heard) and queues
//! them; no message for `primary_silence` ends the session as "no word from
//! the primary", so a cut network is noticed even when TCP never says so.
//! The applier (a blocking task that owns the mirror) applies, fsyncs and
//! publishes the durable position; the acker sends an Ack for each position
//! the applier published, never for one it did not make durable. When the
//! reader ends, for whatever reason, it closes the queue; the applier drains
//! it, fsyncs and hands the mirror back.

use super::applier::{self, Applier};
use super::session_error::{classify, retry, SessionError};
use super::{StandbyConfig, StatusTx};
use crate::mirror::Mirror;
use crate::timing::FollowTiming;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};
use tandem_shared::wire::{
    primary_message::Kind, standby_message, Ack, PrimaryMessage, StandbyMessage,
};
use tandem_shared::{now_unix_ms, LogPosition};
use tokio::sync::{mpsc, watch};
use tokio_stream::wrappers::ReceiverStream;

/// Messages read but not yet applied. Small: back-pressure reaches the
/// primary through HTTP/2 flow control instead of memory filling here.
const QUEUE: usize = 32;
/// Messages to the primary (acks, page digests, requests) not yet sent.
const OUTBOX: usize = 64;
/// How long connecting (TCP and TLS) may take.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(5);

/// One connection, until it ends or `stop`. The mirror always comes back.
// Long function: assembles the pipeline in order (connect, Hello, Welcome, reader, applier,
// acker, their end) so every way a session ends is in one place.
pub(super) async fn run(
    cfg: &StandbyConfig,
    mut mirror: Mirror,
    status: &StatusTx,
    mut stop: watch::Receiver<bool>,
    timing: &Arc<FollowTiming>,
) -> (Mirror, Result<(), SessionError>) {
    let connect = tandem_shared::client::connect(
        &cfg.primary,
        cfg.server_name.as_deref(),
        &cfg.tls,
        CONNECT_TIMEOUT,
    );
    let mut client = tokio::select! {
        c = connect => match c {
            Ok(c) => c,
            Err(e) => return (mirror, Err(retry(e))),
        },
        _ = stop.wait_for(|s| *s) => return (mirror, Ok(())),
    };
    mirror.begin_session();
    let (out, out_rx) = mpsc::channel::<StandbyMessage>(OUTBOX);
    let hello = super::hello(cfg, &mirror);
    let asked_new_base = hello.new_base_request.clone();
    let said_durable: LogPosition = hello.durable.unwrap_or_default().into();
    let said_promotable = mirror.promotable();
    let rejoin = hello.rejoin;
    let _ = out.try_send(StandbyMessage {
        kind: Some(standby_message::Kind::Hello(hello)),
    });
    // A rejoin's Hello is followed by the digests of the mirror's pages,
    // ended by a RebaseRequest, for the primary's page delta.
    let digests = if rejoin {
        let read = || -> Result<_, String> {
            let pages = mirror.page_digests().map_err(|e| e.to_string())?;
            let logs =
                crate::rejoin::log_file_digests(&mirror.dir, &mirror.state, mirror.tail().durable)
                    .map_err(|e| e.to_string())?;
            Ok((pages, logs))
        };
        match tokio::task::block_in_place(read) {
            Ok((pages, logs)) => Some(send_digests(
                out.clone(),
                pages,
                logs,
                mirror_base_id(&mirror),
            )),
            Err(e) => {
                return (
                    mirror,
                    Err(retry(format!("reading the page digests for --rejoin: {e}"))),
                )
            }
        }
    } else {
        None
    };
    let opened = tokio::select! {
        r = client.stream(ReceiverStream::new(out_rx)) => r,
        _ = stop.wait_for(|s| *s) => return (mirror, Ok(())),
    };
    let inbound = match opened {
        Ok(r) => r.into_inner(),
        Err(status) => return (mirror, Err(classify(status))),
    };
    tracing::info!(primary = %cfg.primary, durable = %mirror.tail().durable, "connected to the primary");
    status.send_modify(|s| {
        s.connected = true;
        s.last_contact_unix_ms = now_unix_ms();
    });

    let (queue, queued) = mpsc::channel::<Kind>(QUEUE);
    let (durable_tx, durable_rx) = watch::channel::<Option<(LogPosition, bool)>>(None);
    let reader_done = Arc::new(AtomicBool::new(false));
    let applier = Applier {
        cfg: cfg.clone(),
        status: status.clone(),
        out: out.clone(),
        durable: durable_tx,
        reader_done: reader_done.clone(),
        asked_new_base,
        timing: timing.clone(),
    };
    let applying = tokio::task::spawn_blocking(move || applier.run(mirror, queued));
    let acker = tokio::spawn(acknowledge(
        out,
        (said_durable, said_promotable),
        durable_rx,
        status.subscribe(),
        timing.clone(),
    ));

    let read = read(cfg.primary_silence, inbound, &queue, status, stop, timing).await;
    // What was read and not made durable in this session is never acked.
    timing.received.clear();
    reader_done.store(true, Ordering::SeqCst);
    drop(queue);
    let (mirror, applied) = match applying.await {
        Ok(r) => r,
        // The applier panicked: the mirror is gone with it, and so is any
        // safe way to go on in this process.
        Err(e) if e.is_panic() => std::panic::resume_unwind(e.into_panic()),
        Err(e) => panic!("the applier was cancelled with the mirror: {e}"),
    };
    acker.abort();
    let _ = acker.await;
    if let Some(d) = digests {
        d.abort();
        let _ = d.await;
    }
    // The applier's error says why the stream was dropped; it wins.
    (mirror, applied.and(read))
}

fn mirror_base_id(mirror: &Mirror) -> String {
    mirror
        .state
        .base
        .as_ref()
        .map(|b| b.base_id.clone())
        .unwrap_or_default()
}

/// Sends a rejoin's page digests then the RebaseRequest that ends them,
/// as the stream takes them.
fn send_digests(
    out: mpsc::Sender<StandbyMessage>,
    digests: Vec<tandem_shared::wire::PageDigests>,
    log_files: Vec<tandem_shared::wire::LogFileDigest>,
    base_id: String,
) -> tokio::task::JoinHandle<()> {
    tokio::spawn(async move {
        let kinds = digests
            .into_iter()
            .map(standby_message::Kind::PageDigests)
            .chain(std::iter::once(standby_message::Kind::RebaseRequest(
                tandem_shared::wire::RebaseRequest {
                    base_id,
                    log_start: None,
                    log_files,
                },
            )));
        for kind in kinds {
            if out.send(StandbyMessage { kind: Some(kind) }).await.is_err() {
                return;
            }
        }
    })
}

/// Takes messages off the stream into the queue, under the silence deadline.
async fn read(
    silence: Duration,
    mut inbound: tonic::Streaming<PrimaryMessage>,
    queue: &mpsc::Sender<Kind>,
    status: &StatusTx,
    mut stop: watch::Receiver<bool>,
    timing: &FollowTiming,
) -> Result<(), SessionError> {
    loop {
        let next = tokio::select! {
            r = tokio::time::timeout(silence, inbound.message()) => r,
            _ = queue.closed() => return Ok(()),
            _ = stop.wait_for(|s| *s) => return Ok(()),
        };
        let kind = match next {
            Err(_) => {
                let why = format!(
                    "no word from the primary for {:.1} s (it sends heartbeats): the network or the primary is down",
                    silence.as_secs_f64()
                );
                tracing::warn!("{why}");
                return Err(retry(why));
            }
            Ok(Ok(Some(m))) => m.kind,
            Ok(Ok(None)) => return Ok(()),
            Ok(Err(status)) => return Err(classify(status)),
        };
        let Some(kind) = kind else { continue };
        if let Kind::LogChunk(c) = &kind {
            // An encoded chunk says how many log bytes it holds.
            let len = if c.raw_len > 0 {
                c.raw_len
            } else {
                c.data.len() as u64
            };
            let end = LogPosition::new(c.file, c.offset.saturating_add(len as u32));
            timing.received.stamp(end, Instant::now());
        }
        status.send_modify(|s| applier::note_contact(s, &kind));
        tokio::select! {
            r = queue.send(kind) => if r.is_err() { return Ok(()) },
            _ = stop.wait_for(|s| *s) => return Ok(()),
        }
    }
}

/// Sends an Ack for every durable position the applier publishes, and when
/// the continuous archive's position (in status) moves. Never before the
/// standby holds any log: an Ack of position zero would tell the primary's
/// retention to keep every file.
async fn acknowledge(
    out: mpsc::Sender<StandbyMessage>,
    said_in_hello: (LogPosition, bool),
    mut durable: watch::Receiver<Option<(LogPosition, bool)>>,
    mut status: watch::Receiver<crate::status::StandbyStatus>,
    timing: Arc<FollowTiming>,
) {
    // The Hello already told the primary what is durable: acknowledging it
    // again says nothing (and to a primary that sends nothing valid, the
    // standby acknowledges nothing). The archive position is not in the
    // Hello: the first ack of a session carries it whenever one is set;
    // nor is promotability: a base that completes without new log is
    // acknowledged at the same position to say so.
    let mut sent = Some((said_in_hello.0, None, said_in_hello.1));
    loop {
        tokio::select! {
            r = durable.changed() => if r.is_err() { return },
            r = status.changed() => if r.is_err() { return },
        }
        let Some((at, promotable)) = *durable.borrow_and_update() else {
            continue;
        };
        let archived = status.borrow_and_update().archived_lsn;
        let now = Some((at, archived, promotable));
        if at == LogPosition::ZERO || sent == now {
            continue;
        }
        let ack = Ack {
            durable: Some(at.into()),
            archived: archived.map(Into::into),
            promotable,
        };
        let msg = StandbyMessage {
            kind: Some(standby_message::Kind::Ack(ack)),
        };
        if out.send(msg).await.is_err() {
            return;
        }
        if sent.is_none_or(|(was, _, _)| was < at) {
            if let Some(t) = timing.published.at_or_beyond(at) {
                timing.durable_to_ack.observe(t.elapsed().as_secs_f64());
            }
        }
        sent = now;
    }
}
