//! The node's I/O, behind small traits, so the protocol ([`crate::core::NodeCore`]) never
//! touches a file and a simulator can bring its own disks:
//!
//! - [`JournalIo`]: durable writes of journal block groups — `uring` (io_uring, O_DIRECT, on
//!   the runtime thread or a thread of its own) and `std_fs` (`pwrite` + `fdatasync`);
//! - [`ManifestStore`]: the manifest's atomic replacement (`manifest`);
//! - [`RecordReader`]: records read back from the journal for reads and fetches (`reader`);
//! - [`Clock`]: the time the core is given.
//!
//! Invariants: an I/O implementation completes operations and reports their outcome; it never
//! touches protocol state. Every buffer handed to the kernel for an O_DIRECT write is aligned
//! to [`DIRECT_IO_ALIGN`] in address and length, and stays owned by the operation until its
//! completion arrives.

pub mod aligned;
pub mod manifest;
pub mod raw;
pub mod reader;
pub mod std_fs;
pub mod thread;
pub mod uring;

use std::future::Future;
use std::time::Instant;

pub use aligned::{AlignedBuf, DIRECT_IO_ALIGN};
pub use manifest::{FileManifestStore, ManifestStore};
pub use reader::{JournalReader, MemRecords, RecordReader};

use crate::core::{GroupId, PersistGroup};
use crate::journal::format::{self, GROUP_HEADER_BYTES};

/// The outcome of one group's durable write.
#[derive(Debug)]
pub struct GroupOutcome {
    pub group: GroupId,
    pub result: std::io::Result<()>,
}

/// Durable writes of journal block groups.
pub trait JournalIo: Send {
    /// Starts the durable write of `group` (its bytes as [`encode_group`] lays them out, at
    /// its position). Never waits for the device. An error is fatal for the node.
    fn submit(&mut self, group: PersistGroup) -> std::io::Result<()>;
    /// Hands everything submitted to the device (one system call for many groups), leaving
    /// nothing queued: no later call may be needed for a write to start.
    fn flush(&mut self) -> std::io::Result<()>;
    /// Moves the outcome of every finished write to `out`, in any order.
    fn reap(&mut self, out: &mut Vec<GroupOutcome>);
    /// Resolves when `reap` may have something new.
    fn ready(&mut self) -> impl Future<Output = ()> + Send;
}

/// Lays `group` out in `buf` as one journal block group: header, entries, zero padding.
pub fn encode_group(group: &PersistGroup, buf: &mut AlignedBuf) {
    assert!(!group.entries.is_empty(), "a group carries entries");
    buf.clear();
    buf.extend_from_slice(&[0; GROUP_HEADER_BYTES]);
    for body in &group.entries {
        format::push_entry(buf, body);
    }
    let payload_len = buf.len() - GROUP_HEADER_BYTES;
    let entry_count = u32::try_from(group.entries.len()).expect("bounded by the group size");
    buf.pad_to_alignment();
    let (header, rest) = buf.as_mut_full().split_at_mut(GROUP_HEADER_BYTES);
    let payload = rest.get(..payload_len).expect("within the buffer");
    format::encode_header(group.sequence, entry_count, payload, header);
    // Paired with the core's sizing: the group occupies exactly what the core allocated.
    assert!(buf.len() == group.bytes, "group laid out as sized");
}

/// The time as the core is given it.
pub trait Clock: Send + Sync {
    fn now(&self) -> Instant;
}

/// The operating system's monotonic clock.
#[derive(Clone, Copy, Debug, Default)]
pub struct SystemClock;

impl Clock for SystemClock {
    fn now(&self) -> Instant {
        Instant::now()
    }
}
