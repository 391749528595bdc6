//! The node's QUIC server: accepts connections from holders of CA-signed certificates, reads
//! length-prefixed frames from each bidirectional stream, and writes one reply per frame on
//! the same stream.
//!
//! Invariants:
//! - a frame's length is checked against `FRAME_BYTES_MAX` before anything is allocated;
//!   an oversized or undersized frame is skipped (read and dropped in small chunks) so the
//!   stream stays in sync, and answered with an error;
//! - every bad frame gets an error reply naming the problem (request id 0 if the header
//!   itself could not be read) and the stream, the connection and the node keep serving;
//! - at most `STREAM_INFLIGHT_MAX` requests per stream wait for the persister, and at most
//!   `QUEUED_BYTES_MAX` bytes of frames across the whole node are held between being read and
//!   being answered: a frame's share is taken before its bytes are even allocated.

use std::sync::Arc;

use tokio::sync::{Semaphore, mpsc};
use wire::codec::Reader;
use wire::frame::{FrameHeader, decode_len};
use wire::{ErrorCode, ErrorReply, Frame, Message, SegmentAck};

use crate::node::Node;

/// Requests per stream that may wait for durability at once.
pub const STREAM_INFLIGHT_MAX: usize = 256;
/// Bytes of received frames the node holds at once, across all connections.
pub const QUEUED_BYTES_MAX: usize = 256 << 20;
/// Unit of the byte budget's permits.
const BUDGET_UNIT_BYTES: usize = 1024;
const _: () = assert!(wire::FRAME_BYTES_MAX <= QUEUED_BYTES_MAX / 4);

/// What a request holds until it is answered: its place in its stream and its bytes.
pub struct Permits {
    _stream: tokio::sync::OwnedSemaphorePermit,
    _bytes: tokio::sync::OwnedSemaphorePermit,
}

/// Accepts connections until the endpoint is closed.
pub async fn serve(node: Arc<Node>, endpoint: quinn::Endpoint) {
    let budget = Arc::new(Semaphore::new(QUEUED_BYTES_MAX / BUDGET_UNIT_BYTES));
    while let Some(incoming) = endpoint.accept().await {
        let (node, budget) = (node.clone(), budget.clone());
        tokio::spawn(async move {
            match incoming.await {
                Ok(connection) => serve_connection(node, connection, budget).await,
                Err(e) => tracing::info!("handshake refused: {e}"),
            }
        });
    }
}

async fn serve_connection(node: Arc<Node>, connection: quinn::Connection, budget: Arc<Semaphore>) {
    let peer = connection.remote_address();
    loop {
        match connection.accept_bi().await {
            Ok((send, recv)) => {
                tokio::spawn(serve_stream(node.clone(), send, recv, budget.clone()));
            }
            Err(e) => {
                tracing::debug!("connection from {peer} ended: {e}");
                return;
            }
        }
    }
}

async fn serve_stream(
    node: Arc<Node>,
    mut send: quinn::SendStream,
    mut recv: quinn::RecvStream,
    budget: Arc<Semaphore>,
) {
    let (tx, mut rx) = mpsc::unbounded_channel::<Vec<u8>>();
    let writer = tokio::spawn(async move {
        while let Some(frame) = rx.recv().await {
            if send.write_all(&frame).await.is_err() {
                return;
            }
        }
        let _ = send.finish();
    });
    let inflight = Arc::new(Semaphore::new(STREAM_INFLIGHT_MAX));
    loop {
        let mut prefix = [0u8; 4];
        if recv.read_exact(&mut prefix).await.is_err() {
            break; // The client finished or reset the stream.
        }
        let len = match decode_len(prefix) {
            Ok(len) => len,
            Err(e) => {
                let reply = ErrorReply::new(ErrorCode::of_decode_error(&e), e.to_string());
                send_error(&tx, 0, reply);
                if skip(&mut recv, u64::from(u32::from_le_bytes(prefix)))
                    .await
                    .is_err()
                {
                    break;
                }
                continue;
            }
        };
        let stream = inflight
            .clone()
            .acquire_owned()
            .await
            .expect("semaphore never closed");
        let units =
            u32::try_from(len.div_ceil(BUDGET_UNIT_BYTES)).expect("bounded by the frame limit");
        let bytes = budget
            .clone()
            .acquire_many_owned(units)
            .await
            .expect("semaphore never closed");
        let mut frame = vec![0u8; len];
        if recv.read_exact(&mut frame).await.is_err() {
            break;
        }
        handle_frame(
            &node,
            frame,
            &tx,
            Permits {
                _stream: stream,
                _bytes: bytes,
            },
        );
    }
    drop(tx);
    let _ = writer.await;
}

/// Reads and drops `len` bytes in bounded chunks.
async fn skip(recv: &mut quinn::RecvStream, mut len: u64) -> Result<(), ()> {
    let mut chunk = [0u8; 16 * 1024];
    while len > 0 {
        let n = len.min(chunk.len() as u64) as usize;
        recv.read_exact(&mut chunk[..n]).await.map_err(|_| ())?;
        len -= n as u64;
    }
    Ok(())
}

fn send_error(tx: &mpsc::UnboundedSender<Vec<u8>>, request_id: u64, reply: ErrorReply) {
    tracing::debug!(
        "error reply to request {request_id}: {:?} {}",
        reply.code,
        reply.message
    );
    send_reply(tx, request_id, Err(reply));
}

fn handle_frame(
    node: &Arc<Node>,
    frame: Vec<u8>,
    tx: &mpsc::UnboundedSender<Vec<u8>>,
    permit: Permits,
) {
    let mut reader = Reader::new(&frame);
    let header = match FrameHeader::decode(&mut reader) {
        Ok(header) => header,
        Err(e) => {
            return send_error(
                tx,
                0,
                ErrorReply::new(ErrorCode::of_decode_error(&e), e.to_string()),
            );
        }
    };
    let body = frame
        .get(wire::frame::FRAME_HEADER_BYTES..)
        .unwrap_or_default();
    let message = match Message::decode_body(header.kind, body) {
        Ok(message) => message,
        Err(e) => {
            let reply = ErrorReply::new(ErrorCode::of_decode_error(&e), e.to_string());
            return send_error(tx, header.request_id, reply);
        }
    };
    let request_id = header.request_id;
    match message {
        Message::Append(append) => serve_append(node, &append, frame, tx, request_id, permit),
        Message::ReadPage(read) => serve_read(node, read, tx, request_id, permit),
        Message::HostSegments(host) => {
            send_reply(
                tx,
                request_id,
                node.host_segments(&host).map(|()| Message::Done),
            );
        }
        Message::SetPgmrpl(set) => {
            send_reply(
                tx,
                request_id,
                node.set_pgmrpl(&set).map(|()| Message::Done),
            );
        }
        Message::GetVolumeState(_)
        | Message::Fence(_)
        | Message::Truncate(_)
        | Message::FetchRecords(_) => send_error(
            tx,
            request_id,
            ErrorReply::new(ErrorCode::BadRequest, "not served by this node yet"),
        ),
        Message::Ack(_)
        | Message::Error(_)
        | Message::Page(_)
        | Message::Done
        | Message::VolumeState(_)
        | Message::Records(_) => send_error(
            tx,
            request_id,
            ErrorReply::new(ErrorCode::Malformed, "a node accepts requests, not replies"),
        ),
    }
}

/// Queues a batch; its ack (or error) is sent when the persister is done with it.
fn serve_append(
    node: &Node,
    append: &wire::Append,
    frame: Vec<u8>,
    tx: &mpsc::UnboundedSender<Vec<u8>>,
    request_id: u64,
    permit: Permits,
) {
    let tx = tx.clone();
    let (volume, pg, segment) = (append.volume, append.pg, append.segment);
    let reply = Box::new(move |result: Result<wire::Lsn, ErrorReply>| {
        let ack = result.map(|scl| {
            Message::Ack(SegmentAck {
                volume,
                pg,
                segment,
                scl,
            })
        });
        send_reply(&tx, request_id, ack);
        drop(permit);
    });
    let mut body = frame;
    body.drain(..wire::frame::FRAME_HEADER_BYTES);
    node.append(append, body, reply);
}

/// Serves a read off the runtime thread (it reads the journal files). Even a read that panics
/// (an assertion) gets an answer rather than leaving its client waiting.
fn serve_read(
    node: &Arc<Node>,
    read: wire::ReadPage,
    tx: &mpsc::UnboundedSender<Vec<u8>>,
    request_id: u64,
    permit: Permits,
) {
    let (node, tx) = (node.clone(), tx.clone());
    tokio::spawn(async move {
        let read = tokio::task::spawn_blocking(move || node.read_page(&read)).await;
        let result = read.unwrap_or_else(|e| {
            Err(ErrorReply::new(
                ErrorCode::Internal,
                format!("the read failed: {e}"),
            ))
        });
        send_reply(&tx, request_id, result.map(Message::Page));
        drop(permit);
    });
}

/// Sends a request's outcome: its reply message, or its error.
fn send_reply(
    tx: &mpsc::UnboundedSender<Vec<u8>>,
    request_id: u64,
    result: Result<Message, ErrorReply>,
) {
    let message = result.unwrap_or_else(Message::Error);
    let _ = tx.send(
        Frame {
            request_id,
            message,
        }
        .to_bytes(),
    );
}
