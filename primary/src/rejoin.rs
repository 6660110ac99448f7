//! A rejoining standby (`Hello.rejoin`): what it sends before the primary
//! answers (the digests of its pages and of its log files), and where the
//! page-delta base's log starts so that the standby can find, record for
//! record, where its history leaves this primary's.

use std::collections::BTreeMap;
use std::fs::File;
use std::time::Duration;
use tandem_shared::envlayout::EnvLayout;
use tandem_shared::logfile::read_verified;
use tandem_shared::wire::{standby_message, LogFileDigest, StandbyMessage};
use tandem_shared::LogPosition;
use tonic::{Status, Streaming};

/// How long a rejoining standby has to send the digests of its pages.
const DIGESTS_TIMEOUT: Duration = Duration::from_secs(600);

/// What a rejoining standby sends after its Hello: the digests of its
/// pages, then a RebaseRequest with the digests of its log files.
#[derive(Default)]
pub struct RejoinDigests {
    pub pages: BTreeMap<String, Vec<u8>>,
    pub log_files: Vec<LogFileDigest>,
}

pub async fn rejoin_digests(
    inbound: &mut Streaming<StandbyMessage>,
) -> Result<RejoinDigests, Status> {
    let mut theirs = RejoinDigests::default();
    let collect = async {
        loop {
            match inbound.message().await? {
                Some(StandbyMessage {
                    kind: Some(standby_message::Kind::PageDigests(d)),
                }) => crate::base_copy::merge_digests(&mut theirs.pages, d),
                Some(StandbyMessage {
                    kind: Some(standby_message::Kind::RebaseRequest(r)),
                }) => {
                    theirs.log_files = r.log_files;
                    return Ok(());
                }
                Some(_) => return Err(Status::invalid_argument(
                    "a rejoining standby sends page digests, then a RebaseRequest, after its Hello",
                )),
                None => return Err(Status::cancelled("the standby went away")),
            }
        }
    };
    match tokio::time::timeout(DIGESTS_TIMEOUT, collect).await {
        Ok(r) => r.map(|()| theirs),
        Err(_) => Err(Status::deadline_exceeded(
            "the rejoining standby's page digests did not arrive within 600 s",
        )),
    }
}

/// For a rejoin: the newest of the standby's log files (`theirs`: their
/// verified records' length and blake3) whose records this primary's file
/// of the same number starts with, no later than `boundary` (a base needs
/// its log from there); the first log file the new base's log may start
/// at so that it covers where the two histories part. None shared: the
/// standby's oldest file. `boundary`'s file when a file from there on is
/// gone from this primary.
pub fn newest_shared_log_file(
    layout: &EnvLayout,
    theirs: &[tandem_shared::wire::LogFileDigest],
    boundary: LogPosition,
) -> u32 {
    let Ok(files) = layout.log_files() else {
        return boundary.file;
    };
    let shares = |d: &tandem_shared::wire::LogFileDigest| -> bool {
        let Ok(f) = File::open(layout.log_path(d.file)) else {
            return false;
        };
        match read_verified(&f, 0, None, d.len as usize) {
            Ok(r) => {
                r.bytes.len() == d.len as usize
                    && blake3::hash(&r.bytes).as_bytes()[..] == d.blake3[..]
            }
            Err(_) => false,
        }
    };
    let mut newest_first: Vec<_> = theirs.iter().filter(|d| d.file <= boundary.file).collect();
    newest_first.sort_by_key(|d| std::cmp::Reverse(d.file));
    // None shared: the histories part in the standby's oldest file (or
    // before it, where the standby holds nothing).
    let start = newest_first
        .iter()
        .find(|d| shares(d))
        .or(newest_first.last())
        .map_or(boundary.file, |d| d.file);
    let present = (start..=boundary.file).all(|n| files.binary_search(&n).is_ok());
    if present {
        start
    } else {
        boundary.file
    }
}
