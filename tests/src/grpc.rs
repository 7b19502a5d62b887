//! gRPC for the compatibility tests: Python's `grpcio`, pinned, in a virtualenv of its own (see
//! [`crate::venv`]), and [`GrpcServer`], a real gRPC server over TLS (HTTP/2) with a
//! certificate from a [`TestCa`], started as a child process of the test.
//!
//! The server has no generated code: generic handlers with raw-bytes messages (JSON inside)
//! under the service `abtest.Echo`:
//!
//! - `Hash` (unary): answers JSON with the sha256 (hex) of the `authorization` metadata it
//!   received, never the value;
//! - `Count` (server streaming): the request is JSON `{"n": N, "pause_ms": MS}`; it answers N
//!   messages `{"i": i, "sent": <CLOCK_MONOTONIC seconds>, "authorization_sha256": ...}`,
//!   pausing MS between them.
//!
//! Each call is also recorded as a [`GrpcCall`] (one JSON line on the server's stdout, read by
//! the harness): the method, sha256 of every metadata value by key, the peer and which process
//! owns the peer's socket, and for `Count` when each message was sent.

use std::{
    collections::BTreeMap,
    io::{BufRead as _, BufReader},
    net::{IpAddr, SocketAddr},
    path::{Path, PathBuf},
    process::{Child, Command, Stdio},
    sync::{Arc, Mutex, OnceLock},
    thread,
    time::Duration,
};

use serde::Deserialize;

use crate::{SHORT, TestCa, poll_until, tcp_socket_owner};

/// grpcio, pinned (1.85.1 has manylinux wheels for CPython 3.9 to 3.14).
const PACKAGES: [&str; 1] = ["grpcio==1.85.1"];

/// The python of the virtualenv with grpcio, created on first use.
pub fn grpc_python() -> &'static Path {
    static PYTHON: OnceLock<PathBuf> = OnceLock::new();
    PYTHON.get_or_init(|| crate::venv::venv("grpc", &PACKAGES))
}

/// The server: prints `{"port": P}` once it listens, then one line per call.
const SERVER_PY: &str = r#"
import hashlib, json, sys, time
from concurrent import futures
import grpc
cfg = json.loads(sys.argv[1])

def sha(v):
    return hashlib.sha256(v if isinstance(v, bytes) else v.encode()).hexdigest()

def metadata(context):
    out = {}
    for k, v in context.invocation_metadata():
        out.setdefault(k, []).append(sha(v))
    return out

def auth(md):
    return (md.get("authorization") or [None])[0]

def log(record):
    print(json.dumps(record), flush=True)

def hash_(request, context):
    md = metadata(context)
    log({"method": "Hash", "metadata": md, "peer": context.peer(), "sent": []})
    return json.dumps({"authorization_sha256": auth(md), "request": request.decode()}).encode()

def count(request, context):
    md = metadata(context)
    req = json.loads(request)
    sent = []
    for i in range(req["n"]):
        if i:
            time.sleep(req["pause_ms"] / 1000)
        sent.append(time.monotonic())
        yield json.dumps({"i": i, "sent": sent[-1], "authorization_sha256": auth(md)}).encode()
    log({"method": "Count", "metadata": md, "peer": context.peer(), "sent": sent})

handler = grpc.method_handlers_generic_handler("abtest.Echo", {
    "Hash": grpc.unary_unary_rpc_method_handler(hash_),
    "Count": grpc.unary_stream_rpc_method_handler(count),
})
server = grpc.server(futures.ThreadPoolExecutor(max_workers=8))
server.add_generic_rpc_handlers((handler,))
with open(cfg["key"], "rb") as k, open(cfg["chain"], "rb") as c:
    creds = grpc.ssl_server_credentials([(k.read(), c.read())])
port = server.add_secure_port(f"{cfg['ip']}:0", creds)
server.start()
print(json.dumps({"port": port}), flush=True)
server.wait_for_termination()
"#;

/// One call the server answered.
#[derive(Clone, Debug, Deserialize)]
pub struct GrpcCall {
    /// `Hash` or `Count`.
    pub method: String,
    /// sha256 (hex) of each metadata value received, by key (lowercase).
    pub metadata: BTreeMap<String, Vec<String>>,
    /// The peer as grpc names it (`ipv4:127.0.0.1:54321`).
    pub peer: String,
    /// `Count`: when each message was sent (CLOCK_MONOTONIC seconds).
    pub sent: Vec<f64>,
    /// pid of the process owning the peer's socket, looked up when the record arrived.
    #[serde(skip)]
    pub peer_owner: Option<u32>,
}

impl GrpcCall {
    /// sha256 of the first value of metadata `key`.
    pub fn hash_of(&self, key: &str) -> Option<&str> {
        self.metadata
            .get(key)
            .and_then(|v| v.first())
            .map(String::as_str)
    }
}

/// A running gRPC server (Python grpcio) over TLS; killed (by pid) when dropped.
pub struct GrpcServer {
    child: Child,
    addr: SocketAddr,
    calls: Arc<Mutex<Vec<GrpcCall>>>,
    stderr: Arc<Mutex<Vec<u8>>>,
    _dir: tempfile::TempDir,
}

impl GrpcServer {
    /// Starts the server on `ip` (port chosen by the kernel) with a certificate from `ca` for
    /// `names`, and waits until it listens.
    pub fn start(ca: &TestCa, ip: IpAddr, names: &[String]) -> Self {
        let dir = tempfile::Builder::new()
            .prefix("abtest-grpc-")
            .tempdir()
            .unwrap_or_else(|e| panic!("temp dir for the gRPC server: {e}"));
        let (chain, key) = ca.leaf_pem(names);
        let write = |name: &str, text: &str| {
            let path = dir.path().join(name);
            std::fs::write(&path, text)
                .unwrap_or_else(|e| panic!("cannot write {}: {e}", path.display()));
            path
        };
        let cfg = serde_json::json!({
            "ip": ip.to_string(),
            "chain": write("chain.pem", &chain),
            "key": write("key.pem", &key),
        });
        let mut child = Command::new(grpc_python())
            .args(["-c", SERVER_PY])
            .arg(cfg.to_string())
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap_or_else(|e| panic!("cannot start the gRPC server: {e}"));
        let stderr = Arc::new(Mutex::new(Vec::new()));
        if let Some(mut err) = child.stderr.take() {
            let stderr = stderr.clone();
            thread::spawn(move || {
                let mut buf = [0u8; 4096];
                while let Ok(n) = std::io::Read::read(&mut err, &mut buf) {
                    if n == 0 {
                        break;
                    }
                    if let Ok(mut s) = stderr.lock() {
                        s.extend_from_slice(&buf[..n]);
                    }
                }
            });
        }
        let calls = Arc::new(Mutex::new(Vec::new()));
        let port = Arc::new(Mutex::new(None::<u16>));
        if let Some(out) = child.stdout.take() {
            let (calls, port) = (calls.clone(), port.clone());
            thread::spawn(move || {
                for line in BufReader::new(out).lines() {
                    let Ok(line) = line else { break };
                    let Ok(v) = serde_json::from_str::<serde_json::Value>(&line) else {
                        continue;
                    };
                    if let Some(p) = v["port"].as_u64() {
                        if let Ok(mut port) = port.lock() {
                            *port = u16::try_from(p).ok();
                        }
                        continue;
                    }
                    if let Ok(mut call) = serde_json::from_value::<GrpcCall>(v) {
                        // Now, while the connection the call came on is surely open.
                        call.peer_owner = peer_addr(&call.peer).and_then(tcp_socket_owner);
                        if let Ok(mut calls) = calls.lock() {
                            calls.push(call);
                        }
                    }
                }
            });
        }
        let port = poll_until(Duration::from_secs(30), || {
            port.lock().ok().and_then(|p| *p)
        });
        let mut server = Self {
            child,
            addr: SocketAddr::new(ip, 0),
            calls,
            stderr,
            _dir: dir,
        };
        match port {
            Some(port) if port != 0 => server.addr.set_port(port),
            _ => panic!(
                "the gRPC server did not start listening on {ip}; its stderr:\n{}",
                server.stderr()
            ),
        }
        server
    }

    /// Where it listens.
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    pub fn port(&self) -> u16 {
        self.addr.port()
    }

    /// Every call answered so far, oldest first.
    pub fn calls(&self) -> Vec<GrpcCall> {
        self.calls.lock().map(|c| c.clone()).unwrap_or_default()
    }

    /// Waits a little for the call to `method` (a streaming call is recorded when it ends).
    pub fn wait_call(&self, method: &str) -> Option<GrpcCall> {
        poll_until(SHORT, || {
            self.calls().into_iter().find(|c| c.method == method)
        })
    }

    /// What the server wrote to stderr so far (its tracebacks), for failure messages.
    pub fn stderr(&self) -> String {
        self.stderr
            .lock()
            .map(|s| String::from_utf8_lossy(&s).into_owned())
            .unwrap_or_default()
    }
}

impl Drop for GrpcServer {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// `ipv4:127.0.0.1:54321` (how grpc names an IPv4 peer) as a socket address.
fn peer_addr(peer: &str) -> Option<SocketAddr> {
    peer.strip_prefix("ipv4:")?.parse().ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ipv4_peers_parse_as_grpc_names_them() {
        assert_eq!(
            peer_addr("ipv4:127.0.0.1:54321"),
            Some(SocketAddr::from(([127, 0, 0, 1], 54321)))
        );
        assert_eq!(peer_addr("unix:/tmp/x"), None);
    }
}
