//! `NodeCore`: the storage node's protocol as a pure state machine. It owns the hosted
//! segments (chains, SCLs, page indexes, PGMRPL), each volume's epoch, geometry, truncation
//! ranges and durable VDL hint, every request waiting on I/O, and the group-commit decisions
//! (which appends go into which journal block group, where in the journal it goes). It does no
//! I/O, reads no clock and starts no thread: a driver feeds it events and carries out what it
//! asks for (`driver.rs` with tokio, quinn and io_uring; a simulator with simulated disks).
//!
//! # Contract
//!
//! Start: [`NodeCore::new`] with the manifest as stored, then [`NodeCore::recover_append`] (or
//! [`NodeCore::recover_entry`]) for every entry of every durable journal group in journal
//! order, then [`NodeCore::finish_recovery`] with where the journal ends.
//!
//! Inputs, each returning at once:
//! - [`NodeCore::handle_frame`]: a request frame (the bytes after its length prefix) from a
//!   stream, with the role of the peer's certificate. Every frame gets exactly one
//!   [`NodeOutput::Reply`] on its `conn`, sooner or later (request id 0 if its header could
//!   not be read); a driver may count on that to bound each stream's requests in flight.
//!   [`NodeCore::handle_request`] takes the request as a [`Message`] instead (it encodes it).
//! - [`NodeCore::handle_persisted`]: a [`PersistGroup`] is on stable storage (with the time).
//!   Groups may be reported in any order; the core releases their effects in journal order.
//! - [`NodeCore::handle_manifest_stored`]: a [`NodeOutput::StoreManifest`] is on stable storage
//!   (stores are asked for one at a time and are reported in order).
//! - [`NodeCore::handle_records_read`]: the records of a [`NodeOutput::ReadRecords`], read back
//!   from the journal and CRC-checked, or why they could not be.
//! - [`NodeCore::handle_fatal_io`]: a journal write or sync, or a manifest store, failed. The
//!   node stops: everything waiting and everything after gets `ShuttingDown` with the reason.
//! - [`NodeCore::begin_shutdown`]: refuse new requests, finish what is waiting.
//! - [`NodeCore::handle_timeout`]: time passed (call it once when serving starts, then
//!   whenever [`NodeCore::poll_timeout`] passes); acks held back by back-pressure leave,
//!   gossip polls peers and plans fetches.
//! - [`NodeCore::handle_peer_reply`]: the reply to a [`NodeOutput::PeerRequest`], or why
//!   none came (see `gossip`).
//!
//! Outputs, drained with [`NodeCore::poll_output`] after each input: replies, journal groups to
//! write ([`NodeOutput::Persist`]), manifests to store, journal records to read, requests to
//! peer nodes ([`NodeOutput::PeerRequest`], gossip), and
//! [`NodeOutput::Stopped`] once. Group commit happens here: when outputs are polled and fewer
//! than `inflight_groups_max` groups are being persisted, everything queued goes into the next
//! group (up to a group's size), so a driver that feeds every input it has before polling gets
//! the biggest groups.
//!
//! # Invariants
//! - an Ack leaves only after its batch is durable, after every batch before it in the journal
//!   is durable, and after the manifest holding its volume's epoch and truncations is durable;
//!   under back-pressure it may leave later still, never more than [`ACK_DELAY_LIMIT`] later
//!   (see `throttle`);
//! - once the volume's epoch has changed (a Fence, Truncate or HostSegments was accepted), no
//!   Ack at the old epoch leaves: batches in flight are persisted and answered `StaleEpoch`;
//! - a node learns a new epoch only from Fence, Truncate or HostSegments: a request at an
//!   epoch newer than the node's is refused with `EpochNotInstalled`, an older one with
//!   `StaleEpoch`;
//! - a record whose LSN lies in a truncated range is never indexed, never counted in an SCL and
//!   never served, whether it was durable before the truncation or arrives after it;
//! - every reply that states durable metadata (VolumeState, Done for HostSegments) leaves only
//!   once the manifest holding that state is durable;
//! - records fetched from peers by gossip go through the same journal queue and are indexed
//!   exactly as appended ones (truncations included), but are never answered to anyone.

mod background;
mod backup;
mod commit;
mod durability;
mod gossip;
mod reads;
mod rebuild;
mod requests;
mod scrub;
mod stats;
mod throttle;

use std::collections::{BTreeMap, VecDeque};
use std::ops::RangeInclusive;
use std::time::{Duration, Instant};

use wire::{
    Append, AppendView, DecodeError, Epoch, ErrorCode, ErrorReply, LogRecord, Lsn, Message, PageId,
    PgId, SegmentIndex, SegmentState, VolumeId, VolumeState,
};

use crate::journal::Position;
use crate::manifest::{Manifest, SegmentKey, VolumeMeta, truncated};
use crate::pagestore::{CoalesceJob, PageRead, ScrubJob};
use crate::segment::{DurableRecord, Observed, RecordLocation, Segment};

pub use background::{
    BackgroundStats, COALESCE_PERCENT, IDLE_AFTER, JobToken, PRESSURE_PERCENT, ROUND_RECORDS_MAX,
    ROUND_RECORDS_MIN,
};
pub use backup::{
    BackupConfig, BackupJob, BackupOutcome, BackupStats, BackupToken, SNAPSHOT_BATCH_BYTES,
};
pub use commit::{GROUP_ENTRY_BYTES_MAX, PersistGroup};
pub use gossip::{
    GAPS_REPORTED_MAX, GOSSIP_FETCH_BYTES_MAX, Gap, GossipConfig, GossipStats, missing_ranges,
};
pub use requests::{
    FETCH_BYTES_MAX, FETCH_PAGES_BYTES_MAX, RESERVE_PERCENT, TRUNCATIONS_PER_VOLUME_MAX,
};
pub use scrub::{ScrubConfig, ScrubStats};
pub use stats::{NodeStats, SegmentStats};
pub use throttle::{ACK_DELAY_LIMIT, BACKLOG_REFRESH, ThrottleConfig, ThrottleStatus};

/// A stream requests arrive on and replies go back to; chosen by the driver.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct ConnId(pub u64);

/// A journal block group the core asked to persist.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct GroupId(pub u64);

/// A manifest store the core asked for: the manifest's version.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct ManifestToken(pub u64);

/// A journal read the core asked for.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct ReadToken(pub u64);

/// Where a journal entry's Append body starts: its file and its offset in that file.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct EntryLocation {
    pub file: u32,
    pub body_offset: u64,
}

/// What the core needs to know of the node's configuration.
#[derive(Clone, Debug)]
pub struct CoreConfig {
    /// The node's name, for error messages.
    pub name: String,
    /// Journal groups being persisted at once (1..=`journal::INFLIGHT_GROUPS_MAX`).
    pub inflight_groups_max: usize,
    /// Bytes of each journal file (a multiple of 4 KiB, at least one full group).
    pub journal_file_bytes: u64,
    pub journal_file_count: u32,
}

/// What the core asks its driver to do.
#[derive(Debug)]
pub enum NodeOutput {
    /// Send `message` as the reply to `request_id` on `conn`.
    Reply {
        conn: ConnId,
        request_id: u64,
        message: Message,
    },
    /// Write this block group at its position and make it durable, then call
    /// [`NodeCore::handle_persisted`] (or [`NodeCore::handle_fatal_io`] if that failed).
    Persist(PersistGroup),
    /// Store this manifest atomically, then call [`NodeCore::handle_manifest_stored`].
    StoreManifest {
        token: ManifestToken,
        manifest: Manifest,
    },
    /// Read these records back from the journal (CRC-checked), then call
    /// [`NodeCore::handle_records_read`] with them in this order.
    ReadRecords {
        token: ReadToken,
        locations: Vec<RecordLocation>,
    },
    /// Read a page ([`crate::pagestore::read_page`]), then call
    /// [`NodeCore::handle_page_read`].
    ReadPage { token: ReadToken, read: PageRead },
    /// Carry out a coalescing round ([`crate::pagestore::run_coalesce`]), then call
    /// [`NodeCore::handle_coalesced`].
    Coalesce { token: JobToken, job: CoalesceJob },
    /// Read pages for a peer's segment rebuild ([`crate::pagestore::read_pages`]), then call
    /// [`NodeCore::handle_pages_read`].
    ReadPages {
        token: ReadToken,
        job: crate::pagestore::PagesRead,
    },
    /// Carry out a scrub job ([`crate::pagestore::run_scrub`]: repairs to write, pages and
    /// records to check), then call [`NodeCore::handle_scrubbed`] with its report.
    Scrub { token: JobToken, job: ScrubJob },
    /// Carry out a backup job (object-store calls, and the journal or page-store reads they
    /// need), then call [`NodeCore::handle_backup_done`].
    Backup { token: BackupToken, job: BackupJob },
    /// Send `message` (a request) to the peer node `peer` with `request_id`, and call
    /// [`NodeCore::handle_peer_reply`] with its reply or why none came. The core keeps the
    /// request's deadline: a driver may give up earlier, never wait forever.
    PeerRequest {
        peer: wire::PeerNode,
        request_id: u64,
        message: Message,
    },
    /// The node stopped serving for good; the driver logs the reason and exits non-zero.
    Stopped { reason: String },
}

/// A record's place inside an Append body.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct RecordInBody {
    pub lsn: Lsn,
    pub backlink: Lsn,
    pub page: PageId,
    /// Offset of the encoded record from the start of the Append body.
    pub offset: u32,
    /// Encoded length, header included.
    pub len: u32,
}

impl RecordInBody {
    /// The records of a checked Append body.
    pub fn of_view(view: &AppendView<'_>) -> Vec<Self> {
        let out: Vec<Self> = view
            .records_with_offsets()
            .map(|(offset, meta)| Self {
                lsn: meta.lsn,
                backlink: meta.backlink,
                page: meta.page,
                offset,
                len: meta.encoded_len,
            })
            .collect();
        assert!(out.len() == view.header.record_count as usize);
        assert!(
            out.windows(2).all(|w| w[0].lsn < w[1].lsn),
            "the view checked the order"
        );
        out
    }

    /// The records of a decoded Append, laid out as `Append::encode` lays them out.
    pub fn of_append(append: &Append) -> Vec<Self> {
        let mut offset = wire::frame::APPEND_HEADER_BYTES;
        let mut out = Vec::with_capacity(append.records.len());
        for record in &append.records {
            let len = record.encoded_len();
            out.push(Self {
                lsn: record.lsn,
                backlink: record.backlink,
                page: record.page,
                offset: u32::try_from(offset).expect("bounded by the frame limit"),
                len: u32::try_from(len).expect("bounded by the frame limit"),
            });
            offset += len;
        }
        assert!(offset == append.encoded_len());
        assert!(out.len() == append.records.len());
        out
    }

    /// The record as durable at `body_offset` of journal file `file`.
    pub fn durable(&self, epoch: Epoch, file: u32, body_offset: u64) -> DurableRecord {
        assert!(self.backlink < self.lsn, "the decoder checked the backlink");
        assert!(self.len as usize >= wire::RECORD_HEADER_BYTES);
        DurableRecord {
            lsn: self.lsn,
            backlink: self.backlink,
            page: self.page,
            epoch,
            location: RecordLocation {
                lsn: self.lsn,
                file,
                offset: body_offset + u64::from(self.offset),
                len: self.len,
            },
        }
    }
}

/// What the node knows of one volume beyond its manifest entry.
#[derive(Clone, Debug, Default)]
struct Volume {
    /// Epoch, geometry and truncations in force (stored, or being stored).
    meta: VolumeMeta,
    /// Highest `vdl` of a durable Append header of this volume.
    vdl: Lsn,
    /// The manifest version that holds `meta` as it is now.
    version_needed: u64,
}

#[derive(Clone, Debug, PartialEq, Eq)]
enum Phase {
    Recovering,
    Serving,
    ShuttingDown,
    Stopped(String),
}

/// The storage node's protocol state. See the module documentation for the contract.
pub struct NodeCore {
    config: CoreConfig,
    phase: Phase,
    volumes: BTreeMap<VolumeId, Volume>,
    segments: BTreeMap<SegmentKey, Segment>,
    commit: commit::Commit,
    durability: durability::Durability,
    reads: reads::Reads,
    background: background::Background,
    gossip: gossip::Gossip,
    scrub: scrub::Scrub,
    backup: backup::Backup,
    rebuilds: rebuild::Rebuilds,
    throttle: throttle::Throttle,
    outputs: VecDeque<NodeOutput>,
}

/// Every segment key of `volume`, for range queries over the segment map.
fn volume_keys(volume: VolumeId) -> RangeInclusive<SegmentKey> {
    let first = SegmentKey {
        volume,
        pg: PgId(0),
        segment: SegmentIndex(0),
    };
    let last = SegmentKey {
        volume,
        pg: PgId(u32::MAX),
        segment: SegmentIndex(u32::MAX),
    };
    assert!(first < last);
    assert!(first.volume == last.volume);
    first..=last
}

impl NodeCore {
    /// A core over the manifest as stored; feed it the journal, then `finish_recovery`.
    pub fn new(config: CoreConfig, manifest: Manifest) -> Self {
        assert!(config.inflight_groups_max >= 1);
        assert!(config.inflight_groups_max <= crate::journal::INFLIGHT_GROUPS_MAX);
        assert!(config.journal_file_count >= 1);
        let mut volumes: BTreeMap<VolumeId, Volume> = manifest
            .volumes
            .into_iter()
            .map(|(id, meta)| {
                (
                    id,
                    Volume {
                        meta,
                        ..Volume::default()
                    },
                )
            })
            .collect();
        let mut segments = BTreeMap::new();
        for key in manifest.segments {
            let volume = volumes.entry(key.volume).or_default();
            let segment = match manifest.progress.get(&key) {
                Some(progress) => Segment::restored(*progress),
                None => Segment::default(),
            };
            // What is materialized is at most a PGMRPL, so at most a durable VDL.
            volume.vdl = volume.vdl.max(segment.materialized());
            segments.insert(key, segment);
        }
        let commit = commit::Commit::new(&config);
        let start = if manifest.journal_start.file < config.journal_file_count {
            manifest.journal_start
        } else {
            crate::manifest::JournalStart::default()
        };
        let background = background::Background::new(config.journal_file_count, start);
        let gossip = gossip::Gossip::new(
            gossip::GossipConfig::for_node(&config.name),
            manifest.placement,
        );
        let mut core = Self {
            config,
            phase: Phase::Recovering,
            volumes,
            segments,
            commit,
            durability: durability::Durability::default(),
            reads: reads::Reads::default(),
            background,
            gossip,
            scrub: scrub::Scrub::new(),
            backup: backup::Backup::new(),
            rebuilds: rebuild::Rebuilds::default(),
            throttle: throttle::Throttle::default(),
            outputs: VecDeque::new(),
        };
        core.refresh_poll_targets();
        core
    }

    /// During recovery: a durable group with `sequence` was found at `at` (call before its
    /// entries' `recover_append`).
    pub fn recover_group(&mut self, at: Position, sequence: u64) {
        assert!(
            self.phase == Phase::Recovering,
            "recovery happens before serving"
        );
        if at.offset == 0 {
            self.background.note_file_start(at.file, sequence);
        }
    }

    /// Rebuilds from one durable journal entry: its records are indexed (unless they lie in a
    /// truncated range or their segment is not hosted) and its VDL hint is noted. Returns how
    /// many records were indexed.
    pub fn recover_append(&mut self, at: EntryLocation, append: &Append) -> usize {
        assert!(
            self.phase == Phase::Recovering,
            "recovery happens before serving"
        );
        let key = SegmentKey {
            volume: append.volume,
            pg: append.pg,
            segment: append.segment,
        };
        let records = RecordInBody::of_append(append);
        let indexed = self.index_entry((key, append.epoch, append.vdl), at, &records);
        assert!(indexed <= records.len());
        indexed
    }

    /// Like [`NodeCore::recover_append`], from the entry's Append body as stored.
    pub fn recover_entry(&mut self, at: EntryLocation, body: &[u8]) -> Result<usize, DecodeError> {
        assert!(
            self.phase == Phase::Recovering,
            "recovery happens before serving"
        );
        let view = AppendView::decode(body)?;
        let h = view.header;
        let key = SegmentKey {
            volume: h.volume,
            pg: h.pg,
            segment: h.segment,
        };
        let records = RecordInBody::of_view(&view);
        let indexed = self.index_entry((key, h.epoch, h.vdl), at, &records);
        assert!(indexed <= records.len());
        Ok(indexed)
    }

    /// Ends recovery: new groups go at `end`, numbered from `next_sequence`.
    pub fn finish_recovery(&mut self, end: Position, next_sequence: u64) {
        assert!(self.phase == Phase::Recovering, "recovery finishes once");
        assert!(next_sequence >= 1, "group sequences start at 1");
        let start = self.background.start();
        self.commit.start_at(end, next_sequence, start.file);
        self.phase = Phase::Serving;
    }

    /// Indexes a durable entry's records in its segment, skipping truncated LSNs, and raises
    /// the volume's VDL hint. Returns how many records were indexed.
    fn index_entry(
        &mut self,
        (key, epoch, vdl): (SegmentKey, Epoch, Lsn),
        at: EntryLocation,
        records: &[RecordInBody],
    ) -> usize {
        let Some(segment) = self.segments.get_mut(&key) else {
            return 0; // No longer hosted (or never was): persisted, not indexed.
        };
        let volume = self
            .volumes
            .get_mut(&key.volume)
            .expect("hosted volumes are known");
        let before = volume.vdl;
        volume.vdl = volume.vdl.max(vdl);
        let mut indexed = 0;
        for record in records {
            if truncated(&volume.meta.truncations, record.lsn, epoch) {
                continue;
            }
            let durable = record.durable(epoch, at.file, at.body_offset);
            let observed = segment.observe(&durable);
            if matches!(
                observed,
                Observed::Indexed | Observed::Duplicate | Observed::Repaired
            ) {
                self.background.note_record(at.file, key, record.lsn);
            }
            match observed {
                Observed::Indexed => indexed += 1,
                Observed::Repaired => {
                    self.scrub.stats.records_repaired += 1;
                    self.background.failed.remove(&key); // Coalescing may go on.
                    tracing::info!("{key}: journal record {} repaired from a peer", record.lsn);
                }
                _ => {}
            }
        }
        assert!(volume.vdl >= before, "the VDL hint never goes down");
        assert!(indexed <= records.len());
        indexed
    }

    /// The next thing to do, if any. Forms the next journal group when none is waiting.
    pub fn poll_output(&mut self) -> Option<NodeOutput> {
        if self.outputs.is_empty() && matches!(self.phase, Phase::Serving | Phase::ShuttingDown) {
            self.form_groups();
            self.schedule_background();
            self.schedule_scrub();
            self.schedule_backup();
        }
        let output = self.outputs.pop_front();
        assert!(self.phase != Phase::Recovering || output.is_none());
        assert!(output.is_some() || self.outputs.is_empty());
        output
    }

    /// Stops taking requests (each gets `ShuttingDown`); what is waiting is finished, and
    /// acks held back by back-pressure leave at once.
    pub fn begin_shutdown(&mut self) {
        assert!(self.phase != Phase::Recovering, "shutdown after recovery");
        if self.phase == Phase::Serving {
            self.phase = Phase::ShuttingDown;
            self.release_all_held_acks();
        }
        assert!(self.phase != Phase::Serving);
        assert!(self.throttle.is_idle() || self.stopped().is_some());
    }

    /// A journal write or sync, or a manifest store, failed: the node stops serving. Every
    /// request waiting gets `ShuttingDown` naming `reason`, and so does every later one.
    pub fn handle_fatal_io(&mut self, reason: String) {
        if matches!(self.phase, Phase::Stopped(_)) {
            return;
        }
        assert!(!reason.is_empty(), "a stop names its reason");
        let message = format!("node {} stopped: {reason}", self.config.name);
        self.phase = Phase::Stopped(reason.clone());
        // Nothing queued for the disk matters any more; replies already decided still go.
        self.outputs
            .retain(|o| matches!(o, NodeOutput::Reply { .. }));
        let waiting: Vec<(ConnId, u64)> = self
            .commit
            .drain_waiting()
            .chain(self.durability.drain_waiting())
            .chain(self.reads.drain_waiting())
            .chain(self.throttle.drain_waiting())
            .collect();
        for (conn, request_id) in waiting {
            self.reply_error(conn, request_id, ErrorCode::ShuttingDown, message.clone());
        }
        self.outputs.push_back(NodeOutput::Stopped { reason });
        assert!(self.commit.is_idle() && self.reads.is_idle());
        assert!(self.stopped().is_some());
    }

    /// Why the node stopped, if it did.
    pub fn stopped(&self) -> Option<&str> {
        let reason = match &self.phase {
            Phase::Stopped(reason) => Some(reason.as_str()),
            _ => None,
        };
        assert!(
            reason.is_none_or(|r| !r.is_empty()),
            "a stop names its reason"
        );
        assert!(
            reason.is_none() || self.commit.is_idle(),
            "a stopped node waits for nothing"
        );
        reason
    }

    /// Whether nothing waits on I/O and no output is pending (a shut-down driver may exit). A
    /// stopped node waits for nothing: its outcomes no longer matter.
    pub fn is_idle(&self) -> bool {
        if self.stopped().is_some() {
            assert!(self.reads.is_idle());
            return self.outputs.is_empty();
        }
        let idle = self.outputs.is_empty()
            && self.commit.is_idle()
            && self.durability.is_idle()
            && self.reads.is_idle()
            && self.background.is_idle()
            && self.throttle.is_idle();
        assert!(!idle || self.commit.oldest_received().is_none());
        idle
    }

    /// How long the oldest append still waiting for the journal has waited.
    pub fn oldest_waiting(&self, now: Instant) -> Option<Duration> {
        let waited = self
            .commit
            .oldest_received()
            .map(|at| now.saturating_duration_since(at));
        assert!(waited.is_none() || !self.commit.is_idle());
        assert!(
            waited.is_none() || self.stopped().is_none(),
            "a stopped node waits for nothing"
        );
        waited
    }

    /// The hosted segments' keys.
    pub fn segment_keys(&self) -> Vec<SegmentKey> {
        self.segments.keys().copied().collect()
    }

    /// A hosted segment (its SCL, the records it holds, its PGMRPL).
    pub fn segment(&self, key: &SegmentKey) -> Option<&Segment> {
        let segment = self.segments.get(key);
        assert!(segment.is_none() || self.volumes.contains_key(&key.volume));
        assert!(self.segments.len() >= usize::from(segment.is_some()));
        segment
    }

    /// A hosted segment's SCL.
    pub fn scl(&self, key: &SegmentKey) -> Option<Lsn> {
        self.segment(key).map(Segment::scl)
    }

    /// The volume's epoch in force (0 for a volume the node knows nothing of).
    pub fn epoch(&self, volume: VolumeId) -> Epoch {
        let Some(v) = self.volumes.get(&volume) else {
            return Epoch(0);
        };
        assert!(
            v.version_needed <= self.durability.version(),
            "versions are issued in order"
        );
        assert!(v.meta.truncations.len() <= TRUNCATIONS_PER_VOLUME_MAX);
        v.meta.epoch
    }

    /// What a node holds of a volume, as a VolumeState reply states it.
    pub fn volume_state(&self, volume: VolumeId) -> VolumeState {
        let segments: Vec<SegmentState> = self
            .segments
            .range(volume_keys(volume))
            .map(|(key, segment)| {
                let (backed_up, snapshot) = self.backup.state_of(key);
                SegmentState {
                    pg: key.pg,
                    segment: key.segment,
                    scl: segment.scl(),
                    backed_up,
                    snapshot,
                }
            })
            .collect();
        assert!(segments.len() <= wire::frame::HOST_SEGMENTS_MAX);
        assert!(
            segments
                .windows(2)
                .all(|w| (w[0].pg, w[0].segment) < (w[1].pg, w[1].segment))
        );
        let vdl = self.volumes.get(&volume).map_or(Lsn::ZERO, |v| v.vdl);
        let truncations = self.volumes.get(&volume).map_or(Vec::new(), |v| {
            let all = &v.meta.truncations;
            // The newest ones (by the epoch they annul), oldest first, as the wire limits.
            let mut newest: Vec<wire::TruncationRange> = all
                .iter()
                .map(|t| wire::TruncationRange {
                    annul_epoch: t.epoch,
                    after: t.after,
                    through: t.through,
                })
                .collect();
            let skip = newest.len().saturating_sub(wire::frame::TRUNCATIONS_MAX);
            newest.drain(..skip);
            newest
        });
        VolumeState {
            volume,
            epoch: self.epoch(volume),
            vdl,
            truncations,
            segments,
        }
    }

    /// The manifest as the core wants it stored: hosted segments, and every volume's epoch,
    /// geometry and truncations.
    pub fn manifest(&self) -> Manifest {
        let manifest = Manifest {
            placement: self.gossip.placement().clone(),
            segments: self.segments.keys().copied().collect(),
            volumes: self
                .volumes
                .iter()
                .map(|(id, v)| (*id, v.meta.clone()))
                .collect(),
            progress: self
                .segments
                .iter()
                .map(|(key, segment)| (*key, segment.progress()))
                .filter(|(_, p)| *p != crate::manifest::Progress::default())
                .collect(),
            journal_start: self.background.start(),
        };
        assert!(manifest.segments.windows(2).all(|w| w[0] < w[1]));
        assert!(manifest.segments.len() == self.segments.len());
        manifest
    }

    fn reply(&mut self, conn: ConnId, request_id: u64, message: Message) {
        let is_reply = matches!(
            message,
            Message::Ack(_)
                | Message::Error(_)
                | Message::Page(_)
                | Message::Done
                | Message::VolumeState(_)
                | Message::Records(_)
                | Message::Pages(_)
        );
        assert!(is_reply, "a node sends replies, never requests");
        assert!(
            self.phase != Phase::Recovering,
            "replies come after recovery"
        );
        self.outputs.push_back(NodeOutput::Reply {
            conn,
            request_id,
            message,
        });
    }

    fn reply_error(&mut self, conn: ConnId, request_id: u64, code: ErrorCode, text: String) {
        let reply = ErrorReply::new(code, text);
        assert!(!reply.message.is_empty(), "errors name their problem");
        assert!(reply.message.len() <= wire::frame::ERROR_MESSAGE_BYTES_MAX);
        self.reply(conn, request_id, Message::Error(reply));
    }

    fn reply_result(&mut self, conn: ConnId, request_id: u64, result: Result<Message, ErrorReply>) {
        let message = result.unwrap_or_else(Message::Error);
        assert!(
            self.phase != Phase::Recovering,
            "requests come after recovery"
        );
        assert!(
            self.stopped().is_none(),
            "a stopped node answers ShuttingDown only"
        );
        self.reply(conn, request_id, message);
    }

    /// A page read finished: the image, or why not (`true`: the page store's copy is damaged).
    pub fn handle_page_read(
        &mut self,
        token: ReadToken,
        result: Result<wire::PageImage, (bool, String)>,
    ) {
        if self.stopped().is_some() {
            return; // Everyone waiting was answered when the node stopped.
        }
        let (conn, request_id, reply, damaged) = self.reads.complete_page(token, result);
        if let Some((key, page, why)) = damaged {
            self.note_damaged_page(key, page, &why);
        }
        self.reply_result(conn, request_id, reply);
    }

    /// A page fetch for a peer ([`NodeOutput::ReadPages`]) finished.
    pub fn handle_pages_read(
        &mut self,
        token: ReadToken,
        result: Result<(Vec<wire::PageImage>, u64), (bool, String)>,
    ) {
        if self.stopped().is_some() {
            return; // Everyone waiting was answered when the node stopped.
        }
        let (conn, request_id, reply) = self.reads.complete_pages(token, result);
        self.reply_result(conn, request_id, reply);
    }

    /// Reads back of records: the read results as the driver hands them over.
    pub fn handle_records_read(
        &mut self,
        token: ReadToken,
        result: Result<Vec<LogRecord>, String>,
    ) {
        if self.stopped().is_some() {
            return; // Everyone waiting was answered when the node stopped.
        }
        assert!(self.phase != Phase::Recovering, "reads come after recovery");
        assert!(
            !self.reads.is_idle(),
            "a read completes after it was asked for"
        );
        let (conn, request_id, reply) = self.reads.complete(token, result);
        self.reply_result(conn, request_id, reply);
    }
}
