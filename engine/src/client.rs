//! A pipelined connection to one storage node: one QUIC connection, one bidirectional stream,
//! many requests in flight, replies matched to requests by request id.
//!
//! Invariants: every request gets exactly one outcome (a reply, an error when the connection
//! is lost, or an error naming the request, the node and the deadline once
//! [`NodeClient::request_timeout`] has passed); replies with request id 0 (the node could not
//! read the request's header) and late replies to requests that timed out are delivered to
//! `unsolicited`, never dropped silently. A request whose deadline passes while its bytes are
//! half written closes the connection: the stream would be out of step with the node.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use anyhow::Context;
use tokio::sync::{mpsc, oneshot};
use wire::frame::decode_len;
use wire::{Append, ErrorReply, Frame, Message, SegmentAck};

type Pending = Arc<Mutex<Option<HashMap<u64, oneshot::Sender<Message>>>>>;

/// How long a request waits for its reply by default: far above any healthy node's latency
/// (a group commit takes milliseconds), far below "forever".
pub const REQUEST_TIMEOUT_DEFAULT: Duration = Duration::from_secs(30);

pub struct NodeClient {
    connection: quinn::Connection,
    send: tokio::sync::Mutex<quinn::SendStream>,
    pending: Pending,
    next_request_id: AtomicU64,
    /// The node's certificate name and address, for error messages.
    server_name: String,
    addr: SocketAddr,
    request_timeout: Duration,
}

impl NodeClient {
    /// Connects to `addr`, expecting the node's certificate to name `server_name`.
    /// Returns the client and a receiver of unsolicited replies (request id 0).
    pub async fn connect(
        endpoint: &quinn::Endpoint,
        addr: SocketAddr,
        server_name: &str,
    ) -> anyhow::Result<(Self, mpsc::UnboundedReceiver<Message>)> {
        let connecting = endpoint
            .connect(addr, server_name)
            .with_context(|| format!("cannot start a connection to {addr}"))?;
        let open = async {
            let connection = connecting
                .await
                .with_context(|| format!("handshake with {server_name} at {addr} failed"))?;
            let stream = connection.open_bi().await.context("cannot open a stream")?;
            anyhow::Ok((connection, stream))
        };
        let (connection, (send, recv)) = tokio::time::timeout(REQUEST_TIMEOUT_DEFAULT, open)
            .await
            .map_err(|_| {
                anyhow::anyhow!(
                    "connecting to node {server_name} at {addr}: no handshake within \
                     {REQUEST_TIMEOUT_DEFAULT:?}"
                )
            })??;
        let pending: Pending = Arc::new(Mutex::new(Some(HashMap::new())));
        let (unsolicited_tx, unsolicited) = mpsc::unbounded_channel();
        tokio::spawn(read_replies(recv, pending.clone(), unsolicited_tx));
        let client = Self {
            connection,
            send: tokio::sync::Mutex::new(send),
            pending,
            next_request_id: AtomicU64::new(1),
            server_name: server_name.to_string(),
            addr,
            request_timeout: REQUEST_TIMEOUT_DEFAULT,
        };
        Ok((client, unsolicited))
    }

    /// The same client with every later request failing after `timeout` without a reply.
    #[must_use]
    pub fn with_request_timeout(mut self, timeout: Duration) -> Self {
        assert!(!timeout.is_zero(), "a request needs some time");
        self.request_timeout = timeout;
        self
    }

    /// How long a request waits for its reply before it fails.
    pub fn request_timeout(&self) -> Duration {
        self.request_timeout
    }

    /// Sends `message` and waits for its reply, at most [`Self::request_timeout`].
    pub async fn request(&self, message: Message) -> anyhow::Result<Message> {
        let request_id = self.next_request_id.fetch_add(1, Ordering::Relaxed);
        let what = message.name();
        let bytes = Frame {
            request_id,
            message,
        }
        .to_bytes();
        self.request_named(what, request_id, &bytes).await
    }

    /// Sends pre-encoded bytes registered under `request_id` (tests use this to send
    /// malformed frames) and waits for the reply with that id, at most
    /// [`Self::request_timeout`].
    pub async fn request_raw(&self, request_id: u64, bytes: &[u8]) -> anyhow::Result<Message> {
        self.request_named("raw", request_id, bytes).await
    }

    async fn request_named(
        &self,
        what: &str,
        request_id: u64,
        bytes: &[u8],
    ) -> anyhow::Result<Message> {
        let deadline = tokio::time::Instant::now() + self.request_timeout;
        let (tx, rx) = oneshot::channel();
        {
            let mut pending = self.pending.lock().expect("pending lock");
            let map = pending
                .as_mut()
                .with_context(|| format!("connection to node {} is closed", self.server_name))?;
            let previous = map.insert(request_id, tx);
            assert!(previous.is_none(), "request ids are unique per connection");
        }
        let outcome = async {
            self.send_until(bytes, deadline).await?;
            match tokio::time::timeout_at(deadline, rx).await {
                Ok(reply) => reply.with_context(|| {
                    format!(
                        "connection to node {} closed before its reply",
                        self.server_name
                    )
                }),
                Err(_) => Err(self.timed_out(what, request_id, "no reply")),
            }
        }
        .await;
        if outcome.is_err() {
            // A late reply then goes to `unsolicited` instead of a waiter nobody polls.
            if let Some(map) = self.pending.lock().expect("pending lock").as_mut() {
                map.remove(&request_id);
            }
        }
        outcome
    }

    /// The error of a request past its deadline, with what QUIC saw of the connection (so a
    /// stall on the wire can be told from a node that never answered).
    fn timed_out(&self, what: &str, request_id: u64, why: &str) -> anyhow::Error {
        let path = self.connection.stats().path;
        anyhow::anyhow!(
            "{what} request {request_id} to node {} at {}: {why} within its deadline of {:?} \
             (connection: rtt {:?}, {} of {} packets lost, congestion window {} bytes, MTU {}, \
             {} black holes)",
            self.server_name,
            self.addr,
            self.request_timeout,
            path.rtt,
            path.lost_packets,
            path.sent_packets,
            path.cwnd,
            path.current_mtu,
            path.black_holes_detected
        )
    }

    /// Writes bytes to the stream without expecting a reply under any id, at most
    /// [`Self::request_timeout`].
    pub async fn send_bytes(&self, bytes: &[u8]) -> anyhow::Result<()> {
        let deadline = tokio::time::Instant::now() + self.request_timeout;
        self.send_until(bytes, deadline).await
    }

    /// Writes `bytes` whole by `deadline`. A write cut short by the deadline leaves the stream
    /// out of step with the node, so it closes the connection (every later request fails
    /// at once instead of waiting for replies that a garbled stream never brings).
    async fn send_until(&self, bytes: &[u8], deadline: tokio::time::Instant) -> anyhow::Result<()> {
        let Ok(mut send) = tokio::time::timeout_at(deadline, self.send.lock()).await else {
            return Err(self.timed_out("send", 0, "the stream was not free to write"));
        };
        match tokio::time::timeout_at(deadline, send.write_all(bytes)).await {
            Ok(written) => {
                written.with_context(|| format!("cannot send to node {}", self.server_name))
            }
            Err(_) => {
                self.connection.close(
                    1u32.into(),
                    b"a request's deadline passed while it was sent",
                );
                Err(self.timed_out("send", 0, "not written whole (flow control?)"))
            }
        }
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
