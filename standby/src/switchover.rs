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
//!    nothing changed), or the request's deadline passes: `--timeout-secs`
//!    for the pick-up, and once claimed the claim's own (catch-up timeout +
//!    [`crate::handover::CLAIM_SLACK`]). Past it the request counts as
//!    failed for everyone (the target moves no key after it) and the
//!    command removes it in a transaction on its revision, which the
//!    take-over compares too: a removal and a take-over cannot both
//!    succeed, whatever the clocks say. If etcd does not answer by then,
//!    the outcome is unknown ([`Unknown`], exit 8) and the message says
//!    what to check once it does.

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

/// The command could not learn how the switchover ended (etcd did not
/// answer); the message says what to check.
#[derive(Debug, thiserror::Error)]
#[error("switchover outcome UNKNOWN: {0}")]
pub struct Unknown(pub String);

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
    let now = tandem_shared::now_unix_ms();
    let target = tandem_coord::switchover::choose(
        &snap.view,
        snap.switchover.as_ref(),
        o.to.as_deref(),
        o.max_lag_bytes,
        now,
    )
    .map_err(|r| Refused(r.to_string()))?;
    let from = target.leader.name.clone();
    let to = target.member.name.clone();
    let epoch = target.leader.epoch;
    let (record, lease, keeper_stop) = ask(&cluster, o, &snap, &target).await?;
    tracing::info!(%from, %to, epoch, lag_bytes = target.lag_bytes, "switchover asked; waiting for the target");
    let outcome = wait(&cluster, o, &record, epoch, started).await;
    keeper_stop.cancel();
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

/// Writes the request under a lease of this command's, kept alive while it
/// runs (a command that dies takes its request along within the ttl):
/// the record, the lease and what stops its keeper.
async fn ask(
    cluster: &Cluster,
    o: &SwitchoverOptions,
    snap: &tandem_coord::Snapshot,
    target: &tandem_coord::switchover::Target,
) -> Result<(SwitchoverRecord, i64, tokio_util::sync::CancellationToken)> {
    let sent = tokio::time::Instant::now();
    let lease = cluster
        .grant()
        .await
        .context("cannot reach etcd; nothing was changed")?;
    let keeper_stop = tokio_util::sync::CancellationToken::new();
    let _keeper = tandem_coord::lease::spawn(cluster.clone(), lease, sent, keeper_stop.clone());
    let now = tandem_shared::now_unix_ms();
    let record = SwitchoverRecord {
        id: format!("{lease:x}-{now}"),
        from: target.leader.name.clone(),
        to: target.member.name.clone(),
        epoch: target.leader.epoch,
        catch_up_timeout_ms: o.catch_up_timeout.as_millis() as u64,
        state: SwitchoverState::Requested,
        error: None,
        unix_ms: now,
        // Picked up and the key moved by then, or failed for everyone.
        deadline_unix_ms: Some(now + o.timeout.as_millis() as u64),
    };
    // An expired request left behind is replaced (its revision compared).
    let replace = if snap.switchover.is_some() {
        snap.switchover_rev
    } else {
        0
    };
    let asked = cluster
        .request_switchover(&record, snap.leader_lease, snap.epoch_rev, lease, replace)
        .await;
    let refused = match asked {
        Ok(true) => return Ok((record, lease, keeper_stop)),
        Ok(false) => Refused(
            "the cluster changed while the switchover was asked (the leader key or the epoch moved, or another switchover began): run it again".into(),
        )
        .into(),
        // The request may have been written: it goes with its lease.
        Err(e) => anyhow::Error::new(e).context(
            "etcd did not answer the switchover request; it was withdrawn (if it was written at all)",
        ),
    };
    keeper_stop.cancel();
    let _ = cluster.revoke(lease).await;
    Err(refused)
}

/// What the command last saw of its request.
struct Seen {
    /// When the leader key was first seen on the target (since start).
    moved: Option<Duration>,
    /// The request's deadline (the claim moves it).
    deadline_unix_ms: u64,
    claimed: bool,
    /// etcd's error, while it does not answer.
    unreachable: Option<(Instant, String)>,
}

/// Waits for the outcome: (when the leader key moved, the new primary's
/// address, its epoch). A request past its deadline is removed (a
/// transaction on its revision, which the take-over compares too: once
/// the removal succeeded, the key can no longer move). If etcd does not
/// answer by then, the outcome is [`Unknown`].
async fn wait(
    cluster: &Cluster,
    o: &SwitchoverOptions,
    record: &SwitchoverRecord,
    epoch: u64,
    started: Instant,
) -> Result<(Duration, Option<String>, u64)> {
    let mut seen = Seen {
        moved: None,
        deadline_unix_ms: record.deadline_unix_ms.unwrap_or_default(),
        claimed: false,
        unreachable: None,
    };
    loop {
        match cluster.snapshot().await {
            Err(e) => {
                let since = seen.unreachable.take().map_or_else(Instant::now, |u| u.0);
                seen.unreachable = Some((since, e.to_string()));
            }
            Ok(s) => {
                seen.unreachable = None;
                if let Some(done) = look(cluster, o, record, epoch, started, &s, &mut seen).await? {
                    return Ok(done);
                }
            }
        }
        // A take-over sent just before the deadline may still be answered
        // within one request bound; the target's read-back is bounded too.
        let give_up = match seen.moved {
            Some(at) => Instant::now() >= started + at + o.timeout,
            None => {
                tandem_shared::now_unix_ms()
                    >= seen.deadline_unix_ms + o.timing.retry_timeout.as_millis() as u64
            }
        };
        if give_up {
            return Err(given_up(o, record, epoch, &seen));
        }
        tokio::time::sleep(POLL).await;
    }
}

/// One look at the cluster: the outcome if there is one.
async fn look(
    cluster: &Cluster,
    o: &SwitchoverOptions,
    record: &SwitchoverRecord,
    epoch: u64,
    started: Instant,
    s: &tandem_coord::Snapshot,
    seen: &mut Seen,
) -> Result<Option<(Duration, Option<String>, u64)>> {
    let mine = s.switchover.as_ref().filter(|r| r.id == record.id);
    if let Some(l) = s
        .view
        .leader
        .as_ref()
        .filter(|l| l.name == record.to && l.epoch > epoch)
    {
        let at = *seen.moved.get_or_insert_with(|| started.elapsed());
        if let (LeaderState::Primary, Some(addr)) = (l.state, &l.address) {
            return Ok(Some((at, Some(addr.clone()), l.epoch)));
        }
        return Ok(None);
    }
    let Some(r) = mine else {
        if seen.moved.is_none() {
            bail!(
                "the switchover request is gone but the leader key does not name {} (leader now: {}): it expired or was removed; check `tandem-standby status` on {}",
                record.to,
                s.view.leader.as_ref().map_or("none".into(), |l| format!("{} epoch {}", l.name, l.epoch)),
                record.to
            );
        }
        return Ok(None);
    };
    seen.claimed |= r.state == SwitchoverState::Claimed;
    if let Some(d) = r.deadline_unix_ms {
        seen.deadline_unix_ms = d;
    }
    if r.state == SwitchoverState::Failed {
        let _ = cluster.remove_switchover(s.switchover_rev).await;
        return Err(Refused(format!(
            "{} could not take over: {}",
            record.to,
            r.error.as_deref().unwrap_or("no reason given")
        ))
        .into());
    }
    if r.expired(tandem_shared::now_unix_ms())
        && cluster
            .remove_switchover(s.switchover_rev)
            .await
            .unwrap_or(false)
    {
        return Err(Refused(if seen.claimed {
            format!(
                "{} claimed the switchover but did not move the leader key by the claim's deadline (--catch-up-timeout-secs {} + {} s); the request was withdrawn, so the key can no longer move. Check `tandem-standby status` on {}",
                record.to,
                o.catch_up_timeout.as_secs(),
                crate::handover::CLAIM_SLACK.as_secs(),
                record.to
            )
        } else {
            format!(
                "{} did not pick the switchover up within {} s (does its `tandem-standby run --etcd` run?); the request was withdrawn",
                record.to,
                o.timeout.as_secs()
            )
        })
        .into());
    }
    Ok(None)
}

/// The error when the command stops waiting without an outcome.
fn given_up(
    o: &SwitchoverOptions,
    record: &SwitchoverRecord,
    epoch: u64,
    seen: &Seen,
) -> anyhow::Error {
    let key = format!("/tandem/{}/leader", o.cluster);
    match (&seen.unreachable, seen.moved) {
        (_, Some(_)) => anyhow::anyhow!(
            "the leader key moved to {} (epoch {}), which does not serve yet after {} s more. Check `tandem-standby status` on {}",
            record.to,
            epoch + 1,
            o.timeout.as_secs(),
            record.to
        ),
        (Some((since, e)), None) => Unknown(format!(
            "etcd has not answered for {:.1} s ({e}), so this command cannot tell whether the leader key moved to {}. The request counts as failed for everyone after its deadline ({} unix ms, passed): {} moves no key after it. Once etcd answers, `etcdctl get {key}` (or `tandem-standby status` on {}) tells: if it names {} at epoch {}, the switchover happened and {} finishes it by itself; otherwise nothing was changed, {} still serves, and the request goes with this command's lease",
            since.elapsed().as_secs_f64(),
            record.to,
            seen.deadline_unix_ms,
            record.to,
            record.to,
            record.to,
            epoch + 1,
            record.to,
            record.from
        ))
        .into(),
        (None, None) => Unknown(format!(
            "the request to {} is still there past its deadline ({} unix ms) and could not be removed; check `etcdctl get {key}` and `tandem-standby status` on {}",
            record.to, seen.deadline_unix_ms, record.to
        ))
        .into(),
    }
}
