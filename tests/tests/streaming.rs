//! Issue: stream a live environment from tandem-primary to tandem-standby.
//! Real binaries, real Berkeley DB, mutual TLS on loopback.

use anyhow::Result;
use std::time::Duration;
use tandem_tests::bdb::{self, WorkloadOptions, WORKLOAD_DBS};
use tandem_tests::harness::*;

const CATCH_UP: Duration = Duration::from_secs(120);

fn workload(txns: u64) -> WorkloadOptions {
    WorkloadOptions {
        txns,
        checkpoint_every: 500,
        lg_max: 1 << 20,
        ..Default::default()
    }
}

/// Runs the workload in the background.
fn spawn_workload(s: &Scratch, opts: &WorkloadOptions, tag: &str) -> Result<Proc> {
    Proc::spawn(
        "workload",
        opts.command(&s.path("env")),
        &s.path(&format!("workload-{tag}.log")),
    )
}

fn finish_workload(w: &mut Proc) -> Result<u64> {
    let status = w.wait_exit(Duration::from_secs(300))?;
    anyhow::ensure!(status.success(), "workload failed: {}", w.log_text());
    bdb::parse_done(&w.log_text()).ok_or_else(|| anyhow::anyhow!("no DONE line: {}", w.log_text()))
}

/// The standby's recovered copy holds exactly what the primary committed,
/// and every database dumps identically.
fn assert_identical(s: &Scratch, last: u64, tag: &str) -> Result<()> {
    let copy = s.path(&format!("recovered-{tag}"));
    let m = recover_copy(&s.path("standby"), &copy)?;
    assert_eq!(
        m, last,
        "the recovered standby must hold every committed transaction"
    );
    assert_eq!(
        bdb::db_dump_all(&s.path("env"), &WORKLOAD_DBS)?,
        bdb::db_dump_all(&copy, &WORKLOAD_DBS)?,
        "db_dump differs"
    );
    Ok(())
}

#[test]
fn standby_catches_up_under_load_and_recovers_exactly() -> Result<()> {
    let s = Scratch::new()?;
    bdb::run_workload(&s.path("env"), &workload(2000))?;
    let primary = start_primary(s.root(), &s.path("env"), &s.certs, "127.0.0.1:0", &[])?;
    let mut w = spawn_workload(&s, &workload(30_000), "load")?;
    let _standby = start_standby(s.root(), &s.path("standby"), &primary.url(), &s.certs, &[])?;
    let last = finish_workload(&mut w)?;
    wait_caught_up(&s.path("standby"), &s.path("env"), CATCH_UP)?;
    let st = standby_status(&s.path("standby"))?;
    assert_eq!(st["lag_bytes"], 0);
    assert_eq!(st["connected"], true);
    assert_eq!(st["role"], "standby");
    assert!(st["last_contact_unix_ms"].as_u64().unwrap_or(0) > 0);
    assert_identical(&s, last, "final")
}

/// Databases created with DB_CHKSUM: the base copy, taken while the
/// workload checkpoints every 50 transactions through a 1 MB cache (pages
/// written all through the copy), proves pages by BDB's own checksum after
/// one read and reads meta pages (and any page a read caught mid-write)
/// again; recovery of the mirror, which checks every page's checksum, and
/// db_dump agree with the primary.
#[test]
fn a_checksummed_environment_is_copied_under_load_with_one_read_per_page() -> Result<()> {
    let s = Scratch::new()?;
    let opts = |txns| WorkloadOptions {
        checksum: true,
        checkpoint_every: 50,
        cache_mb: Some(1),
        value_len: 400,
        ..workload(txns)
    };
    bdb::run_workload(&s.path("env"), &opts(5000))?;
    let metrics = free_addr()?;
    let primary = start_primary(
        s.root(),
        &s.path("env"),
        &s.certs,
        "127.0.0.1:0",
        &["--metrics-listen", &metrics],
    )?;
    let mut w = spawn_workload(&s, &opts(20_000), "load")?;
    let _standby = start_standby(s.root(), &s.path("standby"), &primary.url(), &s.certs, &[])?;
    let last = finish_workload(&mut w)?;
    wait_caught_up(&s.path("standby"), &s.path("env"), CATCH_UP)?;
    assert_identical(&s, last, "final")?;
    bdb::verify(&s.path("recovered-final"), &WORKLOAD_DBS)?;
    let m = scrape_metrics(&metrics)?;
    let once = metric(&m, "tandem_primary_pages_read_once_total")?;
    let again = metric(&m, "tandem_primary_pages_read_again_total")?;
    eprintln!("pages read once {once}, again {again}");
    assert!(once > 0.0, "no page was proven by its checksum");
    // At least the three meta pages, which BDB checksums only in part.
    assert!(again >= WORKLOAD_DBS.len() as f64, "{again}");
    assert!(once > 10.0 * again, "once {once}, again {again}");
    Ok(())
}

#[test]
fn standby_kill9_resumes_without_resending_files() -> Result<()> {
    let s = Scratch::new()?;
    bdb::run_workload(&s.path("env"), &workload(3000))?;
    let (primary, mut standby) = start_pair(&s, &[])?;
    let mut w = spawn_workload(
        &s,
        &WorkloadOptions {
            rate: 4000,
            ..workload(20_000)
        },
        "load",
    )?;
    // Kill it once the base is in and the log is flowing.
    wait_for("the base to complete", CATCH_UP, || {
        Ok(standby_status(&s.path("standby"))?["recoverable"] == true)
    })?;
    let before = standby_status(&s.path("standby"))?;
    let files_first_run = before["file_bytes_received"].as_u64().unwrap_or(0);
    assert!(files_first_run > 0);
    standby.kill9()?;
    let durable_at_kill = lsn_of(&standby_status(&s.path("standby"))?["durable_lsn"]);

    let restarted = start_standby(s.root(), &s.path("standby"), &primary.url(), &s.certs, &[])?;
    let last = finish_workload(&mut w)?;
    wait_caught_up(&s.path("standby"), &s.path("env"), CATCH_UP)?;
    let after = standby_status(&s.path("standby"))?;
    // Where the restarted standby said it resumed, and any chain break it
    // found at open: what a failure of the checks below needs explained.
    let resumed: Vec<String> = restarted
        .log_text()
        .lines()
        .filter(|l| {
            [
                "connected to the primary",
                "BROKEN",
                "SCRUB",
                "base",
                "rebase",
            ]
            .iter()
            .any(|k| l.contains(k))
        })
        .map(str::to_owned)
        .collect();
    assert_eq!(
        after["file_bytes_received"], 0,
        "complete files must not be sent again after a restart"
    );
    // The log resumed where it was durable, not from the base boundary.
    let resent = after["log_bytes_received"].as_u64().unwrap_or(0);
    let end = primary_log_end(&s.path("env"))?;
    let lg_max = after["lg_max"].as_u64().unwrap_or(1 << 20) as u32;
    assert_eq!(
        resent,
        durable_at_kill.bytes_until(end, lg_max).min(resent),
        "log bytes after restart {resent}; durable at the kill {durable_at_kill:?}, end {end:?}; \
         the restarted standby said: {resumed:#?}"
    );
    assert!(resent <= durable_at_kill.bytes_until(end, lg_max) + 1);
    assert_identical(&s, last, "after-standby-restart")
}

#[test]
fn primary_kill9_and_restart_resumes() -> Result<()> {
    let s = Scratch::new()?;
    bdb::run_workload(&s.path("env"), &workload(3000))?;
    let mut primary = start_primary(s.root(), &s.path("env"), &s.certs, "127.0.0.1:0", &[])?;
    let addr = primary.addr.to_string();
    let _standby = start_standby(s.root(), &s.path("standby"), &primary.url(), &s.certs, &[])?;
    let mut w = spawn_workload(
        &s,
        &WorkloadOptions {
            rate: 4000,
            ..workload(16_000)
        },
        "load",
    )?;
    wait_for("the base to complete", CATCH_UP, || {
        Ok(standby_status(&s.path("standby"))?["recoverable"] == true)
    })?;
    let files_before = standby_status(&s.path("standby"))?["file_bytes_received"]
        .as_u64()
        .unwrap_or(0);
    primary.proc.kill9()?;
    wait_for("the standby to notice", CATCH_UP, || {
        Ok(standby_status(&s.path("standby"))?["connected"] == false)
    })?;
    let _primary = start_primary(s.root(), &s.path("env"), &s.certs, &addr, &[])?;
    let last = finish_workload(&mut w)?;
    wait_caught_up(&s.path("standby"), &s.path("env"), CATCH_UP)?;
    let after = standby_status(&s.path("standby"))?;
    assert_eq!(
        after["file_bytes_received"].as_u64().unwrap_or(0),
        files_before,
        "no file may be sent again after a primary restart"
    );
    assert!(after["reconnects"].as_u64().unwrap_or(0) >= 1);
    assert_identical(&s, last, "after-primary-restart")
}

#[test]
fn a_corrupted_chunk_is_caught_and_fetched_again() -> Result<()> {
    let s = Scratch::new()?;
    bdb::run_workload(&s.path("env"), &workload(5000))?;
    let primary = start_primary(
        s.root(),
        &s.path("env"),
        &s.certs,
        "127.0.0.1:0",
        &["--fault-corrupt-chunk", "2"],
    )?;
    let _standby = start_standby(s.root(), &s.path("standby"), &primary.url(), &s.certs, &[])?;
    wait_caught_up(&s.path("standby"), &s.path("env"), CATCH_UP)?;
    let st = standby_status(&s.path("standby"))?;
    assert!(
        st["digest_failures"].as_u64().unwrap_or(0) >= 1,
        "the flipped chunk must be detected: {st}"
    );
    assert!(std::fs::read_to_string(&_standby.log)?.contains("blake3 mismatch"));
    assert_identical(&s, 5000, "after-corruption")
}

#[test]
fn db_config_data_and_log_directories_are_mirrored() -> Result<()> {
    let s = Scratch::new()?;
    let env = s.path("env");
    for d in ["data", "logs"] {
        std::fs::create_dir_all(env.join(d))?;
    }
    std::fs::write(
        env.join("DB_CONFIG"),
        "set_data_dir data\nset_lg_dir logs\n",
    )?;
    bdb::run_workload(&env, &workload(2000))?;
    assert!(
        env.join("data/data.db").exists() && env.join("logs/log.0000000001").exists(),
        "BDB must honour DB_CONFIG"
    );
    let primary = start_primary(s.root(), &env, &s.certs, "127.0.0.1:0", &[])?;
    let _standby = start_standby(s.root(), &s.path("standby"), &primary.url(), &s.certs, &[])?;
    let last = bdb::run_workload(&env, &workload(3000))?;
    wait_caught_up(&s.path("standby"), &env, CATCH_UP)?;
    assert_eq!(
        std::fs::read(env.join("DB_CONFIG"))?,
        std::fs::read(s.path("standby/DB_CONFIG"))?
    );
    assert!(s.path("standby/data/data.db").exists() && s.path("standby/logs").is_dir());
    let copy = s.path("recovered");
    copy_env(&s.path("standby"), &copy)?;
    bdb::recover_catastrophic(&copy)?;
    assert_eq!(bdb::check(&copy.join("data"))?, last);
    assert_eq!(
        bdb::db_dump_all(&env, &WORKLOAD_DBS)?,
        bdb::db_dump_all(&copy, &WORKLOAD_DBS)?
    );
    Ok(())
}
