//! Section 6, `slowlink`: Tandem over a slow link, with and without chunk
//! compression. The primary runs in one network namespace, the standby in
//! another, joined by a rate-limited veth pair and a delaying proxy
//! ([`super::netns`]). Per link and compression setting: the base copy of
//! an environment whose data compresses (text records loaded with
//! `db5.3_load`), the log's catch-up throughput after the standby was away
//! while more such records were loaded, and commit → durable delay at a
//! fixed commit rate (the bench workload, whose values are mostly random
//! bytes and do not compress).

use super::netns::{self, Link, LinkSpec, ADDR_PRIMARY, NS_PRIMARY};
use super::*;

/// One run on one link with one setting.
struct SlowRun {
    copy_secs: f64,
    copy_raw_mib: f64,
    copy_wire_mib: f64,
    catchup_log_mib: f64,
    catchup_secs: f64,
    catchup_wire_mib: f64,
    catchup_raw_mib: f64,
    delays_ms: Vec<f64>,
    unmatched: usize,
}

/// A `db5.3_load` input of about `mib` MiB of order records (JSON text,
/// as applications commonly store), keys from `first` on.
fn write_text_dump(path: &Path, mib: u64, first: u64) -> Result<()> {
    const CITIES: [&str; 8] = [
        "Springfield",
        "Riverside",
        "Fairview",
        "Greenville",
        "Madison",
        "Franklin",
        "Georgetown",
        "Clinton",
    ];
    const STATUS: [&str; 4] = ["pending", "paid", "shipped", "delivered"];
    let mut out = std::io::BufWriter::new(File::create(path)?);
    writeln!(out, "VERSION=3\nformat=print\ntype=btree\nHEADER=END")?;
    let mut x: u64 = 0x2545_f491_4f6c_dd1d ^ first;
    let mut written = 0u64;
    let mut k = first;
    while written < mib << 20 {
        x = x.wrapping_mul(6_364_136_223_846_793_005).wrapping_add(1);
        let r = x >> 33;
        let line = format!(
            " {{\"order\":{k},\"customer\":\"customer-{:06}\",\"city\":\"{}\",\"status\":\"{}\",\"items\":[{{\"sku\":\"SKU-{:05}\",\"qty\":{},\"price\":\"{}.{:02}\"}}],\"created\":\"2026-11-{:02}T{:02}:{:02}:00Z\"}}",
            r % 200_000,
            CITIES[(r % 8) as usize],
            STATUS[(r / 8 % 4) as usize],
            r / 32 % 50_000,
            r % 9 + 1,
            r % 500,
            r % 100,
            r % 28 + 1,
            r % 24,
            r / 24 % 60,
        );
        writeln!(out, " order-{k:012}\n{line}")?;
        written += line.len() as u64 + 20;
        k += 1;
    }
    writeln!(out, "DATA=END")?;
    out.flush()?;
    Ok(())
}

impl Bench {
    fn db_load(&self, env: &Path, dump: &Path, log: &Path) -> Result<()> {
        let mut c = Command::new("db5.3_load");
        c.arg("-h").arg(env).arg("-f").arg(dump).arg("text.db");
        run_cmd("db5.3_load", c, Duration::from_secs(600), log).map(|_| ())
    }

    /// The section's environment: the workload's seed plus `text.db`.
    fn make_text_env(&self) -> Result<PathBuf> {
        let env = self.path("slow-env");
        bdb::run_workload(
            &env,
            &WorkloadOptions {
                txns: 2000,
                ..self.stream_workload()
            },
        )?;
        let dump = self.path("slow-text.dump");
        write_text_dump(&dump, self.cfg.slow_mb, 0)?;
        self.db_load(&env, &dump, &self.path("slow-load.log"))?;
        self.checkpoint_and_archive(&env)?;
        // Removed before the runs, so that every run loads the same bytes.
        write_text_dump(&self.path("slow-more.dump"), self.cfg.slow_log_mb, 1 << 32)?;
        let _ = std::fs::remove_file(&dump);
        sync_all();
        Ok(env)
    }

    fn start_slow_standby(
        &self,
        link: &Link,
        dir: &Path,
        url: &str,
        compression: &str,
        tag: &str,
    ) -> Result<Proc> {
        let mut c = link.in_standby_ns(&harness::bin("tandem-standby"));
        c.arg("run")
            .arg("--dir")
            .arg(dir.join("standby"))
            .args(["--primary", url, "--name", STANDBY_NAME])
            .args(self.certs.args("standby"))
            .args(["--check-interval-secs", "0", "--scrub-interval-secs", "0"])
            .args(["--compression", compression]);
        Proc::spawn("tandem-standby", c, &dir.join(format!("standby-{tag}.log")))
    }

    /// One run; called on a thread inside the primary's namespace, so the
    /// primary, the workload and the status poller run there.
    fn slow_once(&self, link: &Link, env0: &Path, compression: &str, tag: &str) -> Result<SlowRun> {
        let dir = self.path(tag);
        remove_dir(&dir);
        std::fs::create_dir_all(&dir)?;
        let env = dir.join("env");
        copy_env(env0, &env)?;
        let metrics = free_addr()?;
        let primary = start_primary(
            &dir,
            &env,
            &self.certs,
            "0.0.0.0:0",
            &["--compression", compression, "--metrics-listen", &metrics],
        )?;
        let port = primary.addr.port();
        let local_url = format!("https://127.0.0.1:{port}");
        let ready = dir.join("proxy.addr");
        let mut proxy_cmd = link.in_standby_ns(&std::env::current_exe()?);
        proxy_cmd.arg("delay-proxy").args([
            "127.0.0.1:0".to_owned(),
            format!("{ADDR_PRIMARY}:{port}"),
            link.one_way().as_micros().to_string(),
            ready.display().to_string(),
        ]);
        let mut proxy = Proc::spawn("delay-proxy", proxy_cmd, &dir.join("proxy.log"))?;
        let mut proxy_addr = String::new();
        wait_while_running(
            "the delay proxy",
            Duration::from_secs(30),
            &mut proxy,
            || {
                proxy_addr = std::fs::read_to_string(&ready).unwrap_or_default();
                Ok(!proxy_addr.is_empty())
            },
        )?;
        let url = format!("https://{proxy_addr}");
        let sdir = dir.join("standby");
        let wire = |m: &BTreeMap<String, f64>, k: &str| m.get(k).copied().unwrap_or(0.0) / MIB;

        // Base copy.
        sync_all();
        let started = Instant::now();
        let mut standby = self.start_slow_standby(link, &dir, &url, compression, "copy")?;
        wait_caught_up_running(&sdir, &env, Duration::from_secs(1800), &mut standby)?;
        let copy_secs = started.elapsed().as_secs_f64();
        let m0 = scrape_metrics(&metrics)?;

        // Commit → durable at a fixed rate.
        let lg_max = env_lg_max(&env)?;
        let lsn_file = dir.join("commits.lsn");
        File::create(&lsn_file)?;
        let stop = Arc::new(AtomicBool::new(false));
        let tail = spawn_commit_tail(lsn_file.clone(), stop.clone());
        let latest = Arc::new(Mutex::new(LogPosition::ZERO));
        let poller = spawn_ack_poller(
            local_url,
            self.tls(),
            Duration::from_millis(1),
            stop.clone(),
            latest.clone(),
        );
        let secs = self.cfg.lag_secs;
        let opts = WorkloadOptions {
            rate: self.cfg.lag_rate,
            seconds: Some(secs),
            lsn_log: Some(lsn_file),
            ..self.stream_workload()
        };
        let mut w = Proc::spawn("workload", opts.command(&env), &dir.join("workload.log"))?;
        let ran = w.wait_exit(Duration::from_secs(secs + 120)).and_then(|st| {
            anyhow::ensure!(st.success(), "workload failed: {}", w.log_text());
            let end = primary_log_end(&env)?;
            wait_for(
                "the final acknowledgement",
                Duration::from_secs(300),
                || Ok(latest.lock().map(|l| *l >= end).unwrap_or(false)),
            )
        });
        stop.store(true, Ordering::Relaxed);
        let commits = tail.join().map_err(|_| anyhow!("tail thread panicked"))??;
        let samples = poller.join().map_err(|_| anyhow!("poller panicked"))??;
        ran?;
        let (mut delays, unmatched) = commit_delays(&commits, &samples, |s| s.acked);
        delays.sort_by(f64::total_cmp);

        // The log's throughput: the standby is away while more text is
        // loaded, then catches up.
        wait_caught_up_running(&sdir, &env, Duration::from_secs(600), &mut standby)?;
        standby.stop(Duration::from_secs(60))?;
        let m1 = scrape_metrics(&metrics)?;
        let before = primary_log_end(&env)?;
        self.db_load(
            &env,
            &self.path("slow-more.dump"),
            &dir.join("load-more.log"),
        )?;
        let after = primary_log_end(&env)?;
        sync_all();
        let mut standby = self.start_slow_standby(link, &dir, &url, compression, "catchup")?;
        // Timed from the first log the standby reports durable past where
        // it stopped, so its start and handshake do not count against the
        // link; the bytes counted start there too.
        let mut first: Option<(Instant, LogPosition)> = None;
        wait_while_running(
            "the standby to catch up",
            Duration::from_secs(1800),
            &mut standby,
            || {
                let st = standby_status(&sdir)?;
                let durable = lsn_of(&st["durable_lsn"]);
                if first.is_none() && durable > before {
                    first = Some((Instant::now(), durable));
                }
                Ok(st["recoverable"] == true && durable == after)
            },
        )?;
        let (started, from) = first.context("the standby never moved")?;
        let catchup_secs = started.elapsed().as_secs_f64();
        let m2 = scrape_metrics(&metrics)?;
        let raw = "tandem_primary_chunk_payload_bytes_total";
        let sent = "tandem_primary_chunk_wire_bytes_total";
        drop(standby);
        drop(proxy);
        drop(primary);
        remove_dir(&dir);
        Ok(SlowRun {
            copy_secs,
            copy_raw_mib: wire(&m0, raw),
            copy_wire_mib: wire(&m0, sent),
            catchup_log_mib: log_mib_between(from, after, lg_max),
            catchup_secs,
            catchup_wire_mib: wire(&m2, sent) - wire(&m1, sent),
            catchup_raw_mib: wire(&m2, raw) - wire(&m1, raw),
            delays_ms: delays,
            unmatched,
        })
    }

    pub(crate) fn section_slowlink(&self) -> Result<Section> {
        let cfg = &self.cfg;
        let env = self.make_text_env()?;
        let env_mib = dir_mib(&env)?;
        let links = [
            LinkSpec {
                mbit: 100,
                rtt_ms: 20.0,
            },
            LinkSpec {
                mbit: 1000,
                rtt_ms: 1.0,
            },
        ];
        let mut s = Section::default();
        let _ = writeln!(
            s.md,
            "## 6. Slow links\n\nThe primary in network namespace `{NS_PRIMARY}`, the standby in `{}`, joined by a veth pair \
             (198.18.0.1–198.18.0.2) with `tbf` at the link's rate on both ends; a user-space proxy in the standby's namespace \
             holds every byte half the round trip in each direction (no netem on this kernel). Environment: {env_mib:.0} MiB \
             (`text.db`: JSON order records loaded with `db5.3_load`, plus the workload's seed). Base copy = standby start until it \
             holds the primary's whole log. Catch-up = {} MiB more of such records loaded while the standby is stopped, then the \
             time from the first new log it reports durable until it holds the whole log again (log MiB/s; its status \
             file is refreshed every 200 ms). Commit → durable = the bench workload \
             (random-filled values) at {} commits/s for {} s, as in section 2. {} run(s) each; medians.\n",
            netns::NS_STANDBY,
            cfg.slow_log_mb,
            cfg.lag_rate,
            cfg.lag_secs,
            cfg.runs
        );
        let _ = writeln!(
            s.md,
            "| link | compression | base copy s | MiB/s | sent MiB (of) | catch-up log MiB/s | sent MiB (of) | commit → durable p50 / p99 ms |\n|---|---|---|---|---|---|---|---|"
        );
        for spec in links {
            let link = Link::create(spec)?;
            let mut by_mode: BTreeMap<&str, Vec<SlowRun>> = BTreeMap::new();
            for run in 0..cfg.runs {
                for compression in ["off", "auto"] {
                    let tag = format!("slow-{}-{compression}-{run}", spec.mbit);
                    let r = std::thread::scope(|sc| {
                        sc.spawn(|| {
                            netns::enter(NS_PRIMARY)?;
                            self.slow_once(&link, &env, compression, &tag)
                        })
                        .join()
                        .map_err(|_| anyhow!("slow-link run panicked"))?
                    })?;
                    progress(format!(
                        "slowlink {} compression {compression}: copy {:.1} s ({:.0} of {:.0} MiB sent), catch-up {:.1} MiB/s, p99 {:.1} ms",
                        spec.label(),
                        r.copy_secs,
                        r.copy_wire_mib,
                        r.copy_raw_mib,
                        r.catchup_log_mib / r.catchup_secs,
                        percentile(&r.delays_ms, 99.0)
                    ));
                    by_mode.entry(compression).or_default().push(r);
                }
            }
            drop(link);
            let mut copy_rate = BTreeMap::new();
            let mut log_rate = BTreeMap::new();
            for (mode, runs) in &by_mode {
                let col = |f: &dyn Fn(&SlowRun) -> f64| runs.iter().map(f).collect::<Vec<f64>>();
                let p50 = col(&|r| percentile(&r.delays_ms, 50.0));
                let p99 = col(&|r| percentile(&r.delays_ms, 99.0));
                let unmatched: usize = runs.iter().map(|r| r.unmatched).sum();
                let copy = col(&|r| env_mib / r.copy_secs);
                let catchup = col(&|r| r.catchup_log_mib / r.catchup_secs);
                copy_rate.insert(*mode, median(&copy));
                log_rate.insert(*mode, median(&catchup));
                let _ = writeln!(
                    s.md,
                    "| {} | {mode} | {} | {} | {:.0} ({:.0}) | {} | {:.0} ({:.0}) | {:.1} / {:.1}{} |",
                    spec.label(),
                    spread(&col(&|r| r.copy_secs), 1),
                    spread(&copy, 1),
                    median(&col(&|r| r.copy_wire_mib)),
                    median(&col(&|r| r.copy_raw_mib)),
                    spread(&catchup, 1),
                    median(&col(&|r| r.catchup_wire_mib)),
                    median(&col(&|r| r.catchup_raw_mib)),
                    median(&p50),
                    median(&p99),
                    if unmatched > 0 {
                        format!(" ({unmatched} never acknowledged!)")
                    } else {
                        String::new()
                    }
                );
                if *mode == "auto" && spec.mbit == 100 {
                    let m = median(&p99);
                    let goal = 20.0 + spec.rtt_ms;
                    s.targets.push(Target {
                        what: format!(
                            "p99 commit → durable at {} commits/s, {}",
                            cfg.lag_rate,
                            spec.label()
                        ),
                        goal: format!("< 20 ms + RTT = {goal:.0} ms"),
                        measured: format!("{m:.1} ms (p50 {:.1} ms)", median(&p50)),
                        met: Some(m < goal && unmatched == 0),
                    });
                }
            }
            let (off_c, on_c) = (copy_rate["off"], copy_rate["auto"]);
            let (off_l, on_l) = (log_rate["off"], log_rate["auto"]);
            // "No slower" on the fast link, with 10% for this machine's noise.
            let (goal, need) = if spec.mbit == 100 {
                ("≥ 2× uncompressed", 2.0)
            } else {
                ("≥ uncompressed (within 10%)", 0.9)
            };
            for (what, off, on) in [("base copy", off_c, on_c), ("log catch-up", off_l, on_l)] {
                s.targets.push(Target {
                    what: format!("{what} with zstd, {}", spec.label()),
                    goal: goal.into(),
                    measured: format!("{:.2}× ({on:.1} vs {off:.1} MiB/s)", on / off),
                    met: Some(on / off >= need),
                });
            }
        }
        Ok(s)
    }
}

fn dir_mib(dir: &Path) -> Result<f64> {
    let mut total = 0u64;
    for e in std::fs::read_dir(dir)? {
        let e = e?;
        let name = e.file_name();
        if !name.to_string_lossy().starts_with("__db") {
            total += e.metadata()?.len();
        }
    }
    Ok(total as f64 / MIB)
}
