//! Issue 13, items 2, 8, 12 and 17, against a real brokerd: each attack fails, the victim's
//! calls still succeed, and the audit log records why.
//!
//! - 2: a request the agent abandons before the answer (curl gives up; HTTP/1.1 and HTTP/2) is
//!   in the log as forwarded and then cancelled; one under way when brokerd is SIGKILLed
//!   survives as forwarded.
//! - 8: a token budget cannot be evaded with a response whose usage comes after 256 KiB, nor
//!   with a stream cut before its usage event: the first is charged what it reports, the second
//!   an estimate (audited as such), and the next request is refused.
//! - 12: an upstream that authenticates connections never serves an agent that sent no
//!   credential on a connection another agent's injected credential authenticated.
//! - 17: `brokerctl logs` into a closed pipe ends quietly.
//!
//! Needs root, cgroup v2 and BPF, and curl (see `tests/tests/proxy.rs`).
//!
//! Run as root: `cargo test -p agent-broker-tests --test attack_audit -- --test-threads=1`.

use std::{
    process::{Command, Stdio},
    thread,
    time::Duration,
};

use agent_broker_protocol::{AuditEvent, EventKind, RequestOutcome};
use agent_broker_tests::{
    clients::{self, ClientRun, HttpReport, Proto, run_in_cgroup},
    poll_until, spawn_in_cgroup,
    world::{API, SECRET_NAME, World, api_ip, rule},
};

/// The crash window brokerd documents (one 50 ms group commit plus the commit in flight), with
/// room for a loaded machine, as `tests/tests/audit.rs` allows.
const CRASH_WINDOW: Duration = Duration::from_millis(250);

/// curl in `cgroup` for `path` on the test API, giving up after `max_secs` (closing its
/// connection, or resetting its HTTP/2 stream), with the placeholder as bearer token.
fn curl_giving_up(w: &World, cgroup: &str, path: &str, proto: Proto, max_secs: u32) -> ClientRun {
    let argv: Vec<String> = [
        "curl",
        "-sS",
        "--noproxy",
        "*",
        "--max-time",
        &max_secs.to_string(),
        "--resolve",
        &format!("{API}:{}:{}", w.api.port(), api_ip()),
        match proto {
            Proto::Http1 => "--http1.1",
            Proto::Http2 => "--http2",
        },
        "-H",
        &format!("authorization: Bearer {}", w.placeholder.expose()),
        "-o",
        "/dev/null",
        &format!("https://{API}:{}{path}", w.api.port()),
    ]
    .iter()
    .map(|s| s.to_string())
    .collect();
    run_in_cgroup(&w.broker, cgroup, "curl", &w.trust().var("curl"), &argv)
}

/// A call of the test API from `cgroup` (curl, the placeholder as bearer token).
fn call(w: &World, cgroup: &str, path: &str) -> (ClientRun, HttpReport) {
    clients::curl(&w.broker, cgroup, &w.trust(), &w.call(path))
}

/// The victim's call still gets its key injected.
fn assert_victim_served(w: &World, cgroup: &str, what: &str) {
    let (run, report) = call(w, cgroup, "/hash");
    assert_eq!(
        report.status,
        200,
        "{what}: {}\n{}",
        report.show(),
        run.show()
    );
    assert_eq!(
        report.json()["authorization_sha256"].as_str(),
        Some(w.injected_hash().as_str()),
        "{what}: the victim's key was not injected: {}",
        report.show()
    );
    run.assert_no_secret(&w.secret);
}

/// Waits for the records of `cgroup`'s requests to `path` that match `pred`.
fn records_of(
    w: &World,
    cgroup: &str,
    path: &str,
    pred: impl Fn(&[AuditEvent]) -> bool,
) -> Vec<AuditEvent> {
    let found = poll_until(Duration::from_secs(10), || {
        let records: Vec<AuditEvent> = w
            .broker
            .audit_records()
            .into_iter()
            .filter(|r| r.cgroup.as_deref() == Some(cgroup) && r.path.as_deref() == Some(path))
            .collect();
        pred(&records).then_some(records)
    });
    found.unwrap_or_else(|| {
        panic!(
            "no records of {cgroup} {path} as expected: {:#?}\nbrokerd's log:\n{}",
            w.broker.audit_records(),
            w.broker.log()
        )
    })
}

// ---------------------------------------------------------------------------------------------
// Item 2: aborted requests are audited

#[test]
fn a_request_the_agent_abandons_is_audited_as_forwarded_then_cancelled() {
    let w = World::new();
    for (proto, path) in [
        (Proto::Http1, "/attack/slow?ms=4000&v=1"),
        (Proto::Http2, "/attack/slow?ms=4000&v=2"),
    ] {
        let what = format!("{proto:?}");
        let run = curl_giving_up(&w, &w.agent, path, proto, 1);
        assert_eq!(
            run.output.status.code(),
            Some(28),
            "{what}: curl should give up (timeout): {}",
            run.show()
        );
        // The upstream had the request, with the key.
        let reached = poll_until(Duration::from_secs(5), || {
            let had = w.api.requests().into_iter().filter(|r| {
                r.path == "/attack/slow"
                    && r.header_hash("authorization") == Some(&w.injected_hash())
            });
            (had.count() >= if proto == Proto::Http1 { 1 } else { 2 }).then_some(())
        });
        assert!(
            reached.is_some(),
            "{what}: the upstream never had the request"
        );
        let records = records_of(&w, &w.agent, "/attack/slow", |rs| {
            rs.iter()
                .filter(|r| r.outcome == Some(RequestOutcome::Cancelled))
                .count()
                >= if proto == Proto::Http1 { 1 } else { 2 }
        });
        let cancelled = records
            .iter()
            .rev()
            .find(|r| r.outcome == Some(RequestOutcome::Cancelled))
            .expect("a cancelled record");
        assert_eq!(cancelled.kind, Some(EventKind::Request), "{what}");
        assert_eq!(cancelled.secrets, [SECRET_NAME], "{what}");
        assert_eq!(
            cancelled.status, None,
            "{what}: no answer came: {cancelled:?}"
        );
        assert!(cancelled.request_id.is_some(), "{what}");
        assert!(
            cancelled
                .reason
                .as_deref()
                .is_some_and(|r| r.contains("the agent went away")),
            "{what}: {cancelled:?}"
        );
        assert_victim_served(&w, &w.agent, &what);
    }
    let table = w.broker.ctl_ok(&["logs", "--cgroup", &w.agent]);
    assert!(
        table.contains("request cancelled allow: the agent went away"),
        "{table}"
    );
    let verified = w.broker.ctl_ok(&["logs", "verify"]);
    assert!(verified.contains("intact"), "{verified}");
    w.assert_no_secret_in_logs();
}

#[test]
fn a_request_under_way_when_brokerd_is_killed_is_in_the_log_after_the_restart() {
    let mut w = World::new();
    w.broker
        .ctl_ok(&["attach", "--cgroup", &w.agent, "--create"]);
    let mut curl = Command::new("curl");
    curl.args([
        "-sS",
        "--noproxy",
        "*",
        "--max-time",
        "30",
        "--resolve",
        &format!("{API}:{}:{}", w.api.port(), api_ip()),
        "-H",
        &format!("authorization: Bearer {}", w.placeholder.expose()),
        "-o",
        "/dev/null",
        &format!("https://{API}:{}/attack/slow?ms=20000", w.api.port()),
    ])
    .env("CURL_CA_BUNDLE", &w.broker_ca)
    .stdout(Stdio::null())
    .stderr(Stdio::null());
    let mut agent = spawn_in_cgroup(&w.agent, &mut curl);
    let reached = w.api.wait_request(Duration::from_secs(10), |r| {
        r.path == "/attack/slow" && r.header_hash("authorization") == Some(&w.injected_hash())
    });
    assert!(reached.is_some(), "the request never reached the upstream");
    // Older than the crash window when brokerd dies, and not answered.
    thread::sleep(CRASH_WINDOW);
    w.broker.kill9();
    let _ = agent.kill();
    let _ = agent.wait();
    w.broker.restart();
    let records: Vec<AuditEvent> = w
        .broker
        .audit_records()
        .into_iter()
        .filter(|r| r.path.as_deref() == Some("/attack/slow"))
        .collect();
    assert_eq!(records.len(), 1, "{records:#?}");
    let forwarded = &records[0];
    assert_eq!(forwarded.outcome, Some(RequestOutcome::Forwarded));
    assert_eq!(forwarded.kind, Some(EventKind::Request));
    assert_eq!(forwarded.cgroup.as_deref(), Some(w.agent.as_str()));
    assert_eq!(forwarded.secrets, [SECRET_NAME]);
    assert_eq!(forwarded.status, None);
    let table = w.broker.ctl_ok(&["logs", "--cgroup", &w.agent]);
    assert!(table.contains("request forwarded allow"), "{table}");
    let verified = w.broker.ctl_ok(&["logs", "verify"]);
    assert!(verified.contains("intact"), "{verified}");
    assert_victim_served(&w, &w.agent, "after the restart");
    w.broker.ctl_ok(&["detach", "--cgroup", &w.agent]);
    w.assert_no_secret_in_logs();
}

// ---------------------------------------------------------------------------------------------
// Item 8: token budgets

/// Policies: `attacker` and `streamer` may use 3000 tokens a day each, `victim` its own 3000,
/// each in a file of its own (their counters are their own), all with the key injected.
fn budget_world() -> (World, String, String, String) {
    let w = World::with_policies(|cg, api| {
        ["attacker", "streamer", "victim"]
            .iter()
            .map(|name| {
                (
                    (*name).to_string(),
                    format!(
                        "cgroup = \"{}\"\n{}budget = {{ tokens_per_day = 3000 }}\n",
                        cg.child(name),
                        rule(API, api.port(), true)
                    ),
                )
            })
            .collect()
    });
    let (a, s, v) = (
        w.cg.child("attacker"),
        w.cg.child("streamer"),
        w.cg.child("victim"),
    );
    (w, a, s, v)
}

#[test]
fn usage_after_256_kib_is_charged_and_the_budget_holds() {
    let (w, attacker, _, victim) = budget_world();
    let (run, report) = call(&w, &attacker, "/attack/big-usage?tokens=13000&pad=400000");
    assert_eq!(report.status, 200, "{}\n{}", report.show(), run.show());
    let records = records_of(&w, &attacker, "/attack/big-usage", |rs| {
        rs.iter()
            .any(|r| r.outcome == Some(RequestOutcome::Completed))
    });
    let charged = records.last().expect("a record");
    assert_eq!(charged.tokens, Some(13000), "{charged:?}");
    assert_eq!(charged.tokens_estimated, None, "{charged:?}");
    assert!(charged.bytes_out > 256 * 1024, "{charged:?}");
    // 13000 of 3000 used: the next call is refused, and says why.
    let (_, refused) = call(&w, &attacker, "/hash");
    let (reason, _) = refused.assert_limited(&attacker, "the attacker's next call");
    assert!(reason.contains("3000 LLM tokens per day"), "{reason}");
    let denial = records_of(&w, &attacker, "/hash", |rs| {
        rs.iter().any(|r| r.kind == Some(EventKind::Denial))
    });
    assert!(
        denial.iter().any(|r| r
            .reason
            .as_deref()
            .is_some_and(|x| x.contains("LLM tokens"))),
        "{denial:?}"
    );
    assert_victim_served(&w, &victim, "the victim under its own budget");
    w.assert_no_secret_in_logs();
}

#[test]
fn a_stream_cut_before_its_usage_is_charged_an_estimate_and_the_budget_holds() {
    let (w, _, streamer, victim) = budget_world();
    // 60 events (over 3000 bytes) at once, then the usage 60 s later: curl gives up first.
    let run = curl_giving_up(
        &w,
        &streamer,
        "/attack/stream-cut?events=60",
        Proto::Http2,
        2,
    );
    assert_eq!(run.output.status.code(), Some(28), "{}", run.show());
    let records = records_of(&w, &streamer, "/attack/stream-cut", |rs| {
        rs.iter()
            .any(|r| r.outcome == Some(RequestOutcome::Cancelled))
    });
    let charged = records.last().expect("a record");
    assert_eq!(charged.status, Some(200), "{charged:?}");
    let tokens = charged.tokens.unwrap_or(0);
    assert!(
        tokens >= 3000 && tokens >= charged.bytes_out,
        "charged {tokens} for {} bytes: {charged:?}",
        charged.bytes_out
    );
    let how = charged.tokens_estimated.as_deref().unwrap_or_default();
    assert!(how.contains("cut before its end"), "{charged:?}");
    let (_, refused) = call(&w, &streamer, "/hash");
    let (reason, _) = refused.assert_limited(&streamer, "the streamer's next call");
    assert!(reason.contains("LLM tokens"), "{reason}");
    let table = w.broker.ctl_ok(&["logs", "--cgroup", &streamer]);
    assert!(table.contains("tokens estimated ("), "{table}");
    assert_victim_served(&w, &victim, "the victim under its own budget");
    w.assert_no_secret_in_logs();
}

// ---------------------------------------------------------------------------------------------
// Item 12: pooled connections

#[test]
fn a_connection_authenticated_for_one_agent_never_serves_another() {
    let w = World::with_policies(|cg, api| {
        vec![
            (
                "agent".into(),
                format!(
                    "cgroup = \"{}\"\n{}",
                    cg.child("agent"),
                    rule(API, api.port(), true)
                ),
            ),
            (
                "attacker".into(),
                format!(
                    "cgroup = \"{}\"\n{}",
                    cg.child("attacker"),
                    rule(API, api.port(), false)
                ),
            ),
        ]
    });
    let attacker = w.cg.child("attacker");
    // brokerd pools per proxy thread: alternate often enough that the attacker's connections
    // land on the thread holding the victim's authenticated one.
    for round in 0..6 {
        let (run, victim) = clients::curl(
            &w.broker,
            &w.agent,
            &w.trust(),
            &w.call("/attack/conn-auth"),
        );
        assert_eq!(victim.status, 200, "{}\n{}", victim.show(), run.show());
        assert_eq!(victim.json()["authenticated"], true, "{}", victim.show());
        let stolen = clients::Call::new(API, api_ip(), w.api.port(), "/attack/conn-auth");
        let (run, report) = clients::curl(&w.broker, &attacker, &w.trust(), &stolen);
        assert_eq!(report.status, 200, "{}\n{}", report.show(), run.show());
        assert_eq!(
            report.json()["authenticated"],
            false,
            "round {round}: the attacker was served on the victim's authenticated connection: {}",
            report.show()
        );
    }
    let records = records_of(&w, &attacker, "/attack/conn-auth", |rs| rs.len() >= 6);
    assert!(records.iter().all(|r| r.secrets.is_empty()), "{records:?}");
    assert_victim_served(&w, &w.agent, "the victim");
    w.assert_no_secret_in_logs();
}

// ---------------------------------------------------------------------------------------------
// Item 17: brokerctl logs | head

#[test]
fn brokerctl_logs_into_a_closed_pipe_ends_quietly() {
    let w = World::new();
    assert_victim_served(&w, &w.agent, "a call for the log to show");
    for args in [
        &["logs"][..],
        &["logs", "--json"][..],
        &["logs", "--follow"][..],
    ] {
        let (reader, writer) = std::io::pipe().expect("a pipe");
        drop(reader);
        let mut cmd = w.broker.ctl();
        cmd.args(args)
            .stdout(Stdio::from(writer))
            .stderr(Stdio::piped());
        let out = cmd.output().expect("run brokerctl");
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(!stderr.contains("panicked"), "brokerctl {args:?}: {stderr}");
        assert_eq!(out.status.code(), Some(0), "brokerctl {args:?}: {stderr}");
    }
    // And through a shell, as an operator types it: `head` exits after one line.
    let ctl = w.broker.ctl();
    let program = ctl.get_program().to_string_lossy().into_owned();
    let ctl_args: Vec<String> = ctl
        .get_args()
        .map(|a| a.to_string_lossy().into_owned())
        .collect();
    let line = format!(
        "set -o pipefail; '{program}' {} logs --follow | head -1",
        ctl_args
            .iter()
            .map(|a| format!("'{a}'"))
            .collect::<Vec<_>>()
            .join(" ")
    );
    let mut shell = Command::new("bash");
    shell
        .args(["-c", &line])
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    let child = shell.spawn().expect("bash");
    // `--follow` waits for records: one more call makes brokerctl write into the closed pipe.
    thread::sleep(Duration::from_millis(500));
    assert_victim_served(&w, &w.agent, "a call while following");
    let out = child.wait_with_output().expect("bash");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!stderr.contains("panicked"), "{stderr}");
    assert_eq!(out.status.code(), Some(0), "{stderr}");
}
