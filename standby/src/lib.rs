//! `tandem-standby`: keeps a pristine, durable mirror of a primary's
//! environment, reports how far behind it is, and is promoted on command.
//!
//! - [`state`]: the standby directory, its durable state and its lock.
//! - [`mirror`]: applies what the primary sends, after checking it.
//! - [`follow`]: the connection loop, a pipeline: receive, apply and fsync,
//!   acknowledge; status published on a watch channel.
//! - [`status`]: what `tandem-standby status` reports.

pub mod archive;
pub mod archive_hold;
pub mod follow;
pub mod mirror;
pub mod promote;
pub mod readiness;
pub mod restore;
pub mod state;
pub mod status;
