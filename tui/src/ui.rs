//! Drawing: a pure function of an [`App`] and the frame size. Nothing here changes state.
//!
//! Layout, top to bottom: a status line, the table of calls, the per-agent summary beside the
//! detail of the selected call, and a line of key hints. Times are shown in UTC.

use agent_broker_core::time::{utc_hms, utc_timestamp};
use agent_broker_protocol::{AuditEvent, EventKind, RequestOutcome};
use ratatui::{
    Frame,
    layout::{Constraint, Layout, Rect},
    style::{Color, Modifier, Style},
    text::{Line, Span},
    widgets::{Block, Cell, Clear, Paragraph, Row, Table, Wrap},
};

use crate::app::{App, Connection, Entry, agent_of, is_call};

/// Smallest terminal the console lays out; below it, a message says so.
pub const MIN_WIDTH: u16 = 40;
pub const MIN_HEIGHT: u16 = 10;

/// From this table width on, the pid/comm and latency columns are shown.
const WIDE_TABLE: u16 = 100;

/// Marks a denial or failure in the first column.
pub const DENIAL_MARKER: &str = "!";

const DENIED: Style = Style::new().fg(Color::Red).add_modifier(Modifier::BOLD);
const BOOKKEEPING: Style = Style::new().fg(Color::Cyan);
const SELECTED: Modifier = Modifier::REVERSED;
const LABEL: Style = Style::new().fg(Color::DarkGray);
const HEADER: Style = Style::new().add_modifier(Modifier::BOLD);
const WAITING: Style = Style::new()
    .fg(Color::Black)
    .bg(Color::Yellow)
    .add_modifier(Modifier::BOLD);
const PAUSED: Style = Style::new()
    .fg(Color::Black)
    .bg(Color::Yellow)
    .add_modifier(Modifier::BOLD);

/// Where each pane goes.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Panes {
    pub status: Rect,
    pub table: Rect,
    pub agents: Rect,
    pub detail: Rect,
    pub footer: Rect,
}

/// Splits the agents pane to show `n` credentials below the agents, when there are any.
fn split_for_credentials(agents: Rect, n: usize) -> (Rect, Option<Rect>) {
    if n == 0 || agents.height < 8 {
        return (agents, None);
    }
    let wanted = u16::try_from(n).unwrap_or(u16::MAX).saturating_add(3);
    let height = wanted.min(agents.height / 2);
    let [top, bottom] =
        Layout::vertical([Constraint::Fill(1), Constraint::Length(height)]).areas(agents);
    (top, Some(bottom))
}

/// Splits the calls pane to show `n` requests waiting for approval above the calls, when there
/// are any.
fn split_for_approvals(table: Rect, n: usize) -> (Rect, Option<Rect>) {
    if n == 0 || table.height < 6 {
        return (table, None);
    }
    // Borders, a header, a key line, and up to five requests.
    let wanted = u16::try_from(n.min(5)).unwrap_or(5).saturating_add(4);
    let height = wanted.min(table.height / 2);
    let [top, bottom] =
        Layout::vertical([Constraint::Length(height), Constraint::Fill(1)]).areas(table);
    (bottom, Some(top))
}

/// The requests waiting for an operator, highlighted: who asks (agent, pid, exe), what
/// (method, host, path), why (the rule that asked), and the keys that decide.
fn render_approvals(frame: &mut Frame, area: Rect, app: &App) {
    let mut title = vec![Span::styled(
        format!(" {} waiting for approval ", app.approvals().len()),
        WAITING,
    )];
    title.push(Span::styled(
        " a allow once | t allow 1h | A always | x deny | Tab next ",
        LABEL,
    ));
    if let Some(note) = app.approval_note() {
        title.push(Span::raw(format!(" {note} ")));
    }
    let block = Block::bordered()
        .border_style(Style::new().fg(Color::Yellow))
        .title(Line::from(title));
    let selected = app.selected_approval().map(|p| p.id);
    let now = app.now_ms();
    let rows = app.approvals().iter().map(|p| {
        let left = p.expires_ms.saturating_sub(now) / 1000;
        let why = match (&p.agent_reason, &p.rule) {
            (Some(reason), _) => format!("agent says: {reason}"),
            (None, Some(rule)) => format!("rule {rule}"),
            (None, None) => "no rule allows it".into(),
        };
        let who = format!(
            "{} {}",
            p.pid.map_or_else(|| "-".into(), |pid| pid.to_string()),
            p.exe.as_deref().or(p.comm.as_deref()).unwrap_or("-")
        );
        let row = Row::new(vec![
            Cell::from(format!("#{}", p.id)),
            Cell::from(p.agent.clone()),
            Cell::from(who),
            Cell::from(p.method.clone()),
            Cell::from(format!("{}:{}{}", p.host, p.port, p.path)),
            Cell::from(why),
            Cell::from(format!("{left}s")),
        ]);
        if Some(p.id) == selected {
            row.style(WAITING.add_modifier(SELECTED))
        } else {
            row.style(Style::new().fg(Color::Yellow))
        }
    });
    let constraints = [
        Constraint::Length(5),
        Constraint::Fill(2),
        Constraint::Fill(2),
        Constraint::Length(7),
        Constraint::Fill(4),
        Constraint::Fill(3),
        Constraint::Length(5),
    ];
    let table = Table::new(rows, constraints)
        .header(
            Row::new([
                "ID",
                "AGENT",
                "PID EXE",
                "METHOD",
                "DESTINATION",
                "WHY",
                "LEFT",
            ])
            .style(HEADER),
        )
        .column_spacing(1)
        .block(block);
    frame.render_widget(table, area);
}

/// Splits `area` into panes; None when it is too small to be useful.
pub fn layout(area: Rect) -> Option<Panes> {
    if area.width < MIN_WIDTH || area.height < MIN_HEIGHT {
        return None;
    }
    let [status, body, footer] = Layout::vertical([
        Constraint::Length(1),
        Constraint::Fill(1),
        Constraint::Length(1),
    ])
    .areas(area);
    let bottom_height = if body.height >= 28 {
        14
    } else {
        body.height / 2
    };
    let [table, bottom] =
        Layout::vertical([Constraint::Fill(1), Constraint::Length(bottom_height)]).areas(body);
    let agents_width = (bottom.width * 2 / 5).clamp(34, 44);
    let [agents, detail] =
        Layout::horizontal([Constraint::Length(agents_width), Constraint::Fill(1)]).areas(bottom);
    Some(Panes {
        status,
        table,
        agents,
        detail,
        footer,
    })
}

/// Data rows the table shows in a frame of `area` (borders and header excluded).
pub fn table_rows(area: Rect) -> usize {
    layout(area).map_or(1, |p| usize::from(p.table.height.saturating_sub(3)).max(1))
}

/// Draws the whole console.
pub fn render(frame: &mut Frame, app: &App) {
    let area = frame.area();
    let Some(panes) = layout(area) else {
        render_too_small(frame, area);
        return;
    };
    render_status(frame, panes.status, app);
    let table = match split_for_approvals(panes.table, app.approvals().len()) {
        (table, Some(approvals)) => {
            render_approvals(frame, approvals, app);
            table
        }
        (table, None) => table,
    };
    render_table(frame, table, app);
    let (agents, credentials) = split_for_credentials(panes.agents, app.credentials().len());
    render_agents(frame, agents, app);
    if let Some(area) = credentials {
        render_credentials(frame, area, app);
    }
    render_detail(frame, panes.detail, app);
    render_footer(frame, panes.footer);
    if app.show_help() {
        render_help(frame, area);
    }
}

fn render_too_small(frame: &mut Frame, area: Rect) {
    let text = format!(
        "terminal too small: {}x{}, need {MIN_WIDTH}x{MIN_HEIGHT} (q quits)",
        area.width, area.height
    );
    frame.render_widget(
        Paragraph::new(text).style(DENIED).wrap(Wrap { trim: true }),
        area,
    );
}

fn render_status(frame: &mut Frame, area: Rect, app: &App) {
    let sep = || Span::styled(" | ", LABEL);
    let mut spans = vec![Span::styled(" agent-broker console ", HEADER)];
    if app.paused() {
        spans.push(Span::styled(
            format!(" PAUSED ({} new) ", app.new_while_paused()),
            PAUSED,
        ));
    }
    spans.push(sep());
    spans.push(match app.connection() {
        Connection::Connecting => Span::styled(
            format!("connecting to {}...", app.run_dir()),
            Style::new().fg(Color::Yellow),
        ),
        Connection::Connected => Span::styled(
            format!("connected to {}", app.run_dir()),
            Style::new().fg(Color::Green),
        ),
        Connection::Disconnected { reason } => {
            Span::styled(format!("disconnected, retrying... ({reason})"), DENIED)
        }
    });
    if let Some(info) = app.brokerd()
        && *app.connection() == Connection::Connected
    {
        spans.push(sep());
        spans.push(Span::raw(format!(
            "brokerd {} pid {}, {} tagged",
            info.version, info.pid, info.tagged
        )));
        if let Some(error) = &info.policy_error {
            spans.push(sep());
            spans.push(Span::styled(
                format!("policy not reloaded: {error}"),
                DENIED,
            ));
        }
    }
    if let Some(notice) = app.notice() {
        spans.push(sep());
        spans.push(Span::styled(notice, Style::new().fg(Color::Yellow)));
    }
    frame.render_widget(Line::from(spans), area);
}

/// The table's columns.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Col {
    Mark,
    Time,
    Agent,
    Proc,
    Method,
    Host,
    Path,
    Status,
    Latency,
    Info,
}

fn columns(width: u16) -> Vec<(Col, Constraint, &'static str)> {
    use Constraint::{Fill, Length};
    if width >= WIDE_TABLE {
        vec![
            (Col::Mark, Length(1), ""),
            (Col::Time, Length(8), "TIME"),
            (Col::Agent, Length(16), "AGENT"),
            (Col::Proc, Length(14), "PID/COMM"),
            (Col::Method, Length(6), "METHOD"),
            (Col::Host, Fill(3), "HOST"),
            (Col::Path, Fill(3), "PATH"),
            (Col::Status, Length(6), "STATUS"),
            (Col::Latency, Length(7), "LATENCY"),
            (Col::Info, Fill(5), "SECRETS / REASON"),
        ]
    } else {
        vec![
            (Col::Mark, Length(1), ""),
            (Col::Time, Length(8), "TIME"),
            (Col::Agent, Length(12), "AGENT"),
            (Col::Method, Length(6), "METHOD"),
            (Col::Host, Fill(1), "HOST"),
            (Col::Path, Fill(1), "PATH"),
            (Col::Status, Length(4), "CODE"),
            (Col::Info, Fill(1), "SECRETS / REASON"),
        ]
    }
}

fn cell_text(col: Col, width: u16, entry: &Entry) -> String {
    let e = &entry.event;
    match col {
        Col::Mark => if entry.denied { DENIAL_MARKER } else { " " }.into(),
        Col::Time => utc_hms(e.time_ms),
        Col::Agent => ellipsize_left(agent_of(e), usize::from(width)),
        Col::Proc => match (e.pid, &e.comm) {
            (Some(pid), Some(comm)) => format!("{pid} {comm}"),
            (Some(pid), None) => pid.to_string(),
            (None, Some(comm)) => comm.clone(),
            (None, None) => "-".into(),
        },
        Col::Method => e.method.clone().unwrap_or_else(|| kind_tag(e.kind).into()),
        Col::Host => e
            .host
            .clone()
            .or_else(|| e.sni.clone())
            .or_else(|| e.original_dst.map(|a| a.to_string()))
            .unwrap_or_else(|| "-".into()),
        Col::Path => e.path.clone().unwrap_or_else(|| "-".into()),
        Col::Status => match (e.status, e.outcome) {
            (Some(s), _) => s.to_string(),
            // A request under way, or one the agent abandoned before the answer.
            (None, Some(RequestOutcome::Forwarded)) => "fwd".into(),
            (None, Some(RequestOutcome::Cancelled)) => "cancel".into(),
            (None, _) => "-".into(),
        },
        Col::Latency => e.latency_us.map_or_else(|| "-".into(), latency),
        Col::Info => {
            if entry.denied || e.kind == Some(EventKind::PolicyReload) {
                e.reason
                    .clone()
                    .or_else(|| e.decision.map(|d| d.as_str().into()))
                    .unwrap_or_else(|| "-".into())
            } else if e.secrets.is_empty() {
                "-".into()
            } else {
                e.secrets.join(",")
            }
        }
    }
}

/// What the six-character method column shows for an event that is not an HTTP request: a
/// column tag, not a name (the detail pane and every other output spell the kind by its name).
fn kind_tag(kind: Option<EventKind>) -> &'static str {
    match kind {
        Some(EventKind::Request) | None => "-",
        Some(EventKind::Denial) => "CONN",
        Some(EventKind::TlsFailure) => "TLS",
        Some(EventKind::HandleMisuse) => "HANDLE",
        Some(EventKind::Attach) => "ATTACH",
        Some(EventKind::Detach) => "DETACH",
        Some(EventKind::PolicyReload) => "RELOAD",
        Some(EventKind::Dns) => "DNS",
        Some(EventKind::Credential) => "CRED",
        Some(EventKind::Approval) => "ASK",
    }
}

fn render_table(frame: &mut Frame, area: Rect, app: &App) {
    let visible = app.visible();
    let selected = app.selected_index(&visible);
    let rows = usize::from(area.height.saturating_sub(3)).max(1);
    let start = crate::app::window_start(app.offset(), selected, visible.len(), rows);

    let mut title = vec![Span::styled(
        format!(" calls {}/{} ", visible.len(), app.history().len()),
        HEADER,
    )];
    if let Some(agent) = app.agent_filter() {
        title.push(Span::styled(
            format!("[agent {agent}] "),
            Style::new().fg(Color::Yellow),
        ));
    }
    if app.denied_only() {
        title.push(Span::styled(
            "[denied only] ",
            Style::new().fg(Color::Yellow),
        ));
    }
    if app.evicted() > 0 {
        title.push(Span::styled(
            format!("[{} oldest dropped] ", app.evicted()),
            LABEL,
        ));
    }
    if !app.following() {
        title.push(Span::styled("[End: follow newest] ", LABEL));
    }
    let block = Block::bordered().title(Line::from(title));
    let inner = block.inner(area);

    let cols = columns(inner.width);
    let constraints: Vec<Constraint> = cols.iter().map(|(_, c, _)| *c).collect();
    // The widths the table will give each column, to shorten agent paths from the left.
    let widths = Layout::horizontal(constraints.clone())
        .spacing(1)
        .split(inner);
    let header = Row::new(cols.iter().map(|(_, _, h)| Cell::from(*h))).style(HEADER);
    let body = visible
        .iter()
        .enumerate()
        .skip(start)
        .take(rows)
        .map(|(i, entry)| {
            let cells = cols
                .iter()
                .zip(widths.iter())
                .map(|((col, _, _), rect)| Cell::from(cell_text(*col, rect.width, entry)));
            let mut style = if entry.denied {
                DENIED
            } else if is_call(&entry.event) {
                Style::new()
            } else {
                BOOKKEEPING
            };
            if Some(i) == selected {
                style = style.add_modifier(SELECTED);
            }
            Row::new(cells).style(style)
        });
    let table = Table::new(body, constraints)
        .header(header)
        .column_spacing(1)
        .block(block);
    frame.render_widget(table, area);
    if visible.is_empty() && inner.height > 1 {
        let text = if app.history().is_empty() {
            "waiting for events..."
        } else {
            "no events match the filter (f: next agent, d: denied-only)"
        };
        let line_area = Rect {
            x: inner.x + 2,
            y: inner.y + 1,
            width: inner.width.saturating_sub(2),
            height: 1,
        };
        frame.render_widget(Paragraph::new(text).style(LABEL), line_area);
    }
}

fn render_agents(frame: &mut Frame, area: Rect, app: &App) {
    let block = Block::bordered().title(Line::from(vec![Span::styled(
        format!(" agents {} ", app.agents().len()),
        HEADER,
    )]));
    let rows_fit = usize::from(area.height.saturating_sub(3)).max(1);
    let filter_index = app
        .agent_filter()
        .and_then(|f| app.agents().keys().position(|k| k == f));
    let start = crate::app::window_start(0, filter_index, app.agents().len(), rows_fit);
    let constraints = [
        Constraint::Fill(1),
        Constraint::Length(5),
        Constraint::Length(4),
        Constraint::Length(3),
        Constraint::Length(4),
    ];
    let name_width = Layout::horizontal(constraints)
        .spacing(1)
        .split(block.inner(area))
        .first()
        .map_or(0, |r| usize::from(r.width.saturating_sub(2)));
    let now = app.now_ms();
    let rows = app
        .agents()
        .iter()
        .skip(start)
        .take(rows_fit)
        .map(|(name, stats)| {
            let chosen = app.agent_filter() == Some(name.as_str());
            let marker = if chosen { "> " } else { "  " };
            let denials = Cell::from(stats.denials.to_string()).style(if stats.denials > 0 {
                DENIED
            } else {
                Style::new()
            });
            let refused: u64 = stats.tls_refusals.values().sum();
            let tls = Cell::from(refused.to_string()).style(if refused > 0 {
                DENIED
            } else {
                Style::new()
            });
            let style = if chosen { HEADER } else { Style::new() };
            Row::new(vec![
                Cell::from(format!("{marker}{}", ellipsize_left(name, name_width))),
                Cell::from(stats.calls.to_string()),
                denials,
                tls,
                Cell::from(stats.calls_last_minute(now).to_string()),
            ])
            .style(style)
        });
    let table = Table::new(rows, constraints)
        .header(Row::new(["  AGENT", "CALLS", "DENY", "TLS", "/MIN"]).style(HEADER))
        .column_spacing(1)
        .block(block);
    frame.render_widget(table, area);
}

/// The credentials brokerd fetches: name, kind and state (failed ones highlighted).
fn render_credentials(frame: &mut Frame, area: Rect, app: &App) {
    let block = Block::bordered().title(Line::from(vec![Span::styled(
        format!(" credentials {} ", app.credentials().len()),
        HEADER,
    )]));
    let constraints = [
        Constraint::Fill(2),
        Constraint::Length(7),
        Constraint::Fill(3),
    ];
    let rows = app.credentials().iter().map(|c| {
        let state = c.state.clone().unwrap_or_default();
        let style = if state.starts_with("failed") {
            DENIED
        } else {
            Style::new()
        };
        Row::new(vec![
            Cell::from(c.name.clone()),
            Cell::from(c.kind.clone()),
            Cell::from(state),
        ])
        .style(style)
    });
    let table = Table::new(rows, constraints)
        .header(Row::new(["NAME", "KIND", "STATE"]).style(HEADER))
        .column_spacing(1)
        .block(block);
    frame.render_widget(table, area);
}

fn render_detail(frame: &mut Frame, area: Rect, app: &App) {
    let entry = app.selected_entry();
    let title = match entry {
        Some(e) if e.event.seq != 0 => format!(" detail #{} ", e.event.seq),
        _ => " detail ".into(),
    };
    let block = Block::bordered().title(Line::from(vec![Span::styled(title, HEADER)]));
    let inner_width = usize::from(block.inner(area).width);
    let lines = match entry {
        None => vec![Line::styled("no event selected", LABEL)],
        Some(entry) => {
            let mut fields = detail_fields(&entry.event);
            if entry.event.kind == Some(EventKind::TlsFailure)
                && let Some(stats) = app.agents().get(agent_of(&entry.event))
            {
                // Which of this agent's programs failed handshakes, and what to do about it.
                let by_comm: Vec<String> = stats
                    .tls_refusals
                    .iter()
                    .map(|(comm, n)| format!("{comm} x{n}"))
                    .collect();
                fields.push(("agent's TLS refusals", by_comm.join(", ")));
                fields.push(("fix", agent_broker_protocol::TLS_REFUSAL_FIX.into()));
            }
            pack_fields(&fields, inner_width, entry.denied)
        }
    };
    frame.render_widget(
        Paragraph::new(lines)
            .wrap(Wrap { trim: false })
            .block(block),
        area,
    );
}

/// Lays `label value` pairs out left to right, starting a new line when one does not fit.
fn pack_fields(
    fields: &[(&'static str, String)],
    width: usize,
    denied: bool,
) -> Vec<Line<'static>> {
    let mut lines = Vec::new();
    let mut current: Vec<Span<'static>> = Vec::new();
    let mut used = 0;
    for (label, value) in fields {
        let len = label.chars().count() + 1 + value.chars().count();
        if used > 0 && used + 2 + len > width {
            lines.push(Line::from(std::mem::take(&mut current)));
            used = 0;
        }
        if used > 0 {
            current.push(Span::raw("  "));
            used += 2;
        }
        let value_style = if denied && matches!(*label, "reason" | "decision" | "side") {
            DENIED
        } else {
            Style::new()
        };
        current.push(Span::styled(format!("{label} "), LABEL));
        current.push(Span::styled(value.clone(), value_style));
        used += len;
    }
    if !current.is_empty() {
        lines.push(Line::from(current));
    }
    lines
}

/// Every field of an event, labelled, in the order an operator reads them; fields the event
/// does not have are left out. This names each field of [`AuditEvent`] on purpose (no `..`): a
/// new field does not compile until someone decides how the console shows it.
pub fn detail_fields(event: &AuditEvent) -> Vec<(&'static str, String)> {
    let AuditEvent {
        seq,
        time_ms,
        kind,
        cgroup,
        pid,
        comm,
        exe,
        original_dst,
        sni,
        method,
        host,
        path,
        status,
        bytes_in,
        bytes_out,
        latency_us,
        decision,
        rule,
        reason,
        secrets,
        side,
        request_id,
        outcome,
        tokens,
        tokens_estimated,
        count,
        cgroup_path,
        pod,
        approval,
    } = event;
    let mut out: Vec<(&'static str, String)> = vec![("time", utc_timestamp(*time_ms))];
    let mut opt = |label: &'static str, value: Option<String>| {
        if let Some(value) = value {
            out.push((label, value));
        }
    };
    opt("seq", (*seq != 0).then(|| seq.to_string()));
    opt("kind", kind.map(|k| k.as_str().into()));
    opt("outcome", outcome.map(|o| o.as_str().into()));
    opt("request", request_id.map(|id| id.to_string()));
    opt("decision", decision.map(|d| d.as_str().into()));
    opt("reason", reason.clone());
    opt("rule", rule.clone());
    opt(
        "approval",
        approval.as_ref().map(|a| match &a.by {
            Some(by) => format!("#{} by {by}", a.id),
            None => format!("#{}", a.id),
        }),
    );
    opt("side", side.map(|s| s.as_str().into()));
    opt("agent", cgroup.clone());
    opt("cgroup", cgroup_path.clone());
    opt("pod", pod.as_ref().map(ToString::to_string));
    opt("pid", pid.map(|p| p.to_string()));
    opt("comm", comm.clone());
    opt("exe", exe.clone());
    opt("method", method.clone());
    opt("host", host.clone());
    opt("path", path.clone());
    opt("status", status.map(|s| s.to_string()));
    opt("latency", latency_us.map(latency));
    opt("bytes_in", Some(bytes_in.to_string()));
    opt("bytes_out", Some(bytes_out.to_string()));
    opt("dst", original_dst.map(|a| a.to_string()));
    opt("sni", sni.clone());
    opt("secrets", (!secrets.is_empty()).then(|| secrets.join(", ")));
    opt("tokens", tokens.map(|t| t.to_string()));
    opt("estimated", tokens_estimated.clone());
    opt(
        "count",
        count.map(|n| format!("{n} like events refused in a burst")),
    );
    out
}

fn render_footer(frame: &mut Frame, area: Rect) {
    let keys = [
        ("up/down", "select"),
        ("f", "agent"),
        ("d", "denied"),
        ("p", "pause"),
        ("?", "help"),
        ("q", "quit"),
    ];
    let mut spans = vec![Span::raw(" ")];
    for (key, what) in keys {
        spans.push(Span::styled(key, HEADER));
        spans.push(Span::styled(format!(" {what}  "), LABEL));
    }
    frame.render_widget(Line::from(spans), area);
}

const HELP: &[(&str, &str)] = &[
    ("up/down, k/j", "select a row"),
    ("PgUp/PgDn", "move a page"),
    ("Home", "oldest event"),
    ("End", "newest, and follow new events"),
    ("f", "next agent filter (all, then each)"),
    ("d", "denied-only on/off"),
    ("p, space", "pause/resume; new events wait"),
    ("a, t, A, x", "waiting: allow once/1h/always, deny"),
    ("Tab", "next waiting request"),
    ("?", "this help; any key closes it"),
    ("q, Esc, Ctrl-C", "quit"),
];

fn render_help(frame: &mut Frame, area: Rect) {
    let mut lines: Vec<Line> = HELP
        .iter()
        .map(|(key, what)| {
            Line::from(vec![
                Span::styled(format!("{key:<16}"), HEADER),
                Span::raw(*what),
            ])
        })
        .collect();
    lines.push(Line::raw(""));
    lines.push(Line::from(vec![
        Span::styled(format!("{DENIAL_MARKER:<16}"), DENIED),
        Span::raw("a denial or failure (reason in"),
    ]));
    lines.push(Line::raw(format!(
        "{:<16}the last column and the detail)",
        ""
    )));
    let height = u16::try_from(lines.len() + 2).unwrap_or(u16::MAX);
    let popup = centered(area, 54, height);
    frame.render_widget(Clear, popup);
    frame.render_widget(
        Paragraph::new(lines).block(Block::bordered().title(Span::styled(" keys ", HEADER))),
        popup,
    );
}

fn centered(area: Rect, width: u16, height: u16) -> Rect {
    let width = width.min(area.width);
    let height = height.min(area.height);
    Rect {
        x: area.x + (area.width - width) / 2,
        y: area.y + (area.height - height) / 2,
        width,
        height,
    }
}

/// A latency in microseconds, short: `850us`, `4.2ms`, `120ms`, `1.25s`.
pub fn latency(us: u64) -> String {
    match us {
        0..1_000 => format!("{us}us"),
        1_000..10_000 => format!("{}.{}ms", us / 1000, (us % 1000) / 100),
        10_000..1_000_000 => format!("{}ms", us / 1000),
        _ => format!("{}.{:02}s", us / 1_000_000, (us % 1_000_000) / 10_000),
    }
}

/// `s` shortened to `width` characters by cutting its start (the end of a cgroup path is the
/// part that tells agents apart).
pub fn ellipsize_left(s: &str, width: usize) -> String {
    let len = s.chars().count();
    if len <= width {
        return s.to_string();
    }
    if width == 0 {
        return String::new();
    }
    let tail: String = s.chars().skip(len - (width - 1)).collect();
    format!("…{tail}")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn formats_latency() {
        assert_eq!(latency(850), "850us");
        assert_eq!(latency(4_250), "4.2ms");
        assert_eq!(latency(120_000), "120ms");
        assert_eq!(latency(1_250_000), "1.25s");
    }

    #[test]
    fn shortens_from_the_left() {
        assert_eq!(ellipsize_left("agents/demo/tool", 8), "…mo/tool");
        assert_eq!(ellipsize_left("short", 8), "short");
        assert_eq!(ellipsize_left("abc", 0), "");
    }

    #[test]
    fn tiny_layout_is_refused() {
        assert!(layout(Rect::new(0, 0, 39, 24)).is_none());
        assert!(layout(Rect::new(0, 0, 80, 9)).is_none());
        assert!(layout(Rect::new(0, 0, 40, 10)).is_some());
    }
}
