//! The campaign's etcd world (`--etcd`, issue #20): a 3-member etcd on
//! loopback, the primary reaching each member through its own faulty link
//! (so it can be cut off from etcd alone), every daemon started with
//! `--etcd`, standbys with `--promote-listen`; one cluster name per
//! generation, so a re-formed world starts from empty keys.
//!
//! Invariants sampled while the driver waits (every [`SAMPLE_EVERY`]):
//! - **never two leaders**: every process that can be a primary (the
//!   primary, and each standby's promote address) is asked for its status;
//!   one that says it leads, unfenced, with lease time left, accepts commit
//!   waits until at least the moment it was asked plus that time, or until
//!   it answers that it no longer acts. Another process seen acting
//!   entirely inside that span is a violation; so is a primary seen acting
//!   after etcd moved to a newer epoch (after a planned switchover, which
//!   moves the epoch under a live lease: later than one loop wait and one
//!   retry timeout after), and one epoch whose leader key names two
//!   members.
//! - **no waited commit lost** is checked at each automatic promotion
//!   (`auto.rs`): the promoted environment holds every transaction whose
//!   commit wait answered durable.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::{Duration, Instant};

use anyhow::{Context, Result};
use tandem_coord::Timing;
use tandem_shared::tls::TlsFiles;
use tandem_shared::wire::replication_client::ReplicationClient;
use tonic::transport::Channel;

use crate::etcd::{EtcdCluster, FAST_TIMING};
use crate::faulty_link::FaultyLink;
use crate::harness::free_port;

/// How often the leaders are sampled while the driver waits.
pub const SAMPLE_EVERY: Duration = Duration::from_millis(100);
/// Bound on one status question.
const ASK: Duration = Duration::from_millis(1500);

/// A process seen acting as primary: from `recv` at the latest (it
/// answered before then) until `send + remaining` at the earliest.
#[derive(Debug, Clone)]
struct Acting {
    send: Instant,
    recv: Instant,
    remaining: Duration,
    epoch: u64,
    name: String,
}

pub struct EtcdWorld {
    pub cluster: EtcdCluster,
    /// The primary's way to member i.
    pub links: Vec<FaultyLink>,
    pub timing: Timing,
    /// The `--etcd-*` timing flags (without `--cluster`).
    pub timing_args: Vec<String>,
    pub rt: tokio::runtime::Runtime,
    /// The current generation's cluster name and a client of its keys.
    coord: Option<(String, tandem_coord::Cluster)>,
    clients: BTreeMap<String, ReplicationClient<Channel>>,
    acting: BTreeMap<String, Acting>,
    /// Leader names seen per epoch in this generation's cluster.
    epochs: BTreeMap<u64, String>,
    /// The newest epoch etcd held, and when it was read.
    etcd_epoch: Option<(u64, Instant)>,
    /// That epoch, when a planned switchover took it.
    switchover_epoch: Option<u64>,
    pub last_sample: Instant,
    /// Where standby i serves once it promoted itself.
    pub promote_listen: Vec<SocketAddr>,
    pub failover_times: Vec<Duration>,
    /// The running application's pid, for the primary's `--on-fence`.
    pub app_pid: PathBuf,
    /// One line per `--on-fence` run.
    pub fences: PathBuf,
}

/// What one look at the leaders found.
pub struct Look {
    pub violations: Vec<String>,
    pub leader: Option<tandem_coord::records::LeaderRecord>,
}

impl EtcdWorld {
    pub fn start(root: &std::path::Path, standbys: usize, default_timing: bool) -> Result<Self> {
        let cluster = EtcdCluster::start()?;
        let mut links = Vec::new();
        for i in 0..crate::etcd::MEMBERS {
            links.push(FaultyLink::start(cluster.client_addr(i))?);
        }
        let timing_args: Vec<String> = if default_timing {
            Vec::new()
        } else {
            // FAST_TIMING without its --cluster pair.
            FAST_TIMING[2..].iter().map(|s| s.to_string()).collect()
        };
        let timing = if default_timing {
            Timing::default()
        } else {
            Timing::from_flags(Some(3), Some(500), Some(1000), Some(500))?
        };
        let mut promote_listen = Vec::new();
        for _ in 0..standbys {
            promote_listen.push(SocketAddr::from(([127, 0, 0, 1], free_port()?)));
        }
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()?;
        Ok(EtcdWorld {
            cluster,
            links,
            timing,
            timing_args,
            rt,
            coord: None,
            clients: BTreeMap::new(),
            acting: BTreeMap::new(),
            epochs: BTreeMap::new(),
            etcd_epoch: None,
            switchover_epoch: None,
            last_sample: Instant::now(),
            promote_listen,
            failover_times: Vec::new(),
            app_pid: root.join("logs").join("app.pid"),
            fences: root.join("logs").join("fences.log"),
        })
    }

    /// The endpoints the primary uses: through its links.
    pub fn primary_endpoints(&self) -> String {
        self.links
            .iter()
            .map(|l| format!("http://{}", l.addr()))
            .collect::<Vec<_>>()
            .join(",")
    }

    /// A new generation's cluster (fresh keys).
    pub fn new_cluster(&mut self, name: String) -> Result<()> {
        let eps = tandem_coord::cluster::parse_endpoints(&self.cluster.endpoints())?;
        let timing = self.timing;
        let c = self
            .rt
            .block_on(tandem_coord::Cluster::connect(&eps, &name, timing))
            .context("connect to etcd")?;
        self.coord = Some((name, c));
        self.acting.clear();
        self.epochs.clear();
        self.etcd_epoch = None;
        self.switchover_epoch = None;
        self.clients.clear();
        Ok(())
    }

    pub fn cluster_name(&self) -> String {
        self.coord.as_ref().map(|c| c.0.clone()).unwrap_or_default()
    }

    /// The cluster's view now (None: etcd did not answer in time).
    pub fn view(&self) -> Option<tandem_coord::policy::ClusterView> {
        let (_, c) = self.coord.as_ref()?;
        self.rt
            .block_on(async { tokio::time::timeout(ASK, c.snapshot()).await })
            .ok()?
            .ok()
            .map(|s| s.view)
    }

    /// The failover record, if any.
    pub fn last_failover(&self) -> Option<tandem_coord::records::FailoverRecord> {
        let (_, c) = self.coord.as_ref()?;
        self.rt
            .block_on(async { tokio::time::timeout(ASK, c.last_failover()).await })
            .ok()?
            .ok()
            .flatten()
    }

    /// The `coordination` part of the status of the primary at `url`
    /// (None: it did not answer), and when it was asked and answered.
    fn ask(
        &mut self,
        url: &str,
        tls: &TlsFiles,
    ) -> (Instant, Instant, Option<tandem_shared::wire::PrimaryStatus>) {
        let send = Instant::now();
        let cached = self.clients.remove(url);
        let got = self.rt.block_on(async {
            tokio::time::timeout(ASK, async {
                let mut client = match cached {
                    Some(c) => c,
                    None => tandem_shared::client::connect(url, None, tls, ASK)
                        .await
                        .ok()?,
                };
                let s = client
                    .status(tandem_shared::wire::StatusRequest {})
                    .await
                    .ok()?
                    .into_inner();
                Some((client, s))
            })
            .await
            .ok()
            .flatten()
        });
        let recv = Instant::now();
        match got {
            Some((client, s)) => {
                self.clients.insert(url.to_owned(), client);
                (send, recv, Some(s))
            }
            None => (send, recv, None),
        }
    }

    /// The process at `url` was killed: it accepts nothing any more.
    pub fn forget(&mut self, url: &str) {
        self.acting.remove(url);
        self.clients.remove(url);
    }

    /// Whether the primary at `url` says it acts as primary now (leads,
    /// unfenced, lease time left).
    pub fn acting(&mut self, url: &str, tls: &TlsFiles) -> bool {
        let (_, _, st) = self.ask(url, tls);
        st.and_then(|s| s.coordination)
            .is_some_and(|c| c.leading && !c.fenced && c.lease_remaining_ms > 0)
    }

    /// One look: etcd's leader key, then each possible primary.
    pub fn look(&mut self, urls: &[String], tls: &TlsFiles) -> Look {
        self.last_sample = Instant::now();
        let mut violations = Vec::new();
        let mut leader = None;
        if let Some(v) = self.view() {
            let read = Instant::now();
            if let Some(l) = &v.leader {
                match self.epochs.get(&l.epoch) {
                    Some(n) if *n != l.name => violations.push(format!(
                        "two leaders for epoch {}: etcd's leader key named {n} and then {}",
                        l.epoch, l.name
                    )),
                    Some(_) => {}
                    None => {
                        self.epochs.insert(l.epoch, l.name.clone());
                    }
                }
                leader = Some(l.clone());
            }
            if let Some(e) = &v.epoch {
                if self
                    .etcd_epoch
                    .as_ref()
                    .is_none_or(|(had, _)| e.epoch > *had)
                {
                    self.etcd_epoch = Some((e.epoch, read));
                    self.switchover_epoch = self
                        .last_failover()
                        .filter(|f| f.kind == "switchover" && f.epoch == e.epoch)
                        .map(|f| f.epoch);
                }
            }
        }
        for url in urls {
            let (send, recv, st) = self.ask(url, tls);
            let Some(st) = st else {
                // Nothing listens there any more: the process is gone
                // (an old primary exits 7 the moment it sees the new
                // epoch), and a dead process answers no commit wait.
                if tandem_shared::client::nothing_listens(url, Duration::from_millis(200)) {
                    self.end_span(url, Instant::now());
                }
                continue;
            };
            let Some(c) = &st.coordination else { continue };
            if !(c.leading && !c.fenced && c.lease_remaining_ms > 0) {
                // It said it no longer acts (it checks before answering
                // any commit wait): its span ends by this answer at the
                // latest, as a switchover's target waits for exactly this.
                self.end_span(url, recv);
                continue;
            }
            let me = Acting {
                send,
                recv,
                remaining: Duration::from_millis(c.lease_remaining_ms),
                epoch: st.epoch,
                name: c.name.clone(),
            };
            for (other_url, o) in &self.acting {
                if other_url != url && send >= o.recv && recv <= o.send + o.remaining {
                    violations.push(format!(
                        "two primaries accept commit waits at once: {} (epoch {}, {url}) acts while {} (epoch {}, {other_url}) \
                         still had {} ms of lease {} ms before",
                        me.name,
                        me.epoch,
                        o.name,
                        o.epoch,
                        o.remaining.as_millis(),
                        send.duration_since(o.send).as_millis()
                    ));
                }
            }
            if let Some((e, read)) = self.etcd_epoch {
                // A switchover moves the epoch while the old primary's
                // lease still runs; from that instant its commit waits fail
                // (its floor writes compare its lease) and it fences once
                // it sees the key move (watch, or next publish at worst).
                let grace = if self.switchover_epoch == Some(e) {
                    self.timing.loop_wait + self.timing.retry_timeout
                } else {
                    Duration::ZERO
                };
                if me.epoch < e && send >= read + grace {
                    violations.push(format!(
                        "{} (epoch {}, {url}) acts as primary after etcd moved to epoch {e}",
                        me.name, me.epoch
                    ));
                }
            }
            self.acting.insert(url.clone(), me);
        }
        Look { violations, leader }
    }

    /// The process at `url` no longer acts after `at`.
    fn end_span(&mut self, url: &str, at: Instant) {
        if let Some(a) = self.acting.get_mut(url) {
            a.remaining = a.remaining.min(at.saturating_duration_since(a.send));
        }
    }

    /// Cuts the primary off from every etcd member (or heals it).
    pub fn isolate_primary(&self, cut: bool) {
        for l in &self.links {
            if cut {
                l.sever();
            } else {
                l.restore();
            }
        }
    }

    /// How many times `--on-fence` ran.
    pub fn fence_count(&self) -> usize {
        std::fs::read_to_string(&self.fences)
            .map(|s| s.lines().count())
            .unwrap_or(0)
    }
}

/// The primary's name in etcd (every generation's cluster is new).
pub const PRIMARY_NAME: &str = "primary";
