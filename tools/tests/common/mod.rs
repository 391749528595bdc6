//! Shared scaffolding for the process-level tests: test directories on the real disk,
//! certificates, node processes and record builders.
#![allow(dead_code, unreachable_pub)]

use std::path::{Path, PathBuf};

use engine::NodeClient;
use engine::tls::ClientIdentity;
use tools::procs::{NodeProcess, NodeSpec};
use wire::{Append, Epoch, LogRecord, Lsn, PageId, PgId, RedoOp, SegmentIndex, VolumeId};

/// A fresh directory under cargo's target tmpdir, which is on the real disk (never tmpfs, so
/// O_DIRECT is real).
pub fn test_dir(name: &str) -> PathBuf {
    let dir = Path::new(env!("CARGO_TARGET_TMPDIR")).join(format!("{name}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    dir
}

/// Removes a passing test's directory (a failing test keeps it for a post-mortem).
pub fn cleanup(dir: &Path) {
    let _ = std::fs::remove_dir_all(dir);
}

/// Certificates for node1..node6 and an engine, plus a rogue CA's client under `rogue/`.
pub fn certs(dir: &Path) -> PathBuf {
    let certs = dir.join("certs");
    let names: Vec<String> = (1..=6)
        .map(|i| format!("node{i}"))
        .chain(["engine".to_string()])
        .collect();
    tools::certs::generate(&certs, &names).unwrap();
    tools::certs::generate(&dir.join("rogue"), &["engine".to_string()]).unwrap();
    certs
}

pub fn start_node(dir: &Path, certs: &Path) -> (NodeProcess, NodeSpec) {
    start_node_with(dir, certs, "rwf_dsync", "inline")
}

/// A node whose journal makes writes durable with `sync` ("rwf_dsync" or "fdatasync") from a
/// persister that runs `persister` ("inline" or "thread").
pub fn start_node_with(
    dir: &Path,
    certs: &Path,
    sync: &'static str,
    persister: &'static str,
) -> (NodeProcess, NodeSpec) {
    let mut spec = NodeSpec::local("node1", &dir.join("node1"), certs);
    spec.sync = sync;
    spec.persister = persister;
    let config = spec.write_config().unwrap();
    (NodeProcess::start(&config).unwrap(), spec)
}

pub async fn connect(certs: &Path, node: &NodeProcess) -> NodeClient {
    let endpoint = engine::tls::client_endpoint(&ClientIdentity::in_dir(certs, "engine")).unwrap();
    NodeClient::connect(&endpoint, node.addr, "node1")
        .await
        .unwrap()
        .0
}

pub fn write(lsn: u64, backlink: u64, page: u64, payload_bytes: usize) -> LogRecord {
    LogRecord {
        lsn: Lsn(lsn),
        backlink: Lsn(backlink),
        page: PageId(page),
        cpl: true,
        op: RedoOp::Write {
            offset: 0,
            bytes: vec![(lsn % 251) as u8; payload_bytes],
        },
    }
}

pub fn append(epoch: u64, records: Vec<LogRecord>) -> Append {
    Append {
        volume: VolumeId(1),
        epoch: Epoch(epoch),
        pg: PgId(0),
        segment: SegmentIndex(0),
        vdl: Lsn::ZERO,
        records,
    }
}

/// LSNs of the durable records of the node whose data directory is `data_dir`.
pub fn durable_lsns(data_dir: &Path) -> Vec<u64> {
    let (records, _) = tools::inspect::journal_records(data_dir).unwrap();
    records.iter().map(|r| r.lsn).collect()
}

pub fn runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap()
}
