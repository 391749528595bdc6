//! Running storage nodes as real processes, for tests, benchmarks and local clusters: write a
//! config, start `sixfold-node`, wait for its readiness line, stop it with SIGTERM or kill -9,
//! and supervise nodes (restart them with backoff when they die).
//!
//! Invariants: no wait here is unbounded — readiness within `READY_TIMEOUT`, a stop within
//! `STOP_GRACE` after SIGTERM and then SIGKILL, a reap within `REAP_TIMEOUT` after SIGKILL;
//! a node process never outlives the thread that spawned it (PR_SET_PDEATHSIG); every node
//! process is killed when its handle is dropped.

use std::io::{BufRead, BufReader};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::mpsc::{Receiver, RecvTimeoutError, TryRecvError};
use std::time::{Duration, Instant};

use anyhow::Context;

/// Finds a workspace binary: `$SIXFOLD_BIN_DIR`, then beside the running executable, then
/// one directory up (test executables live in `target/<profile>/deps`).
pub fn find_binary(name: &str) -> anyhow::Result<PathBuf> {
    let mut candidates = Vec::new();
    if let Some(dir) = std::env::var_os("SIXFOLD_BIN_DIR") {
        candidates.push(PathBuf::from(dir).join(name));
    }
    if let Ok(exe) = std::env::current_exe()
        && let Some(dir) = exe.parent()
    {
        candidates.push(dir.join(name));
        if let Some(up) = dir.parent() {
            candidates.push(up.join(name));
        }
    }
    candidates.into_iter().find(|p| p.is_file()).with_context(|| {
        format!("cannot find the {name} binary; build it with `cargo build --bins` or set SIXFOLD_BIN_DIR")
    })
}

/// What a test or benchmark node looks like.
#[derive(Clone, Debug)]
pub struct NodeSpec {
    pub name: String,
    pub listen: SocketAddr,
    pub az: String,
    pub data_dir: PathBuf,
    pub certs_dir: PathBuf,
    pub journal_file_bytes: u64,
    pub journal_file_count: u32,
    pub inflight_groups_max: usize,
    pub sync: node::config::SyncMode,
    pub persister: node::config::PersisterMode,
    /// (volume, pg, segment) triples.
    pub segments: Vec<(u64, u32, u32)>,
    /// `metrics_listen` (port 0: any free port; [`NodeProcess::metrics_addr`] finds it).
    pub metrics_listen: Option<SocketAddr>,
    /// `[background] paused`: no coalescing nor GC (benchmarks only; the journal fills).
    pub background_paused: bool,
    /// `[scrub] interval_ms` (`None`: the node's default).
    pub scrub_interval_ms: Option<u64>,
    /// `[backpressure]` (written only when it differs from the node's defaults).
    pub backpressure: node::config::BackpressureSettings,
    /// `[backup]` (written only when its `url` is set).
    pub backup: node::config::BackupSettings,
}

/// The `[backup]` table of `b` (empty when backup is off).
fn backup_toml(b: &node::config::BackupSettings) -> String {
    let Some(url) = &b.url else {
        return String::new();
    };
    let text = |key: &str, value: &Option<String>| {
        value
            .as_ref()
            .map(|v| format!("{key} = \"{v}\"\n"))
            .unwrap_or_default()
    };
    format!(
        "\n[backup]\nurl = \"{url}\"\n{}{}{}region = \"{}\"\npath_style = {}\n\
         allow_http = {}\nlog_bytes = {}\nlog_interval_ms = {}\nsnapshot_interval_s = {}\n\
         lag_bytes_max = {}\nrequest_timeout_ms = {}\n",
        text("endpoint", &b.endpoint),
        text("access_key_id", &b.access_key_id),
        text("secret_access_key", &b.secret_access_key),
        b.region,
        b.path_style,
        b.allow_http,
        b.log_bytes,
        b.log_interval_ms,
        b.snapshot_interval_s,
        b.lag_bytes_max,
        b.request_timeout_ms,
    )
}

impl NodeSpec {
    /// A node on an ephemeral loopback port with small journal files.
    pub fn local(name: &str, data_dir: &Path, certs_dir: &Path) -> Self {
        Self {
            name: name.to_string(),
            listen: "127.0.0.1:0".parse().expect("valid address"),
            az: "az1".into(),
            data_dir: data_dir.to_path_buf(),
            certs_dir: certs_dir.to_path_buf(),
            journal_file_bytes: 16 << 20,
            journal_file_count: 4,
            inflight_groups_max: 4,
            sync: node::config::SyncMode::RwfDsync,
            persister: node::config::PersisterMode::Inline,
            segments: vec![(1, 0, 0)],
            metrics_listen: None,
            background_paused: false,
            scrub_interval_ms: None,
            backpressure: node::config::BackpressureSettings::default(),
            backup: node::config::BackupSettings::default(),
        }
    }

    /// The spec a node config file describes (the inverse of [`to_toml`](Self::to_toml)).
    pub fn from_config(config: &node::NodeConfig) -> Self {
        Self {
            name: config.name.clone(),
            listen: config.listen,
            az: config.az.clone(),
            data_dir: config.data_dir.clone(),
            certs_dir: config
                .tls
                .ca
                .parent()
                .unwrap_or(Path::new("."))
                .to_path_buf(),
            journal_file_bytes: config.journal.file_bytes,
            journal_file_count: config.journal.file_count,
            inflight_groups_max: config.journal.inflight_groups_max,
            sync: config.journal.sync,
            persister: config.journal.persister,
            segments: config
                .segments
                .iter()
                .map(|s| (s.volume.0, s.pg.0, s.segment.0))
                .collect(),
            metrics_listen: config.metrics_listen,
            background_paused: config.background.paused,
            scrub_interval_ms: Some(config.scrub.interval_ms),
            backpressure: config.backpressure.clone(),
            backup: config.backup.clone(),
        }
    }

    pub fn to_toml(&self) -> String {
        let mut s = format!(
            "name = \"{}\"\nlisten = \"{}\"\naz = \"{}\"\ndata_dir = \"{}\"\n{}\n[tls]\n\
             ca = \"{}\"\ncert = \"{}\"\nkey = \"{}\"\n\n[journal]\nfile_bytes = {}\n\
             file_count = {}\ninflight_groups_max = {}\nsync = \"{}\"\npersister = \"{}\"\n",
            self.name,
            self.listen,
            self.az,
            self.data_dir.display(),
            self.metrics_listen
                .map(|a| format!("metrics_listen = \"{a}\"\n"))
                .unwrap_or_default(),
            self.certs_dir.join("ca.pem").display(),
            self.certs_dir.join(format!("{}.pem", self.name)).display(),
            self.certs_dir
                .join(format!("{}.key.pem", self.name))
                .display(),
            self.journal_file_bytes,
            self.journal_file_count,
            self.inflight_groups_max,
            self.sync.as_str(),
            self.persister.as_str(),
        );
        if self.background_paused {
            s.push_str("\n[background]\npaused = true\n");
        }
        if let Some(ms) = self.scrub_interval_ms {
            s.push_str(&format!("\n[scrub]\ninterval_ms = {ms}\n"));
        }
        let b = &self.backpressure;
        if *b != node::config::BackpressureSettings::default() {
            s.push_str(&format!(
                "\n[backpressure]\njournal_percent = {}\nbacklog_records = {}\n\
                 ack_delay_min_ms = {}\nack_delay_max_ms = {}\n",
                b.journal_percent, b.backlog_records, b.ack_delay_min_ms, b.ack_delay_max_ms
            ));
        }
        s.push_str(&backup_toml(&self.backup));
        for (volume, pg, segment) in &self.segments {
            s.push_str(&format!(
                "\n[[segment]]\nvolume = {volume}\npg = {pg}\nsegment = {segment}\n"
            ));
        }
        s
    }

    /// Writes `node.toml` into the data directory's parent-free location `<data_dir>.toml`.
    pub fn write_config(&self) -> anyhow::Result<PathBuf> {
        let path = self.data_dir.with_extension("toml");
        if let Some(parent) = path.parent() {
            std::fs::create_dir_all(parent)?;
        }
        std::fs::write(&path, self.to_toml())?;
        Ok(path)
    }
}

/// How long a node may take from spawn to its readiness line (creating and pre-writing the
/// journal on a slow, shared disk dominates).
pub const READY_TIMEOUT: Duration = Duration::from_secs(120);
/// How long stopping waits for nodes to exit after SIGTERM before it SIGKILLs them.
pub const STOP_GRACE: Duration = Duration::from_secs(20);
/// How long to wait for a SIGKILLed process to be reaped before giving up on it.
const REAP_TIMEOUT: Duration = Duration::from_secs(10);

/// Waits until `child` exits or `deadline` passes, reaping it if it exited.
fn wait_until(child: &mut Child, deadline: Instant) -> Option<ExitStatus> {
    loop {
        match child.try_wait() {
            Ok(Some(status)) => return Some(status),
            Ok(None) if Instant::now() < deadline => std::thread::sleep(Duration::from_millis(10)),
            // Not exited by the deadline, or cannot be waited on at all.
            Ok(None) | Err(_) => return None,
        }
    }
}

/// SIGKILL, then reap within `REAP_TIMEOUT`.
fn kill_and_reap(child: &mut Child) -> Option<ExitStatus> {
    let _ = child.kill();
    wait_until(child, Instant::now() + REAP_TIMEOUT)
}

/// How a node ended when it was stopped.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum StopOutcome {
    /// It exited by itself within the grace period after SIGTERM (or had exited already).
    Exited(ExitStatus),
    /// It was still running when the grace period ended and was SIGKILLed (`None`: not even
    /// reaped within `REAP_TIMEOUT` after that).
    Killed(Option<ExitStatus>),
}

impl StopOutcome {
    /// Exited with status 0 when asked to.
    pub fn is_clean(&self) -> bool {
        matches!(self, StopOutcome::Exited(status) if status.success())
    }
}

impl std::fmt::Display for StopOutcome {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            StopOutcome::Exited(status) => write!(f, "exited with {status}"),
            StopOutcome::Killed(Some(_)) => write!(f, "ignored SIGTERM for too long; SIGKILLed"),
            StopOutcome::Killed(None) => write!(f, "SIGKILLed but not reaped"),
        }
    }
}

/// Stops processes together: SIGTERM to all, then one shared deadline `grace` away for all
/// of them to exit, then SIGKILL for whoever is left. Never waits past `grace + REAP_TIMEOUT`.
fn stop_children(children: &mut [&mut Child], grace: Duration) -> Vec<StopOutcome> {
    for child in children.iter_mut() {
        if let Ok(pid) = i32::try_from(child.id()) {
            // SAFETY: plain syscall on a child process we own and have not reaped (a child
            // that exited already is a zombie until reaped, so the pid is still ours).
            unsafe { libc::kill(pid, libc::SIGTERM) };
        }
    }
    let deadline = Instant::now() + grace;
    children
        .iter_mut()
        .map(|child| match wait_until(child, deadline) {
            Some(status) => StopOutcome::Exited(status),
            None => StopOutcome::Killed(kill_and_reap(child)),
        })
        .collect()
}

/// The last lines of a node's log, joined, for error messages.
fn log_tail(log: &Path) -> String {
    let text = std::fs::read_to_string(log).unwrap_or_default();
    let mut tail: Vec<&str> = text.lines().rev().take(5).collect();
    tail.reverse();
    tail.join(" | ")
}

/// A `sixfold-node` spawned but not yet serving (no readiness line yet). Dropping it kills
/// the process.
pub struct StartingNode {
    /// Always `Some` until the value is consumed.
    child: Option<Child>,
    /// The node's first stdout line (`None`: stdout closed without one).
    ready: Receiver<Option<String>>,
    deadline: Instant,
    config: PathBuf,
    log: PathBuf,
}

/// Where a starting node is.
pub enum Startup {
    Pending(StartingNode),
    Ready(NodeProcess),
    /// It exited, or did not become ready in time and was killed; either way it is reaped.
    Failed(anyhow::Error),
}

impl StartingNode {
    /// Spawns `sixfold-node --config CONFIG`, stderr appended to `CONFIG` with extension
    /// `.log`. Returns at once; readiness is [`poll`](Self::poll)ed or
    /// [`wait_ready`](Self::wait_ready)ed, within `READY_TIMEOUT`.
    ///
    /// The node gets SIGTERM when the *thread* that spawned it exits (PR_SET_PDEATHSIG follows
    /// the thread), so spawn only from threads that live as long as the nodes should: the
    /// main thread or a runtime worker, never a `spawn_blocking` thread.
    pub fn spawn(config: &Path) -> anyhow::Result<Self> {
        let binary = find_binary("sixfold-node")?;
        let log = config.with_extension("log");
        let log_file = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&log)?;
        let mut command = Command::new(&binary);
        // SAFETY: prctl is async-signal-safe and touches no memory of the parent.
        unsafe {
            use std::os::unix::process::CommandExt;
            // The node dies with whoever started it: tests and `sixfold dev` never leave
            // a node behind, even when they are killed themselves.
            command.pre_exec(|| {
                libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGTERM);
                Ok(())
            });
        }
        let mut child = command
            .arg("--config")
            .arg(config)
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::from(log_file))
            .spawn()
            .with_context(|| format!("cannot start {}", binary.display()))?;
        let stdout = child.stdout.take().expect("piped stdout");
        let (tx, ready) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            let mut lines = BufReader::new(stdout).lines();
            let _ = tx.send(lines.next().and_then(Result::ok));
            for _ in lines {} // Keep draining so the node never blocks on stdout.
        });
        Ok(Self {
            child: Some(child),
            ready,
            deadline: Instant::now() + READY_TIMEOUT,
            config: config.to_path_buf(),
            log,
        })
    }

    pub fn pid(&self) -> u32 {
        self.child.as_ref().map_or(0, Child::id)
    }

    /// Checks for readiness without blocking.
    pub fn poll(self) -> Startup {
        match self.ready.try_recv() {
            Ok(line) => self.finish(line),
            Err(TryRecvError::Empty) if Instant::now() < self.deadline => Startup::Pending(self),
            Err(TryRecvError::Empty) => self.fail("did not become ready in time"),
            Err(TryRecvError::Disconnected) => self.finish(None),
        }
    }

    /// Waits for readiness (until the deadline set at spawn).
    pub fn wait_ready(self) -> anyhow::Result<NodeProcess> {
        let timeout = self.deadline.saturating_duration_since(Instant::now());
        let startup = match self.ready.recv_timeout(timeout) {
            Ok(line) => self.finish(line),
            Err(RecvTimeoutError::Timeout) => self.fail("did not become ready in time"),
            Err(RecvTimeoutError::Disconnected) => self.finish(None),
        };
        match startup {
            Startup::Ready(process) => Ok(process),
            Startup::Failed(e) => Err(e),
            Startup::Pending(_) => unreachable!("finish and fail never leave it pending"),
        }
    }

    fn finish(mut self, line: Option<String>) -> Startup {
        let addr = line
            .as_deref()
            .and_then(|l| l.strip_prefix("sixfold-node ready on "))
            .and_then(|a| a.trim().parse().ok());
        match (addr, self.child.take()) {
            (Some(addr), Some(child)) => Startup::Ready(NodeProcess {
                child,
                addr,
                config: self.config.clone(),
                log: self.log.clone(),
            }),
            (_, child) => {
                self.child = child;
                self.fail("exited before it was ready")
            }
        }
    }

    /// Kills (if still running) and reaps the process, and says why it failed.
    fn fail(mut self, why: &str) -> Startup {
        let status = self
            .child
            .as_mut()
            .and_then(|child| match child.try_wait() {
                Ok(Some(status)) => Some(status),
                _ => kill_and_reap(child),
            });
        let status = status.map_or("not reaped".to_string(), |s| s.to_string());
        Startup::Failed(anyhow::anyhow!(
            "sixfold-node --config {} {why} ({status}); log tail: {}",
            self.config.display(),
            log_tail(&self.log)
        ))
    }
}

impl Drop for StartingNode {
    fn drop(&mut self) {
        if let Some(child) = self.child.as_mut()
            && matches!(child.try_wait(), Ok(None))
        {
            kill_and_reap(child);
        }
    }
}

/// A running `sixfold-node`. Dropping it kills the process.
pub struct NodeProcess {
    child: Child,
    pub addr: SocketAddr,
    pub config: PathBuf,
    pub log: PathBuf,
}

impl NodeProcess {
    /// Starts a node on `config` and waits (up to `READY_TIMEOUT`) until it serves.
    pub fn start(config: &Path) -> anyhow::Result<Self> {
        StartingNode::spawn(config)?.wait_ready()
    }

    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// Where the node serves its metrics, as its log says (the last start's line), if it
    /// does.
    pub fn metrics_addr(&self) -> Option<SocketAddr> {
        let log = std::fs::read_to_string(&self.log).ok()?;
        let line = log
            .lines()
            .rev()
            .find(|l| l.contains("metrics on http://"))?;
        let (_, rest) = line.split_once("http://")?;
        let (addr, _) = rest.split_once("/metrics")?;
        addr.parse().ok()
    }

    /// SIGKILL, as a crash.
    pub fn kill9(&mut self) {
        kill_and_reap(&mut self.child);
    }

    /// SIGTERM and wait for an exit; SIGKILL if it takes longer than `STOP_GRACE`.
    pub fn terminate(&mut self) -> anyhow::Result<ExitStatus> {
        match stop_children(&mut [&mut self.child], STOP_GRACE)[0] {
            StopOutcome::Exited(status) => Ok(status),
            killed => anyhow::bail!("node {}: {killed}", self.config.display()),
        }
    }

    /// Whether the process is still running.
    pub fn is_running(&mut self) -> bool {
        matches!(self.child.try_wait(), Ok(None))
    }

    /// The exit status if the process has exited (reaping it), without blocking.
    pub fn try_exit(&mut self) -> Option<ExitStatus> {
        self.child.try_wait().ok().flatten()
    }
}

impl Drop for NodeProcess {
    fn drop(&mut self) {
        if self.is_running() {
            self.kill9();
        }
    }
}

/// Stops nodes together (see [`stop_children`]): SIGTERM, a shared `grace`, then SIGKILL.
pub fn stop_all(nodes: &mut [&mut NodeProcess], grace: Duration) -> Vec<StopOutcome> {
    let mut children: Vec<&mut Child> = nodes.iter_mut().map(|n| &mut n.child).collect();
    stop_children(&mut children, grace)
}

/// Restart delays of a supervised node: `initial`, doubling up to `max`; back to `initial`
/// once the node has stayed up for `reset_after`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Backoff {
    pub initial: Duration,
    pub max: Duration,
    pub reset_after: Duration,
    next: Duration,
}

impl Default for Backoff {
    fn default() -> Self {
        Self::new(
            Duration::from_millis(500),
            Duration::from_secs(10),
            Duration::from_secs(30),
        )
    }
}

impl Backoff {
    pub fn new(initial: Duration, max: Duration, reset_after: Duration) -> Self {
        Self {
            initial,
            max,
            reset_after,
            next: initial,
        }
    }

    /// The delay before restarting a node that has just gone down after being up `up_for`.
    pub fn delay_after(&mut self, up_for: Duration) -> Duration {
        if up_for >= self.reset_after {
            self.next = self.initial;
        }
        let delay = self.next;
        self.next = (self.next * 2).min(self.max);
        delay
    }
}

/// What a supervised node is doing.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum NodeState {
    /// Serving (it printed its readiness line and has not exited since).
    Up { pid: u32 },
    /// Restarted, not serving yet.
    Starting { pid: u32 },
    /// No process: waiting for its restart delay, or stopped.
    Down,
}

/// Something the supervisor did or saw, for the log.
#[derive(Debug)]
pub enum SupervisorEvent {
    Exited {
        node: String,
        pid: u32,
        status: ExitStatus,
        restart_in: Duration,
    },
    Restarting {
        node: String,
        pid: u32,
    },
    Serving {
        node: String,
        pid: u32,
        addr: SocketAddr,
    },
    StartFailed {
        node: String,
        error: String,
        restart_in: Duration,
    },
}

impl std::fmt::Display for SupervisorEvent {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Self::Exited {
                node,
                pid,
                status,
                restart_in,
            } => write!(
                f,
                "{node} (pid {pid}) exited with {status}; restarting it in {:.1} s",
                restart_in.as_secs_f64()
            ),
            Self::Restarting { node, pid } => write!(f, "restarting {node}: pid {pid}"),
            Self::Serving { node, pid, addr } => {
                write!(f, "{node} is serving again on {addr} pid {pid}")
            }
            Self::StartFailed {
                node,
                error,
                restart_in,
            } => write!(
                f,
                "{node} failed to start: {error}; trying again in {:.1} s",
                restart_in.as_secs_f64()
            ),
        }
    }
}

enum Slot {
    Up {
        process: NodeProcess,
        since: Instant,
    },
    Starting(StartingNode),
    Down {
        restart_at: Instant,
    },
    Stopped,
}

struct SupervisedNode {
    name: String,
    config: PathBuf,
    slot: Slot,
    backoff: Backoff,
}

/// Keeps nodes running: a node whose process exits is restarted from its config file after
/// its backoff delay, until [`stop`](Supervisor::stop).
///
/// Invariants: [`poll`](Supervisor::poll) never blocks (spawning is a fork and exec, and
/// readiness is polled), so it may run on an async runtime's worker thread — and it must run
/// on a thread that outlives the nodes (see [`StartingNode::spawn`]); every process it
/// started is reaped by it; after `stop` nothing is restarted.
pub struct Supervisor {
    nodes: Vec<SupervisedNode>,
}

impl Supervisor {
    /// Supervises `(name, config path, running process)` triples; a node given without a
    /// process is started at the first poll.
    pub fn new(nodes: Vec<(String, PathBuf, Option<NodeProcess>)>, backoff: Backoff) -> Self {
        let now = Instant::now();
        let nodes = nodes
            .into_iter()
            .map(|(name, config, process)| SupervisedNode {
                name,
                config,
                slot: match process {
                    Some(process) => Slot::Up {
                        process,
                        since: now,
                    },
                    None => Slot::Down { restart_at: now },
                },
                backoff,
            })
            .collect();
        Self { nodes }
    }

    /// Reaps exited nodes, notes nodes that became ready, restarts nodes whose delay is over.
    pub fn poll(&mut self, now: Instant) -> Vec<SupervisorEvent> {
        self.nodes
            .iter_mut()
            .filter_map(|node| node.poll(now))
            .collect()
    }

    /// Each node's name and state.
    pub fn states(&self) -> Vec<(String, NodeState)> {
        self.nodes
            .iter()
            .map(|node| {
                let state = match &node.slot {
                    Slot::Up { process, .. } => NodeState::Up { pid: process.pid() },
                    Slot::Starting(starting) => NodeState::Starting {
                        pid: starting.pid(),
                    },
                    Slot::Down { .. } | Slot::Stopped => NodeState::Down,
                };
                (node.name.clone(), state)
            })
            .collect()
    }

    /// Stops every node that has a process (see [`stop_children`]) and restarts nothing
    /// afterwards. Returns the outcome per node name; nodes that were down are not listed.
    pub fn stop(&mut self, grace: Duration) -> Vec<(String, StopOutcome)> {
        let mut names = Vec::new();
        let mut children = Vec::new();
        for node in &mut self.nodes {
            let child = match &mut node.slot {
                Slot::Up { process, .. } => &mut process.child,
                Slot::Starting(starting) => match starting.child.as_mut() {
                    Some(child) => child,
                    None => continue,
                },
                Slot::Down { .. } | Slot::Stopped => continue,
            };
            names.push(node.name.clone());
            children.push(child);
        }
        let outcomes = stop_children(&mut children, grace);
        for node in &mut self.nodes {
            node.slot = Slot::Stopped;
        }
        names.into_iter().zip(outcomes).collect()
    }
}

impl SupervisedNode {
    fn poll(&mut self, now: Instant) -> Option<SupervisorEvent> {
        let node = self.name.clone();
        match std::mem::replace(&mut self.slot, Slot::Stopped) {
            Slot::Up { mut process, since } => {
                let pid = process.pid();
                let Some(status) = process.try_exit() else {
                    self.slot = Slot::Up { process, since };
                    return None;
                };
                let restart_in = self
                    .backoff
                    .delay_after(now.saturating_duration_since(since));
                self.slot = Slot::Down {
                    restart_at: now + restart_in,
                };
                Some(SupervisorEvent::Exited {
                    node,
                    pid,
                    status,
                    restart_in,
                })
            }
            Slot::Starting(starting) => {
                let pid = starting.pid();
                match starting.poll() {
                    Startup::Pending(starting) => {
                        self.slot = Slot::Starting(starting);
                        None
                    }
                    Startup::Ready(process) => {
                        let addr = process.addr;
                        self.slot = Slot::Up {
                            process,
                            since: now,
                        };
                        Some(SupervisorEvent::Serving { node, pid, addr })
                    }
                    Startup::Failed(error) => Some(self.start_failed(now, &error)),
                }
            }
            Slot::Down { restart_at } if now >= restart_at => {
                match StartingNode::spawn(&self.config) {
                    Ok(starting) => {
                        let pid = starting.pid();
                        self.slot = Slot::Starting(starting);
                        Some(SupervisorEvent::Restarting { node, pid })
                    }
                    Err(error) => Some(self.start_failed(now, &error)),
                }
            }
            other => {
                self.slot = other;
                None
            }
        }
    }

    fn start_failed(&mut self, now: Instant, error: &anyhow::Error) -> SupervisorEvent {
        let restart_in = self.backoff.delay_after(Duration::ZERO);
        self.slot = Slot::Down {
            restart_at: now + restart_in,
        };
        SupervisorEvent::StartFailed {
            node: self.name.clone(),
            error: format!("{error:#}"),
            restart_in,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Goal: restart delays start at 0.5 s, double up to 10 s, and start over once a node
    /// has stayed up long enough. Method: feed uptimes to a default `Backoff`.
    #[test]
    fn backoff_doubles_to_its_cap_and_resets_after_a_long_uptime() {
        let mut backoff = Backoff::default();
        let short = Duration::from_secs(1);
        let delays: Vec<u128> = (0..7)
            .map(|_| backoff.delay_after(short).as_millis())
            .collect();
        assert_eq!(delays, [500, 1000, 2000, 4000, 8000, 10_000, 10_000]);
        assert_eq!(
            backoff.delay_after(Duration::from_secs(30)),
            Duration::from_millis(500)
        );
        assert_eq!(backoff.delay_after(short), Duration::from_secs(1));
    }
}
