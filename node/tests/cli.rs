//! The node binary's command line: bad configuration gets one clear line and exit code 2.

use std::process::Command;

fn node() -> Command {
    Command::new(env!("CARGO_BIN_EXE_sixfold-node"))
}

/// Goal: every configuration mistake is reported as one line naming the problem.
/// Method: run the binary on a missing file, a syntax error and a bad value.
#[test]
fn bad_config_is_one_clear_line() {
    let dir = std::path::Path::new(env!("CARGO_TARGET_TMPDIR")).join("node-cli");
    std::fs::create_dir_all(&dir).unwrap();
    let default = String::from_utf8(
        node()
            .arg("--print-default-config")
            .output()
            .unwrap()
            .stdout,
    )
    .unwrap();
    assert!(default.contains("[journal]"));
    let cases = [
        ("missing.toml", None, "cannot read config"),
        ("syntax.toml", Some("name = \n"), "line 1"),
        (
            "listen.toml",
            Some(&*default.replace("127.0.0.1:7100", "nowhere")),
            "listen",
        ),
        (
            "count.toml",
            Some(&*default.replace("file_count = 8", "file_count = 0")),
            "file_count",
        ),
    ];
    for (file, contents, expected) in cases {
        let path = dir.join(file);
        if let Some(contents) = contents {
            std::fs::write(&path, contents).unwrap();
        }
        let out = node().arg("--config").arg(&path).output().unwrap();
        assert_eq!(out.status.code(), Some(2), "{file}");
        let stderr = String::from_utf8(out.stderr).unwrap();
        assert_eq!(stderr.lines().count(), 1, "{file}: {stderr}");
        assert!(stderr.contains(expected), "{file}: {stderr}");
    }
}
