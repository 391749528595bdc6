//! `sixfold-bench recovery` and `sixfold-bench chaos` as a user runs them, at tiny sizes: each
//! runs to the end against real node processes and its `--json` is exactly the documented
//! object. (Numbers are read, never asserted, except that chaos lost nothing.)

use std::io::Read;
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::time::{Duration, Instant};

use serde_json::Value;

/// A fresh directory under cargo's target tmpdir (on the disk, never tmpfs).
fn test_dir(name: &str) -> PathBuf {
    let dir = Path::new(env!("CARGO_TARGET_TMPDIR")).join(format!("{name}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    dir
}

/// Runs `sixfold-bench ARGS`, killing it if it has not exited by `timeout`.
fn bench(args: &[&str], timeout: Duration) -> Output {
    let mut child = Command::new(env!("CARGO_BIN_EXE_sixfold-bench"))
        .args(args)
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let drain = |mut pipe: Box<dyn Read + Send>| {
        std::thread::spawn(move || {
            let mut bytes = Vec::new();
            let _ = pipe.read_to_end(&mut bytes);
            bytes
        })
    };
    let stdout = drain(Box::new(child.stdout.take().unwrap()));
    let stderr = drain(Box::new(child.stderr.take().unwrap()));
    let deadline = Instant::now() + timeout;
    let status = loop {
        if let Some(status) = child.try_wait().unwrap() {
            break status;
        }
        if Instant::now() >= deadline {
            let _ = child.kill();
            let _ = child.wait();
            let stderr = String::from_utf8_lossy(&stderr.join().unwrap()).into_owned();
            panic!("sixfold-bench {args:?} did not finish within {timeout:?}; stderr:\n{stderr}");
        }
        std::thread::sleep(Duration::from_millis(50));
    };
    Output {
        status,
        stdout: stdout.join().unwrap(),
        stderr: stderr.join().unwrap(),
    }
}

/// The one JSON object a successful run printed.
fn json_of(output: &Output) -> Value {
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(
        output.status.success(),
        "{}; stderr:\n{stderr}",
        output.status
    );
    serde_json::from_slice(&output.stdout).unwrap_or_else(|e| {
        panic!(
            "stdout is not one JSON object ({e}): {}",
            String::from_utf8_lossy(&output.stdout)
        )
    })
}

fn keys(value: &Value) -> Vec<&str> {
    let mut keys: Vec<&str> = value
        .as_object()
        .unwrap_or_else(|| panic!("not an object: {value}"))
        .keys()
        .map(String::as_str)
        .collect();
    keys.sort_unstable();
    keys
}

/// Goal: `recovery --json` prints exactly `{"small": {"written_bytes", "recovery_ms"},
/// "large": {…}}`, with at least the bytes asked for written to each volume.
/// Method: 1 MiB and 2 MiB volumes, one timed reopen each.
#[test]
fn recovery_prints_the_documented_json() {
    let dir = test_dir("bench-recovery");
    let dir_arg = dir.to_str().unwrap();
    let args = [
        "recovery",
        "--dir",
        dir_arg,
        "--small-mib",
        "1",
        "--large-mib",
        "2",
        "--runs",
        "1",
        "--json",
    ];
    let json = json_of(&bench(&args, Duration::from_secs(600)));
    assert_eq!(keys(&json), ["large", "small"], "{json}");
    for (name, mib) in [("small", 1), ("large", 2)] {
        let volume = &json[name];
        assert_eq!(keys(volume), ["recovery_ms", "written_bytes"], "{json}");
        assert!(
            volume["written_bytes"].as_u64().unwrap() >= mib << 20,
            "{json}"
        );
        assert!(volume["recovery_ms"].as_f64().unwrap() > 0.0, "{json}");
    }
    let _ = std::fs::remove_dir_all(&dir);
}

/// Goal: `chaos --json` prints exactly `{"cycles", "acknowledged", "verified", "lost",
/// "stall_ms_max"}` and loses nothing. Method: a 3-second run.
#[test]
fn chaos_prints_the_documented_json() {
    let dir = test_dir("bench-chaos");
    let dir_arg = dir.to_str().unwrap();
    let args = ["chaos", "--dir", dir_arg, "--seconds", "3", "--json"];
    let json = json_of(&bench(&args, Duration::from_secs(600)));
    assert_eq!(
        keys(&json),
        ["acknowledged", "cycles", "lost", "stall_ms_max", "verified"],
        "{json}"
    );
    assert!(json["cycles"].as_u64().unwrap() >= 1, "{json}");
    assert_eq!(json["lost"], 0, "{json}");
    assert_eq!(json["verified"], json["acknowledged"], "{json}");
    let _ = std::fs::remove_dir_all(&dir);
}

/// Goal: a bench that outlives its overall deadline stops by itself, exits with status 3 and
/// names the phase that stalled. Method: a 60 s raw-disk probe under a 1 s `--deadline`.
#[test]
fn a_bench_past_its_deadline_exits_3_naming_the_phase() {
    let dir = test_dir("deadline");
    let dir_arg = dir.to_str().unwrap();
    let args = [
        "append",
        "--deadline",
        "1",
        "--dir",
        dir_arg,
        "--seconds",
        "60",
        "--inflight",
        "1",
    ];
    let output = bench(&args, Duration::from_secs(120));
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert_eq!(output.status.code(), Some(3), "stderr:\n{stderr}");
    assert!(
        stderr.contains("overall deadline of 1 s passed; stalled in phase \"raw disk"),
        "stderr:\n{stderr}"
    );
    let _ = std::fs::remove_dir_all(&dir);
}

/// Goal: a bad flag of the issue 7 measurements is refused at once with one line naming it,
/// before any node starts. Method: three bad command lines; exit status and stderr.
#[test]
fn bad_measurement_flags_are_one_line() {
    let dir = test_dir("bench-bad-flags");
    let dir_arg = dir.to_str().unwrap();
    let cases: [(&[&str], &str); 4] = [
        (
            &["commit", "--dir", dir_arg, "--slow-nodes", "6"],
            "--slow-nodes must be between 1 and 5",
        ),
        (
            &["commit", "--dir", dir_arg, "--delay-ms", "5"],
            "--delay-ms needs --slow-nodes",
        ),
        (
            &["read", "--dir", dir_arg, "--history", "0"],
            "--history must be between 1 and",
        ),
        (
            &["soak", "--dir", dir_arg, "--compare-seconds", "4000"],
            "--compare-seconds and --catch-up-down-seconds must be at most 3600",
        ),
    ];
    for (args, expected) in cases {
        let output = bench(args, Duration::from_secs(60));
        let stderr = String::from_utf8_lossy(&output.stderr);
        assert_eq!(output.status.code(), Some(2), "{args:?}: {stderr}");
        assert_eq!(stderr.lines().count(), 1, "{args:?}: {stderr}");
        assert!(stderr.contains(expected), "{args:?}: {stderr}");
    }
    let _ = std::fs::remove_dir_all(&dir);
}

/// Goal: `read --json` prints the documented fields, and the page read back matched its
/// model before and after coalescing (the bench fails otherwise). Method: a 50-record
/// history, 1 s per measurement.
#[test]
fn read_prints_the_documented_json() {
    let dir = test_dir("bench-read");
    let dir_arg = dir.to_str().unwrap();
    let args = [
        "read",
        "--dir",
        dir_arg,
        "--seconds",
        "1",
        "--history",
        "50",
        "--json",
    ];
    let json = json_of(&bench(&args, Duration::from_secs(600)));
    for key in [
        "read_p50_us",
        "read_p99_us",
        "raw_read_p99_us",
        "rtt_p99_us",
        "ratio",
    ] {
        assert!(json[key].is_number(), "{key}: {json}");
    }
    assert!(json["read_p99_us"].as_u64().unwrap() > 0, "{json}");
    assert!(
        json["before_coalescing"]["read"]["p99_us"].is_number(),
        "{json}"
    );
    assert_eq!(json["history_records"], 50, "{json}");
    let _ = std::fs::remove_dir_all(&dir);
}
