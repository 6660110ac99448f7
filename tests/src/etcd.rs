//! A real 3-member etcd cluster on loopback for the failover tests: free
//! ports (never etcd's defaults 2379/2380, where Debian's own service may
//! listen), its own data directories, members that can be killed and
//! restarted. Dropping it kills every member and removes the directories.
//!
//! Elections inside etcd are made fast (heartbeat 50 ms, election timeout
//! 500 ms) so a killed member's leadership moves in well under a second.

use crate::harness::{free_port, wait_for, Proc};
use anyhow::{bail, Context, Result};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

pub const MEMBERS: usize = 3;

/// The failover tests' cluster name and fast timing (ttl 3 s; loop_wait +
/// 2 × retry_timeout = 2.5 s ≤ ttl, as `tandem-coord` requires), the same
/// for every daemon of a test.
pub const FAST_TIMING: [&str; 10] = [
    "--cluster",
    "c1",
    "--etcd-ttl-secs",
    "3",
    "--etcd-loop-wait-ms",
    "500",
    "--etcd-retry-timeout-ms",
    "1000",
    "--etcd-fence-margin-ms",
    "500",
];

pub struct Member {
    pub name: String,
    pub client_port: u16,
    pub peer_port: u16,
    pub proc: Option<Proc>,
}

pub struct EtcdCluster {
    pub dir: tempfile::TempDir,
    pub members: Vec<Member>,
    initial: String,
}

/// A [`free_port`] that is not one of etcd's defaults 2379/2380.
fn etcd_port() -> Result<u16> {
    loop {
        let p = free_port()?;
        if p != 2379 && p != 2380 {
            return Ok(p);
        }
    }
}

/// `etcd` is Debian's etcd-server (scripts/setup installs it).
pub fn etcd_available() -> bool {
    Command::new("etcd")
        .arg("--version")
        .output()
        .is_ok_and(|o| o.status.success())
}

impl EtcdCluster {
    /// Starts three members and waits until the cluster answers. A member
    /// that exits during start (a port taken after all) costs one more try
    /// on fresh ports; the error names each member's log.
    pub fn start() -> Result<Self> {
        if !etcd_available() {
            bail!("etcd is not installed: run scripts/setup (Debian's etcd-server)");
        }
        let mut last = None;
        for _ in 0..3 {
            let mut c = Self::spawn_all()?;
            let mut exited = 0;
            let healthy = wait_for("etcd to be healthy", Duration::from_secs(30), || {
                exited = c
                    .members
                    .iter_mut()
                    .map(|m| m.proc.as_mut().is_some_and(|p| !p.is_running()))
                    .filter(|&gone| gone)
                    .count();
                Ok(exited > 0 || c.etcdctl(&["endpoint", "health"])?.status.success())
            });
            if healthy.is_ok() && exited == 0 {
                return Ok(c);
            }
            let logs: String = (0..MEMBERS)
                .map(|i| format!("\n--- {} ---\n{}", c.members[i].name, c.log_of(i)))
                .collect();
            let err = healthy
                .err()
                .unwrap_or_else(|| anyhow::anyhow!("etcd did not start"))
                .context(format!(
                    "{exited} member(s) exited; the members' logs:{logs}"
                ));
            if exited == 0 {
                return Err(err);
            }
            last = Some(err);
        }
        Err(last.unwrap_or_else(|| anyhow::anyhow!("etcd did not start")))
    }

    fn spawn_all() -> Result<Self> {
        let dir = tempfile::Builder::new().prefix("tandem-etcd-").tempdir()?;
        let mut members = Vec::new();
        for i in 0..MEMBERS {
            members.push(Member {
                name: format!("m{i}"),
                client_port: etcd_port()?,
                peer_port: etcd_port()?,
                proc: None,
            });
        }
        let initial = members
            .iter()
            .map(|m| format!("{}=http://127.0.0.1:{}", m.name, m.peer_port))
            .collect::<Vec<_>>()
            .join(",");
        let mut c = Self {
            dir,
            members,
            initial,
        };
        for i in 0..MEMBERS {
            c.spawn(i)?;
        }
        Ok(c)
    }

    fn data_dir(&self, i: usize) -> PathBuf {
        self.dir.path().join(&self.members[i].name)
    }

    fn spawn(&mut self, i: usize) -> Result<()> {
        let m = &self.members[i];
        let client = format!("http://127.0.0.1:{}", m.client_port);
        let peer = format!("http://127.0.0.1:{}", m.peer_port);
        let mut cmd = Command::new("etcd");
        cmd.args(["--name", &m.name])
            .arg("--data-dir")
            .arg(self.data_dir(i))
            .args(["--listen-client-urls", &client])
            .args(["--advertise-client-urls", &client])
            .args(["--listen-peer-urls", &peer])
            .args(["--initial-advertise-peer-urls", &peer])
            .args(["--initial-cluster", &self.initial])
            .args(["--initial-cluster-state", "new"])
            .args(["--initial-cluster-token", "tandem-test"])
            .args(["--heartbeat-interval", "50", "--election-timeout", "500"])
            .args(["--logger", "zap", "--log-level", "warn"]);
        let log = self.dir.path().join(format!("{}.log", m.name));
        let name = m.name.clone();
        self.members[i].proc = Some(Proc::spawn(&format!("etcd {name}"), cmd, &log)?);
        Ok(())
    }

    /// `http://127.0.0.1:P,...` for `--etcd`.
    pub fn endpoints(&self) -> String {
        self.members
            .iter()
            .map(|m| format!("http://127.0.0.1:{}", m.client_port))
            .collect::<Vec<_>>()
            .join(",")
    }

    pub fn client_addr(&self, i: usize) -> std::net::SocketAddr {
        std::net::SocketAddr::from(([127, 0, 0, 1], self.members[i].client_port))
    }

    /// SIGKILL one member.
    pub fn kill(&mut self, i: usize) -> Result<()> {
        if let Some(mut p) = self.members[i].proc.take() {
            p.kill9()?;
        }
        Ok(())
    }

    /// Starts a killed member again on its data directory.
    pub fn restart(&mut self, i: usize) -> Result<()> {
        if self.members[i].proc.is_none() {
            self.spawn(i)?;
        }
        Ok(())
    }

    /// etcdctl against the members that run, with a short timeout.
    pub fn etcdctl(&self, args: &[&str]) -> Result<std::process::Output> {
        self.etcdctl_command(args)
            .output()
            .context("running etcdctl (Debian's etcd-client)")
    }

    fn etcdctl_command(&self, args: &[&str]) -> Command {
        let eps: Vec<String> = self
            .members
            .iter()
            .filter(|m| m.proc.is_some())
            .map(|m| format!("http://127.0.0.1:{}", m.client_port))
            .collect();
        let mut c = Command::new("etcdctl");
        c.env("ETCDCTL_API", "3")
            .arg(format!("--endpoints={}", eps.join(",")))
            .args(["--command-timeout=2s", "--dial-timeout=1s"])
            .args(args);
        c
    }

    /// Watches every key under `prefix` (`etcdctl watch --prefix`) and
    /// notes when each change arrived: for timing what the daemons do
    /// between two changes more closely than polling can (a vacancy the
    /// standbys answer lasts tens of milliseconds). Returns once the watch
    /// is known to be running (it saw a probe key under the prefix).
    pub fn watch_events(&self, prefix: &str) -> Result<KeyEvents> {
        use std::io::BufRead;
        let mut child = self
            .etcdctl_command(&["watch", "--prefix", prefix])
            .stdout(std::process::Stdio::piped())
            .stderr(std::process::Stdio::null())
            .spawn()
            .context("running etcdctl watch")?;
        let out = child.stdout.take().context("etcdctl's stdout")?;
        let events = std::sync::Arc::new(std::sync::Mutex::new(Vec::new()));
        let seen = events.clone();
        std::thread::spawn(move || {
            let mut lines = std::io::BufReader::new(out).lines().map_while(|l| l.ok());
            while let Some(op) = lines.next() {
                let at = std::time::Instant::now();
                let Some(key) = lines.next() else { break };
                if op == "PUT" {
                    lines.next(); // its value
                }
                if let Ok(mut v) = seen.lock() {
                    v.push(KeyEvent { at, op, key });
                }
            }
        });
        let events = KeyEvents { child, events };
        let probe = format!("{prefix}test-watch-probe");
        wait_for("the etcd watch to run", Duration::from_secs(10), || {
            self.put(&probe, "x")?;
            Ok(events.first(&probe, "PUT").is_some())
        })?;
        Ok(events)
    }

    /// The value at `key`, or None when absent.
    pub fn put(&self, key: &str, value: &str) -> Result<()> {
        let out = self.etcdctl(&["put", key, value])?;
        if !out.status.success() {
            bail!(
                "etcdctl put {key}: {}",
                String::from_utf8_lossy(&out.stderr)
            );
        }
        Ok(())
    }

    pub fn get(&self, key: &str) -> Result<Option<String>> {
        let out = self.etcdctl(&["get", "--print-value-only", key])?;
        if !out.status.success() {
            bail!(
                "etcdctl get {key}: {}",
                String::from_utf8_lossy(&out.stderr)
            );
        }
        let v = String::from_utf8_lossy(&out.stdout).trim().to_owned();
        Ok((!v.is_empty()).then_some(v))
    }

    /// The JSON record at `key`, or None when absent.
    pub fn get_json(&self, key: &str) -> Result<Option<serde_json::Value>> {
        self.get(key)?
            .map(|v| serde_json::from_str(&v).with_context(|| format!("{key} holds {v:?}")))
            .transpose()
    }

    /// Every running member answers and the cluster has a leader.
    pub fn wait_healthy(&self, timeout: Duration) -> Result<()> {
        wait_for("etcd to be healthy", timeout, || {
            let out = self.etcdctl(&["endpoint", "health"])?;
            Ok(out.status.success())
        })
    }

    pub fn log_of(&self, i: usize) -> String {
        std::fs::read_to_string(
            self.dir
                .path()
                .join(format!("{}.log", self.members[i].name)),
        )
        .unwrap_or_default()
    }

    pub fn path(&self) -> &Path {
        self.dir.path()
    }
}

impl Drop for EtcdCluster {
    fn drop(&mut self) {
        for m in &mut self.members {
            if let Some(mut p) = m.proc.take() {
                let _ = p.kill9();
            }
        }
    }
}

/// Asks each of a set of possible primaries, every [`SAMPLE_EVERY`], in a
/// thread of its own, whether it acts as primary now (leads, unfenced,
/// lease time left: it would answer a commit wait). [`LeaderSampler::finish`]
/// returns the samples: for each, the urls that said they act.
pub struct LeaderSampler {
    stop: std::sync::Arc<std::sync::atomic::AtomicBool>,
    thread: Option<std::thread::JoinHandle<Vec<Vec<String>>>>,
}

/// How often [`LeaderSampler`] asks.
pub const SAMPLE_EVERY: Duration = Duration::from_millis(100);

impl LeaderSampler {
    pub fn start(urls: Vec<String>, tls: tandem_shared::tls::TlsFiles) -> Result<Self> {
        let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
        let flag = stop.clone();
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()?;
        let thread = std::thread::spawn(move || {
            let mut clients = std::collections::BTreeMap::new();
            let mut samples = Vec::new();
            let ask = Duration::from_millis(300);
            while !flag.load(std::sync::atomic::Ordering::SeqCst) {
                let next = std::time::Instant::now() + SAMPLE_EVERY;
                let mut acting = Vec::new();
                for url in &urls {
                    let cached = clients.remove(url);
                    let got = rt.block_on(async {
                        tokio::time::timeout(ask, async {
                            let mut c = match cached {
                                Some(c) => c,
                                None => tandem_shared::client::connect(url, None, &tls, ask)
                                    .await
                                    .ok()?,
                            };
                            let st = c
                                .status(tandem_shared::wire::StatusRequest {})
                                .await
                                .ok()?
                                .into_inner();
                            Some((c, st))
                        })
                        .await
                        .ok()
                        .flatten()
                    });
                    if let Some((c, st)) = got {
                        clients.insert(url.clone(), c);
                        if st
                            .coordination
                            .is_some_and(|c| c.leading && !c.fenced && c.lease_remaining_ms > 0)
                        {
                            acting.push(url.clone());
                        }
                    }
                }
                samples.push(acting);
                // The pace of the probe, not a wait for a condition.
                std::thread::sleep(next.saturating_duration_since(std::time::Instant::now()));
            }
            samples
        });
        Ok(Self {
            stop,
            thread: Some(thread),
        })
    }

    /// Stops sampling; Err if any sample saw two primaries acting.
    pub fn finish(mut self) -> Result<Vec<Vec<String>>> {
        self.stop.store(true, std::sync::atomic::Ordering::SeqCst);
        let samples = self
            .thread
            .take()
            .context("sampler")?
            .join()
            .map_err(|_| anyhow::anyhow!("the sampler panicked"))?;
        if let Some(two) = samples.iter().find(|s| s.len() > 1) {
            bail!("two primaries acted at once: {two:?}");
        }
        Ok(samples)
    }
}

impl Drop for LeaderSampler {
    fn drop(&mut self) {
        self.stop.store(true, std::sync::atomic::Ordering::SeqCst);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

/// The time of day (seconds since midnight, UTC) of the first log line
/// containing `needle`, read from the line's tracing timestamp
/// (`2026-12-07T11:37:39.123456Z ...`). For latency figures taken from
/// two processes' logs on the same machine.
pub fn log_time(log: &str, needle: &str) -> Option<f64> {
    let line = log.lines().find(|l| l.contains(needle))?;
    let stamp = line.split_whitespace().next()?;
    let time = stamp.split_once('T')?.1.trim_end_matches('Z');
    let mut parts = time.split(':');
    let h: f64 = parts.next()?.parse().ok()?;
    let m: f64 = parts.next()?.parse().ok()?;
    let s: f64 = parts.next()?.parse().ok()?;
    Some(h * 3600.0 + m * 60.0 + s)
}

/// How long the old primary took to stop acting after a switchover's
/// leader-key move, from the logs: (to its fence, to its stop as
/// superseded), in milliseconds.
pub fn fence_latency_ms(target_log: &str, old_primary_log: &str) -> Option<(f64, f64)> {
    let moved = log_time(
        target_log,
        "switchover: the leader key moved to this standby",
    )?;
    let fenced = log_time(old_primary_log, "FENCED: this primary stopped")?;
    let stopped = log_time(old_primary_log, "etcd moved past this primary")?;
    Some(((fenced - moved) * 1000.0, (stopped - moved) * 1000.0))
}

#[cfg(test)]
mod tests {
    #[test]
    fn log_times_come_from_the_tracing_timestamp() {
        let log = "2026-12-07T11:37:39.250000Z  WARN x: a\n2026-12-07T11:37:40.000000Z ERROR y: FENCED: z\n";
        assert_eq!(
            super::log_time(log, "FENCED"),
            Some(11.0 * 3600.0 + 37.0 * 60.0 + 40.0)
        );
        assert_eq!(super::log_time(log, "nothing"), None);
    }
}

/// One change an [`EtcdCluster::watch_events`] watch saw.
#[derive(Debug, Clone)]
pub struct KeyEvent {
    pub at: std::time::Instant,
    /// `PUT` or `DELETE`.
    pub op: String,
    pub key: String,
}

/// The changes a running `etcdctl watch` has seen so far; the watch ends
/// when this is dropped.
pub struct KeyEvents {
    child: std::process::Child,
    events: std::sync::Arc<std::sync::Mutex<Vec<KeyEvent>>>,
}

impl KeyEvents {
    pub fn all(&self) -> Vec<KeyEvent> {
        self.events.lock().map(|v| v.clone()).unwrap_or_default()
    }

    /// The first `op` of `key` seen.
    pub fn first(&self, key: &str, op: &str) -> Option<KeyEvent> {
        self.all().into_iter().find(|e| e.key == key && e.op == op)
    }
}

impl Drop for KeyEvents {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}
