//! What a node hosts and the highest epoch it has seen per volume, kept in a small manifest
//! replaced atomically (write `manifest.toml.tmp`, fsync, rename, fsync the directory).
//!
//! Invariants: the manifest on disk is always a complete old or a complete new version; an
//! epoch is recorded durably before any request carrying it is acknowledged, and recorded
//! epochs only grow.

use std::collections::BTreeMap;
use std::fs::File;
use std::io::Write;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};
use wire::{Epoch, PgId, SegmentIndex, VolumeId};

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
}

#[derive(Clone, Copy, Debug, Serialize, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
struct VolumeToml {
    volume: u64,
    epoch: u64,
    page_size_bytes: u32,
    pages_per_pg: u64,
}

/// What a node knows of a volume.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct VolumeMeta {
    /// Highest epoch seen; requests with an older one are refused.
    pub epoch: Epoch,
    pub page_size_bytes: u32,
    /// Pages per PG; 0 while unknown (segments configured by hand, not by `volume create`).
    pub pages_per_pg: u64,
}

/// Page size of a volume whose geometry the node has not been told.
pub const DEFAULT_PAGE_SIZE_BYTES: u32 = 8192;

impl Default for VolumeMeta {
    fn default() -> Self {
        Self {
            epoch: Epoch(0),
            page_size_bytes: DEFAULT_PAGE_SIZE_BYTES,
            pages_per_pg: 0,
        }
    }
}

/// The node's durable metadata.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Manifest {
    pub segments: Vec<SegmentKey>,
    pub volumes: BTreeMap<VolumeId, VolumeMeta>,
}

pub const MANIFEST_FILE: &str = "manifest.toml";

impl Manifest {
    pub fn path(data_dir: &Path) -> PathBuf {
        data_dir.join(MANIFEST_FILE)
    }

    /// Loads the manifest, or an empty one if the node is new.
    pub fn load(data_dir: &Path) -> anyhow::Result<Self> {
        let path = Self::path(data_dir);
        let text = match std::fs::read_to_string(&path) {
            Ok(text) => text,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(Self::default()),
            Err(e) => anyhow::bail!("cannot read {}: {e}", path.display()),
        };
        let parsed: ManifestToml = toml::from_str(&text)
            .map_err(|e| anyhow::anyhow!("{} is corrupt: {}", path.display(), e.message()))?;
        let volumes = parsed.volume.iter().map(|v| {
            let meta = VolumeMeta {
                epoch: Epoch(v.epoch),
                page_size_bytes: v.page_size_bytes,
                pages_per_pg: v.pages_per_pg,
            };
            (VolumeId(v.volume), meta)
        });
        Ok(Self {
            segments: parsed.segment,
            volumes: volumes.collect(),
        })
    }

    /// Replaces the manifest on disk atomically.
    pub fn store(&self, data_dir: &Path) -> std::io::Result<()> {
        let volume = self.volumes.iter().map(|(id, m)| VolumeToml {
            volume: id.0,
            epoch: m.epoch.0,
            page_size_bytes: m.page_size_bytes,
            pages_per_pg: m.pages_per_pg,
        });
        let parsed = ManifestToml {
            segment: self.segments.clone(),
            volume: volume.collect(),
        };
        let text = toml::to_string(&parsed).map_err(std::io::Error::other)?;
        let tmp = data_dir.join(format!("{MANIFEST_FILE}.tmp"));
        {
            let mut file = File::create(&tmp)?;
            file.write_all(text.as_bytes())?;
            file.sync_all()?;
        }
        std::fs::rename(&tmp, Self::path(data_dir))?;
        File::open(data_dir)?.sync_all()
    }

    pub fn volume(&self, volume: VolumeId) -> VolumeMeta {
        self.volumes.get(&volume).copied().unwrap_or_default()
    }

    pub fn epoch(&self, volume: VolumeId) -> Epoch {
        self.volume(volume).epoch
    }

    pub fn hosts(&self, key: &SegmentKey) -> bool {
        self.segments.contains(key)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn manifest_round_trip() {
        let dir = std::env::temp_dir().join(format!("sixfold-manifest-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
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
        };
        m.volumes.insert(VolumeId(1), meta);
        m.store(&dir).unwrap();
        assert_eq!(Manifest::load(&dir).unwrap(), m);
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
