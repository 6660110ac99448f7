//! `tandem-standby`: keeps a pristine, durable mirror of a primary's
//! environment, reports how far behind it is, and is promoted on command.
//!
//! Public (used by the binary, `src/main.rs`):
//! - [`state`]: the standby directory, its durable state and its lock.
//! - [`follow`]: the connection loop, a pipeline: receive, apply and fsync,
//!   acknowledge; status published on a watch channel (`follow/`).
//! - [`status`]: what `tandem-standby status` reports (`status/`).
//! - [`readiness`]: proves the mirror recovers, on a clone.
//! - [`promote`]: turns the mirror into the live environment (`promote/`).
//! - [`scrub`]: proves the mirror still holds what was written; heals it.
//! - [`failover`]: with `--etcd`, publishes this standby in etcd and
//!   decides when it promotes by itself.
//! - [`handover`]: with `--etcd`, the target's side of a planned
//!   switchover (`tandem-standby switchover`).
//! - [`switchover`]: the `switchover` command: asks for a planned
//!   switchover in etcd and waits for its outcome.
//! - [`archive`]: backups of the mirror, their verification and restore.
//! - [`archive_hold`]: the log the archive still needs, kept from removal.
//!
//! Private to the crate:
//! - [`mirror`]: applies what the primary sends, after checking it; its
//!   parts (log writer, file receiver, swap, ...) live under `mirror/`.
//! - [`metrics`]: the metrics page of a running standby.
//! - [`rejoin`]: what `run --rejoin` discards, set aside before the swap.
//! - [`timing`]: where the standby's part of commit → durable goes.

pub mod archive;
pub mod archive_hold;
pub mod failover;
pub mod follow;
pub mod handover;
pub(crate) mod metrics;
pub(crate) mod mirror;
pub mod promote;
pub mod readiness;
pub(crate) mod rejoin;
pub mod scrub;
pub mod state;
pub mod status;
pub mod switchover;
pub(crate) mod timing;
