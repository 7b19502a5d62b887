//! Issue 4, the policy engine, end to end: real curl clients in tagged cgroups call
//! `https://api.example.test:<port>/v1/...` (the test API on 127.0.0.2, with its own CA that
//! brokerd trusts through `--upstream-ca`), and brokerd decides each request by the policy files
//! in its policy dir: methods and paths, rate limits, expiry, delegation narrowing between a
//! cgroup and a sub-agent cgroup below it, hot reload, and `brokerctl policy check / reload /
//! show / explain`.
//!
//! Oracles: the client's HTTP status, headers (`Retry-After`) and brokerd's JSON body (403 and
//! 429: `error`, `reason`, `rule`, `agent`); what the test API recorded (method, path, and the
//! sha256 of the Authorization it received, never values), so "denied" also means "the API got
//! nothing"; `brokerctl status --json` (`policy.error`, brokerd's pid across a reload); brokerctl's
//! output and exit status. Secrets are random `abtest-secret-<32 hex>` values made per test and
//! never printed; every client output, brokerd's log and every brokerctl output is scanned for
//! them.
//!
//! Needs root, cgroup v2 and BPF (brokerd attaches its programs to the test's cgroup), and curl
//! (`rfc3339_formats_utc_dates`, a check of this file's date helper, needs nothing).
//!
//! Run as root: `cargo test -p agent-broker-tests --test policy -- --test-threads=1`.

use std::{
    fs,
    path::PathBuf,
    process::Command,
    thread,
    time::{Duration, Instant, SystemTime},
};

use agent_broker_core::time::format_rfc3339;
use agent_broker_protocol::PolicyStatus;
use agent_broker_tests::{
    Broker, Canary, SHORT, TestCa, TestCgroup, TestUpstream, UpstreamOptions, UpstreamRequest, bin,
    clients::{self, Call, ClientRun, HttpReport, Proto, Trust},
    poll_until, redact, require_privileges, run_with_timeout,
    world::{API, OTHER, SECRET_NAME, api_ip},
};

/// How long a policy edit may take to apply (issue 4: within a second), with room for one
/// client run in flight.
const RELOAD_WITHIN: Duration = Duration::from_millis(1500);

/// The rule line that injects the secret: `Authorization: Bearer <ABTEST_KEY>`.
fn inject() -> String {
    format!("inject.headers = {{ authorization = \"Bearer {{secret:{SECRET_NAME}}}\" }}\n")
}

/// 1-based line of the first line of `text` containing `needle`.
fn line_of(text: &str, needle: &str) -> usize {
    text.lines()
        .position(|l| l.contains(needle))
        .map(|i| i + 1)
        .unwrap_or_else(|| panic!("{needle:?} is not in the policy text:\n{text}"))
}

/// One test's world: a cgroup, the test CA and API, a brokerd trusting that CA with the policy
/// files given, a secret in the vault, and the broker CA exported for clients.
///
/// Fields drop in order: brokerd first, the cgroup last.
struct World {
    broker: Broker,
    api: TestUpstream,
    /// Kept alive: its PEM file is brokerd's `--upstream-ca`.
    _ca: TestCa,
    broker_ca: PathBuf,
    secret: Canary,
    /// `<cg>/agent`.
    agent: String,
    cg: TestCgroup,
}

impl World {
    /// A world whose policy files are made by `policies(cgroup, API port)` as (name, toml).
    fn new(policies: impl FnOnce(&TestCgroup, u16) -> Vec<(String, String)>) -> Self {
        require_privileges();
        let ca = TestCa::new("abtest upstream CA");
        let cg = TestCgroup::new();
        let api = TestUpstream::start(&ca, UpstreamOptions::api());
        let mut builder = Broker::builder()
            .upstream_ca(ca.pem_path())
            .name(API, api_ip())
            .name(OTHER, api_ip());
        for (name, toml) in policies(&cg, api.port()) {
            builder = builder.policy(&name, &toml);
        }
        let broker = builder.start();
        let secret = Canary::new();
        broker.secret_set(SECRET_NAME, secret.expose().as_bytes());
        api.watch_for("secret", &secret);
        let broker_ca = broker.export_ca();
        let agent = cg.child("agent");
        Self {
            broker,
            api,
            _ca: ca,
            broker_ca,
            secret,
            agent,
            cg,
        }
    }

    fn trust(&self) -> Trust {
        Trust::Env(self.broker_ca.clone())
    }

    /// `METHOD https://host:<API port>path` (POST and PUT carry a small JSON body).
    fn call(&self, method: &str, host: &str, path: &str) -> Call {
        let call = Call::new(host, api_ip(), self.api.port(), path).method(method);
        if matches!(method, "POST" | "PUT" | "PATCH") {
            call.body("{\"abtest\":true}")
        } else {
            call
        }
    }

    /// sha256 of the header value the API must receive: `Bearer <secret>`.
    fn injected_hash(&self) -> String {
        self.secret.sha256_with_prefix("Bearer ")
    }

    fn curl(&self, cgroup: &str, call: &Call) -> (ClientRun, HttpReport) {
        clients::curl(&self.broker, cgroup, &self.trust(), call)
    }

    /// Runs `call` from `cgroup` and panics unless it got the API's 200 for exactly this method
    /// and path, with `Bearer <secret>` injected, brokerd's socket as the API's peer, and
    /// nothing secret in what the client saw. Returns the API's record.
    fn assert_allowed(&self, what: &str, cgroup: &str, call: &Call) -> UpstreamRequest {
        let (run, report) = self.curl(cgroup, call);
        self.check_allowed(what, call, &run, &report)
    }

    fn check_allowed(
        &self,
        what: &str,
        call: &Call,
        run: &ClientRun,
        report: &HttpReport,
    ) -> UpstreamRequest {
        let path = call.path.split('?').next().unwrap_or_default();
        assert_eq!(
            report.status,
            200,
            "{what}: {} {} should be allowed: {}\n{}\nbrokerd's log:\n{}",
            call.method,
            call.path,
            report.show(),
            run.show(),
            self.broker.log()
        );
        run.assert_no_secret(&self.secret);
        let body = report.json();
        assert_eq!(
            (body["method"].as_str(), body["path"].as_str()),
            (Some(call.method.as_str()), Some(path)),
            "{what}: the API answered another request: {}",
            report.show()
        );
        assert_eq!(
            body["authorization_sha256"].as_str(),
            Some(self.injected_hash().as_str()),
            "{what}: the API did not receive `Bearer <secret>`: {}",
            report.show()
        );
        let record = self
            .api
            .requests()
            .into_iter()
            .rev()
            .find(|r| r.method == call.method && r.path == path)
            .unwrap_or_else(|| {
                panic!(
                    "{what}: the API has no record of {} {path}: {:#?}",
                    call.method,
                    self.api.requests()
                )
            });
        assert_eq!(
            record.peer_owner,
            Some(self.broker.pid()),
            "{what}: the API's peer socket should be brokerd's: {record:?}"
        );
        assert_eq!(
            record.canary_hits,
            vec!["secret in header authorization (raw)".to_string()],
            "{what}: the secret reaches the API in Authorization only: {record:?}"
        );
        record
    }

    /// Runs `call` from `cgroup` and panics unless brokerd answered with its 403 naming
    /// `cgroup`, the API received nothing, and nothing secret reached the client. Returns the
    /// reason and the whole JSON body.
    fn assert_refused(&self, what: &str, cgroup: &str, call: &Call) -> (String, serde_json::Value) {
        let before = self.api.requests().len();
        let (run, report) = self.curl(cgroup, call);
        if report.status != 403 {
            panic!(
                "{what}: {} {} should be denied with 403: {}\n{}\nbrokerd's log:\n{}",
                call.method,
                call.path,
                report.show(),
                run.show(),
                self.broker.log()
            );
        }
        // Redacted: these go into failure messages (the run itself is scanned for the secret).
        let reason = redact(&report.assert_denied(cgroup, what));
        run.assert_no_secret(&self.secret);
        // Give a request that slipped through time to arrive before concluding it did not.
        thread::sleep(Duration::from_millis(200));
        let after = self.api.requests();
        assert_eq!(
            after.len(),
            before,
            "{what}: the API received the denied request: {:#?}",
            &after[before.min(after.len())..]
        );
        let body = serde_json::from_str(&redact(&report.body)).unwrap_or_else(|e| {
            panic!("{what}: the 403 body is not JSON ({e}): {}", report.show())
        });
        (reason, body)
    }

    /// `brokerctl status --json`'s policy part.
    fn policy_status(&self) -> PolicyStatus {
        self.broker.status().policy
    }

    /// Polls `brokerctl status --json` until `pred` holds for its policy part, for up to
    /// `timeout`; panics with the last status and brokerd's log otherwise.
    fn wait_policy_status(
        &self,
        what: &str,
        timeout: Duration,
        pred: impl Fn(&PolicyStatus) -> bool,
    ) -> PolicyStatus {
        poll_until(timeout, || Some(self.policy_status()).filter(|s| pred(s))).unwrap_or_else(
            || {
                panic!(
                    "{what}: brokerctl status did not show it within {timeout:?}; its policy \
                     part: {}\nbrokerd's log:\n{}",
                    redact(&format!("{:?}", self.policy_status())),
                    self.broker.log()
                )
            },
        )
    }

    /// Tags `<cg>/agent` (creating it), so clients in cgroups below it are agents too.
    fn tag_agent(&self) {
        self.broker
            .ctl_ok(&["attach", "--cgroup", &self.agent, "--create"]);
    }

    /// Every log line and brokerctl output so far is free of the secret.
    fn assert_no_secret_in_logs(&self) {
        self.secret
            .assert_absent(&self.broker.log_bytes(), "brokerd's log");
        self.secret
            .assert_absent(&self.broker.transcript(), "brokerctl's output");
    }
}

/// `brokerctl policy check` with no brokerd to talk to (its run dir is an empty temp dir):
/// `--policy-dir dir` plus `files`. The output, whatever the exit status.
fn policy_check_offline(dir: &std::path::Path, files: &[PathBuf]) -> std::process::Output {
    let nowhere = tempfile::Builder::new()
        .prefix("abtest-no-brokerd-")
        .tempdir()
        .unwrap_or_else(|e| panic!("temp dir: {e}"));
    let mut cmd = Command::new(bin("brokerctl"));
    cmd.arg("--run-dir")
        .arg(nowhere.path())
        .env_remove("AGENT_BROKER_RUN_DIR")
        .args(["policy", "check", "--policy-dir"])
        .arg(dir)
        .args(files);
    run_with_timeout(&mut cmd, SHORT)
}

fn text(bytes: &[u8]) -> String {
    redact(&String::from_utf8_lossy(bytes))
}

// ---------------------------------------------------------------------------------------------
// Methods and paths

#[test]
fn method_or_path_outside_the_rule_is_denied_with_the_reason_and_the_api_gets_nothing() {
    let w = World::new(|cg, port| {
        vec![(
            "agent".into(),
            format!(
                "cgroup = \"{}\"\n\n[[allow]]\nhost = \"{API}\"\nport = {port}\n\
                 methods = [\"GET\"]\npaths = [\"/v1/models\"]\n{}",
                cg.child("agent"),
                inject()
            ),
        )]
    });
    // The oracle works: the rule's own request is allowed, with the secret injected; the query
    // is not part of the path.
    for proto in [Proto::Http1, Proto::Http2] {
        w.assert_allowed(
            &format!("GET /v1/models ({proto:?})"),
            &w.agent,
            &w.call("GET", API, "/v1/models").proto(proto),
        );
    }
    w.assert_allowed(
        "GET /v1/models?limit=1",
        &w.agent,
        &w.call("GET", API, "/v1/models?limit=1"),
    );

    for proto in [Proto::Http1, Proto::Http2] {
        let what = format!("POST /v1/models where only GET is allowed ({proto:?})");
        let (reason, body) = w.assert_refused(
            &what,
            &w.agent,
            &w.call("POST", API, "/v1/models").proto(proto),
        );
        assert!(
            reason.contains("POST"),
            "{what}: the reason should name the method that is not allowed: {reason}"
        );
        assert!(
            body["rule"]
                .as_str()
                .is_some_and(|r| r.contains("allow[0]")),
            "{what}: the denial should name the rule that came closest: {body}"
        );

        let what = format!("GET /v1/files where only /v1/models is allowed ({proto:?})");
        let (reason, body) = w.assert_refused(
            &what,
            &w.agent,
            &w.call("GET", API, "/v1/files").proto(proto),
        );
        assert!(
            reason.contains("/v1/files"),
            "{what}: the reason should name the path that is not allowed: {reason}"
        );
        assert!(
            body["rule"]
                .as_str()
                .is_some_and(|r| r.contains("allow[0]")),
            "{what}: the denial should name the rule that came closest: {body}"
        );
    }
    // An exact path is exact: a longer path below it is not allowed.
    let (reason, _) = w.assert_refused(
        "GET /v1/models/other under an exact /v1/models",
        &w.agent,
        &w.call("GET", API, "/v1/models/other"),
    );
    assert!(reason.contains("/v1/models/other"), "{reason}");

    let refused: Vec<UpstreamRequest> = w
        .api
        .requests()
        .into_iter()
        .filter(|r| r.method != "GET" || r.path != "/v1/models")
        .collect();
    assert!(
        refused.is_empty(),
        "the API received requests outside the rule: {refused:#?}"
    );
    w.assert_no_secret_in_logs();
}

// ---------------------------------------------------------------------------------------------
// Limits

#[test]
fn rate_limit_answers_429_with_retry_after_and_recovers_after_it() {
    let w = World::new(|cg, port| {
        vec![(
            "agent".into(),
            format!(
                "cgroup = \"{}\"\n\n[[allow]]\nhost = \"{API}\"\nport = {port}\n\
                 rate = {{ per_second = 1, burst = 2 }}\n{}",
                cg.child("agent"),
                inject()
            ),
        )]
    });
    // Four requests back to back from one curl process (a loop in an agent): the burst of two
    // passes, the rest of the second is over the rate.
    let call = w.call("GET", API, "/v1/models");
    let before = w.api.requests().len();
    let started = Instant::now();
    let (run, reports) = clients::curl_repeat(&w.broker, &w.agent, &w.trust(), &call, 4);
    let elapsed = started.elapsed();
    run.assert_no_secret(&w.secret);
    let statuses: Vec<u16> = reports.iter().map(|r| r.status).collect();
    let shown: Vec<String> = reports.iter().map(HttpReport::show).collect();
    assert_eq!(
        statuses[0],
        200,
        "the first request is within the burst: statuses {statuses:?}\n{shown:#?}\n{}\n\
         brokerd's log:\n{}",
        run.show(),
        w.broker.log()
    );
    let limited: Vec<&HttpReport> = reports.iter().filter(|r| r.status == 429).collect();
    assert!(
        !limited.is_empty(),
        "4 requests in {elapsed:?} with rate = {{ per_second = 1, burst = 2 }} must meet at \
         least one 429: statuses {statuses:?}\n{shown:#?}\nbrokerd's log:\n{}",
        w.broker.log()
    );
    assert!(
        statuses.iter().all(|s| *s == 200 || *s == 429),
        "every request is either allowed or limited: {statuses:?}\n{shown:#?}"
    );
    let mut wait = 0;
    for r in &limited {
        let (reason, retry_after) = r.assert_limited(&w.agent, "a request over the rate");
        assert!(
            reason.to_lowercase().contains("rate"),
            "the 429's reason should say a rate limit was hit: {reason}"
        );
        assert!(
            retry_after <= 2,
            "with 1 request per second the wait is at most a second or two, Retry-After says \
             {retry_after}"
        );
        wait = wait.max(retry_after);
    }
    for r in &reports {
        w.secret.assert_absent(r.body.as_bytes(), "a response body");
    }
    thread::sleep(Duration::from_millis(200));
    let ok = statuses.iter().filter(|s| **s == 200).count();
    let arrived = w.api.requests().len() - before;
    assert_eq!(
        arrived, ok,
        "the API must receive exactly the allowed requests ({ok} of {statuses:?}), got {arrived}"
    );

    // After Retry-After the agent may go on.
    thread::sleep(Duration::from_secs(wait) + Duration::from_millis(300));
    w.assert_allowed("GET /v1/models after Retry-After", &w.agent, &call);
    w.assert_no_secret_in_logs();
}

// ---------------------------------------------------------------------------------------------
// Expiry

#[test]
fn expired_grant_is_denied_saying_so_and_a_current_grant_works() {
    let now = SystemTime::now();
    let past = format_rfc3339(now - Duration::from_secs(60));
    let future = format_rfc3339(now + Duration::from_secs(3600));
    let w = World::new(|cg, port| {
        vec![(
            "agent".into(),
            format!(
                "cgroup = \"{}\"\n\n[[allow]]\nhost = \"{API}\"\nport = {port}\n\
                 not_after = \"{past}\"\n{inj}\n[[allow]]\nhost = \"{OTHER}\"\nport = {port}\n\
                 not_after = \"{future}\"\n{inj}",
                cg.child("agent"),
                inj = inject()
            ),
        )]
    });
    for proto in [Proto::Http1, Proto::Http2] {
        let what = format!("a grant that expired a minute ago ({proto:?})");
        let (reason, _) = w.assert_refused(
            &what,
            &w.agent,
            &w.call("GET", API, "/v1/models").proto(proto),
        );
        assert!(
            reason.contains("expired"),
            "{what}: the reason should say the grant expired: {reason}"
        );
        let record = w.assert_allowed(
            &format!("a grant valid for another hour ({proto:?})"),
            &w.agent,
            &w.call("GET", OTHER, "/v1/models").proto(proto),
        );
        assert_eq!(record.sni.as_deref(), Some(OTHER), "{record:?}");
    }
    w.assert_no_secret_in_logs();
}

// ---------------------------------------------------------------------------------------------
// Delegation narrowing

/// The parent file: `<cg>/agent` may GET and POST to api.example.test, with the secret injected.
fn parent_policy(cg: &TestCgroup, port: u16) -> String {
    format!(
        "cgroup = \"{}\"\n\n[[allow]]\nhost = \"{API}\"\nport = {port}\n\
         methods = [\"GET\", \"POST\"]\n{}",
        cg.child("agent"),
        inject()
    )
}

/// The sub-agent file: `<cg>/agent/sub` may only GET (`extra` is appended).
fn sub_policy(cg: &TestCgroup, port: u16, extra: &str) -> String {
    format!(
        "cgroup = \"{}\"\n\n[[allow]]\nhost = \"{API}\"\nport = {port}\nmethods = [\"GET\"]\n\
         paths = [\"/v1/models\", \"/v1/chat/*\"]\n{}{extra}",
        cg.child("agent/sub"),
        inject()
    )
}

#[test]
fn sub_agent_is_narrowed_by_its_parent_and_a_widening_child_file_is_rejected() {
    let w = World::new(|cg, port| {
        vec![
            ("agent".into(), parent_policy(cg, port)),
            ("sub".into(), sub_policy(cg, port, "")),
        ]
    });
    w.tag_agent();
    let sub = w.cg.create_child("agent/sub");

    let (reason, _) = w.assert_refused(
        "POST from the sub-agent, whose file allows only GET",
        &sub,
        &w.call("POST", API, "/v1/models"),
    );
    assert!(reason.contains("POST"), "{reason}");
    w.assert_allowed(
        "GET from the sub-agent",
        &sub,
        &w.call("GET", API, "/v1/models"),
    );
    w.assert_allowed(
        "GET from the sub-agent under its /v1/chat/* prefix",
        &sub,
        &w.call("GET", API, "/v1/chat/completions"),
    );
    w.assert_refused(
        "GET from the sub-agent outside its paths (the parent allows every path)",
        &sub,
        &w.call("GET", API, "/v1/files"),
    );
    let record = w.assert_allowed(
        "POST from the agent itself",
        &w.agent,
        &w.call("POST", API, "/v1/models"),
    );
    assert!(record.body_len > 0, "the POST body arrived: {record:?}");
    // brokerd attributes the sub-agent's calls to the sub-agent's own cgroup.
    w.broker.wait_connection("the sub-agent's calls", |c| {
        c.origin.as_ref().is_some_and(|o| o.cgroup == sub)
    });

    // The directory as it is checks out offline.
    let dir = w.broker.policy_dir();
    let out = policy_check_offline(&dir, &[]);
    assert!(
        out.status.success(),
        "brokerctl policy check of the running policy dir failed ({}): {}",
        out.status,
        text(&out.stderr)
    );

    // A sub-agent file that allows a host its parent does not.
    let widened = sub_policy(
        &w.cg,
        w.api.port(),
        &format!("\n[[allow]]\nhost = \"{OTHER}\"\nport = {}\n", w.api.port()),
    );
    let candidate = w.broker.scratch_dir().join("sub.toml");
    fs::write(&candidate, &widened)
        .unwrap_or_else(|e| panic!("cannot write {}: {e}", candidate.display()));
    let out = policy_check_offline(&dir, std::slice::from_ref(&candidate));
    let stderr = text(&out.stderr);
    assert!(
        !out.status.success(),
        "brokerctl policy check must refuse a sub-agent file that widens its parent's; it said: \
         {}{stderr}",
        text(&out.stdout)
    );
    assert!(
        stderr.contains("sub.toml") && stderr.contains(OTHER),
        "the refusal should name the file and the host the parent lacks: {stderr}"
    );

    // The same file dropped into the running brokerd's dir: it keeps the last good policy and
    // says why.
    let files_before = w.policy_status().files;
    w.broker.write_policy("sub", &widened);
    let status = w.wait_policy_status("the widening sub-agent file", Duration::from_secs(3), |s| {
        s.error.is_some()
    });
    let error = redact(&status.error.clone().unwrap_or_default());
    assert!(
        error.contains("sub.toml") && error.contains(OTHER),
        "status policy.error should name the file and the host the parent lacks: {error}"
    );
    assert_eq!(
        status.files, files_before,
        "the active policy keeps its files: {status:?}"
    );
    assert!(
        w.broker.log().contains("sub.toml"),
        "brokerd's log should name the refused file:\n{}",
        w.broker.log()
    );
    let (reason, _) = w.assert_refused(
        "the widened host from the sub-agent, after the refused edit",
        &sub,
        &w.call("GET", OTHER, "/v1/models"),
    );
    assert!(reason.contains(OTHER), "{reason}");
    w.assert_refused(
        "POST from the sub-agent, after the refused edit",
        &sub,
        &w.call("POST", API, "/v1/models"),
    );
    w.assert_allowed(
        "GET from the sub-agent, after the refused edit",
        &sub,
        &w.call("GET", API, "/v1/models"),
    );
    w.assert_no_secret_in_logs();
}

/// Issue 13.11: `..;` and `..%3b` segments, which Tomcat-style servers read as `..`, do not
/// get out of `/v1/**`.
#[test]
fn path_parameters_on_dot_segments_do_not_escape_a_paths_rule() {
    let w = World::new(|cg, port| {
        vec![(
            "agent".into(),
            paths_policy(&cg.child("agent"), port, &["/v1/**"]),
        )]
    });
    w.assert_allowed(
        "GET /v1/models",
        &w.agent,
        &w.call("GET", API, "/v1/models"),
    );
    for path in [
        "/v1/..;/admin",
        "/v1/..%3b/admin",
        "/v1/..;x=1/admin",
        "/v1/;/admin",
    ] {
        let (reason, _) =
            w.assert_refused(&format!("GET {path}"), &w.agent, &w.call("GET", API, path));
        assert!(
            reason.contains("path parameters"),
            "GET {path}: the reason should say why: {reason}"
        );
    }
    w.assert_no_secret_in_logs();
}

// ---------------------------------------------------------------------------------------------
// Hot reload

/// `<cg>/agent` may GET these paths on api.example.test, with injection.
fn paths_policy(agent: &str, port: u16, paths: &[&str]) -> String {
    let paths: Vec<String> = paths.iter().map(|p| format!("\"{p}\"")).collect();
    format!(
        "cgroup = \"{agent}\"\n\n[[allow]]\nhost = \"{API}\"\nport = {port}\nmethods = [\"GET\"]\n\
         paths = [{}]\n{}",
        paths.join(", "),
        inject()
    )
}

#[test]
fn policy_edit_applies_without_restart_and_a_broken_edit_changes_nothing() {
    let w = World::new(|cg, port| {
        vec![(
            "agent".into(),
            paths_policy(&cg.child("agent"), port, &["/v1/models"]),
        )]
    });
    let port = w.api.port();
    let pid = w.broker.status().pid;
    let models = w.call("GET", API, "/v1/models");
    let files = w.call("GET", API, "/v1/files");
    let secret_path = w.call("GET", API, "/v1/secret");
    w.assert_allowed("GET /v1/models before the edit", &w.agent, &models);
    w.assert_refused("GET /v1/files before the edit", &w.agent, &files);

    // Allow /v1/files: within a second or so, without a restart.
    w.broker.write_policy(
        "agent",
        &paths_policy(&w.agent, port, &["/v1/models", "/v1/files"]),
    );
    let written = Instant::now();
    let mut attempts: Vec<(Duration, u16)> = Vec::new();
    let allowed = loop {
        let at = written.elapsed();
        let (run, report) = w.curl(&w.agent, &files);
        attempts.push((at, report.status));
        if report.status == 200 {
            break Some((run, report));
        }
        if written.elapsed() > RELOAD_WITHIN {
            break None;
        }
        thread::sleep(Duration::from_millis(50));
    };
    let Some((run, report)) = allowed else {
        panic!(
            "GET /v1/files was still not allowed {RELOAD_WITHIN:?} after the policy edit \
             (attempts at, status: {attempts:?}); status: {}\nbrokerd's log:\n{}",
            redact(&format!("{:?}", w.policy_status())),
            w.broker.log()
        );
    };
    w.check_allowed("GET /v1/files after the edit", &files, &run, &report);
    eprintln!("the policy edit applied within {attempts:?} (attempt start, status)");
    assert_eq!(
        w.broker.status().pid,
        pid,
        "the edit applied without restarting brokerd"
    );
    let good = w.wait_policy_status("the edit", SHORT, |s| s.error.is_none());

    // A broken edit (a typo'd field) that would also narrow the paths again: nothing changes.
    let broken = paths_policy(&w.agent, port, &["/v1/models"]).replace(
        "methods = [\"GET\"]",
        "methods = [\"GET\"]\nmehtods = [\"POST\"]",
    );
    let line = line_of(&broken, "mehtods");
    w.broker.write_policy("agent", &broken);
    let status = w.wait_policy_status("the broken edit", Duration::from_secs(3), |s| {
        s.error.is_some()
    });
    let error = redact(&status.error.clone().unwrap_or_default());
    assert!(
        error.contains(&format!("agent.toml:{line}:")) && error.contains("mehtods"),
        "status policy.error should name the file, line {line} and the field: {error}"
    );
    assert_eq!(
        (status.files, status.loaded_unix),
        (good.files, good.loaded_unix),
        "the active policy is still the one loaded before the broken edit: {status:?}"
    );
    w.assert_allowed("GET /v1/files after the broken edit", &w.agent, &files);
    w.assert_allowed("GET /v1/models after the broken edit", &w.agent, &models);
    w.assert_refused(
        "GET /v1/secret after the broken edit",
        &w.agent,
        &secret_path,
    );
    let out = w.broker.ctl_output(&["policy", "reload"]);
    let stderr = text(&out.stderr);
    assert!(
        !out.status.success(),
        "brokerctl policy reload must fail while the directory is invalid; it said: {}{stderr}",
        text(&out.stdout)
    );
    assert!(
        stderr.contains(&format!("agent.toml:{line}:")) && stderr.contains("mehtods"),
        "brokerctl policy reload should print the error with file, line {line} and field: \
         {stderr}"
    );
    w.assert_allowed("GET /v1/files after the failed reload", &w.agent, &files);

    // Fixed: the error clears and the fixed file applies (/v1/files is no longer allowed).
    w.broker
        .write_policy("agent", &paths_policy(&w.agent, port, &["/v1/models"]));
    let status = w.wait_policy_status("the fixed file", Duration::from_secs(3), |s| {
        s.error.is_none()
    });
    assert_eq!(status.files, 1, "{status:?}");
    w.assert_refused("GET /v1/files after the fix", &w.agent, &files);
    w.assert_allowed("GET /v1/models after the fix", &w.agent, &models);
    let out = w.broker.ctl_ok(&["policy", "reload"]);
    assert!(!out.trim().is_empty(), "policy reload says what it loaded");
    assert_eq!(w.broker.status().pid, pid, "brokerd was never restarted");
    w.assert_no_secret_in_logs();
}

// ---------------------------------------------------------------------------------------------
// Explain and show

#[test]
fn explain_and_show_answer_with_the_rule_the_file_and_the_narrowed_rules() {
    let w = World::new(|cg, port| {
        vec![
            ("agent".into(), parent_policy(cg, port)),
            ("sub".into(), sub_policy(cg, port, "")),
        ]
    });
    let port = w.api.port();
    let sub = w.cg.child("agent/sub");
    let url = |host: &str, path: &str| format!("https://{host}:{port}{path}");
    // Redacted: printed in failure messages (the transcript is scanned for the secret).
    let explain = |cgroup: &str, method: &str, url: &str| {
        redact(
            &w.broker
                .ctl_ok(&["policy", "explain", "--cgroup", cgroup, method, url]),
        )
    };

    let out = explain(&sub, "GET", &url(API, "/v1/models"));
    assert!(
        out.trim_start().starts_with("allow"),
        "explain GET /v1/models for the sub-agent should allow: {out}"
    );
    assert!(
        out.contains("sub.toml") && out.contains("allow[0]"),
        "an allow names the rule and file that decide: {out}"
    );

    let denied_post = explain(&sub, "POST", &url(API, "/v1/models"));
    assert!(
        denied_post.trim_start().starts_with("deny"),
        "explain POST for the sub-agent should deny: {denied_post}"
    );
    assert!(
        denied_post.contains("POST") && denied_post.contains("sub.toml"),
        "a denial gives the reason and the file that refused: {denied_post}"
    );
    let denied_host = explain(&sub, "GET", &url(OTHER, "/v1/models"));
    assert!(
        denied_host.trim_start().starts_with("deny") && denied_host.contains(OTHER),
        "explain for a host without a rule should deny naming it: {denied_host}"
    );
    let parent_post = explain(&w.agent, "POST", &url(API, "/v1/models"));
    assert!(
        parent_post.trim_start().starts_with("allow") && parent_post.contains("agent.toml"),
        "explain POST for the agent itself should allow by agent.toml: {parent_post}"
    );

    // Explain agrees with what an agent gets.
    w.tag_agent();
    w.cg.create_child("agent/sub");
    w.assert_allowed(
        "GET from the sub-agent",
        &sub,
        &w.call("GET", API, "/v1/models"),
    );
    let (reason, _) = w.assert_refused(
        "POST from the sub-agent",
        &sub,
        &w.call("POST", API, "/v1/models"),
    );
    assert!(
        denied_post.contains(&reason),
        "explain should give the reason the agent got ({reason}): {denied_post}"
    );

    // show: the sub-agent's rules after narrowing (GET only, its paths), from both files.
    let shown = redact(&w.broker.ctl_ok(&["policy", "show", "--cgroup", &sub]));
    for needle in [
        sub.as_str(),
        API,
        "sub.toml",
        "agent.toml",
        "\"GET\"",
        "\"/v1/models\"",
        "\"/v1/chat/*\"",
    ] {
        assert!(
            shown.contains(needle),
            "policy show for the sub-agent should contain {needle:?}:\n{shown}"
        );
    }
    assert!(
        !shown.contains("POST"),
        "the sub-agent may not POST, so its effective policy shows no POST:\n{shown}"
    );
    let parent_shown = redact(&w.broker.ctl_ok(&["policy", "show", "--cgroup", &w.agent]));
    assert!(
        parent_shown.contains("POST") && parent_shown.contains("agent.toml"),
        "policy show for the agent itself shows its POST: {parent_shown}"
    );
    w.assert_no_secret_in_logs();
}
