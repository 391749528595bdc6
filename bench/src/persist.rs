//! `sixfold-bench persist`: the journal path alone, in process — the node's core, its driver,
//! its journal writer and the journal files, without QUIC — so the node's overhead over the
//! raw disk can be split into network and journal parts.

use std::time::{Duration, Instant};

use bytes::Bytes;
use node::config::{PersisterMode, SyncMode};
use node::driver::Stream;
use node::{Node, NodeConfig};
use tokio::sync::mpsc::UnboundedReceiver;
use wire::{Epoch, Fence, Frame, Message, Role, VolumeId};

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
    #[arg(long, value_enum, default_value_t = SyncMode::RwfDsync)]
    sync: SyncMode,
    #[arg(long, value_enum, default_value_t = PersisterMode::Inline)]
    persister: PersisterMode,
}

impl PersistArgs {
    pub(crate) fn deadline_default(&self) -> std::time::Duration {
        std::time::Duration::from_secs(300 + 4 * self.seconds)
    }
}

pub(crate) fn run(args: &PersistArgs) -> anyhow::Result<()> {
    crate::watchdog::phase("persist: appends through the core and the journal");
    let dir = args.dir.join(format!("persist-{}", std::process::id()));
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    let summary = runtime.block_on(measure(args, &dir));
    std::fs::remove_dir_all(&dir)?;
    println!(
        "{}",
        summary?.line(&format!(
            "node core + journal in process ({}, {}), 1 in flight",
            args.sync.as_str(),
            args.persister.as_str()
        ))
    );
    Ok(())
}

fn config(args: &PersistArgs, dir: &std::path::Path) -> anyhow::Result<NodeConfig> {
    let text = format!(
        "name = \"persist-bench\"\nlisten = \"127.0.0.1:0\"\naz = \"az1\"\n\
         data_dir = \"{}\"\n\n[tls]\nca = \"unused\"\ncert = \"unused\"\nkey = \"unused\"\n\n\
         [journal]\nfile_bytes = {}\nfile_count = 8\ninflight_groups_max = 4\nsync = \"{}\"\n\
         persister = \"{}\"\n\n[[segment]]\nvolume = 1\npg = 0\nsegment = 0\n",
        dir.display(),
        256u64 << 20,
        args.sync.as_str(),
        args.persister.as_str(),
    );
    NodeConfig::parse(&text, "persist bench config").map_err(anyhow::Error::msg)
}

/// Sends one request and waits for its reply.
async fn request(
    stream: &Stream,
    replies: &mut UnboundedReceiver<Vec<u8>>,
    request_id: u64,
    message: Message,
) -> anyhow::Result<Message> {
    let bytes = Frame {
        request_id,
        message,
    }
    .to_bytes();
    let slot = stream.reserve().await;
    stream.send(slot, Bytes::from(bytes).slice(4..));
    let reply = replies
        .recv()
        .await
        .ok_or_else(|| anyhow::anyhow!("the node went away"))?;
    Ok(Frame::decode(&reply)?.message)
}

async fn measure(args: &PersistArgs, dir: &std::path::Path) -> anyhow::Result<Summary> {
    let (node, _) = Node::open(config(args, dir)?)?;
    let (stream, mut replies) = node.driver().open_stream(Some(Role::Engine));
    let fence = Fence {
        volume: VolumeId(1),
        epoch_current: Epoch(0),
        epoch_new: Epoch(1),
    };
    let reply = request(&stream, &mut replies, 1, Message::Fence(fence)).await?;
    anyhow::ensure!(matches!(reply, Message::VolumeState(_)), "{reply:?}");
    let mut h = stats::histogram();
    let began = Instant::now();
    let mut count = 0u64;
    while began.elapsed() < Duration::from_secs(args.seconds) && count < 200_000 {
        count += 1;
        let append = crate::append::one_record(args.record_bytes);
        let start = Instant::now();
        match request(&stream, &mut replies, count + 1, Message::Append(append)).await? {
            Message::Ack(_) => {}
            other => anyhow::bail!("the node refused an append: {other:?}"),
        }
        stats::record(&mut h, start.elapsed());
    }
    let summary = Summary::of(&h, began.elapsed());
    drop(stream);
    node.shutdown().await.map_err(anyhow::Error::msg)?;
    Ok(summary)
}
