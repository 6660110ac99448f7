//! Issue #20, the etcd side alone: the lease keeper's fencing clock and the
//! election transaction against a real 3-member etcd on loopback.

use anyhow::{ensure, Context, Result};
use std::time::{Duration, Instant};
use tandem_coord::policy::{decide, Candidate, Verdict};
use tandem_coord::records::{EpochRecord, LeaderRecord, LeaderState, PositionRecord};
use tandem_coord::{Cluster, Snapshot, Timing};
use tandem_shared::LogPosition;
use tandem_tests::etcd::EtcdCluster;
use tandem_tests::faulty_link::FaultyLink;
use tokio_util::sync::CancellationToken;

fn timing(ttl: u64) -> Timing {
    Timing {
        ttl: Duration::from_secs(ttl),
        loop_wait: Duration::from_millis(500),
        retry_timeout: Duration::from_millis(1000),
        fence_margin: Duration::from_millis(500),
    }
}

fn leader(name: &str, epoch: u64) -> LeaderRecord {
    LeaderRecord {
        name: name.into(),
        epoch,
        state: LeaderState::Primary,
        address: None,
        env_id: None,
        unix_ms: 0,
    }
}

fn epoch(name: &str, epoch: u64) -> EpochRecord {
    EpochRecord {
        epoch,
        name: name.into(),
        unix_ms: 0,
    }
}

/// The holder of a lease cut off from every etcd member stops acting on it
/// (its fencing clock runs out) before etcd expires it, and etcd expires it
/// within the ttl (plus etcd's own expiry granularity) of the last renewal.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_cut_off_holder_fences_before_etcd_expires_its_lease() -> Result<()> {
    let etcd = EtcdCluster::start()?;
    let links: Vec<FaultyLink> = (0..3)
        .map(|i| FaultyLink::start(etcd.client_addr(i)))
        .collect::<Result<_>>()?;
    let endpoints: Vec<String> = links
        .iter()
        .map(|l| format!("http://{}", l.addr()))
        .collect();
    let t = timing(3);
    let cluster = Cluster::connect(&endpoints, "lease", t).await?;
    let sent = tokio::time::Instant::now();
    let lease = cluster.grant().await?;
    let stop = CancellationToken::new();
    let (state, _keeper) = tandem_coord::lease::spawn(cluster.clone(), lease, sent, stop.clone());
    ensure!(
        cluster
            .elect(0, &epoch("p", 1), &leader("p", 1), lease, None)
            .await?
    );
    let key = cluster.keys.leader();

    // Renewed past twice its ttl.
    tokio::time::sleep(2 * t.ttl).await;
    ensure!(
        state.borrow().valid(tokio::time::Instant::now()),
        "{:?}",
        *state.borrow()
    );
    ensure!(
        etcd.get(&key)?.is_some(),
        "the leader key vanished while renewed"
    );

    let cut = Instant::now();
    links.iter().for_each(FaultyLink::cut);
    let mut fenced = None;
    let mut gone = None;
    while gone.is_none() && cut.elapsed() < Duration::from_secs(10) {
        let now = tokio::time::Instant::now();
        if fenced.is_none() && !state.borrow().valid(now) {
            fenced = Some(cut.elapsed());
            // Checked right after the fence: etcd still holds the key.
            ensure!(
                etcd.get(&key)?.is_some(),
                "etcd expired the lease before its holder fenced ({:?} after the cut)",
                cut.elapsed()
            );
        }
        if etcd.get(&key)?.is_none() {
            gone = Some(cut.elapsed());
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let fenced = fenced.context("the holder never fenced")?;
    let gone = gone.context("etcd never expired the lease")?;
    eprintln!(
        "fenced {fenced:?} and lease gone {gone:?} after the cut (ttl {:?})",
        t.ttl
    );
    ensure!(fenced < gone, "fenced at {fenced:?}, gone at {gone:?}");
    ensure!(fenced <= t.ttl, "fenced only {fenced:?} after the cut");
    ensure!(
        gone <= t.ttl + Duration::from_millis(1500),
        "gone only {gone:?} after the cut"
    );
    stop.cancel();
    Ok(())
}

/// Two standbys that both believe they may promote (neither sees the
/// other's record yet) race the election: exactly one wins, every time, and
/// the loser's view was stale. 20 trials on fresh cluster names.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_racing_standbys_exactly_one_wins_20_trials() -> Result<()> {
    let etcd = EtcdCluster::start()?;
    let endpoints: Vec<String> = etcd.endpoints().split(',').map(str::to_owned).collect();
    let t = timing(4);
    for trial in 0..20 {
        let name = format!("race-{trial}");
        let a = Cluster::connect(&endpoints, &name, t).await?;
        let b = Cluster::connect(&endpoints, &name, t).await?;
        // The old primary's election, its published end, and its lease gone.
        let old = a.grant().await?;
        ensure!(
            a.elect(0, &epoch("p", 4), &leader("p", 4), old, None)
                .await?
        );
        let end = LogPosition::new(2, 100);
        let pos = PositionRecord {
            epoch: 4,
            end,
            lg_max: 1 << 20,
            unix_ms: 0,
        };
        ensure!(a.update_as_leader(old, None, Some(&pos), None).await?);
        a.revoke(old).await?;

        // Both look before either elects (under load one task could otherwise
        // elect before the other looked, and the test would race itself).
        let (sa, sb) = tokio::join!(a.snapshot(), b.snapshot());
        let (sa, sb) = (sa?, sb?);
        let run = |c: Cluster, snap: Snapshot, who: &'static str| async move {
            let me = Candidate {
                name: who.into(),
                epoch: 4,
                durable: LogPosition::new(2, 100),
                recoverable: true,
                max_lag_bytes: 0,
                // Both read their positions after the key went.
                leaderless_since: Some(snap.revision),
                last_leader_rev: 0,
            };
            let Verdict::Campaign { new_epoch, .. } = decide(&snap.view, &me) else {
                anyhow::bail!("{who} may not campaign: {:?}", decide(&snap.view, &me));
            };
            let lease = c.grant().await?;
            let won = c
                .elect(
                    snap.epoch_rev,
                    &epoch(who, new_epoch),
                    &LeaderRecord {
                        state: LeaderState::Promoting,
                        ..leader(who, new_epoch)
                    },
                    lease,
                    None,
                )
                .await?;
            anyhow::Ok((who, won))
        };
        let (ra, rb) = tokio::join!(run(a.clone(), sa, "a"), run(b.clone(), sb, "b"));
        let (ra, rb) = (ra?, rb?);
        ensure!(ra.1 ^ rb.1, "trial {trial}: a won {}, b won {}", ra.1, rb.1);
        let winner = if ra.1 { ra.0 } else { rb.0 };
        let snap = a.snapshot().await?;
        let l = snap.view.leader.context("no leader after the race")?;
        ensure!(l.name == winner && l.epoch == 5, "trial {trial}: {l:?}");
        ensure!(snap.view.epoch.map(|e| (e.epoch, e.name)) == Some((5, winner.to_owned())));
        // A latecomer with the old revision loses too.
        let late = b.grant().await?;
        ensure!(
            !b.elect(
                snap.epoch_rev - 1,
                &epoch("c", 5),
                &leader("c", 5),
                late,
                None
            )
            .await?,
            "a stale election won"
        );
    }
    Ok(())
}
