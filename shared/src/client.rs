//! Dialing a primary over mutual TLS.

use crate::tls::{TlsError, TlsFiles};
use crate::wire::replication_client::ReplicationClient;
use crate::MAX_MESSAGE_BYTES;
use std::time::Duration;
use tonic::transport::{Channel, Endpoint};

#[derive(Debug, thiserror::Error)]
pub enum ConnectError {
    #[error("bad primary address {url:?}: {why} (expected https://HOST:PORT)")]
    BadUrl { url: String, why: String },
    #[error(transparent)]
    Tls(#[from] TlsError),
    #[error("cannot connect to {url}: no TLS session within {timeout:?}")]
    Timeout { url: String, timeout: Duration },
    #[error("cannot connect to {url}: {}", chain(.source))]
    Connect {
        url: String,
        source: tonic::transport::Error,
    },
}

/// Checks a primary address without dialing it.
pub fn validate_url(url: &str) -> Result<(), ConnectError> {
    endpoint_host(url).map(|_| ())
}

fn endpoint_host(url: &str) -> Result<(Endpoint, String), ConnectError> {
    let bad = |why: &str| ConnectError::BadUrl {
        url: url.to_owned(),
        why: why.to_owned(),
    };
    if !url.starts_with("https://") {
        return Err(bad("Tandem only speaks TLS"));
    }
    let endpoint = Endpoint::from_shared(url.to_owned()).map_err(|e| bad(&e.to_string()))?;
    let host = endpoint
        .uri()
        .host()
        .ok_or_else(|| bad("no host"))?
        .trim_matches(|c| c == '[' || c == ']')
        .to_owned();
    Ok((endpoint, host))
}

/// HTTP/2 keepalive: a ping this often, even while no request is active ...
pub const KEEPALIVE_INTERVAL: Duration = Duration::from_secs(2);
/// ... and the connection is closed when one is not answered within this:
/// a cut network (no FIN, no RST) is noticed within seconds instead of
/// after TCP's retransmission timeouts (minutes). Not shorter: a ping waits
/// behind what the kernel already holds to send (megabytes during a base
/// copy), which on a slow WAN link takes seconds. The standby notices
/// sooner anyway, by its silence deadline.
pub const KEEPALIVE_TIMEOUT: Duration = Duration::from_secs(10);

/// Connects to `url` (`https://HOST:PORT`). The primary's certificate must
/// chain to `tls.ca` and name `server_name` (default: the URL's host).
/// `timeout` bounds the whole connection set-up, TLS handshake included:
/// over a cut network the TCP connect may succeed (a proxy, a middlebox)
/// while the handshake never completes.
pub async fn connect(
    url: &str,
    server_name: Option<&str>,
    tls: &TlsFiles,
    timeout: Duration,
) -> Result<ReplicationClient<Channel>, ConnectError> {
    let (endpoint, host) = endpoint_host(url)?;
    let name = server_name.unwrap_or(&host);
    let endpoint = endpoint
        .tls_config(tls.client_config(name)?)
        .map_err(|source| ConnectError::Connect {
            url: url.to_owned(),
            source,
        })?
        .connect_timeout(timeout)
        .tcp_nodelay(true)
        // HTTP/2's default 64 KiB windows cap a single stream far below
        // disk speed; a base copy is one long stream.
        .initial_stream_window_size(crate::STREAM_WINDOW)
        .initial_connection_window_size(crate::STREAM_WINDOW * 2)
        .max_frame_size(crate::MAX_FRAME)
        .http2_keep_alive_interval(KEEPALIVE_INTERVAL)
        .keep_alive_timeout(KEEPALIVE_TIMEOUT)
        .keep_alive_while_idle(true);
    let channel = tokio::time::timeout(timeout, endpoint.connect())
        .await
        .map_err(|_| ConnectError::Timeout {
            url: url.to_owned(),
            timeout,
        })?
        .map_err(|source| ConnectError::Connect {
            url: url.to_owned(),
            source,
        })?;
    Ok(ReplicationClient::new(channel)
        .max_decoding_message_size(MAX_MESSAGE_BYTES)
        .max_encoding_message_size(MAX_MESSAGE_BYTES))
}

/// The error and its causes on one line: tonic's own message ("transport
/// error") says little without them.
pub fn chain(e: &(dyn std::error::Error + 'static)) -> String {
    let mut out = e.to_string();
    let mut cur = e.source();
    while let Some(s) = cur {
        let text = s.to_string();
        if !out.contains(&text) {
            out.push_str(": ");
            out.push_str(&text);
        }
        cur = s.source();
    }
    out
}

/// Nothing listens at `url` (`https://HOST:PORT`): every address it
/// resolves to refuses the connection. A Tandem daemon answers on its
/// address for as long as it runs, so this says its process is gone
/// (an old primary exits 7 the moment it sees a newer epoch). False when
/// it cannot tell (no answer in time, a bad URL, no address).
pub fn nothing_listens(url: &str, timeout: Duration) -> bool {
    use std::net::ToSocketAddrs;
    let Some(host_port) = url
        .strip_prefix("https://")
        .map(|r| r.split('/').next().unwrap_or(r))
    else {
        return false;
    };
    let Ok(addrs) = host_port.to_socket_addrs() else {
        return false;
    };
    let addrs: Vec<_> = addrs.collect();
    !addrs.is_empty()
        && addrs.iter().all(|a| {
            matches!(
                std::net::TcpStream::connect_timeout(a, timeout),
                Err(e) if e.kind() == std::io::ErrorKind::ConnectionRefused
            )
        })
}

#[cfg(test)]
mod listen_tests {
    #[test]
    fn a_closed_port_is_seen_as_gone_and_an_open_one_is_not() {
        let open = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let url = format!("https://{}", open.local_addr().unwrap());
        let t = std::time::Duration::from_millis(500);
        assert!(!super::nothing_listens(&url, t));
        drop(open);
        assert!(super::nothing_listens(&url, t));
        assert!(!super::nothing_listens("http://127.0.0.1:1", t));
    }
}
