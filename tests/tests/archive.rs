//! Issue 4: archival copies with point-in-time restore (`tandem-standby
//! archive`, `verify-archive`, `restore`): one backup taken while streaming,
//! verified, damaged, restored whole or `--until` a time. The continuous
//! archive (`archive --follow`) is in `archive_follow.rs`; the commands are
//! run by `tandem_tests::archive_cmd`. Real binaries, real Berkeley DB,
//! mutual TLS on loopback.

use anyhow::{ensure, Context, Result};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;
use tandem_shared::LogPosition;
use tandem_tests::archive_cmd::{
    archive, hot_workload, pair, restore, stop_extended_follower, verify, LONG,
};
use tandem_tests::bdb::{self, WORKLOAD_DBS};
use tandem_tests::harness::*;

/// The clock BDB stamps commits with: `time(NULL)`, which glibc reads from
/// the coarse real-time clock. It turns a second a few milliseconds after
/// `SystemTime::now()` does; a phase started when `SystemTime` said "next
/// second" had ~90 commits stamped with the previous one (1 run in 20).
fn now_unix() -> i64 {
    // SAFETY: time(3) with a null pointer only returns the time.
    unsafe { libc::time(std::ptr::null_mut()) }
}

/// Waits until the wall clock has moved past second `t` (a condition, not a
/// fixed sleep): every commit from now on is stamped after `t`.
fn wait_past_second(t: i64) -> Result<()> {
    wait_for(
        "the clock to pass a second boundary",
        Duration::from_secs(5),
        || Ok(now_unix() > t),
    )
}

fn dir_size(dir: &Path) -> u64 {
    dir_digest(dir)
        .map(|m| {
            m.keys()
                .map(|k| {
                    std::fs::metadata(dir.join(k))
                        .map(|md| md.len())
                        .unwrap_or(0)
                })
                .sum()
        })
        .unwrap_or(0)
}

#[test]
fn an_archive_taken_while_streaming_restores_exactly_what_the_primary_had_committed() -> Result<()>
{
    let p = pair(2000)?;
    let s = &p.s;
    // Hot: the workload runs while the archive is taken.
    let (mut w, lsns) = hot_workload(s)?;
    let hot = archive(&s.path("standby"), &s.path("archive"), &[])?;
    let hot_backup = PathBuf::from(hot.json["backup"].as_str().context("backup")?);
    let hot_end = lsn_of(&hot.json["log_end"]);
    assert_eq!(hot.json["action"], "created");
    assert_eq!(
        hot.json["verified"], true,
        "a new backup is proven recoverable before it is published"
    );
    assert!(w.wait_exit(LONG)?.success(), "{}", w.log_text());
    let last = bdb::parse_done(&w.log_text()).context("DONE")?;

    // Replication went on: the standby holds everything.
    wait_caught_up(&s.path("standby"), &s.path("env"), LONG)?;
    assert_eq!(standby_status(&s.path("standby"))?["connected"], true);

    // The hot backup holds exactly the transactions whose commit it holds.
    let commits = bdb::read_lsn_log(&lsns)?;
    let expected = commits
        .iter()
        .filter(|(_, f, o)| LogPosition::new(*f, *o) <= hot_end)
        .map(|c| c.0)
        .max()
        .unwrap_or(2000);
    assert!(
        expected > 2000 && expected < last,
        "the hot archive ended at {hot_end}, commit {expected} of {last}"
    );
    let hv = verify(&hot_backup)?;
    ensure!(hv.ok(), "verify-archive failed: {}{}", hv.stdout, hv.stderr);
    assert_eq!(hv.json[0]["ok"], true);
    assert!(hv.json[0]["databases_verified"].as_u64() >= Some(3));
    let hr = restore(&hot_backup, &s.path("restored-hot"), None, &[])?;
    ensure!(hr.ok(), "restore failed: {}{}", hr.stdout, hr.stderr);
    assert_eq!(bdb::check(&s.path("restored-hot"))?, expected);

    // At rest: archiving changes nothing in the mirror.
    let before = env_digest(&s.path("standby"))?;
    let cold = archive(&s.path("standby"), &s.path("archive"), &["--keep", "1"])?;
    assert_eq!(
        before,
        env_digest(&s.path("standby"))?,
        "archiving changed the mirror"
    );
    assert_eq!(
        cold.json["removed"].as_array().map(Vec::len),
        Some(1),
        "--keep 1 deletes the older backup: {}",
        cold.json
    );
    assert!(!hot_backup.exists());
    assert_eq!(
        lsn_of(&cold.json["log_end"]),
        primary_log_end(&s.path("env"))?
    );
    let v = verify(&s.path("archive"))?; // the archive: its newest backup
    ensure!(v.ok(), "verify-archive failed: {}{}", v.stdout, v.stderr);
    let r = restore(&s.path("archive"), &s.path("restored"), None, &[])?;
    ensure!(r.ok(), "restore failed: {}{}", r.stdout, r.stderr);
    assert_eq!(bdb::check(&s.path("restored"))?, last);
    assert_eq!(
        bdb::db_dump_all(&s.path("env"), &WORKLOAD_DBS)?,
        bdb::db_dump_all(&s.path("restored"), &WORKLOAD_DBS)?,
        "db_dump differs"
    );
    // The environment as the primary has it: no DB_CONFIG (recovery's cache
    // setting is removed again), and where it came from, in a hidden file.
    assert!(!s.path("restored/DB_CONFIG").exists());
    let info: serde_json::Value =
        serde_json::from_slice(&std::fs::read(s.path("restored/.tandem-restore.json"))?)?;
    assert_eq!(info["restored_from"], cold.json["backup"]);
    // Applications open it and go on.
    assert_eq!(
        bdb::run_workload(&s.path("restored"), &workload(10, 500))?,
        last + 10
    );
    assert_eq!(bdb::check(&s.path("restored"))?, last + 10);

    eprintln!(
        "MEASURED hot archive {:.2} s (copy {:.2} s, proof {:.2} s, recovery {:.2} s), {} bytes, {} files, log {}..{}; verify-archive {:.2} s; restore {:.2} s; \
         cold archive {:.2} s, {} bytes; restore {:.2} s; backup dir on disk {} bytes",
        hot.secs,
        hot.json["copy_seconds"].as_f64().unwrap_or(0.0),
        hot.json["verify_seconds"].as_f64().unwrap_or(0.0),
        hot.json["recovery_seconds"].as_f64().unwrap_or(0.0),
        hot.json["bytes"],
        hot.json["files"],
        lsn_of(&hot.json["log_start"]),
        hot_end,
        hv.secs,
        hr.secs,
        cold.secs,
        cold.json["bytes"],
        r.secs,
        dir_size(Path::new(cold.json["backup"].as_str().unwrap_or(""))),
    );
    drop(p.standby);
    Ok(())
}

/// `__txn_regop` commit timestamps as `db5.3_printlog` prints them:
/// "[1][8712]__txn_regop: ..." then "\topcode: 1" and
/// "\ttimestamp: 1795636598 (Wed Nov 25 19:56:38 2026, 202611251956.38)".
fn printlog_commit_times(home: &Path) -> Result<Vec<i64>> {
    let out = Command::new("db5.3_printlog")
        .arg("-h")
        .arg(home)
        .output()?;
    ensure!(
        out.status.success(),
        "db5.3_printlog: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let text = String::from_utf8_lossy(&out.stdout);
    let mut times = Vec::new();
    let mut in_regop = false;
    let mut commit = false;
    for line in text.lines() {
        if line.starts_with('[') {
            in_regop = line.contains("__txn_regop:");
            commit = false;
        } else if in_regop && line.trim() == "opcode: 1" {
            commit = true;
        } else if in_regop && commit {
            if let Some(v) = line.trim().strip_prefix("timestamp: ") {
                times.push(v.split_whitespace().next().unwrap_or("").parse()?);
            }
        }
    }
    Ok(times)
}

#[test]
fn until_restores_exactly_the_transactions_committed_by_then() -> Result<()> {
    let p = pair(1000)?;
    let s = &p.s;
    let last_a = bdb::run_workload(&s.path("env"), &workload(1500, 500))?;
    let t_a = now_unix();
    wait_past_second(t_a)?;
    let last_b = bdb::run_workload(&s.path("env"), &workload(1500, 500))?;
    wait_caught_up(&s.path("standby"), &s.path("env"), LONG)?;
    let made = archive(&s.path("standby"), &s.path("archive"), &["--no-verify"])?;
    let backup = PathBuf::from(made.json["backup"].as_str().context("backup")?);

    // The commit times in the manifest are the ones BDB itself prints.
    let m: serde_json::Value =
        serde_json::from_slice(&std::fs::read(backup.join("MANIFEST.json"))?)?;
    let printed = printlog_commit_times(&backup)?;
    assert_eq!(m["commits"].as_u64(), Some(printed.len() as u64));
    assert_eq!(m["first_commit_unix"].as_i64(), printed.first().copied());
    assert_eq!(
        m["last_commit_unix"].as_i64(),
        printed.iter().max().copied()
    );
    let first = m["first_commit_unix"].as_i64().context("first commit")?;
    let last_t = m["last_commit_unix"].as_i64().context("last commit")?;
    let earliest = first.max(
        m["earliest_checkpoint_unix"]
            .as_i64()
            .context("a checkpoint")?,
    );
    assert!(
        earliest <= t_a && t_a < last_t,
        "window {earliest}..{last_t}, t_a {t_a}"
    );

    // Every accepted spelling of t_a restores exactly phase A.
    let forms: Vec<(String, Vec<(&str, &str)>)> = vec![
        (format!("@{t_a}"), vec![]),
        (date(t_a, "UTC0", "%Y-%m-%dT%H:%M:%SZ")?, vec![]),
        (date(t_a, "EST5", "%Y-%m-%dT%H:%M:%S-05:00")?, vec![]),
        // Local time, in a zone nine hours east of UTC: restore converts it,
        // and db_recover (which reads -t as local time) is not confused.
        (
            date(t_a, "JST-9", "%Y-%m-%d %H:%M:%S")?,
            vec![("TZ", "JST-9")],
        ),
        (date(t_a, "JST-9", "%Y%m%d%H%M.%S")?, vec![("TZ", "JST-9")]),
    ];
    for (i, (form, env)) in forms.iter().enumerate() {
        let to = s.path(&format!("pit-{i}"));
        let r = restore(&backup, &to, Some(form), env)?;
        ensure!(
            r.ok(),
            "restore --until {form} failed: {}{}",
            r.stdout,
            r.stderr
        );
        assert_eq!(bdb::check(&to)?, last_a, "--until {form} ({env:?})");
        assert_eq!(r.json["until_unix"].as_i64(), Some(t_a), "{form}");
        assert!(r.json["last_commit_kept"].as_str() <= r.json["until"].as_str());
        eprintln!(
            "MEASURED restore --until {form}: {:.2} s (recovery {:.2} s)",
            r.secs,
            r.json["recovery_seconds"].as_f64().unwrap_or(0.0)
        );
    }
    // The point-in-time environment is one applications open and write.
    assert_eq!(
        bdb::run_workload(&s.path("pit-0"), &workload(10, 500))?,
        last_a + 10
    );
    assert_eq!(bdb::check(&s.path("pit-0"))?, last_a + 10);
    // At the last commit: everything.
    let r = restore(
        &backup,
        &s.path("pit-last"),
        Some(&format!("@{last_t}")),
        &[],
    )?;
    ensure!(r.ok(), "{}{}", r.stdout, r.stderr);
    assert_eq!(bdb::check(&s.path("pit-last"))?, last_b);

    // Outside the window: refused before anything is written.
    for t in [earliest - 1, last_t + 1, now_unix() + 3600] {
        let to = s.path("outside");
        let r = restore(&backup, &to, Some(&format!("@{t}")), &[])?;
        assert_eq!(r.code, Some(1), "--until @{t}: {}{}", r.stdout, r.stderr);
        assert!(
            r.stderr.contains("outside the restorable window"),
            "{}",
            r.stderr
        );
        assert!(!to.exists());
    }
    // The archive directory picks the backup whose window holds the time.
    let r = restore(
        &s.path("archive"),
        &s.path("outside"),
        Some(&format!("@{}", last_t + 1)),
        &[],
    )?;
    assert_eq!(r.code, Some(1));
    assert!(
        r.stderr
            .contains("no backup in the archive covers that time"),
        "{}",
        r.stderr
    );
    assert!(!s.path("outside").exists());
    // Not a time at all: a usage error.
    let r = restore(&backup, &s.path("outside"), Some("yesterday"), &[])?;
    assert_eq!(r.code, Some(2), "{}", r.stderr);
    assert!(
        leftovers(s.root())?.is_empty(),
        "{:?}",
        leftovers(s.root())?
    );
    drop(p.standby);
    Ok(())
}

/// `date -d @t +FORMAT` with TZ set: an independent spelling of a time.
fn date(t: i64, tz: &str, format: &str) -> Result<String> {
    let out = Command::new("date")
        .env("TZ", tz)
        .arg("-d")
        .arg(format!("@{t}"))
        .arg(format!("+{format}"))
        .output()?;
    ensure!(out.status.success(), "date failed");
    Ok(String::from_utf8_lossy(&out.stdout).trim().to_owned())
}

/// Temp directories a restore might have left beside its target.
fn leftovers(dir: &Path) -> Result<Vec<String>> {
    Ok(std::fs::read_dir(dir)?
        .flatten()
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .filter(|n| n.contains("tandem-restore"))
        .collect())
}

#[test]
fn damaged_backups_are_named_by_verify_and_refused_by_restore() -> Result<()> {
    let p = pair(3000)?;
    let s = &p.s;
    // Proven when archived: restore relies on the proof instead of running
    // db_verify again, so each damage below must be caught by the bytes.
    let made = archive(&s.path("standby"), &s.path("archive"), &[])?;
    let backup = PathBuf::from(made.json["backup"].as_str().context("backup")?);
    let name = backup.file_name().context("name")?.to_owned();
    let v = verify(&backup)?;
    ensure!(
        v.ok(),
        "the intact backup must verify: {}{}",
        v.stdout,
        v.stderr
    );
    let log_start = lsn_of(&made.json["log_start"]).file;
    let log = format!("log.{log_start:010}");

    type Damage = Box<dyn Fn(&Path) -> Result<()>>;
    let damages: Vec<(&str, Damage, &str)> = vec![
        (
            "flipped byte",
            Box::new(move |b: &Path| {
                let p = b.join(format!("log.{log_start:010}"));
                let mut bytes = std::fs::read(&p)?;
                bytes[5000] ^= 0x01;
                Ok(std::fs::write(&p, bytes)?)
            }),
            "altered",
        ),
        (
            "flipped database byte",
            Box::new(|b: &Path| {
                let p = b.join("data.db");
                let mut bytes = std::fs::read(&p)?;
                let at = bytes.len() / 2;
                bytes[at] ^= 0x10;
                Ok(std::fs::write(&p, bytes)?)
            }),
            "data.db: altered",
        ),
        (
            "missing file",
            Box::new(|b: &Path| Ok(std::fs::remove_file(b.join("meta.db"))?)),
            "meta.db: missing",
        ),
        (
            "extra file",
            Box::new(|b: &Path| Ok(std::fs::write(b.join("stray.db"), b"x")?)),
            "stray.db: extra file",
        ),
        (
            "edited manifest",
            Box::new(|b: &Path| {
                let p = b.join("MANIFEST.json");
                let text = std::fs::read_to_string(&p)?;
                Ok(std::fs::write(
                    &p,
                    text.replacen("\"epoch\": 1", "\"epoch\": 7", 1),
                )?)
            }),
            "manifest digest mismatch",
        ),
    ];
    for (i, (what, damage, says)) in damages.iter().enumerate() {
        let copy_dir = s.path(&format!("damaged-{i}"));
        std::fs::create_dir_all(&copy_dir)?;
        let copy = copy_dir.join(&name);
        copy_backup(&backup, &copy)?;
        damage(&copy)?;
        let v = verify(&copy)?;
        assert_eq!(
            v.code,
            Some(1),
            "{what}: verify-archive passed: {}",
            v.stdout
        );
        let text = format!("{}{}", v.stdout, v.stderr);
        assert!(
            text.contains(says),
            "{what}: verify-archive does not say {says:?}: {text}"
        );
        if *what == "flipped byte" {
            assert!(text.contains(&log), "{what}: the file is not named: {text}");
        }
        let to = s.path(&format!("restored-{i}"));
        let r = restore(&copy, &to, None, &[])?;
        assert_eq!(
            r.code,
            Some(1),
            "{what}: restore was not refused: {}",
            r.stdout
        );
        assert!(
            r.stderr.contains(says),
            "{what}: restore does not say {says:?}: {}",
            r.stderr
        );
        assert!(!to.exists(), "{what}: restore wrote its target");
    }
    assert!(leftovers(s.root())?.is_empty());

    // A target that exists and is not empty is refused and left alone.
    let busy = s.path("busy");
    std::fs::create_dir_all(&busy)?;
    std::fs::write(busy.join("keep.txt"), b"mine")?;
    let r = restore(&backup, &busy, None, &[])?;
    assert_eq!(r.code, Some(1), "{}", r.stdout);
    assert!(r.stderr.contains("exists and is not empty"), "{}", r.stderr);
    assert_eq!(std::fs::read_dir(&busy)?.count(), 1);
    assert_eq!(std::fs::read(busy.join("keep.txt"))?, b"mine");
    // An empty one is fine.
    std::fs::create_dir_all(s.path("empty"))?;
    let r = restore(&backup, &s.path("empty"), None, &[])?;
    ensure!(r.ok(), "{}{}", r.stdout, r.stderr);
    ensure!(
        r.json["proven_at_archive_unix_ms"].is_u64() && r.json["databases_verified"] == 0,
        "an intact, proven backup restores without db_verify again: {}",
        r.stdout
    );
    assert_eq!(bdb::check(&s.path("empty"))?, 3000);
    drop(p.standby);
    Ok(())
}

/// Loads a small btree database `extra.db` into the environment at `env`
/// (transactionally: `db5.3_load` joins the environment), which the test
/// workload never writes.
fn load_extra(env: &Path) -> Result<()> {
    use std::io::Write;
    let mut load = Command::new("db5.3_load")
        .args(["-T", "-t", "btree", "-h"])
        .arg(env)
        .arg("extra.db")
        .stdin(std::process::Stdio::piped())
        .spawn()?;
    let mut input = load.stdin.take().context("stdin")?;
    for i in 0..200 {
        writeln!(input, "key{i:04}\nvalue {i} {}", "x".repeat(100))?;
    }
    drop(input);
    ensure!(load.wait()?.success(), "db5.3_load failed");
    Ok(())
}

/// Issue 21: a backup `--follow` extended after its proof verifies, at
/// restore, only the databases the log after the proof touched: extra.db,
/// loaded before the base and never written since, is not verified again,
/// yet a byte flipped in it is still refused (its blake3); the workload's
/// databases, which the log after the proof writes, are verified; a restore
/// to a time after the proof's last commit the same; to a time before it,
/// every database.
#[test]
fn an_extended_backup_verifies_only_what_the_log_after_its_proof_touched() -> Result<()> {
    let s = Scratch::new()?;
    let (env, mirror) = (s.path("env"), s.path("standby"));
    bdb::run_workload(&env, &workload(1000, 500))?;
    load_extra(&env)?;
    let (_primary, mut standby) = start_pair(&s, &["--check-interval-secs", "0"])?;
    let last_a1 = bdb::run_workload(&env, &workload(1000, 500))?;
    let t_mid = now_unix();
    wait_past_second(t_mid)?;
    let last_a2 = bdb::run_workload(&env, &workload(1000, 500))?;
    wait_caught_up_running(&mirror, &env, LONG, &mut standby)?;
    let made = archive(&mirror, &s.path("archive"), &[])?;
    ensure!(
        made.json["verified"] == true,
        "{}{}",
        made.stdout,
        made.stderr
    );
    let backup = PathBuf::from(made.json["backup"].as_str().context("backup")?);
    let t_proof = now_unix();
    wait_past_second(t_proof)?;
    let last_b = bdb::run_workload(&env, &workload(1000, 500))?;
    wait_caught_up_running(&mirror, &env, LONG, &mut standby)?;
    let end = primary_log_end(&env)?;
    let mut cmd = Command::new(bin("tandem-standby"));
    cmd.args(["archive", "--json", "--follow", "1", "--dir"])
        .arg(&mirror)
        .arg("--to")
        .arg(s.path("archive"));
    let mut follower = Proc::spawn("archive --follow", cmd, &s.path("follow.log"))?;
    let manifest = || -> Result<serde_json::Value> {
        Ok(serde_json::from_slice(&std::fs::read(
            backup.join("MANIFEST.json"),
        )?)?)
    };
    wait_for("the backup to reach the primary's end", LONG, || {
        Ok(lsn_of(&manifest()?["log_end"]) == end)
    })?;
    stop_extended_follower(&mut follower, Duration::from_secs(30))?;
    let m = manifest()?;
    ensure!(
        m["proven"]["log_end"] == made.json["log_end"],
        "the extended backup keeps the proof of its shorter log: {m}"
    );

    let unchanged = serde_json::json!(["extra.db"]);
    for (name, until, expected) in [
        ("whole", None, last_b),
        ("after-proof", Some(format!("@{t_proof}")), last_a2),
    ] {
        let to = s.path(name);
        let r = restore(&backup, &to, until.as_deref(), &[])?;
        ensure!(r.ok(), "{name}: {}{}", r.stdout, r.stderr);
        ensure!(
            r.json["databases_verified"] == 3 && r.json["databases_unchanged"] == unchanged,
            "{name}: the log after the proof writes the three workload databases only: {}",
            r.stdout
        );
        assert_eq!(bdb::check(&to)?, expected, "{name}");
        assert_eq!(
            bdb::db_dump_all(&env, &["extra.db"])?,
            bdb::db_dump_all(&to, &["extra.db"])?,
            "{name}"
        );
        bdb::verify(&to, &["extra.db"])?;
    }
    let to = s.path("before-proof");
    let r = restore(&backup, &to, Some(&format!("@{t_mid}")), &[])?;
    ensure!(r.ok(), "{}{}", r.stdout, r.stderr);
    ensure!(
        r.json["databases_verified"] == 4
            && r.json["verified_everything_because"]
                .as_str()
                .is_some_and(|w| w.contains("before the last commit the proof recovered")),
        "a time before the proof's end is another environment: {}",
        r.stdout
    );
    assert_eq!(bdb::check(&to)?, last_a1);

    // A byte flipped in the database nobody wrote since the proof, or in
    // one the log writes: refused by its blake3, nothing written.
    let name = backup.file_name().context("name")?.to_owned();
    for db in ["extra.db", "data.db"] {
        let copy = s.path(&format!("damaged-{db}")).join(&name);
        std::fs::create_dir_all(copy.parent().context("parent")?)?;
        copy_backup(&backup, &copy)?;
        let path = copy.join(db);
        let mut bytes = std::fs::read(&path)?;
        let at = bytes.len() - 100;
        bytes[at] ^= 0x04;
        std::fs::write(&path, bytes)?;
        let to = s.path(&format!("restored-{db}"));
        let r = restore(&copy, &to, None, &[])?;
        assert_eq!(
            r.code,
            Some(1),
            "{db}: restore was not refused: {}",
            r.stdout
        );
        assert!(
            r.stderr.contains(&format!("{db}: altered")),
            "{db}: {}",
            r.stderr
        );
        assert!(!to.exists());
    }
    assert!(leftovers(s.root())?.is_empty());
    Ok(())
}

/// `cp -a` of a whole backup directory to `to` (which must not exist yet),
/// hidden files included: the damage cases work on such a copy.
fn copy_backup(backup: &Path, to: &Path) -> Result<()> {
    ensure!(Command::new("cp")
        .arg("-a")
        .arg(backup)
        .arg(to)
        .status()?
        .success());
    Ok(())
}
