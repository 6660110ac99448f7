//! Waiting until a commit is durable on standbys: the primary's answer to
//! PostgreSQL's `synchronous_commit = on`, for the transactions an
//! application chooses. Tandem cannot hold BDB's commit back; it lets the
//! application wait after it, on a Unix socket beside the environment
//! ([`socket`]), until K connected standbys acknowledged a durable end
//! strictly beyond the commit's LSN (a `DB_TXN_TOKEN` names where the
//! commit record starts, BDB-NOTES.md §10).
//!
//! # Protocol
//!
//! One request per line, ASCII, at most [`MAX_REQUEST`] bytes with the
//! newline; a connection may send several, one after the other:
//!
//! ```text
//! WAIT <file> <offset> <k> <timeout_ms>\n
//! ```
//!
//! asks for the log record starting at `file`/`offset` to be fsynced on at
//! least `k` (1..=64) connected standbys, waiting at most `timeout_ms`
//! (0..=86400000; 0 answers from what is known now). One line answers:
//!
//! ```text
//! DURABLE <file>/<offset> <n>\n          the k-th highest durable end; n standbys hold the record
//! TIMEOUT <file>/<offset> <connected> <reason>\n
//!                                       the best durable end (0/0: none), standbys connected, why
//! ERROR <message>\n                      then the primary closes the connection
//! ```
//!
//! A standby that is not connected counts for nothing, and nothing falls
//! back: with no standby, or fewer than `k`, the wait times out and says so.
//!
//! Every waiter watches one channel the registry republishes on each ack
//! ([`crate::registry::DurableAcks`]): an ack costs the same with one
//! waiter or ten thousand, and waiters from many clients share it.

pub mod client;
pub mod socket;

use crate::registry::DurableAcks;
use std::fmt;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};
use tandem_shared::latency::{stage_histogram, LastEvent};
use tandem_shared::metrics::{exponential_buckets, Histogram};
use tandem_shared::LogPosition;
use tokio::sync::watch;

/// `wait-durable --standbys`: how many standbys must hold the record.
pub const DEFAULT_STANDBYS: usize = 1;
/// `wait-durable --timeout-ms`: how long `wait-durable` waits.
pub const DEFAULT_TIMEOUT_MS: u64 = 10_000;

/// Longest request line accepted, newline included.
pub const MAX_REQUEST: usize = 128;
/// Most standbys a request may ask for.
pub const MAX_K: usize = 64;
/// Longest wait a request may ask for (one day).
pub const MAX_TIMEOUT_MS: u64 = 86_400_000;

/// A parsed `WAIT` request.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct WaitRequest {
    pub lsn: LogPosition,
    pub k: usize,
    pub timeout: Duration,
}

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum RequestError {
    #[error("request longer than {MAX_REQUEST} bytes")]
    TooLong,
    #[error("request is not ASCII text")]
    NotText,
    #[error("unknown request {0:?} (expected: WAIT <file> <offset> <k> <timeout_ms>)")]
    Unknown(String),
    #[error("WAIT takes 4 numbers: WAIT <file> <offset> <k> <timeout_ms>")]
    Arity,
    #[error("bad {what}: {value:?}")]
    BadNumber { what: &'static str, value: String },
    #[error("k must be between 1 and {MAX_K}")]
    BadK,
    #[error("timeout_ms must be at most {MAX_TIMEOUT_MS}")]
    BadTimeout,
}

/// Parses one request line (without its newline).
pub fn parse_request(line: &[u8]) -> Result<WaitRequest, RequestError> {
    if line.len() >= MAX_REQUEST {
        return Err(RequestError::TooLong);
    }
    let text = std::str::from_utf8(line)
        .ok()
        .filter(|t| t.is_ascii())
        .ok_or(RequestError::NotText)?;
    let text = text.strip_suffix('\r').unwrap_or(text);
    let mut words = text.split_ascii_whitespace();
    match words.next() {
        Some("WAIT") => {}
        other => return Err(RequestError::Unknown(other.unwrap_or("").to_owned())),
    }
    let fields: Vec<&str> = words.collect();
    let [file, offset, k, timeout] = fields[..] else {
        return Err(RequestError::Arity);
    };
    fn num<T: std::str::FromStr>(what: &'static str, v: &str) -> Result<T, RequestError> {
        // `parse` accepts a leading '+'; the protocol is digits only.
        v.bytes()
            .all(|b| b.is_ascii_digit())
            .then(|| v.parse().ok())
            .flatten()
            .ok_or_else(|| RequestError::BadNumber {
                what,
                value: v.to_owned(),
            })
    }
    let lsn = LogPosition::new(num("file", file)?, num("offset", offset)?);
    let k: usize = num("k", k)?;
    if k == 0 || k > MAX_K {
        return Err(RequestError::BadK);
    }
    let timeout_ms: u64 = num("timeout_ms", timeout)?;
    if timeout_ms > MAX_TIMEOUT_MS {
        return Err(RequestError::BadTimeout);
    }
    Ok(WaitRequest {
        lsn,
        k,
        timeout: Duration::from_millis(timeout_ms),
    })
}

/// How a wait ended.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum WaitOutcome {
    /// `at`: the k-th highest durable end; `holding`: standbys holding it.
    Durable { at: LogPosition, holding: usize },
    TimedOut {
        best: LogPosition,
        connected: usize,
        reason: String,
    },
}

/// Position in the protocol's notation, `FILE/OFFSET`.
pub struct Slash(pub LogPosition);

impl fmt::Display for Slash {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}", self.0.file, self.0.offset)
    }
}

impl fmt::Display for WaitOutcome {
    /// The reply line, without its newline.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            WaitOutcome::Durable { at, holding } => write!(f, "DURABLE {} {holding}", Slash(*at)),
            WaitOutcome::TimedOut {
                best,
                connected,
                reason,
            } => write!(f, "TIMEOUT {} {connected} {reason}", Slash(*best)),
        }
    }
}

/// The answer `acks` gives `req` now: durable, or `None` (keep waiting).
pub fn judge(acks: &DurableAcks, req: &WaitRequest) -> Option<WaitOutcome> {
    let holding = acks.holding(req.lsn);
    (holding >= req.k).then(|| WaitOutcome::Durable {
        at: acks.durable[req.k - 1],
        holding,
    })
}

/// Why `req` is not durable under `acks`, for the timeout reply.
pub fn why_not(acks: &DurableAcks, req: &WaitRequest) -> WaitOutcome {
    let holding = acks.holding(req.lsn);
    let reason = if acks.connected == 0 {
        "no standby is connected".to_owned()
    } else if acks.connected < req.k {
        format!(
            "{} standbys asked for, only {} connected",
            req.k, acks.connected
        )
    } else {
        format!(
            "{holding} of {} connected standbys hold {} ({} asked for)",
            acks.connected,
            Slash(req.lsn),
            req.k
        )
    };
    WaitOutcome::TimedOut {
        best: acks.durable.first().copied().unwrap_or(LogPosition::ZERO),
        connected: acks.connected,
        reason,
    }
}

/// The waits' figures, for the metrics page.
pub struct WaitStats {
    pub waits: AtomicU64,
    pub timeouts: AtomicU64,
    pub bad_requests: AtomicU64,
    /// Seconds from request to answer of the waits that ended durable.
    pub latency: Histogram,
    /// The last ack from any standby, and when it arrived.
    pub acked: LastEvent,
    /// Of the waits answered by an ack that came while they waited: from
    /// that ack's arrival to the answer (the waiter's wake-up).
    pub ack_to_answer: Histogram,
}

impl Default for WaitStats {
    fn default() -> Self {
        Self {
            waits: AtomicU64::new(0),
            timeouts: AtomicU64::new(0),
            bad_requests: AtomicU64::new(0),
            // 100 µs .. ~26 s.
            latency: Histogram::new(exponential_buckets(0.0001, 2.0, 19)),
            acked: LastEvent::default(),
            ack_to_answer: stage_histogram(),
        }
    }
}

/// Waits for `req` on the registry's acks channel.
pub async fn wait(
    mut acks: watch::Receiver<DurableAcks>,
    req: WaitRequest,
    stats: &WaitStats,
) -> WaitOutcome {
    let started = Instant::now();
    stats.waits.fetch_add(1, Ordering::Relaxed);
    let found = tokio::time::timeout(req.timeout, acks.wait_for(|a| judge(a, &req).is_some()))
        .await
        .ok()
        .and_then(|r| r.ok().and_then(|a| judge(&a, &req)));
    if let Some(o) = found {
        let now = Instant::now();
        stats.latency.observe((now - started).as_secs_f64());
        if let Some(at) = stats
            .acked
            .at_or_beyond(req.lsn)
            .filter(|at| *at >= started)
        {
            stats.ack_to_answer.observe((now - at).as_secs_f64());
        }
        return o;
    }
    stats.timeouts.fetch_add(1, Ordering::Relaxed);
    let now = acks.borrow().clone();
    why_not(&now, &req)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn acks(connected: usize, durable: &[(u32, u32)]) -> DurableAcks {
        DurableAcks {
            connected,
            durable: durable
                .iter()
                .map(|&(f, o)| LogPosition::new(f, o))
                .collect(),
        }
    }

    fn req(file: u32, offset: u32, k: usize) -> WaitRequest {
        WaitRequest {
            lsn: LogPosition::new(file, offset),
            k,
            timeout: Duration::ZERO,
        }
    }

    #[test]
    fn requests_parse_and_bad_ones_are_named() {
        assert_eq!(
            parse_request(b"WAIT 3 1200 2 500"),
            Ok(WaitRequest {
                lsn: LogPosition::new(3, 1200),
                k: 2,
                timeout: Duration::from_millis(500)
            })
        );
        assert!(parse_request(b"WAIT 3 1200 1 0\r").is_ok());
        for (line, want) in [
            (&b"wait 1 2 1 5"[..], "unknown request"),
            (b"", "unknown request"),
            (b"WAIT 1 2 1", "4 numbers"),
            (b"WAIT 1 2 1 5 6", "4 numbers"),
            (b"WAIT -1 2 1 5", "bad file"),
            (b"WAIT 1 +2 1 5", "bad offset"),
            (b"WAIT 1 4294967296 1 5", "bad offset"),
            (b"WAIT 1 2 0 5", "k must be"),
            (b"WAIT 1 2 65 5", "k must be"),
            (b"WAIT 1 2 1 86400001", "timeout_ms"),
            (b"WAIT 1 \xff 1 5", "ASCII"),
        ] {
            let e = parse_request(line).unwrap_err().to_string();
            assert!(e.contains(want), "{line:?}: {e}");
        }
        let long = vec![b'1'; MAX_REQUEST];
        assert_eq!(parse_request(&long), Err(RequestError::TooLong));
    }

    #[test]
    fn durable_means_k_standbys_strictly_beyond_the_commit_record() {
        let a = acks(2, &[(5, 900), (5, 400)]);
        // The record starting at the ack itself is not held yet.
        assert_eq!(judge(&a, &req(5, 900, 1)), None);
        assert_eq!(
            judge(&a, &req(5, 899, 1)),
            Some(WaitOutcome::Durable {
                at: LogPosition::new(5, 900),
                holding: 1
            })
        );
        assert_eq!(judge(&a, &req(5, 500, 2)), None);
        assert_eq!(
            judge(&a, &req(4, 9000, 2)),
            Some(WaitOutcome::Durable {
                at: LogPosition::new(5, 400),
                holding: 2
            })
        );
    }

    #[test]
    fn a_timeout_says_why() {
        let none = why_not(&acks(0, &[]), &req(1, 10, 1)).to_string();
        assert_eq!(none, "TIMEOUT 0/0 0 no standby is connected");
        let few = why_not(&acks(1, &[(2, 50)]), &req(1, 10, 2)).to_string();
        assert_eq!(few, "TIMEOUT 2/50 1 2 standbys asked for, only 1 connected");
        let behind = why_not(&acks(2, &[(2, 50), (1, 5)]), &req(2, 60, 1)).to_string();
        assert_eq!(
            behind,
            "TIMEOUT 2/50 2 0 of 2 connected standbys hold 2/60 (1 asked for)"
        );
    }

    #[tokio::test]
    async fn waiters_wake_on_an_ack_and_time_out_without_one() {
        let (tx, rx) = watch::channel(acks(1, &[(1, 100)]));
        let stats = std::sync::Arc::new(WaitStats::default());
        let mut r = req(1, 150, 1);
        r.timeout = Duration::from_secs(60);
        let waiters: Vec<_> = (0..50)
            .map(|_| {
                let (rx, stats) = (rx.clone(), stats.clone());
                tokio::spawn(async move { wait(rx, r, &stats).await })
            })
            .collect();
        tokio::task::yield_now().await;
        tx.send_replace(acks(1, &[(1, 200)]));
        for w in waiters {
            let o = w.await.unwrap();
            assert!(matches!(o, WaitOutcome::Durable { .. }), "{o}");
        }
        r.timeout = Duration::from_millis(20);
        r.lsn = LogPosition::new(1, 300);
        let o = wait(rx.clone(), r, &stats).await;
        assert!(o.to_string().starts_with("TIMEOUT 1/200 1 "), "{o}");
        assert_eq!(stats.waits.load(Ordering::Relaxed), 51);
        assert_eq!(stats.timeouts.load(Ordering::Relaxed), 1);
    }
}
