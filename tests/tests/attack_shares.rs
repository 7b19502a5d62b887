//! Issue 13, items 7 and 14, against a real brokerd and the real kernel path: one agent cannot
//! make brokerd unavailable to the others.
//!
//! - 7: an agent that opens far more connections than its share (`[shares] connections`) gets
//!   only its share; the rest are closed at once. Meanwhile the other agent's call still gets
//!   its key injected, `brokerctl status` answers and shows the attacker at its share, and the
//!   refusals are in the audit log, summed.
//! - 14: a flood of DNS queries for names the policy does not allow grows the audit log by a
//!   handful of records, not one per query, and the other agent still resolves its names.
//!
//! Needs root, cgroup v2 and BPF, python3 (/usr/bin/python3) and curl.
//!
//! Run as root: `cargo test -p agent-broker-tests --test attack_shares -- --test-threads=1`.

use std::{
    io::{BufRead as _, BufReader},
    process::{Command, Stdio},
    time::{Duration, Instant},
};

use agent_broker_protocol::{AuditEvent, EventKind};
use agent_broker_tests::{
    agent::agent_python,
    clients, poll_until, spawn_in_cgroup, wait_with_timeout,
    world::{API, World, api_ip, rule},
};

/// How many connections the attacker may hold.
const SHARE: u64 = 20;

/// Opens `n` TLS connections to the API (redirected to brokerd), reports how many completed the
/// handshake and how many are still open a moment later, then holds them until stdin closes.
const HOLD_PY: &str = r#"
import json, socket, ssl, sys, time
host, port, n, ca = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), sys.argv[4]
ctx = ssl.create_default_context(cafile=ca)
held, failed = [], 0
for i in range(n):
    s = socket.socket()
    s.settimeout(5)
    try:
        s.connect((host, port))
        held.append(ctx.wrap_socket(s, server_hostname="api.example.test"))
    except (OSError, ssl.SSLError):
        failed += 1
        s.close()
time.sleep(1.5)
still_open = 0
for t in held:
    t.setblocking(False)
    try:
        t.recv(1)
    except ssl.SSLWantReadError:
        still_open += 1
    except (OSError, ssl.SSLError):
        pass
print(json.dumps({"handshakes": len(held), "failed": failed, "open": still_open}), flush=True)
sys.stdin.read()
"#;

/// Sends `n` DNS queries (A, names under `suffix`) to port 53 (redirected to brokerd), reading
/// what answers come back, and reports the response codes; then one query for `name` alone.
const DNS_PY: &str = r#"
import json, random, socket, struct, sys, time
n, suffix, name = int(sys.argv[1]), sys.argv[2], sys.argv[3]
def query(qid, qname):
    q = struct.pack(">HHHHHH", qid, 0x0100, 1, 0, 0, 0)
    for label in qname.split("."):
        q += bytes([len(label)]) + label.encode()
    return q + b"\x00" + struct.pack(">HH", 1, 1)
s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
s.setblocking(False)
codes = {}
def drain():
    while True:
        try:
            r = s.recv(4096)
        except BlockingIOError:
            return
        rc = str(r[3] & 0x0f)
        codes[rc] = codes.get(rc, 0) + 1
paced = 0
for i in range(n):
    label = "%x" % random.getrandbits(48)
    try:
        s.sendto(query(i & 0xffff, label + "." + suffix), ("127.0.0.53", 53))
    except PermissionError:
        # Past the kernel's pace of one cgroup's DNS datagrams (2048 a second).
        paced += 1
    if i % 50 == 0:
        drain()
deadline = time.time() + 2
while time.time() < deadline:
    drain()
    time.sleep(0.05)
out = {"sent": n, "paced": paced, "codes": codes}
if name:
    time.sleep(1.2)  # a new second of the share
    s.setblocking(True)
    s.settimeout(5)
    s.sendto(query(4242, name), ("127.0.0.53", 53))
    while True:
        r = s.recv(4096)
        if struct.unpack(">H", r[:2])[0] == 4242:
            out["single"] = r[3] & 0x0f
            break
print(json.dumps(out), flush=True)
"#;

fn attacker_policies(w_cg: &agent_broker_tests::cgroup::TestCgroup, port: u16) -> String {
    format!(
        "cgroup = \"{}\"\n{}\n[shares]\nconnections = {SHARE}\ndns_queries_per_second = 50\n",
        w_cg.child("attacker"),
        rule(API, port, true)
    )
}

/// Both agents' cgroups exist below the test's cgroup, which is tagged.
fn world() -> World {
    let w = World::with_policies(|cg, api| {
        vec![
            (
                "agent".into(),
                format!(
                    "cgroup = \"{}\"\n{}",
                    cg.child("agent"),
                    rule(API, api.port(), true)
                ),
            ),
            ("attacker".into(), attacker_policies(cg, api.port())),
        ]
    });
    w.cg.create_child("agent");
    w.cg.create_child("attacker");
    w.broker.attach(w.cg.path());
    w
}

/// The victim's call still gets its key injected.
fn assert_victim_served(w: &World, what: &str) {
    let (run, report) = clients::curl(&w.broker, &w.agent, &w.trust(), &w.call("/hash"));
    assert_eq!(
        report.status,
        200,
        "{what}: {}\n{}",
        report.show(),
        run.show()
    );
    assert_eq!(
        report.json()["authorization_sha256"].as_str(),
        Some(w.injected_hash().as_str()),
        "{what}: the victim's key was not injected"
    );
    run.assert_no_secret(&w.secret);
}

/// The records of `cgroup` matching `pred`, once `done` holds for them.
fn records(
    w: &World,
    cgroup: &str,
    pred: impl Fn(&AuditEvent) -> bool,
    done: impl Fn(&[AuditEvent]) -> bool,
) -> Vec<AuditEvent> {
    poll_until(Duration::from_secs(10), || {
        let found: Vec<AuditEvent> = w
            .broker
            .audit_records()
            .into_iter()
            .filter(|r| r.cgroup.as_deref() == Some(cgroup) && pred(r))
            .collect();
        done(&found).then_some(found)
    })
    .unwrap_or_else(|| {
        panic!(
            "no records of {cgroup} as expected: {:#?}\nbrokerd's log:\n{}",
            w.broker.audit_records(),
            w.broker.log()
        )
    })
}

#[test]
fn an_agent_holding_connections_past_its_share_stops_neither_the_others_nor_status() {
    let w = world();
    let attacker = w.cg.child("attacker");
    let tried = 100u64;
    let mut cmd = Command::new(agent_python());
    cmd.arg("-c")
        .arg(HOLD_PY)
        .args([
            api_ip().to_string(),
            w.api.port().to_string(),
            tried.to_string(),
            w.broker_ca.display().to_string(),
        ])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    let mut child = spawn_in_cgroup(&attacker, &mut cmd);
    let mut line = String::new();
    BufReader::new(child.stdout.take().expect("stdout"))
        .read_line(&mut line)
        .expect("the attacker's report");
    let report: serde_json::Value = serde_json::from_str(line.trim())
        .unwrap_or_else(|e| panic!("no JSON from the attacker ({e}): {line:?}"));
    assert_eq!(report["handshakes"], SHARE, "only its share: {report}");
    assert_eq!(report["open"], SHARE, "and those stay open: {report}");
    assert_eq!(report["failed"], tried - SHARE, "{report}");

    // While the attacker holds its share: status answers at once, and shows it.
    let started = Instant::now();
    let status = w.broker.status();
    assert!(
        started.elapsed() < Duration::from_secs(5),
        "status took {:?}",
        started.elapsed()
    );
    let share = status
        .shares
        .iter()
        .find(|s| s.cgroup == attacker)
        .unwrap_or_else(|| panic!("no share of {attacker} in {:#?}", status.shares));
    assert_eq!(u64::from(share.connections), SHARE);
    assert_eq!(u64::from(share.connections_limit), SHARE);
    assert_eq!(share.refused, tried - SHARE);
    assert!(status.max_connections > 1000, "{}", status.max_connections);
    // The victim is served.
    assert_victim_served(&w, "while the attacker holds its share");

    // Every refusal is in the log, summed: far fewer records than refusals.
    let refused = records(
        &w,
        &attacker,
        |r| {
            r.kind == Some(EventKind::Denial)
                && r.reason
                    .as_deref()
                    .is_some_and(|s| s.contains("shares.connections"))
        },
        |found| found.iter().map(|r| r.count.unwrap_or(1)).sum::<u64>() == tried - SHARE,
    );
    assert!(
        refused.len() <= 6,
        "{} records for {} refusals",
        refused.len(),
        tried - SHARE
    );
    drop(child.stdin.take());
    let out = wait_with_timeout(child, Duration::from_secs(20), "the attacker");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    // Given back when closed.
    let back = poll_until(Duration::from_secs(10), || {
        let s = w.broker.status();
        s.shares
            .iter()
            .find(|s| s.cgroup == attacker)
            .is_none_or(|s| s.connections == 0)
            .then_some(())
    });
    assert!(
        back.is_some(),
        "the attacker's connections are still counted"
    );
}

#[test]
fn a_dns_flood_is_refused_past_its_share_and_audited_as_a_few_records() {
    let w = world();
    let attacker = w.cg.child("attacker");
    let run = |cgroup: &str, n: u32, suffix: &str, name: &str| -> serde_json::Value {
        let mut cmd = Command::new(agent_python());
        cmd.arg("-c")
            .arg(DNS_PY)
            .args([n.to_string(), suffix.to_string(), name.to_string()])
            .stdout(Stdio::piped())
            .stderr(Stdio::piped());
        let child = spawn_in_cgroup(cgroup, &mut cmd);
        let out = wait_with_timeout(child, Duration::from_secs(60), "the DNS client");
        let stdout = String::from_utf8_lossy(&out.stdout);
        assert!(
            out.status.success(),
            "DNS client failed: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        serde_json::from_str(stdout.trim())
            .unwrap_or_else(|e| panic!("no JSON from the DNS client ({e}): {stdout:?}"))
    };
    let before = w.broker.audit_records().len();
    let sent = 3000u32;
    let flood = run(&attacker, sent, "exfil.example.test", API);
    // Every answer is REFUSED (5), whether for the name or for the rate.
    let codes = flood["codes"].as_object().expect("codes");
    assert!(
        codes.keys().all(|c| c == "5"),
        "only REFUSED answers: {flood}"
    );
    // After a second, an allowed name resolves for the attacker too (its share refills).
    assert_eq!(flood["single"], 0, "NOERROR for {API}: {flood}");
    // The victim, with its own share, resolves.
    let victim = run(&w.agent, 0, "unused.test", API);
    assert_eq!(victim["single"], 0, "the victim resolves {API}: {victim}");

    let dns = records(
        &w,
        &attacker,
        |r| {
            r.kind == Some(EventKind::Dns)
                && r.decision != Some(agent_broker_protocol::Decision::Allow)
        },
        |found| {
            // The kernel drops what overflows brokerd's socket buffer (a burst of thousands of
            // datagrams), so not every query is seen; far more than the share must be.
            let counted: u64 = found.iter().map(|r| r.count.unwrap_or(1)).sum();
            (200..=u64::from(sent)).contains(&counted) && found.iter().any(|r| r.count.is_some())
        },
    );
    assert!(
        dns.len() <= 12,
        "{} records for a {sent}-query flood",
        dns.len()
    );
    assert!(
        dns.iter().any(|r| r
            .reason
            .as_deref()
            .is_some_and(|s| s.contains("shares.dns_queries_per_second"))),
        "the rate share is named: {dns:#?}"
    );
    let grown = w.broker.audit_records().len() - before;
    assert!(grown <= 30, "the log grew by {grown} records");
}
