//! A TCP proxy on loopback that misbehaves on command, for tests that need a
//! bad network without `netem` (this kernel has none, NETWORK.md): a daemon
//! dials the proxy's address instead of its peer's, and the test cuts,
//! delays or stalls what flows through.
//!
//! A cut behaves like a network that drops every packet, not like a closed
//! connection: no FIN, no RST, the sockets stay open and whatever was in
//! flight is delivered after `heal()`, as TCP's retransmission would. So a
//! daemon can only notice a cut by its own deadlines (keepalive pings, a
//! receive timeout), which is what these tests are for.
//!
//! Each connection gets two pumps (one per direction); a pump is a reader
//! thread and a writer thread joined by a small bounded queue, so a cut or
//! a delay also stops the reader once the queue is full: back-pressure
//! reaches the sender like a full TCP window.

use anyhow::{Context, Result};
use std::io::{ErrorKind, Read, Write};
use std::net::{Shutdown, SocketAddr, TcpListener, TcpStream};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::mpsc::{sync_channel, Receiver, RecvTimeoutError, SyncSender};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

/// How often blocked threads look at the link's settings and the stop flag.
const POLL: Duration = Duration::from_millis(10);
/// Chunks in flight per direction before the reader stops reading.
const QUEUE_CHUNKS: usize = 16;
const CHUNK: usize = 64 << 10;
/// How long one random stall holds a chunk: about a TCP retransmission
/// timeout on a lossy link.
const STALL: Duration = Duration::from_millis(300);

/// The proxy. Dropping it closes every connection and joins every thread.
pub struct FaultyLink {
    addr: SocketAddr,
    ctl: Arc<Control>,
    acceptor: Option<JoinHandle<()>>,
}

#[derive(Default)]
struct Control {
    stop: AtomicBool,
    cut: AtomicBool,
    delay_ms: AtomicU64,
    /// Probability of a stall per chunk, in millionths.
    stall_ppm: AtomicU64,
    /// Sockets to shut down and threads to join when the proxy goes.
    sockets: Mutex<Vec<TcpStream>>,
    threads: Mutex<Vec<JoinHandle<()>>>,
    /// Connections accepted so far (a reconnect shows up here).
    accepted: AtomicU64,
    /// Bytes delivered in each direction, client to server and back.
    to_server: AtomicU64,
    to_client: AtomicU64,
}

impl FaultyLink {
    /// Listens on 127.0.0.1 (any port) and forwards every connection to
    /// `target`, which must be a loopback address.
    pub fn start(target: SocketAddr) -> Result<Self> {
        anyhow::ensure!(
            target.ip().is_loopback(),
            "FaultyLink forwards on loopback only, not to {target}"
        );
        let listener = TcpListener::bind("127.0.0.1:0").context("binding the faulty link")?;
        listener.set_nonblocking(true)?;
        let addr = listener.local_addr()?;
        let ctl = Arc::new(Control::default());
        let c = ctl.clone();
        let acceptor = std::thread::Builder::new()
            .name("faulty-link-accept".into())
            .spawn(move || accept_loop(listener, target, c))?;
        Ok(Self {
            addr,
            ctl,
            acceptor: Some(acceptor),
        })
    }

    /// Where to dial instead of the target.
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// `https://127.0.0.1:PORT`, for `--primary`.
    pub fn url(&self) -> String {
        format!("https://{}", self.addr)
    }

    /// Stops forwarding in both directions; connections stay open and new
    /// ones are accepted but hear nothing, like a network dropping packets.
    pub fn cut(&self) {
        self.ctl.cut.store(true, Ordering::SeqCst);
    }

    /// Forwards again, starting with what was held during the cut.
    pub fn heal(&self) {
        self.ctl.cut.store(false, Ordering::SeqCst);
    }

    /// Holds every chunk this long before delivering it (0: no delay).
    pub fn delay(&self, ms: u64) {
        self.ctl.delay_ms.store(ms, Ordering::SeqCst);
    }

    /// Holds each chunk for a retransmission timeout with this probability
    /// (0.0 to 1.0), like a lossy link.
    pub fn stall_randomly(&self, probability: f64) {
        let ppm = (probability.clamp(0.0, 1.0) * 1e6) as u64;
        self.ctl.stall_ppm.store(ppm, Ordering::SeqCst);
    }

    /// Connections accepted so far.
    pub fn connections(&self) -> u64 {
        self.ctl.accepted.load(Ordering::SeqCst)
    }

    /// Bytes delivered (client to server, server to client).
    pub fn bytes(&self) -> (u64, u64) {
        (
            self.ctl.to_server.load(Ordering::SeqCst),
            self.ctl.to_client.load(Ordering::SeqCst),
        )
    }
}

impl Drop for FaultyLink {
    fn drop(&mut self) {
        self.ctl.stop.store(true, Ordering::SeqCst);
        if let Some(a) = self.acceptor.take() {
            let _ = a.join();
        }
        if let Ok(socks) = self.ctl.sockets.lock() {
            for s in socks.iter() {
                let _ = s.shutdown(Shutdown::Both);
            }
        }
        let threads = self
            .ctl
            .threads
            .lock()
            .map(|mut t| std::mem::take(&mut *t))
            .unwrap_or_default();
        for t in threads {
            let _ = t.join();
        }
    }
}

fn accept_loop(listener: TcpListener, target: SocketAddr, ctl: Arc<Control>) {
    while !ctl.stop.load(Ordering::SeqCst) {
        match listener.accept() {
            Ok((client, _)) => {
                ctl.accepted.fetch_add(1, Ordering::SeqCst);
                if let Err(e) = connect_pair(client, target, &ctl) {
                    eprintln!("faulty link: cannot forward a connection: {e:#}");
                }
            }
            Err(e) if e.kind() == ErrorKind::WouldBlock => std::thread::sleep(POLL),
            Err(e) => {
                eprintln!("faulty link: accept failed: {e}");
                std::thread::sleep(POLL);
            }
        }
    }
}

fn connect_pair(client: TcpStream, target: SocketAddr, ctl: &Arc<Control>) -> Result<()> {
    client.set_nonblocking(false)?;
    let server = TcpStream::connect(target).with_context(|| format!("connecting to {target}"))?;
    for s in [&client, &server] {
        s.set_nodelay(true)?;
        s.set_read_timeout(Some(POLL))?;
    }
    if let Ok(mut socks) = ctl.sockets.lock() {
        socks.push(client.try_clone()?);
        socks.push(server.try_clone()?);
    }
    pump(client.try_clone()?, server.try_clone()?, ctl, true)?;
    pump(server, client, ctl, false)?;
    Ok(())
}

enum Item {
    Data(Instant, Vec<u8>),
    Eof,
}

/// Starts the reader and writer threads of one direction.
fn pump(from: TcpStream, to: TcpStream, ctl: &Arc<Control>, to_server: bool) -> Result<()> {
    let (tx, rx) = sync_channel(QUEUE_CHUNKS);
    let (c1, c2) = (ctl.clone(), ctl.clone());
    let reader = std::thread::Builder::new()
        .name("faulty-link-read".into())
        .spawn(move || read_side(from, tx, &c1))?;
    let seed = Instant::now().elapsed().as_nanos() as u64 ^ ((to_server as u64) << 63);
    let writer = std::thread::Builder::new()
        .name("faulty-link-write".into())
        .spawn(move || write_side(to, rx, &c2, to_server, seed))?;
    if let Ok(mut t) = ctl.threads.lock() {
        t.push(reader);
        t.push(writer);
    }
    Ok(())
}

fn read_side(mut from: TcpStream, tx: SyncSender<Item>, ctl: &Control) {
    let mut buf = vec![0u8; CHUNK];
    while !ctl.stop.load(Ordering::SeqCst) {
        match from.read(&mut buf) {
            Ok(0) => {
                let _ = send(&tx, Item::Eof, ctl);
                return;
            }
            Ok(n) => {
                if !send(&tx, Item::Data(Instant::now(), buf[..n].to_vec()), ctl) {
                    return;
                }
            }
            Err(e) if matches!(e.kind(), ErrorKind::WouldBlock | ErrorKind::TimedOut) => {}
            Err(e) if e.kind() == ErrorKind::Interrupted => {}
            // A reset or a socket the proxy shut down: the writer ends the
            // other side when it sees the queue close.
            Err(_) => return,
        }
    }
}

/// Queues an item, giving up when the proxy stops; false if the writer is gone.
fn send(tx: &SyncSender<Item>, mut item: Item, ctl: &Control) -> bool {
    loop {
        match tx.try_send(item) {
            Ok(()) => return true,
            Err(std::sync::mpsc::TrySendError::Full(back)) => {
                if ctl.stop.load(Ordering::SeqCst) {
                    return false;
                }
                item = back;
                std::thread::sleep(POLL);
            }
            Err(std::sync::mpsc::TrySendError::Disconnected(_)) => return false,
        }
    }
}

fn write_side(mut to: TcpStream, rx: Receiver<Item>, ctl: &Control, to_server: bool, seed: u64) {
    let mut rng = seed | 1;
    let counter = if to_server {
        &ctl.to_server
    } else {
        &ctl.to_client
    };
    loop {
        let item = match rx.recv_timeout(POLL) {
            Ok(item) => item,
            Err(RecvTimeoutError::Timeout) if !ctl.stop.load(Ordering::SeqCst) => continue,
            Err(_) => {
                let _ = to.shutdown(Shutdown::Write);
                return;
            }
        };
        let (read_at, data) = match item {
            Item::Data(at, data) => (at, data),
            Item::Eof => {
                // Even a FIN waits for the cut to heal.
                if !hold(ctl, None) {
                    return;
                }
                let _ = to.shutdown(Shutdown::Write);
                return;
            }
        };
        let delay = Duration::from_millis(ctl.delay_ms.load(Ordering::SeqCst));
        let mut due = read_at + delay;
        rng ^= rng << 13;
        rng ^= rng >> 7;
        rng ^= rng << 17;
        if rng % 1_000_000 < ctl.stall_ppm.load(Ordering::SeqCst) {
            due = due.max(Instant::now() + STALL);
        }
        if !hold(ctl, Some(due)) {
            return;
        }
        if to.write_all(&data).is_err() {
            return;
        }
        counter.fetch_add(data.len() as u64, Ordering::SeqCst);
    }
}

/// Waits until `due` has passed and the link is not cut; false if the
/// proxy stops meanwhile.
fn hold(ctl: &Control, due: Option<Instant>) -> bool {
    loop {
        if ctl.stop.load(Ordering::SeqCst) {
            return false;
        }
        let early = due.is_some_and(|d| Instant::now() < d);
        if !early && !ctl.cut.load(Ordering::SeqCst) {
            return true;
        }
        std::thread::sleep(POLL);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn echo_server() -> Result<(SocketAddr, JoinHandle<()>)> {
        let l = TcpListener::bind("127.0.0.1:0")?;
        let addr = l.local_addr()?;
        let h = std::thread::spawn(move || {
            if let Ok((mut s, _)) = l.accept() {
                let mut buf = [0u8; 1024];
                while let Ok(n) = s.read(&mut buf) {
                    if n == 0 || s.write_all(&buf[..n]).is_err() {
                        break;
                    }
                }
            }
        });
        Ok((addr, h))
    }

    #[test]
    fn a_cut_holds_bytes_without_closing_and_heal_delivers_them() -> Result<()> {
        let (target, _server) = echo_server()?;
        let link = FaultyLink::start(target)?;
        let mut c = TcpStream::connect(link.addr())?;
        c.set_read_timeout(Some(Duration::from_millis(300)))?;
        c.write_all(b"one")?;
        let mut buf = [0u8; 3];
        c.read_exact(&mut buf)?;
        assert_eq!(&buf, b"one");

        link.cut();
        c.write_all(b"two")?;
        let mut b = [0u8; 3];
        // Nothing arrives, and the connection is not closed either (a
        // closed one would read Ok(0) at once).
        match c.read(&mut b) {
            Err(e) => assert!(matches!(
                e.kind(),
                ErrorKind::WouldBlock | ErrorKind::TimedOut
            )),
            Ok(n) => panic!("read {n} bytes through a cut link"),
        }
        link.heal();
        c.set_read_timeout(Some(Duration::from_secs(10)))?;
        c.read_exact(&mut b)?;
        assert_eq!(&b, b"two");
        Ok(())
    }

    #[test]
    fn a_delay_holds_each_chunk_at_least_that_long() -> Result<()> {
        let (target, _server) = echo_server()?;
        let link = FaultyLink::start(target)?;
        link.delay(150);
        let mut c = TcpStream::connect(link.addr())?;
        let t = Instant::now();
        c.write_all(b"x")?;
        let mut b = [0u8; 1];
        c.read_exact(&mut b)?;
        // Both directions are delayed.
        assert!(
            t.elapsed() >= Duration::from_millis(300),
            "{:?}",
            t.elapsed()
        );
        Ok(())
    }
}
