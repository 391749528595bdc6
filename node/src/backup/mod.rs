//! Backup of each PG to S3-compatible object storage (see DESIGN.md, "Backup layout"). So far
//! only the store the protocol will write through: [`store::BackupStore`].

pub mod store;
