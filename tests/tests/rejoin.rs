//! Issue 12, part B: a directory whose log went beyond its primary's
//! history rejoins with `run --rejoin`, by page delta. Real BDB, the real
//! binaries on loopback.
//!
//! - Without `--rejoin`, a directory that holds an environment but is not a
//!   standby is refused and left byte for byte as it was.
//! - A standby that holds log its primary does not (the primary was rolled
//!   back to an older copy and written on) rejoins: the discarded range and
//!   its committed transactions are reported, its log files kept in
//!   `.tandem/discarded/`, only a small fraction of the database's bytes is
//!   sent, and the directory ends exactly at the primary's transactions.
//! - The same, killed with SIGKILL in the middle of the rejoin and rerun:
//!   it ends exact, and the discarded log is kept once.

use anyhow::{ensure, Context, Result};
use std::path::Path;
use std::process::Command;
use std::time::Duration;
use tandem_tests::bdb::{self, WorkloadOptions};
use tandem_tests::faulty_link::FaultyLink;
use tandem_tests::harness::*;

const LONG: Duration = Duration::from_secs(300);
const QUIET: [&str; 6] = [
    "--check-interval-secs",
    "0",
    "--rebase-after-mib",
    "0",
    "--scrub-interval-secs",
    "0",
];
/// Exit code of `tandem-standby run` refused for good.
const EXIT_REFUSED: i32 = 3;
/// Transactions of the shared history, then the standby's own, then the
/// rolled-back primary's.
const SHARED: u64 = 6000;
const STANDBY_ONLY: u64 = 150;
const PRIMARY_ONLY: u64 = 100;
/// Each workload run also commits one transaction per database it opens
/// (data, hash, meta: `__dbreg_register` in a transaction of its own).
const OPENS: u64 = 3;

/// 400-byte values in 4 MiB log files, the workload's output left out.
fn larger(txns: u64) -> WorkloadOptions {
    WorkloadOptions {
        lg_max: 4 << 20,
        value_len: 400,
        quiet: true,
        ..workload(txns, 200)
    }
}

/// The diverging runs only add keys: what changed is a small part of the
/// database, as after a short failover.
fn appends(txns: u64) -> WorkloadOptions {
    WorkloadOptions {
        updates: 0,
        ..larger(txns)
    }
}

fn cp_a(from: &Path, to: &Path) -> Result<()> {
    let status = Command::new("cp").arg("-a").arg(from).arg(to).status()?;
    ensure!(
        status.success(),
        "cp -a {} {}",
        from.display(),
        to.display()
    );
    Ok(())
}

/// Bytes of the environment's database files.
fn database_bytes(env: &Path) -> Result<u64> {
    let mut n = 0;
    for e in std::fs::read_dir(env)? {
        let e = e?;
        if e.file_name().to_string_lossy().ends_with(".db") {
            n += e.metadata()?.len();
        }
    }
    Ok(n)
}

/// A standby holding SHARED + STANDBY_ONLY transactions and a primary
/// (stopped) rolled back to SHARED and written on with PRIMARY_ONLY others.
/// Returns the primary's address.
fn standby_ahead_of_its_primary(s: &Scratch) -> Result<String> {
    let env = s.path("env");
    bdb::run_workload(&env, &larger(SHARED))?;
    let addr = follow_then_stop(s, "127.0.0.1:0", &QUIET)?;
    cp_a(&env, &s.path("env-backup"))?;
    let held = bdb::run_workload(&env, &appends(STANDBY_ONLY))?;
    follow_then_stop(s, &addr, &QUIET)?;
    ensure!(held == SHARED + STANDBY_ONLY, "the primary holds {held}");
    std::fs::remove_dir_all(&env)?;
    std::fs::rename(s.path("env-backup"), &env)?;
    // The two histories must part at the fork: run within the same second
    // on the same copy, the two workloads write byte-identical records
    // (commit timestamps have one-second resolution), and the standby
    // rightly keeps what the primary's log holds identically. A checkpoint
    // first makes the primary's next record differ from the standby's.
    let ckp = Command::new("db5.3_checkpoint")
        .args(["-1", "-h"])
        .arg(&env)
        .status()?;
    ensure!(ckp.success(), "db5.3_checkpoint -1 failed");
    let now = bdb::run_workload(&env, &appends(PRIMARY_ONLY))?;
    ensure!(
        now == SHARED + PRIMARY_ONLY,
        "the rolled-back primary holds {now}"
    );
    Ok(addr)
}

/// After a rejoin: the discard reported (in status, in the log) and kept,
/// the standby exact.
fn check_rejoined(s: &Scratch, log: &str) -> Result<serde_json::Value> {
    check_rejoined_in(
        s,
        &s.path("standby"),
        log,
        STANDBY_ONLY + OPENS,
        SHARED + PRIMARY_ONLY,
    )
}

fn check_rejoined_in(
    s: &Scratch,
    dir: &Path,
    log: &str,
    discarded_commits: u64,
    expected: u64,
) -> Result<serde_json::Value> {
    let status = standby_status(dir)?;
    let discarded = status["discarded"]
        .as_array()
        .context("status lists no discards")?;
    ensure!(discarded.len() == 1, "one discard expected: {status}");
    let d = &discarded[0];
    ensure!(
        d["committed_transactions"] == discarded_commits,
        "the standby's {discarded_commits} own commits must be reported discarded: {d}"
    );
    ensure!(
        log.contains(&format!(
            "REJOIN: discarded {discarded_commits} committed transactions in ["
        )),
        "{log}"
    );
    let kept = dir.join(d["kept_in"].as_str().unwrap_or_default());
    let from = lsn_of(&d["from"]);
    let to = lsn_of(&d["to"]);
    for n in from.file..=to.file {
        let name = tandem_shared::logfile::log_file_name(n);
        ensure!(
            kept.join(&name).is_file(),
            "{name} not kept in {}",
            kept.display()
        );
    }
    ensure!(status["rejoining"] == false, "{status}");
    let m = recover_copy(dir, &s.path("copy-after-rejoin"))?;
    ensure!(
        m == expected,
        "after the rejoin the standby recovers {m}, the primary holds {expected}"
    );
    Ok(status)
}

#[test]
fn a_directory_holding_an_environment_is_refused_and_left_unchanged() -> Result<()> {
    let s = Scratch::new()?;
    bdb::run_workload(&s.path("env"), &larger(200))?;
    // Another environment (say, an old primary's home) where a standby
    // directory was expected.
    let other = s.path("other");
    bdb::run_workload(&other, &larger(100))?;
    let before = dir_digest(&other)?;
    let primary = start_primary(s.root(), &s.path("env"), &s.certs, "127.0.0.1:0", &[])?;
    for flags in [&[][..], &["--rejoin"][..]] {
        let args = [QUIET.as_slice(), flags].concat();
        let mut standby = start_standby(s.root(), &other, &primary.url(), &s.certs, &args)?;
        let code = standby.wait_exit(LONG)?;
        let log = standby.log_text();
        ensure!(
            code.code() == Some(EXIT_REFUSED),
            "not refused ({code}): {log}"
        );
        ensure!(log.contains("no standby state"), "{log}");
        ensure!(
            dir_digest(&other)? == before,
            "refusing changed the directory"
        );
    }
    ensure!(
        bdb::run_workload(
            &other,
            &WorkloadOptions {
                recover: true,
                ..larger(1)
            }
        )? == 101
    );
    Ok(())
}

#[test]
fn a_standby_ahead_of_its_primary_rejoins_by_page_delta() -> Result<()> {
    let s = Scratch::new()?;
    let addr = standby_ahead_of_its_primary(&s)?;
    let env = s.path("env");
    let primary = start_primary(s.root(), &env, &s.certs, &addr, &[])?;
    let dir = s.path("standby");
    let args = [QUIET.as_slice(), &["--rejoin"]].concat();
    let mut standby = start_standby(s.root(), &dir, &primary.url(), &s.certs, &args)?;
    wait_caught_up_running(&dir, &env, LONG, &mut standby)?;
    let log = standby.log_text();
    let status = check_rejoined(&s, &log)?;
    let sent = status["last_rebase"]["sent_bytes"]
        .as_u64()
        .unwrap_or(u64::MAX);
    let reused = status["last_rebase"]["reused_bytes"].as_u64().unwrap_or(0);
    let db = database_bytes(&env)?;
    eprintln!("rejoin: {sent} file bytes sent, {reused} reused, database {db} bytes");
    ensure!(
        sent * 10 < db,
        "a page delta sends a small fraction of the database: {sent} of {db} bytes"
    );
    // Then it is an ordinary standby: it follows new commits.
    bdb::run_workload(&env, &larger(50))?;
    wait_caught_up_running(&dir, &env, LONG, &mut standby)?;
    standby.stop(LONG)?;
    Ok(())
}

#[test]
fn a_rejoin_killed_midway_and_rerun_ends_exact() -> Result<()> {
    let s = Scratch::new()?;
    let addr = standby_ahead_of_its_primary(&s)?;
    let env = s.path("env");
    let primary = start_primary(s.root(), &env, &s.certs, &addr, &[])?;
    let dir = s.path("standby");
    let args = [QUIET.as_slice(), &["--rejoin"]].concat();
    // A slow link keeps the rejoin under way long enough to kill it there.
    let link = FaultyLink::start(primary.addr)?;
    link.delay(100);
    let mut standby = start_standby(s.root(), &dir, &link.url(), &s.certs, &args)?;
    wait_while_running("the rejoin's base copy", LONG, &mut standby, || {
        let st = standby_status(&dir)?;
        Ok(st["rejoining"] == true && st["base_copy_done_bytes"].as_u64().unwrap_or(0) > 0)
    })?;
    standby.kill9()?;
    let st = standby_status(&dir)?;
    ensure!(
        st["discarded"].as_array().is_none_or(|d| d.is_empty()),
        "{st}"
    );
    let mut standby = start_standby(s.root(), &dir, &primary.url(), &s.certs, &args)?;
    wait_caught_up_running(&dir, &env, LONG, &mut standby)?;
    let log = standby.log_text();
    check_rejoined(&s, &log)?;
    standby.stop(LONG)?;
    Ok(())
}

/// Issue 12, done-when 3: after a switchover to A, the old primary P's
/// environment is written on (its application kept committing); it rejoins
/// A with `--rejoin`, by page delta, and ends exact, its own transactions
/// reported discarded.
#[test]
fn the_old_primary_written_on_after_a_switchover_rejoins_by_page_delta() -> Result<()> {
    let s = Scratch::new()?;
    let (env, a_dir) = (s.path("env"), s.path("a"));
    bdb::run_workload(&env, &larger(SHARED))?;
    let mut p = start_primary(s.root(), &env, &s.certs, "127.0.0.1:0", &[])?;
    let mut a = start_standby(s.root(), &a_dir, &p.url(), &s.certs, &QUIET)?;
    wait_caught_up_running(&a_dir, &env, LONG, &mut a)?;
    let report = promote_json(&a_dir)?;
    ensure!(report["kind"] == "switchover", "{report}");
    let _ = a.wait_exit(LONG);
    p.proc.stop(LONG)?;
    // The old primary's application goes on committing on P.
    let old = bdb::run_workload(&env, &appends(STANDBY_ONLY))?;
    ensure!(old == SHARED + STANDBY_ONLY, "P holds {old}");
    // And creates a database the new primary never had.
    let mut load = Command::new("db5.3_load")
        .args(["-T", "-t", "btree", "-h"])
        .arg(&env)
        .arg("extra.db")
        .stdin(std::process::Stdio::piped())
        .spawn()?;
    use std::io::Write;
    load.stdin
        .take()
        .context("db_load stdin")?
        .write_all(b"k\nv\n")?;
    ensure!(load.wait()?.success(), "db5.3_load failed");
    let new_p = start_primary(s.root(), &a_dir, &s.certs, "127.0.0.1:0", &[])?;
    let now = bdb::run_workload(&a_dir, &appends(PRIMARY_ONLY))?;
    ensure!(now == SHARED + PRIMARY_ONLY, "A holds {now}");

    let args = [QUIET.as_slice(), &["--rejoin"]].concat();
    let mut rejoined = start_standby(s.root(), &env, &new_p.url(), &s.certs, &args)?;
    wait_caught_up_running(&env, &a_dir, LONG, &mut rejoined)?;
    let log = rejoined.log_text();
    // db5.3_load committed two more: the create and the record.
    let status = check_rejoined_in(&s, &env, &log, STANDBY_ONLY + OPENS + 2, now)?;
    let sent = status["last_rebase"]["sent_bytes"]
        .as_u64()
        .unwrap_or(u64::MAX);
    let db = database_bytes(&a_dir)?;
    eprintln!("old primary rejoin: {sent} file bytes sent of a {db}-byte database");
    ensure!(sent * 10 < db, "{sent} of {db} bytes sent");
    ensure!(status["epoch"] == 2, "{status}");
    for e in std::fs::read_dir(&env)? {
        let name = e?.file_name().to_string_lossy().into_owned();
        ensure!(
            !name.starts_with("__db.") && name != ".tandem-primary",
            "{name} left in the rejoined directory"
        );
    }
    // The database A never had is kept outside the environment.
    ensure!(
        !env.join("extra.db").exists(),
        "extra.db left in the environment"
    );
    let kept = env
        .join(
            status["discarded"][0]["kept_in"]
                .as_str()
                .unwrap_or_default(),
        )
        .join("files/extra.db");
    ensure!(kept.is_file(), "{} missing", kept.display());
    // An ordinary standby of A from now on.
    let last = bdb::run_workload(&a_dir, &appends(50))?;
    wait_caught_up_running(&env, &a_dir, LONG, &mut rejoined)?;
    rejoined.stop(LONG)?;
    let m = recover_copy(&env, &s.path("copy-after-following"))?;
    ensure!(
        m == last,
        "the rejoined standby recovers {m}, A holds {last}"
    );
    Ok(())
}

/// Issue 12, done-when 4: a switchover and a switchback, three times over:
/// the old primary rejoins the promoted one each time, never by a full
/// copy, and no committed transaction is ever lost.
#[test]
fn switchover_and_switchback_three_times_never_copy_the_database() -> Result<()> {
    let s = Scratch::new()?;
    let (mut p_dir, mut q_dir) = (s.path("env"), s.path("b"));
    bdb::run_workload(&p_dir, &larger(SHARED))?;
    let db = database_bytes(&p_dir)?;
    let mut primary = start_primary(s.root(), &p_dir, &s.certs, "127.0.0.1:0", &[])?;
    let mut standby = start_standby(s.root(), &q_dir, &primary.url(), &s.certs, &QUIET)?;
    let rejoin = [QUIET.as_slice(), &["--rejoin"]].concat();
    let mut file_bytes = 0;
    for round in 1..=6 {
        // The application commits on the primary, then is stopped.
        let committed = bdb::run_workload(&p_dir, &appends(100))?;
        wait_caught_up_running(&q_dir, &p_dir, LONG, &mut standby)?;
        let report = promote_json(&q_dir)?;
        ensure!(report["kind"] == "switchover", "round {round}: {report}");
        let _ = standby.wait_exit(LONG);
        primary.proc.stop(LONG)?;
        primary = start_primary(s.root(), &q_dir, &s.certs, "127.0.0.1:0", &[])?;
        standby = start_standby(s.root(), &p_dir, &primary.url(), &s.certs, &rejoin)?;
        wait_caught_up_running(&p_dir, &q_dir, LONG, &mut standby)?;
        let st = standby_status(&p_dir)?;
        ensure!(st["rejoining"] == false, "round {round}: {st}");
        file_bytes += st["file_bytes_received"].as_u64().unwrap_or(u64::MAX / 2);
        let m = recover_copy(&p_dir, &s.path(&format!("copy-{round}")))?;
        ensure!(
            m == committed,
            "round {round}: the rejoined directory recovers {m}, {committed} were committed"
        );
        std::mem::swap(&mut p_dir, &mut q_dir);
    }
    eprintln!("six role changes: {file_bytes} file bytes sent, database {db} bytes");
    ensure!(
        file_bytes * 10 < db,
        "{file_bytes} file bytes sent over six role changes, database {db} bytes"
    );
    standby.stop(LONG)?;
    Ok(())
}
