//! The report: the machine, the targets table.

use super::*;

/// The 1-minute load average: other work on the machine skews every figure.
pub(crate) fn loadavg() -> String {
    std::fs::read_to_string("/proc/loadavg")
        .ok()
        .and_then(|t| t.split_whitespace().next().map(str::to_owned))
        .unwrap_or_else(|| "?".into())
}

pub(crate) fn machine_md(cfg: &Config, work: &Path) -> String {
    let cpu = std::fs::read_to_string("/proc/cpuinfo")
        .ok()
        .and_then(|t| {
            t.lines().find_map(|l| {
                l.strip_prefix("model name")
                    .map(|v| v.trim_start_matches([' ', '\t', ':']).to_owned())
            })
        })
        .unwrap_or_else(|| "?".into());
    let mem = std::fs::read_to_string("/proc/meminfo")
        .ok()
        .and_then(|t| {
            t.lines().find_map(|l| {
                l.strip_prefix("MemTotal:")
                    .and_then(|v| v.split_whitespace().next())
                    .and_then(|v| v.parse::<f64>().ok())
            })
        })
        .map(|kb| format!("{:.1} GiB", kb / 1024.0 / 1024.0))
        .unwrap_or_else(|| "?".into());
    let kernel = std::fs::read_to_string("/proc/sys/kernel/osrelease")
        .unwrap_or_default()
        .trim()
        .to_owned();
    let fs = first_line({
        let mut c = Command::new("sh");
        c.arg("-c").arg(format!(
            "df -hT '{}' | tail -n 1 | awk '{{print $1\" \"$2\", \"$5\" free\"}}'",
            work.display()
        ));
        c
    });
    let repo = Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .unwrap_or(Path::new("."));
    let commit = first_line({
        let mut c = Command::new("git");
        c.arg("-C")
            .arg(repo)
            .args(["describe", "--always", "--dirty"]);
        c
    });
    let cores = std::thread::available_parallelism()
        .map(|n| n.get())
        .unwrap_or(0);
    let tools = [
        first_line({
            let mut c = Command::new("rsync");
            c.arg("--version");
            c
        }),
        first_line({
            let mut c = Command::new("ssh");
            c.arg("-V");
            c
        }),
        first_line({
            let mut c = Command::new("db5.3_recover");
            c.arg("-V");
            c
        }),
    ];
    format!(
        "Machine: {cores} cores ({cpu}), {mem} RAM, kernel {kernel}; work dir {} on {fs}; load average {} at the start. Tandem {commit}.\n\
         Tools: {}.\n\
         Settings: {}size {} MiB{}, {} run(s), cache {}, lag {} s at {} commits/s, cost {} s, promote after {:?} MiB, resume step {} MiB, large environment {} GiB; cost and wait {} (background load: {}).\n",
        work.display(),
        loadavg(),
        tools.join("; "),
        if cfg.quick { "QUICK mode; " } else { "" },
        cfg.size_mb,
        if cfg.checksum { " (DB_CHKSUM)" } else { "" },
        cfg.runs,
        cfg.caches.iter().map(|c| c.name()).collect::<Vec<_>>().join("+"),
        cfg.lag_secs,
        cfg.lag_rate,
        cfg.cost_secs,
        cfg.promote_mb,
        cfg.resume_mb,
        cfg.large_gb,
        cfg.load_modes.iter().map(|m| m.name()).collect::<Vec<_>>().join(" and "),
        cfg.load.describe()
    )
}

pub(crate) fn targets_md(targets: &[Target]) -> String {
    let mut md =
        String::from("## Targets\n\n| target | goal | measured | result |\n|---|---|---|---|\n");
    for t in targets {
        let result = match t.met {
            Some(true) => "met",
            Some(false) => "**missed**",
            None => "**missed** (not implemented)",
        };
        let _ = writeln!(
            md,
            "| {} | {} | {} | {result} |",
            t.what, t.goal, t.measured
        );
    }
    md
}
