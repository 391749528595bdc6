//! The node's QUIC server: accepts connections from holders of CA-signed certificates, reads
//! the role from the peer's certificate, reads length-prefixed frames from each bidirectional
//! stream and hands them to the driver; the replies go back on the same stream.
//!
//! Invariants:
//! - a frame's length is checked against `FRAME_BYTES_MAX` before anything is allocated;
//!   an oversized or undersized frame is skipped (read and dropped in small chunks) so the
//!   stream stays in sync, and answered with an error;
//! - every frame gets a reply (from the core, or here if its length prefix was bad), and the
//!   stream, the connection and the node keep serving after a bad one;
//! - at most `STREAM_INFLIGHT_MAX` requests per stream wait for an answer, and at most
//!   `QUEUED_BYTES_MAX` bytes of received frames are held across the whole node: a frame's
//!   share is taken before its bytes are allocated and given back when they are freed (for an
//!   append, once its group is written).

use std::sync::Arc;

use bytes::Bytes;
use tokio::sync::{OwnedSemaphorePermit, Semaphore};
use wire::frame::decode_len;

use crate::driver::{DriverHandle, Stream, framing_error};
use crate::node::Node;

/// Bytes of received frames the node holds at once, across all connections.
pub const QUEUED_BYTES_MAX: usize = 256 << 20;
/// Unit of the byte budget's permits.
const BUDGET_UNIT_BYTES: usize = 1024;
const _: () = assert!(wire::FRAME_BYTES_MAX <= QUEUED_BYTES_MAX / 4);

pub use crate::driver::STREAM_INFLIGHT_MAX;

/// A received frame and its share of the byte budget, released with the bytes.
struct BudgetedFrame {
    bytes: Vec<u8>,
    _share: OwnedSemaphorePermit,
}

impl AsRef<[u8]> for BudgetedFrame {
    fn as_ref(&self) -> &[u8] {
        &self.bytes
    }
}

/// Accepts connections until the endpoint is closed.
pub async fn serve(node: Arc<Node>, endpoint: quinn::Endpoint) {
    let budget = Arc::new(Semaphore::new(QUEUED_BYTES_MAX / BUDGET_UNIT_BYTES));
    while let Some(incoming) = endpoint.accept().await {
        let (driver, budget) = (node.driver().clone(), budget.clone());
        tokio::spawn(async move {
            match incoming.await {
                Ok(connection) => serve_connection(driver, connection, budget).await,
                Err(e) => tracing::info!("handshake refused: {e}"),
            }
        });
    }
}

async fn serve_connection(
    driver: DriverHandle,
    connection: quinn::Connection,
    budget: Arc<Semaphore>,
) {
    let peer = connection.remote_address();
    let role = crate::tls::peer_role(&connection);
    tracing::debug!(
        "connection from {peer}, role {}",
        role.map_or("none", wire::Role::as_str)
    );
    loop {
        match connection.accept_bi().await {
            Ok((send, recv)) => {
                let (stream, replies) = driver.open_stream(role);
                tokio::spawn(serve_stream(stream, replies, send, recv, budget.clone()));
            }
            Err(e) => {
                tracing::debug!("connection from {peer} ended: {e}");
                return;
            }
        }
    }
}

async fn serve_stream(
    stream: Stream,
    mut replies: tokio::sync::mpsc::UnboundedReceiver<Vec<u8>>,
    mut send: quinn::SendStream,
    mut recv: quinn::RecvStream,
    budget: Arc<Semaphore>,
) {
    let writer = tokio::spawn(async move {
        while let Some(frame) = replies.recv().await {
            if send.write_all(&frame).await.is_err() {
                return;
            }
        }
        let _ = send.finish();
    });
    while let Some(()) = read_frame(&stream, &mut recv, &budget).await {}
    stream.finish().await;
    let _ = writer.await;
}

/// Reads one frame and hands it on; `None` once the peer finished or reset the stream.
async fn read_frame(
    stream: &Stream,
    recv: &mut quinn::RecvStream,
    budget: &Arc<Semaphore>,
) -> Option<()> {
    let mut prefix = [0u8; 4];
    recv.read_exact(&mut prefix).await.ok()?;
    let len = match decode_len(prefix) {
        Ok(len) => len,
        Err(e) => {
            stream.reply_now(0, framing_error(&e));
            return skip(recv, u64::from(u32::from_le_bytes(prefix))).await;
        }
    };
    let slot = stream.reserve().await;
    let units = u32::try_from(len.div_ceil(BUDGET_UNIT_BYTES)).expect("bounded by the frame limit");
    let share = budget
        .clone()
        .acquire_many_owned(units)
        .await
        .expect("the budget is never closed");
    let mut bytes = vec![0u8; len];
    recv.read_exact(&mut bytes).await.ok()?;
    let frame = Bytes::from_owner(BudgetedFrame {
        bytes,
        _share: share,
    });
    stream.send(slot, frame);
    Some(())
}

/// Reads and drops `len` bytes in bounded chunks.
async fn skip(recv: &mut quinn::RecvStream, mut len: u64) -> Option<()> {
    let mut chunk = [0u8; 16 * 1024];
    while len > 0 {
        let n = len.min(chunk.len() as u64) as usize;
        recv.read_exact(&mut chunk[..n]).await.ok()?;
        len -= n as u64;
    }
    Some(())
}
