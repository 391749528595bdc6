//! The node's Prometheus endpoint as an operator scrapes it: a real node process with
//! `metrics_listen` on a free loopback port, real appends over QUIC with mutual TLS, a real
//! HTTP GET, and the body parsed by a Prometheus text parser (`prometheus-parse`), not by
//! string matching.

mod common;

use common::*;
use tools::procs::{NodeProcess, NodeSpec};
use wire::Message;

/// Appends records 1..=20 (4 KiB each) to segment (1, 0, 0); returns the last Ack's SCL.
fn append_twenty(certs: &std::path::Path, node: &NodeProcess) -> u64 {
    runtime().block_on(async {
        let client = connect(certs, node).await;
        let mut scl = 0;
        for lsn in 1..=20 {
            let reply = client
                .request(Message::Append(append(
                    1,
                    vec![write(lsn, lsn - 1, lsn, 4096)],
                )))
                .await
                .unwrap();
            let Message::Ack(ack) = reply else {
                panic!("append {lsn}: {reply:?}")
            };
            scl = ack.scl.0;
        }
        client.close();
        scl
    })
}

/// Goal: every documented family is served, the append histograms and the journal gauges move
/// with real appends, the SCL gauge equals the SCL the acks carried, and anything but
/// `/metrics` is 404. Method: a node with `metrics_listen = "127.0.0.1:0"`; scrape, append 20
/// batches, scrape again; compare.
#[test]
fn metrics_are_served_parsed_and_move_with_appends() {
    let dir = test_dir("node-metrics");
    let certs = certs(&dir);
    let mut spec = NodeSpec::local("node1", &dir.join("node1"), &certs);
    spec.metrics_listen = Some("127.0.0.1:0".parse().unwrap());
    let node = NodeProcess::start(&spec.write_config().unwrap()).unwrap();
    let addr = node
        .metrics_addr()
        .expect("the node logs where it serves metrics");

    let before = scrape(addr);
    for name in [
        "node_append_seconds_count",
        "node_persist_seconds_count",
        "node_group_appends_count",
        "node_group_bytes_count",
        "node_journal_bytes_used",
        "node_journal_bytes_free",
        "node_page_store_bytes",
        "node_journal_groups_total",
        "node_gossip_gaps",
        "node_gossip_records_fetched_total",
        "node_coalesce_backlog_records",
        "node_gc_runs_total",
        "node_scrub_pages_checked_total",
        "node_scrub_repaired_total",
        "node_acks_throttled_total",
        "node_throttled",
        "node_acks_held",
        "node_segment_scl",
        "node_segment_materialized_lsn",
    ] {
        value(&before, name);
    }
    assert_eq!(value(&before, "node_segment_scl"), 0.0);
    let used_before = value(&before, "node_journal_bytes_used");

    let scl = append_twenty(&certs, &node);
    assert_eq!(scl, 20);

    let after = scrape(addr);
    assert_eq!(value(&after, "node_append_seconds_count"), 20.0);
    assert!(value(&after, "node_persist_seconds_count") >= 1.0);
    assert_eq!(value(&after, "node_group_appends_sum"), 20.0);
    assert!(value(&after, "node_journal_groups_total") >= 1.0);
    assert!(value(&after, "node_journal_bytes_used") >= used_before + 20.0 * 4096.0);
    let scl_sample = after
        .samples
        .iter()
        .find(|s| s.metric == "node_segment_scl")
        .unwrap();
    assert_eq!(scl_sample.labels.get("volume"), Some("1"));
    assert_eq!(scl_sample.labels.get("pg"), Some("0"));
    assert_eq!(scl_sample.labels.get("segment"), Some("0"));
    assert_eq!(value(&after, "node_segment_scl"), scl as f64);

    let (status, _) = http_get(addr, "/");
    assert!(status.contains("404"), "{status}");
    let (status, _) = http_get(addr, "/metrics/extra");
    assert!(status.contains("404"), "{status}");
    drop(node);
    cleanup(&dir);
}

/// Goal: a node without `metrics_listen` serves no metrics (off unless set). Method: start
/// one with the default spec; its log names no metrics address.
#[test]
fn metrics_are_off_unless_configured() {
    let dir = test_dir("node-metrics-off");
    let certs = certs(&dir);
    let (node, _) = start_node(&dir, &certs);
    assert_eq!(node.metrics_addr(), None);
    drop(node);
    cleanup(&dir);
}
