//! Scrub against six real node processes (io_uring, O_DIRECT page stores and journals, QUIC
//! with mutual TLS between nodes): a bit flipped on disk in a node's page file and in its
//! journal is found, never served, and repaired from a peer, with no engine involved in the
//! repair.

mod common;

use std::collections::HashMap;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::time::Duration;

use common::{cleanup, runtime, test_dir};
use engine::quorum::MtrRecord;
use engine::{VolumeClient, VolumeConfig};
use tools::cluster::{ClusterOptions, LocalCluster};
use wire::{Lsn, PageId, PgId, RedoOp, SegmentIndex};

const PAGE_SIZE: usize = 8192;
/// Pages of PG 0 written.
const PAGES: u64 = 4;
/// The node whose disk is damaged (node1).
const NODE: usize = 0;

/// A payload no other record carries, to find the record in the journal.
fn payload(n: u64) -> Vec<u8> {
    format!("scrub-test-record-{n:08}-")
        .into_bytes()
        .into_iter()
        .cycle()
        .take(512)
        .collect()
}

/// Commits one MTR writing `payload(n)` at the start of `page`; keeps the model (pages of PG
/// 0 only). Returns the record's LSN.
async fn write(
    volume: &VolumeClient,
    model: &mut HashMap<PageId, Vec<u8>>,
    page: PageId,
    n: u64,
) -> Lsn {
    let bytes = payload(n);
    if page.0 < PAGES {
        let image = model.entry(page).or_insert_with(|| vec![0; PAGE_SIZE]);
        image[..bytes.len()].copy_from_slice(&bytes);
    }
    let record = MtrRecord {
        page,
        op: RedoOp::Write { offset: 0, bytes },
    };
    let cpl = volume.write_mtr(vec![record]).await.unwrap();
    let committed = tokio::time::timeout(Duration::from_secs(60), volume.commit(cpl)).await;
    committed.expect("a commit took more than 60 s").unwrap();
    cpl
}

/// PG 0's segment on `NODE`.
fn segment(cluster: &LocalCluster) -> SegmentIndex {
    let name = &cluster.volume.nodes[NODE].name;
    let (_, segment) = cluster
        .volume
        .segments_of(name)
        .into_iter()
        .find(|(pg, _)| *pg == PgId(0))
        .expect("every node hosts a segment of PG 0");
    segment
}

fn page_file(cluster: &LocalCluster, segment: SegmentIndex) -> PathBuf {
    let data_dir = &cluster.specs[NODE].data_dir;
    let volume = cluster.volume.id().0;
    data_dir.join(format!("pages/v{volume}-pg0-s{}.sfp", segment.0))
}

/// Offset of the slot holding `page`'s newest image at or above `at_least`, if coalesced.
fn newest_slot(file: &Path, page: PageId, at_least: Lsn) -> Option<u64> {
    let bytes = std::fs::read(file).ok()?;
    let slot = node::pagestore::slot_bytes(PAGE_SIZE);
    let first = page.0 as usize * 2 * slot;
    (0..2)
        .map(|s| first + s * slot)
        .filter_map(|at| {
            let header = bytes.get(at..at + 24)?;
            (header[0..4] == *b"SFPG").then_some(())?;
            let lsn = u64::from_le_bytes(header[16..24].try_into().ok()?);
            (lsn >= at_least.0).then_some((lsn, at as u64))
        })
        .max()
        .map(|(_, at)| at)
}

/// Flips one bit of `file` at `offset` through an ordinary write and syncs it (O_DIRECT
/// readers see it: the kernel writes cached pages back before a direct read).
fn flip(file: &Path, offset: u64) {
    let f = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open(file)
        .unwrap();
    let mut byte = [0u8];
    f.read_exact_at(&mut byte, offset).unwrap();
    byte[0] ^= 0x08;
    f.write_all_at(&byte, offset).unwrap();
    f.sync_data().unwrap();
}

/// Where `needle` lies in `NODE`'s journal: (file, offset). Waits (60 s at most) for it: a
/// commit needs four nodes of six, maybe not this one.
async fn find_in_journal(cluster: &LocalCluster, needle: &[u8]) -> (PathBuf, u64) {
    let dir = cluster.specs[NODE].data_dir.join("journal");
    let deadline = tokio::time::Instant::now() + Duration::from_secs(60);
    loop {
        for entry in std::fs::read_dir(&dir).unwrap() {
            let path = entry.unwrap().path();
            let bytes = std::fs::read(&path).unwrap();
            if let Some(at) = bytes.windows(needle.len()).position(|w| w == needle) {
                return (path, at as u64);
            }
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "the record never reached node{}'s journal",
            NODE + 1
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// Node `NODE`'s scrub counters: (damaged, repaired).
async fn scrub_counts(cluster: &LocalCluster) -> (f64, f64) {
    let addr = cluster.metrics_addr(NODE).expect("metrics are on");
    let metrics = tools::scrape::scrape(addr).await.unwrap();
    let damaged = metrics.value("node_scrub_damaged_total").unwrap_or(0.0);
    let repaired = metrics.value("node_scrub_repaired_total").unwrap_or(0.0);
    (damaged, repaired)
}

/// Waits (60 s at most) until `NODE` has repaired `count` damaged copies.
async fn wait_repaired(cluster: &LocalCluster, count: f64) {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(60);
    loop {
        let (damaged, repaired) = scrub_counts(cluster).await;
        if repaired >= count {
            assert!(damaged >= count, "repaired {repaired} of {damaged} damaged");
            return;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "node{} repaired {repaired} of {damaged} damaged copies, not {count}, in 60 s",
            NODE + 1
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// Reads every page from `NODE`'s segment alone: each is either refused or exactly the model
/// (never damaged bytes); returns how many were served.
async fn read_from_node(
    volume: &VolumeClient,
    segment: SegmentIndex,
    model: &HashMap<PageId, Vec<u8>>,
) -> usize {
    let mut served = 0;
    for (page, expected) in model {
        let order = Some(vec![segment]);
        if let Ok(image) = volume.read_page_from(*page, volume.vdl(), order).await {
            assert!(image.bytes == *expected, "page {} served damaged", page.0);
            served += 1;
        }
        let image = volume.read_page(*page).await.unwrap();
        assert!(
            image.bytes == *expected,
            "page {} differs from the model",
            page.0
        );
    }
    served
}

/// Waits (60 s at most) until `NODE` has coalesced `page` up to `lsn`; returns the slot.
async fn wait_coalesced(file: &Path, page: PageId, lsn: Lsn) -> u64 {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(60);
    loop {
        if let Some(slot) = newest_slot(file, page, lsn) {
            return slot;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "page {} was not coalesced up to {lsn} within 60 s",
            page.0
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// Goal: a flipped bit in a page image and one in a journal record of a running node are each
/// detected, never served, and repaired from a peer (the node then serves them exactly).
/// Method: 40 MTRs over 4 pages of PG 0, then one on PG 1 (the VDL hint that lets coalescing
/// reach them); wait until node1 coalesced page 1; flip a bit inside its newest image; read
/// every page from node1's segment alone (refused or exact) and through the engine (exact);
/// wait for node1's repair counter; read again (now served). Then write one more MTR, flip a
/// bit inside its record in node1's journal, and do the same. Scrub runs every 100 ms.
#[test]
fn flipped_bits_in_a_page_and_a_journal_record_are_repaired_from_a_peer() {
    let dir = test_dir("scrub");
    let options = ClusterOptions {
        metrics: true,
        scrub_interval_ms: Some(100),
        ..ClusterOptions::default()
    };
    runtime().block_on(async {
        let mut cluster = LocalCluster::start(&dir, &options).await.unwrap();
        let volume = cluster.attach(VolumeConfig::default()).await.unwrap();
        let segment = segment(&cluster);
        let mut model = HashMap::new();
        let mut last = Lsn::ZERO;
        for n in 0..40 {
            let lsn = write(&volume, &mut model, PageId(n % PAGES), n).await;
            if n % PAGES == 1 {
                last = lsn;
            }
        }
        // A record of PG 1 carries a VDL past PG 0's records: coalescing may reach them.
        let other_pg = PageId(cluster.volume.geometry().pages_per_pg);
        write(&volume, &mut model, other_pg, 1000).await;

        // A page image.
        let file = page_file(&cluster, segment);
        let slot = wait_coalesced(&file, PageId(1), last).await;
        flip(&file, slot + 32 + 100);
        read_from_node(&volume, segment, &model).await;
        wait_repaired(&cluster, 1.0).await;
        let served = read_from_node(&volume, segment, &model).await;
        assert_eq!(served, model.len(), "node1 serves every page once repaired");

        // A journal record.
        write(&volume, &mut model, PageId(1), 41).await;
        let (journal, at) = find_in_journal(&cluster, &payload(41)).await;
        flip(&journal, at + 100);
        read_from_node(&volume, segment, &model).await;
        wait_repaired(&cluster, 2.0).await;
        let served = read_from_node(&volume, segment, &model).await;
        assert_eq!(served, model.len(), "node1 serves every page once repaired");
        cluster.stop().unwrap();
    });
    cleanup(&dir);
}
