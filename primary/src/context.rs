//! What every part of a running primary shares: the environment, its
//! identity, the end of its log, the standby registry and the stop signal.
//! The bottom of the crate: it depends on nothing above it, and the
//! server, the sessions, retention and metrics depend on it.

use crate::identity::PrimaryIdentity;
use crate::log_watch::LogEnd;
use crate::registry::StandbyRegistry;
use std::sync::atomic::AtomicU64;
use std::sync::Arc;
use std::time::Duration;
use tandem_shared::bdb::BdbTools;
use tandem_shared::envlayout::EnvLayout;
use tandem_shared::wire::PrimaryStatus;
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;

/// How often a session and a commit wait look at the fence.
const FENCE_POLL: Duration = Duration::from_millis(20);

#[derive(Debug, Default)]
pub struct Counters {
    pub file_bytes: AtomicU64,
    pub log_bytes: AtomicU64,
    pub chunks: AtomicU64,
    /// Database pages proven whole by BDB's page checksum after one read,
    /// and pages read until two reads agreed.
    pub pages_read_once: AtomicU64,
    pub pages_read_again: AtomicU64,
    pub sessions: AtomicU64,
    /// Hellos from standbys that had seen a newer epoch than this primary's.
    pub fenced_hellos: AtomicU64,
}

/// State shared by every session of one primary.
pub struct Shared {
    pub layout: EnvLayout,
    pub identity: PrimaryIdentity,
    pub log_end: watch::Receiver<LogEnd>,
    pub tools: BdbTools,
    pub heartbeat_interval: Duration,
    pub rescan_interval: Duration,
    /// `--fault-corrupt-chunk` (feature `test-hooks` only): corrupt the
    /// digest of the Nth chunk sent.
    #[cfg(feature = "test-hooks")]
    pub corrupt_chunk: Option<u64>,
    pub counters: Counters,
    /// `--compression`: whether sessions may use what a standby offers.
    pub compression: tandem_shared::compress::Compression,
    /// Chunk bytes before and after encoding, over all sessions.
    pub wire: Arc<tandem_shared::compress::WireStats>,
    pub registry: Arc<StandbyRegistry>,
    /// Figures of the commit waits served on the wait socket.
    pub waits: Arc<crate::wait::WaitStats>,
    /// Where commit → durable spends its time, stage by stage.
    pub timing: Arc<crate::timing::LogTiming>,
    /// Cancelled when the primary shuts down: sessions end their streams
    /// (so the server's graceful shutdown does not wait on them forever),
    /// retention and the log watcher stop.
    pub stop: CancellationToken,
    /// With `--etcd`: the leader key, the lease and the fence.
    pub leadership: Option<Arc<crate::leadership::Leadership>>,
}

impl Shared {
    pub fn status(&self) -> PrimaryStatus {
        let end = *self.log_end.borrow();
        PrimaryStatus {
            env_id: self.identity.env_id.clone(),
            epoch: self.identity.epoch,
            end: Some(end.end.into()),
            standbys: self.registry.status(end.end, end.lg_max),
            retention_blocked: self
                .registry
                .unreadable()
                .map(|why| {
                    format!(
                        "{why}; no log file is removed until the standbys file is repaired or removed"
                    )
                })
                .unwrap_or_default(),
            history: self.identity.history.iter().map(Into::into).collect(),
            fenced_hellos: self
                .counters
                .fenced_hellos
                .load(std::sync::atomic::Ordering::Relaxed),
            coordination: self
                .leadership
                .as_ref()
                .map(|l| l.standing().to_wire(l.cluster_name(), l.name())),
        }
    }
}

impl Shared {
    /// Why this primary may not act as primary now (`--etcd` only).
    pub fn fenced(&self) -> Option<String> {
        let l = self.leadership.as_ref()?;
        if l.acting() {
            return None;
        }
        let why = l.standing().fence_reason;
        Some(if why.is_empty() {
            "its lease clock ran out".to_owned()
        } else {
            why
        })
    }

    /// Resolves once this primary may no longer act as primary (never
    /// without `--etcd`). The fence clock is a deadline, not an event, so
    /// it is looked at often.
    pub async fn until_fenced(&self) {
        if self.leadership.is_none() {
            return std::future::pending().await;
        }
        while self.fenced().is_none() {
            tokio::time::sleep(FENCE_POLL).await;
        }
    }

    /// The blake3 digest a chunk travels with.
    pub fn digest(&self, data: &[u8]) -> bytes::Bytes {
        self.count_chunk(blake3::hash(data))
    }

    /// A file chunk's `pages_blake3`: blake3 of the blake3 of each of its
    /// pages (see the proto).
    pub fn pages_digest(&self, data: &[u8], page_size: usize) -> bytes::Bytes {
        let pages = tandem_shared::pages::page_hashes(data, page_size);
        self.count_chunk(blake3::hash(&pages))
    }

    /// Counts the chunk (`tandem_primary_chunks_sent_total`) and returns
    /// its digest as it travels.
    fn count_chunk(&self, digest: blake3::Hash) -> bytes::Bytes {
        let n = self
            .counters
            .chunks
            .fetch_add(1, std::sync::atomic::Ordering::Relaxed)
            + 1;
        #[cfg(feature = "test-hooks")]
        if self.corrupt_chunk == Some(n) {
            // The tests' fault injection: the standby sees a chunk whose
            // bytes do not match (as if flipped in transit, below TLS).
            tracing::warn!(chunk = n, "fault injection: corrupting this chunk's digest");
            let mut d = digest.as_bytes().to_vec();
            d[0] ^= 0xff;
            return bytes::Bytes::from(d);
        }
        let _ = n;
        bytes::Bytes::copy_from_slice(digest.as_bytes())
    }
}
