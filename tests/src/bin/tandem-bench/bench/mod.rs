//! `tandem-bench`: measures Tandem against the physical limits of this
//! machine and against what users would use instead (`cp`, `rsync` over
//! ssh, `db_hotbackup`), all in one run, and prints a Markdown report with
//! medians over several runs and ratios against baselines measured in the
//! same run.
//!
//! Started by `bench/run`, which installs what is needed and builds the
//! release binaries first; never part of `cargo test` (nothing here is a
//! timed test). What each figure means and its caveats: `bench/README.md`.
//!
//! Sections (each can be selected with
//! `BENCH_ONLY=copy,restore,lag,cost,promote,resume,large,slowlink,wait,s3`):
//! 1. `copy`: base copy of an environment of `BENCH_SIZE_MB` over loopback
//!    mTLS, against cp, rsync over ssh, db_hotbackup, raw loopback TCP, disk
//!    and blake3 limits; page cache dropped ("cold") and/or warm.
//! 2. `lag`: commit-to-durable-on-standby delay per commit, at a fixed rate
//!    and unthrottled.
//! 3. `cost`: the workload's commit rate with and without Tandem attached,
//!    and the primary's CPU time and peak RSS while streaming.
//! 4. `promote`: `tandem-standby promote` (failover) after N MB of log.
//! 5. `resume`: bytes sent after a standby `kill -9` and restart, against a
//!    full copy.
//! 6. `restore`: `tandem-standby restore` of a backup of section 1's mirror,
//!    against cp + `db_recover -c` of the same bytes.
//! 7. `large`: base copy, rebase and promotion of a `BENCH_LARGE_GB`
//!    environment against cp and rsync, with the daemons' memory sampled.
//! 8. `slowlink`: base copy, log catch-up and commit → durable over a
//!    rate-limited, delayed link between two network namespaces, with and
//!    without zstd.
//! 9. `wait`: waiting after each commit until it is durable on the standby:
//!    latency at 1,000 commits/s, and a multi-threaded commit rate with and
//!    without waiting.
//! 10. `s3`: `archive --to s3://` and `restore --from s3://` of section 1's
//!     mirror against a loopback S3 server, against `cp -r` of the bytes.

use anyhow::{anyhow, bail, Context, Result};
use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::fs::File;
use std::io::{Read, Write};
use std::net::{TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Command, ExitStatus, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};
use tandem_shared::envlayout::EnvLayout;
use tandem_shared::logfile::walk_file;
use tandem_shared::tls::TlsFiles;
use tandem_shared::wire::StatusRequest;
use tandem_shared::LogPosition;
use tandem_tests::bdb::{self, WorkloadOptions};
use tandem_tests::harness::{
    self, copy_env, free_addr, free_port, lsn_of, primary_log_end, scrape_metrics, standby_status,
    start_caught_up, start_primary, start_standby, wait_caught_up_running, wait_for,
    wait_while_running, Certs, Primary, Proc,
};

pub(crate) mod config;
pub(crate) mod copy;
pub(crate) mod cost;
pub(crate) mod floor;
pub(crate) mod lag;
pub(crate) mod large;
pub(crate) mod load;
pub(crate) mod netns;
pub(crate) mod promote;
pub(crate) mod report;
pub(crate) mod restore;
pub(crate) mod resume;
pub(crate) mod s3;
pub(crate) mod slowlink;
pub(crate) mod stats;
pub(crate) mod system;
pub(crate) mod wait;

pub(crate) use config::*;
pub(crate) use copy::*;
pub(crate) use cost::*;
pub(crate) use floor::*;
pub(crate) use lag::*;
pub(crate) use load::*;
pub(crate) use report::*;
pub(crate) use stats::*;
pub(crate) use system::*;

const MIB: f64 = 1024.0 * 1024.0;
/// The name `harness::start_standby` gives every standby.
const STANDBY_NAME: &str = "test-standby";
/// Log file size of the streaming environments (BDB-NOTES.md §5 used 10 MB).
const LG_MAX: u64 = 10 << 20;
/// Log file size of the base-copy environment: small, so that the little log
/// written in section 5 still moves the checkpoint into a later file, which
/// a rebase needs.
const BIG_LG_MAX: u64 = 1 << 20;

pub(crate) struct Bench {
    pub(crate) cfg: Config,
    pub(crate) root: tempfile::TempDir,
    pub(crate) certs: Certs,
    pub(crate) can_drop_caches: bool,
}

/// The large environment of section 1, kept for section 5.
pub(crate) struct BigEnv {
    pub(crate) env: PathBuf,
    pub(crate) files: Vec<(String, u64)>,
    pub(crate) bytes: u64,
    pub(crate) primary: Option<Primary>,
    /// A complete standby directory left by the last Tandem copy, and the
    /// bytes that copy received (files + log).
    pub(crate) standby: Option<(PathBuf, u64)>,
    /// Median time of Tandem's warm (or only) base copy, for comparison.
    pub(crate) copy_secs: Option<f64>,
}

/// The small environment the streaming sections start from.
pub(crate) struct Seed {
    pub(crate) env: PathBuf,
    pub(crate) last: u64,
}

/// A section's Markdown and its rows for the targets table.
#[derive(Default)]
pub(crate) struct Section {
    pub(crate) md: String,
    pub(crate) targets: Vec<Target>,
}

pub(crate) struct Target {
    pub(crate) what: String,
    pub(crate) goal: String,
    pub(crate) measured: String,
    pub(crate) met: Option<bool>,
}

impl Section {
    /// Notes what the load probe saw while the section ran.
    pub(crate) fn with_probe(mut self, probe: &ProbeReport) -> Self {
        let _ = writeln!(
            self.md,
            "_Scheduler probe over this section: {}._\n",
            probe.describe()
        );
        self
    }
}

impl Bench {
    pub(crate) fn path(&self, rel: &str) -> PathBuf {
        self.root.path().join(rel)
    }

    pub(crate) fn tls(&self) -> TlsFiles {
        let d = &self.certs.dir;
        TlsFiles {
            cert: d.join("standby.pem"),
            key: d.join("standby-key.pem"),
            ca: d.join("ca.pem"),
        }
    }

    /// Streaming workload options: small values, several updates per
    /// transaction (BDB-NOTES.md §5: about 1.6 KB of log per transaction).
    pub(crate) fn stream_workload(&self) -> WorkloadOptions {
        WorkloadOptions {
            txns: 0,
            checkpoint_every: 1000,
            lg_max: LG_MAX,
            updates: 3,
            value_len: 100,
            quiet: true,
            ..Default::default()
        }
    }

    pub(crate) fn make_seed(&self) -> Result<Seed> {
        let env = self.path("seed-env");
        let last = bdb::run_workload(
            &env,
            &WorkloadOptions {
                txns: 2000,
                ..self.stream_workload()
            },
        )?;
        sync_all();
        Ok(Seed { env, last })
    }

    /// `db_checkpoint -1` of `env`: a rebase needs BDB's needed log past
    /// the base.
    pub(crate) fn checkpoint(&self, env: &Path) -> Result<()> {
        run_cmd(
            "db5.3_checkpoint",
            tool("db5.3_checkpoint", &["-1", "-h"], env),
            Duration::from_secs(600),
            &self.path("checkpoint.log"),
        )?;
        Ok(())
    }

    /// [`Self::checkpoint`], then `db_archive -d`: only the log still
    /// needed stays, so a built environment's log never piles up.
    pub(crate) fn checkpoint_and_archive(&self, env: &Path) -> Result<()> {
        self.checkpoint(env)?;
        run_cmd(
            "db5.3_archive -d",
            tool("db5.3_archive", &["-d", "-h"], env),
            Duration::from_secs(600),
            &self.path("archive.log"),
        )?;
        Ok(())
    }

    /// Builds an environment of about `size_mb` MiB of database pages: each
    /// transaction adds three 4,000-byte values (one overflow page each),
    /// then a checkpoint and `db_archive -d` leave only the log still needed.
    pub(crate) fn make_big_env(&self) -> Result<BigEnv> {
        let env = self.path("big-env");
        let txns = (self.cfg.size_mb << 20) / (3 * 4096);
        let started = Instant::now();
        let opts = WorkloadOptions {
            checksum: self.cfg.checksum,
            ..big_values(txns)
        };
        bdb::run_workload(&env, &opts)?;
        self.checkpoint_and_archive(&env)?;
        sync_all();
        let layout = EnvLayout::open(&env)?;
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
        let bytes = files.iter().map(|f| f.1).sum();
        progress(format!(
            "built a {:.0} MiB environment ({} files, {txns} transactions{}) in {:.1} s",
            bytes as f64 / MIB,
            files.len(),
            if self.cfg.checksum { ", DB_CHKSUM" } else { "" },
            started.elapsed().as_secs_f64()
        ));
        Ok(BigEnv {
            env,
            files,
            bytes,
            primary: None,
            standby: None,
            copy_secs: None,
        })
    }
}

pub(crate) fn tool(name: &str, args: &[&str], env: &Path) -> Command {
    let mut c = Command::new(name);
    c.args(args).arg(env);
    c
}

/// The workload that builds a big environment: `txns` transactions of
/// three 4,000-byte values each (one overflow page per value), 1 MiB log
/// files.
pub(crate) fn big_values(txns: u64) -> WorkloadOptions {
    WorkloadOptions {
        txns,
        value_len: 4000,
        updates: 0,
        lg_max: BIG_LG_MAX,
        cache_mb: Some(256),
        checkpoint_every: 20_000,
        quiet: true,
        ..Default::default()
    }
}
