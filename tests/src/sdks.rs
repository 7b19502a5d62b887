//! The official LLM SDKs agents run (OpenAI's and Anthropic's Python packages, and the
//! `websockets` package), installed once
//! per machine from PyPI into a virtualenv under /var/tmp: world-readable and outside /root,
//! since agents under `brokerctl run` are other users. Pinned, so a run is repeatable.

use std::{
    path::{Path, PathBuf},
    process::Command,
    sync::OnceLock,
};

/// The packages installed, pinned.
const PACKAGES: [&str; 3] = ["openai==3.57.0", "anthropic==2.16.0", "websockets==17.4"];

/// The virtualenv's python, created on first use (a run that finds it ready reuses it).
pub fn sdk_python() -> &'static Path {
    static PYTHON: OnceLock<PathBuf> = OnceLock::new();
    PYTHON.get_or_init(|| {
        let dir = PathBuf::from(format!(
            "/var/tmp/agent-broker-sdks-{}",
            crate::sha256_hex(PACKAGES.join(" ").as_bytes())
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
                .args(PACKAGES));
            std::fs::write(&ready, PACKAGES.join("\n"))
                .unwrap_or_else(|e| panic!("cannot mark {} ready: {e}", dir.display()));
        }
        dir.join("bin/python")
    })
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
