//! What the writer and the storage nodes must agree on about a volume's shape: the quorum
//! constants and the geometry that maps a page to its PG. Defined once, here, and checked
//! against each other at compile time.
//!
//! Invariants:
//! - a read quorum always overlaps the last write quorum (`READ_QUORUM + WRITE_QUORUM >
//!   PG_SIZE`), and two write quorums always overlap (`2 * WRITE_QUORUM > PG_SIZE`);
//! - fencing a read quorum of a PG leaves too few segments for an old writer to form a write
//!   quorum (`PG_SIZE - READ_QUORUM < WRITE_QUORUM`);
//! - a PG has exactly `SEGMENTS_PER_AZ` segments in each of `AZ_COUNT` AZs, so losing an AZ
//!   keeps a write quorum and losing an AZ plus one node keeps a read quorum;
//! - PG `n` holds pages `[n * pages_per_pg, (n + 1) * pages_per_pg)`.

use crate::record::RECORD_PAYLOAD_BYTES_MAX;
use crate::types::{PageId, PgId};

/// Segments per PG.
pub const PG_SIZE: usize = 6;
/// Segments whose SCL must reach an LSN for the PG to be complete to it.
pub const WRITE_QUORUM: usize = 4;
/// Segments a recovery must hear from.
pub const READ_QUORUM: usize = 3;
/// AZs a PG spans.
pub const AZ_COUNT: usize = 3;
/// Segments of a PG per AZ.
pub const SEGMENTS_PER_AZ: usize = 2;
/// Most PGs a volume may have; the writer allocates its per-PG state up front.
pub const PG_COUNT_MAX: u32 = 1 << 20;

const _: () = assert!(READ_QUORUM + WRITE_QUORUM > PG_SIZE);
const _: () = assert!(2 * WRITE_QUORUM > PG_SIZE);
const _: () = assert!(PG_SIZE - READ_QUORUM < WRITE_QUORUM);
const _: () = assert!(WRITE_QUORUM <= PG_SIZE);
const _: () = assert!(READ_QUORUM <= WRITE_QUORUM);
const _: () = assert!(SEGMENTS_PER_AZ * AZ_COUNT == PG_SIZE);
// An AZ down leaves a write quorum; an AZ and one more node down leave a read quorum.
const _: () = assert!(PG_SIZE - SEGMENTS_PER_AZ >= WRITE_QUORUM);
const _: () = assert!(PG_SIZE - SEGMENTS_PER_AZ > READ_QUORUM);

/// The shape of a volume: `pg_count` PGs of `pages_per_pg` pages of `page_size_bytes` each.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Geometry {
    pub page_size_bytes: u32,
    pub pages_per_pg: u64,
    pub pg_count: u32,
}

impl Geometry {
    /// The PG holding `page`, or `None` if the page lies outside the volume.
    #[must_use]
    pub fn pg_of(&self, page: PageId) -> Option<PgId> {
        let pg_index = page.0.checked_div(self.pages_per_pg)?;
        let pg_index = u32::try_from(pg_index).ok()?;
        (pg_index < self.pg_count).then_some(PgId(pg_index))
    }

    /// Whether `page` belongs to `pg` (a node, which knows only `pages_per_pg`, checks this).
    #[must_use]
    pub fn page_in_pg(pages_per_pg: u64, page: PageId, pg: PgId) -> bool {
        page.0.checked_div(pages_per_pg) == Some(u64::from(pg.0))
    }

    /// Pages in the volume (saturating; [`Geometry::is_valid`] refuses geometries where it
    /// saturates).
    #[must_use]
    pub fn page_count(&self) -> u64 {
        self.pages_per_pg.saturating_mul(u64::from(self.pg_count))
    }

    /// Whether the geometry describes a usable volume.
    #[must_use]
    pub fn is_valid(&self) -> bool {
        self.page_size_bytes > 0
            && self.page_size_bytes as usize <= RECORD_PAYLOAD_BYTES_MAX
            && self.pages_per_pg > 0
            && self.pg_count > 0
            && self.pg_count <= PG_COUNT_MAX
            && self
                .pages_per_pg
                .checked_mul(u64::from(self.pg_count))
                .is_some()
    }
}
