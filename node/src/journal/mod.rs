//! The node's journal: fixed-size files, pre-written once when created, filled with block
//! groups in sequence order. Shared by every segment the node hosts.
//!
//! The files form a ring: the writer fills them in index order and, once garbage collection has
//! moved the journal's start (kept in the manifest) past a file, wraps around and reuses it in
//! place (it stays pre-written). A scan starts at the start file, expecting the start's
//! sequence there, and goes around the ring up to (not into) the start file again.
//!
//! Invariants:
//! - files are named `journal-NNNNNN.sfj` and used in ring order from the start; a group never
//!   spans files (a group that does not fit the rest of a file starts the next file);
//! - groups are written in sequence order, each right after the previous one, so the groups
//!   between two good groups with sequences `a < b` occupy at least `b - a - 1` 4 KiB blocks
//!   between them;
//! - a scan never drops a group whose header and CRC check and whose sequence is above every
//!   group before it. Where no group checks in sequence, the scan looks ahead (every 4 KiB
//!   block to the end of the journal, each following file from its start) for the first group
//!   that checks and whose sequence is above the last good one, by no more than the blocks in
//!   between could hold. If there is one, the stretch before it is a [`CorruptRange`] in the
//!   middle: reported, skipped, and the strict sequence check resumes from the group found. If
//!   there is none, the bad group is the torn tail: the durable end, from which on nothing was
//!   ever acknowledged (acks are released in journal order). A crash that tears one group while
//!   later ones in flight land whole looks like the first case: those later groups were never
//!   acknowledged, and keeping them is harmless;
//! - recovery zeroes only stale headers (sequence below the next one: older than the durable
//!   end) within [`TAIL_WINDOW_BYTES`] after the end, never a header with a higher sequence.
//!   No stale group can pass a scan anyway (the strict check wants the next sequence, the
//!   look-ahead a higher one); the erase keeps them out of the space new groups will fill.

pub mod format;

use std::fmt;
use std::fs::File;
use std::io;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};

use wire::frame::Append;

use crate::io::raw::{open_direct, prewrite};
use crate::io::{AlignedBuf, DIRECT_IO_ALIGN};
use crate::manifest::JournalStart;
use format::{GROUP_BYTES_MAX, GROUP_HEADER_BYTES, GROUP_MAGIC, GroupHeader};

/// Most block groups the persister keeps in flight; bounds the tail a crash can leave.
pub const INFLIGHT_GROUPS_MAX: usize = 8;
/// Span after the durable end in which stale groups may lie after a crash.
pub const TAIL_WINDOW_BYTES: u64 = ((INFLIGHT_GROUPS_MAX + 1) * GROUP_BYTES_MAX) as u64;
/// Bytes read at a time when erasing the tail or looking ahead past a group that does not
/// check: each 4 KiB block of a chunk is first tested for the magic alone, so a look-ahead over
/// the default journal's pre-written zeroes (8 × 256 MiB) costs one sequential read of it.
pub const CHUNK_BYTES: usize = 1 << 20;
/// Corrupt ranges a scan lists; further ones are only counted, so that a failing disk cannot
/// make recovery's memory grow with the journal.
pub const CORRUPT_RANGES_MAX: usize = 1024;

const _: () = assert!(CHUNK_BYTES.is_multiple_of(DIRECT_IO_ALIGN));
const _: () = assert!(TAIL_WINDOW_BYTES.is_multiple_of(DIRECT_IO_ALIGN as u64));

/// Where a block group starts.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, PartialOrd, Ord)]
pub struct Position {
    pub file: u32,
    pub offset: u64,
}

/// One entry of a durable group: an Append body and where it lies in its journal file.
#[derive(Debug)]
pub struct ScannedEntry {
    pub body_offset: u64,
    pub append: Append,
}

/// One durable group found by a scan.
#[derive(Debug)]
pub struct ScannedGroup {
    pub sequence: u64,
    pub position: Position,
    pub entries: Vec<ScannedEntry>,
}

/// A stretch in the middle of the journal where no group checks although good groups with
/// higher sequence numbers follow it: a bit flip or a bad sector (or a crash that tore one
/// group while later ones in flight landed whole). The groups it held, sequences
/// `sequence_before + 1 .. sequence_after`, are lost on this node; their segments have a gap
/// in their backlink chains until the missing records are sent again (by peer gossip, once it
/// exists).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct CorruptRange {
    /// Where the group after `sequence_before` should have started.
    pub start: Position,
    /// Where the group `sequence_after` starts; the end of `start`'s file when that group
    /// starts the next file. Exclusive.
    pub end: Position,
    /// The last good sequence before the range (0: the range starts the journal).
    pub sequence_before: u64,
    /// The first good sequence after the range.
    pub sequence_after: u64,
    /// Why the group at `start` did not check.
    pub reason: String,
}

impl CorruptRange {
    /// The sequence numbers of the groups lost in the range.
    pub fn missing_sequences(&self) -> std::ops::Range<u64> {
        self.sequence_before + 1..self.sequence_after
    }
}

impl fmt::Display for CorruptRange {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let (start, end) = (self.start, self.end);
        if start.file == end.file {
            write!(
                f,
                "file {} bytes [{}, {})",
                start.file, start.offset, end.offset
            )?;
        } else {
            write!(
                f,
                "file {} byte {} to file {} byte {} (exclusive)",
                start.file, start.offset, end.file, end.offset
            )?;
        }
        match self.missing_sequences() {
            missing if missing.is_empty() => write!(f, ", no group missing")?,
            missing if missing.end - missing.start == 1 => {
                write!(f, ", group {} missing", missing.start)?;
            }
            missing => write!(
                f,
                ", groups {} to {} missing",
                missing.start,
                missing.end - 1
            )?,
        }
        write!(
            f,
            " (last good {}, next good {})",
            self.sequence_before, self.sequence_after
        )
    }
}

/// What a scan found.
#[derive(Debug)]
pub struct Scan {
    pub groups: Vec<ScannedGroup>,
    /// Where the next group goes: just after the last good group.
    pub end: Position,
    /// Sequence number of the next group.
    pub next_sequence: u64,
    /// Why the scan stopped where it did (the torn tail), for logs and `sixfold inspect`.
    pub stop_reason: String,
    /// Corrupt ranges in the middle, in journal order (at most [`CORRUPT_RANGES_MAX`]).
    pub corrupt: Vec<CorruptRange>,
    /// Corrupt ranges found beyond [`CORRUPT_RANGES_MAX`], counted only.
    pub corrupt_omitted: u64,
}

/// The journal files of one node.
pub struct JournalFiles {
    pub dir: PathBuf,
    pub files: Vec<File>,
    pub file_bytes: u64,
}

/// What the scan and the tail erase need of the journal's storage: the real files, or a
/// simulator's disk images (so the simulator's crashes, torn writes and bit flips go through
/// the same recovery code).
pub trait JournalStorage {
    fn file_count(&self) -> usize;
    fn file_bytes(&self) -> u64;
    fn read_exact_at(&self, file: u32, buf: &mut [u8], offset: u64) -> io::Result<()>;
    fn write_all_at(&self, file: u32, buf: &[u8], offset: u64) -> io::Result<()>;
    /// Makes every write so far durable.
    fn sync(&self) -> io::Result<()>;
}

impl JournalStorage for JournalFiles {
    fn file_count(&self) -> usize {
        self.files.len()
    }

    fn file_bytes(&self) -> u64 {
        self.file_bytes
    }

    fn read_exact_at(&self, file: u32, buf: &mut [u8], offset: u64) -> io::Result<()> {
        self.files[file as usize].read_exact_at(buf, offset)
    }

    fn write_all_at(&self, file: u32, buf: &[u8], offset: u64) -> io::Result<()> {
        self.files[file as usize].write_all_at(buf, offset)
    }

    fn sync(&self) -> io::Result<()> {
        for file in &self.files {
            file.sync_data()?;
        }
        Ok(())
    }
}

pub fn file_path(dir: &Path, index: u32) -> PathBuf {
    dir.join(format!("journal-{index:06}.sfj"))
}

impl JournalFiles {
    /// Opens the journal under `dir`, creating and pre-writing `file_count` files of
    /// `file_bytes` if there are none yet.
    pub fn open_or_create(dir: &Path, file_bytes: u64, file_count: u32) -> io::Result<Self> {
        assert!(file_bytes.is_multiple_of(DIRECT_IO_ALIGN as u64));
        assert!(file_count > 0);
        std::fs::create_dir_all(dir)?;
        if !file_path(dir, 0).exists() {
            for index in 0..file_count {
                let tmp = dir.join(format!("journal-{index:06}.tmp"));
                let file = open_direct(&tmp, true)?;
                prewrite(&file, file_bytes)?;
                std::fs::rename(&tmp, file_path(dir, index))?;
            }
            File::open(dir)?.sync_all()?;
        }
        Self::open_existing(dir)
    }

    /// Opens an existing journal; file sizes come from the files themselves.
    pub fn open_existing(dir: &Path) -> io::Result<Self> {
        let mut files = Vec::new();
        while file_path(dir, files.len() as u32).exists() {
            files.push(open_direct(&file_path(dir, files.len() as u32), false)?);
        }
        let Some(first) = files.first() else {
            return Err(io::Error::new(
                io::ErrorKind::NotFound,
                format!(
                    "no journal files (journal-000000.sfj) under {}",
                    dir.display()
                ),
            ));
        };
        let file_bytes = first.metadata()?.len();
        for (index, file) in files.iter().enumerate() {
            if file.metadata()?.len() != file_bytes {
                return Err(io::Error::other(format!(
                    "journal file {index} has a different size than file 0 ({file_bytes} bytes)"
                )));
            }
        }
        Ok(Self {
            dir: dir.to_path_buf(),
            files,
            file_bytes,
        })
    }

    /// Reads every durable group from `start` in order and finds the durable end.
    /// Keeps every group in memory: for tools and tests; recovery uses [`Self::scan_with`].
    pub fn scan(&self, start: JournalStart) -> io::Result<Scan> {
        let mut groups = Vec::new();
        let mut scan = self.scan_with(start, |group| groups.push(group))?;
        scan.groups = groups;
        Ok(scan)
    }

    /// Hands each durable group to `visit` in journal order (see [`scan_with`]).
    pub fn scan_with(
        &self,
        start: JournalStart,
        visit: impl FnMut(ScannedGroup),
    ) -> io::Result<Scan> {
        scan_with(self, start, visit)
    }

    /// Zeroes stale group headers after the durable end (see [`erase_stale_tail`]).
    pub fn erase_stale_tail(
        &self,
        start: JournalStart,
        end: Position,
        next_sequence: u64,
    ) -> io::Result<u32> {
        erase_stale_tail(self, start, end, next_sequence)
    }
}

/// Hands each durable group from `start` to `visit` in journal order, holding one group at a
/// time, and returns where the journal ends and which corrupt ranges it skipped (`groups` is
/// left empty).
pub fn scan_with(
    storage: &dyn JournalStorage,
    start: JournalStart,
    mut visit: impl FnMut(ScannedGroup),
) -> io::Result<Scan> {
    let start = if (start.file as usize) < storage.file_count() {
        start
    } else {
        JournalStart::default()
    };
    let mut scanner = Scanner::new(storage, start);
    let mut corrupt = Vec::new();
    let mut corrupt_omitted = 0;
    let stop_reason = loop {
        let reason = match scanner.next_group()? {
            Ok(group) => {
                visit(group);
                continue;
            }
            Err(reason) => reason,
        };
        let start = scanner.position;
        let sequence_before = scanner.next_sequence - 1;
        let Some(group) = scanner.look_ahead()? else {
            break reason; // Nothing valid after it: the torn tail.
        };
        assert!(group.sequence > sequence_before);
        assert!(scanner.linear(group.position) >= scanner.linear(start));
        let range = CorruptRange {
            start,
            end: range_end(storage, start, group.position),
            sequence_before,
            sequence_after: group.sequence,
            reason,
        };
        if corrupt.len() < CORRUPT_RANGES_MAX {
            corrupt.push(range);
        } else {
            corrupt_omitted += 1;
        }
        visit(group);
    };
    Ok(Scan {
        groups: Vec::new(),
        end: scanner.position,
        next_sequence: scanner.next_sequence,
        stop_reason,
        corrupt,
        corrupt_omitted,
    })
}

/// The exclusive end of a corrupt range that starts at `start` and is followed by a good
/// group at `next`: the end of `start`'s file if `next` starts the following one.
fn range_end(storage: &dyn JournalStorage, start: Position, next: Position) -> Position {
    let following = (start.file + 1) % storage.file_count() as u32;
    if next.offset == 0 && next.file == following && next.file != start.file {
        Position {
            file: start.file,
            offset: storage.file_bytes(),
        }
    } else {
        next
    }
}

/// Zeroes every stale group header within [`TAIL_WINDOW_BYTES`] after `end` and syncs, up to
/// (not into) the journal's start file, whose groups are live.
/// Stale means a sequence below `next_sequence`: older than the durable end. A header with
/// a higher sequence is never touched: a scan has found no group after `end` whose CRC
/// checks, so it belongs to a torn group, which can never pass a scan and is overwritten
/// in place as the journal grows.
pub fn erase_stale_tail(
    storage: &dyn JournalStorage,
    start: JournalStart,
    end: Position,
    next_sequence: u64,
) -> io::Result<u32> {
    let count = storage.file_count() as u32;
    let align = DIRECT_IO_ALIGN as u64;
    let mut chunk = AlignedBuf::new(CHUNK_BYTES);
    let mut zeros = AlignedBuf::new(DIRECT_IO_ALIGN);
    zeros.set_len(DIRECT_IO_ALIGN);
    let mut erased = 0;
    let mut pos = end;
    let mut remaining = TAIL_WINDOW_BYTES;
    while remaining > 0 && pos.file < count {
        let len = (CHUNK_BYTES as u64)
            .min(remaining)
            .min(storage.file_bytes().saturating_sub(pos.offset));
        let len = len / align * align;
        if len == 0 {
            let next = (pos.file + 1) % count;
            if next == start.file || next == end.file {
                break; // The start file is live; and never go round twice.
            }
            pos = Position {
                file: next,
                offset: 0,
            };
            continue;
        }
        chunk.set_len(len as usize);
        storage.read_exact_at(
            pos.file,
            &mut chunk.as_mut_full()[..len as usize],
            pos.offset,
        )?;
        for (index, block) in chunk.as_slice().chunks_exact(DIRECT_IO_ALIGN).enumerate() {
            let stale = GroupHeader::decode(block).is_some_and(|h| h.sequence < next_sequence);
            if stale {
                storage.write_all_at(
                    pos.file,
                    zeros.as_slice(),
                    pos.offset + index as u64 * align,
                )?;
                erased += 1;
            }
        }
        pos.offset += len;
        remaining -= len;
    }
    if erased > 0 {
        storage.sync()?;
    }
    Ok(erased)
}

/// Walks the journal group by group.
struct Scanner<'a> {
    journal: &'a dyn JournalStorage,
    /// Where the scan began: the ring is walked from here, never into this file again.
    start: JournalStart,
    /// Where the next group should start: just after the last good group.
    position: Position,
    next_sequence: u64,
    started: bool,
    /// One group at a time.
    buf: AlignedBuf,
    /// One look-ahead chunk at a time.
    chunk: AlignedBuf,
}

impl<'a> Scanner<'a> {
    fn new(journal: &'a dyn JournalStorage, start: JournalStart) -> Self {
        assert!(start.sequence >= 1);
        assert!((start.file as usize) < journal.file_count());
        Self {
            journal,
            start,
            position: Position {
                file: start.file,
                offset: 0,
            },
            next_sequence: start.sequence,
            started: start.sequence > 1,
            buf: AlignedBuf::new(GROUP_BYTES_MAX),
            chunk: AlignedBuf::new(CHUNK_BYTES),
        }
    }

    /// The next group in sequence, or `Err(reason)` if none checks where it should be.
    fn next_group(&mut self) -> io::Result<Result<ScannedGroup, String>> {
        match self.read_at(self.position, true)? {
            Ok(group) => Ok(Ok(group)),
            Err(reason) => {
                // The writer starts the next file when a group does not fit: look there.
                let Some(file) = self.following(self.position.file) else {
                    return Ok(Err(reason));
                };
                let next = Position { file, offset: 0 };
                if self.position.offset == 0 {
                    return Ok(Err(reason));
                }
                match self.read_at(next, true)? {
                    Ok(group) => Ok(Ok(group)),
                    Err(_) => Ok(Err(reason)),
                }
            }
        }
    }

    /// After no group checked at `self.position`: the first group after it, to the end of the
    /// journal, whose header and CRC check and whose sequence is above the last good one (and
    /// not further above it than the blocks in between could hold). Every 4 KiB block is a
    /// possible start, since a corrupt header's length cannot be trusted, and each following
    /// file is searched from its start. `None` means the bad group is the torn tail.
    fn look_ahead(&mut self) -> io::Result<Option<ScannedGroup>> {
        let align = DIRECT_IO_ALIGN as u64;
        let mut at = self.position;
        loop {
            let file = at.file;
            let room = self.journal.file_bytes().saturating_sub(at.offset);
            let len = room.min(CHUNK_BYTES as u64) / align * align;
            if len == 0 {
                let Some(next) = self.following(at.file) else {
                    break;
                };
                at = Position {
                    file: next,
                    offset: 0,
                };
                continue;
            }
            self.chunk.set_len(len as usize);
            let chunk = &mut self.chunk.as_mut_full()[..len as usize];
            self.journal.read_exact_at(file, chunk, at.offset)?;
            for candidate in self.candidates(at) {
                if let Ok(group) = self.read_at(candidate, false)? {
                    return Ok(Some(group));
                }
            }
            at.offset += len;
        }
        Ok(None)
    }

    /// Blocks of the chunk read at `at` that may start the next good group: the magic first
    /// (cheap), then a plausible header whose sequence fits the gap since `self.position`.
    fn candidates(&self, at: Position) -> Vec<Position> {
        let align = DIRECT_IO_ALIGN as u64;
        let last_good = self.next_sequence - 1;
        let magic = GROUP_MAGIC.to_le_bytes();
        let blocks = self.chunk.as_slice().chunks_exact(DIRECT_IO_ALIGN);
        let found = blocks
            .enumerate()
            .filter(|(_, block)| block.starts_with(&magic));
        found
            .filter_map(|(index, block)| {
                let header = GroupHeader::decode(block)?;
                let position = Position {
                    file: at.file,
                    offset: at.offset + index as u64 * align,
                };
                // Each missing group took at least one block between the last good group and
                // this one; a header claiming more is garbage (or a group inside a payload).
                let missing = header.sequence.checked_sub(last_good + 1)?;
                let blocks_between = (self.linear(position) - self.linear(self.position)) / align;
                (missing <= blocks_between).then_some(position)
            })
            .collect()
    }

    /// The file after `file` in the ring, unless that is the start file (live, older).
    fn following(&self, file: u32) -> Option<u32> {
        let next = (file + 1) % self.journal.file_count() as u32;
        (next != self.start.file).then_some(next)
    }

    /// A position as a byte address in the journal taken as one run of files from the start.
    fn linear(&self, at: Position) -> u64 {
        let count = self.journal.file_count() as u32;
        let laps = (at.file + count - self.start.file) % count;
        u64::from(laps) * self.journal.file_bytes() + at.offset
    }

    /// Reads and checks the group at `at`; `in_sequence` also requires the next sequence.
    /// On success the scan continues after it.
    fn read_at(
        &mut self,
        at: Position,
        in_sequence: bool,
    ) -> io::Result<Result<ScannedGroup, String>> {
        if at.file as usize >= self.journal.file_count() {
            return Ok(Err("end of the last journal file".into()));
        }
        let file = at.file;
        let file_bytes = self.journal.file_bytes();
        if at.offset + DIRECT_IO_ALIGN as u64 > file_bytes {
            return Ok(Err(format!("end of journal file {}", at.file)));
        }
        self.buf.set_len(DIRECT_IO_ALIGN);
        let head = &mut self.buf.as_mut_full()[..DIRECT_IO_ALIGN];
        self.journal.read_exact_at(file, head, at.offset)?;
        let Some(header) = GroupHeader::decode(self.buf.as_slice()) else {
            return Ok(Err(format!(
                "no group header at file {} offset {}",
                at.file, at.offset
            )));
        };
        if in_sequence && self.started && header.sequence != self.next_sequence {
            return Ok(Err(format!(
                "group at file {} offset {} has sequence {}, expected {}",
                at.file, at.offset, header.sequence, self.next_sequence
            )));
        }
        let group_bytes = header.group_bytes();
        if at.offset + group_bytes as u64 > file_bytes {
            return Ok(Err(format!(
                "group at file {} offset {} overruns the file",
                at.file, at.offset
            )));
        }
        if group_bytes > DIRECT_IO_ALIGN {
            let rest = &mut self.buf.as_mut_full()[DIRECT_IO_ALIGN..group_bytes];
            self.journal
                .read_exact_at(file, rest, at.offset + DIRECT_IO_ALIGN as u64)?;
        }
        self.buf.set_len(group_bytes);
        let bytes = self.buf.as_slice();
        let payload = &bytes[GROUP_HEADER_BYTES..GROUP_HEADER_BYTES + header.payload_len as usize];
        if !format::payload_crc_ok(bytes, &header, payload) {
            return Ok(Err(format!(
                "torn or corrupt group {} at file {} offset {} (CRC mismatch)",
                header.sequence, at.file, at.offset
            )));
        }
        let entries = match format::decode_entries(payload, header.entry_count) {
            Ok(entries) => entries
                .into_iter()
                .map(|(offset, append)| ScannedEntry {
                    body_offset: at.offset + offset,
                    append,
                })
                .collect(),
            Err(e) => {
                return Ok(Err(format!(
                    "group {} has a bad entry: {e}",
                    header.sequence
                )));
            }
        };
        self.started = true;
        self.next_sequence = header.sequence + 1;
        self.position = Position {
            file: at.file,
            offset: at.offset + group_bytes as u64,
        };
        Ok(Ok(ScannedGroup {
            sequence: header.sequence,
            position: at,
            entries,
        }))
    }
}
