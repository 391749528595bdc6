//! The io_uring journal writer: each group is one 4 KiB-aligned O_DIRECT write, made durable
//! by `RWF_DSYNC` or by a linked `fdatasync`, with up to `inflight_groups_max` groups in
//! flight. It runs inline (driven from the node's runtime thread, woken by the ring's
//! registered eventfd) or on a thread of its own (woken by an eventfd read armed in its ring).
//!
//! Invariants:
//! - each buffer given to the kernel stays owned by its slot until the slot's last completion
//!   has arrived (`user_data` is a slot index and a kind, never a pointer); dropping the writer
//!   waits for every write in flight (or leaks its buffers if the ring is broken);
//! - a group's outcome is reported once, after its last completion: success only if the write
//!   wrote every byte and the data is durable.

use std::fs::File;
use std::io;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};

use io_uring::{IoUring, opcode, squeue, types};

use super::thread::{Completions, ThreadJournal, WorkQueue};
use super::{AlignedBuf, DIRECT_IO_ALIGN, GroupOutcome, JournalIo, encode_group};
use crate::config::SyncMode;
use crate::core::{GroupId, PersistGroup};
use crate::journal::INFLIGHT_GROUPS_MAX;
use crate::journal::format::GROUP_BYTES_MAX;

/// Submission queue entries: two per group (write and sync) for every slot, and the eventfd
/// read of thread mode.
const RING_ENTRIES: u32 = 4 * INFLIGHT_GROUPS_MAX as u32 + 4;

/// Times `flush` asks the kernel to take every queued entry before it gives up.
const SUBMIT_ATTEMPTS_MAX: usize = 1000;

const KIND_EVENTFD: u64 = 0;
const KIND_WRITE: u64 = 1;
const KIND_SYNC: u64 = 2;

fn user_data(slot: usize, kind: u64) -> u64 {
    ((slot as u64) << 2) | kind
}

/// One group between submission and its last completion.
struct Slot {
    group: GroupId,
    buf: AlignedBuf,
    /// Completions still to come.
    pending: u32,
    failure: Option<io::Error>,
}

/// The io_uring journal writer.
pub struct UringJournal {
    ring: IoUring,
    files: Vec<File>,
    sync: SyncMode,
    slots: Vec<Option<Slot>>,
    free_bufs: Vec<AlignedBuf>,
    done: Vec<GroupOutcome>,
    /// Inline mode: the ring's registered eventfd, readable once completions are posted.
    completions: Option<tokio::io::unix::AsyncFd<OwnedFd>>,
    /// Whether entries were pushed since the last `flush` (an empty `io_uring_enter` is a
    /// system call for nothing).
    unsubmitted: bool,
    /// Thread mode: whether the wake-up read on the work queue's eventfd is in the ring.
    eventfd_armed: bool,
    eventfd_buf: Box<[u8; 8]>,
}

fn new_eventfd(flags: libc::c_int) -> io::Result<OwnedFd> {
    // SAFETY: eventfd has no memory preconditions; the result is checked below.
    let fd = unsafe { libc::eventfd(0, libc::EFD_CLOEXEC | flags) };
    if fd < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: `fd` is a fresh descriptor that nothing else owns.
    Ok(unsafe { OwnedFd::from_raw_fd(fd) })
}

impl UringJournal {
    /// A writer over the journal `files` (O_DIRECT, indexed by file number).
    pub fn new(files: Vec<File>, sync: SyncMode, inflight_groups_max: usize) -> io::Result<Self> {
        assert!(inflight_groups_max >= 1);
        assert!(inflight_groups_max <= INFLIGHT_GROUPS_MAX);
        let n = inflight_groups_max;
        Ok(Self {
            ring: IoUring::new(RING_ENTRIES)?,
            files,
            sync,
            slots: (0..n).map(|_| None).collect(),
            free_bufs: (0..n).map(|_| AlignedBuf::new(GROUP_BYTES_MAX)).collect(),
            done: Vec::new(),
            completions: None,
            unsubmitted: false,
            eventfd_armed: false,
            eventfd_buf: Box::new([0; 8]),
        })
    }

    /// A writer driven from the calling tokio runtime (call it inside that runtime).
    pub fn inline(
        files: Vec<File>,
        sync: SyncMode,
        inflight_groups_max: usize,
    ) -> io::Result<Self> {
        let mut journal = Self::new(files, sync, inflight_groups_max)?;
        let eventfd = new_eventfd(libc::EFD_NONBLOCK)?;
        journal
            .ring
            .submitter()
            .register_eventfd(eventfd.as_raw_fd())?;
        // SAFETY: the OwnedFd moves into the AsyncFd, stays open and is never replaced while
        // the AsyncFd owns it.
        let completions = unsafe { tokio::io::unix::AsyncFd::register(eventfd) }?;
        journal.completions = Some(completions);
        Ok(journal)
    }

    /// A writer on a thread of its own.
    pub fn on_thread(
        files: Vec<File>,
        sync: SyncMode,
        inflight_groups_max: usize,
    ) -> io::Result<ThreadJournal> {
        let journal = Self::new(files, sync, inflight_groups_max)?;
        ThreadJournal::spawn(
            "journal-uring",
            Some(new_eventfd(0)?),
            move |queue, completions| {
                journal.run_thread(queue, completions);
            },
        )
    }

    fn in_flight(&self) -> usize {
        self.slots.iter().filter(|s| s.is_some()).count()
    }

    /// Lays the group out in a free buffer and pushes its write (and linked sync).
    fn push_group(&mut self, group: &PersistGroup) {
        let slot = self
            .slots
            .iter()
            .position(Option::is_none)
            .expect("the core keeps at most inflight_groups_max groups in flight");
        let mut buf = self.free_bufs.pop().expect("a free buffer per free slot");
        encode_group(group, &mut buf);
        let file = self
            .files
            .get(group.position.file as usize)
            .expect("the core places groups in existing files");
        let fd = types::Fd(file.as_raw_fd());
        let len = u32::try_from(buf.len()).expect("group fits u32");
        assert!((buf.as_ptr() as usize).is_multiple_of(DIRECT_IO_ALIGN));
        assert!(group.position.offset.is_multiple_of(DIRECT_IO_ALIGN as u64));
        let write = opcode::Write::new(fd, buf.as_ptr(), len).offset(group.position.offset);
        let entries = match self.sync {
            SyncMode::Fdatasync => vec![
                // A successful write posts no completion, so the ring wakes once per group
                // (for the sync). A failed or short write posts its error and breaks the
                // link: the sync then completes with -ECANCELED.
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
            // SAFETY: the buffer moves into slot `slot` below and stays there until its last
            // completion has been reaped (its heap allocation, which the kernel reads, does
            // not move); the journal files live as long as the writer.
            unsafe {
                self.ring
                    .submission()
                    .push(entry)
                    .expect("ring sized for every slot");
            }
        }
        self.unsubmitted = true;
        self.slots[slot] = Some(Slot {
            group: group.id,
            buf,
            pending: 1, // The sync's completion, or the RWF_DSYNC write's.
            failure: None,
        });
    }

    /// Handles every completion posted.
    fn reap_cqes(&mut self) {
        let cqes: Vec<(u64, i32)> = self
            .ring
            .completion()
            .map(|cqe| (cqe.user_data(), cqe.result()))
            .collect();
        for (data, result) in cqes {
            let kind = data & 3;
            if kind == KIND_EVENTFD {
                self.eventfd_armed = false;
                continue;
            }
            self.complete(
                usize::try_from(data >> 2).expect("slot index"),
                kind,
                result,
            );
        }
    }

    fn complete(&mut self, index: usize, kind: u64, result: i32) {
        let linked = self.sync == SyncMode::Fdatasync;
        let slot = self.slots[index]
            .as_mut()
            .expect("completion for a live slot");
        assert!(slot.pending > 0, "no completion beyond those expected");
        let failure = if result < 0 {
            Some(io::Error::from_raw_os_error(-result))
        } else if kind == KIND_WRITE && result as usize != slot.buf.len() {
            Some(io::Error::other(format!("short write of {result} bytes")))
        } else {
            None
        };
        if slot.failure.is_none() {
            slot.failure = failure;
        }
        // Under a link, a write completion is always a failure, and the cancelled sync's
        // completion still follows: the buffer is released with that one.
        if !(linked && kind == KIND_WRITE) {
            slot.pending -= 1;
        }
        if slot.pending == 0 {
            let slot = self.slots[index].take().expect("checked above");
            self.free_bufs.push(slot.buf);
            let result = slot.failure.map_or(Ok(()), Err);
            self.done.push(GroupOutcome {
                group: slot.group,
                result,
            });
        }
    }

    /// Arms a read of the work queue's eventfd, so a new group wakes the ring's waiter.
    fn arm_eventfd(&mut self, fd: &OwnedFd) {
        let read = opcode::Read::new(types::Fd(fd.as_raw_fd()), self.eventfd_buf.as_mut_ptr(), 8)
            .build()
            .user_data(user_data(0, KIND_EVENTFD));
        // SAFETY: `eventfd_buf` is owned by this writer and lives until the read completes:
        // `run_thread` does not return while `eventfd_armed` is set.
        unsafe {
            self.ring
                .submission()
                .push(&read)
                .expect("ring sized for every slot");
        }
        self.eventfd_armed = true;
    }

    /// Thread mode: take queued groups, submit, sleep in the ring until a completion or a new
    /// group arrives; until the queue is closed and everything has completed.
    fn run_thread(mut self, queue: &WorkQueue, completions: &Completions) {
        let eventfd = queue
            .eventfd()
            .expect("thread mode wakes through an eventfd");
        loop {
            for group in queue.take() {
                self.push_group(&group);
            }
            let closed = queue.is_closed();
            if closed && self.in_flight() == 0 && queue.is_empty() {
                break;
            }
            if !self.eventfd_armed && !closed {
                self.arm_eventfd(eventfd);
            }
            if let Err(e) = self.ring.submit_and_wait(1)
                && e.kind() != io::ErrorKind::Interrupted
            {
                // Fatal for the node: report every group in flight failed and stop here
                // (`Drop` keeps what the kernel may still use).
                for outcome in self.fail_all(&e) {
                    completions.push(outcome);
                }
                return;
            }
            self.reap_cqes();
            for outcome in self.done.drain(..) {
                completions.push(outcome);
            }
        }
        // The eventfd read may still be pending: wake it so the kernel lets go of its buffer.
        while self.eventfd_armed {
            // eventfd counters are host-endian by definition (eventfd(2)).
            #[allow(clippy::host_endian_bytes)]
            let one = 1u64.to_ne_bytes();
            // SAFETY: writes 8 bytes from a live stack array to an eventfd we own.
            unsafe { libc::write(eventfd.as_raw_fd(), one.as_ptr().cast(), 8) };
            let _ = self.ring.submit_and_wait(1);
            self.reap_cqes();
        }
    }

    /// The ring itself failed: the outcome of every group in flight is that failure (their
    /// buffers stay in their slots until the kernel lets go of them, see `Drop`).
    fn fail_all(&self, e: &io::Error) -> Vec<GroupOutcome> {
        let failed: Vec<GroupOutcome> = self
            .slots
            .iter()
            .flatten()
            .map(|slot| GroupOutcome {
                group: slot.group,
                result: Err(io::Error::new(e.kind(), format!("io_uring submit: {e}"))),
            })
            .collect();
        assert!(failed.len() == self.in_flight());
        failed
    }
}

impl JournalIo for UringJournal {
    fn submit(&mut self, group: PersistGroup) -> io::Result<()> {
        self.push_group(&group);
        Ok(())
    }

    fn flush(&mut self) -> io::Result<()> {
        if !std::mem::take(&mut self.unsubmitted) {
            return Ok(());
        }
        // Interrupted before the kernel took the entries, or it took only some (it may stop
        // early when it cannot allocate a request): try again at once. An entry left in the
        // queue would wait for the next group's flush, and with every append waiting on this
        // group's ack there may never be one: the node would sit idle for good. After
        // SUBMIT_ATTEMPTS_MAX tries it is a fatal error, which the node reports.
        for _ in 0..SUBMIT_ATTEMPTS_MAX {
            match self.ring.submit() {
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => return Err(e),
                Ok(_) if self.ring.submission().is_empty() => return Ok(()),
                Ok(_) => std::thread::yield_now(),
            }
        }
        let left = self.ring.submission().len();
        Err(io::Error::other(format!(
            "io_uring left {left} journal writes unsubmitted after {SUBMIT_ATTEMPTS_MAX} tries"
        )))
    }

    fn reap(&mut self, out: &mut Vec<GroupOutcome>) {
        self.reap_cqes();
        out.append(&mut self.done);
    }

    fn ready(&mut self) -> impl std::future::Future<Output = ()> + Send {
        let completions = self.completions.as_ref();
        async move {
            let Some(fd) = completions else {
                return std::future::pending().await;
            };
            let Ok(mut guard) = fd.readable().await else {
                return; // The reactor is gone: nothing more will be posted.
            };
            let mut counter = [0u8; 8];
            // SAFETY: reads at most 8 bytes into a live stack array; a non-blocking eventfd
            // with nothing to read just returns EAGAIN. Reading before clearing readiness,
            // and reaping after both, loses no wake-up.
            unsafe { libc::read(fd.as_raw_fd(), counter.as_mut_ptr().cast(), 8) };
            guard.clear_ready();
        }
    }
}

impl Drop for UringJournal {
    fn drop(&mut self) {
        // The kernel may still read from buffers in flight: wait for their completions.
        let mut attempts = 0;
        while self.in_flight() > 0 && attempts < 1000 {
            if let Err(e) = self.ring.submit_and_wait(1)
                && e.kind() != io::ErrorKind::Interrupted
            {
                attempts += 1;
            }
            self.reap_cqes();
        }
        if self.in_flight() > 0 {
            // The ring is broken: leak the buffers rather than free memory the kernel uses.
            std::mem::forget(std::mem::take(&mut self.slots));
        }
        if self.eventfd_armed {
            std::mem::forget(std::mem::take(&mut self.eventfd_buf));
        }
    }
}
