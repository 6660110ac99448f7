//! `tandem-standby`: keeps a pristine, durable mirror of a primary's
//! environment, reports how far behind it is, and is promoted on command.
//!
//! - [`state`]: the standby directory, its durable state and its lock.
//! - [`mirror`]: applies what the primary sends, after checking it (a
//!   facade over [`logwriter`], [`receiver`] and [`swap`]).
//! - [`follow`]: the connection loop, a pipeline: receive, apply and fsync,
//!   acknowledge; status published on a watch channel.
//! - [`status`]: what `tandem-standby status` reports.
//! - [`scrub`]: proves the mirror still holds what was written; heals it.
//! - [`metrics`]: the metrics page of a running standby.
//! - [`rejoin`]: what `run --rejoin` discards, set aside before the swap.
//! - [`archive`]: backups of the mirror, their verification and restore.

pub mod apply_error;
pub mod archive;
pub mod archive_hold;
mod base_files;
mod dirs;
pub mod follow;
pub mod logwriter;
pub mod metrics;
pub mod mirror;
pub mod promote;
pub mod readiness;
pub mod receiver;
pub mod rejoin;
pub mod scrub;
pub mod state;
pub mod status;
pub mod swap;
pub mod write_behind;
