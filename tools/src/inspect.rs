//! `sixfold inspect journal DIR`: the durable records of a node's journal, one per line, so
//! tests and people can see what survived a crash, then the corrupt ranges the scan skipped in
//! the middle of the journal (the groups, and so the records, lost on this node) and where it
//! stopped.

use std::io::Write;
use std::path::{Path, PathBuf};

use node::journal::{JournalFiles, Scan, ScannedGroup};
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

/// The records of one durable group.
fn records_of(group: &ScannedGroup) -> impl Iterator<Item = InspectedRecord> + '_ {
    group
        .entries
        .iter()
        .map(|e| &e.append)
        .flat_map(move |entry| {
            entry.records.iter().map(move |record| InspectedRecord {
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
                    RedoOp::Write { offset, bytes } => format!("write@{offset}+{}", bytes.len()),
                },
            })
        })
}

/// Where the node's journal starts, as its manifest says (the start of file 0 if it has none).
fn journal_start(dir: &Path) -> anyhow::Result<node::manifest::JournalStart> {
    let manifest = node::io::FileManifestStore::new(dir).load()?;
    Ok(manifest.journal_start)
}

/// Reads every durable record; also returns the scan's summary (groups left empty): where
/// and why it stopped, and the corrupt ranges it skipped.
pub fn journal_records(dir: &Path) -> anyhow::Result<(Vec<InspectedRecord>, Scan)> {
    let journal = JournalFiles::open_existing(&journal_dir(dir))?;
    let mut out = Vec::new();
    let scan = journal.scan_with(journal_start(dir)?, |group| out.extend(records_of(&group)))?;
    Ok((out, scan))
}

/// Prints the records as a tab-separated table with a header, then one `# corrupt` line per
/// range skipped in the middle and a closing summary line, one journal group in memory at a
/// time.
pub fn print_journal(dir: &Path, out: &mut impl Write) -> anyhow::Result<()> {
    let journal = JournalFiles::open_existing(&journal_dir(dir))?;
    writeln!(
        out,
        "group\tlsn\tbacklink\tvolume\tpg\tsegment\tpage\tcpl\top"
    )?;
    let mut count = 0u64;
    let mut failed = None;
    let scan = journal.scan_with(journal_start(dir)?, |group| {
        for r in records_of(&group) {
            count += 1;
            let line = writeln!(
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
            );
            if let Err(e) = line {
                failed.get_or_insert(e);
            }
        }
    })?;
    if let Some(e) = failed {
        return Err(e.into());
    }
    for range in &scan.corrupt {
        writeln!(out, "# corrupt: {range}: {}", range.reason)?;
    }
    if scan.corrupt_omitted > 0 {
        writeln!(out, "# corrupt: {} more ranges", scan.corrupt_omitted)?;
    }
    let corrupt = scan.corrupt.len() as u64 + scan.corrupt_omitted;
    writeln!(
        out,
        "# {count} durable records; {corrupt} corrupt ranges; scan stopped: {}",
        scan.stop_reason
    )?;
    Ok(())
}
