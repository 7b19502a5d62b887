//! Issue 15: credentials that are not static keys, end to end. brokerd holds an OAuth refresh
//! token (or a client's secret) and injects access tokens it fetches itself from a real local
//! OAuth 2.0 server ([`TestOAuth`]); values from a command (`exec`) and from a file (`file`).
//! Agents are curl in the test's cgroup holding only a placeholder.
//!
//! Oracles: the OAuth server's counters (token calls per grant, presentations per refresh
//! token, replays) and its resource's verdict on the token brokerd injected; the test API's
//! hash of what it received; brokerd's 503s and their reasons; `secret list`; audit records.

use std::{
    net::{IpAddr, Ipv4Addr},
    path::Path,
    time::Duration,
};

use agent_broker_protocol::{AuditEvent, Decision, EventKind};
use agent_broker_tests::{
    Canary, TestCa,
    clients::{Call, curl},
    oauth::{Grant, OAuthOptions, TestOAuth},
    wait_for,
    world::{SECRET_NAME, World},
};

/// The OAuth credential's name in the vault.
const TOKEN: &str = "ABTEST_OAUTH";
const AUTH: &str = "auth.example.test";
const AUTH_IP: Ipv4Addr = Ipv4Addr::new(127, 0, 0, 3);
const CLIENT: &str = "abtest-agent";

/// A world whose agent may call the OAuth server's resource with `{secret:ABTEST_OAUTH}`
/// injected, and the test API with `{secret:ABTEST_KEY}` (for exec and file sources).
fn world(ca: TestCa, oauth: &TestOAuth) -> World {
    let port = oauth.port();
    World::with_ca(ca, |cg, api| {
        vec![(
            "agent".into(),
            format!(
                "cgroup = \"{agent}\"\n\
                 [[allow]]\nhost = \"{AUTH}\"\nport = {port}\n\
                 inject.headers = {{ authorization = \"Bearer {{secret:{TOKEN}}}\" }}\n\
                 [[allow]]\nhost = \"api.example.test\"\nport = {api_port}\n\
                 inject.headers = {{ authorization = \"Bearer {{secret:{SECRET_NAME}}}\" }}\n",
                agent = cg.child("agent"),
                api_port = api.port(),
            ),
        )]
    })
}

fn oauth_server() -> (TestCa, TestOAuth) {
    let ca = TestCa::new("abtest credentials CA");
    let oauth = TestOAuth::start(&ca, OAuthOptions::on(IpAddr::V4(AUTH_IP)));
    (ca, oauth)
}

/// `brokerctl secret set` with `args`, the material on stdin; panics unless it worked.
fn set(w: &World, args: &[&str], stdin: &[u8]) -> String {
    let out = w.broker.ctl_output_with_stdin(args, stdin);
    assert!(
        out.status.success(),
        "brokerctl {}: {}",
        args.join(" "),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).to_string()
}

/// Stores the refresh-token credential for `refresh`.
fn set_oauth(w: &World, oauth: &TestOAuth, refresh: &Canary) {
    let material = serde_json::json!({
        "refresh_token": refresh.expose(),
        "client_secret": "abtest-client-secret",
    })
    .to_string();
    let url = oauth.token_url();
    let out = set(
        w,
        &[
            "secret",
            "set",
            TOKEN,
            "--kind",
            "oauth",
            "--token-url",
            &url,
            "--client-id",
            CLIENT,
        ],
        material.as_bytes(),
    );
    assert!(out.contains("oauth credential"), "{out}");
    w.broker.add_name(AUTH, AUTH_IP);
}

/// The agent's call of the resource through brokerd: (status, body).
fn call_resource(w: &World, oauth: &TestOAuth) -> (u16, serde_json::Value, String) {
    let call = Call::new(AUTH, IpAddr::V4(AUTH_IP), oauth.port(), "/resource").header(
        "authorization",
        &format!("Bearer {}", w.placeholder.expose()),
    );
    let (run, report) = curl(&w.broker, &w.agent, &w.trust(), &call);
    run.assert_no_secret(&w.secret);
    let shown = report.show();
    (report.status, report.json(), shown)
}

/// `secret list --json`'s entry for `name`.
fn listed(w: &World, name: &str) -> serde_json::Value {
    let out = w.broker.ctl_ok(&["secret", "list", "--json"]);
    let list: serde_json::Value = serde_json::from_str(&out).unwrap_or_default();
    list.as_array()
        .and_then(|l| l.iter().find(|s| s["name"] == name).cloned())
        .unwrap_or_else(|| panic!("secret list has no {name}: {out}"))
}

fn credential_records(w: &World, name: &str) -> Vec<AuditEvent> {
    w.broker
        .audit_records()
        .into_iter()
        .filter(|r| r.kind == Some(EventKind::Credential) && r.secrets.iter().any(|s| s == name))
        .collect()
}

#[test]
fn an_oauth_refresh_token_is_used_by_brokerd_alone_once_rotated_and_survives_a_restart() {
    let (ca, oauth) = oauth_server();
    oauth.register_client(CLIENT, Some("abtest-client-secret"));
    let refresh = oauth.mint_refresh_token(CLIENT, None);
    let mut w = world(ca, &oauth);
    set_oauth(&w, &oauth, &refresh);
    let listed_before = listed(&w, TOKEN);
    assert_eq!(listed_before["kind"], "oauth");
    assert_eq!(listed_before["state"], "not fetched yet");
    let shown = w.broker.ctl_ok(&["secret", "list"]);
    assert!(
        !shown.contains(refresh.expose()),
        "secret list shows no token"
    );

    // Concurrent first use: eight agents at once, one token request.
    let results: Vec<(u16, serde_json::Value, String)> = std::thread::scope(|s| {
        let calls: Vec<_> = (0..8)
            .map(|_| s.spawn(|| call_resource(&w, &oauth)))
            .collect();
        calls
            .into_iter()
            .map(|c| {
                c.join()
                    .unwrap_or_else(|_| panic!("a client thread panicked"))
            })
            .collect()
    });
    for (status, body, shown) in &results {
        assert_eq!(*status, 200, "{shown}\nbrokerd's log:\n{}", w.broker.log());
        assert_eq!(body["token_valid"], true, "{shown}");
    }
    assert_eq!(
        oauth.token_calls(Grant::RefreshToken),
        1,
        "concurrent first use makes exactly one refresh"
    );
    assert_eq!(oauth.presented(&refresh), 1);
    let listed_now = listed(&w, TOKEN);
    assert_eq!(listed_now["state"], "valid", "{listed_now}");
    assert!(
        listed_now["last_used_unix"].as_u64().is_some(),
        "{listed_now}"
    );
    wait_for("the fetch's audit record", Duration::from_secs(10), || {
        credential_records(&w, TOKEN)
            .iter()
            .any(|r| r.decision == Some(Decision::Allow) && r.host.as_deref() == Some(AUTH))
    });

    // A restart: the access token brokerd stored in its vault is used, no new request.
    let before = oauth.token_calls(Grant::RefreshToken);
    w.broker.stop();
    w.broker.restart();
    let (status, _, shown) = call_resource(&w, &oauth);
    assert_eq!(
        status,
        200,
        "after a restart: {shown}\nbrokerd's log:\n{}",
        w.broker.log()
    );
    assert_eq!(
        oauth.token_calls(Grant::RefreshToken),
        before,
        "a restarted brokerd reuses the unexpired access token it stored"
    );

    // Killed, restarted, and the server rejects the access token early: the 401 reaches the
    // agent, and brokerd refreshes once, with the refresh token the server rotated to (the
    // first one is used up: presenting it again would be a replay).
    w.broker.kill9();
    w.broker.restart();
    oauth.set_expires_in(3);
    std::thread::sleep(Duration::from_secs(6));
    oauth.revoke_access_tokens(CLIENT);
    let (status, _, shown) = call_resource(&w, &oauth);
    assert_eq!(status, 401, "the upstream's 401 reaches the agent: {shown}");
    wait_for(
        "brokerd refreshes once after the 401",
        Duration::from_secs(15),
        || oauth.token_calls(Grant::RefreshToken) == before + 1,
    );
    let (status, body, shown) = call_resource(&w, &oauth);
    assert_eq!(status, 200, "{shown}\nbrokerd's log:\n{}", w.broker.log());
    assert_eq!(body["token_valid"], true);

    // That token lives 3 s: it is refreshed before or at its expiry (by the background task,
    // or by the next request, which waits for it).
    std::thread::sleep(Duration::from_secs(4));
    let (status, _, shown) = call_resource(&w, &oauth);
    assert_eq!(status, 200, "{shown}");
    assert!(oauth.token_calls(Grant::RefreshToken) >= before + 2);
    assert_eq!(
        oauth.reused_refresh_tokens(),
        0,
        "no refresh token was presented twice: brokerd is the single user of each"
    );
    assert_eq!(oauth.unknown_refresh_presented(), 0);
    refresh.assert_absent(w.broker.log().as_bytes(), "brokerd's log");
}

#[test]
fn a_revoked_refresh_token_fails_the_credential_once_with_its_reason_and_no_retry_loop() {
    let (ca, oauth) = oauth_server();
    oauth.register_client(CLIENT, Some("abtest-client-secret"));
    let refresh = oauth.mint_refresh_token(CLIENT, None);
    let w = world(ca, &oauth);
    set_oauth(&w, &oauth, &refresh);
    assert!(oauth.revoke_refresh_token(&refresh));
    let (status, _, shown) = call_resource(&w, &oauth);
    assert_eq!(status, 503, "{shown}");
    assert!(
        shown.contains("invalid_grant") && shown.contains(TOKEN),
        "the refusal names the credential and the server's reason: {shown}"
    );
    let calls = oauth.token_calls(Grant::RefreshToken);
    for _ in 0..3 {
        let (status, _, _) = call_resource(&w, &oauth);
        assert_eq!(status, 503);
    }
    std::thread::sleep(Duration::from_secs(3));
    assert_eq!(
        oauth.token_calls(Grant::RefreshToken),
        calls,
        "a refused refresh token is never tried again"
    );
    let entry = listed(&w, TOKEN);
    assert!(
        entry["state"]
            .as_str()
            .is_some_and(|s| s.starts_with("failed:") && s.contains("invalid_grant")),
        "{entry}"
    );
    let mut failures = Vec::new();
    wait_for(
        "the failure's audit record",
        Duration::from_secs(10),
        || {
            failures = credential_records(&w, TOKEN)
                .into_iter()
                .filter(|r| r.decision == Some(Decision::Deny))
                .collect();
            !failures.is_empty()
        },
    );
    assert_eq!(failures.len(), 1, "audited once: {failures:?}");
    // `doctor` names the failing credential.
    let doctor = w.broker.ctl_output(&["doctor", "--json"]);
    // One JSON object per line.
    let text = String::from_utf8_lossy(&doctor.stdout).to_string();
    let checks: Vec<serde_json::Value> = text
        .lines()
        .filter_map(|l| serde_json::from_str(l).ok())
        .collect();
    assert!(
        checks.iter().any(|c| c["name"] == "credentials"
            && c["level"] == "fail"
            && c["found"].as_str().is_some_and(|f| f.contains(TOKEN))),
        "doctor: {text}"
    );
    assert!(
        !doctor.status.success(),
        "a failing credential fails doctor"
    );

    // Setting the credential again starts over.
    let fresh = oauth.mint_refresh_token(CLIENT, None);
    set_oauth(&w, &oauth, &fresh);
    let (status, _, shown) = call_resource(&w, &oauth);
    assert_eq!(status, 200, "{shown}");
}

#[test]
fn a_client_credentials_token_is_cached_and_fetched_again_after_a_401() {
    let (ca, oauth) = oauth_server();
    oauth.register_client(CLIENT, Some("abtest-client-secret"));
    let w = world(ca, &oauth);
    let url = oauth.token_url();
    set(
        &w,
        &[
            "secret",
            "set",
            TOKEN,
            "--kind",
            "oauth-client",
            "--token-url",
            &url,
            "--client-id",
            CLIENT,
        ],
        b"abtest-client-secret\n",
    );
    w.broker.add_name(AUTH, AUTH_IP);
    for _ in 0..3 {
        let (status, body, shown) = call_resource(&w, &oauth);
        assert_eq!(status, 200, "{shown}\nbrokerd's log:\n{}", w.broker.log());
        assert_eq!(body["token_valid"], true);
    }
    assert_eq!(oauth.token_calls(Grant::ClientCredentials), 1, "cached");
    // The server revokes the client's access tokens early; the client stays registered.
    std::thread::sleep(Duration::from_secs(6));
    oauth.revoke_access_tokens(CLIENT);
    let (status, _, _) = call_resource(&w, &oauth);
    assert_eq!(status, 401);
    wait_for("one fetch after the 401", Duration::from_secs(15), || {
        oauth.token_calls(Grant::ClientCredentials) == 2
    });
    let (status, _, shown) = call_resource(&w, &oauth);
    assert_eq!(status, 200, "{shown}");
    assert_eq!(oauth.token_calls(Grant::ClientCredentials), 2);
}

/// The API's record of the last call: the sha256 of the Authorization it received.
fn api_call(w: &World) -> (u16, String) {
    let (run, report) = curl(&w.broker, &w.agent, &w.trust(), &w.call("/hash"));
    run.assert_no_secret(&w.secret);
    let shown = report.show();
    if report.status != 200 {
        return (report.status, shown);
    }
    (
        200,
        report.json()["authorization_sha256"]
            .as_str()
            .unwrap_or_default()
            .to_string(),
    )
}

fn write_script(path: &Path, body: &str) {
    use std::os::unix::fs::PermissionsExt as _;
    let tmp = path.with_extension("tmp");
    std::fs::write(&tmp, format!("#!/bin/sh\n{body}\n"))
        .unwrap_or_else(|e| panic!("cannot write {}: {e}", tmp.display()));
    std::fs::set_permissions(&tmp, std::fs::Permissions::from_mode(0o700))
        .unwrap_or_else(|e| panic!("chmod: {e}"));
    std::fs::rename(&tmp, path).unwrap_or_else(|e| panic!("rename: {e}"));
}

#[test]
fn an_exec_source_is_run_again_after_its_ttl_and_a_failing_command_is_a_clear_503() {
    let w = World::new();
    let dir = tempfile::tempdir().unwrap_or_else(|e| panic!("tempdir: {e}"));
    let script = dir.path().join("provider.sh");
    let first = Canary::new();
    let value_file = dir.path().join("value");
    std::fs::write(&value_file, first.expose()).unwrap_or_else(|e| panic!("{e}"));
    write_script(&script, &format!("cat {}", value_file.display()));
    let from = format!("exec:{}", script.display());
    let out = set(
        &w,
        &["secret", "set", SECRET_NAME, "--from", &from, "--ttl", "2s"],
        b"",
    );
    assert!(out.contains("exec credential"), "{out}");
    let (status, hash) = api_call(&w);
    assert_eq!(status, 200, "{hash}\nbrokerd's log:\n{}", w.broker.log());
    assert_eq!(hash, first.sha256_with_prefix("Bearer "));

    // A new value: used once the TTL has passed.
    let second = Canary::new();
    std::fs::write(&value_file, second.expose()).unwrap_or_else(|e| panic!("{e}"));
    std::thread::sleep(Duration::from_secs(3));
    let (_, hash) = api_call(&w);
    assert_eq!(hash, second.sha256_with_prefix("Bearer "));

    // The command fails: after the TTL the value is not used any more, and the refusal says
    // why (exit status and the first line of stderr, never stdout).
    write_script(
        &script,
        &format!(
            "cat {}; echo 'vault is sealed' >&2; exit 3",
            value_file.display()
        ),
    );
    std::thread::sleep(Duration::from_secs(3));
    let (status, shown) = api_call(&w);
    assert_eq!(status, 503, "{shown}");
    assert!(
        shown.contains("exit status 3") && shown.contains("vault is sealed"),
        "{shown}"
    );
    second.assert_absent(shown.as_bytes(), "the refusal");
    let entry = listed(&w, SECRET_NAME);
    assert_eq!(entry["kind"], "exec");
    assert!(
        entry["state"]
            .as_str()
            .is_some_and(|s| s.starts_with("failed:")),
        "{entry}"
    );
    second.assert_absent(w.broker.log().as_bytes(), "brokerd's log");
}

#[test]
fn a_file_source_is_read_again_when_the_file_changes() {
    let w = World::new();
    let dir = tempfile::tempdir().unwrap_or_else(|e| panic!("tempdir: {e}"));
    let file = dir.path().join("token");
    let first = Canary::new();
    std::fs::write(&file, format!("{}\n", first.expose())).unwrap_or_else(|e| panic!("{e}"));
    let from = format!("file:{}", file.display());
    set(&w, &["secret", "set", SECRET_NAME, "--from", &from], b"");
    let (status, hash) = api_call(&w);
    assert_eq!(status, 200, "{hash}\nbrokerd's log:\n{}", w.broker.log());
    assert_eq!(hash, first.sha256_with_prefix("Bearer "));
    // Replaced the way orchestrators do (write aside, rename over).
    let second = Canary::new();
    let tmp = dir.path().join("token.new");
    std::fs::write(&tmp, second.expose()).unwrap_or_else(|e| panic!("{e}"));
    std::fs::rename(&tmp, &file).unwrap_or_else(|e| panic!("{e}"));
    wait_for("the new file's value", Duration::from_secs(10), || {
        api_call(&w).1 == second.sha256_with_prefix("Bearer ")
    });
    assert_eq!(listed(&w, SECRET_NAME)["kind"], "file");
    second.assert_absent(w.broker.log().as_bytes(), "brokerd's log");
}

#[test]
fn a_google_service_account_key_mints_tokens_through_the_jwt_bearer_grant() {
    let (ca, oauth) = oauth_server();
    let account = oauth.service_account("abtest-agent@abtest-project.iam.gserviceaccount.com");
    let w = world(ca, &oauth);
    let key = account.json();
    let out = set(
        &w,
        &[
            "secret",
            "set",
            TOKEN,
            "--kind",
            "gcp",
            "--scope",
            "https://www.googleapis.com/auth/cloud-platform",
        ],
        key.as_bytes(),
    );
    assert!(out.contains("gcp credential"), "{out}");
    w.broker.add_name(AUTH, AUTH_IP);
    for _ in 0..2 {
        let (status, body, shown) = call_resource(&w, &oauth);
        assert_eq!(status, 200, "{shown}\nbrokerd's log:\n{}", w.broker.log());
        assert_eq!(body["token_valid"], true);
    }
    assert_eq!(
        oauth.token_calls(Grant::JwtBearer),
        1,
        "cached until expiry"
    );
    assert_eq!(listed(&w, TOKEN)["kind"], "gcp");
    // The key file's private key is nowhere in what brokerd says.
    let listing = w.broker.ctl_ok(&["secret", "list", "--json"]);
    assert!(!listing.contains("PRIVATE KEY"), "{listing}");
    assert!(!w.broker.log().contains("PRIVATE KEY"));
}

/// A world whose agent runs an OAuth flow itself: its token requests to the test server go
/// through a rule that captures the tokens (`inject.capture_tokens`), its resource requests
/// through a rule that injects nothing (placeholders are swapped like handles).
fn capture_world(ca: TestCa, oauth: &TestOAuth) -> World {
    let port = oauth.port();
    World::with_ca(ca, |cg, api| {
        vec![(
            "agent".into(),
            format!(
                "cgroup = \"{agent}\"\n\
                 [[allow]]\nhost = \"{AUTH}\"\nport = {port}\npaths = [\"/token\"]\n\
                 inject.capture_tokens = {{ use_at = \"{AUTH}\" }}\n\
                 [[allow]]\nhost = \"{AUTH}\"\nport = {port}\n\
                 [[allow]]\nhost = \"api.example.test\"\nport = {api_port}\n",
                agent = cg.child("agent"),
                api_port = api.port(),
            ),
        )]
    })
}

/// The agent's token request: a refresh with `refresh_token`; returns (status, answer).
fn agent_refresh(w: &World, oauth: &TestOAuth, refresh_token: &str) -> (u16, serde_json::Value) {
    let form = format!(
        "grant_type=refresh_token&client_id={CLIENT}&client_secret=abtest-client-secret&refresh_token={}",
        refresh_token
    );
    let call = Call::new(AUTH, IpAddr::V4(AUTH_IP), oauth.port(), "/token")
        .method("POST")
        .header("content-type", "application/x-www-form-urlencoded")
        .body(&form);
    let (_run, report) = curl(&w.broker, &w.agent, &w.trust(), &call);
    (report.status, report.json())
}

fn agent_resource(w: &World, oauth: &TestOAuth, access_token: &str) -> (u16, serde_json::Value) {
    let call = Call::new(AUTH, IpAddr::V4(AUTH_IP), oauth.port(), "/resource")
        .header("authorization", &format!("Bearer {access_token}"));
    let (_run, report) = curl(&w.broker, &w.agent, &w.trust(), &call);
    (report.status, report.json())
}

#[test]
fn tokens_from_an_oauth_flow_the_agent_runs_are_kept_by_brokerd_and_placeholders_work() {
    let (ca, oauth) = oauth_server();
    oauth.register_client(CLIENT, Some("abtest-client-secret"));
    let first = oauth.mint_refresh_token(CLIENT, None);
    let w = capture_world(ca, &oauth);
    w.broker.add_name(AUTH, AUTH_IP);

    let (status, answer) = agent_refresh(&w, &oauth, first.expose());
    assert_eq!(status, 200, "{answer}\nbrokerd's log:\n{}", w.broker.log());
    let access = answer["access_token"]
        .as_str()
        .unwrap_or_default()
        .to_string();
    let refresh = answer["refresh_token"]
        .as_str()
        .unwrap_or_default()
        .to_string();
    // Placeholders of the tokens' shape, worth nothing at the server.
    assert!(
        access.starts_with("at_") && refresh.starts_with("rt_"),
        "{answer}"
    );
    assert!(
        !oauth.access_token_valid(&access),
        "the agent got a placeholder, not the token"
    );
    assert_eq!(oauth.tokens_issued(Grant::RefreshToken), 1);

    // The placeholder works at the resource: brokerd swaps it for the real token.
    let (status, body) = agent_resource(&w, &oauth, &access);
    assert_eq!(status, 200, "{body}\nbrokerd's log:\n{}", w.broker.log());
    assert_eq!(body["token_valid"], true);

    // The agent refreshes with its placeholder refresh token: brokerd sends the real one (the
    // server sees no replay and no unknown token), and captures the new pair.
    let (status, answer) = agent_refresh(&w, &oauth, &refresh);
    assert_eq!(status, 200, "{answer}\nbrokerd's log:\n{}", w.broker.log());
    assert_eq!(oauth.tokens_issued(Grant::RefreshToken), 2);
    assert_eq!(oauth.unknown_refresh_presented(), 0);
    assert_eq!(oauth.reused_refresh_tokens(), 0);
    let access2 = answer["access_token"]
        .as_str()
        .unwrap_or_default()
        .to_string();
    assert!(!oauth.access_token_valid(&access2));
    let (status, _) = agent_resource(&w, &oauth, &access2);
    assert_eq!(status, 200);

    // A placeholder sent to another host (allowed, but not where it is bound) is refused as a
    // handle's misuse, and the real token never reaches that host.
    let call = Call::new(
        "api.example.test",
        agent_broker_tests::world::api_ip(),
        w.api.port(),
        "/hash",
    )
    .header("authorization", &format!("Bearer {access2}"));
    let (_run, report) = curl(&w.broker, &w.agent, &w.trust(), &call);
    assert_eq!(report.status, 403, "{}", report.show());
    assert!(report.show().contains("handle"), "{}", report.show());
    first.assert_absent(w.broker.log().as_bytes(), "brokerd's log");
}
