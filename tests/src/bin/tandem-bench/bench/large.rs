//! Section 7, `large`: an environment of `BENCH_LARGE_GB` GiB (more than a
//! busy machine's page cache holds comfortably): base copy against cp and
//! rsync over ssh, a rebase and a failover promotion, with the resident
//! memory of both daemons sampled throughout to show it does not grow with
//! the environment.
//!
//! Disk is the constraint: the environment is built in rounds (checkpoint
//! and `db_archive -d` after each, so its log never piles up), every copy is
//! deleted before the next is made, and the size is cut to what the free
//! space allows (a rebase stages a second copy beside the mirror, so the
//! peak is the environment plus two copies) with [`RESERVE`] left free.

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

impl Bench {
    /// The size to run at (MiB) and why, from the setting and the free space.
    fn large_size_mb(&self) -> Result<(u64, String)> {
        let wanted = (self.cfg.large_gb * 1024.0) as u64;
        let free = free_bytes(self.root.path())?;
        // Environment + mirror + staged rebase, plus one round of log.
        let fits = (free.saturating_sub(RESERVE + ROUND) / 3) >> 20;
        if fits >= wanted {
            return Ok((
                wanted,
                format!("{:.1} GiB free at the start", free as f64 / MIB / 1024.0),
            ));
        }
        Ok((
            fits,
            format!(
                "cut from {:.1} GiB: {:.1} GiB free at the start, and the peak (environment, mirror and a staged rebase) must leave {} GiB free",
                self.cfg.large_gb,
                free as f64 / MIB / 1024.0,
                RESERVE >> 30
            ),
        ))
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
        let (size_mb, why) = self.large_size_mb()?;
        let mut s = Section::default();
        if size_mb < 256 {
            let _ = writeln!(
                s.md,
                "## 7. Large environment: skipped\n\nNot enough free disk for even 256 MiB ({why}).\n"
            );
            return Ok(s);
        }
        let env = self.path("large-env");
        let result = self.large_runs(&env, size_mb, &why, &mut s);
        // Everything goes, whatever happened: the disk is shared.
        for d in ["large-env", "large-copy", "large-standby"] {
            remove_dir(&self.path(d));
        }
        result.map(|()| s)
    }

    fn large_runs(&self, env: &Path, size_mb: u64, why: &str, s: &mut Section) -> Result<()> {
        let files = self.make_large_env(env, size_mb)?;
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
            self.copy_once(method, &big, sshd.as_ref(), &dest, &mut fig)?;
            let secs = fig.secs.last().copied().unwrap_or(f64::NAN);
            progress(format!("large {method}: {secs:.1} s"));
            rows.push(Row {
                what: method_label(method).to_owned(),
                secs,
                note: String::new(),
            });
        }
        drop(sshd);

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
        let (rebase_secs, rebase_rss, sent, reused) = self.large_rebase(&big, &primary, &mirror)?;
        rows.push(Row {
            what: "Tandem rebase after ~0.5% of pages changed (standby started → rebased)".into(),
            secs: rebase_secs,
            note: format!(
                "{:.0} MiB sent, {:.0} MiB reused; peak RSS primary {:.0} MiB, standby {:.0} MiB",
                sent as f64 / MIB,
                reused as f64 / MIB,
                rebase_rss.primary,
                rebase_rss.standby
            ),
        });
        let primary_hwm = proc_hwm_mib(primary.proc.pid()).unwrap_or(f64::NAN);
        primary.proc.kill9()?;
        // BDB's own work on a copy of the same mirror, as cold as promote's.
        let (base_recover, base_verify) = {
            let work = self.path("large-copy");
            std::fs::create_dir_all(&work)?;
            let copy = work.join("baseline");
            copy_env(&mirror, &copy)?;
            drop_caches();
            let timed = promote::bdb_recover_and_verify(&copy, &work);
            remove_dir(&work);
            timed?
        };
        let baseline = base_recover + base_verify;
        rows.push(Row {
            what: "Baseline: `db5.3_recover -c` + `db5.3_verify` of each database on a copy of the mirror (page cache dropped)".into(),
            secs: baseline,
            note: format!("recover {base_recover:.1} s, verify {base_verify:.1} s"),
        });
        // The readiness check a running standby makes every few minutes:
        // what it verified, promote does not verify again.
        let check_started = Instant::now();
        let mut check = Command::new(harness::bin("tandem-standby"));
        check.arg("check").arg("--dir").arg(&mirror);
        run_cmd(
            "tandem-standby check",
            check,
            Duration::from_secs(3600),
            &self.path("large-check.log"),
        )?;
        let check_secs = check_started.elapsed().as_secs_f64();
        let st = standby_status(&mirror)?;
        let estimate = st["promotion_estimate_seconds"]
            .as_f64()
            .unwrap_or(f64::NAN);
        rows.push(Row {
            what: "`tandem-standby check` (clone, recovery, db_verify of every database, verified record)".into(),
            secs: check_secs,
            note: format!(
                "verify {:.1} s; promotion estimate after it {estimate:.2} s",
                st["last_check"]["verify_seconds"].as_f64().unwrap_or(f64::NAN)
            ),
        });
        drop_caches();
        let (promote_secs, phases) = self.large_promote(&mirror)?;
        let phase = |k: &str| phases.iter().find(|p| p.0 == k).map_or(f64::NAN, |p| p.1);
        rows.push(Row {
            what: "`tandem-standby promote` (failover, page cache dropped)".into(),
            secs: promote_secs,
            note: format!(
                "phases: {}",
                phases
                    .iter()
                    .filter(|p| p.1 >= 0.05)
                    .map(|(k, v)| format!("{k} {v:.1} s"))
                    .collect::<Vec<_>>()
                    .join(", ")
            ),
        });

        let _ = writeln!(
            s.md,
            "## 7. Large environment ({gib:.1} GiB)\n\n{} files, {bytes} bytes ({why}). Page cache dropped before each step; one run each. \
             RSS = largest VmRSS of the daemon sampled every 100 ms during the step (/proc/PID/status).\n",
            big.files.len()
        );
        let _ = writeln!(s.md, "| step | time s | MiB/s | notes |\n|---|---|---|---|");
        for r in &rows {
            let _ = writeln!(
                s.md,
                "| {} | {:.1} | {:.0} | {} |",
                r.what,
                r.secs,
                bytes as f64 / MIB / r.secs,
                r.note
            );
        }
        let _ = writeln!(
            s.md,
            "\nPeak RSS (VmHWM) of tandem-primary over the whole section: {primary_hwm:.0} MiB.\n"
        );
        let cp = rows[0].secs;
        s.targets.push(Target {
            what: format!("base copy of {gib:.1} GiB vs cp -r + sync (cold)"),
            goal: "≤ 1.25× cp's time".into(),
            measured: format!("{:.2}× ({copy_secs:.1} vs {cp:.1} s)", copy_secs / cp),
            met: Some(copy_secs <= 1.25 * cp),
        });
        s.targets.push(Target {
            what: format!("failover promote of {gib:.1} GiB vs BDB on a copy (cold)"),
            goal: "≤ 1.5× baseline + 0.3 s".into(),
            measured: format!(
                "{promote_secs:.1} s vs {baseline:.1} s (recovery {:.1} vs {base_recover:.1}, verify {:.1} vs {base_verify:.1})",
                phase("recovery"),
                phase("verify")
            ),
            met: Some(promote_secs <= 1.5 * baseline + 0.3),
        });
        let limit = if gib <= 1.5 { 1.5 } else { 3.0 };
        s.targets.push(Target {
            what: format!("failover promote of {gib:.1} GiB after a readiness check (cold)"),
            goal: format!("≤ {limit} s (issue #21)"),
            measured: format!("{promote_secs:.2} s (verify {:.2} s)", phase("verify")),
            met: Some(promote_secs <= limit),
        });
        let err = (estimate - promote_secs) / promote_secs;
        s.targets.push(Target {
            what: format!("status promotion estimate, {gib:.1} GiB failover"),
            goal: "within 20 % of promote".into(),
            measured: format!(
                "{estimate:.2} s estimated, {promote_secs:.2} s taken ({:.0}% off)",
                100.0 * err
            ),
            met: Some(err.abs() <= 0.2),
        });
        let peak = copy_rss
            .primary
            .max(copy_rss.standby)
            .max(rebase_rss.primary)
            .max(rebase_rss.standby);
        s.targets.push(Target {
            what: format!("daemon memory with {gib:.1} GiB"),
            goal: "flat (≤ 256 MiB RSS, independent of size)".into(),
            measured: format!("peak {peak:.0} MiB"),
            met: Some(peak <= 256.0),
        });
        Ok(())
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
    /// wall seconds and the report's phases.
    fn large_promote(&self, mirror: &Path) -> Result<(f64, Vec<(String, f64)>)> {
        let mut c = Command::new(harness::bin("tandem-standby"));
        c.arg("promote").arg("--dir").arg(mirror).arg("--json");
        let started = Instant::now();
        let out = cmd_stdout(
            "tandem-standby promote",
            c,
            Duration::from_secs(3600),
            &self.path("large-promote.log"),
        )?;
        let wall = started.elapsed().as_secs_f64();
        let v: serde_json::Value =
            serde_json::from_str(&out).with_context(|| format!("promote output: {out}"))?;
        let phases = promote::PHASES
            .iter()
            .map(|&k| (k.to_owned(), v["phases"][k].as_f64().unwrap_or(f64::NAN)))
            .collect();
        progress(format!("large promote: {wall:.1} s, {out}"));
        Ok((wall, phases))
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
