//! `sixfold`: the admin CLI.

use std::path::PathBuf;

use clap::{Parser, Subcommand};

#[global_allocator]
static GLOBAL: tikv_jemallocator::Jemalloc = tikv_jemallocator::Jemalloc;

/// Sixfold admin CLI.
#[derive(Parser, Debug)]
#[command(version, about)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand, Debug)]
enum Command {
    /// Create a cluster CA (or reuse the one in --out) and certificates signed by it.
    Certs {
        /// Directory for ca.pem, ca.key.pem and NAME.pem / NAME.key.pem.
        #[arg(long)]
        out: PathBuf,
        /// A storage node's name (repeat for each node).
        #[arg(long = "node", required = true)]
        nodes: Vec<String>,
        /// A database engine's name (repeat for each engine).
        #[arg(long = "engine")]
        engines: Vec<String>,
    },
    /// Run a local cluster: 6 nodes in 3 AZs (restarted when they die), a volume, an engine
    /// and a small self-checking workload. Run again on the same --dir to reopen the cluster.
    Dev {
        /// Directory for the nodes' data, certificates and the volume file; a cluster already
        /// there is reopened.
        #[arg(long, default_value = ".sixfold")]
        dir: PathBuf,
        /// Stop after this many seconds (default: run until SIGINT or SIGTERM).
        #[arg(long)]
        seconds: Option<u64>,
        /// Concurrent workload tasks.
        #[arg(long, default_value_t = 8)]
        workers: usize,
    },
    /// Volumes: create one over running nodes.
    Volume {
        #[command(subcommand)]
        what: Volume,
    },
    /// Print what is durable on a node.
    Inspect {
        #[command(subcommand)]
        what: Inspect,
    },
}

#[derive(Subcommand, Debug)]
enum Volume {
    /// Place a new volume's PGs over the nodes, write the volume file, and tell each node
    /// which segments it hosts.
    Create {
        /// Where to write the volume file.
        #[arg(long)]
        out: PathBuf,
        /// Certificates directory (ca.pem, engine.pem, engine.key.pem).
        #[arg(long)]
        certs: PathBuf,
        /// A node as NAME,ADDRESS,AZ (repeat; at least 2 nodes in each of 3 AZs).
        #[arg(long = "node", required = true, value_parser = parse_node)]
        nodes: Vec<engine::volume::NodeEntry>,
        #[arg(long, default_value_t = 1)]
        volume: u64,
        #[arg(long, default_value_t = 4)]
        pg_count: u32,
        #[arg(long, default_value_t = 8192)]
        page_size_bytes: u32,
        #[arg(long, default_value_t = 10 * 1024 * 1024 * 1024)]
        segment_bytes: u64,
    },
}

fn parse_node(text: &str) -> Result<engine::volume::NodeEntry, String> {
    let parts: Vec<&str> = text.split(',').collect();
    let [name, address, az] = parts[..] else {
        return Err(format!(
            "{text:?} is not NAME,ADDRESS,AZ (e.g. node1,10.0.0.1:7100,az1)"
        ));
    };
    let address = address
        .parse()
        .map_err(|e| format!("{address:?} is not an address: {e}"))?;
    Ok(engine::volume::NodeEntry {
        name: name.into(),
        address,
        az: az.into(),
    })
}

#[derive(Subcommand, Debug)]
enum Inspect {
    /// Every durable record of a node's journal (DIR: the node's data_dir or its journal/).
    Journal { dir: PathBuf },
}

fn runtime() -> anyhow::Result<tokio::runtime::Runtime> {
    Ok(tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()?)
}

async fn volume(what: Volume) -> anyhow::Result<()> {
    let Volume::Create {
        out,
        certs,
        nodes,
        volume,
        pg_count,
        page_size_bytes,
        segment_bytes,
    } = what;
    let file = engine::VolumeFile::create(
        wire::VolumeId(volume),
        page_size_bytes,
        segment_bytes,
        pg_count,
        nodes,
    )
    .map_err(anyhow::Error::msg)?;
    let identity = engine::tls::ClientIdentity::in_dir(&certs, "engine");
    engine::driver::assign_segments(&file, &engine::tls::client_endpoint(&identity)?).await?;
    std::fs::write(&out, file.to_toml())?;
    println!(
        "volume {volume}: {pg_count} PGs over {} nodes, written to {}",
        file.nodes.len(),
        out.display()
    );
    Ok(())
}

fn main() {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("warn")),
        )
        .with_writer(std::io::stderr)
        // Colours only on a terminal: logs redirected to a file stay plain text.
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .init();
    let cli = Cli::parse();
    let result = match cli.command {
        Command::Certs {
            out,
            nodes,
            engines,
        } => tools::certs::generate(&out, &nodes, &engines).map(|()| {
            println!(
                "wrote CA and {} node and {} engine certificates under {}",
                nodes.len(),
                engines.len(),
                out.display()
            )
        }),
        Command::Inspect {
            what: Inspect::Journal { dir },
        } => tools::inspect::print_journal(&dir, &mut std::io::stdout().lock()),
        Command::Dev {
            dir,
            seconds,
            workers,
        } => runtime().and_then(|rt| {
            let duration = seconds.map(std::time::Duration::from_secs);
            rt.block_on(tools::dev::run(tools::dev::DevOptions {
                dir,
                duration,
                workers,
            }))
        }),
        Command::Volume { what } => runtime().and_then(|rt| rt.block_on(volume(what))),
    };
    if let Err(e) = result {
        eprintln!("sixfold: {e:#}");
        std::process::exit(2);
    }
}
