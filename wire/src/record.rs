//! Log records: the only thing a database engine sends to storage.
//!
//! Byte layout (little-endian), a 40-byte header followed by the payload:
//!
//! ```text
//! offset  size  field
//!      0     8  lsn
//!      8     8  backlink   LSN of the previous record of the same PG (0 for the first)
//!     16     8  page       PageId
//!     24     1  flags      bit 0 = CPL (last record of an MTR); other bits zero
//!     25     1  op         0 = Init, 1 = Write
//!     26     2  reserved   zero
//!     28     4  offset     Write: first byte of the page to overwrite; Init: 0
//!     32     4  len        Write: payload length; Init: 0
//!     36     4  crc32      over bytes [0, 36) and the payload
//!     40   len  payload
//! ```
//!
//! Invariants: `backlink < lsn`; the CRC covers every byte but itself, so a flipped bit
//! anywhere is caught before the record is queued, persisted or applied.

use crate::codec::{DecodeError, Reader};
use crate::types::{Lsn, PageId};

/// Size of the fixed part of an encoded record.
pub const RECORD_HEADER_BYTES: usize = 40;
/// No record payload may be longer than this (the largest supported page).
pub const RECORD_PAYLOAD_BYTES_MAX: usize = 64 * 1024;

const FLAG_CPL: u8 = 1;
const OP_INIT: u8 = 0;
const OP_WRITE: u8 = 1;
const CRC_OFFSET: usize = 36;

/// A physical, engine-agnostic redo operation on one page.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum RedoOp {
    /// The page becomes all zeroes.
    Init,
    /// Overwrite `bytes.len()` bytes of the page starting at `offset`.
    Write { offset: u32, bytes: Vec<u8> },
}

/// One redo record.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct LogRecord {
    pub lsn: Lsn,
    /// LSN of the previous record of the same PG, `Lsn::ZERO` for the PG's first record.
    pub backlink: Lsn,
    pub page: PageId,
    /// Whether this record is a consistency point (the last record of an MTR).
    pub cpl: bool,
    pub op: RedoOp,
}

impl LogRecord {
    /// Encoded length in bytes.
    pub fn encoded_len(&self) -> usize {
        RECORD_HEADER_BYTES + self.payload().len()
    }

    fn payload(&self) -> &[u8] {
        match &self.op {
            RedoOp::Init => &[],
            RedoOp::Write { bytes, .. } => bytes,
        }
    }

    /// Appends the encoded record, CRC included, to `out`.
    pub fn encode(&self, out: &mut Vec<u8>) {
        assert!(self.backlink < self.lsn, "backlink must precede the record");
        assert!(self.payload().len() <= RECORD_PAYLOAD_BYTES_MAX);
        let start = out.len();
        let (op, offset) = match &self.op {
            RedoOp::Init => (OP_INIT, 0),
            RedoOp::Write { offset, .. } => (OP_WRITE, *offset),
        };
        out.extend_from_slice(&self.lsn.0.to_le_bytes());
        out.extend_from_slice(&self.backlink.0.to_le_bytes());
        out.extend_from_slice(&self.page.0.to_le_bytes());
        out.push(if self.cpl { FLAG_CPL } else { 0 });
        out.push(op);
        out.extend_from_slice(&0u16.to_le_bytes());
        out.extend_from_slice(&offset.to_le_bytes());
        let len = u32::try_from(self.payload().len()).expect("payload length checked above");
        out.extend_from_slice(&len.to_le_bytes());
        let mut hasher = crc32fast::Hasher::new();
        hasher.update(out.get(start..).expect("header just written"));
        hasher.update(self.payload());
        out.extend_from_slice(&hasher.finalize().to_le_bytes());
        out.extend_from_slice(self.payload());
        debug_assert_eq!(out.len() - start, self.encoded_len());
    }

    /// Decodes one record from the front of `reader`, verifying its CRC.
    pub fn decode(reader: &mut Reader<'_>) -> Result<Self, DecodeError> {
        let (meta, payload) = RecordMeta::decode(reader)?;
        let op = match meta.op {
            OP_INIT => RedoOp::Init,
            _ => RedoOp::Write {
                offset: meta.offset,
                bytes: payload.to_vec(),
            },
        };
        Ok(Self {
            lsn: meta.lsn,
            backlink: meta.backlink,
            page: meta.page,
            cpl: meta.cpl,
            op,
        })
    }
}

/// A record's header fields, checked (CRC included) without copying its payload: what a node
/// needs to index a record it will persist as received.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct RecordMeta {
    pub lsn: Lsn,
    pub backlink: Lsn,
    pub page: PageId,
    pub cpl: bool,
    op: u8,
    offset: u32,
    /// Encoded length, header included.
    pub encoded_len: u32,
}

impl RecordMeta {
    /// Checks one record at the front of `reader` (header, CRC, op, backlink) and returns its
    /// header fields and its payload.
    pub fn decode<'a>(reader: &mut Reader<'a>) -> Result<(Self, &'a [u8]), DecodeError> {
        let header = reader.take(RECORD_HEADER_BYTES, "record header")?;
        let mut h = Reader::new(header);
        let lsn = Lsn(h.u64("lsn")?);
        let backlink = Lsn(h.u64("backlink")?);
        let page = PageId(h.u64("page")?);
        let flags = h.u8("flags")?;
        let op = h.u8("op")?;
        let reserved = h.u16("reserved")?;
        let offset = h.u32("offset")?;
        let len = h.u32("len")? as usize;
        let stored = h.u32("crc")?;
        if flags & !FLAG_CPL != 0 {
            return Err(DecodeError::Malformed("unknown record flag bits"));
        }
        if reserved != 0 {
            return Err(DecodeError::Malformed("record reserved bytes are not zero"));
        }
        if len > RECORD_PAYLOAD_BYTES_MAX {
            return Err(DecodeError::Malformed(
                "record payload longer than the limit",
            ));
        }
        let payload = reader.take(len, "record payload")?;
        let mut hasher = crc32fast::Hasher::new();
        hasher.update(header.get(..CRC_OFFSET).unwrap_or_default());
        hasher.update(payload);
        let computed = hasher.finalize();
        if computed != stored {
            return Err(DecodeError::BadCrc {
                lsn: lsn.0,
                stored,
                computed,
            });
        }
        if backlink >= lsn {
            return Err(DecodeError::Malformed(
                "record backlink does not precede its LSN",
            ));
        }
        match op {
            OP_INIT if offset == 0 && len == 0 => {}
            OP_INIT => return Err(DecodeError::Malformed("Init record with offset or payload")),
            OP_WRITE => {}
            other => return Err(DecodeError::UnknownOp(other)),
        }
        let encoded_len = u32::try_from(RECORD_HEADER_BYTES + len).expect("bounded above");
        let meta = Self {
            lsn,
            backlink,
            page,
            cpl: flags & FLAG_CPL != 0,
            op,
            offset,
            encoded_len,
        };
        Ok((meta, payload))
    }
}

/// Decodes exactly `count` records that must fill `bytes` completely. Allocation is bounded
/// by `bytes.len()`: a count larger than the bytes could hold is rejected up front.
pub fn decode_records(bytes: &[u8], count: u32) -> Result<Vec<LogRecord>, DecodeError> {
    let count = count as usize;
    if count > bytes.len() / RECORD_HEADER_BYTES {
        return Err(DecodeError::Malformed(
            "record count larger than the bytes can hold",
        ));
    }
    let mut reader = Reader::new(bytes);
    let mut records = Vec::with_capacity(count);
    for _ in 0..count {
        records.push(LogRecord::decode(&mut reader)?);
    }
    reader.finish("records")?;
    Ok(records)
}

/// Encodes `records` back to back.
pub fn encode_records(records: &[LogRecord], out: &mut Vec<u8>) {
    for record in records {
        record.encode(out);
    }
}
