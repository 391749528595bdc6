//! `node.toml`: what an operator configures. Every mistake is reported as one line naming the
//! key and what to do about it.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};

use serde::Deserialize;

use crate::io::raw::SyncMode;
use crate::journal::INFLIGHT_GROUPS_MAX;
use crate::state::SegmentKey;

/// The configuration a node runs with when no `--config` is given: one node on loopback with
/// data and certificates under `./.sixfold` (create the certificates with
/// `sixfold certs --out .sixfold/certs --node node1 --engine engine`).
pub const DEFAULT_CONFIG: &str = r#"# Sixfold storage node: embedded default for local runs.
name = "node1"
listen = "127.0.0.1:7100"
az = "az1"
data_dir = ".sixfold/node1"

[tls]
ca = ".sixfold/certs/ca.pem"
cert = ".sixfold/certs/node1.pem"
key = ".sixfold/certs/node1.key.pem"

[journal]
file_bytes = 268435456   # 256 MiB per journal file
file_count = 8
inflight_groups_max = 4
sync = "rwf_dsync"       # or "fdatasync" (write + linked fdatasync)
persister = "inline"     # or "thread": where the io_uring persister runs

[[segment]]
volume = 1
pg = 0
segment = 0
"#;

#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct NodeConfig {
    /// The node's name: its certificate's subject name.
    pub name: String,
    pub listen: SocketAddr,
    pub az: String,
    pub data_dir: PathBuf,
    pub tls: TlsConfig,
    #[serde(default)]
    pub journal: JournalConfig,
    #[serde(default, rename = "segment")]
    pub segments: Vec<SegmentKey>,
}

#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TlsConfig {
    pub ca: PathBuf,
    pub cert: PathBuf,
    pub key: PathBuf,
}

#[derive(Clone, Copy, Debug, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "snake_case")]
pub enum SyncChoice {
    Fdatasync,
    RwfDsync,
}

/// Where the persister runs (see `persister::PersisterMode`).
#[derive(Clone, Copy, Debug, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "snake_case")]
pub enum PersisterChoice {
    Thread,
    Inline,
}

#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct JournalConfig {
    pub file_bytes: u64,
    pub file_count: u32,
    pub inflight_groups_max: usize,
    pub sync: SyncChoice,
    #[serde(default = "default_persister")]
    pub persister: PersisterChoice,
}

/// Inline by default: measured on this project's 2-core reference machine, inline beat a
/// persister thread at every concurrency (`sixfold-bench append --persister …`, 4 s runs):
/// p50 at 1 in flight 249–256 µs against 282–297 µs, 37.8k against 31.0k appends/s at 16 in
/// flight and 77.4k against 67.9k at 64. Re-measure on machines with many cores.
fn default_persister() -> PersisterChoice {
    PersisterChoice::Inline
}

impl Default for JournalConfig {
    fn default() -> Self {
        Self {
            file_bytes: 256 << 20,
            file_count: 8,
            inflight_groups_max: 4,
            sync: SyncChoice::RwfDsync,
            persister: default_persister(),
        }
    }
}

impl JournalConfig {
    pub fn persister_mode(&self) -> crate::persister::PersisterMode {
        match self.persister {
            PersisterChoice::Thread => crate::persister::PersisterMode::Thread,
            PersisterChoice::Inline => crate::persister::PersisterMode::Inline,
        }
    }

    pub fn sync_mode(&self) -> SyncMode {
        match self.sync {
            SyncChoice::Fdatasync => SyncMode::LinkedFdatasync,
            SyncChoice::RwfDsync => SyncMode::RwfDsync,
        }
    }
}

impl NodeConfig {
    /// Parses and checks a configuration; `origin` names it in errors.
    pub fn parse(text: &str, origin: &str) -> Result<Self, String> {
        let config: NodeConfig = toml::from_str(text).map_err(|e| {
            let line = e.span().map(|s| text[..s.start].lines().count().max(1));
            let at = line.map(|l| format!(" (line {l})")).unwrap_or_default();
            format!("{origin}{at}: {}", e.message().trim().replace('\n', "; "))
        })?;
        config.check().map_err(|e| format!("{origin}: {e}"))?;
        Ok(config)
    }

    /// Reads and parses a configuration file.
    pub fn load(path: &Path) -> Result<Self, String> {
        let text = std::fs::read_to_string(path)
            .map_err(|e| format!("cannot read config {}: {e}", path.display()))?;
        Self::parse(&text, &path.display().to_string())
    }

    fn check(&self) -> Result<(), String> {
        let j = &self.journal;
        let align = crate::io::DIRECT_IO_ALIGN as u64;
        let group = crate::journal::format::GROUP_BYTES_MAX as u64;
        if !j.file_bytes.is_multiple_of(align) || j.file_bytes < group {
            return Err(format!(
                "journal.file_bytes = {} must be a multiple of {align} and at least {group} \
                 (one full block group); try 268435456",
                j.file_bytes
            ));
        }
        if j.file_count == 0 {
            return Err("journal.file_count must be at least 1; try 8".into());
        }
        if j.inflight_groups_max == 0 || j.inflight_groups_max > INFLIGHT_GROUPS_MAX {
            return Err(format!(
                "journal.inflight_groups_max = {} must be between 1 and {INFLIGHT_GROUPS_MAX}",
                j.inflight_groups_max
            ));
        }
        if self.name.is_empty() {
            return Err("name must not be empty: use the node's certificate name".into());
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn default_config_parses() {
        let c = NodeConfig::parse(DEFAULT_CONFIG, "default").unwrap();
        assert_eq!(c.segments.len(), 1);
        assert_eq!(c.journal.sync, SyncChoice::RwfDsync);
    }

    #[test]
    fn bad_config_is_one_line_naming_the_problem() {
        let text = DEFAULT_CONFIG.replace("listen = \"127.0.0.1:7100\"", "listen = \"nowhere\"");
        let e = NodeConfig::parse(&text, "node.toml").unwrap_err();
        assert!(!e.contains('\n'), "{e}");
        assert!(e.contains("line 3"), "{e}");
        let text = DEFAULT_CONFIG.replace("file_count = 8", "file_count = 0");
        let e = NodeConfig::parse(&text, "node.toml").unwrap_err();
        assert!(e.contains("journal.file_count"), "{e}");
        let text = format!("{DEFAULT_CONFIG}\nbogus = 1\n");
        let e = NodeConfig::parse(&text, "node.toml").unwrap_err();
        assert!(e.contains("bogus"), "{e}");
    }
}
