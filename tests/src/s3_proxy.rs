//! An HTTP/1.1 proxy on loopback in front of the S3 server that
//! misbehaves on command, per request: answer 500 without forwarding, drop
//! the connection before forwarding, forward and then drop the answer (the
//! store did it, the client never hears), cut a response body short, or
//! stall. Rules match a method and a part of the request path. Each
//! request goes upstream on its own connection (`Connection: close`), so
//! the answer is simply everything upstream sends; requests are never
//! altered (the client's signature covers them).

use anyhow::{bail, Context, Result};
use std::io::{BufRead, BufReader, Read, Write};
use std::net::{Shutdown, SocketAddr, TcpListener, TcpStream};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::Duration;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Fault {
    /// 500 InternalError, not forwarded.
    Status500,
    /// The connection closes before anything is forwarded.
    DropBeforeForward,
    /// Forwarded; the store's answer is thrown away and the connection
    /// closed.
    DropAfterForward,
    /// Forwarded; half of the response body is sent, then the connection
    /// closes.
    TruncateBody,
    /// Forwarded after this long.
    Stall(Duration),
}

#[derive(Debug, Clone)]
pub struct Rule {
    pub method: &'static str,
    pub path_contains: String,
    pub fault: Fault,
    /// How many matching requests it hits (None: every one).
    pub times: Option<usize>,
}

#[derive(Default)]
struct Control {
    stop: AtomicBool,
    rules: Mutex<Vec<Rule>>,
    /// "METHOD path -> fault" for every request that hit a rule.
    hits: Mutex<Vec<String>>,
    /// "METHOD path" for every request.
    requests: Mutex<Vec<String>>,
}

pub struct S3Proxy {
    addr: SocketAddr,
    ctl: Arc<Control>,
    acceptor: Option<JoinHandle<()>>,
}

impl S3Proxy {
    pub fn start(upstream: SocketAddr) -> Result<Self> {
        let listener = TcpListener::bind("127.0.0.1:0")?;
        listener.set_nonblocking(true)?;
        let addr = listener.local_addr()?;
        let ctl = Arc::new(Control::default());
        let c = ctl.clone();
        let acceptor = std::thread::spawn(move || {
            while !c.stop.load(Ordering::SeqCst) {
                match listener.accept() {
                    Ok((client, _)) => {
                        let c = c.clone();
                        std::thread::spawn(move || {
                            let _ = serve(client, upstream, &c);
                        });
                    }
                    Err(_) => std::thread::sleep(Duration::from_millis(5)),
                }
            }
        });
        Ok(Self {
            addr,
            ctl,
            acceptor: Some(acceptor),
        })
    }

    pub fn endpoint(&self) -> String {
        format!("http://{}", self.addr)
    }

    pub fn add(&self, rule: Rule) {
        if let Ok(mut r) = self.ctl.rules.lock() {
            r.push(rule);
        }
    }

    /// Removes every rule and forgets the hits.
    pub fn clear(&self) {
        if let Ok(mut r) = self.ctl.rules.lock() {
            r.clear();
        }
        if let Ok(mut h) = self.ctl.hits.lock() {
            h.clear();
        }
    }

    pub fn hits(&self) -> Vec<String> {
        self.ctl.hits.lock().map(|h| h.clone()).unwrap_or_default()
    }

    /// "METHOD path" (with the query) of every request seen, in order.
    pub fn requests(&self) -> Vec<String> {
        self.ctl
            .requests
            .lock()
            .map(|r| r.clone())
            .unwrap_or_default()
    }
}

impl Drop for S3Proxy {
    fn drop(&mut self) {
        self.ctl.stop.store(true, Ordering::SeqCst);
        if let Some(a) = self.acceptor.take() {
            let _ = a.join();
        }
    }
}

fn fault_for(ctl: &Control, method: &str, path: &str) -> Option<Fault> {
    if let Ok(mut r) = ctl.requests.lock() {
        r.push(format!("{method} {path}"));
    }
    let mut rules = ctl.rules.lock().ok()?;
    let i = rules.iter().position(|r| {
        r.method == method && path.contains(&r.path_contains) && r.times != Some(0)
    })?;
    let fault = rules[i].fault;
    if let Some(n) = rules[i].times.as_mut() {
        *n -= 1;
    }
    drop(rules);
    if let Ok(mut h) = ctl.hits.lock() {
        h.push(format!("{method} {path} -> {fault:?}"));
    }
    Some(fault)
}

/// One client connection: requests in turn until it closes or a fault
/// closes it.
fn serve(client: TcpStream, upstream: SocketAddr, ctl: &Control) -> Result<()> {
    client.set_read_timeout(Some(Duration::from_secs(30)))?;
    let mut reader = BufReader::new(client.try_clone()?);
    let mut client = client;
    loop {
        let mut head = Vec::new();
        loop {
            let mut line = Vec::new();
            if reader.read_until(b'\n', &mut line)? == 0 {
                return Ok(());
            }
            let end = line == b"\r\n";
            head.extend_from_slice(&line);
            if end {
                break;
            }
        }
        let text = String::from_utf8_lossy(&head).into_owned();
        let mut lines = text.split("\r\n");
        let request_line = lines.next().unwrap_or("").to_owned();
        let mut parts = request_line.split(' ');
        let (method, path) = (parts.next().unwrap_or(""), parts.next().unwrap_or(""));
        let mut len = 0usize;
        let mut kept = vec![request_line.clone()];
        for h in lines.filter(|l| !l.is_empty()) {
            let lower = h.to_ascii_lowercase();
            if let Some(v) = lower.strip_prefix("content-length:") {
                len = v.trim().parse().context("content-length")?;
            }
            if lower.starts_with("transfer-encoding:") {
                bail!("chunked request bodies are not supported by the test proxy");
            }
            if !lower.starts_with("connection:") {
                kept.push(h.to_owned());
            }
        }
        kept.push("Connection: close".into());
        let mut body = vec![0u8; len];
        reader.read_exact(&mut body)?;
        let fault = fault_for(ctl, method, path);
        match fault {
            Some(Fault::Status500) => {
                let msg = b"<?xml version=\"1.0\" encoding=\"UTF-8\"?><Error><Code>InternalError</Code><Message>injected</Message></Error>";
                write!(
                    client,
                    "HTTP/1.1 500 Internal Server Error\r\nContent-Type: application/xml\r\nContent-Length: {}\r\n\r\n",
                    msg.len()
                )?;
                client.write_all(msg)?;
                continue;
            }
            Some(Fault::DropBeforeForward) => {
                let _ = client.shutdown(Shutdown::Both);
                return Ok(());
            }
            Some(Fault::Stall(d)) => std::thread::sleep(d),
            _ => {}
        }
        let mut up = TcpStream::connect(upstream)?;
        up.write_all(format!("{}\r\n\r\n", kept.join("\r\n")).as_bytes())?;
        up.write_all(&body)?;
        let mut answer = Vec::new();
        up.read_to_end(&mut answer)?;
        let split = answer
            .windows(4)
            .position(|w| w == b"\r\n\r\n")
            .map(|i| i + 4)
            .unwrap_or(answer.len());
        let resp_head = String::from_utf8_lossy(&answer[..split]).to_ascii_lowercase();
        let framed = resp_head.contains("content-length:");
        match fault {
            Some(Fault::DropAfterForward) => {
                let _ = client.shutdown(Shutdown::Both);
                return Ok(());
            }
            Some(Fault::TruncateBody) => {
                let body_len = answer.len() - split;
                client.write_all(&answer[..split + body_len / 2])?;
                let _ = client.shutdown(Shutdown::Both);
                return Ok(());
            }
            _ => client.write_all(&answer)?,
        }
        if !framed {
            let _ = client.shutdown(Shutdown::Both);
            return Ok(());
        }
    }
}
