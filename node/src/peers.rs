//! The node's QUIC client to its peers, for gossip: it carries out the core's
//! [`crate::core::NodeOutput::PeerRequest`]s and hands back every outcome. The node presents
//! its own certificate (role `node`), and trusts only peers whose certificate the cluster CA
//! signed for the name the placement gives.
//!
//! One task per peer node owns that peer's connection; each request goes on a stream of its
//! own (one frame out, one frame back), so a slow or lost request never holds up another.
//!
//! Invariants:
//! - every request gets exactly one outcome (its reply, or why there is none) within
//!   [`PEER_REQUEST_TIMEOUT`], whatever the peer does; the core keeps its own, shorter,
//!   deadlines too;
//! - a reply frame's length is checked against `FRAME_BYTES_MAX` before anything is allocated;
//! - a peer that cannot be reached is retried with a backoff (from [`RECONNECT_MIN`] doubling
//!   to [`RECONNECT_MAX`]); meanwhile its requests fail at once, so nothing queues behind it;
//! - nothing here runs on the foreground path: requests are handed over through a channel and
//!   outcomes come back through the driver's input channel.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;
use rustls::pki_types::PrivateKeyDer;
use rustls::pki_types::pem::PemObject;
use tokio::sync::mpsc;
use wire::frame::decode_len;
use wire::{Frame, Message, PeerNode};

/// Longest a peer request may take, connecting included.
pub const PEER_REQUEST_TIMEOUT: Duration = Duration::from_secs(10);
/// Longest a connection attempt may take.
pub const CONNECT_TIMEOUT: Duration = Duration::from_secs(2);
/// First wait before reconnecting to a peer that could not be reached.
pub const RECONNECT_MIN: Duration = Duration::from_millis(100);
/// Longest wait before reconnecting.
pub const RECONNECT_MAX: Duration = Duration::from_secs(5);
/// Requests waiting for one peer's task (the core keeps far fewer in flight).
const PEER_QUEUE_MAX: usize = 1024;

/// A request's outcome: the reply, or why there is none.
pub type Outcome = Result<Message, String>;

/// Where outcomes go: `(peer, request_id, outcome)`.
pub type OutcomeSink = Arc<dyn Fn(PeerNode, u64, Outcome) + Send + Sync>;

/// The client side of gossip. See the module docs.
pub struct Peers {
    endpoint: quinn::Endpoint,
    tasks: HashMap<PeerNode, mpsc::Sender<(u64, Message)>>,
    sink: OutcomeSink,
}

impl Peers {
    /// A client endpoint presenting the node's certificate, bound on the same address family
    /// as `listen`.
    pub fn new(
        listen: SocketAddr,
        (ca, cert, key): (&Path, &Path, &Path),
        sink: OutcomeSink,
    ) -> anyhow::Result<Self> {
        let config = client_config(ca, cert, key)?;
        let bind: SocketAddr = if listen.is_ipv6() {
            "[::]:0".parse().expect("valid address")
        } else {
            "0.0.0.0:0".parse().expect("valid address")
        };
        let mut endpoint =
            quinn::Endpoint::client(bind).context("cannot bind a UDP socket for gossip")?;
        endpoint.set_default_client_config(config);
        Ok(Self {
            endpoint,
            tasks: HashMap::new(),
            sink,
        })
    }

    /// Sends `message` to `peer`; its outcome goes to the sink, always.
    pub fn send(&mut self, peer: PeerNode, request_id: u64, message: Message) {
        let endpoint = self.endpoint.clone();
        let sink = self.sink.clone();
        let tx = self.tasks.entry(peer.clone()).or_insert_with(|| {
            let (tx, rx) = mpsc::channel(PEER_QUEUE_MAX);
            tokio::spawn(peer_task(endpoint, peer.clone(), rx, sink));
            tx
        });
        if let Err(e) = tx.try_send((request_id, message)) {
            let why = format!("too many requests waiting for peer {}: {e}", peer.name);
            (self.sink)(peer, request_id, Err(why));
        }
    }

    /// Closes every connection (the node is stopping).
    pub fn close(&self) {
        self.endpoint.close(0u32.into(), b"node stopping");
    }
}

/// A QUIC client configuration presenting the node's certificate, trusting only the CA.
fn client_config(ca: &Path, cert: &Path, key: &Path) -> anyhow::Result<quinn::ClientConfig> {
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let key = PrivateKeyDer::from_pem_file(key)
        .with_context(|| format!("cannot read a private key from {}", key.display()))?;
    let mut tls = rustls::ClientConfig::builder_with_provider(provider)
        .with_protocol_versions(&[&rustls::version::TLS13])
        .context("TLS 1.3 unavailable")?
        .with_root_certificates(crate::tls::roots(ca)?)
        .with_client_auth_cert(crate::tls::load_certs(cert)?, key)
        .with_context(|| format!("the node's key does not match {}", cert.display()))?;
    tls.alpn_protocols = vec![wire::ALPN.to_vec()];
    let quic = quinn::crypto::rustls::QuicClientConfig::try_from(tls)
        .context("TLS configuration unusable for QUIC")?;
    let mut config = quinn::ClientConfig::new(Arc::new(quic));
    let mut transport = quinn::TransportConfig::default();
    // A peer that stops answering is noticed within seconds, and reconnected to.
    transport.keep_alive_interval(Some(Duration::from_secs(1)));
    transport.max_idle_timeout(Some(
        quinn::IdleTimeout::try_from(Duration::from_secs(5)).expect("small timeout"),
    ));
    let mut mtu = quinn::MtuDiscoveryConfig::default();
    mtu.upper_bound(wire::JUMBO_UDP_PAYLOAD_BYTES);
    transport.mtu_discovery_config(Some(mtu));
    config.transport_config(Arc::new(transport));
    Ok(config)
}

/// One peer's connection, with reconnect backoff.
struct Link {
    endpoint: quinn::Endpoint,
    peer: PeerNode,
    connection: Option<quinn::Connection>,
    retry_at: tokio::time::Instant,
    backoff: Duration,
}

impl Link {
    /// The live connection, connecting if the backoff allows.
    async fn connection(&mut self) -> Result<quinn::Connection, String> {
        if let Some(c) = &self.connection
            && c.close_reason().is_none()
        {
            return Ok(c.clone());
        }
        self.connection = None;
        let now = tokio::time::Instant::now();
        if now < self.retry_at {
            let wait = self.retry_at - now;
            return Err(format!(
                "peer {} unreachable; next attempt in {} ms",
                self.peer.name,
                wait.as_millis()
            ));
        }
        match tokio::time::timeout(CONNECT_TIMEOUT, self.connect()).await {
            Ok(Ok(connection)) => {
                tracing::debug!(
                    "gossip connected to {} at {}",
                    self.peer.name,
                    self.peer.address
                );
                self.backoff = RECONNECT_MIN;
                self.connection = Some(connection.clone());
                Ok(connection)
            }
            outcome => {
                let why = match outcome {
                    Ok(Err(e)) => format!("{e:#}"),
                    _ => format!("no handshake within {} ms", CONNECT_TIMEOUT.as_millis()),
                };
                self.retry_at = tokio::time::Instant::now() + self.backoff;
                self.backoff = (self.backoff * 2).min(RECONNECT_MAX);
                Err(format!("cannot reach peer {}: {why}", self.peer.name))
            }
        }
    }

    async fn connect(&self) -> anyhow::Result<quinn::Connection> {
        let connecting = self
            .endpoint
            .connect(self.peer.address, &self.peer.name)
            .with_context(|| format!("cannot start a connection to {}", self.peer.address))?;
        connecting.await.with_context(|| {
            format!(
                "handshake with {} at {} failed",
                self.peer.name, self.peer.address
            )
        })
    }
}

/// Carries out one peer's requests, one stream each, until the node drops its sender.
async fn peer_task(
    endpoint: quinn::Endpoint,
    peer: PeerNode,
    mut requests: mpsc::Receiver<(u64, Message)>,
    sink: OutcomeSink,
) {
    let mut link = Link {
        endpoint,
        peer: peer.clone(),
        connection: None,
        retry_at: tokio::time::Instant::now(),
        backoff: RECONNECT_MIN,
    };
    while let Some((request_id, message)) = requests.recv().await {
        let connection = match link.connection().await {
            Ok(connection) => connection,
            Err(why) => {
                sink(peer.clone(), request_id, Err(why));
                continue;
            }
        };
        let (peer, sink) = (peer.clone(), sink.clone());
        tokio::spawn(async move {
            let exchange = exchange(&connection, request_id, message);
            let outcome = match tokio::time::timeout(PEER_REQUEST_TIMEOUT, exchange).await {
                Ok(outcome) => outcome,
                Err(_) => Err(format!(
                    "no reply within {} s",
                    PEER_REQUEST_TIMEOUT.as_secs()
                )),
            };
            sink(peer, request_id, outcome);
        });
    }
}

/// One request on a stream of its own: the frame out, one frame back.
async fn exchange(connection: &quinn::Connection, request_id: u64, message: Message) -> Outcome {
    let (mut send, mut recv) = connection
        .open_bi()
        .await
        .map_err(|e| format!("cannot open a stream: {e}"))?;
    let bytes = Frame {
        request_id,
        message,
    }
    .to_bytes();
    send.write_all(&bytes)
        .await
        .map_err(|e| format!("cannot send the request: {e}"))?;
    let _ = send.finish();
    let mut prefix = [0u8; 4];
    recv.read_exact(&mut prefix)
        .await
        .map_err(|e| format!("no reply: {e}"))?;
    let len = decode_len(prefix).map_err(|e| format!("bad reply: {e}"))?;
    let mut rest = vec![0u8; len];
    recv.read_exact(&mut rest)
        .await
        .map_err(|e| format!("reply cut short: {e}"))?;
    let frame = Frame::decode_after_len(&rest).map_err(|e| format!("bad reply: {e}"))?;
    if frame.request_id != request_id {
        return Err(format!(
            "reply for request {} on the stream of request {request_id}",
            frame.request_id
        ));
    }
    Ok(frame.message)
}
