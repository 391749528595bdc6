//! `sixfold-bench persist`: the journal path alone, in process — the persister thread, its
//! io_uring ring and the journal files, without QUIC — so the node's overhead over the raw disk
//! can be split into network and journal parts.

use std::sync::Arc;
use std::sync::mpsc;
use std::time::{Duration, Instant};

use node::journal::JournalFiles;
use node::persister::{PersistRequest, Persister, PersisterConfig, RecordInBody};
use node::state::SegmentKey;
use wire::{Lsn, PgId, SegmentIndex, VolumeId};

use crate::stats::{self, Summary};

#[derive(clap::Args, Debug)]
pub(crate) struct PersistArgs {
    /// Directory on the disk under test.
    #[arg(long)]
    dir: std::path::PathBuf,
    #[arg(long, default_value_t = 5)]
    seconds: u64,
    /// Payload bytes of each record.
    #[arg(long, default_value_t = 4096)]
    record_bytes: usize,
    #[arg(long, value_enum)]
    sync: Option<crate::append::SyncArg>,
}

pub(crate) fn run(args: &PersistArgs) -> anyhow::Result<()> {
    let dir = args.dir.join(format!("persist-{}", std::process::id()));
    let journal = JournalFiles::open_or_create(&dir, 256 << 20, 8)?;
    let config = PersisterConfig {
        sync_mode: args
            .sync
            .map_or(PersisterConfig::default().sync_mode, |s| s.mode()),
        ..PersisterConfig::default()
    };
    let persister = Persister::start(journal, Default::default(), 1, Arc::default(), config)?;
    let key = SegmentKey {
        volume: VolumeId(1),
        pg: PgId(0),
        segment: SegmentIndex(0),
    };
    let append = crate::append::one_record(args.record_bytes);
    let mut body = Vec::new();
    append.encode(&mut body);
    let template = RecordInBody::of(&append)[0];
    let mut h = stats::histogram();
    let began = Instant::now();
    let mut lsn = 0u64;
    while began.elapsed() < Duration::from_secs(args.seconds) && lsn < 200_000 {
        lsn += 1;
        let (tx, rx) = mpsc::channel();
        let start = Instant::now();
        persister.submit(PersistRequest {
            segment: key,
            body: body.clone(),
            records: vec![RecordInBody {
                lsn: Lsn(lsn),
                backlink: Lsn(lsn - 1),
                ..template
            }],
            reply: Box::new(move |r| {
                let _ = tx.send(r);
            }),
        });
        rx.recv()?.map_err(|e| anyhow::anyhow!("{}", e.message))?;
        stats::record(&mut h, start.elapsed());
    }
    let summary = Summary::of(&h, began.elapsed());
    drop(persister);
    std::fs::remove_dir_all(&dir)?;
    println!("{}", summary.line("persister in process, 1 in flight"));
    Ok(())
}
