//! The `sixfold` CLI as a user runs it: `sixfold dev` starts a whole cluster, restarts a node
//! killed under it, stops cleanly on SIGINT and reopens its cluster when run again;
//! `sixfold volume create` names the placement rule a bad node list breaks.

mod common;

use std::io::{BufRead, BufReader};
use std::path::Path;
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::mpsc::{Receiver, RecvTimeoutError};
use std::time::{Duration, Instant};

fn sixfold() -> Command {
    Command::new(env!("CARGO_BIN_EXE_sixfold"))
}

fn running(pid: u32) -> bool {
    // A zombie still answers kill(0); look at its state instead.
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
    stat.split_whitespace()
        .nth(2)
        .is_some_and(|state| state != "Z")
}

fn signal(pid: u32, signal: i32) {
    // SAFETY: plain syscall; the pid is our child or a node our child started.
    assert_eq!(unsafe { libc::kill(pid as i32, signal) }, 0, "kill {pid}");
}

/// Lines of a child's pipe, arriving on a channel (so every wait can have a deadline).
fn lines_of(pipe: impl std::io::Read + Send + 'static) -> Receiver<String> {
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        for line in BufReader::new(pipe).lines() {
            let Ok(line) = line else { return };
            if tx.send(line).is_err() {
                return;
            }
        }
    });
    rx
}

/// A running `sixfold dev` whose output is read line by line, with deadlines.
struct Dev {
    child: Child,
    stdout: Receiver<String>,
    stderr: Receiver<String>,
    /// Every stderr line read so far.
    log: Vec<String>,
}

impl Dev {
    fn spawn(dir: &Path, args: &[&str]) -> Self {
        let mut child = sixfold()
            .args(["dev", "--workers", "4", "--dir"])
            .arg(dir)
            .args(args)
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        let stdout = lines_of(child.stdout.take().unwrap());
        let stderr = lines_of(child.stderr.take().unwrap());
        Self {
            child,
            stdout,
            stderr,
            log: Vec::new(),
        }
    }

    /// The next stderr line `matches` accepts, waiting at most `timeout`.
    fn stderr_line(
        &mut self,
        what: &str,
        timeout: Duration,
        matches: impl Fn(&str) -> bool,
    ) -> String {
        let deadline = Instant::now() + timeout;
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            match self.stderr.recv_timeout(left) {
                Ok(line) => {
                    self.log.push(line.clone());
                    if matches(&line) {
                        return line;
                    }
                }
                Err(e) => panic!(
                    "no {what} within {timeout:?} ({e:?}); stderr so far:\n{}",
                    self.log.join("\n")
                ),
            }
        }
    }

    /// The pids of the six nodes from dev's startup lines (`  nodeN (azM) on ADDR pid PID`).
    fn node_pids(&mut self) -> Vec<u32> {
        (0..6)
            .map(|_| {
                let line = self.stderr_line("node startup line", Duration::from_secs(300), |l| {
                    l.starts_with("  node") && l.contains(" pid ")
                });
                line.rsplit(" pid ").next().unwrap().trim().parse().unwrap()
            })
            .collect()
    }

    /// The VDL of the next progress line whose VDL is above `above`, waiting at most `timeout`.
    fn vdl_above(&mut self, above: u64, timeout: Duration) -> u64 {
        let deadline = Instant::now() + timeout;
        let mut seen = Vec::new();
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            let line = match self.stdout.recv_timeout(left) {
                Ok(line) => line,
                Err(e) => panic!("VDL did not pass {above} within {timeout:?} ({e:?}): {seen:#?}"),
            };
            assert!(line.contains("commit latency p50"), "{line}");
            let mut words = line.split_whitespace().skip_while(|w| *w != "VDL");
            let vdl: u64 = words.nth(1).unwrap().parse().unwrap();
            if vdl > above {
                return vdl;
            }
            seen.push(line);
        }
    }

    /// Drops the progress lines printed so far.
    fn skip_printed_progress(&mut self) {
        while self.stdout.try_recv().is_ok() {}
    }

    /// Waits at most `timeout` for dev to exit; returns its status and its whole stderr.
    fn wait(mut self, timeout: Duration) -> (ExitStatus, String) {
        let deadline = Instant::now() + timeout;
        let status = loop {
            if let Some(status) = self.child.try_wait().unwrap() {
                break status;
            }
            if Instant::now() > deadline {
                let _ = self.child.kill();
                panic!(
                    "sixfold dev did not exit within {timeout:?}:\n{}",
                    self.log.join("\n")
                );
            }
            std::thread::sleep(Duration::from_millis(50));
        };
        // The pipe closes when dev exits (the nodes' stderr goes to their own logs).
        loop {
            match self.stderr.recv_timeout(Duration::from_secs(10)) {
                Ok(line) => self.log.push(line),
                Err(RecvTimeoutError::Disconnected) => break,
                Err(RecvTimeoutError::Timeout) => {
                    panic!("dev's stderr stayed open after it exited")
                }
            }
        }
        (status, self.log.join("\n"))
    }
}

/// Goal: `sixfold dev` runs six nodes, an engine and a workload that commits, prints VDL
/// progress every second, and on SIGINT stops everything, leaves no node behind, exits 0.
/// Method: start it, read two progress lines, send SIGINT, check the exit and the node pids.
#[test]
fn dev_runs_a_cluster_and_stops_cleanly_on_sigint() {
    let dir = common::test_dir("dev");
    let mut dev = Dev::spawn(&dir, &[]);
    let pids = dev.node_pids();
    let first = dev.vdl_above(0, Duration::from_secs(120));
    dev.vdl_above(first, Duration::from_secs(60));
    signal(dev.child.id(), libc::SIGINT);
    let (status, stderr) = dev.wait(Duration::from_secs(120));
    assert!(status.success(), "exit {status}: {stderr}");
    assert!(stderr.contains("stopped cleanly"), "{stderr}");
    assert!(!stderr.contains("SELF-CHECK FAILED"), "{stderr}");
    for pid in pids {
        assert!(!running(pid), "node pid {pid} outlived sixfold dev");
    }
    common::cleanup(&dir);
}

/// The durable LSNs of each node's journal under a dev directory.
fn journals(dir: &Path) -> Vec<std::collections::BTreeSet<u64>> {
    (1..=6)
        .map(|i| {
            let (records, _) =
                tools::inspect::journal_records(&dir.join(format!("node{i}"))).unwrap();
            records.iter().map(|r| r.lsn).collect()
        })
        .collect()
}

/// The files a reopen must leave alone: the volume file and the node configs.
fn cluster_files(dir: &Path) -> Vec<String> {
    let names = (1..=6)
        .map(|i| format!("node{i}.toml"))
        .chain(["volume.toml".to_string()]);
    names
        .map(|n| std::fs::read_to_string(dir.join(n)).unwrap())
        .collect()
}

/// Goal: dev supervises its nodes — a node killed with SIGKILL is restarted (logged, new pid)
/// and commits go on — SIGINT afterwards still stops everything and exits 0; and dev run again
/// on the same directory reopens that cluster rather than making a new one.
/// Method: start dev, kill -9 node3 (its pid from dev's startup lines), wait for the exit and
/// restart lines and for VDL to move on, SIGINT; then run `dev --seconds 3` on the same
/// directory and check it says it reopened, exits 0, and left the volume file, the node
/// configs and every record of the nodes' journals in place.
#[test]
fn dev_restarts_a_killed_node_and_reopens_its_cluster() {
    let dir = common::test_dir("dev-supervise");
    let mut dev = Dev::spawn(&dir, &[]);
    let mut pids = dev.node_pids();
    dev.vdl_above(0, Duration::from_secs(120));
    let killed = pids[2];
    signal(killed, libc::SIGKILL);
    let exited = format!("node3 (pid {killed}) exited with signal: 9");
    dev.stderr_line("exit line", Duration::from_secs(60), |l| {
        l.contains(&exited)
    });
    let back = dev.stderr_line("restart line", Duration::from_secs(180), |l| {
        l.contains("node3 is serving again")
    });
    let new_pid: u32 = back.rsplit(" pid ").next().unwrap().trim().parse().unwrap();
    assert!(new_pid != killed && running(new_pid), "{back}");
    pids.push(new_pid);
    dev.skip_printed_progress();
    let vdl = dev.vdl_above(0, Duration::from_secs(60));
    dev.vdl_above(vdl, Duration::from_secs(60));
    signal(dev.child.id(), libc::SIGINT);
    let (status, stderr) = dev.wait(Duration::from_secs(120));
    assert!(status.success(), "exit {status}: {stderr}");
    assert!(stderr.contains("stopped cleanly"), "{stderr}");
    assert!(!stderr.contains("SELF-CHECK FAILED"), "{stderr}");
    for pid in &pids {
        assert!(!running(*pid), "node pid {pid} outlived sixfold dev");
    }

    let (files, before) = (cluster_files(&dir), journals(&dir));
    assert!(
        before.iter().all(|lsns| !lsns.is_empty()),
        "every node wrote"
    );
    let mut again = Dev::spawn(&dir, &["--seconds", "3"]);
    let pids = again.node_pids();
    let (status, stderr) = again.wait(Duration::from_secs(300));
    assert!(status.success(), "exit {status}: {stderr}");
    assert!(stderr.contains("reopening the cluster"), "{stderr}");
    assert!(
        attached_vdl(&stderr) >= vdl,
        "reopened below VDL {vdl}: {stderr}"
    );
    assert!(!stderr.contains("SELF-CHECK FAILED"), "{stderr}");
    assert!(
        pids.iter().all(|pid| !running(*pid)),
        "a node outlived dev: {stderr}"
    );
    assert!(
        cluster_files(&dir) == files,
        "volume.toml or a node config changed"
    );
    for (i, (after, before)) in journals(&dir).iter().zip(&before).enumerate() {
        assert!(
            after.is_superset(before),
            "node{} lost journal records",
            i + 1
        );
    }
    reopen_after_kill9(&dir);
    common::cleanup(&dir);
}

/// The VDL dev's engine recovered when it attached (`engine attached: VDL N …`).
fn attached_vdl(stderr: &str) -> u64 {
    let line = stderr
        .lines()
        .find(|l| l.contains("engine attached: VDL"))
        .unwrap_or_else(|| panic!("no attach line: {stderr}"));
    let mut words = line.split_whitespace().skip_while(|w| *w != "VDL");
    words.nth(1).unwrap().parse().unwrap()
}

/// Goal: dev killed with SIGKILL loses nothing it printed: run again, its engine recovers a
/// VDL at least the last one printed. Method: run dev, wait for VDL to move, note the last
/// VDL printed, kill -9 dev (its nodes follow through PDEATHSIG), wait until every node is
/// gone, run dev again and read the VDL it attached at.
fn reopen_after_kill9(dir: &std::path::Path) {
    let mut dev = Dev::spawn(dir, &[]);
    let pids = dev.node_pids();
    let first = dev.vdl_above(0, Duration::from_secs(120));
    let last = dev.vdl_above(first, Duration::from_secs(60));
    signal(dev.child.id(), libc::SIGKILL);
    let _ = dev.child.wait();
    let deadline = Instant::now() + Duration::from_secs(60);
    while pids.iter().any(|pid| running(*pid)) {
        assert!(Instant::now() < deadline, "nodes outlived a killed dev");
        std::thread::sleep(Duration::from_millis(50));
    }
    let again = Dev::spawn(dir, &["--seconds", "3"]);
    let (status, stderr) = again.wait(Duration::from_secs(300));
    assert!(status.success(), "exit {status}: {stderr}");
    assert!(!stderr.contains("SELF-CHECK FAILED"), "{stderr}");
    assert!(
        attached_vdl(&stderr) >= last,
        "reopened below the last VDL printed ({last}): {stderr}"
    );
}

/// Goal: a node list that cannot satisfy the placement rules is refused with one line that
/// names the rule, before anything is contacted.
#[test]
fn volume_create_names_the_broken_placement_rule() {
    let mut args = vec![
        "volume",
        "create",
        "--out",
        "/nonexistent/v.toml",
        "--certs",
        "/nonexistent",
    ];
    let nodes = [
        "n1,127.0.0.1:1,a",
        "n2,127.0.0.1:2,a",
        "n3,127.0.0.1:3,b",
        "n4,127.0.0.1:4,b",
        "n5,127.0.0.1:5,c",
    ];
    for node in &nodes {
        args.extend(["--node", node]);
    }
    let out = sixfold().args(&args).output().unwrap();
    assert_eq!(out.status.code(), Some(2));
    let stderr = String::from_utf8(out.stderr).unwrap();
    assert_eq!(stderr.lines().count(), 1, "{stderr}");
    assert!(
        stderr.contains("at least 3 AZs with 2 or more nodes"),
        "{stderr}"
    );
    let out = sixfold()
        .args([
            "volume", "create", "--out", "x", "--certs", "y", "--node", "n1:7100",
        ])
        .output()
        .unwrap();
    let stderr = String::from_utf8(out.stderr).unwrap();
    assert!(stderr.contains("NAME,ADDRESS,AZ"), "{stderr}");
}

/// Goal: `sixfold volume create` over running nodes writes a volume file that follows the
/// placement rules, and tells every node its segments, so an engine can commit to it.
/// Method: start six nodes, create a second volume with the CLI, commit one MTR to it and
/// read it back.
#[test]
fn volume_create_assigns_segments_on_running_nodes() {
    let dir = common::test_dir("cli-volume");
    let rt = common::runtime();
    let cluster = rt
        .block_on(tools::cluster::LocalCluster::start(
            &dir,
            &Default::default(),
        ))
        .unwrap();
    let out = dir.join("volume2.toml");
    let mut command = sixfold();
    command.args([
        "volume",
        "create",
        "--volume",
        "2",
        "--pg-count",
        "3",
        "--segment-bytes",
        "1048576",
    ]);
    command
        .arg("--out")
        .arg(&out)
        .arg("--certs")
        .arg(&cluster.certs);
    for spec in &cluster.specs {
        command
            .arg("--node")
            .arg(format!("{},{},{}", spec.name, spec.listen, spec.az));
    }
    let result = command.output().unwrap();
    assert!(
        result.status.success(),
        "{}",
        String::from_utf8_lossy(&result.stderr)
    );
    let file = engine::VolumeFile::load(&out).unwrap();
    assert_eq!((file.volume, file.pgs.len()), (2, 3));
    rt.block_on(async {
        let volume =
            engine::VolumeClient::open(file, cluster.endpoint().unwrap(), Default::default())
                .await
                .unwrap();
        let page = wire::PageId(300); // pg 2 of 128-page PGs
        let op = wire::RedoOp::Write {
            offset: 8,
            bytes: b"volume two".to_vec(),
        };
        let cpl = volume
            .write_mtr(vec![engine::quorum::MtrRecord { page, op }])
            .await
            .unwrap();
        volume.commit(cpl).await.unwrap();
        let image = volume
            .read_page_from(page, volume.vdl(), None)
            .await
            .unwrap();
        assert_eq!(&image.bytes[8..18], b"volume two");
    });
    drop(cluster);
    common::cleanup(&dir);
}
