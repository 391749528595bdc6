//! Network faults for tests, in process: a UDP proxy that delays every datagram a server sends
//! back to its clients (so a QUIC peer sees slow acks), or drops everything while "cut".
//! The kernel here has no netem; this stands in the path instead.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::Duration;

use tokio::net::UdpSocket;
use tokio::task::JoinHandle;

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
        let front = Arc::new(UdpSocket::bind("127.0.0.1:0").await?);
        let addr = front.local_addr()?;
        let delay_ms = Arc::new(AtomicU64::new(delay.as_millis() as u64));
        let cut = Arc::new(AtomicBool::new(false));
        let task = tokio::spawn(run(front, target, delay_ms.clone(), cut.clone()));
        Ok(Self {
            addr,
            delay_ms,
            cut,
            task,
        })
    }

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

async fn run(
    front: Arc<UdpSocket>,
    target: SocketAddr,
    delay_ms: Arc<AtomicU64>,
    cut: Arc<AtomicBool>,
) {
    let mut upstreams: HashMap<SocketAddr, Arc<UdpSocket>> = HashMap::new();
    let mut buf = vec![0u8; 65_536];
    loop {
        let Ok((len, client)) = front.recv_from(&mut buf).await else {
            return;
        };
        if cut.load(Ordering::Relaxed) {
            continue;
        }
        let upstream = match upstreams.get(&client) {
            Some(up) => up.clone(),
            None => {
                let Ok(up) = UdpSocket::bind("127.0.0.1:0").await else {
                    continue;
                };
                if up.connect(target).await.is_err() {
                    continue;
                }
                let up = Arc::new(up);
                upstreams.insert(client, up.clone());
                tokio::spawn(back(
                    up.clone(),
                    front.clone(),
                    client,
                    delay_ms.clone(),
                    cut.clone(),
                ));
                up
            }
        };
        let _ = upstream.send(&buf[..len]).await;
    }
}

/// Target → client, each datagram held for the current delay.
async fn back(
    up: Arc<UdpSocket>,
    front: Arc<UdpSocket>,
    client: SocketAddr,
    delay_ms: Arc<AtomicU64>,
    cut: Arc<AtomicBool>,
) {
    let mut buf = vec![0u8; 65_536];
    loop {
        let Ok(len) = up.recv(&mut buf).await else {
            return;
        };
        if cut.load(Ordering::Relaxed) {
            continue;
        }
        let datagram = buf[..len].to_vec();
        let delay = Duration::from_millis(delay_ms.load(Ordering::Relaxed));
        let front = front.clone();
        tokio::spawn(async move {
            tokio::time::sleep(delay).await;
            let _ = front.send_to(&datagram, client).await;
        });
    }
}
