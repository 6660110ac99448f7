//! What a promote reads from disk when the page cache holds nothing of the
//! mirror (a failover after the standby's machine restarted, or after its
//! cache went to other work): the readiness check reads the same bytes
//! once, bypassing the page cache (`O_DIRECT`), and times it, so the
//! status's promotion estimate holds for a cold promote too.
//!
//! The check's own recovery cannot tell: it runs on a clone it has just
//! written, whose pages are all in the cache. Measured on the large bench's
//! 10.1 GiB mirror with the page cache dropped (2026-12-07): promote's
//! recovery of 0.8 MiB of log took 0.046 s where the check's took 0.02 s,
//! the difference being reads of the log and of the pages it changes,
//! one at a time.
//!
//! Reading with `O_DIRECT` leaves the cache as it was (nothing is evicted
//! for it, nothing is loaded), so measuring costs other work on the machine
//! only the reads themselves.

use std::collections::{HashMap, HashSet};
use std::fs::File;
use std::io;
use std::os::unix::fs::{FileExt, OpenOptionsExt};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

/// `O_DIRECT` wants the buffer, offsets and lengths aligned to the device's
/// logical block; 4096 covers every block size in use.
const ALIGN: u64 = 4096;
/// Log is read sequentially, with readahead: in bigger reads.
const LOG_READ: u64 = 1 << 20;

/// Bytes read, reads made, and the wall time they took.
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct ColdReads {
    pub bytes: u64,
    pub reads: u64,
    pub duration: Duration,
}

impl ColdReads {
    fn add(&mut self, other: ColdReads) {
        self.bytes += other.bytes;
        self.reads += other.reads;
        self.duration += other.duration;
    }
}

/// A buffer aligned for `O_DIRECT`.
struct Aligned {
    raw: Vec<u8>,
    start: usize,
    len: usize,
}

impl Aligned {
    fn new(len: u64) -> Self {
        let len = len as usize;
        let raw = vec![0u8; len + ALIGN as usize];
        let start = raw.as_ptr().align_offset(ALIGN as usize);
        Self { raw, start, len }
    }

    fn slice(&mut self, len: u64) -> &mut [u8] {
        let len = (len as usize).min(self.len);
        &mut self.raw[self.start..self.start + len]
    }
}

/// Reads the byte ranges `(offset, len)` of the file at `path`, bypassing
/// the page cache, each in reads of at most `max_read` bytes, in the order
/// given; times them. A range past the end of the file reads what there is.
/// Fails where the file system refuses `O_DIRECT` (tmpfs): then nothing is
/// known about cold reads.
pub fn read_uncached(path: &Path, ranges: &[(u64, u64)], max_read: u64) -> io::Result<ColdReads> {
    let file = File::options()
        .read(true)
        .custom_flags(libc::O_DIRECT)
        .open(path)?;
    let max_read = max_read.max(ALIGN) / ALIGN * ALIGN;
    let mut buf = Aligned::new(max_read);
    let mut out = ColdReads::default();
    let started = Instant::now();
    for &(offset, len) in ranges {
        let end = offset + len;
        let mut at = offset / ALIGN * ALIGN;
        while at < end {
            let want = (end - at).min(max_read).div_ceil(ALIGN) * ALIGN;
            let n = read_once(&file, buf.slice(want), at)?;
            out.reads += 1;
            out.bytes += n as u64;
            if (n as u64) < want {
                break;
            }
            at += want;
        }
    }
    out.duration = started.elapsed();
    Ok(out)
}

fn read_once(file: &File, buf: &mut [u8], at: u64) -> io::Result<usize> {
    loop {
        match file.read_at(buf, at) {
            Ok(n) => return Ok(n),
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
}

/// At most this much log is read to time it; the rest is counted at the
/// rate measured (a check must not read a long log twice).
const LOG_SAMPLE: u64 = 64 << 20;
/// At most this many pages are read to time them; the rest likewise.
const PAGE_SAMPLE: usize = 2048;

/// The log a promote's recovery reads, read bypassing the cache: `log`,
/// each file and how many of its bytes, in order. Returns the bytes there
/// are and the time to read them all, extrapolated past [`LOG_SAMPLE`].
pub fn log_reads(log: &[(PathBuf, u64)]) -> io::Result<(u64, Duration)> {
    let total: u64 = log.iter().map(|l| l.1).sum();
    let mut read = ColdReads::default();
    for (path, len) in log {
        let left = LOG_SAMPLE.saturating_sub(read.bytes);
        if left == 0 {
            break;
        }
        read.add(read_uncached(path, &[(0, (*len).min(left))], LOG_READ)?);
    }
    Ok((total, scaled(read.duration, total, read.bytes)))
}

/// The pages a promote's recovery reads, read bypassing the cache, one
/// read each (BDB's cache reads a page at a time, and they lie all over
/// the files): `pages`, each file, its page size and its pages in the
/// order the log names them. Returns how many and the time to read them
/// all, extrapolated from an even sample of [`PAGE_SAMPLE`].
pub fn page_reads(pages: &[(PathBuf, u32, Vec<u64>)]) -> io::Result<(u64, Duration)> {
    let total: usize = pages.iter().map(|p| p.2.len()).sum();
    let step = total.div_ceil(PAGE_SAMPLE).max(1);
    let (mut sampled, mut took) = (0u64, Duration::ZERO);
    for (path, page_size, numbers) in pages {
        let page = u64::from(*page_size);
        let ranges: Vec<(u64, u64)> = numbers
            .iter()
            .step_by(step)
            .map(|&n| (n * page, page))
            .collect();
        let r = read_uncached(path, &ranges, page)?;
        sampled += ranges.len() as u64;
        took += r.duration;
    }
    Ok((total as u64, scaled(took, total as u64, sampled)))
}

/// `took` for `done` of `total` units, scaled to all of them.
fn scaled(took: Duration, total: u64, done: u64) -> Duration {
    if done == 0 || total <= done {
        return took;
    }
    took.mul_f64(total as f64 / done as f64)
}

/// The pages the log from `from` to `to` in `log_dir` names, per database
/// file (`files`: uid in hex → path, page size and length), each once, in
/// the order it first appears: what a recovery of that log reads (the
/// first page of each page-changing record, [`tandem_shared::logrecords::Record::pgno`];
/// a split's other pages are left out, as are pages beyond a file's end).
/// File ids are resolved with every registration in the range, also those
/// after the record: the records before a checkpoint name files the
/// checkpoint registers again (recovery finds them the same way). A file
/// id registered for several files, or for none, is left out.
pub fn pages_named(
    log_dir: &Path,
    from: tandem_shared::LogPosition,
    to: tandem_shared::LogPosition,
    files: &HashMap<String, (PathBuf, u32, u64)>,
) -> Result<Vec<(PathBuf, u32, Vec<u64>)>, String> {
    use tandem_shared::logrecords::{read_range, RecordKind};
    let mut ids: HashMap<i32, HashSet<String>> = HashMap::new();
    let mut named: Vec<(i32, u32)> = Vec::new();
    let mut seen: HashSet<(i32, u32)> = HashSet::new();
    read_range(log_dir, from, to, |r, _| match &r.kind {
        RecordKind::Register { fileid, uid, .. } => {
            ids.entry(*fileid)
                .or_default()
                .insert(tandem_shared::to_hex(uid));
        }
        RecordKind::Page { fileid } => {
            if let Some(pgno) = r.pgno.filter(|&p| seen.insert((*fileid, p))) {
                named.push((*fileid, pgno));
            }
        }
        _ => {}
    })
    .map_err(|e| e.to_string())?;
    let mut out: HashMap<&str, Vec<u64>> = HashMap::new();
    for (fileid, pgno) in named {
        let Some(uid) = ids
            .get(&fileid)
            .filter(|u| u.len() == 1)
            .and_then(|u| u.iter().next())
        else {
            continue;
        };
        let Some((_, page_size, len)) = files.get(uid) else {
            continue;
        };
        let pgno = u64::from(pgno);
        if (pgno + 1) * u64::from(*page_size) <= *len {
            out.entry(uid.as_str()).or_default().push(pgno);
        }
    }
    let mut pages: Vec<(PathBuf, u32, Vec<u64>)> = out
        .into_iter()
        .filter_map(|(uid, numbers)| {
            let (path, page_size, _) = files.get(uid)?;
            Some((path.clone(), *page_size, numbers))
        })
        .collect();
    pages.sort_by(|a, b| a.0.cmp(&b.0));
    Ok(pages)
}

#[cfg(test)]
mod tests {
    use super::*;
    use tandem_shared::logfile::{log_file_name, synth, PERSIST_RECORD_LEN, RECORD_HEADER_LEN};
    use tandem_shared::LogPosition;

    fn body(rectype: u32, fields: &[u32]) -> Vec<u8> {
        let mut b = Vec::new();
        for v in [rectype, 1, 0, 0].iter().chain(fields) {
            b.extend_from_slice(&v.to_le_bytes());
        }
        b
    }

    #[test]
    fn the_pages_a_log_names_resolve_through_registrations_before_and_after() {
        let dir = tempfile::tempdir().unwrap();
        // __db_addrem: opcode, fileid, pgno.
        let addrem = |fileid: u32, pgno: u32| body(41, &[1, fileid, pgno]);
        // __dbreg_register: opcode, name, uid, fileid.
        let uid = [0xabu8; 20];
        let mut register = body(2, &[1, 4]);
        register.extend_from_slice(b"a.db");
        register.extend_from_slice(&20u32.to_le_bytes());
        register.extend_from_slice(&uid);
        register.extend_from_slice(&3i32.to_le_bytes());
        let bodies = [
            addrem(3, 7),
            register,
            addrem(3, 7),
            addrem(3, 2),
            addrem(9, 1),
            addrem(3, 50),
        ];
        let refs: Vec<&[u8]> = bodies.iter().map(|b| b.as_slice()).collect();
        std::fs::write(
            dir.path().join(log_file_name(1)),
            synth::file(0, 1 << 16, &refs, 8192),
        )
        .unwrap();
        let end = PERSIST_RECORD_LEN
            + bodies
                .iter()
                .map(|b| RECORD_HEADER_LEN + b.len() as u32)
                .sum::<u32>();
        let db = dir.path().join("a.db");
        let files = HashMap::from([(
            tandem_shared::to_hex(&uid),
            (db.clone(), 4096u32, 10 * 4096u64),
        )]);
        let pages = pages_named(
            dir.path(),
            LogPosition::new(1, 0),
            LogPosition::new(1, end),
            &files,
        )
        .unwrap();
        // Page 7 once (named before its file's registration too), page 2;
        // not file id 9 (never registered) nor page 50 (past the end).
        assert_eq!(pages, vec![(db, 4096, vec![7, 2])]);
    }

    #[test]
    fn uncached_reads_cover_the_ranges_and_stop_at_the_end() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("f");
        std::fs::write(&p, vec![7u8; 3 * 4096 + 100]).unwrap();
        let r = match read_uncached(&p, &[(0, 4096), (4096, 2 * 4096 + 100)], 8192) {
            Ok(r) => r,
            // Some file systems (tmpfs) refuse O_DIRECT: nothing to test.
            Err(e) if e.raw_os_error() == Some(libc::EINVAL) => return,
            Err(e) => panic!("{e}"),
        };
        // The second range: 8 KiB, then the last 100 bytes (a short read
        // of the block they lie in).
        assert_eq!(r.reads, 3);
        assert_eq!(r.bytes, 3 * 4096 + 100);
        // Ranges past the end read nothing more.
        let r = read_uncached(&p, &[(1 << 20, 4096)], 8192).unwrap();
        assert_eq!((r.reads, r.bytes), (1, 0));
    }
}
