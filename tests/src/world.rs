//! The world of the tests against the HTTPS test API (`tests/tests/proxy.rs`, `handles.rs`,
//! `vault.rs`, `console.rs` and one test in `capture.rs`): a fresh cgroup, the test API
//! (`https://api.example.test:<port>/...` on 127.0.0.2 with its own CA, which brokerd trusts
//! through `--upstream-ca`), a brokerd with the test's policies, a secret in its vault, and the
//! broker CA exported for clients.
//!
//! Real clients (curl, python3 standard library, node, a statically linked Rust binary) inside
//! the cgroup hold only a placeholder or a handle. The name reaches 127.0.0.2 without /etc/hosts:
//! curl `--resolve`, python and the static client dial the IP and send the name as SNI, node gets
//! a `lookup` that answers 127.0.0.2.
//!
//! Oracles: what the upstream recorded (hashes of the credentials it received, never values, and
//! where a watched canary appeared), what the client printed (scanned for the secret in raw and
//! encoded forms, with its environment), brokerd's JSON 403s, brokerd's log and every brokerctl
//! output (scanned for the secret). Secrets are random `abtest-secret-<32 hex>` values made per
//! test; nothing prints them (see [`crate::canary`]).

use std::{
    net::{IpAddr, Ipv4Addr},
    path::PathBuf,
};

use crate::{
    Broker, Canary, TestCa, TestCgroup, TestUpstream, UpstreamOptions, UpstreamRequest,
    clients::{Call, ClientRun, HttpReport, Trust},
    require_privileges,
};

/// The name of the test's secret in brokerd's vault.
pub const SECRET_NAME: &str = "ABTEST_KEY";
/// The test API's name (its certificate names it).
pub const API: &str = "api.example.test";
/// Another name for the test API, covered by its certificate but (by default) by no rule.
pub const OTHER: &str = "other.example.test";

/// The test API's address.
/// The loopback address the test API listens on.
pub const TEST_API_IP: Ipv4Addr = Ipv4Addr::new(127, 0, 0, 2);

pub fn api_ip() -> IpAddr {
    IpAddr::V4(TEST_API_IP)
}

/// A policy rule allowing `host:port`; with `inject`, the Authorization header is set to
/// `Bearer {secret:ABTEST_KEY}`.
pub fn rule(host: &str, port: u16, inject: bool) -> String {
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
pub struct World {
    /// Its resolver (the harness's, see [`Broker`]) gives [`API`] and [`OTHER`] the API's
    /// address; a test that starts servers for other names adds them with
    /// [`Broker::add_name`].
    pub broker: Broker,
    pub api: TestUpstream,
    /// Kept alive: its PEM file is brokerd's `--upstream-ca`.
    _ca: TestCa,
    pub broker_ca: PathBuf,
    pub secret: Canary,
    /// A placeholder the agents send where the key goes (brokerd replaces it).
    pub placeholder: Canary,
    /// `<cg>/agent`: covered by the default policy (injection for api.example.test).
    pub agent: String,
    pub cg: TestCgroup,
}

impl World {
    /// The default world: `<cg>/agent` may call api.example.test on the API's TLS port with
    /// the secret injected as `Authorization: Bearer ...`.
    pub fn new() -> Self {
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
    pub fn with_policies(
        policies: impl FnOnce(&TestCgroup, &TestUpstream) -> Vec<(String, String)>,
    ) -> Self {
        Self::with_ca(TestCa::new("abtest upstream CA"), policies)
    }

    /// Like [`World::with_policies`], with an upstream CA the test made first (so it can start
    /// more upstreams brokerd trusts).
    pub fn with_ca(
        ca: TestCa,
        policies: impl FnOnce(&TestCgroup, &TestUpstream) -> Vec<(String, String)>,
    ) -> Self {
        Self::with_broker_args(ca, &[], policies)
    }

    /// Like [`World::with_ca`], with more brokerd arguments (`--approval-timeout 2`).
    pub fn with_broker_args(
        ca: TestCa,
        args: &[&str],
        policies: impl FnOnce(&TestCgroup, &TestUpstream) -> Vec<(String, String)>,
    ) -> Self {
        Self::with_setup(ca, args, |_| {}, policies)
    }

    /// Like [`World::with_broker_args`], running `setup` on brokerd's directories before it
    /// starts (a test mounts a file system of its own over the state directory).
    pub fn with_setup(
        ca: TestCa,
        args: &[&str],
        setup: impl FnOnce(&Broker),
        policies: impl FnOnce(&TestCgroup, &TestUpstream) -> Vec<(String, String)>,
    ) -> Self {
        Self::build(ca, args, None, setup, policies)
    }

    /// The default world's policy with an unprivileged brokerd running as `uid`, whose agents
    /// `brokerctl run --unprivileged` starts as that uid (issue 19). The agent name is still
    /// `<cg>/agent`, a name only: no cgroup is tagged.
    pub fn unprivileged(uid: u32) -> Self {
        Self::unprivileged_with(uid, |cg, api| {
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

    /// [`World::unprivileged`] with the test's policies.
    pub fn unprivileged_with(
        uid: u32,
        policies: impl FnOnce(&TestCgroup, &TestUpstream) -> Vec<(String, String)>,
    ) -> Self {
        Self::build(
            TestCa::new("abtest upstream CA"),
            &[],
            Some(uid),
            |_| {},
            policies,
        )
    }

    fn build(
        ca: TestCa,
        args: &[&str],
        unprivileged: Option<u32>,
        setup: impl FnOnce(&Broker),
        policies: impl FnOnce(&TestCgroup, &TestUpstream) -> Vec<(String, String)>,
    ) -> Self {
        require_privileges();
        let cg = TestCgroup::new();
        let api = TestUpstream::start(&ca, UpstreamOptions::api());
        // brokerd's own lookups (credentials to a name, name-matched plain HTTP and
        // passthrough) and its DNS for the agent go to the harness's resolver, never the host's.
        let mut builder = Broker::builder()
            .upstream_ca(ca.pem_path())
            .name(API, TEST_API_IP)
            .name(OTHER, TEST_API_IP);
        for (name, toml) in policies(&cg, &api) {
            builder = builder.policy(&name, &toml);
        }
        for arg in args {
            builder = builder.arg(arg);
        }
        if let Some(uid) = unprivileged {
            builder = builder.unprivileged(uid);
        }
        let mut broker = builder.prepare();
        setup(&broker);
        broker.restart();
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

    /// The CA the test API's certificate is from (which brokerd trusts), to start more
    /// upstreams with.
    pub fn upstream_ca(&self) -> &TestCa {
        &self._ca
    }

    pub fn trust(&self) -> Trust {
        Trust::Env(self.broker_ca.clone())
    }

    /// A call to the API as api.example.test with the placeholder as bearer token.
    pub fn call(&self, path: &str) -> Call {
        Call::new(API, api_ip(), self.api.port(), path).header(
            "authorization",
            &format!("Bearer {}", self.placeholder.expose()),
        )
    }

    /// sha256 of the header value the API must receive: `Bearer <secret>`.
    pub fn injected_hash(&self) -> String {
        self.secret.sha256_with_prefix("Bearer ")
    }

    /// Panics (with the client's redacted output and brokerd's log) unless `report` is a 200
    /// from `/hash` proving the API received `Bearer <secret>`, nothing leaked to the client, and
    /// the API's record shows brokerd delivered it (real secret in Authorization only, no
    /// placeholder). Returns the API's record.
    pub fn assert_injected(
        &self,
        what: &str,
        run: &ClientRun,
        report: &HttpReport,
    ) -> UpstreamRequest {
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
        // with the address the client dialled. An unprivileged sandbox's connections carry the
        // sandbox's pid (no kernel hook names the connecting process), and the client's `$$`
        // is a pid of the sandbox's own pid namespace: matched by agent and destination.
        let dst = std::net::SocketAddr::new(api_ip(), self.api.port());
        let conn = self.broker.wait_connection(what, |c| {
            c.origin
                .as_ref()
                .is_some_and(|o| match self.broker.unprivileged() {
                    None => o.pid == run.pid,
                    Some(_) => o.cgroup == self.agent && o.original_dst == dst,
                })
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
    pub fn assert_no_secret_in_logs(&self) {
        self.secret
            .assert_absent(&self.broker.log_bytes(), "brokerd's log");
        self.secret
            .assert_absent(&self.broker.transcript(), "brokerctl's output");
    }
}

impl Default for World {
    fn default() -> Self {
        Self::new()
    }
}
