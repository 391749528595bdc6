//! What a backup puts in object storage: the names and byte layouts of its objects. Nodes
//! write them (once per PG, by the PG's backup owner) and `sixfold restore` reads them back;
//! both sides use this module, so the format is defined once.
//!
//! Names, under the store's prefix (LSNs zero-padded to 20 digits, so names sort by LSN):
//!
//! ```text
//! <volume>/volume                                   the volume's geometry
//! <volume>/pg-<pg>/log/<after>-<through>            the PG's records in (after, through]
//! <volume>/pg-<pg>/pages/<first>/<batch>            page images of a snapshot (10-digit batch)
//! <volume>/pg-<pg>/pages/<first>/done               the snapshot is complete
//! ```
//!
//! Every object is an envelope around a body:
//!
//! ```text
//! offset  size  field
//!      0     4  magic      "SFBV" volume, "SFBL" log range, "SFBP" page batch, "SFBS" done
//!      4     4  version    1
//!      8     8  body_len
//!     16   len  body       (below, by magic)
//!  16+len    4  crc32      over bytes [0, 16 + len)
//! ```
//!
//! Bodies:
//!
//! ```text
//! volume:  u64 volume, u32 page_size_bytes, u32 pg_count, u64 pages_per_pg
//! log:     u64 volume, u32 pg, u32 record_count, u64 after, u64 through,
//!          u64 sealed_unix_ms, records (the wire record encoding, each with its own CRC)
//! pages:   u64 volume, u32 pg, u32 page_count, u64 first, pages (u64 page, u64 page_lsn,
//!          u32 len, u32 crc32, len bytes)
//! done:    u64 volume, u32 pg, u32 batch_count, u64 first, u64 last, u64 page_count,
//!          u64 done_unix_ms
//! ```
//!
//! Meaning and invariants:
//! - a log object holds the PG's chain from just above `after` through `through`: LSNs rise,
//!   each record's backlink is the record before it, the first record's backlink is at or
//!   below `after` (a range may start at a snapshot point that is no record's LSN), the last
//!   record is `through`. Every record in it was at or below a VDL some writer reached before
//!   `sealed_unix_ms`, so no truncation can ever annul it, and every MTR whose CPL is at or
//!   below `through` had committed by then: `(through, sealed_unix_ms)` is a time mark;
//! - a snapshot is fuzzy: it was read while coalescing went on, so each page image has its own
//!   page LSN in `[first, last]` (or below `first`: a page not written since). Replaying the
//!   PG's log from `first` on, applying a record only to a page whose image is older than it,
//!   gives the PG as of any target at or above `last`. A snapshot without its `done` object is
//!   incomplete and never used;
//! - objects are immutable: an upload repeated (after a takeover, or a retry) writes the same
//!   bytes under the same name, or a range overlapping another with the same records in it;
//!   nothing relies on a conditional PUT.
//!
//! Decoding never panics, checks every CRC, and never allocates more than the object's length
//! allows.

use crate::codec::{DecodeError, Reader};
use crate::frame::{PageReply, decode_page, encode_page};
use crate::geometry::Geometry;
use crate::record::{LogRecord, decode_records, encode_records};
use crate::types::{Lsn, PgId, VolumeId};

pub const VOLUME_MAGIC: [u8; 4] = *b"SFBV";
pub const LOG_MAGIC: [u8; 4] = *b"SFBL";
pub const PAGES_MAGIC: [u8; 4] = *b"SFBP";
pub const DONE_MAGIC: [u8; 4] = *b"SFBS";
pub const BACKUP_FORMAT_VERSION: u32 = 1;
const ENVELOPE_BYTES: usize = 20;
/// Largest object body a reader accepts (a writer seals log ranges and page batches far
/// below it).
pub const OBJECT_BODY_BYTES_MAX: usize = 256 << 20;

/// The volume's geometry, so a restore can build a volume of the same shape.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct VolumeObject {
    pub volume: VolumeId,
    pub geometry: Geometry,
}

/// A sealed range of one PG's chain.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct LogObject {
    pub volume: VolumeId,
    pub pg: PgId,
    pub after: Lsn,
    pub through: Lsn,
    pub sealed_unix_ms: u64,
    pub records: Vec<LogRecord>,
}

/// One batch of a snapshot's page images.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PagesObject {
    pub volume: VolumeId,
    pub pg: PgId,
    /// The snapshot: the PG's materialized LSN when it began.
    pub first: Lsn,
    pub pages: Vec<PageReply>,
}

/// A snapshot is complete: `batch_count` batches, images at or below `last`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct DoneObject {
    pub volume: VolumeId,
    pub pg: PgId,
    pub batch_count: u32,
    pub first: Lsn,
    pub last: Lsn,
    pub page_count: u64,
    pub done_unix_ms: u64,
}

/// `<volume>/volume`.
pub fn volume_name(volume: VolumeId) -> String {
    format!("{}/volume", volume.0)
}

/// `<volume>/pg-<pg>/`: everything of one PG.
pub fn pg_prefix(volume: VolumeId, pg: PgId) -> String {
    format!("{}/pg-{}/", volume.0, pg.0)
}

/// `<volume>/pg-<pg>/log/`.
pub fn log_prefix(volume: VolumeId, pg: PgId) -> String {
    format!("{}log/", pg_prefix(volume, pg))
}

/// `<volume>/pg-<pg>/log/<after>-<through>`.
pub fn log_name(volume: VolumeId, pg: PgId, after: Lsn, through: Lsn) -> String {
    format!(
        "{}{:020}-{:020}",
        log_prefix(volume, pg),
        after.0,
        through.0
    )
}

/// The range a log object's name (the part after [`log_prefix`]) stands for.
pub fn parse_log_name(leaf: &str) -> Option<(Lsn, Lsn)> {
    let (after, through) = leaf.split_once('-')?;
    let parse = |s: &str| (s.len() == 20).then(|| s.parse::<u64>().ok()).flatten();
    let (after, through) = (parse(after)?, parse(through)?);
    (after < through).then_some((Lsn(after), Lsn(through)))
}

/// `<volume>/pg-<pg>/pages/`.
pub fn snapshots_prefix(volume: VolumeId, pg: PgId) -> String {
    format!("{}pages/", pg_prefix(volume, pg))
}

/// `<volume>/pg-<pg>/pages/<first>/`.
pub fn snapshot_prefix(volume: VolumeId, pg: PgId, first: Lsn) -> String {
    format!("{}{:020}/", snapshots_prefix(volume, pg), first.0)
}

/// `<volume>/pg-<pg>/pages/<first>/<batch>`.
pub fn pages_name(volume: VolumeId, pg: PgId, first: Lsn, batch: u32) -> String {
    format!("{}{batch:010}", snapshot_prefix(volume, pg, first))
}

/// `<volume>/pg-<pg>/pages/<first>/done`.
pub fn done_name(volume: VolumeId, pg: PgId, first: Lsn) -> String {
    format!("{}done", snapshot_prefix(volume, pg, first))
}

/// The snapshot a `done` object's name (the part after [`snapshots_prefix`]) belongs to.
pub fn parse_done_name(leaf: &str) -> Option<Lsn> {
    let first = leaf.strip_suffix("/done")?;
    (first.len() == 20)
        .then(|| first.parse().ok().map(Lsn))
        .flatten()
}

/// What a PG's objects cover, as a listing shows them.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Coverage {
    /// Where the longest contiguous log runs to, from LSN 0 or from a complete snapshot's
    /// first LSN: the next log object starts here.
    pub log_end: Lsn,
    /// The PG can be restored to any point up to here (and from `snapshot` or 0 on).
    pub restorable: Lsn,
    /// The last LSN of the newest complete snapshot the restorable log starts from (0: the
    /// log starts at the PG's beginning, or there is none).
    pub snapshot: Lsn,
}

/// Where the log runs to from `start`, through `ranges` (`(after, through]` each, any order,
/// overlaps allowed: overlapping ranges hold the same records).
pub fn log_end_from(start: Lsn, ranges: &[(Lsn, Lsn)]) -> Lsn {
    let mut sorted: Vec<(Lsn, Lsn)> = ranges.to_vec();
    sorted.sort_unstable();
    let mut end = start;
    for (after, through) in sorted {
        if after > end {
            break; // A hole: nothing past it links to `start`.
        }
        end = end.max(through);
    }
    end
}

/// The coverage of a PG with these log ranges and complete snapshots (`(first, last)` each).
pub fn coverage(ranges: &[(Lsn, Lsn)], snapshots: &[(Lsn, Lsn)]) -> Coverage {
    let mut best = Coverage::default();
    let starts = std::iter::once((Lsn::ZERO, Lsn::ZERO)).chain(snapshots.iter().copied());
    for (first, last) in starts {
        let end = log_end_from(first, ranges);
        best.log_end = best.log_end.max(end);
        // From the PG's beginning (first = last = 0) the log alone serves every point it
        // reaches; from a snapshot, points from its last LSN on.
        let restorable = if end >= last { end } else { Lsn::ZERO };
        if restorable > best.restorable || (restorable == best.restorable && last > best.snapshot) {
            best.restorable = restorable;
            best.snapshot = last;
        }
    }
    assert!(best.restorable <= best.log_end);
    best
}

fn envelope(magic: [u8; 4], body: &[u8]) -> Vec<u8> {
    let mut out = Vec::with_capacity(ENVELOPE_BYTES + body.len());
    out.extend_from_slice(&magic);
    out.extend_from_slice(&BACKUP_FORMAT_VERSION.to_le_bytes());
    out.extend_from_slice(&(body.len() as u64).to_le_bytes());
    out.extend_from_slice(body);
    let crc = crc32fast::hash(&out);
    out.extend_from_slice(&crc.to_le_bytes());
    out
}

/// The body of an object of kind `magic`, its envelope and CRC checked.
fn open(bytes: &[u8], magic: [u8; 4]) -> Result<&[u8], DecodeError> {
    let Some(covered) = bytes.len().checked_sub(4).and_then(|n| bytes.get(..n)) else {
        return Err(DecodeError::Truncated {
            what: "backup object",
            needed: ENVELOPE_BYTES.saturating_sub(bytes.len()),
        });
    };
    let mut reader = Reader::new(covered);
    if reader.take(4, "magic")? != magic {
        return Err(DecodeError::Malformed("not a backup object of this kind"));
    }
    let version = reader.u32("version")?;
    if version != BACKUP_FORMAT_VERSION {
        return Err(DecodeError::Malformed("unsupported backup format version"));
    }
    let len = reader.u64("body length")?;
    if len > OBJECT_BODY_BYTES_MAX as u64 || len != reader.remaining() as u64 {
        return Err(DecodeError::Malformed(
            "backup object length does not match its header (cut short?)",
        ));
    }
    let stored = Reader::new(bytes.get(covered.len()..).unwrap_or_default()).u32("crc")?;
    let computed = crc32fast::hash(covered);
    if stored != computed {
        return Err(DecodeError::BadCrc {
            lsn: 0,
            stored,
            computed,
        });
    }
    reader.take(reader.remaining(), "body")
}

impl VolumeObject {
    pub fn encode(&self) -> Vec<u8> {
        let mut body = Vec::with_capacity(24);
        body.extend_from_slice(&self.volume.0.to_le_bytes());
        body.extend_from_slice(&self.geometry.page_size_bytes.to_le_bytes());
        body.extend_from_slice(&self.geometry.pg_count.to_le_bytes());
        body.extend_from_slice(&self.geometry.pages_per_pg.to_le_bytes());
        envelope(VOLUME_MAGIC, &body)
    }

    pub fn decode(bytes: &[u8]) -> Result<Self, DecodeError> {
        let mut reader = Reader::new(open(bytes, VOLUME_MAGIC)?);
        let object = Self {
            volume: VolumeId(reader.u64("volume")?),
            geometry: Geometry {
                page_size_bytes: reader.u32("page size")?,
                pg_count: reader.u32("pg count")?,
                pages_per_pg: reader.u64("pages per pg")?,
            },
        };
        reader.finish("volume object")?;
        Ok(object)
    }
}

impl LogObject {
    /// Encodes the range. Panics if the records are not the chain `(after, through]`.
    pub fn encode(&self) -> Vec<u8> {
        if let Err(why) = self.check() {
            panic!("log object {}-{}: {why}", self.after, self.through);
        }
        let mut body = Vec::with_capacity(
            40 + self
                .records
                .iter()
                .map(LogRecord::encoded_len)
                .sum::<usize>(),
        );
        body.extend_from_slice(&self.volume.0.to_le_bytes());
        body.extend_from_slice(&self.pg.0.to_le_bytes());
        let count = u32::try_from(self.records.len()).expect("checked");
        body.extend_from_slice(&count.to_le_bytes());
        body.extend_from_slice(&self.after.0.to_le_bytes());
        body.extend_from_slice(&self.through.0.to_le_bytes());
        body.extend_from_slice(&self.sealed_unix_ms.to_le_bytes());
        encode_records(&self.records, &mut body);
        envelope(LOG_MAGIC, &body)
    }

    pub fn decode(bytes: &[u8]) -> Result<Self, DecodeError> {
        let mut reader = Reader::new(open(bytes, LOG_MAGIC)?);
        let volume = VolumeId(reader.u64("volume")?);
        let pg = PgId(reader.u32("pg")?);
        let count = reader.u32("record count")?;
        let after = Lsn(reader.u64("after")?);
        let through = Lsn(reader.u64("through")?);
        let sealed_unix_ms = reader.u64("sealed time")?;
        let rest = reader.take(reader.remaining(), "records")?;
        let object = Self {
            volume,
            pg,
            after,
            through,
            sealed_unix_ms,
            records: decode_records(rest, count)?,
        };
        object.check().map_err(DecodeError::Malformed)?;
        Ok(object)
    }

    /// Whether the records are the chain `(after, through]`.
    pub fn check(&self) -> Result<(), &'static str> {
        let (Some(first), Some(last)) = (self.records.first(), self.records.last()) else {
            return Err("a log range holds at least one record");
        };
        if u32::try_from(self.records.len()).is_err() {
            return Err("too many records");
        }
        if first.backlink > self.after || first.lsn <= self.after {
            return Err("the first record does not follow the range's start");
        }
        if last.lsn != self.through {
            return Err("the last record is not the range's end");
        }
        let linked = self
            .records
            .windows(2)
            .all(|w| matches!(w, [a, b] if b.backlink == a.lsn && b.lsn > a.lsn));
        if !linked {
            return Err("the records are not one chain");
        }
        Ok(())
    }
}

impl PagesObject {
    pub fn encode(&self) -> Vec<u8> {
        let mut body =
            Vec::with_capacity(24 + self.pages.iter().map(|p| 24 + p.bytes.len()).sum::<usize>());
        body.extend_from_slice(&self.volume.0.to_le_bytes());
        body.extend_from_slice(&self.pg.0.to_le_bytes());
        let count = u32::try_from(self.pages.len()).expect("a batch holds fewer than 2^32 pages");
        body.extend_from_slice(&count.to_le_bytes());
        body.extend_from_slice(&self.first.0.to_le_bytes());
        for page in &self.pages {
            encode_page(page, &mut body);
        }
        envelope(PAGES_MAGIC, &body)
    }

    pub fn decode(bytes: &[u8]) -> Result<Self, DecodeError> {
        let mut reader = Reader::new(open(bytes, PAGES_MAGIC)?);
        let volume = VolumeId(reader.u64("volume")?);
        let pg = PgId(reader.u32("pg")?);
        let count = reader.u32("page count")? as usize;
        let first = Lsn(reader.u64("first")?);
        // Each page takes at least its 24-byte header: never allocate for more than fits.
        if count > reader.remaining() / 24 {
            return Err(DecodeError::Malformed(
                "page count exceeds what the batch holds",
            ));
        }
        let mut pages = Vec::with_capacity(count);
        for _ in 0..count {
            pages.push(decode_page(&mut reader)?);
        }
        reader.finish("page batch")?;
        Ok(Self {
            volume,
            pg,
            first,
            pages,
        })
    }
}

impl DoneObject {
    pub fn encode(&self) -> Vec<u8> {
        let mut body = Vec::with_capacity(48);
        body.extend_from_slice(&self.volume.0.to_le_bytes());
        body.extend_from_slice(&self.pg.0.to_le_bytes());
        body.extend_from_slice(&self.batch_count.to_le_bytes());
        body.extend_from_slice(&self.first.0.to_le_bytes());
        body.extend_from_slice(&self.last.0.to_le_bytes());
        body.extend_from_slice(&self.page_count.to_le_bytes());
        body.extend_from_slice(&self.done_unix_ms.to_le_bytes());
        envelope(DONE_MAGIC, &body)
    }

    pub fn decode(bytes: &[u8]) -> Result<Self, DecodeError> {
        let mut reader = Reader::new(open(bytes, DONE_MAGIC)?);
        let object = Self {
            volume: VolumeId(reader.u64("volume")?),
            pg: PgId(reader.u32("pg")?),
            batch_count: reader.u32("batch count")?,
            first: Lsn(reader.u64("first")?),
            last: Lsn(reader.u64("last")?),
            page_count: reader.u64("page count")?,
            done_unix_ms: reader.u64("done time")?,
        };
        reader.finish("done object")?;
        if object.last < object.first {
            return Err(DecodeError::Malformed("a snapshot ends before it begins"));
        }
        Ok(object)
    }
}

#[cfg(test)]
#[allow(clippy::indexing_slicing)]
mod tests {
    use super::*;
    use crate::record::RedoOp;
    use crate::types::PageId;

    fn chain(after: u64, lsns: &[u64]) -> Vec<LogRecord> {
        let mut backlink = after;
        lsns.iter()
            .map(|&lsn| {
                let r = LogRecord {
                    lsn: Lsn(lsn),
                    backlink: Lsn(backlink),
                    page: PageId(lsn % 3),
                    cpl: lsn % 2 == 0,
                    op: RedoOp::Write {
                        offset: 8,
                        bytes: vec![lsn as u8; 5],
                    },
                };
                backlink = lsn;
                r
            })
            .collect()
    }

    #[test]
    fn names_sort_by_lsn_and_parse_back() {
        let (v, pg) = (VolumeId(7), PgId(3));
        let a = log_name(v, pg, Lsn(9), Lsn(10));
        let b = log_name(v, pg, Lsn(10), Lsn(200));
        assert!(a < b);
        let leaf = b.strip_prefix(&log_prefix(v, pg)).unwrap();
        assert_eq!(parse_log_name(leaf), Some((Lsn(10), Lsn(200))));
        assert_eq!(parse_log_name("12-13"), None);
        let done = done_name(v, pg, Lsn(42));
        let leaf = done.strip_prefix(&snapshots_prefix(v, pg)).unwrap();
        assert_eq!(parse_done_name(leaf), Some(Lsn(42)));
        assert!(pages_name(v, pg, Lsn(42), 1) < done);
    }

    #[test]
    fn objects_round_trip_and_every_flipped_bit_is_caught() {
        let log = LogObject {
            volume: VolumeId(1),
            pg: PgId(2),
            after: Lsn(4),
            through: Lsn(9),
            sealed_unix_ms: 1_700_000_000_000,
            records: chain(3, &[5, 7, 9]),
        };
        let pages = PagesObject {
            volume: VolumeId(1),
            pg: PgId(2),
            first: Lsn(4),
            pages: vec![PageReply {
                page: PageId(2),
                page_lsn: Lsn(3),
                bytes: vec![1, 2, 3, 4],
            }],
        };
        let done = DoneObject {
            volume: VolumeId(1),
            pg: PgId(2),
            batch_count: 1,
            first: Lsn(4),
            last: Lsn(6),
            page_count: 1,
            done_unix_ms: 5,
        };
        let volume = VolumeObject {
            volume: VolumeId(1),
            geometry: Geometry {
                page_size_bytes: 8192,
                pages_per_pg: 1000,
                pg_count: 4,
            },
        };
        let encoded = [log.encode(), pages.encode(), done.encode(), volume.encode()];
        assert_eq!(LogObject::decode(&encoded[0]).unwrap(), log);
        assert_eq!(PagesObject::decode(&encoded[1]).unwrap(), pages);
        assert_eq!(DoneObject::decode(&encoded[2]).unwrap(), done);
        assert_eq!(VolumeObject::decode(&encoded[3]).unwrap(), volume);
        for bytes in &encoded {
            for bit in 0..bytes.len() * 8 {
                let mut bad = bytes.clone();
                bad[bit / 8] ^= 1 << (bit % 8);
                assert!(LogObject::decode(&bad).is_err());
                assert!(PagesObject::decode(&bad).is_err());
                assert!(DoneObject::decode(&bad).is_err());
                assert!(VolumeObject::decode(&bad).is_err());
            }
            for cut in 0..bytes.len() {
                assert!(LogObject::decode(&bytes[..cut]).is_err());
                assert!(PagesObject::decode(&bytes[..cut]).is_err());
            }
        }
        // A log object of another kind is refused by kind, not misread.
        assert!(LogObject::decode(&encoded[1]).is_err());
    }

    #[test]
    fn coverage_follows_the_log_from_the_start_or_a_snapshot() {
        let r = |a, b| (Lsn(a), Lsn(b));
        // Contiguous from 0, overlapping copies included.
        let c = coverage(&[r(0, 5), r(5, 9), r(3, 7), r(9, 12)], &[]);
        assert_eq!(
            (c.log_end, c.restorable, c.snapshot),
            (Lsn(12), Lsn(12), Lsn(0))
        );
        // A hole at (12, 20): the log past it starts at a snapshot taken at 20..25.
        let ranges = [r(0, 12), r(20, 30), r(30, 40)];
        let c = coverage(&ranges, &[(Lsn(20), Lsn(25))]);
        assert_eq!(
            (c.log_end, c.restorable, c.snapshot),
            (Lsn(40), Lsn(40), Lsn(25))
        );
        // Without the snapshot only the part from 0 is restorable.
        let c = coverage(&ranges, &[]);
        assert_eq!((c.log_end, c.restorable), (Lsn(12), Lsn(12)));
        // A snapshot whose log has not reached its last LSN yet restores nothing past 0's.
        let c = coverage(&[r(0, 3), r(20, 22)], &[(Lsn(20), Lsn(25))]);
        assert_eq!((c.log_end, c.restorable), (Lsn(22), Lsn(3)));
        assert_eq!(coverage(&[], &[]), Coverage::default());
    }

    #[test]
    fn a_log_range_must_be_one_chain() {
        let mut log = LogObject {
            volume: VolumeId(1),
            pg: PgId(0),
            after: Lsn(0),
            through: Lsn(3),
            sealed_unix_ms: 0,
            records: chain(0, &[1, 2, 3]),
        };
        assert!(log.check().is_ok());
        log.through = Lsn(4);
        assert!(log.check().is_err());
        log.through = Lsn(3);
        log.records.swap(0, 1);
        assert!(log.check().is_err());
        log.records = Vec::new();
        assert!(log.check().is_err());
    }
}
