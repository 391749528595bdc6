//! A real `NodeCore` on a simulated disk: the simulator's storage node. The journal is a set
//! of in-memory file images written exactly as the node's journal writer lays groups out
//! (`node::io::encode_group`); a write becomes durable only after a simulated delay, and a
//! crash loses every write not yet durable, sometimes tearing the first of them. A restart
//! runs the node's own recovery over the images (`node::journal::scan_with` and
//! `erase_stale_tail`), so torn writes and bit flips go through the same code as on a disk.
//! The manifest is stored atomically after a delay.
//!
//! Invariants: the core is told a group is persisted only once its bytes are in the durable
//! image (unless the planted bug `AckBeforeDurable` is on, which tells it at submission).

use std::collections::VecDeque;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use bytes::Bytes;
use node::NodeCore;
use node::core::{
    ConnId, CoreConfig, EntryLocation, GroupId, JobToken, ManifestToken, NodeOutput, ReadToken,
};
use node::io::{AlignedBuf, RecordReader, encode_group};
use node::journal::format::GROUP_BYTES_MAX;
use node::journal::{JournalStorage, Position};
use node::manifest::{Manifest, SegmentKey, VolumeMeta};
use node::pagestore::{CoalesceJob, MemPageStore, PageRead, PagesRead, ScrubJob};
use node::segment::RecordLocation;
use wire::codec::Reader;
use wire::{Epoch, LogRecord, Message, PeerNode, PgId, Role, SegmentIndex, VolumeId};

use crate::rng::Rng;
use crate::storage::{Outgoing, PEER_CONN_BASE, StorageNode, WriterId};

const FILE_BYTES: u64 = GROUP_BYTES_MAX as u64;
const FILE_COUNT: u32 = 4;

/// The journal's file images (interior mutability: the scan API takes `&self`).
struct SimJournal {
    files: Mutex<Vec<Vec<u8>>>,
}

impl SimJournal {
    fn files(&self) -> std::sync::MutexGuard<'_, Vec<Vec<u8>>> {
        self.files.lock().expect("one thread")
    }
}

impl RecordReader for SimJournal {
    fn read(&self, locations: &[RecordLocation]) -> Result<Vec<LogRecord>, String> {
        let mut out = Vec::with_capacity(locations.len());
        for location in locations {
            let mut bytes = vec![0u8; location.len as usize];
            self.read_exact_at(location.file, &mut bytes, location.offset)
                .map_err(|e| e.to_string())?;
            let record = LogRecord::decode(&mut Reader::new(&bytes)).map_err(|e| e.to_string())?;
            out.push(record);
        }
        Ok(out)
    }
}

impl JournalStorage for SimJournal {
    fn file_count(&self) -> usize {
        self.files().len()
    }

    fn file_bytes(&self) -> u64 {
        FILE_BYTES
    }

    fn read_exact_at(&self, file: u32, buf: &mut [u8], offset: u64) -> std::io::Result<()> {
        let files = self.files();
        let image = &files[file as usize];
        let start = offset as usize;
        buf.copy_from_slice(&image[start..start + buf.len()]);
        Ok(())
    }

    fn write_all_at(&self, file: u32, buf: &[u8], offset: u64) -> std::io::Result<()> {
        let mut files = self.files();
        let start = offset as usize;
        files[file as usize][start..start + buf.len()].copy_from_slice(buf);
        Ok(())
    }

    fn sync(&self) -> std::io::Result<()> {
        Ok(())
    }
}

/// A group write on its way to the durable image.
struct PendingWrite {
    at: Instant,
    group: GroupId,
    position: Position,
    bytes: Vec<u8>,
}

/// See the module docs.
pub struct CoreNode {
    config: CoreConfig,
    core: Option<NodeCore>,
    journal: SimJournal,
    manifest: Manifest,
    writes: VecDeque<PendingWrite>,
    manifest_store: Option<(Instant, ManifestToken, Manifest)>,
    reads: VecDeque<(Instant, ReadToken, Vec<RecordLocation>)>,
    page_reads: VecDeque<(Instant, ReadToken, PageRead)>,
    round: Option<(Instant, JobToken, CoalesceJob)>,
    scrub_job: Option<(Instant, JobToken, ScrubJob)>,
    pages_reads: VecDeque<(Instant, ReadToken, PagesRead)>,
    pages: MemPageStore,
    replies: Vec<Outgoing>,
    buf: AlignedBuf,
    /// Planted bug: tell the core a group is durable when it is submitted.
    pub ack_before_durable: bool,
    /// Why the node stopped, if it did (a simulator failure: no I/O error is injected).
    pub stopped: Option<String>,
    /// Planted bug: the node never gossips.
    pub no_gossip: bool,
    /// Requests to peers the core asked for, not yet taken by the network.
    peer_requests: Vec<(String, u64, Message)>,
    /// The placement's nodes by name (the core names its peers so).
    peers: Vec<PeerNode>,
    /// The core has not yet been given the time since it (re)started.
    needs_start: bool,
    /// Records fetched by gossip in earlier lives of this node.
    gossip_records_before: u64,
    /// Acks delayed by back-pressure in earlier lives of this node.
    acks_throttled_before: u64,
    /// Back-pressure forced on this node, for every life of it.
    throttle: Option<node::core::ThrottleConfig>,
}

/// The simulated placement's node `i`: its name, and an address nobody dials.
pub fn sim_peer(name: &str, i: usize) -> PeerNode {
    PeerNode {
        name: name.to_string(),
        address: std::net::SocketAddr::from(([10, 0, 0, u8::try_from(i + 1).expect("few")], 7100)),
    }
}

impl CoreNode {
    /// Node `name` hosting `hosted`; `placement[s]` is the node of segment `s` of every PG.
    pub fn new(
        name: &str,
        volume: VolumeId,
        epoch: Epoch,
        geometry: (u32, u64),
        hosted: &[(PgId, SegmentIndex)],
        placement: &[PeerNode],
    ) -> Self {
        let mut manifest = Manifest::default();
        for (pg, segment) in hosted {
            manifest.segments.push(SegmentKey {
                volume,
                pg: *pg,
                segment: *segment,
            });
            for (s, node) in placement.iter().enumerate() {
                let key = SegmentKey {
                    volume,
                    pg: *pg,
                    segment: SegmentIndex(u32::try_from(s).expect("PG_SIZE is small")),
                };
                manifest.placement.insert(key, node.clone());
            }
        }
        let meta = VolumeMeta {
            epoch,
            page_size_bytes: geometry.0,
            pages_per_pg: geometry.1,
            pg_count: 0,
            truncations: Vec::new(),
        };
        manifest.volumes.insert(volume, meta);
        let config = CoreConfig {
            name: name.to_string(),
            inflight_groups_max: 4,
            journal_file_bytes: FILE_BYTES,
            journal_file_count: FILE_COUNT,
        };
        let files = (0..FILE_COUNT)
            .map(|_| vec![0u8; FILE_BYTES as usize])
            .collect();
        let mut node = Self {
            config,
            core: None,
            journal: SimJournal {
                files: Mutex::new(files),
            },
            page_reads: VecDeque::new(),
            round: None,
            scrub_job: None,
            pages_reads: VecDeque::new(),
            pages: MemPageStore::default(),
            manifest,
            writes: VecDeque::new(),
            manifest_store: None,
            reads: VecDeque::new(),
            replies: Vec::new(),
            buf: AlignedBuf::new(GROUP_BYTES_MAX),
            ack_before_durable: false,
            stopped: None,
            no_gossip: false,
            peer_requests: Vec::new(),
            peers: placement.to_vec(),
            needs_start: true,
            gossip_records_before: 0,
            acks_throttled_before: 0,
            throttle: None,
        };
        node.recover();
        node
    }

    /// The node's own recovery over the durable images: scan, rebuild, erase the stale tail.
    fn recover(&mut self) {
        let mut core = NodeCore::new(self.config.clone(), self.manifest.clone());
        let start = core.journal_start();
        let scan = node::journal::scan_with(&self.journal, start, |group| {
            core.recover_group(group.position, group.sequence);
            for entry in &group.entries {
                let at = EntryLocation {
                    file: group.position.file,
                    body_offset: entry.body_offset,
                };
                core.recover_append(at, &entry.append);
            }
        })
        .expect("simulated reads do not fail");
        node::journal::erase_stale_tail(&self.journal, start, scan.end, scan.next_sequence)
            .expect("simulated writes do not fail");
        core.finish_recovery(scan.end, scan.next_sequence);
        // Scrub often: faults last seconds of virtual time, and damage must be repaired
        // before the convergence check gives up.
        core.configure_scrub(node::core::ScrubConfig {
            interval: Duration::from_millis(250),
            ..node::core::ScrubConfig::default()
        });
        if self.no_gossip {
            let mut config = node::core::GossipConfig::for_node(&self.config.name);
            config.enabled = false;
            core.configure_gossip(config);
        }
        if let Some(throttle) = &self.throttle {
            core.configure_throttle(throttle.clone());
        }
        self.core = Some(core);
        self.needs_start = true;
    }

    /// Carries out what the core asks for.
    fn drain(&mut self, now: Instant, rng: Option<&mut Rng>) {
        // Most writes take well under a millisecond; now and then the disk stalls for tens.
        let mut jitter = rng.map_or(300, |r| {
            if r.chance(0.05) {
                r.between(5_000, 50_000)
            } else {
                r.between(50, 600)
            }
        });
        if self.core.is_none() {
            return;
        }
        let mut persisted_now = Vec::new();
        while let Some(output) = self.core.as_mut().expect("running").poll_output() {
            match output {
                NodeOutput::Reply {
                    conn,
                    request_id,
                    message,
                } => self.replies.push(Outgoing {
                    to: conn.0 as usize,
                    request_id,
                    message,
                }),
                NodeOutput::Persist(group) => {
                    encode_group(&group, &mut self.buf);
                    let after = self.writes.back().map_or(now, |w| w.at.max(now));
                    // A node that acks early sits on unsynced data for a while (a write-back
                    // cache it never flushes in time): that is when a crash bites.
                    let lag = if self.ack_before_durable { 50_000 } else { 0 };
                    jitter = (jitter * 7 + 13) % 600 + 50; // Later groups of this burst.
                    self.writes.push_back(PendingWrite {
                        at: after + Duration::from_micros(jitter + lag),
                        group: group.id,
                        position: group.position,
                        bytes: self.buf.as_slice().to_vec(),
                    });
                    if self.ack_before_durable {
                        persisted_now.push(group.id);
                    }
                }
                NodeOutput::Stopped { reason } => self.stopped = Some(reason),
                NodeOutput::PeerRequest {
                    peer,
                    request_id,
                    message,
                } => self.peer_requests.push((peer.name, request_id, message)),
                other => self.queue_io(now, other),
            }
        }
        if !persisted_now.is_empty() {
            let core = self.core.as_mut().expect("running");
            for group in persisted_now {
                core.handle_persisted(now, group);
            }
            self.drain(now, None);
        }
    }

    /// Queues a read, a manifest store or a background job; it completes a little later.
    fn queue_io(&mut self, now: Instant, output: NodeOutput) {
        let after = |us| now + Duration::from_micros(us);
        match output {
            NodeOutput::StoreManifest { token, manifest } => {
                self.manifest_store = Some((after(800), token, manifest));
            }
            NodeOutput::ReadRecords { token, locations } => {
                self.reads.push_back((after(100), token, locations));
            }
            NodeOutput::ReadPage { token, read } => {
                self.page_reads.push_back((after(150), token, read));
            }
            NodeOutput::ReadPages { token, job } => {
                self.pages_reads.push_back((after(500), token, job));
            }
            NodeOutput::Coalesce { token, job } => {
                assert!(self.round.is_none(), "one round at a time");
                self.round = Some((after(2000), token, job));
            }
            NodeOutput::Scrub { token, job } => {
                assert!(self.round.is_none() && self.scrub_job.is_none(), "one job");
                self.scrub_job = Some((after(1000), token, job));
            }
            _ => unreachable!("drain handles the others"),
        }
    }

    /// Completes the page fetches and background jobs due by `now`.
    fn complete_jobs(&mut self, now: Instant) {
        let core = self.core.as_mut().expect("running");
        while self.pages_reads.front().is_some_and(|r| r.0 <= now) {
            let (_, token, job) = self.pages_reads.pop_front().expect("checked");
            let result = node::pagestore::read_pages(&job, &self.pages, &self.journal);
            core.handle_pages_read(token, result);
        }
        if self.scrub_job.as_ref().is_some_and(|r| r.0 <= now) {
            let (_, token, job) = self.scrub_job.take().expect("checked");
            let report = node::pagestore::run_scrub(&job, &self.pages, &self.journal);
            core.handle_scrubbed(token, report);
        }
        if self.round.as_ref().is_some_and(|r| r.0 <= now) {
            let (_, token, job) = self.round.take().expect("checked");
            let result = node::pagestore::run_coalesce(&job, &self.pages, &self.journal);
            core.handle_coalesced(token, result);
        }
    }

    fn read_records(&self, locations: &[RecordLocation]) -> Result<Vec<LogRecord>, String> {
        self.journal.read(locations)
    }
}

impl CoreNode {
    /// Corruption: flip one bit somewhere in the written part of a crashed node's journal
    /// (its recovery must keep every other valid group, and the writer must route around the
    /// records it loses).
    fn flip(&mut self, rng: &mut Rng) {
        let mut files = self.journal.files();
        let used: Vec<usize> = (0..files.len())
            .filter(|f| files[*f][..64].iter().any(|b| *b != 0))
            .collect();
        let Some(&file) = used.get(rng.below(used.len().max(1) as u64) as usize) else {
            return;
        };
        let written = files[file].iter().rposition(|b| *b != 0).unwrap_or(0);
        let at = rng.below(written as u64 + 1) as usize;
        files[file][at] ^= 1 << rng.below(8);
    }
}

impl CoreNode {
    /// Flips a bit inside a record the running node holds (not in padding nobody reads).
    fn flip_live_record(&mut self, rng: &mut Rng) {
        let core = self.core.as_ref().expect("running");
        let locations: Vec<RecordLocation> = core
            .segment_keys()
            .into_iter()
            .filter_map(|key| core.segment(&key))
            .flat_map(|s| s.records_to_scrub(wire::Lsn::ZERO, usize::MAX))
            .collect();
        if locations.is_empty() {
            return;
        }
        let l = locations[rng.below(locations.len() as u64) as usize];
        let at = l.offset as usize + rng.below(u64::from(l.len)) as usize;
        let mut files = self.journal.files();
        files[l.file as usize][at] ^= 1 << rng.below(8);
    }

    /// Flips a bit in the header or image of a page-store slot (not in its padding).
    fn flip_live_page(&mut self, rng: &mut Rng) {
        let slot = node::pagestore::slot_bytes(crate::world::PAGE_SIZE) as u64;
        let used = (node::pagestore::SLOT_HEADER_BYTES + crate::world::PAGE_SIZE) as u64;
        let files: Vec<(SegmentKey, u64)> = self
            .pages
            .lengths()
            .into_iter()
            .filter(|(_, len)| *len >= slot)
            .collect();
        if files.is_empty() {
            return;
        }
        let (key, len) = files[rng.below(files.len() as u64) as usize];
        let offset = rng.below(len / slot) * slot + rng.below(used);
        self.pages.flip_bit(&key, offset, rng.below(8) as u8);
    }
}

impl StorageNode for CoreNode {
    fn flip_a_bit(&mut self, rng: &mut Rng) {
        assert!(self.core.is_none(), "bits flip on a crashed node's disk");
        self.flip(rng);
    }

    fn flip_a_live_bit(&mut self, rng: &mut Rng) {
        if self.core.is_none() {
            return;
        }
        if rng.chance(0.5) {
            self.flip_live_record(rng);
        } else {
            self.flip_live_page(rng);
        }
    }

    fn damage_outstanding(&self) -> usize {
        self.core.as_ref().map_or(0, NodeCore::damage_outstanding)
    }

    fn damage_repaired(&self) -> u64 {
        self.core.as_ref().map_or(0, |c| {
            let s = c.scrub_stats();
            s.pages_repaired + s.records_repaired
        })
    }

    fn stopped(&self) -> Option<&str> {
        self.stopped.as_deref()
    }

    fn deliver(&mut self, now: Instant, from: WriterId, frame: &[u8], rng: &mut Rng) {
        let Some(core) = self.core.as_mut() else {
            return;
        };
        let body = Bytes::copy_from_slice(frame.get(4..).unwrap_or_default());
        core.handle_frame(now, ConnId(from as u64), Some(Role::Engine), body);
        self.drain(now, Some(rng));
    }

    fn advance(&mut self, now: Instant) {
        let Some(core) = self.core.as_mut() else {
            return;
        };
        if self.needs_start || core.poll_timeout().is_some_and(|t| t <= now) {
            self.needs_start = false;
            core.handle_timeout(now);
        }
        while self.writes.front().is_some_and(|w| w.at <= now) {
            let write = self.writes.pop_front().expect("checked");
            self.journal
                .write_all_at(write.position.file, &write.bytes, write.position.offset)
                .expect("simulated writes do not fail");
            if !self.ack_before_durable {
                self.core
                    .as_mut()
                    .expect("running")
                    .handle_persisted(now, write.group);
            }
        }
        if let Some((at, token, manifest)) = self.manifest_store.take() {
            if at <= now {
                self.manifest = manifest;
                self.core
                    .as_mut()
                    .expect("running")
                    .handle_manifest_stored(token);
            } else {
                self.manifest_store = Some((at, token, manifest));
            }
        }
        while self.reads.front().is_some_and(|r| r.0 <= now) {
            let (_, token, locations) = self.reads.pop_front().expect("checked");
            let result = self.read_records(&locations);
            self.core
                .as_mut()
                .expect("running")
                .handle_records_read(token, result);
        }
        while self.page_reads.front().is_some_and(|r| r.0 <= now) {
            let (_, token, read) = self.page_reads.pop_front().expect("checked");
            let result = node::pagestore::read_page(&read, &self.pages, &self.journal);
            self.core
                .as_mut()
                .expect("running")
                .handle_page_read(token, result);
        }
        self.complete_jobs(now);
        self.drain(now, None);
    }

    fn next_event(&self) -> Option<Instant> {
        [
            self.writes.front().map(|w| w.at),
            self.manifest_store.as_ref().map(|m| m.0),
            self.reads.front().map(|r| r.0),
            self.page_reads.front().map(|r| r.0),
            self.pages_reads.front().map(|r| r.0),
            self.round.as_ref().map(|r| r.0),
            self.scrub_job.as_ref().map(|r| r.0),
            self.core.as_ref().and_then(NodeCore::poll_timeout),
        ]
        .into_iter()
        .flatten()
        .min()
    }

    fn take_replies(&mut self) -> Vec<Outgoing> {
        std::mem::take(&mut self.replies)
    }

    fn crash(&mut self, rng: &mut Rng) {
        // The first write in flight may land partly: a torn group.
        if let Some(write) = self.writes.front()
            && rng.chance(0.3)
        {
            let cut = (rng.below(write.bytes.len() as u64 / 512 + 1) * 512) as usize;
            let torn = &write.bytes[..cut.min(write.bytes.len())];
            self.journal
                .write_all_at(write.position.file, torn, write.position.offset)
                .expect("simulated writes do not fail");
        }
        if let Some(core) = &self.core {
            self.gossip_records_before += core.gossip_stats().records_fetched;
            self.acks_throttled_before += core.throttle_status().acks_throttled;
        }
        self.core = None;
        self.peer_requests.clear();
        self.writes.clear();
        self.manifest_store = None;
        self.reads.clear();
        self.page_reads.clear();
        self.round = None;
        self.scrub_job = None;
        self.pages_reads.clear();
        self.replies.clear();
    }

    fn restart(&mut self) {
        assert!(self.core.is_none(), "restart after a crash");
        self.recover();
    }

    fn plant_ack_before_durable(&mut self) {
        self.ack_before_durable = true;
    }

    fn plant_no_gossip(&mut self) {
        self.no_gossip = true;
        if let Some(core) = self.core.as_mut() {
            let mut config = node::core::GossipConfig::for_node(&self.config.name);
            config.enabled = false;
            core.configure_gossip(config);
        }
    }

    fn force_throttle(&mut self, delay: Duration) {
        let config = node::core::ThrottleConfig {
            journal_percent: 0,
            delay_min: delay,
            delay_max: delay,
            ..node::core::ThrottleConfig::default()
        };
        if let Some(core) = self.core.as_mut() {
            core.configure_throttle(config.clone());
        }
        self.throttle = Some(config);
    }

    fn take_peer_requests(&mut self) -> Vec<(String, u64, Message)> {
        std::mem::take(&mut self.peer_requests)
    }

    fn deliver_from_peer(&mut self, now: Instant, conn: usize, frame: &[u8], rng: &mut Rng) {
        let Some(core) = self.core.as_mut() else {
            return;
        };
        let body = Bytes::copy_from_slice(frame.get(4..).unwrap_or_default());
        assert!(
            conn >= PEER_CONN_BASE,
            "peers have connections of their own"
        );
        let conn = ConnId(conn as u64);
        core.handle_frame(now, conn, Some(Role::Node), body);
        self.drain(now, Some(rng));
    }

    fn peer_reply(
        &mut self,
        now: Instant,
        peer: &str,
        request_id: u64,
        reply: Result<Message, String>,
    ) {
        let Some(core) = self.core.as_mut() else {
            return;
        };
        let peer = self
            .peers
            .iter()
            .find(|p| p.name == peer)
            .expect("replies come from placed nodes");
        core.handle_peer_reply(now, peer, request_id, reply);
        self.drain(now, None);
    }

    fn scls(&self) -> Option<(Epoch, Vec<(PgId, wire::Lsn)>)> {
        let state = self.core.as_ref()?.volume_state(VolumeId(1));
        Some((
            state.epoch,
            state.segments.iter().map(|s| (s.pg, s.scl)).collect(),
        ))
    }

    fn acks_throttled(&self) -> u64 {
        let now = self
            .core
            .as_ref()
            .map_or(0, |c| c.throttle_status().acks_throttled);
        self.acks_throttled_before + now
    }

    fn gossip_records(&self) -> u64 {
        let now = self
            .core
            .as_ref()
            .map_or(0, |c| c.gossip_stats().records_fetched);
        self.gossip_records_before + now
    }

    fn debug(&self) -> String {
        let Some(core) = &self.core else {
            return "crashed".into();
        };
        let state = core.volume_state(VolumeId(1));
        let scrub = core.scrub_stats();
        let mut out = format!(
            "epoch {:#x} vdl {}; scrub: {} pages {} records checked, damaged {}+{}, repaired \
             {}+{}; ",
            state.epoch.0,
            state.vdl,
            scrub.pages_checked,
            scrub.records_checked,
            scrub.pages_damaged,
            scrub.records_damaged,
            scrub.pages_repaired,
            scrub.records_repaired
        );
        for s in &state.segments {
            let key = SegmentKey {
                volume: VolumeId(1),
                pg: s.pg,
                segment: s.segment,
            };
            let segment = core.segment(&key).expect("hosted");
            let above: Vec<u64> = (s.scl.0 + 1..s.scl.0 + 40)
                .filter(|l| segment.holds(wire::Lsn(*l)))
                .collect();
            out += &format!("pg {} SCL {} held above {:?}; ", s.pg, s.scl, above);
        }
        out
    }
}
