//! The `sixfold` CLI as a user runs it: `sixfold dev` starts a whole cluster and stops it
//! cleanly on SIGINT; `sixfold volume create` names the placement rule a bad node list breaks.

mod common;

use std::io::{BufRead, BufReader};
use std::process::{Command, Stdio};

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

/// Goal: `sixfold dev` runs six nodes, an engine and a workload that commits, prints VDL
/// progress every second, and on SIGINT stops everything, leaves no node behind, exits 0.
/// Method: start it, read two progress lines, send SIGINT, check the exit and the node pids.
#[test]
fn dev_runs_a_cluster_and_stops_cleanly_on_sigint() {
    let dir = std::path::Path::new(env!("CARGO_TARGET_TMPDIR"))
        .join(format!("dev-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    let mut child = sixfold()
        .args(["dev", "--workers", "4", "--dir"])
        .arg(&dir)
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let mut lines = BufReader::new(child.stdout.take().unwrap()).lines();
    let mut vdls = Vec::new();
    while vdls.len() < 2 {
        let line = lines.next().expect("progress lines").unwrap();
        let mut words = line.split_whitespace().skip_while(|w| *w != "VDL");
        let vdl: u64 = words.nth(1).unwrap().parse().unwrap();
        assert!(line.contains("commit latency p50"), "{line}");
        vdls.push(vdl);
    }
    assert!(vdls[1] > vdls[0] && vdls[0] > 0, "VDL advances: {vdls:?}");
    // SAFETY: plain syscall on our own child.
    assert_eq!(unsafe { libc::kill(child.id() as i32, libc::SIGINT) }, 0);
    let status = child.wait().unwrap();
    let mut stderr = String::new();
    std::io::Read::read_to_string(&mut child.stderr.take().unwrap(), &mut stderr).unwrap();
    assert!(status.success(), "exit {status}: {stderr}");
    assert!(stderr.contains("stopped cleanly"), "{stderr}");
    let pids: Vec<u32> = stderr
        .lines()
        .filter_map(|l| l.split(" pid ").nth(1))
        .map(|p| p.trim().parse().unwrap())
        .collect();
    assert_eq!(pids.len(), 6, "{stderr}");
    for pid in pids {
        assert!(!running(pid), "node pid {pid} outlived sixfold dev");
    }
    let _ = std::fs::remove_dir_all(&dir);
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
            engine::VolumeClient::attach(file, cluster.endpoint().unwrap(), Default::default())
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
