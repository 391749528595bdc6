//! The engine against six real node processes on loopback (three AZs, real io_uring, QUIC and
//! mTLS): quorum writes through node loss, commits never reported early, reads at VDL equal
//! to a model of the committed MTRs, refused and hedged reads.

mod common;

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use common::{cleanup, runtime, test_dir};
use engine::quorum::MtrRecord;
use engine::{VolumeClient, VolumeConfig};
use tools::cluster::{ClusterOptions, LocalCluster};
use wire::{Lsn, PageId, RedoOp};

/// Committed page contents, applied in commit order (each worker owns its pages, so commit
/// order is LSN order per page).
type Model = Arc<Mutex<HashMap<PageId, Vec<u8>>>>;

const WORKERS: u64 = 4;
const PAGE_SIZE: usize = 8192;

fn worker_page(worker: u64, i: u64) -> PageId {
    // Spread over both PGs of the default cluster (1024 pages each).
    PageId((worker + WORKERS * (i % 64)) * 7 % 2048)
}

struct Workload {
    volume: Arc<VolumeClient>,
    stop: Arc<AtomicBool>,
    commits: Arc<AtomicU64>,
    model: Model,
    tasks: Vec<tokio::task::JoinHandle<Vec<Lsn>>>,
}

/// Workers that write two-record MTRs to their own pages and commit each one.
fn start_workload(volume: &Arc<VolumeClient>) -> Workload {
    let stop = Arc::new(AtomicBool::new(false));
    let commits = Arc::new(AtomicU64::new(0));
    let model: Model = Arc::default();
    let tasks = (0..WORKERS)
        .map(|w| {
            let (volume, stop, commits, model) =
                (volume.clone(), stop.clone(), commits.clone(), model.clone());
            tokio::spawn(async move {
                let mut cpls = Vec::new();
                let mut i = 0u64;
                while !stop.load(Ordering::Acquire) {
                    i += 1;
                    let writes: Vec<(PageId, u32, Vec<u8>)> = (0..2u64)
                        .map(|k| {
                            let offset = ((i * 131 + k * 977) % 8000) as u32;
                            let bytes = format!("w{w} i{i} k{k}").into_bytes();
                            (worker_page(w, i * 2 + k), offset, bytes)
                        })
                        .collect();
                    let records = writes
                        .iter()
                        .map(|(page, offset, bytes)| MtrRecord {
                            page: *page,
                            op: RedoOp::Write {
                                offset: *offset,
                                bytes: bytes.clone(),
                            },
                        })
                        .collect();
                    let cpl = volume.write_mtr(records).await.unwrap();
                    volume.commit(cpl).await.unwrap();
                    assert!(
                        volume.vdl() >= cpl,
                        "a commit was reported before VDL passed it"
                    );
                    let mut model = model.lock().unwrap();
                    for (page, offset, bytes) in writes {
                        let image = model.entry(page).or_insert_with(|| vec![0; PAGE_SIZE]);
                        image[offset as usize..offset as usize + bytes.len()]
                            .copy_from_slice(&bytes);
                    }
                    cpls.push(cpl);
                    commits.fetch_add(1, Ordering::Release);
                }
                cpls
            })
        })
        .collect();
    Workload {
        volume: volume.clone(),
        stop,
        commits,
        model,
        tasks,
    }
}

impl Workload {
    async fn wait_for_commits(&self, count: u64, what: &str) {
        let deadline = tokio::time::Instant::now() + Duration::from_secs(60);
        while self.commits.load(Ordering::Acquire) < count {
            assert!(
                tokio::time::Instant::now() < deadline,
                "{what}: commits stopped at {}; writer: {}",
                self.commits.load(Ordering::Acquire),
                self.volume.debug_state()
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    async fn finish(self) -> (Vec<Lsn>, HashMap<PageId, Vec<u8>>) {
        self.stop.store(true, Ordering::Release);
        let mut cpls = Vec::new();
        for task in self.tasks {
            cpls.extend(task.await.unwrap());
        }
        let model = self.model.lock().unwrap().clone();
        (cpls, model)
    }
}

/// Waits (60 s at most) until, in every PG, every segment's SCL equals the highest one.
async fn wait_all_caught_up(volume: &VolumeClient) {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(60);
    loop {
        let pgs = volume.file().pgs.len() as u32;
        let caught_up = (0..pgs).all(|pg| {
            let scls: Vec<Lsn> = (0..6)
                .map(|s| volume.segment_scl(wire::PgId(pg), wire::SegmentIndex(s)))
                .collect();
            scls.iter().all(|s| s == scls.iter().max().unwrap())
        });
        if caught_up {
            return;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "segments never caught up: {}",
            volume.debug_state()
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// Reads every modelled page from storage at the final VDL and compares.
async fn check_reads_against_model(volume: &VolumeClient, model: &HashMap<PageId, Vec<u8>>) {
    let vdl = volume.vdl();
    for (page, expected) in model {
        let image = volume.read_page_from(*page, vdl, None).await.unwrap();
        assert!(image.lsn <= vdl);
        assert!(
            image.bytes == *expected,
            "page {} differs from the model at VDL {vdl}",
            page.0
        );
        // The same through the buffer cache: a miss that fills it, then a hit.
        for _ in 0..2 {
            let cached = volume.read_page(*page).await.unwrap();
            assert!(cached.bytes == *expected, "cached page {} differs", page.0);
        }
    }
}

/// Runs `body` against six fresh nodes and an engine attached with `config`, then stops the
/// nodes and removes the test directory.
fn cluster_test(
    name: &str,
    config: VolumeConfig,
    body: impl AsyncFnOnce(&mut LocalCluster, Arc<VolumeClient>),
) {
    let dir = test_dir(name);
    runtime().block_on(async {
        let mut cluster = LocalCluster::start(&dir, &ClusterOptions::default())
            .await
            .unwrap();
        let volume = Arc::new(cluster.attach(config).await.unwrap());
        body(&mut cluster, volume).await;
        cluster.stop().unwrap();
    });
    cleanup(&dir);
}

/// Goal: losing an AZ (2 nodes) keeps commits going; losing a third node stalls them without
/// losing anything acknowledged; they resume when that node returns; reads at the final VDL
/// equal the model of every committed MTR.
/// Method: four workers commit two-record MTRs while nodes are killed with SIGKILL and one
/// is restarted; commit counts and VDL are watched between the steps.
#[test]
fn az_loss_keeps_commits_and_a_third_loss_stalls_them_until_it_returns() {
    cluster_test(
        "cluster-quorum",
        VolumeConfig::default(),
        async |cluster, volume| {
            let workload = start_workload(&volume);
            workload.wait_for_commits(50, "all nodes up").await;

            cluster.kill9(0);
            cluster.kill9(1);
            let after_az = workload.commits.load(Ordering::Acquire);
            workload
                .wait_for_commits(after_az + 50, "one AZ down")
                .await;

            cluster.kill9(2);
            tokio::time::sleep(Duration::from_secs(1)).await; // Let acks already sent arrive.
            let (stalled_commits, stalled_vdl) =
                (workload.commits.load(Ordering::Acquire), volume.vdl());
            tokio::time::sleep(Duration::from_millis(1500)).await;
            assert_eq!(
                workload.commits.load(Ordering::Acquire),
                stalled_commits,
                "3 of 6 cannot commit"
            );
            assert_eq!(
                volume.vdl(),
                stalled_vdl,
                "VDL cannot move with 3 of 6 segments"
            );

            cluster.restart(2).unwrap();
            workload
                .wait_for_commits(stalled_commits + 50, "third node back")
                .await;
            let (cpls, model) = workload.finish().await;
            let vdl = volume.vdl();
            assert!(cpls.iter().all(|cpl| *cpl <= vdl));
            check_reads_against_model(&volume, &model).await;
        },
    );
}

/// Goal: a commit is never reported before a write quorum acknowledged it, even when the
/// fourth ack is slow; and a read aimed first at a slow segment is hedged to another.
/// Method: put a UDP proxy that delays replies by 300 ms in front of three of the six nodes
/// (node1..node3), so every write quorum needs at least one slow ack; each commit must then take at
/// least 300 ms and, when reported, four segments must have acked its LSN. Then read a page
/// from a delayed segment first, with a 50 ms hedge delay.
#[test]
fn delayed_acks_never_let_a_commit_be_reported_early_and_reads_hedge() {
    let dir = test_dir("cluster-delay");
    let delay = Duration::from_millis(300);
    runtime().block_on(async {
        let mut cluster = LocalCluster::start(&dir, &ClusterOptions::default())
            .await
            .unwrap();
        let mut file = cluster.volume.clone();
        let mut proxies = Vec::new();
        for node in file.nodes.iter_mut().take(3) {
            let proxy = tools::netfault::UdpDelayProxy::start(node.address, delay)
                .await
                .unwrap();
            node.address = proxy.addr;
            proxies.push(proxy);
        }
        let config = VolumeConfig {
            hedge_delay: Duration::from_millis(50),
            ..VolumeConfig::default()
        };
        let volume = VolumeClient::open(file, cluster.endpoint().unwrap(), config)
            .await
            .unwrap();
        let page = PageId(5);
        for i in 0..8u32 {
            let start = tokio::time::Instant::now();
            let op = RedoOp::Write {
                offset: i * 4,
                bytes: i.to_le_bytes().to_vec(),
            };
            let cpl = volume
                .write_mtr(vec![MtrRecord { page, op }])
                .await
                .unwrap();
            volume.commit(cpl).await.unwrap();
            assert!(
                start.elapsed() >= delay,
                "commit {i} reported before a slow node acked"
            );
            let pg = volume.file().pg_of(page).unwrap();
            let acked = (0..6u32)
                .filter(|s| volume.segment_scl(pg, wire::SegmentIndex(*s)) >= cpl)
                .count();
            assert!(acked >= 4, "commit {i} reported with {acked} acks");
        }
        // Segment order of pg 0 follows placement; aim at the delayed nodes' segments first.
        let placement = volume.file().placement();
        let pg = volume.file().pg_of(page).unwrap();
        let slow: Vec<_> = (0..6u32)
            .filter(|s| placement[pg.0 as usize][*s as usize] < 3)
            .collect();
        let fast: Vec<_> = (0..6u32)
            .filter(|s| placement[pg.0 as usize][*s as usize] >= 3)
            .collect();
        let order = vec![wire::SegmentIndex(slow[0]), wire::SegmentIndex(fast[0])];
        // The slow segments' SCLs may lag the engine's view by a delayed ack; read at VDL.
        let image = volume
            .read_page_from(page, volume.vdl(), Some(order))
            .await
            .unwrap();
        let hedged = volume.stats().reads_hedged.load(Ordering::Relaxed);
        assert!(hedged >= 1, "a read to a slow segment is hedged");
        let mut expected = vec![0u8; PAGE_SIZE];
        for i in 0..8u32 {
            expected[i as usize * 4..i as usize * 4 + 4].copy_from_slice(&i.to_le_bytes());
        }
        assert!(image.bytes == expected);
        drop(volume);
        drop(proxies);
        cluster.stop().unwrap();
    });
    cleanup(&dir);
}

/// Goal: a segment that missed records refuses a read above its SCL, and the engine's read
/// still succeeds on another segment.
/// Method: with a small budget of retained records (past it the writer lets go of what a write
/// quorum holds, so it cannot catch a node up), wait until every segment holds everything,
/// kill one node, commit more MTRs on its PG than the budget holds, restart it (it now has a
/// gap only gossip could fill, and node1 comes back with gossip turned off), ask it directly
/// for a page at the final VDL, then read through the engine aiming at it first.
#[test]
fn a_lagging_segment_refuses_and_the_engine_reads_elsewhere() {
    cluster_test(
        "cluster-refuse",
        VolumeConfig {
            retained_bytes_max: 4096,
            ..VolumeConfig::default()
        },
        async |cluster, volume| {
            let workload = start_workload(&volume);
            workload.wait_for_commits(30, "all up").await;
            wait_all_caught_up(&volume).await;
            cluster.kill9(0);
            let before = workload.commits.load(Ordering::Acquire);
            workload.wait_for_commits(before + 60, "node1 down").await;
            let (_, model) = workload.finish().await;
            // Gossip would fill the gap within a second: node1 comes back without it.
            let config = cluster.config_path(0);
            let text = std::fs::read_to_string(&config).unwrap();
            std::fs::write(&config, format!("{text}\n[gossip]\nenabled = false\n")).unwrap();
            cluster.restart(0).unwrap();
            tokio::time::sleep(Duration::from_millis(500)).await; // Let catch-up run: it cannot close the gap.

            let vdl = volume.vdl();
            let (page, expected) = model.iter().next().map(|(p, b)| (*p, b.clone())).unwrap();
            let pg = volume.file().pg_of(page).unwrap();
            let lagging = (0..6u32)
                .map(wire::SegmentIndex)
                .find(|s| volume.file().placement()[pg.0 as usize][s.0 as usize] == 0)
                .unwrap();
            assert!(
                volume.segment_scl(pg, lagging) < vdl,
                "node1's segment lags"
            );

            // Directly: the node refuses, naming its SCL.
            let endpoint = cluster.endpoint().unwrap();
            let node = &volume.file().nodes[0];
            let (client, _) = engine::NodeClient::connect(&endpoint, node.address, &node.name)
                .await
                .unwrap();
            let request = wire::ReadPage {
                volume: volume.file().id(),
                epoch: volume.epoch(),
                pg,
                segment: lagging,
                page,
                read_point: vdl,
            };
            match client
                .request(wire::Message::ReadPage(request))
                .await
                .unwrap()
            {
                wire::Message::Error(e) => {
                    assert_eq!(e.code, wire::ErrorCode::SclBelowReadPoint, "{}", e.message)
                }
                other => panic!("a lagging segment must refuse, got {other:?}"),
            }
            // Through the engine, aimed at the lagging segment first: served elsewhere.
            let others: Vec<_> = (0..6u32)
                .map(wire::SegmentIndex)
                .filter(|s| *s != lagging)
                .collect();
            let order = std::iter::once(lagging).chain(others).collect();
            let image = volume.read_page_from(page, vdl, Some(order)).await.unwrap();
            assert!(image.bytes == expected);
            check_reads_against_model(&volume, &model).await;
        },
    );
}

/// Goal: with a tiny LAL, writers wait for VDL instead of failing, and everything commits;
/// the same with a tiny budget of retained (not yet complete) record bytes.
/// Method: four workers of two-record MTRs under LAL = 3 records, then under 1 retained byte
/// (each MTR waits for the previous ones to complete); compare reads to the model each time.
#[test]
fn lal_back_pressure_waits_and_everything_commits() {
    for (lal, retained_bytes_max) in [(3, 256 << 20), (1000, 1)] {
        lal_back_pressure(lal, retained_bytes_max);
    }
}

fn lal_back_pressure(lal: u64, retained_bytes_max: usize) {
    cluster_test(
        &format!("cluster-lal-{lal}-{retained_bytes_max}"),
        VolumeConfig {
            lal,
            retained_bytes_max,
            ..VolumeConfig::default()
        },
        async |_cluster, volume| {
            let workload = start_workload(&volume);
            workload.wait_for_commits(40, "back-pressure").await;
            let (cpls, model) = workload.finish().await;
            let mut sorted = cpls.clone();
            sorted.sort_unstable();
            sorted.dedup();
            assert_eq!(sorted.len(), cpls.len(), "every MTR got its own CPL");
            check_reads_against_model(&volume, &model).await;
            // The nodes have been told each PG's minimum read point along the way.
            tokio::time::sleep(Duration::from_millis(600)).await;
            let pgmrpl_sent = volume.stats().pgmrpl_sent.load(Ordering::Relaxed);
            assert!(
                pgmrpl_sent >= 12,
                "PGMRPL goes to 6 nodes × 2 PGs: {pgmrpl_sent}"
            );
        },
    );
}

/// Goal: once the nodes have seen a newer epoch, this writer is fenced: its next commit fails
/// with `Fenced` instead of hanging, so does every write after it, and its reads are refused.
/// Method: commit an MTR, then fence every node with a newer epoch (as a new writer's
/// recovery would), then try to commit again.
#[test]
fn a_newer_epoch_fences_the_writer() {
    cluster_test(
        "cluster-fence",
        VolumeConfig::default(),
        async |cluster, volume| {
            let page = PageId(9);
            let write = |text: &str| {
                vec![MtrRecord {
                    page,
                    op: RedoOp::Write {
                        offset: 0,
                        bytes: text.as_bytes().to_vec(),
                    },
                }]
            };
            let cpl = volume.write_mtr(write("epoch one")).await.unwrap();
            volume.commit(cpl).await.unwrap();

            // A second writer's recovery fences every node with a newer epoch.
            let endpoint = cluster.endpoint().unwrap();
            let newer = volume.epoch().next(7);
            for node in &volume.file().nodes {
                let (client, _) = engine::NodeClient::connect(&endpoint, node.address, &node.name)
                    .await
                    .unwrap();
                let fence = wire::Fence {
                    volume: volume.file().id(),
                    epoch_current: volume.epoch(),
                    epoch_new: newer,
                };
                let reply = client.request(wire::Message::Fence(fence)).await.unwrap();
                assert!(matches!(reply, wire::Message::VolumeState(_)), "{reply:?}");
            }

            let cpl = volume.write_mtr(write("epoch one, late")).await.unwrap();
            let error = volume.commit(cpl).await.unwrap_err();
            assert!(error.is_fenced(), "{error}");
            assert!(error.to_string().contains("epoch"), "{error}");
            let error = volume.write_mtr(write("again")).await.unwrap_err();
            assert!(error.is_fenced(), "{error}");

            let vdl = volume.vdl();
            let image = volume.read_page_from(page, vdl, None).await;
            // Reads at epoch 1 are refused too now; a new writer reads at its own epoch.
            assert!(image.is_err(), "stale-epoch reads are refused");
        },
    );
}

/// Goal: a volume file that does not match the nodes gets an error naming the node and the
/// PG — never a hang, never a writer that writes — and a writer the nodes already moved past
/// (a stale epoch) gets one clear error and writes nothing.
/// Method: open the volume with (1) a file whose volume id no node hosts, (2) a file that swaps
/// two nodes of one AZ in PG 0's placement; then open a real writer, take the volume over
/// with a second one, and ask the first to write.
#[test]
fn a_volume_file_that_does_not_match_the_nodes_is_refused_by_name() {
    let dir = test_dir("cluster-mismatch");
    runtime().block_on(async {
        let mut cluster = LocalCluster::start(&dir, &ClusterOptions::default())
            .await
            .unwrap();
        let config = VolumeConfig {
            open_timeout: Duration::from_secs(30),
            ..VolumeConfig::default()
        };
        let mut wrong_id = cluster.volume.clone();
        wrong_id.volume = 77;
        let error = VolumeClient::open(wrong_id, cluster.endpoint().unwrap(), config.clone())
            .await
            .err()
            .expect("a volume no node hosts cannot be opened");
        let message = format!("{error:#}");
        assert!(
            message.contains("node") && message.contains("77"),
            "{message}"
        );

        let mut swapped = cluster.volume.clone();
        let pg0 = swapped.pgs.iter_mut().find(|p| p.id == 0).unwrap();
        pg0.segments.swap(0, 1); // Same AZ: the placement rules still hold.
        let (first, second) = (pg0.segments[0].clone(), pg0.segments[1].clone());
        let error = VolumeClient::open(swapped, cluster.endpoint().unwrap(), config.clone())
            .await
            .err()
            .expect("a misplaced segment is refused");
        let message = format!("{error:#}");
        assert!(message.contains("pg 0"), "{message}");
        assert!(
            message.contains(&first) || message.contains(&second),
            "{message}"
        );

        let old = cluster.attach(config.clone()).await.unwrap();
        let new = cluster.attach(config).await.unwrap();
        assert!(new.epoch() > old.epoch());
        let write = vec![MtrRecord {
            page: PageId(3),
            op: RedoOp::Write {
                offset: 0,
                bytes: b"stale".to_vec(),
            },
        }];
        let outcome = match old.write_mtr(write).await {
            Ok(cpl) => old.commit(cpl).await,
            Err(e) => Err(e),
        };
        let error = outcome.expect_err("a stale writer commits nothing");
        assert!(error.is_fenced(), "{error}");
        assert!(error.to_string().contains("taken over"), "{error}");
        let image = new.read_page(PageId(3)).await.unwrap();
        assert!(
            image.bytes.iter().all(|b| *b == 0),
            "the stale write is nowhere"
        );
        drop((old, new));
        cluster.stop().unwrap();
    });
    cleanup(&dir);
}
