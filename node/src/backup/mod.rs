//! Backup's I/O (DESIGN.md "Backup layout"): the object store it writes through
//! ([`store::BackupStore`], built from the node's `[backup]` table), and the jobs the core asks
//! for carried out against it ([`upload`]). What to upload and when is the core's
//! (`crate::core` `backup`).

pub mod store;
pub mod upload;
