//! Handles, end to end: `brokerctl handle mint` gives a `brk_...` token bound to a cgroup, a
//! host and a lifetime; brokerd swaps it for the secret wherever the agent puts it (a header,
//! a bearer token, basic auth, the query) and refuses it from another cgroup, for another host,
//! after it expired and after `brokerctl handle revoke`. With `--shaped` the token looks like
//! the secret (a `ghp_`-like test key gives `ghp_` + 36 letters and digits) and is swapped and
//! refused the same way; `brokerctl secret placeholder` prints such a string bound to nothing.
//! Real curl clients call the test API (the world is `agent_broker_tests::world`); the token
//! itself is a canary, scanned for in every output and never forwarded upstream.
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

/// `brokerctl handle mint` for the world's secret: (id, token). The token is registered as a
/// canary (never printed).
fn mint(broker: &Broker, cgroup: &str, host: &str, ttl: &str) -> (String, Canary) {
    let (id, token, _) = mint_for(broker, cgroup, SECRET_NAME, host, &["--ttl", ttl]);
    assert!(
        token.expose().starts_with("brk_"),
        "handle mint should print a brk_ token, got {} bytes: {}",
        token.len(),
        redact(token.expose())
    );
    (id, token)
}

/// `brokerctl handle mint --secret SECRET ... EXTRA`: (id, token, stderr). The token is
/// registered as a canary (never printed).
///
/// Run outside the broker's transcript: printing the token once, here, is mint's job; every
/// other brokerctl output is scanned for it.
fn mint_for(
    broker: &Broker,
    cgroup: &str,
    secret: &str,
    host: &str,
    extra: &[&str],
) -> (String, Canary, String) {
    let out = agent_broker_tests::run_with_timeout(
        broker
            .ctl()
            .args([
                "handle", "mint", "--cgroup", cgroup, "--secret", secret, "--host", host,
            ])
            .args(extra),
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
        !stdout.is_empty() && !stdout.contains(char::is_whitespace),
        "handle mint should print one token on stdout, got {} bytes: {}",
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
    (id, token, stderr)
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

/// The name of the `ghp_`-like test key in the vault.
const GH_NAME: &str = "ABTEST_GH_KEY";
/// The alphabet of the body of a `ghp_` key.
const ALNUM: &[u8] = b"0123456789ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz";

/// Whether `token` is `ghp_` and 36 letters and digits, like the test key.
fn gh_shaped(token: &str) -> bool {
    token.len() == 40
        && token.starts_with("ghp_")
        && token[4..].bytes().all(|b| b.is_ascii_alphanumeric())
}

#[test]
fn shaped_handle_looks_like_its_secret_is_swapped_for_it_and_refused_elsewhere() {
    let w = handle_world();
    let h = w.cg.child("h");
    let sib = w.cg.child("sib");
    let gh = Canary::shaped("ghp_", ALNUM, 36);
    w.broker.secret_set(GH_NAME, gh.expose().as_bytes());
    w.api.watch_for("gh key", &gh);

    let (id, token, stderr) = mint_for(&w.broker, &h, GH_NAME, API, &["--shaped"]);
    w.api.watch_for("shaped handle", &token);
    let t = token.expose();
    assert!(
        gh_shaped(t) && t.len() == gh.len(),
        "handle mint --shaped should print `ghp_` and 36 letters and digits, like the key; got \
         {} bytes: {}",
        t.len(),
        redact(t)
    );
    assert_ne!(token.sha256(), gh.sha256(), "the handle is not the key");
    assert!(
        stderr.contains("shaped ghp_[0-9A-Za-z]{36}"),
        "handle mint --shaped should say the shape: {}",
        redact(&stderr)
    );

    // Swapped wherever a key goes, for its cgroup and host.
    let basic = data_encoding::BASE64.encode(format!("abtest:{}", gh.expose()).as_bytes());
    let cases: Vec<(&str, Call, &str, String)> = vec![
        (
            "x-api-key header",
            Call::new(API, api_ip(), w.api.port(), "/hash").header("x-api-key", t),
            "x_api_key_sha256",
            gh.sha256(),
        ),
        (
            "Authorization: Bearer",
            Call::new(API, api_ip(), w.api.port(), "/hash")
                .header("authorization", &format!("Bearer {t}")),
            "authorization_sha256",
            gh.sha256_with_prefix("Bearer "),
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
            gh.sha256_with_prefix("key="),
        ),
    ];
    for (what, call, field, want) in cases {
        for proto in [Proto::Http1, Proto::Http2] {
            let (run, report) =
                clients::curl(&w.broker, &h, &w.trust(), &call.clone().proto(proto));
            assert_eq!(
                report.status,
                200,
                "shaped handle in {what} ({proto:?}): {}\nbrokerd's log:\n{}",
                report.show(),
                w.broker.log()
            );
            assert_eq!(
                report.json()[field].as_str(),
                Some(want.as_str()),
                "shaped handle in {what} ({proto:?}): the API must receive the key in place of \
                 the handle: {}",
                report.show()
            );
            run.assert_no_secret(&gh);
            let last = w
                .api
                .requests()
                .pop()
                .unwrap_or_else(|| panic!("no request"));
            assert!(
                !last
                    .canary_hits
                    .iter()
                    .any(|h| h.starts_with("shaped handle")),
                "shaped handle in {what}: the handle itself reached the API: {last:?}"
            );
        }
    }

    // Refused towards a host it is not bound to, and from another cgroup: the API sees nothing.
    let reason = assert_handle_refused(&w, &h, OTHER, &token, "shaped handle for another host");
    assert!(
        reason.contains(&id) && reason.contains(&format!("not valid for host {OTHER}")),
        "the reason should name the handle and say the host is wrong: {reason}"
    );
    let reason = assert_handle_refused(&w, &sib, API, &token, "shaped handle from a sibling");
    assert!(
        reason.contains(&id) && reason.contains("cgroup"),
        "the reason should name the handle and say the cgroup is wrong: {reason}"
    );
    // ... in the query too.
    let before = w.api.requests().len();
    let call = Call::new(OTHER, api_ip(), w.api.port(), &format!("/hash?key={t}"));
    let (_, report) = clients::curl(&w.broker, &h, &w.trust(), &call);
    report.assert_denied(&h, "shaped handle in the query for another host");
    std::thread::sleep(Duration::from_millis(200));
    assert_eq!(
        w.api.requests().len(),
        before,
        "the API received the request"
    );

    // A token of the same shape that was never minted is not a handle: it goes as it is.
    let stranger = Canary::shaped("ghp_", ALNUM, 36);
    w.api.watch_for("stranger", &stranger);
    let call =
        Call::new(API, api_ip(), w.api.port(), "/hash").header("x-api-key", stranger.expose());
    let (_, report) = clients::curl(&w.broker, &h, &w.trust(), &call);
    assert_eq!(report.status, 200, "{}", report.show());
    assert_eq!(
        report.json()["x_api_key_sha256"].as_str(),
        Some(stranger.sha256().as_str()),
        "an unminted token of the shape must reach the API unchanged: {}",
        report.show()
    );

    // Each misuse is an audit record naming the handle.
    let deadline = std::time::Instant::now() + Duration::from_secs(5);
    let misuses = loop {
        let misuses: Vec<_> = w
            .broker
            .audit_records()
            .into_iter()
            .filter(|r| {
                r.kind == Some(agent_broker_protocol::EventKind::HandleMisuse)
                    && r.reason.as_deref().is_some_and(|x| x.contains(&id))
            })
            .collect();
        if misuses.len() >= 3 || std::time::Instant::now() > deadline {
            break misuses;
        }
        std::thread::sleep(Duration::from_millis(100));
    };
    assert_eq!(
        misuses.len(),
        3,
        "three handle-misuse records for {id}: {misuses:#?}"
    );
    assert!(
        misuses.iter().any(|r| r.host.as_deref() == Some(OTHER))
            && misuses
                .iter()
                .any(|r| r.cgroup.as_deref() == Some(sib.as_str())),
        "{misuses:#?}"
    );

    // handle list shows the shape, never the token.
    let list = w.broker.ctl_ok(&["handle", "list", "--json"]);
    token.assert_absent(list.as_bytes(), "handle list --json");
    let handles: serde_json::Value =
        serde_json::from_str(&list).unwrap_or_else(|e| panic!("handle list --json ({e}): {list}"));
    assert!(
        handles
            .as_array()
            .is_some_and(|a| a.iter().any(|x| x["id"].as_str() == Some(id.as_str())
                && x["shape"].as_str() == Some("ghp_[0-9A-Za-z]{36}"))),
        "handle list should show {id} with its shape: {list}"
    );

    // secret placeholder: the key's shape, fresh each time, bound to nothing.
    let placeholder = |what: &str| {
        let out = w.broker.ctl_output(&["secret", "placeholder", GH_NAME]);
        let stdout = String::from_utf8_lossy(&out.stdout).trim().to_string();
        let value = Canary::adopt(&stdout);
        assert!(
            out.status.success(),
            "{what}: secret placeholder failed ({}): {}",
            out.status,
            redact(&String::from_utf8_lossy(&out.stderr))
        );
        assert!(
            gh_shaped(&stdout),
            "{what}: secret placeholder should print `ghp_` and 36 letters and digits; got {} \
             bytes: {}",
            stdout.len(),
            redact(&stdout)
        );
        assert!(
            String::from_utf8_lossy(&out.stderr).contains("ghp_[0-9A-Za-z]{36}"),
            "{what}: the shape goes to stderr"
        );
        value
    };
    let first = placeholder("first placeholder");
    let second = placeholder("second placeholder");
    assert_ne!(first.sha256(), second.sha256(), "placeholders are fresh");
    for p in [&first, &second] {
        assert_ne!(p.sha256(), gh.sha256(), "a placeholder is not the key");
        assert_ne!(
            p.sha256(),
            token.sha256(),
            "a placeholder is not the handle"
        );
    }
    // A secret without a usable shape is refused with the reason.
    w.broker
        .secret_set("ABTEST_DOTTED", b"abtest.not.shapeable.value.1234567890");
    let out = w
        .broker
        .ctl_output(&["secret", "placeholder", "ABTEST_DOTTED"]);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        !out.status.success() && stderr.contains("no token alphabet"),
        "a secret holding `.` has no shape: {}",
        redact(&stderr)
    );
    let out = w.broker.ctl_output(&[
        "handle",
        "mint",
        "--cgroup",
        &h,
        "--secret",
        "ABTEST_DOTTED",
        "--host",
        API,
        "--shaped",
    ]);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        !out.status.success() && stderr.contains("without --shaped"),
        "mint --shaped of a secret without a shape is refused, saying what to do: {}",
        redact(&stderr)
    );
    assert!(out.stdout.is_empty(), "no token printed");

    for needle in [&gh, &token] {
        needle.assert_absent(&w.broker.transcript(), "brokerctl's output");
        needle.assert_absent(&w.broker.log_bytes(), "brokerd's log");
    }
    for r in w.api.requests() {
        assert!(
            !r.canary_hits.iter().any(|h| h.contains("handle")),
            "a handle token reached the API: {r:?}"
        );
    }
    w.assert_no_secret_in_logs();
}
