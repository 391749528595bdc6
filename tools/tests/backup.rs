//! Continuous backup against six real node processes and a real S3 server (s3s-fs in this
//! process, SigV4 enforced, over HTTP on loopback): the PGs' owners seal every committed
//! record into log objects that decode, link and hold exactly what was written; when an
//! owner's node is killed, another segment takes over and nothing is lost.

mod common;

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use common::{cleanup, runtime, test_dir};
use engine::quorum::MtrRecord;
use engine::{NodeClient, VolumeClient, VolumeConfig};
use node::backup::store::BackupStore;
use node::config::BackupSettings;
use tools::cluster::{ClusterOptions, LocalCluster};
use tools::s3server::S3Server;
use wire::backup::{LogObject, log_prefix, parse_log_name};
use wire::{LogRecord, Lsn, Message, PageId, PgId, RedoOp};

const PG_COUNT: u32 = 2;
const PAGES_PER_PG: u64 = 1024;

fn settings(server: &S3Server) -> BackupSettings {
    BackupSettings {
        url: Some(format!("s3://{}/backups", server.bucket())),
        endpoint: Some(server.endpoint()),
        allow_http: true,
        access_key_id: Some(server.access_key().into()),
        secret_access_key: Some(server.secret_key().into()),
        log_interval_ms: 100,
        request_timeout_ms: 10_000,
        ..BackupSettings::default()
    }
}

/// Commits `count` one-record MTRs alternating over both PGs; returns the records' contents
/// by LSN.
async fn write(volume: &VolumeClient, first: u64, count: u64) -> BTreeMap<Lsn, (PageId, Vec<u8>)> {
    let mut written = BTreeMap::new();
    for i in first..first + count {
        let page = PageId((i % u64::from(PG_COUNT)) * PAGES_PER_PG + i % 7);
        let bytes = format!("record {i}").into_bytes();
        let op = RedoOp::Write {
            offset: 16,
            bytes: bytes.clone(),
        };
        let cpl = volume
            .write_mtr(vec![MtrRecord { page, op }])
            .await
            .unwrap();
        tokio::time::timeout(Duration::from_secs(30), volume.commit(cpl))
            .await
            .expect("commit within 30 s")
            .unwrap();
        written.insert(cpl, (page, bytes));
    }
    written
}

/// The highest backed-up LSN of each PG any node states, by GetVolumeState.
async fn backed_up(cluster: &LocalCluster, skip: Option<usize>) -> Vec<Lsn> {
    let endpoint = cluster.endpoint().unwrap();
    let mut best = vec![Lsn::ZERO; PG_COUNT as usize];
    for (i, node) in cluster.volume.nodes.iter().enumerate() {
        if Some(i) == skip {
            continue;
        }
        let Ok((client, _)) = NodeClient::connect(&endpoint, node.address, &node.name).await else {
            continue;
        };
        let reply = client
            .request(Message::GetVolumeState(cluster.volume.id()))
            .await;
        if let Ok(Message::VolumeState(state)) = reply {
            for s in state.segments {
                let b = &mut best[s.pg.0 as usize];
                *b = (*b).max(s.backed_up);
            }
        }
    }
    best
}

/// Waits (at most 60 s) until every PG is backed up through its last record at or below
/// `vdl`.
async fn wait_backed_up(cluster: &LocalCluster, through: &[Lsn], skip: Option<usize>) {
    let began = Instant::now();
    loop {
        let now = backed_up(cluster, skip).await;
        if now.iter().zip(through).all(|(b, t)| b >= t) {
            return;
        }
        assert!(
            began.elapsed() < Duration::from_secs(60),
            "backup stuck at {now:?}, wanted {through:?}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// The last LSN written to each PG.
fn last_per_pg(written: &BTreeMap<Lsn, (PageId, Vec<u8>)>) -> Vec<Lsn> {
    let mut last = vec![Lsn::ZERO; PG_COUNT as usize];
    for (lsn, (page, _)) in written {
        last[(page.0 / PAGES_PER_PG) as usize] = *lsn;
    }
    last
}

/// Every record in the store's log objects of each PG, by LSN (overlapping copies must agree).
async fn backed_up_records(
    store: &BackupStore,
    cluster: &LocalCluster,
) -> BTreeMap<Lsn, LogRecord> {
    let volume = cluster.volume.id();
    let mut all = BTreeMap::new();
    for pg in 0..PG_COUNT {
        let prefix = log_prefix(volume, PgId(pg));
        let listed = store.list(prefix.trim_end_matches('/')).await.unwrap();
        assert!(!listed.is_empty(), "pg {pg} has log objects");
        for (name, _) in listed {
            let leaf = name.strip_prefix(&prefix).unwrap();
            let (after, through) = parse_log_name(leaf).unwrap();
            let object = LogObject::decode(&store.get(&name).await.unwrap()).unwrap();
            assert_eq!((object.after, object.through), (after, through));
            assert_eq!(object.pg, PgId(pg));
            for record in object.records {
                if let Some(seen) = all.insert(record.lsn, record.clone()) {
                    assert_eq!(seen, record, "two copies of {} differ", record.lsn);
                }
            }
        }
    }
    all
}

fn check(backed: &BTreeMap<Lsn, LogRecord>, written: &BTreeMap<Lsn, (PageId, Vec<u8>)>) {
    for (lsn, (page, bytes)) in written {
        let record = backed
            .get(lsn)
            .unwrap_or_else(|| panic!("record {lsn} was committed but is not backed up"));
        assert_eq!(record.page, *page);
        assert_eq!(
            record.op,
            RedoOp::Write {
                offset: 16,
                bytes: bytes.clone()
            }
        );
    }
}

/// Goal: every committed record reaches the object store once its PG's owner seals it, in log
/// objects that decode and link; the owner's node killed, another segment takes over from
/// where the store says the log ends, and nothing committed is missing.
/// Method: six nodes, two PGs, backup every 100 ms to s3s-fs; 200 commits; wait for every
/// node's word that each PG is backed up through its last record; kill the node holding
/// segment 0 of PG 0; 200 more commits; wait again (without the killed node); read all log
/// objects back and compare with what was written.
#[test]
fn committed_records_are_backed_up_and_an_owner_killed_is_taken_over() {
    let dir = test_dir("backup");
    let server = S3Server::start(&dir.join("s3")).unwrap();
    let options = ClusterOptions {
        pg_count: PG_COUNT,
        backup: settings(&server),
        ..ClusterOptions::default()
    };
    runtime().block_on(async {
        let mut cluster = LocalCluster::start(&dir.join("cluster"), &options)
            .await
            .unwrap();
        let volume = cluster.attach(VolumeConfig::default()).await.unwrap();
        let mut written = write(&volume, 0, 200).await;
        wait_backed_up(&cluster, &last_per_pg(&written), None).await;
        let owner = cluster.volume.placement()[0][0];
        cluster.kill9(owner);
        written.extend(write(&volume, 200, 200).await);
        wait_backed_up(&cluster, &last_per_pg(&written), Some(owner)).await;
        let store = BackupStore::from_settings(&settings(&server))
            .unwrap()
            .unwrap();
        let backed = backed_up_records(&store, &cluster).await;
        check(&backed, &written);
        drop(volume);
        cluster.stop().unwrap();
    });
    drop(server);
    cleanup(&dir);
}
