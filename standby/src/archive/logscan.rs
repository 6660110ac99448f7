//! Walking a backup's (or the mirror's) log files as one verified record
//! chain, and what the walk learns on the way: commit times for the
//! restorable window and BDB's earliest point-in-time limit.

use serde::{Deserialize, Serialize};
use std::fs::File;
use std::io;
use std::path::{Path, PathBuf};
use tandem_shared::logfile::{
    log_file_name, read_verified, WalkStop, PERSIST_RECORD_LEN, RECORD_HEADER_LEN,
};
use tandem_shared::LogPosition;

// BDB 5.3 log record types and layout (txn.src; checked against
// db5.3_printlog in the tests): every record body starts with rectype u32,
// txnid u32, prev_lsn (2 x u32).
pub(crate) const REC_TXN_REGOP: u32 = 10;
pub(crate) const REC_TXN_CKP: u32 = 11;
/// `__txn_regop.opcode` of a commit.
pub(crate) const TXN_COMMIT: u32 = 1;

/// A log that cannot be read, or whose records do not form one chain.
#[derive(Debug, thiserror::Error)]
pub enum ScanError {
    #[error("{what}: {source}")]
    Io { what: String, source: io::Error },
    #[error("{file}: {why}")]
    LogChain { file: String, why: String },
}

/// What a walk over a run of log files found.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct LogSummary {
    pub end: LogPosition,
    pub lg_max: u32,
    pub records: u64,
    pub commits: u64,
    pub first_commit_unix: Option<i64>,
    pub last_commit_unix: Option<i64>,
    pub earliest_checkpoint_unix: Option<i64>,
}

fn u32_at(b: &[u8], at: usize) -> Option<u32> {
    b.get(at..at + 4)
        .map(|s| u32::from_le_bytes([s[0], s[1], s[2], s[3]]))
}

/// Walks log files `first..=last` in `log_dir` as one verified record
/// chain: every record's checksum and back-pointer, across file
/// boundaries. With `end`, the last file's records must end exactly there.
/// Collects commit timestamps and BDB's earliest point-in-time limit: the
/// timestamp of the first checkpoint whose ckp_lsn is at or after
/// `ckp_floor` (default: the first record after the first file's persist
/// record, which is where `db_recover` starts reading).
pub fn scan_logs(
    log_dir: &Path,
    first: u32,
    last: u32,
    end: Option<u32>,
    ckp_floor: Option<LogPosition>,
) -> Result<LogSummary, ScanError> {
    scan_log_chain(
        &|n| log_dir.join(log_file_name(n)),
        first,
        last,
        end,
        ckp_floor,
        false,
    )
}

/// [`scan_logs`] over files found by `path_of`. With `stop_at_break`, a
/// later file that is missing or does not continue the chain ends the walk
/// (the summary's `end` says where) instead of failing it.
// Long function: one walk over the chain; the previous record and the break are the loop's
// state.
pub fn scan_log_chain(
    path_of: &dyn Fn(u32) -> PathBuf,
    first: u32,
    last: u32,
    end: Option<u32>,
    ckp_floor: Option<LogPosition>,
    stop_at_break: bool,
) -> Result<LogSummary, ScanError> {
    let mut s = LogSummary::default();
    let floor = ckp_floor.unwrap_or(LogPosition::new(first, PERSIST_RECORD_LEN));
    let mut prev_last: Option<u32> = None;
    for n in first..=last {
        let name = log_file_name(n);
        let chain = |why: String| ScanError::LogChain {
            file: name.clone(),
            why,
        };
        let io = |what: &str| {
            let what = format!("{what} {name}");
            move |source| ScanError::Io { what, source }
        };
        let f = match File::open(path_of(n)) {
            Ok(f) => f,
            Err(e) if stop_at_break && n > first && e.kind() == io::ErrorKind::NotFound => break,
            Err(e) => return Err(io("opening")(e)),
        };
        let mut expected = if n == first { None } else { prev_last };
        let mut from = 0u32;
        let mut last_record = None;
        loop {
            let v = read_verified(&f, from, expected, 4 << 20).map_err(io("reading"))?;
            if from == 0 {
                match (v.walk.records, v.walk.header) {
                    (0, _) if stop_at_break && n > first => return Ok(s),
                    (0, _) => {
                        return Err(chain(match v.walk.stop {
                            WalkStop::Invalid(why) if n > first => {
                                format!("does not continue log.{:010}: {why}", n - 1)
                            }
                            WalkStop::Invalid(why) => why.to_owned(),
                            _ => "holds no log records".to_owned(),
                        }))
                    }
                    (_, Some(h)) if s.lg_max == 0 => s.lg_max = h.lg_max,
                    _ => {}
                }
            }
            let mut pos = 0usize;
            while pos < v.bytes.len() {
                let len = u32_at(&v.bytes, pos + 4).unwrap_or(0) as usize;
                let at = LogPosition::new(n, from + pos as u32);
                if let Some(body) = v
                    .bytes
                    .get(pos + RECORD_HEADER_LEN as usize..pos + len)
                    .filter(|_| at.offset != 0)
                {
                    inspect_record(body, floor, &mut s);
                }
                pos += len.max(1);
            }
            s.records += u64::from(v.walk.records);
            if v.walk.records == 0 {
                break;
            }
            last_record = v.walk.last_record;
            expected = v.walk.last_record;
            from = v.walk.end;
            if !matches!(
                v.walk.stop,
                WalkStop::EndOfBuffer | WalkStop::Incomplete { .. }
            ) {
                break;
            }
        }
        if n == last {
            if let Some(want) = end {
                if from != want {
                    return Err(chain(format!(
                        "its verified records end at offset {from}, expected {want}"
                    )));
                }
            }
        }
        prev_last = last_record;
        s.end = LogPosition::new(n, from);
    }
    Ok(s)
}

/// Counts a commit (and its time) or notes a checkpoint's time, from a
/// record's body (after its header).
pub(crate) fn inspect_record(body: &[u8], floor: LogPosition, s: &mut LogSummary) {
    match u32_at(body, 0) {
        Some(REC_TXN_REGOP) => {
            if let (Some(TXN_COMMIT), Some(ts)) = (u32_at(body, 16), u32_at(body, 20)) {
                let ts = i64::from(ts as i32);
                s.commits += 1;
                s.first_commit_unix.get_or_insert(ts);
                s.last_commit_unix = Some(s.last_commit_unix.map_or(ts, |l| l.max(ts)));
            }
        }
        Some(REC_TXN_CKP) => {
            if let (Some(file), Some(offset), Some(ts)) =
                (u32_at(body, 16), u32_at(body, 20), u32_at(body, 32))
            {
                if s.earliest_checkpoint_unix.is_none() && LogPosition::new(file, offset) >= floor {
                    s.earliest_checkpoint_unix = Some(i64::from(ts as i32));
                }
            }
        }
        _ => {}
    }
}
