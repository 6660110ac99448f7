//! The network between a standby and its primary, as the fault campaign
//! sees it: a [`Link`] the driver can cut, stall or slow down, and
//! [`Proxy`], a minimal loopback TCP proxy that implements it.
//!
//! The campaign talks to links only through the trait so that another
//! implementation (the shared `FaultyLink` being written on the `link`
//! branch) can replace this one without touching the driver. TLS passes
//! through untouched: the proxy moves bytes, so the standby still proves the
//! primary's certificate end to end. Loopback only: the proxy listens on
//! 127.0.0.1 and forwards to a loopback primary.

use std::io::{ErrorKind, Read, Write};
use std::net::{Shutdown, SocketAddr, TcpListener, TcpStream};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::thread;
use std::time::Duration;

use anyhow::{bail, Context, Result};

/// What the link does to the bytes it carries.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LinkMode {
    /// Bytes pass as fast as they come.
    Pass,
    /// Each chunk waits this long before it is forwarded (latency, and less
    /// throughput).
    Delay(Duration),
    /// A silent partition: connections stay open, new ones are accepted, and
    /// nothing is delivered in either direction until the mode changes (the
    /// held bytes are then delivered, as TCP retransmission would).
    Stall,
    /// A clean cut: open connections are reset and new ones are closed at once.
    Cut,
    /// A lossy network: each chunk is held, with this probability in
    /// percent, for 200 ms to 1 s (about a TCP retransmission timeout).
    Lossy(u8),
}

/// A faultable network path from a standby to the primary.
pub trait Link: Send {
    /// The address the standby dials (stays the same across primary restarts).
    fn addr(&self) -> SocketAddr;
    /// Where connections made from now on are forwarded (a restarted primary
    /// listens on a new port).
    fn retarget(&self, to: SocketAddr);
    /// Applies `mode` to open and future connections.
    fn set(&self, mode: LinkMode);
}

struct Shared {
    mode: Mutex<LinkMode>,
    target: Mutex<SocketAddr>,
    /// Both halves of every open connection, so a cut can reset them.
    conns: Mutex<Vec<TcpStream>>,
    closing: AtomicBool,
}

impl Shared {
    fn mode(&self) -> LinkMode {
        self.mode.lock().map(|m| *m).unwrap_or(LinkMode::Cut)
    }
    fn cut_all(&self) {
        if let Ok(mut conns) = self.conns.lock() {
            for c in conns.drain(..) {
                let _ = c.shutdown(Shutdown::Both);
            }
        }
    }
}

/// A loopback TCP proxy: a listener thread and two pump threads per
/// connection. Dropping it closes the listener and every connection.
pub struct Proxy {
    addr: SocketAddr,
    shared: Arc<Shared>,
}

impl Proxy {
    /// Listens on 127.0.0.1 (any free port) and forwards to `target`.
    pub fn start(target: SocketAddr) -> Result<Self> {
        if !target.ip().is_loopback() {
            bail!("the fault proxy forwards to loopback only, not {target}");
        }
        let listener = TcpListener::bind("127.0.0.1:0").context("bind the fault proxy")?;
        let addr = listener.local_addr()?;
        let shared = Arc::new(Shared {
            mode: Mutex::new(LinkMode::Pass),
            target: Mutex::new(target),
            conns: Mutex::new(Vec::new()),
            closing: AtomicBool::new(false),
        });
        let s = shared.clone();
        thread::Builder::new()
            .name("fault-proxy".into())
            .spawn(move || accept_loop(listener, s))?;
        Ok(Self { addr, shared })
    }
}

impl Link for Proxy {
    fn addr(&self) -> SocketAddr {
        self.addr
    }
    fn retarget(&self, to: SocketAddr) {
        if let Ok(mut t) = self.shared.target.lock() {
            *t = to;
        }
    }
    fn set(&self, mode: LinkMode) {
        if let Ok(mut m) = self.shared.mode.lock() {
            *m = mode;
        }
        if mode == LinkMode::Cut {
            self.shared.cut_all();
        }
    }
}

impl Drop for Proxy {
    fn drop(&mut self) {
        self.shared.closing.store(true, Ordering::SeqCst);
        self.shared.cut_all();
        // Wake the blocking accept so its thread sees `closing`.
        let _ = TcpStream::connect(self.addr);
    }
}

fn accept_loop(listener: TcpListener, shared: Arc<Shared>) {
    for conn in listener.incoming() {
        if shared.closing.load(Ordering::SeqCst) {
            return;
        }
        let Ok(client) = conn else { continue };
        if shared.mode() == LinkMode::Cut {
            let _ = client.shutdown(Shutdown::Both);
            continue;
        }
        let target = match shared.target.lock() {
            Ok(t) => *t,
            Err(_) => return,
        };
        let Ok(server) = TcpStream::connect_timeout(&target, Duration::from_secs(5)) else {
            // The primary is down: the standby sees a refused connection.
            let _ = client.shutdown(Shutdown::Both);
            continue;
        };
        let _ = client.set_nodelay(true);
        let _ = server.set_nodelay(true);
        let halves = (
            client.try_clone(),
            server.try_clone(),
            client.try_clone(),
            server.try_clone(),
        );
        let (Ok(c2), Ok(s2), Ok(c3), Ok(s3)) = halves else {
            continue;
        };
        if let Ok(mut conns) = shared.conns.lock() {
            conns.retain(|c| c.peer_addr().is_ok());
            conns.push(c3);
            conns.push(s3);
        }
        let (a, b) = (shared.clone(), shared.clone());
        let _ = thread::Builder::new()
            .name("fault-pump".into())
            .spawn(move || pump(client, server, a));
        let _ = thread::Builder::new()
            .name("fault-pump".into())
            .spawn(move || pump(s2, c2, b));
    }
}

/// Copies `from` to `to` under the link's mode until either side closes;
/// then closes both, so the opposite pump ends too.
fn pump(mut from: TcpStream, mut to: TcpStream, shared: Arc<Shared>) {
    // A read timeout lets a pump that waits for data notice a mode change.
    let _ = from.set_read_timeout(Some(Duration::from_millis(100)));
    let mut buf = vec![0u8; 64 * 1024];
    'conn: loop {
        if shared.closing.load(Ordering::SeqCst) || shared.mode() == LinkMode::Cut {
            break;
        }
        if shared.mode() == LinkMode::Stall {
            // Read nothing: the sender's socket buffers fill and it blocks,
            // as it would behind a partition.
            thread::sleep(Duration::from_millis(20));
            continue;
        }
        let n = match from.read(&mut buf) {
            Ok(0) => break,
            Ok(n) => n,
            Err(e) if matches!(e.kind(), ErrorKind::WouldBlock | ErrorKind::TimedOut) => continue,
            Err(e) if e.kind() == ErrorKind::Interrupted => continue,
            Err(_) => break,
        };
        // Bytes already read are held, not lost, while the link stalls.
        loop {
            match shared.mode() {
                LinkMode::Cut => break 'conn,
                LinkMode::Stall => {
                    if shared.closing.load(Ordering::SeqCst) {
                        break 'conn;
                    }
                    thread::sleep(Duration::from_millis(20));
                }
                LinkMode::Delay(d) => {
                    thread::sleep(d);
                    break;
                }
                LinkMode::Lossy(percent) => {
                    let roll: u8 = rand::random_range(0..100);
                    if roll < percent {
                        thread::sleep(Duration::from_millis(rand::random_range(200..1000)));
                    }
                    break;
                }
                LinkMode::Pass => break,
            }
        }
        if to.write_all(&buf[..n]).is_err() {
            break;
        }
    }
    let _ = from.shutdown(Shutdown::Both);
    let _ = to.shutdown(Shutdown::Both);
}

#[cfg(test)]
mod tests {
    use super::*;

    fn echo_server() -> SocketAddr {
        let l = TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = l.local_addr().unwrap();
        thread::spawn(move || {
            for c in l.incoming() {
                let Ok(mut c) = c else { return };
                thread::spawn(move || {
                    let mut b = [0u8; 1024];
                    while let Ok(n) = c.read(&mut b) {
                        if n == 0 || c.write_all(&b[..n]).is_err() {
                            return;
                        }
                    }
                });
            }
        });
        addr
    }

    #[test]
    fn passes_stalls_and_cuts() {
        let proxy = Proxy::start(echo_server()).unwrap();
        let mut c = TcpStream::connect(proxy.addr()).unwrap();
        c.set_read_timeout(Some(Duration::from_millis(500)))
            .unwrap();
        let mut b = [0u8; 5];
        c.write_all(b"hello").unwrap();
        c.read_exact(&mut b).unwrap();
        assert_eq!(&b, b"hello");

        proxy.set(LinkMode::Stall);
        c.write_all(b"again").unwrap();
        assert!(c.read_exact(&mut b).is_err(), "a stalled link delivered");
        proxy.set(LinkMode::Pass);
        c.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
        c.read_exact(&mut b).unwrap();
        assert_eq!(&b, b"again", "held bytes are delivered after a stall");

        proxy.set(LinkMode::Cut);
        let mut rest = Vec::new();
        assert!(matches!(c.read_to_end(&mut rest), Ok(0) | Err(_)));
        assert!(proxy.addr().ip().is_loopback());
    }

    #[test]
    fn refuses_a_non_loopback_target() {
        assert!(Proxy::start("192.0.2.1:7400".parse().unwrap()).is_err());
    }
}
