//! The journal on the real disk (O_DIRECT under cargo's target tmpdir): after a torn group, a
//! stale but valid group behind it must never be taken for the successor of a new one.

use std::os::unix::fs::FileExt;
use std::path::Path;
use std::sync::Arc;
use std::sync::mpsc;

use node::journal::{JournalFiles, Position};
use node::persister::{PersistRequest, Persister, PersisterConfig, RecordInBody};
use node::state::SegmentKey;
use wire::{Append, Epoch, LogRecord, Lsn, PageId, PgId, RedoOp, SegmentIndex, VolumeId};

fn segment() -> SegmentKey {
    SegmentKey {
        volume: VolumeId(1),
        pg: PgId(0),
        segment: SegmentIndex(0),
    }
}

/// Persists one single-record group per LSN (one at a time) and returns the persister.
fn write_groups(journal: JournalFiles, end: Position, next_sequence: u64, lsns: &[u64]) {
    let persister = Persister::start(
        journal,
        end,
        next_sequence,
        Arc::default(),
        PersisterConfig::default(),
    )
    .unwrap();
    for &lsn in lsns {
        let record = LogRecord {
            lsn: Lsn(lsn),
            backlink: Lsn(lsn - 1),
            page: PageId(1),
            cpl: true,
            op: RedoOp::Write {
                offset: 0,
                bytes: vec![lsn as u8; 1000],
            },
        };
        let append = Append {
            volume: VolumeId(1),
            epoch: Epoch(1),
            pg: PgId(0),
            segment: SegmentIndex(0),
            vdl: Lsn::ZERO,
            records: vec![record],
        };
        let mut body = Vec::new();
        append.encode(&mut body);
        let (tx, rx) = mpsc::channel();
        let records = RecordInBody::of(&append);
        let reply = Box::new(move |r| tx.send(r).unwrap());
        persister.submit(PersistRequest {
            segment: segment(),
            body,
            records,
            reply,
        });
        rx.recv().unwrap().unwrap();
    }
}

fn lsns(dir: &Path) -> Vec<u64> {
    let scan = JournalFiles::open_existing(dir).unwrap().scan().unwrap();
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
/// Method: write groups 1, 2, 3 of equal size; garble group 2; recover; write a new group 2'
/// (it lands where 2 was, and 3 sits right after it with sequence 3); scan again.
#[test]
fn a_stale_group_behind_a_torn_one_never_comes_back() {
    let dir =
        Path::new(env!("CARGO_TARGET_TMPDIR")).join(format!("journal-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    let journal = JournalFiles::open_or_create(&dir, 8 << 20, 2).unwrap();
    write_groups(journal, Position::default(), 1, &[1, 2, 3]);
    assert_eq!(lsns(&dir), vec![1, 2, 3]);

    let journal = JournalFiles::open_existing(&dir).unwrap();
    let scan = journal.scan().unwrap();
    let second = scan.groups[1].position;
    // Garble through an ordinary (buffered) handle: O_DIRECT refuses a one-byte write.
    let path = node::journal::file_path(&dir, 0);
    let file = std::fs::OpenOptions::new().write(true).open(&path).unwrap();
    file.write_all_at(&[0xFF], second.offset + 100).unwrap();
    file.sync_all().unwrap();
    drop((file, journal));

    let journal = JournalFiles::open_existing(&dir).unwrap();
    let scan = journal.scan().unwrap();
    assert_eq!(
        (scan.groups.len(), scan.end, scan.next_sequence),
        (1, second, 2)
    );
    let erased = journal.erase_stale_tail(scan.end).unwrap();
    assert_eq!(
        erased, 2,
        "the torn group's header and the stale one behind it"
    );
    write_groups(journal, scan.end, scan.next_sequence, &[12]);
    assert_eq!(lsns(&dir), vec![1, 12], "group 3 stays gone");
    std::fs::remove_dir_all(&dir).unwrap();
}
