//! `sixfold-bench`: latency benchmarks that print hdrhistogram percentiles side by side with
//! the disk's own limit, measured in the same run and the same directory.

mod append;
mod catch_up;
mod chaos;
mod commit;
mod persist;
mod read;
mod recovery;
mod slow_nodes;
mod soak;
mod soak_paused;
mod stats;
mod watchdog;

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use clap::{Parser, Subcommand};

#[global_allocator]
static GLOBAL: tikv_jemallocator::Jemalloc = tikv_jemallocator::Jemalloc;

/// Sixfold benchmarks.
#[derive(Parser, Debug)]
#[command(version, about)]
struct Cli {
    #[command(subcommand)]
    command: Command,
    /// Overall deadline in seconds: past it the bench stops, exits with status 3 and names
    /// the phase that stalled (default: derived from the command's --seconds, generously).
    #[arg(long, global = true)]
    deadline: Option<u64>,
}

#[derive(Subcommand, Debug)]
enum Command {
    /// Single-record appends against one storage node, beside raw O_DIRECT write + fdatasync.
    Append(append::AppendArgs),
    /// One-record MTRs committed through a 4/6 quorum of six local nodes, beside single-node
    /// appends and the raw disk.
    Commit(commit::CommitArgs),
    /// The journal path alone, in process, without the network.
    Persist(persist::PersistArgs),
    /// A new writer's open (crash recovery) to its first commit, on a small and a large
    /// volume.
    Recovery(recovery::RecoveryArgs),
    /// Nodes killed and restarted and the writer crashed and recovered under a
    /// self-verifying workload: no acknowledged commit may be lost.
    Chaos(chaos::ChaosArgs),
    /// A page with a long history, read before and after the nodes coalesced it, beside the
    /// raw disk's read and one network round trip.
    Read(read::ReadArgs),
    /// Commits without pause until many times a node's journal is written: disk use must stay
    /// flat once journals are recycled.
    Soak(soak::SoakArgs),
}

/// Where the node under test comes from.
#[derive(clap::Args, Debug, Clone)]
pub(crate) struct Target {
    /// Directory on the disk under test: the node's data (when the bench starts it) and the
    /// raw-disk probe file go here.
    #[arg(long)]
    pub(crate) dir: PathBuf,
    /// Drive an already running node at this address instead of starting one.
    #[arg(long, requires = "certs")]
    pub(crate) connect: Option<SocketAddr>,
    /// Certificates of the running node's cluster (with --connect): ca.pem, engine.pem.
    #[arg(long)]
    pub(crate) certs: Option<PathBuf>,
}

impl Command {
    fn name(&self) -> &'static str {
        match self {
            Command::Append(_) => "append",
            Command::Commit(_) => "commit",
            Command::Persist(_) => "persist",
            Command::Recovery(_) => "recovery",
            Command::Chaos(_) => "chaos",
            Command::Soak(_) => "soak",
            Command::Read(_) => "read",
        }
    }

    /// A deadline no healthy run comes near: the measuring time several times over, plus
    /// minutes for starting nodes (pre-writing journals on a shared disk is slow).
    fn deadline_default(&self) -> Duration {
        match self {
            Command::Append(a) => a.deadline_default(),
            Command::Commit(a) => a.deadline_default(),
            Command::Persist(a) => a.deadline_default(),
            Command::Recovery(a) => a.deadline_default(),
            Command::Chaos(a) => a.deadline_default(),
            Command::Soak(a) => a.deadline_default(),
            Command::Read(a) => a.deadline_default(),
        }
    }
}

fn main() {
    let cli = Cli::parse();
    let deadline = match cli.deadline {
        Some(0) => {
            eprintln!("sixfold-bench: --deadline must be at least 1 second");
            std::process::exit(2);
        }
        Some(seconds) => Duration::from_secs(seconds),
        None => cli.command.deadline_default(),
    };
    watchdog::start(cli.command.name(), deadline);
    let result = match cli.command {
        Command::Append(args) => append::run(&args),
        Command::Commit(args) => commit::run(&args),
        Command::Persist(args) => persist::run(&args),
        Command::Recovery(args) => recovery::run(&args),
        Command::Chaos(args) => chaos::run(&args),
        Command::Soak(args) => soak::run(&args),
        Command::Read(args) => read::run(&args),
    };
    if let Err(e) = result {
        eprintln!("sixfold-bench: {e:#}");
        std::process::exit(2);
    }
}
