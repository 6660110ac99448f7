//! Issue #20: the primary under etcd. It holds the leader key and
//! publishes; cut off from etcd it fences itself (stops shipping, refuses
//! commit waits, runs --on-fence) before etcd expires its lease, resumes
//! when etcd returns with its epoch untouched, and once etcd holds a newer
//! epoch it is refused at start (exit 7). Real etcd, real BDB, loopback.

use anyhow::{ensure, Context, Result};
use std::process::Command;
use std::time::{Duration, Instant};
use tandem_tests::bdb::WorkloadOptions;
use tandem_tests::etcd::{EtcdCluster, FAST_TIMING};
use tandem_tests::faulty_link::FaultyLink;
use tandem_tests::harness::*;

const LONG: Duration = Duration::from_secs(120);
const TTL: Duration = Duration::from_secs(3);

fn etcd_args(endpoints: &str, fence_file: &std::path::Path) -> Vec<String> {
    ["--etcd", endpoints, "--name", "p1"]
        .into_iter()
        .chain(FAST_TIMING)
        .chain(["--on-fence"])
        .map(String::from)
        .chain([format!(
            "echo \"$TANDEM_FENCE_REASON\" >> {}",
            fence_file.display()
        )])
        .collect()
}

fn wait_durable(env: &std::path::Path) -> Result<std::process::Output> {
    Ok(Command::new(bin("tandem-primary"))
        .args(["wait-durable", "--timeout-ms", "5000", "--env"])
        .arg(env)
        .output()?)
}

#[test]
fn a_primary_cut_off_from_etcd_fences_before_its_lease_expires_and_resumes_after() -> Result<()> {
    let etcd = EtcdCluster::start()?;
    let links: Vec<FaultyLink> = (0..3)
        .map(|i| FaultyLink::start(etcd.client_addr(i)))
        .collect::<Result<_>>()?;
    let proxied = links
        .iter()
        .map(|l| format!("http://{}", l.addr()))
        .collect::<Vec<_>>()
        .join(",");
    let s = Scratch::new()?;
    let env = s.path("env");
    tandem_tests::bdb::run_workload(
        &env,
        &WorkloadOptions {
            txns: 200,
            ..Default::default()
        },
    )?;
    let fence_file = s.path("fenced.txt");
    let args = etcd_args(&proxied, &fence_file);
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    let mut primary = start_primary(s.root(), &env, &s.certs, "127.0.0.1:0", &args)?;
    let leader = etcd
        .get_json("/tandem/c1/leader")?
        .context("no leader key")?;
    ensure!(
        leader["name"] == "p1" && leader["address"] == primary.url(),
        "{leader}"
    );
    let epoch = leader["epoch"].as_u64().context("epoch")?;
    let mut standby = start_standby(
        s.root(),
        &s.path("standby"),
        &primary.url(),
        &s.certs,
        &["--check-interval-secs", "0"],
    )?;
    wait_caught_up_running(&s.path("standby"), &env, LONG, &mut standby)?;
    let out = wait_durable(&env)?;
    ensure!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    wait_for("the position and floor in etcd", LONG, || {
        Ok(etcd.get_json("/tandem/c1/position")?.is_some()
            && etcd.get_json("/tandem/c1/floor")?.is_some())
    })?;

    // Cut off: fenced within the ttl, while etcd still holds the key.
    let cut = Instant::now();
    links.iter().for_each(FaultyLink::cut);
    wait_for("the fence", TTL + Duration::from_secs(2), || {
        Ok(fence_file.exists())
    })?;
    let fenced_after = cut.elapsed();
    ensure!(
        etcd.get("/tandem/c1/leader")?.is_some(),
        "etcd expired the lease before the primary fenced ({fenced_after:?})"
    );
    ensure!(
        fenced_after <= TTL,
        "fenced only {fenced_after:?} after the cut"
    );
    let reason = std::fs::read_to_string(&fence_file)?;
    ensure!(reason.contains("could not renew"), "{reason}");
    let out = wait_durable(&env)?;
    ensure!(
        !out.status.success(),
        "a fenced primary answered a commit wait"
    );
    ensure!(
        String::from_utf8_lossy(&out.stderr).contains("fenced"),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    // It ships nothing: the standby's stream ends and is refused.
    wait_for(
        "the standby to be cut from the fenced primary",
        LONG,
        || Ok(standby_status(&s.path("standby"))?["connected"] == false),
    )?;
    wait_for("etcd to expire the lease", LONG, || {
        Ok(etcd.get("/tandem/c1/leader")?.is_none())
    })?;
    eprintln!(
        "fenced {fenced_after:?} after the cut, lease gone {:?} after it",
        cut.elapsed()
    );

    // etcd back, epoch untouched: it leads again and serves.
    links.iter().for_each(FaultyLink::heal);
    wait_for("the primary to lead again", LONG, || {
        Ok(etcd.get("/tandem/c1/leader")?.is_some())
    })?;
    wait_caught_up_running(&s.path("standby"), &env, LONG, &mut standby)?;
    let out = wait_durable(&env)?;
    ensure!(
        out.status.success(),
        "after the heal: {}",
        String::from_utf8_lossy(&out.stderr)
    );

    // A promotion elsewhere moved etcd's epoch: the restarted primary is refused.
    standby.stop(LONG)?;
    primary.proc.stop(LONG)?;
    let newer = serde_json::json!({"epoch": epoch + 1, "name": "s1", "unix_ms": 0}).to_string();
    let out = etcd.etcdctl(&["put", "/tandem/c1/epoch", &newer])?;
    ensure!(out.status.success());
    std::fs::remove_file(&fence_file)?;
    let out = Command::new(bin("tandem-primary"))
        .args(["run", "--listen", "127.0.0.1:0", "--env"])
        .arg(&env)
        .args(s.certs.args("primary"))
        .args(&args)
        .output()?;
    let stderr = String::from_utf8_lossy(&out.stderr);
    ensure!(out.status.code() == Some(7), "{:?}: {stderr}", out.status);
    ensure!(
        stderr.contains("newer than this primary's epoch"),
        "{stderr}"
    );
    ensure!(fence_file.exists(), "--on-fence did not run on the refusal");
    Ok(())
}

/// Without --etcd nothing of this applies: status shows no etcd section.
#[test]
fn without_etcd_the_status_has_no_etcd_section() -> Result<()> {
    let p = pair(&WorkloadOptions {
        txns: 50,
        ..Default::default()
    })?;
    let out = Command::new(bin("tandem-primary"))
        .args(["status", "--json", "--primary", &p.primary.url()])
        .args(p.s.certs.args("standby"))
        .output()?;
    ensure!(out.status.success());
    let doc: serde_json::Value = serde_json::from_slice(&out.stdout)?;
    ensure!(doc["etcd"].is_null(), "{doc}");
    Ok(())
}

/// One etcd member killed changes nothing, and a 3 s blip between the
/// primary and etcd (shorter than the ttl's allowance) causes no fence.
#[test]
fn a_member_killed_or_a_3s_blip_changes_nothing() -> Result<()> {
    let mut etcd = EtcdCluster::start()?;
    let links: Vec<FaultyLink> = (0..3)
        .map(|i| FaultyLink::start(etcd.client_addr(i)))
        .collect::<Result<_>>()?;
    let proxied = links
        .iter()
        .map(|l| format!("http://{}", l.addr()))
        .collect::<Vec<_>>()
        .join(",");
    let s = Scratch::new()?;
    let env = s.path("env");
    tandem_tests::bdb::run_workload(
        &env,
        &WorkloadOptions {
            txns: 50,
            ..Default::default()
        },
    )?;
    let fence_file = s.path("fenced.txt");
    let mut args = etcd_args(&proxied, &fence_file);
    // ttl 6 s: loop 500 ms + 2 × 1000 ms ≤ 6 s, fence 5.5 s after a renewal.
    args[7] = "6".into();
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    let _primary = start_primary(s.root(), &env, &s.certs, "127.0.0.1:0", &args)?;
    let lease_of = |etcd: &EtcdCluster| -> Result<String> {
        let out = etcd.etcdctl(&["get", "/tandem/c1/leader", "-w", "json"])?;
        let v: serde_json::Value = serde_json::from_slice(&out.stdout)?;
        Ok(v["kvs"][0]["lease"].to_string())
    };
    let lease = lease_of(&etcd)?;
    // Absence of a fence is a property of a stretch of time: these sleeps
    // are the windows looked at, each longer than the primary's renewals.
    etcd.kill(0)?;
    std::thread::sleep(Duration::from_secs(4));
    ensure!(!fence_file.exists(), "fenced with one member down");
    ensure!(
        lease_of(&etcd)? == lease,
        "the leader key changed with one member down"
    );
    etcd.restart(0)?;
    etcd.wait_healthy(LONG)?;
    links.iter().for_each(FaultyLink::cut);
    std::thread::sleep(Duration::from_secs(3));
    links.iter().for_each(FaultyLink::heal);
    std::thread::sleep(Duration::from_secs(4));
    ensure!(
        !fence_file.exists(),
        "a 3 s blip fenced the primary: {}",
        std::fs::read_to_string(&fence_file).unwrap_or_default()
    );
    ensure!(
        lease_of(&etcd)? == lease,
        "the leader key changed after a 3 s blip"
    );
    Ok(())
}
