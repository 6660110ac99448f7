//! The primary's standing in etcd (`run --etcd`): it holds the cluster's
//! leader key under a lease, publishes its address, epoch and end of log,
//! and fences itself when it cannot keep the lease.
//!
//! Rules kept here:
//! - The primary acts as primary (ships, answers commit waits) only while
//!   its fencing clock says the lease is still its own: until the send
//!   time of the last keepalive etcd answered + ttl − margin
//!   ([`tandem_coord::lease`]). etcd cannot expire the lease earlier, so
//!   no standby can win an election while this primary still acts.
//! - It never serves under an epoch etcd no longer holds: a newer epoch in
//!   etcd means a standby was promoted; the primary refuses to start, or
//!   stops (exit [`EXIT_SUPERSEDED`] in the binary).
//! - It watches the leader key: the moment the key leaves its lease (a
//!   switchover's take-over, or the lease's end) it fences, and asks etcd
//!   at once whether it was superseded. The lease clock stays the backstop
//!   when the watch cannot be kept (etcd unreachable).
//! - A fenced primary whose epoch etcd still holds, with nobody holding the
//!   leader key, takes it back and resumes (etcd came back before anyone
//!   was promoted: no one else can have been, the epoch did not move).
//! - A commit wait answers durable only after the durable floor in etcd
//!   covers it ([`Leadership::confirm_durable`]), so no standby that lacks
//!   the commit can win a later election.
//! - A clean stop does not revoke the lease: a restart within the ttl takes
//!   it back without a failover; a primary that stays down is replaced
//!   once the lease expires.

use crate::identity::PrimaryIdentity;
use crate::log_watch::LogEnd;
use std::sync::{Arc, Mutex};
use tandem_coord::records::{EpochRecord, FloorRecord, LeaderRecord, LeaderState, PositionRecord};
use tandem_coord::{Cluster, Timing};
use tandem_shared::LogPosition;
use tokio::sync::watch;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

/// `--etcd` and friends, after flags and config are merged.
#[derive(Debug, Clone)]
pub struct EtcdConfig {
    pub endpoints: Vec<String>,
    pub cluster: String,
    /// This primary's name in etcd (a promoted standby keeps its own).
    pub name: String,
    /// How standbys reach this primary, `https://HOST:PORT` [default: the
    /// bound address].
    pub advertise: Option<String>,
    pub timing: Timing,
    pub on_fence: Option<String>,
}

/// Why the primary may not serve at all.
#[derive(Debug, thiserror::Error)]
pub enum Refusal {
    #[error("etcd holds epoch {etcd} for cluster {cluster} (taken by {by}), newer than this primary's epoch {mine}: a standby was promoted past it. This environment must not serve as primary again; rebuild it as a standby of the new primary")]
    Superseded {
        cluster: String,
        etcd: u64,
        mine: u64,
        by: String,
    },
    #[error("the leader key of cluster {cluster} is held by {holder} (epoch {epoch}), not by this primary ({name}): another primary serves this cluster")]
    HeldByOther {
        cluster: String,
        holder: String,
        epoch: u64,
        name: String,
    },
}

/// What status and metrics show.
#[derive(Debug, Clone, Default)]
pub struct Standing {
    pub leading: bool,
    pub fenced: bool,
    pub fence_reason: String,
    pub lease: i64,
    pub valid_until: Option<Instant>,
    pub etcd_epoch: u64,
    pub leader: String,
    pub fences: u64,
    pub last_failover: String,
    pub on_fence_outcome: String,
    /// Highest durable floor written under the current lease.
    pub floor: LogPosition,
}

pub struct Leadership {
    cluster: Cluster,
    cfg: EtcdConfig,
    identity: PrimaryIdentity,
    address: String,
    standing: watch::Sender<Standing>,
    /// Serialises floor writes; holds the lease they are written under.
    floor_lock: tokio::sync::Mutex<()>,
    /// Set when etcd moved past this primary's epoch while it ran.
    superseded: Mutex<Option<Refusal>>,
}

impl Leadership {
    /// Connects and takes the leader key. A refusal ends the start; an
    /// unreachable etcd does not: the primary starts fenced and keeps
    /// trying (see [`Leadership::run`]).
    pub async fn start(
        cfg: EtcdConfig,
        identity: PrimaryIdentity,
        bound: std::net::SocketAddr,
    ) -> anyhow::Result<Arc<Self>> {
        let cluster = Cluster::connect(&cfg.endpoints, &cfg.cluster, cfg.timing).await?;
        let address = cfg
            .advertise
            .clone()
            .unwrap_or_else(|| format!("https://{bound}"));
        let (standing, _) = watch::channel(Standing {
            fenced: true,
            fence_reason: "not yet confirmed by etcd".into(),
            ..Default::default()
        });
        let me = Arc::new(Self {
            cluster,
            cfg,
            identity,
            address,
            standing,
            floor_lock: tokio::sync::Mutex::new(()),
            superseded: Mutex::new(None),
        });
        match me.try_lead().await {
            Ok(Some(lease)) => me.lead(lease),
            Ok(None) => {}
            Err(Attempt::Refused(r)) => {
                me.run_on_fence(&r.to_string()).await;
                return Err(r.into());
            }
            Err(Attempt::Unreachable(e)) => {
                tracing::error!(error = %e, "cannot reach etcd: starting FENCED (no shipping, no commit waits) until it answers");
                me.standing
                    .send_modify(|s| s.fence_reason = format!("etcd unreachable at start: {e}"));
            }
        }
        Ok(me)
    }

    pub fn standing(&self) -> Standing {
        self.standing.borrow().clone()
    }

    pub fn subscribe(&self) -> watch::Receiver<Standing> {
        self.standing.subscribe()
    }

    /// Acting as primary now: the lease is held and the clock has not run out.
    pub fn acting(&self) -> bool {
        let s = self.standing.borrow();
        s.leading && !s.fenced && s.valid_until.is_some_and(|u| Instant::now() < u)
    }

    pub fn cluster_name(&self) -> &str {
        &self.cfg.cluster
    }

    pub fn name(&self) -> &str {
        &self.cfg.name
    }

    /// The refusal that made the primary stop, if etcd moved past it.
    pub fn superseded(&self) -> Option<Refusal> {
        self.superseded.lock().ok().and_then(|mut s| s.take())
    }

    /// Before a commit wait answers durable for the record at `lsn`: the
    /// durable floor in etcd must cover it. Err: say the wait failed.
    pub async fn confirm_durable(&self, lsn: LogPosition) -> Result<(), String> {
        let need = LogPosition::new(lsn.file, lsn.offset.saturating_add(1));
        let _one_at_a_time = self.floor_lock.lock().await;
        let s = self.standing();
        if !self.acting() {
            return Err(format!("this primary is fenced ({})", s.fence_reason));
        }
        if s.floor >= need {
            return Ok(());
        }
        let floor = FloorRecord {
            epoch: self.identity.epoch,
            floor: need,
            unix_ms: tandem_shared::now_unix_ms(),
        };
        match self
            .cluster
            .update_as_leader(s.lease, None, None, Some(&floor))
            .await
        {
            Ok(true) if self.acting() => {
                self.standing
                    .send_modify(|st| st.floor = st.floor.max(need));
                Ok(())
            }
            Ok(true) => Err("this primary fenced itself while recording the durable floor".into()),
            Ok(false) => Err("etcd says this primary no longer holds the leader key".into()),
            Err(e) => Err(format!("cannot record the durable floor in etcd: {e}")),
        }
    }

    /// Keeps the lease, publishes, fences and resumes until `stop`.
    /// Cancels `stop` itself if etcd moved past this primary's epoch.
    pub async fn run(self: Arc<Self>, log_end: watch::Receiver<LogEnd>, stop: CancellationToken) {
        let timing = self.cfg.timing;
        let mut ask_now = false;
        loop {
            let lease = self.standing.borrow().lease;
            if self.standing.borrow().leading {
                let keeper_stop = stop.child_token();
                let (state, keeper) = tandem_coord::lease::spawn(
                    self.cluster.clone(),
                    lease,
                    self.standing
                        .borrow()
                        .valid_until
                        .unwrap_or_else(Instant::now)
                        - timing.fence_after(),
                    keeper_stop.clone(),
                );
                let why = self.keep(state, &log_end, &stop).await;
                // Not joined: it may be inside a request bounded by the
                // retry timeout, and the fence must not wait for it.
                keeper_stop.cancel();
                keeper.abort();
                let Some(fence) = why else { return };
                self.fence(&fence.why).await;
                ask_now = fence.ask_now;
            }
            // Fenced: try to lead again, every loop wait (at once after the
            // key moved: etcd answers, and a newer epoch means exit 7 now).
            let pause = if std::mem::take(&mut ask_now) {
                std::time::Duration::ZERO
            } else {
                timing.loop_wait
            };
            tokio::select! {
                _ = stop.cancelled() => return,
                _ = tokio::time::sleep(pause) => {}
            }
            match self.try_lead().await {
                Ok(Some(lease)) => {
                    tracing::warn!(lease, epoch = self.identity.epoch, "etcd still holds this primary's epoch and nobody leads: leading again (UNFENCED)");
                    self.lead(lease);
                }
                Ok(None) => {}
                Err(Attempt::Refused(r)) => {
                    tracing::error!(error = %r, "etcd moved past this primary: stopping");
                    self.standing
                        .send_modify(|s| s.fence_reason = r.to_string());
                    if let Ok(mut s) = self.superseded.lock() {
                        *s = Some(r);
                    }
                    stop.cancel();
                    return;
                }
                Err(Attempt::Unreachable(e)) => {
                    tracing::debug!(error = %e, "etcd still unreachable");
                }
            }
        }
    }

    /// While leading: publishes every loop wait, watches the leader key
    /// and the clock. Returns why it fenced, or None on stop.
    async fn keep(
        &self,
        mut lease: watch::Receiver<tandem_coord::lease::LeaseState>,
        log_end: &watch::Receiver<LogEnd>,
        stop: &CancellationToken,
    ) -> Option<Fence> {
        let timing = self.cfg.timing;
        // Publishing runs beside the clock: a request hanging on a cut
        // network must not delay the fence.
        let lease_id = lease.borrow().id;
        let publisher = async {
            loop {
                let end = *log_end.borrow();
                match self.publish(lease_id, end).await {
                    Ok(true) => {}
                    Ok(false) => return,
                    Err(e) => {
                        tracing::warn!(error = %e, "cannot publish to etcd; the lease clock decides")
                    }
                }
                tokio::time::sleep(timing.loop_wait).await;
            }
        };
        tokio::pin!(publisher);
        // The leader key watched: a switchover's take-over (or the lease's
        // end) fences at once instead of at the next publish or keepalive.
        // The lease clock below stays the backstop when the watch breaks.
        let moved = async {
            loop {
                match self.cluster.leader_left(lease_id).await {
                    Ok(why) => return why,
                    Err(e) => {
                        tracing::debug!(error = %e, "cannot watch the leader key; retrying");
                        tokio::time::sleep(tandem_coord::lease::RETRY_AFTER_FAILURE).await;
                    }
                }
            }
        };
        tokio::pin!(moved);
        loop {
            let l = *lease.borrow_and_update();
            self.standing
                .send_modify(|s| s.valid_until = Some(l.valid_until));
            if l.lost {
                return Some(Fence::at_once(
                    "etcd expired or revoked this primary's lease".into(),
                ));
            }
            if !l.valid(Instant::now()) {
                return Some(Fence {
                    why: format!(
                        "could not renew the lease within {} ms of the last renewal etcd answered",
                        timing.fence_after().as_millis()
                    ),
                    ask_now: false,
                });
            }
            tokio::select! {
                _ = stop.cancelled() => return None,
                _ = tokio::time::sleep_until(l.valid_until) => {}
                _ = lease.changed() => {}
                _ = &mut publisher => {
                    return Some(Fence::at_once("the leader key is no longer attached to this primary's lease".into()));
                }
                why = &mut moved => return Some(Fence::at_once(why)),
            }
        }
    }

    async fn publish(&self, lease: i64, end: LogEnd) -> Result<bool, tandem_coord::Error> {
        let pos = PositionRecord {
            epoch: self.identity.epoch,
            end: end.end,
            lg_max: end.lg_max,
            unix_ms: tandem_shared::now_unix_ms(),
        };
        self.cluster
            .update_as_leader(lease, Some(&self.record()), Some(&pos), None)
            .await
    }

    fn record(&self) -> LeaderRecord {
        LeaderRecord {
            name: self.cfg.name.clone(),
            epoch: self.identity.epoch,
            state: LeaderState::Primary,
            address: Some(self.address.clone()),
            env_id: Some(self.identity.env_id.clone()),
            unix_ms: tandem_shared::now_unix_ms(),
        }
    }

    /// Marks the primary leading under `lease` (its clock starts now:
    /// the grant or adoption was just confirmed).
    fn lead(&self, lease: i64) {
        self.standing.send_modify(|s| {
            s.leading = true;
            s.fenced = false;
            s.fence_reason.clear();
            s.lease = lease;
            s.valid_until = Some(s.valid_until.unwrap_or_else(Instant::now));
            s.leader = self.cfg.name.clone();
            s.etcd_epoch = self.identity.epoch;
            s.floor = LogPosition::ZERO;
        });
        tracing::info!(cluster = %self.cfg.cluster, name = %self.cfg.name, epoch = self.identity.epoch, lease, "leading: holding the leader key");
    }

    async fn fence(&self, why: &str) {
        tracing::error!(
            reason = why,
            "FENCED: this primary stopped shipping and refuses commit waits"
        );
        self.standing.send_modify(|s| {
            s.leading = false;
            s.fenced = true;
            s.fence_reason = why.to_owned();
            s.fences += 1;
            s.valid_until = None;
        });
        self.run_on_fence(why).await;
    }

    async fn run_on_fence(&self, why: &str) {
        let Some(cmd) = &self.cfg.on_fence else {
            return;
        };
        let outcome = tandem_coord::hook::run(
            "on-fence",
            cmd,
            &[
                ("TANDEM_FENCE_REASON", why.to_owned()),
                ("TANDEM_CLUSTER", self.cfg.cluster.clone()),
                ("TANDEM_EPOCH", self.identity.epoch.to_string()),
            ],
        )
        .await;
        self.standing
            .send_modify(|s| s.on_fence_outcome = outcome.clone());
    }

    /// One attempt to hold the leader key: Some(lease) on success, None
    /// when someone else must go first (the election lost a race).
    async fn try_lead(&self) -> Result<Option<i64>, Attempt> {
        let snap = self
            .cluster
            .snapshot()
            .await
            .map_err(Attempt::Unreachable)?;
        let mine = self.identity.epoch;
        if let Some(f) = self.cluster.last_failover().await.ok().flatten() {
            self.standing.send_modify(|s| {
                s.last_failover = format!(
                    "{} by {} to epoch {} at {} ms: {}",
                    f.kind, f.name, f.epoch, f.unix_ms, f.reason
                )
            });
        }
        if let Some(e) = &snap.view.epoch {
            self.standing.send_modify(|s| s.etcd_epoch = e.epoch);
            if e.epoch > mine {
                return Err(Attempt::Refused(Refusal::Superseded {
                    cluster: self.cfg.cluster.clone(),
                    etcd: e.epoch,
                    mine,
                    by: e.name.clone(),
                }));
            }
        }
        if let Some(l) = &snap.view.leader {
            self.standing.send_modify(|s| s.leader = l.name.clone());
            // This primary's own lease, from before a restart: take it over.
            if l.name == self.cfg.name && l.epoch == mine {
                let sent = Instant::now();
                return match self.adopt(snap.leader_lease).await {
                    Ok(true) => {
                        self.standing.send_modify(|s| {
                            s.valid_until = Some(sent + self.cfg.timing.fence_after())
                        });
                        Ok(Some(snap.leader_lease))
                    }
                    Ok(false) => Ok(None),
                    Err(e) => Err(Attempt::Unreachable(e)),
                };
            }
            return Err(Attempt::Refused(Refusal::HeldByOther {
                cluster: self.cfg.cluster.clone(),
                holder: l.name.clone(),
                epoch: l.epoch,
                name: self.cfg.name.clone(),
            }));
        }
        let sent = Instant::now();
        let lease = self.cluster.grant().await.map_err(Attempt::Unreachable)?;
        let epoch = EpochRecord {
            epoch: mine,
            name: self.cfg.name.clone(),
            unix_ms: tandem_shared::now_unix_ms(),
        };
        match self
            .cluster
            .elect(snap.epoch_rev, &epoch, &self.record(), lease, None)
            .await
        {
            Ok(true) => {
                self.standing
                    .send_modify(|s| s.valid_until = Some(sent + self.cfg.timing.fence_after()));
                Ok(Some(lease))
            }
            Ok(false) => {
                let _ = self.cluster.revoke(lease).await;
                Ok(None)
            }
            Err(e) => Err(Attempt::Unreachable(e)),
        }
    }

    /// Takes over a live lease this primary (same name, same epoch) held
    /// before it restarted, or that a promoting standby of the same name
    /// took for it: one keepalive proves it alive, the guarded update
    /// proves the leader key is on it.
    async fn adopt(&self, lease: i64) -> Result<bool, tandem_coord::Error> {
        let ok = self
            .cluster
            .update_as_leader(lease, Some(&self.record()), None, None)
            .await?;
        if !ok {
            return Ok(false);
        }
        let ttl = self.cluster.keep_alive_once(lease).await?;
        Ok(ttl > 0)
    }
}

enum Attempt {
    Refused(Refusal),
    Unreachable(tandem_coord::Error),
}

/// Why the primary fenced, and whether etcd is worth asking again at once
/// (it answered: the key moved or the lease ended) rather than after a
/// loop wait (it did not answer in time).
struct Fence {
    why: String,
    ask_now: bool,
}

impl Fence {
    fn at_once(why: String) -> Self {
        Self { why, ask_now: true }
    }
}

impl Standing {
    pub fn to_wire(&self, cluster: &str, name: &str) -> tandem_shared::wire::Coordination {
        tandem_shared::wire::Coordination {
            cluster: cluster.to_owned(),
            name: name.to_owned(),
            leading: self.leading,
            fenced: self.fenced,
            fence_reason: self.fence_reason.clone(),
            lease_remaining_ms: match (self.fenced, self.valid_until) {
                (false, Some(u)) => u.saturating_duration_since(Instant::now()).as_millis() as u64,
                _ => 0,
            },
            etcd_epoch: self.etcd_epoch,
            leader: self.leader.clone(),
            fences: self.fences,
            last_failover: self.last_failover.clone(),
            on_fence_outcome: self.on_fence_outcome.clone(),
        }
    }
}
