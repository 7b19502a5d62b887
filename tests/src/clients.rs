//! Real HTTPS clients run as agents: `brokerctl run --cgroup PATH --create -- CLIENT ...`, so
//! the client is inside the tagged cgroup from its first instruction, as an operator would
//! start it.
//!
//! Each run keeps what a leak scan needs: stdout, stderr, the environment the client was
//! started with (dumped by a `sh` wrapper that then `exec`s the client, keeping the pid) and
//! samples of `/proc/<pid>/environ` of every process in the cgroup taken while it ran.
//!
//! Clients: curl (`--resolve`, `--http1.1` / `--http2`), python3 (standard library only:
//! `http.client` with a custom connect, `ssl` default context), node (`https` with a `lookup`
//! returning the test address, `http2` with a custom connection), and the statically linked
//! `agent-client` binary of this crate. All but curl print an [`HttpReport`] as JSON; curl's
//! output is parsed into one.

use std::{
    collections::BTreeMap,
    fs,
    path::PathBuf,
    process::{Command, Output, Stdio},
    sync::OnceLock,
    thread,
    time::{Duration, Instant},
};

use serde::Deserialize;

use crate::{Broker, Canary, bin, cgroup::cgroup_dir, redact, workspace_dir};

/// Deadline for one client run.
pub const CLIENT_TIMEOUT: Duration = Duration::from_secs(40);

/// What a client saw. Never print it with `{:?}` directly: use [`HttpReport::show`], which
/// redacts canaries.
#[derive(Clone, Debug, Default, Deserialize)]
pub struct HttpReport {
    /// HTTP status (0: no answer).
    #[serde(default)]
    pub status: u16,
    /// `HTTP/1.1`, `HTTP/2`, ... as the client reports it.
    #[serde(default)]
    pub version: Option<String>,
    /// Response headers, lowercase names.
    #[serde(default)]
    pub headers: BTreeMap<String, String>,
    #[serde(default)]
    pub body: String,
    /// When each piece of the body arrived, in ms after the first.
    #[serde(default)]
    pub chunk_ms: Vec<f64>,
    /// WebSocket: the echoed message.
    #[serde(default)]
    pub ws_echo: Option<String>,
    #[serde(default)]
    pub error: Option<String>,
}

impl HttpReport {
    /// Debug text with canaries redacted, for failure messages.
    pub fn show(&self) -> String {
        redact(&format!("{self:?}"))
    }

    /// The body as JSON; panics (redacted) when it is not.
    pub fn json(&self) -> serde_json::Value {
        serde_json::from_str(&self.body)
            .unwrap_or_else(|e| panic!("the body is not JSON ({e}): {}", self.show()))
    }

    /// Whether the version is HTTP/2 in any spelling (`HTTP/2`, `HTTP/2.0`, `2`).
    pub fn is_h2(&self) -> bool {
        self.version
            .as_deref()
            .is_some_and(|v| v == "2" || v.starts_with("HTTP/2"))
    }

    /// Whether the version is HTTP/1.1 in any spelling.
    pub fn is_h1(&self) -> bool {
        self.version
            .as_deref()
            .is_some_and(|v| v == "1.1" || v == "HTTP/1.1")
    }

    /// Panics unless this is brokerd's 403 denial: JSON with `error` = "denied by agent-broker",
    /// a non-empty `reason`, and `agent` = `cgroup`. Returns the reason.
    pub fn assert_denied(&self, cgroup: &str, what: &str) -> String {
        assert_eq!(
            self.status,
            403,
            "{what}: expected brokerd's 403: {}",
            self.show()
        );
        let v: serde_json::Value = serde_json::from_str(&self.body)
            .unwrap_or_else(|e| panic!("{what}: the 403 body is not JSON ({e}): {}", self.show()));
        assert_eq!(
            v["error"].as_str(),
            Some("denied by agent-broker"),
            "{what}: {}",
            self.show()
        );
        let reason = v["reason"].as_str().unwrap_or_default().to_string();
        assert!(
            !reason.trim().is_empty(),
            "{what}: the denial gives no reason: {}",
            self.show()
        );
        assert_eq!(
            v["agent"].as_str(),
            Some(cgroup),
            "{what}: the denial names the agent's cgroup: {}",
            self.show()
        );
        reason
    }

    /// Panics unless this is brokerd's 429 for a limit: a `Retry-After` header of whole seconds
    /// (at least 1) and the denial JSON (`error` = "denied by agent-broker", a non-empty
    /// `reason`, `agent` = `cgroup`). Returns the reason and the Retry-After seconds.
    pub fn assert_limited(&self, cgroup: &str, what: &str) -> (String, u64) {
        assert_eq!(
            self.status,
            429,
            "{what}: expected brokerd's 429: {}",
            self.show()
        );
        let retry_after = self.headers.get("retry-after").unwrap_or_else(|| {
            panic!("{what}: the 429 has no Retry-After header: {}", self.show())
        });
        let secs: u64 = retry_after.trim().parse().unwrap_or_else(|e| {
            panic!(
                "{what}: Retry-After {retry_after:?} is not a number of seconds ({e}): {}",
                self.show()
            )
        });
        assert!(
            secs >= 1,
            "{what}: Retry-After must be at least 1 s: {}",
            self.show()
        );
        let v: serde_json::Value = serde_json::from_str(&self.body)
            .unwrap_or_else(|e| panic!("{what}: the 429 body is not JSON ({e}): {}", self.show()));
        assert_eq!(
            v["error"].as_str(),
            Some("denied by agent-broker"),
            "{what}: {}",
            self.show()
        );
        let reason = v["reason"].as_str().unwrap_or_default().to_string();
        assert!(
            !reason.trim().is_empty(),
            "{what}: the 429 gives no reason: {}",
            self.show()
        );
        assert_eq!(
            v["agent"].as_str(),
            Some(cgroup),
            "{what}: the 429 names the agent's cgroup: {}",
            self.show()
        );
        (reason, secs)
    }
}

/// One client run inside a cgroup.
pub struct ClientRun {
    pub what: String,
    /// pid of the client (brokerctl execs sh, which execs the client).
    pub pid: u32,
    pub output: Output,
    /// The environment the client was started with (NUL-separated).
    pub env_dump: Vec<u8>,
    /// Distinct `/proc/<pid>/environ` contents of processes in the cgroup seen while it ran.
    pub env_samples: Vec<Vec<u8>>,
    pub elapsed: Duration,
}

impl ClientRun {
    /// stdout and stderr, canaries redacted, for failure messages.
    pub fn show(&self) -> String {
        format!(
            "{} (pid {}, {}): stdout:\n{}\nstderr:\n{}",
            self.what,
            self.pid,
            self.output.status,
            redact(&String::from_utf8_lossy(&self.output.stdout)),
            redact(&String::from_utf8_lossy(&self.output.stderr))
        )
    }

    /// Panics (without printing it) when `secret` occurs in the client's stdout, stderr or
    /// environment.
    pub fn assert_no_secret(&self, secret: &Canary) {
        secret.assert_absent(&self.output.stdout, &format!("{}: stdout", self.what));
        secret.assert_absent(&self.output.stderr, &format!("{}: stderr", self.what));
        assert!(
            !self.env_dump.is_empty(),
            "{}: the environment dump is empty (the sh wrapper did not run?)",
            self.what
        );
        secret.assert_absent(&self.env_dump, &format!("{}: environment", self.what));
        for (i, env) in self.env_samples.iter().enumerate() {
            secret.assert_absent(
                env,
                &format!("{}: /proc/<pid>/environ sample {i}", self.what),
            );
        }
    }

    /// The JSON report printed by python, node or agent-client.
    pub fn report(&self) -> HttpReport {
        let stdout = String::from_utf8_lossy(&self.output.stdout);
        let line = stdout
            .lines()
            .rev()
            .find(|l| l.trim_start().starts_with('{'))
            .unwrap_or_else(|| panic!("{} printed no JSON report: {}", self.what, self.show()));
        serde_json::from_str(line)
            .unwrap_or_else(|e| panic!("{}: bad JSON report ({e}): {}", self.what, self.show()))
    }
}

/// Starts `argv` inside `cgroup` with `brokerctl run --create`, with a clean environment (PATH,
/// HOME, LANG) plus `env`, and waits for it.
///
/// brokerctl refuses to tag a cgroup below a tagged one (the tag already covers it), so when an
/// ancestor of `cgroup` is tagged the harness creates the cgroup and starts the same command
/// inside it itself ([`crate::spawn_in_cgroup`]), as a process of the agent would end up there.
pub fn run_in_cgroup(
    broker: &Broker,
    cgroup: &str,
    what: &str,
    env: &[(&str, String)],
    argv: &[String],
) -> ClientRun {
    let scratch = broker.scratch_dir();
    let dump = scratch.join(format!("env-{}", crate::unique_name()));
    let under_tag = broker
        .status()
        .cgroups
        .iter()
        .any(|c| cgroup.starts_with(&format!("{}/", c.path)));
    let mut cmd = if under_tag {
        fs::create_dir_all(cgroup_dir(cgroup))
            .unwrap_or_else(|e| panic!("{what}: cannot create cgroup {cgroup}: {e}"));
        Command::new("sh")
    } else if let Some(uid) = broker.unprivileged() {
        // Issue 19: the agent is started by its user, in a sandbox of its own, and runs as the
        // agent named like the cgroup would be.
        let argv = crate::as_uid(uid, &bin("brokerctl"));
        let mut cmd = Command::new(&argv[0]);
        cmd.args(&argv[1..]);
        cmd
    } else {
        Command::new(bin("brokerctl"))
    };
    cmd.env_clear()
        .env(
            "PATH",
            std::env::var("PATH").unwrap_or_else(|_| "/usr/local/bin:/usr/bin:/bin".into()),
        )
        .env("HOME", &scratch)
        .env("LANG", "C.UTF-8")
        .env("ABTEST_ENV_DUMP", &dump);
    for (k, v) in env {
        cmd.env(k, v);
    }
    if broker.unprivileged().is_some() {
        cmd.arg("--run-dir").arg(broker.run_dir()).args([
            "run",
            "--unprivileged",
            "--as",
            cgroup,
            "--",
            "sh",
        ]);
    } else if !under_tag {
        cmd.arg("--run-dir")
            .arg(broker.run_dir())
            .args(["run", "--cgroup", cgroup, "--create", "--", "sh"]);
    }
    cmd.args([
        "-c",
        r#"echo $$ > "$ABTEST_ENV_DUMP.pid" && cat "/proc/$$/environ" > "$ABTEST_ENV_DUMP" && exec "$@""#,
        "sh",
    ])
    .args(argv)
    .stdin(Stdio::null())
    .stdout(Stdio::piped())
    .stderr(Stdio::piped());
    let started = Instant::now();
    let mut child = if under_tag {
        crate::spawn_in_cgroup(cgroup, &mut cmd)
    } else {
        cmd.spawn()
            .unwrap_or_else(|e| panic!("{what}: cannot start brokerctl run: {e}"))
    };
    let pid = child.id();
    let drain = |r: Option<Box<dyn std::io::Read + Send>>| {
        thread::spawn(move || {
            let mut buf = Vec::new();
            if let Some(mut r) = r {
                let _ = r.read_to_end(&mut buf);
            }
            buf
        })
    };
    let out = drain(
        child
            .stdout
            .take()
            .map(|s| Box::new(s) as Box<dyn std::io::Read + Send>),
    );
    let err = drain(
        child
            .stderr
            .take()
            .map(|s| Box::new(s) as Box<dyn std::io::Read + Send>),
    );
    let procs = cgroup_dir(cgroup).join("cgroup.procs");
    let mut samples: Vec<Vec<u8>> = Vec::new();
    let status = loop {
        for p in fs::read_to_string(&procs).unwrap_or_default().lines() {
            if let Ok(env) = fs::read(format!("/proc/{}/environ", p.trim()))
                && !env.is_empty()
                && !samples.contains(&env)
            {
                samples.push(env);
            }
        }
        match child.try_wait() {
            Ok(Some(status)) => break status,
            Ok(None) if started.elapsed() < CLIENT_TIMEOUT => {
                thread::sleep(Duration::from_millis(10))
            }
            Ok(None) => {
                let _ = child.kill();
                let _ = child.wait();
                let stderr = err.join().unwrap_or_default();
                panic!(
                    "{what} did not finish within {CLIENT_TIMEOUT:?} (killed pid {pid}); its \
                     stderr:\n{}\nbrokerd's log:\n{}",
                    redact(&String::from_utf8_lossy(&stderr)),
                    broker.log()
                );
            }
            Err(e) => panic!("{what}: waiting for pid {pid}: {e}"),
        }
    };
    let output = Output {
        status,
        stdout: out.join().unwrap_or_default(),
        stderr: err.join().unwrap_or_default(),
    };
    let env_dump = fs::read(&dump).unwrap_or_default();
    let _ = fs::remove_file(&dump);
    // The client's own pid (the shell above execs it): under `brokerctl run` it is the
    // launcher's child, not the launcher.
    let pid_file = PathBuf::from(format!("{}.pid", dump.display()));
    let pid = fs::read_to_string(&pid_file)
        .ok()
        .and_then(|s| s.trim().parse().ok())
        .unwrap_or(pid);
    let _ = fs::remove_file(&pid_file);
    ClientRun {
        what: what.to_string(),
        pid,
        output,
        env_dump,
        env_samples: samples,
        elapsed: started.elapsed(),
    }
}

/// A request for one of the clients.
#[derive(Clone, Debug)]
pub struct Call {
    /// TLS server name and Host / :authority (e.g. `api.example.test`).
    pub host: String,
    /// Where the name "resolves" (the client dials this IP; brokerd's capture sees it as the
    /// original destination).
    pub ip: std::net::IpAddr,
    pub port: u16,
    /// Path and query, e.g. `/hash?key=x`.
    pub path: String,
    /// Request headers (name, value).
    pub headers: Vec<(String, String)>,
    pub proto: Proto,
    /// Request method (`GET` unless [`Call::method`] says otherwise).
    pub method: String,
    /// Request body, if any ([`Call::body`]).
    pub body: Option<String>,
}

/// Which HTTP version the client should ask for.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Proto {
    Http1,
    Http2,
}

impl Call {
    pub fn new(host: &str, ip: std::net::IpAddr, port: u16, path: &str) -> Self {
        Self {
            host: host.into(),
            ip,
            port,
            path: path.into(),
            headers: Vec::new(),
            proto: Proto::Http1,
            method: "GET".into(),
            body: None,
        }
    }

    /// Use this request method (curl, python3 and node; the static client only does GET).
    pub fn method(mut self, method: &str) -> Self {
        self.method = method.to_ascii_uppercase();
        self
    }

    /// Send this request body (curl, python3 and node).
    pub fn body(mut self, body: &str) -> Self {
        self.body = Some(body.into());
        self
    }

    pub fn header(mut self, name: &str, value: &str) -> Self {
        self.headers.push((name.into(), value.into()));
        self
    }

    pub fn proto(mut self, proto: Proto) -> Self {
        self.proto = proto;
        self
    }

    fn url(&self, scheme: &str) -> String {
        format!("{scheme}://{}:{}{}", self.host, self.port, self.path)
    }

    /// The call as the python and node clients read it (host, connect address, port, path,
    /// headers, h2, method, body).
    pub fn json(&self) -> String {
        let headers: serde_json::Map<String, serde_json::Value> = self
            .headers
            .iter()
            .map(|(k, v)| (k.clone(), serde_json::Value::String(v.clone())))
            .collect();
        serde_json::json!({
            "host": self.host,
            "connect": self.ip.to_string(),
            "port": self.port,
            "path": self.path,
            "headers": headers,
            "h2": self.proto == Proto::Http2,
            "method": self.method,
            "body": self.body,
        })
        .to_string()
    }
}

/// How a client trusts the broker CA.
#[derive(Clone, Debug)]
pub enum Trust {
    /// The exported broker CA PEM, through the client's environment variable.
    Env(PathBuf),
    /// The system store only (after `brokerctl ca install`).
    System,
}

impl Trust {
    pub fn var(&self, name: &str) -> Vec<(&'static str, String)> {
        match self {
            Trust::Env(p) => {
                let p = p.to_string_lossy().into_owned();
                match name {
                    "curl" => vec![("CURL_CA_BUNDLE", p)],
                    "node" => vec![("NODE_EXTRA_CA_CERTS", p)],
                    _ => vec![("SSL_CERT_FILE", p)],
                }
            }
            Trust::System => Vec::new(),
        }
    }
}

/// curl with `--resolve HOST:PORT:IP`, `-i`, and the status/version written to stderr.
pub fn curl(broker: &Broker, cgroup: &str, trust: &Trust, call: &Call) -> (ClientRun, HttpReport) {
    let mut argv = curl_args(call);
    argv.push("-w".into());
    argv.push("%{stderr}ABTEST status=%{http_code} version=%{http_version}\\n".into());
    argv.push(call.url("https"));
    let run = run_in_cgroup(broker, cgroup, "curl", &trust.var("curl"), &argv);
    let report = parse_curl(&run);
    (run, report)
}

/// curl's options for `call`, up to (not including) `-w` and the URL.
fn curl_args(call: &Call) -> Vec<String> {
    let ip = match call.ip {
        std::net::IpAddr::V6(v6) => format!("[{v6}]"),
        std::net::IpAddr::V4(v4) => v4.to_string(),
    };
    let mut argv: Vec<String> = [
        "curl",
        "-sS",
        "-i",
        "--noproxy",
        "*",
        "--max-time",
        "20",
        "--resolve",
    ]
    .iter()
    .map(|s| s.to_string())
    .collect();
    argv.push(format!("{}:{}:{ip}", call.host, call.port));
    argv.push(
        match call.proto {
            Proto::Http1 => "--http1.1",
            Proto::Http2 => "--http2",
        }
        .into(),
    );
    if call.method != "GET" {
        argv.push("-X".into());
        argv.push(call.method.clone());
    }
    if let Some(body) = &call.body {
        argv.push("--data-binary".into());
        argv.push(body.clone());
    }
    for (k, v) in &call.headers {
        argv.push("-H".into());
        argv.push(format!("{k}: {v}"));
    }
    argv
}

/// One curl process making `n` requests for `call` back to back (over one connection when
/// brokerd keeps it open), as a loop in an agent would. Each response (headers and body) goes
/// to its own file; stderr gets one `ABTEST` line per request, in order. Returns the run and
/// the `n` reports, in request order.
pub fn curl_repeat(
    broker: &Broker,
    cgroup: &str,
    trust: &Trust,
    call: &Call,
    n: usize,
) -> (ClientRun, Vec<HttpReport>) {
    let dir = broker
        .scratch_dir()
        .join(format!("curl-{}", crate::unique_name()));
    fs::create_dir_all(&dir).unwrap_or_else(|e| panic!("cannot create {}: {e}", dir.display()));
    {
        use std::os::unix::fs::PermissionsExt as _;
        // curl runs unprivileged under `brokerctl run` and writes its responses here.
        fs::set_permissions(&dir, fs::Permissions::from_mode(0o777))
            .unwrap_or_else(|e| panic!("cannot open up {}: {e}", dir.display()));
    }
    let mut argv = curl_args(call);
    argv.push("-w".into());
    argv.push("%{stderr}ABTEST status=%{http_code} version=%{http_version}\\n".into());
    let files: Vec<PathBuf> = (0..n).map(|i| dir.join(format!("response-{i}"))).collect();
    for file in &files {
        argv.push("-o".into());
        argv.push(file.to_string_lossy().into_owned());
        argv.push(call.url("https"));
    }
    let mut run = run_in_cgroup(
        broker,
        cgroup,
        &format!("curl ({n} requests)"),
        &trust.var("curl"),
        &argv,
    );
    let stderr = String::from_utf8_lossy(&run.output.stderr).into_owned();
    let lines: Vec<&str> = stderr
        .lines()
        .filter(|l| l.starts_with("ABTEST status="))
        .collect();
    let reports = files
        .iter()
        .enumerate()
        .map(|(i, file)| {
            let mut report = HttpReport::default();
            if let Some(line) = lines.get(i) {
                parse_status_line(line, &mut report);
            }
            let bytes = fs::read(file).unwrap_or_default();
            parse_head_and_body(&bytes, &mut report);
            // What curl wrote to the files is its output too (for leak scans of the run).
            run.output.stdout.extend_from_slice(&bytes);
            if report.status == 0 {
                report.error = Some(redact(&stderr));
            }
            report
        })
        .collect();
    let _ = fs::remove_dir_all(&dir);
    (run, reports)
}

/// Fields of an `ABTEST status=... version=...` line.
fn parse_status_line(line: &str, report: &mut HttpReport) {
    for field in line.split_whitespace().skip(1) {
        match field.split_once('=') {
            Some(("status", v)) => report.status = v.parse().unwrap_or(0),
            Some(("version", v)) => report.version = Some(v.to_string()),
            _ => {}
        }
    }
}

fn parse_curl(run: &ClientRun) -> HttpReport {
    let mut report = HttpReport::default();
    let stderr = String::from_utf8_lossy(&run.output.stderr);
    if let Some(line) = stderr.lines().find(|l| l.starts_with("ABTEST status=")) {
        parse_status_line(line, &mut report);
    }
    if !run.output.status.success() {
        report.error = Some(redact(&stderr));
    }
    parse_head_and_body(&run.output.stdout, &mut report);
    report
}

/// curl `-i` output: one or more header blocks (1xx, then the final one), then the body.
fn parse_head_and_body(output: &[u8], report: &mut HttpReport) {
    let mut rest: &[u8] = output;
    while let Some(end) = crate::canary::find(rest, b"\r\n\r\n") {
        let head = String::from_utf8_lossy(&rest[..end]).into_owned();
        if !head.starts_with("HTTP/") {
            break;
        }
        report.headers.clear();
        for line in head.lines().skip(1) {
            if let Some((k, v)) = line.split_once(':') {
                report
                    .headers
                    .insert(k.trim().to_ascii_lowercase(), v.trim().to_string());
            }
        }
        rest = &rest[end + 4..];
        let interim = head
            .split_whitespace()
            .nth(1)
            .is_some_and(|s| s.starts_with('1') && s != "101");
        if !interim {
            break;
        }
    }
    report.body = String::from_utf8_lossy(rest).into_owned();
}

/// The python3 client: `http.client` over a socket to `call.ip` wrapped with
/// `server_hostname=call.host`; modes `get`, `ws`. HTTP/1.1 only (the standard library has no h2).
const CLIENT_PY: &str = r#"
import base64, http.client, json, os, socket, ssl, sys, time

cfg = json.loads(sys.argv[1])
mode = sys.argv[2]
out = {"status": 0, "headers": {}, "body": "", "chunk_ms": []}
ctx = ssl.create_default_context()
ctx.set_alpn_protocols(["http/1.1"])

def tls_sock():
    raw = socket.create_connection((cfg["connect"], cfg["port"]), timeout=15)
    return ctx.wrap_socket(raw, server_hostname=cfg["host"])

class Conn(http.client.HTTPSConnection):
    def connect(self):
        self.sock = tls_sock()

def ws():
    s = tls_sock()
    key = base64.b64encode(os.urandom(16)).decode()
    lines = ["GET %s HTTP/1.1" % cfg["path"], "Host: %s:%d" % (cfg["host"], cfg["port"]),
             "Upgrade: websocket", "Connection: Upgrade", "Sec-WebSocket-Key: " + key,
             "Sec-WebSocket-Version: 13"]
    for k, v in cfg["headers"].items():
        lines.append("%s: %s" % (k, v))
    s.sendall(("\r\n".join(lines) + "\r\n\r\n").encode())
    buf = bytearray()
    while b"\r\n\r\n" not in buf:
        c = s.recv(4096)
        if not c:
            break
        buf += c
    head, _, rest = bytes(buf).partition(b"\r\n\r\n")
    hl = head.decode("latin-1").split("\r\n")
    first = hl[0].split()
    out["status"] = int(first[1]) if len(first) > 1 else 0
    out["version"] = first[0] if first else None
    out["headers"] = {k.strip().lower(): v.strip() for k, _, v in (l.partition(":") for l in hl[1:])}
    buf = bytearray(rest)
    def need(n):
        while len(buf) < n:
            c = s.recv(4096)
            if not c:
                raise EOFError("connection closed")
            buf.extend(c)
        chunk = bytes(buf[:n])
        del buf[:n]
        return chunk
    if out["status"] != 101:
        out["body"] = bytes(buf).decode("utf-8", "replace")
        return
    msg = cfg["message"].encode()
    mask = os.urandom(4)
    s.sendall(bytes([0x81, 0x80 | len(msg)]) + mask + bytes(b ^ mask[i % 4] for i, b in enumerate(msg)))
    b0, b1 = need(2)
    n = b1 & 0x7F
    if n == 126:
        n = int.from_bytes(need(2), "big")
    elif n == 127:
        n = int.from_bytes(need(8), "big")
    payload = need(n)
    if b0 & 0x0F != 1:
        raise ValueError("unexpected websocket opcode %d" % (b0 & 0x0F))
    out["ws_echo"] = payload.decode()

def get():
    c = Conn(cfg["host"], cfg["port"], context=ctx, timeout=15)
    body = cfg.get("body")
    c.request(cfg.get("method") or "GET", cfg["path"], body=None if body is None else body.encode(), headers=cfg["headers"])
    r = c.getresponse()
    out["status"] = r.status
    out["version"] = "HTTP/1.1" if r.version == 11 else "HTTP/%s" % r.version
    out["headers"] = {k.lower(): v for k, v in r.getheaders()}
    body = bytearray()
    t0 = None
    while True:
        chunk = r.read1(65536)
        if not chunk:
            break
        now = time.monotonic()
        if t0 is None:
            t0 = now
        out["chunk_ms"].append((now - t0) * 1000.0)
        body += chunk
    out["body"] = bytes(body).decode("utf-8", "replace")

try:
    ws() if mode == "ws" else get()
except Exception as e:
    out["error"] = "%s: %s" % (type(e).__name__, e)
print(json.dumps(out), flush=True)
"#;

/// The python3 client (standard library only). `mode`: "get" or "ws" (then `message` is sent).
pub fn python_client(
    broker: &Broker,
    cgroup: &str,
    trust: &Trust,
    call: &Call,
    mode: &str,
    message: Option<&str>,
) -> (ClientRun, HttpReport) {
    let mut cfg: serde_json::Value =
        serde_json::from_str(&call.json()).unwrap_or_else(|e| panic!("call json: {e}"));
    cfg["message"] = serde_json::Value::String(message.unwrap_or("ping").to_string());
    let argv = vec![
        crate::agent::agent_python().to_string_lossy().into_owned(),
        "-c".into(),
        CLIENT_PY.into(),
        cfg.to_string(),
        mode.into(),
    ];
    let run = run_in_cgroup(broker, cgroup, "python3", &trust.var("python"), &argv);
    let report = run.report();
    (run, report)
}

/// The node client: `https.request` with a `lookup` returning the test address (HTTP/1.1), or
/// `http2.connect` over a `tls.connect` to it (HTTP/2).
const CLIENT_JS: &str = r#"
const cfg = JSON.parse(process.argv[1]);
const out = { status: 0, headers: {}, body: "", chunk_ms: [] };
let finished = false;
const done = () => { if (finished) return; finished = true; console.log(JSON.stringify(out)); process.exit(0); };
const fail = (e) => { out.error = String((e && e.stack) || e); done(); };
setTimeout(() => fail("timed out"), 25000);
let t0 = null;
const parts = [];
const onData = (d) => { const now = performance.now(); if (t0 === null) t0 = now; out.chunk_ms.push(now - t0); parts.push(d); };
const onEnd = () => { out.body = Buffer.concat(parts).toString("utf8"); done(); };
if (cfg.h2) {
  const http2 = require("http2");
  const tls = require("tls");
  const session = http2.connect(`https://${cfg.host}:${cfg.port}`, {
    createConnection: () => tls.connect({ host: cfg.connect, port: cfg.port, servername: cfg.host, ALPNProtocols: ["h2"] }),
  });
  session.on("error", fail);
  const req = session.request(Object.assign({ ":method": cfg.method || "GET", ":path": cfg.path }, cfg.headers));
  req.on("response", (h) => {
    out.status = h[":status"];
    out.version = "HTTP/2";
    for (const k of Object.keys(h)) if (!k.startsWith(":")) out.headers[k] = String(h[k]);
  });
  req.on("data", onData);
  req.on("end", () => { session.close(); onEnd(); });
  req.on("error", fail);
  req.end(cfg.body == null ? undefined : cfg.body);
} else {
  const https = require("https");
  const lookup = (hostname, opts, cb) => {
    if (opts && opts.all) cb(null, [{ address: cfg.connect, family: 4 }]);
    else cb(null, cfg.connect, 4);
  };
  const req = https.request({ host: cfg.host, port: cfg.port, path: cfg.path, method: cfg.method || "GET", headers: cfg.headers, lookup, agent: false, ALPNProtocols: ["http/1.1"] }, (res) => {
    out.status = res.statusCode;
    out.version = "HTTP/" + res.httpVersion;
    for (const [k, v] of Object.entries(res.headers)) out.headers[k] = String(v);
    res.on("data", onData);
    res.on("end", onEnd);
    res.on("error", fail);
  });
  req.on("error", fail);
  req.end(cfg.body == null ? undefined : cfg.body);
}
"#;

/// The node client.
pub fn node_client(
    broker: &Broker,
    cgroup: &str,
    trust: &Trust,
    call: &Call,
) -> (ClientRun, HttpReport) {
    let argv = vec!["node".into(), "-e".into(), CLIENT_JS.into(), call.json()];
    let run = run_in_cgroup(broker, cgroup, "node", &trust.var("node"), &argv);
    let report = run.report();
    (run, report)
}

/// Path of the statically linked agent-client: `$AGENT_BROKER_STATIC_CLIENT`, else
/// `<workspace>/target/static/agent-client`. Panics when it is
/// missing or not static (it must have no ELF interpreter).
pub fn static_client() -> &'static PathBuf {
    static PATH: OnceLock<PathBuf> = OnceLock::new();
    PATH.get_or_init(|| {
        let path = match std::env::var_os("AGENT_BROKER_STATIC_CLIENT") {
            Some(p) => PathBuf::from(p),
            None => workspace_dir().join("target/static/agent-client"),
        };
        assert!(
            path.is_file(),
            "the static test client is missing at {}: build it with `cargo xtask build` \
             (it links agent-client with -C target-feature=+crt-static and copies it there), \
             or set AGENT_BROKER_STATIC_CLIENT",
            path.display()
        );
        let bytes =
            fs::read(&path).unwrap_or_else(|e| panic!("cannot read {}: {e}", path.display()));
        assert!(
            elf_is_static(&bytes),
            "{} is dynamically linked (it has an ELF interpreter); build it with \
             RUSTFLAGS=\"-C target-feature=+crt-static\"",
            path.display()
        );
        path
    })
}

/// A copy of the executable `src` in `broker`'s scratch dir (mode 0755), so an unprivileged
/// agent can run it wherever the workspace lives (a checkout under /root is not reachable).
pub fn agent_copy(broker: &Broker, src: &std::path::Path) -> PathBuf {
    use std::os::unix::fs::PermissionsExt as _;
    let name = src
        .file_name()
        .unwrap_or_else(|| panic!("{} has no file name", src.display()));
    let dst = broker.scratch_dir().join(name);
    if !dst.exists() {
        fs::copy(src, &dst)
            .unwrap_or_else(|e| panic!("cannot copy {} for the agent: {e}", src.display()));
        fs::set_permissions(&dst, fs::Permissions::from_mode(0o755))
            .unwrap_or_else(|e| panic!("cannot chmod {}: {e}", dst.display()));
    }
    dst
}

/// True for a 64-bit little-endian ELF with no PT_INTERP program header.
pub fn elf_is_static(b: &[u8]) -> bool {
    let u16_at = |o: usize| b.get(o..o + 2).map(|s| u16::from_le_bytes([s[0], s[1]]));
    let u32_at = |o: usize| {
        b.get(o..o + 4)
            .map(|s| u32::from_le_bytes([s[0], s[1], s[2], s[3]]))
    };
    let u64_at = |o: usize| {
        b.get(o..o + 8).map(|s| {
            let mut a = [0u8; 8];
            a.copy_from_slice(s);
            u64::from_le_bytes(a)
        })
    };
    if b.get(..6) != Some(b"\x7fELF\x02\x01") {
        return false;
    }
    let (Some(phoff), Some(phentsize), Some(phnum)) = (u64_at(0x20), u16_at(0x36), u16_at(0x38))
    else {
        return false;
    };
    let Ok(phoff) = usize::try_from(phoff) else {
        return false;
    };
    (0..usize::from(phnum)).all(|i| {
        let at = phoff + i * usize::from(phentsize);
        u32_at(at).is_some_and(|t| t != 3)
    })
}

/// The static agent-client: `get` (HTTP/1.1 or h2 as `call.proto` says) or `ws`.
pub fn static_client_run(
    broker: &Broker,
    cgroup: &str,
    trust: &Trust,
    call: &Call,
    mode: &str,
    message: Option<&str>,
) -> (ClientRun, HttpReport) {
    assert!(
        call.method == "GET" && call.body.is_none(),
        "the static agent-client only sends GET without a body, not {} (use curl, python3 or node)",
        call.method
    );
    let scheme = if mode == "ws" { "wss" } else { "https" };
    let mut argv = vec![
        agent_copy(broker, static_client())
            .to_string_lossy()
            .into_owned(),
        mode.to_string(),
        call.url(scheme),
        "--connect".into(),
        std::net::SocketAddr::new(call.ip, call.port).to_string(),
    ];
    for (k, v) in &call.headers {
        argv.push("--header".into());
        argv.push(format!("{k}: {v}"));
    }
    if mode != "ws" {
        argv.push(
            match call.proto {
                Proto::Http1 => "--http1.1",
                Proto::Http2 => "--http2",
            }
            .into(),
        );
    }
    if let Some(m) = message {
        argv.push("--message".into());
        argv.push(m.into());
    }
    let run = run_in_cgroup(broker, cgroup, "agent-client", &trust.var("static"), &argv);
    let report = run.report();
    (run, report)
}

/// Where `brokerctl ca install` puts the broker CA.
pub const SYSTEM_CA_PATH: &str = "/usr/local/share/ca-certificates/agent-broker.crt";

/// The JVM trust store Debian's `ca-certificates-java` keeps in step with the system store.
const JAVA_SYSTEM_STORE: &str = "/etc/ssl/certs/java/cacerts";

/// Restores the system trust store on Drop after a test ran `brokerctl ca install`: puts back
/// whatever was at [`SYSTEM_CA_PATH`] before (usually nothing), runs
/// `update-ca-certificates --fresh`, and puts back the JVM trust store as it was: the Java hook
/// adds the broker CA on install but a fresh run does not remove it again.
pub struct SystemCaGuard {
    before: Option<Vec<u8>>,
    java_before: Option<Vec<u8>>,
}

impl SystemCaGuard {
    /// Remembers the current state of [`SYSTEM_CA_PATH`] and of the JVM trust store.
    pub fn new() -> Self {
        Self {
            before: fs::read(SYSTEM_CA_PATH).ok(),
            java_before: fs::read(JAVA_SYSTEM_STORE).ok(),
        }
    }
}

impl Default for SystemCaGuard {
    fn default() -> Self {
        Self::new()
    }
}

impl Drop for SystemCaGuard {
    fn drop(&mut self) {
        let restored = match &self.before {
            Some(bytes) => fs::write(SYSTEM_CA_PATH, bytes),
            None => match fs::remove_file(SYSTEM_CA_PATH) {
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
                other => other,
            },
        };
        if let Err(e) = restored {
            eprintln!("warning: cannot restore {SYSTEM_CA_PATH}: {e}");
        }
        match Command::new("update-ca-certificates")
            .arg("--fresh")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .output()
        {
            Ok(out) if out.status.success() => {}
            Ok(out) => eprintln!(
                "warning: update-ca-certificates --fresh failed ({}): {}",
                out.status,
                String::from_utf8_lossy(&out.stderr)
            ),
            Err(e) => eprintln!("warning: cannot run update-ca-certificates --fresh: {e}"),
        }
        if let Some(bytes) = &self.java_before
            && let Err(e) = fs::write(JAVA_SYSTEM_STORE, bytes)
        {
            eprintln!("warning: cannot restore {JAVA_SYSTEM_STORE}: {e}");
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn recognises_a_static_elf() {
        // The test binary itself is dynamically linked (it has an interpreter).
        let me = fs::read("/proc/self/exe").expect("read self");
        assert!(!elf_is_static(&me));
        assert!(!elf_is_static(b"not an elf"));
    }

    #[test]
    fn parses_curl_output() {
        let run = ClientRun {
            what: "curl".into(),
            pid: 1,
            output: Output {
                status: std::os::unix::process::ExitStatusExt::from_raw(0),
                stdout: b"HTTP/1.1 100 Continue\r\n\r\nHTTP/2 403\r\ncontent-type: application/json\r\n\r\n{\"a\":1}".to_vec(),
                stderr: b"ABTEST status=403 version=2\n".to_vec(),
            },
            env_dump: Vec::new(),
            env_samples: Vec::new(),
            elapsed: Duration::ZERO,
        };
        let r = parse_curl(&run);
        assert_eq!(r.status, 403);
        assert!(r.is_h2());
        assert_eq!(
            r.headers.get("content-type").map(String::as_str),
            Some("application/json")
        );
        assert_eq!(r.body, "{\"a\":1}");
    }
}
