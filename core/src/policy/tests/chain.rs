//! Delegation: children only narrow (refused at load otherwise), every level decides at run
//! time, injection comes from the closest file, limits of every level apply.

use super::*;

const PARENT: &str = r#"
cgroup = "agents"

[[allow]]
host = "*.example.test"
methods = ["GET", "POST"]
paths = ["/v1/**"]
not_after = "2027-01-01T00:00:00Z"
rate = { per_second = 10, burst = 20 }
budget = { requests_per_day = 1000, tokens_per_day = 5000 }
inject.headers = { authorization = "Bearer {secret:K}" }

[[allow]]
host = "plain.example.test"
port = 8080
plain_http = true

[[allow]]
host = "git.example.test"
port = 22
tcp = true

[[allow]]
ip = "10.0.0.0/8"
headers = { x-tenant = "acme" }
"#;

/// A child file for `agents/coder` with one rule made of `body`.
fn child(body: &str) -> String {
    format!("cgroup = \"agents/coder\"\n[[allow]]\n{body}\n")
}

/// The single load error of PARENT plus a child with one rule.
fn widening(body: &str) -> PolicyFileError {
    error(&[("agents.toml", PARENT), ("coder.toml", &child(body))])
}

#[test]
fn narrower_children_load() {
    for body in [
        "host = \"api.example.test\"\nmethods = [\"GET\"]\npaths = [\"/v1/models\"]",
        "host = \"*.b.example.test\"\npaths = [\"/v1/chat/*\"]\nmethods = [\"POST\"]",
        // Limits and expiry left out: the parent's apply.
        "host = \"api.example.test\"\nmethods = [\"GET\", \"POST\"]\npaths = [\"/v1/**\"]",
        "host = \"api.example.test\"\nmethods = [\"GET\"]\npaths = [\"/v1/x\"]\n\
         rate = { per_minute = 600, burst = 20 }\nbudget = { tokens_per_day = 10 }\n\
         not_after = \"2026-12-31T00:00:00Z\"",
        // Injection dropped, or the same secret written elsewhere.
        "host = \"api.example.test\"\nmethods = [\"GET\"]\npaths = [\"/v1/x\"]\n\
         inject.headers = { x-api-key = \"{secret:K}\", x-fixed = \"literal\" }",
        "host = \"plain.example.test\"\nport = 8080\nplain_http = true",
        "host = \"git.example.test\"\nport = 22\ntcp = true",
        "ip = \"10.1.0.0/16\"\nheaders = { x-tenant = \"acme\", x-more = \"1\" }",
    ] {
        try_policy(&[("agents.toml", PARENT), ("coder.toml", &child(body))])
            .unwrap_or_else(|e| panic!("{body}\n{e}"));
    }
}

#[test]
fn widening_children_are_refused_with_the_parent_rule() {
    for (body, field, line, needle) in [
        (
            "host = \"api.other.test\"",
            "allow[0].host",
            3,
            "api.other.test:443 is not covered by any rule of the policy for agents \
             (agents.toml)",
        ),
        (
            "host = \"api.example.test\"\nport = 8443\nmethods = [\"GET\"]",
            "allow[0].port",
            4,
            "port 8443 goes beyond the policy for agents (agents.toml), which allows \
             api.example.test only on port 443",
        ),
        (
            "host = \"api.example.test\"\nmethods = [\"GET\", \"DELETE\"]\npaths = [\"/v1/x\"]",
            "allow[0].methods",
            4,
            "methods GET, DELETE goes beyond agents.toml:5 allow[0] (cgroup agents), which \
             allows GET, POST",
        ),
        (
            "host = \"api.example.test\"\npaths = [\"/v1/x\"]",
            "allow[0].methods",
            3,
            "every method goes beyond",
        ),
        (
            "host = \"api.example.test\"\nmethods = [\"GET\"]\npaths = [\"/v2/x\"]",
            "allow[0].paths",
            5,
            "path \"/v2/x\" goes beyond agents.toml:5 allow[0] (cgroup agents), which allows \
             paths /v1/**",
        ),
        (
            "host = \"api.example.test\"\nmethods = [\"GET\"]",
            "allow[0].paths",
            3,
            "every path goes beyond",
        ),
        (
            "host = \"api.example.test\"\nmethods = [\"GET\"]\npaths = [\"/v1/x\"]\n\
             not_after = \"2027-06-01T00:00:00Z\"",
            "allow[0].not_after",
            6,
            "not_after 2027-06-01T00:00:00Z is later than 2027-01-01T00:00:00Z, when \
             agents.toml:5 allow[0] (cgroup agents) expires",
        ),
        (
            "host = \"api.example.test\"\nmethods = [\"GET\"]\npaths = [\"/v1/x\"]\n\
             rate = { per_second = 11 }",
            "allow[0].rate",
            6,
            "rate { per_second = 11, burst = 11 } is higher than { per_second = 10, burst = \
             20 } of agents.toml:5 allow[0]",
        ),
        (
            "host = \"api.example.test\"\nmethods = [\"GET\"]\npaths = [\"/v1/x\"]\n\
             rate = { per_second = 1, burst = 21 }",
            "allow[0].rate",
            6,
            "is higher than",
        ),
        (
            "host = \"api.example.test\"\nmethods = [\"GET\"]\npaths = [\"/v1/x\"]\n\
             budget = { requests_per_day = 1001 }",
            "allow[0].budget",
            6,
            "budget requests_per_day = 1001 is higher than 1000 of agents.toml:5 allow[0]",
        ),
        (
            "host = \"plain.example.test\"\nport = 80\nplain_http = true",
            "allow[0].port",
            4,
            "only on ports 443, 8080",
        ),
        (
            "host = \"api.example.test\"\nmethods = [\"GET\"]\npaths = [\"/v1/x\"]\n\
             plain_http = true",
            "allow[0].plain_http",
            6,
            "plain_http = true goes beyond agents.toml:5 allow[0] (cgroup agents), which does \
             not allow credentials over plain HTTP",
        ),
        (
            "host = \"api.example.test\"\nport = 443\ntcp = true",
            "allow[0].tcp",
            5,
            "tcp passthrough to api.example.test:443 goes beyond agents.toml:5 allow[0] \
             (cgroup agents), which only allows HTTP requests there",
        ),
        (
            "host = \"git.example.test\"\nport = 22",
            "allow[0].host",
            3,
            "HTTP requests to git.example.test:22 go beyond agents.toml:19 allow[2] (cgroup \
             agents), which only allows tcp passthrough there",
        ),
        (
            "ip = \"10.1.0.0/16\"",
            "allow[0].headers",
            3,
            "agents.toml:24 allow[3] (cgroup agents) requires the request header x-tenant = \
             \"acme\"; require it here too",
        ),
        (
            "ip = \"11.0.0.0/8\"",
            "allow[0].ip",
            3,
            "11.0.0.0/8:443 is not covered by any rule",
        ),
        (
            "host = \"api.example.test\"\nmethods = [\"GET\"]\npaths = [\"/v1/x\"]\n\
             inject.headers = { authorization = \"Bearer {secret:OTHER}\" }",
            "allow[0].inject",
            6,
            "injects OTHER, which agents.toml:5 allow[0] (cgroup agents) does not inject for \
             api.example.test:443",
        ),
    ] {
        let e = widening(body);
        let shown = e.to_string();
        assert_eq!(e.path, Path::new("coder.toml"), "{shown}");
        assert_eq!(e.field.as_deref(), Some(field), "{body}: {shown}");
        assert_eq!(e.line, line, "{body}: {shown}");
        assert!(shown.contains(needle), "{body}:\n{shown}\nwants {needle}");
        assert!(
            shown.ends_with("a child policy can only narrow its parent's"),
            "{shown}"
        );
    }
}

#[test]
fn dns_names_narrow_too() {
    let parent = "cgroup = \"a\"\n[dns]\nallow = [\"*.example.test\", \"x.test\"]\n";
    for ok in [
        "[\"api.example.test\", \"x.test\"]",
        "[\"*.b.example.test\"]",
        "[]",
    ] {
        let child = format!("cgroup = \"a/b\"\n[dns]\nallow = {ok}\n");
        try_policy(&[("a.toml", parent), ("b.toml", &child)]).unwrap_or_else(|e| panic!("{e}"));
    }
    let child = "cgroup = \"a/b\"\n\n[dns]\nallow = [\"x.test\", \"y.test\"]\n";
    let e = error(&[("a.toml", parent), ("b.toml", child)]);
    assert_eq!(
        (e.line, e.field.as_deref()),
        (4, Some("dns.allow[1]")),
        "{e}"
    );
    assert!(
        e.message.starts_with(
            "y.test is not a name the policy for a (a.toml) lets its agents resolve (it allows \
             \"*.example.test\", \"x.test\")"
        ),
        "{e}"
    );
    // Without [dns], a parent's names are its host rules'.
    let parent = "cgroup = \"a\"\n[[allow]]\nhost = \"api.example.test\"\n";
    let child = "cgroup = \"a/b\"\n[dns]\nallow = [\"*.example.test\"]\n";
    assert_eq!(
        error(&[("a.toml", parent), ("b.toml", child)])
            .field
            .as_deref(),
        Some("dns.allow[0]")
    );
}

#[test]
fn only_the_nearest_ancestor_file_is_checked_and_gaps_are_fine() {
    // agents/x/y/z below agents (no file for agents/x or agents/x/y).
    let parent = "cgroup = \"agents\"\n[[allow]]\nhost = \"*.example.test\"\n";
    let deep = "cgroup = \"agents/x/y/z\"\n[[allow]]\nhost = \"a.example.test\"\n";
    let p = policy(&[("agents.toml", parent), ("deep.toml", deep)]);
    assert!(ask(&p, "agents/x/y/z/w", &req("GET", "a.example.test/")).is_ok());
    assert!(ask(&p, "agents/x/y/z", &req("GET", "b.example.test/")).is_err());
    assert!(ask(&p, "agents/x/y", &req("GET", "b.example.test/")).is_ok());
    // A grandchild is checked against its parent, which was checked against the root.
    let mid = "cgroup = \"agents/x\"\n[[allow]]\nhost = \"*.b.example.test\"\n";
    let e = error(&[
        ("agents.toml", parent),
        ("deep.toml", deep),
        ("mid.toml", mid),
    ]);
    assert_eq!(e.path, Path::new("deep.toml"));
    assert!(e.message.contains("policy for agents/x (mid.toml)"), "{e}");
}

const LEVELS_PARENT: &str = r#"
cgroup = "agents"
[[allow]]
host = "api.example.test"
methods = ["GET", "POST"]
rate = { per_second = 2, burst = 3 }
not_after = "2026-03-01T00:00:00Z"
inject.headers = { authorization = "Bearer {secret:K}" }
[[allow]]
host = "api.example.test"
methods = ["GET"]
headers = { x-tenant = "acme" }
[[allow]]
host = "open.example.test"
plain_http = true
port = 80
"#;

#[test]
fn every_level_decides_and_adds_its_limits() {
    let child_text = r#"
cgroup = "agents/coder"
[[allow]]
host = "api.example.test"
methods = ["GET"]
rate = { per_second = 1, burst = 1 }
inject.headers = { x-api-key = "{secret:K}" }
[[allow]]
host = "api.example.test"
methods = ["POST"]
[[allow]]
host = "open.example.test"
port = 80
"#;
    let p = policy(&[("agents.toml", LEVELS_PARENT), ("coder.toml", child_text)]);
    let coder = cg("agents/coder/task");
    let mut r = req("GET", "api.example.test/x");
    r.now = parse_rfc3339("2026-02-01T00:00:00Z").expect("t");
    let RequestDecision::Allow {
        rule,
        inject,
        plain_http,
        limit_keys,
        ..
    } = p.decide_request(&coder, &r.info())
    else {
        panic!("denied")
    };
    assert_eq!(rule.file.as_ref(), Path::new("coder.toml"));
    // Injection from the closest file.
    assert_eq!(inject.header_names().collect::<Vec<_>>(), ["x-api-key"]);
    assert!(!plain_http);
    let levels: Vec<&str> = limit_keys.iter().map(LimitKey::cgroup).collect();
    assert_eq!(levels, ["agents/coder", "agents"]);

    // The parent's rule expired: the parent level refuses, and says so.
    let mut late = r.clone();
    late.now = parse_rfc3339("2026-04-01T00:00:00Z").expect("t");
    let RequestDecision::Deny {
        reason, file, rule, ..
    } = p.decide_request(&coder, &late.info())
    else {
        panic!("allowed past the parent's expiry")
    };
    assert_eq!(file, Some(Path::new("agents.toml")));
    assert_eq!(rule.map(|r| r.index), Some(0));
    assert_eq!(
        reason,
        "the rule allowing api.example.test/x for agents/coder/task (by the policy for agents, \
         which also applies to agents/coder/task) expired at 2026-03-01T00:00:00Z; ask the \
         operator to renew it"
    );
    // The parent's other GET rule would allow it with the tenant header, but it does not hand
    // out the secret the child injects: still refused.
    let tenant = with_header(late.clone(), "x-tenant", "acme");
    let reason = ask(&p, "agents/coder", &tenant).expect_err("secret not in that parent rule");
    assert!(reason.contains("expired"), "{reason}");
    // The child's injection-free POST rule is allowed by the parent's first rule until then.
    let mut post = req("POST", "api.example.test/x");
    post.now = r.now;
    assert!(ask(&p, "agents/coder", &post).is_ok());
    // plain_http must hold on every level: the child did not set it.
    let RequestDecision::Allow { plain_http, .. } =
        p.decide_request(&coder, &req("GET", "open.example.test:80/").info())
    else {
        panic!("denied")
    };
    assert!(!plain_http);
}

#[test]
fn a_parent_rate_binds_the_sum_of_its_children() {
    let child = |name: &str| {
        format!(
            "cgroup = \"agents/{name}\"\n[[allow]]\nhost = \"api.example.test\"\n\
             methods = [\"GET\"]\ninject.headers = {{ authorization = \"Bearer {{secret:K}}\" }}\n"
        )
    };
    let (a, b) = (child("a"), child("b"));
    let p = policy(&[
        ("agents.toml", LEVELS_PARENT),
        ("a.toml", a.as_str()),
        ("b.toml", b.as_str()),
    ]);
    let limiter = Limiter::new();
    let t0 = std::time::Instant::now();
    let mut r = req("GET", "api.example.test/");
    r.now = parse_rfc3339("2026-02-01T00:00:00Z").expect("t");
    let keys = |cgroup: &str| match p.decide_request(&cg(cgroup), &r.info()) {
        RequestDecision::Allow { limit_keys, .. } => limit_keys,
        RequestDecision::Deny { reason, .. } => panic!("{reason}"),
    };
    // Burst 3 shared by agents/a and agents/b.
    limiter.check(&keys("agents/a"), t0).expect("1");
    limiter.check(&keys("agents/b"), t0).expect("2");
    limiter.check(&keys("agents/a"), t0).expect("3");
    let d = limiter
        .check(&keys("agents/b"), t0)
        .expect_err("parent burst used up");
    assert!(
        d.reason.contains("agents may send 2 requests per second"),
        "{}",
        d.reason
    );
}

#[test]
fn connections_and_dns_need_every_level() {
    let parent = r#"
cgroup = "agents"
[dns]
allow = ["*.example.test"]
[[allow]]
host = "*.example.test"
[[allow]]
host = "git.example.test"
port = 22
tcp = true
rate = { per_minute = 10 }
"#;
    let child_text = r#"
cgroup = "agents/coder"
[[allow]]
host = "api.example.test"
[[allow]]
host = "git.example.test"
port = 22
tcp = true
"#;
    let p = policy(&[("agents.toml", parent), ("coder.toml", child_text)]);
    let coder = cg("agents/coder");
    let dst: std::net::SocketAddr = "192.0.2.1:22".parse().expect("addr");
    let ConnectionDecision::Tcp { rule, limit_keys } =
        p.decide_connection(&coder, dst, Some("git.example.test"), now())
    else {
        panic!("not passed through")
    };
    assert_eq!(rule.file.as_ref(), Path::new("coder.toml"));
    assert_eq!(limit_keys.len(), 1);
    assert_eq!(limit_keys[0].cgroup(), "agents");
    // The child's names are its host rules'; each must be allowed by the parent too.
    assert_eq!(p.dns_allowed(&coder, "API.example.test."), Ok(()));
    assert_eq!(p.dns_allowed(&cg("agents/other"), "x.example.test"), Ok(()));
    assert_eq!(
        resolve(&p, &coder, "x.example.test"),
        Err(
            "agents/coder may not resolve x.example.test; names it may resolve: \
             api.example.test, git.example.test"
                .into()
        )
    );
}

#[test]
fn a_name_the_parent_does_not_list_is_refused_by_the_parent() {
    let parent = r#"
cgroup = "agents"
[dns]
allow = ["pypi.org"]
[[allow]]
host = "*.example.test"
"#;
    let child_text = "cgroup = \"agents/coder\"\n[[allow]]\nhost = \"api.example.test\"\n";
    let quiet = "cgroup = \"agents/quiet\"\n[dns]\nallow = []\n";
    let p = policy(&[
        ("agents.toml", parent),
        ("coder.toml", child_text),
        ("quiet.toml", quiet),
    ]);
    let refusal = p
        .dns_allowed(&cg("agents/coder/x"), "api.example.test")
        .expect_err("the parent lists no such name");
    assert_eq!(
        refusal,
        DnsDenial::NotListed {
            cgroup: cg("agents/coder/x"),
            name: "api.example.test".into(),
            level: Some(cg("agents")),
            allowed: vec![HostPattern::Exact("api.example.test".into())],
        }
    );
    assert_eq!(
        refusal.to_string(),
        "agents/coder/x may not resolve api.example.test (by the policy for agents, which also \
         applies to agents/coder/x); names it may resolve: api.example.test"
    );
    assert_eq!(
        resolve(&p, &cg("agents/quiet"), "pypi.org"),
        Err("agents/quiet may not resolve any name".into())
    );
}

#[test]
fn the_readme_shows_a_real_widening_error() {
    let dir = shipped().join("invalid/widen-method");
    let Err(PolicyError::Invalid(errors)) = Policy::load_dir(&dir) else {
        panic!("widen-method loaded")
    };
    let prefix = format!("{}/", dir.display());
    let shown = errors[0].to_string().replace(&prefix, "");
    let readme = fs::read_to_string(shipped().join("README.md")).expect("README");
    assert!(
        readme.contains(&format!("\n{shown}\n")),
        "README lacks:\n{shown}"
    );
}

#[test]
fn a_level_that_does_not_hand_out_the_secrets_says_so() {
    // Load-time narrowing makes this a defence in depth: check the level's reason directly.
    let p = policy(&[(
        "agents.toml",
        "cgroup = \"agents\"\n[[allow]]\nhost = \"api.example.test\"\n",
    )]);
    let r = req("GET", "api.example.test/x");
    let info = r.info();
    let q = rule::Req::new(
        info.method.as_str(),
        info.path,
        Some(info.headers),
        info.host,
        info.port,
        Some(info.dst_ip),
        info.now,
    );
    let need = [SecretName::new("K").expect("name")];
    let refusal = p.files()[0].refusal(&cg("agents/c"), &q, &need, false);
    assert_eq!(refusal.rule.map(|r| r.rule_ref().index), Some(0));
    assert_eq!(
        refusal.reason,
        "GET api.example.test/x is not allowed for agents/c (by the policy for agents, which \
         also applies to agents/c): that policy does not let the credentials injected for it be \
         used there (K)"
    );
}

#[test]
fn shares_are_the_smallest_of_the_levels_and_default_elsewhere() {
    let parent = format!("{PARENT}\n[shares]\nconnections = 100\nrequests_in_flight = 20\n");
    let coder = "cgroup = \"agents/coder\"\n[shares]\nconnections = 300\nrequests_in_flight = 5\ndns_queries_per_second = 7\nrequests_per_second = 40\n";
    let p = policy(&[("agents.toml", &parent), ("coder.toml", coder)]);
    let cg = |s: &str| CgroupPath::parse(s).expect("cgroup");
    let coder = p.shares(&cg("agents/coder/run-1"));
    assert_eq!(
        coder.get(ShareKind::Connections),
        100,
        "the parent's is smaller"
    );
    assert_eq!(
        coder.get(ShareKind::RequestsInFlight),
        5,
        "the child's is smaller"
    );
    assert_eq!(coder.get(ShareKind::DnsQueriesPerSecond), 7);
    assert_eq!(coder.get(ShareKind::RequestsPerSecond), 40);
    assert_eq!(
        coder.get(ShareKind::PendingHandshakes),
        Shares::DEFAULT.get(ShareKind::PendingHandshakes)
    );
    let other = p.shares(&cg("agents/other"));
    assert_eq!(other.get(ShareKind::Connections), 100);
    assert_eq!(
        other.get(ShareKind::DnsQueriesPerSecond),
        Shares::DEFAULT.get(ShareKind::DnsQueriesPerSecond)
    );
    assert_eq!(p.shares(&cg("elsewhere")), Shares::DEFAULT);
    let shown = p.effective(&cg("agents/coder")).to_string();
    assert!(shown.contains("[shares]"), "{shown}");
    assert!(shown.contains("connections = 100"), "{shown}");
    assert!(shown.contains("requests_in_flight = 5"), "{shown}");
}

const ANY_ADDRESS_PARENT: &str = r#"
cgroup = "agents"
[[allow]]
host = "api.example.test"
inject.headers = { authorization = "Bearer {secret:K}" }
[[allow]]
host = "*.cdn.example.test"
any_address = true
inject.headers = { authorization = "Bearer {secret:K}" }
"#;

/// `any_address = true` lets a credential go to any address whose certificate is valid for the
/// host (issue 13.18); it holds only where every level's rule says it, and a child may not
/// set it where its parent does not.
#[test]
fn any_address_holds_only_where_every_level_says_it() {
    let child_text = "cgroup = \"agents/coder\"\n[[allow]]\nhost = \"a.cdn.example.test\"\n\
                      any_address = true\ninject.headers = { authorization = \"Bearer \
                      {secret:K}\" }\n[[allow]]\nhost = \"b.cdn.example.test\"\n\
                      inject.headers = { authorization = \"Bearer {secret:K}\" }\n";
    let p = policy(&[
        ("agents.toml", ANY_ADDRESS_PARENT),
        ("coder.toml", child_text),
    ]);
    let any_address = |cgroup: &str, target: &str| match p
        .decide_request(&cg(cgroup), &req("GET", target).info())
    {
        RequestDecision::Allow { any_address, .. } => any_address,
        RequestDecision::Deny { reason, .. } => panic!("{cgroup} {target}: {reason}"),
    };
    assert!(
        !any_address("agents", "api.example.test/x"),
        "off by default"
    );
    assert!(any_address("agents", "a.cdn.example.test/x"));
    assert!(any_address("agents/coder", "a.cdn.example.test/x"));
    // The child's rule leaves it out: the parent's does not carry down.
    assert!(!any_address("agents/coder", "b.cdn.example.test/x"));

    // A child may not set it where its parent does not.
    let widening = error(&[
        ("agents.toml", ANY_ADDRESS_PARENT),
        (
            "coder.toml",
            "cgroup = \"agents/coder\"\n[[allow]]\nhost = \"api.example.test\"\n\
             any_address = true\n",
        ),
    ]);
    let shown = widening.to_string();
    assert_eq!(widening.path, Path::new("coder.toml"), "{shown}");
    assert_eq!(
        widening.field.as_deref(),
        Some("allow[0].any_address"),
        "{shown}"
    );
    assert_eq!(widening.line, 4, "{shown}");
    assert!(
        shown.contains(
            "any_address = true goes beyond agents.toml:4 allow[0] (cgroup agents), which sends \
             credentials only to the addresses its names resolve to"
        ),
        "{shown}"
    );
    assert!(
        shown.ends_with("a child policy can only narrow its parent's"),
        "{shown}"
    );
}

#[test]
fn any_address_is_a_bool_and_not_for_tcp_rules() {
    for (text, field, line) in [
        (
            "cgroup = \"a\"\n[[allow]]\nhost = \"x.test\"\nany_address = \"yes\"\n",
            "allow[0].any_address",
            4,
        ),
        (
            "cgroup = \"a\"\n[[allow]]\nhost = \"x.test\"\nport = 22\ntcp = true\n\
             any_address = true\n",
            "allow[0].any_address",
            6,
        ),
    ] {
        let e = error(&[("a.toml", text)]);
        assert_eq!(
            (e.field.as_deref(), e.line),
            (Some(field), line),
            "{text}: {e}"
        );
    }
    // Spelled out as false, it is the default.
    let p = policy(&[(
        "a.toml",
        "cgroup = \"a\"\n[[allow]]\nhost = \"x.test\"\nany_address = false\n",
    )]);
    let RequestDecision::Allow { any_address, .. } =
        p.decide_request(&cg("a"), &req("GET", "x.test/").info())
    else {
        panic!("denied")
    };
    assert!(!any_address);
}
