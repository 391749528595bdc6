//! The thin driver: one tokio task owns the [`NodeCore`] and its journal writer, feeds the
//! core every event (frames from streams, journal completions, manifest stores, journal
//! reads) and carries out what the core asks for. It moves bytes and wakes the core; it makes
//! no protocol decision.
//!
//! Invariants:
//! - every input available is fed to the core before its outputs are drained, so a group
//!   takes everything that arrived meanwhile (group commit);
//! - the manifest is stored and journal records are read off this task (blocking pool), so
//!   appends at the current epoch keep flowing while a manifest write is in flight;
//! - each stream has at most [`STREAM_INFLIGHT_MAX`] requests between being handed to the
//!   core and being answered: a permit is taken per frame and given back with its reply (the
//!   core answers every frame exactly once);
//! - a fatal I/O error goes to the core, which stops the node; the driver logs it at ERROR,
//!   reports it through [`DriverHandle::stopped`] and keeps answering (`ShuttingDown`) until
//!   it is shut down;
//! - the driver owns the node's metrics ([`NodeMetrics`]): it times appends (frame in → Ack
//!   out) and groups (submitted → durable) with its clock, and copies the core's
//!   [`crate::core::NodeStats`] in when a scrape asks, between two inputs. Its bookkeeping
//!   holds one entry per request or group in flight, and loses it with the reply.
//! - back-pressure is logged once per change: a WARN when the core starts delaying acks, an
//!   INFO when it stops (the counts are in the metrics);
//! - a journal write, or a request without its reply, that waits longer than [`STALL_WARN`]
//!   is logged at WARN, once each: the node never waits on its device, nor owes a reply, in
//!   silence;
//! - the core's timer ([`NodeCore::poll_timeout`]) is honoured: `handle_timeout` is called
//!   once at start and whenever it passes; peer requests go to [`crate::peers::Peers`] (or
//!   fail at once without one) and every outcome comes back as an input, so gossip never
//!   waits on this task.

use std::collections::HashMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use bytes::Bytes;
use tokio::sync::{OwnedSemaphorePermit, Semaphore, mpsc, oneshot, watch};
use wire::codec::Reader;
use wire::frame::FrameHeader;
use wire::{ErrorCode, ErrorReply, Frame, LogRecord, Message, PageImage, PeerNode, Role};

use crate::core::{
    ConnId, GroupId, JobToken, ManifestToken, NodeCore, NodeOutput, ReadToken, ThrottleStatus,
};
use crate::io::{Clock, GroupOutcome, JournalIo, ManifestStore, RecordReader};
use crate::manifest::Manifest;
use crate::metrics::NodeMetrics;
use crate::pagestore::{CoalesceJob, PageRead, PageStore, ScrubJob, ScrubReport};
use crate::peers::Peers;
use crate::segment::RecordLocation;

/// Requests per stream that may wait for an answer at once.
pub const STREAM_INFLIGHT_MAX: usize = 256;

/// How long a journal write, or a request, may wait before the driver says so (once each): a
/// write the device never completes, or a reply never sent, would otherwise leave the node
/// idle and silent, with whoever waits on it waiting for good.
pub const STALL_WARN: Duration = Duration::from_secs(10);

/// What the driver watches so that the node never waits in silence.
struct Watch {
    after: Duration,
    /// The last journal write and the last request said to have stalled.
    group_warned: Option<GroupId>,
    request_warned: Option<(ConnId, u64)>,
    /// When to look for requests waiting too long (set while any request waits).
    next_request_check: Option<Instant>,
}

enum Input {
    Open {
        conn: ConnId,
        replies: mpsc::UnboundedSender<Vec<u8>>,
        inflight: Arc<Semaphore>,
    },
    Frame {
        conn: ConnId,
        role: Option<Role>,
        frame: Bytes,
    },
    Closed(ConnId),
    ManifestStored {
        token: ManifestToken,
        result: std::io::Result<()>,
    },
    RecordsRead {
        token: ReadToken,
        result: Result<Vec<LogRecord>, String>,
    },
    PageRead {
        token: ReadToken,
        result: Result<PageImage, (bool, String)>,
    },
    Coalesced {
        token: JobToken,
        result: Result<(), String>,
    },
    Scrubbed {
        token: JobToken,
        report: ScrubReport,
    },
    PagesRead {
        token: ReadToken,
        result: Result<(Vec<PageImage>, u64), (bool, String)>,
    },
    BackupDone {
        token: crate::core::BackupToken,
        outcome: crate::core::BackupOutcome,
    },
    /// A scrape: copy the core's counters into the metrics, then answer.
    RefreshMetrics(oneshot::Sender<()>),
    PeerReply {
        peer: PeerNode,
        request_id: u64,
        result: Result<Message, String>,
    },
    Shutdown,
}

/// How the rest of the node (the QUIC server, tests) talks to the driver.
#[derive(Clone)]
pub struct DriverHandle {
    inputs: mpsc::UnboundedSender<Input>,
    next_conn: Arc<AtomicU64>,
    stopped: watch::Receiver<Option<String>>,
    metrics: Arc<NodeMetrics>,
}

/// One request stream: frames go in, encoded reply frames come out of the receiver that
/// [`DriverHandle::open_stream`] returned with it.
pub struct Stream {
    conn: ConnId,
    role: Option<Role>,
    inputs: mpsc::UnboundedSender<Input>,
    replies: mpsc::UnboundedSender<Vec<u8>>,
    inflight: Arc<Semaphore>,
}

/// A stream's slot for one request, taken before its frame is even read.
pub struct Slot {
    permit: OwnedSemaphorePermit,
}

impl DriverHandle {
    /// A new stream whose requests carry `role` (the peer certificate's).
    pub fn open_stream(&self, role: Option<Role>) -> (Stream, mpsc::UnboundedReceiver<Vec<u8>>) {
        let conn = ConnId(self.next_conn.fetch_add(1, Ordering::Relaxed));
        let (tx, rx) = mpsc::unbounded_channel();
        let inflight = Arc::new(Semaphore::new(STREAM_INFLIGHT_MAX));
        let _ = self.inputs.send(Input::Open {
            conn,
            replies: tx.clone(),
            inflight: inflight.clone(),
        });
        let stream = Stream {
            conn,
            role,
            inputs: self.inputs.clone(),
            replies: tx,
            inflight,
        };
        (stream, rx)
    }

    /// Refuse new requests, finish what is waiting, then end the driver.
    pub fn shutdown(&self) {
        let _ = self.inputs.send(Input::Shutdown);
    }

    /// The node's metrics (encode them with [`NodeMetrics::encode`]).
    pub fn metrics(&self) -> &Arc<NodeMetrics> {
        &self.metrics
    }

    /// Asks the driver to copy the core's counters into the metrics; `false` if it did not
    /// within `timeout` (a busy or stalled driver: the metrics keep their last values).
    pub async fn refresh_metrics(&self, timeout: Duration) -> bool {
        let (tx, rx) = oneshot::channel();
        if self.inputs.send(Input::RefreshMetrics(tx)).is_err() {
            return false; // The driver is gone.
        }
        matches!(tokio::time::timeout(timeout, rx).await, Ok(Ok(())))
    }

    /// Waits until the node stops on a fatal error; returns why.
    pub async fn stopped(&self) -> String {
        let mut stopped = self.stopped.clone();
        match stopped.wait_for(Option::is_some).await {
            Ok(reason) => reason.clone().unwrap_or_default(),
            Err(_) => std::future::pending().await, // The driver ended without stopping.
        }
    }
}

impl Stream {
    /// Waits for a free slot among the stream's [`STREAM_INFLIGHT_MAX`].
    pub async fn reserve(&self) -> Slot {
        let permit = self
            .inflight
            .clone()
            .acquire_owned()
            .await
            .expect("the semaphore is never closed");
        Slot { permit }
    }

    /// Hands a request frame (the bytes after its length prefix) to the core.
    pub fn send(&self, slot: Slot, frame: Bytes) {
        // Given back by the driver with the frame's reply.
        slot.permit.forget();
        let input = Input::Frame {
            conn: self.conn,
            role: self.role,
            frame,
        };
        let _ = self.inputs.send(input);
    }

    /// Answers a frame the core never saw (its length prefix was bad).
    pub fn reply_now(&self, request_id: u64, reply: ErrorReply) {
        let frame = Frame {
            request_id,
            message: Message::Error(reply),
        };
        let _ = self.replies.send(frame.to_bytes());
    }

    /// The peer sent its last frame: waits until every request has its reply, then lets the
    /// reply channel close (once the caller drops the receiver's writer, the stream ends).
    pub async fn finish(self) {
        let all = u32::try_from(STREAM_INFLIGHT_MAX).expect("small");
        let _ = self.inflight.acquire_many(all).await;
        let _ = self.inputs.send(Input::Closed(self.conn));
    }
}

/// The driver task's state.
pub struct Driver<J: JournalIo> {
    core: NodeCore,
    journal: J,
    manifests: Arc<dyn ManifestStore>,
    reader: Arc<dyn RecordReader>,
    pages: Arc<dyn PageStore>,
    clock: Arc<dyn Clock>,
    inputs: mpsc::UnboundedReceiver<Input>,
    loopback: mpsc::UnboundedSender<Input>,
    streams: HashMap<ConnId, (mpsc::UnboundedSender<Vec<u8>>, Arc<Semaphore>)>,
    stopped: watch::Sender<Option<String>>,
    shutting_down: bool,
    metrics: Arc<NodeMetrics>,
    /// When each request still waiting for its reply arrived (by stream and request id).
    received: HashMap<(ConnId, u64), Instant>,
    /// When each group being persisted was submitted.
    submitted: HashMap<GroupId, Instant>,
    peers: Option<Peers>,
    /// Carries out backup jobs; `None` while the node has no `[backup]` store.
    uploader: Option<crate::backup::upload::Uploader>,
    /// Back-pressure as last reported in the log (one line per change of state).
    throttle_logged: ThrottleStatus,
    watch: Watch,
}

impl<J: JournalIo> Driver<J> {
    /// A driver for a recovered core (`finish_recovery` called) and its I/O.
    pub fn new(
        core: NodeCore,
        journal: J,
        io: DriverIo,
        clock: Arc<dyn Clock>,
    ) -> (Self, DriverHandle) {
        let DriverIo {
            manifests,
            reader,
            pages,
            objects,
        } = io;
        let uploader = objects.map(|store| {
            crate::backup::upload::Uploader::new(store, pages.clone(), reader.clone())
        });
        let (tx, rx) = mpsc::unbounded_channel();
        let (stopped_tx, stopped_rx) = watch::channel(None);
        let metrics = Arc::new(NodeMetrics::new());
        let handle = DriverHandle {
            inputs: tx.clone(),
            next_conn: Arc::new(AtomicU64::new(1)),
            stopped: stopped_rx,
            metrics: metrics.clone(),
        };
        let driver = Self {
            core,
            journal,
            manifests,
            reader,
            pages,
            clock,
            inputs: rx,
            loopback: tx,
            streams: HashMap::new(),
            stopped: stopped_tx,
            shutting_down: false,
            metrics,
            received: HashMap::new(),
            submitted: HashMap::new(),
            peers: None,
            uploader,
            throttle_logged: ThrottleStatus::default(),
            watch: Watch {
                after: STALL_WARN,
                group_warned: None,
                request_warned: None,
                next_request_check: None,
            },
        };
        (driver, handle)
    }

    /// Lets the core reach its peers (gossip), with a client endpoint presenting the node's
    /// certificate. Without it, every peer request fails at once.
    pub fn enable_peers(
        &mut self,
        listen: std::net::SocketAddr,
        tls: (&std::path::Path, &std::path::Path, &std::path::Path),
    ) -> anyhow::Result<()> {
        let loopback = self.loopback.clone();
        let sink: crate::peers::OutcomeSink = Arc::new(move |peer, request_id, result| {
            let _ = loopback.send(Input::PeerReply {
                peer,
                request_id,
                result,
            });
        });
        self.peers = Some(Peers::new(listen, tls, sink)?);
        Ok(())
    }

    /// Changes how long a journal write or a request may wait before the driver says it
    /// stalled (tests).
    pub fn set_stall_warn(&mut self, after: Duration) {
        assert!(!after.is_zero());
        self.watch.after = after;
    }

    /// The oldest journal write in flight and when it was submitted.
    fn oldest_write(&self) -> Option<(GroupId, Instant)> {
        let oldest = self.submitted.iter().min_by_key(|(_, at)| **at);
        oldest.map(|(group, at)| (*group, *at))
    }

    /// When [`Self::check_stalls`] has something to look at next.
    fn watch_deadline(&self) -> Option<Instant> {
        if self.core.stopped().is_some() {
            return None; // Writes in flight and their requests no longer matter.
        }
        let journal = self
            .oldest_write()
            .filter(|(group, _)| self.watch.group_warned != Some(*group))
            .map(|(_, at)| at + self.watch.after);
        [journal, self.watch.next_request_check]
            .into_iter()
            .flatten()
            .min()
    }

    /// Says so (WARN, once each) if the oldest journal write in flight, or the oldest request
    /// without a reply, has waited longer than the stall threshold: the node never waits in
    /// silence, whether on its device or on a reply it owes.
    fn check_stalls(&mut self, now: Instant) {
        if self.core.stopped().is_some() {
            return;
        }
        let after = self.watch.after;
        if let Some((group, at)) = self.oldest_write()
            && self.watch.group_warned != Some(group)
            && now >= at + after
        {
            tracing::warn!(
                group = group.0,
                writes_in_flight = self.submitted.len(),
                "journal write of group {} submitted {:?} ago has not completed: every ack \
                 behind it waits (a stalled device?)",
                group.0,
                now.saturating_duration_since(at)
            );
            self.watch.group_warned = Some(group);
        }
        if self.watch.next_request_check.is_none_or(|t| t > now) {
            return;
        }
        self.watch.next_request_check = (!self.received.is_empty()).then_some(now + after);
        let oldest = self.received.iter().min_by_key(|(_, at)| **at);
        if let Some((&(conn, request_id), &at)) = oldest
            && now >= at + after
            && self.watch.request_warned != Some((conn, request_id))
        {
            tracing::warn!(
                requests_waiting = self.received.len(),
                oldest_write_in_flight = ?self.oldest_write().map(|(g, _)| g.0),
                "request {request_id} on stream {} has waited {:?} for its reply",
                conn.0,
                now.saturating_duration_since(at)
            );
            self.watch.request_warned = Some((conn, request_id));
        }
    }

    /// Runs until shut down and idle. `Err(reason)` if the node stopped on a fatal error.
    pub async fn run(mut self) -> Result<(), String> {
        let mut outcomes = Vec::new();
        self.core.handle_timeout(self.clock.now());
        loop {
            self.dispatch();
            self.log_throttle();
            if self.shutting_down && self.core.is_idle() {
                if let Some(peers) = &self.peers {
                    peers.close();
                }
                return self.core.stopped().map_or(Ok(()), |r| Err(r.to_string()));
            }
            let timer = [self.core.poll_timeout(), self.watch_deadline()]
                .into_iter()
                .flatten()
                .min();
            let sleep = async move {
                match timer {
                    Some(at) => tokio::time::sleep_until(at.into()).await,
                    None => std::future::pending().await,
                }
            };
            tokio::select! {
                biased;
                () = self.journal.ready() => {}
                () = sleep => {
                    let now = self.clock.now();
                    self.check_stalls(now);
                    self.core.handle_timeout(now);
                }
                input = self.inputs.recv() => {
                    // Every handle is gone only once the node itself is gone.
                    let input = input.unwrap_or(Input::Shutdown);
                    self.handle(input);
                    while let Ok(input) = self.inputs.try_recv() {
                        self.handle(input);
                    }
                }
            }
            self.journal.reap(&mut outcomes);
            for outcome in outcomes.drain(..) {
                self.handle_outcome(outcome);
            }
        }
    }

    fn handle(&mut self, input: Input) {
        match input {
            Input::Open {
                conn,
                replies,
                inflight,
            } => {
                self.streams.insert(conn, (replies, inflight));
            }
            Input::Frame { conn, role, frame } => {
                let now = self.clock.now();
                // A header the core cannot read is answered under id 0: nothing to time.
                if let Ok(header) = FrameHeader::decode(&mut Reader::new(&frame)) {
                    self.received.insert((conn, header.request_id), now);
                    let after = self.watch.after;
                    self.watch.next_request_check.get_or_insert(now + after);
                }
                self.core.handle_frame(now, conn, role, frame);
            }
            Input::Closed(conn) => {
                self.streams.remove(&conn);
            }
            Input::ManifestStored { token, result } => match result {
                Ok(()) => self.core.handle_manifest_stored(token),
                Err(e) => self
                    .core
                    .handle_fatal_io(format!("cannot store the manifest: {e}")),
            },
            Input::RecordsRead { token, result } => self.core.handle_records_read(token, result),
            Input::PageRead { token, result } => self.core.handle_page_read(token, result),
            Input::Coalesced { token, result } => self.core.handle_coalesced(token, result),
            Input::Scrubbed { token, report } => self.core.handle_scrubbed(token, report),
            Input::PagesRead { token, result } => self.core.handle_pages_read(token, result),
            Input::BackupDone { token, outcome } => self.core.handle_backup_done(token, outcome),
            Input::RefreshMetrics(done) => {
                let waited = self.core.oldest_waiting(self.clock.now());
                self.metrics.publish(&self.core.stats(), waited);
                // A directory listing of a few files, once per scrape.
                self.metrics.page_store_bytes.set(self.pages.disk_bytes());
                let _ = done.send(());
            }
            Input::PeerReply {
                peer,
                request_id,
                result,
            } => {
                let now = self.clock.now();
                self.core.handle_peer_reply(now, &peer, request_id, result);
            }
            Input::Shutdown => {
                self.shutting_down = true;
                self.core.begin_shutdown();
            }
        }
    }

    fn handle_outcome(&mut self, outcome: GroupOutcome) {
        if let Some(at) = self.submitted.remove(&outcome.group) {
            let took = self.clock.now().saturating_duration_since(at);
            self.metrics.persist_seconds.observe(took.as_secs_f64());
        }
        match outcome.result {
            Ok(()) => self.core.handle_persisted(self.clock.now(), outcome.group),
            Err(e) => self.core.handle_fatal_io(format!(
                "journal write of group {} failed: {e}",
                outcome.group.0
            )),
        }
    }

    /// Says so, once, when the node starts delaying its acks (back-pressure) and when it
    /// stops: the metrics count them, the log tells an operator why.
    fn log_throttle(&mut self) {
        let now = self.core.throttle_status();
        let before = self.throttle_logged;
        if now.episodes > before.episodes {
            tracing::warn!(
                journal_used_percent = now.journal_used_percent,
                coalesce_backlog_records = now.backlog_records,
                "back-pressure: delaying acks by {:?} (the journal is filling up or coalescing \
                 is behind); writers see a slow node and route around it",
                now.delay
            );
        } else if before.throttled && !now.throttled {
            tracing::info!(
                acks_delayed = now.acks_throttled - before.acks_throttled,
                "back-pressure: acks no longer delayed"
            );
        }
        if now.episodes > before.episodes || now.throttled != before.throttled {
            self.throttle_logged = now;
        }
    }

    /// Carries out every output, then hands the journal writes to the device.
    fn dispatch(&mut self) {
        loop {
            while let Some(output) = self.core.poll_output() {
                self.carry_out(output);
            }
            match self.journal.flush() {
                Ok(()) => return,
                Err(e) => self
                    .core
                    .handle_fatal_io(format!("cannot submit journal writes: {e}")),
            }
        }
    }

    fn carry_out(&mut self, output: NodeOutput) {
        match output {
            NodeOutput::Reply {
                conn,
                request_id,
                message,
            } => self.send_reply(conn, request_id, message),
            NodeOutput::Persist(group) => {
                self.submitted.insert(group.id, self.clock.now());
                self.metrics
                    .group_appends
                    .observe(group.entries.len() as f64);
                self.metrics.group_bytes.observe(group.bytes as f64);
                if let Err(e) = self.journal.submit(group) {
                    self.core
                        .handle_fatal_io(format!("cannot submit a journal write: {e}"));
                }
            }
            NodeOutput::StoreManifest { token, manifest } => self.store_manifest(token, manifest),
            NodeOutput::ReadRecords { token, locations } => self.read_records(token, locations),
            NodeOutput::ReadPage { token, read } => self.read_page(token, read),
            NodeOutput::Coalesce { token, job } => self.coalesce(token, job),
            NodeOutput::Scrub { token, job } => self.scrub(token, job),
            NodeOutput::ReadPages { token, job } => self.read_pages(token, job),
            NodeOutput::Backup { token, job } => self.backup(token, job),
            NodeOutput::PeerRequest {
                peer,
                request_id,
                message,
            } => match &mut self.peers {
                Some(peers) => peers.send(peer, request_id, message),
                None => {
                    let _ = self.loopback.send(Input::PeerReply {
                        peer,
                        request_id,
                        result: Err("this node has no peer client".into()),
                    });
                }
            },
            NodeOutput::Stopped { reason } => {
                tracing::error!(
                    "stopping: {reason}; the journal on disk is the truth, restart to recover"
                );
                self.stopped.send_replace(Some(reason));
            }
        }
    }

    fn send_reply(&mut self, conn: ConnId, request_id: u64, message: Message) {
        if let Message::Error(e) = &message {
            tracing::debug!(
                "error reply to request {request_id}: {:?} {}",
                e.code,
                e.message
            );
        }
        if let Some(at) = self.received.remove(&(conn, request_id)) {
            let took = self.clock.now().saturating_duration_since(at).as_secs_f64();
            match message {
                Message::Ack(_) => self.metrics.append_seconds.observe(took),
                Message::Page(_) => self.metrics.read_page_seconds.observe(took),
                _ => {}
            }
        }
        // A stream that went away no longer wants its replies.
        let Some((replies, inflight)) = self.streams.get(&conn) else {
            return;
        };
        let frame = Frame {
            request_id,
            message,
        };
        let _ = replies.send(frame.to_bytes());
        inflight.add_permits(1);
    }

    /// Runs blocking `work` on the blocking pool and hands its outcome to the core through the
    /// loopback, straight from that thread (one hop, not two: page reads are latency). A
    /// panic becomes `failed(why)`, so even a read that panics gets an answer.
    fn off_thread<T>(
        &self,
        work: impl FnOnce() -> T + Send + 'static,
        failed: impl FnOnce(String) -> T + Send + 'static,
        input: impl FnOnce(T) -> Input + Send + 'static,
    ) {
        let loopback = self.loopback.clone();
        tokio::task::spawn_blocking(move || {
            let outcome = std::panic::catch_unwind(std::panic::AssertUnwindSafe(work))
                .unwrap_or_else(|panic| failed(panic_message(panic.as_ref())));
            let _ = loopback.send(input(outcome));
        });
    }

    fn store_manifest(&self, token: ManifestToken, manifest: Manifest) {
        let store = self.manifests.clone();
        self.off_thread(
            move || store.store(&manifest),
            |why| Err(std::io::Error::other(why)),
            move |result| Input::ManifestStored { token, result },
        );
    }

    /// Reads records off the runtime thread.
    fn read_records(&self, token: ReadToken, locations: Vec<RecordLocation>) {
        let reader = self.reader.clone();
        self.off_thread(
            move || reader.read(&locations),
            |why| Err(format!("the read failed: {why}")),
            move |result| Input::RecordsRead { token, result },
        );
    }
}

impl<J: JournalIo> Driver<J> {
    /// Reads a page (page store and journal) off the runtime thread.
    fn read_page(&self, token: ReadToken, read: PageRead) {
        let (pages, reader) = (self.pages.clone(), self.reader.clone());
        self.off_thread(
            move || crate::pagestore::read_page(&read, pages.as_ref(), reader.as_ref()),
            |why| Err((false, format!("the read failed: {why}"))),
            move |result| Input::PageRead { token, result },
        );
    }

    /// Runs a coalescing round off the runtime thread.
    fn coalesce(&self, token: JobToken, job: CoalesceJob) {
        let (pages, reader) = (self.pages.clone(), self.reader.clone());
        self.off_thread(
            move || crate::pagestore::run_coalesce(&job, pages.as_ref(), reader.as_ref()),
            |why| Err(format!("the round failed: {why}")),
            move |result| Input::Coalesced { token, result },
        );
    }

    /// Carries out a backup job on the runtime (its reads on the blocking pool).
    fn backup(&self, token: crate::core::BackupToken, job: crate::core::BackupJob) {
        let loopback = self.loopback.clone();
        let Some(uploader) = self.uploader.clone() else {
            let why = "backup is on but the node has no object store".to_string();
            let outcome = crate::core::BackupOutcome::Failed(why);
            let _ = loopback.send(Input::BackupDone { token, outcome });
            return;
        };
        tokio::spawn(async move {
            let outcome = uploader.run(job).await;
            let _ = loopback.send(Input::BackupDone { token, outcome });
        });
    }

    /// Reads pages for a peer's rebuild off the runtime thread.
    fn read_pages(&self, token: ReadToken, job: crate::pagestore::PagesRead) {
        let (pages, reader) = (self.pages.clone(), self.reader.clone());
        self.off_thread(
            move || crate::pagestore::read_pages(&job, pages.as_ref(), reader.as_ref()),
            |why| Err((false, format!("the read failed: {why}"))),
            move |result| Input::PagesRead { token, result },
        );
    }

    /// Runs a scrub job off the runtime thread.
    fn scrub(&self, token: JobToken, job: ScrubJob) {
        let (pages, reader) = (self.pages.clone(), self.reader.clone());
        self.off_thread(
            move || crate::pagestore::run_scrub(&job, pages.as_ref(), reader.as_ref()),
            |why| ScrubReport {
                repair_error: Some(format!("the scrub job failed: {why}")),
                ..ScrubReport::default()
            },
            move |report| Input::Scrubbed { token, report },
        );
    }
}

/// What a caught panic says.
fn panic_message(panic: &(dyn std::any::Any + Send)) -> String {
    let text = panic
        .downcast_ref::<&str>()
        .map(|s| (*s).to_string())
        .or_else(|| panic.downcast_ref::<String>().cloned());
    format!(
        "it panicked: {}",
        text.unwrap_or_else(|| "(no message)".into())
    )
}

/// The blocking I/O a driver hands off its runtime thread.
pub struct DriverIo {
    pub manifests: Arc<dyn ManifestStore>,
    pub reader: Arc<dyn RecordReader>,
    pub pages: Arc<dyn PageStore>,
    /// Where backup jobs go (`None`: no `[backup]` store; the core's backup is off too).
    pub objects: Option<Arc<dyn crate::backup::upload::ObjectStorage>>,
}

/// The refusal of a frame whose length prefix is bad, with the code its decode error maps to.
pub fn framing_error(e: &wire::DecodeError) -> ErrorReply {
    ErrorReply::new(ErrorCode::of_decode_error(e), e.to_string())
}
