//! Running storage nodes as real processes, for tests, benchmarks and local clusters: write a
//! config, start `sixfold-node`, wait for its readiness line, stop it with SIGTERM or kill -9.

use std::io::{BufRead, BufReader};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::time::Duration;

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
        }
    }

    pub fn to_toml(&self) -> String {
        let mut s = format!(
            "name = \"{}\"\nlisten = \"{}\"\naz = \"{}\"\ndata_dir = \"{}\"\n\n[tls]\n\
             ca = \"{}\"\ncert = \"{}\"\nkey = \"{}\"\n\n[journal]\nfile_bytes = {}\n\
             file_count = {}\ninflight_groups_max = {}\nsync = \"{}\"\npersister = \"{}\"\n",
            self.name,
            self.listen,
            self.az,
            self.data_dir.display(),
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

/// A running `sixfold-node`. Dropping it kills the process.
pub struct NodeProcess {
    child: Child,
    pub addr: SocketAddr,
    pub config: PathBuf,
    pub log: PathBuf,
}

impl NodeProcess {
    /// Starts a node on `config` and waits (up to two minutes) until it serves.
    pub fn start(config: &Path) -> anyhow::Result<Self> {
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
        let (tx, rx) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            let mut lines = BufReader::new(stdout).lines();
            let ready = lines.next().and_then(Result::ok);
            let _ = tx.send(ready);
            for _ in lines {} // Keep draining so the node never blocks on stdout.
        });
        let line = rx.recv_timeout(Duration::from_secs(120)).ok().flatten();
        let addr = line
            .as_deref()
            .and_then(|l| l.strip_prefix("sixfold-node ready on "))
            .and_then(|a| a.trim().parse().ok());
        let Some(addr) = addr else {
            let _ = child.kill();
            let _ = child.wait();
            let tail = std::fs::read_to_string(&log).unwrap_or_default();
            let tail: Vec<&str> = tail.lines().rev().take(5).collect();
            anyhow::bail!(
                "sixfold-node did not become ready; log tail: {}",
                tail.join(" | ")
            );
        };
        Ok(Self {
            child,
            addr,
            config: config.to_path_buf(),
            log,
        })
    }

    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// SIGKILL, as a crash.
    pub fn kill9(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }

    /// SIGTERM and wait for a clean exit.
    pub fn terminate(&mut self) -> anyhow::Result<ExitStatus> {
        let pid = i32::try_from(self.child.id()).context("pid")?;
        // SAFETY: plain syscall on a child process we own and have not reaped.
        let rc = unsafe { libc::kill(pid, libc::SIGTERM) };
        anyhow::ensure!(rc == 0, "cannot signal node {pid}");
        Ok(self.child.wait()?)
    }

    /// Whether the process is still running.
    pub fn is_running(&mut self) -> bool {
        matches!(self.child.try_wait(), Ok(None))
    }
}

impl Drop for NodeProcess {
    fn drop(&mut self) {
        if self.is_running() {
            self.kill9();
        }
    }
}
