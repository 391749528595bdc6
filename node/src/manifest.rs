//! The node's durable metadata: the segments it hosts and, per volume, the epoch in force, the
//! geometry and the truncation ranges. Pure data and its TOML form; storing it atomically is
//! `io::manifest`'s job.
//!
//! Since garbage collection, it also holds each segment's progress (the chain base below which
//! its records left the journal, and how far its page store is materialized) and where the
//! journal's oldest live group starts (recovery scans from there, around the ring of files).
//!
//! Invariants:
//! - a journal file is reused only once a manifest is durable whose `journal_start` lies past
//!   it and whose segment bases cover every record in it (the start never passes a record the
//!   index still needs);
//! - an epoch or a truncation range is recorded durably before any reply that depends on it
//!   leaves the node (the core holds such replies until the manifest holding them is stored);
//! - recorded epochs only grow, and truncation ranges are only added, never removed;
//! - `placement` names, for PGs the node hosts, the node of each of their segments (its own
//!   included); it is replaced per PG by a newer HostSegments, never merged;
//! - every truncation range is non-empty (`after < through`); ranges are kept as installed
//!   (never merged: each annuls only epochs older than its own), sorted, without duplicates, and
//!   disjoint and sorted by `after` (overlapping or adjacent ranges are merged).

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};
use wire::{Epoch, Lsn, PgId, SegmentIndex, VolumeId};

/// A segment as named on the wire: which volume, which PG, which of its six copies.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(from = "SegmentKeyToml", into = "SegmentKeyToml")]
pub struct SegmentKey {
    pub volume: VolumeId,
    pub pg: PgId,
    pub segment: SegmentIndex,
}

impl std::fmt::Display for SegmentKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "volume {} pg {} segment {}",
            self.volume, self.pg, self.segment
        )
    }
}

/// The TOML shape of a segment key.
#[derive(Clone, Copy, Debug, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SegmentKeyToml {
    pub volume: u64,
    pub pg: u32,
    pub segment: u32,
}

impl From<SegmentKeyToml> for SegmentKey {
    fn from(t: SegmentKeyToml) -> Self {
        Self {
            volume: VolumeId(t.volume),
            pg: PgId(t.pg),
            segment: SegmentIndex(t.segment),
        }
    }
}

impl From<SegmentKey> for SegmentKeyToml {
    fn from(k: SegmentKey) -> Self {
        Self {
            volume: k.volume.0,
            pg: k.pg.0,
            segment: k.segment.0,
        }
    }
}

#[derive(Clone, Debug, Default, Serialize, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
struct ManifestToml {
    #[serde(default)]
    segment: Vec<SegmentKey>,
    #[serde(default)]
    volume: Vec<VolumeToml>,
    #[serde(default)]
    truncation: Vec<TruncationToml>,
    #[serde(default)]
    progress: Vec<ProgressToml>,
    #[serde(default)]
    journal: Option<JournalStartToml>,
    /// Where the segments of the hosted PGs live (absent in manifests written before gossip).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    peer: Vec<PeerToml>,
}

#[derive(Clone, Copy, Debug, Serialize, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
struct ProgressToml {
    volume: u64,
    pg: u32,
    segment: u32,
    base: u64,
    materialized: u64,
}

#[derive(Clone, Copy, Debug, Serialize, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
struct JournalStartToml {
    start_file: u32,
    start_sequence: u64,
}

/// How far a segment's records have moved out of the journal.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Progress {
    /// The chain base: every record at or below it is in the page store and has left the
    /// segment's index (the journal may hold it or not). An LSN on the chain, or 0.
    pub base: Lsn,
    /// The page store holds, for every page, an image covering all its records at or below
    /// this LSN (durably: the store was synced before this was recorded). `base ≤ materialized`.
    pub materialized: Lsn,
}

/// Where the journal's oldest live group lies: recovery scans from the start of `file`,
/// expecting `sequence` there, around the ring of files.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct JournalStart {
    pub file: u32,
    pub sequence: u64,
}

impl Default for JournalStart {
    fn default() -> Self {
        Self {
            file: 0,
            sequence: 1,
        }
    }
}

#[derive(Clone, Debug, Serialize, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
struct PeerToml {
    volume: u64,
    pg: u32,
    segment: u32,
    node: String,
    address: std::net::SocketAddr,
}

#[derive(Clone, Copy, Debug, Serialize, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
struct VolumeToml {
    volume: u64,
    epoch: u64,
    page_size_bytes: u32,
    pages_per_pg: u64,
    /// Absent in manifests written before it was kept.
    #[serde(default)]
    pg_count: u32,
}

#[derive(Clone, Copy, Debug, Serialize, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
struct TruncationToml {
    volume: u64,
    epoch: u64,
    after: u64,
    through: u64,
}

/// Records with LSNs in `(after, through]` that arrived with an epoch older than `epoch` are
/// annulled for good (`epoch` is the truncation's annul epoch; the writer's records in the range
/// at that epoch or later stay valid: allocation resumes right after `after`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Truncation {
    pub epoch: Epoch,
    pub after: Lsn,
    pub through: Lsn,
}

impl Truncation {
    /// Whether `lsn` lies in the range.
    pub fn covers(&self, lsn: Lsn) -> bool {
        self.after < lsn && lsn <= self.through
    }
}

/// What a node knows of a volume.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct VolumeMeta {
    /// Highest epoch installed; requests with an older one are refused.
    pub epoch: Epoch,
    pub page_size_bytes: u32,
    /// Pages per PG; 0 while unknown (segments configured by hand, not by `volume create`).
    pub pages_per_pg: u64,
    /// PGs in the volume; 0 while unknown (told by `HostSegments`, for backup's volume object).
    pub pg_count: u32,
    /// Disjoint ranges sorted by `after`.
    pub truncations: Vec<Truncation>,
}

/// Page size of a volume whose geometry the node has not been told.
pub const DEFAULT_PAGE_SIZE_BYTES: u32 = 8192;

impl Default for VolumeMeta {
    fn default() -> Self {
        Self {
            epoch: Epoch(0),
            page_size_bytes: DEFAULT_PAGE_SIZE_BYTES,
            pages_per_pg: 0,
            pg_count: 0,
            truncations: Vec::new(),
        }
    }
}

/// The node's durable metadata.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Manifest {
    pub segments: Vec<SegmentKey>,
    pub volumes: BTreeMap<VolumeId, VolumeMeta>,
    /// Segments whose records have begun to leave the journal (absent: nothing has yet).
    pub progress: BTreeMap<SegmentKey, Progress>,
    pub journal_start: JournalStart,
    /// The node hosting each segment of the PGs hosted here (from HostSegments): the peers
    /// gossip talks to.
    pub placement: BTreeMap<SegmentKey, wire::PeerNode>,
}

pub const MANIFEST_FILE: &str = "manifest.toml";

impl Manifest {
    /// Parses a manifest's TOML; `origin` names it in errors.
    pub fn from_toml(text: &str, origin: &str) -> Result<Self, String> {
        let parsed: ManifestToml = toml::from_str(text)
            .map_err(|e| format!("{origin} is corrupt: {}", e.message().trim()))?;
        let mut manifest = Self {
            segments: parsed.segment,
            volumes: BTreeMap::new(),
            progress: BTreeMap::new(),
            journal_start: parsed
                .journal
                .map_or_else(JournalStart::default, |j| JournalStart {
                    file: j.start_file,
                    sequence: j.start_sequence,
                }),
            placement: parsed
                .peer
                .into_iter()
                .map(|p| {
                    let key = SegmentKey {
                        volume: VolumeId(p.volume),
                        pg: PgId(p.pg),
                        segment: SegmentIndex(p.segment),
                    };
                    let node = wire::PeerNode {
                        name: p.node,
                        address: p.address,
                    };
                    (key, node)
                })
                .collect(),
        };
        if manifest.journal_start.sequence == 0 {
            return Err(format!(
                "{origin} is corrupt: journal start_sequence is 0 (sequences start at 1)"
            ));
        }
        manifest.progress = progress_of(&parsed.progress, origin)?;
        for v in &parsed.volume {
            let meta = VolumeMeta {
                epoch: Epoch(v.epoch),
                page_size_bytes: v.page_size_bytes,
                pages_per_pg: v.pages_per_pg,
                pg_count: v.pg_count,
                truncations: Vec::new(),
            };
            manifest.volumes.insert(VolumeId(v.volume), meta);
        }
        for t in &parsed.truncation {
            if t.after >= t.through {
                return Err(format!(
                    "{origin} is corrupt: truncation of volume {} ({}, {}] is empty",
                    t.volume, t.after, t.through
                ));
            }
            let range = Truncation {
                epoch: Epoch(t.epoch),
                after: Lsn(t.after),
                through: Lsn(t.through),
            };
            let meta = manifest.volumes.entry(VolumeId(t.volume)).or_default();
            add_truncation(&mut meta.truncations, range);
        }
        Ok(manifest)
    }

    /// The manifest's TOML form.
    pub fn to_toml(&self) -> String {
        let volume = self.volumes.iter().map(|(id, m)| VolumeToml {
            volume: id.0,
            epoch: m.epoch.0,
            page_size_bytes: m.page_size_bytes,
            pages_per_pg: m.pages_per_pg,
            pg_count: m.pg_count,
        });
        let truncation = self.volumes.iter().flat_map(|(id, m)| {
            m.truncations.iter().map(|t| TruncationToml {
                volume: id.0,
                epoch: t.epoch.0,
                after: t.after.0,
                through: t.through.0,
            })
        });
        let progress = self.progress.iter().map(|(k, p)| ProgressToml {
            volume: k.volume.0,
            pg: k.pg.0,
            segment: k.segment.0,
            base: p.base.0,
            materialized: p.materialized.0,
        });
        let journal = (self.journal_start != JournalStart::default()).then_some(JournalStartToml {
            start_file: self.journal_start.file,
            start_sequence: self.journal_start.sequence,
        });
        let peer = self.placement.iter().map(|(key, node)| PeerToml {
            volume: key.volume.0,
            pg: key.pg.0,
            segment: key.segment.0,
            node: node.name.clone(),
            address: node.address,
        });
        let parsed = ManifestToml {
            segment: self.segments.clone(),
            volume: volume.collect(),
            truncation: truncation.collect(),
            progress: progress.collect(),
            journal,
            peer: peer.collect(),
        };
        toml::to_string(&parsed).expect("plain tables always serialize")
    }

    pub fn volume(&self, volume: VolumeId) -> VolumeMeta {
        self.volumes.get(&volume).cloned().unwrap_or_default()
    }

    pub fn epoch(&self, volume: VolumeId) -> Epoch {
        self.volumes.get(&volume).map_or(Epoch(0), |m| m.epoch)
    }

    pub fn hosts(&self, key: &SegmentKey) -> bool {
        self.segments.contains(key)
    }
}

/// Each segment's progress as the manifest's `[[progress]]` tables hold it.
fn progress_of(
    tables: &[ProgressToml],
    origin: &str,
) -> Result<BTreeMap<SegmentKey, Progress>, String> {
    let mut out = BTreeMap::new();
    for p in tables {
        if p.base > p.materialized {
            return Err(format!(
                "{origin} is corrupt: segment {}/{}/{} has base {} above materialized {}",
                p.volume, p.pg, p.segment, p.base, p.materialized
            ));
        }
        let key = SegmentKey {
            volume: VolumeId(p.volume),
            pg: PgId(p.pg),
            segment: SegmentIndex(p.segment),
        };
        let progress = Progress {
            base: Lsn(p.base),
            materialized: Lsn(p.materialized),
        };
        out.insert(key, progress);
    }
    Ok(out)
}

/// Adds `range` to `ranges` (kept sorted, duplicates ignored); returns whether it is new.
pub fn add_truncation(ranges: &mut Vec<Truncation>, range: Truncation) -> bool {
    assert!(
        range.after < range.through,
        "truncation ranges are non-empty"
    );
    let key = |r: &Truncation| (r.epoch, r.after, r.through);
    match ranges.binary_search_by_key(&key(&range), key) {
        Ok(_) => false,
        Err(at) => {
            ranges.insert(at, range);
            assert!(ranges.windows(2).all(|w| key(&w[0]) < key(&w[1])));
            true
        }
    }
}

/// Whether a record at `lsn` that arrived with `epoch` is annulled by one of `ranges` (a range
/// annuls only records of epochs older than its own).
pub fn truncated(ranges: &[Truncation], lsn: Lsn, epoch: Epoch) -> bool {
    ranges.iter().any(|r| r.epoch > epoch && r.covers(lsn))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn range(after: u64, through: u64) -> Truncation {
        Truncation {
            epoch: Epoch(1),
            after: Lsn(after),
            through: Lsn(through),
        }
    }

    /// Goal: the TOML form round-trips every field, truncations included.
    /// Method: build a manifest by hand, write it, read it back.
    #[test]
    fn manifest_round_trip() {
        let mut m = Manifest::default();
        m.segments.push(SegmentKey {
            volume: VolumeId(1),
            pg: PgId(2),
            segment: SegmentIndex(3),
        });
        let meta = VolumeMeta {
            epoch: Epoch(7),
            page_size_bytes: 4096,
            pages_per_pg: 128,
            pg_count: 3,
            truncations: vec![range(10, 20), range(30, 40)],
        };
        m.volumes.insert(VolumeId(1), meta);
        m.progress.insert(
            m.segments[0],
            Progress {
                base: Lsn(5),
                materialized: Lsn(9),
            },
        );
        m.journal_start = JournalStart {
            file: 3,
            sequence: 77,
        };
        let old_text = m.to_toml();
        assert!(!old_text.contains("peer"), "no placement, no table");
        m.placement.insert(
            SegmentKey {
                volume: VolumeId(1),
                pg: PgId(2),
                segment: SegmentIndex(4),
            },
            wire::PeerNode {
                name: "node5".into(),
                address: "127.0.0.1:7104".parse().unwrap(),
            },
        );
        let text = m.to_toml();
        assert_eq!(Manifest::from_toml(&text, "m").unwrap(), m);
        assert!(
            Manifest::from_toml("bogus = 1", "m")
                .unwrap_err()
                .contains("bogus")
        );
    }

    /// Goal: a manifest written before placements existed still reads (no `[[peer]]`), and
    /// a peer row with an unknown key is refused.
    /// Method: parse a literal manifest of the old form, then one with a bogus peer key.
    #[test]
    fn manifest_without_placement_reads() {
        let old = "[[segment]]\nvolume = 1\npg = 0\nsegment = 2\n\n[[volume]]\nvolume = 1\n\
                   epoch = 3\npage_size_bytes = 8192\npages_per_pg = 1024\n";
        let m = Manifest::from_toml(old, "m").unwrap();
        assert_eq!(m.segments.len(), 1);
        assert!(m.placement.is_empty());
        let bad = format!(
            "{old}\n[[peer]]\nvolume = 1\npg = 0\nsegment = 0\nnode = \"n\"\n\
             address = \"127.0.0.1:1\"\nbogus = 1\n"
        );
        assert!(
            Manifest::from_toml(&bad, "m")
                .unwrap_err()
                .contains("bogus")
        );
    }

    /// Goal: ranges are kept as installed, duplicates ignored, and a range annuls exactly the
    /// LSNs in `(after, through]` of older epochs.
    /// Method: add a range twice and a nested one; probe LSNs at the bounds and epochs.
    #[test]
    fn truncation_ranges_annul_older_epochs_only() {
        let mut ranges = Vec::new();
        assert!(add_truncation(&mut ranges, range(10, 20)));
        assert!(!add_truncation(&mut ranges, range(10, 20)), "idempotent");
        assert!(
            add_truncation(&mut ranges, range(12, 15)),
            "kept as installed"
        );
        assert!(!truncated(&ranges, Lsn(10), Epoch(0)));
        assert!(truncated(&ranges, Lsn(11), Epoch(0)));
        assert!(truncated(&ranges, Lsn(20), Epoch(0)));
        assert!(!truncated(&ranges, Lsn(21), Epoch(0)));
        assert!(
            !truncated(&ranges, Lsn(15), Epoch(1)),
            "the writer's own records stay"
        );
    }
}
