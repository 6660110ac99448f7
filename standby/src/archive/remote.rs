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
use super::manifest::{read_manifest, Manifest, MANIFEST_FILE};
use super::proof::{ProofError, ScratchDir};
use super::restore::{
    ensure_empty_target, finish_copied, new_report, temp_beside, window_of, RestoreError,
    RestoreOptions, RestoreReport,
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
    report.removed = bucket_retention(bucket, opts.keep, opts.keep_days).await?;
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
    // This very manifest, published by an earlier round: nothing to do. Any
    // other case is decided by the create-only put below, not by this look
    // (two archivers racing both pass a look). Objects name their content,
    // so uploading them cannot harm another archiver's backups.
    if bucket.read(&key).await?.is_some_and(|b| b == bm.to_bytes()) {
        return Ok(super::build::report_from(
            "unchanged",
            Path::new(&shown),
            &bm.backup,
        ));
    }
    let uploaded = AtomicU64::new(0);
    // After a failure no new upload starts, but those under way run to
    // their end (completed, or failed and aborted): dropping one midway
    // would leave its multipart upload behind.
    let failed = std::sync::atomic::AtomicBool::new(false);
    let results: Vec<Result<(), BucketError>> = futures::stream::iter(bm.entries())
        .map(|(f, obj, stored)| {
            let (uploaded, failed) = (&uploaded, &failed);
            async move {
                if failed.load(Ordering::SeqCst) {
                    return Ok(());
                }
                let rel = tandem_shared::wirepath::validate(&f.name).map_err(|e| {
                    BucketError::Object {
                        key: bucket.show(obj),
                        why: format!("refused file name: {e}"),
                    }
                })?;
                match bucket.ensure(obj, &backup.join(rel), stored).await {
                    Ok(true) => {
                        uploaded.fetch_add(stored, Ordering::Relaxed);
                        Ok(())
                    }
                    Ok(false) => Ok(()),
                    Err(e) => {
                        failed.store(true, Ordering::SeqCst);
                        Err(e)
                    }
                }
            }
        })
        .buffer_unordered(TRANSFERS)
        .collect()
        .await;
    results.into_iter().collect::<Result<Vec<()>, _>>()?;
    // Every object is confirmed: now the manifest, which makes the backup.
    let created = match bucket.create(&key, bm.to_bytes()).await {
        Ok(c) => c,
        // The put may have reached the store before the failure (its answer
        // lost): then the manifest there is ours, byte for byte.
        Err(e) => match bucket.read(&key).await {
            Ok(Some(there)) if there == bm.to_bytes() => true,
            _ => return Err(e.into()),
        },
    };
    if !created {
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

/// One round of `archive --follow` to a bucket: the local follow round in
/// `staging` (extend the staged backup, or start a new one), the staged
/// backups uploaded, and only then the standby's hold moved to what the
/// bucket confirmed; then retention.
pub async fn follow_round_to_bucket(
    opts: &ArchiveOptions,
    staging: &Path,
    bucket: &Bucket,
) -> Result<ArchiveReport, ArchiveError> {
    let started = Instant::now();
    let local_opts = ArchiveOptions {
        archive: staging.to_path_buf(),
        // The previous base's backup stays staged while the next starts.
        keep: 2,
        keep_days: None,
        ..opts.clone()
    };
    let local =
        tokio::task::spawn_blocking(move || super::follow::follow_round_unregistered(&local_opts))
            .await
            .map_err(|e| ArchiveError::Refused(format!("the archiving task failed: {e}")))??;
    let mut staged = super::store::list_backups(staging)?;
    if local.action != "created" {
        // Only a new base can leave an older staged backup to finish.
        staged.retain(|b| b.path == Path::new(&local.backup));
    }
    let mut report = None;
    for b in staged {
        let m = read_manifest(&b.path).map_err(|e| ArchiveError::Refused(e.to_string()))?;
        let r = publish(bucket, &b.path, m, &[]).await?;
        if b.path == Path::new(&local.backup) {
            report = Some(r);
        }
    }
    let mut report = report.ok_or_else(|| {
        ArchiveError::Refused(format!("the staged backup {} vanished", local.backup))
    })?;
    if report.action == "created" && local.action == "extended" {
        report.action = "extended".into();
    }
    // The bucket holds everything up to here: the standby may let go of it.
    super::follow::register_hold(
        &crate::state::StandbyDir::new(&opts.dir),
        &bucket.url.to_string(),
        report.log_end,
    )?;
    report.removed = bucket_retention(bucket, opts.keep, opts.keep_days).await?;
    report.copy_seconds = local.copy_seconds;
    report.seconds = started.elapsed().as_secs_f64();
    if report.action != "unchanged" {
        record_report(opts, &report);
    }
    Ok(report)
}

/// `archive --follow SECS --to s3://…`: a round every `every` until `stop`
/// is set, staged in a scratch directory that lives as long as the process
/// (a restarted archiver stages afresh and uploads only what the bucket
/// lacks). A failed round changes no hold and is retried next time.
pub async fn follow_to_bucket(
    opts: &ArchiveOptions,
    bucket: &Bucket,
    every: Duration,
    stop: &std::sync::atomic::AtomicBool,
    mut report: impl FnMut(&Result<ArchiveReport, ArchiveError>),
) -> Result<(), ArchiveError> {
    // A killed archiver cannot remove its staging: its successor does.
    super::proof::sweep_dead_scratch(opts.scratch.as_deref());
    let staging = ScratchDir::new(opts.scratch.as_deref(), "follow-stage").map_err(proof_err)?;
    while !stop.load(Ordering::SeqCst) {
        let started = Instant::now();
        let result = follow_round_to_bucket(opts, &staging.path, bucket).await;
        if let Err(e) = &result {
            tracing::error!(error = %e, "archive round failed; retrying next round");
        }
        report(&result);
        if let (Ok(_), Some(every)) = (&result, opts.drill_every) {
            let dir = crate::state::StandbyDir::new(&opts.dir);
            if super::drill::due(&dir, every.as_millis() as u64, tandem_shared::now_unix_ms()) {
                let v = match verify_bucket(bucket, false, opts.scratch.as_deref()).await {
                    Ok(mut reports) => reports.pop().unwrap_or_default(),
                    Err(e) => VerifyReport {
                        backup: bucket.url.to_string(),
                        error: Some(e.to_string()),
                        ..Default::default()
                    },
                };
                super::drill::record(&dir, &v);
            }
        }
        while !stop.load(Ordering::SeqCst) && started.elapsed() < every {
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }
    Ok(())
}

/// Retention in a bucket. A backup there is one base (environment, base,
/// log start): a later manifest of it holds everything an earlier one does
/// (the same files, the log further), so earlier ones are deleted once the
/// later one is confirmed. Of the backups, those beyond the newest `keep`
/// and those older than `keep_days` are deleted, never the newest; an
/// object is deleted only if a deleted manifest named it and no kept one
/// does. Manifests go first, so no backup ever names a deleted object.
/// Returns the manifests deleted.
pub async fn bucket_retention(
    bucket: &Bucket,
    keep: u32,
    keep_days: Option<f64>,
) -> Result<Vec<String>, BucketError> {
    let listed = readable(list_manifests(bucket).await?);
    type Group = (String, String, tandem_shared::LogPosition);
    let group_of = |bm: &BucketManifest| -> Group {
        (
            bm.backup.env_id.clone(),
            bm.backup.base_id.clone(),
            bm.backup.log_start,
        )
    };
    // The newest manifest of each backup, in listing order (oldest first).
    let mut newest: Vec<(Group, usize)> = Vec::new();
    for (i, (_, bm)) in listed.iter().enumerate() {
        let g = group_of(bm);
        match newest.iter_mut().find(|(h, _)| *h == g) {
            Some(entry) if listed[entry.1].1.backup.log_end <= bm.backup.log_end => entry.1 = i,
            Some(_) => {}
            None => newest.push((g, i)),
        }
    }
    newest.sort_by_key(|(_, i)| *i);
    let backups: Vec<(String, u64)> = newest
        .iter()
        .map(|(_, i)| (listed[*i].0.clone(), listed[*i].1.backup.created_unix_ms))
        .collect();
    let expired =
        super::build::select_expired(&backups, keep, keep_days, tandem_shared::now_unix_ms());
    let doomed: Vec<usize> = (0..listed.len())
        .filter(|i| {
            let (key, bm) = &listed[*i];
            let Some((_, n)) = newest.iter().find(|(g, _)| *g == group_of(bm)) else {
                return false;
            };
            let head = &listed[*n];
            if expired.contains(&head.0) {
                return true;
            }
            *key != head.0 && supersedes(&head.1, bm)
        })
        .collect();
    let kept: std::collections::BTreeSet<&str> = (0..listed.len())
        .filter(|i| !doomed.contains(i))
        .flat_map(|i| listed[i].1.objects.iter().map(String::as_str))
        .collect();
    let mut removed = Vec::new();
    for i in &doomed {
        bucket.delete(&listed[*i].0).await?;
        removed.push(listed[*i].0.clone());
    }
    let orphans: std::collections::BTreeSet<&str> = doomed
        .iter()
        .flat_map(|i| listed[*i].1.objects.iter().map(String::as_str))
        .filter(|k| !kept.contains(k))
        .collect();
    for k in orphans {
        bucket.delete(k).await?;
    }
    for k in &removed {
        tracing::info!(manifest = %bucket.show(k), "retention: deleted");
    }
    Ok(removed)
}

/// Does `newer` hold everything `older` does: the same files, except the
/// last log file, which `newer` extends?
fn supersedes(newer: &BucketManifest, older: &BucketManifest) -> bool {
    let (n, o) = (&newer.backup, &older.backup);
    let last = super::manifest::log_rel_name(&o.log_dir, o.log_end.file);
    n.log_start == o.log_start
        && n.log_end >= o.log_end
        && o.files
            .iter()
            .filter(|f| f.name != last)
            .all(|f| n.files.contains(f))
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
        finish_copied(temp, &bm.backup, &opts, report, Path::new(&shown), started)
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

    fn manifest(end: u32, files: &[(&str, &str)]) -> BucketManifest {
        use super::super::manifest::{test_manifest, FileKind, ManifestFile};
        let files = files
            .iter()
            .map(|(name, digest)| ManifestFile {
                name: (*name).into(),
                kind: if name.starts_with("log.") {
                    FileKind::Log
                } else {
                    FileKind::Database
                },
                size: 10,
                blake3: (*digest).into(),
            })
            .collect();
        BucketManifest::new(test_manifest("b", 0, end, files), &[])
    }

    #[test]
    fn only_a_manifest_holding_everything_supersedes() {
        let old = manifest(100, &[("data.db", "d1"), ("log.0000000001", "l1")]);
        let grown = manifest(200, &[("data.db", "d1"), ("log.0000000001", "l2")]);
        let diverged = manifest(200, &[("data.db", "XX"), ("log.0000000001", "l2")]);
        assert!(supersedes(&grown, &old));
        assert!(!supersedes(&old, &grown), "a shorter log never supersedes");
        assert!(
            !supersedes(&diverged, &old),
            "other database bytes: another history"
        );
    }

    /// A sealed manifest of base `base` created at `created` (unix ms) with
    /// the log at (1, `end`) and data.db holding `data`.
    fn sealed(base: &str, created: u64, end: u32, data: &str) -> BucketManifest {
        use super::super::manifest::{test_manifest, FileKind, ManifestFile};
        let file = |name: &str, kind, size, seed: &str| ManifestFile {
            name: name.into(),
            kind,
            size,
            blake3: blake3::hash(seed.as_bytes()).to_hex().to_string(),
        };
        let files = vec![
            file("data.db", FileKind::Database, 10, data),
            file(
                "log.0000000001",
                FileKind::Log,
                1 << 20,
                &format!("{base}{end}"),
            ),
        ];
        BucketManifest::new(test_manifest(base, created, end, files), &[])
    }

    #[test]
    fn bucket_retention_keeps_the_newest_and_everything_it_names() {
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        let url = BucketUrl::parse("s3://b/p").unwrap().unwrap();
        let bucket = Bucket::over(Arc::new(object_store::memory::InMemory::new()), url);
        let day = 86_400_000u64;
        let now = tandem_shared::now_unix_ms();
        // Base a: two manifests (the later supersedes), base b: two sharing
        // data.db, base c the newest, created ten days ago.
        let all = [
            sealed("a", now - 30 * day, 100, "a-data"),
            sealed("a", now - 30 * day, 200, "a-data"),
            sealed("b", now - 20 * day, 100, "b-data"),
            sealed("b", now - 20 * day, 300, "b-data"),
            sealed("c", now - 10 * day, 100, "c-data"),
        ];
        rt.block_on(async {
            for bm in &all {
                for (_, obj, _) in bm.entries() {
                    bucket
                        .create(obj, bytes::Bytes::from_static(b"x"))
                        .await
                        .unwrap();
                }
                let key = super::super::bucket::manifest_key(&bm.backup);
                assert!(bucket.create(&key, bm.to_bytes()).await.unwrap());
            }
        });
        let manifests = || rt.block_on(bucket.list(MANIFESTS)).unwrap().len();
        let objects = || -> Vec<String> {
            rt.block_on(bucket.list(super::super::bucket::OBJECTS))
                .unwrap()
                .into_iter()
                .map(|(k, ..)| k)
                .collect()
        };
        let names = |bm: &BucketManifest| -> Vec<String> { bm.objects.clone() };
        // keep 2: base a goes (both manifests, all its objects); b's
        // superseded manifest goes, the data.db object both name stays.
        let removed = rt.block_on(bucket_retention(&bucket, 2, None)).unwrap();
        assert_eq!(removed.len(), 3, "{removed:?}");
        assert_eq!(manifests(), 2);
        let left = objects();
        for k in names(&all[0]).iter().chain(&names(&all[1])) {
            assert!(!left.contains(k), "{k} of base a kept");
        }
        for k in names(&all[3]).iter().chain(&names(&all[4])) {
            assert!(left.contains(k), "{k} deleted but still named");
        }
        assert!(!left.contains(&all[2].objects[1]), "b's old log object");
        // keep-days 5: b is older (goes); c is older too but the newest:
        // never deleted, nor anything it names, even with keep 1.
        let removed = rt
            .block_on(bucket_retention(&bucket, 1, Some(5.0)))
            .unwrap();
        assert_eq!(removed.len(), 1, "{removed:?}");
        assert_eq!(manifests(), 1);
        let mut left = objects();
        left.sort();
        let mut want = names(&all[4]);
        want.sort();
        assert_eq!(left, want);
        let removed = rt
            .block_on(bucket_retention(&bucket, 0, Some(0.0)))
            .unwrap();
        assert!(removed.is_empty());
        assert_eq!(objects().len(), 2);
    }

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
