//! Who this primary is: a random environment identity, created once and kept
//! in the primary's state directory, the epoch (fencing token) and the
//! epoch history (where each promotion began in the log). A standby that
//! was filled from one environment refuses another's data, and the state
//! directory is locked so two primaries cannot serve one environment.
//!
//! A primary started on a promoted standby's directory adopts what the
//! promotion recorded: the same environment identity, the new epoch and
//! the history, so the other standbys of the environment can follow it.

use anyhow::{bail, Context, Result};
use serde::{Deserialize, Serialize};
use std::fs::File;
use std::path::{Path, PathBuf};
use tandem_shared::durable::ControlFile;
use tandem_shared::epochs::EpochStart;

const IDENTITY_FILE: &str = "identity";
const LOCK_FILE: &str = "lock";
/// v2 added `history`; a v1 file reads as an empty history (no promotion).
const FORMAT_VERSION: u32 = 2;

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct PrimaryIdentity {
    pub env_id: String,
    pub epoch: u64,
    pub created_unix_ms: u64,
    /// Every epoch after the first, oldest first.
    #[serde(default)]
    pub history: Vec<EpochStart>,
}

/// What a promotion recorded in a standby directory, for the primary
/// started on it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Promoted {
    pub env_id: String,
    pub epoch: u64,
    pub history: Vec<EpochStart>,
}

/// The locked state directory; the lock lasts as long as this value.
pub struct PrimaryState {
    pub dir: PathBuf,
    pub identity: PrimaryIdentity,
    _lock: File,
}

pub fn random_id() -> String {
    let bytes: [u8; 16] = rand::random();
    tandem_shared::to_hex(&bytes)
}

impl PrimaryState {
    /// Opens (creating on first use) the state directory and takes its lock.
    /// `promoted`: the directory is a promoted standby's; a promotion newer
    /// than the stored epoch is adopted (identity, epoch and history).
    pub fn open(dir: &Path, promoted: Option<&Promoted>) -> Result<Self> {
        std::fs::create_dir_all(dir)
            .with_context(|| format!("creating state directory {}", dir.display()))?;
        let lock_path = dir.join(LOCK_FILE);
        let lock = File::options()
            .create(true)
            .truncate(false)
            .write(true)
            .open(&lock_path)
            .with_context(|| format!("opening {}", lock_path.display()))?;
        if rustix::fs::flock(&lock, rustix::fs::FlockOperation::NonBlockingLockExclusive).is_err() {
            bail!(
                "another tandem-primary is already running for this environment (state directory {} is locked)",
                dir.display()
            );
        }
        let path = dir.join(IDENTITY_FILE);
        let stored = ControlFile::load::<PrimaryIdentity>(&path, FORMAT_VERSION)?;
        let identity = adopt(stored, promoted);
        ControlFile::store(&path, FORMAT_VERSION, &identity)?;
        Ok(Self {
            dir: dir.to_path_buf(),
            identity,
            _lock: lock,
        })
    }
}

/// The identity to serve with: the stored one, or a newer promotion's.
fn adopt(stored: Option<PrimaryIdentity>, promoted: Option<&Promoted>) -> PrimaryIdentity {
    let created_unix_ms = stored
        .as_ref()
        .map_or_else(tandem_shared::now_unix_ms, |s| s.created_unix_ms);
    match (stored, promoted) {
        (Some(s), Some(p)) if p.epoch <= s.epoch => s,
        (stored, Some(p)) => {
            if let Some(s) = stored.filter(|s| s.env_id != p.env_id) {
                tracing::warn!(
                    stored = %s.env_id, promoted = %p.env_id,
                    "this state directory named another environment; the promoted directory's identity wins"
                );
            }
            PrimaryIdentity {
                env_id: p.env_id.clone(),
                epoch: p.epoch,
                created_unix_ms,
                history: p.history.clone(),
            }
        }
        (Some(s), None) => s,
        (None, None) => PrimaryIdentity {
            env_id: random_id(),
            epoch: 1,
            created_unix_ms,
            history: Vec::new(),
        },
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn identity_is_stable_and_locked() {
        let dir = tempfile::tempdir().unwrap();
        let a = PrimaryState::open(dir.path(), None).unwrap();
        let id = a.identity.clone();
        assert!(
            PrimaryState::open(dir.path(), None).is_err(),
            "second primary must be refused"
        );
        drop(a);
        let b = PrimaryState::open(dir.path(), None).unwrap();
        assert_eq!(b.identity, id);
    }

    #[test]
    fn a_newer_promotion_is_adopted_with_its_identity_and_history() {
        let dir = tempfile::tempdir().unwrap();
        let old = PrimaryState::open(dir.path(), None).unwrap().identity;
        let history = vec![EpochStart {
            epoch: 3,
            start: tandem_shared::LogPosition::new(4, 200),
            prev_record_digest: vec![9; 32],
        }];
        let p = Promoted {
            env_id: "promoted-env".into(),
            epoch: 3,
            history: history.clone(),
        };
        let b = PrimaryState::open(dir.path(), Some(&p)).unwrap().identity;
        assert_eq!((b.env_id.as_str(), b.epoch), ("promoted-env", 3));
        assert_eq!(b.history, history);
        assert_eq!(b.created_unix_ms, old.created_unix_ms);
        // Durable, and an older promotion does not move it back.
        let older = Promoted { epoch: 2, ..p };
        let c = PrimaryState::open(dir.path(), Some(&older))
            .unwrap()
            .identity;
        assert_eq!(c, b);
    }

    #[test]
    fn a_version_1_identity_reads_as_no_history() {
        let dir = tempfile::tempdir().unwrap();
        let v1 = serde_json::json!({"env_id": "e1", "epoch": 2, "created_unix_ms": 5});
        ControlFile::store(&dir.path().join(IDENTITY_FILE), 1, &v1).unwrap();
        let id = PrimaryState::open(dir.path(), None).unwrap().identity;
        assert_eq!((id.env_id.as_str(), id.epoch), ("e1", 2));
        assert!(id.history.is_empty());
    }
}
