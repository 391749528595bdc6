//! `soak`'s catch-up phase: on a fresh six-node cluster under the soak's load, node6 is killed
//! (SIGKILL), stays down for `--catch-up-down-seconds`, and is restarted while the load goes
//! on; the bench then polls node6 with GetVolumeState (over QUIC with the engine's
//! certificate) until each of its segments' SCL has reached the highest SCL the other
//! segments of its PG had when node6 came back. What node6 missed comes back through gossip
//! from its peers and through the writer's catch-up from the records it retained; node6's
//! `node_gossip_records_fetched_total` tells the two apart.
//!
//! Records missed = the highest SCL of the others at restart − the lowest SCL of node6's
//! segments (as the writer knew them) when it was killed: every LSN is one one-record MTR and
//! node6 hosts a segment of every PG, so this counts what it lacked, give or take the
//! transactions in flight. Catch-up rate = records missed / time from node6 serving again to
//! its SCLs reaching those points; beside it, each node's own append rate on this cluster in
//! the seconds before the kill (target: catch-up ≥ 50 % of it).
//!
//! Invariants: the journals are sized so that, while node6 is down, its peers stay below the
//! half-full mark from which garbage collection stops keeping records for a peer it has not
//! heard from (see `NodeCore::gc_hold_back`): what node6 misses is still there to fetch. Every
//! wait has a deadline; a node that has not caught up by then is reported, not waited for.

use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::Context;
use engine::{NodeClient, VolumeClient};
use serde::Serialize;
use tools::cluster::LocalCluster;
use wire::{Lsn, Message, PgId, SegmentIndex};

use crate::soak::{self, Load, SoakArgs, Window, WindowStart};

/// The node taken down (node6).
const NODE: usize = 5;
/// Load measured before the kill, for the node's own append rate.
const PRE_SECONDS: u64 = 5;
/// How often node6 is asked for its SCLs.
const POLL_INTERVAL: Duration = Duration::from_millis(20);
/// The catch-up target stated by the issue.
const RATIO_MIN: f64 = 0.5;
/// Journal fraction the writes up to the restart are sized to fill at most: below the 50 %
/// from which peers stop holding records for a node they have not heard from.
const JOURNAL_FILL_SIZED: f64 = 0.45;
/// A fresh cluster may commit faster than the soaked one.
const RATE_MARGIN: f64 = 1.5;

/// What the catch-up phase measured.
#[derive(Clone, Debug, Serialize)]
pub(crate) struct CatchUp {
    pub(crate) down_seconds: u64,
    /// Each node's own append rate on this cluster before the kill.
    pub(crate) append_records_per_s: f64,
    pub(crate) append_mb_per_s: f64,
    /// From starting node6 again to it serving (its journal replayed).
    pub(crate) restart_ms: u64,
    pub(crate) missed_records: u64,
    pub(crate) caught_up: bool,
    /// From node6 serving again to its SCLs reaching the others' (None: not within the
    /// deadline).
    pub(crate) seconds: Option<f64>,
    pub(crate) records_per_s: Option<f64>,
    pub(crate) mb_per_s: Option<f64>,
    /// catch-up MB/s over append MB/s.
    pub(crate) ratio: Option<f64>,
    /// Records node6 fetched from its peers by gossip (the rest came from the writer).
    pub(crate) gossip_records_fetched: Option<u64>,
    pub(crate) journal_bytes: u64,
    /// Transactions that failed during the phase.
    pub(crate) errors: u64,
}

/// How long node6 may take to catch up before the bench gives up on it.
fn deadline(down_seconds: u64) -> Duration {
    Duration::from_secs((4 * down_seconds).max(60))
}

pub(crate) async fn measure(args: &SoakArgs, dir: &Path, rate: &Window) -> anyhow::Result<CatchUp> {
    let down = args.catch_up_down_seconds;
    // One second of warm-up, the measured seconds before the kill, the outage.
    let seconds = (1 + PRE_SECONDS + down) as f64;
    let journal_bytes =
        crate::soak_paused::journal_bytes(args, rate, (seconds, RATE_MARGIN), JOURNAL_FILL_SIZED);
    crate::soak_paused::check_disk(dir, journal_bytes, "--catch-up-down-seconds")?;
    soak::progress(
        args,
        &format!(
            "catch-up: starting 6 fresh sixfold-nodes, journals of {} MiB …",
            journal_bytes >> 20
        ),
    );
    let mut cluster = LocalCluster::start(dir, &soak::cluster_options(journal_bytes)).await?;
    let volume = Arc::new(cluster.attach(engine::VolumeConfig::default()).await?);
    let load = Load::start(volume.clone(), args.inflight, args.record_bytes);
    let measured = outage(args, &mut cluster, &volume, &load).await;
    let (_, errors) = load.stop().await?;
    let stopped = cluster.stop();
    let mut catch_up = measured?;
    stopped?;
    catch_up.journal_bytes = journal_bytes;
    catch_up.errors = errors;
    Ok(catch_up)
}

/// The node's own rate, the kill, the outage, the restart and the catch-up.
async fn outage(
    args: &SoakArgs,
    cluster: &mut LocalCluster,
    volume: &VolumeClient,
    load: &Load,
) -> anyhow::Result<CatchUp> {
    let down = args.catch_up_down_seconds;
    soak::progress(
        args,
        &format!("catch-up: {PRE_SECONDS} s of load with all six nodes …"),
    );
    tokio::time::sleep(Duration::from_secs(1)).await; // Warm-up, not measured.
    let _ = load.take_latencies();
    let start = WindowStart::now(load, cluster.metrics_addr(0)).await;
    tokio::time::sleep(Duration::from_secs(PRE_SECONDS)).await;
    let before = start
        .finish(load, &load.take_latencies(), args.record_bytes)
        .await;
    let segments = node_segments(volume);
    let killed_scl = segments
        .iter()
        .map(|&(pg, s)| volume.segment_scl(pg, s))
        .min()
        .unwrap_or(Lsn::ZERO);
    cluster.kill9(NODE);
    soak::progress(
        args,
        &format!("catch-up: node6 down for {down} s under load …"),
    );
    tokio::time::sleep(Duration::from_secs(down)).await;
    soak::progress(args, "catch-up: restarting node6 …");
    let restarting = Instant::now();
    // Blocks this thread until node6 serves; the load runs on the runtime's workers.
    cluster.restart(NODE)?;
    let restart_ms = restarting.elapsed().as_millis() as u64;
    let targets: Vec<(PgId, SegmentIndex, Lsn)> = segments
        .iter()
        .map(|&(pg, s)| (pg, s, others_scl(volume, pg, s)))
        .collect();
    let target_max = targets.iter().map(|t| t.2).max().unwrap_or(Lsn::ZERO);
    let missed_records = target_max.0.saturating_sub(killed_scl.0);
    soak::progress(
        args,
        &format!(
            "catch-up: node6 serves again; waiting until it holds {missed_records} records it missed …"
        ),
    );
    let ready = Instant::now();
    let caught_up = wait_caught_up(cluster, volume, &targets, deadline(down)).await?;
    let elapsed = ready.elapsed().as_secs_f64();
    let gossip_records_fetched = gossip_records_fetched(cluster).await;
    let records_per_s = caught_up.then(|| missed_records as f64 / elapsed.max(1e-3));
    let mb_per_s = records_per_s.map(|r| r * args.record_bytes as f64 / 1e6);
    Ok(CatchUp {
        down_seconds: down,
        append_records_per_s: before.summary.ops_per_s,
        append_mb_per_s: before.append_mb_per_s,
        restart_ms,
        missed_records,
        caught_up,
        seconds: caught_up.then_some(elapsed),
        records_per_s,
        mb_per_s,
        ratio: mb_per_s.map(|m| m / before.append_mb_per_s.max(1e-9)),
        gossip_records_fetched,
        journal_bytes: 0,
        errors: 0,
    })
}

/// Records node6 fetched by gossip since its restart, from its metrics.
async fn gossip_records_fetched(cluster: &LocalCluster) -> Option<u64> {
    let metrics = tools::scrape::scrape(cluster.metrics_addr(NODE)?)
        .await
        .ok()?;
    let fetched = metrics.value("node_gossip_records_fetched_total")?;
    Some(fetched as u64)
}

/// node6's segment of every PG.
fn node_segments(volume: &VolumeClient) -> Vec<(PgId, SegmentIndex)> {
    let placement = volume.file().placement();
    let segments: Vec<(PgId, SegmentIndex)> = placement
        .iter()
        .enumerate()
        .filter_map(|(pg, nodes)| {
            let s = nodes.iter().position(|&n| n == NODE)?;
            Some((PgId(pg as u32), SegmentIndex(s as u32)))
        })
        .collect();
    assert!(segments.len() == placement.len(), "six nodes host every PG");
    segments
}

/// The highest SCL, as the writer knows it, of the PG's segments other than `segment`.
fn others_scl(volume: &VolumeClient, pg: PgId, segment: SegmentIndex) -> Lsn {
    (0..wire::PG_SIZE as u32)
        .map(SegmentIndex)
        .filter(|s| *s != segment)
        .map(|s| volume.segment_scl(pg, s))
        .max()
        .unwrap_or(Lsn::ZERO)
}

/// Polls node6 until each of its segments' SCL reaches its target; false at the deadline.
async fn wait_caught_up(
    cluster: &LocalCluster,
    volume: &VolumeClient,
    targets: &[(PgId, SegmentIndex, Lsn)],
    deadline: Duration,
) -> anyhow::Result<bool> {
    let entry = &volume.file().nodes[NODE];
    let (client, _) = NodeClient::connect(&cluster.endpoint()?, entry.address, &entry.name)
        .await
        .context("connecting to node6 after its restart")?;
    let client = client.with_request_timeout(Duration::from_secs(5));
    let began = Instant::now();
    let caught_up = loop {
        let reply = client
            .request(Message::GetVolumeState(volume.file().id()))
            .await?;
        let Message::VolumeState(state) = reply else {
            anyhow::bail!("node6 answered GetVolumeState with {reply:?}");
        };
        let behind = targets.iter().any(|&(pg, segment, target)| {
            state
                .segments
                .iter()
                .find(|s| s.pg == pg && s.segment == segment)
                .is_none_or(|s| s.scl < target)
        });
        if !behind {
            break true;
        }
        if began.elapsed() >= deadline {
            eprintln!("warning: node6 had not caught up {deadline:?} after it came back");
            break false;
        }
        tokio::time::sleep(POLL_INTERVAL).await;
    };
    client.close();
    Ok(caught_up)
}

impl CatchUp {
    pub(crate) fn print(&self) {
        println!(
            "catch-up: node6 down {} s under load ({:.0} records/s = {:.1} MB/s appended per \
             node before), back in {} ms, {} records missed",
            self.down_seconds,
            self.append_records_per_s,
            self.append_mb_per_s,
            self.restart_ms,
            self.missed_records
        );
        let (Some(seconds), Some(records), Some(mb), Some(ratio)) =
            (self.seconds, self.records_per_s, self.mb_per_s, self.ratio)
        else {
            println!(
                "target: catch-up ≥ {RATIO_MIN} × append throughput: MISSED (node6 had not \
                 caught up within the deadline)"
            );
            return;
        };
        println!(
            "    caught up in {seconds:.2} s: {records:.0} records/s = {mb:.1} MB/s{}",
            self.gossip_records_fetched
                .map(|g| format!(" ({g} records fetched by gossip, the rest from the writer)"))
                .unwrap_or_default()
        );
        println!(
            "target: catch-up / append throughput = {mb:.1} / {:.1} MB/s = {ratio:.2} (≥ \
             {RATIO_MIN}): {}",
            self.append_mb_per_s,
            if ratio >= RATIO_MIN { "met" } else { "MISSED" }
        );
    }
}
