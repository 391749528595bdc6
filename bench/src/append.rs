//! `sixfold-bench append`: one node, single-record 4 KiB batches at 1, 16 and 64 in flight,
//! beside the raw disk (4 KiB O_DIRECT write + fdatasync through io_uring, one in flight).
//!
//! Targets (read, never asserted in tests): node p50 at 1 in flight ≤ raw p50 + 100 µs;
//! throughput at 64 in flight ≥ 10× that at 1 in flight (group commit at work).

use std::path::Path;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use anyhow::Context;
use engine::NodeClient;
use engine::tls::ClientIdentity;
use node::config::{PersisterMode, SyncMode};
use node::io::raw;
use serde_json::json;
use tools::procs::{NodeProcess, NodeSpec};
use wire::{Append, Epoch, LogRecord, Lsn, PageId, PgId, RedoOp, SegmentIndex, VolumeId};

use crate::stats::{self, Summary};

#[derive(clap::Args, Debug)]
pub(crate) struct AppendArgs {
    #[command(flatten)]
    pub(crate) target: crate::Target,
    /// Seconds per measurement (the raw disk and each concurrency level).
    #[arg(long, default_value_t = 10)]
    pub(crate) seconds: u64,
    /// Measure only this many appends in flight (default: 1, 16 and 64).
    #[arg(long)]
    pub(crate) inflight: Option<usize>,
    /// Payload bytes of each record.
    #[arg(long, default_value_t = 4096)]
    pub(crate) record_bytes: usize,
    /// Durability mode of the node the bench starts (default: the node's default).
    #[arg(long, value_enum)]
    pub(crate) sync: Option<SyncMode>,
    /// Where the node's persister runs (default: the node's default).
    #[arg(long, value_enum)]
    pub(crate) persister: Option<PersisterMode>,
    /// Print one JSON object instead of the table.
    #[arg(long)]
    pub(crate) json: bool,
}

/// Appends a many-in-flight run can make per second at most (≈ 400 MB/s of 4 KiB records),
/// used to size the node's journal so it never fills during the run.
const APPENDS_PER_S_MAX: u64 = 100_000;

impl AppendArgs {
    /// Raw probes, the round trip and each level, four times over, plus node starts.
    pub(crate) fn deadline_default(&self) -> Duration {
        let levels = if self.inflight.is_some() { 1 } else { 3 };
        Duration::from_secs(300 + 4 * self.seconds * (levels + 3))
    }
}

pub(crate) fn run(args: &AppendArgs) -> anyhow::Result<()> {
    anyhow::ensure!(args.seconds > 0, "--seconds must be at least 1");
    anyhow::ensure!(
        args.record_bytes > 0 && args.record_bytes <= 65_536,
        "--record-bytes must be between 1 and 65536"
    );
    let levels = match args.inflight {
        Some(0) => anyhow::bail!("--inflight must be at least 1"),
        Some(k) => vec![k],
        None => vec![1, 16, 64],
    };
    let dir = &args.target.dir;
    std::fs::create_dir_all(dir).with_context(|| format!("cannot create {}", dir.display()))?;
    let duration = Duration::from_secs(args.seconds);
    let progress = |m: &str| {
        crate::watchdog::phase(m);
        if !args.json {
            eprintln!("{m}")
        }
    };

    progress("raw disk: 4 KiB O_DIRECT write + fdatasync (linked), io_uring, 1 in flight …");
    let raw = raw_summary(dir, duration, SyncMode::Fdatasync)?;
    progress("raw disk: 4 KiB O_DIRECT write with RWF_DSYNC, io_uring, 1 in flight …");
    let raw_dsync = raw_summary(dir, duration, SyncMode::RwfDsync)?;

    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    let mut results = Vec::new();
    let mut rtt = None;
    for &inflight in &levels {
        // A fresh node per level, its journal sized for the level, so levels never share
        // a half-full journal and a long run never fills one.
        let (node, identity) = node_under_test(args, inflight, &raw)?;
        if rtt.is_none() {
            progress("node: round trip without disk (refused appends), 1 in flight …");
            let d = duration.min(Duration::from_secs(3));
            rtt = Some(runtime.block_on(measure_rtt(&node, &identity, d))?);
        }
        progress(&format!(
            "node: single-record appends, {inflight} in flight …"
        ));
        let summary = runtime.block_on(measure_node(
            &node,
            &identity,
            inflight,
            args.record_bytes,
            duration,
        ))?;
        results.push((inflight, summary));
    }
    let rtt = rtt.expect("at least one level");
    report(args, &raw, &raw_dsync, &rtt, &results);
    Ok(())
}

pub(crate) fn raw_summary(
    dir: &Path,
    duration: Duration,
    mode: SyncMode,
) -> anyhow::Result<Summary> {
    let began = Instant::now();
    let latencies = raw::measure(dir, 4096, 64 << 20, duration, usize::MAX, mode)
        .with_context(|| format!("raw O_DIRECT probe under {} failed", dir.display()))?;
    let elapsed = began.elapsed();
    let mut h = stats::histogram();
    for latency in latencies {
        stats::record(&mut h, latency);
    }
    Ok(Summary::of(&h, elapsed))
}

/// Either the running node of `--connect`, or a fresh node under `--dir` whose journal holds
/// what `inflight` appends in flight can write in `--seconds` at most.
pub(crate) fn node_under_test(
    args: &AppendArgs,
    inflight: usize,
    raw: &Summary,
) -> anyhow::Result<(NodeHandle, ClientIdentity)> {
    let target = &args.target;
    if let (Some(addr), Some(certs)) = (target.connect, &target.certs) {
        return Ok((
            NodeHandle::Remote(addr),
            ClientIdentity::in_dir(certs, "engine"),
        ));
    }
    let run_dir = target
        .dir
        .join(format!("bench-{}-{inflight}", std::process::id()));
    let certs = run_dir.join("certs");
    tools::certs::generate(&certs, &["node1".into()], &["engine".into()])?;
    let mut spec = NodeSpec::local("node1", &run_dir.join("node1"), &certs);
    if let Some(sync) = args.sync {
        spec.sync = sync;
    }
    if let Some(persister) = args.persister {
        spec.persister = persister;
    }
    // One in flight cannot beat the disk's own rate by much; more in flight is bounded by
    // a generous guess at group commit's best.
    let rate_max = if inflight == 1 {
        3_000_000 / raw.p50_us.max(10)
    } else {
        APPENDS_PER_S_MAX
    };
    let file_bytes: u64 = 256 << 20;
    let total = rate_max * args.seconds * (args.record_bytes as u64 + 80);
    spec.journal_file_bytes = file_bytes;
    spec.journal_file_count = u32::try_from(total.div_ceil(file_bytes) + 1)
        .unwrap_or(64)
        .min(64);
    let starting = format!(
        "starting sixfold-node under {} ({} journal files of 256 MiB to pre-write) …",
        run_dir.display(),
        spec.journal_file_count
    );
    crate::watchdog::phase(&starting);
    if !args.json {
        eprintln!("{starting}");
    }
    let process = NodeProcess::start(&spec.write_config()?)?;
    Ok((
        NodeHandle::Local { process, run_dir },
        ClientIdentity::in_dir(&certs, "engine"),
    ))
}

pub(crate) enum NodeHandle {
    Local {
        process: NodeProcess,
        run_dir: std::path::PathBuf,
    },
    Remote(std::net::SocketAddr),
}

impl NodeHandle {
    fn addr(&self) -> std::net::SocketAddr {
        match self {
            NodeHandle::Local { process, .. } => process.addr,
            NodeHandle::Remote(addr) => *addr,
        }
    }
}

impl Drop for NodeHandle {
    fn drop(&mut self) {
        if let NodeHandle::Local { process, run_dir } = self {
            let _ = process.terminate();
            let _ = std::fs::remove_dir_all(run_dir);
        }
    }
}

/// LSNs are unique per process run so that repeated levels against one node never collide.
static NEXT_LSN: AtomicU64 = AtomicU64::new(1);

pub(crate) fn one_record(record_bytes: usize) -> Append {
    let lsn = NEXT_LSN.fetch_add(1, Ordering::Relaxed);
    Append {
        volume: VolumeId(1),
        epoch: Epoch(1),
        pg: PgId(0),
        segment: SegmentIndex(0),
        vdl: Lsn::ZERO,
        records: vec![LogRecord {
            lsn: Lsn(lsn),
            backlink: Lsn(lsn - 1),
            page: PageId(lsn % 1024),
            cpl: true,
            op: RedoOp::Write {
                offset: 0,
                bytes: vec![(lsn % 251) as u8; record_bytes],
            },
        }],
    }
}

pub(crate) async fn measure_node(
    node: &NodeHandle,
    identity: &ClientIdentity,
    inflight: usize,
    record_bytes: usize,
    duration: Duration,
) -> anyhow::Result<Summary> {
    let endpoint = engine::tls::client_endpoint(identity)?;
    let (client, _) = NodeClient::connect(&endpoint, node.addr(), "node1").await?;
    install_epoch(&client).await?;
    let client = Arc::new(client);
    // Warm up connections, allocator and the node's queues; not recorded.
    for _ in 0..100 {
        append_once(&client, record_bytes).await?;
    }
    let began = Instant::now();
    let deadline = began + duration;
    let mut tasks = Vec::new();
    for _ in 0..inflight {
        let client = client.clone();
        tasks.push(tokio::spawn(async move {
            let mut h = stats::histogram();
            while Instant::now() < deadline {
                let start = Instant::now();
                append_once(&client, record_bytes).await?;
                stats::record(&mut h, start.elapsed());
            }
            anyhow::Ok(h)
        }));
    }
    let mut total = stats::histogram();
    for task in tasks {
        total.add(task.await??).expect("same bounds");
    }
    let elapsed = began.elapsed();
    client.close();
    Ok(Summary::of(&total, elapsed))
}

/// Installs the epoch the benchmark appends at (a node learns epochs only from Fence,
/// Truncate or HostSegments); a node already there answers the same.
pub(crate) async fn install_epoch(client: &NodeClient) -> anyhow::Result<()> {
    let fence = wire::Fence {
        volume: VolumeId(1),
        epoch_current: Epoch(0),
        epoch_new: Epoch(1),
    };
    match client.request(wire::Message::Fence(fence)).await? {
        wire::Message::VolumeState(_) => Ok(()),
        other => anyhow::bail!("the node refused epoch 1: {other:?}"),
    }
}

/// The network and processing round trip alone: appends to a segment the node does not host
/// are refused before the persister, so no disk is involved.
async fn measure_rtt(
    node: &NodeHandle,
    identity: &ClientIdentity,
    duration: Duration,
) -> anyhow::Result<Summary> {
    let endpoint = engine::tls::client_endpoint(identity)?;
    let (client, _) = NodeClient::connect(&endpoint, node.addr(), "node1").await?;
    let mut h = stats::histogram();
    let began = Instant::now();
    while began.elapsed() < duration {
        let mut append = one_record(4096);
        append.pg = PgId(u32::MAX);
        let start = Instant::now();
        let reply = client.append(append).await?;
        anyhow::ensure!(reply.is_err(), "the node hosts pg {}?", u32::MAX);
        stats::record(&mut h, start.elapsed());
    }
    client.close();
    Ok(Summary::of(&h, began.elapsed()))
}

async fn append_once(client: &NodeClient, record_bytes: usize) -> anyhow::Result<()> {
    match client.append(one_record(record_bytes)).await? {
        Ok(_) => Ok(()),
        Err(e) => anyhow::bail!("node refused an append: {:?}: {}", e.code, e.message),
    }
}

fn report(
    args: &AppendArgs,
    raw: &Summary,
    raw_dsync: &Summary,
    rtt: &Summary,
    results: &[(usize, Summary)],
) {
    let at = |k: usize| results.iter().find(|(i, _)| *i == k).map(|(_, s)| *s);
    let latency_overhead_us = at(1).map(|s| s.p50_us as i64 - raw.p50_us as i64);
    let group_commit_ratio = at(1)
        .zip(at(64))
        .map(|(one, many)| many.ops_per_s / one.ops_per_s);
    if args.json {
        let mut node = serde_json::Map::new();
        for (k, s) in results {
            node.insert(
                format!("inflight_{k}"),
                serde_json::to_value(s).expect("plain struct"),
            );
        }
        let out = json!({
            "raw": raw,
            "raw_rwf_dsync": raw_dsync,
            "round_trip_without_disk": rtt,
            "node": node,
            "record_bytes": args.record_bytes,
            "targets": {
                "p50_overhead_us_at_1": latency_overhead_us,
                "p50_overhead_us_max": 100,
                "throughput_ratio_64_over_1": group_commit_ratio,
                "throughput_ratio_min": 10,
            },
        });
        println!("{out}");
        return;
    }
    println!("{}", raw.line("raw disk: write + fdatasync, 1 in flight"));
    println!(
        "{}",
        raw_dsync.line("raw disk: write RWF_DSYNC, 1 in flight")
    );
    println!("{}", rtt.line("node round trip without disk, 1 in flight"));
    for (k, s) in results {
        let ratio = s.p50_us as f64 / raw.p50_us.max(1) as f64;
        println!(
            "{}  p50 = {ratio:.2}× raw",
            s.line(&format!("node append, {k} in flight"))
        );
    }
    if let Some(overhead) = latency_overhead_us {
        let verdict = if overhead <= 100 { "met" } else { "MISSED" };
        println!("target: node p50 at 1 in flight − raw p50 = {overhead} µs (≤ 100 µs): {verdict}");
    }
    if let Some(ratio) = group_commit_ratio {
        let verdict = if ratio >= 10.0 { "met" } else { "MISSED" };
        println!("target: ops/s at 64 in flight ÷ ops/s at 1 = {ratio:.1}× (≥ 10×): {verdict}");
    }
}
