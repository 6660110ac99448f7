//! `tandem-primary`: runs beside the production environment and streams its
//! database files and its log, as it grows, to standbys.
//!
//! - [`identity`]: the environment identity and epoch, and the lock that
//!   keeps a second primary off the same environment.
//! - [`log_watch`]: follows the end of the verified log.
//! - [`session`]: one standby's stream: base copy, log shipping, acks.
//! - [`server`]: the gRPC service and the listener.
//! - [`switchover`]: may a standby take over now (`PrepareSwitchover`).

pub mod identity;
pub mod log_watch;
pub mod metrics;
pub mod retention;
pub mod server;
pub mod session;
pub mod switchover;
