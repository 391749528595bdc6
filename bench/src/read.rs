//! `sixfold-bench read`: what a page read costs once the node has coalesced the page's history,
//! beside the disk's own read and one network round trip.
//!
//! Six real nodes (io_uring, QUIC, mTLS) in three AZs, one PG, one engine. The writer commits
//! `--history` one-record MTRs to one page (each writes [`RECORD_BYTES`] somewhere in it), then
//! one MTR to another page of the PG: the nodes let coalescing go no further than the highest
//! VDL a writer reported in an Append, and only that later Append carries a VDL that covers the
//! whole history. The nodes start with `[background] paused = true`, so first the page is read
//! with its whole history replayed from the journal ("before coalescing"); then the nodes are
//! restarted with background work on, a new writer attaches (and publishes PGMRPL), and the
//! bench waits — with a deadline — until every node's `node_segment_materialized_lsn` has
//! passed the history, and reads again.
//!
//! Reads go straight to node1 with its ReadPage request at the writer's VDL, one at a time,
//! each followed by a GetVolumeState over the same QUIC connection (the round trip: the same
//! network and node task, no disk); every reply is checked against the model image. The same
//! page is also read through the engine's read path (`read_page_from`, bypassing its cache).
//! Raw: 4 KiB O_DIRECT `pread`s at random offsets of a pre-written file in the same directory.
//!
//! Target (read, never asserted): read p99 / (2 × raw p99 + round-trip p99) ≤ 1.0. `--json`:
//! `{"read_p50_us", "read_p99_us", "raw_read_p99_us", "rtt_p99_us", "ratio", …}`.

use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use anyhow::Context;
use engine::quorum::MtrRecord;
use engine::{NodeClient, VolumeClient, VolumeConfig};
use node::io::AlignedBuf;
use serde_json::json;
use tools::cluster::{ClusterOptions, LocalCluster};
use wire::{Lsn, Message, PageId, PgId, ReadPage, RedoOp, SegmentIndex};

use crate::stats::{self, Summary};

#[derive(clap::Args, Debug)]
pub(crate) struct ReadArgs {
    /// Directory on the disk under test: the cluster and the raw-disk probe file go under
    /// DIR/read-<pid>, removed at the end.
    #[arg(long)]
    dir: PathBuf,
    /// Seconds per measurement (raw reads; page reads before coalescing, after it, and
    /// through the engine).
    #[arg(long, default_value_t = 10)]
    seconds: u64,
    /// Records in the page's history (one-record MTRs, committed one at a time).
    #[arg(long, default_value_t = 1000)]
    history: u64,
    /// Print one JSON object instead of the table.
    #[arg(long)]
    json: bool,
}

/// Bytes each history record writes into the page.
const RECORD_BYTES: usize = 128;
const PAGE_BYTES: u32 = 8192;
/// Histories longer than this would need journals this bench does not size.
const HISTORY_MAX: u64 = 20_000;
/// The page read, and the page the closing MTR writes (both in PG 0).
const PAGE: PageId = PageId(3);
const CLOSING_PAGE: PageId = PageId(4);
/// The node read directly (its index in the volume file).
const NODE: usize = 0;
/// How long coalescing may take once the nodes are back: a round is due 200 ms after the
/// last append and PGMRPL is published every 500 ms.
const COALESCE_TIMEOUT: Duration = Duration::from_secs(60);
/// How long every segment may take to hold the whole history.
const SETTLE_TIMEOUT: Duration = Duration::from_secs(30);
/// Bytes of the raw probe's file (random 4 KiB reads over it).
const RAW_FILE_BYTES: u64 = 64 << 20;
/// A commit or engine read that takes this long means the cluster stalled.
const OP_TIMEOUT: Duration = Duration::from_secs(30);

impl ReadArgs {
    /// Four measurements and the history, several times over, plus two cluster starts.
    pub(crate) fn deadline_default(&self) -> Duration {
        Duration::from_secs(600 + 4 * 4 * self.seconds + self.history / 10)
    }
}

/// Where the page is and what it must read as.
struct History {
    pg: PgId,
    last_lsn: Lsn,
    image: Vec<u8>,
}

/// Direct reads and the round trips interleaved with them.
#[derive(Clone, Copy)]
struct Direct {
    read: Summary,
    rtt: Summary,
}

/// Everything measured on the cluster.
struct Measured {
    before: Direct,
    after: Direct,
    engine: Summary,
    /// From the new writer's attach to every node having coalesced the history.
    coalesce_wait: Duration,
}

pub(crate) fn run(args: &ReadArgs) -> anyhow::Result<()> {
    anyhow::ensure!(args.seconds > 0, "--seconds must be at least 1");
    anyhow::ensure!(
        (1..=HISTORY_MAX).contains(&args.history),
        "--history must be between 1 and {HISTORY_MAX}"
    );
    crate::stats::init_tracing("warn");
    let run_dir = args.dir.join(format!("read-{}", std::process::id()));
    std::fs::create_dir_all(&run_dir)
        .with_context(|| format!("cannot create {}", run_dir.display()))?;
    let result = run_in(args, &run_dir);
    if let Err(e) = std::fs::remove_dir_all(&run_dir) {
        eprintln!("sixfold-bench: cannot remove {}: {e}", run_dir.display());
    }
    result
}

fn run_in(args: &ReadArgs, run_dir: &Path) -> anyhow::Result<()> {
    let duration = Duration::from_secs(args.seconds);
    let progress = |m: &str| {
        crate::watchdog::phase(m);
        if !args.json {
            eprintln!("{m}")
        }
    };
    progress("raw disk: 4 KiB O_DIRECT pread at random offsets, 1 in flight …");
    let raw = raw_read_summary(run_dir, duration)?;
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    progress("starting 6 sixfold-nodes in 3 AZs, background work paused …");
    let options = ClusterOptions {
        pg_count: 1,
        page_size_bytes: PAGE_BYTES,
        journal_file_count: journal_file_count(args.history),
        background_paused: true,
        metrics: true,
        ..ClusterOptions::default()
    };
    let mut cluster = runtime.block_on(LocalCluster::start(&run_dir.join("cluster"), &options))?;
    let measured = runtime.block_on(measure(&mut cluster, args.history, duration, &progress));
    let stopped = cluster.stop();
    if measured.is_err() || stopped.is_err() {
        crate::commit::print_log_tails(&cluster);
    }
    let measured = measured?;
    stopped?;
    let report = Report {
        args,
        raw,
        measured,
    };
    if args.json {
        report.json();
    } else {
        report.text();
    }
    Ok(())
}

/// Journal files of 16 MiB (the cluster's default) for the history: at one MTR in flight each
/// is a block group of its own (4 KiB, 8 KiB at most with headers), kept under a quarter of
/// the journal so that nothing but idleness starts a coalescing round.
fn journal_file_count(history: u64) -> u32 {
    let bytes = (history + 100) * 8192 * 4;
    u32::try_from(bytes.div_ceil(16 << 20).max(4)).expect("bounded by HISTORY_MAX")
}

/// Writes the history with background work paused, reads it replayed from the journal,
/// restarts the nodes with background work on, waits for coalescing, reads again (directly
/// and through the engine).
async fn measure(
    cluster: &mut LocalCluster,
    history: u64,
    duration: Duration,
    progress: &impl Fn(&str),
) -> anyhow::Result<Measured> {
    let volume = cluster.attach(VolumeConfig::default()).await?;
    progress(&format!(
        "writing a {history}-record history to page {} …",
        PAGE.0
    ));
    let written = write_history(&volume, history).await?;
    progress("reading it before coalescing (the whole history replayed from the journal) …");
    let before = read_directly(cluster, &volume, &written, duration).await?;
    drop(volume);

    progress("restarting the nodes with background work on …");
    cluster.stop()?;
    cluster.set_background_paused(false)?;
    *cluster = LocalCluster::open(&cluster.dir)?;
    let volume = cluster.attach(VolumeConfig::default()).await?;
    progress("waiting until every node has coalesced the page …");
    let began = Instant::now();
    wait_coalesced(cluster, &written).await?;
    let coalesce_wait = began.elapsed();
    progress("reading it after coalescing …");
    let after = read_directly(cluster, &volume, &written, duration).await?;
    progress("reading it through the engine's read path (no cache) …");
    let engine = read_through_engine(&volume, &written, duration).await?;
    Ok(Measured {
        before,
        after,
        engine,
        coalesce_wait,
    })
}

/// Commits `count` one-record MTRs to [`PAGE`], then one to [`CLOSING_PAGE`], and waits until
/// every segment holds them all. Returns the model of the page.
async fn write_history(volume: &VolumeClient, count: u64) -> anyhow::Result<History> {
    let pg = volume
        .file()
        .pg_of(PAGE)
        .context("the page is in the volume")?;
    anyhow::ensure!(volume.file().pg_of(CLOSING_PAGE) == Some(pg));
    let mut image = vec![0u8; PAGE_BYTES as usize];
    let mut last_lsn = Lsn::ZERO;
    for i in 0..count {
        let offset = (i as usize * 97) % (PAGE_BYTES as usize - RECORD_BYTES);
        let bytes = vec![(i % 251) as u8 + 1; RECORD_BYTES];
        image[offset..offset + RECORD_BYTES].copy_from_slice(&bytes);
        let op = RedoOp::Write {
            offset: offset as u32,
            bytes,
        };
        last_lsn = commit(volume, MtrRecord { page: PAGE, op }).await?;
    }
    let op = RedoOp::Write {
        offset: 0,
        bytes: vec![1; RECORD_BYTES],
    };
    let closing = commit(
        volume,
        MtrRecord {
            page: CLOSING_PAGE,
            op,
        },
    )
    .await?;
    let deadline = Instant::now() + SETTLE_TIMEOUT;
    while (0..wire::PG_SIZE as u32).any(|s| volume.segment_scl(pg, SegmentIndex(s)) < closing) {
        anyhow::ensure!(
            Instant::now() < deadline,
            "not every segment held the history {SETTLE_TIMEOUT:?} after it was committed"
        );
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    Ok(History {
        pg,
        last_lsn,
        image,
    })
}

async fn commit(volume: &VolumeClient, record: MtrRecord) -> anyhow::Result<Lsn> {
    let done = async {
        let cpl = volume.write_mtr(vec![record]).await?;
        volume.commit(cpl).await?;
        anyhow::Ok(cpl)
    };
    tokio::time::timeout(OP_TIMEOUT, done)
        .await
        .with_context(|| format!("a commit took more than {OP_TIMEOUT:?}"))?
}

/// Polls every node's metrics until its segment of the page's PG is materialized through
/// the history's last LSN.
async fn wait_coalesced(cluster: &LocalCluster, history: &History) -> anyhow::Result<()> {
    let deadline = Instant::now() + COALESCE_TIMEOUT;
    let mut waiting: Vec<usize> = (0..cluster.specs.len()).collect();
    while !waiting.is_empty() {
        let mut still = Vec::new();
        for &i in &waiting {
            let addr = cluster
                .metrics_addr(i)
                .with_context(|| format!("node{} serves no metrics", i + 1))?;
            let metrics = tools::scrape::scrape(addr).await?;
            let materialized = metrics
                .per_segment("node_segment_materialized_lsn")
                .into_iter()
                .find(|((pg, _), _)| *pg == history.pg.0)
                .map_or(0, |(_, lsn)| lsn);
            if materialized < history.last_lsn.0 {
                still.push(i);
            }
        }
        waiting = still;
        if waiting.is_empty() {
            break;
        }
        anyhow::ensure!(
            Instant::now() < deadline,
            "node(s) {waiting:?} had not coalesced LSN {} within {COALESCE_TIMEOUT:?}",
            history.last_lsn
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    Ok(())
}

/// ReadPage to [`NODE`] at the writer's VDL, each followed by a GetVolumeState on the same
/// connection, one at a time, for `duration`.
async fn read_directly(
    cluster: &LocalCluster,
    volume: &VolumeClient,
    history: &History,
    duration: Duration,
) -> anyhow::Result<Direct> {
    let entry = &volume.file().nodes[NODE];
    let placement = volume.file().placement();
    let segment = placement[history.pg.0 as usize]
        .iter()
        .position(|&n| n == NODE)
        .context("every node hosts a segment of the PG")?;
    let (client, _) = NodeClient::connect(&cluster.endpoint()?, entry.address, &entry.name).await?;
    let request = ReadPage {
        volume: volume.file().id(),
        epoch: volume.epoch(),
        pg: history.pg,
        segment: SegmentIndex(u32::try_from(segment)?),
        page: PAGE,
        read_point: volume.vdl(),
    };
    let (mut reads, mut rtts) = (stats::histogram(), stats::histogram());
    let began = Instant::now();
    while began.elapsed() < duration {
        let start = Instant::now();
        let reply = client.request(Message::ReadPage(request)).await?;
        stats::record(&mut reads, start.elapsed());
        check_page(&reply, history)?;
        let start = Instant::now();
        let state = client
            .request(Message::GetVolumeState(request.volume))
            .await?;
        stats::record(&mut rtts, start.elapsed());
        anyhow::ensure!(
            matches!(state, Message::VolumeState(_)),
            "GetVolumeState answered {state:?}"
        );
    }
    let elapsed = began.elapsed();
    client.close();
    Ok(Direct {
        read: Summary::of(&reads, elapsed),
        rtt: Summary::of(&rtts, elapsed),
    })
}

fn check_page(reply: &Message, history: &History) -> anyhow::Result<()> {
    let Message::Page(page) = reply else {
        anyhow::bail!("ReadPage answered {reply:?}");
    };
    anyhow::ensure!(
        page.page_lsn == history.last_lsn,
        "the page read at LSN {} (its history ends at {})",
        page.page_lsn,
        history.last_lsn
    );
    anyhow::ensure!(
        page.bytes == history.image,
        "the page read differs from its model"
    );
    Ok(())
}

/// `read_page_from` at the VDL, bypassing the engine's cache, one at a time.
async fn read_through_engine(
    volume: &VolumeClient,
    history: &History,
    duration: Duration,
) -> anyhow::Result<Summary> {
    let mut h = stats::histogram();
    let began = Instant::now();
    while began.elapsed() < duration {
        let start = Instant::now();
        let read = volume.read_page_from(PAGE, volume.vdl(), None);
        let image = tokio::time::timeout(OP_TIMEOUT, read)
            .await
            .with_context(|| format!("an engine read took more than {OP_TIMEOUT:?}"))??;
        stats::record(&mut h, start.elapsed());
        anyhow::ensure!(
            image.lsn == history.last_lsn && image.bytes == history.image,
            "the engine read page {} at LSN {}, not the model at {}",
            PAGE.0,
            image.lsn,
            history.last_lsn
        );
    }
    Ok(Summary::of(&h, began.elapsed()))
}

/// 4 KiB O_DIRECT `pread`s (what the page store issues) at random aligned offsets of a
/// pre-written file, one at a time.
fn raw_read_summary(dir: &Path, duration: Duration) -> anyhow::Result<Summary> {
    let path = dir.join("raw-read-probe.dat");
    let file = node::io::raw::open_direct(&path, true)
        .with_context(|| format!("cannot open {} with O_DIRECT", path.display()))?;
    node::io::raw::prewrite(&file, RAW_FILE_BYTES)?;
    let mut buf = AlignedBuf::new(4096);
    let blocks = RAW_FILE_BYTES / 4096;
    let mut state = 0x9E37_79B9_7F4A_7C15u64;
    let mut h = stats::histogram();
    let began = Instant::now();
    while began.elapsed() < duration {
        // xorshift64: spread the reads without a dependency.
        state ^= state << 13;
        state ^= state >> 7;
        state ^= state << 17;
        let offset = (state % blocks) * 4096;
        let start = Instant::now();
        file.read_exact_at(buf.as_mut_full(), offset)
            .with_context(|| format!("pread of {} at {offset}", path.display()))?;
        stats::record(&mut h, start.elapsed());
    }
    let elapsed = began.elapsed();
    drop(file);
    std::fs::remove_file(&path)?;
    Ok(Summary::of(&h, elapsed))
}

struct Report<'a> {
    args: &'a ReadArgs,
    raw: Summary,
    measured: Measured,
}

impl Report<'_> {
    /// read p99 / (2 × raw p99 + rtt p99), after coalescing.
    fn ratio(&self) -> f64 {
        let bound = 2 * self.raw.p99_us + self.measured.after.rtt.p99_us;
        self.measured.after.read.p99_us as f64 / bound.max(1) as f64
    }

    fn json(&self) {
        let out = json!({
            "read_p50_us": self.measured.after.read.p50_us,
            "read_p99_us": self.measured.after.read.p99_us,
            "raw_read_p99_us": self.raw.p99_us,
            "rtt_p99_us": self.measured.after.rtt.p99_us,
            "ratio": self.ratio(),
            "history_records": self.args.history,
            "record_bytes": RECORD_BYTES,
            "page_bytes": PAGE_BYTES,
            "read": self.measured.after.read,
            "rtt": self.measured.after.rtt,
            "raw_read": self.raw,
            "before_coalescing": {"read": self.measured.before.read, "rtt": self.measured.before.rtt},
            "engine_read": self.measured.engine,
            "coalesce_wait_ms": self.measured.coalesce_wait.as_millis() as u64,
        });
        println!("{out}");
    }

    fn text(&self) {
        let history = self.args.history;
        println!("{}", self.raw.line("raw disk: 4 KiB O_DIRECT pread"));
        println!(
            "{}",
            self.measured
                .before
                .read
                .line(&format!("ReadPage, {history} records in the journal"))
        );
        println!(
            "{}",
            self.measured.after.read.line(&format!(
                "ReadPage, coalesced (waited {:.1} s)",
                self.measured.coalesce_wait.as_secs_f64()
            ))
        );
        println!(
            "{}",
            self.measured.after.rtt.line("GetVolumeState (round trip)")
        );
        println!(
            "{}",
            self.measured
                .engine
                .line("engine read_page_from, coalesced")
        );
        let ratio = self.ratio();
        println!(
            "target: read p99 / (2 × raw p99 + round-trip p99) = {} / (2 × {} + {}) µs = \
             {ratio:.2} (≤ 1.0): {}",
            self.measured.after.read.p99_us,
            self.raw.p99_us,
            self.measured.after.rtt.p99_us,
            if ratio <= 1.0 { "met" } else { "MISSED" }
        );
    }
}
