//! The paused side of `soak`'s background comparison: the soak's load for `--compare-seconds`
//! on a fresh six-node cluster whose nodes run with `[background] paused = true`, so nothing is
//! coalesced or collected and only the foreground path runs.
//!
//! Invariants: the journal is sized from the soak's own commit rate and journal bytes per
//! commit, with a margin, so the phase cannot fill it; should it still reach
//! [`JOURNAL_USED_PERCENT_STOP`] (below the 75 % reserve, from which some appends are
//! refused) the phase ends early and says so; the cluster is stopped before returning.

use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use serde::Serialize;
use tools::cluster::LocalCluster;

use crate::soak::{self, Load, SoakArgs, Window, WindowStart};

/// Journal use (percent) at which the phase stops early.
const JOURNAL_USED_PERCENT_STOP: f64 = 70.0;
/// Load before the measured seconds (connections, allocator, the nodes' queues).
const WARMUP: Duration = Duration::from_secs(2);
/// A fresh cluster may commit faster than the soaked one: room for twice its rate.
const RATE_MARGIN: f64 = 2.0;
/// Journal fraction the phase's writes are sized to fill at most.
const JOURNAL_FILL_SIZED: f64 = 0.6;
/// Disk kept free beside the journals.
const DISK_MARGIN_BYTES: u64 = 1 << 30;

/// The paused side's latency, and how full its journal got.
#[derive(Clone, Copy, Debug, Serialize)]
pub(crate) struct Paused {
    #[serde(flatten)]
    pub(crate) window: Window,
    /// Each node's journal, bytes.
    pub(crate) journal_bytes: u64,
    /// The most of node1's journal in use at any second of the phase, percent.
    pub(crate) journal_used_percent_max: Option<f64>,
    /// Whether the phase ended before `--compare-seconds` because the journal was filling.
    pub(crate) stopped_early: bool,
    /// Transactions that failed during the phase (warm-up included).
    pub(crate) errors: u64,
}

/// Each node's journal for `seconds` of commits at `rate_margin` times the soak's rate (and
/// its journal bytes per commit), filling at most `fill` of it.
pub(crate) fn journal_bytes(
    args: &SoakArgs,
    rate: &Window,
    (seconds, rate_margin): (f64, f64),
    fill: f64,
) -> u64 {
    assert!(fill > 0.0 && fill < 1.0);
    let per_commit = rate
        .journal_bytes_per_commit
        .unwrap_or((args.record_bytes + 4096) as f64);
    let commits = rate.summary.ops_per_s * seconds * rate_margin;
    let bytes = (commits * per_commit / fill) as u64;
    bytes.max(32 << 20).next_multiple_of(soak::FILE_BYTES)
}

/// Fails with one line if six journals of `journal_bytes` do not fit on the disk of `dir`.
pub(crate) fn check_disk(dir: &Path, journal_bytes: u64, flag: &str) -> anyhow::Result<()> {
    let parent = dir.parent().unwrap_or(dir);
    let free = crate::recovery::free_bytes(parent)?;
    let needed = 6 * journal_bytes + DISK_MARGIN_BYTES;
    anyhow::ensure!(
        free >= needed,
        "this phase needs six journals of {:.2} GiB and 1 GiB spare, but {} has {:.1} GiB free: \
         pass a smaller {flag}",
        journal_bytes as f64 / f64::from(1 << 30),
        parent.display(),
        free as f64 / f64::from(1 << 30)
    );
    Ok(())
}

pub(crate) async fn measure(args: &SoakArgs, dir: &Path, rate: &Window) -> anyhow::Result<Paused> {
    let seconds = args.compare_seconds as f64 + WARMUP.as_secs_f64();
    let journal_bytes = journal_bytes(args, rate, (seconds, RATE_MARGIN), JOURNAL_FILL_SIZED);
    check_disk(dir, journal_bytes, "--compare-seconds")?;
    let mut options = soak::cluster_options(journal_bytes);
    options.background_paused = true;
    soak::progress(
        args,
        &format!(
            "background paused: starting 6 fresh sixfold-nodes with [background] paused = true, \
             journals of {} MiB …",
            journal_bytes >> 20
        ),
    );
    let mut cluster = LocalCluster::start(dir, &options).await?;
    let volume = Arc::new(cluster.attach(engine::VolumeConfig::default()).await?);
    let load = Load::start(volume, args.inflight, args.record_bytes);
    tokio::time::sleep(WARMUP).await;
    let _ = load.take_latencies();
    soak::progress(
        args,
        &format!(
            "background paused: the same load for {} s …",
            args.compare_seconds
        ),
    );
    let node1 = cluster.metrics_addr(0);
    let start = WindowStart::now(&load, node1).await;
    let mut latencies = crate::stats::histogram();
    let (mut used_max, mut stopped_early) = (None::<f64>, false);
    for _ in 0..args.compare_seconds {
        tokio::time::sleep(Duration::from_secs(1)).await;
        latencies.add(load.take_latencies()).expect("same bounds");
        let used = journal_used_percent(node1).await;
        used_max = match (used_max, used) {
            (Some(a), Some(b)) => Some(a.max(b)),
            (a, b) => a.or(b),
        };
        if used.is_some_and(|u| u >= JOURNAL_USED_PERCENT_STOP) {
            eprintln!(
                "warning: background paused: node1's journal is {:.0} % full; the phase ends \
                 early",
                used.unwrap_or_default()
            );
            stopped_early = true;
            break;
        }
    }
    let window = start.finish(&load, &latencies, args.record_bytes).await;
    let (_, errors) = load.stop().await?;
    cluster.stop()?;
    Ok(Paused {
        window,
        journal_bytes,
        journal_used_percent_max: used_max,
        stopped_early,
        errors,
    })
}

/// Percent of the node's journal in use, from its metrics.
async fn journal_used_percent(node: Option<std::net::SocketAddr>) -> Option<f64> {
    let metrics = tools::scrape::scrape(node?).await.ok()?;
    let used = metrics.value("node_journal_bytes_used")?;
    let free = metrics.value("node_journal_bytes_free")?;
    Some(100.0 * used / (used + free).max(1.0))
}

impl Paused {
    pub(crate) fn print(&self) {
        let label = format!("commit, background paused ({:.0} s)", self.window.seconds);
        println!("{}", self.window.summary.line(&label));
        println!(
            "    {:.1} MB/s appended per node; {} errors; journal of {} MiB, at most {} used{}",
            self.window.append_mb_per_s,
            self.errors,
            self.journal_bytes >> 20,
            self.journal_used_percent_max
                .map_or("? %".to_string(), |u| format!("{u:.0} %")),
            if self.stopped_early {
                " (stopped early: the journal was filling)"
            } else {
                ""
            }
        );
    }
}
