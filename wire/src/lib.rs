//! Formats shared by every Sixfold process: LSNs, log records, messages and the redo
//! applicator.
//!
//! Invariants of this crate:
//! - no I/O, no async, no clock: everything here is a pure function of its inputs;
//! - every byte layout is little-endian and documented with an offset diagram;
//! - decoding untrusted bytes never panics and never allocates more than the frame limit
//!   ([`frame::FRAME_BYTES_MAX`]); encoding cannot fail.
#![deny(clippy::indexing_slicing)]
#![deny(clippy::disallowed_methods)]
#![deny(clippy::undocumented_unsafe_blocks)]

/// ALPN protocol of every Sixfold QUIC connection, engine to node and node to node.
pub const ALPN: &[u8] = b"sixfold/1";
/// Largest UDP payload QUIC MTU discovery may try on either side: a 9000-byte (jumbo frame)
/// MTU less IPv6 and UDP headers, so a 4 KiB record travels in one datagram.
pub const JUMBO_UDP_PAYLOAD_BYTES: u16 = 8952;

pub mod apply;
pub mod backup;
pub mod codec;
pub mod frame;
pub mod geometry;
pub mod record;
pub mod types;

pub use apply::{ApplyError, PageImage, apply_record, apply_records};
pub use codec::DecodeError;
pub use frame::{
    Append, AppendHeader, AppendView, ErrorCode, ErrorReply, FRAME_BYTES_MAX, Fence, FetchPages,
    FetchRecords, Frame, HostSegments, Message, PageReply, Pages, PeerNode, PgPlacement, ReadPage,
    Records, SegmentAck, SegmentState, SetPgmrpl, Truncate, TruncationRange, VolumeState,
};
pub use geometry::{Geometry, PG_SIZE, READ_QUORUM, WRITE_QUORUM};
pub use record::{LogRecord, RECORD_HEADER_BYTES, RecordMeta, RedoOp};
pub use types::{Epoch, Lsn, PageId, PgId, Role, SegmentIndex, VolumeId};
