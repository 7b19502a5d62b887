use std::{path::Path, sync::Mutex};

use agent_broker_core::cgroup::CgroupId;

use super::*;

#[derive(Default)]
struct Events(Mutex<Vec<AuditEvent>>);

impl EventSink for Events {
    fn record(&self, event: AuditEvent) {
        self.0.lock().expect("events").push(event);
    }
}

impl Events {
    fn approvals(&self) -> Vec<AuditEvent> {
        self.0
            .lock()
            .expect("events")
            .iter()
            .filter(|e| e.kind == Some(EventKind::Approval))
            .cloned()
            .collect()
    }
}

fn origin(cgroup: &str) -> ConnectionOrigin {
    ConnectionOrigin {
        cgroup: CgroupPath::parse(cgroup).expect("cgroup"),
        cgroup_path: None,
        pod: None,
        cgroup_id: CgroupId(7),
        pid: 4242,
        tid: 4242,
        comm: "agent".into(),
        exe: Some("/usr/bin/agent".into()),
        original_dst: "127.0.0.9:443".parse().expect("addr"),
        sandboxed: false,
    }
}

struct Fixture {
    dir: tempfile::TempDir,
    events: Arc<Events>,
    store: Arc<PolicyStore>,
    approvals: Arc<Approvals>,
}

fn fixture(files: &[(&str, &str)], config: ApprovalConfig) -> Fixture {
    let dir = tempfile::tempdir().expect("tempdir");
    for (name, text) in files {
        std::fs::write(dir.path().join(name), text).expect("write");
    }
    let store = PolicyStore::open(dir.path()).expect("policy");
    let events = Arc::new(Events::default());
    let approvals = Approvals::new(config, store.clone(), events.clone());
    Fixture {
        dir,
        events,
        store,
        approvals,
    }
}

fn ask<'a>(origin: &'a ConnectionOrigin, host: &'a str, rule: Option<AskingRule>) -> Ask<'a> {
    Ask {
        origin,
        method: "GET",
        host,
        port: 443,
        path: "/v1/thing",
        rule,
        why: "test".into(),
    }
}

const UNKNOWN_ASKS: &str =
    "cgroup = \"agents/coder\"\non_unknown = \"ask\"\n[[allow]]\nhost = \"api.example.test\"\n";

#[tokio::test]
async fn a_held_request_goes_when_allowed_once_and_the_records_name_who() {
    let f = fixture(&[("coder.toml", UNKNOWN_ASKS)], ApprovalConfig::default());
    let o = origin("agents/coder");
    let wait = f
        .approvals
        .hold(ask(&o, "new.example.test", None))
        .expect("held");
    let listed = f.approvals.list();
    assert_eq!(listed.len(), 1);
    let p = &listed[0];
    assert_eq!(
        (
            p.agent.as_str(),
            p.method.as_str(),
            p.host.as_str(),
            p.port,
            p.pid,
            p.held
        ),
        (
            "agents/coder",
            "GET",
            "new.example.test",
            443,
            Some(4242),
            true
        )
    );
    let outcome = f
        .approvals
        .decide(p.id, ApprovalDecision::AllowOnce, "cli uid 0")
        .expect("decided");
    assert!(outcome.contains("allowed once"), "{outcome}");
    let approved = wait.await.expect("approved");
    assert_eq!((approved.id, approved.by.as_str()), (p.id, "cli uid 0"));
    assert!(f.approvals.list().is_empty());
    // Once means once: the next like request asks again.
    assert!(
        f.approvals
            .standing(&o.cgroup, "GET", "new.example.test", 443)
            .is_none()
    );
    let records = f.events.approvals();
    assert_eq!(records.len(), 2, "{records:?}");
    assert_eq!(records[0].decision, None);
    assert_eq!(records[1].decision, Some(Decision::Allow));
    assert_eq!(
        records[1].approval.as_ref().and_then(|a| a.by.as_deref()),
        Some("cli uid 0")
    );
}

#[tokio::test]
async fn a_request_nobody_decides_is_denied_at_the_timeout() {
    let config = ApprovalConfig {
        timeout: Duration::from_millis(200),
        ..ApprovalConfig::default()
    };
    let f = fixture(&[("coder.toml", UNKNOWN_ASKS)], config);
    let o = origin("agents/coder");
    let started = Instant::now();
    let refused = f
        .approvals
        .hold(ask(&o, "new.example.test", None))
        .expect("held")
        .await
        .expect_err("timed out");
    assert!(started.elapsed() >= Duration::from_millis(200));
    assert!(refused.reason.contains("within"), "{}", refused.reason);
    assert!(f.approvals.list().is_empty());
    let id = refused.id.expect("id");
    // Too late to decide now.
    let late = f
        .approvals
        .decide(id, ApprovalDecision::AllowOnce, "cli uid 0")
        .expect_err("gone");
    assert!(late.contains(&format!("#{id}")), "{late}");
}

#[tokio::test]
async fn an_agent_may_have_only_so_many_waiting() {
    let config = ApprovalConfig {
        per_agent: 2,
        ..ApprovalConfig::default()
    };
    let f = fixture(&[("coder.toml", UNKNOWN_ASKS)], config);
    let o = origin("agents/coder");
    let _a = f
        .approvals
        .hold(ask(&o, "a.example.test", None))
        .expect("1");
    let _b = f
        .approvals
        .hold(ask(&o, "b.example.test", None))
        .expect("2");
    let Err(refused) = f.approvals.hold(ask(&o, "c.example.test", None)) else {
        panic!("a third request should be refused at once");
    };
    assert!(refused.reason.contains("at most 2"), "{}", refused.reason);
    // Another agent is not affected.
    let other = origin("agents/other");
    assert!(
        f.approvals
            .hold(ask(&other, "c.example.test", None))
            .is_ok()
    );
}

#[tokio::test]
async fn allow_until_covers_like_requests_and_releases_those_waiting() {
    let f = fixture(&[("coder.toml", UNKNOWN_ASKS)], ApprovalConfig::default());
    let o = origin("agents/coder");
    let first = f
        .approvals
        .hold(ask(&o, "new.example.test", None))
        .expect("1");
    let second = f
        .approvals
        .hold(ask(&o, "new.example.test", None))
        .expect("2");
    let id = f.approvals.list()[0].id;
    let until = now_ms() + 60_000;
    f.approvals
        .decide(
            id,
            ApprovalDecision::AllowUntil { until_ms: until },
            "console uid 0",
        )
        .expect("decided");
    assert!(first.await.is_ok());
    assert!(
        second.await.is_ok(),
        "the like request waiting is released too"
    );
    assert!(
        f.approvals
            .standing(&o.cgroup, "get", "NEW.example.test", 443)
            .is_some()
    );
    // Not another method, host, port or agent.
    assert!(
        f.approvals
            .standing(&o.cgroup, "POST", "new.example.test", 443)
            .is_none()
    );
    assert!(
        f.approvals
            .standing(&o.cgroup, "GET", "new.example.test", 8443)
            .is_none()
    );
    assert!(
        f.approvals
            .standing(
                &origin("agents/other").cgroup,
                "GET",
                "new.example.test",
                443
            )
            .is_none()
    );
    // A time in the past is refused, and the request keeps waiting.
    let _third = f
        .approvals
        .hold(ask(&o, "x.example.test", None))
        .expect("3");
    let id = f.approvals.list()[0].id;
    assert!(
        f.approvals
            .decide(
                id,
                ApprovalDecision::AllowUntil { until_ms: 1 },
                "cli uid 0"
            )
            .is_err()
    );
    assert_eq!(f.approvals.list().len(), 1);
}

#[tokio::test]
async fn deny_tells_the_agent_why() {
    let f = fixture(&[("coder.toml", UNKNOWN_ASKS)], ApprovalConfig::default());
    let o = origin("agents/coder");
    let wait = f
        .approvals
        .hold(ask(&o, "new.example.test", None))
        .expect("held");
    let id = f.approvals.list()[0].id;
    f.approvals
        .decide(
            id,
            ApprovalDecision::Deny {
                reason: Some("not today".into()),
            },
            "cli uid 0",
        )
        .expect("decided");
    let refused = wait.await.expect_err("denied");
    assert!(refused.reason.contains("not today"), "{}", refused.reason);
    assert_eq!(refused.by.as_deref(), Some("cli uid 0"));
}

fn load(dir: &Path) -> Policy {
    Policy::load_dir(dir).expect("the directory loads")
}

#[tokio::test]
async fn allow_always_writes_a_rule_that_loads_and_survives_a_new_store() {
    let f = fixture(&[("coder.toml", UNKNOWN_ASKS)], ApprovalConfig::default());
    let o = origin("agents/coder");
    let wait = f
        .approvals
        .hold(ask(&o, "new.example.test", None))
        .expect("held");
    let id = f.approvals.list()[0].id;
    let outcome = f
        .approvals
        .decide(id, ApprovalDecision::AllowAlways, "cli uid 0")
        .expect("decided");
    assert!(outcome.contains("agents.coder.approved.toml"), "{outcome}");
    assert!(wait.await.is_ok());
    // The store reloaded, and a fresh load of the directory (a restart) has the rule.
    for policy in [f.store.current(), Arc::new(load(f.dir.path()))] {
        let decision = policy.decide_request(
            &o.cgroup,
            &agent_broker_core::policy::RequestInfo {
                method: &http::Method::GET,
                path: "/v1/thing",
                headers: &http::HeaderMap::new(),
                host: "new.example.test",
                port: 443,
                dst_ip: o.original_dst.ip(),
                tls: true,
                now: SystemTime::now(),
            },
        );
        assert!(
            matches!(
                decision,
                agent_broker_core::policy::RequestDecision::Allow { ask: None, .. }
            ),
            "{decision:?}"
        );
    }
}

#[tokio::test]
async fn allow_always_that_widens_past_the_parent_is_refused_and_nothing_is_written() {
    let parent = "cgroup = \"agents\"\n[[allow]]\nhost = \"api.example.test\"\n";
    let f = fixture(
        &[("agents.toml", parent), ("coder.toml", UNKNOWN_ASKS)],
        ApprovalConfig::default(),
    );
    let o = origin("agents/coder");
    let _wait = f
        .approvals
        .hold(ask(&o, "evil.example.test", None))
        .expect("held");
    let id = f.approvals.list()[0].id;
    let refused = f
        .approvals
        .decide(id, ApprovalDecision::AllowAlways, "cli uid 0")
        .expect_err("widening refused");
    assert!(refused.contains("would not load"), "{refused}");
    assert!(refused.contains("evil.example.test"), "{refused}");
    assert!(!f.dir.path().join("agents.coder.approved.toml").exists());
    // The request still waits, for another decision.
    assert_eq!(f.approvals.list().len(), 1);
    f.approvals
        .decide(id, ApprovalDecision::Deny { reason: None }, "cli uid 0")
        .expect("denied");
}

#[tokio::test]
async fn a_filed_request_allowed_once_lets_the_next_like_request_through() {
    let f = fixture(&[("coder.toml", UNKNOWN_ASKS)], ApprovalConfig::default());
    let o = origin("agents/coder");
    let policy = f.store.current();
    let id = f
        .approvals
        .file(
            &o,
            "post",
            "https://new.example.test/v1/upload?x=1",
            "to upload the report",
            &policy,
        )
        .expect("filed");
    let listed = f.approvals.list();
    assert_eq!(listed.len(), 1);
    assert!(!listed[0].held);
    assert_eq!(
        listed[0].agent_reason.as_deref(),
        Some("to upload the report")
    );
    assert_eq!(
        (listed[0].method.as_str(), listed[0].path.as_str()),
        ("POST", "/v1/upload")
    );
    f.approvals
        .decide(id, ApprovalDecision::AllowOnce, "webhook")
        .expect("decided");
    assert!(
        f.approvals
            .standing(&o.cgroup, "POST", "new.example.test", 443)
            .is_some()
    );
    assert!(
        f.approvals
            .standing(&o.cgroup, "POST", "new.example.test", 443)
            .is_none()
    );
    assert!(
        f.approvals
            .file(&o, "GET", "not a url", "", &policy)
            .is_err()
    );
}

#[tokio::test]
async fn the_callback_needs_the_requests_own_token() {
    let config = ApprovalConfig {
        webhook: Some(webhook::Target::parse("http://127.0.0.1:9/hook").expect("url")),
        ..ApprovalConfig::default()
    };
    let f = fixture(&[("coder.toml", UNKNOWN_ASKS)], config);
    let o = origin("agents/coder");
    let (id, token) = f
        .approvals
        .enter(&ask(&o, "new.example.test", None), None, None, FILED_EXPIRY)
        .expect("entered");
    let token = token.expect("a token");
    assert_eq!(token.len(), 64);
    assert!(matches!(
        f.approvals
            .decide_with_token(id, "wrong", ApprovalDecision::AllowOnce),
        Err(webhook::CallbackError::BadToken(_))
    ));
    assert!(matches!(
        f.approvals
            .decide_with_token(id + 1, &token, ApprovalDecision::AllowOnce),
        Err(webhook::CallbackError::Unknown(_))
    ));
    f.approvals
        .decide_with_token(id, &token, ApprovalDecision::AllowOnce)
        .expect("decided");
    let by = f
        .events
        .approvals()
        .last()
        .and_then(|e| e.approval.clone())
        .and_then(|a| a.by);
    assert_eq!(by.as_deref(), Some("webhook"));
}

#[test]
fn webhook_urls_are_plain_http_with_a_host() {
    assert!(webhook::Target::parse("http://127.0.0.1:8080/approve").is_ok());
    assert!(webhook::Target::parse("https://example.test/approve").is_err());
    assert!(webhook::Target::parse("/approve").is_err());
}

#[tokio::test]
async fn a_request_whose_agent_gave_up_no_longer_waits_or_counts() {
    let config = ApprovalConfig {
        per_agent: 1,
        ..ApprovalConfig::default()
    };
    let f = fixture(&[("coder.toml", UNKNOWN_ASKS)], config);
    let o = origin("agents/coder");
    let wait = f
        .approvals
        .hold(ask(&o, "a.example.test", None))
        .expect("held");
    assert_eq!(f.approvals.list().len(), 1);
    // The agent's connection closes: its request's task (and the future) is dropped.
    drop(wait);
    assert!(f.approvals.list().is_empty(), "dropped from the list");
    // It no longer counts against the agent's bound.
    assert!(f.approvals.hold(ask(&o, "b.example.test", None)).is_ok());
    let gave_up = f.events.approvals().into_iter().any(|e| {
        e.reason
            .as_deref()
            .is_some_and(|r| r.contains("stopped waiting"))
    });
    assert!(gave_up, "recorded");
}
