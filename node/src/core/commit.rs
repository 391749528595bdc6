//! Group commit: appends wait in a queue; when outputs are polled and fewer than
//! `inflight_groups_max` groups are being persisted, everything queued (up to a group's size)
//! becomes the next journal block group, placed at the journal's end. Groups may become
//! durable in any order; their batches are indexed and answered strictly in journal order.
//!
//! Invariants:
//! - groups are numbered and placed in journal order: consecutive sequence numbers, each group
//!   after the previous one in the same file, or at the start of the next file;
//! - at most `inflight_groups_max` groups are in flight, and a group never passes
//!   [`GROUP_BYTES_MAX`] (header and padding included);
//! - a batch is indexed and answered only when its group and every group before it are
//!   durable, and exactly once.

use std::collections::VecDeque;
use std::time::Instant;

use bytes::Bytes;
use wire::{Epoch, ErrorCode, Lsn};

use super::durability::Answer;
use super::{ConnId, CoreConfig, EntryLocation, GroupId, NodeCore, NodeOutput, RecordInBody};
use crate::io::{DIRECT_IO_ALIGN, aligned::align_up};
use crate::journal::Position;
use crate::journal::format::{GROUP_BYTES_MAX, GROUP_HEADER_BYTES, entry_bytes};
use crate::manifest::SegmentKey;

/// Bytes of entries (length prefixes and bodies) one group may carry.
pub const GROUP_ENTRY_BYTES_MAX: usize = GROUP_BYTES_MAX - DIRECT_IO_ALIGN - GROUP_HEADER_BYTES;
const _: () = assert!(GROUP_ENTRY_BYTES_MAX >= entry_bytes(wire::FRAME_BYTES_MAX));

/// A journal block group to write: `entries` (Append bodies, in order) behind a header with
/// `sequence`, zero-padded to `bytes`, at `position` (see `journal::format` for the layout).
#[derive(Clone, Debug)]
pub struct PersistGroup {
    pub id: GroupId,
    pub sequence: u64,
    pub position: Position,
    pub entries: Vec<Bytes>,
    /// Bytes on disk: header, entries and padding to the next 4 KiB boundary.
    pub bytes: usize,
}

/// An append accepted and waiting for its group.
#[derive(Debug)]
pub(super) struct Batch {
    pub(super) conn: ConnId,
    pub(super) request_id: u64,
    pub(super) key: SegmentKey,
    pub(super) epoch: Epoch,
    pub(super) vdl: Lsn,
    pub(super) records: Vec<RecordInBody>,
    pub(super) received: Instant,
    /// Records gossip fetched from a peer: indexed when durable, never answered.
    pub(super) gossip: bool,
}

/// A group being persisted: its batches, each with where its body lies.
#[derive(Debug)]
struct Inflight {
    id: GroupId,
    durable: bool,
    batches: Vec<(Batch, EntryLocation)>,
}

pub(super) struct Commit {
    inflight_groups_max: usize,
    file_bytes: u64,
    file_count: u32,
    position: Position,
    next_sequence: u64,
    next_group: u64,
    queue: VecDeque<(Batch, Bytes)>,
    inflight: VecDeque<Inflight>,
    journal_full_reported: bool,
    /// The oldest live journal file (as a durable manifest holds it): the writer never enters
    /// it again until garbage collection moves the start past it.
    start_file: u32,
}

impl Commit {
    pub(super) fn new(config: &CoreConfig) -> Self {
        assert!(
            config
                .journal_file_bytes
                .is_multiple_of(DIRECT_IO_ALIGN as u64)
        );
        assert!(config.journal_file_bytes >= GROUP_BYTES_MAX as u64);
        Self {
            inflight_groups_max: config.inflight_groups_max,
            file_bytes: config.journal_file_bytes,
            file_count: config.journal_file_count,
            position: Position::default(),
            next_sequence: 1,
            next_group: 1,
            queue: VecDeque::new(),
            inflight: VecDeque::new(),
            journal_full_reported: false,
            start_file: 0,
        }
    }

    /// The file the writer is in.
    pub(super) fn head_file(&self) -> u32 {
        assert!(self.position.file < self.file_count);
        self.position.file
    }

    /// The oldest live file, which the writer may not enter.
    pub(super) fn start_file(&self) -> u32 {
        assert!(self.start_file < self.file_count);
        self.start_file
    }

    /// A durable manifest moved the journal start to `file`.
    pub(super) fn set_start_file(&mut self, file: u32) {
        assert!(file < self.file_count);
        self.start_file = file;
        self.journal_full_reported = false;
    }

    pub(super) fn start_at(&mut self, end: Position, next_sequence: u64, start_file: u32) {
        assert!(end.offset.is_multiple_of(DIRECT_IO_ALIGN as u64));
        assert!(end.file < self.file_count);
        assert!(start_file < self.file_count);
        self.position = end;
        self.next_sequence = next_sequence;
        self.start_file = start_file;
    }

    pub(super) fn enqueue(&mut self, batch: Batch, body: Bytes) {
        assert!(!batch.records.is_empty(), "an append carries records");
        assert!(entry_bytes(body.len()) <= GROUP_ENTRY_BYTES_MAX);
        self.queue.push_back((batch, body));
    }

    pub(super) fn drain_waiting(&mut self) -> impl Iterator<Item = (ConnId, u64)> + use<> {
        let queued = std::mem::take(&mut self.queue);
        let inflight = std::mem::take(&mut self.inflight);
        assert!(self.queue.is_empty());
        assert!(self.inflight.is_empty());
        let queued = queued
            .into_iter()
            .filter(|(b, _)| !b.gossip)
            .map(|(b, _)| (b.conn, b.request_id));
        let inflight = inflight
            .into_iter()
            .flat_map(|g| g.batches)
            .filter(|(b, _)| !b.gossip)
            .map(|(b, _)| (b.conn, b.request_id));
        queued.chain(inflight)
    }

    pub(super) fn is_idle(&self) -> bool {
        assert!(self.inflight.len() <= self.inflight_groups_max);
        assert!(self.inflight.iter().all(|g| !g.batches.is_empty()));
        self.queue.is_empty() && self.inflight.is_empty()
    }

    pub(super) fn oldest_received(&self) -> Option<Instant> {
        let queued = self.queue.iter().map(|(b, _)| b.received);
        let inflight = self
            .inflight
            .iter()
            .flat_map(|g| g.batches.iter().map(|(b, _)| b.received));
        let oldest = queued.chain(inflight).min();
        assert!(self.inflight.len() <= self.inflight_groups_max);
        assert!(oldest.is_some() || (self.queue.is_empty() && self.inflight.is_empty()));
        oldest
    }

    /// Where the next group of `len` bytes goes, moving to the next file of the ring if it
    /// does not fit the rest of this one; `None` when the journal is full (the next file is
    /// the start: still live).
    fn allocate(&mut self, len: u64) -> Option<Position> {
        assert!(len.is_multiple_of(DIRECT_IO_ALIGN as u64));
        assert!(len <= self.file_bytes, "a group fits a journal file");
        if self.position.offset + len > self.file_bytes {
            let next = (self.position.file + 1) % self.file_count;
            if next == self.start_file {
                return None;
            }
            self.position = Position {
                file: next,
                offset: 0,
            };
        }
        let at = self.position;
        self.position.offset += len;
        Some(at)
    }

    /// Takes queued batches up to a group's size: the batches, their bodies, each body's
    /// offset from the group's start, and the group's size on disk.
    fn take_group(&mut self) -> (Vec<Batch>, Vec<Bytes>, Vec<u64>, usize) {
        let mut batches = Vec::new();
        let mut bodies = Vec::new();
        let mut offsets = Vec::new();
        let mut payload = 0usize;
        while let Some((_, body)) = self.queue.front() {
            let need = entry_bytes(body.len());
            if !batches.is_empty() && payload + need > GROUP_ENTRY_BYTES_MAX {
                break;
            }
            let (batch, body) = self.queue.pop_front().expect("front checked above");
            offsets.push((GROUP_HEADER_BYTES + payload + 4) as u64);
            payload += need;
            batches.push(batch);
            bodies.push(body);
        }
        let bytes = align_up(GROUP_HEADER_BYTES + payload);
        assert!(!batches.is_empty(), "called with a non-empty queue");
        assert!(bytes <= GROUP_BYTES_MAX);
        (batches, bodies, offsets, bytes)
    }

    /// Counters for [`super::NodeStats`]. The journal is used from its start to the next
    /// group's position (files are filled in order and never reused yet).
    pub(super) fn counters(&self) -> super::stats::CommitCounters {
        let capacity = self.file_bytes * u64::from(self.file_count);
        // Live files: from the start file (oldest live) around the ring to the head.
        let laps = (self.position.file + self.file_count - self.start_file) % self.file_count;
        let used = u64::from(laps) * self.file_bytes + self.position.offset;
        assert!(used <= capacity);
        assert!(self.next_group >= 1);
        super::stats::CommitCounters {
            groups_formed: self.next_group - 1,
            appends_queued: self.queue.len() as u64,
            groups_inflight: self.inflight.len() as u64,
            journal_bytes_used: used,
            journal_bytes_capacity: capacity,
        }
    }
}

impl NodeCore {
    /// Forms groups from the queue while slots are free.
    pub(super) fn form_groups(&mut self) {
        let max = self.commit.inflight_groups_max;
        while self.commit.inflight.len() < max && !self.commit.queue.is_empty() {
            self.form_group();
        }
        assert!(self.commit.inflight.len() <= max);
        assert!(self.commit.queue.is_empty() || self.commit.inflight.len() == max);
    }

    fn form_group(&mut self) {
        let (batches, entries, offsets, bytes) = self.commit.take_group();
        let Some(position) = self.commit.allocate(bytes as u64) else {
            return self.refuse_journal_full(batches);
        };
        if position.offset == 0 {
            self.background
                .note_file_start(position.file, self.commit.next_sequence);
        }
        let c = &mut self.commit;
        let id = GroupId(c.next_group);
        c.next_group += 1;
        let sequence = c.next_sequence;
        c.next_sequence += 1;
        let batches = batches
            .into_iter()
            .zip(offsets)
            .map(|(batch, offset)| {
                let at = EntryLocation {
                    file: position.file,
                    body_offset: position.offset + offset,
                };
                (batch, at)
            })
            .collect();
        c.inflight.push_back(Inflight {
            id,
            durable: false,
            batches,
        });
        let group = PersistGroup {
            id,
            sequence,
            position,
            entries,
            bytes,
        };
        assert!(position.offset + bytes as u64 <= self.commit.file_bytes);
        assert!(self.commit.inflight.len() <= self.commit.inflight_groups_max);
        self.outputs.push_back(NodeOutput::Persist(group));
    }

    fn refuse_journal_full(&mut self, batches: Vec<Batch>) {
        assert!(!batches.is_empty());
        if !self.commit.journal_full_reported {
            self.commit.journal_full_reported = true;
            tracing::error!(
                "journal is full ({} files of {} bytes, oldest live file {}): refusing appends \
                 until garbage collection frees a file (coalescing waits for PGMRPL and SCL)",
                self.commit.file_count,
                self.commit.file_bytes,
                self.commit.start_file
            );
        }
        for batch in batches {
            if batch.gossip {
                self.gossip_batch_refused(batch.key); // Fetched again later.
                continue;
            }
            self.note_refused(&batch);
            let text = "journal is full: no journal file has room for this batch".to_string();
            self.reply_error(batch.conn, batch.request_id, ErrorCode::JournalFull, text);
        }
        assert!(self.commit.journal_full_reported);
    }

    /// A group is on stable storage as of `now`; every group durable at the front of the
    /// journal order has its batches indexed and answered.
    pub fn handle_persisted(&mut self, now: Instant, group: GroupId) {
        if self.stopped().is_some() {
            return; // Everyone waiting was answered when the node stopped.
        }
        self.note_now(now);
        let inflight = self
            .commit
            .inflight
            .iter_mut()
            .find(|g| g.id == group)
            .expect("a persisted group is one in flight");
        assert!(!inflight.durable, "each group is persisted once");
        inflight.durable = true;
        let before = self.commit.inflight.len();
        while self.commit.inflight.front().is_some_and(|g| g.durable) {
            let done = self.commit.inflight.pop_front().expect("front checked");
            for (batch, at) in done.batches {
                self.release(batch, at);
            }
        }
        assert!(self.commit.inflight.len() <= before);
    }

    /// Indexes a durable batch and answers it.
    fn release(&mut self, batch: Batch, at: EntryLocation) {
        let indexed = self.index_entry((batch.key, batch.epoch, batch.vdl), at, &batch.records);
        assert!(indexed <= batch.records.len());
        assert!(
            self.segments.contains_key(&batch.key),
            "segments are never unhosted"
        );
        if batch.gossip {
            return self.gossip_batch_done(batch.key); // Nobody waits for it.
        }
        let answer = Answer::Ack {
            key: batch.key,
            epoch: batch.epoch,
        };
        if batch.epoch < self.epoch(batch.key.volume) {
            // Refused at once: a refusal relies on no durable state.
            return self.answer(batch.conn, batch.request_id, answer);
        }
        self.answer_when_durable(batch.conn, batch.request_id, batch.key.volume, answer);
    }
}
