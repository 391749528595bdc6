//! The node's read path: a page as of exactly a read point, from records re-read from the
//! journal, refused when the segment's SCL is below the read point; the same after a restart.

mod common;

use common::*;
use engine::NodeClient;
use tools::procs::NodeProcess;
use wire::{
    Epoch, ErrorCode, LogRecord, Lsn, Message, PageId, PgId, ReadPage, RedoOp, SegmentIndex,
    VolumeId,
};

fn op(lsn: u64, backlink: u64, page: u64, op: RedoOp) -> LogRecord {
    LogRecord {
        lsn: Lsn(lsn),
        backlink: Lsn(backlink),
        page: PageId(page),
        cpl: true,
        op,
    }
}

fn put(offset: u32, bytes: &[u8]) -> RedoOp {
    RedoOp::Write {
        offset,
        bytes: bytes.to_vec(),
    }
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

fn page_of(message: Message) -> (Lsn, Vec<u8>) {
    match message {
        Message::Page(page) => (page.page_lsn, page.bytes),
        other => panic!("expected a page, got {other:?}"),
    }
}

async fn check_reads(client: &NodeClient) {
    let (lsn, bytes) = page_of(read(client, 1, 2).await);
    assert_eq!((lsn, &bytes[..6]), (Lsn(2), &b"hello\0"[..]));
    assert_eq!(bytes.len(), 8192);
    let (lsn, bytes) = page_of(read(client, 1, 3).await);
    assert_eq!((lsn, &bytes[..6]), (Lsn(3), &b"helXY\0"[..]));
    let (lsn, bytes) = page_of(read(client, 1, 5).await);
    assert_eq!(
        (lsn, &bytes[..6]),
        (Lsn(5), &[0u8; 6][..]),
        "Init zeroes the page"
    );
    let (lsn, bytes) = page_of(read(client, 2, 5).await);
    assert_eq!((lsn, &bytes[8190..]), (Lsn(4), &b"!!"[..]));
    let (lsn, bytes) = page_of(read(client, 3, 5).await);
    assert_eq!(
        (lsn, bytes.iter().all(|b| *b == 0)),
        (Lsn(0), true),
        "a page never written"
    );
    match read(client, 1, 7).await {
        Message::Error(e) => {
            assert_eq!(e.code, ErrorCode::SclBelowReadPoint);
            assert!(e.message.contains("SCL 5"), "{}", e.message);
        }
        other => panic!("a read above the SCL must be refused, got {other:?}"),
    }
}

/// Goal: reads return the page as of exactly the read point and are refused above the SCL,
/// before and after a restart (which rebuilds the page index from the journal).
/// Method: write a small history of two pages, with a record beyond a gap, and read it back
/// at every interesting point.
#[test]
fn read_page_at_read_points() {
    let dir = test_dir("read");
    let certs = certs(&dir);
    let (mut node, _spec) = start_node(&dir, &certs);
    runtime().block_on(async {
        let client = connect(&certs, &node).await;
        let history = [
            vec![op(1, 0, 1, put(0, b"hello")), op(2, 1, 1, put(0, b"hello"))],
            vec![op(3, 2, 1, put(3, b"XY")), op(4, 3, 2, put(8190, b"!!"))],
            vec![op(5, 4, 1, RedoOp::Init)],
            vec![op(7, 6, 1, put(0, b"beyond a gap"))],
        ];
        for records in history {
            client.append(append(1, records)).await.unwrap().unwrap();
        }
        check_reads(&client).await;
    });
    runtime().block_on(async {
        let client = connect(&certs, &node).await;
        let set = |pg| {
            let pgmrpl = Lsn(3);
            Message::SetPgmrpl(wire::SetPgmrpl {
                volume: VolumeId(1),
                pg: PgId(pg),
                pgmrpl,
                epoch: wire::Epoch(0),
                vdl: Lsn::ZERO,
            })
        };
        assert_eq!(client.request(set(0)).await.unwrap(), Message::Done);
        match client.request(set(9)).await.unwrap() {
            Message::Error(e) => assert_eq!(e.code, ErrorCode::UnknownSegment),
            other => panic!("PGMRPL for a PG not hosted here must be refused, got {other:?}"),
        }
    });
    assert!(node.terminate().unwrap().success());
    let node = NodeProcess::start(&node.config).unwrap();
    runtime().block_on(async {
        let client = connect(&certs, &node).await;
        check_reads(&client).await;
    });
    drop(node);
    cleanup(&dir);
}
