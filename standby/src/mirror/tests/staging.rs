//! The standby never loses what it holds: a new base that does not
//! continue it is refused with the directory unchanged; one it may take is
//! staged beside it and swapped in only when complete; every step of a swap
//! that fails is finished from disk; at open the log chain is verified
//! across files. Uses the fixtures of `mirror::tests` (`tests/mod.rs`).

use super::*;

fn rebase_start(id: &str, file: u32) -> Kind {
    Kind::BaseStart(BaseStart {
        base_id: id.into(),
        log_start: Some(LogPosition::new(file, 0).into()),
        reason: "test".into(),
        rebase: true,
        ..Default::default()
    })
}

/// A standby holding a complete base (data.db, gone.db, DB_CONFIG) and a
/// durable log in files 1 and 2.
fn holding() -> Fx {
    let mut fx = populated();
    fx.ship("gone.db", FileKind::Database, &db_bytes(8192, 9));
    let prev = fx.m.tail().last_record.expect("log");
    let (img, _) = log_file(prev, 100, 5);
    fx.ok(log_chunk(2, 0, &img));
    fx.m.sync().expect("sync");
    assert_eq!(fx.m.tail().durable, LogPosition::new(2, img.len() as u32));
    fx
}

/// Everything under the standby directory but `.tandem` (what BDB sees).
fn env_tree(fx: &Fx) -> BTreeMap<String, String> {
    tree(&fx.root())
        .into_iter()
        .filter(|(k, _)| !k.starts_with(".tandem"))
        .collect()
}

/// The database files of the base sent by `send_new_files`.
fn new_files() -> Vec<(&'static str, Vec<u8>)> {
    vec![
        ("data.db", db_bytes(16384, 50)),
        ("new.db", db_bytes(4096, 51)),
        (DB_CONFIG, b"set_lg_max 1048576\n".to_vec()),
    ]
}

fn send_new_files(fx: &mut Fx) {
    for (name, data) in new_files() {
        let kind = if name == DB_CONFIG {
            FileKind::Config
        } else {
            FileKind::Database
        };
        fx.ship(name, kind, &data);
    }
}

/// Sends a replacement base starting at log file `file` (its own history:
/// different records), all of it. Returns the end of its log.
fn send_replacement(fx: &mut Fx, id: &str, file: u32) -> LogPosition {
    fx.ok(base_start(id, file, 0));
    send_new_files(fx);
    let (img, _) = log_file(0, 500, 4);
    fx.ok(log_chunk(file, 0, &img));
    let end = LogPosition::new(file, img.len() as u32);
    fx.ok(files_done(file, end.offset));
    end
}

/// Sends a rebase from log file 2 (the standby's log goes on).
fn send_rebase(fx: &mut Fx, id: &str) -> LogPosition {
    fx.ok(rebase_start(id, 2));
    send_new_files(fx);
    let end = fx.m.tail().durable;
    fx.ok(files_done(end.file, end.offset));
    end
}

fn log_numbers_of(fx: &Fx) -> Vec<u32> {
    crate::mirror::logwriter::log_numbers(&fx.m.dir.log_dir(&fx.m.state)).expect("ls")
}

/// The directory holds exactly the new base: its files, not the old base's
/// others, its logs only, no staging area, and the mirror (and a fresh open)
/// agree it is recoverable up to `end`.
#[track_caller]
fn assert_new_base(fx: &mut Fx, id: &str, logs: &[u32], end: LogPosition) {
    for (name, data) in new_files() {
        assert_eq!(
            std::fs::read(fx.root().join(name)).expect(name),
            data,
            "{name} is not the new base's"
        );
    }
    assert!(
        !fx.root().join("gone.db").exists(),
        "the old base's gone.db is left"
    );
    assert_eq!(log_numbers_of(fx), logs, "log files");
    assert!(!fx.m.dir.rebase_dir().exists(), "staging area left");
    let base = fx.m.state.base.clone().expect("base");
    assert_eq!(base.base_id, id);
    assert!(fx.m.state.pending_swap.is_none());
    assert!(fx.m.recoverable());
    assert_eq!(fx.m.tail().durable, end);
    fx.reopen().expect("reopen");
    assert_eq!(
        fx.m.state.base.as_ref().map(|b| b.base_id.as_str()),
        Some(id)
    );
    assert_eq!(fx.m.tail().durable, end);
    assert!(fx.m.recoverable());
}

#[test]
fn a_new_base_that_does_not_continue_the_standby_is_refused_and_changes_nothing() {
    let mut fx = holding();
    let end = fx.m.tail().durable;
    // From the start of what it holds (a rolled-back primary), and from the
    // file holding its end (a primary that lost its unsynced tail).
    for file in [1, 2] {
        let err = fx.refuse(base_start("base-2", file, 0));
        match &err {
            ApplyError::Diverged {
                primary_start,
                standby_end,
                beyond_bytes,
                holds,
            } => {
                assert_eq!(*primary_start, LogPosition::new(file, 0));
                assert_eq!(*standby_end, end);
                assert!(*beyond_bytes > 0);
                assert!(holds.contains("base-1"), "{holds}");
            }
            other => panic!("expected Diverged, got {other:?}"),
        }
        assert!(err.is_permanent());
        let text = err.to_string();
        assert!(
            text.contains(&end.to_string()) && text.contains("--start-over"),
            "{text}"
        );
    }
    assert!(fx.m.recoverable());
    // It still follows its own primary.
    let (f, at, more) = next_records(&fx.m, 300, 2);
    fx.ok(log_chunk(f, at, &more));

    // A base whose copy is unfinished but that holds log is protected too.
    let mut fx = Fx::new();
    fx.ok(welcome(ENV, 1, ""));
    fx.ok(base_start("base-1", 1, 0));
    let (img, _) = log_file(0, 0, 3);
    fx.ok(log_chunk(1, 0, &img));
    fx.m.sync().expect("sync");
    let err = fx.refuse(base_start("base-2", 1, 0));
    assert!(matches!(err, ApplyError::Diverged { .. }), "{err:?}");
}

#[test]
fn a_standby_that_holds_nothing_takes_a_new_base_directly() {
    let mut fx = Fx::new();
    fx.ok(welcome(ENV, 1, ""));
    fx.ok(base_start("base-1", 1, 0));
    // No complete file, no log: nothing to protect, nothing to stage.
    fx.ok(base_start("base-2", 1, 0));
    assert!(fx.m.rebase.is_none());
    assert_eq!(
        fx.m.state.base.as_ref().map(|b| b.base_id.as_str()),
        Some("base-2")
    );
}

#[test]
fn a_new_base_past_the_standby_end_is_staged_and_swapped_in_when_complete() {
    let mut fx = holding();
    let env_before = env_tree(&fx);
    let state_before = fx.m.state.clone();
    fx.ok(base_start("base-2", 5, 0));
    send_new_files(&mut fx);
    let (img, _) = log_file(0, 500, 4);
    let split = logfile::walk(&img[..80], 0, None).end as usize;
    fx.ok(log_chunk(5, 0, &img[..split]));
    // Acknowledged: the staged log's durable position.
    assert_eq!(
        fx.m.sync().expect("sync"),
        LogPosition::new(5, split as u32)
    );
    fx.ok(log_chunk(5, split as u32, &img[split..]));
    let end = LogPosition::new(5, img.len() as u32);
    assert_eq!(fx.m.sync().expect("sync"), end);
    // Files not done yet: nothing the environment holds has changed.
    assert!(fx.m.finish_rebase().expect("not ready").is_none());
    assert_eq!(env_tree(&fx), env_before);
    assert_eq!(fx.m.state, state_before);
    assert!(fx.m.recoverable());
    fx.ok(files_done(5, end.offset));
    let report = fx.m.finish_rebase().expect("swap").expect("ready");
    assert_eq!(report.base_id, "base-2");
    assert_eq!(report.removed_log_files, 2);
    assert_new_base(&mut fx, "base-2", &[5], end);
    // The new log goes on in the mirror.
    let (f, at, more) = next_records(&fx.m, 600, 2);
    fx.ok(log_chunk(f, at, &more));
    assert!(fx.m.sync().expect("sync") > end);
}

#[test]
fn start_over_replaces_a_contradicted_history_only_when_the_new_base_is_complete() {
    let mut fx = holding();
    fx.m.start_over = true;
    assert_eq!(fx.m.new_base_request(), START_OVER_REQUEST);
    let env_before = env_tree(&fx);
    fx.ok(base_start("base-2", 1, 0));
    send_new_files(&mut fx);
    assert_eq!(env_tree(&fx), env_before, "staging touched the environment");
    let (img, _) = log_file(0, 500, 4);
    fx.ok(log_chunk(1, 0, &img));
    let end = LogPosition::new(1, img.len() as u32);
    fx.ok(files_done(1, end.offset));
    fx.m.sync().expect("sync");
    fx.m.finish_rebase().expect("swap").expect("ready");
    // log.1 is the new history's, log.2 (the old one's) is gone.
    assert_eq!(fx.log_bytes(1)[..img.len()], img[..]);
    assert!(!fx.m.start_over, "start-over must be used once");
    assert!(fx.m.new_base_request().is_empty());
    assert_new_base(&mut fx, "base-2", &[1], end);
}

#[test]
fn an_abandoned_staged_base_leaves_the_directory_as_it_was() {
    let mut fx = holding();
    let before = stored(&fx);
    let durable = fx.m.tail().durable;
    fx.ok(base_start("base-2", 5, 0));
    send_new_files(&mut fx);
    let (img, _) = log_file(0, 500, 4);
    fx.ok(log_chunk(5, 0, &img));
    fx.m.sync().expect("sync");
    // The session ends before the base is complete.
    fx.m.begin_session();
    assert!(fx.m.rebase.is_none());
    assert_eq!(stored(&fx), before);
    assert_eq!(fx.m.tail().durable, durable);
    // A crash while staging: the same after a restart.
    fx.ok(base_start("base-3", 5, 0));
    send_new_files(&mut fx);
    fx.reopen().expect("reopen");
    assert_eq!(stored(&fx), before);
    assert_eq!(fx.m.tail().durable, durable);
    assert!(fx.m.recoverable());
}

/// Fails the swap before each of its durable steps in turn, then finishes
/// it the way `how` says, and checks the directory holds exactly one base:
/// the old one (only if the swap was never recorded) or the new one.
fn every_step_of_a_swap(
    send: fn(&mut Fx) -> (&'static str, LogPosition, Vec<u32>),
    how: fn(&mut Fx),
) {
    for k in 0.. {
        let mut fx = holding();
        let old = stored(&fx);
        let old_end = fx.m.tail().durable;
        let (id, end, logs) = send(&mut fx);
        fx.m.sync().expect("sync");
        fx.m.fail_after_steps(Some(k));
        let swapped = fx.m.finish_rebase();
        fx.m.fail_after_steps(None);
        if swapped.is_ok() {
            assert!(k > 3, "the swap has more than {k} steps");
            return;
        }
        how(&mut fx);
        if fx.m.state.base.as_ref().map(|b| b.base_id.as_str()) == Some("base-1") {
            assert_eq!(
                k, 0,
                "failed at step {k}: the swap was recorded but not finished"
            );
            assert_eq!(stored(&fx), old, "failed at step {k}");
            assert_eq!(fx.m.tail().durable, old_end);
            continue;
        }
        assert_new_base(&mut fx, id, &logs, end);
    }
}

fn replacement(fx: &mut Fx) -> (&'static str, LogPosition, Vec<u32>) {
    fx.m.start_over = true;
    ("base-2", send_replacement(fx, "base-2", 1), vec![1])
}

fn rebase(fx: &mut Fx) -> (&'static str, LogPosition, Vec<u32>) {
    ("base-2", send_rebase(fx, "base-2"), vec![2])
}

fn restart(fx: &mut Fx) {
    fx.reopen().expect("reopen finishes the swap");
}

fn new_session(fx: &mut Fx) {
    fx.m.begin_session();
}

/// The failure the old code turned into a wrong base: a new rebase starts
/// (clearing the staging area) before the failed swap is finished, and a
/// restart then records files that were never moved.
fn another_rebase_then_restart(fx: &mut Fx) {
    if fx.m.state.pending_swap.is_some() {
        let _ = fx.m.apply(rebase_start("base-3", 2));
    }
    fx.m.begin_session();
    fx.reopen().expect("reopen");
}

#[test]
fn an_interrupted_replacement_swap_is_finished_at_restart() {
    every_step_of_a_swap(replacement, restart);
}

#[test]
fn an_interrupted_replacement_swap_is_finished_at_the_next_session() {
    every_step_of_a_swap(replacement, |fx| {
        new_session(fx);
        if fx.m.state.pending_swap.is_none()
            && fx
                .m
                .state
                .base
                .as_ref()
                .is_some_and(|b| b.base_id == "base-2")
        {
            assert!(!fx.m.start_over, "start-over must be used once");
        }
    });
}

#[test]
fn an_interrupted_rebase_swap_is_finished_at_restart() {
    every_step_of_a_swap(rebase, restart);
}

#[test]
fn an_interrupted_rebase_swap_is_finished_before_another_rebase_starts() {
    every_step_of_a_swap(rebase, another_rebase_then_restart);
}

#[test]
fn an_interrupted_replacement_swap_is_finished_before_another_base_starts() {
    every_step_of_a_swap(replacement, |fx| {
        if fx.m.state.pending_swap.is_some() {
            fx.m.start_over = true;
            let _ = fx.m.apply(base_start("base-3", 1, 0));
        }
        fx.m.begin_session();
        fx.reopen().expect("reopen");
    });
}

#[test]
fn open_verifies_the_log_chain_across_files() {
    // A record in the middle of log.1 is damaged at rest: the durable log
    // ends before it, and log.2 (which no longer links) leaves the
    // environment instead of being counted.
    let mut fx = holding();
    let one = fx.log_bytes(1);
    let w = logfile::walk(&one, 0, None);
    let bad = logfile::walk(&one[..200], 0, None).end;
    let mut damaged = one.clone();
    damaged[bad as usize + 14] ^= 0x40;
    std::fs::write(fx.root().join(logfile::log_file_name(1)), &damaged).expect("write");
    assert!(w.end > bad);
    fx.reopen().expect("reopen");
    assert_eq!(fx.m.tail().durable, LogPosition::new(1, bad));
    assert_eq!(log_numbers_of(&fx), vec![1]);
    assert!(fx
        .m
        .dir
        .broken_log_dir()
        .join(logfile::log_file_name(2))
        .is_file());
    assert_eq!(
        fx.m.tail().last_record_digest,
        digest_of_record_before(&fx, LogPosition::new(1, bad))
    );
    // The primary sends the rest again from there and it is accepted.
    let (rest, _) = records(bad, fx.m.tail().last_record.expect("log"), 700, 2);
    fx.ok(log_chunk(1, bad, &rest));

    // log.2 does not link to log.1's last record: the log ends with log.1.
    let mut fx = holding();
    let end_of_one = LogPosition::new(1, logfile::walk(&fx.log_bytes(1), 0, None).end);
    let mut two = fx.log_bytes(2);
    two[0] ^= 0x01; // record 0's prev
    std::fs::write(fx.root().join(logfile::log_file_name(2)), &two).expect("write");
    fx.reopen().expect("reopen");
    assert_eq!(fx.m.tail().durable, end_of_one);
    assert_eq!(log_numbers_of(&fx), vec![1]);
}

/// Open time for a 1 GiB log (fsync and chain verification of every
/// file). `cargo test -p tandem-standby --release -- --ignored --nocapture
/// open_time` prints it.
#[test]
#[ignore]
fn open_time_of_a_one_gib_log() {
    const LG: u32 = 10 << 20;
    let mut fx = Fx::new();
    fx.ok(welcome(ENV, 1, ""));
    fx.ok(base_start("base-1", 1, 0));
    let body = vec![7u8; 4000];
    let mut prev = 0;
    let files = 1024 / 10;
    let started = std::time::Instant::now();
    for n in 1..=files {
        let bodies: Vec<&[u8]> = (0..2600).map(|_| body.as_slice()).collect();
        let img = synth::file(prev, LG, &bodies, 0);
        prev = logfile::walk(&img, 0, Some(prev))
            .last_record
            .expect("records");
        let digest = blake3::hash(&img).as_bytes().to_vec();
        fx.ok(log_chunk_full(n, 0, &img, digest, u64::from(LG - 1)));
    }
    fx.m.sync().expect("sync");
    let written = started.elapsed();
    let end = fx.m.tail().durable;
    let started = std::time::Instant::now();
    fx.reopen().expect("reopen");
    let open = started.elapsed();
    assert_eq!(fx.m.tail().durable, end);
    println!(
        "1 GiB log ({files} files of {} MiB): written in {:.2}s, Mirror::open in {:.2}s",
        LG >> 20,
        written.as_secs_f64(),
        open.as_secs_f64()
    );
}

#[test]
fn promote_finishes_an_interrupted_replacement_swap_before_recovering() {
    every_step_of_a_swap(replacement, |fx| {
        // `run` died mid-swap; `promote` takes the directory.
        let dir = fx.m.dir.clone();
        let elsewhere = tempfile::tempdir().expect("tempdir");
        fx.m = Mirror::open(StandbyDir::new(elsewhere.path())).expect("open elsewhere");
        finish_interrupted_swap(&dir).expect("finish");
        let state = dir.load_state().expect("state");
        assert!(state.pending_swap.is_none());
        fx.m = Mirror::open(dir).expect("reopen");
    });
}

/// Pages of data.db as the standby holds them, by reference.
fn data_db_same() -> Kind {
    Kind::FileSame(tandem_shared::wire::FileSame {
        name: "data.db".into(),
        offset: 0,
        len: 16384,
    })
}

#[test]
fn a_replacement_base_refers_to_the_mirrors_pages_only_in_a_rejoin() {
    // --start-over: every page is sent; a FileSame is refused.
    let mut fx = holding();
    fx.m.start_over = true;
    fx.ok(base_start("base-2", 1, 0));
    fx.ok(file_start("data.db", 16384, FileKind::Database));
    let err = fx.refuse(data_db_same());
    assert!(matches!(err, ApplyError::Protocol(_)), "{err:?}");

    // --rejoin: the held pages are reused, the discarded log and the file
    // the new base lacks (gone.db) are kept, then the swap.
    let mut fx = holding();
    let old_end = fx.m.tail().durable;
    fx.m.rejoin = true;
    let env_before = env_tree(&fx);
    fx.ok(base_start("base-2", 1, 0));
    fx.ok(file_start("data.db", 16384, FileKind::Database));
    fx.ok(data_db_same());
    fx.ok(file_end("data.db", 16384));
    fx.ship(DB_CONFIG, FileKind::Config, b"set_lg_max 1048576\n");
    assert_eq!(env_tree(&fx), env_before, "staging touched the environment");
    let (img, _) = log_file(0, 500, 4);
    fx.ok(log_chunk(1, 0, &img));
    fx.ok(files_done(1, img.len() as u32));
    fx.m.sync().expect("sync");
    let report = fx.m.finish_rebase().expect("swap").expect("ready");
    // Only DB_CONFIG was sent.
    assert_eq!((report.sent_bytes, report.reused_bytes), (19, 16384));
    let d = report
        .discarded
        .expect("a rejoin reports what it discarded");
    assert_eq!(d.to, old_end);
    assert!(d.from < old_end && d.bytes > 0, "{d:?}");
    let kept = fx.root().join(&d.kept_in);
    for name in ["log.0000000001", "log.0000000002", "files/gone.db"] {
        assert!(kept.join(name).is_file(), "{name} not kept");
    }
    assert!(!fx.m.rejoin, "a rejoin ends with the swap");
    assert_eq!(crate::rejoin::reports(&fx.m.dir), vec![d]);
    assert_eq!(
        fx.m.state.base.as_ref().map(|b| b.base_id.as_str()),
        Some("base-2")
    );
    assert!(fx.m.recoverable());
    assert_eq!(log_numbers_of(&fx), vec![1]);
    assert!(!fx.root().join("gone.db").exists());
    assert_eq!(
        std::fs::read(fx.root().join("data.db")).expect("data.db"),
        db_bytes(16384, 1)
    );
}
