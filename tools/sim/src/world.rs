//! One simulated run: six storage nodes in three AZs and one or two writers (the real
//! `VolumeCore`), in one thread, from one seeded PRNG and a virtual clock, over a simulated
//! network. Faults stay within AZ+1 at every moment (TigerBeetle's fault atlas): at most the
//! nodes of one AZ plus one more are crashed or cut off at once. Message loss, duplication,
//! delay and reordering happen throughout; writers crash and new writers recover the volume,
//! sometimes while the old one still runs (it must be fenced).
//!
//! Nodes gossip over the same simulated network (with its faults): each node's peer requests
//! go to the named node as requests from a node certificate, and the replies come back.
//!
//! After the fault phase everything heals; a writer must then commit again (liveness), and
//! every page must read back equal to the model. Then the writer stops writing, and the SCLs
//! of all live segments must converge to their PG's highest SCL (gossip's liveness).

use std::cmp::Reverse;
use std::collections::{BTreeMap, BinaryHeap};
use std::time::{Duration, Instant};

use engine::core::{
    CommitId, Completion, CoreConfig, Phase, PlantedBug, ReadId, ReadStart, VolumeCore,
    VolumeLayout,
};
use engine::quorum::MtrRecord;
use wire::{Epoch, Geometry, Lsn, PageId, PgId, RedoOp, SegmentIndex, VolumeId};

use crate::core_node::CoreNode;
use crate::model::Model;
use crate::rng::Rng;
use crate::storage::{ModelNode, Outgoing, PEER_CONN_BASE, StorageNode, WriterId};

const NODE_COUNT: usize = 6;
const PG_COUNT: u32 = 2;
const PAGES_PER_PG: u64 = 8;
pub(crate) const PAGE_SIZE: usize = 256;
/// Most commits one writer keeps waiting.
const COMMITS_INFLIGHT_MAX: usize = 16;

/// A bug planted on purpose, to prove the checkers catch it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Bug {
    /// Nodes acknowledge a batch before it is durable.
    NodeAcksBeforeDurable,
    /// The writer counts a PG complete on 3 segments.
    WriteQuorumOfThree,
    /// Recovery serves without recording its truncation.
    RecoverySkipsTruncation,
    /// Nodes never gossip: a segment behind stays behind unless the writer resends.
    NoGossip,
}

impl Bug {
    pub const ALL: [Bug; 4] = [
        Bug::NodeAcksBeforeDurable,
        Bug::WriteQuorumOfThree,
        Bug::RecoverySkipsTruncation,
        Bug::NoGossip,
    ];

    /// The name `--plant` takes.
    pub fn name(self) -> &'static str {
        match self {
            Bug::NodeAcksBeforeDurable => "ack-before-durable",
            Bug::WriteQuorumOfThree => "write-quorum-3",
            Bug::RecoverySkipsTruncation => "skip-truncation",
            Bug::NoGossip => "no-gossip",
        }
    }
}

/// What a run does.
#[derive(Clone, Debug)]
pub struct Options {
    pub seed: u64,
    /// A bug to plant (None: the real thing).
    pub bug: Option<Bug>,
    /// Run the compact reference model of the node protocol instead of the real NodeCore.
    pub model_nodes: bool,
    /// Flip bits on crashed nodes' disks. A flip can lose records in the middle of a node's
    /// journal; its peers give them back through gossip, so such runs are checked like any
    /// other (safety, commits resuming, SCLs converging).
    pub bit_flips: bool,
    /// Back-pressure on: one to three nodes (by seed) delay every ack by up to 200 ms, as a
    /// node under journal or coalescing pressure does. Commits must still go through (the
    /// quorum routes around one or two; three slow every commit down, never stop it) and
    /// every checker must pass.
    pub throttle: bool,
    /// Virtual time with faults.
    pub fault_ms: u64,
    /// Virtual time allowed, after healing, for a commit to go through.
    pub heal_ms: u64,
}

impl Options {
    pub fn seed(seed: u64) -> Self {
        Self {
            seed,
            bug: None,
            model_nodes: false,
            bit_flips: false,
            throttle: false,
            fault_ms: 8_000,
            heal_ms: 60_000,
        }
    }
}

/// What a passing run did.
#[derive(Clone, Debug, Default)]
pub struct Report {
    pub commits_acked: u64,
    pub reads_checked: u64,
    pub recoveries: u64,
    pub node_crashes: u64,
    pub final_vdl: u64,
    pub steps: u64,
    /// Records the nodes' gossip fetched from peers.
    pub gossip_records: u64,
    /// Damaged pages and records the running nodes repaired (with `bit_flips`).
    pub damage_repaired: u64,
    /// Acks the nodes delayed under back-pressure.
    pub acks_throttled: u64,
}

/// A message in flight.
#[derive(Debug, PartialEq, Eq, PartialOrd, Ord)]
enum Envelope {
    ToNode {
        writer: WriterId,
        node: usize,
        frame: Vec<u8>,
    },
    ToWriter {
        writer: WriterId,
        node: usize,
        request_id: u64,
        reply: Result<Vec<u8>, String>,
    },
    /// A gossip request from node `from` (in its life `life`) to node `to`.
    ToPeer {
        from: usize,
        life: u64,
        to: usize,
        frame: Vec<u8>,
    },
    /// The reply to node `to`'s gossip request, for its life `life` only.
    FromPeer {
        to: usize,
        life: u64,
        from: usize,
        request_id: u64,
        reply: Result<Vec<u8>, String>,
    },
}

struct SimWriter {
    core: VolumeCore,
    alive: bool,
    commits: BTreeMap<CommitId, Lsn>,
    /// Read id → (read point, from storage).
    reads: BTreeMap<ReadId, (Lsn, bool)>,
    vdl: Lsn,
    /// A newer writer recovered to this: this one must never pass it.
    ceiling: Option<Lsn>,
    recovered: bool,
}

/// The simulated cluster. See the module docs.
pub struct World {
    rng: Rng,
    start: Instant,
    now: Instant,
    nodes: Vec<Box<dyn StorageNode>>,
    down: Vec<bool>,
    /// Node cut off from every writer (a partition).
    cut: Vec<bool>,
    /// When each down or cut node comes back.
    heal_at: Vec<Option<Instant>>,
    writers: Vec<SimWriter>,
    current: WriterId,
    net: BinaryHeap<Reverse<(Instant, u64, Envelope)>>,
    net_seq: u64,
    model: Model,
    report: Report,
    next_op: Instant,
    next_fault: Instant,
    faults_on: bool,
    layout: VolumeLayout,
    bug: Option<Bug>,
    bit_flips: bool,
    /// The first checker failure seen while handling completions.
    failure: Option<String>,
    /// Each node's life (bumped by every restart): a gossip reply reaches only the life that
    /// asked, as a restarted process's connections are new.
    lives: Vec<u64>,
    /// The writers write (off while the SCLs' convergence is checked).
    writing: bool,
    model_nodes: bool,
}

fn ms(n: u64) -> Duration {
    Duration::from_millis(n)
}

/// The six storage nodes: node `n` hosts segment `n` of every PG.
fn make_nodes(layout: &VolumeLayout, model_nodes: bool) -> Vec<Box<dyn StorageNode>> {
    let peers: Vec<wire::PeerNode> = (0..NODE_COUNT)
        .map(|n| crate::core_node::sim_peer(&layout.node_names[n], n))
        .collect();
    (0..NODE_COUNT)
        .map(|n| {
            let hosted: Vec<(PgId, SegmentIndex)> = (0..PG_COUNT)
                .map(|pg| (PgId(pg), SegmentIndex(n as u32)))
                .collect();
            let node: Box<dyn StorageNode> = if model_nodes {
                Box::new(ModelNode::new(
                    layout.volume,
                    layout.epoch,
                    PAGE_SIZE,
                    PAGES_PER_PG,
                    &hosted,
                ))
            } else {
                Box::new(CoreNode::new(
                    &layout.node_names[n],
                    layout.volume,
                    layout.epoch,
                    (PAGE_SIZE as u32, PAGES_PER_PG),
                    &hosted,
                    &peers,
                ))
            };
            node
        })
        .collect()
}

impl World {
    /// Makes one to three nodes (chosen by `seed`, so other seeds' runs do not change) delay
    /// every ack by 1 to 200 ms, for good (restarts too).
    fn throttle_nodes(&mut self, seed: u64) {
        let count = 1 + seed % 3;
        let delay = ms(1 + (seed * 37) % 200);
        for i in 0..count {
            let node = ((seed + i * 2) % NODE_COUNT as u64) as usize;
            self.trace(&format!("node{} delays every ack by {delay:?}", node + 1));
            self.nodes[node].force_throttle(delay);
        }
    }

    pub fn new(seed: u64, bug: Option<Bug>, model_nodes: bool) -> Self {
        // The virtual clock's origin: only differences from it are ever used.
        #[allow(clippy::disallowed_methods)]
        let start = Instant::now();
        let layout = VolumeLayout {
            volume: VolumeId(1),
            epoch: Epoch(1),
            geometry: Geometry {
                page_size_bytes: PAGE_SIZE as u32,
                pages_per_pg: PAGES_PER_PG,
                pg_count: PG_COUNT,
            },
            placement: (0..PG_COUNT).map(|_| std::array::from_fn(|s| s)).collect(),
            node_names: (1..=NODE_COUNT).map(|i| format!("node{i}")).collect(),
        };
        let nodes = make_nodes(&layout, model_nodes);
        let mut world = Self {
            rng: Rng::new(seed),
            start,
            now: start,
            nodes,
            down: vec![false; NODE_COUNT],
            cut: vec![false; NODE_COUNT],
            heal_at: vec![None; NODE_COUNT],
            writers: Vec::new(),
            current: 0,
            net: BinaryHeap::new(),
            net_seq: 0,
            model: Model::default(),
            report: Report::default(),
            next_op: start,
            next_fault: start + ms(300),
            faults_on: true,
            layout,
            bug,
            bit_flips: false,
            failure: None,
            lives: vec![0; NODE_COUNT],
            writing: true,
            model_nodes,
        };
        if bug == Some(Bug::NodeAcksBeforeDurable) {
            for node in &mut world.nodes {
                node.plant_ack_before_durable();
            }
        }
        if bug == Some(Bug::NoGossip) {
            for node in &mut world.nodes {
                node.plant_no_gossip();
            }
        }
        world.start_writer();
        world
    }

    fn elapsed_ms(&self) -> u128 {
        (self.now - self.start).as_millis()
    }

    fn trace(&self, what: &str) {
        tracing::debug!("sim t={}ms {what}", self.elapsed_ms());
    }

    fn start_writer(&mut self) {
        let config = CoreConfig {
            lal: 64,
            request_timeout: ms(1000),
            reconnect_interval: ms(100),
            pgmrpl_interval: ms(200),
            retained_bytes_max: std::env::var("SIM_RETAINED")
                .ok()
                .and_then(|v| v.parse().ok())
                .unwrap_or(256 << 20),
            epoch_tag: u32::try_from(self.rng.between(1, u64::from(u32::MAX))).expect("bounded"),
            planted_bug: match self.bug {
                Some(Bug::WriteQuorumOfThree) => Some(PlantedBug::WriteQuorumOfThree),
                Some(Bug::RecoverySkipsTruncation) => Some(PlantedBug::RecoverySkipsTruncation),
                _ => None,
            },
            ..CoreConfig::default()
        };
        let core = VolumeCore::new(self.layout.clone(), config, self.now);
        self.writers.push(SimWriter {
            core,
            alive: true,
            commits: BTreeMap::new(),
            reads: BTreeMap::new(),
            vdl: Lsn::ZERO,
            ceiling: None,
            recovered: false,
        });
        self.pump(self.writers.len() - 1);
    }

    /// Runs the whole scenario.
    pub fn run(mut self, options: &Options) -> Result<Report, String> {
        let fault_end = self.start + ms(options.fault_ms);
        while self.now < fault_end {
            self.step()?;
        }
        self.heal();
        let acked_before = self.model.acked_count();
        let heal_end = self.now + ms(options.heal_ms);
        // Healed means: commits go through again, and no writer is still recovering (a newer
        // one finishing later would fence the one the final check reads through).
        while self.model.acked_count() <= acked_before + 2 || self.recovering_writer() {
            if self.now >= heal_end {
                for n in 0..NODE_COUNT {
                    self.trace(&format!("node{}: {}", n + 1, self.nodes[n].debug()));
                }
                for w in 0..self.writers.len() {
                    if self.writers[w].alive {
                        self.trace(&format!(
                            "writer {w}: {}",
                            self.writers[w].core.debug_state()
                        ));
                    }
                }
                return Err(format!(
                    "liveness: no commit within {} ms after the faults healed (writer: {:?})",
                    options.heal_ms,
                    self.writers[self.current].core.phase()
                ));
            }
            self.ensure_writer();
            self.step()?;
        }
        // A recovery still under way would fence the writer the final check reads through.
        while self
            .writers
            .iter()
            .any(|w| w.alive && matches!(w.core.phase(), Phase::Recovering(_)))
        {
            if self.now >= heal_end {
                return Err(format!(
                    "liveness: a recovery did not finish within {} ms after the faults healed",
                    options.heal_ms
                ));
            }
            self.step()?;
        }
        self.final_check()?;
        if !self.model_nodes {
            self.check_convergence()?;
        }
        for n in 0..NODE_COUNT {
            self.trace(&format!(
                "node{} at the end: {}",
                n + 1,
                self.nodes[n].debug()
            ));
        }
        self.report.gossip_records = self.nodes.iter().map(|n| n.gossip_records()).sum();
        self.report.damage_repaired = self.nodes.iter().map(|n| n.damage_repaired()).sum();
        self.report.acks_throttled = self.nodes.iter().map(|n| n.acks_throttled()).sum();
        self.report.commits_acked = self.model.acked_count() as u64;
        self.report.recoveries = self.model.recoveries;
        self.report.final_vdl = self.writers[self.current].vdl.0;
        Ok(self.report)
    }

    /// Advances to the next event and handles everything due.
    fn step(&mut self) -> Result<(), String> {
        self.report.steps += 1;
        let next = self.next_event();
        assert!(next >= self.now, "time never goes back");
        self.now = next;
        let now = self.now;
        for node in 0..NODE_COUNT {
            if self.heal_at[node].is_some_and(|t| t <= now) {
                self.heal_node(node);
            }
            if !self.down[node] {
                self.nodes[node].advance(now);
                self.collect_replies(node);
            }
        }
        while self.net.peek().is_some_and(|Reverse((t, _, _))| *t <= now) {
            let Reverse((_, _, envelope)) = self.net.pop().expect("peeked");
            self.deliver(envelope)?;
        }
        for w in 0..self.writers.len() {
            if self.writers[w].alive
                && self.writers[w]
                    .core
                    .poll_timeout()
                    .is_some_and(|t| t <= now)
            {
                self.writers[w].core.handle_timeout(now);
                self.pump(w);
            }
        }
        if self.writing && now >= self.next_op {
            self.workload()?;
        }
        if self.faults_on && now >= self.next_fault {
            self.fault();
        }
        self.check_writers()
    }

    fn next_event(&self) -> Instant {
        let mut next = if self.writing {
            self.next_op
        } else {
            self.now + ms(10)
        };
        if self.faults_on {
            next = next.min(self.next_fault);
        }
        if let Some(Reverse((t, _, _))) = self.net.peek() {
            next = next.min(*t);
        }
        for node in 0..NODE_COUNT {
            if let Some(t) = self.heal_at[node] {
                next = next.min(t);
            }
            if !self.down[node]
                && let Some(t) = self.nodes[node].next_event()
            {
                next = next.min(t);
            }
        }
        for w in &self.writers {
            if w.alive
                && let Some(t) = w.core.poll_timeout()
            {
                next = next.min(t);
            }
        }
        next.max(self.now)
    }

    /// Sends what writer `w` wants sent and handles its completions.
    fn pump(&mut self, w: WriterId) {
        while let Some(t) = self.writers[w].core.poll_transmit() {
            let frame = t.payload.encode(t.request_id);
            if self.down[t.node] || self.cut[t.node] {
                // The real driver learns at once that it cannot connect.
                let delay = Duration::from_micros(self.rng.between(100, 2000));
                let reply = Err(format!("node{} unreachable", t.node + 1));
                self.send_later(
                    delay,
                    Envelope::ToWriter {
                        writer: w,
                        node: t.node,
                        request_id: t.request_id,
                        reply,
                    },
                );
                continue;
            }
            self.transmit(Envelope::ToNode {
                writer: w,
                node: t.node,
                frame,
            });
        }
        while let Some(completion) = self.writers[w].core.poll_completion() {
            if let Err(e) = self.complete(w, completion) {
                // Checked again (and reported) by the caller through `check_writers`.
                self.failure = Some(e);
            }
        }
    }
}

impl World {
    fn send_later(&mut self, delay: Duration, envelope: Envelope) {
        self.net_seq += 1;
        self.net
            .push(Reverse((self.now + delay, self.net_seq, envelope)));
    }

    /// Puts a message on the network: lost, duplicated, delayed or reordered now and then.
    fn transmit(&mut self, envelope: Envelope) {
        let faulty = self.faults_on;
        if faulty && self.rng.chance(0.005) {
            return; // Lost: the sender's deadline notices.
        }
        let copies = if faulty && self.rng.chance(0.005) {
            2
        } else {
            1
        };
        for _ in 0..copies {
            let micros = if faulty && self.rng.chance(0.02) {
                self.rng.between(5_000, 200_000)
            } else {
                self.rng.between(50, 400)
            };
            let envelope = envelope.clone_envelope();
            self.send_later(Duration::from_micros(micros), envelope);
        }
    }

    fn deliver(&mut self, envelope: Envelope) -> Result<(), String> {
        match envelope {
            Envelope::ToNode {
                writer,
                node,
                frame,
            } => {
                if self.down[node] || self.cut[node] {
                    return Ok(());
                }
                let now = self.now;
                self.nodes[node].deliver(now, writer, &frame, &mut self.rng);
                self.collect_replies(node);
            }
            Envelope::ToWriter {
                writer,
                node,
                request_id,
                reply,
            } => {
                if !self.writers[writer].alive {
                    return Ok(());
                }
                let reply = match reply {
                    Ok(frame) => match wire::Frame::decode(&frame) {
                        Ok(frame) => Ok(frame.message),
                        Err(e) => Err(format!("undecodable reply: {e}")),
                    },
                    Err(e) => Err(e),
                };
                let now = self.now;
                self.writers[writer]
                    .core
                    .handle_reply(now, node, request_id, reply);
                self.pump(writer);
            }
            Envelope::ToPeer {
                from,
                life,
                to,
                frame,
            } => self.deliver_to_peer(from, life, to, &frame),
            Envelope::FromPeer {
                to,
                life,
                from,
                request_id,
                reply,
            } => self.deliver_peer_reply(to, life, from, request_id, reply),
        }
        match self.failure.take() {
            Some(e) => Err(e),
            None => Ok(()),
        }
    }

    fn collect_replies(&mut self, node: usize) {
        for out in self.nodes[node].take_replies() {
            if out.to >= PEER_CONN_BASE {
                self.reply_to_peer(node, out);
                continue;
            }
            if self.cut[node] || out.to >= self.writers.len() {
                continue;
            }
            let frame = wire::Frame {
                request_id: out.request_id,
                message: out.message,
            }
            .to_bytes();
            self.transmit(Envelope::ToWriter {
                writer: out.to,
                node,
                request_id: out.request_id,
                reply: Ok(frame),
            });
        }
        self.collect_peer_requests(node);
    }

    fn complete(&mut self, w: WriterId, completion: Completion) -> Result<(), String> {
        let current = w == self.current;
        match completion {
            Completion::Commit { id, result } => {
                let Some(cpl) = self.writers[w].commits.remove(&id) else {
                    return Ok(());
                };
                if result.is_ok() {
                    if let Some(ceiling) = self.writers[w].ceiling
                        && cpl > ceiling
                    {
                        return Err(format!(
                            "an old writer acknowledged commit {cpl} above the newer writer's recovered VDL {ceiling}"
                        ));
                    }
                    self.model.acknowledged(cpl)?;
                }
            }
            Completion::Read { id, result } => {
                let Some((read_point, exact)) = self.writers[w].reads.remove(&id) else {
                    return Ok(());
                };
                if let Ok(image) = result
                    && (current || exact)
                {
                    self.model
                        .check_read(&image, read_point, exact, PAGE_SIZE)
                        .map_err(|e| format!("writer {w} (exact {exact}): {e}"))?;
                    self.report.reads_checked += 1;
                }
            }
        }
        Ok(())
    }

    /// VDL monotonic per writer; recovery checked against the model once per writer.
    fn check_writers(&mut self) -> Result<(), String> {
        for (n, node) in self.nodes.iter().enumerate() {
            if let Some(why) = node.stopped() {
                return Err(format!("node{} stopped: {why}", n + 1));
            }
        }
        for w in 0..self.writers.len() {
            let writer = &mut self.writers[w];
            if !writer.alive {
                continue;
            }
            let vdl = writer.core.vdl();
            if vdl < writer.vdl {
                return Err(format!(
                    "writer {w}: VDL went back from {} to {vdl}",
                    writer.vdl
                ));
            }
            if let Some(ceiling) = writer.ceiling
                && vdl > ceiling
            {
                return Err(format!(
                    "writer {w}: VDL {vdl} passed a newer writer's recovered VDL {ceiling}"
                ));
            }
            writer.vdl = vdl;
            if !writer.recovered && *writer.core.phase() == Phase::Serving {
                writer.recovered = true;
                let epoch = writer.core.epoch();
                let current_epoch = self.writers[self.current].core.epoch();
                if self.writers[self.current].recovered
                    && current_epoch > epoch
                    && self.current != w
                {
                    // Two recoveries raced and a newer epoch already serves: this writer
                    // finished on stale information and will be fenced at its first
                    // request; it may never acknowledge anything it did not recover.
                    self.trace(&format!(
                        "writer {w} serving late (epoch {:#x} < {:#x})",
                        epoch.0, current_epoch.0
                    ));
                    self.writers[w].ceiling = Some(vdl);
                    continue;
                }
                self.trace(&format!(
                    "writer {w} serving: VDL {vdl} epoch {:#x}",
                    epoch.0
                ));
                self.model.recovered(vdl)?;
                // Every writer that served before may never pass this VDL. One still recovering
                // is judged when it finishes (a recovery that starts over on a newer epoch can
                // end up the volume's newest writer).
                for (x, other) in self.writers.iter_mut().enumerate() {
                    if x != w && other.recovered {
                        other.ceiling = Some(other.ceiling.map_or(vdl, |c| c.min(vdl)));
                    }
                }
                self.current = w;
            }
            if w == self.current {
                self.model.observe_vdl(vdl);
            }
        }
        match self.failure.take() {
            Some(e) => Err(e),
            None => Ok(()),
        }
    }

    /// The current writer (and a running older one, now and then) writes, commits and reads.
    fn workload(&mut self) -> Result<(), String> {
        self.next_op = self.now + Duration::from_micros(self.rng.between(200, 3000));
        // A writer that just finished recovering becomes the model's current one before it
        // writes anything.
        self.check_writers()?;
        let live: Vec<WriterId> = (0..self.writers.len())
            .filter(|w| self.writers[*w].alive && *self.writers[*w].core.phase() == Phase::Serving)
            .collect();
        let Some(&w) = live.get(self.rng.below(live.len().max(1) as u64) as usize) else {
            return Ok(());
        };
        let roll = self.rng.below(10);
        if roll < 7 {
            self.write(w)?;
        } else if roll < 9 {
            self.read(w, false);
        } else {
            self.read(w, true);
        }
        self.pump(w);
        match self.failure.take() {
            Some(e) => Err(e),
            None => Ok(()),
        }
    }

    fn write(&mut self, w: WriterId) -> Result<(), String> {
        if self.writers[w].commits.len() >= COMMITS_INFLIGHT_MAX {
            return Ok(());
        }
        let count = self.rng.between(1, 3);
        let pages = PAGES_PER_PG * u64::from(PG_COUNT);
        let records: Vec<MtrRecord> = (0..count)
            .map(|_| {
                let len = self.rng.between(1, 24) as usize;
                let offset = self.rng.below((PAGE_SIZE - len) as u64) as u32;
                let byte = self.rng.next_u64() as u8;
                MtrRecord {
                    page: PageId(self.rng.below(pages)),
                    op: RedoOp::Write {
                        offset,
                        bytes: vec![byte; len],
                    },
                }
            })
            .collect();
        if !self.writers[w].core.can_write(count) {
            return Ok(());
        }
        let now = self.now;
        match self.writers[w].core.write_mtr(now, records.clone()) {
            Ok(cpl) => {
                if w == self.current {
                    self.model.allocated(cpl, &records);
                }
                match self.writers[w].core.commit(cpl) {
                    Ok(Some(id)) => {
                        self.writers[w].commits.insert(id, cpl);
                    }
                    Ok(None) => self.model.acknowledged(cpl)?,
                    Err(_) => {}
                }
            }
            Err(e) if e.is_fenced() => {}
            Err(engine::core::VolumeError::Writer(_)) => {}
            Err(e) => return Err(format!("write refused unexpectedly: {e}")),
        }
        Ok(())
    }

    fn read(&mut self, w: WriterId, from_storage: bool) {
        let pages = PAGES_PER_PG * u64::from(PG_COUNT);
        let page = PageId(self.rng.below(pages));
        let now = self.now;
        let read_point = self.writers[w].core.vdl();
        let started = if from_storage {
            self.writers[w]
                .core
                .read_page_from(now, page, read_point, None)
        } else {
            self.writers[w].core.read_page(now, page)
        };
        match started {
            ReadStart::Pending(id) => {
                self.writers[w].reads.insert(id, (read_point, from_storage));
            }
            ReadStart::Done(Ok(image)) if w == self.current => {
                let result = self
                    .model
                    .check_read(&image, read_point, false, PAGE_SIZE)
                    .map_err(|e| format!("writer {w} (cache hit): {e}"));
                if let Err(e) = result {
                    self.failure = Some(e);
                }
                self.report.reads_checked += 1;
            }
            ReadStart::Done(_) => {}
        }
    }
}

// Faults.
impl World {
    fn az(node: usize) -> usize {
        node / 2
    }

    fn faulty(&self) -> Vec<usize> {
        (0..NODE_COUNT)
            .filter(|n| self.down[*n] || self.cut[*n])
            .collect()
    }

    /// Whether `faulty` stays within one AZ plus one more node.
    fn within_atlas(faulty: &[usize]) -> bool {
        (0..3).any(|az| faulty.iter().filter(|n| Self::az(**n) != az).count() <= 1)
    }

    fn fault(&mut self) {
        self.next_fault = self.now + ms(self.rng.between(100, 800));
        if self.bit_flips && self.rng.chance(0.15) {
            let node = self.rng.below(NODE_COUNT as u64) as usize;
            self.trace(&format!("bit flip on running node{}'s disk", node + 1));
            self.nodes[node].flip_a_live_bit(&mut self.rng);
        }
        let roll = self.rng.below(100);
        let healthy: Vec<usize> = (0..NODE_COUNT)
            .filter(|n| !self.down[*n] && !self.cut[*n])
            .collect();
        if roll < 35 {
            let node = healthy[self.rng.below(healthy.len() as u64) as usize];
            let mut faulty = self.faulty();
            faulty.push(node);
            if Self::within_atlas(&faulty) {
                self.trace(&format!("crash node{}", node + 1));
                self.nodes[node].crash(&mut self.rng);
                self.down[node] = true;
                self.report.node_crashes += 1;
                self.heal_at[node] = Some(self.now + ms(self.rng.between(50, 3000)));
            }
        } else if roll < 50 {
            let node = healthy[self.rng.below(healthy.len() as u64) as usize];
            let mut faulty = self.faulty();
            faulty.push(node);
            if Self::within_atlas(&faulty) {
                self.trace(&format!("cut node{}", node + 1));
                self.cut[node] = true;
                self.heal_at[node] = Some(self.now + ms(self.rng.between(50, 2000)));
            }
        } else if roll < 57 {
            let az = self.rng.below(3) as usize;
            let mut faulty = self.faulty();
            faulty.extend([2 * az, 2 * az + 1]);
            if Self::within_atlas(&faulty) {
                self.trace(&format!("AZ {az} down"));
                for node in [2 * az, 2 * az + 1] {
                    if !self.down[node] {
                        self.nodes[node].crash(&mut self.rng);
                        self.down[node] = true;
                        self.report.node_crashes += 1;
                    }
                    self.heal_at[node] = Some(self.now + ms(self.rng.between(200, 3000)));
                }
            }
        } else if roll < 63 {
            // The writer crashes; a new one recovers the volume.
            let old = self.current;
            self.trace(&format!(
                "writer {old} crashes; writer {} starts",
                self.writers.len()
            ));
            self.writers[old].alive = false;
            self.start_writer();
        } else if roll < 68 {
            // A new writer recovers while the old one keeps running: it must be fenced.
            let alive: Vec<usize> = (0..self.writers.len())
                .filter(|w| self.writers[*w].alive)
                .collect();
            if alive.len() >= 2 {
                self.writers[alive[0]].alive = false;
            }
            self.trace(&format!(
                "writer {} starts beside the running one",
                self.writers.len()
            ));
            self.start_writer();
        }
    }

    fn heal_node(&mut self, node: usize) {
        self.trace(&format!("node{} back", node + 1));
        self.heal_at[node] = None;
        if self.down[node] {
            self.lives[node] += 1;
            if self.bit_flips && self.faults_on && self.rng.chance(0.2) {
                self.trace(&format!("bit flip on node{}'s disk", node + 1));
                self.nodes[node].flip_a_bit(&mut self.rng);
            }
            self.nodes[node].restart();
        }
        self.down[node] = false;
        self.cut[node] = false;
    }

    /// Ends the fault phase: every node back, no more network faults, a serving writer.
    fn heal(&mut self) {
        self.faults_on = false;
        for node in 0..NODE_COUNT {
            self.heal_node(node);
        }
        let writer = &self.writers[self.current];
        let usable =
            writer.alive && !matches!(writer.core.phase(), Phase::Fenced(_) | Phase::Failed(_));
        let newer_running =
            self.writers.len() > self.current + 1 && self.writers.last().is_some_and(|w| w.alive);
        if !usable && !newer_running {
            self.start_writer();
        }
    }

    fn recovering_writer(&self) -> bool {
        self.writers
            .iter()
            .any(|w| w.alive && matches!(w.core.phase(), Phase::Recovering(_)))
    }

    /// After healing: if no live writer serves or recovers, a new one starts (an operator
    /// restarting the database).
    fn ensure_writer(&mut self) {
        let working = self.writers.iter().any(|w| {
            w.alive && matches!(w.core.phase(), Phase::Recovering(_))
                || w.alive && *w.core.phase() == Phase::Serving && w.ceiling.is_none()
        });
        if !working {
            self.trace("no writer serves: a new one starts");
            self.start_writer();
        }
    }

    /// Every page, read from storage at the final VDL, equals the model.
    fn final_check(&mut self) -> Result<(), String> {
        let w = self.current;
        let pages = PAGES_PER_PG * u64::from(PG_COUNT);
        for page in 0..pages {
            let vdl = self.writers[w].core.vdl();
            let now = self.now;
            let started = self.writers[w]
                .core
                .read_page_from(now, PageId(page), vdl, None);
            let id = match started {
                ReadStart::Pending(id) => id,
                ReadStart::Done(r) => {
                    return Err(format!("final read of page {page} failed: {r:?}"));
                }
            };
            self.writers[w].reads.insert(id, (vdl, true));
            let deadline = self.now + ms(10_000);
            while self.writers[w].reads.contains_key(&id) {
                if self.now >= deadline {
                    return Err(format!("final read of page {page} never completed"));
                }
                self.step()?;
            }
        }
        Ok(())
    }
}

impl Envelope {
    fn clone_envelope(&self) -> Self {
        match self {
            Envelope::ToNode {
                writer,
                node,
                frame,
            } => Envelope::ToNode {
                writer: *writer,
                node: *node,
                frame: frame.clone(),
            },
            Envelope::ToWriter {
                writer,
                node,
                request_id,
                reply,
            } => Envelope::ToWriter {
                writer: *writer,
                node: *node,
                request_id: *request_id,
                reply: reply.clone(),
            },
            Envelope::ToPeer {
                from,
                life,
                to,
                frame,
            } => Envelope::ToPeer {
                from: *from,
                life: *life,
                to: *to,
                frame: frame.clone(),
            },
            Envelope::FromPeer {
                to,
                life,
                from,
                request_id,
                reply,
            } => Envelope::FromPeer {
                to: *to,
                life: *life,
                from: *from,
                request_id: *request_id,
                reply: reply.clone(),
            },
        }
    }
}

/// Runs one seed; a panic (an assertion in a core) is a failure like any other.
pub fn run_seed(options: &Options) -> Result<Report, String> {
    let run = std::panic::catch_unwind(|| {
        let mut world = World::new(options.seed, options.bug, options.model_nodes);
        world.bit_flips = options.bit_flips;
        if options.throttle {
            world.throttle_nodes(options.seed);
        }
        world.run(options)
    });
    run.unwrap_or_else(|panic| {
        let message = panic
            .downcast_ref::<String>()
            .cloned()
            .or_else(|| panic.downcast_ref::<&str>().map(|s| (*s).to_string()))
            .unwrap_or_default();
        Err(format!("panicked: {message}"))
    })
}

// Gossip between the nodes, over the simulated network.
impl World {
    /// Puts node `node`'s gossip requests on the network. A request to a node that is down or
    /// cut off (or from one cut off) fails soon, as the real driver's connection attempt does.
    fn collect_peer_requests(&mut self, node: usize) {
        for (peer, request_id, message) in self.nodes[node].take_peer_requests() {
            let to = self
                .layout
                .node_names
                .iter()
                .position(|n| *n == peer)
                .expect("peers are placed nodes");
            let life = self.lives[node];
            if self.down[to] || self.cut[to] || self.cut[node] {
                let delay = Duration::from_micros(self.rng.between(100, 2000));
                let reply = Err(format!("{peer} unreachable"));
                let envelope = Envelope::FromPeer {
                    to: node,
                    life,
                    from: to,
                    request_id,
                    reply,
                };
                self.send_later(delay, envelope);
                continue;
            }
            let frame = wire::Frame {
                request_id,
                message,
            }
            .to_bytes();
            self.transmit(Envelope::ToPeer {
                from: node,
                life,
                to,
                frame,
            });
        }
    }

    fn deliver_to_peer(&mut self, from: usize, life: u64, to: usize, frame: &[u8]) {
        if self.down[to] || self.cut[to] || self.cut[from] {
            return; // Lost: the asker's deadline notices.
        }
        let now = self.now;
        // The connection names the asker and its life, so the reply finds its way back.
        let conn = PEER_CONN_BASE + usize::try_from(life).expect("few lives") * NODE_COUNT + from;
        self.nodes[to].deliver_from_peer(now, conn, frame, &mut self.rng);
        self.collect_replies(to);
    }

    fn reply_to_peer(&mut self, node: usize, out: Outgoing) {
        let asker = (out.to - PEER_CONN_BASE) % NODE_COUNT;
        let life = ((out.to - PEER_CONN_BASE) / NODE_COUNT) as u64;
        if self.cut[node] {
            return;
        }
        let frame = wire::Frame {
            request_id: out.request_id,
            message: out.message,
        }
        .to_bytes();
        self.transmit(Envelope::FromPeer {
            to: asker,
            life,
            from: node,
            request_id: out.request_id,
            reply: Ok(frame),
        });
    }

    fn deliver_peer_reply(
        &mut self,
        to: usize,
        life: u64,
        from: usize,
        request_id: u64,
        reply: Result<Vec<u8>, String>,
    ) {
        if self.down[to] || self.lives[to] != life {
            return; // The asker crashed meanwhile: its new life never asked.
        }
        let reply = match reply {
            Ok(frame) => match wire::Frame::decode(&frame) {
                Ok(frame) => Ok(frame.message),
                Err(e) => Err(format!("undecodable reply: {e}")),
            },
            Err(e) => Err(e),
        };
        let now = self.now;
        let peer = self.layout.node_names[from].clone();
        self.nodes[to].peer_reply(now, &peer, request_id, reply);
        self.collect_replies(to);
    }

    /// Gossip's liveness: the writers write on for two virtual seconds (so every node hears
    /// the current epoch and its truncations), then stop; within 30 virtual seconds every
    /// live segment must reach its PG's highest SCL, every node at the writer's epoch.
    fn check_convergence(&mut self) -> Result<(), String> {
        let write_until = self.now + ms(2_000);
        while self.now < write_until {
            self.step()?;
        }
        self.writing = false;
        let deadline = self.now + ms(30_000);
        loop {
            let diverged = self.divergence();
            let Some(why) = diverged else {
                return Ok(());
            };
            if self.now >= deadline {
                for n in 0..NODE_COUNT {
                    self.trace(&format!("node{}: {}", n + 1, self.nodes[n].debug()));
                }
                return Err(format!(
                    "SCLs did not converge within 30 s of healing: {why}"
                ));
            }
            self.step()?;
        }
    }

    /// Why the live segments' SCLs do not (yet) agree, if they do not.
    fn divergence(&self) -> Option<String> {
        let epoch = self.writers[self.current].core.epoch();
        let mut by_pg: BTreeMap<PgId, Vec<(usize, Lsn)>> = BTreeMap::new();
        for (n, node) in self.nodes.iter().enumerate() {
            let (node_epoch, scls) = node.scls()?;
            if node_epoch != epoch {
                return Some(format!(
                    "node{} is at epoch {:#x}, the writer at {:#x}",
                    n + 1,
                    node_epoch.0,
                    epoch.0
                ));
            }
            for (pg, scl) in scls {
                by_pg.entry(pg).or_default().push((n, scl));
            }
        }
        if self.bit_flips {
            let damaged = (0..NODE_COUNT).find(|n| self.nodes[*n].damage_outstanding() > 0);
            if let Some(n) = damaged {
                return Some(format!(
                    "node{} has {} damaged pages or records not yet repaired",
                    n + 1,
                    self.nodes[n].damage_outstanding()
                ));
            }
        }
        for (pg, scls) in by_pg {
            let highest = scls.iter().map(|(_, scl)| *scl).max().unwrap_or(Lsn::ZERO);
            if let Some((n, scl)) = scls.iter().find(|(_, scl)| *scl < highest) {
                return Some(format!(
                    "pg {pg}: node{} has SCL {scl}, the PG's highest is {highest}",
                    n + 1
                ));
            }
        }
        None
    }
}
