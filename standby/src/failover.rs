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
//!   writes after fsync: what is published is durable.
//! - The round's state goes to `.tandem/etcd.json` for status.

use crate::state::StandbyDir;
pub use crate::status::etcd::{read_status, render_status, RoundStatus, STATUS_FILE};

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
    /// The leader key just went: stop following the old primary before
    /// the next round, so the position this standby then publishes as
    /// final is the one it keeps. Log the old primary sent before it
    /// fenced may still be on its way (a link that stalled, then healed);
    /// applied after the election, it could carry a standby that lost past
    /// the winner's end, and the winner would refuse it as diverged. Then
    /// call [`Coordinator::next_event`] again with `following` empty.
    Vacant,
    /// A planned switchover to this standby was asked for
    /// (`tandem-standby switchover`): carry it out ([`crate::handover`]).
    Switchover(Box<Request>),
    /// etcd shows that a take-over this standby sent succeeded after all
    /// (its answer was lost and the switchover given up with nothing
    /// changed): finish it ([`crate::handover::finish`]).
    TakenOver {
        epoch: u64,
        /// The old primary's lease and address, from the failover record.
        from_lease: Option<i64>,
        from_address: Option<String>,
    },
}

/// A planned switchover addressed to this standby, as its round saw it
/// (carried out by [`crate::handover`]).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Request {
    pub record: tandem_coord::records::SwitchoverRecord,
    /// The request key's mod revision.
    pub rev: i64,
    /// The leader key then, its lease, and the epoch key's mod revision.
    pub leader: LeaderRecord,
    pub leader_lease: i64,
    pub epoch_rev: i64,
    /// This standby's epoch and environment then.
    pub my_epoch: u64,
    pub env_id: Option<String>,
}

pub struct Coordinator {
    pub cluster: Cluster,
    cfg: FailoverConfig,
    pub lease: i64,
    state: watch::Receiver<LeaseState>,
    stop: CancellationToken,
    /// Why the leader key was last seen gone (for the failover record).
    last_leader: Option<LeaderRecord>,
    /// The leader key's mod revision when last seen, and the revision at
    /// which it was first seen gone since (the policy's "settled" rule).
    last_leader_rev: i64,
    leaderless_since: Option<i64>,
    /// The cluster's revision at the last round's snapshot: the round
    /// after it comes at the loop wait, or as soon as etcd shows a change
    /// after it that the standby must answer ([`Cluster::standby_wake`]).
    seen_revision: Option<i64>,
    /// The last round's verdict while no leader held the key (logged
    /// when it changes).
    last_verdict: String,
    /// A failed promotion an earlier run recorded: shown until an operator
    /// removes `.tandem/etcd.json`.
    promotion_failed: Option<String>,
    /// Whether the member record out is of a recoverable base (test hook
    /// `hold-member-record`).
    published_recoverable: bool,
}

/// The primary to follow while `l` holds the leader key: one that serves,
/// is not this standby, and is not followed already (`following`; empty
/// when this standby follows none: it stopped at a vacancy, and follows
/// the old primary again should it come back at its old address).
fn follow_target(l: &LeaderRecord, me: &str, following: &str) -> Option<String> {
    let addr = l
        .address
        .as_ref()
        .filter(|_| l.state == LeaderState::Primary)?;
    (addr != following && l.name != me).then(|| addr.clone())
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
            last_leader_rev: 0,
            leaderless_since: None,
            seen_revision: None,
            last_verdict: String::new(),
            promotion_failed: read_status(dir).and_then(|s| s.promotion_failed),
            published_recoverable: false,
        })
    }

    pub fn config(&self) -> &FailoverConfig {
        &self.cfg
    }

    /// Rounds every loop wait until there is something to do. `following`:
    /// the primary this standby follows, empty when it follows none (it
    /// stopped at a vacancy: [`Event::Vacant`]).
    pub async fn next_event(&mut self, dir: &StandbyDir, following: &str) -> Event {
        loop {
            let vacant_before = self.leaderless_since.is_some();
            match self.round(dir, following).await {
                Ok(Some(e)) => return e,
                // The leader key just went: stop following, then publish
                // the final position at once (the caller calls again
                // without delay), the other standbys' elections wait for it.
                // A standby that never saw a leader in this run has no log
                // of one on its way (a fenced primary refuses new sessions):
                // it goes on following what it follows.
                Ok(None) if !vacant_before && self.leaderless_since.is_some() => {
                    if following.is_empty() || self.last_leader.is_none() {
                        continue;
                    }
                    return Event::Vacant;
                }
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
            self.until_next_round().await;
        }
    }

    /// The loop wait, cut short by a change in etcd the round must answer
    /// (the leader key gone, a peer's final position, a switchover): a
    /// failover then waits for etcd's lease expiry and the standbys'
    /// round trips, not for their loop waits. A watch that cannot be made
    /// leaves the loop wait.
    async fn until_next_round(&self) {
        let wait = tokio::time::sleep(self.cfg.timing.loop_wait);
        let Some(revision) = self.seen_revision else {
            return wait.await;
        };
        tokio::pin!(wait);
        tokio::select! {
            () = &mut wait => {}
            woken = self.cluster.standby_wake(revision, &self.cfg.name) => match woken {
                Ok(key) => tracing::info!(key, "etcd changed: a round now"),
                Err(e) => {
                    tracing::debug!(error = %e, "no watch of the cluster: the loop wait");
                    wait.await;
                }
            },
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

    /// One round, in the order the policy decides: read this standby's
    /// status, publish it, read the cluster, then follow (or answer a
    /// switchover) while a leader holds the key, or campaign when none does.
    async fn round(&mut self, dir: &StandbyDir, following: &str) -> anyhow::Result<Option<Event>> {
        // The running follower's own status file: what it published after
        // fsync (no lock needed to read it).
        let me: crate::status::StandbyStatus =
            serde_json::from_slice(&std::fs::read(dir.status_path())?)?;
        self.renew_lost_lease().await?;
        let record = MemberRecord {
            name: self.cfg.name.clone(),
            epoch: me.epoch,
            durable: me.durable_lsn,
            recoverable: me.recoverable,
            unix_ms: tandem_shared::now_unix_ms(),
            leaderless_since: self.leaderless_since,
        };
        if !self.hold_member_record() {
            self.cluster.publish_member(&record, self.lease).await?;
            self.published_recoverable = record.recoverable;
        }
        let snap = self.cluster.snapshot().await?;
        self.seen_revision = Some(snap.revision);
        // `me` was read after the previous round's snapshot: its position
        // is final for a vacancy that snapshot showed.
        let settled_since = self.leaderless_since;
        if snap.view.leader.is_some() {
            self.leaderless_since = None;
            self.last_leader_rev = snap.leader_rev;
        } else {
            self.leaderless_since.get_or_insert(snap.revision);
        }
        let status = RoundStatus {
            leader: snap.view.leader.as_ref().map(|l| l.name.clone()),
            leader_address: snap.view.leader.as_ref().and_then(|l| l.address.clone()),
            etcd_epoch: snap.view.epoch.as_ref().map_or(0, |e| e.epoch),
            last_failover: self.cluster.last_failover().await.ok().flatten(),
            ..self.base_status()
        };
        if let Some(l) = snap.view.leader.clone() {
            self.last_leader = Some(l.clone());
            return Ok(self.with_leader(dir, following, &me, &snap, &l, status));
        }
        self.campaign(dir, &me, settled_since, &snap, status).await
    }

    /// Test hook `hold-member-record` ([`tandem_coord::test_hook`]): once
    /// a recoverable record is out, keep it (stale) while the last
    /// snapshot showed a leader. The publish after the vacancy is never
    /// held back: it is what the policy's rule 6 waits for.
    fn hold_member_record(&self) -> bool {
        self.published_recoverable
            && self.leaderless_since.is_none()
            && tandem_coord::test_hook::armed("hold-member-record")
    }

    /// The member record's lease is gone for good: a new one.
    async fn renew_lost_lease(&mut self) -> anyhow::Result<()> {
        if !self.state.borrow().lost {
            return Ok(());
        }
        let sent = Instant::now();
        self.stop.cancel();
        self.lease = self.cluster.grant().await?;
        self.stop = CancellationToken::new();
        let (state, _task) =
            tandem_coord::lease::spawn(self.cluster.clone(), self.lease, sent, self.stop.clone());
        self.state = state;
        // The old lease took the record with it.
        self.published_recoverable = false;
        Ok(())
    }

    /// A leader holds the key: finish a take-over that turned out to have
    /// succeeded, follow a new primary, or answer a switchover asked of
    /// this standby.
    fn with_leader(
        &mut self,
        dir: &StandbyDir,
        following: &str,
        me: &crate::status::StandbyStatus,
        snap: &tandem_coord::Snapshot,
        l: &LeaderRecord,
        mut status: RoundStatus,
    ) -> Option<Event> {
        if me.promotion.is_none()
            && tandem_coord::resume::taken_over(
                &snap.view,
                snap.leader_lease,
                &self.cfg.name,
                me.epoch,
                self.lease,
            )
        {
            let from = status.last_failover.clone().filter(|f| {
                f.kind == "switchover" && f.name == self.cfg.name && f.epoch == l.epoch
            });
            tracing::warn!(
                epoch = l.epoch,
                "etcd shows this standby's lost take-over succeeded: finishing the switchover"
            );
            status.verdict = format!("finishing the switchover to epoch {}", l.epoch);
            self.write_status(dir, status);
            return Some(Event::TakenOver {
                epoch: l.epoch,
                from_lease: from.as_ref().and_then(|f| f.from_lease),
                from_address: from.and_then(|f| f.from_address),
            });
        }
        status.verdict = "following".into();
        self.write_status(dir, status);
        if let Some(addr) = follow_target(l, &self.cfg.name, following) {
            return Some(Event::Follow(addr));
        }
        let r = snap.switchover.as_ref().filter(|r| {
            r.to == self.cfg.name
                && r.state == tandem_coord::records::SwitchoverState::Requested
                && !r.expired(tandem_shared::now_unix_ms())
        })?;
        Some(Event::Switchover(Box::new(Request {
            record: r.clone(),
            rev: snap.switchover_rev,
            leader: l.clone(),
            leader_lease: snap.leader_lease,
            epoch_rev: snap.epoch_rev,
            my_epoch: me.epoch,
            env_id: me.env_id.clone(),
        })))
    }

    /// This standby as the policy sees it; `leaderless_since`: the vacancy
    /// its status `me` was read after.
    fn candidate(
        &self,
        me: &crate::status::StandbyStatus,
        leaderless_since: Option<i64>,
    ) -> Candidate {
        Candidate {
            name: self.cfg.name.clone(),
            epoch: me.epoch,
            durable: me.durable_lsn,
            recoverable: me.recoverable && me.promotion.is_none(),
            max_lag_bytes: self.cfg.max_lag_bytes,
            leaderless_since,
            last_leader_rev: self.last_leader_rev,
        }
    }

    /// Nobody holds the leader key: campaign if the policy lets this
    /// standby, and say whether it won.
    async fn campaign(
        &mut self,
        dir: &StandbyDir,
        me: &crate::status::StandbyStatus,
        leaderless_since: Option<i64>,
        snap: &tandem_coord::Snapshot,
        mut status: RoundStatus,
    ) -> anyhow::Result<Option<Event>> {
        let verdict = decide(&snap.view, &self.candidate(me, leaderless_since));
        status.verdict = match &verdict {
            Verdict::Wait(why) => format!("waiting: {why}"),
            Verdict::Campaign { new_epoch, .. } => format!("campaigning for epoch {new_epoch}"),
        };
        if status.verdict != self.last_verdict {
            tracing::info!(verdict = %status.verdict, revision = snap.revision, "no leader");
            self.last_verdict.clone_from(&status.verdict);
        }
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
                    from_lease: None,
                    from_address: None,
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

#[cfg(test)]
mod tests {
    use super::*;

    fn leader(name: &str, state: LeaderState, address: Option<&str>) -> LeaderRecord {
        LeaderRecord {
            name: name.into(),
            epoch: 2,
            state,
            address: address.map(Into::into),
            env_id: None,
            unix_ms: 0,
        }
    }

    #[test]
    fn a_standby_that_stopped_at_a_vacancy_follows_whoever_serves_next() {
        use LeaderState::*;
        let old = leader("p", Primary, Some("https://p:1"));
        // Following p already: nothing to do; another address: follow it.
        assert_eq!(follow_target(&old, "s1", "https://p:1"), None);
        assert_eq!(
            follow_target(&old, "s1", "https://q:1"),
            Some("https://p:1".into())
        );
        // Stopped at the vacancy (following none): the old primary back at
        // its old address is followed again, as is a new one.
        assert_eq!(follow_target(&old, "s1", ""), Some("https://p:1".into()));
        let new = leader("s2", Primary, Some("https://s2:1"));
        assert_eq!(follow_target(&new, "s1", ""), Some("https://s2:1".into()));
        // Not yet serving, or this standby itself: nobody to follow.
        assert_eq!(
            follow_target(&leader("s2", Promoting, None), "s1", ""),
            None
        );
        assert_eq!(
            follow_target(&leader("s1", Primary, Some("https://s1:1")), "s1", ""),
            None
        );
    }
}
