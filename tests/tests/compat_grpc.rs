//! gRPC through brokerd (issue 12.5 and 12.6): Python's grpcio under `brokerctl run`, holding
//! only a placeholder, calls a real gRPC server over TLS (HTTP/2) on the test API's address
//! through the real kernel path; the policy injects `authorization: Bearer {secret:ABTEST_KEY}`
//! into the call's metadata.
//!
//! The client uses grpcio's default credentials (`grpc.ssl_channel_credentials()`), which trust
//! the roots bundled with grpcio unless `GRPC_DEFAULT_SSL_ROOTS_FILE_PATH` names others: the
//! launcher points it at the merged bundle, and a client that unsets it fails (the control). It
//! dials `api.example.test:<port>`: grpcio's own resolver asks the nameserver of
//! /etc/resolv.conf, the eBPF programs hand the query to brokerd's DNS, which answers from the
//! test's resolver (127.0.0.2). A unary call and a server-streaming call must both succeed with
//! the secret's hash upstream, the stream must flow (the first message arrives before the server
//! sends the last), and the secret must be nowhere the agent can see nor in brokerd's log.
//!
//! Needs root, cgroup v2 and BPF, and PyPI once per machine (grpcio is installed into a
//! virtualenv under /var/tmp, see `agent_broker_tests::grpc`). Run alone:
//! `cargo test -p agent-broker-tests --test compat_grpc -- --test-threads=1`.

use agent_broker_protocol::{Decision, EventKind};
use agent_broker_tests::{
    TestCa,
    clients::{self, ClientRun},
    grpc::{GrpcServer, grpc_python},
    poll_until, require_privileges, sha256_hex,
    world::{API, SECRET_NAME, World, api_ip, rule},
};

/// Messages the streaming call answers.
const MESSAGES: usize = 5;
/// The server's pause between them.
const PAUSE_MS: u64 = 500;

/// The agent: a unary call, then a server-streaming one, timing each message (CLOCK_MONOTONIC,
/// the clock the server stamps them with).
const CLIENT_PY: &str = r#"
import json, os, sys, time
cfg = json.loads(sys.argv[1])
out = {"roots_env": os.environ.get("GRPC_DEFAULT_SSL_ROOTS_FILE_PATH")}
if cfg["unset_roots_env"]:
    os.environ.pop("GRPC_DEFAULT_SSL_ROOTS_FILE_PATH", None)
import grpc
md = (("authorization", "Bearer " + cfg["placeholder"]),)
try:
    target = f"{cfg['host']}:{cfg['port']}"
    with grpc.secure_channel(target, grpc.ssl_channel_credentials()) as channel:
        unary = channel.unary_unary("/abtest.Echo/Hash")
        out["unary"] = json.loads(unary(b"hello", metadata=md, timeout=20))
        stream = channel.unary_stream("/abtest.Echo/Count")
        request = json.dumps({"n": cfg["n"], "pause_ms": cfg["pause_ms"]}).encode()
        out["stream"] = []
        for message in stream(request, metadata=md, timeout=30):
            m = json.loads(message)
            m["received"] = time.monotonic()
            out["stream"].append(m)
except grpc.RpcError as e:
    out["error"] = {"code": str(e.code()), "details": e.details()}
print(json.dumps(out))
"#;

/// The gRPC server (its certificate from the CA brokerd trusts upstream) and a world whose
/// agent may call it as api.example.test with the secret injected.
fn grpc_world() -> (GrpcServer, World) {
    require_privileges();
    let ca = TestCa::new("abtest upstream CA");
    let server = GrpcServer::start(&ca, api_ip(), &[API.to_string()]);
    let port = server.port();
    let w = World::with_ca(ca, |cg, _api| {
        vec![(
            "agent".into(),
            format!(
                "cgroup = \"{}\"\n{}",
                cg.child("agent"),
                rule(API, port, true)
            ),
        )]
    });
    (server, w)
}

/// Runs the grpcio agent and returns what it printed. No trust variable is passed in: what the
/// client trusts is what `brokerctl run` gives it.
fn run_client(
    w: &World,
    server: &GrpcServer,
    unset_roots_env: bool,
) -> (ClientRun, serde_json::Value) {
    let cfg = serde_json::json!({
        "host": API,
        "port": server.port(),
        "placeholder": w.placeholder.expose(),
        "n": MESSAGES,
        "pause_ms": PAUSE_MS,
        "unset_roots_env": unset_roots_env,
    });
    let argv = vec![
        grpc_python().to_string_lossy().into_owned(),
        "-c".into(),
        CLIENT_PY.into(),
        cfg.to_string(),
    ];
    let run = clients::run_in_cgroup(&w.broker, &w.agent, "grpcio", &[], &argv);
    let report = serde_json::from_str(String::from_utf8_lossy(&run.output.stdout).trim())
        .unwrap_or_else(|e| panic!("grpcio: no report ({e}): {}", run.show()));
    (run, report)
}

#[test]
fn grpcio_gets_its_metadata_injected_on_unary_and_server_streaming_calls() {
    let (server, w) = grpc_world();
    let (run, report) = run_client(&w, &server, false);
    let fail = |what: &str| -> String {
        format!(
            "{what}: {}\nthe server's stderr:\n{}\nbrokerd's log:\n{}",
            run.show(),
            server.stderr(),
            w.broker.log()
        )
    };
    assert!(
        report.get("error").is_none(),
        "{}",
        fail("the calls failed")
    );
    let injected = w.injected_hash();

    // The launcher pointed grpcio's roots at the merged bundle.
    assert!(
        report["roots_env"].as_str().is_some_and(|p| !p.is_empty()),
        "{}",
        fail("GRPC_DEFAULT_SSL_ROOTS_FILE_PATH was not set for the agent")
    );

    // Unary: the server saw `Bearer <secret>` and said so.
    assert_eq!(
        report["unary"]["authorization_sha256"].as_str(),
        Some(injected.as_str()),
        "{}",
        fail("the unary call's credential")
    );
    assert_eq!(report["unary"]["request"], "hello", "{}", fail("unary"));

    // Server streaming: every message, in order, each with the injected credential.
    let stream = report["stream"].as_array().cloned().unwrap_or_default();
    assert_eq!(
        stream.len(),
        MESSAGES,
        "{}",
        fail("the streaming call's messages")
    );
    for (i, m) in stream.iter().enumerate() {
        assert_eq!(m["i"].as_u64(), Some(i as u64), "{}", fail("message order"));
        assert_eq!(
            m["authorization_sha256"].as_str(),
            Some(injected.as_str()),
            "{}",
            fail("the streaming call's credential")
        );
    }
    // It flows: the first message arrived before the server sent the last one.
    let time = |i: usize, key: &str| stream[i][key].as_f64().unwrap_or(f64::NAN);
    let (first_received, last_sent) = (time(0, "received"), time(MESSAGES - 1, "sent"));
    assert!(
        first_received < last_sent,
        "the first message arrived at {first_received:.3}, after the server sent the last at \
         {last_sent:.3}: the stream was held back"
    );
    // Each one before the server sent the next: none waited in brokerd for more data.
    for i in 1..MESSAGES {
        let (received, next_sent) = (time(i - 1, "received"), time(i, "sent"));
        assert!(
            received < next_sent,
            "message {} arrived at {received:.3}, after the server sent the next at \
             {next_sent:.3} ({PAUSE_MS} ms later than it): it was held back",
            i - 1
        );
    }

    // What the server recorded: both calls with `Bearer <secret>`, the placeholder in no
    // metadata value, and the connection brokerd's.
    let placeholder_hashes = [
        sha256_hex(w.placeholder.expose().as_bytes()),
        w.placeholder.sha256_with_prefix("Bearer "),
    ];
    for method in ["Hash", "Count"] {
        let call = server
            .wait_call(method)
            .unwrap_or_else(|| panic!("{}", fail(&format!("the server has no {method} call"))));
        assert_eq!(
            call.hash_of("authorization"),
            Some(injected.as_str()),
            "{method}: the server did not receive `Bearer <secret>`: {call:?}"
        );
        assert!(
            call.metadata
                .values()
                .flatten()
                .all(|h| !placeholder_hashes.contains(h)),
            "{method}: the placeholder reached the server: {call:?}"
        );
        assert_eq!(
            call.peer_owner,
            Some(w.broker.pid()),
            "{method}: the server's peer socket should be brokerd's: {call:?}"
        );
    }
    if let Some(count) = server.wait_call("Count") {
        assert_eq!(count.sent.len(), MESSAGES, "{count:?}");
    }

    // The kernel path: brokerd attributes the connection to the client, with the address it
    // dialled (the name resolved through brokerd's DNS).
    let conn = w.broker.wait_connection("grpcio", |c| {
        c.origin.as_ref().is_some_and(|o| o.pid == run.pid)
    });
    let origin = conn
        .origin
        .clone()
        .unwrap_or_else(|| panic!("no origin: {conn:?}"));
    assert_eq!(origin.cgroup, w.agent, "{conn:?}");
    assert_eq!(origin.original_dst, server.addr(), "{conn:?}");
    let audit = poll_until(clients::CLIENT_TIMEOUT, || {
        let records = w.broker.audit_records();
        let dns = records.iter().any(|e| {
            e.kind == Some(EventKind::Dns)
                && e.host.as_deref() == Some(API)
                && e.decision == Some(Decision::Allow)
                && e.cgroup.as_deref() == Some(w.agent.as_str())
        });
        let requests = ["/abtest.Echo/Hash", "/abtest.Echo/Count"]
            .iter()
            .all(|path| {
                records.iter().any(|e| {
                    e.kind == Some(EventKind::Request)
                        && e.path.as_deref() == Some(*path)
                        && e.status == Some(200)
                        && e.secrets == [SECRET_NAME.to_string()]
                })
            });
        (dns && requests).then_some(records)
    });
    assert!(
        audit.is_some(),
        "brokerd audited no allowed DNS answer for {API} and no injected request for each \
         call: {:#?}",
        w.broker.audit_records()
    );

    run.assert_no_secret(&w.secret);
    w.assert_no_secret_in_logs();
}

#[test]
fn grpcio_without_the_launchers_roots_variable_does_not_trust_brokerd() {
    // The control: grpcio's default credentials fall back to the roots bundled with grpcio,
    // which do not hold the broker CA, so it is the launcher's variable that makes it work.
    let (server, w) = grpc_world();
    let (run, report) = run_client(&w, &server, true);
    assert!(
        report["roots_env"].as_str().is_some_and(|p| !p.is_empty()),
        "GRPC_DEFAULT_SSL_ROOTS_FILE_PATH was not set for the agent: {}",
        run.show()
    );
    assert_eq!(
        report["error"]["code"].as_str(),
        Some("StatusCode.UNAVAILABLE"),
        "without GRPC_DEFAULT_SSL_ROOTS_FILE_PATH grpcio should refuse brokerd's certificate: {}",
        run.show()
    );
    assert!(
        server.calls().is_empty(),
        "no call should have reached the server: {:?}",
        server.calls()
    );
    run.assert_no_secret(&w.secret);
    w.assert_no_secret_in_logs();
}
