//! A journal writer on a thread of its own: groups go to the thread through a work queue, and
//! outcomes come back through a completion list that wakes the driver.
//!
//! Invariants: every group handed to the thread gets exactly one outcome (a closed queue's
//! leftovers are still written before the thread ends); dropping the handle closes the queue
//! and joins the thread, so no write outlives its journal.

use std::collections::VecDeque;
use std::os::fd::{AsRawFd, OwnedFd};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Condvar, Mutex};
use std::thread::JoinHandle;

use super::{GroupOutcome, JournalIo};
use crate::core::PersistGroup;

/// Groups waiting for the writer thread.
pub struct WorkQueue {
    items: Mutex<VecDeque<PersistGroup>>,
    cond: Condvar,
    closed: AtomicBool,
    /// Written on every wake, for a writer that sleeps in its io_uring ring rather than on the
    /// condition variable.
    eventfd: Option<OwnedFd>,
}

impl WorkQueue {
    /// Takes everything queued.
    pub fn take(&self) -> VecDeque<PersistGroup> {
        std::mem::take(&mut *self.items.lock().expect("work queue lock"))
    }

    /// Waits until something is queued or the queue is closed; returns what is queued.
    pub fn wait(&self) -> VecDeque<PersistGroup> {
        let mut items = self.items.lock().expect("work queue lock");
        while items.is_empty() && !self.is_closed() {
            items = self.cond.wait(items).expect("work queue lock");
        }
        std::mem::take(&mut *items)
    }

    pub fn is_closed(&self) -> bool {
        self.closed.load(Ordering::Acquire)
    }

    pub fn is_empty(&self) -> bool {
        self.items.lock().expect("work queue lock").is_empty()
    }

    /// The eventfd a ring-sleeping writer arms a read on.
    pub fn eventfd(&self) -> Option<&OwnedFd> {
        self.eventfd.as_ref()
    }

    fn push(&self, group: PersistGroup) {
        self.items.lock().expect("work queue lock").push_back(group);
    }

    fn wake(&self) {
        self.cond.notify_one();
        if let Some(fd) = &self.eventfd {
            // eventfd counters are host-endian by definition (eventfd(2)).
            #[allow(clippy::host_endian_bytes)]
            let one = 1u64.to_ne_bytes();
            // SAFETY: writes 8 bytes from a live stack array to an eventfd we own.
            let n = unsafe { libc::write(fd.as_raw_fd(), one.as_ptr().cast(), 8) };
            debug_assert_eq!(n, 8);
        }
    }
}

/// Outcomes waiting for the driver.
#[derive(Default)]
pub struct Completions {
    outcomes: Mutex<Vec<GroupOutcome>>,
    notify: tokio::sync::Notify,
}

impl Completions {
    /// Reports one outcome and wakes the driver.
    pub fn push(&self, outcome: GroupOutcome) {
        self.outcomes
            .lock()
            .expect("completions lock")
            .push(outcome);
        self.notify.notify_one();
    }
}

/// The driver's handle on a writer thread.
pub struct ThreadJournal {
    queue: Arc<WorkQueue>,
    completions: Arc<Completions>,
    submitted: bool,
    thread: Option<JoinHandle<()>>,
}

impl ThreadJournal {
    /// Starts `worker` on a thread named `name`; it serves the queue until it is closed and
    /// empty. `eventfd` is written on every wake (see [`WorkQueue::eventfd`]).
    pub fn spawn(
        name: &str,
        eventfd: Option<OwnedFd>,
        worker: impl FnOnce(&WorkQueue, &Completions) + Send + 'static,
    ) -> std::io::Result<Self> {
        let queue = Arc::new(WorkQueue {
            items: Mutex::new(VecDeque::new()),
            cond: Condvar::new(),
            closed: AtomicBool::new(false),
            eventfd,
        });
        let completions = Arc::new(Completions::default());
        let (q, c) = (queue.clone(), completions.clone());
        let thread = std::thread::Builder::new()
            .name(name.into())
            .spawn(move || worker(&q, &c))?;
        Ok(Self {
            queue,
            completions,
            submitted: false,
            thread: Some(thread),
        })
    }
}

impl JournalIo for ThreadJournal {
    fn submit(&mut self, group: PersistGroup) -> std::io::Result<()> {
        assert!(!self.queue.is_closed(), "no submission after close");
        self.queue.push(group);
        self.submitted = true;
        Ok(())
    }

    fn flush(&mut self) -> std::io::Result<()> {
        if std::mem::take(&mut self.submitted) {
            self.queue.wake();
        }
        Ok(())
    }

    fn reap(&mut self, out: &mut Vec<GroupOutcome>) {
        out.append(&mut self.completions.outcomes.lock().expect("completions lock"));
    }

    fn ready(&mut self) -> impl std::future::Future<Output = ()> + Send {
        self.completions.notify.notified()
    }
}

impl Drop for ThreadJournal {
    fn drop(&mut self) {
        self.queue.closed.store(true, Ordering::Release);
        self.queue.wake();
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
    }
}
