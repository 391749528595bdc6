//! Network faults for tests and benches, in process: a UDP proxy that delays every datagram a
//! server sends back to its clients (so a QUIC peer sees slow acks) and, if asked, every
//! datagram clients send to it too; or drops everything while "cut". The kernel here has no
//! netem; this stands in the path instead.
//!
//! Invariants: datagrams leave in the order they arrived, each direction through one FIFO
//! queue, each held for the delay set when it arrived (so lowering the delay never lets a
//! datagram overtake an earlier one); the proxy's tasks die with it.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::Duration;

use tokio::net::UdpSocket;
use tokio::sync::mpsc;
use tokio::task::{JoinHandle, JoinSet};
use tokio::time::Instant;

/// A delaying UDP proxy in front of one server.
pub struct UdpDelayProxy {
    pub addr: SocketAddr,
    delay_ms: Arc<AtomicU64>,
    cut: Arc<AtomicBool>,
    task: JoinHandle<()>,
}

impl UdpDelayProxy {
    /// Listens on an ephemeral loopback port and forwards to `target`; replies from the target
    /// are delayed by `delay`.
    pub async fn start(target: SocketAddr, delay: Duration) -> std::io::Result<Self> {
        Self::start_with(target, delay, false).await
    }

    /// Like [`start`](Self::start), but datagrams towards `target` are delayed by `delay` too:
    /// a slow link, `delay` each way.
    pub async fn start_both_ways(target: SocketAddr, delay: Duration) -> std::io::Result<Self> {
        Self::start_with(target, delay, true).await
    }

    async fn start_with(
        target: SocketAddr,
        delay: Duration,
        both_ways: bool,
    ) -> std::io::Result<Self> {
        let front = Arc::new(UdpSocket::bind("127.0.0.1:0").await?);
        let addr = front.local_addr()?;
        let delay_ms = Arc::new(AtomicU64::new(delay.as_millis() as u64));
        let cut = Arc::new(AtomicBool::new(false));
        let link = Link {
            target,
            delay_ms: delay_ms.clone(),
            cut: cut.clone(),
            both_ways,
        };
        let task = tokio::spawn(run(front, link));
        Ok(Self {
            addr,
            delay_ms,
            cut,
            task,
        })
    }

    /// The delay of datagrams arriving from now on (each way, if both ways are delayed).
    pub fn set_delay(&self, delay: Duration) {
        self.delay_ms
            .store(delay.as_millis() as u64, Ordering::Relaxed);
    }

    /// Drops every datagram in both directions while `cut` is true.
    pub fn set_cut(&self, cut: bool) {
        self.cut.store(cut, Ordering::Relaxed);
    }
}

impl Drop for UdpDelayProxy {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// What every task of one proxy shares.
#[derive(Clone)]
struct Link {
    target: SocketAddr,
    delay_ms: Arc<AtomicU64>,
    cut: Arc<AtomicBool>,
    /// Whether datagrams towards the target are delayed too.
    both_ways: bool,
}

impl Link {
    fn delay(&self) -> Duration {
        Duration::from_millis(self.delay_ms.load(Ordering::Relaxed))
    }

    fn is_cut(&self) -> bool {
        self.cut.load(Ordering::Relaxed)
    }
}

/// A datagram and when it may leave.
type Delayed = (Instant, Vec<u8>);

/// Client → target: one upstream socket per client, and its queue if that way is delayed.
/// Owns every task it starts (`tasks`): they are aborted when it is.
async fn run(front: Arc<UdpSocket>, link: Link) {
    let mut tasks = JoinSet::new();
    let mut upstreams: HashMap<
        SocketAddr,
        (Arc<UdpSocket>, Option<mpsc::UnboundedSender<Delayed>>),
    > = HashMap::new();
    let mut buf = vec![0u8; 65_536];
    loop {
        let Ok((len, client)) = front.recv_from(&mut buf).await else {
            return;
        };
        if link.is_cut() {
            continue;
        }
        let (upstream, queue) = match upstreams.get(&client) {
            Some(up) => up.clone(),
            None => {
                let Some(up) = connect_upstream(&front, client, &link, &mut tasks).await else {
                    continue;
                };
                upstreams.insert(client, up.clone());
                up
            }
        };
        match queue {
            Some(queue) => {
                let _ = queue.send((Instant::now() + link.delay(), buf[..len].to_vec()));
            }
            None => {
                let _ = upstream.send(&buf[..len]).await;
            }
        }
    }
}

/// A new client's upstream socket, with the tasks that carry its traffic each way.
async fn connect_upstream(
    front: &Arc<UdpSocket>,
    client: SocketAddr,
    link: &Link,
    tasks: &mut JoinSet<()>,
) -> Option<(Arc<UdpSocket>, Option<mpsc::UnboundedSender<Delayed>>)> {
    let up = UdpSocket::bind("127.0.0.1:0").await.ok()?;
    up.connect(link.target).await.ok()?;
    let up = Arc::new(up);
    let (back_tx, back_rx) = mpsc::unbounded_channel();
    tasks.spawn(back(up.clone(), back_tx, link.clone()));
    tasks.spawn(send_in_order(back_rx, front.clone(), Some(client)));
    let queue = link.both_ways.then(|| {
        let (tx, rx) = mpsc::unbounded_channel();
        tasks.spawn(send_in_order(rx, up.clone(), None));
        tx
    });
    Some((up, queue))
}

/// Target → client: each datagram queued with the time it may leave.
async fn back(up: Arc<UdpSocket>, queue: mpsc::UnboundedSender<Delayed>, link: Link) {
    let mut buf = vec![0u8; 65_536];
    loop {
        let Ok(len) = up.recv(&mut buf).await else {
            return;
        };
        if link.is_cut() {
            continue;
        }
        if queue
            .send((Instant::now() + link.delay(), buf[..len].to_vec()))
            .is_err()
        {
            return;
        }
    }
}

/// Sends each queued datagram once its time comes, in order: to `to`, or on a connected
/// socket when `to` is `None`.
async fn send_in_order(
    mut queue: mpsc::UnboundedReceiver<Delayed>,
    socket: Arc<UdpSocket>,
    to: Option<SocketAddr>,
) {
    while let Some((due, datagram)) = queue.recv().await {
        tokio::time::sleep_until(due).await;
        let _ = match to {
            Some(addr) => socket.send_to(&datagram, addr).await,
            None => socket.send(&datagram).await,
        };
    }
}
