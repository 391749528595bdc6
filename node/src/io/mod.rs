//! Disk I/O for the node: O_DIRECT-aligned buffers and the io_uring persister ring.
//!
//! Invariants: every buffer handed to the kernel for an O_DIRECT write is aligned to
//! [`DIRECT_IO_ALIGN`] in address and length, and stays owned by the operation until its
//! completion arrives.

pub mod aligned;
pub mod raw;

pub use aligned::{AlignedBuf, DIRECT_IO_ALIGN};
