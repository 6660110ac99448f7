//! Promote's recovery runs with the cache the readiness check recovers
//! with, so it replays at the rate the check measured (and the status's
//! estimate holds), without changing the configuration applications get.

use crate::state::StandbyDir;
use anyhow::{Context, Result};
use tandem_shared::durable::{fsync_dir, write_file_atomic};
use tandem_shared::envlayout::DB_CONFIG;

/// The environment's own `DB_CONFIG` (or `None`: it had none), kept in
/// `.tandem` while promote's recovery runs with a bigger cache.
const SAVED_DB_CONFIG: &str = "promote-db-config.json";

/// Gives promote's recovery the cache the readiness check recovers with
/// (`RECOVERY_CACHE`), unless the environment sets its own: the same
/// replay rate the check measured, and up to half the replay time. The
/// original is saved durably first, so [`restore_db_config`] puts it back
/// even after a crash. Returns whether it changed `DB_CONFIG`.
pub(super) fn boost_recovery_cache(dir: &StandbyDir) -> Result<bool> {
    let path = dir.root.join(DB_CONFIG);
    let original = match std::fs::read(&path) {
        Ok(b) => Some(b),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => None,
        Err(e) => return Err(e).context("reading DB_CONFIG"),
    };
    if original
        .as_deref()
        .is_some_and(|b| String::from_utf8_lossy(b).contains("set_cachesize"))
    {
        return Ok(false);
    }
    let saved = serde_json::to_vec(&original).context("saving DB_CONFIG")?;
    write_file_atomic(&dir.meta().join(SAVED_DB_CONFIG), &saved)
        .context("saving DB_CONFIG before the recovery")?;
    let mut boosted = original.unwrap_or_default();
    boosted.extend_from_slice(format!("\n{}\n", crate::readiness::RECOVERY_CACHE).as_bytes());
    write_file_atomic(&path, &boosted).context("giving the recovery a bigger cache")?;
    Ok(true)
}

/// Puts back the `DB_CONFIG` [`boost_recovery_cache`] saved, if any.
pub(super) fn restore_db_config(dir: &StandbyDir) -> Result<()> {
    let saved_path = dir.meta().join(SAVED_DB_CONFIG);
    let saved = match std::fs::read(&saved_path) {
        Ok(b) => b,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(()),
        Err(e) => return Err(e).context("reading the saved DB_CONFIG"),
    };
    let original: Option<Vec<u8>> =
        serde_json::from_slice(&saved).context("reading the saved DB_CONFIG")?;
    let path = dir.root.join(DB_CONFIG);
    match original {
        Some(bytes) => write_file_atomic(&path, &bytes).context("restoring DB_CONFIG")?,
        None => match std::fs::remove_file(&path) {
            Ok(()) => fsync_dir(&dir.root).context("removing the recovery's DB_CONFIG")?,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
            Err(e) => return Err(e).context("removing the recovery's DB_CONFIG"),
        },
    }
    std::fs::remove_file(&saved_path).context("removing the saved DB_CONFIG")?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn dir() -> (tempfile::TempDir, StandbyDir) {
        let t = tempfile::tempdir().unwrap();
        let d = StandbyDir::new(t.path());
        d.create().unwrap();
        (t, d)
    }

    #[test]
    fn an_environment_without_db_config_gets_none_back() {
        let (_t, d) = dir();
        assert!(boost_recovery_cache(&d).unwrap());
        let during = std::fs::read_to_string(d.root.join(DB_CONFIG)).unwrap();
        assert!(during.contains("set_cachesize"));
        // A crash here: the next promote puts it back first.
        restore_db_config(&d).unwrap();
        assert!(!d.root.join(DB_CONFIG).exists());
        assert!(!d.meta().join(SAVED_DB_CONFIG).exists());
        restore_db_config(&d).unwrap();
    }

    #[test]
    fn the_environment_s_own_config_comes_back_byte_for_byte() {
        let (_t, d) = dir();
        let own = b"set_lg_dir logs\nset_flags DB_TXN_WRITE_NOSYNC\n\xff";
        std::fs::write(d.root.join(DB_CONFIG), own).unwrap();
        assert!(boost_recovery_cache(&d).unwrap());
        assert_ne!(std::fs::read(d.root.join(DB_CONFIG)).unwrap(), own);
        restore_db_config(&d).unwrap();
        assert_eq!(std::fs::read(d.root.join(DB_CONFIG)).unwrap(), own);
    }

    #[test]
    fn a_cache_the_environment_sets_is_left_alone() {
        let (_t, d) = dir();
        let own = b"set_cachesize 0 1048576 1\n";
        std::fs::write(d.root.join(DB_CONFIG), own).unwrap();
        assert!(!boost_recovery_cache(&d).unwrap());
        assert_eq!(std::fs::read(d.root.join(DB_CONFIG)).unwrap(), own);
        assert!(!d.meta().join(SAVED_DB_CONFIG).exists());
    }
}
