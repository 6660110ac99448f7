//! The link between primary and standby: a cut network is noticed on both
//! sides within seconds and never reads as "caught up"; a watcher that fell
//! behind log removal does not stall the stream; SIGTERM ends a streaming
//! standby promptly. The cut is real: the standby dials the primary through
//! a [`FaultyLink`] on loopback that stops forwarding without closing.

use anyhow::{Context, Result};
use std::process::Command;
use std::time::{Duration, Instant};
use tandem_tests::bdb::{self, WorkloadOptions};
use tandem_tests::faulty_link::FaultyLink;
use tandem_tests::harness::*;

const LONG: Duration = Duration::from_secs(180);
/// The standby's silence deadline is 5 s and keepalive pings time out after
/// 2 + 10 s; "within seconds" with room for a loaded 2-core machine.
const NOTICE_BOUND: Duration = Duration::from_secs(25);
const QUIET: [&str; 4] = ["--check-interval-secs", "0", "--rebase-after-mib", "0"];

fn standby_connected_at_primary(s: &Scratch, primary: &Primary) -> Result<bool> {
    let st = primary_status(primary, &s.certs)?;
    Ok(st["standbys"]
        .as_array()
        .context("standbys")?
        .iter()
        .any(|b| b["name"] == "test-standby" && b["connected"] == true))
}

fn status_text(dir: &std::path::Path) -> Result<String> {
    let out = Command::new(bin("tandem-standby"))
        .args(["status", "--dir"])
        .arg(dir)
        .output()?;
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

#[test]
fn a_cut_network_is_noticed_on_both_sides_and_lag_grows_until_it_heals() -> Result<()> {
    let s = Scratch::new()?;
    bdb::run_workload(&s.path("env"), &workload(1000, 200))?;
    let primary = start_primary(s.root(), &s.path("env"), &s.certs, "127.0.0.1:0", &[])?;
    let link = FaultyLink::start(primary.addr)?;
    let _standby = start_standby(s.root(), &s.path("standby"), &link.url(), &s.certs, &QUIET)?;
    wait_caught_up(&s.path("standby"), &s.path("env"), LONG)?;
    wait_for("the primary to see the standby", LONG, || {
        standby_connected_at_primary(&s, &primary)
    })?;

    // The application keeps committing through the partition.
    let mut w = s.spawn_workload(
        &WorkloadOptions {
            rate: 400,
            ..workload(4000, 200)
        },
        "w.log",
    )?;
    link.cut();
    let cut_at = Instant::now();
    wait_for("the standby to notice the cut", NOTICE_BOUND, || {
        let st = standby_status(&s.path("standby"))?;
        Ok(st["connected"] == false && st["lag_bytes"].is_null())
    })?;
    eprintln!("standby noticed the cut after {:?}", cut_at.elapsed());
    wait_for(
        "the primary to notice the cut",
        NOTICE_BOUND.saturating_sub(cut_at.elapsed()) + Duration::from_secs(5),
        || Ok(!standby_connected_at_primary(&s, &primary)?),
    )?;
    eprintln!("primary noticed the cut after {:?}", cut_at.elapsed());
    // Lag in seconds grows while nothing arrives, and it counts from the
    // last contact, not from the moment the standby noticed.
    let first = standby_status(&s.path("standby"))?["lag_seconds"]
        .as_f64()
        .unwrap_or(0.0);
    assert!(first >= 4.0, "lag_seconds {first} after a 5 s silence");
    wait_for("lag_seconds to grow", LONG, || {
        Ok(standby_status(&s.path("standby"))?["lag_seconds"]
            .as_f64()
            .unwrap_or(0.0)
            > first + 1.0)
    })?;
    let text = status_text(&s.path("standby"))?;
    assert!(
        text.contains("not connected") && text.contains("lag:          unknown bytes"),
        "{text}"
    );
    // The primary's log moved on; it knows the standby is behind.
    assert!(w.wait_exit(LONG)?.success());
    let last = bdb::parse_done(&w.log_text()).unwrap_or(0);
    let st = primary_status(&primary, &s.certs)?;
    let behind = st["standbys"][0]["lag_bytes"].as_u64().unwrap_or(0);
    assert!(
        behind > 0,
        "the primary must count the standby as behind: {st}"
    );

    link.heal();
    wait_caught_up(&s.path("standby"), &s.path("env"), LONG)?;
    wait_for("the standby to report no lag", LONG, || {
        let st = standby_status(&s.path("standby"))?;
        Ok(st["connected"] == true && st["lag_bytes"] == 0 && st["lag_seconds"] == 0.0)
    })?;
    wait_for("the primary to see the standby again", LONG, || {
        standby_connected_at_primary(&s, &primary)
    })?;
    assert!(link.connections() >= 2, "the standby must have reconnected");
    assert_eq!(
        recover_copy(&s.path("standby"), &s.path("recovered"))?,
        last
    );
    Ok(())
}

#[test]
fn log_files_removed_before_the_primary_saw_them_do_not_stall_the_stream() -> Result<()> {
    // The stall after a burst: the primary's log watcher fell behind, and
    // retention removed the file it was on and the next one. It stayed on
    // the removed file for good, its sessions waited for a next file that
    // never came, and heartbeats reported that stale end as "caught up".
    // Here the watcher is frozen (SIGSTOP) while the log moves on and the
    // files it would need are removed.
    let s = Scratch::new()?;
    bdb::run_workload(&s.path("env"), &workload(1000, 200))?;
    let mut primary = start_primary(s.root(), &s.path("env"), &s.certs, "127.0.0.1:0", &[])?;
    let _standby = start_standby(
        s.root(),
        &s.path("standby"),
        &primary.url(),
        &s.certs,
        &QUIET,
    )?;
    wait_caught_up(&s.path("standby"), &s.path("env"), LONG)?;
    let watched = primary_log_end(&s.path("env"))?;
    let pid = primary.proc.pid().to_string();
    let signal = |sig: &str| -> Result<()> {
        anyhow::ensure!(Command::new("kill").args([sig, &pid]).status()?.success());
        Ok(())
    };
    signal("-STOP")?;
    let moved = (|| -> Result<u64> {
        let last = bdb::run_workload(&s.path("env"), &workload(3000, 200))?;
        let layout = tandem_shared::envlayout::EnvLayout::open(&s.path("env"))?;
        let inactive = tandem_shared::bdb::BdbTools::default().inactive_logs(&s.path("env"))?;
        // All of them, from the first: retention removes a prefix, never
        // a file with an older one left behind.
        let gone = inactive;
        anyhow::ensure!(
            gone.contains(&watched.file) && gone.contains(&(watched.file + 1)),
            "the workload must have moved two files past {watched}: inactive {gone:?}"
        );
        for n in gone {
            std::fs::remove_file(layout.log_path(n))?;
        }
        Ok(last)
    })();
    signal("-CONT")?;
    let last = moved?;
    let end = primary_log_end(&s.path("env"))?;
    wait_for(
        "the primary to report its real end of log",
        Duration::from_secs(60),
        || {
            let st = primary_status(&primary, &s.certs)?;
            Ok(lsn_of(&st["end_lsn"]) == end)
        },
    )?;
    wait_caught_up(&s.path("standby"), &s.path("env"), LONG)?;
    assert_eq!(
        recover_copy(&s.path("standby"), &s.path("recovered"))?,
        last
    );
    primary.proc.stop(Duration::from_secs(30))?;
    Ok(())
}

#[test]
fn sigterm_ends_a_streaming_standby_promptly_and_it_resumes() -> Result<()> {
    let s = Scratch::new()?;
    bdb::run_workload(&s.path("env"), &workload(1000, 200))?;
    let (primary, mut standby) = start_pair(&s, &["--rebase-after-mib", "0"])?;
    wait_caught_up(&s.path("standby"), &s.path("env"), LONG)?;
    let mut w = s.spawn_workload(
        &WorkloadOptions {
            rate: 1000,
            ..workload(6000, 200)
        },
        "w.log",
    )?;
    let before = lsn_of(&standby_status(&s.path("standby"))?["durable_lsn"]);
    wait_for("the standby to stream", LONG, || {
        Ok(lsn_of(&standby_status(&s.path("standby"))?["durable_lsn"]) > before)
    })?;
    let t = Instant::now();
    let code = standby.stop(Duration::from_secs(15))?;
    eprintln!("SIGTERM to exit: {:?}", t.elapsed());
    assert!(code.success(), "{code:?}: {}", standby.log_text());
    assert!(t.elapsed() < Duration::from_secs(10), "{:?}", t.elapsed());
    // Nothing holds the directory any more, and what it holds is durable.
    let st = standby_status(&s.path("standby"))?;
    assert_eq!(st["running"], false);
    assert!(w.wait_exit(LONG)?.success());
    let last = bdb::parse_done(&w.log_text()).unwrap_or(0);
    let _again = start_standby(
        s.root(),
        &s.path("standby"),
        &primary.url(),
        &s.certs,
        &QUIET,
    )?;
    wait_caught_up(&s.path("standby"), &s.path("env"), LONG)?;
    assert_eq!(
        recover_copy(&s.path("standby"), &s.path("recovered"))?,
        last
    );
    Ok(())
}

#[test]
fn a_slow_lossy_link_still_ends_with_an_exact_copy() -> Result<()> {
    let s = Scratch::new()?;
    bdb::run_workload(&s.path("env"), &workload(1000, 200))?;
    let primary = start_primary(s.root(), &s.path("env"), &s.certs, "127.0.0.1:0", &[])?;
    let link = FaultyLink::start(primary.addr)?;
    link.delay(20);
    link.stall_randomly(0.05);
    let _standby = start_standby(s.root(), &s.path("standby"), &link.url(), &s.certs, &QUIET)?;
    let last = bdb::run_workload(
        &s.path("env"),
        &WorkloadOptions {
            rate: 1000,
            ..workload(3000, 200)
        },
    )?;
    wait_caught_up(&s.path("standby"), &s.path("env"), LONG)?;
    let (up, down) = link.bytes();
    eprintln!(
        "through the link: {up} bytes up, {down} down, {} connections",
        link.connections()
    );
    assert_eq!(
        recover_copy(&s.path("standby"), &s.path("recovered"))?,
        last
    );
    Ok(())
}
