//! One hosted segment: the records it holds, its SCL and its page index. Pure: no I/O, no clock.
//!
//! The segment holds its PG's chain: every record indexed here, keyed by LSN, with its backlink,
//! page and journal location. The SCL is found by walking that chain from the current SCL: the
//! lowest record held above the SCL continues the chain if its backlink is the SCL. (Within one
//! writer's lineage a record's successor is the PG's next LSN, so no record of the lineage lies
//! between them; a record left over from an annulled epoch that sits in the way stops the walk,
//! which errs on the safe side until its truncation arrives and removes it.)
//!
//! Garbage collection moves the chain's start: records at or below the segment's *base* are
//! materialized in the page store and leave the index, and the chain walks on from the base.
//! Records at or below *materialized* (≥ base) are in the page store too, but stay indexed (for
//! peers and recovery that fetch them) until the base passes them.
//!
//! Invariants:
//! - `base ≤ materialized ≤ SCL`, and `base` and `materialized` are LSNs of the chain (or 0);
//! - no record at or below the base is held, and none ever enters again;
//! - a record enters the index only once it is durable, at most once per LSN, and never if its
//!   LSN is at or below the SCL without being held already (the chain is complete up to the
//!   SCL, so such a record is not of this lineage);
//! - every record held at or below the SCL is on the chain, so the chain's highest LSN at or
//!   below any `after < SCL` is the highest LSN held there;
//! - the SCL moves backwards only through [`Segment::truncate`], and only to `after` or below;
//! - each page's list holds exactly the LSNs of the page's records in `records`, in LSN order.

use std::collections::{BTreeMap, HashMap};
use std::ops::Bound;

use wire::{Epoch, Lsn, PageId};

use crate::manifest::{Progress, Truncation};

/// Where a durable record's encoded bytes lie in the journal.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct RecordLocation {
    pub lsn: Lsn,
    pub file: u32,
    pub offset: u64,
    pub len: u32,
}

/// A durable record's identity and place, as the core reports it on persist and rebuild.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct DurableRecord {
    pub lsn: Lsn,
    pub backlink: Lsn,
    pub page: PageId,
    /// Epoch of the Append that brought it: truncations annul only older epochs.
    pub epoch: Epoch,
    pub location: RecordLocation,
}

/// A record held by a segment.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
struct Held {
    backlink: Lsn,
    page: PageId,
    epoch: Epoch,
    location: RecordLocation,
    /// Its journal copy failed its CRC when read back (scrub or a read): never served, and
    /// replaced by the next durable copy of the same record ([`Observed::Repaired`]).
    damaged: bool,
}

/// What [`Segment::observe`] did with a record.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Observed {
    /// Indexed (and the SCL advanced if it continued the chain).
    Indexed,
    /// Already held: a retry or a duplicate.
    Duplicate,
    /// At or below the SCL but not on the chain: not of this lineage, never indexed.
    Foreign,
    /// At or below the base: already materialized in the page store.
    Released,
    /// Held with a damaged journal copy: this durable copy replaces it.
    Repaired,
}

/// The work of one coalescing round of a segment: every record in `(materialized, through]`,
/// grouped by page (each page's records in LSN order, pages with the longest chains first).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct CoalescePlan {
    pub through: Lsn,
    pub pages: Vec<(PageId, Vec<RecordLocation>)>,
    pub records: usize,
}

/// One hosted segment: its chain, SCL, page index and PGMRPL.
#[derive(Clone, Debug, Default)]
pub struct Segment {
    scl: Lsn,
    records: BTreeMap<Lsn, Held>,
    pages: HashMap<PageId, Vec<Lsn>>,
    pgmrpl: Lsn,
    base: Lsn,
    materialized: Lsn,
    /// Records held with `damaged` set: while 0, nothing looks for them (repair planning
    /// asks on every gossip event).
    damaged_count: usize,
}

/// Why a fetch cannot be served: the records asked for left the index.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Compacted {
    pub base: Lsn,
}

/// Why a read cannot be served at the requested point.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct SclBelowReadPoint {
    pub scl: Lsn,
}

impl Segment {
    /// A segment whose records up to `progress.base` left the journal (as the manifest says).
    pub fn restored(progress: Progress) -> Self {
        assert!(progress.base <= progress.materialized);
        let segment = Self {
            scl: progress.base,
            base: progress.base,
            materialized: progress.materialized,
            pgmrpl: progress.materialized,
            ..Self::default()
        };
        assert!(segment.records.is_empty());
        segment
    }

    /// The chain base and how far the page store is materialized.
    pub fn progress(&self) -> Progress {
        assert!(self.base <= self.materialized);
        Progress {
            base: self.base,
            materialized: self.materialized,
        }
    }

    pub fn scl(&self) -> Lsn {
        assert!(self.scl == self.base || self.records.contains_key(&self.scl));
        assert!(
            self.pages.len() <= self.records.len(),
            "no page without a record"
        );
        self.scl
    }

    pub fn pgmrpl(&self) -> Lsn {
        assert!(
            self.pages.len() <= self.records.len(),
            "no page without a record"
        );
        self.pgmrpl
    }

    /// Records held (on the chain or waiting beyond a gap).
    pub fn record_count(&self) -> usize {
        let count = self.records.len();
        assert!(self.pages.len() <= count, "no page without a record");
        assert!(count > 0 || self.scl == self.base);
        count
    }

    /// Whether the record with `lsn` is held.
    pub fn holds(&self, lsn: Lsn) -> bool {
        let held = self.records.contains_key(&lsn);
        assert!(
            held || lsn != self.scl || lsn == self.base,
            "the SCL's record is held"
        );
        held
    }

    /// The epoch a held record arrived with (the newest, if it arrived again).
    pub fn epoch_of(&self, lsn: Lsn) -> Option<Epoch> {
        let epoch = self.records.get(&lsn).map(|held| held.epoch);
        assert!(epoch.is_some() || lsn != self.scl || lsn == self.base);
        epoch
    }

    /// Marks the held record `lsn` as damaged in the journal (it failed its CRC when read
    /// back): it is no longer served. Returns whether it was held and not yet marked.
    pub fn mark_damaged(&mut self, lsn: Lsn) -> bool {
        match self.records.get_mut(&lsn) {
            Some(held) if !held.damaged => {
                held.damaged = true;
                self.damaged_count += 1;
                true
            }
            _ => false,
        }
    }

    /// The held records whose journal copy is damaged, as `(lsn, backlink)`.
    pub fn damaged(&self) -> impl Iterator<Item = (Lsn, Lsn)> + '_ {
        self.records
            .iter()
            .take_while(|_| self.damaged_count > 0)
            .filter(|(_, held)| held.damaged)
            .map(|(lsn, held)| (*lsn, held.backlink))
    }

    /// Whether the record `lsn` is held with a damaged journal copy.
    pub fn is_damaged(&self, lsn: Lsn) -> bool {
        self.records.get(&lsn).is_some_and(|held| held.damaged)
    }

    /// Whether any of `locations` is a record whose journal copy is damaged.
    pub fn any_damaged(&self, locations: &[RecordLocation]) -> bool {
        locations
            .iter()
            .any(|l| self.records.get(&l.lsn).is_some_and(|held| held.damaged))
    }

    /// Up to `count` locations of the records held above `after`, in LSN order, damaged ones
    /// excepted: what a scrub round reads back next.
    pub fn records_to_scrub(&self, after: Lsn, count: usize) -> Vec<RecordLocation> {
        self.records
            .range((Bound::Excluded(after), Bound::Unbounded))
            .filter(|(_, held)| !held.damaged)
            .take(count)
            .map(|(_, held)| held.location)
            .collect()
    }

    /// The records held above the SCL (waiting beyond a gap), as `(lsn, backlink)` in LSN
    /// order: what gossip reads the segment's holes from.
    pub fn beyond_scl(&self) -> impl Iterator<Item = (Lsn, Lsn)> + '_ {
        assert!(self.scl == self.base || self.records.contains_key(&self.scl));
        assert!(self.pages.len() <= self.records.len());
        self.records
            .range((Bound::Excluded(self.scl), Bound::Unbounded))
            .map(|(lsn, held)| (*lsn, held.backlink))
    }

    /// Notes a durable record (the caller has already dropped records in truncated ranges).
    pub fn observe(&mut self, record: &DurableRecord) -> Observed {
        assert!(
            record.location.lsn == record.lsn,
            "location names its record"
        );
        assert!(
            record.backlink < record.lsn,
            "decoder guarantees backlink < lsn"
        );
        let before = self.scl;
        if record.lsn <= self.base {
            return Observed::Released;
        }
        if let Some(held) = self.records.get_mut(&record.lsn) {
            if held.damaged && record.backlink == held.backlink && record.page == held.page {
                held.damaged = false;
                self.damaged_count -= 1;
                held.location = record.location;
                held.epoch = held.epoch.max(record.epoch);
                return Observed::Repaired;
            }
            // The same record again; sent under a newer epoch (a recovering writer re-tags the
            // records it adopted), it now counts as that epoch's, so older truncations spare it.
            if record.epoch > held.epoch && record.backlink == held.backlink {
                held.epoch = record.epoch;
                held.location = record.location;
            }
            return Observed::Duplicate;
        }
        if record.lsn <= self.scl {
            return Observed::Foreign;
        }
        let held = Held {
            backlink: record.backlink,
            page: record.page,
            epoch: record.epoch,
            location: record.location,
            damaged: false,
        };
        assert!(record.location.len > 0, "a record has a header");
        self.records.insert(record.lsn, held);
        let lsns = self.pages.entry(record.page).or_default();
        // Journal order is LSN order almost always: push, or place by binary search.
        if lsns.last().is_none_or(|last| *last < record.lsn) {
            lsns.push(record.lsn);
        } else {
            let at = lsns.partition_point(|l| *l < record.lsn);
            lsns.insert(at, record.lsn);
        }
        if record.backlink == self.scl {
            self.advance();
        }
        assert!(self.scl >= before, "SCL moved backwards");
        assert!(self.records.contains_key(&record.lsn));
        Observed::Indexed
    }

    /// Walks the chain forward from the SCL as far as it is held.
    fn advance(&mut self) {
        let before = self.scl;
        loop {
            let next = self
                .records
                .range((Bound::Excluded(self.scl), Bound::Unbounded))
                .next();
            match next {
                Some((lsn, held)) if held.backlink == self.scl => self.scl = *lsn,
                _ => break,
            }
        }
        assert!(self.scl >= before, "SCL moved backwards");
        assert!(self.scl == self.base || self.records.contains_key(&self.scl));
    }

    /// Annuls every record of an epoch older than the range's with an LSN in `(after,
    /// through]`: they leave the index, and an SCL above `after` falls back to the chain's last
    /// record at or below `after`, then walks forward again (records of the range's epoch or
    /// later, and records beyond `through`, may continue the chain from there). Returns how many
    /// records were dropped.
    pub fn truncate(&mut self, range: &Truncation) -> usize {
        let (after, through) = (range.after, range.through);
        assert!(after < through, "truncation ranges are non-empty");
        let records_before = self.records.len();

        let doomed: Vec<(Lsn, PageId, bool)> = self
            .records
            .range((Bound::Excluded(after), Bound::Included(through)))
            .filter(|(_, held)| held.epoch < range.epoch)
            .map(|(lsn, held)| (*lsn, held.page, held.damaged))
            .collect();
        for (lsn, page, damaged) in &doomed {
            self.records.remove(lsn);
            self.damaged_count -= usize::from(*damaged);
            let lsns = self.pages.get_mut(page).expect("indexed pages are listed");
            let at = lsns.binary_search(lsn).expect("indexed LSNs are listed");
            lsns.remove(at);
            if lsns.is_empty() {
                self.pages.remove(page);
            }
        }
        if self.scl > after {
            // Truncations lie above every VDL, so above the base; a range reaching below it
            // cannot annul what is materialized, and the chain restarts no lower than the base.
            let last = self.records.range(..=after).next_back();
            self.scl = last.map_or(self.base, |(lsn, _)| *lsn).max(self.base);
        }
        self.advance();
        assert!(
            self.records
                .range((Bound::Excluded(after), Bound::Included(through)))
                .all(|(_, held)| held.epoch >= range.epoch)
        );
        self.debug_check();
        assert!(self.records.len() == records_before - doomed.len());
        doomed.len()
    }

    /// Locations of the page's records ≤ `read_point`, in LSN order; refused if the segment
    /// does not hold every record up to `read_point`.
    pub fn records_for_read(
        &self,
        page: PageId,
        read_point: Lsn,
    ) -> Result<Vec<RecordLocation>, SclBelowReadPoint> {
        let scl = self.scl;
        if scl < read_point {
            return Err(SclBelowReadPoint { scl });
        }
        // Records at or below `materialized` are in the page store's image of the page.
        let lsns = self.pages.get(&page).map_or(&[][..], Vec::as_slice);
        let start = lsns.partition_point(|l| *l <= self.materialized);
        let end = lsns.partition_point(|l| *l <= read_point).max(start);
        let out: Vec<RecordLocation> = lsns
            .get(start..end)
            .unwrap_or_default()
            .iter()
            .map(|lsn| self.records[lsn].location)
            .collect();
        assert!(out.windows(2).all(|w| w[0].lsn < w[1].lsn));
        assert!(out.last().is_none_or(|l| l.lsn <= read_point));
        Ok(out)
    }

    /// Locations of the chain's records with LSNs in `(after, min(through, SCL)]`, in LSN
    /// order, as many as fit in `bytes_max` encoded bytes, but at least one if any qualifies;
    /// they stop before the first record whose journal copy is damaged.
    /// Refused if records after `after` already left the index (`after` below the base).
    pub fn records_for_fetch(
        &self,
        after: Lsn,
        through: Lsn,
        bytes_max: usize,
    ) -> Result<Vec<RecordLocation>, Compacted> {
        let end = through.min(self.scl);
        let mut out = Vec::new();
        if end <= after {
            return Ok(out);
        }
        if after < self.base {
            return Err(Compacted { base: self.base });
        }
        let mut bytes = 0usize;
        let range = (Bound::Excluded(after), Bound::Included(end));
        for held in self.records.range(range).map(|(_, held)| held) {
            if held.damaged {
                break; // Never served; a peer that needs it asks another segment.
            }
            let len = held.location.len as usize;
            if !out.is_empty() && bytes + len > bytes_max {
                break;
            }
            bytes += len;
            out.push(held.location);
        }
        assert!(out.windows(2).all(|w| w[0].lsn < w[1].lsn));
        assert!(out.len() <= 1 || bytes <= bytes_max);
        Ok(out)
    }

    /// The next coalescing round up to `target` (capped at the SCL): the records in
    /// `(materialized, through]`, at most `records_max` of them, `through` being the last one
    /// taken (a record on the chain). `None` if nothing waits.
    pub fn coalesce_plan(&self, target: Lsn, records_max: usize) -> Option<CoalescePlan> {
        assert!(records_max > 0);
        let end = target.min(self.scl);
        if end <= self.materialized {
            return None;
        }
        let range = (Bound::Excluded(self.materialized), Bound::Included(end));
        let mut by_page: HashMap<PageId, Vec<RecordLocation>> = HashMap::new();
        let mut through = self.materialized;
        let mut records = 0;
        for (lsn, held) in self.records.range(range).take(records_max) {
            by_page.entry(held.page).or_default().push(held.location);
            through = *lsn;
            records += 1;
        }
        if records == 0 {
            return None; // The chain's next record lies beyond the target.
        }
        let mut pages: Vec<(PageId, Vec<RecordLocation>)> = by_page.into_iter().collect();
        // Longest chains first (they cost reads the most); ties by page, for determinism.
        pages.sort_by(|a, b| b.1.len().cmp(&a.1.len()).then(a.0.cmp(&b.0)));
        assert!(through > self.materialized && through <= self.scl);
        Some(CoalescePlan {
            through,
            pages,
            records,
        })
    }

    /// Records in `(materialized, min(target, SCL)]`: what coalescing still has to do.
    pub fn coalesce_backlog(&self, target: Lsn) -> usize {
        self.coalesce_backlog_up_to(target, usize::MAX)
    }

    /// [`Segment::coalesce_backlog`], counted no further than `cap`: what the foreground path
    /// can afford (counting costs a step per record, and the backlog may be millions).
    pub fn coalesce_backlog_up_to(&self, target: Lsn, cap: usize) -> usize {
        let end = target.min(self.scl);
        if end <= self.materialized || cap == 0 {
            return 0;
        }
        let range = (Bound::Excluded(self.materialized), Bound::Included(end));
        let counted = self.records.range(range).take(cap).count();
        assert!(counted <= cap);
        assert!(counted <= self.records.len());
        counted
    }

    /// The page store now holds every page's records up to `through` (durably). Ignored (and
    /// `false`) if `through` is no longer on the chain: a truncation took it meanwhile, which a
    /// writer never asks for below its PGMRPL.
    pub fn set_materialized(&mut self, through: Lsn) -> bool {
        if through > self.scl || !self.records.contains_key(&through) {
            return false;
        }
        self.materialized = self.materialized.max(through);
        assert!(self.base <= self.materialized);
        true
    }

    /// Moves the base up to `base` (at most `materialized`): the records at or below it leave
    /// the index. Returns how many left.
    pub fn release(&mut self, base: Lsn) -> usize {
        let base = base.min(self.materialized);
        if base <= self.base {
            return 0;
        }
        assert!(
            base == self.materialized || self.records.contains_key(&base),
            "bases are LSNs of the chain"
        );
        let keep = self.records.split_off(&Lsn(base.0 + 1));
        let gone = std::mem::replace(&mut self.records, keep);
        self.damaged_count -= gone.values().filter(|h| h.damaged).count();
        let mut touched: Vec<PageId> = gone.values().map(|h| h.page).collect();
        touched.sort_unstable();
        touched.dedup();
        for page in touched {
            let lsns = self.pages.get_mut(&page).expect("indexed pages are listed");
            let cut = lsns.partition_point(|l| *l <= base);
            lsns.drain(..cut);
            if lsns.is_empty() {
                self.pages.remove(&page);
            }
        }
        self.base = base;
        self.scl = self.scl.max(base);
        self.debug_check();
        assert!(self.records.keys().next().is_none_or(|l| *l > base));
        gone.len()
    }

    /// Per page with records in `(materialized, read_point]`, their locations (LSN order),
    /// for pages from `first` on: what a page fetch at `read_point` applies to the page
    /// store's images. `Err` if one of them is damaged.
    pub fn records_by_page(
        &self,
        read_point: Lsn,
        first: PageId,
    ) -> Result<BTreeMap<PageId, Vec<RecordLocation>>, Lsn> {
        let mut out: BTreeMap<PageId, Vec<RecordLocation>> = BTreeMap::new();
        if read_point <= self.materialized {
            return Ok(out);
        }
        let range = (
            Bound::Excluded(self.materialized),
            Bound::Included(read_point),
        );
        for (lsn, held) in self.records.range(range) {
            if held.page < first {
                continue;
            }
            if held.damaged {
                return Err(*lsn);
            }
            out.entry(held.page).or_default().push(held.location);
        }
        Ok(out)
    }

    /// Bytes of the records held above `lsn` (a step per record).
    pub fn bytes_above(&self, lsn: Lsn) -> u64 {
        self.records
            .range((Bound::Excluded(lsn), Bound::Unbounded))
            .map(|(_, held)| u64::from(held.location.len))
            .sum()
    }

    /// The page store now holds every page as of `point`, an LSN of the PG's chain above the
    /// SCL, copied from a peer (a segment rebuild): the records at or below it leave the index,
    /// the base and `materialized` move to it, and the chain walks on from there through the
    /// records held beyond. Returns how many records left.
    pub fn rebuilt(&mut self, point: Lsn) -> usize {
        assert!(point > self.scl, "a rebuild moves the segment forward");
        let keep = self.records.split_off(&Lsn(point.0 + 1));
        let gone = std::mem::replace(&mut self.records, keep);
        self.damaged_count -= gone.values().filter(|h| h.damaged).count();
        for (lsn, held) in &gone {
            let lsns = self
                .pages
                .get_mut(&held.page)
                .expect("indexed pages are listed");
            let at = lsns.binary_search(lsn).expect("indexed LSNs are listed");
            lsns.remove(at);
            if lsns.is_empty() {
                self.pages.remove(&held.page);
            }
        }
        self.base = point;
        self.materialized = point;
        self.scl = point;
        self.pgmrpl = self.pgmrpl.max(point);
        self.advance();
        self.debug_check();
        assert!(self.records.keys().next().is_none_or(|l| *l > point));
        gone.len()
    }

    /// The chain's last record at or below `lsn` (the base if none): an LSN a base may take.
    pub fn chain_at_or_below(&self, lsn: Lsn) -> Lsn {
        let end = lsn.min(self.scl);
        let found = self.records.range(..=end).next_back().map(|(l, _)| *l);
        let out = found.map_or(self.base, |l| l.max(self.base));
        assert!(out <= lsn.max(self.base));
        out
    }

    /// How far the page store holds every page's records.
    pub fn materialized(&self) -> Lsn {
        self.materialized
    }

    /// Raises the PGMRPL (it never goes down); returns the value in force.
    pub fn raise_pgmrpl(&mut self, pgmrpl: Lsn) -> Lsn {
        let before = self.pgmrpl;
        self.pgmrpl = self.pgmrpl.max(pgmrpl);
        assert!(self.pgmrpl >= before);
        assert!(self.pgmrpl >= pgmrpl);
        self.pgmrpl
    }

    /// Full-structure check, for debug builds only: the page index lists exactly the records
    /// held, and the chain below the SCL links up.
    fn debug_check(&self) {
        #[cfg(all(debug_assertions, not(fuzzing)))]
        {
            let listed: usize = self.pages.values().map(Vec::len).sum();
            assert_eq!(listed, self.records.len());
            let damaged = self.records.values().filter(|h| h.damaged).count();
            assert_eq!(damaged, self.damaged_count);
            for (page, lsns) in &self.pages {
                assert!(lsns.windows(2).all(|w| w[0] < w[1]));
                assert!(lsns.iter().all(|l| self.records[l].page == *page));
            }
            let mut previous = self.base;
            for (lsn, held) in self.records.range(..=self.scl) {
                assert_eq!(held.backlink, previous, "chain below the SCL at {lsn}");
                previous = *lsn;
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn record(lsn: u64, backlink: u64, page: u64) -> DurableRecord {
        DurableRecord {
            lsn: Lsn(lsn),
            backlink: Lsn(backlink),
            page: PageId(page),
            epoch: Epoch(1),
            location: RecordLocation {
                lsn: Lsn(lsn),
                file: 0,
                offset: lsn * 100,
                len: 100,
            },
        }
    }

    /// The SCL by brute force: the longest prefix of the chain whose every record arrived.
    fn model_scl(chain: &[u64], received: &std::collections::HashSet<u64>) -> u64 {
        let mut scl = 0;
        for lsn in chain {
            if !received.contains(lsn) {
                break;
            }
            scl = *lsn;
        }
        scl
    }

    proptest! {
        /// Goal: the SCL equals a brute-force model under any delivery order, duplicates and
        /// losses. Method: build a random chain, deliver a random multiset of its records in
        /// random order, compare after each delivery.
        #[test]
        fn scl_matches_model(
            gaps in proptest::collection::vec(1u64..5, 1..60),
            deliveries in proptest::collection::vec(any::<prop::sample::Index>(), 0..150),
        ) {
            let chain: Vec<u64> = gaps.iter().scan(0, |acc, g| { *acc += g; Some(*acc) }).collect();
            let mut segment = Segment::default();
            let mut received = std::collections::HashSet::new();
            for pick in deliveries {
                let i = pick.index(chain.len());
                let backlink = if i == 0 { 0 } else { chain[i - 1] };
                segment.observe(&record(chain[i], backlink, chain[i] % 3));
                received.insert(chain[i]);
                prop_assert_eq!(segment.scl().0, model_scl(&chain, &received));
            }
            segment.debug_check();
        }

        /// Goal: after a truncation, the SCL is the model's SCL of the chain that survives (the
        /// old chain up to `after`, then a new chain that links to the old chain's last record
        /// at or below `after`), whatever arrived before or after the truncation.
        /// Method: an old chain, a truncation point inside it, a new chain above `through`;
        /// deliver random parts of both, truncate midway, deliver the rest, compare.
        #[test]
        fn truncation_then_new_chain(
            old_gaps in proptest::collection::vec(1u64..4, 2..40),
            cut in any::<prop::sample::Index>(),
            new_len in 1usize..20,
            early in proptest::collection::vec(any::<bool>(), 60),
            late in proptest::collection::vec(any::<prop::sample::Index>(), 0..80),
        ) {
            let old: Vec<u64> = old_gaps.iter().scan(0, |a, g| { *a += g; Some(*a) }).collect();
            let after = old[cut.index(old.len())];
            let through = old.last().unwrap() + 10;
            let kept: Vec<u64> = old.iter().copied().filter(|l| *l <= after).collect();
            let new: Vec<u64> = (1..=new_len as u64).map(|i| through + i).collect();
            let chain: Vec<u64> = kept.iter().chain(&new).copied().collect();
            let backlink_of = |lsn: u64| -> u64 {
                if let Some(i) = new.iter().position(|l| *l == lsn) {
                    return if i == 0 { *kept.last().unwrap_or(&0) } else { new[i - 1] };
                }
                let i = old.iter().position(|l| *l == lsn).unwrap();
                if i == 0 { 0 } else { old[i - 1] }
            };
            let mut segment = Segment::default();
            let mut received = std::collections::HashSet::new();
            // Before the truncation: some old records and some new ones (an append at the new
            // epoch may land before the Truncate does).
            for (lsn, deliver) in old.iter().chain(&new).zip(&early) {
                if *deliver {
                    segment.observe(&record(*lsn, backlink_of(*lsn), lsn % 3));
                    received.insert(*lsn);
                }
            }
            segment.truncate(&Truncation {
                epoch: Epoch(2),
                after: Lsn(after),
                through: Lsn(through),
            });
            received.retain(|l| *l <= after || *l > through);
            prop_assert_eq!(segment.scl().0, model_scl(&chain, &received));
            for pick in late {
                let lsn = chain[pick.index(chain.len())];
                segment.observe(&record(lsn, backlink_of(lsn), lsn % 3));
                received.insert(lsn);
                prop_assert_eq!(segment.scl().0, model_scl(&chain, &received));
            }
            segment.debug_check();
        }
    }

    /// Goal: a gap holds the SCL, filling it releases everything behind it.
    /// Method: deliver 3, 7 (gap at 5), then 5.
    #[test]
    fn in_order_chain_advances_each_step() {
        let mut s = Segment::default();
        assert_eq!(s.observe(&record(3, 0, 1)), Observed::Indexed);
        assert_eq!(s.scl(), Lsn(3));
        s.observe(&record(7, 5, 1));
        assert_eq!(s.scl(), Lsn(3), "gap: 5 missing");
        s.observe(&record(5, 3, 2));
        assert_eq!(s.scl(), Lsn(7));
        assert_eq!(s.observe(&record(5, 3, 2)), Observed::Duplicate);
        assert_eq!(s.observe(&record(4, 3, 2)), Observed::Foreign);
        assert_eq!(s.record_count(), 3);
    }

    /// Goal: reads see exactly the page's records up to the read point, and are refused above
    /// the SCL; fetches return the chain in LSN order within the byte budget, at least one.
    /// Method: a small chain over two pages, probed at several points.
    #[test]
    fn reads_and_fetches_follow_the_index() {
        let mut s = Segment::default();
        for (lsn, backlink, page) in [(1, 0, 1), (2, 1, 2), (3, 2, 1), (5, 4, 1)] {
            s.observe(&record(lsn, backlink, page));
        }
        let lsns = |v: Vec<RecordLocation>| v.iter().map(|l| l.lsn.0).collect::<Vec<_>>();
        assert_eq!(lsns(s.records_for_read(PageId(1), Lsn(3)).unwrap()), [1, 3]);
        assert_eq!(lsns(s.records_for_read(PageId(1), Lsn(2)).unwrap()), [1]);
        assert_eq!(
            s.records_for_read(PageId(1), Lsn(4)),
            Err(SclBelowReadPoint { scl: Lsn(3) })
        );
        assert_eq!(
            lsns(s.records_for_fetch(Lsn(0), Lsn(100), 1000).unwrap()),
            [1, 2, 3]
        );
        assert_eq!(
            lsns(s.records_for_fetch(Lsn(1), Lsn(2), 1000).unwrap()),
            [2]
        );
        assert_eq!(
            lsns(s.records_for_fetch(Lsn(0), Lsn(100), 150).unwrap()),
            [1]
        );
        assert_eq!(
            lsns(s.records_for_fetch(Lsn(0), Lsn(100), 10).unwrap()),
            [1],
            "at least one"
        );
        assert!(
            s.records_for_fetch(Lsn(3), Lsn(100), 1000)
                .unwrap()
                .is_empty()
        );
    }
}
