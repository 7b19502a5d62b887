//! The programs the bench runs, installed when missing: Debian packages through apt-get, and
//! mitmproxy from PyPI into a virtualenv under `target/bench/venv`. mitmproxy is the one peer
//! that may be missing: when it cannot be installed, its column says why instead of failing the
//! bench.

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::Duration;

use anyhow::{Context as _, Result};

use super::process;
use crate::{cmd, paths};

/// Debian packages every bench run needs: the load generators (wrk, h2load from nghttp2-client),
/// nginx (the origin API and the peer proxy), openssl (the bench's certificates), python3 (the
/// idle-connection and handshake clients, and mitmproxy's interpreter) with venv.
const DEBIAN_PACKAGES: &[&str] = &[
    "wrk",
    "nginx-light",
    "nghttp2-client",
    "openssl",
    "python3",
    "python3-venv",
];

/// Installed only for `--profile`.
const PROFILE_PACKAGES: &[&str] = &["linux-perf"];

/// How long `pip install mitmproxy` may take before its column is given up.
const PIP_DEADLINE: Duration = Duration::from_secs(300);

/// Where each program the bench runs is.
pub struct Tools {
    pub wrk: PathBuf,
    pub h2load: PathBuf,
    pub nginx: PathBuf,
    pub openssl: PathBuf,
    pub python3: PathBuf,
    /// `mitmdump`, or why it is not there.
    pub mitmdump: Result<PathBuf, String>,
    pub perf: Option<PathBuf>,
}

/// Installs what is missing and finds every program.
pub fn ensure(profile: bool) -> Result<Tools> {
    let mut packages = DEBIAN_PACKAGES.to_vec();
    if profile {
        packages.extend_from_slice(PROFILE_PACKAGES);
    }
    install_debian_packages(&packages)?;
    let mitmdump = install_mitmproxy();
    if let Err(reason) = &mitmdump {
        eprintln!("bench: mitmproxy is not installed ({reason}); its column will say so");
    }
    Ok(Tools {
        wrk: find("wrk")?,
        h2load: find("h2load")?,
        nginx: find("nginx")?,
        openssl: find("openssl")?,
        // The system interpreter: agents run as an unprivileged uid under `brokerctl run`, which
        // cannot execute one under /root (pyenv).
        python3: ["/usr/bin/python3"]
            .into_iter()
            .map(PathBuf::from)
            .find(|p| is_executable(p))
            .map_or_else(|| find("python3"), Ok)?,
        mitmdump,
        perf: if profile { Some(find("perf")?) } else { None },
    })
}

/// The first executable called `name` on `PATH`, or in the sbin directories (nginx lives in
/// `/usr/sbin`, which a non-login root shell may not have on `PATH`).
fn find(name: &str) -> Result<PathBuf> {
    let path = std::env::var_os("PATH").unwrap_or_default();
    std::env::split_paths(&path)
        .chain(["/usr/sbin", "/sbin"].map(PathBuf::from))
        .map(|dir| dir.join(name))
        .find(|candidate| is_executable(candidate))
        .with_context(|| format!("{name} is not installed (not on PATH nor in /usr/sbin)"))
}

fn is_executable(path: &Path) -> bool {
    use std::os::unix::fs::PermissionsExt as _;
    path.metadata()
        .is_ok_and(|m| m.is_file() && m.permissions().mode() & 0o111 != 0)
}

fn install_debian_packages(packages: &[&str]) -> Result<()> {
    let missing: Vec<&str> = packages
        .iter()
        .copied()
        .filter(|package| !is_installed(package))
        .collect();
    if missing.is_empty() {
        return Ok(());
    }
    let apt = || -> Result<Command> {
        let mut apt = cmd::in_workspace("apt-get")?;
        apt.env("DEBIAN_FRONTEND", "noninteractive");
        Ok(apt)
    };
    cmd::run(apt()?.arg("update")).context("apt-get update")?;
    cmd::run(
        apt()?
            .args(["install", "--yes", "--no-install-recommends"])
            .args(&missing),
    )
    .with_context(|| format!("installing {}", missing.join(", ")))
}

/// Whether dpkg reports `package` as installed (status `ii`, or `hi` when held).
fn is_installed(package: &str) -> bool {
    Command::new("dpkg-query")
        .args(["--show", "--showformat=${db:Status-Abbrev}", package])
        .stderr(Stdio::null())
        .output()
        .is_ok_and(|out| out.status.success() && out.stdout.get(1) == Some(&b'i'))
}

/// `mitmdump` from the bench's own virtualenv, created and filled from PyPI on first use.
fn install_mitmproxy() -> Result<PathBuf, String> {
    let venv = paths::target_dir().join("bench").join("venv");
    let mitmdump = venv.join("bin").join("mitmdump");
    if is_executable(&mitmdump) {
        return Ok(mitmdump);
    }
    let mut create = Command::new("python3");
    create.args(["-m", "venv"]).arg(&venv);
    run_step(
        &mut create,
        Duration::from_secs(60),
        "creating the virtualenv",
    )?;
    let mut pip = Command::new(venv.join("bin").join("python"));
    pip.args(["-m", "pip", "install", "--quiet", "mitmproxy"]);
    run_step(&mut pip, PIP_DEADLINE, "pip install mitmproxy")?;
    if is_executable(&mitmdump) {
        Ok(mitmdump)
    } else {
        Err(format!(
            "pip installed mitmproxy but left no {}",
            mitmdump.display()
        ))
    }
}

/// Runs one installation step, its failure told in a sentence.
fn run_step(command: &mut Command, deadline: Duration, what: &str) -> Result<(), String> {
    match process::output_within(command, deadline) {
        Ok(out) if out.status.success() => Ok(()),
        Ok(out) => Err(format!("{what} failed: {}", out.stderr_tail())),
        Err(e) => Err(format!("{what}: {e:#}")),
    }
}

/// The first line `program ARGS` prints on stdout or stderr, for the JSON's record of versions.
pub fn version_of(program: &Path, args: &[&str]) -> String {
    let Ok(out) = Command::new(program).args(args).output() else {
        return "unknown".to_owned();
    };
    let text = [out.stdout, out.stderr].concat();
    String::from_utf8_lossy(&text)
        .lines()
        .find(|line| !line.trim().is_empty())
        .unwrap_or("unknown")
        .trim()
        .to_owned()
}
