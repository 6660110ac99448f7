//! Where a standby's stream starts: continue its log, send a new base, or
//! refuse.
//!
//! A new base makes the standby replace what it holds, so it is sent only
//! when nothing the standby holds can be lost by it: the standby holds no
//! base, asked for one (`Hello.new_base_request`), or needs log files that
//! are gone from the primary (a gap: what it holds is older than anything
//! the primary can continue). Everything else that stops a resume is
//! refused instead:
//!
//! - the primary cannot read its own log: `unavailable`, the standby
//!   retries; a passing I/O error must never cost a standby its copy;
//! - the standby's log does not continue the primary's (it ends beyond the
//!   primary's end, not on a record boundary, or with a different last
//!   record): `failed_precondition`, "diverged: …". The standby may hold
//!   transactions this primary lost (a primary restored from an older copy,
//!   or whose unsynced log was lost in a crash), so only the operator may
//!   choose between promoting it and starting it over;
//! - the standby is at an older epoch and holds log beyond the position
//!   where the next epoch began (it was ahead of the standby promoted to
//!   this primary): `failed_precondition`, "diverged: …", naming that
//!   position and the bytes it would discard ([`check_history`]). A standby
//!   at an older epoch that holds only a prefix of this primary's history
//!   continues streaming like any other: no new base, no file re-sent.

use std::fmt;
use std::fs::File;
use std::io;
use tandem_shared::envlayout::EnvLayout;
use tandem_shared::epochs::{parting_point, EpochStart};
use tandem_shared::logfile::{read_verified, walk_file, WalkStop};
use tandem_shared::wire::Hello;
use tandem_shared::LogPosition;
use tonic::Status;

/// Where the log stream starts.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Plan {
    Resume {
        from: LogPosition,
        prev: Option<u32>,
    },
    NewBase {
        reason: String,
    },
    /// The standby ran `--rejoin` and its log does not continue this
    /// primary's: a new base, page delta against its files, replacing what
    /// it holds from `discard_after` on (at most; see [`Divergence::agreed`]).
    Rejoin {
        reason: String,
        discard_after: LogPosition,
    },
}

/// Why the primary will not serve this standby now.
#[derive(Debug, thiserror::Error)]
pub enum Refusal {
    #[error("the primary cannot read its log now ({0}); retry later")]
    Unavailable(String),
    #[error(transparent)]
    Diverged(#[from] Divergence),
    #[error(
        "diverged: the standby is at epoch {standby_epoch} and this primary at epoch {primary_epoch}, but this \
         primary's history does not say where the epochs after {standby_epoch} began (it was promoted by an older \
         Tandem), so it cannot prove the standby holds a prefix of its log. Nothing was sent and the standby's \
         directory was not touched. Restart the standby with `tandem-standby run --start-over` to take a new base"
    )]
    HistoryUnknown {
        standby_epoch: u64,
        primary_epoch: u64,
    },
}

impl From<Refusal> for Status {
    fn from(r: Refusal) -> Self {
        match &r {
            Refusal::Unavailable(_) => Status::unavailable(r.to_string()),
            Refusal::Diverged(_) | Refusal::HistoryUnknown { .. } => {
                Status::failed_precondition(r.to_string())
            }
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DivergenceKind {
    /// The standby holds log past the primary's end of log.
    BeyondEnd,
    /// The standby's end falls inside one of the primary's records.
    NotARecordBoundary,
    /// The record before the standby's end differs from the primary's.
    LastRecordDiffers,
    /// The standby, at an older epoch, holds log beyond `start`, where
    /// epoch `epoch` (this primary's history) began.
    BeyondEpochStart { epoch: u64, start: LogPosition },
}

/// The standby's log does not continue the primary's.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub struct Divergence {
    pub kind: DivergenceKind,
    /// End of the log the standby holds durably.
    pub standby: LogPosition,
    /// The primary's end of log.
    pub primary_end: LogPosition,
    /// Log bytes the standby holds beyond the point where the two agree,
    /// at least; `None` when that point is unknown.
    pub beyond: Option<u64>,
    /// The last position both logs are known to agree on, at most (the
    /// primary sees only the standby's end and last record).
    pub agreed: LogPosition,
}

impl Divergence {
    /// The plan for a standby that asked to rejoin: a page-delta new base.
    fn rejoin(self) -> Plan {
        Plan::Rejoin {
            reason: format!(
                "rejoin: the standby's log leaves this primary's history at {} or earlier (its log ends at {}, this primary's at {})",
                self.agreed, self.standby, self.primary_end
            ),
            discard_after: self.agreed,
        }
    }
}

impl fmt::Display for Divergence {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if let DivergenceKind::BeyondEpochStart { epoch, start } = self.kind {
            return write!(
                f,
                "diverged: epoch {epoch} of this environment began at {start} (where the standby promoted to this \
                 primary ended), but this standby holds the log up to {} durably: {} bytes of log beyond {start} \
                 that this primary's history does not contain (it was ahead of the promoted standby on the old \
                 primary). Continuing would discard them, so nothing was sent and the standby's directory was not \
                 touched. Choose one: promote this standby (`tandem-standby promote`) if those transactions must \
                 survive; or restart it with `tandem-standby run --rejoin` to discard the log beyond {start} and \
                 follow this primary",
                self.standby,
                self.beyond.unwrap_or(0)
            );
        }
        let why = match self.kind {
            DivergenceKind::BeyondEnd => "the standby holds log beyond this primary's end of log",
            DivergenceKind::NotARecordBoundary => {
                "the standby's end of log falls inside one of this primary's log records"
            }
            DivergenceKind::LastRecordDiffers => {
                "the standby's last log record differs from this primary's record at the same position"
            }
            DivergenceKind::BeyondEpochStart { .. } => unreachable!("written above"),
        };
        let beyond = match self.beyond {
            Some(n) => format!("at least {n} bytes of log beyond the point where the two agree"),
            None => "log beyond the point where the two agree (how much is unknown)".into(),
        };
        write!(
            f,
            "diverged: {why}: the standby holds the log up to {} durably, this primary's log ends at {}; \
             the standby holds {beyond}. Nothing was sent and the standby's directory was not touched. \
             Choose one: promote the standby (`tandem-standby promote`), since it may hold transactions \
             this primary lost; or restart it with `tandem-standby run --start-over` to discard what it \
             holds and take a new base from this primary",
            self.standby, self.primary_end
        )
    }
}

/// What the epoch history says of a standby's log.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum HistoryVerdict {
    /// The standby is at this primary's epoch, or what it holds ends at or
    /// before the start of every newer epoch: a prefix of this
    /// primary's history (the usual checks of its last record still apply).
    Continue,
    /// The standby holds log beyond `switch_at.start`: `beyond` bytes of it
    /// are not this primary's.
    Beyond {
        switch_at: EpochStart,
        standby: LogPosition,
        beyond: u64,
    },
    /// The standby is at an older epoch and the history does not say where
    /// the one after it began.
    Unknown,
}

/// Where the standby's log, at `hello.epoch`, leaves this primary's
/// history (`our_epoch`, `history`). `lg_max` sizes the bytes beyond.
pub fn check_history(
    hello: &Hello,
    our_epoch: u64,
    history: &[EpochStart],
    lg_max: u32,
) -> HistoryVerdict {
    // Epoch 0: a standby that never saw a primary (it holds nothing that
    // could belong to another epoch).
    if hello.epoch == 0 || hello.epoch >= our_epoch {
        return HistoryVerdict::Continue;
    }
    let Some(next) = parting_point(history, hello.epoch) else {
        return HistoryVerdict::Unknown;
    };
    let d: LogPosition = hello.durable.unwrap_or_default().into();
    if d <= next.start {
        return HistoryVerdict::Continue;
    }
    HistoryVerdict::Beyond {
        switch_at: next.clone(),
        standby: d,
        beyond: next.start.bytes_until(d, lg_max),
    }
}

/// Can the standby's log be continued, does it need a new base, or must
/// it be refused? `our_epoch` and `history` are this primary's. A standby
/// that asked to rejoin (`Hello.rejoin`) gets a page-delta new base where
/// another would be refused as diverged.
pub fn plan(
    layout: &EnvLayout,
    hello: &Hello,
    our_epoch: u64,
    history: &[EpochStart],
) -> Result<Plan, Refusal> {
    match plan_strict(layout, hello, our_epoch, history) {
        Err(Refusal::Diverged(d)) if hello.rejoin => Ok(d.rejoin()),
        other => other,
    }
}

/// The plan, strictly: a divergence is refused (`plan` turns it into a
/// rejoin when the standby asked for one). A dispatch of the checks, in
/// order: what the standby asks for, the primary's end, the epoch history,
/// the standby's end against the primary's, the log files it needs, and
/// the record it ends on.
fn plan_strict(
    layout: &EnvLayout,
    hello: &Hello,
    our_epoch: u64,
    history: &[EpochStart],
) -> Result<Plan, Refusal> {
    let new_base = |reason: String| Ok(Plan::NewBase { reason });
    if hello.base_id.is_empty() {
        return new_base("the standby holds no base yet".into());
    }
    if !hello.new_base_request.is_empty() {
        return new_base(format!(
            "the standby asked for one: {}",
            hello.new_base_request
        ));
    }
    let d: LogPosition = hello.durable.unwrap_or_default().into();
    if d.file == 0 {
        return new_base("the standby holds no log position".into());
    }
    let (files, newest, end, lg_max) = primary_end(layout)?;
    check_epochs(hello, our_epoch, history, lg_max, end)?;
    // The very start of the file after the primary's newest is where a
    // caught-up standby waits for BDB's next file: nothing beyond.
    let waiting_for_next = d.offset == 0 && d.file == newest + 1;
    if d > end && !waiting_for_next {
        return Err(Divergence {
            kind: DivergenceKind::BeyondEnd,
            standby: d,
            primary_end: end,
            beyond: Some(end.bytes_until(d, lg_max)),
            agreed: end,
        }
        .into());
    }
    if let Some(reason) = missing_log(layout, &files, d, newest) {
        return new_base(reason);
    }
    if d.offset == 0 {
        return Ok(Plan::Resume {
            from: d,
            prev: None,
        });
    }
    resume_at_record(layout, hello, d, end)
}

fn unavailable(what: &str, e: &dyn fmt::Display) -> Refusal {
    Refusal::Unavailable(format!("{what}: {e}"))
}

/// The primary's log files, the newest, its verified end and the log file
/// size.
fn primary_end(layout: &EnvLayout) -> Result<(Vec<u32>, u32, LogPosition, u32), Refusal> {
    let files = layout
        .log_files()
        .map_err(|e| unavailable("listing the log files", &e))?;
    let Some(&newest) = files.last() else {
        return Err(Refusal::Unavailable(format!(
            "no log files in {}",
            layout.log_dir().display()
        )));
    };
    let (end, lg_max) = log_end(layout, newest)
        .map_err(|e| unavailable(&format!("reading {}", layout.log_name(newest)), &e))?;
    Ok((files, newest, end, lg_max))
}

/// Refuses a standby whose epoch history this primary cannot place, or
/// whose log goes beyond where an epoch it knows began.
fn check_epochs(
    hello: &Hello,
    our_epoch: u64,
    history: &[EpochStart],
    lg_max: u32,
    end: LogPosition,
) -> Result<(), Refusal> {
    match check_history(hello, our_epoch, history, lg_max) {
        HistoryVerdict::Continue => Ok(()),
        HistoryVerdict::Unknown => Err(Refusal::HistoryUnknown {
            standby_epoch: hello.epoch,
            primary_epoch: our_epoch,
        }),
        HistoryVerdict::Beyond {
            switch_at,
            standby,
            beyond,
        } => Err(Divergence {
            kind: DivergenceKind::BeyondEpochStart {
                epoch: switch_at.epoch,
                start: switch_at.start,
            },
            standby,
            primary_end: end,
            beyond: Some(beyond),
            agreed: switch_at.start,
        }
        .into()),
    }
}

/// Why the standby's log cannot be continued from `d`: a file it needs
/// was removed before it was shipped (a new base, then).
fn missing_log(layout: &EnvLayout, files: &[u32], d: LogPosition, newest: u32) -> Option<String> {
    let missing: Vec<u32> = (d.file..=newest)
        .filter(|n| files.binary_search(n).is_err())
        .collect();
    if missing.is_empty() {
        return None;
    }
    let names: Vec<String> = missing
        .iter()
        .take(5)
        .map(|n| layout.log_name(*n))
        .collect();
    Some(format!(
        "log files the standby needs to continue from {d} are gone from the primary ({}{}); they were removed before \
         they were shipped, so the standby's copy cannot be continued",
        names.join(", "),
        if missing.len() > 5 { ", ..." } else { "" }
    ))
}

/// Resumes at `d`, inside a log file, only if the primary's log has a
/// record boundary there and the record before it is the standby's last.
fn resume_at_record(
    layout: &EnvLayout,
    hello: &Hello,
    d: LogPosition,
    end: LogPosition,
) -> Result<Plan, Refusal> {
    let path = layout.log_path(d.file);
    let read = || -> io::Result<_> {
        let f = File::open(&path)?;
        let r = read_verified(&f, 0, None, d.offset as usize)?;
        // Where this file's verified records end, when they end before d.
        let file_end = if r.walk.end < d.offset && r.walk.stop != WalkStop::EndOfBuffer {
            Some(walk_file(&f, None)?.end)
        } else {
            None
        };
        Ok((r, file_end))
    };
    let (r, file_end) =
        read().map_err(|e| unavailable(&format!("reading {}", path.display()), &e))?;
    let diverged = |kind, beyond, agreed_offset: u32| {
        Err(Divergence {
            kind,
            standby: d,
            primary_end: end,
            beyond,
            agreed: LogPosition::new(d.file, agreed_offset),
        }
        .into())
    };
    if r.walk.end != d.offset {
        return match file_end {
            // This file of the primary's ends before d (an older, complete
            // file that is shorter than the standby's copy of it).
            Some(fe) if fe < d.offset => diverged(
                DivergenceKind::BeyondEnd,
                Some(u64::from(d.offset - fe)),
                fe,
            ),
            // The last record boundary before d that the primary has.
            _ => diverged(
                DivergenceKind::NotARecordBoundary,
                None,
                r.walk.last_record.unwrap_or(0),
            ),
        };
    }
    let last = r.walk.last_record.unwrap_or(0) as usize;
    if !hello.last_record_digest.is_empty()
        && blake3::hash(&r.bytes[last..]).as_bytes()[..] != hello.last_record_digest[..]
    {
        return diverged(
            DivergenceKind::LastRecordDiffers,
            Some(u64::from(d.offset) - last as u64),
            last as u32,
        );
    }
    Ok(Plan::Resume {
        from: d,
        prev: r.walk.last_record,
    })
}

/// The primary's end of verified log, walked now (not the watcher's
/// possibly older view), and the log file size from its header.
fn log_end(layout: &EnvLayout, newest: u32) -> io::Result<(LogPosition, u32)> {
    let w = walk_file(&File::open(layout.log_path(newest))?, None)?;
    Ok((
        LogPosition::new(newest, w.end),
        w.header.map_or(0, |h| h.lg_max),
    ))
}

#[cfg(test)]
mod tests;
