//! Approval at run time: rules that ask, `on_unknown = "ask"`, standing approvals, and files of
//! decisions brokerd wrote.

use super::*;

fn policy(files: &[(&str, &str)]) -> Policy {
    Policy::from_files(
        files
            .iter()
            .map(|(p, t)| (PathBuf::from(p), t.to_string()))
            .collect(),
    )
    .expect("policy loads")
}

/// `Some(asking rule)` for an allowed request, `Err(askable)` for a denied one.
fn verdict(p: &Policy, cgroup: &str, r: &OwnedRequest) -> Result<Option<String>, bool> {
    match p.decide_request(&cg(cgroup), &r.info()) {
        RequestDecision::Allow { ask, .. } => Ok(ask.map(ToString::to_string)),
        RequestDecision::Deny { askable, .. } => Err(askable),
    }
}

const ASKS: &str = r#"
cgroup = "agents"
on_unknown = "ask"

[[allow]]
host = "api.example.test"
methods = ["GET"]

[[allow]]
host = "api.example.test"
methods = ["POST"]
approve = "ask"
"#;

#[test]
fn a_rule_that_asks_holds_its_requests_and_others_go() {
    let p = policy(&[("agents.toml", ASKS)]);
    assert_eq!(
        verdict(&p, "agents/a", &req("GET", "api.example.test/v1")),
        Ok(None)
    );
    let asked = verdict(&p, "agents/a", &req("POST", "api.example.test/v1"))
        .expect("allowed after asking")
        .expect("asks");
    assert!(asked.contains("agents.toml"), "{asked}");
}

#[test]
fn unknown_destinations_are_askable_only_where_every_level_says_so() {
    let p = policy(&[("agents.toml", ASKS)]);
    assert_eq!(
        verdict(&p, "agents/a", &req("GET", "other.example.test/")),
        Err(true)
    );
    // A child that asks under a parent that does not: denied, never asked.
    let strict = "cgroup = \"agents\"\n[[allow]]\nhost = \"api.example.test\"\n";
    let child =
        "cgroup = \"agents/coder\"\non_unknown = \"ask\"\n[[allow]]\nhost = \"api.example.test\"\n";
    let p = policy(&[("agents.toml", strict), ("coder.toml", child)]);
    assert_eq!(
        verdict(&p, "agents/coder", &req("GET", "other.example.test/")),
        Err(false)
    );
    // The default is deny.
    let p = policy(&[("agents.toml", strict)]);
    assert_eq!(
        verdict(&p, "agents/a", &req("GET", "other.example.test/")),
        Err(false)
    );
    // A child that denies what its asking parent would ask about: the child's rules do not
    // cover it and the child does not ask, so it is denied.
    let p = policy(&[
        ("agents.toml", ASKS),
        (
            "coder.toml",
            "cgroup = \"agents/coder\"\n[[allow]]\nhost = \"api.example.test\"\nmethods = [\"GET\"]\n",
        ),
    ]);
    assert_eq!(
        verdict(&p, "agents/coder", &req("GET", "other.example.test/")),
        Err(false)
    );
}

#[test]
fn a_parent_rule_that_asks_asks_for_its_children() {
    let child = "cgroup = \"agents/coder\"\n[[allow]]\nhost = \"api.example.test\"\n\
                 methods = [\"POST\"]\n[[allow]]\nhost = \"api.example.test\"\nmethods = [\"GET\"]\n";
    let p = policy(&[("agents.toml", ASKS), ("coder.toml", child)]);
    let asked = verdict(&p, "agents/coder", &req("POST", "api.example.test/x"))
        .expect("allowed")
        .expect("the parent's rule asks");
    assert!(asked.contains("agents.toml"), "{asked}");
    assert_eq!(
        verdict(&p, "agents/coder", &req("GET", "api.example.test/x")),
        Ok(None)
    );
}

#[test]
fn an_approvals_file_adds_rules_first_and_lifts_asks() {
    let approvals = r#"
cgroup = "agents"
approvals = true

[[allow]]
host = "other.example.test"
methods = ["GET"]

[[approved]]
host = "api.example.test"
port = 443
methods = ["POST"]
"#;
    let p = policy(&[("agents.toml", ASKS), ("zz.approvals.toml", approvals)]);
    assert_eq!(
        verdict(&p, "agents/a", &req("POST", "api.example.test/x")),
        Ok(None),
        "the standing approval lifts the ask"
    );
    let rule = ask(&p, "agents/a", &req("GET", "other.example.test/")).expect("allowed");
    assert!(rule.contains("zz.approvals.toml"), "{rule}");
    // Only what was approved: another method still asks.
    assert_eq!(
        verdict(&p, "agents/a", &req("PUT", "other.example.test/")),
        Err(true)
    );
    // Its names resolve.
    resolve(&p, &cg("agents/a"), "other.example.test").expect("resolves");
}

#[test]
fn an_approvals_file_must_join_a_policy_file_and_still_narrow() {
    let orphan = "cgroup = \"agents/x\"\napprovals = true\n[[allow]]\nhost = \"a.example.test\"\n";
    let err = Policy::from_files(vec![
        (PathBuf::from("agents.toml"), ASKS.to_string()),
        (PathBuf::from("x.toml"), orphan.to_string()),
    ])
    .expect_err("orphan")
    .to_string();
    assert!(err.contains("no policy file governs agents/x"), "{err}");

    // A rule written for a child must be covered by the parent.
    let strict = "cgroup = \"agents\"\n[[allow]]\nhost = \"api.example.test\"\n";
    let child = "cgroup = \"agents/coder\"\n[[allow]]\nhost = \"api.example.test\"\n";
    let wide =
        "cgroup = \"agents/coder\"\napprovals = true\n[[allow]]\nhost = \"evil.example.test\"\n";
    let err = Policy::from_files(vec![
        (PathBuf::from("agents.toml"), strict.to_string()),
        (PathBuf::from("coder.toml"), child.to_string()),
        (PathBuf::from("coder.approvals.toml"), wide.to_string()),
    ])
    .expect_err("widening")
    .to_string();
    assert!(err.contains("evil.example.test"), "{err}");
}

#[test]
fn bad_values_are_located() {
    let err = Policy::from_files(vec![(
        PathBuf::from("a.toml"),
        "cgroup = \"a\"\non_unknown = \"maybe\"\n[[allow]]\nhost = \"x.test\"\napprove = \"later\"\n"
            .to_string(),
    )])
    .expect_err("bad")
    .to_string();
    assert!(err.contains("on_unknown must be"), "{err}");
    assert!(err.contains("approve must be"), "{err}");
}

#[test]
fn on_unknown_ask_lets_any_name_resolve_unless_dns_is_listed() {
    let p = policy(&[("agents.toml", ASKS)]);
    resolve(&p, &cg("agents/a"), "anything.example.test").expect("resolves");
    let listed = format!("{ASKS}\n[dns]\nallow = [\"api.example.test\"]\n");
    let p = policy(&[("agents.toml", &listed)]);
    resolve(&p, &cg("agents/a"), "anything.example.test").expect_err("only listed names");
}

#[test]
fn explain_says_when_a_request_would_wait() {
    let p = policy(&[("agents.toml", ASKS)]);
    let now = SystemTime::now();
    let e = p
        .explain(&cg("agents/a"), "POST", "https://api.example.test/x", now)
        .expect("explains");
    assert!(e.allowed);
    assert!(e.notes.iter().any(|n| n.contains("approval")), "{e}");
    let e = p
        .explain(&cg("agents/a"), "GET", "https://other.example.test/", now)
        .expect("explains");
    assert!(!e.allowed);
    assert!(e.notes.iter().any(|n| n.contains("on_unknown")), "{e}");
}
