//! `VolumeCore`: the writer's whole protocol as a pure state machine, after quinn-proto
//! ("fully deterministic … contains no networking code and does not get any relevant
//! timestamps from the operating system"). It owns LSN allocation under LAL (through
//! [`Writer`]), per-PG batches encoded once for their six segments, retained records and
//! catch-up, each segment's SCL, PGCL/VCL/VDL, commit waiters, read points and PGMRPL, the
//! hedge decision, fencing and crash recovery. A driver (the tokio/quinn one in
//! [`crate::driver`], or the simulator) feeds it events with the time passed in
//! (`handle_reply(now, …)`, `handle_timeout(now)`) and carries out what it hands back
//! (`poll_transmit`, `poll_completion`, `poll_timeout`).
//!
//! Invariants:
//! - no clock, no I/O, no randomness, no hash-ordered iteration: the same inputs give the
//!   same outputs in the same order (the epoch tag,
//!   the only random choice, comes in through [`CoreConfig::epoch_tag`]);
//! - a commit completes `Ok` only once VDL ≥ its LSN; VDL comes from the writer, which counts
//!   only acks carrying a segment's durable SCL at this core's epoch;
//! - nothing is written before recovery has fenced a read quorum of every PG, rebuilt a write
//!   quorum to the recovered VDL and recorded the truncation on a write quorum of every PG;
//! - once a node answers `StaleEpoch` the core is fenced for good: every waiting commit and
//!   read fails with [`VolumeError::Fenced`] and nothing is ever sent again;
//! - every request carries a deadline: a reply that does not come in time counts as a
//!   failure of its node, so nothing waits forever;
//! - memory is bounded: retained records by `retained_bytes_max` (writers see back-pressure),
//!   each node's queue by [`NODE_QUEUE_BYTES_MAX`] (past it the node is treated as down and
//!   caught up from the retained records once it answers again).
#![deny(clippy::disallowed_methods)]

mod links;
mod reads;
mod recovery;

use std::collections::{BTreeMap, BTreeSet, HashMap, VecDeque};
use std::time::{Duration, Instant};

use bytes::Bytes;
use wire::{
    AppendHeader, Epoch, Geometry, Lsn, Message, PG_SIZE, PageId, PageImage, PgId, SegmentIndex,
    VolumeId,
};

use crate::cache::BufferCache;
use crate::quorum::{MtrRecord, Writer, WriterError};

use links::Link;
pub use links::NODE_QUEUE_BYTES_MAX;
use reads::ReadState;
use recovery::Recovery;

/// Index of a node in the volume file's node list.
pub type NodeIndex = usize;

/// Tuning of a volume core.
#[derive(Clone, Debug)]
pub struct CoreConfig {
    pub lal: u64,
    /// How long a read waits for its segment before asking a second one too.
    pub hedge_delay: Duration,
    pub cache_capacity_bytes: usize,
    /// Append rounds in flight per node; more batches wait and are merged.
    pub node_inflight_appends: usize,
    pub pgmrpl_interval: Duration,
    /// How often unreachable nodes are probed and unanswered recovery requests resent.
    pub reconnect_interval: Duration,
    /// Deadline of every request.
    pub request_timeout: Duration,
    /// Bytes of records kept for catch-up (not yet complete in their PG) before writers wait.
    pub retained_bytes_max: usize,
    /// Non-zero random tag of the epoch this writer proposes (see [`Epoch::next`]).
    pub epoch_tag: u32,
    /// A bug the simulator plants to prove its checkers catch it.
    #[cfg(feature = "planted-bugs")]
    pub planted_bug: Option<PlantedBug>,
}

/// Bugs the simulator can plant in the writer (only with the feature `planted-bugs`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum PlantedBug {
    /// A PG counts as complete once 3 segments (not 4) hold a record.
    WriteQuorumOfThree,
    /// Recovery serves without recording its truncation on the nodes.
    RecoverySkipsTruncation,
}

impl Default for CoreConfig {
    fn default() -> Self {
        Self {
            lal: crate::quorum::LSN_ALLOCATION_LIMIT,
            hedge_delay: Duration::from_millis(20),
            cache_capacity_bytes: 64 << 20,
            node_inflight_appends: 2,
            pgmrpl_interval: Duration::from_millis(500),
            reconnect_interval: Duration::from_millis(200),
            request_timeout: Duration::from_secs(5),
            retained_bytes_max: 256 << 20,
            epoch_tag: 1,
            #[cfg(feature = "planted-bugs")]
            planted_bug: None,
        }
    }
}

/// What the core needs of the volume file: ids, geometry and placement.
#[derive(Clone, Debug)]
pub struct VolumeLayout {
    pub volume: VolumeId,
    /// The epoch the volume file names (the volume's first epoch).
    pub epoch: Epoch,
    pub geometry: Geometry,
    /// `placement[pg][segment]` is the index of the node hosting that segment.
    pub placement: Vec<[NodeIndex; PG_SIZE]>,
    /// Node names, for messages.
    pub node_names: Vec<String>,
}

/// Why a write, commit or read did not happen.
#[derive(Debug, Clone, thiserror::Error, PartialEq, Eq)]
pub enum VolumeError {
    #[error(transparent)]
    Writer(#[from] WriterError),
    /// A node saw a newer epoch: another writer took the volume over. Nothing more will
    /// commit through this writer.
    #[error("the volume was taken over by another writer: {0}")]
    Fenced(String),
    /// The writer cannot serve this volume (e.g. the volume file does not match the nodes).
    #[error("the volume cannot be opened: {0}")]
    Failed(String),
    /// Recovery has not finished yet.
    #[error("the volume is still recovering: {0}")]
    Recovering(String),
    /// The volume client was dropped before the request resolved.
    #[error("the volume client shut down")]
    ShutDown,
    /// A read found no segment able to serve it.
    #[error("read failed: {0}")]
    Read(String),
}

impl VolumeError {
    #[must_use]
    pub fn is_fenced(&self) -> bool {
        matches!(self, VolumeError::Fenced(_))
    }
}

/// Where the writer stands.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Phase {
    /// Recovering; the string says what it waits for.
    Recovering(String),
    Serving,
    Fenced(String),
    Failed(String),
}

/// A commit waiting for VDL to pass its LSN.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct CommitId(pub u64);

/// A read in progress.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct ReadId(pub u64);

/// What to send: a message, or an Append whose records were encoded once for all six
/// segments (the driver frames the header and the chunks, see `wire::frame::encode_append_frame`).
#[derive(Clone, Debug)]
pub enum Payload {
    Message(Message),
    Append {
        header: AppendHeader,
        records: Vec<Bytes>,
    },
}

impl Payload {
    /// Bytes of the whole encoded frame.
    #[must_use]
    pub fn frame_len(&self) -> usize {
        match self {
            Payload::Message(message) => message.frame_len(),
            Payload::Append { records, .. } => {
                wire::frame::LEN_PREFIX_BYTES
                    + wire::frame::FRAME_HEADER_BYTES
                    + wire::frame::APPEND_HEADER_BYTES
                    + records.iter().map(Bytes::len).sum::<usize>()
            }
        }
    }

    /// The whole encoded frame.
    #[must_use]
    pub fn encode(&self, request_id: u64) -> Vec<u8> {
        match self {
            Payload::Message(message) => wire::Frame {
                request_id,
                message: message.clone(),
            }
            .to_bytes(),
            Payload::Append { header, records } => {
                let mut out = Vec::with_capacity(self.frame_len());
                let joined: Vec<u8> = if records.len() == 1 {
                    Vec::new()
                } else {
                    records.concat()
                };
                let records = if records.len() == 1 {
                    &records[0][..]
                } else {
                    &joined[..]
                };
                wire::frame::encode_append_frame(request_id, header, records, &mut out);
                out
            }
        }
    }
}

/// A request for the driver to send to a node; its reply goes back through
/// [`VolumeCore::handle_reply`] with the same `request_id`.
#[derive(Clone, Debug)]
pub struct Transmit {
    pub node: NodeIndex,
    pub request_id: u64,
    pub payload: Payload,
}

/// A finished commit or read, for the driver to hand to whoever waits.
#[derive(Debug)]
pub enum Completion {
    Commit {
        id: CommitId,
        result: Result<(), VolumeError>,
    },
    Read {
        id: ReadId,
        result: Result<PageImage, VolumeError>,
    },
}

/// How a read started.
#[derive(Debug)]
pub enum ReadStart {
    /// Served at once (from the buffer cache) or refused.
    Done(Result<PageImage, VolumeError>),
    /// Its completion comes later.
    Pending(ReadId),
}

/// Counters a benchmark reads.
#[derive(Clone, Debug, Default)]
pub struct CoreStats {
    pub messages_sent: u64,
    pub bytes_sent: u64,
    pub appends_sent: u64,
    pub redo_bytes_sent: u64,
    /// Page images sent by the engine: always 0, by design.
    pub page_bytes_sent: u64,
    pub reads_hedged: u64,
    /// SetPgmrpl messages sent (one per node of a PG whose floor rose).
    pub pgmrpl_sent: u64,
}

/// What an outstanding request is for.
#[derive(Clone, Debug)]
enum RequestKind {
    Append {
        pg: PgId,
        segment: SegmentIndex,
        round: u64,
        first_backlink: Lsn,
    },
    Read {
        read: ReadId,
        segment: SegmentIndex,
    },
    Probe,
    Truncate,
    Pgmrpl,
    Recovery(recovery::RecoveryRequest),
}

#[derive(Clone, Debug)]
struct Pending {
    node: NodeIndex,
    deadline: Instant,
    kind: RequestKind,
}

/// Pages written recently: page → last LSN allocated for it, for LSNs above VDL only.
#[derive(Default, Debug)]
struct RecentWrites {
    last: HashMap<PageId, Lsn>,
    order: VecDeque<(Lsn, PageId)>,
}

impl RecentWrites {
    fn note(&mut self, page: PageId, lsn: Lsn) {
        self.last.insert(page, lsn);
        self.order.push_back((lsn, page));
    }

    fn prune(&mut self, vdl: Lsn) {
        while let Some(&(lsn, page)) = self.order.front() {
            if lsn > vdl {
                break;
            }
            self.order.pop_front();
            if self.last.get(&page) == Some(&lsn) {
                self.last.remove(&page);
            }
        }
    }

    fn written_after(&self, page: PageId, lsn: Lsn) -> bool {
        self.last.get(&page).is_some_and(|last| *last > lsn)
    }
}

/// The writer's state once recovery is done.
#[derive(Debug)]
struct Serving {
    writer: Writer,
    /// Per PG, records not yet on all six segments, encoded, for catch-up (see `links`).
    retained: Vec<BTreeMap<Lsn, Bytes>>,
    retained_bytes: usize,
    recent_writes: RecentWrites,
    cache: BufferCache,
    pgmrpl_sent: Vec<Lsn>,
    /// Per PG, the LSNs of its records from the highest one at or below the PGMRPL floor up,
    /// to turn a volume read point into the PG's own.
    pg_lsns: Vec<VecDeque<Lsn>>,
    /// Every truncation a node must have installed before it takes this epoch's appends,
    /// this writer's own last.
    truncations: Vec<wire::TruncationRange>,
}

impl Serving {
    /// Lets go of `pg`'s retained records at or below `through`.
    fn release_retained(&mut self, pg: PgId, through: Lsn) {
        let retained = &mut self.retained[pg.0 as usize];
        let mut freed = 0;
        while let Some(entry) = retained.first_entry().filter(|e| *e.key() <= through) {
            freed += entry.remove().len();
        }
        assert!(freed <= self.retained_bytes);
        self.retained_bytes -= freed;
    }
}

/// The writer of one volume. See the module docs.
pub struct VolumeCore {
    layout: VolumeLayout,
    config: CoreConfig,
    epoch: Epoch,
    phase: Phase,
    recovery: Option<Recovery>,
    /// Times recovery started over on finding a newer epoch.
    recovery_restarts: u32,
    serving: Option<Serving>,
    links: Vec<Link>,
    requests: BTreeMap<u64, Pending>,
    deadlines: BTreeSet<(Instant, u64)>,
    next_request_id: u64,
    next_round: u64,
    rounds: BTreeMap<u64, (NodeIndex, usize)>,
    commits: BTreeMap<Lsn, Vec<CommitId>>,
    next_commit: u64,
    reads: BTreeMap<ReadId, ReadState>,
    next_read: u64,
    /// Outstanding read points (with multiplicity).
    read_points: BTreeMap<Lsn, usize>,
    read_rotation: usize,
    next_pgmrpl: Instant,
    transmits: VecDeque<Transmit>,
    completions: VecDeque<Completion>,
    stats: CoreStats,
}

impl VolumeCore {
    /// A writer for the volume of `layout`; it starts by recovering the volume (a fresh volume
    /// recovers to VDL 0).
    ///
    /// # Panics
    /// If the layout is inconsistent (a configuration bug: the volume file checks it first).
    #[must_use]
    pub fn new(layout: VolumeLayout, config: CoreConfig, now: Instant) -> Self {
        assert!(layout.geometry.is_valid(), "unusable geometry");
        assert_eq!(layout.placement.len(), layout.geometry.pg_count as usize);
        assert!(config.epoch_tag != 0, "epoch tags are non-zero");
        assert!(config.node_inflight_appends >= 1);
        let node_count = layout.node_names.len();
        assert!(
            layout
                .placement
                .iter()
                .all(|pg| pg.iter().all(|n| *n < node_count))
        );
        let mut core = Self {
            epoch: layout.epoch,
            phase: Phase::Recovering("starting".into()),
            recovery: None,
            recovery_restarts: 0,
            serving: None,
            links: (0..node_count).map(|_| Link::new()).collect(),
            requests: BTreeMap::new(),
            deadlines: BTreeSet::new(),
            next_request_id: 1,
            next_round: 1,
            rounds: BTreeMap::new(),
            commits: BTreeMap::new(),
            next_commit: 1,
            reads: BTreeMap::new(),
            next_read: 1,
            read_points: BTreeMap::new(),
            read_rotation: 0,
            next_pgmrpl: now + config.pgmrpl_interval,
            transmits: VecDeque::new(),
            completions: VecDeque::new(),
            stats: CoreStats::default(),
            layout,
            config,
        };
        core.recovery_start(now);
        core
    }

    #[must_use]
    pub fn phase(&self) -> &Phase {
        &self.phase
    }

    #[must_use]
    pub fn layout(&self) -> &VolumeLayout {
        &self.layout
    }

    /// The epoch this writer sends with its requests.
    #[must_use]
    pub fn epoch(&self) -> Epoch {
        self.epoch
    }

    #[must_use]
    pub fn stats(&self) -> &CoreStats {
        &self.stats
    }

    /// Volume durable LSN (0 until recovery is done).
    #[must_use]
    pub fn vdl(&self) -> Lsn {
        self.serving.as_ref().map_or(Lsn::ZERO, |s| s.writer.vdl())
    }

    /// The SCL the writer knows for a segment (from acks; 0 until recovery is done).
    #[must_use]
    pub fn segment_scl(&self, pg: PgId, segment: SegmentIndex) -> Lsn {
        self.serving
            .as_ref()
            .map_or(Lsn::ZERO, |s| s.writer.segment_scl(pg, segment))
    }

    /// A one-paragraph dump of the writer's state, for simulator traces and debugging.
    #[must_use]
    pub fn debug_state(&self) -> String {
        let mut out = format!("phase {:?}; epoch {:#x}; ", self.phase, self.epoch.0);
        out += &self.recovery_debug();
        if let Some(serving) = &self.serving {
            let w = &serving.writer;
            out += &format!(
                "VDL {} VCL {} next LSN {}; ",
                w.vdl(),
                w.vcl(),
                w.next_lsn()
            );
            for pg in 0..self.layout.geometry.pg_count {
                let pg = PgId(pg);
                let scl: Vec<u64> = (0..PG_SIZE as u32)
                    .map(|s| w.segment_scl(pg, SegmentIndex(s)).0)
                    .collect();
                out += &format!("pg {pg} PGCL {} SCLs {scl:?}; ", w.pgcl(pg));
            }
            out += &format!("retained {} bytes; ", serving.retained_bytes);
        }
        for (node, link) in self.links.iter().enumerate() {
            out += &format!("{}: {link:?}; ", self.layout.node_names[node]);
        }
        out += &format!(
            "{} commits waiting, {} requests out",
            self.commits.values().map(Vec::len).sum::<usize>(),
            self.requests.len()
        );
        out
    }

    /// Whether a node answered its last request (links go down on a failure or timeout).
    #[must_use]
    pub fn node_up(&self, node: NodeIndex) -> bool {
        self.links.get(node).is_some_and(|l| l.up)
    }

    fn check_usable(&self) -> Result<(), VolumeError> {
        match &self.phase {
            Phase::Serving => Ok(()),
            Phase::Recovering(why) => Err(VolumeError::Recovering(why.clone())),
            Phase::Fenced(why) => Err(VolumeError::Fenced(why.clone())),
            Phase::Failed(why) => Err(VolumeError::Failed(why.clone())),
        }
    }

    /// Whether an MTR of `record_count` records would be allocated now (LAL and the retained
    /// bytes bound); hopeless MTRs (empty, larger than LAL) report true so they get their
    /// error from [`Self::write_mtr`] instead of a wait.
    #[must_use]
    pub fn can_write(&self, record_count: u64) -> bool {
        let Some(serving) = &self.serving else {
            return !matches!(self.phase, Phase::Recovering(_));
        };
        if self.phase != Phase::Serving {
            return true;
        }
        let hopeless = record_count == 0 || record_count > serving.writer.lal();
        let room = serving.retained_bytes <= self.config.retained_bytes_max;
        hopeless || (room && serving.writer.can_allocate(record_count))
    }

    /// Allocates an MTR, queues its batches to the six segments of each PG it touches and
    /// returns its CPL, without waiting for durability: pass it to [`Self::commit`].
    ///
    /// # Errors
    /// The writer's refusals (back-pressure included: retry once VDL moves), or the phase.
    pub fn write_mtr(&mut self, now: Instant, records: Vec<MtrRecord>) -> Result<Lsn, VolumeError> {
        self.check_usable()?;
        let serving = self.serving.as_mut().expect("serving phase has state");
        if serving.retained_bytes > self.config.retained_bytes_max && !records.is_empty() {
            return Err(VolumeError::Writer(WriterError::Backpressure {
                lsn_last: serving.writer.next_lsn(),
                lsn_limit: serving.writer.vdl(),
            }));
        }
        let mtr = serving.writer.allocate_mtr(records)?;
        assert!(mtr.cpl > serving.writer.vdl());
        self.dispatch(mtr.batches);
        self.pump_links(now);
        Ok(mtr.cpl)
    }

    /// Completes once VDL ≥ `lsn`: at once (`Some`) if it already is or the writer cannot
    /// serve, else later through [`Completion::Commit`] with the returned id.
    pub fn commit(&mut self, lsn: Lsn) -> Result<Option<CommitId>, VolumeError> {
        self.check_usable()?;
        if self.vdl() >= lsn {
            return Ok(None);
        }
        let id = CommitId(self.next_commit);
        self.next_commit += 1;
        self.commits.entry(lsn).or_default().push(id);
        assert!(self.commits.keys().next().is_some_and(|k| *k > self.vdl()));
        Ok(Some(id))
    }

    /// A reply (or a transport failure) for request `request_id` sent to `node`.
    pub fn handle_reply(
        &mut self,
        now: Instant,
        node: NodeIndex,
        request_id: u64,
        reply: Result<Message, String>,
    ) {
        let Some(pending) = self.requests.remove(&request_id) else {
            return; // Timed out already, or a reply to nothing: ignore.
        };
        assert!(self.deadlines.remove(&(pending.deadline, request_id)));
        if pending.node != node {
            tracing::warn!("reply to request {request_id} came from the wrong node");
        }
        let node = pending.node;
        if let Ok(Message::Error(e)) = &reply
            && e.code == wire::ErrorCode::StaleEpoch
        {
            if matches!(pending.kind, RequestKind::Recovery(_)) && self.recovery_restart(now) {
                return;
            }
            let name = &self.layout.node_names[node];
            self.fence(format!(
                "node {name} refused epoch {}: {}",
                self.epoch, e.message
            ));
            return;
        }
        match pending.kind {
            RequestKind::Append {
                pg,
                segment,
                round,
                first_backlink,
            } => {
                self.on_append_reply(now, node, (pg, segment, first_backlink), reply);
                self.finish_round(now, round);
            }
            RequestKind::Read { read, segment } => self.on_read_reply(now, read, segment, reply),
            RequestKind::Probe => self.on_probe_reply(now, node, reply),
            RequestKind::Truncate => self.on_truncate_reply(now, node, reply),
            RequestKind::Pgmrpl => {}
            RequestKind::Recovery(request) => self.on_recovery_reply(now, node, request, reply),
        }
        self.pump_links(now);
    }

    /// Expires requests past their deadline and runs every timer that is due.
    pub fn handle_timeout(&mut self, now: Instant) {
        while let Some(&(deadline, request_id)) = self.deadlines.first() {
            if deadline > now {
                break;
            }
            let node = self.requests.get(&request_id).map(|p| p.node);
            let node = node.expect("every deadline has its request");
            self.handle_reply(
                now,
                node,
                request_id,
                Err("no reply before the deadline".into()),
            );
        }
        if self.recovery.is_some() {
            self.recovery_timeout(now);
        }
        self.reads_timeout(now);
        if self.phase == Phase::Serving {
            self.links_timeout(now);
            if now >= self.next_pgmrpl {
                self.next_pgmrpl = now + self.config.pgmrpl_interval;
                self.publish_pgmrpl(now);
            }
        }
        self.pump_links(now);
    }

    /// The next request to send.
    pub fn poll_transmit(&mut self) -> Option<Transmit> {
        self.transmits.pop_front()
    }

    /// The next finished commit or read.
    pub fn poll_completion(&mut self) -> Option<Completion> {
        self.completions.pop_front()
    }

    /// When [`Self::handle_timeout`] should be called next.
    #[must_use]
    pub fn poll_timeout(&self) -> Option<Instant> {
        let mut next = self.deadlines.first().map(|(d, _)| *d);
        let mut consider = |t: Option<Instant>| {
            if let Some(t) = t {
                next = Some(next.map_or(t, |n| n.min(t)));
            }
        };
        consider(self.recovery.as_ref().map(Recovery::next_timer));
        consider(self.reads.values().filter_map(ReadState::next_timer).min());
        if self.phase == Phase::Serving {
            consider(Some(self.next_pgmrpl));
            consider(self.links.iter().filter_map(Link::next_timer).min());
        }
        next
    }

    /// Registers a request and queues it for the driver.
    fn send(&mut self, now: Instant, node: NodeIndex, kind: RequestKind, payload: Payload) -> u64 {
        assert!(node < self.links.len());
        assert!(
            !matches!(self.phase, Phase::Fenced(_)),
            "a fenced writer sends nothing"
        );
        let request_id = self.next_request_id;
        self.next_request_id += 1;
        let deadline = now + self.config.request_timeout;
        self.requests.insert(
            request_id,
            Pending {
                node,
                deadline,
                kind,
            },
        );
        self.deadlines.insert((deadline, request_id));
        self.stats.messages_sent += 1;
        self.stats.bytes_sent += payload.frame_len() as u64;
        self.transmits.push_back(Transmit {
            node,
            request_id,
            payload,
        });
        request_id
    }

    /// Marks the writer fenced (once): every waiting commit and read fails, queues empty, and
    /// nothing is sent again.
    fn fence(&mut self, reason: String) {
        if matches!(self.phase, Phase::Fenced(_)) {
            return;
        }
        tracing::error!("writer fenced: {reason}");
        self.fail_everything(&VolumeError::Fenced(reason.clone()));
        self.phase = Phase::Fenced(reason);
    }

    /// Whether the simulator planted `bug` (always false without the `planted-bugs` feature).
    #[allow(unused_variables, clippy::unused_self)]
    fn planted(&self, bug: PlantedBug) -> bool {
        #[cfg(feature = "planted-bugs")]
        if self.config.planted_bug == Some(bug) {
            return true;
        }
        false
    }

    /// Fails every waiting commit and read with `error` and drops everything queued.
    fn fail_everything(&mut self, error: &VolumeError) {
        self.recovery = None;
        for id in std::mem::take(&mut self.commits).into_values().flatten() {
            self.completions.push_back(Completion::Commit {
                id,
                result: Err(error.clone()),
            });
        }
        let reads: Vec<ReadId> = self.reads.keys().copied().collect();
        for read in reads {
            self.complete_read(read, Err(error.clone()));
        }
        for link in &mut self.links {
            link.clear();
        }
        self.transmits.clear();
        self.requests.clear();
        self.deadlines.clear();
        self.rounds.clear();
    }

    /// Completes the commits VDL has passed.
    fn on_vdl_advanced(&mut self) {
        let vdl = self.vdl();
        let still_waiting = self.commits.split_off(&Lsn(vdl.0.saturating_add(1)));
        for id in std::mem::replace(&mut self.commits, still_waiting)
            .into_values()
            .flatten()
        {
            self.completions
                .push_back(Completion::Commit { id, result: Ok(()) });
        }
        assert!(self.commits.keys().next().is_none_or(|k| *k > vdl));
        let serving = self.serving.as_mut().expect("VDL moves only while serving");
        // A read in flight may still insert its page: keep the writes after its read point.
        let oldest_read = self.read_points.keys().next().copied().unwrap_or(vdl);
        serving.recent_writes.prune(vdl.min(oldest_read));
        serving.cache.evict_to_capacity(vdl);
    }
}
