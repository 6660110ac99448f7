//! The session around the data: another environment, an older epoch, a
//! changed log directory, data before Welcome or BaseStart, a file of the
//! wrong kind or size, a resent file that ends short; where the standby
//! resumes after a refusal; a full disk. Uses the fixtures of
//! `mirror::tests` (`tests/mod.rs`).

// Messages are built with `..Default::default()` even where every field is
// given today: the protocol grows fields, the tests set what they mean.
#![allow(clippy::needless_update)]

use super::*;

// ----------------------------------------------- environment, epoch, order

#[test]
fn another_environment_is_refused_for_good() {
    let mut fx = populated();
    for other in ["env-b", "", "ENV-A"] {
        let err = fx.refuse(welcome(other, 1, ""));
        assert!(
            matches!(&err, ApplyError::IdentityMismatch { ours, theirs } if ours == ENV && theirs == other),
            "{err:?}"
        );
        assert!(err.is_permanent());
        assert!(err.to_string().starts_with("environment mismatch"), "{err}");
    }
    // A newer epoch does not make another environment acceptable.
    let err = fx.refuse(welcome("env-b", 99, ""));
    assert!(
        matches!(err, ApplyError::IdentityMismatch { .. }),
        "{err:?}"
    );
    fx.ok(welcome(ENV, 1, ""));
}

#[test]
fn an_older_epoch_is_fenced() {
    let mut fx = populated();
    fx.ok(welcome(ENV, 5, ""));
    for old in [4, 1, 0] {
        let err = fx.refuse(welcome(ENV, old, ""));
        assert!(
            matches!(err, ApplyError::Fenced { ours: 5, theirs } if theirs == old),
            "{err:?}"
        );
        assert!(err.is_permanent());
        assert!(err.to_string().contains("fenced"), "{err}");
    }
    assert_eq!(fx.m.state.epoch, 5);
    fx.ok(welcome(ENV, 5, ""));
}

fn epoch_start(epoch: u64, offset: u32) -> tandem_shared::wire::EpochStart {
    tandem_shared::wire::EpochStart {
        epoch,
        start: Some(LogPosition::new(1, offset).into()),
        prev_record_digest: vec![epoch as u8; 32].into(),
    }
}

fn welcome_with_history(epoch: u64, history: Vec<tandem_shared::wire::EpochStart>) -> Kind {
    Kind::Welcome(Welcome {
        env_id: ENV.into(),
        epoch,
        history,
        ..Default::default()
    })
}

#[test]
fn the_epoch_history_is_stored_and_a_conflicting_one_refused() {
    let mut fx = populated();
    let (e2, e3) = (epoch_start(2, 100), epoch_start(3, 300));
    fx.ok(welcome_with_history(2, vec![e2.clone()]));
    let stored = |fx: &Fx| fx.m.dir.load_state().expect("state").history;
    assert_eq!(stored(&fx), vec![(&e2).into()], "stored durably");
    // Another primary whose history gives epoch 2 another start (two
    // promotions made epoch 2): refused for good, nothing stored.
    for other in [epoch_start(2, 140), {
        let mut d = e2.clone();
        d.prev_record_digest = vec![7; 32].into();
        d
    }] {
        let err = fx.refuse(welcome_with_history(3, vec![other, e3.clone()]));
        assert!(matches!(err, ApplyError::HistoryConflict(_)), "{err:?}");
        assert!(err.is_permanent());
        assert!(err.to_string().contains("epoch 2"), "{err}");
    }
    // A primary that leaves out an epoch this standby knows does not make
    // it forget the epoch's start.
    fx.ok(welcome_with_history(3, vec![e3.clone()]));
    assert_eq!(stored(&fx), vec![(&e2).into(), (&e3).into()]);
    assert_eq!(fx.m.state.epoch, 3);
}

#[test]
fn a_changed_log_directory_is_refused_while_a_base_is_held() {
    let mut fx = populated();
    let err = fx.refuse(welcome(ENV, 1, "logs"));
    assert!(
        matches!(&err, ApplyError::Protocol(why) if why.contains("log directory changed")),
        "{err:?}"
    );
    assert!(!err.is_permanent());
}

#[test]
fn data_before_welcome_or_base_start_is_refused() {
    let mut fx = Fx::new();
    let (img, _) = log_file(0, 0, 2);
    let err = fx.refuse(base_start("b", 1, 0));
    assert!(
        matches!(&err, ApplyError::Protocol(why) if why.contains("before Welcome")),
        "{err:?}"
    );
    fx.ok(welcome(ENV, 1, ""));
    for kind in [
        file_start("a.db", 10, FileKind::Database),
        log_chunk(1, 0, &img),
        files_done(1, 0),
    ] {
        let err = fx.refuse(kind);
        assert!(
            matches!(&err, ApplyError::Protocol(why) if why.contains("before BaseStart")),
            "{err:?}"
        );
    }
    let err = fx.refuse(file_chunk("a.db", 0, b"x"));
    assert!(matches!(err, ApplyError::UnknownFile(_)), "{err:?}");
    for (file, offset) in [(0, 0), (1, 28), (2, 100)] {
        let err = fx.refuse(base_start("b", file, offset));
        assert!(
            matches!(&err, ApplyError::Protocol(why) if why.contains("not the start of a log file")),
            "{err:?}"
        );
    }
    let err = fx.refuse(Kind::BaseStart(BaseStart {
        base_id: "b".into(),
        log_start: None,
        ..Default::default()
    }));
    assert!(matches!(err, ApplyError::Protocol(_)), "{err:?}");
    fx.ok(Kind::Heartbeat(Heartbeat::default()));
    fx.ok(base_start("b", 1, 0));
    fx.ok(log_chunk(1, 0, &img));
}

#[test]
fn a_file_of_the_wrong_kind_or_size_is_refused() {
    let mut fx = populated();
    let cases: Vec<(&str, FileKind, u64)> = vec![
        ("log.0000000001", FileKind::Database, 10),
        ("log.0000000009", FileKind::Database, 10),
        ("__db.001", FileKind::Database, 10),
        ("sub/__db.register", FileKind::Database, 10),
        (DB_CONFIG, FileKind::Database, 10),
        ("sub/DB_CONFIG", FileKind::Database, 10),
        ("data.db", FileKind::Config, 10),
        ("sub/DB_CONFIG", FileKind::Config, 10),
    ];
    for (name, kind, size) in cases {
        let err = fx.refuse(file_start(name, size, kind));
        assert!(
            matches!(&err, ApplyError::Protocol(why) if why.contains("cannot be sent as")),
            "{name} {kind:?}: {err:?}"
        );
    }
    let err = fx.refuse(Kind::FileStart(FileStart {
        name: "x.db".into(),
        size: 1,
        kind: 7,
        page_size: 4096,
        ..Default::default()
    }));
    assert!(
        matches!(&err, ApplyError::Protocol(why) if why.contains("unknown file kind")),
        "{err:?}"
    );
    for size in [MAX_FILE_SIZE + 1, u64::MAX] {
        let err = fx.refuse(file_start("huge.db", size, FileKind::Database));
        assert!(
            matches!(&err, ApplyError::TooLarge { size: s, .. } if *s == size),
            "{err:?}"
        );
    }
    // A second FileStart while a file is still incomplete.
    fx.ok(file_start("a.db", 10, FileKind::Database));
    let err = fx.refuse(file_start("b.db", 10, FileKind::Database));
    assert!(
        matches!(&err, ApplyError::Protocol(why) if why.contains("incomplete")),
        "{err:?}"
    );
}

#[test]
fn a_resent_file_that_ends_short_leaves_the_complete_copy_alone() {
    let mut fx = populated();
    let before = stored(&fx);
    let data = db_bytes(16384, 2);
    fx.ok(file_start("data.db", data.len() as u64, FileKind::Database));
    fx.ok(file_chunk("data.db", 0, &data[..4096]));
    let err =
        fx.m.apply(file_end("data.db", data.len() as u64))
            .expect_err("short file");
    assert!(
        matches!(&err, ApplyError::Protocol(why) if why.contains("ended at")),
        "{err:?}"
    );
    assert_eq!(
        stored(&fx),
        before,
        "the complete data.db must be untouched"
    );
    fx.m.begin_session();
    let err =
        fx.m.apply(file_chunk("data.db", 4096, &data[4096..8192]))
            .expect_err("file is gone");
    assert!(matches!(err, ApplyError::UnknownFile(_)), "{err:?}");
    assert_eq!(stored(&fx), before);
}

// ------------------------------------------------ resuming after a refusal

#[test]
fn after_a_refused_message_the_standby_resumes_where_it_is_durable() {
    // One batch: a good log chunk is written (not yet fsynced, not
    // acknowledged), then a corrupted one is refused. The session ends; on
    // reconnect the Hello must describe one consistent point (durable
    // position and the digest of the record before it), and the primary's
    // resend from that point must be accepted. Otherwise the primary sees
    // a "different history" and starts a new base (discarding this one), or
    // resumes at `durable` and every chunk is refused as a gap.
    let mut fx = populated();
    let (file, at, a) = next_records(&fx.m, 80, 3);
    fx.ok(log_chunk(file, at, &a));
    let b_at = at + a.len() as u32;
    let (b, _) = records(b_at, fx.m.tail().last_record.expect("log"), 90, 2);
    let mut flipped = blake3::hash(&b).as_bytes().to_vec();
    flipped[0] ^= 0xff;
    let err =
        fx.m.apply(log_chunk_full(file, b_at, &b, flipped, LOG_FILE_SIZE))
            .expect_err("corrupted");
    assert!(matches!(err, ApplyError::Digest { .. }), "{err:?}");

    fx.m.begin_session();
    let resume = fx.m.tail().durable;
    assert_eq!(
        fx.m.tail().last_record_digest,
        digest_of_record_before(&fx, resume),
        "the Hello's last_record_digest is not the digest of the record before its durable position {resume}"
    );
    // The primary resends from `resume`.
    let resent = if resume.offset == at {
        [a.clone(), b.clone()].concat()
    } else {
        b.clone()
    };
    fx.ok(log_chunk(resume.file, resume.offset, &resent));
    fx.m.sync().expect("sync");
    assert_eq!(
        fx.m.tail().durable,
        LogPosition::new(file, b_at + b.len() as u32)
    );
    let disk = fx.m.dir.scan_tail(&fx.m.state).expect("scan");
    assert_eq!(disk.durable, fx.m.tail().durable);
}

// ----------------------------------------------------------------- 7: disk

/// A tmpfs mounted for one test, unmounted when dropped.
struct Tmpfs(PathBuf);

impl Tmpfs {
    fn mount(at: &Path, size: &str) -> Result<Self, String> {
        std::fs::create_dir_all(at).map_err(|e| e.to_string())?;
        let out = Command::new("mount")
            .args(["-t", "tmpfs", "-o", &format!("size={size}"), "tandem-test"])
            .arg(at)
            .output()
            .map_err(|e| format!("cannot run mount: {e}"))?;
        if !out.status.success() {
            return Err(format!(
                "mount -t tmpfs failed ({}): {}",
                out.status,
                String::from_utf8_lossy(&out.stderr).trim()
            ));
        }
        Ok(Self(at.to_path_buf()))
    }
}

impl Drop for Tmpfs {
    fn drop(&mut self) {
        let ok = Command::new("umount")
            .arg(&self.0)
            .status()
            .is_ok_and(|s| s.success());
        if !ok {
            let _ = Command::new("umount").arg("-l").arg(&self.0).status();
        }
    }
}

/// Fills the file system holding `path` until a write fails with ENOSPC.
fn fill(path: &Path) {
    use std::io::Write;
    let mut f = std::fs::File::create(path).expect("create filler");
    let block = vec![0x5au8; 4096];
    loop {
        match f.write_all(&block) {
            Ok(()) => {}
            Err(e) if e.raw_os_error() == Some(libc::ENOSPC) => return,
            Err(e) => panic!("filling the disk: {e}"),
        }
    }
}

#[test]
fn a_full_disk_is_reported_as_disk_full_and_keeps_what_was_stored() {
    let base = tempfile::tempdir().expect("tempdir");
    let mnt = base.path().join("mnt");
    let _tmpfs = match Tmpfs::mount(&mnt, "1m") {
        Ok(t) => t,
        Err(why) => {
            eprintln!("skipping the disk-full test: {why} (needs root)");
            return;
        }
    };
    let mut m = Mirror::open(StandbyDir::new(&mnt.join("standby"))).expect("open");
    m.apply(welcome(ENV, 1, "")).expect("welcome");
    m.apply(base_start("b", 1, 0)).expect("base");
    let data = db_bytes(16384, 4);
    m.apply(file_start("data.db", data.len() as u64, FileKind::Database))
        .expect("start");
    m.apply(file_chunk("data.db", 0, &data)).expect("chunk");
    m.apply(file_end("data.db", data.len() as u64))
        .expect("end");
    let (img, _) = log_file(0, 0, 10);
    m.apply(log_chunk(1, 0, &img)).expect("log");
    m.sync().expect("sync");
    let durable = m.tail().durable;
    let state = m.state.clone();
    let stored = |m: &Mirror| {
        tree(&m.dir.root)
            .into_iter()
            .filter(|(k, _)| !k.starts_with(".tandem/incoming"))
            .collect::<BTreeMap<_, _>>()
    };
    let before = stored(&m);

    fill(&mnt.join("filler"));
    // Enough records to need new pages of the log file.
    let (file, at, big) = next_records(&m, 100, 300);
    assert!(big.len() > 8192);
    let mut refusals = Vec::new();
    refusals.push(
        m.apply(log_chunk(file, at, &big))
            .expect_err("log on a full disk"),
    );
    refusals.push({
        let (next, _) = log_file(m.tail().last_record.expect("log"), 500, 300);
        m.apply(log_chunk(2, 0, &next))
            .expect_err("new log file on a full disk")
    });
    m.begin_session();
    refusals.push(
        match m.apply(file_start("new.db", data.len() as u64, FileKind::Database)) {
            Err(e) => e,
            // Written behind by the file's own thread, the failed write
            // is reported by the chunk or, at the latest, by the file's
            // end, which then places nothing.
            Ok(_) => m
                .apply(file_chunk("new.db", 0, &data))
                .and_then(|_| m.apply(file_end("new.db", data.len() as u64)))
                .expect_err("database file on a full disk"),
        },
    );
    m.begin_session();
    refusals.push(
        m.apply(files_done(1, at))
            .expect_err("state on a full disk"),
    );
    for err in &refusals {
        assert!(
            matches!(err, ApplyError::DiskFull(_)),
            "expected DiskFull, got {err:?}"
        );
        assert!(err.to_string().starts_with("disk full while"), "{err}");
    }
    m.begin_session();
    assert_eq!(m.tail().durable, durable, "nothing new may be acknowledged");
    assert_eq!(
        m.state, state,
        "the in-memory state must match what is stored"
    );
    assert_eq!(m.dir.load_state().expect("state"), state);
    // What was stored is intact and the log still verifies to its end.
    let after = stored(&m);
    for (k, v) in &before {
        if k != &logfile::log_file_name(1) {
            assert_eq!(after.get(k), Some(v), "{k} changed on a full disk");
        }
    }
    let log = std::fs::read(m.dir.root.join(logfile::log_file_name(1))).expect("read");
    assert_eq!(
        &log[..durable.offset as usize],
        &img[..],
        "the durable log prefix changed"
    );
    // The write that failed may have put some of the new records into the
    // page that was already allocated: complete ones are the primary's own
    // records (verified before writing), so the chain still verifies to at
    // least the durable end, and nothing past it was acknowledged.
    let w = logfile::walk_file(
        &std::fs::File::open(m.dir.root.join(logfile::log_file_name(1))).expect("open"),
        None,
    )
    .expect("walk");
    assert!(
        w.end >= durable.offset,
        "the log no longer verifies to {durable}"
    );
    assert!(
        !m.dir.root.join(logfile::log_file_name(2)).exists(),
        "a log file appeared that could not be written"
    );
    assert!(
        !m.dir.root.join("new.db").exists(),
        "a database file appeared that could not be written"
    );

    // Space comes back: the primary resends from the durable position.
    std::fs::remove_file(mnt.join("filler")).expect("rm filler");
    m.apply(log_chunk(file, at, &big))
        .expect("log after space came back");
    m.apply(files_done(1, at))
        .expect("state after space came back");
    let end = m.sync().expect("sync");
    assert_eq!(end, LogPosition::new(1, at + big.len() as u32));
    let w = logfile::walk_file(
        &std::fs::File::open(m.dir.root.join(logfile::log_file_name(1))).expect("open"),
        None,
    )
    .expect("walk");
    assert_eq!(w.end, end.offset);
    drop(m);
}
