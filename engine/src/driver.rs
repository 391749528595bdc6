//! The volume client: drives the pure [`Writer`] over QUIC. It allocates MTRs, ships each PG
//! batch to all six segments, feeds acks back into the writer, completes commits as VDL
//! passes them, serves page reads from one segment with hedging, and publishes PGMRPL.
//!
//! Invariants:
//! - a commit future resolves only once VDL ≥ its LSN (VDL comes from the writer, which only
//!   counts acks that carry a segment's durable SCL);
//! - records are kept (`retained`) until their PG is complete past them, so a segment that
//!   comes back can be caught up; below PGCL, filling a segment's gaps is the peers' job
//!   (gossip, a later issue);
//! - per node, batches are sent in allocation order through one queue, and at most
//!   `node_inflight_appends` appends are in flight: what arrives meanwhile is merged into the
//!   next append per segment, so messages per transaction fall as concurrency rises;
//! - a page read from storage enters the buffer cache only if no record for that page was
//!   allocated after the read point (otherwise the cached image would miss it);
//! - the engine never sends page images: `page_bytes_sent` stays 0;
//! - memory is bounded: retained records by `retained_bytes_max` (writers wait, as for LAL),
//!   each node's queue by `NODE_QUEUE_BYTES_MAX` (past it the node is treated as down and
//!   caught up later from the retained records).

use std::collections::{BTreeMap, HashMap, VecDeque};
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use anyhow::Context;
use tokio::sync::{Semaphore, mpsc, oneshot, watch};
use tokio::task::JoinHandle;
use wire::{
    Append, ErrorCode, HostSegments, LogRecord, Lsn, Message, PageId, PageImage, PgId, ReadPage,
    SegmentIndex, SetPgmrpl,
};

use crate::cache::BufferCache;
use crate::client::NodeClient;
use crate::quorum::{MtrRecord, PG_SIZE, Writer, WriterError};
use crate::volume::VolumeFile;

/// Tuning of a volume client.
#[derive(Clone, Debug)]
pub struct VolumeConfig {
    /// How long a read waits for its segment before asking a second one too.
    pub hedge_delay: Duration,
    pub cache_capacity_bytes: usize,
    pub lal: u64,
    /// Appends in flight per node; more batches wait and are merged.
    pub node_inflight_appends: usize,
    pub pgmrpl_interval: Duration,
    /// How often links to unreachable nodes are retried.
    pub reconnect_interval: Duration,
    /// Bytes of records kept for catch-up (not yet complete in their PG) before writers wait.
    pub retained_bytes_max: usize,
}

impl Default for VolumeConfig {
    fn default() -> Self {
        Self {
            hedge_delay: Duration::from_millis(20),
            cache_capacity_bytes: 64 << 20,
            lal: crate::quorum::LSN_ALLOCATION_LIMIT,
            node_inflight_appends: 2,
            pgmrpl_interval: Duration::from_millis(500),
            reconnect_interval: Duration::from_millis(200),
            retained_bytes_max: 256 << 20,
        }
    }
}

/// Counters a benchmark reads.
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

/// Why a write or a commit did not happen.
#[derive(Debug, thiserror::Error)]
pub enum VolumeError {
    #[error(transparent)]
    Writer(#[from] WriterError),
    /// A node saw a newer epoch: another writer owns the volume now. Nothing more will
    /// commit through this client.
    #[error("this writer was fenced: {0}")]
    Fenced(String),
    /// The volume client was dropped before the commit resolved.
    #[error("the volume client shut down")]
    ShutDown,
}

impl VolumeError {
    pub fn is_fenced(&self) -> bool {
        matches!(self, VolumeError::Fenced(_))
    }
}

/// What the commit task is asked.
enum CommitRequest {
    Wait(Lsn, oneshot::Sender<Result<(), VolumeError>>),
    Fence(String),
}

/// Records of one PG for one segment, shared by the six queues they go to.
struct SegmentBatch {
    pg: PgId,
    segment: SegmentIndex,
    records: Arc<Vec<LogRecord>>,
}

/// A node and the one connection the volume client keeps to it.
struct NodeLink {
    name: String,
    addr: std::net::SocketAddr,
    endpoint: quinn::Endpoint,
    client: tokio::sync::Mutex<Option<Arc<NodeClient>>>,
    queue: mpsc::UnboundedSender<SegmentBatch>,
    /// Bytes of records waiting in `queue`.
    queued_bytes: AtomicUsize,
    /// Set when a send failed: the node's segments may miss records until caught up.
    needs_catch_up: AtomicBool,
}

/// Bytes of records one node's queue may hold; a node that falls this far behind is treated
/// as down and caught up from the retained records once it keeps up again.
pub const NODE_QUEUE_BYTES_MAX: usize = 64 << 20;

fn records_bytes(records: &[LogRecord]) -> usize {
    records.iter().map(LogRecord::encoded_len).sum()
}

impl NodeLink {
    async fn get(&self) -> anyhow::Result<Arc<NodeClient>> {
        let mut guard = self.client.lock().await;
        if let Some(client) = guard.as_ref().filter(|c| !c.is_closed()) {
            return Ok(client.clone());
        }
        *guard = None;
        let connect = NodeClient::connect(&self.endpoint, self.addr, &self.name);
        let (client, _unsolicited) = tokio::time::timeout(Duration::from_secs(1), connect)
            .await
            .with_context(|| format!("connecting to {} timed out", self.name))??;
        let client = Arc::new(client);
        *guard = Some(client.clone());
        Ok(client)
    }

    fn mark_down(&self) {
        self.needs_catch_up.store(true, Ordering::Release);
    }

    /// Queues a batch unless the node is down or too far behind (then it is marked down).
    fn enqueue(&self, batch: SegmentBatch) {
        let bytes = records_bytes(&batch.records);
        if self.queued_bytes.load(Ordering::Acquire) + bytes > NODE_QUEUE_BYTES_MAX {
            self.mark_down();
            return;
        }
        self.queued_bytes.fetch_add(bytes, Ordering::AcqRel);
        if self.queue.send(batch).is_err() {
            self.queued_bytes.fetch_sub(bytes, Ordering::AcqRel);
        }
    }
}

/// Pages written recently: page → last LSN allocated for it, for LSNs above VDL only.
#[derive(Default)]
struct RecentWrites {
    last: HashMap<PageId, Lsn>,
    order: VecDeque<(Lsn, PageId)>,
}

impl RecentWrites {
    fn note(&mut self, page: PageId, lsn: Lsn) {
        self.last.insert(page, lsn);
        self.order.push_back((lsn, page));
    }

    fn prune(&mut self, vdl: Lsn) {
        while let Some(&(lsn, page)) = self.order.front() {
            if lsn > vdl {
                break;
            }
            self.order.pop_front();
            if self.last.get(&page) == Some(&lsn) {
                self.last.remove(&page);
            }
        }
    }

    fn written_after(&self, page: PageId, lsn: Lsn) -> bool {
        self.last.get(&page).is_some_and(|last| *last > lsn)
    }
}

/// Everything the writer side guards with one lock (never held across an await).
struct State {
    writer: Writer,
    /// Per PG, records not yet complete in their PG (LSN > PGCL), for catch-up.
    retained: Vec<BTreeMap<Lsn, LogRecord>>,
    retained_bytes: usize,
    recent_writes: RecentWrites,
    /// Outstanding read points (with multiplicity).
    read_points: BTreeMap<Lsn, usize>,
    cache: BufferCache,
    pgmrpl_sent: Vec<Lsn>,
    /// Per PG, the LSNs of its records from the highest one at or below the PGMRPL floor up,
    /// to turn a volume read point into the PG's own (see `pg_read_point`).
    pg_lsns: Vec<VecDeque<Lsn>>,
}

impl State {
    /// The highest LSN of `pg`'s records at or below `read_point` (`Lsn::ZERO` if none): a
    /// segment holds everything of its PG up to `read_point` exactly when its SCL reaches this.
    fn pg_read_point(&self, pg: PgId, read_point: Lsn) -> Lsn {
        let lsns = &self.pg_lsns[pg.0 as usize];
        let end = lsns.partition_point(|lsn| *lsn <= read_point);
        let pg_read_point = if end == 0 { Lsn::ZERO } else { lsns[end - 1] };
        assert!(pg_read_point <= read_point);
        pg_read_point
    }

    /// Forgets PG record LSNs no read can need: keeps the highest one at or below `floor`.
    fn prune_pg_lsns(&mut self, floor: Lsn) {
        for lsns in &mut self.pg_lsns {
            while lsns.len() >= 2 && lsns[1] <= floor {
                lsns.pop_front();
            }
        }
    }
}

struct Shared {
    file: VolumeFile,
    placement: Vec<[usize; PG_SIZE]>,
    links: Vec<Arc<NodeLink>>,
    state: Mutex<State>,
    vdl: watch::Sender<Lsn>,
    commits: mpsc::UnboundedSender<CommitRequest>,
    /// Set (with the node's words) once a node refused this writer's epoch.
    fenced: Mutex<Option<String>>,
    config: VolumeConfig,
    stats: Arc<VolumeStats>,
    read_rotation: AtomicU64,
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
        for link in &self.shared.links {
            if let Ok(guard) = link.client.try_lock()
                && let Some(client) = guard.as_ref()
            {
                client.close();
            }
        }
    }
}

impl VolumeClient {
    /// Attaches to a fresh volume (VDL 0). Connections are made lazily and retried.
    pub fn attach(
        file: VolumeFile,
        endpoint: quinn::Endpoint,
        config: VolumeConfig,
    ) -> anyhow::Result<Self> {
        let geometry = file.geometry();
        let placement = file.placement();
        let mut receivers = Vec::new();
        let links: Vec<Arc<NodeLink>> = file
            .nodes
            .iter()
            .map(|node| {
                let (queue, rx) = mpsc::unbounded_channel();
                receivers.push(rx);
                Arc::new(NodeLink {
                    name: node.name.clone(),
                    addr: node.address,
                    endpoint: endpoint.clone(),
                    client: tokio::sync::Mutex::new(None),
                    queue,
                    queued_bytes: AtomicUsize::new(0),
                    needs_catch_up: AtomicBool::new(false),
                })
            })
            .collect();
        let pg_count = geometry.pg_count as usize;
        let state = State {
            writer: Writer::new(geometry, config.lal),
            retained: vec![BTreeMap::new(); pg_count],
            retained_bytes: 0,
            recent_writes: RecentWrites::default(),
            read_points: BTreeMap::new(),
            cache: BufferCache::new(config.cache_capacity_bytes),
            pgmrpl_sent: vec![Lsn::ZERO; pg_count],
            pg_lsns: vec![VecDeque::new(); pg_count],
        };
        let (vdl, _) = watch::channel(Lsn::ZERO);
        let (commits, commits_rx) = mpsc::unbounded_channel();
        let shared = Arc::new(Shared {
            file,
            placement,
            links,
            state: Mutex::new(state),
            vdl,
            commits,
            fenced: Mutex::new(None),
            config,
            stats: Arc::default(),
            read_rotation: AtomicU64::new(0),
        });
        let mut tasks = Vec::new();
        for (link, rx) in shared.links.iter().zip(receivers) {
            tasks.push(tokio::spawn(run_sender(shared.clone(), link.clone(), rx)));
        }
        tasks.push(tokio::spawn(run_commits(
            shared.vdl.subscribe(),
            commits_rx,
        )));
        for index in 0..shared.links.len() {
            tasks.push(tokio::spawn(probe(shared.clone(), index)));
        }
        tasks.push(tokio::spawn(run_pgmrpl(shared.clone())));
        Ok(Self { shared, tasks })
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

    pub fn file(&self) -> &VolumeFile {
        &self.shared.file
    }

    /// The SCL the writer knows for a segment (from acks).
    pub fn segment_scl(&self, pg: PgId, segment: SegmentIndex) -> Lsn {
        self.shared
            .state
            .lock()
            .expect("state lock")
            .writer
            .segment_scl(pg, segment)
    }

    /// Allocates an MTR (waiting while LAL holds it back), ships its records, and returns its
    /// CPL without waiting for durability: pass it to [`commit`](Self::commit).
    pub async fn write_mtr(&self, records: Vec<MtrRecord>) -> Result<Lsn, VolumeError> {
        let mut vdl = self.shared.vdl.subscribe();
        let count = records.len() as u64;
        loop {
            self.shared.check_fenced()?;
            {
                let mut state = self.shared.state.lock().expect("state lock");
                // Empty and never-fitting MTRs go through to get their error, not a wait.
                let hopeless = count == 0 || count > state.writer.lal();
                let room = state.retained_bytes <= self.shared.config.retained_bytes_max;
                if hopeless || (room && state.writer.can_allocate(count)) {
                    let mtr = state.writer.allocate_mtr(records)?;
                    self.shared.dispatch(&mut state, mtr.batches);
                    return Ok(mtr.cpl);
                }
            }
            // Back-pressure: wait for VDL to move (or re-check now and then).
            let _ = tokio::time::timeout(Duration::from_millis(100), vdl.changed()).await;
        }
    }

    /// Resolves once VDL ≥ `lsn`; completed by the commit task, never by polling. Fails if
    /// the writer is fenced first.
    pub fn commit(
        &self,
        lsn: Lsn,
    ) -> impl std::future::Future<Output = Result<(), VolumeError>> + use<> {
        let (tx, rx) = oneshot::channel();
        match self.shared.check_fenced() {
            Err(fenced) => {
                let _ = tx.send(Err(fenced));
            }
            Ok(()) if *self.shared.vdl.borrow() >= lsn => {
                let _ = tx.send(Ok(()));
            }
            Ok(()) => {
                let _ = self.shared.commits.send(CommitRequest::Wait(lsn, tx));
            }
        }
        async move { rx.await.unwrap_or(Err(VolumeError::ShutDown)) }
    }

    /// The page at the current VDL: from the buffer cache, or from one segment.
    pub async fn read_page(&self, page: PageId) -> anyhow::Result<PageImage> {
        let read_point = {
            let mut state = self.shared.state.lock().expect("state lock");
            if let Some(image) = state.cache.get(page) {
                return Ok(image.clone());
            }
            let read_point = *self.shared.vdl.borrow();
            *state.read_points.entry(read_point).or_default() += 1;
            read_point
        };
        // Unregistered however the read ends, cancellation included, so PGMRPL never sticks.
        let registered = ReadPointGuard {
            shared: &self.shared,
            read_point,
        };
        let result = self.read_page_from(page, read_point, None).await;
        drop(registered);
        let image = result?;
        let mut state = self.shared.state.lock().expect("state lock");
        if !state.recent_writes.written_after(page, read_point) {
            let vdl = state.writer.vdl();
            state.cache.insert(image.clone(), vdl);
        }
        Ok(image)
    }

    /// Reads `page` as of `read_point` from storage, bypassing the cache: from the segments in
    /// `order` if given (tests use it to aim at a lagging segment first), else from those the
    /// writer knows to have SCL ≥ read point, hedging after `hedge_delay`.
    pub async fn read_page_from(
        &self,
        page: PageId,
        read_point: Lsn,
        order: Option<Vec<SegmentIndex>>,
    ) -> anyhow::Result<PageImage> {
        let pg = self
            .shared
            .file
            .pg_of(page)
            .with_context(|| format!("page {} is outside the volume", page.0))?;
        // Nodes know only their own PG: ask for the PG's read point, the last of its records
        // at or below the volume's.
        let (read_point, readable) = {
            let state = self.shared.state.lock().expect("state lock");
            let pg_read_point = state.pg_read_point(pg, read_point);
            (
                pg_read_point,
                state.writer.readable_segments(pg, pg_read_point),
            )
        };
        let candidates = match order {
            Some(order) => order,
            None => {
                let mut c = readable;
                anyhow::ensure!(
                    !c.is_empty(),
                    "no segment of pg {pg} has reached read point {read_point}"
                );
                let rotate = self.shared.read_rotation.fetch_add(1, Ordering::Relaxed) as usize;
                let len = c.len();
                c.rotate_left(rotate % len);
                c
            }
        };
        hedged_read(&self.shared, pg, page, read_point, candidates).await
    }
}

/// An outstanding read point, counted in `State::read_points` while it lives.
struct ReadPointGuard<'a> {
    shared: &'a Shared,
    read_point: Lsn,
}

impl Drop for ReadPointGuard<'_> {
    fn drop(&mut self) {
        let mut state = self.shared.state.lock().expect("state lock");
        let count = state
            .read_points
            .get_mut(&self.read_point)
            .expect("registered read point");
        assert!(*count > 0);
        *count -= 1;
        if *count == 0 {
            state.read_points.remove(&self.read_point);
        }
    }
}

impl Shared {
    /// Queues each PG batch to its six segments; called under the state lock so that every
    /// node queue sees batches in allocation order.
    fn dispatch(&self, state: &mut State, batches: Vec<crate::quorum::PgBatch>) {
        let vdl = state.writer.vdl();
        for batch in batches {
            let pg_index = batch.pg.0 as usize;
            for record in &batch.records {
                state.pg_lsns[pg_index].push_back(record.lsn);
                state.retained_bytes += record.encoded_len();
                state.retained[pg_index].insert(record.lsn, record.clone());
                state.recent_writes.note(record.page, record.lsn);
                if let Err(e) = state.cache.apply(record, vdl) {
                    // A cached page that refuses a record the writer accepted is a bug.
                    panic!(
                        "cached page {} refused record {}: {e}",
                        record.page.0, record.lsn
                    );
                }
            }
            let records = Arc::new(batch.records);
            for (segment, node) in self.placement[pg_index].iter().enumerate() {
                let segment = SegmentIndex(segment as u32);
                let item = SegmentBatch {
                    pg: batch.pg,
                    segment,
                    records: records.clone(),
                };
                self.links[*node].enqueue(item);
            }
        }
    }

    /// Feeds one ack into the writer and publishes VDL if it moved.
    fn on_ack(&self, pg: PgId, segment: SegmentIndex, scl: Lsn) {
        let vdl = {
            let mut state = self.state.lock().expect("state lock");
            let advanced = state.writer.on_ack(pg, segment, scl);
            let pgcl = state.writer.pgcl(pg);
            let retained = &mut state.retained[pg.0 as usize];
            let mut freed = 0;
            while let Some(entry) = retained.first_entry().filter(|e| *e.key() <= pgcl) {
                freed += entry.remove().encoded_len();
            }
            assert!(freed <= state.retained_bytes);
            state.retained_bytes -= freed;
            if !advanced {
                return;
            }
            let vdl = state.writer.vdl();
            state.recent_writes.prune(vdl);
            state.cache.evict_to_capacity(vdl);
            vdl
        };
        self.vdl.send_if_modified(|current| {
            let moved = vdl > *current;
            if moved {
                *current = vdl;
            }
            moved
        });
    }

    fn check_fenced(&self) -> Result<(), VolumeError> {
        match self.fenced.lock().expect("fenced lock").as_ref() {
            Some(reason) => Err(VolumeError::Fenced(reason.clone())),
            None => Ok(()),
        }
    }

    /// Marks the writer fenced (once) and fails every commit waiting.
    fn fence(&self, reason: String) {
        let mut fenced = self.fenced.lock().expect("fenced lock");
        if fenced.is_none() {
            tracing::error!("writer fenced: {reason}");
            *fenced = Some(reason.clone());
            let _ = self.commits.send(CommitRequest::Fence(reason));
        }
    }

    fn count_sent(&self, frame_bytes: usize) {
        self.stats.messages_sent.fetch_add(1, Ordering::Relaxed);
        self.stats
            .bytes_sent
            .fetch_add(frame_bytes as u64, Ordering::Relaxed);
    }
}

/// Most bytes of records merged into one append.
const MERGED_APPEND_BYTES_MAX: usize = 1 << 20;

/// Per node: takes batches in order, merges what queued up per segment, and sends.
async fn run_sender(
    shared: Arc<Shared>,
    link: Arc<NodeLink>,
    mut rx: mpsc::UnboundedReceiver<SegmentBatch>,
) {
    let permits = Arc::new(Semaphore::new(shared.config.node_inflight_appends.max(1)));
    loop {
        let Ok(permit) = permits.clone().acquire_owned().await else {
            return;
        };
        let Some(first) = rx.recv().await else { return };
        let mut merged: BTreeMap<(PgId, SegmentIndex), Vec<LogRecord>> = BTreeMap::new();
        let mut bytes = 0;
        let mut next = Some(first);
        while let Some(batch) = next.take() {
            let batch_bytes = records_bytes(&batch.records);
            link.queued_bytes.fetch_sub(batch_bytes, Ordering::AcqRel);
            // A node marked down gets nothing until catch-up: drop without copying.
            if !link.needs_catch_up.load(Ordering::Acquire) {
                bytes += batch_bytes;
                let records = merged.entry((batch.pg, batch.segment)).or_default();
                records.extend(batch.records.iter().cloned());
            }
            if bytes < MERGED_APPEND_BYTES_MAX {
                next = rx.try_recv().ok();
            }
        }
        if merged.is_empty() {
            continue;
        }
        // The appends of one round (one per segment with records) go out together; the
        // round's permit is released when the last of them is acknowledged.
        let permit = Arc::new(permit);
        for ((pg, segment), records) in merged {
            let (shared, link, permit) = (shared.clone(), link.clone(), permit.clone());
            tokio::spawn(async move {
                send_append(&shared, &link, pg, segment, records).await;
                drop(permit);
            });
        }
    }
}

async fn send_append(
    shared: &Shared,
    link: &NodeLink,
    pg: PgId,
    segment: SegmentIndex,
    mut records: Vec<LogRecord>,
) {
    records.sort_by_key(|r| r.lsn);
    records.dedup_by_key(|r| r.lsn);
    assert!(!records.is_empty());
    let redo_bytes: usize = records.iter().map(LogRecord::encoded_len).sum();
    let append = Append {
        volume: shared.file.id(),
        epoch: shared.file.epoch(),
        pg,
        segment,
        vdl: Lsn::ZERO, // VolumeCore replaces this driver
        records,
    };
    // A node marked down is probed by the reconnect task only; what it misses meanwhile is
    // re-sent by catch-up, so dropping here loses nothing and keeps the queue moving.
    if link.needs_catch_up.load(Ordering::Acquire) {
        return;
    }
    let Ok(client) = link.get().await else {
        link.mark_down();
        return;
    };
    shared.count_sent(append.encoded_len() + 16);
    shared.stats.appends_sent.fetch_add(1, Ordering::Relaxed);
    shared
        .stats
        .redo_bytes_sent
        .fetch_add(redo_bytes as u64, Ordering::Relaxed);
    match client.append(append).await {
        Ok(Ok(ack)) => shared.on_ack(pg, segment, ack.scl),
        Ok(Err(e)) if e.code == ErrorCode::StaleEpoch => {
            shared.fence(format!(
                "node {} refused epoch {}: {}",
                link.name,
                shared.file.epoch(),
                e.message
            ));
        }
        Ok(Err(e)) => tracing::warn!(
            "node {} refused an append: {:?} {}",
            link.name,
            e.code,
            e.message
        ),
        Err(e) => {
            tracing::debug!("append to {} failed: {e:#}", link.name);
            link.mark_down();
        }
    }
}

/// The dedicated commit task: completes waiters as VDL passes them, or fails them all once
/// the writer is fenced.
async fn run_commits(
    mut vdl: watch::Receiver<Lsn>,
    mut requests: mpsc::UnboundedReceiver<CommitRequest>,
) {
    type Waiter = oneshot::Sender<Result<(), VolumeError>>;
    let mut waiting: BTreeMap<Lsn, Vec<Waiter>> = BTreeMap::new();
    let mut fenced: Option<String> = None;
    loop {
        tokio::select! {
            request = requests.recv() => match request {
                None => return,
                Some(CommitRequest::Wait(lsn, tx)) => waiting.entry(lsn).or_default().push(tx),
                Some(CommitRequest::Fence(reason)) => fenced = Some(reason),
            },
            changed = vdl.changed() => {
                if changed.is_err() {
                    return;
                }
            }
        }
        // Commits VDL has passed succeed even if a fence arrived after: they are durable.
        let current = *vdl.borrow_and_update();
        let still_waiting = waiting.split_off(&Lsn(current.0.saturating_add(1)));
        for tx in std::mem::replace(&mut waiting, still_waiting)
            .into_values()
            .flatten()
        {
            let _ = tx.send(Ok(()));
        }
        if let Some(reason) = &fenced {
            for tx in std::mem::take(&mut waiting).into_values().flatten() {
                let _ = tx.send(Err(VolumeError::Fenced(reason.clone())));
            }
        }
    }
}

/// Reconnects to a node whose sends failed and re-sends what its segments miss. One probe
/// task per node, so a dead node never delays another's return.
async fn probe(shared: Arc<Shared>, index: usize) {
    let link = shared.links[index].clone();
    let mut tick = tokio::time::interval(shared.config.reconnect_interval);
    loop {
        tick.tick().await;
        if !link.needs_catch_up.load(Ordering::Acquire) || link.get().await.is_err() {
            continue;
        }
        link.needs_catch_up.store(false, Ordering::Release);
        catch_up(&shared, index);
    }
}

/// Queues, for every segment on node `index`, the retained records above its known SCL.
fn catch_up(shared: &Shared, index: usize) {
    let state = shared.state.lock().expect("state lock");
    for (pg, nodes) in shared.placement.iter().enumerate() {
        for (segment, node) in nodes.iter().enumerate() {
            if *node != index {
                continue;
            }
            let (pg, segment) = (PgId(pg as u32), SegmentIndex(segment as u32));
            let scl = state.writer.segment_scl(pg, segment);
            let missing: Vec<LogRecord> = state.retained[pg.0 as usize]
                .range(Lsn(scl.0 + 1)..)
                .map(|(_, r)| r.clone())
                .collect();
            for chunk in missing.chunks(256) {
                let item = SegmentBatch {
                    pg,
                    segment,
                    records: Arc::new(chunk.to_vec()),
                };
                shared.links[index].enqueue(item);
            }
        }
    }
}

/// Publishes PGMRPL: the lowest outstanding read point (or VDL when there is none).
async fn run_pgmrpl(shared: Arc<Shared>) {
    let mut tick = tokio::time::interval(shared.config.pgmrpl_interval);
    loop {
        tick.tick().await;
        let updates: Vec<(PgId, Lsn)> = {
            let mut state = shared.state.lock().expect("state lock");
            let floor = state
                .read_points
                .keys()
                .next()
                .copied()
                .unwrap_or(state.writer.vdl());
            state.prune_pg_lsns(floor);
            let mut updates = Vec::new();
            for (pg, sent) in state.pgmrpl_sent.iter_mut().enumerate() {
                if floor > *sent {
                    *sent = floor;
                    updates.push((PgId(pg as u32), floor));
                }
            }
            updates
        };
        for (pg, pgmrpl) in updates {
            for node in shared.placement[pg.0 as usize] {
                let link = shared.links[node].clone();
                let message = Message::SetPgmrpl(SetPgmrpl {
                    volume: shared.file.id(),
                    pg,
                    pgmrpl,
                });
                shared.count_sent(40);
                shared.stats.pgmrpl_sent.fetch_add(1, Ordering::Relaxed);
                tokio::spawn(async move {
                    if let Ok(client) = link.get().await {
                        let _ = client.request(message).await;
                    }
                });
            }
        }
    }
}

/// Sends the read to the first candidate, and to the next one each time `hedge_delay` passes
/// without an answer or an answer is a refusal; the first page wins.
async fn hedged_read(
    shared: &Arc<Shared>,
    pg: PgId,
    page: PageId,
    read_point: Lsn,
    candidates: Vec<SegmentIndex>,
) -> anyhow::Result<PageImage> {
    let mut remaining = candidates.into_iter();
    let mut inflight = tokio::task::JoinSet::new();
    let mut failures = Vec::new();
    let start = |set: &mut tokio::task::JoinSet<_>, segment: SegmentIndex| {
        let shared = shared.clone();
        set.spawn(async move {
            (
                segment,
                read_one(&shared, pg, segment, page, read_point).await,
            )
        });
    };
    let Some(first) = remaining.next() else {
        anyhow::bail!("no segment to read page {} from", page.0)
    };
    start(&mut inflight, first);
    loop {
        let hedge = tokio::time::sleep(shared.config.hedge_delay);
        tokio::select! {
            done = inflight.join_next() => {
                let Some(done) = done else {
                    anyhow::bail!("every segment failed to serve page {}: {}", page.0, failures.join("; "));
                };
                let (segment, result) = done.context("read task panicked")?;
                match result {
                    Ok(image) => return Ok(image),
                    Err(e) => {
                        failures.push(format!("segment {segment}: {e:#}"));
                        if let Some(next) = remaining.next() {
                            start(&mut inflight, next);
                        }
                    }
                }
            }
            () = hedge => {
                if let Some(next) = remaining.next() {
                    shared.stats.reads_hedged.fetch_add(1, Ordering::Relaxed);
                    start(&mut inflight, next);
                }
            }
        }
    }
}

async fn read_one(
    shared: &Shared,
    pg: PgId,
    segment: SegmentIndex,
    page: PageId,
    read_point: Lsn,
) -> anyhow::Result<PageImage> {
    let link = &shared.links[shared.placement[pg.0 as usize][segment.0 as usize]];
    let client = link.get().await?;
    let request = ReadPage {
        volume: shared.file.id(),
        epoch: shared.file.epoch(),
        pg,
        segment,
        page,
        read_point,
    };
    shared.count_sent(56);
    match client.request(Message::ReadPage(request)).await? {
        Message::Page(reply) => {
            anyhow::ensure!(
                reply.page == page,
                "node {} answered for page {}",
                link.name,
                reply.page.0
            );
            anyhow::ensure!(
                reply.page_lsn <= read_point,
                "node {} answered past the read point",
                link.name
            );
            let size = shared.file.page_size_bytes as usize;
            anyhow::ensure!(
                reply.bytes.len() == size,
                "node {} sent a page of {} bytes",
                link.name,
                reply.bytes.len()
            );
            Ok(PageImage {
                page,
                lsn: reply.page_lsn,
                bytes: reply.bytes,
            })
        }
        Message::Error(e) => {
            anyhow::bail!("node {} refused: {:?}: {}", link.name, e.code, e.message)
        }
        other => anyhow::bail!("node {} sent {other:?} to a read", link.name),
    }
}

/// Tells every node of `file` which segments it hosts; each must answer Done.
pub async fn assign_segments(file: &VolumeFile, endpoint: &quinn::Endpoint) -> anyhow::Result<()> {
    let geometry = file.geometry();
    for node in &file.nodes {
        let (client, _) = NodeClient::connect(endpoint, node.address, &node.name).await?;
        let request = HostSegments {
            volume: file.id(),
            epoch: file.epoch(),
            page_size_bytes: geometry.page_size_bytes,
            pages_per_pg: geometry.pages_per_pg,
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
