//! The target's side of a planned switchover through etcd
//! (`tandem-standby switchover`, README "Planned switchover through
//! etcd"). The standby that `run --etcd` keeps, named in the request:
//!
//! 1. claims the request (a transaction on its mod revision), so the
//!    command knows it is being carried out;
//! 2. promotes as today's switchover, its follower still streaming: the
//!    primary must confirm that no process has its environment open and
//!    that this standby holds its end of log; a refusal, a timeout or an
//!    unreachable primary ends it here with nothing changed (the request
//!    is marked failed, with the reason, for the command);
//! 3. once confirmed, stops its follower and moves the leader key in one
//!    transaction (`Cluster::take_over`): it compares the epoch key's
//!    revision, that the key is still on the primary's lease and that the
//!    claimed request is unchanged, and puts the new epoch, the leader key
//!    under this standby's lease and the failover record. The key is never
//!    absent, so no election can start; the old primary's writes compare
//!    its lease, so it can no longer renew the key or raise the durable
//!    floor. Its lease is then revoked, so its keeper learns at once;
//! 4. recovers and records the promotion (the directory changes only now);
//! 5. before serving, waits until the old primary says it stopped acting
//!    (fenced), or until its own clock must have fenced it (revoke time +
//!    ttl − margin), so two primaries never accept commit waits at once.
//!
//! The claim carries a deadline (the request's, or the catch-up timeout +
//! [`CLAIM_SLACK`] if earlier): no take-over is sent after it, and past it
//! the request counts as failed for everyone.
//!
//! A take-over transaction whose answer was lost (etcd unreachable
//! mid-request) is read back until etcd answers or the primary's clock
//! would have fenced it; if it cannot be known, the promote stops with
//! the directory unchanged and the standby follows again. If etcd later
//! shows the key on this standby's own lease at the next epoch, the round
//! says so ([`crate::failover::Event::TakenOver`]) and [`finish`] completes
//! the switchover; [`finish`] also serves a promoted directory restarted
//! before it served, when etcd still holds its epoch for it.

use crate::failover::{Coordinator, Request};
use crate::promote::{self, Handover, PromoteOptions, PromoteReport};
use crate::state::StandbyDir;
use anyhow::{anyhow, bail, Result};
use std::sync::{Arc, Mutex};
use std::time::Duration;
use tandem_coord::records::{
    EpochRecord, FailoverRecord, LeaderRecord, LeaderState, SwitchoverRecord, SwitchoverState,
};
use tandem_coord::Cluster;
use tandem_shared::tls::TlsFiles;
use tokio::time::Instant;

/// How often the old primary is asked whether it stopped acting.
const STEP_DOWN_POLL: Duration = Duration::from_millis(50);

/// A claim's deadline is the catch-up timeout plus this (or the request's
/// own deadline, if earlier): time for the primary's two answers, stopping
/// the follower and the take-over request. After it the target moves no
/// key, and the request counts as failed.
pub const CLAIM_SLACK: Duration = Duration::from_secs(10);

/// How a switchover ended when it did not promote.
#[derive(Debug)]
pub struct Failed {
    /// The leader key moved to this standby: the cluster now waits for it.
    pub leader_moved: bool,
    pub error: anyhow::Error,
}

/// What the old primary's follower connection needs to ask it.
pub struct OldPrimary {
    pub url: String,
    pub server_name: Option<String>,
    pub tls: TlsFiles,
}

/// The promotion, and the reason recorded for it.
pub struct Promoted {
    pub report: PromoteReport,
    pub reason: String,
}

/// Carries a switchover out; `stop_follower` stops this process's follower.
pub async fn carry_out(
    coord: &Coordinator,
    dir: &StandbyDir,
    req: Request,
    old: OldPrimary,
    stop_follower: Box<dyn Fn() + Send + Sync>,
) -> Result<Promoted, Failed> {
    let cluster = coord.cluster.clone();
    let name = coord.config().name.clone();
    let not_moved = |error| Failed {
        leader_moved: false,
        error,
    };
    let (rev, deadline_unix_ms) = claim(&cluster, &req, &name).await.map_err(not_moved)?;
    let reason = format!(
        "planned switchover from {} (epoch {}) to {name}, asked at {} ms",
        req.leader.name, req.leader.epoch, req.record.unix_ms
    );
    let moved: Arc<Mutex<Option<Instant>>> = Arc::new(Mutex::new(None));
    let take = TakeOver {
        cluster: cluster.clone(),
        req: req.clone(),
        rev,
        name: name.clone(),
        lease: coord.lease,
        reason: reason.clone(),
        deadline_unix_ms,
        moved: moved.clone(),
        runtime: tokio::runtime::Handle::current(),
    };
    let opts = PromoteOptions {
        catch_up_timeout: Duration::from_millis(req.record.catch_up_timeout_ms),
        force: false,
        full_verify: false,
        elected: false,
        handover: Some(Handover {
            stop_follower,
            take_over: Box::new(move |end| take.run(end)),
        }),
    };
    // The old primary is watched from the moment the key moves, beside the
    // recovery: it is fenced for a short while before it exits.
    let watch_stop = tokio_util::sync::CancellationToken::new();
    let stepped_down = Arc::new(Mutex::new(false));
    let watcher = tokio::spawn(watch_old_primary(
        old,
        moved.clone(),
        stepped_down.clone(),
        watch_stop.clone(),
    ));
    let pdir = dir.clone();
    let promoted = tokio::task::spawn_blocking(move || promote::promote(&pdir, &opts))
        .await
        .map_err(|e| anyhow!(e))
        .and_then(|r| r);
    let leader_moved = moved.lock().map(|m| m.is_some()).unwrap_or(true);
    let report = match promoted {
        Ok(r) => r,
        Err(error) => {
            watch_stop.cancel();
            if !leader_moved {
                fail_request(&cluster, &req, rev, &error).await;
            }
            return Err(Failed {
                leader_moved,
                error,
            });
        }
    };
    let moved_at = moved.lock().ok().and_then(|m| *m);
    // The old primary's own clock fences it at the latest ttl − margin after
    // the last keepalive it sent, which was before its lease was revoked.
    let deadline = moved_at.unwrap_or_else(Instant::now) + coord.config().timing.fence_after();
    wait_stepped_down(&stepped_down, deadline).await;
    watch_stop.cancel();
    let _ = watcher.await;
    tracing::warn!(epoch = report.epoch, %reason, "switchover: the old primary stepped down; serving");
    Ok(Promoted { report, reason })
}

/// Finishes a promotion etcd already made for this standby
/// ([`tandem_coord::resume`]): a take-over whose answer was lost, or a
/// promoted directory restarted before it served. The old primary's lease
/// (`from_lease`, from the failover record) is revoked again, the
/// directory promoted from what is durable (already promoted: nothing to
/// do), and serving waits until the old primary says it stopped acting or
/// its clock must have fenced it (revoke + ttl − margin).
pub async fn finish(
    cluster: &Cluster,
    dir: &StandbyDir,
    from_lease: Option<i64>,
    old: OldPrimary,
    reason: String,
) -> Result<Promoted> {
    if let Some(lease) = from_lease {
        if let Err(e) = cluster.revoke(lease).await {
            // Gone already (revoked, expired) is the usual case.
            tracing::info!(lease, error = %e, "revoking the old primary's lease again");
        }
    }
    let revoked = Instant::now();
    let watch_stop = tokio_util::sync::CancellationToken::new();
    let stepped_down = Arc::new(Mutex::new(false));
    let watcher = tokio::spawn(watch_old_primary(
        old,
        Arc::new(Mutex::new(Some(revoked))),
        stepped_down.clone(),
        watch_stop.clone(),
    ));
    let report = match promote_from_durable(dir).await {
        Ok(r) => r,
        Err(e) => {
            watch_stop.cancel();
            return Err(e);
        }
    };
    wait_stepped_down(&stepped_down, revoked + cluster.timing.fence_after()).await;
    watch_stop.cancel();
    let _ = watcher.await;
    tracing::warn!(epoch = report.epoch, %reason, "the old primary stepped down; serving");
    Ok(Promoted { report, reason })
}

/// Promotes from what is durable, as after an election: the old primary
/// is fenced (or gone), so it is not asked (`PromoteOptions::elected`).
/// A directory promoted already reports that promotion.
pub async fn promote_from_durable(dir: &StandbyDir) -> Result<PromoteReport> {
    let opts = PromoteOptions {
        catch_up_timeout: Duration::from_secs(5),
        force: true,
        full_verify: false,
        elected: true,
        handover: None,
    };
    let pdir = dir.clone();
    tokio::task::spawn_blocking(move || promote::promote(&pdir, &opts))
        .await
        .map_err(|e| anyhow!(e))
        .and_then(|r| r)
}

/// Until the old primary said it stepped down, or `deadline`.
async fn wait_stepped_down(stepped_down: &Mutex<bool>, deadline: Instant) {
    while Instant::now() < deadline && !stepped_down.lock().map(|s| *s).unwrap_or(false) {
        tokio::time::sleep(STEP_DOWN_POLL).await;
    }
}

/// Marks the request claimed, with the claim's deadline: its new mod
/// revision and the deadline. Err when it changed since the round read it
/// or its deadline passed.
async fn claim(cluster: &Cluster, req: &Request, name: &str) -> Result<(i64, u64)> {
    let r = &req.record;
    let now = tandem_shared::now_unix_ms();
    if r.expired(now) {
        bail!("the switchover request's deadline passed before this standby claimed it");
    }
    if r.epoch != req.my_epoch || r.from != req.leader.name || r.epoch != req.leader.epoch {
        let why = format!(
            "{name} has seen epoch {}, the request is for {} (epoch {}) and etcd's leader is {} (epoch {})",
            req.my_epoch, r.from, r.epoch, req.leader.name, req.leader.epoch
        );
        let failed = SwitchoverRecord {
            state: SwitchoverState::Failed,
            error: Some(why.clone()),
            ..r.clone()
        };
        let _ = cluster.update_switchover(&failed, req.rev).await;
        bail!("switchover refused: {why}");
    }
    // The claim can only shorten the command's deadline, so a command
    // that never saw the claim still knows when the request ends.
    let mine =
        now + (Duration::from_millis(r.catch_up_timeout_ms) + CLAIM_SLACK).as_millis() as u64;
    let deadline = r.deadline_unix_ms.map_or(mine, |d| d.min(mine));
    let claimed = SwitchoverRecord {
        state: SwitchoverState::Claimed,
        deadline_unix_ms: Some(deadline),
        ..r.clone()
    };
    match cluster.update_switchover(&claimed, req.rev).await? {
        Some(rev) => {
            tracing::warn!(from = %r.from, epoch = r.epoch, deadline_unix_ms = deadline, "switchover to this standby asked: claimed; catching up");
            Ok((rev, deadline))
        }
        None => bail!("the switchover request changed before this standby claimed it"),
    }
}

/// Records why the switchover failed, for the command; nothing changed.
async fn fail_request(cluster: &Cluster, req: &Request, rev: i64, error: &anyhow::Error) {
    tracing::error!(error = %format!("{error:#}"), "switchover FAILED before the leader key moved: nothing changed, following the primary again");
    let failed = SwitchoverRecord {
        state: SwitchoverState::Failed,
        error: Some(format!("{error:#}")),
        ..req.record.clone()
    };
    if let Err(e) = cluster.update_switchover(&failed, rev).await {
        tracing::warn!(error = %e, "cannot record the failed switchover in etcd");
    }
}

/// The take-over transaction, run from promote's thread.
struct TakeOver {
    cluster: Cluster,
    req: Request,
    rev: i64,
    name: String,
    lease: i64,
    reason: String,
    /// The claim's deadline: no take-over is sent after it.
    deadline_unix_ms: u64,
    moved: Arc<Mutex<Option<Instant>>>,
    runtime: tokio::runtime::Handle,
}

impl TakeOver {
    fn run(&self, end: tandem_shared::LogPosition) -> Result<()> {
        self.runtime.block_on(self.take(end))
    }

    async fn take(&self, end: tandem_shared::LogPosition) -> Result<()> {
        tandem_coord::test_hook::pause("before-take-over").await;
        let now = tandem_shared::now_unix_ms();
        if now >= self.deadline_unix_ms {
            bail!("the switchover claim's deadline passed before the leader key could move (the catch-up and the primary's answers took longer than --catch-up-timeout-secs + {} s): the leader key did not move; nothing was changed", CLAIM_SLACK.as_secs());
        }
        let epoch = self.req.my_epoch + 1;
        let leader = LeaderRecord {
            name: self.name.clone(),
            epoch,
            state: LeaderState::Promoting,
            address: None,
            env_id: self.req.env_id.clone(),
            unix_ms: now,
        };
        let sent = Instant::now();
        let answer = self
            .cluster
            .take_over(
                self.req.epoch_rev,
                self.req.leader_lease,
                self.rev,
                &EpochRecord {
                    epoch,
                    name: self.name.clone(),
                    unix_ms: now,
                },
                &leader,
                self.lease,
                &FailoverRecord {
                    name: self.name.clone(),
                    epoch,
                    kind: "switchover".into(),
                    reason: format!("{}; the primary's end of log {end}", self.reason),
                    unix_ms: now,
                    from_lease: Some(self.req.leader_lease),
                    from_address: self.req.leader.address.clone(),
                },
            )
            .await;
        let answer = match answer {
            Ok(true) if tandem_coord::test_hook::armed("lose-take-over-answer") => {
                tandem_coord::test_hook::pause("lose-take-over-answer").await;
                Err(tandem_coord::Error::Etcd(
                    "TEST HOOK: the answer was lost".into(),
                ))
            }
            a => a,
        };
        let took = match answer {
            Ok(t) => t,
            Err(e) => self.read_back(epoch, sent, &e).await?,
        };
        if !took {
            bail!("the cluster changed during the switchover (the leader key or the epoch moved, or the request was withdrawn): the leader key did not move; nothing was changed");
        }
        if let Ok(mut m) = self.moved.lock() {
            *m = Some(Instant::now());
        }
        tracing::warn!(epoch, from = %self.req.leader.name, "switchover: the leader key moved to this standby");
        // The old primary's keeper learns at its next keepalive.
        if let Err(e) = self.cluster.revoke(self.req.leader_lease).await {
            tracing::warn!(error = %e, "cannot revoke the old primary's lease; it fences on its own clock");
        }
        Ok(())
    }

    /// The transaction's answer was lost: reads the leader key back until
    /// etcd answers, while the old primary could still be acting.
    async fn read_back(&self, epoch: u64, sent: Instant, e: &tandem_coord::Error) -> Result<bool> {
        tracing::warn!(error = %e, "no answer to the switchover transaction: reading the leader key back");
        let until = sent + self.cluster.timing.fence_after();
        while Instant::now() < until {
            if let Ok(s) = self.cluster.snapshot().await {
                return Ok(s
                    .view
                    .leader
                    .is_some_and(|l| l.name == self.name && l.epoch == epoch)
                    && s.leader_lease == self.lease);
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        bail!("etcd did not answer whether the leader key moved ({e}); the directory was not changed. This standby follows again; if etcd shows later that the key did move to it, it finishes the switchover by itself")
    }
}

/// Sets `stepped_down` once the old primary says it no longer acts as
/// primary, or nothing listens at its address any more (it exited: it
/// stops the moment it sees the new epoch); asked only after the leader
/// key moved.
async fn watch_old_primary(
    old: OldPrimary,
    moved: Arc<Mutex<Option<Instant>>>,
    stepped_down: Arc<Mutex<bool>>,
    stop: tokio_util::sync::CancellationToken,
) {
    let mut client = None;
    while !stop.is_cancelled() {
        if moved.lock().map(|m| m.is_some()).unwrap_or(false) {
            if client.is_none() {
                client = tandem_shared::client::connect(
                    &old.url,
                    old.server_name.as_deref(),
                    &old.tls,
                    Duration::from_secs(1),
                )
                .await
                .ok();
            }
            if let Some(c) = client.as_mut() {
                let asked = tokio::time::timeout(
                    Duration::from_secs(1),
                    c.status(tandem_shared::wire::StatusRequest {}),
                )
                .await;
                match asked {
                    Ok(Ok(s)) => {
                        let acting = s
                            .into_inner()
                            .coordination
                            .is_some_and(|c| c.leading && !c.fenced && c.lease_remaining_ms > 0);
                        if !acting {
                            tracing::info!(old = %old.url, "the old primary says it stopped acting as primary");
                            if let Ok(mut d) = stepped_down.lock() {
                                *d = true;
                            }
                            return;
                        }
                    }
                    _ => client = None,
                }
            }
            let url = old.url.clone();
            let gone = client.is_none()
                && tokio::task::spawn_blocking(move || {
                    tandem_shared::client::nothing_listens(&url, Duration::from_millis(500))
                })
                .await
                .unwrap_or(false);
            if gone {
                tracing::info!(old = %old.url, "nothing listens at the old primary's address any more: it exited");
                if let Ok(mut d) = stepped_down.lock() {
                    *d = true;
                }
                return;
            }
        }
        tokio::select! {
            _ = stop.cancelled() => return,
            _ = tokio::time::sleep(STEP_DOWN_POLL) => {}
        }
    }
}
