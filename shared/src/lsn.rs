//! `LogPosition`: a Berkeley DB LSN (log file number, byte offset), used for
//! every position Tandem talks about so positions are never bare integers.

use serde::{Deserialize, Serialize};
use std::fmt;

#[derive(
    Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Default, Serialize, Deserialize,
)]
pub struct LogPosition {
    pub file: u32,
    pub offset: u32,
}

impl LogPosition {
    pub const ZERO: LogPosition = LogPosition { file: 0, offset: 0 };

    pub fn new(file: u32, offset: u32) -> Self {
        Self { file, offset }
    }

    /// Bytes of log between `self` and a later `end`, given the log file
    /// size. Exact within one file; across files it assumes full files, which
    /// is what BDB writes except for the few bytes at a file's end where the
    /// next record did not fit.
    pub fn bytes_until(&self, end: LogPosition, lg_max: u32) -> u64 {
        if end <= *self {
            return 0;
        }
        if end.file == self.file {
            return u64::from(end.offset - self.offset);
        }
        let rest_of_first = u64::from(lg_max.saturating_sub(self.offset));
        let middle = u64::from(end.file - self.file - 1) * u64::from(lg_max);
        rest_of_first + middle + u64::from(end.offset)
    }
}

impl fmt::Display for LogPosition {
    /// BDB's own notation, as `db_printlog` and `db_recover -v` print it.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "[{}][{}]", self.file, self.offset)
    }
}

impl From<tandem_proto::LogPosition> for LogPosition {
    fn from(p: tandem_proto::LogPosition) -> Self {
        Self {
            file: p.file,
            offset: p.offset,
        }
    }
}

impl From<LogPosition> for tandem_proto::LogPosition {
    fn from(p: LogPosition) -> Self {
        Self {
            file: p.file,
            offset: p.offset,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn orders_by_file_then_offset() {
        assert!(LogPosition::new(1, 900) < LogPosition::new(2, 28));
        assert!(LogPosition::new(2, 28) < LogPosition::new(2, 29));
    }

    #[test]
    fn bytes_until_within_and_across_files() {
        let a = LogPosition::new(3, 100);
        assert_eq!(a.bytes_until(LogPosition::new(3, 150), 1000), 50);
        assert_eq!(
            a.bytes_until(LogPosition::new(5, 10), 1000),
            900 + 1000 + 10
        );
        assert_eq!(a.bytes_until(LogPosition::new(2, 10), 1000), 0);
        assert_eq!(a.to_string(), "[3][100]");
    }
}
