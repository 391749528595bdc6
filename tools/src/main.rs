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
    /// Print what is durable on a node.
    Inspect {
        #[command(subcommand)]
        what: Inspect,
    },
}

#[derive(Subcommand, Debug)]
enum Inspect {
    /// Every durable record of a node's journal (DIR: the node's data_dir or its journal/).
    Journal { dir: PathBuf },
}

fn main() {
    let cli = Cli::parse();
    let result = match cli.command {
        Command::Certs {
            out,
            nodes,
            engines,
        } => {
            let names: Vec<String> = nodes.into_iter().chain(engines).collect();
            tools::certs::generate(&out, &names).map(|()| {
                println!(
                    "wrote CA and {} certificates under {}",
                    names.len(),
                    out.display()
                )
            })
        }
        Command::Inspect {
            what: Inspect::Journal { dir },
        } => tools::inspect::print_journal(&dir, &mut std::io::stdout().lock()),
    };
    if let Err(e) = result {
        eprintln!("sixfold: {e:#}");
        std::process::exit(2);
    }
}
