//! `tandem-primary`: runs beside the production environment and streams its
//! database files and its log, as it grows, to standbys.
//!
//! Imports point down this list:
//!
//! - [`server`]: the top: starts everything, serves gRPC, shuts down in order.
//! - [`session`]: one standby's stream: plan, base copy, log shipping, acks;
//!   [`plan`] decides where a stream starts, [`base_copy`] sends database files,
//!   [`rejoin`] takes a rejoining standby's digests.
//! - [`switchover`]: may a standby take over now (`PrepareSwitchover`).
//! - [`wait`]: the wait socket, where applications wait until a commit is
//!   durable on K standbys.
//! - [`leadership`]: with `--etcd`, the leader key under a lease, and the
//!   fence when it cannot be kept.
//! - [`retention`]: which shipped logs may leave the production disk.
//! - [`metrics`]: Prometheus text and the status document.
//! - [`outbox`]: the bounded channel a session's duties write to.
//! - [`context`]: what all of the above share.
//! - [`registry`]: the standbys the primary knows (one owner of their records).
//! - [`log_watch`]: follows the end of the verified log.
//! - [`timing`]: where commit → durable spends its time, for the metrics.
//! - [`identity`]: the environment identity and epoch, and the lock that
//!   keeps a second primary off the same environment.

pub mod base_copy;
pub mod context;
pub mod identity;
pub mod leadership;
pub mod log_watch;
pub mod metrics;
pub mod outbox;
pub mod plan;
pub mod registry;
pub mod rejoin;
pub mod retention;
pub mod server;
pub mod session;
pub mod switchover;
pub mod timing;
pub mod wait;
