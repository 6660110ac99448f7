//! `tandem-bench`: the benchmark driver `bench/run` starts (release build,
//! never part of `cargo test`). The sections, the statistics and the report
//! live in `bench/` beside this file; processes, certificates, status and
//! metrics come from the test harness (`tandem_tests::harness`), so the benchmark
//! drives the binaries exactly the way the integration tests do.

mod bench;

use anyhow::{bail, Context, Result};
use bench::*;
use std::fmt::Write as _;
use std::process::ExitCode;
use std::time::{Duration, Instant};
use tandem_tests::harness::{self, Certs};

fn main() -> ExitCode {
    let args: Vec<String> = std::env::args().skip(1).collect();
    if args.first().map(String::as_str) == Some("delay-proxy") {
        // The slowlink section starts this copy of itself in the standby's
        // namespace as the link's delay.
        return match bench::netns::delay_proxy_main(&args[1..]) {
            Ok(()) => ExitCode::SUCCESS,
            Err(e) => {
                eprintln!("tandem-bench delay-proxy: {e:#}");
                ExitCode::from(2)
            }
        };
    }
    // The background load (BENCH_LOAD) is copies of this program.
    match (args.first().map(String::as_str), args.get(1)) {
        (Some("load-cpu"), _) => bench::load::cpu_main(),
        (Some("load-fsync"), Some(file)) => {
            let e = bench::load::fsync_main(std::path::Path::new(file));
            eprintln!("tandem-bench load-fsync: {e:?}");
            return ExitCode::from(2);
        }
        _ => {}
    }
    match run() {
        Ok(true) => ExitCode::SUCCESS,
        Ok(false) => ExitCode::from(1),
        Err(e) => {
            eprintln!("tandem-bench: error: {e:#}");
            ExitCode::from(2)
        }
    }
}

/// Runs every selected section; false when one failed (its error is in the
/// report).
fn run() -> Result<bool> {
    let cfg = Config::from_env()?;
    for b in ["tandem-primary", "tandem-standby"] {
        if !harness::bin(b).exists() {
            bail!("{} is missing: build with `cargo build --release --workspace --bins` (bench/run does)", harness::bin(b).display());
        }
    }
    std::fs::create_dir_all(&cfg.work_parent)?;
    let root = tempfile::Builder::new()
        .prefix("tandem-bench-")
        .tempdir_in(&cfg.work_parent)?;
    let certs = Certs::generate(&root.path().join("certs"))?;
    let can_drop_caches = drop_caches();
    let bench = Bench {
        cfg: cfg.clone(),
        root,
        certs,
        can_drop_caches,
    };
    let started = Instant::now();
    let mut md = format!(
        "# Tandem benchmark\n\n{}\n",
        machine_md(&cfg, bench.root.path())
    );
    let mut targets = Vec::new();
    let mut ok = true;
    // Each section notes the load average when it started: other work on
    // the machine is the first suspect for an outlier.
    let mut record = |name: &str, load: String, r: Result<Section>, md: &mut String| match r {
        Ok(s) => {
            md.push_str(&s.md);
            let _ = writeln!(md, "_Load average when this section started: {load}._\n");
            targets.extend(s.targets);
        }
        Err(e) => {
            ok = false;
            progress(format!("section {name} FAILED: {e:#}"));
            let _ = writeln!(md, "## {name}: FAILED\n\n```\n{e:#}\n```\n");
        }
    };

    let needs_big =
        cfg.wants("copy") || cfg.wants("resume") || cfg.wants("restore") || cfg.wants("s3");
    let mut big = if needs_big {
        match bench.make_big_env() {
            Ok(b) => Some(b),
            Err(e) => {
                record("environment", loadavg(), Err(e), &mut md);
                None
            }
        }
    } else {
        None
    };
    if cfg.wants("copy") {
        if let Some(b) = big.as_mut() {
            let load = loadavg();
            let r = bench.section_copy(b);
            record("1. base copy", load, r, &mut md);
            // An idle tandem-primary is not free (its log watcher polls every
            // 2 ms): stop it so it does not disturb the next sections.
            if let Some(mut p) = b.primary.take() {
                let _ = p.proc.stop(Duration::from_secs(30));
            }
        }
    }
    if cfg.wants("restore") {
        if let Some(b) = big.as_ref() {
            let load = loadavg();
            let r = bench.section_restore(b);
            record("6. restore", load, r, &mut md);
        }
    }
    if cfg.wants("s3") {
        if let Some(b) = big.as_ref() {
            let load = loadavg();
            let r = bench.section_s3(b);
            record("10. s3", load, r, &mut md);
        }
    }
    let needs_seed = ["lag", "cost", "promote"].iter().any(|s| cfg.wants(s));
    let seed = if needs_seed {
        match bench.make_seed() {
            Ok(s) => Some(s),
            Err(e) => {
                record("seed environment", loadavg(), Err(e), &mut md);
                None
            }
        }
    } else {
        None
    };
    if let Some(seed) = &seed {
        if cfg.wants("lag") {
            let load = loadavg();
            let r = bench.section_lag(seed);
            record("2. lag", load, r, &mut md);
        }
        if cfg.wants("cost") {
            for &mode in &cfg.load_modes {
                let load = loadavg();
                let r = bench
                    .with_load(mode, "cost", || bench.section_cost(seed, mode))
                    .map(|(s, probe)| s.with_probe(&probe));
                record(&format!("3. cost ({})", mode.name()), load, r, &mut md);
            }
        }
        if cfg.wants("promote") {
            let load = loadavg();
            let r = bench.section_promote(seed);
            record("4. promote", load, r, &mut md);
        }
    }
    if cfg.wants("resume") {
        if let Some(b) = big.as_mut() {
            let load = loadavg();
            let r = bench.section_resume(b);
            record("5. resume", load, r, &mut md);
        }
    }
    drop(big);
    if cfg.wants("large") && cfg.large_gb > 0.0 {
        let load = loadavg();
        let r = bench.section_large();
        record("7. large", load, r, &mut md);
    }
    if cfg.wants("slowlink") {
        let load = loadavg();
        let r = bench.section_slowlink();
        record("8. slow links", load, r, &mut md);
    }
    if cfg.wants("wait") {
        for &mode in &cfg.load_modes {
            let load = loadavg();
            let r = bench
                .with_load(mode, "wait", || bench.section_wait(mode))
                .map(|(s, probe)| s.with_probe(&probe));
            record(&format!("9. wait ({})", mode.name()), load, r, &mut md);
        }
    }
    md.push_str(&targets_md(&targets));
    let _ = writeln!(
        md,
        "\nTotal bench time: {:.0} s (without building); load average {} at the end.",
        started.elapsed().as_secs_f64(),
        loadavg()
    );
    println!("{md}");
    if let Some(out) = &cfg.out {
        if let Some(parent) = out.parent() {
            std::fs::create_dir_all(parent)?;
        }
        std::fs::write(out, &md).with_context(|| format!("writing {}", out.display()))?;
        progress(format!("wrote {}", out.display()));
    }
    if cfg.keep {
        let kept = bench.root.keep();
        progress(format!("kept {}", kept.display()));
    }
    Ok(ok)
}
