//! `decide_connection` and `dns_allowed`.

use std::net::SocketAddr;

use super::*;

const CONN: &str = r#"
cgroup = "a"

[[allow]]
host = "*.example.test"

[[allow]]
host = "pinned.example.test"
tcp = true

[[allow]]
host = "git.example.test"
port = 22
tcp = true

[[allow]]
ip = "192.0.2.0/24"
port = 22
tcp = true

[[allow]]
ip = "2001:db8::/32"
port = 5432
tcp = true

[[allow]]
host = "plain.example.test"
port = 80

[[allow]]
host = "old.example.test"
port = 8443
not_after = "2020-01-01T00:00:00Z"
"#;

fn sock(s: &str) -> SocketAddr {
    s.parse().expect(s)
}

fn kind(p: &Policy, dst: &str, name: Option<&str>) -> String {
    match p.decide_connection(&cg("a"), sock(dst), name, now()) {
        ConnectionDecision::Http => "http".into(),
        ConnectionDecision::Tcp { rule, .. } => format!("tcp {}", rule.index),
        ConnectionDecision::Deny { reason, .. } => format!("deny: {reason}"),
    }
}

#[test]
fn connections_are_inspected_passed_through_or_refused() {
    let p = policy(&[("c.toml", CONN)]);
    assert_eq!(
        kind(&p, "198.51.100.1:443", Some("api.example.test")),
        "http"
    );
    // A more specific tcp rule wins over the wildcard.
    assert_eq!(
        kind(&p, "198.51.100.1:443", Some("pinned.example.test")),
        "tcp 1"
    );
    assert_eq!(
        kind(&p, "198.51.100.1:22", Some("git.example.test")),
        "tcp 2"
    );
    // ssh by address: no name.
    assert_eq!(kind(&p, "192.0.2.9:22", None), "tcp 3");
    assert_eq!(kind(&p, "[::ffff:192.0.2.9]:22", None), "tcp 3");
    assert_eq!(kind(&p, "[2001:db8::5]:5432", None), "tcp 4");
    // Without a name, HTTP host rules on the port may still match the request's Host.
    assert_eq!(kind(&p, "198.51.100.1:80", None), "http");
    assert_eq!(kind(&p, "198.51.100.1:443", None), "http");
    assert_eq!(
        kind(&p, "198.51.100.1:22", None),
        "deny: no rule allows 198.51.100.1:22 for cgroup a"
    );
    assert_eq!(
        kind(&p, "198.51.100.1:22", Some("api.example.test")),
        "deny: no rule allows api.example.test:22 for cgroup a (allowed port for this host: 443)"
    );
    assert_eq!(
        kind(&p, "198.51.100.1:8443", Some("old.example.test")),
        "deny: the rule allowing old.example.test:8443 for a expired at 2020-01-01T00:00:00Z; \
         ask the operator to renew it"
    );
    // An expired rule is no reason to let an unnamed connection in either.
    assert!(kind(&p, "198.51.100.1:8443", None).starts_with("deny"));
    assert_eq!(
        kind(&p, "198.51.100.1:443", Some("bad name!")),
        "deny: the server name \"bad name!\" is not a valid host name"
    );
    assert!(matches!(
        p.decide_connection(&cg("b"), sock("192.0.2.1:22"), None, now()),
        ConnectionDecision::Deny { file: None, .. }
    ));
}

#[test]
fn a_child_cannot_pass_through_what_its_parent_inspects() {
    // The parent inspects api.example.test (more specific than its tcp wildcard); a child that
    // passes the wildcard through is refused for that host at run time.
    let parent = r#"
cgroup = "agents"
[[allow]]
host = "*.example.test"
tcp = true
[[allow]]
host = "api.example.test"
"#;
    let child = "cgroup = \"agents/c\"\n[[allow]]\nhost = \"*.example.test\"\ntcp = true\n";
    let p = policy(&[("agents.toml", parent), ("c.toml", child)]);
    let d = p.decide_connection(
        &cg("agents/c"),
        sock("198.51.100.1:443"),
        Some("api.example.test"),
        now(),
    );
    let ConnectionDecision::Deny { reason, file } = d else {
        panic!("passed through: {d:?}")
    };
    assert_eq!(file, Some(Path::new("agents.toml")));
    assert_eq!(
        reason,
        "api.example.test:443 may not be passed through unread for agents/c (by the policy for \
         agents, which also applies to agents/c)"
    );
    assert!(matches!(
        p.decide_connection(
            &cg("agents/c"),
            sock("198.51.100.1:443"),
            Some("x.example.test"),
            now()
        ),
        ConnectionDecision::Tcp { .. }
    ));
}

#[test]
fn dns_names_explicit_or_from_host_rules() {
    let p = policy(&[
        ("c.toml", CONN),
        (
            "d.toml",
            "cgroup = \"d\"\n[dns]\nallow = [\"api.example.test\", \"*.pypi.org\"]\n",
        ),
        ("e.toml", "cgroup = \"e\"\n[dns]\nallow = []\n"),
    ]);
    let a = cg("a");
    // Derived from host rules (IP literals and addresses are not names).
    assert_eq!(p.dns_allowed(&a, "x.example.test"), Ok(()));
    assert_eq!(p.dns_allowed(&a, "git.example.test"), Ok(()));
    assert!(p.dns_allowed(&a, "example.test").is_err());
    assert_eq!(p.files()[0].dns().patterns().len(), 5);
    assert!(!p.files()[0].dns().is_explicit());

    let d = cg("d/sub");
    assert_eq!(p.dns_allowed(&d, "api.example.test"), Ok(()));
    assert_eq!(p.dns_allowed(&d, "files.pypi.org"), Ok(()));
    assert_eq!(
        resolve(&p, &d, "evil.test"),
        Err(
            "d/sub may not resolve evil.test; names it may resolve: api.example.test, *.pypi.org"
                .into()
        )
    );
    assert_eq!(
        resolve(&p, &cg("e"), "api.example.test"),
        Err("e may not resolve any name".into())
    );
    assert_eq!(
        resolve(&p, &cg("zzz"), "api.example.test"),
        Err("no policy covers cgroup zzz, so no name may be resolved".into())
    );
    // At most eight names are listed.
    let many: Vec<String> = (0..10).map(|i| format!("\"n{i}.test\"")).collect();
    let text = format!("cgroup = \"m\"\n[dns]\nallow = [{}]\n", many.join(", "));
    let m = policy(&[("m.toml", &text)]);
    assert_eq!(
        resolve(&m, &cg("m"), "x.test"),
        Err(
            "m may not resolve x.test; names it may resolve: n0.test, n1.test, n2.test, \
             n3.test, n4.test, n5.test, n6.test, n7.test, ..."
                .into()
        )
    );
    for bad in ["", "*.example.test", "a b.test", "192.0.2.1", "::1"] {
        assert!(
            resolve(&p, &d, bad)
                .expect_err(bad)
                .contains("is not a valid host name"),
            "{bad}"
        );
    }
}

#[test]
fn dns_entries_are_validated() {
    let e = error(&[(
        "d.toml",
        "cgroup = \"d\"\n[dns]\nallow = [\"ok.test\", \"192.0.2.1\"]\n",
    )]);
    assert_eq!(
        (e.line, e.field.as_deref()),
        (3, Some("dns.allow[1]")),
        "{e}"
    );
    assert!(e.message.contains("is an address"), "{e}");
    let e = error(&[("d.toml", "cgroup = \"d\"\n[dns]\nallow = [\"*\"]\n")]);
    assert_eq!(e.field.as_deref(), Some("dns.allow[0]"), "{e}");
    let e = error(&[(
        "d.toml",
        "cgroup = \"d\"\n[dns]\nallow = [\"a.test\"]\nnames = []\n",
    )]);
    assert_eq!(e.field.as_deref(), Some("dns.names"), "{e}");
}
