//! Python virtualenvs of pinned PyPI packages for the agents the tests run, installed once per
//! machine under /var/tmp: world-readable and outside /root, since agents under `brokerctl run`
//! are other users. The directory is named after the packages, so changing a pin makes a new
//! one and a run that finds one ready reuses it.

use std::{path::PathBuf, process::Command};

/// The python of the virtualenv `/var/tmp/agent-broker-<name>-<hash of packages>` holding
/// `packages` (pip requirement specifiers, pinned), creating it from /usr/bin/python3 first
/// when it is not ready. Panics, with pip's error, when it cannot be made.
pub fn venv(name: &str, packages: &[&str]) -> PathBuf {
    let dir = PathBuf::from(format!(
        "/var/tmp/agent-broker-{name}-{}",
        crate::sha256_hex(packages.join(" ").as_bytes())
            .get(..12)
            .unwrap_or("v")
    ));
    let ready = dir.join("ready");
    if !ready.exists() {
        let _ = std::fs::remove_dir_all(&dir);
        run(Command::new("/usr/bin/python3")
            .args(["-m", "venv"])
            .arg(&dir));
        run(Command::new(dir.join("bin/pip"))
            .args(["install", "--quiet", "--disable-pip-version-check"])
            .args(packages));
        std::fs::write(&ready, packages.join("\n"))
            .unwrap_or_else(|e| panic!("cannot mark {} ready: {e}", dir.display()));
    }
    dir.join("bin/python")
}

fn run(cmd: &mut Command) {
    let out = cmd
        .output()
        .unwrap_or_else(|e| panic!("cannot run {cmd:?}: {e}"));
    assert!(
        out.status.success(),
        "{cmd:?} failed ({}): {}",
        out.status,
        String::from_utf8_lossy(&out.stderr)
    );
}
