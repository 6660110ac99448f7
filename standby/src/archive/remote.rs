//! `archive`, `verify-archive` and `restore` against an archive in object
//! storage ([`super::bucket`]).
//!
//! Archiving builds the backup exactly as for a directory (a consistent
//! copy of the mirror, proven recoverable unless `--no-verify`) in a
//! staging directory on local disk, uploads every file that the bucket does
//! not hold yet, and only then writes the manifest, create-only. A backup
//! is visible in the bucket only through its manifest, so an interrupted
//! upload leaves objects nobody refers to and no backup. Restore and
//! verify download in parallel (bounded: [`TRANSFERS`] objects at a time,
//! each streamed to disk), check every byte against the manifest, and then
//! run the same checks and recovery as for a directory.

use super::bucket::{Bucket, BucketError, BucketManifest, BucketUrl, MANIFESTS, TRANSFERS};
use super::build::{archive_once, record_report, ArchiveError, ArchiveOptions, ArchiveReport};
use super::logscan::scan_logs;
use super::manifest::{read_manifest, Manifest, MANIFEST_FILE};
use super::proof::{ProofError, ScratchDir};
use super::restore::{
    check_until, ensure_empty_target, finish_restore, new_report, temp_beside, window_of,
    RestoreError, RestoreOptions, RestoreReport,
};
use super::time::{parse_time, rfc3339};
use super::verify::{verify_backup, VerifyError, VerifyReport};
use futures::{StreamExt, TryStreamExt};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

/// Where an archive is: a directory (a path, or `file://`) or a bucket.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Location {
    Dir(PathBuf),
    Bucket(BucketUrl),
}

impl Location {
    pub fn parse(p: &Path) -> Result<Self, BucketError> {
        let Some(s) = p.to_str() else {
            return Ok(Self::Dir(p.to_path_buf()));
        };
        if let Some(url) = BucketUrl::parse(s) {
            return url.map(Self::Bucket);
        }
        if let Some(path) = s.strip_prefix("file://") {
            if !path.starts_with('/') {
                return Err(BucketError::Url(format!(
                    "{s}: a file:// URL needs an absolute path (file:///srv/archive)"
                )));
            }
            return Ok(Self::Dir(PathBuf::from(path)));
        }
        if let Some((scheme, _)) = s.split_once("://") {
            return Err(BucketError::Url(format!(
                "{s}: {scheme}:// archives are not supported (s3://BUCKET/PREFIX, file:///PATH or a path)"
            )));
        }
        Ok(Self::Dir(p.to_path_buf()))
    }
}

/// A manifest found in the bucket.
pub struct Listed {
    pub key: String,
    pub manifest: Result<BucketManifest, BucketError>,
}

/// The bucket's backups, oldest first (by epoch, creation, log end);
/// unreadable manifests last.
pub async fn list_manifests(bucket: &Bucket) -> Result<Vec<Listed>, BucketError> {
    let keys = bucket.list(MANIFESTS).await?;
    let reads = futures::stream::iter(keys.into_iter().filter(|(k, ..)| k.ends_with(".json")))
        .map(|(key, ..)| async move {
            let manifest = match bucket.read(&key).await {
                Ok(Some(b)) => BucketManifest::parse(&b, &bucket.show(&key)),
                Ok(None) => Err(BucketError::Object {
                    key: bucket.show(&key),
                    why: "listed but gone".into(),
                }),
                Err(e) => Err(e),
            };
            Listed { key, manifest }
        })
        .buffer_unordered(TRANSFERS)
        .collect::<Vec<_>>()
        .await;
    let mut out = reads;
    out.sort_by_key(|l| match &l.manifest {
        Ok(bm) => (
            0,
            bm.backup.epoch,
            bm.backup.created_unix_ms,
            bm.backup.log_end,
            l.key.clone(),
        ),
        Err(_) => (1, 0, 0, Default::default(), l.key.clone()),
    });
    Ok(out)
}

fn readable(listed: Vec<Listed>) -> Vec<(String, BucketManifest)> {
    listed
        .into_iter()
        .filter_map(|l| match l.manifest {
            Ok(m) => Some((l.key, m)),
            Err(e) => {
                tracing::warn!(error = %e, "skipping a backup whose manifest is unreadable");
                None
            }
        })
        .collect()
}

/// Downloads every file of `bm` into `dest` (TRANSFERS at a time), each
/// checked against the manifest; logs progress every few seconds.
pub async fn download_backup(
    bucket: &Bucket,
    bm: &BucketManifest,
    dest: &Path,
) -> Result<u64, BucketError> {
    let total: u64 = bm.entries().map(|(_, _, stored)| stored).sum();
    let done = Arc::new(AtomicU64::new(0));
    let ticker = {
        let done = done.clone();
        tokio::spawn(async move {
            let started = Instant::now();
            loop {
                tokio::time::sleep(Duration::from_secs(2)).await;
                let n = done.load(Ordering::Relaxed);
                tracing::info!(
                    "downloaded {:.1} of {:.1} MiB ({:.0}%, {:.1} MiB/s)",
                    n as f64 / 1048576.0,
                    total as f64 / 1048576.0,
                    if total == 0 {
                        100.0
                    } else {
                        n as f64 * 100.0 / total as f64
                    },
                    n as f64 / 1048576.0 / started.elapsed().as_secs_f64()
                );
            }
        })
    };
    let result = futures::stream::iter(bm.entries())
        .map(|(f, key, stored)| {
            let done = &done;
            async move {
                let rel = tandem_shared::wirepath::validate(&f.name).map_err(|e| {
                    BucketError::Object {
                        key: bucket.show(key),
                        why: format!("refused file name: {e}"),
                    }
                })?;
                bucket.download(key, f, stored, &dest.join(rel), done).await
            }
        })
        .buffer_unordered(TRANSFERS)
        .try_collect::<Vec<()>>()
        .await;
    ticker.abort();
    result?;
    let n = done.load(Ordering::Relaxed);
    tracing::info!(
        "downloaded {:.1} MiB, every byte checked against the manifest",
        n as f64 / 1048576.0
    );
    Ok(n)
}

// ---------------------------------------------------------------- archive

/// `archive --to s3://…` once: a backup built and proven in local staging,
/// its files uploaded, its manifest written last (create-only).
pub async fn archive_to_bucket(
    opts: &ArchiveOptions,
    bucket: &Bucket,
) -> Result<ArchiveReport, ArchiveError> {
    let started = Instant::now();
    let staging = ScratchDir::new(opts.scratch.as_deref(), "stage").map_err(proof_err)?;
    let local_opts = ArchiveOptions {
        archive: staging.path.clone(),
        keep: 1,
        keep_days: None,
        ..opts.clone()
    };
    let local = tokio::task::spawn_blocking(move || archive_once(&local_opts))
        .await
        .map_err(|e| ArchiveError::Refused(format!("the archiving task failed: {e}")))??;
    let backup = PathBuf::from(&local.backup);
    let m = read_manifest(&backup).map_err(|e| ArchiveError::Refused(e.to_string()))?;
    let mut report = publish(bucket, &backup, m, &[]).await?;
    report.copy_seconds = local.copy_seconds;
    report.verified = local.verified;
    report.verify_seconds = local.verify_seconds;
    report.recovery_seconds = local.recovery_seconds;
    report.seconds = started.elapsed().as_secs_f64();
    record_report(opts, &report);
    Ok(report)
}

/// Uploads the files of the local backup `backup` (described by `m`) that
/// the bucket does not hold yet, then its manifest, create-only. `reuse`:
/// objects already written for files of the same base.
pub(crate) async fn publish(
    bucket: &Bucket,
    backup: &Path,
    m: Manifest,
    reuse: &[(super::manifest::ManifestFile, u64, String)],
) -> Result<ArchiveReport, ArchiveError> {
    let bm = BucketManifest::new(m, reuse);
    let key = super::bucket::manifest_key(&bm.backup);
    let shown = bucket.show(&key);
    // No look before the upload: the create-only put below is what decides
    // (two archivers racing both pass a look). Objects name their content,
    // so uploading them cannot harm another archiver's backups.
    let uploaded = AtomicU64::new(0);
    futures::stream::iter(bm.entries())
        .map(|(f, obj, stored)| {
            let uploaded = &uploaded;
            async move {
                if bucket.size(obj).await? == Some(stored) {
                    return Ok(());
                }
                let rel = tandem_shared::wirepath::validate(&f.name).map_err(|e| {
                    BucketError::Object {
                        key: bucket.show(obj),
                        why: format!("refused file name: {e}"),
                    }
                })?;
                bucket.upload(obj, &backup.join(rel), stored).await?;
                uploaded.fetch_add(stored, Ordering::Relaxed);
                Ok::<(), BucketError>(())
            }
        })
        .buffer_unordered(TRANSFERS)
        .try_collect::<Vec<()>>()
        .await?;
    // Every object is confirmed: now the manifest, which makes the backup.
    if !bucket.create(&key, bm.to_bytes()).await? {
        let existing = bucket.read(&key).await?.unwrap_or_default();
        // A retried PUT whose first attempt got through finds itself.
        if existing != bm.to_bytes() {
            return existing_manifest(bucket, &key, &existing, &bm);
        }
    }
    let mut report = super::build::report_from("created", Path::new(&shown), &bm.backup);
    report.uploaded_bytes = uploaded.load(Ordering::Relaxed);
    tracing::info!(manifest = %shown, log_end = %bm.backup.log_end, uploaded = report.uploaded_bytes, "backup written to the bucket");
    Ok(report)
}

/// A manifest already holds our name: the same backup (nothing to do), or
/// another archiver's history, which is never overwritten.
fn existing_manifest(
    bucket: &Bucket,
    key: &str,
    existing: &[u8],
    ours: &BucketManifest,
) -> Result<ArchiveReport, ArchiveError> {
    let shown = bucket.show(key);
    match BucketManifest::parse(existing, &shown) {
        Ok(theirs) if theirs.same_content(ours) => {
            Ok(super::build::report_from("unchanged", Path::new(&shown), &theirs.backup))
        }
        Ok(theirs) => Err(ArchiveError::Refused(format!(
            "{shown} already exists with other files, written by another archiver (from {}, created {}): \
             nothing was overwritten; each archiver needs its own prefix unless they archive the same history",
            theirs.backup.source,
            rfc3339((theirs.backup.created_unix_ms / 1000) as i64)
        ))),
        Err(e) => Err(ArchiveError::Refused(format!(
            "{shown} already exists and is not a manifest this archiver can read ({e}): nothing was overwritten"
        ))),
    }
}

fn proof_err(e: ProofError) -> ArchiveError {
    ArchiveError::Refused(e.to_string())
}

// ---------------------------------------------------------------- verify

/// `verify-archive s3://…`: the newest backup (every one with `all`),
/// each downloaded into scratch, checked and recovered there.
pub async fn verify_bucket(
    bucket: &Bucket,
    all: bool,
    scratch: Option<&Path>,
) -> Result<Vec<VerifyReport>, VerifyError> {
    let mut listed = list_manifests(bucket).await?;
    if listed.is_empty() {
        return Err(VerifyError::Mismatch(format!(
            "no backups in {} (no manifest under {MANIFESTS}/)",
            bucket.url
        )));
    }
    if !all {
        // The newest readable one, or the newest (unreadable) if none is.
        let pick = listed
            .iter()
            .rposition(|l| l.manifest.is_ok())
            .unwrap_or(listed.len() - 1);
        listed = vec![listed.swap_remove(pick)];
    }
    let mut reports = Vec::new();
    for l in listed {
        reports.push(verify_one(bucket, l, scratch).await);
    }
    Ok(reports)
}

async fn verify_one(bucket: &Bucket, l: Listed, scratch: Option<&Path>) -> VerifyReport {
    let started = Instant::now();
    let shown = bucket.show(&l.key);
    let failed = |e: String| VerifyReport {
        backup: shown.clone(),
        error: Some(e),
        seconds: started.elapsed().as_secs_f64(),
        ..Default::default()
    };
    let bm = match l.manifest {
        Ok(bm) => bm,
        Err(e) => return failed(e.to_string()),
    };
    let dir = match ScratchDir::new(scratch, "fetch") {
        Ok(d) => d,
        Err(e) => return failed(e.to_string()),
    };
    let home = dir.path.join("backup");
    if let Err(e) = download_backup(bucket, &bm, &home).await {
        return failed(e.to_string());
    }
    let manifest = home.join(MANIFEST_FILE);
    if let Err(e) = std::fs::write(&manifest, bm.backup.to_bytes()) {
        return failed(format!("writing {}: {e}", manifest.display()));
    }
    let scratch = scratch.map(Path::to_path_buf);
    let mut r = match tokio::task::spawn_blocking(move || {
        let r = verify_backup(&home, scratch.as_deref());
        drop(dir);
        r
    })
    .await
    {
        Ok(r) => r,
        Err(e) => return failed(e.to_string()),
    };
    r.backup = shown;
    r.seconds = started.elapsed().as_secs_f64();
    r
}

// ---------------------------------------------------------------- restore

/// `restore --from s3://…`: the newest backup (with `--until`, the newest
/// whose window holds the time) downloaded beside the target, checked,
/// recovered and renamed into place.
pub async fn restore_from_bucket(
    bucket: &Bucket,
    opts: &RestoreOptions,
) -> Result<RestoreReport, RestoreError> {
    let started = Instant::now();
    let until = opts.until.as_deref().map(parse_time).transpose()?;
    ensure_empty_target(&opts.to)?;
    let backups = readable(list_manifests(bucket).await?);
    let (key, bm) = choose(bucket, backups, until)?;
    let shown = bucket.show(&key);
    let report = new_report(&shown, opts, &bm.backup, until);
    let temp = temp_beside(&opts.to)?;
    download_backup(bucket, &bm, &temp.path).await?;
    let opts = opts.clone();
    tokio::task::spawn_blocking(move || {
        let m = &bm.backup;
        let summary = scan_logs(
            &temp.path.join(&m.log_dir),
            m.log_start.file,
            m.log_end.file,
            Some(m.log_end.offset),
            None,
        )?;
        let mut report = report;
        check_until(&mut report, until, &summary, Path::new(&shown))?;
        finish_restore(temp, m, &opts, report, started)
    })
    .await
    .map_err(|e| RestoreError::Refused(format!("the restore task failed: {e}")))?
}

fn choose(
    bucket: &Bucket,
    backups: Vec<(String, BucketManifest)>,
    until: Option<i64>,
) -> Result<(String, BucketManifest), RestoreError> {
    let mut windows = Vec::new();
    for (key, bm) in backups.into_iter().rev() {
        let Some(t) = until else { return Ok((key, bm)) };
        if let Some((lo, hi)) = window_of(&bm.backup) {
            if (lo..=hi).contains(&t) {
                return Ok((key, bm));
            }
            windows.push((lo, hi));
        }
    }
    let edge = |w: Option<i64>| w.map(rfc3339).unwrap_or_else(|| "-".into());
    match until {
        None => Err(RestoreError::NoBackups(PathBuf::from(
            bucket.url.to_string(),
        ))),
        Some(t) => Err(RestoreError::OutsideWindow {
            backup: bucket.url.to_string(),
            requested: rfc3339(t),
            from: edge(windows.iter().map(|w| w.0).min()),
            to: edge(windows.iter().map(|w| w.1).max()),
            why: "no backup in the bucket covers that time".into(),
        }),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn locations() {
        let dir = |s: &str| Location::parse(Path::new(s)).unwrap();
        assert_eq!(dir("/srv/a"), Location::Dir("/srv/a".into()));
        assert_eq!(dir("rel/a"), Location::Dir("rel/a".into()));
        assert_eq!(dir("file:///srv/a"), Location::Dir("/srv/a".into()));
        assert!(matches!(dir("s3://b/p"), Location::Bucket(_)));
        assert!(Location::parse(Path::new("gs://b/p")).is_err());
        assert!(Location::parse(Path::new("file://rel")).is_err());
    }
}
