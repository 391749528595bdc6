//! The node's journal: fixed-size files, pre-written once when created, filled with block
//! groups in sequence order. Shared by every segment the node hosts.
//!
//! Invariants:
//! - files are named `journal-NNNNNN.sfj` and used in index order; a group never spans files
//!   (a group that does not fit the rest of a file starts the next file);
//! - the durable end is the first position whose group is invalid or out of sequence; groups
//!   after it were never acknowledged (acks are released in journal order);
//! - after recovery, every plausible group header within [`TAIL_WINDOW_BYTES`] after the end is
//!   zeroed and synced before new writes, so a stale group from before a crash can never be
//!   read as the successor of a new one.

pub mod format;

use std::fs::File;
use std::io;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};

use wire::frame::Append;

use crate::io::raw::{open_direct, prewrite};
use crate::io::{AlignedBuf, DIRECT_IO_ALIGN};
use format::{GROUP_BYTES_MAX, GROUP_HEADER_BYTES, GroupHeader};

/// Most block groups the persister keeps in flight; bounds the tail a crash can leave.
pub const INFLIGHT_GROUPS_MAX: usize = 8;
/// Span after the durable end in which stale groups may lie after a crash.
pub const TAIL_WINDOW_BYTES: u64 = ((INFLIGHT_GROUPS_MAX + 1) * GROUP_BYTES_MAX) as u64;

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

/// What a scan found.
#[derive(Debug)]
pub struct Scan {
    pub groups: Vec<ScannedGroup>,
    /// Where the next group goes.
    pub end: Position,
    /// Sequence number of the next group.
    pub next_sequence: u64,
    /// Why the scan stopped where it did, for logs and `sixfold inspect`.
    pub stop_reason: String,
}

/// The journal files of one node.
pub struct JournalFiles {
    pub dir: PathBuf,
    pub files: Vec<File>,
    pub file_bytes: u64,
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

    /// Reads every durable group in order and finds the durable end.
    /// Keeps every group in memory: for tools and tests; recovery uses [`Self::scan_with`].
    pub fn scan(&self) -> io::Result<Scan> {
        let mut groups = Vec::new();
        let mut scan = self.scan_with(|group| groups.push(group))?;
        scan.groups = groups;
        Ok(scan)
    }

    /// Hands each durable group to `visit` in journal order, holding one group at a time, and
    /// returns where the journal ends (`groups` is left empty).
    pub fn scan_with(&self, mut visit: impl FnMut(ScannedGroup)) -> io::Result<Scan> {
        let mut scanner = Scanner::new(self);
        let stop_reason = loop {
            match scanner.next_group()? {
                Ok(group) => visit(group),
                Err(reason) => break reason,
            }
        };
        Ok(Scan {
            groups: Vec::new(),
            end: scanner.position,
            next_sequence: scanner.next_sequence,
            stop_reason,
        })
    }

    /// Zeroes every plausible group header within [`TAIL_WINDOW_BYTES`] after `end` and syncs.
    pub fn erase_stale_tail(&self, end: Position) -> io::Result<u32> {
        const CHUNK_BYTES: u64 = 1 << 20;
        let align = DIRECT_IO_ALIGN as u64;
        let mut chunk = AlignedBuf::new(CHUNK_BYTES as usize);
        let mut zeros = AlignedBuf::new(DIRECT_IO_ALIGN);
        zeros.set_len(DIRECT_IO_ALIGN);
        let mut erased = 0;
        let mut pos = end;
        let mut remaining = TAIL_WINDOW_BYTES;
        while remaining > 0 && (pos.file as usize) < self.files.len() {
            let len = CHUNK_BYTES
                .min(remaining)
                .min(self.file_bytes.saturating_sub(pos.offset));
            let len = len / align * align;
            if len == 0 {
                pos = Position {
                    file: pos.file + 1,
                    offset: 0,
                };
                continue;
            }
            let file = &self.files[pos.file as usize];
            chunk.set_len(len as usize);
            file.read_exact_at(&mut chunk.as_mut_full()[..len as usize], pos.offset)?;
            for (index, block) in chunk.as_slice().chunks_exact(DIRECT_IO_ALIGN).enumerate() {
                if GroupHeader::decode(block).is_some() {
                    file.write_all_at(zeros.as_slice(), pos.offset + index as u64 * align)?;
                    erased += 1;
                }
            }
            pos.offset += len;
            remaining -= len;
        }
        if erased > 0 {
            for file in &self.files {
                file.sync_data()?;
            }
        }
        Ok(erased)
    }
}

/// Walks the journal group by group.
struct Scanner<'a> {
    journal: &'a JournalFiles,
    position: Position,
    next_sequence: u64,
    started: bool,
    buf: AlignedBuf,
}

impl<'a> Scanner<'a> {
    fn new(journal: &'a JournalFiles) -> Self {
        Self {
            journal,
            position: Position::default(),
            next_sequence: 1,
            started: false,
            buf: AlignedBuf::new(GROUP_BYTES_MAX),
        }
    }

    /// The next durable group, or `Err(reason)` at the durable end.
    fn next_group(&mut self) -> io::Result<Result<ScannedGroup, String>> {
        match self.read_at(self.position)? {
            Ok(group) => Ok(Ok(group)),
            Err(reason) => {
                // The writer starts the next file when a group does not fit: look there.
                let next = Position {
                    file: self.position.file + 1,
                    offset: 0,
                };
                if self.position.offset == 0 || next.file as usize >= self.journal.files.len() {
                    return Ok(Err(reason));
                }
                match self.read_at(next)? {
                    Ok(group) => Ok(Ok(group)),
                    Err(_) => Ok(Err(reason)),
                }
            }
        }
    }

    fn read_at(&mut self, at: Position) -> io::Result<Result<ScannedGroup, String>> {
        let Some(file) = self.journal.files.get(at.file as usize) else {
            return Ok(Err("end of the last journal file".into()));
        };
        let file_bytes = self.journal.file_bytes;
        if at.offset + DIRECT_IO_ALIGN as u64 > file_bytes {
            return Ok(Err(format!("end of journal file {}", at.file)));
        }
        self.buf.set_len(DIRECT_IO_ALIGN);
        file.read_exact_at(&mut self.buf.as_mut_full()[..DIRECT_IO_ALIGN], at.offset)?;
        let Some(header) = GroupHeader::decode(self.buf.as_slice()) else {
            return Ok(Err(format!(
                "no group header at file {} offset {}",
                at.file, at.offset
            )));
        };
        if self.started && header.sequence != self.next_sequence {
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
            file.read_exact_at(rest, at.offset + DIRECT_IO_ALIGN as u64)?;
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
