//! What `.tandem/etcd.json` holds: the last etcd round of `run --etcd`
//! ([`crate::failover`]), read without a lock by `status` and the metrics
//! page.

use crate::state::StandbyDir;
use serde::{Deserialize, Serialize};
use tandem_coord::records::FailoverRecord;

/// Where each round's outcome is written.
pub const STATUS_FILE: &str = "etcd.json";

/// What `.tandem/etcd.json` holds.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
#[serde(default)]
pub struct RoundStatus {
    pub cluster: String,
    pub name: String,
    pub leader: Option<String>,
    pub leader_address: Option<String>,
    pub etcd_epoch: u64,
    pub lease_remaining_ms: u64,
    pub verdict: String,
    pub last_failover: Option<FailoverRecord>,
    pub error: Option<String>,
    /// The leader key moved to this standby (an election or a switchover)
    /// and its promotion then failed: the cluster needs an operator.
    pub promotion_failed: Option<String>,
    pub updated_unix_ms: u64,
}

/// The last round's state, read from the file directly (no lock taken), or
/// None when this standby never ran with etcd.
pub fn read_status(dir: &StandbyDir) -> Option<RoundStatus> {
    let b = std::fs::read(dir.meta().join(STATUS_FILE)).ok()?;
    serde_json::from_slice(&b).ok()
}

/// Text for `status`: the etcd lines.
pub fn render_status(r: &RoundStatus, now_ms: u64) -> String {
    let ago = |ms: u64| format!("{:.1} s ago", now_ms.saturating_sub(ms) as f64 / 1000.0);
    let mut out = format!(
        "etcd:         cluster {} as {}, verdict {} (updated {})\netcd leader:  {} at {} (etcd epoch {}), lease remaining {:.1} s\n",
        r.cluster,
        r.name,
        if r.verdict.is_empty() { "-" } else { &r.verdict },
        ago(r.updated_unix_ms),
        r.leader.as_deref().unwrap_or("none"),
        r.leader_address.as_deref().unwrap_or("-"),
        r.etcd_epoch,
        r.lease_remaining_ms as f64 / 1000.0,
    );
    if let Some(f) = &r.last_failover {
        out.push_str(&format!(
            "last {}: to {} (epoch {}) {}: {}\n",
            f.kind,
            f.name,
            f.epoch,
            ago(f.unix_ms),
            f.reason
        ));
    }
    if let Some(e) = &r.error {
        out.push_str(&format!("etcd error:   {e}\n"));
    }
    if let Some(e) = &r.promotion_failed {
        out.push_str(&format!(
            "PROMOTION FAILED: {e}\n  the leader key was given up; etcd's epoch moved, so no other standby can win an election: see README \"Automatic failover with etcd\" for what to do\n"
        ));
    }
    out
}
