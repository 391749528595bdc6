//! The persister: step two of the foreground path. One thread owns an io_uring ring over the
//! journal; it takes *everything* queued, writes it as one 4 KiB-aligned O_DIRECT block group,
//! makes it durable, and acknowledges each batch with its segment's new SCL.
//!
//! Invariants:
//! - a reply `Ok(scl)` is sent only after the group holding the batch is on stable storage
//!   (its write and its `fdatasync`, or its `RWF_DSYNC` write, completed successfully);
//! - replies are released strictly in journal order, even when completions arrive out of order;
//! - each buffer given to the kernel stays owned by its in-flight slot until both of the
//!   slot's completions have arrived (`user_data` is a slot index, never a pointer);
//! - at most `inflight_groups_max` (≤ [`INFLIGHT_GROUPS_MAX`]) groups are in flight;
//! - a failed write or sync is fatal: after an fsync error the page cache state is unknown,
//!   so the only safe move is to stop and recover from the journal (fsyncgate).

use std::collections::{HashMap, VecDeque};
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;

use io_uring::{IoUring, opcode, squeue, types};
use wire::{ErrorCode, ErrorReply, Lsn};

use crate::io::raw::SyncMode;
use crate::io::{AlignedBuf, DIRECT_IO_ALIGN};
use crate::journal::format::{self, GROUP_BYTES_MAX, GROUP_HEADER_BYTES};
use crate::journal::{INFLIGHT_GROUPS_MAX, JournalFiles, Position};
use crate::segment::{DurableRecord, RecordLocation, Segment};
use crate::state::SegmentKey;

/// What the persister tells the sender of a batch.
pub type PersistResult = Result<Lsn, ErrorReply>;

/// One validated batch waiting to be persisted.
pub struct PersistRequest {
    pub segment: SegmentKey,
    /// The Append body, written to the journal as it is.
    pub body: Vec<u8>,
    /// Every record of the batch: (lsn, backlink, page, offset in `body`, encoded length).
    pub records: Vec<RecordInBody>,
    /// Called exactly once, from the persister thread.
    pub reply: Box<dyn FnOnce(PersistResult) + Send>,
}

/// Where the persister's loop runs.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum PersisterMode {
    /// Its own thread, woken through an eventfd read in its ring.
    Thread,
    /// A task on the caller's (single-threaded) tokio runtime, woken by the ring's registered
    /// eventfd: no thread hand-off between receiving a batch and submitting its write, nor
    /// between its completion and the ack.
    Inline,
}

/// Persister tuning.
#[derive(Clone, Copy, Debug)]
pub struct PersisterConfig {
    pub inflight_groups_max: usize,
    pub sync_mode: SyncMode,
    pub mode: PersisterMode,
}

/// `RWF_DSYNC` by default: measured on this project's reference disk (virtio, ext4, write-back
/// cache) through this persister at one in flight, p50 105–136 µs against 175–220 µs for a
/// write linked to an `fdatasync` (`sixfold-bench persist --sync …`); the raw probes agree
/// in direction (90 µs against 102–127 µs). Re-measure on new hardware: `journal.sync`.
impl Default for PersisterConfig {
    fn default() -> Self {
        Self {
            inflight_groups_max: 4,
            sync_mode: SyncMode::RwfDsync,
            mode: PersisterMode::Thread,
        }
    }
}

/// A record's place inside an Append body.
#[derive(Clone, Copy, Debug)]
pub struct RecordInBody {
    pub lsn: Lsn,
    pub backlink: Lsn,
    pub page: wire::PageId,
    pub offset: u32,
    pub len: u32,
}

impl RecordInBody {
    /// The records of `append`, whose encoded body is laid out as `Append::encode` does.
    pub fn of(append: &wire::Append) -> Vec<Self> {
        let mut offset = wire::frame::APPEND_HEADER_BYTES;
        let mut out = Vec::with_capacity(append.records.len());
        for record in &append.records {
            let len = record.encoded_len();
            out.push(Self {
                lsn: record.lsn,
                backlink: record.backlink,
                page: record.page,
                offset: u32::try_from(offset).expect("bounded by the frame limit"),
                len: u32::try_from(len).expect("bounded by the frame limit"),
            });
            offset += len;
        }
        assert!(offset == append.encoded_len());
        out
    }

    /// Where this record lies in the journal, given where its body starts.
    pub fn durable(&self, file: u32, body_offset: u64) -> DurableRecord {
        DurableRecord {
            lsn: self.lsn,
            backlink: self.backlink,
            page: self.page,
            location: RecordLocation {
                lsn: self.lsn,
                file,
                offset: body_offset + u64::from(self.offset),
                len: self.len,
            },
        }
    }
}

/// The hosted segments, shared between the persister (writer) and readers.
pub type SharedSegments = Arc<Mutex<HashMap<SegmentKey, Segment>>>;

struct Queue {
    items: Mutex<Vec<PersistRequest>>,
    mode: PersisterMode,
    /// Thread mode: written to wake the persister's pending eventfd read.
    eventfd: OwnedFd,
    /// Inline mode: notified to wake the persister task.
    notify: tokio::sync::Notify,
    closed: AtomicBool,
}

fn new_eventfd(flags: libc::c_int) -> std::io::Result<OwnedFd> {
    // SAFETY: eventfd has no memory preconditions; the result is checked below.
    let fd = unsafe { libc::eventfd(0, libc::EFD_CLOEXEC | flags) };
    if fd < 0 {
        return Err(std::io::Error::last_os_error());
    }
    // SAFETY: `fd` is a fresh descriptor that nothing else owns.
    Ok(unsafe { OwnedFd::from_raw_fd(fd) })
}

impl Queue {
    fn wake(&self) {
        if self.mode == PersisterMode::Inline {
            self.notify.notify_one();
            return;
        }
        // eventfd counters are host-endian by definition (eventfd(2)).
        #[allow(clippy::host_endian_bytes)]
        let one = 1u64.to_ne_bytes();
        // SAFETY: writes 8 bytes from a live stack array to an eventfd we own.
        let n = unsafe { libc::write(self.eventfd.as_raw_fd(), one.as_ptr().cast(), 8) };
        debug_assert_eq!(n, 8);
    }
}

/// Handle to the persister; dropping it (or `shutdown`) drains the queue and stops it.
pub struct Persister {
    queue: Arc<Queue>,
    thread: Option<JoinHandle<()>>,
    task: Mutex<Option<tokio::task::JoinHandle<()>>>,
}

impl Persister {
    /// Starts the thread. `end` and `next_sequence` come from the recovery scan.
    pub fn start(
        journal: JournalFiles,
        end: Position,
        next_sequence: u64,
        segments: SharedSegments,
        config: PersisterConfig,
    ) -> std::io::Result<Self> {
        assert!(config.inflight_groups_max >= 1);
        assert!(config.inflight_groups_max <= INFLIGHT_GROUPS_MAX);
        let queue = Arc::new(Queue {
            items: Mutex::new(Vec::new()),
            mode: config.mode,
            eventfd: new_eventfd(0)?,
            notify: tokio::sync::Notify::new(),
            closed: AtomicBool::new(false),
        });
        let ring = IoUring::new(4 * INFLIGHT_GROUPS_MAX as u32 + 4)?;
        let mut worker = Worker::new(
            journal,
            end,
            next_sequence,
            segments,
            config,
            ring,
            queue.clone(),
        );
        if config.mode == PersisterMode::Inline {
            // Must be called on the runtime that will drive the task.
            let completions = new_eventfd(libc::EFD_NONBLOCK)?;
            worker
                .ring
                .submitter()
                .register_eventfd(completions.as_raw_fd())?;
            // SAFETY: the OwnedFd moves into the AsyncFd, stays open and is never replaced
            // while the AsyncFd owns it.
            let completions = unsafe { tokio::io::unix::AsyncFd::register(completions) }
                .map_err(|e| std::io::Error::other(e.to_string()))?;
            let task = tokio::spawn(async move { worker.run_inline(completions).await });
            return Ok(Self {
                queue,
                thread: None,
                task: Mutex::new(Some(task)),
            });
        }
        let thread = std::thread::Builder::new()
            .name("persister".into())
            .spawn(move || worker.run())?;
        Ok(Self {
            queue,
            thread: Some(thread),
            task: Mutex::new(None),
        })
    }

    /// Stops taking batches, waits for everything queued to be persisted and acknowledged,
    /// and stops the persister. Inline mode must be shut down this way before its runtime
    /// goes away.
    pub async fn shutdown(&self) {
        self.queue.closed.store(true, Ordering::Release);
        self.queue.wake();
        let task = self.task.lock().expect("task lock").take();
        if let Some(task) = task {
            let _ = task.await;
        }
    }

    /// Queues a batch. After shutdown began, the batch is refused with `ShuttingDown`.
    pub fn submit(&self, request: PersistRequest) {
        if self.queue.closed.load(Ordering::Acquire) {
            (request.reply)(Err(ErrorReply::new(
                ErrorCode::ShuttingDown,
                "node is shutting down",
            )));
            return;
        }
        self.queue.items.lock().expect("queue lock").push(request);
        self.queue.wake();
    }
}

impl Drop for Persister {
    fn drop(&mut self) {
        self.queue.closed.store(true, Ordering::Release);
        self.queue.wake();
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
    }
}

/// One block group between submission and acknowledgement.
struct Slot {
    sequence: u64,
    position: Position,
    requests: Vec<PersistRequest>,
    /// Offset of each request's body within the group, in request order.
    body_offsets: Vec<u64>,
    buf: AlignedBuf,
    pending_completions: u32,
}

const KIND_EVENTFD: u64 = 0;
const KIND_WRITE: u64 = 1;
const KIND_SYNC: u64 = 2;

fn user_data(slot: usize, kind: u64) -> u64 {
    ((slot as u64) << 2) | kind
}

struct Worker {
    journal: JournalFiles,
    position: Position,
    next_sequence: u64,
    segments: SharedSegments,
    config: PersisterConfig,
    ring: IoUring,
    queue: Arc<Queue>,
    slots: Vec<Option<Slot>>,
    free_bufs: Vec<AlignedBuf>,
    /// Slot indices in journal order.
    order: VecDeque<usize>,
    /// Requests taken from the queue that did not fit the last group.
    carry: VecDeque<PersistRequest>,
    eventfd_armed: bool,
    eventfd_buf: Box<[u8; 8]>,
    journal_full_logged: bool,
}

impl Worker {
    fn new(
        journal: JournalFiles,
        position: Position,
        next_sequence: u64,
        segments: SharedSegments,
        config: PersisterConfig,
        ring: IoUring,
        queue: Arc<Queue>,
    ) -> Self {
        let n = config.inflight_groups_max;
        Self {
            journal,
            position,
            next_sequence,
            segments,
            config,
            ring,
            queue,
            slots: (0..n).map(|_| None).collect(),
            free_bufs: (0..n).map(|_| AlignedBuf::new(GROUP_BYTES_MAX)).collect(),
            order: VecDeque::with_capacity(n),
            carry: VecDeque::new(),
            eventfd_armed: false,
            eventfd_buf: Box::new([0; 8]),
            journal_full_logged: false,
        }
    }

    fn run(&mut self) {
        loop {
            self.gather_and_submit();
            let closed = self.queue.closed.load(Ordering::Acquire);
            if closed && self.order.is_empty() && self.carry.is_empty() && self.queue_is_empty() {
                break;
            }
            if !self.eventfd_armed && !closed {
                self.arm_eventfd();
            }
            if let Err(e) = self.ring.submit_and_wait(1) {
                if e.kind() == std::io::ErrorKind::Interrupted {
                    continue;
                }
                fatal(&format!("io_uring submit failed: {e}"));
            }
            self.reap();
            self.release_done();
        }
        // The eventfd read may still be pending: wake it so the kernel lets go of its buffer.
        if self.eventfd_armed {
            self.queue.wake();
            while self.eventfd_armed {
                let _ = self.ring.submit_and_wait(1);
                self.reap();
            }
        }
    }

    /// The loop of inline mode: submit what is queued, then sleep until a batch arrives or
    /// the ring posts a completion (its registered eventfd turns readable).
    async fn run_inline(mut self, completions: tokio::io::unix::AsyncFd<OwnedFd>) {
        loop {
            self.gather_and_submit();
            if let Err(e) = self.ring.submit()
                && e.kind() != std::io::ErrorKind::Interrupted
            {
                fatal(&format!("io_uring submit failed: {e}"));
            }
            self.reap();
            self.release_done();
            let closed = self.queue.closed.load(Ordering::Acquire);
            if closed && self.order.is_empty() && self.carry.is_empty() && self.queue_is_empty() {
                return;
            }
            tokio::select! {
                ready = completions.readable() => {
                    let mut guard = ready.expect("the completion eventfd stays registered");
                    let mut counter = [0u8; 8];
                    // SAFETY: reads at most 8 bytes into a live stack array; a non-blocking
                    // eventfd with nothing to read just returns EAGAIN.
                    unsafe { libc::read(completions.as_raw_fd(), counter.as_mut_ptr().cast(), 8) };
                    guard.clear_ready();
                }
                () = self.queue.notify.notified() => {}
            }
        }
    }

    fn queue_is_empty(&self) -> bool {
        self.queue.items.lock().expect("queue lock").is_empty()
    }

    fn arm_eventfd(&mut self) {
        let fd = types::Fd(self.queue.eventfd.as_raw_fd());
        let read = opcode::Read::new(fd, self.eventfd_buf.as_mut_ptr(), 8)
            .build()
            .user_data(user_data(0, KIND_EVENTFD));
        // SAFETY: `eventfd_buf` is owned by this worker and lives until the read completes:
        // `run` does not return while `eventfd_armed` is set.
        unsafe {
            self.ring
                .submission()
                .push(&read)
                .expect("ring sized for every slot")
        };
        self.eventfd_armed = true;
    }

    /// Takes queued requests and submits groups while slots are free.
    fn gather_and_submit(&mut self) {
        while self.order.len() < self.config.inflight_groups_max {
            if self.carry.is_empty() {
                let taken = std::mem::take(&mut *self.queue.items.lock().expect("queue lock"));
                self.carry.extend(taken);
            }
            if self.carry.is_empty() {
                return;
            }
            self.submit_group();
        }
    }

    fn submit_group(&mut self) {
        let mut buf = self.free_bufs.pop().expect("a free buffer per free slot");
        buf.clear();
        buf.extend_from_slice(&[0; GROUP_HEADER_BYTES]);
        let mut requests = Vec::new();
        let mut body_offsets = Vec::new();
        while let Some(request) = self.carry.front() {
            let need = format::entry_bytes(request.body.len());
            if buf.len() + need > GROUP_BYTES_MAX - DIRECT_IO_ALIGN {
                break;
            }
            let request = self.carry.pop_front().expect("front checked above");
            body_offsets.push((buf.len() + 4) as u64);
            format::push_entry(&mut buf, &request.body);
            requests.push(request);
        }
        assert!(!requests.is_empty(), "a frame always fits an empty group");
        let payload_len = buf.len() - GROUP_HEADER_BYTES;
        let entry_count = u32::try_from(requests.len()).expect("bounded by group size");
        buf.pad_to_alignment();
        let Some(position) = self.allocate(buf.len() as u64) else {
            self.free_bufs.push(buf);
            if !self.journal_full_logged {
                self.journal_full_logged = true;
                tracing::error!(
                    "journal is full ({} files of {} bytes): refusing appends until space is \
                     freed (garbage collection is not implemented yet)",
                    self.journal.files.len(),
                    self.journal.file_bytes
                );
            }
            for request in requests {
                (request.reply)(Err(ErrorReply::new(
                    ErrorCode::JournalFull,
                    "journal is full: no journal file has room for this batch",
                )));
            }
            return;
        };
        let sequence = self.next_sequence;
        self.next_sequence += 1;
        let (header, payload) = buf.as_mut_full().split_at_mut(GROUP_HEADER_BYTES);
        format::encode_header(sequence, entry_count, &payload[..payload_len], header);
        let slot = self
            .slots
            .iter()
            .position(Option::is_none)
            .expect("a slot per free buffer");
        let pending_completions = self.push_group_sqes(&buf, position, slot);
        // The buffer moves into the slot; its heap allocation, which the kernel reads, does
        // not move and is released only after both completions (see `reap`).
        self.slots[slot] = Some(Slot {
            sequence,
            position,
            requests,
            body_offsets,
            buf,
            pending_completions,
        });
        self.order.push_back(slot);
    }

    /// Where the next group of `len` bytes goes, moving to the next file if it does not fit.
    fn allocate(&mut self, len: u64) -> Option<Position> {
        assert!(len.is_multiple_of(DIRECT_IO_ALIGN as u64));
        if self.position.offset + len > self.journal.file_bytes {
            if self.position.file as usize + 1 >= self.journal.files.len() {
                return None;
            }
            self.position = Position {
                file: self.position.file + 1,
                offset: 0,
            };
            if len > self.journal.file_bytes {
                return None;
            }
        }
        let at = self.position;
        self.position.offset += len;
        Some(at)
    }

    /// Pushes the write (and its linked sync) of a group; returns how many completions the
    /// slot must see before the group is durable.
    fn push_group_sqes(&mut self, buf: &AlignedBuf, position: Position, slot: usize) -> u32 {
        let file = &self.journal.files[position.file as usize];
        let fd = types::Fd(file.as_raw_fd());
        let len = u32::try_from(buf.len()).expect("group fits u32");
        assert!((buf.as_ptr() as usize).is_multiple_of(DIRECT_IO_ALIGN));
        assert!(position.offset.is_multiple_of(DIRECT_IO_ALIGN as u64));
        let write = opcode::Write::new(fd, buf.as_ptr(), len).offset(position.offset);
        let entries = match self.config.sync_mode {
            SyncMode::LinkedFdatasync => vec![
                // A successful write posts no completion, so the persister wakes once per
                // group (for the sync), not twice. A failed or short write breaks the link:
                // the sync then completes with -ECANCELED, which is fatal like any error.
                write
                    .build()
                    .flags(squeue::Flags::IO_LINK | squeue::Flags::SKIP_SUCCESS)
                    .user_data(user_data(slot, KIND_WRITE)),
                opcode::Fsync::new(fd)
                    .flags(types::FsyncFlags::DATASYNC)
                    .build()
                    .user_data(user_data(slot, KIND_SYNC)),
            ],
            SyncMode::RwfDsync => vec![
                write
                    .rw_flags(libc::RWF_DSYNC)
                    .build()
                    .user_data(user_data(slot, KIND_WRITE)),
            ],
        };
        for entry in &entries {
            // SAFETY: the buffer is owned by slot `slot` from now until both completions
            // have been reaped, and the journal files live as long as the worker.
            unsafe {
                self.ring
                    .submission()
                    .push(entry)
                    .expect("ring sized for every slot")
            };
        }
        1 // One completion per group: the sync's, or the RWF_DSYNC write's.
    }

    /// Handles every available completion.
    fn reap(&mut self) {
        let completions: Vec<(u64, i32)> = self
            .ring
            .completion()
            .map(|cqe| (cqe.user_data(), cqe.result()))
            .collect();
        for (data, result) in completions {
            let kind = data & 3;
            if kind == KIND_EVENTFD {
                self.eventfd_armed = false;
                continue;
            }
            let index = (data >> 2) as usize;
            let slot = self.slots[index]
                .as_mut()
                .expect("completion for a live slot");
            if result < 0 {
                let error = std::io::Error::from_raw_os_error(-result);
                fatal(&format!("journal group {} failed: {error}", slot.sequence));
            }
            if kind == KIND_WRITE && result as usize != slot.buf.len() {
                fatal(&format!(
                    "journal group {}: short write of {result} bytes",
                    slot.sequence
                ));
            }
            assert!(slot.pending_completions > 0);
            slot.pending_completions -= 1;
        }
    }

    /// Acknowledges durable groups from the front of the journal order.
    fn release_done(&mut self) {
        while let Some(&index) = self.order.front() {
            let done = self.slots[index]
                .as_ref()
                .is_some_and(|s| s.pending_completions == 0);
            if !done {
                return;
            }
            self.order.pop_front();
            let slot = self.slots[index].take().expect("checked above");
            self.free_bufs.push(slot.buf);
            let mut replies = Vec::with_capacity(slot.requests.len());
            {
                let mut segments = self.segments.lock().expect("segments lock");
                for (request, body_offset) in slot.requests.into_iter().zip(slot.body_offsets) {
                    let segment = segments.entry(request.segment).or_default();
                    let mut scl = segment.scl();
                    let at = slot.position.offset + body_offset;
                    for record in &request.records {
                        scl = segment.observe(&record.durable(slot.position.file, at));
                    }
                    replies.push((request.reply, scl));
                }
            }
            for (reply, scl) in replies {
                reply(Ok(scl));
            }
        }
    }
}

fn fatal(message: &str) -> ! {
    tracing::error!("{message}; stopping: the journal on disk is the truth, restart to recover");
    eprintln!("sixfold-node: fatal: {message}");
    std::process::abort();
}
