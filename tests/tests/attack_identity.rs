//! Issue 13, items 1, 10 and 18: attacks on whom brokerd takes a connection for, and on whom it
//! hands a credential to (THREAT-MODEL.md 7.2 N57, N64 and N69).
//!
//! - N57: a redirect record is made under the agent socket's local address when its SYN is about
//!   to leave. A connect that never reaches brokerd's `accept` (brokerd down or restarting, a
//!   SYN the listener drops because it carries a TCP-MD5 option) used to leave that record
//!   behind, and an unprivileged process outside every tagged cgroup that then dialed brokerd
//!   from the same address was served as the agent: the agent's policy and injected key, and an
//!   audit record naming the agent. Now the record dies with its socket, and brokerd serves a
//!   connection only if its far end is the very socket the kernel redirected. Both ways of
//!   leaving a record are tried: brokerd killed (the socket is refused and closes), and a TCP-MD5
//!   SYN with the agent's socket kept open (the record lives; the impostor shares the address
//!   with `SO_REUSEADDR` and dials the restarted brokerd's new port).
//! - N64: an agent listens on the address and port a `plain_http` rule names while the service
//!   is down; another agent calls the service through brokerd with the rule injecting the key.
//! - N69: another server holds a valid certificate for the rule's host (a wildcard or shared
//!   one); the agent dials it and names the host. The key goes only to addresses the host
//!   resolves to, unless every level's rule says `any_address = true`.
//!
//! Each test: the attack fails (the outside process gets no TLS session, the squatter receives
//! no byte), the real agent's calls still succeed with the key injected, and the audit log has
//! the denial with its reason. Agent and outsider run as uid 65534 (python drops to it first).
//!
//! Needs root, cgroup v2 and BPF, python3 (/usr/bin/python3) and curl.
//!
//! Run as root: `cargo test -p agent-broker-tests --test attack_identity -- --test-threads=1`.

use std::{
    io::{BufRead as _, BufReader, Read as _},
    net::{IpAddr, Ipv4Addr, SocketAddr, TcpListener},
    process::{Child, ChildStdout, Command, Stdio},
    time::Duration,
};

use agent_broker_protocol::{AuditEvent, Decision, EventKind, Outcome};
use agent_broker_tests::{
    TestCa, TestUpstream, UpstreamOptions,
    agent::agent_python,
    clients::{self, Call},
    poll_until, redact, spawn_in_cgroup, wait_with_timeout,
    world::{API, SECRET_NAME, World, rule},
};

/// The agent's half of N57, inside the tagged cgroup. Arguments: MODE PORT DST_IP DST_PORT.
/// Binds 127.0.0.1:PORT (with SO_REUSEADDR, so an accomplice may share it) and connects to DST.
/// `refused`: a plain connect (brokerd is down), then close. `md5`: a TCP-MD5 key for brokerd's
/// address makes brokerd's listener drop the SYN; the socket is kept (SYN_SENT) until stdin
/// closes. Prints one JSON line.
const AGENT_PY: &str = r#"
import json, os, socket, struct, sys, time
mode, port, dst_ip, dst_port = sys.argv[1], int(sys.argv[2]), sys.argv[3], int(sys.argv[4])
os.setgroups([]); os.setgid(65534); os.setuid(65534)
out = {"uid": os.getuid(), "pid": os.getpid()}
s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
s.bind(("127.0.0.1", port))
out["local"] = "%s:%d" % s.getsockname()
if mode == "md5":
    # struct tcp_md5sig: sockaddr_storage (128), flags, prefixlen, keylen, ifindex, key[80].
    peer = struct.pack("=H", socket.AF_INET) + struct.pack(">H", 0) + socket.inet_aton("127.0.0.1")
    key = b"abtest-md5-key"
    sig = peer.ljust(128, b"\0") + struct.pack("=BBHi", 0, 0, len(key), 0) + key.ljust(80, b"\0")
    s.setsockopt(socket.IPPROTO_TCP, 14, sig)  # TCP_MD5SIG
    s.setblocking(False)
    try:
        s.connect((dst_ip, dst_port))
        out["connect"] = "connected"
    except BlockingIOError:
        out["connect"] = "in progress"
    except OSError as e:
        out["connect"] = "errno %d" % e.errno
    time.sleep(0.5)
    info = s.getsockopt(socket.IPPROTO_TCP, socket.TCP_INFO, 8)
    out["state"] = info[0]  # 2: SYN_SENT
    print(json.dumps(out), flush=True)
    sys.stdin.read()
else:
    s.settimeout(5)
    try:
        s.connect((dst_ip, dst_port))
        out["connect"] = "connected"
    except OSError as e:
        out["connect"] = "errno %d" % (e.errno or 0)
    print(json.dumps(out), flush=True)
s.close()
"#;

/// The process outside every tagged cgroup (N57). Arguments: PORT BROKER_PORT HOST CA
/// PLACEHOLDER. Binds 127.0.0.1:PORT (SO_REUSEADDR), dials brokerd's IPv4 listener, speaks TLS
/// for HOST trusting the broker CA and asks for /hash with the placeholder, as the agent would.
/// Prints one JSON line: `outcome` is `no TLS: ...` or `HTTP <status>` (with the body).
const OUTSIDER_PY: &str = r#"
import json, os, socket, ssl, sys
port, broker_port, host, ca, placeholder = int(sys.argv[1]), int(sys.argv[2]), sys.argv[3], sys.argv[4], sys.argv[5]
ctx = ssl.create_default_context(cafile=ca)
os.setgroups([]); os.setgid(65534); os.setuid(65534)
out = {"uid": os.getuid()}
s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
s.settimeout(10)
try:
    s.bind(("127.0.0.1", port))
    out["local"] = "%s:%d" % s.getsockname()
    s.connect(("127.0.0.1", broker_port))
except OSError as e:
    out["outcome"] = "socket errno %d" % (e.errno or 0)
    print(json.dumps(out), flush=True)
    sys.exit(0)
try:
    t = ctx.wrap_socket(s, server_hostname=host)
except (ssl.SSLError, OSError) as e:
    out["outcome"] = "no TLS: %s" % type(e).__name__
    print(json.dumps(out), flush=True)
    sys.exit(0)
req = "GET /hash HTTP/1.1\r\nHost: %s\r\nAuthorization: Bearer %s\r\nConnection: close\r\n\r\n" % (host, placeholder)
t.sendall(req.encode())
data = b""
try:
    while True:
        chunk = t.recv(65536)
        if not chunk:
            break
        data += chunk
except (ssl.SSLError, OSError):
    pass
head, _, body = data.partition(b"\r\n\r\n")
status = head.split(b" ")[1].decode() if head.startswith(b"HTTP/") else "none"
out["outcome"] = "HTTP " + status
out["body"] = body.decode("utf-8", "replace")
print(json.dumps(out), flush=True)
"#;

/// The squatter of N64, an agent in its own tagged cgroup. Arguments: IP PORT. Listens there
/// (the service's address while it is down), answers any request with 200, and when stdin
/// closes prints one JSON line (connections, bytes received) and then the received bytes.
const SQUATTER_PY: &str = r#"
import json, os, socket, sys, threading
ip, port = sys.argv[1], int(sys.argv[2])
os.setgroups([]); os.setgid(65534); os.setuid(65534)
l = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
l.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
l.bind((ip, port))
l.listen(16)
print(json.dumps({"listening": "%s:%d" % l.getsockname(), "uid": os.getuid()}), flush=True)
got = {"connections": 0}
received = bytearray()
def serve():
    while True:
        try:
            c, _ = l.accept()
        except OSError:
            return
        got["connections"] += 1
        c.settimeout(5)
        try:
            while True:
                d = c.recv(65536)
                if not d:
                    break
                received.extend(d)
                if b"\r\n\r\n" in received:
                    c.sendall(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\nConnection: close\r\n\r\nok")
                    break
        except OSError:
            pass
        c.close()
threading.Thread(target=serve, daemon=True).start()
sys.stdin.read()
got["bytes"] = len(received)
sys.stdout.write(json.dumps(got) + "\n")
sys.stdout.flush()
sys.stdout.buffer.write(bytes(received))
sys.stdout.flush()
"#;

/// A free TCP port on `ip` (bound, then released).
fn free_port(ip: Ipv4Addr) -> u16 {
    TcpListener::bind((ip, 0))
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .unwrap_or_else(|e| panic!("no free port on {ip}: {e}"))
}

/// A python process started in cgroup `rel` (None: the test's own, outside every tagged
/// cgroup) with stdin and stdout piped.
fn python(rel: Option<&str>, script: &str, args: &[String]) -> Child {
    let mut cmd = Command::new(agent_python());
    cmd.arg("-c")
        .arg(script)
        .args(args)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    match rel {
        Some(rel) => spawn_in_cgroup(rel, &mut cmd),
        None => cmd
            .spawn()
            .unwrap_or_else(|e| panic!("cannot start python: {e}")),
    }
}

/// Reads the first line a process printed, as JSON.
fn first_json(out: &mut BufReader<ChildStdout>, what: &str) -> serde_json::Value {
    let mut line = String::new();
    out.read_line(&mut line)
        .unwrap_or_else(|e| panic!("{what}: no output: {e}"));
    serde_json::from_str(line.trim())
        .unwrap_or_else(|e| panic!("{what} printed no JSON line ({e}): {line:?}"))
}

/// Runs a python process to its end and returns its JSON line.
fn run_python(rel: Option<&str>, script: &str, args: &[String], what: &str) -> serde_json::Value {
    let mut child = python(rel, script, args);
    drop(child.stdin.take());
    let out = wait_with_timeout(child, Duration::from_secs(30), what);
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{what} failed ({}): {}\nstderr: {}",
        out.status,
        redact(&stdout),
        redact(&String::from_utf8_lossy(&out.stderr))
    );
    serde_json::from_str(stdout.trim())
        .unwrap_or_else(|e| panic!("{what} printed no JSON ({e}): {}", redact(&stdout)))
}

/// brokerd's IPv4 listener.
fn broker_v4(w: &World) -> SocketAddr {
    w.broker
        .status()
        .listeners
        .into_iter()
        .find(SocketAddr::is_ipv4)
        .unwrap_or_else(|| panic!("brokerd reports no IPv4 listener"))
}

/// The agent's call through curl, with the placeholder: must get the key injected.
fn victim_call_succeeds(w: &World, what: &str) {
    let (run, report) = clients::curl(&w.broker, &w.agent, &w.trust(), &w.call("/hash"));
    w.assert_injected(what, &run, &report);
}

/// A world whose agent cgroup exists and is tagged, with a successful call to prove it.
fn tagged_world() -> World {
    let w = World::new();
    w.cg.create_child("agent");
    w.broker.attach(&w.agent);
    victim_call_succeeds(&w, "the agent's call before the attack");
    w
}

/// Waits for the audited denial of the outsider's connection (from `local`): it must name no
/// agent and give the reason. Returns it.
fn audited_refusal(w: &World, local: SocketAddr) -> AuditEvent {
    let peer = local.to_string();
    let found = poll_until(Duration::from_secs(5), || {
        w.broker.audit_records().into_iter().find(|e| {
            e.kind == Some(EventKind::Denial)
                && e.reason
                    .as_deref()
                    .is_some_and(|r| r.contains("connection refused") && r.contains(&peer))
        })
    });
    let event = found.unwrap_or_else(|| {
        panic!(
            "no audited refusal of the connection from {peer}: {:#?}\nbrokerd's log:\n{}",
            w.broker.audit_records(),
            w.broker.log()
        )
    });
    assert_eq!(event.decision, Some(Decision::Deny), "{event:?}");
    assert_eq!(event.cgroup, None, "the refusal names no agent: {event:?}");
    assert_eq!(event.pid, None, "{event:?}");
    assert!(event.secrets.is_empty(), "{event:?}");
    event
}

/// Asserts the outsider got nothing: no TLS session (brokerd closed the connection), no request
/// at the API since `before`, the connection recorded as refused without an origin, nothing in
/// the audit log attributed to the agent from that address.
fn assert_outsider_refused(
    w: &World,
    outsider: &serde_json::Value,
    local: SocketAddr,
    before: usize,
) {
    let outcome = outsider["outcome"].as_str().unwrap_or("");
    assert!(
        outcome.starts_with("no TLS"),
        "the process outside the tagged cgroups must not be served as the agent: {}\nbrokerd's \
         log:\n{}",
        redact(&outsider.to_string()),
        w.broker.log()
    );
    assert_eq!(outsider["uid"], 65534, "{outsider}");
    assert_eq!(outsider["local"].as_str(), Some(local.to_string().as_str()));
    std::thread::sleep(Duration::from_millis(200));
    let after = w.api.requests();
    assert_eq!(
        after.len(),
        before,
        "the API received a request through the outsider's connection: {:#?}",
        &after[before..]
    );
    let refused = w.broker.wait_connection("the outsider's connection", |c| {
        c.peer == local && matches!(c.outcome, Outcome::Refused { .. })
    });
    assert!(refused.origin.is_none(), "{refused:?}");
    assert!(
        !w.broker
            .connections()
            .iter()
            .any(|c| c.peer == local && c.origin.is_some()),
        "brokerd attributed a connection from {local} to an agent: {:#?}",
        w.broker.connections()
    );
    w.assert_no_secret_in_logs();
}

#[test]
fn a_connect_refused_while_brokerd_is_down_lends_its_identity_to_no_process() {
    let mut w = tagged_world();
    let port = free_port(Ipv4Addr::LOCALHOST);
    let local = SocketAddr::from((Ipv4Addr::LOCALHOST, port));
    let api = w.api.addr();

    // The agent's connect while brokerd is down: redirected, refused, never accepted.
    w.broker.kill9();
    let agent = run_python(
        Some(&w.agent),
        AGENT_PY,
        &[
            "refused".into(),
            port.to_string(),
            api.ip().to_string(),
            api.port().to_string(),
        ],
        "the agent's connect",
    );
    assert_eq!(
        agent["connect"].as_str(),
        Some(format!("errno {}", libc::ECONNREFUSED).as_str()),
        "{agent}"
    );
    assert_eq!(agent["local"].as_str(), Some(local.to_string().as_str()));
    w.broker.restart();

    // A process outside every tagged cgroup takes the address and dials brokerd.
    let before = w.api.requests().len();
    let outsider = run_python(
        None,
        OUTSIDER_PY,
        &[
            port.to_string(),
            broker_v4(&w).port().to_string(),
            API.into(),
            w.broker_ca.to_string_lossy().into_owned(),
            w.placeholder.expose().into(),
        ],
        "the outsider",
    );
    assert_outsider_refused(&w, &outsider, local, before);
    let event = audited_refusal(&w, local);
    // The record died with the agent's socket: there is none left to misuse.
    assert!(
        event
            .reason
            .as_deref()
            .is_some_and(|r| r.contains("no redirect record")),
        "{event:?}"
    );

    victim_call_succeeds(&w, "the agent's call after the attack");
}

#[test]
fn an_agent_socket_whose_syn_brokerd_dropped_lends_its_identity_to_no_process() {
    let mut w = tagged_world();
    let port = free_port(Ipv4Addr::LOCALHOST);
    let local = SocketAddr::from((Ipv4Addr::LOCALHOST, port));
    let api = w.api.addr();

    // The agent's connect carries a TCP-MD5 option: brokerd's listener drops the SYN, and the
    // agent keeps the socket (and so its record) alive.
    let mut agent = python(
        Some(&w.agent),
        AGENT_PY,
        &[
            "md5".into(),
            port.to_string(),
            api.ip().to_string(),
            api.port().to_string(),
        ],
    );
    let mut agent_out = BufReader::new(agent.stdout.take().expect("agent stdout"));
    let report = first_json(&mut agent_out, "the agent's MD5 connect");
    assert_eq!(report["connect"].as_str(), Some("in progress"), "{report}");
    assert_eq!(
        report["state"], 2,
        "the agent's socket waits in SYN_SENT: {report}"
    );
    assert_eq!(report["uid"], 65534, "{report}");

    // brokerd restarts (on a new port: the harness lets the kernel pick), so a connection from
    // the agent socket's address is no longer the agent socket's own address pair.
    w.broker.kill9();
    w.broker.restart();
    let before = w.api.requests().len();
    let outsider = run_python(
        None,
        OUTSIDER_PY,
        &[
            port.to_string(),
            broker_v4(&w).port().to_string(),
            API.into(),
            w.broker_ca.to_string_lossy().into_owned(),
            w.placeholder.expose().into(),
        ],
        "the outsider",
    );
    assert_outsider_refused(&w, &outsider, local, before);
    let event = audited_refusal(&w, local);
    // A record for the address exists (its socket lives), but it is another socket's.
    assert!(
        event
            .reason
            .as_deref()
            .is_some_and(|r| r.contains("is not the socket that was redirected")),
        "{event:?}"
    );

    drop(agent.stdin.take());
    let mut rest = Vec::new();
    let _ = agent_out.read_to_end(&mut rest);
    let out = wait_with_timeout(agent, Duration::from_secs(10), "the agent");
    assert!(
        out.status.success(),
        "the agent failed: {}",
        redact(&String::from_utf8_lossy(&out.stderr))
    );

    victim_call_succeeds(&w, "the agent's call after the attack");
}

#[test]
fn an_agent_listening_on_a_plain_http_services_address_receives_no_credential() {
    // The service: plain HTTP on 127.0.0.3:<port>, down for now. The agent's rule injects the
    // key there (plain_http = true).
    let service_ip = Ipv4Addr::new(127, 0, 0, 3);
    let port = free_port(service_ip);
    let service = SocketAddr::from((service_ip, port));
    let w = World::with_policies(|cg, api| {
        vec![(
            "agent".into(),
            format!(
                "cgroup = \"{}\"\n{}\n[[allow]]\nhost = \"{service_ip}\"\nport = {port}\n\
                 plain_http = true\n\
                 inject.headers = {{ authorization = \"Bearer {{secret:{SECRET_NAME}}}\" }}\n",
                cg.child("agent"),
                rule(API, api.port(), true),
            ),
        )]
    });
    let squatter_cg = w.cg.create_child("squatter");
    w.broker.attach(&squatter_cg);

    // Another agent listens on the service's address.
    let mut squatter = python(
        Some(&squatter_cg),
        SQUATTER_PY,
        &[service_ip.to_string(), port.to_string()],
    );
    let mut squatter_out = BufReader::new(squatter.stdout.take().expect("squatter stdout"));
    let ready = first_json(&mut squatter_out, "the squatter");
    assert_eq!(
        ready["listening"].as_str(),
        Some(service.to_string().as_str())
    );
    assert_eq!(ready["uid"], 65534, "{ready}");

    // The agent calls the service: the rule would inject the key.
    let call = |what: &str| {
        let argv: Vec<String> = vec![
            "curl".into(),
            "-sS".into(),
            "--noproxy".into(),
            "*".into(),
            "--max-time".into(),
            "20".into(),
            "-H".into(),
            format!("Authorization: Bearer {}", w.placeholder.expose()),
            "-w".into(),
            "%{stderr}ABTEST status=%{http_code}\\n".into(),
            format!("http://{service}/hash"),
        ];
        let run = clients::run_in_cgroup(&w.broker, &w.agent, what, &[], &argv);
        let status: u16 = String::from_utf8_lossy(&run.output.stderr)
            .lines()
            .find_map(|l| l.strip_prefix("ABTEST status="))
            .and_then(|s| s.trim().parse().ok())
            .unwrap_or(0);
        (run, status)
    };
    let (run, status) = call("curl to the squatted service");
    run.assert_no_secret(&w.secret);
    assert_eq!(
        status,
        403,
        "{}\nbrokerd's log:\n{}",
        run.show(),
        w.broker.log()
    );
    let body = String::from_utf8_lossy(&run.output.stdout);
    assert!(
        body.contains("agent cgroup") && body.contains(&squatter_cg),
        "the denial names the listener's agent: {}",
        run.show()
    );

    drop(squatter.stdin.take());
    let mut rest = Vec::new();
    squatter_out
        .read_to_end(&mut rest)
        .unwrap_or_else(|e| panic!("the squatter's output: {e}"));
    let out = wait_with_timeout(squatter, Duration::from_secs(10), "the squatter");
    assert!(
        out.status.success(),
        "the squatter failed: {}",
        redact(&String::from_utf8_lossy(&out.stderr))
    );
    w.secret.assert_absent(&rest, "what the squatter received");
    let text = String::from_utf8_lossy(&rest);
    let got: serde_json::Value = text
        .lines()
        .next()
        .and_then(|l| serde_json::from_str(l).ok())
        .unwrap_or_else(|| panic!("the squatter printed no report: {}", redact(&text)));
    assert!(
        got["connections"].as_u64().unwrap_or(0) >= 1,
        "brokerd never dialed the squatted address (the test proved nothing): {got}"
    );
    assert_eq!(got["bytes"], 0, "the squatter received bytes: {got}");

    let denial = poll_until(Duration::from_secs(5), || {
        w.broker.audit_records().into_iter().find(|e| {
            e.decision == Some(Decision::Deny)
                && e.original_dst == Some(service)
                && e.reason.as_deref().is_some_and(|r| {
                    r.contains("brokerd sends no credential to an agent's listener")
                })
        })
    })
    .unwrap_or_else(|| {
        panic!(
            "no audited denial for the squatted service: {:#?}",
            w.broker.audit_records()
        )
    });
    assert_eq!(
        denial.cgroup.as_deref(),
        Some(w.agent.as_str()),
        "{denial:?}"
    );
    assert_eq!(denial.status, Some(403), "{denial:?}");

    // The service is back: the same call gets the key injected.
    let svc = TestUpstream::start(
        &agent_broker_tests::TestCa::new("abtest plain service CA"),
        UpstreamOptions {
            ip: IpAddr::V4(service_ip),
            plain_port: port,
            ..UpstreamOptions::api()
        },
    );
    assert_eq!(svc.plain_addr(), service);
    svc.watch_for("secret", &w.secret);
    let (run, status) = call("curl to the service");
    run.assert_no_secret(&w.secret);
    assert_eq!(
        status,
        200,
        "{}\nbrokerd's log:\n{}",
        run.show(),
        w.broker.log()
    );
    let record = svc
        .requests()
        .into_iter()
        .find(|r| r.path == "/hash")
        .unwrap_or_else(|| {
            panic!(
                "the service has no record of the call: {:#?}",
                svc.requests()
            )
        });
    assert_eq!(
        record.header_hash("authorization"),
        Some(w.injected_hash().as_str()),
        "{record:?}"
    );
    w.assert_no_secret_in_logs();

    // The victim's HTTPS calls are unaffected.
    victim_call_succeeds(&w, "the agent's HTTPS call");
}

/// N69 (issue 13.18): another server holds a certificate valid for the rule's host (a wildcard
/// or a shared one; here the CA brokerd trusts upstream issued it for api.example.test) at an
/// address the name does not resolve to (brokerd's resolver gives api.example.test 127.0.0.2
/// only). An agent that dials that server and names the host gets a 403 naming both, the
/// server receives nothing, and the audit log says why. The agent's own calls to the API still
/// get the key. A rule with `any_address = true` lets the certificate alone decide: then the key
/// goes there.
#[test]
fn a_credential_goes_only_to_an_address_its_host_resolves_to() {
    let ca = TestCa::new("abtest upstream CA");
    let decoy_ip = Ipv4Addr::new(127, 0, 0, 5);
    let decoy_options = UpstreamOptions {
        ip: IpAddr::V4(decoy_ip),
        plain: false,
        ..UpstreamOptions::api()
    };
    // Two servers there with valid certificates for the API's name: one under the plain rule,
    // one under a rule that opts out.
    let decoy = TestUpstream::start(&ca, decoy_options.clone());
    let opted = TestUpstream::start(&ca, decoy_options);
    let (decoy_port, opted_port) = (decoy.port(), opted.port());
    let w = World::with_ca(ca, |cg, api| {
        vec![(
            "agent".into(),
            format!(
                "cgroup = \"{}\"\n{}{}budget = {{ requests_per_day = 1 }}\n{}any_address = true\n",
                cg.child("agent"),
                rule(API, api.port(), true),
                rule(API, decoy_port, true),
                rule(API, opted_port, true),
            ),
        )]
    });
    for server in [&decoy, &opted] {
        server.watch_for("secret", &w.secret);
        server.watch_for("placeholder", &w.placeholder);
    }
    w.cg.create_child("agent");
    w.broker.attach(&w.agent);
    let bearer = format!("Bearer {}", w.placeholder.expose());

    // The attack: the decoy's address, the API's name. Twice: the decoy's rule allows one
    // request a day, and a request the name check refuses must not use it up (the second is
    // refused for the address again, not for the budget).
    let call =
        Call::new(API, IpAddr::V4(decoy_ip), decoy_port, "/hash").header("authorization", &bearer);
    let mut reason = String::new();
    for attempt in ["the call to the decoy", "the second call to the decoy"] {
        let (run, report) = clients::curl(&w.broker, &w.agent, &w.trust(), &call);
        run.assert_no_secret(&w.secret);
        reason = report.assert_denied(&w.agent, attempt);
        assert!(
            reason.contains("nothing proves that"),
            "{attempt}: refused for something else: {reason}"
        );
    }
    let dialed = SocketAddr::from((decoy_ip, decoy_port));
    for part in [
        "a credential for api.example.test",
        "nothing proves that 127.0.0.5 is api.example.test",
        "api.example.test resolves to 127.0.0.2",
        "any_address = true",
    ] {
        assert!(
            reason.contains(part),
            "{part:?} missing from the refusal: {reason}"
        );
    }
    std::thread::sleep(Duration::from_millis(200));
    assert_eq!(
        (decoy.connections(), decoy.requests().len()),
        (0, 0),
        "the decoy was reached: {:#?}",
        decoy.requests()
    );
    let denial = poll_until(Duration::from_secs(5), || {
        w.broker.audit_records().into_iter().find(|e| {
            e.decision == Some(Decision::Deny)
                && e.original_dst == Some(dialed)
                && e.reason.as_deref().is_some_and(|r| {
                    r.contains("nothing proves that 127.0.0.5 is api.example.test")
                })
        })
    })
    .unwrap_or_else(|| {
        panic!(
            "no audited denial for the call to the decoy: {:#?}",
            w.broker.audit_records()
        )
    });
    assert_eq!(
        denial.cgroup.as_deref(),
        Some(w.agent.as_str()),
        "{denial:?}"
    );
    assert_eq!(denial.status, Some(403), "{denial:?}");
    assert_eq!(denial.host.as_deref(), Some(API), "{denial:?}");

    // The victim's own call: the name's address, the key injected.
    victim_call_succeeds(&w, "the agent's call to the API");

    // A rule that opts out: the certificate alone decides, and the key goes to that server.
    let call =
        Call::new(API, IpAddr::V4(decoy_ip), opted_port, "/hash").header("authorization", &bearer);
    let (run, report) = clients::curl(&w.broker, &w.agent, &w.trust(), &call);
    run.assert_no_secret(&w.secret);
    assert_eq!(
        report.status,
        200,
        "with any_address = true: {}\nbrokerd's log:\n{}",
        report.show(),
        w.broker.log()
    );
    let record = opted
        .requests()
        .into_iter()
        .find(|r| r.path == "/hash")
        .unwrap_or_else(|| panic!("the opted-out server has no record of the call"));
    assert_eq!(
        record.header_hash("authorization"),
        Some(w.injected_hash().as_str()),
        "{record:?}"
    );
    assert_eq!(record.peer_owner, Some(w.broker.pid()), "{record:?}");
    w.assert_no_secret_in_logs();
}
