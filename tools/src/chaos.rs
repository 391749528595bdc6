//! Chaos against real processes: six `sixfold-node`s in three AZs and one writer in this
//! process, a self-verifying workload (see [`crate::dev::page_image`]), and faults drawn from a
//! seeded PRNG: nodes killed with SIGKILL and restarted (at most two down at once, sometimes
//! both of one AZ), and the writer dropped abruptly — sometimes only after a new writer has
//! recovered the volume and fenced it — with a new writer recovering the volume. Every
//! acknowledged commit (its pages and version) is recorded; after each writer restart and at
//! the end a fresh writer reads every page, and every acknowledged commit must be readable:
//! each of its pages verifies and is at least the version acknowledged. Used by the chaos
//! test and by `sixfold-bench chaos`.
//!
//! Invariants:
//! - no wait is unbounded: commits must resume within `RESUME_DEADLINE` of a fault healing (the
//!   error names the writer's `debug_state`), reads are retried until `READ_DEADLINE`, nodes
//!   start within their readiness deadline and a writer opens within its `open_timeout`;
//! - node processes are started from the thread that calls [`run`] (never a runtime thread),
//!   so they live exactly as long as that thread and die with it;
//! - a page's versions increase with its LSNs within one writer (the version is drawn and the
//!   MTR allocated under one lock), and a later writer's versions exceed an earlier one's, so
//!   "version ≥ the acknowledged version" is what a reader must see;
//! - a commit counts as acknowledged only once `commit` returned `Ok` and it is recorded: a
//!   commit whose writer was dropped first is not counted (under-counting is safe).

use std::collections::BTreeSet;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::Context;
use engine::{VolumeClient, VolumeConfig, VolumeError};
use tokio::runtime::Runtime;
use tokio::task::JoinHandle;
use wire::{Lsn, PageId, PgId, SegmentIndex};

use crate::cluster::{ClusterOptions, LocalCluster, node_az};
use crate::dev::{Rng, explain_stall, page_mtr, page_version};
use crate::procs::NodeState;

/// What to run.
#[derive(Clone, Debug)]
pub struct ChaosOptions {
    /// The cluster goes here (a new one: the directory should not hold one).
    pub dir: PathBuf,
    /// Faults are injected until this much time has passed.
    pub duration: Duration,
    pub seed: u64,
    /// Concurrent transactions of the workload.
    pub workers: usize,
    /// Print a line per fault on stderr.
    pub verbose: bool,
}

/// What happened.
#[derive(Clone, Debug, Default)]
pub struct ChaosReport {
    /// Fault cycles run (each: a fault, then healing it).
    pub cycles: u64,
    pub node_kills: u64,
    pub writer_restarts: u64,
    /// Faults after which commits resumed (every one, or `run` fails).
    pub resumed: u64,
    /// Commits acknowledged to the workload, over every writer.
    pub acknowledged: u64,
    /// Acknowledged commits readable in the final check.
    pub verified: u64,
    /// Acknowledged commits found unreadable in any check (must be 0).
    pub lost: u64,
    /// Full-volume checks run (after each writer restart, and the final one).
    pub checks: u64,
    /// The longest time without an acknowledged commit while a writer served.
    pub stall_ms_max: u64,
    /// The longest `VolumeClient::open` (recovery) of a new writer.
    pub recovery_ms_max: u64,
}

/// Volume shape: small pages, so a full-page write stays one journal block.
const PAGE_SIZE: u32 = 1024;
const PG_COUNT: u32 = 2;
const PAGES_PER_PG: u64 = 256;
/// The workload's pace, over all workers: journals only fill until GC exists.
const TXNS_PER_S_MAX: u64 = 200;
/// Journal bytes per transaction on one node at most: two records, each in a 4 KiB group of
/// its own, and as much again for catch-up resends and recovery copies.
const JOURNAL_BYTES_PER_TXN: u64 = 16 << 10;
const JOURNAL_FILE_BYTES: u64 = 32 << 20;
/// Nodes down for this long, give or take (drawn in the range).
const DOWN_MS: std::ops::Range<u64> = 200..1500;
/// Pause between faults, with everything up.
const SETTLE_MS: std::ops::Range<u64> = 200..800;
/// Once a fault is healed (nodes restarted, a new writer serving), commits must resume
/// within this; past it the run fails with the writer's state.
const RESUME_DEADLINE: Duration = Duration::from_secs(60);
/// A wait for commits longer than this says why they stall (with `verbose`).
const STALL_EXPLAINED_AFTER: Duration = Duration::from_secs(2);
/// How long a page read is retried (a read may find no segment able to serve it yet).
const READ_DEADLINE: Duration = Duration::from_secs(60);
/// Reads in flight during a check.
const READS_INFLIGHT: usize = 8;

/// A new cluster sized for `duration` of the paced workload.
fn cluster_options(duration: Duration) -> ClusterOptions {
    let txns = TXNS_PER_S_MAX * (duration.as_secs() + 30);
    let journal_bytes = txns * JOURNAL_BYTES_PER_TXN + (64 << 20);
    ClusterOptions {
        pg_count: PG_COUNT,
        page_size_bytes: PAGE_SIZE,
        segment_bytes: PAGES_PER_PG * u64::from(PAGE_SIZE),
        journal_file_bytes: JOURNAL_FILE_BYTES,
        journal_file_count: u32::try_from(journal_bytes.div_ceil(JOURNAL_FILE_BYTES))
            .unwrap_or(u32::MAX),
        ..ClusterOptions::default()
    }
}

/// Runs the chaos: starts a cluster under `options.dir`, injects faults for the duration, checks,
/// stops the cluster. An error if the cluster could not run or commits did not resume after a
/// fault; lost commits are reported in [`ChaosReport::lost`].
pub fn run(options: &ChaosOptions) -> anyhow::Result<ChaosReport> {
    anyhow::ensure!(options.workers > 0, "at least one worker");
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()?;
    let mut cluster = runtime.block_on(LocalCluster::start(
        &options.dir,
        &cluster_options(options.duration),
    ))?;
    let mut chaos = Chaos {
        runtime: &runtime,
        cluster: &mut cluster,
        options,
        rng: Rng::new(options.seed ^ 0x5EED_C4A0_5000_0001),
        ledger: Arc::new(Ledger::new()),
        lost: BTreeSet::new(),
        report: ChaosReport::default(),
    };
    let outcome = chaos.run_all();
    let report = chaos.report;
    let stopped = cluster.stop();
    outcome?;
    if let Err(e) = stopped {
        // A node slow to exit after SIGTERM (it happens: a node can wait out a QUIC
        // connection of a dropped writer) is not what this run checks: say it, do not fail.
        eprintln!("chaos: warning: stopping the cluster: {e:#}");
    }
    Ok(report)
}

/// Every acknowledged commit, and when commits were acknowledged.
struct Ledger {
    /// (pages, version) of each acknowledged commit.
    commits: Mutex<Vec<(Vec<u64>, u64)>>,
    acknowledged: AtomicU64,
    /// The next version to write, over every writer.
    next_version: AtomicU64,
    /// The last acknowledgement (or when the serving writer's workers started).
    last_ack: Mutex<Instant>,
    stall_us_max: AtomicU64,
    /// The same, since the current cycle began.
    cycle_stall_us_max: AtomicU64,
}

impl Ledger {
    fn new() -> Self {
        Self {
            commits: Mutex::new(Vec::new()),
            acknowledged: AtomicU64::new(0),
            next_version: AtomicU64::new(1),
            last_ack: Mutex::new(Instant::now()),
            stall_us_max: AtomicU64::new(0),
            cycle_stall_us_max: AtomicU64::new(0),
        }
    }

    fn acknowledged(&self) -> u64 {
        self.acknowledged.load(Ordering::Acquire)
    }

    fn ack(&self, pages: Vec<u64>, version: u64) {
        self.commits.lock().expect("ledger").push((pages, version));
        self.acknowledged.fetch_add(1, Ordering::AcqRel);
        let now = Instant::now();
        let gap = now.saturating_duration_since(std::mem::replace(
            &mut *self.last_ack.lock().expect("ledger"),
            now,
        ));
        let gap = u64::try_from(gap.as_micros()).unwrap_or(u64::MAX);
        self.stall_us_max.fetch_max(gap, Ordering::AcqRel);
        self.cycle_stall_us_max.fetch_max(gap, Ordering::AcqRel);
    }

    /// The longest stall since the last call, in ms.
    fn take_cycle_stall_ms(&self) -> u64 {
        self.cycle_stall_us_max.swap(0, Ordering::AcqRel) / 1000
    }

    /// Stalls are measured while a writer serves: the clock starts again with its workers.
    fn restart_clock(&self) {
        *self.last_ack.lock().expect("ledger") = Instant::now();
    }
}

/// A writer and its workload tasks.
struct Writer {
    volume: Arc<VolumeClient>,
    workers: Vec<JoinHandle<anyhow::Result<()>>>,
    stop: Arc<AtomicBool>,
}

impl Writer {
    /// Starts `workers` tasks writing and committing through `volume`.
    fn start(
        runtime: &Runtime,
        volume: Arc<VolumeClient>,
        ledger: &Arc<Ledger>,
        workers: usize,
        seed: u64,
    ) -> Self {
        let stop = Arc::new(AtomicBool::new(false));
        let order = Arc::new(tokio::sync::Mutex::new(()));
        let pause = Duration::from_micros(workers as u64 * 1_000_000 / TXNS_PER_S_MAX);
        ledger.restart_clock();
        let workers = (0..workers as u64)
            .map(|w| {
                let task = Worker {
                    volume: volume.clone(),
                    ledger: ledger.clone(),
                    stop: stop.clone(),
                    order: order.clone(),
                    pause,
                };
                let rng = Rng::new(seed.wrapping_add(w).wrapping_mul(0x9E37_79B9_7F4A_7C15));
                runtime.spawn(task.run(rng))
            })
            .collect();
        Self {
            volume,
            workers,
            stop,
        }
    }

    /// A worker that stopped with an error, if any (a worker stops by itself only then, or
    /// when its writer was fenced).
    fn failed(&mut self, runtime: &Runtime) -> Option<anyhow::Error> {
        let done = self.workers.iter().position(JoinHandle::is_finished)?;
        let handle = self.workers.remove(done);
        match runtime.block_on(handle) {
            Ok(Ok(())) => None,
            Ok(Err(e)) => Some(e),
            Err(e) => Some(anyhow::anyhow!("a worker panicked: {e}")),
        }
    }

    /// Drops the writer abruptly: its workers are cancelled wherever they are (commits in
    /// flight are never acknowledged), then the client goes with its connections.
    fn crash(self, runtime: &Runtime) {
        self.stop.store(true, Ordering::Release);
        for worker in &self.workers {
            worker.abort();
        }
        runtime.block_on(async {
            for worker in self.workers {
                let _ = worker.await;
            }
        });
        drop(self.volume);
    }
}

/// One workload task: MTRs writing a new version of one or two pages, each committed.
struct Worker {
    volume: Arc<VolumeClient>,
    ledger: Arc<Ledger>,
    stop: Arc<AtomicBool>,
    /// Held while a version is drawn and its MTR allocated.
    order: Arc<tokio::sync::Mutex<()>>,
    pause: Duration,
}

impl Worker {
    async fn run(self, mut rng: Rng) -> anyhow::Result<()> {
        let pages = u64::from(PG_COUNT) * PAGES_PER_PG;
        while !self.stop.load(Ordering::Acquire) {
            let mut ids = vec![rng.below(pages)];
            let second = rng.below(pages);
            if rng.below(2) == 0 && second != ids[0] {
                ids.push(second);
            }
            let (cpl, version) = match self.write(&ids).await {
                Ok(written) => written,
                Err(e) => return stopped_by(e, "write_mtr"),
            };
            match self.volume.commit(cpl).await {
                Ok(()) => self.ledger.ack(ids, version),
                Err(e) => return stopped_by(e, "commit"),
            }
            tokio::time::sleep(self.pause).await;
        }
        Ok(())
    }

    async fn write(&self, pages: &[u64]) -> Result<(Lsn, u64), VolumeError> {
        let _order = self.order.lock().await;
        let version = self.ledger.next_version.fetch_add(1, Ordering::AcqRel);
        let records = page_mtr(pages, version, PAGE_SIZE as usize);
        Ok((self.volume.write_mtr(records).await?, version))
    }
}

/// A worker ends quietly when its writer was fenced or dropped (a new writer took over);
/// any other failure is an error.
fn stopped_by(error: VolumeError, what: &str) -> anyhow::Result<()> {
    match error {
        VolumeError::Fenced(_) | VolumeError::ShutDown => Ok(()),
        other => Err(anyhow::anyhow!("{what} failed: {other}")),
    }
}

/// A fault of one cycle.
#[derive(Clone, Debug)]
enum Fault {
    /// These nodes are killed, then restarted.
    Nodes(Vec<usize>),
    /// The writer is dropped (with these nodes down meanwhile) and a new one recovers; with
    /// `overlap` the old one still runs until the new one has fenced it.
    Writer { down: Vec<usize>, overlap: bool },
}

impl Fault {
    /// 40 % one node, 20 % one AZ, 10 % two nodes of two AZs, 30 % the writer (half of
    /// those with a node down, a third of those with the old writer still running).
    fn draw(rng: &mut Rng, nodes: usize) -> Self {
        let node = |rng: &mut Rng| rng.below(nodes as u64) as usize;
        match rng.below(10) {
            0..=3 => Fault::Nodes(vec![node(rng)]),
            4..=5 => {
                let first = node(rng) / 2 * 2; // Nodes 2k and 2k+1 share an AZ.
                Fault::Nodes(vec![first, first + 1])
            }
            6 => {
                let a = node(rng);
                let mut b = node(rng);
                while node_az(b) == node_az(a) {
                    b = node(rng);
                }
                Fault::Nodes(vec![a, b])
            }
            _ => Fault::Writer {
                down: if rng.below(2) == 0 {
                    vec![node(rng)]
                } else {
                    Vec::new()
                },
                overlap: rng.below(3) == 0,
            },
        }
    }
}

/// Page `page`'s version as read, or why it did not verify.
type PageRead = Result<u64, String>;

/// The chaos run's state.
struct Chaos<'a> {
    runtime: &'a Runtime,
    cluster: &'a mut LocalCluster,
    options: &'a ChaosOptions,
    rng: Rng,
    ledger: Arc<Ledger>,
    /// Indices (in the ledger) of the acknowledged commits any check found unreadable.
    lost: BTreeSet<usize>,
    report: ChaosReport,
}

impl Chaos<'_> {
    fn say(&self, line: &str) {
        if self.options.verbose {
            eprintln!("chaos: {line}");
        }
    }

    fn ms(&mut self, range: std::ops::Range<u64>) -> Duration {
        Duration::from_millis(range.start + self.rng.below(range.end - range.start))
    }

    /// Opens a writer (crash recovery) and measures it.
    fn open_writer(&mut self) -> anyhow::Result<Arc<VolumeClient>> {
        let began = Instant::now();
        let volume = self
            .runtime
            .block_on(self.cluster.attach(VolumeConfig::default()))
            .context("opening a new writer (recovery)")?;
        let ms = u64::try_from(began.elapsed().as_millis()).unwrap_or(u64::MAX);
        self.report.recovery_ms_max = self.report.recovery_ms_max.max(ms);
        self.say(&format!(
            "writer opened in {ms} ms: VDL {} epoch {:#x}",
            volume.vdl().0,
            volume.epoch().0
        ));
        Ok(Arc::new(volume))
    }

    fn start_workers(&mut self, volume: Arc<VolumeClient>) -> Writer {
        let seed = self.rng.next_u64();
        Writer::start(
            self.runtime,
            volume,
            &self.ledger,
            self.options.workers,
            seed,
        )
    }

    fn run_all(&mut self) -> anyhow::Result<()> {
        let volume = self.open_writer()?;
        let mut writer = self.start_workers(volume);
        self.wait_resumed(&mut writer, 0, "the first writer")?;
        let began = Instant::now();
        while began.elapsed() < self.options.duration {
            self.report.cycles += 1;
            let fault = Fault::draw(&mut self.rng, self.cluster.specs.len());
            self.say(&format!("cycle {}: {fault:?}", self.report.cycles));
            writer = match fault {
                Fault::Nodes(nodes) => {
                    self.node_fault(&mut writer, &nodes)?;
                    writer
                }
                Fault::Writer { down, overlap } => self.writer_fault(writer, &down, overlap)?,
            };
            self.report.resumed += 1;
            let settle = self.ms(SETTLE_MS);
            self.sleep_watching(&mut writer, settle)?;
            self.say(&format!(
                "cycle {} done: {} commits acknowledged so far, longest stall {} ms",
                self.report.cycles,
                self.ledger.acknowledged(),
                self.ledger.take_cycle_stall_ms()
            ));
        }
        writer.crash(self.runtime);
        self.final_check()
    }

    /// Kills `nodes`, lets the workload run, restarts them, and waits for commits.
    fn node_fault(&mut self, writer: &mut Writer, nodes: &[usize]) -> anyhow::Result<()> {
        for &i in nodes {
            self.cluster.kill9(i);
            self.report.node_kills += 1;
        }
        let down = self.ms(DOWN_MS);
        self.sleep_watching(writer, down)?;
        self.restart(nodes)?;
        let before = self.ledger.acknowledged();
        self.wait_resumed(writer, before, "nodes restarted")
    }

    fn restart(&mut self, nodes: &[usize]) -> anyhow::Result<()> {
        for &i in nodes {
            self.cluster
                .restart(i)
                .with_context(|| format!("restarting node{}", i + 1))?;
        }
        Ok(())
    }

    /// Drops the writer (nodes in `down` killed first), opens a new one, checks every
    /// acknowledged commit through it, restarts the nodes and resumes the workload.
    fn writer_fault(
        &mut self,
        old: Writer,
        down: &[usize],
        overlap: bool,
    ) -> anyhow::Result<Writer> {
        for &i in down {
            self.cluster.kill9(i);
            self.report.node_kills += 1;
        }
        let volume = if overlap {
            // The old writer goes on until the new one has fenced it.
            let volume = self.open_writer()?;
            old.crash(self.runtime);
            volume
        } else {
            old.crash(self.runtime);
            self.open_writer()?
        };
        self.report.writer_restarts += 1;
        self.check(&volume)?;
        self.restart(down)?;
        let mut writer = self.start_workers(volume);
        let before = self.ledger.acknowledged();
        self.wait_resumed(&mut writer, before, "a new writer")?;
        Ok(writer)
    }

    /// Sleeps `duration`, failing early if a worker failed.
    fn sleep_watching(&mut self, writer: &mut Writer, duration: Duration) -> anyhow::Result<()> {
        let until = Instant::now() + duration;
        while Instant::now() < until {
            if let Some(e) = writer.failed(self.runtime) {
                return Err(e.context(format!("writer: {}", writer.volume.debug_state())));
            }
            std::thread::sleep(Duration::from_millis(20).min(until - Instant::now()));
        }
        Ok(())
    }

    /// Waits until more than `before` commits were acknowledged, up to `RESUME_DEADLINE`.
    fn wait_resumed(&mut self, writer: &mut Writer, before: u64, what: &str) -> anyhow::Result<()> {
        let began = Instant::now();
        let mut explained = false;
        while self.ledger.acknowledged() <= before {
            if let Some(e) = writer.failed(self.runtime) {
                return Err(e.context(format!("writer: {}", writer.volume.debug_state())));
            }
            if !explained && began.elapsed() >= STALL_EXPLAINED_AFTER {
                explained = true;
                self.say(&format!(
                    "no commit for {STALL_EXPLAINED_AFTER:?} after {what}: {}",
                    self.stall_reason(&writer.volume)
                ));
            }
            anyhow::ensure!(
                began.elapsed() < RESUME_DEADLINE,
                "commits did not resume within {RESUME_DEADLINE:?} after {what} (cycle {}); \
                 writer: {}",
                self.report.cycles,
                writer.volume.debug_state()
            );
            std::thread::sleep(Duration::from_millis(10));
        }
        Ok(())
    }

    /// Why VDL is not moving, as `sixfold dev` says it.
    fn stall_reason(&self, volume: &VolumeClient) -> String {
        let nodes: Vec<(String, NodeState)> = (self.cluster.specs.iter())
            .zip(&self.cluster.nodes)
            .map(|(spec, process)| {
                let state = process
                    .as_ref()
                    .map_or(NodeState::Down, |p| NodeState::Up { pid: p.pid() });
                (spec.name.clone(), state)
            })
            .collect();
        let scl = |pg: usize, segment: usize| {
            volume.segment_scl(PgId(pg as u32), SegmentIndex(segment as u32))
        };
        explain_stall(volume.vdl(), &volume.file().placement(), &nodes, scl)
    }

    /// Every acknowledged commit, read back through `volume` at its VDL. Counts the lost
    /// ones; returns how many verified.
    fn check(&mut self, volume: &Arc<VolumeClient>) -> anyhow::Result<u64> {
        let commits = self.ledger.commits.lock().expect("ledger").clone();
        let reads = self.runtime.block_on(read_all(volume.clone()))?;
        self.report.checks += 1;
        let mut lost = 0;
        for (index, (pages, version)) in commits.iter().enumerate() {
            let missing = pages.iter().find(|&&page| match &reads[page as usize] {
                Ok(found) => found < version,
                Err(_) => true,
            });
            if let Some(&page) = missing {
                if lost < 10 {
                    eprintln!(
                        "chaos: LOST: page {page} was committed at version {version}, read {:?} \
                         at VDL {} (check {}); writer: {}",
                        reads[page as usize],
                        volume.vdl().0,
                        self.report.checks,
                        volume.debug_state()
                    );
                }
                lost += 1;
                self.lost.insert(index);
            }
        }
        let corrupt: Vec<String> = (reads.iter().enumerate())
            .filter_map(|(page, read)| read.as_ref().err().map(|why| format!("page {page}: {why}")))
            .collect();
        anyhow::ensure!(
            corrupt.is_empty(),
            "pages that do not verify: {}",
            corrupt.join("; ")
        );
        self.report.lost = self.lost.len() as u64;
        self.say(&format!(
            "check {}: {} acknowledged commits, {lost} lost",
            self.report.checks,
            commits.len()
        ));
        Ok(commits.len() as u64 - lost)
    }

    /// With the workload stopped: a fresh writer checks every acknowledged commit.
    fn final_check(&mut self) -> anyhow::Result<()> {
        let volume = self.open_writer()?;
        let verified = self.check(&volume)?;
        self.report.acknowledged = self.ledger.acknowledged();
        self.report.verified = verified;
        self.report.stall_ms_max = self.ledger.stall_us_max.load(Ordering::Acquire) / 1000;
        Ok(())
    }
}

/// Reads every page of the volume at its VDL, `READS_INFLIGHT` at a time; each read is
/// retried until `READ_DEADLINE`.
async fn read_all(volume: Arc<VolumeClient>) -> anyhow::Result<Vec<PageRead>> {
    let pages = volume.file().geometry().page_count();
    let read_point = volume.vdl();
    let mut reads = vec![Ok(0); pages as usize];
    let mut tasks = tokio::task::JoinSet::new();
    let mut next = 0;
    while next < pages || !tasks.is_empty() {
        while next < pages && tasks.len() < READS_INFLIGHT {
            let volume = volume.clone();
            tasks.spawn(async move { (next, read_one(&volume, next, read_point).await) });
            next += 1;
        }
        let (page, read) = tasks.join_next().await.expect("a task")?;
        reads[page as usize] = read?;
    }
    Ok(reads)
}

/// Page `page` at `read_point`, retried until `READ_DEADLINE`: its version, or why it does
/// not verify; an error if it could not be read at all.
async fn read_one(volume: &VolumeClient, page: u64, read_point: Lsn) -> anyhow::Result<PageRead> {
    let began = Instant::now();
    loop {
        match volume.read_page_from(PageId(page), read_point, None).await {
            Ok(image) => {
                return Ok(page_version(page, &image.bytes, PAGE_SIZE as usize));
            }
            Err(e) if began.elapsed() < READ_DEADLINE => {
                tracing::debug!("chaos: reading page {page} failed (retrying): {e:#}");
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
            Err(e) => {
                return Err(e.context(format!(
                    "page {page} at {} could not be read within {READ_DEADLINE:?}; writer: {}",
                    read_point.0,
                    volume.debug_state()
                )));
            }
        }
    }
}
