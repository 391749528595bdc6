//! The journal on the real disk (O_DIRECT under cargo's target tmpdir), written by a node run
//! in process (core, driver and journal writer, no QUIC): after a torn group, a stale but valid
//! group behind it must never be taken for the successor of a new one.

use std::os::unix::fs::FileExt;
use std::path::Path;

use bytes::Bytes;
use node::journal::JournalFiles;
use node::{Node, NodeConfig};
use wire::{Append, Epoch, Frame, LogRecord, Lsn, Message, PageId, PgId, RedoOp, Role};
use wire::{SegmentIndex, VolumeId};

fn config(dir: &Path) -> NodeConfig {
    let text = format!(
        "name = \"node1\"\nlisten = \"127.0.0.1:0\"\naz = \"az1\"\ndata_dir = \"{}\"\n\n\
         [tls]\nca = \"unused\"\ncert = \"unused\"\nkey = \"unused\"\n\n[journal]\n\
         file_bytes = {}\nfile_count = 2\ninflight_groups_max = 4\nsync = \"rwf_dsync\"\n\n\
         [[segment]]\nvolume = 1\npg = 0\nsegment = 0\n",
        dir.display(),
        8 << 20
    );
    NodeConfig::parse(&text, "test").unwrap()
}

/// Opens the node in `dir`, persists one single-record group per LSN (one at a time, at the
/// node's epoch 0), shuts it down; returns how many stale headers recovery erased.
fn write_groups(dir: &Path, lsns: &[u64]) -> u32 {
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    runtime.block_on(async {
        let (node, report) = Node::open(config(dir)).unwrap();
        let (stream, mut replies) = node.driver().open_stream(Some(Role::Engine));
        for &lsn in lsns {
            let append = Append {
                volume: VolumeId(1),
                epoch: Epoch(0),
                pg: PgId(0),
                segment: SegmentIndex(0),
                vdl: Lsn::ZERO,
                records: vec![LogRecord {
                    lsn: Lsn(lsn),
                    backlink: Lsn(lsn - 1),
                    page: PageId(1),
                    cpl: true,
                    op: RedoOp::Write {
                        offset: 0,
                        bytes: vec![lsn as u8; 1000],
                    },
                }],
            };
            let frame = Frame {
                request_id: lsn,
                message: Message::Append(append),
            };
            let slot = stream.reserve().await;
            stream.send(slot, Bytes::from(frame.to_bytes()).slice(4..));
            let reply = Frame::decode(&replies.recv().await.unwrap()).unwrap();
            assert!(matches!(reply.message, Message::Ack(_)), "{reply:?}");
        }
        node.shutdown().await.unwrap();
        report.stale_headers_erased
    })
}

fn lsns(dir: &Path) -> Vec<u64> {
    let scan = JournalFiles::open_existing(&dir.join("journal"))
        .unwrap()
        .scan()
        .unwrap();
    let appends = scan
        .groups
        .iter()
        .flat_map(|g| g.entries.iter().map(|e| &e.append));
    appends
        .flat_map(|a| a.records.iter().map(|r| r.lsn.0))
        .collect()
}

/// Goal: recovery erases stale group headers past the durable end, so after a torn group and
/// a new write of the same size, the old group after the torn one does not come back.
/// Method: write groups 1, 2, 3 of equal size; garble group 2; recover (the node erases the
/// torn header and the stale one behind it) and write a new group 2' (it lands where 2 was,
/// and 3 sat right after it with sequence 3); scan again.
#[test]
fn a_stale_group_behind_a_torn_one_never_comes_back() {
    let dir =
        Path::new(env!("CARGO_TARGET_TMPDIR")).join(format!("journal-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    assert_eq!(write_groups(&dir, &[1, 2, 3]), 0);
    assert_eq!(lsns(&dir), vec![1, 2, 3]);

    let journal = JournalFiles::open_existing(&dir.join("journal")).unwrap();
    let second = journal.scan().unwrap().groups[1].position;
    // Garble through an ordinary (buffered) handle: O_DIRECT refuses a one-byte write.
    let path = node::journal::file_path(&dir.join("journal"), 0);
    let file = std::fs::OpenOptions::new().write(true).open(&path).unwrap();
    file.write_all_at(&[0xFF], second.offset + 100).unwrap();
    file.sync_all().unwrap();
    drop((file, journal));

    let scan = JournalFiles::open_existing(&dir.join("journal"))
        .unwrap()
        .scan()
        .unwrap();
    assert_eq!(
        (scan.groups.len(), scan.end, scan.next_sequence),
        (1, second, 2)
    );
    let erased = write_groups(&dir, &[12]);
    assert_eq!(
        erased, 2,
        "the torn group's header and the stale one behind it"
    );
    assert_eq!(lsns(&dir), vec![1, 12], "group 3 stays gone");
    std::fs::remove_dir_all(&dir).unwrap();
}
