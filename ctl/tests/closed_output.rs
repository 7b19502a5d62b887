//! Issue 13 item 17: brokerctl whose reader has gone away (`brokerctl ... | head`) ends
//! quietly, never with a panic.

use std::process::{Command, Stdio};

/// Runs brokerctl with `args` and a standard output whose reader is already closed: every
/// write fails with EPIPE.
fn with_closed_stdout(args: &[&str]) -> std::process::Output {
    let (reader, writer) = std::io::pipe().expect("a pipe");
    drop(reader);
    Command::new(env!("CARGO_BIN_EXE_brokerctl"))
        .args(args)
        .stdout(Stdio::from(writer))
        .stderr(Stdio::piped())
        .output()
        .expect("run brokerctl")
}

#[test]
fn a_closed_standard_output_ends_brokerctl_quietly() {
    let dir = tempfile::tempdir().expect("tempdir");
    std::fs::write(
        dir.path().join("agents.toml"),
        "cgroup = \"agents/a\"\n[[allow]]\nhost = \"api.example.test\"\n",
    )
    .expect("write a policy");
    let policy_dir = dir.path().to_str().expect("utf-8 path");
    let out = with_closed_stdout(&["policy", "check", "--policy-dir", policy_dir]);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!stderr.contains("panicked"), "{stderr}");
    assert_eq!(out.status.code(), Some(0), "{stderr}");
    assert_eq!(stderr, "");
}
