//! Issue 22: archives in S3-compatible object storage (`archive --to
//! s3://…`, `verify-archive s3://…`, `restore --from s3://…`) against a
//! real S3 server on loopback (`tandem_tests::s3_server`, s3s-fs): a backup
//! taken while the workload runs restores exactly the committed prefix,
//! `--until` is exact, a second archiver cannot overwrite history (the
//! create-only manifest), and a damaged object is named and refused.

use anyhow::{ensure, Context, Result};
use std::path::Path;
use std::time::Duration;
use tandem_shared::LogPosition;
use tandem_tests::archive_cmd::{hot_workload, pair, stop_extended_follower, Run, LONG};
use tandem_tests::bdb::{self, WorkloadOptions, WORKLOAD_DBS};
use tandem_tests::harness::*;
use tandem_tests::s3_proxy::S3Proxy;
use tandem_tests::s3_server::{start_s3, S3Server};

fn archive(s3: &S3Server, dir: &Path, prefix: &str, extra: &[&str]) -> Result<Run> {
    let url = s3.url(prefix);
    let mut args = vec![
        "archive",
        "--json",
        "--dir",
        dir.to_str().context("dir")?,
        "--to",
        &url,
    ];
    args.extend(extra);
    s3.standby(args)
}

fn restore(s3: &S3Server, prefix: &str, to: &Path, until: Option<&str>) -> Result<Run> {
    let url = s3.url(prefix);
    let mut args = vec![
        "restore",
        "--json",
        "--from",
        &url,
        "--to",
        to.to_str().context("to")?,
    ];
    if let Some(u) = until {
        args.extend(["--until", u]);
    }
    s3.standby(args)
}

fn verify(s3: &S3Server, prefix: &str, extra: &[&str]) -> Result<Run> {
    let url = s3.url(prefix);
    let mut args = vec!["verify-archive", "--json", &url];
    args.extend(extra);
    s3.standby(args)
}

fn now_unix() -> i64 {
    // SAFETY: time(3) with a null pointer only returns the time.
    unsafe { libc::time(std::ptr::null_mut()) }
}

/// The objects under `prefix` with their bytes.
fn objects(s3: &S3Server, prefix: &str) -> Vec<(String, Vec<u8>)> {
    s3.keys(prefix)
        .into_iter()
        .map(|k| {
            let b = std::fs::read(s3.object_path(&k)).unwrap_or_default();
            (k, b)
        })
        .collect()
}

#[test]
fn a_bucket_archive_taken_while_streaming_restores_exactly_the_committed_prefix() -> Result<()> {
    let p = pair(2000)?;
    let s = &p.s;
    let s3 = start_s3(s.root())?;
    let (mut w, lsns) = hot_workload(s)?;
    let hot = archive(&s3, &s.path("standby"), "site", &[])?;
    ensure!(hot.ok(), "archive failed: {}{}", hot.stdout, hot.stderr);
    assert_eq!(hot.json["action"], "created");
    assert_eq!(hot.json["verified"], true, "proven before it is uploaded");
    let hot_end = lsn_of(&hot.json["log_end"]);
    let manifests = s3.keys("site/manifests");
    assert_eq!(manifests.len(), 1, "{manifests:?}");
    assert!(hot.json["backup"]
        .as_str()
        .unwrap_or("")
        .ends_with(&manifests[0]));
    assert!(w.wait_exit(LONG)?.success(), "{}", w.log_text());
    let last = bdb::parse_done(&w.log_text()).context("DONE")?;
    wait_caught_up(&s.path("standby"), &s.path("env"), LONG)?;

    let commits = bdb::read_lsn_log(&lsns)?;
    let expected = commits
        .iter()
        .filter(|(_, f, o)| LogPosition::new(*f, *o) <= hot_end)
        .map(|c| c.0)
        .max()
        .unwrap_or(2000);
    assert!(
        expected > 2000 && expected < last,
        "{hot_end}: {expected} of {last}"
    );
    let r = restore(&s3, "site", &s.path("restored-hot"), None)?;
    ensure!(r.ok(), "restore failed: {}{}", r.stdout, r.stderr);
    assert_eq!(bdb::check(&s.path("restored-hot"))?, expected);
    assert!(
        r.stderr.contains("downloaded"),
        "progress is shown: {}",
        r.stderr
    );

    // At rest: archiving changes nothing in the mirror; the new backup
    // shares the unchanged objects with the first.
    let before = env_digest(&s.path("standby"))?;
    let cold = archive(&s3, &s.path("standby"), "site", &["--no-verify"])?;
    ensure!(cold.ok(), "archive failed: {}{}", cold.stdout, cold.stderr);
    assert_eq!(
        before,
        env_digest(&s.path("standby"))?,
        "archiving changed the mirror"
    );
    assert_eq!(
        lsn_of(&cold.json["log_end"]),
        primary_log_end(&s.path("env"))?
    );
    assert!(
        cold.json["uploaded_bytes"].as_u64() < cold.json["bytes"].as_u64(),
        "objects the bucket holds are not uploaded again: {}",
        cold.json
    );
    // The later manifest of the same base holds all the first one did: the
    // first is deleted, the objects the second names stay.
    assert_eq!(
        cold.json["removed"][0].as_str(),
        Some(manifests[0].trim_start_matches("site/"))
    );
    assert_eq!(s3.keys("site/manifests").len(), 1);
    let again = archive(&s3, &s.path("standby"), "site", &["--no-verify"])?;
    ensure!(again.ok(), "{}{}", again.stdout, again.stderr);
    assert_eq!(again.json["action"], "unchanged");

    let v = verify(&s3, "site", &["--all"])?;
    ensure!(v.ok(), "verify-archive failed: {}{}", v.stdout, v.stderr);
    assert_eq!(v.json.as_array().map(Vec::len), Some(1));
    assert!(v.json[0]["databases_verified"].as_u64() >= Some(3));
    let r = restore(&s3, "site", &s.path("restored"), None)?;
    ensure!(r.ok(), "restore failed: {}{}", r.stdout, r.stderr);
    assert_eq!(bdb::check(&s.path("restored"))?, last);
    assert_eq!(
        bdb::db_dump_all(&s.path("env"), &WORKLOAD_DBS)?,
        bdb::db_dump_all(&s.path("restored"), &WORKLOAD_DBS)?
    );
    assert_eq!(
        bdb::run_workload(&s.path("restored"), &workload(10, 500))?,
        last + 10
    );

    // A second archiver (another standby directory at the same position,
    // with other bytes in a database file) reaches the same manifest name:
    // the create-only put refuses it, and the bucket's backups are
    // unchanged byte for byte.
    drop(p.standby);
    let cp = std::process::Command::new("cp")
        .arg("-a")
        .arg(s.path("standby"))
        .arg(s.path("standby2"))
        .status()?;
    ensure!(cp.success(), "cp -a failed");
    let db = s.path("standby2/data.db");
    let mut bytes = std::fs::read(&db)?;
    let i = bytes.len() / 2;
    bytes[i] ^= 0x55;
    std::fs::write(&db, bytes)?;
    let manifests_before = objects(&s3, "site/manifests");
    let second = archive(&s3, &s.path("standby2"), "site", &["--no-verify"])?;
    assert_eq!(second.code, Some(1), "{}{}", second.stdout, second.stderr);
    assert!(
        second.stderr.contains("written by another archiver")
            && second.stderr.contains("nothing was overwritten"),
        "{}",
        second.stderr
    );
    let manifests_after = objects(&s3, "site/manifests");
    assert_eq!(manifests_before, manifests_after);
    let r = restore(&s3, "site", &s.path("restored-after"), None)?;
    ensure!(r.ok(), "{}{}", r.stdout, r.stderr);
    assert_eq!(bdb::check(&s.path("restored-after"))?, last);
    eprintln!(
        "MEASURED s3 hot archive {:.2} s ({} bytes, {} uploaded), cold archive {:.2} s ({} uploaded), restore {:.2} s, verify --all {:.2} s",
        hot.secs, hot.json["bytes"], hot.json["uploaded_bytes"], cold.secs, cold.json["uploaded_bytes"], r.secs, v.secs
    );
    Ok(())
}

#[test]
fn until_from_a_bucket_is_exact_and_a_damaged_object_is_named() -> Result<()> {
    // Values of 10 kB in the base: data.db and hash.db are over 8 MiB, the
    // part size, and go up as multipart uploads.
    let p = tandem_tests::harness::pair(&WorkloadOptions {
        value_len: 10_000,
        updates: 0,
        ..workload(1000, 500)
    })?;
    let s = &p.s;
    let s3 = start_s3(s.root())?;
    let last_a = bdb::run_workload(&s.path("env"), &workload(1500, 500))?;
    let t_a = now_unix();
    wait_for("the clock to pass a second", Duration::from_secs(5), || {
        Ok(now_unix() > t_a)
    })?;
    let last_b = bdb::run_workload(&s.path("env"), &workload(1500, 500))?;
    wait_caught_up(&s.path("standby"), &s.path("env"), LONG)?;
    let made = archive(&s3, &s.path("standby"), "pit", &["--no-verify"])?;
    ensure!(made.ok(), "{}{}", made.stdout, made.stderr);
    let sizes: Vec<(String, u64)> = s3
        .keys("pit/objects")
        .into_iter()
        .map(|k| {
            let n = std::fs::metadata(s3.object_path(&k)).map_or(0, |m| m.len());
            (k, n)
        })
        .collect();
    assert!(sizes.iter().any(|(_, n)| *n > 8 << 20), "{sizes:?}");
    let multipart = s3.multipart_etags();
    assert!(
        multipart >= 2,
        "data.db and hash.db went up in parts: {multipart}"
    );

    let r = restore(&s3, "pit", &s.path("pit-a"), Some(&format!("@{t_a}")))?;
    ensure!(r.ok(), "restore --until failed: {}{}", r.stdout, r.stderr);
    assert_eq!(bdb::check(&s.path("pit-a"))?, last_a);
    let r = restore(&s3, "pit", &s.path("pit-end"), None)?;
    ensure!(r.ok(), "{}{}", r.stdout, r.stderr);
    assert_eq!(bdb::check(&s.path("pit-end"))?, last_b);
    let r = restore(
        &s3,
        "pit",
        &s.path("outside"),
        Some(&format!("@{}", now_unix() + 3600)),
    )?;
    assert_eq!(r.code, Some(1), "{}", r.stderr);
    assert!(
        r.stderr
            .contains("no backup in the bucket covers that time"),
        "{}",
        r.stderr
    );
    assert!(!s.path("outside").exists());

    // One flipped byte in one object: verify and restore name it, and the
    // target is never created.
    let obj = s3
        .keys("pit/objects")
        .into_iter()
        .find(|k| k.contains("/data.db."))
        .context("the data.db object")?;
    let path = s3.object_path(&obj);
    let mut bytes = std::fs::read(&path)?;
    bytes[100] ^= 1;
    std::fs::write(&path, bytes)?;
    let v = verify(&s3, "pit", &[])?;
    assert_eq!(v.code, Some(1), "{}{}", v.stdout, v.stderr);
    assert!(
        v.json[0]["error"].as_str().unwrap_or("").contains(&obj),
        "{}",
        v.json
    );
    let r = restore(&s3, "pit", &s.path("damaged"), None)?;
    assert_eq!(r.code, Some(1));
    assert!(
        r.stderr.contains(&obj) && r.stderr.contains("altered"),
        "{}",
        r.stderr
    );
    assert!(!s.path("damaged").exists());
    // A truncated object, likewise.
    let bytes = std::fs::read(&path)?;
    std::fs::write(&path, &bytes[..bytes.len() / 2])?;
    let r = restore(&s3, "pit", &s.path("damaged"), None)?;
    assert_eq!(r.code, Some(1));
    assert!(
        r.stderr.contains(&obj) && r.stderr.contains("truncated"),
        "{}",
        r.stderr
    );
    assert!(!s.path("damaged").exists());
    let leftovers: Vec<_> = std::fs::read_dir(s.root())?
        .flatten()
        .filter(|e| e.file_name().to_string_lossy().contains("tandem-restore"))
        .collect();
    assert!(leftovers.is_empty(), "{leftovers:?}");
    drop(p.standby);
    Ok(())
}

/// The bucket's newest manifest as JSON, read from the server's directory
/// (works while the server is down).
fn newest_manifest(s3: &S3Server, prefix: &str) -> Option<serde_json::Value> {
    s3.keys(&format!("{prefix}/manifests"))
        .iter()
        .filter_map(|k| serde_json::from_slice(&std::fs::read(s3.object_path(k)).ok()?).ok())
        .max_by_key(|m: &serde_json::Value| lsn_of(&m["backup"]["log_end"]))
}

fn hold_end(standby: &Path) -> Option<LogPosition> {
    let v: serde_json::Value =
        serde_json::from_slice(&std::fs::read(standby.join(".tandem/archive-hold.json")).ok()?)
            .ok()?;
    Some(lsn_of(&v["log_end"]))
}

#[test]
fn follow_to_a_bucket_survives_the_server_dying_and_holds_log_until_confirmed() -> Result<()> {
    let p = pair(1000)?;
    let s = &p.s;
    let mut s3 = start_s3(s.root())?;
    // Through a proxy that only counts requests.
    let proxy = S3Proxy::start(format!("127.0.0.1:{}", s3.port).parse()?)?;
    let url = s3.url("live");
    // Staging left by an archiver killed earlier (its pid is gone) is
    // swept at the start; a live process's is not.
    let scratch = s.path("scratch");
    let gone = {
        let mut c = std::process::Command::new("true").spawn()?;
        c.wait()?;
        c.id()
    };
    let stale = scratch.join(format!("tandem-follow-stage-{gone}-1-0"));
    let live = scratch.join(format!("tandem-fetch-{}-1-0", std::process::id()));
    for d in [&stale, &live] {
        std::fs::create_dir_all(d.join("b"))?;
        std::fs::write(d.join("b/data.db"), b"left behind")?;
    }
    let mut cmd = std::process::Command::new(bin("tandem-standby"));
    cmd.args(["archive", "--json", "--follow", "1", "--no-verify"])
        .args(["--s3-retry-secs", "2", "--drill-every", "2", "--dir"])
        .arg(s.path("standby"))
        .args([
            "--to",
            &url,
            "--s3-endpoint",
            &proxy.endpoint(),
            "--scratch",
        ])
        .arg(&scratch);
    for (k, v) in s3.env() {
        cmd.env(k, v);
    }
    let mut follower = Proc::spawn("archive --follow", cmd, &s.path("follow.log"))?;
    let reached = |s3: &S3Server| -> Result<bool> {
        let end = primary_log_end(&s.path("env"))?;
        Ok(newest_manifest(s3, "live").is_some_and(|m| lsn_of(&m["backup"]["log_end"]) == end))
    };
    wait_for("the first backup in the bucket", LONG, || reached(&s3))?;
    assert!(!stale.exists() && live.exists(), "{stale:?} {live:?}");
    let first = bdb::run_workload(&s.path("env"), &workload(1500, 500))?;
    wait_for("the bucket to follow", LONG, || reached(&s3))?;
    let end = primary_log_end(&s.path("env"))?;
    wait_for("the hold to follow the bucket", LONG, || {
        Ok(hold_end(&s.path("standby")) == Some(end))
    })?;
    bdb::run_workload(&s.path("env"), &workload(300, 500))?;
    wait_for("the bucket to follow again", LONG, || reached(&s3))?;
    // Rounds HEAD only objects they have not confirmed: each object at
    // most twice (before its upload and after it), however many rounds.
    let mut heads = std::collections::BTreeMap::<String, usize>::new();
    for q in proxy.requests() {
        if let Some(path) = q.strip_prefix("HEAD ") {
            *heads
                .entry(path.split('?').next().unwrap_or(path).to_owned())
                .or_default() += 1;
        }
    }
    // (The round reports after its manifest is visible.)
    wait_for("two extended rounds reported", LONG, || {
        Ok(follower
            .log_text()
            .matches("\"action\":\"extended\"")
            .count()
            >= 2)
    })?;
    assert!(heads.values().all(|n| *n <= 2), "{heads:?}");
    assert!(heads.keys().any(|k| k.contains("/data.db.")), "{heads:?}");

    // The server dies; the standby goes on receiving. The hold never moves
    // past what the bucket holds.
    s3.proc.kill9()?;
    let errors = follower.log_text().matches("\"action\":\"error\"").count();
    let bucket_end =
        lsn_of(&newest_manifest(&s3, "live").context("manifest")?["backup"]["log_end"]);
    let last = bdb::run_workload(&s.path("env"), &workload(1500, 500))?;
    wait_caught_up(&s.path("standby"), &s.path("env"), LONG)?;
    let standby_end = primary_log_end(&s.path("env"))?;
    assert!(standby_end > bucket_end);
    // A round runs meanwhile (it is retrying against the dead server).
    wait_for("a round against the dead server", LONG, || {
        Ok(follower.log_text().matches("\"action\":\"error\"").count() > errors)
    })?;
    assert_eq!(
        hold_end(&s.path("standby")),
        Some(bucket_end),
        "hold moved without the bucket"
    );
    s3.restart()?;
    wait_for("the bucket to catch up after the restart", LONG, || {
        reached(&s3)
    })?;
    wait_for("the hold to follow the bucket", LONG, || {
        Ok(hold_end(&s.path("standby")) == Some(standby_end))
    })?;
    let caught_up_ms = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)?
        .as_millis() as u64;
    // Restore drills ran: the newest backup downloaded, recovered, verified.
    let drill = || -> Result<serde_json::Value> {
        Ok(standby_status(&s.path("standby"))?["archive_drill"].clone())
    };
    let passed = wait_for("a restore drill of the caught-up bucket", LONG, || {
        let d = drill()?;
        Ok(d["ok"] == true && d["unix_ms"].as_u64() > Some(caught_up_ms))
    });
    let drill = drill()?;
    ensure!(
        passed.is_ok(),
        "{passed:?}: {drill}\n{}",
        follower.log_text()
    );
    assert!(drill["last_verified_unix_ms"].as_u64() > Some(0), "{drill}");
    assert!(
        drill["backup"].as_str().unwrap_or("").starts_with(&url),
        "{drill}"
    );
    stop_extended_follower(&mut follower, Duration::from_secs(60))?;
    // One backup (one base): superseded manifests were deleted.
    assert_eq!(
        s3.keys("live/manifests").len(),
        1,
        "{:?}",
        s3.keys("live/manifests")
    );
    let r = restore(&s3, "live", &s.path("restored"), None)?;
    ensure!(r.ok(), "{}{}", r.stdout, r.stderr);
    assert_eq!(bdb::check(&s.path("restored"))?, last);
    assert!(last > first);
    drop(p.standby);
    Ok(())
}
