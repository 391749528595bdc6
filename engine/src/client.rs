//! A pipelined connection to one storage node: one QUIC connection, one bidirectional stream,
//! many requests in flight, replies matched to requests by request id.
//!
//! Invariants: every request gets exactly one outcome (a reply, or an error when the
//! connection is lost); replies with request id 0 (the node could not read the request's
//! header) are delivered to `unsolicited`, never dropped silently.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use anyhow::Context;
use tokio::sync::{mpsc, oneshot};
use wire::frame::decode_len;
use wire::{Append, ErrorReply, Frame, Message, SegmentAck};

type Pending = Arc<Mutex<Option<HashMap<u64, oneshot::Sender<Message>>>>>;

pub struct NodeClient {
    connection: quinn::Connection,
    send: tokio::sync::Mutex<quinn::SendStream>,
    pending: Pending,
    next_request_id: AtomicU64,
}

impl NodeClient {
    /// Connects to `addr`, expecting the node's certificate to name `server_name`.
    /// Returns the client and a receiver of unsolicited replies (request id 0).
    pub async fn connect(
        endpoint: &quinn::Endpoint,
        addr: SocketAddr,
        server_name: &str,
    ) -> anyhow::Result<(Self, mpsc::UnboundedReceiver<Message>)> {
        let connection = endpoint
            .connect(addr, server_name)
            .with_context(|| format!("cannot start a connection to {addr}"))?
            .await
            .with_context(|| format!("handshake with {server_name} at {addr} failed"))?;
        let (send, recv) = connection.open_bi().await.context("cannot open a stream")?;
        let pending: Pending = Arc::new(Mutex::new(Some(HashMap::new())));
        let (unsolicited_tx, unsolicited) = mpsc::unbounded_channel();
        tokio::spawn(read_replies(recv, pending.clone(), unsolicited_tx));
        let client = Self {
            connection,
            send: tokio::sync::Mutex::new(send),
            pending,
            next_request_id: AtomicU64::new(1),
        };
        Ok((client, unsolicited))
    }

    /// Sends `message` and waits for its reply.
    pub async fn request(&self, message: Message) -> anyhow::Result<Message> {
        let request_id = self.next_request_id.fetch_add(1, Ordering::Relaxed);
        let bytes = Frame {
            request_id,
            message,
        }
        .to_bytes();
        self.request_raw(request_id, &bytes).await
    }

    /// Sends pre-encoded bytes registered under `request_id` (tests use this to send
    /// malformed frames) and waits for the reply with that id.
    pub async fn request_raw(&self, request_id: u64, bytes: &[u8]) -> anyhow::Result<Message> {
        let (tx, rx) = oneshot::channel();
        {
            let mut pending = self.pending.lock().expect("pending lock");
            let map = pending
                .as_mut()
                .context("connection to the node is closed")?;
            map.insert(request_id, tx);
        }
        self.send_bytes(bytes).await?;
        rx.await
            .context("connection to the node closed before its reply")
    }

    /// Writes bytes to the stream without expecting a reply under any id.
    pub async fn send_bytes(&self, bytes: &[u8]) -> anyhow::Result<()> {
        let mut send = self.send.lock().await;
        send.write_all(bytes)
            .await
            .context("cannot send to the node")
    }

    /// Appends a batch; the outer error is a transport failure, the inner one the node's
    /// typed refusal.
    pub async fn append(&self, append: Append) -> anyhow::Result<Result<SegmentAck, ErrorReply>> {
        match self.request(Message::Append(append)).await? {
            Message::Ack(ack) => Ok(Ok(ack)),
            Message::Error(error) => Ok(Err(error)),
            other => anyhow::bail!("unexpected reply to an append: {other:?}"),
        }
    }

    /// Whether the connection is gone (closed by either side, or timed out).
    pub fn is_closed(&self) -> bool {
        self.connection.close_reason().is_some()
            || self.pending.lock().expect("pending lock").is_none()
    }

    pub fn close(&self) {
        self.connection.close(0u32.into(), b"done");
    }
}

async fn read_replies(
    mut recv: quinn::RecvStream,
    pending: Pending,
    unsolicited: mpsc::UnboundedSender<Message>,
) {
    loop {
        let mut prefix = [0u8; 4];
        if recv.read_exact(&mut prefix).await.is_err() {
            break;
        }
        let Ok(len) = decode_len(prefix) else { break };
        let mut bytes = vec![0u8; len];
        if recv.read_exact(&mut bytes).await.is_err() {
            break;
        }
        let Ok(frame) = Frame::decode_after_len(&bytes) else {
            break;
        };
        let waiter = pending
            .lock()
            .expect("pending lock")
            .as_mut()
            .and_then(|map| map.remove(&frame.request_id));
        match waiter {
            Some(waiter) => {
                let _ = waiter.send(frame.message);
            }
            None => {
                let _ = unsolicited.send(frame.message);
            }
        }
    }
    // Fail every request still waiting: dropping their senders wakes them with an error.
    pending.lock().expect("pending lock").take();
}
