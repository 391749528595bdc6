//! Gossip between real `NodeCore`s, in memory: no disk, no network, a virtual clock. A small
//! harness plays three drivers (journal groups kept in memory and completed at once,
//! manifests stored at once) and the network between them: each `PeerRequest` is handed to
//! the named core as a request from a node certificate and its reply is fed back; requests
//! to nodes that do not exist fail, as an unreachable peer's would.

use std::collections::{BTreeMap, HashMap};
use std::time::{Duration, Instant};

use bytes::Bytes;
use node::core::{ConnId, CoreConfig, EntryLocation, GossipConfig, NodeCore, NodeOutput};
use node::journal::Position;
use node::journal::format::GROUP_BYTES_MAX;
use node::manifest::{Manifest, SegmentKey};
use node::segment::RecordLocation;
use wire::codec::Reader;
use wire::{
    Append, Epoch, Fence, Frame, HostSegments, LogRecord, Lsn, Message, PageId, PeerNode, PgId,
    PgPlacement, RedoOp, Role, SegmentIndex, Truncate, TruncationRange, VolumeId,
};

const V: VolumeId = VolumeId(1);
const NODES: usize = 3;

fn key(segment: u32) -> SegmentKey {
    SegmentKey {
        volume: V,
        pg: PgId(0),
        segment: SegmentIndex(segment),
    }
}

fn peer(i: usize) -> PeerNode {
    PeerNode {
        name: format!("node{}", i + 1),
        address: format!("127.0.0.1:{}", 7100 + i).parse().unwrap(),
    }
}

fn record(lsn: u64, backlink: u64) -> LogRecord {
    LogRecord {
        lsn: Lsn(lsn),
        backlink: Lsn(backlink),
        page: PageId(lsn % 4),
        cpl: true,
        op: RedoOp::Write {
            offset: 0,
            bytes: vec![(lsn % 251) as u8; 16],
        },
    }
}

/// One node: its core and its in-memory journal and manifest.
struct Mem {
    core: NodeCore,
    durable: BTreeMap<u64, node::core::PersistGroup>,
    files: HashMap<u32, Vec<u8>>,
    manifest: Manifest,
    replies: Vec<(u64, Message)>,
    peer_requests: Vec<(PeerNode, u64, Message)>,
    pages: node::pagestore::MemPageStore,
}

impl Mem {
    fn new(
        i: usize,
        manifest: Manifest,
        durable: BTreeMap<u64, node::core::PersistGroup>,
        files: HashMap<u32, Vec<u8>>,
        now: Instant,
    ) -> Self {
        let config = CoreConfig {
            name: peer(i).name,
            inflight_groups_max: 4,
            journal_file_bytes: 4 * GROUP_BYTES_MAX as u64,
            journal_file_count: 2,
        };
        let mut core = NodeCore::new(config, manifest.clone());
        let mut end = Position::default();
        for group in durable.values() {
            let mut offset = group.position.offset + 32;
            for body in &group.entries {
                let at = EntryLocation {
                    file: group.position.file,
                    body_offset: offset + 4,
                };
                core.recover_entry(at, body).unwrap();
                offset += 4 + body.len() as u64;
            }
            end = Position {
                file: group.position.file,
                offset: group.position.offset + group.bytes as u64,
            };
        }
        core.finish_recovery(end, durable.keys().next_back().map_or(1, |s| s + 1));
        let mut gossip = GossipConfig::for_node(&peer(i).name);
        gossip.poll_interval = Duration::from_millis(100);
        core.configure_gossip(gossip);
        core.handle_timeout(now);
        Self {
            core,
            durable,
            files,
            manifest,
            replies: Vec::new(),
            peer_requests: Vec::new(),
            pages: node::pagestore::MemPageStore::default(),
        }
    }

    /// Carries out every output at once: groups are durable and manifests stored as soon as
    /// asked, reads served from the in-memory journal.
    fn drain(&mut self, now: Instant) {
        while let Some(output) = self.core.poll_output() {
            match output {
                NodeOutput::Reply {
                    request_id,
                    message,
                    ..
                } => self.replies.push((request_id, message)),
                NodeOutput::Persist(group) => {
                    let mut buf = node::io::AlignedBuf::new(GROUP_BYTES_MAX);
                    node::io::encode_group(&group, &mut buf);
                    let file = self.files.entry(group.position.file).or_default();
                    let end = group.position.offset as usize + buf.len();
                    if file.len() < end {
                        file.resize(end, 0);
                    }
                    file[group.position.offset as usize..end].copy_from_slice(buf.as_slice());
                    let id = group.id;
                    self.durable.insert(group.sequence, group);
                    self.core.handle_persisted(now, id);
                }
                NodeOutput::StoreManifest { token, manifest } => {
                    self.manifest = manifest;
                    self.core.handle_manifest_stored(token);
                }
                NodeOutput::ReadRecords { token, locations } => {
                    let records = self.read(&locations);
                    self.core.handle_records_read(token, Ok(records));
                }
                NodeOutput::PeerRequest {
                    peer,
                    request_id,
                    message,
                } => self.peer_requests.push((peer, request_id, message)),
                NodeOutput::Backup { .. } => panic!("backup is off in these tests"),
                NodeOutput::ReadPage { token, read } => {
                    let reader = node::io::MemRecords(&self.files);
                    let result = node::pagestore::read_page(&read, &self.pages, &reader);
                    self.core.handle_page_read(token, result);
                }
                NodeOutput::Coalesce { token, job } => {
                    let reader = node::io::MemRecords(&self.files);
                    let result = node::pagestore::run_coalesce(&job, &self.pages, &reader);
                    self.core.handle_coalesced(token, result);
                }
                NodeOutput::ReadPages { token, job } => {
                    let reader = node::io::MemRecords(&self.files);
                    let result = node::pagestore::read_pages(&job, &self.pages, &reader);
                    self.core.handle_pages_read(token, result);
                }
                NodeOutput::Scrub { token, job } => {
                    let reader = node::io::MemRecords(&self.files);
                    let report = node::pagestore::run_scrub(&job, &self.pages, &reader);
                    self.core.handle_scrubbed(token, report);
                }
                NodeOutput::Stopped { reason } => panic!("node stopped: {reason}"),
            }
        }
    }

    fn read(&self, locations: &[RecordLocation]) -> Vec<LogRecord> {
        locations
            .iter()
            .map(|l| {
                let file = &self.files[&l.file];
                let bytes = &file[l.offset as usize..(l.offset + u64::from(l.len)) as usize];
                LogRecord::decode(&mut Reader::new(bytes)).unwrap()
            })
            .collect()
    }
}

/// Three nodes hosting segments 0, 1 and 2 of PG 0; segments 3..5 live on nodes that do not
/// exist (every request to them fails).
struct Cluster {
    nodes: Vec<Mem>,
    now: Instant,
    next_request: u64,
    /// Nodes that refuse every FetchRecords, as a node whose chain was compacted below the
    /// range asked will.
    compacted: Vec<usize>,
}

impl Cluster {
    fn new() -> Self {
        let now = Instant::now();
        let nodes = (0..NODES)
            .map(|i| {
                let manifest = Manifest::default();
                Mem::new(i, manifest, BTreeMap::new(), HashMap::new(), now)
            })
            .collect();
        let mut cluster = Self {
            nodes,
            now,
            next_request: 1,
            compacted: Vec::new(),
        };
        for i in 0..NODES {
            let host = HostSegments {
                volume: V,
                epoch: Epoch(1),
                page_size_bytes: 256,
                pages_per_pg: 8,
                pg_count: 1,
                segments: vec![(PgId(0), SegmentIndex(i as u32))],
                nodes: (0..6).map(peer).collect(),
                placement: vec![PgPlacement {
                    pg: PgId(0),
                    nodes: [0, 1, 2, 3, 4, 5],
                }],
            };
            let reply = cluster.request(i, Message::HostSegments(host));
            assert_eq!(reply, Message::Done);
        }
        cluster
    }

    /// A request from the engine to node `i`, answered at once (everything completes at once).
    fn request(&mut self, i: usize, message: Message) -> Message {
        let request_id = self.next_request;
        self.next_request += 1;
        let node = &mut self.nodes[i];
        node.core
            .handle_request(self.now, ConnId(1), Some(Role::Engine), request_id, message);
        node.drain(self.now);
        let at = node
            .replies
            .iter()
            .position(|(id, _)| *id == request_id)
            .expect("answered at once");
        node.replies.remove(at).1
    }

    /// Appends records of PG 0 at `epoch` to node `i`'s segment.
    fn append(&mut self, i: usize, epoch: u64, records: Vec<LogRecord>) {
        let append = Append {
            volume: V,
            epoch: Epoch(epoch),
            pg: PgId(0),
            segment: SegmentIndex(i as u32),
            vdl: Lsn::ZERO,
            records,
        };
        let reply = self.request(i, Message::Append(append));
        assert!(matches!(reply, Message::Ack(_)), "{reply:?}");
    }

    fn scl(&self, i: usize) -> Lsn {
        self.nodes[i].core.scl(&key(i as u32)).unwrap()
    }

    /// Advances the virtual clock by `step` and carries every peer request to its node and
    /// its reply back.
    fn tick(&mut self, step: Duration) {
        self.now += step;
        for i in 0..NODES {
            self.nodes[i].core.handle_timeout(self.now);
            self.nodes[i].drain(self.now);
        }
        for i in 0..NODES {
            let requests = std::mem::take(&mut self.nodes[i].peer_requests);
            for (to, request_id, message) in requests {
                let target = (0..NODES).find(|n| peer(*n) == to);
                let reply = match target {
                    Some(n)
                        if self.compacted.contains(&n)
                            && matches!(message, Message::FetchRecords(_)) =>
                    {
                        Ok(Message::Error(wire::ErrorReply::new(
                            wire::ErrorCode::BadRequest,
                            "the range lies below the segment's base (compacted)",
                        )))
                    }
                    Some(n) => Ok(self.serve_peer(n, i, request_id, message)),
                    None => Err(format!("{} unreachable", to.name)),
                };
                self.nodes[i]
                    .core
                    .handle_peer_reply(self.now, &to, request_id, reply);
                self.nodes[i].drain(self.now);
            }
        }
    }

    /// Node `n` serves a peer request from node `from` (through the bytes, as on the wire).
    fn serve_peer(&mut self, n: usize, from: usize, request_id: u64, message: Message) -> Message {
        let frame = Frame {
            request_id,
            message,
        }
        .to_bytes();
        let node = &mut self.nodes[n];
        let conn = ConnId(1000 + from as u64);
        let body = Bytes::from(frame).slice(4..);
        node.core
            .handle_frame(self.now, conn, Some(Role::Node), body);
        node.drain(self.now);
        let at = node
            .replies
            .iter()
            .position(|(id, _)| *id == request_id)
            .expect("answered at once");
        let reply = node.replies.remove(at).1;
        // Through the wire's decoder, as the peer client does.
        Frame::decode(
            &Frame {
                request_id,
                message: reply,
            }
            .to_bytes(),
        )
        .unwrap()
        .message
    }

    /// Ticks until `done` holds, failing with `what` after a generous virtual deadline.
    fn run_until(&mut self, what: &str, mut done: impl FnMut(&Self) -> bool) {
        for _ in 0..2000 {
            if done(self) {
                return;
            }
            self.tick(Duration::from_millis(50));
        }
        let scls: Vec<Lsn> = (0..NODES).map(|i| self.scl(i)).collect();
        panic!("{what}: not reached after 100 virtual seconds (SCLs {scls:?})");
    }
}

/// The chain 1, 2, …, n (each record's backlink is the one before).
fn chain(lsns: std::ops::RangeInclusive<u64>) -> Vec<LogRecord> {
    lsns.map(|l| record(l, l - 1)).collect()
}

/// Goal: a segment that missed records (a hole, and a tail) gets them from its peers without
/// the engine, keeps them across a restart, and reports no hole afterwards.
/// Method: nodes 2 and 3 get the chain 1..=40; node 1 gets 1..=5 and 12..=15 only. Tick the
/// virtual clock until node 1's SCL is 40; restart node 1 from its in-memory journal.
#[test]
fn a_segment_behind_catches_up_from_its_peers() {
    let mut c = Cluster::new();
    for i in [1, 2] {
        c.append(i, 1, chain(1..=40));
    }
    c.append(0, 1, chain(1..=5));
    c.append(0, 1, chain(12..=15));
    assert_eq!(c.scl(0), Lsn(5));
    let gaps = c.nodes[0].core.gaps(&key(0));
    assert_eq!(gaps.len(), 1);
    assert_eq!((gaps[0].after, gaps[0].through), (Lsn(5), Lsn(11)));
    c.run_until("node1 catches up", |c| c.scl(0) == Lsn(40));
    assert!(c.nodes[0].core.gaps(&key(0)).is_empty());
    let floor = c.nodes[0].core.peer_scl_floor(&key(0), c.now);
    assert_eq!(floor, Some(Lsn(40)), "both live peers are at 40");

    // The fetched records are in the journal: a restart finds them.
    let old = &c.nodes[0];
    let restarted = Mem::new(
        0,
        old.manifest.clone(),
        old.durable.clone(),
        old.files.clone(),
        c.now,
    );
    assert_eq!(restarted.core.scl(&key(0)), Some(Lsn(40)));
    assert_eq!(
        restarted.manifest.placement.len(),
        6,
        "the placement is durable"
    );
}

/// Goal: gossip never copies across epochs, and never copies what a truncation annulled.
/// Method: (a) node 2 alone moves to epoch 2 holding more than node 1: node 1 (epoch 1) stays
/// behind while it is the only one ahead. (b) All at epoch 2; node 1 has the truncation
/// (5, 100] annulling epoch 1, nodes 2 and 3 do not yet and still hold 6..=40 of epoch 1:
/// node 1 must not take them.
#[test]
fn gossip_stays_within_its_epoch_and_outside_truncations() {
    let mut c = Cluster::new();
    for i in 0..NODES {
        c.append(i, 1, chain(1..=5));
    }
    c.append(1, 1, chain(6..=40));
    let fence = |from, to| {
        Message::Fence(Fence {
            volume: V,
            epoch_current: Epoch(from),
            epoch_new: Epoch(to),
        })
    };
    assert!(matches!(c.request(1, fence(1, 2)), Message::VolumeState(_)));
    for _ in 0..100 {
        c.tick(Duration::from_millis(50));
    }
    assert_eq!(c.scl(0), Lsn(5), "no copy from a peer at another epoch");

    c.append(2, 1, chain(6..=40));
    for i in [0, 2] {
        assert!(matches!(c.request(i, fence(1, 2)), Message::VolumeState(_)));
    }
    let truncate = Truncate {
        volume: V,
        epoch: Epoch(2),
        range: TruncationRange {
            annul_epoch: Epoch(2),
            after: Lsn(5),
            through: Lsn(100),
        },
    };
    assert!(matches!(
        c.request(0, Message::Truncate(truncate)),
        Message::VolumeState(_)
    ));
    for _ in 0..100 {
        c.tick(Duration::from_millis(50));
    }
    assert_eq!(c.scl(0), Lsn(5), "annulled records are never copied");
}

/// Goal: a copied record keeps the epoch it was written with, so a truncation that reaches
/// the copier later annuls the copy as it annuls the original.
/// Method: nodes 2 and 3 hold 1..=40 of epoch 1, node 1 holds 1..=5; all fenced to epoch 2
/// (no truncation yet). Node 1 catches up to 40 through gossip; then the truncation (10, 100]
/// of epoch 2 arrives at node 1: its SCL must fall back to 10.
#[test]
fn copies_keep_their_original_epoch() {
    let mut c = Cluster::new();
    for i in [1, 2] {
        c.append(i, 1, chain(1..=40));
    }
    c.append(0, 1, chain(1..=5));
    for i in 0..NODES {
        let fence = Fence {
            volume: V,
            epoch_current: Epoch(1),
            epoch_new: Epoch(2),
        };
        assert!(matches!(
            c.request(i, Message::Fence(fence)),
            Message::VolumeState(_)
        ));
    }
    c.run_until("node1 catches up at epoch 2", |c| c.scl(0) == Lsn(40));
    let truncate = Truncate {
        volume: V,
        epoch: Epoch(2),
        range: TruncationRange {
            annul_epoch: Epoch(2),
            after: Lsn(10),
            through: Lsn(100),
        },
    };
    assert!(matches!(
        c.request(0, Message::Truncate(truncate)),
        Message::VolumeState(_)
    ));
    assert_eq!(
        c.scl(0),
        Lsn(10),
        "the copies were of epoch 1, and are annulled"
    );
}

/// Goal: a peer that cannot serve (here: it moved to another epoch, so it refuses fetches at
/// ours and is not asked) is passed over for one that can.
/// Method: nodes 2 and 3 hold 1..=40, node 1 holds 1..=5; node 2 is fenced to epoch 3. Node 1
/// must still reach 40, from node 3.
#[test]
fn a_peer_that_cannot_serve_is_passed_over() {
    let mut c = Cluster::new();
    for i in [1, 2] {
        c.append(i, 1, chain(1..=40));
    }
    c.append(0, 1, chain(1..=5));
    // Node 2 moves on to epoch 3: every FetchRecords at epoch 1 is refused by it.
    let fence = Fence {
        volume: V,
        epoch_current: Epoch(1),
        epoch_new: Epoch(3),
    };
    assert!(matches!(
        c.request(1, Message::Fence(fence)),
        Message::VolumeState(_)
    ));
    c.run_until("node1 catches up from node3", |c| c.scl(0) == Lsn(40));
}

/// Goal: a peer that refuses a range (as one that compacted it below its chain's base will)
/// is passed over for another; when every peer refuses, the segment stays behind (and the
/// node warns once) without hammering its peers.
/// Method: node 2 refuses every fetch, node 3 serves: node 1 reaches 40. Then both refuse:
/// node 1 (missing 41..=60 now) stays at 40, and sends few fetches over 20 virtual seconds.
#[test]
fn a_refusing_peer_is_passed_over_and_no_peer_means_a_warning() {
    let mut c = Cluster::new();
    for i in [1, 2] {
        c.append(i, 1, chain(1..=40));
    }
    c.append(0, 1, chain(1..=5));
    c.compacted = vec![1];
    c.run_until("node1 catches up from node3", |c| c.scl(0) == Lsn(40));

    for i in [1, 2] {
        c.append(i, 1, chain(41..=60));
    }
    c.compacted = vec![1, 2];
    let before = c.nodes[0].core.gossip_stats();
    for _ in 0..400 {
        c.tick(Duration::from_millis(50));
    }
    assert_eq!(c.scl(0), Lsn(40), "nobody could serve 41..=60");
    let after = c.nodes[0].core.gossip_stats();
    // Polls: 5 peers every 100 ms (±25 %) for 20 s is about 1000 requests; fetches are held
    // back by the refusal TTL (5 s): a handful per peer.
    let fetches = after.fetches - before.fetches;
    assert!(fetches >= 2, "both peers were asked");
    assert!(
        fetches <= 20,
        "{fetches} fetches in 20 s: refusals are not held back"
    );
}
