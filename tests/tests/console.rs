//! The console, end to end: what `brokerctl logs --json` (and `--denied`) records for an allowed
//! call, a denial and a handle misuse, and what the console (`agent-broker-console`'s feed, model
//! and renderer, driven in-process against the same brokerd) shows of them, with the secret in
//! no record and no drawn frame. Real curl clients call the test API (the world is
//! `agent_broker_tests::world`).
//!
//! Needs root, cgroup v2 and BPF (brokerd attaches its programs to the test's cgroup), and curl.
//!
//! Run as root: `cargo test -p agent-broker-tests --test console -- --test-threads=1`.

use std::time::Duration;

use agent_broker_protocol::Decision;
use agent_broker_tests::{
    clients::{self, Call},
    redact,
    world::{API, OTHER, SECRET_NAME, World, api_ip},
};

/// Every record `brokerctl logs --json` prints, parsed.
fn audit_records(w: &World, extra: &[&str]) -> (Vec<agent_broker_protocol::AuditEvent>, String) {
    let mut args = vec!["logs", "--json"];
    args.extend_from_slice(extra);
    let out = w.broker.ctl_ok(&args);
    let records = out
        .lines()
        .filter(|l| !l.trim().is_empty())
        .map(|l| {
            serde_json::from_str(l).unwrap_or_else(|e| panic!("bad log line ({e}): {}", redact(l)))
        })
        .collect();
    (records, out)
}

#[test]
fn calls_denials_and_handle_misuse_are_audited_and_shown_in_the_console_without_the_secret() {
    use agent_broker_protocol::EventKind;
    let w = World::new();
    // An allowed call (the secret is injected, and the upstream echoes it back), a call to a
    // host without a rule, and a request carrying an unknown handle.
    let (run, report) = clients::curl(&w.broker, &w.agent, &w.trust(), &w.call("/echo?q=1"));
    assert_eq!(report.status, 200, "{}", report.show());
    run.assert_no_secret(&w.secret);
    let denied = Call::new(OTHER, api_ip(), w.api.port(), "/hash");
    let (_, report) = clients::curl(&w.broker, &w.agent, &w.trust(), &denied);
    report.assert_denied(&w.agent, "a host without a rule");
    let bogus = format!("brk_{}", "a".repeat(52));
    let misuse = Call::new(API, api_ip(), w.api.port(), "/hash").header("x-api-key", &bogus);
    let (_, report) = clients::curl(&w.broker, &w.agent, &w.trust(), &misuse);
    report.assert_denied(&w.agent, "an unknown handle");

    // Records are committed in groups (every 50 ms): wait until all three calls are stored.
    let deadline = std::time::Instant::now() + Duration::from_secs(5);
    let (records, raw) = loop {
        let (records, raw) = audit_records(&w, &[]);
        let stored = |kind| records.iter().any(|r| r.kind == Some(kind));
        // The call's record of how it ended (its `forwarded` record, written before it went
        // upstream, has no status yet).
        let completed = records.iter().any(|r| {
            r.kind == Some(EventKind::Request)
                && r.path.as_deref() == Some("/echo")
                && r.status.is_some()
        });
        let all = completed && stored(EventKind::Denial) && stored(EventKind::HandleMisuse);
        if all || std::time::Instant::now() > deadline {
            break (records, raw);
        }
        std::thread::sleep(Duration::from_millis(100));
    };
    w.secret
        .assert_absent(raw.as_bytes(), "brokerctl logs --json");
    let call = records
        .iter()
        .find(|r| {
            r.kind == Some(EventKind::Request)
                && r.path.as_deref() == Some("/echo")
                && r.status.is_some()
        })
        .unwrap_or_else(|| panic!("no request record for /echo in {}", redact(&raw)));
    assert_eq!(call.cgroup.as_deref(), Some(w.agent.as_str()));
    assert_eq!(call.status, Some(200));
    assert_eq!(call.method.as_deref(), Some("GET"));
    assert_eq!(call.host.as_deref(), Some(API));
    assert_eq!(
        call.secrets,
        vec![SECRET_NAME.to_string()],
        "secret names, never values"
    );
    assert!(
        call.pid.is_some() && call.comm.as_deref() == Some("curl"),
        "{call:?}"
    );
    assert!(call.bytes_out > 0, "response bytes are counted: {call:?}");
    assert!(
        call.rule.as_deref().is_some_and(|r| r.contains("allow[")),
        "{call:?}"
    );
    assert!(
        records.iter().any(|r| r.kind == Some(EventKind::Denial)
            && r.host.as_deref() == Some(OTHER)
            && r.reason.as_deref().is_some_and(|x| x.contains(OTHER))),
        "no denial record for {OTHER}: {}",
        redact(&raw)
    );
    assert!(
        records
            .iter()
            .any(|r| r.kind == Some(EventKind::HandleMisuse)),
        "no handle-misuse record: {}",
        redact(&raw)
    );
    let (denials, _) = audit_records(&w, &["--denied"]);
    assert!(!denials.is_empty() && denials.iter().all(|r| r.decision == Some(Decision::Deny)));

    // The console, fed by the same brokerd, shows the call and flags the denials; no frame it
    // draws contains the secret.
    let (feed, rx) = agent_broker_console::feed::Feed::spawn(&w.broker.run_dir())
        .unwrap_or_else(|e| panic!("console feed: {e}"));
    let mut app = agent_broker_console::app::App::new(w.broker.run_dir().display().to_string());
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    while app.history().len() < records.len() && std::time::Instant::now() < deadline {
        if let Ok(msg) = rx.recv_timeout(Duration::from_millis(200)) {
            app.apply(msg);
        }
    }
    drop(feed);
    assert!(
        app.history()
            .iter()
            .any(|e| e.event.path.as_deref() == Some("/echo") && !e.denied),
        "the console model lacks the /echo call"
    );
    assert!(
        app.history().iter().any(|e| e.denied),
        "the console model flags no denial"
    );
    for (width, height) in [(80, 24), (120, 40)] {
        let mut terminal =
            ratatui::Terminal::new(ratatui::backend::TestBackend::new(width, height))
                .unwrap_or_else(|e| panic!("test terminal: {e}"));
        terminal
            .draw(|f| agent_broker_console::ui::render(f, &app))
            .unwrap_or_else(|e| panic!("draw: {e}"));
        let text: String = terminal
            .backend()
            .buffer()
            .content()
            .iter()
            .map(|c| c.symbol())
            .collect();
        w.secret.assert_absent(text.as_bytes(), "a console frame");
    }
    w.assert_no_secret_in_logs();
}
