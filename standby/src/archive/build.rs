//! `tandem-standby archive`: a new backup of the standby's mirror, proven
//! recoverable on request, published atomically, then retention.
//!
//! Consistency while `run` streams (the same reasoning as
//! [`crate::readiness`]): database files in the mirror never change once
//! installed, and log bytes before the durable end never change, so a copy
//! of the base's files plus the log up to a durable end read beforehand is
//! a recoverable set (BDB-NOTES.md §7). Two things can still move under the copy:
//! a rebase swaps in other database files and removes old logs, and a
//! promotion runs recovery in place. The state file is re-read after the
//! copy (a changed base, a pending swap or a promotion throws the copy away
//! and it is taken again) and each database file must have the same size
//! and mtime after it was read as before.
//!
//! Writes are durable and atomic: a backup is built in a hidden temp
//! directory inside ARCHIVE, every file and directory fsynced, optionally
//! proven recoverable, then renamed into place and ARCHIVE fsynced.

use super::logscan::{scan_logs, ScanError};
use super::manifest::{
    log_rel_name, FileKind, Manifest, ManifestFile, RecoveryProof, MANIFEST_FILE, MANIFEST_FORMAT,
};
use super::proof::{prove_recovers, Proof, ProofError};
use super::store::{
    clean_temps, copy_hashed, fsync_tree, list_backups, lock_archive, remove_tree, target_exists,
    temp_dir_in, StoreError, PUBLISH_LOCK, TEMP_PREFIX, WRITER_LOCK,
};
use super::time::{backup_name, rfc3339};
use crate::state::{BaseState, StandbyDir, StandbyState};
use serde::{Deserialize, Serialize};
use std::fs::{self, OpenOptions};
use std::io::Write;
use std::path::{Path, PathBuf};
use std::time::Instant;
use tandem_shared::durable::{fsync_dir, ControlFileError};
use tandem_shared::envlayout::DB_CONFIG;
use tandem_shared::ioerror::{io_err, IoError};
use tandem_shared::logfile::log_file_name;
use tandem_shared::wirepath::{self, PathError};
use tandem_shared::LogPosition;

/// The last archive report, in the standby's `.tandem`.
pub const REPORT_FILE: &str = "archive.json";
/// How often a copy is retried when the standby's base moves under it.
pub(crate) const COPY_ATTEMPTS: u32 = 3;

/// Why archiving (a one-off backup or a `--follow` round) failed; nothing
/// was published.
#[derive(Debug, thiserror::Error)]
pub enum ArchiveError {
    #[error(transparent)]
    Io(#[from] IoError),
    #[error(transparent)]
    Store(#[from] StoreError),
    #[error(transparent)]
    Scan(#[from] ScanError),
    #[error(transparent)]
    Bucket(#[from] super::bucket::BucketError),
    #[error("{} is not a Tandem standby directory (no .tandem inside)", .0.display())]
    NotAStandby(PathBuf),
    #[error("{} was promoted: it is a live environment now, not a mirror; archive it from a standby of its own", .0.display())]
    Promoted(PathBuf),
    #[error("the standby is not recoverable yet ({0}); nothing was archived")]
    NotRecoverable(String),
    #[error("the standby's base kept changing while it was copied ({attempts} attempts); nothing was archived, try again")]
    SourceChanged { attempts: u32 },
    #[error("the new backup did not prove recoverable, so it was not kept: {0}")]
    Unproven(ProofError),
    #[error("refused file name: {0}")]
    Path(#[from] PathError),
    #[error(transparent)]
    State(#[from] ControlFileError),
    /// The archive cannot be used as asked (where it is, what it holds).
    #[error("{0}")]
    Refused(String),
}

#[derive(Debug, Clone)]
pub struct ArchiveOptions {
    pub dir: PathBuf,
    pub archive: PathBuf,
    /// Newest backups to keep (at least 1).
    pub keep: u32,
    /// Also delete backups older than this many days.
    pub keep_days: Option<f64>,
    /// Prove a new backup recovers (scratch copy, db_recover -c, db_verify)
    /// before publishing it.
    pub verify: bool,
    pub scratch: Option<PathBuf>,
    /// With `--follow`: restore the newest backup into scratch and prove it
    /// recovers this often ([`super::drill`]).
    pub drill_every: Option<std::time::Duration>,
}

#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq)]
pub struct ArchiveReport {
    /// "created", "extended" or "unchanged".
    pub action: String,
    pub backup: String,
    pub env_id: String,
    pub base_id: String,
    pub log_start: LogPosition,
    pub log_end: LogPosition,
    pub files: usize,
    pub bytes: u64,
    pub commits: u64,
    pub first_commit: Option<String>,
    pub last_commit: Option<String>,
    pub earliest_restore: Option<String>,
    /// Copying from the mirror (and fsync).
    pub copy_seconds: f64,
    /// The recovery proof, when it ran.
    pub verified: bool,
    pub verify_seconds: f64,
    pub recovery_seconds: f64,
    pub seconds: f64,
    /// Backups deleted by retention.
    pub removed: Vec<String>,
    /// Bytes uploaded to a bucket (files it did not hold yet).
    #[serde(default)]
    pub uploaded_bytes: u64,
    pub unix_ms: u64,
}

/// A consistent view of the mirror.
#[derive(Debug, Clone)]
pub(crate) struct Snapshot {
    pub(crate) state: StandbyState,
    pub(crate) base: BaseState,
    pub(crate) env_id: String,
    pub(crate) durable: LogPosition,
}

pub(crate) fn take_snapshot(dir: &StandbyDir) -> Result<Snapshot, ArchiveError> {
    if !dir.meta().is_dir() {
        return Err(ArchiveError::NotAStandby(dir.root.clone()));
    }
    let state = dir.load_state()?;
    if state.promoted.is_some() {
        return Err(ArchiveError::Promoted(dir.root.clone()));
    }
    if state.pending_swap.is_some() {
        return Err(ArchiveError::NotRecoverable("a rebase is being swapped in (by `run`, or by `run` when it next starts); try again shortly".into()));
    }
    let tail = dir
        .scan_tail(&state)
        .map_err(io_err("reading the standby's log"))?;
    let (Some(base), Some(env_id)) = (state.base.clone(), state.env_id.clone()) else {
        return Err(ArchiveError::NotRecoverable("it holds no base".into()));
    };
    if !state.is_recoverable(tail.durable) {
        return Err(ArchiveError::NotRecoverable(if base.files_done {
            format!(
                "its log ends at {} but the base needs it up to {}",
                tail.durable,
                base.consistent_at.unwrap_or_default()
            )
        } else {
            "its base copy is incomplete".into()
        }));
    }
    Ok(Snapshot {
        state,
        base,
        env_id,
        durable: tail.durable,
    })
}

/// Is the base the snapshot saw still the standby's base, with no swap
/// and no promotion under way?
pub(crate) fn source_unchanged(dir: &StandbyDir, snap: &Snapshot) -> Result<bool, ArchiveError> {
    let now = dir.load_state()?;
    if now.promoted.is_some() {
        return Err(ArchiveError::Promoted(dir.root.clone()));
    }
    Ok(now.pending_swap.is_none()
        && now.base.as_ref().is_some_and(|b| {
            b.base_id == snap.base.base_id && b.log_start == snap.base.log_start && b.files_done
        }))
}

/// Copies the snapshot's files from the mirror into `temp`.
fn copy_snapshot(
    dir: &StandbyDir,
    snap: &Snapshot,
    temp: &Path,
) -> Result<Vec<ManifestFile>, ArchiveError> {
    let mut files = Vec::new();
    for name in &snap.base.complete_files {
        let src = wirepath::resolve_under(&dir.root, name)?;
        let (size, hash) = copy_hashed(&src, &temp.join(wirepath::validate(name)?), None, true)?;
        let kind = if name == DB_CONFIG {
            FileKind::Config
        } else {
            FileKind::Database
        };
        files.push(ManifestFile {
            name: name.clone(),
            kind,
            size,
            blake3: hash.to_hex().to_string(),
        });
    }
    files.extend(copy_logs(
        &log_source(dir, &snap.state, false),
        &snap.state.log_dir,
        snap.base.log_start.file,
        snap.durable,
        temp,
    )?);
    Ok(files)
}

/// Where the archiver reads log file N: the mirror, or first the files
/// the mirror retired for the archive (when finishing an older backup).
pub(crate) fn log_source(
    dir: &StandbyDir,
    state: &StandbyState,
    held_first: bool,
) -> impl Fn(u32) -> PathBuf {
    let mirror = dir.log_dir(state);
    let held = crate::archive_hold::hold_dir(dir);
    move |n| {
        let name = log_file_name(n);
        match held.join(&name) {
            p if held_first && p.exists() => p,
            _ => mirror.join(name),
        }
    }
}

/// Copies log files `from..=end.file`, the last up to `end`.
pub(crate) fn copy_logs(
    source: &dyn Fn(u32) -> PathBuf,
    log_dir: &str,
    from: u32,
    end: LogPosition,
    temp: &Path,
) -> Result<Vec<ManifestFile>, ArchiveError> {
    let mut files = Vec::new();
    for n in from..=end.file {
        let name = log_rel_name(log_dir, n);
        let src = source(n);
        let limit = (n == end.file).then_some(u64::from(end.offset));
        let (size, hash) = copy_hashed(&src, &temp.join(wirepath::validate(&name)?), limit, false)?;
        files.push(ManifestFile {
            name,
            kind: FileKind::Log,
            size,
            blake3: hash.to_hex().to_string(),
        });
    }
    Ok(files)
}

/// Builds a new backup of the mirror in a temp directory of the archive.
/// Returns the temp directory and its manifest.
fn build_backup(dir: &StandbyDir, archive: &Path) -> Result<(PathBuf, Manifest), ArchiveError> {
    for attempt in 1..=COPY_ATTEMPTS {
        let snap = take_snapshot(dir)?;
        let temp = temp_dir_in(archive, "new")?;
        let copied = copy_snapshot(dir, &snap, &temp);
        if !source_unchanged(dir, &snap)? {
            tracing::info!(
                attempt,
                "the standby's base changed during the copy; copying again"
            );
            remove_tree(&temp).map_err(io_err("removing a temporary directory"))?;
            continue;
        }
        let result = copied.and_then(|mut files| {
            let log_dir = temp.join(&snap.state.log_dir);
            let summary = scan_logs(
                &log_dir,
                snap.base.log_start.file,
                snap.durable.file,
                Some(snap.durable.offset),
                None,
            )?;
            files.sort_by(|a, b| a.name.cmp(&b.name));
            let now = tandem_shared::now_unix_ms();
            let mut m = Manifest {
                format: MANIFEST_FORMAT.into(),
                env_id: snap.env_id.clone(),
                base_id: snap.base.base_id.clone(),
                epoch: snap.state.epoch,
                source: dir.root.display().to_string(),
                created_unix_ms: now,
                updated_unix_ms: now,
                log_dir: snap.state.log_dir.clone(),
                log_start: snap.base.log_start,
                log_end: snap.durable,
                lg_max: summary.lg_max,
                commits: summary.commits,
                first_commit_unix: summary.first_commit_unix,
                last_commit_unix: summary.last_commit_unix,
                earliest_checkpoint_unix: summary.earliest_checkpoint_unix,
                files,
                proven: None,
                digest: String::new(),
            };
            m.seal();
            write_manifest_and_sync(&temp, &m)?;
            Ok(m)
        });
        return match result {
            Ok(m) => Ok((temp, m)),
            Err(e) => {
                let _ = remove_tree(&temp);
                Err(e)
            }
        };
    }
    Err(ArchiveError::SourceChanged {
        attempts: COPY_ATTEMPTS,
    })
}

/// Writes the manifest into a built backup and fsyncs the whole tree.
pub(crate) fn write_manifest_and_sync(temp: &Path, m: &Manifest) -> Result<(), ArchiveError> {
    let path = temp.join(MANIFEST_FILE);
    let mut f = OpenOptions::new()
        .write(true)
        .create_new(true)
        .open(&path)
        .map_err(io_err(format!("creating {}", path.display())))?;
    f.write_all(&m.to_bytes())
        .map_err(io_err(format!("writing {}", path.display())))?;
    f.sync_all()
        .map_err(io_err(format!("fsync of {}", path.display())))?;
    fsync_tree(temp).map_err(io_err(format!("fsync of {}", temp.display())))?;
    Ok(())
}

/// Seals the recovery proof into the manifest of a built, not yet
/// published backup (replacing its MANIFEST.json atomically), so that a
/// restore of these bytes can rely on it ([`Manifest::proof_covering`]).
fn record_proof(temp: &Path, m: &mut Manifest, p: &Proof) -> Result<(), ArchiveError> {
    let last_log = m.log_path(temp, m.log_end.file);
    let (_, prefix) = super::store::hash_file(&last_log, Some(u64::from(m.log_end.offset)))
        .map_err(io_err(format!("reading {}", last_log.display())))?;
    m.proven = Some(RecoveryProof {
        log_end: m.log_end,
        recovered_to: p.recovered_to,
        databases: m.databases().map(|f| f.name.clone()).collect(),
        unix_ms: tandem_shared::now_unix_ms(),
        files: m
            .files
            .iter()
            .map(|f| (f.name.clone(), f.blake3.clone()))
            .collect(),
        log_prefix_blake3: Some(prefix.to_hex().to_string()),
    });
    m.seal();
    let path = temp.join(MANIFEST_FILE);
    tandem_shared::durable::write_file_atomic(&path, &m.to_bytes())
        .map_err(io_err(format!("writing {}", path.display())))?;
    Ok(())
}

pub(crate) fn report_from(action: &str, backup: &Path, m: &Manifest) -> ArchiveReport {
    ArchiveReport {
        action: action.into(),
        backup: backup.display().to_string(),
        env_id: m.env_id.clone(),
        base_id: m.base_id.clone(),
        log_start: m.log_start,
        log_end: m.log_end,
        files: m.files.len(),
        bytes: m.bytes(),
        commits: m.commits,
        first_commit: m.first_commit_unix.map(rfc3339),
        last_commit: m.last_commit_unix.map(rfc3339),
        earliest_restore: m.earliest_restore_unix().map(rfc3339),
        unix_ms: tandem_shared::now_unix_ms(),
        ..Default::default()
    }
}

/// Creates the archive directory if needed. An archive inside the
/// standby directory is refused: it would put files into the mirror.
pub(crate) fn create_archive_dir(opts: &ArchiveOptions) -> Result<(), ArchiveError> {
    let archive = &opts.archive;
    if !archive.is_dir() {
        fs::create_dir_all(archive).map_err(io_err(format!("creating {}", archive.display())))?;
        if let Some(parent) = archive.parent().filter(|p| !p.as_os_str().is_empty()) {
            fsync_dir(parent).map_err(io_err(format!("fsync of {}", parent.display())))?;
        }
    }
    let canon =
        |p: &Path| fs::canonicalize(p).map_err(io_err(format!("resolving {}", p.display())));
    if let (Ok(dir), Ok(archive)) = (canon(&opts.dir), canon(archive)) {
        if archive.starts_with(&dir) {
            return Err(ArchiveError::Refused(format!(
                "the archive {} is inside the standby directory {}: put it elsewhere (another disk is best)",
                archive.display(),
                dir.display()
            )));
        }
    }
    Ok(())
}

/// Archives the standby once: a new backup, then retention.
pub fn archive_once(opts: &ArchiveOptions) -> Result<ArchiveReport, ArchiveError> {
    create_archive_dir(opts)?;
    let _writer = lock_archive(&opts.archive, WRITER_LOCK, true, true)?;
    clean_temps(&opts.archive)?;
    let report = new_backup(opts)?;
    record_report(opts, &report);
    Ok(report)
}

/// Keeps the last report in the standby's `.tandem` (for `status`).
pub(crate) fn record_report(opts: &ArchiveOptions, report: &ArchiveReport) {
    let dir = StandbyDir::new(&opts.dir);
    if let Ok(bytes) = serde_json::to_vec_pretty(report) {
        if let Err(e) =
            tandem_shared::durable::write_file_atomic(&dir.meta().join(REPORT_FILE), &bytes)
        {
            tracing::warn!(error = %e, "could not record the archive report in .tandem");
        }
    }
}

/// Builds, proves and publishes a new backup (with the writer lock held).
pub(crate) fn new_backup(opts: &ArchiveOptions) -> Result<ArchiveReport, ArchiveError> {
    let started = Instant::now();
    let dir = StandbyDir::new(&opts.dir);
    let (temp, mut m) = build_backup(&dir, &opts.archive)?;
    let copy_seconds = started.elapsed().as_secs_f64();
    let mut report = report_from("created", &temp, &m);
    report.copy_seconds = copy_seconds;
    if opts.verify {
        match prove_recovers(&temp, &m, opts.scratch.as_deref()) {
            Ok(p) => {
                report.verified = true;
                report.verify_seconds = p.seconds;
                report.recovery_seconds = p.recovery_seconds;
                if let Err(e) = record_proof(&temp, &mut m, &p) {
                    let _ = remove_tree(&temp);
                    return Err(e);
                }
            }
            Err(e) => {
                let _ = remove_tree(&temp);
                return Err(ArchiveError::Unproven(e));
            }
        }
    }
    let published = {
        let _publish = lock_archive(&opts.archive, PUBLISH_LOCK, true, true)?;
        let published = publish_new(&opts.archive, &temp, m.created_unix_ms, &m.base_id);
        if published.is_err() {
            let _ = remove_tree(&temp);
        }
        let published = published?;
        match apply_retention(&opts.archive, opts.keep, opts.keep_days, &published) {
            Ok(removed) => report.removed = removed,
            // The new backup is in place; only the clean-up failed.
            Err(e) => {
                tracing::error!(error = %e, "retention failed: old backups were not all deleted")
            }
        }
        published
    };
    report.backup = published.display().to_string();
    report.seconds = started.elapsed().as_secs_f64();
    tracing::info!(backup = %report.backup, log_end = %m.log_end, bytes = report.bytes, removed = report.removed.len(), "backup written");
    Ok(report)
}

/// Renames a built backup into place under a fresh name.
fn publish_new(
    archive: &Path,
    temp: &Path,
    created_ms: u64,
    base_id: &str,
) -> Result<PathBuf, ArchiveError> {
    let name = backup_name(created_ms, base_id);
    for i in 1..100u32 {
        let candidate = if i == 1 {
            archive.join(&name)
        } else {
            archive.join(format!("{name}-{i}"))
        };
        if fs::symlink_metadata(&candidate).is_ok() {
            continue;
        }
        match fs::rename(temp, &candidate) {
            Ok(()) => {
                fsync_dir(archive).map_err(io_err(format!("fsync of {}", archive.display())))?;
                return Ok(candidate);
            }
            Err(e) if target_exists(&e) => continue,
            Err(e) => {
                return Err(io_err(format!(
                    "renaming the new backup to {}",
                    candidate.display()
                ))(e)
                .into())
            }
        }
    }
    Err(ArchiveError::Refused(format!(
        "no free backup name for {name} in {}",
        archive.display()
    )))
}

/// Which backups retention deletes: those beyond the newest `keep`, and
/// those older than `keep_days`; never the newest. `backups` is oldest
/// first, as (name, created unix ms).
pub fn select_expired(
    backups: &[(String, u64)],
    keep: u32,
    keep_days: Option<f64>,
    now_ms: u64,
) -> Vec<String> {
    let n = backups.len();
    let keep = keep.max(1) as usize;
    backups
        .iter()
        .enumerate()
        .filter(|(i, (_, created))| {
            let from_newest = n - 1 - i;
            let too_old = keep_days
                .is_some_and(|d| (now_ms.saturating_sub(*created) as f64) > d * 86_400_000.0);
            from_newest > 0 && (from_newest >= keep || too_old)
        })
        .map(|(_, (name, _))| name.clone())
        .collect()
}

/// Deletes expired backups (with the publish lock held). `just_made` is
/// never deleted, whatever the clock says.
fn apply_retention(
    archive: &Path,
    keep: u32,
    keep_days: Option<f64>,
    just_made: &Path,
) -> Result<Vec<String>, StoreError> {
    let backups: Vec<(String, u64)> = list_backups(archive)?
        .into_iter()
        .map(|b| (b.name, b.created_unix_ms))
        .collect();
    let mut removed = Vec::new();
    for name in select_expired(&backups, keep, keep_days, tandem_shared::now_unix_ms()) {
        let path = archive.join(&name);
        if path == just_made {
            continue;
        }
        // Out of the listing atomically first, then deleted.
        let doomed = archive.join(format!("{TEMP_PREFIX}del-{name}"));
        fs::rename(&path, &doomed).map_err(io_err(format!("retiring {}", path.display())))?;
        fsync_dir(archive).map_err(io_err(format!("fsync of {}", archive.display())))?;
        remove_tree(&doomed).map_err(io_err(format!("deleting {}", doomed.display())))?;
        tracing::info!(backup = %name, "retention: deleted an old backup");
        removed.push(name);
    }
    Ok(removed)
}

impl std::fmt::Display for ArchiveReport {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let r = self;
        if r.action == "unchanged" {
            return write!(f, "{}: unchanged, log ends at {}", r.backup, r.log_end);
        }
        write!(
            f,
            "{} {}: {} files, {} bytes, log {} .. {}, {} commits ({} .. {}); {}{}",
            r.action,
            r.backup,
            r.files,
            r.bytes,
            r.log_start,
            r.log_end,
            r.commits,
            r.first_commit.as_deref().unwrap_or("-"),
            r.last_commit.as_deref().unwrap_or("-"),
            if r.verified {
                format!("proven recoverable (recovery {:.2} s)", r.recovery_seconds)
            } else {
                "not recovery-tested".into()
            },
            if r.removed.is_empty() {
                String::new()
            } else {
                format!("; retention deleted {}", r.removed.join(", "))
            },
        )
    }
}
