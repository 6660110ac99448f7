//! Issue 22, faults between the archiver and object storage: a proxy in
//! front of the S3 server (`tandem_tests::s3_proxy`) answers 500, drops
//! connections before and after forwarding, cuts bodies short and stalls.
//! Archiving retries, never publishes a backup whose objects it did not
//! confirm, and recognises its own manifest when only the answer was lost;
//! restore names the object it could not read and creates nothing.

use anyhow::{ensure, Result};
use std::path::Path;
use std::time::Duration;
use tandem_tests::archive_cmd::{Run, LONG};
use tandem_tests::bdb;
use tandem_tests::harness::*;
use tandem_tests::s3_proxy::{Fault, Rule, S3Proxy};
use tandem_tests::s3_server::{start_s3, S3Server, BUCKET};

fn via(s3: &S3Server, proxy: &S3Proxy, args: &[&str]) -> Result<Run> {
    let endpoint = proxy.endpoint();
    let mut all: Vec<&str> = args.to_vec();
    all.extend(["--s3-endpoint", &endpoint, "--s3-retry-secs", "3"]);
    s3.standby(all)
}

fn rule(method: &'static str, path: &str, fault: Fault, times: Option<usize>) -> Rule {
    Rule {
        method,
        path_contains: path.into(),
        fault,
        times,
    }
}

#[test]
fn archiving_and_restoring_through_a_failing_link() -> Result<()> {
    // Values of 10 kB in the base: its databases are over 8 MiB and go up
    // as multipart uploads.
    let p = tandem_tests::harness::pair(&bdb::WorkloadOptions {
        value_len: 10_000,
        updates: 0,
        ..workload(1000, 500)
    })?;
    let s = &p.s;
    let s3 = start_s3(s.root())?;
    let proxy = S3Proxy::start(format!("127.0.0.1:{}", s3.port).parse()?)?;
    let standby = s.path("standby");
    let dir = standby.to_str().unwrap_or_default();
    let url = s3.url("f");
    let archive = |extra: &[&str]| {
        let mut a = vec![
            "archive",
            "--json",
            "--no-verify",
            "--dir",
            dir,
            "--to",
            &url,
        ];
        a.extend(extra);
        via(&s3, &proxy, &a)
    };
    let manifests = || s3.keys("f/manifests");
    let more = |n| -> Result<u64> {
        let last = bdb::run_workload(&s.path("env"), &workload(n, 500))?;
        wait_caught_up(&standby, &s.path("env"), LONG)?;
        Ok(last)
    };

    // A multipart upload failing midway is aborted: the store keeps no
    // parts of it, and no backup is published.
    proxy.add(rule("PUT", "partNumber=2", Fault::Status500, None));
    let r = archive(&[])?;
    assert_eq!(r.code, Some(1), "{}{}", r.stdout, r.stderr);
    assert!(
        r.stderr.contains("uploading a part") || r.stderr.contains("multipart"),
        "{}",
        r.stderr
    );
    assert!(
        proxy
            .requests()
            .iter()
            .any(|q| q.starts_with("DELETE") && q.contains("uploadId=")),
        "no abort: {:?}",
        proxy.requests()
    );
    assert_eq!(s3.incomplete_uploads(), Vec::<String>::new());
    assert!(manifests().is_empty());
    proxy.clear();

    // The server killed in the middle of a multipart upload: the archive
    // fails (its abort cannot reach the store either: the bucket's
    // lifecycle rule is for that), the next one writes the backup.
    proxy.add(rule(
        "PUT",
        "partNumber=1",
        Fault::Stall(Duration::from_secs(1)),
        Some(1),
    ));
    let killed = std::thread::scope(|scope| -> Result<Run> {
        let running = scope.spawn(|| archive(&[]));
        wait_for("a part on its way", LONG, || Ok(!proxy.hits().is_empty()))?;
        // SAFETY: kill(2) on the server's pid; it is our child.
        unsafe { libc::kill(s3.proc.pid() as i32, libc::SIGKILL) };
        running
            .join()
            .map_err(|_| anyhow::anyhow!("archive thread panicked"))?
    })?;
    assert_eq!(killed.code, Some(1), "{}{}", killed.stdout, killed.stderr);
    assert!(manifests().is_empty());
    let _s3_again = s3.start_again()?;
    proxy.clear();

    // 500s on uploads: retried, the backup is written.
    proxy.add(rule("PUT", "/f/objects/", Fault::Status500, Some(2)));
    let r = archive(&[])?;
    ensure!(r.ok(), "{}{}", r.stdout, r.stderr);
    assert_eq!(proxy.hits().len(), 2, "{:?}", proxy.hits());
    assert_eq!(manifests().len(), 1);

    // Uploads that never get through: the archive fails naming an object,
    // and no manifest records the objects it could not confirm.
    more(300)?;
    proxy.add(rule("PUT", "/f/objects/", Fault::DropBeforeForward, None));
    let before = manifests();
    let r = archive(&[])?;
    assert_eq!(r.code, Some(1), "{}{}", r.stdout, r.stderr);
    assert!(
        r.stderr.contains(&format!("s3://{BUCKET}/f/objects/")),
        "{}",
        r.stderr
    );
    assert!(r.stderr.contains("no backup was published"), "{}", r.stderr);
    assert_eq!(manifests(), before);
    proxy.clear();

    // The manifest's PUT reaches the store but its answer is lost: the
    // archiver finds its own manifest and reports success, once.
    proxy.add(rule(
        "PUT",
        "/f/manifests/",
        Fault::DropAfterForward,
        Some(1),
    ));
    let r = archive(&[])?;
    ensure!(r.ok(), "{}{}", r.stdout, r.stderr);
    assert_eq!(r.json["action"], "created", "{}", r.json);
    assert_eq!(proxy.hits().len(), 1, "{:?}", proxy.hits());
    // Manifests that cannot be written: nothing new appears.
    let last = more(300)?;
    proxy.add(rule("PUT", "/f/manifests/", Fault::Status500, None));
    let before = manifests();
    let r = archive(&[])?;
    assert_eq!(r.code, Some(1), "{}{}", r.stdout, r.stderr);
    assert_eq!(manifests(), before);
    proxy.clear();
    let r = archive(&[])?;
    ensure!(r.ok(), "{}{}", r.stdout, r.stderr);

    // Restore: a stalled download is waited for; the result is exact.
    let from = url.clone();
    let restore = |to: &Path| {
        let to = to.to_str().unwrap_or_default();
        via(
            &s3,
            &proxy,
            &["restore", "--json", "--from", &from, "--to", to],
        )
    };
    proxy.add(rule(
        "GET",
        "/f/objects/",
        Fault::Stall(Duration::from_secs(1)),
        Some(2),
    ));
    let r = restore(&s.path("restored"))?;
    ensure!(r.ok(), "{}{}", r.stdout, r.stderr);
    assert_eq!(bdb::check(&s.path("restored"))?, last);
    // Bodies that always arrive cut short: restore names the object.
    proxy.clear();
    proxy.add(rule("GET", "/data.db.", Fault::TruncateBody, None));
    let r = restore(&s.path("cut"))?;
    assert_eq!(r.code, Some(1), "{}{}", r.stdout, r.stderr);
    assert!(r.stderr.contains("/data.db."), "{}", r.stderr);
    assert!(!s.path("cut").exists());
    // 500s on every read: likewise.
    proxy.clear();
    proxy.add(rule("GET", "/f/objects/", Fault::Status500, None));
    let r = restore(&s.path("cut"))?;
    assert_eq!(r.code, Some(1), "{}{}", r.stdout, r.stderr);
    assert!(
        r.stderr.contains(&format!("s3://{BUCKET}/f/objects/")),
        "{}",
        r.stderr
    );
    assert!(!s.path("cut").exists());
    drop(p.standby);
    Ok(())
}
