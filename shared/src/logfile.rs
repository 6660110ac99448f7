//! The Berkeley DB 5.3 log file format, as far as Tandem needs it: file
//! names, the record header, and a walker that finds the end of the valid,
//! checksummed record chain. See `docs/BDB-NOTES.md` §2 for the measurements behind it.
//!
//! Why walk at all: BDB pre-allocates every log file to `lg_max - 1` bytes
//! and a reader of a live file can see later pages before earlier ones, so
//! neither the file size nor "the last non-zero byte" says what has been
//! written. Only a record whose length, back-pointer and checksum all agree
//! is known to be complete, and only such records are ever shipped.

use crate::pages::read_appending;
use std::fs::File;
use std::io;

/// `prev`, `len`, `chksum`: three little-endian u32s (unencrypted logs).
pub const RECORD_HEADER_LEN: u32 = 12;
/// Record 0 of every file: header, magic, version, lg_max, mode.
pub const PERSIST_RECORD_LEN: u32 = 28;
pub const LOG_MAGIC: u32 = 0x0004_0988;
pub const LOG_VERSION: u32 = 19;

/// `log.0000000001` and so on.
pub fn log_file_name(number: u32) -> String {
    format!("log.{number:010}")
}

/// The number of a log file name, or `None` if it is not one.
pub fn parse_log_file_name(name: &str) -> Option<u32> {
    let digits = name.strip_prefix("log.")?;
    if digits.len() != 10 || !digits.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    digits.parse().ok().filter(|n| *n > 0)
}

/// BDB's record checksum for unencrypted logs: `__ham_func4` over the body,
/// then mixed with the header's `prev` and `len` (BDB-NOTES.md §2, verified on every
/// record of a real 5.3 log).
///
/// Sixteen bytes at a time: `h*33 + b`, sixteen times over, equals
/// `h*33^16 + (b0*33^15 + ... + b15)` in wrapping u32 arithmetic, and the
/// inner sum does not depend on `h`, so it vectorises. The byte-at-a-time
/// loop waits on one multiply per byte (about 1.6 GB/s here; this runs at
/// about 4). Every log byte is checksummed by the primary's watcher, its
/// sessions and the standby, so this is most of the log's CPU.
pub fn record_checksum(prev: u32, len: u32, body: &[u8]) -> u32 {
    const POW: [u32; 17] = {
        let mut p = [1u32; 17];
        let mut i = 1;
        while i < 17 {
            p[i] = p[i - 1].wrapping_mul(33);
            i += 1;
        }
        p
    };
    let mut h: u32 = 0;
    let mut blocks = body.chunks_exact(16);
    for block in &mut blocks {
        let mut s: u32 = 0;
        for (i, &b) in block.iter().enumerate() {
            s = s.wrapping_add(u32::from(b).wrapping_mul(POW[15 - i]));
        }
        h = h.wrapping_mul(POW[16]).wrapping_add(s);
    }
    for &b in blocks.remainder() {
        h = h.wrapping_mul(33).wrapping_add(u32::from(b));
    }
    h ^ prev ^ len
}

fn u32_at(buf: &[u8], at: usize) -> Option<u32> {
    buf.get(at..at + 4)
        .map(|b| u32::from_le_bytes([b[0], b[1], b[2], b[3]]))
}

/// What the persist record at offset 0 says about its file.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct LogFileHeader {
    pub version: u32,
    pub lg_max: u32,
}

/// Why a walk stopped. Only `EndOfBuffer` and `Incomplete` mean "more may
/// come"; on a live file the others usually mean the same thing (a page not
/// yet visible reads as zeros), so callers re-read from `end` later.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum WalkStop {
    /// Every byte of the buffer belonged to verified records.
    EndOfBuffer,
    /// A header announces a record that extends past the buffer.
    Incomplete { record_len: u32 },
    /// `len == 0`: the unwritten (zero) tail of the file.
    ZeroLength,
    /// The header or the record does not verify.
    Invalid(&'static str),
}

/// The result of walking a buffer of log bytes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Walk {
    /// File offset just past the last verified record.
    pub end: u32,
    /// File offset of the last verified record (the next record's `prev`).
    pub last_record: Option<u32>,
    /// Number of verified records in the buffer.
    pub records: u32,
    /// Present when the walk started at offset 0.
    pub header: Option<LogFileHeader>,
    pub stop: WalkStop,
}

/// Walks the records in `buf`, which holds the file's bytes from offset
/// `start`. `expected_prev` is what the first record's `prev` must be, if the
/// caller knows (the previous record's offset; for record 0 of file n > 1,
/// the offset of file n-1's last record).
pub fn walk(buf: &[u8], start: u32, expected_prev: Option<u32>) -> Walk {
    let mut w = Walk {
        end: start,
        last_record: None,
        records: 0,
        header: None,
        stop: WalkStop::EndOfBuffer,
    };
    let mut expected_prev = expected_prev;
    let mut pos: usize = 0;
    loop {
        let offset = start + pos as u32;
        if pos == buf.len() {
            w.stop = WalkStop::EndOfBuffer;
            return w;
        }
        let (Some(prev), Some(len), Some(chksum)) =
            (u32_at(buf, pos), u32_at(buf, pos + 4), u32_at(buf, pos + 8))
        else {
            w.stop = WalkStop::Incomplete {
                record_len: RECORD_HEADER_LEN,
            };
            return w;
        };
        if len == 0 {
            w.stop = WalkStop::ZeroLength;
            return w;
        }
        if len < RECORD_HEADER_LEN {
            w.stop = WalkStop::Invalid("record length shorter than its header");
            return w;
        }
        if offset == 0 && len != PERSIST_RECORD_LEN {
            w.stop = WalkStop::Invalid("first record is not a persist record");
            return w;
        }
        if offset.checked_add(len).is_none() {
            w.stop = WalkStop::Invalid("record runs past 4 GiB");
            return w;
        }
        let Some(record) = buf.get(pos..pos + len as usize) else {
            w.stop = WalkStop::Incomplete { record_len: len };
            return w;
        };
        if let Some(want) = expected_prev {
            if prev != want {
                w.stop = WalkStop::Invalid("record's prev does not point at the previous record");
                return w;
            }
        }
        if record_checksum(prev, len, &record[RECORD_HEADER_LEN as usize..]) != chksum {
            w.stop = WalkStop::Invalid("record checksum mismatch");
            return w;
        }
        if offset == 0 {
            let magic = u32_at(record, 12).unwrap_or(0);
            if magic != LOG_MAGIC {
                w.stop = WalkStop::Invalid(
                    "persist record has the wrong magic (encrypted or not a BDB log)",
                );
                return w;
            }
            w.header = Some(LogFileHeader {
                version: u32_at(record, 16).unwrap_or(0),
                lg_max: u32_at(record, 20).unwrap_or(0),
            });
        }
        w.records += 1;
        w.last_record = Some(offset);
        expected_prev = Some(offset);
        pos += len as usize;
        w.end = offset + len;
    }
}

/// Default read size of the file walker.
const READ_CHUNK: usize = 1 << 20;

/// Verified record bytes read from a log file.
#[derive(Debug, Clone)]
pub struct VerifiedRecords {
    /// The bytes `[from, walk.end)`, all of them complete, verified records.
    pub bytes: Vec<u8>,
    pub walk: Walk,
}

/// First read size of `read_verified`: a live tail usually has a few
/// records to give, and the tail is read every few milliseconds, so a
/// small first read keeps polling cheap; it grows while records keep coming.
const FIRST_READ: usize = 16 << 10;
/// A record length beyond this is treated as damage, not read.
const MAX_RECORD: u32 = 256 << 20;

/// Reads a log file from `from` and returns up to about `max_bytes` of
/// verified records (more if a single record is larger). Fewer bytes than
/// asked means the verified end of the file was reached for now.
pub fn read_verified(
    file: &File,
    from: u32,
    expected_prev: Option<u32>,
    max_bytes: usize,
) -> io::Result<VerifiedRecords> {
    let max_bytes = max_bytes.max(RECORD_HEADER_LEN as usize);
    let mut want = FIRST_READ.min(max_bytes);
    let mut buf: Vec<u8> = Vec::new();
    let mut total = walk(&[], from, expected_prev);
    loop {
        // Growing reads only the new part and walks on from the verified
        // end; what was walked is not walked again.
        read_appending(file, &mut buf, u64::from(from), want)?;
        let done = (total.end - from) as usize;
        let w = walk(&buf[done..], total.end, total.last_record.or(expected_prev));
        total = Walk {
            end: w.end,
            last_record: w.last_record.or(total.last_record),
            records: total.records + w.records,
            header: total.header.or(w.header),
            stop: w.stop,
        };
        // The buffer was filled and the walk ran to its end: there may be
        // more, up to max_bytes, or a single record larger than the buffer.
        if buf.len() == want {
            let larger = match total.stop {
                WalkStop::EndOfBuffer if want < max_bytes => Some((want * 8).min(max_bytes)),
                WalkStop::Incomplete { record_len }
                    if total.records == 0
                        && record_len as usize > want
                        && record_len <= MAX_RECORD =>
                {
                    Some(record_len as usize)
                }
                WalkStop::Incomplete { .. } if want < max_bytes => Some((want * 8).min(max_bytes)),
                _ => None,
            };
            if let Some(larger) = larger {
                want = larger;
                continue;
            }
        }
        buf.truncate((total.end - from) as usize);
        return Ok(VerifiedRecords {
            bytes: buf,
            walk: total,
        });
    }
}

/// Walks a whole log file from offset 0 and returns where its verified
/// records end.
pub fn walk_file(file: &File, expected_prev: Option<u32>) -> io::Result<Walk> {
    walk_from(file, 0, expected_prev)
}

/// Walks a log file on from `from`, a record boundary already verified
/// (with `expected_prev` the offset of the record before it), and returns
/// where its verified records end.
pub fn walk_from(file: &File, from: u32, expected_prev: Option<u32>) -> io::Result<Walk> {
    let mut total = walk(&[], from, expected_prev);
    // Past offset 0 the record before `from` is in this file: it stays the
    // last record if nothing follows it.
    if from > 0 {
        total.last_record = expected_prev;
    }
    let (mut from, mut prev) = (from, expected_prev);
    loop {
        let w = read_verified(file, from, prev, READ_CHUNK)?.walk;
        total = Walk {
            end: w.end,
            last_record: w.last_record.or(total.last_record),
            records: total.records + w.records,
            header: total.header.or(w.header),
            stop: w.stop,
        };
        let more = matches!(w.stop, WalkStop::EndOfBuffer | WalkStop::Incomplete { .. });
        if w.records == 0 || !more {
            return Ok(total);
        }
        from = w.end;
        prev = w.last_record;
    }
}

/// Builds records the way BDB lays them out. Used by tests to make logs
/// without libdb; the real-log tests in `tests/` check the same walker
/// against files written by BDB itself.
pub mod synth {
    use super::*;

    pub fn record(prev: u32, body: &[u8]) -> Vec<u8> {
        let len = RECORD_HEADER_LEN + body.len() as u32;
        let mut r = Vec::with_capacity(len as usize);
        r.extend_from_slice(&prev.to_le_bytes());
        r.extend_from_slice(&len.to_le_bytes());
        r.extend_from_slice(&record_checksum(prev, len, body).to_le_bytes());
        r.extend_from_slice(body);
        r
    }

    /// A log file image: persist record plus `bodies`, then zeros to `size`.
    pub fn file(prev_of_first: u32, lg_max: u32, bodies: &[&[u8]], size: usize) -> Vec<u8> {
        let mut persist = Vec::new();
        for v in [LOG_MAGIC, LOG_VERSION, lg_max, 0] {
            persist.extend_from_slice(&v.to_le_bytes());
        }
        let mut out = record(prev_of_first, &persist);
        let mut last = 0u32;
        for body in bodies {
            let at = out.len() as u32;
            out.extend_from_slice(&record(last, body));
            last = at;
        }
        out.resize(size.max(out.len()), 0);
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn checksum_matches_bdbs_byte_at_a_time_definition() {
        let naive = |prev: u32, len: u32, body: &[u8]| {
            let mut h: u32 = 0;
            for &b in body {
                h = h.wrapping_mul(33).wrapping_add(u32::from(b));
            }
            h ^ prev ^ len
        };
        let data: Vec<u8> = (0..5000u32)
            .map(|i| (i.wrapping_mul(2_654_435_761) >> 11) as u8)
            .collect();
        for n in (0..40).chain([255, 256, 257, 1000, 4095, 5000]) {
            assert_eq!(
                record_checksum(7, n as u32 + 12, &data[..n]),
                naive(7, n as u32 + 12, &data[..n]),
                "length {n}"
            );
        }
        assert_eq!(
            record_checksum(0, 12, &[0xff; 64]),
            naive(0, 12, &[0xff; 64])
        );
    }

    /// A 4 MiB log file of 3,000 records of 1,000 bytes (more than one read).
    fn big_log_file() -> (tempfile::TempDir, std::path::PathBuf, Vec<u8>) {
        let body = vec![5u8; 1000];
        let bodies: Vec<&[u8]> = (0..3000).map(|_| body.as_slice()).collect();
        let img = synth::file(0, 4 << 20, &bodies, 4 << 20);
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("log.0000000001");
        std::fs::write(&p, &img).unwrap();
        (dir, p, img)
    }

    #[test]
    fn walks_on_from_a_verified_point() {
        let (_dir, p, img) = big_log_file();
        let f = File::open(&p).unwrap();
        let whole = walk_file(&f, None).unwrap();
        let part = walk(&img[..28 + 10 * 1012], 0, None);
        let rest = walk_from(&f, part.end, part.last_record).unwrap();
        assert_eq!(
            (rest.end, rest.last_record, rest.records),
            (whole.end, whole.last_record, 2990)
        );
        // Nothing after the point: the record before it stays the last one.
        let none = walk_from(&f, whole.end, whole.last_record).unwrap();
        assert_eq!(
            (none.end, none.last_record, none.records),
            (whole.end, whole.last_record, 0)
        );
    }

    #[test]
    fn names_round_trip() {
        assert_eq!(log_file_name(7), "log.0000000007");
        assert_eq!(parse_log_file_name("log.0000000007"), Some(7));
        assert_eq!(parse_log_file_name("log.7"), None);
        assert_eq!(parse_log_file_name("log.000000000x"), None);
        assert_eq!(parse_log_file_name("log.0000000000"), None);
    }

    #[test]
    fn walks_to_the_end_of_valid_records() {
        let img = synth::file(0, 4096, &[b"hello", b"world!!"], 4095);
        let w = walk(&img, 0, None);
        assert_eq!(w.records, 3);
        assert_eq!(w.end, 28 + 17 + 19);
        assert_eq!(w.last_record, Some(28 + 17));
        assert_eq!(w.stop, WalkStop::ZeroLength);
        assert_eq!(
            w.header,
            Some(LogFileHeader {
                version: LOG_VERSION,
                lg_max: 4096
            })
        );
    }

    #[test]
    fn stops_at_a_torn_record() {
        let mut img = synth::file(0, 4096, &[b"aaaa", &[7u8; 300]], 4095);
        // A hole in the middle of the second record, as a racing reader sees.
        for b in &mut img[28 + 16 + 100..28 + 16 + 200] {
            *b = 0;
        }
        let w = walk(&img, 0, None);
        assert_eq!(w.end, 28 + 16);
        assert_eq!(w.stop, WalkStop::Invalid("record checksum mismatch"));
    }

    #[test]
    fn stops_at_a_partial_record_and_resumes() {
        let img = synth::file(0, 4096, &[b"aaaa", b"bbbbbbbb"], 0);
        let cut = img.len() - 3;
        let w = walk(&img[..cut], 0, None);
        assert_eq!(w.end, 28 + 16);
        assert!(matches!(w.stop, WalkStop::Incomplete { record_len: 20 }));
        let rest = walk(&img[w.end as usize..], w.end, w.last_record);
        assert_eq!(rest.end as usize, img.len());
        assert_eq!(rest.stop, WalkStop::EndOfBuffer);
    }

    #[test]
    fn checks_the_prev_chain() {
        let img = synth::file(1234, 4096, &[b"x"], 0);
        assert_eq!(walk(&img, 0, Some(1234)).records, 2);
        let w = walk(&img, 0, Some(999));
        assert_eq!(w.records, 0);
        assert!(matches!(w.stop, WalkStop::Invalid(_)));
    }

    #[test]
    fn rejects_a_file_that_is_not_a_log() {
        let mut img = synth::file(0, 4096, &[], 0);
        img[12] ^= 1; // magic
        let w = walk(&img, 0, None);
        assert_eq!(w.records, 0);
    }

    #[test]
    fn walks_a_file_bigger_than_one_read() {
        let (_dir, p, _) = big_log_file();
        let w = walk_file(&File::open(&p).unwrap(), None).unwrap();
        assert_eq!(w.records, 3001);
        assert_eq!(w.end, 28 + 3000 * 1012);
    }
}
