//! A primary's exit does not wait for blocking work that never returns.
//! The etcd fault campaign (2026-12-07, round 23) found a fenced primary
//! that printed "stopped" and its refusal, then ran on: its retention
//! pass's `db_archive` was stuck in an environment whose application had
//! been killed, and the runtime waited for it. Here the real `db_archive`
//! is wrapped (`TANDEM_BDB_TOOL_PREFIX`) so that it blocks once a test file
//! exists; SIGTERM must still end the primary within its shutdown stages
//! and exit grace.

use anyhow::{ensure, Context, Result};
use std::os::unix::fs::PermissionsExt;
use std::time::{Duration, Instant};
use tandem_tests::bdb::{self, WorkloadOptions};
use tandem_tests::harness::*;

/// Every Berkeley DB tool as Debian installs it; `archive` blocks while
/// `DIR/hang` exists (its pid in `DIR/hung.pid`), else runs the real one.
fn wrapped_tools(dir: &std::path::Path) -> Result<String> {
    std::fs::create_dir_all(dir)?;
    for entry in std::fs::read_dir("/usr/bin")? {
        let name = entry?.file_name();
        let name = name.to_string_lossy();
        if name.starts_with("db5.3_") && name != "db5.3_archive" {
            std::os::unix::fs::symlink(format!("/usr/bin/{name}"), dir.join(&*name))?;
        }
    }
    let d = dir.display();
    let archive = dir.join("db5.3_archive");
    std::fs::write(
        &archive,
        format!(
            "#!/bin/sh\nif [ -e '{d}/hang' ]; then echo $$ > '{d}/hung.pid'; exec sleep 600; fi\nexec /usr/bin/db5.3_archive \"$@\"\n"
        ),
    )?;
    std::fs::set_permissions(&archive, std::fs::Permissions::from_mode(0o755))?;
    Ok(format!("{d}/db5.3_"))
}

#[test]
fn sigterm_ends_a_primary_whose_retention_pass_never_returns() -> Result<()> {
    let s = Scratch::new()?;
    let tools = s.path("tools");
    // The only test of this binary: no other test sees the variable.
    std::env::set_var("TANDEM_BDB_TOOL_PREFIX", wrapped_tools(&tools)?);
    bdb::run_workload(
        &s.path("env"),
        &WorkloadOptions {
            txns: 100,
            ..Default::default()
        },
    )?;
    let args = ["--retention", "--retention-interval-secs", "1"];
    let mut primary = start_primary(s.root(), &s.path("env"), &s.certs, "127.0.0.1:0", &args)?;
    std::fs::write(tools.join("hang"), b"")?;
    let pid_file = tools.join("hung.pid");
    wait_for(
        "a retention pass stuck in db_archive",
        Duration::from_secs(30),
        || Ok(pid_file.exists()),
    )?;
    let asked = Instant::now();
    let status = primary.proc.stop(Duration::from_secs(30));
    let took = asked.elapsed();
    // The stuck tool is this test's to end, whatever happened.
    if let Some(pid) = std::fs::read_to_string(&pid_file)
        .ok()
        .and_then(|p| p.trim().parse::<i32>().ok())
    {
        // SAFETY: signalling the `sleep` the wrapper started for this test.
        unsafe { libc::kill(pid, libc::SIGKILL) };
    }
    let status = status.context("the primary did not exit on SIGTERM")?;
    let log = primary.proc.log_text();
    ensure!(status.success(), "exit {status}: {log}");
    ensure!(
        log.contains("the retention pass did not end in time"),
        "the pass was not stuck at exit: {log}"
    );
    // Its shutdown stage (5 s) and the exit grace (1 s), with room for a
    // loaded machine.
    ensure!(
        took < Duration::from_secs(12),
        "SIGTERM took {took:?} to end the primary"
    );
    eprintln!("SIGTERM to exit with a stuck retention pass: {took:?}");
    Ok(())
}
