//! Crash recovery (DESIGN.md "Recovery and fencing"; Aurora SIGMOD 2018 §2.4). No redo is
//! replayed, so recovery time depends on the records above the last VDL any node heard of,
//! not on the volume's size. Steps, each retried every `reconnect_interval` for nodes that
//! have not answered, each waiting (and saying which PGs and segments it waits for) rather
//! than guessing:
//!
//! 1. **Query**: learn every node's epoch (a read quorum of every PG must answer; a node that
//!    does not host what the volume file says fails recovery with a message naming it).
//! 2. **Fence**: propose `epoch.next(tag)` carrying the highest epoch seen. A fenced node
//!    refuses the old writer, so once a read quorum of a PG is fenced no new record of that PG
//!    can reach a write quorum: the SCLs in the fence replies cover every record the old writer
//!    ever completed. A node lacking a truncation another node reports gets it forwarded first
//!    (otherwise its SCL could count annulled records). Any `StaleEpoch` fences this writer.
//! 3. **Fetch**: `floor` = the highest VDL any fenced node holds (from Append headers): every
//!    LSN ≤ floor is complete. Per PG, fetch from the segment with the highest SCL the chain
//!    above `min(floor, the 4th-highest SCL)` up to that SCL.
//! 4. **Compute**: LSNs are allocated without gaps, so VCL is the end of the run of LSNs above
//!    `floor` that the fetched chains account for; VDL is the highest CPL ≤ VCL (or `floor`).
//!    Each PG's last record ≤ VDL becomes the next record's backlink.
//! 5. **Copy**: where fewer than `WRITE_QUORUM` fenced segments of a PG hold its last record,
//!    append the missing records (from the fetched chain) to the best-placed others.
//! 6. **Truncate**: record `(VDL, VDL + LAL]`, annulling older epochs, on every node; once a
//!    write quorum of every PG has it, serve, allocating from VDL + 1. (DESIGN.md says new LSNs
//!    start above the range; allocating right after VDL instead keeps LSNs gap-free, which is
//!    what lets step 4 tell a lost record from an unallocated LSN without trusting truncation
//!    ranges that an interrupted recovery may have left on a single node. The range annuls
//!    only records of older epochs, so the new writer's records in it stay valid.)
//!
//! Restarted from scratch (a new writer, a new tag), recovery reaches the same VDL or a
//! higher one: the VDL is a function of the durable records, and a previous recovery's copies
//! only add holders.

use std::collections::{BTreeMap, BTreeSet};
use std::time::Instant;

use bytes::Bytes;
use wire::{
    AppendHeader, Epoch, ErrorCode, Fence, FetchRecords, LogRecord, Lsn, Message, PG_SIZE, PgId,
    READ_QUORUM, Records, SegmentIndex, Truncate, TruncationRange, VolumeState, WRITE_QUORUM,
};

use super::{NodeIndex, Payload, Phase, RecentWrites, RequestKind, Serving, VolumeCore};
use crate::cache::BufferCache;
use crate::quorum::Writer;

/// How many of the newest truncations a node must hold before its SCLs count (well within
/// the `TRUNCATIONS_MAX` a node reports).
const TRUNCATIONS_CHECKED: usize = 32;
const _: () = assert!(TRUNCATIONS_CHECKED < wire::frame::TRUNCATIONS_MAX);

/// How often recovery starts over on finding a newer epoch before it calls itself fenced.
const RECOVERY_RESTARTS_MAX: u32 = 5;

/// Bytes of records fetched or copied per request.
const RECOVERY_CHUNK_BYTES: u32 = 1 << 20;

/// What a recovery request was for.
#[derive(Clone, Debug)]
pub(crate) enum RecoveryRequest {
    Query,
    Fence,
    /// A truncation forwarded to a fenced node that lacked it.
    Repair,
    Fetch {
        pg: PgId,
    },
    Copy {
        pg: PgId,
        segment: SegmentIndex,
        /// The last record of the chunk sent.
        through: Lsn,
    },
    Truncate,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
enum Step {
    Query,
    Fence,
    Fetch,
    Copy,
    Truncate,
}

/// The fetched chains seed the retained records, so segments that lag behind can be caught
/// up once they answer (those below the fetched range wait for gossip).
fn seed_retained(recovery: &Recovery) -> (Vec<BTreeMap<Lsn, Bytes>>, usize) {
    let mut retained = vec![BTreeMap::new(); recovery.pgs.len()];
    let mut retained_bytes = 0;
    for (pg, state) in recovery.pgs.iter().enumerate() {
        for record in state.records.iter().filter(|r| r.lsn <= state.last) {
            let mut encoded = Vec::with_capacity(record.encoded_len());
            record.encode(&mut encoded);
            retained_bytes += encoded.len();
            retained[pg].insert(record.lsn, Bytes::from(encoded));
        }
    }
    assert!(retained.len() == recovery.pgs.len());
    (retained, retained_bytes)
}

/// One PG during recovery.
#[derive(Debug, Default)]
struct PgRecovery {
    /// Fetch sources, highest SCL first.
    sources: Vec<SegmentIndex>,
    source: usize,
    /// The highest SCL of a fenced segment: fetch up to here.
    target: Lsn,
    /// Fetch the chain above this.
    from: Lsn,
    /// The fetched chain, increasing.
    records: Vec<LogRecord>,
    fetched_through: Lsn,
    fetch_done: bool,
    fetch_inflight: bool,
    /// The PG's last record at or below the recovered VDL.
    last: Lsn,
    copy_inflight: [bool; PG_SIZE],
    /// Per segment: the highest LSN re-sent at the new epoch and acknowledged.
    copied_through: [Lsn; PG_SIZE],
    /// The chain below `from`, being fetched for copy targets that lie below it.
    prefix: Option<Prefix>,
    /// A prefix fetch failed: do not try again.
    prefix_failed: bool,
}

/// The chain in `(from, through]`, fetched to go in front of a PG's fetched records.
#[derive(Debug)]
struct Prefix {
    from: Lsn,
    through: Lsn,
    records: Vec<LogRecord>,
    source: usize,
}

impl PgRecovery {
    /// Whether a segment whose SCL is `scl` holds the PG's last record with everything above
    /// `floor` re-sent at the new epoch (or had nothing above the floor to re-send).
    fn copy_done(&self, segment: SegmentIndex, scl: Lsn, floor: Lsn) -> bool {
        let nothing_to_send = !self
            .records
            .iter()
            .any(|r| r.lsn > scl.min(floor) && r.lsn <= self.last);
        let retagged = self.copied_through[segment.0 as usize] >= self.last;
        scl >= self.last && (retagged || nothing_to_send)
    }
}

/// The recovery state machine's data (its transitions are `VolumeCore` methods).
#[derive(Debug)]
pub(super) struct Recovery {
    step: Step,
    epoch_seen: Epoch,
    epoch_new: Epoch,
    /// Per node: a request of the current step is in flight.
    inflight: Vec<bool>,
    /// Per node: its last VolumeState (Query: any; later: fenced at `epoch_new`).
    states: Vec<Option<VolumeState>>,
    /// Per node: it has installed this recovery's truncation.
    truncated: Vec<bool>,
    /// Every truncation any fenced node reported.
    known: BTreeSet<TruncationRange>,
    next_resend: Instant,
    floor: Lsn,
    vdl: Lsn,
    pgs: Vec<PgRecovery>,
    started: Instant,
    /// When the Query step first had a read quorum of every PG: it then waits one resend
    /// interval more for the other nodes, whose epoch may be newer (a recovery that did not
    /// finish leaves its epoch on some nodes).
    quorum_at: Option<Instant>,
}

impl Recovery {
    pub(super) fn new(layout: &super::VolumeLayout, now: Instant) -> Self {
        let nodes = layout.node_names.len();
        Self {
            step: Step::Query,
            epoch_seen: layout.epoch,
            epoch_new: layout.epoch,
            inflight: vec![false; nodes],
            states: vec![None; nodes],
            truncated: vec![false; nodes],
            known: BTreeSet::new(),
            next_resend: now,
            floor: Lsn::ZERO,
            vdl: Lsn::ZERO,
            pgs: (0..layout.placement.len())
                .map(|_| PgRecovery::default())
                .collect(),
            started: now,
            quorum_at: None,
        }
    }

    pub(super) fn next_timer(&self) -> Instant {
        self.next_resend
    }

    /// The newest known truncations (a node reports at most `TRUNCATIONS_MAX`; older ones lie
    /// below every floor that matters), oldest first.
    fn recent_truncations(&self) -> impl Iterator<Item = &TruncationRange> {
        let skip = self.known.len().saturating_sub(TRUNCATIONS_CHECKED);
        self.known.iter().skip(skip)
    }

    /// Whether `node`'s fenced state has the recent known truncations (its SCLs count then).
    fn consistent(&self, node: NodeIndex) -> bool {
        self.states[node]
            .as_ref()
            .is_some_and(|s| self.recent_truncations().all(|t| s.truncations.contains(t)))
    }
}

impl VolumeCore {
    fn recovery(&mut self) -> &mut Recovery {
        self.recovery.as_mut().expect("recovering")
    }

    pub(super) fn recovery_start(&mut self, now: Instant) {
        assert!(self.serving.is_none());
        assert!(matches!(self.phase, Phase::Recovering(_)));
        self.recovery = Some(Recovery::new(&self.layout, now));
        self.recovery_resend(now);
    }

    /// Sends the current step's request to every node that has neither answered nor a
    /// request in flight, and refreshes the status.
    fn recovery_resend(&mut self, now: Instant) {
        let interval = self.config.reconnect_interval;
        self.recovery().next_resend = now + interval;
        for node in 0..self.links.len() {
            self.recovery_resend_node(now, node);
        }
        self.recovery_send_records(now);
        self.phase = Phase::Recovering(self.recovery_status());
    }

    /// Sends `node` the current step's request if it has neither answered nor one in flight.
    fn recovery_resend_node(&mut self, now: Instant, node: NodeIndex) {
        let recovery = self.recovery.as_mut().expect("recovering");
        let step = recovery.step;
        if recovery.inflight[node] {
            return;
        }
        if step == Step::Query {
            if recovery.states[node].is_none() {
                self.send_query(now, node);
            }
        } else if recovery.states[node].is_none() {
            self.send_fence(now, node);
        } else if !recovery.consistent(node) {
            self.send_repair(now, node);
        } else if step == Step::Truncate && !recovery.truncated[node] {
            self.send_own_truncate(now, node);
        }
    }

    /// Sends the fetches and copies the current step can send now. Copies first: they may
    /// plan a prefix fetch, which then goes out at once.
    fn recovery_send_records(&mut self, now: Instant) {
        let step = self.recovery().step;
        if step == Step::Copy {
            self.recovery_copy(now);
        }
        if step >= Step::Fetch {
            self.recovery_fetch(now);
        }
    }

    pub(super) fn recovery_timeout(&mut self, now: Instant) {
        if self.recovery.as_ref().is_some_and(|r| r.next_resend <= now) {
            self.recovery_resend(now);
            self.recovery_advance(now);
        }
    }

    fn send_query(&mut self, now: Instant, node: NodeIndex) {
        self.recovery().inflight[node] = true;
        let message = Message::GetVolumeState(self.layout.volume);
        let kind = RequestKind::Recovery(RecoveryRequest::Query);
        self.send(now, node, kind, Payload::Message(message));
    }

    fn send_fence(&mut self, now: Instant, node: NodeIndex) {
        let recovery = self.recovery.as_mut().expect("recovering");
        recovery.inflight[node] = true;
        let fence = Fence {
            volume: self.layout.volume,
            epoch_current: recovery.epoch_seen,
            epoch_new: recovery.epoch_new,
        };
        let kind = RequestKind::Recovery(RecoveryRequest::Fence);
        self.send(now, node, kind, Payload::Message(Message::Fence(fence)));
    }

    /// Forwards the oldest truncation `node` lacks.
    fn send_repair(&mut self, now: Instant, node: NodeIndex) {
        let recovery = self.recovery.as_mut().expect("recovering");
        let state = recovery.states[node].as_ref().expect("fenced");
        let Some(range) = recovery
            .recent_truncations()
            .find(|t| !state.truncations.contains(t))
            .copied()
        else {
            return;
        };
        let truncate = Truncate {
            volume: self.layout.volume,
            epoch: recovery.epoch_new,
            range,
        };
        recovery.inflight[node] = true;
        let kind = RequestKind::Recovery(RecoveryRequest::Repair);
        self.send(
            now,
            node,
            kind,
            Payload::Message(Message::Truncate(truncate)),
        );
    }

    fn own_truncation(&self) -> TruncationRange {
        let recovery = self.recovery.as_ref().expect("recovering");
        TruncationRange {
            annul_epoch: recovery.epoch_new,
            after: recovery.vdl,
            // An older writer may have run with a larger LAL than this one: cover the default
            // too (annulment is by epoch, so a wider range costs nothing).
            through: Lsn(recovery
                .vdl
                .0
                .saturating_add(self.config.lal.max(crate::quorum::LSN_ALLOCATION_LIMIT))),
        }
    }

    fn send_own_truncate(&mut self, now: Instant, node: NodeIndex) {
        let range = self.own_truncation();
        let recovery = self.recovery.as_mut().expect("recovering");
        recovery.inflight[node] = true;
        let truncate = Truncate {
            volume: self.layout.volume,
            epoch: recovery.epoch_new,
            range,
        };
        let kind = RequestKind::Recovery(RecoveryRequest::Truncate);
        self.send(
            now,
            node,
            kind,
            Payload::Message(Message::Truncate(truncate)),
        );
    }

    pub(super) fn on_recovery_reply(
        &mut self,
        now: Instant,
        node: NodeIndex,
        request: RecoveryRequest,
        reply: Result<Message, String>,
    ) {
        if self.recovery.is_none() {
            return; // Fenced or failed meanwhile.
        }
        self.recovery_answered(node, &request);
        let progressed = matches!(
            reply,
            Ok(Message::VolumeState(_) | Message::Records(_) | Message::Ack(_))
        );
        let state = match reply {
            Ok(Message::VolumeState(state)) => Some(state),
            Ok(Message::Records(records)) => {
                if let RecoveryRequest::Fetch { pg } = request {
                    self.on_fetched(now, pg, records);
                }
                None
            }
            Ok(Message::Ack(ack)) => {
                if let RecoveryRequest::Copy {
                    pg,
                    segment,
                    through,
                } = request
                    && ack.pg == pg
                    && ack.segment == segment
                {
                    self.on_copied(now, node, (pg, segment, through), ack.scl);
                }
                None
            }
            Ok(Message::Error(e)) if e.code == ErrorCode::Compacted => {
                if let RecoveryRequest::Fetch { pg } = request {
                    self.on_fetch_compacted(now, pg);
                }
                None
            }
            Ok(Message::Error(e)) if e.code == ErrorCode::UnknownSegment => {
                let name = &self.layout.node_names[node];
                let why = format!(
                    "node {name} does not host volume {}: {}",
                    self.layout.volume, e.message
                );
                self.fail(why);
                return;
            }
            Ok(Message::Error(e)) => {
                tracing::warn!(
                    "recovery: node {} refused {request:?}: {:?} {}",
                    self.layout.node_names[node],
                    e.code,
                    e.message
                );
                None
            }
            Ok(other) => {
                tracing::warn!("recovery: node answered {}", other.name());
                None
            }
            Err(_) => None,
        };
        if let Some(state) = state {
            self.on_recovery_state(now, node, &request, state);
        }
        if self.recovery.is_some() {
            if progressed {
                self.recovery_kick(now, node);
            }
            self.recovery_advance(now);
        }
    }

    /// What a reply that moved recovery on makes sendable goes out now, not at the next
    /// resend `reconnect_interval` away: the current step's request to the node that answered
    /// a previous step late, the next chunk of a fetch, a prefix fetch, copies to a segment
    /// fenced late or whose prefix just arrived. Failed requests wait for the resend timer,
    /// so a refusing node is not hammered.
    fn recovery_kick(&mut self, now: Instant, node: NodeIndex) {
        self.recovery_resend_node(now, node);
        self.recovery_send_records(now);
    }

    /// A VolumeState answering a query, a fence, a repair or the truncation.
    fn on_recovery_state(
        &mut self,
        now: Instant,
        node: NodeIndex,
        request: &RecoveryRequest,
        state: VolumeState,
    ) {
        if let Err(why) = self.check_hosting(node, &state) {
            self.fail(why);
            return;
        }
        let recovery = self.recovery.as_mut().expect("recovering");
        match request {
            RecoveryRequest::Query => {
                if recovery.step != Step::Query {
                    return; // A late answer: the fence step needs fenced states only.
                }
                recovery.epoch_seen = recovery.epoch_seen.max(state.epoch);
                recovery.states[node] = Some(state);
            }
            RecoveryRequest::Fence | RecoveryRequest::Repair => {
                if state.epoch != recovery.epoch_new {
                    return; // Someone else's epoch: the next Fence attempt learns of it.
                }
                recovery.known.extend(state.truncations.iter().copied());
                recovery.states[node] = Some(state);
                if !recovery.consistent(node) {
                    self.send_repair(now, node);
                }
            }
            RecoveryRequest::Truncate => {
                recovery.truncated[node] = true;
                recovery.states[node] = Some(state);
                if !recovery.consistent(node) {
                    self.send_repair(now, node);
                }
            }
            RecoveryRequest::Fetch { .. } | RecoveryRequest::Copy { .. } => {}
        }
    }

    /// Fails recovery for good (the volume file does not match the nodes).
    fn fail(&mut self, why: String) {
        tracing::error!("recovery failed: {why}");
        self.fail_everything(&super::VolumeError::Failed(why.clone()));
        self.phase = Phase::Failed(why);
    }

    /// Checks that the node hosts every segment the volume file places on it.
    fn check_hosting(&self, node: NodeIndex, state: &VolumeState) -> Result<(), String> {
        let name = &self.layout.node_names[node];
        if state.volume != self.layout.volume {
            return Err(format!("node {name} answered for volume {}", state.volume));
        }
        for (pg, nodes) in self.layout.placement.iter().enumerate() {
            for (segment, n) in nodes.iter().enumerate() {
                let (pg, segment) = (PgId(pg as u32), SegmentIndex(segment as u32));
                if *n == node
                    && !state
                        .segments
                        .iter()
                        .any(|s| s.pg == pg && s.segment == segment)
                {
                    return Err(format!(
                        "node {name} does not host pg {pg} segment {segment} of volume {} \
                         (the volume file says it does)",
                        self.layout.volume
                    ));
                }
            }
        }
        Ok(())
    }

    /// The nodes whose states count in the current step, per segment of `pg`.
    fn counted(&self, pg: usize) -> Vec<(SegmentIndex, Lsn)> {
        let recovery = self.recovery.as_ref().expect("recovering");
        let mut out = Vec::new();
        for (segment, node) in self.layout.placement[pg].iter().enumerate() {
            let counts = match recovery.step {
                Step::Query => recovery.states[*node].is_some(),
                Step::Truncate => recovery.truncated[*node] && recovery.consistent(*node),
                _ => recovery.consistent(*node),
            };
            if !counts {
                continue;
            }
            let segment = SegmentIndex(segment as u32);
            let state = recovery.states[*node]
                .as_ref()
                .expect("counted nodes answered");
            let scl = state
                .segments
                .iter()
                .find(|s| s.pg == PgId(pg as u32) && s.segment == segment)
                .map_or(Lsn::ZERO, |s| s.scl);
            out.push((segment, scl));
        }
        out
    }

    /// Moves to the next step when the current one has what it needs.
    fn recovery_advance(&mut self, now: Instant) {
        let pg_count = self.layout.placement.len();
        let step = self.recovery().step;
        let quorum_everywhere =
            |core: &Self, quorum: usize| (0..pg_count).all(|pg| core.counted(pg).len() >= quorum);
        match step {
            Step::Query if quorum_everywhere(self, READ_QUORUM) && self.query_settled(now) => {
                let recovery = self.recovery.as_mut().expect("recovering");
                recovery.epoch_new = recovery.epoch_seen.next(self.config.epoch_tag);
                recovery.step = Step::Fence;
                recovery.states.iter_mut().for_each(|s| *s = None);
                self.epoch = self.recovery().epoch_new;
                self.recovery_resend(now);
                self.recovery_advance(now);
            }
            Step::Fence if quorum_everywhere(self, READ_QUORUM) => {
                self.plan_fetch();
                self.recovery().step = Step::Fetch;
                self.recovery_resend(now);
                self.recovery_advance(now);
            }
            Step::Fetch if self.recovery().pgs.iter().all(|p| p.fetch_done) => {
                self.compute_vdl();
                self.recovery().step = Step::Copy;
                self.recovery_resend(now);
                self.recovery_advance(now);
            }
            Step::Copy
                if self.copies_done()
                    && self.planted(super::PlantedBug::RecoverySkipsTruncation) =>
            {
                let recovery = self.recovery.as_mut().expect("recovering");
                for node in 0..recovery.truncated.len() {
                    recovery.truncated[node] = recovery.consistent(node);
                }
                self.finish_recovery(now);
            }
            Step::Copy if self.copies_done() => {
                self.recovery().step = Step::Truncate;
                self.recovery_resend(now);
                self.recovery_advance(now);
            }
            Step::Truncate if self.truncation_done() => self.finish_recovery(now),
            _ => self.phase = Phase::Recovering(self.recovery_status()),
        }
    }

    /// Whether the Query step heard every node, or waited an interval past its quorum.
    fn query_settled(&mut self, now: Instant) -> bool {
        let interval = self.config.reconnect_interval;
        let recovery = self.recovery.as_mut().expect("recovering");
        let quorum_at = *recovery.quorum_at.get_or_insert(now);
        recovery.states.iter().all(Option::is_some) || now >= quorum_at + interval
    }

    /// A node refused this recovery's epoch. Before this writer serves, that means a newer
    /// epoch sits on that node — maybe from a recovery that never finished — so recovery
    /// starts over (and learns that epoch), a few times, before it gives up as fenced.
    /// Returns whether it started over.
    pub(super) fn recovery_restart(&mut self, now: Instant) -> bool {
        if self.recovery.is_none() || self.recovery_restarts >= RECOVERY_RESTARTS_MAX {
            return false;
        }
        self.recovery_restarts += 1;
        tracing::info!("recovery: a node holds a newer epoch; starting over");
        // Outstanding requests of the abandoned attempt are dropped; late replies find nothing.
        self.requests.clear();
        self.deadlines.clear();
        self.transmits.clear();
        self.recovery_start(now);
        true
    }

    /// Picks each PG's fetch source and range from the fenced SCLs.
    fn plan_fetch(&mut self) {
        let pg_count = self.layout.placement.len();
        let recovery = self.recovery.as_ref().expect("recovering");
        let floor = (0..self.links.len())
            .filter(|n| recovery.consistent(*n))
            .filter_map(|n| recovery.states[n].as_ref().map(|s| s.vdl))
            .max()
            .unwrap_or(Lsn::ZERO);
        let plans: Vec<(Vec<SegmentIndex>, Lsn, Lsn)> = (0..pg_count)
            .map(|pg| {
                let mut counted = self.counted(pg);
                counted.sort_by_key(|c| std::cmp::Reverse(c.1));
                assert!(counted.len() >= READ_QUORUM);
                let target = counted[0].1;
                // With fewer than a write quorum fenced, start at the floor; the copy step
                // fetches further back only if a segment it must fill lies below.
                let fourth = counted.get(WRITE_QUORUM - 1).map_or(floor, |c| c.1);
                let sources = counted.iter().map(|c| c.0).collect();
                (sources, target, floor.min(fourth))
            })
            .collect();
        let recovery = self.recovery.as_mut().expect("recovering");
        recovery.floor = floor;
        for (pg, (sources, target, from)) in recovery.pgs.iter_mut().zip(plans) {
            pg.sources = sources;
            pg.target = target;
            pg.from = from;
            pg.fetched_through = from;
            pg.fetch_done = target <= from;
        }
    }

    /// Sends the next fetch of every PG that needs one (its chain, or the prefix below it).
    fn recovery_fetch(&mut self, now: Instant) {
        for pg in 0..self.layout.placement.len() {
            let recovery = self.recovery.as_mut().expect("recovering");
            let epoch = recovery.epoch_new;
            let state = &mut recovery.pgs[pg];
            if state.fetch_inflight {
                continue;
            }
            let (source, after, through) = match &state.prefix {
                Some(p) => (
                    p.source,
                    p.records.last().map_or(p.from, |r| r.lsn),
                    p.through,
                ),
                None if !state.fetch_done => (state.source, state.fetched_through, state.target),
                None => continue,
            };
            let Some(&segment) = state.sources.get(source) else {
                continue;
            };
            state.fetch_inflight = true;
            let fetch = FetchRecords {
                volume: self.layout.volume,
                epoch,
                pg: PgId(pg as u32),
                segment,
                after,
                through,
                bytes_max: RECOVERY_CHUNK_BYTES,
            };
            let node = self.layout.placement[pg][segment.0 as usize];
            let kind = RequestKind::Recovery(RecoveryRequest::Fetch {
                pg: PgId(pg as u32),
            });
            self.send(
                now,
                node,
                kind,
                Payload::Message(Message::FetchRecords(fetch)),
            );
        }
    }

    /// Prefix records fetched: extend, or (on an empty answer) splice them in front of the
    /// PG's records if they link up, else try the next source or give up the prefix.
    fn on_prefix_fetched(state: &mut PgRecovery, reply: Records) {
        let prefix = state.prefix.as_mut().expect("a prefix fetch");
        let mut previous = prefix.records.last().map(|r| r.lsn);
        let mut ok = true;
        for record in &reply.records {
            ok &= match previous {
                Some(lsn) => record.backlink == lsn,
                None => record.backlink <= prefix.from,
            } && record.lsn <= prefix.through;
            previous = Some(record.lsn);
        }
        if ok && !reply.records.is_empty() {
            prefix.records.extend(reply.records);
            return;
        }
        let links = state.records.first().is_none_or(|first| match previous {
            Some(lsn) => first.backlink == lsn,
            None => first.backlink <= prefix.from,
        });
        if ok && links {
            let prefix = state.prefix.take().expect("checked");
            state.from = prefix.from;
            let mut records = prefix.records;
            records.append(&mut state.records);
            state.records = records;
            return;
        }
        prefix.records.clear();
        prefix.source += 1;
        if prefix.source >= state.sources.len() {
            state.prefix = None;
            state.prefix_failed = true;
        }
    }

    /// A recovery request is no longer in flight.
    fn recovery_answered(&mut self, node: NodeIndex, request: &RecoveryRequest) {
        match *request {
            RecoveryRequest::Fetch { pg } => {
                self.recovery().pgs[pg.0 as usize].fetch_inflight = false;
            }
            RecoveryRequest::Copy { pg, segment, .. } => {
                self.recovery().pgs[pg.0 as usize].copy_inflight[segment.0 as usize] = false;
            }
            _ => self.recovery().inflight[node] = false,
        }
    }

    /// The source's records below what was asked for left its journal (they are in its page
    /// store): as if it had none, so the next source is tried.
    fn on_fetch_compacted(&mut self, now: Instant, pg: PgId) {
        let empty = Records {
            volume: self.layout.volume,
            pg,
            segment: SegmentIndex(0),
            scl: Lsn::ZERO,
            records: Vec::new(),
            epochs: Vec::new(),
        };
        self.on_fetched(now, pg, empty);
    }

    /// Appends fetched records after checking that they continue the chain.
    fn on_fetched(&mut self, now: Instant, pg: PgId, reply: Records) {
        let state = &mut self.recovery.as_mut().expect("recovering").pgs[pg.0 as usize];
        if state.prefix.is_some() {
            Self::on_prefix_fetched(state, reply);
            return;
        }
        let mut previous = state.records.last().map(|r| r.lsn);
        let mut chain_ok = reply.pg == pg;
        for record in &reply.records {
            let links = match previous {
                Some(lsn) => record.backlink == lsn,
                None => record.backlink <= state.from,
            };
            chain_ok &= links && record.lsn > state.fetched_through && record.lsn <= state.target;
            previous = Some(record.lsn);
        }
        if !chain_ok || reply.records.is_empty() {
            // This source cannot give the chain up to the target (it lost records, or it
            // sent something that does not link): try the next-best one, or settle for what
            // the chain reaches.
            state.source += 1;
            let next = state.sources.get(state.source).is_some();
            if !next {
                tracing::warn!(
                    "recovery: pg {pg}: no source reaches SCL {}; the chain ends at {}",
                    state.target,
                    state.fetched_through
                );
                state.target = state.fetched_through;
                state.fetch_done = true;
            }
            let _ = now;
            return;
        }
        state.fetched_through = reply
            .records
            .last()
            .map_or(state.fetched_through, |r| r.lsn);
        state.records.extend(reply.records);
        state.fetch_done = state.fetched_through >= state.target;
        assert!(state.fetched_through <= state.target);
    }

    /// VCL: the end of the gap-free run of LSNs above the floor that the chains account for;
    /// VDL: the highest CPL ≤ VCL; each PG's last record ≤ VDL.
    fn compute_vdl(&mut self) {
        let recovery = self.recovery.as_mut().expect("recovering");
        let floor = recovery.floor;
        let mut above: BTreeMap<Lsn, bool> = BTreeMap::new();
        for pg in &recovery.pgs {
            for record in pg.records.iter().filter(|r| r.lsn > floor) {
                above.insert(record.lsn, record.cpl);
            }
        }
        let mut vcl = floor;
        let mut vdl = floor;
        for (lsn, cpl) in above {
            if lsn.0 != vcl.0 + 1 {
                break;
            }
            vcl = lsn;
            if cpl {
                vdl = lsn;
            }
        }
        assert!(vdl <= vcl);
        assert!(vdl >= floor);
        recovery.vdl = vdl;
        for pg in &mut recovery.pgs {
            let below: Vec<&LogRecord> = pg.records.iter().filter(|r| r.lsn <= vdl).collect();
            pg.last = match (below.last(), pg.records.first()) {
                (Some(record), _) => record.lsn,
                (None, Some(first)) => first.backlink,
                (None, None) => pg.target,
            };
            assert!(pg.last <= vdl);
        }
        tracing::info!("recovery: floor {floor}, VCL {vcl}, VDL {vdl}");
    }

    /// Sends every fenced segment of every PG the records it must hold at the new epoch:
    /// those it misses up to the PG's last record, and every record above the floor that it
    /// holds already (re-tagged: an adopted record that stayed tagged with an old epoch could
    /// be annulled by a truncation an interrupted recovery left somewhere, forwarded later).
    fn recovery_copy(&mut self, now: Instant) {
        for pg in 0..self.layout.placement.len() {
            let counted = self.counted(pg);
            let state = &mut self.recovery.as_mut().expect("recovering").pgs[pg];
            let lowest = counted.iter().map(|c| c.1).min().unwrap_or(state.from);
            let floor = self.recovery.as_ref().expect("recovering").floor;
            let lowest = lowest.min(floor);
            let state = &mut self.recovery.as_mut().expect("recovering").pgs[pg];
            let done = counted
                .iter()
                .filter(|c| state.copy_done(c.0, c.1, floor))
                .count();
            let short = done < WRITE_QUORUM && counted.len() >= WRITE_QUORUM;
            if short && lowest < state.from && state.prefix.is_none() && !state.prefix_failed {
                // Segments lie below what was fetched: fetch the chain below it too.
                state.prefix = Some(Prefix {
                    from: lowest,
                    through: state.from,
                    records: Vec::new(),
                    source: 0,
                });
            }
            if !state.fetch_done || state.prefix.is_some() {
                continue;
            }
            for (segment, scl) in counted {
                self.send_copy(now, PgId(pg as u32), segment, scl);
            }
        }
    }

    fn send_copy(&mut self, now: Instant, pg: PgId, segment: SegmentIndex, scl: Lsn) {
        let volume = self.layout.volume;
        let node = self.layout.placement[pg.0 as usize][segment.0 as usize];
        let recovery = self.recovery.as_mut().expect("recovering");
        let (epoch, floor) = (recovery.epoch_new, recovery.floor);
        let state = &mut recovery.pgs[pg.0 as usize];
        let index = segment.0 as usize;
        let start = scl.min(floor).max(state.copied_through[index]);
        if state.copy_inflight[index] || scl.min(floor) < state.from {
            return; // In flight, or below what was fetched: other segments will do.
        }
        let mut encoded = Vec::new();
        let mut count = 0u32;
        let mut through = start;
        for record in state
            .records
            .iter()
            .filter(|r| r.lsn > start && r.lsn <= state.last)
        {
            record.encode(&mut encoded);
            count += 1;
            through = record.lsn;
            if encoded.len() >= RECOVERY_CHUNK_BYTES as usize {
                break;
            }
        }
        if count == 0 {
            state.copied_through[index] = state.copied_through[index].max(state.last);
            return;
        }
        state.copy_inflight[index] = true;
        let header = AppendHeader {
            volume,
            epoch,
            pg,
            segment,
            record_count: count,
            vdl: floor,
        };
        let payload = Payload::Append {
            header,
            records: vec![Bytes::from(encoded)],
        };
        let kind = RequestKind::Recovery(RecoveryRequest::Copy {
            pg,
            segment,
            through,
        });
        self.send(now, node, kind, payload);
    }

    fn on_copied(
        &mut self,
        now: Instant,
        node: NodeIndex,
        (pg, segment, through): (PgId, SegmentIndex, Lsn),
        scl: Lsn,
    ) {
        let recovery = self.recovery.as_mut().expect("recovering");
        let mut known_scl = scl;
        if let Some(state) = recovery.states[node].as_mut()
            && let Some(s) = state
                .segments
                .iter_mut()
                .find(|s| s.pg == pg && s.segment == segment)
        {
            s.scl = s.scl.max(scl);
            known_scl = s.scl;
        }
        let state = &mut recovery.pgs[pg.0 as usize];
        let index = segment.0 as usize;
        if scl >= through {
            state.copied_through[index] = state.copied_through[index].max(through);
        }
        if state.copied_through[index] < state.last {
            self.send_copy(now, pg, segment, known_scl);
        }
    }

    /// Whether every PG has a write quorum of segments holding its last record, re-tagged at
    /// the new epoch.
    fn copies_done(&self) -> bool {
        let recovery = self.recovery.as_ref().expect("recovering");
        (0..self.layout.placement.len()).all(|pg| {
            let state = &recovery.pgs[pg];
            let counted = self.counted(pg);
            let done = counted
                .iter()
                .filter(|c| state.copy_done(c.0, c.1, recovery.floor))
                .count();
            done >= WRITE_QUORUM
        })
    }

    fn truncation_done(&self) -> bool {
        self.copies_done()
    }

    /// Recovery is done: build the writer's state and serve.
    fn finish_recovery(&mut self, now: Instant) {
        let range = self.own_truncation();
        let recovery = self.recovery.take().expect("recovering");
        let pg_count = self.layout.placement.len();
        let pg_last: Vec<Lsn> = recovery.pgs.iter().map(|p| p.last).collect();
        let mut scl = vec![[Lsn::ZERO; PG_SIZE]; pg_count];
        for (pg, nodes) in self.layout.placement.iter().enumerate() {
            for (segment, node) in nodes.iter().enumerate() {
                if !recovery.truncated[*node] {
                    continue;
                }
                let state = recovery.states[*node]
                    .as_ref()
                    .expect("truncated nodes answered");
                scl[pg][segment] = state
                    .segments
                    .iter()
                    .find(|s| s.pg == PgId(pg as u32) && s.segment == SegmentIndex(segment as u32))
                    .map_or(Lsn::ZERO, |s| s.scl);
            }
        }
        #[allow(unused_mut)]
        let mut writer = Writer::recovered(
            self.layout.geometry,
            self.config.lal,
            recovery.vdl,
            &pg_last,
            &scl,
        );
        #[cfg(feature = "planted-bugs")]
        if self.planted(super::PlantedBug::WriteQuorumOfThree) {
            writer.plant_write_quorum(3);
        }
        let (retained, retained_bytes) = seed_retained(&recovery);
        let mut truncations: Vec<TruncationRange> =
            recovery.recent_truncations().copied().collect();
        truncations.push(range);
        self.serving = Some(Serving {
            writer,
            retained,
            retained_bytes,
            recent_writes: RecentWrites::default(),
            cache: BufferCache::new(self.config.cache_capacity_bytes),
            pgmrpl_sent: vec![Lsn::ZERO; pg_count],
            pg_lsns: pg_last.iter().map(|l| [*l].into_iter().collect()).collect(),
            truncations,
        });
        for (node, link) in self.links.iter_mut().enumerate() {
            if !recovery.truncated[node] {
                link.up = false;
                link.needs_truncate = true;
            }
        }
        let elapsed = now.saturating_duration_since(recovery.started);
        tracing::info!(
            "recovered volume {}: VDL {}, epoch {}, in {} ms",
            self.layout.volume,
            recovery.vdl,
            self.epoch,
            elapsed.as_millis()
        );
        self.phase = Phase::Serving;
        self.next_pgmrpl = now;
    }

    /// Recovery's per-PG state, for debugging.
    pub(super) fn recovery_debug(&self) -> String {
        let Some(recovery) = self.recovery.as_ref() else {
            return String::new();
        };
        let mut out = format!(
            "step {:?} floor {} VDL {}; ",
            recovery.step, recovery.floor, recovery.vdl
        );
        for (pg, state) in recovery.pgs.iter().enumerate() {
            out += &format!(
                "pg {pg}: counted {:?} last {} from {} target {} fetched {} done {} copying {:?}; ",
                self.counted(pg),
                state.last,
                state.from,
                state.target,
                state.records.len(),
                state.fetch_done,
                state.copy_inflight
            );
        }
        out
    }

    /// What recovery waits for, naming PGs, segments and nodes.
    fn recovery_status(&self) -> String {
        let Some(recovery) = self.recovery.as_ref() else {
            return String::new();
        };
        let (what, quorum) = match recovery.step {
            Step::Query => ("a read quorum to answer", READ_QUORUM),
            Step::Fence => ("a read quorum to accept the new epoch", READ_QUORUM),
            Step::Fetch => ("records to be fetched", READ_QUORUM),
            Step::Copy => ("a write quorum to hold the recovered VDL", WRITE_QUORUM),
            Step::Truncate => ("a write quorum to record the truncation", WRITE_QUORUM),
        };
        let mut waiting = Vec::new();
        for pg in 0..self.layout.placement.len() {
            let counted = self.counted(pg);
            let short = counted.len() < quorum
                || (recovery.step == Step::Fetch && !recovery.pgs[pg].fetch_done);
            if !short {
                continue;
            }
            let missing: Vec<String> = self.layout.placement[pg]
                .iter()
                .enumerate()
                .filter(|(s, _)| !counted.iter().any(|c| c.0 == SegmentIndex(*s as u32)))
                .map(|(s, n)| format!("segment {s} on {}", self.layout.node_names[*n]))
                .collect();
            waiting.push(format!(
                "pg {pg} ({} of {quorum}; not yet: {})",
                counted.len(),
                missing.join(", ")
            ));
        }
        format!("waiting for {what}: {}", waiting.join("; "))
    }
}
