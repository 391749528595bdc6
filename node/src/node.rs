//! A storage node assembled: recovery at start (the manifest, then the journal replayed into a
//! fresh [`NodeCore`]), then the driver task with the journal writer the configuration names.
//!
//! Invariants: the node serves only after the whole durable journal was replayed and every
//! stale group header past its end was erased; the core answers every request (see
//! `core`), and the driver keeps the journal's writes off the core.

use std::path::Path;
use std::sync::{Arc, Mutex};

use crate::config::{NodeConfig, PersisterMode};
use crate::core::{CoreConfig, EntryLocation, NodeCore};
use crate::driver::{Driver, DriverHandle, DriverIo};
use crate::io::uring::UringJournal;
use crate::io::{FileManifestStore, JournalIo, JournalReader, ManifestStore, SystemClock, std_fs};
use crate::journal::{CorruptRange, JournalFiles};
use crate::manifest::Manifest;
use crate::pagestore::FilePageStore;

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

/// A running node: its configuration and its driver.
pub struct Node {
    pub config: NodeConfig,
    driver: DriverHandle,
    task: Mutex<Option<tokio::task::JoinHandle<Result<(), String>>>>,
}

impl Node {
    /// Opens the node's data directory, recovers the journal and starts the driver on the
    /// current tokio runtime.
    pub fn open(config: NodeConfig) -> anyhow::Result<(Arc<Self>, RecoveryReport)> {
        std::fs::create_dir_all(&config.data_dir).map_err(|e| {
            anyhow::anyhow!("cannot create data_dir {}: {e}", config.data_dir.display())
        })?;
        let store = FileManifestStore::new(&config.data_dir);
        let manifest = configured_manifest(&config, &store)?;
        let journal_dir = config.data_dir.join("journal");
        let journal = JournalFiles::open_or_create(
            &journal_dir,
            config.journal.file_bytes,
            config.journal.file_count,
        )?;
        let core_config = CoreConfig {
            name: config.name.clone(),
            inflight_groups_max: config.journal.inflight_groups_max,
            journal_file_bytes: journal.file_bytes,
            journal_file_count: u32::try_from(journal.files.len())?,
        };
        let mut core = NodeCore::new(core_config, manifest);
        configure(&config, &mut core);
        let objects = backup_store(&config, &mut core)?;
        // One group in memory at a time: recovery memory does not grow with the journal.
        let (mut groups, mut records) = (0, 0);
        let start = core.journal_start();
        let scan = journal.scan_with(start, |group| {
            groups += 1;
            core.recover_group(group.position, group.sequence);
            for entry in &group.entries {
                let at = EntryLocation {
                    file: group.position.file,
                    body_offset: entry.body_offset,
                };
                records += core.recover_append(at, &entry.append);
            }
        })?;
        let stale_headers_erased = journal.erase_stale_tail(start, scan.end, scan.next_sequence)?;
        core.finish_recovery(scan.end, scan.next_sequence);
        let report = RecoveryReport {
            groups,
            records,
            stop_reason: scan.stop_reason.clone(),
            stale_headers_erased,
            corrupt: scan.corrupt.clone(),
            corrupt_omitted: scan.corrupt_omitted,
        };
        let reader = JournalReader::open(&journal_dir, journal.files.len())?;
        let pages = FilePageStore::open(&config.data_dir)
            .map_err(|e| anyhow::anyhow!("cannot open the page store: {e}"))?;
        let io = DriverIo {
            manifests: Arc::new(store),
            reader: Arc::new(reader),
            pages: Arc::new(pages),
            objects,
        };
        let node = Self::start(config, core, journal, io)?;
        Ok((Arc::new(node), report))
    }

    fn start(
        config: NodeConfig,
        core: NodeCore,
        journal: JournalFiles,
        io: DriverIo,
    ) -> anyhow::Result<Self> {
        let j = &config.journal;
        let (sync, inflight) = (j.sync, j.inflight_groups_max);
        let files = journal.files;
        let tls = &config.tls;
        let peers = (config.listen, (&*tls.ca, &*tls.cert, &*tls.key));
        let (driver, task) = match j.persister {
            PersisterMode::Inline => spawn(
                core,
                UringJournal::inline(files, sync, inflight)?,
                io,
                peers,
            )?,
            PersisterMode::Thread => spawn(
                core,
                UringJournal::on_thread(files, sync, inflight)?,
                io,
                peers,
            )?,
            PersisterMode::StdFs => spawn(core, std_fs::start(files, sync)?, io, peers)?,
        };
        Ok(Self {
            config,
            driver,
            task: Mutex::new(Some(task)),
        })
    }

    /// The driver, for the QUIC server and in-process clients.
    pub fn driver(&self) -> &DriverHandle {
        &self.driver
    }

    /// Waits until the node stops on a fatal error; returns why.
    pub async fn stopped(&self) -> String {
        self.driver.stopped().await
    }

    /// Refuses new requests, persists and answers everything waiting, and stops the driver.
    /// `Err(reason)` if the node had stopped on a fatal error.
    pub async fn shutdown(&self) -> Result<(), String> {
        self.driver.shutdown();
        let task = self.task.lock().expect("task lock").take();
        match task {
            Some(task) => task
                .await
                .unwrap_or_else(|e| Err(format!("driver failed: {e}"))),
            None => Ok(()),
        }
    }
}

/// Gossip, scrub, background work and back-pressure as `node.toml` says.
fn configure(config: &NodeConfig, core: &mut NodeCore) {
    let mut gossip = crate::core::GossipConfig::for_node(&config.name);
    gossip.enabled = config.gossip.enabled;
    gossip.poll_interval = std::time::Duration::from_millis(config.gossip.poll_interval_ms);
    core.configure_gossip(gossip);
    core.configure_scrub(crate::core::ScrubConfig {
        enabled: config.scrub.enabled,
        interval: std::time::Duration::from_millis(config.scrub.interval_ms),
        pages_per_round: config.scrub.pages_per_round,
        records_per_round: config.scrub.records_per_round,
    });
    if config.background.paused {
        tracing::warn!(
            "background work paused ([background] paused = true): nothing is coalesced \
                 or collected, and the journal fills"
        );
        core.set_background_paused(true);
    }
    core.configure_throttle(config.backpressure.throttle_config());
}

/// The `[backup]` store, if configured, with the core's backup switched on to match. A store
/// that cannot be built (bad configuration) stops the start with one line; one that is only
/// unreachable or refuses the credentials is reported by a probe in the background, and the
/// node serves writes meanwhile (backup lag grows and is reported).
fn backup_store(
    config: &NodeConfig,
    core: &mut NodeCore,
) -> anyhow::Result<Option<Arc<dyn crate::backup::upload::ObjectStorage>>> {
    let settings = &config.backup;
    let Some(store) = crate::backup::store::BackupStore::from_settings(settings)
        .map_err(|e| anyhow::anyhow!("[backup]: {e}"))?
    else {
        return Ok(None);
    };
    let store = Arc::new(store);
    core.configure_backup(crate::core::BackupConfig {
        enabled: true,
        log_bytes: usize::try_from(settings.log_bytes)?,
        log_interval: std::time::Duration::from_millis(settings.log_interval_ms),
        snapshot_interval: std::time::Duration::from_secs(settings.snapshot_interval_s),
        lag_bytes_max: settings.lag_bytes_max,
        ..crate::core::BackupConfig::default()
    });
    tracing::info!("backing up to {}", store.location());
    let probe = store.clone();
    tokio::spawn(async move {
        if let Err(e) = probe.probe().await {
            tracing::error!("backup: {e} (the node serves writes; backup lag grows)");
        }
    });
    Ok(Some(Arc::new(store)))
}

/// Where the node listens, and its CA, certificate and key: what its peer client needs.
type PeerSetup<'a> = (std::net::SocketAddr, (&'a Path, &'a Path, &'a Path));

fn spawn<J: JournalIo + 'static>(
    core: NodeCore,
    journal: J,
    io: DriverIo,
    (listen, tls): PeerSetup<'_>,
) -> anyhow::Result<(DriverHandle, tokio::task::JoinHandle<Result<(), String>>)> {
    let (mut driver, handle) = Driver::new(core, journal, io, Arc::new(SystemClock));
    driver.enable_peers(listen, tls)?;
    Ok((handle, tokio::spawn(driver.run())))
}

/// The stored manifest plus the segments `node.toml` names, stored again if it grew.
fn configured_manifest(config: &NodeConfig, store: &FileManifestStore) -> anyhow::Result<Manifest> {
    let mut manifest = store.load()?;
    let missing: Vec<_> = config
        .segments
        .iter()
        .filter(|k| !manifest.hosts(k))
        .copied()
        .collect();
    if !missing.is_empty() {
        manifest.segments.extend(missing);
        store.store(&manifest)?;
    }
    Ok(manifest)
}
