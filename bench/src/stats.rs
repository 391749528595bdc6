//! Fixed-bounds latency histograms: a value outside the bounds is a bug in the benchmark, not
//! something to resize around (Neon pagebench).

use std::time::Duration;

use hdrhistogram::Histogram;
use serde::Serialize;

/// Latencies from 1 µs to 100 s at 3 significant digits.
pub(crate) fn histogram() -> Histogram<u64> {
    Histogram::new_with_bounds(1, 100_000_000, 3).expect("valid bounds")
}

pub(crate) fn record(h: &mut Histogram<u64>, latency: Duration) {
    let us = u64::try_from(latency.as_micros())
        .unwrap_or(u64::MAX)
        .max(1);
    h.record(us)
        .expect("latency within the histogram's fixed bounds");
}

/// Percentiles of one run, in microseconds.
#[derive(Clone, Copy, Debug, Serialize)]
pub(crate) struct Summary {
    pub p50_us: u64,
    pub p99_us: u64,
    pub p999_us: u64,
    pub(crate) max_us: u64,
    pub(crate) ops_per_s: f64,
    pub(crate) count: u64,
}

impl Summary {
    pub(crate) fn of(h: &Histogram<u64>, elapsed: Duration) -> Self {
        Self {
            p50_us: h.value_at_quantile(0.50),
            p99_us: h.value_at_quantile(0.99),
            p999_us: h.value_at_quantile(0.999),
            max_us: h.max(),
            ops_per_s: h.len() as f64 / elapsed.as_secs_f64().max(1e-9),
            count: h.len(),
        }
    }

    pub(crate) fn line(&self, label: &str) -> String {
        format!(
            "{label:<44} p50 {:>6} µs  p99 {:>6} µs  p99.9 {:>6} µs  max {:>7} µs  {:>9.0} ops/s  (n={})",
            self.p50_us, self.p99_us, self.p999_us, self.max_us, self.ops_per_s, self.count
        )
    }
}

/// Logs to stderr at `level` (RUST_LOG overrides it): the engine reports lost nodes and
/// refused appends through tracing.
pub(crate) fn init_tracing(level: &str) {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new(level));
    let _ = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .try_init();
}
