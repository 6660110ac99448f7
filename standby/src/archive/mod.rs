//! Archival copies of the standby's mirror, for point-in-time restore:
//! `tandem-standby archive` (once or `--follow`), `verify-archive` and
//! `restore`.
//!
//! A backup is a directory `ARCHIVE/<UTC time>-<base id>/` that is an
//! environment home on its own: the base's database files and `DB_CONFIG`
//! under their names, and every log file from the base's first log file to
//! the mirror's durable end, the last one cut at that end (the rest of its
//! size zeros, like BDB's pre-allocated files), plus `MANIFEST.json`. The
//! mirror is only read; in the standby directory's `.tandem`, the archiver
//! writes `archive.json` (its last report) and, with `--follow`, its
//! registration and the log files held for it ([`crate::archive_hold`]).
//!
//! One module per duty; each imports only the ones listed before it:
//! - [`time`]: the `--until` forms, UTC spellings, backup names (jiff);
//! - [`manifest`]: `MANIFEST.json`, its digest and its checks;
//! - [`logscan`]: the log as one verified record chain, commit times;
//! - [`store`]: the archive directory: listing, locks, hashed copies,
//!   integrity checks, temp directories, the atomic swap;
//! - [`bucket`]: an archive in S3-compatible object storage: object
//!   layout, the bucket manifest, checked uploads and downloads;
//! - [`proof`]: a scratch copy recovered and `db_verify`ed;
//! - [`build`]: a new backup of the mirror, published, then retention;
//! - [`follow`]: `--follow` rounds extending the latest backup;
//! - [`verify`]: the `verify-archive` command;
//! - [`restore`]: `restore`, to the end or to a time;
//! - [`drill`]: scheduled restore drills (`--drill-every`) and their record;
//! - [`remote`]: the three commands against a bucket (`s3://`).
//!
//! Each job has its own error type ([`ArchiveError`], [`VerifyError`],
//! [`RestoreError`]); the helpers' errors ([`StoreError`], [`ScanError`],
//! [`ManifestError`], [`ProofError`], [`TimeError`]) pass through them
//! unchanged.

pub mod bucket;
pub mod build;
pub mod drill;
pub mod follow;
pub mod logscan;
pub mod manifest;
pub mod proof;
pub mod remote;
pub mod restore;
pub(crate) mod selective;
pub mod store;
pub mod time;
pub mod verify;

pub use bucket::{Bucket, BucketError, BucketOptions, BucketUrl};
pub use build::{archive_once, select_expired, ArchiveError, ArchiveOptions, ArchiveReport};
pub use follow::{follow, follow_round};
pub use logscan::{LogSummary, ScanError};
pub use manifest::{Manifest, ManifestError};
pub use proof::ProofError;
pub use remote::Location;
pub use restore::{RestoreError, RestoreOptions, RestoreReport};
pub use store::{Problem, StoreError};
pub use time::{parse_time, TimeError};
pub use verify::{resolve_backups, verify_backup, VerifyError, VerifyReport};

#[cfg(test)]
mod tests;
