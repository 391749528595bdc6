//! `sixfold dev`: a whole local cluster in one command — six nodes in three AZs on loopback,
//! certificates, a volume, an engine attached, and a small self-verifying write/read workload
//! whose VDL and commit latency are printed every second.
//!
//! Invariants:
//! - dev supervises its nodes: a node that dies is restarted (with backoff) and the restart is
//!   logged; a node that died is never an error;
//! - SIGINT or SIGTERM stops everything: workers, then every node with SIGTERM, SIGKILL only
//!   past a deadline; dev then exits 0 unless the workload's self-check failed. A second
//!   signal exits at once (the nodes still get SIGTERM, as they die with dev);
//! - no wait is unbounded: workers, the supervisor and the nodes each get a deadline;
//! - every page the workload writes is a whole page that verifies itself (see
//!   [`page_image`]); every page it reads must verify, and be at least the version this run
//!   last committed for it, or dev says so loudly and exits non-zero;
//! - run again on the same `--dir`, dev reopens the cluster and volume it created.

use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use engine::quorum::{MtrRecord, PG_SIZE, WRITE_QUORUM};
use engine::{VolumeClient, VolumeConfig, VolumeError};
use hdrhistogram::Histogram;
use tokio::sync::watch;
use tokio::task::JoinHandle;
use wire::{Lsn, PageId, PgId, RedoOp, SegmentIndex};

use crate::cluster::{ClusterOptions, LocalCluster};
use crate::procs::{Backoff, NodeState, STOP_GRACE, Supervisor};

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
/// How often the supervisor looks at the nodes.
const SUPERVISE_INTERVAL: Duration = Duration::from_millis(200);
/// How long workers get to finish once asked to stop, before they are aborted.
const WORKER_STOP_DEADLINE: Duration = Duration::from_secs(10);

/// A new dev cluster's options: small journals, since until garbage collection exists they
/// only fill (256 MiB per node lasts about ten minutes of the paced workload).
fn cluster_options() -> ClusterOptions {
    ClusterOptions {
        journal_file_bytes: 32 << 20,
        journal_file_count: 8,
        ..ClusterOptions::default()
    }
}

/// Runs the dev cluster until the duration passes, a signal arrives or the self-check fails.
pub async fn run(options: DevOptions) -> anyhow::Result<()> {
    let (stop_tx, stop) = watch::channel(false);
    let stop_tx = Arc::new(stop_tx);
    // Watched from the start, so a Ctrl-C during startup stops dev cleanly once it is up.
    let signals = watch_signals(stop_tx.clone())?;
    let mut cluster = open_cluster(&options).await?;
    let supervisor = Arc::new(Mutex::new(cluster.supervisor(Backoff::default())));
    let supervising = tokio::spawn(supervise(supervisor.clone(), stop.clone()));
    let outcome = if *stop.borrow() {
        Ok(())
    } else {
        run_workload(&cluster, &supervisor, &stop_tx, &options).await
    };
    stop_tx.send_replace(true);
    if tokio::time::timeout(Duration::from_secs(5), supervising)
        .await
        .is_err()
    {
        eprintln!("sixfold dev: the supervisor did not stop within 5 s");
    }
    stop_nodes(supervisor).await;
    signals.abort();
    outcome
}

/// Creates the cluster under `--dir`, or reopens the one there, and says where its nodes are.
async fn open_cluster(options: &DevOptions) -> anyhow::Result<LocalCluster> {
    let dir = options.dir.display();
    if options.dir.join("volume.toml").is_file() {
        eprintln!("sixfold dev: reopening the cluster under {dir} (volume.toml found) …");
    } else {
        eprintln!("sixfold dev: starting 6 nodes in 3 AZs under {dir} …");
    }
    let cluster = LocalCluster::open_or_start(&options.dir, &cluster_options()).await?;
    for (spec, node) in cluster.specs.iter().zip(&cluster.nodes) {
        let pid = node.as_ref().map_or(0, |n| n.pid());
        eprintln!("  {} ({}) on {} pid {pid}", spec.name, spec.az, spec.listen);
    }
    eprintln!("  volume: {}", cluster.dir.join("volume.toml").display());
    eprintln!(
        "  restart a node by hand (with dev stopped): sixfold-node --config {}",
        cluster.config_path(0).display()
    );
    Ok(cluster)
}

/// Sets `stop` on SIGINT or SIGTERM; exits the process on a second one.
fn watch_signals(stop: Arc<watch::Sender<bool>>) -> anyhow::Result<JoinHandle<()>> {
    use tokio::signal::unix::{SignalKind, signal};
    let mut term = signal(SignalKind::terminate())?;
    let mut int = signal(SignalKind::interrupt())?;
    Ok(tokio::spawn(async move {
        for received in 0.. {
            let name = tokio::select! {
                _ = term.recv() => "SIGTERM",
                _ = int.recv() => "SIGINT",
            };
            if received > 0 {
                eprintln!("sixfold dev: {name} again: exiting now");
                std::process::exit(130);
            }
            eprintln!("sixfold dev: {name}: stopping …");
            stop.send_replace(true);
        }
    }))
}

/// Restarts nodes that die, logging what it sees, until `stop`.
async fn supervise(supervisor: Arc<Mutex<Supervisor>>, mut stop: watch::Receiver<bool>) {
    let mut tick = tokio::time::interval(SUPERVISE_INTERVAL);
    loop {
        tokio::select! {
            _ = tick.tick() => {}
            _ = stop.wait_for(|&s| s) => return,
        }
        let events = supervisor
            .lock()
            .expect("supervisor lock")
            .poll(Instant::now());
        for event in events {
            eprintln!("sixfold dev: {event}");
        }
    }
}

/// Stops every node (SIGTERM, then SIGKILL past `STOP_GRACE`) and says how it went.
async fn stop_nodes(supervisor: Arc<Mutex<Supervisor>>) {
    let stopping = tokio::task::spawn_blocking(move || {
        supervisor.lock().expect("supervisor lock").stop(STOP_GRACE)
    });
    // `stop` bounds itself (grace, then a bounded reap); this is the backstop.
    let deadline = STOP_GRACE + Duration::from_secs(30);
    let outcomes = match tokio::time::timeout(deadline, stopping).await {
        Ok(Ok(outcomes)) => outcomes,
        Ok(Err(e)) => {
            eprintln!("sixfold dev: stopping the nodes failed: {e}");
            return;
        }
        Err(_) => {
            eprintln!("sixfold dev: the nodes did not stop within {deadline:?}");
            return;
        }
    };
    let unclean: Vec<String> = outcomes
        .iter()
        .filter(|(_, outcome)| !outcome.is_clean())
        .map(|(name, outcome)| format!("{name} {outcome}"))
        .collect();
    if unclean.is_empty() {
        eprintln!("sixfold dev: stopped cleanly");
    } else {
        eprintln!("sixfold dev: stopped; {}", unclean.join(", "));
    }
}

/// Attaches the engine, runs the workers and the progress report until `stop`, and stops
/// the workers. An error only if the self-check failed or the writer could not go on.
async fn run_workload(
    cluster: &LocalCluster,
    supervisor: &Mutex<Supervisor>,
    stop_tx: &Arc<watch::Sender<bool>>,
    options: &DevOptions,
) -> anyhow::Result<()> {
    // The one place dev attaches an engine: `attach` runs crash recovery (learns the SCLs
    // from the nodes, computes VDL, bumps the epoch, truncates), so a reopened volume carries
    // on from the VDL the previous run reached, however it stopped.
    let volume = Arc::new(cluster.attach(VolumeConfig::default()).await?);
    eprintln!(
        "sixfold dev: engine attached: VDL {} epoch {:#x}",
        volume.vdl().0,
        volume.epoch().0
    );
    let load = Arc::new(Workload::new(volume));
    let workers: Vec<_> = (0..options.workers)
        .map(|w| {
            let (load, stop_tx) = (load.clone(), stop_tx.clone());
            tokio::spawn(async move {
                let result = worker(&load, stop_tx.subscribe(), w as u64 + 1).await;
                if result.is_err() {
                    stop_tx.send_replace(true); // A failed worker stops the run.
                }
                result
            })
        })
        .collect();
    report_until_stopped(&load, supervisor, stop_tx.subscribe(), options.duration).await;
    stop_tx.send_replace(true);
    join_workers(workers).await
}

/// Waits for the workers (they stop at once when asked, even mid-commit), aborting any still
/// running after `WORKER_STOP_DEADLINE`; returns the first worker error.
async fn join_workers(workers: Vec<JoinHandle<anyhow::Result<()>>>) -> anyhow::Result<()> {
    let deadline = tokio::time::Instant::now() + WORKER_STOP_DEADLINE;
    let mut first_error = None;
    for mut worker in workers {
        let error = match tokio::time::timeout_at(deadline, &mut worker).await {
            Ok(Ok(Ok(()))) => None,
            Ok(Ok(Err(e))) => Some(e),
            Ok(Err(join)) => Some(anyhow::anyhow!("a worker panicked: {join}")),
            Err(_) => {
                worker.abort();
                eprintln!("sixfold dev: a worker did not stop within {WORKER_STOP_DEADLINE:?}");
                None
            }
        };
        first_error = first_error.or(error);
    }
    first_error.map_or(Ok(()), Err)
}

fn histogram() -> Histogram<u64> {
    Histogram::new_with_bounds(1, 100_000_000, 3).expect("valid bounds")
}

/// Prints a progress line every second until `stop` or the duration passes; when VDL did not
/// move during the second, the line says why.
async fn report_until_stopped(
    load: &Workload,
    supervisor: &Mutex<Supervisor>,
    mut stop: watch::Receiver<bool>,
    duration: Option<Duration>,
) {
    let began = Instant::now();
    let mut tick = tokio::time::interval(Duration::from_secs(1));
    tick.tick().await;
    let mut last_vdl = load.volume.vdl();
    loop {
        tokio::select! {
            _ = tick.tick() => {}
            _ = stop.wait_for(|&s| s) => break,
        }
        let h = std::mem::replace(&mut *load.latencies.lock().expect("latencies"), histogram());
        let vdl = load.volume.vdl();
        let mut line = format!(
            "t={:>4}s  VDL {:>9}  commits/s {:>6}  commit latency p50 {:>6} µs  p99 {:>6} µs  max {:>6} µs",
            began.elapsed().as_secs(),
            vdl.0,
            h.len(),
            h.value_at_quantile(0.5),
            h.value_at_quantile(0.99),
            h.max()
        );
        if vdl == last_vdl {
            let states = supervisor.lock().expect("supervisor lock").states();
            line.push_str("  | ");
            line.push_str(&stall_reason(&load.volume, vdl, &states));
        }
        last_vdl = vdl;
        println!("{line}");
        if duration.is_some_and(|d| began.elapsed() >= d) {
            break;
        }
    }
}

/// [`explain_stall`] for a live volume and the supervisor's node states (by node name).
fn stall_reason(volume: &VolumeClient, vdl: Lsn, states: &[(String, NodeState)]) -> String {
    let file = volume.file();
    let nodes: Vec<(String, NodeState)> = file
        .nodes
        .iter()
        .map(|entry| {
            let state = states.iter().find(|(name, _)| *name == entry.name);
            (
                entry.name.clone(),
                state.map_or(NodeState::Down, |(_, s)| *s),
            )
        })
        .collect();
    let scl = |pg: usize, segment: usize| {
        volume.segment_scl(PgId(pg as u32), SegmentIndex(segment as u32))
    };
    explain_stall(vdl, &file.placement(), &nodes, scl)
}

/// The SCL a segment of a PG needs to count as caught up: VDL if the PG has records above
/// VDL (a segment acked one), else the PG's last record the writer knows of. A segment's SCL
/// never passes its PG's last record, so the segments of a PG with nothing written near VDL
/// are caught up below it.
fn caught_up_mark(vdl: Lsn, scls: &[Lsn]) -> Lsn {
    scls.iter().copied().max().unwrap_or(Lsn::ZERO).min(vdl)
}

/// Why VDL is not moving, in one line: the PGs lacking a write quorum (fewer than
/// `WRITE_QUORUM` of their segments on nodes that are up and caught up), the nodes down (not
/// serving) with their segments, and the segments behind (SCL, as the writer knows it from
/// acks, below VDL; see [`caught_up_mark`]). `placement[pg][segment]` indexes `nodes`.
pub fn explain_stall(
    vdl: Lsn,
    placement: &[[usize; PG_SIZE]],
    nodes: &[(String, NodeState)],
    scl: impl Fn(usize, usize) -> Lsn,
) -> String {
    let mut lacking = Vec::new();
    let mut down: Vec<Vec<String>> = vec![Vec::new(); nodes.len()];
    let mut behind = Vec::new();
    for (pg, segments) in placement.iter().enumerate() {
        let scls: Vec<Lsn> = (0..PG_SIZE).map(|segment| scl(pg, segment)).collect();
        let mark = caught_up_mark(vdl, &scls);
        let mut complete = 0;
        for (segment, &node) in segments.iter().enumerate() {
            let name = format!("pg{pg}/seg{segment}");
            if !matches!(nodes[node].1, NodeState::Up { .. }) {
                down[node].push(name);
            } else if scls[segment] < mark {
                let (node, scl) = (&nodes[node].0, scls[segment].0);
                behind.push(format!("{name} on {node} (SCL {scl} < {})", mark.0));
            } else {
                complete += 1;
            }
        }
        if complete < WRITE_QUORUM {
            lacking.push(format!("pg{pg} has {complete}"));
        }
    }
    let mut parts = vec![if lacking.is_empty() {
        format!(
            "VDL stalled though every PG has {WRITE_QUORUM} of {PG_SIZE} segments up and caught up (waiting for acks)"
        )
    } else {
        format!(
            "VDL stalled: no write quorum ({WRITE_QUORUM} of {PG_SIZE} segments up and caught up): {}",
            lacking.join(", ")
        )
    }];
    let down: Vec<String> = nodes
        .iter()
        .zip(&down)
        .filter(|(_, segments)| !segments.is_empty())
        .map(|((name, state), segments)| {
            let how = match state {
                NodeState::Starting { .. } => "starting",
                _ => "not running",
            };
            format!("{name} {how} ({})", segments.join(" "))
        })
        .collect();
    if !down.is_empty() {
        parts.push(format!("down: {}", down.join(", ")));
    }
    if !behind.is_empty() {
        parts.push(format!("behind: {}", behind.join(", ")));
    }
    parts.join("; ")
}

/// Page layout of the self-verifying workload; every page it writes is written whole:
///
/// ```text
/// offset     size        field
///      0     8           page id, little-endian
///      8     8           version, little-endian (never 0)
///     16     size - 20   payload: an xorshift64* stream seeded from (page id, version)
/// size-4     4           crc32 of bytes [0, size - 4)
/// ```
///
/// A page never written reads as all zeroes, which is version 0.
pub fn page_image(page: u64, version: u64, size: usize) -> Vec<u8> {
    let mut bytes = vec![0u8; size];
    bytes[0..8].copy_from_slice(&page.to_le_bytes());
    bytes[8..16].copy_from_slice(&version.to_le_bytes());
    let mut rng = Rng::new(page.wrapping_mul(0x9E37_79B9_7F4A_7C15) ^ version.rotate_left(29));
    for chunk in bytes[16..size - 4].chunks_mut(8) {
        chunk.copy_from_slice(&rng.next_u64().to_le_bytes()[..chunk.len()]);
    }
    let crc = crc32fast::hash(&bytes[..size - 4]);
    bytes[size - 4..].copy_from_slice(&crc.to_le_bytes());
    bytes
}

/// One MTR writing version `version` of each page whole.
pub fn page_mtr(pages: &[u64], version: u64, page_size: usize) -> Vec<MtrRecord> {
    pages
        .iter()
        .map(|&page| MtrRecord {
            page: PageId(page),
            op: RedoOp::Write {
                offset: 0,
                bytes: page_image(page, version, page_size),
            },
        })
        .collect()
}

/// The version of a page image of `page` as [`page_image`] writes it, or why it is not one.
pub fn page_version(page: u64, bytes: &[u8], size: usize) -> Result<u64, String> {
    if bytes.len() != size {
        return Err(format!("{} bytes instead of {size}", bytes.len()));
    }
    if bytes.iter().all(|&b| b == 0) {
        return Ok(0);
    }
    let (body, crc) = bytes.split_at(size - 4);
    let stored = u32::from_le_bytes(crc.try_into().expect("4 bytes"));
    let computed = crc32fast::hash(body);
    if stored != computed {
        return Err(format!(
            "a bad checksum (stored {stored:#010x}, computed {computed:#010x})"
        ));
    }
    let field = |at: usize| u64::from_le_bytes(body[at..at + 8].try_into().expect("8 bytes"));
    let (id, version) = (field(0), field(8));
    if id != page {
        return Err(format!("page {id}'s content (version {version})"));
    }
    if version == 0 {
        return Err("version 0 with content".to_string());
    }
    let expected = page_image(page, version, size);
    match expected.iter().zip(bytes).position(|(a, b)| a != b) {
        Some(at) => Err(format!("version {version} with wrong content at byte {at}")),
        None => Ok(version),
    }
}

/// The workload's shared state: the volume, the versions this run committed, latencies.
struct Workload {
    volume: Arc<VolumeClient>,
    page_size: usize,
    /// The next version to write. It starts at this run's start time in microseconds: a run
    /// writes far fewer than a version per microsecond, so a later run's versions exceed an
    /// earlier run's (unless the clock steps back).
    next_version: AtomicU64,
    /// Held while a version is drawn and its MTR allocated, so that a page's versions
    /// increase with its LSNs.
    write_order: tokio::sync::Mutex<()>,
    /// Page → the highest version this run committed for it.
    committed: Mutex<HashMap<u64, u64>>,
    latencies: Mutex<Histogram<u64>>,
}

impl Workload {
    fn new(volume: Arc<VolumeClient>) -> Self {
        let now = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap_or_default();
        Self {
            page_size: volume.file().page_size_bytes as usize,
            volume,
            next_version: AtomicU64::new(u64::try_from(now.as_micros()).unwrap_or(1).max(1)),
            write_order: tokio::sync::Mutex::new(()),
            committed: Mutex::new(HashMap::new()),
            latencies: Mutex::new(histogram()),
        }
    }

    /// Writes a new version of each page in one MTR; returns its CPL and the version.
    async fn write(&self, pages: &[u64]) -> Result<(Lsn, u64), VolumeError> {
        let _order = self.write_order.lock().await;
        let version = self.next_version.fetch_add(1, Ordering::Relaxed);
        let records = page_mtr(pages, version, self.page_size);
        Ok((self.volume.write_mtr(records).await?, version))
    }

    fn record_latency(&self, latency: Duration) {
        let us = u64::try_from(latency.as_micros()).unwrap_or(u64::MAX);
        let mut latencies = self.latencies.lock().expect("latencies");
        latencies.record(us.clamp(1, 100_000_000)).expect("bounded");
    }

    fn committed(&self, pages: &[u64], version: u64) {
        let mut committed = self.committed.lock().expect("committed");
        for &page in pages {
            let entry = committed.entry(page).or_default();
            *entry = (*entry).max(version);
        }
    }

    /// Reads `page` and checks it. A read that fails is reported and tolerated (nodes come
    /// and go); a page that does not verify is a self-check failure.
    async fn check_read(&self, page: u64) -> anyhow::Result<()> {
        // Taken before the read: every version committed by now is ≤ the read point.
        let floor = self
            .committed
            .lock()
            .expect("committed")
            .get(&page)
            .copied();
        let floor = floor.unwrap_or(0);
        let image = match self.volume.read_page(PageId(page)).await {
            Ok(image) => image,
            Err(e) => {
                eprintln!("sixfold dev: reading page {page} failed (retried later): {e:#}");
                return Ok(());
            }
        };
        let found = match page_version(page, &image.bytes, self.page_size) {
            Ok(version) if version >= floor => return Ok(()),
            Ok(version) => format!("version {version}"),
            Err(why) => why,
        };
        let message = format!(
            "page {page} (page LSN {}): expected version ≥ {floor} (the last this run \
             committed), found {found}",
            image.lsn.0
        );
        eprintln!("sixfold dev: SELF-CHECK FAILED: {message}");
        anyhow::bail!("self-check failed: {message}")
    }
}

/// One worker: MTRs writing a new version of one or two pages, each committed, with a
/// checked read now and then. Returns at once when `stop` is set, even mid-commit.
async fn worker(load: &Workload, mut stop: watch::Receiver<bool>, seed: u64) -> anyhow::Result<()> {
    let mut rng = Rng::new(seed.wrapping_mul(0x9E37_79B9_7F4A_7C15));
    let pages = load.volume.file().geometry().page_count();
    while !*stop.borrow() {
        let mut ids = vec![rng.below(pages)];
        let second = rng.below(pages);
        if rng.below(2) == 0 && second != ids[0] {
            ids.push(second);
        }
        let start = Instant::now();
        let committed = async {
            let (cpl, version) = load.write(&ids).await?;
            load.volume.commit(cpl).await?;
            anyhow::Ok(version)
        };
        let version = tokio::select! {
            version = committed => version?,
            _ = stop.wait_for(|&s| s) => return Ok(()),
        };
        load.committed(&ids, version);
        load.record_latency(start.elapsed());
        if rng.below(16) == 0 {
            tokio::select! {
                checked = load.check_read(rng.below(pages)) => checked?,
                _ = stop.wait_for(|&s| s) => return Ok(()),
            }
        }
        // A small workload: each worker paces itself to about 12 transactions a second.
        tokio::select! {
            () = tokio::time::sleep(WORKER_PAUSE) => {}
            _ = stop.wait_for(|&s| s) => {}
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Goal: a written page verifies as its version; zeroes are version 0; a flipped bit, a
    /// page's content under another id, and a stale-looking version are all told apart.
    /// Method: build images and damage them.
    #[test]
    fn pages_verify_themselves() {
        let size = 8192;
        let image = page_image(7, 42, size);
        assert_eq!(page_version(7, &image, size), Ok(42));
        assert_eq!(page_version(7, &vec![0; size], size), Ok(0));
        let mut flipped = image.clone();
        flipped[100] ^= 1;
        assert!(
            page_version(7, &flipped, size)
                .unwrap_err()
                .contains("checksum")
        );
        assert!(
            page_version(8, &image, size)
                .unwrap_err()
                .contains("page 7's content")
        );
        assert_ne!(page_image(7, 43, size), image);
        assert_eq!(
            page_version(7, &image[..100], size).unwrap_err(),
            "100 bytes instead of 8192"
        );
    }

    /// Goal: the stall line names the PGs without a write quorum, the nodes down with their
    /// segments, and the segments behind — behind VDL, or behind their PG's last record when
    /// the PG has nothing above VDL. Method: two PGs over six nodes, with nodes down (one
    /// restarting) and segments behind, then all up with an idle PG.
    #[test]
    fn a_stall_names_pgs_without_quorum_and_segments_down_or_behind() {
        let placement = vec![[0, 1, 2, 3, 4, 5], [5, 4, 3, 2, 1, 0]];
        let mut nodes: Vec<(String, NodeState)> = (1..=6)
            .map(|i| (format!("node{i}"), NodeState::Up { pid: i }))
            .collect();
        nodes[0].1 = NodeState::Down;
        nodes[1].1 = NodeState::Starting { pid: 99 };
        // pg0/seg2 (node3) is behind.
        let scl = |pg: usize, segment: usize| Lsn(if (pg, segment) == (0, 2) { 5 } else { 10 });
        let line = explain_stall(Lsn(10), &placement, &nodes, scl);
        assert!(line.contains("no write quorum"), "{line}");
        assert!(line.contains("pg0 has 3"), "{line}");
        assert!(!line.contains("pg1 has"), "{line}");
        assert!(
            line.contains("node1 not running (pg0/seg0 pg1/seg5)"),
            "{line}"
        );
        assert!(
            line.contains("node2 starting (pg0/seg1 pg1/seg4)"),
            "{line}"
        );
        assert!(line.contains("pg0/seg2 on node3 (SCL 5 < 10)"), "{line}");
        let all_up: Vec<_> = (1..=6)
            .map(|i| (format!("node{i}"), NodeState::Up { pid: i }))
            .collect();
        let line = explain_stall(Lsn(10), &placement, &all_up, |_, _| Lsn(10));
        assert!(line.contains("waiting for acks"), "{line}");
        // pg1 has nothing written above 7: its segments at 7 are caught up, the one at 6 is
        // not; pg0 has records above VDL, so its segments at 9 are behind.
        let scl = |pg: usize, segment: usize| {
            Lsn(match (pg, segment) {
                (1, 0) => 6,
                (1, _) => 7,
                (0, 0..=2) => 9,
                _ => 12,
            })
        };
        let line = explain_stall(Lsn(10), &placement, &all_up, scl);
        assert!(
            line.contains("no write quorum") && line.contains("pg0 has 3"),
            "{line}"
        );
        assert!(!line.contains("pg1 has"), "{line}");
        assert!(line.contains("pg1/seg0 on node6 (SCL 6 < 7)"), "{line}");
        assert!(line.contains("pg0/seg2 on node3 (SCL 9 < 10)"), "{line}");
    }
}
