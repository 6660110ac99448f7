//! The Berkeley DB command-line tools Tandem runs, in one place. Debian
//! installs them as `db5.3_recover` and so on (the unversioned names come
//! from a separate package), so the prefix is configurable through
//! `TANDEM_BDB_TOOL_PREFIX`.
//!
//! These calls block; async callers run them with `spawn_blocking`.

use crate::LogPosition;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::time::{Duration, Instant};

#[derive(Debug, thiserror::Error)]
pub enum BdbError {
    #[error("could not run {tool}: {source} (is db5.3-util installed? run scripts/setup)")]
    Spawn {
        tool: String,
        source: std::io::Error,
    },
    #[error("{tool} failed ({status}): {stderr}")]
    Failed {
        tool: String,
        status: String,
        stderr: String,
    },
}

#[derive(Debug, Clone)]
pub struct BdbTools {
    prefix: String,
}

impl Default for BdbTools {
    fn default() -> Self {
        Self {
            prefix: std::env::var("TANDEM_BDB_TOOL_PREFIX").unwrap_or_else(|_| "db5.3_".to_owned()),
        }
    }
}

/// What a catastrophic recovery did.
#[derive(Debug, Clone)]
pub struct RecoveryReport {
    pub duration: Duration,
    /// The end of the log recovery found ("Finding last valid log LSN").
    pub recovered_to: Option<LogPosition>,
    pub output: String,
}

impl BdbTools {
    pub fn tool(&self, name: &str) -> String {
        format!("{}{}", self.prefix, name)
    }

    fn run(&self, name: &str, args: &[&std::ffi::OsStr]) -> Result<Output, BdbError> {
        let tool = self.tool(name);
        let out = Command::new(&tool)
            .args(args)
            .output()
            .map_err(|source| BdbError::Spawn {
                tool: tool.clone(),
                source,
            })?;
        if !out.status.success() {
            let mut stderr = String::from_utf8_lossy(&out.stderr).trim().to_owned();
            if stderr.is_empty() {
                stderr = String::from_utf8_lossy(&out.stdout).trim().to_owned();
            }
            return Err(BdbError::Failed {
                tool,
                status: out.status.to_string(),
                stderr,
            });
        }
        Ok(out)
    }

    /// Log files BDB no longer needs for normal recovery (`db_archive`
    /// without flags): every file wholly before the last checkpoint's
    /// `ckp_lsn` (BDB.md §1). Joins the environment read-only; changes no
    /// file.
    pub fn inactive_logs(&self, home: &Path) -> Result<Vec<u32>, BdbError> {
        let out = self.run("archive", &["-h".as_ref(), home.as_os_str()])?;
        Ok(String::from_utf8_lossy(&out.stdout)
            .lines()
            .filter_map(|l| {
                Path::new(l.trim())
                    .file_name()?
                    .to_str()
                    .and_then(crate::logfile::parse_log_file_name)
            })
            .collect())
    }

    /// `db_recover -c -v` in `home`. Writes into `home`'s last log file and
    /// database files: never run it on a directory that is still streaming.
    pub fn recover_catastrophic(&self, home: &Path) -> Result<RecoveryReport, BdbError> {
        let started = Instant::now();
        let out = self.run(
            "recover",
            &[
                "-c".as_ref(),
                "-v".as_ref(),
                "-h".as_ref(),
                home.as_os_str(),
            ],
        )?;
        let mut output = String::from_utf8_lossy(&out.stdout).into_owned();
        output.push_str(&String::from_utf8_lossy(&out.stderr));
        Ok(RecoveryReport {
            duration: started.elapsed(),
            recovered_to: parse_last_valid_lsn(&output),
            output,
        })
    }

    /// `db_verify` of one database file of the environment in `home`.
    pub fn verify(&self, home: &Path, file: &str) -> Result<(), BdbError> {
        self.run(
            "verify",
            &[
                "-q".as_ref(),
                "-h".as_ref(),
                home.as_os_str(),
                file.as_ref(),
            ],
        )
        .map(|_| ())
    }

    /// `db_dump -p` of one database, for comparing environments.
    pub fn dump(&self, home: &Path, file: &str) -> Result<Vec<u8>, BdbError> {
        self.run(
            "dump",
            &[
                "-p".as_ref(),
                "-h".as_ref(),
                home.as_os_str(),
                file.as_ref(),
            ],
        )
        .map(|o| o.stdout)
    }
}

/// Parses "Finding last valid log LSN: file: 45 offset 1012164".
pub fn parse_last_valid_lsn(output: &str) -> Option<LogPosition> {
    let line = output
        .lines()
        .find(|l| l.contains("Finding last valid log LSN"))?;
    let mut words = line.split_whitespace();
    let mut file = None;
    let mut offset = None;
    while let Some(w) = words.next() {
        match w {
            "file:" => file = words.next().and_then(|v| v.parse().ok()),
            "offset" => offset = words.next().and_then(|v| v.parse().ok()),
            _ => {}
        }
    }
    Some(LogPosition::new(file?, offset?))
}

/// A scratch directory path next to `dir` (same filesystem, so renames and
/// clones work).
pub fn sibling(dir: &Path, suffix: &str) -> PathBuf {
    let mut s = dir.as_os_str().to_owned();
    s.push(suffix);
    PathBuf::from(s)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_recover_output() {
        let out = "BDB1513 Finding last valid log LSN: file: 45 offset 1012164\nBDB1505 Recovery starting from [1][28]\n";
        assert_eq!(
            parse_last_valid_lsn(out),
            Some(LogPosition::new(45, 1012164))
        );
        assert_eq!(parse_last_valid_lsn("nothing"), None);
    }
}
