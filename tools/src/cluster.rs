//! A local cluster of real `sixfold-node` processes on loopback: six nodes in three AZs by
//! default, certificates, a volume placed over them, and an engine endpoint. Used by
//! `sixfold dev`, the tests and the commit benchmark.
//!
//! Layout under the cluster directory `dir` (made absolute, so the config files work from
//! any working directory):
//! - `certs/`: the CA and the certificates of `node1`… and of `engine`;
//! - `nodeN/`: node N's data directory; `nodeN.toml`: its config; `nodeN.log`: its stderr;
//! - `volume.toml`: the volume file.
//!
//! Invariants: `volume.toml` is written last, atomically, once every node has accepted its
//! segments, so a directory holding one holds a complete cluster, and
//! [`LocalCluster::open`] restarts it without telling any node anything (the nodes' manifests
//! already list their segments, and a writer that recovered the volume may have moved its
//! epoch past the file's). A node's config keeps the address it was given at first start, so
//! every restart and reopen brings it back where the volume file says it is.

use std::path::{Path, PathBuf};

use anyhow::Context;
use engine::tls::ClientIdentity;
use engine::volume::NodeEntry;
use engine::{VolumeClient, VolumeConfig, VolumeFile};
use wire::VolumeId;

use crate::procs::{Backoff, NodeProcess, NodeSpec, Supervisor};

/// Options of a local cluster.
#[derive(Clone, Debug)]
pub struct ClusterOptions {
    pub node_count: usize,
    pub pg_count: u32,
    pub page_size_bytes: u32,
    pub segment_bytes: u64,
    pub journal_file_bytes: u64,
    pub journal_file_count: u32,
    /// Start the nodes with `[background] paused = true` (see [`LocalCluster::set_background_paused`]).
    pub background_paused: bool,
    /// Serve each node's metrics on a free loopback port ([`LocalCluster::metrics_addr`]).
    pub metrics: bool,
    /// `[scrub] interval_ms` of every node (`None`: the node's default).
    pub scrub_interval_ms: Option<u64>,
    /// `[backup]` of every node (off unless its `url` is set).
    pub backup: node::config::BackupSettings,
}

impl Default for ClusterOptions {
    fn default() -> Self {
        Self {
            node_count: 6,
            pg_count: 2,
            page_size_bytes: 8192,
            segment_bytes: 8 << 20,
            journal_file_bytes: 16 << 20,
            journal_file_count: 4,
            background_paused: false,
            metrics: false,
            scrub_interval_ms: None,
            backup: node::config::BackupSettings::default(),
        }
    }
}

/// Node `i` (0-based) is `node{i+1}` in AZ `az{i/2 % 3 + 1}`: two per AZ.
pub fn node_name(i: usize) -> String {
    format!("node{}", i + 1)
}

pub fn node_az(i: usize) -> String {
    format!("az{}", (i / 2) % 3 + 1)
}

pub struct LocalCluster {
    pub dir: PathBuf,
    pub certs: PathBuf,
    pub specs: Vec<NodeSpec>,
    /// `None` for a node killed, or handed to a [`Supervisor`].
    pub nodes: Vec<Option<NodeProcess>>,
    pub volume: VolumeFile,
    /// Whether this cluster was reopened from an existing directory rather than created.
    pub reopened: bool,
}

/// Creates `dir` if needed and returns its absolute path.
fn absolute_dir(dir: &Path) -> anyhow::Result<PathBuf> {
    std::fs::create_dir_all(dir).with_context(|| format!("cannot create {}", dir.display()))?;
    std::fs::canonicalize(dir).with_context(|| format!("cannot resolve {}", dir.display()))
}

/// Starts a node per config file, one after the other (a new node pre-writes its journal:
/// one at a time keeps each within its readiness deadline on a slow disk).
fn start_all(configs: &[PathBuf]) -> anyhow::Result<Vec<NodeProcess>> {
    // On an error the nodes already started are dropped, which kills them.
    configs
        .iter()
        .map(|config| NodeProcess::start(config))
        .collect()
}

/// Writes `contents` to `path` atomically: a temporary file, fsynced, renamed over it.
fn write_atomically(path: &Path, contents: &str) -> anyhow::Result<()> {
    let tmp = path.with_extension("toml.tmp");
    let mut file = std::fs::File::create(&tmp)?;
    std::io::Write::write_all(&mut file, contents.as_bytes())?;
    file.sync_all()?;
    std::fs::rename(&tmp, path).with_context(|| format!("cannot write {}", path.display()))
}

impl LocalCluster {
    /// Reopens the cluster under `dir` if it has a `volume.toml`, else starts a new one.
    /// `options` shape a new cluster only: a reopened one keeps the geometry of its
    /// `volume.toml` and the journals its node configs describe.
    pub async fn open_or_start(dir: &Path, options: &ClusterOptions) -> anyhow::Result<Self> {
        if dir.join("volume.toml").is_file() {
            Self::open(dir)
        } else {
            Self::start(dir, options).await
        }
    }

    /// Restarts an existing cluster: its nodes from their config files (same addresses, same
    /// certificates, same data), its volume from `volume.toml`. No node is contacted.
    pub fn open(dir: &Path) -> anyhow::Result<Self> {
        let dir = absolute_dir(dir)?;
        let volume = VolumeFile::load(&dir.join("volume.toml")).map_err(anyhow::Error::msg)?;
        let certs = dir.join("certs");
        anyhow::ensure!(
            certs.join("ca.pem").is_file(),
            "{} has a volume.toml but no certs/ca.pem",
            dir.display()
        );
        let mut specs = Vec::new();
        let mut configs = Vec::new();
        for entry in &volume.nodes {
            let path = dir.join(format!("{}.toml", entry.name));
            let config = node::NodeConfig::load(&path).map_err(anyhow::Error::msg)?;
            anyhow::ensure!(
                config.listen == entry.address,
                "{} listens on {} but volume.toml says {} is on {}",
                path.display(),
                config.listen,
                entry.name,
                entry.address
            );
            specs.push(NodeSpec::from_config(&config));
            configs.push(path);
        }
        let nodes = start_all(&configs)?.into_iter().map(Some).collect();
        Ok(Self {
            dir,
            certs,
            specs,
            nodes,
            volume,
            reopened: true,
        })
    }

    /// Starts the nodes, creates the volume, assigns each node its segments, and then writes
    /// the volume file to `dir/volume.toml`.
    pub async fn start(dir: &Path, options: &ClusterOptions) -> anyhow::Result<Self> {
        let dir = absolute_dir(dir)?;
        let certs = dir.join("certs");
        let names: Vec<String> = (0..options.node_count).map(node_name).collect();
        crate::certs::generate(&certs, &names, &["engine".into()])?;
        let mut specs = Vec::new();
        let mut configs = Vec::new();
        for i in 0..options.node_count {
            let mut spec = NodeSpec::local(&node_name(i), &dir.join(node_name(i)), &certs);
            spec.az = node_az(i);
            spec.segments.clear();
            spec.journal_file_bytes = options.journal_file_bytes;
            spec.journal_file_count = options.journal_file_count;
            spec.background_paused = options.background_paused;
            spec.scrub_interval_ms = options.scrub_interval_ms;
            spec.backup = options.backup.clone();
            if options.metrics {
                spec.metrics_listen = Some(std::net::SocketAddr::from(([127, 0, 0, 1], 0)));
            }
            configs.push(spec.write_config()?);
            specs.push(spec);
        }
        let nodes = start_all(&configs)?;
        for (spec, process) in specs.iter_mut().zip(&nodes) {
            // Restarts come back on the same address: the volume file names it.
            spec.listen = process.addr;
            spec.write_config()?;
        }
        let volume = create_volume(&specs, options)?;
        let cluster = Self {
            dir,
            certs,
            specs,
            nodes: nodes.into_iter().map(Some).collect(),
            volume,
            reopened: false,
        };
        engine::driver::assign_segments(&cluster.volume, &cluster.endpoint()?).await?;
        write_atomically(&cluster.dir.join("volume.toml"), &cluster.volume.to_toml())?;
        Ok(cluster)
    }

    pub fn identity(&self) -> ClientIdentity {
        ClientIdentity::in_dir(&self.certs, "engine")
    }

    pub fn endpoint(&self) -> anyhow::Result<quinn::Endpoint> {
        engine::tls::client_endpoint(&self.identity())
    }

    /// An engine attached to the volume.
    pub async fn attach(&self, config: VolumeConfig) -> anyhow::Result<VolumeClient> {
        VolumeClient::open(self.volume.clone(), self.endpoint()?, config).await
    }

    /// The config file of node `i`.
    pub fn config_path(&self, i: usize) -> PathBuf {
        self.specs[i].data_dir.with_extension("toml")
    }

    /// Where node `i` serves its metrics (as its latest start logged), if it does.
    pub fn metrics_addr(&self, i: usize) -> Option<std::net::SocketAddr> {
        self.nodes.get(i)?.as_ref()?.metrics_addr()
    }

    /// Rewrites every node's config with `[background] paused` set as given; it applies from
    /// each node's next start (restart it, or [`stop`](Self::stop) and [`open`](Self::open)).
    pub fn set_background_paused(&mut self, paused: bool) -> anyhow::Result<()> {
        for spec in &mut self.specs {
            spec.background_paused = paused;
            spec.write_config()?;
        }
        Ok(())
    }

    pub fn kill9(&mut self, i: usize) {
        if let Some(mut node) = self.nodes[i].take() {
            node.kill9();
        }
    }

    pub fn restart(&mut self, i: usize) -> anyhow::Result<()> {
        self.kill9(i);
        self.nodes[i] = Some(NodeProcess::start(&self.config_path(i))?);
        Ok(())
    }

    /// Hands the nodes to a supervisor, which restarts them when they die; this cluster
    /// then holds no process (`nodes` are all `None`), and stopping is the supervisor's.
    pub fn supervisor(&mut self, backoff: Backoff) -> Supervisor {
        let nodes = (0..self.specs.len())
            .map(|i| {
                let process = self.nodes.get_mut(i).and_then(Option::take);
                (self.specs[i].name.clone(), self.config_path(i), process)
            })
            .collect();
        Supervisor::new(nodes, backoff)
    }

    /// SIGTERMs every node, waits up to `STOP_GRACE` for all of them to exit, SIGKILLs any
    /// left; an error if any did not exit cleanly by itself.
    pub fn stop(&mut self) -> anyhow::Result<()> {
        let mut running: Vec<&mut NodeProcess> = self.nodes.iter_mut().flatten().collect();
        let outcomes = crate::procs::stop_all(&mut running, crate::procs::STOP_GRACE);
        self.nodes.clear();
        match outcomes.iter().find(|o| !o.is_clean()) {
            Some(bad) => anyhow::bail!("a node {bad}"),
            None => Ok(()),
        }
    }
}

/// A volume placed over the nodes of `specs`.
fn create_volume(specs: &[NodeSpec], options: &ClusterOptions) -> anyhow::Result<VolumeFile> {
    let entries = specs
        .iter()
        .map(|s| NodeEntry {
            name: s.name.clone(),
            address: s.listen,
            az: s.az.clone(),
        })
        .collect();
    VolumeFile::create(
        VolumeId(1),
        options.page_size_bytes,
        options.segment_bytes,
        options.pg_count,
        entries,
    )
    .map_err(anyhow::Error::msg)
}

/// Bytes a directory tree occupies on disk (allocated blocks, so sparse files count as such).
pub fn disk_bytes(dir: &Path) -> u64 {
    use std::os::unix::fs::MetadataExt;
    let mut total = 0;
    for entry in std::fs::read_dir(dir).into_iter().flatten().flatten() {
        let Ok(meta) = entry.metadata() else { continue };
        if meta.is_dir() {
            total += disk_bytes(&entry.path());
        } else {
            total += meta.blocks() * 512;
        }
    }
    total
}
