//! Journal block groups: the unit of one durable write.
//!
//! Byte layout (little-endian), starting at a 4 KiB-aligned offset of a journal file:
//!
//! ```text
//! offset  size  field
//!      0     4  magic        "SFJG"
//!      4     2  version      1
//!      6     2  reserved     zero
//!      8     8  sequence     group number, +1 per group across the whole journal
//!     16     4  payload_len  bytes of entries that follow the header
//!     20     4  entry_count
//!     24     4  crc32        over bytes [0, 24) and the payload
//!     28     4  reserved     zero
//!     32     …  entries      entry_count × { u32 body_len, Append body (see wire::frame) }
//!      …     …  zero padding to the next 4 KiB boundary
//! ```
//!
//! Invariants: a group is valid only if its magic, version, bounds and CRC all check; a torn
//! write fails the CRC. Groups follow each other with consecutive sequence numbers, so the
//! durable end of the journal is the first position whose group is invalid or out of sequence
//! unless a valid group with a higher sequence follows it (corruption in the middle, which a
//! scan skips and reports: see the journal module).

use wire::codec::{DecodeError, Reader};
use wire::frame::Append;

/// "SFJG", little-endian.
pub const GROUP_MAGIC: u32 = u32::from_le_bytes(*b"SFJG");
pub const GROUP_VERSION: u16 = 1;
pub const GROUP_HEADER_BYTES: usize = 32;
/// Largest block group, header and padding included.
pub const GROUP_BYTES_MAX: usize = 8 * 1024 * 1024;

const _: () = assert!(GROUP_BYTES_MAX >= wire::FRAME_BYTES_MAX + 2 * crate::io::DIRECT_IO_ALIGN);
const _: () = assert!(GROUP_BYTES_MAX.is_multiple_of(crate::io::DIRECT_IO_ALIGN));

/// A decoded group header.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct GroupHeader {
    pub sequence: u64,
    pub payload_len: u32,
    pub entry_count: u32,
    pub crc: u32,
}

impl GroupHeader {
    /// Total bytes the group occupies on disk, padding included.
    pub fn group_bytes(&self) -> usize {
        crate::io::aligned::align_up(GROUP_HEADER_BYTES + self.payload_len as usize)
    }

    /// Decodes a header; `None` if the bytes are not a plausible header (end of journal).
    pub fn decode(bytes: &[u8]) -> Option<Self> {
        let mut r = Reader::new(bytes.get(..GROUP_HEADER_BYTES)?);
        let magic = r.u32("magic").ok()?;
        let version = r.u16("version").ok()?;
        let reserved = r.u16("reserved").ok()?;
        let sequence = r.u64("sequence").ok()?;
        let payload_len = r.u32("payload_len").ok()?;
        let entry_count = r.u32("entry_count").ok()?;
        let crc = r.u32("crc").ok()?;
        let reserved2 = r.u32("reserved").ok()?;
        let plausible = magic == GROUP_MAGIC
            && version == GROUP_VERSION
            && reserved == 0
            && reserved2 == 0
            && sequence < u64::MAX // so `sequence + 1` names the next group
            && GROUP_HEADER_BYTES + payload_len as usize <= GROUP_BYTES_MAX;
        plausible.then_some(Self {
            sequence,
            payload_len,
            entry_count,
            crc,
        })
    }
}

/// Writes a group header for `payload` into the first 32 bytes of `out`.
pub fn encode_header(sequence: u64, entry_count: u32, payload: &[u8], out: &mut [u8]) {
    assert!(out.len() >= GROUP_HEADER_BYTES);
    assert!(GROUP_HEADER_BYTES + payload.len() <= GROUP_BYTES_MAX);
    let payload_len = u32::try_from(payload.len()).expect("bounded by GROUP_BYTES_MAX");
    let mut h = [0u8; GROUP_HEADER_BYTES];
    h[0..4].copy_from_slice(&GROUP_MAGIC.to_le_bytes());
    h[4..6].copy_from_slice(&GROUP_VERSION.to_le_bytes());
    h[8..16].copy_from_slice(&sequence.to_le_bytes());
    h[16..20].copy_from_slice(&payload_len.to_le_bytes());
    h[20..24].copy_from_slice(&entry_count.to_le_bytes());
    let mut hasher = crc32fast::Hasher::new();
    hasher.update(&h[..24]);
    hasher.update(payload);
    h[24..28].copy_from_slice(&hasher.finalize().to_le_bytes());
    out[..GROUP_HEADER_BYTES].copy_from_slice(&h);
}

/// Whether `payload` matches the header's CRC.
pub fn payload_crc_ok(header_bytes: &[u8], header: &GroupHeader, payload: &[u8]) -> bool {
    let Some(fixed) = header_bytes.get(..24) else {
        return false;
    };
    let mut hasher = crc32fast::Hasher::new();
    hasher.update(fixed);
    hasher.update(payload);
    hasher.finalize() == header.crc
}

/// Splits a CRC-checked payload into its entries (Append bodies), each with the offset of its
/// body from the start of the group.
pub fn decode_entries(payload: &[u8], entry_count: u32) -> Result<Vec<(u64, Append)>, DecodeError> {
    let mut reader = Reader::new(payload);
    let mut entries = Vec::new();
    for _ in 0..entry_count {
        let len = reader.u32("entry length")? as usize;
        let offset = (GROUP_HEADER_BYTES + payload.len() - reader.remaining()) as u64;
        entries.push((offset, Append::decode(reader.take(len, "entry")?)?));
    }
    reader.finish("group payload")?;
    Ok(entries)
}

/// Appends one entry (length prefix + Append body bytes) to a group under construction.
pub fn push_entry(group: &mut crate::io::AlignedBuf, body: &[u8]) {
    let len = u32::try_from(body.len()).expect("entry fits a frame");
    group.extend_from_slice(&len.to_le_bytes());
    group.extend_from_slice(body);
}

/// Bytes an entry of `body_len` adds to a payload.
pub const fn entry_bytes(body_len: usize) -> usize {
    4 + body_len
}
