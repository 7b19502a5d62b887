//! `explain`, `effective`, and the shipped example hierarchy.

use super::*;

fn shipped_policy() -> Policy {
    Policy::load_dir(&shipped()).unwrap_or_else(|e| panic!("{e}"))
}

#[test]
fn explain_says_which_rule_and_level_decided() {
    let p = shipped_policy();
    let tests = cg("agents/coder/tests");
    let e = p
        .explain(
            &cg("agents/coder"),
            "post",
            "https://api.openai.com/v1/chat/completions",
            now(),
        )
        .expect("explains");
    assert!(e.allowed);
    assert_eq!(e.method, "POST");
    let levels: Vec<String> = e.levels.iter().map(|(_, c)| c.to_string()).collect();
    assert_eq!(levels, ["agents/coder", "agents"]);
    assert_eq!(e.injects, ["header authorization"]);
    assert_eq!(e.limits.len(), 2);
    let shown = e.to_string();
    assert!(
        shown.starts_with(
            "allow POST https://api.openai.com/v1/chat/completions for agents/coder\n  rule: "
        ),
        "{shown}"
    );
    assert!(shown.contains("coder.toml:"), "{shown}");
    assert!(
        shown.contains("(openai-chat) (cgroup agents/coder)"),
        "{shown}"
    );
    assert!(shown.contains("  within: "), "{shown}");
    assert!(shown.contains("(openai) (cgroup agents)"), "{shown}");
    assert!(
        shown.contains("limit: rate = { per_second = 5, burst = 10 }, budget = { requests_per_day = 5000, tokens_per_day = 1000000 } (counted for all of agents/coder"),
        "{shown}"
    );
    assert!(
        !shown.contains("OPENAI_KEY"),
        "explain shows slots, not templates: {shown}"
    );

    // The sub-agent's rule needs a header an explanation cannot know.
    let e = p
        .explain(
            &tests,
            "POST",
            "https://api.openai.com/v1/chat/completions",
            now(),
        )
        .expect("explains");
    assert!(!e.allowed);
    assert_eq!(e.refused_by, Some(tests.clone()));
    assert!(
        e.reason.as_deref().is_some_and(|r| r.contains("x-task")),
        "{e}"
    );
    assert!(e.notes.iter().any(|n| n.contains("headers")), "{e}");
    let shown = e.to_string();
    assert!(shown.contains("refused by: "), "{shown}");
    assert!(shown.contains("nearest rule: "), "{shown}");

    // A denial by method, with the allowed ones.
    let e = p
        .explain(
            &cg("agents/coder"),
            "DELETE",
            "https://pypi.org/simple/x/",
            now(),
        )
        .expect("explains");
    assert_eq!(
        e.reason.as_deref(),
        Some("DELETE is not allowed to pypi.org/simple/x/ for agents/coder; allowed methods: GET")
    );
    // No file at all.
    let e = p
        .explain(&cg("other"), "GET", "https://api.example.test/", now())
        .expect("explains");
    assert!(!e.allowed && e.refused_by.is_none() && e.file.is_none());
    assert!(
        e.to_string().contains("no policy file governs other"),
        "{e}"
    );

    // Plain HTTP with injection but no plain_http: a note.
    let e = p
        .explain(
            &cg("agents/demo"),
            "GET",
            "http://api.example.test:443/",
            now(),
        )
        .expect("explains");
    assert!(e.allowed);
    assert!(e.notes.iter().any(|n| n.contains("plain HTTP")), "{e}");

    for (method, url) in [
        ("GET", "ftp://x/"),
        ("GET", "not a url"),
        ("GET", "/relative"),
        ("G ET", "https://x/"),
    ] {
        assert!(
            p.explain(&tests, method, url, now()).is_err(),
            "{method} {url}"
        );
    }
}

#[test]
fn effective_policy_reads_like_toml_with_its_sources() {
    let p = shipped_policy();
    let shown = p.effective(&cg("agents/coder/tests/run-1")).to_string();
    for needle in [
        "# effective policy for agents/coder/tests/run-1\n",
        "coder-tests.toml (cgroup agents/coder/tests)\n",
        "coder.toml (cgroup agents/coder)\n",
        "agents.toml (cgroup agents)\n",
        "\n[dns]\nallow = [\"api.openai.com\", \"pypi.org\", \"*.pypi.org\"]  # from its [dns] table\n",
        "# and each name must also be allowed for agents/coder: [",
        "host = \"api.openai.com\"\nport = 443\nmethods = [\"POST\"]\npaths = [\"/v1/chat/completions\"]\n",
        "headers = { \"x-task\" = \"run-tests\" }\n",
        "not_after = \"2026-12-31T00:00:00Z\"\n",
        "inject.headers.authorization = \"Bearer {secret:OPENAI_KEY}\"\n",
        "#   rate = { per_second = 1, burst = 2 }  # agents/coder/tests, ",
        "#   rate = { per_second = 5, burst = 10 }  # agents/coder, ",
        "#   rate = { per_second = 20, burst = 40 }  # agents, ",
        "#   budget = { tokens_per_day = 100000 }  # agents/coder/tests",
    ] {
        assert!(shown.contains(needle), "missing {needle:?} in\n{shown}");
    }
    let e = p.effective(&cg("agents/coder/tests"));
    assert_eq!(e.rules.len(), 3);
    assert_eq!(e.rules[0].within.len(), 2);
    assert_eq!(e.rules[0].limits.len(), 3);

    // An inherited expiry shows where it comes from.
    let parent =
        "cgroup = \"a\"\n[[allow]]\nhost = \"x.test\"\nnot_after = \"2030-01-01T00:00:00Z\"\n";
    let child = "cgroup = \"a/b\"\n[[allow]]\nhost = \"x.test\"\ntcp = false\n";
    let p = policy(&[("a.toml", parent), ("b.toml", child)]);
    let shown = p.effective(&cg("a/b")).to_string();
    assert!(
        shown.contains("not_after = \"2030-01-01T00:00:00Z\"  # set by a level above"),
        "{shown}"
    );
    assert_eq!(
        Policy::empty().effective(&cg("x")).to_string(),
        "# no policy file governs x: every request is denied\n"
    );
    let p = policy(&[("e.toml", "cgroup = \"e\"\n")]);
    assert!(
        p.effective(&cg("e"))
            .to_string()
            .contains("# no rules: every request is denied")
    );
}

#[test]
fn shipped_hierarchy_narrows_and_decides() {
    let p = shipped_policy();
    assert_eq!(p.files().len(), 4);
    let ok = |cgroup: &str, m: &str, t: &str| ask(&p, cgroup, &req(m, t));
    // demo.toml unchanged, under the agents umbrella.
    assert!(ok("agents/demo", "DELETE", "api.example.test/anything").is_ok());
    assert!(ok("agents/demo", "GET", "api.openai.com/v1/models").is_err());
    // The coder: its own narrower rules.
    assert!(ok("agents/coder", "POST", "api.openai.com/v1/chat/completions").is_ok());
    assert!(ok("agents/coder", "GET", "api.openai.com/v1/models/gpt-x").is_ok());
    assert!(ok("agents/coder", "POST", "api.openai.com/v1/files").is_err());
    assert!(ok("agents/coder", "GET", "files.pypi.org/packages/x.whl").is_ok());
    assert!(ok("agents/coder", "GET", "192.0.2.10:8443/status").is_ok());
    assert!(ok("agents/coder", "GET", "192.0.2.11:8443/status").is_err());
    // Before the local service's not_after (2030).
    assert!(ok("agents/coder", "GET", "127.0.0.2:8080/api/v1/x").is_ok());
    // The sub-agent: header required, expiry at the end of 2026.
    let chat = req("POST", "api.openai.com/v1/chat/completions");
    assert!(ask(&p, "agents/coder/tests", &chat).is_err());
    let tagged = with_header(chat, "x-task", "run-tests");
    assert!(ask(&p, "agents/coder/tests", &tagged).is_ok());
    let mut late = tagged.clone();
    late.now = parse_rfc3339("2027-01-02T00:00:00Z").expect("t");
    assert!(
        ask(&p, "agents/coder/tests", &late)
            .expect_err("expired")
            .contains("expired")
    );
    assert!(
        ask(
            &p,
            "agents/coder/tests",
            &req("GET", "api.openai.com/v1/models")
        )
        .is_err()
    );
    // Limits from three levels.
    let RequestDecision::Allow { limit_keys, .. } =
        p.decide_request(&cg("agents/coder/tests"), &tagged.info())
    else {
        panic!("denied")
    };
    let levels: Vec<&str> = limit_keys.iter().map(LimitKey::cgroup).collect();
    assert_eq!(levels, ["agents/coder/tests", "agents/coder", "agents"]);
    assert!(limit_keys.iter().any(LimitKey::counts_tokens));
    // tcp by name through every level.
    assert!(matches!(
        p.decide_connection(
            &cg("agents/coder"),
            "192.0.2.1:22".parse().expect("addr"),
            Some("git.example.test"),
            now()
        ),
        ConnectionDecision::Tcp { .. }
    ));
    assert!(matches!(
        p.decide_connection(
            &cg("agents/coder/tests"),
            "192.0.2.1:22".parse().expect("addr"),
            Some("git.example.test"),
            now()
        ),
        ConnectionDecision::Deny { .. }
    ));
    // DNS: every level's list.
    assert_eq!(
        p.dns_allowed(&cg("agents/coder"), "git.example.test"),
        Ok(())
    );
    assert!(
        p.dns_allowed(&cg("agents/coder/tests"), "git.example.test")
            .is_err()
    );
    assert!(
        p.dns_allowed(&cg("agents/demo"), "api.example.test")
            .is_ok()
    );
    assert!(p.dns_allowed(&cg("agents/demo"), "api.openai.com").is_err());
    let names: Vec<&str> = p
        .secret_names()
        .into_iter()
        .map(SecretName::as_str)
        .collect();
    assert_eq!(
        names,
        [
            "ANTHROPIC_KEY",
            "EXAMPLE_KEY",
            "INTERNAL_TOKEN",
            "OPENAI_KEY",
            "REGISTRY_PASSWORD",
            "SEARCH_KEY"
        ]
    );
}

#[test]
fn a_thousand_rules_across_a_hundred_agents_decide_correctly() {
    let (p, requests) = bench_policy(1000, 100).unwrap_or_else(|e| panic!("{e}"));
    let rules: usize = p.files().iter().map(|f| f.rules().len()).sum();
    assert!(rules >= 1000, "{rules} rules");
    assert_eq!(p.files().len(), 101);
    assert_eq!(requests.len(), 2000);
    for r in &requests {
        let d = p.decide_request(&r.cgroup, &r.request.info());
        assert_eq!(
            d.is_allow(),
            r.expect_allow,
            "{} {} {}: {d:?}",
            r.cgroup,
            r.request.method,
            r.request.host
        );
    }
}

/// `explain` and `effective` say where a credential may go: only to the host's own addresses,
/// unless every level's rule says `any_address = true` (issue 13.18).
#[test]
fn explain_and_effective_show_any_address() {
    let parent = "cgroup = \"a\"\n[[allow]]\nhost = \"api.example.test\"\n\
                  inject.headers = { authorization = \"Bearer {secret:K}\" }\n\
                  [[allow]]\nhost = \"cdn.example.test\"\nany_address = true\n\
                  inject.headers = { authorization = \"Bearer {secret:K}\" }\n\
                  [[allow]]\nhost = \"127.0.0.2\"\n\
                  inject.headers = { authorization = \"Bearer {secret:K}\" }\n";
    let child = "cgroup = \"a/b\"\n[[allow]]\nhost = \"cdn.example.test\"\n\
                 inject.headers = { authorization = \"Bearer {secret:K}\" }\n";
    let p = policy(&[("a.toml", parent), ("b.toml", child)]);
    let explain = |cgroup: &str, url: &str| {
        p.explain(&cg(cgroup), "GET", url, now())
            .unwrap_or_else(|e| panic!("{url}: {e}"))
    };
    let bound_note = |e: &Explanation| {
        e.notes
            .iter()
            .find(|n| n.contains("the credentials go only to an address"))
            .cloned()
    };

    // Bound by default: the note says so and how to lift it.
    let e = explain("a", "https://api.example.test/v1");
    assert!(e.allowed && !e.any_address, "{e}");
    let note = bound_note(&e).unwrap_or_else(|| panic!("no note: {e}"));
    assert!(
        note.contains("api.example.test resolves to") && note.contains("any_address = true"),
        "{note}"
    );
    assert!(!e.to_string().contains("  any_address:"), "{e}");

    // Lifted on the only level.
    let e = explain("a", "https://cdn.example.test/v1");
    assert!(e.allowed && e.any_address, "{e}");
    assert_eq!(bound_note(&e), None, "{e}");
    assert!(
        e.to_string().contains(
            "  any_address: credentials may go to any address whose certificate is valid for \
             the host, not only to those the host resolves to\n"
        ),
        "{e}"
    );

    // Not lifted below a level that leaves it out.
    let e = explain("a/b", "https://cdn.example.test/v1");
    assert!(e.allowed && !e.any_address, "{e}");
    assert!(bound_note(&e).is_some(), "{e}");

    // An address is only itself: nothing to resolve, no note.
    let e = explain("a", "https://127.0.0.2/v1");
    assert!(e.allowed, "{e}");
    assert_eq!(bound_note(&e), None, "{e}");

    // `policy show`: set on every level, or only here.
    let shown = p.effective(&cg("a")).to_string();
    assert!(
        shown.contains("host = \"cdn.example.test\"\nport = 443\nany_address = true\n"),
        "{shown}"
    );
    assert_eq!(shown.matches("any_address").count(), 1, "{shown}");
    let child_with = "cgroup = \"a/b\"\n[[allow]]\nhost = \"cdn.example.test\"\n\
                      any_address = true\n";
    let shown = policy(&[("a.toml", parent), ("b.toml", child_with)])
        .effective(&cg("a/b"))
        .to_string();
    assert!(shown.contains("\nany_address = true\n"), "{shown}");
    let lone = "cgroup = \"a\"\n[[allow]]\nhost = \"cdn.example.test\"\n";
    let below = "cgroup = \"a/b\"\n[[allow]]\nhost = \"cdn.example.test\"\n";
    let shown = policy(&[("a.toml", lone), ("b.toml", below)])
        .effective(&cg("a/b"))
        .to_string();
    assert!(!shown.contains("any_address"), "{shown}");
}
