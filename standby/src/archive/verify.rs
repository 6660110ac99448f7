//! `tandem-standby verify-archive`: proves a backup intact and recoverable
//! without writing to it. The listing is checked against the manifest
//! (missing, extra, resized files and a manifest whose digest does not
//! match are each named), then every file is copied into a scratch
//! directory and hashed as it is copied (each file read once; every altered
//! file is named), the copy's log is walked as one verified record chain,
//! and the copy is recovered and `db_verify`ed.

use super::logscan::ScanError;
use super::manifest::{read_manifest, ManifestError, MANIFEST_FILE};
use super::proof::{recover_scratch, ProofError, ScratchDir};
use super::store::{
    archive_of, check_listing, copy_checked, list_backups, lock_archive, StoreError, PUBLISH_LOCK,
};
use super::time::rfc3339;
use serde::Serialize;
use std::fs;
use std::io;
use std::path::{Path, PathBuf};
use std::time::Instant;
use tandem_shared::LogPosition;

pub use super::store::Problem;

/// Why a backup did not verify, or could not be found.
#[derive(Debug, thiserror::Error)]
pub enum VerifyError {
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
    #[error("opening {}: {source}", .path.display())]
    Open { path: PathBuf, source: io::Error },
    #[error("no backups in {} (a backup is a directory holding {MANIFEST_FILE})", .0.display())]
    NoBackups(PathBuf),
    /// The manifest's summary of the log disagrees with the log.
    #[error("{0}")]
    Mismatch(String),
}

#[derive(Debug, Clone, Default, Serialize)]
pub struct VerifyReport {
    pub backup: String,
    pub ok: bool,
    pub env_id: String,
    pub base_id: String,
    pub files: usize,
    pub bytes: u64,
    pub log_start: LogPosition,
    pub log_end: LogPosition,
    pub commits: u64,
    pub first_commit: Option<String>,
    pub last_commit: Option<String>,
    pub earliest_restore: Option<String>,
    /// Each file that is missing, extra, resized or altered.
    pub problems: Vec<Problem>,
    pub recovered_to: Option<LogPosition>,
    pub recovery_seconds: f64,
    pub databases_verified: usize,
    pub seconds: f64,
    pub error: Option<String>,
}

/// The backups `target` names: itself if it holds a manifest, otherwise
/// the newest backup in it (all of them with `all`).
pub fn resolve_backups(target: &Path, all: bool) -> Result<Vec<PathBuf>, VerifyError> {
    if fs::symlink_metadata(target.join(MANIFEST_FILE)).is_ok() {
        return Ok(vec![target.to_path_buf()]);
    }
    if !target.is_dir() {
        return Err(VerifyError::Open {
            path: target.to_path_buf(),
            source: io::Error::from(io::ErrorKind::NotFound),
        });
    }
    let mut backups: Vec<PathBuf> = list_backups(target)?.into_iter().map(|b| b.path).collect();
    if backups.is_empty() {
        return Err(VerifyError::NoBackups(target.to_path_buf()));
    }
    if !all {
        backups = backups.split_off(backups.len() - 1);
    }
    Ok(backups)
}

/// Checks one backup: manifest, every file's blake3, the log chain, then
/// recovery and `db_verify` on a scratch copy.
pub fn verify_backup(backup: &Path, scratch: Option<&Path>) -> VerifyReport {
    let started = Instant::now();
    let mut r = VerifyReport {
        backup: backup.display().to_string(),
        ..Default::default()
    };
    match verify_inner(backup, scratch, &mut r) {
        Ok(()) => r.ok = true,
        Err(e) => {
            if let VerifyError::Store(StoreError::Integrity { problems, .. }) = &e {
                r.problems = problems.clone();
            }
            r.error = Some(e.to_string());
        }
    }
    r.seconds = started.elapsed().as_secs_f64();
    r
}

fn verify_inner(
    backup: &Path,
    scratch: Option<&Path>,
    r: &mut VerifyReport,
) -> Result<(), VerifyError> {
    let lock = lock_archive(&archive_of(backup), PUBLISH_LOCK, false, false)?;
    let m = read_manifest(backup)?;
    r.env_id = m.env_id.clone();
    r.base_id = m.base_id.clone();
    r.files = m.files.len();
    r.log_start = m.log_start;
    r.log_end = m.log_end;
    r.commits = m.commits;
    r.first_commit = m.first_commit_unix.map(rfc3339);
    r.last_commit = m.last_commit_unix.map(rfc3339);
    r.earliest_restore = m.earliest_restore_unix().map(rfc3339);
    // Every file read once: hashed as it is copied into the scratch
    // directory, whose log is then walked (the bytes just checked).
    let problems = check_listing(backup, &m)?;
    if !problems.is_empty() {
        return Err(integrity(backup, problems));
    }
    r.bytes = m.bytes();
    let started = Instant::now();
    let dir = ScratchDir::new(scratch, "verify")?;
    let (_, problems) = copy_checked(backup, &m, &dir.path, false)?;
    drop(lock);
    if !problems.is_empty() {
        return Err(integrity(backup, problems));
    }
    let summary = m.scan_log(&dir.path)?;
    if summary.commits != m.commits
        || summary.first_commit_unix != m.first_commit_unix
        || summary.last_commit_unix != m.last_commit_unix
    {
        return Err(VerifyError::Mismatch(format!(
            "{}: the manifest's commit count or times do not match its log ({} commits {:?}..{:?} in the log)",
            backup.display(),
            summary.commits,
            summary.first_commit_unix,
            summary.last_commit_unix
        )));
    }
    let proof = recover_scratch(&dir.path, &m)?;
    r.recovered_to = proof.recovered_to;
    r.recovery_seconds = proof.recovery_seconds;
    r.databases_verified = proof.databases_verified;
    tracing::info!(backup = %backup.display(), secs = started.elapsed().as_secs_f64(), "backup verified");
    Ok(())
}

fn integrity(backup: &Path, problems: Vec<Problem>) -> VerifyError {
    StoreError::Integrity {
        backup: backup.to_path_buf(),
        problems,
    }
    .into()
}

impl std::fmt::Display for VerifyReport {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let r = self;
        if !r.ok {
            write!(
                f,
                "FAILED {}: {}",
                r.backup,
                r.error.as_deref().unwrap_or("?")
            )?;
            for p in &r.problems {
                write!(f, "\n  {p}")?;
            }
            return Ok(());
        }
        write!(
            f,
            "OK {}: {} files, {} bytes match the manifest; log {} .. {}; recovered to {} in {:.2} s; {} databases verified; restorable {} .. {}",
            r.backup,
            r.files,
            r.bytes,
            r.log_start,
            r.log_end,
            r.recovered_to.map(|l| l.to_string()).unwrap_or_else(|| "-".into()),
            r.recovery_seconds,
            r.databases_verified,
            r.earliest_restore.as_deref().unwrap_or("-"),
            r.last_commit.as_deref().unwrap_or("-"),
        )
    }
}
