//! `PrepareSwitchover`: may a standby take over now without splitting the
//! brain? Answered from facts, not from a quiet log: which processes have
//! the environment open (an application that maps its regions can still
//! commit), the verified end of log, and whether the asking standby holds
//! all of it.

use crate::context::Shared;
use std::fs::File;
use tandem_shared::envlayout::EnvLayout;
use tandem_shared::envusers::env_users_but_my_children;
use tandem_shared::logfile::walk_file;
use tandem_shared::wire::{SwitchoverReply, SwitchoverRequest};
use tandem_shared::LogPosition;
use tonic::Status;

/// The answer to one `PrepareSwitchover`. Changes nothing on the primary:
/// the standby decides, and asks again after it caught up.
pub async fn prepare(shared: &Shared, req: SwitchoverRequest) -> Result<SwitchoverReply, Status> {
    let home = shared.layout.home.clone();
    let users = tokio::task::spawn_blocking(move || env_users_but_my_children(&home))
        .await
        .map_err(|e| Status::internal(e.to_string()))?
        .map_err(|e| Status::internal(format!("cannot tell who has the environment open: {e}")))?;
    // Read after the users: with nobody left to write, this is the final
    // end. Walked now, because the watcher polls, and slower when idle: its
    // end can miss an application's last commits.
    let watched = shared.log_end.borrow().end;
    let layout = shared.layout.clone();
    let end = tokio::task::spawn_blocking(move || end_on_disk(&layout))
        .await
        .map_err(|e| Status::internal(e.to_string()))?
        .map_err(|e| Status::internal(format!("reading the end of the log: {e}")))?
        .max(watched);
    let durable: LogPosition = req.durable.map(Into::into).unwrap_or_default();
    let env_users: Vec<String> = users.iter().map(ToString::to_string).collect();
    let reason = if !env_users.is_empty() {
        format!(
            "the environment is still open by {}: an application there can still commit; stop it first",
            env_users.join(", ")
        )
    } else if durable != end {
        format!("the standby holds the log up to {durable}, the primary's ends at {end}")
    } else {
        String::new()
    };
    let safe = reason.is_empty();
    tracing::info!(standby = %req.standby_name, %durable, %end, users = ?env_users, safe, "switchover asked");
    Ok(SwitchoverReply {
        env_id: shared.identity.env_id.clone(),
        epoch: shared.identity.epoch,
        end: Some(end.into()),
        env_users,
        safe,
        reason,
    })
}

/// The verified end of the newest log file, walked now.
fn end_on_disk(layout: &EnvLayout) -> std::io::Result<LogPosition> {
    let files = layout.log_files().map_err(std::io::Error::other)?;
    let Some(&newest) = files.last() else {
        return Ok(LogPosition::ZERO);
    };
    let w = walk_file(&File::open(layout.log_path(newest))?, None)?;
    Ok(LogPosition::new(newest, w.end))
}
