//! `sixfold-bench recovery`: how long a new writer takes, on a volume that already holds data,
//! from its start to its first commit — `VolumeClient::open` (crash recovery: query, fence,
//! fetch above the floor, copy, truncate) plus one `write_mtr` and its `commit` — for a small
//! volume and a large one, each on a six-node cluster of its own, in the same run.
//!
//! Per volume: one writer writes the data (full 64 KiB page images, self-verifying, with
//! `--inflight` transactions in flight) and is dropped with a last `--inflight` MTRs shipped but
//! not committed, as a crash leaves them. Then, `--runs` times: a fresh writer opens the volume
//! and commits one MTR (timed), its VDL must cover every commit acknowledged before, and it
//! is dropped the same way. The median run is reported.
//!
//! Targets (read, never asserted): each ≤ 1 s, and large / small ≤ 1.2 — recovery replays no
//! redo, so its time should not depend on how much was written.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use anyhow::Context;
use engine::quorum::MtrRecord;
use engine::{VolumeClient, VolumeConfig};
use serde_json::json;
use tools::cluster::{ClusterOptions, LocalCluster};
use tools::dev::{page_image, page_version};
use wire::{Lsn, PageId, RedoOp};

#[derive(clap::Args, Debug)]
pub(crate) struct RecoveryArgs {
    /// Directory on the disk under test: both clusters go under DIR/recovery-<pid>, one after
    /// the other, each removed once measured (kept, with the nodes' logs, if anything failed).
    #[arg(long)]
    dir: PathBuf,
    /// MiB written to the small volume.
    #[arg(long, default_value_t = 10)]
    small_mib: u64,
    /// MiB written to the large volume. Every node journals all of it: the disk needs six
    /// times this, and a little more.
    #[arg(long, default_value_t = 2048)]
    large_mib: u64,
    /// Transactions in flight while writing, and MTRs left uncommitted at each crash.
    #[arg(long, default_value_t = 32)]
    inflight: usize,
    /// Timed reopens per volume (the median is reported: single opens vary by tens of ms).
    #[arg(long, default_value_t = 9)]
    runs: usize,
    /// Print one JSON object instead of the table.
    #[arg(long)]
    json: bool,
}

/// Page size of the bench volumes, and the payload of every record: few records per byte.
const PAGE_BYTES: usize = 64 << 10;
const PG_COUNT: u32 = 4;
const PAGES_PER_PG: u64 = 64;
/// Disk left free beyond the journals.
const DISK_MARGIN_BYTES: u64 = 1 << 30;
/// A transaction that takes longer than this means the cluster stalled: fail, never hang.
const TXN_TIMEOUT: Duration = Duration::from_secs(60);

/// One volume's measurement.
#[derive(Clone, Debug)]
struct Measured {
    name: &'static str,
    written_bytes: u64,
    records: u64,
    write_s: f64,
    /// Per run: (open ms, open → first commit ms).
    runs: Vec<(f64, f64)>,
}

impl Measured {
    /// The median run's open → first commit, in ms.
    fn recovery_ms(&self) -> f64 {
        let mut totals: Vec<f64> = self.runs.iter().map(|r| r.1).collect();
        totals.sort_by(f64::total_cmp);
        (totals[totals.len() / 2] * 1e3).round() / 1e3 // µs are plenty.
    }
}

impl RecoveryArgs {
    /// Two clusters to start and fill (the large one with gigabytes), then `runs` reopens of
    /// each: bounded by the bytes to write, not by a --seconds.
    pub(crate) fn deadline_default(&self) -> Duration {
        let fill_s = (self.small_mib + self.large_mib) / 10; // ≥ 10 MiB/s even on a slow disk
        Duration::from_secs(1200 + fill_s + 60 * self.runs as u64)
    }
}

pub(crate) fn run(args: &RecoveryArgs) -> anyhow::Result<()> {
    anyhow::ensure!(args.runs > 0, "--runs must be at least 1");
    anyhow::ensure!(args.inflight > 0, "--inflight must be at least 1");
    anyhow::ensure!(
        args.small_mib > 0 && args.large_mib > 0,
        "sizes must be at least 1 MiB"
    );
    crate::stats::init_tracing("warn");
    let run_dir = args.dir.join(format!("recovery-{}", std::process::id()));
    std::fs::create_dir_all(&run_dir)
        .with_context(|| format!("cannot create {}", run_dir.display()))?;
    let (small, large) = run_in(args, &run_dir)
        .with_context(|| format!("(the clusters' logs are kept in {})", run_dir.display()))?;
    if let Err(e) = std::fs::remove_dir_all(&run_dir) {
        eprintln!("sixfold-bench: cannot remove {}: {e}", run_dir.display());
    }
    if args.json {
        let out = json!({
            "small": { "written_bytes": small.written_bytes, "recovery_ms": small.recovery_ms() },
            "large": { "written_bytes": large.written_bytes, "recovery_ms": large.recovery_ms() },
        });
        println!("{out}");
    } else {
        print_table(&small, &large);
    }
    Ok(())
}

fn run_in(args: &RecoveryArgs, run_dir: &Path) -> anyhow::Result<(Measured, Measured)> {
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()?;
    let small = measure_volume(args, "small", args.small_mib, run_dir, &runtime)?;
    let large = measure_volume(args, "large", args.large_mib, run_dir, &runtime)?;
    Ok((small, large))
}

/// Journals that hold `mib` of 64 KiB records with room to spare: each record may be a
/// 4 KiB-padded group of its own (68 KiB), a file's end may waste a group, and every crash
/// leaves `inflight` more records.
fn cluster_options(args: &RecoveryArgs, mib: u64) -> ClusterOptions {
    let written = mib << 20;
    let tails = (args.runs as u64 + 1) * args.inflight as u64 * (PAGE_BYTES as u64 + 4096);
    let journal_bytes = written + written / 16 + tails + (64 << 20);
    let file_bytes: u64 = if journal_bytes > (1 << 30) {
        64 << 20
    } else {
        16 << 20
    };
    ClusterOptions {
        pg_count: PG_COUNT,
        page_size_bytes: PAGE_BYTES as u32,
        segment_bytes: PAGES_PER_PG * PAGE_BYTES as u64,
        journal_file_bytes: file_bytes,
        journal_file_count: u32::try_from(journal_bytes.div_ceil(file_bytes) + 1)
            .unwrap_or(u32::MAX),
        ..ClusterOptions::default()
    }
}

/// Bytes free for an unprivileged user on the filesystem holding `dir`.
pub(crate) fn free_bytes(dir: &Path) -> anyhow::Result<u64> {
    use std::os::unix::ffi::OsStrExt;
    let path = std::ffi::CString::new(dir.as_os_str().as_bytes())?;
    // SAFETY: `path` is a valid NUL-terminated string; `stat` is a plain out-parameter that
    // statvfs fills in, and is read only when it succeeds.
    let stat = unsafe {
        let mut stat: libc::statvfs = std::mem::zeroed();
        if libc::statvfs(path.as_ptr(), &mut stat) != 0 {
            return Err(std::io::Error::last_os_error())
                .with_context(|| format!("statvfs {}", dir.display()));
        }
        stat
    };
    Ok(stat.f_bavail.saturating_mul(stat.f_frsize))
}

/// Writes `mib` to a fresh cluster's volume, crashes the writer, then times `runs` reopens.
fn measure_volume(
    args: &RecoveryArgs,
    name: &'static str,
    mib: u64,
    run_dir: &Path,
    runtime: &tokio::runtime::Runtime,
) -> anyhow::Result<Measured> {
    let options = cluster_options(args, mib);
    let journals = 6 * options.journal_file_bytes * u64::from(options.journal_file_count);
    let free = free_bytes(run_dir)?;
    anyhow::ensure!(
        free >= journals + DISK_MARGIN_BYTES,
        "the {name} volume ({mib} MiB) needs {:.1} GiB of journals on six nodes and {:.1} GiB \
         spare, but {} has {:.1} GiB free: pass a smaller --{name}-mib",
        journals as f64 / f64::from(1 << 30),
        DISK_MARGIN_BYTES as f64 / f64::from(1 << 30),
        run_dir.display(),
        free as f64 / f64::from(1 << 30)
    );
    let progress = |m: &str| {
        crate::watchdog::phase(m);
        if !args.json {
            eprintln!("{m}")
        }
    };
    progress(&format!(
        "{name}: starting 6 nodes ({} journal files of {} MiB each to pre-write) …",
        options.journal_file_count,
        options.journal_file_bytes >> 20
    ));
    let cluster_dir = run_dir.join(name);
    let mut cluster = runtime.block_on(LocalCluster::start(&cluster_dir, &options))?;
    let measured = runtime.block_on(measure_on(args, name, mib, &cluster, &progress));
    let stopped = cluster.stop();
    drop(cluster);
    let measured = measured?;
    if let Err(e) = stopped {
        // Not what this bench measures; said, not failed (see tools::chaos::run).
        eprintln!("sixfold-bench: warning: stopping the {name} cluster: {e:#}");
    }
    let _ = std::fs::remove_dir_all(&cluster_dir); // Room for the next volume.
    Ok(measured)
}

async fn measure_on(
    args: &RecoveryArgs,
    name: &'static str,
    mib: u64,
    cluster: &LocalCluster,
    progress: &impl Fn(&str),
) -> anyhow::Result<Measured> {
    let load = Arc::new(Load::default());
    let volume = Arc::new(cluster.attach(VolumeConfig::default()).await?);
    let records = (mib << 20).div_ceil(PAGE_BYTES as u64);
    progress(&format!(
        "{name}: writing {records} records of 64 KiB ({mib} MiB), {} in flight …",
        args.inflight
    ));
    let began = Instant::now();
    load.write(&volume, records, args.inflight).await?;
    let write_s = began.elapsed().as_secs_f64();
    let written_bytes = load.acked.load(Ordering::Acquire) * PAGE_BYTES as u64;
    progress(&format!(
        "{name}: {:.0} MiB committed in {write_s:.1} s ({:.0} MiB/s); VDL {}",
        written_bytes as f64 / f64::from(1 << 20),
        written_bytes as f64 / f64::from(1 << 20) / write_s.max(1e-9),
        volume.vdl().0
    ));
    load.crash(volume, args.inflight).await?;
    let mut runs = Vec::new();
    for run in 0..args.runs {
        let (open_ms, total_ms, volume) = load.reopen(cluster).await?;
        progress(&format!(
            "{name}: run {}: open {open_ms:.1} ms, open → first commit {total_ms:.1} ms",
            run + 1
        ));
        runs.push((open_ms, total_ms));
        if run == 0 {
            load.check_last_page(&volume).await?;
        }
        load.crash(volume, args.inflight).await?;
    }
    Ok(Measured {
        name,
        written_bytes,
        records: load.acked.load(Ordering::Acquire),
        write_s,
        runs,
    })
}

/// The bench's writes: transaction `n` writes version `n + 1` of page `n % pages`.
#[derive(Default)]
struct Load {
    next: AtomicU64,
    /// Transactions committed by the data-writing writer.
    acked: AtomicU64,
    /// The highest CPL any writer had acknowledged.
    acked_lsn: AtomicU64,
    /// The last acknowledged transaction's number + 1 (0: none).
    last_txn: AtomicU64,
}

impl Load {
    fn mtr(&self) -> (u64, Vec<MtrRecord>) {
        let n = self.next.fetch_add(1, Ordering::AcqRel);
        let pages = u64::from(PG_COUNT) * PAGES_PER_PG;
        let page = n % pages;
        let record = MtrRecord {
            page: PageId(page),
            op: RedoOp::Write {
                offset: 0,
                bytes: page_image(page, n + 1, PAGE_BYTES),
            },
        };
        (n, vec![record])
    }

    /// One transaction, committed, within `TXN_TIMEOUT`.
    async fn transaction(&self, volume: &VolumeClient) -> anyhow::Result<()> {
        let (n, records) = self.mtr();
        let commit = async {
            let cpl = volume.write_mtr(records).await?;
            volume.commit(cpl).await?;
            anyhow::Ok(cpl)
        };
        let cpl = tokio::time::timeout(TXN_TIMEOUT, commit)
            .await
            .with_context(|| {
                format!(
                    "a transaction did not commit within {TXN_TIMEOUT:?}; writer: {}",
                    volume.debug_state()
                )
            })??;
        self.acked_lsn.fetch_max(cpl.0, Ordering::AcqRel);
        self.last_txn.fetch_max(n + 1, Ordering::AcqRel);
        Ok(())
    }

    /// `records` transactions with `inflight` at a time.
    async fn write(
        self: &Arc<Self>,
        volume: &Arc<VolumeClient>,
        records: u64,
        inflight: usize,
    ) -> anyhow::Result<()> {
        let issued = Arc::new(AtomicU64::new(0));
        let tasks: Vec<_> = (0..inflight)
            .map(|_| {
                let (load, volume, issued) = (self.clone(), volume.clone(), issued.clone());
                tokio::spawn(async move {
                    while issued.fetch_add(1, Ordering::AcqRel) < records {
                        load.transaction(&volume).await?;
                        load.acked.fetch_add(1, Ordering::AcqRel);
                    }
                    anyhow::Ok(())
                })
            })
            .collect();
        for task in tasks {
            task.await.context("a writing task panicked")??;
        }
        Ok(())
    }

    /// Ships `inflight` MTRs without waiting for them, then drops the writer: a crash.
    async fn crash(&self, volume: Arc<VolumeClient>, inflight: usize) -> anyhow::Result<()> {
        for _ in 0..inflight {
            let (_, records) = self.mtr();
            volume.write_mtr(records).await?;
        }
        drop(volume);
        Ok(())
    }

    /// A new writer: open it and commit one MTR, timed. Its VDL must cover every CPL
    /// acknowledged before.
    async fn reopen(
        &self,
        cluster: &LocalCluster,
    ) -> anyhow::Result<(f64, f64, Arc<VolumeClient>)> {
        let acked = Lsn(self.acked_lsn.load(Ordering::Acquire));
        let began = Instant::now();
        let volume = cluster.attach(VolumeConfig::default()).await?;
        let open_ms = began.elapsed().as_secs_f64() * 1e3;
        let recovered = volume.vdl();
        self.transaction(&volume).await?;
        let total_ms = began.elapsed().as_secs_f64() * 1e3;
        anyhow::ensure!(
            recovered >= acked,
            "recovered VDL {} is below an acknowledged commit at {}",
            recovered.0,
            acked.0
        );
        Ok((open_ms, total_ms, Arc::new(volume)))
    }

    /// The last acknowledged page reads back at least at the version acknowledged (untimed).
    async fn check_last_page(&self, volume: &VolumeClient) -> anyhow::Result<()> {
        let n = self.last_txn.load(Ordering::Acquire) - 1;
        let page = n % (u64::from(PG_COUNT) * PAGES_PER_PG);
        let image = volume
            .read_page_from(PageId(page), volume.vdl(), None)
            .await?;
        let version = page_version(page, &image.bytes, PAGE_BYTES).map_err(anyhow::Error::msg)?;
        anyhow::ensure!(
            version > n,
            "page {page} read at version {version}, but version {} was acknowledged",
            n + 1
        );
        Ok(())
    }
}

fn print_table(small: &Measured, large: &Measured) {
    println!("recovery: a new writer's open → first commit on a volume holding data (median run)");
    println!(
        "{:<6} {:>12} {:>8} {:>10} {:>14}  runs: open / open → first commit (ms)",
        "volume", "written MiB", "records", "write s", "recovery ms"
    );
    for m in [small, large] {
        let runs: Vec<String> = m
            .runs
            .iter()
            .map(|(open, total)| format!("{open:.1} / {total:.1}"))
            .collect();
        println!(
            "{:<6} {:>12.1} {:>8} {:>10.1} {:>14.1}  {}",
            m.name,
            m.written_bytes as f64 / f64::from(1 << 20),
            m.records,
            m.write_s,
            m.recovery_ms(),
            runs.join(", ")
        );
    }
    let verdict = |ok: bool| if ok { "met" } else { "MISSED" };
    for m in [small, large] {
        let ms = m.recovery_ms();
        println!(
            "target: {} recovery {ms:.1} ms ≤ 1000 ms: {}",
            m.name,
            verdict(ms <= 1000.0)
        );
    }
    let ratio = large.recovery_ms() / small.recovery_ms().max(1e-9);
    println!(
        "target: large / small = {ratio:.2} ≤ 1.2: {}",
        verdict(ratio <= 1.2)
    );
}
