//! The volume file: a volume's geometry, its storage nodes and the placement of every PG's six
//! segments. Written by `sixfold volume create`, read by the engine.
//!
//! Placement rules (checked on every load, with a message naming the rule broken):
//! - every PG has exactly `PG_SIZE` (6) segments, on 6 different nodes;
//! - exactly 2 of a PG's segments are in each of 3 AZs;
//! - every node named by a PG is listed under `[[node]]`, once, with a unique address.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::net::SocketAddr;
use std::path::Path;

use serde::{Deserialize, Serialize};
use wire::{Epoch, PageId, PgId, SegmentIndex, VolumeId};

pub use wire::geometry::{AZ_COUNT, SEGMENTS_PER_AZ};
use wire::geometry::{Geometry, PG_SIZE};

/// A storage node as the volume file lists it.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct NodeEntry {
    /// The node's certificate name.
    pub name: String,
    pub address: SocketAddr,
    pub az: String,
}

/// One PG's segments: `segments[i]` names the node hosting segment `i`.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PgEntry {
    pub id: u32,
    pub segments: Vec<String>,
}

/// The volume file.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct VolumeFile {
    pub volume: u64,
    pub epoch: u64,
    pub page_size_bytes: u32,
    pub segment_bytes: u64,
    #[serde(rename = "node")]
    pub nodes: Vec<NodeEntry>,
    #[serde(rename = "pg")]
    pub pgs: Vec<PgEntry>,
}

impl VolumeFile {
    /// A new volume with an automatic placement over `nodes`.
    pub fn create(
        volume: VolumeId,
        page_size_bytes: u32,
        segment_bytes: u64,
        pg_count: u32,
        nodes: Vec<NodeEntry>,
    ) -> Result<Self, String> {
        let pgs = place(&nodes, pg_count)?;
        let file = Self {
            volume: volume.0,
            epoch: 1,
            page_size_bytes,
            segment_bytes,
            nodes,
            pgs,
        };
        file.check()?;
        Ok(file)
    }

    pub fn parse(text: &str, origin: &str) -> Result<Self, String> {
        let file: Self = toml::from_str(text)
            .map_err(|e| format!("{origin}: {}", e.message().trim().replace('\n', "; ")))?;
        file.check().map_err(|e| format!("{origin}: {e}"))?;
        Ok(file)
    }

    pub fn load(path: &Path) -> Result<Self, String> {
        let text = std::fs::read_to_string(path)
            .map_err(|e| format!("cannot read volume file {}: {e}", path.display()))?;
        Self::parse(&text, &path.display().to_string())
    }

    pub fn to_toml(&self) -> String {
        toml::to_string(self).expect("volume files serialise")
    }

    pub fn id(&self) -> VolumeId {
        VolumeId(self.volume)
    }

    pub fn epoch(&self) -> Epoch {
        Epoch(self.epoch)
    }

    pub fn geometry(&self) -> Geometry {
        Geometry {
            page_size_bytes: self.page_size_bytes,
            pages_per_pg: self.segment_bytes / u64::from(self.page_size_bytes),
            pg_count: u32::try_from(self.pgs.len()).expect("checked"),
        }
    }

    /// Index into `nodes` of the node hosting each segment of each PG.
    pub fn placement(&self) -> Vec<[usize; PG_SIZE]> {
        let index: HashMap<&str, usize> = self
            .nodes
            .iter()
            .enumerate()
            .map(|(i, n)| (n.name.as_str(), i))
            .collect();
        let mut pgs: Vec<&PgEntry> = self.pgs.iter().collect();
        pgs.sort_by_key(|p| p.id);
        pgs.iter()
            .map(|pg| std::array::from_fn(|i| index[pg.segments[i].as_str()]))
            .collect()
    }

    /// The (PG, segment) pairs node `node` hosts.
    pub fn segments_of(&self, node: &str) -> Vec<(PgId, SegmentIndex)> {
        let mut out = Vec::new();
        for pg in &self.pgs {
            for (i, name) in pg.segments.iter().enumerate() {
                if name == node {
                    out.push((PgId(pg.id), SegmentIndex(i as u32)));
                }
            }
        }
        out
    }

    /// The node table and the placement of the PGs node `node` hosts, as a HostSegments
    /// message carries them: every node of the volume, and per hosted PG the index into that
    /// table of each segment's node.
    pub fn placement_for(&self, node: &str) -> (Vec<wire::PeerNode>, Vec<wire::PgPlacement>) {
        let nodes: Vec<wire::PeerNode> = self
            .nodes
            .iter()
            .map(|n| wire::PeerNode {
                name: n.name.clone(),
                address: n.address,
            })
            .collect();
        let index: HashMap<&str, u16> = self
            .nodes
            .iter()
            .enumerate()
            .map(|(i, n)| (n.name.as_str(), u16::try_from(i).expect("few nodes")))
            .collect();
        let placement = self
            .pgs
            .iter()
            .filter(|pg| pg.segments.iter().any(|name| name == node))
            .map(|pg| wire::PgPlacement {
                pg: PgId(pg.id),
                nodes: std::array::from_fn(|i| index[pg.segments[i].as_str()]),
            })
            .collect();
        (nodes, placement)
    }

    /// The PG of a page.
    pub fn pg_of(&self, page: PageId) -> Option<PgId> {
        self.geometry().pg_of(page)
    }

    fn check(&self) -> Result<(), String> {
        check_geometry(self.page_size_bytes, self.segment_bytes)?;
        let mut names = HashSet::new();
        let mut addresses = HashSet::new();
        for node in &self.nodes {
            if !names.insert(node.name.as_str()) {
                return Err(format!("node {} is listed twice", node.name));
            }
            if !addresses.insert(node.address) {
                return Err(format!("address {} is used by two nodes", node.address));
            }
        }
        let azs: HashMap<&str, &str> = self
            .nodes
            .iter()
            .map(|n| (n.name.as_str(), n.az.as_str()))
            .collect();
        let ids: HashSet<u32> = self.pgs.iter().map(|p| p.id).collect();
        if self.pgs.is_empty()
            || ids.len() != self.pgs.len()
            || ids.iter().any(|id| *id as usize >= self.pgs.len())
        {
            return Err("PG ids must be 0, 1, … pg_count − 1, each once".into());
        }
        for pg in &self.pgs {
            check_pg(pg, &azs)?;
        }
        Ok(())
    }
}

fn check_geometry(page_size_bytes: u32, segment_bytes: u64) -> Result<(), String> {
    if !page_size_bytes.is_power_of_two() || !(512..=65536).contains(&page_size_bytes) {
        return Err(format!(
            "page_size_bytes = {page_size_bytes} must be a power of two in 512..=65536"
        ));
    }
    if segment_bytes == 0 || !segment_bytes.is_multiple_of(u64::from(page_size_bytes)) {
        return Err(format!(
            "segment_bytes = {segment_bytes} must be a positive multiple of page_size_bytes"
        ));
    }
    Ok(())
}

fn check_pg(pg: &PgEntry, azs: &HashMap<&str, &str>) -> Result<(), String> {
    if pg.segments.len() != PG_SIZE {
        return Err(format!(
            "pg {} has {} segments; every PG has exactly {PG_SIZE}",
            pg.id,
            pg.segments.len()
        ));
    }
    let mut seen = HashSet::new();
    let mut per_az: BTreeMap<&str, usize> = BTreeMap::new();
    for name in &pg.segments {
        let Some(az) = azs.get(name.as_str()) else {
            return Err(format!(
                "pg {} names node {name}, which is not listed under [[node]]",
                pg.id
            ));
        };
        if !seen.insert(name.as_str()) {
            return Err(format!(
                "pg {} has two segments on node {name}; never two on one node",
                pg.id
            ));
        }
        *per_az.entry(az).or_default() += 1;
    }
    if per_az.len() != AZ_COUNT || per_az.values().any(|n| *n != SEGMENTS_PER_AZ) {
        let spread: Vec<String> = per_az.iter().map(|(az, n)| format!("{az}: {n}")).collect();
        return Err(format!(
            "pg {} must have exactly {SEGMENTS_PER_AZ} segments in each of {AZ_COUNT} AZs (has {})",
            pg.id,
            spread.join(", ")
        ));
    }
    Ok(())
}

/// Places `pg_count` PGs over `nodes`: PG `i` uses three AZs in rotation and two nodes of each,
/// also in rotation, so load spreads evenly.
pub fn place(nodes: &[NodeEntry], pg_count: u32) -> Result<Vec<PgEntry>, String> {
    let mut by_az: BTreeMap<&str, Vec<&str>> = BTreeMap::new();
    for node in nodes {
        by_az
            .entry(node.az.as_str())
            .or_default()
            .push(node.name.as_str());
    }
    let azs: Vec<&Vec<&str>> = by_az
        .values()
        .filter(|n| n.len() >= SEGMENTS_PER_AZ)
        .collect();
    if azs.len() < AZ_COUNT {
        return Err(format!(
            "placement needs at least {AZ_COUNT} AZs with {SEGMENTS_PER_AZ} or more nodes each; \
             have {}",
            azs.len()
        ));
    }
    let pgs = (0..pg_count)
        .map(|id| {
            let i = id as usize;
            let segments = (0..AZ_COUNT)
                .flat_map(|k| {
                    let az = azs[(i + k) % azs.len()];
                    (0..SEGMENTS_PER_AZ)
                        .map(move |j| az[(i * SEGMENTS_PER_AZ + j) % az.len()].to_string())
                })
                .collect();
            PgEntry { id, segments }
        })
        .collect();
    Ok(pgs)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn nodes(azs: &[&str]) -> Vec<NodeEntry> {
        azs.iter()
            .enumerate()
            .map(|(i, az)| NodeEntry {
                name: format!("node{}", i + 1),
                address: format!("127.0.0.1:{}", 7101 + i).parse().unwrap(),
                az: (*az).to_string(),
            })
            .collect()
    }

    #[test]
    fn placement_follows_the_rules_and_round_trips() {
        let six = nodes(&["a", "a", "b", "b", "c", "c", "a", "b", "c"]);
        let file = VolumeFile::create(VolumeId(1), 8192, 1 << 20, 7, six).unwrap();
        let again = VolumeFile::parse(&file.to_toml(), "v.toml").unwrap();
        assert_eq!(again, file);
        assert_eq!(file.geometry().pages_per_pg, 128);
        assert_eq!(file.placement().len(), 7);
    }

    #[test]
    fn broken_rules_are_named() {
        let e = VolumeFile::create(
            VolumeId(1),
            8192,
            1 << 20,
            1,
            nodes(&["a", "a", "b", "b", "c"]),
        )
        .unwrap_err();
        assert!(e.contains("3 AZs"), "{e}");
        let mut file = VolumeFile::create(
            VolumeId(1),
            8192,
            1 << 20,
            1,
            nodes(&["a", "a", "b", "b", "c", "c"]),
        )
        .unwrap();
        file.pgs[0].segments[1] = file.pgs[0].segments[0].clone();
        let e = VolumeFile::parse(&file.to_toml(), "v.toml").unwrap_err();
        assert!(e.contains("two segments on node"), "{e}");
        file.pgs[0].segments[1] = "node9".into();
        let e = VolumeFile::parse(&file.to_toml(), "v.toml").unwrap_err();
        assert!(e.contains("not listed"), "{e}");
        let mut lopsided = VolumeFile::create(
            VolumeId(1),
            8192,
            1 << 20,
            1,
            nodes(&["a", "a", "b", "b", "c", "c", "a"]),
        )
        .unwrap();
        lopsided.pgs[0].segments = ["node1", "node2", "node7", "node3", "node5", "node6"]
            .map(String::from)
            .to_vec();
        let e = VolumeFile::parse(&lopsided.to_toml(), "v.toml").unwrap_err();
        assert!(e.contains("exactly 2 segments in each of 3 AZs"), "{e}");
        let e = VolumeFile::create(
            VolumeId(1),
            1000,
            1 << 20,
            1,
            nodes(&["a", "a", "b", "b", "c", "c"]),
        )
        .unwrap_err();
        assert!(e.contains("power of two"), "{e}");
    }
}
