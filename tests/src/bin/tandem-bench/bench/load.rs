//! A defined background load (`BENCH_LOAD`), so that "under load" means
//! the same thing in every run: `BENCH_LOAD_CPU` processes that keep a CPU
//! busy (a loop over a 4 MiB buffer, which also evicts caches, as a
//! compiler does) and `BENCH_LOAD_FSYNC` processes that write 256 KiB and
//! `fdatasync` in a loop on the bench's disk (as a test suite's databases
//! and builds' linkers do). Each runs in a session of its own, like the
//! separate jobs of other people on a shared machine (the kernel's
//! autogroup shares the CPU per session), at the normal priority, and dies
//! with the driver (`PR_SET_PDEATHSIG`).
//!
//! Beside every measured variant, idle or loaded, a [`Probe`] thread of
//! the driver sleeps 1 ms in a loop and records how late it wakes: the
//! scheduler's delay for a thread that waits for a timer, measured in the
//! same moment as the figures it explains. It also samples the runnable
//! tasks (`/proc/loadavg`'s fourth field) every 100 ms.

use super::*;

/// How the cost and wait sections run: idle, under the load, or both.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum LoadMode {
    Idle,
    Loaded,
}

impl LoadMode {
    pub(crate) fn name(self) -> &'static str {
        match self {
            LoadMode::Idle => "idle",
            LoadMode::Loaded => "loaded",
        }
    }
}

/// The background load's size.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct LoadSpec {
    pub(crate) cpu: usize,
    pub(crate) fsync: usize,
}

impl LoadSpec {
    pub(crate) fn describe(&self) -> String {
        format!(
            "{} CPU-busy + {} fsync-busy processes, each in its own session",
            self.cpu, self.fsync
        )
    }
}

/// The sentence a section's heading gets under the load.
pub(crate) fn load_note(mode: LoadMode, spec: LoadSpec) -> String {
    match mode {
        LoadMode::Idle => String::new(),
        LoadMode::Loaded => format!(
            "**Under the background load** (`BENCH_LOAD`): {}, started before the section and stopped after it. ",
            spec.describe()
        ),
    }
}

/// The running background load; dropping it stops every process.
pub(crate) struct BackgroundLoad {
    procs: Vec<std::process::Child>,
    dir: PathBuf,
}

impl BackgroundLoad {
    pub(crate) fn start(spec: LoadSpec, dir: &Path) -> Result<Self> {
        std::fs::create_dir_all(dir)?;
        let exe = std::env::current_exe().context("the bench's own path")?;
        let mut load = BackgroundLoad {
            procs: Vec::new(),
            dir: dir.to_path_buf(),
        };
        for i in 0..spec.cpu + spec.fsync {
            let mut cmd = Command::new(&exe);
            if i < spec.cpu {
                cmd.arg("load-cpu");
            } else {
                cmd.arg("load-fsync").arg(dir.join(format!("fsync-{i}")));
            }
            cmd.stdin(Stdio::null())
                .stdout(Stdio::null())
                .stderr(Stdio::null());
            // SAFETY: only async-signal-safe calls (setsid, prctl) between
            // fork and exec.
            unsafe {
                std::os::unix::process::CommandExt::pre_exec(&mut cmd, || {
                    let _ = rustix::process::setsid();
                    let _ = rustix::process::set_parent_process_death_signal(Some(
                        rustix::process::Signal::KILL,
                    ));
                    Ok(())
                });
            }
            load.procs
                .push(cmd.spawn().context("starting a load process")?);
        }
        Ok(load)
    }
}

impl Drop for BackgroundLoad {
    fn drop(&mut self) {
        for p in &mut self.procs {
            let _ = p.kill();
        }
        for p in &mut self.procs {
            let _ = p.wait();
        }
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// `tandem-bench load-cpu`: keeps one CPU busy until killed.
pub(crate) fn cpu_main() -> ! {
    let mut buf = vec![1u64; 512 * 1024];
    let mut x = 1u64;
    loop {
        for v in buf.iter_mut() {
            x = x.wrapping_mul(6364136223846793005).wrapping_add(*v);
            *v = x;
        }
        std::hint::black_box(&buf);
    }
}

/// `tandem-bench load-fsync FILE`: writes 256 KiB and fdatasyncs, in a
/// loop over the first 64 MiB of FILE, until killed.
pub(crate) fn fsync_main(path: &Path) -> Result<()> {
    use std::os::unix::fs::FileExt;
    let f = std::fs::OpenOptions::new()
        .create(true)
        .write(true)
        .truncate(true)
        .open(path)?;
    let block = vec![0x5au8; 256 * 1024];
    let mut off = 0u64;
    loop {
        f.write_all_at(&block, off)?;
        f.sync_data()?;
        off = (off + block.len() as u64) % (64 << 20);
    }
}

/// What the probe saw over one variant.
#[derive(Debug, Clone, Default)]
pub(crate) struct ProbeReport {
    /// How late a 1 ms sleep woke, ms.
    pub(crate) late_p50_ms: f64,
    pub(crate) late_p99_ms: f64,
    pub(crate) late_max_ms: f64,
    /// Runnable tasks on the machine, mean of the samples.
    pub(crate) runnable: f64,
    /// The 1-minute load average at the end.
    pub(crate) loadavg: f64,
}

impl ProbeReport {
    pub(crate) fn describe(&self) -> String {
        format!(
            "1 ms sleep woke late by p50 {:.2} / p99 {:.2} / max {:.1} ms; {:.1} tasks runnable on average; load average {:.1}",
            self.late_p50_ms, self.late_p99_ms, self.late_max_ms, self.runnable, self.loadavg
        )
    }
}

/// A thread that measures the scheduler's wake-up delay while it runs.
pub(crate) struct Probe {
    stop: Arc<AtomicBool>,
    thread: JoinHandle<(Vec<f64>, Vec<f64>)>,
}

fn read_loadavg() -> (f64, f64) {
    let text = std::fs::read_to_string("/proc/loadavg").unwrap_or_default();
    let mut f = text.split_whitespace();
    let one = f.next().and_then(|v| v.parse().ok()).unwrap_or(f64::NAN);
    // "running/total": the running count includes the reader itself.
    let running = f
        .nth(2)
        .and_then(|v| v.split('/').next())
        .and_then(|v| v.parse::<f64>().ok())
        .map_or(f64::NAN, |r| r - 1.0);
    (one, running)
}

impl Probe {
    pub(crate) fn start() -> Self {
        let stop = Arc::new(AtomicBool::new(false));
        let s = stop.clone();
        let thread = std::thread::spawn(move || {
            let (mut late, mut runnable) = (Vec::new(), Vec::new());
            let mut last_sample = Instant::now();
            while !s.load(Ordering::Relaxed) {
                let t = Instant::now();
                std::thread::sleep(Duration::from_millis(1));
                let over = t.elapsed().saturating_sub(Duration::from_millis(1));
                late.push(over.as_secs_f64() * 1000.0);
                if last_sample.elapsed() >= Duration::from_millis(100) {
                    last_sample = Instant::now();
                    runnable.push(read_loadavg().1);
                }
            }
            (late, runnable)
        });
        Probe { stop, thread }
    }

    pub(crate) fn finish(self) -> ProbeReport {
        self.stop.store(true, Ordering::Relaxed);
        let (mut late, runnable) = self.thread.join().unwrap_or_default();
        late.sort_by(f64::total_cmp);
        let mean = |v: &[f64]| {
            let v: Vec<f64> = v.iter().copied().filter(|x| x.is_finite()).collect();
            v.iter().sum::<f64>() / v.len().max(1) as f64
        };
        ProbeReport {
            late_p50_ms: percentile(&late, 50.0),
            late_p99_ms: percentile(&late, 99.0),
            late_max_ms: late.last().copied().unwrap_or(f64::NAN),
            runnable: mean(&runnable),
            loadavg: read_loadavg().0,
        }
    }
}

impl Bench {
    /// Runs `f` idle or under the background load, with a probe beside it.
    pub(crate) fn with_load<T>(
        &self,
        mode: LoadMode,
        tag: &str,
        f: impl FnOnce() -> Result<T>,
    ) -> Result<(T, ProbeReport)> {
        let load = match mode {
            LoadMode::Idle => None,
            LoadMode::Loaded => Some(BackgroundLoad::start(
                self.cfg.load,
                &self.path(&format!("load-{tag}")),
            )?),
        };
        if load.is_some() {
            // Let the load's processes spread over the CPUs first.
            std::thread::sleep(Duration::from_millis(500));
        }
        let probe = Probe::start();
        let r = f();
        let report = probe.finish();
        drop(load);
        Ok((r?, report))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_probe_measures_and_the_loadavg_parses() {
        let p = Probe::start();
        std::thread::sleep(Duration::from_millis(30));
        let r = p.finish();
        assert!(r.late_p50_ms.is_finite() && r.late_p50_ms >= 0.0, "{r:?}");
        assert!(r.loadavg.is_finite(), "{r:?}");
    }
}
