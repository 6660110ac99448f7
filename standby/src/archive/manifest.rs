//! `MANIFEST.json`, the description a backup carries of itself: every file
//! with its size and blake3, the environment and base it came from, the log
//! range, the commit times found in the log, and a digest over all of that.
//! Parsing checks everything a reader relies on before any file is opened.

use serde::{Deserialize, Serialize};
use std::collections::{BTreeMap, BTreeSet};
use std::fs;
use std::path::{Path, PathBuf};
use tandem_shared::envlayout::rel_name;
use tandem_shared::logfile::log_file_name;
use tandem_shared::wirepath;
use tandem_shared::LogPosition;

pub const MANIFEST_FILE: &str = "MANIFEST.json";
pub const MANIFEST_FORMAT: &str = "tandem-backup/1";

/// A manifest that cannot be read or does not hold together.
#[derive(Debug, thiserror::Error)]
#[error("{}: {why}", .path.display())]
pub struct ManifestError {
    pub path: PathBuf,
    pub why: String,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum FileKind {
    Database,
    Config,
    Log,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ManifestFile {
    /// Path relative to the backup (= environment home), '/'-separated.
    pub name: String,
    pub kind: FileKind,
    pub size: u64,
    pub blake3: String,
}

/// `MANIFEST.json`. `digest` is the blake3 of the compact JSON of the
/// manifest with `digest` empty.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Manifest {
    pub format: String,
    pub env_id: String,
    pub base_id: String,
    pub epoch: u64,
    /// The standby directory it was copied from (informational).
    pub source: String,
    pub created_unix_ms: u64,
    /// Last extended by `--follow` (= created otherwise).
    pub updated_unix_ms: u64,
    /// Log directory relative to the home ("" = the home).
    pub log_dir: String,
    pub log_start: LogPosition,
    /// End of the verified log: the last log file holds records up to here.
    pub log_end: LogPosition,
    pub lg_max: u32,
    /// Commit records (`__txn_regop`, opcode commit) in the log.
    pub commits: u64,
    pub first_commit_unix: Option<i64>,
    pub last_commit_unix: Option<i64>,
    /// Timestamp of the first checkpoint whose ckp_lsn is at or after the
    /// first log record: `db_recover -t` refuses earlier times.
    pub earliest_checkpoint_unix: Option<i64>,
    pub files: Vec<ManifestFile>,
    /// What proved these files recover, when the archiver proved it
    /// (absent in older manifests and with `--no-verify`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub proven: Option<RecoveryProof>,
    pub digest: String,
}

/// The recovery proof a backup was published with: a scratch copy of
/// exactly the files listed (every byte checked against their blake3 as it
/// was copied), the log up to `log_end`, passed `db_recover -c` (which
/// ended at `recovered_to`) and then `db_verify` of each of `databases`.
/// Sealed into the manifest's digest with the files it speaks for, so it
/// cannot be moved to other bytes. A restore of the same bytes to the same
/// end (no `--until`) recovers the same environment (BDB-NOTES.md §12) and
/// need not run `db_verify` again. A backup extended later (`--follow`)
/// keeps the proof for its shorter log: a restore then verifies only the
/// databases the log after `log_end` touches ([`super::selective`]).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RecoveryProof {
    pub log_end: LogPosition,
    pub recovered_to: Option<LogPosition>,
    /// The databases `db_verify` passed, by name.
    pub databases: Vec<String>,
    pub unix_ms: u64,
    /// The blake3 of every file the proof recovered, by name, as the
    /// manifest listed them then (absent in older proofs).
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub files: BTreeMap<String, String>,
    /// The blake3 of the first `log_end.offset` bytes of the last log file:
    /// the part of it the proof recovered, which an extended backup's
    /// longer file must still start with.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub log_prefix_blake3: Option<String>,
}

impl Manifest {
    pub fn compute_digest(&self) -> String {
        let mut body = self.clone();
        body.digest = String::new();
        // Serializing plain structs, strings and integers cannot fail.
        let bytes = serde_json::to_vec(&body).unwrap_or_default();
        blake3::hash(&bytes).to_hex().to_string()
    }

    pub fn seal(&mut self) {
        self.digest = self.compute_digest();
    }

    /// The earliest time `restore --until` accepts: no earlier than the
    /// first commit in the log (older commits are baked into the database
    /// files and cannot be undone) and no earlier than BDB's own limit.
    pub fn earliest_restore_unix(&self) -> Option<i64> {
        window_start(self.first_commit_unix, self.earliest_checkpoint_unix)
    }

    /// The recovery proof, if it speaks for this manifest as it stands:
    /// the same log end and the same databases.
    pub fn proof_covering(&self) -> Option<&RecoveryProof> {
        let p = self.proven.as_ref()?;
        let names: Vec<&str> = self.databases().map(|f| f.name.as_str()).collect();
        let proved: Vec<&str> = p.databases.iter().map(String::as_str).collect();
        (p.log_end == self.log_end && names == proved).then_some(p)
    }

    pub fn databases(&self) -> impl Iterator<Item = &ManifestFile> {
        self.files.iter().filter(|f| f.kind == FileKind::Database)
    }

    /// The log of a copy of this backup in `home`, walked as one verified
    /// record chain that must end where the manifest says.
    pub fn scan_log(
        &self,
        home: &Path,
    ) -> Result<super::logscan::LogSummary, super::logscan::ScanError> {
        super::logscan::scan_logs(
            &home.join(&self.log_dir),
            self.log_start.file,
            self.log_end.file,
            Some(self.log_end.offset),
            None,
        )
    }

    pub fn log_path(&self, home: &Path, number: u32) -> PathBuf {
        home.join(&self.log_dir).join(log_file_name(number))
    }

    /// Bytes of all files listed.
    pub fn bytes(&self) -> u64 {
        self.files.iter().map(|f| f.size).sum()
    }

    /// Parses and checks a manifest: format, digest, file names, log range.
    pub fn parse(bytes: &[u8], path: &Path) -> Result<Self, ManifestError> {
        let bad = |why: String| ManifestError {
            path: path.to_path_buf(),
            why,
        };
        let m: Manifest = serde_json::from_slice(bytes)
            .map_err(|e| bad(format!("not a readable manifest (damaged?): {e}")))?;
        if m.format != MANIFEST_FORMAT {
            return Err(bad(format!(
                "format {:?} is not {MANIFEST_FORMAT:?}",
                m.format
            )));
        }
        let computed = m.compute_digest();
        if computed != m.digest {
            return Err(bad(format!("manifest digest mismatch: the manifest was altered or damaged (recorded {}, computed {computed})", m.digest)));
        }
        let mut seen = BTreeSet::new();
        for f in &m.files {
            wirepath::validate(&f.name).map_err(|e| bad(format!("refused file name: {e}")))?;
            if f.name == MANIFEST_FILE {
                return Err(bad(format!("lists {MANIFEST_FILE} as a file")));
            }
            if !seen.insert(f.name.as_str()) {
                return Err(bad(format!("lists {} twice", f.name)));
            }
        }
        if !m.log_dir.is_empty() {
            wirepath::validate(&m.log_dir)
                .map_err(|e| bad(format!("refused log directory: {e}")))?;
        }
        if m.log_start.file == 0 || m.log_end.file < m.log_start.file {
            return Err(bad(format!(
                "impossible log range {} .. {}",
                m.log_start, m.log_end
            )));
        }
        let logs: BTreeSet<&str> = m
            .files
            .iter()
            .filter(|f| f.kind == FileKind::Log)
            .map(|f| f.name.as_str())
            .collect();
        for n in m.log_start.file..=m.log_end.file {
            let name = log_rel_name(&m.log_dir, n);
            if !logs.contains(name.as_str()) {
                return Err(bad(format!(
                    "the log range {} .. {} needs {name}, which it does not list",
                    m.log_start, m.log_end
                )));
            }
        }
        if logs.len() as u64 != u64::from(m.log_end.file - m.log_start.file) + 1 {
            return Err(bad("lists log files outside its log range".into()));
        }
        Ok(m)
    }

    pub fn to_bytes(&self) -> Vec<u8> {
        let mut out = serde_json::to_vec_pretty(self).unwrap_or_default();
        out.push(b'\n');
        out
    }
}

/// Where a backup's restorable window starts: the later of its first
/// commit and BDB's earliest checkpoint; `None` without either.
pub fn window_start(first_commit: Option<i64>, earliest_checkpoint: Option<i64>) -> Option<i64> {
    Some(first_commit?.max(earliest_checkpoint?))
}

/// Reads and checks `backup/MANIFEST.json`.
pub fn read_manifest(backup: &Path) -> Result<Manifest, ManifestError> {
    let path = backup.join(MANIFEST_FILE);
    let bytes = fs::read(&path).map_err(|e| ManifestError {
        path: path.clone(),
        why: format!("cannot read it: {e}"),
    })?;
    Manifest::parse(&bytes, &path)
}

/// A log file's name relative to the home, '/'-separated.
pub fn log_rel_name(log_dir: &str, number: u32) -> String {
    rel_name(&Path::new(log_dir).join(log_file_name(number)))
}

/// A manifest for unit tests: environment `e`, base `base`, created (and
/// updated) at `created` unix ms, epoch 1, the log from (1, 0) to
/// (1, `end`) in the home, holding `files`; sealed.
#[cfg(test)]
pub(crate) fn test_manifest(
    base: &str,
    created: u64,
    end: u32,
    files: Vec<ManifestFile>,
) -> Manifest {
    let mut m = Manifest {
        format: MANIFEST_FORMAT.into(),
        env_id: "e".into(),
        base_id: base.into(),
        epoch: 1,
        source: "s".into(),
        created_unix_ms: created,
        updated_unix_ms: created,
        log_dir: String::new(),
        log_start: LogPosition::new(1, 0),
        log_end: LogPosition::new(1, end),
        lg_max: 1 << 20,
        commits: 0,
        first_commit_unix: None,
        last_commit_unix: None,
        earliest_checkpoint_unix: None,
        files,
        proven: None,
        digest: String::new(),
    };
    m.seal();
    m
}

/// A test manifest of base `b` with the log at (1, 500) and two files of 1
/// byte with no blake3: `a.db` and `log.0000000001`.
#[cfg(test)]
pub(crate) fn small_test_manifest() -> Manifest {
    let file = |name: &str, kind| ManifestFile {
        name: name.into(),
        kind,
        size: 1,
        blake3: String::new(),
    };
    test_manifest(
        "b",
        0,
        500,
        vec![
            file("a.db", FileKind::Database),
            file("log.0000000001", FileKind::Log),
        ],
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    fn manifest() -> Manifest {
        small_test_manifest()
    }

    #[test]
    fn a_proof_covers_only_the_log_end_and_databases_it_proved_and_is_sealed() {
        let mut m = manifest();
        let unproven = m.to_bytes();
        assert!(!String::from_utf8_lossy(&unproven).contains("proven"));
        assert!(m.proof_covering().is_none());
        m.proven = Some(RecoveryProof {
            log_end: m.log_end,
            recovered_to: Some(LogPosition::new(1, 400)),
            databases: vec!["a.db".into()],
            unix_ms: 1,
            files: BTreeMap::new(),
            log_prefix_blake3: None,
        });
        m.seal();
        assert!(m.proof_covering().is_some());
        let parsed = Manifest::parse(&m.to_bytes(), Path::new("M")).unwrap();
        assert_eq!(parsed, m);
        // Moved to a longer log, or other databases: it no longer counts.
        let mut longer = m.clone();
        longer.log_end = LogPosition::new(1, 600);
        assert!(longer.proof_covering().is_none());
        let mut other = m.clone();
        other.files[0].name = "b.db".into();
        assert!(other.proof_covering().is_none());
        // Added by hand without a new digest: the manifest is refused.
        let text = String::from_utf8(m.to_bytes()).unwrap();
        let forged = text.replace("\"unix_ms\": 1", "\"unix_ms\": 2");
        assert!(Manifest::parse(forged.as_bytes(), Path::new("M")).is_err());
        // A manifest written before proofs existed still parses.
        assert!(Manifest::parse(&unproven, Path::new("M")).is_ok());
    }
}
