//! Per-node send queues: batches go out in allocation order, at most `node_inflight_appends`
//! rounds per node, and whatever queued up meanwhile is merged into one Append per segment. A
//! node that fails a request (or misses a deadline, or falls too far behind) is marked down:
//! its queue is dropped and it is probed every `reconnect_interval`; when it answers, it is
//! told the current truncation if it has not installed it, then caught up from the retained
//! records above its SCL.
//!
//! Invariants: a down node is sent nothing but probes and truncations; a record is retained
//! until all six segments of its PG hold it (so a node that was down or dropped a queue can be
//! caught up) — except that past `retained_bytes_max` the oldest records that a write quorum
//! already holds are let go (filling that gap is the peers' job, by gossip); records above
//! PGCL are never let go, and past the bound writers see back-pressure instead.

use std::collections::{BTreeMap, VecDeque};
use std::time::Instant;

use bytes::Bytes;
use wire::{AppendHeader, ErrorCode, Lsn, Message, PG_SIZE, PgId, SegmentIndex, SetPgmrpl};

use super::{NodeIndex, Payload, RequestKind, VolumeCore};
use crate::quorum::PgBatch;

/// Bytes of records one node's queue may hold; a node that falls this far behind is treated
/// as down and caught up from the retained records once it keeps up again.
pub const NODE_QUEUE_BYTES_MAX: usize = 64 << 20;
/// Most bytes of records merged into one append.
const MERGED_APPEND_BYTES_MAX: usize = 1 << 20;

/// Records of one PG for one segment, encoded once and shared by the six queues.
#[derive(Clone, Debug)]
pub(super) struct QueuedBatch {
    pg: PgId,
    segment: SegmentIndex,
    records: Bytes,
    record_count: u32,
    /// Backlink of the first record: an ack whose SCL stays below it reveals a hole.
    first_backlink: Lsn,
}

/// The backlink of an encoded record (bytes 8..16, see `wire::record`).
fn backlink_of(record: &[u8]) -> Lsn {
    let bytes: [u8; 8] = record
        .get(8..16)
        .and_then(|b| b.try_into().ok())
        .expect("records are encoded by this writer");
    Lsn(u64::from_le_bytes(bytes))
}

/// One node as the writer sees it.
#[derive(Debug)]
pub(super) struct Link {
    pub(super) up: bool,
    queue: VecDeque<QueuedBatch>,
    queued_bytes: usize,
    inflight_rounds: usize,
    /// The node has not installed this writer's truncation yet.
    pub(super) needs_truncate: bool,
    /// A probe or truncation is in flight.
    probing: bool,
    /// Per segment: the highest LSN a hole fill already queued (see `fill_hole`).
    filled: BTreeMap<(PgId, SegmentIndex), Lsn>,
    next_probe: Option<Instant>,
    /// Marked down because its queue overflowed, where no clock was at hand: the next
    /// `pump_links` schedules its probe (without one, nothing would ever wake it up again).
    overflowed: bool,
}

impl Link {
    pub(super) fn new() -> Self {
        Self {
            up: true,
            queue: VecDeque::new(),
            queued_bytes: 0,
            inflight_rounds: 0,
            needs_truncate: false,
            probing: false,
            filled: BTreeMap::new(),
            next_probe: None,
            overflowed: false,
        }
    }

    pub(super) fn clear(&mut self) {
        self.queue.clear();
        self.queued_bytes = 0;
        self.inflight_rounds = 0;
        self.probing = false;
        self.next_probe = None;
    }

    pub(super) fn next_timer(&self) -> Option<Instant> {
        if self.up || self.probing {
            return None;
        }
        self.next_probe
    }
}

impl VolumeCore {
    /// Queues each PG batch (encoded once) to its six segments and retains its records.
    pub(super) fn dispatch(&mut self, batches: Vec<PgBatch>) {
        let serving = self.serving.as_mut().expect("dispatch while serving");
        let vdl = serving.writer.vdl();
        for batch in batches {
            let pg_index = batch.pg.0 as usize;
            let mut encoded = Vec::new();
            let mut bounds = Vec::with_capacity(batch.records.len());
            for record in &batch.records {
                let start = encoded.len();
                record.encode(&mut encoded);
                bounds.push((record.lsn, start, encoded.len()));
                serving.pg_lsns[pg_index].push_back(record.lsn);
                serving.recent_writes.note(record.page, record.lsn);
                if let Err(e) = serving.cache.apply(record, vdl) {
                    // A cached page that refuses a record the writer accepted is a bug.
                    panic!(
                        "cached page {} refused record {}: {e}",
                        record.page.0, record.lsn
                    );
                }
            }
            let encoded = Bytes::from(encoded);
            for (lsn, start, end) in bounds {
                serving.retained_bytes += end - start;
                serving.retained[pg_index].insert(lsn, encoded.slice(start..end));
            }
            let record_count = u32::try_from(batch.records.len()).expect("bounded by LAL");
            for (segment, node) in self.layout.placement[pg_index].iter().enumerate() {
                let item = QueuedBatch {
                    pg: batch.pg,
                    segment: SegmentIndex(segment as u32),
                    records: encoded.clone(),
                    record_count,
                    first_backlink: batch.records[0].backlink,
                };
                enqueue(&mut self.links[*node], item);
            }
        }
    }

    /// Starts append rounds on every node that has room and something queued.
    pub(super) fn pump_links(&mut self, now: Instant) {
        if self.phase != super::Phase::Serving {
            return;
        }
        for link in &mut self.links {
            if std::mem::take(&mut link.overflowed) && !link.up && link.next_probe.is_none() {
                link.next_probe = Some(now + self.config.reconnect_interval);
            }
        }
        for node in 0..self.links.len() {
            while self.links[node].up
                && !self.links[node].needs_truncate
                && self.links[node].inflight_rounds < self.config.node_inflight_appends
                && !self.links[node].queue.is_empty()
            {
                self.start_round(now, node);
            }
        }
    }

    /// Merges what is queued for `node` (up to a bound) into one Append per segment.
    fn start_round(&mut self, now: Instant, node: NodeIndex) {
        let link = &mut self.links[node];
        let mut merged: BTreeMap<(PgId, SegmentIndex), (Vec<Bytes>, u32, Lsn)> = BTreeMap::new();
        let mut bytes = 0;
        while let Some(batch) = link.queue.pop_front() {
            link.queued_bytes -= batch.records.len();
            bytes += batch.records.len();
            let entry = merged.entry((batch.pg, batch.segment)).or_insert((
                Vec::new(),
                0,
                batch.first_backlink,
            ));
            entry.0.push(batch.records);
            entry.1 += batch.record_count;
            if bytes >= MERGED_APPEND_BYTES_MAX {
                break;
            }
        }
        assert!(!merged.is_empty());
        link.inflight_rounds += 1;
        let round = self.next_round;
        self.next_round += 1;
        self.rounds.insert(round, (node, merged.len()));
        let vdl = self.vdl();
        for ((pg, segment), (records, record_count, first_backlink)) in merged {
            let header = AppendHeader {
                volume: self.layout.volume,
                epoch: self.epoch,
                pg,
                segment,
                record_count,
                vdl,
            };
            let redo_bytes: usize = records.iter().map(Bytes::len).sum();
            self.stats.appends_sent += 1;
            self.stats.redo_bytes_sent += redo_bytes as u64;
            let kind = RequestKind::Append {
                pg,
                segment,
                round,
                first_backlink,
            };
            self.send(now, node, kind, Payload::Append { header, records });
        }
    }

    /// One Append of a round got its answer.
    pub(super) fn finish_round(&mut self, now: Instant, round: u64) {
        let Some((node, remaining)) = self.rounds.get_mut(&round) else {
            return;
        };
        *remaining -= 1;
        if *remaining > 0 {
            return;
        }
        let node = *node;
        self.rounds.remove(&round);
        let link = &mut self.links[node];
        link.inflight_rounds = link.inflight_rounds.saturating_sub(1);
        self.pump_links(now);
    }

    pub(super) fn on_append_reply(
        &mut self,
        now: Instant,
        node: NodeIndex,
        (pg, segment, first_backlink): (PgId, SegmentIndex, Lsn),
        reply: Result<Message, String>,
    ) {
        match reply {
            Ok(Message::Ack(ack)) if ack.pg == pg && ack.segment == segment => {
                self.on_ack(pg, segment, ack.scl);
                if ack.scl < first_backlink {
                    self.fill_hole(node, pg, segment, ack.scl, first_backlink);
                }
            }
            Ok(Message::Error(e)) if e.code == ErrorCode::EpochNotInstalled => {
                self.links[node].needs_truncate = true;
                self.mark_down(now, node, "it has not installed this writer's epoch");
            }
            Ok(Message::Error(e)) => {
                let why = format!("it refused an append: {:?} {}", e.code, e.message);
                self.mark_down(now, node, &why);
            }
            Ok(other) => {
                let why = format!("it answered an append with {}", other.name());
                self.mark_down(now, node, &why);
            }
            Err(e) => self.mark_down(now, node, &e),
        }
    }

    /// Feeds one ack into the writer; frees retained records its PG no longer needs.
    fn on_ack(&mut self, pg: PgId, segment: SegmentIndex, scl: Lsn) {
        let serving = self
            .serving
            .as_mut()
            .expect("acks count only while serving");
        let advanced = serving.writer.on_ack(pg, segment, scl);
        let everywhere = (0..PG_SIZE as u32)
            .map(|s| serving.writer.segment_scl(pg, SegmentIndex(s)))
            .min()
            .expect("PG_SIZE > 0");
        serving.release_retained(pg, everywhere);
        if serving.retained_bytes > self.config.retained_bytes_max {
            // Over the bound: let go of the oldest records a write quorum holds, PG by PG.
            for pg in 0..serving.retained.len() {
                let pg = PgId(pg as u32);
                let pgcl = serving.writer.pgcl(pg);
                serving.release_retained(pg, pgcl);
                if serving.retained_bytes <= self.config.retained_bytes_max {
                    break;
                }
            }
        }
        if advanced {
            self.on_vdl_advanced();
        }
    }

    /// The segment acked an SCL below the batch's first backlink: it lost records (a crash
    /// took its unsynced writes) or missed them. Queue the retained ones in the hole, once.
    fn fill_hole(
        &mut self,
        node: NodeIndex,
        pg: PgId,
        segment: SegmentIndex,
        scl: Lsn,
        through: Lsn,
    ) {
        assert!(scl < through);
        let link = &mut self.links[node];
        let filled = link
            .filled
            .get(&(pg, segment))
            .copied()
            .unwrap_or(Lsn::ZERO);
        let after = scl.max(filled);
        if after >= through {
            return;
        }
        let serving = self.serving.as_ref().expect("serving");
        let missing: Vec<(Lsn, Bytes)> = serving.retained[pg.0 as usize]
            .range(Lsn(after.0 + 1)..=through)
            .map(|(l, b)| (*l, b.clone()))
            .collect();
        // A large hole goes in portions: the next ack below the next batch asks for more.
        let queued_through = match queue_chunks(link, pg, segment, &missing) {
            Ok(()) => through,
            Err(last) => last.unwrap_or(after),
        };
        link.filled.insert((pg, segment), queued_through);
    }

    /// Treats `node` as down: its queue goes (catch-up resends from the retained records) and
    /// it is probed until it answers.
    pub(super) fn mark_down(&mut self, now: Instant, node: NodeIndex, why: &str) {
        let link = &mut self.links[node];
        if link.up {
            tracing::info!(
                "node {} is down for this writer: {why}",
                self.layout.node_names[node]
            );
        }
        link.up = false;
        link.queue.clear();
        link.queued_bytes = 0;
        link.filled.clear();
        if link.next_probe.is_none() {
            link.next_probe = Some(now + self.config.reconnect_interval);
        }
    }

    /// Probes down nodes whose turn has come.
    pub(super) fn links_timeout(&mut self, now: Instant) {
        for node in 0..self.links.len() {
            let link = &self.links[node];
            let lagging_idle = link.up
                && link.inflight_rounds == 0
                && link.queue.is_empty()
                && !link.probing
                && link.next_probe.is_none_or(|t| t <= now)
                && self.lags(node);
            if lagging_idle {
                // Up but behind with nothing on the way (it lost records, and no append is
                // left to reveal the hole): ask its SCLs and catch it up.
                self.links[node].next_probe = Some(now + self.config.reconnect_interval * 5);
                self.links[node].probing = true;
                let message = Message::GetVolumeState(self.layout.volume);
                self.send(now, node, RequestKind::Probe, Payload::Message(message));
                continue;
            }
            if link.up || link.probing || link.next_probe.is_some_and(|t| t > now) {
                continue;
            }
            self.links[node].probing = true;
            let message = Message::GetVolumeState(self.layout.volume);
            self.send(now, node, RequestKind::Probe, Payload::Message(message));
        }
    }

    /// Whether a segment on `node` is known to be behind its PG's last record.
    fn lags(&self, node: NodeIndex) -> bool {
        let writer = &self.serving.as_ref().expect("serving").writer;
        self.layout.placement.iter().enumerate().any(|(pg, nodes)| {
            nodes.iter().enumerate().any(|(segment, n)| {
                let (pg, segment) = (PgId(pg as u32), SegmentIndex(segment as u32));
                *n == node && writer.segment_scl(pg, segment) < writer.pg_lsn_allocated_max(pg)
            })
        })
    }

    pub(super) fn on_probe_reply(
        &mut self,
        now: Instant,
        node: NodeIndex,
        reply: Result<Message, String>,
    ) {
        let link = &mut self.links[node];
        link.probing = false;
        // A lagging-but-up node's probe keeps its longer back-off.
        let next = now + self.config.reconnect_interval;
        link.next_probe = Some(link.next_probe.map_or(next, |t| t.max(next)));
        if let Ok(Message::VolumeState(state)) = reply {
            self.reconcile(now, node, &state);
        }
    }

    /// Forwards the oldest truncation the node lacks (this writer's own included, which also
    /// installs its epoch there), or brings the node up once it has them all.
    fn reconcile(&mut self, now: Instant, node: NodeIndex, state: &wire::VolumeState) {
        if state.epoch > self.epoch {
            // Another writer recovered the volume meanwhile: never count its SCLs as acks.
            let name = &self.layout.node_names[node];
            self.fence(format!(
                "node {name} holds epoch {} (this writer's is {})",
                state.epoch, self.epoch
            ));
            return;
        }
        let serving = self.serving.as_ref().expect("serving");
        let missing = serving
            .truncations
            .iter()
            .find(|t| !state.truncations.contains(t))
            .copied();
        let Some(range) = missing else {
            if state.epoch < self.epoch {
                // Cannot happen: this writer's own truncation installs its epoch.
                tracing::warn!("node {node} lacks this writer's epoch after its truncation");
                return;
            }
            self.links[node].needs_truncate = false;
            self.bring_up(now, node, state);
            return;
        };
        self.links[node].needs_truncate = true;
        self.links[node].probing = true;
        let truncate = wire::Truncate {
            volume: self.layout.volume,
            epoch: self.epoch,
            range,
        };
        let payload = Payload::Message(Message::Truncate(truncate));
        self.send(now, node, RequestKind::Truncate, payload);
    }

    pub(super) fn on_truncate_reply(
        &mut self,
        now: Instant,
        node: NodeIndex,
        reply: Result<Message, String>,
    ) {
        self.links[node].probing = false;
        self.links[node].next_probe = Some(now + self.config.reconnect_interval);
        if let Ok(Message::VolumeState(state)) = reply {
            self.reconcile(now, node, &state);
        }
    }

    /// The node answered: it is up again; queue, for each of its segments, the retained
    /// records above the SCL it reports.
    fn bring_up(&mut self, now: Instant, node: NodeIndex, state: &wire::VolumeState) {
        let link = &mut self.links[node];
        assert!(!link.needs_truncate);
        if !link.up {
            link.up = true;
            link.next_probe = None;
            tracing::info!(
                "node {} is back; catching it up",
                self.layout.node_names[node]
            );
            // A restarted node lost its PGMRPL (it keeps what it materialized): tell it again.
            let serving = self.serving.as_ref().expect("serving");
            let floors: Vec<(PgId, Lsn)> = self
                .layout
                .placement
                .iter()
                .enumerate()
                .filter(|(_, nodes)| nodes.contains(&node))
                .map(|(pg, _)| (PgId(pg as u32), serving.pgmrpl_sent[pg]))
                .filter(|(_, floor)| *floor > Lsn::ZERO)
                .collect();
            for (pg, pgmrpl) in floors {
                self.send_pgmrpl(now, node, pg, pgmrpl);
            }
        }
        // The SCLs it reports count like acks (an ack lost on the way is not lost for good).
        for s in &state.segments {
            let placed = self.layout.placement.get(s.pg.0 as usize);
            if placed.and_then(|p| p.get(s.segment.0 as usize)) == Some(&node) {
                self.on_ack(s.pg, s.segment, s.scl);
            }
        }
        let serving = self.serving.as_mut().expect("serving");
        for (pg, nodes) in self.layout.placement.iter().enumerate() {
            for (segment, n) in nodes.iter().enumerate() {
                if *n != node {
                    continue;
                }
                let (pg, segment) = (PgId(pg as u32), SegmentIndex(segment as u32));
                let scl = state
                    .segments
                    .iter()
                    .find(|s| s.pg == pg && s.segment == segment)
                    .map_or(Lsn::ZERO, |s| s.scl);
                let missing: Vec<(Lsn, Bytes)> = serving.retained[pg.0 as usize]
                    .range(Lsn(scl.0 + 1)..)
                    .map(|(l, b)| (*l, b.clone()))
                    .collect();
                // What does not fit now follows as holes reported by later acks.
                if let Err(last) = queue_chunks(&mut self.links[node], pg, segment, &missing) {
                    let last = last.unwrap_or(scl);
                    self.links[node].filled.insert((pg, segment), last);
                }
            }
        }
        self.pump_links(now);
    }

    /// Publishes PGMRPL: the lowest outstanding read point (or VDL when there is none).
    pub(super) fn publish_pgmrpl(&mut self, now: Instant) {
        let floor = self
            .read_points
            .keys()
            .next()
            .copied()
            .unwrap_or(self.vdl());
        let serving = self.serving.as_mut().expect("serving");
        for lsns in &mut serving.pg_lsns {
            while lsns.len() >= 2 && lsns[1] <= floor {
                lsns.pop_front();
            }
        }
        let mut updates = Vec::new();
        for (pg, sent) in serving.pgmrpl_sent.iter_mut().enumerate() {
            if floor > *sent {
                *sent = floor;
                updates.push(PgId(pg as u32));
            }
        }
        for pg in updates {
            // Down nodes too: a node refusing appends because its journal is full needs the
            // new PGMRPL most of all (it coalesces and collects up to it, then takes appends).
            for node in self.layout.placement[pg.0 as usize] {
                self.send_pgmrpl(now, node, pg, floor);
            }
        }
    }

    /// Tells `node` the PGMRPL of `pg`, and this writer's VDL if the node installed this
    /// writer's truncation and is up (so nothing above the truncation's start can still sit in
    /// its chain unannulled): with it, the node coalesces everything up to PGMRPL even when no
    /// further Append comes to carry the VDL.
    fn send_pgmrpl(&mut self, now: Instant, node: NodeIndex, pg: PgId, pgmrpl: Lsn) {
        let link = &self.links[node];
        let vdl = if link.up && !link.needs_truncate {
            self.vdl()
        } else {
            Lsn::ZERO
        };
        assert!(pgmrpl <= self.vdl(), "no read point lies above VDL");
        let message = Message::SetPgmrpl(SetPgmrpl {
            volume: self.layout.volume,
            pg,
            pgmrpl,
            epoch: self.epoch,
            vdl,
        });
        self.stats.pgmrpl_sent += 1;
        self.send(now, node, RequestKind::Pgmrpl, Payload::Message(message));
    }
}

/// Bytes of catch-up a link takes at once; the rest follows as acks report the hole.
const CATCH_UP_BYTES_MAX: usize = NODE_QUEUE_BYTES_MAX / 4;

/// Queues encoded records of one segment in batches of at most 256, while the link's queue
/// holds less than [`CATCH_UP_BYTES_MAX`]. `Err(last queued, if any)` if some were left out.
fn queue_chunks(
    link: &mut Link,
    pg: PgId,
    segment: SegmentIndex,
    records: &[(Lsn, Bytes)],
) -> Result<(), Option<Lsn>> {
    let mut last = None;
    for chunk in records.chunks(256) {
        if !link.up || link.queued_bytes >= CATCH_UP_BYTES_MAX {
            return Err(last);
        }
        let bytes: Vec<Bytes> = chunk.iter().map(|(_, b)| b.clone()).collect();
        let item = QueuedBatch {
            pg,
            segment,
            records: Bytes::from(bytes.concat()),
            record_count: u32::try_from(chunk.len()).expect("small"),
            first_backlink: backlink_of(&bytes[0]),
        };
        enqueue(link, item);
        last = chunk.last().map(|(l, _)| *l);
    }
    Ok(())
}

/// Queues a batch unless the node is down or too far behind (then it is marked down: its
/// records stay retained and catch-up resends them).
fn enqueue(link: &mut Link, batch: QueuedBatch) {
    if !link.up {
        return;
    }
    let bytes = batch.records.len();
    if link.queued_bytes + bytes > NODE_QUEUE_BYTES_MAX {
        link.up = false;
        link.queue.clear();
        link.queued_bytes = 0;
        link.overflowed = true;
        return;
    }
    link.queued_bytes += bytes;
    link.queue.push_back(batch);
}
