//! The runbooks (`docs/runbooks.md`) work when followed literally: each
//! block marked `<!-- runbook: NAME -->` is run by bash, as written, with
//! `STANDBY_DIR` set and the freshly built binaries first on PATH.

use anyhow::{bail, Context, Result};
use std::process::Command;
use std::time::{Duration, Instant};
use tandem_tests::bdb;
use tandem_tests::harness::*;

const LONG: Duration = Duration::from_secs(120);

fn runbook(name: &str) -> Result<String> {
    let runbooks =
        std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/../docs/runbooks.md"))?;
    let marker = format!("<!-- runbook: {name} -->");
    let after = runbooks
        .split_once(&marker)
        .with_context(|| format!("no runbook {name} in docs/runbooks.md"))?
        .1;
    let block = after
        .split_once("```sh\n")
        .context("no sh block after the marker")?
        .1;
    Ok(block
        .split_once("```")
        .context("unterminated block")?
        .0
        .to_owned())
}

fn run_runbook(name: &str, standby_dir: &std::path::Path) -> Result<String> {
    run_runbook_with(name, &[("STANDBY_DIR", standby_dir.display().to_string())])
}

/// Runs runbook `name` with these variables set.
fn run_runbook_with(name: &str, vars: &[(&str, String)]) -> Result<String> {
    let script = runbook(name)?;
    let bins = bin("tandem-standby")
        .parent()
        .context("binary directory")?
        .to_path_buf();
    let path = format!(
        "{}:{}",
        bins.display(),
        std::env::var("PATH").unwrap_or_default()
    );
    let out = Command::new("bash")
        .args(["-euo", "pipefail", "-c", &script])
        .envs(vars.iter().map(|(k, v)| (*k, v.as_str())))
        .env("PATH", path)
        .output()?;
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    if !out.status.success() {
        bail!("runbook {name} failed:\n{script}\n{text}");
    }
    Ok(text)
}

#[test]
fn switchover_runbook() -> Result<()> {
    let s = Scratch::new()?;
    bdb::run_workload(&s.path("env"), &workload(1000, 500))?;
    let primary = start_primary(s.root(), &s.path("env"), &s.certs, "127.0.0.1:0", &[])?;
    let _standby = start_standby(s.root(), &s.path("standby"), &primary.url(), &s.certs, &[])?;
    // The application runs, then is stopped (the runbook's first step).
    let last = bdb::run_workload(&s.path("env"), &workload(6000, 500))?;
    let out = run_runbook("switchover", &s.path("standby"))?;
    assert!(out.contains("switchover"), "{out}");
    assert_eq!(bdb::check(&s.path("standby"))?, last);
    Ok(())
}

#[test]
fn failover_runbook() -> Result<()> {
    let s = Scratch::new()?;
    bdb::run_workload(&s.path("env"), &workload(1000, 500))?;
    let mut primary = start_primary(s.root(), &s.path("env"), &s.certs, "127.0.0.1:0", &[])?;
    let _standby = start_standby(s.root(), &s.path("standby"), &primary.url(), &s.certs, &[])?;
    let last = bdb::run_workload(&s.path("env"), &workload(3000, 500))?;
    wait_caught_up(&s.path("standby"), &s.path("env"), LONG)?;
    primary.proc.kill9()?;
    run_runbook("failover", &s.path("standby"))?;
    assert_eq!(bdb::check(&s.path("standby"))?, last);
    Ok(())
}

#[test]
fn check_runbook() -> Result<()> {
    let s = Scratch::new()?;
    bdb::run_workload(&s.path("env"), &workload(2000, 500))?;
    let primary = start_primary(s.root(), &s.path("env"), &s.certs, "127.0.0.1:0", &[])?;
    let _standby = start_standby(s.root(), &s.path("standby"), &primary.url(), &s.certs, &[])?;
    wait_caught_up(&s.path("standby"), &s.path("env"), LONG)?;
    let out = run_runbook("check", &s.path("standby"))?;
    assert!(out.contains("recoverable"), "{out}");
    Ok(())
}

/// The rejoin runbook, for `old_home` following `primary`; returns its
/// output and the pid of the `run` it left in the background.
fn rejoin_runbook(
    s: &Scratch,
    old_home: &std::path::Path,
    primary: &Primary,
) -> Result<(String, u32)> {
    let a = s.certs.args("standby");
    let out = run_runbook_with(
        "rejoin",
        &[
            ("OLD_HOME", old_home.display().to_string()),
            ("NEW_PRIMARY", primary.url()),
            ("CERT", a[1].clone()),
            ("KEY", a[3].clone()),
            ("CA", a[5].clone()),
        ],
    )?;
    let pid = standby_status(old_home)?["pid"]
        .as_u64()
        .context("the rejoined standby's pid")? as u32;
    Ok((out, pid))
}

/// Stops the `run` a runbook left in the background (SIGTERM, by its pid).
fn stop_background(dir: &std::path::Path, pid: u32) -> Result<()> {
    Command::new("kill").arg(pid.to_string()).status()?;
    wait_for("the background standby to stop", LONG, || {
        Ok(standby_status(dir)?["running"] == false)
    })
}

#[test]
fn switchover_and_switchback_runbook() -> Result<()> {
    let s = Scratch::new()?;
    let (a, b) = (s.path("env"), s.path("standby"));
    bdb::run_workload(&a, &workload(2000, 500))?;
    let mut primary = start_primary(s.root(), &a, &s.certs, "127.0.0.1:0", &[])?;
    let _standby = start_standby(s.root(), &b, &primary.url(), &s.certs, &[])?;
    // A -> B: the application stops on A; switchover on B.
    let last = bdb::run_workload(&a, &workload(1000, 500))?;
    run_runbook("switchover", &b)?;
    primary.proc.stop(LONG)?;
    let mut primary = start_primary(s.root(), &b, &s.certs, "127.0.0.1:0", &[])?;
    let (out, pid) = rejoin_runbook(&s, &a, &primary)?;
    assert!(out.contains("streaming"), "{out}");
    assert_eq!(standby_status(&a)?["file_bytes_received"], 0, "{out}");
    assert_eq!(recover_copy(&a, &s.path("copy-a"))?, last);
    // Maintenance done; the application ran on B. B -> A.
    let last = bdb::run_workload(&b, &workload(1000, 500))?;
    wait_caught_up(&a, &b, LONG)?;
    stop_background(&a, pid)?;
    run_runbook_with("switchover", &[("STANDBY_DIR", a.display().to_string())])?;
    primary.proc.stop(LONG)?;
    let primary = start_primary(s.root(), &a, &s.certs, "127.0.0.1:0", &[])?;
    let (out, pid) = rejoin_runbook(&s, &b, &primary)?;
    assert!(out.contains("streaming"), "{out}");
    assert_eq!(standby_status(&b)?["file_bytes_received"], 0, "{out}");
    assert_eq!(recover_copy(&b, &s.path("copy-b"))?, last);
    stop_background(&b, pid)?;
    Ok(())
}

#[test]
fn s3_archive_runbook() -> Result<()> {
    let p = tandem_tests::archive_cmd::pair(1000)?;
    let s3 = tandem_tests::s3_server::start_s3(p.s.root())?;
    let last = bdb::run_workload(&p.s.path("env"), &workload(500, 500))?;
    wait_caught_up(&p.s.path("standby"), &p.s.path("env"), LONG)?;
    let mut vars = vec![
        ("STANDBY_DIR", p.s.path("standby").display().to_string()),
        ("ARCHIVE_URL", s3.url("runbook")),
        ("RESTORE_TO", p.s.path("restored").display().to_string()),
    ];
    let env = s3.env();
    vars.extend(env.iter().map(|(k, v)| (k.as_str(), v.clone())));
    let out = run_runbook_with("s3-archive", &vars)?;
    assert!(out.contains("OK s3://"), "{out}");
    assert_eq!(bdb::check(&p.s.path("restored"))?, last);
    Ok(())
}

use tandem_tests::etcd_trio::{switchover, Trio};

/// Issue #20, planned switchover through etcd: refusals change nothing
/// (etcd unreachable, a target that is not a member, an application that
/// still has the primary's environment open); then the runbook, literally:
/// the leader key moves to the target, never two primaries acting (sampled
/// every 100 ms), nothing lost, the old primary stops (exit 7), the other
/// standby follows the new primary with 0 database bytes re-sent.
/// `TANDEM_SWITCHOVER_ROUNDS=5` repeats it for the README's figure.
#[test]
fn etcd_switchover_runbook() -> Result<()> {
    if !tandem_tests::etcd::etcd_available() {
        bail!("etcd is not installed: run scripts/setup");
    }
    let rounds: u32 = match std::env::var("TANDEM_SWITCHOVER_ROUNDS") {
        Ok(s) => s.parse().context("TANDEM_SWITCHOVER_ROUNDS")?,
        Err(_) => 1,
    };
    let mut times = Vec::new();
    let mut fences = Vec::new();
    for round in 1..=rounds {
        let etcd = tandem_tests::etcd::EtcdCluster::start()?;
        let (t, fence) = etcd_switchover_round(&etcd, round == 1)
            .with_context(|| format!("round {round} of {rounds}"))?;
        times.push(t);
        fences.extend(fence);
    }
    times.sort();
    eprintln!("old primary after the leader key moved, ms (to its fence, to its stop as superseded): {fences:?}");
    eprintln!(
        "etcd switchover, command start to the first commit on the new primary, {rounds} rounds: median {:?}, max {:?}, min {:?} (ttl 3 s, loop wait 500 ms)",
        times[times.len() / 2],
        times[times.len() - 1],
        times[0]
    );
    Ok(())
}

// Long function: one switchover in the order it happens (refusals, the
// application stops, the runbook, then every promise checked).
fn etcd_switchover_round(
    etcd: &tandem_tests::etcd::EtcdCluster,
    refusals: bool,
) -> Result<(Duration, Option<(f64, f64)>)> {
    let mut t = Trio::start(etcd, ["", ""])?;
    let s = &t.s;
    let env = s.path("env");
    let eps = etcd.endpoints();
    if refusals {
        let (code, out) = switchover(&format!("http://127.0.0.1:{}", free_port()?), &[])?;
        assert_eq!(code, Some(1), "{out}");
        assert!(out.contains("nothing was changed"), "{out}");
        let (code, out) = switchover(&eps, &["--to", "nobody"])?;
        assert_eq!(code, Some(4), "{out}");
        assert!(
            out.contains("nobody is not a member") && out.contains("s1, s2"),
            "{out}"
        );
    }
    // The application runs; a switchover now is refused by the primary.
    let mut app = Proc::spawn(
        "workload",
        bdb::WorkloadOptions {
            txns: 0,
            seconds: Some(300),
            rate: 100,
            lsn_log: Some(s.path("app.lsn")),
            ..Default::default()
        }
        .command(&env),
        &s.path("app.log"),
    )?;
    wait_while_running("some commits", LONG, &mut app, || {
        Ok(bdb::read_lsn_log(&s.path("app.lsn")).map_or(0, |v| v.len()) > 20)
    })?;
    if refusals {
        let (code, out) = switchover(&eps, &["--to", "s2"])?;
        assert_eq!(code, Some(4), "{out}");
        assert!(
            out.contains("s2 could not take over") && out.contains("still open by"),
            "{out}"
        );
        let leader = etcd.get_json("/tandem/c1/leader")?.context("leader")?;
        assert!(leader["name"] == "p1" && leader["epoch"] == 1, "{leader}");
        assert!(etcd.get("/tandem/c1/switchover")?.is_none());
    }
    app.stop(LONG)?;
    wait_caught_up_running(&s.path("s2"), &env, LONG, &mut t.standbys[1])?;
    let committed = bdb::read_lsn_log(&s.path("app.lsn"))?.len() as u64 + 300;
    let sampler = t.sampler()?;

    let started = Instant::now();
    let out = run_runbook_with(
        "etcd-switchover",
        &[
            ("ETCD", eps.clone()),
            ("CLUSTER", "c1".into()),
            ("TARGET", "s1".into()),
            ("STANDBY_DIR", s.path("s1").display().to_string()),
        ],
    )?;
    let new_env = s.path("s1");
    bdb::run_workload(&new_env, &workload(1, 0))?;
    let first_commit = started.elapsed();
    eprintln!("switchover: {out}first commit on the new primary {first_commit:?} after the command started");
    assert!(out.contains("switched over: s1 (epoch 2)"), "{out}");

    // The old primary stops, refused by etcd.
    let status = t.primary.proc.wait_exit(LONG)?;
    assert_eq!(status.code(), Some(7), "{}", t.primary.proc.log_text());
    let fence =
        tandem_tests::etcd::fence_latency_ms(&t.standbys[0].log_text(), &t.primary.proc.log_text());
    let samples = sampler.finish()?;
    assert!(!samples.is_empty(), "the sampler never asked");
    let leader = etcd.get_json("/tandem/c1/leader")?.context("leader")?;
    assert!(
        leader["name"] == "s1"
            && leader["epoch"] == 2
            && leader["address"] == format!("https://{}", t.listens[0]),
        "{leader}"
    );
    let failover = etcd.get_json("/tandem/c1/failover")?.context("failover")?;
    assert!(
        failover["kind"] == "switchover" && failover["name"] == "s1",
        "{failover}"
    );

    // The other standby follows the new primary with nothing re-sent.
    let mut s2 = t.standbys.remove(1);
    t.wait_follows(1, &mut s2, etcd, 2)?;

    // Nothing lost: all the old primary committed (at least every commit
    // the application saw return), then the one on s1.
    s2.stop(LONG)?;
    copy_env(&env, &s.path("old"))?;
    let old = bdb::check(&s.path("old"))?;
    assert!(old >= committed, "{old} < {committed}");
    copy_env(&new_env, &s.path("check"))?;
    assert_eq!(bdb::check(&s.path("check"))?, old + 1);
    Ok((first_commit, fence))
}
