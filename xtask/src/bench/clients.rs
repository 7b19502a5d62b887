//! Small Python clients for what wrk and h2load cannot do: time one new connection at a time to a
//! first-seen or a cached host name (SNI), hold many idle TLS connections open while the proxy's
//! resident memory is read, time each event of a server-sent event stream, and time 200 MB
//! transfers each way. Python's `ssl` and `http.client` are all they need, Python is installed
//! anyway (for mitmproxy), and its cost is the same in every column.

use std::{
    fs,
    io::{BufRead as _, BufReader, Write as _},
    os::unix::process::CommandExt as _,
    path::Path,
    process::{Child, Stdio},
    sync::mpsc,
    thread,
    time::{Duration, Instant},
};

use anyhow::{Context as _, Result, bail};

use super::{load::Endpoint, process, stopping};
use crate::cmd;

/// Makes `count` connections one after another, each a TLS handshake with SNI `pattern` (with
/// `{}` replaced by the connection's number; `-` for none, as a client dialing an address sends)
/// and one `Connection: close` request whose Host matches, and prints the median time per
/// connection and how many did not answer 200.
const CONNECT_PY: &str = r#"import json, socket, ssl, statistics, sys, time
host, port, count, pattern, authorization = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), sys.argv[4], sys.argv[5]
ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
ctx.check_hostname = False
ctx.verify_mode = ssl.CERT_NONE
ctx.set_alpn_protocols(["http/1.1"])
times, failures = [], 0
for i in range(count):
    name = None if pattern == "-" else pattern.replace("{}", str(i))
    started = time.perf_counter()
    with ctx.wrap_socket(socket.create_connection((host, port), timeout=10), server_hostname=name) as tls:
        tls.sendall(f"GET /v1/whoami HTTP/1.1\r\nHost: {name or host}:{port}\r\nAuthorization: {authorization}\r\nConnection: close\r\n\r\n".encode())
        answer = b""
        while chunk := tls.recv(65536):
            answer += chunk
    times.append(time.perf_counter() - started)
    if not answer.startswith(b"HTTP/1.1 200"):
        failures += 1
print(json.dumps({"median_ms": statistics.median(times) * 1e3, "failures": failures}))
"#;

/// Opens `count` TLS connections (no SNI: it dials the address), makes one keep-alive request on
/// each, prints `ready <held> <failures>`, and keeps them open until its stdin closes. For each
/// line it reads meanwhile it prints `open <n>`: how many of them the other end has not closed
/// (nothing to read, or only TLS handshake messages such as session tickets).
const IDLE_PY: &str = r#"import resource, select, socket, ssl, sys
host, port, count, authorization = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), sys.argv[4]
_, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
ctx.check_hostname = False
ctx.verify_mode = ssl.CERT_NONE
ctx.set_alpn_protocols(["http/1.1"])
request = f"GET /v1/whoami HTTP/1.1\r\nHost: {host}:{port}\r\nAuthorization: {authorization}\r\n\r\n".encode()

def answer_ok(tls):
    data = b""
    while b"\r\n\r\n" not in data:
        chunk = tls.recv(65536)
        if not chunk:
            return False
        data += chunk
    head, body = data.split(b"\r\n\r\n", 1)
    lines = head.decode("latin-1").lower().split("\r\n")
    length = next((int(l.split(":", 1)[1]) for l in lines if l.startswith("content-length:")), None)
    while (len(body) < length) if length is not None else not body.endswith(b"0\r\n\r\n"):
        chunk = tls.recv(65536)
        if not chunk:
            return False
        body += chunk
    return lines[0].startswith("http/1.1 200")

held, failures = [], 0
for _ in range(count):
    try:
        tls = ctx.wrap_socket(socket.create_connection((host, port), timeout=10))
        tls.sendall(request)
        if answer_ok(tls):
            held.append(tls)
        else:
            failures += 1
            tls.close()
    except OSError:
        failures += 1
def closed(tls):
    tls.setblocking(False)
    try:
        return tls.recv(1) == b""
    except ssl.SSLWantReadError:
        return False
    except OSError:
        return True
    finally:
        tls.settimeout(10)

print(f"ready {len(held)} {failures}", flush=True)
poller = select.poll()
by_fd = {tls.fileno(): tls for tls in held}
for fd in by_fd:
    poller.register(fd, select.POLLIN)
for _ in sys.stdin:
    gone = sum(1 for fd, _ in poller.poll(0) if closed(by_fd[fd]))
    print(f"open {len(held) - gone}", flush=True)
"#;

/// Opens a new TLS connection per run, sends `GET /v1/events` and notes when each event (ended by
/// a blank line) arrives, in seconds after the request was sent; the first `warmup` runs only
/// warm the path up. Prints the runs that got 200 and every event, and how many did not.
const SSE_PY: &str = r#"import http.client, json, ssl, sys, time
host, port, warmup, runs, events, authorization = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4]), int(sys.argv[5]), sys.argv[6]
ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
ctx.check_hostname = False
ctx.verify_mode = ssl.CERT_NONE
ctx.set_alpn_protocols(["http/1.1"])
timed, failures = [], 0
for run in range(warmup + runs):
    conn = http.client.HTTPSConnection(host, port, context=ctx, timeout=30)
    conn.connect()
    started = time.perf_counter()
    conn.request("GET", "/v1/events", headers={"Authorization": authorization, "Accept": "text/event-stream"})
    response = conn.getresponse()
    arrivals, pending = [], b""
    if response.status == 200:
        while chunk := response.read1(65536):
            now = time.perf_counter() - started
            pending += chunk
            *complete, pending = pending.split(b"\n\n")
            arrivals.extend([now] * len(complete))
    conn.close()
    if run < warmup:
        continue
    if response.status == 200 and len(arrivals) == events and not pending:
        timed.append(arrivals)
    else:
        failures += 1
print(json.dumps({"runs": timed, "failures": failures}))
"#;

/// On a new connection (its handshake before the clock starts): one download of `size` bytes
/// (`GET /v1/download?bytes=N`) or one upload (`POST /v1/upload`, sent from one 1 MiB block),
/// timed from sending the request to the end of the answer, and the client's own CPU time
/// meanwhile. A transfer fails unless it answers 200 with every byte (the upload's answer says
/// how many arrived). Prints the seconds (none when it failed), the CPU seconds, and the failures.
const BULK_PY: &str = r#"import http.client, json, os, resource, ssl, sys, time
host, port, size, direction, authorization = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), sys.argv[4], sys.argv[5]
ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
ctx.check_hostname = False
ctx.verify_mode = ssl.CERT_NONE
ctx.set_alpn_protocols(["http/1.1"])
conn = http.client.HTTPSConnection(host, port, context=ctx, timeout=60)
buffer = memoryview(bytearray(1 << 20))
block = os.urandom(1 << 20)

def cpu():
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime

def download(length):
    started = time.perf_counter()
    conn.request("GET", f"/v1/download?bytes={length}", headers={"Authorization": authorization})
    response = conn.getresponse()
    received = 0
    while n := response.readinto(buffer):
        received += n
    return time.perf_counter() - started, response.status == 200 and received == length

def pieces(length):
    while length > 0:
        piece = block[:min(length, len(block))]
        length -= len(piece)
        yield piece

def upload(length):
    started = time.perf_counter()
    conn.request("POST", "/v1/upload", body=pieces(length), headers={"Authorization": authorization, "Content-Length": str(length), "Content-Type": "application/octet-stream"})
    response = conn.getresponse()
    answer = response.read()
    seconds = time.perf_counter() - started
    try:
        whole = response.status == 200 and json.loads(answer)["bytes"] == length
    except (ValueError, KeyError):
        whole = False
    return seconds, whole

report = {"seconds": None, "cpu_seconds": None, "failures": 0}
try:
    conn.connect()
    started_cpu = cpu()
    seconds, whole = (download if direction == "down" else upload)(size)
    report["cpu_seconds"] = cpu() - started_cpu
    if whole:
        report["seconds"] = seconds
    else:
        report["failures"] += 1
except (OSError, http.client.HTTPException) as e:
    print(f"bulk.py: {e!r}", file=sys.stderr)
    report["failures"] += 1
print(json.dumps(report))
"#;

/// The SNI pattern for no SNI at all.
pub const NO_SNI: &str = "-";

/// Writes the clients' scripts into `dir`.
pub fn write_scripts(dir: &Path) -> Result<()> {
    fs::write(dir.join("connect.py"), CONNECT_PY)?;
    fs::write(dir.join("idle.py"), IDLE_PY)?;
    fs::write(dir.join("sse.py"), SSE_PY)?;
    fs::write(dir.join("bulk.py"), BULK_PY)?;
    Ok(())
}

/// Time per new connection, handshake and one request.
#[derive(Debug)]
pub struct ConnectTimes {
    pub median_ms: f64,
    pub failures: u64,
}

/// Runs `connect.py` from `dir`: `count` connections with SNI `pattern`.
pub fn connect_times(
    python: &Path,
    dir: &Path,
    endpoint: &Endpoint,
    pattern: &str,
    count: u32,
) -> Result<ConnectTimes> {
    let mut command = endpoint.launch.command(python);
    command
        .args(script(dir, "connect.py")?)
        .arg(endpoint.addr.ip().to_string())
        .arg(endpoint.addr.port().to_string())
        .arg(count.to_string())
        .arg(pattern)
        .arg(&endpoint.authorization);
    let out = process::output_within(&mut command, Duration::from_secs(120))?;
    if !out.status.success() {
        bail!("connect.py failed ({}): {}", out.status, out.stderr_tail());
    }
    let report: serde_json::Value = serde_json::from_str(out.stdout.trim())
        .with_context(|| format!("reading connect.py's report {:?}", out.stdout))?;
    let number = |key: &str| report.get(key).and_then(serde_json::Value::as_f64);
    match (
        number("median_ms"),
        report.get("failures").and_then(serde_json::Value::as_u64),
    ) {
        (Some(median_ms), Some(failures)) => Ok(ConnectTimes {
            median_ms,
            failures,
        }),
        _ => bail!("connect.py's report lacks a field: {report}"),
    }
}

/// When each event of each timed run of `sse.py` arrived, in seconds after its request was sent.
pub struct EventTimes {
    /// One list per run that answered 200 with every event, in order.
    pub runs: Vec<Vec<f64>>,
    /// Runs that did not.
    pub failures: u64,
}

impl std::fmt::Debug for EventTimes {
    /// A summary: every arrival time would fill the bench's progress output.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let first_ms: Vec<String> = self
            .runs
            .iter()
            .filter_map(|run| run.first())
            .map(|s| format!("{:.2}", s * 1e3))
            .collect();
        write!(
            f,
            "EventTimes {{ runs: {}, first_event_ms: [{}], failures: {} }}",
            self.runs.len(),
            first_ms.join(", "),
            self.failures
        )
    }
}

/// Runs `sse.py` from `dir`: one stream of `events` events timed, after one that warms the path
/// up when `warm_up`.
pub fn event_times(
    python: &Path,
    dir: &Path,
    endpoint: &Endpoint,
    warm_up: bool,
    events: usize,
) -> Result<EventTimes> {
    let mut command = endpoint.launch.command(python);
    command
        .args(script(dir, "sse.py")?)
        .arg(endpoint.addr.ip().to_string())
        .arg(endpoint.addr.port().to_string())
        .arg(u8::from(warm_up).to_string())
        .arg("1")
        .arg(events.to_string())
        .arg(&endpoint.authorization);
    let out = process::output_within(&mut command, Duration::from_secs(120))?;
    if !out.status.success() {
        bail!("sse.py failed ({}): {}", out.status, out.stderr_tail());
    }
    let report: serde_json::Value = serde_json::from_str(out.stdout.trim())
        .with_context(|| format!("reading sse.py's report {:?}", out.stdout))?;
    let runs = report
        .get("runs")
        .and_then(serde_json::Value::as_array)
        .map(|runs| {
            runs.iter()
                .map(|run| {
                    run.as_array()
                        .map(|times| times.iter().filter_map(serde_json::Value::as_f64).collect())
                })
                .collect::<Option<Vec<Vec<f64>>>>()
        });
    match (
        runs.flatten(),
        report.get("failures").and_then(serde_json::Value::as_u64),
    ) {
        (Some(runs), Some(failures)) => Ok(EventTimes { runs, failures }),
        _ => bail!("sse.py's report lacks a field: {report}"),
    }
}

/// Which way a bulk transfer goes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Direction {
    Down,
    Up,
}

/// What one run of `bulk.py` measured.
#[derive(Debug)]
pub struct Transfer {
    /// Request sent to answer read, when the transfer arrived whole.
    pub seconds: Option<f64>,
    /// The client's own CPU time (user + system) over the transfer, when it ran.
    pub client_cpu_seconds: Option<f64>,
    /// Transfers that did not arrive whole.
    pub failures: u64,
}

/// Runs `bulk.py` from `dir`: one transfer of `size` bytes `direction` on a new keep-alive
/// connection (its handshake before the clock starts).
pub fn transfer(
    python: &Path,
    dir: &Path,
    endpoint: &Endpoint,
    size: u64,
    direction: Direction,
) -> Result<Transfer> {
    let mut command = endpoint.launch.command(python);
    command
        .args(script(dir, "bulk.py")?)
        .arg(endpoint.addr.ip().to_string())
        .arg(endpoint.addr.port().to_string())
        .arg(size.to_string())
        .arg(match direction {
            Direction::Down => "down",
            Direction::Up => "up",
        })
        .arg(&endpoint.authorization);
    let out = process::output_within(&mut command, Duration::from_secs(600))?;
    if !out.status.success() {
        bail!("bulk.py failed ({}): {}", out.status, out.stderr_tail());
    }
    let report: serde_json::Value = serde_json::from_str(out.stdout.trim())
        .with_context(|| format!("reading bulk.py's report {:?}", out.stdout))?;
    let Some(failures) = report.get("failures").and_then(serde_json::Value::as_u64) else {
        bail!("bulk.py's report lacks its failures: {:?}", out.stdout);
    };
    if failures > 0 && !out.stderr.trim().is_empty() {
        eprintln!("bench: bulk.py: {}", out.stderr_tail());
    }
    Ok(Transfer {
        seconds: report.get("seconds").and_then(serde_json::Value::as_f64),
        client_cpu_seconds: report
            .get("cpu_seconds")
            .and_then(serde_json::Value::as_f64),
        failures,
    })
}

/// `-c <source of dir/name>`: the script is passed inline, since the sandboxed agent (an
/// unprivileged uid under `brokerctl run`) may not be able to read the bench's directory.
fn script(dir: &Path, name: &str) -> Result<[std::ffi::OsString; 2]> {
    let source = std::fs::read_to_string(dir.join(name))
        .with_context(|| format!("reading {}", dir.join(name).display()))?;
    Ok(["-c".into(), source.into()])
}

/// Resident memory the process tree `proxy_pid` gains per idle connection, in KiB: `count` TLS
/// connections (one request each, then idle) are opened through `endpoint` by `idle.py` from
/// `dir`, and the proxy's VmRSS is read before and once they are all open.
pub fn idle_memory_per_connection(
    python: &Path,
    dir: &Path,
    endpoint: &Endpoint,
    count: u32,
    proxy_pid: u32,
) -> Result<f64> {
    let before = process::tree_rss_kib(proxy_pid)?;
    let idle = IdleConnections::open(python, dir, endpoint, count)?;
    if idle.failures > 0 || idle.held != count {
        bail!(
            "idle.py opened {} of {count} connections ({} failed)",
            idle.held,
            idle.failures
        );
    }
    // Let the proxy finish the last request's bookkeeping before reading its memory.
    thread::sleep(Duration::from_millis(500));
    let after = process::tree_rss_kib(proxy_pid)?;
    Ok(after.saturating_sub(before) as f64 / f64::from(count))
}

/// Idle TLS connections held open by `idle.py` (one request each, then nothing) until dropped.
pub struct IdleConnections {
    holder: Child,
    lines: mpsc::Receiver<String>,
    /// Connections that answered 200 and are held.
    pub held: u32,
    /// Connections that could not be opened or did not answer 200.
    pub failures: u32,
}

impl IdleConnections {
    /// Runs `idle.py` from `dir` through `endpoint` and returns once it has tried `count`
    /// connections, however many of them it holds.
    pub fn open(python: &Path, dir: &Path, endpoint: &Endpoint, count: u32) -> Result<Self> {
        let mut command = endpoint.launch.command(python);
        command
            .args(script(dir, "idle.py")?)
            .arg(endpoint.addr.ip().to_string())
            .arg(endpoint.addr.port().to_string())
            .arg(count.to_string())
            .arg(&endpoint.authorization)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .process_group(0);
        let shown = cmd::echo(&command);
        let mut holder = command
            .spawn()
            .with_context(|| format!("starting `{shown}`"))?;
        let stdout = holder
            .stdout
            .take()
            .context("idle.py's stdout is not piped")?;
        let (line_tx, lines) = mpsc::channel();
        thread::spawn(move || {
            for line in BufReader::new(stdout).lines() {
                let Ok(line) = line else { break };
                if line_tx.send(line).is_err() {
                    break;
                }
            }
        });
        let mut idle = Self {
            holder,
            lines,
            held: 0,
            failures: 0,
        };
        let line = idle.next_line(Duration::from_secs(300))?;
        let words: Vec<&str> = line.split_whitespace().collect();
        match words.as_slice() {
            ["ready", held, failures] => {
                idle.held = held.parse()?;
                idle.failures = failures.parse()?;
                Ok(idle)
            }
            _ => bail!("idle.py did not report ready (it printed {line:?})"),
        }
    }

    /// How many of the held connections the other end has not closed.
    pub fn still_open(&mut self) -> Result<u32> {
        let stdin = self
            .holder
            .stdin
            .as_mut()
            .context("idle.py's stdin is closed")?;
        stdin.write_all(b"check\n")?;
        stdin.flush()?;
        let line = self.next_line(Duration::from_secs(60))?;
        match line.split_whitespace().collect::<Vec<_>>().as_slice() {
            ["open", n] => Ok(n.parse()?),
            _ => bail!("idle.py answered {line:?} to a check"),
        }
    }

    /// The holder's next line of output, within `deadline`.
    fn next_line(&mut self, deadline: Duration) -> Result<String> {
        let give_up = Instant::now() + deadline;
        loop {
            match self.lines.recv_timeout(Duration::from_millis(200)) {
                Ok(line) => return Ok(line),
                Err(mpsc::RecvTimeoutError::Disconnected) => {
                    bail!(
                        "idle.py ended ({:?})",
                        self.holder.try_wait().ok().flatten()
                    )
                }
                Err(mpsc::RecvTimeoutError::Timeout) if stopping() => bail!("interrupted"),
                Err(mpsc::RecvTimeoutError::Timeout) if Instant::now() > give_up => {
                    bail!("idle.py did not report within {deadline:?}")
                }
                Err(mpsc::RecvTimeoutError::Timeout) => {}
            }
        }
    }
}

impl Drop for IdleConnections {
    /// Closing stdin tells the holder to close its connections and exit; it is killed if it
    /// has not within 30 s.
    fn drop(&mut self) {
        drop(self.holder.stdin.take());
        let deadline = Instant::now() + Duration::from_secs(30);
        while matches!(self.holder.try_wait(), Ok(None)) && Instant::now() < deadline {
            thread::sleep(Duration::from_millis(50));
        }
        if matches!(self.holder.try_wait(), Ok(None)) {
            let _ = self.holder.kill();
        }
        let _ = self.holder.wait();
    }
}
