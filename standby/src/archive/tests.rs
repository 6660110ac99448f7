//! Unit tests of [`crate::archive`] on synthetic standby directories: log
//! files built record by record with BDB's layout and checksum (no libdb),
//! database files that are just bytes. The recovery proof needs real BDB
//! and is covered by `tests/tests/archive.rs`.

use super::build::*;
use super::follow::*;
use super::logscan::*;
use super::manifest::*;
use super::store::*;
use super::time::parse_backup_name;
use crate::state::{BaseState, StandbyDir, StandbyState};
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use tandem_shared::logfile::{synth, walk};
use tandem_shared::LogPosition;

const LG_MAX: u32 = 64 * 1024;

fn regop(ts: i64) -> Vec<u8> {
    words(&[
        REC_TXN_REGOP,
        0x8000_0001,
        0,
        0,
        TXN_COMMIT,
        ts as u32,
        7,
        0,
    ])
}

fn ckp(file: u32, offset: u32, ts: i64) -> Vec<u8> {
    words(&[REC_TXN_CKP, 0, 0, 0, file, offset, 0, 0, ts as u32, 7, 0])
}

fn other() -> Vec<u8> {
    let mut w = words(&[5, 0x8000_0001, 0, 0]);
    w.extend_from_slice(&[0xab; 40]);
    w
}

fn words(w: &[u32]) -> Vec<u8> {
    w.iter().flat_map(|v| v.to_le_bytes()).collect()
}

/// A log file image and the offset of its last record.
fn log_image(prev_of_first: u32, bodies: &[Vec<u8>]) -> (Vec<u8>, u32, u32) {
    let refs: Vec<&[u8]> = bodies.iter().map(Vec::as_slice).collect();
    let img = synth::file(prev_of_first, LG_MAX, &refs, LG_MAX as usize - 1);
    let w = walk(&img, 0, Some(prev_of_first));
    (img, w.last_record.unwrap_or(0), w.end)
}

/// A recoverable synthetic standby: base files a.db, sub/b.db and
/// DB_CONFIG; log.3 (a checkpoint, commits at 100 and 101) and log.4
/// (commits at 102, 103), followed by a torn record that is not part of the
/// verified log.
struct Fixture {
    _tmp: tempfile::TempDir,
    dir: StandbyDir,
    archive: PathBuf,
    /// Offset of log.4's last record and the end of its records.
    last4: u32,
    end4: u32,
}

fn fixture() -> Fixture {
    let tmp = tempfile::tempdir().unwrap();
    let root = tmp.path().join("standby");
    let dir = StandbyDir::new(&root);
    dir.create().unwrap();
    std::fs::write(root.join("a.db"), vec![0x11u8; 8192]).unwrap();
    std::fs::create_dir(root.join("sub")).unwrap();
    std::fs::write(root.join("sub/b.db"), vec![0x22u8; 4096]).unwrap();
    std::fs::write(root.join("DB_CONFIG"), b"set_data_dir sub\n").unwrap();
    let (log3, last3, _) = log_image(
        0,
        &[other(), ckp(3, 28, 100), regop(100), other(), regop(101)],
    );
    std::fs::write(root.join("log.0000000003"), &log3).unwrap();
    let (mut log4, last4, end4) = log_image(last3, &[other(), regop(102), other(), regop(103)]);
    // A record being written: a header whose body is not there yet.
    log4[end4 as usize..end4 as usize + 12].copy_from_slice(&words(&[last4, 200, 12345]));
    log4[end4 as usize + 12..end4 as usize + 40].fill(0x5a);
    std::fs::write(root.join("log.0000000004"), &log4).unwrap();
    let base = BaseState {
        base_id: "b0123456789abcdef".into(),
        log_start: LogPosition::new(3, 0),
        complete_files: ["a.db", "sub/b.db", "DB_CONFIG"]
            .iter()
            .map(|s| s.to_string())
            .collect(),
        files_done: true,
        consistent_at: Some(LogPosition::new(3, 28)),
        started_unix_ms: 1,
    };
    let state = StandbyState {
        env_id: Some("env-1".into()),
        epoch: 1,
        log_dir: String::new(),
        base: Some(base),
        ..Default::default()
    };
    dir.store_state(&state).unwrap();
    let archive = tmp.path().join("archive");
    Fixture {
        _tmp: tmp,
        dir,
        archive,
        last4,
        end4,
    }
}

fn opts(f: &Fixture) -> ArchiveOptions {
    ArchiveOptions {
        dir: f.dir.root.clone(),
        archive: f.archive.clone(),
        keep: 7,
        keep_days: None,
        verify: false,
        scratch: None,
        drill_every: None,
    }
}

/// Every file under `dir` except Tandem's reports, with its blake3.
fn snapshot(dir: &Path) -> BTreeMap<String, String> {
    list_files(dir)
        .unwrap()
        .into_iter()
        .filter(|n| n != ".tandem/archive.json")
        .map(|n| {
            let h = blake3::hash(&std::fs::read(dir.join(&n)).unwrap())
                .to_hex()
                .to_string();
            (n, h)
        })
        .collect()
}

#[test]
fn archive_copies_the_mirror_up_to_its_verified_end_and_describes_it() {
    let f = fixture();
    let before = snapshot(&f.dir.root);
    let r = archive_once(&opts(&f)).unwrap();
    assert_eq!(r.action, "created");
    assert_eq!(
        snapshot(&f.dir.root),
        before,
        "archiving changed the mirror"
    );
    let backup = PathBuf::from(&r.backup);
    assert_eq!(backup.parent(), Some(f.archive.as_path()));
    assert!(parse_backup_name(backup.file_name().unwrap().to_str().unwrap()).is_some());
    let m = read_manifest(&backup).unwrap();
    let names: Vec<(&str, FileKind)> = m.files.iter().map(|x| (x.name.as_str(), x.kind)).collect();
    assert_eq!(
        names,
        vec![
            ("DB_CONFIG", FileKind::Config),
            ("a.db", FileKind::Database),
            ("log.0000000003", FileKind::Log),
            ("log.0000000004", FileKind::Log),
            ("sub/b.db", FileKind::Database)
        ]
    );
    assert_eq!(
        (m.env_id.as_str(), m.base_id.as_str(), m.epoch),
        ("env-1", "b0123456789abcdef", 1)
    );
    assert_eq!(
        (m.log_start, m.log_end),
        (LogPosition::new(3, 0), LogPosition::new(4, f.end4))
    );
    assert_eq!(
        (
            m.commits,
            m.first_commit_unix,
            m.last_commit_unix,
            m.earliest_checkpoint_unix
        ),
        (4, Some(100), Some(103), Some(100))
    );
    assert_eq!(m.lg_max, LG_MAX);
    // The last log file: the verified records, then zeros to the mirror's size.
    let ours = std::fs::read(backup.join("log.0000000004")).unwrap();
    let theirs = std::fs::read(f.dir.root.join("log.0000000004")).unwrap();
    assert_eq!(ours.len(), theirs.len());
    assert_eq!(ours[..f.end4 as usize], theirs[..f.end4 as usize]);
    assert!(
        ours[f.end4 as usize..].iter().all(|b| *b == 0),
        "the torn record was archived"
    );
    assert_eq!(
        std::fs::read(backup.join("sub/b.db")).unwrap(),
        vec![0x22u8; 4096]
    );
    let (problems, bytes) = check_files(&backup, &m).unwrap();
    assert!(problems.is_empty(), "{problems:?}");
    assert_eq!(bytes, m.files.iter().map(|x| x.size).sum::<u64>());
    // The report is recorded for operators; nothing else in the standby.
    let recorded: ArchiveReport =
        serde_json::from_slice(&std::fs::read(f.dir.meta().join(REPORT_FILE)).unwrap()).unwrap();
    assert_eq!(recorded.backup, r.backup);
    // No temp directories left behind.
    let leftovers: Vec<_> = std::fs::read_dir(&f.archive)
        .unwrap()
        .flatten()
        .filter(|e| e.file_name().to_string_lossy().starts_with(TEMP_PREFIX))
        .collect();
    assert!(leftovers.is_empty());
}

#[test]
fn every_damaged_file_is_named() {
    let f = fixture();
    let backup = PathBuf::from(archive_once(&opts(&f)).unwrap().backup);
    let m = read_manifest(&backup).unwrap();
    let mut bytes = std::fs::read(backup.join("a.db")).unwrap();
    bytes[100] ^= 1;
    std::fs::write(backup.join("a.db"), &bytes).unwrap();
    std::fs::remove_file(backup.join("log.0000000003")).unwrap();
    std::fs::write(backup.join("notes.txt"), b"x").unwrap();
    let b = std::fs::read(backup.join("sub/b.db")).unwrap();
    std::fs::write(backup.join("sub/b.db"), &b[..100]).unwrap();
    let (problems, _) = check_files(&backup, &m).unwrap();
    let text: Vec<String> = problems.iter().map(|p| p.to_string()).collect();
    assert_eq!(problems.len(), 4, "{text:?}");
    assert!(
        matches!(&problems[0], Problem::Altered { file, .. } if file == "a.db"),
        "{text:?}"
    );
    assert!(
        matches!(&problems[1], Problem::Missing { file } if file == "log.0000000003"),
        "{text:?}"
    );
    assert!(
        matches!(&problems[2], Problem::Size { file, expected: 4096, found: 100 } if file == "sub/b.db"),
        "{text:?}"
    );
    assert!(
        matches!(&problems[3], Problem::Extra { file } if file == "notes.txt"),
        "{text:?}"
    );
}

#[test]
fn a_tampered_manifest_is_refused() {
    let f = fixture();
    let backup = PathBuf::from(archive_once(&opts(&f)).unwrap().backup);
    let path = backup.join(MANIFEST_FILE);
    let good = std::fs::read_to_string(&path).unwrap();
    // A changed field: the digest no longer matches.
    std::fs::write(&path, good.replace("\"commits\": 4", "\"commits\": 5")).unwrap();
    let e = read_manifest(&backup).unwrap_err().to_string();
    assert!(
        e.contains("digest mismatch") && e.contains(MANIFEST_FILE),
        "{e}"
    );
    // Garbage.
    std::fs::write(&path, &good[..good.len() / 2]).unwrap();
    assert!(read_manifest(&backup)
        .unwrap_err()
        .to_string()
        .contains("not a readable manifest"));
    // A resealed manifest that points outside the backup.
    let mut m: Manifest = serde_json::from_str(&good).unwrap();
    m.files[1].name = "../../etc/passwd".into();
    m.seal();
    std::fs::write(&path, m.to_bytes()).unwrap();
    assert!(read_manifest(&backup)
        .unwrap_err()
        .to_string()
        .contains("refused file name"));
    // A resealed manifest that drops a log file of its range.
    let mut m: Manifest = serde_json::from_str(&good).unwrap();
    m.files.retain(|x| x.name != "log.0000000003");
    m.seal();
    std::fs::write(&path, m.to_bytes()).unwrap();
    assert!(read_manifest(&backup)
        .unwrap_err()
        .to_string()
        .contains("needs log.0000000003"));
    // Unknown fields are refused, not ignored.
    std::fs::write(&path, good.replacen("{", "{\n  \"extra\": 1,", 1)).unwrap();
    assert!(read_manifest(&backup).is_err());
}

#[test]
fn the_log_chain_is_checked_across_files() {
    let f = fixture();
    let backup = PathBuf::from(archive_once(&opts(&f)).unwrap().backup);
    assert!(scan_logs(&backup, 3, 4, Some(f.end4), None).is_ok());
    let e = scan_logs(&backup, 3, 4, Some(f.end4 - 1), None)
        .unwrap_err()
        .to_string();
    assert!(
        e.contains("log.0000000004") && e.contains("expected"),
        "{e}"
    );
    // log.4 rebuilt so it does not continue log.3.
    let (img, _, _) = log_image(12, &[other(), regop(102)]);
    std::fs::write(backup.join("log.0000000004"), &img).unwrap();
    let e = scan_logs(&backup, 3, 4, None, None)
        .unwrap_err()
        .to_string();
    assert!(
        e.contains("log.0000000004: does not continue log.0000000003"),
        "{e}"
    );
}

#[test]
fn checkpoints_before_the_first_record_do_not_count_for_bdbs_earliest_time() {
    let tmp = tempfile::tempdir().unwrap();
    // A checkpoint whose ckp_lsn lies in an earlier file, then one in this file.
    let (img, _, _) = log_image(0, &[ckp(4, 900, 50), regop(60), ckp(5, 28, 70), regop(80)]);
    std::fs::write(tmp.path().join("log.0000000005"), &img).unwrap();
    let s = scan_logs(tmp.path(), 5, 5, None, None).unwrap();
    assert_eq!(
        (
            s.first_commit_unix,
            s.last_commit_unix,
            s.earliest_checkpoint_unix,
            s.commits
        ),
        (Some(60), Some(80), Some(70), 2)
    );
    assert_eq!(
        window_start(s.first_commit_unix, s.earliest_checkpoint_unix),
        Some(70)
    );
}

#[test]
fn retention_deletes_beyond_keep_and_by_age_but_never_the_newest() {
    let day = 86_400_000u64;
    let b: Vec<(String, u64)> = (0..5).map(|i| (format!("b{i}"), i * day)).collect();
    let now = 5 * day;
    assert_eq!(select_expired(&b, 2, None, now), vec!["b0", "b1", "b2"]);
    assert_eq!(select_expired(&b, 7, None, now), Vec::<String>::new());
    assert_eq!(
        select_expired(&b, 7, Some(2.5), now),
        vec!["b0", "b1", "b2"]
    );
    // Everything is old: the newest stays anyway.
    assert_eq!(
        select_expired(&b, 7, Some(0.1), 100 * day),
        vec!["b0", "b1", "b2", "b3"]
    );
    assert_eq!(
        select_expired(&b, 0, None, now),
        vec!["b0", "b1", "b2", "b3"]
    );
    assert!(select_expired(&[], 1, Some(0.0), now).is_empty());

    let f = fixture();
    let o = ArchiveOptions {
        keep: 2,
        ..opts(&f)
    };
    let mut made = Vec::new();
    for _ in 0..3 {
        let r = archive_once(&o).unwrap();
        made.push(r.backup.clone());
        if made.len() == 3 {
            assert_eq!(r.removed.len(), 1, "{r:?}");
        }
    }
    let left: Vec<String> = list_backups(&f.archive)
        .unwrap()
        .into_iter()
        .map(|b| b.path.display().to_string())
        .collect();
    assert_eq!(left, made[1..].to_vec());
}

#[test]
fn follow_extends_the_latest_backup_then_starts_a_new_one_on_a_new_base() {
    let f = fixture();
    let first = archive_once(&opts(&f)).unwrap();
    let backup = PathBuf::from(&first.backup);
    assert_eq!(follow_round(&opts(&f)).unwrap().action, "unchanged");

    // The standby receives more: log.4 grows, log.5 appears.
    let log4 = f.dir.root.join("log.0000000004");
    let mut img = std::fs::read(&log4).unwrap();
    let mut at = f.end4 as usize;
    let mut prev = f.last4;
    for body in [regop(104), other()] {
        let rec = synth::record(prev, &body);
        img[at..at + rec.len()].copy_from_slice(&rec);
        prev = at as u32;
        at += rec.len();
    }
    img[at..].fill(0);
    std::fs::write(&log4, &img).unwrap();
    let (log5, _, end5) = log_image(prev, &[regop(105), ckp(4, 28, 105)]);
    std::fs::write(f.dir.root.join("log.0000000005"), &log5).unwrap();

    let r = follow_round(&opts(&f)).unwrap();
    assert_eq!(r.action, "extended");
    assert_eq!(r.backup, first.backup, "the same backup grows");
    let m = read_manifest(&backup).unwrap();
    assert_eq!(m.log_end, LogPosition::new(5, end5));
    assert_eq!(
        (m.commits, m.first_commit_unix, m.last_commit_unix),
        (6, Some(100), Some(105))
    );
    assert!(m.updated_unix_ms >= m.created_unix_ms);
    let (problems, _) = check_files(&backup, &m).unwrap();
    assert!(problems.is_empty(), "{problems:?}");
    scan_logs(&backup, 3, 5, Some(end5), None).unwrap();
    assert_eq!(list_backups(&f.archive).unwrap().len(), 1);
    assert_eq!(follow_round(&opts(&f)).unwrap().action, "unchanged");

    // A new base on the standby: a new backup, the old one kept.
    let mut state = f.dir.load_state().unwrap();
    state.base.as_mut().unwrap().base_id = "c999".into();
    f.dir.store_state(&state).unwrap();
    let r = follow_round(&opts(&f)).unwrap();
    assert_eq!(r.action, "created");
    assert_ne!(r.backup, first.backup);
    assert_eq!(read_manifest(Path::new(&r.backup)).unwrap().base_id, "c999");
    assert_eq!(list_backups(&f.archive).unwrap().len(), 2);
}

#[test]
fn held_log_stays_until_a_failed_finish_of_the_previous_backup_succeeds() {
    let f = fixture();
    let first = follow_round(&opts(&f)).unwrap();
    let backup = PathBuf::from(&first.backup);
    // More log arrives (log.5), then a rebase retires logs 3 and 4: the
    // archive lacks what log.4 gained since, so they are held for it.
    let log4 = f.dir.root.join("log.0000000004");
    let mut img = std::fs::read(&log4).unwrap();
    let rec = synth::record(f.last4, &regop(104));
    let at = f.end4 as usize;
    img[at..at + rec.len()].copy_from_slice(&rec);
    img[at + rec.len()..].fill(0);
    std::fs::write(&log4, &img).unwrap();
    let (log5, _, _) = log_image(at as u32, &[regop(105), ckp(5, 28, 105)]);
    std::fs::write(f.dir.root.join("log.0000000005"), &log5).unwrap();
    crate::archive_hold::retire_logs(&f.dir, &f.dir.root, 5, u64::MAX).unwrap();
    let mut state = f.dir.load_state().unwrap();
    let base = state.base.as_mut().unwrap();
    base.base_id = "c999".into();
    base.log_start = LogPosition::new(5, 0);
    base.consistent_at = Some(LogPosition::new(5, 28));
    f.dir.store_state(&state).unwrap();
    let held = crate::archive_hold::held_files(&f.dir);
    assert!(!held.is_empty(), "logs must be held for the archive");

    // Finishing the previous backup fails (one of its files is gone):
    // the round fails and the held log stays.
    let gone = backup.join("a.db");
    let saved = std::fs::read(&gone).unwrap();
    std::fs::remove_file(&gone).unwrap();
    assert!(follow_round(&opts(&f)).is_err());
    assert_eq!(crate::archive_hold::held_files(&f.dir), held);
    assert_eq!(
        list_backups(&f.archive).unwrap().len(),
        1,
        "no new backup before the finish"
    );

    // Repaired: the previous backup is finished, then a new one starts,
    // and only then is the held log deleted.
    std::fs::write(&gone, saved).unwrap();
    let r = follow_round(&opts(&f)).unwrap();
    assert_eq!(r.action, "created");
    assert!(read_manifest(&backup).unwrap().log_end.file >= 4);
    assert!(crate::archive_hold::held_files(&f.dir).is_empty());
}

#[test]
fn follow_refuses_a_mirror_that_no_longer_matches_the_backup() {
    let f = fixture();
    archive_once(&opts(&f)).unwrap();
    // Same records count and layout, different bytes before the old end.
    let log4 = f.dir.root.join("log.0000000004");
    let prev3 = walk(
        &std::fs::read(f.dir.root.join("log.0000000003")).unwrap(),
        0,
        None,
    )
    .last_record
    .unwrap();
    let mut bodies = vec![other(), regop(102), other(), regop(999), regop(104)];
    bodies[0][20] ^= 0xff;
    let (img, _, _) = log_image(prev3, &bodies);
    std::fs::write(&log4, &img).unwrap();
    let e = follow_round(&opts(&f)).unwrap_err().to_string();
    assert!(
        e.contains("no longer starts with the bytes backed up"),
        "{e}"
    );
    let leftovers: Vec<_> = std::fs::read_dir(&f.archive)
        .unwrap()
        .flatten()
        .filter(|e| e.file_name().to_string_lossy().starts_with(TEMP_PREFIX))
        .collect();
    assert!(leftovers.is_empty());
}

#[test]
fn refuses_promoted_and_unrecoverable_standbys_and_plain_directories() {
    let f = fixture();
    let mut state = f.dir.load_state().unwrap();
    state.base.as_mut().unwrap().files_done = false;
    f.dir.store_state(&state).unwrap();
    assert!(matches!(
        archive_once(&opts(&f)),
        Err(ArchiveError::NotRecoverable(_))
    ));
    state.base.as_mut().unwrap().files_done = true;
    state.promoted = Some(crate::state::Promotion {
        epoch: 2,
        unix_ms: 1,
        kind: "failover".into(),
        recovered_to: None,
    });
    f.dir.store_state(&state).unwrap();
    assert!(matches!(
        archive_once(&opts(&f)),
        Err(ArchiveError::Promoted(_))
    ));
    state.promoted = None;
    state.pending_swap = state.base.clone();
    f.dir.store_state(&state).unwrap();
    let e = archive_once(&opts(&f)).unwrap_err().to_string();
    assert!(e.contains("rebase is being swapped in"), "{e}");
    state.pending_swap = None;
    f.dir.store_state(&state).unwrap();
    let inside = ArchiveOptions {
        archive: f.dir.root.join("backups"),
        ..opts(&f)
    };
    let e = archive_once(&inside).unwrap_err().to_string();
    assert!(e.contains("inside the standby directory"), "{e}");
    let plain = f.archive.with_file_name("plain");
    std::fs::create_dir_all(&plain).unwrap();
    assert!(matches!(
        archive_once(&ArchiveOptions {
            dir: plain,
            ..opts(&f)
        }),
        Err(ArchiveError::NotAStandby(_))
    ));
    assert!(
        list_backups(&f.archive).unwrap().is_empty(),
        "nothing may be published"
    );
}

#[test]
fn an_interrupted_archiver_leaves_nothing_that_counts() {
    let f = fixture();
    std::fs::create_dir_all(f.archive.join(format!("{TEMP_PREFIX}new-1-2-0/sub"))).unwrap();
    std::fs::write(
        f.archive.join(format!("{TEMP_PREFIX}new-1-2-0/sub/x")),
        b"half",
    )
    .unwrap();
    assert!(list_backups(&f.archive).unwrap().is_empty());
    archive_once(&opts(&f)).unwrap();
    let names: Vec<String> = std::fs::read_dir(&f.archive)
        .unwrap()
        .flatten()
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .collect();
    assert!(
        !names.iter().any(|n| n.starts_with(TEMP_PREFIX)),
        "{names:?}"
    );
}

#[test]
fn copies_hash_what_they_write_including_the_zero_tail() {
    let tmp = tempfile::tempdir().unwrap();
    let src = tmp.path().join("src");
    std::fs::write(
        &src,
        (0..10_000u32)
            .map(|i| (i % 251) as u8 + 1)
            .collect::<Vec<_>>(),
    )
    .unwrap();
    let (size, hash) = copy_hashed(&src, &tmp.path().join("d/cut"), Some(1000), true).unwrap();
    let written = std::fs::read(tmp.path().join("d/cut")).unwrap();
    assert_eq!(size, 10_000);
    assert_eq!(written.len(), 10_000);
    assert!(written[1000..].iter().all(|b| *b == 0));
    assert_eq!(hash, blake3::hash(&written));
    assert_eq!(
        hash_file(&tmp.path().join("d/cut"), None).unwrap(),
        (10_000, hash)
    );
    assert!(
        copy_hashed(&src, &tmp.path().join("d/cut"), None, true).is_err(),
        "never overwrites"
    );
}
