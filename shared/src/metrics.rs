//! The admin endpoint both daemons serve on `--metrics-listen`: their
//! metrics in the OpenMetrics text format (`prometheus-client` encodes it;
//! Prometheus scrapes it) and their status as JSON at `/status`, over a
//! real HTTP/1.1 server (hyper).
//!
//! The daemons keep their figures where they are produced (atomics, the
//! status) and build a [`MetricsPage`] from a snapshot on each scrape: a
//! scrape costs a few string writes and takes no lock on the hot path.

use http_body_util::Full;
use hyper::body::{Bytes, Incoming};
use hyper::header::{HeaderValue, CONTENT_TYPE};
use hyper::{Request, Response};
use hyper_util::rt::{TokioIo, TokioTimer};
use prometheus_client::encoding::{EncodeMetric, MetricEncoder};
use prometheus_client::metrics::counter::ConstCounter;
use prometheus_client::metrics::gauge::ConstGauge;
pub use prometheus_client::metrics::histogram::{exponential_buckets, Histogram};
use prometheus_client::metrics::MetricType;
use prometheus_client::registry::Registry;
use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

/// `Content-Type` of [`MetricsPage::finish`]'s text.
pub const OPENMETRICS_TYPE: &str = "application/openmetrics-text; version=1.0.0; charset=utf-8";
/// A client that sends no complete request head within this is dropped.
const HEADER_TIMEOUT: Duration = Duration::from_secs(5);

/// One scrape's metrics: families registered from a snapshot of the
/// daemon's figures, then encoded.
#[derive(Default)]
pub struct MetricsPage {
    registry: Registry,
}

/// prometheus-client adds the `_total` suffix of counters and the final
/// full stop of help texts itself; names and help here are written the
/// way they appear on the page.
fn family_name<'a>(name: &'a str, suffix: &str) -> &'a str {
    name.strip_suffix(suffix).unwrap_or(name)
}

fn help_text(help: &str) -> &str {
    help.strip_suffix('.').unwrap_or(help)
}

impl MetricsPage {
    /// A counter; `name` ends in `_total`, as the sample is named.
    pub fn counter(&mut self, name: &str, help: &str, value: u64) -> &mut Self {
        self.registry.register(
            family_name(name, "_total"),
            help_text(help),
            ConstCounter::new(value),
        );
        self
    }

    /// A gauge holding a whole number (bytes, counts, flags).
    pub fn gauge_int(&mut self, name: &str, help: &str, value: i64) -> &mut Self {
        self.registry
            .register(name, help_text(help), ConstGauge::new(value));
        self
    }

    /// A gauge holding a real number (seconds, estimates).
    pub fn gauge(&mut self, name: &str, help: &str, value: f64) -> &mut Self {
        self.registry
            .register(name, help_text(help), ConstGauge::new(value));
        self
    }

    /// A gauge with one sample per value of `label`.
    pub fn gauge_by(
        &mut self,
        name: &str,
        help: &str,
        label: &str,
        samples: &[(String, i64)],
    ) -> &mut Self {
        self.registry.register(
            name,
            help_text(help),
            GaugesByLabel {
                label: label.to_owned(),
                samples: samples.to_vec(),
            },
        );
        self
    }

    /// A histogram the daemon observes in place (a clone shares its
    /// buckets); `name` without the `_seconds`-style unit suffix rules of
    /// counters: it appears as given, with `_bucket`, `_sum`, `_count`.
    pub fn histogram(&mut self, name: &str, help: &str, h: &Histogram) -> &mut Self {
        self.registry.register(name, help_text(help), h.clone());
        self
    }

    /// The OpenMetrics text, `# EOF` included.
    pub fn finish(&self) -> String {
        let mut out = String::new();
        // Writing into a String cannot fail.
        let _ = prometheus_client::encoding::text::encode(&mut out, &self.registry);
        out
    }
}

/// Gauge samples told apart by one label, known at scrape time (the
/// library's `Family` is for metrics updated in place).
#[derive(Debug)]
struct GaugesByLabel {
    label: String,
    samples: Vec<(String, i64)>,
}

impl EncodeMetric for GaugesByLabel {
    fn encode(&self, mut encoder: MetricEncoder) -> Result<(), std::fmt::Error> {
        for (value_of_label, value) in &self.samples {
            let labels = [(self.label.as_str(), value_of_label.as_str())];
            encoder.encode_family(&labels)?.encode_gauge(value)?;
        }
        Ok(())
    }

    fn metric_type(&self) -> MetricType {
        MetricType::Gauge
    }
}

/// What the admin endpoint answers: `/status` gives the daemon's status as
/// JSON, any other path the metrics.
pub struct AdminPages {
    pub metrics: Box<dyn Fn() -> String + Send + Sync>,
    pub status_json: Box<dyn Fn() -> String + Send + Sync>,
}

fn respond(pages: &AdminPages, req: &Request<Incoming>) -> Response<Full<Bytes>> {
    let (kind, body) = if req.uri().path().starts_with("/status") {
        ("application/json", (pages.status_json)())
    } else {
        (OPENMETRICS_TYPE, (pages.metrics)())
    };
    let mut resp = Response::new(Full::new(Bytes::from(body)));
    resp.headers_mut()
        .insert(CONTENT_TYPE, HeaderValue::from_static(kind));
    resp
}

/// Serves the admin pages over plain HTTP: keep the address private
/// (loopback, or a management network). Returns the bound address.
///
/// One request per connection (the response says `Connection: close`):
/// scrapes are seconds apart, and a client reading to the end of the
/// stream (curl, a test) gets it at once.
pub async fn serve(addr: SocketAddr, pages: AdminPages) -> std::io::Result<AdminServer> {
    let listener = tokio::net::TcpListener::bind(addr).await?;
    let bound = listener.local_addr()?;
    let pages = Arc::new(pages);
    let task = tokio::spawn(async move {
        loop {
            let sock = match listener.accept().await {
                Ok((sock, _)) => sock,
                Err(e) => {
                    tracing::debug!(error = %e, "admin endpoint: accept failed");
                    continue;
                }
            };
            let pages = pages.clone();
            tokio::spawn(async move {
                let service = hyper::service::service_fn(move |req| {
                    let resp = respond(&pages, &req);
                    async move { Ok::<_, Infallible>(resp) }
                });
                let conn = hyper::server::conn::http1::Builder::new()
                    .keep_alive(false)
                    .timer(TokioTimer::new())
                    .header_read_timeout(HEADER_TIMEOUT)
                    .serve_connection(TokioIo::new(sock), service);
                if let Err(e) = conn.await {
                    tracing::debug!(error = %e, "admin endpoint: connection failed");
                }
            });
        }
    });
    Ok(AdminServer { bound, task })
}

/// The running admin endpoint: stopped and joined at shutdown, so nothing
/// of a daemon outlives it (a request under way is at most one page).
pub struct AdminServer {
    pub bound: SocketAddr,
    task: tokio::task::JoinHandle<()>,
}

impl AdminServer {
    pub async fn stop(self) {
        self.task.abort();
        let _ = self.task.await;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn renders_families() {
        let text = MetricsPage::default()
            .counter("tandem_x_total", "Things.", 3)
            .gauge_int("tandem_flag", "A flag.", 1)
            .gauge("tandem_secs", "Seconds.", 0.25)
            .gauge_by("tandem_lag_bytes", "Lag.", "standby", &[("a\"b".into(), 1)])
            .finish();
        assert!(
            text.contains("# HELP tandem_x Things.\n# TYPE tandem_x counter\ntandem_x_total 3\n"),
            "{text}"
        );
        assert!(text.contains("tandem_flag 1\n"), "{text}");
        assert!(text.contains("tandem_secs 0.25\n"), "{text}");
        assert!(
            text.contains("tandem_lag_bytes{standby=\"a\\\"b\"} 1\n"),
            "{text}"
        );
        assert!(text.ends_with("# EOF\n"), "{text}");
    }

    /// A real client over a real socket: one request per connection, the
    /// status at /status, the metrics anywhere else, and the connection
    /// closed after the response (clients that read to the end finish).
    #[tokio::test]
    async fn serves_metrics_and_status_then_closes() {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        let pages = AdminPages {
            metrics: Box::new(|| MetricsPage::default().gauge_int("m", "M.", 7).finish()),
            status_json: Box::new(|| "{\"role\":\"test\"}".into()),
        };
        let server = serve("127.0.0.1:0".parse().unwrap(), pages).await.unwrap();
        let addr = server.bound;
        for (path, want_type, want_body) in [
            ("/metrics", OPENMETRICS_TYPE, "m 7\n"),
            ("/status", "application/json", "{\"role\":\"test\"}"),
            ("/", OPENMETRICS_TYPE, "m 7\n"),
        ] {
            let mut sock = tokio::net::TcpStream::connect(addr).await.unwrap();
            sock.write_all(format!("GET {path} HTTP/1.1\r\nHost: x\r\n\r\n").as_bytes())
                .await
                .unwrap();
            let mut out = String::new();
            tokio::time::timeout(Duration::from_secs(30), sock.read_to_string(&mut out))
                .await
                .expect("the server closes the connection after one response")
                .unwrap();
            assert!(out.starts_with("HTTP/1.1 200 OK\r\n"), "{out}");
            assert!(
                out.to_ascii_lowercase()
                    .contains(&format!("content-type: {want_type}")),
                "{out}"
            );
            assert!(out.contains(want_body), "{path}: {out}");
        }
        // Stopped and joined: nothing listens any more.
        server.stop().await;
        assert!(tokio::net::TcpStream::connect(addr).await.is_err());
    }
}
