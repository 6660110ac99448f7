//! Section 7, `large`: an environment of `BENCH_LARGE_GB` GiB (more than a
//! busy machine's page cache holds comfortably): base copy against cp and
//! rsync over ssh, a rebase and a failover promotion, with the resident
//! memory of both daemons sampled throughout to show it does not grow with
//! the environment.
//!
//! Disk is the constraint: the environment is built in rounds (checkpoint
//! and `db_archive -d` after each, so its log never piles up), every copy is
//! deleted before the next is made, and the primary's environment goes
//! once the primary is killed. A rebase stages a second copy beside the
//! mirror while the environment exists (3× the environment); every other
//! step needs at most 2×. The rebase is skipped when 3× does not fit, and
//! the section refuses to start when 2× does not (with [`RESERVE`] left
//! free either way).

use super::*;

/// Bytes left free on the bench's file system, whatever the size asked.
const RESERVE: u64 = 5 << 30;
/// Environment bytes written per build round (its log is then archived).
const ROUND: u64 = 512 << 20;

/// Peak resident memory of a daemon over one step, sampled.
#[derive(Default, Clone, Copy)]
struct Rss {
    primary: f64,
    standby: f64,
}

impl Rss {
    fn sample(&mut self, primary: u32, standby: u32) {
        if let Ok(m) = proc_rss_mib(primary) {
            self.primary = self.primary.max(m);
        }
        if let Ok(m) = proc_rss_mib(standby) {
            self.standby = self.standby.max(m);
        }
    }
}

struct Row {
    what: String,
    secs: f64,
    note: String,
}

/// What the section will do with the disk it has.
struct Plan {
    size_mb: u64,
    /// Whether the rebase step runs: it stages a whole second base beside
    /// the mirror while the primary's environment still exists (3× the
    /// environment); every other step needs at most 2×.
    rebase: bool,
    /// The disk arithmetic, for the report.
    why: String,
}

/// Bytes the section needs free for an environment of `size`: its peak
/// (`copies` environments at once), one round of log, and [`RESERVE`].
fn needed(size: u64, copies: u64) -> u64 {
    copies * size + ROUND + RESERVE
}

impl Bench {
    /// The size to run at and whether the rebase fits, from the setting and
    /// the free space; an error (before anything is written) when even the
    /// steps without the rebase do not fit.
    ///
    /// The peaks: copying (the environment and one copy), base copy (the
    /// environment and the mirror), rebase (both and a staged base). The
    /// environment is removed once the primary is killed, so the readiness
    /// check (the mirror and its clone), promote (the mirror in place) and
    /// the baseline (`db_recover -c` and `db_verify` of the promoted mirror,
    /// which holds the same files and log) need at most 2×.
    fn large_plan(&self) -> Result<Plan> {
        let size_mb = (self.cfg.large_gb * 1024.0) as u64;
        let size = size_mb << 20;
        let free = free_bytes(self.root.path())?;
        let gib = |b: u64| b as f64 / MIB / 1024.0;
        let (with, without) = (needed(size, 3), needed(size, 2));
        let line = format!(
            "{:.1} GiB free at the start; the peak with the rebase needs {:.1} GiB, without it {:.1} GiB (3× or 2× the environment, {} MiB of log, {} GiB left free)",
            gib(free),
            gib(with),
            gib(without),
            ROUND >> 20,
            RESERVE >> 30
        );
        if free >= with {
            return Ok(Plan {
                size_mb,
                rebase: true,
                why: line,
            });
        }
        if free >= without {
            return Ok(Plan {
                size_mb,
                rebase: false,
                why: format!("{line}: the rebase step is skipped"),
            });
        }
        bail!(
            "the large section refuses to start with {:.1} GiB: {line}. Free disk, or set BENCH_LARGE_GB to at most {:.1}",
            self.cfg.large_gb,
            gib(free.saturating_sub(ROUND + RESERVE) / 2)
        )
    }

    /// Builds the large environment in rounds, archiving the log after each.
    fn make_large_env(&self, env: &Path, size_mb: u64) -> Result<Vec<(String, u64)>> {
        let started = Instant::now();
        let total_txns = (size_mb << 20) / (3 * 4096);
        let per_round = (ROUND / (3 * 4096)).max(1);
        let mut done = 0;
        while done < total_txns {
            let txns = per_round.min(total_txns - done);
            bdb::run_workload(env, &big_values(txns))?;
            self.checkpoint_and_archive(env)?;
            done += txns;
            progress(format!(
                "large environment: {done}/{total_txns} transactions, {:.0} s",
                started.elapsed().as_secs_f64()
            ));
        }
        sync_all();
        env_files(env)
    }

    pub(crate) fn section_large(&self) -> Result<Section> {
        let plan = self.large_plan()?;
        progress(format!(
            "large: {} MiB environment; {}",
            plan.size_mb, plan.why
        ));
        let mut s = Section::default();
        let env = self.path("large-env");
        let disk = DiskWatch::start(self.root.path());
        let result = self.large_runs(&env, &plan, &mut s);
        let (free_at_start, least_free) = disk.stop();
        // Everything goes, whatever happened: the disk is shared.
        for d in ["large-env", "large-copy", "large-standby"] {
            remove_dir(&self.path(d));
        }
        let _ = writeln!(
            s.md,
            "Disk: {:.1} GiB free at the start, {:.1} GiB at the least (sampled every 200 ms): the section used at most {:.1} GiB (other work on the machine counts too).\n",
            free_at_start as f64 / MIB / 1024.0,
            least_free as f64 / MIB / 1024.0,
            free_at_start.saturating_sub(least_free) as f64 / MIB / 1024.0
        );
        result.map(|()| s)
    }

    fn large_runs(&self, env: &Path, plan: &Plan, s: &mut Section) -> Result<()> {
        let files = self.make_large_env(env, plan.size_mb)?;
        let bytes: u64 = files.iter().map(|f| f.1).sum();
        let gib = bytes as f64 / MIB / 1024.0;
        let big = BigEnv {
            env: env.to_path_buf(),
            files,
            bytes,
            primary: None,
            standby: None,
            copy_secs: None,
        };
        let mut rows = self.large_copies(&big)?;
        let mut primary = start_primary(self.root.path(), env, &self.certs, "127.0.0.1:0", &[])?;
        let mirror = self.path("large-standby");
        drop_caches();
        let (copy_secs, copy_rss, standby_hwm) = self.large_copy(&big, &primary, &mirror)?;
        rows.push(Row {
            what: "**Tandem base copy** (standby started → recoverable, lag 0)".into(),
            secs: copy_secs,
            note: format!(
                "peak RSS primary {:.0} MiB, standby {:.0} MiB (VmHWM {standby_hwm:.0})",
                copy_rss.primary, copy_rss.standby
            ),
        });
        let mut peak_rss = copy_rss.primary.max(copy_rss.standby);
        if plan.rebase {
            let (secs, rss, sent, reused) = self.large_rebase(&big, &primary, &mirror)?;
            peak_rss = peak_rss.max(rss.primary).max(rss.standby);
            rows.push(Row {
                what: "Tandem rebase after ~0.5% of pages changed (standby started → rebased)"
                    .into(),
                secs,
                note: format!(
                    "{:.0} MiB sent, {:.0} MiB reused; peak RSS primary {:.0} MiB, standby {:.0} MiB",
                    sent as f64 / MIB,
                    reused as f64 / MIB,
                    rss.primary,
                    rss.standby
                ),
            });
        }
        let primary_hwm = proc_hwm_mib(primary.proc.pid()).unwrap_or(f64::NAN);
        primary.proc.kill9()?;
        // The primary's machine is gone, and so is its environment: what
        // follows needs only the mirror (and the disk).
        remove_dir(env);
        let p = self.large_promotion(&mirror)?;
        rows.extend(p.rows());

        let _ = writeln!(
            s.md,
            "## 7. Large environment ({gib:.1} GiB)\n\n{} files, {bytes} bytes ({}). Page cache dropped before each step; one run each. \
             RSS = largest VmRSS of the daemon sampled every 100 ms during the step (/proc/PID/status). The primary's environment is \
             removed when the primary is killed; the baseline runs on the mirror after promote (the same database files and log, BDB's \
             recovery replays the same log).\n",
            big.files.len(),
            plan.why
        );
        let _ = writeln!(s.md, "| step | time s | MiB/s | notes |\n|---|---|---|---|");
        for r in &rows {
            let _ = writeln!(
                s.md,
                "| {} | {:.2} | {:.0} | {} |",
                r.what,
                r.secs,
                bytes as f64 / MIB / r.secs,
                r.note
            );
        }
        let _ = writeln!(
            s.md,
            "\nPeak RSS (VmHWM) of tandem-primary over the whole section: {primary_hwm:.0} MiB.\n\n{}",
            p.detail()
        );
        let cp = rows[0].secs;
        s.targets.push(Target {
            what: format!("base copy of {gib:.1} GiB vs cp -r + sync (cold)"),
            goal: "≤ 1.25× cp's time".into(),
            measured: format!("{:.2}× ({copy_secs:.1} vs {cp:.1} s)", copy_secs / cp),
            met: Some(copy_secs <= 1.25 * cp),
        });
        s.targets.extend(p.targets(gib));
        s.targets.push(Target {
            what: format!("daemon memory with {gib:.1} GiB"),
            goal: "flat (≤ 256 MiB RSS, independent of size)".into(),
            measured: format!("peak {peak_rss:.0} MiB"),
            met: Some(peak_rss <= 256.0),
        });
        Ok(())
    }

    /// `cp` and `rsync` over ssh of the environment, cold, each copy
    /// removed after it.
    fn large_copies(&self, big: &BigEnv) -> Result<Vec<Row>> {
        let sshd = Sshd::start(&self.path("sshd-large"))
            .map_err(|e| progress(format!("large: no sshd, rsync over ssh skipped: {e:#}")))
            .ok();
        let dest = self.path("large-copy");
        let mut rows = Vec::new();
        for method in ["cp", "rsync-ssh"] {
            if method == "rsync-ssh" && sshd.is_none() {
                continue;
            }
            drop_caches();
            let mut fig = CopyFigures::default();
            self.copy_once(method, big, sshd.as_ref(), &dest, &mut fig)?;
            remove_dir(&dest);
            let secs = fig.secs.last().copied().unwrap_or(f64::NAN);
            progress(format!("large {method}: {secs:.1} s"));
            rows.push(Row {
                what: method_label(method).to_owned(),
                secs,
                note: String::new(),
            });
        }
        Ok(rows)
    }

    /// The readiness check, the estimate after it, the failover promote
    /// (page cache dropped), and BDB's own work on the promoted mirror.
    fn large_promotion(&self, mirror: &Path) -> Result<Promotion> {
        // The readiness check a running standby makes every few minutes:
        // what it verified, promote does not verify again.
        let check_started = Instant::now();
        let mut check = Command::new(harness::bin("tandem-standby"));
        check.arg("check").arg("--dir").arg(mirror);
        run_cmd(
            "tandem-standby check",
            check,
            Duration::from_secs(3 * 3600),
            &self.path("large-check.log"),
        )?;
        let check_secs = check_started.elapsed().as_secs_f64();
        let status = standby_status(mirror)?;
        progress(format!(
            "large check: {check_secs:.1} s; estimate {} s ({})",
            status["promotion_estimate_seconds"], status["promotion_estimate_parts"]
        ));
        drop_caches();
        let (promote_secs, report) = self.large_promote(mirror)?;
        // BDB's own work, as cold as promote's, on the same files: the
        // mirror after promote (its copy would need the disk twice).
        drop_caches();
        let work = self.path("large-copy");
        std::fs::create_dir_all(&work)?;
        let baseline = promote::bdb_recover_and_verify(mirror, &work);
        remove_dir(&work);
        let (base_recover, base_verify) = baseline?;
        progress(format!(
            "large baseline: recover {base_recover:.2} s, verify {base_verify:.1} s"
        ));
        Ok(Promotion {
            check_secs,
            status,
            promote_secs,
            report,
            base_recover,
            base_verify,
        })
    }
    /// A fresh standby copies the environment; returns seconds, peak RSS of
    /// both daemons, and the standby's VmHWM.
    fn large_copy(
        &self,
        big: &BigEnv,
        primary: &Primary,
        mirror: &Path,
    ) -> Result<(f64, Rss, f64)> {
        remove_dir(mirror);
        let metrics = free_addr()?;
        let started = Instant::now();
        let mut sb = start_standby(
            self.root.path(),
            mirror,
            &primary.url(),
            &self.certs,
            &[
                "--metrics-listen",
                &metrics,
                "--scrub-interval-secs",
                "0",
                "--check-interval-secs",
                "0",
            ],
        )?;
        let (pp, sp) = (primary.proc.pid(), sb.pid());
        let mut rss = Rss::default();
        let mut last = Instant::now() - Duration::from_secs(1);
        wait_while_running(
            "the large base copy",
            copy_timeout(big.bytes),
            &mut sb,
            || {
                rss.sample(pp, sp);
                // Metrics are scraped every second; RSS on every poll.
                if last.elapsed() < Duration::from_secs(1) {
                    std::thread::sleep(Duration::from_millis(100));
                    return Ok(false);
                }
                last = Instant::now();
                let m = scrape_metrics(&metrics)?;
                Ok(m.get("tandem_standby_recoverable") == Some(&1.0)
                    && m.get("tandem_standby_connected") == Some(&1.0)
                    && m.get("tandem_standby_lag_bytes") == Some(&0.0))
            },
        )?;
        let took = started.elapsed().as_secs_f64();
        let hwm = proc_hwm_mib(sp).unwrap_or(f64::NAN);
        sb.stop(Duration::from_secs(120))?;
        let st = standby_status(mirror)?;
        if st["recoverable"] != true {
            bail!("the large copy is not recoverable: {st}");
        }
        progress(format!("large Tandem copy: {took:.1} s"));
        Ok((took, rss, hwm))
    }

    /// Changes about 0.5% of the pages, checkpoints, and lets the standby
    /// rebase; returns seconds, peak RSS, bytes sent and reused.
    fn large_rebase(
        &self,
        big: &BigEnv,
        primary: &Primary,
        mirror: &Path,
    ) -> Result<(f64, Rss, u64, u64)> {
        let pages = big.bytes / 4096;
        bdb::run_workload(
            &big.env,
            &WorkloadOptions {
                txns: (pages / 200 / 17).max(100),
                value_len: 4000,
                updates: 7,
                lg_max: BIG_LG_MAX,
                cache_mb: Some(256),
                checkpoint_every: 500,
                quiet: true,
                ..Default::default()
            },
        )?;
        self.checkpoint(&big.env)?;
        drop_caches();
        let since_ms = tandem_shared::now_unix_ms();
        let started = Instant::now();
        let mut sb = start_standby(
            self.root.path(),
            mirror,
            &primary.url(),
            &self.certs,
            &[
                "--rebase-after-secs",
                "1",
                "--scrub-interval-secs",
                "0",
                "--check-interval-secs",
                "0",
            ],
        )?;
        let (pp, sp) = (primary.proc.pid(), sb.pid());
        let mut rss = Rss::default();
        let mut report = serde_json::Value::Null;
        let mut took = 0.0;
        wait_while_running("the large rebase", copy_timeout(big.bytes), &mut sb, || {
            rss.sample(pp, sp);
            std::thread::sleep(Duration::from_millis(100));
            let st = standby_status(mirror)?;
            let r = &st["last_rebase"];
            if r["unix_ms"].as_u64().unwrap_or(0) >= since_ms {
                report = r.clone();
                took = started.elapsed().as_secs_f64();
                return Ok(true);
            }
            Ok(false)
        })?;
        wait_caught_up_running(mirror, &big.env, Duration::from_secs(600), &mut sb)?;
        sb.stop(Duration::from_secs(120))?;
        let sent = report["sent_bytes"]
            .as_u64()
            .context("last_rebase.sent_bytes")?;
        let reused = report["reused_bytes"].as_u64().unwrap_or(0);
        progress(format!(
            "large rebase: {took:.1} s, {sent} bytes sent, {reused} reused"
        ));
        Ok((took, rss, sent, reused))
    }

    /// `tandem-standby promote` of the stopped mirror, the primary gone:
    /// wall seconds and the report.
    fn large_promote(&self, mirror: &Path) -> Result<(f64, serde_json::Value)> {
        let mut c = Command::new(harness::bin("tandem-standby"));
        c.arg("promote").arg("--dir").arg(mirror).arg("--json");
        let started = Instant::now();
        let out = cmd_stdout(
            "tandem-standby promote",
            c,
            Duration::from_secs(3 * 3600),
            &self.path("large-promote.log"),
        )?;
        let wall = started.elapsed().as_secs_f64();
        let v: serde_json::Value =
            serde_json::from_str(&out).with_context(|| format!("promote output: {out}"))?;
        if v["kind"] != "failover" {
            bail!("expected a failover, promote did: {out}");
        }
        progress(format!("large promote: {wall:.3} s, {out}"));
        Ok((wall, v))
    }
}

/// The promotion figures of the large section.
struct Promotion {
    check_secs: f64,
    /// `tandem-standby status` after the check.
    status: serde_json::Value,
    /// promote's wall time, and its `--json` report.
    promote_secs: f64,
    report: serde_json::Value,
    base_recover: f64,
    base_verify: f64,
}

impl Promotion {
    fn estimate(&self) -> f64 {
        self.status["promotion_estimate_seconds"]
            .as_f64()
            .unwrap_or(f64::NAN)
    }

    fn phase(&self, k: &str) -> f64 {
        self.report["phases"][k].as_f64().unwrap_or(f64::NAN)
    }

    fn baseline(&self) -> f64 {
        self.base_recover + self.base_verify
    }

    fn rows(&self) -> Vec<Row> {
        let check = &self.status["last_check"];
        vec![
            Row {
                what: "`tandem-standby check` (clone, recovery, db_verify of every database, verified record)".into(),
                secs: self.check_secs,
                note: format!(
                    "recovery {:.2} s ({:.2} s CPU) of {:.1} MiB of log, verify {:.1} s; uncached reads of the log {:.3} s, of the {} pages it names {:.3} s; unchanged-file proof {:.3} s, a durable write {:.4} s; promotion estimate after it {:.3} s",
                    check["recovery_seconds"].as_f64().unwrap_or(f64::NAN),
                    check["recovery_cpu_seconds"].as_f64().unwrap_or(f64::NAN),
                    check["log_bytes"].as_f64().unwrap_or(f64::NAN) / MIB,
                    check["verify_seconds"].as_f64().unwrap_or(f64::NAN),
                    check["cold_log_seconds"].as_f64().unwrap_or(f64::NAN),
                    check["cold_pages"],
                    check["cold_page_seconds"].as_f64().unwrap_or(f64::NAN),
                    check["selection_seconds"].as_f64().unwrap_or(f64::NAN),
                    check["durable_write_seconds"].as_f64().unwrap_or(f64::NAN),
                    self.estimate()
                ),
            },
            Row {
                what: "`tandem-standby promote` (failover, page cache dropped)".into(),
                secs: self.promote_secs,
                note: format!(
                    "phases: {}; {} databases verified, {} unchanged",
                    promote::PHASES
                        .iter()
                        .map(|k| format!("{k} {:.3} s", self.phase(k)))
                        .collect::<Vec<_>>()
                        .join(", "),
                    self.report["databases_verified"],
                    self.report["databases_unchanged"]
                ),
            },
            Row {
                what: "Baseline: `db5.3_recover -c` + `db5.3_verify` of each database, on the mirror after promote (page cache dropped)".into(),
                secs: self.baseline(),
                note: format!(
                    "recover {:.2} s, verify {:.1} s",
                    self.base_recover, self.base_verify
                ),
            },
        ]
    }

    /// The estimate's parts and promote's report, for the record.
    fn detail(&self) -> String {
        format!(
            "Estimate after the check: {:.3} s, parts {}; replay {} bytes. Promote's report: `{}`.\n",
            self.estimate(),
            self.status["promotion_estimate_parts"],
            self.status["replay_log_bytes"],
            self.report
        )
    }

    fn targets(&self, gib: f64) -> Vec<Target> {
        let (promote, baseline, estimate) = (self.promote_secs, self.baseline(), self.estimate());
        let limit = if gib <= 1.5 { 1.5 } else { 3.0 };
        let err = (estimate - promote) / promote;
        vec![
            Target {
                what: format!("failover promote of {gib:.1} GiB vs BDB on a copy (cold)"),
                goal: "≤ 1.5× baseline + 0.3 s".into(),
                measured: format!(
                    "{promote:.2} s vs {baseline:.1} s (recovery {:.2} vs {:.2}, verify {:.2} vs {:.1})",
                    self.phase("recovery"),
                    self.base_recover,
                    self.phase("verify"),
                    self.base_verify
                ),
                met: Some(promote <= 1.5 * baseline + 0.3),
            },
            Target {
                what: format!("failover promote of {gib:.1} GiB after a readiness check (cold)"),
                goal: format!("≤ {limit} s (issue #21)"),
                measured: format!("{promote:.2} s (verify {:.3} s)", self.phase("verify")),
                met: Some(promote <= limit),
            },
            Target {
                what: format!("status promotion estimate, {gib:.1} GiB failover (cold)"),
                goal: promote::ESTIMATE_GOAL.into(),
                measured: format!(
                    "{estimate:.3} s estimated, {promote:.3} s taken ({:+.0}%{})",
                    100.0 * err,
                    if err.abs() <= 0.2 { "" } else { ", beyond 20 %" }
                ),
                met: Some(promote::estimate_within(estimate, promote)),
            },
        ]
    }
}

/// The least free space of a file system while it runs (sampled every
/// 200 ms in a thread).
struct DiskWatch {
    start: u64,
    stop: std::sync::Arc<std::sync::atomic::AtomicBool>,
    thread: std::thread::JoinHandle<u64>,
}

impl DiskWatch {
    fn start(path: &Path) -> Self {
        let start = free_bytes(path).unwrap_or(0);
        let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
        let (flag, path) = (stop.clone(), path.to_path_buf());
        let thread = std::thread::spawn(move || {
            let mut least = start;
            while !flag.load(std::sync::atomic::Ordering::Relaxed) {
                least = least.min(free_bytes(&path).unwrap_or(least));
                std::thread::sleep(Duration::from_millis(200));
            }
            least
        });
        Self {
            start,
            stop,
            thread,
        }
    }

    /// Free bytes at the start and at the least.
    fn stop(self) -> (u64, u64) {
        self.stop.store(true, std::sync::atomic::Ordering::Relaxed);
        let least = self.thread.join().unwrap_or(self.start);
        (self.start, least)
    }
}

/// Database and log files of `env` with their sizes.
pub(crate) fn env_files(env: &Path) -> Result<Vec<(String, u64)>> {
    let layout = EnvLayout::open(env)?;
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
    Ok(files)
}
