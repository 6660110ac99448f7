//! Prometheus text exposition and the tiny HTTP endpoint that serves it.
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
    pub fn gauge_by(&mut self, name: &str, help: &str, label: &str, samples: &[(String, f64)]) -> &mut Self {
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

/// Serves `render()` over plain HTTP at any path (conventionally
/// `/metrics`). Returns the bound address.
pub async fn serve<F>(addr: SocketAddr, render: F) -> std::io::Result<SocketAddr>
where
    F: Fn() -> String + Send + Sync + 'static,
{
    let listener = tokio::net::TcpListener::bind(addr).await?;
    let bound = listener.local_addr()?;
    let render = std::sync::Arc::new(render);
    tokio::spawn(async move {
        loop {
            let Ok((mut sock, _)) = listener.accept().await else { continue };
            let render = render.clone();
            tokio::spawn(async move {
                let mut buf = [0u8; 4096];
                // One request per connection; the request itself is not
                // needed beyond its arrival.
                let _ = tokio::time::timeout(std::time::Duration::from_secs(5), sock.read(&mut buf)).await;
                let body = render();
                let head = format!(
                    "HTTP/1.1 200 OK\r\nContent-Type: text/plain; version=0.0.4\r\nContent-Length: {}\r\nConnection: close\r\n\r\n",
                    body.len()
                );
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
            .gauge_by("tandem_lag_bytes", "Lag.", "standby", &[("a\"b".into(), 1.0)])
            .finish();
        assert!(text.contains("# TYPE tandem_x_total counter\ntandem_x_total 3\n"));
        assert!(text.contains("tandem_lag_bytes{standby=\"a\\\"b\"} 1"));
    }
}
