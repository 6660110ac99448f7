//! Which databases a restore verifies when the backup's recovery proof was
//! made for a shorter log (a backup `--follow` extended after its proof),
//! or the restore recovers to a point in time.
//!
//! The proof ([`RecoveryProof`]) names the bytes it recovered: every file's
//! blake3 as listed then, and the last log file's up to the proof's end. A
//! database is not verified again only when all of these hold:
//! - its bytes are the ones the proof verified (the restore checked every
//!   byte copied against the manifest, and the manifest's blake3 is the
//!   proof's), and every other file the proof recovered is unchanged: the
//!   same `DB_CONFIG`, the same log files, the last one still starting with
//!   the proven bytes;
//! - no record after the proof's end names its file, and no transaction
//!   still open there wrote it: the records recovery replays onto it, and
//!   their outcome, are the proof's, so the recovered file is the one the
//!   proof verified (BDB-NOTES.md §12; the same log analysis as promote's,
//!   [`crate::readiness::verified`]);
//! - recovery ended at the log's end (and, to a time, kept every commit
//!   before the proof's end).
//!
//! To a time T: only when every commit before the proof's end is stamped
//! at or before T (`db_recover -t` keeps those, so the log it truncates
//! ends after the last of them), and then the databases the records after
//! the last commit before the proof's end write count as touched too (`-t`
//! may truncate those records).
//! A time before the proof's last commit gives another environment than the
//! proof's: every database is verified. Any doubt (no proof, an older proof
//! without its files, partitions or queue extents, a record the reader does
//! not know, an unregistered file id) means every database is verified.

use super::logscan::{inspect_record, LogSummary};
use super::manifest::{log_rel_name, FileKind, Manifest, ManifestFile, RecoveryProof};
use super::store::hash_file;
use crate::readiness::verified::{last_checkpoint, read_since, uid_of, uids, writes_between};
use std::collections::{BTreeSet, HashMap};
use std::path::Path;
use tandem_shared::envlayout::is_database_part;
use tandem_shared::logfile::RECORD_HEADER_LEN;
use tandem_shared::logrecords::{read_range, RecordKind};
use tandem_shared::LogPosition;

/// BDB's `TXN_COMMIT`, the opcode of a `__txn_regop` that commits.
const TXN_COMMIT: u32 = 1;

/// The databases a restore verifies, and why the others need not be.
#[derive(Debug, Clone, Default, PartialEq)]
pub(crate) struct Plan {
    pub(crate) verify: Vec<String>,
    /// Databases that recover to what the proof verified.
    pub(crate) unchanged: Vec<String>,
    /// Why every database is verified, when they are.
    pub(crate) everything_because: Option<String>,
    /// The end of the log, which BDB's "last valid LSN" must report for
    /// this recovery (as the readiness check requires of its own,
    /// [`crate::readiness::verified::record`]).
    log_end: Option<LogPosition>,
    /// Commit records before the proof's end (a recovery to a time must
    /// keep them all).
    commits_before: u64,
}

impl Plan {
    fn everything(databases: Vec<String>, why: String) -> Self {
        Self {
            verify: databases,
            everything_because: Some(why),
            ..Default::default()
        }
    }

    /// After the recovery, which ended at `recovered_to` and (to a time)
    /// left `kept_commits` commit records: every database unless it ended
    /// where the plan was made for.
    pub(crate) fn after_recovery(
        self,
        recovered_to: Option<LogPosition>,
        kept_commits: Option<u64>,
    ) -> Self {
        if self.everything_because.is_some() {
            return self;
        }
        let all = || {
            let mut all = self.verify.clone();
            all.extend(self.unchanged.iter().cloned());
            all.sort();
            all
        };
        if recovered_to.is_none() || recovered_to != self.log_end {
            return Self::everything(
                all(),
                format!(
                    "recovery ended at {recovered_to:?}, not at the log's end {:?}",
                    self.log_end
                ),
            );
        }
        if kept_commits.is_some_and(|k| k < self.commits_before) {
            return Self::everything(
                all(),
                "the recovery to that time kept fewer commits than the proof's log holds".into(),
            );
        }
        self
    }
}

/// The plan for the verified copy of a backup in `home` (before recovery
/// writes into it), restored to `until` if given.
pub(crate) fn plan(home: &Path, m: &Manifest, until: Option<i64>) -> Plan {
    let databases: Vec<String> = m.databases().map(|f| f.name.clone()).collect();
    match plan_for(home, m, until, &databases) {
        Ok(p) => p,
        Err(why) => Plan::everything(databases, why),
    }
}

fn plan_for(
    home: &Path,
    m: &Manifest,
    until: Option<i64>,
    databases: &[String],
) -> Result<Plan, String> {
    let p = m
        .proven
        .as_ref()
        .ok_or("the backup carries no recovery proof")?;
    if p.files.is_empty() || p.log_end > m.log_end || p.log_end.file < m.log_start.file {
        return Err("its recovery proof does not say which bytes it recovered".into());
    }
    if databases.iter().any(|d| is_database_part(d)) {
        return Err("the environment has partitioned or queue-extent databases".into());
    }
    let proven = proven_databases(home, m, p)?;
    let log_dir = home.join(&m.log_dir);
    let ckp = last_checkpoint(&log_dir, m.log_start.file, p.log_end)?;
    let since = read_since(&log_dir, ckp, p.log_end)?;
    let mut file_ids = since.file_ids.clone();
    let after = writes_between(&log_dir, &mut file_ids, p.log_end, m.log_end)?;
    let mut touched = uids(&file_ids, &after.written)?;
    touched.extend(uids(&since.file_ids, &since.open)?);
    let mut commits_before = 0;
    if let Some(t) = until {
        let before = commits_until(&log_dir, m.log_start.file, p.log_end)?;
        if let Some(last) = before.last_commit_unix.filter(|last| *last > t) {
            return Err(format!(
                "the time is before the last commit the proof recovered (unix {last}): another environment than the proven one"
            ));
        }
        // What the log after the last commit before the proof's end writes:
        // `-t` may truncate it.
        let last_commit = last_commit_before(&log_dir, m.log_start.file, p.log_end)?;
        let mut ids = since.file_ids.clone();
        let tail = writes_between(&log_dir, &mut ids, last_commit, p.log_end)?;
        touched.extend(uids(&ids, &tail.written)?);
        commits_before = before.commits;
    }
    let mut plan = Plan {
        log_end: Some(m.log_end),
        commits_before,
        ..Default::default()
    };
    for name in databases {
        let same = proven.contains(name)
            && p.databases.contains(name)
            && uid_of(&home.join(name)).is_some_and(|uid| !touched.contains(&uid));
        match same {
            true => plan.unchanged.push(name.clone()),
            false => plan.verify.push(name.clone()),
        }
    }
    Ok(plan)
}

/// The commits in the log from file `first` up to `end`, and their times.
fn commits_until(log_dir: &Path, first: u32, end: LogPosition) -> Result<LogSummary, String> {
    let mut s = LogSummary::default();
    let start = LogPosition::new(first, 0);
    read_range(log_dir, start, end, |_, bytes| {
        if let Some(body) = bytes.get(RECORD_HEADER_LEN as usize..) {
            inspect_record(body, start, &mut s);
        }
    })
    .map_err(|e| e.to_string())?;
    Ok(s)
}

/// Where the last commit record before `end` starts, looking back no
/// further than log file `first`.
fn last_commit_before(log_dir: &Path, first: u32, end: LogPosition) -> Result<LogPosition, String> {
    for file in (first..=end.file).rev() {
        let to = end.min(LogPosition::new(file + 1, 0));
        let mut found = None;
        read_range(log_dir, LogPosition::new(file, 0), to, |r, _| {
            if matches!(r.kind, RecordKind::Resolve { opcode: TXN_COMMIT }) {
                found = Some(r.lsn);
            }
        })
        .map_err(|e| e.to_string())?;
        if let Some(at) = found {
            return Ok(at);
        }
    }
    Err("no commit before the proof's end".into())
}

/// The databases whose bytes are the ones the proof verified; an error when
/// any other file it recovered (configuration, log) is not what it was, or
/// the log before the proof's end is not the proven one.
fn proven_databases(
    home: &Path,
    m: &Manifest,
    p: &RecoveryProof,
) -> Result<BTreeSet<String>, String> {
    let listed: HashMap<&str, &ManifestFile> =
        m.files.iter().map(|f| (f.name.as_str(), f)).collect();
    let last_log = log_rel_name(&m.log_dir, p.log_end.file);
    let later_logs: BTreeSet<String> = (p.log_end.file + 1..=m.log_end.file)
        .map(|n| log_rel_name(&m.log_dir, n))
        .collect();
    let mut proven = BTreeSet::new();
    for (name, blake3) in &p.files {
        match listed.get(name.as_str()) {
            Some(f) if f.kind == FileKind::Database => {
                if f.blake3 == *blake3 {
                    proven.insert(name.clone());
                }
            }
            Some(_) if *name == last_log => {}
            Some(f) if f.blake3 == *blake3 => {}
            _ => return Err(format!("{name} is not the file the proof recovered")),
        }
    }
    for f in &m.files {
        if f.kind != FileKind::Database
            && !p.files.contains_key(&f.name)
            && !later_logs.contains(&f.name)
        {
            return Err(format!("{} was not part of the proof", f.name));
        }
    }
    let prefix = hash_file(
        &m.log_path(home, p.log_end.file),
        Some(u64::from(p.log_end.offset)),
    )
    .map_err(|e| format!("reading {last_log}: {e}"))?
    .1
    .to_hex()
    .to_string();
    if p.log_prefix_blake3.as_deref() != Some(prefix.as_str()) {
        return Err(format!(
            "{last_log} does not start with the log the proof recovered"
        ));
    }
    Ok(proven)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::archive::manifest::small_test_manifest as manifest;
    use std::collections::BTreeMap;

    /// A backup in `home` with one database and one log file (`log` bytes),
    /// proven at `proof_end` bytes into the log.
    fn proven(home: &Path, log: &[u8], proof_end: u32) -> Manifest {
        std::fs::write(home.join("log.0000000001"), log).unwrap();
        let mut m = manifest();
        let prefix = blake3::hash(&log[..proof_end as usize])
            .to_hex()
            .to_string();
        m.files[0].blake3 = "db-hash".into();
        m.files[1].blake3 = "log-hash".into();
        m.proven = Some(RecoveryProof {
            log_end: LogPosition::new(1, proof_end),
            recovered_to: None,
            databases: vec!["a.db".into()],
            unix_ms: 1,
            files: m
                .files
                .iter()
                .map(|f| (f.name.clone(), f.blake3.clone()))
                .collect::<BTreeMap<_, _>>(),
            log_prefix_blake3: Some(prefix),
        });
        m
    }

    #[test]
    fn only_databases_with_the_proven_bytes_count_and_the_rest_of_the_proof_must_hold() {
        let dir = tempfile::tempdir().unwrap();
        let home = dir.path();
        let m = proven(home, b"0123456789", 6);
        let p = m.proven.clone().unwrap();
        assert_eq!(
            proven_databases(home, &m, &p).unwrap(),
            BTreeSet::from(["a.db".to_owned()])
        );
        // The database's bytes changed: not proven, the rest still holds.
        let mut other = m.clone();
        other.files[0].blake3 = "changed".into();
        assert!(proven_databases(home, &other, &p).unwrap().is_empty());
        // The log grew after the proof's end: the same.
        std::fs::write(home.join("log.0000000001"), b"012345abcdefgh").unwrap();
        assert_eq!(proven_databases(home, &m, &p).unwrap().len(), 1);
        // A byte before the proof's end differs: nothing counts.
        std::fs::write(home.join("log.0000000001"), b"012x45abcdefgh").unwrap();
        assert!(proven_databases(home, &m, &p).is_err());
        std::fs::write(home.join("log.0000000001"), b"012345").unwrap();
        // A configuration file the proof did not recover with; a file it
        // recovered that is gone; another earlier log file.
        for edit in [
            |m: &mut Manifest| m.files.push(file("DB_CONFIG", FileKind::Config)),
            |m: &mut Manifest| {
                m.files.remove(1);
            },
            |m: &mut Manifest| m.files.push(file("log.0000000000", FileKind::Log)),
        ] {
            let mut other = m.clone();
            edit(&mut other);
            assert!(proven_databases(home, &other, &p).is_err());
        }
        // A later log file (the extension) is fine, and so is a database
        // the proof never saw (it is verified, not proven).
        let mut longer = m.clone();
        longer.log_end = LogPosition::new(2, 100);
        longer.files.push(file("log.0000000002", FileKind::Log));
        longer.files.push(file("new.db", FileKind::Database));
        assert_eq!(proven_databases(home, &longer, &p).unwrap().len(), 1);
    }

    fn file(name: &str, kind: FileKind) -> ManifestFile {
        ManifestFile {
            name: name.into(),
            kind,
            size: 1,
            blake3: String::new(),
        }
    }

    #[test]
    fn a_recovery_that_ended_elsewhere_verifies_everything() {
        let plan = Plan {
            verify: vec!["b.db".into()],
            unchanged: vec!["a.db".into()],
            log_end: Some(LogPosition::new(3, 100)),
            commits_before: 10,
            ..Default::default()
        };
        let same = plan
            .clone()
            .after_recovery(Some(LogPosition::new(3, 100)), None);
        assert_eq!(same, plan);
        let early = plan
            .clone()
            .after_recovery(Some(LogPosition::new(3, 50)), None);
        assert_eq!(early.verify, vec!["a.db".to_owned(), "b.db".into()]);
        assert!(early.unchanged.is_empty() && early.everything_because.is_some());
        assert!(plan
            .clone()
            .after_recovery(None, None)
            .everything_because
            .is_some());
        // To a time: every commit before the proof's end must be kept.
        assert_eq!(
            plan.clone()
                .after_recovery(Some(LogPosition::new(3, 100)), Some(10)),
            plan
        );
        assert!(plan
            .after_recovery(Some(LogPosition::new(3, 100)), Some(9))
            .everything_because
            .is_some());
    }

    #[test]
    fn without_a_proof_every_database_is_verified() {
        let dir = tempfile::tempdir().unwrap();
        let m = manifest();
        let p = plan(dir.path(), &m, None);
        assert_eq!(p.verify, vec!["a.db".to_owned()]);
        assert!(p.everything_because.unwrap().contains("no recovery proof"));
    }
}
