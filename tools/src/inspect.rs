//! `sixfold inspect journal DIR`: the durable records of a node's journal, one per line, so
//! tests and people can see what survived a crash.

use std::io::Write;
use std::path::{Path, PathBuf};

use node::journal::JournalFiles;
use wire::RedoOp;

/// One durable record as `inspect` prints it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct InspectedRecord {
    pub group: u64,
    pub lsn: u64,
    pub backlink: u64,
    pub volume: u64,
    pub pg: u32,
    pub segment: u32,
    pub page: u64,
    pub cpl: bool,
    pub op: String,
}

/// The journal directory of `dir`, which may be a node's data directory or its journal.
pub fn journal_dir(dir: &Path) -> PathBuf {
    if dir.join("journal").is_dir() {
        dir.join("journal")
    } else {
        dir.to_path_buf()
    }
}

/// Reads every durable record; also returns why the scan stopped.
pub fn journal_records(dir: &Path) -> anyhow::Result<(Vec<InspectedRecord>, String)> {
    let journal = JournalFiles::open_existing(&journal_dir(dir))?;
    let scan = journal.scan()?;
    let mut out = Vec::new();
    for group in &scan.groups {
        for entry in group.entries.iter().map(|e| &e.append) {
            for record in &entry.records {
                out.push(InspectedRecord {
                    group: group.sequence,
                    lsn: record.lsn.0,
                    backlink: record.backlink.0,
                    volume: entry.volume.0,
                    pg: entry.pg.0,
                    segment: entry.segment.0,
                    page: record.page.0,
                    cpl: record.cpl,
                    op: match &record.op {
                        RedoOp::Init => "init".to_string(),
                        RedoOp::Write { offset, bytes } => {
                            format!("write@{offset}+{}", bytes.len())
                        }
                    },
                });
            }
        }
    }
    Ok((out, scan.stop_reason))
}

/// Prints the records as a tab-separated table with a header and a closing summary line.
pub fn print_journal(dir: &Path, out: &mut impl Write) -> anyhow::Result<()> {
    let (records, stop_reason) = journal_records(dir)?;
    writeln!(
        out,
        "group\tlsn\tbacklink\tvolume\tpg\tsegment\tpage\tcpl\top"
    )?;
    for r in &records {
        writeln!(
            out,
            "{}\t{}\t{}\t{}\t{}\t{}\t{}\t{}\t{}",
            r.group,
            r.lsn,
            r.backlink,
            r.volume,
            r.pg,
            r.segment,
            r.page,
            u8::from(r.cpl),
            r.op
        )?;
    }
    writeln!(
        out,
        "# {} durable records; scan stopped: {stop_reason}",
        records.len()
    )?;
    Ok(())
}
