//! The panes drawn with `TestBackend` at fixed sizes, compared with text snapshots.

mod common;

use agent_broker_console::{App, FeedMsg, event_loop, ui};
use common::{NOW, RUN_DIR, app, assert_snapshot, buffer_text};
use ratatui::{
    Terminal,
    backend::TestBackend,
    crossterm::event::{KeyCode, KeyEvent},
    style::Color,
};

fn frame(app: &mut App, width: u16, height: u16) -> (String, Terminal<TestBackend>) {
    let mut terminal = Terminal::new(TestBackend::new(width, height)).expect("terminal");
    event_loop::draw(&mut terminal, app).expect("draw");
    (buffer_text(terminal.backend().buffer()), terminal)
}

fn press(app: &mut App, code: KeyCode, times: usize) {
    for _ in 0..times {
        app.handle_key(KeyEvent::from(code));
    }
}

#[test]
fn snapshot_80x24_following_newest() {
    let mut app = app();
    let (text, _) = frame(&mut app, 80, 24);
    assert_snapshot("console_80x24", &text);
}

#[test]
fn snapshot_120x40_denial_selected() {
    let mut app = app();
    // From the newest (a connection denial), up to the DELETE the policy denied.
    press(&mut app, KeyCode::Up, 6);
    let (text, _) = frame(&mut app, 120, 40);
    assert!(text.contains("no rule allows DELETE"), "{text}");
    assert_snapshot("console_120x40_denial", &text);
}

#[test]
fn snapshot_120x40_filtered_paused_disconnected() {
    let mut app = app();
    press(&mut app, KeyCode::Char('f'), 3); // (brokerd), agents/demo, agents/scraper/worker
    assert_eq!(app.agent_filter(), Some("agents/scraper/worker"));
    press(&mut app, KeyCode::Char('d'), 1);
    press(&mut app, KeyCode::Char('p'), 1);
    let mut late = common::events()[1].clone();
    late.seq = 10;
    late.time_ms = NOW;
    app.ingest(late);
    app.apply(FeedMsg::Disconnected(format!(
        "cannot connect to {RUN_DIR}/control.sock: Connection refused (os error 111)"
    )));
    let (text, _) = frame(&mut app, 120, 40);
    assert!(text.contains("PAUSED (1 new)"), "{text}");
    assert!(text.contains("disconnected, retrying..."), "{text}");
    assert_snapshot("console_120x40_filtered_paused", &text);
}

#[test]
fn snapshot_120x40_tls_refusal_selected_names_the_program_and_the_fix() {
    let mut app = app();
    // From the newest (a connection denial), up to node's failed handshake.
    let up = common::events()
        .iter()
        .rev()
        .position(|e| e.kind == Some(agent_broker_protocol::EventKind::TlsFailure))
        .expect("a TLS failure in the fixture");
    press(&mut app, KeyCode::Up, up);
    let (text, _) = frame(&mut app, 120, 40);
    assert!(text.contains("agent's TLS refusals node x1"), "{text}");
    assert!(
        text.contains("make the client trust the broker CA"),
        "{text}"
    );
    assert_snapshot("console_120x40_tls_refusal", &text);
}

#[test]
fn snapshot_80x24_help() {
    let mut app = app();
    press(&mut app, KeyCode::Char('?'), 1);
    let (text, _) = frame(&mut app, 80, 24);
    assert_snapshot("console_80x24_help", &text);
}

#[test]
fn snapshot_80x24_empty_waiting() {
    let mut app = App::new(RUN_DIR);
    app.tick(NOW);
    let (text, _) = frame(&mut app, 80, 24);
    assert!(text.contains("connecting to /run/agent-broker"), "{text}");
    assert_snapshot("console_80x24_empty", &text);
}

#[test]
fn denials_stand_out_with_a_marker_and_red() {
    let mut app = app();
    let (text, terminal) = frame(&mut app, 120, 40);
    let buffer = terminal.backend().buffer();
    let rows: Vec<&str> = text.lines().collect();
    let mut denied_rows = 0;
    for (y, line) in rows.iter().enumerate() {
        let y = u16::try_from(y).expect("row");
        // Table rows start with the border then the marker column.
        if line.starts_with("│! ") {
            denied_rows += 1;
            assert_eq!(buffer[(2, y)].fg, Color::Red, "row {y}: {line}");
        } else if line.starts_with("│  ") && line.contains("pypi.org") {
            assert_ne!(buffer[(2, y)].fg, Color::Red, "row {y}: {line}");
        }
    }
    // Policy denial, TLS failure, handle misuse, connection denial.
    assert_eq!(denied_rows, 4, "{text}");
    // The reason starts in the table; the detail pane has all of it.
    assert!(text.contains("agent rejected the bro"), "{text}");
    assert!(
        text.contains("reason no rule for 127.0.0.3:5432 (not TLS or HTTP)"),
        "{text}"
    );
}

#[test]
fn survives_resizes_and_tiny_terminals() {
    let mut app = app();
    let (_, mut terminal) = frame(&mut app, 120, 40);
    terminal.backend_mut().resize(20, 5);
    event_loop::draw(&mut terminal, &mut app).expect("draw 20x5");
    let small = buffer_text(terminal.backend().buffer());
    assert!(small.contains("terminal too"), "{small}");
    terminal.backend_mut().resize(80, 24);
    event_loop::draw(&mut terminal, &mut app).expect("draw 80x24");
    let again = buffer_text(terminal.backend().buffer());
    let (fresh, _) = frame(&mut app, 80, 24);
    assert_eq!(again, fresh, "a resized frame is the same as a fresh one");

    // Every size from nothing to large, with help open and closed: no panic.
    for show_help in [false, true] {
        if show_help {
            press(&mut app, KeyCode::Char('?'), 1);
        }
        for width in (0..=130).step_by(7) {
            for height in (0..=45).step_by(4) {
                terminal.backend_mut().resize(width, height);
                event_loop::draw(&mut terminal, &mut app).expect("draw");
            }
        }
    }
}

#[test]
fn table_rows_match_the_layout() {
    use ratatui::layout::Rect;
    assert_eq!(ui::table_rows(Rect::new(0, 0, 80, 24)), 8);
    assert_eq!(ui::table_rows(Rect::new(0, 0, 120, 40)), 21);
    assert_eq!(ui::table_rows(Rect::new(0, 0, 10, 3)), 1);
}

#[test]
fn credentials_brokerd_fetches_show_below_the_agents_with_failures_highlighted() {
    let mut app = app();
    let info = |name: &str, kind: &str, state: &str| agent_broker_protocol::SecretInfo {
        name: name.into(),
        version: 1,
        created_unix: 0,
        updated_unix: 0,
        kind: kind.into(),
        source: None,
        state: Some(state.into()),
        valid_until_unix: None,
        last_used_unix: None,
    };
    app.apply(FeedMsg::Credentials(vec![
        info("GITHUB_OAUTH", "oauth", "valid"),
        info(
            "VAULT_KEY",
            "exec",
            "failed: /usr/bin/op failed with exit status 1",
        ),
    ]));
    let (text, terminal) = frame(&mut app, 120, 40);
    assert!(text.contains("credentials 2"), "{text}");
    assert!(
        text.contains("GITHUB_OAUTH") && text.contains("oauth"),
        "{text}"
    );
    assert!(
        text.contains("VAULT_KEY") && text.contains("failed:"),
        "{text}"
    );
    // The failed row is drawn in the denial colour.
    let buffer = terminal.backend().buffer();
    let row = (0..buffer.area.height)
        .find(|&y| {
            (0..buffer.area.width)
                .map(|x| buffer[(x, y)].symbol())
                .collect::<String>()
                .contains("VAULT_KEY")
        })
        .expect("the failed credential's row");
    let x = (0..buffer.area.width)
        .find(|&x| buffer[(x, row)].symbol() == "V")
        .expect("its name");
    assert_eq!(
        buffer[(x, row)].fg,
        Color::Red,
        "failed credentials are highlighted"
    );
    // Without credentials the pane is not drawn.
    app.apply(FeedMsg::Credentials(Vec::new()));
    let (text, _) = frame(&mut app, 120, 40);
    assert!(!text.contains("credentials"), "{text}");
}
