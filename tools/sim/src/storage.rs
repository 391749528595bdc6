//! The storage side of the simulation, behind [`StorageNode`]: a node takes request frames,
//! persists on a simulated disk whose writes become durable only after a delay, and answers.
//! A crash loses everything not yet durable.
//!
//! [`ModelNode`] is a compact model of the node protocol (epochs, fencing, epoch-tagged
//! truncations, SCL from backlinks, fetch, reads). It is the scaffold the simulator was built
//! on while the node's own pure core was being written, and stays as a reference model.

use std::collections::{BTreeMap, VecDeque};
use std::time::{Duration, Instant};

use wire::{
    Append, Epoch, ErrorCode, ErrorReply, Frame, LogRecord, Lsn, Message, PageImage, PageReply,
    PgId, Records, SegmentAck, SegmentIndex, SegmentState, TruncationRange, VolumeId, VolumeState,
};

use crate::rng::Rng;

/// Which simulated writer a message belongs to.
pub type WriterId = usize;

/// A reply on its way back to a writer.
#[derive(Debug)]
pub struct Outgoing {
    pub to: WriterId,
    pub request_id: u64,
    pub message: Message,
}

/// Connection ids at or above this carry requests from peer nodes (gossip): the id less this
/// base is the asking node's index. Replies to them go back to that node, not to a writer.
pub const PEER_CONN_BASE: usize = 1 << 20;

/// A storage node as the simulator drives it.
pub trait StorageNode {
    /// A request frame (length prefix included) from writer `from`.
    fn deliver(&mut self, now: Instant, from: WriterId, frame: &[u8], rng: &mut Rng);
    /// Completes whatever disk work is due by `now`.
    fn advance(&mut self, now: Instant);
    /// When `advance` has something to do next.
    fn next_event(&self) -> Option<Instant>;
    /// Replies ready to go.
    fn take_replies(&mut self) -> Vec<Outgoing>;
    /// A crash: everything not yet durable is lost.
    fn crash(&mut self, rng: &mut Rng);
    /// Back after a crash: the node recovers from what is durable.
    fn restart(&mut self);
    /// Flips a bit on a crashed node's disk (only where a disk is simulated).
    fn flip_a_bit(&mut self, _rng: &mut Rng) {}
    /// Flips a bit in a running node's page store or journal (only where a disk is
    /// simulated): scrub must find it and repair it from a peer, and nobody may be served it.
    fn flip_a_live_bit(&mut self, _rng: &mut Rng) {}
    /// Damaged pages and records the node knows of and has not repaired yet.
    fn damage_outstanding(&self) -> usize {
        0
    }
    /// Damaged pages and records repaired since the node last started.
    fn damage_repaired(&self) -> u64 {
        0
    }
    /// Why the node stopped serving, if it did.
    fn stopped(&self) -> Option<&str> {
        None
    }
    /// Planted bug: acknowledge batches before they are durable.
    fn plant_ack_before_durable(&mut self);
    /// Planted bug: never gossip (the SCL convergence checker must notice).
    fn plant_no_gossip(&mut self) {}
    /// Back-pressure for good: every ack waits `delay` (only where the real core runs).
    fn force_throttle(&mut self, _delay: std::time::Duration) {}
    /// A one-line description of the node's state, for traces.
    fn debug(&self) -> String {
        String::new()
    }
    /// Requests this node wants sent to its peers (gossip): (peer name, request id, message).
    fn take_peer_requests(&mut self) -> Vec<(String, u64, Message)> {
        Vec::new()
    }
    /// A request frame (length prefix included) from a peer node, which presents a node
    /// certificate, on connection `conn` (at least `PEER_CONN_BASE`); its reply comes out of
    /// `take_replies` addressed to `conn`.
    fn deliver_from_peer(&mut self, _now: Instant, _conn: usize, _frame: &[u8], _rng: &mut Rng) {}
    /// The reply from peer `peer` to this node's request `request_id`, or why none came.
    fn peer_reply(
        &mut self,
        _now: Instant,
        _peer: &str,
        _request_id: u64,
        _reply: Result<Message, String>,
    ) {
    }
    /// The node's epoch for the volume and each hosted segment's SCL (None: crashed, or a
    /// model that does not gossip).
    fn scls(&self) -> Option<(Epoch, Vec<(PgId, Lsn)>)> {
        None
    }
    /// Acks this node delayed under back-pressure, over all its lives.
    fn acks_throttled(&self) -> u64 {
        0
    }
    /// Records this node's gossip has fetched from peers, over all its lives.
    fn gossip_records(&self) -> u64 {
        0
    }
}

/// One segment's durable records, with the epoch of the Append that brought each.
#[derive(Debug, Default, Clone)]
struct ModelSegment {
    records: BTreeMap<Lsn, (LogRecord, Epoch)>,
}

impl ModelSegment {
    /// The records of the complete backlink chain from the start, in order.
    fn chain(&self) -> Vec<&LogRecord> {
        let mut out = Vec::new();
        let mut cur = Lsn::ZERO;
        for (record, _) in self.records.values() {
            if record.backlink == cur {
                cur = record.lsn;
                out.push(record);
            } else if record.backlink > cur {
                break;
            }
        }
        out
    }

    fn scl(&self) -> Lsn {
        self.chain().last().map_or(Lsn::ZERO, |r| r.lsn)
    }
}

/// A batch waiting for its disk write.
#[derive(Debug)]
struct PendingPersist {
    at: Instant,
    from: WriterId,
    request_id: u64,
    append: Append,
}

/// The reference model of a storage node (see the module docs).
#[derive(Debug)]
pub struct ModelNode {
    volume: VolumeId,
    page_size: usize,
    pages_per_pg: u64,
    epoch: Epoch,
    truncations: Vec<TruncationRange>,
    vdl: Lsn,
    segments: BTreeMap<(PgId, SegmentIndex), ModelSegment>,
    pending: VecDeque<PendingPersist>,
    replies: Vec<Outgoing>,
    /// Mean disk write latency.
    disk_latency: Duration,
    /// Planted bug: acknowledge a batch when it arrives, before it is durable.
    pub ack_before_durable: bool,
    /// Records acknowledged but not yet durable (only with `ack_before_durable`).
    volatile: Vec<((PgId, SegmentIndex), Lsn)>,
}

impl ModelNode {
    pub fn new(
        volume: VolumeId,
        epoch: Epoch,
        page_size: usize,
        pages_per_pg: u64,
        hosted: &[(PgId, SegmentIndex)],
    ) -> Self {
        Self {
            volume,
            page_size,
            pages_per_pg,
            epoch,
            truncations: Vec::new(),
            vdl: Lsn::ZERO,
            segments: hosted
                .iter()
                .map(|k| (*k, ModelSegment::default()))
                .collect(),
            pending: VecDeque::new(),
            replies: Vec::new(),
            disk_latency: Duration::from_micros(300),
            ack_before_durable: false,
            volatile: Vec::new(),
        }
    }

    fn reply(&mut self, to: WriterId, request_id: u64, message: Message) {
        self.replies.push(Outgoing {
            to,
            request_id,
            message,
        });
    }

    fn error(code: ErrorCode, message: String) -> Message {
        Message::Error(ErrorReply::new(code, message))
    }

    fn state(&self) -> VolumeState {
        let skip = self
            .truncations
            .len()
            .saturating_sub(wire::frame::TRUNCATIONS_MAX);
        VolumeState {
            volume: self.volume,
            epoch: self.epoch,
            vdl: self.vdl,
            truncations: self.truncations[skip..].to_vec(),
            segments: self
                .segments
                .iter()
                .map(|((pg, segment), s)| SegmentState {
                    pg: *pg,
                    segment: *segment,
                    scl: s.scl(),
                    backed_up: Lsn::ZERO,
                    snapshot: Lsn::ZERO,
                })
                .collect(),
        }
    }

    /// Older → StaleEpoch, newer → EpochNotInstalled.
    fn check_epoch(&self, epoch: Epoch) -> Result<(), Message> {
        if epoch < self.epoch {
            return Err(Self::error(
                ErrorCode::StaleEpoch,
                format!("epoch {epoch} < {}", self.epoch),
            ));
        }
        if epoch > self.epoch {
            return Err(Self::error(
                ErrorCode::EpochNotInstalled,
                format!("epoch {epoch}"),
            ));
        }
        Ok(())
    }

    fn annul(&mut self, range: TruncationRange) {
        for segment in self.segments.values_mut() {
            segment
                .records
                .retain(|lsn, (_, epoch)| !range.annuls(*lsn, *epoch));
        }
    }

    fn handle(&mut self, now: Instant, message: Message, rng: &mut Rng) -> Option<Message> {
        match message {
            Message::Append(append) => {
                if let Err(e) = self.check_epoch(append.epoch) {
                    return Some(e);
                }
                if !self.segments.contains_key(&(append.pg, append.segment)) {
                    return Some(Self::error(ErrorCode::UnknownSegment, "not hosted".into()));
                }
                if self.ack_before_durable {
                    return Some(self.ack_early(&append));
                }
                let after = self.pending.back().map_or(now, |p| p.at.max(now));
                let jitter = rng.between(0, self.disk_latency.as_micros() as u64 * 2);
                let at = after + Duration::from_micros(jitter);
                self.pending.push_back(PendingPersist {
                    at,
                    from: usize::MAX,
                    request_id: 0,
                    append,
                });
                None
            }
            Message::GetVolumeState(_) => Some(Message::VolumeState(self.state())),
            Message::Fence(f) => Some(self.fence(f)),
            Message::Truncate(t) => Some(self.truncate(t)),
            Message::FetchRecords(f) => Some(self.fetch(&f)),
            Message::ReadPage(r) => Some(self.read(&r)),
            Message::SetPgmrpl(_) => Some(Message::Done),
            _ => Some(Self::error(ErrorCode::BadRequest, "not a request".into())),
        }
    }

    fn fence(&mut self, f: wire::Fence) -> Message {
        if self.epoch == f.epoch_new {
            return Message::VolumeState(self.state());
        }
        if self.epoch > f.epoch_current || f.epoch_new <= self.epoch {
            return Self::error(ErrorCode::StaleEpoch, format!("node epoch {}", self.epoch));
        }
        self.epoch = f.epoch_new;
        Message::VolumeState(self.state())
    }

    fn truncate(&mut self, t: wire::Truncate) -> Message {
        if t.epoch < self.epoch {
            return Self::error(ErrorCode::StaleEpoch, format!("node epoch {}", self.epoch));
        }
        self.epoch = t.epoch;
        if !self.truncations.contains(&t.range) {
            self.truncations.push(t.range);
            self.annul(t.range);
        }
        Message::VolumeState(self.state())
    }

    fn fetch(&self, f: &wire::FetchRecords) -> Message {
        if let Err(e) = self.check_epoch(f.epoch) {
            return e;
        }
        let Some(segment) = self.segments.get(&(f.pg, f.segment)) else {
            return Self::error(ErrorCode::UnknownSegment, "not hosted".into());
        };
        let mut bytes = 0;
        let mut records = Vec::new();
        for record in segment.chain() {
            if record.lsn <= f.after || record.lsn > f.through {
                continue;
            }
            if bytes > f.bytes_max as usize && !records.is_empty() {
                break;
            }
            bytes += record.encoded_len();
            records.push(record.clone());
        }
        let epochs = records
            .iter()
            .map(|r: &LogRecord| segment.records.get(&r.lsn).map_or(self.epoch, |(_, e)| *e))
            .collect();
        Message::Records(Records {
            volume: self.volume,
            pg: f.pg,
            segment: f.segment,
            scl: segment.scl(),
            records,
            epochs,
        })
    }

    fn read(&self, r: &wire::ReadPage) -> Message {
        if let Err(e) = self.check_epoch(r.epoch) {
            return e;
        }
        let Some(segment) = self.segments.get(&(r.pg, r.segment)) else {
            return Self::error(ErrorCode::UnknownSegment, "not hosted".into());
        };
        if r.page.0 / self.pages_per_pg != u64::from(r.pg.0) {
            return Self::error(ErrorCode::BadRequest, "page outside pg".into());
        }
        let chain = segment.chain();
        let scl = chain.last().map_or(Lsn::ZERO, |r| r.lsn);
        if scl < r.read_point {
            return Self::error(ErrorCode::SclBelowReadPoint, format!("SCL {scl}"));
        }
        let mut image = PageImage::zeroed(r.page, self.page_size);
        for record in chain
            .iter()
            .filter(|x| x.page == r.page && x.lsn <= r.read_point)
        {
            if let Err(e) = wire::apply_record(&mut image, record) {
                return Self::error(ErrorCode::Internal, format!("apply: {e}"));
            }
        }
        Message::Page(PageReply {
            page: r.page,
            page_lsn: image.lsn,
            bytes: image.bytes,
        })
    }

    /// The planted bug: index the records now, remember they are not durable, and ack.
    fn ack_early(&mut self, append: &Append) -> Message {
        let key = (append.pg, append.segment);
        let segment = self.segments.get_mut(&key).expect("checked above");
        for record in &append.records {
            if let std::collections::btree_map::Entry::Vacant(slot) =
                segment.records.entry(record.lsn)
            {
                slot.insert((record.clone(), append.epoch));
                self.volatile.push((key, record.lsn));
            }
        }
        Message::Ack(SegmentAck {
            volume: self.volume,
            pg: append.pg,
            segment: append.segment,
            scl: segment.scl(),
        })
    }

    /// A durable batch: index its records (unless annulled) and answer.
    fn persisted(&mut self, p: PendingPersist) {
        let append = p.append;
        self.vdl = self.vdl.max(append.vdl);
        let truncations = self.truncations.clone();
        let segment = self
            .segments
            .get_mut(&(append.pg, append.segment))
            .expect("checked at receipt");
        for record in append.records {
            if truncations
                .iter()
                .any(|t| t.annuls(record.lsn, append.epoch))
            {
                continue;
            }
            segment
                .records
                .entry(record.lsn)
                .or_insert((record, append.epoch));
        }
        let message = if append.epoch == self.epoch {
            Message::Ack(SegmentAck {
                volume: self.volume,
                pg: append.pg,
                segment: append.segment,
                scl: segment.scl(),
            })
        } else {
            Self::error(ErrorCode::StaleEpoch, format!("node epoch {}", self.epoch))
        };
        self.reply(p.from, p.request_id, message);
    }
}

impl StorageNode for ModelNode {
    fn deliver(&mut self, now: Instant, from: WriterId, frame: &[u8], rng: &mut Rng) {
        let frame = match Frame::decode(frame) {
            Ok(frame) => frame,
            Err(e) => {
                let reply = Self::error(ErrorCode::Malformed, e.to_string());
                self.reply(from, 0, reply);
                return;
            }
        };
        if let Some(reply) = self.handle(now, frame.message, rng) {
            self.reply(from, frame.request_id, reply);
        } else if let Some(last) = self.pending.back_mut() {
            last.from = from;
            last.request_id = frame.request_id;
        }
    }

    fn advance(&mut self, now: Instant) {
        while self.pending.front().is_some_and(|p| p.at <= now) {
            let p = self.pending.pop_front().expect("checked");
            self.persisted(p);
        }
    }

    fn next_event(&self) -> Option<Instant> {
        self.pending.front().map(|p| p.at)
    }

    fn take_replies(&mut self) -> Vec<Outgoing> {
        std::mem::take(&mut self.replies)
    }

    fn restart(&mut self) {}

    fn plant_ack_before_durable(&mut self) {
        self.ack_before_durable = true;
    }

    fn crash(&mut self, _rng: &mut Rng) {
        self.pending.clear();
        self.replies.clear();
        for (key, lsn) in std::mem::take(&mut self.volatile) {
            if let Some(segment) = self.segments.get_mut(&key) {
                segment.records.remove(&lsn);
            }
        }
    }
}
