//! Issue 3, TLS interception and credential injection: real clients (curl, python3 standard
//! library, node, a statically linked Rust binary) inside a tagged cgroup hold only a
//! placeholder or a handle and call `https://api.example.test:<port>/...`, a test API on
//! 127.0.0.2 with its own CA (brokerd trusts it through `--upstream-ca`). The name reaches
//! 127.0.0.2 without /etc/hosts: curl `--resolve`, python and the static client dial the IP
//! and send the name as SNI, node gets a `lookup` that answers 127.0.0.2.
//!
//! Oracles: what the upstream recorded (hashes of the credentials it received, never values,
//! and where a watched canary appeared), what the client printed (scanned for the secret in raw
//! and encoded forms, with its environment), brokerd's JSON 403s, brokerd's log and every
//! brokerctl output (scanned for the secret). Secrets are random `abtest-secret-<32 hex>` values
//! made per test; nothing prints them (see `agent_broker_tests::canary`).
//!
//! Run as root: `cargo test -p agent-broker-tests -- --test-threads=1`. The static client comes
//! from `$AGENT_BROKER_STATIC_CLIENT` or target/static (see `clients::static_client`).

use agent_broker_protocol::Decision;
use std::{
    fs,
    net::{IpAddr, Ipv4Addr},
    os::unix::fs::PermissionsExt as _,
    path::{Path, PathBuf},
    time::Duration,
};

use agent_broker_tests::{
    Alpn, Broker, Canary, TestCa, TestCgroup, TestUpstream, UpstreamOptions, UpstreamRequest,
    clients::{
        self, Call, ClientRun, HttpReport, Proto, SYSTEM_CA_PATH, SystemCaGuard, Trust,
        node_client, python_client, static_client_run,
    },
    redact, require_privileges, sha256_hex,
};

const SECRET_NAME: &str = "ABTEST_KEY";
const API: &str = "api.example.test";
const OTHER: &str = "other.example.test";
/// What brokerd writes in place of a secret value an upstream echoed.
const REDACTED: &str = "[redacted by agent-broker]";

fn api_ip() -> IpAddr {
    IpAddr::V4(Ipv4Addr::new(127, 0, 0, 2))
}

/// A policy rule allowing `host:port`; with `inject`, the Authorization header is set to
/// `Bearer {secret:ABTEST_KEY}`.
fn rule(host: &str, port: u16, inject: bool) -> String {
    let mut r = format!("\n[[allow]]\nhost = \"{host}\"\nport = {port}\n");
    if inject {
        r.push_str(&format!(
            "inject.headers = {{ authorization = \"Bearer {{secret:{SECRET_NAME}}}\" }}\n"
        ));
    }
    r
}

/// One test's world: a cgroup, the test CA and API, a brokerd trusting that CA with the
/// policies given, a secret in the vault, and the broker CA exported for clients.
///
/// Fields drop in order: brokerd first, the cgroup last.
struct World {
    broker: Broker,
    api: TestUpstream,
    /// Kept alive: its PEM file is brokerd's `--upstream-ca`.
    _ca: TestCa,
    broker_ca: PathBuf,
    secret: Canary,
    /// A placeholder the agents send where the key goes (brokerd replaces it).
    placeholder: Canary,
    /// `<cg>/agent`: covered by the default policy (injection for api.example.test).
    agent: String,
    cg: TestCgroup,
}

impl World {
    /// The default world: `<cg>/agent` may call api.example.test on the API's TLS port with
    /// the secret injected as `Authorization: Bearer ...`.
    fn new() -> Self {
        Self::with_policies(|cg, api| {
            vec![(
                "agent".into(),
                format!(
                    "cgroup = \"{}\"\n{}",
                    cg.child("agent"),
                    rule(API, api.port(), true)
                ),
            )]
        })
    }

    /// A world whose policy files are made by `policies(cgroup, api)` as (name, toml).
    fn with_policies(
        policies: impl FnOnce(&TestCgroup, &TestUpstream) -> Vec<(String, String)>,
    ) -> Self {
        Self::with_ca(TestCa::new("abtest upstream CA"), policies)
    }

    /// Like [`World::with_policies`], with an upstream CA the test made first (so it can start
    /// more upstreams brokerd trusts).
    fn with_ca(
        ca: TestCa,
        policies: impl FnOnce(&TestCgroup, &TestUpstream) -> Vec<(String, String)>,
    ) -> Self {
        require_privileges();
        let cg = TestCgroup::new();
        let api = TestUpstream::start(&ca, UpstreamOptions::api());
        let mut builder = Broker::builder().upstream_ca(ca.pem_path());
        for (name, toml) in policies(&cg, &api) {
            builder = builder.policy(&name, &toml);
        }
        let broker = builder.start();
        let secret = Canary::new();
        broker.secret_set(SECRET_NAME, secret.expose().as_bytes());
        let placeholder = Canary::with_prefix("abtest-placeholder-");
        api.watch_for("secret", &secret);
        api.watch_for("placeholder", &placeholder);
        let broker_ca = broker.export_ca();
        let agent = cg.child("agent");
        Self {
            broker,
            api,
            _ca: ca,
            broker_ca,
            secret,
            placeholder,
            agent,
            cg,
        }
    }

    fn trust(&self) -> Trust {
        Trust::Env(self.broker_ca.clone())
    }

    /// A call to the API as api.example.test with the placeholder as bearer token.
    fn call(&self, path: &str) -> Call {
        Call::new(API, api_ip(), self.api.port(), path).header(
            "authorization",
            &format!("Bearer {}", self.placeholder.expose()),
        )
    }

    /// sha256 of the header value the API must receive: `Bearer <secret>`.
    fn injected_hash(&self) -> String {
        self.secret.sha256_with_prefix("Bearer ")
    }

    /// Panics (with the client's redacted output and brokerd's log) unless `report` is a 200
    /// from `/hash` proving the API received `Bearer <secret>`, nothing leaked to the client, and
    /// the API's record shows brokerd delivered it (real secret in Authorization only, no
    /// placeholder). Returns the API's record.
    fn assert_injected(&self, what: &str, run: &ClientRun, report: &HttpReport) -> UpstreamRequest {
        assert_eq!(
            report.status,
            200,
            "{what}: {}\n{}\nbrokerd's log:\n{}",
            report.show(),
            run.show(),
            self.broker.log()
        );
        let body = report.json();
        assert_eq!(
            body["authorization_sha256"].as_str(),
            Some(self.injected_hash().as_str()),
            "{what}: the API did not receive `Bearer <secret>` (it saw another Authorization): {}",
            report.show()
        );
        run.assert_no_secret(&self.secret);
        let record = self
            .api
            .requests()
            .into_iter()
            .rev()
            .find(|r| {
                r.path == "/hash" && r.header_hash("authorization") == Some(&self.injected_hash())
            })
            .unwrap_or_else(|| {
                panic!(
                    "{what}: the API has no record of the call: {:#?}",
                    self.api.requests()
                )
            });
        assert_eq!(
            record.peer_owner,
            Some(self.broker.pid()),
            "{what}: the API's peer socket should be brokerd's: {record:?}"
        );
        assert_eq!(
            record.sni.as_deref(),
            Some(API),
            "{what}: SNI brokerd sent upstream: {record:?}"
        );
        // The kernel path: brokerd attributes the connection to the client's pid and cgroup,
        // with the address the client dialled.
        let conn = self.broker.wait_connection(what, |c| {
            c.origin.as_ref().is_some_and(|o| o.pid == run.pid)
        });
        let origin = conn
            .origin
            .clone()
            .unwrap_or_else(|| panic!("no origin: {conn:?}"));
        assert_eq!(origin.cgroup, self.agent, "{what}: {conn:?}");
        assert_eq!(
            origin.original_dst,
            std::net::SocketAddr::new(api_ip(), self.api.port()),
            "{what}: {conn:?}"
        );
        assert_eq!(
            record.canary_hits,
            vec!["secret in header authorization (raw)".to_string()],
            "{what}: the secret must reach the API in Authorization only, and the placeholder \
             not at all: {record:?}"
        );
        record
    }

    /// Every log line and brokerctl output so far is free of the secret.
    fn assert_no_secret_in_logs(&self) {
        self.secret
            .assert_absent(&self.broker.log_bytes(), "brokerd's log");
        self.secret
            .assert_absent(&self.broker.transcript(), "brokerctl's output");
    }
}

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
fn process_outside_tagged_cgroups_dialling_the_broker_port_gets_nothing() {
    // brokerd is no credential oracle: a local process that is not an agent connects straight
    // to its listener, asking for api.example.test with the placeholder.
    let w = World::new();
    let listener = w
        .broker
        .status()
        .listeners
        .into_iter()
        .find(std::net::SocketAddr::is_ipv4)
        .unwrap_or_else(|| panic!("brokerd reports no IPv4 listener"));
    let before = w.api.requests().len();
    let out = agent_broker_tests::run_with_timeout(
        std::process::Command::new("curl")
            .args(["-sS", "--noproxy", "*", "--max-time", "10", "--http1.1"])
            .arg("--cacert")
            .arg(&w.broker_ca)
            .arg("--resolve")
            .arg(format!("{API}:{}:{}", listener.port(), listener.ip()))
            .args([
                "-H",
                &format!("Authorization: Bearer {}", w.placeholder.expose()),
            ])
            .args(["-w", "%{stderr}ABTEST status=%{http_code}\\n"])
            .arg(format!("https://{API}:{}/hash", listener.port())),
        Duration::from_secs(20),
    );
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        !out.status.success() || stderr.contains("ABTEST status=000"),
        "a direct connection to brokerd's port must be refused: {}\n{}",
        redact(&String::from_utf8_lossy(&out.stdout)),
        redact(&stderr)
    );
    w.secret.assert_absent(&out.stdout, "curl's stdout");
    w.secret.assert_absent(&out.stderr, "curl's stderr");
    std::thread::sleep(Duration::from_millis(200));
    assert_eq!(
        w.api.requests().len(),
        before,
        "the API received a request from a process outside any agent cgroup"
    );
    let refused = w.broker.wait_connection("the direct connection", |c| {
        c.origin.is_none() && matches!(c.outcome, agent_broker_protocol::Outcome::Refused { .. })
    });
    assert!(refused.peer.ip().is_loopback(), "{refused:?}");
    w.assert_no_secret_in_logs();
}

#[test]
fn upstream_with_a_certificate_brokerd_does_not_trust_gets_no_secret() {
    // An "attacker" on 127.0.0.3 with a certificate for api.example.test from a CA brokerd does
    // not trust. The policy allows api.example.test on its port: only TLS verification stands
    // between the secret and it.
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
                rule(API, evil.port(), true)
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
// Handles

/// `brokerctl handle mint`: (id, token). The token is registered as a canary (never printed).
///
/// Run outside the broker's transcript: printing the token once, here, is mint's job; every
/// other brokerctl output is scanned for it.
fn mint(broker: &Broker, cgroup: &str, host: &str, ttl: &str) -> (String, Canary) {
    let out = agent_broker_tests::run_with_timeout(
        broker.ctl().args([
            "handle",
            "mint",
            "--cgroup",
            cgroup,
            "--secret",
            SECRET_NAME,
            "--host",
            host,
            "--ttl",
            ttl,
        ]),
        agent_broker_tests::SHORT,
    );
    let stdout = String::from_utf8_lossy(&out.stdout).trim().to_string();
    let token = Canary::adopt(&stdout);
    let stderr = String::from_utf8_lossy(&out.stderr).into_owned();
    assert!(
        out.status.success(),
        "handle mint failed ({}): {}",
        out.status,
        redact(&stderr)
    );
    assert!(
        stdout.starts_with("brk_") && !stdout.contains(char::is_whitespace),
        "handle mint should print one brk_ token on stdout, got {} bytes: {}",
        stdout.len(),
        redact(&stdout)
    );
    let id = stderr
        .split_whitespace()
        .skip_while(|w| *w != "handle")
        .nth(1)
        .unwrap_or_else(|| {
            panic!(
                "handle mint printed no `handle <id>` on stderr: {}",
                redact(&stderr)
            )
        })
        .to_string();
    (id, token)
}

/// A world for handles: `<cg>/h` and a sibling `<cg>/sib` may both call api.example.test and
/// other.example.test on the API port, without injection.
fn handle_world() -> World {
    World::with_policies(|cg, api| {
        ["h", "sib"]
            .iter()
            .map(|sub| {
                (
                    (*sub).to_string(),
                    format!(
                        "cgroup = \"{}\"\n{}{}",
                        cg.child(sub),
                        rule(API, api.port(), false),
                        rule(OTHER, api.port(), false)
                    ),
                )
            })
            .collect()
    })
}

#[test]
fn handle_is_swapped_in_header_bearer_basic_auth_and_query_for_its_cgroup_and_host() {
    let w = handle_world();
    let h = w.cg.child("h");
    let (id, token) = mint(&w.broker, &h, API, "15m");
    w.api.watch_for("handle", &token);
    let t = token.expose();
    let basic = data_encoding::BASE64.encode(format!("abtest:{}", w.secret.expose()).as_bytes());
    let cases: Vec<(&str, Call, &str, String)> = vec![
        (
            "x-api-key header",
            Call::new(API, api_ip(), w.api.port(), "/hash").header("x-api-key", t),
            "x_api_key_sha256",
            w.secret.sha256(),
        ),
        (
            "Authorization: Bearer",
            Call::new(API, api_ip(), w.api.port(), "/hash")
                .header("authorization", &format!("Bearer {t}")),
            "authorization_sha256",
            w.secret.sha256_with_prefix("Bearer "),
        ),
        (
            "basic auth",
            Call::new(API, api_ip(), w.api.port(), "/hash").header(
                "authorization",
                &format!(
                    "Basic {}",
                    data_encoding::BASE64.encode(format!("abtest:{t}").as_bytes())
                ),
            ),
            "authorization_sha256",
            sha256_hex(format!("Basic {basic}").as_bytes()),
        ),
        (
            "query parameter",
            Call::new(API, api_ip(), w.api.port(), &format!("/hash?key={t}")),
            "query_sha256",
            w.secret.sha256_with_prefix("key="),
        ),
    ];
    for (what, call, field, want) in cases {
        for proto in [Proto::Http1, Proto::Http2] {
            let (run, report) =
                clients::curl(&w.broker, &h, &w.trust(), &call.clone().proto(proto));
            assert_eq!(
                report.status,
                200,
                "handle in {what} ({proto:?}): {}\nbrokerd's log:\n{}",
                report.show(),
                w.broker.log()
            );
            assert_eq!(
                report.json()[field].as_str(),
                Some(want.as_str()),
                "handle in {what} ({proto:?}): the API must receive the secret in place of the \
                 handle: {}",
                report.show()
            );
            run.assert_no_secret(&w.secret);
            let last = w
                .api
                .requests()
                .pop()
                .unwrap_or_else(|| panic!("no request"));
            assert!(
                !last.canary_hits.iter().any(|h| h.starts_with("handle")),
                "handle in {what}: the handle itself reached the API: {last:?}"
            );
        }
    }

    // A cgroup below the handle's is part of its subtree.
    let below = w.cg.create_child("h/tool");
    let call = Call::new(API, api_ip(), w.api.port(), "/hash").header("x-api-key", t);
    let (_, report) = clients::curl(&w.broker, &below, &w.trust(), &call);
    assert_eq!(
        report.status,
        200,
        "from a cgroup below the handle's: {}",
        report.show()
    );
    assert_eq!(
        report.json()["x_api_key_sha256"].as_str(),
        Some(w.secret.sha256().as_str())
    );

    // handle list shows the handle, never the token.
    let list = w.broker.ctl_ok(&["handle", "list", "--json"]);
    token.assert_absent(list.as_bytes(), "handle list --json");
    let handles: serde_json::Value =
        serde_json::from_str(&list).unwrap_or_else(|e| panic!("handle list --json ({e}): {list}"));
    assert!(
        handles
            .as_array()
            .is_some_and(|a| a.iter().any(|x| x["id"].as_str() == Some(id.as_str())
                && x["host"].as_str() == Some(API)
                && x["cgroup"].as_str() == Some(h.as_str()))),
        "handle list should show {id} for {h} towards {API}: {list}"
    );
    token.assert_absent(&w.broker.transcript(), "brokerctl's output");
    token.assert_absent(&w.broker.log_bytes(), "brokerd's log");
    w.assert_no_secret_in_logs();
}

/// Calls the API with `token` in x-api-key from `cgroup` (as `host`); asserts brokerd's 403 and
/// that the API got nothing. Returns the reason.
fn assert_handle_refused(
    w: &World,
    cgroup: &str,
    host: &str,
    token: &Canary,
    what: &str,
) -> String {
    let before = w.api.requests().len();
    let call = Call::new(host, api_ip(), w.api.port(), "/hash").header("x-api-key", token.expose());
    let (run, report) = clients::curl(&w.broker, cgroup, &w.trust(), &call);
    let reason = report.assert_denied(cgroup, what);
    run.assert_no_secret(&w.secret);
    std::thread::sleep(Duration::from_millis(200));
    let after = w.api.requests();
    assert_eq!(
        after.len(),
        before,
        "{what}: the API received the request: {:#?}",
        &after[before..]
    );
    reason
}

#[test]
fn handle_is_refused_from_another_cgroup_for_another_host_after_expiry_and_after_revoke() {
    let w = handle_world();
    let h = w.cg.child("h");
    let sib = w.cg.child("sib");
    let (id, token) = mint(&w.broker, &h, API, "15m");
    w.api.watch_for("handle", &token);

    // Works where it should (the oracle is meaningful).
    let call = Call::new(API, api_ip(), w.api.port(), "/hash").header("x-api-key", token.expose());
    let (_, report) = clients::curl(&w.broker, &h, &w.trust(), &call);
    assert_eq!(
        report.status,
        200,
        "{}\nbrokerd's log:\n{}",
        report.show(),
        w.broker.log()
    );

    let reason = assert_handle_refused(&w, &sib, API, &token, "handle from a sibling cgroup");
    assert!(
        reason.contains("cgroup"),
        "the reason should say the cgroup is wrong: {reason}"
    );
    let reason = assert_handle_refused(&w, &h, OTHER, &token, "handle for another host");
    assert!(
        reason.contains("host") || reason.contains(OTHER),
        "the reason should say the host is wrong: {reason}"
    );

    let (_, short) = mint(&w.broker, &h, API, "1s");
    w.api.watch_for("short handle", &short);
    std::thread::sleep(Duration::from_millis(2100));
    let reason = assert_handle_refused(&w, &h, API, &short, "expired handle");
    assert!(
        reason.contains("expired"),
        "the reason should say the handle expired: {reason}"
    );

    w.broker.ctl_ok(&["handle", "revoke", &id]);
    let reason = assert_handle_refused(&w, &h, API, &token, "revoked handle");
    assert!(
        reason.contains("revoked"),
        "the reason should say the handle was revoked: {reason}"
    );
    let list = w.broker.ctl_ok(&["handle", "list", "--json"]);
    let handles: serde_json::Value =
        serde_json::from_str(&list).unwrap_or_else(|e| panic!("handle list --json ({e}): {list}"));
    assert!(
        handles.as_array().is_some_and(|a| a
            .iter()
            .any(|x| x["id"].as_str() == Some(id.as_str()) && x["revoked"] == true)),
        "handle list should show {id} revoked: {list}"
    );
    for r in w.api.requests() {
        assert!(
            !r.canary_hits.iter().any(|h| h.contains("handle")),
            "a handle token reached the API: {r:?}"
        );
    }
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

// ---------------------------------------------------------------------------------------------
// Vault and secret hygiene

fn file_hash(path: &Path) -> String {
    sha256_hex(&fs::read(path).unwrap_or_else(|e| panic!("cannot read {}: {e}", path.display())))
}

#[test]
fn vault_refuses_a_group_readable_key_and_a_wrong_key_and_changes_nothing() {
    require_privileges();
    let mut broker = Broker::start();
    let secret = Canary::new();
    broker.secret_set(SECRET_NAME, secret.expose().as_bytes());
    broker.stop();
    let state = broker.state_dir();
    let key = state.join("master.key");
    let vault = state.join("vault.redb");
    let mode = fs::metadata(&key)
        .unwrap_or_else(|e| panic!("brokerd created no {}: {e}", key.display()))
        .permissions()
        .mode()
        & 0o777;
    assert_eq!(mode, 0o600, "master.key is created 0600, it is {mode:o}");
    assert!(vault.is_file(), "brokerd created no {}", vault.display());
    secret.assert_absent(
        &fs::read(&vault).unwrap_or_default(),
        "vault.redb (must be encrypted)",
    );
    let key_hash = file_hash(&key);
    let vault_hash = file_hash(&vault);

    // 0644: refused, naming the file.
    fs::set_permissions(&key, fs::Permissions::from_mode(0o644))
        .unwrap_or_else(|e| panic!("chmod 0644 {}: {e}", key.display()));
    let err = match broker.try_start() {
        Ok(()) => panic!(
            "brokerd started with a 0644 master.key; its log:\n{}",
            broker.log()
        ),
        Err(e) => e,
    };
    let log = broker.log_of_last_start();
    assert!(
        log.contains(&key.display().to_string()),
        "the refusal should name {}: {err}",
        key.display()
    );
    assert_eq!(
        file_hash(&vault),
        vault_hash,
        "vault.redb changed after the 0644 refusal"
    );
    assert_eq!(
        file_hash(&key),
        key_hash,
        "master.key changed after the 0644 refusal"
    );
    assert_eq!(
        fs::metadata(&key)
            .map(|m| m.permissions().mode() & 0o777)
            .unwrap_or(0),
        0o644,
        "brokerd must not quietly chmod the key"
    );

    // Another 32-byte key, 0600: refused with a clear error.
    fs::set_permissions(&key, fs::Permissions::from_mode(0o600))
        .unwrap_or_else(|e| panic!("chmod 0600 {}: {e}", key.display()));
    let original_key = fs::read(&key).unwrap_or_default();
    let mut wrong = [0u8; 32];
    getrandom_fill(&mut wrong);
    fs::write(&key, wrong).unwrap_or_else(|e| panic!("cannot write {}: {e}", key.display()));
    let wrong_hash = file_hash(&key);
    let err = match broker.try_start() {
        Ok(()) => panic!(
            "brokerd started with the wrong master key; its log:\n{}",
            broker.log()
        ),
        Err(e) => e,
    };
    let log = broker.log_of_last_start().to_lowercase();
    assert!(
        log.contains("key")
            && (log.contains("wrong")
                || log.contains("does not")
                || log.contains("decrypt")
                || log.contains("mismatch")),
        "the refusal should say the master key does not open the vault: {err}"
    );
    assert_eq!(
        file_hash(&vault),
        vault_hash,
        "vault.redb changed after the wrong-key refusal"
    );
    assert_eq!(
        file_hash(&key),
        wrong_hash,
        "brokerd rewrote the (wrong) key file"
    );

    // The right key again: brokerd starts and the secret is still there.
    fs::write(&key, &original_key).unwrap_or_else(|e| panic!("cannot restore the key: {e}"));
    broker.restart();
    let list = broker.ctl_ok(&["secret", "list", "--json"]);
    assert!(list.contains(SECRET_NAME), "the secret survived: {list}");
    secret.assert_absent(&broker.log_bytes(), "brokerd's log");
    secret.assert_absent(&broker.transcript(), "brokerctl's output");
}

fn getrandom_fill(buf: &mut [u8]) {
    let mut f = fs::File::open("/dev/urandom").unwrap_or_else(|e| panic!("/dev/urandom: {e}"));
    std::io::Read::read_exact(&mut f, buf).unwrap_or_else(|e| panic!("/dev/urandom: {e}"));
}

#[test]
fn secret_values_never_appear_in_brokerctl_output_secret_list_or_logs() {
    let w = World::new();
    // Traffic that uses the secret, so the log has request lines.
    let (run, report) = clients::curl(&w.broker, &w.agent, &w.trust(), &w.call("/hash"));
    w.assert_injected("curl", &run, &report);

    let list = w.broker.ctl_ok(&["secret", "list", "--json"]);
    let secrets: serde_json::Value = serde_json::from_str(&list)
        .unwrap_or_else(|e| panic!("secret list --json ({e}): {}", redact(&list)));
    let entry = secrets
        .as_array()
        .and_then(|a| a.iter().find(|s| s["name"].as_str() == Some(SECRET_NAME)))
        .unwrap_or_else(|| panic!("secret list --json lacks {SECRET_NAME}: {}", redact(&list)));
    let mut keys: Vec<&str> = entry
        .as_object()
        .map(|o| o.keys().map(String::as_str).collect())
        .unwrap_or_default();
    keys.sort_unstable();
    assert_eq!(
        keys,
        ["created_unix", "name", "updated_unix", "version"],
        "secret list fields"
    );
    assert_eq!(entry["version"], 1, "{entry}");

    // Rotate: a new version, injected from then on.
    let rotated = Canary::new();
    let out = w.broker.ctl_output_with_stdin(
        &["secret", "rotate", SECRET_NAME],
        rotated.expose().as_bytes(),
    );
    assert!(
        out.status.success(),
        "secret rotate: {}",
        redact(&String::from_utf8_lossy(&out.stderr))
    );
    let (run, report) = clients::curl(&w.broker, &w.agent, &w.trust(), &w.call("/hash"));
    assert_eq!(report.status, 200, "{}", report.show());
    assert_eq!(
        report.json()["authorization_sha256"].as_str(),
        Some(rotated.sha256_with_prefix("Bearer ").as_str()),
        "after rotate the API receives the new value"
    );
    run.assert_no_secret(&rotated);
    run.assert_no_secret(&w.secret);
    let list = w.broker.ctl_ok(&["secret", "list", "--json"]);
    assert!(
        list.contains("\"version\": 2") || list.contains("\"version\":2"),
        "version 2 after rotate: {}",
        redact(&list)
    );
    w.broker.ctl_ok(&["secret", "list"]);
    w.broker.ctl_ok(&["status"]);
    w.broker.ctl_ok(&["connections"]);
    w.broker.ctl_ok(&["connections", "--json"]);
    w.broker.ctl_ok(&["handle", "list"]);

    // rm: gone from the list; a request that needs it is refused, not sent with nothing.
    w.broker.ctl_ok(&["secret", "rm", SECRET_NAME]);
    let list = w.broker.ctl_ok(&["secret", "list", "--json"]);
    assert!(
        !list.contains(SECRET_NAME),
        "secret rm left {SECRET_NAME}: {}",
        redact(&list)
    );
    let before = w.api.requests().len();
    let (_, report) = clients::curl(&w.broker, &w.agent, &w.trust(), &w.call("/hash"));
    assert!(
        report.status >= 400,
        "a request whose injected secret was removed must fail: {}",
        report.show()
    );
    std::thread::sleep(Duration::from_millis(200));
    assert_eq!(
        w.api.requests().len(),
        before,
        "the API got a request without its secret"
    );

    for secret in [&w.secret, &rotated] {
        secret.assert_absent(&w.broker.log_bytes(), "brokerd's log");
        secret.assert_absent(&w.broker.transcript(), "brokerctl's output");
        let vault = w.broker.state_dir().join("vault.redb");
        secret.assert_absent(&fs::read(&vault).unwrap_or_default(), "vault.redb");
    }
}

// ---------------------------------------------------------------------------------------------
// Audit: what `brokerctl logs` and the console show

/// Every record `brokerctl logs --json` prints, parsed.
fn audit_records(w: &World, extra: &[&str]) -> (Vec<agent_broker_protocol::AuditEvent>, String) {
    let mut args = vec!["logs", "--json"];
    args.extend_from_slice(extra);
    let out = w.broker.ctl_ok(&args);
    let records = out
        .lines()
        .filter(|l| !l.trim().is_empty())
        .map(|l| {
            serde_json::from_str(l).unwrap_or_else(|e| panic!("bad log line ({e}): {}", redact(l)))
        })
        .collect();
    (records, out)
}

#[test]
fn calls_denials_and_handle_misuse_are_audited_and_shown_in_the_console_without_the_secret() {
    use agent_broker_protocol::EventKind;
    let w = World::new();
    // An allowed call (the secret is injected, and the upstream echoes it back), a call to a
    // host without a rule, and a request carrying an unknown handle.
    let (run, report) = clients::curl(&w.broker, &w.agent, &w.trust(), &w.call("/echo?q=1"));
    assert_eq!(report.status, 200, "{}", report.show());
    run.assert_no_secret(&w.secret);
    let denied = Call::new(OTHER, api_ip(), w.api.port(), "/hash");
    let (_, report) = clients::curl(&w.broker, &w.agent, &w.trust(), &denied);
    report.assert_denied(&w.agent, "a host without a rule");
    let bogus = format!("brk_{}", "a".repeat(52));
    let misuse = Call::new(API, api_ip(), w.api.port(), "/hash").header("x-api-key", &bogus);
    let (_, report) = clients::curl(&w.broker, &w.agent, &w.trust(), &misuse);
    report.assert_denied(&w.agent, "an unknown handle");

    // Records are committed in groups (every 50 ms): wait until all three calls are stored.
    let deadline = std::time::Instant::now() + Duration::from_secs(5);
    let (records, raw) = loop {
        let (records, raw) = audit_records(&w, &[]);
        let stored = |kind| records.iter().any(|r| r.kind == Some(kind));
        let all = stored(EventKind::Request)
            && stored(EventKind::Denial)
            && stored(EventKind::HandleMisuse);
        if all || std::time::Instant::now() > deadline {
            break (records, raw);
        }
        std::thread::sleep(Duration::from_millis(100));
    };
    w.secret
        .assert_absent(raw.as_bytes(), "brokerctl logs --json");
    let call = records
        .iter()
        .find(|r| r.kind == Some(EventKind::Request) && r.path.as_deref() == Some("/echo"))
        .unwrap_or_else(|| panic!("no request record for /echo in {}", redact(&raw)));
    assert_eq!(call.cgroup.as_deref(), Some(w.agent.as_str()));
    assert_eq!(call.status, Some(200));
    assert_eq!(call.method.as_deref(), Some("GET"));
    assert_eq!(call.host.as_deref(), Some(API));
    assert_eq!(
        call.secrets,
        vec![SECRET_NAME.to_string()],
        "secret names, never values"
    );
    assert!(
        call.pid.is_some() && call.comm.as_deref() == Some("curl"),
        "{call:?}"
    );
    assert!(call.bytes_out > 0, "response bytes are counted: {call:?}");
    assert!(
        call.rule.as_deref().is_some_and(|r| r.contains("allow[")),
        "{call:?}"
    );
    assert!(
        records.iter().any(|r| r.kind == Some(EventKind::Denial)
            && r.host.as_deref() == Some(OTHER)
            && r.reason.as_deref().is_some_and(|x| x.contains(OTHER))),
        "no denial record for {OTHER}: {}",
        redact(&raw)
    );
    assert!(
        records
            .iter()
            .any(|r| r.kind == Some(EventKind::HandleMisuse)),
        "no handle-misuse record: {}",
        redact(&raw)
    );
    let (denials, _) = audit_records(&w, &["--denied"]);
    assert!(!denials.is_empty() && denials.iter().all(|r| r.decision == Some(Decision::Deny)));

    // The console, fed by the same brokerd, shows the call and flags the denials; no frame it
    // draws contains the secret.
    let (feed, rx) = agent_broker_console::feed::Feed::spawn(&w.broker.run_dir())
        .unwrap_or_else(|e| panic!("console feed: {e}"));
    let mut app = agent_broker_console::app::App::new(w.broker.run_dir().display().to_string());
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    while app.history().len() < records.len() && std::time::Instant::now() < deadline {
        if let Ok(msg) = rx.recv_timeout(Duration::from_millis(200)) {
            app.apply(msg);
        }
    }
    drop(feed);
    assert!(
        app.history()
            .iter()
            .any(|e| e.event.path.as_deref() == Some("/echo") && !e.denied),
        "the console model lacks the /echo call"
    );
    assert!(
        app.history().iter().any(|e| e.denied),
        "the console model flags no denial"
    );
    for (width, height) in [(80, 24), (120, 40)] {
        let mut terminal =
            ratatui::Terminal::new(ratatui::backend::TestBackend::new(width, height))
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
    }
    w.assert_no_secret_in_logs();
}
