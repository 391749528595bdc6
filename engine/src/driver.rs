//! The volume client: the tokio/quinn shell around the pure [`VolumeCore`]. It moves bytes
//! and wakes the core, nothing more: one task per node writes the core's requests to that
//! node's QUIC stream in order and feeds each reply back; one timer task calls
//! `handle_timeout` when `poll_timeout` says; completions resolve the futures of
//! [`VolumeClient::commit`] and [`VolumeClient::read_page`].
//!
//! Invariants:
//! - the core is only touched under its mutex, never across an await;
//! - a completion is delivered under the same lock that produced it, so a waiter registered
//!   under that lock can never miss its completion;
//! - every request the core makes has a deadline in the core, so a lost connection or a
//!   silent node turns into a failure, never a hang; `open` itself gives up after
//!   `open_timeout`, saying what recovery was waiting for.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::Context;
use tokio::sync::{Notify, mpsc, oneshot, watch};
use tokio::task::JoinHandle;
use wire::frame::decode_len;
use wire::{Frame, HostSegments, Lsn, Message, PageId, PageImage, PgId, SegmentIndex};

pub use crate::core::VolumeError;
use crate::core::{
    CommitId, Completion, CoreConfig, NodeIndex, Phase, ReadId, ReadStart, Transmit, VolumeCore,
    VolumeLayout,
};
use crate::quorum::MtrRecord;
use crate::volume::VolumeFile;

/// Tuning of a volume client.
#[derive(Clone, Debug)]
pub struct VolumeConfig {
    /// How long a read waits for its segment before asking a second one too.
    pub hedge_delay: Duration,
    pub cache_capacity_bytes: usize,
    pub lal: u64,
    /// Append rounds in flight per node; more batches wait and are merged.
    pub node_inflight_appends: usize,
    pub pgmrpl_interval: Duration,
    /// How often unreachable nodes are probed and recovery requests resent.
    pub reconnect_interval: Duration,
    /// Deadline of every request to a node.
    pub request_timeout: Duration,
    /// Bytes of records kept for catch-up (not yet complete in their PG) before writers wait.
    pub retained_bytes_max: usize,
    /// How long `open` waits for recovery before giving up.
    pub open_timeout: Duration,
}

impl Default for VolumeConfig {
    fn default() -> Self {
        let core = CoreConfig::default();
        Self {
            hedge_delay: core.hedge_delay,
            cache_capacity_bytes: core.cache_capacity_bytes,
            lal: core.lal,
            node_inflight_appends: core.node_inflight_appends,
            pgmrpl_interval: core.pgmrpl_interval,
            reconnect_interval: core.reconnect_interval,
            request_timeout: core.request_timeout,
            retained_bytes_max: core.retained_bytes_max,
            open_timeout: Duration::from_secs(60),
        }
    }
}

impl VolumeConfig {
    // The update fills the core's test-only fields, which exist only with `planted-bugs`.
    #[allow(clippy::needless_update)]
    fn core(&self) -> CoreConfig {
        CoreConfig {
            lal: self.lal,
            hedge_delay: self.hedge_delay,
            cache_capacity_bytes: self.cache_capacity_bytes,
            node_inflight_appends: self.node_inflight_appends,
            pgmrpl_interval: self.pgmrpl_interval,
            reconnect_interval: self.reconnect_interval,
            request_timeout: self.request_timeout,
            retained_bytes_max: self.retained_bytes_max,
            epoch_tag: random_tag(),
            ..CoreConfig::default()
        }
    }
}

/// A non-zero tag nobody else is likely to draw (std's per-process random hash keys).
fn random_tag() -> u32 {
    use std::hash::{BuildHasher, Hasher};
    let mut hasher = std::collections::hash_map::RandomState::new().build_hasher();
    hasher.write_u128(Instant::now().elapsed().as_nanos());
    hasher.write_u32(std::process::id());
    let tag = (hasher.finish() >> 32) as u32;
    tag.max(1)
}

/// Counters a benchmark reads (copied from the core's after every step).
#[derive(Debug, Default)]
pub struct VolumeStats {
    pub messages_sent: AtomicU64,
    pub bytes_sent: AtomicU64,
    pub appends_sent: AtomicU64,
    pub redo_bytes_sent: AtomicU64,
    /// Page images sent by the engine: always 0, by design.
    pub page_bytes_sent: AtomicU64,
    pub reads_hedged: AtomicU64,
    /// SetPgmrpl messages sent (one per node of a PG whose floor rose).
    pub pgmrpl_sent: AtomicU64,
}

type CommitWaiter = oneshot::Sender<Result<(), VolumeError>>;
type ReadWaiter = oneshot::Sender<Result<PageImage, VolumeError>>;

/// The core and the waiters of its pending commits and reads, under one lock.
struct Locked {
    core: VolumeCore,
    commits: HashMap<CommitId, CommitWaiter>,
    reads: HashMap<ReadId, ReadWaiter>,
}

struct Shared {
    file: VolumeFile,
    locked: Mutex<Locked>,
    /// Per node: frames to write, in order.
    links: Vec<mpsc::UnboundedSender<(u64, Vec<u8>)>>,
    timer: Notify,
    vdl: watch::Sender<Lsn>,
    phase: watch::Sender<Phase>,
    stats: Arc<VolumeStats>,
}

impl Shared {
    fn lock(&self) -> std::sync::MutexGuard<'_, Locked> {
        self.locked.lock().expect("volume core lock")
    }

    /// Carries out what the core asks: sends, completions, published VDL and phase.
    fn pump(&self, locked: &mut Locked) {
        while let Some(Transmit {
            node,
            request_id,
            payload,
        }) = locked.core.poll_transmit()
        {
            let _ = self.links[node].send((request_id, payload.encode(request_id)));
        }
        // VDL is published before the commits it completes, so a waiter that wakes sees it.
        let vdl = locked.core.vdl();
        self.vdl
            .send_if_modified(|v| std::mem::replace(v, vdl) != vdl);
        while let Some(completion) = locked.core.poll_completion() {
            match completion {
                Completion::Commit { id, result } => {
                    if let Some(tx) = locked.commits.remove(&id) {
                        let _ = tx.send(result);
                    }
                }
                Completion::Read { id, result } => {
                    if let Some(tx) = locked.reads.remove(&id) {
                        let _ = tx.send(result);
                    }
                }
            }
        }
        let phase = locked.core.phase();
        if *self.phase.borrow() != *phase {
            self.phase.send_replace(phase.clone());
        }
        let stats = locked.core.stats();
        self.stats
            .messages_sent
            .store(stats.messages_sent, Ordering::Relaxed);
        self.stats
            .bytes_sent
            .store(stats.bytes_sent, Ordering::Relaxed);
        self.stats
            .appends_sent
            .store(stats.appends_sent, Ordering::Relaxed);
        self.stats
            .redo_bytes_sent
            .store(stats.redo_bytes_sent, Ordering::Relaxed);
        self.stats
            .page_bytes_sent
            .store(stats.page_bytes_sent, Ordering::Relaxed);
        self.stats
            .reads_hedged
            .store(stats.reads_hedged, Ordering::Relaxed);
        self.stats
            .pgmrpl_sent
            .store(stats.pgmrpl_sent, Ordering::Relaxed);
        self.timer.notify_one();
    }

    fn on_reply(&self, node: NodeIndex, request_id: u64, reply: Result<Message, String>) {
        let mut locked = self.lock();
        locked
            .core
            .handle_reply(Instant::now(), node, request_id, reply);
        self.pump(&mut locked);
    }
}

/// A volume's writer, attached to its storage nodes.
pub struct VolumeClient {
    shared: Arc<Shared>,
    tasks: Vec<JoinHandle<()>>,
}

impl Drop for VolumeClient {
    fn drop(&mut self) {
        for task in &self.tasks {
            task.abort();
        }
    }
}

impl VolumeClient {
    /// Opens the volume: runs crash recovery (a fresh volume recovers to VDL 0) and returns
    /// once the writer serves.
    ///
    /// # Errors
    /// The volume file does not match the nodes, another writer fenced this one, or recovery
    /// did not finish within `open_timeout` (the error says what it was waiting for).
    pub async fn open(
        file: VolumeFile,
        endpoint: quinn::Endpoint,
        config: VolumeConfig,
    ) -> anyhow::Result<Self> {
        let client = Self::start(file, endpoint, &config);
        let mut phase = client.shared.phase.subscribe();
        let mut said = String::new();
        let deadline = tokio::time::Instant::now() + config.open_timeout;
        loop {
            let current = phase.borrow_and_update().clone();
            match current {
                Phase::Serving => return Ok(client),
                Phase::Fenced(why) | Phase::Failed(why) => anyhow::bail!("{why}"),
                Phase::Recovering(why) => {
                    if why != said && why.contains("waiting for") {
                        tracing::info!("recovery: {why}");
                        said = why;
                    }
                }
            }
            let changed = tokio::time::timeout_at(deadline, phase.changed()).await;
            match changed {
                Ok(Ok(())) => {}
                Ok(Err(_)) => anyhow::bail!("the volume client stopped during recovery"),
                Err(_) => anyhow::bail!(
                    "recovery did not finish within {:?}: {said}",
                    config.open_timeout
                ),
            }
        }
    }

    fn start(file: VolumeFile, endpoint: quinn::Endpoint, config: &VolumeConfig) -> Self {
        let layout = VolumeLayout {
            volume: file.id(),
            epoch: file.epoch(),
            geometry: file.geometry(),
            placement: file.placement(),
            node_names: file.nodes.iter().map(|n| n.name.clone()).collect(),
        };
        let core = VolumeCore::new(layout, config.core(), Instant::now());
        let mut receivers = Vec::new();
        let links = (0..file.nodes.len())
            .map(|_| {
                let (tx, rx) = mpsc::unbounded_channel();
                receivers.push(rx);
                tx
            })
            .collect();
        let phase = core.phase().clone();
        let shared = Arc::new(Shared {
            locked: Mutex::new(Locked {
                core,
                commits: HashMap::new(),
                reads: HashMap::new(),
            }),
            links,
            timer: Notify::new(),
            vdl: watch::channel(Lsn::ZERO).0,
            phase: watch::channel(phase).0,
            stats: Arc::default(),
            file,
        });
        let mut tasks = Vec::new();
        for (node, rx) in receivers.into_iter().enumerate() {
            let entry = &shared.file.nodes[node];
            let link = NodeLink {
                shared: shared.clone(),
                node,
                name: entry.name.clone(),
                addr: entry.address,
                endpoint: endpoint.clone(),
            };
            tasks.push(tokio::spawn(link.run(rx)));
        }
        tasks.push(tokio::spawn(run_timer(shared.clone())));
        {
            let mut locked = shared.lock();
            shared.pump(&mut locked);
        }
        Self { shared, tasks }
    }

    pub fn stats(&self) -> Arc<VolumeStats> {
        self.shared.stats.clone()
    }

    pub fn vdl(&self) -> Lsn {
        *self.shared.vdl.borrow()
    }

    /// A receiver of VDL changes.
    pub fn watch_vdl(&self) -> watch::Receiver<Lsn> {
        self.shared.vdl.subscribe()
    }

    /// What the writer is doing (serving, fenced, …).
    pub fn phase(&self) -> Phase {
        self.shared.phase.borrow().clone()
    }

    pub fn file(&self) -> &VolumeFile {
        &self.shared.file
    }

    /// The epoch this writer holds.
    pub fn epoch(&self) -> wire::Epoch {
        self.shared.lock().core.epoch()
    }

    /// A dump of the writer's state (phase, VDL, SCLs, links), for stall reports.
    pub fn debug_state(&self) -> String {
        self.shared.lock().core.debug_state()
    }

    /// The SCL the writer knows for a segment (from acks).
    pub fn segment_scl(&self, pg: PgId, segment: SegmentIndex) -> Lsn {
        self.shared.lock().core.segment_scl(pg, segment)
    }

    /// Allocates an MTR (waiting while LAL or the retained-bytes bound holds it back), ships
    /// its records, and returns its CPL without waiting for durability: pass it to
    /// [`commit`](Self::commit).
    pub async fn write_mtr(&self, records: Vec<MtrRecord>) -> Result<Lsn, VolumeError> {
        let mut vdl = self.shared.vdl.subscribe();
        let count = records.len() as u64;
        loop {
            {
                let mut locked = self.shared.lock();
                if locked.core.can_write(count) {
                    let result = locked.core.write_mtr(Instant::now(), records);
                    self.shared.pump(&mut locked);
                    return result;
                }
            }
            // Back-pressure: wait for VDL to move (or re-check now and then).
            let _ = tokio::time::timeout(Duration::from_millis(100), vdl.changed()).await;
        }
    }

    /// Resolves once VDL ≥ `lsn`; completed by the core as VDL passes it, never by polling.
    /// Fails if the writer is fenced first.
    pub fn commit(
        &self,
        lsn: Lsn,
    ) -> impl std::future::Future<Output = Result<(), VolumeError>> + use<> {
        let (tx, rx) = oneshot::channel();
        {
            let mut locked = self.shared.lock();
            match locked.core.commit(lsn) {
                Ok(Some(id)) => {
                    locked.commits.insert(id, tx);
                }
                Ok(None) => {
                    let _ = tx.send(Ok(()));
                }
                Err(e) => {
                    let _ = tx.send(Err(e));
                }
            }
        }
        async move { rx.await.unwrap_or(Err(VolumeError::ShutDown)) }
    }

    /// The page at the current VDL: from the buffer cache, or from one segment.
    pub async fn read_page(&self, page: PageId) -> anyhow::Result<PageImage> {
        let start = |core: &mut VolumeCore| core.read_page(Instant::now(), page);
        Ok(self.read_with(start).await?)
    }

    /// Reads `page` as of `read_point` from storage, bypassing the cache: from the segments in
    /// `order` if given (tests use it to aim at a lagging segment first), else from those the
    /// writer knows to have reached the read point, hedging after `hedge_delay`.
    pub async fn read_page_from(
        &self,
        page: PageId,
        read_point: Lsn,
        order: Option<Vec<SegmentIndex>>,
    ) -> anyhow::Result<PageImage> {
        let start = move |core: &mut VolumeCore| {
            core.read_page_from(Instant::now(), page, read_point, order)
        };
        Ok(self.read_with(start).await?)
    }

    async fn read_with(
        &self,
        start: impl FnOnce(&mut VolumeCore) -> ReadStart,
    ) -> Result<PageImage, VolumeError> {
        let (tx, rx) = oneshot::channel();
        let id = {
            let mut locked = self.shared.lock();
            let started = start(&mut locked.core);
            let id = match started {
                ReadStart::Done(result) => return result,
                ReadStart::Pending(id) => id,
            };
            locked.reads.insert(id, tx);
            self.shared.pump(&mut locked);
            id
        };
        // Cancelled however the read ends early, so its read point never pins PGMRPL.
        let guard = CancelRead {
            shared: &self.shared,
            id,
        };
        let result = rx.await.unwrap_or(Err(VolumeError::ShutDown));
        std::mem::forget(guard);
        result
    }
}

/// Cancels a read whose future was dropped before it completed.
struct CancelRead<'a> {
    shared: &'a Shared,
    id: ReadId,
}

impl Drop for CancelRead<'_> {
    fn drop(&mut self) {
        let mut locked = self.shared.lock();
        locked.reads.remove(&self.id);
        locked.core.cancel_read(self.id);
    }
}

/// Calls the core's `handle_timeout` whenever its next timer is due.
async fn run_timer(shared: Arc<Shared>) {
    loop {
        let next = shared.lock().core.poll_timeout();
        let sleep = async {
            match next {
                Some(at) => tokio::time::sleep_until(at.into()).await,
                None => std::future::pending().await,
            }
        };
        tokio::select! {
            () = sleep => {
                let mut locked = shared.lock();
                locked.core.handle_timeout(Instant::now());
                shared.pump(&mut locked);
            }
            () = shared.timer.notified() => {}
        }
    }
}

/// One node's connection: frames go out in the order the core made them; replies come back
/// to the core by request id. A connection that fails is dropped (its requests fail at once)
/// and made again for the next frame.
struct NodeLink {
    shared: Arc<Shared>,
    node: NodeIndex,
    name: String,
    addr: std::net::SocketAddr,
    endpoint: quinn::Endpoint,
}

impl NodeLink {
    async fn run(self, mut rx: mpsc::UnboundedReceiver<(u64, Vec<u8>)>) {
        while let Some(first) = rx.recv().await {
            let stream = self.connect().await;
            let (mut send, recv) = match stream {
                Ok(stream) => stream,
                Err(e) => {
                    let why = format!("cannot reach node {}: {e:#}", self.name);
                    self.fail(first.0, &why);
                    while let Ok((id, _)) = rx.try_recv() {
                        self.fail(id, &why);
                    }
                    continue;
                }
            };
            let inflight: Arc<Mutex<Vec<u64>>> = Arc::default();
            let reader = tokio::spawn(read_replies(
                self.shared.clone(),
                self.node,
                recv,
                inflight.clone(),
            ));
            let mut next = Some(first);
            while let Some((id, bytes)) = next.take() {
                inflight.lock().expect("inflight lock").push(id);
                if send.write_all(&bytes).await.is_err() || reader.is_finished() {
                    break;
                }
                next = rx.recv().await;
            }
            reader.abort();
            let lost = std::mem::take(&mut *inflight.lock().expect("inflight lock"));
            for id in lost {
                self.fail(id, &format!("connection to node {} lost", self.name));
            }
        }
    }

    async fn connect(&self) -> anyhow::Result<(quinn::SendStream, quinn::RecvStream)> {
        let connect = async {
            let connection = self
                .endpoint
                .connect(self.addr, &self.name)
                .with_context(|| format!("cannot start a connection to {}", self.addr))?
                .await
                .with_context(|| format!("handshake with {} at {} failed", self.name, self.addr))?;
            connection.open_bi().await.context("cannot open a stream")
        };
        tokio::time::timeout(Duration::from_secs(1), connect)
            .await
            .with_context(|| format!("connecting to {} timed out", self.name))?
    }

    fn fail(&self, request_id: u64, why: &str) {
        self.shared
            .on_reply(self.node, request_id, Err(why.to_string()));
    }
}

/// Reads reply frames and hands each to the core; removes answered ids from `inflight`.
async fn read_replies(
    shared: Arc<Shared>,
    node: NodeIndex,
    mut recv: quinn::RecvStream,
    inflight: Arc<Mutex<Vec<u64>>>,
) {
    loop {
        let mut prefix = [0u8; 4];
        if recv.read_exact(&mut prefix).await.is_err() {
            return;
        }
        let Ok(len) = decode_len(prefix) else { return };
        let mut bytes = vec![0u8; len];
        if recv.read_exact(&mut bytes).await.is_err() {
            return;
        }
        let Ok(frame) = Frame::decode_after_len(&bytes) else {
            return;
        };
        inflight
            .lock()
            .expect("inflight lock")
            .retain(|id| *id != frame.request_id);
        shared.on_reply(node, frame.request_id, Ok(frame.message));
    }
}

/// Tells every node of `file` which segments it hosts and where the other segments of its PGs
/// live (the peers it gossips with); each must answer Done.
pub async fn assign_segments(file: &VolumeFile, endpoint: &quinn::Endpoint) -> anyhow::Result<()> {
    let geometry = file.geometry();
    for node in &file.nodes {
        let (client, _) = crate::NodeClient::connect(endpoint, node.address, &node.name).await?;
        let (nodes, placement) = file.placement_for(&node.name);
        let request = HostSegments {
            nodes,
            placement,
            volume: file.id(),
            epoch: file.epoch(),
            page_size_bytes: geometry.page_size_bytes,
            pages_per_pg: geometry.pages_per_pg,
            pg_count: geometry.pg_count,
            segments: file.segments_of(&node.name),
        };
        match client.request(Message::HostSegments(request)).await? {
            Message::Done => {}
            Message::Error(e) => {
                anyhow::bail!("node {} refused its segments: {}", node.name, e.message)
            }
            other => anyhow::bail!("node {} answered {other:?}", node.name),
        }
        client.close();
    }
    Ok(())
}
