//! `tandem-standby archive --follow`: keeps the latest backup as close to
//! the standby as a round allows. Files in a published backup are never
//! modified: a round builds the latest backup's successor beside it (hard
//! links for the files that did not change, fresh copies of the extended
//! last log file and the new ones, a new manifest) and swaps the two
//! directories atomically (`renameat2(RENAME_EXCHANGE)`). When the standby
//! moves to a new base, the previous backup is first finished with the log
//! held for it ([`crate::archive_hold`]), then a new backup starts, so
//! restore windows overlap.

use super::build::{
    copy_logs, create_archive_dir, log_source, new_backup, record_report, report_from,
    source_unchanged, take_snapshot, write_manifest_and_sync, ArchiveError, ArchiveOptions,
    ArchiveReport, Snapshot, COPY_ATTEMPTS,
};
use super::logscan::{scan_log_chain, scan_logs};
use super::manifest::{log_rel_name, read_manifest, Manifest};
use super::store::{
    cannot_exchange, clean_temps, exchange_dirs, hash_file, list_backups, lock_archive,
    remove_tree, temp_dir_in, BackupEntry, PUBLISH_LOCK, WRITER_LOCK,
};
use crate::state::StandbyDir;
use std::fs;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};
use tandem_shared::durable::fsync_dir;
use tandem_shared::ioerror::io_err;
use tandem_shared::logfile::PERSIST_RECORD_LEN;
use tandem_shared::wirepath;
use tandem_shared::LogPosition;

/// One round of `archive --follow`: extend the latest backup with the log
/// the standby received since, or start a new backup when there is none
/// or the standby's base changed.
pub fn follow_round(opts: &ArchiveOptions) -> Result<ArchiveReport, ArchiveError> {
    let report = follow_round_unregistered(opts)?;
    register_hold(
        &StandbyDir::new(&opts.dir),
        &opts.archive.display().to_string(),
        report.log_end,
    )?;
    Ok(report)
}

/// A round without telling the standby how far the archive reaches: for a
/// bucket, `opts.archive` is only the staging directory, and the hold moves
/// once the bucket confirmed the objects ([`super::remote`]).
pub(crate) fn follow_round_unregistered(
    opts: &ArchiveOptions,
) -> Result<ArchiveReport, ArchiveError> {
    create_archive_dir(opts)?;
    let _writer = lock_archive(&opts.archive, WRITER_LOCK, true, true)?;
    clean_temps(&opts.archive)?;
    let dir = StandbyDir::new(&opts.dir);
    let snap = take_snapshot(&dir)?;
    let latest = list_backups(&opts.archive)?.pop();
    let current = latest.and_then(|b| match read_manifest(&b.path) {
        Ok(m) => Some((b, m)),
        Err(e) => {
            tracing::warn!(error = %e, "the latest backup's manifest is unreadable: starting a new backup");
            None
        }
    });
    let report = match current {
        Some((b, m))
            if m.env_id == snap.env_id
                && m.base_id == snap.base.base_id
                && m.log_start == snap.base.log_start
                && m.log_end <= snap.durable =>
        {
            if m.log_end == snap.durable {
                report_from("unchanged", &b.path, &m)
            } else {
                match extend_backup(&dir, opts, &b, &m, false)? {
                    Some(r) => r,
                    None => new_backup(opts)?,
                }
            }
        }
        Some((b, m)) if m.env_id == snap.env_id => {
            // The standby moved to another base: first carry the previous
            // backup as far as the log goes, so point-in-time restore has
            // no gap between it and the new one.
            // A failed finish ends the round: the log held for it is
            // deleted only once a backup holds it (the next round tries
            // again; --archive-hold-cap-mib bounds what waits, loudly).
            if let Err(e) = extend_backup(&dir, opts, &b, &m, true) {
                tracing::error!(backup = %b.name, error = %e, "could not finish the previous backup with the log held for it; keeping that log and trying again next round");
                return Err(e);
            }
            new_backup(opts)?
        }
        _ => new_backup(opts)?,
    };
    if report.action != "unchanged" {
        record_report(opts, &report);
    }
    Ok(report)
}

/// Records how far the archive reaches, so the standby (and through its
/// Ack the primary) keeps the log after it; then drops held files the
/// archive no longer needs.
pub(crate) fn register_hold(
    dir: &StandbyDir,
    archive: &str,
    log_end: LogPosition,
) -> Result<(), ArchiveError> {
    let hold = crate::archive_hold::ArchiveHold {
        archive: archive.to_owned(),
        log_end,
        updated_unix_ms: tandem_shared::now_unix_ms(),
    };
    // An unchanged round rewrites (and fsyncs) nothing.
    if crate::archive_hold::load(dir)
        .is_none_or(|h| h.archive != hold.archive || h.log_end != log_end)
    {
        crate::archive_hold::store(dir, &hold)
            .map_err(io_err("recording the archive's position in .tandem"))?;
    }
    crate::archive_hold::delete_held(dir, log_end.file)
        .map_err(io_err("deleting log files held for the archive"))?;
    Ok(())
}

/// Builds the successor of backup `b` (its files hard-linked, the last log
/// file and newer ones copied) and swaps it in. Normally the log comes from
/// the mirror, up to its durable end, while the mirror still holds `b`'s
/// base. With `finish`, the mirror has moved to another base and the log
/// comes first from the files retired for the archive
/// ([`crate::archive_hold`]), as far as the record chain continues. `None`
/// when there is nothing to extend with, or the filesystem cannot swap
/// directories atomically: the caller then writes a new backup.
fn extend_backup(
    dir: &StandbyDir,
    opts: &ArchiveOptions,
    b: &BackupEntry,
    m: &Manifest,
    finish: bool,
) -> Result<Option<ArchiveReport>, ArchiveError> {
    let started = Instant::now();
    for attempt in 1..=COPY_ATTEMPTS {
        let snap = take_snapshot(dir)?;
        let source = log_source(dir, &snap.state, finish);
        let end = if finish {
            match scan_log_chain(&source, m.log_end.file, snap.durable.file, None, None, true) {
                Ok(reach) => reach.end.min(snap.durable),
                Err(e) => {
                    tracing::warn!(backup = %b.name, error = %e, "the log after this backup's end is no longer on the standby: it stays as it is");
                    return Ok(None);
                }
            }
        } else if snap.base.base_id != m.base_id {
            return Ok(None);
        } else {
            snap.durable
        };
        if end <= m.log_end {
            return Ok(None);
        }
        let temp = temp_dir_in(&opts.archive, "extend")?;
        let built = build_extension(&source, &snap, b, m, end, &temp);
        if !finish && !source_unchanged(dir, &snap)? {
            tracing::info!(
                attempt,
                "the standby's base changed during the copy; copying again"
            );
            remove_tree(&temp).map_err(io_err("removing a temporary directory"))?;
            continue;
        }
        let new_m = match built {
            Ok(new_m) => new_m,
            Err(e) => {
                let _ = remove_tree(&temp);
                return Err(e);
            }
        };
        let copy_seconds = started.elapsed().as_secs_f64();
        let swapped = {
            let _publish = lock_archive(&opts.archive, PUBLISH_LOCK, true, true)?;
            exchange_dirs(&temp, &b.path)
        };
        match swapped {
            Ok(()) => {
                fsync_dir(&opts.archive)
                    .map_err(io_err(format!("fsync of {}", opts.archive.display())))?;
                // `temp` now holds the previous version.
                remove_tree(&temp).map_err(io_err(format!("removing {}", temp.display())))?;
            }
            Err(e) if cannot_exchange(&e) => {
                tracing::warn!(error = %e, "this filesystem cannot swap directories atomically: writing a new backup instead of extending");
                let _ = remove_tree(&temp);
                return Ok(None);
            }
            Err(e) => {
                let _ = remove_tree(&temp);
                return Err(io_err(format!(
                    "swapping the extended backup into {}",
                    b.path.display()
                ))(e)
                .into());
            }
        }
        let mut report = report_from("extended", &b.path, &new_m);
        report.copy_seconds = copy_seconds;
        report.seconds = started.elapsed().as_secs_f64();
        tracing::info!(backup = %b.name, from = %m.log_end, to = %new_m.log_end, finished = finish, "backup extended");
        return Ok(Some(report));
    }
    Err(ArchiveError::SourceChanged {
        attempts: COPY_ATTEMPTS,
    })
}

fn build_extension(
    source: &dyn Fn(u32) -> PathBuf,
    snap: &Snapshot,
    b: &BackupEntry,
    m: &Manifest,
    end: LogPosition,
    temp: &Path,
) -> Result<Manifest, ArchiveError> {
    let old_last = m.log_end.file;
    let old_last_name = log_rel_name(&m.log_dir, old_last);
    let mut files = Vec::new();
    for f in &m.files {
        if f.name == old_last_name {
            continue;
        }
        let rel = wirepath::validate(&f.name)?;
        let to = temp.join(&rel);
        if let Some(parent) = to.parent() {
            fs::create_dir_all(parent).map_err(io_err(format!("creating {}", parent.display())))?;
        }
        fs::hard_link(b.path.join(&rel), &to).map_err(io_err(format!("linking {}", f.name)))?;
        files.push(f.clone());
    }
    files.extend(copy_logs(source, &m.log_dir, old_last, end, temp)?);
    // The mirror's copy of the old last file must start with exactly the
    // bytes the backup holds.
    let rel = wirepath::validate(&old_last_name)?;
    let limit = Some(u64::from(m.log_end.offset));
    let (_, ours) =
        hash_file(&b.path.join(&rel), limit).map_err(io_err(format!("reading {old_last_name}")))?;
    let (_, theirs) =
        hash_file(&temp.join(&rel), limit).map_err(io_err(format!("reading {old_last_name}")))?;
    if ours != theirs {
        return Err(ArchiveError::Refused(format!(
            "{old_last_name} in the standby no longer starts with the bytes backed up in {}: start a new backup",
            b.path.display()
        )));
    }
    let floor = Some(LogPosition::new(m.log_start.file, PERSIST_RECORD_LEN));
    let log_dir_old = b.path.join(&m.log_dir);
    let log_dir_new = temp.join(&m.log_dir);
    let before = scan_logs(
        &log_dir_old,
        old_last,
        old_last,
        Some(m.log_end.offset),
        floor,
    )?;
    let after = scan_logs(&log_dir_new, old_last, end.file, Some(end.offset), floor)?;
    files.sort_by(|a, b| a.name.cmp(&b.name));
    let mut new_m = Manifest {
        updated_unix_ms: tandem_shared::now_unix_ms(),
        log_end: end,
        commits: m.commits - before.commits.min(m.commits) + after.commits,
        first_commit_unix: m.first_commit_unix.or(after.first_commit_unix),
        last_commit_unix: match (m.last_commit_unix, after.last_commit_unix) {
            (Some(a), Some(b)) => Some(a.max(b)),
            (a, b) => a.or(b),
        },
        earliest_checkpoint_unix: m
            .earliest_checkpoint_unix
            .or(after.earliest_checkpoint_unix),
        epoch: snap.state.epoch.max(m.epoch),
        files,
        // Kept: it speaks for the shorter log only (its `log_end`), so a
        // restore relies on it only for the databases the longer log does
        // not touch (`selective`).
        proven: m.proven.clone(),
        ..m.clone()
    };
    new_m.seal();
    write_manifest_and_sync(temp, &new_m)?;
    Ok(new_m)
}

/// `archive --follow`: a round every `every` until `stop` is set. Each
/// round's outcome goes to `report`; a failed round is retried next time.
pub fn follow(
    opts: &ArchiveOptions,
    every: Duration,
    stop: &AtomicBool,
    mut report: impl FnMut(&Result<ArchiveReport, ArchiveError>),
) {
    // Drills and proofs of a killed archiver left their scratch behind.
    super::proof::sweep_dead_scratch(opts.scratch.as_deref());
    while !stop.load(Ordering::SeqCst) {
        let started = Instant::now();
        let result = follow_round(opts);
        if let Err(e) = &result {
            tracing::error!(error = %e, "archive round failed; retrying next round");
        }
        report(&result);
        if let (Ok(r), Some(every)) = (&result, opts.drill_every) {
            let dir = StandbyDir::new(&opts.dir);
            if super::drill::due(&dir, every.as_millis() as u64, tandem_shared::now_unix_ms()) {
                let v = super::verify::verify_backup(Path::new(&r.backup), opts.scratch.as_deref());
                super::drill::record(&dir, &v);
            }
        }
        let next = started + every;
        while !stop.load(Ordering::SeqCst) {
            let now = Instant::now();
            if now >= next {
                break;
            }
            std::thread::sleep((next - now).min(Duration::from_millis(100)));
        }
    }
}
