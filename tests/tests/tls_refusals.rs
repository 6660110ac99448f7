//! Requirement: "Bad input gets a clear error and changes nothing", for
//! certificates and TLS: a standby, a status client or a primary with a
//! certificate from another CA (or none) is refused, the refusing side
//! logs why, and only TLS 1.3 is spoken. Real binaries, real Berkeley DB,
//! loopback mutual TLS.
//!
//! Every test that has a standby directory proves it unchanged with
//! `harness::dir_digest` taken before and after (see `refusal::stored`).

use anyhow::{bail, ensure, Context, Result};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;
use tandem_shared::wire::replication_client::ReplicationClient;
use tandem_shared::wire::{PrimaryStatus, StatusRequest};
use tandem_tests::bdb;
use tandem_tests::harness::*;
use tandem_tests::refusal::*;
use tonic::transport::{Certificate, ClientTlsConfig, Endpoint, Identity};

/// tonic reports a refused TLS handshake (a client certificate from another
/// CA, none at all) only at debug level, which the primary's default filter
/// (`info`) hides; this shows it.
const SHOW_TLS_REFUSALS: [(&str, &str); 1] =
    [("RUST_LOG", "info,tonic::transport::server::io_stream=debug")];

/// `tandem-standby run` with explicit TLS files (the harness always uses
/// the pair's).
fn spawn_standby(
    work: &Path,
    tag: &str,
    dir: &Path,
    url: &str,
    cert_dir: &Path,
    ca: &Path,
) -> Result<Proc> {
    let mut cmd = Command::new(bin("tandem-standby"));
    cmd.arg("run")
        .arg("--dir")
        .arg(dir)
        .args(["--primary", url, "--name", "test-standby"]);
    cmd.arg("--cert")
        .arg(cert_dir.join("standby.pem"))
        .arg("--key")
        .arg(cert_dir.join("standby-key.pem"))
        .arg("--ca")
        .arg(ca);
    cmd.args(NO_CHECKS);
    Proc::spawn(
        "tandem-standby",
        cmd,
        &work.join(format!("standby-{tag}.log")),
    )
}

// ------------------------------------------------------- 1: certificates

#[test]
fn a_standby_with_a_certificate_from_another_ca_is_refused() -> Result<()> {
    let (s, primary) = synced_env(500, &SHOW_TLS_REFUSALS)?;
    let foreign = Certs::generate(&s.path("foreign-certs"))?;
    let before = stored(&s.path("standby"))?;
    let sessions_before = count(&primary.proc.log_text(), "standby connected");

    // Trusts the primary's CA, but presents a certificate the primary's CA
    // did not sign.
    let mut standby = spawn_standby(
        s.root(),
        "foreign",
        &s.path("standby"),
        &primary.url(),
        &foreign.dir,
        &s.certs.dir.join("ca.pem"),
    )?;
    // Both sides: the standby may see the second refusal before the
    // primary has written its line about it.
    wait_for("two refused connections, on both sides", LONG, || {
        ensure!(
            standby.is_running(),
            "the standby exited: {}",
            standby.log_text()
        );
        Ok(count(&standby.log_text(), "stream interrupted") >= 2
            && count(&primary.proc.log_text(), "tls accept error") >= 2)
    })
    .with_context(|| {
        format!(
            "standby:\n{}\nprimary:\n{}",
            tail(&standby.log_text(), 8),
            tail(&primary.proc.log_text(), 8)
        )
    })?;
    let log = standby.log_text();
    let plog = primary.proc.log_text();
    eprintln!(
        "standby with a foreign certificate:\n{}\nprimary:\n{}",
        tail(&log, 2),
        tail(&plog, 2)
    );
    // The primary says why; the standby itself may only learn that the
    // connection was closed (TLS 1.3 sends the alert after the handshake).
    assert!(
        count(&plog, "tls accept error") >= 2 && plog.contains("invalid peer certificate"),
        "{plog}"
    );
    assert_eq!(
        count(&plog, "standby connected"),
        sessions_before,
        "the primary must not start a session"
    );
    let st = primary_status(&primary, &s.certs)?;
    assert!(
        st["standbys"]
            .as_array()
            .into_iter()
            .flatten()
            .all(|b| b["connected"] == false),
        "{st}"
    );
    assert!(standby.stop(LONG)?.success());
    assert_eq!(
        stored(&s.path("standby"))?,
        before,
        "a refused connection changed the standby directory"
    );
    Ok(())
}

async fn ask_status(url: &str, tls: ClientTlsConfig) -> std::result::Result<PrimaryStatus, String> {
    let endpoint = Endpoint::from_shared(url.to_owned()).map_err(|e| e.to_string())?;
    let endpoint = endpoint
        .tls_config(tls)
        .map_err(|e| e.to_string())?
        .connect_timeout(Duration::from_secs(5));
    let channel = endpoint
        .connect()
        .await
        .map_err(|e| tandem_shared::client::chain(&e))?;
    let mut client = ReplicationClient::new(channel);
    match client.status(StatusRequest {}).await {
        Ok(r) => Ok(r.into_inner()),
        Err(status) => Err(format!(
            "{status}: {}",
            tandem_shared::client::chain(&status)
        )),
    }
}

/// With its default log filter (no RUST_LOG) the primary says why it
/// refused a certificate: tonic reports it only at debug, so the default
/// filter in shared/src/telemetry.rs raises that one target.
#[test]
fn by_default_the_primary_logs_why_it_refused_a_certificate() -> Result<()> {
    let s = Scratch::new()?;
    bdb::run_workload(&s.path("env"), &quiet_workload(100))?;
    let primary = start_primary(s.root(), &s.path("env"), &s.certs, "127.0.0.1:0", &[])?;
    let foreign = Certs::generate(&s.path("foreign-certs"))?;
    let mut standby = spawn_standby(
        s.root(),
        "foreign",
        &s.path("standby"),
        &primary.url(),
        &foreign.dir,
        &s.certs.dir.join("ca.pem"),
    )?;
    wait_for("a refused connection", LONG, || {
        Ok(count(&standby.log_text(), "stream interrupted") >= 1)
    })?;
    standby.stop(LONG)?;
    let plog = primary.proc.log_text();
    ensure!(
        plog.contains("certificate"),
        "the primary's log does not say it refused a certificate:\n{plog}"
    );
    Ok(())
}

#[test]
fn a_client_without_a_client_certificate_cannot_ask_the_primary_for_status() -> Result<()> {
    let s = Scratch::new()?;
    bdb::run_workload(&s.path("env"), &quiet_workload(200))?;
    let primary = start_primary_env(&s, &s.path("env"), &s.certs, "status", &SHOW_TLS_REFUSALS)?;
    let foreign = Certs::generate(&s.path("foreign-certs"))?;
    let read = |p: PathBuf| std::fs::read(&p).with_context(|| p.display().to_string());
    let ca = Certificate::from_pem(read(s.certs.dir.join("ca.pem"))?);
    let ours = Identity::from_pem(
        read(s.certs.dir.join("standby.pem"))?,
        read(s.certs.dir.join("standby-key.pem"))?,
    );
    let theirs = Identity::from_pem(
        read(foreign.dir.join("standby.pem"))?,
        read(foreign.dir.join("standby-key.pem"))?,
    );
    let base = ClientTlsConfig::new()
        .ca_certificate(ca)
        .domain_name("127.0.0.1");

    let rt = runtime()?;
    let no_cert = rt.block_on(ask_status(&primary.url(), base.clone()));
    let foreign_cert = rt.block_on(ask_status(&primary.url(), base.clone().identity(theirs)));
    let pair_cert = rt.block_on(ask_status(&primary.url(), base.identity(ours)));
    eprintln!("no client certificate: {no_cert:?}\nforeign client certificate: {foreign_cert:?}");
    // Both are refused. Under TLS 1.3 the client has sent its last
    // handshake message before the primary rejects its certificate, so what
    // the client sees races: the primary's alert ("CertificateRequired")
    // or just "connection closed". The primary's log says why, every time.
    if let Ok(st) = &no_cert {
        bail!("a client without a certificate was answered: {st:?}");
    }
    if let Ok(st) = &foreign_cert {
        bail!("a client with a certificate from another CA was answered: {st:?}");
    }
    let plog = primary.proc.log_text();
    eprintln!("primary:\n{}", tail(&plog, 2));
    assert!(count(&plog, "tls accept error") >= 2, "{plog}");
    assert!(plog.contains("peer sent no certificates"), "{plog}");
    assert!(plog.contains("invalid peer certificate"), "{plog}");
    // The same client with the pair's certificate is answered: the refusals
    // above are about the certificate, and they did not hurt the primary.
    let st = pair_cert.map_err(anyhow::Error::msg)?;
    ensure!(!st.env_id.is_empty());
    Ok(())
}

/// `openssl s_client` at the primary with one TLS version forced; true if
/// the handshake completed.
fn handshake_with(primary: &Primary, certs: &Certs, version: &str) -> Result<bool> {
    let out = Command::new("openssl")
        .args([
            "s_client",
            "-connect",
            &primary.addr.to_string(),
            version,
            "-verify_return_error",
            "-alpn",
            "h2",
        ])
        .arg("-cert")
        .arg(certs.dir.join("standby.pem"))
        .arg("-key")
        .arg(certs.dir.join("standby-key.pem"))
        .arg("-CAfile")
        .arg(certs.dir.join("ca.pem"))
        .stdin(std::process::Stdio::null())
        .output()
        .context("running openssl s_client (scripts/setup installs openssl)")?;
    let text = String::from_utf8_lossy(&out.stdout);
    eprintln!(
        "openssl {version}: exit {:?}, {}",
        out.status.code(),
        text.lines()
            .find(|l| l.contains("Protocol"))
            .unwrap_or("no protocol")
    );
    Ok(out.status.success() && text.contains("Verify return code: 0 (ok)"))
}

#[test]
fn the_primary_speaks_tls_1_3_only() -> Result<()> {
    let s = Scratch::new()?;
    bdb::run_workload(&s.path("env"), &quiet_workload(50))?;
    let primary = start_primary_env(&s, &s.path("env"), &s.certs, "tls13", &[])?;
    ensure!(
        handshake_with(&primary, &s.certs, "-tls1_3")?,
        "a TLS 1.3 client with the pair's certificate must get through"
    );
    ensure!(
        !handshake_with(&primary, &s.certs, "-tls1_2")?,
        "a TLS 1.2 handshake must be refused"
    );
    Ok(())
}

#[test]
fn a_primary_with_a_certificate_from_another_ca_is_refused_by_the_standby() -> Result<()> {
    let (s, mut primary) = synced(500)?;
    let foreign = Certs::generate(&s.path("foreign-certs"))?;
    // The same environment, now served with certificates from another CA
    // (an impostor on the primary's address, or a misconfiguration).
    primary.proc.stop(LONG)?;
    let impostor = start_primary(s.root(), &s.path("env"), &foreign, "127.0.0.1:0", &[])?;
    let before = stored(&s.path("standby"))?;
    let mut standby = start_standby(
        s.root(),
        &s.path("standby"),
        &impostor.url(),
        &s.certs,
        &NO_CHECKS,
    )?;
    wait_for("two refused connections", LONG, || {
        ensure!(
            standby.is_running(),
            "the standby exited: {}",
            standby.log_text()
        );
        Ok(count(&standby.log_text(), "stream interrupted") >= 2)
    })?;
    let log = standby.log_text();
    eprintln!("standby facing a foreign primary:\n{}", tail(&log, 2));
    assert!(
        log.contains("cannot connect to") && log.contains("certificate"),
        "the error must say the certificate was refused:\n{log}"
    );
    assert_eq!(count(&impostor.proc.log_text(), "standby connected"), 0);
    assert!(standby.stop(LONG)?.success());
    assert_eq!(
        stored(&s.path("standby"))?,
        before,
        "a refused primary changed the standby directory"
    );
    Ok(())
}
