//! Per-segment state that the foreground path maintains: the SCL, advanced by following
//! backlinks, and the page index — where in the journal each durable record of each page lies.
//! Pure: no I/O, no clock.
//!
//! Invariants:
//! - a record enters the page index only once it is durable, and at most once per LSN;
//! - each page's list is kept in LSN order, so a read applies records in order;
//! - the SCL never moves backwards (a programmer error if it did: we assert);
//! - every record ≤ SCL of the segment's PG has been received and is durable here;
//! - a record waits in `pending` only while its backlink is above the SCL (a gap below it).

use std::collections::{BTreeMap, HashMap};

use wire::{Lsn, PageId};

/// Where a durable record's encoded bytes lie in the journal.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct RecordLocation {
    pub lsn: Lsn,
    pub file: u32,
    pub offset: u64,
    pub len: u32,
}

/// A durable record's identity and place, as the persister and recovery report it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct DurableRecord {
    pub lsn: Lsn,
    pub backlink: Lsn,
    pub page: PageId,
    pub location: RecordLocation,
}

/// One hosted segment: its SCL, its page index and its PGMRPL.
#[derive(Clone, Debug, Default)]
pub struct Segment {
    scl: SclTracker,
    pages: HashMap<PageId, Vec<RecordLocation>>,
    pgmrpl: Lsn,
}

/// Why a read cannot be served at the requested point.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct SclBelowReadPoint {
    pub scl: Lsn,
}

impl Segment {
    pub fn scl(&self) -> Lsn {
        self.scl.scl()
    }

    pub fn pgmrpl(&self) -> Lsn {
        self.pgmrpl
    }

    /// Notes a durable record; returns the new SCL.
    pub fn observe(&mut self, record: &DurableRecord) -> Lsn {
        assert!(record.location.lsn == record.lsn);
        let before = self.scl.scl();
        let locations = self.pages.entry(record.page).or_default();
        // Journal order is LSN order almost always; a duplicate or a late retry is placed
        // (or dropped) by binary search.
        match locations.binary_search_by_key(&record.lsn, |l| l.lsn) {
            Ok(_) => {}
            Err(index) => locations.insert(index, record.location),
        }
        let scl = self.scl.observe(record.lsn, record.backlink);
        assert!(scl >= before);
        scl
    }

    /// Locations of the page's records ≤ `read_point`, in LSN order; refused if the segment
    /// does not hold every record up to `read_point`.
    pub fn records_for_read(
        &self,
        page: PageId,
        read_point: Lsn,
    ) -> Result<Vec<RecordLocation>, SclBelowReadPoint> {
        let scl = self.scl.scl();
        if scl < read_point {
            return Err(SclBelowReadPoint { scl });
        }
        let locations = self.pages.get(&page).map_or(&[][..], Vec::as_slice);
        let end = locations.partition_point(|l| l.lsn <= read_point);
        let out = locations.get(..end).unwrap_or_default().to_vec();
        debug_assert!(out.windows(2).all(|w| w[0].lsn < w[1].lsn));
        Ok(out)
    }

    /// Raises the PGMRPL (it never goes down); returns the value in force.
    pub fn raise_pgmrpl(&mut self, pgmrpl: Lsn) -> Lsn {
        self.pgmrpl = self.pgmrpl.max(pgmrpl);
        self.pgmrpl
    }
}

/// Records of a PG beyond a gap that the SCL tracker may hold (gossip fills gaps later);
/// past this the oldest-gap records are still persisted but no longer tracked.
pub const PENDING_RECORDS_MAX: usize = 1 << 20;

/// Tracks a segment's SCL from the (lsn, backlink) pairs of its durable records.
#[derive(Clone, Debug, Default)]
pub struct SclTracker {
    scl: Lsn,
    /// backlink → lsn for durable records whose predecessor has not arrived.
    pending: BTreeMap<Lsn, Lsn>,
}

impl SclTracker {
    pub fn new() -> Self {
        Self::default()
    }

    pub fn scl(&self) -> Lsn {
        self.scl
    }

    /// Records waiting behind a gap.
    pub fn pending_count(&self) -> usize {
        self.pending.len()
    }

    /// Notes one durable record and returns the new SCL.
    pub fn observe(&mut self, lsn: Lsn, backlink: Lsn) -> Lsn {
        assert!(backlink < lsn, "decoder guarantees backlink < lsn");
        let before = self.scl;
        if lsn <= self.scl {
            return self.scl; // A duplicate, or a record we already hold.
        }
        if backlink == self.scl {
            self.scl = lsn;
            while let Some(next) = self.pending.remove(&self.scl) {
                self.scl = next;
            }
            // Anything still pending whose backlink is now below the SCL conflicts with the
            // chain we hold (a record of an annulled epoch); it can never complete.
            let stale: Vec<Lsn> = self.pending.range(..self.scl).map(|(k, _)| *k).collect();
            for key in stale {
                self.pending.remove(&key);
            }
        } else if backlink > self.scl && self.pending.len() < PENDING_RECORDS_MAX {
            self.pending.entry(backlink).or_insert(lsn);
        }
        assert!(self.scl >= before, "SCL moved backwards");
        self.scl
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    /// Goal: the tracker's SCL equals a brute-force model (the longest chain prefix whose
    /// every record was received) under any delivery order, duplicates and losses.
    /// Method: build a random chain, deliver a random multiset of its records in random order.
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
        #[test]
        fn scl_matches_model(
            gaps in proptest::collection::vec(1u64..5, 1..60),
            deliveries in proptest::collection::vec(any::<prop::sample::Index>(), 0..150),
        ) {
            let chain: Vec<u64> = gaps.iter().scan(0, |acc, g| { *acc += g; Some(*acc) }).collect();
            let mut tracker = SclTracker::new();
            let mut received = std::collections::HashSet::new();
            for pick in deliveries {
                let i = pick.index(chain.len());
                let backlink = if i == 0 { 0 } else { chain[i - 1] };
                let scl = tracker.observe(Lsn(chain[i]), Lsn(backlink));
                received.insert(chain[i]);
                prop_assert_eq!(scl.0, model_scl(&chain, &received));
            }
        }
    }

    #[test]
    fn in_order_chain_advances_each_step() {
        let mut t = SclTracker::new();
        assert_eq!(t.observe(Lsn(3), Lsn(0)), Lsn(3));
        assert_eq!(t.observe(Lsn(7), Lsn(5)), Lsn(3)); // gap: 5 missing
        assert_eq!(t.pending_count(), 1);
        assert_eq!(t.observe(Lsn(5), Lsn(3)), Lsn(7));
        assert_eq!(t.pending_count(), 0);
    }
}
