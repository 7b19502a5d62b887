//! Agents: python3 processes started inside a cgroup that make one TCP connection and print, as
//! one JSON line, what they saw.
//!
//! The connection carries one plain HTTP/1.1 request, `GET /<payload>`, to a
//! [`TestServer`](crate::TestServer) "who are you" server, whose answer is
//! `peer=<peer it saw>\n<payload>`: the agent reports the first line as `greeting` and the rest
//! as `echo`. Modes: connect from the main thread, from a second thread, or from a child process.

use std::{
    net::SocketAddr,
    path::{Path, PathBuf},
    process::{Command, Stdio},
    sync::{
        OnceLock,
        atomic::{AtomicU32, Ordering},
    },
};

use serde::Deserialize;

use crate::{SHORT, run_with_timeout, spawn_in_cgroup, wait_with_timeout};

/// The agent program. Arguments: MODE FAMILY HOST PORT HOSTHEADER PAYLOAD; prints one JSON object.
const AGENT_PY: &str = r#"
import http.client, json, os, socket, subprocess, sys, threading

def fmt(addr):
    if len(addr) == 2:
        return "%s:%d" % addr
    return "[%s]:%d" % (addr[0], addr[1])

def connect(family, host, port, host_header, payload):
    out = {"pid": os.getpid(), "tid": threading.get_native_id()}
    fam = socket.AF_INET if family == "4" else socket.AF_INET6
    s = socket.socket(fam, socket.SOCK_STREAM)
    s.settimeout(5)
    try:
        s.connect((host, port))
    except OSError as e:
        out["errno"] = e.errno
        out["error"] = str(e)
        s.close()
        return out
    out["local"] = fmt(s.getsockname())
    out["peer"] = fmt(s.getpeername())
    conn = http.client.HTTPConnection(host_header, timeout=5)
    conn.sock = s
    try:
        conn.putrequest("GET", "/" + payload, skip_host=True, skip_accept_encoding=True)
        conn.putheader("Host", host_header)
        conn.putheader("Connection", "close")
        conn.endheaders()
        r = conn.getresponse()
        body = r.read().decode("utf-8", "replace")
        out["status"] = r.status
        out["body"] = body
        if r.status == 200:
            line, _, rest = body.partition("\n")
            out["greeting"] = line
            out["echo"] = rest
    except (http.client.RemoteDisconnected, http.client.BadStatusLine, ConnectionResetError, BrokenPipeError):
        out["closed_early"] = True
    except OSError as e:
        out["errno"] = e.errno
        out["error"] = str(e)
    s.close()
    return out

mode, family, host, port, host_header, payload = sys.argv[1], sys.argv[2], sys.argv[3], int(sys.argv[4]), sys.argv[5], sys.argv[6]
if mode == "connect":
    res = connect(family, host, port, host_header, payload)
elif mode == "thread":
    box = {}
    t = threading.Thread(target=lambda: box.update(connect(family, host, port, host_header, payload)))
    t.start()
    t.join()
    res = dict(box)
    res["main_tid"] = threading.get_native_id()
elif mode == "child":
    p = subprocess.run(
        [sys.executable, "-c", os.environ["ABTEST_AGENT_SRC"], "connect", family, host, str(port), host_header, payload],
        stdout=subprocess.PIPE, check=True, timeout=20)
    res = json.loads(p.stdout)
    res["parent_pid"] = os.getpid()
else:
    raise SystemExit("unknown mode " + mode)
print(json.dumps(res), flush=True)
"#;

/// Where the agent makes its connection.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Mode {
    /// From the main thread of the process the test started.
    Connect,
    /// From a second thread of that process.
    Thread,
    /// From a child process (a second python3) of that process.
    Child,
}

impl Mode {
    fn arg(self) -> &'static str {
        match self {
            Mode::Connect => "connect",
            Mode::Thread => "thread",
            Mode::Child => "child",
        }
    }
}

/// What the agent reported. Addresses are as python shows them (v4-mapped stays IPv6).
#[derive(Clone, Debug, Deserialize)]
pub struct AgentReport {
    /// pid of the process that connected.
    pub pid: u32,
    /// Thread id (gettid) of the thread that connected.
    pub tid: u32,
    /// getsockname after connect.
    pub local: Option<SocketAddr>,
    /// getpeername after connect.
    pub peer: Option<SocketAddr>,
    /// HTTP status of the answer, when one came.
    pub status: Option<u16>,
    /// The whole answer body (e.g. brokerd's JSON denial).
    pub body: Option<String>,
    /// With a 200: the first line of the body, e.g. `peer=127.0.0.1:4242`.
    pub greeting: Option<String>,
    /// With a 200: the rest of the body, the payload as the server received it.
    pub echo: Option<String>,
    /// errno of a failed connect/recv (None with a timeout).
    pub errno: Option<i32>,
    pub error: Option<String>,
    /// The connection closed before any HTTP answer arrived.
    #[serde(default)]
    pub closed_early: bool,
    /// Thread mode: tid of the main thread.
    pub main_tid: Option<u32>,
    /// Child mode: pid of the parent process (the one the test started).
    pub parent_pid: Option<u32>,
}

/// One agent run: the pid the test spawned, the payload it sent, and its report.
#[derive(Clone, Debug)]
pub struct AgentRun {
    pub spawned_pid: u32,
    pub payload: String,
    pub report: AgentReport,
}

impl AgentRun {
    /// Panics unless the connection was made and the request/answer round trip completed.
    pub fn assert_round_trip(&self, what: &str) {
        let r = &self.report;
        assert!(
            r.errno.is_none() && r.error.is_none() && !r.closed_early,
            "{what}: the agent's connection failed: {r:?}"
        );
        assert_eq!(r.status, Some(200), "{what}: HTTP status: {r:?}");
        assert_eq!(
            r.echo.as_deref(),
            Some(self.payload.as_str()),
            "{what}: echo round trip through the connection failed: {r:?}"
        );
    }

    /// The agent socket's local address; panics if the connect failed.
    pub fn local(&self) -> SocketAddr {
        self.report
            .local
            .unwrap_or_else(|| panic!("the agent has no local address: {:?}", self.report))
    }
}

/// The real python3 interpreter (not a pyenv shim script), so the pid the test spawns is the
/// interpreter's pid.
pub fn python() -> &'static Path {
    static PYTHON: OnceLock<PathBuf> = OnceLock::new();
    PYTHON.get_or_init(|| {
        let out = run_with_timeout(
            Command::new("python3").args(["-c", "import sys; print(sys.executable)"]),
            SHORT,
        );
        assert!(
            out.status.success(),
            "python3 is needed for the agents: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        PathBuf::from(String::from_utf8_lossy(&out.stdout).trim())
    })
}

/// A python3 an unprivileged agent can execute (the system one; a pyenv under /root is not
/// reachable for the uid `brokerctl run` gives agents).
pub fn agent_python() -> &'static Path {
    let system = Path::new("/usr/bin/python3");
    if system.exists() { system } else { python() }
}

/// Starts a python agent in cgroup `rel` that connects to `dst` (IPv4, IPv6 or v4-mapped, which
/// python connects to through an AF_INET6 socket) in the given mode, and returns its report.
///
/// The request's Host header names the address `dst` stands for (a v4-mapped address as its
/// IPv4 form), so policy rules written for 127.0.0.1 and ::1 apply.
pub fn connect(rel: &str, mode: Mode, dst: SocketAddr) -> AgentRun {
    static NEXT: AtomicU32 = AtomicU32::new(0);
    let payload = format!(
        "hello-{}-{}",
        std::process::id(),
        NEXT.fetch_add(1, Ordering::Relaxed)
    );
    let family = if dst.is_ipv4() { "4" } else { "6" };
    let host_header = crate::canon(dst).to_string();
    let mut cmd = Command::new(python());
    cmd.env("ABTEST_AGENT_SRC", AGENT_PY)
        .args(["-c", AGENT_PY, mode.arg(), family])
        .arg(dst.ip().to_string())
        .arg(dst.port().to_string())
        .arg(&host_header)
        .arg(&payload)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    let child = spawn_in_cgroup(rel, &mut cmd);
    let spawned_pid = child.id();
    let out = wait_with_timeout(child, SHORT * 2, "python agent");
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "python agent ({mode:?} to {dst} in {rel}) failed: {}\nstdout: {stdout}\nstderr: {}",
        out.status,
        String::from_utf8_lossy(&out.stderr)
    );
    let report: AgentReport = serde_json::from_str(stdout.trim()).unwrap_or_else(|e| {
        panic!(
            "python agent printed no report ({e}): {stdout}\nstderr: {}",
            String::from_utf8_lossy(&out.stderr)
        )
    });
    AgentRun {
        spawned_pid,
        payload,
        report,
    }
}

/// A python3 script: sends an A query for each name given to `127.0.0.53:53` (the agent's
/// DNS, whichever way it is captured) and prints each answer's RCODE, one per line.
pub const DNS_RCODES_PY: &str = r#"
import socket, struct, sys
s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
s.settimeout(5)
for i, name in enumerate(sys.argv[1:]):
    q = struct.pack(">HHHHHH", 100 + i, 0x0100, 1, 0, 0, 0)
    for label in name.split("."):
        q += bytes([len(label)]) + label.encode()
    s.sendto(q + b"\x00" + struct.pack(">HH", 1, 1), ("127.0.0.53", 53))
    while True:
        r = s.recv(4096)
        if struct.unpack(">H", r[:2])[0] == 100 + i:
            print(r[3] & 0x0f, flush=True)
            break
"#;
