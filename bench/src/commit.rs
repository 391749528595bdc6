//! `sixfold-bench commit`: six real nodes on loopback (io_uring, QUIC, mTLS) in three AZs, one
//! engine attached, closed-loop MTRs of one 4 KiB record each at 1, 16 and 64 in flight; a
//! transaction's latency is `write_mtr` + `commit(cpl)` (VDL ≥ CPL, i.e. 4 of 6 segments of its
//! PG durable). In the same run: single-node append latency at the same concurrency (the
//! `append` machinery, a fresh node per level) and the raw disk, for context; the engine's
//! messages and bytes per committed transaction.
//!
//! Targets (read, never asserted in tests): quorum commit p99 ≤ single-node append p99 at 64 in
//! flight (4 of 6 hides a slow flush); messages per committed transaction per segment fall as
//! concurrency rises; the engine sends 0 page bytes, ever.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use anyhow::Context;
use engine::driver::VolumeStats;
use engine::quorum::{MtrRecord, PG_SIZE};
use engine::{VolumeClient, VolumeConfig};
use node::io::raw::SyncMode;
use serde::Serialize;
use serde_json::json;
use tools::cluster::{ClusterOptions, LocalCluster};
use wire::{Lsn, PageId, PgId, RedoOp, SegmentIndex};

use crate::append::{self, AppendArgs};
use crate::stats::{self, Summary};

#[derive(clap::Args, Debug)]
pub(crate) struct CommitArgs {
    /// Directory on the disk under test: the cluster's and the single node's data and the
    /// raw-disk probe file go under DIR/commit-<pid>, removed at the end.
    #[arg(long)]
    pub(crate) dir: PathBuf,
    /// Seconds per measurement (the raw disk, and each level of commits and of appends).
    #[arg(long, default_value_t = 10)]
    pub(crate) seconds: u64,
    /// Measure only this many transactions (and appends) in flight (default: 1, 16 and 64).
    #[arg(long)]
    pub(crate) inflight: Option<usize>,
    /// PGs of the bench volume; transactions write pages round-robin over them.
    #[arg(long, default_value_t = 4)]
    pub(crate) pg_count: u32,
    /// Worker threads of the engine's tokio runtime (0: a current-thread runtime).
    #[arg(long, default_value_t = 0)]
    pub(crate) engine_threads: usize,
    /// Also measure a paced level: one transaction at a time, this many a second, as `sixfold
    /// dev` runs (0: skip). Light load shows idle wake-ups that a closed loop hides.
    #[arg(long, default_value_t = 100)]
    pub(crate) paced_per_s: u64,
    /// Measure the quorum commits twice in one run, with this many of the six nodes (the
    /// first in volume order) behind a UDP proxy: first at 0 ms (the baseline), then at
    /// --delay-ms each way. Replaces the single-node and paced levels; only --inflight K (or
    /// 16) is measured.
    #[arg(long)]
    pub(crate) slow_nodes: Option<usize>,
    /// With --slow-nodes: the slow nodes' extra delay each way, in milliseconds [default: 5].
    #[arg(long)]
    pub(crate) delay_ms: Option<u64>,
    /// Print one JSON object instead of the table.
    #[arg(long)]
    pub(crate) json: bool,
}

/// The slow nodes' extra delay each way unless --delay-ms says otherwise.
pub(crate) const DELAY_MS_DEFAULT: u64 = 5;

/// Payload bytes of each transaction's one record.
pub(crate) const RECORD_BYTES: usize = 4096;
/// Transactions before each level, not recorded.
const WARMUP_TXNS: usize = 100;
/// A transaction that takes longer than this means the cluster stalled: fail, never hang.
const TXN_TIMEOUT: Duration = Duration::from_secs(30);
/// How long to wait after a level for every segment to catch up with what was written.
pub(crate) const QUIESCE_TIMEOUT: Duration = Duration::from_secs(5);
/// Generous bound on commits per second, to size the journals: every node journals every
/// transaction, so no level beats one node's own group-commit rate by much.
const COMMITS_PER_S_MAX: u64 = 20_000;
/// Journal bytes one transaction takes on a node: at 1 in flight one 4 KiB record plus
/// headers is a group of its own, padded to the next 4 KiB; with more in flight groups hold
/// several records, and the bound leaves room for small groups.
const JOURNAL_BYTES_PER_TXN_ALONE: u64 = 8192;
const JOURNAL_BYTES_PER_TXN_GROUPED: u64 = 6144;
const JOURNAL_FILE_BYTES: u64 = 256 << 20;
/// Journal files per node at most (6 nodes pre-write them all).
const JOURNAL_FILE_COUNT_MAX: u64 = 24;

/// One commit level: latency and what the engine sent for it.
#[derive(Clone, Copy, Debug, Serialize)]
pub(crate) struct CommitLevel {
    pub(crate) inflight: usize,
    /// Set for the paced level: one transaction at a time, this many a second (open loop).
    paced_per_s: Option<u64>,
    pub(crate) summary: Summary,
    pub(crate) messages_per_txn: f64,
    pub(crate) appends_per_txn: f64,
    pub(crate) bytes_per_txn: f64,
    redo_bytes_per_txn: f64,
    redo_bytes: u64,
    txns: u64,
    /// Whether every segment caught up with the level's writes before the counters were read.
    pub(crate) quiesced: bool,
}

impl CommitLevel {
    /// A level's latency and, per transaction, what the engine sent between two counter reads.
    fn of(inflight: usize, summary: Summary, before: Counters, after: Counters) -> Self {
        let txns = summary.count.max(1) as f64;
        Self {
            inflight,
            paced_per_s: None,
            summary,
            messages_per_txn: (after.messages - before.messages) as f64 / txns,
            appends_per_txn: (after.appends - before.appends) as f64 / txns,
            bytes_per_txn: (after.bytes - before.bytes) as f64 / txns,
            redo_bytes_per_txn: (after.redo_bytes - before.redo_bytes) as f64 / txns,
            redo_bytes: after.redo_bytes - before.redo_bytes,
            txns: summary.count,
            quiesced: true,
        }
    }

    pub(crate) fn messages_per_segment(&self) -> f64 {
        self.messages_per_txn / PG_SIZE as f64
    }
}

#[derive(Clone, Copy, Debug, Default)]
struct Counters {
    messages: u64,
    bytes: u64,
    appends: u64,
    redo_bytes: u64,
    page_bytes: u64,
}

impl Counters {
    fn read(stats: &VolumeStats) -> Self {
        Self {
            messages: stats.messages_sent.load(Ordering::Relaxed),
            bytes: stats.bytes_sent.load(Ordering::Relaxed),
            appends: stats.appends_sent.load(Ordering::Relaxed),
            redo_bytes: stats.redo_bytes_sent.load(Ordering::Relaxed),
            page_bytes: stats.page_bytes_sent.load(Ordering::Relaxed),
        }
    }
}

impl CommitArgs {
    /// The raw probe, every commit level, the paced level and every single-node level, four
    /// times over, plus ten minutes for starting seven nodes (journals to pre-write).
    pub(crate) fn deadline_default(&self) -> Duration {
        let levels = if self.inflight.is_some() { 1 } else { 3 };
        Duration::from_secs(600 + 4 * self.seconds * (2 * levels + 2))
    }
}

pub(crate) fn run(args: &CommitArgs) -> anyhow::Result<()> {
    anyhow::ensure!(args.seconds > 0, "--seconds must be at least 1");
    anyhow::ensure!(args.pg_count > 0, "--pg-count must be at least 1");
    // The engine reports refused appends and lost nodes through tracing: show them.
    crate::stats::init_tracing("warn");
    let levels = match (args.inflight, args.slow_nodes) {
        (Some(0), _) => anyhow::bail!("--inflight must be at least 1"),
        (Some(k), _) => vec![k],
        (None, Some(_)) => vec![16],
        (None, None) => vec![1, 16, 64],
    };
    match (args.slow_nodes, args.delay_ms) {
        (Some(slow), _) if !(1..PG_SIZE).contains(&slow) => anyhow::bail!(
            "--slow-nodes must be between 1 and {} (2 is what a 4/6 quorum can hide)",
            PG_SIZE - 1
        ),
        (Some(_), Some(0)) => anyhow::bail!("--delay-ms must be at least 1"),
        (None, Some(_)) => anyhow::bail!("--delay-ms needs --slow-nodes"),
        _ => {}
    }
    let run_dir = args.dir.join(format!("commit-{}", std::process::id()));
    std::fs::create_dir_all(&run_dir)
        .with_context(|| format!("cannot create {}", run_dir.display()))?;
    let result = if args.slow_nodes.is_some() {
        crate::slow_nodes::run_in(args, &levels, &run_dir)
    } else {
        run_in(args, &levels, &run_dir)
    };
    if let Err(e) = std::fs::remove_dir_all(&run_dir) {
        eprintln!("sixfold-bench: cannot remove {}: {e}", run_dir.display());
    }
    result
}

fn run_in(args: &CommitArgs, levels: &[usize], run_dir: &Path) -> anyhow::Result<()> {
    let duration = Duration::from_secs(args.seconds);
    let progress = |m: &str| {
        crate::watchdog::phase(m);
        if !args.json {
            eprintln!("{m}")
        }
    };
    let runtime = engine_runtime(args.engine_threads)?;

    progress("raw disk: 4 KiB O_DIRECT write + fdatasync (linked), io_uring, 1 in flight …");
    let raw = append::raw_summary(run_dir, duration, SyncMode::Fdatasync)?;

    let options = cluster_options(args, levels, &raw);
    let journal_file_count = options.journal_file_count;
    let cluster_dir = run_dir.join("cluster");
    progress(&format!(
        "starting 6 sixfold-nodes in 3 AZs under {} ({journal_file_count} journal files of \
         256 MiB each to pre-write), {} PGs …",
        cluster_dir.display(),
        args.pg_count
    ));
    let started = Instant::now();
    let mut cluster = runtime.block_on(LocalCluster::start(&cluster_dir, &options))?;
    progress(&format!(
        "cluster up in {:.1} s; engine on a {} runtime",
        started.elapsed().as_secs_f64(),
        runtime_name(args.engine_threads)
    ));
    let measured = runtime.block_on(measure_commits(
        &cluster,
        (levels, args.paced_per_s),
        duration,
        &progress,
    ));
    let stopped = cluster.stop();
    if measured.is_err() || stopped.is_err() {
        print_log_tails(&cluster);
    }
    let (commits, page_bytes) = measured?;
    stopped.context("stopping the cluster")?;
    let single = measure_single_node(args, levels, &raw, run_dir, &runtime, &progress)?;
    report(args, &raw, &commits, &single, page_bytes);
    Ok(())
}

pub(crate) fn engine_runtime(engine_threads: usize) -> std::io::Result<tokio::runtime::Runtime> {
    if engine_threads == 0 {
        tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
    } else {
        tokio::runtime::Builder::new_multi_thread()
            .worker_threads(engine_threads)
            .enable_all()
            .build()
    }
}

/// The cluster: six nodes, each hosting one segment of every PG, so each journal takes
/// every transaction; journals sized so that no level can fill them.
pub(crate) fn cluster_options(
    args: &CommitArgs,
    levels: &[usize],
    raw: &Summary,
) -> ClusterOptions {
    let warmup_bytes = (WARMUP_TXNS * levels.len()) as u64 * JOURNAL_BYTES_PER_TXN_ALONE;
    let journal_bytes = warmup_bytes
        + levels
            .iter()
            .map(|&k| {
                let (rate, bytes) = if k == 1 {
                    // One in flight waits for a flush on four nodes at least: it cannot beat
                    // the disk's own flush rate (twice that, for a noisy probe).
                    let rate = (2_000_000 / raw.p50_us.max(10)).min(COMMITS_PER_S_MAX);
                    (rate, JOURNAL_BYTES_PER_TXN_ALONE)
                } else {
                    (COMMITS_PER_S_MAX, JOURNAL_BYTES_PER_TXN_GROUPED)
                };
                rate * args.seconds * bytes
            })
            .sum::<u64>();
    let journal_file_count =
        (journal_bytes.div_ceil(JOURNAL_FILE_BYTES) + 1).min(JOURNAL_FILE_COUNT_MAX) as u32;
    ClusterOptions {
        pg_count: args.pg_count,
        journal_file_bytes: JOURNAL_FILE_BYTES,
        journal_file_count,
        ..ClusterOptions::default()
    }
}

/// Single-node appends, one fresh node per level, after the cluster is gone.
fn measure_single_node(
    args: &CommitArgs,
    levels: &[usize],
    raw: &Summary,
    run_dir: &Path,
    runtime: &tokio::runtime::Runtime,
    progress: &dyn Fn(&str),
) -> anyhow::Result<Vec<(usize, Summary)>> {
    let duration = Duration::from_secs(args.seconds);
    let append_args = AppendArgs {
        target: crate::Target {
            dir: run_dir.join("single"),
            connect: None,
            certs: None,
        },
        seconds: args.seconds,
        inflight: None,
        record_bytes: RECORD_BYTES,
        sync: None,
        persister: None,
        json: args.json,
    };
    std::fs::create_dir_all(&append_args.target.dir)?;
    let mut single = Vec::new();
    for &k in levels {
        let (node, identity) = append::node_under_test(&append_args, k, raw)?;
        progress(&format!("single node: one-record appends, {k} in flight …"));
        let summary = runtime.block_on(append::measure_node(
            &node,
            &identity,
            k,
            RECORD_BYTES,
            duration,
        ))?;
        drop(node);
        single.push((k, summary));
    }
    Ok(single)
}

pub(crate) fn runtime_name(engine_threads: usize) -> String {
    match engine_threads {
        0 => "current-thread".into(),
        n => format!("{n}-worker"),
    }
}

/// Every level against one volume; returns the levels and the engine's page bytes sent over
/// the whole run.
async fn measure_commits(
    cluster: &LocalCluster,
    (levels, paced_per_s): (&[usize], u64),
    duration: Duration,
    progress: &impl Fn(&str),
) -> anyhow::Result<(Vec<CommitLevel>, u64)> {
    let volume = Arc::new(cluster.attach(VolumeConfig::default()).await?);
    let workload = Arc::new(Workload::new(&volume));
    let mut results = Vec::new();
    for &inflight in levels {
        progress(&format!(
            "quorum commits: one-record MTRs, {inflight} in flight …"
        ));
        results.push(measure_level(&volume, &workload, inflight, duration).await?);
    }
    if paced_per_s > 0 {
        results.push(measure_paced(&volume, &workload, paced_per_s, duration, progress).await?);
    }
    let page_bytes = Counters::read(&volume.stats()).page_bytes;
    drop(volume);
    Ok((results, page_bytes))
}

/// One closed-loop level: `inflight` tasks committing transactions back to back for
/// `duration`, after a warm-up; then the segments are given time to catch up so that the
/// engine's counters cover every message the level caused.
pub(crate) async fn measure_level(
    volume: &Arc<VolumeClient>,
    workload: &Arc<Workload>,
    inflight: usize,
    duration: Duration,
) -> anyhow::Result<CommitLevel> {
    let stats = volume.stats();
    warm_up(volume, workload).await?;
    let before = Counters::read(&stats);
    let began = Instant::now();
    let deadline = began + duration;
    let mut tasks = Vec::new();
    for _ in 0..inflight {
        let (volume, workload) = (volume.clone(), workload.clone());
        tasks.push(tokio::spawn(async move {
            let mut h = stats::histogram();
            while Instant::now() < deadline {
                let start = Instant::now();
                workload.transaction(&volume).await?;
                stats::record(&mut h, start.elapsed());
            }
            anyhow::Ok(h)
        }));
    }
    let mut total = stats::histogram();
    let mut failure = None;
    for task in tasks {
        match task.await.context("a transaction task panicked")? {
            Ok(h) => total.add(h).expect("same bounds"),
            Err(e) => failure = failure.or(Some(e)),
        }
    }
    if let Some(e) = failure {
        return Err(e);
    }
    let elapsed = began.elapsed();
    let quiesced = workload.quiesce(volume).await;
    if !quiesced {
        eprintln!(
            "warning: {inflight} in flight: not every segment caught up within \
             {QUIESCE_TIMEOUT:?} after the level; counters read anyway"
        );
    }
    let summary = Summary::of(&total, elapsed);
    let mut level = CommitLevel::of(inflight, summary, before, Counters::read(&stats));
    level.quiesced = quiesced;
    Ok(level)
}

/// Warms up connections, allocator and the nodes' queues; not recorded.
async fn warm_up(volume: &VolumeClient, workload: &Workload) -> anyhow::Result<()> {
    for _ in 0..WARMUP_TXNS {
        workload.transaction(volume).await?;
    }
    let settled = workload.quiesce(volume).await;
    if !settled {
        eprintln!("warning: segments had not caught up {QUIESCE_TIMEOUT:?} after warm-up");
    }
    Ok(())
}

/// The paced level, with what the engine sent for it.
async fn measure_paced(
    volume: &VolumeClient,
    workload: &Workload,
    per_s: u64,
    duration: Duration,
    progress: &impl Fn(&str),
) -> anyhow::Result<CommitLevel> {
    progress(&format!(
        "quorum commits, paced: one at a time, {per_s} a second …"
    ));
    let stats = volume.stats();
    let before = Counters::read(&stats);
    let (summary, _) = paced(volume, workload, per_s, duration).await?;
    let mut level = CommitLevel::of(1, summary, before, Counters::read(&stats));
    level.paced_per_s = Some(per_s);
    Ok(level)
}

/// One transaction at a time, started on a fixed schedule (`per_s` a second), as a lightly
/// loaded database would: between transactions every process goes idle.
async fn paced(
    volume: &VolumeClient,
    workload: &Workload,
    per_s: u64,
    duration: Duration,
) -> anyhow::Result<(Summary, Duration)> {
    let period = Duration::from_secs(1) / u32::try_from(per_s.max(1)).unwrap_or(u32::MAX);
    let began = Instant::now();
    let mut next = tokio::time::Instant::now();
    let mut h = stats::histogram();
    while began.elapsed() < duration {
        tokio::time::sleep_until(next).await;
        next += period;
        let start = Instant::now();
        workload.transaction(volume).await?;
        stats::record(&mut h, start.elapsed());
    }
    let elapsed = began.elapsed();
    Ok((Summary::of(&h, elapsed), elapsed))
}

/// What the transactions write: page `n` of the volume's sequence goes round-robin over the
/// PGs; the highest LSN written per PG is kept to know when every segment has caught up.
pub(crate) struct Workload {
    next: AtomicU64,
    pg_count: u64,
    pages_per_pg: u64,
    written: Vec<AtomicU64>,
}

impl Workload {
    pub(crate) fn new(volume: &VolumeClient) -> Self {
        let geometry = volume.file().geometry();
        Self {
            next: AtomicU64::new(0),
            pg_count: u64::from(geometry.pg_count),
            pages_per_pg: geometry.pages_per_pg,
            written: (0..geometry.pg_count).map(|_| AtomicU64::new(0)).collect(),
        }
    }

    /// One MTR of one 4 KiB record, committed.
    async fn transaction(&self, volume: &VolumeClient) -> anyhow::Result<()> {
        let n = self.next.fetch_add(1, Ordering::Relaxed);
        let pg = n % self.pg_count;
        let page = PageId(pg * self.pages_per_pg + (n / self.pg_count) % self.pages_per_pg);
        let record = MtrRecord {
            page,
            op: RedoOp::Write {
                offset: 0,
                bytes: vec![(n % 251) as u8; RECORD_BYTES],
            },
        };
        let commit = async {
            let cpl = volume.write_mtr(vec![record]).await?;
            self.written[pg as usize].fetch_max(cpl.0, Ordering::Relaxed);
            volume.commit(cpl).await
        };
        tokio::time::timeout(TXN_TIMEOUT, commit)
            .await
            .with_context(|| {
                format!(
                    "a transaction did not commit within {TXN_TIMEOUT:?} (VDL {})",
                    volume.vdl().0
                )
            })?
            .map_err(anyhow::Error::from)
    }

    /// Waits until every segment's SCL has reached the last LSN written in its PG.
    async fn quiesce(&self, volume: &VolumeClient) -> bool {
        let deadline = Instant::now() + QUIESCE_TIMEOUT;
        loop {
            let caught_up = self.written.iter().enumerate().all(|(pg, written)| {
                let written = Lsn(written.load(Ordering::Relaxed));
                (0..PG_SIZE).all(|segment| {
                    volume.segment_scl(PgId(pg as u32), SegmentIndex(segment as u32)) >= written
                })
            });
            if caught_up {
                return true;
            }
            if Instant::now() >= deadline {
                return false;
            }
            tokio::time::sleep(Duration::from_millis(2)).await;
        }
    }
}

pub(crate) fn print_log_tails(cluster: &LocalCluster) {
    for spec in &cluster.specs {
        let log = spec.data_dir.with_extension("log");
        let text = std::fs::read_to_string(&log).unwrap_or_default();
        let tail: Vec<&str> = text.lines().rev().take(5).collect();
        if !tail.is_empty() {
            eprintln!("{} log tail:", spec.name);
            for line in tail.iter().rev() {
                eprintln!("  {line}");
            }
        }
    }
}

fn report(
    args: &CommitArgs,
    raw: &Summary,
    commits: &[CommitLevel],
    single: &[(usize, Summary)],
    page_bytes: u64,
) {
    let commit_at = |k: usize| {
        commits
            .iter()
            .find(|c| c.inflight == k && c.paced_per_s.is_none())
    };
    let single_at = |k: usize| single.iter().find(|(i, _)| *i == k).map(|(_, s)| *s);
    // The latency target is stated at 64 in flight; with --inflight K it is read at K.
    let target_level = if commit_at(64).is_some() {
        Some(64)
    } else {
        commits
            .iter()
            .rev()
            .find(|c| c.paced_per_s.is_none())
            .map(|c| c.inflight)
    };
    let p99s = target_level.and_then(|k| {
        commit_at(k)
            .zip(single_at(k))
            .map(|(c, s)| (k, c.summary.p99_us, s.p99_us))
    });
    let per_segment: Vec<f64> = commits
        .iter()
        .filter(|c| c.paced_per_s.is_none())
        .map(CommitLevel::messages_per_segment)
        .collect();
    let falling = (per_segment.len() >= 2).then(|| per_segment.windows(2).all(|w| w[1] < w[0]));
    let total_txns: u64 = commits.iter().map(|c| c.txns).sum();
    let total_redo: u64 = commits.iter().map(|c| c.redo_bytes).sum();
    let targets = Targets {
        p99s,
        falling,
        redo_bytes_per_txn: total_redo as f64 / total_txns.max(1) as f64,
        page_bytes,
    };
    let report = Report {
        args,
        raw,
        commits,
        single,
        targets,
    };
    if args.json {
        report.json();
    } else {
        report.text();
    }
}

/// Everything one run reports, in text or JSON.
struct Report<'a> {
    args: &'a CommitArgs,
    raw: &'a Summary,
    commits: &'a [CommitLevel],
    single: &'a [(usize, Summary)],
    targets: Targets,
}

/// The verdicts a report states.
struct Targets {
    /// (level, commit p99, single-node p99) at the level the latency target is read at.
    p99s: Option<(usize, u64, u64)>,
    falling: Option<bool>,
    redo_bytes_per_txn: f64,
    page_bytes: u64,
}

impl Report<'_> {
    fn json(&self) {
        let Report {
            args,
            raw,
            commits,
            single,
            ref targets,
        } = *self;
        let Targets {
            p99s,
            falling,
            redo_bytes_per_txn,
            page_bytes,
        } = *targets;
        let mut commit = serde_json::Map::new();
        let mut messages = serde_json::Map::new();
        let mut messages_per_segment = serde_json::Map::new();
        let mut bytes = serde_json::Map::new();
        let mut appends = serde_json::Map::new();
        for c in commits {
            let key = match c.paced_per_s {
                Some(r) => format!("paced_{r}_per_s"),
                None => format!("inflight_{}", c.inflight),
            };
            commit.insert(key.clone(), json!(c.summary));
            messages.insert(key.clone(), json!(c.messages_per_txn));
            messages_per_segment.insert(key.clone(), json!(c.messages_per_segment()));
            bytes.insert(key.clone(), json!(c.bytes_per_txn));
            appends.insert(key, json!(c.appends_per_txn));
        }
        let mut single_node = serde_json::Map::new();
        for (k, s) in single {
            single_node.insert(format!("inflight_{k}"), json!(s));
        }
        let out = json!({
            "commit": commit,
            "single_node": single_node,
            "messages_per_txn": messages,
            "messages_per_txn_per_segment": messages_per_segment,
            "appends_per_txn": appends,
            "bytes_sent_per_txn": bytes,
            "redo_bytes_per_txn": redo_bytes_per_txn,
            "engine_page_bytes_sent": page_bytes,
            "raw": raw,
            "record_bytes": RECORD_BYTES,
            "engine_runtime": runtime_name(args.engine_threads),
            "targets": {
                "p99_level": p99s.map(|(k, _, _)| k),
                "commit_p99_us": p99s.map(|(_, c, _)| c),
                "single_node_p99_us": p99s.map(|(_, _, s)| s),
                "commit_p99_within_single_node": p99s.map(|(_, c, s)| c <= s),
                "messages_per_segment_falling": falling,
                "engine_page_bytes_zero": page_bytes == 0,
            },
        });
        println!("{out}");
    }

    fn text(&self) {
        let Report {
            raw,
            commits,
            single,
            ref targets,
            ..
        } = *self;
        let Targets {
            p99s,
            falling,
            redo_bytes_per_txn,
            page_bytes,
        } = *targets;
        println!("{}", raw.line("raw disk: write + fdatasync, 1 in flight"));
        for c in commits {
            let label = match c.paced_per_s {
                Some(r) => format!("quorum commit (4/6), paced {r}/s, 1 at a time"),
                None => format!("quorum commit (4/6), {} in flight", c.inflight),
            };
            println!("{}", c.summary.line(&label));
            println!(
                "    per txn: {:.2} messages ({:.3} per segment), {:.2} appends, {:.0} bytes sent, \
             {:.0} redo bytes{}",
                c.messages_per_txn,
                c.messages_per_segment(),
                c.appends_per_txn,
                c.bytes_per_txn,
                c.redo_bytes_per_txn,
                if c.quiesced {
                    ""
                } else {
                    " (segments had not caught up)"
                }
            );
        }
        for (k, s) in single {
            println!("{}", s.line(&format!("single node append, {k} in flight")));
        }
        println!("redo bytes per committed txn (all levels): {redo_bytes_per_txn:.0}");
        println!("engine page bytes sent: {page_bytes}");
        let verdict = |ok: bool| if ok { "met" } else { "MISSED" };
        if let Some((k, commit_p99, single_p99)) = p99s {
            let note = if k == 64 { "" } else { " (stated at 64)" };
            println!(
                "target: quorum commit p99 at {k} in flight = {commit_p99} µs ≤ single-node \
             append p99 = {single_p99} µs{note}: {}",
                verdict(commit_p99 <= single_p99)
            );
        }
        if let Some(falling) = falling {
            let chain: Vec<String> = commits
                .iter()
                .filter(|c| c.paced_per_s.is_none())
                .map(|c| format!("{:.3} at {}", c.messages_per_segment(), c.inflight))
                .collect();
            println!(
                "target: messages per committed txn per segment fall as concurrency rises ({}): {}",
                chain.join(" → "),
                verdict(falling)
            );
        }
        println!(
            "target: engine page bytes sent = {page_bytes} (= 0): {}",
            verdict(page_bytes == 0)
        );
    }
}
