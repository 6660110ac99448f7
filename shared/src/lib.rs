//! Tandem's shared library: everything both daemons need to agree on.
//!
//! - [`lsn`]: `LogPosition`, the one way positions are expressed.
//! - [`logfile`]: BDB's log file format and the record walker.
//! - [`logrecords`]: which databases, transactions and files log records name.
//! - [`envlayout`]: which files make up an environment and where they live.
//! - [`epochs`]: the epoch history promotions write and standbys follow.
//! - [`envusers`]: which processes have an environment open.
//! - [`pages`]: reading database pages without shipping a torn one.
//! - [`page_checksum`]: BDB's own page checksum, the one-read proof.
//! - [`wirepath`]: accepting file names from the network safely.
//! - [`durable`]: fsync discipline and checksummed control files.
//! - [`ioerror`]: the one I/O error type (what was done, and the error).
//! - [`latency`]: timing the log's path stage by stage, for the metrics.
//! - [`tls`]: mutual TLS for both ends, and certificate generation.
//! - [`bdb`]: the Berkeley DB command-line tools Tandem runs.
//! - [`compress`]: per-chunk zstd of what is shipped, negotiated per session.
//! - [`wire`]: the generated gRPC protocol.

pub mod bdb;
pub mod client;
pub mod compress;
pub mod config;
pub mod durable;
pub mod envlayout;
pub mod envusers;
pub mod epochs;
pub mod ioerror;
pub mod latency;
pub mod logfile;
pub mod logrecords;
pub mod lsn;
pub mod metrics;
pub mod page_checksum;
pub mod pages;
pub mod sdnotify;
pub mod telemetry;
pub mod tls;
pub mod wirepath;

pub use ioerror::{io_err, IoError};
pub use lsn::LogPosition;
pub use tandem_proto as wire;

/// Largest gRPC message either side accepts. Chunks are at most
/// [`MAX_CHUNK`] bytes, so this leaves room for the envelope only.
pub const MAX_MESSAGE_BYTES: usize = MAX_CHUNK + 64 * 1024;
/// HTTP/2 flow-control window for the replication stream (both sides).
pub const STREAM_WINDOW: u32 = 16 << 20;
/// Largest HTTP/2 frame either side accepts: a chunk in a few frames
/// instead of 64 of the default 16 KiB, each with its own bookkeeping and
/// wake-ups on both sides (TLS still cuts records at 16 KiB).
pub const MAX_FRAME: u32 = 256 << 10;
/// Largest payload of one file or log chunk.
pub const MAX_CHUNK: usize = 1 << 20;

/// How long a daemon's exit waits for blocking work still running after its
/// own shutdown stages ended (they bound what must finish first). The
/// runtime's drop would wait for every blocking task, and one may never
/// return: in the etcd fault campaign (2026-12-07, round 23) a fenced
/// primary printed "stopped" and its refusal, then kept running, its
/// retention pass's `db_archive` stuck in the environment the killed
/// application had left. Leaving such a task is a crash's effect, which
/// every write path is built to survive.
pub const EXIT_GRACE: std::time::Duration = std::time::Duration::from_secs(1);

/// Keeps freed chunk-sized buffers in the process for reuse. By default
/// glibc serves megabyte allocations with fresh mappings or gives freed
/// memory back to the kernel (madvise), so every 1 MiB chunk of a base copy
/// was faulted in again page by page: about a third of the pages streamed
/// cost a page fault and a zeroed page on each side. With these settings
/// chunk buffers come from the heap and stay there; memory held is bounded
/// by the peak in flight (the bounded channels and HTTP/2 windows). Call
/// before any thread starts.
pub fn keep_freed_memory() {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    // SAFETY: mallopt only changes allocator parameters; called before
    // other threads exist.
    unsafe {
        libc::mallopt(libc::M_MMAP_THRESHOLD, 32 << 20);
        libc::mallopt(libc::M_TRIM_THRESHOLD, 256 << 20);
    }
}

/// This machine's host name (the default name of a standby or a primary).
pub fn hostname() -> String {
    std::fs::read_to_string("/proc/sys/kernel/hostname")
        .map(|s| s.trim().to_owned())
        .unwrap_or_else(|_| "tandem".into())
}

/// Bytes as lowercase hex (ids, digests in state files and logs).
pub fn to_hex(bytes: &[u8]) -> String {
    use std::fmt::Write as _;
    bytes
        .iter()
        .fold(String::with_capacity(bytes.len() * 2), |mut s, b| {
            let _ = write!(s, "{b:02x}");
            s
        })
}

pub fn now_unix_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
}

/// Resolves on SIGTERM or Ctrl-C.
pub async fn shutdown_signal() {
    let ctrl_c = async {
        let _ = tokio::signal::ctrl_c().await;
    };
    #[cfg(unix)]
    let term = async {
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(mut s) => {
                s.recv().await;
            }
            Err(_) => std::future::pending::<()>().await,
        }
    };
    tokio::select! {
        _ = ctrl_c => {},
        _ = term => {},
    }
    tracing::info!("shutting down");
    sdnotify::stopping();
}
