//! The primary's metrics page and its status as JSON (served by
//! [`tandem_shared::metrics::serve`] on `--metrics-listen`), built from a
//! snapshot on each scrape. The names are the interface: README's
//! monitoring table lists them, dashboards and alerts use them.

use crate::context::Shared;
use std::sync::atomic::Ordering;
use tandem_shared::metrics::MetricsPage;

/// A byte count or epoch as a gauge value (they stay far below 2^63).
fn int(v: u64) -> i64 {
    i64::try_from(v).unwrap_or(i64::MAX)
}

/// The metrics page of a running primary.
// Long function: one metric family after another, in the order the page
// lists them; splitting it would scatter the page's layout.
pub fn render(shared: &Shared) -> String {
    let c = &shared.counters;
    let status = shared.status();
    let lag: Vec<(String, i64)> = status
        .standbys
        .iter()
        .map(|s| (s.name.clone(), int(s.lag_bytes)))
        .collect();
    let held: Vec<(String, i64)> = status
        .standbys
        .iter()
        .map(|s| (s.name.clone(), int(s.held_back_bytes)))
        .collect();
    let for_archive: Vec<(String, i64)> = status
        .standbys
        .iter()
        .map(|s| (s.name.clone(), int(s.held_for_archive_bytes)))
        .collect();
    let connected: Vec<(String, i64)> = status
        .standbys
        .iter()
        .map(|s| (s.name.clone(), i64::from(s.connected)))
        .collect();
    let refused: Vec<(String, i64)> = status
        .standbys
        .iter()
        .map(|s| (s.name.clone(), i64::from(!s.refused.is_empty())))
        .collect();
    let end = status.end.unwrap_or_default();
    let mut page = MetricsPage::default();
    page.counter("tandem_primary_file_bytes_sent_total", "Database file bytes sent to standbys.", c.file_bytes.load(Ordering::Relaxed))
        .counter("tandem_primary_log_bytes_sent_total", "Log bytes sent to standbys.", c.log_bytes.load(Ordering::Relaxed))
        .counter("tandem_primary_chunks_sent_total", "File and log chunks sent.", c.chunks.load(Ordering::Relaxed))
        .counter("tandem_primary_chunk_payload_bytes_total", "File and log chunk payload bytes as read, before compression.", shared.wire.raw_bytes.load(Ordering::Relaxed))
        .counter("tandem_primary_chunk_wire_bytes_total", "The same chunks' payload bytes as sent, after compression.", shared.wire.sent_bytes.load(Ordering::Relaxed))
        .counter("tandem_primary_chunks_zstd_total", "Chunks sent zstd-compressed (the others went as they were).", shared.wire.zstd_chunks.load(Ordering::Relaxed))
        .counter("tandem_primary_zstd_attempts_total", "Whole chunks zstd was run on (a chunk whose sample did not compress is not tried); minus chunks_zstd: attempts wasted.", shared.wire.zstd_attempts.load(Ordering::Relaxed))
        .counter("tandem_primary_zstd_samples_total", "Chunks of 256 KiB or more judged by a 64 KiB sample (after four failed samples in a row, one chunk in 16 of that file).", shared.wire.zstd_samples.load(Ordering::Relaxed))
        .counter("tandem_primary_pages_read_once_total", "Database pages shipped after one read, proven whole by BDB's own page checksum (databases created with DB_CHKSUM).", c.pages_read_once.load(Ordering::Relaxed))
        .counter("tandem_primary_pages_read_again_total", "Database pages read until two reads agreed (databases without DB_CHKSUM, meta pages, pages a read caught mid-write).", c.pages_read_again.load(Ordering::Relaxed))
        .counter("tandem_primary_sessions_total", "Standby sessions started (connects and reconnects).", c.sessions.load(Ordering::Relaxed))
        .gauge_int("tandem_primary_log_end_file", "Log file number of the primary's end of verified log.", i64::from(end.file))
        .gauge_int("tandem_primary_log_end_offset_bytes", "Offset of the primary's end of verified log.", i64::from(end.offset))
        .gauge_int("tandem_primary_epoch", "The primary's epoch (fencing token).", int(shared.identity.epoch))
        .counter(
            "tandem_primary_fenced_hellos_total",
            "Standbys refused because they had seen a newer epoch: this primary is fenced (a standby was promoted past it).",
            c.fenced_hellos.load(Ordering::Relaxed),
        )
        .gauge_int(
            "tandem_primary_retention_blocked",
            "1 while log retention removes nothing because the known standbys cannot be read.",
            i64::from(!status.retention_blocked.is_empty()),
        )
        .gauge_by("tandem_primary_standby_lag_bytes", "Log bytes not yet acknowledged durable, per standby.", "standby", &lag)
        .gauge_by("tandem_primary_standby_retained_bytes", "Log bytes kept on the primary only for this standby (retention on).", "standby", &held)
        .gauge_by(
            "tandem_primary_standby_retained_for_archive_bytes",
            "Of the retained bytes, those kept only because the standby's continuous archive lacks them.",
            "standby",
            &for_archive,
        )
        .gauge_by("tandem_primary_standby_connected", "1 while the standby is connected.", "standby", &connected)
        .gauge_by(
            "tandem_primary_standby_refused",
            "1 while the standby's last Hello was refused (fenced, diverged, another environment).",
            "standby",
            &refused,
        )
        .counter("tandem_primary_commit_waits_total", "Waits for a commit to be durable on standbys (wait socket).", shared.waits.waits.load(Ordering::Relaxed))
        .counter("tandem_primary_commit_wait_timeouts_total", "Of those, waits that timed out.", shared.waits.timeouts.load(Ordering::Relaxed))
        .counter("tandem_primary_commit_wait_bad_requests_total", "Malformed or oversized requests refused on the wait socket.", shared.waits.bad_requests.load(Ordering::Relaxed))
        .histogram("tandem_primary_commit_wait_seconds", "Time from request to answer of the waits that ended durable.", &shared.waits.latency)
        .histogram(
            "tandem_primary_commit_wait_ack_to_answer_seconds",
            "Of the waits answered by an ack that arrived while they waited: from the ack's arrival to the answer (the waiter's wake-up).",
            &shared.waits.ack_to_answer,
        );
    let t = &shared.timing;
    page.histogram(
            "tandem_primary_log_watch_late_seconds",
            "How much later than --poll-interval-ms the log watcher woke for its next look (the scheduler's delay), while the log moves.",
            &t.watch_late,
        )
        .histogram(
            "tandem_primary_log_notice_to_send_seconds",
            "From the log watcher seeing a new end of log to a session sending the chunk that reaches it.",
            &t.notice_to_send,
        )
        .histogram(
            "tandem_primary_log_send_to_ack_seconds",
            "From a log chunk's send to the standby's ack covering it (network both ways, the standby's write, fsync and ack).",
            &t.send_to_ack,
        )
        .histogram(
            "tandem_primary_log_notice_to_ack_seconds",
            "From the log watcher seeing a new end of log to the first standby ack covering it (commit → durable after the commit reached the log file; a standby's catch-up counts too).",
            &t.notice_to_ack,
        );
    if let Some(c) = &status.coordination {
        page.gauge_int(
            "tandem_primary_etcd_leading",
            "1 while this primary holds the leader key in etcd and acts as primary.",
            i64::from(c.leading && !c.fenced),
        )
        .gauge_int(
            "tandem_primary_etcd_fenced",
            "1 while this primary is fenced: it ships nothing and refuses commit waits.",
            i64::from(c.fenced),
        )
        .gauge(
            "tandem_primary_etcd_lease_remaining_seconds",
            "Time until this primary's fencing clock runs out unless etcd answers a renewal.",
            c.lease_remaining_ms as f64 / 1000.0,
        )
        .counter(
            "tandem_primary_etcd_fences_total",
            "Times this primary fenced itself since it started.",
            c.fences,
        )
        .gauge_int(
            "tandem_primary_etcd_epoch",
            "The epoch etcd last showed for the cluster.",
            int(c.etcd_epoch),
        );
    }
    page.finish()
}

/// The status as JSON, the same document `tandem-primary status --json`
/// prints.
pub fn status_json(shared: &Shared) -> String {
    serde_json::to_string_pretty(&status_document(&shared.status())).unwrap_or_default()
}

pub fn status_document(s: &tandem_shared::wire::PrimaryStatus) -> serde_json::Value {
    let standbys: Vec<_> = s
        .standbys
        .iter()
        .map(|b| {
            let acked = b.acked.unwrap_or_default();
            serde_json::json!({
                "name": b.name, "peer": b.peer, "connected": b.connected,
                "acked_lsn": {"file": acked.file, "offset": acked.offset},
                "lag_bytes": b.lag_bytes, "last_contact_unix_ms": b.last_contact_unix_ms, "base_id": b.base_id,
                "held_back_bytes": b.held_back_bytes, "dropped": b.dropped,
                "held_for_archive_bytes": b.held_for_archive_bytes,
                "archived_lsn": b.archived.map(|a| serde_json::json!({"file": a.file, "offset": a.offset})),
                "archive_released_below": b.archive_released_below,
                "epoch": b.epoch,
                "refused": (!b.refused.is_empty()).then_some(&b.refused),
            })
        })
        .collect();
    let end = s.end.unwrap_or_default();
    serde_json::json!({
        "role": "primary", "env_id": s.env_id, "epoch": s.epoch,
        "end_lsn": {"file": end.file, "offset": end.offset}, "standbys": standbys,
        "retention_blocked": (!s.retention_blocked.is_empty()).then_some(&s.retention_blocked),
        "history": history_document(&s.history),
        "fenced_hellos": s.fenced_hellos,
        "etcd": s.coordination.as_ref().map(|c| serde_json::json!({
            "cluster": c.cluster, "name": c.name, "leading": c.leading, "fenced": c.fenced,
            "fence_reason": (!c.fence_reason.is_empty()).then_some(&c.fence_reason),
            "lease_remaining_ms": c.lease_remaining_ms, "etcd_epoch": c.etcd_epoch,
            "leader": (!c.leader.is_empty()).then_some(&c.leader), "fences": c.fences,
            "last_failover": (!c.last_failover.is_empty()).then_some(&c.last_failover),
            "on_fence_outcome": (!c.on_fence_outcome.is_empty()).then_some(&c.on_fence_outcome),
        })),
    })
}

/// The epoch history as JSON: `[{"epoch", "start_lsn", "prev_record_digest"}]`.
pub fn history_document(history: &[tandem_shared::wire::EpochStart]) -> serde_json::Value {
    history
        .iter()
        .map(|e| {
            let start = e.start.unwrap_or_default();
            serde_json::json!({
                "epoch": e.epoch,
                "start_lsn": {"file": start.file, "offset": start.offset},
                "prev_record_digest": blake3::Hash::from_slice(&e.prev_record_digest)
                    .map(|h| h.to_hex().to_string())
                    .unwrap_or_default(),
            })
        })
        .collect()
}
