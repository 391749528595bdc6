//! Backup's I/O: the object store it writes to, and the jobs the core asks for carried out
//! against it (`upload`). What to upload and when is the core's (`crate::core` `backup`).

pub mod upload;
