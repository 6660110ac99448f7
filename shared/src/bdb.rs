//! The Berkeley DB command-line tools Tandem runs, in one place. Debian
//! installs them as `db5.3_recover` and so on (the unversioned names come
//! from a separate package), so the prefix is configurable through
//! `TANDEM_BDB_TOOL_PREFIX`.
//!
//! These calls block; async callers run them with `spawn_blocking`.

use crate::LogPosition;
use std::path::Path;
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
    urgent: bool,
}

/// The niceness [`BdbTools::urgent`] gives its tools, and their session's
/// scheduling group.
const URGENT_NICE: i32 = -10;
/// The same, as `/proc/self/autogroup` takes it (written between fork and
/// exec, where nothing may allocate).
const URGENT_NICE_TEXT: &[u8] = b"-10";

impl Default for BdbTools {
    fn default() -> Self {
        Self {
            prefix: std::env::var("TANDEM_BDB_TOOL_PREFIX").unwrap_or_else(|_| "db5.3_".to_owned()),
            urgent: false,
        }
    }
}

/// Whether [`BdbTools::urgent`] tools will get their raised priority:
/// this process holds `CAP_SYS_NICE` (root does).
pub fn urgent_allowed() -> bool {
    const CAP_SYS_NICE: u32 = 23;
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|status| {
            let hex = status.lines().find_map(|l| l.strip_prefix("CapEff:"))?;
            u64::from_str_radix(hex.trim(), 16).ok()
        })
        .is_some_and(|caps| caps & (1 << CAP_SYS_NICE) != 0)
}

/// Makes `command` run ahead of other work (see [`BdbTools::urgent`]).
fn first_in_line(command: &mut Command) {
    use std::os::unix::process::CommandExt;
    // SAFETY: between fork and exec the closure makes only
    // async-signal-safe system calls (prctl, setsid, open, write, close,
    // setpriority) and allocates nothing. Their failures are ignored: no
    // privilege only means the normal priority.
    unsafe {
        command.pre_exec(|| {
            // An orphaned recovery must not run on beside the next promote.
            libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL);
            libc::setsid();
            let fd = libc::open(
                c"/proc/self/autogroup".as_ptr(),
                libc::O_WRONLY | libc::O_CLOEXEC,
            );
            if fd >= 0 {
                libc::write(fd, URGENT_NICE_TEXT.as_ptr().cast(), URGENT_NICE_TEXT.len());
                libc::close(fd);
            }
            libc::setpriority(libc::PRIO_PROCESS, 0, URGENT_NICE);
            Ok(())
        });
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

    /// Tools that go ahead of the machine's other work, for promote, whose
    /// time is downtime: each runs in a session of its own (the kernel's
    /// autogroup, which shares the CPU per session) at niceness -10, and
    /// dies with the thread that started it. Without the privilege
    /// (`CAP_SYS_NICE`) it keeps the normal priority, in its own session.
    /// On 2 loaded cores this cut a recovery's waits for a CPU from
    /// 0.1–1.5 s to 20–40 ms (BDB-NOTES.md §5).
    pub fn urgent(mut self) -> Self {
        self.urgent = true;
        self
    }

    fn run(&self, name: &str, args: &[&std::ffi::OsStr]) -> Result<Output, BdbError> {
        let tool = self.tool(name);
        let mut command = Command::new(&tool);
        command.args(args);
        if self.urgent {
            first_in_line(&mut command);
        }
        let out = command.output().map_err(|source| BdbError::Spawn {
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
    /// `ckp_lsn` (BDB-NOTES.md §1). Joins the environment read-only; changes no
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

#[cfg(test)]
mod tests {
    use super::*;

    /// (pid, session, nice) of a shell run as a tool by `tools`.
    fn shell_identity(tools: &BdbTools) -> (i64, i64, i64) {
        let tools = BdbTools {
            prefix: "/bin/".into(),
            ..tools.clone()
        };
        let out = tools
            .run("sh", &["-c".as_ref(), "cat /proc/$$/stat".as_ref()])
            .unwrap();
        let stat = String::from_utf8(out.stdout).unwrap();
        // Fields after the command name, which ends with ')': state is 3.
        let (pid, rest) = stat.split_once(" (").unwrap();
        let f: Vec<&str> = rest.rsplit_once(") ").unwrap().1.split(' ').collect();
        let field = |n: usize| f[n - 3].parse::<i64>().unwrap();
        (pid.parse().unwrap(), field(6), field(19))
    }

    #[test]
    fn urgent_tools_run_in_their_own_session_ahead_of_other_work() {
        // SAFETY: getsid(0) reads the calling process's session id.
        let ours = i64::from(unsafe { libc::getsid(0) });
        // SAFETY: getpriority reads this process's niceness.
        let our_nice = i64::from(unsafe { libc::getpriority(libc::PRIO_PROCESS, 0) });
        let (_, session, nice) = shell_identity(&BdbTools::default());
        assert_eq!((session, nice), (ours, our_nice));
        let (pid, session, nice) = shell_identity(&BdbTools::default().urgent());
        assert_eq!(
            session, pid,
            "the tool leads a session (an autogroup) of its own"
        );
        if urgent_allowed() {
            assert_eq!(nice, i64::from(URGENT_NICE));
        }
    }

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
