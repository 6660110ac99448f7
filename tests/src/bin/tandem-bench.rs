//! `tandem-bench`: measures Tandem against the physical limits of this
//! machine and against what users would use instead (`cp`, `rsync` over
//! ssh, `db_hotbackup`), all in one run, and prints a Markdown report with
//! medians over several runs and ratios against baselines measured in the
//! same run.
//!
//! Started by `bench/run`, which installs what is needed and builds the
//! release binaries first; never part of `cargo test` (nothing here is a
//! timed test). What each figure means and its caveats: `bench/README.md`.
//!
//! Sections (each can be selected with `BENCH_ONLY=copy,lag,cost,promote,resume`):
//! 1. `copy`: base copy of an environment of `BENCH_SIZE_MB` over loopback
//!    mTLS, against cp, rsync over ssh, db_hotbackup, raw loopback TCP, disk
//!    and blake3 limits; page cache dropped ("cold") and/or warm.
//! 2. `lag`: commit-to-durable-on-standby delay per commit, at a fixed rate
//!    and unthrottled.
//! 3. `cost`: the workload's commit rate with and without Tandem attached,
//!    and the primary's CPU time and peak RSS while streaming.
//! 4. `promote`: `tandem-standby promote` (failover) after N MB of log.
//! 5. `resume`: bytes sent after a standby `kill -9` and restart, against a
//!    full copy.

use anyhow::{anyhow, bail, Context, Result};
use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::fs::File;
use std::io::{Read, Write};
use std::net::{TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Command, ExitCode, ExitStatus, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};
use tandem_shared::envlayout::EnvLayout;
use tandem_shared::logfile::walk_file;
use tandem_shared::tls::TlsFiles;
use tandem_shared::wire::StatusRequest;
use tandem_shared::LogPosition;
use tandem_tests::bdb::{self, WorkloadOptions};
use tandem_tests::harness::{
    self, lsn_of, primary_log_end, standby_status, start_primary, start_standby, wait_for, Certs,
    Primary, Proc,
};

const MIB: f64 = 1024.0 * 1024.0;
/// The name `harness::start_standby` gives every standby.
const STANDBY_NAME: &str = "test-standby";
/// Log file size of the streaming environments (BDB.md §5 used 10 MB).
const LG_MAX: u64 = 10 << 20;
/// Log file size of the base-copy environment: small, so that the little log
/// written in section 5 still moves the checkpoint into a later file, which
/// a rebase needs.
const BIG_LG_MAX: u64 = 1 << 20;

// ---------------------------------------------------------------- settings

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Cache {
    Cold,
    Warm,
}

impl Cache {
    fn name(self) -> &'static str {
        match self {
            Cache::Cold => "cold",
            Cache::Warm => "warm",
        }
    }
}

#[derive(Debug, Clone)]
struct Config {
    quick: bool,
    size_mb: u64,
    runs: usize,
    caches: Vec<Cache>,
    lag_secs: u64,
    lag_rate: u64,
    cost_secs: u64,
    promote_mb: Vec<u64>,
    resume_mb: u64,
    sections: Vec<String>,
    work_parent: PathBuf,
    out: Option<PathBuf>,
    keep: bool,
}

const SECTIONS: [&str; 5] = ["copy", "lag", "cost", "promote", "resume"];

fn env_str(name: &str) -> Option<String> {
    std::env::var(name).ok().filter(|v| !v.trim().is_empty())
}

fn env_u64(name: &str, default: u64) -> Result<u64> {
    match env_str(name) {
        None => Ok(default),
        Some(v) => v
            .trim()
            .parse()
            .with_context(|| format!("{name}={v:?} is not a whole number")),
    }
}

fn env_list(name: &str, default: &[u64]) -> Result<Vec<u64>> {
    match env_str(name) {
        None => Ok(default.to_vec()),
        Some(v) => v
            .split(',')
            .map(|s| {
                s.trim()
                    .parse()
                    .with_context(|| format!("{name}={v:?}: bad number {s:?}"))
            })
            .collect(),
    }
}

impl Config {
    fn from_env() -> Result<Self> {
        let quick = env_str("BENCH_QUICK").is_some_and(|v| v != "0");
        let caches =
            match env_str("BENCH_CACHE")
                .as_deref()
                .unwrap_or(if quick { "warm" } else { "both" })
            {
                "cold" => vec![Cache::Cold],
                "warm" => vec![Cache::Warm],
                "both" => vec![Cache::Cold, Cache::Warm],
                other => bail!("BENCH_CACHE={other:?}: expected cold, warm or both"),
            };
        let sections = match env_str("BENCH_ONLY") {
            None => SECTIONS.iter().map(|s| s.to_string()).collect(),
            Some(v) => {
                let list: Vec<String> = v
                    .split(',')
                    .map(|s| s.trim().to_owned())
                    .filter(|s| !s.is_empty())
                    .collect();
                if let Some(bad) = list.iter().find(|s| !SECTIONS.contains(&s.as_str())) {
                    bail!(
                        "BENCH_ONLY: unknown section {bad:?} (sections: {})",
                        SECTIONS.join(",")
                    );
                }
                list
            }
        };
        let cfg = Config {
            quick,
            size_mb: env_u64("BENCH_SIZE_MB", if quick { 128 } else { 1024 })?,
            runs: env_u64("BENCH_RUNS", if quick { 1 } else { 3 })?.max(1) as usize,
            caches,
            lag_secs: env_u64("BENCH_LAG_SECS", if quick { 4 } else { 10 })?.max(1),
            lag_rate: env_u64("BENCH_LAG_RATE", 1000)?.max(1),
            cost_secs: env_u64("BENCH_COST_SECS", if quick { 4 } else { 10 })?.max(1),
            promote_mb: env_list(
                "BENCH_PROMOTE_MB",
                if quick { &[25, 100] } else { &[100, 500] },
            )?,
            resume_mb: env_u64("BENCH_RESUME_MB", if quick { 2 } else { 8 })?.max(1),
            sections,
            work_parent: env_str("BENCH_DIR")
                .map(PathBuf::from)
                .unwrap_or_else(std::env::temp_dir),
            out: env_str("BENCH_OUT").map(PathBuf::from),
            keep: env_str("BENCH_KEEP").is_some_and(|v| v != "0"),
        };
        if cfg.size_mb < 16 {
            bail!("BENCH_SIZE_MB must be at least 16");
        }
        Ok(cfg)
    }

    fn wants(&self, section: &str) -> bool {
        self.sections.iter().any(|s| s == section)
    }
}

// ---------------------------------------------------------------- statistics

fn median(v: &[f64]) -> f64 {
    if v.is_empty() {
        return f64::NAN;
    }
    let mut s = v.to_vec();
    s.sort_by(f64::total_cmp);
    let n = s.len();
    if n % 2 == 1 {
        s[n / 2]
    } else {
        (s[n / 2 - 1] + s[n / 2]) / 2.0
    }
}

/// Nearest-rank percentile of an ascending slice.
fn percentile(sorted: &[f64], p: f64) -> f64 {
    if sorted.is_empty() {
        return f64::NAN;
    }
    let rank = ((p / 100.0) * sorted.len() as f64).ceil() as usize;
    sorted[rank.clamp(1, sorted.len()) - 1]
}

/// "median (min–max)" of several runs, or the one value.
fn spread(v: &[f64], digits: usize) -> String {
    if v.is_empty() {
        return "-".into();
    }
    let m = median(v);
    if v.len() == 1 {
        return format!("{m:.digits$}");
    }
    let lo = v.iter().copied().fold(f64::INFINITY, f64::min);
    let hi = v.iter().copied().fold(f64::NEG_INFINITY, f64::max);
    format!("{m:.digits$} ({lo:.digits$}–{hi:.digits$})")
}

/// One commit: when its line appeared in the workload's `-L` file, and the
/// end of log after it.
#[derive(Debug, Clone, Copy)]
struct CommitSeen {
    at: Instant,
    lsn: LogPosition,
}

/// One answer of the primary's Status RPC: the standby's acknowledged
/// (durable) position, as the primary knew it when the answer arrived.
#[derive(Debug, Clone, Copy)]
struct AckSample {
    at: Instant,
    end: LogPosition,
    acked: LogPosition,
}

/// For each commit, the time from its appearance until the first sample at
/// or after it whose position (`pos`: acknowledged, or the primary's end of
/// log) covers it. Both series are in time order and positions only grow,
/// so one forward sweep suffices. Returns the delays in milliseconds and how
/// many commits were never covered.
fn commit_delays(
    commits: &[CommitSeen],
    samples: &[AckSample],
    pos: impl Fn(&AckSample) -> LogPosition,
) -> (Vec<f64>, usize) {
    let mut out = Vec::with_capacity(commits.len());
    let mut unmatched = 0;
    let mut k = 0;
    for c in commits {
        while k < samples.len() && (samples[k].at < c.at || pos(&samples[k]) < c.lsn) {
            k += 1;
        }
        match samples.get(k) {
            Some(s) => out.push(s.at.duration_since(c.at).as_secs_f64() * 1000.0),
            None => unmatched += 1,
        }
    }
    (out, unmatched)
}

// ---------------------------------------------------------------- processes and files

/// Runs `cmd` to completion within `timeout`, output into `log`; fails on a
/// non-zero exit with the output.
fn run_cmd(what: &str, mut cmd: Command, timeout: Duration, log: &Path) -> Result<Duration> {
    let out = File::create(log)?;
    let err = out.try_clone()?;
    let started = Instant::now();
    let mut child = cmd
        .stdin(Stdio::null())
        .stdout(out)
        .stderr(err)
        .spawn()
        .with_context(|| format!("starting {what}"))?;
    let status = wait_child(&mut child, timeout).with_context(|| {
        format!(
            "{what}: {}",
            std::fs::read_to_string(log).unwrap_or_default()
        )
    })?;
    let took = started.elapsed();
    if !status.success() {
        bail!(
            "{what} failed ({status}): {}",
            std::fs::read_to_string(log).unwrap_or_default()
        );
    }
    Ok(took)
}

fn wait_child(child: &mut std::process::Child, timeout: Duration) -> Result<ExitStatus> {
    let deadline = Instant::now() + timeout;
    loop {
        if let Some(s) = child.try_wait()? {
            return Ok(s);
        }
        if Instant::now() > deadline {
            let _ = child.kill();
            let _ = child.wait();
            bail!("did not finish within {timeout:?}; killed");
        }
        std::thread::sleep(Duration::from_millis(5));
    }
}

/// Runs `cmd` within `timeout` and returns its stdout; stderr goes to `log`.
fn cmd_stdout(what: &str, mut cmd: Command, timeout: Duration, log: &Path) -> Result<String> {
    let out_path = log.with_extension("stdout");
    let out = File::create(&out_path)?;
    let err = File::create(log)?;
    let mut child = cmd
        .stdin(Stdio::null())
        .stdout(out)
        .stderr(err)
        .spawn()
        .with_context(|| format!("starting {what}"))?;
    let status = wait_child(&mut child, timeout).with_context(|| what.to_owned())?;
    let stdout = std::fs::read_to_string(&out_path).unwrap_or_default();
    if !status.success() {
        bail!(
            "{what} failed ({status}): {stdout}{}",
            std::fs::read_to_string(log).unwrap_or_default()
        );
    }
    Ok(stdout)
}

fn first_line(mut cmd: Command) -> String {
    cmd.output()
        .ok()
        .map(|o| {
            let text = if o.stdout.is_empty() {
                o.stderr
            } else {
                o.stdout
            };
            String::from_utf8_lossy(&text)
                .lines()
                .next()
                .unwrap_or("")
                .trim()
                .to_owned()
        })
        .unwrap_or_else(|| "?".into())
}

/// utime + stime of a process, in seconds.
fn proc_cpu_secs(pid: u32) -> Result<f64> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat"))?;
    let after = stat
        .rsplit_once(')')
        .map(|(_, r)| r)
        .context("malformed /proc/PID/stat")?;
    let f: Vec<&str> = after.split_whitespace().collect();
    // Fields 14 and 15 of stat(5); `after` starts at field 3.
    let ticks: f64 = f
        .get(11)
        .and_then(|v| v.parse::<f64>().ok())
        .context("utime")?
        + f.get(12)
            .and_then(|v| v.parse::<f64>().ok())
            .context("stime")?;
    // SAFETY: sysconf has no preconditions.
    let hz = unsafe { libc::sysconf(libc::_SC_CLK_TCK) } as f64;
    Ok(ticks / if hz > 0.0 { hz } else { 100.0 })
}

/// Peak resident set (VmHWM) of a process, in MiB.
fn proc_hwm_mib(pid: u32) -> Result<f64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status"))?;
    let kb: f64 = status
        .lines()
        .find_map(|l| l.strip_prefix("VmHWM:"))
        .and_then(|v| v.split_whitespace().next())
        .and_then(|v| v.parse().ok())
        .context("VmHWM")?;
    Ok(kb / 1024.0)
}

/// Like `harness::wait_for`, but gives up at once when `proc` exits.
fn wait_alive(
    what: &str,
    timeout: Duration,
    proc: &mut Proc,
    mut cond: impl FnMut() -> Result<bool>,
) -> Result<()> {
    let mut died = false;
    wait_for(what, timeout, || {
        if !proc.is_running() {
            died = true;
            return Ok(true);
        }
        cond()
    })?;
    if died {
        bail!(
            "{} exited while waiting for {what}: {}",
            proc.name,
            proc.log_text()
        );
    }
    Ok(())
}

/// `harness::wait_caught_up`, failing at once if the standby exits.
fn caught_up(standby_dir: &Path, env: &Path, timeout: Duration, standby: &mut Proc) -> Result<()> {
    wait_alive("the standby to catch up", timeout, standby, || {
        let s = standby_status(standby_dir)?;
        Ok(s["recoverable"] == true && lsn_of(&s["durable_lsn"]) == primary_log_end(env)?)
    })
}

fn free_port() -> Result<u16> {
    Ok(TcpListener::bind("127.0.0.1:0")?.local_addr()?.port())
}

/// `GET /metrics` from a daemon's metrics endpoint on loopback.
fn scrape(port: u16) -> Result<BTreeMap<String, f64>> {
    let mut s = TcpStream::connect(("127.0.0.1", port))?;
    s.set_read_timeout(Some(Duration::from_secs(5)))?;
    s.write_all(b"GET /metrics HTTP/1.0\r\n\r\n")?;
    let mut text = String::new();
    s.read_to_string(&mut text)?;
    let body = text.split_once("\r\n\r\n").map(|(_, b)| b).unwrap_or("");
    Ok(body
        .lines()
        .filter(|l| !l.starts_with('#'))
        .filter_map(|l| {
            l.rsplit_once(' ')
                .and_then(|(k, v)| v.parse().ok().map(|v| (k.to_owned(), v)))
        })
        .collect())
}

fn sync_all() {
    // SAFETY: sync(2) has no preconditions.
    unsafe { libc::sync() };
}

/// Writes back dirty pages and drops the page cache; false without the
/// privilege.
fn drop_caches() -> bool {
    sync_all();
    std::fs::write("/proc/sys/vm/drop_caches", "3\n").is_ok()
}

/// lg_max from the newest log file's header.
fn env_lg_max(env: &Path) -> Result<u32> {
    let layout = EnvLayout::open(env)?;
    let newest = *layout.log_files()?.last().context("no log file")?;
    let w = walk_file(&File::open(layout.log_path(newest))?, None)?;
    Ok(w.header
        .map(|h| h.lg_max)
        .filter(|&m| m > 0)
        .unwrap_or(LG_MAX as u32))
}

fn log_mib_between(a: LogPosition, b: LogPosition, lg_max: u32) -> f64 {
    a.bytes_until(b, lg_max) as f64 / MIB
}

fn remove_dir(p: &Path) {
    let _ = std::fs::remove_dir_all(p);
}

fn copy_tree(from: &Path, to: &Path) -> Result<()> {
    let status = Command::new("cp").arg("-a").arg(from).arg(to).status()?;
    if !status.success() {
        bail!("cp -a {} {} failed", from.display(), to.display());
    }
    Ok(())
}

fn status_u64(s: &serde_json::Value, key: &str) -> u64 {
    s[key].as_u64().unwrap_or(0)
}

fn progress(msg: impl AsRef<str>) {
    eprintln!("[bench {}] {}", chrono_like_now(), msg.as_ref());
}

fn chrono_like_now() -> String {
    let secs = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0);
    format!(
        "{:02}:{:02}:{:02}",
        (secs / 3600) % 24,
        (secs / 60) % 60,
        secs % 60
    )
}

// ---------------------------------------------------------------- the bench

struct Bench {
    cfg: Config,
    root: tempfile::TempDir,
    certs: Certs,
    can_drop_caches: bool,
}

/// The large environment of section 1, kept for section 5.
struct BigEnv {
    env: PathBuf,
    files: Vec<(String, u64)>,
    bytes: u64,
    primary: Option<Primary>,
    /// A complete standby directory left by the last Tandem copy, and the
    /// bytes that copy received (files + log).
    standby: Option<(PathBuf, u64)>,
    /// Median time of Tandem's warm (or only) base copy, for comparison.
    copy_secs: Option<f64>,
}

/// The small environment the streaming sections start from.
struct Seed {
    env: PathBuf,
    last: u64,
}

/// A section's Markdown and its rows for the targets table.
#[derive(Default)]
struct Section {
    md: String,
    targets: Vec<Target>,
}

struct Target {
    what: String,
    goal: String,
    measured: String,
    met: Option<bool>,
}

impl Bench {
    fn path(&self, rel: &str) -> PathBuf {
        self.root.path().join(rel)
    }

    fn tls(&self) -> TlsFiles {
        let d = &self.certs.dir;
        TlsFiles {
            cert: d.join("standby.pem"),
            key: d.join("standby-key.pem"),
            ca: d.join("ca.pem"),
        }
    }

    /// Streaming workload options: small values, several updates per
    /// transaction (BDB.md §5: about 1.6 KB of log per transaction).
    fn stream_workload(&self) -> WorkloadOptions {
        WorkloadOptions {
            txns: 0,
            checkpoint_every: 1000,
            lg_max: LG_MAX,
            updates: 3,
            value_len: 100,
            quiet: true,
            ..Default::default()
        }
    }

    fn make_seed(&self) -> Result<Seed> {
        let env = self.path("seed-env");
        let last = bdb::run_workload(
            &env,
            &WorkloadOptions {
                txns: 2000,
                ..self.stream_workload()
            },
        )?;
        sync_all();
        Ok(Seed { env, last })
    }

    /// Builds an environment of about `size_mb` MiB of database pages: each
    /// transaction adds three 4,000-byte values (one overflow page each),
    /// then a checkpoint and `db_archive -d` leave only the log still needed.
    fn make_big_env(&self) -> Result<BigEnv> {
        let env = self.path("big-env");
        let txns = (self.cfg.size_mb << 20) / (3 * 4096);
        let started = Instant::now();
        bdb::run_workload(
            &env,
            &WorkloadOptions {
                txns,
                value_len: 4000,
                updates: 0,
                lg_max: BIG_LG_MAX,
                cache_mb: Some(256),
                checkpoint_every: 20_000,
                quiet: true,
                ..Default::default()
            },
        )?;
        run_cmd(
            "db5.3_checkpoint",
            tool("db5.3_checkpoint", &["-1", "-h"], &env),
            Duration::from_secs(600),
            &self.path("checkpoint.log"),
        )?;
        run_cmd(
            "db5.3_archive -d",
            tool("db5.3_archive", &["-d", "-h"], &env),
            Duration::from_secs(600),
            &self.path("archive.log"),
        )?;
        sync_all();
        let layout = EnvLayout::open(&env)?;
        let mut files: Vec<(String, u64)> = Vec::new();
        for db in layout.database_files()? {
            files.push((
                db.name.clone(),
                std::fs::metadata(env.join(&db.name))?.len(),
            ));
        }
        for n in layout.log_files()? {
            files.push((
                layout.log_name(n),
                std::fs::metadata(layout.log_path(n))?.len(),
            ));
        }
        let bytes = files.iter().map(|f| f.1).sum();
        progress(format!(
            "built a {:.0} MiB environment ({} files, {txns} transactions) in {:.1} s",
            bytes as f64 / MIB,
            files.len(),
            started.elapsed().as_secs_f64()
        ));
        Ok(BigEnv {
            env,
            files,
            bytes,
            primary: None,
            standby: None,
            copy_secs: None,
        })
    }
}

fn tool(name: &str, args: &[&str], env: &Path) -> Command {
    let mut c = Command::new(name);
    c.args(args).arg(env);
    c
}

// ---------------------------------------------------------------- 1. base copy

#[derive(Default)]
struct CopyFigures {
    secs: Vec<f64>,
    /// Tandem only: CPU seconds of the primary and of the standby.
    primary_cpu: Vec<f64>,
    standby_cpu: Vec<f64>,
    bytes: Vec<f64>,
}

const COPY_METHODS: [&str; 8] = [
    "tandem",
    "cp",
    "rsync-ssh",
    "hotbackup",
    "tcp-loopback",
    "disk-write",
    "disk-read",
    "blake3",
];

fn method_label(m: &str) -> &'static str {
    match m {
        "tandem" => "**Tandem** (gRPC + mTLS + blake3, standby fsyncs)",
        "cp" => "`cp` of the same files + `sync`",
        "rsync-ssh" => "`rsync -a` over ssh (loopback) + `sync`",
        "hotbackup" => "`db5.3_hotbackup -h ENV -b DIR` + `sync`",
        "tcp-loopback" => "limit: raw TCP on loopback (memory to memory)",
        "disk-write" => "limit: `dd` sequential write + fsync",
        "disk-read" => "limit: read the files (`cat` > /dev/null)",
        "blake3" => "limit: blake3 on one core (in memory)",
        _ => "?",
    }
}

struct Sshd {
    _proc: Proc,
    port: u16,
    key: PathBuf,
    user: String,
}

impl Sshd {
    /// A private sshd on 127.0.0.1 with its own host key and one authorized
    /// key, all in `dir`; killed when dropped.
    fn start(dir: &Path) -> Result<Self> {
        std::fs::create_dir_all(dir)?;
        let _ = std::fs::create_dir_all("/run/sshd");
        for k in ["host_key", "client_key"] {
            let p = dir.join(k);
            let _ = std::fs::remove_file(&p);
            run_cmd(
                "ssh-keygen",
                keygen(&p),
                Duration::from_secs(30),
                &dir.join(format!("{k}.log")),
            )?;
        }
        std::fs::copy(dir.join("client_key.pub"), dir.join("authorized_keys"))?;
        let port = free_port()?;
        let config = format!(
            "Port {port}\nListenAddress 127.0.0.1\nHostKey {hk}\nAuthorizedKeysFile {ak}\nPidFile {pid}\n\
             PasswordAuthentication no\nKbdInteractiveAuthentication no\nUsePAM no\nStrictModes no\n\
             PermitRootLogin prohibit-password\nPrintMotd no\n",
            hk = dir.join("host_key").display(),
            ak = dir.join("authorized_keys").display(),
            pid = dir.join("sshd.pid").display()
        );
        std::fs::write(dir.join("sshd_config"), config)?;
        let mut cmd = Command::new("/usr/sbin/sshd");
        cmd.args(["-D", "-e", "-f"]).arg(dir.join("sshd_config"));
        let mut proc = Proc::spawn("sshd", cmd, &dir.join("sshd.log"))?;
        wait_alive("sshd to listen", Duration::from_secs(20), &mut proc, || {
            Ok(TcpStream::connect(("127.0.0.1", port)).is_ok())
        })?;
        let user = first_line({
            let mut c = Command::new("id");
            c.arg("-un");
            c
        });
        let sshd = Sshd {
            _proc: proc,
            port,
            key: dir.join("client_key"),
            user,
        };
        let mut probe = Command::new("ssh");
        probe
            .args(sshd.ssh_args())
            .arg(format!("{}@127.0.0.1", sshd.user))
            .arg("true");
        run_cmd(
            "ssh to the private sshd",
            probe,
            Duration::from_secs(30),
            &dir.join("probe.log"),
        )?;
        Ok(sshd)
    }

    fn ssh_args(&self) -> Vec<String> {
        vec![
            "-i".into(),
            self.key.display().to_string(),
            "-p".into(),
            self.port.to_string(),
            "-o".into(),
            "BatchMode=yes".into(),
            "-o".into(),
            "StrictHostKeyChecking=no".into(),
            "-o".into(),
            "UserKnownHostsFile=/dev/null".into(),
            "-o".into(),
            "LogLevel=ERROR".into(),
        ]
    }
}

fn keygen(path: &Path) -> Command {
    let mut c = Command::new("ssh-keygen");
    c.args(["-q", "-t", "ed25519", "-N", ""])
        .arg("-f")
        .arg(path);
    c
}

/// Sends `bytes` over one loopback TCP connection, 1 MiB writes, from one
/// thread to another that reads and discards.
fn tcp_loopback(bytes: u64) -> Result<Duration> {
    let listener = TcpListener::bind("127.0.0.1:0")?;
    let addr = listener.local_addr()?;
    let receiver = std::thread::spawn(move || -> Result<u64> {
        let (mut s, _) = listener.accept()?;
        s.set_read_timeout(Some(Duration::from_secs(60)))?;
        let mut buf = vec![0u8; 1 << 20];
        let mut got = 0u64;
        loop {
            let n = s.read(&mut buf)?;
            if n == 0 {
                return Ok(got);
            }
            got += n as u64;
        }
    });
    let started = Instant::now();
    let mut s = TcpStream::connect(addr)?;
    s.set_nodelay(true)?;
    let buf = vec![0x5au8; 1 << 20];
    let mut left = bytes;
    while left > 0 {
        let n = left.min(buf.len() as u64) as usize;
        s.write_all(&buf[..n])?;
        left -= n as u64;
    }
    drop(s);
    let got = receiver
        .join()
        .map_err(|_| anyhow!("receiver panicked"))??;
    let took = started.elapsed();
    if got != bytes {
        bail!("loopback receiver got {got} of {bytes} bytes");
    }
    Ok(took)
}

fn blake3_one_core(bytes: u64) -> Duration {
    let buf: Vec<u8> = (0..(1u32 << 20))
        .map(|i| (i.wrapping_mul(2_654_435_761) >> 13) as u8)
        .collect();
    let started = Instant::now();
    let mut left = bytes;
    let mut acc = 0u8;
    while left > 0 {
        let n = left.min(buf.len() as u64) as usize;
        acc ^= blake3::hash(&buf[..n]).as_bytes()[0];
        left -= n as u64;
    }
    std::hint::black_box(acc);
    started.elapsed()
}

fn read_files(env: &Path, files: &[(String, u64)]) -> Result<()> {
    let mut buf = vec![0u8; 1 << 20];
    for (name, _) in files {
        let mut f = File::open(env.join(name))?;
        while f.read(&mut buf)? > 0 {}
    }
    Ok(())
}

fn copy_timeout(bytes: u64) -> Duration {
    // Generous: 2 MB/s at worst, at least two minutes.
    Duration::from_secs((bytes / 2_000_000).max(120))
}

impl Bench {
    fn tandem_copy(&self, big: &BigEnv, dest: &Path, fig: &mut CopyFigures) -> Result<()> {
        let primary = big.primary.as_ref().context("no primary")?;
        let port = free_port()?;
        let p0 = proc_cpu_secs(primary.proc.pid())?;
        let started = Instant::now();
        let mut sb = start_standby(
            self.root.path(),
            dest,
            &primary.url(),
            &self.certs,
            &["--metrics-listen", &format!("127.0.0.1:{port}")],
        )?;
        let mut standby_cpu = 0.0;
        let pid = sb.pid();
        wait_alive(
            "the base copy to complete",
            copy_timeout(big.bytes),
            &mut sb,
            || {
                let m = scrape(port)?;
                let done = m.get("tandem_standby_recoverable") == Some(&1.0)
                    && m.get("tandem_standby_connected") == Some(&1.0)
                    && m.get("tandem_standby_lag_bytes") == Some(&0.0);
                if done {
                    standby_cpu = proc_cpu_secs(pid)?;
                }
                Ok(done)
            },
        )?;
        let took = started.elapsed();
        let p1 = proc_cpu_secs(primary.proc.pid())?;
        sb.stop(Duration::from_secs(60))?;
        // The copy counts only if the directory is recoverable and holds the
        // primary's whole log (the primary is idle during this section).
        let st = standby_status(dest)?;
        let end = primary_log_end(&big.env)?;
        if st["recoverable"] != true || lsn_of(&st["durable_lsn"]) != end {
            bail!("the standby reported done but its directory is not caught up: durable {} vs primary {end}: {st}", lsn_of(&st["durable_lsn"]));
        }
        fig.secs.push(took.as_secs_f64());
        fig.primary_cpu.push(p1 - p0);
        fig.standby_cpu.push(standby_cpu);
        fig.bytes.push(
            (status_u64(&st, "file_bytes_received") + status_u64(&st, "log_bytes_received")) as f64,
        );
        Ok(())
    }

    /// Runs one copy method into a fresh `dest`; returns seconds.
    fn copy_once(
        &self,
        method: &str,
        big: &BigEnv,
        sshd: Option<&Sshd>,
        dest: &Path,
        fig: &mut CopyFigures,
    ) -> Result<()> {
        remove_dir(dest);
        let log = self.path(&format!("{method}.log"));
        let names: Vec<&str> = big.files.iter().map(|f| f.0.as_str()).collect();
        let timeout = copy_timeout(big.bytes);
        let secs = match method {
            "tandem" => return self.tandem_copy(big, dest, fig),
            "cp" => {
                std::fs::create_dir_all(dest)?;
                let started = Instant::now();
                let mut c = Command::new("cp");
                c.current_dir(&big.env).arg("-r").args(&names).arg(dest);
                run_cmd("cp", c, timeout, &log)?;
                sync_all();
                started.elapsed()
            }
            "rsync-ssh" => {
                let sshd = sshd.context("no sshd")?;
                std::fs::create_dir_all(dest)?;
                let started = Instant::now();
                let mut c = Command::new("rsync");
                c.current_dir(&big.env)
                    .arg("-a")
                    .arg("-e")
                    .arg(format!("ssh {}", sshd.ssh_args().join(" ")))
                    .args(&names)
                    .arg(format!("{}@127.0.0.1:{}/", sshd.user, dest.display()));
                run_cmd("rsync over ssh", c, timeout, &log)?;
                sync_all();
                started.elapsed()
            }
            "hotbackup" => {
                let started = Instant::now();
                // Never -u or -c: they remove the source's logs (BDB.md §6).
                let mut c = Command::new("db5.3_hotbackup");
                c.arg("-h").arg(&big.env).arg("-b").arg(dest);
                run_cmd("db5.3_hotbackup", c, timeout, &log)?;
                sync_all();
                started.elapsed()
            }
            "tcp-loopback" => tcp_loopback(big.bytes)?,
            "disk-write" => {
                std::fs::create_dir_all(dest)?;
                let mut c = Command::new("dd");
                c.arg("if=/dev/zero")
                    .arg(format!("of={}", dest.join("dd.out").display()))
                    .arg("bs=1M")
                    .arg(format!("count={}", big.bytes.div_ceil(1 << 20)))
                    .arg("conv=fsync")
                    .arg("status=none");
                run_cmd("dd", c, timeout, &log)?
            }
            "disk-read" => {
                let started = Instant::now();
                read_files(&big.env, &big.files)?;
                started.elapsed()
            }
            "blake3" => blake3_one_core(big.bytes),
            other => bail!("unknown method {other}"),
        };
        remove_dir(dest);
        fig.secs.push(secs.as_secs_f64());
        Ok(())
    }

    fn section_copy(&self, big: &mut BigEnv) -> Result<Section> {
        let cfg = &self.cfg;
        let sshd = Sshd::start(&self.path("sshd"))?;
        big.primary = Some(start_primary(
            self.root.path(),
            &big.env,
            &self.certs,
            "127.0.0.1:0",
            &[],
        )?);
        let mut figs: BTreeMap<(usize, &str), CopyFigures> = BTreeMap::new();
        let caches: Vec<Cache> = cfg
            .caches
            .iter()
            .copied()
            .filter(|c| *c == Cache::Warm || self.can_drop_caches)
            .collect();
        for run in 0..cfg.runs {
            for (ci, &cache) in caches.iter().enumerate() {
                if cache == Cache::Warm {
                    read_files(&big.env, &big.files)?;
                }
                for method in COPY_METHODS {
                    if cache == Cache::Cold && matches!(method, "tcp-loopback" | "blake3") {
                        continue; // no disk involved: one figure is enough
                    }
                    if cache == Cache::Warm && method == "disk-write" && caches.len() > 1 {
                        continue; // the page cache does not change a write + fsync
                    }
                    if cache == Cache::Cold {
                        drop_caches();
                    } else {
                        sync_all();
                    }
                    let dest = self.path(&format!("copy-{method}"));
                    let fig = figs.entry((ci, method)).or_default();
                    self.copy_once(method, big, Some(&sshd), &dest, fig)
                        .with_context(|| format!("{method} ({})", cache.name()))?;
                    progress(format!(
                        "copy run {}/{} {} {method}: {:.2} s",
                        run + 1,
                        cfg.runs,
                        cache.name(),
                        fig.secs.last().copied().unwrap_or(0.0)
                    ));
                    if method == "tandem" {
                        // Keep the last Tandem copy for section 5.
                        let last = run + 1 == cfg.runs && ci + 1 == caches.len();
                        if last {
                            let keep = self.path("resume-standby");
                            remove_dir(&keep);
                            std::fs::rename(&dest, &keep)?;
                            big.standby =
                                Some((keep, fig.bytes.last().copied().unwrap_or(0.0) as u64));
                        } else {
                            remove_dir(&dest);
                        }
                    }
                }
            }
        }
        big.copy_secs = caches
            .len()
            .checked_sub(1)
            .and_then(|ci| figs.get(&(ci, "tandem")))
            .map(|f| median(&f.secs));
        let primary_hwm = big
            .primary
            .as_ref()
            .map(|p| proc_hwm_mib(p.proc.pid()))
            .transpose()?
            .unwrap_or(0.0);

        let mib = big.bytes as f64 / MIB;
        let mut s = Section::default();
        let _ = writeln!(
            s.md,
            "## 1. Base copy of a {mib:.0} MiB environment\n\n{} database and log files ({} bytes), loopback only. Throughput = environment bytes / wall time \
             (Tandem: from starting `tandem-standby run` until its metrics say recoverable, connected and lag 0, checked afterwards against the primary's \
             end of log; baselines: until the command and a following `sync` return). Median of {} run(s) (min–max).\n",
            big.files.len(),
            big.bytes,
            cfg.runs
        );
        if !self.can_drop_caches && cfg.caches.contains(&Cache::Cold) {
            let _ = writeln!(
                s.md,
                "Cold runs skipped: cannot write /proc/sys/vm/drop_caches.\n"
            );
        }
        let _ = writeln!(
            s.md,
            "| method | cache | time s | MiB/s | Tandem ÷ this |\n|---|---|---|---|---|"
        );
        for (ci, &cache) in caches.iter().enumerate() {
            let Some(tandem) = figs.get(&(ci, "tandem")) else {
                continue;
            };
            let t_mbps = mib / median(&tandem.secs);
            for method in COPY_METHODS {
                let Some(f) = figs.get(&(ci, method)) else {
                    continue;
                };
                let mbps: Vec<f64> = f.secs.iter().map(|s| mib / s).collect();
                let ratio = if method == "tandem" {
                    "1.00".to_owned()
                } else {
                    format!("{:.2}", t_mbps / median(&mbps))
                };
                let _ = writeln!(
                    s.md,
                    "| {} | {} | {} | {} | {ratio} |",
                    method_label(method),
                    cache.name(),
                    spread(&f.secs, 2),
                    spread(&mbps, 0)
                );
            }
        }
        let _ = writeln!(s.md);
        // Costs of the Tandem copy.
        let _ = writeln!(
            s.md,
            "| Tandem base copy | cache | primary CPU s per GiB | standby CPU s per GiB | bytes received ÷ environment bytes |\n|---|---|---|---|---|"
        );
        for (ci, &cache) in caches.iter().enumerate() {
            let Some(t) = figs.get(&(ci, "tandem")) else {
                continue;
            };
            let gib = big.bytes as f64 / (1024.0 * MIB);
            let pc: Vec<f64> = t.primary_cpu.iter().map(|c| c / gib).collect();
            let sc: Vec<f64> = t.standby_cpu.iter().map(|c| c / gib).collect();
            let rx: Vec<f64> = t.bytes.iter().map(|b| b / big.bytes as f64).collect();
            let _ = writeln!(
                s.md,
                "| | {} | {} | {} | {} |",
                cache.name(),
                spread(&pc, 2),
                spread(&sc, 2),
                spread(&rx, 3)
            );
        }
        let _ = writeln!(
            s.md,
            "\nPeak RSS (VmHWM) of tandem-primary after all copies: {primary_hwm:.0} MiB.\n"
        );

        for (ci, &cache) in caches.iter().enumerate() {
            let (Some(t), Some(cp), Some(rs)) = (
                figs.get(&(ci, "tandem")),
                figs.get(&(ci, "cp")),
                figs.get(&(ci, "rsync-ssh")),
            ) else {
                continue;
            };
            let vs_cp = median(&cp.secs) / median(&t.secs);
            let vs_rsync = median(&rs.secs) / median(&t.secs);
            s.targets.push(Target {
                what: format!("base copy vs local cp ({})", cache.name()),
                goal: "≥ 0.80× cp".into(),
                measured: format!(
                    "{vs_cp:.2}× ({:.0} vs {:.0} MiB/s)",
                    mib / median(&t.secs),
                    mib / median(&cp.secs)
                ),
                met: Some(vs_cp >= 0.8),
            });
            s.targets.push(Target {
                what: format!("base copy vs rsync over ssh ({})", cache.name()),
                goal: "≥ 2× rsync".into(),
                measured: format!(
                    "{vs_rsync:.2}× ({:.0} vs {:.0} MiB/s)",
                    mib / median(&t.secs),
                    mib / median(&rs.secs)
                ),
                met: Some(vs_rsync >= 2.0),
            });
        }
        Ok(s)
    }
}

// ---------------------------------------------------------------- 2. lag

/// Follows the workload's `-L` file with inotify and timestamps each line
/// as it appears.
fn spawn_commit_tail(path: PathBuf, stop: Arc<AtomicBool>) -> JoinHandle<Result<Vec<CommitSeen>>> {
    std::thread::spawn(move || {
        use std::os::unix::ffi::OsStrExt;
        let cpath = std::ffi::CString::new(path.as_os_str().as_bytes())?;
        // SAFETY: plain syscalls on a descriptor this thread owns.
        let fd = unsafe { libc::inotify_init1(libc::IN_NONBLOCK | libc::IN_CLOEXEC) };
        if fd < 0 {
            bail!("inotify_init1: {}", std::io::Error::last_os_error());
        }
        // SAFETY: fd is ours, cpath is a valid C string.
        if unsafe { libc::inotify_add_watch(fd, cpath.as_ptr(), libc::IN_MODIFY) } < 0 {
            let e = std::io::Error::last_os_error();
            // SAFETY: closing our own descriptor.
            unsafe { libc::close(fd) };
            bail!("inotify_add_watch {}: {e}", path.display());
        }
        let mut file = File::open(&path)?;
        let mut out = Vec::new();
        let mut partial = String::new();
        let mut events = [0u8; 4096];
        let mut buf = vec![0u8; 1 << 16];
        let result = (|| -> Result<()> {
            loop {
                let stopping = stop.load(Ordering::Relaxed);
                let mut pfd = libc::pollfd {
                    fd,
                    events: libc::POLLIN,
                    revents: 0,
                };
                // SAFETY: one valid pollfd.
                unsafe { libc::poll(&mut pfd, 1, 20) };
                // SAFETY: reading into a buffer we own; EAGAIN ends the drain.
                while unsafe { libc::read(fd, events.as_mut_ptr().cast(), events.len()) } > 0 {}
                loop {
                    let n = file.read(&mut buf)?;
                    if n == 0 {
                        break;
                    }
                    let at = Instant::now();
                    partial.push_str(&String::from_utf8_lossy(&buf[..n]));
                    while let Some(i) = partial.find('\n') {
                        let line: String = partial.drain(..=i).collect();
                        let f: Vec<&str> = line.split_whitespace().collect();
                        if let [_, file_no, off] = f[..] {
                            out.push(CommitSeen {
                                at,
                                lsn: LogPosition::new(file_no.parse()?, off.parse()?),
                            });
                        }
                    }
                }
                if stopping {
                    return Ok(());
                }
            }
        })();
        // SAFETY: closing our own descriptor.
        unsafe { libc::close(fd) };
        result.map(|()| out)
    })
}

/// Asks the primary for its status every `every` over one mTLS connection
/// and records the standby's acknowledged position.
/// `latest` always holds the newest acknowledged position seen.
fn spawn_ack_poller(
    url: String,
    tls: TlsFiles,
    every: Duration,
    stop: Arc<AtomicBool>,
    latest: Arc<Mutex<LogPosition>>,
) -> JoinHandle<Result<Vec<AckSample>>> {
    std::thread::spawn(move || {
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()?;
        rt.block_on(async move {
            let mut client =
                tandem_shared::client::connect(&url, None, &tls, Duration::from_secs(5)).await?;
            let mut out = Vec::new();
            let mut next = tokio::time::Instant::now();
            let deadline = Instant::now() + Duration::from_secs(3600);
            while !stop.load(Ordering::Relaxed) && Instant::now() < deadline {
                let s = client
                    .status(StatusRequest {})
                    .await
                    .map_err(|e| anyhow!("status: {e}"))?
                    .into_inner();
                let at = Instant::now();
                let end: LogPosition = s.end.unwrap_or_default().into();
                if let Some(b) = s
                    .standbys
                    .iter()
                    .find(|b| b.name == STANDBY_NAME && b.connected)
                {
                    let acked: LogPosition = b.acked.unwrap_or_default().into();
                    if let Ok(mut l) = latest.lock() {
                        *l = acked;
                    }
                    out.push(AckSample { at, end, acked });
                }
                next += every;
                let now = tokio::time::Instant::now();
                if next < now {
                    next = now;
                }
                tokio::time::sleep_until(next).await;
            }
            Ok(out)
        })
    })
}

struct LagRun {
    /// Ascending.
    delays_ms: Vec<f64>,
    /// Until the primary's end of log (its log watcher) covered the commit; ascending.
    seen_ms: Vec<f64>,
    unmatched: usize,
    commits_per_sec: f64,
    log_mib_per_sec: f64,
    max_lag_mib: f64,
    catch_up_secs: f64,
}

/// A primary and a caught-up standby on a fresh copy of the seed.
struct Pair {
    dir: PathBuf,
    env: PathBuf,
    standby_dir: PathBuf,
    primary: Primary,
    standby: Proc,
    /// Removed after the processes above are stopped (fields drop in order).
    _tmpfs: Option<tempfile::TempDir>,
}

impl Bench {
    /// `on_tmpfs`: the standby's directory on tmpfs, a diagnostic that takes
    /// its fsyncs off the disk the primary writes.
    fn start_pair(&self, seed: &Seed, tag: &str, on_tmpfs: bool) -> Result<Pair> {
        let dir = self.path(tag);
        remove_dir(&dir);
        std::fs::create_dir_all(&dir)?;
        let env = dir.join("env");
        copy_tree(&seed.env, &env)?;
        let tmpfs = if on_tmpfs {
            Some(tmpfs_dir().context("no tmpfs with 4 GiB free (BENCH_TMPFS or /dev/shm)")?)
        } else {
            None
        };
        let primary = start_primary(&dir, &env, &self.certs, "127.0.0.1:0", &[])?;
        let standby_dir = tmpfs
            .as_ref()
            .map(|t| t.path().join("standby"))
            .unwrap_or_else(|| dir.join("standby"));
        let mut standby = start_standby(&dir, &standby_dir, &primary.url(), &self.certs, &[])?;
        caught_up(&standby_dir, &env, Duration::from_secs(120), &mut standby)?;
        Ok(Pair {
            dir,
            env,
            standby_dir,
            primary,
            standby,
            _tmpfs: tmpfs,
        })
    }

    fn lag_once(&self, seed: &Seed, rate: u64, on_tmpfs: bool, tag: &str) -> Result<LagRun> {
        let mut pair = self.start_pair(seed, tag, on_tmpfs)?;
        let lg_max = env_lg_max(&pair.env)?;
        let lsn_file = pair.dir.join("commits.lsn");
        File::create(&lsn_file)?;
        let stop = Arc::new(AtomicBool::new(false));
        let tail = spawn_commit_tail(lsn_file.clone(), stop.clone());
        let latest = Arc::new(Mutex::new(LogPosition::ZERO));
        let poller = spawn_ack_poller(
            pair.primary.url(),
            self.tls(),
            Duration::from_millis(1),
            stop.clone(),
            latest.clone(),
        );
        let start_end = primary_log_end(&pair.env)?;
        let secs = self.cfg.lag_secs;
        let opts = WorkloadOptions {
            rate,
            seconds: Some(secs),
            lsn_log: Some(lsn_file),
            ..self.stream_workload()
        };
        sync_all();
        let mut w = Proc::spawn(
            "workload",
            opts.command(&pair.env),
            &pair.dir.join("workload.log"),
        )?;
        let measure = (|| -> Result<(f64, f64, f64)> {
            let status = w.wait_exit(Duration::from_secs(secs + 120))?;
            if !status.success() {
                bail!("workload failed: {}", w.log_text());
            }
            let exited = Instant::now();
            let end = primary_log_end(&pair.env)?;
            caught_up(
                &pair.standby_dir,
                &pair.env,
                Duration::from_secs(300),
                &mut pair.standby,
            )?;
            let catch_up = exited.elapsed().as_secs_f64();
            let done = bdb::parse_done(&w.log_text()).context("no DONE line")?;
            Ok((
                (done - seed.last) as f64 / secs as f64,
                log_mib_between(start_end, end, lg_max) / secs as f64,
                catch_up,
            ))
        })();
        // Let the poller see the final acknowledgement, then stop both threads
        // (the tail reads the file to its end once more when stopped).
        let settled = primary_log_end(&pair.env).and_then(|end| {
            wait_for(
                "the primary to see the final acknowledgement",
                Duration::from_secs(60),
                || Ok(latest.lock().map(|l| *l >= end).unwrap_or(false)),
            )
        });
        stop.store(true, Ordering::Relaxed);
        let commits = tail.join().map_err(|_| anyhow!("tail thread panicked"))??;
        let samples = poller
            .join()
            .map_err(|_| anyhow!("poller thread panicked"))??;
        let (rate_measured, log_rate, catch_up) = measure?;
        settled?;
        let (mut delays, unmatched) = commit_delays(&commits, &samples, |s| s.acked);
        delays.sort_by(f64::total_cmp);
        let (mut seen, _) = commit_delays(&commits, &samples, |s| s.end);
        seen.sort_by(f64::total_cmp);
        let max_lag = samples
            .iter()
            .map(|s| s.acked.bytes_until(s.end, lg_max))
            .max()
            .unwrap_or(0) as f64
            / MIB;
        drop(pair);
        remove_dir(&self.path(tag));
        Ok(LagRun {
            delays_ms: delays,
            seen_ms: seen,
            unmatched,
            commits_per_sec: rate_measured,
            log_mib_per_sec: log_rate,
            max_lag_mib: max_lag,
            catch_up_secs: catch_up,
        })
    }

    fn section_lag(&self, seed: &Seed) -> Result<Section> {
        let cfg = &self.cfg;
        let mut modes: Vec<(String, u64, bool)> = vec![
            (format!("{} commits/s", cfg.lag_rate), cfg.lag_rate, false),
            ("unthrottled".into(), 0, false),
        ];
        if tmpfs_dir().is_some() {
            modes.push((
                format!("{} commits/s, standby on tmpfs (diagnostic)", cfg.lag_rate),
                cfg.lag_rate,
                true,
            ));
        }
        let mut s = Section::default();
        let _ = writeln!(
            s.md,
            "## 2. Replication lag under load\n\nWorkload: tandem-workload, 100-byte values, 3 updates per transaction, `DB_TXN_WRITE_NOSYNC`, {} s per run, \
             {} run(s). Delay of a commit = from the moment its line (end of log after the commit) appears in the workload's `-L` file (inotify) \
             until the primary's Status RPC, polled every 1 ms over mTLS, shows the standby's acknowledged (fsynced) position at or past it. \
             Resolution about 1 ms (the poll interval); medians over runs of each run's percentile. \"Primary saw it\" = the same, until the \
             primary's own end of log (its log watcher) covers the commit: the part of the delay spent before shipping starts.\n",
            cfg.lag_secs, cfg.runs
        );
        let _ = writeln!(
            s.md,
            "| load | commits/s | log MiB/s | p50 ms | p99 ms | max ms | primary saw it: p50 / p99 ms | max lag MiB | catch-up after load s | commits measured |\n|---|---|---|---|---|---|---|---|---|---|"
        );
        for (label, rate, on_tmpfs) in &modes {
            let mut runs = Vec::new();
            for run in 0..cfg.runs {
                let r = self.lag_once(
                    seed,
                    *rate,
                    *on_tmpfs,
                    &format!("lag-{rate}-{on_tmpfs}-{run}"),
                )?;
                progress(format!(
                    "lag run {}/{} {label}: {:.0} commits/s, p50 {:.2} ms, p99 {:.2} ms, max {:.2} ms, {} unmatched",
                    run + 1,
                    cfg.runs,
                    r.commits_per_sec,
                    percentile(&r.delays_ms, 50.0),
                    percentile(&r.delays_ms, 99.0),
                    percentile(&r.delays_ms, 100.0),
                    r.unmatched
                ));
                runs.push(r);
            }
            let col = |f: &dyn Fn(&LagRun) -> f64| runs.iter().map(f).collect::<Vec<f64>>();
            let p50 = col(&|r| percentile(&r.delays_ms, 50.0));
            let p99 = col(&|r| percentile(&r.delays_ms, 99.0));
            let max = col(&|r| percentile(&r.delays_ms, 100.0));
            let seen50 = col(&|r| percentile(&r.seen_ms, 50.0));
            let seen99 = col(&|r| percentile(&r.seen_ms, 99.0));
            let n: usize = runs.iter().map(|r| r.delays_ms.len()).sum();
            let unmatched: usize = runs.iter().map(|r| r.unmatched).sum();
            let _ = writeln!(
                s.md,
                "| {label} | {} | {} | {} | {} | {} | {:.2} / {:.2} | {} | {} | {n}{} |",
                spread(&col(&|r| r.commits_per_sec), 0),
                spread(&col(&|r| r.log_mib_per_sec), 1),
                spread(&p50, 2),
                spread(&p99, 2),
                spread(&max, 1),
                median(&seen50),
                median(&seen99),
                spread(&col(&|r| r.max_lag_mib), 2),
                spread(&col(&|r| r.catch_up_secs), 2),
                if unmatched > 0 {
                    format!(" ({unmatched} never acknowledged!)")
                } else {
                    String::new()
                }
            );
            if *rate == cfg.lag_rate && !*on_tmpfs {
                let m = median(&p99);
                s.targets.push(Target {
                    what: format!("p99 commit → standby durable at {} commits/s", cfg.lag_rate),
                    goal: "< 10 ms".into(),
                    measured: format!("{m:.2} ms (p50 {:.2} ms)", median(&p50)),
                    met: Some(m < 10.0 && unmatched == 0),
                });
            }
        }
        let _ = writeln!(s.md, "\nCatch-up = from the workload's exit until the standby holds the primary's whole log (standby status, polled every 20 ms; status file refreshed every 200 ms).\n");
        Ok(s)
    }
}

// ---------------------------------------------------------------- 3. cost

/// What runs beside the workload in section 3.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Attach {
    /// The workload alone.
    Nothing,
    /// tandem-primary running on the environment, no standby connected.
    PrimaryOnly,
    /// tandem-primary and a caught-up standby on the same disk.
    Standby,
    /// The same, the standby's directory on tmpfs: separates the cost of
    /// sharing one disk (the standby's fsyncs) from the rest.
    StandbyOnTmpfs,
}

impl Attach {
    fn label(self) -> &'static str {
        match self {
            Attach::Nothing => "without Tandem",
            Attach::PrimaryOnly => "tandem-primary running, no standby",
            Attach::Standby => "**with Tandem**: primary + standby (same disk)",
            Attach::StandbyOnTmpfs => "primary + standby on tmpfs (diagnostic)",
        }
    }
}

#[derive(Default)]
struct CostRun {
    commits_per_sec: f64,
    log_mib_per_sec: f64,
    primary_cpu_per_sec: f64,
    primary_cpu_per_gib: f64,
    primary_hwm_mib: f64,
    standby_cpu_per_sec: f64,
    standby_mib_per_sec: f64,
    max_lag_mib: f64,
    median_lag_mib: f64,
    catch_up_secs: f64,
}

/// A tmpfs directory with room to spare, for [`Attach::StandbyOnTmpfs`]:
/// under `BENCH_TMPFS` (bench/run makes one and removes it) or /dev/shm.
fn tmpfs_dir() -> Option<tempfile::TempDir> {
    use std::os::unix::ffi::OsStrExt;
    let shm = env_str("BENCH_TMPFS")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from("/dev/shm"));
    let c = std::ffi::CString::new(shm.as_os_str().as_bytes()).ok()?;
    // SAFETY: statfs into a zeroed struct we own.
    let mut st: libc::statfs = unsafe { std::mem::zeroed() };
    if unsafe { libc::statfs(c.as_ptr(), &mut st) } != 0 {
        return None;
    }
    const TMPFS_MAGIC: i64 = 0x0102_1994;
    let free = st.f_bavail as u64 * st.f_bsize as u64;
    if st.f_type as i64 != TMPFS_MAGIC || free < (4u64 << 30) {
        return None;
    }
    tempfile::Builder::new()
        .prefix("tandem-bench-")
        .tempdir_in(&shm)
        .ok()
}

impl Bench {
    fn cost_once(&self, seed: &Seed, attach: Attach, tag: &str) -> Result<CostRun> {
        let secs = self.cfg.cost_secs;
        let opts = WorkloadOptions {
            rate: 0,
            seconds: Some(secs),
            ..self.stream_workload()
        };
        let mut r = CostRun::default();
        let dir = self.path(tag);
        remove_dir(&dir);
        std::fs::create_dir_all(&dir)?;
        let env = dir.join("env");
        copy_tree(&seed.env, &env)?;
        let lg_max = env_lg_max(&env)?;
        let start_end = primary_log_end(&env)?;
        let tmpfs = if attach == Attach::StandbyOnTmpfs {
            Some(tmpfs_dir().context("no tmpfs with 4 GiB free (BENCH_TMPFS or /dev/shm)")?)
        } else {
            None
        };
        let primary = match attach {
            Attach::Nothing => None,
            _ => Some(start_primary(&dir, &env, &self.certs, "127.0.0.1:0", &[])?),
        };
        let standby_dir = tmpfs
            .as_ref()
            .map(|t| t.path().join("standby"))
            .unwrap_or_else(|| dir.join("standby"));
        let mut standby = match (&primary, attach) {
            (Some(p), Attach::Standby | Attach::StandbyOnTmpfs) => {
                let mut sb = start_standby(&dir, &standby_dir, &p.url(), &self.certs, &[])?;
                caught_up(&standby_dir, &env, Duration::from_secs(120), &mut sb)?;
                Some(sb)
            }
            _ => None,
        };
        // The primary's view of the standby, every 100 ms (cheap enough not
        // to disturb what is measured).
        let stop = Arc::new(AtomicBool::new(false));
        let latest = Arc::new(Mutex::new(LogPosition::ZERO));
        let poller = match (&primary, &standby) {
            (Some(p), Some(_)) => Some(spawn_ack_poller(
                p.url(),
                self.tls(),
                Duration::from_millis(100),
                stop.clone(),
                latest.clone(),
            )),
            _ => None,
        };
        let rx0 = if standby.is_some() {
            status_u64(&standby_status(&standby_dir)?, "log_bytes_received")
        } else {
            0
        };
        let pp = primary.as_ref().map(|p| p.proc.pid());
        let sp = standby.as_ref().map(Proc::pid);
        let cpu = |pid: Option<u32>| pid.map(proc_cpu_secs).transpose().map(|c| c.unwrap_or(0.0));
        sync_all();
        let (p0, s0) = (cpu(pp)?, cpu(sp)?);
        let started = Instant::now();
        let mut w = Proc::spawn("workload", opts.command(&env), &dir.join("workload.log"))?;
        let status = w.wait_exit(Duration::from_secs(secs + 120))?;
        let exited = Instant::now();
        let (p1, s1) = (cpu(pp)?, cpu(sp)?);
        if !status.success() {
            bail!("workload failed: {}", w.log_text());
        }
        let end = primary_log_end(&env)?;
        let done = bdb::parse_done(&w.log_text()).context("no DONE line")?;
        let log_mib = log_mib_between(start_end, end, lg_max);
        r.commits_per_sec = (done - seed.last) as f64 / secs as f64;
        r.log_mib_per_sec = log_mib / secs as f64;
        let busy = exited.duration_since(started).as_secs_f64();
        r.primary_cpu_per_sec = (p1 - p0) / busy;
        r.standby_cpu_per_sec = (s1 - s0) / busy;
        if let Some(pp) = pp {
            r.primary_hwm_mib = proc_hwm_mib(pp)?;
        }
        if let Some(sb) = standby.as_mut() {
            let caught =
                caught_up(&standby_dir, &env, Duration::from_secs(600), sb).and_then(|()| {
                    wait_for(
                        "the primary to see the final acknowledgement",
                        Duration::from_secs(60),
                        || Ok(latest.lock().map(|l| *l >= end).unwrap_or(false)),
                    )
                });
            let caught_up = Instant::now();
            stop.store(true, Ordering::Relaxed);
            let samples = poller
                .map(|p| p.join().map_err(|_| anyhow!("poller panicked")))
                .transpose()?
                .transpose()?
                .unwrap_or_default();
            caught?;
            let p2 = cpu(pp)?;
            let rx1 = status_u64(&standby_status(&standby_dir)?, "log_bytes_received");
            r.primary_cpu_per_gib = (p2 - p0) / (log_mib / 1024.0).max(1e-9);
            r.standby_mib_per_sec = rx1.saturating_sub(rx0) as f64
                / MIB
                / caught_up.duration_since(started).as_secs_f64();
            let lag = |s: &AckSample| s.acked.bytes_until(s.end, lg_max) as f64 / MIB;
            let during: Vec<&AckSample> = samples.iter().filter(|s| s.at <= exited).collect();
            r.max_lag_mib = during.iter().map(|s| lag(s)).fold(0.0, f64::max);
            r.median_lag_mib = median(&during.iter().map(|s| lag(s)).collect::<Vec<f64>>());
            r.catch_up_secs = caught_up.duration_since(exited).as_secs_f64();
            sb.stop(Duration::from_secs(30))?;
        } else {
            r.primary_cpu_per_gib = (p1 - p0) / (log_mib / 1024.0).max(1e-9);
        }
        drop(standby);
        drop(primary);
        drop(tmpfs);
        remove_dir(&dir);
        Ok(r)
    }

    fn section_cost(&self, seed: &Seed) -> Result<Section> {
        let cfg = &self.cfg;
        let mut variants = vec![Attach::Nothing, Attach::Standby, Attach::PrimaryOnly];
        let tmpfs_ok = tmpfs_dir().is_some();
        if tmpfs_ok {
            variants.push(Attach::StandbyOnTmpfs);
        }
        let mut results: BTreeMap<usize, Vec<CostRun>> = BTreeMap::new();
        // One untimed run first: the first workload after the previous
        // section (its deletions, its dirty pages) is slower for that alone.
        self.cost_once(seed, Attach::Nothing, "cost-warmup")?;
        for run in 0..cfg.runs {
            // Rotate the order so drift (page cache, disk) hits every variant.
            for i in 0..variants.len() {
                let vi = (i + run) % variants.len();
                let r = self.cost_once(seed, variants[vi], &format!("cost-{vi}-{run}"))?;
                progress(format!(
                    "cost run {}/{} {}: {:.0} commits/s",
                    run + 1,
                    cfg.runs,
                    variants[vi].label().replace("**", ""),
                    r.commits_per_sec
                ));
                results.entry(vi).or_default().push(r);
            }
        }
        let col =
            |v: &[CostRun], f: &dyn Fn(&CostRun) -> f64| v.iter().map(f).collect::<Vec<f64>>();
        let rate = |vi: usize| {
            results
                .get(&vi)
                .map(|v| median(&col(v, &|r| r.commits_per_sec)))
                .unwrap_or(f64::NAN)
        };
        let base = rate(0);
        let mut s = Section::default();
        let _ = writeln!(
            s.md,
            "## 3. Cost on the primary\n\nThe same unthrottled workload ({} s, fresh copy of a seed environment each run) alone and with Tandem attached \
             (standby caught up before the load starts); variants rotated, {} run(s). CPU from /proc/PID/stat (utime + stime) while the \
             workload runs, peak RSS = VmHWM; lag = the primary's end of log minus the standby's acknowledged position (Status RPC every 100 ms).\n",
            cfg.cost_secs, cfg.runs
        );
        let _ = writeln!(
            s.md,
            "| variant | commits/s | ÷ without | log MiB/s | primary CPU (cores) | primary CPU s/GiB of log | primary VmHWM MiB | standby CPU (cores) | median lag MiB | max lag MiB | catch-up s |\n|---|---|---|---|---|---|---|---|---|---|---|"
        );
        for (vi, v) in variants.iter().enumerate() {
            let Some(runs) = results.get(&vi) else {
                continue;
            };
            let has_p = *v != Attach::Nothing;
            let has_s = matches!(v, Attach::Standby | Attach::StandbyOnTmpfs);
            let opt =
                |on: bool, vals: Vec<f64>, d: usize| if on { spread(&vals, d) } else { "-".into() };
            let _ = writeln!(
                s.md,
                "| {} | {} | {:.3} | {} | {} | {} | {} | {} | {} | {} | {} |",
                v.label(),
                spread(&col(runs, &|r| r.commits_per_sec), 0),
                rate(vi) / base,
                spread(&col(runs, &|r| r.log_mib_per_sec), 1),
                opt(has_p, col(runs, &|r| r.primary_cpu_per_sec), 3),
                opt(has_p, col(runs, &|r| r.primary_cpu_per_gib), 1),
                opt(has_p, col(runs, &|r| r.primary_hwm_mib), 0),
                opt(has_s, col(runs, &|r| r.standby_cpu_per_sec), 3),
                opt(has_s, col(runs, &|r| r.median_lag_mib), 2),
                opt(has_s, col(runs, &|r| r.max_lag_mib), 2),
                opt(has_s, col(runs, &|r| r.catch_up_secs), 2),
            );
        }
        if let Some(runs) = results.get(&1) {
            let _ = writeln!(
                s.md,
                "\nWith Tandem, the standby received the log at {} MiB/s (log bytes received ÷ time from the load's start until caught up).",
                spread(&col(runs, &|r| r.standby_mib_per_sec), 1)
            );
        }
        if !tmpfs_ok {
            let _ = writeln!(
                s.md,
                "\n(tmpfs variant skipped: no tmpfs with 4 GiB free (BENCH_TMPFS or /dev/shm).)"
            );
        }
        let _ = writeln!(s.md);
        let ratio = rate(1) / base;
        s.targets.push(Target {
            what: "commit rate with Tandem attached".into(),
            goal: "≥ 95% of without".into(),
            measured: format!(
                "{:.1}% ({:.0} vs {:.0} commits/s)",
                ratio * 100.0,
                rate(1),
                base
            ),
            met: Some(ratio >= 0.95),
        });
        Ok(s)
    }
}

// ---------------------------------------------------------------- 4. promote

struct PromoteRun {
    log_mib: f64,
    recovery_secs: f64,
    total_secs: f64,
}

impl Bench {
    fn promote_once(&self, seed: &Seed, mb: u64, tag: &str) -> Result<PromoteRun> {
        let mut pair = self.start_pair(seed, tag, false)?;
        let lg_max = env_lg_max(&pair.env)?;
        let start = primary_log_end(&pair.env)?;
        let opts = WorkloadOptions {
            rate: 0,
            seconds: Some(900),
            ..self.stream_workload()
        };
        let mut w = Proc::spawn(
            "workload",
            opts.command(&pair.env),
            &pair.dir.join("workload.log"),
        )?;
        wait_alive(
            &format!("{mb} MiB of log"),
            Duration::from_secs(900),
            &mut w,
            || Ok(log_mib_between(start, primary_log_end(&pair.env)?, lg_max) >= mb as f64),
        )?;
        let status = w.stop(Duration::from_secs(60))?;
        if !status.success() {
            bail!("workload failed: {}", w.log_text());
        }
        caught_up(
            &pair.standby_dir,
            &pair.env,
            Duration::from_secs(600),
            &mut pair.standby,
        )?;
        // A failover: the primary dies, then the standby is promoted.
        pair.primary.proc.kill9()?;
        wait_for(
            "the standby to notice the primary is gone",
            Duration::from_secs(60),
            || Ok(standby_status(&pair.standby_dir)?["connected"] == false),
        )?;
        // Recovery replays every record from the start of the standby's
        // first log file to its durable end.
        let first = EnvLayout::open(&pair.standby_dir)?
            .log_files()?
            .first()
            .copied()
            .context("the standby holds no log file")?;
        let durable = lsn_of(&standby_status(&pair.standby_dir)?["durable_lsn"]);
        let log_mib = log_mib_between(LogPosition::new(first, 0), durable, lg_max);
        let mut c = Command::new(harness::bin("tandem-standby"));
        c.arg("promote")
            .arg("--dir")
            .arg(&pair.standby_dir)
            .arg("--json");
        let started = Instant::now();
        let out = cmd_stdout(
            "tandem-standby promote",
            c,
            Duration::from_secs(1800),
            &pair.dir.join("promote.log"),
        )?;
        let wall = started.elapsed().as_secs_f64();
        let v: serde_json::Value =
            serde_json::from_str(&out).with_context(|| format!("promote output: {out}"))?;
        let recovery_secs = v["recovery_seconds"].as_f64().context("recovery_seconds")?;
        let _ = pair.standby.wait_exit(Duration::from_secs(30));
        drop(pair);
        remove_dir(&self.path(tag));
        Ok(PromoteRun {
            log_mib,
            recovery_secs,
            total_secs: wall,
        })
    }

    fn section_promote(&self, seed: &Seed) -> Result<Section> {
        let cfg = &self.cfg;
        let mut s = Section::default();
        let _ = writeln!(
            s.md,
            "## 4. Promotion time\n\nA standby follows the unthrottled workload until the primary has written the given volume of new log, catches up; \
             then the primary is killed (`kill -9`) and `tandem-standby promote --json` runs (failover: stop, catastrophic recovery of every log \
             file the standby holds, db_verify, new epoch). Page cache warm (the standby just wrote these files). {} run(s).\n",
            cfg.runs
        );
        let _ = writeln!(s.md, "| new log | log files replayed MiB | recovery s | recovery MiB/s | promote total s (wall) |\n|---|---|---|---|---|");
        for &mb in &cfg.promote_mb {
            let mut runs = Vec::new();
            for run in 0..cfg.runs {
                let r = self.promote_once(seed, mb, &format!("promote-{mb}-{run}"))?;
                progress(format!(
                    "promote run {}/{} {mb} MiB: {:.1} MiB replayed, recovery {:.2} s, total {:.2} s",
                    run + 1,
                    cfg.runs,
                    r.log_mib,
                    r.recovery_secs,
                    r.total_secs
                ));
                runs.push(r);
            }
            let col = |f: &dyn Fn(&PromoteRun) -> f64| runs.iter().map(f).collect::<Vec<f64>>();
            let _ = writeln!(
                s.md,
                "| {mb} MiB | {} | {} | {} | {} |",
                spread(&col(&|r| r.log_mib), 0),
                spread(&col(&|r| r.recovery_secs), 2),
                spread(&col(&|r| r.log_mib / r.recovery_secs), 0),
                spread(&col(&|r| r.total_secs), 2)
            );
        }
        let _ = writeln!(s.md, "\nReference (BDB.md §5, page cache dropped): catastrophic recovery replays roughly 85–170 MB of log per second.\n");
        Ok(s)
    }
}

// ---------------------------------------------------------------- 5. resume

impl Bench {
    fn section_resume(&self, big: &mut BigEnv) -> Result<Section> {
        let cfg = &self.cfg;
        if big.primary.is_none() {
            big.primary = Some(start_primary(
                self.root.path(),
                &big.env,
                &self.certs,
                "127.0.0.1:0",
                &[],
            )?);
        }
        let url = big.primary.as_ref().context("primary")?.url();
        let lg_max = env_lg_max(&big.env)?;
        // A complete standby to restart: the last one of section 1, or a new one.
        let (dir, full_bytes) = match big.standby.take() {
            Some(d) => d,
            None => {
                let dir = self.path("resume-standby");
                let mut sb = start_standby(self.root.path(), &dir, &url, &self.certs, &[])?;
                caught_up(&dir, &big.env, copy_timeout(big.bytes), &mut sb)?;
                sb.stop(Duration::from_secs(60))?;
                let st = standby_status(&dir)?;
                let full =
                    status_u64(&st, "file_bytes_received") + status_u64(&st, "log_bytes_received");
                (dir, full)
            }
        };
        let mut standby = start_standby(self.root.path(), &dir, &url, &self.certs, &[])?;
        caught_up(&dir, &big.env, Duration::from_secs(300), &mut standby)?;
        let step = cfg.resume_mb as f64 / 2.0;
        let mut resent = Vec::new();
        let mut necessary = Vec::new();
        let mut files_resent = Vec::new();
        for run in 0..cfg.runs {
            // The workload of section 1 (4,000-byte values), rate-limited.
            let opts = WorkloadOptions {
                txns: 0,
                rate: 300,
                seconds: Some(600),
                value_len: 4000,
                updates: 0,
                lg_max: BIG_LG_MAX,
                cache_mb: Some(256),
                checkpoint_every: 20_000,
                quiet: true,
                ..Default::default()
            };
            let mut w = Proc::spawn(
                "workload",
                opts.command(&big.env),
                &self.path(&format!("resume-workload-{run}.log")),
            )?;
            let advance = |from: LogPosition, mib: f64, w: &mut Proc| -> Result<()> {
                wait_alive(
                    &format!("{mib} MiB more log"),
                    Duration::from_secs(600),
                    w,
                    || Ok(log_mib_between(from, primary_log_end(&big.env)?, lg_max) >= mib),
                )
            };
            advance(primary_log_end(&big.env)?, step, &mut w)?;
            standby.kill9()?;
            let durable_at_kill = lsn_of(&standby_status(&dir)?["durable_lsn"]);
            advance(primary_log_end(&big.env)?, step, &mut w)?;
            standby = start_standby(self.root.path(), &dir, &url, &self.certs, &[])?;
            let status = w.stop(Duration::from_secs(60))?;
            if !status.success() {
                bail!("workload failed: {}", w.log_text());
            }
            caught_up(&dir, &big.env, Duration::from_secs(600), &mut standby)?;
            let st = standby_status(&dir)?;
            let end = primary_log_end(&big.env)?;
            let sent =
                status_u64(&st, "file_bytes_received") + status_u64(&st, "log_bytes_received");
            let need = durable_at_kill.bytes_until(end, lg_max);
            progress(format!("resume run {}/{}: {sent} bytes after restart, {need} bytes of log written since the kill point", run + 1, cfg.runs));
            resent.push(sent as f64);
            necessary.push(need as f64);
            files_resent.push(status_u64(&st, "file_bytes_received") as f64);
        }
        standby.stop(Duration::from_secs(60))?;
        drop(standby);
        let rebase = if standby_supports_rebase() {
            Some(self.rebase_runs(big, &dir, &url)?)
        } else {
            None
        };
        let full = full_bytes as f64;
        let mut s = Section::default();
        let _ = writeln!(
            s.md,
            "## 5. Resume and rebase\n\nThe {:.0} MiB environment of section 1 under a rate-limited workload (300 commits/s of 4,000-byte values); the \
             standby is killed with `kill -9`, the primary writes about {step} MiB more, then the standby restarts and catches up. {} run(s). \
             Full copy = what the first base copy received (database files + log).\n",
            big.bytes as f64 / MIB,
            cfg.runs
        );
        let _ = writeln!(s.md, "| case | bytes sent | ÷ full copy | ÷ log written since the durable point |\n|---|---|---|---|");
        let _ = writeln!(s.md, "| full base copy | {full_bytes} | 1 | - |");
        let ratio_full: Vec<f64> = resent.iter().map(|r| r / full).collect();
        let ratio_need: Vec<f64> = resent
            .iter()
            .zip(&necessary)
            .map(|(r, n)| r / n.max(1.0))
            .collect();
        let _ = writeln!(
            s.md,
            "| resume after `kill -9` of the standby | {} (files: {}) | {} | {} |",
            spread(&resent, 0),
            spread(&files_resent, 0),
            spread(&ratio_full, 4),
            spread(&ratio_need, 3)
        );
        let Some(rb) = rebase else {
            let _ = writeln!(
                s.md,
                "| rebase after a 1% change | not implemented | - | - |\n"
            );
            s.targets.push(Target {
                what: "rebase after a 1% change".into(),
                goal: "< 5% of db bytes".into(),
                measured: "not implemented".into(),
                met: None,
            });
            return Ok(s);
        };
        let _ = writeln!(s.md);
        let frac =
            |v: &[RebaseRun], f: &dyn Fn(&RebaseRun) -> f64| v.iter().map(f).collect::<Vec<f64>>();
        let sent_pct = frac(&rb, &|r| 100.0 * r.sent as f64 / r.db_bytes as f64);
        let _ = writeln!(
            s.md,
            "Rebase: with the standby stopped, the workload changes about 1% of the database pages (new records and rewrites of \
             random older ones; the changed share is measured by comparing blake3 digests of every page before and after); the standby \
             then starts with `--rebase-after-secs 1`, rebases and catches up. The standby rebases once before the first change, so its \
             base is current and only the change is measured; pages changed = pages of the primary that differ from the standby's base. Pages sent % = the rebase report's sent bytes ÷ all database bytes; time to \
             rebase = from starting the standby until its status reports the rebase (status file refreshed every 200 ms). {} run(s).\n",
            cfg.runs
        );
        let _ = writeln!(
            s.md,
            "| rebase after a small change | pages changed % | pages sent % | bytes sent | sent ÷ (sent + reused) % | time to rebase s | full base copy s (section 1) |\n|---|---|---|---|---|---|---|"
        );
        let _ = writeln!(
            s.md,
            "| | {} | {} | {} | {} | {} | {} |\n",
            spread(
                &frac(&rb, &|r| 100.0 * r.changed as f64 / r.db_bytes as f64),
                2
            ),
            spread(&sent_pct, 2),
            spread(&frac(&rb, &|r| r.sent as f64), 0),
            spread(
                &frac(&rb, &|r| 100.0 * r.sent as f64
                    / (r.sent + r.reused).max(1) as f64),
                2
            ),
            spread(&frac(&rb, &|r| r.rebase_secs), 2),
            big.copy_secs
                .map(|t| format!("{t:.2}"))
                .unwrap_or_else(|| "-".into())
        );
        let m = median(&sent_pct);
        s.targets.push(Target {
            what: "rebase after a 1% change".into(),
            goal: "< 5% of db bytes".into(),
            measured: format!(
                "{m:.2}% sent ({:.2}% of pages changed)",
                median(&frac(&rb, &|r| 100.0 * r.changed as f64 / r.db_bytes as f64))
            ),
            met: Some(m < 5.0),
        });
        Ok(s)
    }
}

/// One rebase after a small change.
struct RebaseRun {
    /// Database bytes (all pages) after the change, and in changed pages.
    db_bytes: u64,
    changed: u64,
    /// What the rebase report says it sent and reused.
    sent: u64,
    reused: u64,
    rebase_secs: f64,
}

/// Whether this tree's standby can rebase (the feature may be absent).
fn standby_supports_rebase() -> bool {
    Command::new(harness::bin("tandem-standby"))
        .args(["run", "--help"])
        .output()
        .map(|o| String::from_utf8_lossy(&o.stdout).contains("--rebase-after-secs"))
        .unwrap_or(false)
}

/// Per database file: its page size and a 128-bit blake3 of every page.
type PageDigests = BTreeMap<String, (u64, Vec<[u8; 16]>)>;

fn page_digests(env: &Path) -> Result<PageDigests> {
    let mut out = BTreeMap::new();
    for db in EnvLayout::open(env)?.database_files()? {
        let page = db.page_size.max(512) as usize;
        let data = std::fs::read(env.join(&db.name))?;
        let digests = data
            .chunks(page)
            .map(|p| {
                let mut d = [0u8; 16];
                d.copy_from_slice(&blake3::hash(p).as_bytes()[..16]);
                d
            })
            .collect();
        out.insert(db.name.clone(), (page as u64, digests));
    }
    Ok(out)
}

/// Database bytes in total and in pages that differ (or are new) in `after`.
fn changed_bytes(before: &PageDigests, after: &PageDigests) -> (u64, u64) {
    let (mut total, mut changed) = (0, 0);
    for (name, (page, pages)) in after {
        total += page * pages.len() as u64;
        let old = before.get(name).map(|b| b.1.as_slice()).unwrap_or(&[]);
        changed += page
            * pages
                .iter()
                .enumerate()
                .filter(|(i, d)| old.get(*i) != Some(*d))
                .count() as u64;
    }
    (total, changed)
}

impl Bench {
    /// With the standby in `dir` stopped and caught up: change about 1% of
    /// the pages, start the standby so that it rebases, measure.
    /// Starts the standby in `dir` so that it rebases at once, waits for a
    /// rebase that began after the start and for the catch-up, stops it.
    /// Returns the rebase report and the seconds until it completed.
    fn rebase_once(&self, big: &BigEnv, dir: &Path, url: &str) -> Result<(serde_json::Value, f64)> {
        let since_ms = tandem_shared::now_unix_ms();
        let started = Instant::now();
        let mut sb = start_standby(
            self.root.path(),
            dir,
            url,
            &self.certs,
            &["--rebase-after-secs", "1"],
        )?;
        let mut report: Option<(serde_json::Value, f64)> = None;
        // The status file of the previous process is read until the new one
        // rewrites it: only a rebase finished after the start counts.
        wait_alive("a rebase", copy_timeout(big.bytes), &mut sb, || {
            let st = standby_status(dir)?;
            let r = &st["last_rebase"];
            if r["unix_ms"].as_u64().unwrap_or(0) >= since_ms {
                report = Some((r.clone(), started.elapsed().as_secs_f64()));
            }
            Ok(report.is_some())
        })?;
        caught_up(dir, &big.env, Duration::from_secs(600), &mut sb)?;
        sb.stop(Duration::from_secs(60))?;
        report.context("no rebase report")
    }

    /// With the standby in `dir` stopped and caught up: rebase once so the
    /// base is current; then per run change about 1% of the pages, rebase
    /// again and measure what that rebase sends.
    fn rebase_runs(&self, big: &BigEnv, dir: &Path, url: &str) -> Result<Vec<RebaseRun>> {
        // Once, so the standby's base holds what section 5 wrote so far;
        // afterwards each measured rebase leaves the base current. A rebase
        // needs a checkpoint past the current base (BDB must no longer need
        // the old log).
        run_cmd(
            "db5.3_checkpoint",
            tool("db5.3_checkpoint", &["-1", "-h"], &big.env),
            Duration::from_secs(600),
            &self.path("checkpoint.log"),
        )?;
        self.rebase_once(big, dir, url)?;
        let mut out = Vec::new();
        for run in 0..self.cfg.runs {
            let pages: u64 = page_digests(&big.env)?
                .values()
                .map(|(_, p)| p.len() as u64)
                .sum();
            // Each transaction adds 3 overflow pages and rewrites 7 older
            // values (a new overflow page and its leaf page each).
            let txns = (pages / 100 / 17).max(10);
            bdb::run_workload(
                &big.env,
                &WorkloadOptions {
                    txns,
                    value_len: 4000,
                    updates: 7,
                    lg_max: BIG_LG_MAX,
                    cache_mb: Some(256),
                    checkpoint_every: 50,
                    quiet: true,
                    ..Default::default()
                },
            )?;
            run_cmd(
                "db5.3_checkpoint",
                tool("db5.3_checkpoint", &["-1", "-h"], &big.env),
                Duration::from_secs(600),
                &self.path("checkpoint.log"),
            )?;
            // Changed = pages of the primary that differ from the standby's
            // base (its mirror's database files), i.e. what a rebase must send.
            let (db_bytes, changed) = changed_bytes(&page_digests(dir)?, &page_digests(&big.env)?);
            let (r, rebase_secs) = self.rebase_once(big, dir, url)?;
            let sent = r["sent_bytes"].as_u64().context("last_rebase.sent_bytes")?;
            let reused = r["reused_bytes"].as_u64().unwrap_or(0);
            progress(format!(
                "rebase run {}/{}: {:.2}% of pages changed, {sent} bytes of pages sent ({:.2}%), {rebase_secs:.2} s",
                run + 1,
                self.cfg.runs,
                100.0 * changed as f64 / db_bytes as f64,
                100.0 * sent as f64 / db_bytes as f64
            ));
            out.push(RebaseRun {
                db_bytes,
                changed,
                sent,
                reused,
                rebase_secs,
            });
        }
        Ok(out)
    }
}

// ---------------------------------------------------------------- report

/// The 1-minute load average: other work on the machine skews every figure.
fn loadavg() -> String {
    std::fs::read_to_string("/proc/loadavg")
        .ok()
        .and_then(|t| t.split_whitespace().next().map(str::to_owned))
        .unwrap_or_else(|| "?".into())
}

fn machine_md(cfg: &Config, work: &Path) -> String {
    let cpu = std::fs::read_to_string("/proc/cpuinfo")
        .ok()
        .and_then(|t| {
            t.lines().find_map(|l| {
                l.strip_prefix("model name")
                    .map(|v| v.trim_start_matches([' ', '\t', ':']).to_owned())
            })
        })
        .unwrap_or_else(|| "?".into());
    let mem = std::fs::read_to_string("/proc/meminfo")
        .ok()
        .and_then(|t| {
            t.lines().find_map(|l| {
                l.strip_prefix("MemTotal:")
                    .and_then(|v| v.split_whitespace().next())
                    .and_then(|v| v.parse::<f64>().ok())
            })
        })
        .map(|kb| format!("{:.1} GiB", kb / 1024.0 / 1024.0))
        .unwrap_or_else(|| "?".into());
    let kernel = std::fs::read_to_string("/proc/sys/kernel/osrelease")
        .unwrap_or_default()
        .trim()
        .to_owned();
    let fs = first_line({
        let mut c = Command::new("sh");
        c.arg("-c").arg(format!(
            "df -hT '{}' | tail -n 1 | awk '{{print $1\" \"$2\", \"$5\" free\"}}'",
            work.display()
        ));
        c
    });
    let repo = Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .unwrap_or(Path::new("."));
    let commit = first_line({
        let mut c = Command::new("git");
        c.arg("-C")
            .arg(repo)
            .args(["describe", "--always", "--dirty"]);
        c
    });
    let cores = std::thread::available_parallelism()
        .map(|n| n.get())
        .unwrap_or(0);
    let tools = [
        first_line({
            let mut c = Command::new("rsync");
            c.arg("--version");
            c
        }),
        first_line({
            let mut c = Command::new("ssh");
            c.arg("-V");
            c
        }),
        first_line({
            let mut c = Command::new("db5.3_recover");
            c.arg("-V");
            c
        }),
    ];
    format!(
        "Machine: {cores} cores ({cpu}), {mem} RAM, kernel {kernel}; work dir {} on {fs}; load average {} at the start. Tandem {commit}.\n\
         Tools: {}.\n\
         Settings: {}size {} MiB, {} run(s), cache {}, lag {} s at {} commits/s, cost {} s, promote after {:?} MiB, resume step {} MiB.\n",
        work.display(),
        loadavg(),
        tools.join("; "),
        if cfg.quick { "QUICK mode; " } else { "" },
        cfg.size_mb,
        cfg.runs,
        cfg.caches.iter().map(|c| c.name()).collect::<Vec<_>>().join("+"),
        cfg.lag_secs,
        cfg.lag_rate,
        cfg.cost_secs,
        cfg.promote_mb,
        cfg.resume_mb
    )
}

fn targets_md(targets: &[Target]) -> String {
    let mut md =
        String::from("## Targets\n\n| target | goal | measured | result |\n|---|---|---|---|\n");
    for t in targets {
        let result = match t.met {
            Some(true) => "met",
            Some(false) => "**missed**",
            None => "**missed** (not implemented)",
        };
        let _ = writeln!(
            md,
            "| {} | {} | {} | {result} |",
            t.what, t.goal, t.measured
        );
    }
    md
}

fn main() -> ExitCode {
    match run() {
        Ok(true) => ExitCode::SUCCESS,
        Ok(false) => ExitCode::from(1),
        Err(e) => {
            eprintln!("tandem-bench: error: {e:#}");
            ExitCode::from(2)
        }
    }
}

/// Runs every selected section; false when one failed (its error is in the
/// report).
fn run() -> Result<bool> {
    let cfg = Config::from_env()?;
    for b in ["tandem-primary", "tandem-standby"] {
        if !harness::bin(b).exists() {
            bail!("{} is missing: build with `cargo build --release --workspace --bins` (bench/run does)", harness::bin(b).display());
        }
    }
    std::fs::create_dir_all(&cfg.work_parent)?;
    let root = tempfile::Builder::new()
        .prefix("tandem-bench-")
        .tempdir_in(&cfg.work_parent)?;
    let certs = Certs::generate(&root.path().join("certs"))?;
    let can_drop_caches = drop_caches();
    let bench = Bench {
        cfg: cfg.clone(),
        root,
        certs,
        can_drop_caches,
    };
    let started = Instant::now();
    let mut md = format!(
        "# Tandem benchmark\n\n{}\n",
        machine_md(&cfg, bench.root.path())
    );
    let mut targets = Vec::new();
    let mut ok = true;
    // Each section notes the load average when it started: other work on
    // the machine is the first suspect for an outlier.
    let mut record = |name: &str, load: String, r: Result<Section>, md: &mut String| match r {
        Ok(s) => {
            md.push_str(&s.md);
            let _ = writeln!(md, "_Load average when this section started: {load}._\n");
            targets.extend(s.targets);
        }
        Err(e) => {
            ok = false;
            progress(format!("section {name} FAILED: {e:#}"));
            let _ = writeln!(md, "## {name}: FAILED\n\n```\n{e:#}\n```\n");
        }
    };

    let needs_big = cfg.wants("copy") || cfg.wants("resume");
    let mut big = if needs_big {
        match bench.make_big_env() {
            Ok(b) => Some(b),
            Err(e) => {
                record("environment", loadavg(), Err(e), &mut md);
                None
            }
        }
    } else {
        None
    };
    if cfg.wants("copy") {
        if let Some(b) = big.as_mut() {
            let load = loadavg();
            let r = bench.section_copy(b);
            record("1. base copy", load, r, &mut md);
            // An idle tandem-primary is not free (its log watcher polls every
            // 2 ms): stop it so it does not disturb the next sections.
            if let Some(mut p) = b.primary.take() {
                let _ = p.proc.stop(Duration::from_secs(30));
            }
        }
    }
    let needs_seed = ["lag", "cost", "promote"].iter().any(|s| cfg.wants(s));
    let seed = if needs_seed {
        match bench.make_seed() {
            Ok(s) => Some(s),
            Err(e) => {
                record("seed environment", loadavg(), Err(e), &mut md);
                None
            }
        }
    } else {
        None
    };
    if let Some(seed) = &seed {
        if cfg.wants("lag") {
            let load = loadavg();
            let r = bench.section_lag(seed);
            record("2. lag", load, r, &mut md);
        }
        if cfg.wants("cost") {
            let load = loadavg();
            let r = bench.section_cost(seed);
            record("3. cost", load, r, &mut md);
        }
        if cfg.wants("promote") {
            let load = loadavg();
            let r = bench.section_promote(seed);
            record("4. promote", load, r, &mut md);
        }
    }
    if cfg.wants("resume") {
        if let Some(b) = big.as_mut() {
            let load = loadavg();
            let r = bench.section_resume(b);
            record("5. resume", load, r, &mut md);
        }
    }
    drop(big);
    md.push_str(&targets_md(&targets));
    let _ = writeln!(
        md,
        "\nTotal bench time: {:.0} s (without building); load average {} at the end.",
        started.elapsed().as_secs_f64(),
        loadavg()
    );
    println!("{md}");
    if let Some(out) = &cfg.out {
        if let Some(parent) = out.parent() {
            std::fs::create_dir_all(parent)?;
        }
        std::fs::write(out, &md).with_context(|| format!("writing {}", out.display()))?;
        progress(format!("wrote {}", out.display()));
    }
    if cfg.keep {
        let kept = bench.root.keep();
        progress(format!("kept {}", kept.display()));
    }
    Ok(ok)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn median_and_percentiles() {
        assert_eq!(median(&[3.0, 1.0, 2.0]), 2.0);
        assert_eq!(median(&[4.0, 1.0, 2.0, 3.0]), 2.5);
        let v: Vec<f64> = (1..=100).map(f64::from).collect();
        assert_eq!(percentile(&v, 50.0), 50.0);
        assert_eq!(percentile(&v, 99.0), 99.0);
        assert_eq!(percentile(&v, 100.0), 100.0);
        assert_eq!(percentile(&[7.0], 99.0), 7.0);
        assert_eq!(spread(&[1.0, 3.0, 2.0], 1), "2.0 (1.0–3.0)");
    }

    #[test]
    fn each_commit_waits_for_the_first_covering_acknowledgement() {
        let t0 = Instant::now();
        let ms = |n: u64| t0 + Duration::from_millis(n);
        let p = |o: u32| LogPosition::new(1, o);
        let commits = [
            CommitSeen {
                at: ms(0),
                lsn: p(100),
            },
            CommitSeen {
                at: ms(1),
                lsn: p(200),
            },
            CommitSeen {
                at: ms(10),
                lsn: p(300),
            },
        ];
        let samples = [
            AckSample {
                at: ms(2),
                end: p(200),
                acked: p(50),
            },
            AckSample {
                at: ms(3),
                end: p(200),
                acked: p(200),
            },
            // Acknowledged before the commit was seen: counts from its sighting.
            AckSample {
                at: ms(9),
                end: p(400),
                acked: p(300),
            },
            AckSample {
                at: ms(12),
                end: p(400),
                acked: p(400),
            },
        ];
        let (d, unmatched) = commit_delays(&commits, &samples, |s| s.acked);
        assert_eq!(unmatched, 0);
        assert_eq!(d, vec![3.0, 2.0, 2.0]);
        let (d, _) = commit_delays(&commits, &samples, |s| s.end);
        assert_eq!(d, vec![2.0, 1.0, 2.0]);
        let (d, unmatched) = commit_delays(
            &[CommitSeen {
                at: ms(0),
                lsn: LogPosition::new(2, 0),
            }],
            &samples,
            |s| s.acked,
        );
        assert!(d.is_empty());
        assert_eq!(unmatched, 1);
    }
}
