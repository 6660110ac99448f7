//! Requirement: "Bad input gets a clear error and changes nothing", against
//! a hostile primary implemented here (a tonic server with the pair's
//! certificates) that sends what a real primary never would: names that
//! leave the standby directory, damaging files and log, a corrupted log
//! chunk. Real standby binary, real Berkeley DB, loopback mutual TLS.
//!
//! Every test proves the standby directory unchanged with
//! `harness::dir_digest` taken before and after (see `refusal::stored`).

// Messages are built with `..Default::default()` even where every field is
// given today: the protocol grows fields, the tests set what they mean.
#![allow(clippy::needless_update)]

use anyhow::{ensure, Context, Result};
use std::collections::BTreeMap;
use std::path::Path;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use tandem_shared::logfile::{self, synth};
use tandem_shared::tls::TlsFiles;
use tandem_shared::wire::replication_server::{Replication, ReplicationServer};
use tandem_shared::wire::{
    primary_message::Kind, standby_message, FileChunk, FileEnd, FileKind, FileStart, Hello,
    LogChunk, PrimaryMessage, PrimaryStatus, StandbyMessage, StatusRequest, SwitchoverReply,
    SwitchoverRequest, Welcome,
};
use tandem_shared::{LogPosition, MAX_MESSAGE_BYTES};
use tandem_tests::harness::*;
use tandem_tests::refusal::*;
use tokio_stream::wrappers::ReceiverStream;
use tonic::{Request, Response, Status, Streaming};

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
        // refused when the directory is opened, see standby/src/mirror/tests/names.rs).
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
