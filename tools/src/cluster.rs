//! A local cluster of real `sixfold-node` processes on loopback: six nodes in three AZs by
//! default, certificates, a volume placed over them, and an engine endpoint. Used by
//! `sixfold dev`, the tests and the commit benchmark.

use std::path::{Path, PathBuf};

use anyhow::Context;
use engine::tls::ClientIdentity;
use engine::volume::NodeEntry;
use engine::{VolumeClient, VolumeConfig, VolumeFile};
use wire::VolumeId;

use crate::procs::{NodeProcess, NodeSpec};

/// Options of a local cluster.
#[derive(Clone, Debug)]
pub struct ClusterOptions {
    pub node_count: usize,
    pub pg_count: u32,
    pub page_size_bytes: u32,
    pub segment_bytes: u64,
    pub journal_file_bytes: u64,
    pub journal_file_count: u32,
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
    pub nodes: Vec<Option<NodeProcess>>,
    pub volume: VolumeFile,
}

impl LocalCluster {
    /// Starts the nodes, creates the volume (written to `dir/volume.toml`) and assigns each
    /// node its segments.
    pub async fn start(dir: &Path, options: &ClusterOptions) -> anyhow::Result<Self> {
        std::fs::create_dir_all(dir).with_context(|| format!("cannot create {}", dir.display()))?;
        let certs = dir.join("certs");
        let names: Vec<String> = (0..options.node_count).map(node_name).collect();
        crate::certs::generate(&certs, &names, &["engine".into()])?;
        let mut specs = Vec::new();
        let mut nodes = Vec::new();
        for i in 0..options.node_count {
            let mut spec = NodeSpec::local(&node_name(i), &dir.join(node_name(i)), &certs);
            spec.az = node_az(i);
            spec.segments.clear();
            spec.journal_file_bytes = options.journal_file_bytes;
            spec.journal_file_count = options.journal_file_count;
            let process = NodeProcess::start(&spec.write_config()?)?;
            // Restarts come back on the same address: the volume file names it.
            spec.listen = process.addr;
            spec.write_config()?;
            specs.push(spec);
            nodes.push(Some(process));
        }
        let entries = specs
            .iter()
            .map(|s| NodeEntry {
                name: s.name.clone(),
                address: s.listen,
                az: s.az.clone(),
            })
            .collect();
        let volume = VolumeFile::create(
            VolumeId(1),
            options.page_size_bytes,
            options.segment_bytes,
            options.pg_count,
            entries,
        )
        .map_err(anyhow::Error::msg)?;
        std::fs::write(dir.join("volume.toml"), volume.to_toml())?;
        let cluster = Self {
            dir: dir.to_path_buf(),
            certs,
            specs,
            nodes,
            volume,
        };
        engine::driver::assign_segments(&cluster.volume, &cluster.endpoint()?).await?;
        Ok(cluster)
    }

    pub fn identity(&self) -> ClientIdentity {
        ClientIdentity::in_dir(&self.certs, "engine")
    }

    pub fn endpoint(&self) -> anyhow::Result<quinn::Endpoint> {
        engine::tls::client_endpoint(&self.identity())
    }

    /// An engine attached to the volume.
    pub fn attach(&self, config: VolumeConfig) -> anyhow::Result<VolumeClient> {
        VolumeClient::attach(self.volume.clone(), self.endpoint()?, config)
    }

    pub fn kill9(&mut self, i: usize) {
        if let Some(mut node) = self.nodes[i].take() {
            node.kill9();
        }
    }

    pub fn restart(&mut self, i: usize) -> anyhow::Result<()> {
        self.kill9(i);
        let config = self.specs[i].data_dir.with_extension("toml");
        self.nodes[i] = Some(NodeProcess::start(&config)?);
        Ok(())
    }

    /// SIGTERM every node and wait for each to exit.
    pub fn stop(&mut self) -> anyhow::Result<()> {
        for node in self.nodes.iter_mut().flatten() {
            let status = node.terminate()?;
            anyhow::ensure!(status.success(), "a node exited with {status}");
        }
        self.nodes.clear();
        Ok(())
    }
}
