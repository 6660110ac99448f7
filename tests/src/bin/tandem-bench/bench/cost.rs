//! Section 3, `cost`: the workload's commit rate with and without Tandem,
//! and the primary's CPU time and peak RSS while streaming.

use super::*;

/// What runs beside the workload in section 3.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Attach {
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
    pub(crate) fn label(self) -> &'static str {
        match self {
            Attach::Nothing => "without Tandem",
            Attach::PrimaryOnly => "tandem-primary running, no standby",
            Attach::Standby => "**with Tandem**: primary + standby (same disk)",
            Attach::StandbyOnTmpfs => "primary + standby on tmpfs (diagnostic)",
        }
    }
}

#[derive(Default)]
pub(crate) struct CostRun {
    pub(crate) commits_per_sec: f64,
    pub(crate) log_mib_per_sec: f64,
    pub(crate) primary_cpu_per_sec: f64,
    pub(crate) primary_cpu_per_gib: f64,
    pub(crate) primary_hwm_mib: f64,
    pub(crate) standby_cpu_per_sec: f64,
    pub(crate) standby_mib_per_sec: f64,
    pub(crate) max_lag_mib: f64,
    pub(crate) median_lag_mib: f64,
    pub(crate) catch_up_secs: f64,
}

/// A tmpfs directory with room to spare, for [`Attach::StandbyOnTmpfs`]:
/// under `BENCH_TMPFS` (bench/run makes one and removes it) or /dev/shm.
pub(crate) fn tmpfs_dir() -> Option<tempfile::TempDir> {
    let shm = env_str("BENCH_TMPFS")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from("/dev/shm"));
    let st = rustix::fs::statfs(&shm).ok()?;
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
    pub(crate) fn cost_once(&self, seed: &Seed, attach: Attach, tag: &str) -> Result<CostRun> {
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
        copy_env(&seed.env, &env)?;
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
                wait_caught_up_running(&standby_dir, &env, Duration::from_secs(120), &mut sb)?;
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
            let caught = wait_caught_up_running(&standby_dir, &env, Duration::from_secs(600), sb)
                .and_then(|()| {
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

    pub(crate) fn section_cost(&self, seed: &Seed, mode: LoadMode) -> Result<Section> {
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
                    "cost ({}) run {}/{} {}: {:.0} commits/s",
                    mode.name(),
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
            "## 3. Cost on the primary ({})\n\n{}The same unthrottled workload ({} s, fresh copy of a seed environment each run) alone and with Tandem attached \
             (standby caught up before the load starts); variants rotated, {} run(s). CPU from /proc/PID/stat (utime + stime) while the \
             workload runs, peak RSS = VmHWM; lag = the primary's end of log minus the standby's acknowledged position (Status RPC every 100 ms).\n",
            mode.name(),
            load_note(mode, cfg.load),
            cfg.cost_secs,
            cfg.runs
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
            what: format!("commit rate with Tandem attached ({})", mode.name()),
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
