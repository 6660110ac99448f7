//! Section 6, `wait`: waiting after each commit until it is durable on the
//! standby (the primary's wait socket, through the C client): the wait's
//! latency at a fixed commit rate, and the commit rate of a multi-threaded
//! workload that waits after every commit against the same without waiting.
//! `tandem-waitbench` (tests/c/waitbench.c) is the application.

use super::*;

/// One `tandem-waitbench` run's `RESULT` line.
#[derive(Debug, Default, Clone)]
pub(crate) struct WaitRun {
    pub(crate) commits_per_sec: f64,
    pub(crate) waits: u64,
    pub(crate) timeouts: u64,
    pub(crate) p50_ms: f64,
    pub(crate) p99_ms: f64,
    pub(crate) max_ms: f64,
}

fn parse_result(out: &str) -> Result<WaitRun> {
    let line = out
        .lines()
        .find_map(|l| l.strip_prefix("RESULT "))
        .with_context(|| format!("no RESULT line in {out:?}"))?;
    let field = |k: &str| -> Result<f64> {
        line.split_whitespace()
            .find_map(|kv| kv.strip_prefix(k).and_then(|v| v.strip_prefix('=')))
            .with_context(|| format!("no {k} in {line:?}"))?
            .parse()
            .with_context(|| format!("bad {k} in {line:?}"))
    };
    Ok(WaitRun {
        commits_per_sec: field("rate")?,
        waits: field("waits")? as u64,
        timeouts: field("timeouts")? as u64,
        p50_ms: field("p50_us")? / 1000.0,
        p99_ms: field("p99_us")? / 1000.0,
        max_ms: field("max_us")? / 1000.0,
    })
}

/// The stages of commit → durable the daemons time (`*_seconds`
/// histograms on their metrics pages), in the order a commit meets them:
/// (daemon, metric, what it times).
pub(crate) const STAGES: [(&str, &str, &str); 9] = [
    (
        "primary",
        "tandem_primary_log_watch_late_seconds",
        "log watcher's wake-up, later than its 2 ms poll by",
    ),
    (
        "primary",
        "tandem_primary_log_notice_to_send_seconds",
        "watcher saw the record → its chunk sent",
    ),
    (
        "standby",
        "tandem_standby_log_receive_to_durable_seconds",
        "standby read the chunk → fsync returned",
    ),
    (
        "standby",
        "tandem_standby_log_fsync_seconds",
        "of which the fsync (one per batch)",
    ),
    (
        "standby",
        "tandem_standby_log_durable_to_ack_seconds",
        "fsync returned → ack handed to the stream",
    ),
    (
        "primary",
        "tandem_primary_log_send_to_ack_seconds",
        "chunk sent → its ack read by the primary",
    ),
    (
        "primary",
        "tandem_primary_log_notice_to_ack_seconds",
        "watcher saw the record → ack read (the primary's whole part)",
    ),
    (
        "primary",
        "tandem_primary_commit_wait_ack_to_answer_seconds",
        "ack read → the waiter answered",
    ),
    (
        "primary",
        "tandem_primary_commit_wait_seconds",
        "wait request → answer (the wait socket's view)",
    ),
];

/// p50, p99 and the bound of the largest, ms, of each stage over one
/// run's fixed-rate variant (NaN where a stage saw nothing).
pub(crate) type StageRun = Vec<(f64, f64, f64)>;

fn stage_run(before: &[BTreeMap<String, f64>; 2], after: &[BTreeMap<String, f64>; 2]) -> StageRun {
    STAGES
        .iter()
        .map(|(daemon, name, _)| {
            let i = usize::from(*daemon == "standby");
            HistDelta::between(&before[i], &after[i], name).map_or(
                (f64::NAN, f64::NAN, f64::NAN),
                |d| {
                    (
                        d.quantile(50.0) * 1000.0,
                        d.quantile(99.0) * 1000.0,
                        d.max_bound() * 1000.0,
                    )
                },
            )
        })
        .collect()
}

/// The variants measured, in the order of the table.
const VARIANTS: [(&str, usize, Option<u64>, bool); 4] = [
    // One thread cannot wait serially at this rate (each wait is a
    // standby's fsync and ack), so 8 threads share 1,000 commits/s.
    (
        "8 threads, 1,000 commits/s in all, each waits after every commit",
        8,
        Some(1000),
        true,
    ),
    ("8 threads, unthrottled, no wait", 8, None, false),
    (
        "8 threads, unthrottled, each waits after every commit",
        8,
        None,
        true,
    ),
    (
        "1 thread, unthrottled, waits after every commit",
        1,
        None,
        true,
    ),
];

impl Bench {
    fn waitbench(
        &self,
        dir: &Path,
        env: &Path,
        socket: Option<&Path>,
        threads: usize,
        rate: Option<u64>,
        secs: u64,
    ) -> Result<WaitRun> {
        let mut cmd = Command::new(bdb::waitbench_bin());
        cmd.arg("-h")
            .arg(env)
            .args(["-T", &secs.to_string(), "-t", &threads.to_string()]);
        if let Some(r) = rate {
            cmd.args(["-r", &r.to_string()]);
        }
        if let Some(s) = socket {
            cmd.arg("-W").arg(s);
        }
        let log = dir.join("waitbench.log");
        let mut w = Proc::spawn("tandem-waitbench", cmd, &log)?;
        let status = w.wait_exit(Duration::from_secs(secs + 120))?;
        if !status.success() {
            bail!("tandem-waitbench failed: {}", w.log_text());
        }
        parse_result(&w.log_text())
    }

    fn wait_once(&self, run: usize, mode: LoadMode) -> Result<(Vec<WaitRun>, StageRun)> {
        let dir = self.path(&format!("wait-{}-{run}", mode.name()));
        remove_dir(&dir);
        std::fs::create_dir_all(&dir)?;
        let env = dir.join("env");
        // Creates the environment and its database before Tandem starts.
        self.waitbench(&dir, &env, None, 1, Some(100), 1)?;
        let (pm, sm) = (free_addr()?, free_addr()?);
        let primary = start_primary(
            &dir,
            &env,
            &self.certs,
            "127.0.0.1:0",
            &["--metrics-listen", &pm],
        )?;
        let standby_dir = dir.join("standby");
        let mut standby = start_standby(
            &dir,
            &standby_dir,
            &primary.url(),
            &self.certs,
            &["--metrics-listen", &sm],
        )?;
        wait_caught_up_running(&standby_dir, &env, Duration::from_secs(120), &mut standby)?;
        let scrape = || -> Result<[BTreeMap<String, f64>; 2]> {
            Ok([scrape_metrics(&pm)?, scrape_metrics(&sm)?])
        };
        let socket = env.join(".tandem-primary").join("wait.sock");
        let mut out = Vec::new();
        let mut stages = StageRun::new();
        for (i, (label, threads, rate, waits)) in VARIANTS.into_iter().enumerate() {
            let before = scrape()?;
            let r = self.waitbench(
                &dir,
                &env,
                waits.then_some(socket.as_path()),
                threads,
                rate,
                self.cfg.wait_secs,
            )?;
            if i == 0 {
                stages = stage_run(&before, &scrape()?);
            }
            progress(format!(
                "wait ({}) run {}: {label}: {:.0} commits/s, wait p50 {:.2} ms p99 {:.2} ms, {} timeouts",
                mode.name(),
                run + 1,
                r.commits_per_sec,
                r.p50_ms,
                r.p99_ms,
                r.timeouts
            ));
            out.push(r);
        }
        standby.stop(Duration::from_secs(30))?;
        drop(primary);
        remove_dir(&dir);
        Ok((out, stages))
    }

    pub(crate) fn section_wait(&self, mode: LoadMode) -> Result<Section> {
        let cfg = &self.cfg;
        let mut runs: Vec<Vec<WaitRun>> = vec![Vec::new(); VARIANTS.len()];
        let mut stage_runs: Vec<StageRun> = Vec::new();
        for run in 0..cfg.runs {
            let (variants, stages) = self.wait_once(run, mode)?;
            for (i, r) in variants.into_iter().enumerate() {
                runs[i].push(r);
            }
            stage_runs.push(stages);
        }
        let col =
            |i: usize, f: &dyn Fn(&WaitRun) -> f64| runs[i].iter().map(f).collect::<Vec<f64>>();
        let mut s = Section::default();
        let _ = writeln!(
            s.md,
            "## 9. Waiting until a commit is durable on the standby ({})\n\n{}`tandem-waitbench` (one 100-byte put per transaction, \
             `DB_TXN_WRITE_NOSYNC`, commit token set) with tandem-primary and a caught-up standby on the same disk, {} s per \
             variant, {} run(s); a waiting thread calls `tandem_wait_token(socket, &token, 1, 10000)` (contrib/c) after each \
             commit. Latency: from the call to its return.\n",
            mode.name(),
            load_note(mode, cfg.load),
            cfg.wait_secs,
            cfg.runs
        );
        let _ = writeln!(s.md, "| variant | commits/s | waits returned durable | wait p50 ms | wait p99 ms | wait max ms | timeouts |\n|---|---|---|---|---|---|---|");
        for (i, (label, _, _, waits)) in VARIANTS.iter().enumerate() {
            let opt = |v: Vec<f64>, d: usize| if *waits { spread(&v, d) } else { "-".into() };
            let _ = writeln!(
                s.md,
                "| {label} | {} | {} | {} | {} | {} | {} |",
                spread(&col(i, &|r| r.commits_per_sec), 0),
                opt(col(i, &|r| r.waits as f64), 0),
                opt(col(i, &|r| r.p50_ms), 2),
                opt(col(i, &|r| r.p99_ms), 2),
                opt(col(i, &|r| r.max_ms), 2),
                opt(col(i, &|r| r.timeouts as f64), 0),
            );
        }
        let rate = |i: usize| median(&col(i, &|r| r.commits_per_sec));
        let _ = writeln!(
            s.md,
            "\n8 threads waiting after every commit commit at {:.3}× the rate without waiting (a waiting thread commits at most once \
             per standby round trip: fsync and ack), and at {:.1}× one waiting thread: waits from many threads share each \
             acknowledgement.\n",
            rate(2) / rate(1),
            rate(2) / rate(3)
        );
        stages_md(&mut s.md, &stage_runs);
        let p99 = median(&col(0, &|r| r.p99_ms));
        s.targets.push(Target {
            what: format!(
                "wait for durable after each commit, 1,000 commits/s ({})",
                mode.name()
            ),
            goal: "p99 < 10 ms".into(),
            measured: format!(
                "p50 {:.2} ms, p99 {p99:.2} ms",
                median(&col(0, &|r| r.p50_ms))
            ),
            met: Some(p99 < 10.0),
        });
        Ok(s)
    }
}

/// The table of where the fixed-rate variant's time went, stage by stage.
fn stages_md(md: &mut String, runs: &[StageRun]) {
    let _ = writeln!(
        md,
        "Where the time of the 1,000 commits/s variant went, from the daemons' stage histograms (`*_seconds` on their metrics pages,          scraped before and after; quantiles interpolated inside buckets 1.5× wide, \"max ≤\" is the bound of the highest bucket          reached), medians (min–max) over runs:\n"
    );
    let _ = writeln!(
        md,
        "| stage | metric | p50 ms | p99 ms | max ≤ ms |\n|---|---|---|---|---|"
    );
    for (i, (_, name, what)) in STAGES.iter().enumerate() {
        let col = |f: &dyn Fn(&(f64, f64, f64)) -> f64| -> Vec<f64> {
            runs.iter()
                .filter_map(|r| r.get(i).map(f))
                .filter(|v| v.is_finite())
                .collect()
        };
        let show = |v: Vec<f64>| {
            if v.is_empty() {
                "-".into()
            } else {
                spread(&v, 2)
            }
        };
        let _ = writeln!(
            md,
            "| {what} | `{name}` | {} | {} | {} |",
            show(col(&|t| t.0)),
            show(col(&|t| t.1)),
            show(col(&|t| t.2)),
        );
    }
    let _ = writeln!(md);
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_result_line_parses() {
        let r = parse_result(
            "noise\nRESULT commits=100 secs=1.000 rate=100.0 waits=99 timeouts=1 p50_us=1500 p99_us=4000 max_us=9000\n",
        )
        .unwrap();
        assert_eq!(r.waits, 99);
        assert_eq!(r.timeouts, 1);
        assert!((r.p99_ms - 4.0).abs() < 1e-9);
        assert!(parse_result("nothing").is_err());
    }
}
