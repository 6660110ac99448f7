//! The demo behind `scripts/demo`: Tandem's main job on one machine.
//!
//! 1. a real Berkeley DB environment with a workload committing numbered
//!    transactions (checkpoints on, 1 MiB log files so logs roll over);
//! 2. `tandem-primary` and `tandem-standby` on loopback, mutual TLS with
//!    freshly generated certificates;
//! 3. live lag while the workload runs;
//! 4. the workload stops, the standby catches up, `tandem-standby promote`
//!    performs a switchover;
//! 5. the promoted environment is checked: it must hold exactly the
//!    committed transactions, and dump identically to the primary;
//! 6. an application that waits after each commit until it is durable on
//!    the standby (the C client, `contrib/c/tandem_wait.c`): both machines
//!    are killed with -9, the standby is promoted, and it holds every
//!    transaction whose wait returned.
//!
//! Everything runs under a temporary directory that is removed at the end
//! (set DEMO_KEEP=1 to keep it). Nothing is left running.

use anyhow::{bail, Context, Result};
use std::io::{IsTerminal, Write};
use std::process::Command;
use std::time::{Duration, Instant};
use tandem_tests::bdb::{self, WorkloadOptions, WORKLOAD_DBS};
use tandem_tests::harness::*;

fn main() {
    if let Err(e) = run() {
        eprintln!("\ndemo failed: {e:#}");
        std::process::exit(1);
    }
}

fn step(n: u32, text: &str) {
    println!("\n[{n}/6] {text}");
}

fn committed(w: &Proc) -> u64 {
    w.log_text()
        .lines()
        .rev()
        .find_map(|l| {
            l.strip_prefix("COMMITTED ")
                .and_then(|n| n.trim().parse().ok())
        })
        .unwrap_or(0)
}

fn run() -> Result<()> {
    let seconds: u64 = std::env::var("DEMO_SECONDS")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(15);
    let s = Scratch::new()?;
    if std::env::var_os("DEMO_KEEP").is_some() {
        println!("working directory (kept): {}", s.root().display());
    }
    let env = s.path("primary-env");
    let standby_dir = s.path("standby");

    step(1, "creating a Berkeley DB environment with a real workload");
    let base_opts = WorkloadOptions {
        txns: 5000,
        checkpoint_every: 1000,
        lg_max: 1 << 20,
        ..Default::default()
    };
    let first = bdb::run_workload(&env, &base_opts)?;
    println!(
        "      {} transactions committed in {}",
        first,
        env.display()
    );

    step(2, "starting tandem-primary and tandem-standby on loopback (mutual TLS, generated certificates)");
    let primary = start_primary(s.root(), &env, &s.certs, "127.0.0.1:0", &[])?;
    println!(
        "      primary listening on {} (certificates in {})",
        primary.url(),
        s.certs.dir.display()
    );
    let started = Instant::now();
    // A low rebase threshold, so the demo shows promotion time staying
    // bounded however long the workload runs.
    let standby = start_standby(
        s.root(),
        &standby_dir,
        &primary.url(),
        &s.certs,
        &["--rebase-after-mib", "64"],
    )?;
    wait_for("the base copy", Duration::from_secs(120), || {
        Ok(standby_status(&standby_dir)?["recoverable"] == true)
    })?;
    let base_secs = started.elapsed().as_secs_f64();
    println!("      base copy complete in {base_secs:.2} s; the standby is recoverable");

    step(
        3,
        &format!("running the workload for {seconds} s while the standby follows"),
    );
    let opts = WorkloadOptions {
        txns: 0,
        seconds: Some(seconds),
        checkpoint_every: 1000,
        lg_max: 1 << 20,
        ..Default::default()
    };
    let mut w = Proc::spawn("workload", opts.command(&env), &s.path("workload.log"))?;
    let tty = std::io::stdout().is_terminal();
    let mut max_lag = 0u64;
    let mut samples = 0u32;
    let mut lag_sum = 0u64;
    while w.is_running() {
        let st = standby_status(&standby_dir)?;
        // Unknown (null) while the standby has not heard from the primary.
        let lag = st["lag_bytes"].as_u64();
        if let Some(lag) = lag {
            max_lag = max_lag.max(lag);
            lag_sum += lag;
            samples += 1;
        }
        let line = format!(
            "      committed {:>7}   primary end {:<16} standby durable {:<16} lag {:>8} bytes",
            first + committed(&w),
            lsn_of(&st["primary_end_lsn"]).to_string(),
            lsn_of(&st["durable_lsn"]).to_string(),
            lag.map_or("unknown".to_owned(), |l| l.to_string())
        );
        if tty {
            print!("\r{line}");
            let _ = std::io::stdout().flush();
        } else if samples % 10 == 1 {
            println!("{line}");
        }
        std::thread::sleep(Duration::from_millis(250));
    }
    if tty {
        println!();
    }
    let status = w.wait_exit(Duration::from_secs(10))?;
    if !status.success() {
        bail!("workload failed: {}", w.log_text());
    }
    let last = bdb::parse_done(&w.log_text()).context("workload summary")?;
    let caught = Instant::now();
    wait_caught_up(&standby_dir, &env, Duration::from_secs(120))?;
    println!(
        "      workload stopped at transaction {last}; standby caught up {:.0} ms later",
        caught.elapsed().as_secs_f64() * 1000.0
    );
    let st = standby_status(&standby_dir)?;

    step(
        4,
        "promoting the standby (planned switchover: the primary is still reachable)",
    );
    let out = Command::new(bin("tandem-standby"))
        .args(["promote", "--json", "--dir"])
        .arg(&standby_dir)
        .output()?;
    if !out.status.success() {
        bail!("promote failed: {}", String::from_utf8_lossy(&out.stderr));
    }
    let report: serde_json::Value = serde_json::from_slice(&out.stdout)?;
    println!(
        "      {} to epoch {}: recovered to {}, recovery {:.2} s, promote total {:.2} s",
        report["kind"].as_str().unwrap_or("?"),
        report["epoch"],
        lsn_of(&report["recovered_to"]),
        report["recovery_seconds"].as_f64().unwrap_or(0.0),
        report["total_seconds"].as_f64().unwrap_or(0.0)
    );
    drop(standby);
    drop(primary);

    step(5, "checking the promoted environment");
    let m = bdb::check(&standby_dir)?;
    let same =
        bdb::db_dump_all(&env, &WORKLOAD_DBS)? == bdb::db_dump_all(&standby_dir, &WORKLOAD_DBS)?;
    println!("      tandem-check: exactly transactions 1..{m} (primary committed 1..{last})");
    println!(
        "      db_dump of every database identical to the primary's: {}",
        if same { "yes" } else { "NO" }
    );
    if m != last || !same {
        bail!("the promoted environment does not match the primary");
    }
    // An application can open it: commit 100 more transactions there.
    let next = bdb::run_workload(
        &standby_dir,
        &WorkloadOptions {
            txns: 100,
            ..Default::default()
        },
    )?;
    println!("      an application opened the promoted environment and committed up to transaction {next}");

    let file_bytes = st["file_bytes_received"].as_u64().unwrap_or(0);
    let log_bytes = st["log_bytes_received"].as_u64().unwrap_or(0);
    println!("\nSummary");
    println!(
        "  shipped:          {:.1} MiB of database files, {:.1} MiB of log",
        mib(file_bytes),
        mib(log_bytes)
    );
    println!("  base copy:        {base_secs:.2} s");
    println!(
        "  throughput:       {:.1} MiB/s of log while the workload ran",
        mib(log_bytes) / (seconds as f64).max(1.0)
    );
    println!(
        "  lag:              max {max_lag} bytes, mean {} bytes ({} samples)",
        lag_sum / u64::from(samples.max(1)),
        samples
    );
    println!(
        "  rebases:          {} (a fresh base past 64 MiB of log, only changed pages sent)",
        st["rebases"].as_u64().unwrap_or(0)
    );
    println!(
        "  promotion:        {:.2} s ({})",
        report["total_seconds"].as_f64().unwrap_or(0.0),
        report["kind"].as_str().unwrap_or("?")
    );
    println!("  result:           OK: the promoted standby holds exactly the {last} committed transactions");
    let (waited, held) = waited_commits_survive()?;
    println!("  waited commits:   OK: all {waited} whose wait returned durable survived losing both machines (promoted holds 1..{held})");
    Ok(())
}

/// Step 6: an application commits and waits after each commit on the
/// primary's wait socket; primary, application and standby are killed with
/// -9; the promoted standby must hold every transaction whose wait
/// returned. Returns (last waited transaction, what the promoted holds).
fn waited_commits_survive() -> Result<(u64, u64)> {
    step(6, "an application waits after each commit until the standby holds it; then both machines die (kill -9)");
    let s = Scratch::new()?;
    let env = s.path("primary-env");
    let standby_dir = s.path("standby");
    bdb::run_workload(
        &env,
        &WorkloadOptions {
            txns: 500,
            ..Default::default()
        },
    )?;
    let mut primary = start_primary(s.root(), &env, &s.certs, "127.0.0.1:0", &[])?;
    let mut standby = start_standby(
        s.root(),
        &standby_dir,
        &primary.url(),
        &s.certs,
        &["--check-interval-secs", "0"],
    )?;
    wait_caught_up_running(&standby_dir, &env, Duration::from_secs(120), &mut standby)?;
    let socket = env.join(".tandem-primary").join("wait.sock");
    let durable = s.path("durable.log");
    println!("      the application commits with DB_TXN->set_commit_token() and calls tandem_wait_token() on {}", socket.display());
    let opts = WorkloadOptions {
        txns: 0,
        seconds: Some(60),
        wait: Some((socket, durable.clone())),
        ..Default::default()
    };
    let mut w = Proc::spawn("workload", opts.command(&env), &s.path("workload.log"))?;
    let waited = || -> u64 {
        std::fs::read_to_string(&durable)
            .unwrap_or_default()
            .lines()
            .filter_map(|l| l.parse().ok())
            .max()
            .unwrap_or(0)
    };
    wait_while_running("waited commits", Duration::from_secs(120), &mut w, || {
        Ok(waited() >= 500 + 2000)
    })?;
    w.kill9()?;
    primary.proc.kill9()?;
    standby.kill9()?;
    let last = waited();
    println!("      killed application, primary and standby; the last wait that returned durable was transaction {last}");
    let out = Command::new(bin("tandem-standby"))
        .args(["promote", "--json", "--force", "--dir"])
        .arg(&standby_dir)
        .output()?;
    if !out.status.success() {
        bail!("promote failed: {}", String::from_utf8_lossy(&out.stderr));
    }
    let held = bdb::check(&standby_dir)?;
    println!(
        "      promoted (failover); tandem-check: the standby holds exactly transactions 1..{held}"
    );
    if held < last {
        bail!(
            "the promoted standby lacks transactions whose wait returned durable ({held} < {last})"
        );
    }
    Ok((last - 500, held))
}

fn mib(b: u64) -> f64 {
    b as f64 / (1024.0 * 1024.0)
}
