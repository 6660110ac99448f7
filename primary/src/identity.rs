//! Who this primary is: a random environment identity, created once and kept
//! in the primary's state directory, and the epoch (fencing token). A
//! standby that was filled from one environment refuses another's data, and
//! the state directory is locked so two primaries cannot serve one
//! environment.

use anyhow::{bail, Context, Result};
use serde::{Deserialize, Serialize};
use std::fs::File;
use std::path::{Path, PathBuf};
use tandem_shared::durable::ControlFile;

const IDENTITY_FILE: &str = "identity";
const LOCK_FILE: &str = "lock";
const FORMAT_VERSION: u32 = 1;

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct PrimaryIdentity {
    pub env_id: String,
    pub epoch: u64,
    pub created_unix_ms: u64,
}

/// The locked state directory; the lock lasts as long as this value.
pub struct PrimaryState {
    pub dir: PathBuf,
    pub identity: PrimaryIdentity,
    _lock: File,
}

pub fn random_id() -> String {
    let bytes: [u8; 16] = rand::random();
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

impl PrimaryState {
    /// Opens (creating on first use) the state directory and takes its lock.
    /// `min_epoch` raises the stored epoch, e.g. when a promoted standby's
    /// directory becomes a primary.
    pub fn open(dir: &Path, min_epoch: u64) -> Result<Self> {
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
        let mut identity = match ControlFile::load::<PrimaryIdentity>(&path, FORMAT_VERSION)? {
            Some(id) => id,
            None => PrimaryIdentity {
                env_id: random_id(),
                epoch: 1,
                created_unix_ms: tandem_shared::now_unix_ms(),
            },
        };
        identity.epoch = identity.epoch.max(min_epoch);
        ControlFile::store(&path, FORMAT_VERSION, &identity)?;
        Ok(Self {
            dir: dir.to_path_buf(),
            identity,
            _lock: lock,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn identity_is_stable_and_locked() {
        let dir = tempfile::tempdir().unwrap();
        let a = PrimaryState::open(dir.path(), 0).unwrap();
        let id = a.identity.clone();
        assert!(
            PrimaryState::open(dir.path(), 0).is_err(),
            "second primary must be refused"
        );
        drop(a);
        let b = PrimaryState::open(dir.path(), 3).unwrap();
        assert_eq!(b.identity.env_id, id.env_id);
        assert_eq!(b.identity.epoch, 3);
    }
}
