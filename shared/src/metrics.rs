//! Prometheus text exposition and the tiny HTTP admin endpoint that serves
//! it (and the status as JSON).
//! The daemons keep their figures in atomics and render them on request;
//! a scrape costs a few string writes and no locks on the hot path.

use std::fmt::Write;
use std::net::SocketAddr;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

/// Builds a Prometheus text-format page (version 0.0.4).
#[derive(Default)]
pub struct PromText {
    out: String,
}

impl PromText {
    fn family(&mut self, name: &str, kind: &str, help: &str) {
        let _ = writeln!(self.out, "# HELP {name} {help}\n# TYPE {name} {kind}");
    }

    pub fn counter(&mut self, name: &str, help: &str, value: u64) -> &mut Self {
        self.family(name, "counter", help);
        let _ = writeln!(self.out, "{name} {value}");
        self
    }

    pub fn gauge(&mut self, name: &str, help: &str, value: f64) -> &mut Self {
        self.family(name, "gauge", help);
        let _ = writeln!(self.out, "{name} {value}");
        self
    }

    /// A gauge with one sample per label value.
    pub fn gauge_by(
        &mut self,
        name: &str,
        help: &str,
        label: &str,
        samples: &[(String, f64)],
    ) -> &mut Self {
        self.family(name, "gauge", help);
        for (value_of_label, v) in samples {
            let escaped = value_of_label.replace('\\', "\\\\").replace('"', "\\\"");
            let _ = writeln!(self.out, "{name}{{{label}=\"{escaped}\"}} {v}");
        }
        self
    }

    pub fn finish(&mut self) -> String {
        std::mem::take(&mut self.out)
    }
}

/// What the admin endpoint answers for a path: `/status` gives the
/// daemon's status as JSON, anything else the Prometheus metrics.
pub struct AdminPages {
    pub metrics: Box<dyn Fn() -> String + Send + Sync>,
    pub status_json: Box<dyn Fn() -> String + Send + Sync>,
}

/// Serves the admin pages over plain HTTP: keep the address private
/// (loopback, or a management network). Returns the bound address.
pub async fn serve(addr: SocketAddr, pages: AdminPages) -> std::io::Result<SocketAddr> {
    let listener = tokio::net::TcpListener::bind(addr).await?;
    let bound = listener.local_addr()?;
    let pages = std::sync::Arc::new(pages);
    tokio::spawn(async move {
        loop {
            let Ok((mut sock, _)) = listener.accept().await else {
                continue;
            };
            let pages = pages.clone();
            tokio::spawn(async move {
                let mut buf = [0u8; 4096];
                // One request per connection; only its path matters.
                let n = match tokio::time::timeout(
                    std::time::Duration::from_secs(5),
                    sock.read(&mut buf),
                )
                .await
                {
                    Ok(Ok(n)) => n,
                    _ => return,
                };
                let request = String::from_utf8_lossy(&buf[..n]);
                let path = request.split_whitespace().nth(1).unwrap_or("/");
                let (kind, body) = if path.starts_with("/status") {
                    ("application/json", (pages.status_json)())
                } else {
                    ("text/plain; version=0.0.4", (pages.metrics)())
                };
                let head = format!("HTTP/1.1 200 OK\r\nContent-Type: {kind}\r\nContent-Length: {}\r\nConnection: close\r\n\r\n", body.len());
                let _ = sock.write_all(head.as_bytes()).await;
                let _ = sock.write_all(body.as_bytes()).await;
                let _ = sock.shutdown().await;
            });
        }
    });
    Ok(bound)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn renders_families() {
        let text = PromText::default()
            .counter("tandem_x_total", "Things.", 3)
            .gauge_by(
                "tandem_lag_bytes",
                "Lag.",
                "standby",
                &[("a\"b".into(), 1.0)],
            )
            .finish();
        assert!(text.contains("# TYPE tandem_x_total counter\ntandem_x_total 3\n"));
        assert!(text.contains("tandem_lag_bytes{standby=\"a\\\"b\"} 1"));
    }
}
