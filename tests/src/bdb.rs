//! Helpers for driving real Berkeley DB 5.3 in tests: the C workload
//! (`tandem-workload`) and exact-prefix checker (`tandem-check`) built by
//! `build.rs` from `tests/c/`, plus wrappers around the `db5.3_*` tools.
//!
//! Workload transaction t writes data.db key t, rewrites `updates` older
//! data.db keys chosen by a PRNG seeded by t, writes hash.db key t, meta.db
//! key t and meta.db key 0 = t. `tandem-check DIR` opens the three databases
//! read-only without an environment (so recover first, e.g. with
//! [`recover_catastrophic`]) and proves they hold exactly transactions 1..M.

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

use anyhow::{anyhow, bail, Context, Result};

/// The databases the workload writes, for [`db_dump_all`].
pub const WORKLOAD_DBS: [&str; 3] = ["data.db", "meta.db", "hash.db"];

/// Absolute path of the `tandem-workload` executable.
pub fn workload_bin() -> &'static str {
    env!("TANDEM_WORKLOAD_BIN")
}

/// Absolute path of the `tandem-check` executable.
pub fn check_bin() -> &'static str {
    env!("TANDEM_CHECK_BIN")
}

/// Absolute path of the `tandem-waitbench` executable.
pub fn waitbench_bin() -> &'static str {
    env!("TANDEM_WAITBENCH_BIN")
}

/// Command-line options of `tandem-workload`.
#[derive(Debug, Clone)]
pub struct WorkloadOptions {
    /// `-n`: transactions to commit in this run (0 = until `seconds` or a signal).
    pub txns: u64,
    /// `-T`: stop after this many seconds.
    pub seconds: Option<u64>,
    /// `-r`: commits per second (0 = as fast as possible).
    pub rate: u64,
    /// `-c`: `txn_checkpoint` every N commits of this run (0 = never).
    pub checkpoint_every: u64,
    /// `-m`: `set_lg_max` in bytes.
    pub lg_max: u64,
    /// `-u`: older data.db keys rewritten per transaction.
    pub updates: u32,
    /// `-v`: value length in bytes (>= 32).
    pub value_len: u32,
    /// `-L`: append "t FILE OFFSET" (end of log after each commit) to this file.
    pub lsn_log: Option<PathBuf>,
    /// `-O K -o SECS`: hold transaction K open (written and log-flushed) for
    /// SECS seconds (negative = until SIGTERM/SIGINT, which then commits it,
    /// or SIGKILL); "OPEN K" is printed on stdout when it is held.
    pub open_txn: Option<(u64, i64)>,
    /// `-R`: open the environment with DB_RECOVER.
    pub recover: bool,
    /// `-S`: fully synchronous commits (default DB_TXN_WRITE_NOSYNC).
    pub full_sync: bool,
    /// `-K`: DB_CHKSUM on newly created databases.
    pub checksum: bool,
    /// `-p`: page size of newly created databases.
    pub page_size: Option<u32>,
    /// `-M`: cache size in MB (workload default 8).
    pub cache_mb: Option<u32>,
    /// `-q`: print only OPEN and DONE lines (no "COMMITTED t" progress).
    pub quiet: bool,
    /// `-W SOCKET -D FILE`: wait on the primary's wait socket after each
    /// commit (the C client, `contrib/c/tandem_wait.c`) and append `t` to
    /// FILE for each transaction whose wait returned durable.
    pub wait: Option<(PathBuf, PathBuf)>,
}

impl Default for WorkloadOptions {
    fn default() -> Self {
        WorkloadOptions {
            txns: 1000,
            seconds: None,
            rate: 0,
            checkpoint_every: 500,
            lg_max: 1 << 20,
            updates: 3,
            value_len: 100,
            lsn_log: None,
            open_txn: None,
            recover: false,
            full_sync: false,
            checksum: false,
            page_size: None,
            cache_mb: None,
            quiet: false,
            wait: None,
        }
    }
}

impl WorkloadOptions {
    /// The `tandem-workload` command for environment `env`; stdio is left to
    /// the caller.
    pub fn command(&self, env: &Path) -> Command {
        let mut cmd = Command::new(workload_bin());
        cmd.arg("-h").arg(env);
        cmd.arg("-n").arg(self.txns.to_string());
        if let Some(s) = self.seconds {
            cmd.arg("-T").arg(s.to_string());
        }
        cmd.arg("-r").arg(self.rate.to_string());
        cmd.arg("-c").arg(self.checkpoint_every.to_string());
        cmd.arg("-m").arg(self.lg_max.to_string());
        cmd.arg("-u").arg(self.updates.to_string());
        cmd.arg("-v").arg(self.value_len.to_string());
        if let Some(p) = &self.lsn_log {
            cmd.arg("-L").arg(p);
        }
        if let Some((k, secs)) = self.open_txn {
            cmd.arg("-O").arg(k.to_string());
            cmd.arg("-o").arg(secs.to_string());
        }
        if self.recover {
            cmd.arg("-R");
        }
        if self.full_sync {
            cmd.arg("-S");
        }
        if self.checksum {
            cmd.arg("-K");
        }
        if let Some(p) = self.page_size {
            cmd.arg("-p").arg(p.to_string());
        }
        if let Some(m) = self.cache_mb {
            cmd.arg("-M").arg(m.to_string());
        }
        if self.quiet {
            cmd.arg("-q");
        }
        if let Some((socket, durable)) = &self.wait {
            cmd.arg("-W").arg(socket).arg("-D").arg(durable);
        }
        cmd
    }
}

fn describe(out: &Output) -> String {
    format!(
        "{}\n--- stdout ---\n{}--- stderr ---\n{}",
        out.status,
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    )
}

/// Parses the `DONE last=<t>` line of the workload's stdout.
pub fn parse_done(stdout: &str) -> Option<u64> {
    stdout
        .lines()
        .rev()
        .find_map(|l| l.trim().strip_prefix("DONE last="))
        .and_then(|v| v.trim().parse().ok())
}

/// Runs the workload on `env` (created if missing) to completion and returns
/// the last committed transaction number (meta.db key 0).
pub fn run_workload(env: &Path, opts: &WorkloadOptions) -> Result<u64> {
    std::fs::create_dir_all(env).with_context(|| format!("create {}", env.display()))?;
    let mut cmd = opts.command(env);
    let out = cmd.output().with_context(|| format!("run {:?}", cmd))?;
    if !out.status.success() {
        bail!(
            "tandem-workload on {} failed: {}",
            env.display(),
            describe(&out)
        );
    }
    parse_done(&String::from_utf8_lossy(&out.stdout))
        .ok_or_else(|| anyhow!("tandem-workload printed no DONE line: {}", describe(&out)))
}

/// Runs `tandem-check dir` and returns M, the committed prefix the databases
/// hold exactly. Fails with the checker's output on FAIL or error.
pub fn check(dir: &Path) -> Result<u64> {
    let out = Command::new(check_bin())
        .arg(dir)
        .output()
        .with_context(|| format!("run {}", check_bin()))?;
    let stdout = String::from_utf8_lossy(&out.stdout);
    if out.status.success() {
        if let Some(m) = stdout
            .lines()
            .find_map(|l| l.trim().strip_prefix("OK M="))
            .and_then(|v| v.trim().parse().ok())
        {
            return Ok(m);
        }
    }
    bail!("tandem-check {} failed: {}", dir.display(), describe(&out))
}

/// Parses a `-L` file: one `(t, log file, offset)` per complete line; a
/// trailing partial line (the workload was killed mid-write) is ignored.
pub fn read_lsn_log(path: &Path) -> Result<Vec<(u64, u32, u32)>> {
    let bytes = std::fs::read(path).with_context(|| format!("read {}", path.display()))?;
    let text = String::from_utf8_lossy(&bytes);
    let complete = match text.rfind('\n') {
        Some(i) => &text[..i + 1],
        None => "",
    };
    complete
        .lines()
        .enumerate()
        .map(|(i, line)| {
            let f: Vec<&str> = line.split_whitespace().collect();
            let parsed = if f.len() == 3 {
                match (f[0].parse(), f[1].parse(), f[2].parse()) {
                    (Ok(t), Ok(file), Ok(off)) => Some((t, file, off)),
                    _ => None,
                }
            } else {
                None
            };
            parsed.ok_or_else(|| anyhow!("{}:{}: bad line {:?}", path.display(), i + 1, line))
        })
        .collect()
}

/// One line of a `-L` file: transaction, log file, offset.
pub type LsnLine = (u64, u32, u32);

/// Reads the complete lines of a `-L` file from byte `from` on, for a reader
/// that follows a running workload: returns the new `(t, log file, offset)`
/// entries and the offset to pass next time (just after the last complete
/// line, so a line being written is read whole later). A missing file reads
/// as empty.
pub fn read_lsn_log_from(path: &Path, from: u64) -> Result<(Vec<LsnLine>, u64)> {
    use std::io::{Read, Seek, SeekFrom};
    let mut f = match std::fs::File::open(path) {
        Ok(f) => f,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok((Vec::new(), from)),
        Err(e) => return Err(e).with_context(|| format!("open {}", path.display())),
    };
    f.seek(SeekFrom::Start(from))?;
    let mut bytes = Vec::new();
    f.read_to_end(&mut bytes)?;
    let complete = bytes.iter().rposition(|b| *b == b'\n').map_or(0, |i| i + 1);
    let mut out = Vec::new();
    for line in String::from_utf8_lossy(&bytes[..complete]).lines() {
        let f: Vec<&str> = line.split_whitespace().collect();
        match (f.first(), f.get(1), f.get(2)) {
            (Some(t), Some(file), Some(off)) if f.len() == 3 => {
                match (t.parse(), file.parse(), off.parse()) {
                    (Ok(t), Ok(file), Ok(off)) => out.push((t, file, off)),
                    _ => bail!("{}: bad line {:?}", path.display(), line),
                }
            }
            _ => bail!("{}: bad line {:?}", path.display(), line),
        }
    }
    Ok((out, from + complete as u64))
}

/// `db5.3_dump -p -h dir NAME` for each database, concatenated, each preceded
/// by a `### NAME` line: equal outputs mean equal logical contents (for
/// comparing two environments with the same history).
pub fn db_dump_all(dir: &Path, dbs: &[&str]) -> Result<Vec<u8>> {
    let mut all = Vec::new();
    for name in dbs {
        let out = Command::new("db5.3_dump")
            .arg("-p")
            .arg("-h")
            .arg(dir)
            .arg(name)
            .output()
            .context("run db5.3_dump (install db5.3-util: scripts/setup)")?;
        if !out.status.success() {
            bail!(
                "db5.3_dump -p -h {} {name} failed: {}",
                dir.display(),
                describe(&out)
            );
        }
        all.extend_from_slice(format!("### {name}\n").as_bytes());
        all.extend_from_slice(&out.stdout);
    }
    Ok(all)
}

/// `db5.3_verify -h dir NAME...` (structure of every page, key order); fails
/// with its output. Run after recovery, as `promote` does.
pub fn verify(dir: &Path, dbs: &[&str]) -> Result<()> {
    let out = Command::new("db5.3_verify")
        .arg("-h")
        .arg(dir)
        .args(dbs)
        .output()
        .context("run db5.3_verify (install db5.3-util: scripts/setup)")?;
    if !out.status.success() {
        bail!(
            "db5.3_verify -h {} {} failed: {}",
            dir.display(),
            dbs.join(" "),
            describe(&out)
        );
    }
    Ok(())
}

/// `db5.3_recover -c -h dir` (catastrophic recovery: replays every log file in
/// `dir`); fails with its stderr.
pub fn recover_catastrophic(dir: &Path) -> Result<()> {
    let out = Command::new("db5.3_recover")
        .arg("-c")
        .arg("-h")
        .arg(dir)
        .output()
        .context("run db5.3_recover (install db5.3-util: scripts/setup)")?;
    if !out.status.success() {
        bail!(
            "db5.3_recover -c -h {} failed: {}\n{}",
            dir.display(),
            out.status,
            String::from_utf8_lossy(&out.stderr)
        );
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parse_done_line() {
        assert_eq!(parse_done("COMMITTED 1000\nDONE last=1234\n"), Some(1234));
        assert_eq!(parse_done("OPEN 5\n"), None);
    }

    #[test]
    fn lsn_log_ignores_partial_tail() {
        let dir = std::env::temp_dir().join(format!("tandem-lsnlog-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let p = dir.join("l");
        std::fs::write(&p, "1 1 100\n2 1 250\n3 2 2").unwrap();
        assert_eq!(read_lsn_log(&p).unwrap(), vec![(1, 1, 100), (2, 1, 250)]);
        std::fs::write(&p, "1 x 100\n").unwrap();
        assert!(read_lsn_log(&p).is_err());
        std::fs::write(&p, "1 1 100\n2 1 250\n3 2 2").unwrap();
        let (first, at) = read_lsn_log_from(&p, 0).unwrap();
        assert_eq!(first, vec![(1, 1, 100), (2, 1, 250)]);
        std::fs::write(&p, "1 1 100\n2 1 250\n3 2 20\n").unwrap();
        assert_eq!(read_lsn_log_from(&p, at).unwrap().0, vec![(3, 2, 20)]);
        assert!(read_lsn_log_from(&dir.join("missing"), 0)
            .unwrap()
            .0
            .is_empty());
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
