//! The channel a session's duties write to, and what they write: every
//! message to one standby goes through one bounded channel, so a slow
//! standby slows the readers instead of filling memory.

use std::io;
use tandem_shared::wire::{primary_message::Kind, PrimaryMessage};
use tokio::sync::mpsc;
use tonic::Status;

pub type Outbox = mpsc::Sender<Result<PrimaryMessage, Status>>;

pub fn msg(kind: Kind) -> Result<PrimaryMessage, Status> {
    Ok(PrimaryMessage { kind: Some(kind) })
}

pub async fn send(tx: &Outbox, kind: Kind) -> Result<(), Status> {
    tx.send(msg(kind))
        .await
        .map_err(|_| Status::cancelled("standby went away"))
}

/// From a blocking thread (the base copy).
pub fn blocking_send(tx: &Outbox, kind: Kind) -> Result<(), Status> {
    tx.blocking_send(msg(kind))
        .map_err(|_| Status::cancelled("standby went away"))
}

pub fn io_status(what: &str, e: io::Error) -> Status {
    Status::internal(format!("{what}: {e}"))
}
