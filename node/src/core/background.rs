//! Background work: coalescing journal records into the page store, and garbage collection
//! (records leave the index once materialized; journal files are recycled once nothing in
//! them is needed). The core decides what and when; the driver carries out each round
//! ([`crate::pagestore::run_coalesce`]) off its runtime thread and reports back.
//!
//! Scheduling: one round in flight at a time. A round starts when a segment has records in
//! `(materialized, min(PGMRPL, SCL)]` and either the foreground is idle (no append for
//! [`IDLE_AFTER`]), or the journal is a quarter full ([`COALESCE_PERCENT`]) or the backlog is
//! past back-pressure's bound (acks are being delayed for it) and the segment has enough of
//! them to be worth a round ([`ROUND_RECORDS_MIN`]): coalescing costs page reads and
//! writes (measured: rounds running beside a closed-loop commit load at 16 in flight halved its
//! throughput, 7.2k/s against 3.7k/s), so it yields to appends until space calls for it.
//! Among the segments with enough records, the one with the most goes first, counted only up
//! to [`ROUND_RECORDS_MIN`] (this choice runs on the foreground path, so it never counts a
//! whole backlog), ties in turn from the segment chosen last. If coalescing still falls behind,
//! the node delays its acks (see `throttle`).
//!
//! Garbage collection, after each round (and whenever the journal is under pressure,
//! [`PRESSURE_PERCENT`]): a segment's base moves up to its `materialized` LSN, held back by
//! [`NodeCore::gc_hold_back`] (peers that still need records, and later backup) less and less
//! as the journal fills. Then the journal's start moves past every file whose
//! records all lie at or below their segments' bases; the new start and bases are stored in
//! the manifest, and only once that manifest is durable may the writer reuse those files.
//!
//! Invariants:
//! - coalescing never passes PGMRPL nor the SCL, so every read point ≥ PGMRPL can be served;
//! - a segment's `materialized` moves only after its round's page writes are durable;
//! - the writer enters a file only after a durable manifest puts the journal start past it.

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use wire::Lsn;

use super::{NodeCore, NodeOutput, Phase};
use crate::manifest::{JournalStart, SegmentKey};
use crate::pagestore::{CoalesceJob, PageWork};
use crate::segment::Segment;

/// A coalescing round the core asked for.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct JobToken(pub u64);

/// Records a round takes at most.
pub const ROUND_RECORDS_MAX: usize = 8192;
/// Records a segment gathers before a round is worth it while the foreground is busy.
pub const ROUND_RECORDS_MIN: usize = 256;
/// Journal use (percent of its files) from which GC stops holding records back for peers
/// whose needs are unknown.
pub const PRESSURE_PERCENT: u64 = 50;
/// Journal use (percent of its files) from which coalescing runs while the foreground is busy.
pub const COALESCE_PERCENT: u64 = 25;
/// How long after the last append the foreground counts as idle.
pub const IDLE_AFTER: Duration = Duration::from_millis(200);

/// What background work has done, for metrics and tests.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct BackgroundStats {
    pub rounds: u64,
    pub rounds_failed: u64,
    pub records_materialized: u64,
    pub records_released: u64,
    pub gc_runs: u64,
    pub files_recycled: u64,
}

pub(super) struct Background {
    next_token: u64,
    /// The round in flight: its segment and how far it goes.
    inflight: Option<(JobToken, SegmentKey, Lsn)>,
    /// The segment of the last round started (the next choice starts after it).
    last_chosen: Option<SegmentKey>,
    /// Segments whose last round failed, with the target it had: not tried again until
    /// their target moves (or a repair makes the segment whole again).
    pub(super) failed: BTreeMap<SegmentKey, Lsn>,
    /// Per journal file, per segment, the highest LSN indexed from that file.
    files: Vec<BTreeMap<SegmentKey, Lsn>>,
    /// Per journal file, the sequence of its first group in the current lap.
    first_sequence: Vec<Option<u64>>,
    /// The journal start the newest manifest holds (or will hold).
    start: JournalStart,
    /// A start waiting for its manifest version to be durable.
    start_pending: Option<(u64, JournalStart)>,
    /// Per segment, where its chain will end once the appends accepted so far are durable (a
    /// truncation forgets it: the SCL is the truth again).
    pub(super) accepted_end: BTreeMap<SegmentKey, Lsn>,
    /// When the last append arrived (the foreground is idle [`IDLE_AFTER`] later).
    pub(super) last_append: Option<Instant>,
    /// Background work is paused (benchmarks compare with and without it).
    pub(super) paused: bool,
    pub(super) stats: BackgroundStats,
}

impl Background {
    pub(super) fn new(file_count: u32, start: JournalStart) -> Self {
        assert!(file_count >= 1);
        assert!(start.sequence >= 1);
        Self {
            next_token: 0,
            inflight: None,
            last_chosen: None,
            failed: BTreeMap::new(),
            files: vec![BTreeMap::new(); file_count as usize],
            first_sequence: vec![None; file_count as usize],
            start,
            start_pending: None,
            accepted_end: BTreeMap::new(),
            last_append: None,
            paused: false,
            stats: BackgroundStats::default(),
        }
    }

    pub(super) fn start(&self) -> JournalStart {
        self.start
    }

    pub(super) fn is_idle(&self) -> bool {
        self.inflight.is_none()
    }

    /// A token for a new background job (coalescing or scrub).
    pub(super) fn issue_token(&mut self) -> JobToken {
        self.next_token += 1;
        JobToken(self.next_token)
    }

    /// A record of `key` up to `lsn` was indexed from `file`.
    pub(super) fn note_record(&mut self, file: u32, key: SegmentKey, lsn: Lsn) {
        let entry = self.files[file as usize].entry(key).or_insert(lsn);
        *entry = (*entry).max(lsn);
    }

    /// A group with `sequence` starts journal file `file`.
    pub(super) fn note_file_start(&mut self, file: u32, sequence: u64) {
        assert!(sequence >= 1);
        self.files[file as usize].clear();
        self.first_sequence[file as usize] = Some(sequence);
    }
}

impl NodeCore {
    /// The journal start recovery scans from (as the manifest holds it).
    pub fn journal_start(&self) -> JournalStart {
        self.background.start()
    }

    /// What background work has done so far.
    pub fn background_stats(&self) -> BackgroundStats {
        self.background.stats
    }

    /// Pauses or resumes background work (a round in flight finishes).
    pub fn set_background_paused(&mut self, paused: bool) {
        self.background.paused = paused;
    }

    /// Records of each segment still to be coalesced (up to its PGMRPL and SCL).
    pub fn coalesce_backlog(&self) -> usize {
        self.coalesce_backlog_capped(usize::MAX)
    }

    /// [`NodeCore::coalesce_backlog`], counted no further than `cap` (a step per record).
    pub(super) fn coalesce_backlog_capped(&self, cap: usize) -> usize {
        let mut total = 0usize;
        for (key, segment) in &self.segments {
            if total >= cap {
                break;
            }
            total +=
                segment.coalesce_backlog_up_to(self.coalesce_target(key, segment), cap - total);
        }
        assert!(total <= cap);
        total
    }

    /// Percent of the journal's files holding live records (the one being written counts).
    pub fn journal_used_percent(&self) -> u64 {
        let count = u64::from(self.config.journal_file_count);
        let head = u64::from(self.commit.head_file());
        let start = u64::from(self.commit.start_file());
        let live = (head + count - start) % count + 1;
        assert!(live <= count);
        live * 100 / count
    }

    /// Where `key`'s chain will end once everything accepted so far is durable: its SCL, or the
    /// end of the run of appends accepted since that continue it.
    pub(super) fn chain_end(&self, key: &SegmentKey) -> Lsn {
        let scl = self.segments.get(key).map_or(Lsn::ZERO, Segment::scl);
        self.background
            .accepted_end
            .get(key)
            .copied()
            .unwrap_or(Lsn::ZERO)
            .max(scl)
    }

    /// An append was accepted: if it continues the chain, the chain's future end moves.
    pub(super) fn note_accepted(&mut self, batch: &super::commit::Batch) {
        let end = self.chain_end(&batch.key);
        let first = batch.records[0].backlink;
        let last = batch.records.last().expect("appends carry records").lsn;
        if first <= end && last > end {
            self.background.accepted_end.insert(batch.key, last);
        }
    }

    /// An accepted append was refused after all (no journal file had room for its group): the
    /// chain will not run through it, so its future end falls back to where the batch began
    /// at most (the SCL catches up with anything accepted before it, once that is durable).
    /// Without this, the reserve would go on taking appends that follow the lost batch, each
    /// beyond a gap.
    pub(super) fn note_refused(&mut self, batch: &super::commit::Batch) {
        let first = batch.records[0].backlink;
        if let Some(end) = self.background.accepted_end.get_mut(&batch.key)
            && *end >= first
        {
            *end = first;
        }
        let end = self.background.accepted_end.get(&batch.key);
        assert!(end.is_none_or(|e| *e <= first));
        assert!(
            !batch.gossip,
            "gossip's batches are never noted as accepted"
        );
    }

    /// How far GC must keep `key`'s records for others: peers that lag (a recovering writer
    /// copies records from here to them, gossip fetches them) and backup. `None`: nothing.
    ///
    /// - Below [`PRESSURE_PERCENT`] every record stays indexed: a peer that restarts may find
    ///   it lost records it had acknowledged (a flipped bit in its journal), and until segment
    ///   rebuild exists only records still held here can fill that hole.
    /// - From there to [`super::RESERVE_PERCENT`], records stay until every peer's SCL has
    ///   passed them if all five peers were heard from recently (gossip), else they go.
    /// - From the reserve on, nothing holds them back: the alternative is `JournalFull`.
    ///
    /// Below the reserve, records not yet backed up are held too (see `backup`).
    pub(super) fn gc_hold_back(&self, key: &SegmentKey) -> Option<Lsn> {
        let used = self.journal_used_percent();
        if used < PRESSURE_PERCENT {
            return Some(Lsn::ZERO);
        }
        if used >= super::RESERVE_PERCENT {
            return None;
        }
        match (self.peer_scl_floor_all(key), self.backup_floor(key)) {
            (Some(peers), Some(backup)) => Some(peers.min(backup)),
            (peers, backup) => peers.or(backup),
        }
    }

    /// How far `key` may be coalesced: its PGMRPL, but never past a VDL some writer reported
    /// (the volume's VDL hint). PGMRPL comes without an epoch: a node back from a crash may
    /// hear a new writer's PGMRPL before that writer's truncation, while its chain still runs
    /// through records the truncation will annul; every truncation starts above every VDL a
    /// writer ever reported, so the hint keeps coalescing below it (found by the simulator,
    /// seed 464: a page image with an annulled record baked in).
    pub(super) fn coalesce_target(&self, key: &SegmentKey, segment: &Segment) -> Lsn {
        let hint = self.volumes.get(&key.volume).map_or(Lsn::ZERO, |v| v.vdl);
        segment.pgmrpl().min(hint)
    }

    /// Whether no append arrived for [`IDLE_AFTER`] (as of the latest time the core was given).
    fn foreground_idle(&self) -> bool {
        match (self.background.last_append, self.gossip_now()) {
            (None, _) => true,
            (Some(last), Some(now)) => now.saturating_duration_since(last) >= IDLE_AFTER,
            (Some(_), None) => false,
        }
    }

    /// When background work wants the core's timer: once the foreground turns idle, if some
    /// segment has records to coalesce.
    pub(super) fn background_timeout(&self) -> Option<Instant> {
        if self.phase != Phase::Serving || self.background.paused || !self.jobs_idle() {
            return None;
        }
        let waiting = self
            .segments
            .iter()
            .any(|(key, s)| s.materialized() < self.coalesce_target(key, s).min(s.scl()));
        let last = self.background.last_append?;
        (waiting && !self.foreground_idle()).then_some(last + IDLE_AFTER)
    }

    /// The segment whose turn it is: at least `minimum` records to coalesce, the most of them
    /// counted up to [`ROUND_RECORDS_MIN`], ties going round robin from the last one chosen
    /// (so a segment that keeps refilling cannot keep the others waiting). This runs on the
    /// foreground path (every poll with nothing queued), so it counts at most
    /// `ROUND_RECORDS_MIN` records per segment however large the backlog is.
    fn choose_segment(&self, minimum: usize) -> Option<SegmentKey> {
        assert!((1..=ROUND_RECORDS_MIN).contains(&minimum));
        let after = self.background.last_chosen;
        let chosen = self
            .segments
            .iter()
            .filter(|(key, segment)| {
                let target = self.coalesce_target(key, segment);
                self.background.failed.get(key).is_none_or(|t| target > *t)
            })
            .map(|(key, segment)| {
                let target = self.coalesce_target(key, segment);
                let backlog = segment.coalesce_backlog_up_to(target, ROUND_RECORDS_MIN);
                let turn = after.is_none_or(|a| *key > a);
                (backlog, turn, std::cmp::Reverse(*key))
            })
            .filter(|(backlog, _, _)| *backlog >= minimum)
            .max()
            .map(|(_, _, std::cmp::Reverse(key))| key);
        assert!(chosen.is_none_or(|k| self.segments.contains_key(&k)));
        chosen
    }

    /// Starts a coalescing round if one is due (see the module docs).
    pub(super) fn schedule_background(&mut self) {
        if self.phase != Phase::Serving || !self.jobs_idle() || self.background.paused {
            return;
        }
        let used = self.journal_used_percent();
        let pressure = used >= PRESSURE_PERCENT;
        let idle = self.foreground_idle();
        if !idle && used < COALESCE_PERCENT && !self.throttle.backlog_behind() {
            return; // Coalescing costs page reads and writes: not while appends flow.
        }
        let minimum = if idle { 1 } else { ROUND_RECORDS_MIN };
        let Some(key) = self.choose_segment(minimum) else {
            let releasable = self
                .segments
                .values()
                .any(|s| s.progress().base < s.materialized());
            if pressure && releasable {
                self.collect_garbage();
            }
            return;
        };
        let segment = &self.segments[&key];
        let target = self.coalesce_target(&key, segment);
        let Some(plan) = segment.coalesce_plan(target, ROUND_RECORDS_MAX) else {
            return;
        };
        let meta = &self.volumes[&key.volume].meta;
        let job = CoalesceJob {
            key,
            page_bytes: meta.page_size_bytes as usize,
            pages_per_pg: meta.pages_per_pg,
            through: plan.through,
            pages: plan
                .pages
                .into_iter()
                .map(|(page, records)| PageWork { page, records })
                .collect(),
        };
        let token = self.background.issue_token();
        self.background.last_chosen = Some(key);
        self.background.inflight = Some((token, key, plan.through));
        assert!(!job.pages.is_empty());
        self.outputs.push_back(NodeOutput::Coalesce { token, job });
    }

    /// A coalescing round finished: on success its records count as materialized, and
    /// garbage collection runs.
    pub fn handle_coalesced(&mut self, token: JobToken, result: Result<(), String>) {
        let Some((expected, key, through)) = self.background.inflight.take() else {
            panic!("a round completes after it was asked for");
        };
        assert!(expected == token, "rounds complete as asked for");
        if self.stopped().is_some() {
            return;
        }
        self.throttle.backlog_changed();
        let Some(target) = self
            .segments
            .get(&key)
            .map(|s| self.coalesce_target(&key, s))
        else {
            return;
        };
        let segment = self.segments.get_mut(&key).expect("checked above");
        match result {
            Ok(()) => {
                let before = segment.materialized();
                if segment.set_materialized(through) {
                    self.background.failed.remove(&key);
                    self.background.stats.rounds += 1;
                    let done = segment.coalesce_backlog(through);
                    assert!(done == 0, "the round covered everything up to its end");
                    let _ = before;
                    let volume = self.volumes.get_mut(&key.volume).expect("hosted");
                    // A materialized LSN is at most the PGMRPL, so at most the writer's VDL.
                    volume.vdl = volume.vdl.max(through);
                }
                self.collect_garbage();
            }
            Err(why) => {
                self.background.stats.rounds_failed += 1;
                if self.background.failed.insert(key, target).is_none() {
                    tracing::warn!("{key}: coalescing stopped: {why}");
                }
            }
        }
    }

    /// Moves segment bases up to what is materialized (unless held back), then the journal
    /// start past every file no longer needed; stores both.
    fn collect_garbage(&mut self) {
        let keys: Vec<SegmentKey> = self.segments.keys().copied().collect();
        let mut changed: Vec<wire::VolumeId> = Vec::new();
        for key in keys {
            let hold = self.gc_hold_back(&key);
            let segment = self.segments.get_mut(&key).expect("listed");
            let target = hold.map_or(segment.materialized(), |h| h.min(segment.materialized()));
            // The base must be an LSN of the chain: the last record held at or below target.
            let base = segment.chain_at_or_below(target);
            let released = segment.release(base);
            if released > 0 {
                self.note_backup_gap(&key, base);
                self.background.stats.records_released += released as u64;
                if !changed.contains(&key.volume) {
                    changed.push(key.volume);
                }
            }
        }
        self.background.stats.gc_runs += 1;
        for volume in changed {
            self.manifest_changed(volume);
        }
        self.advance_journal_start();
    }

    /// Moves the journal start past files whose records all lie at or below their segments'
    /// bases, and asks for the manifest that records it.
    fn advance_journal_start(&mut self) {
        let count = self.config.journal_file_count;
        let head = self.commit.head_file();
        let before = self.background.start;
        loop {
            let file = self.background.start.file;
            if file == head {
                break;
            }
            let needed = self.background.files[file as usize]
                .iter()
                .any(|(key, lsn)| {
                    self.segments
                        .get(key)
                        .is_some_and(|s| *lsn > s.progress().base)
                });
            if needed {
                break;
            }
            let next = (file + 1) % count;
            let sequence = self.background.first_sequence[next as usize]
                .expect("files between the start and the head were written this lap");
            self.background.files[file as usize].clear();
            self.background.first_sequence[file as usize] = None;
            self.background.start = JournalStart {
                file: next,
                sequence,
            };
            self.background.stats.files_recycled += 1;
        }
        if self.background.start != before {
            let version = self.manifest_changed_global();
            self.background.start_pending = Some((version, self.background.start));
        }
    }

    /// A manifest version is durable: a start it holds lets the writer reuse files.
    pub(super) fn on_manifest_durable(&mut self, stored: u64) {
        if let Some((version, start)) = self.background.start_pending
            && version <= stored
        {
            self.background.start_pending = None;
            self.commit.set_start_file(start.file);
        }
    }
}
