//! Harness for agent-broker's privileged end-to-end tests (the tests live in `tests/tests/`).
//!
//! Every test builds its own small world and tears it down in `Drop`, even when it panics:
//!
//! - [`TestCgroup`]: a fresh cgroup directly under the cgroup2 mount (`abtest-<pid>-<n>`), with
//!   helpers to start a command inside it; Drop kills everything in it and removes it.
//! - [`Broker`]: a brokerd of its own, with temporary state/run/policy dirs, a unique bpffs pin dir
//!   and port 0, policy files and `--upstream-ca` files from a [`BrokerBuilder`], plus typed
//!   wrappers around `brokerctl` (status, connections, attach, secret set, ca export, ...). It
//!   keeps every brokerctl output so tests can scan it for secrets.
//! - [`TestServer`]: a loopback plain-HTTP server that records every peer it accepts and which
//!   process owns that peer socket, so a test can tell a connection relayed by brokerd (the peer
//!   is brokerd's socket) from a direct one (the peer is the agent's own socket).
//! - [`TestCa`] and [`TestUpstream`]: an HTTPS API with its own runtime-generated CA (`/hash`,
//!   `/echo`, `/stream`, `/ws`) that records what it received as hashes, never values.
//! - [`agent`]: python3 agents that connect from inside a cgroup and report, as JSON, what they
//!   saw (their pid/tid, local address, `getpeername`, the server's answer).
//! - [`clients`]: real HTTPS clients (curl, python3, node, the static `agent-client` binary of
//!   this crate) started with `brokerctl run`, with their output and environment kept for leak
//!   scans.
//! - [`Canary`]: random secrets that are never printed; [`redact`] hides them (in any common
//!   encoding) from every text the harness prints.
//! - [`git_server`]: an HTTPS git server (Debian's `git http-backend` as CGI) behind HTTP basic
//!   auth, for `git clone` / `git push` agents.
//! - [`TestHost`]: a non-loopback host in a network namespace of the test's own.
//! - [`container`]: real Podman containers and `podman kube play` pods (`--network none`),
//!   removed by name on Drop.
//! - [`containerd`]: a containerd of the test's own and containers run with `ctr run`, removed
//!   by ID on Drop; containerd is stopped by pid.
//! - [`sdks`], [`grpc`]: pinned PyPI packages agents run (the LLM SDKs, `websockets`,
//!   `grpcio`), each in a virtualenv under /var/tmp made by [`venv`]; [`grpc::GrpcServer`] is a
//!   real gRPC server over TLS with a certificate from a [`TestCa`].
//! - [`oauth`]: a local OAuth 2.0 authorization server and protected resource over HTTPS
//!   ([`oauth::TestOAuth`]): refresh-token rotation, client credentials, jwt-bearer, failure
//!   injection and counters.
//! - [`mcp`]: the official MCP Python SDK (pinned, in a virtualenv under /var/tmp).
//! - [`attacker`]: the protocol attacker of issue 17.2 (raw HTTP/2 frames and HTTP/1.1 bytes
//!   over TLS from inside an agent cgroup) and brokerd's runtime gauges, sampled during it.
//! - [`world`]: the world of the tests against the HTTPS test API (a cgroup, the API, a brokerd
//!   trusting its CA, a secret in the vault), shared by several test files.
//!
//! These tests need root, cgroup v2 and BPF. Without them they fail and say why; they never skip.
//! Traffic goes only to loopback or into network namespaces the tests create.
//!
//! Binaries come from `$AGENT_BROKER_BIN_DIR`, else `<workspace>/target/debug`; the static client
//! from `$AGENT_BROKER_STATIC_CLIENT`, else
//! `<workspace>/target/static/x86_64-unknown-linux-gnu/debug/agent-client`.

pub mod agent;
pub mod attacker;
pub mod aws;
pub mod bpf;
pub mod broker;
pub mod canary;
pub mod cgroup;
pub mod clients;
pub mod container;
pub mod containerd;
pub mod git_server;
pub mod grpc;
pub mod kube_api;
pub mod mcp;
pub mod netns;
pub mod oauth;
pub mod resolver;
pub mod scripted;
pub mod sdks;
pub mod servers;
pub mod upstream;
pub mod venv;
pub mod world;

use std::{
    io::Read as _,
    net::SocketAddr,
    path::PathBuf,
    process::{Child, Command, Output, Stdio},
    sync::atomic::{AtomicU32, Ordering},
    thread,
    time::{Duration, Instant},
};

pub use agent::{AgentReport, AgentRun, Mode};
pub use broker::{Broker, BrokerBuilder};
pub use canary::{Canary, redact, sha256_hex};
pub use cgroup::{HOOKS, TestCgroup, attached_programs, cgroup_of, cgroup2_mount, spawn_in_cgroup};
pub use netns::{TestHost, TestNetns};
pub use servers::{Accepted, TestServer, tcp_socket_owner};
pub use upstream::{Alpn, TestCa, TestUpstream, UpstreamOptions, UpstreamRequest};

/// Deadline for one network operation or short-lived command in a test.
pub const SHORT: Duration = Duration::from_secs(10);

/// Fails the calling test unless it can really run: root, a cgroup2 mount, BPF, the binaries.
///
/// Call it first in every test. A test that cannot run must fail, not pass silently.
pub fn require_privileges() {
    assert!(
        nix::unistd::geteuid().is_root(),
        "agent-broker's end-to-end tests must run as root: they create cgroups, load eBPF \
         programs and start brokerd (they fail instead of skipping; run them with sudo or in CI \
         as root)"
    );
    let mount = cgroup2_mount();
    assert!(
        mount.join("cgroup.procs").exists(),
        "the cgroup2 mount {} has no cgroup.procs",
        mount.display()
    );
    assert!(
        std::path::Path::new("/proc/sys/kernel/unprivileged_bpf_disabled").exists(),
        "this kernel has no bpf() syscall (CONFIG_BPF_SYSCALL), which brokerd needs"
    );
    for name in ["brokerd", "brokerctl"] {
        bin(name);
    }
}

/// A command line that runs `program` as `uid` (and the gid of the same number), without
/// supplementary groups: `setpriv --reuid UID --regid UID --clear-groups PROGRAM`.
pub fn as_uid(uid: u32, program: &std::path::Path) -> Vec<std::ffi::OsString> {
    let id = uid.to_string();
    ["setpriv", "--reuid", &id, "--regid", &id, "--clear-groups"]
        .iter()
        .map(std::ffi::OsString::from)
        .chain([program.as_os_str().to_os_string()])
        .collect()
}

/// Path of one of the project's binaries. Panics with a clear message when it is missing.
pub fn bin(name: &str) -> PathBuf {
    let dir = match std::env::var_os("AGENT_BROKER_BIN_DIR") {
        Some(d) => PathBuf::from(d),
        None => workspace_dir().join("target").join("debug"),
    };
    let path = dir.join(name);
    assert!(
        path.is_file(),
        "{name} not found at {}: build it with `cargo xtask build`, or point \
         AGENT_BROKER_BIN_DIR at the directory holding brokerd and brokerctl",
        path.display()
    );
    path
}

/// The workspace root (this crate lives in `<workspace>/tests`).
pub fn workspace_dir() -> PathBuf {
    let here = PathBuf::from(env!("CARGO_MANIFEST_DIR"));
    here.parent().map(PathBuf::from).unwrap_or(here)
}

/// A name unique to this test process and call: `abtest-<pid>-<n>`. Used for cgroups, pin dirs
/// and network namespaces, so concurrent test runs never collide and leftovers are recognisable.
pub fn unique_name() -> String {
    static NEXT: AtomicU32 = AtomicU32::new(0);
    format!(
        "abtest-{}-{}",
        std::process::id(),
        NEXT.fetch_add(1, Ordering::Relaxed)
    )
}

/// The same address with a v4-mapped IPv6 address (`::ffff:a.b.c.d`) written as IPv4, so
/// addresses seen through an AF_INET6 socket compare equal to the IPv4 ones they stand for.
pub fn canon(addr: SocketAddr) -> SocketAddr {
    match addr {
        SocketAddr::V6(a) => match a.ip().to_ipv4_mapped() {
            Some(v4) => SocketAddr::from((v4, a.port())),
            None => addr,
        },
        SocketAddr::V4(_) => addr,
    }
}

/// Waits until `done` holds, checking every 200 ms; panics naming `what` after `timeout`.
pub fn wait_for(what: &str, timeout: Duration, mut done: impl FnMut() -> bool) {
    let deadline = Instant::now() + timeout;
    while !done() {
        assert!(Instant::now() < deadline, "{what} within {timeout:?}");
        thread::sleep(Duration::from_millis(200));
    }
}

/// Polls `f` every 20 ms until it returns `Some`, or `None` after `timeout`.
pub fn poll_until<T>(timeout: Duration, mut f: impl FnMut() -> Option<T>) -> Option<T> {
    let deadline = Instant::now() + timeout;
    loop {
        if let Some(v) = f() {
            return Some(v);
        }
        if Instant::now() >= deadline {
            return None;
        }
        thread::sleep(Duration::from_millis(20));
    }
}

/// Runs `cmd` to completion with piped stdout/stderr, killing it (by pid) and panicking if it
/// takes longer than `timeout`.
pub fn run_with_timeout(cmd: &mut Command, timeout: Duration) -> Output {
    let child = cmd
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap_or_else(|e| panic!("cannot start {cmd:?}: {e}"));
    wait_with_timeout(child, timeout, &format!("{cmd:?}"))
}

/// Waits for a child started with piped stdout/stderr, collecting both. Kills it (by pid) and
/// panics after `timeout`.
pub fn wait_with_timeout(mut child: Child, timeout: Duration, what: &str) -> Output {
    fn drain(mut r: impl std::io::Read + Send + 'static) -> thread::JoinHandle<Vec<u8>> {
        thread::spawn(move || {
            let mut buf = Vec::new();
            let _ = r.read_to_end(&mut buf);
            buf
        })
    }
    let out = child.stdout.take().map(drain);
    let err = child.stderr.take().map(drain);
    let deadline = Instant::now() + timeout;
    let status = loop {
        match child.try_wait() {
            Ok(Some(status)) => break status,
            Ok(None) if Instant::now() < deadline => thread::sleep(Duration::from_millis(10)),
            Ok(None) => {
                let _ = child.kill();
                let _ = child.wait();
                let stderr = err.and_then(|h| h.join().ok()).unwrap_or_default();
                panic!(
                    "{what} did not finish within {timeout:?} (killed pid {}); its stderr:\n{}",
                    child.id(),
                    String::from_utf8_lossy(&stderr)
                );
            }
            Err(e) => panic!("waiting for {what}: {e}"),
        }
    };
    Output {
        status,
        stdout: out.and_then(|h| h.join().ok()).unwrap_or_default(),
        stderr: err.and_then(|h| h.join().ok()).unwrap_or_default(),
    }
}

/// Reads a whole file as text, or an explanation of why it could not.
pub fn read_text(path: &std::path::Path) -> String {
    let mut s = String::new();
    match std::fs::File::open(path).and_then(|mut f| f.read_to_string(&mut s)) {
        Ok(_) => s,
        Err(e) => format!("<cannot read {}: {e}>", path.display()),
    }
}
