//! Scheduled restore drills (`archive --follow --drill-every SECS`): every
//! SECS the newest backup is restored into a scratch directory (for a
//! bucket: downloaded and checked against its manifest), recovered with
//! `db_recover -c` and `db_verify`ed, exactly as `verify-archive` does. The
//! outcome goes to `.tandem/archive-drill.json`, which `status` shows and
//! the metric `tandem_standby_archive_last_verified_restore_timestamp_seconds`
//! exports: an archive nobody has restored is only a hope.

use super::verify::VerifyReport;
use crate::state::StandbyDir;
use serde::{Deserialize, Serialize};
use tandem_shared::LogPosition;

const DRILL_FILE: &str = "archive-drill.json";

#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq)]
pub struct DrillReport {
    /// When this drill ended.
    pub unix_ms: u64,
    pub ok: bool,
    pub backup: String,
    pub error: Option<String>,
    pub recovered_to: Option<LogPosition>,
    pub databases_verified: usize,
    pub seconds: f64,
    /// When a drill last passed (this one, or an earlier one); 0: never.
    pub last_verified_unix_ms: u64,
}

/// The last drill's report, if any ran.
pub fn last_report(dir: &StandbyDir) -> Option<DrillReport> {
    serde_json::from_slice(&std::fs::read(dir.meta().join(DRILL_FILE)).ok()?).ok()
}

/// Is a drill due, `every_ms` after the last one?
pub fn due(dir: &StandbyDir, every_ms: u64, now_ms: u64) -> bool {
    last_report(dir).is_none_or(|r| now_ms.saturating_sub(r.unix_ms) >= every_ms)
}

/// Records a drill's outcome (from the verification it ran).
pub fn record(dir: &StandbyDir, v: &VerifyReport) -> DrillReport {
    let now = tandem_shared::now_unix_ms();
    let previous = last_report(dir).map_or(0, |r| r.last_verified_unix_ms);
    let r = DrillReport {
        unix_ms: now,
        ok: v.ok,
        backup: v.backup.clone(),
        error: v.error.clone(),
        recovered_to: v.recovered_to,
        databases_verified: v.databases_verified,
        seconds: v.seconds,
        last_verified_unix_ms: if v.ok { now } else { previous },
    };
    match serde_json::to_vec_pretty(&r) {
        Ok(bytes) => {
            if let Err(e) =
                tandem_shared::durable::write_file_atomic(&dir.meta().join(DRILL_FILE), &bytes)
            {
                tracing::warn!(error = %e, "could not record the restore drill in .tandem");
            }
        }
        Err(e) => tracing::warn!(error = %e, "could not encode the restore drill"),
    }
    if r.ok {
        tracing::info!(backup = %r.backup, recovered_to = ?r.recovered_to, secs = r.seconds, "restore drill passed");
    } else {
        tracing::error!(backup = %r.backup, error = ?r.error, "RESTORE DRILL FAILED");
    }
    r
}

/// One line for `status`.
pub fn render(r: Option<&DrillReport>) -> String {
    match r {
        None => "restore drill: none yet (archive --follow --drill-every SECS runs them)\n".into(),
        Some(r) if r.ok => format!(
            "restore drill: passed at {} ms ({}, recovered to {}, {} databases verified)\n",
            r.unix_ms,
            r.backup,
            r.recovered_to
                .map(|l| l.to_string())
                .unwrap_or_else(|| "-".into()),
            r.databases_verified
        ),
        Some(r) => format!(
            "restore drill: FAILED at {} ms ({}: {}); last passed at {} ms\n",
            r.unix_ms,
            r.backup,
            r.error.as_deref().unwrap_or("?"),
            r.last_verified_unix_ms
        ),
    }
}
