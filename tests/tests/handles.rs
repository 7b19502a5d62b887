//! Handles, end to end: `brokerctl handle mint` gives a `brk_...` token bound to a cgroup, a
//! host and a lifetime; brokerd swaps it for the secret wherever the agent puts it (a header,
//! a bearer token, basic auth, the query) and refuses it from another cgroup, for another host,
//! after it expired and after `brokerctl handle revoke`. Real curl clients call the test API
//! (the world is `agent_broker_tests::world`); the token itself is a canary, scanned for in
//! every output and never forwarded upstream.
//!
//! Needs root, cgroup v2 and BPF (brokerd attaches its programs to the test's cgroup), and curl.
//!
//! Run as root: `cargo test -p agent-broker-tests --test handles -- --test-threads=1`.

use std::time::Duration;

use agent_broker_tests::{
    Broker, Canary,
    clients::{self, Call, Proto},
    redact, sha256_hex,
    world::{API, OTHER, SECRET_NAME, World, api_ip, rule},
};

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
