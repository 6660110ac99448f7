//! What the application committed, as the campaign tracks it: the history
//! of the current primary environment (transaction numbers and the end of
//! log after each commit, read from the workload's LSN log as it grows),
//! and the snapshot a rollback returns to.

use std::path::PathBuf;

use anyhow::Result;
use tandem_shared::LogPosition;

use crate::bdb;

/// A committed transaction: its number and the end of log after its commit.
pub type Entry = (u64, LogPosition);

/// The committed history of the current primary environment, as the
/// application logged it: positions grow with transaction numbers.
#[derive(Debug, Default, Clone)]
pub struct Lineage {
    pub entries: Vec<Entry>,
    /// The running workload's LSN log and how far it was read.
    file: Option<(PathBuf, u64)>,
}

impl Lineage {
    /// A history inherited from an earlier environment (no workload yet).
    pub fn from_entries(entries: Vec<Entry>) -> Self {
        Lineage {
            entries,
            file: None,
        }
    }

    pub fn follow(&mut self, path: PathBuf) {
        self.file = Some((path, 0));
    }

    /// Reads what the workload logged since the last call.
    pub fn poll(&mut self) -> Result<()> {
        if let Some((path, at)) = &mut self.file {
            let (new, next) = bdb::read_lsn_log_from(path, *at)?;
            *at = next;
            self.entries
                .extend(new.into_iter().map(|(t, f, o)| (t, LogPosition::new(f, o))));
        }
        Ok(())
    }

    pub fn close(&mut self) -> Result<()> {
        self.poll()?;
        self.file = None;
        Ok(())
    }

    pub fn last_t(&self) -> u64 {
        self.entries.last().map_or(0, |e| e.0)
    }

    /// The newest transaction whose commit lies at or before `durable`.
    pub fn acked_t(&self, durable: LogPosition) -> u64 {
        let n = self.entries.partition_point(|e| e.1 <= durable);
        if n == 0 {
            0
        } else {
            self.entries[n - 1].0
        }
    }

    pub fn truncate_to(&mut self, t: u64) {
        self.entries.retain(|e| e.0 <= t);
    }
}

/// A consistent copy of the primary's environment taken while the
/// application was stopped, to roll the primary back to.
#[derive(Debug, Clone)]
pub struct Snapshot {
    pub dir: PathBuf,
    /// The last transaction it holds.
    pub t: u64,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn acked_is_the_last_commit_at_or_before_the_durable_position() {
        let mut l = Lineage {
            entries: vec![
                (10, LogPosition::new(1, 100)),
                (11, LogPosition::new(1, 900)),
                (12, LogPosition::new(2, 40)),
            ],
            file: None,
        };
        assert_eq!(l.acked_t(LogPosition::new(1, 99)), 0);
        assert_eq!(l.acked_t(LogPosition::new(1, 100)), 10);
        assert_eq!(l.acked_t(LogPosition::new(2, 0)), 11);
        assert_eq!(l.acked_t(LogPosition::new(9, 0)), 12);
        l.truncate_to(11);
        assert_eq!(l.last_t(), 11);
    }
}
