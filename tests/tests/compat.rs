//! The clients agents run: the official OpenAI and Anthropic Python SDKs, Node's `fetch`
//! (undici) and Python's `websockets`, each under `brokerctl run` holding only a placeholder, calling a local API shaped
//! like the LLM APIs through the real kernel path. The credential is checked by hash upstream and is absent from
//! everything the agent sees; a streamed reply's first event arrives while the API pauses; 200 MB
//! each way arrive whole through an injecting rule.
//!
//! And how `brokerctl run` makes them trust the broker without taking a client's own choice
//! away: `pip --cert` reaches a passthrough index with a private CA (no `REQUESTS_CA_BUNDLE`
//! overriding it), and a client reading /etc/ssl/certs as a CA directory finds the broker CA
//! by its subject hash. (JVMs: `compat_jvm.rs`.)
//!
//! Needs root, cgroup v2 and BPF, and PyPI once per machine (the SDKs are installed into a
//! virtualenv under /var/tmp, see `agent_broker_tests::sdks`). Run alone:
//! `cargo test -p agent-broker-tests --test compat -- --test-threads=1`.

use agent_broker_tests::{
    TestCa,
    clients::{self, ClientRun},
    sdks::sdk_python,
    sha256_hex,
    upstream::LLM_PAUSE,
    world::{API, SECRET_NAME, TEST_API_IP, World},
};

/// The agent: one plain call, then one streamed call, timing each event from the request.
const AGENT_PY: &str = r#"
import json, sys, time
cfg = json.loads(sys.argv[1])
out = {"event_s": [], "stream_text": ""}
if cfg["sdk"] == "openai":
    import openai
    client = openai.OpenAI(base_url=f"https://{cfg['host']}:{cfg['port']}/v1", api_key=cfg["placeholder"], max_retries=0, timeout=30)
    messages = [{"role": "user", "content": "hi"}]
    out["plain"] = client.chat.completions.create(model="abtest", messages=messages).choices[0].message.content
    t0 = time.monotonic()
    for chunk in client.chat.completions.create(model="abtest", messages=messages, stream=True):
        out["event_s"].append(time.monotonic() - t0)
        if chunk.choices and chunk.choices[0].delta.content:
            out["stream_text"] += chunk.choices[0].delta.content
else:
    import anthropic
    client = anthropic.Anthropic(base_url=f"https://{cfg['host']}:{cfg['port']}", api_key=cfg["placeholder"], max_retries=0, timeout=30)
    messages = [{"role": "user", "content": "hi"}]
    out["plain"] = client.messages.create(model="abtest", max_tokens=16, messages=messages).content[0].text
    t0 = time.monotonic()
    with client.messages.stream(model="abtest", max_tokens=16, messages=messages) as stream:
        for text in stream.text_stream:
            out["event_s"].append(time.monotonic() - t0)
            out["stream_text"] += text
print(json.dumps(out))
"#;

/// Runs the SDK agent and returns what it printed.
fn run_sdk(w: &World, sdk: &str) -> (ClientRun, serde_json::Value) {
    let cfg = serde_json::json!({
        "sdk": sdk,
        "host": API,
        "port": w.api.port(),
        "placeholder": w.placeholder.expose(),
    });
    let argv = vec![
        sdk_python().to_string_lossy().into_owned(),
        "-c".into(),
        AGENT_PY.into(),
        cfg.to_string(),
    ];
    let run = clients::run_in_cgroup(&w.broker, &w.agent, sdk, &w.trust().var("python"), &argv);
    let stdout = String::from_utf8_lossy(&run.output.stdout).into_owned();
    let report = serde_json::from_str(stdout.trim())
        .unwrap_or_else(|e| panic!("{sdk}: no report ({e}): {}", run.show()));
    (run, report)
}

/// What the API says arrived: `auth=<sha256> key=<sha256>` of the two credential headers.
fn check(sdk: &str, run: &ClientRun, report: &serde_json::Value, want: &str) {
    let plain = report["plain"].as_str().unwrap_or_default();
    assert!(
        plain.contains(want),
        "{sdk}: the plain call's credential: {}",
        run.show()
    );
    let streamed = report["stream_text"].as_str().unwrap_or_default();
    assert!(
        streamed.starts_with("first ") && streamed.contains(want),
        "{sdk}: the streamed call: {}",
        run.show()
    );
    let times: Vec<f64> = report["event_s"]
        .as_array()
        .map(|a| a.iter().filter_map(serde_json::Value::as_f64).collect())
        .unwrap_or_default();
    let pause = LLM_PAUSE.as_secs_f64();
    let first = times.first().copied().unwrap_or(f64::MAX);
    let last = times.last().copied().unwrap_or(0.0);
    // The first event must not wait for the API's pause (issue 12.1).
    assert!(
        first < pause - 0.5,
        "{sdk}: the first event arrived after {first:.3} s, the API paused {pause} s after it: {times:?}"
    );
    assert!(
        last >= pause,
        "{sdk}: the rest came before the pause ended: {times:?}"
    );
}

#[test]
fn the_openai_sdk_gets_its_key_injected_and_its_stream_as_it_comes() {
    let w = World::new();
    let (run, report) = run_sdk(&w, "openai");
    let want = format!(
        "auth={}",
        sha256_hex(format!("Bearer {}", w.secret.expose()).as_bytes())
    );
    check("openai", &run, &report, &want);
    run.assert_no_secret(&w.secret);
    w.assert_no_secret_in_logs();
}

#[test]
fn the_anthropic_sdk_gets_its_key_injected_and_its_stream_as_it_comes() {
    let w = World::with_policies(|cg, api| {
        vec![(
            "agent".into(),
            format!(
                "cgroup = \"{}\"\n[[allow]]\nhost = \"{API}\"\nport = {}\n\
                 inject.headers = {{ x-api-key = \"{{secret:{SECRET_NAME}}}\" }}\n",
                cg.child("agent"),
                api.port()
            ),
        )]
    });
    let (run, report) = run_sdk(&w, "anthropic");
    let want = format!("key={}", sha256_hex(w.secret.expose().as_bytes()));
    check("anthropic", &run, &report, &want);
    run.assert_no_secret(&w.secret);
    w.assert_no_secret_in_logs();
}

/// Node's `fetch` (undici): the same streamed call, read as it comes.
const FETCH_JS: &str = r#"
const cfg = JSON.parse(process.argv[1]);
(async () => {
  const out = { event_s: [], stream_text: "" };
  const url = `https://${cfg.host}:${cfg.port}/v1/chat/completions`;
  const headers = { "content-type": "application/json", authorization: `Bearer ${cfg.placeholder}` };
  const body = (stream) => JSON.stringify({ model: "abtest", messages: [{ role: "user", content: "hi" }], stream });
  const plain = await (await fetch(url, { method: "POST", headers, body: body(false) })).json();
  out.plain = plain.choices[0].message.content;
  const t0 = performance.now();
  const response = await fetch(url, { method: "POST", headers, body: body(true) });
  const decoder = new TextDecoder();
  for await (const chunk of response.body) {
    out.event_s.push((performance.now() - t0) / 1000);
    for (const line of decoder.decode(chunk, { stream: true }).split("\n")) {
      if (!line.startsWith("data: ") || line === "data: [DONE]") continue;
      const content = JSON.parse(line.slice(6)).choices[0].delta.content;
      if (content) out.stream_text += content;
    }
  }
  console.log(JSON.stringify(out));
})().catch((e) => { console.log(JSON.stringify({ error: String(e && e.stack || e) })); });
"#;

#[test]
fn node_fetch_gets_its_key_injected_and_its_stream_as_it_comes() {
    let w = World::new();
    let cfg = serde_json::json!({
        "host": API,
        "port": w.api.port(),
        "placeholder": w.placeholder.expose(),
    });
    let argv = vec!["node".into(), "-e".into(), FETCH_JS.into(), cfg.to_string()];
    let run = clients::run_in_cgroup(
        &w.broker,
        &w.agent,
        "node fetch",
        &w.trust().var("node"),
        &argv,
    );
    let stdout = String::from_utf8_lossy(&run.output.stdout).into_owned();
    let report: serde_json::Value = serde_json::from_str(stdout.trim())
        .unwrap_or_else(|e| panic!("node fetch: no report ({e}): {}", run.show()));
    let want = format!(
        "auth={}",
        sha256_hex(format!("Bearer {}", w.secret.expose()).as_bytes())
    );
    check("node fetch", &run, &report, &want);
    run.assert_no_secret(&w.secret);
    w.assert_no_secret_in_logs();
}

/// Python's `websockets`: a connection held for 30 s, a message each way every second.
const WEBSOCKET_PY: &str = r#"
import asyncio, json, sys, time
import websockets
cfg = json.loads(sys.argv[1])
async def main():
    out = {"echoed": 0, "seconds": 0.0}
    headers = {"Authorization": "Bearer " + cfg["placeholder"]}
    url = f"wss://{cfg['host']}:{cfg['port']}/ws"
    t0 = time.monotonic()
    async with websockets.connect(url, additional_headers=headers, open_timeout=20) as ws:
        for i in range(cfg["messages"]):
            await ws.send(f"message {i}")
            if await asyncio.wait_for(ws.recv(), 10) == f"message {i}":
                out["echoed"] += 1
            await asyncio.sleep(1)
    out["seconds"] = time.monotonic() - t0
    print(json.dumps(out))
asyncio.run(main())
"#;

#[test]
fn python_websockets_hold_a_connection_for_30_seconds_both_ways() {
    let w = World::new();
    let messages = 30;
    let cfg = serde_json::json!({
        "host": API,
        "port": w.api.port(),
        "placeholder": w.placeholder.expose(),
        "messages": messages,
    });
    let argv = vec![
        sdk_python().to_string_lossy().into_owned(),
        "-c".into(),
        WEBSOCKET_PY.into(),
        cfg.to_string(),
    ];
    let run = clients::run_in_cgroup(
        &w.broker,
        &w.agent,
        "websockets",
        &w.trust().var("python"),
        &argv,
    );
    let stdout = String::from_utf8_lossy(&run.output.stdout).into_owned();
    let report: serde_json::Value = serde_json::from_str(stdout.trim())
        .unwrap_or_else(|e| panic!("websockets: no report ({e}): {}", run.show()));
    assert_eq!(report["echoed"], messages, "{}", run.show());
    assert!(
        report["seconds"].as_f64().unwrap_or(0.0) >= 29.0,
        "{report}"
    );
    let upgrade = w
        .api
        .requests()
        .into_iter()
        .find(|r| r.path == "/ws")
        .unwrap_or_else(|| panic!("the upgrade never reached the API: {}", run.show()));
    let want = sha256_hex(format!("Bearer {}", w.secret.expose()).as_bytes());
    assert_eq!(
        upgrade.header_hash("authorization"),
        Some(want.as_str()),
        "the key was not injected"
    );
    run.assert_no_secret(&w.secret);
    w.assert_no_secret_in_logs();
}

/// How many bytes each way the bulk transfer moves.
const BULK_BYTES: u64 = 200 * 1024 * 1024;

/// Python's `http.client`: a streamed download and a chunked upload of `bytes` each, hashed as
/// they go (nothing held whole), over one keep-alive connection dialed to the test API's address
/// with the API's name as SNI.
const BULK_PY: &str = r#"
import hashlib, http.client, json, os, socket, ssl, sys
cfg = json.loads(sys.argv[1])
ctx = ssl.create_default_context()
class Conn(http.client.HTTPSConnection):
    def connect(self):
        raw = socket.create_connection((cfg["connect"], cfg["port"]), timeout=60)
        self.sock = ctx.wrap_socket(raw, server_hostname=cfg["host"])
out = {}
c = Conn(cfg["host"], cfg["port"], context=ctx, timeout=60)
auth = {"authorization": "Bearer " + cfg["placeholder"]}
c.request("GET", "/bulk/down?bytes=%d" % cfg["bytes"], headers=auth)
r = c.getresponse()
h, n = hashlib.sha256(), 0
while True:
    chunk = r.read1(1 << 16)
    if not chunk:
        break
    h.update(chunk)
    n += len(chunk)
out["down"] = {"status": r.status, "len": n, "sha256": h.hexdigest()}
sent = hashlib.sha256()
def upload():
    left = cfg["bytes"]
    while left:
        chunk = os.urandom(min(left, 1 << 16))
        sent.update(chunk)
        left -= len(chunk)
        yield chunk
c.request("POST", "/bulk/up", body=upload(), headers=dict(auth, **{"content-type": "application/octet-stream"}), encode_chunked=True)
r = c.getresponse()
out["up"] = {"status": r.status, "sent_sha256": sent.hexdigest(), "reply": json.loads(r.read())}
print(json.dumps(out))
"#;

/// 200 MB down and 200 MB up through an injecting (so scrubbing) rule arrive whole, byte for
/// byte, with the key injected on both requests. (Throughput against the direct path and
/// brokerd's memory are measured by `cargo xtask bench`, not here.)
#[test]
fn two_hundred_megabytes_each_way_arrive_whole_through_an_injecting_rule() {
    let w = World::new();
    let cfg = serde_json::json!({
        "host": API,
        "connect": TEST_API_IP.to_string(),
        "port": w.api.port(),
        "placeholder": w.placeholder.expose(),
        "bytes": BULK_BYTES,
    });
    let argv = vec![
        "/usr/bin/python3".into(),
        "-c".into(),
        BULK_PY.into(),
        cfg.to_string(),
    ];
    let run = clients::run_in_cgroup(
        &w.broker,
        &w.agent,
        "python bulk",
        &w.trust().var("python"),
        &argv,
    );
    let stdout = String::from_utf8_lossy(&run.output.stdout).into_owned();
    let report: serde_json::Value = serde_json::from_str(stdout.trim())
        .unwrap_or_else(|e| panic!("python bulk: no report ({e}): {}", run.show()));

    let sent = w.api.bulk_sent();
    assert_eq!(sent.len(), 1, "the API sent {sent:?}: {}", run.show());
    assert_eq!(report["down"]["status"], 200, "{report}");
    assert_eq!(report["down"]["len"], BULK_BYTES, "{report}");
    assert_eq!(
        report["down"]["sha256"].as_str(),
        Some(sent[0].1.as_str()),
        "the download arrived changed"
    );
    let up = &report["up"];
    assert_eq!(up["status"], 200, "{report}");
    assert_eq!(up["reply"]["len"], BULK_BYTES, "{report}");
    assert_eq!(
        up["reply"]["sha256"], up["sent_sha256"],
        "the upload arrived changed"
    );

    let want = sha256_hex(format!("Bearer {}", w.secret.expose()).as_bytes());
    let bulk: Vec<_> = w
        .api
        .requests()
        .into_iter()
        .filter(|r| r.path.starts_with("/bulk/"))
        .collect();
    assert_eq!(bulk.len(), 2, "{bulk:?}");
    for r in &bulk {
        assert_eq!(
            r.header_hash("authorization"),
            Some(want.as_str()),
            "{}: the key was not injected",
            r.path
        );
    }
    run.assert_no_secret(&w.secret);
    w.assert_no_secret_in_logs();
}

/// pip, as an agent runs it: `pip download --cert <CA>` against an index reached by name. The
/// name is mapped to the test address inside the process (pip resolves it itself); the rest
/// is pip's own code.
const PIP_PY: &str = r#"
import json, runpy, socket, sys
cfg = json.loads(sys.argv[1])
lookup = socket.getaddrinfo
def test_lookup(host, *args, **kwargs):
    return lookup(cfg["ip"] if host == cfg["host"] else host, *args, **kwargs)
socket.getaddrinfo = test_lookup
sys.argv = ["pip"] + cfg["pip"]
runpy.run_module("pip", run_name="__main__", alter_sys=True)
"#;

#[test]
fn pip_cert_reaches_a_passthrough_index_with_a_private_ca() {
    // The index has a CA of its own, which only the agent's `--cert` names; brokerd passes the
    // connection through (`tcp = true`), so the agent verifies the index itself.
    let ca = TestCa::new("abtest private index CA");
    let ca_pem =
        std::fs::read(ca.pem_path()).unwrap_or_else(|e| panic!("cannot read the private CA: {e}"));
    let w = World::with_ca(ca, |cg, api| {
        vec![(
            "agent".into(),
            format!(
                "cgroup = \"{}\"\n[[allow]]\nhost = \"{API}\"\nport = {}\ntcp = true\n",
                cg.child("agent"),
                api.port()
            ),
        )]
    });
    let cert = w.broker.scratch_dir().join("private-index-ca.pem");
    std::fs::write(&cert, &ca_pem)
        .unwrap_or_else(|e| panic!("cannot write {}: {e}", cert.display()));
    let cfg = serde_json::json!({
        "host": API,
        "ip": TEST_API_IP.to_string(),
        "pip": [
            "download", "--no-deps", "--no-cache-dir", "--disable-pip-version-check",
            "--retries", "0", "--timeout", "15", "--dest", "/tmp",
            "--cert", cert.to_string_lossy(),
            "--index-url", format!("https://{API}:{}/simple/", w.api.port()),
            "abtest-package",
        ],
    });
    let argv = vec![
        sdk_python().to_string_lossy().into_owned(),
        "-c".into(),
        PIP_PY.into(),
        cfg.to_string(),
    ];
    let asked_index = |w: &World| {
        w.api
            .requests()
            .iter()
            .filter(|r| r.path == "/simple/abtest-package/")
            .count()
    };
    let run = clients::run_in_cgroup(&w.broker, &w.agent, "pip --cert", &[], &argv);
    let env = String::from_utf8_lossy(&run.env_dump).into_owned();
    for var in ["REQUESTS_CA_BUNDLE=", "CURL_CA_BUNDLE="] {
        assert!(
            !env.split('\0').any(|e| e.starts_with(var)),
            "brokerctl run set {var}, which replaces pip's --cert"
        );
    }
    let output = run.show();
    assert!(
        !output.contains("CERTIFICATE_VERIFY_FAILED"),
        "pip could not verify the index with its --cert: {output}"
    );
    assert_eq!(
        asked_index(&w),
        1,
        "pip's request never reached the index: {output}\nbrokerd's log:\n{}",
        w.broker.log()
    );

    // What the launcher used to set: REQUESTS_CA_BUNDLE wins over --cert, and the handshake
    // fails (the merged bundle does not hold the private CA).
    let overridden = clients::run_in_cgroup(
        &w.broker,
        &w.agent,
        "pip --cert with REQUESTS_CA_BUNDLE",
        &[(
            "REQUESTS_CA_BUNDLE",
            "/etc/ssl/certs/ca-certificates.crt".to_string(),
        )],
        &argv,
    );
    assert!(
        overridden.show().contains("CERTIFICATE_VERIFY_FAILED"),
        "REQUESTS_CA_BUNDLE should have replaced --cert: {}",
        overridden.show()
    );
    assert_eq!(asked_index(&w), 1, "{}", overridden.show());
    run.assert_no_secret(&w.secret);
    w.assert_no_secret_in_logs();
}

/// Python's `ssl` with `capath=/etc/ssl/certs` only (no bundle file, no `SSL_CERT_FILE`): the CA
/// is found by the hash of its subject, as OpenSSL looks issuers up in a CA directory.
const CAPATH_PY: &str = r#"
import http.client, json, socket, ssl, sys
cfg = json.loads(sys.argv[1])
out = {"status": 0, "headers": {}, "body": ""}
try:
    context = ssl.create_default_context(capath="/etc/ssl/certs")
    sock = socket.create_connection((cfg["connect"], cfg["port"]), timeout=20)
    conn = http.client.HTTPSConnection(cfg["host"], cfg["port"], context=context, timeout=20)
    conn.sock = context.wrap_socket(sock, server_hostname=cfg["host"])
    conn.request("GET", cfg["path"], headers=cfg["headers"])
    response = conn.getresponse()
    out["status"] = response.status
    out["version"] = "HTTP/1.1" if response.version == 11 else str(response.version)
    out["body"] = response.read().decode()
except Exception as e:
    out["error"] = repr(e)
print(json.dumps(out))
"#;

#[test]
fn a_ca_directory_client_finds_the_broker_ca_by_its_subject_hash() {
    let w = World::new();
    let argv = vec![
        "/usr/bin/python3".to_string(),
        "-c".into(),
        CAPATH_PY.into(),
        w.call("/hash").json(),
    ];
    let run = clients::run_in_cgroup(&w.broker, &w.agent, "python3 capath", &[], &argv);
    let report = run.report();
    w.assert_injected("python3 with capath=/etc/ssl/certs", &run, &report);
    w.assert_no_secret_in_logs();
}
