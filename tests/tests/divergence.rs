//! Issue 11, finding 1: a primary that comes back with less log must never
//! wipe the standby. Real BDB, the real binaries: a standby holding N
//! acknowledged transactions meets a primary whose history does not
//! continue its own (an older copy restored and written on; a log that lost
//! its unsynced tail and went on). It refuses for good (exit 3, status says
//! why), its directory byte for byte unchanged, and a copy of it still
//! recovers to at least N. `--start-over` then takes the primary's new base,
//! staged beside the mirror and swapped in complete, ending exact.

use anyhow::{ensure, Context, Result};
use std::path::Path;
use std::process::Command;
use std::time::Duration;
use tandem_tests::bdb::{self, WorkloadOptions};
use tandem_tests::harness::*;

const LONG: Duration = Duration::from_secs(240);
const QUIET: [&str; 4] = ["--check-interval-secs", "0", "--rebase-after-mib", "0"];
/// Exit code of `tandem-standby run` refused for good.
const EXIT_REFUSED: i32 = 3;

/// One log file for everything: the lost tail is inside the file the
/// standby is in, as after a power loss.
fn one_file(txns: u64) -> WorkloadOptions {
    WorkloadOptions {
        lg_max: 16 << 20,
        ..workload(txns, 200)
    }
}

/// `cp -a`, keeping `.tandem-primary` (the copy is the same environment,
/// with the same identity: a backup restored in place).
fn copy_whole(from: &Path, to: &Path) -> Result<()> {
    let status = Command::new("cp").arg("-a").arg(from).arg(to).status()?;
    ensure!(
        status.success(),
        "cp -a {} {}",
        from.display(),
        to.display()
    );
    Ok(())
}

fn replace_dir(with: &Path, dir: &Path) -> Result<()> {
    std::fs::remove_dir_all(dir)?;
    std::fs::rename(with, dir)?;
    Ok(())
}

/// Starts the primary on the diverged `env` and a standby on the held
/// directory: the standby must refuse for good and change nothing.
/// Returns the primary (still running) and what a copy of the standby
/// recovers to.
fn expect_refusal(s: &Scratch, addr: &str, held: u64) -> Result<Primary> {
    let standby_dir = s.path("standby");
    let before = dir_digest(&standby_dir)?;
    let primary = start_primary(s.root(), &s.path("env"), &s.certs, addr, &[])?;
    let mut standby = start_standby(s.root(), &standby_dir, &primary.url(), &s.certs, &QUIET)?;
    let code = standby.wait_exit(LONG)?;
    let log = standby.log_text();
    ensure!(
        code.code() == Some(EXIT_REFUSED),
        "the standby did not refuse for good ({code}): {log}"
    );
    ensure!(log.contains("diverged"), "{log}");
    let status = standby_status(&standby_dir)?;
    let why = status["last_error"].as_str().unwrap_or_default();
    ensure!(
        why.contains("diverged"),
        "status does not say why: {status}"
    );
    ensure!(
        dir_digest(&standby_dir)? == before,
        "refusing changed the standby's directory"
    );
    let m = recover_copy(&standby_dir, &s.path("copy-after-refusal"))?;
    ensure!(
        m >= held,
        "the standby held {held} acknowledged transactions, a copy recovers {m}"
    );
    Ok(primary)
}

/// `run --start-over`: the primary's new base arrives staged and replaces
/// the mirror; the standby ends exactly at the primary's transactions.
fn start_over(s: &Scratch, primary: &Primary, expected: u64) -> Result<()> {
    let standby_dir = s.path("standby");
    let args = [QUIET.as_slice(), &["--start-over"]].concat();
    let mut standby = start_standby(s.root(), &standby_dir, &primary.url(), &s.certs, &args)?;
    wait_caught_up(&standby_dir, &s.path("env"), LONG).with_context(|| standby.log_text())?;
    let log = standby.log_text();
    ensure!(log.contains("staged base swapped in"), "{log}");
    standby.stop(LONG)?;
    ensure!(
        !standby_dir.join(".tandem/rebase").exists(),
        "staging area left"
    );
    let m = recover_copy(&standby_dir, &s.path("copy-after-start-over"))?;
    ensure!(
        m == expected,
        "after starting over the standby recovers {m}, the primary holds {expected}"
    );
    Ok(())
}

#[test]
fn a_standby_refuses_a_primary_rolled_back_to_an_older_copy() -> Result<()> {
    let s = Scratch::new()?;
    let env = s.path("env");
    bdb::run_workload(&env, &one_file(1000))?;
    let addr = follow_then_stop(&s, "127.0.0.1:0", &QUIET)?;
    // The backup the primary will be rolled back to: 1,000 transactions.
    copy_whole(&env, &s.path("env-backup"))?;
    let held = bdb::run_workload(&env, &one_file(1000))?;
    follow_then_stop(&s, &addr, &QUIET)?;
    ensure!(held == 2000, "the primary holds {held}");
    // The backup is restored and the application writes on it: 500
    // transactions the standby's 1,001..2,000 contradict.
    replace_dir(&s.path("env-backup"), &env)?;
    let now = bdb::run_workload(&env, &one_file(500))?;
    ensure!(now == 1500, "the rolled-back primary holds {now}");
    let primary = expect_refusal(&s, &addr, held)?;
    start_over(&s, &primary, now)
}

#[test]
fn a_standby_refuses_a_primary_whose_log_lost_its_unsynced_tail() -> Result<()> {
    let s = Scratch::new()?;
    let env = s.path("env");
    bdb::run_workload(&env, &one_file(1000))?;
    let addr = follow_then_stop(&s, "127.0.0.1:0", &QUIET)?;
    let at_1000 = s.path("env-1000");
    copy_whole(&env, &at_1000)?;
    let held = bdb::run_workload(&env, &one_file(300))?;
    follow_then_stop(&s, &addr, &QUIET)?;
    // The primary's newest log file loses the records after its end at
    // 1,000 transactions (written, shipped and acknowledged, never synced
    // on the primary), and its databases are as they were then: exactly
    // the copy at 1,000, whose log is a prefix of today's.
    let log_name = tandem_shared::logfile::log_file_name(1);
    let (now, then) = (
        std::fs::read(env.join(&log_name))?,
        std::fs::read(at_1000.join(&log_name))?,
    );
    let cut = primary_log_end(&at_1000)?;
    ensure!(cut.file == 1 && primary_log_end(&env)?.file == 1);
    ensure!(
        now[..cut.offset as usize] == then[..cut.offset as usize]
            && then[cut.offset as usize..].iter().all(|b| *b == 0),
        "the copy's log is not today's log cut short"
    );
    replace_dir(&at_1000, &env)?;
    // The application goes on (recovering first, as after a crash).
    let now = bdb::run_workload(
        &env,
        &WorkloadOptions {
            recover: true,
            ..one_file(100)
        },
    )?;
    ensure!(now == 1100, "the primary holds {now}");
    let primary = expect_refusal(&s, &addr, held)?;
    start_over(&s, &primary, now)
}
