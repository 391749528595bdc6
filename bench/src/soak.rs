//! `sixfold-bench soak`: six nodes and a writer committing without pause until at least
//! `--journals` times one node's journal has been written (and at least `--seconds` have
//! passed), printing each node's disk use and the commit p99 of every interval. Nodes must
//! coalesce and recycle their journals to get through it: disk use should stay flat after the
//! first garbage collection and no commit may fail.
//!
//! Targets (read, never asserted): disk use max / disk use after the first GC ≤ 1.1, and zero
//! errors. `--json`: `{"journal_bytes", "written_bytes", "disk_bytes_after_first_gc",
//! "disk_bytes_max", "errors", "commit_p99_us_max_interval"}`.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use anyhow::Context;
use engine::quorum::MtrRecord;
use engine::{VolumeClient, VolumeConfig};
use hdrhistogram::Histogram;
use serde_json::json;
use tools::cluster::{ClusterOptions, LocalCluster, disk_bytes};
use wire::{PageId, RedoOp};

#[derive(clap::Args, Debug)]
pub(crate) struct SoakArgs {
    /// Directory on the disk under test: the cluster goes under DIR/soak-<pid>, removed at the
    /// end (kept, with the nodes' logs, if anything failed).
    #[arg(long)]
    dir: PathBuf,
    /// Run at least this long.
    #[arg(long, default_value_t = 60)]
    seconds: u64,
    /// Write at least this many times one node's journal.
    #[arg(long, default_value_t = 10)]
    journals: u64,
    /// Each node's journal, in MiB (files of 8 MiB).
    #[arg(long, default_value_t = 128)]
    journal_mib: u64,
    /// Transactions in flight.
    #[arg(long, default_value_t = 16)]
    inflight: usize,
    /// Bytes each one-record transaction writes.
    #[arg(long, default_value_t = 4096)]
    record_bytes: usize,
    /// Print one JSON object instead of the table.
    #[arg(long)]
    json: bool,
}

const FILE_BYTES: u64 = 8 << 20;
const PAGE_BYTES: u32 = 8192;
const PG_COUNT: u32 = 4;
/// Pages written (spread over the PGs): the volume's pages bound the page stores.
const PAGES: u64 = 1024;
/// A transaction that takes longer than this means the cluster stalled: count it, go on.
const TXN_TIMEOUT: Duration = Duration::from_secs(30);

impl SoakArgs {
    pub(crate) fn deadline_default(&self) -> Duration {
        // Writing N journals at ≥ 2 MB/s, plus starting nodes.
        let bytes = self.journals * (self.journal_mib << 20);
        Duration::from_secs(600 + self.seconds * 3 + bytes / (2 << 20))
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
    crate::stats::init_tracing("warn");
    let run_dir = args.dir.join(format!("soak-{}", std::process::id()));
    std::fs::create_dir_all(&run_dir)
        .with_context(|| format!("cannot create {}", run_dir.display()))?;
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()?;
    let (intervals, errors, written) = runtime
        .block_on(soak(args, &run_dir))
        .with_context(|| format!("(the cluster's logs are kept in {})", run_dir.display()))?;
    if let Err(e) = std::fs::remove_dir_all(&run_dir) {
        eprintln!("sixfold-bench: cannot remove {}: {e}", run_dir.display());
    }
    report(args, &intervals, errors, written);
    Ok(())
}

async fn soak(args: &SoakArgs, run_dir: &Path) -> anyhow::Result<(Vec<Interval>, u64, u64)> {
    let options = ClusterOptions {
        pg_count: PG_COUNT,
        page_size_bytes: PAGE_BYTES,
        segment_bytes: PAGES / u64::from(PG_COUNT) * u64::from(PAGE_BYTES),
        journal_file_bytes: FILE_BYTES,
        journal_file_count: u32::try_from((args.journal_mib << 20) / FILE_BYTES)?,
        ..ClusterOptions::default()
    };
    crate::watchdog::phase("starting six nodes");
    eprintln!(
        "starting 6 sixfold-nodes, journals of {} MiB …",
        args.journal_mib
    );
    let mut cluster = LocalCluster::start(run_dir, &options).await?;
    let volume = Arc::new(cluster.attach(VolumeConfig::default()).await?);
    let stop = Arc::new(AtomicBool::new(false));
    let (written, errors) = (Arc::new(AtomicU64::new(0)), Arc::new(AtomicU64::new(0)));
    let latencies = Arc::new(std::sync::Mutex::new(crate::stats::histogram()));
    let commits = Arc::new(AtomicU64::new(0));
    let mut workers = Vec::new();
    for w in 0..args.inflight as u64 {
        let shared = (
            volume.clone(),
            stop.clone(),
            written.clone(),
            errors.clone(),
            latencies.clone(),
            commits.clone(),
        );
        workers.push(tokio::spawn(worker(w, args.record_bytes, shared)));
    }
    crate::watchdog::phase("writing");
    let target = args.journals * (args.journal_mib << 20);
    let began = Instant::now();
    let mut intervals = Vec::new();
    let mut last_commits = 0;
    while began.elapsed() < Duration::from_secs(args.seconds)
        || written.load(Ordering::Relaxed) < target
    {
        tokio::time::sleep(Duration::from_secs(1)).await;
        let now_commits = commits.load(Ordering::Relaxed);
        let interval = sample(
            run_dir,
            &latencies,
            began,
            written.load(Ordering::Relaxed),
            now_commits - last_commits,
        );
        last_commits = now_commits;
        if !args.json {
            print_interval(&interval);
        }
        intervals.push(interval);
    }
    stop.store(true, Ordering::Relaxed);
    for worker in workers {
        worker.await?;
    }
    cluster.stop()?;
    Ok((
        intervals,
        errors.load(Ordering::Relaxed),
        written.load(Ordering::Relaxed),
    ))
}

/// The figures of the interval that just ended (the latency histogram starts again).
fn sample(
    run_dir: &Path,
    latencies: &std::sync::Mutex<Histogram<u64>>,
    began: Instant,
    written: u64,
    commits: u64,
) -> Interval {
    let p99_us = {
        let mut h = latencies.lock().expect("latencies lock");
        let p99 = h.value_at_quantile(0.99);
        h.reset();
        p99
    };
    let disk_max = (0..6)
        .map(|i| disk_bytes(&run_dir.join(format!("node{}", i + 1))))
        .max()
        .unwrap_or(0);
    // The manifest gets a [journal] table once garbage collection first moves the start.
    let manifest = std::fs::read_to_string(run_dir.join("node1/manifest.toml")).unwrap_or_default();
    Interval {
        at_s: began.elapsed().as_secs_f64(),
        written,
        commits,
        p99_us,
        disk_max,
        gc_seen: manifest.contains("[journal]"),
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

type Shared = (
    Arc<VolumeClient>,
    Arc<AtomicBool>,
    Arc<AtomicU64>,
    Arc<AtomicU64>,
    Arc<std::sync::Mutex<Histogram<u64>>>,
    Arc<AtomicU64>,
);

/// Commits one-record MTRs, one at a time, until told to stop; errors are counted.
async fn worker(w: u64, record_bytes: usize, shared: Shared) {
    let (volume, stop, written, errors, latencies, commits) = shared;
    let mut i = 0u64;
    while !stop.load(Ordering::Relaxed) {
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
            let cpl = volume.write_mtr(vec![record]).await?;
            volume.commit(cpl).await
        })
        .await;
        match done {
            Ok(Ok(())) => {
                crate::stats::record(&mut latencies.lock().expect("lock"), start.elapsed());
                written.fetch_add(record_bytes as u64, Ordering::Relaxed);
                commits.fetch_add(1, Ordering::Relaxed);
            }
            _ => {
                errors.fetch_add(1, Ordering::Relaxed);
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
        }
    }
}

fn report(args: &SoakArgs, intervals: &[Interval], errors: u64, written: u64) {
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
        let out = json!({
            "journal_bytes": journal_bytes,
            "written_bytes": written,
            "disk_bytes_after_first_gc": after_first_gc,
            "disk_bytes_max": max,
            "errors": errors,
            "commit_p99_us_max_interval": p99_max,
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
        "written {:.1} MiB = {:.1} × one node's journal ({} MiB); errors {errors}",
        written as f64 / f64::from(1 << 20),
        written as f64 / journal_bytes as f64,
        args.journal_mib
    );
    println!(
        "disk use per node: after the first GC {:.1} MiB, max after it {:.1} MiB \
         (ratio {ratio:.3}, target ≤ 1.1: {})",
        after_first_gc as f64 / f64::from(1 << 20),
        max as f64 / f64::from(1 << 20),
        if ratio <= 1.1 { "met" } else { "MISSED" }
    );
    println!("commit p99, worst interval: {p99_max} µs");
}
