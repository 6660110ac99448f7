//! Issue #13: an application waits until its commit is durable on a
//! standby (the primary's wait socket, the C client, `wait-durable`).
//! Real binaries, real Berkeley DB, mutual TLS on loopback.

use anyhow::{ensure, Context, Result};
use std::io::{Read, Write};
use std::os::unix::fs::PermissionsExt;
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::time::{Duration, Instant};
use tandem_tests::bdb::{self, WorkloadOptions};
use tandem_tests::harness::*;

const LONG: Duration = Duration::from_secs(120);

fn socket_of(env: &Path) -> PathBuf {
    env.join(".tandem-primary").join("wait.sock")
}

fn wait_durable(env: &Path, extra: &[&str]) -> Result<Output> {
    Ok(Command::new(bin("tandem-primary"))
        .arg("wait-durable")
        .arg("--env")
        .arg(env)
        .args(extra)
        .output()?)
}

/// One request on a fresh connection; the reply line and whether the
/// primary closed the connection after it.
fn ask(socket: &Path, request: &[u8]) -> Result<(String, bool)> {
    let mut s = UnixStream::connect(socket)?;
    s.set_read_timeout(Some(LONG))?;
    s.write_all(request)?;
    let mut reply = Vec::new();
    let mut byte = [0u8; 1];
    while !reply.ends_with(b"\n") {
        ensure!(s.read(&mut byte)? == 1, "closed before a reply: {reply:?}");
        reply.push(byte[0]);
    }
    // Closed: the next read sees the end (or a reset, when the primary
    // closed with bytes of ours unread) at once. Open: it times out.
    s.set_read_timeout(Some(Duration::from_millis(300)))?;
    let closed = match s.read(&mut byte) {
        Ok(n) => n == 0,
        Err(e) => e.kind() == std::io::ErrorKind::ConnectionReset,
    };
    Ok((String::from_utf8(reply)?.trim_end().to_owned(), closed))
}

/// Transactions whose wait returned durable, in the order they returned.
fn durable_log(path: &Path) -> Result<Vec<u64>> {
    let text = std::fs::read_to_string(path).unwrap_or_default();
    let complete = text.rfind('\n').map_or("", |i| &text[..=i]);
    complete
        .lines()
        .map(|l| l.parse().with_context(|| format!("bad line {l:?}")))
        .collect()
}

#[test]
fn every_transaction_whose_wait_returned_survives_losing_both_machines() -> Result<()> {
    for trial in 0..2 {
        let mut p = pair(&WorkloadOptions {
            txns: 500,
            ..Default::default()
        })?;
        let env = p.s.path("env");
        let durable = p.s.path("durable.log");
        let opts = WorkloadOptions {
            txns: 0,
            seconds: Some(300),
            wait: Some((socket_of(&env), durable.clone())),
            ..Default::default()
        };
        let mut w = Proc::spawn("workload", opts.command(&env), &p.s.path("workload.log"))?;
        // A random moment, a few hundred waited commits in.
        let kill_after = 200 + rand::random::<u64>() % 800;
        wait_while_running("waited commits", LONG, &mut w, || {
            Ok(durable_log(&durable)?.len() as u64 >= kill_after)
        })?;
        // Both machines die at once: application, primary and standby.
        w.kill9()?;
        p.primary.proc.kill9()?;
        p.standby.kill9()?;
        let returned = durable_log(&durable)?;
        let last_durable = *returned.last().context("no wait returned")?;
        ensure!(
            returned.windows(2).all(|t| t[1] == t[0] + 1),
            "trial {trial}: a wait did not return durable: {}",
            w.log_text()
        );
        let out = Command::new(bin("tandem-standby"))
            .args(["promote", "--json", "--force", "--dir"])
            .arg(p.s.path("standby"))
            .output()?;
        ensure!(
            out.status.success(),
            "trial {trial}: promote failed: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        let m = bdb::check(&p.s.path("standby")).with_context(|| format!("trial {trial}"))?;
        assert!(
            m >= last_durable,
            "trial {trial}: the promoted standby holds 1..{m}, but the wait of {last_durable} returned durable"
        );
        eprintln!("trial {trial}: waits returned up to {last_durable}; promoted holds 1..{m}");
    }
    Ok(())
}

#[test]
fn an_environment_deeper_than_a_socket_address_still_serves_commit_waits() -> Result<()> {
    // The default socket sits beside the primary's state; a Unix socket
    // address holds 107 bytes, environments live wherever they live.
    let s = Scratch::new()?;
    let env = s.path(&"d".repeat(60)).join("e".repeat(60)).join("env");
    ensure!(socket_of(&env).as_os_str().len() > 108);
    bdb::run_workload(
        &env,
        &WorkloadOptions {
            txns: 50,
            ..Default::default()
        },
    )?;
    let primary = start_primary(s.root(), &env, &s.certs, "127.0.0.1:0", &[])?;
    let mut standby = start_standby(
        s.root(),
        &s.path("standby"),
        &primary.url(),
        &s.certs,
        &["--check-interval-secs", "0"],
    )?;
    wait_caught_up_running(&s.path("standby"), &env, LONG, &mut standby)?;
    // The C client (the workload's -W) and the CLI both reach it.
    let durable = s.path("durable.log");
    bdb::run_workload(
        &env,
        &WorkloadOptions {
            txns: 100,
            wait: Some((socket_of(&env), durable.clone())),
            ..Default::default()
        },
    )?;
    assert_eq!(durable_log(&durable)?.len(), 100);
    let out = wait_durable(&env, &["--timeout-ms", "60000"])?;
    assert_eq!(
        out.status.code(),
        Some(0),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    drop(primary);
    Ok(())
}

#[test]
fn without_enough_standbys_a_wait_times_out_at_its_timeout_and_says_why() -> Result<()> {
    let s = Scratch::new()?;
    let env = s.path("env");
    bdb::run_workload(
        &env,
        &WorkloadOptions {
            txns: 50,
            ..Default::default()
        },
    )?;
    let metrics = free_addr()?;
    let primary = start_primary(
        s.root(),
        &env,
        &s.certs,
        "127.0.0.1:0",
        &["--metrics-listen", &metrics],
    )?;

    // No standby: the CLI waits its whole timeout, exits 5, says why.
    let t = Instant::now();
    let out = wait_durable(&env, &["--timeout-ms", "700"])?;
    let took = t.elapsed();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(5), "{stderr}");
    assert!(stderr.contains("no standby is connected"), "{stderr}");
    assert!(
        took >= Duration::from_millis(700),
        "returned after {took:?}"
    );
    let out = wait_durable(&env, &["--timeout-ms", "0", "--json"])?;
    let doc: serde_json::Value = serde_json::from_slice(&out.stdout)?;
    assert_eq!(doc["outcome"], "timeout", "{doc}");
    assert_eq!(doc["connected"], 0, "{doc}");

    // One standby caught up: K = 1 is durable at once, K = 2 times out.
    let mut standby = start_standby(
        s.root(),
        &s.path("standby"),
        &primary.url(),
        &s.certs,
        &["--check-interval-secs", "0"],
    )?;
    wait_caught_up_running(&s.path("standby"), &env, LONG, &mut standby)?;
    let out = wait_durable(&env, &["--timeout-ms", "60000"])?;
    assert_eq!(
        out.status.code(),
        Some(0),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(String::from_utf8_lossy(&out.stdout).contains("durable"));
    let end = primary_log_end(&env)?;
    let t = Instant::now();
    let (reply, closed) = ask(
        &socket_of(&env),
        format!("WAIT {} 0 2 600\n", end.file).as_bytes(),
    )?;
    let took = t.elapsed();
    assert!(
        reply.starts_with("TIMEOUT ")
            && reply.ends_with(" 1 2 standbys asked for, only 1 connected"),
        "{reply}"
    );
    assert!(
        took >= Duration::from_millis(600),
        "returned after {took:?}"
    );
    assert!(!closed, "a timeout must leave the connection open");
    // Beyond what was logged: no standby can hold it yet.
    let out = wait_durable(
        &env,
        &[
            "--timeout-ms",
            "300",
            "--lsn",
            &format!("{}/{}", end.file + 5, 0),
        ],
    )?;
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(5), "{stderr}");
    assert!(
        stderr.contains("0 of 1 connected standbys hold"),
        "{stderr}"
    );

    let m = scrape_metrics(&metrics)?;
    assert_eq!(
        m.get("tandem_primary_commit_waits_total"),
        Some(&5.0),
        "{m:?}"
    );
    assert_eq!(
        m.get("tandem_primary_commit_wait_timeouts_total"),
        Some(&4.0),
        "{m:?}"
    );
    assert_eq!(
        m.get("tandem_primary_commit_wait_seconds_count"),
        Some(&1.0),
        "{m:?}"
    );
    drop(primary);
    Ok(())
}

#[test]
fn the_wait_socket_is_private_refuses_bad_requests_and_replaces_a_stale_file() -> Result<()> {
    let s = Scratch::new()?;
    let env = s.path("env");
    bdb::run_workload(
        &env,
        &WorkloadOptions {
            txns: 20,
            ..Default::default()
        },
    )?;
    let mut primary = start_primary(s.root(), &env, &s.certs, "127.0.0.1:0", &[])?;
    let socket = socket_of(&env);
    let mode = std::fs::metadata(&socket)?.permissions().mode();
    assert_eq!(mode & 0o777, 0o600, "mode {mode:o}");

    for bad in [
        &b"HELLO\n"[..],
        b"WAIT 1 2\n",
        b"WAIT 1 2 0 10\n",
        b"WAIT x 2 1 10\n",
        &[b'9'; 4096][..],
    ] {
        let shown = String::from_utf8_lossy(&bad[..bad.len().min(20)]).into_owned();
        let (reply, closed) = ask(&socket, bad)?;
        assert!(reply.starts_with("ERROR "), "{shown:?}: {reply}");
        assert!(
            closed,
            "{shown:?}: the connection stayed open after {reply}"
        );
    }
    // Many clients at once, the server unaffected by the bad ones.
    let clients: Vec<_> = (0..50)
        .map(|_| {
            let socket = socket.clone();
            std::thread::spawn(move || ask(&socket, b"WAIT 1 0 1 200\n"))
        })
        .collect();
    for c in clients {
        let (reply, _) = c.join().map_err(|_| anyhow::anyhow!("client panicked"))??;
        assert!(reply.starts_with("TIMEOUT 0/0 0 "), "{reply}");
    }

    // kill -9 leaves the socket file; the next primary replaces it.
    primary.proc.kill9()?;
    assert!(socket.exists());
    let out = wait_durable(&env, &["--timeout-ms", "100"])?;
    assert_eq!(
        out.status.code(),
        Some(6),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let primary = start_primary(s.root(), &env, &s.certs, "127.0.0.1:0", &[])?;
    let (reply, _) = ask(&socket, b"WAIT 1 0 1 0\n")?;
    assert!(reply.starts_with("TIMEOUT "), "{reply}");
    let out = wait_durable(&env, &["--timeout-ms", "100"])?;
    assert_eq!(
        out.status.code(),
        Some(5),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );

    // A second primary (another environment) pointed at a live socket is refused.
    let other = s.path("other");
    bdb::run_workload(
        &other,
        &WorkloadOptions {
            txns: 5,
            ..Default::default()
        },
    )?;
    // Through the config file: `wait-socket` there is the --wait-socket flag.
    let config = s.path("other.toml");
    std::fs::write(
        &config,
        format!("wait-socket = {:?}\n", socket.display().to_string()),
    )?;
    let config_arg = config.to_string_lossy().into_owned();
    let mut cmd = Command::new(bin("tandem-primary"));
    cmd.arg("run")
        .arg("--env")
        .arg(&other)
        .args(["--listen", "127.0.0.1:0", "--config", &config_arg])
        .args(s.certs.args("primary"));
    let mut second = Proc::spawn("tandem-primary (second)", cmd, &s.path("second.log"))?;
    let status = second.wait_exit(LONG)?;
    let log = second.log_text();
    assert!(
        !status.success(),
        "a second primary started on a live wait socket: {log}"
    );
    assert!(
        log.contains("another tandem-primary serves commit waits"),
        "{log}"
    );
    let (reply, _) = ask(&socket, b"WAIT 1 0 1 0\n")?;
    assert!(reply.starts_with("TIMEOUT "), "{reply}");

    // Stopped cleanly: the socket is gone, and so is the primary.
    let mut primary = primary;
    primary.proc.stop(LONG)?;
    assert!(!socket.exists(), "the socket outlived its primary");
    let out = wait_durable(&env, &["--timeout-ms", "100"])?;
    assert_eq!(
        out.status.code(),
        Some(6),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(String::from_utf8_lossy(&out.stderr).contains("no primary runs"));
    Ok(())
}

/// A standby still copying its first base cannot be promoted, so the log it
/// has already fsynced and acknowledged holds nothing for a waiter: the
/// wait answers durable only once the base is complete. (Before, every ack
/// counted, and a wait could return while a promotion would have failed.)
#[test]
fn a_standby_still_copying_its_base_holds_nothing_for_a_waiter() -> Result<()> {
    let s = Scratch::new()?;
    let env = s.path("env");
    bdb::run_workload(
        &env,
        &WorkloadOptions {
            txns: 20_000,
            ..Default::default()
        },
    )?;
    let primary = start_primary(s.root(), &env, &s.certs, "127.0.0.1:0", &[])?;
    // A slow link keeps the base copy under way while the log flows.
    let link = tandem_tests::faulty_link::FaultyLink::start(primary.addr)?;
    link.delay(300);
    let dir = s.path("standby");
    let mut standby = start_standby(
        s.root(),
        &dir,
        &link.url(),
        &s.certs,
        &["--check-interval-secs", "0"],
    )?;
    let mut acked = tandem_shared::LogPosition::ZERO;
    wait_while_running(
        "log fsynced during the base copy",
        LONG,
        &mut standby,
        || {
            let st = standby_status(&dir)?;
            acked = lsn_of(&st["durable_lsn"]);
            Ok(st["recoverable"] == false && acked.offset > 0)
        },
    )?;
    let lsn = format!("{}/0", acked.file);
    let out = wait_durable(&env, &["--lsn", &lsn, "--timeout-ms", "500"])?;
    let st = standby_status(&dir)?;
    ensure!(
        st["recoverable"] == false,
        "the base copy ended during the wait; the test proves nothing: {st}"
    );
    assert_eq!(
        out.status.code(),
        Some(5),
        "a wait answered from a standby that cannot be promoted yet: {}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    link.delay(0);
    wait_for("the base to complete", LONG, || {
        Ok(standby_status(&dir)?["recoverable"] == true)
    })?;
    let out = wait_durable(&env, &["--lsn", &lsn, "--timeout-ms", "60000"])?;
    assert_eq!(
        out.status.code(),
        Some(0),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    standby.stop(LONG)?;
    Ok(())
}

/// Issue #21: both daemons time the stages of commit → durable
/// (`*_seconds` histograms): a second of waited commits moves every one.
#[test]
fn the_stages_of_commit_to_durable_are_timed_on_both_daemons() -> Result<()> {
    let s = Scratch::new()?;
    let env = s.path("env");
    // tandem-waitbench creates the environment and its database.
    let bench = |secs: &str, socket: Option<&Path>| -> Result<String> {
        let mut cmd = Command::new(bdb::waitbench_bin());
        cmd.arg("-h")
            .arg(&env)
            .args(["-T", secs, "-t", "2", "-r", "200"]);
        if let Some(sock) = socket {
            cmd.arg("-W").arg(sock);
        }
        let out = cmd.output()?;
        ensure!(
            out.status.success(),
            "tandem-waitbench: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        Ok(String::from_utf8_lossy(&out.stdout).into_owned())
    };
    bench("1", None)?;
    let (pm, sm) = (free_addr()?, free_addr()?);
    let primary = start_primary(
        s.root(),
        &env,
        &s.certs,
        "127.0.0.1:0",
        &["--metrics-listen", &pm],
    )?;
    let dir = s.path("standby");
    let mut standby = start_standby(
        s.root(),
        &dir,
        &primary.url(),
        &s.certs,
        &["--check-interval-secs", "0", "--metrics-listen", &sm],
    )?;
    wait_caught_up_running(&dir, &env, LONG, &mut standby)?;
    let out = bench("1", Some(&socket_of(&env)))?;
    ensure!(out.contains(" timeouts=0 "), "{out}");
    let (p, sb) = (scrape_metrics(&pm)?, scrape_metrics(&sm)?);
    for (page, name) in [
        (&p, "tandem_primary_log_watch_late_seconds"),
        (&p, "tandem_primary_log_notice_to_send_seconds"),
        (&p, "tandem_primary_log_send_to_ack_seconds"),
        (&p, "tandem_primary_log_notice_to_ack_seconds"),
        (&p, "tandem_primary_commit_wait_ack_to_answer_seconds"),
        (&sb, "tandem_standby_log_receive_to_durable_seconds"),
        (&sb, "tandem_standby_log_fsync_seconds"),
        (&sb, "tandem_standby_log_durable_to_ack_seconds"),
    ] {
        let n = metric(page, &format!("{name}_count"))?;
        assert!(n > 0.0, "{name} timed nothing");
        // The 1.5× buckets reach from 100 µs to seconds.
        assert!(
            page.contains_key(&format!("{name}_bucket{{le=\"0.0001\"}}")),
            "{name}"
        );
    }
    // Only waits that an ack answered while they waited time the wake-up.
    let waited = metric(&p, "tandem_primary_commit_wait_seconds_count")?;
    assert!(metric(&p, "tandem_primary_commit_wait_ack_to_answer_seconds_count")? <= waited);
    drop(primary);
    Ok(())
}
