//! The client side of the wait socket, for `tandem-primary wait-durable`:
//! where the log ends now, one request, its reply.

use super::{WaitRequest, MAX_REQUEST};
use std::io::{BufRead, BufReader, ErrorKind, Write};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::time::Duration;
use tandem_shared::envlayout::EnvLayout;
use tandem_shared::logfile::walk_file;
use tandem_shared::LogPosition;

/// How long past its own timeout a client waits for the reply before it
/// gives up on a primary that hangs.
const REPLY_GRACE: Duration = Duration::from_secs(10);

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Reply {
    Durable {
        at: LogPosition,
        holding: usize,
    },
    TimedOut {
        best: LogPosition,
        connected: usize,
        reason: String,
    },
    Error(String),
}

#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    #[error("no primary runs for this environment: nothing listens on {path} ({source})")]
    NoPrimary {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("talking to the primary on {path}: {source}")]
    Io {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("the primary's reply is not understood: {0:?}")]
    Protocol(String),
    #[error("reading the end of the log of {env}: {message}")]
    LogEnd { env: PathBuf, message: String },
}

fn position(s: &str) -> Option<LogPosition> {
    let (f, o) = s.split_once('/')?;
    Some(LogPosition::new(f.parse().ok()?, o.parse().ok()?))
}

/// Parses one reply line (without its newline).
pub fn parse_reply(line: &str) -> Result<Reply, ClientError> {
    let bad = || ClientError::Protocol(line.to_owned());
    let mut words = line.splitn(4, ' ');
    match words.next() {
        Some("DURABLE") => {
            let at = words.next().and_then(position).ok_or_else(bad)?;
            let holding = words.next().and_then(|n| n.parse().ok()).ok_or_else(bad)?;
            Ok(Reply::Durable { at, holding })
        }
        Some("TIMEOUT") => {
            let best = words.next().and_then(position).ok_or_else(bad)?;
            let connected = words.next().and_then(|n| n.parse().ok()).ok_or_else(bad)?;
            let reason = words.next().unwrap_or("").to_owned();
            Ok(Reply::TimedOut {
                best,
                connected,
                reason,
            })
        }
        Some("ERROR") => Ok(Reply::Error(
            line.strip_prefix("ERROR ").unwrap_or("").to_owned(),
        )),
        _ => Err(bad()),
    }
}

/// Sends one request to the socket at `path` and reads its reply.
pub fn request(path: &Path, req: &WaitRequest) -> Result<Reply, ClientError> {
    let io = |source| ClientError::Io {
        path: path.to_path_buf(),
        source,
    };
    let address = super::socket::SocketAddress::of(path).map_err(io)?;
    let mut stream = UnixStream::connect(&address.path).map_err(|source| match source.kind() {
        ErrorKind::NotFound | ErrorKind::ConnectionRefused => ClientError::NoPrimary {
            path: path.to_path_buf(),
            source,
        },
        _ => io(source),
    })?;
    stream
        .set_read_timeout(Some(req.timeout + REPLY_GRACE))
        .map_err(io)?;
    let line = format!(
        "WAIT {} {} {} {}\n",
        req.lsn.file,
        req.lsn.offset,
        req.k,
        req.timeout.as_millis()
    );
    stream.write_all(line.as_bytes()).map_err(io)?;
    let mut reply = String::new();
    // A reply is a line of a few hundred bytes at most; more is not ours.
    BufReader::new(std::io::Read::take(stream, (MAX_REQUEST * 8) as u64))
        .read_line(&mut reply)
        .map_err(io)?;
    let reply = reply.strip_suffix('\n').ok_or_else(|| {
        ClientError::Protocol(format!("{reply} (the primary closed the connection)"))
    })?;
    parse_reply(reply)
}

/// The start of the last complete record of the environment's log, read
/// the way the primary's log watcher reads it (walking the newest file's
/// records): waiting on it waits for everything logged so far.
pub fn last_record(env: &Path) -> Result<LogPosition, ClientError> {
    let err = |message: String| ClientError::LogEnd {
        env: env.to_path_buf(),
        message,
    };
    let layout = EnvLayout::open(env).map_err(|e| err(e.to_string()))?;
    let files = layout.log_files().map_err(|e| err(e.to_string()))?;
    let newest = *files.last().ok_or_else(|| err("no log file".into()))?;
    let path = layout.log_path(newest);
    let file = std::fs::File::open(&path).map_err(|e| err(format!("{}: {e}", path.display())))?;
    let walk = walk_file(&file, None).map_err(|e| err(format!("{}: {e}", path.display())))?;
    let offset = walk
        .last_record
        .ok_or_else(|| err(format!("{} holds no complete record", path.display())))?;
    Ok(LogPosition::new(newest, offset))
}

/// Parses `FILE/OFFSET` (the protocol's notation) or `[FILE][OFFSET]`
/// (BDB's, as `db_printlog` prints it).
pub fn parse_lsn(s: &str) -> Option<LogPosition> {
    if let Some(rest) = s.strip_prefix('[') {
        let (f, o) = rest.strip_suffix(']')?.split_once("][")?;
        return Some(LogPosition::new(f.parse().ok()?, o.parse().ok()?));
    }
    position(s)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn replies_and_positions_parse() {
        assert_eq!(
            parse_reply("DURABLE 3/100 2").unwrap(),
            Reply::Durable {
                at: LogPosition::new(3, 100),
                holding: 2
            }
        );
        assert_eq!(
            parse_reply("TIMEOUT 0/0 0 no standby is connected").unwrap(),
            Reply::TimedOut {
                best: LogPosition::ZERO,
                connected: 0,
                reason: "no standby is connected".into()
            }
        );
        assert_eq!(
            parse_reply("ERROR bad k").unwrap(),
            Reply::Error("bad k".into())
        );
        assert!(parse_reply("DURABLE x 2").is_err());
        assert!(parse_reply("HELLO").is_err());
        assert_eq!(parse_lsn("[4][28]"), Some(LogPosition::new(4, 28)));
        assert_eq!(parse_lsn("4/28"), Some(LogPosition::new(4, 28)));
        assert_eq!(parse_lsn("4-28"), None);
    }
}
