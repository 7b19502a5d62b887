//! The console model: key-driven state transitions, protocol lines into the model, the event
//! loop with scripted input, and what an event may carry.

#[expect(dead_code, reason = "this file does not compare snapshots")]
mod common;

use std::{collections::BTreeSet, sync::mpsc, time::Duration};

use agent_broker_console::{
    App, ConsoleError, FeedMsg, StreamDecoder,
    app::Connection,
    event_loop::{self, Input},
    feed::Decoded,
    ui,
};
use agent_broker_protocol::{AuditEvent, EventKind};
use common::{NOW, RUN_DIR, app, buffer_text, events};
use ratatui::{
    Terminal,
    backend::TestBackend,
    crossterm::event::{Event, KeyCode, KeyEvent, KeyModifiers},
};

fn press(app: &mut App, code: KeyCode) {
    app.handle_key(KeyEvent::from(code));
}

fn selected_seq(app: &App) -> Option<u64> {
    app.selected_entry().map(|e| e.event.seq)
}

fn visible_seqs(app: &App) -> Vec<u64> {
    app.visible().iter().map(|e| e.event.seq).collect()
}

#[test]
fn selection_moves_and_follows() {
    let mut app = app();
    app.set_viewport(3);
    assert!(app.following());
    assert_eq!(selected_seq(&app), Some(9));

    press(&mut app, KeyCode::Up);
    assert!(!app.following());
    assert_eq!(selected_seq(&app), Some(8));
    // A new event does not move an explicit selection.
    let mut e = events()[1].clone();
    e.seq = 10;
    app.ingest(e);
    assert_eq!(selected_seq(&app), Some(8));

    press(&mut app, KeyCode::Down);
    assert_eq!(selected_seq(&app), Some(9));
    press(&mut app, KeyCode::Down);
    assert!(app.following(), "reaching the newest row follows again");
    assert_eq!(selected_seq(&app), Some(10));

    press(&mut app, KeyCode::Home);
    assert_eq!(selected_seq(&app), Some(1));
    assert_eq!(app.offset(), 0);
    press(&mut app, KeyCode::PageDown);
    assert_eq!(
        selected_seq(&app),
        Some(4),
        "a page is the viewport's 3 rows"
    );
    press(&mut app, KeyCode::PageUp);
    press(&mut app, KeyCode::PageUp);
    assert_eq!(selected_seq(&app), Some(1), "paging stops at the oldest");
    press(&mut app, KeyCode::End);
    assert!(app.following());
    assert_eq!(
        app.offset(),
        10 - 3,
        "following keeps the newest rows in view"
    );
}

#[test]
fn agent_filter_cycles_through_the_cgroups_seen() {
    let mut app = app();
    let mut seen = Vec::new();
    for _ in 0..4 {
        press(&mut app, KeyCode::Char('f'));
        seen.push(app.agent_filter().map(str::to_string));
    }
    assert_eq!(
        seen,
        [
            Some("(brokerd)".to_string()),
            Some("agents/demo".to_string()),
            Some("agents/scraper/worker".to_string()),
            None
        ]
    );
    press(&mut app, KeyCode::Char('f'));
    press(&mut app, KeyCode::Char('f'));
    assert_eq!(visible_seqs(&app), [1, 2, 3, 8, 9]);
}

#[test]
fn denied_only_shows_denials_and_failures() {
    let mut app = app();
    press(&mut app, KeyCode::Up); // select #8, an allowed call
    press(&mut app, KeyCode::Char('d'));
    assert!(app.denied_only());
    assert_eq!(visible_seqs(&app), [3, 4, 6, 9]);
    assert!(
        app.following(),
        "a selection the filter hides falls back to the newest"
    );
    press(&mut app, KeyCode::Char('d'));
    assert_eq!(visible_seqs(&app).len(), 9);
}

#[test]
fn pause_buffers_new_events_and_resume_releases_them() {
    let mut app = app();
    press(&mut app, KeyCode::Char('p'));
    assert!(app.paused());
    for seq in 10..13 {
        let mut e = events()[1].clone();
        e.seq = seq;
        app.ingest(e);
    }
    assert_eq!(app.history().len(), 9, "the view is frozen");
    assert_eq!(app.new_while_paused(), 3);
    press(&mut app, KeyCode::Char('p'));
    assert!(!app.paused());
    assert_eq!(app.new_while_paused(), 0);
    assert_eq!(app.history().len(), 12);
    assert_eq!(selected_seq(&app), Some(12));
}

#[test]
fn pause_buffer_is_bounded_too() {
    let mut app = App::with_capacity(RUN_DIR, 3);
    press(&mut app, KeyCode::Char('p'));
    for e in events() {
        app.ingest(e);
    }
    assert_eq!(
        app.new_while_paused(),
        9,
        "the marker counts every event that came"
    );
    press(&mut app, KeyCode::Char('p'));
    let seqs: Vec<u64> = app.history().iter().map(|e| e.event.seq).collect();
    assert_eq!(seqs, [7, 8, 9], "only the newest fit");
}

#[test]
fn history_is_bounded() {
    let mut app = App::with_capacity(RUN_DIR, 100);
    let template = events()[1].clone();
    for seq in 1..=1000 {
        app.ingest(AuditEvent {
            seq,
            time_ms: template.time_ms + seq,
            ..template.clone()
        });
    }
    assert_eq!(app.history().len(), 100);
    assert_eq!(app.evicted(), 900);
    assert_eq!(app.history().front().map(|e| e.event.seq), Some(901));
    assert_eq!(app.agents()["agents/demo"].calls, 1000);
}

#[test]
fn help_quit_and_escape() {
    let mut app = app();
    press(&mut app, KeyCode::Char('?'));
    assert!(app.show_help());
    press(&mut app, KeyCode::Esc);
    assert!(!app.show_help(), "Esc closes the help first");
    assert!(!app.should_quit());
    press(&mut app, KeyCode::Esc);
    assert!(app.should_quit());

    let mut app = common::app();
    press(&mut app, KeyCode::Char('q'));
    assert!(app.should_quit());

    let mut app = common::app();
    app.handle_key(KeyEvent::new(KeyCode::Char('c'), KeyModifiers::CONTROL));
    assert!(app.should_quit());
}

fn json_event(seq: u64, time_ms: u64, kind: &str, decision: &str, reason: &str) -> String {
    format!(
        concat!(
            r#"{{"response":"event","event":{{"seq":{},"time_ms":{},"kind":"{}","#,
            r#""cgroup":"agents/demo","pid":4242,"comm":"curl","exe":"/usr/bin/curl","#,
            r#""original_dst":"127.0.0.1:443","sni":"api.openai.com","method":"GET","#,
            r#""host":"api.openai.com","path":"/v1/models","status":200,"bytes_in":0,"#,
            r#""bytes_out":512,"latency_us":1830,"decision":"{}","rule":"demo.toml:3 allow[0]","#,
            r#""reason":{},"secrets":["OPENAI_KEY"],"side":null}}}}"#,
            "\n"
        ),
        seq, time_ms, kind, decision, reason
    )
}

#[test]
fn protocol_lines_reach_the_model_through_the_reader_decoder() {
    let mut app = App::new(RUN_DIR);
    app.tick(NOW);
    let t = common::T0;
    let mut decoder = StreamDecoder::for_logs();
    let lines = [
        json_event(41, t + 1_000, "request", "allow", "null"),
        json_event(42, t + 2_000, "denial", "deny", r#""no rule allows GET""#),
        r#"{"response":"end_of_log"}"#.to_string() + "\n",
        json_event(43, t + 3_000, "request", "allow", "null"),
        "this is not json\n".to_string(),
        r#"{"response":"policy_reloaded","files":1}"#.to_string(),
    ];
    let mut history_flags = Vec::new();
    for line in &lines {
        match decoder.decode(line.as_bytes()) {
            Decoded::Msg(msg) => {
                if let FeedMsg::Event { history, .. } = &msg {
                    history_flags.push(*history);
                }
                app.apply(msg);
            }
            Decoded::Refused(reason) => panic!("refused: {reason}"),
        }
    }
    assert_eq!(history_flags, [true, true, false]);
    assert!(app.history_loaded());
    let seqs: Vec<u64> = app.history().iter().map(|e| e.event.seq).collect();
    assert_eq!(seqs, [41, 42, 43]);
    let denial = &app.history()[1];
    assert!(denial.denied);
    assert_eq!(denial.event.kind, Some(EventKind::Denial));
    assert_eq!(denial.event.reason.as_deref(), Some("no rule allows GET"));
    assert_eq!(denial.event.original_dst, "127.0.0.1:443".parse().ok());
    assert_eq!(app.agents()["agents/demo"].calls, 3);
    assert_eq!(app.agents()["agents/demo"].denials, 1);
    assert_eq!(app.agents()["agents/demo"].calls_last_minute(NOW), 3);
    assert!(
        app.notice().is_some_and(|n| n.contains("policy_reloaded")),
        "{:?}",
        app.notice()
    );

    // brokerd restarts: the reader reconnects and the recent log is replayed.
    app.apply(FeedMsg::Disconnected(
        "brokerd closed the connection".into(),
    ));
    assert!(matches!(app.connection(), Connection::Disconnected { .. }));
    app.apply(FeedMsg::Connected(None));
    let mut decoder = StreamDecoder::for_logs();
    for line in [
        json_event(42, t + 2_000, "denial", "deny", r#""no rule allows GET""#),
        json_event(43, t + 3_000, "request", "allow", "null"),
        r#"{"response":"end_of_log"}"#.to_string(),
        json_event(44, t + 4_000, "request", "allow", "null"),
    ] {
        if let Decoded::Msg(msg) = decoder.decode(line.as_bytes()) {
            app.apply(msg);
        }
    }
    let seqs: Vec<u64> = app.history().iter().map(|e| e.event.seq).collect();
    assert_eq!(
        seqs,
        [41, 42, 43, 44],
        "replayed records are not shown twice"
    );
    assert_eq!(*app.connection(), Connection::Connected);
}

#[test]
fn an_error_answer_is_a_refusal_not_an_event() {
    let mut decoder = StreamDecoder::for_logs();
    let got = decoder.decode(
        br#"{"response":"error","kind":"internal","message":"the audit log is not available in this build"}"#,
    );
    assert_eq!(
        got,
        Decoded::Refused("the audit log is not available in this build (internal)".into())
    );
}

/// Every field an audit event has, as brokerd serializes it. If the protocol grows a field,
/// this fails until someone checks that the new field cannot hold a secret value and decides
/// how the console shows it (`ui::detail_fields` names every field and stops compiling too).
#[test]
fn audit_events_carry_only_the_known_fields() {
    let json = serde_json::to_value(AuditEvent::default()).expect("serialize");
    let keys: BTreeSet<&str> = json
        .as_object()
        .expect("object")
        .keys()
        .map(String::as_str)
        .collect();
    let expected: BTreeSet<&str> = [
        "seq",
        "time_ms",
        "kind",
        "cgroup",
        "pid",
        "comm",
        "exe",
        "original_dst",
        "sni",
        "method",
        "host",
        "path",
        "status",
        "bytes_in",
        "bytes_out",
        "latency_us",
        "decision",
        "rule",
        "reason",
        "secrets",
        "side",
    ]
    .into_iter()
    .collect();
    assert_eq!(keys, expected);
}

#[test]
fn the_model_holds_events_exactly_as_sent() {
    let app = app();
    let held: Vec<AuditEvent> = app.history().iter().map(|e| e.event.clone()).collect();
    assert_eq!(held, events(), "nothing added, nothing enriched");
    // The detail shows each field from the event itself, labelled.
    let fields = ui::detail_fields(&events()[2]);
    let labels: Vec<&str> = fields.iter().map(|(l, _)| *l).collect();
    for label in [
        "reason",
        "rule",
        "side",
        "dst",
        "sni",
        "bytes_in",
        "bytes_out",
        "exe",
    ] {
        assert!(labels.contains(&label), "{label} missing from {labels:?}");
    }
}

/// A named agent's record (`attach --as`) shows the name as the agent and its real cgroup.
#[test]
fn a_named_agents_detail_shows_the_name_and_the_cgroup() {
    let event = AuditEvent {
        cgroup: Some("agents/named/sub".into()),
        cgroup_path: Some("libpod_parent/libpod-0a1b/sub".into()),
        ..events()[2].clone()
    };
    let fields = ui::detail_fields(&event);
    let value = |label: &str| {
        fields
            .iter()
            .find(|(l, _)| *l == label)
            .map(|(_, v)| v.as_str())
    };
    assert_eq!(value("agent"), Some("agents/named/sub"));
    assert_eq!(value("cgroup"), Some("libpod_parent/libpod-0a1b/sub"));
    // A record of an unnamed tag has no cgroup line: the agent is the path.
    let plain = ui::detail_fields(&events()[2]);
    assert!(plain.iter().all(|(l, _)| *l != "cgroup"), "{plain:?}");
}

#[test]
fn a_line_smuggling_a_secret_value_is_refused_and_never_drawn() {
    let secret = "sk-live-THIS-MUST-NEVER-SHOW";
    let mut line = json_event(50, common::T0, "request", "allow", "null");
    line = line.replace(
        r#""secrets":["OPENAI_KEY"]"#,
        &format!(r#""secrets":["OPENAI_KEY"],"secret_value":"{secret}""#),
    );
    let mut app = app();
    match StreamDecoder::for_logs().decode(line.as_bytes()) {
        Decoded::Msg(msg) => {
            assert!(matches!(msg, FeedMsg::BadLine(_)), "{msg:?}");
            app.apply(msg);
        }
        Decoded::Refused(r) => panic!("{r}"),
    }
    assert_eq!(app.history().len(), 9);
    for (w, h) in [(80, 24), (120, 40), (200, 60)] {
        let mut terminal = Terminal::new(TestBackend::new(w, h)).expect("terminal");
        event_loop::draw(&mut terminal, &mut app).expect("draw");
        let text = buffer_text(terminal.backend().buffer());
        assert!(!text.contains("sk-live"), "{text}");
    }
}

/// Keys from a script; `q` once the script is done, so a loop under test always ends.
struct Script(Vec<Event>);

impl Input for Script {
    fn next_event(&mut self, _timeout: Duration) -> std::io::Result<Option<Event>> {
        if self.0.is_empty() {
            return Ok(Some(Event::Key(KeyEvent::from(KeyCode::Char('q')))));
        }
        Ok(Some(self.0.remove(0)))
    }
}

#[test]
fn event_loop_runs_on_a_test_backend() -> Result<(), ConsoleError> {
    let (tx, rx) = mpsc::sync_channel(64);
    tx.send(FeedMsg::Connected(None)).expect("send");
    for e in events() {
        tx.send(FeedMsg::Event {
            event: Box::new(e),
            history: false,
        })
        .expect("send");
    }
    let mut app = App::new(RUN_DIR);
    let mut terminal = Terminal::new(TestBackend::new(120, 40)).expect("terminal");
    let mut script = Script(vec![
        Event::Key(KeyEvent::from(KeyCode::Char('d'))),
        Event::Resize(80, 24),
        Event::Key(KeyEvent::from(KeyCode::Up)),
        Event::FocusLost,
    ]);
    event_loop::run_loop(
        &mut terminal,
        &mut app,
        &rx,
        &mut script,
        || NOW,
        &mut |_, _| {},
    )?;
    assert!(app.should_quit());
    assert!(app.denied_only());
    assert_eq!(app.history().len(), 9);
    assert_eq!(selected_seq(&app), Some(6));
    assert_eq!(app.now_ms(), NOW);
    let text = buffer_text(terminal.backend().buffer());
    assert!(text.contains("[denied only]"), "{text}");

    // The reader gone is shown, not fatal.
    drop(tx);
    event_loop::drain(&mut app, &rx);
    assert!(matches!(app.connection(), Connection::Disconnected { .. }));
    Ok(())
}

#[test]
fn a_summed_burst_of_refusals_counts_as_every_event_it_stands_for() {
    let mut app = App::new(RUN_DIR);
    app.apply(agent_broker_console::FeedMsg::Connected(None));
    app.tick(NOW);
    let refusal = |seq, count| AuditEvent {
        seq,
        time_ms: NOW - 1000,
        kind: Some(EventKind::Denial),
        decision: Some(agent_broker_protocol::Decision::Deny),
        cgroup: Some("agents/flood".into()),
        reason: Some("connection refused: agent agents/flood is at its share".into()),
        count,
        ..AuditEvent::default()
    };
    app.ingest(refusal(1, None));
    app.ingest(refusal(2, Some(40)));
    let stats = &app.agents()["agents/flood"];
    assert_eq!(stats.denials, 41);
    assert_eq!(stats.calls, 41);
}

fn waiting(id: u64, host: &str) -> agent_broker_protocol::PendingApproval {
    agent_broker_protocol::PendingApproval {
        id,
        agent: "agents/coder".into(),
        pid: Some(4242),
        comm: Some("python3".into()),
        exe: Some("/usr/bin/python3.11".into()),
        method: "POST".into(),
        host: host.into(),
        port: 443,
        path: "/v1/upload".into(),
        rule: Some("policies/coder.toml:4 allow[0]".into()),
        why: "rule asks".into(),
        agent_reason: None,
        held: true,
        asked_ms: NOW,
        expires_ms: NOW + 60_000,
    }
}

#[test]
fn waiting_requests_show_in_their_own_pane_and_keys_decide_them() {
    use agent_broker_protocol::ApprovalDecision;
    let mut app = app();
    app.tick(NOW);
    // Nothing waits: the decision keys do nothing.
    press(&mut app, KeyCode::Char('a'));
    assert!(app.take_decisions().is_empty());

    app.apply(FeedMsg::Approvals(vec![
        waiting(7, "upload.example.test"),
        waiting(8, "other.example.test"),
    ]));
    let mut terminal = Terminal::new(TestBackend::new(160, 40)).expect("terminal");
    terminal.draw(|f| ui::render(f, &app)).expect("draw");
    let text = buffer_text(terminal.backend().buffer());
    assert!(text.contains("2 waiting for approval"), "{text}");
    for shown in [
        "#7",
        "agents/coder",
        "4242",
        "/usr/bin/python3.11",
        "POST",
        "upload.example.test:443/v1/upload",
        "coder.toml:4",
        "60s",
    ] {
        assert!(text.contains(shown), "{shown} missing:\n{text}");
    }

    press(&mut app, KeyCode::Char('a'));
    assert_eq!(app.take_decisions(), vec![(7, ApprovalDecision::AllowOnce)]);
    press(&mut app, KeyCode::Tab);
    assert_eq!(app.selected_approval().map(|p| p.id), Some(8));
    press(&mut app, KeyCode::Char('x'));
    press(&mut app, KeyCode::Char('A'));
    press(&mut app, KeyCode::Char('t'));
    let decisions = app.take_decisions();
    assert!(matches!(decisions[0], (8, ApprovalDecision::Deny { .. })));
    assert_eq!(decisions[1], (8, ApprovalDecision::AllowAlways));
    assert_eq!(
        decisions[2],
        (
            8,
            ApprovalDecision::AllowUntil {
                until_ms: NOW + 3_600_000
            }
        )
    );

    // brokerd's answer is shown; a request decided elsewhere leaves the pane.
    app.apply(FeedMsg::Decided("#8: allowed always".into()));
    app.apply(FeedMsg::Approvals(vec![waiting(8, "other.example.test")]));
    assert_eq!(app.selected_approval().map(|p| p.id), Some(8));
    terminal.draw(|f| ui::render(f, &app)).expect("draw");
    let text = buffer_text(terminal.backend().buffer());
    assert!(text.contains("#8: allowed always"), "{text}");
    assert!(!text.contains("upload.example.test"), "{text}");
    app.apply(FeedMsg::Approvals(Vec::new()));
    terminal.draw(|f| ui::render(f, &app)).expect("draw");
    assert!(!buffer_text(terminal.backend().buffer()).contains("waiting for approval"));
}
