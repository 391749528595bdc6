//! The node's Prometheus metrics: the families (`prometheus-client`), what feeds them, and the
//! HTTP endpoint that serves them (`metrics_listen` in `node.toml`; off unless set).
//!
//! Who feeds what:
//! - the driver observes the latency histograms where it already has the times (a frame's
//!   arrival and its Ack; a group's submission and its durable completion) and the group
//!   sizes, on its own task, with its `Clock`;
//! - on every scrape, the driver copies the core's [`NodeStats`] (SCL per segment, journal
//!   position, groups formed) into the gauges and counters ([`NodeMetrics::publish`]), between
//!   two inputs: a scrape costs the append path one snapshot, never a lock held across I/O;
//! - families that background work will feed (scrub) are defined now and read 0 until that
//!   work exists.
//!
//! Invariants:
//! - the exposition is always `prometheus-client`'s own text encoder (OpenMetrics text), never
//!   a hand-written format;
//! - the HTTP server answers `GET /metrics` and nothing else (404), holds at most
//!   [`SCRAPE_CONNECTIONS_MAX`] connections, encodes off the runtime thread, and never waits
//!   for the driver longer than [`REFRESH_TIMEOUT`] (a stalled driver still gets scraped, with
//!   the last values it published: exactly when metrics matter most);
//! - the server stops with the node: its task owns every connection task, and aborting it
//!   aborts them all.

use std::collections::BTreeSet;
use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::atomic::AtomicU64;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use http_body_util::Full;
use hyper::body::Incoming;
use hyper::{Method, Request, Response, StatusCode};
use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{Histogram, exponential_buckets};
use prometheus_client::registry::{Registry, Unit};
use tokio::sync::Semaphore;

use crate::core::NodeStats;
use crate::driver::DriverHandle;
use crate::manifest::SegmentKey;

/// Scrape connections served at once; more wait to be accepted.
pub const SCRAPE_CONNECTIONS_MAX: usize = 8;
/// How long a scrape waits for the driver to publish the core's counters.
pub const REFRESH_TIMEOUT: Duration = Duration::from_secs(1);
/// How long a connection may take to send its request headers.
const HEADER_READ_TIMEOUT: Duration = Duration::from_secs(10);
/// The exposition's content type (what `prometheus-client`'s text encoder writes).
const CONTENT_TYPE: &str = "application/openmetrics-text; version=1.0.0; charset=utf-8";

/// Labels of a per-segment series.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct SegmentLabels {
    pub volume: u64,
    pub pg: u32,
    pub segment: u32,
}

impl From<SegmentKey> for SegmentLabels {
    fn from(key: SegmentKey) -> Self {
        Self {
            volume: key.volume.0,
            pg: key.pg.0,
            segment: key.segment.0,
        }
    }
}

type U64Gauge = Gauge<u64, AtomicU64>;

/// Every metric family of a node, and the registry that encodes them.
#[derive(Debug)]
pub struct NodeMetrics {
    registry: Registry,
    /// Receive → Ack of an append, as the driver sees it.
    pub append_seconds: Histogram,
    /// Journal group submitted → durable.
    pub persist_seconds: Histogram,
    /// Receive → Page reply of a ReadPage, as the driver sees it.
    pub read_page_seconds: Histogram,
    /// Appends per journal group.
    pub group_appends: Histogram,
    /// Bytes per journal group on disk (header and padding included).
    pub group_bytes: Histogram,
    pub segment_scl: Family<SegmentLabels, U64Gauge>,
    pub segment_records: Family<SegmentLabels, U64Gauge>,
    pub segment_materialized_lsn: Family<SegmentLabels, U64Gauge>,
    pub journal_groups: Counter,
    pub journal_bytes_used: U64Gauge,
    pub journal_bytes_free: U64Gauge,
    pub appends_queued: U64Gauge,
    pub append_oldest_waiting_seconds: Gauge<f64, AtomicU64>,
    pub page_store_bytes: U64Gauge,
    pub gossip_gaps: U64Gauge,
    pub gossip_records_fetched: Counter,
    pub coalesce_backlog_records: U64Gauge,
    pub gc_runs: Counter,
    pub scrub_pages_checked: Counter,
    pub scrub_records_checked: Counter,
    pub scrub_damaged: Counter,
    pub scrub_repaired: Counter,
    pub acks_throttled: Counter,
    /// 1 while the node delays its acks (back-pressure), else 0.
    pub throttled: U64Gauge,
    /// Acks being held back now.
    pub acks_held: U64Gauge,
    pub backup_lag_bytes: U64Gauge,
    pub backup_objects: Counter,
    pub backup_bytes: Counter,
    pub backup_failures: Counter,
    /// Segments with a series, so a segment no longer hosted loses its series.
    exported: Mutex<BTreeSet<SegmentKey>>,
}

/// Latency buckets from 50 µs to about 3.3 s (doubling).
fn latency_seconds() -> Histogram {
    Histogram::new(exponential_buckets(50e-6, 2.0, 17))
}

impl Default for NodeMetrics {
    fn default() -> Self {
        Self::new()
    }
}

impl NodeMetrics {
    pub fn new() -> Self {
        let mut m = Self {
            registry: Registry::default(),
            append_seconds: latency_seconds(),
            persist_seconds: latency_seconds(),
            read_page_seconds: latency_seconds(),
            // 1 to 4096 appends, 4 KiB to 16 MiB (doubling).
            group_appends: Histogram::new(exponential_buckets(1.0, 2.0, 13)),
            group_bytes: Histogram::new(exponential_buckets(4096.0, 2.0, 13)),
            segment_scl: Family::default(),
            segment_records: Family::default(),
            segment_materialized_lsn: Family::default(),
            journal_groups: Counter::default(),
            journal_bytes_used: U64Gauge::default(),
            journal_bytes_free: U64Gauge::default(),
            appends_queued: U64Gauge::default(),
            append_oldest_waiting_seconds: Gauge::default(),
            page_store_bytes: U64Gauge::default(),
            gossip_gaps: U64Gauge::default(),
            gossip_records_fetched: Counter::default(),
            coalesce_backlog_records: U64Gauge::default(),
            gc_runs: Counter::default(),
            scrub_pages_checked: Counter::default(),
            scrub_records_checked: Counter::default(),
            scrub_damaged: Counter::default(),
            scrub_repaired: Counter::default(),
            acks_throttled: Counter::default(),
            throttled: U64Gauge::default(),
            acks_held: U64Gauge::default(),
            backup_lag_bytes: U64Gauge::default(),
            backup_objects: Counter::default(),
            backup_bytes: Counter::default(),
            backup_failures: Counter::default(),
            exported: Mutex::new(BTreeSet::new()),
        };
        m.register_foreground();
        m.register_background();
        m.register_scrub();
        m.register_segments();
        m.register_backpressure();
        m.register_backup();
        m
    }

    /// Backup's families.
    fn register_backup(&mut self) {
        let r = &mut self.registry;
        r.register_with_unit(
            "node_backup_lag",
            "Bytes of journal records not yet backed up (the largest over hosted segments)",
            Unit::Bytes,
            self.backup_lag_bytes.clone(),
        );
        r.register_with_unit(
            "node_backup_log",
            "Bytes of records uploaded in log objects",
            Unit::Bytes,
            self.backup_bytes.clone(),
        );
        let counters: [(&str, &str, &Counter); 2] = [
            (
                "node_backup_objects",
                "Backup objects uploaded (log ranges, snapshot batches and snapshot ends)",
                &self.backup_objects,
            ),
            (
                "node_backup_failures",
                "Backup jobs that failed (retried later)",
                &self.backup_failures,
            ),
        ];
        for (name, help, counter) in counters {
            r.register(name, help, counter.clone());
        }
    }

    /// The append path's families.
    fn register_foreground(&mut self) {
        let r = &mut self.registry;
        let s = Unit::Seconds;
        r.register_with_unit(
            "node_append",
            "Append received to its Ack sent",
            s.clone(),
            self.append_seconds.clone(),
        );
        r.register_with_unit(
            "node_persist",
            "Journal group submitted to durable",
            s.clone(),
            self.persist_seconds.clone(),
        );
        r.register_with_unit(
            "node_read_page",
            "ReadPage received to its page sent (page store, journal and redo applied)",
            s.clone(),
            self.read_page_seconds.clone(),
        );
        r.register(
            "node_group_appends",
            "Appends per journal group",
            self.group_appends.clone(),
        );
        r.register_with_unit(
            "node_group",
            "Bytes per journal group on disk",
            Unit::Bytes,
            self.group_bytes.clone(),
        );
        r.register(
            "node_journal_groups",
            "Journal groups formed since the node started",
            self.journal_groups.clone(),
        );
        r.register(
            "node_appends_queued",
            "Appends waiting for the next journal group",
            self.appends_queued.clone(),
        );
        r.register_with_unit(
            "node_append_oldest_waiting",
            "How long the oldest append not yet durable has waited (0: none waits)",
            s,
            self.append_oldest_waiting_seconds.clone(),
        );
    }

    /// Scrub's counters.
    fn register_scrub(&mut self) {
        let counters: [(&str, &str, &Counter); 4] = [
            (
                "node_scrub_pages_checked",
                "Page-store pages re-read and verified by scrub",
                &self.scrub_pages_checked,
            ),
            (
                "node_scrub_records_checked",
                "Journal records re-read and verified by scrub",
                &self.scrub_records_checked,
            ),
            (
                "node_scrub_damaged",
                "Damaged pages and journal records found (by scrub or a read)",
                &self.scrub_damaged,
            ),
            (
                "node_scrub_repaired",
                "Damaged pages and journal records replaced from a peer",
                &self.scrub_repaired,
            ),
        ];
        for (name, help, counter) in counters {
            self.registry.register(name, help, counter.clone());
        }
    }

    /// Segment, journal and background families (gossip, coalescing, GC, scrub and throttling
    /// read 0 until that work exists).
    fn register_background(&mut self) {
        let r = &mut self.registry;
        let gauges: [(&str, &str, &U64Gauge); 5] = [
            (
                "node_journal_bytes_used",
                "Journal bytes in use",
                &self.journal_bytes_used,
            ),
            (
                "node_journal_bytes_free",
                "Journal bytes free for new groups",
                &self.journal_bytes_free,
            ),
            (
                "node_page_store_bytes",
                "Bytes of the page store on disk",
                &self.page_store_bytes,
            ),
            (
                "node_gossip_gaps",
                "Missing LSN ranges over all hosted segments",
                &self.gossip_gaps,
            ),
            (
                "node_coalesce_backlog_records",
                "Records not yet coalesced into the page store",
                &self.coalesce_backlog_records,
            ),
        ];
        for (name, help, gauge) in gauges {
            r.register(name, help, gauge.clone());
        }
        let counters: [(&str, &str, &Counter); 2] = [
            (
                "node_gossip_records_fetched",
                "Records fetched from peers by gossip",
                &self.gossip_records_fetched,
            ),
            ("node_gc_runs", "Garbage-collection passes", &self.gc_runs),
        ];
        for (name, help, counter) in counters {
            r.register(name, help, counter.clone());
        }
    }

    /// Per-segment families (one series per hosted segment).
    fn register_segments(&mut self) {
        let r = &mut self.registry;
        r.register(
            "node_segment_scl",
            "Segment complete LSN of each hosted segment",
            self.segment_scl.clone(),
        );
        r.register(
            "node_segment_records",
            "Records indexed by each hosted segment",
            self.segment_records.clone(),
        );
        r.register(
            "node_segment_materialized_lsn",
            "LSN through which each hosted segment's records are coalesced into the page store",
            self.segment_materialized_lsn.clone(),
        );
    }

    /// Back-pressure's families (see `core::throttle`).
    fn register_backpressure(&mut self) {
        let r = &mut self.registry;
        r.register(
            "node_acks_throttled",
            "Acks delayed by back-pressure",
            self.acks_throttled.clone(),
        );
        r.register(
            "node_throttled",
            "1 while back-pressure delays the node's acks, else 0",
            self.throttled.clone(),
        );
        r.register(
            "node_acks_held",
            "Acks held back by back-pressure now",
            self.acks_held.clone(),
        );
    }

    /// Copies the core's counters in (the driver calls this between two inputs).
    pub fn publish(&self, stats: &NodeStats, oldest_waiting: Option<Duration>) {
        assert!(stats.journal_bytes_used <= stats.journal_bytes_capacity);
        let formed = stats.groups_formed;
        let counted = self.journal_groups.get();
        // Counters only grow: the core's total is the truth, the counter follows it.
        self.journal_groups.inc_by(formed.saturating_sub(counted));
        self.journal_bytes_used.set(stats.journal_bytes_used);
        self.journal_bytes_free
            .set(stats.journal_bytes_capacity - stats.journal_bytes_used);
        self.appends_queued.set(stats.appends_queued);
        self.coalesce_backlog_records
            .set(stats.coalesce_backlog_records);
        self.gossip_gaps.set(stats.gossip_gaps);
        let fetched = stats.gossip_records_fetched;
        self.gossip_records_fetched
            .inc_by(fetched.saturating_sub(self.gossip_records_fetched.get()));
        let scrub = &stats.scrub;
        let follow = |counter: &Counter, total: u64| {
            counter.inc_by(total.saturating_sub(counter.get()));
        };
        follow(&self.scrub_pages_checked, scrub.pages_checked);
        follow(&self.scrub_records_checked, scrub.records_checked);
        follow(
            &self.scrub_damaged,
            scrub.pages_damaged + scrub.records_damaged,
        );
        follow(
            &self.scrub_repaired,
            scrub.pages_repaired + scrub.records_repaired,
        );
        let gc_runs = stats.background.gc_runs;
        self.gc_runs
            .inc_by(gc_runs.saturating_sub(self.gc_runs.get()));
        self.append_oldest_waiting_seconds
            .set(oldest_waiting.map_or(0.0, |d| d.as_secs_f64()));
        let t = &stats.throttle;
        self.acks_throttled
            .inc_by(t.acks_throttled.saturating_sub(self.acks_throttled.get()));
        self.throttled.set(u64::from(t.throttled));
        self.acks_held.set(t.acks_held);
        let b = &stats.backup;
        self.backup_lag_bytes.set(b.lag_bytes);
        follow(
            &self.backup_objects,
            b.log_objects + b.snapshot_batches + b.snapshots,
        );
        follow(&self.backup_bytes, b.log_bytes);
        follow(&self.backup_failures, b.failures);
        let mut exported = self.exported.lock().expect("exported lock");
        let now: BTreeSet<SegmentKey> = stats.segments.iter().map(|s| s.key).collect();
        for gone in exported.difference(&now) {
            self.segment_scl.remove(&SegmentLabels::from(*gone));
            self.segment_records.remove(&SegmentLabels::from(*gone));
            self.segment_materialized_lsn
                .remove(&SegmentLabels::from(*gone));
        }
        for s in &stats.segments {
            let labels = SegmentLabels::from(s.key);
            self.segment_scl.get_or_create(&labels).set(s.scl.0);
            self.segment_records.get_or_create(&labels).set(s.records);
            self.segment_materialized_lsn
                .get_or_create(&labels)
                .set(s.materialized.0);
        }
        *exported = now;
        assert!(exported.len() == stats.segments.len());
    }

    /// The exposition, as `prometheus-client`'s text encoder writes it.
    pub fn encode(&self) -> String {
        let mut text = String::new();
        prometheus_client::encoding::text::encode(&mut text, &self.registry)
            .expect("writing to a String cannot fail");
        assert!(text.ends_with("# EOF\n"));
        text
    }
}

/// Binds the metrics listener (before the node says it is ready, so a bad address is a
/// startup error).
pub async fn bind(addr: SocketAddr) -> anyhow::Result<tokio::net::TcpListener> {
    tokio::net::TcpListener::bind(addr)
        .await
        .map_err(|e| anyhow::anyhow!("cannot listen for metrics on {addr} (metrics_listen): {e}"))
}

/// Serves `GET /metrics` on `listener` until the task is aborted.
pub async fn serve(listener: tokio::net::TcpListener, driver: DriverHandle) {
    let slots = Arc::new(Semaphore::new(SCRAPE_CONNECTIONS_MAX));
    let mut connections = tokio::task::JoinSet::new();
    loop {
        let slot = slots
            .clone()
            .acquire_owned()
            .await
            .expect("the semaphore is never closed");
        let (stream, peer) = match listener.accept().await {
            Ok(accepted) => accepted,
            Err(e) => {
                tracing::debug!("metrics: accept failed: {e}");
                tokio::time::sleep(Duration::from_millis(100)).await;
                continue;
            }
        };
        // Reap finished connections so the set stays as small as the connections open.
        while connections.try_join_next().is_some() {}
        let driver = driver.clone();
        connections.spawn(async move {
            let service = hyper::service::service_fn(move |request| {
                let driver = driver.clone();
                async move { Ok::<_, Infallible>(answer(&driver, &request).await) }
            });
            let served = hyper::server::conn::http1::Builder::new()
                .timer(hyper_util::rt::TokioTimer::new())
                .header_read_timeout(HEADER_READ_TIMEOUT)
                .serve_connection(hyper_util::rt::TokioIo::new(stream), service)
                .await;
            if let Err(e) = served {
                tracing::debug!("metrics: connection from {peer}: {e}");
            }
            drop(slot);
        });
    }
}

/// `GET /metrics` gets the exposition; anything else gets 404 (or 405 for another method).
async fn answer(driver: &DriverHandle, request: &Request<Incoming>) -> Response<Full<Bytes>> {
    if request.uri().path() != "/metrics" {
        return plain(
            StatusCode::NOT_FOUND,
            "not found: only /metrics is served\n",
        );
    }
    if request.method() != Method::GET && request.method() != Method::HEAD {
        return plain(StatusCode::METHOD_NOT_ALLOWED, "only GET /metrics\n");
    }
    if !driver.refresh_metrics(REFRESH_TIMEOUT).await {
        tracing::debug!("metrics: the driver did not publish within {REFRESH_TIMEOUT:?}");
    }
    let metrics = driver.metrics().clone();
    // Encoding is CPU work: off the runtime thread that carries the appends.
    let text = match tokio::task::spawn_blocking(move || metrics.encode()).await {
        Ok(text) => text,
        Err(e) => return plain(StatusCode::INTERNAL_SERVER_ERROR, &format!("{e}\n")),
    };
    Response::builder()
        .status(StatusCode::OK)
        .header(hyper::header::CONTENT_TYPE, CONTENT_TYPE)
        .body(Full::new(Bytes::from(text)))
        .expect("a valid response")
}

fn plain(status: StatusCode, text: &str) -> Response<Full<Bytes>> {
    Response::builder()
        .status(status)
        .header(hyper::header::CONTENT_TYPE, "text/plain; charset=utf-8")
        .body(Full::new(Bytes::from(text.to_string())))
        .expect("a valid response")
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::core::SegmentStats;
    use wire::{Lsn, PgId, SegmentIndex, VolumeId};

    /// Goal: every documented family is in the exposition, with its units last, and the
    /// core's counters land in it. Method: publish a snapshot, encode, look for each name.
    #[test]
    fn every_family_is_exposed_with_units_last() {
        let m = NodeMetrics::new();
        let key = SegmentKey {
            volume: VolumeId(7),
            pg: PgId(2),
            segment: SegmentIndex(5),
        };
        let stats = NodeStats {
            groups_formed: 3,
            journal_bytes_used: 8192,
            journal_bytes_capacity: 65536,
            segments: vec![SegmentStats {
                key,
                scl: Lsn(42),
                records: 9,
                materialized: Lsn(40),
            }],
            ..NodeStats::default()
        };
        m.publish(&stats, None);
        m.append_seconds.observe(0.001);
        let text = m.encode();
        for name in [
            "node_append_seconds_count 1",
            "node_persist_seconds_count 0",
            "node_group_appends_count",
            "node_group_bytes_count",
            "node_segment_scl{volume=\"7\",pg=\"2\",segment=\"5\"} 42",
            "node_segment_materialized_lsn{volume=\"7\",pg=\"2\",segment=\"5\"} 40",
            "node_journal_bytes_used 8192",
            "node_journal_bytes_free 57344",
            "node_page_store_bytes 0",
            "node_journal_groups_total 3",
            "node_gossip_gaps 0",
            "node_gossip_records_fetched_total 0",
            "node_coalesce_backlog_records 0",
            "node_gc_runs_total 0",
            "node_scrub_pages_checked_total 0",
            "node_scrub_repaired_total 0",
            "node_acks_throttled_total 0",
            "node_throttled 0",
            "node_acks_held 0",
        ] {
            assert!(text.contains(name), "{name} missing from:\n{text}");
        }
    }
}
