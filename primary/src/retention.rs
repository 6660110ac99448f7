//! Log retention: moving shipped logs off the production disk (step 2 of
//! BDB's hot-failover procedure), safely.
//!
//! A log file is removed only when BDB no longer needs it (`db_archive`
//! lists it), every standby the primary knows has acknowledged a position
//! past it, and, for a standby that reports a continuous archive, that
//! archive holds it. An offline standby therefore holds logs back, like a
//! replication slot; past the cap, the one that holds back the most is
//! released loudly: an archive hold is given up first (the archive gets a
//! gap), then the standby itself is dropped and will need a new base. `db_hotbackup -u/-c` and
//! `db_archive -d` are never used: they remove logs no standby holds
//! (BDB.md §6).

use crate::server::{Shared, StandbyRecord};
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

const STANDBYS_FILE: &str = "standbys";
const FORMAT_VERSION: u32 = 1;

#[derive(Debug, Clone)]
pub struct RetentionConfig {
    /// Most log bytes kept for lagging standbys before the laggard is dropped.
    pub cap_bytes: u64,
    pub interval: Duration,
}

pub fn load_standbys(state_dir: &Path) -> BTreeMap<String, StandbyRecord> {
    match tandem_shared::durable::ControlFile::load(&state_dir.join(STANDBYS_FILE), FORMAT_VERSION)
    {
        Ok(Some(map)) => map,
        Ok(None) => BTreeMap::new(),
        Err(e) => {
            tracing::error!(error = %e, "cannot read the known standbys; starting with none");
            BTreeMap::new()
        }
    }
}

pub fn spawn(shared: Arc<Shared>, state_dir: PathBuf, cfg: RetentionConfig) {
    std::thread::Builder::new()
        .name("retention".into())
        .spawn(move || loop {
            if let Err(e) = pass(&shared, &state_dir, &cfg) {
                tracing::error!(error = %e, "log retention pass failed; nothing was removed");
            }
            std::thread::sleep(cfg.interval);
        })
        .expect("spawning a thread at start-up");
}

/// One retention pass.
fn pass(shared: &Shared, state_dir: &Path, cfg: &RetentionConfig) -> anyhow::Result<()> {
    let layout = &shared.layout;
    let mut inactive = shared.tools.inactive_logs(&layout.home)?;
    inactive.sort_unstable();
    let size_of = |n: u32| {
        std::fs::metadata(layout.log_path(n))
            .map(|m| m.len())
            .unwrap_or(0)
    };
    let removable: Vec<u32> = {
        let mut map = shared
            .standbys
            .lock()
            .map_err(|_| anyhow::anyhow!("standby table poisoned"))?;
        loop {
            for r in map.values_mut() {
                let (from, acked) = if r.dropped {
                    (u32::MAX, u32::MAX)
                } else {
                    (r.needs_from(), r.acked.file)
                };
                r.held_back_bytes = inactive
                    .iter()
                    .filter(|n| **n >= from)
                    .map(|n| size_of(*n))
                    .sum();
                r.held_for_archive_bytes = inactive
                    .iter()
                    .filter(|n| **n >= from && **n < acked)
                    .map(|n| size_of(*n))
                    .sum();
            }
            let held: u64 = inactive
                .iter()
                .filter(|n| map.values().any(|r| !r.dropped && **n >= r.needs_from()))
                .map(|n| size_of(*n))
                .sum();
            if held <= cfg.cap_bytes {
                break;
            }
            let Some((name, r)) = map
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
                    standby = %name, archived = ?r.archived, acked = %r.acked, held_back_bytes = held, cap_bytes = cfg.cap_bytes,
                    "RELEASING ARCHIVE HOLD: the standby's continuous archive is further behind than the retention cap allows; \
                     log files it has not archived will be removed, so point-in-time restore will have a gap there: \
                     check `tandem-standby archive --follow` on that standby"
                );
                r.archive_released_below = r.acked.file;
                continue;
            }
            tracing::error!(
                standby = %name, acked = %r.acked, held_back_bytes = held, cap_bytes = cfg.cap_bytes,
                "DROPPING STANDBY: it holds back more log than the retention cap allows; its logs will be removed \
                 and it will need a new base when it returns"
            );
            r.dropped = true;
        }
        let oldest_needed = map
            .values()
            .filter(|r| !r.dropped)
            .map(StandbyRecord::needs_from)
            .min()
            .unwrap_or(u32::MAX);
        let snapshot: BTreeMap<String, StandbyRecord> = map.clone();
        drop(map);
        // Durable before anything is removed, so a restarted primary never
        // forgets a standby it removed files for.
        tandem_shared::durable::ControlFile::store(
            &state_dir.join(STANDBYS_FILE),
            FORMAT_VERSION,
            &snapshot,
        )?;
        inactive
            .into_iter()
            .filter(|n| *n < oldest_needed)
            .collect()
    };
    if removable.is_empty() {
        return Ok(());
    }
    let mut bytes = 0;
    for n in &removable {
        let path = layout.log_path(*n);
        bytes += size_of(*n);
        match std::fs::remove_file(&path) {
            Ok(()) => {}
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
            Err(e) => return Err(anyhow::anyhow!("removing {}: {e}", path.display())),
        }
    }
    tandem_shared::durable::fsync_dir(&layout.log_dir())?;
    tracing::info!(
        files = removable.len(), bytes, first = %layout.log_name(removable[0]), last = %layout.log_name(*removable.last().unwrap_or(&removable[0])),
        "removed log files that BDB no longer needs and every standby holds"
    );
    Ok(())
}
