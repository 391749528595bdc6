//! `sixfold-bench commit --slow-nodes K --delay-ms D`: are slow nodes hidden by the quorum?
//! Six real nodes, one engine, and a UDP proxy ([`UdpDelayProxy`], both ways) in front of the
//! first K nodes in volume order. The same closed-loop commit level is measured twice in one
//! run, on one writer: first with the proxies at 0 ms (the baseline: the proxies' own cost is
//! in both runs, only the delay differs), then at D ms each way.
//!
//! The proxies run on a runtime of their own, so that forwarding datagrams never competes with
//! the engine's (by default current-thread) runtime.
//!
//! Target (read, never asserted in tests): slow p99 / baseline p99 ≤ 1.1 at 16 in flight: a 4/6
//! quorum needs no ack from two slow nodes. `--json`: `{"baseline": {"inflight_K": {"p50_us",
//! "p99_us", …}}, "slow": {…}, "slow_nodes", "delay_ms", "raw", "targets": {…}}`.

use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use engine::{VolumeClient, VolumeConfig, VolumeFile};
use node::io::raw::SyncMode;
use serde_json::json;
use tools::cluster::LocalCluster;
use tools::netfault::UdpDelayProxy;

use crate::commit::{self, CommitArgs, CommitLevel, Workload};
use crate::stats::Summary;

/// The ratio the target allows.
const RATIO_MAX: f64 = 1.1;

/// The two runs of every level: (baseline, slow).
type Pairs = Vec<(CommitLevel, CommitLevel)>;

pub(crate) fn run_in(args: &CommitArgs, levels: &[usize], run_dir: &Path) -> anyhow::Result<()> {
    let slow_count = args.slow_nodes.expect("slow mode");
    let duration = Duration::from_secs(args.seconds);
    let progress = |m: &str| {
        crate::watchdog::phase(m);
        if !args.json {
            eprintln!("{m}")
        }
    };
    let runtime = commit::engine_runtime(args.engine_threads)?;
    progress("raw disk: 4 KiB O_DIRECT write + fdatasync (linked), io_uring, 1 in flight …");
    let raw = crate::append::raw_summary(run_dir, duration, SyncMode::Fdatasync)?;
    // Both runs write to the same journals.
    let options = commit::cluster_options(args, &levels.repeat(2), &raw);
    progress(&format!(
        "starting 6 sixfold-nodes in 3 AZs ({} journal files of 256 MiB each to pre-write) …",
        options.journal_file_count
    ));
    let mut cluster = runtime.block_on(LocalCluster::start(&run_dir.join("cluster"), &options))?;
    let proxy_runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .thread_name("delay-proxy")
        .enable_all()
        .build()?;
    let (file, proxies) = proxy_runtime.block_on(slow_file(&cluster.volume, slow_count))?;
    let slow_names: Vec<String> = cluster.volume.nodes[..slow_count]
        .iter()
        .map(|n| n.name.clone())
        .collect();
    let delay_ms = args.delay_ms.unwrap_or(commit::DELAY_MS_DEFAULT);
    let delay = Duration::from_millis(delay_ms);
    let measured = runtime.block_on(measure_both(
        (&cluster, file),
        &proxies,
        levels,
        (duration, delay),
        &progress,
    ));
    drop(proxies);
    let stopped = cluster.stop();
    if measured.is_err() || stopped.is_err() {
        commit::print_log_tails(&cluster);
    }
    let pairs = measured?;
    stopped?;
    let report = Report {
        args,
        delay_ms,
        raw: &raw,
        pairs: &pairs,
        slow_names: &slow_names,
    };
    if args.json {
        report.json();
    } else {
        report.text();
    }
    Ok(())
}

/// The volume file with its first `count` nodes reached through a proxy each (at 0 ms).
async fn slow_file(
    file: &VolumeFile,
    count: usize,
) -> anyhow::Result<(VolumeFile, Vec<UdpDelayProxy>)> {
    let mut file = file.clone();
    let mut proxies = Vec::new();
    for node in file.nodes.iter_mut().take(count) {
        let proxy = UdpDelayProxy::start_both_ways(node.address, Duration::ZERO).await?;
        node.address = proxy.addr;
        proxies.push(proxy);
    }
    Ok((file, proxies))
}

/// Every level at 0 ms, then every level at `delay`, on one writer.
async fn measure_both(
    (cluster, file): (&LocalCluster, VolumeFile),
    proxies: &[UdpDelayProxy],
    levels: &[usize],
    (duration, delay): (Duration, Duration),
    progress: &impl Fn(&str),
) -> anyhow::Result<Pairs> {
    let volume =
        Arc::new(VolumeClient::open(file, cluster.endpoint()?, VolumeConfig::default()).await?);
    let workload = Arc::new(Workload::new(&volume));
    let mut baseline = Vec::new();
    for &inflight in levels {
        progress(&format!(
            "quorum commits, baseline (proxies at 0 ms): {inflight} in flight …"
        ));
        baseline.push(commit::measure_level(&volume, &workload, inflight, duration).await?);
    }
    assert!(!proxies.is_empty(), "slow mode slows at least one node");
    for proxy in proxies {
        proxy.set_delay(delay);
    }
    let mut slow = Vec::new();
    for &inflight in levels {
        progress(&format!(
            "quorum commits, {} slow node(s) at +{} ms each way: {inflight} in flight …",
            proxies.len(),
            delay.as_millis()
        ));
        slow.push(commit::measure_level(&volume, &workload, inflight, duration).await?);
    }
    assert!(baseline.len() == slow.len());
    Ok(baseline.into_iter().zip(slow).collect())
}

struct Report<'a> {
    args: &'a CommitArgs,
    delay_ms: u64,
    raw: &'a Summary,
    pairs: &'a [(CommitLevel, CommitLevel)],
    slow_names: &'a [String],
}

impl Report<'_> {
    /// The level the target is read at (16 in flight, else the last one), and its ratio.
    fn target(&self) -> Option<(usize, u64, u64, f64)> {
        let (base, slow) = self
            .pairs
            .iter()
            .find(|(b, _)| b.inflight == 16)
            .or(self.pairs.last())?;
        let ratio = slow.summary.p99_us as f64 / base.summary.p99_us.max(1) as f64;
        Some((
            base.inflight,
            base.summary.p99_us,
            slow.summary.p99_us,
            ratio,
        ))
    }

    fn json(&self) {
        let level = |c: &CommitLevel| {
            let mut v = json!(c.summary);
            let extra = json!({
                "messages_per_txn": c.messages_per_txn,
                "appends_per_txn": c.appends_per_txn,
                "bytes_sent_per_txn": c.bytes_per_txn,
                "quiesced": c.quiesced,
            });
            v.as_object_mut()
                .expect("a summary is an object")
                .extend(extra.as_object().expect("an object").clone());
            v
        };
        let mut baseline = serde_json::Map::new();
        let mut slow = serde_json::Map::new();
        for (b, s) in self.pairs {
            baseline.insert(format!("inflight_{}", b.inflight), level(b));
            slow.insert(format!("inflight_{}", s.inflight), level(s));
        }
        let target = self.target();
        let out = json!({
            "baseline": baseline,
            "slow": slow,
            "slow_nodes": self.slow_names,
            "delay_ms": self.delay_ms,
            "raw": self.raw,
            "record_bytes": commit::RECORD_BYTES,
            "engine_runtime": commit::runtime_name(self.args.engine_threads),
            "targets": {
                "p99_level": target.map(|t| t.0),
                "baseline_p99_us": target.map(|t| t.1),
                "slow_p99_us": target.map(|t| t.2),
                "slow_over_baseline_p99": target.map(|t| t.3),
                "ratio_max": RATIO_MAX,
                "slow_nodes_hidden": target.map(|t| t.3 <= RATIO_MAX),
            },
        });
        println!("{out}");
    }

    fn text(&self) {
        println!(
            "{}",
            self.raw.line("raw disk: write + fdatasync, 1 in flight")
        );
        let slow_label = format!(
            "{} +{} ms each way",
            self.slow_names.join("+"),
            self.delay_ms
        );
        for (b, s) in self.pairs {
            for (c, what) in [(b, "baseline (proxies at 0 ms)"), (s, slow_label.as_str())] {
                let label = format!("commit, {} in flight, {what}", c.inflight);
                println!("{}", c.summary.line(&label));
                println!(
                    "    per txn: {:.2} messages, {:.2} appends, {:.0} bytes sent{}",
                    c.messages_per_txn,
                    c.appends_per_txn,
                    c.bytes_per_txn,
                    if c.quiesced {
                        ""
                    } else {
                        " (segments had not caught up)"
                    }
                );
            }
        }
        if let Some((k, base, slow, ratio)) = self.target() {
            let note = if k == 16 { "" } else { " (stated at 16)" };
            let verdict = if ratio <= RATIO_MAX { "met" } else { "MISSED" };
            println!(
                "target: commit p99 at {k} in flight with slow nodes / baseline = {slow} / {base} \
                 µs = {ratio:.2}× (≤ {RATIO_MAX}×){note}: {verdict}"
            );
        }
    }
}
