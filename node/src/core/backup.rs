//! Continuous backup to object storage, once per PG (DESIGN.md "Backup"; the objects are
//! `wire::backup`'s). The core decides what to upload and when; the driver carries out each
//! [`BackupJob`] (object-store calls, journal and page-store reads) and reports back with
//! [`NodeCore::handle_backup_done`].
//!
//! - **Owner.** Every segment of a PG computes the PG's backup owner the same way: the
//!   lowest-numbered segment that is up, as this node sees it (its own hosted segments, and
//!   peers heard from within gossip's `peer_fresh` at this node's epoch). Only a node hosting
//!   the owner uploads. When the owner goes quiet another segment takes over; two nodes that
//!   both think they own the PG for a while upload the same ranges, which is harmless (objects
//!   are named by their LSN range and hold the same records).
//! - **Taking over.** A new owner first lists the PG's objects ([`BackupJob::List`]) to learn
//!   where the log ends (`log_end`) and what is restorable (`backed_up`, `snapshot`).
//! - **Log.** The owner seals the PG's chain in `(log_end, min(SCL, VDL hint)]` into one log
//!   object once `log_bytes` of records wait or `log_interval` has passed. Never past the VDL
//!   hint: every truncation starts above every VDL a writer reported, so nothing backed up is
//!   ever annulled, and the object's seal time is a true time mark.
//! - **Snapshots.** Every `snapshot_interval` (and at once when the log cannot go on because
//!   the journal no longer holds `(log_end, …]`), the owner uploads its page store as of its
//!   materialized LSN, batch by batch, each batch a background job (never beside a coalescing
//!   round), then the snapshot's `done` object. A snapshot started for a gap restarts the log
//!   at its first LSN.
//! - **GC.** Each segment holds journal records above the PG's backup floor (the owner's
//!   `log_end`, a non-owner's `backed_up` as gossip tells it), until the journal reaches its
//!   reserve: then continuity is given up (one WARN) rather than the node's writes, and a new
//!   snapshot restarts the backup.
//! - **Lag.** `lag_bytes`: bytes of records held above the backup floor. Past
//!   `lag_bytes_max`, acks are delayed (see `throttle`) and the node says so once.
//!
//! Invariants:
//! - at most one job per PG in flight; a PG's `log_end` only moves when an upload succeeded;
//! - `backed_up` is only ever raised (own uploads, a listing, peers' word);
//! - with backup off, nothing here holds records or asks for anything.

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use wire::backup::Coverage;
use wire::{Geometry, Lsn, PgId, VolumeId};

use super::{NodeCore, NodeOutput, Phase};
use crate::manifest::SegmentKey;
use crate::pagestore::PagesRead;
use crate::segment::RecordLocation;

/// How backup runs.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct BackupConfig {
    pub enabled: bool,
    /// A log object is sealed once this many bytes of records wait…
    pub log_bytes: usize,
    /// …or once this long has passed since the last one.
    pub log_interval: Duration,
    pub snapshot_interval: Duration,
    /// Bytes of records waiting for backup past which acks are delayed.
    pub lag_bytes_max: u64,
    /// After a failed job, the PG waits this long before trying again.
    pub retry_interval: Duration,
}

impl Default for BackupConfig {
    fn default() -> Self {
        Self {
            enabled: false,
            log_bytes: 4 << 20,
            log_interval: Duration::from_secs(1),
            snapshot_interval: Duration::from_secs(300),
            lag_bytes_max: 1 << 30,
            retry_interval: Duration::from_secs(1),
        }
    }
}

/// Bytes of pages one snapshot batch holds at most.
pub const SNAPSHOT_BATCH_BYTES: usize = 4 << 20;

/// A backup job the core asked for.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct BackupToken(pub u64);

/// What the driver carries out for backup.
#[derive(Clone, Debug)]
pub enum BackupJob {
    /// List the PG's objects; report [`BackupOutcome::Listed`].
    List { volume: VolumeId, pg: PgId },
    /// Read these records (the PG's chain in `(after, through]`, in order) and put them as
    /// the log object `(after, through]`, sealed with the wall-clock time; put the volume
    /// object too if this driver has not yet. Report [`BackupOutcome::Uploaded`].
    Log {
        volume: VolumeId,
        pg: PgId,
        geometry: Geometry,
        after: Lsn,
        through: Lsn,
        records: Vec<RecordLocation>,
    },
    /// Read these pages ([`crate::pagestore::read_pages`]) and put them as batch `batch` of
    /// snapshot `first`; report [`BackupOutcome::Pages`].
    Pages {
        first: Lsn,
        batch: u32,
        read: PagesRead,
    },
    /// Put the `done` object of a snapshot (the driver stamps the time).
    Done {
        volume: VolumeId,
        pg: PgId,
        first: Lsn,
        last: Lsn,
        batch_count: u32,
        page_count: u64,
    },
}

/// How a [`BackupJob`] went.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum BackupOutcome {
    Listed(Coverage),
    Uploaded,
    /// A snapshot batch is stored: its page count, and where the next batch starts
    /// ([`crate::pagestore::PAGES_DONE`] when none is left).
    Pages {
        pages: u64,
        next_index: u64,
    },
    /// Why it failed: one line (the object store's error, classified by the driver).
    Failed(String),
}

/// A job of PG `id` failed: retried at `retry`, one WARN per run of failures; a snapshot
/// batch that failed starts its snapshot over (pages moved on meanwhile).
fn note_failed(
    p: &mut PgBackup,
    id: (VolumeId, PgId),
    kind: InflightKind,
    retry: Option<Instant>,
    why: &str,
) {
    p.retry_at = retry;
    if !p.warned {
        p.warned = true;
        tracing::warn!(
            "backup of volume {} pg {}: {why} (retrying; backup lag grows meanwhile)",
            id.0,
            id.1
        );
    }
    if matches!(kind, InflightKind::Pages) {
        p.run = None;
    }
}

/// What backup has done, for metrics and tests.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct BackupStats {
    pub log_objects: u64,
    pub log_bytes: u64,
    pub snapshots: u64,
    pub snapshot_pages: u64,
    pub snapshot_batches: u64,
    pub failures: u64,
    /// Bytes of records held above the backup floor, as last counted.
    pub lag_bytes: u64,
    /// Times the journal's reserve made GC give up backup continuity.
    pub gaps: u64,
}

/// A snapshot being uploaded.
#[derive(Clone, Copy, Debug)]
struct SnapshotRun {
    key: SegmentKey,
    first: Lsn,
    last: Lsn,
    next_batch: u32,
    next_index: u64,
    pages: u64,
}

/// One hosted PG's backup.
#[derive(Clone, Copy, Debug, Default)]
struct PgBackup {
    /// Restorable through this LSN (own uploads, a listing, peers' word).
    backed_up: Lsn,
    /// The newest complete snapshot serves targets from this LSN on.
    snapshot: Lsn,
    /// Owner only, once listed: where the uploaded log ends (the next object starts there).
    log_end: Option<Lsn>,
    /// Owner only: the log restarted at a snapshot that is not complete yet; `backed_up`
    /// follows `log_end` again once that snapshot is done and the log reaches its last LSN.
    restart: Option<Lsn>,
    /// Owner only: the log is restorable only from here on (the last LSN of the snapshot that
    /// ended the last restart; 0: from the PG's beginning).
    restorable_from: Lsn,
    last_log: Option<Instant>,
    last_snapshot: Option<Instant>,
    run: Option<SnapshotRun>,
    busy: Option<BackupToken>,
    retry_at: Option<Instant>,
    /// Nothing was due at the last look: look again then (new records wait for it; that is
    /// what `log_interval` batches).
    wake_at: Option<Instant>,
    /// The last failure was logged (one WARN per run of failures).
    warned: bool,
}

pub(super) struct Backup {
    pub(super) config: BackupConfig,
    pgs: BTreeMap<(VolumeId, PgId), PgBackup>,
    inflight: BTreeMap<BackupToken, ((VolumeId, PgId), InflightKind)>,
    next_token: u64,
    /// A snapshot batch (a page-store read) is in flight: it counts as a background job.
    pub(super) reading_pages: Option<BackupToken>,
    lag_warned: bool,
    /// When `stats.lag_bytes` was counted last (once per `log_interval`).
    lag_counted: Option<Instant>,
    pub(super) stats: BackupStats,
}

#[derive(Clone, Copy, Debug)]
enum InflightKind {
    List,
    Log { through: Lsn, bytes: u64 },
    Pages,
    Done,
}

impl Backup {
    pub(super) fn new() -> Self {
        Self {
            config: BackupConfig::default(),
            pgs: BTreeMap::new(),
            inflight: BTreeMap::new(),
            next_token: 1,
            reading_pages: None,
            lag_warned: false,
            lag_counted: None,
            stats: BackupStats::default(),
        }
    }

    /// What a hosted segment reports of its PG's backup in a VolumeState.
    pub(super) fn state_of(&self, key: &SegmentKey) -> (Lsn, Lsn) {
        self.pgs
            .get(&(key.volume, key.pg))
            .map_or((Lsn::ZERO, Lsn::ZERO), |p| (p.backed_up, p.snapshot))
    }
}

impl NodeCore {
    /// Replaces backup's settings (the node's `[backup]` table, tests).
    pub fn configure_backup(&mut self, config: BackupConfig) {
        assert!(config.log_bytes > 0);
        assert!(config.log_interval > Duration::ZERO);
        self.backup.config = config;
    }

    pub fn backup_stats(&self) -> BackupStats {
        self.backup.stats
    }

    /// The PG of `key`'s backup as this node knows it: (backed up through, newest snapshot).
    pub fn backup_state(&self, key: &SegmentKey) -> (Lsn, Lsn) {
        self.backup.state_of(key)
    }

    /// A peer segment said what it knows of its PG's backup.
    pub(super) fn note_peer_backup(&mut self, key: &SegmentKey, backed_up: Lsn, snapshot: Lsn) {
        if let Some(pg) = self.backup.pgs.get_mut(&(key.volume, key.pg)) {
            pg.backed_up = pg.backed_up.max(backed_up);
            pg.snapshot = pg.snapshot.max(snapshot);
        }
    }

    /// The hosted segment that uploads `pg`'s backup, if this node owns it: the lowest
    /// hosted segment of the PG, unless a lower one of a peer is up at this node's epoch.
    fn backup_owner(&self, volume: VolumeId, pg: PgId) -> Option<SegmentKey> {
        let own = self
            .segments
            .range(super::volume_keys(volume))
            .map(|(key, _)| *key)
            .find(|key| key.pg == pg)?;
        let epoch = self.epoch(volume);
        let lower_peer_up = self
            .fresh_peer_views(&own)
            .any(|(segment, e, _)| e == epoch && segment < own.segment);
        (!lower_peer_up).then_some(own)
    }

    /// How far GC may release `key`'s records for backup's sake (`None`: backup is off).
    pub(super) fn backup_floor(&self, key: &SegmentKey) -> Option<Lsn> {
        if !self.backup.config.enabled {
            return None;
        }
        let pg = self.backup.pgs.get(&(key.volume, key.pg));
        Some(pg.map_or(Lsn::ZERO, |p| {
            let run = p.run.map(|r| r.first);
            [p.log_end, run]
                .into_iter()
                .flatten()
                .min()
                .unwrap_or(p.backed_up)
        }))
    }

    /// GC released records of `key` above its backup floor (the journal's reserve): the log
    /// cannot go on from there; a snapshot restarts it.
    pub(super) fn note_backup_gap(&mut self, key: &SegmentKey, base: Lsn) {
        let Some(floor) = self.backup_floor(key) else {
            return;
        };
        let owner = self
            .backup
            .pgs
            .get(&(key.volume, key.pg))
            .is_some_and(|p| p.log_end.is_some());
        if base <= floor || !owner {
            return;
        }
        self.backup.stats.gaps += 1;
        tracing::warn!(
            "{key}: the journal reached its reserve before backup caught up: records ({floor}, \
             {base}] left it unbacked; a new snapshot will restart the backup"
        );
        if let Some(pg) = self.backup.pgs.get_mut(&(key.volume, key.pg)) {
            pg.log_end = pg.log_end.map(|_| base);
            pg.restart = pg.log_end;
            pg.last_snapshot = None;
        }
    }

    /// When backup wants the core's timer.
    pub(super) fn backup_timeout(&self) -> Option<Instant> {
        if !self.backup.config.enabled || self.phase != Phase::Serving {
            return None;
        }
        self.backup
            .pgs
            .values()
            .filter(|p| p.busy.is_none())
            .filter_map(|p| match (p.retry_at, p.wake_at) {
                (Some(a), Some(b)) => Some(a.max(b)),
                (a, b) => a.or(b),
            })
            .min()
    }

    /// Starts every backup job that is due.
    pub(super) fn schedule_backup(&mut self) {
        if !self.backup.config.enabled || self.phase != Phase::Serving {
            return;
        }
        let Some(now) = self.gossip_now() else {
            return;
        };
        if self
            .backup
            .lag_counted
            .is_none_or(|at| now >= at + self.backup.config.log_interval)
        {
            self.backup.lag_counted = Some(now);
            self.refresh_backup_lag();
        }
        let hosted: Vec<(VolumeId, PgId)> =
            self.segments.keys().map(|k| (k.volume, k.pg)).collect();
        self.backup.pgs.retain(|id, _| hosted.contains(id));
        for id in hosted {
            self.backup.pgs.entry(id).or_default();
            self.schedule_pg_backup(now, id);
        }
    }

    fn schedule_pg_backup(&mut self, now: Instant, (volume, pg): (VolumeId, PgId)) {
        let state = self.backup.pgs[&(volume, pg)];
        let waiting = [state.retry_at, state.wake_at].into_iter().flatten();
        if state.busy.is_some() || waiting.max().is_some_and(|at| now < at) {
            return;
        }
        let interval = self.backup.config.log_interval;
        self.backup
            .pgs
            .get_mut(&(volume, pg))
            .expect("listed")
            .wake_at = Some(now + interval);
        let Some(owner) = self.backup_owner(volume, pg) else {
            let p = self.backup.pgs.get_mut(&(volume, pg)).expect("listed");
            p.log_end = None; // Another segment owns it: list again when it comes back here.
            p.run = None;
            return;
        };
        let Some(log_end) = state.log_end else {
            return self.start_backup_job(now, (volume, pg), BackupJob::List { volume, pg });
        };
        if let Some(job) = self.next_snapshot_job(now, owner, &state) {
            return self.start_backup_job(now, (volume, pg), job);
        }
        if let Some(job) = self.next_log_job(now, owner, log_end, &state) {
            self.start_backup_job(now, (volume, pg), job);
        }
    }

    /// The next log object of `owner`'s PG, if one is due.
    fn next_log_job(
        &mut self,
        now: Instant,
        owner: SegmentKey,
        log_end: Lsn,
        state: &PgBackup,
    ) -> Option<BackupJob> {
        let segment = &self.segments[&owner];
        let hint = self.volumes.get(&owner.volume).map_or(Lsn::ZERO, |v| v.vdl);
        let target = segment.scl().min(hint);
        if target <= log_end {
            return None;
        }
        let c = self.backup.config;
        let records = match segment.records_for_fetch(log_end, target, c.log_bytes) {
            Ok(records) => records,
            Err(_) => {
                // The journal no longer holds the next records: a snapshot restarts the log.
                let p = self
                    .backup
                    .pgs
                    .get_mut(&(owner.volume, owner.pg))
                    .expect("listed");
                if p.run.is_none() && p.last_snapshot.is_some() {
                    p.last_snapshot = None;
                }
                return None;
            }
        };
        let bytes: usize = records.iter().map(|r| r.len as usize).sum();
        let due = state.last_log.is_none_or(|at| now >= at + c.log_interval);
        if records.is_empty() || (bytes < c.log_bytes && !due) {
            return None;
        }
        let meta = &self.volumes[&owner.volume].meta;
        let through = records.last().expect("not empty").lsn;
        Some(BackupJob::Log {
            volume: owner.volume,
            pg: owner.pg,
            geometry: Geometry {
                page_size_bytes: meta.page_size_bytes,
                pages_per_pg: meta.pages_per_pg,
                pg_count: meta.pg_count,
            },
            after: log_end,
            through,
            records,
        })
    }

    /// The next step of a snapshot of `owner`'s PG (starting one if it is due), if the page
    /// store may be read now.
    fn next_snapshot_job(
        &mut self,
        now: Instant,
        owner: SegmentKey,
        state: &PgBackup,
    ) -> Option<BackupJob> {
        let run = match state.run {
            Some(run) if run.key == owner => run,
            _ => self.start_snapshot_run(now, owner, state)?,
        };
        if run.next_index == crate::pagestore::PAGES_DONE {
            return Some(BackupJob::Done {
                volume: owner.volume,
                pg: owner.pg,
                first: run.first,
                last: run.last,
                batch_count: run.next_batch,
                page_count: run.pages,
            });
        }
        if !self.jobs_idle() || self.background.paused {
            return None; // Page reads never run beside a coalescing round.
        }
        let fetch = wire::FetchPages {
            volume: owner.volume,
            epoch: self.epoch(owner.volume),
            pg: owner.pg,
            segment: owner.segment,
            read_point: Lsn::ZERO,
            from_index: run.next_index,
            bytes_max: SNAPSHOT_BATCH_BYTES as u32,
        };
        let read = self.pages_read(owner, &fetch).ok()?;
        let p = self
            .backup
            .pgs
            .get_mut(&(owner.volume, owner.pg))
            .expect("listed");
        if let Some(r) = p.run.as_mut() {
            r.last = r.last.max(read.read_point);
        }
        Some(BackupJob::Pages {
            first: run.first,
            batch: run.next_batch,
            read,
        })
    }

    /// Starts a snapshot of `owner`'s PG if one is due and worth it.
    fn start_snapshot_run(
        &mut self,
        now: Instant,
        owner: SegmentKey,
        state: &PgBackup,
    ) -> Option<SnapshotRun> {
        let c = self.backup.config;
        let segment = &self.segments[&owner];
        let materialized = segment.materialized();
        let base = segment.progress().base;
        // A restarted log waits for a snapshot: one is due at once.
        let due = state.restart.is_some()
            || state
                .last_snapshot
                .is_none_or(|at| now >= at + c.snapshot_interval);
        // Only when there is something the log alone would not give cheaply: a page store
        // past the last snapshot, and a log that no longer starts at the PG's beginning here
        // (or an interval since the last snapshot).
        let worth = materialized > state.snapshot
            && (state.restart.is_some() || state.last_snapshot.is_some() || base > Lsn::ZERO);
        if !due || !worth || materialized == Lsn::ZERO {
            return None;
        }
        let run = SnapshotRun {
            key: owner,
            first: materialized,
            last: materialized,
            next_batch: 0,
            next_index: 0,
            pages: 0,
        };
        let p = self
            .backup
            .pgs
            .get_mut(&(owner.volume, owner.pg))
            .expect("listed");
        p.run = Some(run);
        p.last_snapshot = Some(now);
        if p.log_end.is_some_and(|end| end < base) {
            // A gap: the log restarts at the snapshot.
            p.log_end = Some(run.first);
            p.restart = Some(run.first);
        }
        Some(run)
    }

    fn start_backup_job(&mut self, now: Instant, id: (VolumeId, PgId), job: BackupJob) {
        let token = BackupToken(self.backup.next_token);
        self.backup.next_token += 1;
        let kind = match &job {
            BackupJob::List { .. } => InflightKind::List,
            BackupJob::Log {
                through, records, ..
            } => InflightKind::Log {
                through: *through,
                bytes: records.iter().map(|r| u64::from(r.len)).sum(),
            },
            BackupJob::Pages { .. } => {
                self.backup.reading_pages = Some(token);
                InflightKind::Pages
            }
            BackupJob::Done { .. } => InflightKind::Done,
        };
        if matches!(kind, InflightKind::Log { .. }) {
            self.backup.pgs.get_mut(&id).expect("listed").last_log = Some(now);
        }
        let p = self.backup.pgs.get_mut(&id).expect("listed");
        p.busy = Some(token);
        p.wake_at = None;
        self.backup.inflight.insert(token, (id, kind));
        self.outputs.push_back(NodeOutput::Backup { token, job });
    }

    /// A backup job finished.
    pub fn handle_backup_done(&mut self, token: BackupToken, outcome: BackupOutcome) {
        let Some((id, kind)) = self.backup.inflight.remove(&token) else {
            panic!("backup jobs complete once, as asked for");
        };
        if self.backup.reading_pages == Some(token) {
            self.backup.reading_pages = None;
        }
        let now = self.gossip_now();
        let stats = &mut self.backup.stats;
        let Some(p) = self.backup.pgs.get_mut(&id) else {
            return; // No longer hosted.
        };
        p.busy = None;
        if let BackupOutcome::Failed(why) = &outcome {
            stats.failures += 1;
            let retry = now.map(|n| n + self.backup.config.retry_interval);
            return note_failed(p, id, kind, retry, why);
        }
        if p.warned {
            tracing::info!("backup of volume {} pg {} works again", id.0, id.1);
        }
        p.warned = false;
        p.retry_at = None;
        match (kind, outcome) {
            (InflightKind::List, BackupOutcome::Listed(c)) => {
                p.backed_up = p.backed_up.max(c.restorable);
                p.snapshot = p.snapshot.max(c.snapshot);
                p.log_end = Some(c.log_end);
                // A log past what is restorable started at a snapshot that never completed:
                // nothing from it counts until a snapshot at or above its end does.
                p.restart = (c.log_end > c.restorable).then_some(c.log_end);
                p.restorable_from = c.snapshot;
            }
            (InflightKind::Log { through, bytes }, BackupOutcome::Uploaded) => {
                stats.log_objects += 1;
                stats.log_bytes += bytes;
                if p.log_end.is_some() {
                    p.log_end = Some(through);
                    if p.restart.is_none() && through >= p.restorable_from {
                        p.backed_up = p.backed_up.max(through);
                    }
                }
            }
            (InflightKind::Pages, BackupOutcome::Pages { pages, next_index }) => {
                stats.snapshot_pages += pages;
                stats.snapshot_batches += 1;
                if let Some(run) = p.run.as_mut() {
                    run.pages += pages;
                    run.next_batch += 1;
                    run.next_index = next_index;
                }
            }
            (InflightKind::Done, BackupOutcome::Uploaded) => {
                stats.snapshots += 1;
                if let Some(run) = p.run.take() {
                    p.snapshot = p.snapshot.max(run.last);
                    // The log runs on from its restart point, so from any snapshot above it.
                    if p.restart.is_some_and(|at| at <= run.first) {
                        p.restart = None;
                        p.restorable_from = run.last;
                        if let Some(end) = p.log_end.filter(|end| *end >= run.last) {
                            p.backed_up = p.backed_up.max(end);
                        }
                    }
                }
            }
            (kind, outcome) => panic!("backup job {kind:?} answered with {outcome:?}"),
        }
    }

    /// Counts the bytes of records held above the backup floor of every hosted segment (a
    /// step per record: called once per backup interval, not per append).
    pub(super) fn refresh_backup_lag(&mut self) {
        if !self.backup.config.enabled {
            return;
        }
        let lag: u64 = self
            .segments
            .iter()
            .map(|(key, segment)| {
                let floor = self.backup_floor(key).unwrap_or(Lsn::ZERO);
                segment.bytes_above(floor)
            })
            .max()
            .unwrap_or(0);
        self.backup.stats.lag_bytes = lag;
        let behind = lag > self.backup.config.lag_bytes_max;
        if behind && !self.backup.lag_warned {
            tracing::warn!(
                "backup is {lag} bytes behind (more than lag_bytes_max = {}): delaying acks \
                 until it catches up",
                self.backup.config.lag_bytes_max
            );
        } else if !behind && self.backup.lag_warned {
            tracing::info!("backup caught up ({lag} bytes behind)");
        }
        self.backup.lag_warned = behind;
    }

    /// Backup's pressure on acks in thousandths (`None`: within its bound).
    pub(super) fn backup_pressure(&self) -> Option<u64> {
        let c = &self.backup.config;
        let lag = self.backup.stats.lag_bytes;
        if !c.enabled || lag <= c.lag_bytes_max {
            return None;
        }
        Some((lag - c.lag_bytes_max).saturating_mul(1000) / c.lag_bytes_max.max(1))
            .map(|p| p.min(1000))
    }
}
