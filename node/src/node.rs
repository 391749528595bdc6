//! A storage node: recovery at start, then step one of the foreground path (receive, verify,
//! queue) in front of the persister (step two), and the read path.
//!
//! Invariants:
//! - a batch reaches the persister only if every record decoded with a good CRC, the segment
//!   is hosted here, its records' pages belong to its PG (when the geometry is known) and the
//!   batch's epoch is not older than the volume's; an epoch newer than the recorded one is
//!   stored durably in the manifest first. Nothing from a bad batch is persisted or acknowledged;
//! - a read at `read_point` is served only if the segment's SCL ≥ `read_point`, and returns
//!   the page with exactly the records ≤ `read_point` applied, each re-read from the journal and
//!   CRC-checked.

use std::collections::HashMap;
use std::fs::File;
use std::os::unix::fs::FileExt;
use std::sync::{Arc, Mutex};

use wire::codec::Reader;
use wire::{
    Append, ErrorCode, ErrorReply, HostSegments, LogRecord, Lsn, PageImage, PageReply, ReadPage,
    SetPgmrpl, VolumeId,
};

use crate::config::NodeConfig;
use crate::journal::{CorruptRange, JournalFiles};
use crate::persister::{
    PersistRequest, PersistResult, Persister, PersisterConfig, RecordInBody, SharedSegments,
};
use crate::segment::{RecordLocation, Segment};
use crate::state::{Manifest, SegmentKey, VolumeMeta};

/// What recovery found, for logs and tests.
#[derive(Clone, Debug)]
pub struct RecoveryReport {
    pub groups: usize,
    pub records: usize,
    /// Why the scan stopped: the torn tail, where new groups go.
    pub stop_reason: String,
    pub stale_headers_erased: u32,
    /// Corrupt ranges in the middle of the journal, skipped: every valid group after them is
    /// kept and indexed, and the segments whose records they held have a gap below those
    /// records (their SCL stops below it until the missing records arrive again).
    pub corrupt: Vec<CorruptRange>,
    /// Corrupt ranges beyond the listed ones, counted only.
    pub corrupt_omitted: u64,
}

pub struct Node {
    pub config: NodeConfig,
    manifest: Mutex<Manifest>,
    segments: SharedSegments,
    persister: Persister,
    /// Buffered read-only handles on the journal files, for the read path.
    read_files: Vec<File>,
}

fn error(code: ErrorCode, message: impl Into<String>) -> ErrorReply {
    ErrorReply::new(code, message)
}

impl Node {
    /// Opens the node's data directory, recovers the journal and starts the persister.
    pub fn open(config: NodeConfig) -> anyhow::Result<(Arc<Self>, RecoveryReport)> {
        std::fs::create_dir_all(&config.data_dir).map_err(|e| {
            anyhow::anyhow!("cannot create data_dir {}: {e}", config.data_dir.display())
        })?;
        let mut manifest = Manifest::load(&config.data_dir)?;
        let missing: Vec<_> = config
            .segments
            .iter()
            .filter(|k| !manifest.hosts(k))
            .copied()
            .collect();
        if !missing.is_empty() {
            manifest.segments.extend(missing);
            manifest.store(&config.data_dir)?;
        }
        let journal_dir = config.data_dir.join("journal");
        let journal = JournalFiles::open_or_create(
            &journal_dir,
            config.journal.file_bytes,
            config.journal.file_count,
        )?;
        // One group in memory at a time: recovery memory does not grow with the journal.
        let mut rebuild = Rebuild::new(&manifest);
        let scan = journal.scan_with(|group| rebuild.group(&group))?;
        let stale_headers_erased = journal.erase_stale_tail(scan.end, scan.next_sequence)?;
        let report = RecoveryReport {
            groups: rebuild.groups,
            records: rebuild.records,
            stop_reason: scan.stop_reason.clone(),
            stale_headers_erased,
            corrupt: scan.corrupt.clone(),
            corrupt_omitted: scan.corrupt_omitted,
        };
        let read_files = (0..journal.files.len() as u32)
            .map(|i| File::open(crate::journal::file_path(&journal_dir, i)))
            .collect::<Result<_, _>>()?;
        let segments: SharedSegments = Arc::new(Mutex::new(rebuild.segments));
        let persister_config = PersisterConfig {
            inflight_groups_max: config.journal.inflight_groups_max,
            sync_mode: config.journal.sync_mode(),
            mode: config.journal.persister_mode(),
        };
        let persister = Persister::start(
            journal,
            scan.end,
            scan.next_sequence,
            segments.clone(),
            persister_config,
        )?;
        let manifest = Mutex::new(manifest);
        let node = Self {
            config,
            manifest,
            segments,
            persister,
            read_files,
        };
        Ok((Arc::new(node), report))
    }

    /// Persists and acknowledges everything queued, then stops the persister.
    pub async fn shutdown(&self) {
        self.persister.shutdown().await;
    }

    /// The SCL of a hosted segment.
    pub fn scl(&self, key: &SegmentKey) -> Option<Lsn> {
        self.segments
            .lock()
            .expect("segments lock")
            .get(key)
            .map(Segment::scl)
    }

    /// Step one of the foreground path for a decoded (CRC-checked) batch: check the segment,
    /// the pages and the epoch, then queue it. `body` is the Append body as received.
    pub fn append(
        &self,
        append: &Append,
        body: Vec<u8>,
        reply: Box<dyn FnOnce(PersistResult) + Send>,
    ) {
        let segment = SegmentKey {
            volume: append.volume,
            pg: append.pg,
            segment: append.segment,
        };
        let checked = self
            .check_segment_and_epoch(append.epoch, &segment)
            .and_then(|meta| check_pages(&meta, append));
        if let Err(error) = checked {
            reply(Err(error));
            return;
        }
        let records = RecordInBody::of(append);
        self.persister.submit(PersistRequest {
            segment,
            body,
            records,
            reply,
        });
    }

    /// Checks that `segment` is hosted and `epoch` is current, recording a newer epoch durably.
    fn check_segment_and_epoch(
        &self,
        epoch: wire::Epoch,
        segment: &SegmentKey,
    ) -> Result<VolumeMeta, ErrorReply> {
        let mut manifest = self.manifest.lock().expect("manifest lock");
        if !manifest.hosts(segment) {
            return Err(error(
                ErrorCode::UnknownSegment,
                format!("{segment} is not hosted by node {}", self.config.name),
            ));
        }
        self.check_epoch(&mut manifest, segment.volume, epoch)
    }

    fn check_epoch(
        &self,
        manifest: &mut Manifest,
        volume: VolumeId,
        epoch: wire::Epoch,
    ) -> Result<VolumeMeta, ErrorReply> {
        let mut meta = manifest.volume(volume);
        if epoch < meta.epoch {
            return Err(error(
                ErrorCode::StaleEpoch,
                format!(
                    "epoch {epoch} is older than volume {volume}'s epoch {}",
                    meta.epoch
                ),
            ));
        }
        if epoch > meta.epoch {
            // Rare (recovery, membership change): record the epoch durably before anything
            // carrying it can be acknowledged.
            meta.epoch = epoch;
            let mut next = manifest.clone();
            next.volumes.insert(volume, meta);
            next.store(&self.config.data_dir).map_err(|e| {
                error(
                    ErrorCode::Internal,
                    format!("cannot record the new epoch: {e}"),
                )
            })?;
            *manifest = next;
        }
        Ok(meta)
    }

    /// Hosts the named segments from now on (idempotent), recording the volume's geometry.
    pub fn host_segments(&self, request: &HostSegments) -> Result<(), ErrorReply> {
        let page_size = request.page_size_bytes as usize;
        if page_size == 0 || page_size > wire::frame::PAGE_BYTES_MAX {
            return Err(error(
                ErrorCode::BadRequest,
                format!(
                    "page size {page_size} must be between 1 and {}",
                    wire::frame::PAGE_BYTES_MAX
                ),
            ));
        }
        let mut manifest = self.manifest.lock().expect("manifest lock");
        self.check_epoch(&mut manifest, request.volume, request.epoch)?;
        let mut next = manifest.clone();
        let meta = VolumeMeta {
            epoch: request.epoch,
            page_size_bytes: request.page_size_bytes,
            pages_per_pg: request.pages_per_pg,
        };
        next.volumes.insert(request.volume, meta);
        for (pg, segment) in &request.segments {
            let key = SegmentKey {
                volume: request.volume,
                pg: *pg,
                segment: *segment,
            };
            if !next.hosts(&key) {
                next.segments.push(key);
            }
        }
        next.store(&self.config.data_dir).map_err(|e| {
            error(
                ErrorCode::Internal,
                format!("cannot store the manifest: {e}"),
            )
        })?;
        let mut segments = self.segments.lock().expect("segments lock");
        for key in &next.segments {
            segments.entry(*key).or_default();
        }
        *manifest = next;
        Ok(())
    }

    /// Records a PG's minimum read point on every segment of it hosted here.
    pub fn set_pgmrpl(&self, request: &SetPgmrpl) -> Result<(), ErrorReply> {
        let mut segments = self.segments.lock().expect("segments lock");
        let mut found = false;
        for (key, segment) in segments.iter_mut() {
            if key.volume == request.volume && key.pg == request.pg {
                segment.raise_pgmrpl(request.pgmrpl);
                found = true;
            }
        }
        if !found {
            return Err(error(
                ErrorCode::UnknownSegment,
                format!(
                    "volume {} pg {} is not hosted here",
                    request.volume, request.pg
                ),
            ));
        }
        Ok(())
    }

    /// The PGMRPL a hosted segment holds.
    pub fn pgmrpl(&self, key: &SegmentKey) -> Option<Lsn> {
        self.segments
            .lock()
            .expect("segments lock")
            .get(key)
            .map(Segment::pgmrpl)
    }

    /// Serves a read (blocking: it reads the journal; call it off the async runtime).
    pub fn read_page(&self, request: &ReadPage) -> Result<PageReply, ErrorReply> {
        let key = SegmentKey {
            volume: request.volume,
            pg: request.pg,
            segment: request.segment,
        };
        let meta = self.check_segment_and_epoch(request.epoch, &key)?;
        if meta.pages_per_pg > 0 && request.page.0 / meta.pages_per_pg != u64::from(request.pg.0) {
            return Err(error(
                ErrorCode::BadRequest,
                format!("page {} is not in pg {}", request.page.0, request.pg),
            ));
        }
        let locations = {
            let segments = self.segments.lock().expect("segments lock");
            let segment = segments.get(&key).expect("hosted segments have state");
            segment
                .records_for_read(request.page, request.read_point)
                .map_err(|e| {
                    error(
                        ErrorCode::SclBelowReadPoint,
                        format!(
                            "{key} has SCL {} below read point {}",
                            e.scl, request.read_point
                        ),
                    )
                })?
        };
        let mut image = PageImage::zeroed(request.page, meta.page_size_bytes as usize);
        for location in &locations {
            let record = self.read_record(location)?;
            wire::apply_record(&mut image, &record).map_err(|e| {
                error(
                    ErrorCode::Internal,
                    format!("record {} does not apply: {e}", record.lsn),
                )
            })?;
        }
        assert!(image.lsn <= request.read_point);
        Ok(PageReply {
            page: request.page,
            page_lsn: image.lsn,
            bytes: image.bytes,
        })
    }

    /// Reads one record back from the journal and checks that it is the one indexed.
    fn read_record(&self, location: &RecordLocation) -> Result<LogRecord, ErrorReply> {
        let file = self
            .read_files
            .get(location.file as usize)
            .expect("indexed files exist");
        let mut bytes = vec![0u8; location.len as usize];
        file.read_exact_at(&mut bytes, location.offset)
            .map_err(|e| error(ErrorCode::Internal, format!("journal read failed: {e}")))?;
        let record = LogRecord::decode(&mut Reader::new(&bytes)).map_err(|e| {
            error(
                ErrorCode::Internal,
                format!("journal record at {location:?} is damaged: {e}"),
            )
        })?;
        // A record that checks but is not the one indexed was misdirected on disk: an
        // operating error (scrub and peers will repair it), reported, never served.
        if record.lsn != location.lsn {
            return Err(error(
                ErrorCode::Internal,
                format!(
                    "journal holds record {} where {} was indexed",
                    record.lsn, location.lsn
                ),
            ));
        }
        Ok(record)
    }
}

/// Rejects records whose page is outside the batch's PG, when the geometry is known.
fn check_pages(meta: &VolumeMeta, append: &Append) -> Result<VolumeMeta, ErrorReply> {
    if meta.pages_per_pg == 0 {
        return Ok(*meta);
    }
    let outside = append
        .records
        .iter()
        .find(|r| r.page.0 / meta.pages_per_pg != u64::from(append.pg.0));
    match outside {
        Some(r) => Err(error(
            ErrorCode::BadRequest,
            format!(
                "record {} is for page {}, outside pg {}",
                r.lsn, r.page.0, append.pg
            ),
        )),
        None => Ok(*meta),
    }
}

/// Each hosted segment's state, rebuilt group by group from the durable journal. Groups after
/// a corrupt range come like any other: their records are indexed (they are durable and must
/// be readable once the gap is filled) and, their backlinks pointing into the gap, wait in the
/// SCL tracker's pending set; the SCL stays below the gap.
struct Rebuild {
    segments: HashMap<SegmentKey, Segment>,
    groups: usize,
    records: usize,
}

impl Rebuild {
    fn new(manifest: &Manifest) -> Self {
        let segments = manifest
            .segments
            .iter()
            .map(|k| (*k, Segment::default()))
            .collect();
        Self {
            segments,
            groups: 0,
            records: 0,
        }
    }

    fn group(&mut self, group: &crate::journal::ScannedGroup) {
        self.groups += 1;
        for entry in &group.entries {
            let append = &entry.append;
            let key = SegmentKey {
                volume: append.volume,
                pg: append.pg,
                segment: append.segment,
            };
            let Some(segment) = self.segments.get_mut(&key) else {
                continue;
            };
            for record in RecordInBody::of(append) {
                segment.observe(&record.durable(group.position.file, entry.body_offset));
                self.records += 1;
            }
        }
    }
}
