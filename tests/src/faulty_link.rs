//! A TCP proxy on loopback that misbehaves on command, for tests that need a
//! bad network without `netem` (this kernel has none, docs/BDB-NOTES.md §11): a daemon
//! dials the proxy's address instead of its peer's, and the test cuts,
//! delays or stalls what flows through.
//!
//! A cut behaves like a network that drops every packet, not like a closed
//! connection: no FIN, no RST, the sockets stay open and whatever was in
//! flight is delivered after `heal()`, as TCP's retransmission would. So a
//! daemon can only notice a cut by its own deadlines (keepalive pings, a
//! receive timeout), which is what these tests are for.
//!
//! A sever is the other kind of cut, a reset: open connections are shut
//! down at once and new ones closed as soon as they are accepted, so a daemon
//! notices it immediately. `retarget` points new connections at a restarted
//! peer listening on another port while the proxy's own address stays put.
//!
//! Each connection gets two pumps (one per direction); a pump is a reader
//! thread and a writer thread joined by a small bounded queue, so a cut or
//! a delay also stops the reader once the queue is full: back-pressure
//! reaches the sender like a full TCP window.

use anyhow::{Context, Result};
use std::io::{ErrorKind, Read, Write};
use std::net::{Shutdown, SocketAddr, TcpListener, TcpStream};
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::mpsc::{sync_channel, Receiver, RecvTimeoutError, SyncSender};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

/// How often blocked threads look at the link's settings and the stop flag.
const POLL: Duration = Duration::from_millis(10);
/// Chunks in flight per direction before the reader stops reading.
const QUEUE_CHUNKS: usize = 16;
const CHUNK: usize = 64 << 10;
/// How long one random stall holds a chunk, drawn from this range: about a
/// TCP retransmission timeout on a lossy link.
const STALL_MIN_MS: u64 = 200;
const STALL_MAX_MS: u64 = 1000;

/// The proxy. Dropping it closes every connection and joins every thread.
pub struct FaultyLink {
    addr: SocketAddr,
    ctl: Arc<Control>,
    acceptor: Option<JoinHandle<()>>,
}

struct Control {
    stop: AtomicBool,
    cut: AtomicBool,
    severed: AtomicBool,
    delay_ms: AtomicU64,
    /// Probability of a stall per chunk, in millionths.
    stall_ppm: AtomicU64,
    /// Where new connections are forwarded.
    target: Mutex<SocketAddr>,
    /// Open connections, to shut down on a sever and when the proxy goes.
    conns: Mutex<Vec<Conn>>,
    /// Pump threads to join when the proxy goes.
    threads: Mutex<Vec<JoinHandle<()>>>,
    /// Connections accepted so far (a reconnect shows up here).
    accepted: AtomicU64,
    /// Bytes delivered in each direction, client to server and back.
    to_server: AtomicU64,
    to_client: AtomicU64,
}

/// Both sockets of one proxied connection, kept while any of its four pump
/// threads runs.
struct Conn {
    sockets: [TcpStream; 2],
    live: Arc<AtomicUsize>,
}

impl Conn {
    fn shutdown(&self) {
        for s in &self.sockets {
            let _ = s.shutdown(Shutdown::Both);
        }
    }
}

fn ensure_loopback(target: SocketAddr) -> Result<()> {
    anyhow::ensure!(
        target.ip().is_loopback(),
        "FaultyLink forwards on loopback only, not to {target}"
    );
    Ok(())
}

impl FaultyLink {
    /// Listens on 127.0.0.1 (any port) and forwards every connection to
    /// `target`, which must be a loopback address.
    pub fn start(target: SocketAddr) -> Result<Self> {
        ensure_loopback(target)?;
        let listener = TcpListener::bind("127.0.0.1:0").context("binding the faulty link")?;
        listener.set_nonblocking(true)?;
        let addr = listener.local_addr()?;
        let ctl = Arc::new(Control {
            stop: AtomicBool::new(false),
            cut: AtomicBool::new(false),
            severed: AtomicBool::new(false),
            delay_ms: AtomicU64::new(0),
            stall_ppm: AtomicU64::new(0),
            target: Mutex::new(target),
            conns: Mutex::new(Vec::new()),
            threads: Mutex::new(Vec::new()),
            accepted: AtomicU64::new(0),
            to_server: AtomicU64::new(0),
            to_client: AtomicU64::new(0),
        });
        let c = ctl.clone();
        let acceptor = std::thread::Builder::new()
            .name("faulty-link-accept".into())
            .spawn(move || accept_loop(listener, c))?;
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

    /// Shuts down every open connection and closes new ones as soon as they
    /// are accepted, until `heal()`: a reset rather than a silent drop.
    /// Whatever was in flight is lost with the connections.
    pub fn sever(&self) {
        self.ctl.severed.store(true, Ordering::SeqCst);
        // Taken after the flag is set: a connection the acceptor registers
        // later sees the flag under this same lock.
        if let Ok(conns) = self.ctl.conns.lock() {
            conns.iter().for_each(Conn::shutdown);
        }
    }

    /// Forwards again after a cut or a sever, starting with what was held
    /// during a cut.
    pub fn heal(&self) {
        self.ctl.severed.store(false, Ordering::SeqCst);
        self.ctl.cut.store(false, Ordering::SeqCst);
    }

    /// Forwards as a plain proxy again: heals, and drops any delay and
    /// random stalls.
    pub fn restore(&self) {
        self.delay(0);
        self.stall_randomly(0.0);
        self.heal();
    }

    /// Forwards connections accepted from now on to `target` (a restarted
    /// peer listening on a new port); open ones keep their old peer.
    pub fn retarget(&self, target: SocketAddr) -> Result<()> {
        ensure_loopback(target)?;
        let mut t = self
            .ctl
            .target
            .lock()
            .map_err(|_| anyhow::anyhow!("faulty link target lock poisoned"))?;
        *t = target;
        Ok(())
    }

    /// Holds every chunk this long before delivering it (0: no delay).
    pub fn delay(&self, ms: u64) {
        self.ctl.delay_ms.store(ms, Ordering::SeqCst);
    }

    /// Holds each chunk for a retransmission timeout (200 ms to 1 s) with
    /// this probability (0.0 to 1.0), like a lossy link.
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
        if let Ok(conns) = self.ctl.conns.lock() {
            conns.iter().for_each(Conn::shutdown);
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

fn accept_loop(listener: TcpListener, ctl: Arc<Control>) {
    while !ctl.stop.load(Ordering::SeqCst) {
        match listener.accept() {
            Ok((client, _)) => {
                ctl.accepted.fetch_add(1, Ordering::SeqCst);
                if ctl.severed.load(Ordering::SeqCst) {
                    let _ = client.shutdown(Shutdown::Both);
                    continue;
                }
                if let Err(e) = connect_pair(client, &ctl) {
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

fn connect_pair(client: TcpStream, ctl: &Arc<Control>) -> Result<()> {
    client.set_nonblocking(false)?;
    let target = *ctl
        .target
        .lock()
        .map_err(|_| anyhow::anyhow!("faulty link target lock poisoned"))?;
    let server = match TcpStream::connect(target) {
        Ok(s) => s,
        // The peer is down: the client sees its connection closed, as a
        // daemon dialing a stopped peer would, and that is no error here.
        Err(e) if e.kind() == ErrorKind::ConnectionRefused => return Ok(()),
        Err(e) => return Err(e).with_context(|| format!("connecting to {target}")),
    };
    for s in [&client, &server] {
        s.set_nodelay(true)?;
        s.set_read_timeout(Some(POLL))?;
    }
    let live = Arc::new(AtomicUsize::new(4));
    {
        let mut conns = ctl
            .conns
            .lock()
            .map_err(|_| anyhow::anyhow!("faulty link connections lock poisoned"))?;
        let conn = Conn {
            sockets: [client.try_clone()?, server.try_clone()?],
            live: live.clone(),
        };
        // Checked under the lock `sever` takes after setting the flag, so
        // no connection slips past a sever.
        if ctl.severed.load(Ordering::SeqCst) {
            conn.shutdown();
            return Ok(());
        }
        // A long campaign opens many connections: forget finished ones.
        conns.retain(|c| c.live.load(Ordering::SeqCst) > 0);
        conns.push(conn);
    }
    if let Ok(mut threads) = ctl.threads.lock() {
        let (done, running) = std::mem::take(&mut *threads)
            .into_iter()
            .partition::<Vec<_>, _>(|t| t.is_finished());
        *threads = running;
        for t in done {
            let _ = t.join();
        }
    }
    pump(client.try_clone()?, server.try_clone()?, ctl, true, &live)?;
    pump(server, client, ctl, false, &live)?;
    Ok(())
}

enum Item {
    Data(Instant, Vec<u8>),
    Eof,
}

/// Starts the reader and writer threads of one direction.
fn pump(
    from: TcpStream,
    to: TcpStream,
    ctl: &Arc<Control>,
    to_server: bool,
    live: &Arc<AtomicUsize>,
) -> Result<()> {
    let (tx, rx) = sync_channel(QUEUE_CHUNKS);
    let (c1, c2) = (ctl.clone(), ctl.clone());
    let (l1, l2) = (live.clone(), live.clone());
    let reader = std::thread::Builder::new()
        .name("faulty-link-read".into())
        .spawn(move || {
            read_side(from, tx, &c1);
            l1.fetch_sub(1, Ordering::SeqCst);
        })?;
    let seed = rand::random::<u64>() ^ ((to_server as u64) << 63);
    let writer = std::thread::Builder::new()
        .name("faulty-link-write".into())
        .spawn(move || {
            write_side(to, rx, &c2, to_server, seed);
            l2.fetch_sub(1, Ordering::SeqCst);
        })?;
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
            let ms = STALL_MIN_MS + (rng >> 20) % (STALL_MAX_MS - STALL_MIN_MS);
            due = due.max(Instant::now() + Duration::from_millis(ms));
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
/// proxy stops or the link is severed meanwhile.
fn hold(ctl: &Control, due: Option<Instant>) -> bool {
    loop {
        if ctl.stop.load(Ordering::SeqCst) || ctl.severed.load(Ordering::SeqCst) {
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

    /// Echoes every connection, or answers each byte with `tag` (unless 0),
    /// so a test can tell which server it reached.
    fn tagged_echo_server(tag: u8) -> Result<(SocketAddr, JoinHandle<()>)> {
        let l = TcpListener::bind("127.0.0.1:0")?;
        let addr = l.local_addr()?;
        let h = std::thread::spawn(move || {
            for conn in l.incoming() {
                let Ok(mut s) = conn else { return };
                std::thread::spawn(move || {
                    let mut buf = [0u8; 1024];
                    while let Ok(n) = s.read(&mut buf) {
                        if tag != 0 {
                            buf[..n].fill(tag);
                        }
                        if n == 0 || s.write_all(&buf[..n]).is_err() {
                            break;
                        }
                    }
                });
            }
        });
        Ok((addr, h))
    }

    fn echo_server() -> Result<(SocketAddr, JoinHandle<()>)> {
        tagged_echo_server(0)
    }

    /// True if the peer closed `c` (reads end or fail) within its timeout.
    fn closed(c: &mut TcpStream) -> bool {
        let mut rest = Vec::new();
        match c.read_to_end(&mut rest) {
            Ok(_) => true,
            Err(e) => !matches!(e.kind(), ErrorKind::WouldBlock | ErrorKind::TimedOut),
        }
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

    #[test]
    fn a_sever_closes_open_connections_and_new_ones_until_heal() -> Result<()> {
        let (target, _server) = echo_server()?;
        let link = FaultyLink::start(target)?;
        let mut c = TcpStream::connect(link.addr())?;
        c.set_read_timeout(Some(Duration::from_secs(10)))?;
        let mut b = [0u8; 5];
        c.write_all(b"hello")?;
        c.read_exact(&mut b)?;
        assert_eq!(&b, b"hello");

        link.sever();
        assert!(closed(&mut c), "an open connection survived a sever");
        let mut again = TcpStream::connect(link.addr())?;
        again.set_read_timeout(Some(Duration::from_secs(10)))?;
        assert!(
            closed(&mut again),
            "a new connection was kept while severed"
        );

        link.heal();
        let mut healed = TcpStream::connect(link.addr())?;
        healed.set_read_timeout(Some(Duration::from_secs(10)))?;
        healed.write_all(b"again")?;
        healed.read_exact(&mut b)?;
        assert_eq!(&b, b"again");
        Ok(())
    }

    #[test]
    fn retarget_sends_new_connections_to_the_new_peer() -> Result<()> {
        let (first, _a) = tagged_echo_server(b'A')?;
        let (second, _b) = tagged_echo_server(b'B')?;
        let link = FaultyLink::start(first)?;
        let mut old = TcpStream::connect(link.addr())?;
        old.set_read_timeout(Some(Duration::from_secs(10)))?;
        let mut b = [0u8; 2];
        old.write_all(b"xx")?;
        old.read_exact(&mut b)?;
        assert_eq!(&b, b"AA");

        link.retarget(second)?;
        let mut new = TcpStream::connect(link.addr())?;
        new.set_read_timeout(Some(Duration::from_secs(10)))?;
        new.write_all(b"yy")?;
        new.read_exact(&mut b)?;
        assert_eq!(&b, b"BB");
        // An open connection keeps its peer.
        old.write_all(b"zz")?;
        old.read_exact(&mut b)?;
        assert_eq!(&b, b"AA");
        Ok(())
    }

    #[test]
    fn refuses_a_non_loopback_target() -> Result<()> {
        let outside: SocketAddr = "192.0.2.1:7400".parse()?;
        assert!(FaultyLink::start(outside).is_err());
        let (target, _server) = echo_server()?;
        let link = FaultyLink::start(target)?;
        assert!(link.retarget(outside).is_err());
        assert!(link.addr().ip().is_loopback());
        Ok(())
    }
}
