//! `sixfold-bench soak`: six nodes and a writer committing without pause until at least
//! `--journals` times one node's journal has been written (and at least `--seconds` have
//! passed), printing each node's disk use and the commit p99 of every interval. Nodes must
//! coalesce and recycle their journals to get through it: disk use should stay flat after the
//! first garbage collection and no commit may fail.
//!
//! Then, in the same run:
//! - **background on vs paused** (`--compare-seconds N`): commit latency over N more seconds
//!   of the same load on the soaked cluster (background work running, journals recycling),
//!   against N seconds on a fresh cluster whose nodes run with `[background] paused = true`
//!   (nothing coalesced or collected; its journal is sized from the soak's own rate so those
//!   seconds cannot fill it, and the phase ends early, saying so, if it ever gets 70 % full);
//!   see [`crate::soak_paused`];
//! - **catch-up** (`--catch-up-down-seconds D`): a node killed for D seconds under the same
//!   load and restarted, on a fresh cluster whose journals hold what it misses; how fast its
//!   SCLs reach the others' (see [`crate::catch_up`]).
//!
//! Targets (read, never asserted): disk use max / disk use after the first GC ≤ 1.1, zero
//! errors, commit p99 with background on ≤ 1.2 × paused, catch-up ≥ 50 % of the node's own
//! append throughput. `--json`: `{"journal_bytes", "written_bytes", "disk_bytes_after_first_gc",
//! "disk_bytes_max", "errors", "commit_p99_us_max_interval", "append_mb_per_s",
//! "background_on": {"p99_us", …}, "background_paused": {"p99_us", …}, "catch_up_mb_per_s",
//! "catch_up_records_per_s", "catch_up": {…}}`.

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::Context;
use engine::quorum::MtrRecord;
use engine::{VolumeClient, VolumeConfig};
use hdrhistogram::Histogram;
use serde::Serialize;
use serde_json::json;
use tokio::task::JoinHandle;
use tools::cluster::{ClusterOptions, LocalCluster, disk_bytes};
use wire::{PageId, RedoOp};

use crate::catch_up::CatchUp;
use crate::stats::Summary;

#[derive(clap::Args, Debug)]
pub(crate) struct SoakArgs {
    /// Directory on the disk under test: the clusters go under DIR/soak-<pid>, removed at the
    /// end (kept, with the nodes' logs, if anything failed).
    #[arg(long)]
    pub(crate) dir: PathBuf,
    /// Run at least this long.
    #[arg(long, default_value_t = 60)]
    pub(crate) seconds: u64,
    /// Write at least this many times one node's journal.
    #[arg(long, default_value_t = 10)]
    pub(crate) journals: u64,
    /// Each node's journal, in MiB (files of 8 MiB).
    #[arg(long, default_value_t = 128)]
    pub(crate) journal_mib: u64,
    /// Transactions in flight.
    #[arg(long, default_value_t = 16)]
    pub(crate) inflight: usize,
    /// Bytes each one-record transaction writes.
    #[arg(long, default_value_t = 4096)]
    pub(crate) record_bytes: usize,
    /// Seconds of each side of the background comparison: with background work on (after the
    /// soak, same cluster), then paused (a fresh cluster). 0: skip it.
    #[arg(long, default_value_t = 10)]
    pub(crate) compare_seconds: u64,
    /// Seconds a node stays down under load before it is restarted and its catch-up is timed
    /// (on a fresh cluster whose journals hold what it misses). 0: skip it.
    #[arg(long, default_value_t = 30)]
    pub(crate) catch_up_down_seconds: u64,
    /// Print one JSON object instead of the table.
    #[arg(long)]
    pub(crate) json: bool,
}

pub(crate) const FILE_BYTES: u64 = 8 << 20;
const PAGE_BYTES: u32 = 8192;
const PG_COUNT: u32 = 4;
/// Pages written (spread over the PGs): the volume's pages bound the page stores.
const PAGES: u64 = 1024;
/// A transaction that takes longer than this means the cluster stalled: count it, go on.
const TXN_TIMEOUT: Duration = Duration::from_secs(30);
/// The ratio of commit p99s (background on / paused) the target allows.
const BACKGROUND_RATIO_MAX: f64 = 1.2;

impl SoakArgs {
    pub(crate) fn deadline_default(&self) -> Duration {
        // Writing N journals at ≥ 2 MB/s, plus starting nodes (three clusters), plus the
        // comparison, and the catch-up phase (down, then up to four times as long to catch up).
        let bytes = self.journals * (self.journal_mib << 20);
        let phases = 3 * self.compare_seconds + 6 * self.catch_up_down_seconds;
        Duration::from_secs(900 + self.seconds * 3 + bytes / (2 << 20) + phases)
    }
}

/// The soak's cluster shape with `journal_bytes` of journal per node (files of
/// [`FILE_BYTES`]), serving metrics.
pub(crate) fn cluster_options(journal_bytes: u64) -> ClusterOptions {
    ClusterOptions {
        pg_count: PG_COUNT,
        page_size_bytes: PAGE_BYTES,
        segment_bytes: PAGES / u64::from(PG_COUNT) * u64::from(PAGE_BYTES),
        journal_file_bytes: FILE_BYTES,
        journal_file_count: u32::try_from(journal_bytes.div_ceil(FILE_BYTES).max(4))
            .unwrap_or(u32::MAX),
        metrics: true,
        ..ClusterOptions::default()
    }
}

/// One interval's figures.
struct Interval {
    at_s: f64,
    written: u64,
    commits: u64,
    p99_us: u64,
    disk_max: u64,
    gc_seen: bool,
}

/// Commit latency over a stretch of the load, and what each node appended meanwhile.
#[derive(Clone, Copy, Debug, Serialize)]
pub(crate) struct Window {
    #[serde(flatten)]
    pub(crate) summary: Summary,
    pub(crate) seconds: f64,
    /// Payload bytes each node appended (every node journals every record), MB (10^6) a second.
    pub(crate) append_mb_per_s: f64,
    /// Journal bytes per commit on node1 (group headers and padding included), if scraped.
    pub(crate) journal_bytes_per_commit: Option<f64>,
}

/// What the whole run measured.
struct Outcome {
    intervals: Vec<Interval>,
    errors: u64,
    written: u64,
    background_on: Option<Window>,
    background_paused: Option<crate::soak_paused::Paused>,
    catch_up: Option<CatchUp>,
}

pub(crate) fn run(args: &SoakArgs) -> anyhow::Result<()> {
    anyhow::ensure!(args.inflight > 0, "--inflight must be at least 1");
    anyhow::ensure!(
        args.journal_mib >= 32 && (args.journal_mib << 20).is_multiple_of(FILE_BYTES),
        "--journal-mib must be a multiple of 8 and at least 32"
    );
    anyhow::ensure!(
        (64..=PAGE_BYTES as usize).contains(&args.record_bytes),
        "--record-bytes must be between 64 and {PAGE_BYTES}"
    );
    anyhow::ensure!(
        args.compare_seconds <= 3600 && args.catch_up_down_seconds <= 3600,
        "--compare-seconds and --catch-up-down-seconds must be at most 3600"
    );
    crate::stats::init_tracing("warn");
    let run_dir = args.dir.join(format!("soak-{}", std::process::id()));
    std::fs::create_dir_all(&run_dir)
        .with_context(|| format!("cannot create {}", run_dir.display()))?;
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()?;
    let outcome = runtime
        .block_on(soak_all(args, &run_dir))
        .with_context(|| format!("(the clusters' logs are kept in {})", run_dir.display()))?;
    if let Err(e) = std::fs::remove_dir_all(&run_dir) {
        eprintln!("sixfold-bench: cannot remove {}: {e}", run_dir.display());
    }
    report(args, &outcome);
    Ok(())
}

/// The soak, then the paused side of the comparison, then the catch-up.
async fn soak_all(args: &SoakArgs, run_dir: &Path) -> anyhow::Result<Outcome> {
    let mut outcome = soak(args, run_dir).await?;
    let Some(rate) = outcome.background_on else {
        return Ok(outcome);
    };
    if args.compare_seconds > 0 {
        let dir = run_dir.join("paused");
        outcome.background_paused = Some(crate::soak_paused::measure(args, &dir, &rate).await?);
        remove_dir(&dir);
    }
    if args.catch_up_down_seconds > 0 {
        let dir = run_dir.join("catch-up");
        outcome.catch_up = Some(crate::catch_up::measure(args, &dir, &rate).await?);
        remove_dir(&dir);
    }
    Ok(outcome)
}

/// A phase's cluster directory, once the phase went well (its disk is needed by the next).
fn remove_dir(dir: &Path) {
    if let Err(e) = std::fs::remove_dir_all(dir) {
        eprintln!("sixfold-bench: cannot remove {}: {e}", dir.display());
    }
}

/// The soak itself, then the background-on window (its last `--compare-seconds`, or a few
/// seconds for the rate if the comparison is off and the catch-up is on).
async fn soak(args: &SoakArgs, run_dir: &Path) -> anyhow::Result<Outcome> {
    progress(
        args,
        &format!(
            "starting 6 sixfold-nodes, journals of {} MiB …",
            args.journal_mib
        ),
    );
    let mut cluster =
        LocalCluster::start(run_dir, &cluster_options(args.journal_mib << 20)).await?;
    let volume = Arc::new(cluster.attach(VolumeConfig::default()).await?);
    let load = Load::start(volume, args.inflight, args.record_bytes);
    crate::watchdog::phase("writing");
    let target = args.journals * (args.journal_mib << 20);
    let began = Instant::now();
    let mut intervals = Vec::new();
    let mut clock = IntervalClock::default();
    while began.elapsed() < Duration::from_secs(args.seconds) || load.written() < target {
        let (interval, _) = clock.next(run_dir, &load, began).await;
        if !args.json {
            print_interval(&interval);
        }
        intervals.push(interval);
    }
    let window_seconds = match (args.compare_seconds, args.catch_up_down_seconds) {
        (0, 0) => 0,
        (0, _) => 5,
        (n, _) => n,
    };
    let mut background_on = None;
    if window_seconds > 0 {
        crate::watchdog::phase("background on: the soaked cluster's commit latency");
        let node1 = cluster.metrics_addr(0);
        let before = WindowStart::now(&load, node1).await;
        let mut latencies = crate::stats::histogram();
        for _ in 0..window_seconds {
            let (interval, h) = clock.next(run_dir, &load, began).await;
            latencies.add(h).expect("same bounds");
            if !args.json {
                print_interval(&interval);
            }
            intervals.push(interval);
        }
        background_on = Some(before.finish(&load, &latencies, args.record_bytes).await);
    }
    let (written, errors) = load.stop().await?;
    cluster.stop()?;
    Ok(Outcome {
        intervals,
        errors,
        written,
        background_on,
        background_paused: None,
        catch_up: None,
    })
}

pub(crate) fn progress(args: &SoakArgs, message: &str) {
    crate::watchdog::phase(message);
    if !args.json {
        eprintln!("{message}");
    }
}

/// Samples the load once a second.
#[derive(Default)]
struct IntervalClock {
    last_commits: u64,
}

impl IntervalClock {
    /// Waits a second; returns that interval's figures and latencies (the load's histogram
    /// starts again).
    async fn next(
        &mut self,
        run_dir: &Path,
        load: &Load,
        began: Instant,
    ) -> (Interval, Histogram<u64>) {
        tokio::time::sleep(Duration::from_secs(1)).await;
        let latencies = load.take_latencies();
        let commits = load.commits();
        let disk_max = (0..6)
            .map(|i| disk_bytes(&run_dir.join(format!("node{}", i + 1))))
            .max()
            .unwrap_or(0);
        // The manifest gets a [journal] table once garbage collection first moves the start.
        let manifest =
            std::fs::read_to_string(run_dir.join("node1/manifest.toml")).unwrap_or_default();
        let interval = Interval {
            at_s: began.elapsed().as_secs_f64(),
            written: load.written(),
            commits: commits - self.last_commits,
            p99_us: latencies.value_at_quantile(0.99),
            disk_max,
            gc_seen: manifest.contains("[journal]"),
        };
        self.last_commits = commits;
        (interval, latencies)
    }
}

fn print_interval(interval: &Interval) {
    eprintln!(
        "t {:6.1} s  written {:8.1} MiB  commits/s {:6}  p99 {:7} µs  disk max {:7.1} MiB{}",
        interval.at_s,
        interval.written as f64 / f64::from(1 << 20),
        interval.commits,
        interval.p99_us,
        interval.disk_max as f64 / f64::from(1 << 20),
        if interval.gc_seen {
            "  (journal recycled)"
        } else {
            ""
        }
    );
}

/// Where a [`Window`] starts: the time, the commits so far and node1's journal bytes.
pub(crate) struct WindowStart {
    at: Instant,
    commits: u64,
    node1: Option<std::net::SocketAddr>,
    journal_bytes: Option<f64>,
}

impl WindowStart {
    pub(crate) async fn now(load: &Load, node1: Option<std::net::SocketAddr>) -> Self {
        let journal_bytes = journal_bytes_written(node1).await;
        Self {
            at: Instant::now(),
            commits: load.commits(),
            node1,
            journal_bytes,
        }
    }

    /// The window from here to now, with the latencies recorded in it.
    pub(crate) async fn finish(
        self,
        load: &Load,
        latencies: &Histogram<u64>,
        record_bytes: usize,
    ) -> Window {
        let elapsed = self.at.elapsed();
        let commits = load.commits() - self.commits;
        let journal_bytes = journal_bytes_written(self.node1).await;
        let journal_bytes_per_commit = self
            .journal_bytes
            .zip(journal_bytes)
            .filter(|_| commits > 0)
            .map(|(before, after)| (after - before) / commits as f64);
        Window {
            summary: Summary::of(latencies, elapsed),
            seconds: elapsed.as_secs_f64(),
            append_mb_per_s: (commits * record_bytes as u64) as f64
                / elapsed.as_secs_f64().max(1e-9)
                / 1e6,
            journal_bytes_per_commit,
        }
    }
}

/// Bytes of journal groups node1 has written since it started (`node_group_bytes_sum`).
async fn journal_bytes_written(node1: Option<std::net::SocketAddr>) -> Option<f64> {
    let metrics = tools::scrape::scrape(node1?).await.ok()?;
    metrics.value("node_group_bytes_sum")
}

/// The state a load's workers share.
struct LoadState {
    volume: Arc<VolumeClient>,
    stop: AtomicBool,
    written: AtomicU64,
    errors: AtomicU64,
    commits: AtomicU64,
    latencies: Mutex<Histogram<u64>>,
    record_bytes: usize,
}

/// A closed-loop load: `inflight` workers committing one-record MTRs back to back, each
/// transaction with a deadline; failures are counted, never waited on.
pub(crate) struct Load {
    state: Arc<LoadState>,
    workers: Vec<JoinHandle<()>>,
}

impl Load {
    pub(crate) fn start(volume: Arc<VolumeClient>, inflight: usize, record_bytes: usize) -> Self {
        assert!(inflight > 0);
        assert!(record_bytes <= PAGE_BYTES as usize);
        let state = Arc::new(LoadState {
            volume,
            stop: AtomicBool::new(false),
            written: AtomicU64::new(0),
            errors: AtomicU64::new(0),
            commits: AtomicU64::new(0),
            latencies: Mutex::new(crate::stats::histogram()),
            record_bytes,
        });
        let workers = (0..inflight as u64)
            .map(|w| tokio::spawn(worker(w, state.clone())))
            .collect();
        Self { state, workers }
    }

    pub(crate) fn commits(&self) -> u64 {
        self.state.commits.load(Ordering::Relaxed)
    }

    pub(crate) fn written(&self) -> u64 {
        self.state.written.load(Ordering::Relaxed)
    }

    /// The latencies recorded since the last call.
    pub(crate) fn take_latencies(&self) -> Histogram<u64> {
        let mut h = self.state.latencies.lock().expect("latencies lock");
        let taken = h.clone();
        h.reset();
        taken
    }

    /// Stops the workers (each finishes its transaction, bounded by [`TXN_TIMEOUT`]); returns
    /// the payload bytes written and the errors.
    pub(crate) async fn stop(self) -> anyhow::Result<(u64, u64)> {
        self.state.stop.store(true, Ordering::Relaxed);
        let Self { state, workers } = self;
        for worker in workers {
            worker.await.context("a load worker panicked")?;
        }
        Ok((
            state.written.load(Ordering::Relaxed),
            state.errors.load(Ordering::Relaxed),
        ))
    }
}

/// Commits one-record MTRs, one at a time, until told to stop; errors are counted.
async fn worker(w: u64, state: Arc<LoadState>) {
    let record_bytes = state.record_bytes;
    let mut i = 0u64;
    while !state.stop.load(Ordering::Relaxed) {
        i += 1;
        let page = PageId((w * 7919 + i * 104_729) % PAGES);
        let offset = ((i * 64) % (u64::from(PAGE_BYTES) - record_bytes as u64 + 1)) as u32;
        let record = MtrRecord {
            page,
            op: RedoOp::Write {
                offset,
                bytes: vec![(i % 251) as u8; record_bytes],
            },
        };
        let start = Instant::now();
        let done = tokio::time::timeout(TXN_TIMEOUT, async {
            let cpl = state.volume.write_mtr(vec![record]).await?;
            state.volume.commit(cpl).await
        })
        .await;
        match done {
            Ok(Ok(())) => {
                let elapsed = start.elapsed();
                crate::stats::record(&mut state.latencies.lock().expect("lock"), elapsed);
                state
                    .written
                    .fetch_add(record_bytes as u64, Ordering::Relaxed);
                state.commits.fetch_add(1, Ordering::Relaxed);
            }
            _ => {
                state.errors.fetch_add(1, Ordering::Relaxed);
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
        }
    }
}

fn report(args: &SoakArgs, outcome: &Outcome) {
    let intervals = &outcome.intervals;
    let journal_bytes = args.journal_mib << 20;
    let first_gc = intervals.iter().position(|i| i.gc_seen);
    let after_first_gc = first_gc.map_or(0, |at| intervals[at].disk_max);
    let max = first_gc.map_or(0, |at| {
        intervals[at..]
            .iter()
            .map(|i| i.disk_max)
            .max()
            .unwrap_or(0)
    });
    let p99_max = intervals.iter().map(|i| i.p99_us).max().unwrap_or(0);
    if args.json {
        let catch_up = outcome.catch_up.as_ref();
        let out = json!({
            "journal_bytes": journal_bytes,
            "written_bytes": outcome.written,
            "disk_bytes_after_first_gc": after_first_gc,
            "disk_bytes_max": max,
            "errors": outcome.errors,
            "commit_p99_us_max_interval": p99_max,
            "append_mb_per_s": outcome.background_on.map(|w| w.append_mb_per_s),
            "background_on": outcome.background_on.filter(|_| args.compare_seconds > 0),
            "background_paused": outcome.background_paused,
            "background_on_over_paused_p99": background_ratio(outcome),
            "catch_up_mb_per_s": catch_up.and_then(|c| c.mb_per_s),
            "catch_up_records_per_s": catch_up.and_then(|c| c.records_per_s),
            "catch_up": catch_up,
        });
        println!("{out}");
        return;
    }
    let ratio = if after_first_gc > 0 {
        max as f64 / after_first_gc as f64
    } else {
        f64::NAN
    };
    println!(
        "written {:.1} MiB = {:.1} × one node's journal ({} MiB); errors {}",
        outcome.written as f64 / f64::from(1 << 20),
        outcome.written as f64 / journal_bytes as f64,
        args.journal_mib,
        outcome.errors
    );
    println!(
        "disk use per node: after the first GC {:.1} MiB, max after it {:.1} MiB \
         (ratio {ratio:.3}, target ≤ 1.1: {})",
        after_first_gc as f64 / f64::from(1 << 20),
        max as f64 / f64::from(1 << 20),
        verdict(ratio <= 1.1)
    );
    println!("commit p99, worst interval: {p99_max} µs");
    report_background(args, outcome);
    if let Some(catch_up) = &outcome.catch_up {
        catch_up.print();
    }
}

fn verdict(met: bool) -> &'static str {
    if met { "met" } else { "MISSED" }
}

/// Commit p99 with background work on over paused.
fn background_ratio(outcome: &Outcome) -> Option<f64> {
    let on = outcome.background_on?.summary.p99_us;
    let paused = outcome.background_paused.as_ref()?.window.summary.p99_us;
    Some(on as f64 / paused.max(1) as f64)
}

fn report_background(args: &SoakArgs, outcome: &Outcome) {
    let Some(on) = outcome.background_on else {
        return;
    };
    if args.compare_seconds == 0 {
        println!(
            "append throughput per node: {:.1} MB/s ({:.0} commits/s)",
            on.append_mb_per_s, on.summary.ops_per_s
        );
        return;
    }
    let label = format!("commit, background on ({:.0} s)", on.seconds);
    println!("{}", on.summary.line(&label));
    println!(
        "    {:.1} MB/s appended per node{}",
        on.append_mb_per_s,
        on.journal_bytes_per_commit
            .map(|b| format!(", {b:.0} journal bytes per commit"))
            .unwrap_or_default()
    );
    if let Some(paused) = &outcome.background_paused {
        paused.print();
    }
    if let Some(ratio) = background_ratio(outcome) {
        println!(
            "target: commit p99 background on / paused = {ratio:.2} (≤ {BACKGROUND_RATIO_MAX}): {}",
            verdict(ratio <= BACKGROUND_RATIO_MAX)
        );
    }
}
