//! A request to a node that never answers fails at its deadline with an error naming the
//! request, the node and its address: a client never waits forever (issue 7's hang).

mod common;

use std::time::Duration;

use common::*;
use wire::{Message, VolumeId};

/// Goal: a request whose reply never comes fails once its deadline passes, with an error that
/// says which request to which node timed out. Method: a real node; send a frame's length
/// prefix promising 64 bytes and none of them, so the node waits for the rest of that frame
/// and never reads the next request; then a GetVolumeState with a 2 s deadline. (No timed
/// assertion: only that the error comes and what it says.)
#[test]
fn a_request_without_a_reply_fails_at_its_deadline_naming_it() {
    let dir = test_dir("client-deadline");
    let certs = certs(&dir);
    let (node, _) = start_node(&dir, &certs);
    let error = runtime().block_on(async {
        let client = connect(&certs, &node)
            .await
            .with_request_timeout(Duration::from_secs(2));
        client.send_bytes(&64u32.to_le_bytes()).await.unwrap();
        let reply = client.request(Message::GetVolumeState(VolumeId(1))).await;
        reply.expect_err("the node cannot have answered")
    });
    let text = format!("{error:#}");
    assert!(text.contains("GetVolumeState request"), "{text}");
    assert!(
        text.contains(&format!("to node node1 at {}", node.addr)),
        "{text}"
    );
    assert!(
        text.contains("no reply within its deadline of 2s"),
        "{text}"
    );
    drop(node);
    cleanup(&dir);
}
