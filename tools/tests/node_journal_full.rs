//! A full journal against a real node process (io_uring O_DIRECT journal on the disk, QUIC with
//! mutual TLS): an append that finds no room is answered `JournalFull` at once, never left
//! waiting, and the node goes on serving.

mod common;

use common::*;
use node::journal::format::GROUP_BYTES_MAX;
use tools::procs::{NodeProcess, NodeSpec};
use wire::{ErrorCode, Message, VolumeId};

/// Records of 4 KiB per append.
const RECORDS_PER_APPEND: u64 = 16;

/// Goal: a journal that fills (nothing can be coalesced without a PGMRPL, so nothing is
/// collected) turns appends into immediate `JournalFull` replies, not hangs: the client's
/// request deadline would turn a wait into a different error, which fails the test; the node
/// says so once in its log and still answers other requests.
/// Method: a node with two journal files of one group's size; chain appends of 16 × 4 KiB
/// until one is refused; then one more append and a GetVolumeState.
#[test]
fn a_full_journal_is_an_error_not_a_hang() {
    let dir = test_dir("journal-full");
    let certs = certs(&dir);
    let mut spec = NodeSpec::local("node1", &dir.join("node1"), &certs);
    spec.journal_file_bytes = GROUP_BYTES_MAX as u64;
    spec.journal_file_count = 2;
    let node = NodeProcess::start(&spec.write_config().unwrap()).unwrap();
    runtime().block_on(async {
        let client = connect(&certs, &node).await;
        let mut lsn = 0;
        let mut acked = 0;
        let refusal = loop {
            let records = (0..RECORDS_PER_APPEND)
                .map(|_| {
                    lsn += 1;
                    write(lsn, lsn - 1, lsn % 64, 4096)
                })
                .collect();
            match client.append(append(1, records)).await.unwrap() {
                Ok(_) => acked += 1,
                Err(refusal) => break refusal,
            }
            assert!(acked < 1000, "two 8 MiB files cannot take {acked} appends");
        };
        assert_eq!(refusal.code, ErrorCode::JournalFull, "{refusal:?}");
        assert!(acked >= 100, "the journal took {acked} appends first");
        let again = append(1, vec![write(lsn + 1, lsn, 1, 4096)]);
        let refusal = client.append(again).await.unwrap().unwrap_err();
        assert_eq!(refusal.code, ErrorCode::JournalFull, "{refusal:?}");
        let state = client.request(Message::GetVolumeState(VolumeId(1))).await;
        assert!(matches!(state, Ok(Message::VolumeState(_))), "{state:?}");
        client.close();
    });
    let log = std::fs::read_to_string(&node.log).unwrap();
    assert!(log.contains("back-pressure: delaying acks"), "{log}");
    assert_eq!(log.matches("journal is full").count(), 1, "{log}");
    drop(node);
    cleanup(&dir);
}
