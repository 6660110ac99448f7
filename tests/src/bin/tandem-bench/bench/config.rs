//! Settings: environment variables `BENCH_*` (see bench/README.md).

use super::*;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Cache {
    Cold,
    Warm,
}

impl Cache {
    pub(crate) fn name(self) -> &'static str {
        match self {
            Cache::Cold => "cold",
            Cache::Warm => "warm",
        }
    }
}

#[derive(Debug, Clone)]
pub(crate) struct Config {
    pub(crate) quick: bool,
    pub(crate) size_mb: u64,
    /// `BENCH_CHECKSUM=1`: the base-copy environment's databases are
    /// created with DB_CHKSUM (pages proven by one read).
    pub(crate) checksum: bool,
    pub(crate) runs: usize,
    pub(crate) caches: Vec<Cache>,
    pub(crate) lag_secs: u64,
    pub(crate) lag_rate: u64,
    pub(crate) cost_secs: u64,
    /// Seconds per variant of the wait section.
    pub(crate) wait_secs: u64,
    pub(crate) promote_mb: Vec<u64>,
    pub(crate) resume_mb: u64,
    /// GiB of the large environment (0: the `large` section is skipped).
    pub(crate) large_gb: f64,
    /// `slowlink`: MiB of text records in the environment, and loaded
    /// while the standby is away.
    pub(crate) slow_mb: u64,
    pub(crate) slow_log_mb: u64,
    pub(crate) sections: Vec<String>,
    /// `BENCH_LOAD`: the cost and wait sections idle, under the
    /// background load, or both (in that order).
    pub(crate) load_modes: Vec<LoadMode>,
    /// `BENCH_LOAD_CPU`, `BENCH_LOAD_FSYNC`: the background load.
    pub(crate) load: LoadSpec,
    pub(crate) work_parent: PathBuf,
    pub(crate) out: Option<PathBuf>,
    pub(crate) keep: bool,
}

pub(crate) const SECTIONS: [&str; 10] = [
    "copy", "restore", "lag", "cost", "promote", "resume", "large", "slowlink", "wait", "s3",
];

pub(crate) fn env_str(name: &str) -> Option<String> {
    std::env::var(name).ok().filter(|v| !v.trim().is_empty())
}

pub(crate) fn env_u64(name: &str, default: u64) -> Result<u64> {
    match env_str(name) {
        None => Ok(default),
        Some(v) => v
            .trim()
            .parse()
            .with_context(|| format!("{name}={v:?} is not a whole number")),
    }
}

pub(crate) fn env_list(name: &str, default: &[u64]) -> Result<Vec<u64>> {
    match env_str(name) {
        None => Ok(default.to_vec()),
        Some(v) => v
            .split(',')
            .map(|s| {
                s.trim()
                    .parse()
                    .with_context(|| format!("{name}={v:?}: bad number {s:?}"))
            })
            .collect(),
    }
}

impl Config {
    pub(crate) fn from_env() -> Result<Self> {
        let quick = env_str("BENCH_QUICK").is_some_and(|v| v != "0");
        let caches =
            match env_str("BENCH_CACHE")
                .as_deref()
                .unwrap_or(if quick { "warm" } else { "both" })
            {
                "cold" => vec![Cache::Cold],
                "warm" => vec![Cache::Warm],
                "both" => vec![Cache::Cold, Cache::Warm],
                other => bail!("BENCH_CACHE={other:?}: expected cold, warm or both"),
            };
        let sections = match env_str("BENCH_ONLY") {
            None => SECTIONS.iter().map(|s| s.to_string()).collect(),
            Some(v) => {
                let list: Vec<String> = v
                    .split(',')
                    .map(|s| s.trim().to_owned())
                    .filter(|s| !s.is_empty())
                    .collect();
                if let Some(bad) = list.iter().find(|s| !SECTIONS.contains(&s.as_str())) {
                    bail!(
                        "BENCH_ONLY: unknown section {bad:?} (sections: {})",
                        SECTIONS.join(",")
                    );
                }
                list
            }
        };
        let load_modes = match env_str("BENCH_LOAD").as_deref().unwrap_or("both") {
            "idle" => vec![LoadMode::Idle],
            "loaded" => vec![LoadMode::Loaded],
            "both" => vec![LoadMode::Idle, LoadMode::Loaded],
            other => bail!("BENCH_LOAD={other:?}: expected idle, loaded or both"),
        };
        let cores = std::thread::available_parallelism().map_or(2, |n| n.get()) as u64;
        let load = LoadSpec {
            cpu: env_u64("BENCH_LOAD_CPU", 4 * cores)? as usize,
            fsync: env_u64("BENCH_LOAD_FSYNC", 2)? as usize,
        };
        let cfg = Config {
            quick,
            load_modes,
            load,
            size_mb: env_u64("BENCH_SIZE_MB", if quick { 128 } else { 1024 })?,
            checksum: env_u64("BENCH_CHECKSUM", 0)? != 0,
            runs: env_u64("BENCH_RUNS", if quick { 1 } else { 3 })?.max(1) as usize,
            caches,
            lag_secs: env_u64("BENCH_LAG_SECS", if quick { 4 } else { 10 })?.max(1),
            lag_rate: env_u64("BENCH_LAG_RATE", 1000)?.max(1),
            cost_secs: env_u64("BENCH_COST_SECS", if quick { 4 } else { 10 })?.max(1),
            wait_secs: env_u64("BENCH_WAIT_SECS", if quick { 4 } else { 10 })?.max(1),
            promote_mb: env_list(
                "BENCH_PROMOTE_MB",
                if quick { &[25, 100] } else { &[100, 500] },
            )?,
            resume_mb: env_u64("BENCH_RESUME_MB", if quick { 2 } else { 8 })?.max(1),
            large_gb: match env_str("BENCH_LARGE_GB") {
                None => {
                    if quick {
                        0.0
                    } else {
                        10.0
                    }
                }
                Some(v) => v
                    .trim()
                    .parse::<f64>()
                    .ok()
                    .filter(|g| g.is_finite() && *g >= 0.0)
                    .with_context(|| format!("BENCH_LARGE_GB={v:?} is not a size in GiB"))?,
            },
            slow_mb: env_u64("BENCH_SLOW_MB", if quick { 32 } else { 64 })?.max(1),
            slow_log_mb: env_u64("BENCH_SLOW_LOG_MB", if quick { 16 } else { 48 })?.max(1),
            sections,
            work_parent: env_str("BENCH_DIR")
                .map(PathBuf::from)
                .unwrap_or_else(std::env::temp_dir),
            out: env_str("BENCH_OUT").map(PathBuf::from),
            keep: env_str("BENCH_KEEP").is_some_and(|v| v != "0"),
        };
        if cfg.size_mb < 16 {
            bail!("BENCH_SIZE_MB must be at least 16");
        }
        Ok(cfg)
    }

    pub(crate) fn wants(&self, section: &str) -> bool {
        self.sections.iter().any(|s| s == section)
    }
}
