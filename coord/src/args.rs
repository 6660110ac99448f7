//! The etcd flags both daemons share, defined once: `--etcd`, `--cluster`
//! and `--advertise-url` (flattened into `tandem-primary run` and
//! `tandem-standby run`, beside each one's own etcd flags and the
//! `--etcd-*` timing of [`crate::timing::TimingArgs`]; each is also a TOML
//! key of the same name).

use serde::{Deserialize, Serialize};

/// Automatic failover (README "Automatic failover with etcd"). Without
/// --etcd a daemon behaves as if etcd did not exist.
#[derive(clap::Args, Serialize, Deserialize, Default, Clone, Debug)]
#[serde(rename_all = "kebab-case")]
pub struct ClusterArgs {
    /// etcd endpoints, comma-separated (e.g. http://10.0.0.1:2379,...).
    /// A primary holds the cluster's leader key under a lease, publishes
    /// its address, epoch and end of log, and fences when the lease cannot
    /// be renewed in time. A standby publishes its durable position,
    /// follows the primary etcd names, and promotes by itself when the
    /// leader key is gone and it is the most caught-up standby (ties by
    /// name) within --failover-max-lag-bytes and wins the election, or
    /// when a switchover to it is asked (it needs --promote-listen).
    /// Requires --cluster.
    #[arg(long, value_name = "URL,URL,...", requires = "cluster")]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub etcd: Option<String>,
    /// The cluster's name in etcd (its keys live under /tandem/NAME/).
    #[arg(long)]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub cluster: Option<String>,
    /// The URL standbys reach this primary at, published in etcd (on a
    /// standby: the promoted primary's) [default: https://ADDRESS, the
    /// address it serves on: --listen's bound address, or --promote-listen].
    #[arg(long)]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub advertise_url: Option<String>,
}
