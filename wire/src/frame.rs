//! Messages between engines and storage nodes, as length-prefixed, versioned frames.
//!
//! Frame layout (little-endian):
//!
//! ```text
//! offset  size  field
//!      0     4  len         bytes that follow this field (12 + body); 12 ≤ len ≤ FRAME_BYTES_MAX - 4
//!      4     1  version     FRAME_VERSION (1)
//!      5     1  kind        1 = Append, 2 = Ack, 3 = Error, 4 = ReadPage, 5 = Page,
//!                           6 = HostSegments, 7 = SetPgmrpl, 8 = Done, 9 = GetVolumeState,
//!                           10 = VolumeState, 11 = Fence, 12 = Truncate, 13 = FetchRecords,
//!                           14 = Records, 15 = FetchPages, 16 = Pages
//!      6     2  reserved    zero
//!      8     8  request_id  chosen by the sender of a request, echoed by its reply
//!     16     …  body        per kind, below
//! ```
//!
//! Append body (also the journal's entry format on a storage node):
//!
//! ```text
//!      0     8  volume
//!      8     8  epoch
//!     16     4  pg
//!     20     4  segment       index of the segment within its PG (0..6)
//!     24     4  record_count  ≥ 1
//!     28     4  reserved      zero
//!     32     8  vdl           the writer's VDL when it sent the batch: every record at or
//!                             below it is on a write quorum of its PG (recovery's floor)
//!     40     …  records       record_count log records back to back (see `record`)
//! ```
//!
//! The engine encodes a PG batch's records once and sends the same bytes to all six
//! segments behind six different Append headers ([`encode_append_frame`]); a node reads an
//! Append through [`AppendView`], which checks every record without copying any.
//!
//! Ack body: the segment's SCL once the batch is durable.
//!
//! ```text
//!      0     8  volume
//!      8     4  pg
//!     12     4  segment
//!     16     8  scl
//! ```
//!
//! Error body: a typed code and a sentence naming the problem.
//!
//! ```text
//!      0     2  code         see `ErrorCode`
//!      2     2  reserved     zero
//!      4     4  message_len  ≤ ERROR_MESSAGE_BYTES_MAX
//!      8     …  message      UTF-8
//! ```
//!
//! ReadPage body: the page as of exactly `read_point`; refused if the segment's SCL is below it.
//!
//! ```text
//!      0     8  volume
//!      8     8  epoch
//!     16     4  pg
//!     20     4  segment
//!     24     8  page
//!     32     8  read_point
//! ```
//!
//! Page body (reply to ReadPage):
//!
//! ```text
//!      0     8  page
//!      8     8  page_lsn     LSN of the last record applied (0: never written)
//!     16     4  len          page size in bytes, ≤ PAGE_BYTES_MAX
//!     20     4  crc32        of the page bytes
//!     24   len  bytes
//! ```
//!
//! HostSegments body: the segments of one volume a node is to host, and the volume geometry.
//!
//! ```text
//!      0     8  volume
//!      8     8  epoch
//!     16     4  page_size_bytes
//!     20     4  count         ≤ HOST_SEGMENTS_MAX
//!     24     8  pages_per_pg
//!     32     4  pg_count      PGs in the volume (0: not said)
//!     36     4  reserved      zero
//!     40     …  count × { u32 pg, u32 segment }
//!      …     4  node_count    ≤ PLACEMENT_NODES_MAX: the nodes the placement names
//!      …     …  node_count × { u16 name_len ≤ NODE_NAME_BYTES_MAX, name UTF-8,
//!                              u16 address_len ≤ NODE_ADDRESS_BYTES_MAX, address UTF-8
//!                              "ip:port" in the canonical form Rust's SocketAddr prints }
//!      …     4  pg_count      ≤ HOST_SEGMENTS_MAX: placements of the PGs hosted
//!      …     …  pg_count × { u32 pg, PG_SIZE × u16 node }   node: index into the node table
//! ```
//!
//! The placement tells a node where its PGs' other segments live, for gossip; a node and PG
//! count of 0 says nothing about peers (a node keeps what it knew).
//!
//! SetPgmrpl body: no read below `pgmrpl` will ever come for this PG. The writer at `epoch`
//! also says its VDL is at least `vdl` (0: it says nothing), which it does only to a node that
//! has installed its truncation: that node may coalesce up to it, even when no further Append
//! will come to carry the VDL (a writer gone quiet).
//!
//! ```text
//!      0     8  volume
//!      8     4  pg
//!     12     4  reserved     zero
//!     16     8  pgmrpl
//!     24     8  epoch
//!     32     8  vdl
//! ```
//!
//! Done body: empty (a request without a result succeeded).
//!
//! GetVolumeState body: what a node holds of a volume (read-only; any epoch).
//!
//! ```text
//!      0     8  volume
//! ```
//!
//! VolumeState body (reply to GetVolumeState, Fence and Truncate): the node's epoch for the
//! volume, the highest VDL it holds durably (from Append headers), the truncations it has
//! installed (newest last, at most TRUNCATIONS_MAX), and each hosted segment's SCL.
//!
//! ```text
//!      0     8  volume
//!      8     8  epoch
//!     16     8  vdl
//!     24     4  count         segments, ≤ HOST_SEGMENTS_MAX
//!     28     4  truncations   ≤ TRUNCATIONS_MAX
//!     32     …  truncations × { u64 annul_epoch, u64 after, u64 through }
//!      …     …  count × { u32 pg, u32 segment, u64 scl, u64 backed_up, u64 snapshot }
//! ```
//!
//! Fence body: install `epoch_new` if the node's epoch is at most `epoch_current` (the epoch
//! the writer saw); a node already at `epoch_new` answers as if it had just installed it.
//!
//! ```text
//!      0     8  volume
//!      8     8  epoch_current
//!     16     8  epoch_new
//! ```
//!
//! Truncate body: records of epochs older than `annul_epoch` with LSNs in `(after, through]`
//! are annulled for good. Sent by the writer of `epoch` (installed first if newer than the
//! node's; refused if older): its own truncation has `annul_epoch = epoch`; an older one it
//! forwards to a node that missed it keeps the `annul_epoch` it was made with.
//!
//! ```text
//!      0     8  volume
//!      8     8  epoch
//!     16     8  annul_epoch   ≤ epoch
//!     24     8  after         the VDL recovery found
//!     32     8  through       after + LAL
//! ```
//!
//! FetchRecords body: a segment's records with LSNs in `(after, through]`, in LSN order, up to
//! about `bytes_max` bytes of records (at least one record if any qualifies).
//!
//! ```text
//!      0     8  volume
//!      8     8  epoch
//!     16     4  pg
//!     20     4  segment
//!     24     8  after
//!     32     8  through
//!     40     4  bytes_max
//!     44     4  reserved      zero
//! ```
//!
//! Records body (reply to FetchRecords): the segment's SCL and the records found, each with
//! the epoch it was written with on the replying node (a copy keeps that epoch, so a
//! truncation annuls the copy exactly when it annuls the original).
//!
//! ```text
//!      0     8  volume
//!      8     4  pg
//!     12     4  segment
//!     16     8  scl
//!     24     4  record_count  may be 0
//!     28     4  reserved      zero
//!     32     …  record_count × u64 epoch
//!      …     …  records
//! ```
//!
//! FetchPages body: a segment's non-empty pages as of `read_point`, from page index
//! `from_index` (the page's position in its PG) on, up to about `bytes_max` bytes of pages (at
//! least one if any). `read_point` 0 asks for the replier's own materialized LSN (a point on
//! the PG's chain its page store can serve); the reply says which point it used. What a node
//! rebuilding a segment whose records left every peer's journal asks for.
//!
//! ```text
//!      0     8  volume
//!      8     8  epoch
//!     16     4  pg
//!     20     4  segment
//!     24     8  read_point
//!     32     8  from_index
//!     40     4  bytes_max
//!     44     4  reserved      zero
//! ```
//!
//! Pages body (reply to FetchPages): the read point used, where the next request starts
//! (`u64::MAX`: no page left), and the pages, each laid out as a Page body.
//!
//! ```text
//!      0     8  volume
//!      8     4  pg
//!     12     4  segment
//!     16     8  read_point
//!     24     8  next_index
//!     32     4  page_count    may be 0
//!     36     4  reserved      zero
//!     40     …  page_count × (page, page_lsn, len, crc32, bytes)
//! ```
//!
//! A reader checks `len` against [`FRAME_BYTES_MAX`] before allocating anything, so a peer
//! cannot make us allocate more than one frame's worth.

use crate::codec::{DecodeError, Reader};
use crate::record::{LogRecord, RECORD_HEADER_BYTES, RecordMeta, decode_records, encode_records};
use crate::types::{Epoch, Lsn, PageId, PgId, SegmentIndex, VolumeId};

/// The frame format version this build speaks.
pub const FRAME_VERSION: u8 = 1;
/// Largest frame, length prefix included.
pub const FRAME_BYTES_MAX: usize = 4 * 1024 * 1024;
/// Bytes of the frame header that follow the length prefix.
pub const FRAME_HEADER_BYTES: usize = 12;
/// Bytes of the fixed part of an Append body.
pub const APPEND_HEADER_BYTES: usize = 40;
/// Bytes of the length prefix.
pub const LEN_PREFIX_BYTES: usize = 4;
/// Longest error message carried in an error reply.
pub const ERROR_MESSAGE_BYTES_MAX: usize = 1024;

const KIND_APPEND: u8 = 1;
const KIND_ACK: u8 = 2;
const KIND_ERROR: u8 = 3;
const KIND_READ_PAGE: u8 = 4;
const KIND_PAGE: u8 = 5;
const KIND_HOST_SEGMENTS: u8 = 6;
const KIND_SET_PGMRPL: u8 = 7;
const KIND_DONE: u8 = 8;
const KIND_GET_VOLUME_STATE: u8 = 9;
const KIND_VOLUME_STATE: u8 = 10;
const KIND_FENCE: u8 = 11;
const KIND_TRUNCATE: u8 = 12;
const KIND_FETCH_RECORDS: u8 = 13;
const KIND_RECORDS: u8 = 14;
const KIND_FETCH_PAGES: u8 = 15;
const KIND_PAGES: u8 = 16;

/// Largest page a Page reply carries.
pub const PAGE_BYTES_MAX: usize = 64 * 1024;
/// Most segments one HostSegments message names.
pub const HOST_SEGMENTS_MAX: usize = 64 * 1024;
/// Most truncations a VolumeState carries (a node keeps its newest ones).
pub const TRUNCATIONS_MAX: usize = 64;

/// Read a page as of exactly `read_point` from one segment.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ReadPage {
    pub volume: VolumeId,
    pub epoch: Epoch,
    pub pg: PgId,
    pub segment: SegmentIndex,
    pub page: PageId,
    pub read_point: Lsn,
}

/// A page image as of `page_lsn`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PageReply {
    pub page: PageId,
    pub page_lsn: Lsn,
    pub bytes: Vec<u8>,
}

/// Most nodes a HostSegments placement names.
pub const PLACEMENT_NODES_MAX: usize = 4096;
/// Longest node name in a placement.
pub const NODE_NAME_BYTES_MAX: usize = 255;
/// Longest node address (`ip:port`) in a placement.
pub const NODE_ADDRESS_BYTES_MAX: usize = 64;

/// The segments of `volume` that a node hosts from now on, with the volume's geometry and
/// where the hosted PGs' six segments live.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct HostSegments {
    pub volume: VolumeId,
    pub epoch: Epoch,
    pub page_size_bytes: u32,
    pub pages_per_pg: u64,
    /// PGs in the volume (0: not said), so a node can describe the volume in its backup.
    pub pg_count: u32,
    pub segments: Vec<(PgId, SegmentIndex)>,
    /// The nodes `placement` names by index.
    pub nodes: Vec<PeerNode>,
    /// Per hosted PG, the node (an index into `nodes`) of each of its six segments.
    pub placement: Vec<PgPlacement>,
}

/// A storage node as a placement names it: its certificate name and QUIC address.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct PeerNode {
    pub name: String,
    pub address: std::net::SocketAddr,
}

/// Where one PG's six segments live: `nodes[i]` indexes the node table for segment `i`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct PgPlacement {
    pub pg: PgId,
    pub nodes: [u16; crate::geometry::PG_SIZE],
}

/// The PG's minimum read point: nodes may coalesce and collect garbage below it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct SetPgmrpl {
    pub volume: VolumeId,
    pub pg: PgId,
    pub pgmrpl: Lsn,
    /// The sending writer's epoch.
    pub epoch: Epoch,
    /// A VDL the writer reached (`Lsn::ZERO`: none said); see the module docs.
    pub vdl: Lsn,
}

/// A batch of records of one PG for one of its segments.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Append {
    pub volume: VolumeId,
    pub epoch: Epoch,
    pub pg: PgId,
    pub segment: SegmentIndex,
    /// The writer's VDL when it sent the batch.
    pub vdl: Lsn,
    pub records: Vec<LogRecord>,
}

/// The fixed part of an Append body.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct AppendHeader {
    pub volume: VolumeId,
    pub epoch: Epoch,
    pub pg: PgId,
    pub segment: SegmentIndex,
    pub record_count: u32,
    pub vdl: Lsn,
}

/// What a node holds of a volume: its epoch, the highest VDL it holds durably, and each hosted
/// segment's SCL.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct VolumeState {
    pub volume: VolumeId,
    pub epoch: Epoch,
    pub vdl: Lsn,
    /// Installed truncations, oldest first.
    pub truncations: Vec<TruncationRange>,
    pub segments: Vec<SegmentState>,
}

/// Records of epochs older than `annul_epoch` with LSNs in `(after, through]` are annulled.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct TruncationRange {
    pub annul_epoch: Epoch,
    pub after: Lsn,
    pub through: Lsn,
}

impl TruncationRange {
    /// Whether a record at `lsn` that arrived with `epoch` is annulled by this range.
    #[must_use]
    pub fn annuls(&self, lsn: Lsn, epoch: Epoch) -> bool {
        epoch < self.annul_epoch && lsn > self.after && lsn <= self.through
    }
}

/// One hosted segment's SCL, and what the node knows of its PG's backup.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct SegmentState {
    pub pg: PgId,
    pub segment: SegmentIndex,
    pub scl: Lsn,
    /// The PG is backed up (restorable) through this LSN (0: nothing known, or no backup).
    pub backed_up: Lsn,
    /// The newest complete backup snapshot of the PG serves targets from this LSN on (0: none
    /// known).
    pub snapshot: Lsn,
}

/// Install `epoch_new` unless the node has seen an epoch newer than `epoch_current`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Fence {
    pub volume: VolumeId,
    pub epoch_current: Epoch,
    pub epoch_new: Epoch,
}

/// Annul every record with an LSN in `(after, through]`, on behalf of the writer of `epoch`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Truncate {
    pub volume: VolumeId,
    pub epoch: Epoch,
    pub range: TruncationRange,
}

/// A segment's records with LSNs in `(after, through]`, up to about `bytes_max` bytes.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct FetchRecords {
    pub volume: VolumeId,
    pub epoch: Epoch,
    pub pg: PgId,
    pub segment: SegmentIndex,
    pub after: Lsn,
    pub through: Lsn,
    pub bytes_max: u32,
}

/// A segment's non-empty pages as of `read_point` (0: the replier's materialized LSN), from
/// page index `from_index` on, up to about `bytes_max` bytes.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct FetchPages {
    pub volume: VolumeId,
    pub epoch: Epoch,
    pub pg: PgId,
    pub segment: SegmentIndex,
    pub read_point: Lsn,
    pub from_index: u64,
    pub bytes_max: u32,
}

/// Reply to [`FetchPages`].
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Pages {
    pub volume: VolumeId,
    pub pg: PgId,
    pub segment: SegmentIndex,
    /// The read point the pages are at.
    pub read_point: Lsn,
    /// Where the next request starts; [`Pages::DONE`] when no page is left.
    pub next_index: u64,
    pub pages: Vec<PageReply>,
}

impl Pages {
    pub const DONE: u64 = u64::MAX;
}

/// Reply to [`FetchRecords`].
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Records {
    pub volume: VolumeId,
    pub pg: PgId,
    pub segment: SegmentIndex,
    pub scl: Lsn,
    pub records: Vec<LogRecord>,
    /// `epochs[i]` is the epoch `records[i]` was written with on the replying node (the same
    /// length as `records`).
    pub epochs: Vec<Epoch>,
}

/// A segment's SCL after a batch became durable.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct SegmentAck {
    pub volume: VolumeId,
    pub pg: PgId,
    pub segment: SegmentIndex,
    pub scl: Lsn,
}

macro_rules! error_codes {
    ($($name:ident = $value:literal,)*) => {
        /// Typed reason of an error reply.
        #[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
        pub enum ErrorCode { $($name = $value,)* }

        impl ErrorCode {
            fn from_u16(value: u16) -> Result<Self, DecodeError> {
                match value {
                    $($value => Ok(Self::$name),)*
                    other => Err(DecodeError::UnknownErrorCode(other)),
                }
            }
        }
    };
}

// `Forbidden`: the certificate's role may not make this request. `EpochNotInstalled`: the
// request carries an epoch newer than the node has installed; send Fence or Truncate first
// (a node learns a new epoch together with its truncation). `Compacted`: the records asked for
// were materialized into pages and left the journal (ask a segment that still has them).
// `Corrupt`: this copy of the data failed its CRC; it is never served (read another segment).
error_codes! {
    Malformed = 1,
    FrameTooLarge = 2,
    UnsupportedVersion = 3,
    BadCrc = 4,
    UnknownSegment = 5,
    StaleEpoch = 6,
    JournalFull = 7,
    ShuttingDown = 8,
    Internal = 9,
    SclBelowReadPoint = 10,
    BadRequest = 11,
    Forbidden = 12,
    EpochNotInstalled = 13,
    Compacted = 20,
    Corrupt = 21,
}

impl ErrorCode {
    /// The error code that a failed decode maps to.
    pub fn of_decode_error(error: &DecodeError) -> Self {
        match error {
            DecodeError::BadCrc { .. } => Self::BadCrc,
            DecodeError::FrameTooLarge { .. } => Self::FrameTooLarge,
            DecodeError::UnsupportedVersion(_) => Self::UnsupportedVersion,
            _ => Self::Malformed,
        }
    }
}

/// An error reply.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ErrorReply {
    pub code: ErrorCode,
    pub message: String,
}

impl ErrorReply {
    /// An error reply; the message is cut to [`ERROR_MESSAGE_BYTES_MAX`] on a char boundary.
    pub fn new(code: ErrorCode, message: impl Into<String>) -> Self {
        let mut message = message.into();
        if message.len() > ERROR_MESSAGE_BYTES_MAX {
            let mut cut = ERROR_MESSAGE_BYTES_MAX;
            while !message.is_char_boundary(cut) {
                cut -= 1;
            }
            message.truncate(cut);
        }
        Self { code, message }
    }
}

/// Every message kind.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Message {
    Append(Append),
    Ack(SegmentAck),
    Error(ErrorReply),
    ReadPage(ReadPage),
    Page(PageReply),
    HostSegments(HostSegments),
    SetPgmrpl(SetPgmrpl),
    Done,
    GetVolumeState(VolumeId),
    VolumeState(VolumeState),
    Fence(Fence),
    Truncate(Truncate),
    FetchRecords(FetchRecords),
    Records(Records),
    FetchPages(FetchPages),
    Pages(Pages),
}

/// One frame: a message and the request it belongs to.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Frame {
    pub request_id: u64,
    pub message: Message,
}

/// The fixed part of a frame after its length prefix.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct FrameHeader {
    pub kind: u8,
    pub request_id: u64,
}

/// Checks a length prefix and returns how many bytes follow it.
pub fn decode_len(prefix: [u8; 4]) -> Result<usize, DecodeError> {
    let len = u32::from_le_bytes(prefix) as usize;
    if len > FRAME_BYTES_MAX - 4 {
        return Err(DecodeError::FrameTooLarge {
            len: len as u64 + 4,
            limit: FRAME_BYTES_MAX as u64,
        });
    }
    if len < FRAME_HEADER_BYTES {
        return Err(DecodeError::Malformed("frame shorter than its header"));
    }
    Ok(len)
}

impl FrameHeader {
    /// Decodes the header at the front of `rest` (the bytes after the length prefix).
    pub fn decode(reader: &mut Reader<'_>) -> Result<Self, DecodeError> {
        let version = reader.u8("frame version")?;
        if version != FRAME_VERSION {
            return Err(DecodeError::UnsupportedVersion(version));
        }
        let kind = reader.u8("frame kind")?;
        if reader.u16("frame reserved")? != 0 {
            return Err(DecodeError::Malformed("frame reserved bytes are not zero"));
        }
        let request_id = reader.u64("request id")?;
        Ok(Self { kind, request_id })
    }
}

impl Frame {
    /// Appends the whole frame, length prefix included, to `out`.
    pub fn encode(&self, out: &mut Vec<u8>) {
        let start = out.len();
        out.extend_from_slice(&[0; 4]);
        out.push(FRAME_VERSION);
        out.push(self.message.kind());
        out.extend_from_slice(&0u16.to_le_bytes());
        out.extend_from_slice(&self.request_id.to_le_bytes());
        self.message.encode_body(out);
        let len = out.len() - start - 4;
        assert!(
            len + 4 <= FRAME_BYTES_MAX,
            "frame of {} bytes exceeds the limit",
            len + 4
        );
        let len = u32::try_from(len)
            .expect("bounded by FRAME_BYTES_MAX")
            .to_le_bytes();
        out.get_mut(start..start + 4)
            .expect("prefix reserved above")
            .copy_from_slice(&len);
    }

    /// The encoded frame as a new buffer.
    pub fn to_bytes(&self) -> Vec<u8> {
        let mut out = Vec::new();
        self.encode(&mut out);
        out
    }

    /// Decodes the bytes that follow a length prefix (as checked by [`decode_len`]).
    pub fn decode_after_len(rest: &[u8]) -> Result<Self, DecodeError> {
        let mut reader = Reader::new(rest);
        let header = FrameHeader::decode(&mut reader)?;
        let message = Message::decode_body(header.kind, reader.take(reader.remaining(), "body")?)?;
        Ok(Self {
            request_id: header.request_id,
            message,
        })
    }

    /// Decodes one whole frame, length prefix included, that must fill `bytes` exactly.
    pub fn decode(bytes: &[u8]) -> Result<Self, DecodeError> {
        let mut reader = Reader::new(bytes);
        let prefix = reader.take(4, "length prefix")?;
        let len = decode_len(
            prefix
                .try_into()
                .map_err(|_| DecodeError::Malformed("prefix"))?,
        )?;
        let rest = reader.take(len, "frame")?;
        reader.finish("frame")?;
        Self::decode_after_len(rest)
    }
}

impl Message {
    /// The message kind's name, for error messages and logs.
    pub fn name(&self) -> &'static str {
        match self {
            Message::Append(_) => "Append",
            Message::Ack(_) => "Ack",
            Message::Error(_) => "Error",
            Message::ReadPage(_) => "ReadPage",
            Message::Page(_) => "Page",
            Message::HostSegments(_) => "HostSegments",
            Message::SetPgmrpl(_) => "SetPgmrpl",
            Message::Done => "Done",
            Message::GetVolumeState(_) => "GetVolumeState",
            Message::VolumeState(_) => "VolumeState",
            Message::Fence(_) => "Fence",
            Message::Truncate(_) => "Truncate",
            Message::FetchRecords(_) => "FetchRecords",
            Message::Records(_) => "Records",
            Message::FetchPages(_) => "FetchPages",
            Message::Pages(_) => "Pages",
        }
    }

    fn kind(&self) -> u8 {
        match self {
            Message::Append(_) => KIND_APPEND,
            Message::Ack(_) => KIND_ACK,
            Message::Error(_) => KIND_ERROR,
            Message::ReadPage(_) => KIND_READ_PAGE,
            Message::Page(_) => KIND_PAGE,
            Message::HostSegments(_) => KIND_HOST_SEGMENTS,
            Message::SetPgmrpl(_) => KIND_SET_PGMRPL,
            Message::Done => KIND_DONE,
            Message::GetVolumeState(_) => KIND_GET_VOLUME_STATE,
            Message::VolumeState(_) => KIND_VOLUME_STATE,
            Message::Fence(_) => KIND_FENCE,
            Message::Truncate(_) => KIND_TRUNCATE,
            Message::FetchRecords(_) => KIND_FETCH_RECORDS,
            Message::Records(_) => KIND_RECORDS,
            Message::FetchPages(_) => KIND_FETCH_PAGES,
            Message::Pages(_) => KIND_PAGES,
        }
    }

    /// Bytes of the encoded body: what [`Frame::encode`] writes after the frame header.
    #[must_use]
    pub fn body_len(&self) -> usize {
        match self {
            Message::Append(append) => append.encoded_len(),
            Message::Ack(_) => 24,
            Message::Error(error) => {
                8 + error
                    .message
                    .floor_char_boundary(ERROR_MESSAGE_BYTES_MAX)
                    .min(error.message.len())
            }
            Message::ReadPage(_) => 40,
            Message::Page(page) => 24 + page.bytes.len(),
            Message::HostSegments(host) => host.encoded_len(),
            Message::SetPgmrpl(_) => 40,
            Message::Done => 0,
            Message::GetVolumeState(_) => 8,
            Message::VolumeState(state) => {
                32 + 24 * state.truncations.len() + 32 * state.segments.len()
            }
            Message::Fence(_) => 24,
            Message::Truncate(_) => 40,
            Message::FetchRecords(_) => 48,
            Message::Records(records) => {
                32 + 8 * records.epochs.len() + records_len(&records.records)
            }
            Message::FetchPages(_) => 48,
            Message::Pages(pages) => {
                40 + pages
                    .pages
                    .iter()
                    .map(|p| 24 + p.bytes.len())
                    .sum::<usize>()
            }
        }
    }

    /// Bytes of the whole encoded frame, length prefix included.
    #[must_use]
    pub fn frame_len(&self) -> usize {
        LEN_PREFIX_BYTES + FRAME_HEADER_BYTES + self.body_len()
    }

    fn encode_body(&self, out: &mut Vec<u8>) {
        match self {
            Message::Append(append) => append.encode(out),
            Message::Ack(ack) => {
                out.extend_from_slice(&ack.volume.0.to_le_bytes());
                out.extend_from_slice(&ack.pg.0.to_le_bytes());
                out.extend_from_slice(&ack.segment.0.to_le_bytes());
                out.extend_from_slice(&ack.scl.0.to_le_bytes());
            }
            Message::Error(error) => {
                out.extend_from_slice(&(error.code as u16).to_le_bytes());
                out.extend_from_slice(&0u16.to_le_bytes());
                // Cut like `ErrorReply::new`, on a char boundary: the fields are public, so
                // the message may be longer than the limit, and cutting it mid-char would send
                // invalid UTF-8.
                let message = &error.message;
                let message = message
                    .get(..message.floor_char_boundary(ERROR_MESSAGE_BYTES_MAX))
                    .unwrap_or_default()
                    .as_bytes();
                let len = u32::try_from(message.len()).expect("bounded above");
                out.extend_from_slice(&len.to_le_bytes());
                out.extend_from_slice(message);
            }
            Message::ReadPage(r) => {
                out.extend_from_slice(&r.volume.0.to_le_bytes());
                out.extend_from_slice(&r.epoch.0.to_le_bytes());
                out.extend_from_slice(&r.pg.0.to_le_bytes());
                out.extend_from_slice(&r.segment.0.to_le_bytes());
                out.extend_from_slice(&r.page.0.to_le_bytes());
                out.extend_from_slice(&r.read_point.0.to_le_bytes());
            }
            Message::Page(p) => encode_page(p, out),
            Message::HostSegments(h) => h.encode(out),
            Message::SetPgmrpl(m) => {
                out.extend_from_slice(&m.volume.0.to_le_bytes());
                out.extend_from_slice(&m.pg.0.to_le_bytes());
                out.extend_from_slice(&0u32.to_le_bytes());
                out.extend_from_slice(&m.pgmrpl.0.to_le_bytes());
                out.extend_from_slice(&m.epoch.0.to_le_bytes());
                out.extend_from_slice(&m.vdl.0.to_le_bytes());
            }
            Message::Done => {}
            _ => self.encode_recovery_body(out),
        }
    }

    /// The bodies of the recovery messages (see the module docs).
    fn encode_recovery_body(&self, out: &mut Vec<u8>) {
        match self {
            Message::GetVolumeState(volume) => out.extend_from_slice(&volume.0.to_le_bytes()),
            Message::VolumeState(state) => state.encode(out),
            Message::Fence(f) => {
                out.extend_from_slice(&f.volume.0.to_le_bytes());
                out.extend_from_slice(&f.epoch_current.0.to_le_bytes());
                out.extend_from_slice(&f.epoch_new.0.to_le_bytes());
            }
            Message::Truncate(t) => {
                out.extend_from_slice(&t.volume.0.to_le_bytes());
                out.extend_from_slice(&t.epoch.0.to_le_bytes());
                encode_range(&t.range, out);
            }
            Message::FetchRecords(f) => {
                out.extend_from_slice(&f.volume.0.to_le_bytes());
                out.extend_from_slice(&f.epoch.0.to_le_bytes());
                out.extend_from_slice(&f.pg.0.to_le_bytes());
                out.extend_from_slice(&f.segment.0.to_le_bytes());
                out.extend_from_slice(&f.after.0.to_le_bytes());
                out.extend_from_slice(&f.through.0.to_le_bytes());
                out.extend_from_slice(&f.bytes_max.to_le_bytes());
                out.extend_from_slice(&0u32.to_le_bytes());
            }
            Message::Records(r) => {
                out.extend_from_slice(&r.volume.0.to_le_bytes());
                out.extend_from_slice(&r.pg.0.to_le_bytes());
                out.extend_from_slice(&r.segment.0.to_le_bytes());
                out.extend_from_slice(&r.scl.0.to_le_bytes());
                let count = u32::try_from(r.records.len()).expect("bounded by the frame limit");
                out.extend_from_slice(&count.to_le_bytes());
                out.extend_from_slice(&0u32.to_le_bytes());
                assert!(r.epochs.len() == r.records.len(), "one epoch per record");
                for epoch in &r.epochs {
                    out.extend_from_slice(&epoch.0.to_le_bytes());
                }
                encode_records(&r.records, out);
            }
            Message::FetchPages(f) => {
                out.extend_from_slice(&f.volume.0.to_le_bytes());
                out.extend_from_slice(&f.epoch.0.to_le_bytes());
                out.extend_from_slice(&f.pg.0.to_le_bytes());
                out.extend_from_slice(&f.segment.0.to_le_bytes());
                out.extend_from_slice(&f.read_point.0.to_le_bytes());
                out.extend_from_slice(&f.from_index.to_le_bytes());
                out.extend_from_slice(&f.bytes_max.to_le_bytes());
                out.extend_from_slice(&0u32.to_le_bytes());
            }
            Message::Pages(p) => {
                out.extend_from_slice(&p.volume.0.to_le_bytes());
                out.extend_from_slice(&p.pg.0.to_le_bytes());
                out.extend_from_slice(&p.segment.0.to_le_bytes());
                out.extend_from_slice(&p.read_point.0.to_le_bytes());
                out.extend_from_slice(&p.next_index.to_le_bytes());
                let count = u32::try_from(p.pages.len()).expect("bounded by the frame limit");
                out.extend_from_slice(&count.to_le_bytes());
                out.extend_from_slice(&0u32.to_le_bytes());
                for page in &p.pages {
                    encode_page(page, out);
                }
            }
            _ => unreachable!("encode_body handles every other kind"),
        }
    }

    /// Decodes a body of the given kind; the body must be consumed exactly.
    pub fn decode_body(kind: u8, body: &[u8]) -> Result<Self, DecodeError> {
        let mut reader = Reader::new(body);
        let message = match kind {
            KIND_APPEND => return Append::decode(body).map(Message::Append),
            KIND_ACK => Message::Ack(SegmentAck {
                volume: VolumeId(reader.u64("volume")?),
                pg: PgId(reader.u32("pg")?),
                segment: SegmentIndex(reader.u32("segment")?),
                scl: Lsn(reader.u64("scl")?),
            }),
            KIND_ERROR => Message::Error(decode_error(&mut reader)?),
            KIND_READ_PAGE => Message::ReadPage(ReadPage {
                volume: VolumeId(reader.u64("volume")?),
                epoch: Epoch(reader.u64("epoch")?),
                pg: PgId(reader.u32("pg")?),
                segment: SegmentIndex(reader.u32("segment")?),
                page: PageId(reader.u64("page")?),
                read_point: Lsn(reader.u64("read point")?),
            }),
            KIND_PAGE => Message::Page(decode_page(&mut reader)?),
            KIND_HOST_SEGMENTS => Message::HostSegments(HostSegments::decode(&mut reader)?),
            KIND_SET_PGMRPL => {
                let volume = VolumeId(reader.u64("volume")?);
                let pg = PgId(reader.u32("pg")?);
                if reader.u32("reserved")? != 0 {
                    return Err(DecodeError::Malformed(
                        "SetPgmrpl reserved bytes are not zero",
                    ));
                }
                Message::SetPgmrpl(SetPgmrpl {
                    volume,
                    pg,
                    pgmrpl: Lsn(reader.u64("pgmrpl")?),
                    epoch: Epoch(reader.u64("epoch")?),
                    vdl: Lsn(reader.u64("vdl")?),
                })
            }
            KIND_DONE => Message::Done,
            KIND_GET_VOLUME_STATE => Message::GetVolumeState(VolumeId(reader.u64("volume")?)),
            KIND_VOLUME_STATE => Message::VolumeState(VolumeState::decode(&mut reader)?),
            KIND_FENCE => Message::Fence(Fence {
                volume: VolumeId(reader.u64("volume")?),
                epoch_current: Epoch(reader.u64("epoch current")?),
                epoch_new: Epoch(reader.u64("epoch new")?),
            }),
            KIND_TRUNCATE => Message::Truncate(decode_truncate(&mut reader)?),
            KIND_FETCH_RECORDS => Message::FetchRecords(decode_fetch(&mut reader)?),
            KIND_RECORDS => return decode_records_reply(body).map(Message::Records),
            KIND_FETCH_PAGES => Message::FetchPages(decode_fetch_pages(&mut reader)?),
            KIND_PAGES => Message::Pages(decode_pages(&mut reader)?),
            other => return Err(DecodeError::UnknownKind(other)),
        };
        reader.finish("message body")?;
        Ok(message)
    }
}

pub(crate) fn encode_page(p: &PageReply, out: &mut Vec<u8>) {
    assert!(
        p.bytes.len() <= PAGE_BYTES_MAX,
        "page larger than the limit"
    );
    out.extend_from_slice(&p.page.0.to_le_bytes());
    out.extend_from_slice(&p.page_lsn.0.to_le_bytes());
    let len = u32::try_from(p.bytes.len()).expect("bounded above");
    out.extend_from_slice(&len.to_le_bytes());
    out.extend_from_slice(&crc32fast::hash(&p.bytes).to_le_bytes());
    out.extend_from_slice(&p.bytes);
}

fn decode_fetch_pages(reader: &mut Reader<'_>) -> Result<FetchPages, DecodeError> {
    let fetch = FetchPages {
        volume: VolumeId(reader.u64("volume")?),
        epoch: Epoch(reader.u64("epoch")?),
        pg: PgId(reader.u32("pg")?),
        segment: SegmentIndex(reader.u32("segment")?),
        read_point: Lsn(reader.u64("read point")?),
        from_index: reader.u64("from index")?,
        bytes_max: reader.u32("bytes max")?,
    };
    if reader.u32("reserved")? != 0 {
        return Err(DecodeError::Malformed(
            "FetchPages reserved bytes are not zero",
        ));
    }
    Ok(fetch)
}

fn decode_pages(reader: &mut Reader<'_>) -> Result<Pages, DecodeError> {
    let volume = VolumeId(reader.u64("volume")?);
    let pg = PgId(reader.u32("pg")?);
    let segment = SegmentIndex(reader.u32("segment")?);
    let read_point = Lsn(reader.u64("read point")?);
    let next_index = reader.u64("next index")?;
    let count = reader.u32("page count")? as usize;
    if reader.u32("reserved")? != 0 {
        return Err(DecodeError::Malformed("Pages reserved bytes are not zero"));
    }
    // Each page takes at least its 24-byte header: never allocate for more than could fit.
    if count > reader.remaining() / 24 {
        return Err(DecodeError::Malformed(
            "Pages count exceeds what the body holds",
        ));
    }
    let mut pages = Vec::with_capacity(count);
    for _ in 0..count {
        pages.push(decode_page(reader)?);
    }
    Ok(Pages {
        volume,
        pg,
        segment,
        read_point,
        next_index,
        pages,
    })
}

pub(crate) fn decode_page(reader: &mut Reader<'_>) -> Result<PageReply, DecodeError> {
    let page = PageId(reader.u64("page")?);
    let page_lsn = Lsn(reader.u64("page lsn")?);
    let len = reader.u32("page length")? as usize;
    if len > PAGE_BYTES_MAX {
        return Err(DecodeError::Malformed("page longer than the limit"));
    }
    let stored = reader.u32("page crc")?;
    let bytes = reader.take(len, "page bytes")?;
    let computed = crc32fast::hash(bytes);
    if computed != stored {
        return Err(DecodeError::BadCrc {
            lsn: page_lsn.0,
            stored,
            computed,
        });
    }
    Ok(PageReply {
        page,
        page_lsn,
        bytes: bytes.to_vec(),
    })
}

impl HostSegments {
    fn encode(&self, out: &mut Vec<u8>) {
        assert!(
            self.segments.len() <= HOST_SEGMENTS_MAX,
            "too many segments in one message"
        );
        out.extend_from_slice(&self.volume.0.to_le_bytes());
        out.extend_from_slice(&self.epoch.0.to_le_bytes());
        out.extend_from_slice(&self.page_size_bytes.to_le_bytes());
        let count = u32::try_from(self.segments.len()).expect("bounded above");
        out.extend_from_slice(&count.to_le_bytes());
        out.extend_from_slice(&self.pages_per_pg.to_le_bytes());
        out.extend_from_slice(&self.pg_count.to_le_bytes());
        out.extend_from_slice(&0u32.to_le_bytes());
        for (pg, segment) in &self.segments {
            out.extend_from_slice(&pg.0.to_le_bytes());
            out.extend_from_slice(&segment.0.to_le_bytes());
        }
        self.encode_placement(out);
    }

    fn encode_placement(&self, out: &mut Vec<u8>) {
        assert!(self.nodes.len() <= PLACEMENT_NODES_MAX, "too many nodes");
        assert!(self.placement.len() <= HOST_SEGMENTS_MAX, "too many PGs");
        let count = u32::try_from(self.nodes.len()).expect("bounded above");
        out.extend_from_slice(&count.to_le_bytes());
        for node in &self.nodes {
            let address = node.address.to_string();
            assert!(node.name.len() <= NODE_NAME_BYTES_MAX, "node name too long");
            assert!(
                address.len() <= NODE_ADDRESS_BYTES_MAX,
                "socket addresses are short"
            );
            for text in [node.name.as_str(), address.as_str()] {
                let len = u16::try_from(text.len()).expect("bounded above");
                out.extend_from_slice(&len.to_le_bytes());
                out.extend_from_slice(text.as_bytes());
            }
        }
        let count = u32::try_from(self.placement.len()).expect("bounded above");
        out.extend_from_slice(&count.to_le_bytes());
        for pg in &self.placement {
            assert!(pg.nodes.iter().all(|n| usize::from(*n) < self.nodes.len()));
            out.extend_from_slice(&pg.pg.0.to_le_bytes());
            for node in pg.nodes {
                out.extend_from_slice(&node.to_le_bytes());
            }
        }
    }

    /// Bytes of the encoded body.
    fn encoded_len(&self) -> usize {
        let nodes: usize = self
            .nodes
            .iter()
            .map(|n| 4 + n.name.len() + n.address.to_string().len())
            .sum();
        40 + 8 * self.segments.len() + 4 + nodes + 4 + PG_PLACEMENT_BYTES * self.placement.len()
    }

    fn decode(reader: &mut Reader<'_>) -> Result<Self, DecodeError> {
        let volume = VolumeId(reader.u64("volume")?);
        let epoch = Epoch(reader.u64("epoch")?);
        let page_size_bytes = reader.u32("page size")?;
        let count = reader.u32("segment count")? as usize;
        let pages_per_pg = reader.u64("pages per pg")?;
        let pg_count = reader.u32("pg count")?;
        if reader.u32("reserved")? != 0 {
            return Err(DecodeError::Malformed(
                "HostSegments reserved bytes are not zero",
            ));
        }
        if count > HOST_SEGMENTS_MAX || count > reader.remaining() / 8 {
            return Err(DecodeError::Malformed(
                "segment count larger than the bytes can hold",
            ));
        }
        let mut segments = Vec::with_capacity(count);
        for _ in 0..count {
            segments.push((
                PgId(reader.u32("pg")?),
                SegmentIndex(reader.u32("segment")?),
            ));
        }
        let nodes = decode_peer_nodes(reader)?;
        let placement = decode_placement(reader, nodes.len())?;
        Ok(Self {
            volume,
            epoch,
            page_size_bytes,
            pages_per_pg,
            pg_count,
            segments,
            nodes,
            placement,
        })
    }
}

/// Bytes of one PG's placement: its id and a node index per segment.
const PG_PLACEMENT_BYTES: usize = 4 + 2 * crate::geometry::PG_SIZE;

fn decode_peer_nodes(reader: &mut Reader<'_>) -> Result<Vec<PeerNode>, DecodeError> {
    let count = reader.u32("node count")? as usize;
    // Each node takes at least its two length fields.
    if count > PLACEMENT_NODES_MAX || count > reader.remaining() / 4 {
        return Err(DecodeError::Malformed(
            "node count larger than the bytes can hold",
        ));
    }
    let mut nodes = Vec::with_capacity(count);
    for _ in 0..count {
        let len = usize::from(reader.u16("node name length")?);
        if len > NODE_NAME_BYTES_MAX {
            return Err(DecodeError::Malformed("node name longer than the limit"));
        }
        let name = std::str::from_utf8(reader.take(len, "node name")?)
            .map_err(|_| DecodeError::Malformed("node name is not UTF-8"))?
            .to_string();
        let len = usize::from(reader.u16("node address length")?);
        if len > NODE_ADDRESS_BYTES_MAX {
            return Err(DecodeError::Malformed("node address longer than the limit"));
        }
        let text = std::str::from_utf8(reader.take(len, "node address")?)
            .map_err(|_| DecodeError::Malformed("node address is not UTF-8"))?;
        let address: std::net::SocketAddr = text
            .parse()
            .map_err(|_| DecodeError::Malformed("node address is not ip:port"))?;
        // Only the form the encoder writes, so a frame re-encodes to exactly its bytes.
        if address.to_string() != text {
            return Err(DecodeError::Malformed(
                "node address is not in canonical ip:port form",
            ));
        }
        nodes.push(PeerNode { name, address });
    }
    Ok(nodes)
}

fn decode_placement(
    reader: &mut Reader<'_>,
    node_count: usize,
) -> Result<Vec<PgPlacement>, DecodeError> {
    let count = reader.u32("placement count")? as usize;
    if count > HOST_SEGMENTS_MAX || count > reader.remaining() / PG_PLACEMENT_BYTES {
        return Err(DecodeError::Malformed(
            "placement count larger than the bytes can hold",
        ));
    }
    let mut placement = Vec::with_capacity(count);
    for _ in 0..count {
        let pg = PgId(reader.u32("placement pg")?);
        let mut nodes = [0u16; crate::geometry::PG_SIZE];
        for node in &mut nodes {
            *node = reader.u16("placement node")?;
            if usize::from(*node) >= node_count {
                return Err(DecodeError::Malformed(
                    "placement names a node beyond the node table",
                ));
            }
        }
        placement.push(PgPlacement { pg, nodes });
    }
    Ok(placement)
}

fn decode_error(reader: &mut Reader<'_>) -> Result<ErrorReply, DecodeError> {
    let code = ErrorCode::from_u16(reader.u16("error code")?)?;
    if reader.u16("error reserved")? != 0 {
        return Err(DecodeError::Malformed("error reserved bytes are not zero"));
    }
    let len = reader.u32("error message length")? as usize;
    if len > ERROR_MESSAGE_BYTES_MAX {
        return Err(DecodeError::Malformed(
            "error message longer than the limit",
        ));
    }
    // Lossy, so a garbled message still delivers its code. Each invalid byte becomes U+FFFD
    // (3 bytes), so the result can exceed the limit: `new` cuts it back on a char boundary.
    let message = String::from_utf8_lossy(reader.take(len, "error message")?);
    Ok(ErrorReply::new(code, message))
}

impl AppendHeader {
    /// Appends the fixed part of an Append body to `out`.
    pub fn encode(&self, out: &mut Vec<u8>) {
        assert!(
            self.record_count > 0,
            "an append carries at least one record"
        );
        out.extend_from_slice(&self.volume.0.to_le_bytes());
        out.extend_from_slice(&self.epoch.0.to_le_bytes());
        out.extend_from_slice(&self.pg.0.to_le_bytes());
        out.extend_from_slice(&self.segment.0.to_le_bytes());
        out.extend_from_slice(&self.record_count.to_le_bytes());
        out.extend_from_slice(&0u32.to_le_bytes());
        out.extend_from_slice(&self.vdl.0.to_le_bytes());
    }

    fn decode(reader: &mut Reader<'_>) -> Result<Self, DecodeError> {
        let volume = VolumeId(reader.u64("volume")?);
        let epoch = Epoch(reader.u64("epoch")?);
        let pg = PgId(reader.u32("pg")?);
        let segment = SegmentIndex(reader.u32("segment")?);
        let record_count = reader.u32("record count")?;
        if reader.u32("append reserved")? != 0 {
            return Err(DecodeError::Malformed("append reserved bytes are not zero"));
        }
        let vdl = Lsn(reader.u64("vdl")?);
        if record_count == 0 {
            return Err(DecodeError::Malformed("append without records"));
        }
        Ok(Self {
            volume,
            epoch,
            pg,
            segment,
            record_count,
            vdl,
        })
    }
}

/// Writes a whole Append frame (length prefix included) from a header and records already
/// encoded back to back: a PG batch is encoded once and framed six times.
///
/// # Panics
/// If the frame would pass [`FRAME_BYTES_MAX`] (the sender sizes batches below it).
pub fn encode_append_frame(
    request_id: u64,
    header: &AppendHeader,
    records: &[u8],
    out: &mut Vec<u8>,
) {
    let len = FRAME_HEADER_BYTES + APPEND_HEADER_BYTES + records.len();
    assert!(
        len + LEN_PREFIX_BYTES <= FRAME_BYTES_MAX,
        "append frame too large"
    );
    let len = u32::try_from(len).expect("bounded by the frame limit");
    out.reserve(len as usize + LEN_PREFIX_BYTES);
    out.extend_from_slice(&len.to_le_bytes());
    out.push(FRAME_VERSION);
    out.push(KIND_APPEND);
    out.extend_from_slice(&0u16.to_le_bytes());
    out.extend_from_slice(&request_id.to_le_bytes());
    header.encode(out);
    out.extend_from_slice(records);
}

/// An Append body checked in place: every record's CRC, backlink and op verified, LSNs
/// strictly increasing, and nothing copied.
#[derive(Clone, Debug)]
pub struct AppendView<'a> {
    pub header: AppendHeader,
    /// Each record's checked header fields, in body order.
    pub records: Vec<RecordMeta>,
    body: &'a [u8],
}

impl<'a> AppendView<'a> {
    /// Checks an Append body that must fill `body` exactly.
    pub fn decode(body: &'a [u8]) -> Result<Self, DecodeError> {
        let mut reader = Reader::new(body);
        let header = AppendHeader::decode(&mut reader)?;
        let count = header.record_count as usize;
        if count > reader.remaining() / RECORD_HEADER_BYTES {
            return Err(DecodeError::Malformed(
                "record count larger than the bytes can hold",
            ));
        }
        let mut records: Vec<RecordMeta> = Vec::with_capacity(count);
        for _ in 0..count {
            let (meta, _) = RecordMeta::decode(&mut reader)?;
            if records.last().is_some_and(|last| last.lsn >= meta.lsn) {
                return Err(DecodeError::Malformed(
                    "record LSNs do not increase within the batch",
                ));
            }
            records.push(meta);
        }
        reader.finish("append")?;
        Ok(Self {
            header,
            records,
            body,
        })
    }

    /// The body as received.
    #[must_use]
    pub fn body(&self) -> &'a [u8] {
        self.body
    }

    /// Each record with its offset within the body, in body order.
    pub fn records_with_offsets(&self) -> impl Iterator<Item = (u32, RecordMeta)> + '_ {
        self.records.iter().scan(
            u32::try_from(APPEND_HEADER_BYTES).expect("small"),
            |offset, meta| {
                let at = *offset;
                *offset += meta.encoded_len;
                Some((at, *meta))
            },
        )
    }

    /// The owned form (copies every payload).
    pub fn to_append(&self) -> Result<Append, DecodeError> {
        Append::decode(self.body)
    }
}

fn records_len(records: &[LogRecord]) -> usize {
    records.iter().map(LogRecord::encoded_len).sum()
}

impl VolumeState {
    fn encode(&self, out: &mut Vec<u8>) {
        assert!(
            self.segments.len() <= HOST_SEGMENTS_MAX,
            "too many segments"
        );
        out.extend_from_slice(&self.volume.0.to_le_bytes());
        out.extend_from_slice(&self.epoch.0.to_le_bytes());
        out.extend_from_slice(&self.vdl.0.to_le_bytes());
        assert!(
            self.truncations.len() <= TRUNCATIONS_MAX,
            "too many truncations"
        );
        let count = u32::try_from(self.segments.len()).expect("bounded above");
        out.extend_from_slice(&count.to_le_bytes());
        let truncations = u32::try_from(self.truncations.len()).expect("bounded above");
        out.extend_from_slice(&truncations.to_le_bytes());
        for range in &self.truncations {
            encode_range(range, out);
        }
        for s in &self.segments {
            out.extend_from_slice(&s.pg.0.to_le_bytes());
            out.extend_from_slice(&s.segment.0.to_le_bytes());
            out.extend_from_slice(&s.scl.0.to_le_bytes());
            out.extend_from_slice(&s.backed_up.0.to_le_bytes());
            out.extend_from_slice(&s.snapshot.0.to_le_bytes());
        }
    }

    fn decode(reader: &mut Reader<'_>) -> Result<Self, DecodeError> {
        let volume = VolumeId(reader.u64("volume")?);
        let epoch = Epoch(reader.u64("epoch")?);
        let vdl = Lsn(reader.u64("vdl")?);
        let count = reader.u32("segment count")? as usize;
        let truncation_count = reader.u32("truncation count")? as usize;
        if truncation_count > TRUNCATIONS_MAX {
            return Err(DecodeError::Malformed("more truncations than the limit"));
        }
        let mut truncations = Vec::with_capacity(truncation_count);
        for _ in 0..truncation_count {
            truncations.push(decode_range(reader)?);
        }
        if count > HOST_SEGMENTS_MAX || count > reader.remaining() / 32 {
            return Err(DecodeError::Malformed(
                "segment count larger than the bytes can hold",
            ));
        }
        let mut segments = Vec::with_capacity(count);
        for _ in 0..count {
            segments.push(SegmentState {
                pg: PgId(reader.u32("pg")?),
                segment: SegmentIndex(reader.u32("segment")?),
                scl: Lsn(reader.u64("scl")?),
                backed_up: Lsn(reader.u64("backed up")?),
                snapshot: Lsn(reader.u64("snapshot")?),
            });
        }
        Ok(Self {
            volume,
            epoch,
            vdl,
            truncations,
            segments,
        })
    }
}

fn encode_range(range: &TruncationRange, out: &mut Vec<u8>) {
    out.extend_from_slice(&range.annul_epoch.0.to_le_bytes());
    out.extend_from_slice(&range.after.0.to_le_bytes());
    out.extend_from_slice(&range.through.0.to_le_bytes());
}

fn decode_range(reader: &mut Reader<'_>) -> Result<TruncationRange, DecodeError> {
    let range = TruncationRange {
        annul_epoch: Epoch(reader.u64("annul epoch")?),
        after: Lsn(reader.u64("after")?),
        through: Lsn(reader.u64("through")?),
    };
    if range.through < range.after {
        return Err(DecodeError::Malformed("truncation ends before it starts"));
    }
    Ok(range)
}

fn decode_truncate(reader: &mut Reader<'_>) -> Result<Truncate, DecodeError> {
    let truncate = Truncate {
        volume: VolumeId(reader.u64("volume")?),
        epoch: Epoch(reader.u64("epoch")?),
        range: decode_range(reader)?,
    };
    if truncate.range.annul_epoch > truncate.epoch {
        return Err(DecodeError::Malformed(
            "a truncation annuls epochs newer than its sender's",
        ));
    }
    Ok(truncate)
}

fn decode_fetch(reader: &mut Reader<'_>) -> Result<FetchRecords, DecodeError> {
    let fetch = FetchRecords {
        volume: VolumeId(reader.u64("volume")?),
        epoch: Epoch(reader.u64("epoch")?),
        pg: PgId(reader.u32("pg")?),
        segment: SegmentIndex(reader.u32("segment")?),
        after: Lsn(reader.u64("after")?),
        through: Lsn(reader.u64("through")?),
        bytes_max: reader.u32("bytes max")?,
    };
    if reader.u32("fetch reserved")? != 0 {
        return Err(DecodeError::Malformed("fetch reserved bytes are not zero"));
    }
    Ok(fetch)
}

fn decode_records_reply(body: &[u8]) -> Result<Records, DecodeError> {
    let mut reader = Reader::new(body);
    let volume = VolumeId(reader.u64("volume")?);
    let pg = PgId(reader.u32("pg")?);
    let segment = SegmentIndex(reader.u32("segment")?);
    let scl = Lsn(reader.u64("scl")?);
    let count = reader.u32("record count")?;
    if reader.u32("records reserved")? != 0 {
        return Err(DecodeError::Malformed(
            "records reserved bytes are not zero",
        ));
    }
    if count as usize > reader.remaining() / (8 + RECORD_HEADER_BYTES) {
        return Err(DecodeError::Malformed(
            "record count larger than the bytes can hold",
        ));
    }
    let mut epochs = Vec::with_capacity(count as usize);
    for _ in 0..count {
        epochs.push(Epoch(reader.u64("record epoch")?));
    }
    let records = decode_records(reader.take(reader.remaining(), "records")?, count)?;
    if !records
        .windows(2)
        .all(|w| matches!(w, [a, b] if a.lsn < b.lsn))
    {
        return Err(DecodeError::Malformed(
            "record LSNs do not increase within the reply",
        ));
    }
    Ok(Records {
        volume,
        pg,
        segment,
        scl,
        records,
        epochs,
    })
}

impl Append {
    /// The fixed part of this Append's body.
    ///
    /// # Panics
    /// If the batch holds more records than a frame could.
    #[must_use]
    pub fn header(&self) -> AppendHeader {
        AppendHeader {
            volume: self.volume,
            epoch: self.epoch,
            pg: self.pg,
            segment: self.segment,
            record_count: u32::try_from(self.records.len()).expect("record count fits a frame"),
            vdl: self.vdl,
        }
    }

    /// Appends the Append body (the journal entry format) to `out`.
    pub fn encode(&self, out: &mut Vec<u8>) {
        assert!(
            !self.records.is_empty(),
            "an append carries at least one record"
        );
        self.header().encode(out);
        encode_records(&self.records, out);
    }

    /// Decodes an Append body that fills `body` exactly, verifying every record's CRC and
    /// that LSNs strictly increase within the batch.
    pub fn decode(body: &[u8]) -> Result<Self, DecodeError> {
        let mut reader = Reader::new(body);
        let header = AppendHeader::decode(&mut reader)?;
        let records = decode_records(
            reader.take(reader.remaining(), "records")?,
            header.record_count,
        )?;
        let increasing = records
            .windows(2)
            .all(|w| matches!(w, [a, b] if a.lsn < b.lsn));
        if !increasing {
            return Err(DecodeError::Malformed(
                "record LSNs do not increase within the batch",
            ));
        }
        Ok(Self {
            volume: header.volume,
            epoch: header.epoch,
            pg: header.pg,
            segment: header.segment,
            vdl: header.vdl,
            records,
        })
    }

    /// Length of the encoded body.
    pub fn encoded_len(&self) -> usize {
        APPEND_HEADER_BYTES + records_len(&self.records)
    }
}
