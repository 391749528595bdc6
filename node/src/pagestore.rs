//! The page store: per segment, one file of page images, each with its page LSN and a CRC, so
//! reads need not replay a page's whole history from the journal and the journal can be
//! recycled. Coalescing ([`run_coalesce`]) applies journal records to images here; reads
//! ([`read_page`]) take the newest image at or below the read point and apply the records
//! above it.
//!
//! # Format
//!
//! One file per segment, `pages/v<volume>-pg<pg>-s<segment>.sfp` under the data directory,
//! opened with O_DIRECT. Each page has two slots side by side; a page's slots start at
//! `index × 2 × slot_bytes`, where `index` is the page's position in its PG (`page −
//! pg × pages_per_pg`; the page number itself while the geometry is unknown), and
//! `slot_bytes = align_up(32 + page_bytes, 4096)`. The file is sparse: pages never written
//! cost nothing and read back as zeroes (an empty slot).
//!
//! ```text
//! slot (slot_bytes, 4 KiB aligned)
//! 0        4            8          16         24        28         32            32+page_bytes
//! +--------+------------+----------+----------+---------+----------+-------------+---------+
//! | magic  | page_bytes | page id  | page LSN | CRC32C  | reserved | page image  | zeroes  |
//! | SFPG   | u32 LE     | u64 LE   | u64 LE   | u32 LE  | 0        |             | to 4KiB |
//! +--------+------------+----------+----------+---------+----------+-------------+---------+
//! CRC: crc32 over bytes [0, 24) and the page image.
//! ```
//!
//! # Crash consistency
//!
//! A coalescing round writes each page into the slot that does *not* hold its newest image,
//! then syncs the file; only then does the core record the round as materialized (and later
//! let the journal forget its records). So a crash tears at most the slot being written, the
//! other slot keeps the image the journal's remaining records continue, and a torn slot fails
//! its CRC. A slot that fails its CRC is never served nor used as a base: a read of the page
//! answers [`ErrorCode::Corrupt`](wire::ErrorCode::Corrupt) (the engine reads another segment)
//! and coalescing of the segment stops until the page is repaired. (A torn slot could safely
//! be ignored, but a flipped bit in the newest slot looks the same and ignoring it would serve
//! an old image: so every bad slot is treated as damage.)
//!
//! Invariants:
//! - an image is written only into the slot not holding the page's newest valid image;
//! - the newest valid image of every page covers every record of the page at or below the
//!   segment's durable `materialized` LSN;
//! - nothing that fails its CRC, names another page, or has another size is ever served.

use std::collections::{BTreeMap, HashMap};
use std::fs::File;
use std::io;
use std::os::fd::AsRawFd;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::sync::Mutex;

use io_uring::{IoUring, opcode, types};
use wire::{LogRecord, Lsn, PageId, PageImage};

use crate::io::aligned::{AlignedBuf, align_up};
use crate::io::raw::open_direct;
use crate::io::{DIRECT_IO_ALIGN, RecordReader};
use crate::manifest::SegmentKey;
use crate::segment::RecordLocation;

/// `SFPG`, little-endian.
pub const SLOT_MAGIC: u32 = u32::from_le_bytes(*b"SFPG");
pub const SLOT_HEADER_BYTES: usize = 32;

/// Bytes of one slot for pages of `page_bytes`.
pub const fn slot_bytes(page_bytes: usize) -> usize {
    align_up(SLOT_HEADER_BYTES + page_bytes)
}

/// Where a page lives in its segment's file and how big its slots are.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct PageSlots {
    pub key: SegmentKey,
    pub page: PageId,
    pub page_bytes: usize,
    /// Byte offset of the page's first slot.
    pub offset: u64,
}

impl PageSlots {
    pub fn new(key: SegmentKey, page: PageId, page_bytes: usize, pages_per_pg: u64) -> Self {
        assert!(page_bytes > 0);
        let index = if pages_per_pg > 0 {
            page.0 - u64::from(key.pg.0) * pages_per_pg
        } else {
            page.0
        };
        let offset = index * 2 * slot_bytes(page_bytes) as u64;
        assert!(offset.is_multiple_of(DIRECT_IO_ALIGN as u64));
        Self {
            key,
            page,
            page_bytes,
            offset,
        }
    }

    pub fn slot_bytes(&self) -> usize {
        slot_bytes(self.page_bytes)
    }

    pub fn slot_offset(&self, slot: usize) -> u64 {
        assert!(slot < 2);
        self.offset + (slot * self.slot_bytes()) as u64
    }
}

/// What a slot holds.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Slot {
    /// Never written (zeroes).
    Empty,
    Valid(PageImage),
    /// Damaged: why.
    Bad(String),
}

/// Lays out `image` as a slot in `buf` (header, image, zero padding).
pub fn encode_slot(image: &PageImage, buf: &mut AlignedBuf) {
    buf.clear();
    let mut header = [0u8; SLOT_HEADER_BYTES];
    header[0..4].copy_from_slice(&SLOT_MAGIC.to_le_bytes());
    let len = u32::try_from(image.bytes.len()).expect("pages are small");
    header[4..8].copy_from_slice(&len.to_le_bytes());
    header[8..16].copy_from_slice(&image.page.0.to_le_bytes());
    header[16..24].copy_from_slice(&image.lsn.0.to_le_bytes());
    let mut crc = crc32fast::Hasher::new();
    crc.update(&header[0..24]);
    crc.update(&image.bytes);
    header[24..28].copy_from_slice(&crc.finalize().to_le_bytes());
    buf.extend_from_slice(&header);
    buf.extend_from_slice(&image.bytes);
    buf.pad_to_alignment();
    assert!(buf.len() == slot_bytes(image.bytes.len()));
}

/// Reads a slot's bytes (as many as `slot_bytes`) as the slot of `page`.
pub fn decode_slot(bytes: &[u8], page: PageId, page_bytes: usize) -> Slot {
    let Some(header) = bytes.get(..SLOT_HEADER_BYTES) else {
        return Slot::Bad("slot shorter than its header".into());
    };
    if header.iter().all(|b| *b == 0) {
        return Slot::Empty;
    }
    let u32_at = |at: usize| u32::from_le_bytes(header[at..at + 4].try_into().expect("4 bytes"));
    let u64_at = |at: usize| u64::from_le_bytes(header[at..at + 8].try_into().expect("8 bytes"));
    if u32_at(0) != SLOT_MAGIC {
        return Slot::Bad(format!("page {} slot has no page header", page.0));
    }
    let len = u32_at(4) as usize;
    if len != page_bytes {
        return Slot::Bad(format!(
            "page {} slot holds {len} bytes, the volume's pages have {page_bytes}",
            page.0
        ));
    }
    let Some(data) = bytes.get(SLOT_HEADER_BYTES..SLOT_HEADER_BYTES + len) else {
        return Slot::Bad(format!("page {} slot is cut short", page.0));
    };
    let mut crc = crc32fast::Hasher::new();
    crc.update(&header[0..24]);
    crc.update(data);
    if crc.finalize() != u32_at(24) {
        return Slot::Bad(format!("page {} slot fails its CRC", page.0));
    }
    if u64_at(8) != page.0 {
        return Slot::Bad(format!(
            "page {} slot holds page {} (misdirected write)",
            page.0,
            u64_at(8)
        ));
    }
    Slot::Valid(PageImage {
        page,
        lsn: Lsn(u64_at(16)),
        bytes: data.to_vec(),
    })
}

/// Why a page has no usable image at or below a bound.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Unusable {
    /// A slot is damaged (or could not be read): never served, never a base.
    Damaged(String),
    /// Every image is newer than the bound (the newest's LSN): a repair from a peer wrote the
    /// page as of a later LSN; it covers every record up to that LSN.
    Newer(Lsn),
}

impl std::fmt::Display for Unusable {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Unusable::Damaged(why) => write!(f, "damaged: {why}"),
            Unusable::Newer(lsn) => write!(f, "the page store holds only an image at {lsn}"),
        }
    }
}

/// The newest valid image of a page at or below `at_most` (`None`: no image: the page starts
/// from zeroes) and the slot it is in; `Err` if either slot is damaged, or if every image lies
/// above `at_most`.
pub fn choose(slots: [Slot; 2], at_most: Lsn) -> Result<Option<(usize, PageImage)>, Unusable> {
    let mut valid: Vec<(usize, PageImage)> = Vec::new();
    for (index, slot) in slots.into_iter().enumerate() {
        match slot {
            Slot::Empty => {}
            Slot::Valid(image) => valid.push((index, image)),
            Slot::Bad(why) => return Err(Unusable::Damaged(why)),
        }
    }
    valid.sort_by_key(|(_, image)| std::cmp::Reverse(image.lsn));
    let newest_lsn = valid.first().map(|(_, i)| i.lsn);
    match valid.into_iter().find(|(_, image)| image.lsn <= at_most) {
        Some(found) => Ok(Some(found)),
        None => newest_lsn.map_or(Ok(None), |lsn| Err(Unusable::Newer(lsn))),
    }
}

/// Raw slot I/O on each segment's page file. Blocking: drivers call it off their runtime.
pub trait PageStore: Send + Sync {
    /// Reads both slots of a page into `buf` (2 × slot bytes); a file never written reads as
    /// zeroes.
    fn read_slots(&self, slots: &PageSlots, buf: &mut AlignedBuf) -> io::Result<()>;
    /// Writes each `(offset, slot bytes)` into the segment's file and makes them durable.
    fn write_durable(&self, key: &SegmentKey, writes: &[(u64, AlignedBuf)]) -> io::Result<()>;
    /// Bytes the store occupies on disk (for metrics and the soak bench).
    fn disk_bytes(&self) -> u64;
    /// The lowest offset at or after `from` in the segment's file that holds data (was ever
    /// written), if any: scrub skips the holes of the sparse file.
    fn next_data(&self, key: &SegmentKey, from: u64) -> io::Result<Option<u64>>;
}

/// Page files under `<data_dir>/pages`, O_DIRECT, written through one io_uring.
pub struct FilePageStore {
    dir: PathBuf,
    files: Mutex<HashMap<SegmentKey, std::sync::Arc<File>>>,
    ring: Mutex<IoUring>,
}

/// Slots written per io_uring submission.
const RING_ENTRIES: u32 = 64;

impl FilePageStore {
    pub fn open(data_dir: &Path) -> io::Result<Self> {
        let dir = data_dir.join("pages");
        std::fs::create_dir_all(&dir)?;
        Ok(Self {
            dir,
            files: Mutex::new(HashMap::new()),
            ring: Mutex::new(IoUring::new(RING_ENTRIES)?),
        })
    }

    pub fn path(&self, key: &SegmentKey) -> PathBuf {
        self.dir.join(format!(
            "v{}-pg{}-s{}.sfp",
            key.volume.0, key.pg.0, key.segment.0
        ))
    }

    /// The segment's file, opened (and created, if `create`) once.
    fn file(&self, key: &SegmentKey, create: bool) -> io::Result<Option<std::sync::Arc<File>>> {
        let mut files = self.files.lock().expect("page files lock");
        if let Some(file) = files.get(key) {
            return Ok(Some(file.clone()));
        }
        let path = self.path(key);
        if !create && !path.exists() {
            return Ok(None);
        }
        let file = std::sync::Arc::new(open_direct(&path, true)?);
        if create {
            File::open(&self.dir)?.sync_all()?; // The new file's name is durable too.
        }
        files.insert(*key, file.clone());
        Ok(Some(file))
    }
}

impl PageStore for FilePageStore {
    fn read_slots(&self, slots: &PageSlots, buf: &mut AlignedBuf) -> io::Result<()> {
        let len = 2 * slots.slot_bytes();
        buf.clear();
        buf.set_len(len);
        let Some(file) = self.file(&slots.key, false)? else {
            buf.as_mut_full()[..len].fill(0);
            return Ok(());
        };
        let out = &mut buf.as_mut_full()[..len];
        let mut done = 0;
        while done < len {
            // Past the end of a sparse file reads nothing: the rest is zeroes.
            let n = file.read_at(&mut out[done..], slots.offset + done as u64)?;
            if n == 0 {
                out[done..].fill(0);
                break;
            }
            done += n;
        }
        Ok(())
    }

    fn write_durable(&self, key: &SegmentKey, writes: &[(u64, AlignedBuf)]) -> io::Result<()> {
        if writes.is_empty() {
            return Ok(());
        }
        let file = self.file(key, true)?.expect("created");
        let fd = types::Fd(file.as_raw_fd());
        let mut ring = self.ring.lock().expect("page ring lock");
        for chunk in writes.chunks(RING_ENTRIES as usize) {
            for (index, (offset, buf)) in chunk.iter().enumerate() {
                assert!(offset.is_multiple_of(DIRECT_IO_ALIGN as u64));
                assert!(buf.len().is_multiple_of(DIRECT_IO_ALIGN));
                let len = u32::try_from(buf.len()).expect("slots are small");
                let entry = opcode::Write::new(fd, buf.as_ptr(), len)
                    .offset(*offset)
                    .build()
                    .user_data(index as u64);
                // SAFETY: every buffer and the file outlive this call, which waits below for
                // the completion of every entry it pushed before returning or pushing more.
                unsafe {
                    ring.submission()
                        .push(&entry)
                        .map_err(|e| io::Error::other(e.to_string()))?;
                }
            }
            ring.submit_and_wait(chunk.len())?;
            let mut completed = 0;
            let mut failure = None;
            for cqe in ring.completion() {
                completed += 1;
                let expected = chunk[cqe.user_data() as usize].1.len();
                if cqe.result() < 0 {
                    failure = Some(io::Error::from_raw_os_error(-cqe.result()));
                } else if cqe.result() as usize != expected {
                    failure = Some(io::Error::other("short page store write"));
                }
            }
            assert!(completed == chunk.len(), "submit_and_wait waited for all");
            if let Some(e) = failure {
                return Err(e);
            }
        }
        drop(ring);
        file.sync_data()
    }

    fn disk_bytes(&self) -> u64 {
        use std::os::unix::fs::MetadataExt;
        let Ok(entries) = std::fs::read_dir(&self.dir) else {
            return 0;
        };
        entries
            .filter_map(|e| e.ok()?.metadata().ok())
            .map(|m| m.blocks() * 512)
            .sum()
    }

    fn next_data(&self, key: &SegmentKey, from: u64) -> io::Result<Option<u64>> {
        let Some(file) = self.file(key, false)? else {
            return Ok(None);
        };
        let Ok(from) = libc::off_t::try_from(from) else {
            return Ok(None);
        };
        // SAFETY: lseek on a descriptor this store keeps open; no memory is passed.
        let at = unsafe { libc::lseek(file.as_raw_fd(), from, libc::SEEK_DATA) };
        if at < 0 {
            let e = io::Error::last_os_error();
            return match e.raw_os_error() {
                Some(libc::ENXIO) => Ok(None), // No data at or after `from`.
                _ => Err(e),
            };
        }
        Ok(Some(
            u64::try_from(at).expect("lseek returned a non-negative offset"),
        ))
    }
}

/// A page store in memory, for simulators and tests: writes land whole and are durable at
/// once (a crash before a round's `write_durable` loses the whole round, which the core then
/// repeats).
#[derive(Default)]
pub struct MemPageStore {
    files: Mutex<HashMap<SegmentKey, Vec<u8>>>,
}

impl MemPageStore {
    /// Flips one bit of a segment's file at `offset` (fault injection); false if not there.
    pub fn flip_bit(&self, key: &SegmentKey, offset: u64, bit: u8) -> bool {
        let mut files = self.files.lock().expect("page files lock");
        let Some(byte) = files.get_mut(key).and_then(|f| f.get_mut(offset as usize)) else {
            return false;
        };
        *byte ^= 1 << (bit % 8);
        true
    }

    /// Each segment's file length, for picking where to flip.
    pub fn lengths(&self) -> Vec<(SegmentKey, u64)> {
        let files = self.files.lock().expect("page files lock");
        files.iter().map(|(k, f)| (*k, f.len() as u64)).collect()
    }
}

impl PageStore for MemPageStore {
    fn read_slots(&self, slots: &PageSlots, buf: &mut AlignedBuf) -> io::Result<()> {
        let len = 2 * slots.slot_bytes();
        buf.clear();
        buf.set_len(len);
        let out = &mut buf.as_mut_full()[..len];
        out.fill(0);
        let files = self.files.lock().expect("page files lock");
        if let Some(image) = files.get(&slots.key) {
            let start = (slots.offset as usize).min(image.len());
            let end = (start + len).min(image.len());
            out[..end - start].copy_from_slice(&image[start..end]);
        }
        Ok(())
    }

    fn write_durable(&self, key: &SegmentKey, writes: &[(u64, AlignedBuf)]) -> io::Result<()> {
        let mut files = self.files.lock().expect("page files lock");
        let image = files.entry(*key).or_default();
        for (offset, buf) in writes {
            let start = *offset as usize;
            let end = start + buf.len();
            if image.len() < end {
                image.resize(end, 0);
            }
            image[start..end].copy_from_slice(buf.as_slice());
        }
        Ok(())
    }

    fn disk_bytes(&self) -> u64 {
        let files = self.files.lock().expect("page files lock");
        files.values().map(|f| f.len() as u64).sum()
    }

    fn next_data(&self, key: &SegmentKey, from: u64) -> io::Result<Option<u64>> {
        let files = self.files.lock().expect("page files lock");
        let Some(file) = files.get(key) else {
            return Ok(None);
        };
        let start = usize::try_from(from).unwrap_or(usize::MAX).min(file.len());
        let found = file[start..].iter().position(|b| *b != 0);
        Ok(found.map(|at| (start + at) as u64))
    }
}

/// One page of a coalescing round: its records in `(materialized, through]`.
#[derive(Clone, Debug)]
pub struct PageWork {
    pub page: PageId,
    pub records: Vec<RecordLocation>,
}

/// A coalescing round the core asked for: apply each page's records to its newest image and
/// write the result into the page's other slot, then make the segment's file durable.
#[derive(Clone, Debug)]
pub struct CoalesceJob {
    pub key: SegmentKey,
    pub page_bytes: usize,
    pub pages_per_pg: u64,
    /// Every page's records at or below this LSN end up in its image.
    pub through: Lsn,
    pub pages: Vec<PageWork>,
}

/// Carries out a coalescing round (blocking). Fails, writing nothing, if a slot is damaged or
/// a record cannot be read back; the core keeps the records and tries again later.
pub fn run_coalesce(
    job: &CoalesceJob,
    store: &dyn PageStore,
    reader: &dyn RecordReader,
) -> Result<(), String> {
    let mut slot_buf = AlignedBuf::new(2 * slot_bytes(job.page_bytes));
    let mut writes = Vec::with_capacity(job.pages.len());
    for work in &job.pages {
        let slots = PageSlots::new(job.key, work.page, job.page_bytes, job.pages_per_pg);
        let (target, image) = match base_image(store, &slots, job.through, &mut slot_buf) {
            Ok(found) => found,
            // A repair wrote the page as of a later LSN: it holds these records already.
            Err(Unusable::Newer(lsn)) if lsn > job.through => continue,
            Err(e) => return Err(format!("{} page {}: {e}", job.key, work.page.0)),
        };
        let records = reader.read(&work.records)?;
        let image = apply(image, &records, &work.records, job.through)?;
        let mut buf = AlignedBuf::new(slots.slot_bytes());
        encode_slot(&image, &mut buf);
        writes.push((slots.slot_offset(target), buf));
    }
    store
        .write_durable(&job.key, &writes)
        .map_err(|e| format!("page store write of {} failed: {e}", job.key))
}

/// The page's newest image at or below `at_most` (zeroes if none) and the slot a new image
/// goes into (the other one).
fn base_image(
    store: &dyn PageStore,
    slots: &PageSlots,
    at_most: Lsn,
    buf: &mut AlignedBuf,
) -> Result<(usize, PageImage), Unusable> {
    store.read_slots(slots, buf).map_err(|e| {
        Unusable::Damaged(format!(
            "page store read of {} page {}: {e}",
            slots.key, slots.page.0
        ))
    })?;
    let bytes = buf.as_slice();
    let slot_len = slots.slot_bytes();
    let decoded = [
        decode_slot(&bytes[..slot_len], slots.page, slots.page_bytes),
        decode_slot(&bytes[slot_len..2 * slot_len], slots.page, slots.page_bytes),
    ];
    Ok(match choose(decoded, at_most)? {
        Some((slot, image)) => (1 - slot, image),
        None => (0, PageImage::zeroed(slots.page, slots.page_bytes)),
    })
}

/// Applies the records above the image's LSN (those at or below it are in it already).
fn apply(
    mut image: PageImage,
    records: &[LogRecord],
    locations: &[RecordLocation],
    at_most: Lsn,
) -> Result<PageImage, String> {
    if records.len() != locations.len() {
        return Err(format!(
            "journal read returned {} records for {}",
            records.len(),
            locations.len()
        ));
    }
    for (record, location) in records.iter().zip(locations) {
        if record.lsn != location.lsn || record.page != image.page {
            return Err(format!(
                "journal holds record {} of page {} where {} of page {} was indexed",
                record.lsn, record.page.0, location.lsn, image.page.0
            ));
        }
        if record.lsn <= image.lsn || record.lsn > at_most {
            continue;
        }
        wire::apply_record(&mut image, record)
            .map_err(|e| format!("record {} does not apply: {e}", record.lsn))?;
    }
    Ok(image)
}

/// A scrub round of one segment, with the page repairs that are ready: write each repaired
/// image into both of its page's slots (durably), then read back up to `pages_max` written
/// pages from page index `pages_from` on and every record in `records`, checking CRCs.
#[derive(Clone, Debug)]
pub struct ScrubJob {
    pub key: SegmentKey,
    pub page_bytes: usize,
    pub pages_per_pg: u64,
    /// Images fetched from a peer for damaged pages (each at an LSN no lower than what the
    /// segment has materialized, no higher than its PGMRPL).
    pub repairs: Vec<PageImage>,
    /// The page index the check starts from (`None`: no page check this round).
    pub pages_from: Option<u64>,
    pub pages_max: usize,
    pub records: Vec<RecordLocation>,
}

/// What a scrub round found.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct ScrubReport {
    /// Why the repairs could not be written (then none counts as written).
    pub repair_error: Option<String>,
    pub pages_checked: usize,
    /// Where the next page check starts (`None`: the file's end was reached; start over).
    pub pages_next: Option<u64>,
    pub bad_pages: Vec<(PageId, String)>,
    pub records_checked: usize,
    pub bad_records: Vec<(Lsn, String)>,
}

/// Carries out a scrub round (blocking); see [`ScrubJob`].
pub fn run_scrub(job: &ScrubJob, store: &dyn PageStore, reader: &dyn RecordReader) -> ScrubReport {
    let mut report = ScrubReport::default();
    if !job.repairs.is_empty() {
        report.repair_error = write_repairs(job, store).err();
    }
    if let Some(from) = job.pages_from {
        check_pages(job, from, store, &mut report);
    }
    for location in &job.records {
        report.records_checked += 1;
        if let Err(why) = reader.read(std::slice::from_ref(location)) {
            report.bad_records.push((location.lsn, why));
        }
    }
    assert!(report.records_checked == job.records.len());
    report
}

/// Writes each repaired image into both slots of its page (the damaged one and the other,
/// which then cannot hold an older image that reads might mix up), then syncs.
fn write_repairs(job: &ScrubJob, store: &dyn PageStore) -> Result<(), String> {
    let mut writes = Vec::with_capacity(2 * job.repairs.len());
    for image in &job.repairs {
        if image.bytes.len() != job.page_bytes {
            return Err(format!(
                "repair of page {} has the wrong size",
                image.page.0
            ));
        }
        let slots = PageSlots::new(job.key, image.page, job.page_bytes, job.pages_per_pg);
        for slot in 0..2 {
            let mut buf = AlignedBuf::new(slots.slot_bytes());
            encode_slot(image, &mut buf);
            writes.push((slots.slot_offset(slot), buf));
        }
    }
    store
        .write_durable(&job.key, &writes)
        .map_err(|e| format!("page store write of {} failed: {e}", job.key))
}

/// Reads back written pages from page index `from` on, as many as the job allows.
fn check_pages(job: &ScrubJob, from: u64, store: &dyn PageStore, report: &mut ScrubReport) {
    let pair_bytes = 2 * slot_bytes(job.page_bytes) as u64;
    let first_page = if job.pages_per_pg > 0 {
        u64::from(job.key.pg.0) * job.pages_per_pg
    } else {
        0
    };
    let mut buf = AlignedBuf::new(pair_bytes as usize);
    let mut index = from;
    report.pages_next = Some(from);
    while report.pages_checked < job.pages_max {
        let next = match store.next_data(&job.key, index.saturating_mul(pair_bytes)) {
            Ok(Some(offset)) => offset / pair_bytes,
            Ok(None) => {
                report.pages_next = None;
                return;
            }
            Err(e) => {
                let why = format!("page store of {} unreadable: {e}", job.key);
                report.bad_pages.push((PageId(first_page + index), why));
                report.pages_next = Some(index + 1);
                return;
            }
        };
        if job.pages_per_pg > 0 && next >= job.pages_per_pg {
            report.pages_next = None;
            return;
        }
        let page = PageId(first_page + next);
        let slots = PageSlots::new(job.key, page, job.page_bytes, job.pages_per_pg);
        report.pages_checked += 1;
        index = next + 1;
        report.pages_next = Some(index);
        if let Err(e) = store.read_slots(&slots, &mut buf) {
            report.bad_pages.push((page, format!("unreadable: {e}")));
            continue;
        }
        let len = slots.slot_bytes();
        let bytes = buf.as_slice();
        for half in [&bytes[..len], &bytes[len..2 * len]] {
            if let Slot::Bad(why) = decode_slot(half, page, job.page_bytes) {
                report.bad_pages.push((page, why));
                break;
            }
        }
    }
}

/// A page read: the newest image at or below `read_point` plus the records above it.
#[derive(Clone, Debug)]
pub struct PageRead {
    pub slots: PageSlots,
    pub read_point: Lsn,
    /// Whether the page store may hold an image (nothing is materialized yet: skip it).
    pub use_store: bool,
    pub records: Vec<RecordLocation>,
}

/// Carries out a page read (blocking). `Err((corrupt, why))`: `corrupt` if the page store's
/// copy is damaged (never served; the reader should try another segment).
pub fn read_page(
    read: &PageRead,
    store: &dyn PageStore,
    reader: &dyn RecordReader,
) -> Result<PageImage, (bool, String)> {
    let image = if read.use_store {
        let mut buf = AlignedBuf::new(2 * read.slots.slot_bytes());
        match base_image(store, &read.slots, read.read_point, &mut buf) {
            Ok((_, image)) => image,
            Err(Unusable::Damaged(why)) => {
                return Err((true, format!("{}: {why}", read.slots.key)));
            }
            Err(newer @ Unusable::Newer(_)) => return Err((false, newer.to_string())),
        }
    } else {
        PageImage::zeroed(read.slots.page, read.slots.page_bytes)
    };
    let records = if read.records.is_empty() {
        Vec::new()
    } else {
        reader.read(&read.records).map_err(|e| (false, e))?
    };
    let image = apply(image, &records, &read.records, read.read_point).map_err(|e| (false, e))?;
    assert!(image.lsn <= read.read_point);
    Ok(image)
}

/// A page fetch for a peer rebuilding its segment: every non-empty page of the segment as of
/// `read_point`, from page index `from_index` on, until about `bytes_max` bytes.
#[derive(Clone, Debug)]
pub struct PagesRead {
    pub key: SegmentKey,
    pub page_bytes: usize,
    pub pages_per_pg: u64,
    pub read_point: Lsn,
    /// Whether the page store may hold images (something is materialized).
    pub use_store: bool,
    pub from_index: u64,
    /// The records above what is materialized, up to `read_point`, by page.
    pub records: BTreeMap<PageId, Vec<RecordLocation>>,
    pub bytes_max: usize,
}

/// Where the next page fetch starts when every page was sent.
pub const PAGES_DONE: u64 = u64::MAX;

/// Carries out a page fetch (blocking): the pages found and where the next fetch starts
/// ([`PAGES_DONE`] at the end). `Err((corrupt, why))` as [`read_page`].
pub fn read_pages(
    job: &PagesRead,
    store: &dyn PageStore,
    reader: &dyn RecordReader,
) -> Result<(Vec<PageImage>, u64), (bool, String)> {
    let pair_bytes = 2 * slot_bytes(job.page_bytes) as u64;
    let first_page = if job.pages_per_pg > 0 {
        u64::from(job.key.pg.0) * job.pages_per_pg
    } else {
        0
    };
    let limit = if job.pages_per_pg > 0 {
        job.pages_per_pg
    } else {
        u64::MAX
    };
    let mut out = Vec::new();
    let mut bytes = 0usize;
    let mut index = job.from_index;
    while index < limit {
        let in_store = if job.use_store {
            store
                .next_data(&job.key, index.saturating_mul(pair_bytes))
                .map_err(|e| (true, format!("page store of {}: {e}", job.key)))?
                .map(|offset| offset / pair_bytes)
        } else {
            None
        };
        let with_records = job
            .records
            .range(PageId(first_page + index)..)
            .next()
            .map(|(page, _)| page.0 - first_page);
        let Some(next) = [in_store, with_records].into_iter().flatten().min() else {
            return Ok((out, PAGES_DONE));
        };
        if next >= limit {
            break;
        }
        let page = PageId(first_page + next);
        let read = PageRead {
            slots: PageSlots::new(job.key, page, job.page_bytes, job.pages_per_pg),
            read_point: job.read_point,
            use_store: job.use_store,
            records: job.records.get(&page).cloned().unwrap_or_default(),
        };
        let image = read_page(&read, store, reader)?;
        index = next + 1;
        if image.lsn > Lsn::ZERO {
            bytes += image.bytes.len();
            out.push(image);
        }
        if bytes >= job.bytes_max {
            return Ok((out, index));
        }
    }
    Ok((out, PAGES_DONE))
}

#[cfg(test)]
mod tests {
    use super::*;
    use wire::{PgId, SegmentIndex, VolumeId};

    fn key() -> SegmentKey {
        SegmentKey {
            volume: VolumeId(1),
            pg: PgId(2),
            segment: SegmentIndex(3),
        }
    }

    fn image(lsn: u64, fill: u8) -> PageImage {
        PageImage {
            page: PageId(21),
            lsn: Lsn(lsn),
            bytes: vec![fill; 4096],
        }
    }

    fn slot_of(image: &PageImage) -> Vec<u8> {
        let mut buf = AlignedBuf::new(slot_bytes(4096));
        encode_slot(image, &mut buf);
        buf.as_slice().to_vec()
    }

    /// Goal: a slot round-trips, and every kind of damage is told apart from an empty slot.
    /// Method: encode, decode; flip each header field and a data byte; zeroes.
    #[test]
    fn slots_round_trip_and_damage_is_detected() {
        let img = image(7, 0xAB);
        let bytes = slot_of(&img);
        assert_eq!(bytes.len(), 8192);
        assert_eq!(decode_slot(&bytes, PageId(21), 4096), Slot::Valid(img));
        assert_eq!(decode_slot(&[0; 8192], PageId(21), 4096), Slot::Empty);
        for at in [0, 5, 9, 17, 25, 40, 4000] {
            let mut bad = bytes.clone();
            bad[at] ^= 0x10;
            assert!(
                matches!(decode_slot(&bad, PageId(21), 4096), Slot::Bad(_)),
                "flip at {at}"
            );
        }
        assert!(matches!(
            decode_slot(&bytes, PageId(22), 4096),
            Slot::Bad(why) if why.contains("misdirected")
        ));
        assert!(matches!(
            decode_slot(&bytes[..100], PageId(21), 4096),
            Slot::Bad(_)
        ));
    }

    /// Goal: the newest image at or below the bound is chosen, and damage is never skipped.
    /// Method: the slot combinations that matter.
    #[test]
    fn choose_takes_the_newest_usable_image_and_refuses_damage() {
        let (a, b) = (image(5, 1), image(9, 2));
        let v = |i: &PageImage| Slot::Valid(i.clone());
        let chosen = choose([v(&a), v(&b)], Lsn(100)).unwrap().unwrap();
        assert_eq!((chosen.0, chosen.1.lsn), (1, Lsn(9)));
        let chosen = choose([v(&a), v(&b)], Lsn(6)).unwrap().unwrap();
        assert_eq!((chosen.0, chosen.1.lsn), (0, Lsn(5)));
        assert_eq!(
            choose([Slot::Empty, v(&b)], Lsn(6)),
            Err(Unusable::Newer(Lsn(9)))
        );
        assert_eq!(choose([Slot::Empty, Slot::Empty], Lsn(6)).unwrap(), None);
        assert!(matches!(
            choose([v(&a), Slot::Bad("x".into())], Lsn(100)),
            Err(Unusable::Damaged(_))
        ));
    }

    /// Goal: slots of neighbouring pages never overlap and start 4 KiB aligned.
    /// Method: compute offsets of a PG's first pages.
    #[test]
    fn page_slots_are_disjoint_and_aligned() {
        let first = PageSlots::new(key(), PageId(2 * 100), 8192, 100);
        let second = PageSlots::new(key(), PageId(2 * 100 + 1), 8192, 100);
        assert_eq!(first.offset, 0);
        assert_eq!(first.slot_bytes(), 12288);
        assert_eq!(second.offset, 2 * 12288);
        assert_eq!(first.slot_offset(1), 12288);
    }
}
