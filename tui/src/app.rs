//! The console's model: what has been seen, what is shown, and what the keys do.
//!
//! Nothing here does I/O or reads a clock: events arrive through [`App::apply`], time through
//! [`App::tick`], keys through [`App::handle_key`]. The renderer only reads an `App`.

use std::collections::{BTreeMap, HashSet, VecDeque};

use agent_broker_protocol::{
    ApprovalDecision, AuditEvent, EventKind, PendingApproval, RequestOutcome, StatusReport,
};
use ratatui::crossterm::event::{KeyCode, KeyEvent, KeyEventKind, KeyModifiers};

use crate::feed::FeedMsg;

/// Events kept for the table by default; older ones are dropped first.
pub const DEFAULT_HISTORY: usize = 10_000;

/// Distinct agents (cgroups) tracked in the summary; the least recently seen goes first.
pub const MAX_AGENTS: usize = 1_024;

/// Width of the rate window, in seconds.
pub const RATE_WINDOW_SECS: u64 = 60;

/// How an event without a cgroup (a policy reload) is attributed.
pub const BROKER_AGENT: &str = "(brokerd)";

/// Whether an event counts as a call of its agent (not bookkeeping such as attach or reload,
/// nor the `forwarded` record of a request whose end is another record).
pub fn is_call(event: &AuditEvent) -> bool {
    !matches!(
        event.kind,
        Some(EventKind::Attach | EventKind::Detach | EventKind::PolicyReload)
    ) && event.outcome != Some(RequestOutcome::Forwarded)
}

/// The agent an event is attributed to: its cgroup path.
pub fn agent_of(event: &AuditEvent) -> &str {
    event.cgroup.as_deref().unwrap_or(BROKER_AGENT)
}

/// One event in the history, numbered in arrival order so a selection survives eviction.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Entry {
    /// Arrival number, unique within this console.
    pub id: u64,
    /// The event exactly as brokerd sent it.
    pub event: AuditEvent,
    /// Cached [`AuditEvent::is_denial`].
    pub denied: bool,
}

/// Per-agent counters since the console started.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct AgentStats {
    /// Calls (requests, denials, failures).
    pub calls: u64,
    /// Denials and failures.
    pub denials: u64,
    /// Failed TLS handshakes with brokerd, by the program (comm) that failed them: clients that
    /// likely do not trust the broker CA.
    pub tls_refusals: BTreeMap<String, u64>,
    /// Calls per second of event time, for the last [`RATE_WINDOW_SECS`] seconds at most.
    buckets: VecDeque<(u64, u32)>,
    /// Event time of the newest event, for eviction of idle agents.
    last_seen_ms: u64,
}

impl AgentStats {
    fn record(&mut self, event: &AuditEvent, denied: bool, now_ms: u64) {
        self.last_seen_ms = self.last_seen_ms.max(event.time_ms);
        if !is_call(event) {
            return;
        }
        // A record of a burst brokerd summed up (a flood of refused connections or queries)
        // counts as every event it stands for.
        let weight = event.count.unwrap_or(1).max(1);
        self.calls += weight;
        if denied {
            self.denials += weight;
        }
        if event.kind == Some(EventKind::TlsFailure) {
            let comm = event.comm.clone().unwrap_or_else(|| "?".into());
            *self.tls_refusals.entry(comm).or_default() += 1;
        }
        let sec = event.time_ms / 1000;
        if sec + RATE_WINDOW_SECS <= now_ms / 1000 {
            return;
        }
        // Buckets stay sorted by second; an event older than the newest goes into its own.
        let at = self.buckets.partition_point(|(s, _)| *s < sec);
        match self.buckets.get_mut(at) {
            Some((s, n)) if *s == sec => {
                *n = n.saturating_add(u32::try_from(weight).unwrap_or(u32::MAX))
            }
            _ => self
                .buckets
                .insert(at, (sec, u32::try_from(weight).unwrap_or(u32::MAX))),
        }
        self.prune(now_ms);
    }

    fn prune(&mut self, now_ms: u64) {
        let now_sec = now_ms / 1000;
        while let Some((s, _)) = self.buckets.front() {
            // Keep future buckets (clock skew), and never more than a window's worth.
            if *s + RATE_WINDOW_SECS <= now_sec
                || self.buckets.len() > 2 * RATE_WINDOW_SECS as usize
            {
                self.buckets.pop_front();
            } else {
                break;
            }
        }
    }

    /// Calls in the minute before `now_ms`.
    pub fn calls_last_minute(&self, now_ms: u64) -> u64 {
        let now_sec = now_ms / 1000;
        self.buckets
            .iter()
            .filter(|(s, _)| *s + RATE_WINDOW_SECS > now_sec)
            .map(|(_, n)| u64::from(*n))
            .sum()
    }
}

/// The state of the connection to brokerd.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Connection {
    /// The first attempt has not finished.
    Connecting,
    /// Reading events.
    Connected,
    /// Lost or refused; the reader retries every second.
    Disconnected {
        /// What went wrong, for the status line.
        reason: String,
    },
}

/// What brokerd said about itself when the console connected.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct BrokerdInfo {
    pub version: String,
    pub pid: u32,
    /// Tagged cgroups at connect time.
    pub tagged: usize,
    /// Why the newest policy files did not load, if they did not.
    pub policy_error: Option<String>,
}

/// The whole console state.
#[derive(Clone, Debug)]
pub struct App {
    run_dir: String,
    capacity: usize,
    history: VecDeque<Entry>,
    /// Events that arrived while paused, oldest first.
    pending: VecDeque<AuditEvent>,
    /// Events that arrived while paused but did not fit in `pending`.
    pending_dropped: u64,
    /// Events evicted from `history`.
    evicted: u64,
    /// (seq, time_ms) of stored records in `history` and `pending`: a reconnect replays the
    /// recent log, and a record already shown is not shown twice.
    seen: HashSet<(u64, u64)>,
    next_id: u64,
    agents: BTreeMap<String, AgentStats>,
    agent_filter: Option<String>,
    denied_only: bool,
    paused: bool,
    /// None: follow the newest visible event.
    selected: Option<u64>,
    /// First visible row of the table (a hint; the renderer keeps the selection in view).
    offset: usize,
    viewport_rows: usize,
    show_help: bool,
    quit: bool,
    connection: Connection,
    brokerd: Option<BrokerdInfo>,
    history_loaded: bool,
    notice: Option<String>,
    now_ms: u64,
    /// Credentials that are not static, with their states (brokerd's `secret list`).
    credentials: Vec<agent_broker_protocol::SecretInfo>,
    /// Requests waiting for an operator's approval, oldest first (brokerd's `approve list`).
    approvals: Vec<PendingApproval>,
    /// The approval the decision keys act on (an index into `approvals`).
    approval_selected: usize,
    /// Decisions made with keys, for the event loop to send.
    outbox: Vec<(u64, ApprovalDecision)>,
    /// What brokerd answered to the last decision.
    approval_note: Option<String>,
}

/// How long `t` (allow for a while) allows a request for.
pub const ALLOW_FOR: std::time::Duration = std::time::Duration::from_secs(3600);

impl App {
    /// A console for `run_dir` keeping [`DEFAULT_HISTORY`] events.
    pub fn new(run_dir: impl Into<String>) -> Self {
        Self::with_capacity(run_dir, DEFAULT_HISTORY)
    }

    /// A console keeping at most `capacity` events (at least 1).
    pub fn with_capacity(run_dir: impl Into<String>, capacity: usize) -> Self {
        Self {
            run_dir: run_dir.into(),
            capacity: capacity.max(1),
            history: VecDeque::new(),
            pending: VecDeque::new(),
            pending_dropped: 0,
            evicted: 0,
            seen: HashSet::new(),
            next_id: 0,
            agents: BTreeMap::new(),
            agent_filter: None,
            denied_only: false,
            paused: false,
            selected: None,
            offset: 0,
            viewport_rows: 1,
            show_help: false,
            quit: false,
            connection: Connection::Connecting,
            brokerd: None,
            history_loaded: false,
            notice: None,
            now_ms: 0,
            credentials: Vec::new(),
            approvals: Vec::new(),
            approval_selected: 0,
            outbox: Vec::new(),
            approval_note: None,
        }
    }

    /// Applies one message from the reader.
    pub fn apply(&mut self, msg: FeedMsg) {
        match msg {
            FeedMsg::Connected(status) => {
                self.connection = Connection::Connected;
                self.notice = None;
                if let Some(status) = status {
                    self.learn_status(&status);
                }
            }
            FeedMsg::Event { event, .. } => self.ingest(*event),
            FeedMsg::EndOfLog => self.history_loaded = true,
            FeedMsg::LiveOnly(reason) => {
                self.history_loaded = true;
                self.notice = Some(format!("live events only: {reason}"));
            }
            FeedMsg::Disconnected(reason) => {
                self.connection = Connection::Disconnected { reason };
                self.history_loaded = false;
            }
            FeedMsg::BadLine(reason) => {
                self.notice = Some(format!("skipped a line from brokerd: {reason}"));
            }
            FeedMsg::Credentials(credentials) => self.credentials = credentials,
            FeedMsg::Approvals(approvals) => {
                // Keep the same request selected when others come and go.
                let selected = self.selected_approval().map(|p| p.id);
                self.approvals = approvals;
                self.approval_selected = selected
                    .and_then(|id| self.approvals.iter().position(|p| p.id == id))
                    .unwrap_or(0);
            }
            FeedMsg::Decided(note) => self.approval_note = Some(note),
        }
    }

    /// The requests waiting for approval, as last polled (see [`FeedMsg::Approvals`]).
    pub fn approvals(&self) -> &[PendingApproval] {
        &self.approvals
    }

    /// The waiting request the decision keys act on.
    pub fn selected_approval(&self) -> Option<&PendingApproval> {
        self.approvals.get(self.approval_selected)
    }

    /// What brokerd said about the last decision made here.
    pub fn approval_note(&self) -> Option<&str> {
        self.approval_note.as_deref()
    }

    /// The decisions made with keys since the last call, for the event loop to send.
    pub fn take_decisions(&mut self) -> Vec<(u64, ApprovalDecision)> {
        std::mem::take(&mut self.outbox)
    }

    /// A decision key: `a` once, `t` for [`ALLOW_FOR`], `A` always, `x` deny; Tab picks the
    /// next waiting request. False when no request waits (the key then means nothing here).
    fn approval_key(&mut self, code: KeyCode) -> bool {
        let Some(id) = self.selected_approval().map(|p| p.id) else {
            return false;
        };
        let decision = match code {
            KeyCode::Tab => {
                self.approval_selected = (self.approval_selected + 1) % self.approvals.len();
                return true;
            }
            KeyCode::Char('a') => ApprovalDecision::AllowOnce,
            KeyCode::Char('A') => ApprovalDecision::AllowAlways,
            KeyCode::Char('t') => ApprovalDecision::AllowUntil {
                until_ms: self.now_ms + ALLOW_FOR.as_millis() as u64,
            },
            KeyCode::Char('x') => ApprovalDecision::Deny {
                reason: Some("denied from the console".into()),
            },
            _ => return false,
        };
        self.approval_note = Some(format!("#{id}: sent"));
        self.outbox.push((id, decision));
        true
    }

    /// The credentials brokerd fetches, as last polled (see [`FeedMsg::Credentials`]).
    pub fn credentials(&self) -> &[agent_broker_protocol::SecretInfo] {
        &self.credentials
    }

    fn learn_status(&mut self, status: &StatusReport) {
        self.brokerd = Some(BrokerdInfo {
            version: status.version.clone(),
            pid: status.pid,
            tagged: status.cgroups.len(),
            policy_error: status.policy.error.clone(),
        });
        for cgroup in &status.cgroups {
            // Events name an agent by the name its tag runs under.
            let agent = cgroup.name.as_ref().unwrap_or(&cgroup.path);
            if !self.agents.contains_key(agent) {
                self.make_room_for_agent();
                self.agents.insert(agent.clone(), AgentStats::default());
            }
        }
    }

    /// Takes one event: into the history, or into the pause buffer.
    pub fn ingest(&mut self, event: AuditEvent) {
        if event.seq != 0 && !self.seen.insert((event.seq, event.time_ms)) {
            return;
        }
        if self.paused {
            self.pending.push_back(event);
            if self.pending.len() > self.capacity {
                if let Some(old) = self.pending.pop_front() {
                    self.forget(&old);
                }
                self.pending_dropped += 1;
            }
            return;
        }
        self.push(event);
    }

    fn push(&mut self, event: AuditEvent) {
        let denied = event.is_denial();
        let agent = agent_of(&event).to_string();
        if !self.agents.contains_key(&agent) {
            self.make_room_for_agent();
        }
        self.agents
            .entry(agent)
            .or_default()
            .record(&event, denied, self.now_ms);
        self.next_id += 1;
        self.history.push_back(Entry {
            id: self.next_id,
            event,
            denied,
        });
        while self.history.len() > self.capacity {
            if let Some(old) = self.history.pop_front() {
                self.forget(&old.event);
                self.evicted += 1;
                if self.selected == Some(old.id) {
                    self.selected = None;
                }
            }
        }
    }

    fn forget(&mut self, event: &AuditEvent) {
        if event.seq != 0 {
            self.seen.remove(&(event.seq, event.time_ms));
        }
    }

    fn make_room_for_agent(&mut self) {
        if self.agents.len() < MAX_AGENTS {
            return;
        }
        let idle = self
            .agents
            .iter()
            .filter(|(name, _)| Some(*name) != self.agent_filter.as_ref())
            .min_by_key(|(_, s)| s.last_seen_ms)
            .map(|(name, _)| name.clone());
        if let Some(name) = idle {
            self.agents.remove(&name);
        }
    }

    /// Sets the console's idea of now (Unix ms) and ages the rate windows.
    pub fn tick(&mut self, now_ms: u64) {
        self.now_ms = now_ms;
        for stats in self.agents.values_mut() {
            stats.prune(now_ms);
        }
    }

    /// Tells the model how many table rows the screen shows, for paging and scrolling.
    pub fn set_viewport(&mut self, rows: usize) {
        self.viewport_rows = rows.max(1);
        self.fix_offset();
    }

    /// Handles one key press.
    pub fn handle_key(&mut self, key: KeyEvent) {
        if key.kind == KeyEventKind::Release {
            return;
        }
        let ctrl_c = key.modifiers.contains(KeyModifiers::CONTROL)
            && matches!(key.code, KeyCode::Char('c' | 'C'));
        if ctrl_c || key.code == KeyCode::Char('q') {
            self.quit = true;
            return;
        }
        if self.show_help {
            // Any other key just closes the help.
            self.show_help = false;
            return;
        }
        if self.approval_key(key.code) {
            return;
        }
        let page = isize::try_from(self.viewport_rows).unwrap_or(isize::MAX);
        match key.code {
            KeyCode::Esc => self.quit = true,
            KeyCode::Char('?') => self.show_help = true,
            KeyCode::Up | KeyCode::Char('k') => self.move_selection(-1),
            KeyCode::Down | KeyCode::Char('j') => self.move_selection(1),
            KeyCode::PageUp => self.move_selection(-page),
            KeyCode::PageDown => self.move_selection(page),
            KeyCode::Home | KeyCode::Char('g') => self.select_first(),
            KeyCode::End | KeyCode::Char('G') => self.selected = None,
            KeyCode::Char('f') => self.cycle_agent_filter(),
            KeyCode::Char('d') => self.toggle_denied_only(),
            KeyCode::Char('p') | KeyCode::Char(' ') => self.toggle_pause(),
            _ => {}
        }
        self.fix_offset();
    }

    fn move_selection(&mut self, delta: isize) {
        let ids: Vec<u64> = self.visible().iter().map(|e| e.id).collect();
        let Some(last) = ids.len().checked_sub(1) else {
            self.selected = None;
            return;
        };
        let current = self.selected_index_in(&ids).unwrap_or(last);
        let target = current.saturating_add_signed(delta).min(last);
        // The newest row selected means: follow new events.
        self.selected = if target == last {
            None
        } else {
            ids.get(target).copied()
        };
    }

    fn select_first(&mut self) {
        let visible = self.visible();
        self.selected = match visible.as_slice() {
            [] | [_] => None,
            [first, ..] => Some(first.id),
        };
    }

    /// `f`: all agents, then each agent seen in turn, then all again.
    pub fn cycle_agent_filter(&mut self) {
        let next = match &self.agent_filter {
            None => self.agents.keys().next().cloned(),
            Some(current) => self
                .agents
                .range::<String, _>((
                    std::ops::Bound::Excluded(current),
                    std::ops::Bound::Unbounded,
                ))
                .next()
                .map(|(k, _)| k.clone()),
        };
        self.agent_filter = next;
        self.keep_selection_visible();
    }

    /// `d`: denials only, or everything.
    pub fn toggle_denied_only(&mut self) {
        self.denied_only = !self.denied_only;
        self.keep_selection_visible();
    }

    /// `p`: freeze the view (new events wait in a bounded buffer), or release what waited.
    pub fn toggle_pause(&mut self) {
        self.paused = !self.paused;
        if !self.paused {
            self.pending_dropped = 0;
            while let Some(event) = self.pending.pop_front() {
                self.push(event);
            }
        }
    }

    fn keep_selection_visible(&mut self) {
        if let Some(id) = self.selected
            && !self.visible().iter().any(|e| e.id == id)
        {
            self.selected = None;
        }
    }

    fn fix_offset(&mut self) {
        let visible = self.visible();
        let selected = self.selected_index(&visible);
        let n = visible.len();
        self.offset = window_start(self.offset, selected, n, self.viewport_rows);
    }

    fn selected_index_in(&self, ids: &[u64]) -> Option<usize> {
        match self.selected {
            None => ids.len().checked_sub(1),
            Some(id) => ids.iter().position(|i| *i == id),
        }
    }

    /// Whether `entry` passes the agent filter and denied-only.
    pub fn matches(&self, entry: &Entry) -> bool {
        if self.denied_only && !entry.denied {
            return false;
        }
        match &self.agent_filter {
            None => true,
            Some(filter) => {
                let agent = agent_of(&entry.event);
                agent == filter
                    || agent
                        .strip_prefix(filter.as_str())
                        .is_some_and(|rest| rest.starts_with('/'))
            }
        }
    }

    /// The events the table shows, oldest first.
    pub fn visible(&self) -> Vec<&Entry> {
        self.history.iter().filter(|e| self.matches(e)).collect()
    }

    /// Index of the selected row in `visible` (the newest when following).
    pub fn selected_index(&self, visible: &[&Entry]) -> Option<usize> {
        match self.selected {
            None => visible.len().checked_sub(1),
            Some(id) => visible.iter().position(|e| e.id == id),
        }
    }

    /// The selected event, if any row is shown.
    pub fn selected_entry(&self) -> Option<&Entry> {
        let visible = self.visible();
        self.selected_index(&visible)
            .and_then(|i| visible.get(i).copied())
    }

    /// All events held, oldest first (bounded by the capacity).
    pub fn history(&self) -> &VecDeque<Entry> {
        &self.history
    }

    /// Per-agent counters, by cgroup path.
    pub fn agents(&self) -> &BTreeMap<String, AgentStats> {
        &self.agents
    }

    pub fn capacity(&self) -> usize {
        self.capacity
    }

    pub fn run_dir(&self) -> &str {
        &self.run_dir
    }

    pub fn agent_filter(&self) -> Option<&str> {
        self.agent_filter.as_deref()
    }

    pub fn denied_only(&self) -> bool {
        self.denied_only
    }

    pub fn paused(&self) -> bool {
        self.paused
    }

    /// Events that arrived while paused (including any the buffer could not keep).
    pub fn new_while_paused(&self) -> u64 {
        self.pending.len() as u64 + self.pending_dropped
    }

    /// Events dropped from the history because it was full.
    pub fn evicted(&self) -> u64 {
        self.evicted
    }

    /// True when following the newest event (no explicit selection).
    pub fn following(&self) -> bool {
        self.selected.is_none()
    }

    pub fn offset(&self) -> usize {
        self.offset
    }

    pub fn viewport_rows(&self) -> usize {
        self.viewport_rows
    }

    pub fn show_help(&self) -> bool {
        self.show_help
    }

    pub fn should_quit(&self) -> bool {
        self.quit
    }

    pub fn connection(&self) -> &Connection {
        &self.connection
    }

    pub fn brokerd(&self) -> Option<&BrokerdInfo> {
        self.brokerd.as_ref()
    }

    /// True once the stored history has been received on the current connection.
    pub fn history_loaded(&self) -> bool {
        self.history_loaded
    }

    /// The last thing worth telling the operator that is not an event.
    pub fn notice(&self) -> Option<&str> {
        self.notice.as_deref()
    }

    pub fn now_ms(&self) -> u64 {
        self.now_ms
    }
}

/// The first row to show so that `selected` (of `n` rows) is visible in `rows` rows, moving as
/// little as possible from `hint`. Following (the newest selected) pins the window to the end.
pub fn window_start(hint: usize, selected: Option<usize>, n: usize, rows: usize) -> usize {
    let rows = rows.max(1);
    let max_start = n.saturating_sub(rows);
    let mut start = hint.min(max_start);
    if let Some(s) = selected {
        if s < start {
            start = s;
        } else if s >= start + rows {
            start = s + 1 - rows;
        }
    }
    start.min(max_start)
}

#[cfg(test)]
mod tests {
    use super::*;
    use agent_broker_protocol::Decision;

    fn ev(seq: u64, cgroup: &str, deny: bool) -> AuditEvent {
        AuditEvent {
            seq,
            time_ms: 1_000_000 + seq * 1000,
            kind: Some(if deny {
                EventKind::Denial
            } else {
                EventKind::Request
            }),
            cgroup: Some(cgroup.into()),
            decision: Some(if deny {
                Decision::Deny
            } else {
                Decision::Allow
            }),
            ..AuditEvent::default()
        }
    }

    #[test]
    fn window_keeps_selection_in_view() {
        assert_eq!(window_start(0, Some(9), 10, 5), 5);
        assert_eq!(window_start(5, Some(2), 10, 5), 2);
        assert_eq!(window_start(3, Some(4), 10, 5), 3);
        assert_eq!(window_start(8, None, 3, 5), 0);
        assert_eq!(window_start(0, Some(0), 0, 0), 0);
    }

    #[test]
    fn history_is_bounded_and_drops_oldest() {
        let mut app = App::with_capacity("/run", 3);
        for seq in 1..=5 {
            app.ingest(ev(seq, "a", false));
        }
        let seqs: Vec<u64> = app.history().iter().map(|e| e.event.seq).collect();
        assert_eq!(seqs, [3, 4, 5]);
        assert_eq!(app.evicted(), 2);
        // Totals count everything seen, not only what is still held.
        assert_eq!(app.agents()["a"].calls, 5);
    }

    #[test]
    fn replayed_records_are_not_shown_twice() {
        let mut app = App::new("/run");
        app.ingest(ev(1, "a", false));
        app.ingest(ev(1, "a", false));
        let mut live = ev(0, "a", false);
        live.seq = 0;
        app.ingest(live.clone());
        app.ingest(live);
        assert_eq!(app.history().len(), 3);
    }

    #[test]
    fn subtree_filter_matches_children_only() {
        let mut app = App::new("/run");
        app.ingest(ev(1, "agents/a", false));
        app.ingest(ev(2, "agents/a/tool", false));
        app.ingest(ev(3, "agents/ab", false));
        app.cycle_agent_filter();
        assert_eq!(app.agent_filter(), Some("agents/a"));
        let seqs: Vec<u64> = app.visible().iter().map(|e| e.event.seq).collect();
        assert_eq!(seqs, [1, 2]);
    }

    #[test]
    fn handshake_refusals_are_counted_per_agent_and_program() {
        let mut app = App::new("/run");
        let tls = |seq, comm: &str| AuditEvent {
            kind: Some(EventKind::TlsFailure),
            comm: Some(comm.into()),
            ..ev(seq, "agents/a", true)
        };
        app.ingest(tls(1, "bun"));
        app.ingest(ev(2, "agents/a", true));
        app.ingest(tls(3, "bun"));
        app.ingest(tls(4, "java"));
        let stats = &app.agents()["agents/a"];
        assert_eq!(stats.denials, 4);
        let got: Vec<_> = stats
            .tls_refusals
            .iter()
            .map(|(c, n)| (c.as_str(), *n))
            .collect();
        assert_eq!(got, [("bun", 2), ("java", 1)]);
    }

    #[test]
    fn rate_counts_only_the_last_minute() {
        let mut app = App::new("/run");
        app.tick(100_000);
        for (seq, t) in [(1, 30_000), (2, 50_000), (3, 99_000), (4, 99_500)] {
            app.ingest(AuditEvent {
                seq,
                time_ms: t,
                cgroup: Some("a".into()),
                ..AuditEvent::default()
            });
        }
        assert_eq!(app.agents()["a"].calls, 4);
        assert_eq!(app.agents()["a"].calls_last_minute(100_000), 3);
        app.tick(200_000);
        assert_eq!(app.agents()["a"].calls_last_minute(200_000), 0);
    }
}
