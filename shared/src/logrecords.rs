//! Reading Berkeley DB 5.3 log records far enough to say which database
//! files they change, which transactions they belong to, and which file id
//! names which file. Promote uses it to verify only the databases the log
//! changed since the last verified readiness check.
//!
//! Rules this file keeps:
//! - It never guesses. A record type it does not know, a file operation
//!   (create, rename, remove, write by name), an in-memory database or a
//!   record that does not decode is [`RecordKind::Doubt`]: callers then fall
//!   back to verifying everything.
//! - Every record read is complete and checksummed ([`crate::logfile`]'s
//!   rules: length, checksum, each record's `prev` pointing at the one
//!   before, also across files), and a range must end exactly where the
//!   caller says, or the read fails.
//! - The layouts are BDB 5.3's (`btree.src`, `db.src`, `hash.src`, `qam.src`,
//!   `heap.src`, `crdel.src`, `dbreg.src`, `txn.src`): after the 12-byte
//!   header, `rectype`, `txnid`, `prev_lsn`, then the fields. A test in
//!   `tests/` checks every record of real logs against `db5.3_printlog`.

use crate::logfile::{log_file_name, record_checksum, PERSIST_RECORD_LEN, RECORD_HEADER_LEN};
use crate::LogPosition;
use std::fs::File;
use std::os::unix::fs::FileExt;
use std::path::Path;

/// Bytes of a file's unique id (`DB_FILE_ID_LEN`), as in the meta page at
/// byte 52 and in `__dbreg_register` records.
pub const FILE_UID_LEN: usize = 20;
/// Where the unique id sits in a database file's meta page (`DBMETA.uid`).
pub const META_UID_OFFSET: usize = 52;

/// What a record means for the databases.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum RecordKind {
    /// Changes pages of the database with this log file id.
    Page { fileid: i32 },
    /// `__dbreg_register`: log file id `fileid` names the file with this
    /// unique id (open, close, checkpoint, ...).
    Register {
        opcode: u32,
        fileid: i32,
        uid: Vec<u8>,
        name: String,
    },
    /// `__txn_regop`: the transaction committed or aborted.
    Resolve { opcode: u32 },
    /// `__txn_ckp`: no transaction active at this checkpoint began before
    /// `ckp_lsn`.
    Checkpoint { ckp_lsn: LogPosition },
    /// `__txn_child`: the child committed into this (parent) transaction.
    Child { child: u32 },
    /// Changes no database page (recycle, prepare, debug).
    Harmless,
    /// Not provably one of the above: the caller must assume anything.
    Doubt { why: String },
}

/// One record of the log.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Record {
    pub lsn: LogPosition,
    pub len: u32,
    pub rectype: u32,
    pub txnid: u32,
    pub prev_lsn: LogPosition,
    pub kind: RecordKind,
    /// For a page-changing record, the field after its file id: the page
    /// it changes for the common types (`__db_addrem`, `__db_big`, the
    /// btree split, adj, cdel, repl and the hash insdel, newpage records
    /// carry it there), something else for a few (an LSN, a mode). What a
    /// recovery reads, give or take those: for estimates only, never for
    /// a decision about what to verify.
    pub pgno: Option<u32>,
}

#[derive(Debug, thiserror::Error)]
pub enum ReadError {
    #[error("reading {file}: {source}")]
    Io {
        file: String,
        source: std::io::Error,
    },
    #[error("log record at {at}: {why}")]
    Bad { at: LogPosition, why: String },
}

fn u32_at(b: &[u8], at: usize) -> Option<u32> {
    b.get(at..at + 4)
        .map(|s| u32::from_le_bytes([s[0], s[1], s[2], s[3]]))
}

/// Where the `fileid` field of a page-changing record type sits, counted
/// from the first field (0: it is the first field; 4: after an opcode).
fn fileid_field(rectype: u32) -> Option<usize> {
    Some(match rectype {
        // btree.src: split, rsplit, adj, cadjust, cdel, repl, root, curadj,
        // rcuradj, irep.
        62 | 63 | 55 | 56 | 57 | 58 | 59 | 64 | 65 | 67 => 0,
        // db.src: realloc, ovref, noop, pg_alloc, pg_free, pg_freedata,
        // pg_init, pg_sort, pg_trunc, relink, merge, pgno; crdel.src: metasub.
        36 | 44 | 48 | 49 | 50 | 52 | 60 | 61 | 66 | 147 | 148 | 149 | 142 => 0,
        // hash.src: splitdata, replace, copypage, metagroup, groupalloc,
        // curadj, chgpg, changeslot, contract.
        24 | 25 | 28 | 29 | 32 | 33 | 34 | 35 | 37 => 0,
        // qam.src: del, delext, add, incfirst; heap.src: pg_alloc,
        // trunc_meta, trunc_page.
        79 | 80 | 83 | 84 | 152 | 153 | 154 => 0,
        // opcode first: db addrem, big, relink (4.2); hash insdel, newpage;
        // qam mvptr; heap addrem.
        41 | 43 | 45 | 21 | 22 | 85 | 151 => 4,
        _ => return None,
    })
}

/// Decodes one record's body (the bytes after the 12-byte header).
pub fn decode(lsn: LogPosition, len: u32, body: &[u8]) -> Result<Record, String> {
    let (Some(rectype), Some(txnid), Some(pf), Some(po)) = (
        u32_at(body, 0),
        u32_at(body, 4),
        u32_at(body, 8),
        u32_at(body, 12),
    ) else {
        return Err("record shorter than its type, transaction and prev_lsn".into());
    };
    let fields = &body[16..];
    let field =
        |at: usize| u32_at(fields, at).ok_or_else(|| format!("record type {rectype} is truncated"));
    let doubt = |why: &str| RecordKind::Doubt {
        why: format!("{why} (record type {rectype})"),
    };
    let pgno = fileid_field(rectype).and_then(|at| u32_at(fields, at + 4));
    let kind = if rectype & 0x8000_0000 != 0 {
        doubt("a debug-only record")
    } else if let Some(at) = fileid_field(rectype) {
        RecordKind::Page {
            fileid: field(at)? as i32,
        }
    } else {
        match rectype {
            2 => {
                // opcode, name (u32 size + bytes), uid (likewise), fileid,
                // ftype, meta_pgno, id.
                let opcode = field(0)?;
                let name_len = field(4)? as usize;
                let name = fields
                    .get(8..8 + name_len)
                    .ok_or("register record's name is truncated")?;
                let at = 8 + name_len;
                let uid_len = field(at)? as usize;
                let uid = fields
                    .get(at + 4..at + 4 + uid_len)
                    .ok_or("register record's uid is truncated")?;
                let fileid = field(at + 4 + uid_len)? as i32;
                let name = String::from_utf8_lossy(name)
                    .trim_end_matches('\0')
                    .to_owned();
                RecordKind::Register {
                    opcode,
                    fileid,
                    uid: uid.to_vec(),
                    name,
                }
            }
            10 => RecordKind::Resolve { opcode: field(0)? },
            11 => RecordKind::Checkpoint {
                ckp_lsn: LogPosition::new(field(0)?, field(4)?),
            },
            12 => RecordKind::Child { child: field(0)? },
            // __txn_prepare (the transaction stays unresolved), recycle,
            // __db_debug.
            13 | 14 | 47 => RecordKind::Harmless,
            // __db_cksum: recovery refuses; file operations and in-memory
            // databases change files by name.
            51 => doubt("a page checksum failure record"),
            138..=141 | 143..=146 | 150 => doubt("a file operation"),
            _ => doubt("an unknown record type"),
        }
    };
    Ok(Record {
        lsn,
        len,
        rectype,
        txnid,
        prev_lsn: LogPosition::new(pf, po),
        kind,
        pgno,
    })
}

/// Reads every record of the log in `log_dir` from `from` (a record
/// boundary) up to `to`, where the last record read must end, calling `each`
/// with each record and its bytes (header included). The persist record at
/// the start of each file is checked, not passed on. `from == to` reads
/// nothing.
// Long function: one walk across files, whose checks (length, prev chain,
// checksum, persist record, the exact end) read best in the order BDB
// writes a record.
pub fn read_range(
    log_dir: &Path,
    from: LogPosition,
    to: LogPosition,
    mut each: impl FnMut(&Record, &[u8]),
) -> Result<(), ReadError> {
    let bad = |at: LogPosition, why: &str| ReadError::Bad {
        at,
        why: why.to_owned(),
    };
    if to < from {
        return Err(bad(
            from,
            &format!("the range ends at {to}, before it starts"),
        ));
    }
    let mut at = from;
    // The offset of the last record read, which the next one's prev names.
    let mut prev: Option<u32> = None;
    while at < to {
        let name = log_file_name(at.file);
        let path = log_dir.join(&name);
        let io = |source| ReadError::Io {
            file: name.clone(),
            source,
        };
        let file = File::open(&path).map_err(io)?;
        let size = file.metadata().map_err(io)?.len();
        let start = u64::from(at.offset);
        let end = if to.file == at.file {
            u64::from(to.offset)
        } else {
            size
        };
        let mut buf = vec![0u8; end.saturating_sub(start) as usize];
        file.read_exact_at(&mut buf, start).map_err(io)?;
        let mut pos = 0usize;
        loop {
            let here = LogPosition::new(at.file, at.offset + pos as u32);
            if here >= to {
                return Ok(());
            }
            let (Some(p), Some(len), Some(sum)) = (
                u32_at(&buf, pos),
                u32_at(&buf, pos + 4),
                u32_at(&buf, pos + 8),
            ) else {
                break;
            };
            if len == 0 {
                break;
            }
            if len < RECORD_HEADER_LEN || pos + len as usize > buf.len() {
                return Err(bad(here, "record length runs past the range"));
            }
            if prev.is_some_and(|want| want != p) {
                return Err(bad(
                    here,
                    "record's prev does not point at the record before",
                ));
            }
            let bytes = &buf[pos..pos + len as usize];
            let body = &bytes[RECORD_HEADER_LEN as usize..];
            if record_checksum(p, len, body) != sum {
                return Err(bad(here, "record checksum mismatch"));
            }
            if here.offset == 0 {
                if len != PERSIST_RECORD_LEN {
                    return Err(bad(
                        here,
                        "first record of the file is not a persist record",
                    ));
                }
            } else {
                let record = decode(here, len, body).map_err(|why| bad(here, &why))?;
                each(&record, bytes);
            }
            prev = Some(here.offset);
            pos += len as usize;
        }
        // The rest of this file is unwritten: the log goes on in the next.
        if to.file == at.file {
            return Err(bad(
                LogPosition::new(at.file, at.offset + pos as u32),
                &format!("the log ends before {to}"),
            ));
        }
        at = LogPosition::new(at.file + 1, 0);
    }
    Ok(())
}

/// The unique id in a database file's meta page, if it has one.
pub fn file_uid(meta_page: &[u8]) -> Option<[u8; FILE_UID_LEN]> {
    meta_page
        .get(META_UID_OFFSET..META_UID_OFFSET + FILE_UID_LEN)?
        .try_into()
        .ok()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::logfile::synth;

    fn body(rectype: u32, txnid: u32, fields: &[u8]) -> Vec<u8> {
        let mut b = Vec::new();
        b.extend_from_slice(&rectype.to_le_bytes());
        b.extend_from_slice(&txnid.to_le_bytes());
        b.extend_from_slice(&[0; 8]);
        b.extend_from_slice(fields);
        b
    }

    #[test]
    fn decodes_the_file_id_where_each_layout_puts_it() {
        let at = LogPosition::new(1, 28);
        let repl = body(58, 7, &5i32.to_le_bytes());
        assert_eq!(
            decode(at, 0, &repl).unwrap().kind,
            RecordKind::Page { fileid: 5 }
        );
        // No page number after the file id: none.
        assert_eq!(decode(at, 0, &repl).unwrap().pgno, None);
        let mut f = 1u32.to_le_bytes().to_vec();
        f.extend_from_slice(&3i32.to_le_bytes());
        f.extend_from_slice(&77u32.to_le_bytes());
        let addrem = decode(at, 0, &body(41, 7, &f)).unwrap();
        assert_eq!(addrem.kind, RecordKind::Page { fileid: 3 });
        assert_eq!(addrem.pgno, Some(77));
        assert!(matches!(
            decode(at, 0, &body(146, 7, &[0; 16])).unwrap().kind,
            RecordKind::Doubt { .. }
        ));
        assert!(matches!(
            decode(at, 0, &body(999, 7, &[])).unwrap().kind,
            RecordKind::Doubt { .. }
        ));
        assert!(decode(at, 0, &body(58, 7, &[1])).is_err());
    }

    #[test]
    fn a_range_must_end_where_asked_and_every_record_verify() {
        let dir = tempfile::tempdir().unwrap();
        let a = body(58, 1, &2i32.to_le_bytes());
        let b = body(10, 1, &1u32.to_le_bytes());
        let file = synth::file(0, 1 << 16, &[&a, &b], 4096);
        std::fs::write(dir.path().join(log_file_name(1)), &file).unwrap();
        let first = LogPosition::new(1, PERSIST_RECORD_LEN);
        let end = first.offset + (12 + a.len() + 12 + b.len()) as u32;
        let mut seen = Vec::new();
        read_range(
            dir.path(),
            LogPosition::new(1, 0),
            LogPosition::new(1, end),
            |r, _| seen.push(r.kind.clone()),
        )
        .unwrap();
        assert_eq!(
            seen,
            vec![
                RecordKind::Page { fileid: 2 },
                RecordKind::Resolve { opcode: 1 }
            ]
        );
        // Past the end of the records, and in the middle of one: refused.
        assert!(read_range(dir.path(), first, LogPosition::new(1, end + 12), |_, _| {}).is_err());
        assert!(read_range(dir.path(), first, LogPosition::new(1, end - 1), |_, _| {}).is_err());
        // A flipped byte in a record: refused.
        let mut damaged = file.clone();
        damaged[first.offset as usize + 20] ^= 1;
        std::fs::write(dir.path().join(log_file_name(1)), &damaged).unwrap();
        assert!(read_range(dir.path(), first, LogPosition::new(1, end), |_, _| {}).is_err());
    }
}
