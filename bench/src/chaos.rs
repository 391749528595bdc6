//! `sixfold-bench chaos`: six real nodes and an in-process writer under a self-verifying
//! workload while nodes are killed with SIGKILL and restarted (at most two down at once,
//! sometimes a whole AZ) and the writer is dropped and recovered (see `tools::chaos`). Prints
//! the fault cycles, the commits acknowledged, verified and lost (must be 0), and the longest
//! time without a commit.
//!
//! Targets (read, never asserted here): lost = 0; commits resume after every fault (the run
//! fails if they do not within its deadline).

use std::path::PathBuf;
use std::time::Duration;

use anyhow::Context;
use serde_json::json;
use tools::chaos::{ChaosOptions, ChaosReport};

#[derive(clap::Args, Debug)]
pub(crate) struct ChaosArgs {
    /// Directory on the disk under test: the cluster goes under DIR/chaos-<pid>, removed at
    /// the end unless something was lost (then it is kept for a post-mortem).
    #[arg(long)]
    dir: PathBuf,
    /// Inject faults for this long.
    #[arg(long, default_value_t = 60)]
    seconds: u64,
    /// Seed of the fault schedule (nodes, AZs, down times, writer restarts).
    #[arg(long, default_value_t = 1)]
    seed: u64,
    /// Concurrent transactions of the workload (paced to 200 a second in all).
    #[arg(long, default_value_t = 4)]
    workers: usize,
    /// Print one JSON object instead of the table (and no progress lines).
    #[arg(long)]
    json: bool,
}

impl ChaosArgs {
    /// Faults for --seconds, then recovery and the final check (commits must resume within
    /// 60 s of each fault healing).
    pub(crate) fn deadline_default(&self) -> Duration {
        Duration::from_secs(900 + 3 * self.seconds)
    }
}

pub(crate) fn run(args: &ChaosArgs) -> anyhow::Result<()> {
    crate::watchdog::phase("chaos: faults and checks");
    anyhow::ensure!(args.seconds > 0, "--seconds must be at least 1");
    // The engine logs every node it loses at WARN: too many lines under chaos. RUST_LOG shows
    // them when wanted.
    crate::stats::init_tracing("error");
    let run_dir = args.dir.join(format!("chaos-{}", std::process::id()));
    std::fs::create_dir_all(&run_dir)
        .with_context(|| format!("cannot create {}", run_dir.display()))?;
    let options = ChaosOptions {
        dir: run_dir.clone(),
        duration: Duration::from_secs(args.seconds),
        seed: args.seed,
        workers: args.workers,
        verbose: !args.json,
    };
    let report = tools::chaos::run(&options).with_context(|| {
        format!(
            "chaos seed {} (cluster kept in {})",
            args.seed,
            run_dir.display()
        )
    })?;
    if args.json {
        let out = json!({
            "cycles": report.cycles,
            "acknowledged": report.acknowledged,
            "verified": report.verified,
            "lost": report.lost,
            "stall_ms_max": report.stall_ms_max,
        });
        println!("{out}");
    } else {
        print_table(args, &report);
    }
    anyhow::ensure!(
        report.lost == 0,
        "{} acknowledged commits lost (seed {}; cluster kept in {})",
        report.lost,
        args.seed,
        run_dir.display()
    );
    if let Err(e) = std::fs::remove_dir_all(&run_dir) {
        eprintln!("sixfold-bench: cannot remove {}: {e}", run_dir.display());
    }
    Ok(())
}

fn print_table(args: &ChaosArgs, report: &ChaosReport) {
    println!("chaos: seed {}, {} s of faults", args.seed, args.seconds);
    let rows = [
        ("cycles", report.cycles),
        ("node kills (SIGKILL)", report.node_kills),
        ("writer restarts (recoveries)", report.writer_restarts),
        ("commits acknowledged", report.acknowledged),
        ("commits verified", report.verified),
        ("commits lost", report.lost),
        ("full-volume checks", report.checks),
        ("longest commit stall (ms)", report.stall_ms_max),
        ("longest writer open (ms)", report.recovery_ms_max),
    ];
    for (label, value) in rows {
        println!("  {label:<30} {value:>8}");
    }
    let verdict = if report.lost == 0 { "met" } else { "MISSED" };
    println!(
        "target: no acknowledged commit lost ({} of {} verified): {verdict}",
        report.verified, report.acknowledged
    );
    println!(
        "target: commits resumed after every fault ({} of {} cycles): met",
        report.resumed, report.cycles
    );
}
