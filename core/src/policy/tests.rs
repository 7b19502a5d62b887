use std::{
    net::IpAddr,
    path::PathBuf,
    time::{Duration, SystemTime, UNIX_EPOCH},
};

use http::{HeaderMap, HeaderValue, Method};

use super::*;
use crate::time::parse_rfc3339;

mod approve;
mod chain;
mod connection;
mod explain;
mod property;
mod request;

pub(super) fn cg(s: &str) -> CgroupPath {
    CgroupPath::parse(s).expect(s)
}

pub(super) fn policy(files: &[(&str, &str)]) -> Policy {
    try_policy(files).unwrap_or_else(|e| panic!("{e}"))
}

pub(super) fn try_policy(files: &[(&str, &str)]) -> Result<Policy, PolicyError> {
    Policy::from_files(
        files
            .iter()
            .map(|(p, t)| (PathBuf::from(p), t.to_string()))
            .collect(),
    )
}

/// The single error of a policy that must fail, as text.
pub(super) fn error(files: &[(&str, &str)]) -> PolicyFileError {
    match try_policy(files) {
        Ok(_) => panic!("policy loaded but should fail"),
        Err(PolicyError::Invalid(mut errors)) => {
            assert_eq!(errors.len(), 1, "{errors:?}");
            errors.remove(0)
        }
        Err(e) => panic!("unexpected error {e}"),
    }
}

/// 2026-06-01T00:00:00Z: the time requests in tests are made at.
pub(super) fn now() -> SystemTime {
    UNIX_EPOCH + Duration::from_secs(1_780_272_000)
}

/// A request to `target` (`host[:port]/path`, port 443 by default). The destination address
/// is the host when it is an address, else 192.0.2.1.
pub(super) fn req(method: &str, target: &str) -> OwnedRequest {
    let (authority, path) = match target.find('/') {
        Some(i) => (&target[..i], &target[i..]),
        None => (target, "/"),
    };
    let (host, port) = if let Some(rest) = authority.strip_prefix('[') {
        let (host, rest) = rest.split_once(']').expect("closing bracket");
        (
            host,
            rest.strip_prefix(':')
                .map_or(443, |p| p.parse().expect("port")),
        )
    } else {
        match authority.rsplit_once(':') {
            Some((h, p)) => (h, p.parse().expect("port")),
            None => (authority, 443),
        }
    };
    let dst_ip = host
        .parse::<IpAddr>()
        .unwrap_or(IpAddr::from([192, 0, 2, 1]));
    OwnedRequest {
        method: Method::from_bytes(method.as_bytes()).expect("method"),
        path: path.to_string(),
        headers: HeaderMap::new(),
        host: host.to_string(),
        port,
        dst_ip,
        tls: true,
        now: now(),
    }
}

/// The same request with a header added.
pub(super) fn with_header(mut r: OwnedRequest, name: &'static str, value: &str) -> OwnedRequest {
    r.headers
        .append(name, HeaderValue::from_str(value).expect("value"));
    r
}

/// The decision for a request from `cgroup`: `Ok(rule ref text)` or `Err(reason)`.
pub(super) fn ask(p: &Policy, cgroup: &str, r: &OwnedRequest) -> Result<String, String> {
    match p.decide_request(&cg(cgroup), &r.info()) {
        RequestDecision::Allow { rule, .. } => Ok(rule.to_string()),
        RequestDecision::Deny { reason, .. } => Err(reason),
    }
}

/// [`Policy::dns_allowed`], with the refusal as the agent reads it.
pub(super) fn resolve(p: &Policy, cgroup: &CgroupPath, name: &str) -> Result<(), String> {
    p.dns_allowed(cgroup, name).map_err(|e| e.to_string())
}

/// `GET /` to `host` on `port`: a request no method, path or header condition refuses, so its
/// decision is about the destination alone. `host` is sent as given (any case, a trailing dot,
/// IPv6 with or without brackets); the destination address is `host` when it is one.
fn to(host: &str, port: u16) -> OwnedRequest {
    let mut r = req("GET", "x.test/");
    r.host = host.to_string();
    r.port = port;
    if let Some(ip) = normalize_host(host).and_then(|h| h.parse::<IpAddr>().ok()) {
        r.dst_ip = ip;
    }
    r
}

/// The decision for `GET /` to `host:port` from `cgroup`.
fn decide_to<'p>(p: &'p Policy, cgroup: &str, host: &str, port: u16) -> RequestDecision<'p> {
    p.decide_request(&cg(cgroup), &to(host, port).info())
}

fn allowed_rule(d: &RequestDecision<'_>) -> usize {
    match d {
        RequestDecision::Allow { rule, .. } => rule.index,
        RequestDecision::Deny { reason, .. } => panic!("denied: {reason}"),
    }
}

fn denied(d: &RequestDecision<'_>) -> String {
    match d {
        RequestDecision::Deny { reason, .. } => reason.clone(),
        RequestDecision::Allow { rule, .. } => panic!("allowed by {rule}"),
    }
}

const DEMO: &str = r#"
cgroup = "agents/demo"
[[allow]]
host = "api.example.test"
port = 443
inject.headers = { authorization = "Bearer {secret:EXAMPLE_KEY}" }
"#;

#[test]
fn demo_form_allows_its_host_and_injects() {
    let p = policy(&[("demo.toml", DEMO)]);
    let d = decide_to(&p, "agents/demo", "api.example.test", 443);
    let RequestDecision::Allow {
        rule,
        inject,
        plain_http,
        limit_keys,
        ..
    } = d
    else {
        panic!("denied: {d:?}")
    };
    assert_eq!(rule.to_string(), "demo.toml:4 allow[0]");
    assert!(!plain_http);
    assert!(limit_keys.is_empty());
    assert_eq!(inject.header_names().collect::<Vec<_>>(), ["authorization"]);
    assert_eq!(
        inject.headers().headers()[0].1.as_str(),
        "Bearer {secret:EXAMPLE_KEY}"
    );
    let names: Vec<&str> = p
        .secret_names()
        .into_iter()
        .map(SecretName::as_str)
        .collect();
    assert_eq!(names, ["EXAMPLE_KEY"]);
}

#[test]
fn default_deny_with_reasons_an_agent_can_read() {
    let p = policy(&[("demo.toml", DEMO)]);
    let demo = "agents/demo";
    assert_eq!(
        denied(&decide_to(&p, demo, "api.foo.test", 443)),
        "no rule allows api.foo.test:443 for cgroup agents/demo"
    );
    assert_eq!(
        denied(&decide_to(&p, demo, "api.example.test", 8443)),
        "no rule allows api.example.test:8443 for cgroup agents/demo \
         (allowed port for this host: 443)"
    );
    let other = decide_to(&p, "agents/other", "api.example.test", 443);
    assert!(denied(&other).starts_with("no policy covers cgroup agents/other"));
    assert!(matches!(other, RequestDecision::Deny { file: None, .. }));
    assert!(matches!(
        decide_to(&p, demo, "x.test", 443),
        RequestDecision::Deny { file: Some(f), .. } if f == Path::new("demo.toml")
    ));
    assert!(denied(&decide_to(&p, demo, "", 443)).contains("not a valid host"));
    assert!(!decide_to(&Policy::empty(), demo, "api.example.test", 443).is_allow());
}

#[test]
fn loopback_is_not_special() {
    let p = policy(&[("demo.toml", DEMO)]);
    for host in ["127.0.0.1", "localhost", "::1", "[::1]"] {
        assert!(
            !decide_to(&p, "agents/demo", host, 443).is_allow(),
            "{host}"
        );
    }
    let p = policy(&[(
        "l.toml",
        "cgroup = \"agents/demo\"\n[[allow]]\nhost = \"127.0.0.2\"\nport = 8443\n[[allow]]\nhost = \"[::1]\"\n",
    )]);
    let demo = "agents/demo";
    assert_eq!(allowed_rule(&decide_to(&p, demo, "127.0.0.2", 8443)), 0);
    assert_eq!(allowed_rule(&decide_to(&p, demo, "::1", 443)), 1);
    assert_eq!(allowed_rule(&decide_to(&p, demo, "[0::1]", 443)), 1);
    assert!(!decide_to(&p, demo, "127.0.0.3", 8443).is_allow());
}

#[test]
fn subtree_and_closest_ancestor() {
    // The child narrows the parent: same host, no injection.
    let child = r#"
cgroup = "agents/demo/tool"
[[allow]]
host = "api.example.test"
"#;
    let p = policy(&[("demo.toml", DEMO), ("tool.toml", child)]);
    // Below agents/demo: the demo file applies.
    let d = decide_to(&p, "agents/demo/x/y", "api.example.test", 443);
    assert_eq!(allowed_rule(&d), 0);
    assert!(matches!(d, RequestDecision::Allow { inject, .. } if !inject.is_empty()));
    // agents/demo/tool and below: its own file is the closest (and says what is injected:
    // nothing), and the demo file must allow it too.
    let tool = "agents/demo/tool/sub";
    let d = decide_to(&p, tool, "api.example.test", 443);
    assert!(matches!(d, RequestDecision::Allow { rule, inject, .. }
        if rule.file.as_ref() == Path::new("tool.toml") && inject.is_empty()));
    assert!(!decide_to(&p, tool, "tool.example.test", 443).is_allow());
    // A sibling with a common name prefix is not below agents/demo.
    assert!(!decide_to(&p, "agents/demox", "api.example.test", 443).is_allow());
    // Ancestors are not covered by a child's file.
    assert!(!decide_to(&p, "agents", "api.example.test", 443).is_allow());
    assert_eq!(
        p.file_for(&cg("agents/demo/tool")).map(|f| f.path()),
        Some(Path::new("tool.toml"))
    );
    let chain: Vec<&Path> = p
        .chain(&cg("agents/demo/tool/x"))
        .iter()
        .map(|f| f.path())
        .collect();
    assert_eq!(chain, [Path::new("tool.toml"), Path::new("demo.toml")]);
    assert!(p.chain(&cg("other")).is_empty());
}

#[test]
fn host_matching_and_precedence() {
    let text = r#"
cgroup = "a"
[[allow]]
host = "*.example.test"
[[allow]]
host = "API.example.test"
inject.headers = { x-which = "exact" }
[[allow]]
host = "*.b.example.test"
[[allow]]
host = "*.example.test"
port = 80
plain_http = true
"#;
    let p = policy(&[("a.toml", text)]);
    let rule_for = |host, port| allowed_rule(&decide_to(&p, "a", host, port));
    assert_eq!(rule_for("api.example.test", 443), 1);
    assert_eq!(rule_for("Api.Example.Test.", 443), 1);
    assert_eq!(rule_for("other.example.test", 443), 0);
    assert_eq!(rule_for("x.b.example.test", 443), 2);
    assert_eq!(rule_for("x.y.b.example.test", 443), 2);
    // b.example.test itself is one label below example.test.
    assert_eq!(rule_for("b.example.test", 443), 0);
    // A longer suffix on another port falls back to the shorter one on this port.
    assert_eq!(rule_for("x.b.example.test", 80), 3);
    assert!(matches!(
        decide_to(&p, "a", "x.example.test", 80),
        RequestDecision::Allow {
            plain_http: true,
            ..
        }
    ));
    for (host, port) in [
        ("example.test", 443),
        ("notexample.test", 443),
        ("example.test.evil", 443),
        ("api.example.test", 8080),
    ] {
        assert!(!decide_to(&p, "a", host, port).is_allow(), "{host}:{port}");
    }
}

#[test]
fn fields_have_defaults_and_refuse_unknowns() {
    let p = policy(&[("m.toml", "cgroup = \"m\"\n[[allow]]\nhost = \"h.test\"\n")]);
    let rule = &p.files()[0].rules()[0];
    assert_eq!(rule.port(), DEFAULT_PORT);
    assert!(!rule.plain_http());
    assert!(rule.inject().is_empty());
    assert_eq!(
        rule.host(),
        &Destination::Host(HostPattern::Exact("h.test".into()))
    );

    // A file with no rules is valid and denies everything.
    let p = policy(&[("empty.toml", "cgroup = \"m\"\n")]);
    assert!(!decide_to(&p, "m", "h.test", 443).is_allow());

    let e = error(&[("u.toml", "cgroup = \"m\"\nverbose = true\n")]);
    assert_eq!((e.line, e.field.as_deref()), (2, Some("verbose")));
    assert!(e.message.contains("unknown field `verbose`"), "{e}");

    let e = error(&[(
        "u.toml",
        "cgroup = \"m\"\n[[allow]]\nhost = \"h.test\"\ninject.header = { a = \"b\" }\n",
    )]);
    assert_eq!(e.line, 4, "{e}");
    assert!(e.to_string().contains("unknown field `header`"), "{e}");

    let e = error(&[(
        "m.toml",
        "cgroup = \"m\"\n[[allow]]\nhost = \"h.test\"\n[[allow]]\nport = 80\n",
    )]);
    assert_eq!(
        e.to_string(),
        "m.toml:4:1: allow[1].host: a rule needs a destination: `host` (a name such as \
         \"api.example.test\") or `ip` (an address or range such as \"192.0.2.0/24\")"
    );
}

#[test]
fn errors_name_file_line_column_and_field() {
    let text = "cgroup = \"agents/demo\"\n\n[[allow]]\nhost = \"api.example.test\"\nport = 0\n";
    let e = error(&[("dir/p.toml", text)]);
    assert_eq!(
        e.to_string(),
        "dir/p.toml:5:8: allow[0].port: port 0 is not a destination port"
    );

    let text =
        "cgroup = \"x\"\n[[allow]]\nhost = \"h.test\"\ninject.headers = { Host = \"evil\" }\n";
    let e = error(&[("p.toml", text)]);
    assert_eq!(
        (e.line, e.field.as_deref()),
        (4, Some("allow[0].inject.headers.Host"))
    );
    assert!(e.message.contains("manages this header"), "{e}");

    let text = "cgroup = \"x\"\n[[allow]]\nhost = \"h.test\"\n[allow.inject.headers]\nAuthorization = \"a\"\nauthorization = \"b\"\n";
    let e = error(&[("p.toml", text)]);
    assert!(e.message.contains("set more than once"), "{e}");
    assert_eq!(e.line, 6, "{e}");
}

#[test]
fn all_problems_in_a_file_are_reported() {
    let text = r#"cgroup = "x"
[[allow]]
host = "*"
[[allow]]
host = "ok.test"
inject.headers = { a = "{nope}" }
[[allow]]
host = "dup.test"
[[allow]]
host = "DUP.test"
"#;
    let Err(PolicyError::Invalid(errors)) = try_policy(&[("p.toml", text)]) else {
        panic!("should fail")
    };
    let summary: Vec<(usize, Option<&str>)> = errors
        .iter()
        .map(|e| (e.line, e.field.as_deref()))
        .collect();
    assert_eq!(
        summary,
        [
            (3, Some("allow[0].host")),
            (6, Some("allow[1].inject.headers.a")),
            (10, Some("allow[3].host")),
        ]
    );
    assert!(errors[2].message.contains("already covered by allow[2]"));
    let shown = PolicyError::Invalid(errors).to_string();
    assert!(
        shown.starts_with("3 problems in policy files:\n  p.toml:3:8: "),
        "{shown}"
    );
}

#[test]
fn two_files_for_one_cgroup_is_an_error() {
    let other = "# the same subtree\ncgroup = \"/agents/demo/\"\n";
    let e = error(&[("b.toml", other), ("a.toml", DEMO)]);
    // Files are taken in path order, so the second by name is the one at fault.
    assert_eq!(e.path, Path::new("b.toml"));
    assert_eq!((e.line, e.field.as_deref()), (2, Some("cgroup")));
    assert!(e.message.contains("already governed by a.toml"), "{e}");
}

#[test]
fn bad_cgroup_is_located() {
    let e = error(&[("c.toml", "\ncgroup = \"/\"\n")]);
    assert_eq!(
        (e.line, e.column, e.field.as_deref()),
        (2, 10, Some("cgroup"))
    );
    assert!(e.message.contains("root cgroup"), "{e}");
}

#[test]
fn load_dir_reads_toml_files_only() {
    let dir = tempfile::tempdir().expect("tempdir");
    fs::write(dir.path().join("demo.toml"), DEMO).expect("write");
    fs::write(dir.path().join("notes.md"), "not a policy").expect("write");
    fs::write(dir.path().join(".#demo.toml"), "editor lock file").expect("write");
    fs::write(dir.path().join("demo.toml~"), "backup").expect("write");
    fs::create_dir(dir.path().join("invalid")).expect("mkdir");
    fs::write(dir.path().join("invalid/x.toml"), "broken = ").expect("write");
    let p = Policy::load_dir(dir.path()).expect("loads");
    assert_eq!(p.files().len(), 1);
    assert!(decide_to(&p, "agents/demo", "api.example.test", 443).is_allow());

    fs::write(dir.path().join("bad.toml"), b"cgroup = \"x\"\n\xff\n").expect("write");
    let e = Policy::load_dir(dir.path())
        .expect_err("not utf-8")
        .to_string();
    assert!(
        e.ends_with("bad.toml:2:1: the file is not valid UTF-8"),
        "{e}"
    );

    let missing = dir.path().join("nope");
    let e = Policy::load_dir(&missing).expect_err("missing dir");
    assert!(matches!(e, PolicyError::ReadDir { .. }), "{e}");

    let empty = tempfile::tempdir().expect("tempdir");
    assert!(
        Policy::load_dir(empty.path())
            .expect("empty dir")
            .files()
            .is_empty()
    );
}

/// The shipped policies directory.
pub(super) fn shipped() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../policies")
}

#[test]
fn shipped_policies_load() {
    let p = Policy::load_dir(&shipped()).unwrap_or_else(|e| panic!("{e}"));
    assert!(p.files().len() >= 2);
    assert!(decide_to(&p, "agents/demo", "api.example.test", 443).is_allow());
    assert!(!decide_to(&p, "agents/demo", "api.openai.com", 443).is_allow());
}

/// The `# expect: line N, field F` of a fixture (F is `(none)` for errors outside any field).
fn expectation(text: &str) -> Option<(usize, Option<String>)> {
    let expect = text.lines().next()?.strip_prefix("# expect: line ")?;
    let (line, field) = expect.split_once(", field ").expect("expect format");
    Some((
        line.parse().expect("line number"),
        (field != "(none)").then(|| field.to_string()),
    ))
}

fn assert_fails_as_expected(
    what: &Path,
    result: Result<Policy, PolicyError>,
    file: &Path,
    line: usize,
    field: Option<&str>,
) {
    let Err(PolicyError::Invalid(errors)) = result else {
        panic!("{} loaded but is in policies/invalid", what.display());
    };
    let e = &errors[0];
    let shown = e.to_string();
    assert_eq!(e.path, file, "{shown}");
    assert!(
        shown.starts_with(&format!("{}:{line}:", file.display())),
        "{shown}"
    );
    assert_eq!(e.field.as_deref(), field, "{shown}");
    if let Some(field) = field {
        assert!(shown.contains(field), "{shown}");
    }
    assert!(
        errors.iter().all(|e| e.path == file),
        "only the file with `# expect:` may be at fault: {errors:?}"
    );
}

/// Each `policies/invalid/*.toml` fails alone; each `policies/invalid/<case>/` directory is
/// loaded as one policy directory (a parent and a child, say), and the one file in it whose
/// first line is `# expect: ...` is the one at fault.
#[test]
fn shipped_invalid_fixtures_fail_with_file_line_and_field() {
    let dir = shipped().join("invalid");
    let mut count = 0;
    let mut dirs = 0;
    for entry in fs::read_dir(&dir).expect("policies/invalid") {
        let path = entry.expect("entry").path();
        if path.is_dir() {
            dirs += 1;
            count += 1;
            let mut expected = None;
            for file in fs::read_dir(&path).expect("fixture dir") {
                let file = file.expect("entry").path();
                let text = fs::read_to_string(&file).expect("read");
                if let Some(e) = expectation(&text) {
                    assert!(
                        expected.is_none(),
                        "{}: two `# expect:` files",
                        path.display()
                    );
                    expected = Some((file, e));
                }
            }
            let (file, (line, field)) = expected
                .unwrap_or_else(|| panic!("{}: no file has a `# expect:` line", path.display()));
            assert_fails_as_expected(
                &path,
                Policy::load_dir(&path),
                &file,
                line,
                field.as_deref(),
            );
            continue;
        }
        if path.extension().is_none_or(|e| e != "toml") {
            continue;
        }
        count += 1;
        let text = fs::read_to_string(&path).expect("read");
        let (line, field) = expectation(&text)
            .unwrap_or_else(|| panic!("{}: no `# expect:` first line", path.display()));
        let result = Policy::from_files(vec![(path.clone(), text.clone())]);
        assert_fails_as_expected(&path, result, &path, line, field.as_deref());
    }
    assert!(count >= 20, "only {count} invalid fixtures");
    assert!(dirs >= 6, "only {dirs} multi-file fixtures");
}

#[test]
fn the_closest_rule_may_set_how_long_a_response_pauses() {
    let text = |idle: &str| {
        format!(
            "cgroup = \"agents/demo\"\n[[allow]]\nhost = \"api.example.test\"\nidle_timeout = \"{idle}\"\n"
        )
    };
    let p = policy(&[("demo.toml", text("30m").as_str())]);
    let d = decide_to(&p, "agents/demo", "api.example.test", 443);
    assert!(
        matches!(d, RequestDecision::Allow { idle_timeout, .. } if idle_timeout == Some(Duration::from_secs(1800))),
        "{d:?}"
    );
    let p = policy(&[("demo.toml", DEMO)]);
    let d = decide_to(&p, "agents/demo", "api.example.test", 443);
    assert!(
        matches!(
            d,
            RequestDecision::Allow {
                idle_timeout: None,
                ..
            }
        ),
        "{d:?}"
    );
    for bad in ["0s", "2d", "soon"] {
        let dir = tempfile::tempdir().expect("tempdir");
        std::fs::write(dir.path().join("demo.toml"), text(bad)).expect("write");
        let err = Policy::load_dir(dir.path()).expect_err(bad).to_string();
        assert!(err.contains("idle_timeout"), "{bad}: {err}");
    }
}
