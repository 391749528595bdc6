//! `sixfold-sim --seeds N` runs seeds 0..N and ends with `seeds=N failures=F`;
//! `sixfold-sim --seed S` replays one seed.

use clap::Parser;

#[global_allocator]
static GLOBAL: tikv_jemallocator::Jemalloc = tikv_jemallocator::Jemalloc;

/// Sixfold's deterministic simulator.
#[derive(Parser, Debug)]
#[command(version, about)]
struct Args {
    /// Run seeds 0..N (from --from on).
    #[arg(long, conflicts_with = "seed")]
    seeds: Option<u64>,
    /// With --seeds N: start at this seed instead of 0 (split a long run over cores).
    #[arg(long, default_value_t = 0, requires = "seeds")]
    from: u64,
    /// Replay one seed, printing what it did.
    #[arg(long)]
    seed: Option<u64>,
    /// Virtual milliseconds of faults per seed.
    #[arg(long, default_value_t = 8_000)]
    fault_ms: u64,
    /// Plant a bug to see the checkers catch it: ack-before-durable, write-quorum-3,
    /// skip-truncation, no-gossip.
    #[arg(long, value_parser = parse_bug)]
    plant: Option<sim::Bug>,
    /// Run the compact reference model of the node protocol instead of the real NodeCore.
    #[arg(long)]
    model_nodes: bool,
    /// Also flip bits on crashed nodes' disks (the records a flip loses come back through
    /// gossip).
    #[arg(long)]
    bit_flips: bool,
    /// Back-pressure: one to three nodes (by seed) delay every ack by up to 200 ms.
    #[arg(long)]
    throttle: bool,
    /// Print what the cores and the simulator do (with --seed).
    #[arg(long)]
    trace: bool,
}

fn parse_bug(name: &str) -> Result<sim::Bug, String> {
    sim::Bug::ALL
        .into_iter()
        .find(|b| b.name() == name)
        .ok_or_else(|| {
            let names: Vec<&str> = sim::Bug::ALL.iter().map(|b| b.name()).collect();
            format!("unknown bug {name:?}; choose one of {}", names.join(", "))
        })
}

fn main() {
    let args = Args::parse();
    let seeds: Vec<u64> = match (args.seed, args.seeds) {
        (Some(seed), _) => vec![seed],
        (None, Some(n)) => (args.from..n).collect(),
        (None, None) => {
            eprintln!("sixfold-sim: give --seeds N (run seeds 0..N) or --seed S (replay one)");
            std::process::exit(2);
        }
    };
    if args.trace {
        tracing_subscriber::fmt()
            .with_env_filter(tracing_subscriber::EnvFilter::new("debug"))
            .with_ansi(false)
            .without_time()
            .init();
    }
    if args.seed.is_none() {
        // Panics are reported as seed failures; keep the default hook's noise out.
        std::panic::set_hook(Box::new(|_| {}));
    }
    let mut failures = 0u64;
    let mut repaired = 0u64;
    for seed in &seeds {
        let mut options = sim::Options::seed(*seed);
        options.fault_ms = args.fault_ms;
        options.bug = args.plant;
        options.model_nodes = args.model_nodes;
        options.bit_flips = args.bit_flips;
        options.throttle = args.throttle;
        match sim::run_seed(&options) {
            Ok(report) => {
                repaired += report.damage_repaired;
                if args.seed.is_some() {
                    println!("seed {seed}: ok {report:?}");
                }
            }
            Err(e) => {
                failures += 1;
                println!("seed {seed}: FAILED: {e}");
                let flags = [
                    (args.bit_flips, " --bit-flips"),
                    (args.throttle, " --throttle"),
                    (args.model_nodes, " --model-nodes"),
                ]
                .into_iter()
                .filter_map(|(on, flag)| on.then_some(flag))
                .collect::<String>();
                let plant = args
                    .plant
                    .map(|b| format!(" --plant {}", b.name()))
                    .unwrap_or_default();
                println!(
                    "  replay: sixfold-sim --seed {seed} --fault-ms {}{flags}{plant}",
                    args.fault_ms
                );
            }
        }
    }
    if args.bit_flips {
        println!(
            "seeds={} failures={failures} damage_repaired={repaired}",
            seeds.len()
        );
    } else {
        println!("seeds={} failures={failures}", seeds.len());
    }
    if failures > 0 {
        std::process::exit(1);
    }
}
