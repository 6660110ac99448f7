//! Requirement: "Bad input gets a clear error and changes nothing". Real
//! binaries, real Berkeley DB, loopback mutual TLS: an oversized message,
//! a standby directory of another environment, a second primary on one
//! environment, a full disk on the standby. Certificates and TLS are in
//! `tls_refusals.rs`, a hostile primary in `hostile_primary.rs`; the
//! helpers all three use are in `tandem_tests::refusal`.
//!
//! Every test that has a standby directory proves it unchanged with
//! `harness::dir_digest` taken before and after (see `refusal::stored`).

// Messages are built with `..Default::default()` even where every field is
// given today: the protocol grows fields, the tests set what they mean.
#![allow(clippy::needless_update)]

use anyhow::{bail, ensure, Context, Result};
use std::path::{Path, PathBuf};
use std::process::Command;
use tandem_shared::logfile;
use tandem_shared::wire::replication_client::ReplicationClient;
use tandem_shared::wire::{standby_message, Hello, StandbyMessage, PROTOCOL_VERSION};
use tandem_shared::{LogPosition, MAX_MESSAGE_BYTES};
use tandem_tests::bdb::{self, WorkloadOptions};
use tandem_tests::harness::*;
use tandem_tests::refusal::*;
use tonic::transport::{Certificate, ClientTlsConfig, Endpoint, Identity};

// ---------------------------------------------------- 4: message size limit

#[test]
fn a_message_over_the_size_limit_is_refused_by_the_primary() -> Result<()> {
    let s = Scratch::new()?;
    bdb::run_workload(&s.path("env"), &quiet_workload(200))?;
    let primary = start_primary(s.root(), &s.path("env"), &s.certs, "127.0.0.1:0", &[])?;
    let read = |p: PathBuf| std::fs::read(&p).with_context(|| p.display().to_string());
    let tls = ClientTlsConfig::new()
        .ca_certificate(Certificate::from_pem(read(s.certs.dir.join("ca.pem"))?))
        .identity(Identity::from_pem(
            read(s.certs.dir.join("standby.pem"))?,
            read(s.certs.dir.join("standby-key.pem"))?,
        ))
        .domain_name("127.0.0.1");
    let rt = runtime()?;
    let url = primary.url();
    // A Hello one byte over the limit once encoded.
    let hello = Hello {
        protocol_version: PROTOCOL_VERSION,
        standby_name: "x".repeat(MAX_MESSAGE_BYTES),
        ..Default::default()
    };
    let outcome: std::result::Result<String, String> = rt.block_on(async move {
        let channel = Endpoint::from_shared(url)
            .map_err(|e| e.to_string())?
            .tls_config(tls)
            .map_err(|e| e.to_string())?;
        let channel = channel.connect().await.map_err(|e| e.to_string())?;
        let mut client = ReplicationClient::new(channel).max_encoding_message_size(usize::MAX);
        let first = StandbyMessage {
            kind: Some(standby_message::Kind::Hello(hello)),
        };
        let mut inbound = match client.stream(tokio_stream::iter(vec![first])).await {
            Ok(r) => r.into_inner(),
            Err(status) => return Err(status.to_string()),
        };
        match inbound.message().await {
            Ok(Some(m)) => Ok(format!(
                "answered with {:?}",
                m.kind
                    .map(|k| format!("{k:?}").chars().take(80).collect::<String>())
            )),
            Ok(None) => Ok("the stream ended without a word".into()),
            Err(status) => Err(status.to_string()),
        }
    });
    eprintln!("oversized Hello: {outcome:?}");
    let plog = primary.proc.log_text();
    assert!(
        plog.contains("message length too large"),
        "the primary must log why:\n{plog}"
    );
    match outcome {
        Ok(what) => bail!("an oversized Hello was not refused with an error: {what}"),
        Err(e) => assert!(
            e.contains("message length too large"),
            "the standby side must be told why: {e}"
        ),
    }
    assert_eq!(count(&plog, "standby connected"), 0, "no session may start");
    // The primary is unharmed.
    let st = primary_status(&primary, &s.certs)?;
    ensure!(st["env_id"].as_str().is_some_and(|e| !e.is_empty()), "{st}");
    rt.shutdown_background();
    Ok(())
}

// ------------------------------------------- 5: another environment's dir

#[test]
fn a_standby_directory_of_another_environment_is_refused() -> Result<()> {
    let (s, _primary_a) = synced(500)?;
    bdb::run_workload(&s.path("env-b"), &quiet_workload(300))?;
    let primary_b = start_primary(s.root(), &s.path("env-b"), &s.certs, "127.0.0.1:0", &[])?;
    let before = dir_digest(&s.path("standby"))?;
    let mut standby = start_standby(
        s.root(),
        &s.path("standby"),
        &primary_b.url(),
        &s.certs,
        &NO_CHECKS,
    )?;
    let status = standby.wait_exit(LONG)?;
    let log = standby.log_text();
    eprintln!("{}", tail(&log, 1));
    assert_eq!(status.code(), Some(3), "{log}");
    assert!(log.contains("environment mismatch"), "{log}");
    assert_eq!(
        dir_digest(&s.path("standby"))?,
        before,
        "the refused directory changed"
    );
    assert!(!primary_b.proc.log_text().contains("standby connected"));
    Ok(())
}

// ------------------------------------------ 6: two primaries, one environment

#[test]
fn a_second_primary_on_the_same_environment_is_refused() -> Result<()> {
    let s = Scratch::new()?;
    bdb::run_workload(&s.path("env"), &quiet_workload(200))?;
    let primary = start_primary(s.root(), &s.path("env"), &s.certs, "127.0.0.1:0", &[])?;
    let before = dir_digest(&s.path("env"))?;
    let mut second = Proc::spawn(
        "tandem-primary (second)",
        primary_command(&s.path("env"), &s.certs),
        &s.path("second-primary.log"),
    )?;
    let status = second.wait_exit(LONG)?;
    let log = second.log_text();
    eprintln!("{}", log.trim());
    assert!(!status.success(), "a second primary must fail: {log}");
    let state_dir = s.path("env").join(".tandem-primary");
    assert!(
        log.contains("another tandem-primary is already running"),
        "{log}"
    );
    assert!(
        log.contains(&format!(
            "state directory {} is locked",
            state_dir.display()
        )),
        "the error must name the lock: {log}"
    );
    assert_eq!(
        dir_digest(&s.path("env"))?,
        before,
        "the refused primary changed the environment"
    );
    // The first one still serves.
    let st = primary_status(&primary, &s.certs)?;
    ensure!(st["env_id"].as_str().is_some_and(|e| !e.is_empty()), "{st}");
    Ok(())
}

// ------------------------------------------------------------ 7: disk full

/// A tmpfs, unmounted (lazily if busy) when dropped.
struct Tmpfs(PathBuf);

impl Tmpfs {
    fn mount(at: &Path, size: &str) -> std::result::Result<Self, String> {
        std::fs::create_dir_all(at).map_err(|e| e.to_string())?;
        let out = Command::new("mount")
            .args(["-t", "tmpfs", "-o", &format!("size={size}"), "tandem-test"])
            .arg(at)
            .output()
            .map_err(|e| format!("cannot run mount: {e}"))?;
        if !out.status.success() {
            return Err(format!(
                "mount -t tmpfs failed ({}): {}",
                out.status,
                String::from_utf8_lossy(&out.stderr).trim()
            ));
        }
        Ok(Self(at.to_path_buf()))
    }
}

impl Drop for Tmpfs {
    fn drop(&mut self) {
        if !Command::new("umount")
            .arg(&self.0)
            .status()
            .is_ok_and(|s| s.success())
        {
            let _ = Command::new("umount").arg("-l").arg(&self.0).status();
        }
    }
}

/// Writes `path` until the file system is full.
fn fill(path: &Path) -> Result<()> {
    use std::io::Write;
    let mut f = std::fs::File::create(path)?;
    for block in [vec![0x5au8; 1 << 20], vec![0x5au8; 4096]] {
        loop {
            match f.write_all(&block) {
                Ok(()) => {}
                Err(e) if e.raw_os_error() == Some(libc::ENOSPC) => break,
                Err(e) => return Err(e.into()),
            }
        }
    }
    Ok(())
}

#[test]
fn a_full_disk_on_the_standby_is_reported_and_nothing_unwritten_is_acknowledged() -> Result<()> {
    let s = Scratch::new()?;
    let mnt = s.path("mnt");
    let _tmpfs = match Tmpfs::mount(&mnt, "24m") {
        Ok(t) => t,
        Err(why) => {
            eprintln!("skipping the disk-full test: {why} (it needs root)");
            return Ok(());
        }
    };
    let dir = mnt.join("standby");
    bdb::run_workload(&s.path("env"), &quiet_workload(2000))?;
    let primary = start_primary(s.root(), &s.path("env"), &s.certs, "127.0.0.1:0", &[])?;
    let mut standby = start_standby(s.root(), &dir, &primary.url(), &s.certs, &NO_CHECKS)?;
    wait_caught_up(&dir, &s.path("env"), LONG)?;
    let st = standby_status(&dir)?;
    let durable = lsn_of(&st["durable_lsn"]);
    let file_bytes = st["file_bytes_received"].as_u64().unwrap_or(0);
    let before = stored(&dir)?;
    let last_log = std::fs::read(dir.join(logfile::log_file_name(durable.file)))?;

    fill(&mnt.join("filler"))?;
    // Paced, so the log arrives in many small chunks: a batch then often
    // holds chunks that fit in the last allocated page and one that does
    // not (the case where the resume point once went wrong).
    let more = WorkloadOptions {
        rate: 6000,
        ..quiet_workload(3000)
    };
    let mut w = s.spawn_workload(&more, "workload-more.log")?;
    // One refusal is logged twice (ERROR, then the WARN of the retry);
    // count the refusals.
    let refusals = |log: &str| {
        log.lines()
            .filter(|l| l.contains("ERROR") && l.contains("disk full while"))
            .count()
    };
    wait_for("three refusals: the standby keeps retrying", LONG, || {
        ensure!(
            standby.is_running(),
            "the standby exited: {}",
            standby.log_text()
        );
        Ok(refusals(&standby.log_text()) >= 3)
    })?;
    ensure!(w.wait_exit(LONG)?.success(), "workload: {}", w.log_text());
    let log = standby.log_text();
    eprintln!("{}", tail(&log, 4));
    assert!(
        standby.is_running(),
        "the standby must keep running and retrying"
    );

    // Acknowledged is at most what the standby's log files hold, verified.
    let (newest, walk) = log_end(&dir)?;
    let on_disk = LogPosition::new(newest, walk.end);
    let pst = primary_status(&primary, &s.certs)?;
    let acked = lsn_of(&pst["standbys"][0]["acked_lsn"]);
    let end = primary_log_end(&s.path("env"))?;
    eprintln!("durable before the disk filled {durable}, acknowledged {acked}, on the standby's disk {on_disk}, primary {end}");
    assert!(
        acked <= on_disk,
        "the standby acknowledged {acked} but its log verifies only to {on_disk}"
    );
    assert!(
        acked < end,
        "the disk was full: the standby cannot have everything"
    );
    // What it had is intact: every file the same, the log it had a prefix.
    let now = stored(&dir)?;
    for (name, digest) in &before {
        if name != &logfile::log_file_name(durable.file) && !name.starts_with(".tandem/") {
            assert_eq!(
                now.get(name),
                Some(digest),
                "{name} changed while the disk was full"
            );
        }
    }
    let now_log = std::fs::read(dir.join(logfile::log_file_name(durable.file)))?;
    assert_eq!(
        &now_log[..durable.offset as usize],
        &last_log[..durable.offset as usize],
        "the durable log changed"
    );

    // Space comes back: the standby resumes by itself, without a new base.
    std::fs::remove_file(mnt.join("filler"))?;
    wait_caught_up(&dir, &s.path("env"), LONG)?;
    let st = standby_status(&dir)?;
    assert_eq!(
        st["file_bytes_received"].as_u64().unwrap_or(0),
        file_bytes,
        "the standby took a new base: {st}"
    );
    assert!(st["reconnects"].as_u64().unwrap_or(0) >= 2, "{st}");
    assert!(standby.stop(LONG)?.success());
    let m = recover_copy(&dir, &s.path("recovered"))?;
    assert_eq!(
        m, 5000,
        "the recovered standby must hold every committed transaction"
    );
    Ok(())
}
