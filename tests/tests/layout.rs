//! Issue 11, finding 2: every file BDB needs reaches the standby, and the
//! readiness check recovers exactly what promote recovers. Real binaries,
//! real Berkeley DB: databases below the home (`sub/deeper/x.db`), a
//! partitioned database (`__dbp.*`) and a queue with extents (`__dbq.*`).

use anyhow::{bail, ensure, Context, Result};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;
use tandem_tests::bdb::{self, WORKLOAD_DBS};
use tandem_tests::harness::*;

const LONG: Duration = Duration::from_secs(180);
const NESTED_DBS: [&str; 3] = ["sub/deeper/x.db", "sub/part.db", "sub/queue.db"];

/// Builds `tests/c/layout.c` into `dir` (the C workload's build lives in
/// build.rs; this one is only needed here).
fn layout_bin(dir: &Path) -> Result<PathBuf> {
    let src = Path::new(env!("CARGO_MANIFEST_DIR")).join("c/layout.c");
    let exe = dir.join("tandem-layout");
    let out = Command::new(std::env::var("CC").unwrap_or_else(|_| "cc".into()))
        .args(["-O2", "-Wall", "-o"])
        .arg(&exe)
        .arg(&src)
        .arg("-ldb-5.3")
        .output()
        .context("running the C compiler")?;
    ensure!(
        out.status.success(),
        "compiling layout.c: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    Ok(exe)
}

fn run_layout(exe: &Path, env: &Path, n: u64) -> Result<()> {
    let out = Command::new(exe).arg(env).arg(n.to_string()).output()?;
    ensure!(
        out.status.success(),
        "tandem-layout failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    Ok(())
}

fn standby_cmd(args: &[&str], dir: &Path) -> Result<(std::process::ExitStatus, String)> {
    let out = Command::new(bin("tandem-standby"))
        .args(args)
        .arg("--dir")
        .arg(dir)
        .output()?;
    Ok((
        out.status,
        format!(
            "{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        ),
    ))
}

#[test]
fn nested_partitioned_and_queue_databases_reach_the_standby_and_recover() -> Result<()> {
    let s = Scratch::new()?;
    let layout = layout_bin(s.root())?;
    let env = s.path("env");
    bdb::run_workload(&env, &workload(1000, 500))?;
    run_layout(&layout, &env, 400)?;
    let primary = start_primary(s.root(), &env, &s.certs, "127.0.0.1:0", &[])?;
    let standby_dir = s.path("standby");
    let _standby = start_standby(
        s.root(),
        &standby_dir,
        &primary.url(),
        &s.certs,
        &["--check-interval-secs", "0"],
    )?;
    // More after the base: new queue extents appear while it streams.
    run_layout(&layout, &env, 400)?;
    let last = bdb::run_workload(&env, &workload(500, 500))?;
    wait_caught_up(&standby_dir, &env, LONG)?;
    for f in [
        "sub/deeper/x.db",
        "sub/part.db",
        "sub/__dbp.part.db.000",
        "sub/__dbp.part.db.001",
        "sub/queue.db",
        "sub/__dbq.queue.db.0",
    ] {
        wait_for(f, LONG, || Ok(standby_dir.join(f).is_file()))?;
    }

    // The readiness check proves what promote will recover.
    let (status, out) = standby_cmd(&["check", "--json"], &standby_dir)?;
    ensure!(status.success(), "check failed: {out}");
    let st = standby_status(&standby_dir)?;
    assert_eq!(st["recoverable"], true, "{st}");

    let (status, out) = standby_cmd(
        &["promote", "--json", "--catch-up-timeout-secs", "120"],
        &standby_dir,
    )?;
    ensure!(status.success(), "promote failed: {out}");
    assert!(out.contains("\"switchover\""), "{out}");
    assert_eq!(bdb::check(&standby_dir)?, last);
    let mut all: Vec<&str> = WORKLOAD_DBS.to_vec();
    all.extend(NESTED_DBS);
    assert_eq!(
        bdb::db_dump_all(&env, &all)?,
        bdb::db_dump_all(&standby_dir, &all)?
    );
    Ok(())
}

#[test]
fn status_is_not_recoverable_once_the_check_of_its_base_failed() -> Result<()> {
    let p = pair(&workload(3000, 500))?;
    let dir = p.s.path("standby");
    let (status, out) = standby_cmd(&["check"], &dir)?;
    ensure!(status.success(), "check failed: {out}");
    let mut standby = p.standby;
    standby.stop(Duration::from_secs(60))?;
    // A bit flipped at rest in the log the base needs: recovery fails.
    let logs: Vec<PathBuf> = {
        let mut v: Vec<PathBuf> = std::fs::read_dir(&dir)?
            .flatten()
            .map(|e| e.path())
            .filter(|p| {
                p.file_name()
                    .is_some_and(|n| n.to_string_lossy().starts_with("log."))
            })
            .collect();
        v.sort();
        v
    };
    let first = logs.first().context("no log file")?;
    let mut bytes = std::fs::read(first)?;
    ensure!(bytes.len() > 20_000, "log too small");
    for b in &mut bytes[10_000..10_064] {
        *b ^= 0x5a;
    }
    std::fs::write(first, &bytes)?;
    let (status, out) = standby_cmd(&["check"], &dir)?;
    ensure!(
        !status.success(),
        "the check passed on a damaged log: {out}"
    );
    let st = standby_status(&dir)?;
    assert_eq!(
        st["recoverable"], false,
        "status contradicts the check: {st}"
    );
    // A running standby says the same.
    let _again = start_standby(
        p.s.root(),
        &dir,
        &p.primary.url(),
        &p.s.certs,
        &["--check-interval-secs", "0"],
    )?;
    wait_for("the standby to run", LONG, || {
        Ok(standby_status(&dir)?["running"] == true)
    })?;
    let st = standby_status(&dir)?;
    assert_eq!(st["recoverable"], false, "{st}");
    Ok(())
}

#[test]
fn the_primary_refuses_to_start_on_a_database_it_cannot_ship() -> Result<()> {
    let s = Scratch::new()?;
    let env = s.path("env");
    bdb::run_workload(&env, &workload(200, 500))?;
    // A database reached through a symlink would not be shipped as such.
    let outside = s.path("elsewhere");
    std::fs::create_dir_all(&outside)?;
    std::fs::copy(env.join("meta.db"), outside.join("linked.db"))?;
    std::os::unix::fs::symlink(outside.join("linked.db"), env.join("linked.db"))?;
    match start_primary(s.root(), &env, &s.certs, "127.0.0.1:0", &[]) {
        Ok(_) => bail!("the primary started on an environment it cannot ship"),
        Err(e) => {
            let text = format!("{e:#}");
            assert!(text.contains("linked.db"), "{text}");
        }
    }
    Ok(())
}

/// The log files of the standby directory, by number.
fn log_numbers(dir: &Path) -> Result<Vec<u32>> {
    let mut v: Vec<u32> = std::fs::read_dir(dir)?
        .flatten()
        .filter_map(|e| {
            e.file_name()
                .to_str()
                .and_then(tandem_shared::logfile::parse_log_file_name)
        })
        .collect();
    v.sort_unstable();
    Ok(v)
}

#[test]
fn the_check_fails_whenever_promote_would() -> Result<()> {
    let mut p = pair(&workload(6000, 500))?;
    let dir = p.s.path("standby");
    p.standby.stop(LONG)?;
    // A log file of another history below the base's first one, as an
    // interrupted new base can leave behind: promote's recovery reads it.
    let first = *log_numbers(&dir)?.first().context("no log file")?;
    ensure!(
        first > 1,
        "the base starts at log file 1; the test needs a later start"
    );
    let other = p.s.path("other-env");
    bdb::run_workload(&other, &workload(500, 500))?;
    std::fs::copy(
        other.join(tandem_shared::logfile::log_file_name(1)),
        dir.join(tandem_shared::logfile::log_file_name(first - 1)),
    )?;

    let (status, out) = standby_cmd(&["check"], &dir)?;
    ensure!(
        !status.success(),
        "the check passed, yet promote recovers the stray log: {out}"
    );
    assert_eq!(standby_status(&dir)?["recoverable"], false);
    let (status, out) = standby_cmd(&["promote", "--catch-up-timeout-secs", "120"], &dir)?;
    ensure!(
        !status.success(),
        "promote succeeded where the check failed: {out}"
    );
    assert_eq!(standby_status(&dir)?["role"], "standby");
    Ok(())
}
