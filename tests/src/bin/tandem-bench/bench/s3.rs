//! Section 10, `s3`: archiving section 1's mirror to an S3 server on
//! loopback (s3s-fs, `tandem_tests::s3_server`) and restoring from it,
//! against `cp -r` of the same bytes (a local backup of the same mirror).

use super::*;
use tandem_tests::s3_server::{start_s3, S3Server};

struct S3Run {
    archive: f64,
    restore: f64,
    restore_recovery: f64,
    cp: f64,
    /// Peak RSS (MiB) of the archive and restore processes, when
    /// /usr/bin/time is there to tell.
    archive_rss: Option<f64>,
    restore_rss: Option<f64>,
}

const TIME: &str = "/usr/bin/time";

/// Runs `tandem-standby ARGS` against `s3` (under /usr/bin/time when it
/// exists, its peak RSS written to `log`.rss): its JSON output.
fn standby_json(s3: &S3Server, args: &[&str], log: &Path, bytes: u64) -> Result<serde_json::Value> {
    let rss = log.with_extension("rss");
    let _ = std::fs::remove_file(&rss);
    let mut c = if Path::new(TIME).exists() {
        let mut c = Command::new(TIME);
        c.args(["-f", "%M", "-o"])
            .arg(&rss)
            .arg(harness::bin("tandem-standby"));
        c
    } else {
        Command::new(harness::bin("tandem-standby"))
    };
    c.args(args);
    for (k, v) in s3.env() {
        c.env(k, v);
    }
    let out = cmd_stdout("tandem-standby", c, copy_timeout(bytes), log)?;
    serde_json::from_str(&out).with_context(|| format!("output: {out}"))
}

/// The peak RSS (MiB) /usr/bin/time recorded for the run logged at `log`.
fn peak_rss(log: &Path) -> Option<f64> {
    let text = std::fs::read_to_string(log.with_extension("rss")).ok()?;
    let kib: f64 = text.lines().last()?.trim().parse().ok()?;
    Some(kib / 1024.0)
}

impl Bench {
    pub(crate) fn section_s3(&self, big: &BigEnv) -> Result<Section> {
        let (mirror, _) = big
            .standby
            .as_ref()
            .context("no standby directory from section 1 (run the copy section too)")?;
        let mirror = mirror.to_str().context("mirror path")?;
        // The bytes of a backup, on local disk, for the cp baseline.
        let local = self.path("s3-local-archive");
        remove_dir(&local);
        let mut c = Command::new(harness::bin("tandem-standby"));
        c.args(["archive", "--no-verify", "--json", "--dir", mirror, "--to"])
            .arg(&local);
        let out = cmd_stdout(
            "tandem-standby archive",
            c,
            copy_timeout(big.bytes),
            &self.path("s3-local.log"),
        )?;
        let report: serde_json::Value = serde_json::from_str(&out)?;
        let backup = PathBuf::from(report["backup"].as_str().context("backup")?);
        let bytes = report["bytes"].as_u64().unwrap_or(0);
        let target = self.path("s3-target");
        let mut runs = Vec::new();
        for run in 0..self.cfg.runs {
            let dir = self.path(&format!("s3-server-{run}"));
            remove_dir(&dir);
            std::fs::create_dir_all(&dir)?;
            let s3 = start_s3(&dir)?;
            let url = s3.url("bench");
            drop_caches();
            let started = Instant::now();
            standby_json(
                &s3,
                &[
                    "archive",
                    "--no-verify",
                    "--json",
                    "--dir",
                    mirror,
                    "--to",
                    &url,
                ],
                &self.path("s3-archive.log"),
                bytes,
            )?;
            sync_all();
            let archive = started.elapsed().as_secs_f64();
            let archive_rss = peak_rss(&self.path("s3-archive.log"));
            remove_dir(&target);
            drop_caches();
            let started = Instant::now();
            let t = target.to_str().context("target")?;
            let v = standby_json(
                &s3,
                &["restore", "--json", "--from", &url, "--to", t],
                &self.path("s3-restore.log"),
                bytes,
            )?;
            let restore = started.elapsed().as_secs_f64();
            let restore_rss = peak_rss(&self.path("s3-restore.log"));
            let restore_recovery = v["recovery_seconds"].as_f64().unwrap_or(f64::NAN);
            remove_dir(&target);
            drop(s3);
            remove_dir(&dir);
            drop_caches();
            let started = Instant::now();
            let mut c = Command::new("cp");
            c.arg("-r").arg(&backup).arg(&target);
            run_cmd("cp", c, copy_timeout(bytes), &self.path("s3-cp.log"))?;
            sync_all();
            let cp = started.elapsed().as_secs_f64();
            remove_dir(&target);
            progress(format!(
                "s3 run {}/{}: archive {archive:.2} s, restore {restore:.2} s (recovery {restore_recovery:.2}), cp {cp:.2} s",
                run + 1,
                self.cfg.runs
            ));
            runs.push(S3Run {
                archive,
                restore,
                restore_recovery,
                cp,
                archive_rss,
                restore_rss,
            });
        }
        remove_dir(&local);
        let col = |f: &dyn Fn(&S3Run) -> f64| runs.iter().map(f).collect::<Vec<f64>>();
        let mib = bytes as f64 / 1048576.0;
        let mut s = Section::default();
        let _ = writeln!(
            s.md,
            "## 10. Archive to and restore from S3 on loopback\n\nSection 1's mirror ({bytes} bytes) archived with `tandem-standby archive --no-verify --to s3://…` \
             (staged on local disk, then uploaded: 4 objects at a time, SHA-256 checked by the server) to s3s-fs on 127.0.0.1 (an empty bucket each run), \
             then `restore --from s3://…` (parallel download, blake3 of every byte, `db_recover -c`, `db_verify`). Baseline: `cp -r` of a local backup \
             of the same bytes + `sync`. Page cache dropped before each. The server writes to the same disk. Median of {} run(s) (min–max).\n",
            runs.len()
        );
        let _ = writeln!(s.md, "| what | time s | MiB/s |\n|---|---|---|");
        for (name, v) in [
            ("**archive to S3**", col(&|r| r.archive)),
            ("**restore from S3**", col(&|r| r.restore)),
            (
                "restore's recovery (in the line above)",
                col(&|r| r.restore_recovery),
            ),
            ("`cp -r` + `sync`", col(&|r| r.cp)),
        ] {
            let _ = writeln!(
                s.md,
                "| {name} | {} | {:.0} |",
                spread(&v, 2),
                mib / median(&v)
            );
        }
        let _ = writeln!(
            s.md,
            "\nArchive ÷ cp: {:.2}×; restore ÷ cp: {:.2}× (medians).\n",
            median(&col(&|r| r.archive)) / median(&col(&|r| r.cp)),
            median(&col(&|r| r.restore)) / median(&col(&|r| r.cp))
        );
        let rss = |f: &dyn Fn(&S3Run) -> Option<f64>| {
            let v: Vec<f64> = runs.iter().filter_map(f).collect();
            (!v.is_empty()).then(|| v.iter().cloned().fold(0.0, f64::max))
        };
        if let (Some(a), Some(r)) = (rss(&|r| r.archive_rss), rss(&|r| r.restore_rss)) {
            let _ = writeln!(
                s.md,
                "Peak RSS (largest of the runs): archive {a:.0} MiB, restore {r:.0} MiB, for {mib:.0} MiB of backup.\n"
            );
        }
        Ok(s)
    }
}
