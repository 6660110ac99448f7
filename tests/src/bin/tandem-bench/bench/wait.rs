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

    fn wait_once(&self, run: usize) -> Result<Vec<WaitRun>> {
        let dir = self.path(&format!("wait-{run}"));
        remove_dir(&dir);
        std::fs::create_dir_all(&dir)?;
        let env = dir.join("env");
        // Creates the environment and its database before Tandem starts.
        self.waitbench(&dir, &env, None, 1, Some(100), 1)?;
        let (primary, mut standby) = start_caught_up(
            &dir,
            &env,
            &dir.join("standby"),
            &self.certs,
            Duration::from_secs(120),
        )?;
        let socket = env.join(".tandem-primary").join("wait.sock");
        let mut out = Vec::new();
        for (label, threads, rate, waits) in VARIANTS {
            let r = self.waitbench(
                &dir,
                &env,
                waits.then_some(socket.as_path()),
                threads,
                rate,
                self.cfg.wait_secs,
            )?;
            progress(format!(
                "wait run {}: {label}: {:.0} commits/s, wait p50 {:.2} ms p99 {:.2} ms, {} timeouts",
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
        Ok(out)
    }

    pub(crate) fn section_wait(&self) -> Result<Section> {
        let cfg = &self.cfg;
        let mut runs: Vec<Vec<WaitRun>> = vec![Vec::new(); VARIANTS.len()];
        for run in 0..cfg.runs {
            for (i, r) in self.wait_once(run)?.into_iter().enumerate() {
                runs[i].push(r);
            }
        }
        let col =
            |i: usize, f: &dyn Fn(&WaitRun) -> f64| runs[i].iter().map(f).collect::<Vec<f64>>();
        let mut s = Section::default();
        let _ = writeln!(
            s.md,
            "## 6. Waiting until a commit is durable on the standby\n\n`tandem-waitbench` (one 100-byte put per transaction, \
             `DB_TXN_WRITE_NOSYNC`, commit token set) with tandem-primary and a caught-up standby on the same disk, {} s per \
             variant, {} run(s); a waiting thread calls `tandem_wait_token(socket, &token, 1, 10000)` (contrib/c) after each \
             commit. Latency: from the call to its return.\n",
            cfg.wait_secs, cfg.runs
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
        let p99 = median(&col(0, &|r| r.p99_ms));
        s.targets.push(Target {
            what: "wait for durable after each commit, 1,000 commits/s".into(),
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
