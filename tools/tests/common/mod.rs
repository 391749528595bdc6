//! Shared scaffolding for the process-level tests: test directories on the real disk,
//! certificates, node processes and record builders.
#![allow(dead_code, unreachable_pub)]

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::path::{Path, PathBuf};
use std::time::Duration;

use engine::NodeClient;
use engine::tls::ClientIdentity;
pub use node::config::{PersisterMode, SyncMode};
use prometheus_parse::{Sample, Scrape, Value};
use tools::procs::{NodeProcess, NodeSpec};
use wire::{Append, Epoch, LogRecord, Lsn, Message, PageId, PgId, RedoOp, SegmentIndex, VolumeId};

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

/// Node certificates for node1..node6 and an engine certificate, plus a rogue CA's engine
/// under `rogue/`.
pub fn certs(dir: &Path) -> PathBuf {
    let certs = dir.join("certs");
    let nodes: Vec<String> = (1..=6).map(|i| format!("node{i}")).collect();
    tools::certs::generate(&certs, &nodes, &["engine".to_string()]).unwrap();
    tools::certs::generate(&dir.join("rogue"), &[], &["engine".to_string()]).unwrap();
    certs
}

pub fn start_node(dir: &Path, certs: &Path) -> (NodeProcess, NodeSpec) {
    start_node_with(dir, certs, SyncMode::RwfDsync, PersisterMode::Inline)
}

/// A node whose journal makes writes durable with `sync`, written by `persister`.
pub fn start_node_with(
    dir: &Path,
    certs: &Path,
    sync: SyncMode,
    persister: PersisterMode,
) -> (NodeProcess, NodeSpec) {
    let mut spec = NodeSpec::local("node1", &dir.join("node1"), certs);
    spec.sync = sync;
    spec.persister = persister;
    let config = spec.write_config().unwrap();
    (NodeProcess::start(&config).unwrap(), spec)
}

/// An engine's connection to `node` (node1), at epoch 1 of volume 1 (installed by a Fence
/// from epoch 0 if the node is not there yet).
pub async fn connect(certs: &Path, node: &NodeProcess) -> NodeClient {
    let client = connect_as(certs, node, "engine").await;
    let state = fence(&client, 0, 1).await;
    assert!(matches!(state, Message::VolumeState(_)), "{state:?}");
    client
}

/// A connection to `node` (node1) with the certificate `name` (an engine or a node).
pub async fn connect_as(certs: &Path, node: &NodeProcess, name: &str) -> NodeClient {
    let endpoint = engine::tls::client_endpoint(&ClientIdentity::in_dir(certs, name)).unwrap();
    NodeClient::connect(&endpoint, node.addr, "node1")
        .await
        .unwrap()
        .0
}

/// Fences volume 1 from `epoch_current` to `epoch_new`; the node's reply.
pub async fn fence(client: &NodeClient, epoch_current: u64, epoch_new: u64) -> Message {
    let fence = wire::Fence {
        volume: VolumeId(1),
        epoch_current: Epoch(epoch_current),
        epoch_new: Epoch(epoch_new),
    };
    client.request(Message::Fence(fence)).await.unwrap()
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

/// Status line and body of `GET path` over a fresh HTTP/1.1 connection.
pub fn http_get(addr: SocketAddr, path: &str) -> (String, String) {
    let mut stream = TcpStream::connect(addr).unwrap();
    // A generous bound: a test may fail, never hang.
    stream
        .set_read_timeout(Some(Duration::from_secs(60)))
        .unwrap();
    let request = format!("GET {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n\r\n");
    stream.write_all(request.as_bytes()).unwrap();
    let mut response = String::new();
    stream.read_to_string(&mut response).unwrap();
    let (head, body) = response.split_once("\r\n\r\n").unwrap();
    let status = head.lines().next().unwrap().to_string();
    (status, body.to_string())
}

/// The node's metrics at `addr`, parsed by a Prometheus text parser.
pub fn scrape(addr: SocketAddr) -> Scrape {
    let (status, body) = http_get(addr, "/metrics");
    assert!(status.contains("200"), "{status}\n{body}");
    Scrape::parse(body.lines().map(|l| Ok(l.to_string()))).unwrap()
}

/// The value of the one sample named `name` (counters, gauges and histogram counts).
pub fn value(scrape: &Scrape, name: &str) -> f64 {
    let samples: Vec<&Sample> = scrape.samples.iter().filter(|s| s.metric == name).collect();
    assert_eq!(samples.len(), 1, "one {name} sample expected");
    match &samples[0].value {
        Value::Counter(v) | Value::Gauge(v) | Value::Untyped(v) => *v,
        other => panic!("{name} is {other:?}"),
    }
}
