//! The writer's quorum state machine: LSN allocation, per-PG batches with backlinks, SCL
//! tracking from segment acks, and the volume's VCL and VDL. Pure: no I/O, no async, no clock;
//! a driver feeds it MTRs and acks and ships the batches it returns.
//!
//! Invariants:
//! - LSNs are allocated consecutively from 1, so every LSN ≤ `lsn_allocated_max` belongs to
//!   exactly one record, and no LSN above `vdl + lal` is ever allocated (back-pressure);
//! - a record's backlink is the previous LSN allocated in the same PG (`Lsn::ZERO` for the
//!   PG's first record); the last record of each MTR, and only it, is a CPL;
//! - a segment's SCL is the maximum it has acked and never exceeds the highest LSN allocated
//!   in its PG; a PG's PGCL is the `WRITE_QUORUM`-th largest SCL of its segments;
//! - a record is *outstanding* until its LSN ≤ its PG's PGCL; VCL is one below the oldest
//!   outstanding record (or `lsn_allocated_max` if none is), VDL is the highest CPL ≤ VCL;
//! - VCL and VDL never move backwards.
//!
//! Cost: an ack does O(1) work for the SCL and PGCL, O(log `pg_count`) for the volume's oldest
//! outstanding record, and pops each record and each CPL exactly once (amortised O(1)).
#![deny(clippy::disallowed_methods)]

use std::collections::{BTreeMap, VecDeque};

use thiserror::Error;
use wire::{LogRecord, Lsn, PageId, PgId, RedoOp, SegmentIndex};

pub use wire::geometry::{Geometry, PG_COUNT_MAX, PG_SIZE, READ_QUORUM, WRITE_QUORUM};

/// Default LAL: the writer never allocates an LSN above `vdl + LSN_ALLOCATION_LIMIT`.
pub const LSN_ALLOCATION_LIMIT: u64 = 10_000_000;
const _: () = assert!(LSN_ALLOCATION_LIMIT > 0);

/// One record of an MTR, before the writer gives it an LSN.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct MtrRecord {
    pub page: PageId,
    pub op: RedoOp,
}

/// The records of one MTR that belong to `pg`, in LSN order: send them to all six segments.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PgBatch {
    pub pg: PgId,
    pub records: Vec<LogRecord>,
}

/// An MTR with LSNs: its CPL (its last, highest LSN) and one batch per PG it touches, in the
/// order the MTR first touches them.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct AllocatedMtr {
    pub cpl: Lsn,
    pub batches: Vec<PgBatch>,
}

/// Why an MTR was refused. A refused MTR leaves the writer unchanged.
#[derive(Error, Clone, Debug, PartialEq, Eq)]
pub enum WriterError {
    /// Allocating the MTR would pass `vdl + lal`; retry once VDL advances.
    #[error("back-pressure: the MTR would end at LSN {lsn_last}, above VDL + LAL = {lsn_limit}")]
    Backpressure { lsn_last: Lsn, lsn_limit: Lsn },
    /// The MTR has more records than LAL: it can never be allocated, however far VDL moves.
    #[error("an MTR of {record_count} records can never fit under LAL = {lal}")]
    MtrTooLarge { record_count: u64, lal: u64 },
    #[error("page {page} is outside the volume of {page_count} pages")]
    PageOutsideVolume { page: PageId, page_count: u64 },
    #[error(
        "a write to page {page} covers bytes [{offset}, {end}) of a {page_size_bytes}-byte page"
    )]
    WriteOutsidePage {
        page: PageId,
        offset: u64,
        end: u64,
        page_size_bytes: u32,
    },
    #[error("an MTR must have at least one record")]
    EmptyMtr,
}

/// What the writer knows about one PG.
#[derive(Clone, Debug, PartialEq, Eq)]
struct PgState {
    /// Highest SCL acked by each segment.
    scl: [Lsn; PG_SIZE],
    /// The `WRITE_QUORUM`-th largest of `scl`.
    pgcl: Lsn,
    /// Highest LSN allocated in this PG: the next record's backlink.
    lsn_allocated_max: Lsn,
    /// LSNs of this PG's records above `pgcl`, increasing.
    outstanding: VecDeque<Lsn>,
}

impl PgState {
    fn new() -> Self {
        Self {
            scl: [Lsn::ZERO; PG_SIZE],
            pgcl: Lsn::ZERO,
            lsn_allocated_max: Lsn::ZERO,
            outstanding: VecDeque::new(),
        }
    }
}

/// The `quorum`-th largest SCL: the highest LSN a write quorum of segments holds.
fn pgcl_of(scl: &[Lsn; PG_SIZE], quorum: usize) -> Lsn {
    let mut sorted = *scl;
    sorted.sort_unstable_by(|a, b| b.cmp(a));
    let pgcl = sorted[quorum - 1];
    assert!(pgcl <= sorted[0]);
    assert!(scl.iter().filter(|&&s| s >= pgcl).count() >= quorum);
    pgcl
}

fn pg_index(pg: PgId) -> usize {
    pg.0 as usize
}

/// The single writer of a volume. See the module docs for its invariants.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Writer {
    geometry: Geometry,
    lal: u64,
    lsn_allocated_max: Lsn,
    vcl: Lsn,
    vdl: Lsn,
    /// Indexed by `PgId`.
    pgs: Vec<PgState>,
    /// Oldest outstanding LSN of every PG that has one, and that PG: the first key bounds VCL.
    heads: BTreeMap<Lsn, PgId>,
    /// CPLs above VDL, increasing.
    cpls_outstanding: VecDeque<Lsn>,
    /// `WRITE_QUORUM`, except when the simulator plants a bug.
    write_quorum: usize,
}

impl Writer {
    /// A writer for a fresh volume: nothing allocated, VDL = VCL = 0, next LSN = 1.
    ///
    /// # Panics
    /// If the geometry is unusable (a zero dimension, more than `PG_COUNT_MAX` PGs, pages
    /// larger than a record payload) or `lal` is zero: both are configuration bugs.
    #[must_use]
    pub fn new(geometry: Geometry, lal: u64) -> Self {
        assert!(geometry.is_valid(), "unusable volume geometry {geometry:?}");
        assert!(lal > 0, "LAL must allow at least one LSN");
        let writer = Self {
            geometry,
            lal,
            lsn_allocated_max: Lsn::ZERO,
            vcl: Lsn::ZERO,
            vdl: Lsn::ZERO,
            pgs: vec![PgState::new(); geometry.pg_count as usize],
            heads: BTreeMap::new(),
            cpls_outstanding: VecDeque::new(),
            write_quorum: WRITE_QUORUM,
        };
        assert_eq!(writer.pgs.len(), geometry.pg_count as usize);
        writer
    }

    /// A writer resuming a recovered volume: VDL = VCL = `vdl`, the next LSN is `vdl + 1`, PG
    /// `n`'s last record at or below `vdl` is `pg_last[n]` (the next record's backlink), and
    /// each segment's SCL is known from the recovery (capped at its PG's last record: records
    /// above VDL were annulled). Every PG must be complete to its last record.
    ///
    /// # Panics
    /// As [`Writer::new`], or if the recovered state breaks an invariant (a PG's last record
    /// above VDL, or not held by a write quorum): a recovery bug.
    #[must_use]
    pub fn recovered(
        geometry: Geometry,
        lal: u64,
        vdl: Lsn,
        pg_last: &[Lsn],
        scl: &[[Lsn; PG_SIZE]],
    ) -> Self {
        let mut writer = Self::new(geometry, lal);
        assert_eq!(pg_last.len(), writer.pgs.len());
        assert_eq!(scl.len(), writer.pgs.len());
        for ((state, &last), scl) in writer.pgs.iter_mut().zip(pg_last).zip(scl) {
            assert!(
                last <= vdl,
                "a PG's last record lies above the recovered VDL"
            );
            state.lsn_allocated_max = last;
            state.scl = scl.map(|s| s.min(last));
            state.pgcl = pgcl_of(&state.scl, WRITE_QUORUM);
            assert_eq!(state.pgcl, last, "a recovered PG lacks a write quorum");
        }
        writer.lsn_allocated_max = vdl;
        writer.vcl = vdl;
        writer.vdl = vdl;
        writer.check_invariants();
        writer
    }

    /// Planted bug: count a PG complete once `quorum` segments hold a record.
    #[cfg(feature = "planted-bugs")]
    pub fn plant_write_quorum(&mut self, quorum: usize) {
        assert!((1..=PG_SIZE).contains(&quorum));
        self.write_quorum = quorum;
    }

    #[must_use]
    pub fn geometry(&self) -> Geometry {
        self.geometry
    }

    #[must_use]
    pub fn lal(&self) -> u64 {
        self.lal
    }

    /// Volume complete LSN.
    #[must_use]
    pub fn vcl(&self) -> Lsn {
        assert!(self.vcl <= self.lsn_allocated_max);
        self.vcl
    }

    /// Volume durable LSN: the highest CPL ≤ VCL.
    #[must_use]
    pub fn vdl(&self) -> Lsn {
        assert!(self.vdl <= self.vcl);
        self.vdl
    }

    /// The LSN the next allocated record will get.
    #[must_use]
    pub fn next_lsn(&self) -> Lsn {
        assert!(self.lsn_allocated_max.0 < u64::MAX);
        Lsn(self.lsn_allocated_max.0 + 1)
    }

    /// Whether an MTR of `record_count` records would be allocated now (ignoring its pages).
    #[must_use]
    pub fn can_allocate(&self, record_count: u64) -> bool {
        assert!(self.lsn_allocated_max <= self.lsn_limit());
        self.lsn_allocated_max
            .0
            .checked_add(record_count)
            .is_some_and(|lsn_last| lsn_last <= self.lsn_limit().0)
    }

    /// The highest LSN back-pressure allows now: `vdl + lal`.
    fn lsn_limit(&self) -> Lsn {
        Lsn(self.vdl.0.saturating_add(self.lal))
    }

    /// Highest SCL `segment` of `pg` has acked.
    ///
    /// # Panics
    /// If `pg` is outside the volume or `segment` ≥ `PG_SIZE` (a caller bug: acks from the
    /// network go through [`Writer::on_ack`], which never panics).
    #[must_use]
    pub fn segment_scl(&self, pg: PgId, segment: SegmentIndex) -> Lsn {
        let state = self.pg(pg);
        let scl = state.scl[segment.0 as usize];
        assert!(scl <= state.lsn_allocated_max);
        scl
    }

    /// PG complete LSN: the highest LSN that `WRITE_QUORUM` of the PG's segments hold.
    ///
    /// The highest LSN allocated in `pg` (its next record's backlink).
    ///
    /// # Panics
    /// If `pg` is outside the volume.
    #[must_use]
    pub fn pg_lsn_allocated_max(&self, pg: PgId) -> Lsn {
        let state = self.pg(pg);
        assert!(state.pgcl <= state.lsn_allocated_max);
        state.lsn_allocated_max
    }

    /// # Panics
    /// If `pg` is outside the volume.
    #[must_use]
    pub fn pgcl(&self, pg: PgId) -> Lsn {
        let state = self.pg(pg);
        assert!(state.pgcl <= state.lsn_allocated_max);
        state.pgcl
    }

    /// The segments of `pg` that can serve a read at `read_point` (SCL ≥ read point).
    ///
    /// # Panics
    /// If `pg` is outside the volume.
    #[must_use]
    pub fn readable_segments(&self, pg: PgId, read_point: Lsn) -> Vec<SegmentIndex> {
        let state = self.pg(pg);
        let segments: Vec<SegmentIndex> = (0..PG_SIZE)
            .filter(|&i| state.scl[i] >= read_point)
            .map(|i| SegmentIndex(u32::try_from(i).expect("PG_SIZE fits in u32")))
            .collect();
        assert!(segments.len() <= PG_SIZE);
        assert!(read_point > state.pgcl || segments.len() >= self.write_quorum);
        segments
    }

    fn pg(&self, pg: PgId) -> &PgState {
        assert!(
            pg.0 < self.geometry.pg_count,
            "PG {pg} is outside the volume"
        );
        let state = &self.pgs[pg_index(pg)];
        assert!(state.pgcl <= state.lsn_allocated_max);
        state
    }
}

// Allocation.
impl Writer {
    /// Gives the MTR's records consecutive LSNs, backlinks and the CPL flag, and groups them
    /// into one batch per PG. Refuses (leaving the writer unchanged) an empty MTR, a page
    /// outside the volume, a write outside its page, or an MTR that would pass `vdl + lal`.
    ///
    /// # Errors
    /// [`WriterError::EmptyMtr`], [`WriterError::PageOutsideVolume`],
    /// [`WriterError::WriteOutsidePage`], [`WriterError::MtrTooLarge`] (permanent: more records
    /// than LAL) or [`WriterError::Backpressure`] (transient: retry once VDL advances).
    pub fn allocate_mtr(&mut self, records: Vec<MtrRecord>) -> Result<AllocatedMtr, WriterError> {
        let pgs = self.check_mtr(&records)?;
        assert_eq!(pgs.len(), records.len());
        let lsn_first = self.next_lsn();
        let record_count = records.len();
        let mut batches: Vec<PgBatch> = Vec::new();
        let mut batch_index_of_pg: BTreeMap<PgId, usize> = BTreeMap::new();
        for (index, (record, pg)) in records.into_iter().zip(pgs).enumerate() {
            let log_record = self.allocate_record(pg, record, index + 1 == record_count);
            let batch_index = *batch_index_of_pg.entry(pg).or_insert_with(|| {
                batches.push(PgBatch {
                    pg,
                    records: Vec::new(),
                });
                batches.len() - 1
            });
            batches[batch_index].records.push(log_record);
        }
        let cpl = self.lsn_allocated_max;
        assert_eq!(cpl.0 - lsn_first.0 + 1, record_count as u64);
        assert!(cpl <= self.lsn_limit());
        assert!(self.cpls_outstanding.back().is_none_or(|&last| last < cpl));
        self.cpls_outstanding.push_back(cpl);
        self.check_invariants();
        Ok(AllocatedMtr { cpl, batches })
    }

    /// Validates an MTR without changing anything; returns the PG of each record.
    fn check_mtr(&self, records: &[MtrRecord]) -> Result<Vec<PgId>, WriterError> {
        if records.is_empty() {
            return Err(WriterError::EmptyMtr);
        }
        let pgs = records
            .iter()
            .map(|record| self.check_record(record))
            .collect::<Result<Vec<PgId>, WriterError>>()?;
        let record_count = records.len() as u64;
        if record_count > self.lal {
            return Err(WriterError::MtrTooLarge {
                record_count,
                lal: self.lal,
            });
        }
        if !self.can_allocate(record_count) {
            return Err(WriterError::Backpressure {
                lsn_last: Lsn(self.lsn_allocated_max.0.saturating_add(record_count)),
                lsn_limit: self.lsn_limit(),
            });
        }
        assert_eq!(pgs.len(), records.len());
        Ok(pgs)
    }

    /// The PG of one record, if its page is in the volume and its write within the page.
    fn check_record(&self, record: &MtrRecord) -> Result<PgId, WriterError> {
        let pg = self
            .geometry
            .pg_of(record.page)
            .ok_or(WriterError::PageOutsideVolume {
                page: record.page,
                page_count: self.geometry.page_count(),
            })?;
        if let RedoOp::Write { offset, bytes } = &record.op {
            let offset = u64::from(*offset);
            let end = offset + bytes.len() as u64;
            if end > u64::from(self.geometry.page_size_bytes) {
                return Err(WriterError::WriteOutsidePage {
                    page: record.page,
                    offset,
                    end,
                    page_size_bytes: self.geometry.page_size_bytes,
                });
            }
        }
        assert!(pg.0 < self.geometry.pg_count);
        Ok(pg)
    }

    /// Allocates the next LSN to `record` in `pg` and marks it outstanding.
    fn allocate_record(&mut self, pg: PgId, record: MtrRecord, cpl: bool) -> LogRecord {
        let lsn = self.next_lsn();
        let state = &mut self.pgs[pg_index(pg)];
        let backlink = state.lsn_allocated_max;
        assert!(backlink < lsn);
        // Acks never push an SCL past the PG's last LSN, so a new record is never complete.
        assert!(state.pgcl < lsn);
        if state.outstanding.is_empty() {
            let displaced = self.heads.insert(lsn, pg);
            assert!(displaced.is_none());
        }
        state.outstanding.push_back(lsn);
        state.lsn_allocated_max = lsn;
        self.lsn_allocated_max = lsn;
        LogRecord {
            lsn,
            backlink,
            page: record.page,
            cpl,
            op: record.op,
        }
    }
}

// Acknowledgements.
impl Writer {
    /// Records that `segment` of `pg` acked `scl`; returns whether VDL advanced. Acks come
    /// from the network, so anything unusable is ignored (returns false), never a panic: an
    /// unknown PG, a segment index ≥ `PG_SIZE`, an SCL no higher than the segment's known one
    /// (a reordered or duplicated ack), or an SCL above the PG's last LSN (a peer bug).
    pub fn on_ack(&mut self, pg: PgId, segment: SegmentIndex, scl: Lsn) -> bool {
        let quorum = self.write_quorum;
        let Some(state) = self.pgs.get_mut(pg_index(pg)) else {
            return false;
        };
        let lsn_allocated_max = state.lsn_allocated_max;
        let Some(segment_scl) = state.scl.get_mut(segment.0 as usize) else {
            return false;
        };
        if scl <= *segment_scl || scl > lsn_allocated_max {
            return false;
        }
        *segment_scl = scl;
        let pgcl_old = state.pgcl;
        state.pgcl = pgcl_of(&state.scl, quorum);
        assert!(state.pgcl >= pgcl_old, "PGCL moved backwards");
        assert!(state.pgcl <= lsn_allocated_max);
        if state.pgcl == pgcl_old {
            return false;
        }
        self.complete_pg(pg);
        let advanced = self.advance_vcl();
        self.check_invariants();
        advanced
    }

    /// Drops the records of `pg` that its PGCL now covers, and moves the PG's entry in
    /// `heads` to its new oldest outstanding record.
    fn complete_pg(&mut self, pg: PgId) {
        let state = &mut self.pgs[pg_index(pg)];
        let Some(&head_old) = state.outstanding.front() else {
            return;
        };
        while state
            .outstanding
            .front()
            .is_some_and(|&lsn| lsn <= state.pgcl)
        {
            state.outstanding.pop_front();
        }
        let head_new = state.outstanding.front().copied();
        assert!(head_new.is_none_or(|head| head > state.pgcl));
        if head_new == Some(head_old) {
            return;
        }
        let removed = self.heads.remove(&head_old);
        assert_eq!(removed, Some(pg));
        if let Some(head) = head_new {
            let displaced = self.heads.insert(head, pg);
            assert!(displaced.is_none());
        }
    }

    /// Recomputes VCL from the oldest outstanding record, then VDL from the outstanding
    /// CPLs; returns whether VDL advanced.
    fn advance_vcl(&mut self) -> bool {
        let vcl = match self.heads.first_key_value() {
            Some((&head, _)) => Lsn(head.0 - 1),
            None => self.lsn_allocated_max,
        };
        assert!(vcl >= self.vcl, "VCL moved backwards");
        self.vcl = vcl;
        let vdl_old = self.vdl;
        while let Some(&cpl) = self.cpls_outstanding.front()
            && cpl <= vcl
        {
            self.vdl = cpl;
            self.cpls_outstanding.pop_front();
        }
        assert!(self.vdl >= vdl_old, "VDL moved backwards");
        assert!(self.vdl <= self.vcl);
        self.vdl > vdl_old
    }

    /// Full-structure consistency check, debug builds only (O(`pg_count`)).
    fn check_invariants(&self) {
        if !cfg!(all(debug_assertions, not(fuzzing))) {
            return;
        }
        let mut head_count = 0;
        for (index, state) in self.pgs.iter().enumerate() {
            assert_eq!(state.pgcl, pgcl_of(&state.scl, self.write_quorum));
            assert!(state.lsn_allocated_max <= self.lsn_allocated_max);
            assert!(state.outstanding.iter().all(|&lsn| lsn > state.pgcl));
            if let Some(head) = state.outstanding.front() {
                head_count += 1;
                assert_eq!(self.heads.get(head).map(|pg| pg_index(*pg)), Some(index));
            }
        }
        assert_eq!(head_count, self.heads.len());
        assert!(self.cpls_outstanding.iter().all(|&cpl| cpl > self.vdl));
        assert!(self.lsn_allocated_max <= self.lsn_limit());
    }
}

#[cfg(test)]
mod tests {
    use std::collections::{BTreeMap, BTreeSet};

    use proptest::collection::vec;
    use proptest::prelude::*;
    use proptest::sample::Index;

    use super::*;

    const PAGE_SIZE_BYTES: u32 = 64;
    const PAGES_PER_PG: u64 = 4;
    const PG_COUNT: u32 = 3;

    fn geometry() -> Geometry {
        Geometry {
            page_size_bytes: PAGE_SIZE_BYTES,
            pages_per_pg: PAGES_PER_PG,
            pg_count: PG_COUNT,
        }
    }

    fn write(page: u64) -> MtrRecord {
        MtrRecord {
            page: PageId(page),
            op: RedoOp::Write {
                offset: 0,
                bytes: vec![1, 2, 3],
            },
        }
    }

    fn ack_all(writer: &mut Writer, pg: u32, segments: std::ops::Range<u32>, scl: u64) -> bool {
        let mut advanced = false;
        for segment in segments {
            advanced |= writer.on_ack(PgId(pg), SegmentIndex(segment), Lsn(scl));
        }
        advanced
    }

    /// Goal: the geometry maps pages to PGs and rejects pages past the end.
    #[test]
    fn geometry_maps_pages_to_pgs() {
        let geometry = geometry();
        assert_eq!(geometry.page_count(), 12);
        assert_eq!(geometry.pg_of(PageId(0)), Some(PgId(0)));
        assert_eq!(geometry.pg_of(PageId(3)), Some(PgId(0)));
        assert_eq!(geometry.pg_of(PageId(4)), Some(PgId(1)));
        assert_eq!(geometry.pg_of(PageId(11)), Some(PgId(2)));
        assert_eq!(geometry.pg_of(PageId(12)), None);
        assert_eq!(geometry.pg_of(PageId(u64::MAX)), None);
        let empty = Geometry {
            pages_per_pg: 0,
            ..geometry
        };
        assert_eq!(empty.pg_of(PageId(0)), None);
    }

    /// Goal: a fresh writer starts at VDL = VCL = 0 and allocates from LSN 1, with backlinks
    /// per PG and the CPL on the MTR's last record.
    #[test]
    fn allocation_assigns_lsns_backlinks_and_cpl() {
        let mut writer = Writer::new(geometry(), LSN_ALLOCATION_LIMIT);
        assert_eq!(
            (writer.vdl(), writer.vcl(), writer.next_lsn()),
            (Lsn(0), Lsn(0), Lsn(1))
        );
        let mtr = writer
            .allocate_mtr(vec![write(0), write(5), write(1)])
            .expect("room under LAL");
        assert_eq!(mtr.cpl, Lsn(3));
        assert_eq!(mtr.batches.len(), 2);
        let (first, second) = (&mtr.batches[0], &mtr.batches[1]);
        assert_eq!(first.pg, PgId(0));
        let lsns: Vec<_> = first
            .records
            .iter()
            .map(|r| (r.lsn, r.backlink, r.cpl))
            .collect();
        assert_eq!(lsns, vec![(Lsn(1), Lsn(0), false), (Lsn(3), Lsn(1), true)]);
        assert_eq!(second.pg, PgId(1));
        assert_eq!(second.records[0].lsn, Lsn(2));
        assert_eq!(second.records[0].backlink, Lsn(0));
        assert!(!second.records[0].cpl);
        let mtr = writer.allocate_mtr(vec![write(6)]).expect("room under LAL");
        assert_eq!(mtr.batches[0].records[0].backlink, Lsn(2));
        assert!(mtr.batches[0].records[0].cpl);
    }

    /// Goal: VDL moves only when four segments of every touched PG have acked, and only to
    /// a CPL.
    #[test]
    fn vdl_needs_a_write_quorum_in_every_pg() {
        let mut writer = Writer::new(geometry(), LSN_ALLOCATION_LIMIT);
        writer.allocate_mtr(vec![write(0), write(4)]).expect("room");
        assert!(!ack_all(&mut writer, 0, 0..6, 1));
        assert_eq!(
            (writer.pgcl(PgId(0)), writer.vcl(), writer.vdl()),
            (Lsn(1), Lsn(1), Lsn(0))
        );
        assert!(!ack_all(&mut writer, 1, 0..3, 2));
        assert_eq!(writer.pgcl(PgId(1)), Lsn(0));
        assert!(writer.on_ack(PgId(1), SegmentIndex(5), Lsn(2)));
        assert_eq!(
            (writer.pgcl(PgId(1)), writer.vcl(), writer.vdl()),
            (Lsn(2), Lsn(2), Lsn(2))
        );
        assert_eq!(writer.readable_segments(PgId(1), Lsn(2)).len(), 4);
        assert_eq!(writer.readable_segments(PgId(1), Lsn(0)).len(), 6);
        assert_eq!(writer.readable_segments(PgId(2), Lsn(1)), vec![]);
    }

    /// Goal: acks that came from a confused or hostile peer are ignored, never a panic.
    #[test]
    fn bad_acks_are_ignored() {
        let mut writer = Writer::new(geometry(), LSN_ALLOCATION_LIMIT);
        writer.allocate_mtr(vec![write(0)]).expect("room");
        let before = writer.clone();
        assert!(!writer.on_ack(PgId(PG_COUNT), SegmentIndex(0), Lsn(1)));
        assert!(!writer.on_ack(PgId(u32::MAX), SegmentIndex(0), Lsn(1)));
        assert!(!writer.on_ack(PgId(0), SegmentIndex(6), Lsn(1)));
        assert!(!writer.on_ack(PgId(0), SegmentIndex(u32::MAX), Lsn(1)));
        assert!(!writer.on_ack(PgId(0), SegmentIndex(0), Lsn(2)));
        assert!(!writer.on_ack(PgId(1), SegmentIndex(0), Lsn(1)));
        assert!(!writer.on_ack(PgId(0), SegmentIndex(0), Lsn(u64::MAX)));
        assert_eq!(writer, before);
        assert!(!ack_all(&mut writer, 0, 0..3, 1));
        assert!(writer.on_ack(PgId(0), SegmentIndex(3), Lsn(1)));
        assert!(!writer.on_ack(PgId(0), SegmentIndex(3), Lsn(0)));
        assert_eq!(writer.segment_scl(PgId(0), SegmentIndex(3)), Lsn(1));
    }

    /// Goal: refused MTRs leave the writer unchanged and name the right reason.
    #[test]
    fn refusals_leave_the_writer_unchanged() {
        let mut writer = Writer::new(geometry(), 3);
        let before = writer.clone();
        assert_eq!(writer.allocate_mtr(vec![]), Err(WriterError::EmptyMtr));
        let outside = writer.allocate_mtr(vec![write(0), write(12)]);
        assert!(matches!(
            outside,
            Err(WriterError::PageOutsideVolume { .. })
        ));
        let long = MtrRecord {
            page: PageId(0),
            op: RedoOp::Write {
                offset: PAGE_SIZE_BYTES - 2,
                bytes: vec![0; 3],
            },
        };
        let long = writer.allocate_mtr(vec![long]);
        assert!(matches!(
            long,
            Err(WriterError::WriteOutsidePage { end: 65, .. })
        ));
        let huge = writer.allocate_mtr(vec![write(0); 4]);
        assert!(matches!(
            huge,
            Err(WriterError::MtrTooLarge {
                record_count: 4,
                lal: 3
            })
        ));
        assert_eq!(writer, before);
        writer.allocate_mtr(vec![write(0), write(0)]).expect("room");
        assert!(writer.can_allocate(1));
        assert!(!writer.can_allocate(2));
        let refused = writer.allocate_mtr(vec![write(0), write(0)]);
        let expected = WriterError::Backpressure {
            lsn_last: Lsn(4),
            lsn_limit: Lsn(3),
        };
        assert_eq!(refused, Err(expected));
    }

    // -----------------------------------------------------------------------------------
    // Property test against a brute-force model.

    #[derive(Clone, Debug)]
    enum Step {
        /// An MTR of 1–4 records on pages of the volume (so over 1–3 PGs).
        Mtr(Vec<u64>),
        /// An ack from `segment` of `pg` whose SCL is the end of a prefix of the PG's chain.
        Ack {
            pg: u32,
            segment: u32,
            prefix: Index,
        },
        /// An ack from a buggy peer: an SCL above anything allocated in the PG.
        InflatedAck { pg: u32, segment: u32, excess: u64 },
    }

    fn arb_step() -> impl Strategy<Value = Step> {
        let page_count = PAGES_PER_PG * u64::from(PG_COUNT);
        prop_oneof![
            2 => vec(0..page_count, 1..=4).prop_map(Step::Mtr),
            // Segment indices past 5 and PGs past the end exercise the "unknown" paths.
            6 => (0..=PG_COUNT, 0..7u32, any::<Index>())
                .prop_map(|(pg, segment, prefix)| Step::Ack { pg, segment, prefix }),
            1 => (0..PG_COUNT, 0..6u32, 1..3u64)
                .prop_map(|(pg, segment, excess)| Step::InflatedAck { pg, segment, excess }),
        ]
    }

    /// Everything the writer has been told, from which VCL and VDL are recomputed from
    /// scratch.
    #[derive(Default)]
    struct Model {
        /// Every allocated record: LSN → (PG, is CPL).
        records: BTreeMap<u64, (u32, bool)>,
        /// Per PG, its LSNs in order, starting with 0 (the empty prefix).
        chains: BTreeMap<u32, Vec<u64>>,
        /// Highest accepted SCL per (PG, segment).
        scl: BTreeMap<(u32, u32), u64>,
        vdl_max: u64,
    }

    impl Model {
        fn chain(&self, pg: u32) -> Vec<u64> {
            self.chains.get(&pg).cloned().unwrap_or_else(|| vec![0])
        }

        fn pgcl(&self, pg: u32) -> u64 {
            let mut scl: Vec<u64> = (0..6)
                .map(|s| self.scl.get(&(pg, s)).copied().unwrap_or(0))
                .collect();
            scl.sort_unstable_by(|a, b| b.cmp(a));
            scl[WRITE_QUORUM - 1]
        }

        fn vcl(&self) -> u64 {
            let lsn_max = self.records.keys().next_back().copied().unwrap_or(0);
            self.records
                .iter()
                .find(|&(&lsn, &(pg, _))| lsn > self.pgcl(pg))
                .map_or(lsn_max, |(&lsn, _)| lsn - 1)
        }

        fn vdl(&self) -> u64 {
            let vcl = self.vcl();
            let cpls = self
                .records
                .iter()
                .filter(|&(&lsn, &(_, cpl))| cpl && lsn <= vcl);
            cpls.map(|(&lsn, _)| lsn).next_back().unwrap_or(0)
        }
    }

    /// Applies an MTR step to the writer and the model, checking LSNs, backlinks, the CPL
    /// and back-pressure.
    fn step_mtr(writer: &mut Writer, model: &mut Model, pages: &[u64]) {
        let records: Vec<MtrRecord> = pages.iter().map(|&page| write(page)).collect();
        let lsn_first = writer.next_lsn().0;
        let lsn_last = lsn_first + pages.len() as u64 - 1;
        let refuse = lsn_last > model.vdl() + writer.lal();
        assert_eq!(writer.can_allocate(pages.len() as u64), !refuse);
        let before = writer.clone();
        match writer.allocate_mtr(records) {
            Err(WriterError::Backpressure { .. }) => {
                assert!(refuse && pages.len() as u64 <= writer.lal());
                assert_eq!(*writer, before);
            }
            Err(WriterError::MtrTooLarge { .. }) => {
                assert!(refuse && pages.len() as u64 > writer.lal());
                assert_eq!(*writer, before);
            }
            Err(other) => panic!("unexpected refusal {other}"),
            Ok(mtr) => {
                assert!(!refuse, "allocated past VDL + LAL");
                check_mtr(model, pages, lsn_first, &mtr);
            }
        }
    }

    /// Checks one allocated MTR against the model, then records it there.
    fn check_mtr(model: &mut Model, pages: &[u64], lsn_first: u64, mtr: &AllocatedMtr) {
        let lsn_last = lsn_first + pages.len() as u64 - 1;
        assert_eq!(mtr.cpl, Lsn(lsn_last));
        let mut all: Vec<&LogRecord> = mtr.batches.iter().flat_map(|b| &b.records).collect();
        let pgs: BTreeSet<PgId> = mtr.batches.iter().map(|b| b.pg).collect();
        assert_eq!(pgs.len(), mtr.batches.len(), "one batch per PG");
        for batch in &mtr.batches {
            assert!(batch.records.windows(2).all(|w| w[0].lsn < w[1].lsn));
            assert!(
                batch
                    .records
                    .iter()
                    .all(|r| geometry().pg_of(r.page) == Some(batch.pg))
            );
        }
        all.sort_by_key(|r| r.lsn);
        assert_eq!(all.iter().filter(|r| r.cpl).count(), 1, "exactly one CPL");
        for (index, record) in all.iter().enumerate() {
            assert_eq!(record.lsn, Lsn(lsn_first + index as u64));
            assert_eq!(record.page, PageId(pages[index]));
            assert_eq!(record.cpl, record.lsn.0 == lsn_last);
            let pg = geometry().pg_of(record.page).expect("in the volume").0;
            let chain = model.chains.entry(pg).or_insert_with(|| vec![0]);
            assert_eq!(record.backlink, Lsn(*chain.last().expect("starts with 0")));
            chain.push(record.lsn.0);
            model.records.insert(record.lsn.0, (pg, record.cpl));
        }
    }

    /// Feeds one ack to the writer and the model.
    fn step_ack(writer: &mut Writer, model: &mut Model, pg: u32, segment: u32, scl: u64) {
        let vdl_before = model.vdl();
        let valid_pg = pg < PG_COUNT && segment < 6;
        let lsn_max = *model.chain(pg).last().expect("starts with 0");
        if valid_pg && scl <= lsn_max {
            let known = model.scl.entry((pg, segment)).or_insert(0);
            *known = (*known).max(scl);
        }
        let advanced = writer.on_ack(PgId(pg), SegmentIndex(segment), Lsn(scl));
        assert_eq!(advanced, model.vdl() > vdl_before);
    }

    fn check_against_model(writer: &Writer, model: &mut Model) {
        assert_eq!(writer.vcl(), Lsn(model.vcl()));
        assert_eq!(writer.vdl(), Lsn(model.vdl()));
        assert!(model.vdl() >= model.vdl_max, "VDL moved backwards");
        model.vdl_max = model.vdl();
        let lsn_max = model.records.keys().next_back().copied().unwrap_or(0);
        assert_eq!(writer.next_lsn(), Lsn(lsn_max + 1));
        for pg in 0..PG_COUNT {
            assert_eq!(writer.pgcl(PgId(pg)), Lsn(model.pgcl(pg)));
            for segment in 0..6 {
                let scl = model.scl.get(&(pg, segment)).copied().unwrap_or(0);
                assert_eq!(
                    writer.segment_scl(PgId(pg), SegmentIndex(segment)),
                    Lsn(scl)
                );
            }
            for read_point in model.chain(pg) {
                let readable = writer.readable_segments(PgId(pg), Lsn(read_point));
                let expected: Vec<SegmentIndex> = (0..6)
                    .filter(|&s| model.scl.get(&(pg, s)).copied().unwrap_or(0) >= read_point)
                    .map(SegmentIndex)
                    .collect();
                assert_eq!(readable, expected);
            }
        }
    }

    fn run(lal: u64, silent: &[bool], steps: Vec<Step>) {
        let mut writer = Writer::new(geometry(), lal);
        let mut model = Model::default();
        for step in steps {
            match step {
                Step::Mtr(pages) => step_mtr(&mut writer, &mut model, &pages),
                Step::Ack {
                    pg,
                    segment,
                    prefix,
                } => {
                    let silent_index = (pg as usize * 6 + segment as usize) % silent.len();
                    if silent[silent_index] {
                        continue;
                    }
                    let scl = *prefix.get(&model.chain(pg));
                    step_ack(&mut writer, &mut model, pg, segment, scl);
                }
                Step::InflatedAck {
                    pg,
                    segment,
                    excess,
                } => {
                    let scl = model.chain(pg).last().expect("starts with 0") + excess;
                    step_ack(&mut writer, &mut model, pg, segment, scl);
                }
            }
            check_against_model(&writer, &mut model);
        }
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(512))]

        /// Goal: VCL, VDL, PGCLs, SCLs and readable segments always equal a from-scratch
        /// model; allocation gets LSNs, backlinks, CPLs and back-pressure right. Method: random
        /// MTRs interleaved with reordered, duplicated, stale and bogus acks, some segments
        /// never acking, with a small LAL (so back-pressure bites) or the default one.
        #[test]
        fn writer_matches_model(
            lal in prop_oneof![1..=8u64, Just(LSN_ALLOCATION_LIMIT)],
            silent in vec(prop::bool::weighted(0.2), 1..=18),
            steps in vec(arb_step(), 1..200),
        ) {
            run(lal, &silent, steps);
        }

        /// Goal: with LAL = 5, an MTR is refused exactly when its last LSN would exceed
        /// VDL + 5. Method: MTRs of 1–6 records, each followed by acks from all segments of
        /// a random PG up to that PG's last LSN (sometimes skipped).
        #[test]
        fn backpressure_with_small_lal(
            mtrs in vec((vec(0..12u64, 1..=6), 0..=PG_COUNT), 1..60),
        ) {
            let mut writer = Writer::new(geometry(), 5);
            let mut model = Model::default();
            for (pages, ack_pg) in mtrs {
                step_mtr(&mut writer, &mut model, &pages);
                check_against_model(&writer, &mut model);
                let scl = *model.chain(ack_pg).last().expect("starts with 0");
                for segment in 0..6 {
                    step_ack(&mut writer, &mut model, ack_pg, segment, scl);
                }
                check_against_model(&writer, &mut model);
            }
        }
    }
}
