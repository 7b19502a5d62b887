//! Issue 13, the paths around the scrubber an independent attack run found, end to end: real
//! clients in a tagged cgroup (python3's standard library for raw HTTP/1.1 and WebSocket, node's
//! http2 for trailers, curl) hold only a placeholder and call the test API's `/reflect/...`
//! endpoints, which hand the injected key back every way the attack run used (see
//! `agent_broker_tests::upstream`). Each test checks three things, in the attack battery's
//! style: the attack fails (the key, in any encoding the test knows, is in none of the agent's
//! output, and brokerd's placeholder stands where the key was), the victim's own calls still
//! succeed (the key is injected, the API answers), and the audit log records a reason.
//!
//! - item 3: a key quoted in a gRPC `grpc-message` trailer (h2 agent);
//! - item 4: a key in fragmented (and masked) WebSocket frames after the upgrade,
//!   `permessage-deflate` accepted upstream, and a byte budget a WebSocket used to pass;
//! - item 5: the HTTP/1.1 reason phrase, a header named after the key, and
//!   `Transfer-Encoding: gzip, chunked`;
//! - item 6: `Connection` naming the headers a rule requires or injects;
//! - item 15: hex, `\u`-escaped JSON and MIME-wrapped base64 echoes;
//! - item 16: a key one request had the API store, read back by a request that injects nothing.
//!
//! Needs root, cgroup v2 and BPF, python3, node and curl (like the proxy suite).
//!
//! Run as root: `cargo test -p agent-broker-tests --test attack_scrub -- --test-threads=1`.

use agent_broker_protocol::{AuditEvent, Decision};
use agent_broker_tests::{
    Alpn, Canary, TestCa, TestUpstream, UpstreamOptions,
    clients::{self, Call, ClientRun, Proto, run_in_cgroup},
    require_privileges,
    world::{API, OTHER, SECRET_NAME, World, api_ip, rule},
};

/// What brokerd writes in place of a secret value an upstream echoed.
const REDACTED: &str = "[redacted by agent-broker]";

/// What the record of a request whose response quoted the key says.
const QUOTED: &str = "quoted a secret value";

// ---------------------------------------------------------------------------------------------
// Clients

/// Raw HTTP/1.1 over TLS (python3 standard library): prints the status line, the header names
/// and values, and the body, de-chunked and, when it is gzip (magic bytes), also gunzipped, as
/// an agent trying to get at the key would.
const RAW_HTTP1_PY: &str = r#"
import gzip, json, socket, ssl, sys
cfg = json.loads(sys.argv[1])
out = {"status": 0}
try:
    ctx = ssl.create_default_context()
    ctx.set_alpn_protocols(["http/1.1"])
    s = ctx.wrap_socket(socket.create_connection((cfg["connect"], cfg["port"]), timeout=15),
                        server_hostname=cfg["host"])
    lines = ["GET %s HTTP/1.1" % cfg["path"], "Host: %s:%d" % (cfg["host"], cfg["port"]),
             "Connection: close"]
    lines += ["%s: %s" % (k, v) for k, v in cfg["headers"].items()]
    s.sendall(("\r\n".join(lines) + "\r\n\r\n").encode())
    raw = bytearray()
    while True:
        c = s.recv(65536)
        if not c:
            break
        raw += c
    head, _, body = bytes(raw).partition(b"\r\n\r\n")
    head = head.decode("latin-1").split("\r\n")
    out["status_line"] = head[0]
    out["status"] = int(head[0].split()[1])
    out["header_names"] = [l.partition(":")[0].strip().lower() for l in head[1:]]
    out["headers"] = {l.partition(":")[0].strip().lower(): l.partition(":")[2].strip() for l in head[1:]}
    if "chunked" in out["headers"].get("transfer-encoding", ""):
        plain, rest = bytearray(), body
        while rest:
            size, _, rest = rest.partition(b"\r\n")
            n = int(size.split(b";")[0], 16)
            if n == 0:
                break
            plain += rest[:n]
            rest = rest[n + 2:]
        body = bytes(plain)
    out["body"] = body.decode("latin-1")
    if body[:2] == b"\x1f\x8b":
        out["gunzipped"] = gzip.decompress(body).decode("latin-1")
except Exception as e:
    out["error"] = "%s: %s" % (type(e).__name__, e)
print(json.dumps(out), flush=True)
"#;

/// A WebSocket client (python3 standard library). Mode `listen`: reads messages until the
/// server's close or the end. Mode `flood`: sends `count` binary messages of `size` bytes, each
/// read back as echoed, until the connection ends. Prints the upgrade's status and headers, the
/// text (and close) messages, the bytes sent and received after the upgrade.
const WS_PY: &str = r#"
import base64, json, os, socket, ssl, sys
cfg = json.loads(sys.argv[1])
out = {"status": 0, "headers": {}, "messages": [], "sent": 0, "received": 0}
try:
    ctx = ssl.create_default_context()
    ctx.set_alpn_protocols(["http/1.1"])
    s = ctx.wrap_socket(socket.create_connection((cfg["connect"], cfg["port"]), timeout=15),
                        server_hostname=cfg["host"])
    lines = ["GET %s HTTP/1.1" % cfg["path"], "Host: %s:%d" % (cfg["host"], cfg["port"]),
             "Upgrade: websocket", "Connection: Upgrade",
             "Sec-WebSocket-Key: " + base64.b64encode(os.urandom(16)).decode(),
             "Sec-WebSocket-Version: 13",
             "Sec-WebSocket-Extensions: permessage-deflate; client_max_window_bits"]
    lines += ["%s: %s" % (k, v) for k, v in cfg["headers"].items()]
    s.sendall(("\r\n".join(lines) + "\r\n\r\n").encode())
    buf = bytearray()
    while b"\r\n\r\n" not in buf:
        c = s.recv(65536)
        if not c:
            break
        buf += c
    head, _, rest = bytes(buf).partition(b"\r\n\r\n")
    head = head.decode("latin-1").split("\r\n")
    out["status"] = int(head[0].split()[1])
    out["headers"] = {l.partition(":")[0].strip().lower(): l.partition(":")[2].strip() for l in head[1:]}
    buf = bytearray(rest)
    if out["status"] != 101:
        # The rest of the answer: until the server pauses (the connection stays open).
        s.settimeout(2)
        try:
            while True:
                c = s.recv(65536)
                if not c:
                    break
                buf += c
        except socket.timeout:
            pass
        out["body"] = bytes(buf).decode("latin-1")
        raise SystemExit
    def need(n):
        while len(buf) < n:
            c = s.recv(65536)
            if not c:
                raise EOFError("the connection ended")
            out["received"] += len(c)
            buf.extend(c)
        chunk = bytes(buf[:n])
        del buf[:n]
        return chunk
    out["received"] += len(buf)
    def message():
        data, op = bytearray(), None
        while True:
            b0, b1 = need(2)
            n = b1 & 0x7F
            if n == 126:
                n = int.from_bytes(need(2), "big")
            elif n == 127:
                n = int.from_bytes(need(8), "big")
            mask = need(4) if b1 & 0x80 else None
            payload = need(n)
            if mask:
                payload = bytes(b ^ mask[i % 4] for i, b in enumerate(payload))
            code = b0 & 0x0F
            if code >= 8:
                if code == 8:
                    return 8, payload
                continue
            if code != 0:
                op = code
            data += payload
            if b0 & 0x80:
                return op, bytes(data)
    def send(op, payload):
        mask = os.urandom(4)
        n = len(payload)
        head = bytes([0x80 | op])
        if n < 126:
            head += bytes([0x80 | n])
        elif n < 65536:
            head += bytes([0x80 | 126]) + n.to_bytes(2, "big")
        else:
            head += bytes([0x80 | 127]) + n.to_bytes(8, "big")
        s.sendall(head + mask + bytes(b ^ mask[i % 4] for i, b in enumerate(payload)))
        out["sent"] += len(head) + 4 + n
    if cfg["mode"] == "listen":
        while True:
            op, data = message()
            if op == 8:
                out["messages"].append({"op": "close", "text": data[2:].decode("utf-8", "replace")})
                break
            out["messages"].append({"op": op, "text": data.decode("utf-8", "replace")})
            if op == 1:
                send(8, (1000).to_bytes(2, "big"))
                break
    else:
        payload = b"x" * cfg["size"]
        for i in range(cfg["count"]):
            send(2, payload)
            op, data = message()
            if op == 8:
                out["messages"].append({"op": "close", "text": data[2:].decode("utf-8", "replace")})
                break
            out["messages"].append({"op": op, "len": len(data)})
        send(8, (1000).to_bytes(2, "big"))
except SystemExit:
    pass
except Exception as e:
    out["error"] = "%s: %s" % (type(e).__name__, e)
print(json.dumps(out), flush=True)
"#;

/// node's http2 client: prints the status, headers, body and trailers of one request.
const H2_TRAILERS_JS: &str = r#"
const cfg = JSON.parse(process.argv[1]);
const out = { status: 0, headers: {}, trailers: {}, body: "" };
const http2 = require("http2");
const tls = require("tls");
const done = () => { console.log(JSON.stringify(out)); process.exit(0); };
setTimeout(() => { out.error = "timed out"; done(); }, 25000);
const session = http2.connect(`https://${cfg.host}:${cfg.port}`, {
  createConnection: () => tls.connect({ host: cfg.connect, port: cfg.port, servername: cfg.host, ALPNProtocols: ["h2"] }),
});
session.on("error", (e) => { out.error = String(e); done(); });
const req = session.request(Object.assign({ ":method": "POST", ":path": cfg.path, "te": "trailers", "content-type": "application/grpc" }, cfg.headers));
req.on("response", (h) => { out.status = h[":status"]; for (const k of Object.keys(h)) if (!k.startsWith(":")) out.headers[k] = String(h[k]); });
req.on("trailers", (t) => { for (const k of Object.keys(t)) out.trailers[k] = String(t[k]); });
const parts = [];
req.on("data", (d) => parts.push(d));
req.on("end", () => { out.body = Buffer.concat(parts).toString("latin1"); session.close(); done(); });
req.on("error", (e) => { out.error = String(e); done(); });
req.end();
"#;

/// Runs a client script in the agent's cgroup (`interpreter -c|-e SCRIPT CONFIG`) and returns
/// the run and its JSON report.
fn script(
    w: &World,
    cgroup: &str,
    what: &str,
    argv: Vec<String>,
    trust_var: (&'static str, String),
) -> (ClientRun, serde_json::Value) {
    let run = run_in_cgroup(&w.broker, cgroup, what, &[trust_var], &argv);
    let stdout = String::from_utf8_lossy(&run.output.stdout).into_owned();
    let line = stdout
        .lines()
        .rev()
        .find(|l| l.trim_start().starts_with('{'))
        .unwrap_or_else(|| panic!("{what} printed no JSON report: {}", run.show()));
    let report = serde_json::from_str(line)
        .unwrap_or_else(|e| panic!("{what}: bad JSON report ({e}): {}", run.show()));
    (run, report)
}

fn config(w: &World, host: &str, port: u16, path: &str) -> serde_json::Value {
    serde_json::json!({
        "host": host,
        "connect": api_ip().to_string(),
        "port": port,
        "path": path,
        "headers": {"authorization": format!("Bearer {}", w.placeholder.expose())},
    })
}

fn python(
    w: &World,
    cgroup: &str,
    what: &str,
    code: &str,
    cfg: &serde_json::Value,
) -> (ClientRun, serde_json::Value) {
    let argv = vec![
        agent_broker_tests::agent::agent_python()
            .to_string_lossy()
            .into_owned(),
        "-c".into(),
        code.into(),
        cfg.to_string(),
    ];
    let ca = w.broker_ca.to_string_lossy().into_owned();
    script(w, cgroup, what, argv, ("SSL_CERT_FILE", ca))
}

fn node(
    w: &World,
    cgroup: &str,
    what: &str,
    code: &str,
    cfg: &serde_json::Value,
) -> (ClientRun, serde_json::Value) {
    let argv = vec!["node".into(), "-e".into(), code.into(), cfg.to_string()];
    let ca = w.broker_ca.to_string_lossy().into_owned();
    script(w, cgroup, what, argv, ("NODE_EXTRA_CA_CERTS", ca))
}

// ---------------------------------------------------------------------------------------------
// Oracles

/// The key's forms this suite's endpoints use beyond those [`Canary::find_in`] knows: hex (both
/// cases), `\u`-escaped JSON (both cases), the key lowercased (header names).
fn extra_forms(secret: &Canary) -> Vec<(&'static str, Vec<u8>)> {
    let v = secret.expose().as_bytes();
    let u = |upper: bool| -> Vec<u8> {
        v.iter()
            .map(|b| {
                if upper {
                    format!("\\u{b:04X}")
                } else {
                    format!("\\u{b:04x}")
                }
            })
            .collect::<String>()
            .into_bytes()
    };
    vec![
        ("hex", data_encoding::HEXLOWER.encode(v).into_bytes()),
        ("HEX", data_encoding::HEXUPPER.encode(v).into_bytes()),
        ("json \\u", u(false)),
        ("JSON \\U", u(true)),
        ("lowercase", v.to_ascii_lowercase()),
    ]
}

/// Panics unless `run`'s output holds the key in no form the suite knows: the canary's own
/// encodings, [`extra_forms`], and base64 of any text holding it, line breaks removed (MIME).
fn assert_attack_failed(w: &World, what: &str, run: &ClientRun) {
    run.assert_no_secret(&w.secret);
    let stdout = &run.output.stdout;
    for (form, bytes) in extra_forms(&w.secret) {
        assert!(
            agent_broker_tests::canary::find(stdout, &bytes).is_none(),
            "{what}: the agent's output holds the key ({form}): {}",
            run.show()
        );
    }
    // A JSON report escapes line breaks: join MIME lines back before looking for base64.
    let flat: Vec<u8> = String::from_utf8_lossy(stdout)
        .replace("\\r\\n", "")
        .replace("\\n", "")
        .replace(['\r', '\n'], "")
        .into_bytes();
    w.secret.assert_absent(
        &flat,
        &format!("{what}: the agent's output, line breaks removed"),
    );
}

/// The audit record of the last request for `path`, once it is there.
fn record_for(w: &World, path: &str) -> AuditEvent {
    agent_broker_tests::poll_until(std::time::Duration::from_secs(10), || {
        w.broker
            .audit_records()
            .into_iter()
            .rev()
            .find(|e| e.path.as_deref() == Some(path) && e.status.is_some())
    })
    .unwrap_or_else(|| {
        panic!(
            "no audit record for {path}: {:#?}\nbrokerd's log:\n{}",
            w.broker.audit_records(),
            w.broker.log()
        )
    })
}

/// Asserts the record of the request for `path` is an allowed request whose reason contains
/// `reason`, naming the injected secret when `injected`.
fn assert_recorded(w: &World, path: &str, reason: &str, injected: bool) -> AuditEvent {
    let event = record_for(w, path);
    let got = event.reason.as_deref().unwrap_or("");
    assert!(
        got.contains(reason),
        "{path}: the audit record's reason {got:?} should contain {reason:?}: {event:?}"
    );
    if injected {
        assert_eq!(event.secrets, vec![SECRET_NAME.to_string()], "{path}");
    }
    event
}

/// The victim's own call: the key is injected and the API answers, through `curl`.
fn assert_victim_call_works(w: &World, what: &str) {
    let (run, report) = clients::curl(&w.broker, &w.agent, &w.trust(), &w.call("/hash"));
    w.assert_injected(what, &run, &report);
}

/// A world whose agent may call the API (h2 and http/1.1) and an HTTP/1.1-only API on the same
/// address, both with the key injected, and `other.example.test` (the same API) without it.
fn world_with_http1_api() -> (World, TestUpstream) {
    require_privileges();
    let ca = TestCa::new("abtest upstream CA");
    let h1 = TestUpstream::start(
        &ca,
        UpstreamOptions {
            alpn: Alpn::Http1Only,
            plain: false,
            ..UpstreamOptions::api()
        },
    );
    let h1_port = h1.port();
    let w = World::with_ca(ca, |cg, api| {
        vec![(
            "agent".into(),
            format!(
                "cgroup = \"{}\"\n{}{}{}",
                cg.child("agent"),
                rule(API, api.port(), true),
                rule(API, h1_port, true),
                rule(OTHER, api.port(), false)
            ),
        )]
    });
    h1.watch_for("secret", &w.secret);
    (w, h1)
}

// ---------------------------------------------------------------------------------------------
// Item 3

#[test]
fn a_key_quoted_in_a_grpc_message_trailer_never_reaches_an_h2_agent() {
    let w = World::new();
    let cfg = config(&w, API, w.api.port(), "/reflect/trailer");
    let (run, report) = node(
        &w,
        &w.agent,
        "node h2 /reflect/trailer",
        H2_TRAILERS_JS,
        &cfg,
    );
    assert_eq!(report["status"], 200, "{}", run.show());
    assert_eq!(report["trailers"]["grpc-status"], "16", "{}", run.show());
    assert_eq!(
        report["trailers"]["grpc-message"],
        format!("invalid API key {REDACTED}"),
        "{}",
        run.show()
    );
    assert_attack_failed(&w, "grpc-message trailer", &run);
    assert_recorded(&w, "/reflect/trailer", QUOTED, true);
    assert_victim_call_works(&w, "after the trailer attack");
    w.assert_no_secret_in_logs();
}

// ---------------------------------------------------------------------------------------------
// Item 5

#[test]
fn the_reason_phrase_header_names_and_transfer_codings_do_not_carry_the_key() {
    let (w, h1) = world_with_http1_api();
    // The reason phrase (only HTTP/1.1 has one, both hops).
    let cfg = config(&w, API, h1.port(), "/reflect/reason");
    let (run, report) = python(&w, &w.agent, "python /reflect/reason", RAW_HTTP1_PY, &cfg);
    assert_eq!(report["status"], 401, "{}", run.show());
    assert_eq!(
        report["status_line"],
        format!("HTTP/1.1 401 Bad key {REDACTED}"),
        "{}",
        run.show()
    );
    assert_attack_failed(&w, "reason phrase", &run);
    assert_recorded(&w, "/reflect/reason", QUOTED, true);

    // A header named after the key, over both APIs.
    for port in [h1.port(), w.api.port()] {
        let cfg = config(&w, API, port, "/reflect/header-name");
        let (run, report) = python(
            &w,
            &w.agent,
            "python /reflect/header-name",
            RAW_HTTP1_PY,
            &cfg,
        );
        assert_eq!(report["status"], 200, "{}", run.show());
        let names = report["header_names"]
            .as_array()
            .cloned()
            .unwrap_or_default();
        assert!(!names.is_empty(), "{}", run.show());
        assert!(
            !names
                .iter()
                .any(|n| n.as_str().is_some_and(|n| n.starts_with("x-echo-"))),
            "the header named after the key is dropped: {}",
            run.show()
        );
        assert_attack_failed(&w, "header name", &run);
        assert_recorded(&w, "/reflect/header-name", QUOTED, true);
    }

    // `Transfer-Encoding: gzip, chunked`: decoded and scrubbed, never passed on compressed.
    let cfg = config(&w, API, h1.port(), "/reflect/te-gzip");
    let (run, report) = python(&w, &w.agent, "python /reflect/te-gzip", RAW_HTTP1_PY, &cfg);
    assert_eq!(report["status"], 200, "{}", run.show());
    assert!(report.get("gunzipped").is_none(), "{}", run.show());
    assert_eq!(
        report["body"],
        format!("key: {REDACTED}\n"),
        "{}",
        run.show()
    );
    assert_attack_failed(&w, "transfer coding", &run);
    assert_recorded(&w, "/reflect/te-gzip", QUOTED, true);

    assert_victim_call_works(
        &w,
        "after the reason phrase, header name and coding attacks",
    );
    w.assert_no_secret_in_logs();
}

// ---------------------------------------------------------------------------------------------
// Item 6

#[test]
fn connection_cannot_strip_the_headers_a_rule_requires_or_injects() {
    require_privileges();
    let w = World::with_policies(|cg, api| {
        vec![(
            "agent".into(),
            format!(
                "cgroup = \"{}\"\n[[allow]]\nhost = \"{API}\"\nport = {}\nheaders = {{ x-required = \"yes\" }}\n\
                 inject.headers = {{ authorization = \"Bearer {{secret:{SECRET_NAME}}}\", x-tenant = \"acme\" }}\n",
                cg.child("agent"),
                api.port()
            ),
        )]
    });
    let call = |connection: &str| {
        w.call("/v1/required")
            .header("x-required", "yes")
            .header("connection", connection)
    };
    // The required header named in Connection: the policy never sees it, so it does not match.
    let (run, report) = clients::curl(&w.broker, &w.agent, &w.trust(), &call("x-required"));
    let reason = report.assert_denied(&w.agent, "Connection naming the required header");
    run.assert_no_secret(&w.secret);
    let denial = record_for(&w, "/v1/required");
    assert_eq!(denial.decision, Some(Decision::Deny), "{denial:?}");
    assert_eq!(denial.reason.as_deref(), Some(reason.as_str()));
    assert!(
        w.api.requests().iter().all(|r| r.path != "/v1/required"),
        "the denied request never reached the API"
    );

    // The injected headers named in Connection: they still go upstream, key and literal.
    let (run, report) = clients::curl(
        &w.broker,
        &w.agent,
        &w.trust(),
        &call("x-tenant, authorization").proto(Proto::Http1),
    );
    assert_eq!(report.status, 200, "{}", report.show());
    run.assert_no_secret(&w.secret);
    let seen = w
        .api
        .requests()
        .into_iter()
        .rfind(|r| r.path == "/v1/required")
        .expect("the API's record");
    assert_eq!(
        seen.header_hash("authorization"),
        Some(w.injected_hash().as_str()),
        "the key arrived: {seen:?}"
    );
    assert_eq!(
        seen.header_hash("x-tenant"),
        Some(agent_broker_tests::sha256_hex(b"acme").as_str()),
        "the literal injected header arrived: {seen:?}"
    );
    assert_eq!(
        seen.header_hash("x-required"),
        Some(agent_broker_tests::sha256_hex(b"yes").as_str())
    );
    assert!(!seen.header_sha256.contains_key("connection"), "{seen:?}");
    w.assert_no_secret_in_logs();
}

// ---------------------------------------------------------------------------------------------
// Item 4

#[test]
fn websocket_frames_are_scrubbed_and_an_extension_accepted_upstream_is_refused() {
    let w = World::new();
    // The key in one text message, fragmented inside the key, one fragment masked.
    let mut cfg = config(&w, API, w.api.port(), "/ws/reflect");
    cfg["mode"] = "listen".into();
    let (run, report) = python(&w, &w.agent, "python ws /ws/reflect", WS_PY, &cfg);
    assert_eq!(report["status"], 101, "{}", run.show());
    assert!(
        report["headers"].get("sec-websocket-extensions").is_none(),
        "{}",
        run.show()
    );
    assert_eq!(
        report["messages"][0]["text"],
        format!("you sent: {REDACTED} ok"),
        "{}",
        run.show()
    );
    assert_attack_failed(&w, "WebSocket frames", &run);
    let seen = w
        .api
        .requests()
        .into_iter()
        .rfind(|r| r.path == "/ws/reflect")
        .expect("the API's record");
    assert!(
        !seen.header_sha256.contains_key("sec-websocket-extensions"),
        "permessage-deflate is not offered upstream: {seen:?}"
    );
    let event = assert_recorded(&w, "/ws/reflect", QUOTED, true);
    assert!(event.bytes_in > 0 && event.bytes_out > 0, "{event:?}");

    // An upstream that accepts permessage-deflate anyway: withheld.
    let mut cfg = config(&w, API, w.api.port(), "/ws/deflate");
    cfg["mode"] = "listen".into();
    let (run, report) = python(&w, &w.agent, "python ws /ws/deflate", WS_PY, &cfg);
    assert_eq!(report["status"], 502, "{}", run.show());
    assert!(
        report["body"]
            .as_str()
            .unwrap_or("")
            .contains("permessage-deflate"),
        "{}",
        run.show()
    );
    let event = record_for(&w, "/ws/deflate");
    assert_eq!(event.status, Some(502));
    assert!(
        event
            .reason
            .as_deref()
            .unwrap_or("")
            .contains("permessage-deflate"),
        "{event:?}"
    );

    // The victim's WebSocket: a message each way, the key injected on the upgrade.
    let (run, report) = clients::python_client(
        &w.broker,
        &w.agent,
        &w.trust(),
        &w.call("/ws"),
        "ws",
        Some("hello"),
    );
    assert_eq!(report.status, 101, "{}", report.show());
    assert_eq!(
        report.ws_echo.as_deref(),
        Some("hello"),
        "{}",
        report.show()
    );
    run.assert_no_secret(&w.secret);
    w.assert_no_secret_in_logs();
}

#[test]
fn a_websocket_is_counted_and_cut_when_it_uses_up_a_byte_budget() {
    require_privileges();
    const BUDGET: u64 = 200_000;
    let w = World::with_policies(|cg, api| {
        vec![(
            "agent".into(),
            format!(
                "cgroup = \"{}\"\n{}budget = {{ bytes_per_day = {BUDGET} }}\n",
                cg.child("agent"),
                rule(API, api.port(), true)
            ),
        )]
    });
    // The victim's first call, within the budget.
    assert_victim_call_works(&w, "within the budget");
    // 5 MB through the echo in 100 kB messages.
    let mut cfg = config(&w, API, w.api.port(), "/ws");
    cfg["mode"] = "flood".into();
    cfg["count"] = 50.into();
    cfg["size"] = 100_000.into();
    let (run, report) = python(&w, &w.agent, "python ws flood", WS_PY, &cfg);
    assert_eq!(report["status"], 101, "{}", run.show());
    let received = report["received"].as_u64().unwrap_or(u64::MAX);
    let sent = report["sent"].as_u64().unwrap_or(u64::MAX);
    assert!(
        received < BUDGET && sent < 5_000_000,
        "the connection went on past the budget (sent {sent}, received {received}): {}",
        run.show()
    );
    run.assert_no_secret(&w.secret);
    let event = record_for(&w, "/ws");
    assert_eq!(event.status, Some(101));
    assert!(
        event.bytes_in > 0 && event.bytes_out > 0,
        "the bytes are counted: {event:?}"
    );
    assert!(
        event.bytes_in + event.bytes_out <= BUDGET + 200_000,
        "{event:?}"
    );
    let reason = event.reason.as_deref().unwrap_or("");
    assert!(
        reason.contains("daily budget used up") && reason.contains("cut"),
        "{event:?}"
    );
    // The budget is charged: the next request is refused until midnight.
    let (_, report) = clients::curl(&w.broker, &w.agent, &w.trust(), &w.call("/hash"));
    let (reason, _) = report.assert_limited(&w.agent, "after the budget was used up");
    assert!(reason.contains("bytes per day"), "{reason}");
    w.assert_no_secret_in_logs();
}

// ---------------------------------------------------------------------------------------------
// Item 15

#[test]
fn hex_escaped_json_and_mime_base64_echoes_are_scrubbed() {
    let w = World::new();
    for proto in [Proto::Http1, Proto::Http2] {
        let (run, report) = clients::curl(
            &w.broker,
            &w.agent,
            &w.trust(),
            &w.call("/reflect/encodings").proto(proto),
        );
        assert_eq!(report.status, 200, "{}", report.show());
        // hex, HEX, \u, \U, and the two MIME texts.
        assert_eq!(
            report.body.matches(REDACTED).count(),
            6,
            "every form replaced once: {}",
            report.show()
        );
        assert_attack_failed(&w, "encoded echoes", &run);
    }
    assert_recorded(&w, "/reflect/encodings", QUOTED, true);
    assert_victim_call_works(&w, "after the encoding attacks");
    w.assert_no_secret_in_logs();
}

// ---------------------------------------------------------------------------------------------
// Item 16

#[test]
fn a_stored_key_read_back_without_injection_is_scrubbed() {
    let (w, _h1) = world_with_http1_api();
    // A request that carries the key has the API store it...
    let (run, report) = clients::curl(&w.broker, &w.agent, &w.trust(), &w.call("/reflect/store"));
    assert_eq!(report.status, 200, "{}", report.show());
    run.assert_no_secret(&w.secret);
    // ...and a request through a rule that injects nothing reads it back.
    for proto in [Proto::Http1, Proto::Http2] {
        let call = Call::new(OTHER, api_ip(), w.api.port(), "/reflect/load").proto(proto);
        let (run, report) = clients::curl(&w.broker, &w.agent, &w.trust(), &call);
        assert_eq!(report.status, 200, "{}", report.show());
        assert_eq!(report.json()["stored"], REDACTED, "{}", report.show());
        assert_eq!(
            report.headers.get("x-stored").map(String::as_str),
            Some(REDACTED),
            "{}",
            report.show()
        );
        assert_attack_failed(&w, "stored echo", &run);
    }
    let event = assert_recorded(&w, "/reflect/load", QUOTED, false);
    assert!(event.secrets.is_empty(), "nothing was injected: {event:?}");
    assert_victim_call_works(&w, "after the stored-echo attack");
    w.assert_no_secret_in_logs();
}
