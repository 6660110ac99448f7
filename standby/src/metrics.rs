//! The standby's metrics page (served by [`tandem_shared::metrics::serve`]
//! on `--metrics-listen`), built from a snapshot of its status on each
//! scrape. The names are the interface: README's monitoring table lists
//! them, dashboards and alerts use them.

use crate::status::etcd::RoundStatus;
use crate::status::StandbyStatus;
use crate::timing::FollowTiming;
use tandem_shared::metrics::MetricsPage;

/// A byte count or epoch as a gauge value (they stay far below 2^63).
fn int(v: u64) -> i64 {
    i64::try_from(v).unwrap_or(i64::MAX)
}

/// The metrics page of a running standby (lag already computed).
// Long function: a table: one metric per call of the page builder.
pub fn render(s: &StandbyStatus, etcd: Option<&RoundStatus>, timing: &FollowTiming) -> String {
    let mut page = MetricsPage::default();
    page.histogram(
        "tandem_standby_log_receive_to_durable_seconds",
        "From reading a log chunk off the stream to the fsync that made it durable returning.",
        &timing.receive_to_durable,
    )
    .histogram(
        "tandem_standby_log_fsync_seconds",
        "One fsync of the log, per batch of chunks written.",
        &timing.log_fsync,
    )
    .histogram(
        "tandem_standby_log_durable_to_ack_seconds",
        "From a log fsync returning to the ack covering it being handed to the stream.",
        &timing.durable_to_ack,
    );
    page.counter(
            "tandem_standby_log_bytes_received_total",
            "Log bytes received, verified and written.",
            s.log_bytes_received,
        )
        .counter(
            "tandem_standby_file_bytes_received_total",
            "Database file bytes received, verified and written.",
            s.file_bytes_received,
        )
        .counter(
            "tandem_standby_chunk_verification_failures_total",
            "Chunks whose blake3 digest did not match.",
            s.digest_failures,
        )
        .counter(
            "tandem_standby_rejected_messages_total",
            "Messages from the primary that were refused.",
            s.rejected_messages,
        )
        .counter(
            "tandem_standby_reconnects_total",
            "Reconnections to the primary.",
            s.reconnects,
        )
        .gauge_int(
            "tandem_standby_connected",
            "1 while connected to the primary.",
            i64::from(s.connected),
        )
        .gauge(
            "tandem_standby_lag_bytes",
            "Log bytes the primary has that the standby does not hold durably; NaN when unknown \
             (not connected, or no word from the primary): alert on lag_seconds.",
            s.lag_bytes.map_or(f64::NAN, |b| b as f64),
        )
        .gauge_int(
            "tandem_standby_lag_bytes_known",
            "1 while lag_bytes is known (connected, and the primary was heard from recently).",
            i64::from(s.lag_bytes.is_some()),
        )
        .gauge(
            "tandem_standby_lag_seconds",
            "Seconds since the standby last knew it held everything the primary had; grows \
             while nothing arrives from the primary.",
            s.lag_seconds,
        )
        .gauge_int(
            "tandem_standby_recoverable",
            "1 when the directory holds a complete base and the log it needs, and neither a \
             readiness check nor a scrub of that base failed since.",
            i64::from(s.recoverable),
        )
        .gauge_int("tandem_standby_epoch", "Highest epoch seen.", int(s.epoch))
        .gauge_int(
            "tandem_standby_epoch_history_length",
            "Promotions recorded in the epoch history this directory knows.",
            int(s.history.len() as u64),
        )
        .counter(
            "tandem_standby_rebases_total",
            "Rebases completed.",
            s.rebases,
        )
        .gauge_int(
            "tandem_standby_rejoining",
            "1 while `run --rejoin` brings the directory up to date with a page-delta base.",
            i64::from(s.rejoining),
        )
        .gauge_int(
            "tandem_standby_discarded_transactions",
            "Committed transactions rejoins discarded (their log kept in .tandem/discarded).",
            int(s.discarded.iter().map(|d| d.committed_transactions).sum()),
        )
        .gauge_int(
            "tandem_standby_discarded_log_bytes",
            "Log bytes rejoins discarded (kept in .tandem/discarded).",
            int(s.discarded.iter().map(|d| d.bytes).sum()),
        )
        .gauge_int(
            "tandem_standby_promotion_replay_bytes",
            "Log bytes a promotion would replay now.",
            int(s.replay_log_bytes),
        )
        .gauge(
            "tandem_standby_promotion_replay_estimate_seconds",
            "Estimated recovery time of a promotion now.",
            s.replay_estimate_seconds,
        )
        .gauge(
            "tandem_standby_promotion_estimate_seconds",
            "Estimated time of a whole promote now (recovery, verify, promote's own steps).",
            s.promotion_estimate_seconds,
        )
        .gauge_int(
            "tandem_standby_readiness_check_ok",
            "1 if the last readiness check passed, 0 if it failed or none ran.",
            i64::from(s.last_check.as_ref().is_some_and(|c| c.ok)),
        )
        .gauge(
            "tandem_standby_readiness_check_duration_seconds",
            "Duration of the last readiness check.",
            s.last_check.as_ref().map_or(0.0, |c| c.seconds),
        )
        .gauge(
            "tandem_standby_readiness_check_timestamp_seconds",
            "When the last readiness check ran.",
            s.last_check
                .as_ref()
                .map_or(0.0, |c| c.unix_ms as f64 / 1000.0),
        )
        .gauge_int(
            "tandem_standby_scrub_ok",
            "1 if the last scrub found every page and log record as written, 0 if it found damage or none ran.",
            i64::from(s.scrub.as_ref().is_some_and(|r| r.ok)),
        )
        .counter(
            "tandem_standby_scrub_failures_total",
            "Scrubs of this directory that found damage.",
            s.scrub.as_ref().map_or(0, |r| r.failures_total),
        )
        .gauge(
            "tandem_standby_scrub_timestamp_seconds",
            "When the last scrub ended.",
            s.scrub.as_ref().map_or(0.0, |r| r.unix_ms as f64 / 1000.0),
        )
        .gauge(
            "tandem_standby_archive_last_verified_restore_timestamp_seconds",
            "When a restore drill of the archive (--drill-every) last passed; 0: never.",
            s.archive_drill
                .as_ref()
                .map_or(0.0, |r| r.last_verified_unix_ms as f64 / 1000.0),
        )
        .gauge_int(
            "tandem_standby_base_copy_done_bytes",
            "Bytes of the base copy under way received or reused (0 when none).",
            int(s.base_copy_done_bytes),
        )
        .gauge_int(
            "tandem_standby_base_copy_total_bytes",
            "Bytes of the base copy under way, as the primary listed them (0 when none).",
            int(s.base_copy_total_bytes),
        )
        .gauge_int(
            "tandem_standby_archive_held_log_bytes",
            "Log bytes kept only because the continuous archive lacks them.",
            int(s.archive_held_log_bytes),
        )
        .gauge(
            "tandem_standby_last_contact_timestamp_seconds",
            "When the primary was last heard from.",
            s.last_contact_unix_ms as f64 / 1000.0,
        )
        ;
    if let Some(r) = etcd {
        etcd_metrics(&mut page, r);
    }
    page.finish()
}

/// With `run --etcd`: the last round's view (`.tandem/etcd.json`).
fn etcd_metrics(page: &mut MetricsPage, r: &RoundStatus) {
    let secs = |ms: u64| ms as f64 / 1000.0;
    page.gauge_int(
        "tandem_standby_etcd_leader_known",
        "1 when the last etcd round saw a leader key.",
        i64::from(r.leader.is_some()),
    )
    .gauge_int(
        "tandem_standby_etcd_epoch",
        "The epoch etcd held at the last round.",
        int(r.etcd_epoch),
    )
    .gauge(
        "tandem_standby_etcd_lease_remaining_seconds",
        "Time left on this standby's own lease (its member record) at the last round.",
        secs(r.lease_remaining_ms),
    )
    .gauge_int(
        "tandem_standby_etcd_round_ok",
        "1 when the last etcd round succeeded (0: etcd did not answer).",
        i64::from(r.error.is_none()),
    )
    .gauge(
        "tandem_standby_etcd_round_timestamp_seconds",
        "When the last etcd round ended.",
        secs(r.updated_unix_ms),
    )
    .gauge(
        "tandem_standby_etcd_last_failover_timestamp_seconds",
        "When the cluster's last failover or switchover happened (0: none recorded); its kind is the label of tandem_standby_etcd_last_failover_epoch.",
        r.last_failover.as_ref().map_or(0.0, |f| secs(f.unix_ms)),
    )
    .gauge_by(
        "tandem_standby_etcd_last_failover_epoch",
        "The epoch the cluster's last failover or switchover began, by kind.",
        "kind",
        &r.last_failover
            .iter()
            .map(|f| (f.kind.clone(), int(f.epoch)))
            .collect::<Vec<_>>(),
    )
    .gauge_int(
        "tandem_standby_etcd_promotion_failed",
        "1 when this standby won the leader key and its promotion then failed: the cluster needs an operator.",
        i64::from(r.promotion_failed.is_some()),
    );
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_figure_is_on_the_page_under_its_name() {
        let s = StandbyStatus {
            connected: true,
            lag_bytes: Some(4096),
            log_bytes_received: 12,
            lag_seconds: 1.5,
            archive_drill: Some(crate::archive::drill::DrillReport {
                ok: false,
                last_verified_unix_ms: 1_700_000_000_500,
                ..Default::default()
            }),
            ..Default::default()
        };
        let text = render(&s, None, &FollowTiming::default());
        for line in [
            "tandem_standby_connected 1\n",
            "tandem_standby_lag_bytes 4096.0\n",
            "tandem_standby_log_bytes_received_total 12\n",
            "tandem_standby_lag_seconds 1.5\n",
            "tandem_standby_recoverable 0\n",
            "tandem_standby_archive_held_log_bytes 0\n",
            // A failed drill keeps the time the last one passed.
            "tandem_standby_archive_last_verified_restore_timestamp_seconds 1700000000.5\n",
        ] {
            assert!(text.contains(line), "{line:?} missing from:\n{text}");
        }
    }
}
