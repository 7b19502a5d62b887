//! The proxy path, end to end: TLS interception and credential injection through brokerd, and
//! the HTTP behaviour around it. Real clients (curl, python3 standard library, node, the static
//! `agent-client`) in a tagged cgroup hold only a placeholder and call the test API as
//! `https://api.example.test:<port>/...` (the world is `agent_broker_tests::world`):
//!
//! - injection per client and HTTP version, and the version brokerd speaks upstream;
//! - the broker CA from `SSL_CERT_FILE` and from the system store (`brokerctl ca install`);
//! - denials: a host the secret is not bound to, SNI and Host/:authority that disagree, an
//!   upstream certificate brokerd does not trust, injection over plain HTTP without `plain_http`;
//! - streamed responses, WebSocket, and scrubbing of a secret the upstream echoes back.
//!
//! Needs root, cgroup v2 and BPF (brokerd attaches its programs to the test's cgroup), curl,
//! python3 and node, and the static client from `$AGENT_BROKER_STATIC_CLIENT` or target/static
//! (see `clients::static_client`). One test installs the broker CA into the system trust store
//! and restores it afterwards.
//!
//! Run as root: `cargo test -p agent-broker-tests --test proxy -- --test-threads=1`.

use std::{
    fs,
    net::{IpAddr, Ipv4Addr},
    time::Duration,
};

use agent_broker_tests::{
    Alpn, TestCa, TestServer, TestUpstream, UpstreamOptions,
    clients::{
        self, Call, ClientRun, HttpReport, Proto, SYSTEM_CA_PATH, SystemCaGuard, Trust,
        node_client, python_client, static_client_run,
    },
    require_privileges,
    world::{API, OTHER, SECRET_NAME, World, api_ip, rule},
};

/// What brokerd writes in place of a secret value an upstream echoed.
const REDACTED: &str = "[redacted by agent-broker]";

// ---------------------------------------------------------------------------------------------
// Injection, per client and protocol

#[test]
fn curl_gets_the_secret_injected_over_http1_and_http2() {
    let w = World::new();
    for proto in [Proto::Http1, Proto::Http2] {
        let what = format!("curl {proto:?}");
        let (run, report) = clients::curl(
            &w.broker,
            &w.agent,
            &w.trust(),
            &w.call("/hash").proto(proto),
        );
        w.assert_injected(&what, &run, &report);
        match proto {
            Proto::Http1 => assert!(report.is_h1(), "{what}: {}", report.show()),
            Proto::Http2 => assert!(
                report.is_h2(),
                "{what}: curl should speak h2 to brokerd: {}",
                report.show()
            ),
        }
        let body = report.json();
        assert_eq!(body["sni"].as_str(), Some(API), "{what}");
    }
    w.assert_no_secret_in_logs();
}

/// An upstream on 127.0.0.2 that offers only http/1.1, with a certificate from `ca`.
fn http1_only_api(ca: &TestCa) -> TestUpstream {
    TestUpstream::start(
        ca,
        UpstreamOptions {
            alpn: Alpn::Http1Only,
            plain: false,
            ..UpstreamOptions::api()
        },
    )
}

/// A world whose `<cg>/agent` may call, with injection, both the default API (h2 and
/// http/1.1) and `extra` (same CA).
fn world_with_second_api(ca: TestCa, extra: &TestUpstream) -> World {
    World::with_ca(ca, |cg, api| {
        vec![(
            "agent".into(),
            format!(
                "cgroup = \"{}\"\n{}{}",
                cg.child("agent"),
                rule(API, api.port(), true),
                rule(API, extra.port(), true)
            ),
        )]
    })
}

#[test]
fn upstream_receives_the_secret_over_http2_when_offered_and_over_http1_otherwise() {
    require_privileges();
    let ca = TestCa::new("abtest upstream CA");
    let h1_api = http1_only_api(&ca);
    let w = world_with_second_api(ca, &h1_api);
    for (what, upstream, version) in [
        ("API offering h2", &w.api, "HTTP/2.0"),
        ("API offering only http/1.1", &h1_api, "HTTP/1.1"),
    ] {
        for proto in [Proto::Http1, Proto::Http2] {
            let call = Call::new(API, api_ip(), upstream.port(), "/hash")
                .header(
                    "authorization",
                    &format!("Bearer {}", w.placeholder.expose()),
                )
                .proto(proto);
            let (run, report) = clients::curl(&w.broker, &w.agent, &w.trust(), &call);
            assert_eq!(
                report.status,
                200,
                "{what}, client {proto:?}: {}\nbrokerd's log:\n{}",
                report.show(),
                w.broker.log()
            );
            run.assert_no_secret(&w.secret);
            let body = report.json();
            assert_eq!(
                body["authorization_sha256"].as_str(),
                Some(w.injected_hash().as_str()),
                "{what}, client {proto:?}"
            );
            assert_eq!(
                body["version"].as_str(),
                Some(version),
                "{what}, client {proto:?}: the version brokerd used upstream (h2 when the server \
                 offers it)"
            );
            let last = upstream
                .requests()
                .pop()
                .unwrap_or_else(|| panic!("{what}: no request"));
            assert_eq!(last.peer_owner, Some(w.broker.pid()), "{what}: {last:?}");
        }
    }
    w.assert_no_secret_in_logs();
}

#[test]
fn python_stdlib_gets_the_secret_injected_with_the_ca_from_ssl_cert_file() {
    let w = World::new();
    let (run, report) = python_client(
        &w.broker,
        &w.agent,
        &w.trust(),
        &w.call("/hash"),
        "get",
        None,
    );
    w.assert_injected("python3 http.client", &run, &report);
    assert!(report.is_h1(), "{}", report.show());
    w.assert_no_secret_in_logs();
}

#[test]
fn python_stdlib_trusts_the_broker_ca_from_the_system_store_after_ca_install() {
    let w = World::new();
    let _restore = SystemCaGuard::new();
    let out = w.broker.ctl_ok(&["ca", "install"]);
    assert!(
        out.contains(SYSTEM_CA_PATH),
        "ca install should say where the CA went: {out}"
    );
    let installed = fs::read_to_string(SYSTEM_CA_PATH)
        .unwrap_or_else(|e| panic!("ca install wrote no {SYSTEM_CA_PATH}: {e}"));
    let exported = fs::read_to_string(&w.broker_ca).unwrap_or_default();
    assert_eq!(
        installed.trim(),
        exported.trim(),
        "installed CA = exported CA"
    );
    let bundle = fs::read_to_string("/etc/ssl/certs/ca-certificates.crt").unwrap_or_default();
    let body_line = exported
        .lines()
        .nth(1)
        .unwrap_or_else(|| panic!("exported CA PEM is too short: {exported}"));
    assert!(
        bundle.contains(body_line),
        "update-ca-certificates did not add the broker CA to /etc/ssl/certs/ca-certificates.crt"
    );
    // No SSL_CERT_FILE: python's default context uses the system store.
    let (run, report) = python_client(
        &w.broker,
        &w.agent,
        &Trust::System,
        &w.call("/hash"),
        "get",
        None,
    );
    w.assert_injected("python3 with the system trust store", &run, &report);
    w.assert_no_secret_in_logs();
}

#[test]
fn node_gets_the_secret_injected_over_http1_and_http2() {
    let w = World::new();
    for proto in [Proto::Http1, Proto::Http2] {
        let what = format!("node {proto:?}");
        let (run, report) = node_client(
            &w.broker,
            &w.agent,
            &w.trust(),
            &w.call("/hash").proto(proto),
        );
        w.assert_injected(&what, &run, &report);
        match proto {
            Proto::Http1 => assert!(report.is_h1(), "{what}: {}", report.show()),
            Proto::Http2 => assert!(report.is_h2(), "{what}: {}", report.show()),
        }
    }
    w.assert_no_secret_in_logs();
}

#[test]
fn static_binary_gets_the_secret_injected_over_http1_and_http2() {
    let w = World::new();
    for proto in [Proto::Http1, Proto::Http2] {
        let what = format!("static agent-client {proto:?}");
        let (run, report) = static_client_run(
            &w.broker,
            &w.agent,
            &w.trust(),
            &w.call("/hash").proto(proto),
            "get",
            None,
        );
        w.assert_injected(&what, &run, &report);
        match proto {
            Proto::Http1 => assert!(report.is_h1(), "{what}: {}", report.show()),
            Proto::Http2 => assert!(report.is_h2(), "{what}: {}", report.show()),
        }
    }
    w.assert_no_secret_in_logs();
}

// ---------------------------------------------------------------------------------------------
// Denials

#[test]
fn host_the_secret_is_not_bound_to_gets_403_and_the_upstream_nothing() {
    let w = World::new();
    for proto in [Proto::Http1, Proto::Http2] {
        let before = w.api.requests().len();
        let call = Call::new(OTHER, api_ip(), w.api.port(), "/hash")
            .header(
                "authorization",
                &format!("Bearer {}", w.placeholder.expose()),
            )
            .proto(proto);
        let (run, report) = clients::curl(&w.broker, &w.agent, &w.trust(), &call);
        let reason = report.assert_denied(&w.agent, &format!("{OTHER} without a rule ({proto:?})"));
        assert!(
            reason.contains(OTHER),
            "the reason should name the host that has no rule: {reason}"
        );
        run.assert_no_secret(&w.secret);
        std::thread::sleep(Duration::from_millis(200));
        let after = w.api.requests();
        assert_eq!(
            after.len(),
            before,
            "the API received a request for {OTHER}: {:#?}",
            &after[before..]
        );
    }
    w.assert_no_secret_in_logs();
}

#[test]
fn sni_and_host_or_authority_mismatch_is_denied() {
    let w = World::with_policies(|cg, api| {
        vec![(
            "agent".into(),
            format!(
                "cgroup = \"{}\"\n{}{}",
                cg.child("agent"),
                rule(API, api.port(), true),
                // Even when the other name is allowed too, a request may not name two hosts.
                rule(OTHER, api.port(), false)
            ),
        )]
    });
    for proto in [Proto::Http1, Proto::Http2] {
        let before = w.api.requests().len();
        let call = w
            .call("/hash")
            .header("host", &format!("{OTHER}:{}", w.api.port()))
            .proto(proto);
        let (run, report) = clients::curl(&w.broker, &w.agent, &w.trust(), &call);
        report.assert_denied(
            &w.agent,
            &format!("SNI {API} with Host {OTHER} ({proto:?})"),
        );
        run.assert_no_secret(&w.secret);
        std::thread::sleep(Duration::from_millis(200));
        assert_eq!(
            w.api.requests().len(),
            before,
            "the API received the mismatched request"
        );
    }
    w.assert_no_secret_in_logs();
}

#[test]
fn upstream_with_a_certificate_brokerd_does_not_trust_gets_no_secret() {
    // An "attacker" on 127.0.0.3 with a certificate for api.example.test from a CA brokerd does
    // not trust. The policy allows api.example.test on its port, with `any_address = true` so
    // that brokerd does not refuse the address first: only TLS verification stands between the
    // secret and it.
    let evil_ca = TestCa::new("abtest attacker CA");
    let evil = TestUpstream::start(
        &evil_ca,
        UpstreamOptions {
            ip: IpAddr::V4(Ipv4Addr::new(127, 0, 0, 3)),
            plain: false,
            ..UpstreamOptions::api()
        },
    );
    let w = World::with_policies(|cg, api| {
        vec![(
            "agent".into(),
            format!(
                "cgroup = \"{}\"\n{}{}",
                cg.child("agent"),
                rule(API, api.port(), true),
                rule(API, evil.port(), true) + "any_address = true\n"
            ),
        )]
    });
    evil.watch_for("secret", &w.secret);
    let call = Call::new(
        API,
        IpAddr::V4(Ipv4Addr::new(127, 0, 0, 3)),
        evil.port(),
        "/hash",
    )
    .header(
        "authorization",
        &format!("Bearer {}", w.placeholder.expose()),
    );
    let (run, report) = clients::curl(&w.broker, &w.agent, &w.trust(), &call);
    assert!(
        report.status >= 400 || report.status == 0,
        "a call to an upstream with an untrusted certificate must fail: {}",
        report.show()
    );
    run.assert_no_secret(&w.secret);
    std::thread::sleep(Duration::from_millis(300));
    assert!(
        evil.connections() >= 1,
        "brokerd never dialled the untrusted upstream, so this test proves nothing: {}",
        report.show()
    );
    assert_eq!(
        evil.handshakes(),
        0,
        "brokerd completed a TLS handshake with the untrusted upstream"
    );
    assert!(
        evil.requests().is_empty(),
        "the attacker received requests: {:#?}",
        evil.requests()
    );
    w.assert_no_secret_in_logs();
}

#[test]
fn plain_http_injection_only_where_a_rule_says_plain_http() {
    // api.example.test on the plain port: injection rule without plain_http (denied);
    // other.example.test on the same port: with plain_http = true (injected).
    let w = World::with_policies(|cg, api| {
        let plain = api.plain_addr().port();
        vec![(
            "agent".into(),
            format!(
                "cgroup = \"{}\"\n{}\n[[allow]]\nhost = \"{OTHER}\"\nport = {plain}\nplain_http = true\n\
                 inject.headers = {{ authorization = \"Bearer {{secret:{SECRET_NAME}}}\" }}\n",
                cg.child("agent"),
                rule(API, plain, true),
            ),
        )]
    });
    let plain = w.api.plain_addr().port();
    let curl_plain = |host: &str| {
        let argv: Vec<String> = vec![
            "curl".into(),
            "-sS".into(),
            "--noproxy".into(),
            "*".into(),
            "--max-time".into(),
            "20".into(),
            "--resolve".into(),
            format!("{host}:{plain}:127.0.0.2"),
            "-H".into(),
            format!("Authorization: Bearer {}", w.placeholder.expose()),
            "-w".into(),
            "%{stderr}ABTEST status=%{http_code}\\n".into(),
            format!("http://{host}:{plain}/hash"),
        ];
        let run = clients::run_in_cgroup(&w.broker, &w.agent, "curl (plain http)", &[], &argv);
        let stderr = String::from_utf8_lossy(&run.output.stderr).into_owned();
        let status: u16 = stderr
            .lines()
            .find_map(|l| l.strip_prefix("ABTEST status="))
            .and_then(|s| s.trim().parse().ok())
            .unwrap_or(0);
        let body = String::from_utf8_lossy(&run.output.stdout).into_owned();
        (run, status, body)
    };

    let before = w.api.requests().len();
    let (run, status, body) = curl_plain(API);
    assert_eq!(
        status,
        403,
        "injection over plain HTTP without plain_http = true: {}",
        run.show()
    );
    assert!(body.contains("denied by agent-broker"), "{}", run.show());
    run.assert_no_secret(&w.secret);
    std::thread::sleep(Duration::from_millis(200));
    assert_eq!(
        w.api.requests().len(),
        before,
        "the API got the plain request: {:#?}",
        w.api.requests()
    );

    let (run, status, body) = curl_plain(OTHER);
    assert_eq!(
        status,
        200,
        "plain_http = true: {}\nbrokerd's log:\n{}",
        run.show(),
        w.broker.log()
    );
    run.assert_no_secret(&w.secret);
    let v: serde_json::Value =
        serde_json::from_str(&body).unwrap_or_else(|e| panic!("not JSON ({e}): {}", run.show()));
    assert_eq!(
        v["authorization_sha256"].as_str(),
        Some(w.injected_hash().as_str())
    );
    let last = w
        .api
        .requests()
        .pop()
        .unwrap_or_else(|| panic!("no request"));
    assert!(!last.tls, "{last:?}");
    assert_eq!(last.peer_owner, Some(w.broker.pid()), "{last:?}");
    w.assert_no_secret_in_logs();
}

// ---------------------------------------------------------------------------------------------
// Streaming, WebSocket, scrubbing

#[test]
fn streamed_response_arrives_in_pieces() {
    use agent_broker_tests::upstream::{STREAM_CHUNK_LEN, STREAM_CHUNKS, STREAM_GAP};
    let w = World::new();
    let min_spread = STREAM_GAP.as_secs_f64() * 1000.0 * (STREAM_CHUNKS as f64 - 1.0) * 0.8;
    let runs: Vec<(String, ClientRun, HttpReport)> = vec![
        {
            let (r, rep) = python_client(
                &w.broker,
                &w.agent,
                &w.trust(),
                &w.call("/stream"),
                "get",
                None,
            );
            ("python3".into(), r, rep)
        },
        {
            let (r, rep) = node_client(
                &w.broker,
                &w.agent,
                &w.trust(),
                &w.call("/stream").proto(Proto::Http2),
            );
            ("node h2".into(), r, rep)
        },
        {
            let (r, rep) = static_client_run(
                &w.broker,
                &w.agent,
                &w.trust(),
                &w.call("/stream").proto(Proto::Http1),
                "get",
                None,
            );
            ("agent-client http/1.1".into(), r, rep)
        },
    ];
    for (what, run, report) in runs {
        assert_eq!(
            report.status,
            200,
            "{what}: {}\nbrokerd's log:\n{}",
            report.show(),
            w.broker.log()
        );
        assert_eq!(
            report.body.len(),
            STREAM_CHUNKS * STREAM_CHUNK_LEN,
            "{what}: the whole stream arrives: {}",
            report.show()
        );
        let spread = report.chunk_ms.last().copied().unwrap_or(0.0)
            - report.chunk_ms.first().copied().unwrap_or(0.0);
        assert!(
            report.chunk_ms.len() >= 3 && spread >= min_spread,
            "{what}: the stream should arrive in pieces as the API sends them (one every \
             {STREAM_GAP:?}), not all at the end: arrival times {:?} ms, spread {spread:.0} ms \
             (want >= {min_spread:.0})",
            report.chunk_ms
        );
        run.assert_no_secret(&w.secret);
    }
    w.assert_no_secret_in_logs();
}

#[test]
fn websocket_echo_works_through_the_broker_with_the_handshake_injected() {
    require_privileges();
    let ca = TestCa::new("abtest upstream CA");
    let h1_api = http1_only_api(&ca);
    let w = world_with_second_api(ca, &h1_api);
    // Real APIs offer h2 and http/1.1; the upgrade must still work (over http/1.1 upstream).
    // The http/1.1-only API tells a splicing bug from an upstream-protocol one.
    for (api_what, upstream) in [
        ("API offering only http/1.1", &h1_api),
        ("API offering h2", &w.api),
    ] {
        for (client, mode) in [("python3", "python"), ("agent-client", "static")] {
            let what = format!("{client} to the {api_what}");
            let message = format!("abtest-ws-{client}-{}", std::process::id());
            let call = Call::new(API, api_ip(), upstream.port(), "/ws").header(
                "authorization",
                &format!("Bearer {}", w.placeholder.expose()),
            );
            let (run, report) = if mode == "python" {
                python_client(&w.broker, &w.agent, &w.trust(), &call, "ws", Some(&message))
            } else {
                static_client_run(&w.broker, &w.agent, &w.trust(), &call, "ws", Some(&message))
            };
            run.assert_no_secret(&w.secret);
            let record = upstream
                .requests()
                .into_iter()
                .rev()
                .find(|r| r.path == "/ws")
                .unwrap_or_else(|| panic!("{what}: the API saw no /ws request"));
            assert_eq!(
                report.status,
                101,
                "{what}: the WebSocket upgrade through brokerd: {}\nthe API saw: {record:?}\n\
                 brokerd's log:\n{}",
                report.show(),
                w.broker.log()
            );
            assert_eq!(
                report.ws_echo.as_deref(),
                Some(message.as_str()),
                "{what}: {}",
                report.show()
            );
            assert_eq!(
                record.header_hash("authorization"),
                Some(w.injected_hash().as_str()),
                "{what}: the handshake should carry the injected secret: {record:?}"
            );
            assert_eq!(record.peer_owner, Some(w.broker.pid()), "{record:?}");
        }
    }
    assert!(
        w.api.ws_messages() >= 2 && h1_api.ws_messages() >= 2,
        "the APIs echoed {} and {} messages",
        w.api.ws_messages(),
        h1_api.ws_messages()
    );
    w.assert_no_secret_in_logs();
}

#[test]
fn upstream_echo_of_the_secret_is_scrubbed_from_headers_and_body() {
    let w = World::new();
    let mut runs: Vec<(String, ClientRun, HttpReport)> = Vec::new();
    for proto in [Proto::Http1, Proto::Http2] {
        let (r, rep) = clients::curl(
            &w.broker,
            &w.agent,
            &w.trust(),
            &w.call("/echo").proto(proto),
        );
        runs.push((format!("curl {proto:?}"), r, rep));
    }
    let (r, rep) = python_client(
        &w.broker,
        &w.agent,
        &w.trust(),
        &w.call("/echo"),
        "get",
        None,
    );
    runs.push(("python3".into(), r, rep));
    let (r, rep) = node_client(
        &w.broker,
        &w.agent,
        &w.trust(),
        &w.call("/echo").proto(Proto::Http2),
    );
    runs.push(("node h2".into(), r, rep));
    for (what, run, report) in runs {
        assert_eq!(
            report.status,
            200,
            "{what}: {}\nbrokerd's log:\n{}",
            report.show(),
            w.broker.log()
        );
        // The API really echoed the secret: it received it.
        let record = w
            .api
            .requests()
            .pop()
            .unwrap_or_else(|| panic!("no request"));
        assert_eq!(
            record.header_hash("authorization"),
            Some(w.injected_hash().as_str()),
            "{what}"
        );
        run.assert_no_secret(&w.secret);
        let body = report.json();
        assert_eq!(
            body["headers"]["authorization"].as_str(),
            Some(format!("Bearer {REDACTED}").as_str()),
            "{what}: the echoed Authorization in the body should be scrubbed: {}",
            report.show()
        );
        assert_eq!(
            report
                .headers
                .get("x-echo-authorization")
                .map(String::as_str),
            Some(format!("Bearer {REDACTED}").as_str()),
            "{what}: the echoed response header should be scrubbed: {}",
            report.show()
        );
        assert!(
            !report.body.contains(w.placeholder.expose()),
            "{what}: the placeholder must not reach the API, so it cannot be echoed"
        );
    }
    w.assert_no_secret_in_logs();
}

/// curl's arguments for one call through the agent's own resolution (`--resolve`), no proxy,
/// with `extra` options before the URL.
fn curl_args(resolve: &str, extra: &[&str], url: &str) -> Vec<String> {
    let mut argv: Vec<String> = ["curl", "-sS", "--noproxy", "*", "--max-time", "20"]
        .into_iter()
        .map(String::from)
        .collect();
    argv.extend(["--resolve".to_string(), resolve.to_string()]);
    argv.extend(extra.iter().map(|s| s.to_string()));
    argv.push(url.to_string());
    argv
}

/// A name-matched plain HTTP rule reaches only the name's own addresses: an agent that dials
/// another address and names the allowed host in `Host` gets a 403, and the server at that
/// address receives nothing (issue 12.2; brokerd's resolver, the test's own, gives the name
/// 127.0.0.2 only).
#[test]
fn a_name_matched_plain_http_rule_reaches_only_the_names_addresses() {
    let outside = TestServer::http("127.0.0.3:0", "outside");
    let port = outside.addr().port();
    let w = World::with_policies(|cg, _api| {
        vec![(
            "agent".into(),
            format!(
                "cgroup = \"{}\"\n[[allow]]\nhost = \"{OTHER}\"\nport = {port}\nplain_http = true\n",
                cg.child("agent"),
            ),
        )]
    });
    let argv = curl_args(
        &format!("{OTHER}:{port}:127.0.0.3"),
        &["-w", "%{stderr}ABTEST status=%{http_code}\\n"],
        &format!("http://{OTHER}:{port}/exfil?data=abtest"),
    );
    let run = clients::run_in_cgroup(&w.broker, &w.agent, "curl (plain http)", &[], &argv);
    let stderr = String::from_utf8_lossy(&run.output.stderr).into_owned();
    assert!(stderr.contains("ABTEST status=403"), "{}", run.show());
    let body = String::from_utf8_lossy(&run.output.stdout).into_owned();
    assert!(
        body.contains("nothing proves that 127.0.0.3 is other.example.test"),
        "{}",
        run.show()
    );
    std::thread::sleep(Duration::from_millis(200));
    assert!(
        outside.accepted().is_empty(),
        "the address the name does not have was reached: {:?}",
        outside.accepted()
    );
}

/// A name-matched tcp passthrough reaches only the name's own addresses: a ClientHello naming
/// the allowed host, sent to another address, is refused and that address receives nothing;
/// sent to the name's address (127.0.0.2, by brokerd's resolver), it is passed through.
#[test]
fn a_name_matched_tcp_rule_reaches_only_the_names_addresses() {
    let outside = TestServer::http("127.0.0.3:0", "outside");
    let inside = TestServer::http("127.0.0.2:0", "inside");
    let (out_port, in_port) = (outside.addr().port(), inside.addr().port());
    let w = World::with_policies(|cg, _api| {
        vec![(
            "agent".into(),
            format!(
                "cgroup = \"{}\"\n[[allow]]\nhost = \"{OTHER}\"\nport = {out_port}\ntcp = true\n\
                 [[allow]]\nhost = \"{OTHER}\"\nport = {in_port}\ntcp = true\n",
                cg.child("agent"),
            ),
        )]
    });
    let hello = |ip: &str, port: u16| {
        // curl sends a ClientHello with SNI other.example.test to `ip`; what follows fails
        // either way (the servers speak plain HTTP), the question is who receives it.
        let argv = curl_args(
            &format!("{OTHER}:{port}:{ip}"),
            &["-k"],
            &format!("https://{OTHER}:{port}/"),
        );
        clients::run_in_cgroup(&w.broker, &w.agent, "curl (tls passthrough)", &[], &argv)
    };
    let run = hello("127.0.0.3", out_port);
    std::thread::sleep(Duration::from_millis(200));
    assert!(
        outside.accepted().is_empty(),
        "an address the name does not have got the ClientHello: {}",
        run.show()
    );
    assert!(
        w.broker
            .log()
            .contains("nothing proves that 127.0.0.3 is other.example.test"),
        "brokerd's log:\n{}",
        w.broker.log()
    );
    let run = hello("127.0.0.2", in_port);
    std::thread::sleep(Duration::from_millis(200));
    assert_eq!(
        inside.accepted().len(),
        1,
        "the name's own address was not reached: {}\nbrokerd's log:\n{}",
        run.show(),
        w.broker.log()
    );
}
