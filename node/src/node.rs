//! A storage node: recovery at start, then step one of the foreground path (receive, verify,
//! queue) in front of the persister (step two).
//!
//! Invariants: a batch reaches the persister only if every record decoded with a good CRC,
//! the segment is hosted here and the batch's epoch is not older than the volume's; an epoch
//! newer than the recorded one is stored durably in the manifest first. Nothing from a bad
//! batch is persisted or acknowledged.

use std::sync::{Arc, Mutex};

use wire::{Append, ErrorCode, ErrorReply, Lsn};

use crate::config::NodeConfig;
use crate::journal::JournalFiles;
use crate::persister::{PersistRequest, PersistResult, Persister, PersisterConfig, SharedScls};
use crate::state::{Manifest, SegmentKey};

/// What recovery found, for logs and tests.
#[derive(Clone, Debug)]
pub struct RecoveryReport {
    pub groups: usize,
    pub records: usize,
    pub stop_reason: String,
    pub stale_headers_erased: u32,
}

pub struct Node {
    pub config: NodeConfig,
    manifest: Mutex<Manifest>,
    scls: SharedScls,
    persister: Persister,
}

impl Node {
    /// Opens the node's data directory, recovers the journal and starts the persister.
    pub fn open(config: NodeConfig) -> anyhow::Result<(Arc<Self>, RecoveryReport)> {
        std::fs::create_dir_all(&config.data_dir).map_err(|e| {
            anyhow::anyhow!("cannot create data_dir {}: {e}", config.data_dir.display())
        })?;
        let mut manifest = Manifest::load(&config.data_dir)?;
        let mut changed = false;
        for key in &config.segments {
            if !manifest.hosts(key) {
                manifest.segments.push(*key);
                changed = true;
            }
        }
        if changed {
            manifest.store(&config.data_dir)?;
        }
        let journal = JournalFiles::open_or_create(
            &config.data_dir.join("journal"),
            config.journal.file_bytes,
            config.journal.file_count,
        )?;
        let scan = journal.scan()?;
        let mut scls = std::collections::HashMap::new();
        let mut records = 0;
        for key in &manifest.segments {
            scls.insert(*key, crate::segment::SclTracker::new());
        }
        for group in &scan.groups {
            for entry in &group.entries {
                let key = SegmentKey {
                    volume: entry.volume,
                    pg: entry.pg,
                    segment: entry.segment,
                };
                if let Some(tracker) = scls.get_mut(&key) {
                    for record in &entry.records {
                        tracker.observe(record.lsn, record.backlink);
                        records += 1;
                    }
                }
            }
        }
        let stale_headers_erased = journal.erase_stale_tail(scan.end)?;
        let report = RecoveryReport {
            groups: scan.groups.len(),
            records,
            stop_reason: scan.stop_reason.clone(),
            stale_headers_erased,
        };
        let scls: SharedScls = Arc::new(Mutex::new(scls));
        let persister_config = PersisterConfig {
            inflight_groups_max: config.journal.inflight_groups_max,
            sync_mode: config.journal.sync_mode(),
        };
        let persister = Persister::start(
            journal,
            scan.end,
            scan.next_sequence,
            scls.clone(),
            persister_config,
        )?;
        let node = Self {
            config,
            manifest: Mutex::new(manifest),
            scls,
            persister,
        };
        Ok((Arc::new(node), report))
    }

    /// The SCL of a hosted segment.
    pub fn scl(&self, key: &SegmentKey) -> Option<Lsn> {
        self.scls
            .lock()
            .expect("scl lock")
            .get(key)
            .map(|t| t.scl())
    }

    /// Step one of the foreground path for a decoded (CRC-checked) batch: check the segment
    /// and the epoch, then queue it. `body` is the Append body as received.
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
        if let Err(error) = self.check_segment_and_epoch(append, &segment) {
            reply(Err(error));
            return;
        }
        let links = append.records.iter().map(|r| (r.lsn, r.backlink)).collect();
        self.persister.submit(PersistRequest {
            segment,
            body,
            links,
            reply,
        });
    }

    fn check_segment_and_epoch(
        &self,
        append: &Append,
        segment: &SegmentKey,
    ) -> Result<(), ErrorReply> {
        let mut manifest = self.manifest.lock().expect("manifest lock");
        if !manifest.hosts(segment) {
            return Err(ErrorReply::new(
                ErrorCode::UnknownSegment,
                format!("{segment} is not hosted by node {}", self.config.name),
            ));
        }
        let known = manifest.epoch(append.volume);
        if append.epoch < known {
            return Err(ErrorReply::new(
                ErrorCode::StaleEpoch,
                format!(
                    "epoch {} is older than volume {}'s epoch {known}",
                    append.epoch, append.volume
                ),
            ));
        }
        if append.epoch > known {
            // Rare (recovery, membership change): record the epoch durably before anything
            // carrying it can be acknowledged.
            let mut next = manifest.clone();
            next.epochs.insert(append.volume, append.epoch);
            next.store(&self.config.data_dir).map_err(|e| {
                ErrorReply::new(
                    ErrorCode::Internal,
                    format!("cannot record the new epoch: {e}"),
                )
            })?;
            *manifest = next;
        }
        Ok(())
    }
}
