//! The campaign's world: the processes (primary, standbys, application),
//! the links between them, the committed history the application logged,
//! and what each standby has acknowledged. Faults (`inject.rs`) and checks
//! (`check.rs`) act on it.

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::process::Command;
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use rand::rngs::StdRng;
use rand::SeedableRng;

use super::history::{Entry, Lineage, Snapshot};
use super::tmpfs::{dir_bytes, Tmpfs};
use super::{Config, Violation};
use crate::bdb::{self, WorkloadOptions};
use crate::faulty_link::FaultyLink;
use crate::harness::{self, Certs, Primary, Proc};

/// Transactions the workload wrote before the campaign's first round (no
/// LSN log: nothing is acknowledged for them, the checker still proves them).
const INITIAL_TXNS: u64 = 2000;
const LONG: Duration = Duration::from_secs(300);
/// How often standbys scrub (when the build can): often enough that a
/// flipped byte is found within a round, cheap on mirrors this small.
const SCRUB_SECS: &str = "10";

/// One standby slot: its directory, link and what it has acknowledged.
pub struct Standby {
    pub name: String,
    pub dir: PathBuf,
    pub link: FaultyLink,
    pub proc: Option<Proc>,
    /// Every transaction up to this one was acknowledged by this standby
    /// (durable): it must never hold less, unless the driver starts it over.
    pub floor: u64,
    /// Set while it holds a history the current primary no longer has (it
    /// refused a rolled-back primary): that history.
    pub diverged: Option<Vec<Entry>>,
    pub on_tmpfs: bool,
    /// A byte of its log was flipped at rest this round: it may need log
    /// from before what it acknowledged (the damaged record on), which the
    /// primary rightly removed; the heal is a new base, not retention.
    pub log_damaged: bool,
    /// When its process last started (unix ms): a status written before
    /// then says nothing about the running process.
    pub started_ms: u64,
}

#[derive(Default)]
pub struct Tally {
    pub faults: BTreeMap<&'static str, u64>,
    pub checks: BTreeMap<&'static str, u64>,
    pub violations: Vec<Violation>,
    pub notes: Vec<String>,
}

pub struct World {
    pub cfg: Config,
    pub rng: StdRng,
    pub root: PathBuf,
    /// Process logs and LSN logs.
    pub logs: PathBuf,
    pub certs: Certs,
    pub gen: u32,
    pub env: PathBuf,
    pub primary: Option<Primary>,
    pub workload: Option<Proc>,
    runs: u32,
    pub lineage: Lineage,
    /// The highest transaction number ever committed (any history).
    pub max_t: u64,
    pub standbys: Vec<Standby>,
    pub snapshot: Option<Snapshot>,
    pub tally: Tally,
    pub round: u64,
    /// The current round's fault and its details.
    pub fault: String,
    pub(super) last_monitor: Instant,
    /// The primary's oldest log file at the last look (0: not looked yet).
    pub retention_oldest: u32,
    /// Gaps the running primary has logged so far (already reported).
    pub gaps_seen: usize,
    keep: bool,
    /// `run` flags this build of tandem-standby has (fixes landing on
    /// other branches add them): `--scrub-interval-secs`, `--start-over`.
    pub standby_flags: String,
    tmpfs_size_mib: u64,
    /// The etcd world (`--etcd`), None without it.
    pub etcd: Option<super::etcd_world::EtcdWorld>,
    /// Transactions whose commit wait answered durable, in the current
    /// history: the highest (the workload waits in order).
    pub waited: u64,
    /// The running workload's file of waited-durable transactions.
    pub waited_file: Option<PathBuf>,
    /// etcd-isolate rounds so far (every other one lets the standbys fall
    /// behind first).
    pub isolations: u64,
    /// etcd-switchover rounds so far (every other one is asked first while
    /// the application runs).
    pub switchovers: u64,
    /// During a switchover's checks: everything the stopped application
    /// committed, which the new primary must hold.
    pub must_hold_all: Option<u64>,
    // Dropped last, in this order: processes are gone before the tmpfs is
    // unmounted and the work directory removed.
    tmpfs: Option<Tmpfs>,
    scratch: Option<tempfile::TempDir>,
}

impl World {
    pub fn new(cfg: Config) -> Result<World> {
        let scratch = match &cfg.work {
            Some(_) => None,
            None => Some(
                tempfile::Builder::new()
                    .prefix("tandem-faults-")
                    .tempdir()?,
            ),
        };
        let root = match (&cfg.work, &scratch) {
            (Some(w), _) => w.clone(),
            (None, Some(t)) => t.path().to_path_buf(),
            (None, None) => bail!("no work directory"),
        };
        std::fs::create_dir_all(root.join("logs"))?;
        let certs = Certs::generate(&root.join("certs"))?;
        let mut tally = Tally::default();
        let tmpfs = if cfg.faults.contains(&super::Fault::DiskFull) {
            match Tmpfs::mount(&root.join("tmpfs"), cfg.tmpfs_mib) {
                Ok(t) => Some(t),
                Err(e) => {
                    tally.notes.push(format!("no tmpfs: {e:#}"));
                    None
                }
            }
        } else {
            None
        };
        let mut standbys = Vec::new();
        for i in 0..cfg.standbys {
            let on_tmpfs = i == 0 && tmpfs.is_some();
            // Placeholder target until the first primary listens.
            let link = FaultyLink::start("127.0.0.1:9".parse()?)?;
            standbys.push(Standby {
                name: format!("s{i}"),
                dir: PathBuf::new(),
                link,
                proc: None,
                floor: 0,
                diverged: None,
                on_tmpfs,
                started_ms: 0,
                log_damaged: false,
            });
        }
        let keep = cfg.keep;
        let cfg_tmpfs_mib = cfg.tmpfs_mib;
        let help = Command::new(harness::bin("tandem-standby"))
            .args(["run", "--help"])
            .output()
            .context("tandem-standby run --help (build the binaries first)")?;
        let standby_flags = String::from_utf8_lossy(&help.stdout).into_owned();
        let etcd = if cfg.etcd {
            Some(super::etcd_world::EtcdWorld::start(
                &root,
                cfg.standbys,
                cfg.etcd_default_timing,
            )?)
        } else {
            None
        };
        let mut w = World {
            rng: StdRng::seed_from_u64(cfg.seed),
            cfg,
            logs: root.join("logs"),
            root,
            certs,
            gen: 0,
            env: PathBuf::new(),
            primary: None,
            workload: None,
            runs: 0,
            lineage: Lineage::default(),
            max_t: 0,
            standbys,
            snapshot: None,
            tally,
            round: 0,
            fault: "setup".into(),
            last_monitor: Instant::now(),
            retention_oldest: 0,
            gaps_seen: 0,
            keep,
            standby_flags,
            tmpfs_size_mib: cfg_tmpfs_mib,
            etcd,
            waited: 0,
            waited_file: None,
            isolations: 0,
            switchovers: 0,
            must_hold_all: None,
            tmpfs,
            scratch,
        };
        w.new_generation(None)?;
        Ok(w)
    }

    pub fn has_standby_flag(&self, flag: &str) -> bool {
        self.standby_flags.contains(flag)
    }

    /// Keeps the small disk big enough for a mirror of the environment as it
    /// grows (its base, a rebase's staged copy and a readiness check's
    /// clone), so it is full only when the disk-full fault fills it.
    pub fn ensure_tmpfs_room(&mut self) -> Result<()> {
        let Some(t) = &self.tmpfs else {
            return Ok(());
        };
        let env_mib = dir_bytes(&self.env)? >> 20;
        let want = self.cfg.tmpfs_mib.max(4 * env_mib + 128);
        if want > self.tmpfs_size_mib {
            t.grow(want)?;
            self.tmpfs_size_mib = want;
            self.count("tmpfs grown with the environment");
        }
        Ok(())
    }

    pub fn has_tmpfs(&self) -> bool {
        self.tmpfs.is_some()
    }

    pub fn tmpfs_path(&self) -> Option<PathBuf> {
        self.tmpfs.as_ref().map(|t| t.path.clone())
    }

    pub fn keep_on_exit(&mut self) {
        self.keep = true;
    }

    pub fn violation(&mut self, what: String) {
        // One line per violation in the table.
        let what = what.trim().replace('\n', " | ");
        eprintln!(
            "faults: VIOLATION round {} [{}]: {what}",
            self.round, self.fault
        );
        self.tally.violations.push(Violation {
            round: self.round,
            fault: self.fault.clone(),
            what,
        });
    }

    pub fn note(&mut self, what: String) {
        self.tally.notes.push(what);
    }

    pub fn count(&mut self, check: &'static str) {
        *self.tally.checks.entry(check).or_default() += 1;
    }

    /// Polls `cond` every 50 ms (and runs the retention monitor about once
    /// a second) until it holds (true) or `timeout` passes (false).
    pub fn wait_until(
        &mut self,
        timeout: Duration,
        mut cond: impl FnMut(&mut World) -> Result<bool>,
    ) -> Result<bool> {
        let deadline = Instant::now() + timeout;
        loop {
            self.lineage.poll()?;
            self.poll_waited();
            self.sample_leaders(false);
            if cond(self)? {
                return Ok(true);
            }
            if Instant::now() > deadline {
                return Ok(false);
            }
            if self.last_monitor.elapsed() >= Duration::from_secs(1) {
                self.monitor_retention()?;
                self.last_monitor = Instant::now();
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    pub fn primary_running(&mut self) -> bool {
        self.primary.as_mut().is_some_and(|p| p.proc.is_running())
    }

    pub fn start_primary(&mut self) -> Result<()> {
        let mut args: Vec<String> = ["--retention", "--retention-interval-secs", "1"]
            .map(String::from)
            .to_vec();
        args.extend(self.primary_etcd_args(true));
        let args: Vec<&str> = args.iter().map(String::as_str).collect();
        let p = harness::start_primary(&self.logs, &self.env, &self.certs, "127.0.0.1:0", &args)?;
        for s in &self.standbys {
            s.link.retarget(p.addr)?;
        }
        self.primary = Some(p);
        self.gaps_seen = 0;
        Ok(())
    }

    pub fn kill_primary(&mut self) -> Result<()> {
        if let Some(mut p) = self.primary.take() {
            p.proc.kill9()?;
            if let Some(e) = &mut self.etcd {
                e.forget(&format!("https://{}", p.addr));
            }
        }
        Ok(())
    }

    pub fn start_workload(&mut self) -> Result<()> {
        self.runs += 1;
        let lsns = self
            .logs
            .join(format!("lsn-g{}-r{}.log", self.gen, self.runs));
        // In the etcd world half the runs wait after each commit until a
        // standby holds it (the "no waited commit lost" invariant).
        let wait = if self.etcd.is_some() && rand::Rng::random_bool(&mut self.rng, 0.5) {
            let file = self
                .logs
                .join(format!("waited-g{}-r{}.log", self.gen, self.runs));
            Some((self.env.join(".tandem-primary").join("wait.sock"), file))
        } else {
            None
        };
        self.waited_file = wait.as_ref().map(|w| w.1.clone());
        let opts = WorkloadOptions {
            txns: 0,
            seconds: Some(1_000_000),
            rate: self.cfg.rate,
            checkpoint_every: 500,
            lg_max: 1 << 20,
            lsn_log: Some(lsns.clone()),
            recover: true,
            quiet: true,
            wait,
            ..Default::default()
        };
        let log = self
            .logs
            .join(format!("workload-g{}-r{}.log", self.gen, self.runs));
        let app = Proc::spawn("workload", opts.command(&self.env), &log)?;
        if let Some(e) = &self.etcd {
            // For the primary's --on-fence (it stops the application).
            std::fs::write(&e.app_pid, app.pid().to_string())?;
        }
        self.workload = Some(app);
        self.lineage.follow(lsns);
        Ok(())
    }

    /// Reads the running workload's waited-durable transactions.
    pub fn poll_waited(&mut self) {
        let Some(f) = &self.waited_file else { return };
        let Ok(text) = std::fs::read_to_string(f) else {
            return;
        };
        if let Some(t) = text
            .lines()
            .rev()
            .find_map(|l| l.trim().parse::<u64>().ok())
        {
            self.waited = self.waited.max(t);
        }
    }

    /// Stops the application: kill -9 (a crash) or SIGTERM (it commits what
    /// it has and exits).
    pub fn stop_workload(&mut self, crash: bool) -> Result<()> {
        if let Some(mut w) = self.workload.take() {
            if crash || !w.is_running() {
                w.kill9()?;
            } else {
                let st = w.stop(LONG)?;
                // The workload has no SIGTERM handler: dying of it is its way
                // of stopping (its commits are all logged).
                use std::os::unix::process::ExitStatusExt;
                if !st.success() && st.signal() != Some(libc::SIGTERM) {
                    self.note(format!("the workload exited with {st} on SIGTERM"));
                }
            }
        }
        self.lineage.close()?;
        self.poll_waited();
        self.waited_file = None;
        self.max_t = self.max_t.max(self.lineage.last_t());
        Ok(())
    }

    pub fn standby_url(&self, i: usize) -> String {
        // In the etcd world the primary advertises one address in etcd,
        // which every standby follows: the first link's.
        let link = if self.etcd.is_some() { 0 } else { i };
        format!("https://{}", self.standbys[link].link.addr())
    }

    pub fn start_standby(&mut self, i: usize, extra: &[&str]) -> Result<()> {
        let url = self.standby_url(i);
        let s = &self.standbys[i];
        let mut args = vec!["--check-interval-secs", "20", "--rebase-after-mib", "8"];
        if self.has_standby_flag("--scrub-interval-secs") {
            args.extend_from_slice(&["--scrub-interval-secs", SCRUB_SECS]);
        }
        args.extend_from_slice(extra);
        let etcd_args = self.standby_etcd_args(i);
        args.extend(etcd_args.iter().map(String::as_str));
        let started = tandem_shared::now_unix_ms();
        let p = harness::start_standby_as(&self.logs, &s.dir, &url, &self.certs, &s.name, &args)?;
        self.standbys[i].proc = Some(p);
        self.standbys[i].started_ms = started;
        Ok(())
    }

    pub fn kill_standby(&mut self, i: usize) -> Result<()> {
        if let Some(mut p) = self.standbys[i].proc.take() {
            p.kill9()?;
        }
        Ok(())
    }

    /// SIGTERM, or kill -9 if it does not exit in time.
    pub fn stop_standby(&mut self, i: usize) -> Result<()> {
        if self.standby_exit(i).is_some() {
            // Already exited (and reaped): no signal to a recycled pid.
            self.standbys[i].proc = None;
        }
        if let Some(mut p) = self.standbys[i].proc.take() {
            if p.stop(Duration::from_secs(60)).is_err() {
                self.note("a standby did not exit within 60 s of SIGTERM".into());
                p.kill9()?;
            }
        }
        Ok(())
    }

    /// The standby's process, if it still runs; None (and the exit code)
    /// if it exited.
    pub fn standby_exit(&mut self, i: usize) -> Option<Option<i32>> {
        let p = self.standbys[i].proc.as_mut()?;
        match p.child.try_wait() {
            Ok(Some(st)) => Some(st.code()),
            _ => None,
        }
    }

    pub fn standby_log_tail(&self, i: usize) -> String {
        let text = self.standbys[i]
            .proc
            .as_ref()
            .map(|p| p.log_text())
            .unwrap_or_default();
        tail(&text, 6)
    }

    /// The operator's explicit "start over": an empty directory, nothing
    /// acknowledged, following the current primary.
    pub fn fresh_standby(&mut self, i: usize) -> Result<()> {
        self.kill_standby(i)?;
        let dir = self.standbys[i].dir.clone();
        if dir.exists() {
            std::fs::remove_dir_all(&dir)?;
        }
        let s = &mut self.standbys[i];
        s.floor = 0;
        s.diverged = None;
        self.start_standby(i, &[])
    }

    /// Ends the current pair and starts the next: the primary's environment
    /// is `from` (a promoted standby's directory, its history and last
    /// transaction) or, the first time, a new one; every standby starts
    /// empty and takes a base.
    pub fn new_generation(&mut self, from: Option<(PathBuf, Vec<Entry>, u64)>) -> Result<()> {
        self.stop_workload(true)?;
        self.kill_primary()?;
        for i in 0..self.standbys.len() {
            self.kill_standby(i)?;
            self.standbys[i].link.restore();
        }
        let old_gen_dir = self.root.join(format!("gen{}", self.gen));
        self.gen += 1;
        let gen_dir = self.root.join(format!("gen{}", self.gen));
        std::fs::create_dir_all(&gen_dir)?;
        self.env = gen_dir.join("env");
        self.retention_oldest = 0;
        let cluster = format!("g{}", self.gen);
        if let Some(e) = &mut self.etcd {
            e.new_cluster(cluster)?;
            e.isolate_primary(false);
        }
        let env_t = match from {
            Some((dir, entries, m)) => {
                // Copied whole, .tandem included: the new primary reads the
                // promoted epoch from there.
                let st = Command::new("cp")
                    .arg("-a")
                    .arg(&dir)
                    .arg(&self.env)
                    .status()?;
                if !st.success() {
                    bail!("cp -a {} {} failed", dir.display(), self.env.display());
                }
                self.lineage = Lineage::from_entries(entries);
                self.lineage.truncate_to(m);
                self.waited = self.waited.min(m);
                m
            }
            None => {
                // Half the fresh environments (by the seed) carry BDB's
                // page checksums, and so do the generations promoted from
                // them (the flag stays with a database): the primary then
                // proves pages by one read, and the faults attack that
                // path too.
                let done = bdb::run_workload(
                    &self.env,
                    &WorkloadOptions {
                        txns: INITIAL_TXNS,
                        lg_max: 1 << 20,
                        checksum: rand::Rng::random_bool(&mut self.rng, 0.5),
                        ..Default::default()
                    },
                )?;
                self.max_t = self.max_t.max(done);
                self.lineage = Lineage::default();
                self.waited = 0;
                done
            }
        };
        if old_gen_dir.exists() {
            std::fs::remove_dir_all(&old_gen_dir)?;
        }
        // The application is stopped: a consistent copy to roll back to.
        let snap = gen_dir.join("snapshot");
        harness::copy_env(&self.env, &snap)?;
        self.snapshot = Some(Snapshot {
            dir: snap,
            t: env_t,
        });
        self.ensure_tmpfs_room()?;
        self.start_primary()?;
        let tmpfs = self.tmpfs_path();
        for i in 0..self.standbys.len() {
            let dir = match (&tmpfs, self.standbys[i].on_tmpfs) {
                (Some(t), true) => {
                    // Only one generation's standby fits on the small disk.
                    for e in std::fs::read_dir(t)? {
                        let p = e?.path();
                        if p.is_dir() {
                            std::fs::remove_dir_all(&p)?;
                        } else {
                            std::fs::remove_file(&p)?;
                        }
                    }
                    t.join(format!("g{}-{}", self.gen, self.standbys[i].name))
                }
                _ => gen_dir.join(&self.standbys[i].name),
            };
            let s = &mut self.standbys[i];
            s.dir = dir;
            s.floor = 0;
            s.diverged = None;
            self.start_standby(i, &[])?;
        }
        for i in 0..self.standbys.len() {
            let ok = self.wait_until(LONG, |w| {
                Ok(harness::standby_status(&w.standbys[i].dir)
                    .is_ok_and(|s| s["recoverable"] == true))
            })?;
            if !ok {
                let tail = self.standby_log_tail(i);
                self.violation(format!(
                    "liveness: {} took no base within {LONG:?} in generation {}: {tail}",
                    self.standbys[i].name, self.gen
                ));
                self.fresh_standby(i)?;
            }
        }
        self.start_workload()
    }

    /// Stops the application briefly and copies the primary's environment:
    /// the point a later rollback returns to.
    pub fn take_snapshot(&mut self) -> Result<()> {
        self.stop_workload(false)?;
        let snap = self.root.join(format!("gen{}", self.gen)).join("snapshot");
        if snap.exists() {
            std::fs::remove_dir_all(&snap)?;
        }
        // Retention may remove a log file while cp reads the directory.
        let mut copied = Err(anyhow::anyhow!("not tried"));
        for _ in 0..3 {
            let _ = std::fs::remove_dir_all(&snap);
            copied = harness::copy_env(&self.env, &snap);
            if copied.is_ok() {
                break;
            }
        }
        copied?;
        self.snapshot = Some(Snapshot {
            dir: snap,
            t: self.lineage.last_t().max(self.snapshot_floor()),
        });
        self.count("snapshots taken");
        self.start_workload()
    }

    fn snapshot_floor(&self) -> u64 {
        self.snapshot.as_ref().map_or(0, |s| s.t)
    }
}

impl Drop for World {
    fn drop(&mut self) {
        if let Some(mut w) = self.workload.take() {
            let _ = w.kill9();
        }
        if let Some(mut p) = self.primary.take() {
            let _ = p.proc.kill9();
        }
        for s in &mut self.standbys {
            if let Some(mut p) = s.proc.take() {
                let _ = p.kill9();
            }
        }
        // Unmount before the work directory is removed.
        self.tmpfs = None;
        if self.keep {
            if let Some(t) = self.scratch.take() {
                eprintln!("faults: kept {}", t.keep().display());
            }
        }
    }
}

/// The last `n` lines of `text`, on one line.
pub fn tail(text: &str, n: usize) -> String {
    let lines: Vec<&str> = text.lines().collect();
    lines[lines.len().saturating_sub(n)..].join(" | ")
}
