use std::{collections::BTreeSet, path::PathBuf};

use agent_broker_core::policy::Policy;
use agent_broker_protocol::{AuditEvent, Counters, Decision, EventKind, RequestOutcome, Side};

use super::*;

fn metrics_with_policy() -> Metrics {
    let m = Metrics::new();
    let policy = Policy::from_files(vec![(
        PathBuf::from("a.toml"),
        "cgroup = \"agents/a\"\n\
         [[allow]]\nhost = \"api.example.test\"\n\
         [[allow]]\nhost = \"*.models.test\"\n"
            .to_string(),
    )])
    .expect("policy");
    m.set_policy(&policy);
    m
}

fn request(agent: &str, host: &str) -> AuditEvent {
    AuditEvent {
        kind: Some(EventKind::Request),
        cgroup: Some(agent.into()),
        method: Some("GET".into()),
        host: Some(host.into()),
        path: Some("/v1/secret-path-never-a-label".into()),
        ..AuditEvent::default()
    }
}

fn allowed(agent: &str, host: &str, status: u16) -> AuditEvent {
    AuditEvent {
        decision: Some(Decision::Allow),
        status: Some(status),
        outcome: Some(RequestOutcome::Completed),
        bytes_in: 10,
        bytes_out: 100,
        latency_us: Some(2_500),
        ..request(agent, host)
    }
}

fn denied(agent: &str, host: &str, status: u16, reason: &str, rule: bool) -> AuditEvent {
    AuditEvent {
        kind: Some(EventKind::Denial),
        decision: Some(Decision::Deny),
        status: Some(status),
        reason: Some(reason.into()),
        rule: rule.then(|| "a.toml:2 allow[0]".into()),
        side: Some(Side::Broker),
        latency_us: Some(100),
        ..request(agent, host)
    }
}

fn value(text: &str, series: &str) -> f64 {
    sample_value(text, series).unwrap_or_else(|| panic!("no sample {series} in:\n{text}"))
}

#[test]
fn requests_are_counted_once_by_agent_host_decision_and_status_class() {
    let m = metrics_with_policy();
    // A forwarded request is recorded twice (forwarded, then completed): counted once.
    let forwarded = AuditEvent {
        outcome: Some(RequestOutcome::Forwarded),
        decision: Some(Decision::Allow),
        ..request("agents/a/tool", "api.example.test")
    };
    m.observe(&forwarded);
    m.observe(&allowed("agents/a/tool", "api.example.test", 200));
    m.observe(&allowed("agents/a", "API.example.test", 204));
    m.observe(&allowed("agents/a", "eu.models.test", 503));
    m.observe(&allowed("agents/a", "unnamed.example.test", 404));
    let text = m.encode();
    assert_eq!(
        value(
            &text,
            "agent_broker_requests_total{agent=\"agents/a\",host=\"api.example.test\",decision=\"allow\",status_class=\"2xx\"}"
        ),
        2.0,
        "a sub-cgroup counts under its policy's agent, a host in any case under the rule's"
    );
    assert_eq!(
        value(
            &text,
            "agent_broker_requests_total{agent=\"agents/a\",host=\"*.models.test\",decision=\"allow\",status_class=\"5xx\"}"
        ),
        1.0
    );
    assert_eq!(
        value(
            &text,
            "agent_broker_requests_total{agent=\"agents/a\",host=\"other\",decision=\"allow\",status_class=\"4xx\"}"
        ),
        1.0,
        "a host no rule names is `other`"
    );
    assert!(!text.contains("unnamed.example.test"), "{text}");
    assert!(!text.contains("secret-path"), "no path is a label: {text}");
    assert_eq!(
        value(
            &text,
            "agent_broker_request_bytes_total{agent=\"agents/a\"}"
        ),
        40.0
    );
    assert_eq!(
        value(
            &text,
            "agent_broker_response_bytes_total{agent=\"agents/a\"}"
        ),
        400.0
    );
    assert_eq!(
        value(
            &text,
            "agent_broker_request_duration_seconds_count{agent=\"agents/a\"}"
        ),
        4.0
    );
    assert_eq!(
        value(
            &text,
            "agent_broker_request_duration_seconds_bucket{le=\"0.004\",agent=\"agents/a\"}"
        ),
        4.0,
        "2.5 ms falls below the 4 ms bucket"
    );
    assert!(text.ends_with("# EOF\n"), "{text}");
}

#[test]
fn denials_are_counted_by_reason_kind_and_limits_by_limit() {
    let m = metrics_with_policy();
    let agent = "agents/a";
    let host = "api.example.test";
    m.observe(&denied(agent, host, 403, "no rule allows GET", true));
    // The proxy says what kind of refusal it records; the words do not decide it.
    recording_denial(Some(DenialKind::Rule), || {
        m.observe(&denied(agent, host, 403, "secrets over plain HTTP", true));
    });
    assert_eq!(
        DENIAL_KIND.get(),
        None,
        "the kind is scoped to the recording"
    );
    m.observe(&denied(
        agent,
        host,
        429,
        "rate limit reached: agents/a may send 2 requests per second",
        true,
    ));
    m.observe(&denied(
        agent,
        host,
        429,
        "daily budget used up: agents/a may use 2 requests per day",
        true,
    ));
    m.observe(&AuditEvent {
        kind: Some(EventKind::HandleMisuse),
        ..denied(agent, host, 403, "handle expired", false)
    });
    recording_denial(Some(DenialKind::Request), || {
        m.observe(&AuditEvent {
            side: Some(Side::Agent),
            ..denied(agent, host, 403, "SNI and Host disagree", false)
        });
    });
    // A 429 of the agent's share of brokerd.
    m.observe(&denied(
        agent,
        host,
        429,
        "agents/a has 512 requests in flight",
        false,
    ));
    // A burst of refused connections recorded as one record with a count.
    m.observe(&AuditEvent {
        kind: Some(EventKind::TlsFailure),
        cgroup: Some(agent.into()),
        reason: Some("TLS handshake with the agent failed".into()),
        count: Some(3),
        ..AuditEvent::default()
    });
    let text = m.encode();
    for (reason, n) in [
        ("policy", 1.0),
        ("rule", 1.0),
        ("rate_limit", 1.0),
        ("budget", 1.0),
        ("handle", 1.0),
        ("request", 1.0),
        ("share", 1.0),
        ("tls", 3.0),
    ] {
        assert_eq!(
            value(
                &text,
                &format!("agent_broker_denials_total{{agent=\"agents/a\",reason=\"{reason}\"}}")
            ),
            n,
            "{reason}"
        );
    }
    for limit in ["rate_limit", "budget"] {
        assert_eq!(
            value(
                &text,
                &format!("agent_broker_limit_hits_total{{agent=\"agents/a\",limit=\"{limit}\"}}")
            ),
            1.0
        );
    }
    assert_eq!(
        value(
            &text,
            "agent_broker_requests_total{agent=\"agents/a\",host=\"api.example.test\",decision=\"deny\",status_class=\"4xx\"}"
        ),
        7.0,
        "every denied HTTP request is also a request"
    );
}

#[test]
fn an_agent_without_a_policy_file_is_labelled_by_its_own_name() {
    let m = metrics_with_policy();
    m.observe(&denied("agents/b", "x.test", 403, "no policy file", false));
    let text = m.encode();
    assert_eq!(
        value(
            &text,
            "agent_broker_denials_total{agent=\"agents/b\",reason=\"policy\"}"
        ),
        1.0
    );
    // "agents/ab" is not below "agents/a".
    m.observe(&denied("agents/ab", "x.test", 403, "no policy file", false));
    assert!(m.encode().contains("agent=\"agents/ab\""));
}

#[test]
fn dns_queries_are_counted_by_answer_and_operator_events_not_at_all() {
    let m = Metrics::new();
    let dns = |decision, status| AuditEvent {
        kind: Some(EventKind::Dns),
        cgroup: Some("agents/a".into()),
        decision: Some(decision),
        status: Some(status),
        ..AuditEvent::default()
    };
    m.observe(&dns(Decision::Allow, 0));
    m.observe(&dns(Decision::Allow, 0));
    m.observe(&dns(Decision::Allow, 3));
    m.observe(&dns(Decision::Deny, 5));
    m.observe(&AuditEvent {
        kind: Some(EventKind::PolicyReload),
        decision: Some(Decision::Deny),
        ..AuditEvent::default()
    });
    let text = m.encode();
    assert_eq!(
        value(&text, "agent_broker_dns_queries_total{answer=\"allowed\"}"),
        2.0
    );
    assert_eq!(
        value(&text, "agent_broker_dns_queries_total{answer=\"nxdomain\"}"),
        1.0
    );
    assert_eq!(
        value(&text, "agent_broker_dns_queries_total{answer=\"refused\"}"),
        1.0
    );
    assert!(!text.contains("agent_broker_denials_total{"), "{text}");
}

#[test]
fn approvals_pending_and_decided() {
    let m = metrics_with_policy();
    m.approval_asked("agents/a/tool");
    m.approval_asked("agents/a");
    m.approval_asked("agents/a");
    let text = m.encode();
    assert_eq!(
        value(&text, "agent_broker_approvals_pending{agent=\"agents/a\"}"),
        3.0
    );
    m.approval_decided("agents/a", ApprovalDecision::AllowOnce);
    m.approval_decided("agents/a/tool", ApprovalDecision::Timeout);
    let text = m.encode();
    assert_eq!(
        value(&text, "agent_broker_approvals_pending{agent=\"agents/a\"}"),
        1.0
    );
    assert_eq!(
        value(
            &text,
            "agent_broker_approvals_decided_total{agent=\"agents/a\",decision=\"allow_once\"}"
        ),
        1.0
    );
    assert_eq!(
        value(
            &text,
            "agent_broker_approvals_decided_total{agent=\"agents/a\",decision=\"timeout\"}"
        ),
        1.0
    );
    let decisions = [
        ApprovalDecision::AllowOnce,
        ApprovalDecision::AllowUntil,
        ApprovalDecision::AllowAlways,
        ApprovalDecision::Deny,
        ApprovalDecision::Timeout,
    ];
    let spelled: BTreeSet<&str> = decisions.iter().map(|d| d.as_str()).collect();
    assert_eq!(spelled.len(), decisions.len(), "{spelled:?}");
}

#[test]
fn broker_wide_metrics_and_the_kernel_counters() {
    let m = Arc::new(Metrics::new());
    let a = m.connection_opened();
    let b = m.connection_opened();
    drop(a);
    m.tls_handshake(HandshakeOutcome::Ok);
    m.tls_handshake(HandshakeOutcome::Ok);
    m.tls_handshake(HandshakeOutcome::Failed);
    m.leaf_cache(false);
    m.leaf_cache(true);
    m.leaf_cache(true);
    m.upstream_pool_changed(3);
    m.upstream_pool_changed(-1);
    m.audit_committed(Duration::from_millis(3));
    m.upstream_latency("agents/x", Duration::from_millis(20));
    m.sample(
        Some(Counters {
            redirected: 11,
            refused: 2,
            dns_redirected: 5,
            socket_refused: 4,
            ..Counters::default()
        }),
        6,
    );
    let text = m.encode();
    for (series, v) in [
        ("agent_broker_connections_open", 1.0),
        ("agent_broker_tls_handshakes_total{outcome=\"ok\"}", 2.0),
        ("agent_broker_tls_handshakes_total{outcome=\"failed\"}", 1.0),
        ("agent_broker_leaf_cache_lookups_total{result=\"hit\"}", 2.0),
        (
            "agent_broker_leaf_cache_lookups_total{result=\"miss\"}",
            1.0,
        ),
        ("agent_broker_upstream_pool_connections", 2.0),
        ("agent_broker_audit_queue_depth", 6.0),
        ("agent_broker_audit_commit_duration_seconds_count", 1.0),
        (
            "agent_broker_upstream_duration_seconds_count{agent=\"agents/x\"}",
            1.0,
        ),
        ("agent_broker_ebpf_redirects_total{kind=\"connect\"}", 11.0),
        ("agent_broker_ebpf_redirects_total{kind=\"dns\"}", 5.0),
        ("agent_broker_ebpf_refusals_total{kind=\"connect\"}", 2.0),
        ("agent_broker_ebpf_refusals_total{kind=\"socket\"}", 4.0),
        ("agent_broker_ebpf_refusals_total{kind=\"netns\"}", 0.0),
    ] {
        assert_eq!(value(&text, series), v, "{series}");
    }
    drop(b);
    assert_eq!(value(&m.encode(), "agent_broker_connections_open"), 0.0);
}

#[test]
fn the_metered_sink_counts_and_passes_every_event_on() {
    #[derive(Default)]
    struct Kept(Mutex<Vec<AuditEvent>>);
    impl EventSink for Kept {
        fn record(&self, event: AuditEvent) {
            if let Ok(mut v) = self.0.lock() {
                v.push(event);
            }
        }
    }
    let kept = Arc::new(Kept::default());
    let m = Arc::new(metrics_with_policy());
    let sink = MeteredSink::new(kept.clone(), m.clone());
    sink.record(allowed("agents/a", "api.example.test", 200));
    sink.record(denied("agents/a", "api.example.test", 403, "no", false));
    assert_eq!(kept.0.lock().map(|v| v.len()).unwrap_or_default(), 2);
    let text = m.encode();
    assert_eq!(
        value(
            &text,
            "agent_broker_denials_total{agent=\"agents/a\",reason=\"policy\"}"
        ),
        1.0
    );
}

/// Every sample name the exposition can hold: counters with `_total`, histograms with
/// `_bucket`, `_sum` and `_count`, from the `# TYPE` lines of a registry with every family
/// used once.
pub(crate) fn exported_names() -> BTreeSet<String> {
    let m = Arc::new(metrics_with_policy());
    m.observe(&allowed("agents/a", "api.example.test", 200));
    m.observe(&denied(
        "agents/a",
        "api.example.test",
        429,
        "rate limit reached",
        true,
    ));
    m.observe(&AuditEvent {
        kind: Some(EventKind::Dns),
        decision: Some(Decision::Allow),
        status: Some(0),
        ..AuditEvent::default()
    });
    m.approval_asked("agents/a");
    m.approval_decided("agents/a", ApprovalDecision::Deny);
    m.tls_handshake(HandshakeOutcome::Ok);
    m.leaf_cache(true);
    m.upstream_latency("agents/a", Duration::from_millis(1));
    m.audit_committed(Duration::from_millis(1));
    m.sample(Some(Counters::default()), 0);
    let _open = m.connection_opened();
    let text = m.encode();
    let mut names = BTreeSet::new();
    for line in text.lines() {
        let Some(rest) = line.strip_prefix("# TYPE ") else {
            continue;
        };
        let (name, kind) = rest.split_once(' ').expect("a TYPE line names a type");
        match kind {
            "counter" => {
                names.insert(format!("{name}_total"));
            }
            "histogram" => {
                for suffix in ["_bucket", "_sum", "_count"] {
                    names.insert(format!("{name}{suffix}"));
                }
            }
            _ => {
                names.insert(name.to_string());
            }
        }
    }
    // Each name has at least one sample.
    for name in &names {
        assert!(
            text.lines()
                .any(|l| l.starts_with(name.as_str()) && l[name.len()..].starts_with(['{', ' '])),
            "{name} has no sample in:\n{text}"
        );
    }
    names
}

#[test]
fn the_exposition_names_every_metric_the_readme_lists() {
    let names = exported_names();
    let readme = std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/../README.md"))
        .expect("README.md");
    for name in &names {
        let base = name
            .trim_end_matches("_bucket")
            .trim_end_matches("_sum")
            .trim_end_matches("_count");
        assert!(
            readme.contains(base),
            "README.md's Metrics section does not list {base}"
        );
    }
}

/// deploy/grafana/agent-broker.json is a Grafana dashboard whose every panel queries metrics
/// brokerd exports.
#[test]
fn the_grafana_dashboard_queries_only_exported_metrics() {
    let path = concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/../deploy/grafana/agent-broker.json"
    );
    let text = std::fs::read_to_string(path).expect("the dashboard");
    let dashboard: serde_json::Value = serde_json::from_str(&text).expect("valid JSON");
    let names = exported_names();
    let panels = dashboard["panels"].as_array().expect("panels");
    assert!(panels.len() >= 8, "{} panels", panels.len());
    let mut used = BTreeSet::new();
    for panel in panels {
        let title = panel["title"].as_str().expect("every panel has a title");
        let targets = panel["targets"]
            .as_array()
            .unwrap_or_else(|| panic!("panel {title} has no targets"));
        assert!(!targets.is_empty(), "panel {title} has no queries");
        for target in targets {
            let expr = target["expr"]
                .as_str()
                .unwrap_or_else(|| panic!("panel {title}: a target without expr"));
            let metrics: Vec<&str> = expr
                .split(|c: char| !(c.is_ascii_alphanumeric() || c == '_'))
                .filter(|w| w.starts_with("agent_broker_"))
                .collect();
            assert!(!metrics.is_empty(), "panel {title}: {expr} names no metric");
            for metric in metrics {
                assert!(
                    names.contains(metric),
                    "panel {title}: {metric} is not exported (exported: {names:?})"
                );
                used.insert(metric.to_string());
            }
        }
    }
    for needed in [
        "agent_broker_requests_total",
        "agent_broker_denials_total",
        "agent_broker_request_duration_seconds_bucket",
        "agent_broker_upstream_duration_seconds_bucket",
        "agent_broker_approvals_pending",
    ] {
        assert!(used.contains(needed), "no panel shows {needed}");
    }
}

/// The listener: `GET /metrics` is the exposition with the OpenMetrics content type; other
/// paths are 404 and other methods 405.
#[tokio::test]
async fn the_listener_serves_get_metrics_only() {
    use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
    struct Fixed;
    impl Scrape for Fixed {
        fn scrape(&self) -> std::pin::Pin<Box<dyn Future<Output = String> + Send + '_>> {
            Box::pin(async { "agent_broker_connections_open 0\n# EOF\n".to_string() })
        }
    }
    let listener = bind("127.0.0.1:0".parse().expect("addr"))
        .await
        .expect("bind");
    let addr = listener.local_addr().expect("addr");
    let cancel = tokio_util::sync::CancellationToken::new();
    let server = tokio::spawn(serve(listener, Arc::new(Fixed), cancel.clone()));
    let ask = |request: &'static str| async move {
        let mut s = tokio::net::TcpStream::connect(addr).await.expect("connect");
        s.write_all(request.as_bytes()).await.expect("write");
        let mut answer = String::new();
        s.read_to_string(&mut answer).await.expect("read");
        answer
    };
    let ok = ask("GET /metrics HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n").await;
    assert!(ok.starts_with("HTTP/1.1 200"), "{ok}");
    assert!(ok.contains(CONTENT_TYPE), "{ok}");
    assert!(
        ok.ends_with("agent_broker_connections_open 0\n# EOF\n"),
        "{ok}"
    );
    let other = ask("GET / HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n").await;
    assert!(other.starts_with("HTTP/1.1 404"), "{other}");
    let post =
        ask("POST /metrics HTTP/1.1\r\nHost: x\r\nContent-Length: 0\r\nConnection: close\r\n\r\n")
            .await;
    assert!(post.starts_with("HTTP/1.1 405"), "{post}");
    cancel.cancel();
    server.await.expect("the server stops when cancelled");
}
