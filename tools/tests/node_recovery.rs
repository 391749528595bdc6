//! The node's side of crash recovery against a real node process over QUIC: Fence, Truncate,
//! GetVolumeState and FetchRecords, and what survives a restart.

mod common;

use common::*;
use engine::NodeClient;
use tools::procs::NodeProcess;
use wire::{Epoch, ErrorCode, FetchRecords, Lsn, Message, PgId, SegmentIndex, VolumeId};

async fn truncate(client: &NodeClient, epoch: Epoch, after: u64, through: u64) -> Message {
    let truncate = wire::Truncate {
        volume: VolumeId(1),
        epoch,
        range: wire::TruncationRange {
            annul_epoch: epoch,
            after: Lsn(after),
            through: Lsn(through),
        },
    };
    client.request(Message::Truncate(truncate)).await.unwrap()
}

/// The LSNs a FetchRecords of the whole segment returns, and the SCL it reports.
async fn fetch_all(client: &NodeClient, epoch: Epoch) -> (Lsn, Vec<u64>) {
    let fetch = FetchRecords {
        volume: VolumeId(1),
        epoch,
        pg: PgId(0),
        segment: SegmentIndex(0),
        after: Lsn(0),
        through: Lsn(u64::MAX),
        bytes_max: 1 << 20,
    };
    match client.request(Message::FetchRecords(fetch)).await.unwrap() {
        Message::Records(r) => (r.scl, r.records.iter().map(|r| r.lsn.0).collect()),
        other => panic!("expected records, got {other:?}"),
    }
}

fn state(message: Message) -> wire::VolumeState {
    match message {
        Message::VolumeState(state) => state,
        other => panic!("expected a volume state, got {other:?}"),
    }
}

fn error_code(reply: anyhow::Result<Result<wire::SegmentAck, wire::ErrorReply>>) -> ErrorCode {
    reply.unwrap().expect_err("the append must be refused").code
}

/// Goal: a recovering writer's view of a node: Fence installs its epoch (old-epoch appends are
/// refused from then on, newer epochs are not adopted), Truncate annuls (after, through] and
/// the SCL falls back, new records chain on from `after`, FetchRecords returns the chain; and
/// after a restart the node still has the epoch, the truncation (records in the range stay on
/// disk but are never served) and the same SCL and VDL hint.
/// Method: a chain 1..=6 at epoch 1; fence to epoch 2; truncate (3, 100]; append 101; restart.
#[test]
fn fence_truncate_restart() {
    let dir = test_dir("recovery");
    let certs = certs(&dir);
    let (mut node, spec) = start_node(&dir, &certs);
    let e2 = Epoch(1).next(7);
    runtime().block_on(async {
        let client = connect(&certs, &node).await;
        for lsn in 1..=6 {
            let mut batch = append(1, vec![write(lsn, lsn - 1, lsn % 3, 100)]);
            batch.vdl = Lsn(lsn - 1);
            client.append(batch).await.unwrap().unwrap();
        }
        let fenced = state(fence(&client, 1, e2.0).await);
        assert_eq!((fenced.epoch, fenced.vdl), (e2, Lsn(5)));
        assert_eq!(fenced.segments[0].scl, Lsn(6));
        let old = client.append(append(1, vec![write(7, 6, 1, 10)])).await;
        assert_eq!(error_code(old), ErrorCode::StaleEpoch);
        let newer = client
            .append(append(e2.next(3).0, vec![write(7, 6, 1, 10)]))
            .await;
        assert_eq!(error_code(newer), ErrorCode::EpochNotInstalled);

        let truncated = state(truncate(&client, e2, 3, 100).await);
        assert_eq!(truncated.segments[0].scl, Lsn(3));
        let ack = client
            .append(append(e2.0, vec![write(101, 3, 1, 10)]))
            .await
            .unwrap()
            .unwrap();
        assert_eq!(ack.scl, Lsn(101));
        assert_eq!(fetch_all(&client, e2).await, (Lsn(101), vec![1, 2, 3, 101]));
    });
    assert!(node.terminate().unwrap().success());
    let mut on_disk = durable_lsns(&spec.data_dir);
    on_disk.sort_unstable();
    assert_eq!(
        on_disk,
        vec![1, 2, 3, 4, 5, 6, 101],
        "truncation annuls, it does not erase"
    );

    let node = NodeProcess::start(&node.config).unwrap();
    runtime().block_on(async {
        let client = connect_as(&certs, &node, "engine").await;
        let after = state(
            client
                .request(Message::GetVolumeState(VolumeId(1)))
                .await
                .unwrap(),
        );
        assert_eq!((after.epoch, after.vdl), (e2, Lsn(5)));
        assert_eq!(after.segments[0].scl, Lsn(101));
        assert_eq!(fetch_all(&client, e2).await, (Lsn(101), vec![1, 2, 3, 101]));
        // The same truncation again changes nothing; a stale one is refused.
        assert_eq!(
            state(truncate(&client, e2, 3, 100).await).segments[0].scl,
            Lsn(101)
        );
        match truncate(&client, Epoch(1), 3, 100).await {
            Message::Error(e) => assert_eq!(e.code, ErrorCode::StaleEpoch),
            other => panic!("a truncation at an old epoch must be refused, got {other:?}"),
        }
    });
    drop(node);
    cleanup(&dir);
}
