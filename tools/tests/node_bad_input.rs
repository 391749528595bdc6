//! Bad input against a real node: every bad request gets an error reply naming the problem,
//! nothing from it is persisted, and the node keeps serving a well-behaved client on another
//! connection — and the offending connection too.

mod common;

use common::*;
use engine::NodeClient;
use wire::{ErrorCode, Frame, Lsn, Message};

async fn expect_error(
    client: &NodeClient,
    request_id: u64,
    bytes: &[u8],
    code: ErrorCode,
) -> String {
    match client.request_raw(request_id, bytes).await.unwrap() {
        Message::Error(e) => {
            assert_eq!(e.code, code, "{}", e.message);
            assert!(!e.message.is_empty());
            e.message
        }
        other => panic!("expected {code:?}, got {other:?}"),
    }
}

fn frame(request_id: u64, append: wire::Append) -> Vec<u8> {
    Frame {
        request_id,
        message: Message::Append(append),
    }
    .to_bytes()
}

/// Goal: bad CRC, unknown segment, older epoch, malformed, truncated and oversized frames each
/// get their own error; a good client on another connection is unaffected throughout.
/// Method: interleave each bad request on connection A with good appends on connection B, then
/// read the journal to check that only the good records were persisted.
#[test]
#[allow(clippy::too_many_lines)] // One scenario, read top to bottom: each bad case, then a good one.
fn each_bad_input_gets_its_error_and_the_node_keeps_serving() {
    let dir = test_dir("bad-input");
    let certs = certs(&dir);
    let (node, spec) = start_node(&dir, &certs);
    runtime().block_on(async {
        let bad = connect(&certs, &node).await;
        let good = connect(&certs, &node).await;
        assert!(matches!(fence(&good, 1, 5).await, Message::VolumeState(_)));
        let mut lsn = 0u64;
        let mut good_append = async || {
            lsn += 1;
            let ack = good
                .append(append(5, vec![write(lsn, lsn - 1, 1, 64)]))
                .await
                .unwrap();
            assert_eq!(ack.unwrap().scl, Lsn(lsn));
        };
        good_append().await;

        // A record whose payload was changed after its CRC was computed.
        let mut bytes = frame(100, append(5, vec![write(1000, 999, 1, 64)]));
        let last = bytes.len() - 1;
        bytes[last] ^= 1;
        let msg = expect_error(&bad, 100, &bytes, ErrorCode::BadCrc).await;
        assert!(msg.contains("1000"), "names the record: {msg}");
        good_append().await;

        // A segment this node does not host.
        let mut other = append(5, vec![write(1001, 1000, 1, 64)]);
        other.pg = wire::PgId(9);
        let msg = expect_error(&bad, 101, &frame(101, other), ErrorCode::UnknownSegment).await;
        assert!(msg.contains("pg 9"), "{msg}");
        good_append().await;

        // An epoch older than one the node has seen (the good client uses 5).
        let old = append(4, vec![write(1002, 1001, 1, 64)]);
        let msg = expect_error(&bad, 102, &frame(102, old), ErrorCode::StaleEpoch).await;
        assert!(msg.contains("epoch 4"), "{msg}");
        good_append().await;

        // An epoch newer than the node's: never adopted by an append.
        let new = append(6, vec![write(1002, 1001, 1, 64)]);
        let msg = expect_error(&bad, 107, &frame(107, new), ErrorCode::EpochNotInstalled).await;
        assert!(msg.contains("epoch 6") && msg.contains("Fence"), "{msg}");
        good_append().await;

        // Unknown message kind, unsupported version, a body cut short.
        let mut kind = frame(103, append(5, vec![write(1003, 1002, 1, 64)]));
        kind[5] = 77;
        expect_error(&bad, 103, &kind, ErrorCode::Malformed).await;
        let mut version = frame(104, append(5, vec![write(1004, 1003, 1, 64)]));
        version[4] = 9;
        let msg = expect_error(&bad, 0, &version, ErrorCode::UnsupportedVersion).await;
        assert!(msg.contains('9'), "{msg}");
        let mut cut = frame(105, append(5, vec![write(1005, 1004, 1, 64)]));
        cut.truncate(cut.len() - 10);
        let len = u32::try_from(cut.len() - 4).unwrap();
        cut[..4].copy_from_slice(&len.to_le_bytes());
        let msg = expect_error(&bad, 105, &cut, ErrorCode::Malformed).await;
        assert!(msg.contains("truncated"), "{msg}");
        // A reply sent to a node is not a request.
        let ack = Frame {
            request_id: 106,
            message: Message::Ack(wire::SegmentAck {
                volume: wire::VolumeId(1),
                pg: wire::PgId(0),
                segment: wire::SegmentIndex(0),
                scl: Lsn(1),
            }),
        };
        expect_error(&bad, 106, &ack.to_bytes(), ErrorCode::Malformed).await;
        good_append().await;

        // A frame over the limit: the node answers and skips its bytes without keeping them.
        let declared = wire::FRAME_BYTES_MAX + 1;
        let mut oversized = u32::try_from(declared - 4).unwrap().to_le_bytes().to_vec();
        oversized.resize(declared, 0xEE);
        let msg = expect_error(&bad, 0, &oversized, ErrorCode::FrameTooLarge).await;
        assert!(msg.contains("limit"), "{msg}");
        good_append().await;

        // The offending connection itself still works.
        let ack = bad
            .append(append(5, vec![write(1100, 1099, 1, 64)]))
            .await
            .unwrap()
            .unwrap();
        assert_eq!(
            ack.scl,
            Lsn(lsn),
            "a record beyond a gap does not move the SCL"
        );
    });
    let mut lsns = durable_lsns(&spec.data_dir);
    lsns.sort_unstable();
    assert_eq!(
        lsns,
        vec![1, 2, 3, 4, 5, 6, 7, 1100],
        "nothing from a bad batch was persisted"
    );
    drop(node);
    cleanup(&dir);
}

/// Goal: a client without a certificate, or with one signed by another CA, is refused at the
/// handshake and never gets a request through.
/// Method: connect both ways and try an append; then check a proper client still works.
#[test]
fn handshake_without_a_ca_signed_certificate_is_refused() {
    let dir = test_dir("mtls");
    let certs = certs(&dir);
    let (node, spec) = start_node(&dir, &certs);
    runtime().block_on(async {
        let no_cert = engine::tls::client_config(&certs.join("ca.pem"), None).unwrap();
        let rogue = dir.join("rogue");
        let rogue_cert = engine::tls::client_config(
            &certs.join("ca.pem"),
            Some((&rogue.join("engine.pem"), &rogue.join("engine.key.pem"))),
        )
        .unwrap();
        for (what, config) in [("no certificate", no_cert), ("rogue CA", rogue_cert)] {
            let endpoint = engine::tls::endpoint_with(config).unwrap();
            // With TLS 1.3 the client may finish its side of the handshake before the server
            // rejects its certificate, so the refusal shows at connect or at the first request.
            let refused = match NodeClient::connect(&endpoint, node.addr, "node1").await {
                Err(_) => true,
                Ok((client, _)) => client
                    .append(append(1, vec![write(7, 0, 1, 8)]))
                    .await
                    .is_err(),
            };
            assert!(refused, "{what} must be refused");
        }
        let client = connect(&certs, &node).await;
        let ack = client
            .append(append(1, vec![write(1, 0, 1, 8)]))
            .await
            .unwrap()
            .unwrap();
        assert_eq!(ack.scl, Lsn(1));
    });
    assert_eq!(
        durable_lsns(&spec.data_dir),
        vec![1],
        "nothing from refused clients"
    );
    drop(node);
    cleanup(&dir);
}

/// What a node certificate may ask: a volume's state, records, a page.
async fn peer_requests_are_served(peer: &NodeClient, volume: wire::VolumeId) {
    let state = peer.request(Message::GetVolumeState(volume)).await.unwrap();
    assert!(
        matches!(&state, Message::VolumeState(s) if s.epoch.0 == 0),
        "{state:?}"
    );
    let fetch = wire::FetchRecords {
        volume,
        epoch: wire::Epoch(0),
        pg: wire::PgId(0),
        segment: wire::SegmentIndex(0),
        after: Lsn(0),
        through: Lsn(100),
        bytes_max: 1 << 20,
    };
    let records = peer.request(Message::FetchRecords(fetch)).await.unwrap();
    assert!(
        matches!(&records, Message::Records(r) if r.records.is_empty()),
        "{records:?}"
    );
    let read = wire::ReadPage {
        volume,
        epoch: wire::Epoch(0),
        pg: wire::PgId(0),
        segment: wire::SegmentIndex(0),
        page: wire::PageId(1),
        read_point: Lsn(0),
    };
    let page = peer.request(Message::ReadPage(read)).await.unwrap();
    assert!(
        matches!(&page, Message::Page(p) if p.page_lsn == Lsn(0)),
        "{page:?}"
    );
}

/// One request of each kind only an engine certificate may make.
fn engine_only_requests() -> Vec<Message> {
    let volume = wire::VolumeId(1);
    vec![
        Message::Append(append(0, vec![write(1, 0, 1, 8)])),
        Message::Fence(wire::Fence {
            volume,
            epoch_current: wire::Epoch(0),
            epoch_new: wire::Epoch(1),
        }),
        Message::Truncate(wire::Truncate {
            volume,
            epoch: wire::Epoch(0),
            range: wire::TruncationRange {
                annul_epoch: wire::Epoch(0),
                after: Lsn(0),
                through: Lsn(10),
            },
        }),
        Message::HostSegments(wire::HostSegments {
            volume,
            epoch: wire::Epoch(0),
            page_size_bytes: 8192,
            pages_per_pg: 0,
            pg_count: 0,
            segments: vec![(wire::PgId(1), wire::SegmentIndex(0))],
            nodes: Vec::new(),
            placement: Vec::new(),
        }),
        Message::SetPgmrpl(wire::SetPgmrpl {
            volume,
            pg: wire::PgId(0),
            pgmrpl: Lsn(1),
            epoch: wire::Epoch(1),
            vdl: Lsn::ZERO,
        }),
    ]
}

/// Goal: the role in a certificate decides what its holder may do: a node certificate cannot
/// append, fence, truncate, host segments or set PGMRPL, but may ask for a volume's state,
/// fetch records and read pages (gossip, page repair and segment rebuild); an engine certificate may do all of it; every refusal
/// names the role required and the role presented, and nothing refused is persisted.
/// Method: connect with node1's certificate and with the engine's, send each request.
#[test]
fn a_node_certificate_cannot_write_an_engine_certificate_can() {
    let dir = test_dir("roles");
    let certs = certs(&dir);
    let (node, spec) = start_node(&dir, &certs);
    runtime().block_on(async {
        let peer = connect_as(&certs, &node, "node2").await;
        let forbidden = |reply: Message| match reply {
            Message::Error(e) => {
                assert_eq!(e.code, ErrorCode::Forbidden, "{}", e.message);
                assert!(
                    e.message.contains("needs an engine certificate"),
                    "{}",
                    e.message
                );
                assert!(
                    e.message.contains("presented a node certificate"),
                    "{}",
                    e.message
                );
            }
            other => panic!("a node certificate must be refused, got {other:?}"),
        };
        let volume = wire::VolumeId(1);
        for request in engine_only_requests() {
            forbidden(peer.request(request).await.unwrap());
        }
        peer_requests_are_served(&peer, volume).await;
        // The engine's certificate: the same writes go through.
        let engine = connect(&certs, &node).await;
        let ack = engine
            .append(append(1, vec![write(1, 0, 1, 8)]))
            .await
            .unwrap();
        assert_eq!(ack.unwrap().scl, Lsn(1));
    });
    assert_eq!(
        durable_lsns(&spec.data_dir),
        vec![1],
        "nothing refused was persisted"
    );
    drop(node);
    cleanup(&dir);
}
