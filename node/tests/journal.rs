//! The journal on the real disk (O_DIRECT under cargo's target tmpdir). Recovery never destroys
//! a valid group: corruption in the middle is skipped and reported with the sequences it lost,
//! only a torn tail (nothing valid after it) ends the journal, and only stale headers (older
//! than the durable end) are erased, so a stale group can never come back.

use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};

use bytes::Bytes;
use node::core::{GroupId, PersistGroup};
use node::io::{AlignedBuf, DIRECT_IO_ALIGN, encode_group};
use node::journal::format::{GROUP_BYTES_MAX, GROUP_HEADER_BYTES, encode_header, push_entry};
use node::journal::{CorruptRange, JournalFiles, Position, Scan, file_path};
use proptest::prelude::*;
use wire::{Append, Epoch, LogRecord, Lsn, PageId, PgId, RedoOp, SegmentIndex, VolumeId};

/// Groups the persister tests write: one record per group, LSN = sequence.
const GROUPS: u64 = 300;
/// Small files, so that 300 groups of 4–12 KiB span three of them.
const FILE_BYTES: u64 = 1 << 20;

/// A fresh directory on the real disk, never tmpfs: the journal uses O_DIRECT.
fn test_dir(name: &str) -> PathBuf {
    let dir = Path::new(env!("CARGO_TARGET_TMPDIR"))
        .join(format!("journal-{name}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    dir
}

/// One record per LSN; its size varies with the LSN so that groups take one to three blocks.
fn append_of(lsn: u64) -> Append {
    let bytes_len = [500, 3000, 6000, 11_000][(lsn % 4) as usize];
    let record = LogRecord {
        lsn: Lsn(lsn),
        backlink: Lsn(lsn - 1),
        page: PageId(lsn % 3),
        cpl: true,
        op: RedoOp::Write {
            offset: 0,
            bytes: vec![(lsn % 251) as u8; bytes_len],
        },
    };
    Append {
        volume: VolumeId(1),
        epoch: Epoch(1),
        pg: PgId(0),
        segment: SegmentIndex(0),
        vdl: Lsn::ZERO,
        records: vec![record],
    }
}

/// Persists one single-record group per LSN (one group each, so group sequence follows LSN
/// order) from `end` on, laid out as the node's journal writer lays groups out
/// (`node::io::encode_group`), written O_DIRECT and synced.
fn write_groups(journal: JournalFiles, end: Position, next_sequence: u64, lsns: &[u64]) {
    let mut position = end;
    let mut buf = AlignedBuf::new(GROUP_BYTES_MAX);
    for (i, &lsn) in lsns.iter().enumerate() {
        let mut body = Vec::new();
        append_of(lsn).encode(&mut body);
        let sequence = next_sequence + i as u64;
        let bytes =
            (GROUP_HEADER_BYTES + 4 + body.len()).div_ceil(DIRECT_IO_ALIGN) * DIRECT_IO_ALIGN;
        if position.offset + bytes as u64 > journal.file_bytes {
            position = Position {
                file: position.file + 1,
                offset: 0,
            };
        }
        let group = PersistGroup {
            id: GroupId(sequence),
            sequence,
            position,
            entries: vec![Bytes::from(body)],
            bytes,
        };
        encode_group(&group, &mut buf);
        journal.files[position.file as usize]
            .write_all_at(buf.as_slice(), position.offset)
            .unwrap();
        position.offset += bytes as u64;
    }
    for file in &journal.files {
        file.sync_data().unwrap();
    }
}

/// A journal of `FILE_BYTES` × 4 holding groups 1..=GROUPS, and where each group starts.
fn journal_with_groups(dir: &Path) -> Vec<Position> {
    let journal = JournalFiles::open_or_create(dir, FILE_BYTES, 4).unwrap();
    let lsns: Vec<u64> = (1..=GROUPS).collect();
    write_groups(journal, Position::default(), 1, &lsns);
    let scan = JournalFiles::open_existing(dir)
        .unwrap()
        .scan(Default::default())
        .unwrap();
    assert_eq!(scan.groups.len() as u64, GROUPS);
    assert!(scan.corrupt.is_empty());
    assert!(scan.end.file >= 2, "the groups span three files");
    scan.groups.iter().map(|g| g.position).collect()
}

/// What a node's recovery sees: the scan, the LSNs of its groups, and how many stale headers
/// the tail erase zeroed (the same calls as `Node::open`).
struct Recovered {
    scan: Scan,
    lsns: Vec<u64>,
    erased: u32,
}

fn recover(dir: &Path) -> Recovered {
    let journal = JournalFiles::open_existing(dir).unwrap();
    let mut lsns = Vec::new();
    let scan = journal
        .scan_with(Default::default(), |group| {
            let records = group.entries.iter().flat_map(|e| &e.append.records);
            lsns.extend(records.map(|r| r.lsn.0));
        })
        .unwrap();
    let erased = journal
        .erase_stale_tail(Default::default(), scan.end, scan.next_sequence)
        .unwrap();
    Recovered { scan, lsns, erased }
}

/// Every byte of every journal file, to prove that recovery wrote nothing.
fn journal_bytes(dir: &Path) -> Vec<u8> {
    let mut out = Vec::new();
    let mut index = 0;
    while file_path(dir, index).exists() {
        out.extend(std::fs::read(file_path(dir, index)).unwrap());
        index += 1;
    }
    out
}

/// Flips bits of one byte through an ordinary handle (O_DIRECT refuses a one-byte write).
fn flip(dir: &Path, at: Position, offset_in_group: u64, mask: u8) {
    assert!(mask != 0);
    let path = file_path(dir, at.file);
    let file = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open(path)
        .unwrap();
    let mut byte = [0u8; 1];
    file.read_exact_at(&mut byte, at.offset + offset_in_group)
        .unwrap();
    file.write_all_at(&[byte[0] ^ mask], at.offset + offset_in_group)
        .unwrap();
    file.sync_all().unwrap();
}

/// The corrupt range that losing groups `first..=last` (1-based, = LSN) must produce, for a
/// `first` that does not start a file (the range starts where the group before it ends).
fn expected_range(positions: &[Position], first: u64, last: u64) -> (Position, Position, u64, u64) {
    let start = positions[first as usize - 1];
    assert!(start.offset > 0);
    let next = positions[last as usize];
    let end = if next.file == start.file {
        next
    } else {
        Position {
            file: start.file,
            offset: FILE_BYTES,
        }
    };
    (start, end, first - 1, last + 1)
}

fn range_of(range: &CorruptRange) -> (Position, Position, u64, u64) {
    (
        range.start,
        range.end,
        range.sequence_before,
        range.sequence_after,
    )
}

fn all_but(lost: &[u64]) -> Vec<u64> {
    (1..=GROUPS).filter(|lsn| !lost.contains(lsn)).collect()
}

/// Goal: one flipped payload byte in a middle group loses that group and nothing else, is
/// reported as exactly one range with the right sequences, and recovery writes nothing, then
/// or on the next restart; new groups go after the old end.
/// Method: 300 groups over three files; flip a byte in group 150's payload; recover twice,
/// comparing every journal byte; write two more groups; recover again.
#[test]
fn a_flipped_byte_in_a_middle_group_loses_only_that_group() {
    let dir = test_dir("middle-payload");
    let positions = journal_with_groups(&dir);
    let clean = recover(&dir);
    flip(&dir, positions[149], GROUP_HEADER_BYTES as u64 + 200, 0x01);
    let before = journal_bytes(&dir);

    let first = recover(&dir);
    assert_eq!(first.lsns, all_but(&[150]));
    assert_eq!(first.scan.corrupt.len(), 1);
    assert_eq!(
        range_of(&first.scan.corrupt[0]),
        expected_range(&positions, 150, 150)
    );
    assert_eq!(first.scan.corrupt[0].missing_sequences(), 150..151);
    assert!(first.scan.corrupt[0].reason.contains("CRC mismatch"));
    assert_eq!(
        (first.scan.end, first.scan.next_sequence),
        (clean.scan.end, clean.scan.next_sequence)
    );
    assert_eq!(first.erased, 0, "nothing after the corruption is stale");
    assert_eq!(journal_bytes(&dir), before, "recovery wrote nothing");

    let second = recover(&dir);
    assert_eq!(second.lsns, first.lsns);
    assert_eq!(second.scan.corrupt, first.scan.corrupt);
    assert_eq!(journal_bytes(&dir), before, "nor did the second one");

    let journal = JournalFiles::open_existing(&dir).unwrap();
    write_groups(
        journal,
        second.scan.end,
        second.scan.next_sequence,
        &[301, 302],
    );
    let third = recover(&dir);
    let mut expected = all_but(&[150]);
    expected.extend([301, 302]);
    assert_eq!(third.lsns, expected);
    assert_eq!(third.scan.corrupt, first.scan.corrupt);
    std::fs::remove_dir_all(&dir).unwrap();
}

/// Goal: a middle group whose header magic is damaged (so its length is unknown) is skipped
/// by the block-by-block look-ahead, and the group after it is found.
/// Method: zero-flip the first magic byte of group 120; recover; compare.
#[test]
fn a_damaged_header_magic_in_the_middle_is_skipped() {
    let dir = test_dir("middle-magic");
    let positions = journal_with_groups(&dir);
    flip(&dir, positions[119], 0, 0xFF);
    let recovered = recover(&dir);
    assert_eq!(recovered.lsns, all_but(&[120]));
    let ranges: Vec<_> = recovered.scan.corrupt.iter().map(range_of).collect();
    assert_eq!(ranges, vec![expected_range(&positions, 120, 120)]);
    assert!(recovered.scan.corrupt[0].reason.contains("no group header"));
    assert_eq!(recovered.erased, 0);
    std::fs::remove_dir_all(&dir).unwrap();
}

/// Goal: separate corruptions are separate ranges, a run of corrupt groups is one range, and
/// a corrupt last group of a file (its successor starts the next file) ends at its file's end.
/// Method: damage groups 40, 41 (a run), 200 and the last group of file 0; recover twice.
#[test]
fn several_corrupt_middle_groups_are_reported_one_range_each() {
    let dir = test_dir("middle-several");
    let positions = journal_with_groups(&dir);
    let last_of_file0 = positions.iter().filter(|p| p.file == 0).count() as u64;
    assert!(last_of_file0 > 42 && last_of_file0 < 199);
    for lsn in [40, 41, last_of_file0, 200] {
        flip(&dir, positions[lsn as usize - 1], 100, 0x80);
    }
    let recovered = recover(&dir);
    assert_eq!(recovered.lsns, all_but(&[40, 41, last_of_file0, 200]));
    let ranges: Vec<_> = recovered.scan.corrupt.iter().map(range_of).collect();
    let expected = vec![
        expected_range(&positions, 40, 41),
        expected_range(&positions, last_of_file0, last_of_file0),
        expected_range(&positions, 200, 200),
    ];
    assert_eq!(ranges, expected);
    assert_eq!(ranges[1].1.offset, FILE_BYTES, "ends with its file");
    assert_eq!(recovered.erased, 0);
    assert_eq!(recover(&dir).scan.corrupt, recovered.scan.corrupt);
    std::fs::remove_dir_all(&dir).unwrap();
}

/// Goal: a corrupt last group is still the torn tail: discarded, reported as the end (not as
/// a corrupt range), and the next group is written in its place.
/// Method: flip a byte of group 300; recover; write group 301; recover again.
#[test]
fn a_corrupt_last_group_is_the_torn_tail() {
    let dir = test_dir("tail");
    let positions = journal_with_groups(&dir);
    let last = positions[GROUPS as usize - 1];
    flip(&dir, last, GROUP_HEADER_BYTES as u64 + 10, 0x10);
    let recovered = recover(&dir);
    assert_eq!(recovered.lsns, all_but(&[GROUPS]));
    assert!(recovered.scan.corrupt.is_empty());
    assert_eq!(
        (recovered.scan.end, recovered.scan.next_sequence),
        (last, GROUPS)
    );
    assert!(recovered.scan.stop_reason.contains("CRC mismatch"));
    assert_eq!(
        recovered.erased, 0,
        "the torn group's sequence is not stale"
    );

    let journal = JournalFiles::open_existing(&dir).unwrap();
    write_groups(
        journal,
        recovered.scan.end,
        recovered.scan.next_sequence,
        &[301],
    );
    let again = recover(&dir);
    let mut expected = all_but(&[GROUPS]);
    expected.push(301);
    assert_eq!(again.lsns, expected);
    assert!(again.scan.corrupt.is_empty());
    std::fs::remove_dir_all(&dir).unwrap();
}

/// Goal: recovery erases a stale group (sequence below the durable end's) lying behind a torn
/// one, never the torn group's header (higher sequence), and after a new write neither comes
/// back. (A valid group with a higher sequence behind a torn one is not stale: it is kept, see
/// the middle-corruption tests.)
/// Method: write groups 1, 2, 3 of equal size; copy group 2 into the slot after 3, as a
/// misdirected or recycled write would leave it; garble group 3; recover; write a group 3'
/// of the same size (LSN 13) in 3's place, so that the stale copy's slot is where group 4
/// would be; scan again.
#[test]
fn a_stale_group_behind_a_torn_one_never_comes_back() {
    let dir = test_dir("stale");
    let journal = JournalFiles::open_or_create(&dir, 8 << 20, 2).unwrap();
    write_groups(journal, Position::default(), 1, &[1, 5, 9]);
    let scan = JournalFiles::open_existing(&dir)
        .unwrap()
        .scan(Default::default())
        .unwrap();
    let [second, third] = [scan.groups[1].position, scan.groups[2].position];
    let size = third.offset - second.offset;
    assert_eq!(scan.end.offset - third.offset, size, "equal sizes");

    let path = file_path(&dir, 0);
    let file = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open(&path)
        .unwrap();
    let mut copy = vec![0u8; size as usize];
    file.read_exact_at(&mut copy, second.offset).unwrap();
    file.write_all_at(&copy, scan.end.offset).unwrap();
    file.write_all_at(&[0xFF], third.offset + 100).unwrap();
    file.sync_all().unwrap();
    drop(file);

    let recovered = recover(&dir);
    assert_eq!(recovered.lsns, vec![1, 5]);
    assert!(
        recovered.scan.corrupt.is_empty(),
        "a stale copy is not a successor"
    );
    assert_eq!(
        (recovered.scan.end, recovered.scan.next_sequence),
        (third, 3)
    );
    assert_eq!(recovered.erased, 1, "the stale copy, not the torn group");
    let journal = JournalFiles::open_existing(&dir).unwrap();
    write_groups(
        journal,
        recovered.scan.end,
        recovered.scan.next_sequence,
        &[13],
    );
    let again = recover(&dir);
    assert_eq!(again.lsns, vec![1, 5, 13], "the stale group stays gone");
    assert_eq!(again.scan.end.offset, recovered.scan.end.offset + size);
    std::fs::remove_dir_all(&dir).unwrap();
}

/// Files of the property test: small, so that groups often start a new file.
const PROP_FILE_BYTES: u64 = 64 << 10;

/// A group's bytes as the persister writes them: header, one entry, zero padding.
fn group_image(sequence: u64, lsn: u64, payload_bytes: usize) -> Vec<u8> {
    let mut append = append_of(lsn);
    append.records[0].op = RedoOp::Write {
        offset: 0,
        bytes: vec![(lsn % 251) as u8; payload_bytes],
    };
    let mut body = Vec::new();
    append.encode(&mut body);
    let mut buf = node::io::AlignedBuf::new(PROP_FILE_BYTES as usize);
    buf.extend_from_slice(&[0; GROUP_HEADER_BYTES]);
    push_entry(&mut buf, &body);
    let payload_len = buf.len() - GROUP_HEADER_BYTES;
    buf.pad_to_alignment();
    let (header, payload) = buf.as_mut_full().split_at_mut(GROUP_HEADER_BYTES);
    encode_header(sequence, 1, &payload[..payload_len], header);
    buf.as_slice().to_vec()
}

/// Lays groups out as the persister allocates them (a group that does not fit starts the
/// next file), writes the files plus one spare, and returns each group's position, the bytes
/// its CRC covers and where it ends.
fn lay_out(dir: &Path, payload_sizes: &[usize]) -> Vec<(Position, u64, Position)> {
    let mut files = vec![vec![0u8; PROP_FILE_BYTES as usize]];
    let mut at = Position::default();
    let mut out = Vec::new();
    for (index, &payload_bytes) in payload_sizes.iter().enumerate() {
        let sequence = index as u64 + 1;
        let image = group_image(sequence, sequence, payload_bytes);
        if at.offset + image.len() as u64 > PROP_FILE_BYTES {
            files.push(vec![0u8; PROP_FILE_BYTES as usize]);
            at = Position {
                file: at.file + 1,
                offset: 0,
            };
        }
        let start = at.offset as usize;
        files[at.file as usize][start..start + image.len()].copy_from_slice(&image);
        let payload_len = u32::from_le_bytes(image[16..20].try_into().unwrap());
        let checked = GROUP_HEADER_BYTES as u64 + u64::from(payload_len);
        let end = Position {
            file: at.file,
            offset: at.offset + image.len() as u64,
        };
        out.push((at, checked, end));
        at = end;
    }
    files.push(vec![0u8; PROP_FILE_BYTES as usize]);
    std::fs::create_dir_all(dir).unwrap();
    for (index, bytes) in files.iter().enumerate() {
        std::fs::write(file_path(dir, index as u32), bytes).unwrap();
    }
    out
}

/// Where the group before `index` ends: where a scan stands when group `index` does not check.
fn good_end(layout: &[(Position, u64, Position)], index: usize) -> Position {
    index
        .checked_sub(1)
        .map_or(Position::default(), |before| layout[before].2)
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(128))]

    /// Goal: whatever the group sizes and wherever one byte is damaged, every group whose
    /// checked bytes (header and payload) do not contain it survives, and the damaged one is
    /// either a one-group corrupt range (in the middle) or the torn tail (last).
    /// Method: random payload sizes (groups of one to several blocks, often starting a new
    /// file), one random byte of the written region xor a random mask; scan; compare with the
    /// layout; erase and scan again.
    #[test]
    fn every_group_not_overlapping_the_damage_survives(
        payload_sizes in proptest::collection::vec(1usize..20_000, 2..30),
        damage in any::<prop::sample::Index>(),
        mask in 1u8..=255,
    ) {
        let dir = test_dir("prop");
        let layout = lay_out(&dir, &payload_sizes);
        let (last_position, last_checked, _) = *layout.last().unwrap();
        let written = u64::from(last_position.file) * PROP_FILE_BYTES + last_position.offset
            + last_checked;
        let linear = damage.index(written as usize) as u64;
        let at = Position {
            file: (linear / PROP_FILE_BYTES) as u32,
            offset: linear % PROP_FILE_BYTES,
        };
        flip(&dir, at, 0, mask);
        let hit = layout.iter().position(|(p, checked, _)| {
            p.file == at.file && p.offset <= at.offset && at.offset < p.offset + checked
        });

        let recovered = recover(&dir);
        let count = layout.len() as u64;
        let expected: Vec<u64> = (1..=count).filter(|s| Some(*s as usize - 1) != hit).collect();
        prop_assert_eq!(&recovered.lsns, &expected);
        prop_assert_eq!(recovered.erased, 0);
        let ranges: Vec<_> = recovered.scan.corrupt.iter().map(range_of).collect();
        match hit {
            Some(index) if index + 1 < layout.len() => {
                // The range starts where the last good group ends (in the file before, if
                // the damaged group starts a file) and ends where the next good one starts.
                let start = good_end(&layout, index);
                let next = layout[index + 1].0;
                let end = if next.offset == 0 && next.file == start.file + 1 {
                    Position { file: start.file, offset: PROP_FILE_BYTES }
                } else {
                    next
                };
                let sequence = index as u64 + 1;
                prop_assert_eq!(ranges, vec![(start, end, sequence - 1, sequence + 1)]);
            }
            Some(index) => {
                prop_assert!(ranges.is_empty());
                prop_assert_eq!(recovered.scan.end, good_end(&layout, index));
                prop_assert_eq!(recovered.scan.next_sequence, count);
            }
            None => {
                prop_assert!(ranges.is_empty());
                prop_assert_eq!(recovered.scan.next_sequence, count + 1);
            }
        }
        prop_assert_eq!(recover(&dir).scan.corrupt, recovered.scan.corrupt);
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
