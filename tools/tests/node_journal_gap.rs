//! A node process whose journal is damaged in the middle while it is down: it restarts, warns
//! about exactly the damaged range, keeps every group after it (indexed and readable once the
//! missing records arrive again), and `sixfold inspect journal` shows the same.

mod common;

use std::os::unix::fs::FileExt;
use std::path::Path;

use common::*;
use engine::NodeClient;
use node::journal::{JournalFiles, Position, file_path};
use tools::procs::NodeProcess;
use wire::{Epoch, ErrorCode, Lsn, Message, PageId, PgId, ReadPage, SegmentIndex, VolumeId};

/// Batches appended, one record each: LSN n has backlink n - 1 and writes page n % PAGES.
const LSN_MAX: u64 = 300;
const PAGES: u64 = 5;

fn record(lsn: u64) -> wire::LogRecord {
    write(lsn, lsn - 1, lsn % PAGES, 700)
}

async fn read(client: &NodeClient, page: u64, read_point: u64) -> Message {
    let request = ReadPage {
        volume: VolumeId(1),
        epoch: Epoch(1),
        pg: PgId(0),
        segment: SegmentIndex(0),
        page: PageId(page),
        read_point: Lsn(read_point),
    };
    client.request(Message::ReadPage(request)).await.unwrap()
}

/// Every page at `read_point` is the last record ≤ it that wrote the page (700 bytes of
/// `lsn % 251` at offset 0), read back from the journal.
async fn check_pages(client: &NodeClient, read_point: u64) {
    for page in 0..PAGES {
        let last = (1..=read_point)
            .rev()
            .find(|lsn| lsn % PAGES == page)
            .unwrap();
        match read(client, page, read_point).await {
            Message::Page(reply) => {
                assert_eq!(reply.page_lsn, Lsn(last), "page {page} at {read_point}");
                assert!(
                    reply.bytes[..700]
                        .iter()
                        .all(|b| u64::from(*b) == last % 251)
                );
            }
            other => panic!("page {page} at {read_point}: {other:?}"),
        }
    }
}

/// The SCL the node acknowledges with, learned by sending LSN 1 again (a harmless duplicate).
async fn scl(client: &NodeClient) -> Lsn {
    let ack = client.append(append(1, vec![record(1)])).await.unwrap();
    ack.unwrap().scl
}

/// Goal: one flipped byte in the middle of a real node's journal costs exactly the records of
/// that group: the restarted node logs the range at WARN, `inspect` lists every other record
/// and the range, the records after the gap wait below it (SCL stops, reads above it are
/// refused) and are served as soon as the lost batch is sent again, also after one more restart.
/// Method: append 300 one-record batches in order (one group each), stop the node, flip one
/// payload byte of group 150 with an ordinary file handle, restart, then check the log,
/// `inspect`, the SCL and reads before and after re-sending the lost record.
#[test]
fn a_flipped_byte_mid_journal_loses_one_group_and_is_reported() {
    let dir = test_dir("journal-gap");
    let certs = certs(&dir);
    let (mut node, spec) = start_node(&dir, &certs);
    runtime().block_on(async {
        let client = connect(&certs, &node).await;
        for lsn in 1..=LSN_MAX {
            let batch = append(1, vec![record(lsn)]);
            client.append(batch).await.unwrap().unwrap();
        }
    });
    assert!(node.terminate().unwrap().success());

    let range = damage_group_150(&spec.data_dir.join("journal"));
    let lost = [150];

    let mut node = NodeProcess::start(&node.config).unwrap();
    check_log_and_inspect(&node, &spec.data_dir, &range, &lost);
    runtime().block_on(async {
        let client = connect(&certs, &node).await;
        assert_eq!(scl(&client).await, Lsn(149), "the SCL stops below the gap");
        check_pages(&client, 149).await;
        match read(&client, 0, LSN_MAX).await {
            Message::Error(e) => assert_eq!(e.code, ErrorCode::SclBelowReadPoint),
            other => panic!("a read above the gap must be refused, got {other:?}"),
        }
        let ack = client.append(append(1, vec![record(150)])).await.unwrap();
        assert_eq!(
            ack.unwrap().scl,
            Lsn(LSN_MAX),
            "the records after the gap were indexed"
        );
        check_pages(&client, 200).await;
        check_pages(&client, LSN_MAX).await;
    });
    assert!(node.terminate().unwrap().success());

    // The damaged bytes are still there (recovery erased nothing); the re-sent record is too.
    let node = NodeProcess::start(&node.config).unwrap();
    let log = std::fs::read_to_string(&node.log).unwrap();
    assert_eq!(log.lines().filter(|l| l.contains(&range)).count(), 2);
    runtime().block_on(async {
        let client = connect(&certs, &node).await;
        assert_eq!(scl(&client).await, Lsn(LSN_MAX));
        check_pages(&client, LSN_MAX).await;
    });
    drop(node);
    cleanup(&dir);
}

/// Flips one payload byte of group 150 (LSN 150, a group in the middle) and returns how the
/// corrupt range is written in the log and by `inspect`.
fn damage_group_150(journal_dir: &Path) -> String {
    let scan = JournalFiles::open_existing(journal_dir)
        .unwrap()
        .scan(Default::default())
        .unwrap();
    assert_eq!(scan.groups.len() as u64, LSN_MAX, "one group per batch");
    let (damaged, next) = (&scan.groups[149], &scan.groups[150]);
    let records = &damaged.entries[0].append.records;
    let lost: Vec<u64> = records.iter().map(|r| r.lsn.0).collect();
    assert_eq!((damaged.sequence, lost.as_slice()), (150, &[150][..]));
    assert_eq!(damaged.position.file, next.position.file);
    flip_byte(journal_dir, damaged.position, 300);
    format!(
        "file {} bytes [{}, {}), group 150 missing (last good 149, next good 151)",
        damaged.position.file, damaged.position.offset, next.position.offset
    )
}

/// The restarted node warned about exactly `range`, once, and `inspect` lists every record
/// but the `lost` ones, then the range.
fn check_log_and_inspect(node: &NodeProcess, data_dir: &Path, range: &str, lost: &[u64]) {
    let log = std::fs::read_to_string(&node.log).unwrap();
    let warnings: Vec<&str> = log.lines().filter(|l| l.contains("WARN")).collect();
    assert_eq!(warnings.len(), 1, "{log}");
    assert!(
        warnings[0].contains("journal corrupt in the middle"),
        "{log}"
    );
    assert!(warnings[0].contains(range), "{range} in {log}");

    let expected: Vec<u64> = (1..=LSN_MAX).filter(|l| !lost.contains(l)).collect();
    assert_eq!(durable_lsns(data_dir), expected);
    let mut printed = Vec::new();
    tools::inspect::print_journal(data_dir, &mut printed).unwrap();
    let printed = String::from_utf8(printed).unwrap();
    assert!(
        printed.contains(&format!("# corrupt: {range}")),
        "{printed}"
    );
    assert!(printed.contains("; 1 corrupt ranges;"), "{printed}");
}

/// Flips one byte of a group through an ordinary handle (O_DIRECT refuses a one-byte write).
fn flip_byte(journal_dir: &Path, at: Position, offset_in_group: u64) {
    let file = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open(file_path(journal_dir, at.file))
        .unwrap();
    let mut byte = [0u8; 1];
    file.read_exact_at(&mut byte, at.offset + offset_in_group)
        .unwrap();
    file.write_all_at(&[byte[0] ^ 0x04], at.offset + offset_in_group)
        .unwrap();
    file.sync_all().unwrap();
}
