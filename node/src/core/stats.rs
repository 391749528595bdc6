//! Plain counters the core keeps for whoever watches it (the driver's Prometheus metrics, a
//! simulator, a test): no clock, no metric library, no allocation beyond the snapshot. The
//! core only reports; what to export, and how, is the driver's business.
//!
//! Invariants: a snapshot is taken between inputs, so it is consistent with itself (the
//! segments' SCLs, the journal position and the groups formed all belong to one moment);
//! `journal_bytes_used ≤ journal_bytes_capacity`.

use wire::Lsn;

use super::NodeCore;
use crate::manifest::SegmentKey;

/// The core's counters at one moment. Totals only grow while the process runs (they start
/// again from what recovery found at a restart).
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct NodeStats {
    /// Journal block groups formed (asked to be persisted) since start.
    pub groups_formed: u64,
    /// Appends queued for the next group.
    pub appends_queued: u64,
    /// Groups being persisted.
    pub groups_inflight: u64,
    /// Bytes of the journal from its start (the oldest live file) to where the next group goes
    /// (group padding and file tails skipped at file switches included).
    pub journal_bytes_used: u64,
    /// Bytes of every journal file together.
    pub journal_bytes_capacity: u64,
    /// Every hosted segment, in key order.
    pub segments: Vec<SegmentStats>,
    /// Records still to be coalesced, up to each segment's PGMRPL and SCL.
    pub coalesce_backlog_records: u64,
    /// Coalescing rounds, GC passes and journal files recycled since start.
    pub background: super::BackgroundStats,
    /// Records fetched from peers by gossip since start.
    pub gossip_records_fetched: u64,
    /// Pages and records scrub checked, found damaged and repaired since start.
    pub scrub: super::ScrubStats,
    /// Known holes in the hosted segments' chains (ranges missing below records held).
    pub gossip_gaps: u64,
    /// Back-pressure: whether acks are being delayed, and how many were.
    pub throttle: super::ThrottleStatus,
    /// Backup's uploads, failures and lag.
    pub backup: super::BackupStats,
}

/// One hosted segment's counters.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct SegmentStats {
    pub key: SegmentKey,
    pub scl: Lsn,
    /// Records indexed (on the chain or waiting beyond a gap).
    pub records: u64,
    /// Through which LSN its records are coalesced into the page store.
    pub materialized: Lsn,
}

/// What the group-commit state contributes to [`NodeStats`].
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub(super) struct CommitCounters {
    pub(super) groups_formed: u64,
    pub(super) appends_queued: u64,
    pub(super) groups_inflight: u64,
    pub(super) journal_bytes_used: u64,
    pub(super) journal_bytes_capacity: u64,
}

impl NodeCore {
    /// A snapshot of the core's counters.
    pub fn stats(&self) -> NodeStats {
        let c = self.commit.counters();
        let segments: Vec<SegmentStats> = self
            .segments
            .iter()
            .map(|(key, segment)| SegmentStats {
                key: *key,
                scl: segment.scl(),
                records: segment.record_count() as u64,
                materialized: segment.materialized(),
            })
            .collect();
        assert!(c.journal_bytes_used <= c.journal_bytes_capacity);
        assert!(segments.windows(2).all(|w| w[0].key < w[1].key));
        NodeStats {
            groups_formed: c.groups_formed,
            appends_queued: c.appends_queued,
            groups_inflight: c.groups_inflight,
            journal_bytes_used: c.journal_bytes_used,
            journal_bytes_capacity: c.journal_bytes_capacity,
            segments,
            coalesce_backlog_records: self.coalesce_backlog() as u64,
            background: self.background_stats(),
            gossip_records_fetched: self.gossip_stats().records_fetched,
            scrub: self.scrub_stats(),
            gossip_gaps: self
                .segments
                .keys()
                .map(|key| self.gaps(key).len() as u64)
                .sum(),
            throttle: self.throttle_status(),
            backup: self.backup_stats(),
        }
    }
}
