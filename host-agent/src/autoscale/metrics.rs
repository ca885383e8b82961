//! The Prometheus endpoint: per-domain gauges and counters, served at
//! `/metrics` only, bounded in connections, time and bytes, and never ended by a
//! failing `accept`.

use std::sync::Arc;
use std::time::Duration;

use super::decision::{Action, Capacity, DecisionEvent};
use super::Engine;
use crate::report::Outcome;

/// Counters for the Prometheus endpoint.
#[derive(Debug, Default)]
pub struct Metrics {
    pub lines: std::sync::Mutex<std::collections::BTreeMap<String, f64>>,
}

impl Metrics {
    fn set(&self, key: String, v: f64) {
        self.lines.lock().unwrap_or_else(|e| e.into_inner()).insert(key, v);
    }
    fn add(&self, key: String, v: f64) {
        *self.lines.lock().unwrap_or_else(|e| e.into_inner()).entry(key).or_default() += v;
    }
    pub fn render(&self) -> String {
        let mut s = String::from("# vmplug autoscale metrics\n");
        for (k, v) in self.lines.lock().unwrap_or_else(|e| e.into_inner()).iter() {
            s.push_str(&format!("{k} {v}\n"));
        }
        s
    }
    pub(crate) fn record(&self, ev: &DecisionEvent, cap: &Capacity) {
        let l = format!("domain=\"{}\",uri=\"{}\"", ev.domain, ev.uri);
        self.set(format!("vmplug_domain_vcpus{{{l}}}"), cap.vcpus as f64);
        self.set(format!("vmplug_domain_vcpus_max{{{l}}}"), cap.vcpus_max as f64);
        self.set(format!("vmplug_domain_memory_bytes{{{l}}}"), cap.memory.get() as f64);
        self.set(format!("vmplug_domain_max_memory_bytes{{{l}}}"), cap.max_memory.get() as f64);
        if ev.action != Action::None {
            self.add(format!("vmplug_decisions_total{{{l},rule=\"{}\"}}", ev.rule), 1.0);
        }
        if let Some(o) = ev.outcome {
            if o != Outcome::Ok {
                self.add(format!("vmplug_failures_total{{{l}}}"), 1.0);
            }
            self.add(format!("vmplug_action_seconds_sum{{{l}}}"), ev.duration_ms as f64 / 1000.0);
            self.add(format!("vmplug_action_seconds_count{{{l}}}"), 1.0);
        }
    }
}

/// Most metrics connections served at once; more wait in the listen backlog.
pub const MAX_METRICS_CONNECTIONS: usize = 32;
/// How long a metrics client may take to send its request line and headers.
pub const METRICS_READ_TIMEOUT: Duration = Duration::from_secs(2);
/// Longest pause after a failed `accept` (EMFILE under a connection flood):
/// the endpoint pauses and goes on, it never ends.
pub const METRICS_ACCEPT_BACKOFF_MAX: Duration = Duration::from_secs(1);

/// `metrics_listen` as a socket address: a bare port (`9477` or `:9477`) binds
/// loopback only; anything else is taken as written.
pub fn metrics_addr(listen: &str) -> Result<std::net::SocketAddr, String> {
    let port_only = listen.strip_prefix(':').unwrap_or(listen);
    if let Ok(port) = port_only.parse::<u16>() {
        return Ok(std::net::SocketAddr::from(([127, 0, 0, 1], port)));
    }
    listen.parse().map_err(|e| format!("'{listen}' is not PORT or ADDRESS:PORT ({e})"))
}

/// The status line and body of the answer to one HTTP request head.
pub fn metrics_response(head: &[u8], metrics: &Metrics) -> (&'static str, String) {
    let line = head.split(|&b| b == b'\n').next().unwrap_or_default();
    let line = String::from_utf8_lossy(line);
    let mut parts = line.trim_end().split(' ');
    let (method, path, version) = (parts.next(), parts.next(), parts.next());
    match (method, path, version) {
        (Some(m), Some(p), Some(v)) if v.starts_with("HTTP/") => match (m, p.split('?').next()) {
            ("GET" | "HEAD", Some("/metrics")) => ("200 OK", metrics.render()),
            ("GET" | "HEAD", _) => ("404 Not Found", "not found: metrics are at /metrics\n".into()),
            _ => ("405 Method Not Allowed", "only GET /metrics\n".into()),
        },
        _ => ("400 Bad Request", "bad request\n".into()),
    }
}

/// Serves the metrics as Prometheus text on `addr` until the process ends: at
/// most [`MAX_METRICS_CONNECTIONS`] at once, each bounded in time and bytes,
/// accept failures backed off and never fatal.
pub async fn serve_metrics(addr: &str, engine: Arc<Engine>) -> std::io::Result<std::net::SocketAddr> {
    let addr = metrics_addr(addr).map_err(|e| std::io::Error::new(std::io::ErrorKind::InvalidInput, e))?;
    if !addr.ip().is_loopback() {
        tracing::warn!(%addr, "metrics endpoint reachable beyond this host (unauthenticated)");
    }
    let listener = tokio::net::TcpListener::bind(addr).await?;
    let bound = listener.local_addr()?;
    let slots = Arc::new(tokio::sync::Semaphore::new(MAX_METRICS_CONNECTIONS));
    tokio::spawn(async move {
        let mut pause = Duration::from_millis(10);
        loop {
            let Ok(permit) = slots.clone().acquire_owned().await else { return };
            let (stream, _) = match listener.accept().await {
                Ok(c) => c,
                Err(e) => {
                    tracing::warn!(error = %e, ?pause, "metrics accept failed; pausing");
                    tokio::time::sleep(pause).await;
                    pause = (pause * 2).min(METRICS_ACCEPT_BACKOFF_MAX);
                    continue;
                }
            };
            pause = Duration::from_millis(10);
            let engine = engine.clone();
            tokio::spawn(async move {
                answer_metrics(stream, &engine.metrics).await;
                drop(permit);
            });
        }
    });
    Ok(bound)
}

/// Reads one request head (at most 4 KiB, within [`METRICS_READ_TIMEOUT`]) and answers it.
async fn answer_metrics(mut s: tokio::net::TcpStream, metrics: &Metrics) {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut head = Vec::with_capacity(512);
    let read = tokio::time::timeout(METRICS_READ_TIMEOUT, async {
        let mut buf = [0u8; 512];
        while head.len() < 4096 && !head.windows(4).any(|w| w == b"\r\n\r\n") && !head.ends_with(b"\n\n") {
            match s.read(&mut buf).await {
                Ok(0) | Err(_) => break,
                Ok(n) => head.extend_from_slice(&buf[..n]),
            }
        }
    })
    .await;
    if read.is_err() {
        return;
    }
    let (status, body) = metrics_response(&head, metrics);
    let resp = format!(
        "HTTP/1.0 {status}\r\nContent-Type: text/plain; version=0.0.4\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
        body.len()
    );
    let _ = tokio::time::timeout(METRICS_READ_TIMEOUT, s.write_all(resp.as_bytes())).await;
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Security finding 7: the endpoint answered every path; it answers /metrics only.
    #[test]
    fn the_metrics_endpoint_answers_its_path_only() {
        let m = Metrics::default();
        assert_eq!(metrics_response(b"GET /metrics HTTP/1.1\r\nHost: x\r\n\r\n", &m).0, "200 OK");
        assert_eq!(metrics_response(b"GET /metrics?x=1 HTTP/1.0\r\n\r\n", &m).0, "200 OK");
        assert_eq!(metrics_response(b"GET / HTTP/1.1\r\n\r\n", &m).0, "404 Not Found");
        assert_eq!(metrics_response(b"GET /metrics/../etc HTTP/1.1\r\n\r\n", &m).0, "404 Not Found");
        assert_eq!(metrics_response(b"POST /metrics HTTP/1.1\r\n\r\n", &m).0, "405 Method Not Allowed");
        assert_eq!(metrics_response(b"\x16\x03\x01garbage", &m).0, "400 Bad Request");
        assert_eq!(metrics_response(b"", &m).0, "400 Bad Request");
        assert_eq!(metrics_addr("9477").expect("port"), "127.0.0.1:9477".parse().expect("addr"));
        assert_eq!(metrics_addr(":9477").expect("port"), "127.0.0.1:9477".parse().expect("addr"));
        assert_eq!(metrics_addr("0.0.0.0:9477").expect("addr"), "0.0.0.0:9477".parse().expect("addr"));
        assert!(metrics_addr("localhost:x").is_err());
    }
}
