//! The wait endpoint's Unix socket: owner-only, bound beside the primary's
//! state by default, one task per client speaking the line protocol of
//! [`super`].
//!
//! The socket is bound under a temporary name, made 0600, then renamed into
//! place, so no other user can connect in the moment between bind and
//! chmod. A socket file left by a primary killed with -9 accepts no
//! connection and is replaced; one that still accepts belongs to a live
//! primary and is refused, as is any path that is not a socket (it is not
//! ours to remove).

use super::{parse_request, wait, WaitOutcome, WaitStats, MAX_REQUEST};
use crate::registry::DurableAcks;
use std::io::ErrorKind;
use std::os::unix::fs::{FileTypeExt, MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{UnixListener, UnixStream};
use tokio::sync::{watch, Semaphore};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

/// The socket's name in the state directory.
pub const SOCKET_NAME: &str = "wait.sock";
/// Clients served at once; more are answered `ERROR` and closed.
const MAX_CLIENTS: usize = 4096;

#[derive(Debug, thiserror::Error)]
pub enum WaitSocketError {
    #[error(
        "another tandem-primary serves commit waits on {0} (it accepts connections); \
         give this one another --wait-socket"
    )]
    InUse(PathBuf),
    #[error("{0} exists and is not a socket; remove it or choose another --wait-socket")]
    NotASocket(PathBuf),
    #[error("wait socket {path}: {source}")]
    Io {
        path: PathBuf,
        source: std::io::Error,
    },
}

fn io(path: &Path) -> impl FnOnce(std::io::Error) -> WaitSocketError + '_ {
    move |source| WaitSocketError::Io {
        path: path.to_path_buf(),
        source,
    }
}

/// The bound socket file; dropping it removes the file if it is still the
/// one bound here.
pub struct WaitSocket {
    pub path: PathBuf,
    ino: u64,
}

impl Drop for WaitSocket {
    fn drop(&mut self) {
        if std::fs::symlink_metadata(&self.path).is_ok_and(|m| m.ino() == self.ino) {
            let _ = std::fs::remove_file(&self.path);
        }
    }
}

/// The longest path a Unix socket address holds (`sun_path` less its NUL).
const MAX_ADDRESS: usize = 107;

/// A name `bind` and `connect` accept for a socket file: the path itself
/// when it fits a socket address, otherwise `/proc/self/fd/N/NAME` through
/// a handle on its directory, held as long as this lives. The limit is on
/// the address, not on the file, and environments live at deep paths: the
/// default socket beside the primary's state must work wherever that is.
pub(crate) struct SocketAddress {
    pub path: PathBuf,
    _dir: Option<std::fs::File>,
}

impl SocketAddress {
    pub(crate) fn of(path: &Path) -> std::io::Result<Self> {
        if path.as_os_str().len() <= MAX_ADDRESS {
            return Ok(Self {
                path: path.to_path_buf(),
                _dir: None,
            });
        }
        let (Some(dir), Some(name)) = (path.parent(), path.file_name()) else {
            return Err(std::io::Error::new(
                ErrorKind::InvalidInput,
                "a socket path must name a file",
            ));
        };
        let dir = std::fs::File::open(if dir.as_os_str().is_empty() {
            Path::new(".")
        } else {
            dir
        })?;
        let short = Path::new("/proc/self/fd")
            .join(std::os::fd::AsRawFd::as_raw_fd(&dir).to_string())
            .join(name);
        if short.as_os_str().len() > MAX_ADDRESS {
            return Err(std::io::Error::new(
                ErrorKind::InvalidInput,
                "the socket's file name is too long for a socket address",
            ));
        }
        Ok(Self {
            path: short,
            _dir: Some(dir),
        })
    }
}

/// Binds `path` (0600), replacing a stale socket and refusing a live one.
pub fn bind(path: &Path) -> Result<(UnixListener, WaitSocket), WaitSocketError> {
    match std::fs::symlink_metadata(path) {
        Ok(m) if !m.file_type().is_socket() => {
            return Err(WaitSocketError::NotASocket(path.to_path_buf()))
        }
        Ok(_) => match SocketAddress::of(path)
            .and_then(|a| std::os::unix::net::UnixStream::connect(&a.path))
        {
            Ok(_) => return Err(WaitSocketError::InUse(path.to_path_buf())),
            Err(e) if e.kind() == ErrorKind::ConnectionRefused => {
                tracing::info!(path = %path.display(), "replacing a stale wait socket (its primary is gone)");
            }
            Err(e) => return Err(io(path)(e)),
        },
        Err(e) if e.kind() == ErrorKind::NotFound => {}
        Err(e) => return Err(io(path)(e)),
    }
    let name = path
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_else(|| SOCKET_NAME.to_owned());
    let tmp = path.with_file_name(format!(".{name}.{}.tmp", std::process::id()));
    let _ = std::fs::remove_file(&tmp);
    let listener = SocketAddress::of(&tmp)
        .and_then(|a| std::os::unix::net::UnixListener::bind(&a.path))
        .map_err(io(&tmp))?;
    let placed = std::fs::set_permissions(&tmp, std::fs::Permissions::from_mode(0o600))
        .and_then(|()| std::fs::rename(&tmp, path));
    if let Err(e) = placed {
        let _ = std::fs::remove_file(&tmp);
        return Err(io(path)(e));
    }
    let ino = std::fs::symlink_metadata(path).map_err(io(path))?.ino();
    listener.set_nonblocking(true).map_err(io(path))?;
    let listener = UnixListener::from_std(listener).map_err(io(path))?;
    Ok((
        listener,
        WaitSocket {
            path: path.to_path_buf(),
            ino,
        },
    ))
}

/// Serves clients until `stop`; returns when every client task ended.
pub async fn serve(
    listener: UnixListener,
    acks: watch::Receiver<DurableAcks>,
    stats: Arc<WaitStats>,
    leadership: Option<Arc<crate::leadership::Leadership>>,
    stop: CancellationToken,
) {
    let clients = TaskTracker::new();
    let slots = Arc::new(Semaphore::new(MAX_CLIENTS));
    loop {
        let stream = tokio::select! {
            r = listener.accept() => match r {
                Ok((s, _)) => s,
                Err(e) => {
                    tracing::warn!(error = %e, "accepting a wait client failed");
                    continue;
                }
            },
            _ = stop.cancelled() => break,
        };
        let (acks, stats, stop) = (acks.clone(), stats.clone(), stop.clone());
        let leadership = leadership.clone();
        match slots.clone().try_acquire_owned() {
            Ok(slot) => {
                clients.spawn(async move {
                    client(stream, acks, &stats, leadership.as_deref(), stop).await;
                    drop(slot);
                });
            }
            Err(_) => {
                clients.spawn(async move {
                    let mut stream = stream;
                    let msg = format!("ERROR more than {MAX_CLIENTS} clients; retry later\n");
                    let _ = stream.write_all(msg.as_bytes()).await;
                });
            }
        }
    }
    clients.close();
    clients.wait().await;
}

/// One client: requests in order until it closes, sends a bad request, or
/// the primary stops. A client that goes away mid-wait ends its wait.
// Long function: one request loop whose branches (wait, answer, client
// gone, primary stopping) read best side by side.
async fn client(
    mut stream: UnixStream,
    acks: watch::Receiver<DurableAcks>,
    stats: &WaitStats,
    leadership: Option<&crate::leadership::Leadership>,
    stop: CancellationToken,
) {
    let mut buf: Vec<u8> = Vec::with_capacity(MAX_REQUEST);
    let mut chunk = [0u8; MAX_REQUEST];
    let mut closed = false;
    loop {
        // A complete line waiting in the buffer?
        let line = match buf.iter().position(|b| *b == b'\n') {
            Some(i) => {
                let line: Vec<u8> = buf.drain(..=i).collect();
                line
            }
            None if buf.len() >= MAX_REQUEST => {
                return refuse(&mut stream, stats, "request longer than 128 bytes").await;
            }
            None if closed => return,
            None => {
                let n = tokio::select! {
                    r = stream.read(&mut chunk) => r.unwrap_or(0),
                    _ = stop.cancelled() => return,
                };
                if n == 0 {
                    closed = true;
                }
                buf.extend_from_slice(&chunk[..n]);
                continue;
            }
        };
        let req = match parse_request(&line[..line.len() - 1]) {
            Ok(r) => r,
            Err(e) => return refuse(&mut stream, stats, &e.to_string()).await,
        };
        // With --etcd: a fenced primary answers no wait, and a durable
        // answer needs the durable floor in etcd first.
        if let Some(l) = leadership.filter(|l| !l.acting()) {
            let why = l.standing().fence_reason;
            let msg = format!("ERROR this primary is fenced and answers no commit wait: {why}\n");
            let _ = stream.write_all(msg.as_bytes()).await;
            return;
        }
        let waiting = wait(acks.clone(), req, stats);
        tokio::pin!(waiting);
        let outcome: WaitOutcome = loop {
            if closed {
                break waiting.as_mut().await;
            }
            tokio::select! {
                o = &mut waiting => break o,
                r = stream.read(&mut chunk) => match r {
                    // Gone: nobody to answer.
                    Ok(0) | Err(_) => return,
                    Ok(n) => {
                        buf.extend_from_slice(&chunk[..n]);
                        if buf.len() > MAX_REQUEST * 4 {
                            return refuse(&mut stream, stats, "too many requests queued").await;
                        }
                    }
                },
                _ = stop.cancelled() => {
                    let _ = stream.write_all(b"ERROR the primary is shutting down\n").await;
                    return;
                }
            }
        };
        if let (Some(l), WaitOutcome::Durable { .. }) = (leadership, &outcome) {
            if let Err(why) = l.confirm_durable(req.lsn).await {
                let _ = stream.write_all(format!("ERROR {why}\n").as_bytes()).await;
                return;
            }
        }
        let reply = format!("{outcome}\n");
        if stream.write_all(reply.as_bytes()).await.is_err() {
            return;
        }
    }
}

async fn refuse(stream: &mut UnixStream, stats: &WaitStats, why: &str) {
    stats
        .bad_requests
        .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    let _ = stream.write_all(format!("ERROR {why}\n").as_bytes()).await;
    let _ = stream.shutdown().await;
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_stale_socket_is_replaced_a_live_one_and_other_files_refused() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("w.sock");
        // A socket nobody listens on any more, as a kill -9 leaves it.
        drop(std::os::unix::net::UnixListener::bind(&path).unwrap());
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        rt.block_on(async {
            let (_l, sock) = bind(&path).unwrap();
            let mode = std::fs::metadata(&path).unwrap().permissions().mode();
            assert_eq!(mode & 0o777, 0o600);
            let e = bind(&path).err().unwrap();
            assert!(matches!(e, WaitSocketError::InUse(_)), "{e}");
            drop(sock);
            assert!(!path.exists());
        });
        std::fs::write(&path, b"not a socket").unwrap();
        let e = rt.block_on(async { bind(&path).err().unwrap() });
        assert!(matches!(e, WaitSocketError::NotASocket(_)), "{e}");
        assert_eq!(std::fs::read(&path).unwrap(), b"not a socket");
    }

    #[test]
    fn a_socket_deeper_than_a_socket_address_still_serves() {
        let dir = tempfile::tempdir().unwrap();
        let deep = dir.path().join("e".repeat(60)).join("n".repeat(60));
        std::fs::create_dir_all(&deep).unwrap();
        let path = deep.join(SOCKET_NAME);
        assert!(path.as_os_str().len() > MAX_ADDRESS);
        let rt = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(1)
            .enable_all()
            .build()
            .unwrap();
        let (listener, sock) = rt.block_on(async { bind(&path) }).unwrap();
        assert_eq!(sock.path, path);
        let (_tx, acks) = watch::channel(DurableAcks::default());
        let stop = CancellationToken::new();
        rt.spawn(serve(
            listener,
            acks,
            Arc::new(WaitStats::default()),
            None,
            stop.clone(),
        ));
        let reply = super::super::client::request(
            &path,
            &super::super::WaitRequest {
                lsn: tandem_shared::LogPosition::new(1, 28),
                k: 1,
                timeout: std::time::Duration::from_millis(10),
            },
        )
        .unwrap();
        assert!(
            matches!(reply, super::super::client::Reply::TimedOut { .. }),
            "{reply:?}"
        );
        // A second primary on the same deep path is told it is in use.
        let e = rt.block_on(async { bind(&path) }).err().unwrap();
        assert!(matches!(e, WaitSocketError::InUse(_)), "{e}");
        stop.cancel();
    }
}
