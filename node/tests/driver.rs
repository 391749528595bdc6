//! The driver with I/O that fails: a journal whose writes fail after a while, a manifest store
//! that fails. In process, no QUIC: frames go in through a stream handle, replies come out.

use std::future::Future;
use std::sync::Arc;
use std::time::Instant;

use bytes::Bytes;
use node::core::{CoreConfig, NodeCore, PersistGroup};
use node::driver::{Driver, DriverHandle, Stream};
use node::io::{GroupOutcome, JournalIo, ManifestStore, RecordReader, SystemClock};
use node::journal::Position;
use node::journal::format::GROUP_BYTES_MAX;
use node::manifest::{Manifest, SegmentKey};
use node::segment::RecordLocation;
use tokio::sync::mpsc::UnboundedReceiver;
use wire::{
    Append, Epoch, ErrorCode, Fence, Frame, LogRecord, Lsn, Message, PageId, PgId, RedoOp, Role,
    SegmentIndex, VolumeId,
};

/// Writes succeed `ok_max` times, then fail with EIO.
struct FailingJournal {
    ok_max: usize,
    submitted: usize,
    done: Vec<GroupOutcome>,
}

impl JournalIo for FailingJournal {
    fn submit(&mut self, group: PersistGroup) -> std::io::Result<()> {
        self.submitted += 1;
        let result = if self.submitted > self.ok_max {
            Err(std::io::Error::from_raw_os_error(libc::EIO))
        } else {
            Ok(())
        };
        self.done.push(GroupOutcome {
            group: group.id,
            result,
        });
        Ok(())
    }

    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }

    fn reap(&mut self, out: &mut Vec<GroupOutcome>) {
        out.append(&mut self.done);
    }

    fn ready(&mut self) -> impl Future<Output = ()> + Send {
        let ready = !self.done.is_empty();
        async move {
            if !ready {
                std::future::pending::<()>().await;
            }
        }
    }
}

/// Stores succeed unless `fail` is set.
struct Manifests {
    fail: bool,
}

impl ManifestStore for Manifests {
    fn store(&self, _: &Manifest) -> std::io::Result<()> {
        if self.fail {
            return Err(std::io::Error::from_raw_os_error(libc::ENOSPC));
        }
        Ok(())
    }
}

struct NoReads;

impl RecordReader for NoReads {
    fn read(&self, _: &[RecordLocation]) -> Result<Vec<LogRecord>, String> {
        Err("no journal here".into())
    }
}

/// A driver over a recovered core hosting segment 0 of volume 1 at epoch 0, running.
fn start(
    journal: FailingJournal,
    manifests: Manifests,
) -> (DriverHandle, tokio::task::JoinHandle<Result<(), String>>) {
    let (driver, handle) = driver(journal, manifests);
    (handle, tokio::spawn(driver.run()))
}

/// A driver over a recovered core hosting segment 0 of volume 1 at epoch 0.
fn driver<J: JournalIo>(journal: J, manifests: Manifests) -> (Driver<J>, DriverHandle) {
    let manifest = Manifest {
        segments: vec![SegmentKey {
            volume: VolumeId(1),
            pg: PgId(0),
            segment: SegmentIndex(0),
        }],
        ..Manifest::default()
    };
    let config = CoreConfig {
        name: "node1".into(),
        inflight_groups_max: 4,
        journal_file_bytes: GROUP_BYTES_MAX as u64,
        journal_file_count: 4,
    };
    let mut core = NodeCore::new(config, manifest);
    core.finish_recovery(Position::default(), 1);
    assert!(core.oldest_waiting(Instant::now()).is_none());
    let io = node::driver::DriverIo {
        objects: None,
        manifests: Arc::new(manifests),
        reader: Arc::new(NoReads),
        pages: Arc::new(node::pagestore::MemPageStore::default()),
    };
    Driver::new(core, journal, io, Arc::new(SystemClock))
}

fn append(lsn: u64) -> Message {
    Message::Append(Append {
        volume: VolumeId(1),
        epoch: Epoch(0),
        pg: PgId(0),
        segment: SegmentIndex(0),
        vdl: Lsn::ZERO,
        records: vec![LogRecord {
            lsn: Lsn(lsn),
            backlink: Lsn(lsn - 1),
            page: PageId(1),
            cpl: true,
            op: RedoOp::Init,
        }],
    })
}

async fn request(stream: &Stream, id: u64, message: Message) {
    let frame = Frame {
        request_id: id,
        message,
    };
    let slot = stream.reserve().await;
    stream.send(slot, Bytes::from(frame.to_bytes()).slice(4..));
}

async fn reply(replies: &mut UnboundedReceiver<Vec<u8>>) -> Frame {
    Frame::decode(&replies.recv().await.expect("a reply")).expect("a well-formed reply")
}

fn shutting_down(frame: &Frame, reason: &str) {
    match &frame.message {
        Message::Error(e) => {
            assert_eq!(e.code, ErrorCode::ShuttingDown, "{}", e.message);
            assert!(
                e.message.contains(reason),
                "names the reason: {}",
                e.message
            );
        }
        other => panic!("expected ShuttingDown, got {other:?}"),
    }
}

/// Goal: a failed journal write stops the node: the batch in it and every later request get
/// ShuttingDown naming the failure, the driver reports why it stopped, and ends with an error
/// once shut down (so the process exits non-zero) instead of aborting deep in the I/O code.
/// Method: a journal that fails its second write; two appends, then one more request.
#[tokio::test(flavor = "current_thread")]
async fn a_failed_journal_write_stops_the_node_and_says_why() {
    let journal = FailingJournal {
        ok_max: 1,
        submitted: 0,
        done: Vec::new(),
    };
    let (handle, task) = start(journal, Manifests { fail: false });
    let (stream, mut replies) = handle.open_stream(Some(Role::Engine));
    request(&stream, 1, append(1)).await;
    let ack = reply(&mut replies).await;
    assert!(
        matches!(ack.message, Message::Ack(a) if a.scl == Lsn(1)),
        "{ack:?}"
    );
    request(&stream, 2, append(2)).await;
    let failed = reply(&mut replies).await;
    assert_eq!(failed.request_id, 2);
    shutting_down(&failed, "Input/output error");
    let reason = handle.stopped().await;
    assert!(
        reason.contains("journal write") && reason.contains("Input/output error"),
        "{reason}"
    );
    request(&stream, 3, Message::GetVolumeState(VolumeId(1))).await;
    shutting_down(&reply(&mut replies).await, "Input/output error");
    handle.shutdown();
    let result = task.await.unwrap();
    assert_eq!(result, Err(reason), "the driver ends with the reason");
}

/// Goal: a manifest that cannot be stored stops the node too, and the request that waited for
/// it (a Fence) is answered ShuttingDown rather than left waiting.
/// Method: a manifest store that fails with ENOSPC; a Fence.
#[tokio::test(flavor = "current_thread")]
async fn a_failed_manifest_store_stops_the_node() {
    let journal = FailingJournal {
        ok_max: usize::MAX,
        submitted: 0,
        done: Vec::new(),
    };
    let (handle, task) = start(journal, Manifests { fail: true });
    let (stream, mut replies) = handle.open_stream(Some(Role::Engine));
    let fence = Fence {
        volume: VolumeId(1),
        epoch_current: Epoch(0),
        epoch_new: Epoch(1 << 32 | 1),
    };
    request(&stream, 1, Message::Fence(fence)).await;
    shutting_down(&reply(&mut replies).await, "manifest");
    assert!(handle.stopped().await.contains("No space left"));
    handle.shutdown();
    assert!(task.await.unwrap().is_err());
}

/// A journal whose writes never complete (a device that stopped answering).
struct StuckJournal;

impl JournalIo for StuckJournal {
    fn submit(&mut self, _: PersistGroup) -> std::io::Result<()> {
        Ok(())
    }

    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }

    fn reap(&mut self, _: &mut Vec<GroupOutcome>) {}

    fn ready(&mut self) -> impl Future<Output = ()> + Send {
        std::future::pending()
    }
}

/// Log lines, kept for a test to read.
#[derive(Clone, Default)]
struct Lines(Arc<std::sync::Mutex<Vec<u8>>>);

impl std::io::Write for Lines {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.0.lock().unwrap().extend_from_slice(buf);
        Ok(buf.len())
    }

    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

impl Lines {
    fn text(&self) -> String {
        String::from_utf8_lossy(&self.0.lock().unwrap()).into_owned()
    }
}

/// Goal: a journal write the device never completes does not leave the node silent: the
/// driver logs one WARN naming the group once it has waited past the stall threshold, and one
/// naming the request that waits on it, and only one each however long they wait (the append
/// itself waits: acks follow durability).
/// Method: a journal that never completes, a 20 ms threshold, one append; wait (10 s at most)
/// for the line, then let the driver run past several more thresholds.
#[tokio::test(flavor = "current_thread")]
async fn a_journal_write_that_never_completes_is_reported_and_so_is_its_request() {
    let lines = Lines::default();
    let writer = lines.clone();
    let subscriber = tracing_subscriber::fmt()
        .with_writer(move || writer.clone())
        .with_ansi(false)
        .finish();
    let _logging = tracing::subscriber::set_default(subscriber);
    let (mut driver, handle) = driver(StuckJournal, Manifests { fail: false });
    driver.set_stall_warn(std::time::Duration::from_millis(20));
    let task = tokio::spawn(driver.run());
    let (stream, mut replies) = handle.open_stream(Some(Role::Engine));
    request(&stream, 1, append(1)).await;
    let said = "journal write of group 1 submitted";
    let waited = tokio::time::timeout(std::time::Duration::from_secs(10), async {
        while !lines.text().contains(said) {
            tokio::time::sleep(std::time::Duration::from_millis(10)).await;
        }
    })
    .await;
    assert!(waited.is_ok(), "no stall reported: {}", lines.text());
    tokio::time::sleep(std::time::Duration::from_millis(100)).await;
    assert_eq!(lines.text().matches(said).count(), 1, "{}", lines.text());
    let owed = "request 1 on stream 1 has waited";
    assert_eq!(lines.text().matches(owed).count(), 1, "{}", lines.text());
    assert!(
        replies.try_recv().is_err(),
        "no ack before the write is durable"
    );
    task.abort();
}
