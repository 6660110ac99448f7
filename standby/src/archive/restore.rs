//! `tandem-standby restore`: turns a backup into an environment
//! applications open, optionally as of a past time.
//!
//! Restore checks the backup's listing against its manifest (missing,
//! extra, resized files) before it writes anything, then copies the backup
//! into a hidden directory beside the target, hashing every byte as it
//! copies it (one read of each file: an altered file is named and the copy
//! removed), walks the copied log as one verified chain, checks that the
//! requested time lies inside the backup's window, runs catastrophic
//! recovery and `db_verify` there, and renames the recovered environment
//! into place, so the target appears complete or not at all.
//!
//! `db_verify` is skipped when the manifest carries the archiver's recovery
//! proof for exactly these bytes and this log end
//! ([`super::manifest::RecoveryProof`]), there is no `--until`, and this
//! recovery ended where the proof's did: recovery of the same bytes is the
//! same environment (BDB-NOTES.md §12), which `db_verify` already passed.
//! When the proof was made for a shorter log (`--follow` extended the
//! backup since) or the restore is to a point in time, only the databases
//! the log after the proof touches are verified ([`super::selective`]:
//! every database whenever in doubt, and for a time before the proof's
//! last commit); without a proof, every database, as before.
//!
//! Point in time. `db_recover -t` keeps exactly the transactions whose
//! commit record's timestamp (whole seconds, the primary's clock) is at or
//! before the given time and rolls back the rest; it reads the time in the
//! local time zone of its process, so Tandem passes UTC and runs it with
//! `TZ=UTC0`. The window a backup can restore to starts at the later of
//! its first commit (transactions committed before the backup's first log
//! file are part of its database files and cannot be undone) and BDB's own
//! limit, the first checkpoint whose ckp_lsn is at or after the first log
//! record (earlier times fail with BDB1509; without such a checkpoint `-t`
//! fails with DB_NOTFOUND). It ends at the last commit in the backup: what
//! was committed after that is unknown to the backup.

use super::logscan::{scan_logs, LogSummary, ScanError};
use super::manifest::{
    log_rel_name, read_manifest, window_start, Manifest, ManifestError, MANIFEST_FILE,
};
use super::proof::{
    boost_cache, restore_config, run_recover, verify_databases, verify_named, ProofError,
    ScratchDir,
};
use super::selective;
use super::store::{
    archive_of, check_listing, copy_backup, fsync_tree, lock_archive, target_exists, StoreError,
    PUBLISH_LOCK,
};
use super::time::{bdb_time_utc, parse_time, rfc3339, TimeError};
use super::verify::{resolve_backups, VerifyError};
use serde::Serialize;
use std::fs;
use std::io;
use std::path::{Path, PathBuf};
use std::time::Instant;
use tandem_shared::durable::fsync_dir;
use tandem_shared::ioerror::{io_err, IoError};
use tandem_shared::logfile::{log_file_name, parse_log_file_name};
use tandem_shared::LogPosition;

/// Provenance written into a restored environment (hidden: BDB and Tandem
/// ignore it).
pub const RESTORE_INFO_FILE: &str = ".tandem-restore.json";

/// Why a restore was refused or failed; the target was not created.
#[derive(Debug, thiserror::Error)]
pub enum RestoreError {
    #[error(transparent)]
    Time(#[from] TimeError),
    #[error(transparent)]
    Verify(#[from] VerifyError),
    #[error(transparent)]
    Store(#[from] StoreError),
    #[error(transparent)]
    Manifest(#[from] ManifestError),
    #[error(transparent)]
    Scan(#[from] ScanError),
    #[error(transparent)]
    Proof(#[from] ProofError),
    #[error(transparent)]
    Bucket(#[from] super::bucket::BucketError),
    #[error(transparent)]
    Io(#[from] IoError),
    #[error("no backups in {} (a backup is a directory holding {MANIFEST_FILE})", .0.display())]
    NoBackups(PathBuf),
    #[error("{} exists and is not empty: restore only into a new or empty directory", .0.display())]
    TargetNotEmpty(PathBuf),
    #[error("{requested} is outside the restorable window {from} .. {to} of {backup}: {why}")]
    OutsideWindow {
        backup: String,
        requested: String,
        from: String,
        to: String,
        why: String,
    },
    #[error("no point-in-time restore from {backup}: {why}")]
    NoPointInTime { backup: String, why: String },
    /// The target cannot be named, or recovery kept what it must not.
    #[error("{0}")]
    Refused(String),
}

#[derive(Debug, Clone)]
pub struct RestoreOptions {
    pub from: PathBuf,
    pub to: PathBuf,
    /// As given on the command line (see [`parse_time`]).
    pub until: Option<String>,
}

#[derive(Debug, Clone, Default, Serialize)]
pub struct RestoreReport {
    pub backup: String,
    pub target: String,
    pub env_id: String,
    pub base_id: String,
    pub until: Option<String>,
    pub until_unix: Option<i64>,
    /// What `-t` was given (UTC, run with TZ=UTC0).
    pub until_bdb: Option<String>,
    pub window_from: Option<String>,
    pub window_to: Option<String>,
    pub log_end: LogPosition,
    pub recovered_to: Option<LogPosition>,
    /// The newest commit left in the restored log (with --until).
    pub last_commit_kept: Option<String>,
    pub files: usize,
    pub bytes: u64,
    pub recovery_seconds: f64,
    pub databases_verified: usize,
    /// Databases not verified again: they recover to what the archiver's
    /// proof verified, which the log after it does not touch
    /// ([`super::selective`]).
    pub databases_unchanged: Vec<String>,
    /// Why every database was verified, when the backup carries a proof
    /// that does not cover this restore.
    pub verified_everything_because: Option<String>,
    /// When `db_verify` was skipped: when the archiver proved these bytes
    /// recover and verify (the manifest's `proven`).
    pub proven_at_archive_unix_ms: Option<u64>,
    pub seconds: f64,
}

/// Refuses a target that exists and is not an empty directory.
pub(crate) fn ensure_empty_target(to: &Path) -> Result<(), RestoreError> {
    match fs::symlink_metadata(to) {
        Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(()),
        Err(e) => Err(io_err(format!("reading {}", to.display()))(e).into()),
        Ok(md) if md.is_dir() => {
            let mut entries =
                fs::read_dir(to).map_err(io_err(format!("reading {}", to.display())))?;
            if entries.next().is_none() {
                Ok(())
            } else {
                Err(RestoreError::TargetNotEmpty(to.to_path_buf()))
            }
        }
        Ok(_) => Err(RestoreError::TargetNotEmpty(to.to_path_buf())),
    }
}

pub(crate) fn window_of(m: &Manifest) -> Option<(i64, i64)> {
    Some((
        window_start(m.first_commit_unix, m.earliest_checkpoint_unix)?,
        m.last_commit_unix?,
    ))
}

/// The backup to restore from: `from` itself, or the newest backup in it
/// (with a time: the newest whose window holds it).
fn choose_backup(from: &Path, until: Option<i64>) -> Result<PathBuf, RestoreError> {
    if fs::symlink_metadata(from.join(MANIFEST_FILE)).is_ok() {
        return Ok(from.to_path_buf());
    }
    let backups = resolve_backups(from, true)?;
    let mut windows = Vec::new();
    for b in backups.iter().rev() {
        let m = match read_manifest(b) {
            Ok(m) => m,
            Err(e) => {
                tracing::warn!(error = %e, "skipping a backup whose manifest is unreadable");
                continue;
            }
        };
        let Some(t) = until else { return Ok(b.clone()) };
        if let Some((lo, hi)) = window_of(&m) {
            if (lo..=hi).contains(&t) {
                return Ok(b.clone());
            }
            windows.push((lo, hi));
        }
    }
    let edge = |w: Option<i64>| w.map(rfc3339).unwrap_or_else(|| "-".into());
    match until {
        None => Err(RestoreError::NoBackups(from.to_path_buf())),
        Some(t) => Err(RestoreError::OutsideWindow {
            backup: from.display().to_string(),
            requested: rfc3339(t),
            from: edge(windows.iter().map(|w| w.0).min()),
            to: edge(windows.iter().map(|w| w.1).max()),
            why: "no backup in the archive covers that time".into(),
        }),
    }
}

/// Is `t` a time this backup's log can restore to?
pub fn check_window(t: i64, s: &LogSummary, backup: &Path) -> Result<(i64, i64), RestoreError> {
    let name = backup.display().to_string();
    let (Some(first), Some(last)) = (s.first_commit_unix, s.last_commit_unix) else {
        return Err(RestoreError::NoPointInTime {
            backup: name,
            why: "its log holds no committed transaction".into(),
        });
    };
    let Some(ckp) = s.earliest_checkpoint_unix else {
        return Err(RestoreError::NoPointInTime {
            backup: name,
            why: "its log holds no checkpoint at or after its first record, which db_recover -t needs (it fails with DB_NOTFOUND)".into(),
        });
    };
    let from = first.max(ckp);
    let outside = |why: &str| RestoreError::OutsideWindow {
        backup: name.clone(),
        requested: format!("{} (@{t})", rfc3339(t)),
        from: rfc3339(from),
        to: rfc3339(last),
        why: why.into(),
    };
    if t < first {
        return Err(outside("it is before the first commit in the backup; older transactions are part of its database files and cannot be undone"));
    }
    if t < ckp {
        return Err(outside("it is before the backup's first checkpoint, the earliest time db_recover -t accepts (BDB1509)"));
    }
    if t > last {
        return Err(outside("it is after the last commit in the backup, which cannot tell what was committed after that"));
    }
    Ok((from, last))
}

/// Restores a backup into a new environment home.
// Long function: the restore's steps in order, each one call with its error's context; the order
// is what makes a refused restore leave nothing.
pub fn restore(opts: &RestoreOptions) -> Result<RestoreReport, RestoreError> {
    let started = Instant::now();
    let until = opts.until.as_deref().map(parse_time).transpose()?;
    ensure_empty_target(&opts.to)?;
    let backup = choose_backup(&opts.from, until)?;
    let lock = lock_archive(&archive_of(&backup), PUBLISH_LOCK, false, false)?;
    let m = read_manifest(&backup)?;
    let problems = check_listing(&backup, &m)?;
    if !problems.is_empty() {
        return Err(StoreError::Integrity { backup, problems }.into());
    }
    let report = new_report(&backup.display().to_string(), opts, &m, until);
    // Beside the target, under a temp name (removed on any error below):
    // every byte checked against the manifest as it is copied.
    let temp = temp_beside(&opts.to)?;
    copy_backup(&backup, &m, &temp.path)?;
    drop(lock);
    finish_copied(temp, &m, opts, report, &backup, started)
}

/// The copy in `temp` holds every byte of `backup` checked against `m`:
/// walks its log, checks the time asked for against its window and
/// [`finish_restore`]s it.
pub(crate) fn finish_copied(
    temp: ScratchDir,
    m: &Manifest,
    opts: &RestoreOptions,
    mut report: RestoreReport,
    backup: &Path,
    started: Instant,
) -> Result<RestoreReport, RestoreError> {
    let summary = m.scan_log(&temp.path)?;
    let until = report.until_unix;
    check_until(&mut report, until, &summary, backup)?;
    finish_restore(temp, m, opts, report, started)
}

/// The report's fields known before anything is written.
pub(crate) fn new_report(
    backup: &str,
    opts: &RestoreOptions,
    m: &Manifest,
    until: Option<i64>,
) -> RestoreReport {
    RestoreReport {
        backup: backup.into(),
        target: opts.to.display().to_string(),
        env_id: m.env_id.clone(),
        base_id: m.base_id.clone(),
        until: until.map(rfc3339),
        until_unix: until,
        until_bdb: until.map(bdb_time_utc),
        log_end: m.log_end,
        files: m.files.len(),
        bytes: m.bytes(),
        ..Default::default()
    }
}

/// With a time: is it inside the window of the log `summary` describes?
pub(crate) fn check_until(
    report: &mut RestoreReport,
    until: Option<i64>,
    summary: &LogSummary,
    backup: &Path,
) -> Result<(), RestoreError> {
    if let Some(t) = until {
        let (from, to) = check_window(t, summary, backup)?;
        report.window_from = Some(rfc3339(from));
        report.window_to = Some(rfc3339(to));
    }
    Ok(())
}

/// A new, empty directory beside the target, removed unless kept.
pub(crate) fn temp_beside(to: &Path) -> Result<ScratchDir, RestoreError> {
    ensure_empty_target(to)?;
    let name = to.file_name().and_then(|n| n.to_str()).ok_or_else(|| {
        RestoreError::Refused(format!("{} has no usable file name", to.display()))
    })?;
    let parent = parent_of(to);
    fs::create_dir_all(&parent).map_err(io_err(format!("creating {}", parent.display())))?;
    let temp =
        ScratchDir::unlocked(parent.join(format!(".{name}.tandem-restore-{}", std::process::id())));
    let _ = fs::remove_dir_all(&temp.path);
    fs::create_dir(&temp.path).map_err(io_err(format!("creating {}", temp.path.display())))?;
    Ok(temp)
}

fn parent_of(to: &Path) -> PathBuf {
    match to.parent() {
        Some(p) if !p.as_os_str().is_empty() => p.to_path_buf(),
        _ => PathBuf::from("."),
    }
}

/// Recovers the verified copy in `temp` (to the time asked for), checks
/// it and renames it to the target. The caller checked every byte in
/// `temp` against `m` (that is what lets a recovery proof in `m` stand for
/// this copy).
pub(crate) fn finish_restore(
    mut temp: ScratchDir,
    m: &Manifest,
    opts: &RestoreOptions,
    mut report: RestoreReport,
    started: Instant,
) -> Result<RestoreReport, RestoreError> {
    let until = report.until_unix;
    // Which databases the log after a proof for a shorter log touches:
    // read before recovery writes into the copy.
    let exact = until.is_none() && m.proof_covering().is_some();
    let plan = (!exact).then(|| selective::plan(&temp.path, m, until));
    let config = boost_cache(&temp.path)?;
    let rec = run_recover(&temp.path, until)?;
    restore_config(&temp.path, config)?;
    report.recovered_to = rec.recovered_to;
    report.recovery_seconds = rec.seconds;
    let kept = until
        .map(|_| restored_log_summary(&temp.path, m))
        .transpose()?;
    let proof = m.proof_covering().filter(|p| {
        until.is_none() && rec.recovered_to.is_some() && p.recovered_to == rec.recovered_to
    });
    match (proof, plan) {
        (Some(p), _) => {
            report.proven_at_archive_unix_ms = Some(p.unix_ms);
            tracing::info!(databases = p.databases.len(), "db_verify skipped: the archiver's recovery proof covers these bytes and this log end");
        }
        (None, Some(plan)) => {
            let plan = plan.after_recovery(rec.recovered_to, kept.as_ref().map(|k| k.commits));
            tracing::info!(verify = ?plan.verify, unchanged = ?plan.unchanged, everything_because = ?plan.everything_because, "db_verify of the databases the log after the archiver's proof touches");
            report.databases_verified = verify_named(&temp.path, &plan.verify)?;
            report.databases_unchanged = plan.unchanged;
            report.verified_everything_because = plan.everything_because;
        }
        (None, None) => report.databases_verified = verify_databases(&temp.path, m)?,
    }
    if let (Some(t), Some(kept)) = (until, kept) {
        if let Some(last) = kept.last_commit_unix.filter(|last| *last > t) {
            return Err(RestoreError::Refused(format!(
                "recovery to {} kept a commit stamped {}: refusing the result",
                rfc3339(t),
                rfc3339(last)
            )));
        }
        report.last_commit_kept = kept.last_commit_unix.map(rfc3339);
    }
    let info = serde_json::json!({
        "restored_from": report.backup, "env_id": m.env_id, "base_id": m.base_id, "log_end": m.log_end,
        "until": report.until, "recovered_to": report.recovered_to, "unix_ms": tandem_shared::now_unix_ms(),
    });
    let info_path = temp.path.join(RESTORE_INFO_FILE);
    fs::write(
        &info_path,
        serde_json::to_vec_pretty(&info).unwrap_or_default(),
    )
    .map_err(io_err(format!("writing {}", info_path.display())))?;
    fsync_tree(&temp.path).map_err(io_err(format!("fsync of {}", temp.path.display())))?;
    fs::rename(&temp.path, &opts.to).map_err(|e| match target_exists(&e) {
        true => RestoreError::TargetNotEmpty(opts.to.clone()),
        false => io_err(format!(
            "renaming the restored environment to {}",
            opts.to.display()
        ))(e)
        .into(),
    })?;
    temp.keep = true;
    let parent = parent_of(&opts.to);
    fsync_dir(&parent).map_err(io_err(format!("fsync of {}", parent.display())))?;
    report.seconds = started.elapsed().as_secs_f64();
    tracing::info!(backup = %report.backup, target = %report.target, until = ?report.until, "restored");
    Ok(report)
}

/// The commits left in a restored environment's log (recovery to a time
/// truncates the log after the last transaction it keeps).
fn restored_log_summary(home: &Path, m: &Manifest) -> Result<LogSummary, RestoreError> {
    let log_dir = home.join(&m.log_dir);
    let mut numbers: Vec<u32> = fs::read_dir(&log_dir)
        .map_err(io_err(format!("listing {}", log_dir.display())))?
        .flatten()
        .filter_map(|e| e.file_name().to_str().and_then(parse_log_file_name))
        .filter(|n| *n >= m.log_start.file)
        .collect();
    numbers.sort_unstable();
    let mut last = m.log_start.file;
    for n in numbers {
        if n == last + 1 {
            last = n;
        }
    }
    if fs::symlink_metadata(log_dir.join(log_file_name(m.log_start.file))).is_err() {
        return Err(RestoreError::Refused(format!(
            "recovery removed {}",
            log_rel_name(&m.log_dir, m.log_start.file)
        )));
    }
    Ok(scan_logs(&log_dir, m.log_start.file, last, None, None)?)
}

impl std::fmt::Display for RestoreReport {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let r = self;
        write!(
            f,
            "restored {} into {}{}: recovered to {}, {}, recovery {:.2} s, total {:.2} s\nApplications can now open {} as their environment home.",
            r.backup,
            r.target,
            r.until.as_deref().map(|u| format!(" as of {u} (last commit kept: {})", r.last_commit_kept.as_deref().unwrap_or("-"))).unwrap_or_default(),
            r.recovered_to.map(|l| l.to_string()).unwrap_or_else(|| "-".into()),
            match r.proven_at_archive_unix_ms {
                Some(_) => "db_verify not repeated (the archive proved these bytes recover and verify)".to_owned(),
                None if !r.databases_unchanged.is_empty() => format!(
                    "{} databases verified ({} unchanged since the archive's proof: {})",
                    r.databases_verified,
                    r.databases_unchanged.len(),
                    r.databases_unchanged.join(", ")
                ),
                None => format!("{} databases verified", r.databases_verified),
            },
            r.recovery_seconds,
            r.seconds,
            r.target
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn window_checks() {
        let s = LogSummary {
            first_commit_unix: Some(100),
            last_commit_unix: Some(200),
            earliest_checkpoint_unix: Some(120),
            ..Default::default()
        };
        let p = Path::new("b");
        assert_eq!(check_window(120, &s, p).unwrap(), (120, 200));
        assert_eq!(check_window(200, &s, p).unwrap(), (120, 200));
        for outside in [99, 110, 201] {
            assert!(
                matches!(
                    check_window(outside, &s, p),
                    Err(RestoreError::OutsideWindow { .. })
                ),
                "{outside}"
            );
        }
        let no_ckp = LogSummary {
            earliest_checkpoint_unix: None,
            ..s.clone()
        };
        assert!(matches!(
            check_window(150, &no_ckp, p),
            Err(RestoreError::NoPointInTime { .. })
        ));
        let no_commit = LogSummary::default();
        assert!(matches!(
            check_window(150, &no_commit, p),
            Err(RestoreError::NoPointInTime { .. })
        ));
    }

    #[test]
    fn an_empty_directory_is_a_valid_target_and_anything_else_is_not() {
        let d = tempfile::tempdir().unwrap();
        assert!(ensure_empty_target(&d.path().join("new")).is_ok());
        std::fs::create_dir(d.path().join("empty")).unwrap();
        assert!(ensure_empty_target(&d.path().join("empty")).is_ok());
        std::fs::create_dir(d.path().join("full")).unwrap();
        std::fs::write(d.path().join("full/x"), b"x").unwrap();
        assert!(matches!(
            ensure_empty_target(&d.path().join("full")),
            Err(RestoreError::TargetNotEmpty(_))
        ));
        std::fs::write(d.path().join("file"), b"x").unwrap();
        assert!(matches!(
            ensure_empty_target(&d.path().join("file")),
            Err(RestoreError::TargetNotEmpty(_))
        ));
    }
}
