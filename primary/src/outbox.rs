//! The channel a session's duties write to, and what they write: every
//! message to one standby goes through one bounded channel, so a slow
//! standby slows the readers instead of filling memory.
//!
//! Chunks are encoded here, on their way in ([`tandem_shared::compress`]):
//! by the thread that read them (the base copy's, the log shipper's), so
//! compression runs beside the other duties, and with the channel's fill at
//! hand, which tells the encoder whether the link or the CPU is the
//! bottleneck.

use std::io;
use std::ops::Deref;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, OnceLock};
use tandem_shared::compress::{Encoder, QueueFill, WireStats};
use tandem_shared::wire::{primary_message::Kind, PrimaryMessage};
use tokio::sync::mpsc;
use tonic::Status;

pub type Sender = mpsc::Sender<Result<PrimaryMessage, Status>>;

/// One session's channel and the encoder its Welcome agreed on.
#[derive(Clone)]
pub struct Outbox {
    tx: Sender,
    /// Set once, when the session answers the Hello; until then (and for
    /// a standby that offered nothing) chunks go as they are.
    encoder: Arc<OnceLock<Encoder>>,
    stats: Arc<WireStats>,
    /// The standby checks file chunks by their pages (Hello.page_checked_chunks).
    page_checked: Arc<AtomicBool>,
}

impl Outbox {
    pub fn new(tx: Sender, stats: Arc<WireStats>) -> Self {
        Self {
            tx,
            encoder: Arc::new(OnceLock::new()),
            stats,
            page_checked: Arc::new(AtomicBool::new(false)),
        }
    }

    /// What the Hello said: whether file chunks may carry `pages_blake3`.
    pub fn set_page_checked(&self, yes: bool) {
        self.page_checked.store(yes, Ordering::Relaxed);
    }

    pub fn page_checked(&self) -> bool {
        self.page_checked.load(Ordering::Relaxed)
    }

    /// Fixes the session's encoding ("" = none), as named in the Welcome.
    pub fn negotiated(&self, encoding: &str) {
        let _ = self.encoder.set(Encoder::new(encoding, self.stats.clone()));
    }

    fn encode(&self, kind: Kind) -> Kind {
        match self.encoder.get() {
            Some(e) => {
                let fill = QueueFill::of(self.tx.capacity(), self.tx.max_capacity());
                e.encode_kind(kind, fill)
            }
            None => kind,
        }
    }
}

impl Deref for Outbox {
    type Target = Sender;

    fn deref(&self) -> &Sender {
        &self.tx
    }
}

pub fn msg(kind: Kind) -> Result<PrimaryMessage, Status> {
    Ok(PrimaryMessage { kind: Some(kind) })
}

pub async fn send(tx: &Outbox, kind: Kind) -> Result<(), Status> {
    // zstd on a megabyte takes milliseconds: off the async worker. A
    // small chunk (the live tail's few records) takes microseconds, less
    // than handing the worker over would.
    let len = match &kind {
        Kind::FileChunk(c) => c.data.len(),
        Kind::LogChunk(c) => c.data.len(),
        _ => 0,
    };
    let kind = if len >= 64 << 10 {
        tokio::task::block_in_place(|| tx.encode(kind))
    } else {
        tx.encode(kind)
    };
    tx.send(msg(kind))
        .await
        .map_err(|_| Status::cancelled("standby went away"))
}

/// From a blocking thread (the base copy).
pub fn blocking_send(tx: &Outbox, kind: Kind) -> Result<(), Status> {
    let kind = tx.encode(kind);
    tx.blocking_send(msg(kind))
        .map_err(|_| Status::cancelled("standby went away"))
}

pub fn io_status(what: &str, e: io::Error) -> Status {
    Status::internal(format!("{what}: {e}"))
}
