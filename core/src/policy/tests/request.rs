//! `decide_request`: each rule kind, each denial reason, within one file.

use std::net::SocketAddr;

use super::*;

const API: &str = r#"
cgroup = "agents/demo"

[[allow]]
host = "api.example.test"
methods = ["GET"]
paths = ["/v1/models", "/v1/files/*", "/v2/**"]
inject.headers = { authorization = "Bearer {secret:READ_KEY}" }

[[allow]]
host = "api.example.test"
methods = ["POST"]
paths = ["/v1/chat/*"]
inject.headers = { authorization = "Bearer {secret:WRITE_KEY}" }
rate = { per_second = 5, burst = 10 }
"#;

fn inject_of(d: &RequestDecision<'_>) -> Vec<String> {
    match d {
        RequestDecision::Allow { inject, .. } => inject
            .secret_names()
            .into_iter()
            .map(|s| s.as_str().to_string())
            .collect(),
        RequestDecision::Deny { reason, .. } => panic!("denied: {reason}"),
    }
}

#[test]
fn methods_and_paths_pick_the_rule_and_its_injection() {
    let p = policy(&[("api.toml", API)]);
    let demo = cg("agents/demo");
    for (method, target, key) in [
        ("GET", "api.example.test/v1/models", "READ_KEY"),
        ("GET", "api.example.test/v1/files/f-1", "READ_KEY"),
        ("GET", "api.example.test/v2/a/b/c", "READ_KEY"),
        ("POST", "api.example.test/v1/chat/completions", "WRITE_KEY"),
    ] {
        let r = req(method, target);
        let d = p.decide_request(&demo, &r.info());
        assert_eq!(inject_of(&d), [key], "{method} {target}");
    }
    // The limited rule hands out its limit key; the other has none.
    let r = req("POST", "api.example.test/v1/chat/completions");
    let RequestDecision::Allow {
        limit_keys, rule, ..
    } = p.decide_request(&demo, &r.info())
    else {
        panic!("denied")
    };
    assert_eq!(rule.index, 1);
    assert_eq!(limit_keys.len(), 1);
    assert_eq!(limit_keys[0].cgroup(), "agents/demo");
    assert_eq!(
        limit_keys[0].rate().map(|r| (r.count, r.burst)),
        Some((5, 10))
    );
    let r = req("GET", "api.example.test/v1/models");
    assert!(matches!(
        p.decide_request(&demo, &r.info()),
        RequestDecision::Allow { limit_keys, .. } if limit_keys.is_empty()
    ));
}

#[test]
fn method_and_path_denials_say_what_is_allowed() {
    let p = policy(&[("api.toml", API)]);
    let deny = |m: &str, t: &str| ask(&p, "agents/demo", &req(m, t)).expect_err("denied");
    assert_eq!(
        deny("DELETE", "api.example.test/v1/files/f-1"),
        "DELETE is not allowed to api.example.test/v1/files/f-1 for agents/demo; allowed \
         methods: GET, POST"
    );
    assert_eq!(
        deny("GET", "api.example.test/v1/chat/completions"),
        "GET api.example.test/v1/chat/completions is not allowed for agents/demo; allowed \
         paths for GET: /v1/models, /v1/files/*, /v2/**"
    );
    // `*` stays within one segment.
    assert!(deny("GET", "api.example.test/v1/files/a/b").contains("allowed paths for GET"));
    assert!(deny("GET", "api.example.test/v1/models/").contains("allowed paths"));
    // Paths a server could read differently never match a rule with paths.
    for sneaky in [
        "api.example.test/v2/../v1/chat/x",
        "api.example.test/v2/%2e%2e/admin",
        "api.example.test/v2/a%2Fb",
        "api.example.test/v1/files//x",
    ] {
        let reason = deny("GET", sneaky);
        assert!(
            reason.contains("only match normalized paths"),
            "{sneaky}: {reason}"
        );
    }
    // The denial names the rule that came closest, and the file.
    let r = req("POST", "api.example.test/v1/files/x");
    let RequestDecision::Deny { rule, file, .. } = p.decide_request(&cg("agents/demo"), &r.info())
    else {
        panic!("allowed")
    };
    assert_eq!(rule.map(|r| r.index), Some(1));
    assert_eq!(file, Some(Path::new("api.toml")));
}

#[test]
fn destination_denials_keep_the_minimal_wording() {
    let p = policy(&[("api.toml", API)]);
    let deny = |t: &str| ask(&p, "agents/demo", &req("GET", t)).expect_err("denied");
    assert_eq!(
        deny("api.foo.test/x"),
        "no rule allows api.foo.test:443 for cgroup agents/demo"
    );
    assert_eq!(
        deny("api.example.test:8443/v1/models"),
        "no rule allows api.example.test:8443 for cgroup agents/demo (allowed port for this \
         host: 443)"
    );
    assert!(
        ask(
            &p,
            "agents/other",
            &req("GET", "api.example.test/v1/models")
        )
        .expect_err("no file")
        .starts_with("no policy covers cgroup agents/other")
    );
    let mut r = req("GET", "api.example.test/v1/models");
    r.host = String::new();
    assert!(
        ask(&p, "agents/demo", &r)
            .expect_err("no host")
            .contains("not a valid host")
    );
}

#[test]
fn header_conditions_match_exactly_and_every_value() {
    let p = policy(&[(
        "h.toml",
        r#"
cgroup = "a"
[[allow]]
host = "api.example.test"
headers = { X-Tenant = "acme", "x-env" = "prod" }
"#,
    )]);
    let base = req("GET", "api.example.test/");
    let both = with_header(
        with_header(base.clone(), "x-tenant", "acme"),
        "x-env",
        "prod",
    );
    assert!(ask(&p, "a", &both).is_ok());
    let reason = ask(&p, "a", &with_header(base.clone(), "x-tenant", "acme")).expect_err("one");
    assert_eq!(
        reason,
        "GET api.example.test/ is not allowed for a: the rule for it needs the request headers \
         x-env, x-tenant with the value the policy requires"
    );
    assert!(ask(&p, "a", &with_header(both.clone(), "x-tenant", "evil")).is_err());
    let wrong_case = with_header(with_header(base, "x-tenant", "ACME"), "x-env", "prod");
    assert!(ask(&p, "a", &wrong_case).is_err());
}

#[test]
fn ip_rules_match_the_original_address_v4_v6_and_mapped() {
    let p = policy(&[(
        "ip.toml",
        r#"
cgroup = "a"
[[allow]]
ip = "192.0.2.0/24"
port = 8443
[[allow]]
ip = "2001:db8::/32"
[[allow]]
ip = "10.1.2.3"
port = 80
"#,
    )]);
    let mut r = req("GET", "192.0.2.7:8443/x");
    assert_eq!(ask(&p, "a", &r).as_deref(), Ok("ip.toml:4 allow[0]"));
    // Any name over that address (a client without SNI sends the IP; one with a name still
    // goes to an allowed address).
    r.host = "device.lab.test".into();
    assert!(ask(&p, "a", &r).is_ok());
    r.dst_ip = "192.0.3.7".parse().expect("ip");
    assert!(ask(&p, "a", &r).is_err());
    r.dst_ip = "::ffff:192.0.2.9".parse().expect("ip");
    assert!(ask(&p, "a", &r).is_ok(), "v4-mapped is the v4 address");

    let r = req("GET", "[2001:db8:5::1]/x");
    assert_eq!(ask(&p, "a", &r).as_deref(), Ok("ip.toml:7 allow[1]"));
    let r = req("GET", "[2001:db9::1]/x");
    assert!(ask(&p, "a", &r).is_err());
    let r = req("GET", "10.1.2.3:80/");
    assert_eq!(ask(&p, "a", &r).as_deref(), Ok("ip.toml:9 allow[2]"));
}

#[test]
fn most_specific_destination_wins_then_file_order() {
    let p = policy(&[(
        "s.toml",
        r#"
cgroup = "a"
[[allow]]
ip = "192.0.2.0/24"
[[allow]]
ip = "192.0.2.0/28"
[[allow]]
host = "*.example.test"
[[allow]]
host = "*.b.example.test"
[[allow]]
host = "x.b.example.test"
methods = ["POST"]
[[allow]]
host = "x.b.example.test"
methods = ["POST", "GET"]
"#,
    )]);
    let at = |m: &str, host: &str, ip: &str| {
        let mut r = req(m, &format!("{host}/"));
        r.dst_ip = ip.parse().expect("ip");
        ask(&p, "a", &r).map(|s| {
            s.rsplit_once('[')
                .map(|(_, i)| i.trim_end_matches(']').to_string())
                .unwrap_or_default()
        })
    };
    assert_eq!(
        at("POST", "x.b.example.test", "192.0.2.1").as_deref(),
        Ok("4")
    );
    assert_eq!(
        at("GET", "x.b.example.test", "192.0.2.1").as_deref(),
        Ok("5")
    );
    // Exact host rules do not allow DELETE: the next most specific destination does.
    assert_eq!(
        at("DELETE", "x.b.example.test", "192.0.2.1").as_deref(),
        Ok("3")
    );
    assert_eq!(
        at("GET", "y.b.example.test", "192.0.2.1").as_deref(),
        Ok("3")
    );
    assert_eq!(at("GET", "y.example.test", "192.0.2.1").as_deref(), Ok("2"));
    assert_eq!(at("GET", "other.test", "192.0.2.1").as_deref(), Ok("1"));
    assert_eq!(at("GET", "other.test", "192.0.2.200").as_deref(), Ok("0"));
    assert!(at("GET", "other.test", "192.0.3.1").is_err());
}

#[test]
fn not_after_expires_a_rule_with_a_reason() {
    let p = policy(&[(
        "t.toml",
        r#"
cgroup = "a"
[[allow]]
host = "old.example.test"
not_after = "2026-01-01T00:00:00Z"
[[allow]]
host = "new.example.test"
not_after = 2026-12-31T23:00:00-01:00
"#,
    )]);
    assert_eq!(
        ask(&p, "a", &req("GET", "old.example.test/x")),
        Err(
            "the rule allowing old.example.test/x for a expired at 2026-01-01T00:00:00Z; ask the \
             operator to renew it"
                .into()
        )
    );
    assert!(ask(&p, "a", &req("GET", "new.example.test/x")).is_ok());
    let mut late = req("GET", "new.example.test/x");
    late.now = parse_rfc3339("2027-01-01T00:00:01Z").expect("t");
    assert!(
        ask(&p, "a", &late)
            .expect_err("expired")
            .contains("expired at 2027-01-01T00:00:00Z")
    );
    // Up to and including the instant.
    late.now = parse_rfc3339("2027-01-01T00:00:00Z").expect("t");
    assert!(ask(&p, "a", &late).is_ok());
    assert_eq!(
        p.files()[0].rules()[1].not_after(),
        Some(parse_rfc3339("2027-01-01T00:00:00Z").expect("t"))
    );
}

#[test]
fn tcp_only_destinations_refuse_http_requests() {
    let p = policy(&[(
        "t.toml",
        "cgroup = \"a\"\n[[allow]]\nhost = \"git.example.test\"\nport = 22\ntcp = true\n",
    )]);
    assert_eq!(
        ask(&p, "a", &req("GET", "git.example.test:22/")),
        Err(
            "git.example.test:22 is only allowed for cgroup a as a passed-through TCP \
             connection, not for HTTP requests"
                .into()
        )
    );
}

#[test]
fn basic_auth_and_query_injection_reach_the_decision() {
    let p = policy(&[(
        "i.toml",
        r#"
cgroup = "a"
[[allow]]
host = "registry.example.test"
inject.basic_auth = { username = "ci", password = "{secret:REG}" }
inject.query = { api_key = "{secret:Q}", "ids[]" = "1" }
inject.headers = { x-extra = "literal" }
"#,
    )]);
    let r = req("GET", "registry.example.test/v2/");
    let RequestDecision::Allow { inject, .. } = p.decide_request(&cg("a"), &r.info()) else {
        panic!("denied")
    };
    assert_eq!(
        inject.slots(),
        [
            "header x-extra",
            "basic auth",
            "query api_key",
            "query ids[]"
        ]
    );
    let names: Vec<&str> = p
        .secret_names()
        .into_iter()
        .map(SecretName::as_str)
        .collect();
    assert_eq!(names, ["Q", "REG"]);
    let vault = |n: &SecretName| match n.as_str() {
        "REG" => Some(&b"pw"[..]),
        "Q" => Some(&b"k"[..]),
        _ => None,
    };
    let rendered = inject.render(vault).expect("renders");
    assert_eq!(
        rendered
            .rewrite_query(Some("q=x"))
            .as_deref()
            .map(|s| s.as_str()),
        Some("q=x&api_key=k&ids%5B%5D=1")
    );
    // The header part of the injection is the rule's headers alone; basic auth and the query
    // are apart from it.
    assert_eq!(
        inject.headers().header_names().collect::<Vec<_>>(),
        ["x-extra"]
    );
}

/// A connection is decided by destination, port and expiry alone; methods and paths wait for
/// the request.
#[test]
fn connections_ignore_request_conditions_but_not_expiry() {
    let p = policy(&[(
        "m.toml",
        r#"
cgroup = "a"
[[allow]]
host = "api.example.test"
methods = ["GET"]
paths = ["/v1/**"]
[[allow]]
host = "old.example.test"
not_after = "2001-01-01T00:00:00Z"
"#,
    )]);
    let connect = |name: &str| {
        let dst = SocketAddr::from(([192, 0, 2, 1], 443));
        p.decide_connection(&cg("a"), dst, Some(name), now())
    };
    assert!(matches!(
        connect("api.example.test"),
        ConnectionDecision::Http
    ));
    let ConnectionDecision::Deny { reason, .. } = connect("old.example.test") else {
        panic!("expired rule allowed")
    };
    assert!(
        reason.contains("expired at 2001-01-01T00:00:00Z"),
        "{reason}"
    );
}

#[test]
fn the_limiter_enforces_decided_limit_keys() {
    let p = policy(&[("api.toml", API)]);
    let limiter = Limiter::new();
    let t0 = std::time::Instant::now();
    let r = req("POST", "api.example.test/v1/chat/x");
    let keys = match p.decide_request(&cg("agents/demo/sub-a"), &r.info()) {
        RequestDecision::Allow { limit_keys, .. } => limit_keys,
        RequestDecision::Deny { reason, .. } => panic!("{reason}"),
    };
    for _ in 0..10 {
        limiter.check(&keys, t0).expect("within burst");
    }
    // Another cgroup governed by the same file shares the counter.
    let other = match p.decide_request(&cg("agents/demo/sub-b"), &r.info()) {
        RequestDecision::Allow { limit_keys, .. } => limit_keys,
        RequestDecision::Deny { reason, .. } => panic!("{reason}"),
    };
    let d = limiter
        .check(&other, t0)
        .expect_err("shared bucket is empty");
    assert!(
        d.reason
            .contains("agents/demo may send 5 requests per second"),
        "{}",
        d.reason
    );
    assert_eq!(d.retry_after, Duration::from_millis(200));

    // A reload that keeps the rule keeps its counters; one that drops it drops them.
    limiter.retain_for(&policy(&[("api.toml", API)]));
    assert_eq!(limiter.len(), 1);
    assert!(
        limiter.check(&keys, t0).is_err(),
        "still empty after reload"
    );
    limiter.retain_for(&policy(&[("api.toml", "cgroup = \"agents/demo\"\n")]));
    assert!(limiter.is_empty());
}

#[test]
fn aws_sigv4_injection_reaches_the_decision_and_conflicts_are_refused() {
    let p = policy(&[(
        "aws.toml",
        r#"
cgroup = "a"
[[allow]]
host = "s3.amazonaws.com"
inject.aws_sigv4 = { secret = "AWS", services = ["s3"], regions = ["eu-west-1"], actions = [] }
"#,
    )]);
    let r = req("PUT", "s3.amazonaws.com/bucket/key");
    let RequestDecision::Allow { inject, .. } = p.decide_request(&cg("a"), &r.info()) else {
        panic!("denied")
    };
    assert_eq!(inject.slots(), ["aws sigv4 signature"]);
    let aws = inject.aws_sigv4().expect("aws_sigv4");
    assert_eq!(aws.secret().as_str(), "AWS");
    assert!(aws.allows_service("s3") && !aws.allows_service("iam"));
    assert!(aws.allows_region("eu-west-1") && !aws.allows_region("us-east-1"));
    assert!(aws.allows_action(None), "no actions listed: any");
    let names: Vec<&str> = p
        .secret_names()
        .into_iter()
        .map(SecretName::as_str)
        .collect();
    assert_eq!(names, ["AWS"]);

    for (bad, why) in [
        (
            "inject.headers = { authorization = \"x\" }\ninject.aws_sigv4 = { secret = \"AWS\" }",
            "signs the authorization header",
        ),
        (
            "inject.aws_sigv4 = { secret = \"1AWS\" }",
            "invalid secret name",
        ),
        (
            "inject.aws_sigv4 = { secret = \"AWS\", services = [\"s 3\"] }",
            "is not a service",
        ),
        (
            "inject.aws_sigv4 = { secret = \"AWS\", verbs = [] }",
            "unknown field",
        ),
    ] {
        let text = format!("cgroup = \"x\"\n[[allow]]\nhost = \"h.test\"\n{bad}\n");
        let Err(e) = try_policy(&[("p.toml", &text)]) else {
            panic!("accepted: {bad}")
        };
        assert!(e.to_string().contains(why), "{bad}: {e}");
    }
}

#[test]
fn aws_sigv4_actions_restrict_by_the_requests_action() {
    let p = policy(&[(
        "aws.toml",
        "cgroup = \"a\"\n[[allow]]\nhost = \"sts.amazonaws.com\"\n\
         inject.aws_sigv4 = { secret = \"AWS\", actions = [\"GetCallerIdentity\"] }\n",
    )]);
    let r = req("POST", "sts.amazonaws.com/");
    let RequestDecision::Allow { inject, .. } = p.decide_request(&cg("a"), &r.info()) else {
        panic!("denied")
    };
    let aws = inject.aws_sigv4().expect("aws_sigv4");
    assert!(aws.allows_action(Some("GetCallerIdentity")));
    assert!(!aws.allows_action(Some("AssumeRole")));
    assert!(
        !aws.allows_action(None),
        "actions listed: a request must name one"
    );
}
