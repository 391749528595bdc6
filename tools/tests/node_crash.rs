//! Crash tests of the storage node: kill -9 in the middle of a stream of appends, and a torn
//! or garbled last block group. What survived is read back with the same code as
//! `sixfold inspect journal`.

mod common;

use std::collections::BTreeSet;
use std::os::unix::fs::FileExt;
use std::sync::{Arc, Mutex};

use common::*;
use tools::procs::NodeProcess;
use wire::Lsn;

/// Goal: a kill -9 at an arbitrary moment of a stream loses no acknowledged LSN, and the node
/// serves again after restart with an SCL covering everything acknowledged.
/// Method: 32 writers append one chain (each record's backlink is the previous LSN); once a
/// few hundred acks have arrived — with requests still in flight — SIGKILL the node, restart it,
/// and compare the acknowledged LSNs with the journal's durable records. Once per durability
/// mode and per place the persister runs.
#[test]
fn kill9_mid_stream_loses_nothing_acknowledged_rwf_dsync_inline() {
    kill9_mid_stream(SyncMode::RwfDsync, PersisterMode::Inline);
}

#[test]
fn kill9_mid_stream_loses_nothing_acknowledged_fdatasync_thread() {
    kill9_mid_stream(SyncMode::Fdatasync, PersisterMode::Thread);
}

#[test]
fn kill9_mid_stream_loses_nothing_acknowledged_fdatasync_std_fs() {
    kill9_mid_stream(SyncMode::Fdatasync, PersisterMode::StdFs);
}

fn kill9_mid_stream(sync: SyncMode, persister: PersisterMode) {
    let dir = test_dir(&format!("kill9-{}-{}", sync.as_str(), persister.as_str()));
    let certs = certs(&dir);
    let (mut node, spec) = start_node_with(&dir, &certs, sync, persister);
    let acked: Arc<Mutex<BTreeSet<u64>>> = Arc::default();
    let sent_max = runtime().block_on(async {
        let client = Arc::new(connect(&certs, &node).await);
        let next = Arc::new(std::sync::atomic::AtomicU64::new(1));
        let mut tasks = Vec::new();
        for _ in 0..32 {
            let (client, next, acked) = (client.clone(), next.clone(), acked.clone());
            tasks.push(tokio::spawn(async move {
                loop {
                    let lsn = next.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                    let batch = append(1, vec![write(lsn, lsn - 1, lsn % 7, 512)]);
                    match client.append(batch).await {
                        Ok(Ok(_)) => {
                            acked.lock().unwrap().insert(lsn);
                        }
                        _ => return, // The node died under us.
                    }
                }
            }));
        }
        while acked.lock().unwrap().len() < 300 {
            tokio::time::sleep(std::time::Duration::from_millis(2)).await;
        }
        node.kill9();
        client.close(); // Fail the requests still waiting instead of waiting for a timeout.
        for task in tasks {
            task.await.unwrap();
        }
        next.load(std::sync::atomic::Ordering::Relaxed)
    });
    let acked = acked.lock().unwrap().clone();
    assert!(acked.len() >= 300);
    assert!(
        sent_max > *acked.last().unwrap(),
        "appends were still in flight at the kill"
    );
    let durable: BTreeSet<u64> = durable_lsns(&spec.data_dir).into_iter().collect();
    let lost: Vec<_> = acked.difference(&durable).collect();
    assert!(lost.is_empty(), "acknowledged but not durable: {lost:?}");

    // The node recovers and serves; its SCL covers every acknowledged LSN.
    let node = NodeProcess::start(&node.config).unwrap();
    runtime().block_on(async {
        let client = connect(&certs, &node).await;
        let ack = client
            .append(append(1, vec![write(1, 0, 0, 1)]))
            .await
            .unwrap()
            .unwrap();
        assert!(ack.scl >= Lsn(*acked.last().unwrap()), "scl {:?}", ack.scl);
    });
    drop(node);
    cleanup(&dir);
}

/// Where the last durable group starts and how long it is.
fn last_group(data_dir: &std::path::Path) -> (std::path::PathBuf, u64, u64) {
    let journal = node::journal::JournalFiles::open_existing(&data_dir.join("journal")).unwrap();
    let scan = journal.scan(Default::default()).unwrap();
    let last = scan.groups.last().unwrap().position;
    let end = scan.end;
    assert_eq!(last.file, end.file);
    let path = node::journal::file_path(&data_dir.join("journal"), last.file);
    (path, last.offset, end.offset - last.offset)
}

/// Goal: a garbled or truncated last block group is discarded, exactly that group, and the
/// node starts and keeps everything before it.
/// Method: write three groups (the last spans two 4 KiB blocks), stop the node, damage the
/// last group on disk (flip one payload byte; or zero its second block, as a torn write
/// would), restart, and compare durable records and the acked SCL.
#[test]
fn garbled_or_truncated_last_group_is_discarded() {
    for damage in ["garble", "truncate"] {
        let dir = test_dir(&format!("torn-{damage}"));
        let certs = certs(&dir);
        let (mut node, spec) = start_node(&dir, &certs);
        runtime().block_on(async {
            let client = connect(&certs, &node).await;
            for (lsn, bytes) in [(1, 100), (2, 100), (3, 6000)] {
                client
                    .append(append(1, vec![write(lsn, lsn - 1, 1, bytes)]))
                    .await
                    .unwrap()
                    .unwrap();
            }
        });
        assert!(node.terminate().unwrap().success());
        assert_eq!(durable_lsns(&spec.data_dir), vec![1, 2, 3]);
        let (path, offset, len) = last_group(&spec.data_dir);
        assert_eq!(len, 8192, "the last group spans two blocks");
        let file = std::fs::OpenOptions::new()
            .write(true)
            .read(true)
            .open(&path)
            .unwrap();
        if damage == "garble" {
            let mut byte = [0u8; 1];
            file.read_exact_at(&mut byte, offset + 5000).unwrap();
            file.write_all_at(&[byte[0] ^ 0x40], offset + 5000).unwrap();
        } else {
            file.write_all_at(&[0u8; 4096], offset + 4096).unwrap();
        }
        file.sync_all().unwrap();
        drop(file);

        let node = NodeProcess::start(&node.config).unwrap();
        assert_eq!(
            durable_lsns(&spec.data_dir),
            vec![1, 2],
            "{damage}: exactly the last group goes"
        );
        runtime().block_on(async {
            let client = connect(&certs, &node).await;
            // The node serves again; its SCL is 2 until 3 is sent again.
            let ack = client
                .append(append(1, vec![write(1, 0, 1, 100)]))
                .await
                .unwrap()
                .unwrap();
            assert_eq!(ack.scl, Lsn(2), "{damage}");
            let ack = client
                .append(append(1, vec![write(3, 2, 1, 6000)]))
                .await
                .unwrap()
                .unwrap();
            assert_eq!(ack.scl, Lsn(3), "{damage}");
        });
        assert_eq!(durable_lsns(&spec.data_dir), vec![1, 2, 1, 3]);
        drop(node);
        cleanup(&dir);
    }
}
