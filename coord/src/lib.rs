//! `tandem-coord`: Tandem's side of etcd, for automatic failover. One job:
//! what lives in etcd and the rules around it. The primary and standby
//! binaries wire it in; nothing here touches an environment.
//!
//! - [`args`]: the `--etcd`, `--cluster` and `--advertise-url` flags both
//!   daemons share.
//! - [`records`]: the key layout under `/tandem/CLUSTER/` and the JSON
//!   records stored there.
//! - [`timing`]: the ttl, loop wait, retry timeout and fence margin, and
//!   the rule they must keep (checked at start).
//! - [`policy`]: who may promote: a pure function, tested exhaustively.
//! - [`cluster`]: the connection: one-request snapshots, the election
//!   transaction, leader-only updates, member records.
//! - [`lease`]: the lease keeper and the fencing clock.
//! - [`switchover`]: who a planned switchover goes to, and its refusals.
//! - [`resume`]: when a promotion etcd made but the standby did not
//!   finish may go on and serve.
//! - [`hook`]: running the operator's `--on-fence` and `--on-promote`.
//! - [`test_hook`]: pause points for the failover tests (feature `test-hooks`).

pub mod args;
pub mod cluster;
pub mod hook;
pub mod lease;
pub mod policy;
pub mod records;
pub mod resume;
pub mod switchover;
pub mod test_hook;
pub mod timing;

pub use cluster::{parse_endpoints, Cluster, Snapshot};
pub use timing::Timing;

use std::time::Duration;

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("bad {what} name {name:?}: use letters, digits, '-', '_' and '.' (1 to 128, not starting with '.')")]
    BadName { what: &'static str, name: String },
    #[error("no etcd endpoint given (--etcd URL,URL,...)")]
    NoEndpoints,
    #[error(transparent)]
    Timing(#[from] timing::TimingError),
    #[error("etcd: {0}")]
    Etcd(String),
    #[error("etcd did not answer within {0:?}")]
    Timeout(Duration),
    #[error("etcd holds a record Tandem cannot read at {key}: {error}")]
    BadRecord { key: String, error: String },
}
