//! Chaos with real processes: six nodes killed with SIGKILL and restarted (at most two down at
//! once, sometimes a whole AZ) and the writer dropped and recovered, under a self-verifying
//! workload; no acknowledged commit may be lost, and commits must resume after every fault.

mod common;

use std::time::Duration;

use common::{cleanup, test_dir};
use tools::chaos::{ChaosOptions, run};

/// Goal: every acknowledged commit survives node crashes (up to an AZ's worth at once) and
/// writer crashes (some while the old writer still runs), and commits resume after each.
/// Method: `tools::chaos::run` for 30 s (seed from `SIXFOLD_CHAOS_SEED`, default 1): it fails
/// if commits do not resume within its deadline after a fault (naming the writer's state);
/// then the counts it reports are checked. No timing is asserted.
#[test]
fn acknowledged_commits_survive_node_and_writer_crashes() {
    let seed = std::env::var("SIXFOLD_CHAOS_SEED")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(1);
    let dir = test_dir("chaos");
    let options = ChaosOptions {
        dir: dir.join("cluster"),
        duration: Duration::from_secs(30),
        seed,
        workers: 4,
        verbose: true,
    };
    let report = run(&options).unwrap_or_else(|e| panic!("chaos seed {seed}: {e:#}"));
    eprintln!("chaos seed {seed}: {report:?}");
    assert!(report.cycles >= 3, "{report:?}");
    assert_eq!(report.resumed, report.cycles, "{report:?}");
    assert!(report.acknowledged > 0, "{report:?}");
    assert_eq!(report.lost, 0, "seed {seed}: {report:?}");
    assert_eq!(report.verified, report.acknowledged, "{report:?}");
    cleanup(&dir);
}
