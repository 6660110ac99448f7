//! Section 6, `restore`: `tandem-standby restore` of a backup of section
//! 1's mirror, against what an operator would do by hand with the same
//! bytes: `cp -r` of the backup + `sync`, then `db_recover -c`.

use super::*;

struct RestoreRun {
    restore: f64,
    /// Of which BDB's recovery (the restore's report).
    restore_recovery: f64,
    /// Databases restore ran `db_verify` on (0: the manifest's proof held).
    verified: u64,
    cp: f64,
    recover: f64,
}

impl Bench {
    pub(crate) fn section_restore(&self, big: &BigEnv) -> Result<Section> {
        let (mirror, _) = big
            .standby
            .as_ref()
            .context("no standby directory from section 1 (run the copy section too)")?;
        let archive = self.path("restore-archive");
        remove_dir(&archive);
        let mut c = Command::new(harness::bin("tandem-standby"));
        c.arg("archive")
            .arg("--dir")
            .arg(mirror)
            .arg("--to")
            .arg(&archive)
            .arg("--json");
        let out = cmd_stdout(
            "tandem-standby archive",
            c,
            copy_timeout(big.bytes),
            &self.path("restore-archive.log"),
        )?;
        let report: serde_json::Value =
            serde_json::from_str(&out).with_context(|| format!("archive output: {out}"))?;
        let backup = PathBuf::from(
            report["backup"]
                .as_str()
                .context("archive report: backup")?,
        );
        let bytes = report["bytes"].as_u64().unwrap_or(0);
        let result = self.restore_runs(&backup, bytes);
        remove_dir(&archive);
        let runs = result?;

        let mut s = Section::default();
        let _ = writeln!(
            s.md,
            "## 6. Restore from an archive\n\nA backup of section 1's mirror ({} bytes, `tandem-standby archive`, which proves it recovers and \
             passes `db_verify` before publishing it and seals that proof into its manifest), restored into a new environment home; page cache \
             dropped before each. Tandem: `tandem-standby restore --from BACKUP --to NEWENV` (checks the listing against the manifest, copies \
             every file hashing each byte as it goes (blake3 against the manifest), walks the log chain, fsyncs, `db_recover -c`, `db_verify` \
             only when the manifest's proof does not cover these bytes and this end (here it does), renames into place). By hand: `cp -r` of \
             the backup + `sync`, then `db5.3_recover -c` (no checks, no verify). Median of {} run(s) (min–max).\n",
            bytes,
            runs.len()
        );
        let col = |f: &dyn Fn(&RestoreRun) -> f64| runs.iter().map(f).collect::<Vec<f64>>();
        let by_hand = col(&|r| r.cp + r.recover);
        let _ = writeln!(
            s.md,
            "| method | time s | of which recovery s | databases `db_verify`ed |\n|---|---|---|---|"
        );
        let _ = writeln!(
            s.md,
            "| **`tandem-standby restore`** | {} | {} | {} |",
            spread(&col(&|r| r.restore), 2),
            spread(&col(&|r| r.restore_recovery), 2),
            runs.iter()
                .map(|r| r.verified.to_string())
                .collect::<Vec<_>>()
                .join(", ")
        );
        let _ = writeln!(
            s.md,
            "| `cp -r` + `sync` + `db5.3_recover -c` | {} | {} | — |\n",
            spread(&by_hand, 2),
            spread(&col(&|r| r.recover), 2)
        );
        let _ = writeln!(
            s.md,
            "Restore ÷ by hand: {:.2}× (medians).\n",
            median(&col(&|r| r.restore)) / median(&by_hand)
        );
        Ok(s)
    }

    fn restore_runs(&self, backup: &Path, bytes: u64) -> Result<Vec<RestoreRun>> {
        let target = self.path("restore-target");
        let mut runs = Vec::new();
        for run in 0..self.cfg.runs {
            remove_dir(&target);
            drop_caches();
            let mut c = Command::new(harness::bin("tandem-standby"));
            c.arg("restore")
                .arg("--from")
                .arg(backup)
                .arg("--to")
                .arg(&target)
                .arg("--json");
            let started = Instant::now();
            let out = cmd_stdout(
                "tandem-standby restore",
                c,
                copy_timeout(bytes),
                &self.path("restore.log"),
            )?;
            let restore = started.elapsed().as_secs_f64();
            let v: serde_json::Value =
                serde_json::from_str(&out).with_context(|| format!("restore output: {out}"))?;
            let restore_recovery = v["recovery_seconds"].as_f64().unwrap_or(f64::NAN);
            let verified = v["databases_verified"].as_u64().unwrap_or(0);
            remove_dir(&target);

            drop_caches();
            let started = Instant::now();
            let mut c = Command::new("cp");
            c.arg("-r").arg(backup).arg(&target);
            run_cmd("cp", c, copy_timeout(bytes), &self.path("restore-cp.log"))?;
            sync_all();
            let cp = started.elapsed().as_secs_f64();
            let recover = run_cmd(
                "db5.3_recover -c",
                tool("db5.3_recover", &["-c", "-h"], &target),
                Duration::from_secs(3600),
                &self.path("restore-recover.log"),
            )?
            .as_secs_f64();
            remove_dir(&target);
            progress(format!(
                "restore run {}/{}: restore {restore:.2} s (recovery {restore_recovery:.2}), cp {cp:.2} s + db_recover {recover:.2} s",
                run + 1,
                self.cfg.runs
            ));
            runs.push(RestoreRun {
                restore,
                restore_recovery,
                verified,
                cp,
                recover,
            });
        }
        Ok(runs)
    }
}
