//! Automatic failover (`run --etcd`): the standby publishes its durable
//! position under its own lease, watches the cluster, follows the primary
//! etcd names, and campaigns when the policy lets it
//! ([`tandem_coord::policy::decide`]).
//!
//! Rules kept here:
//! - Only the election transaction makes a standby the winner; the policy
//!   only decides who may try. The winner's leader key sits on its member
//!   lease, which this coordinator keeps alive until the promoted primary
//!   (same name, new epoch) adopts it.
//! - Positions come from the running follower's status file, which it
//!   writes after fsync: what is published is durable. Never through
//!   `status::read` in this process (see `Coordinator::round`).
//! - The round's state goes to `.tandem/etcd.json` for status.

use crate::state::StandbyDir;
use serde::{Deserialize, Serialize};
use std::net::SocketAddr;
use tandem_coord::lease::LeaseState;
use tandem_coord::policy::{decide, Candidate, Verdict};
use tandem_coord::records::{EpochRecord, FailoverRecord, LeaderRecord, LeaderState, MemberRecord};
use tandem_coord::{Cluster, Timing};
use tokio::sync::watch;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

/// `run --failover-max-lag-bytes` by default.
pub const DEFAULT_MAX_LAG_BYTES: u64 = 16 << 20;
/// Where each round's outcome is written.
pub const STATUS_FILE: &str = "etcd.json";

#[derive(Debug, Clone)]
pub struct FailoverConfig {
    pub endpoints: Vec<String>,
    pub cluster: String,
    pub name: String,
    pub timing: Timing,
    pub max_lag_bytes: u64,
    pub on_promote: Option<String>,
    /// Where the promoted primary listens.
    pub promote_listen: SocketAddr,
    /// The URL standbys reach it at [default: https://PROMOTE_LISTEN].
    pub advertise: Option<String>,
}

/// What the coordinator asks the caller to do.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Event {
    /// This standby won the election for `epoch`: promote now.
    Won { epoch: u64, reason: String },
    /// etcd names another primary address: follow it.
    Follow(String),
    /// A planned switchover to this standby was asked for
    /// (`tandem-standby switchover`): carry it out ([`crate::handover`]).
    Switchover(crate::handover::Request),
}

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

pub struct Coordinator {
    pub cluster: Cluster,
    cfg: FailoverConfig,
    pub lease: i64,
    state: watch::Receiver<LeaseState>,
    stop: CancellationToken,
    /// Why the leader key was last seen gone (for the failover record).
    last_leader: Option<LeaderRecord>,
    /// A failed promotion an earlier run recorded: shown until an operator
    /// removes `.tandem/etcd.json`.
    promotion_failed: Option<String>,
}

impl Coordinator {
    pub async fn start(cfg: FailoverConfig, dir: &StandbyDir) -> anyhow::Result<Self> {
        let cluster = Cluster::connect(&cfg.endpoints, &cfg.cluster, cfg.timing).await?;
        let sent = Instant::now();
        let lease = cluster.grant().await?;
        let stop = CancellationToken::new();
        let (state, _task) = tandem_coord::lease::spawn(cluster.clone(), lease, sent, stop.clone());
        Ok(Self {
            cluster,
            cfg,
            lease,
            state,
            stop,
            last_leader: None,
            promotion_failed: read_status(dir).and_then(|s| s.promotion_failed),
        })
    }

    pub fn config(&self) -> &FailoverConfig {
        &self.cfg
    }

    /// Rounds every loop wait until there is something to do.
    pub async fn next_event(&mut self, dir: &StandbyDir, following: &str) -> Event {
        loop {
            match self.round(dir, following).await {
                Ok(Some(e)) => return e,
                Ok(None) => {}
                Err(e) => {
                    tracing::warn!(error = %e, "etcd round failed");
                    self.write_status(
                        dir,
                        RoundStatus {
                            error: Some(e.to_string()),
                            ..self.base_status()
                        },
                    );
                }
            }
            tokio::time::sleep(self.cfg.timing.loop_wait).await;
        }
    }

    fn base_status(&self) -> RoundStatus {
        RoundStatus {
            cluster: self.cfg.cluster.clone(),
            name: self.cfg.name.clone(),
            lease_remaining_ms: self.state.borrow().remaining(Instant::now()).as_millis() as u64,
            promotion_failed: self.promotion_failed.clone(),
            updated_unix_ms: tandem_shared::now_unix_ms(),
            ..Default::default()
        }
    }

    // Long function: one election round in the order the policy decides
    // (read status, publish, read the cluster, campaign, promote); to be
    // split into steps.
    async fn round(&mut self, dir: &StandbyDir, following: &str) -> anyhow::Result<Option<Event>> {
        // The running follower's own status file, never `status::read`:
        // that asks for the directory lock's holder, and opening and
        // closing the lock file in this process would drop the follower's
        // POSIX lock.
        let me: crate::status::StandbyStatus =
            serde_json::from_slice(&std::fs::read(dir.status_path())?)?;
        let lease = *self.state.borrow();
        if lease.lost {
            // A new lease for the member record; the old one is gone for good.
            let sent = Instant::now();
            self.stop.cancel();
            self.lease = self.cluster.grant().await?;
            self.stop = CancellationToken::new();
            let (state, _task) = tandem_coord::lease::spawn(
                self.cluster.clone(),
                self.lease,
                sent,
                self.stop.clone(),
            );
            self.state = state;
        }
        let record = MemberRecord {
            name: self.cfg.name.clone(),
            epoch: me.epoch,
            durable: me.durable_lsn,
            recoverable: me.recoverable,
            unix_ms: tandem_shared::now_unix_ms(),
        };
        self.cluster.publish_member(&record, self.lease).await?;
        let snap = self.cluster.snapshot().await?;
        let mut status = RoundStatus {
            leader: snap.view.leader.as_ref().map(|l| l.name.clone()),
            leader_address: snap.view.leader.as_ref().and_then(|l| l.address.clone()),
            etcd_epoch: snap.view.epoch.as_ref().map_or(0, |e| e.epoch),
            last_failover: self.cluster.last_failover().await.ok().flatten(),
            ..self.base_status()
        };
        if let Some(l) = &snap.view.leader {
            self.last_leader = Some(l.clone());
            status.verdict = "following".into();
            self.write_status(dir, status);
            if let (LeaderState::Primary, Some(addr)) = (l.state, &l.address) {
                if addr != following && l.name != self.cfg.name {
                    return Ok(Some(Event::Follow(addr.clone())));
                }
            }
            if let Some(r) = snap.switchover.as_ref().filter(|r| {
                r.to == self.cfg.name
                    && r.state == tandem_coord::records::SwitchoverState::Requested
            }) {
                return Ok(Some(Event::Switchover(crate::handover::Request {
                    record: r.clone(),
                    rev: snap.switchover_rev,
                    leader: l.clone(),
                    leader_lease: snap.leader_lease,
                    epoch_rev: snap.epoch_rev,
                    my_epoch: me.epoch,
                    env_id: me.env_id.clone(),
                })));
            }
            return Ok(None);
        }
        let candidate = Candidate {
            name: self.cfg.name.clone(),
            epoch: me.epoch,
            durable: me.durable_lsn,
            recoverable: me.recoverable && me.promotion.is_none(),
            max_lag_bytes: self.cfg.max_lag_bytes,
        };
        let verdict = decide(&snap.view, &candidate);
        status.verdict = match &verdict {
            Verdict::Wait(why) => format!("waiting: {why}"),
            Verdict::Campaign { new_epoch, .. } => format!("campaigning for epoch {new_epoch}"),
        };
        self.write_status(dir, status);
        let Verdict::Campaign {
            new_epoch,
            lag_bytes,
        } = verdict
        else {
            return Ok(None);
        };
        if !self.state.borrow().valid(Instant::now()) {
            return Ok(None);
        }
        let gone = self
            .last_leader
            .as_ref()
            .map_or("an unknown primary".to_owned(), |l| {
                format!("{} (epoch {})", l.name, l.epoch)
            });
        let reason = format!(
            "the leader key of {gone} expired; {} was the most caught-up standby, {lag_bytes} bytes behind its last published end of log",
            self.cfg.name
        );
        let now = tandem_shared::now_unix_ms();
        let won = self
            .cluster
            .elect(
                snap.epoch_rev,
                &EpochRecord {
                    epoch: new_epoch,
                    name: self.cfg.name.clone(),
                    unix_ms: now,
                },
                &LeaderRecord {
                    name: self.cfg.name.clone(),
                    epoch: new_epoch,
                    state: LeaderState::Promoting,
                    address: None,
                    env_id: me.env_id.clone(),
                    unix_ms: now,
                },
                self.lease,
                Some(&FailoverRecord {
                    name: self.cfg.name.clone(),
                    epoch: new_epoch,
                    kind: "failover".into(),
                    reason: reason.clone(),
                    unix_ms: now,
                }),
            )
            .await?;
        if won {
            tracing::warn!(epoch = new_epoch, %reason, "WON the election: promoting");
            return Ok(Some(Event::Won {
                epoch: new_epoch,
                reason,
            }));
        }
        tracing::info!("lost the election to another standby");
        Ok(None)
    }

    /// Records a promotion that failed after the leader key moved here
    /// (`how`: "election" or "switchover"), for `status`.
    pub async fn promotion_failed(&self, dir: &StandbyDir, how: &str, e: &anyhow::Error) {
        let snap = self.cluster.snapshot().await.ok();
        let leader = snap.as_ref().and_then(|s| s.view.leader.clone());
        self.write_status(
            dir,
            RoundStatus {
                leader: leader.as_ref().map(|l| l.name.clone()),
                etcd_epoch: snap
                    .as_ref()
                    .and_then(|s| s.view.epoch.as_ref())
                    .map_or(0, |e| e.epoch),
                verdict: format!("promotion failed after winning the {how}"),
                promotion_failed: Some(format!(
                    "{} (after the {how}, {} ms): {e:#}",
                    self.cfg.name,
                    tandem_shared::now_unix_ms()
                )),
                ..self.base_status()
            },
        );
    }

    /// The member record goes before the promoted primary takes over.
    pub async fn retire_member_record(&self) {
        let mut kv = self.cluster.client().kv_client();
        let _ = tandem_coord::cluster::bounded(
            self.cfg.timing,
            kv.delete(self.cluster.keys.member(&self.cfg.name), None),
        )
        .await;
    }

    fn write_status(&self, dir: &StandbyDir, s: RoundStatus) {
        let path = dir.meta().join(STATUS_FILE);
        if let Ok(bytes) = serde_json::to_vec_pretty(&s) {
            if let Err(e) = tandem_shared::durable::write_file_atomic(&path, &bytes) {
                tracing::debug!(error = %e, "cannot write {}", path.display());
            }
        }
    }
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
