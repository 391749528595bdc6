//! `sixfold dev`: a whole local cluster in one command — six nodes in three AZs on loopback,
//! certificates, a volume, an engine attached, and a small write/read workload whose VDL and
//! commit latency are printed every second. SIGINT or SIGTERM stops everything cleanly.

use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use engine::quorum::MtrRecord;
use engine::{VolumeClient, VolumeConfig};
use hdrhistogram::Histogram;
use tokio::sync::Mutex;
use wire::{PageId, RedoOp};

use crate::cluster::{ClusterOptions, LocalCluster};

/// Options of `sixfold dev`.
#[derive(Clone, Debug)]
pub struct DevOptions {
    pub dir: PathBuf,
    /// Stop after this long (None: run until SIGINT/SIGTERM).
    pub duration: Option<Duration>,
    pub workers: usize,
}

/// A small deterministic PRNG (xorshift64*): the workload needs variety, not cryptography.
#[derive(Clone, Copy, Debug)]
pub struct Rng(u64);

impl Rng {
    pub fn new(seed: u64) -> Self {
        Self(seed.max(1))
    }

    pub fn next_u64(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_F491_4F6C_DD1D)
    }

    pub fn below(&mut self, n: u64) -> u64 {
        self.next_u64() % n.max(1)
    }
}

/// Pause between a worker's transactions.
const WORKER_PAUSE: Duration = Duration::from_millis(80);

/// Runs the dev cluster until the duration passes or a signal arrives.
pub async fn run(options: DevOptions) -> anyhow::Result<()> {
    let stop = Arc::new(AtomicBool::new(false));
    eprintln!(
        "sixfold dev: starting 6 nodes in 3 AZs under {} …",
        options.dir.display()
    );
    // Until garbage collection exists, journals only fill: 256 MiB per node lasts about ten
    // minutes at the paced workload below.
    let cluster_options = ClusterOptions {
        journal_file_bytes: 32 << 20,
        journal_file_count: 8,
        ..ClusterOptions::default()
    };
    let mut cluster = LocalCluster::start(&options.dir, &cluster_options).await?;
    for (spec, node) in cluster.specs.iter().zip(&cluster.nodes) {
        let pid = node.as_ref().map_or(0, |n| n.pid());
        eprintln!("  {} ({}) on {} pid {pid}", spec.name, spec.az, spec.listen);
    }
    eprintln!("  volume: {}", options.dir.join("volume.toml").display());
    let volume = Arc::new(cluster.attach(VolumeConfig::default())?);
    let latencies = Arc::new(Mutex::new(histogram()));
    let mut workers = Vec::new();
    for w in 0..options.workers {
        let (volume, latencies, stop) = (volume.clone(), latencies.clone(), stop.clone());
        workers.push(tokio::spawn(worker(volume, latencies, stop, w as u64 + 1)));
    }
    report_until_stopped(&volume, &latencies, &stop, options.duration).await;
    stop.store(true, Ordering::Release);
    for worker in workers {
        worker.await??;
    }
    drop(volume);
    cluster.stop()?;
    eprintln!("sixfold dev: stopped cleanly");
    Ok(())
}

fn histogram() -> Histogram<u64> {
    Histogram::new_with_bounds(1, 100_000_000, 3).expect("valid bounds")
}

async fn report_until_stopped(
    volume: &VolumeClient,
    latencies: &Mutex<Histogram<u64>>,
    stop: &AtomicBool,
    duration: Option<Duration>,
) {
    use tokio::signal::unix::{SignalKind, signal};
    let mut term = signal(SignalKind::terminate()).expect("SIGTERM handler");
    let mut int = signal(SignalKind::interrupt()).expect("SIGINT handler");
    let began = Instant::now();
    let mut tick = tokio::time::interval(Duration::from_secs(1));
    tick.tick().await;
    loop {
        tokio::select! {
            _ = tick.tick() => {}
            _ = term.recv() => break,
            _ = int.recv() => break,
        }
        let h = std::mem::replace(&mut *latencies.lock().await, histogram());
        println!(
            "t={:>4}s  VDL {:>9}  commits/s {:>6}  commit latency p50 {:>6} µs  p99 {:>6} µs  max {:>6} µs",
            began.elapsed().as_secs(),
            volume.vdl().0,
            h.len(),
            h.value_at_quantile(0.5),
            h.value_at_quantile(0.99),
            h.max()
        );
        if duration.is_some_and(|d| began.elapsed() >= d) || stop.load(Ordering::Acquire) {
            break;
        }
    }
}

/// One worker: MTRs of one or two small writes, each committed, with a read now and then.
async fn worker(
    volume: Arc<VolumeClient>,
    latencies: Arc<Mutex<Histogram<u64>>>,
    stop: Arc<AtomicBool>,
    seed: u64,
) -> anyhow::Result<()> {
    let mut rng = Rng::new(seed.wrapping_mul(0x9E37_79B9_7F4A_7C15));
    let pages = volume.file().geometry().page_count();
    while !stop.load(Ordering::Acquire) {
        let records = (0..=rng.below(2))
            .map(|_| MtrRecord {
                page: PageId(rng.below(pages)),
                op: RedoOp::Write {
                    offset: rng.below(7000) as u32,
                    bytes: rng.next_u64().to_le_bytes().repeat(16),
                },
            })
            .collect();
        let start = Instant::now();
        let cpl = volume.write_mtr(records).await?;
        volume.commit(cpl).await?;
        let us = start.elapsed().as_micros().max(1) as u64;
        latencies
            .lock()
            .await
            .record(us.min(100_000_000))
            .expect("bounded above");
        if rng.below(16) == 0 {
            volume.read_page(PageId(rng.below(pages))).await?;
        }
        // A small workload: each worker paces itself to about 12 transactions a second.
        tokio::time::sleep(WORKER_PAUSE).await;
    }
    Ok(())
}
