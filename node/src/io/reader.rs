//! Records read back from the journal for reads and fetches: one positioned read per record
//! through ordinary (buffered) handles, each record CRC-checked by its decoder.
//!
//! Invariant: a record is returned only if its bytes decode with a good CRC; whether it is the
//! record that was indexed there is the core's check (it knows which LSN it asked for).

use std::fs::File;
use std::os::unix::fs::FileExt;
use std::path::Path;

use wire::LogRecord;
use wire::codec::Reader;

use crate::segment::RecordLocation;

/// Reads records back from the journal. Blocking: drivers call it off their runtime thread.
pub trait RecordReader: Send + Sync {
    /// The records at `locations`, in order, or why they could not be read.
    fn read(&self, locations: &[RecordLocation]) -> Result<Vec<LogRecord>, String>;
}

/// Buffered read-only handles on the journal files.
pub struct JournalReader {
    files: Vec<File>,
}

impl JournalReader {
    /// Opens the `file_count` journal files under `journal_dir`.
    pub fn open(journal_dir: &Path, file_count: usize) -> std::io::Result<Self> {
        let files = (0..file_count)
            .map(|i| {
                let index = u32::try_from(i).map_err(std::io::Error::other)?;
                File::open(crate::journal::file_path(journal_dir, index))
            })
            .collect::<Result<_, _>>()?;
        Ok(Self { files })
    }
}

impl RecordReader for JournalReader {
    fn read(&self, locations: &[RecordLocation]) -> Result<Vec<LogRecord>, String> {
        let mut out = Vec::with_capacity(locations.len());
        let mut bytes = Vec::new();
        for location in locations {
            let file = self
                .files
                .get(location.file as usize)
                .ok_or_else(|| format!("no journal file {}", location.file))?;
            bytes.resize(location.len as usize, 0);
            file.read_exact_at(&mut bytes, location.offset)
                .map_err(|e| format!("{location:?}: {e}"))?;
            let record = LogRecord::decode(&mut Reader::new(&bytes))
                .map_err(|e| format!("journal record at {location:?} is damaged: {e}"))?;
            out.push(record);
        }
        assert!(out.len() == locations.len());
        Ok(out)
    }
}

/// Journal files held in memory (file index → bytes), for tests and simulators.
pub struct MemRecords<'a>(pub &'a std::collections::HashMap<u32, Vec<u8>>);

impl RecordReader for MemRecords<'_> {
    fn read(&self, locations: &[RecordLocation]) -> Result<Vec<LogRecord>, String> {
        locations
            .iter()
            .map(|l| {
                let file = self.0.get(&l.file).ok_or("no such journal file")?;
                let end = l.offset + u64::from(l.len);
                let bytes = file
                    .get(l.offset as usize..end as usize)
                    .ok_or("beyond the journal file")?;
                LogRecord::decode(&mut Reader::new(bytes)).map_err(|e| e.to_string())
            })
            .collect()
    }
}
