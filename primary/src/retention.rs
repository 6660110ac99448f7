//! Log retention: moving shipped logs off the production disk (step 2 of
//! BDB's hot-failover procedure), safely.
//!
//! A log file is removed only when BDB no longer needs it (`db_archive`
//! lists it), every standby the primary knows has acknowledged a position
//! past it, and, for a standby that reports a continuous archive, that
//! archive holds it. An offline standby therefore holds logs back, like a
//! replication slot; past the cap, the one that holds back the most is
//! released loudly: an archive hold is given up first (the archive gets a
//! gap), then the standby itself is dropped and will need a new base.
//! `db_hotbackup -u/-c` and `db_archive -d` are never used: they remove
//! logs no standby holds (BDB-NOTES.md §6).
//!
//! [`plan`] decides from plain values (tested with tables); [`run`] is the
//! task that gathers them, records the decision through the registry and
//! removes the files. When the registry cannot vouch for its records (its
//! file is unreadable) or cannot store the decision, nothing is removed.

use crate::registry::{StandbyRecord, StandbyRegistry};
use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;
use tandem_shared::bdb::BdbTools;
use tandem_shared::envlayout::EnvLayout;
use tokio_util::sync::CancellationToken;

/// `--retention-cap-mib`: most log MiB kept for lagging standbys.
pub const DEFAULT_CAP_MIB: u64 = 10240;
/// `--retention-interval-secs`: seconds between retention passes.
pub const DEFAULT_INTERVAL_SECS: u64 = 10;

#[derive(Debug, Clone)]
pub struct RetentionConfig {
    /// Most log bytes kept for lagging standbys before the laggard is dropped.
    pub cap_bytes: u64,
    pub interval: Duration,
}

/// What one pass decided.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct RetentionPlan {
    /// Log files to remove, ascending.
    pub remove: Vec<u32>,
    /// Standbys whose archive hold is given up, with the file below which
    /// their archive is no longer waited for.
    pub release_archive: Vec<(String, u32)>,
    /// Standbys dropped: their logs are no longer kept.
    pub drop: Vec<String>,
    /// Per standby: (bytes held back for it, of which only for its archive).
    pub held: BTreeMap<String, (u64, u64)>,
}

/// Decides what to remove. `inactive`: the log files BDB no longer needs,
/// with their sizes; `records`: every standby the primary knows.
pub fn plan(
    inactive: &[(u32, u64)],
    records: &BTreeMap<String, StandbyRecord>,
    cap_bytes: u64,
) -> RetentionPlan {
    let mut inactive = inactive.to_vec();
    inactive.sort_unstable();
    let mut records = records.clone();
    let mut out = RetentionPlan::default();
    let bytes_from = |from: u32, below: u32| -> u64 {
        inactive
            .iter()
            .filter(|(n, _)| *n >= from && *n < below)
            .map(|(_, size)| size)
            .sum()
    };
    loop {
        let held: u64 = inactive
            .iter()
            .filter(|(n, _)| records.values().any(|r| !r.dropped && *n >= r.needs_from()))
            .map(|(_, size)| size)
            .sum();
        if held <= cap_bytes {
            break;
        }
        let Some((name, r)) = records
            .iter_mut()
            .filter(|(_, r)| !r.dropped)
            .min_by_key(|(_, r)| r.needs_from())
        else {
            break;
        };
        if r.needs_from() < r.acked.file {
            // The standby has the log; only its archive lacks it. Losing
            // archive coverage beats filling the production disk.
            tracing::error!(
                standby = %name, archived = ?r.archived, acked = %r.acked, held_back_bytes = held, cap_bytes,
                "RELEASING ARCHIVE HOLD: the standby's continuous archive is further behind than the retention cap allows; \
                 log files it has not archived will be removed, so point-in-time restore will have a gap there: \
                 check `tandem-standby archive --follow` on that standby"
            );
            r.archive_released_below = r.acked.file;
            out.release_archive.push((name.clone(), r.acked.file));
            continue;
        }
        tracing::error!(
            standby = %name, acked = %r.acked, held_back_bytes = held, cap_bytes,
            "DROPPING STANDBY: it holds back more log than the retention cap allows; its logs will be removed \
             and it will need a new base when it returns"
        );
        r.dropped = true;
        out.drop.push(name.clone());
    }
    for (name, r) in &records {
        let held = if r.dropped {
            (0, 0)
        } else {
            (
                bytes_from(r.needs_from(), u32::MAX),
                bytes_from(r.needs_from(), r.acked.file),
            )
        };
        out.held.insert(name.clone(), held);
    }
    let oldest_needed = records
        .values()
        .filter(|r| !r.dropped)
        .map(StandbyRecord::needs_from)
        .min()
        .unwrap_or(u32::MAX);
    out.remove = inactive
        .iter()
        .map(|(n, _)| *n)
        .filter(|n| *n < oldest_needed)
        .collect();
    out
}

/// Writes a plan's decisions into the records.
fn apply(records: &mut BTreeMap<String, StandbyRecord>, p: &RetentionPlan) {
    for (name, below) in &p.release_archive {
        if let Some(r) = records.get_mut(name) {
            r.archive_released_below = *below;
        }
    }
    for name in &p.drop {
        if let Some(r) = records.get_mut(name) {
            r.dropped = true;
        }
    }
    for (name, (held, for_archive)) in &p.held {
        if let Some(r) = records.get_mut(name) {
            r.held_back_bytes = *held;
            r.held_for_archive_bytes = *for_archive;
        }
    }
}

/// The retention task: one pass every `cfg.interval` until `stop`.
pub async fn run(
    registry: Arc<StandbyRegistry>,
    layout: EnvLayout,
    tools: BdbTools,
    cfg: RetentionConfig,
    stop: CancellationToken,
) {
    loop {
        let (registry, layout, tools, cap) = (
            registry.clone(),
            layout.clone(),
            tools.clone(),
            cfg.cap_bytes,
        );
        // A pass runs db_archive and removes files: blocking work. It is
        // awaited, never abandoned, so shutdown waits for a pass to finish.
        let pass = tokio::task::spawn_blocking(move || pass(&registry, &layout, &tools, cap));
        match pass.await {
            Ok(Ok(())) => {}
            Ok(Err(e)) => {
                tracing::error!(error = %format!("{e:#}"), "log retention pass failed; nothing was removed")
            }
            Err(e) => {
                tracing::error!(error = %e, "log retention pass panicked; nothing was removed")
            }
        }
        tokio::select! {
            _ = stop.cancelled() => return,
            _ = tokio::time::sleep(cfg.interval) => {}
        }
    }
}

/// One retention pass.
fn pass(
    registry: &StandbyRegistry,
    layout: &EnvLayout,
    tools: &BdbTools,
    cap_bytes: u64,
) -> anyhow::Result<()> {
    let mut inactive = Vec::new();
    for n in tools.inactive_logs(&layout.home)? {
        // A size that cannot be read counts as 0: the file is then cheap to
        // hold, which errs on the side of keeping it.
        let size = std::fs::metadata(layout.log_path(n)).map_or(0, |m| m.len());
        inactive.push((n, size));
    }
    let p = registry.decide(|records| {
        let p = plan(&inactive, records, cap_bytes);
        apply(records, &p);
        p
    })?;
    if p.remove.is_empty() {
        return Ok(());
    }
    let mut bytes = 0;
    for n in &p.remove {
        let path = layout.log_path(*n);
        bytes += inactive.iter().find(|(m, _)| m == n).map_or(0, |(_, s)| *s);
        match std::fs::remove_file(&path) {
            Ok(()) => {}
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
            Err(e) => return Err(anyhow::anyhow!("removing {}: {e}", path.display())),
        }
    }
    tandem_shared::durable::fsync_dir(&layout.log_dir())?;
    let (first, last) = (p.remove[0], p.remove[p.remove.len() - 1]);
    tracing::info!(
        files = p.remove.len(), bytes, first = %layout.log_name(first), last = %layout.log_name(last),
        "removed log files that BDB no longer needs and every standby holds"
    );
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use tandem_shared::LogPosition;

    const MIB: u64 = 1 << 20;

    fn standby(acked_file: u32, archived_file: Option<u32>) -> StandbyRecord {
        StandbyRecord {
            acked: LogPosition::new(acked_file, 100),
            archived: archived_file.map(|f| LogPosition::new(f, 50)),
            ..Default::default()
        }
    }

    /// Inactive files `first..=last`, 1 MiB each.
    fn logs(first: u32, last: u32) -> Vec<(u32, u64)> {
        (first..=last).map(|n| (n, MIB)).collect()
    }

    struct Case {
        what: &'static str,
        inactive: Vec<(u32, u64)>,
        standbys: Vec<(&'static str, StandbyRecord)>,
        cap_mib: u64,
        remove: Vec<u32>,
        release: Vec<(&'static str, u32)>,
        drop: Vec<&'static str>,
    }

    #[test]
    fn retention_plans() {
        let cases = vec![
            Case {
                what: "no standby known: every inactive file goes",
                inactive: logs(1, 4),
                standbys: vec![],
                cap_mib: 10,
                remove: vec![1, 2, 3, 4],
                release: vec![],
                drop: vec![],
            },
            Case {
                what: "a standby holds the file it is in and later ones",
                inactive: logs(1, 6),
                standbys: vec![("a", standby(4, None))],
                cap_mib: 10,
                remove: vec![1, 2, 3],
                release: vec![],
                drop: vec![],
            },
            Case {
                what: "the slowest of two standbys decides",
                inactive: logs(1, 6),
                standbys: vec![("a", standby(5, None)), ("b", standby(3, None))],
                cap_mib: 10,
                remove: vec![1, 2],
                release: vec![],
                drop: vec![],
            },
            Case {
                what: "an archive behind its standby holds files too",
                inactive: logs(1, 6),
                standbys: vec![("a", standby(5, Some(2)))],
                cap_mib: 10,
                remove: vec![1],
                release: vec![],
                drop: vec![],
            },
            Case {
                what: "past the cap an archive hold is released before the standby is dropped",
                inactive: logs(1, 8),
                standbys: vec![("a", standby(6, Some(1)))],
                cap_mib: 4,
                remove: vec![1, 2, 3, 4, 5],
                release: vec![("a", 6)],
                drop: vec![],
            },
            Case {
                what: "past the cap the laggard is dropped, the other still holds",
                inactive: logs(1, 8),
                standbys: vec![("slow", standby(1, None)), ("fast", standby(7, None))],
                cap_mib: 4,
                remove: vec![1, 2, 3, 4, 5, 6],
                release: vec![],
                drop: vec!["slow"],
            },
            Case {
                what: "a dropped standby holds nothing",
                inactive: logs(1, 3),
                standbys: vec![(
                    "gone",
                    StandbyRecord {
                        dropped: true,
                        ..standby(1, None)
                    },
                )],
                cap_mib: 10,
                remove: vec![1, 2, 3],
                release: vec![],
                drop: vec![],
            },
            Case {
                what: "nothing inactive: nothing to remove, nobody dropped",
                inactive: vec![],
                standbys: vec![("a", standby(1, None))],
                cap_mib: 0,
                remove: vec![],
                release: vec![],
                drop: vec![],
            },
        ];
        for c in cases {
            let records: BTreeMap<String, StandbyRecord> = c
                .standbys
                .iter()
                .map(|(n, r)| (n.to_string(), r.clone()))
                .collect();
            let p = plan(&c.inactive, &records, c.cap_mib * MIB);
            assert_eq!(p.remove, c.remove, "{}: remove", c.what);
            let release: Vec<(String, u32)> =
                c.release.iter().map(|(n, f)| (n.to_string(), *f)).collect();
            assert_eq!(p.release_archive, release, "{}: release", c.what);
            let drop: Vec<String> = c.drop.iter().map(|n| n.to_string()).collect();
            assert_eq!(p.drop, drop, "{}: drop", c.what);
        }
    }

    #[test]
    fn held_bytes_are_counted_per_standby() {
        let records: BTreeMap<String, StandbyRecord> = [
            ("a".to_string(), standby(4, Some(2))),
            ("b".to_string(), standby(6, None)),
        ]
        .into();
        let p = plan(&logs(1, 6), &records, 100 * MIB);
        assert_eq!(p.held["a"], (5 * MIB, 2 * MIB));
        assert_eq!(p.held["b"], (MIB, 0));
        assert_eq!(p.remove, vec![1]);
    }
}
