//! Section 4, `promote`: failover time after N MB of log.

use super::*;

pub(crate) struct PromoteRun {
    pub(crate) log_mib: f64,
    pub(crate) recovery_secs: f64,
    pub(crate) total_secs: f64,
}

impl Bench {
    pub(crate) fn promote_once(&self, seed: &Seed, mb: u64, tag: &str) -> Result<PromoteRun> {
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
        wait_while_running(
            &format!("{mb} MiB of log"),
            Duration::from_secs(900),
            &mut w,
            || Ok(log_mib_between(start, primary_log_end(&pair.env)?, lg_max) >= mb as f64),
        )?;
        let status = w.stop(Duration::from_secs(60))?;
        if !status.success() {
            bail!("workload failed: {}", w.log_text());
        }
        wait_caught_up_running(
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

    pub(crate) fn section_promote(&self, seed: &Seed) -> Result<Section> {
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
