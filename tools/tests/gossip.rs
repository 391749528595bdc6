//! Gossip between six real node processes on loopback (real io_uring journals on disk, real
//! QUIC with mutual TLS between the nodes, node certificates): a node that missed records
//! while it was down gets them from its peers, with no engine involved.

mod common;

use std::time::Duration;

use common::{cleanup, runtime, test_dir};
use engine::tls::ClientIdentity;
use engine::{NodeClient, VolumeConfig};
use tools::cluster::{ClusterOptions, LocalCluster};
use wire::{Append, LogRecord, Lsn, Message, PageId, PgId, RedoOp, SegmentIndex};

const PG: PgId = PgId(0);

/// Record `lsn` of PG 0's chain 1, 2, 3, … (each record's backlink is the one before).
fn record(lsn: u64) -> LogRecord {
    LogRecord {
        lsn: Lsn(lsn),
        backlink: Lsn(lsn - 1),
        page: PageId(lsn % 512),
        cpl: true,
        op: RedoOp::Write {
            offset: 0,
            bytes: vec![(lsn % 251) as u8; 1024],
        },
    }
}

/// An engine connection to node `i` of the cluster.
async fn client(cluster: &LocalCluster, i: usize) -> NodeClient {
    let node = &cluster.volume.nodes[i];
    let identity = ClientIdentity::in_dir(&cluster.certs, "engine");
    let endpoint = engine::tls::client_endpoint(&identity).unwrap();
    NodeClient::connect(&endpoint, node.address, &node.name)
        .await
        .unwrap()
        .0
}

/// The index of PG 0's segment on node `i`.
fn segment_of(cluster: &LocalCluster, i: usize) -> SegmentIndex {
    let name = &cluster.volume.nodes[i].name;
    let (_, segment) = cluster
        .volume
        .segments_of(name)
        .into_iter()
        .find(|(pg, _)| *pg == PG)
        .expect("every node hosts a segment of PG 0 in a six-node cluster");
    segment
}

/// Appends the records `lsns` of PG 0 to the segment on each node of `nodes`, as the engine
/// would (20 records a batch), and checks every ack.
async fn append_to(cluster: &LocalCluster, nodes: &[usize], lsns: std::ops::RangeInclusive<u64>) {
    for &i in nodes {
        let client = client(cluster, i).await;
        let lsns: Vec<u64> = lsns.clone().collect();
        for batch in lsns.chunks(20) {
            let append = Append {
                volume: cluster.volume.id(),
                epoch: cluster.volume.epoch(),
                pg: PG,
                segment: segment_of(cluster, i),
                vdl: Lsn::ZERO,
                records: batch.iter().map(|l| record(*l)).collect(),
            };
            let reply = client.request(Message::Append(append)).await.unwrap();
            assert!(matches!(reply, Message::Ack(_)), "node {i}: {reply:?}");
        }
        client.close();
    }
}

/// PG 0's SCL on node `i`, asked with GetVolumeState (`None` while it cannot be reached).
async fn scl_of(cluster: &LocalCluster, i: usize) -> Option<Lsn> {
    let node = &cluster.volume.nodes[i];
    let identity = ClientIdentity::in_dir(&cluster.certs, "engine");
    let endpoint = engine::tls::client_endpoint(&identity).ok()?;
    let (client, _) = NodeClient::connect(&endpoint, node.address, &node.name)
        .await
        .ok()?;
    let reply = client
        .request(Message::GetVolumeState(cluster.volume.id()))
        .await
        .ok()?;
    client.close();
    let Message::VolumeState(state) = reply else {
        return None;
    };
    let segment = segment_of(cluster, i);
    state
        .segments
        .iter()
        .find(|s| s.pg == PG && s.segment == segment)
        .map(|s| s.scl)
}

/// Goal: a node that was down while the others took records is complete again through
/// gossip alone (no engine runs at all, so no engine catch-up can be what filled it), and
/// then losing two other nodes does not stall commits.
/// Method: six nodes; the chain 1..=60 goes to all of them, node 6 is killed, 61..=160 goes to
/// nodes 1–5, node 6 restarts and 161..=200 goes to all six: node 6 now holds 1..=60 and
/// 161..=200 with a hole between (its SCL is 60). Wait (60 s at most) until its SCL is 200.
/// Then kill nodes 1 and 2, attach an engine (it recovers over nodes 3–6) and commit 20 MTRs.
#[test]
fn a_node_that_missed_records_catches_up_through_gossip() {
    let dir = test_dir("gossip-catch-up");
    runtime().block_on(async {
        let mut cluster = LocalCluster::start(&dir, &ClusterOptions::default())
            .await
            .unwrap();
        append_to(&cluster, &[0, 1, 2, 3, 4, 5], 1..=60).await;
        cluster.kill9(5);
        append_to(&cluster, &[0, 1, 2, 3, 4], 61..=160).await;
        cluster.restart(5).unwrap();
        append_to(&cluster, &[0, 1, 2, 3, 4, 5], 161..=200).await;
        for i in 0..5 {
            assert_eq!(scl_of(&cluster, i).await, Some(Lsn(200)), "node {}", i + 1);
        }

        let deadline = tokio::time::Instant::now() + Duration::from_secs(60);
        loop {
            let scl = scl_of(&cluster, 5).await;
            if scl == Some(Lsn(200)) {
                break;
            }
            assert!(
                tokio::time::Instant::now() < deadline,
                "node6's SCL is {scl:?} after 60 s, its peers' 200: gossip did not fill the \
                 hole (see {}/node6.log)",
                cluster.dir.display()
            );
            tokio::time::sleep(Duration::from_millis(100)).await;
        }

        // Two nodes down: four complete segments remain, so commits go on.
        cluster.kill9(0);
        cluster.kill9(1);
        let volume = cluster.attach(VolumeConfig::default()).await.unwrap();
        assert!(
            volume.vdl() >= Lsn(200),
            "recovery found the chain: {}",
            volume.debug_state()
        );
        for i in 0..20u64 {
            let records = vec![engine::quorum::MtrRecord {
                page: PageId(i),
                op: RedoOp::Write {
                    offset: 0,
                    bytes: vec![7; 64],
                },
            }];
            let commit = async {
                let cpl = volume.write_mtr(records).await.unwrap();
                volume.commit(cpl).await.unwrap();
            };
            let deadline = Duration::from_secs(30);
            if tokio::time::timeout(deadline, commit).await.is_err() {
                panic!(
                    "commit {i} stalled with two nodes down: {}",
                    volume.debug_state()
                );
            }
        }
        drop(volume);
        cluster.stop().unwrap();
    });
    cleanup(&dir);
}
