//! `tandem-standby`: keeps a pristine, durable mirror of a primary's
//! environment, reports how far behind it is, and is promoted on command.
//!
//! - [`state`]: the standby directory, its durable state and its lock.
//! - [`mirror`]: applies what the primary sends, after checking it.
//! - [`follow`]: the connection loop: hello, receive, fsync, acknowledge.
//! - [`status`]: what `tandem-standby status` reports.
//! - [`metrics`]: the metrics page of a running standby.
//! - [`archive`]: backups of the mirror, their verification and restore.

pub mod archive;
pub mod archive_hold;
pub mod follow;
pub mod metrics;
pub mod mirror;
pub mod promote;
pub mod readiness;
pub mod state;
pub mod status;
