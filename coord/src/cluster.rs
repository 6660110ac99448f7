//! The etcd side: one connection, reads of the whole cluster in one
//! request, and the transactions that elect, publish and resign.
//!
//! Every request is bounded by the retry timeout; the client asks for a
//! member with a leader (`require_leader`), so a member cut off from the
//! quorum answers with an error rather than stale data.

use crate::policy::ClusterView;
use crate::records::{
    decode, encode, EpochRecord, FailoverRecord, FloorRecord, Keys, LeaderRecord, MemberRecord,
    PositionRecord, SwitchoverRecord,
};
use crate::timing::Timing;
use crate::Error;
use etcd_client::{
    Client, Compare, CompareOp, ConnectOptions, EventType, GetOptions, PutOptions, Txn, TxnOp,
    TxnResponse, WatchOptions,
};
use std::future::Future;

/// What etcd holds for a cluster, with the revisions the transactions
/// compare.
#[derive(Debug, Clone, Default)]
pub struct Snapshot {
    pub view: ClusterView,
    /// Mod revision of the epoch key (0: absent).
    pub epoch_rev: i64,
    /// Lease the leader key is attached to (0: absent).
    pub leader_lease: i64,
    /// Mod revision of the leader key (0: absent).
    pub leader_rev: i64,
    /// The cluster's revision when read.
    pub revision: i64,
    /// A planned switchover under way, and its key's mod revision.
    pub switchover: Option<SwitchoverRecord>,
    pub switchover_rev: i64,
}

/// A connection to etcd for one cluster.
#[derive(Clone)]
pub struct Cluster {
    client: Client,
    pub keys: Keys,
    pub timing: Timing,
}

/// Splits `a,b,c` into endpoints, refusing empty ones.
pub fn parse_endpoints(list: &str) -> Result<Vec<String>, Error> {
    let v: Vec<String> = list
        .split(',')
        .map(|s| s.trim().to_owned())
        .filter(|s| !s.is_empty())
        .collect();
    if v.is_empty() {
        return Err(Error::NoEndpoints);
    }
    Ok(v)
}

impl Cluster {
    /// Connects lazily: an unreachable etcd is found by the first request,
    /// so a primary can start (and fence) while etcd is down.
    pub async fn connect(
        endpoints: &[String],
        cluster: &str,
        timing: Timing,
    ) -> Result<Self, Error> {
        timing.validate()?;
        let keys = Keys::new(cluster)?;
        // No per-call timeout in the options: it would also end the
        // keepalive stream; each request is bounded here instead.
        let options = ConnectOptions::new()
            .with_connect_timeout(timing.retry_timeout)
            .with_keep_alive(timing.retry_timeout, timing.retry_timeout)
            .with_require_leader(true);
        let client = bounded(timing, Client::connect(endpoints, Some(options))).await?;
        Ok(Self {
            client,
            keys,
            timing,
        })
    }

    pub fn client(&self) -> Client {
        self.client.clone()
    }

    /// Reads every key of the cluster at one revision.
    pub async fn snapshot(&self) -> Result<Snapshot, Error> {
        let mut kv = self.client.kv_client();
        let resp = bounded(
            self.timing,
            kv.get(self.keys.prefix(), Some(GetOptions::new().with_prefix())),
        )
        .await?;
        let mut s = Snapshot {
            revision: resp.header().map_or(0, |h| h.revision()),
            ..Default::default()
        };
        let k = &self.keys;
        for item in resp.kvs() {
            let key = String::from_utf8_lossy(item.key()).into_owned();
            let value = item.value();
            if key == k.leader() {
                s.view.leader = Some(decode(&key, value)?);
                s.leader_lease = item.lease();
                s.leader_rev = item.mod_revision();
            } else if key == k.epoch() {
                s.view.epoch = Some(decode(&key, value)?);
                s.epoch_rev = item.mod_revision();
            } else if key == k.position() {
                s.view.position = Some(decode(&key, value)?);
            } else if key == k.floor() {
                s.view.floor = Some(decode(&key, value)?);
            } else if key == k.switchover() {
                // A bad request must not stop the cluster's rounds.
                match decode::<SwitchoverRecord>(&key, value) {
                    Ok(r) => {
                        s.switchover = Some(r);
                        s.switchover_rev = item.mod_revision();
                    }
                    Err(e) => tracing::warn!(error = %e, "ignoring a switchover record"),
                }
            } else if key.starts_with(&k.members()) {
                // One bad member record must not blind the others.
                match decode::<MemberRecord>(&key, value) {
                    Ok(m) => s.view.members.push(m),
                    Err(e) => tracing::warn!(error = %e, "ignoring a member record"),
                }
            }
        }
        Ok(s)
    }

    /// Sends one transaction, bounded by the retry timeout: every write
    /// Tandem makes under a condition goes through here.
    async fn send(&self, txn: Txn) -> Result<TxnResponse, Error> {
        let mut kv = self.client.kv_client();
        bounded(self.timing, kv.txn(txn)).await
    }

    /// [`Cluster::send`]: whether the transaction's conditions held (and
    /// its writes were made).
    async fn commit(&self, txn: Txn) -> Result<bool, Error> {
        Ok(self.send(txn).await?.succeeded())
    }

    /// Grants a lease of the configured ttl.
    pub async fn grant(&self) -> Result<i64, Error> {
        let mut lease = self.client.lease_client();
        let r = bounded(self.timing, lease.grant(self.timing.ttl_secs(), None)).await?;
        Ok(r.id())
    }

    /// One keepalive on a fresh stream: the lease's ttl, 0 when etcd no
    /// longer has it.
    pub async fn keep_alive_once(&self, lease: i64) -> Result<i64, Error> {
        let mut l = self.client.lease_client();
        match bounded(self.timing, l.keep_alive(lease)).await {
            Ok(_) => Ok(self.timing.ttl_secs()),
            Err(Error::Etcd(m)) if m.contains("not found") => Ok(0),
            Err(e) => Err(e),
        }
    }

    pub async fn revoke(&self, lease: i64) -> Result<(), Error> {
        let mut l = self.client.lease_client();
        bounded(self.timing, l.revoke(lease)).await?;
        Ok(())
    }

    /// The election: takes `epoch` and the leader key under `lease`, if and
    /// only if nobody changed the epoch key since it was read at
    /// `epoch_rev` (0: it must not exist) and nobody holds the leader key.
    /// True when this candidate won.
    pub async fn elect(
        &self,
        epoch_rev: i64,
        epoch: &EpochRecord,
        leader: &LeaderRecord,
        lease: i64,
        failover: Option<&FailoverRecord>,
    ) -> Result<bool, Error> {
        let k = &self.keys;
        let epoch_cmp = if epoch_rev == 0 {
            Compare::create_revision(k.epoch(), CompareOp::Equal, 0)
        } else {
            Compare::mod_revision(k.epoch(), CompareOp::Equal, epoch_rev)
        };
        let mut ops = vec![
            TxnOp::put(k.epoch(), encode(epoch), None),
            TxnOp::put(
                k.leader(),
                encode(leader),
                Some(PutOptions::new().with_lease(lease)),
            ),
        ];
        if let Some(f) = failover {
            ops.push(TxnOp::put(k.failover(), encode(f), None));
        }
        let txn = Txn::new()
            .when(vec![
                epoch_cmp,
                Compare::create_revision(k.leader(), CompareOp::Equal, 0),
            ])
            .and_then(ops);
        self.commit(txn).await
    }

    /// Rewrites the leader key (and optionally the position and floor)
    /// only while it is still attached to `lease`: a primary whose lease
    /// expired cannot bring its record back.
    pub async fn update_as_leader(
        &self,
        lease: i64,
        leader: Option<&LeaderRecord>,
        position: Option<&PositionRecord>,
        floor: Option<&FloorRecord>,
    ) -> Result<bool, Error> {
        let k = &self.keys;
        let mut ops = Vec::new();
        if let Some(l) = leader {
            ops.push(TxnOp::put(
                k.leader(),
                encode(l),
                Some(PutOptions::new().with_lease(lease)),
            ));
        }
        if let Some(p) = position {
            ops.push(TxnOp::put(k.position(), encode(p), None));
        }
        if let Some(f) = floor {
            ops.push(TxnOp::put(k.floor(), encode(f), None));
        }
        let txn = Txn::new()
            .when(vec![Compare::lease(k.leader(), CompareOp::Equal, lease)])
            .and_then(ops);
        self.commit(txn).await
    }

    /// Asks for a planned switchover: writes `request` under `lease` if and
    /// only if the leader key is still on `leader_lease`, the epoch key is
    /// unchanged since `epoch_rev` and no other switchover is under way:
    /// the request key is absent (`replace_rev` 0) or still the expired
    /// request read at mod revision `replace_rev`.
    pub async fn request_switchover(
        &self,
        request: &SwitchoverRecord,
        leader_lease: i64,
        epoch_rev: i64,
        lease: i64,
        replace_rev: i64,
    ) -> Result<bool, Error> {
        let k = &self.keys;
        let request_cmp = if replace_rev == 0 {
            Compare::create_revision(k.switchover(), CompareOp::Equal, 0)
        } else {
            Compare::mod_revision(k.switchover(), CompareOp::Equal, replace_rev)
        };
        let txn = Txn::new()
            .when(vec![
                Compare::lease(k.leader(), CompareOp::Equal, leader_lease),
                Compare::mod_revision(k.epoch(), CompareOp::Equal, epoch_rev),
                request_cmp,
            ])
            .and_then(vec![TxnOp::put(
                k.switchover(),
                encode(request),
                Some(PutOptions::new().with_lease(lease)),
            )]);
        self.commit(txn).await
    }

    /// Rewrites the switchover record (its state) only if nobody changed
    /// it since `rev`; it keeps the requesting command's lease.
    pub async fn update_switchover(
        &self,
        record: &SwitchoverRecord,
        rev: i64,
    ) -> Result<Option<i64>, Error> {
        let k = &self.keys;
        let txn = Txn::new()
            .when(vec![Compare::mod_revision(
                k.switchover(),
                CompareOp::Equal,
                rev,
            )])
            .and_then(vec![TxnOp::put(
                k.switchover(),
                encode(record),
                Some(PutOptions::new().with_ignore_lease()),
            )]);
        let r = self.send(txn).await?;
        Ok(r.succeeded()
            .then(|| r.header().map_or(0, |h| h.revision())))
    }

    /// Removes the switchover record if nobody changed it since `rev`.
    pub async fn remove_switchover(&self, rev: i64) -> Result<bool, Error> {
        let k = &self.keys;
        let txn = Txn::new()
            .when(vec![Compare::mod_revision(
                k.switchover(),
                CompareOp::Equal,
                rev,
            )])
            .and_then(vec![TxnOp::delete(k.switchover(), None)]);
        self.commit(txn).await
    }

    /// The planned switchover's one step: the leader key moves from the
    /// primary's lease `old_lease` to `leader` under `lease`, with the new
    /// epoch, in one transaction that holds only while the epoch key is
    /// unchanged since `epoch_rev`, the leader key is still on `old_lease`
    /// and the claimed request is unchanged since `switchover_rev`. The
    /// leader key is never absent, so no election can start; and the old
    /// primary can no longer update it (its writes compare its lease).
    #[allow(clippy::too_many_arguments)]
    pub async fn take_over(
        &self,
        epoch_rev: i64,
        old_lease: i64,
        switchover_rev: i64,
        epoch: &EpochRecord,
        leader: &LeaderRecord,
        lease: i64,
        failover: &FailoverRecord,
    ) -> Result<bool, Error> {
        let k = &self.keys;
        let txn = Txn::new()
            .when(vec![
                Compare::mod_revision(k.epoch(), CompareOp::Equal, epoch_rev),
                Compare::lease(k.leader(), CompareOp::Equal, old_lease),
                Compare::mod_revision(k.switchover(), CompareOp::Equal, switchover_rev),
            ])
            .and_then(vec![
                TxnOp::put(k.epoch(), encode(epoch), None),
                TxnOp::put(
                    k.leader(),
                    encode(leader),
                    Some(PutOptions::new().with_lease(lease)),
                ),
                TxnOp::put(k.failover(), encode(failover), None),
                TxnOp::delete(k.switchover(), None),
            ]);
        self.commit(txn).await
    }

    /// Waits until the leader key is no longer attached to `lease`: it was
    /// deleted (the lease expired or was revoked) or rewritten under
    /// another lease (a switchover's take-over). Returns what happened.
    /// Reads the key once, then watches it from the next revision, so a
    /// move between the two is not missed. Err when etcd cannot be asked
    /// or the watch breaks: the caller retries, and its lease clock stays
    /// the backstop.
    pub async fn leader_left(&self, lease: i64) -> Result<String, Error> {
        let key = self.keys.leader();
        let mut kv = self.client.kv_client();
        let now = bounded(self.timing, kv.get(key.as_bytes(), None)).await?;
        if let Some(why) = now.kvs().first().map_or_else(
            || Some("the leader key is gone (its lease expired or was revoked)".to_owned()),
            |item| left(&key, item.lease(), item.value(), lease),
        ) {
            return Ok(why);
        }
        let from = now.header().map_or(0, |h| h.revision()) + 1;
        let mut w = self.client.watch_client();
        let mut stream = bounded(
            self.timing,
            w.watch(
                key.as_bytes(),
                Some(WatchOptions::new().with_start_revision(from)),
            ),
        )
        .await?;
        loop {
            let msg = stream
                .message()
                .await
                .map_err(|e| Error::Etcd(e.to_string()))?
                .ok_or_else(|| Error::Etcd("the watch of the leader key ended".into()))?;
            if msg.canceled() {
                return Err(Error::Etcd(format!(
                    "the watch of the leader key was cancelled: {}",
                    msg.cancel_reason()
                )));
            }
            for ev in msg.events() {
                let why = match (ev.event_type(), ev.kv()) {
                    (EventType::Delete, _) | (_, None) => Some(
                        "the leader key was deleted (its lease expired or was revoked)".to_owned(),
                    ),
                    (EventType::Put, Some(item)) => left(&key, item.lease(), item.value(), lease),
                };
                if let Some(why) = why {
                    return Ok(why);
                }
            }
        }
    }

    /// Resolves when etcd shows, after `revision` (a snapshot's), a change
    /// a standby's round must answer at once rather than at its next loop
    /// wait: the leader, epoch or switchover key written or deleted, or
    /// another member's record deleted or published after a vacancy it had
    /// not published after before ([`wakes_a_standby`]). Returns the key.
    /// Err when etcd cannot be asked, the revision was compacted or the
    /// watch breaks: the caller then waits its loop wait.
    pub async fn standby_wake(&self, revision: i64, me: &str) -> Result<String, Error> {
        let mut w = self.client.watch_client();
        let options = WatchOptions::new()
            .with_prefix()
            .with_prev_key()
            .with_start_revision(revision + 1);
        let mut stream = bounded(self.timing, w.watch(self.keys.prefix(), Some(options))).await?;
        loop {
            let msg = stream
                .message()
                .await
                .map_err(|e| Error::Etcd(e.to_string()))?
                .ok_or_else(|| Error::Etcd("the watch of the cluster ended".into()))?;
            if msg.canceled() {
                return Err(Error::Etcd(format!(
                    "the watch of the cluster was cancelled: {}",
                    msg.cancel_reason()
                )));
            }
            for ev in msg.events() {
                let Some(kv) = ev.kv() else { continue };
                let key = String::from_utf8_lossy(kv.key()).into_owned();
                let now = match ev.event_type() {
                    EventType::Delete => None,
                    EventType::Put => Some((kv.value(), kv.lease())),
                };
                let before = ev.prev_kv().map(|p| (p.value(), p.lease()));
                if wakes_a_standby(&self.keys, me, &key, now, before) {
                    return Ok(key);
                }
            }
        }
    }

    /// Grants a lease of `ttl_secs` (for a request that must go by itself).
    pub async fn grant_secs(&self, ttl_secs: i64) -> Result<i64, Error> {
        let mut lease = self.client.lease_client();
        let r = bounded(self.timing, lease.grant(ttl_secs, None)).await?;
        Ok(r.id())
    }

    /// Publishes a standby's record under its own lease.
    pub async fn publish_member(&self, record: &MemberRecord, lease: i64) -> Result<(), Error> {
        let mut kv = self.client.kv_client();
        bounded(
            self.timing,
            kv.put(
                self.keys.member(&record.name),
                encode(record),
                Some(PutOptions::new().with_lease(lease)),
            ),
        )
        .await?;
        Ok(())
    }

    /// The last failover record, if any.
    pub async fn last_failover(&self) -> Result<Option<FailoverRecord>, Error> {
        let mut kv = self.client.kv_client();
        let key = self.keys.failover();
        let r = bounded(self.timing, kv.get(key.as_bytes(), None)).await?;
        r.kvs()
            .first()
            .map(|item| decode(&key, item.value()))
            .transpose()
    }
}

/// Why the leader key at `key`, on `on_lease` holding `value`, is no
/// longer `lease`'s; None while it is.
fn left(key: &str, on_lease: i64, value: &[u8], lease: i64) -> Option<String> {
    if on_lease == lease {
        return None;
    }
    Some(match decode::<LeaderRecord>(key, value) {
        Ok(l) => format!(
            "the leader key moved to {} (epoch {}) under another lease",
            l.name, l.epoch
        ),
        Err(_) => "the leader key was rewritten under another lease".into(),
    })
}

/// A key's value and the lease it is under, as a watch event carries it.
type Held<'a> = (&'a [u8], i64);

/// Whether a change of `key` (`now`: the value put, None for a delete;
/// `before`: what it replaced) wakes standby `me` before its loop wait.
/// The leader key going is the vacancy every standby must publish its
/// final position for, and the records they then publish are what each
/// election waits for (policy rule 6): answering them at once takes up to
/// two loop waits out of a failover. What the daemons republish every
/// loop wait wakes nobody: the leader's record with a new time, members'
/// records whose `leaderless_since` did not change (so two standbys that
/// wake each other converge after one publication each), the position and
/// the floor.
fn wakes_a_standby(
    keys: &Keys,
    me: &str,
    key: &str,
    now: Option<Held<'_>>,
    before: Option<Held<'_>>,
) -> bool {
    if key == keys.leader() {
        let leader = |(v, lease): Held<'_>| {
            let record = serde_json::from_slice::<LeaderRecord>(v).ok();
            (record.map(|r| LeaderRecord { unix_ms: 0, ..r }), lease)
        };
        return now.map(leader) != before.map(leader);
    }
    if key == keys.epoch() || key == keys.switchover() {
        return true;
    }
    let Some(name) = key.strip_prefix(&keys.members()) else {
        return false;
    };
    if name == me {
        return false;
    }
    let since = |(v, _): Held<'_>| {
        serde_json::from_slice::<MemberRecord>(v)
            .ok()
            .and_then(|m| m.leaderless_since)
    };
    match now.map(since) {
        None => true,
        Some(now) => now.is_some() && now != before.and_then(since),
    }
}

/// Bounds one etcd request by the retry timeout.
pub async fn bounded<T>(
    timing: Timing,
    f: impl Future<Output = Result<T, etcd_client::Error>>,
) -> Result<T, Error> {
    match tokio::time::timeout(timing.retry_timeout, f).await {
        Ok(Ok(v)) => Ok(v),
        Ok(Err(e)) => Err(Error::Etcd(e.to_string())),
        Err(_) => Err(Error::Timeout(timing.retry_timeout)),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_standby_wakes_for_the_vacancy_and_the_records_published_after_it() {
        let keys = Keys::new("c").unwrap();
        let member = |name: &str, since: Option<i64>| {
            encode(&MemberRecord {
                name: name.into(),
                epoch: 1,
                durable: tandem_shared::LogPosition::new(1, 100),
                recoverable: true,
                unix_ms: 1,
                leaderless_since: since,
            })
        };
        let leader = |epoch: u64, unix_ms: u64| {
            encode(&LeaderRecord {
                name: "p".into(),
                epoch,
                state: crate::records::LeaderState::Primary,
                address: Some("https://127.0.0.1:1".into()),
                env_id: None,
                unix_ms,
            })
        };
        let wakes = |key: &str, now: Option<&[u8]>, before: Option<&[u8]>| {
            wakes_a_standby(&keys, "a", key, now.map(|v| (v, 5)), before.map(|v| (v, 5)))
        };
        // The leader key: gone, new, another leader or lease, not the
        // leader's own republishing with a new time.
        let l = keys.leader();
        let (l1, l1_later, l2) = (leader(1, 10), leader(1, 20), leader(2, 30));
        assert!(wakes(&l, None, Some(&l1)));
        assert!(wakes(&l, Some(&l1), None));
        assert!(wakes(&l, Some(&l2), Some(&l1)));
        assert!(wakes_a_standby(
            &keys,
            "a",
            &l,
            Some((&l1, 6)),
            Some((&l1, 5))
        ));
        assert!(!wakes(&l, Some(&l1_later), Some(&l1)));
        // The epoch and a switchover, whatever they hold.
        assert!(wakes(&keys.epoch(), Some(b"x"), None));
        assert!(wakes(&keys.switchover(), Some(b"x"), Some(b"y")));
        // A peer's first record after the vacancy, and a peer gone.
        let (b_held, b_vacant) = (member("b", None), member("b", Some(7)));
        let b = keys.member("b");
        assert!(wakes(&b, Some(&b_vacant), Some(&b_held)));
        assert!(wakes(&b, Some(&b_vacant), None));
        assert!(wakes(&b, None, Some(&b_vacant)));
        // Not: the rounds' republished records, with or without a vacancy
        // (two standbys would wake each other for ever), nor this
        // standby's own, nor the primary's position and floor.
        assert!(!wakes(&b, Some(&b_vacant), Some(&b_vacant)));
        assert!(!wakes(&b, Some(&b_held), Some(&b_held)));
        assert!(!wakes(&b, Some(&b_held), Some(&b_vacant)));
        assert!(!wakes(&keys.member("a"), Some(&member("a", Some(7))), None));
        assert!(!wakes(&keys.position(), Some(b"x"), None));
        assert!(!wakes(&keys.floor(), Some(b"x"), None));
        // A record that does not parse wakes nobody.
        assert!(!wakes(&b, Some(b"garbage"), None));
    }
}
