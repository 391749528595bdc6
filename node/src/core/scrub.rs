//! Scrub and repair: the node re-reads its page store and journal in small paced rounds,
//! checking every CRC, and replaces what is damaged with a copy from a peer segment of the
//! same PG. Damage found any other way (a page read whose slot fails its CRC) is repaired the
//! same way. Nothing damaged is ever served: a bad page slot makes reads of that page answer
//! `Corrupt` (the engine reads another segment), a damaged journal record is left out of
//! reads (`Corrupt`) and fetches (they stop before it).
//!
//! - **Rounds.** Every [`ScrubConfig::interval`], one segment (round-robin) gets a round:
//!   up to [`ScrubConfig::pages_per_round`] written pages from its page cursor and
//!   [`ScrubConfig::records_per_round`] journal records from its record cursor. A round is a
//!   background job ([`NodeOutput::Scrub`]): it never runs beside a coalescing round, and
//!   pauses with background work.
//! - **Page repair.** A damaged page is asked of a fresh peer at this node's epoch as of
//!   `P = min(PGMRPL, the peer's SCL)`, at least what the segment has materialized: the page
//!   as of `P` covers every record materialized here, and every read point of the PG is at
//!   least `P` (reads come at the PG chain's last LSN at or below a point ≥ PGMRPL, and the
//!   peer's SCL is an LSN of that chain), so the journal's records above `P` complete it for
//!   any read. The image is stamped with the page's own last LSN. (A peer at the same epoch
//!   holds no annulled record at or below a PGMRPL: PGMRPL ≤ VDL.) The image goes into
//!   both slots of the page (the next job), after which coalescing of the segment resumes; a
//!   round whose target is still below `P` leaves the page alone (its image holds the
//!   round's records already). A peer that cannot serve it (its page store went past `P`,
//!   or it lags) is skipped and the next one asked, each a scrub interval later.
//! - **Record repair.** A damaged record is fetched again from a peer (gossip's fetch,
//!   `(backlink, lsn]`), persisted through the journal like any fetched record, and its new
//!   copy replaces the damaged one in the index. A record that no peer holds any more is
//!   either materialized here (then only peers ever asked for it, and they hold it no
//!   longer) or waits for a segment rebuild (it stays unserved; coalescing stops there).
//!
//! Invariants:
//! - a page's damage is forgotten only once a job wrote its repaired image durably;
//! - a repaired image is the page as of a point in `[materialized, PGMRPL]` of the segment
//!   when it was asked (stamped with the page's own last LSN);
//! - at most one background job (coalescing or scrub) is in flight.

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use wire::{Lsn, PageId, PageImage, PageReply, SegmentIndex};

use super::background::JobToken;
use super::{NodeCore, NodeOutput, Phase};
use crate::manifest::SegmentKey;
use crate::pagestore::{ScrubJob, ScrubReport};

/// How scrubbing runs.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ScrubConfig {
    /// Rounds run at all (repairs of damage found by reads run either way).
    pub enabled: bool,
    /// Time between two rounds.
    pub interval: Duration,
    pub pages_per_round: usize,
    pub records_per_round: usize,
}

impl Default for ScrubConfig {
    /// About 32 pages and 512 records a second: a full pass over a 1 GiB page store of 8 KiB
    /// pages in about an hour, at a cost a busy node does not notice.
    fn default() -> Self {
        Self {
            enabled: true,
            interval: Duration::from_secs(1),
            pages_per_round: 32,
            records_per_round: 512,
        }
    }
}

/// Page repairs asked of peers at once.
const PAGE_REPAIRS_INFLIGHT_MAX: usize = 16;

/// What scrubbing has done, for metrics and tests.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct ScrubStats {
    pub rounds: u64,
    pub pages_checked: u64,
    pub records_checked: u64,
    /// Full passes over a segment's pages.
    pub passes: u64,
    pub pages_damaged: u64,
    pub records_damaged: u64,
    pub pages_repaired: u64,
    pub records_repaired: u64,
}

/// A damaged page waiting for its repair.
#[derive(Clone, Copy, Debug, Default)]
struct PageRepair {
    /// A peer was asked, or its image waits to be written.
    asked: bool,
    /// Peers asked so far (the next one is asked after a failure).
    attempts: u32,
    not_before: Option<Instant>,
}

/// A scrub job in flight.
struct Inflight {
    token: JobToken,
    key: SegmentKey,
    /// The pages whose repairs it writes.
    repaired: Vec<PageId>,
    /// Where the record cursor goes once it is done (`None`: the job checks no records).
    record_after: Option<Lsn>,
}

/// Where the next round of a segment starts.
#[derive(Clone, Copy, Debug, Default)]
struct Cursor {
    page: u64,
    record_after: Lsn,
}

pub(super) struct Scrub {
    pub(super) config: ScrubConfig,
    /// The job in flight.
    inflight: Option<Inflight>,
    cursors: BTreeMap<SegmentKey, Cursor>,
    /// The segment scrubbed last (rounds go round-robin).
    last: Option<SegmentKey>,
    next_round: Option<Instant>,
    damaged: BTreeMap<SegmentKey, BTreeMap<PageId, PageRepair>>,
    /// Repaired images fetched from peers, waiting for a job to write them.
    pub(super) ready: BTreeMap<SegmentKey, Vec<PageImage>>,
    pub(super) stats: ScrubStats,
}

impl Scrub {
    pub(super) fn new() -> Self {
        Self {
            config: ScrubConfig::default(),
            inflight: None,
            cursors: BTreeMap::new(),
            last: None,
            next_round: None,
            damaged: BTreeMap::new(),
            ready: BTreeMap::new(),
            stats: ScrubStats::default(),
        }
    }

    pub(super) fn is_idle(&self) -> bool {
        self.inflight.is_none()
    }

    fn asked(&self) -> usize {
        self.damaged
            .values()
            .flat_map(BTreeMap::values)
            .filter(|r| r.asked)
            .count()
    }
}

impl NodeCore {
    /// Replaces scrubbing's pacing (tests, the simulator and the node's config).
    pub fn configure_scrub(&mut self, config: ScrubConfig) {
        assert!(config.interval > Duration::ZERO);
        assert!(config.pages_per_round > 0 && config.records_per_round > 0);
        self.scrub.config = config;
        self.scrub.next_round = None;
    }

    /// What scrubbing has done so far.
    pub fn scrub_stats(&self) -> ScrubStats {
        self.scrub.stats
    }

    /// Damaged pages and records known and not yet repaired.
    pub fn damage_outstanding(&self) -> usize {
        let pages: usize = self.scrub.damaged.values().map(BTreeMap::len).sum();
        let records: usize = self.segments.values().map(|s| s.damaged().count()).sum();
        pages + records
    }

    /// Whether no background job (coalescing or scrub) is in flight.
    pub(super) fn jobs_idle(&self) -> bool {
        self.background.is_idle() && self.scrub.is_idle() && self.backup.reading_pages.is_none()
    }

    /// When scrubbing wants the core's timer.
    pub(super) fn scrub_timeout(&self) -> Option<Instant> {
        if self.phase != Phase::Serving || self.background.paused || !self.jobs_idle() {
            return None;
        }
        let now = self.gossip_now()?;
        let repairs = self
            .scrub
            .damaged
            .values()
            .flat_map(BTreeMap::values)
            .filter(|r| !r.asked)
            .map(|r| r.not_before.unwrap_or(now))
            .min();
        let round = if self.scrub.config.enabled && !self.segments.is_empty() {
            Some(self.scrub.next_round.unwrap_or(now))
        } else {
            None
        };
        match (repairs, round) {
            (Some(a), Some(b)) => Some(a.min(b)),
            (a, b) => a.or(b),
        }
    }

    /// A page of `key` failed its CRC (scrub or a read): never served; repaired from a peer.
    pub(super) fn note_damaged_page(&mut self, key: SegmentKey, page: PageId, why: &str) {
        if !self.segments.contains_key(&key) {
            return;
        }
        let pages = self.scrub.damaged.entry(key).or_default();
        if pages.contains_key(&page) {
            return;
        }
        tracing::warn!(
            "{key}: page {} is damaged ({why}); repairing it from a peer",
            page.0
        );
        pages.insert(page, PageRepair::default());
        self.scrub.stats.pages_damaged += 1;
    }

    /// A record of `key` failed its CRC when read back: never served; fetched again.
    fn note_damaged_record(&mut self, key: SegmentKey, lsn: Lsn, why: &str) {
        let Some(segment) = self.segments.get_mut(&key) else {
            return;
        };
        if segment.mark_damaged(lsn) {
            tracing::warn!("{key}: journal record {lsn} is damaged ({why}); fetching it again");
            self.scrub.stats.records_damaged += 1;
        }
    }

    /// Starts a scrub job if one is due: repairs ready to write first, else a round.
    pub(super) fn schedule_scrub(&mut self) {
        if self.phase != Phase::Serving || self.background.paused || !self.jobs_idle() {
            return;
        }
        let Some(now) = self.gossip_now() else {
            return;
        };
        if let Some(key) = self.scrub.ready.keys().next().copied() {
            let repairs = self.scrub.ready.remove(&key).expect("listed");
            return self.start_scrub_job(key, repairs, false);
        }
        if !self.scrub.config.enabled || self.scrub.next_round.is_some_and(|at| now < at) {
            return;
        }
        self.scrub.next_round = Some(now + self.scrub.config.interval);
        let after = self.scrub.last;
        let next = after
            .and_then(|last| {
                self.segments
                    .range((std::ops::Bound::Excluded(last), std::ops::Bound::Unbounded))
                    .next()
            })
            .or_else(|| self.segments.iter().next())
            .map(|(key, _)| *key);
        if let Some(key) = next {
            self.scrub.last = Some(key);
            self.start_scrub_job(key, Vec::new(), true);
        }
    }

    fn start_scrub_job(&mut self, key: SegmentKey, repairs: Vec<PageImage>, check: bool) {
        let Some(segment) = self.segments.get(&key) else {
            return; // Not hosted any more: the repairs are moot.
        };
        let meta = &self.volumes[&key.volume].meta;
        if meta.page_size_bytes == 0 {
            return; // No geometry yet: nothing was ever coalesced.
        }
        let cursor = self.scrub.cursors.get(&key).copied().unwrap_or_default();
        let count = self.scrub.config.records_per_round;
        let records = if check {
            segment.records_to_scrub(cursor.record_after, count)
        } else {
            Vec::new()
        };
        // Past the last record checked; back to the start once the end is reached.
        let record_after = check.then(|| match records.last() {
            Some(last) if records.len() == count => last.lsn,
            _ => Lsn::ZERO,
        });
        let pages: Vec<PageId> = repairs.iter().map(|i| i.page).collect();
        let job = ScrubJob {
            key,
            page_bytes: meta.page_size_bytes as usize,
            pages_per_pg: meta.pages_per_pg,
            repairs,
            pages_from: check.then_some(cursor.page),
            pages_max: self.scrub.config.pages_per_round,
            records,
        };
        let token = self.background.issue_token();
        if !pages.is_empty() {
            self.note_rebuild_job(key, token);
        }
        self.scrub.inflight = Some(Inflight {
            token,
            key,
            repaired: pages,
            record_after,
        });
        self.outputs.push_back(NodeOutput::Scrub { token, job });
    }

    /// A scrub job finished ([`crate::pagestore::run_scrub`]'s report).
    pub fn handle_scrubbed(&mut self, token: JobToken, report: ScrubReport) {
        let Some(job) = self.scrub.inflight.take() else {
            panic!("a scrub job completes after it was asked for");
        };
        assert!(job.token == token, "scrub jobs complete as asked for");
        let (key, repaired) = (job.key, job.repaired);
        if self.stopped().is_some() || !self.segments.contains_key(&key) {
            return;
        }
        self.note_repairs_written(key, &repaired, report.repair_error.as_deref());
        self.note_rebuild_written(key, token, report.repair_error.as_deref());
        let stats = &mut self.scrub.stats;
        stats.pages_checked += report.pages_checked as u64;
        stats.records_checked += report.records_checked as u64;
        if report.pages_checked > 0 || report.records_checked > 0 {
            stats.rounds += 1;
        }
        let cursor = self.scrub.cursors.entry(key).or_default();
        match report.pages_next {
            Some(next) => cursor.page = next,
            None => {
                cursor.page = 0;
                stats.passes += 1;
            }
        }
        if let Some(after) = job.record_after {
            cursor.record_after = after;
        }
        for (page, why) in report.bad_pages {
            self.note_damaged_page(key, page, &why);
        }
        for (lsn, why) in report.bad_records {
            self.note_damaged_record(key, lsn, &why);
        }
        self.gossip.plan_due = true;
    }

    /// Repairs a job wrote: the pages are whole again and coalescing may resume; if the
    /// write failed, they are asked for again.
    fn note_repairs_written(&mut self, key: SegmentKey, pages: &[PageId], error: Option<&str>) {
        let Some(damaged) = self.scrub.damaged.get_mut(&key) else {
            return;
        };
        for page in pages {
            let Some(repair) = damaged.get_mut(page) else {
                continue;
            };
            if let Some(why) = error {
                tracing::warn!("{key}: writing the repair of page {} failed: {why}", page.0);
                repair.asked = false;
                continue;
            }
            damaged.remove(page);
            self.scrub.stats.pages_repaired += 1;
            tracing::info!("{key}: page {} repaired from a peer", page.0);
        }
        if damaged.is_empty() {
            self.scrub.damaged.remove(&key);
            self.background.failed.remove(&key); // Coalescing may go on.
        }
    }

    /// Asks peers for the damaged pages and records that are due.
    pub(super) fn plan_repairs(&mut self, now: Instant) {
        if self.phase != Phase::Serving {
            return;
        }
        self.plan_page_repairs(now);
        self.plan_record_repairs(now);
    }

    fn plan_page_repairs(&mut self, now: Instant) {
        let due: Vec<(SegmentKey, PageId)> = self
            .scrub
            .damaged
            .iter()
            .flat_map(|(key, pages)| pages.iter().map(move |(page, r)| (*key, *page, *r)))
            .filter(|(_, _, r)| !r.asked && r.not_before.is_none_or(|t| t <= now))
            .map(|(key, page, _)| (key, page))
            .collect();
        for (key, page) in due {
            if self.scrub.asked() >= PAGE_REPAIRS_INFLIGHT_MAX {
                return;
            }
            self.plan_page_repair(now, key, page);
        }
    }

    fn plan_page_repair(&mut self, now: Instant, key: SegmentKey, page: PageId) {
        let segment = &self.segments[&key];
        let (pgmrpl, materialized) = (segment.pgmrpl(), segment.materialized());
        let interval = self.scrub.config.interval;
        let candidates = self.repair_sources(&key, materialized);
        let repair = self
            .scrub
            .damaged
            .get_mut(&key)
            .and_then(|p| p.get_mut(&page))
            .expect("planned from the damaged list");
        if pgmrpl == Lsn::ZERO {
            // Nothing materialized: the page as of LSN 0 is zeroes.
            repair.asked = true;
            let size = self.volumes[&key.volume].meta.page_size_bytes as usize;
            let image = PageImage::zeroed(page, size);
            self.scrub.ready.entry(key).or_default().push(image);
            return;
        }
        let attempt = repair.attempts;
        let Some((from, peer_scl)) = candidates
            .get(attempt as usize % candidates.len().max(1))
            .copied()
        else {
            repair.not_before = Some(now + interval);
            return;
        };
        repair.asked = true;
        repair.attempts += 1;
        // At most the PGMRPL (every read point of the PG's chain is at least its last record
        // at or below it) and at most the peer's SCL (a record of the chain), at least what
        // is materialized here. The image comes stamped with the page's own last LSN.
        let read_point = pgmrpl.min(peer_scl);
        assert!(read_point >= materialized);
        self.send_page_repair(now, key, from, (page, read_point));
    }

    /// Peer segments of `key`'s PG, heard from recently at this node's epoch, whose SCL has
    /// reached `at`, with their SCL.
    pub(super) fn repair_sources(&self, key: &SegmentKey, at: Lsn) -> Vec<(SegmentIndex, Lsn)> {
        let epoch = self.epoch(key.volume);
        self.fresh_peer_views(key)
            .filter(|(_, view_epoch, scl)| *view_epoch == epoch && *scl >= at)
            .map(|(segment, _, scl)| (segment, scl))
            .collect()
    }

    /// A peer answered a page repair: checked, the image waits for the next scrub job.
    pub(super) fn handle_page_repair(
        &mut self,
        now: Instant,
        own: SegmentKey,
        (page, read_point): (PageId, Lsn),
        reply: PageReply,
    ) {
        let size = self.volumes[&own.volume].meta.page_size_bytes as usize;
        let problem = if reply.page != page {
            Some(format!("the reply is page {}", reply.page.0))
        } else if reply.page_lsn > read_point {
            Some(format!(
                "the page is at {} above {read_point}",
                reply.page_lsn
            ))
        } else if reply.bytes.len() != size {
            Some(format!(
                "the page has {} bytes, not {size}",
                reply.bytes.len()
            ))
        } else {
            None
        };
        if let Some(why) = problem {
            return self.page_repair_failed(now, own, page, &why);
        }
        let Some(repair) = self.scrub.damaged.get(&own).and_then(|p| p.get(&page)) else {
            return; // Repaired meanwhile.
        };
        assert!(repair.asked);
        let image = PageImage {
            page,
            lsn: reply.page_lsn,
            bytes: reply.bytes,
        };
        self.scrub.ready.entry(own).or_default().push(image);
    }

    /// A page repair's peer could not serve it: the next peer is asked after an interval.
    pub(super) fn page_repair_failed(
        &mut self,
        now: Instant,
        own: SegmentKey,
        page: PageId,
        why: &str,
    ) {
        tracing::debug!("{own}: repair of page {} failed: {why}", page.0);
        let interval = self.scrub.config.interval;
        if let Some(repair) = self
            .scrub
            .damaged
            .get_mut(&own)
            .and_then(|p| p.get_mut(&page))
        {
            repair.asked = false;
            repair.not_before = Some(now + interval);
        }
    }

    /// Damaged records go to gossip's fetch, one segment at a time.
    fn plan_record_repairs(&mut self, now: Instant) {
        let wanted: Vec<(SegmentKey, Lsn, Lsn)> = self
            .segments
            .iter()
            .filter_map(|(key, s)| s.damaged().next().map(|(lsn, back)| (*key, lsn, back)))
            .collect();
        for (key, lsn, backlink) in wanted {
            self.plan_record_repair(now, key, lsn, backlink);
        }
    }
}
