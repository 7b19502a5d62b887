//! The unprivileged capture mode (issue 19), end to end: `brokerd --unprivileged` runs as uid
//! 65534 without eBPF, and each agent is started by that same uid with `brokerctl run
//! --unprivileged --as NAME`, in user, network, mount and pid namespaces of its own whose nft
//! rules send every connect and DNS datagram to brokerd. Nothing here runs as root but the test
//! itself (which starts the servers, the resolver and the two programs under `setpriv`).
//!
//! - real clients (curl over HTTP/1.1 and HTTP/2, python3, node) get the secret injected, and a
//!   streamed reply arrives in pieces, with the secret scrubbed from what the API echoes;
//! - denials: a host without a rule gets brokerd's 403 and the upstream nothing; DNS answers an
//!   allowed name and refuses another; all of it is in the audit log and the console under the
//!   agent's name;
//! - a name-matched rule reaches a non-public address only where the name resolves there;
//! - the attack rows that apply: the agent cannot change the rules, routes or links, open raw,
//!   packet or vsock sockets, set SO_MARK, make namespaces, reach brokerd's control socket,
//!   signal brokerd or read its memory, or reach a host service over loopback without a rule;
//! - fail closed: once brokerd is gone, the agent's connects are refused.
//!
//! Needs root (to start servers, drop to uid 65534 and make cgroups for nothing else), curl,
//! python3, node, ip and nft. Run alone:
//! `cargo test -p agent-broker-tests --test unprivileged -- --test-threads=1`.

use std::{
    net::{IpAddr, SocketAddr},
    thread,
    time::Duration,
};

use agent_broker_protocol::EventKind;
use agent_broker_tests::{
    TestServer, TestUpstream, UpstreamOptions,
    agent::agent_python,
    clients::{self, Call, Proto, node_client, python_client, run_in_cgroup},
    poll_until,
    world::{API, OTHER, World, api_ip, rule},
};

/// The user brokerd and its agents run as.
const UID: u32 = 65534;

/// What brokerd writes in place of a secret value an upstream echoed.
const REDACTED: &str = "[redacted by agent-broker]";

/// A name no policy allows.
const UNALLOWED: &str = "exfil.example.test";

#[test]
fn real_clients_get_the_secret_injected_from_a_sandbox_without_root() {
    let w = World::unprivileged(UID);
    let status = w.broker.status();
    assert!(status.unprivileged, "status says the mode");
    assert!(
        status.cgroups.is_empty(),
        "an unprivileged brokerd tags no cgroup: {:?}",
        status.cgroups
    );
    assert!(
        status.lsm.contains("--unprivileged"),
        "status says the mode: {}",
        status.lsm
    );
    for proto in [Proto::Http1, Proto::Http2] {
        let what = format!("curl {proto:?}");
        let (run, report) = clients::curl(
            &w.broker,
            &w.agent,
            &w.trust(),
            &w.call("/hash").proto(proto),
        );
        w.assert_injected(&what, &run, &report);
    }
    let (run, report) = python_client(
        &w.broker,
        &w.agent,
        &w.trust(),
        &w.call("/hash"),
        "get",
        None,
    );
    w.assert_injected("python3", &run, &report);
    for proto in [Proto::Http1, Proto::Http2] {
        let (run, report) = node_client(
            &w.broker,
            &w.agent,
            &w.trust(),
            &w.call("/hash").proto(proto),
        );
        w.assert_injected(&format!("node {proto:?}"), &run, &report);
    }
    w.assert_no_secret_in_logs();
}

#[test]
fn a_stream_arrives_in_pieces_and_an_echoed_secret_is_scrubbed() {
    use agent_broker_tests::upstream::{STREAM_CHUNK_LEN, STREAM_CHUNKS, STREAM_GAP};
    let w = World::unprivileged(UID);
    let min_spread = STREAM_GAP.as_secs_f64() * 1000.0 * (STREAM_CHUNKS as f64 - 1.0) * 0.8;
    let (run, report) = python_client(
        &w.broker,
        &w.agent,
        &w.trust(),
        &w.call("/stream"),
        "get",
        None,
    );
    assert_eq!(report.status, 200, "{}\n{}", report.show(), w.broker.log());
    assert_eq!(report.body.len(), STREAM_CHUNKS * STREAM_CHUNK_LEN);
    let spread = report.chunk_ms.last().copied().unwrap_or(0.0)
        - report.chunk_ms.first().copied().unwrap_or(0.0);
    assert!(
        report.chunk_ms.len() >= 3 && spread >= min_spread,
        "the stream should arrive as the API sends it (one piece every {STREAM_GAP:?}): \
         arrival times {:?} ms",
        report.chunk_ms
    );
    run.assert_no_secret(&w.secret);
    for proto in [Proto::Http1, Proto::Http2] {
        let what = format!("curl {proto:?} /echo");
        let (run, report) = clients::curl(
            &w.broker,
            &w.agent,
            &w.trust(),
            &w.call("/echo").proto(proto),
        );
        assert_eq!(report.status, 200, "{what}: {}", report.show());
        run.assert_no_secret(&w.secret);
        assert_eq!(
            report.json()["headers"]["authorization"].as_str(),
            Some(format!("Bearer {REDACTED}").as_str()),
            "{what}: the echoed Authorization is scrubbed: {}",
            report.show()
        );
    }
    w.assert_no_secret_in_logs();
}

#[test]
fn denials_and_dns_are_audited_under_the_agents_name_and_shown_in_the_console() {
    let w = World::unprivileged(UID);
    // A host without a rule: brokerd's 403, and the API sees nothing of it.
    let before = w.api.requests().len();
    let denied = Call::new(OTHER, api_ip(), w.api.port(), "/hash");
    let (_, report) = clients::curl(&w.broker, &w.agent, &w.trust(), &denied);
    report.assert_denied(&w.agent, "a host without a rule");
    assert_eq!(w.api.requests().len(), before, "the API must see nothing");

    // DNS: the API's name resolves through brokerd, another name is refused.
    let python = agent_python().to_string_lossy().into_owned();
    let run = run_in_cgroup(
        &w.broker,
        &w.agent,
        "dns client",
        &[],
        &[
            python,
            "-c".into(),
            agent_broker_tests::agent::DNS_RCODES_PY.into(),
            API.into(),
            UNALLOWED.into(),
        ],
    );
    let codes: Vec<String> = String::from_utf8_lossy(&run.output.stdout)
        .lines()
        .map(str::to_string)
        .collect();
    assert_eq!(
        codes,
        ["0", "5"],
        "NOERROR for {API}, REFUSED for {UNALLOWED}: {}\nbrokerd's log:\n{}",
        run.show(),
        w.broker.log()
    );

    for (kind, host) in [
        (EventKind::Denial, OTHER),
        (EventKind::Dns, API),
        (EventKind::Dns, UNALLOWED),
    ] {
        let record = w.broker.wait_record(
            &format!("{kind:?} record of {host}"),
            Duration::from_secs(5),
            |r| r.kind == Some(kind) && r.host.as_deref() == Some(host),
        );
        assert_eq!(
            record.cgroup.as_deref(),
            Some(w.agent.as_str()),
            "{kind:?} {host}: {record:?}"
        );
    }
    // The sandbox's own start is recorded too.
    w.broker
        .wait_record("the sandbox's record", Duration::from_secs(5), |r| {
            r.kind == Some(EventKind::Attach)
                && r.cgroup.as_deref() == Some(w.agent.as_str())
                && r.reason
                    .as_deref()
                    .is_some_and(|x| x.starts_with("sandbox served"))
        });

    // The console, fed by the same brokerd, shows the denial under the agent's name, and no
    // frame it draws holds the secret.
    let (feed, rx) = agent_broker_console::feed::Feed::spawn(&w.broker.run_dir())
        .unwrap_or_else(|e| panic!("console feed: {e}"));
    let mut app = agent_broker_console::app::App::new(w.broker.run_dir().display().to_string());
    let shown = |app: &agent_broker_console::app::App| {
        app.history().iter().any(|e| {
            e.denied
                && e.event.host.as_deref() == Some(OTHER)
                && e.event.cgroup.as_deref() == Some(w.agent.as_str())
        })
    };
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    while !shown(&app) && std::time::Instant::now() < deadline {
        if let Ok(msg) = rx.recv_timeout(Duration::from_millis(200)) {
            app.apply(msg);
        }
    }
    drop(feed);
    assert!(
        shown(&app),
        "the console should show the denial of {OTHER} by {}",
        w.agent
    );
    let mut terminal = ratatui::Terminal::new(ratatui::backend::TestBackend::new(120, 40))
        .unwrap_or_else(|e| panic!("test terminal: {e}"));
    terminal
        .draw(|f| agent_broker_console::ui::render(f, &app))
        .unwrap_or_else(|e| panic!("draw: {e}"));
    let text: String = terminal
        .backend()
        .buffer()
        .content()
        .iter()
        .map(|c| c.symbol())
        .collect();
    w.secret.assert_absent(text.as_bytes(), "a console frame");
    w.assert_no_secret_in_logs();
}

#[test]
fn a_name_matched_rule_reaches_a_non_public_address_only_where_the_name_resolves() {
    // The rule names the API by name, without injection: in root mode a certificate valid for
    // the name would do, wherever the agent dialed. From a sandbox, brokerd dials with its
    // user's own reach, so a loopback address must be proven to be the name's.
    let w = World::unprivileged_with(UID, |cg, api| {
        vec![(
            "agent".into(),
            format!(
                "cgroup = \"{}\"\n{}",
                cg.child("agent"),
                rule(API, api.port(), false)
            ),
        )]
    });
    // A server with a certificate for the same names, on another loopback address and the
    // same port, which no resolver gives for the name.
    let decoy = TestUpstream::start(
        w.upstream_ca(),
        UpstreamOptions {
            ip: IpAddr::from([127, 0, 0, 3]),
            port: w.api.port(),
            plain: false,
            ..UpstreamOptions::api()
        },
    );
    let (_, report) = clients::curl(&w.broker, &w.agent, &w.trust(), &w.call("/hash"));
    assert_eq!(
        report.status,
        200,
        "where the name resolves: {}\n{}",
        report.show(),
        w.broker.log()
    );
    let to_decoy = Call::new(API, decoy.addr().ip(), decoy.port(), "/hash");
    let (_, report) = clients::curl(&w.broker, &w.agent, &w.trust(), &to_decoy);
    let reason = report.assert_denied(&w.agent, "the name at an address it does not resolve to");
    assert!(
        reason.contains(API) && reason.contains("127.0.0.3"),
        "the refusal names the name and the address: {reason}"
    );
    thread::sleep(Duration::from_millis(300));
    assert!(
        decoy.requests().is_empty() && decoy.handshakes() == 0,
        "the decoy must receive nothing: {:?}",
        decoy.requests()
    );
}

/// Every escape the nested agent might try, as JSON: each attempt's outcome.
const ESCAPES_PY: &str = r#"
import json, os, socket, subprocess, sys
cfg = json.loads(sys.argv[1])
out = {}
def attempt(name, fn):
    try:
        r = fn()
        out[name] = "ok" if r is None else r
    except Exception as e:
        out[name] = "%s: %s" % (type(e).__name__, e)
attempt("raw", lambda: socket.socket(socket.AF_INET, socket.SOCK_RAW, socket.IPPROTO_ICMP).close())
attempt("packet", lambda: socket.socket(socket.AF_PACKET, socket.SOCK_RAW, 0).close())
# AF_VSOCK: only whether one can be made; never connected or sent over.
attempt("vsock", lambda: socket.socket(40, socket.SOCK_STREAM).close())
def mark():
    s = socket.socket()
    s.setsockopt(socket.SOL_SOCKET, 36, 1)  # SO_MARK
attempt("so_mark", mark)
def unix(path):
    s = socket.socket(socket.AF_UNIX)
    s.settimeout(3)
    s.connect(path)
attempt("control_sock", lambda: unix(cfg["control"]))
attempt("sandbox_sock", lambda: unix(cfg["sandbox"]))
attempt("signal_broker", lambda: os.kill(cfg["broker_pid"], 0))
attempt("broker_mem", lambda: open("/proc/%d/mem" % cfg["broker_pid"], "rb").read(1))
for cmd in (["nft", "flush", "ruleset"], ["ip", "route", "del", "default"],
            ["ip", "link", "set", "lo", "down"], ["unshare", "-n", "true"],
            ["unshare", "-U", "true"]):
    try:
        r = subprocess.run(cmd, capture_output=True, timeout=10)
        out[" ".join(cmd)] = r.returncode
    except Exception as e:
        out[" ".join(cmd)] = "%s: %s" % (type(e).__name__, e)
def host_service():
    s = socket.create_connection(("127.0.0.1", cfg["host_port"]), timeout=5)
    s.sendall(b"GET /escape HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\n\r\n")
    data = b""
    while True:
        d = s.recv(4096)
        if not d:
            break
        data += d
    return data.split(b"\r\n", 1)[0].decode("latin-1")
attempt("host_service", host_service)
print(json.dumps(out), flush=True)
"#;

#[test]
fn the_sandboxed_agent_cannot_escape_or_reach_what_no_rule_allows() {
    let w = World::unprivileged(UID);
    // A host service on loopback that no rule names.
    let service = TestServer::http("127.0.0.1:0", "host service\n");
    let cfg = serde_json::json!({
        "control": w.broker.run_dir().join("control.sock"),
        "sandbox": w.broker.run_dir().join("sandbox.sock"),
        "broker_pid": w.broker.pid(),
        "host_port": service.addr().port(),
    });
    let python = agent_python().to_string_lossy().into_owned();
    let run = run_in_cgroup(
        &w.broker,
        &w.agent,
        "escape attempts",
        &[],
        &[python, "-c".into(), ESCAPES_PY.into(), cfg.to_string()],
    );
    let stdout = String::from_utf8_lossy(&run.output.stdout);
    let out: serde_json::Value = stdout
        .lines()
        .rev()
        .find_map(|l| serde_json::from_str(l).ok())
        .unwrap_or_else(|| panic!("no JSON from the agent: {}", run.show()));
    let failed = |key: &str| {
        let v = &out[key];
        assert!(
            v.as_str().is_some_and(|s| s != "ok") || v.as_i64().is_some_and(|c| c != 0),
            "the agent must fail to {key}: {v} (all: {out})"
        );
    };
    for key in [
        "raw",
        "packet",
        "vsock",
        "so_mark",
        "control_sock",
        "sandbox_sock",
        "signal_broker",
        "broker_mem",
        "nft flush ruleset",
        "ip route del default",
        "ip link set lo down",
        "unshare -n true",
        "unshare -U true",
    ] {
        failed(key);
    }
    // The host service over loopback: brokerd answered (no rule allows it), the service saw
    // nothing.
    assert_eq!(
        out["host_service"].as_str(),
        Some("HTTP/1.1 403 Forbidden"),
        "brokerd refuses the host's loopback service: {out}"
    );
    thread::sleep(Duration::from_millis(300));
    assert!(
        service.accepted().is_empty(),
        "the host service must receive nothing: {:?}",
        service.accepted()
    );
    // And the agent still works after all that.
    let (run, report) = clients::curl(&w.broker, &w.agent, &w.trust(), &w.call("/hash"));
    w.assert_injected("curl after the escape attempts", &run, &report);
}

/// Connects to `addr` once, waits for the file `go`, then connects again; prints both outcomes.
const TWICE_PY: &str = r#"
import json, os, socket, sys, time
addr, go = sys.argv[1], sys.argv[2]
host, port = addr.rsplit(":", 1)
def once():
    try:
        s = socket.create_connection((host, int(port)), timeout=5)
        s.sendall(b"GET / HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
        return s.recv(100).split(b"\r\n", 1)[0].decode("latin-1")
    except Exception as e:
        return type(e).__name__
out = {"first": once()}
print(json.dumps(out), flush=True)
deadline = time.monotonic() + 30
while not os.path.exists(go) and time.monotonic() < deadline:
    time.sleep(0.05)
out["second"] = once()
print(json.dumps(out), flush=True)
"#;

#[test]
fn once_brokerd_is_gone_the_agents_connects_are_refused() {
    let mut w = World::unprivileged(UID);
    let go = w
        .broker
        .scratch_dir()
        .join(format!("go-{}", std::process::id()));
    // TEST-NET: brokerd answers it (403, no rule); nothing routes it anywhere.
    let dst = SocketAddr::from(([192, 0, 2, 10], 80));
    let python = agent_python().to_string_lossy().into_owned();
    let go_arg = go.to_string_lossy().into_owned();
    // The agent runs in the background while the test stops brokerd between its connects.
    let handle = {
        let run_dir = w.broker.run_dir();
        let argv = vec![
            python,
            "-c".into(),
            TWICE_PY.into(),
            dst.to_string(),
            go_arg,
        ];
        let uid_cmd = agent_broker_tests::as_uid(UID, &agent_broker_tests::bin("brokerctl"));
        let mut cmd = std::process::Command::new(&uid_cmd[0]);
        cmd.args(&uid_cmd[1..])
            .arg("--run-dir")
            .arg(run_dir)
            .args(["run", "--unprivileged", "--as", &w.agent, "--"])
            .args(&argv)
            .stdout(std::process::Stdio::piped())
            .stderr(std::process::Stdio::piped());
        cmd.spawn()
            .unwrap_or_else(|e| panic!("cannot start brokerctl run: {e}"))
    };
    // brokerd served the first connect.
    let served = poll_until(Duration::from_secs(20), || {
        w.broker
            .audit_records()
            .into_iter()
            .find(|r| r.kind == Some(EventKind::Denial) && r.original_dst == Some(dst))
    });
    assert!(
        served.is_some(),
        "brokerd never saw the first connect\n{}",
        w.broker.log()
    );
    w.broker.stop();
    std::fs::write(&go, b"go").unwrap_or_else(|e| panic!("cannot write the go file: {e}"));
    let out = agent_broker_tests::wait_with_timeout(handle, Duration::from_secs(60), "the agent");
    let stdout = String::from_utf8_lossy(&out.stdout);
    let last: serde_json::Value = stdout
        .lines()
        .rev()
        .find_map(|l| serde_json::from_str(l).ok())
        .unwrap_or_else(|| {
            panic!(
                "no JSON from the agent: {stdout}\n{}",
                String::from_utf8_lossy(&out.stderr)
            )
        });
    assert_eq!(
        last["first"].as_str(),
        Some("HTTP/1.1 403 Forbidden"),
        "{last}"
    );
    assert_eq!(
        last["second"].as_str(),
        Some("ConnectionRefusedError"),
        "with brokerd gone the connect is refused, never sent on: {last}"
    );
}

/// Handles work by agent name in a sandbox as for a tagged cgroup: a handle minted for the
/// sandbox's agent and the API is swapped for the secret there, and refused from a sandbox
/// running as another agent, whose upstream then sees nothing of it.
#[test]
fn a_handle_is_swapped_for_its_sandboxs_agent_only() {
    let w = World::unprivileged_with(UID, |cg, api| {
        ["agent", "other"]
            .iter()
            .map(|sub| {
                (
                    (*sub).to_string(),
                    format!(
                        "cgroup = \"{}\"\n{}",
                        cg.child(sub),
                        rule(API, api.port(), false)
                    ),
                )
            })
            .collect()
    });
    // Printing the token once is mint's job: run outside the harness's transcript, which is
    // scanned for secrets.
    let out = agent_broker_tests::run_with_timeout(
        w.broker.ctl().args([
            "handle",
            "mint",
            "--cgroup",
            &w.agent,
            "--secret",
            agent_broker_tests::world::SECRET_NAME,
            "--host",
            API,
            "--ttl",
            "15m",
        ]),
        agent_broker_tests::SHORT,
    );
    assert!(
        out.status.success(),
        "handle mint failed ({}): {}",
        out.status,
        agent_broker_tests::canary::redact(&String::from_utf8_lossy(&out.stderr))
    );
    let token = agent_broker_tests::Canary::adopt(String::from_utf8_lossy(&out.stdout).trim());
    w.api.watch_for("handle", &token);
    let call = Call::new(API, api_ip(), w.api.port(), "/hash")
        .header("authorization", &format!("Bearer {}", token.expose()));
    let (run, report) = clients::curl(&w.broker, &w.agent, &w.trust(), &call);
    assert_eq!(
        report.status,
        200,
        "the handle's own agent: {}\n{}",
        report.show(),
        w.broker.log()
    );
    assert_eq!(
        report.json()["authorization_sha256"].as_str(),
        Some(w.injected_hash().as_str()),
        "the API must receive the secret in place of the handle: {}",
        report.show()
    );
    run.assert_no_secret(&w.secret);
    let before = w.api.requests().len();
    let other = w.cg.child("other");
    let (_, report) = clients::curl(&w.broker, &other, &w.trust(), &call);
    report.assert_denied(&other, "a handle from another agent's sandbox");
    assert_eq!(
        w.api.requests().len(),
        before,
        "the API must see nothing of the refused call"
    );
    w.assert_no_secret_in_logs();
}
