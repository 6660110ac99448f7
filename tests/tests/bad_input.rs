//! Requirement: "Bad input gets a clear error and changes nothing". Real
//! binaries, real Berkeley DB, loopback mutual TLS; plus a hostile primary
//! implemented here (a tonic server with the pair's certificates) that sends
//! what a real primary never would.
//!
//! Every test that has a standby directory proves it unchanged with
//! `harness::dir_digest` taken before and after (see `stored`).

// Messages are built with `..Default::default()` even where every field is
// given today: the protocol grows fields, the tests set what they mean.
#![allow(clippy::needless_update)]

use anyhow::{bail, ensure, Context, Result};
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;
use tandem_shared::logfile::{self, synth, walk_file};
use tandem_shared::tls::TlsFiles;
use tandem_shared::wire::replication_client::ReplicationClient;
use tandem_shared::wire::replication_server::{Replication, ReplicationServer};
use tandem_shared::wire::{
    primary_message::Kind, standby_message, FileChunk, FileEnd, FileKind, FileStart, Hello,
    LogChunk, PrimaryMessage, PrimaryStatus, StandbyMessage, StatusRequest, SwitchoverReply,
    SwitchoverRequest, Welcome, PROTOCOL_VERSION,
};
use tandem_shared::{LogPosition, MAX_MESSAGE_BYTES};
use tandem_tests::bdb::{self, WorkloadOptions};
use tandem_tests::harness::*;
use tokio_stream::wrappers::ReceiverStream;
use tonic::transport::{Certificate, ClientTlsConfig, Endpoint, Identity};
use tonic::{Request, Response, Status, Streaming};

const LONG: Duration = Duration::from_secs(60);
/// No periodic readiness check: it would write its clone under `.tandem`.
const NO_CHECKS: [&str; 2] = ["--check-interval-secs", "0"];

fn workload(txns: u64) -> WorkloadOptions {
    WorkloadOptions {
        txns,
        checkpoint_every: 500,
        lg_max: 1 << 20,
        quiet: true,
        ..Default::default()
    }
}

/// What the standby directory holds, by content (`harness::dir_digest`),
/// less `.tandem/follow.json`: that file records where `run` last followed
/// from (rewritten on every accepted Welcome), it is configuration, not
/// mirrored data.
fn stored(dir: &Path) -> Result<BTreeMap<String, String>> {
    let mut d = dir_digest(dir)?;
    d.remove(".tandem/follow.json");
    Ok(d)
}

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

fn primary_command(env: &Path, certs: &Certs) -> Command {
    let mut cmd = Command::new(bin("tandem-primary"));
    cmd.arg("run")
        .arg("--env")
        .arg(env)
        .args(["--listen", "127.0.0.1:0"]);
    for (flag, file) in [
        ("--cert", "primary.pem"),
        ("--key", "primary-key.pem"),
        ("--ca", "ca.pem"),
    ] {
        cmd.arg(flag).arg(certs.dir.join(file));
    }
    cmd
}

/// `tandem-primary status --json`, asked with the standby's certificate.
fn primary_status(p: &Primary, certs: &Certs) -> Result<serde_json::Value> {
    let out = Command::new(bin("tandem-primary"))
        .args(["status", "--json", "--primary", &p.url()])
        .arg("--cert")
        .arg(certs.dir.join("standby.pem"))
        .arg("--key")
        .arg(certs.dir.join("standby-key.pem"))
        .arg("--ca")
        .arg(certs.dir.join("ca.pem"))
        .output()?;
    ensure!(
        out.status.success(),
        "primary status failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    Ok(serde_json::from_slice(&out.stdout)?)
}

fn count(text: &str, pat: &str) -> usize {
    text.matches(pat).count()
}

/// The last `n` lines of a log, for failure messages.
fn tail(text: &str, n: usize) -> String {
    let lines: Vec<&str> = text.lines().collect();
    lines[lines.len().saturating_sub(n)..].join("\n")
}

/// tonic reports a refused TLS handshake (a client certificate from another
/// CA, none at all) only at debug level, which the primary's default filter
/// (`info`) hides; this shows it.
const SHOW_TLS_REFUSALS: [(&str, &str); 1] =
    [("RUST_LOG", "info,tonic::transport::server::io_stream=debug")];

/// `harness::start_primary` with extra environment variables.
fn start_primary_env(
    s: &Scratch,
    env: &Path,
    certs: &Certs,
    tag: &str,
    vars: &[(&str, &str)],
) -> Result<Primary> {
    let addr_file = s.path(&format!("primary-{tag}.addr"));
    let mut cmd = primary_command(env, certs);
    cmd.arg("--bound-addr-file")
        .arg(&addr_file)
        .envs(vars.iter().copied());
    let mut proc = Proc::spawn(
        "tandem-primary",
        cmd,
        &s.path(&format!("primary-{tag}.log")),
    )?;
    let mut addr = None;
    wait_for("the primary to listen", LONG, || {
        ensure!(
            proc.is_running(),
            "tandem-primary exited: {}",
            proc.log_text()
        );
        addr = std::fs::read_to_string(&addr_file)
            .ok()
            .and_then(|a| a.trim().parse().ok());
        Ok(addr.is_some())
    })?;
    Ok(Primary {
        proc,
        addr: addr.context("bound address")?,
        env: env.into(),
    })
}

/// A primary serving a workload's environment and a standby directory that
/// mirrors it completely (the standby is stopped again).
fn synced(txns: u64) -> Result<(Scratch, Primary)> {
    synced_env(txns, &[])
}

fn synced_env(txns: u64, vars: &[(&str, &str)]) -> Result<(Scratch, Primary)> {
    let s = Scratch::new()?;
    bdb::run_workload(&s.path("env"), &workload(txns))?;
    let primary = start_primary_env(&s, &s.path("env"), &s.certs, "synced", vars)?;
    let mut standby = start_standby(
        s.root(),
        &s.path("standby"),
        &primary.url(),
        &s.certs,
        &NO_CHECKS,
    )?;
    wait_caught_up(&s.path("standby"), &s.path("env"), LONG)?;
    let status = standby.stop(LONG)?;
    ensure!(
        status.success(),
        "standby did not stop cleanly: {}",
        standby.log_text()
    );
    Ok((s, primary))
}

fn runtime() -> Result<tokio::runtime::Runtime> {
    Ok(tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()?)
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
    wait_for("two refused connections", LONG, || {
        ensure!(
            standby.is_running(),
            "the standby exited: {}",
            standby.log_text()
        );
        Ok(count(&standby.log_text(), "stream interrupted") >= 2)
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
    bdb::run_workload(&s.path("env"), &workload(100))?;
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
    bdb::run_workload(&s.path("env"), &workload(200))?;
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
    bdb::run_workload(&s.path("env"), &workload(50))?;
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

// ------------------------------------------------------ a hostile primary

/// What the hostile primary sends on its Nth connection, and a hook run
/// just before (to change the standby's directory under it).
struct Script {
    messages: Vec<Kind>,
    before: Option<Box<dyn Fn() + Send + Sync>>,
}

fn script(messages: Vec<Kind>) -> Script {
    Script {
        messages,
        before: None,
    }
}

/// A primary that plays one script per connection (the last one again
/// once they run out), and records what the standby says.
struct Hostile {
    scripts: Vec<Script>,
    sessions: AtomicUsize,
    heard: Arc<Mutex<Vec<StandbyMessage>>>,
}

/// The gRPC service around a shared `Hostile` (the test keeps a handle).
struct HostileService(Arc<Hostile>);

#[tonic::async_trait]
impl Replication for HostileService {
    type StreamStream = ReceiverStream<std::result::Result<PrimaryMessage, Status>>;

    async fn stream(
        &self,
        request: Request<Streaming<StandbyMessage>>,
    ) -> std::result::Result<Response<Self::StreamStream>, Status> {
        let n = self.0.sessions.fetch_add(1, Ordering::SeqCst);
        let script = &self.0.scripts[n.min(self.0.scripts.len() - 1)];
        if let Some(hook) = &script.before {
            hook();
        }
        let messages: Vec<PrimaryMessage> = script
            .messages
            .iter()
            .cloned()
            .map(|k| PrimaryMessage { kind: Some(k) })
            .collect();
        let (tx, rx) = tokio::sync::mpsc::channel(messages.len() + 1);
        let mut inbound = request.into_inner();
        let heard = self.0.heard.clone();
        tokio::spawn(async move {
            for m in messages {
                if tx.send(Ok(m)).await.is_err() {
                    return;
                }
            }
            // Keep the stream open until the standby hangs up.
            while let Ok(Some(m)) = inbound.message().await {
                if let Ok(mut h) = heard.lock() {
                    h.push(m);
                }
            }
        });
        Ok(Response::new(ReceiverStream::new(rx)))
    }

    async fn status(
        &self,
        _: Request<StatusRequest>,
    ) -> std::result::Result<Response<PrimaryStatus>, Status> {
        Err(Status::unimplemented("hostile primary"))
    }

    async fn prepare_switchover(
        &self,
        _: Request<SwitchoverRequest>,
    ) -> std::result::Result<Response<SwitchoverReply>, Status> {
        Err(Status::unimplemented("hostile primary"))
    }
}

/// Serves `scripts` on a free loopback port with the pair's primary
/// certificate (so the standby accepts it: it is the *content* that is bad).
fn serve_hostile(
    rt: &tokio::runtime::Runtime,
    certs: &Certs,
    scripts: Vec<Script>,
) -> Result<(String, Arc<Hostile>)> {
    let tls = TlsFiles {
        cert: certs.dir.join("primary.pem"),
        key: certs.dir.join("primary-key.pem"),
        ca: certs.dir.join("ca.pem"),
    };
    let tls = tls.server_config()?;
    let hostile = Arc::new(Hostile {
        scripts,
        sessions: AtomicUsize::new(0),
        heard: Arc::new(Mutex::new(Vec::new())),
    });
    let incoming = {
        let _guard = rt.enter();
        tonic::transport::server::TcpIncoming::bind("127.0.0.1:0".parse()?)?
    };
    let addr = incoming.local_addr()?;
    let router = tonic::transport::Server::builder()
        .tls_config(tls)?
        .add_service(ReplicationServer::new(HostileService(hostile.clone())));
    rt.spawn(router.serve_with_incoming(incoming));
    Ok((format!("https://{addr}"), hostile))
}

fn heard(h: &Hostile) -> Vec<StandbyMessage> {
    h.heard.lock().map(|v| v.clone()).unwrap_or_default()
}

fn acks(h: &Hostile) -> usize {
    heard(h)
        .iter()
        .filter(|m| matches!(m.kind, Some(standby_message::Kind::Ack(_))))
        .count()
}

fn welcome(env_id: &str, epoch: u64, resume: bool) -> Kind {
    Kind::Welcome(Welcome {
        env_id: env_id.into(),
        epoch,
        log_dir: String::new(),
        resume,
        ..Default::default()
    })
}

fn file_start(name: &str, size: u64) -> Kind {
    Kind::FileStart(FileStart {
        name: name.into(),
        size,
        kind: FileKind::Database as i32,
        page_size: 4096,
        ..Default::default()
    })
}

fn file_chunk(name: &str, data: Vec<u8>) -> Kind {
    let digest = blake3::hash(&data).as_bytes().to_vec();
    Kind::FileChunk(FileChunk {
        name: name.into(),
        offset: 0,
        data: data.into(),
        blake3: digest.into(),
        ..Default::default()
    })
}

/// A whole small file: start, one chunk, end.
fn whole_file(name: &str, data: &[u8]) -> Vec<Kind> {
    vec![
        file_start(name, data.len() as u64),
        file_chunk(name, data.to_vec()),
        Kind::FileEnd(FileEnd {
            name: name.into(),
            size: data.len() as u64,
            ..Default::default()
        }),
    ]
}

/// The newest log file of a directory and where its verified records end.
fn log_end(dir: &Path) -> Result<(u32, logfile::Walk)> {
    let newest = std::fs::read_dir(dir)?
        .flatten()
        .filter_map(|e| {
            e.file_name()
                .to_str()
                .and_then(logfile::parse_log_file_name)
        })
        .max()
        .context("no log file")?;
    Ok((
        newest,
        walk_file(
            &std::fs::File::open(dir.join(logfile::log_file_name(newest)))?,
            None,
        )?,
    ))
}

#[test]
fn a_hostile_primary_cannot_write_outside_the_standby_directory() -> Result<()> {
    // The brief's case on a new standby: Welcome, BaseStart, then a file
    // that climbs out of the directory.
    let s = Scratch::new()?;
    let rt = runtime()?;
    let (url, hostile) = serve_hostile(
        &rt,
        &s.certs,
        vec![script(
            [
                vec![welcome("env-hostile", 1, false)],
                vec![Kind::BaseStart(tandem_shared::wire::BaseStart {
                    base_id: "hostile".into(),
                    log_start: Some(LogPosition::new(1, 0).into()),
                    reason: "test".into(),
                    ..Default::default()
                })],
                whole_file("../escape.db", b"written outside the standby directory"),
            ]
            .concat(),
        )],
    )?;
    std::fs::create_dir(s.path("standby"))?;
    let around = |s: &Scratch| -> Result<Vec<String>> {
        let mut names: Vec<String> = std::fs::read_dir(s.root())?
            .flatten()
            .map(|e| e.file_name().to_string_lossy().into_owned())
            .collect();
        names.retain(|n| !n.ends_with(".log")); // the processes' own logs
        names.sort();
        Ok(names)
    };
    let before = around(&s)?;
    let mut standby = start_standby(s.root(), &s.path("standby"), &url, &s.certs, &NO_CHECKS)?;
    wait_for("the refusal, twice", LONG, || {
        Ok(count(&standby.log_text(), "refused file name") >= 2)
    })?;
    let log = standby.log_text();
    assert!(
        log.contains(r#"file name "../escape.db" contains '..' or '.'"#),
        "{log}"
    );
    assert!(standby.stop(LONG)?.success());
    assert!(
        !s.path("escape.db").exists(),
        "a file was written outside the standby directory"
    );
    assert_eq!(
        around(&s)?,
        before,
        "something appeared next to the standby directory"
    );
    let inside: Vec<String> = dir_digest(&s.path("standby"))?
        .into_keys()
        .filter(|k| !k.starts_with(".tandem/"))
        .collect();
    assert!(
        inside.is_empty(),
        "nothing may be written into the standby directory but its own state: {inside:?}"
    );
    assert_eq!(acks(&hostile), 0, "the standby acknowledged something");
    rt.shutdown_background();
    Ok(())
}

#[test]
fn a_hostile_primary_cannot_damage_a_standby_directory() -> Result<()> {
    let (s, mut primary) = synced(1500)?;
    primary.proc.stop(LONG)?;
    let dir = s.path("standby");
    let st = standby_status(&dir)?;
    let (env_id, epoch) = (
        st["env_id"].as_str().context("env_id")?.to_owned(),
        st["epoch"].as_u64().unwrap_or(0),
    );
    let durable = lsn_of(&st["durable_lsn"]);
    let (newest, walk) = log_end(&dir)?;
    ensure!(
        LogPosition::new(newest, walk.end) == durable,
        "status and files disagree"
    );

    // Things outside that a write through the directory would change.
    let outside = s.path("outside");
    std::fs::create_dir(&outside)?;
    std::fs::write(outside.join("victim.db"), b"not the standby's")?;
    std::fs::write(outside.join("victim.log"), b"not the standby's either")?;
    std::os::unix::fs::symlink(outside.join("victim.db"), dir.join("evil.db"))?;
    let next_log = dir.join(logfile::log_file_name(newest + 1));
    let before = stored(&dir)?;

    // Valid records for the next log file: only its name is a trap.
    let prev = walk.last_record.context("records")?;
    let next_file = synth::file(prev, 1 << 20, &[b"a record", b"another"], 0);
    let resume = || welcome(&env_id, epoch, true);
    let link_log = next_log.clone();
    let victim_log = outside.join("victim.log");
    let oversized = vec![7u8; MAX_MESSAGE_BYTES];
    let scripts = vec![
        script([vec![resume()], whole_file("../escape.db", b"x")].concat()),
        script(
            [
                vec![resume()],
                whole_file(&outside.join("abs.db").display().to_string(), b"x"),
            ]
            .concat(),
        ),
        script(
            [
                vec![resume()],
                whole_file("evil.db", b"overwrite the victim"),
            ]
            .concat(),
        ),
        // Planted once the standby runs (a link there at start-up is itself
        // refused when the directory is opened, see mirror_tests.rs).
        Script {
            messages: vec![
                resume(),
                Kind::LogChunk(LogChunk {
                    file: newest + 1,
                    offset: 0,
                    blake3: blake3::hash(&next_file).as_bytes().to_vec().into(),
                    data: next_file.clone().into(),
                    file_size: (1 << 20) - 1,
                    ..Default::default()
                }),
            ],
            before: Some(Box::new(move || {
                let _ = std::os::unix::fs::symlink(&victim_log, &link_log);
            })),
        },
        // 4: a message over the size limit.
        script(vec![
            resume(),
            file_start("big.db", oversized.len() as u64),
            file_chunk("big.db", oversized),
        ]),
        // 5: another environment: refused for good.
        script(vec![welcome("another-environment", epoch + 1, false)]),
    ];
    let rt = runtime()?;
    let (url, hostile) = serve_hostile(&rt, &s.certs, scripts)?;
    let mut standby = start_standby(s.root(), &dir, &url, &s.certs, &NO_CHECKS)?;
    let status = standby.wait_exit(LONG)?;
    let log = standby.log_text();
    eprintln!("{}", tail(&log, 8));
    for expected in [
        r#"file name "../escape.db" contains '..' or '.'"#,
        &format!(
            r#"file name "{}" is absolute"#,
            outside.join("abs.db").display()
        ),
        r#"file name "evil.db" goes through symlink"#,
        &format!(
            r#"file name "{}" goes through symlink"#,
            logfile::log_file_name(newest + 1)
        ),
        "decoded message length too large",
        "environment mismatch: this directory mirrors environment",
    ] {
        assert!(
            log.contains(expected),
            "the standby's log does not say {expected:?}:\n{log}"
        );
    }
    assert_eq!(
        status.code(),
        Some(3),
        "another environment must end the standby with code 3:\n{log}"
    );
    assert_eq!(
        hostile.sessions.load(Ordering::SeqCst),
        6,
        "one connection per script"
    );

    // Nothing outside changed, nothing inside changed.
    assert_eq!(
        std::fs::read(outside.join("victim.db"))?,
        b"not the standby's"
    );
    assert_eq!(
        std::fs::read(outside.join("victim.log"))?,
        b"not the standby's either"
    );
    assert!(!s.path("escape.db").exists() && !outside.join("abs.db").exists());
    std::fs::remove_file(&next_log)?; // the link the hook planted
    assert_eq!(
        stored(&dir)?,
        before,
        "the hostile primary changed the standby directory"
    );
    // It never claimed more: every Hello offered the same durable end, and
    // no Ack was sent.
    assert_eq!(
        acks(&hostile),
        0,
        "the standby acknowledged something to a hostile primary"
    );
    let hellos: Vec<LogPosition> = heard(&hostile)
        .into_iter()
        .filter_map(|m| match m.kind {
            Some(standby_message::Kind::Hello(h)) => Some(h.durable.unwrap_or_default().into()),
            _ => None,
        })
        .collect();
    assert_eq!(
        hellos,
        vec![durable; 6],
        "the standby's Hello changed between refusals"
    );
    let st = standby_status(&dir)?;
    assert_eq!(lsn_of(&st["durable_lsn"]), durable);
    assert_eq!(st["recoverable"], true);
    rt.shutdown_background();
    Ok(())
}

/// `n` log records that continue a log whose last record is at `prev` and
/// which ends at `start`.
fn records(start: u32, prev: u32, tag: &str, n: usize) -> Vec<u8> {
    let (mut out, mut prev) = (Vec::new(), prev);
    for i in 0..n {
        let at = start + out.len() as u32;
        out.extend_from_slice(&synth::record(prev, format!("{tag} record {i}").as_bytes()));
        prev = at;
    }
    out
}

/// blake3 of the record before `end` in the standby's log file: what a
/// Hello that offers `end` must carry as `last_record_digest`.
fn digest_before(dir: &Path, end: LogPosition) -> Result<Vec<u8>> {
    let bytes = std::fs::read(dir.join(logfile::log_file_name(end.file)))?;
    let w = logfile::walk(&bytes[..end.offset as usize], 0, None);
    ensure!(
        w.end == end.offset,
        "the standby's log does not verify to {end}"
    );
    let last = w.last_record.context("no record")? as usize;
    Ok(blake3::hash(&bytes[last..end.offset as usize])
        .as_bytes()
        .to_vec())
}

#[test]
fn a_corrupted_log_chunk_does_not_move_the_resume_point() -> Result<()> {
    // Good log, then a chunk whose digest does not match, back to back (one
    // batch). The standby must refuse the second and, on reconnecting,
    // offer a resume point whose position and last-record digest agree:
    // otherwise a real primary sees "a different history" and starts a new
    // base, deleting everything the standby holds.
    let (s, mut primary) = synced(800)?;
    primary.proc.stop(LONG)?;
    let dir = s.path("standby");
    let st = standby_status(&dir)?;
    let (env_id, epoch) = (
        st["env_id"].as_str().context("env_id")?.to_owned(),
        st["epoch"].as_u64().unwrap_or(0),
    );
    let (newest, walk) = log_end(&dir)?;
    let durable = LogPosition::new(newest, walk.end);
    let good = records(walk.end, walk.last_record.context("records")?, "good", 3);
    let good_last = walk.end + (good.len() - synth::record(0, b"good record 2").len()) as u32;
    let bad = records(walk.end + good.len() as u32, good_last, "bad", 3);
    let chunk = |offset: u32, data: &[u8], digest: Vec<u8>| {
        Kind::LogChunk(LogChunk {
            file: newest,
            offset,
            data: data.to_vec().into(),
            blake3: digest.into(),
            file_size: (1 << 20) - 1,
            ..Default::default()
        })
    };
    let mut flipped = blake3::hash(&bad).as_bytes().to_vec();
    flipped[0] ^= 0xff;
    let before: BTreeMap<String, String> = stored(&dir)?
        .into_iter()
        .filter(|(k, _)| k != &logfile::log_file_name(newest))
        .collect();
    let rt = runtime()?;
    let (url, hostile) = serve_hostile(
        &rt,
        &s.certs,
        vec![
            script(vec![
                welcome(&env_id, epoch, true),
                chunk(walk.end, &good, blake3::hash(&good).as_bytes().to_vec()),
                chunk(walk.end + good.len() as u32, &bad, flipped),
            ]),
            script(vec![welcome(&env_id, epoch, true)]),
        ],
    )?;
    let mut standby = start_standby(s.root(), &dir, &url, &s.certs, &NO_CHECKS)?;
    let hellos = || -> Vec<Hello> {
        heard(&hostile)
            .into_iter()
            .filter_map(|m| match m.kind {
                Some(standby_message::Kind::Hello(h)) => Some(h),
                _ => None,
            })
            .collect()
    };
    wait_for("the standby to come back after the refusal", LONG, || {
        Ok(hellos().len() >= 2)
    })?;
    let log = standby.log_text();
    assert!(log.contains("blake3 mismatch for log chunk"), "{log}");
    assert!(standby.stop(LONG)?.success());
    let again = &hellos()[1];
    let offered: LogPosition = again.durable.unwrap_or_default().into();
    eprintln!(
        "durable {durable}, good log to {}, offered again {offered}",
        walk.end + good.len() as u32
    );
    assert!(
        offered == durable || offered == LogPosition::new(newest, walk.end + good.len() as u32),
        "{offered}"
    );
    assert_eq!(
        again.last_record_digest.to_vec(),
        digest_before(&dir, offered)?,
        "the Hello offers {offered} with the digest of another record: a real primary would start a new base"
    );
    assert_eq!(again.base_id, st["base_id"].as_str().unwrap_or_default());
    // Nothing of the corrupted chunk is on disk; what was stored is intact.
    let (_, after) = log_end(&dir)?;
    assert!(
        after.end <= walk.end + good.len() as u32,
        "bytes of the corrupted chunk verify on disk"
    );
    let now: BTreeMap<String, String> = stored(&dir)?
        .into_iter()
        .filter(|(k, _)| k != &logfile::log_file_name(newest))
        .collect();
    assert_eq!(now, before);
    rt.shutdown_background();
    Ok(())
}

// ---------------------------------------------------- 4: message size limit

#[test]
fn a_message_over_the_size_limit_is_refused_by_the_primary() -> Result<()> {
    let s = Scratch::new()?;
    bdb::run_workload(&s.path("env"), &workload(200))?;
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
    bdb::run_workload(&s.path("env-b"), &workload(300))?;
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
    bdb::run_workload(&s.path("env"), &workload(200))?;
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
    bdb::run_workload(&s.path("env"), &workload(2000))?;
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
        ..workload(3000)
    };
    let mut w = Proc::spawn(
        "workload",
        more.command(&s.path("env")),
        &s.path("workload-more.log"),
    )?;
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
