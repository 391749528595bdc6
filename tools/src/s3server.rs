//! A real S3-compatible server in this process, for tests, benchmarks and the restore drill:
//! s3s-fs serves a directory over HTTP on loopback, and every request must carry a valid
//! SigV4 signature made with the one access key it knows.
//!
//! Invariants:
//! - it runs on a tokio runtime of its own, on threads of its own, so a test's runtime, however
//!   busy or blocked, cannot starve it;
//! - nothing waits forever: stopping has a deadline, and starting does no waiting at all (the
//!   socket is bound and listening before `start` returns);
//! - stopped, nothing listens on its port and every connection it had is closed; restarted, it
//!   serves the same directory on the same port;
//! - a PUT into a bucket that does not exist is refused with `NoSuchBucket`, as S3 and MinIO
//!   refuse it (s3s-fs alone would create the bucket's directory), so a misconfigured bucket
//!   fails here as it would in production.
//!
//! Layout on disk: bucket `B`'s object `K` is the file `ROOT/B/K`; s3s-fs keeps its metadata
//! in `ROOT/.bucket-*.json` files beside the buckets.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::mpsc;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use hyper_util::rt::{TokioIo, TokioTimer};
use s3s::access::{S3Access, S3AccessContext};
use s3s::auth::SimpleAuth;
use s3s::dto::{CreateMultipartUploadInput, PutObjectInput};
use s3s::service::{S3Service, S3ServiceBuilder};
use s3s::{S3Request, S3Result, s3_error};
use tokio::sync::oneshot;

/// The bucket `start` creates.
pub const BUCKET: &str = "sixfold";
/// The one access key the server accepts, and its secret.
pub const ACCESS_KEY: &str = "sixfold-test";
pub const SECRET_KEY: &str = "sixfold-test-secret";

/// How long `stop` waits for the server's threads to finish.
const STOP_DEADLINE: Duration = Duration::from_secs(10);
/// How long connections still open at a stop may take to notice before they are dropped.
const DRAIN_DEADLINE: Duration = Duration::from_secs(1);
/// How long `restart` keeps trying to bind the old port while the kernel still holds it.
const REBIND_DEADLINE: Duration = Duration::from_secs(5);
/// The server's runtime: two workers, as many as the reference machine has cores.
const WORKER_THREADS: usize = 2;

/// An S3 server on `127.0.0.1`, serving the directory given to [`S3Server::start`]. Dropping
/// it stops it.
pub struct S3Server {
    root: PathBuf,
    addr: SocketAddr,
    running: Option<Running>,
}

/// A serving server: its accept loop's stop signal and the thread that runs it.
struct Running {
    stop: oneshot::Sender<()>,
    stopped: mpsc::Receiver<()>,
    thread: JoinHandle<()>,
}

impl S3Server {
    /// Serves `root_dir` (created if missing) on an ephemeral port of `127.0.0.1`, with the
    /// bucket [`BUCKET`] created in it if it is not there yet.
    pub fn start(root_dir: &Path) -> anyhow::Result<S3Server> {
        std::fs::create_dir_all(root_dir.join(BUCKET))
            .with_context(|| format!("cannot create {}", root_dir.join(BUCKET).display()))?;
        let root = root_dir.canonicalize()?;
        let listener = std::net::TcpListener::bind("127.0.0.1:0")?;
        let addr = listener.local_addr()?;
        let running = serve(&root, listener)?;
        Ok(S3Server {
            root,
            addr,
            running: Some(running),
        })
    }

    /// `http://127.0.0.1:PORT`, for `[backup] endpoint`.
    pub fn endpoint(&self) -> String {
        format!("http://{}", self.addr)
    }

    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    pub fn bucket(&self) -> &'static str {
        BUCKET
    }

    pub fn access_key(&self) -> &'static str {
        ACCESS_KEY
    }

    pub fn secret_key(&self) -> &'static str {
        SECRET_KEY
    }

    /// The directory served (canonical).
    pub fn root(&self) -> &Path {
        &self.root
    }

    pub fn is_running(&self) -> bool {
        self.running.is_some()
    }

    /// Stops serving: the listener closes and open connections are dropped (a request in
    /// flight gets a reset or an early end of stream). Stopping a stopped server does nothing.
    pub fn stop(&mut self) -> anyhow::Result<()> {
        let Some(running) = self.running.take() else {
            return Ok(());
        };
        // The accept loop may already be gone (a panic); the thread tells either way.
        let _ = running.stop.send(());
        match running.stopped.recv_timeout(STOP_DEADLINE) {
            Ok(()) | Err(mpsc::RecvTimeoutError::Disconnected) => {}
            Err(mpsc::RecvTimeoutError::Timeout) => {
                // Leave the thread behind rather than wait forever.
                bail!(
                    "the S3 server on {} did not stop within {STOP_DEADLINE:?}",
                    self.addr
                );
            }
        }
        if running.thread.join().is_err() {
            bail!("the S3 server on {} panicked", self.addr);
        }
        Ok(())
    }

    /// Stops the server if it runs, then serves the same directory on the same port again.
    pub fn restart(&mut self) -> anyhow::Result<()> {
        self.stop()?;
        let deadline = Instant::now() + REBIND_DEADLINE;
        let listener = loop {
            match std::net::TcpListener::bind(self.addr) {
                Ok(listener) => break listener,
                Err(e)
                    if e.kind() == std::io::ErrorKind::AddrInUse && Instant::now() < deadline =>
                {
                    std::thread::sleep(Duration::from_millis(20));
                }
                Err(e) => {
                    return Err(e).with_context(|| format!("cannot bind {} again", self.addr));
                }
            }
        };
        self.running = Some(serve(&self.root, listener)?);
        Ok(())
    }
}

impl Drop for S3Server {
    fn drop(&mut self) {
        if let Err(e) = self.stop() {
            eprintln!("{e:#}");
        }
    }
}

/// Starts serving `root` on `listener` from a runtime on a thread of its own.
fn serve(root: &Path, listener: std::net::TcpListener) -> anyhow::Result<Running> {
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(WORKER_THREADS)
        .thread_name("s3server")
        .enable_all()
        .build()?;
    listener.set_nonblocking(true)?;
    let listener = {
        let _entered = runtime.enter();
        tokio::net::TcpListener::from_std(listener)?
    };
    let service = service(root)?;
    let (stop, stop_rx) = oneshot::channel();
    let (stopped_tx, stopped) = mpsc::channel();
    let thread = std::thread::Builder::new()
        .name("s3server-accept".into())
        .spawn(move || {
            runtime.block_on(accept_loop(listener, service, stop_rx));
            // Dropping the runtime drops every connection task, closing its socket.
            runtime.shutdown_timeout(DRAIN_DEADLINE);
            let _ = stopped_tx.send(());
        })?;
    Ok(Running {
        stop,
        stopped,
        thread,
    })
}

/// s3s-fs over `root`, with SigV4 required and puts into missing buckets refused.
fn service(root: &Path) -> anyhow::Result<S3Service> {
    let fs = s3s_fs::FileSystem::new(root)
        .map_err(|e| anyhow::anyhow!("s3s-fs cannot serve {}: {e:?}", root.display()))?;
    let mut builder = S3ServiceBuilder::new(fs);
    builder.set_auth(SimpleAuth::from_single(ACCESS_KEY, SECRET_KEY));
    builder.set_access(StrictAccess {
        root: root.to_path_buf(),
    });
    Ok(builder.build())
}

/// Accepts connections until `stop` fires (or its sender is dropped), each served on a task.
async fn accept_loop(
    listener: tokio::net::TcpListener,
    service: S3Service,
    mut stop: oneshot::Receiver<()>,
) {
    loop {
        let stream = tokio::select! {
            _ = &mut stop => return,
            accepted = listener.accept() => match accepted {
                Ok((stream, _)) => stream,
                Err(_) => {
                    // Out of descriptors, or a connection reset before it was accepted: wait
                    // a moment rather than spin.
                    tokio::time::sleep(Duration::from_millis(10)).await;
                    continue;
                }
            },
        };
        let service = service.clone();
        tokio::spawn(async move {
            let _ = hyper::server::conn::http1::Builder::new()
                .timer(TokioTimer::new())
                .serve_connection(TokioIo::new(stream), service)
                .await;
        });
    }
}

/// Requests must be signed (what s3s does when no access policy is set), and PUTs go only
/// into buckets that exist.
struct StrictAccess {
    root: PathBuf,
}

impl StrictAccess {
    fn bucket_exists(&self, bucket: &str) -> S3Result<()> {
        // s3s has validated the bucket name (no '/', no "..") before any access check.
        if self.root.join(bucket).is_dir() {
            Ok(())
        } else {
            Err(s3_error!(NoSuchBucket))
        }
    }
}

#[async_trait::async_trait]
impl S3Access for StrictAccess {
    async fn check(&self, cx: &mut S3AccessContext<'_>) -> S3Result<()> {
        match cx.credentials() {
            Some(_) => Ok(()),
            None => Err(s3_error!(AccessDenied, "Signature is required")),
        }
    }

    async fn put_object(&self, req: &mut S3Request<PutObjectInput>) -> S3Result<()> {
        self.bucket_exists(&req.input.bucket)
    }

    async fn create_multipart_upload(
        &self,
        req: &mut S3Request<CreateMultipartUploadInput>,
    ) -> S3Result<()> {
        self.bucket_exists(&req.input.bucket)
    }
}
