//! Running the real binaries on loopback for tests, the demo and the
//! benchmarks: certificates, a primary on a free port, standbys, status, and
//! waiting on conditions (never on fixed sleeps).

use crate::bdb;
use anyhow::{anyhow, bail, Context, Result};
use std::collections::BTreeMap;
use std::fs::File;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::time::{Duration, Instant};
use tandem_shared::envlayout::EnvLayout;
use tandem_shared::logfile::walk_file;
use tandem_shared::LogPosition;

/// Path of a workspace binary (`tandem-primary`, `tandem-standby`), next to
/// the running executable (tests live in `target/<profile>/deps`).
pub fn bin(name: &str) -> PathBuf {
    let exe = std::env::current_exe().unwrap_or_default();
    let mut dir = exe.parent().map(Path::to_path_buf).unwrap_or_default();
    if dir.ends_with("deps") {
        dir.pop();
    }
    dir.join(name)
}

/// How the binaries the tests start are built: with the primary's test
/// hooks (`run --fault-corrupt-chunk`), which a release build lacks.
pub const BUILD_BINARIES: &str =
    "cargo build --workspace --bins --features tandem-primary/test-hooks";

fn check_bin(path: &Path) -> Result<()> {
    if !path.exists() {
        bail!(
            "{} is missing: build the binaries first ({BUILD_BINARIES})",
            path.display()
        );
    }
    Ok(())
}

/// Polls `cond` every 20 ms until it holds or `timeout` passes.
pub fn wait_for(
    what: &str,
    timeout: Duration,
    mut cond: impl FnMut() -> Result<bool>,
) -> Result<()> {
    let deadline = Instant::now() + timeout;
    loop {
        let last_err = match cond() {
            Ok(true) => return Ok(()),
            Ok(false) => None,
            Err(e) => Some(e),
        };
        if Instant::now() > deadline {
            return Err(anyhow!(
                "timed out after {timeout:?} waiting for {what}{}",
                last_err
                    .map(|e| format!(" (last error: {e:#})"))
                    .unwrap_or_default()
            ));
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// A CA and certificates for 127.0.0.1 / localhost.
#[derive(Debug, Clone)]
pub struct Certs {
    pub dir: PathBuf,
}

impl Certs {
    pub fn generate(dir: &Path) -> Result<Self> {
        tandem_shared::tls::generate(dir, &["localhost".into(), "127.0.0.1".into()])?;
        Ok(Self {
            dir: dir.to_path_buf(),
        })
    }

    pub fn args(&self, role: &str) -> Vec<String> {
        let p = |f: &str| self.dir.join(f).display().to_string();
        vec![
            "--cert".into(),
            p(&format!("{role}.pem")),
            "--key".into(),
            p(&format!("{role}-key.pem")),
            "--ca".into(),
            p("ca.pem"),
        ]
    }
}

/// A child process that is killed when dropped; its output goes to a file.
pub struct Proc {
    pub name: String,
    pub child: Child,
    pub log: PathBuf,
}

impl Proc {
    pub fn spawn(name: &str, mut cmd: Command, log: &Path) -> Result<Self> {
        let out = File::create(log)?;
        let err = out.try_clone()?;
        let child = cmd
            .stdin(Stdio::null())
            .stdout(out)
            .stderr(err)
            .env("NO_COLOR", "1")
            .spawn()
            .with_context(|| format!("starting {name}"))?;
        Ok(Self {
            name: name.into(),
            child,
            log: log.into(),
        })
    }

    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// SIGKILL, as a crash would.
    pub fn kill9(&mut self) -> Result<()> {
        let _ = self.child.kill();
        self.child.wait()?;
        Ok(())
    }

    /// SIGTERM, then wait for a clean exit.
    pub fn stop(&mut self, timeout: Duration) -> Result<ExitStatus> {
        // SAFETY: signalling our own child.
        unsafe { libc::kill(self.child.id() as i32, libc::SIGTERM) };
        self.wait_exit(timeout)
    }

    pub fn wait_exit(&mut self, timeout: Duration) -> Result<ExitStatus> {
        let deadline = Instant::now() + timeout;
        loop {
            if let Some(status) = self.child.try_wait()? {
                return Ok(status);
            }
            if Instant::now() > deadline {
                bail!(
                    "{} did not exit within {timeout:?}; its log:\n{}",
                    self.name,
                    self.log_text()
                );
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    pub fn is_running(&mut self) -> bool {
        matches!(self.child.try_wait(), Ok(None))
    }

    pub fn log_text(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// A running `tandem-primary`.
pub struct Primary {
    pub proc: Proc,
    pub addr: SocketAddr,
    pub env: PathBuf,
}

impl Primary {
    pub fn url(&self) -> String {
        format!("https://{}", self.addr)
    }
}

/// Starts `tandem-primary run` for `env` on `listen` (port 0 = any) and
/// waits until it listens.
pub fn start_primary(
    work: &Path,
    env: &Path,
    certs: &Certs,
    listen: &str,
    extra: &[&str],
) -> Result<Primary> {
    start_primary_with_env(work, env, certs, listen, extra, &[])
}

/// [`start_primary`] with these environment variables set (the test
/// hooks' `TANDEM_TEST_PAUSE_AT`, ...).
pub fn start_primary_with_env(
    work: &Path,
    env: &Path,
    certs: &Certs,
    listen: &str,
    extra: &[&str],
    envs: &[(&str, String)],
) -> Result<Primary> {
    let exe = bin("tandem-primary");
    check_bin(&exe)?;
    let n = std::fs::read_dir(work).map(|d| d.count()).unwrap_or(0);
    let addr_file = work.join(format!("primary-{n}.addr"));
    let mut cmd = Command::new(&exe);
    cmd.arg("run")
        .arg("--env")
        .arg(env)
        .args(["--listen", listen])
        .args(certs.args("primary"))
        .arg("--bound-addr-file")
        .arg(&addr_file)
        .args(extra)
        .envs(envs.iter().map(|(k, v)| (*k, v.as_str())));
    let mut proc = Proc::spawn(
        "tandem-primary",
        cmd,
        &work.join(format!("primary-{n}.log")),
    )?;
    let mut addr = None;
    wait_for("the primary to listen", Duration::from_secs(30), || {
        if !proc.is_running() {
            bail!("tandem-primary exited: {}", proc.log_text());
        }
        addr = std::fs::read_to_string(&addr_file)
            .ok()
            .and_then(|s| s.trim().parse().ok());
        Ok(addr.is_some())
    })?;
    Ok(Primary {
        proc,
        addr: addr.context("bound address")?,
        env: env.into(),
    })
}

/// Starts `tandem-standby run` for `dir` following `url`.
pub fn start_standby(
    work: &Path,
    dir: &Path,
    url: &str,
    certs: &Certs,
    extra: &[&str],
) -> Result<Proc> {
    start_standby_as(work, dir, url, certs, "test-standby", extra)
}

/// Starts `tandem-standby run` for `dir` following `url` under `name` (the
/// name the primary keeps its retention slot under: two standbys of one
/// primary need two names).
pub fn start_standby_as(
    work: &Path,
    dir: &Path,
    url: &str,
    certs: &Certs,
    name: &str,
    extra: &[&str],
) -> Result<Proc> {
    start_standby_env(work, dir, url, certs, name, extra, &[])
}

/// [`start_standby_as`] with these environment variables set (the test
/// hooks' `TANDEM_TEST_PAUSE_AT`, ...).
pub fn start_standby_env(
    work: &Path,
    dir: &Path,
    url: &str,
    certs: &Certs,
    name: &str,
    extra: &[&str],
    envs: &[(&str, String)],
) -> Result<Proc> {
    let exe = bin("tandem-standby");
    check_bin(&exe)?;
    let n = std::fs::read_dir(work).map(|d| d.count()).unwrap_or(0);
    let mut cmd = Command::new(&exe);
    cmd.arg("run")
        .arg("--dir")
        .arg(dir)
        .args(["--primary", url, "--name", name])
        .args(certs.args("standby"))
        .args(extra)
        .envs(envs.iter().map(|(k, v)| (*k, v.as_str())));
    Proc::spawn(
        &format!("tandem-standby {name}"),
        cmd,
        &work.join(format!("standby-{name}-{n}.log")),
    )
}

/// `tandem-standby status --json`.
pub fn standby_status(dir: &Path) -> Result<serde_json::Value> {
    let out = Command::new(bin("tandem-standby"))
        .arg("status")
        .arg("--dir")
        .arg(dir)
        .arg("--json")
        .output()?;
    if !out.status.success() {
        bail!("status failed: {}", String::from_utf8_lossy(&out.stderr));
    }
    Ok(serde_json::from_slice(&out.stdout)?)
}

pub fn lsn_of(v: &serde_json::Value) -> LogPosition {
    LogPosition::new(
        v["file"].as_u64().unwrap_or(0) as u32,
        v["offset"].as_u64().unwrap_or(0) as u32,
    )
}

/// The end of the verified log of an environment, read from its files.
pub fn primary_log_end(env: &Path) -> Result<LogPosition> {
    let layout = EnvLayout::open(env)?;
    let Some(&newest) = layout.log_files()?.last() else {
        return Ok(LogPosition::ZERO);
    };
    let w = walk_file(&File::open(layout.log_path(newest))?, None)?;
    Ok(LogPosition::new(newest, w.end))
}

/// Waits until the standby holds the primary's whole log durably.
pub fn wait_caught_up(standby_dir: &Path, env: &Path, timeout: Duration) -> Result<()> {
    wait_for("the standby to catch up", timeout, || {
        let s = standby_status(standby_dir)?;
        Ok(s["recoverable"] == true && lsn_of(&s["durable_lsn"]) == primary_log_end(env)?)
    })
}

/// Copies the standby's environment (without `.tandem`) to `dest`, runs
/// catastrophic recovery there and returns the checker's M. Fails on any
/// recovery error: a checker OK alone proves nothing.
pub fn recover_copy(standby_dir: &Path, dest: &Path) -> Result<u64> {
    copy_env(standby_dir, dest)?;
    bdb::recover_catastrophic(dest)?;
    bdb::check(dest)
}

/// Copies an environment directory (`cp -a`) without Tandem's own state
/// (`.tandem`, `.tandem-primary`), which is not even read: a running
/// standby renames and removes files there (status, staged rebases).
pub fn copy_env(from: &Path, to: &Path) -> Result<()> {
    std::fs::create_dir_all(to)?;
    let mut cp = Command::new("cp");
    cp.arg("-a");
    let mut entries = 0;
    for entry in std::fs::read_dir(from)? {
        let entry = entry?;
        let name = entry.file_name();
        if name != ".tandem" && name != ".tandem-primary" {
            cp.arg(entry.path());
            entries += 1;
        }
    }
    if entries > 0 && !cp.arg(to).status()?.success() {
        bail!("cp -a {}/* {} failed", from.display(), to.display());
    }
    Ok(())
}

/// blake3 of every file under `dir` (relative path -> digest), to prove a
/// directory did not change.
pub fn dir_digest(dir: &Path) -> Result<BTreeMap<String, String>> {
    digest_tree(dir, |_| false)
}

/// [`dir_digest`] of a standby directory's environment: everything but
/// Tandem's own `.tandem`, which is not even read, since a running standby
/// renames files there (status, scrub reports) while the walk is under way.
pub fn env_digest(dir: &Path) -> Result<BTreeMap<String, String>> {
    digest_tree(dir, |rel| rel == ".tandem")
}

fn digest_tree(dir: &Path, skip: impl Fn(&str) -> bool) -> Result<BTreeMap<String, String>> {
    let mut out = BTreeMap::new();
    let mut stack = vec![dir.to_path_buf()];
    while let Some(d) = stack.pop() {
        for e in std::fs::read_dir(&d)? {
            let e = e?;
            let p = e.path();
            let rel = p.strip_prefix(dir)?.display().to_string();
            if skip(&rel) {
                continue;
            }
            if e.file_type()?.is_dir() {
                stack.push(p);
            } else if std::os::unix::fs::FileTypeExt::is_socket(&e.file_type()?) {
                // The primary's wait socket: no bytes to read, only presence.
                out.insert(rel, "socket".into());
            } else if rel != ".tandem/status.json" && rel != ".tandem/lock" {
                out.insert(rel, blake3::hash(&std::fs::read(&p)?).to_hex().to_string());
            }
        }
    }
    Ok(out)
}

/// A test's scratch area: a temp dir with certificates, kept on failure
/// when TANDEM_KEEP=1.
pub struct Scratch {
    pub dir: tempfile::TempDir,
    pub certs: Certs,
}

impl Scratch {
    pub fn new() -> Result<Self> {
        let dir = tempfile::Builder::new().prefix("tandem-test-").tempdir()?;
        let certs = Certs::generate(&dir.path().join("certs"))?;
        Ok(Self { dir, certs })
    }
    pub fn path(&self, rel: &str) -> PathBuf {
        self.dir.path().join(rel)
    }
    /// The workload `opts` running on SCRATCH/env in the background, its
    /// output in SCRATCH/`log`.
    pub fn spawn_workload(&self, opts: &bdb::WorkloadOptions, log: &str) -> Result<Proc> {
        Proc::spawn("workload", opts.command(&self.path("env")), &self.path(log))
    }

    pub fn root(&self) -> &Path {
        self.dir.path()
    }
}

impl Drop for Scratch {
    fn drop(&mut self) {
        if std::env::var_os("TANDEM_KEEP").is_some() {
            let kept = self.dir.path().to_path_buf();
            eprintln!("keeping {}", kept.display());
            std::mem::forget(std::mem::replace(
                &mut self.dir,
                tempfile::tempdir().expect("tempdir"),
            ));
        }
    }
}

/// A primary with `initial` workload transactions and a standby that holds
/// a complete base of it (readiness checks off).
pub struct Pair {
    pub s: Scratch,
    pub primary: Primary,
    pub standby: Proc,
}

/// The tests' workload: `txns` transactions, a checkpoint every
/// `checkpoint_every` commits, 1 MiB log files (so that a few thousand
/// transactions span several files). Tests that need more change fields:
/// `WorkloadOptions { quiet: true, ..workload(n, 500) }`.
pub fn workload(txns: u64, checkpoint_every: u64) -> bdb::WorkloadOptions {
    bdb::WorkloadOptions {
        txns,
        checkpoint_every,
        lg_max: 1 << 20,
        ..Default::default()
    }
}

pub fn pair(initial: &bdb::WorkloadOptions) -> Result<Pair> {
    let s = Scratch::new()?;
    bdb::run_workload(&s.path("env"), initial)?;
    let primary = start_primary(s.root(), &s.path("env"), &s.certs, "127.0.0.1:0", &[])?;
    let standby = start_standby(
        s.root(),
        &s.path("standby"),
        &primary.url(),
        &s.certs,
        &["--check-interval-secs", "0"],
    )?;
    wait_for("the base copy", Duration::from_secs(120), || {
        Ok(standby_status(&s.path("standby"))?["recoverable"] == true)
    })?;
    Ok(Pair {
        s,
        primary,
        standby,
    })
}

// ------------------------------------------- shared with the benchmark driver

/// A TCP port on 127.0.0.1 that was free a moment ago (bound, then
/// released: pass it to a process that binds it at once). It is picked
/// below the kernel's ephemeral range: a port from `bind(:0)` is
/// ephemeral, and between the pick and the child's bind an outgoing
/// connection (etcdctl's, an etcd member's to its peers, another test's)
/// may take it. Never one this process handed out before.
pub fn free_port() -> Result<u16> {
    static HANDED_OUT: std::sync::Mutex<std::collections::BTreeSet<u16>> =
        std::sync::Mutex::new(std::collections::BTreeSet::new());
    let low = std::fs::read_to_string("/proc/sys/net/ipv4/ip_local_port_range")
        .ok()
        .and_then(|r| r.split_whitespace().next()?.parse::<u16>().ok())
        .unwrap_or(32768)
        .max(10_001);
    let mut handed_out = HANDED_OUT
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner);
    for _ in 0..10_000 {
        let p = rand::random_range(10_000..low);
        if !handed_out.contains(&p) && std::net::TcpListener::bind(("127.0.0.1", p)).is_ok() {
            handed_out.insert(p);
            return Ok(p);
        }
    }
    anyhow::bail!("no free port on 127.0.0.1 between 10000 and {low}")
}

/// `127.0.0.1:PORT` with a [`free_port`].
pub fn free_addr() -> Result<String> {
    Ok(format!("127.0.0.1:{}", free_port()?))
}

/// [`wait_for`], failing at once with `proc`'s log when it exits first.
pub fn wait_while_running(
    what: &str,
    timeout: Duration,
    proc: &mut Proc,
    mut cond: impl FnMut() -> Result<bool>,
) -> Result<()> {
    let mut exited = false;
    wait_for(what, timeout, || {
        if !proc.is_running() {
            exited = true;
            return Ok(true);
        }
        cond()
    })?;
    if exited {
        bail!(
            "{} exited while waiting for {what}: {}",
            proc.name,
            proc.log_text()
        );
    }
    Ok(())
}

/// [`wait_caught_up`], failing at once when the standby exits.
pub fn wait_caught_up_running(
    standby_dir: &Path,
    env: &Path,
    timeout: Duration,
    standby: &mut Proc,
) -> Result<()> {
    wait_while_running("the standby to catch up", timeout, standby, || {
        let s = standby_status(standby_dir)?;
        Ok(s["recoverable"] == true && lsn_of(&s["durable_lsn"]) == primary_log_end(env)?)
    })
}

/// A primary serving SCRATCH/env and a standby of it in SCRATCH/standby
/// started with `standby_args` (logs under the scratch root).
pub fn start_pair(s: &Scratch, standby_args: &[&str]) -> Result<(Primary, Proc)> {
    let primary = start_primary(s.root(), &s.path("env"), &s.certs, "127.0.0.1:0", &[])?;
    let standby = start_standby(
        s.root(),
        &s.path("standby"),
        &primary.url(),
        &s.certs,
        standby_args,
    )?;
    Ok((primary, standby))
}

/// A primary serving `env` and a standby in `standby_dir` that holds its
/// whole log (logs and addresses under `work`).
pub fn start_caught_up(
    work: &Path,
    env: &Path,
    standby_dir: &Path,
    certs: &Certs,
    timeout: Duration,
) -> Result<(Primary, Proc)> {
    let primary = start_primary(work, env, certs, "127.0.0.1:0", &[])?;
    let mut standby = start_standby(work, standby_dir, &primary.url(), certs, &[])?;
    wait_caught_up_running(standby_dir, env, timeout, &mut standby)?;
    Ok((primary, standby))
}

/// `GET path` from a daemon's admin endpoint (`--metrics-listen`): the
/// whole response, head and body.
pub fn http_get(addr: &str, path: &str) -> Result<String> {
    use std::io::{Read, Write};
    let mut s = std::net::TcpStream::connect(addr)?;
    s.set_read_timeout(Some(Duration::from_secs(5)))?;
    s.write_all(
        format!("GET {path} HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n").as_bytes(),
    )?;
    let mut text = String::new();
    s.read_to_string(&mut text)?;
    Ok(text)
}

/// `GET /metrics` from a daemon's admin endpoint (`--metrics-listen`):
/// each sample (name with its labels) and its value.
pub fn scrape_metrics(addr: &str) -> Result<BTreeMap<String, f64>> {
    let text = http_get(addr, "/metrics")?;
    let (head, body) = text
        .split_once("\r\n\r\n")
        .ok_or_else(|| anyhow!("not an HTTP response: {text:?}"))?;
    if !head.starts_with("HTTP/1.1 200") {
        bail!("GET /metrics from {addr}: {head}");
    }
    Ok(body
        .lines()
        .filter(|l| !l.starts_with('#'))
        .filter_map(|l| {
            l.rsplit_once(' ')
                .and_then(|(k, v)| v.parse().ok().map(|v| (k.to_owned(), v)))
        })
        .collect())
}

/// The sample `name` (with its labels, if any) of a [`scrape_metrics`].
pub fn metric(m: &BTreeMap<String, f64>, name: &str) -> Result<f64> {
    m.get(name)
        .copied()
        .with_context(|| format!("no metric {name} in {m:?}"))
}

/// `tandem-primary status --json`, asked with the standby's certificate.
pub fn primary_status(p: &Primary, certs: &Certs) -> Result<serde_json::Value> {
    let out = Command::new(bin("tandem-primary"))
        .args(["status", "--json", "--primary", &p.url()])
        .args(certs.args("standby"))
        .output()?;
    if !out.status.success() {
        bail!(
            "primary status failed: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
    Ok(serde_json::from_slice(&out.stdout)?)
}

/// `tandem-standby promote --json --catch-up-timeout-secs 120` with
/// `extra` flags, whatever its outcome: the exit status, the JSON report
/// (null if there is none) and stderr.
pub fn promote(dir: &Path, extra: &[&str]) -> Result<(ExitStatus, serde_json::Value, String)> {
    let out = Command::new(bin("tandem-standby"))
        .args(["promote", "--json", "--catch-up-timeout-secs", "120"])
        .args(extra)
        .arg("--dir")
        .arg(dir)
        .output()?;
    let stderr = String::from_utf8_lossy(&out.stderr).into_owned();
    let json = serde_json::from_slice(&out.stdout).unwrap_or(serde_json::Value::Null);
    Ok((out.status, json, stderr))
}

/// [`promote`] that fails unless it promoted; returns its report.
pub fn promote_json(dir: &Path) -> Result<serde_json::Value> {
    let (status, report, stderr) = promote(dir, &[])?;
    if !status.success() || report.is_null() {
        bail!("promote failed: {stderr}");
    }
    Ok(report)
}

/// A primary on `s`'s `env` (already written by the caller) and a standby
/// in `standby` (run with `args`) that catches up with it, then both
/// stopped; returns the primary's address, to restart it on.
pub fn follow_then_stop(s: &Scratch, listen: &str, args: &[&str]) -> Result<String> {
    let mut primary = start_primary(s.root(), &s.path("env"), &s.certs, listen, &[])?;
    let mut standby = start_standby(s.root(), &s.path("standby"), &primary.url(), &s.certs, args)?;
    wait_caught_up_running(
        &s.path("standby"),
        &s.path("env"),
        Duration::from_secs(120),
        &mut standby,
    )?;
    standby.stop(Duration::from_secs(120))?;
    primary.proc.stop(Duration::from_secs(120))?;
    Ok(primary.addr.to_string())
}
