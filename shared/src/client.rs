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

/// Connects to `url` (`https://HOST:PORT`). The primary's certificate must
/// chain to `tls.ca` and name `server_name` (default: the URL's host).
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
        .http2_keep_alive_interval(Duration::from_secs(10))
        .keep_alive_timeout(Duration::from_secs(20));
    let channel = endpoint
        .connect()
        .await
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
