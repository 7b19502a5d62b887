//! Approval at run time, end to end: a real curl in the agent's cgroup makes a request a rule
//! holds (`approve = "ask"`) or that no rule allows under `on_unknown = "ask"`; the request
//! waits in brokerd while the test decides it with `brokerctl approve`, the console (in a real
//! terminal, tmux), or a webhook (a local HTTP receiver the test runs, and the callback brokerd
//! serves); the agent's call then completes, or gets brokerd's 403 with the reason. The audit
//! log names who decided.
//!
//! Needs root, cgroup v2 and BPF, curl and tmux.
//!
//! Run as root: `cargo test -p agent-broker-tests --test approvals -- --test-threads=1`.

use std::{
    io::{BufRead as _, BufReader, Read as _, Write as _},
    net::{TcpListener, TcpStream},
    process::Command,
    sync::mpsc,
    thread,
    time::{Duration, Instant},
};

use agent_broker_protocol::{Decision, EventKind, PendingApproval};
use agent_broker_tests::{
    TestCa, TestCgroup, TestUpstream,
    clients::{self, Call},
    poll_until,
    world::{API, OTHER, World, api_ip, rule},
};

const WAIT: Duration = Duration::from_secs(15);

/// The agent's policy: the test API with the key injected, only once an operator approves.
fn asking_policy(cg: &TestCgroup, api: &TestUpstream) -> Vec<(String, String)> {
    vec![(
        "agent".into(),
        format!(
            "cgroup = \"{}\"\n{}approve = \"ask\"\n",
            cg.child("agent"),
            rule(API, api.port(), true)
        ),
    )]
}

/// The agent's policy: the test API with the key injected; anything else asks.
fn unknown_asks_policy(cg: &TestCgroup, api: &TestUpstream) -> Vec<(String, String)> {
    vec![(
        "agent".into(),
        format!(
            "cgroup = \"{}\"\non_unknown = \"ask\"\n{}",
            cg.child("agent"),
            rule(API, api.port(), true)
        ),
    )]
}

/// The requests waiting, as `brokerctl approve list --json` shows them.
fn pending(w: &World) -> Vec<PendingApproval> {
    let out = w.broker.ctl_ok(&["approve", "list", "--json"]);
    serde_json::from_str(&out).unwrap_or_else(|e| panic!("approve list --json ({e}): {out}"))
}

/// Waits until exactly one request waits, and returns it.
fn wait_pending(w: &World) -> PendingApproval {
    poll_until(WAIT, || {
        let p = pending(w);
        (p.len() == 1).then(|| p[0].clone())
    })
    .unwrap_or_else(|| {
        panic!(
            "no request started waiting for approval: {:?}\nbrokerd's log:\n{}",
            pending(w),
            w.broker.log()
        )
    })
}

/// The approval records of request `id`, once there are `n`.
fn approval_records(w: &World, id: u64, n: usize) -> Vec<agent_broker_protocol::AuditEvent> {
    poll_until(WAIT, || {
        let records: Vec<_> = w
            .broker
            .audit_records()
            .into_iter()
            .filter(|r| {
                r.kind == Some(EventKind::Approval)
                    && r.approval.as_ref().is_some_and(|a| a.id == id)
            })
            .collect();
        (records.len() >= n).then_some(records)
    })
    .unwrap_or_else(|| {
        panic!(
            "fewer than {n} approval records for #{id}\n{}",
            w.broker.log()
        )
    })
}

fn hash_call(w: &World) -> Call {
    Call::new(API, api_ip(), w.api.port(), "/hash")
}

#[test]
fn a_held_request_completes_once_allowed_from_the_cli_and_the_record_names_who() {
    let w = World::with_policies(asking_policy);
    thread::scope(|s| {
        let started = Instant::now();
        let agent = s.spawn(|| clients::curl(&w.broker, &w.agent, &w.trust(), &hash_call(&w)));
        let p = wait_pending(&w);
        assert_eq!(p.agent, w.agent);
        assert_eq!(
            (p.method.as_str(), p.host.as_str(), p.port),
            ("GET", API, w.api.port())
        );
        assert_eq!(p.path, "/hash");
        assert!(p.pid.is_some() && p.held, "{p:?}");
        assert!(
            p.rule.as_deref().is_some_and(|r| r.contains("allow[0]")),
            "{p:?}"
        );
        assert!(
            !agent.is_finished(),
            "the agent's call must wait for the decision"
        );
        // The listing shows it too, in words.
        let listed = w.broker.ctl_ok(&["approve", "list"]);
        assert!(
            listed.contains(&format!("{}:{}", API, w.api.port())),
            "{listed}"
        );

        let decided = w.broker.ctl_ok(&["approve", "allow", &p.id.to_string()]);
        assert!(decided.contains("allowed once"), "{decided}");
        let (run, report) = agent.join().expect("agent thread");
        w.assert_injected("a request allowed once", &run, &report);
        assert!(started.elapsed() < WAIT);

        let records = approval_records(&w, p.id, 2);
        assert_eq!(records[0].decision, None, "the ask: {:?}", records[0]);
        let decision = records
            .iter()
            .find(|r| r.decision == Some(Decision::Allow))
            .expect("the decision's record");
        let by = decision.approval.as_ref().and_then(|a| a.by.clone());
        assert_eq!(by.as_deref(), Some("cli uid 0"));
        // The request's own record says which approval let it through.
        let request = w.broker.wait_record("the request's record", WAIT, |r| {
            r.kind == Some(EventKind::Request) && r.status == Some(200)
        });
        let rule = request.rule.unwrap_or_default();
        assert!(
            rule.contains(&format!("approval #{} by cli uid 0", p.id)),
            "{rule}"
        );
        // The metrics count it: decided, and nothing pending any more.
        let metrics = w.broker.ctl_ok(&["metrics"]);
        let line = |name: &str, extra: &str| {
            metrics
                .lines()
                .find(|l| {
                    l.starts_with(name)
                        && l.contains(&format!("agent=\"{}\"", w.agent))
                        && l.contains(extra)
                })
                .map(|l| l.rsplit(' ').next().unwrap_or_default().to_string())
        };
        assert_eq!(
            line(
                "agent_broker_approvals_decided_total",
                "decision=\"allow_once\""
            )
            .as_deref(),
            Some("1"),
            "{metrics}"
        );
        assert_eq!(
            line("agent_broker_approvals_pending", "").as_deref(),
            Some("0"),
            "{metrics}"
        );

        // Once means once: the next call asks again; denied, the agent is told why.
        let agent = s.spawn(|| clients::curl(&w.broker, &w.agent, &w.trust(), &hash_call(&w)));
        let p = wait_pending(&w);
        w.broker.ctl_ok(&[
            "approve",
            "deny",
            &p.id.to_string(),
            "--reason",
            "not during the demo",
        ]);
        let (_, report) = agent.join().expect("agent thread");
        let reason = report.assert_denied(&w.agent, "a denied request");
        assert!(reason.contains("not during the demo"), "{reason}");
    });
    w.assert_no_secret_in_logs();
}

#[test]
fn a_request_nobody_decides_is_denied_at_the_timeout() {
    let w = World::with_broker_args(
        TestCa::new("abtest upstream CA"),
        &["--approval-timeout", "2"],
        asking_policy,
    );
    let started = Instant::now();
    let (_, report) = clients::curl(&w.broker, &w.agent, &w.trust(), &hash_call(&w));
    let waited = started.elapsed();
    let reason = report.assert_denied(&w.agent, "a request nobody approved");
    assert!(reason.contains("within 2s"), "{reason}");
    assert!(waited >= Duration::from_secs(2), "denied after {waited:?}");
    assert!(pending(&w).is_empty());
    // Nothing went upstream.
    assert!(w.api.requests().iter().all(|r| r.path != "/hash"));
}

#[test]
fn allow_always_survives_a_restart_and_a_widening_one_is_refused() {
    let mut w = World::with_policies(unknown_asks_policy);
    let other = Call::new(OTHER, api_ip(), w.api.port(), "/hash");
    thread::scope(|s| {
        let agent = s.spawn(|| clients::curl(&w.broker, &w.agent, &w.trust(), &other));
        let p = wait_pending(&w);
        assert_eq!(p.host, OTHER);
        assert!(p.rule.is_none(), "no rule allows it: {p:?}");
        let decided = w
            .broker
            .ctl_ok(&["approve", "allow", &p.id.to_string(), "--always"]);
        assert!(decided.contains("always"), "{decided}");
        let (run, report) = agent.join().expect("agent thread");
        assert_eq!(report.status, 200, "{}\n{}", report.show(), run.show());
        // Nothing is injected into a request no rule allows.
        assert_eq!(
            report.json()["authorization_sha256"],
            serde_json::Value::Null
        );
    });
    let written = std::fs::read_dir(w.broker.policy_dir())
        .expect("policy dir")
        .flatten()
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .find(|n| n.ends_with(".approved.toml"))
        .unwrap_or_else(|| panic!("no approvals file in the policy directory"));
    let text = std::fs::read_to_string(w.broker.policy_dir().join(&written)).expect("read");
    assert!(
        text.contains("approvals = true") && text.contains(OTHER),
        "{text}"
    );

    // After a restart the decision stands: the call goes at once, asking nobody.
    w.broker.stop();
    w.broker.restart();
    let (_, report) = clients::curl(&w.broker, &w.agent, &w.trust(), &other);
    assert_eq!(report.status, 200, "{}\n{}", report.show(), w.broker.log());
    assert!(pending(&w).is_empty());

    // A parent that asks too but allows only these two names: "always" for a third name would
    // widen what the parent allows, and is refused with the loader's reason; nothing is written.
    let parent = format!(
        "cgroup = \"{}\"\non_unknown = \"ask\"\n{}{}",
        w.cg.path(),
        rule(API, w.api.port(), true),
        rule(OTHER, w.api.port(), false)
    );
    w.broker.write_policy("parent", &parent);
    w.broker.ctl_ok(&["policy", "reload"]);
    let third = "third.example.test";
    w.broker.add_name(third, api_ip());
    let call = Call::new(third, api_ip(), w.api.port(), "/hash");
    thread::scope(|s| {
        let agent = s.spawn(|| clients::curl(&w.broker, &w.agent, &w.trust(), &call));
        let p = wait_pending(&w);
        let out = w
            .broker
            .ctl_output(&["approve", "allow", &p.id.to_string(), "--always"]);
        assert!(!out.status.success());
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(
            err.contains("would not load") && err.contains(third),
            "{err}"
        );
        let text = std::fs::read_to_string(w.broker.policy_dir().join(&written)).expect("read");
        assert!(
            !text.contains(third),
            "a refused decision was written: {text}"
        );
        // It still waits, for another decision.
        assert_eq!(pending(&w).len(), 1);
        w.broker.ctl_ok(&["approve", "deny", &p.id.to_string()]);
        let (_, report) = agent.join().expect("agent thread");
        report.assert_denied(&w.agent, "a request whose widening approval was refused");
    });
}

/// Runs `brokerctl console` in a detached tmux session of its own; killed on drop.
struct Tmux {
    session: String,
}

impl Tmux {
    fn start(w: &World) -> Self {
        let session = format!("abtest-console-{}", std::process::id());
        let ctl = w.broker.ctl();
        let mut line = vec![ctl.get_program().to_string_lossy().into_owned()];
        line.extend(ctl.get_args().map(|a| a.to_string_lossy().into_owned()));
        line.push("console".into());
        let status = Command::new("tmux")
            .args(["new-session", "-d", "-x", "200", "-y", "50", "-s", &session])
            .arg(line.join(" "))
            .status()
            .expect("tmux");
        assert!(status.success(), "tmux new-session failed");
        Self { session }
    }

    fn screen(&self) -> String {
        let out = Command::new("tmux")
            .args(["capture-pane", "-p", "-t", &self.session])
            .output()
            .expect("tmux capture-pane");
        String::from_utf8_lossy(&out.stdout).into_owned()
    }

    fn keys(&self, keys: &str) {
        let status = Command::new("tmux")
            .args(["send-keys", "-t", &self.session, keys])
            .status()
            .expect("tmux send-keys");
        assert!(status.success());
    }
}

impl Drop for Tmux {
    fn drop(&mut self) {
        let _ = Command::new("tmux")
            .args(["kill-session", "-t", &self.session])
            .status();
    }
}

#[test]
fn the_console_shows_a_waiting_request_and_allows_it_with_a_key() {
    let w = World::with_policies(asking_policy);
    let console = Tmux::start(&w);
    thread::scope(|s| {
        let agent = s.spawn(|| clients::curl(&w.broker, &w.agent, &w.trust(), &hash_call(&w)));
        let p = wait_pending(&w);
        let screen = poll_until(WAIT, || {
            let screen = console.screen();
            screen.contains("waiting for approval").then_some(screen)
        })
        .unwrap_or_else(|| {
            panic!(
                "the console never showed the request:\n{}",
                console.screen()
            )
        });
        for shown in [
            format!("#{}", p.id),
            "GET".into(),
            format!("{API}:{}/hash", w.api.port()),
        ] {
            assert!(
                screen.contains(&shown),
                "{shown} not on the console:\n{screen}"
            );
        }
        console.keys("a");
        let (run, report) = agent.join().expect("agent thread");
        w.assert_injected("a request allowed from the console", &run, &report);
        let records = approval_records(&w, p.id, 2);
        let by = records
            .iter()
            .find_map(|r| r.approval.as_ref().and_then(|a| a.by.clone()));
        assert_eq!(by.as_deref(), Some("console uid 0"));
        // The pane goes once nothing waits.
        poll_until(WAIT, || {
            (!console.screen().contains("waiting for approval")).then_some(())
        })
        .unwrap_or_else(|| panic!("the pane stayed:\n{}", console.screen()));
    });
}

/// A webhook receiver: accepts POSTs, answers 200, hands each body to the test.
fn webhook_receiver() -> (u16, mpsc::Receiver<serde_json::Value>) {
    let listener = TcpListener::bind("127.0.0.1:0").expect("bind");
    let port = listener.local_addr().expect("addr").port();
    let (tx, rx) = mpsc::channel();
    thread::spawn(move || {
        for stream in listener.incoming().flatten() {
            let _ = stream.set_read_timeout(Some(Duration::from_secs(5)));
            let mut reader = BufReader::new(stream);
            let mut length = 0usize;
            loop {
                let mut line = String::new();
                if reader.read_line(&mut line).unwrap_or(0) == 0 {
                    break;
                }
                let lower = line.to_ascii_lowercase();
                if let Some(v) = lower.strip_prefix("content-length:") {
                    length = v.trim().parse().unwrap_or(0);
                }
                if line == "\r\n" {
                    break;
                }
            }
            let mut body = vec![0u8; length];
            if reader.read_exact(&mut body).is_err() {
                continue;
            }
            let mut stream = reader.into_inner();
            let _ = stream
                .write_all(b"HTTP/1.1 200 OK\r\ncontent-length: 0\r\nconnection: close\r\n\r\n");
            if let Ok(v) = serde_json::from_slice(&body) {
                let _ = tx.send(v);
            }
        }
    });
    (port, rx)
}

/// POSTs `body` to `url` (`http://addr/path`) with a bearer token; the status and body.
fn post(url: &str, token: &str, body: &str) -> (u16, String) {
    let rest = url.strip_prefix("http://").expect("an http:// callback");
    let (addr, path) = rest.split_at(rest.find('/').expect("a path"));
    let mut stream = TcpStream::connect(addr).expect("connect to the callback");
    stream
        .set_read_timeout(Some(Duration::from_secs(10)))
        .expect("timeout");
    write!(
        stream,
        "POST {path} HTTP/1.1\r\nhost: {addr}\r\nauthorization: Bearer {token}\r\ncontent-type: application/json\r\ncontent-length: {}\r\nconnection: close\r\n\r\n{body}",
        body.len()
    )
    .expect("write");
    let mut response = String::new();
    let _ = stream.read_to_string(&mut response);
    let status = response
        .split_whitespace()
        .nth(1)
        .and_then(|s| s.parse().ok())
        .unwrap_or(0);
    let body = response
        .split("\r\n\r\n")
        .nth(1)
        .unwrap_or_default()
        .to_string();
    (status, body)
}

#[test]
fn a_webhook_gets_the_request_and_decides_it_at_the_callback_with_its_token() {
    let (hook_port, hooks) = webhook_receiver();
    let callback = TcpListener::bind("127.0.0.1:0").expect("free port");
    let callback_addr = callback.local_addr().expect("addr");
    drop(callback);
    let hook = format!("http://127.0.0.1:{hook_port}/approvals");
    let callback_arg = callback_addr.to_string();
    let w = World::with_broker_args(
        TestCa::new("abtest upstream CA"),
        &[
            "--approval-webhook",
            &hook,
            "--approval-callback",
            &callback_arg,
        ],
        asking_policy,
    );
    thread::scope(|s| {
        let agent = s.spawn(|| clients::curl(&w.broker, &w.agent, &w.trust(), &hash_call(&w)));
        let payload = hooks
            .recv_timeout(WAIT)
            .unwrap_or_else(|_| panic!("the webhook got nothing\n{}", w.broker.log()));
        let raw = payload.to_string();
        w.secret
            .assert_absent(raw.as_bytes(), "the webhook payload");
        assert_eq!(payload["agent"].as_str(), Some(w.agent.as_str()));
        assert_eq!(payload["host"].as_str(), Some(API));
        assert_eq!(payload["method"].as_str(), Some("GET"));
        let id = payload["id"].as_u64().expect("an id");
        let url = payload["callback"]
            .as_str()
            .expect("a callback URL")
            .to_string();
        assert_eq!(url, format!("http://{callback_addr}/approvals/{id}"));
        let token = payload["token"].as_str().expect("a token").to_string();
        assert_eq!(token.len(), 64);

        // Another token (another request's, or a guess) is refused, and nothing is decided.
        let (status, _) = post(&url, &"0".repeat(64), r#"{"decision":"allow_once"}"#);
        assert_eq!(status, 403);
        let (status, _) = post(&url, &token, r#"{"decision":"maybe"}"#);
        assert_eq!(status, 400);
        assert_eq!(pending(&w).len(), 1);

        let (status, body) = post(&url, &token, r#"{"decision":"allow_once"}"#);
        assert_eq!(status, 200, "{body}");
        let (run, report) = agent.join().expect("agent thread");
        w.assert_injected("a request allowed by the webhook", &run, &report);
        let records = approval_records(&w, id, 2);
        let by = records
            .iter()
            .find_map(|r| r.approval.as_ref().and_then(|a| a.by.clone()));
        assert_eq!(by.as_deref(), Some("webhook"));
        // Decided once: the token is spent.
        let (status, _) = post(&url, &token, r#"{"decision":"allow_once"}"#);
        assert_eq!(status, 404);
    });
}
