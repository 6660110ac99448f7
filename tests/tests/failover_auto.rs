//! Issue #20: automatic failover. kill -9 of the application and the
//! primary: the most caught-up of two standbys promotes by itself within
//! the ttl and a few seconds, holds an exact prefix of the committed
//! transactions, serves as primary; the other standby follows it without a
//! new base (0 database bytes re-sent) and shows etcd's view in its
//! metrics; every commit whose wait (`wait-durable`'s socket) answered
//! durable is in the promoted environment; the old primary, restarted, is
//! refused. Real etcd, real BDB, loopback mTLS.

use anyhow::{ensure, Context, Result};
use std::process::Command;
use std::time::{Duration, Instant};
use tandem_tests::bdb::{self, WorkloadOptions};
use tandem_tests::etcd::{EtcdCluster, FAST_TIMING};
use tandem_tests::harness::*;

const LONG: Duration = Duration::from_secs(120);

fn timing() -> Vec<String> {
    FAST_TIMING.map(String::from).to_vec()
}

fn strs(v: &[String]) -> Vec<&str> {
    v.iter().map(String::as_str).collect()
}

#[test]
fn kill_9_of_the_primary_machine_promotes_one_standby_and_the_other_follows_it() -> Result<()> {
    let etcd = EtcdCluster::start()?;
    let s = Scratch::new()?;
    let env = s.path("env");
    bdb::run_workload(
        &env,
        &WorkloadOptions {
            txns: 300,
            ..Default::default()
        },
    )?;
    let mut pargs = vec![
        "--etcd".to_owned(),
        etcd.endpoints(),
        "--name".into(),
        "p1".into(),
    ];
    pargs.extend(timing());
    let mut primary = start_primary(s.root(), &env, &s.certs, "127.0.0.1:0", &strs(&pargs))?;
    let mut standbys = Vec::new();
    let mut listens = Vec::new();
    let mut admin = Vec::new();
    for name in ["s1", "s2"] {
        let listen = free_addr()?;
        let metrics = free_addr()?;
        let mut args = vec![
            "--etcd".to_owned(),
            etcd.endpoints(),
            "--promote-listen".into(),
            listen.clone(),
            "--metrics-listen".into(),
            metrics.clone(),
            "--check-interval-secs".into(),
            "0".into(),
            "--on-promote".into(),
            format!("touch {}", s.path(&format!("{name}.promoted")).display()),
        ];
        args.extend(timing());
        let p = start_standby_as(
            s.root(),
            &s.path(name),
            &primary.url(),
            &s.certs,
            name,
            &strs(&args),
        )?;
        standbys.push(p);
        listens.push(listen);
        admin.push(metrics);
    }
    for (i, name) in ["s1", "s2"].iter().enumerate() {
        wait_caught_up_running(&s.path(name), &env, LONG, &mut standbys[i])?;
    }
    wait_for("both standbys published", LONG, || {
        Ok(etcd.get("/tandem/c1/members/s1")?.is_some()
            && etcd.get("/tandem/c1/members/s2")?.is_some())
    })?;

    // The application commits, each commit waited for (`wait-durable`'s
    // socket), then the primary machine dies right after waited commits.
    let durable = s.path("app.durable");
    let waited = |durable: &std::path::Path| -> u64 {
        std::fs::read_to_string(durable)
            .unwrap_or_default()
            .lines()
            .filter_map(|l| l.trim().parse().ok())
            .max()
            .unwrap_or(0)
    };
    let mut app = Proc::spawn(
        "workload",
        WorkloadOptions {
            txns: 0,
            seconds: Some(300),
            rate: 200,
            lsn_log: Some(s.path("app.lsn")),
            wait: Some((
                env.join(".tandem-primary").join("wait.sock"),
                durable.clone(),
            )),
            ..Default::default()
        }
        .command(&env),
        &s.path("app.log"),
    )?;
    wait_while_running("some waited commits", LONG, &mut app, || {
        Ok(waited(&durable) > 400)
    })?;
    app.kill9()?;
    primary.proc.kill9()?;
    let killed = Instant::now();
    let last_waited = waited(&durable);

    // Exactly one promotes, and serves as primary where it said it would.
    let mut winner = None;
    wait_for(
        "a standby to promote and serve",
        Duration::from_secs(30),
        || {
            if let Some(l) = etcd.get_json("/tandem/c1/leader")? {
                if l["state"] == "primary" && l["name"] != "p1" {
                    winner = l["name"].as_str().map(str::to_owned);
                    return Ok(true);
                }
            }
            Ok(false)
        },
    )?;
    let winner = winner.context("winner")?;
    let (wi, li) = if winner == "s1" { (0, 1) } else { (1, 0) };
    let serving = killed.elapsed();
    let new_env = s.path(&winner);
    // First committed transaction on the new primary.
    bdb::run_workload(
        &new_env,
        &WorkloadOptions {
            txns: 1,
            ..Default::default()
        },
    )
    .or_else(|_| {
        bdb::run_workload(
            &new_env,
            &WorkloadOptions {
                txns: 1,
                recover: true,
                ..Default::default()
            },
        )
    })?;
    let first_commit = killed.elapsed();
    eprintln!("failover: {winner} serving {serving:?} and first commit {first_commit:?} after kill -9 (ttl 3 s)");
    ensure!(
        first_commit < Duration::from_secs(3 + 10),
        "failover took {first_commit:?}"
    );
    ensure!(
        s.path(&format!("{winner}.promoted")).exists(),
        "--on-promote did not run"
    );
    ensure!(
        !s.path(&format!("{}.promoted", ["s1", "s2"][li])).exists(),
        "both promoted"
    );
    let leader = etcd.get_json("/tandem/c1/leader")?.context("leader")?;
    ensure!(
        leader["address"] == format!("https://{}", listens[wi]),
        "{leader}"
    );
    let failover = etcd
        .get_json("/tandem/c1/failover")?
        .context("failover record")?;
    ensure!(failover["name"] == winner.as_str(), "{failover}");

    // The other standby follows the new primary without a new base.
    let loser = s.path(["s1", "s2"][li]);
    let base_before = standby_status(&loser)?["base_id"].clone();
    let followed = wait_while_running(
        "the other standby to follow the new primary",
        LONG,
        &mut standbys[li],
        || {
            let st = standby_status(&loser)?;
            Ok(st["connected"] == true
                && st["primary"] == leader["address"]
                && st["epoch"] == leader["epoch"]
                && st["running"] == true
                && st["lag_bytes"] == 0
                // `status` shows the etcd round's view, read from its file.
                && st["etcd"]["leader"] == winner.as_str()
                && st["etcd"]["etcd_epoch"] == leader["epoch"])
        },
    );
    followed.with_context(|| {
        format!(
            "leader {leader}, standby {}",
            standby_status(&loser).unwrap_or_default()
        )
    })?;
    let st = standby_status(&loser)?;
    ensure!(
        st["base_id"] == base_before && st["file_bytes_received"] == 0,
        "a new base was sent: {st}"
    );
    // Its metrics show etcd's view: a leader, the new epoch, the failover.
    wait_for("the etcd metrics of the new epoch", LONG, || {
        let m = scrape_metrics(&admin[li])?;
        Ok(metric(&m, "tandem_standby_etcd_leader_known")? == 1.0
            && metric(&m, "tandem_standby_etcd_epoch")? == leader["epoch"].as_f64().unwrap_or(-1.0)
            && metric(&m, "tandem_standby_etcd_last_failover_timestamp_seconds")? > 0.0
            && metric(&m, "tandem_standby_etcd_promotion_failed")? == 0.0
            && metric(&m, "tandem_standby_etcd_lease_remaining_seconds")? > 0.0)
    })?;

    // Exact prefix: the promoted environment (a copy, the new primary runs).
    standbys[li].stop(LONG)?;
    copy_env(&new_env, &s.path("check"))?;
    let m = bdb::check(&s.path("check"))?;
    eprintln!("promoted environment holds the exact prefix 1..={m}; the last waited commit was {last_waited}");
    ensure!(
        m >= last_waited,
        "a waited commit was lost: the wait of transaction {last_waited} answered durable, the promoted environment ends at {m}"
    );

    // The old primary, restarted, is refused.
    let out = Command::new(bin("tandem-primary"))
        .args(["run", "--listen", "127.0.0.1:0", "--env"])
        .arg(&env)
        .args(s.certs.args("primary"))
        .args(&pargs)
        .output()?;
    ensure!(
        out.status.code() == Some(7),
        "{:?}: {}",
        out.status,
        String::from_utf8_lossy(&out.stderr)
    );
    Ok(())
}

/// etcd loses its quorum: nobody promotes, the primary fences after its
/// ttl, and when the quorum returns the same primary leads again and the
/// standby follows it as before.
#[test]
fn quorum_lost_means_no_promotion_a_fenced_primary_and_a_resume() -> Result<()> {
    let mut etcd = EtcdCluster::start()?;
    let s = Scratch::new()?;
    let env = s.path("env");
    bdb::run_workload(
        &env,
        &WorkloadOptions {
            txns: 100,
            ..Default::default()
        },
    )?;
    let fence_file = s.path("fenced");
    let mut pargs = vec![
        "--etcd".to_owned(),
        etcd.endpoints(),
        "--name".into(),
        "p1".into(),
        "--on-fence".into(),
        format!("touch {}", fence_file.display()),
    ];
    pargs.extend(timing());
    let _primary = start_primary(s.root(), &env, &s.certs, "127.0.0.1:0", &strs(&pargs))?;
    let mut args = vec![
        "--etcd".to_owned(),
        etcd.endpoints(),
        "--promote-listen".into(),
        free_addr()?,
        "--check-interval-secs".into(),
        "0".into(),
    ];
    args.extend(timing());
    let url = etcd.get_json("/tandem/c1/leader")?.context("leader")?["address"]
        .as_str()
        .context("address")?
        .to_owned();
    let mut standby =
        start_standby_as(s.root(), &s.path("s1"), &url, &s.certs, "s1", &strs(&args))?;
    wait_caught_up_running(&s.path("s1"), &env, LONG, &mut standby)?;

    etcd.kill(1)?;
    etcd.kill(2)?;
    let lost = Instant::now();
    wait_for("the primary to fence", Duration::from_secs(10), || {
        Ok(fence_file.exists())
    })?;
    ensure!(
        lost.elapsed() <= Duration::from_secs(4),
        "fenced {:?} after the quorum went",
        lost.elapsed()
    );
    // Twice the ttl without quorum: the standby never promoted.
    wait_while_running(
        "twice the ttl",
        Duration::from_secs(6),
        &mut standby,
        || Ok(lost.elapsed() > Duration::from_secs(6)),
    )?;
    ensure!(
        standby_status(&s.path("s1"))?["role"] == "standby",
        "promoted without quorum"
    );

    etcd.restart(1)?;
    etcd.restart(2)?;
    wait_for("the primary to lead again", LONG, || {
        Ok(etcd
            .get_json("/tandem/c1/leader")?
            .is_some_and(|l| l["name"] == "p1"))
    })?;
    wait_caught_up_running(&s.path("s1"), &env, LONG, &mut standby)?;
    ensure!(standby_status(&s.path("s1"))?["epoch"] == 1);
    Ok(())
}
