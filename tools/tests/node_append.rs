//! Process-level tests of the storage node's foreground path: real `sixfold-node` processes,
//! real io_uring O_DIRECT journals on the disk, real QUIC with mutual TLS.

mod common;

use common::*;
use wire::{Lsn, Message};

/// Goal: each append is acknowledged with its segment's SCL, which follows backlinks: a batch
/// beyond a gap is durable but does not move the SCL until the gap fills.
/// Method: send a chain with one batch held back, then the held-back batch.
#[test]
fn append_round_trip_acks_carry_scl() {
    let dir = test_dir("round-trip");
    let certs = certs(&dir);
    let (node, spec) = start_node(&dir, &certs);
    runtime().block_on(async {
        let client = connect(&certs, &node).await;
        let ack = client
            .append(append(1, vec![write(10, 0, 1, 100)]))
            .await
            .unwrap()
            .unwrap();
        assert_eq!(ack.scl, Lsn(10));
        let ack = client
            .append(append(
                1,
                vec![write(11, 10, 1, 4096), write(12, 11, 2, 10)],
            ))
            .await
            .unwrap()
            .unwrap();
        assert_eq!(ack.scl, Lsn(12));
        // 14 follows 13, which has not arrived: durable, but the SCL stays at 12.
        let ack = client
            .append(append(1, vec![write(14, 13, 1, 10)]))
            .await
            .unwrap()
            .unwrap();
        assert_eq!(ack.scl, Lsn(12));
        let ack = client
            .append(append(1, vec![write(13, 12, 3, 10)]))
            .await
            .unwrap()
            .unwrap();
        assert_eq!(ack.scl, Lsn(14));
        // A duplicate is harmless and reports the same SCL.
        let ack = client
            .append(append(1, vec![write(11, 10, 1, 4096)]))
            .await
            .unwrap()
            .unwrap();
        assert_eq!(ack.scl, Lsn(14));
    });
    let mut lsns = durable_lsns(&spec.data_dir);
    lsns.sort_unstable();
    lsns.dedup();
    assert_eq!(lsns, vec![10, 11, 12, 13, 14]);
    drop(node);
    cleanup(&dir);
}

/// Goal: many concurrent appends on one stream all get their own replies, in journal order
/// per stream, and SCLs never go backwards.
/// Method: 64 appends in flight on one connection, then check every ack.
#[test]
fn pipelined_appends_each_get_an_ack() {
    let dir = test_dir("pipelined");
    let certs = certs(&dir);
    let (node, _spec) = start_node(&dir, &certs);
    runtime().block_on(async {
        let client = std::sync::Arc::new(connect(&certs, &node).await);
        let mut tasks = Vec::new();
        for i in 1..=64u64 {
            let client = client.clone();
            tasks.push(tokio::spawn(async move {
                client
                    .append(append(1, vec![write(i, i - 1, i, 4096)]))
                    .await
                    .unwrap()
                    .unwrap()
            }));
        }
        let mut max_scl = Lsn(0);
        for task in tasks {
            max_scl = max_scl.max(task.await.unwrap().scl);
        }
        assert_eq!(max_scl, Lsn(64));
        let reply = client
            .request(Message::Append(append(1, vec![write(65, 64, 1, 1)])))
            .await;
        assert!(matches!(reply.unwrap(), Message::Ack(a) if a.scl == Lsn(65)));
    });
    drop(node);
    cleanup(&dir);
}
