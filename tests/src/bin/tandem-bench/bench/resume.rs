//! Section 5, `resume`: bytes sent after a standby `kill -9` and restart,
//! and a rebase, against a full copy.

use super::*;

impl Bench {
    pub(crate) fn section_resume(&self, big: &mut BigEnv) -> Result<Section> {
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
                wait_caught_up_running(&dir, &big.env, copy_timeout(big.bytes), &mut sb)?;
                sb.stop(Duration::from_secs(60))?;
                let st = standby_status(&dir)?;
                let full =
                    status_u64(&st, "file_bytes_received") + status_u64(&st, "log_bytes_received");
                (dir, full)
            }
        };
        let mut standby = start_standby(self.root.path(), &dir, &url, &self.certs, &[])?;
        wait_caught_up_running(&dir, &big.env, Duration::from_secs(300), &mut standby)?;
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
                wait_while_running(
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
            wait_caught_up_running(&dir, &big.env, Duration::from_secs(600), &mut standby)?;
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
pub(crate) struct RebaseRun {
    /// Database bytes (all pages) after the change, and in changed pages.
    pub(crate) db_bytes: u64,
    pub(crate) changed: u64,
    /// What the rebase report says it sent and reused.
    pub(crate) sent: u64,
    pub(crate) reused: u64,
    pub(crate) rebase_secs: f64,
}

/// Whether this tree's standby can rebase (the feature may be absent).
pub(crate) fn standby_supports_rebase() -> bool {
    Command::new(harness::bin("tandem-standby"))
        .args(["run", "--help"])
        .output()
        .map(|o| String::from_utf8_lossy(&o.stdout).contains("--rebase-after-secs"))
        .unwrap_or(false)
}

/// Per database file: its page size and a 128-bit blake3 of every page.
type PageDigests = BTreeMap<String, (u64, Vec<[u8; 16]>)>;

pub(crate) fn page_digests(env: &Path) -> Result<PageDigests> {
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
pub(crate) fn changed_bytes(before: &PageDigests, after: &PageDigests) -> (u64, u64) {
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
    pub(crate) fn rebase_once(
        &self,
        big: &BigEnv,
        dir: &Path,
        url: &str,
    ) -> Result<(serde_json::Value, f64)> {
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
        wait_while_running("a rebase", copy_timeout(big.bytes), &mut sb, || {
            let st = standby_status(dir)?;
            let r = &st["last_rebase"];
            if r["unix_ms"].as_u64().unwrap_or(0) >= since_ms {
                report = Some((r.clone(), started.elapsed().as_secs_f64()));
            }
            Ok(report.is_some())
        })?;
        wait_caught_up_running(dir, &big.env, Duration::from_secs(600), &mut sb)?;
        sb.stop(Duration::from_secs(60))?;
        report.context("no rebase report")
    }

    /// With the standby in `dir` stopped and caught up: rebase once so the
    /// base is current; then per run change about 1% of the pages, rebase
    /// again and measure what that rebase sends.
    pub(crate) fn rebase_runs(
        &self,
        big: &BigEnv,
        dir: &Path,
        url: &str,
    ) -> Result<Vec<RebaseRun>> {
        // Once, so the standby's base holds what section 5 wrote so far;
        // afterwards each measured rebase leaves the base current. A rebase
        // needs a checkpoint past the current base (BDB must no longer need
        // the old log).
        self.checkpoint(&big.env)?;
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
            self.checkpoint(&big.env)?;
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
