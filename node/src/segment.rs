//! One hosted segment: the records it holds, its SCL and its page index. Pure: no I/O, no clock.
//!
//! The segment holds its PG's chain: every record indexed here, keyed by LSN, with its backlink,
//! page and journal location. The SCL is found by walking that chain from the current SCL: the
//! lowest record held above the SCL continues the chain if its backlink is the SCL. (Within one
//! writer's lineage a record's successor is the PG's next LSN, so no record of the lineage lies
//! between them; a record left over from an annulled epoch that sits in the way stops the walk,
//! which errs on the safe side until its truncation arrives and removes it.)
//!
//! Invariants:
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

use crate::manifest::Truncation;

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
}

/// One hosted segment: its chain, SCL, page index and PGMRPL.
#[derive(Clone, Debug, Default)]
pub struct Segment {
    scl: Lsn,
    records: BTreeMap<Lsn, Held>,
    pages: HashMap<PageId, Vec<Lsn>>,
    pgmrpl: Lsn,
}

/// Why a read cannot be served at the requested point.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct SclBelowReadPoint {
    pub scl: Lsn,
}

impl Segment {
    pub fn scl(&self) -> Lsn {
        assert!(self.scl == Lsn::ZERO || self.records.contains_key(&self.scl));
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
        assert!(count > 0 || self.scl == Lsn::ZERO);
        count
    }

    /// Whether the record with `lsn` is held.
    pub fn holds(&self, lsn: Lsn) -> bool {
        let held = self.records.contains_key(&lsn);
        assert!(
            held || lsn != self.scl || lsn == Lsn::ZERO,
            "the SCL's record is held"
        );
        held
    }

    /// The epoch a held record arrived with (the newest, if it arrived again).
    pub fn epoch_of(&self, lsn: Lsn) -> Option<Epoch> {
        let epoch = self.records.get(&lsn).map(|held| held.epoch);
        assert!(epoch.is_some() || lsn != self.scl || lsn == Lsn::ZERO);
        epoch
    }

    /// The records held above the SCL (waiting beyond a gap), as `(lsn, backlink)` in LSN
    /// order: what gossip reads the segment's holes from.
    pub fn beyond_scl(&self) -> impl Iterator<Item = (Lsn, Lsn)> + '_ {
        assert!(self.scl == Lsn::ZERO || self.records.contains_key(&self.scl));
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
        if let Some(held) = self.records.get_mut(&record.lsn) {
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
        assert!(self.scl == Lsn::ZERO || self.records.contains_key(&self.scl));
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

        let doomed: Vec<(Lsn, PageId)> = self
            .records
            .range((Bound::Excluded(after), Bound::Included(through)))
            .filter(|(_, held)| held.epoch < range.epoch)
            .map(|(lsn, held)| (*lsn, held.page))
            .collect();
        for (lsn, page) in &doomed {
            self.records.remove(lsn);
            let lsns = self.pages.get_mut(page).expect("indexed pages are listed");
            let at = lsns.binary_search(lsn).expect("indexed LSNs are listed");
            lsns.remove(at);
            if lsns.is_empty() {
                self.pages.remove(page);
            }
        }
        if self.scl > after {
            let last = self.records.range(..=after).next_back();
            self.scl = last.map_or(Lsn::ZERO, |(lsn, _)| *lsn);
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
        let lsns = self.pages.get(&page).map_or(&[][..], Vec::as_slice);
        let end = lsns.partition_point(|l| *l <= read_point);
        let out: Vec<RecordLocation> = lsns
            .get(..end)
            .unwrap_or_default()
            .iter()
            .map(|lsn| self.records[lsn].location)
            .collect();
        assert!(out.windows(2).all(|w| w[0].lsn < w[1].lsn));
        assert!(out.last().is_none_or(|l| l.lsn <= read_point));
        Ok(out)
    }

    /// Locations of the chain's records with LSNs in `(after, min(through, SCL)]`, in LSN
    /// order, as many as fit in `bytes_max` encoded bytes, but at least one if any qualifies.
    pub fn records_for_fetch(
        &self,
        after: Lsn,
        through: Lsn,
        bytes_max: usize,
    ) -> Vec<RecordLocation> {
        let end = through.min(self.scl);
        let mut out = Vec::new();
        if end <= after {
            return out;
        }
        let mut bytes = 0usize;
        let range = (Bound::Excluded(after), Bound::Included(end));
        for held in self.records.range(range).map(|(_, held)| held) {
            let len = held.location.len as usize;
            if !out.is_empty() && bytes + len > bytes_max {
                break;
            }
            bytes += len;
            out.push(held.location);
        }
        assert!(out.windows(2).all(|w| w[0].lsn < w[1].lsn));
        assert!(out.len() <= 1 || bytes <= bytes_max);
        out
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
            for (page, lsns) in &self.pages {
                assert!(lsns.windows(2).all(|w| w[0] < w[1]));
                assert!(lsns.iter().all(|l| self.records[l].page == *page));
            }
            let mut previous = Lsn::ZERO;
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
        assert_eq!(lsns(s.records_for_fetch(Lsn(0), Lsn(100), 1000)), [1, 2, 3]);
        assert_eq!(lsns(s.records_for_fetch(Lsn(1), Lsn(2), 1000)), [2]);
        assert_eq!(lsns(s.records_for_fetch(Lsn(0), Lsn(100), 150)), [1]);
        assert_eq!(
            lsns(s.records_for_fetch(Lsn(0), Lsn(100), 10)),
            [1],
            "at least one"
        );
        assert!(s.records_for_fetch(Lsn(3), Lsn(100), 1000).is_empty());
    }
}
