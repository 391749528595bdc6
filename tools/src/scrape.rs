//! Reading a node's Prometheus metrics (`metrics_listen`), as an operator's scraper would: one
//! HTTP/1.1 GET over a fresh connection, the body parsed by `prometheus-parse` (the parser the
//! metrics test uses), never by string matching.
//!
//! Invariants: a scrape never waits longer than [`SCRAPE_TIMEOUT`]; a missing series is `None`,
//! never a zero.

use std::net::SocketAddr;
use std::time::Duration;

use anyhow::Context;
use prometheus_parse::{Scrape, Value};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

/// How long one scrape may take, connection to last byte.
pub const SCRAPE_TIMEOUT: Duration = Duration::from_secs(5);
/// Bytes of a response at most (a node with a few segments sends a few KiB).
const RESPONSE_BYTES_MAX: u64 = 4 << 20;

/// The node's metrics at `addr`.
pub async fn scrape(addr: SocketAddr) -> anyhow::Result<Metrics> {
    let body = tokio::time::timeout(SCRAPE_TIMEOUT, get_metrics(addr))
        .await
        .with_context(|| format!("scraping {addr} took more than {SCRAPE_TIMEOUT:?}"))??;
    let scrape = Scrape::parse(body.lines().map(|l| Ok(l.to_string())))
        .with_context(|| format!("the metrics of {addr} do not parse"))?;
    Ok(Metrics(scrape))
}

async fn get_metrics(addr: SocketAddr) -> anyhow::Result<String> {
    let mut stream = tokio::net::TcpStream::connect(addr)
        .await
        .with_context(|| format!("cannot connect to the metrics of {addr}"))?;
    let request = format!("GET /metrics HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n\r\n");
    stream.write_all(request.as_bytes()).await?;
    let mut response = String::new();
    (&mut stream)
        .take(RESPONSE_BYTES_MAX)
        .read_to_string(&mut response)
        .await?;
    let (head, body) = response
        .split_once("\r\n\r\n")
        .with_context(|| format!("{addr} sent no HTTP header"))?;
    let status = head.lines().next().unwrap_or_default();
    anyhow::ensure!(status.contains(" 200"), "{addr}/metrics answered {status}");
    Ok(body.to_string())
}

/// One scrape's samples.
pub struct Metrics(Scrape);

impl Metrics {
    /// The value of the one unlabelled sample `name` (a counter, gauge or untyped value).
    pub fn value(&self, name: &str) -> Option<f64> {
        self.0
            .samples
            .iter()
            .find(|s| s.metric == name)
            .and_then(|s| number(&s.value))
    }

    /// Per segment `(pg, segment)`, the value of the per-segment family `name` (one volume).
    pub fn per_segment(&self, name: &str) -> Vec<((u32, u32), u64)> {
        self.0
            .samples
            .iter()
            .filter(|s| s.metric == name)
            .filter_map(|s| {
                let pg = s.labels.get("pg")?.parse().ok()?;
                let segment = s.labels.get("segment")?.parse().ok()?;
                Some(((pg, segment), number(&s.value)? as u64))
            })
            .collect()
    }
}

fn number(value: &Value) -> Option<f64> {
    match value {
        Value::Counter(v) | Value::Gauge(v) | Value::Untyped(v) => Some(*v),
        _ => None,
    }
}
