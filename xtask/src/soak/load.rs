//! The soak's mixed load: real processes in agent cgroups below the soak's, started with
//! `brokerctl run`, so every call goes through the kernel's capture path (the eBPF redirect),
//! TLS termination with a minted leaf, policy, injection and audit, like an agent's. Each kind
//! of load is a thread that starts one operation at a fixed rate ([`period`]) until the run
//! ends, and each operation checks what came back:
//!
//! - **h1 keep-alive**: curl, 20 requests on one HTTP/1.1 connection; all 200, the connection
//!   reused.
//! - **h2 keep-alive**: curl, 10 requests on one h2 connection to `/hash`; all 200 over h2, and
//!   the Authorization the API received hashes to a key the vault has held (the key rotations
//!   reach the upstream).
//! - **short-lived agents**: a new cgroup each time, tagged by `brokerctl run --create`, untagged
//!   and removed after its process exits. Its Python looks up 3 of the soak's names through
//!   brokerd's DNS (the answered-names table) and calls each on a new connection at the address
//!   brokerd answered (a leaf each), then looks up and calls a name no rule allows: the lookup
//!   is refused and the call answered 403 (denials). Then it makes one h2 call with curl.
//! - **SSE**: curl, a streamed chat completion over h1 and h2 in turn; 200, every event through
//!   to `[DONE]`, with an injected key.
//! - **WebSocket**: the static agent-client, one upgrade and echoed message.
//! - **rate limit**: curl, bursts of 12 requests at a rule limited to 2 a second (burst 4); each
//!   answer 200 or 429, and 429s must occur.
//! - **policy reload**: every 15 s the policy gains or loses a rule and is reloaded; a call to
//!   the rule's name then answers 200 or 403 accordingly.
//! - **secret rotation**: every 20 s the key is rotated (`brokerctl secret rotate`).

use std::{
    os::unix::process::CommandExt as _,
    path::{Path, PathBuf},
    process::{Command, Stdio},
    sync::{
        Mutex,
        atomic::{AtomicU64, Ordering},
    },
    thread,
    time::{Duration, Instant},
};

use nix::{
    sys::signal::{Signal, killpg},
    unistd::Pid,
};
use serde_json::{Value, json};

use super::lab::{self, Lab};
use crate::bench::stopping;

/// How long one operation may take before its processes are killed and it counts as failed.
const OPERATION_DEADLINE: Duration = Duration::from_secs(30);
/// The programs the agents run.
pub struct Programs {
    pub curl: PathBuf,
    pub python3: PathBuf,
    pub agent_client: PathBuf,
}

/// The kinds of load, in the order the summary lists them.
pub const KINDS: &[&str] = &[
    "h1 keep-alive",
    "h2 keep-alive",
    "short-lived agents",
    "SSE",
    "WebSocket",
    "rate limit",
    "policy reload",
    "secret rotation",
];

/// How often each kind of load starts an operation. Each period is about twice what an
/// operation takes on a busy two-core machine with a debug brokerd, so the rate holds.
fn period(kind: &str) -> Duration {
    Duration::from_millis(match kind {
        "short-lived agents" | "SSE" => 3_000,
        "h1 keep-alive" | "h2 keep-alive" => 2_000,
        "WebSocket" => 1_500,
        "rate limit" => 4_000,
        "policy reload" => 15_000,
        "secret rotation" => 20_000,
        _ => 1_000,
    })
}

/// One kind's counts.
#[derive(Default)]
pub struct Tally {
    pub ok: AtomicU64,
    pub failed: AtomicU64,
    /// Kind-specific: 429s seen (rate limit), calls that carried the newest key (h2),
    /// connections made (short-lived agents).
    pub noted: AtomicU64,
    /// The first failures' messages (at most [`KEPT_ERRORS`]).
    pub errors: Mutex<Vec<String>>,
}

const KEPT_ERRORS: usize = 5;

impl Tally {
    fn record(&self, result: Result<(), String>) {
        match result {
            Ok(()) => {
                self.ok.fetch_add(1, Ordering::Relaxed);
            }
            Err(e) => {
                self.failed.fetch_add(1, Ordering::Relaxed);
                eprintln!("soak: failed: {e}");
                if let Ok(mut errors) = self.errors.lock()
                    && errors.len() < KEPT_ERRORS
                {
                    errors.push(e);
                }
            }
        }
    }
}

/// What the load threads share.
pub struct Load<'a> {
    pub lab: &'a Lab,
    pub programs: &'a Programs,
    pub tallies: Vec<Tally>,
    /// When the load stops starting operations.
    pub until: Instant,
}

impl<'a> Load<'a> {
    pub fn new(lab: &'a Lab, programs: &'a Programs, until: Instant) -> Self {
        Self {
            lab,
            programs,
            tallies: KINDS.iter().map(|_| Tally::default()).collect(),
            until,
        }
    }

    /// Operations finished and failed so far, over every kind.
    pub fn totals(&self) -> (u64, u64) {
        self.tallies.iter().fold((0, 0), |(ok, failed), t| {
            (
                ok + t.ok.load(Ordering::Relaxed) + t.failed.load(Ordering::Relaxed),
                failed + t.failed.load(Ordering::Relaxed),
            )
        })
    }

    fn over(&self) -> bool {
        Instant::now() >= self.until || stopping()
    }

    /// Runs every kind of load on a thread of its own until [`Load::until`]; returns when all
    /// have finished their last operation.
    pub fn run(&self) {
        thread::scope(|scope| {
            for (index, kind) in KINDS.iter().enumerate() {
                scope.spawn(move || self.repeat(index, kind));
            }
        });
    }

    fn repeat(&self, index: usize, kind: &str) {
        let tally = &self.tallies[index];
        let period = period(kind);
        let mut round: u64 = 0;
        // Periodic changes wait a period first, so the rest of the load runs before the first.
        let mut next = Instant::now();
        if matches!(kind, "policy reload" | "secret rotation") {
            next += period;
        }
        loop {
            if !self.sleep(next.saturating_duration_since(Instant::now())) || self.over() {
                break;
            }
            round += 1;
            let result = match kind {
                "h1 keep-alive" => self.h1_keep_alive(),
                "h2 keep-alive" => self.h2_keep_alive(tally),
                "short-lived agents" => self.short_lived_agent(round, tally),
                "SSE" => self.sse(round),
                "WebSocket" => self.websocket(round),
                "rate limit" => self.rate_limit(tally),
                "policy reload" => self.policy_reload(),
                "secret rotation" => self.lab.rotate_key().map_err(|e| format!("{e:#}")),
                other => Err(format!("no load called {other}")),
            };
            tally.record(result.map_err(|e| format!("{kind}: {e}")));
            // A fixed rate, not as fast as the machine allows: the pool, tasks and descriptors
            // follow the load's rate, which must not follow what else the machine runs. An
            // operation that overran its period is not made up for.
            next = (next + period).max(Instant::now());
        }
    }

    /// Sleeps `total` unless the run ends first; false when it has.
    fn sleep(&self, total: Duration) -> bool {
        let end = Instant::now() + total;
        while Instant::now() < end {
            if self.over() {
                return false;
            }
            thread::sleep(Duration::from_millis(100).min(end - Instant::now()));
        }
        true
    }

    fn url(&self, host: &str, path: &str) -> String {
        format!("https://{host}:{}{path}", self.lab.api_port)
    }

    /// curl in the agent cgroup `sub`, with the API's names resolved to the test API and a
    /// placeholder where the key goes.
    fn curl(&self, sub: &str) -> Command {
        let mut curl = self.lab.agent(sub, &self.programs.curl);
        let port = self.lab.api_port;
        curl.args(["-sS", "--max-time", "20"]);
        for host in [lab::API, lab::LIMITED, lab::TOGGLED] {
            curl.args(["--resolve", &format!("{host}:{port}:{}", lab::API_IP)]);
        }
        curl.args(["-H", "Authorization: Bearer placeholder"]);
        curl
    }

    fn h1_keep_alive(&self) -> Result<(), String> {
        const REQUESTS: usize = 20;
        let mut curl = self.curl("h1");
        curl.args(["--http1.1", "-w", "%{http_code} %{num_connects}\\n"]);
        for _ in 0..REQUESTS {
            curl.args(["-o", "/dev/null", &self.url(lab::API, "/v1/models")]);
        }
        let out = run(&mut curl)?;
        let lines: Vec<&str> = out.lines().collect();
        let codes_ok = lines.len() == REQUESTS && lines.iter().all(|l| l.starts_with("200 "));
        let connects: u64 = lines
            .iter()
            .filter_map(|l| l.split_whitespace().nth(1)?.parse::<u64>().ok())
            .sum();
        if !codes_ok {
            return Err(format!("expected {REQUESTS} answers 200, got {lines:?}"));
        }
        if connects != 1 {
            return Err(format!(
                "{REQUESTS} requests took {connects} connections, expected 1 (keep-alive)"
            ));
        }
        Ok(())
    }

    fn h2_keep_alive(&self, tally: &Tally) -> Result<(), String> {
        const REQUESTS: usize = 10;
        let mut curl = self.curl("h2");
        curl.args([
            "--http2",
            "-w",
            "\\n%{http_code} %{http_version} %{num_connects}\\n",
        ]);
        for _ in 0..REQUESTS {
            curl.arg(self.url(lab::API, "/hash"));
        }
        let out = run(&mut curl)?;
        let mut answers = 0;
        let mut connects = 0;
        for line in out.lines().filter(|l| !l.is_empty()) {
            if line.starts_with('{') {
                let body: Value = serde_json::from_str(line)
                    .map_err(|e| format!("/hash answered {line:?}: {e}"))?;
                let hash = body["authorization_sha256"].as_str().unwrap_or_default();
                let (known, newest) = self.lab.key_hash(hash);
                if !known {
                    return Err(
                        "the API received an Authorization that is no key the vault \
                                has held"
                            .into(),
                    );
                }
                if newest {
                    tally.noted.fetch_add(1, Ordering::Relaxed);
                }
                continue;
            }
            let words: Vec<&str> = line.split_whitespace().collect();
            if words.len() != 3 || words[0] != "200" || words[1] != "2" {
                return Err(format!(
                    "expected `200 2 N` (an h2 answer 200), got {line:?}"
                ));
            }
            answers += 1;
            connects += words[2].parse::<u64>().unwrap_or(0);
        }
        if answers != REQUESTS {
            return Err(format!("{answers} answers to {REQUESTS} requests"));
        }
        if connects != 1 {
            return Err(format!(
                "{REQUESTS} requests took {connects} connections, expected 1"
            ));
        }
        Ok(())
    }

    fn short_lived_agent(&self, round: u64, tally: &Tally) -> Result<(), String> {
        const PER_AGENT: u64 = 3;
        let sub = format!("e{round}");
        let names: Vec<String> = (0..PER_AGENT)
            .map(|i| lab::name(((round * PER_AGENT + i) % lab::NAMES as u64) as usize))
            .collect();
        let mut python = self.lab.agent(&sub, &self.programs.python3);
        python.args([
            "-c",
            AGENT_PY,
            &self.lab.api_port.to_string(),
            &names.join(","),
            lab::DENIED,
            &lab::API_IP.to_string(),
        ]);
        let ran = run(&mut python);
        // Then one h2 call of the same agent (a pooled h2 connection of its own upstream).
        let mut curl = self.curl(&sub);
        curl.args([
            "--http2",
            "-o",
            "/dev/null",
            "-w",
            "%{http_code} %{http_version}",
        ])
        .arg(self.url(lab::API, "/v1/models"));
        let h2 = run(&mut curl);
        // The agent is gone either way: untag and remove its cgroup.
        let removed = self
            .lab
            .remove_agent(&sub)
            .map_err(|e| format!("removing agent {sub}: {e:#}"));
        let out = ran?;
        let h2 = h2?;
        removed?;
        if h2.trim() != "200 2" {
            return Err(format!(
                "agent {sub}'s h2 call answered {h2:?}, expected `200 2`"
            ));
        }
        let report: Value = serde_json::from_str(out.trim())
            .map_err(|e| format!("the agent printed {out:?}: {e}"))?;
        let expected = json!({
            "dns": vec![0; names.len()],
            "calls": vec![200; names.len()],
            "denied_dns_refused": true,
            "denied_call": 403,
        });
        if report != expected {
            return Err(format!("agent {sub} saw {report}, expected {expected}"));
        }
        tally.noted.fetch_add(PER_AGENT + 2, Ordering::Relaxed);
        Ok(())
    }

    fn sse(&self, round: u64) -> Result<(), String> {
        let version = if round.is_multiple_of(2) {
            "--http2"
        } else {
            "--http1.1"
        };
        let mut curl = self.curl("sse");
        curl.args([version, "-N", "-w", "\\n%{http_code}"])
            .args(["-H", "content-type: application/json"])
            .args(["-d", r#"{"model":"soak","stream":true,"messages":[]}"#])
            .arg(self.url(lab::API, "/v1/chat/completions"));
        let out = run(&mut curl)?;
        let (body, code) = out.trim_end().rsplit_once('\n').unwrap_or(("", &out));
        if code != "200" {
            return Err(format!("SSE ({version}) answered {code:?}"));
        }
        let events = body.matches("data: ").count();
        if events != 4 || !body.contains("data: [DONE]") {
            return Err(format!(
                "SSE ({version}): {events} events, expected 4 ending in [DONE]"
            ));
        }
        let hash = body
            .split("auth=")
            .nth(1)
            .and_then(|rest| rest.split_whitespace().next())
            .unwrap_or_default();
        if !self.lab.key_hash(hash).0 {
            return Err(format!(
                "SSE ({version}): the API received no key the vault has held"
            ));
        }
        Ok(())
    }

    fn websocket(&self, round: u64) -> Result<(), String> {
        let message = format!("soak message {round}");
        let port = self.lab.api_port;
        let mut client = self.lab.agent("ws", &self.programs.agent_client);
        client
            .args(["ws", &format!("wss://{}:{port}/ws", lab::API)])
            .args(["--connect", &format!("{}:{port}", lab::API_IP)])
            .args(["--header", "Authorization: Bearer placeholder"])
            .args(["--message", &message]);
        let out = run(&mut client)?;
        let report: Value =
            serde_json::from_str(out.trim()).map_err(|e| format!("agent-client: {out:?}: {e}"))?;
        if report["ws_echo"].as_str() != Some(message.as_str()) {
            return Err(format!("the WebSocket echoed {}", report["ws_echo"]));
        }
        Ok(())
    }

    fn rate_limit(&self, tally: &Tally) -> Result<(), String> {
        const REQUESTS: usize = 12;
        let mut curl = self.curl("limited");
        curl.args(["--http1.1", "-w", "%{http_code}\\n"]);
        for _ in 0..REQUESTS {
            curl.args(["-o", "/dev/null", &self.url(lab::LIMITED, "/v1/models")]);
        }
        let out = run(&mut curl)?;
        let codes: Vec<&str> = out.lines().collect();
        if codes.len() != REQUESTS || !codes.iter().all(|c| *c == "200" || *c == "429") {
            return Err(format!(
                "expected {REQUESTS} answers 200 or 429, got {codes:?}"
            ));
        }
        let limited = codes.iter().filter(|c| **c == "429").count() as u64;
        tally.noted.fetch_add(limited, Ordering::Relaxed);
        Ok(())
    }

    fn policy_reload(&self) -> Result<(), String> {
        let allowed = self.lab.toggle_policy().map_err(|e| format!("{e:#}"))?;
        let mut curl = self.curl("toggle");
        curl.args(["--http1.1", "-o", "/dev/null", "-w", "%{http_code}"])
            .arg(self.url(lab::TOGGLED, "/v1/models"));
        let code = run(&mut curl)?;
        let expected = if allowed { "200" } else { "403" };
        if code.trim() != expected {
            return Err(format!(
                "after the reload (rule {}), the call answered {code:?}, expected {expected}",
                if allowed { "added" } else { "removed" }
            ));
        }
        Ok(())
    }
}

/// A short-lived agent: looks up each name in argv[2] (comma-separated) through brokerd's DNS
/// (a query to 127.0.0.53, which the redirect takes to brokerd), calls it on a new TLS
/// connection at the address answered, then does the same for the name no rule allows (whose
/// lookup must be refused) at the API's address. Prints one JSON object.
const AGENT_PY: &str = r#"import json, socket, ssl, struct, sys
port, names, denied, api_ip = int(sys.argv[1]), sys.argv[2].split(","), sys.argv[3], sys.argv[4]
dns = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
dns.settimeout(10)
def resolve(qid, name):
    q = struct.pack(">HHHHHH", qid, 0x0100, 1, 0, 0, 0)
    for label in name.split("."):
        q += bytes([len(label)]) + label.encode()
    dns.sendto(q + b"\x00" + struct.pack(">HH", 1, 1), ("127.0.0.53", 53))
    while True:
        r = dns.recv(4096)
        if struct.unpack(">H", r[:2])[0] == qid:
            break
    rcode, answers, at = r[3] & 0x0F, struct.unpack(">H", r[6:8])[0], 12
    while r[at] != 0:
        at += 1 + r[at]
    at += 5
    for _ in range(answers):
        if r[at] & 0xC0 == 0xC0:
            at += 2
        else:
            while r[at] != 0:
                at += 1 + r[at]
            at += 1
        rtype, _, _, length = struct.unpack(">HHIH", r[at:at + 10])
        at += 10
        if rtype == 1 and length == 4:
            return rcode, socket.inet_ntoa(r[at:at + 4])
        at += length
    return rcode, None
ctx = ssl.create_default_context()
def call(ip, name):
    with socket.create_connection((ip, port), timeout=15) as raw:
        with ctx.wrap_socket(raw, server_hostname=name) as tls:
            tls.sendall(f"GET /v1/models HTTP/1.1\r\nHost: {name}:{port}\r\nAuthorization: Bearer placeholder\r\nConnection: close\r\n\r\n".encode())
            data = b""
            while chunk := tls.recv(65536):
                data += chunk
    return int(data.split(b" ", 2)[1]) if data.startswith(b"HTTP/1.1 ") else 0
out = {"dns": [], "calls": []}
for i, name in enumerate(names):
    rcode, ip = resolve(100 + i, name)
    out["dns"].append(rcode)
    out["calls"].append(call(ip, name) if ip else -1)
rcode, ip = resolve(99, denied)
out["denied_dns_refused"] = rcode != 0 and ip is None
out["denied_call"] = call(api_ip, denied)
print(json.dumps(out))
"#;

/// Runs `command` (its own process group) to its end within [`OPERATION_DEADLINE`] and returns
/// its stdout; an error, with the end of its stderr, when it fails or takes too long. Commands
/// are not echoed: the soak runs thousands.
fn run(command: &mut Command) -> Result<String, String> {
    let program = command.get_program().to_string_lossy().into_owned();
    let mut child = command
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .process_group(0)
        .spawn()
        .map_err(|e| format!("starting {program}: {e}"))?;
    let stdout = drain(child.stdout.take());
    let stderr = drain(child.stderr.take());
    let give_up = Instant::now() + OPERATION_DEADLINE;
    let status = loop {
        match child.try_wait() {
            Ok(Some(status)) => break status,
            Ok(None) => {}
            Err(e) => return Err(format!("waiting for {program}: {e}")),
        }
        if Instant::now() > give_up || stopping() {
            if let Ok(pid) = i32::try_from(child.id()) {
                let _ = killpg(Pid::from_raw(pid), Signal::SIGKILL);
            }
            let _ = child.wait();
            return Err(format!(
                "{program} did not finish within {OPERATION_DEADLINE:?}; killed it"
            ));
        }
        thread::sleep(Duration::from_millis(20));
    };
    let stdout = stdout.join().unwrap_or_default();
    let stderr = stderr.join().unwrap_or_default();
    if !status.success() {
        let tail: Vec<&str> = stderr.lines().rev().take(3).collect();
        return Err(format!(
            "{} ({status}): {}; stdout {:?}",
            args_of(command),
            tail.into_iter().rev().collect::<Vec<_>>().join(" | "),
            stdout.chars().take(200).collect::<String>()
        ));
    }
    Ok(stdout)
}

/// The agent's program and first argument, to name a failed command without its script.
fn args_of(command: &Command) -> String {
    let args: Vec<String> = command
        .get_args()
        .map(|a| a.to_string_lossy().into_owned())
        .collect();
    let after = args.iter().position(|a| a == "--").map_or(0, |i| i + 1);
    args.get(after..)
        .unwrap_or_default()
        .iter()
        .take(2)
        .map(|a| {
            Path::new(a)
                .file_name()
                .map_or(a.clone(), |n| n.to_string_lossy().into())
        })
        .collect::<Vec<_>>()
        .join(" ")
}

fn drain(pipe: Option<impl std::io::Read + Send + 'static>) -> thread::JoinHandle<String> {
    thread::spawn(move || {
        let mut bytes = Vec::new();
        if let Some(mut pipe) = pipe {
            let _ = pipe.read_to_end(&mut bytes);
        }
        String::from_utf8_lossy(&bytes).into_owned()
    })
}
