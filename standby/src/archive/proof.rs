//! Proving a backup recovers: a copy in a scratch directory, catastrophic
//! recovery (`db_recover -c`, to a time with `-t`) and `db_verify` of every
//! database. Archiving (`--verify`), `verify-archive` and `restore` all go
//! through here.

use super::manifest::Manifest;
use super::store::{copy_backup, StoreError};
use super::time::{bdb_time_utc, rfc3339};
use serde::Serialize;
use std::fs;
use std::io;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Instant;
use tandem_shared::bdb::{parse_last_valid_lsn, BdbError, BdbTools};
use tandem_shared::envlayout::DB_CONFIG;
use tandem_shared::ioerror::{io_err, IoError};
use tandem_shared::LogPosition;

/// Recovery gets a bigger cache (BDB-NOTES.md §5: it halved the replay time) when
/// DB_CONFIG sets none; a restored environment gets the backup's DB_CONFIG
/// back, byte for byte, before it is renamed into place.
const SCRATCH_CACHE: &str = "set_cachesize 0 268435456 1";

/// A recovery proof that could not run or did not pass.
#[derive(Debug, thiserror::Error)]
pub enum ProofError {
    #[error(transparent)]
    Store(#[from] StoreError),
    #[error(transparent)]
    Io(#[from] IoError),
    #[error("{what}: {source}")]
    Bdb { what: String, source: BdbError },
}

/// A directory removed when dropped (unless `keep` is set), named
/// `tandem-<tag>-<pid>-<random>` and flocked (the directory itself,
/// exclusive) while it lives, so [`sweep_dead_scratch`] can tell a dead
/// owner's leftovers from a live one's.
pub(crate) struct ScratchDir {
    pub(crate) path: PathBuf,
    pub(crate) keep: bool,
    _lock: Option<fs::File>,
}

/// The tags of scratch directories (see [`ScratchDir::new`]).
const SCRATCH_TAGS: [&str; 4] = ["follow-stage", "stage", "verify", "fetch"];

impl ScratchDir {
    pub(crate) fn new(parent: Option<&Path>, tag: &str) -> Result<Self, ProofError> {
        let parent = scratch_parent(parent);
        fs::create_dir_all(&parent).map_err(io_err(format!("creating {}", parent.display())))?;
        // Removed by this type's Drop, not tempfile's (`keep`). The pid in
        // the name is for people; the lock is what the sweep trusts.
        let path = tempfile::Builder::new()
            .prefix(&format!("tandem-{tag}-{}-", std::process::id()))
            .tempdir_in(&parent)
            .map_err(io_err(format!(
                "creating a scratch directory in {}",
                parent.display()
            )))?
            .keep();
        let lock = fs::File::open(&path).ok().filter(|d| {
            use rustix::fs::{flock, FlockOperation};
            flock(d, FlockOperation::NonBlockingLockExclusive).is_ok()
        });
        Ok(Self {
            path,
            keep: false,
            _lock: lock,
        })
    }
}

impl ScratchDir {
    /// `path` (not created here), removed when dropped, without a lock.
    pub(crate) fn unlocked(path: PathBuf) -> Self {
        Self {
            path,
            keep: false,
            _lock: None,
        }
    }
}

fn scratch_parent(parent: Option<&Path>) -> PathBuf {
    parent
        .map(Path::to_path_buf)
        .unwrap_or_else(std::env::temp_dir)
}

/// Removes the scratch directories in `parent` (default: the temporary
/// directory) that a killed archiver left: those whose process is gone and
/// whose lock nobody holds (both: a pid alone may be another pid
/// namespace's, or reused). Returns the directories removed.
pub(crate) fn sweep_dead_scratch(parent: Option<&Path>) -> Vec<PathBuf> {
    let parent = scratch_parent(parent);
    let mut removed = Vec::new();
    for entry in fs::read_dir(&parent).into_iter().flatten().flatten() {
        let name = entry.file_name().to_string_lossy().into_owned();
        let Some(rest) = name.strip_prefix("tandem-") else {
            continue;
        };
        // `<tag>-<pid>-<suffix>` (tempfile's random suffix; earlier
        // versions: `<unix ms>-<n>`).
        let Some(pid) = SCRATCH_TAGS.iter().find_map(|t| {
            let (pid, suffix) = rest.strip_prefix(t)?.strip_prefix('-')?.split_once('-')?;
            (!suffix.is_empty()).then_some(pid.parse::<u32>().ok()?)
        }) else {
            continue;
        };
        let path = entry.path();
        if pid == std::process::id() || Path::new("/proc").join(pid.to_string()).exists() {
            continue;
        }
        let Ok(dir) = fs::File::open(&path) else {
            continue;
        };
        use rustix::fs::{flock, FlockOperation};
        if flock(&dir, FlockOperation::NonBlockingLockExclusive).is_err() {
            continue;
        }
        if fs::remove_dir_all(&path).is_ok() {
            tracing::info!(dir = %path.display(), pid, "removed a scratch directory left by a process that is gone");
            removed.push(path);
        }
    }
    removed
}

impl Drop for ScratchDir {
    fn drop(&mut self) {
        if !self.keep {
            let _ = fs::remove_dir_all(&self.path);
        }
    }
}

/// What a recovery proof found.
#[derive(Debug, Clone, Default, Serialize)]
pub struct Proof {
    pub seconds: f64,
    pub recovery_seconds: f64,
    pub recovered_to: Option<LogPosition>,
    pub databases_verified: usize,
}

/// Copies a backup to a scratch directory, runs catastrophic recovery and
/// `db_verify` there, and removes the scratch copy. The caller makes sure
/// the backup does not change meanwhile.
pub fn prove_recovers(
    backup: &Path,
    m: &Manifest,
    scratch: Option<&Path>,
) -> Result<Proof, ProofError> {
    let started = Instant::now();
    let dir = ScratchDir::new(scratch, "verify")?;
    copy_backup(backup, m, &dir.path)?;
    let mut proof = recover_scratch(&dir.path, m)?;
    proof.seconds = started.elapsed().as_secs_f64();
    Ok(proof)
}

/// Gives recovery in `home` a bigger cache unless DB_CONFIG sets one.
/// Returns the original DB_CONFIG (None: there was none), for
/// [`restore_config`].
pub(crate) fn boost_cache(home: &Path) -> Result<Option<Vec<u8>>, ProofError> {
    let cfg = home.join(DB_CONFIG);
    let original = match fs::read(&cfg) {
        Ok(b) => Some(b),
        Err(e) if e.kind() == io::ErrorKind::NotFound => None,
        Err(e) => return Err(io_err(format!("reading {}", cfg.display()))(e).into()),
    };
    let mut config = String::from_utf8_lossy(original.as_deref().unwrap_or_default()).into_owned();
    if !config.contains("set_cachesize") {
        config.push_str(&format!("\n{SCRATCH_CACHE}\n"));
        fs::write(&cfg, config).map_err(io_err(format!("writing {}", cfg.display())))?;
    }
    Ok(original)
}

/// Puts DB_CONFIG back exactly as the backup had it.
pub(crate) fn restore_config(home: &Path, original: Option<Vec<u8>>) -> Result<(), ProofError> {
    let cfg = home.join(DB_CONFIG);
    match original {
        Some(bytes) => fs::write(&cfg, bytes),
        None => fs::remove_file(&cfg),
    }
    .map_err(io_err(format!("restoring {}", cfg.display())))?;
    Ok(())
}

/// Recovery and `db_verify` in a scratch copy of a backup.
pub(crate) fn recover_scratch(home: &Path, m: &Manifest) -> Result<Proof, ProofError> {
    boost_cache(home)?;
    let rec = run_recover(home, None)?;
    let verified = verify_databases(home, m)?;
    Ok(Proof {
        recovery_seconds: rec.seconds,
        recovered_to: rec.recovered_to,
        databases_verified: verified,
        ..Default::default()
    })
}

pub(crate) struct Recovered {
    pub(crate) seconds: f64,
    pub(crate) recovered_to: Option<LogPosition>,
}

/// `db_recover -c -v [-t UTC time] -h home`, with `TZ=UTC0` so `-t` means
/// UTC whatever the host's zone.
pub(crate) fn run_recover(home: &Path, until: Option<i64>) -> Result<Recovered, ProofError> {
    let started = Instant::now();
    let tool = BdbTools::default().tool("recover");
    let mut cmd = Command::new(&tool);
    cmd.env("TZ", "UTC0").args(["-c", "-v"]);
    if let Some(t) = until {
        cmd.arg("-t").arg(bdb_time_utc(t));
    }
    cmd.arg("-h").arg(home);
    let what = match until {
        Some(t) => format!("catastrophic recovery to {}", rfc3339(t)),
        None => "catastrophic recovery".to_owned(),
    };
    let out = cmd.output().map_err(|source| ProofError::Bdb {
        what: what.clone(),
        source: BdbError::Spawn {
            tool: tool.clone(),
            source,
        },
    })?;
    let mut text = String::from_utf8_lossy(&out.stdout).into_owned();
    text.push_str(&String::from_utf8_lossy(&out.stderr));
    if !out.status.success() {
        return Err(ProofError::Bdb {
            what,
            source: BdbError::Failed {
                tool,
                status: out.status.to_string(),
                stderr: text.trim().to_owned(),
            },
        });
    }
    Ok(Recovered {
        seconds: started.elapsed().as_secs_f64(),
        recovered_to: parse_last_valid_lsn(&text),
    })
}

/// `db_verify` of every database the manifest lists.
pub(crate) fn verify_databases(home: &Path, m: &Manifest) -> Result<usize, ProofError> {
    let names: Vec<String> = m.databases().map(|f| f.name.clone()).collect();
    verify_named(home, &names)
}

/// `db_verify` of each of `databases`, one after another.
pub(crate) fn verify_named(home: &Path, databases: &[String]) -> Result<usize, ProofError> {
    let tools = BdbTools::default();
    for name in databases {
        tools.verify(home, name).map_err(|source| ProofError::Bdb {
            what: format!("db_verify of {name}"),
            source,
        })?;
    }
    Ok(databases.len())
}
