//! Gossip and gap filling: a segment that is behind its peers fetches the records it misses
//! from a peer that has them, with no help from the engine. Pure: the time comes in as an
//! argument, jitter comes from a seeded generator, and every network exchange is a
//! [`NodeOutput::PeerRequest`] out and a [`NodeCore::handle_peer_reply`] in.
//!
//! Pull-based. Every `poll_interval` (± a quarter, seeded jitter) the node asks each peer node
//! of each volume it hosts for `GetVolumeState`, and notes the epoch and the SCL of every
//! segment the placement says that peer hosts. A hosted segment whose SCL is below a peer
//! segment's (same PG, same epoch, heard from within `peer_fresh`) asks that peer for
//! `FetchRecords(after = own SCL, through = min(peer SCL, end of the first known hole))` at
//! the volume's epoch. The reply is checked (the segment asked for, LSNs in the range, one
//! epoch per record and none newer than ours, pages of this PG, and the records linking up:
//! the first one's backlink is `after`, each next one's the previous LSN), records already
//! held or annulled by a truncation known here are dropped, and the rest go into the journal
//! through the commit queue as internal Append entries, one per run of records of one epoch
//! (each record keeps the epoch it was written with on the peer, so a truncation annuls the
//! copy exactly when it annuls the original). They are indexed like appended records once
//! durable, which advances the SCL.
//!
//! A peer that refuses a range (for example because it has compacted it below its chain's
//! base) or whose records do not link to ours is skipped for that range for `refusal_ttl`;
//! when no peer can serve a segment that is behind, one WARN names the segment and the range.
//!
//! # Invariants
//! - at most one `GetVolumeState` per (peer node, volume) and one `FetchRecords` per hosted
//!   segment are in flight, and every request has a deadline kept here: a peer that never
//!   answers costs one request per interval, never a wait;
//! - a segment has at most one fetched batch in the journal queue at a time, and a fetch
//!   asks for at most [`GOSSIP_FETCH_BYTES_MAX`] bytes: gossip's share of the journal is
//!   bounded;
//! - records are copied only from a peer at exactly the volume's epoch in force here, and
//!   only if they link to this segment's chain; a record in a truncated range is never
//!   persisted by gossip (and, as for appends, never indexed if a truncation arrives later);
//! - a fetched batch is never answered to anyone: it is indexed when durable and only then
//!   may the segment fetch again.

#![deny(clippy::disallowed_methods)]

use std::collections::{BTreeMap, BTreeSet};
use std::time::{Duration, Instant};

use wire::{
    Append, Epoch, ErrorCode, FetchRecords, Geometry, LogRecord, Lsn, Message, PageId, PeerNode,
    PgId, Records, SegmentIndex, VolumeId, VolumeState,
};

use super::commit::Batch;
use super::{ConnId, NodeCore, NodeOutput, Phase, RecordInBody, volume_keys};
use crate::manifest::{SegmentKey, truncated};

/// Most bytes of records one fetch asks for: a gossip entry stays well inside a journal group.
pub const GOSSIP_FETCH_BYTES_MAX: u32 = 1 << 20;
const _: () = assert!((GOSSIP_FETCH_BYTES_MAX as usize) < super::GROUP_ENTRY_BYTES_MAX / 2);
const _: () = assert!((GOSSIP_FETCH_BYTES_MAX as usize) <= super::FETCH_BYTES_MAX);

/// Most holes [`missing_ranges`] reports for one segment.
pub const GAPS_REPORTED_MAX: usize = 64;

/// Gossip's timing, and the seed of its jitter.
#[derive(Clone, Debug)]
pub struct GossipConfig {
    /// Off: no peer request is ever made (the node still answers its peers).
    pub enabled: bool,
    /// How often each peer node is asked for its volume state (± a quarter of it).
    pub poll_interval: Duration,
    /// Deadline of a `GetVolumeState`.
    pub state_timeout: Duration,
    /// Deadline of a `FetchRecords`.
    pub fetch_timeout: Duration,
    /// A peer's SCL counts (for fetching and for [`NodeCore::peer_scl_floor`]) only if it was
    /// heard from this recently.
    pub peer_fresh: Duration,
    /// How long a peer that refused a range (or sent records that do not link) is not asked
    /// for it again.
    pub refusal_ttl: Duration,
    /// Seed of the poll jitter.
    pub seed: u64,
}

impl GossipConfig {
    /// The defaults, with a jitter seed derived from the node's name (so two nodes started
    /// together do not poll in lockstep, and a run is reproducible).
    pub fn for_node(name: &str) -> Self {
        // FNV-1a: stable across runs and platforms.
        let seed = name.bytes().fold(0xcbf2_9ce4_8422_2325u64, |h, b| {
            (h ^ u64::from(b)).wrapping_mul(0x0100_0000_01b3)
        });
        Self {
            enabled: true,
            poll_interval: Duration::from_millis(500),
            state_timeout: Duration::from_secs(2),
            fetch_timeout: Duration::from_secs(5),
            peer_fresh: Duration::from_secs(5),
            refusal_ttl: Duration::from_secs(5),
            seed,
        }
    }
}

/// A hole in a segment's chain: records with LSNs in `(after, through]` are missing, and the
/// one at `through` certainly is (a record held above it names it as its backlink).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Gap {
    pub after: Lsn,
    pub through: Lsn,
}

/// The holes of a chain whose SCL is `scl` and which holds `beyond` above it (`(lsn,
/// backlink)` in LSN order, as [`crate::segment::Segment::beyond_scl`] gives them): for each
/// held record whose backlink is not held, the range from the held record before that backlink
/// to the backlink. A backlink below the previous held record (a record of another lineage,
/// left for its truncation to remove) says nothing and is skipped. At most
/// [`GAPS_REPORTED_MAX`] holes, lowest first.
pub fn missing_ranges(scl: Lsn, beyond: impl Iterator<Item = (Lsn, Lsn)>) -> Vec<Gap> {
    let mut gaps = Vec::new();
    let mut previous = scl;
    for (lsn, backlink) in beyond {
        assert!(
            lsn > previous,
            "held records come in LSN order above the SCL"
        );
        assert!(backlink < lsn, "the decoder checked the backlink");
        if backlink > previous {
            gaps.push(Gap {
                after: previous,
                through: backlink,
            });
            if gaps.len() == GAPS_REPORTED_MAX {
                break;
            }
        }
        previous = lsn;
    }
    assert!(gaps.windows(2).all(|w| w[0].through < w[1].after));
    gaps
}

/// What gossip has done since the core started (for logs, metrics and the simulator).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct GossipStats {
    /// Peer requests sent.
    pub requests: u64,
    /// Of which FetchRecords.
    pub fetches: u64,
    /// Peer requests that failed (no reply, refused, or a reply that did not check out).
    pub failures: u64,
    /// Records fetched from peers and queued for the journal.
    pub records_fetched: u64,
}

/// What the node last heard of one peer segment.
#[derive(Clone, Copy, Debug)]
struct PeerView {
    epoch: Epoch,
    scl: Lsn,
    /// The SCL the peer reported one poll earlier (at its epoch): what a segment fetches up
    /// to. Records a peer got only since the last poll are most likely on their way here from
    /// the writer too; fetching them as well would double every node's journal writes under
    /// load (measured: commit throughput at 16 in flight fell from 7.5k/s to 4.3k/s).
    settled: Lsn,
    heard: Instant,
}

/// A peer request waiting for its reply.
#[derive(Clone, Debug)]
enum Pending {
    State {
        peer: PeerNode,
        volume: VolumeId,
    },
    Fetch {
        peer: PeerNode,
        own: SegmentKey,
        from: SegmentIndex,
        after: Lsn,
        through: Lsn,
        epoch: Epoch,
    },
    /// Pages for the rebuild of `own`, asked of the peer segment `from`.
    Pages {
        peer: PeerNode,
        own: SegmentKey,
        fetch: wire::FetchPages,
    },
    /// A damaged page of `own`, asked of the peer segment `from` as of `read_point`.
    Page {
        peer: PeerNode,
        own: SegmentKey,
        from: SegmentIndex,
        page: PageId,
        read_point: Lsn,
        epoch: Epoch,
    },
}

/// Gossip's state inside the core.
pub(super) struct Gossip {
    config: GossipConfig,
    rng: u64,
    /// Where every segment of the hosted PGs lives (this node's own ones included).
    placement: BTreeMap<SegmentKey, PeerNode>,
    /// When each (peer node, volume) is asked next (`None`: at the next timeout).
    polls: BTreeMap<(PeerNode, VolumeId), Option<Instant>>,
    /// What each peer segment said last, by the peer segment's key.
    views: BTreeMap<SegmentKey, PeerView>,
    pending: BTreeMap<u64, (Instant, Pending)>,
    next_request_id: u64,
    /// Own segments with a fetch in flight or a fetched batch in the journal queue.
    busy: BTreeSet<SegmentKey>,
    /// Fetched batches of each own segment queued or being persisted.
    batches: BTreeMap<SegmentKey, usize>,
    /// (own segment, peer segment) → (the `after` refused, until when).
    refused: BTreeMap<(SegmentKey, SegmentIndex), (Lsn, Instant)>,
    /// Own segments already warned about, with the SCL they were stuck at.
    warned: BTreeMap<SegmentKey, Lsn>,
    /// The latest time the core was given; a fetch may be planned at once from it.
    last_now: Option<Instant>,
    /// Fetches may be planned (something changed since the last planning).
    pub(super) plan_due: bool,
    /// No fetch is planned before this (the journal refused a fetched batch: it is full).
    hold_until: Option<Instant>,
    stats: GossipStats,
}

/// splitmix64: a small, seeded, deterministic generator for the poll jitter.
fn next_random(state: &mut u64) -> u64 {
    *state = state.wrapping_add(0x9e37_79b9_7f4a_7c15);
    let mut z = *state;
    z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    z ^ (z >> 31)
}

impl Gossip {
    pub(super) fn new(config: GossipConfig, placement: BTreeMap<SegmentKey, PeerNode>) -> Self {
        let rng = config.seed;
        Self {
            config,
            rng,
            placement,
            polls: BTreeMap::new(),
            views: BTreeMap::new(),
            pending: BTreeMap::new(),
            next_request_id: 1,
            busy: BTreeSet::new(),
            batches: BTreeMap::new(),
            refused: BTreeMap::new(),
            warned: BTreeMap::new(),
            last_now: None,
            plan_due: true,
            hold_until: None,
            stats: GossipStats::default(),
        }
    }

    pub(super) fn placement(&self) -> &BTreeMap<SegmentKey, PeerNode> {
        &self.placement
    }

    /// The poll interval with ± 25 % jitter.
    fn jittered_interval(&mut self) -> Duration {
        let base = self.config.poll_interval;
        let quarter = u64::try_from(base.as_micros() / 4)
            .unwrap_or(u64::MAX)
            .max(1);
        let offset = next_random(&mut self.rng) % (2 * quarter);
        let jittered = base - Duration::from_micros(quarter) + Duration::from_micros(offset);
        assert!(jittered <= base + base / 4 + Duration::from_micros(1));
        assert!(jittered + base / 4 + Duration::from_micros(1) >= base);
        jittered
    }

    fn request_id(&mut self) -> u64 {
        let id = self.next_request_id;
        self.next_request_id += 1;
        assert!(
            !self.pending.contains_key(&id),
            "request ids are issued once"
        );
        assert!(id >= 1);
        id
    }
}

impl NodeCore {
    /// Replaces gossip's timing and jitter seed (tests and the simulator; the defaults come
    /// from [`GossipConfig::for_node`]).
    pub fn configure_gossip(&mut self, config: GossipConfig) {
        assert!(config.poll_interval > Duration::ZERO);
        assert!(config.state_timeout > Duration::ZERO && config.fetch_timeout > Duration::ZERO);
        self.gossip.rng = config.seed;
        self.gossip.config = config;
        self.gossip.polls.values_mut().for_each(|at| *at = None);
    }

    /// When [`NodeCore::handle_timeout`] wants to be called next, if ever. A driver calls it
    /// once when it starts serving, and again whenever this time passes.
    pub fn poll_timeout(&self) -> Option<Instant> {
        let next = [
            self.background_timeout(),
            self.backup_timeout(),
            self.gossip_timeout(),
            self.scrub_timeout(),
            self.throttle_timeout(),
        ]
        .into_iter()
        .flatten()
        .min();
        assert!(next.is_none() || self.phase != Phase::Recovering);
        next
    }

    /// The latest time the core was given, if any.
    pub(super) fn gossip_now(&self) -> Option<Instant> {
        self.gossip.last_now
    }

    fn gossip_timeout(&self) -> Option<Instant> {
        let g = &self.gossip;
        if !g.config.enabled || self.phase != Phase::Serving {
            return None;
        }
        let deadlines = g.pending.values().map(|(deadline, _)| *deadline);
        let polls = g.polls.values().map(|at| at.or(g.last_now));
        let mut next = deadlines.chain(polls.flatten()).min();
        if g.plan_due {
            next = next.min(g.last_now).or(g.last_now);
        }
        assert!(next.is_none() || g.last_now.is_some() || g.pending.is_empty());
        next
    }

    /// Time passed: held acks that are due leave, expired peer requests fail, due peers are
    /// polled, fetches are planned.
    pub fn handle_timeout(&mut self, now: Instant) {
        self.note_now(now);
        if matches!(self.phase, Phase::Serving | Phase::ShuttingDown) {
            self.release_held_acks(now);
        }
        if !self.gossip.config.enabled || self.phase != Phase::Serving {
            return;
        }
        let expired: Vec<u64> = self
            .gossip
            .pending
            .iter()
            .filter(|(_, (deadline, _))| *deadline <= now)
            .map(|(id, _)| *id)
            .collect();
        for id in expired {
            let (_, pending) = self.gossip.pending.remove(&id).expect("listed above");
            self.peer_request_failed(now, &pending, "no reply before the deadline");
        }
        self.poll_peers(now);
        self.plan_fetches(now);
        self.plan_repairs(now);
        assert!(self.gossip.pending.values().all(|(d, _)| *d > now));
    }

    /// Notes the latest time the core was given (gossip plans from it).
    pub(super) fn note_now(&mut self, now: Instant) {
        let g = &mut self.gossip;
        g.last_now = Some(g.last_now.map_or(now, |last| last.max(now)));
        assert!(g.last_now >= Some(now));
    }

    /// The lowest SCL among the peers of `key`'s PG heard from within `peer_fresh` (their
    /// own segments, not `key`): what a lagging peer may still need from this node's journal.
    pub fn peer_scl_floor(&self, key: &SegmentKey, now: Instant) -> Option<Lsn> {
        let g = &self.gossip;
        let floor = g
            .views
            .range(pg_keys(key))
            .filter(|(peer, _)| peer.segment != key.segment)
            .filter(|(_, view)| now.saturating_duration_since(view.heard) <= g.config.peer_fresh)
            .map(|(_, view)| view.scl)
            .min();
        assert!(floor.is_none() || !g.views.is_empty());
        floor
    }

    /// For garbage collection: the lowest SCL of `key`'s peers if all five were heard from
    /// recently (as of the last time the core was given), else `None` (some peer's needs are
    /// unknown).
    pub(super) fn peer_scl_floor_all(&self, key: &SegmentKey) -> Option<Lsn> {
        let g = &self.gossip;
        let now = g.last_now?;
        let fresh: Vec<Lsn> = g
            .views
            .range(pg_keys(key))
            .filter(|(peer, _)| peer.segment != key.segment)
            .filter(|(_, view)| now.saturating_duration_since(view.heard) <= g.config.peer_fresh)
            .map(|(_, view)| view.scl)
            .collect();
        (fresh.len() == wire::PG_SIZE - 1).then(|| fresh.into_iter().min().expect("five"))
    }

    /// The peer segments of `key`'s PG heard from within `peer_fresh` (as of the last time
    /// the core was given): `(segment, epoch, SCL)`.
    pub(super) fn fresh_peer_views(
        &self,
        key: &SegmentKey,
    ) -> impl Iterator<Item = (SegmentIndex, Epoch, Lsn)> + '_ {
        let g = &self.gossip;
        let now = g.last_now;
        let own = key.segment;
        g.views
            .range(pg_keys(key))
            .filter(move |(peer, _)| peer.segment != own)
            .filter(move |(_, view)| {
                now.is_some_and(|now| {
                    now.saturating_duration_since(view.heard) <= g.config.peer_fresh
                })
            })
            .map(|(peer, view)| (peer.segment, view.epoch, view.scl))
    }

    /// Sends `pending` (built for the node holding `from` of `own`'s PG) with gossip's fetch
    /// deadline.
    fn ask_segment(
        &mut self,
        now: Instant,
        own: SegmentKey,
        from: SegmentIndex,
        pending: impl FnOnce(PeerNode) -> Pending,
    ) {
        let peer_key = SegmentKey {
            segment: from,
            ..own
        };
        let peer = self.gossip.placement[&peer_key].clone();
        let deadline = now + self.gossip.config.fetch_timeout;
        self.send_peer_request(deadline, pending(peer));
    }

    /// Fetches `(after, through]` of `own` from segment `from` at this node's epoch; `own`
    /// stays busy until the records are durable (or the fetch fails).
    fn start_fetch(
        &mut self,
        now: Instant,
        own: SegmentKey,
        from: SegmentIndex,
        (after, through): (Lsn, Lsn),
    ) {
        self.gossip.busy.insert(own);
        let epoch = self.epoch(own.volume);
        self.ask_segment(now, own, from, |peer| Pending::Fetch {
            peer,
            own,
            from,
            after,
            through,
            epoch,
        });
    }

    /// Sends a rebuild's FetchPages to the peer segment `from`.
    pub(super) fn send_fetch_pages(
        &mut self,
        now: Instant,
        own: SegmentKey,
        from: SegmentIndex,
        fetch: wire::FetchPages,
    ) {
        self.ask_segment(now, own, from, |peer| Pending::Pages { peer, own, fetch });
    }

    /// How long a refusing peer is left alone.
    pub(super) fn gossip_refusal_ttl(&self) -> Duration {
        self.gossip.config.refusal_ttl
    }

    /// `own` moved on (a rebuild): what peers refused it before no longer applies.
    pub(super) fn gossip_forget_refusals(&mut self, own: SegmentKey) {
        self.gossip.refused.retain(|(key, _), _| *key != own);
        self.gossip.warned.remove(&own);
        self.gossip.plan_due = true;
    }

    /// Asks the peer segment `from` for `page` of `own` as of `read_point` (a repair).
    pub(super) fn send_page_repair(
        &mut self,
        now: Instant,
        own: SegmentKey,
        from: SegmentIndex,
        (page, read_point): (PageId, Lsn),
    ) {
        let epoch = self.epoch(own.volume);
        self.ask_segment(now, own, from, |peer| Pending::Page {
            peer,
            own,
            from,
            page,
            read_point,
            epoch,
        });
    }

    /// Fetches the damaged record `lsn` of `own` again, from a peer that has it (unless a
    /// fetch of `own` is under way).
    pub(super) fn plan_record_repair(
        &mut self,
        now: Instant,
        own: SegmentKey,
        lsn: Lsn,
        backlink: Lsn,
    ) {
        if !self.gossip.config.enabled || self.gossip.busy.contains(&own) {
            return;
        }
        let sources = self.repair_sources(&own, lsn);
        let from = sources.into_iter().map(|(from, _)| from).find(|from| {
            let refused = self.gossip.refused.get(&(own, *from));
            !refused.is_some_and(|(after, until)| *after == backlink && now < *until)
        });
        if let Some(from) = from {
            self.start_fetch(now, own, from, (backlink, lsn));
        }
    }

    /// What gossip has done so far.
    pub fn gossip_stats(&self) -> GossipStats {
        let stats = self.gossip.stats;
        assert!(stats.failures <= stats.requests);
        stats
    }

    /// The known holes of a hosted segment's chain (see [`missing_ranges`]).
    pub fn gaps(&self, key: &SegmentKey) -> Vec<Gap> {
        let Some(segment) = self.segments.get(key) else {
            return Vec::new();
        };
        let gaps = missing_ranges(segment.scl(), segment.beyond_scl());
        assert!(gaps.first().is_none_or(|g| g.after == segment.scl()));
        gaps
    }

    /// Records where the hosted PGs' segments live, from a HostSegments that carries a
    /// placement (one without says nothing about peers). Returns whether anything changed.
    pub(super) fn install_placement(&mut self, host: &wire::HostSegments) -> bool {
        let mut changed = false;
        let hosted: BTreeSet<PgId> = self
            .segments
            .range(volume_keys(host.volume))
            .map(|(key, _)| key.pg)
            .collect();
        for pg in &host.placement {
            if !hosted.contains(&pg.pg) {
                continue; // Only the placement of PGs hosted here is kept.
            }
            for (index, node) in pg.nodes.iter().enumerate() {
                let key = SegmentKey {
                    volume: host.volume,
                    pg: pg.pg,
                    segment: SegmentIndex(u32::try_from(index).expect("PG_SIZE is small")),
                };
                let node = host.nodes[usize::from(*node)].clone();
                if self.gossip.placement.get(&key) != Some(&node) {
                    self.gossip.placement.insert(key, node);
                    changed = true;
                }
            }
        }
        if changed {
            self.refresh_poll_targets();
        }
        assert!(self.gossip.placement.len() <= wire::PG_SIZE * self.segments.len().max(1));
        changed
    }

    /// Every (peer node, volume) to poll, from the placement; keeps the schedule of those that
    /// stay.
    pub(super) fn refresh_poll_targets(&mut self) {
        let own = self.config.name.as_str();
        let mut targets = BTreeMap::new();
        // The placement holds hosted PGs only (segments are never unhosted).
        for (key, node) in &self.gossip.placement {
            if node.name == own {
                continue;
            }
            let target = (node.clone(), key.volume);
            let at = self.gossip.polls.get(&target).copied().flatten();
            targets.insert(target, at);
        }
        self.gossip.polls = targets;
        self.gossip.plan_due = true;
        assert!(self.gossip.polls.keys().all(|(n, _)| n.name != own));
    }

    /// Sends `GetVolumeState` to every peer whose turn it is and that has none in flight.
    fn poll_peers(&mut self, now: Instant) {
        let due: Vec<(PeerNode, VolumeId)> = self
            .gossip
            .polls
            .iter()
            .filter(|(_, at)| at.is_none_or(|at| at <= now))
            .map(|(target, _)| target.clone())
            .collect();
        for target in due {
            let interval = self.gossip.jittered_interval();
            // The first poll of a target is spread over one interval.
            let first = self.gossip.polls[&target].is_none();
            let at = if first {
                now + interval / 2
            } else {
                now + interval
            };
            self.gossip.polls.insert(target.clone(), Some(at));
            let busy = self.gossip.pending.values().any(|(_, p)| {
                matches!(p, Pending::State { peer, volume } if *peer == target.0 && *volume == target.1)
            });
            if first || busy {
                continue;
            }
            let (peer, volume) = target;
            let deadline = now + self.gossip.config.state_timeout;
            self.send_peer_request(deadline, Pending::State { peer, volume });
        }
        assert!(self.gossip.polls.values().all(Option::is_some));
    }

    fn send_peer_request(&mut self, deadline: Instant, pending: Pending) {
        let request_id = self.gossip.request_id();
        let (peer, message) = match &pending {
            Pending::State { peer, volume } => (peer.clone(), Message::GetVolumeState(*volume)),
            Pending::Fetch {
                peer,
                own,
                from,
                after,
                through,
                epoch,
            } => {
                let fetch = FetchRecords {
                    volume: own.volume,
                    epoch: *epoch,
                    pg: own.pg,
                    segment: *from,
                    after: *after,
                    through: *through,
                    bytes_max: GOSSIP_FETCH_BYTES_MAX,
                };
                self.gossip.stats.fetches += 1;
                (peer.clone(), Message::FetchRecords(fetch))
            }
            Pending::Pages { peer, fetch, .. } => (peer.clone(), Message::FetchPages(*fetch)),
            Pending::Page {
                peer,
                own,
                from,
                page,
                read_point,
                epoch,
            } => {
                let read = wire::ReadPage {
                    volume: own.volume,
                    epoch: *epoch,
                    pg: own.pg,
                    segment: *from,
                    page: *page,
                    read_point: *read_point,
                };
                (peer.clone(), Message::ReadPage(read))
            }
        };
        assert!(
            peer.name != self.config.name,
            "a node does not gossip with itself"
        );
        self.gossip.pending.insert(request_id, (deadline, pending));
        self.gossip.stats.requests += 1;
        self.outputs.push_back(NodeOutput::PeerRequest {
            peer,
            request_id,
            message,
        });
    }

    /// The reply to a [`NodeOutput::PeerRequest`] from `peer`, or why none came (the driver
    /// could not connect, the stream broke, the reply did not decode). A reply after the
    /// request's deadline, or for a request the core does not know, is ignored.
    pub fn handle_peer_reply(
        &mut self,
        now: Instant,
        peer: &PeerNode,
        request_id: u64,
        reply: Result<Message, String>,
    ) {
        self.note_now(now);
        if self.phase != Phase::Serving {
            return;
        }
        let Some((_, pending)) = self.gossip.pending.remove(&request_id) else {
            return; // Expired, or a duplicate.
        };
        let asked = peer_of(&pending);
        assert!(
            asked == peer,
            "the driver reports replies from the peer asked"
        );
        match (reply, &pending) {
            (Ok(Message::VolumeState(state)), Pending::State { peer, volume })
                if state.volume == *volume =>
            {
                self.note_volume_state(now, peer, &state);
            }
            (Ok(Message::Records(records)), Pending::Fetch { .. }) => {
                self.handle_records(now, &pending, records);
            }
            (
                Ok(Message::Page(reply)),
                Pending::Page {
                    own,
                    page,
                    read_point,
                    ..
                },
            ) => {
                self.handle_page_repair(now, *own, (*page, *read_point), reply);
            }
            (Ok(Message::Pages(pages)), Pending::Pages { own, .. }) => {
                self.handle_pages(now, *own, pages);
            }
            (Ok(Message::Error(e)), _) => {
                let why = format!("{:?}: {}", e.code, e.message);
                let refusal = !matches!(e.code, ErrorCode::ShuttingDown);
                self.peer_refused(now, &pending, &why, refusal);
            }
            (Ok(other), _) => {
                let why = format!("unexpected reply {}", other.name());
                self.peer_refused(now, &pending, &why, true);
            }
            (Err(why), _) => self.peer_request_failed(now, &pending, &why),
        }
        self.gossip.plan_due = true;
        self.plan_fetches(now);
        self.plan_repairs(now);
    }

    /// Notes the SCL of every segment the placement says `peer` hosts.
    fn note_volume_state(&mut self, now: Instant, peer: &PeerNode, state: &VolumeState) {
        let mut noted = 0usize;
        for s in &state.segments {
            let key = SegmentKey {
                volume: state.volume,
                pg: s.pg,
                segment: s.segment,
            };
            if self.gossip.placement.get(&key) != Some(peer) {
                continue; // Only what the placement says the peer hosts counts.
            }
            let settled = self
                .gossip
                .views
                .get(&key)
                .filter(|old| old.epoch == state.epoch)
                .map_or(Lsn::ZERO, |old| old.scl.min(s.scl));
            let view = PeerView {
                epoch: state.epoch,
                scl: s.scl,
                settled,
                heard: now,
            };
            self.gossip.views.insert(key, view);
            if state.epoch == self.epoch(state.volume) {
                self.note_peer_backup(&key, s.backed_up, s.snapshot);
            }
            noted += 1;
        }
        assert!(noted <= state.segments.len());
        if state.epoch != self.epoch(state.volume) {
            tracing::debug!(
                "peer {} is at epoch {} of volume {}, this node at {}: not copying from it",
                peer.name,
                state.epoch,
                state.volume,
                self.epoch(state.volume)
            );
        }
    }

    /// A request got no answer (the driver's error, or the deadline): a failed fetch frees
    /// its segment to try again (another peer, if this one stays silent).
    fn peer_request_failed(&mut self, now: Instant, pending: &Pending, why: &str) {
        self.gossip.stats.failures += 1;
        tracing::debug!("gossip request to {} failed: {why}", peer_of(pending).name);
        if let Pending::Page { own, page, .. } = pending {
            self.page_repair_failed(now, *own, *page, why);
        }
        if let Pending::Pages { own, .. } = pending {
            self.rebuild_failed(now, *own, why);
        }
        if let Pending::Fetch {
            own, from, after, ..
        } = pending
        {
            self.gossip.busy.remove(own);
            let until = now + self.gossip.config.refusal_ttl;
            self.gossip.refused.insert((*own, *from), (*after, until));
        }
        self.gossip.plan_due = true;
    }

    /// A peer answered with an error (or something unexpected): for a fetch, that peer is
    /// not asked for this range again for a while.
    fn peer_refused(&mut self, now: Instant, pending: &Pending, why: &str, refusal: bool) {
        self.gossip.stats.failures += 1;
        if let Pending::Page { own, page, .. } = pending {
            return self.page_repair_failed(now, *own, *page, why);
        }
        if let Pending::Pages { own, .. } = pending {
            return self.rebuild_failed(now, *own, why);
        }
        let Pending::Fetch {
            own,
            from,
            after,
            through,
            ..
        } = pending
        else {
            tracing::debug!(
                "peer {} refused GetVolumeState: {why}",
                peer_of(pending).name
            );
            return;
        };
        tracing::info!(
            "{own}: peer {} (segment {from}) cannot serve ({after}, {through}]: {why}",
            peer_of(pending).name
        );
        self.gossip.busy.remove(own);
        if refusal {
            let until = now + self.gossip.config.refusal_ttl;
            self.gossip.refused.insert((*own, *from), (*after, until));
        }
    }
}

/// Every segment key of `key`'s PG, for range queries.
fn pg_keys(key: &SegmentKey) -> std::ops::RangeInclusive<SegmentKey> {
    let first = SegmentKey {
        segment: SegmentIndex(0),
        ..*key
    };
    let last = SegmentKey {
        segment: SegmentIndex(u32::MAX),
        ..*key
    };
    assert!(first <= *key && *key <= last);
    first..=last
}

fn peer_of(pending: &Pending) -> &PeerNode {
    match pending {
        Pending::State { peer, .. }
        | Pending::Fetch { peer, .. }
        | Pending::Page { peer, .. }
        | Pending::Pages { peer, .. } => peer,
    }
}

// Fetching.
impl NodeCore {
    /// Starts a fetch for every hosted segment that is behind a fresh peer at its epoch and
    /// has none under way.
    fn plan_fetches(&mut self, now: Instant) {
        let g = &mut self.gossip;
        g.plan_due = false;
        if !g.config.enabled || self.phase != Phase::Serving || g.placement.is_empty() {
            return;
        }
        g.refused.retain(|_, (_, until)| *until > now);
        if g.hold_until.is_some_and(|until| now < until) {
            return; // The journal is full: fetching more would only be refused again.
        }
        let keys: Vec<SegmentKey> = self
            .segments
            .keys()
            .filter(|key| !self.gossip.busy.contains(key) && !self.rebuilding(key))
            .copied()
            .collect();
        for key in keys {
            self.plan_fetch(now, key);
        }
    }

    fn plan_fetch(&mut self, now: Instant, own: SegmentKey) {
        let scl = self.segments[&own].scl();
        let epoch = self.epoch(own.volume);
        let fresh = self.gossip.config.peer_fresh;
        let mut ahead = 0usize;
        let mut best: Option<(Lsn, SegmentIndex)> = None;
        for (peer, view) in self.gossip.views.range(pg_keys(&own)) {
            if peer.segment == own.segment || view.settled <= scl {
                continue;
            }
            if view.epoch != epoch || now.saturating_duration_since(view.heard) > fresh {
                continue; // Never across epochs; never on stale news.
            }
            ahead += 1;
            let refused = self.gossip.refused.get(&(own, peer.segment));
            if refused.is_some_and(|(after, _)| *after == scl) {
                continue;
            }
            if best.is_none_or(|(best_scl, _)| view.settled > best_scl) {
                best = Some((view.settled, peer.segment));
            }
        }
        let Some((peer_scl, from)) = best else {
            if ahead > 0 {
                self.warn_unservable(own, scl);
                self.maybe_rebuild(now, own);
            }
            return;
        };
        let first_gap = self.gaps(&own).first().map(|g| g.through);
        let through = first_gap.map_or(peer_scl, |end| end.min(peer_scl));
        assert!(through > scl, "a fetch asks for something");
        self.start_fetch(now, own, from, (scl, through));
    }

    /// Every peer ahead of `own` refused its range: one WARN per stuck SCL.
    fn warn_unservable(&mut self, own: SegmentKey, scl: Lsn) {
        if self.gossip.warned.get(&own) == Some(&scl) {
            return;
        }
        self.gossip.warned.insert(own, scl);
        let peer_scl = self
            .gossip
            .views
            .range(pg_keys(&own))
            .map(|(_, v)| v.scl)
            .max()
            .unwrap_or(scl);
        tracing::warn!(
            "{own}: missing ({scl}, {peer_scl}] and no peer can serve it (compacted or not \
             linking)"
        );
    }

    /// A fetch's reply: checked, filtered, and queued for the journal.
    fn handle_records(&mut self, now: Instant, pending: &Pending, records: Records) {
        let Pending::Fetch {
            own, from, after, ..
        } = pending
        else {
            unreachable!("records answer fetches")
        };
        let (own, from, after) = (*own, *from, *after);
        let peer_key = SegmentKey {
            segment: from,
            ..own
        };
        if let Some(view) = self.gossip.views.get_mut(&peer_key)
            && records.segment == from
        {
            view.scl = view.scl.max(records.scl);
            view.heard = now;
        }
        let checked = self.check_fetched(pending, &records);
        let runs = match checked {
            Ok(()) => self.fetched_runs(own, records),
            Err(why) => {
                tracing::warn!(
                    "{own}: records from peer {} refused: {why}",
                    peer_of(pending).name
                );
                return self.peer_refused(now, pending, &why, true);
            }
        };
        if runs.is_empty() {
            // Nothing new: do not ask this peer for the same range again at once.
            let until = now + self.gossip.config.refusal_ttl;
            self.gossip.refused.insert((own, from), (after, until));
            self.gossip.busy.remove(&own);
            return;
        }
        for (epoch, run) in runs {
            self.enqueue_fetched(now, own, epoch, run);
        }
        assert!(
            self.gossip.busy.contains(&own),
            "busy until the batches are durable"
        );
    }

    /// The reply is about the segment asked, within the range, at acceptable epochs, for this
    /// PG's pages, and links to this segment's chain at `after`.
    fn check_fetched(&self, pending: &Pending, records: &Records) -> Result<(), String> {
        let Pending::Fetch {
            own,
            from,
            after,
            through,
            epoch,
            ..
        } = pending
        else {
            unreachable!("records answer fetches")
        };
        if (records.volume, records.pg, records.segment) != (own.volume, own.pg, *from) {
            return Err(format!(
                "the reply is about volume {} pg {} segment {}",
                records.volume, records.pg, records.segment
            ));
        }
        if records.epochs.len() != records.records.len() {
            return Err("the reply does not give one epoch per record".into());
        }
        if let Some(newer) = records.epochs.iter().find(|e| **e > *epoch) {
            return Err(format!(
                "a record carries epoch {newer}, newer than {epoch}"
            ));
        }
        let pages_per_pg = self.pages_per_pg(own.volume);
        let mut previous = *after;
        for record in &records.records {
            if record.lsn <= *after || record.lsn > *through {
                return Err(format!(
                    "record {} is outside ({after}, {through}]",
                    record.lsn
                ));
            }
            if record.backlink != previous {
                return Err(format!(
                    "record {} links to {}, not to {previous}: not this segment's chain",
                    record.lsn, record.backlink
                ));
            }
            if pages_per_pg > 0 && !Geometry::page_in_pg(pages_per_pg, record.page, own.pg) {
                return Err(format!(
                    "record {} is for a page outside the PG",
                    record.lsn
                ));
            }
            previous = record.lsn;
        }
        assert!(previous >= *after);
        Ok(())
    }

    /// The records worth persisting (not held, not truncated), in runs of one epoch.
    fn fetched_runs(&self, own: SegmentKey, records: Records) -> Vec<(Epoch, Vec<LogRecord>)> {
        let segment = &self.segments[&own];
        let truncations = &self.volumes[&own.volume].meta.truncations;
        let mut runs: Vec<(Epoch, Vec<LogRecord>)> = Vec::new();
        for (record, epoch) in records.records.into_iter().zip(records.epochs) {
            let repairs = segment.is_damaged(record.lsn);
            if !repairs && (record.lsn <= segment.scl() || segment.holds(record.lsn)) {
                continue;
            }
            if truncated(truncations, record.lsn, epoch) {
                continue; // Never copy an annulled record.
            }
            match runs.last_mut() {
                Some((run_epoch, run)) if *run_epoch == epoch => run.push(record),
                _ => runs.push((epoch, vec![record])),
            }
        }
        assert!(runs.iter().all(|(_, run)| !run.is_empty()));
        runs
    }

    /// Queues one run of fetched records as an internal journal entry, never answered.
    fn enqueue_fetched(
        &mut self,
        now: Instant,
        own: SegmentKey,
        epoch: Epoch,
        run: Vec<LogRecord>,
    ) {
        let append = Append {
            volume: own.volume,
            epoch,
            pg: own.pg,
            segment: own.segment,
            vdl: Lsn::ZERO,
            records: run,
        };
        let mut body = Vec::with_capacity(append.encoded_len());
        append.encode(&mut body);
        assert!(body.len() == append.encoded_len());
        let batch = Batch {
            conn: ConnId(u64::MAX),
            request_id: 0,
            key: own,
            epoch,
            vdl: Lsn::ZERO,
            records: RecordInBody::of_append(&append),
            received: now,
            gossip: true,
        };
        tracing::debug!(
            "{own}: {} records ({}..={}) fetched at epoch {epoch} go to the journal",
            append.records.len(),
            append.records.first().map_or(Lsn::ZERO, |r| r.lsn),
            append.records.last().map_or(Lsn::ZERO, |r| r.lsn)
        );
        self.gossip_queued(own);
        self.gossip.stats.records_fetched += append.records.len() as u64;
        self.commit.enqueue(batch, bytes::Bytes::from(body));
    }

    /// A fetched batch of `own` is queued: the segment stays busy until it is durable.
    fn gossip_queued(&mut self, own: SegmentKey) {
        *self.gossip.batches.entry(own).or_default() += 1;
        assert!(self.gossip.busy.contains(&own));
    }

    /// A fetched batch of `key` was refused because the journal is full: no fetch for
    /// `refusal_ttl`, then the segment may fetch again.
    pub(super) fn gossip_batch_refused(&mut self, key: SegmentKey) {
        let now = self
            .gossip
            .last_now
            .expect("a batch was queued at some time");
        self.gossip.hold_until = Some(now + self.gossip.config.refusal_ttl);
        self.gossip_batch_done(key);
        assert!(self.gossip.hold_until.is_some());
    }

    /// A fetched batch of `key` was indexed (or refused for a full journal): once its last
    /// one is done, the segment may fetch again.
    pub(super) fn gossip_batch_done(&mut self, key: SegmentKey) {
        let left = self
            .gossip
            .batches
            .get_mut(&key)
            .expect("a done batch was queued");
        assert!(*left >= 1);
        *left -= 1;
        if *left == 0 {
            self.gossip.batches.remove(&key);
            self.gossip.busy.remove(&key);
            self.gossip.plan_due = true;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::segment::{DurableRecord, RecordLocation, Segment};
    use proptest::prelude::*;

    fn observe(segment: &mut Segment, lsn: u64, backlink: u64) {
        segment.observe(&DurableRecord {
            lsn: Lsn(lsn),
            backlink: Lsn(backlink),
            page: wire::PageId(lsn % 3),
            epoch: Epoch(1),
            location: RecordLocation {
                lsn: Lsn(lsn),
                file: 0,
                offset: lsn * 64,
                len: 64,
            },
        });
    }

    proptest! {
        /// Goal: the holes reported are exactly right for one lineage: every chain LSN that is
        /// missing and lies below the highest record held is inside a reported hole, no held
        /// LSN is, and each hole ends at a missing chain LSN.
        /// Method: a random chain (random LSN steps), a random subset delivered in random
        /// order; compare `missing_ranges` with the chain and the set delivered.
        #[test]
        fn gaps_cover_exactly_the_missing_chain(
            steps in proptest::collection::vec(1u64..5, 1..80),
            delivered in proptest::collection::vec(any::<bool>(), 80),
            order in proptest::collection::vec(any::<prop::sample::Index>(), 0..80),
        ) {
            let chain: Vec<u64> = steps.iter().scan(0, |a, s| { *a += s; Some(*a) }).collect();
            let mut picks: Vec<usize> = (0..chain.len()).filter(|i| delivered[*i]).collect();
            for (n, index) in order.iter().enumerate() {
                let len = picks.len();
                if len > 1 {
                    picks.swap(n % len, index.index(len));
                }
            }
            let mut segment = Segment::default();
            for i in &picks {
                observe(&mut segment, chain[*i], if *i == 0 { 0 } else { chain[*i - 1] });
            }
            let held: std::collections::BTreeSet<u64> = picks.iter().map(|i| chain[*i]).collect();
            let gaps = missing_ranges(segment.scl(), segment.beyond_scl());
            let highest = held.iter().next_back().copied().unwrap_or(0);
            for lsn in &chain {
                let in_gap = gaps.iter().any(|g| g.after.0 < *lsn && *lsn <= g.through.0);
                if held.contains(lsn) {
                    prop_assert!(!in_gap, "held {lsn} reported missing");
                } else if *lsn < highest {
                    prop_assert!(in_gap, "missing {lsn} below {highest} not reported");
                }
            }
            for g in &gaps {
                prop_assert!(chain.contains(&g.through.0) && !held.contains(&g.through.0));
            }
            prop_assert!(gaps.first().is_none_or(|g| g.after == segment.scl()));
        }
    }

    /// Goal: the poll jitter stays within ± a quarter of the interval and is reproducible.
    /// Method: two generators with one seed, many draws.
    #[test]
    fn jitter_is_bounded_and_seeded() {
        let config = GossipConfig::for_node("node1");
        let mut a = Gossip::new(config.clone(), BTreeMap::new());
        let mut b = Gossip::new(config.clone(), BTreeMap::new());
        for _ in 0..1000 {
            let (x, y) = (a.jittered_interval(), b.jittered_interval());
            assert_eq!(x, y);
            assert!(x >= config.poll_interval * 3 / 4 && x <= config.poll_interval * 5 / 4);
        }
    }
}
