//! The manifest on disk: `manifest.toml` in the data directory, replaced atomically (write
//! `manifest.toml.tmp`, fsync it, rename it over the old one, fsync the directory).
//!
//! Invariant: the file on disk is always a complete old or a complete new version.

use std::fs::File;
use std::io::Write;
use std::path::{Path, PathBuf};

use crate::manifest::{MANIFEST_FILE, Manifest};

/// Durable storage of the manifest. Blocking: drivers call it off their runtime thread.
pub trait ManifestStore: Send + Sync {
    /// Replaces the stored manifest atomically; `Ok` once the new one is durable.
    fn store(&self, manifest: &Manifest) -> std::io::Result<()>;
}

/// The manifest file in a data directory.
#[derive(Clone, Debug)]
pub struct FileManifestStore {
    data_dir: PathBuf,
}

impl FileManifestStore {
    pub fn new(data_dir: &Path) -> Self {
        Self {
            data_dir: data_dir.to_path_buf(),
        }
    }

    pub fn path(&self) -> PathBuf {
        self.data_dir.join(MANIFEST_FILE)
    }

    /// Loads the manifest, or an empty one if the node is new.
    pub fn load(&self) -> anyhow::Result<Manifest> {
        let path = self.path();
        let text = match std::fs::read_to_string(&path) {
            Ok(text) => text,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(Manifest::default()),
            Err(e) => anyhow::bail!("cannot read {}: {e}", path.display()),
        };
        Manifest::from_toml(&text, &path.display().to_string()).map_err(anyhow::Error::msg)
    }
}

impl ManifestStore for FileManifestStore {
    fn store(&self, manifest: &Manifest) -> std::io::Result<()> {
        let text = manifest.to_toml();
        let tmp = self.data_dir.join(format!("{MANIFEST_FILE}.tmp"));
        {
            let mut file = File::create(&tmp)?;
            file.write_all(text.as_bytes())?;
            file.sync_all()?;
        }
        std::fs::rename(&tmp, self.path())?;
        File::open(&self.data_dir)?.sync_all()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::manifest::{SegmentKey, VolumeMeta};
    use wire::{Epoch, PgId, SegmentIndex, VolumeId};

    /// Goal: what is stored is what is loaded, and a missing file is an empty manifest.
    /// Method: load from an empty directory, store a manifest, load it back.
    #[test]
    fn store_then_load() {
        let dir = std::env::temp_dir().join(format!("sixfold-manifest-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let store = FileManifestStore::new(&dir);
        assert_eq!(store.load().unwrap(), Manifest::default());
        let mut m = Manifest::default();
        m.segments.push(SegmentKey {
            volume: VolumeId(1),
            pg: PgId(2),
            segment: SegmentIndex(3),
        });
        let meta = VolumeMeta {
            epoch: Epoch(7),
            ..VolumeMeta::default()
        };
        m.volumes.insert(VolumeId(1), meta);
        store.store(&m).unwrap();
        assert_eq!(store.load().unwrap(), m);
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
