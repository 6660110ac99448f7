//! "Bad input gets a clear error and changes nothing": `Mirror::apply` driven
//! with crafted primary messages on a temporary directory.
//!
//! Every refusal is checked the same way (`refuse`): the typed error is the
//! expected one, its message is not empty, and neither the standby
//! directory, nor the directory next to it, nor the mirror's state and log
//! tail changed by a single byte. Each test also shows the mirror still
//! accepts good data after refusing bad data.
//!
//! This file holds the shared fixture (`Fx`, the message and log builders,
//! `populated`); the tests are child modules, one file per topic:
//! `names.rs` (file names, symlinks), `chunks.rs` (file and log chunks),
//! `session.rs` (environment, epoch, order, resuming, a full disk),
//! `staging.rs` (new bases) and `zstd.rs` (compressed chunks).

// Messages are built with `..Default::default()` even where every field is
// given today: the protocol grows fields, the tests set what they mean.
#![allow(clippy::needless_update)]

use super::*;
use crate::mirror::apply_error::MAX_FILE_SIZE;
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
/// BDB's log files are `lg_max - 1` bytes (BDB-NOTES.md §2).
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

/// The parts of the directory that hold data (not the receiving area).
fn stored(fx: &Fx) -> BTreeMap<String, String> {
    tree(&fx.root())
        .into_iter()
        .filter(|(k, _)| !k.starts_with(".tandem/incoming"))
        .collect()
}

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

// The tests, one file per topic (together they were too long for one);
// all use the fixtures above.
mod names;

mod chunks;

mod session;

// Divergence refusal, staged replacement bases, crash-safe swaps and the
// log chain at open: a file of their own (this one is long enough).
mod staging;

// zstd-encoded chunks: decoded before the digest check, refused whole when
// they lie.
mod zstd;
