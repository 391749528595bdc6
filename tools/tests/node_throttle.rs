//! Back-pressure against six real node processes (io_uring, O_DIRECT, QUIC with mutual TLS):
//! a node that delays its acks does not stall commits, since the engine's 4/6 quorum goes
//! around it; it says so once in its log and in its metrics; and its acks still arrive.

mod common;

use std::time::Duration;

use common::{cleanup, runtime, scrape, test_dir, value};
use engine::quorum::MtrRecord;
use engine::{VolumeClient, VolumeConfig};
use node::config::BackpressureSettings;
use tools::cluster::{ClusterOptions, LocalCluster};
use wire::{Lsn, PageId, PgId, RedoOp, SegmentIndex};

/// The node made to throttle (node1).
const THROTTLED: usize = 0;
/// Transactions committed one after the other.
const COMMITS: u64 = 30;

/// Restarts node `i` with back-pressure forced on (every ack held for the longest a node ever
/// holds one) and its metrics served on a free port.
fn throttle(cluster: &mut LocalCluster, i: usize) {
    let spec = &mut cluster.specs[i];
    spec.backpressure = BackpressureSettings {
        journal_percent: 0,
        ack_delay_min_ms: 1000,
        ack_delay_max_ms: 1000,
        ..BackpressureSettings::default()
    };
    spec.metrics_listen = Some("127.0.0.1:0".parse().unwrap());
    spec.write_config().unwrap();
    cluster.restart(i).unwrap();
}

/// PG 0's segment on node `i`.
fn segment_of(cluster: &LocalCluster, i: usize) -> SegmentIndex {
    let name = &cluster.volume.nodes[i].name;
    let (_, segment) = cluster
        .volume
        .segments_of(name)
        .into_iter()
        .find(|(pg, _)| *pg == PgId(0))
        .expect("every node hosts a segment of PG 0 in a six-node cluster");
    segment
}

/// Writes one 512-byte record to a page of PG 0 and commits it, failing the test with the
/// writer's state if that takes over 60 s; returns its CPL.
async fn commit_one(volume: &VolumeClient, i: u64) -> Lsn {
    let record = MtrRecord {
        page: PageId(i % 64),
        op: RedoOp::Write {
            offset: 0,
            bytes: vec![(i % 251) as u8; 512],
        },
    };
    let cpl = volume.write_mtr(vec![record]).await.unwrap();
    let waited = tokio::time::timeout(Duration::from_secs(60), volume.commit(cpl)).await;
    match waited {
        Ok(result) => result.unwrap(),
        Err(_) => panic!("commit of {cpl} stalled for 60 s: {}", volume.debug_state()),
    }
    cpl
}

/// Goal: a node that delays every ack (back-pressure) does not stall commits: the engine's
/// 4/6 quorum commits without it, so commits complete before the slow node has acknowledged
/// them (if commits needed it, none could); the node logs one WARN for the episode and counts
/// the acks it delayed; and its held acks do arrive (they are delayed, never dropped).
/// Method: six nodes; node1 restarted with `[backpressure] journal_percent = 0` and a 1 s ack
/// delay; 30 one-record transactions committed one after another; after each, compare the
/// SCL the engine has from node1's PG 0 segment with the transaction's CPL; then scrape
/// node1's metrics, read its log, and wait (60 s at most) for its acks to catch up.
#[test]
fn a_throttled_node_does_not_stall_commits() {
    let dir = test_dir("node-throttle");
    runtime().block_on(async {
        let mut cluster = LocalCluster::start(&dir, &ClusterOptions::default())
            .await
            .unwrap();
        throttle(&mut cluster, THROTTLED);
        let segment = segment_of(&cluster, THROTTLED);
        let volume = cluster.attach(VolumeConfig::default()).await.unwrap();
        let mut before_its_ack = 0;
        let mut last = Lsn::ZERO;
        for i in 0..COMMITS {
            last = commit_one(&volume, i).await;
            if volume.segment_scl(PgId(0), segment) < last {
                before_its_ack += 1;
            }
        }
        assert!(
            before_its_ack > 0,
            "every commit waited for the throttled node: {}",
            volume.debug_state()
        );

        let node = cluster.nodes[THROTTLED].as_ref().unwrap();
        let metrics = scrape(node.metrics_addr().expect("metrics are on"));
        assert!(value(&metrics, "node_acks_throttled_total") >= 1.0);
        assert_eq!(value(&metrics, "node_throttled"), 1.0);
        let log = std::fs::read_to_string(&node.log).unwrap();
        let said = log.matches("back-pressure: delaying acks").count();
        assert_eq!(said, 1, "one line per episode:\n{log}");

        let deadline = tokio::time::Instant::now() + Duration::from_secs(60);
        while volume.segment_scl(PgId(0), segment) < last {
            assert!(
                tokio::time::Instant::now() < deadline,
                "the throttled node's acks never came: {}",
                volume.debug_state()
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        eprintln!("{before_its_ack} of {COMMITS} commits completed before node1's ack");
        drop(volume);
        cluster.stop().unwrap();
    });
    cleanup(&dir);
}
