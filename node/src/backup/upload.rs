//! Carries out the core's backup jobs ([`BackupJob`]) against an [`ObjectStorage`]: lists a
//! PG's objects, seals log ranges read back from the journal, uploads snapshot batches read
//! from the page store, and stamps the wall-clock time where the format wants it. Each job has
//! a deadline; every failure comes back as one line in [`BackupOutcome::Failed`].
//!
//! Invariants: an object is put only whole and only under the name its contents determine
//! (`wire::backup`), so a retried or repeated job writes the same bytes again; nothing here
//! touches protocol state.

use std::collections::BTreeSet;
use std::future::Future;
use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use bytes::Bytes;
use wire::backup::{
    DoneObject, LogObject, PagesObject, VolumeObject, coverage, done_name, log_name, log_prefix,
    pages_name, parse_done_name, parse_log_name, snapshots_prefix, volume_name,
};
use wire::{PageReply, VolumeId};

use crate::core::{BackupJob, BackupOutcome};
use crate::io::RecordReader;
use crate::pagestore::PageStore;

/// A future an [`ObjectStorage`] returns.
pub type StorageFuture<T> = Pin<Box<dyn Future<Output = Result<T, String>> + Send>>;

/// The object store as backup uses it: names are relative to the configured prefix; errors
/// are one line saying what is wrong and how to fix it.
pub trait ObjectStorage: Send + Sync + 'static {
    fn put(&self, name: String, bytes: Bytes) -> StorageFuture<()>;
    fn get(&self, name: String) -> StorageFuture<Bytes>;
    /// The names under `prefix` (relative to the store's prefix, like `put`'s).
    fn list(&self, prefix: String) -> StorageFuture<Vec<String>>;
}

impl ObjectStorage for Arc<super::store::BackupStore> {
    fn put(&self, name: String, bytes: Bytes) -> StorageFuture<()> {
        let store = self.clone();
        Box::pin(async move {
            super::store::BackupStore::put(&store, &name, bytes)
                .await
                .map_err(|e| e.to_string())
        })
    }

    fn get(&self, name: String) -> StorageFuture<Bytes> {
        let store = self.clone();
        Box::pin(async move {
            super::store::BackupStore::get(&store, &name)
                .await
                .map_err(|e| e.to_string())
        })
    }

    fn list(&self, prefix: String) -> StorageFuture<Vec<String>> {
        let store = self.clone();
        Box::pin(async move {
            let trimmed = prefix.trim_end_matches('/');
            let listed = super::store::BackupStore::list(&store, trimmed)
                .await
                .map_err(|e| e.to_string())?;
            Ok(listed.into_iter().map(|(name, _)| name).collect())
        })
    }
}

/// The longest one job may take, retries included.
pub const JOB_DEADLINE: Duration = Duration::from_secs(120);

/// What a job needs besides the store.
#[derive(Clone)]
pub struct Uploader {
    pub store: Arc<dyn ObjectStorage>,
    pub pages: Arc<dyn PageStore>,
    pub reader: Arc<dyn RecordReader>,
    /// Volumes whose volume object this node has put since it started.
    described: Arc<Mutex<BTreeSet<VolumeId>>>,
}

impl Uploader {
    pub fn new(
        store: Arc<dyn ObjectStorage>,
        pages: Arc<dyn PageStore>,
        reader: Arc<dyn RecordReader>,
    ) -> Self {
        Self {
            store,
            pages,
            reader,
            described: Arc::default(),
        }
    }

    /// Carries out `job`, within [`JOB_DEADLINE`].
    pub async fn run(&self, job: BackupJob) -> BackupOutcome {
        match tokio::time::timeout(JOB_DEADLINE, self.run_unbounded(job)).await {
            Ok(Ok(outcome)) => outcome,
            Ok(Err(why)) => BackupOutcome::Failed(why),
            Err(_) => BackupOutcome::Failed(format!(
                "the object store did not finish a backup job within {} s",
                JOB_DEADLINE.as_secs()
            )),
        }
    }

    async fn run_unbounded(&self, job: BackupJob) -> Result<BackupOutcome, String> {
        match job {
            BackupJob::List { volume, pg } => self.list(volume, pg).await,
            BackupJob::Log {
                volume,
                pg,
                geometry,
                after,
                through,
                records,
            } => {
                self.describe(volume, geometry).await?;
                self.put_log(volume, pg, (after, through), records).await
            }
            BackupJob::Pages { first, batch, read } => {
                let (pages, reader) = (self.pages.clone(), self.reader.clone());
                let key = read.key;
                let (images, next_index) = blocking(move || {
                    crate::pagestore::read_pages(&read, pages.as_ref(), reader.as_ref())
                        .map_err(|(_, why)| why)
                })
                .await?;
                let count = images.len() as u64;
                let object = PagesObject {
                    volume: key.volume,
                    pg: key.pg,
                    first,
                    pages: images
                        .into_iter()
                        .map(|i| PageReply {
                            page: i.page,
                            page_lsn: i.lsn,
                            bytes: i.bytes,
                        })
                        .collect(),
                };
                let name = pages_name(key.volume, key.pg, first, batch);
                self.store.put(name, Bytes::from(object.encode())).await?;
                Ok(BackupOutcome::Pages {
                    pages: count,
                    next_index,
                })
            }
            BackupJob::Done {
                volume,
                pg,
                first,
                last,
                batch_count,
                page_count,
            } => {
                let object = DoneObject {
                    volume,
                    pg,
                    batch_count,
                    first,
                    last,
                    page_count,
                    done_unix_ms: unix_ms(),
                };
                let name = done_name(volume, pg, first);
                self.store.put(name, Bytes::from(object.encode())).await?;
                Ok(BackupOutcome::Uploaded)
            }
        }
    }

    /// Puts the volume object once per volume and process (it never changes).
    async fn describe(&self, volume: VolumeId, geometry: wire::Geometry) -> Result<(), String> {
        if self
            .described
            .lock()
            .expect("not poisoned")
            .contains(&volume)
        {
            return Ok(());
        }
        let bytes = Bytes::from(VolumeObject { volume, geometry }.encode());
        self.store.put(volume_name(volume), bytes).await?;
        self.described.lock().expect("not poisoned").insert(volume);
        Ok(())
    }

    /// Reads the records back from the journal and puts them as the log object
    /// `(after, through]`, sealed now.
    async fn put_log(
        &self,
        volume: VolumeId,
        pg: wire::PgId,
        (after, through): (wire::Lsn, wire::Lsn),
        records: Vec<crate::segment::RecordLocation>,
    ) -> Result<BackupOutcome, String> {
        let reader = self.reader.clone();
        let records = blocking(move || reader.read(&records)).await?;
        let object = LogObject {
            volume,
            pg,
            after,
            through,
            sealed_unix_ms: unix_ms(),
            records,
        };
        object
            .check()
            .map_err(|why| format!("log range ({after}, {through}] of pg {pg}: {why}"))?;
        let name = log_name(volume, pg, after, through);
        self.store.put(name, Bytes::from(object.encode())).await?;
        Ok(BackupOutcome::Uploaded)
    }

    /// What the PG's objects cover: its log ranges and complete snapshots.
    async fn list(&self, volume: VolumeId, pg: wire::PgId) -> Result<BackupOutcome, String> {
        let prefix = log_prefix(volume, pg);
        let ranges: Vec<_> = self
            .store
            .list(prefix.clone())
            .await?
            .iter()
            .filter_map(|name| parse_log_name(name.strip_prefix(&prefix)?))
            .collect();
        let prefix = snapshots_prefix(volume, pg);
        let firsts: Vec<_> = self
            .store
            .list(prefix.clone())
            .await?
            .iter()
            .filter_map(|name| parse_done_name(name.strip_prefix(&prefix)?))
            .collect();
        let mut snapshots = Vec::with_capacity(firsts.len());
        for first in firsts {
            let name = done_name(volume, pg, first);
            let bytes = self.store.get(name.clone()).await?;
            let done = DoneObject::decode(&bytes).map_err(|e| format!("{name}: {e}"))?;
            snapshots.push((done.first, done.last));
        }
        Ok(BackupOutcome::Listed(coverage(&ranges, &snapshots)))
    }
}

/// Runs blocking `work` (journal or page-store reads) on the blocking pool.
async fn blocking<T: Send + 'static>(
    work: impl FnOnce() -> Result<T, String> + Send + 'static,
) -> Result<T, String> {
    tokio::task::spawn_blocking(work)
        .await
        .map_err(|e| format!("a backup read failed: {e}"))?
}

fn unix_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX))
}
