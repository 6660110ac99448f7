//! Scrub unit tests on synthetic mirrors: database files with recorded
//! digests and BDB-format logs (`logfile::synth`); the real-BDB attacks are
//! in `tests/tests/scrub.rs`.

use super::*;
use crate::state::StandbyState;
use tandem_shared::logfile::synth;

struct Fixture {
    _t: tempfile::TempDir,
    dir: StandbyDir,
    /// The end of the log's records (the durable end).
    end: LogPosition,
}

/// A mirror with one 3-page file and two log files of 20 records each.
fn mirror() -> Fixture {
    let t = tempfile::tempdir().unwrap();
    let dir = StandbyDir::new(t.path());
    dir.create().unwrap();
    std::fs::write(dir.root.join("a.db"), vec![9u8; 3 * 4096]).unwrap();
    digests::record_file(&dir, "b1", "a.db", &dir.root.join("a.db")).unwrap();
    let body = [5u8; 100];
    let bodies: Vec<&[u8]> = (0..20).map(|_| &body[..]).collect();
    let one = synth::file(0, 1 << 16, &bodies, 1 << 16);
    let w1 = walk(&one, 0, None);
    let two = synth::file(w1.last_record.unwrap(), 1 << 16, &bodies, 1 << 16);
    let w2 = walk(&two, 0, w1.last_record);
    std::fs::write(dir.root.join(logfile::log_file_name(1)), &one).unwrap();
    std::fs::write(dir.root.join(logfile::log_file_name(2)), &two).unwrap();
    let state = StandbyState {
        env_id: Some("e".into()),
        base: Some(BaseState {
            base_id: "b1".into(),
            log_start: LogPosition::new(1, 0),
            complete_files: ["a.db".to_owned()].into(),
            files_done: true,
            consistent_at: Some(LogPosition::new(1, 100)),
            started_unix_ms: 0,
        }),
        ..Default::default()
    };
    dir.store_state(&state).unwrap();
    Fixture {
        _t: t,
        dir,
        end: LogPosition::new(2, w2.end),
    }
}

fn flip(path: &std::path::Path, at: u64) {
    let mut b = std::fs::read(path).unwrap();
    b[at as usize] ^= 0x04;
    std::fs::write(path, b).unwrap();
}

fn scrub(f: &Fixture, durable: bool) -> ScrubReport {
    let opts = ScrubOptions {
        durable: durable.then(|| ("b1".to_owned(), f.end)),
        bytes_per_sec: None,
        stop: None,
    };
    scrub_once(&f.dir, &opts).unwrap()
}

#[test]
fn an_intact_mirror_passes() {
    let f = mirror();
    let r = scrub(&f, true);
    assert!(r.ok, "{r:?}");
    assert_eq!((r.database_files, r.pages, r.log_files), (1, 3, 2));
    assert_eq!(r.log_verified_to, f.end);
    assert_eq!(last_report(&f.dir), Some(r));
}

#[test]
fn a_flipped_page_is_named_and_counted_until_a_scrub_passes() {
    let f = mirror();
    flip(&f.dir.root.join("a.db"), 4096 + 77);
    let r = scrub(&f, true);
    assert!(!r.ok);
    assert_eq!(
        r.damage,
        vec![Damage::Page {
            file: "a.db".into(),
            page: 1
        }]
    );
    assert_eq!(r.failures_total, 1);
    assert!(r.summary().contains("a.db page 1"), "{}", r.summary());
    flip(&f.dir.root.join("a.db"), 4096 + 77);
    let again = scrub(&f, true);
    assert!(again.ok);
    assert_eq!(again.failures_total, 1, "the count of failed scrubs stays");
}

#[test]
fn a_flipped_byte_in_an_earlier_log_file_breaks_the_chain() {
    let f = mirror();
    // Record 3 of log 1: the walk of log 1 stops there, before the record
    // that log 2's first record points at.
    flip(
        &f.dir.root.join(logfile::log_file_name(1)),
        28 + 2 * 112 + 50,
    );
    let r = scrub(&f, false);
    assert!(!r.ok);
    assert!(
        matches!(&r.damage[..], [Damage::Log { file, at, .. }] if file == "log.0000000001" && *at == LogPosition::new(1, 28 + 2 * 112)),
        "{:?}",
        r.damage
    );
    assert!(r.damage[0].in_log());
}

#[test]
fn a_flipped_byte_in_the_last_log_file_is_found_only_below_the_durable_end() {
    let f = mirror();
    flip(
        &f.dir.root.join(logfile::log_file_name(2)),
        28 + 15 * 112 + 20,
    );
    // Without the durable end a cut chain looks like the end of the log.
    assert!(scrub(&f, false).ok);
    let r = scrub(&f, true);
    assert!(!r.ok);
    assert!(
        matches!(&r.damage[..], [Damage::Log { at, .. }] if *at == LogPosition::new(2, 28 + 15 * 112)),
        "{:?}",
        r.damage
    );
}

#[test]
fn a_missing_log_file_and_a_missing_record_are_damage() {
    let f = mirror();
    std::fs::remove_file(f.dir.root.join(logfile::log_file_name(2))).unwrap();
    let r = scrub(&f, true);
    assert!(
        matches!(&r.damage[..], [Damage::Log { file, .. }] if file == "log.0000000002"),
        "{:?}",
        r.damage
    );
}

#[test]
fn a_file_without_digests_is_recorded_then_checked() {
    let f = mirror();
    std::fs::remove_dir_all(f.dir.meta().join("pages")).unwrap();
    let r = scrub(&f, true);
    assert!(r.ok);
    assert_eq!(r.recorded_now, vec!["a.db".to_owned()]);
    flip(&f.dir.root.join("a.db"), 5);
    assert!(!scrub(&f, true).ok);
}

#[test]
fn a_durable_end_of_another_base_is_ignored() {
    let f = mirror();
    let opts = ScrubOptions {
        durable: Some(("old".into(), LogPosition::new(9, 100))),
        bytes_per_sec: None,
        stop: None,
    };
    assert!(scrub_once(&f.dir, &opts).unwrap().ok);
}

#[test]
fn a_stopped_scrub_is_discarded_and_records_nothing() {
    let f = mirror();
    let opts = ScrubOptions {
        durable: Some(("b1".into(), f.end)),
        bytes_per_sec: Some(1),
        stop: Some(Arc::new(AtomicBool::new(true))),
    };
    let started = Instant::now();
    assert!(scrub_once(&f.dir, &opts).is_none());
    assert!(
        started.elapsed() < Duration::from_secs(5),
        "a stop ends the paced wait"
    );
    assert!(last_report(&f.dir).is_none());
}

#[test]
fn a_scrub_started_during_a_swap_is_discarded() {
    let f = mirror();
    let mut state = f.dir.load_state().unwrap();
    state.pending_swap = state.base.clone();
    f.dir.store_state(&state).unwrap();
    assert!(scrub_once(&f.dir, &ScrubOptions::default()).is_none());
}

#[test]
fn a_flipped_byte_after_the_last_record_of_an_earlier_log_file_is_damage() {
    let f = mirror();
    let path = f.dir.root.join(logfile::log_file_name(1));
    let end = walk(&std::fs::read(&path).unwrap(), 0, None).end;
    flip(&path, u64::from(end) + 3000);
    let r = scrub(&f, true);
    assert!(
        matches!(&r.damage[..], [Damage::Log { at, .. }] if *at == LogPosition::new(1, end + 3000)),
        "{:?}",
        r.damage
    );
}
