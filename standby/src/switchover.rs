//! `tandem-standby switchover --etcd ... --cluster NAME [--to NAME]`: the
//! operator's side of a planned switchover through etcd. It changes
//! nothing itself but one request record; the target standby's `run
//! --etcd` carries it out ([`crate::handover`]).
//!
//! 1. One read of the cluster: a primary must serve, no switchover may be
//!    under way, and the target (named, or the most caught-up standby,
//!    ties by name) must be a publishing standby of the primary's epoch,
//!    recoverable and within the lag allowed ([`tandem_coord::switchover`]).
//!    etcd unreachable, or any refusal: nothing was written.
//! 2. The request is written in a transaction that holds only while the
//!    leader key is on the lease and the epoch read in step 1, under a
//!    lease of its own that ends by itself if this command dies.
//! 3. It waits until the leader key names the target as a serving primary
//!    (done), the target marks the request failed (its reason is printed;
//!    nothing changed), or the timeout: a request nobody claimed is then
//!    withdrawn.

use anyhow::{bail, Context, Result};
use serde::Serialize;
use std::time::{Duration, Instant};
use tandem_coord::records::{LeaderState, SwitchoverRecord, SwitchoverState};
use tandem_coord::{Cluster, Timing};

/// How often the command looks at the cluster while it waits.
const POLL: Duration = Duration::from_millis(100);

pub struct SwitchoverOptions {
    pub endpoints: Vec<String>,
    pub cluster: String,
    pub to: Option<String>,
    pub catch_up_timeout: Duration,
    pub timeout: Duration,
    pub max_lag_bytes: u64,
    pub timing: Timing,
}

/// The command refused before it wrote anything.
#[derive(Debug, thiserror::Error)]
#[error("switchover refused, nothing was changed: {0}")]
pub struct Refused(pub String);

#[derive(Debug, Clone, Serialize)]
pub struct SwitchoverReport {
    pub cluster: String,
    pub from: String,
    pub to: String,
    pub epoch: u64,
    pub address: Option<String>,
    /// From the command's start to the leader key naming the target.
    pub leader_moved_seconds: f64,
    /// From the command's start to the target serving as primary.
    pub total_seconds: f64,
}

impl std::fmt::Display for SwitchoverReport {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "switched over: {} (epoch {}) serves cluster {} at {}, in place of {}; leader key moved after {:.2} s, serving after {:.2} s",
            self.to,
            self.epoch,
            self.cluster,
            self.address.as_deref().unwrap_or("-"),
            self.from,
            self.leader_moved_seconds,
            self.total_seconds
        )
    }
}

pub async fn switchover(o: &SwitchoverOptions) -> Result<SwitchoverReport> {
    let started = Instant::now();
    let cluster = Cluster::connect(&o.endpoints, &o.cluster, o.timing)
        .await
        .context("cannot reach etcd; nothing was changed")?;
    let snap = cluster
        .snapshot()
        .await
        .context("cannot read the cluster from etcd; nothing was changed")?;
    let target = tandem_coord::switchover::choose(
        &snap.view,
        snap.switchover.as_ref(),
        o.to.as_deref(),
        o.max_lag_bytes,
    )
    .map_err(|r| Refused(r.to_string()))?;
    let from = target.leader.name.clone();
    let to = target.member.name.clone();
    let epoch = target.leader.epoch;
    // Long enough for the target to finish; it goes by itself after that.
    let lease = cluster
        .grant_secs(o.timeout.as_secs().max(1) as i64 + 10)
        .await
        .context("cannot reach etcd; nothing was changed")?;
    let now = tandem_shared::now_unix_ms();
    let record = SwitchoverRecord {
        id: format!("{lease:x}-{now}"),
        from: from.clone(),
        to: to.clone(),
        epoch,
        catch_up_timeout_ms: o.catch_up_timeout.as_millis() as u64,
        state: SwitchoverState::Requested,
        error: None,
        unix_ms: now,
    };
    let asked = cluster
        .request_switchover(&record, snap.leader_lease, snap.epoch_rev, lease)
        .await;
    match asked {
        Ok(true) => {}
        Ok(false) => {
            let _ = cluster.revoke(lease).await;
            return Err(Refused(
                "the cluster changed while the switchover was asked (the leader key or the epoch moved, or another switchover began): run it again".into(),
            )
            .into());
        }
        Err(e) => {
            // The request may have been written: it goes with its lease.
            let _ = cluster.revoke(lease).await;
            return Err(anyhow::Error::new(e).context(
                "etcd did not answer the switchover request; it was withdrawn (if it was written at all)",
            ));
        }
    }
    tracing::info!(%from, %to, epoch, lag_bytes = target.lag_bytes, "switchover asked; waiting for the target");
    let outcome = wait(&cluster, o, &record, epoch, started).await;
    let _ = cluster.revoke(lease).await;
    let (leader_moved, address, new_epoch) = outcome?;
    Ok(SwitchoverReport {
        cluster: o.cluster.clone(),
        from,
        to,
        epoch: new_epoch,
        address,
        leader_moved_seconds: leader_moved.as_secs_f64(),
        total_seconds: started.elapsed().as_secs_f64(),
    })
}

/// Waits for the outcome: (when the leader key moved, the new primary's
/// address, its epoch).
async fn wait(
    cluster: &Cluster,
    o: &SwitchoverOptions,
    record: &SwitchoverRecord,
    epoch: u64,
    started: Instant,
) -> Result<(Duration, Option<String>, u64)> {
    let deadline = started + o.timeout;
    let mut moved = None;
    let mut claimed = false;
    loop {
        let last_error = match cluster.snapshot().await {
            Err(e) => Some(e.to_string()),
            Ok(s) => {
                let mine = s.switchover.as_ref().filter(|r| r.id == record.id);
                if let Some(l) = s
                    .view
                    .leader
                    .as_ref()
                    .filter(|l| l.name == record.to && l.epoch > epoch)
                {
                    let at = *moved.get_or_insert_with(|| started.elapsed());
                    if let (LeaderState::Primary, Some(addr)) = (l.state, &l.address) {
                        return Ok((at, Some(addr.clone()), l.epoch));
                    }
                } else if let Some(r) = mine {
                    claimed |= r.state == SwitchoverState::Claimed;
                    if r.state == SwitchoverState::Failed {
                        let _ = cluster.remove_switchover(s.switchover_rev).await;
                        return Err(Refused(format!(
                            "{} could not take over: {}",
                            record.to,
                            r.error.as_deref().unwrap_or("no reason given")
                        ))
                        .into());
                    }
                    if Instant::now() >= deadline
                        && !claimed
                        && cluster
                            .remove_switchover(s.switchover_rev)
                            .await
                            .unwrap_or(false)
                    {
                        return Err(Refused(format!(
                                "{} did not pick the switchover up within {} s (does its `tandem-standby run --etcd` run?); the request was withdrawn",
                                record.to,
                                o.timeout.as_secs()
                            ))
                            .into());
                    }
                } else if moved.is_none() {
                    bail!(
                        "the switchover request is gone but the leader key does not name {} (leader now: {}): it expired or was removed; check `tandem-standby status` on {}",
                        record.to,
                        s.view.leader.as_ref().map_or("none".into(), |l| format!("{} epoch {}", l.name, l.epoch)),
                        record.to
                    );
                }
                None
            }
        };
        if Instant::now()
            >= deadline
                + if claimed || moved.is_some() {
                    o.timeout
                } else {
                    Duration::ZERO
                }
        {
            bail!(
                "no outcome within the timeout: {}; the leader key {}. Check `tandem-standby status` on {}",
                last_error.unwrap_or_else(|| "the target did not finish".into()),
                if moved.is_some() { "moved to the target, which does not serve yet" } else { "did not move" },
                record.to
            );
        }
        tokio::time::sleep(POLL).await;
    }
}
