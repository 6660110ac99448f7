//! Keeping a lease alive, and the fencing clock that goes with it.
//!
//! The keeper renews every [`Timing::keepalive_interval`], and after a
//! failure retries every [`RETRY_AFTER_FAILURE`], each attempt bounded by
//! the retry timeout. The clock that matters is the *send* time of the
//! last keepalive etcd answered: etcd restarted the lease's ttl at some
//! moment after that send, so it cannot expire the lease before
//! `send + ttl`, and a holder that stops acting at `send + ttl − margin`
//! has stopped before anyone else can take over. Counting from the
//! answer's arrival instead would let a slow answer push the holder's
//! deadline past etcd's.

use crate::cluster::Cluster;
use crate::timing::Timing;
use etcd_client::{LeaseKeepAliveStream, LeaseKeeper};
use std::time::Duration;
use tokio::sync::watch;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

/// Pause before the next keepalive after one failed.
pub const RETRY_AFTER_FAILURE: Duration = Duration::from_millis(200);

/// The lease as the keeper last knew it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct LeaseState {
    pub id: i64,
    /// Until then the holder may act on the lease.
    pub valid_until: Instant,
    /// etcd answered that the lease no longer exists: it expired or was
    /// revoked, and it never comes back.
    pub lost: bool,
    /// Failed keepalives since the last answered one.
    pub failures: u32,
}

impl LeaseState {
    pub fn valid(&self, now: Instant) -> bool {
        !self.lost && now < self.valid_until
    }

    pub fn remaining(&self, now: Instant) -> Duration {
        if self.lost {
            Duration::ZERO
        } else {
            self.valid_until.saturating_duration_since(now)
        }
    }
}

/// Renews `lease` until `stop`, publishing its state. `granted_at`: when
/// the grant request was sent (the lease's first ttl runs from no earlier).
pub fn spawn(
    cluster: Cluster,
    lease: i64,
    granted_at: Instant,
    stop: CancellationToken,
) -> (watch::Receiver<LeaseState>, tokio::task::JoinHandle<()>) {
    let timing = cluster.timing;
    let (tx, rx) = watch::channel(LeaseState {
        id: lease,
        valid_until: granted_at + timing.fence_after(),
        lost: false,
        failures: 0,
    });
    let task = tokio::spawn(async move {
        let mut stream: Option<(LeaseKeeper, LeaseKeepAliveStream)> = None;
        let mut next = Instant::now() + timing.keepalive_interval();
        loop {
            tokio::select! {
                _ = stop.cancelled() => return,
                _ = tokio::time::sleep_until(next) => {}
            }
            let sent = Instant::now();
            match renew(&cluster, lease, &mut stream, timing).await {
                Ok(ttl) if ttl > 0 => {
                    tx.send_modify(|s| {
                        s.valid_until = s.valid_until.max(sent + timing.fence_after());
                        s.failures = 0;
                    });
                    next = sent + timing.keepalive_interval();
                }
                Ok(_) => {
                    tracing::error!(lease, "etcd says the lease is gone (expired or revoked)");
                    tx.send_modify(|s| s.lost = true);
                    return;
                }
                Err(e) => {
                    stream = None;
                    tx.send_modify(|s| s.failures += 1);
                    let left = tx.borrow().remaining(Instant::now());
                    tracing::warn!(lease, error = %e, left_ms = left.as_millis() as u64, "cannot renew the lease");
                    next = Instant::now() + RETRY_AFTER_FAILURE;
                }
            }
        }
    });
    (rx, task)
}

/// One keepalive, on the open stream or a new one.
async fn renew(
    cluster: &Cluster,
    lease: i64,
    stream: &mut Option<(LeaseKeeper, LeaseKeepAliveStream)>,
    timing: Timing,
) -> Result<i64, crate::Error> {
    let attempt = async {
        if let Some((keeper, s)) = stream.as_mut() {
            keeper.keep_alive().await?;
            return match s.message().await? {
                Some(r) => Ok(r.ttl()),
                None => Err(etcd_client::Error::LeaseKeepAliveError(
                    "the keepalive stream ended".into(),
                )),
            };
        }
        // Opening the stream sends the first keepalive and reads its answer.
        let mut client = cluster.client().lease_client();
        match client.keep_alive(lease).await {
            Ok(opened) => {
                *stream = Some(opened);
                Ok(1)
            }
            Err(etcd_client::Error::LeaseKeepAliveError(m)) if m.contains("not found") => Ok(0),
            Err(e) => Err(e),
        }
    };
    crate::cluster::bounded(timing, attempt).await
}
