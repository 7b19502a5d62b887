//! The agent API's answers without the proxy: what `allowed` shows of limits after use, the
//! query of `/v1/explain`, the per-agent bucket.

use std::path::PathBuf;

use super::*;

const POLICY: &str = r#"
cgroup = "agents/a"

[[allow]]
host = "api.example.test"
methods = ["GET", "POST"]
rate = { per_second = 2, burst = 3 }
budget = { requests_per_day = 10 }
inject.headers = { authorization = "Bearer {secret:A_KEY}", x-other = "{secret:B_KEY}" }

[[allow]]
host = "old.example.test"
not_after = "2001-01-01T00:00:00Z"
"#;

fn api() -> (
    AgentApi,
    Arc<Limiter>,
    Arc<Policy>,
    watch::Sender<Arc<Policy>>,
) {
    let policy = Arc::new(
        Policy::from_files(vec![(PathBuf::from("a.toml"), POLICY.to_string())]).expect("policy"),
    );
    let (tx, rx) = watch::channel(policy.clone());
    let limiter = Arc::new(Limiter::new());
    (AgentApi::new(rx, limiter.clone()), limiter, policy, tx)
}

fn agent(path: &str) -> CgroupPath {
    CgroupPath::parse(path).expect("cgroup")
}

#[test]
fn allowed_shows_names_and_what_the_limits_have_left() {
    let (api, limiter, policy, _tx) = api();
    let a = agent("agents/a/worker");
    // Two requests used through the proxy's limiter.
    let key = policy.effective(&a).rules[0].limits[0]
        .key
        .clone()
        .expect("a limit key");
    for _ in 0..2 {
        limiter
            .check(std::slice::from_ref(&key), Instant::now())
            .expect("within the limit");
    }
    let view = api.allowed(&a);
    assert_eq!(view["agent"], "agents/a/worker");
    let rules = view["rules"].as_array().expect("rules");
    assert_eq!(rules.len(), 1, "an expired rule is not shown: {view}");
    let rule = &rules[0];
    assert_eq!(rule["host"], "api.example.test");
    assert_eq!(rule["methods"], json!(["GET", "POST"]));
    assert_eq!(rule["credentials"], json!(["A_KEY", "B_KEY"]));
    let left = &rule["limits"][0]["left"];
    assert_eq!(left["requests_today"], 8);
    assert_eq!(left["requests_now"], 1);
    assert_eq!(left["bytes_today"], Value::Null, "no bytes budget");
    // Nothing was charged by reading.
    assert_eq!(
        api.allowed(&a)["rules"][0]["limits"][0]["left"]["requests_today"],
        8
    );
    // Another agent sees its own (no policy: nothing).
    let other = api.allowed(&agent("agents/b"));
    assert_eq!(other["rules"], json!([]));
    assert_eq!(other["governed"], false);
}

#[test]
fn explain_answers_for_the_agent_and_always_allows_the_reserved_name() {
    let (api, _, _, _tx) = api();
    let a = agent("agents/a");
    let yes = api
        .explain(&a, "get", "https://api.example.test/x")
        .expect("explain");
    assert_eq!(yes["allowed"], true);
    assert_eq!(yes["method"], "GET");
    let no = api
        .explain(&a, "DELETE", "https://api.example.test/x")
        .expect("explain");
    assert_eq!(no["allowed"], false);
    assert!(no["reason"].as_str().is_some_and(|r| !r.is_empty()));
    let own = api
        .explain(&a, "GET", "https://agent-broker.internal/v1/allowed")
        .expect("explain");
    assert_eq!(own["allowed"], true);
    assert!(api.explain(&a, "GET", "not a url").is_err());
    assert!(api.explain(&a, "G E T", "https://x.test/").is_err());
}

#[test]
fn each_agent_has_a_bucket_of_calls() {
    let (api, _, _, _tx) = api();
    let a = agent("agents/a");
    for _ in 0..CALL_BURST as usize {
        api.take_call(&a).expect("within the burst");
    }
    let wait = api.take_call(&a).expect_err("over the burst");
    assert!(wait > 0.0 && wait <= 1.0 / CALLS_PER_SECOND + 0.01);
    api.take_call(&agent("agents/b"))
        .expect("another agent has its own bucket");
}

#[test]
fn sessions_are_per_agent() {
    let (api, _, _, _tx) = api();
    let (a, b) = (agent("agents/a"), agent("agents/b"));
    let id = api.open_session(&a).expect("session");
    assert_eq!(id.len(), 32);
    assert!(api.has_session(&a, &id));
    assert!(
        !api.has_session(&b, &id),
        "another agent's session is unknown"
    );
    assert!(!api.close_session(&b, &id));
    assert!(api.close_session(&a, &id));
    assert!(!api.has_session(&a, &id));
    let ids: Vec<String> = (0..SESSIONS_PER_AGENT + 2)
        .map(|_| api.open_session(&a).expect("session"))
        .collect();
    let kept = ids.iter().filter(|id| api.has_session(&a, id)).count();
    assert_eq!(kept, SESSIONS_PER_AGENT, "the oldest are dropped");
}

#[test]
fn the_explain_query_is_percent_decoded() {
    let q = query_pairs(Some(
        "method=POST&url=https%3A%2F%2Fa.test%2Fx%3Fy%3D1+2&flag",
    ));
    assert_eq!(q.get("method").map(String::as_str), Some("POST"));
    assert_eq!(
        q.get("url").map(String::as_str),
        Some("https://a.test/x?y=1 2")
    );
    assert_eq!(q.get("flag").map(String::as_str), Some(""));
    assert!(query_pairs(None).is_empty());
}
