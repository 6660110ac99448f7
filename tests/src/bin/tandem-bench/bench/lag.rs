//! Section 2, `lag`: commit-to-durable-on-standby delay per commit.

use super::*;
use rustix::event::{poll, PollFd, PollFlags, Timespec};

/// Follows the workload's `-L` file with inotify and timestamps each line
/// as it appears.
pub(crate) fn spawn_commit_tail(
    path: PathBuf,
    stop: Arc<AtomicBool>,
) -> JoinHandle<Result<Vec<CommitSeen>>> {
    std::thread::spawn(move || {
        use rustix::fs::inotify::{self, CreateFlags, WatchFlags};
        let fd =
            inotify::init(CreateFlags::NONBLOCK | CreateFlags::CLOEXEC).context("inotify_init1")?;
        inotify::add_watch(&fd, &path, WatchFlags::MODIFY)
            .with_context(|| format!("inotify_add_watch {}", path.display()))?;
        let mut file = File::open(&path)?;
        let mut out = Vec::new();
        let mut partial = String::new();
        let mut events = [0u8; 4096];
        let mut buf = vec![0u8; 1 << 16];
        let result = (|| -> Result<()> {
            loop {
                let stopping = stop.load(Ordering::Relaxed);
                // Woken by a write to the file, or every 20 ms to check `stop`.
                let mut pfd = [PollFd::new(&fd, PollFlags::IN)];
                let tick = Timespec {
                    tv_sec: 0,
                    tv_nsec: 20_000_000,
                };
                let _ = poll(&mut pfd, Some(&tick));
                // Drain the events (non-blocking: EAGAIN ends it); the file
                // itself says what changed.
                while matches!(rustix::io::read(&fd, &mut events[..]), Ok(n) if n > 0) {}
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
        result.map(|()| out)
    })
}

/// Asks the primary for its status every `every` over one mTLS connection
/// and records the standby's acknowledged position.
/// `latest` always holds the newest acknowledged position seen.
pub(crate) fn spawn_ack_poller(
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

pub(crate) struct LagRun {
    /// Ascending.
    pub(crate) delays_ms: Vec<f64>,
    /// Until the primary's end of log (its log watcher) covered the commit; ascending.
    pub(crate) seen_ms: Vec<f64>,
    pub(crate) unmatched: usize,
    pub(crate) commits_per_sec: f64,
    pub(crate) log_mib_per_sec: f64,
    pub(crate) max_lag_mib: f64,
    pub(crate) catch_up_secs: f64,
}

/// A primary and a caught-up standby on a fresh copy of the seed.
pub(crate) struct Pair {
    pub(crate) dir: PathBuf,
    pub(crate) env: PathBuf,
    pub(crate) standby_dir: PathBuf,
    pub(crate) primary: Primary,
    pub(crate) standby: Proc,
    /// Removed after the processes above are stopped (fields drop in order).
    pub(crate) _tmpfs: Option<tempfile::TempDir>,
}

impl Bench {
    /// `on_tmpfs`: the standby's directory on tmpfs, a diagnostic that takes
    /// its fsyncs off the disk the primary writes.
    pub(crate) fn start_pair(&self, seed: &Seed, tag: &str, on_tmpfs: bool) -> Result<Pair> {
        let dir = self.path(tag);
        remove_dir(&dir);
        std::fs::create_dir_all(&dir)?;
        let env = dir.join("env");
        copy_env(&seed.env, &env)?;
        let tmpfs = if on_tmpfs {
            Some(tmpfs_dir().context("no tmpfs with 4 GiB free (BENCH_TMPFS or /dev/shm)")?)
        } else {
            None
        };
        let standby_dir = tmpfs
            .as_ref()
            .map(|t| t.path().join("standby"))
            .unwrap_or_else(|| dir.join("standby"));
        let (primary, standby) = start_caught_up(
            &dir,
            &env,
            &standby_dir,
            &self.certs,
            Duration::from_secs(120),
        )?;
        Ok(Pair {
            dir,
            env,
            standby_dir,
            primary,
            standby,
            _tmpfs: tmpfs,
        })
    }

    pub(crate) fn lag_once(
        &self,
        seed: &Seed,
        rate: u64,
        on_tmpfs: bool,
        tag: &str,
    ) -> Result<LagRun> {
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
            wait_caught_up_running(
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

    pub(crate) fn section_lag(&self, seed: &Seed) -> Result<Section> {
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
