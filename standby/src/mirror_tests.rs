//! "Bad input gets a clear error and changes nothing": `Mirror::apply` driven
//! with crafted primary messages on a temporary directory.
//!
//! Every refusal is checked the same way (`refuse`): the typed error is the
//! expected one, its message is not empty, and neither the standby
//! directory, nor the directory next to it, nor the mirror's state and log
//! tail changed by a single byte. Each test also shows the mirror still
//! accepts good data after refusing bad data.

// Messages are built with `..Default::default()` even where every field is
// given today: the protocol grows fields, the tests set what they mean.
#![allow(clippy::needless_update)]

use super::*;
use crate::apply_error::MAX_FILE_SIZE;
use crate::state::StandbyDir;
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::Command;
use tandem_shared::envlayout::DB_CONFIG;
use tandem_shared::logfile::synth;
use tandem_shared::logfile::{self, WalkStop};
use tandem_shared::wire::FileKind;
use tandem_shared::wire::{
    BaseFilesDone, BaseStart, FileChunk, FileEnd, FileStart, Heartbeat, LogChunk, Welcome,
};
use tandem_shared::wirepath::PathError;

const ENV: &str = "env-a";
const LG_MAX: u32 = 1 << 20;
/// BDB's log files are `lg_max - 1` bytes (BDB.md §2).
const LOG_FILE_SIZE: u64 = LG_MAX as u64 - 1;

// ---------------------------------------------------------------- messages

fn welcome(env: &str, epoch: u64, log_dir: &str) -> Kind {
    Kind::Welcome(Welcome {
        env_id: env.into(),
        epoch,
        log_dir: log_dir.into(),
        ..Default::default()
    })
}

fn base_start(id: &str, file: u32, offset: u32) -> Kind {
    Kind::BaseStart(BaseStart {
        base_id: id.into(),
        log_start: Some(LogPosition::new(file, offset).into()),
        reason: "test".into(),
        ..Default::default()
    })
}

fn file_start(name: &str, size: u64, kind: FileKind) -> Kind {
    Kind::FileStart(FileStart {
        name: name.into(),
        size,
        kind: kind as i32,
        page_size: 4096,
        ..Default::default()
    })
}

fn file_chunk(name: &str, offset: u64, data: &[u8]) -> Kind {
    let digest = blake3::hash(data).as_bytes().to_vec();
    file_chunk_with_digest(name, offset, data, digest)
}

fn file_chunk_with_digest(name: &str, offset: u64, data: &[u8], digest: Vec<u8>) -> Kind {
    Kind::FileChunk(FileChunk {
        name: name.into(),
        offset,
        data: data.to_vec().into(),
        blake3: digest.into(),
        ..Default::default()
    })
}

fn file_end(name: &str, size: u64) -> Kind {
    Kind::FileEnd(FileEnd {
        name: name.into(),
        size,
        ..Default::default()
    })
}

fn log_chunk(file: u32, offset: u32, data: &[u8]) -> Kind {
    log_chunk_full(
        file,
        offset,
        data,
        blake3::hash(data).as_bytes().to_vec(),
        LOG_FILE_SIZE,
    )
}

fn log_chunk_full(file: u32, offset: u32, data: &[u8], digest: Vec<u8>, file_size: u64) -> Kind {
    Kind::LogChunk(LogChunk {
        file,
        offset,
        data: data.to_vec().into(),
        blake3: digest.into(),
        file_size,
        ..Default::default()
    })
}

fn files_done(file: u32, offset: u32) -> Kind {
    Kind::BaseFilesDone(BaseFilesDone {
        consistent_at: Some(LogPosition::new(file, offset).into()),
        ..Default::default()
    })
}

// ------------------------------------------------------------- log records

fn body(i: usize) -> Vec<u8> {
    format!("txn {i:05};").repeat(1 + i % 7).into_bytes()
}

/// A whole log file image (persist record and `n` records, no padding) and
/// the offset of its last record.
fn log_file(prev_of_first: u32, first_body: usize, n: usize) -> (Vec<u8>, u32) {
    let bodies: Vec<Vec<u8>> = (first_body..first_body + n).map(body).collect();
    let refs: Vec<&[u8]> = bodies.iter().map(Vec::as_slice).collect();
    let img = synth::file(prev_of_first, LG_MAX, &refs, 0);
    let w = logfile::walk(&img, 0, Some(prev_of_first));
    assert_eq!(w.stop, WalkStop::EndOfBuffer);
    (img, w.last_record.expect("records"))
}

/// `n` records that continue a log whose last record is at `prev` and whose
/// end is `start`. Returns the bytes and the offset of the last record.
fn records(start: u32, prev: u32, first_body: usize, n: usize) -> (Vec<u8>, u32) {
    let (mut out, mut prev) = (Vec::new(), prev);
    for i in first_body..first_body + n {
        let at = start + out.len() as u32;
        out.extend_from_slice(&synth::record(prev, &body(i)));
        prev = at;
    }
    (out, prev)
}

/// Records that continue the mirror's log where it ends now.
fn next_records(m: &Mirror, first_body: usize, n: usize) -> (u32, u32, Vec<u8>) {
    let at = m.tail().written;
    let (data, _) = records(
        at.offset,
        m.tail().last_record.expect("a log"),
        first_body,
        n,
    );
    (at.file, at.offset, data)
}

// ------------------------------------------------------------- directories

/// Everything under `dir`: files by content digest, symlinks by target,
/// directories by name, so any write, create, delete or re-link shows.
fn tree(dir: &Path) -> BTreeMap<String, String> {
    fn visit(root: &Path, dir: &Path, out: &mut BTreeMap<String, String>) {
        let Ok(entries) = std::fs::read_dir(dir) else {
            return;
        };
        for e in entries.flatten() {
            let p = e.path();
            let rel = p
                .strip_prefix(root)
                .map(|r| r.display().to_string())
                .unwrap_or_default();
            let meta = std::fs::symlink_metadata(&p).expect("lstat");
            if meta.file_type().is_symlink() {
                out.insert(
                    rel,
                    format!(
                        "symlink -> {}",
                        std::fs::read_link(&p).expect("readlink").display()
                    ),
                );
            } else if meta.is_dir() {
                out.insert(rel, "dir".into());
                visit(root, &p, out);
            } else {
                let bytes = std::fs::read(&p).expect("read");
                out.insert(
                    rel,
                    format!(
                        "{} bytes, blake3 {}",
                        bytes.len(),
                        blake3::hash(&bytes).to_hex()
                    ),
                );
            }
        }
    }
    let mut out = BTreeMap::new();
    visit(dir, dir, &mut out);
    out
}

/// A scratch area: `base/standby` is the standby directory, `base/outside`
/// a sibling that must never be touched. Trees are taken of `base`, so a
/// write that escapes the standby directory anywhere near it shows too.
struct Fx {
    base: tempfile::TempDir,
    m: Mirror,
}

impl Fx {
    fn new() -> Self {
        let base = tempfile::tempdir().expect("tempdir");
        std::fs::create_dir(base.path().join("outside")).expect("mkdir");
        std::fs::write(
            base.path().join("outside/victim.db"),
            b"precious data that is not the standby's",
        )
        .expect("write");
        let m = Mirror::open(StandbyDir::new(&base.path().join("standby"))).expect("open");
        Self { base, m }
    }

    fn root(&self) -> PathBuf {
        self.m.dir.root.clone()
    }

    fn outside(&self) -> PathBuf {
        self.base.path().join("outside")
    }

    /// Closes the mirror and opens the directory again, as a restart does.
    fn reopen(&mut self) -> Result<(), ApplyError> {
        let dir = self.m.dir.clone();
        // Drop the old mirror (and its open files) first: swap in one on a
        // directory of its own, outside `base`.
        let elsewhere = tempfile::tempdir().expect("tempdir");
        self.m = Mirror::open(StandbyDir::new(elsewhere.path()))?;
        self.m = Mirror::open(dir)?;
        Ok(())
    }

    fn ok(&mut self, kind: Kind) -> Applied {
        let what = format!("{kind:?}").chars().take(120).collect::<String>();
        self.m
            .apply(kind)
            .unwrap_or_else(|e| panic!("a good message was refused: {e} ({what})"))
    }

    /// Applies a message that must be refused and proves it changed
    /// nothing: not the directory (nor anything next to it), not the state,
    /// not the log tail. Returns the error for the caller to match.
    #[track_caller]
    fn refuse(&mut self, kind: Kind) -> ApplyError {
        let what = format!("{kind:?}").chars().take(160).collect::<String>();
        let before = tree(self.base.path());
        let state = self.m.state.clone();
        let tail = self.m.tail().clone();
        let err = match self.m.apply(kind) {
            Ok(a) => panic!("accepted bad input {what}: {a:?}"),
            Err(e) => e,
        };
        assert!(!err.to_string().is_empty());
        assert_eq!(
            tree(self.base.path()),
            before,
            "refusing {what} ({err}) changed files"
        );
        assert_eq!(
            self.m.state, state,
            "refusing {what} ({err}) changed the state"
        );
        assert_eq!(
            (
                self.m.tail().written,
                self.m.tail().durable,
                self.m.tail().last_record,
                &self.m.tail().last_record_digest
            ),
            (
                tail.written,
                tail.durable,
                tail.last_record,
                &tail.last_record_digest
            ),
            "refusing {what} ({err}) moved the log tail"
        );
        err
    }

    /// Ships a whole file in 4 KiB chunks.
    fn ship(&mut self, name: &str, kind: FileKind, data: &[u8]) {
        self.ok(file_start(name, data.len() as u64, kind));
        for (i, c) in data.chunks(4096).enumerate() {
            self.ok(file_chunk(name, (i * 4096) as u64, c));
        }
        self.ok(file_end(name, data.len() as u64));
    }

    fn log_bytes(&self, number: u32) -> Vec<u8> {
        std::fs::read(
            self.m
                .dir
                .log_dir(&self.m.state)
                .join(logfile::log_file_name(number)),
        )
        .expect("read log")
    }
}

fn db_bytes(len: usize, seed: u8) -> Vec<u8> {
    (0..len)
        .map(|i| (i as u8).wrapping_mul(31).wrapping_add(seed))
        .collect()
}

/// A standby that already holds something worth protecting: a complete
/// base (data.db, DB_CONFIG) and a durable log in file 1.
fn populated() -> Fx {
    let mut fx = Fx::new();
    fx.ok(welcome(ENV, 1, ""));
    fx.ok(base_start("base-1", 1, 0));
    fx.ship("data.db", FileKind::Database, &db_bytes(16384, 1));
    fx.ship(DB_CONFIG, FileKind::Config, b"set_lg_max 1048576\n");
    let (img, _) = log_file(0, 0, 6);
    // Two chunks, split at a record boundary, as the primary sends them.
    let split = logfile::walk(&img[..100], 0, None).end as usize;
    fx.ok(log_chunk(1, 0, &img[..split]));
    fx.ok(log_chunk(1, split as u32, &img[split..]));
    fx.ok(files_done(1, img.len() as u32));
    fx.m.sync().expect("sync");
    assert!(fx.m.recoverable());
    assert_eq!(fx.m.tail().durable, LogPosition::new(1, img.len() as u32));
    fx
}

// ------------------------------------------------------------ 2: file names

/// Which `PathError` a case expects.
type Expected = fn(&PathError) -> bool;

#[test]
fn names_that_leave_the_directory_are_refused() {
    let mut fx = populated();
    let abs = fx.outside().join("abs.db").display().to_string();
    let long = "a/".repeat(600) + "x.db";
    let cases: Vec<(String, Expected)> = vec![
        (abs, |e| matches!(e, PathError::Absolute(_))),
        ("/etc/passwd".into(), |e| {
            matches!(e, PathError::Absolute(_))
        }),
        ("../escape.db".into(), |e| matches!(e, PathError::Dots(_))),
        ("../outside/victim.db".into(), |e| {
            matches!(e, PathError::Dots(_))
        }),
        ("a/../../escape.db".into(), |e| {
            matches!(e, PathError::Dots(_))
        }),
        ("..".into(), |e| matches!(e, PathError::Dots(_))),
        ("./data.db".into(), |e| matches!(e, PathError::Dots(_))),
        ("sub/./data.db".into(), |e| matches!(e, PathError::Dots(_))),
        ("sub/..".into(), |e| matches!(e, PathError::Dots(_))),
        (".tandem/state".into(), |e| {
            matches!(e, PathError::Hidden(_))
        }),
        (".tandem/incoming/x".into(), |e| {
            matches!(e, PathError::Hidden(_))
        }),
        ("..hidden.db".into(), |e| matches!(e, PathError::Hidden(_))),
        ("".into(), |e| matches!(e, PathError::Empty)),
        ("..\\escape.db".into(), |e| {
            matches!(e, PathError::BadCharacter(_))
        }),
        ("x.db\0../../escape".into(), |e| {
            matches!(e, PathError::BadCharacter(_))
        }),
        (long, |e| matches!(e, PathError::TooLong(_))),
    ];
    for (name, expected) in cases {
        for kind in [FileKind::Database, FileKind::Config] {
            let err = fx.refuse(file_start(&name, 4096, kind));
            assert!(
                matches!(&err, ApplyError::Path(p) if expected(p)),
                "{name:?} as {kind:?}: {err:?}"
            );
            assert!(err.to_string().starts_with("refused file name"), "{err}");
        }
    }
    assert!(!fx.base.path().join("escape.db").exists());
    // Still a working mirror.
    fx.ship("more.db", FileKind::Database, &db_bytes(4096, 9));
}

#[test]
fn a_log_directory_that_leaves_the_directory_is_refused() {
    let mut fx = Fx::new();
    let cases: [(&str, Expected); 4] = [
        ("../logs", |e| matches!(e, PathError::Dots(_))),
        ("/var/log", |e| matches!(e, PathError::Absolute(_))),
        ("logs/../..", |e| matches!(e, PathError::Dots(_))),
        (".tandem", |e| matches!(e, PathError::Hidden(_))),
    ];
    for (dir, expected) in cases {
        let err = fx.refuse(welcome(ENV, 1, dir));
        assert!(
            matches!(&err, ApplyError::Path(p) if expected(p)),
            "{dir}: {err:?}"
        );
    }
    assert_eq!(
        fx.m.state,
        StandbyState::default(),
        "a refused Welcome must not be recorded"
    );
    fx.ok(welcome(ENV, 1, "logs"));
}

#[test]
fn a_planted_symlink_is_never_written_through() {
    let mut fx = populated();
    let (root, outside) = (fx.root(), fx.outside());
    std::os::unix::fs::symlink(outside.join("victim.db"), root.join("evil.db")).expect("symlink");
    std::os::unix::fs::symlink(&outside, root.join("evildir")).expect("symlink");
    std::fs::create_dir(root.join("sub")).expect("mkdir");
    std::os::unix::fs::symlink(&outside, root.join("sub/deeper")).expect("symlink");
    for name in [
        "evil.db",
        "evildir/x.db",
        "evildir/victim.db",
        "sub/deeper/x.db",
    ] {
        let err = fx.refuse(file_start(name, 4096, FileKind::Database));
        assert!(
            matches!(&err, ApplyError::Path(PathError::Symlink { .. })),
            "{name}: {err:?}"
        );
        assert!(err.to_string().contains("goes through symlink"), "{err}");
    }
    // DB_CONFIG replaced by a link.
    std::fs::remove_file(root.join(DB_CONFIG)).expect("rm");
    std::os::unix::fs::symlink(outside.join("victim.db"), root.join(DB_CONFIG)).expect("symlink");
    let err = fx.refuse(file_start(DB_CONFIG, 100, FileKind::Config));
    assert!(
        matches!(&err, ApplyError::Path(PathError::Symlink { .. })),
        "{err:?}"
    );
}

#[test]
fn a_symlink_planted_while_a_file_is_received_is_refused_at_install() {
    let mut fx = populated();
    let (root, outside) = (fx.root(), fx.outside());
    let data = db_bytes(8192, 3);
    for (name, plant, link_target) in [
        ("late.db", root.join("late.db"), outside.join("victim.db")),
        ("sub/late.db", root.join("sub"), outside.clone()),
    ] {
        fx.ok(file_start(name, data.len() as u64, FileKind::Database));
        fx.ok(file_chunk(name, 0, &data[..4096]));
        fx.ok(file_chunk(name, 4096, &data[4096..]));
        std::os::unix::fs::symlink(&link_target, &plant).expect("symlink");
        let stored = fx.m.state.clone();
        let err = fx.refuse(file_end(name, data.len() as u64));
        assert!(
            matches!(&err, ApplyError::Path(PathError::Symlink { .. })),
            "{name}: {err:?}"
        );
        assert_eq!(fx.m.state, stored);
        assert!(!fx
            .m
            .state
            .base
            .as_ref()
            .expect("base")
            .complete_files
            .contains(name));
        fx.m.begin_session(); // what a reconnect does
    }
    assert_eq!(
        std::fs::read(outside.join("victim.db")).expect("read"),
        b"precious data that is not the standby's"
    );
    assert!(!outside.join("late.db").exists());
}

#[test]
fn a_log_file_through_a_planted_symlink_is_refused() {
    // The next log file's name is a link out of the directory.
    let mut fx = populated();
    let (root, outside) = (fx.root(), fx.outside());
    std::os::unix::fs::symlink(
        outside.join("victim.db"),
        root.join(logfile::log_file_name(2)),
    )
    .expect("symlink");
    let (img, _) = log_file(fx.m.tail().last_record.expect("log"), 10, 3);
    let err = fx.refuse(log_chunk(2, 0, &img));
    assert!(
        matches!(&err, ApplyError::Path(PathError::Symlink { .. })),
        "{err:?}"
    );

    // The log directory itself is a link out of the directory.
    let mut fx = Fx::new();
    std::fs::create_dir(fx.outside().join("logs")).expect("mkdir");
    std::os::unix::fs::symlink(fx.outside().join("logs"), fx.root().join("logs")).expect("symlink");
    fx.ok(welcome(ENV, 1, "logs"));
    // Refused as soon as a base would use that directory, so no log arrives.
    let err = fx.refuse(base_start("b", 1, 0));
    assert!(
        matches!(&err, ApplyError::Path(PathError::Symlink { .. })),
        "{err:?}"
    );
    let (img, _) = log_file(0, 0, 3);
    let err = fx.refuse(log_chunk(1, 0, &img));
    assert!(matches!(&err, ApplyError::Protocol(_)), "{err:?}");
    assert_eq!(
        std::fs::read_dir(fx.outside().join("logs"))
            .expect("ls")
            .count(),
        0
    );
}

#[test]
fn a_log_file_replaced_by_a_symlink_is_not_continued() {
    // The mirror's current log file is swapped for a link while the standby
    // is down. On restart, nothing may be written through it: not the
    // zeroing of a torn tail, not the next records.
    let mut fx = populated();
    let (root, outside) = (fx.root(), fx.outside());
    let name = logfile::log_file_name(1);
    let (next_file, next_at, next) = next_records(&fx.m, 20, 4);
    std::fs::rename(root.join(&name), outside.join(&name)).expect("mv");
    std::os::unix::fs::symlink(outside.join(&name), root.join(&name)).expect("symlink");
    let before = tree(fx.base.path());
    match fx.reopen() {
        Err(e) => assert!(e.to_string().contains("symlink"), "{e}"),
        Ok(()) => {
            let err = fx.refuse(log_chunk(next_file, next_at, &next));
            assert!(
                matches!(&err, ApplyError::Path(PathError::Symlink { .. })),
                "{err:?}"
            );
        }
    }
    assert_eq!(tree(fx.base.path()), before);

    // The same with a link to a file that is not a log at all: opening the
    // mirror must not zero it as "a torn log tail".
    let mut fx = populated();
    let (root, outside) = (fx.root(), fx.outside());
    std::fs::remove_file(root.join(&name)).expect("rm");
    std::os::unix::fs::symlink(outside.join("victim.db"), root.join(&name)).expect("symlink");
    let before = tree(fx.base.path());
    let _ = fx.reopen();
    assert_eq!(
        tree(fx.base.path()),
        before,
        "opening the mirror wrote through a symlink"
    );
}

#[test]
fn a_new_base_does_not_delete_through_a_planted_log_directory_link() {
    let mut fx = Fx::new();
    fx.ok(welcome(ENV, 1, "logs"));
    fx.ok(base_start("base-1", 1, 0));
    let (img, _) = log_file(0, 0, 3);
    fx.ok(log_chunk(1, 0, &img));
    fx.m.sync().expect("sync");
    let (root, outside) = (fx.root(), fx.outside());
    // The log directory becomes a link to someone else's log directory.
    std::fs::create_dir(outside.join("logs")).expect("mkdir");
    std::fs::write(
        outside.join("logs").join(logfile::log_file_name(7)),
        b"someone else's log",
    )
    .expect("write");
    std::fs::remove_dir_all(root.join("logs")).expect("rm");
    std::os::unix::fs::symlink(outside.join("logs"), root.join("logs")).expect("symlink");
    // A new base that starts past the standby's end would be taken (and
    // the old logs removed by listing that directory): refused first.
    let err = fx.refuse(base_start("base-2", 2, 0));
    assert!(
        matches!(&err, ApplyError::Path(PathError::Symlink { .. })),
        "{err:?}"
    );
}

// -------------------------------------------------------------- 3: chunks

#[test]
fn a_chunk_past_the_declared_size_is_refused() {
    let mut fx = populated();
    let data = db_bytes(6000, 5);
    fx.ok(file_start("new.db", 5000, FileKind::Database));
    let err = fx.refuse(file_chunk("new.db", 0, &data));
    assert!(
        matches!(
            err,
            ApplyError::PastDeclaredSize {
                offset: 0,
                len: 6000,
                size: 5000,
                ..
            }
        ),
        "{err:?}"
    );
    fx.ok(file_chunk("new.db", 0, &data[..4096]));
    let err = fx.refuse(file_chunk("new.db", 4096, &data[4096..]));
    assert!(
        matches!(
            err,
            ApplyError::PastDeclaredSize {
                offset: 4096,
                len: 1904,
                size: 5000,
                ..
            }
        ),
        "{err:?}"
    );
    // One byte over.
    let err = fx.refuse(file_chunk("new.db", 4096, &data[4096..5001]));
    assert!(
        matches!(err, ApplyError::PastDeclaredSize { .. }),
        "{err:?}"
    );
    fx.ok(file_chunk("new.db", 4096, &data[4096..5000]));
    // Nothing more fits, not even one byte.
    let err = fx.refuse(file_chunk("new.db", 5000, &data[5000..5001]));
    assert!(
        matches!(err, ApplyError::PastDeclaredSize { .. }),
        "{err:?}"
    );
    fx.ok(file_end("new.db", 5000));
    assert_eq!(
        std::fs::read(fx.root().join("new.db")).expect("read"),
        &data[..5000]
    );
}

#[test]
fn a_chunk_for_an_unknown_file_is_refused() {
    let mut fx = populated();
    // No FileStart at all, even for a file the standby holds.
    for name in ["data.db", "never-started.db", "../escape.db"] {
        let err = fx.refuse(file_chunk(name, 0, b"hello"));
        assert!(
            matches!(&err, ApplyError::UnknownFile(n) if n == name),
            "{err:?}"
        );
        let err = fx.refuse(file_end(name, 5));
        assert!(
            matches!(&err, ApplyError::UnknownFile(n) if n == name),
            "{err:?}"
        );
    }
    // A FileStart for another file.
    fx.ok(file_start("a.db", 100, FileKind::Database));
    let err = fx.refuse(file_chunk("b.db", 0, b"hello"));
    assert!(
        matches!(&err, ApplyError::UnknownFile(n) if n == "b.db"),
        "{err:?}"
    );
    let err = fx.refuse(file_end("b.db", 0));
    assert!(matches!(&err, ApplyError::UnknownFile(_)), "{err:?}");
    // A finished file is not open any more.
    fx.ok(file_chunk("a.db", 0, &[7u8; 100]));
    fx.ok(file_end("a.db", 100));
    let err = fx.refuse(file_chunk("a.db", 100, b"late"));
    assert!(matches!(&err, ApplyError::UnknownFile(_)), "{err:?}");
}

#[test]
fn out_of_order_chunks_are_refused() {
    let mut fx = populated();
    let data = db_bytes(12288, 7);
    fx.ok(file_start("new.db", data.len() as u64, FileKind::Database));
    let err = fx.refuse(file_chunk("new.db", 4096, &data[4096..8192]));
    assert!(
        matches!(
            err,
            ApplyError::OutOfOrder {
                expected: 0,
                got: 4096,
                ..
            }
        ),
        "{err:?}"
    );
    fx.ok(file_chunk("new.db", 0, &data[..4096]));
    // A replay of the same chunk, one from the future, one overlapping.
    for (at, range) in [
        (0u64, 0..4096),
        (8192, 8192..12288),
        (4095, 4095..8191),
        (4097, 4097..8193),
    ] {
        let err = fx.refuse(file_chunk("new.db", at, &data[range]));
        assert!(
            matches!(err, ApplyError::OutOfOrder { expected: 4096, got, .. } if got == at),
            "{err:?}"
        );
    }
    fx.ok(file_chunk("new.db", 4096, &data[4096..8192]));
    fx.ok(file_chunk("new.db", 8192, &data[8192..]));
    fx.ok(file_end("new.db", data.len() as u64));
    assert_eq!(std::fs::read(fx.root().join("new.db")).expect("read"), data);
}

#[test]
fn a_bad_digest_is_refused_before_a_byte_is_written() {
    let mut fx = populated();
    let data = db_bytes(4096, 8);
    fx.ok(file_start("new.db", 4096, FileKind::Database));
    let good = blake3::hash(&data).as_bytes().to_vec();
    let mut flipped = good.clone();
    flipped[31] ^= 1;
    let mut corrupted = data.clone();
    corrupted[100] ^= 0x40;
    for (bytes, digest) in [
        (data.clone(), flipped.clone()),
        (data.clone(), Vec::new()),
        (data.clone(), good[..16].to_vec()),
        (data.clone(), vec![0u8; 32]),
        (corrupted, good.clone()), // flipped in transit
    ] {
        let err = fx.refuse(file_chunk_with_digest("new.db", 0, &bytes, digest));
        assert!(
            matches!(&err, ApplyError::Digest { what } if what.contains("new.db")),
            "{err:?}"
        );
        assert!(err.to_string().contains("blake3 mismatch"), "{err}");
    }
    fx.ok(file_chunk("new.db", 0, &data));
    fx.ok(file_end("new.db", 4096));

    // The same for the log.
    let (file, at, recs) = next_records(&fx.m, 30, 3);
    let mut bad = recs.clone();
    bad[20] ^= 1;
    let err = fx.refuse(log_chunk_full(file, at, &recs, flipped, LOG_FILE_SIZE));
    assert!(
        matches!(&err, ApplyError::Digest { what } if what.contains("log chunk")),
        "{err:?}"
    );
    let err = fx.refuse(log_chunk_full(
        file,
        at,
        &bad,
        blake3::hash(&recs).as_bytes().to_vec(),
        LOG_FILE_SIZE,
    ));
    assert!(matches!(err, ApplyError::Digest { .. }), "{err:?}");
    fx.ok(log_chunk(file, at, &recs));
}

#[test]
fn log_that_does_not_continue_the_standby_log_is_refused() {
    let mut fx = populated();
    let end = fx.m.tail().written;
    let last = fx.m.tail().last_record.expect("log");
    let (recs, _) = records(end.offset, last, 40, 2);
    let (next_img, _) = log_file(last, 50, 2);
    let cases = [
        (LogPosition::new(1, end.offset + 12), recs.clone()), // a hole
        (LogPosition::new(1, end.offset - 1), recs.clone()),  // overlapping
        (LogPosition::new(1, 0), recs.clone()),               // from the start again
        (LogPosition::new(3, 0), next_img.clone()),           // a whole file skipped
        (LogPosition::new(2, 28), recs.clone()),              // the next file, not at its start
        (LogPosition::new(0, 0), next_img.clone()),
        (LogPosition::new(u32::MAX, 0), next_img.clone()),
    ];
    for (at, data) in cases {
        let err = fx.refuse(log_chunk(at.file, at.offset, &data));
        assert!(
            matches!(err, ApplyError::LogGap { expected, got } if expected == end && got == at),
            "{at}: {err:?}"
        );
        assert!(err.to_string().contains("does not continue"), "{err}");
    }
    fx.ok(log_chunk(1, end.offset, &recs));
}

#[test]
fn log_bytes_that_are_not_valid_records_are_refused() {
    let mut fx = populated();
    let end = fx.m.tail().written;
    let last = fx.m.tail().last_record.expect("log");
    let (good, _) = records(end.offset, last, 60, 3);
    let first_len = synth::record(last, &body(60)).len();

    let mut bad_checksum = good.clone();
    bad_checksum[8] ^= 1;
    let mut torn = good.clone();
    for b in &mut torn[first_len + 14..first_len + 20] {
        *b = 0;
    }
    let (wrong_prev, _) = records(end.offset, last + 4, 60, 3);
    let mut short_len = good.clone();
    short_len[4..8].copy_from_slice(&8u32.to_le_bytes());
    let mut zero_len = good.clone();
    zero_len[4..8].copy_from_slice(&0u32.to_le_bytes());
    let mut huge_len = good.clone();
    huge_len[4..8].copy_from_slice(&u32::MAX.to_le_bytes());
    let cases: Vec<(&str, Vec<u8>)> = vec![
        ("garbage", db_bytes(300, 11)),
        ("bad checksum", bad_checksum),
        ("torn record", torn),
        ("prev does not point at the last record", wrong_prev),
        ("record cut short", good[..good.len() - 1].to_vec()),
        ("a header and nothing else", good[..12].to_vec()),
        ("length shorter than a header", short_len),
        ("zero length", zero_len),
        ("length past 4 GiB", huge_len),
        (
            "good records then zeros",
            [good.clone(), vec![0u8; 64]].concat(),
        ),
        ("empty", Vec::new()),
    ];
    for (what, data) in cases {
        let err = fx.refuse(log_chunk(end.file, end.offset, &data));
        assert!(
            matches!(err, ApplyError::InvalidLog { at, .. } if at == end),
            "{what}: {err:?}"
        );
        assert!(
            err.to_string()
                .contains("not a run of complete, verified records"),
            "{what}: {err}"
        );
    }
    // A declared log file size no log file can have.
    let err = fx.refuse(log_chunk_full(
        end.file,
        end.offset,
        &good,
        blake3::hash(&good).as_bytes().to_vec(),
        1 << 33,
    ));
    assert!(matches!(err, ApplyError::InvalidLog { .. }), "{err:?}");

    // The first chunk of the next file must start with a persist record
    // that points back at this file's last record.
    let (img, _) = log_file(last, 70, 2);
    let (not_persist, _) = records(0, last, 70, 2);
    let (wrong_back_pointer, _) = log_file(last + 1, 70, 2);
    let mut wrong_magic = img.clone();
    wrong_magic[12] ^= 1;
    for (what, data) in [
        ("no persist record", not_persist),
        ("wrong back pointer", wrong_back_pointer),
        ("wrong magic", wrong_magic),
    ] {
        let err = fx.refuse(log_chunk(2, 0, &data));
        assert!(
            matches!(err, ApplyError::InvalidLog { at, .. } if at == LogPosition::new(2, 0)),
            "{what}: {err:?}"
        );
    }
    fx.ok(log_chunk(end.file, end.offset, &good));
    let (img, _) = log_file(fx.m.tail().last_record.expect("log"), 70, 2);
    fx.ok(log_chunk(2, 0, &img));
    fx.m.sync().expect("sync");
    assert_eq!(fx.m.tail().durable, LogPosition::new(2, img.len() as u32));
}

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

/// The parts of the directory that hold data (not the receiving area).
fn stored(fx: &Fx) -> BTreeMap<String, String> {
    tree(&fx.root())
        .into_iter()
        .filter(|(k, _)| !k.starts_with(".tandem/incoming"))
        .collect()
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

/// blake3 of the last record before `end` in the bytes on disk: what the
/// primary compares with the Hello's `last_record_digest`.
fn digest_of_record_before(fx: &Fx, end: LogPosition) -> Vec<u8> {
    let bytes = fx.log_bytes(end.file);
    let w = logfile::walk(&bytes[..end.offset as usize], 0, None);
    assert_eq!(
        w.end, end.offset,
        "the log on disk does not verify to {end}"
    );
    let last = w.last_record.expect("records") as usize;
    blake3::hash(&bytes[last..end.offset as usize])
        .as_bytes()
        .to_vec()
}

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
    let disk = scan_tail(&fx.m.dir, &fx.m.state).expect("scan");
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
            Ok(_) => m
                .apply(file_chunk("new.db", 0, &data))
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

// Divergence refusal, staged replacement bases, crash-safe swaps and the
// log chain at open: a file of their own (this one is long enough).
#[path = "mirror_staging_tests.rs"]
mod staging;
