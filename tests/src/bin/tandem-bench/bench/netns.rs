//! A slow link on this machine for the `slowlink` section: two network
//! namespaces the bench names itself, a veth pair between them with a `tbf`
//! rate limit on both ends, and a user-space proxy that delays every byte
//! by half the round trip in each direction (the kernel has no `netem`:
//! docs/BDB-NOTES.md §11).
//!
//! Addresses come from 198.18.0.0/15, the benchmarking range. Everything
//! is removed by name when the [`Link`] drops, and `bench/run` removes the
//! same names on every exit path (its trap), so a killed bench leaves
//! nothing behind either.

use super::*;
use std::os::fd::AsRawFd;

/// The namespaces' names; `bench/run`'s trap deletes exactly these.
pub(crate) const NS_PRIMARY: &str = "tandem-slow-p";
pub(crate) const NS_STANDBY: &str = "tandem-slow-s";
pub(crate) const ADDR_PRIMARY: &str = "198.18.0.1";
const VETH_PRIMARY: &str = "tslow-p";
const VETH_STANDBY: &str = "tslow-s";

/// A link's rate and round trip.
#[derive(Clone, Copy, Debug)]
pub(crate) struct LinkSpec {
    pub(crate) mbit: u64,
    pub(crate) rtt_ms: f64,
}

impl LinkSpec {
    pub(crate) fn label(&self) -> String {
        let rate = if self.mbit >= 1000 {
            format!("{} Gbit/s", self.mbit / 1000)
        } else {
            format!("{} Mbit/s", self.mbit)
        };
        format!("{rate}, {} ms RTT", self.rtt_ms)
    }
}

/// Two namespaces joined by a rate-limited veth pair.
pub(crate) struct Link {
    pub(crate) spec: LinkSpec,
}

fn ip(args: &[&str]) -> Result<()> {
    let out = Command::new("ip")
        .args(args)
        .output()
        .context("running ip (iproute2)")?;
    if !out.status.success() {
        bail!(
            "ip {}: {}",
            args.join(" "),
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    Ok(())
}

/// Removes what a previous, killed run may have left (by name only).
pub(crate) fn remove_leftovers() {
    for ns in [NS_PRIMARY, NS_STANDBY] {
        let _ = Command::new("ip")
            .args(["netns", "del", ns])
            .stderr(Stdio::null())
            .status();
    }
}

impl Link {
    pub(crate) fn create(spec: LinkSpec) -> Result<Self> {
        remove_leftovers();
        // From here on, Drop removes whatever part was made.
        let link = Link { spec };
        ip(&["netns", "add", NS_PRIMARY])?;
        ip(&["netns", "add", NS_STANDBY])?;
        ip(&[
            "link",
            "add",
            VETH_PRIMARY,
            "netns",
            NS_PRIMARY,
            "type",
            "veth",
            "peer",
            "name",
            VETH_STANDBY,
            "netns",
            NS_STANDBY,
        ])?;
        // tbf needs a bucket of at least one timer tick's worth of bytes
        // and bigger than the largest (GSO) packet, or it cannot reach the
        // rate.
        let burst = format!("{}kb", (spec.mbit * 1000 / 8 / 100).max(128));
        let rate = format!("{}mbit", spec.mbit);
        for (ns, dev, addr) in [
            (NS_PRIMARY, VETH_PRIMARY, "198.18.0.1/30"),
            (NS_STANDBY, VETH_STANDBY, "198.18.0.2/30"),
        ] {
            ip(&["-n", ns, "link", "set", "lo", "up"])?;
            ip(&["-n", ns, "addr", "add", addr, "dev", dev])?;
            ip(&["-n", ns, "link", "set", dev, "up"])?;
            let out = Command::new("ip")
                .args([
                    "netns", "exec", ns, "tc", "qdisc", "add", "dev", dev, "root",
                ])
                .args(["tbf", "rate", &rate, "burst", &burst, "latency", "100ms"])
                .output()
                .context("running tc")?;
            if !out.status.success() {
                bail!(
                    "tc qdisc add dev {dev} tbf: {}",
                    String::from_utf8_lossy(&out.stderr).trim()
                );
            }
        }
        Ok(link)
    }

    /// A command run inside the standby's namespace.
    pub(crate) fn in_standby_ns(&self, exe: &Path) -> Command {
        let mut c = Command::new("ip");
        c.args(["netns", "exec", NS_STANDBY]).arg(exe);
        c
    }

    /// Half the round trip, the proxy's delay in each direction.
    pub(crate) fn one_way(&self) -> Duration {
        Duration::from_secs_f64(self.spec.rtt_ms / 2000.0)
    }
}

impl Drop for Link {
    fn drop(&mut self) {
        // Deleting a namespace deletes the veth end in it, and with it the
        // pair and its qdiscs.
        remove_leftovers();
    }
}

/// Moves the calling thread (and the processes and threads it starts from
/// now on) into the namespace `name`.
pub(crate) fn enter(name: &str) -> Result<()> {
    let path = format!("/var/run/netns/{name}");
    let f = File::open(&path).with_context(|| format!("opening {path}"))?;
    // SAFETY: setns on a valid namespace fd only changes this thread's
    // network namespace.
    let r = unsafe { libc::setns(f.as_raw_fd(), libc::CLONE_NEWNET) };
    if r != 0 {
        bail!("setns {name}: {}", std::io::Error::last_os_error());
    }
    Ok(())
}

/// `tandem-bench delay-proxy LISTEN TARGET ONE_WAY_US READY_FILE`: accepts
/// on LISTEN, connects each to TARGET, and forwards both ways, each byte
/// held ONE_WAY_US microseconds. Runs until killed.
pub(crate) fn delay_proxy_main(args: &[String]) -> Result<()> {
    let [listen, target, us, ready] = args else {
        bail!("usage: tandem-bench delay-proxy LISTEN TARGET ONE_WAY_US READY_FILE");
    };
    let delay = Duration::from_micros(us.parse().context("ONE_WAY_US")?);
    let l = TcpListener::bind(listen.as_str()).with_context(|| format!("bind {listen}"))?;
    std::fs::write(ready, l.local_addr()?.to_string())?;
    for conn in l.incoming() {
        let down = conn?;
        let up =
            TcpStream::connect(target.as_str()).with_context(|| format!("connect {target}"))?;
        for s in [&down, &up] {
            s.set_nodelay(true)?;
        }
        pump(down.try_clone()?, up.try_clone()?, delay);
        pump(up, down, delay);
    }
    Ok(())
}

/// Forwards `from` to `to`, each read held `delay` before it is written.
fn pump(mut from: TcpStream, mut to: TcpStream, delay: Duration) {
    // Bounded: a stalled writer stops the reader, and TCP pushes back.
    let (tx, rx) = std::sync::mpsc::sync_channel::<(Instant, Vec<u8>)>(4096);
    std::thread::spawn(move || {
        let mut buf = vec![0u8; 64 << 10];
        loop {
            match from.read(&mut buf) {
                Ok(0) | Err(_) => break,
                Ok(n) => {
                    if tx
                        .send((Instant::now() + delay, buf[..n].to_vec()))
                        .is_err()
                    {
                        break;
                    }
                }
            }
        }
    });
    std::thread::spawn(move || {
        while let Ok((due, bytes)) = rx.recv() {
            let now = Instant::now();
            if due > now {
                std::thread::sleep(due - now);
            }
            if to.write_all(&bytes).is_err() {
                break;
            }
        }
        let _ = to.shutdown(std::net::Shutdown::Write);
    });
}
