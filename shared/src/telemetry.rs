//! Logging set-up shared by both binaries: human-readable by default, JSON
//! with `--log-format json`, level from `RUST_LOG` (default `info`).

use tracing_subscriber::EnvFilter;

/// `--log-format` of either daemon (a flag through clap, a key through serde).
#[derive(
    Debug,
    Clone,
    Copy,
    PartialEq,
    Eq,
    Default,
    serde::Deserialize,
    serde::Serialize,
    clap::ValueEnum,
)]
#[serde(rename_all = "lowercase")]
pub enum LogFormat {
    #[default]
    Human,
    Json,
}

/// Installs the subscriber: `RUST_LOG` wins; the default is `info` plus
/// tonic's TLS handshake refusals.
pub fn init(format: LogFormat) {
    // tonic reports refused TLS handshakes (a peer without a certificate,
    // or with one from another CA) only at debug; operators need them.
    let filter = EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| EnvFilter::new("info,tonic::transport::server::io_stream=debug"));
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr);
    let _ = match format {
        LogFormat::Human => builder.try_init(),
        LogFormat::Json => builder.json().try_init(),
    };
}
