//! Run-time approval: a request a rule holds (`approve = "ask"`), or one no rule allows under
//! `on_unknown = "ask"`, waits here for an operator's decision instead of being refused.
//!
//! A held request is a [`Pending`] entry with a oneshot the request's task awaits, for at most
//! [`ApprovalConfig::timeout`]; then it is denied with that reason. An agent may have at most
//! [`ApprovalConfig::per_agent`] waiting at once; more are denied at once. Decisions come from
//! the control socket (`brokerctl approve`, the console) and from a webhook's callback
//! ([`webhook`]); each ask and each decision is an audit record naming who decided.
//!
//! - allow once: this request (a request the agent filed without waiting: its next matching
//!   request within [`FILED_GRANT`]);
//! - allow until: this agent's requests with the same method to the same host and port, until
//!   a time, in memory only;
//! - allow always: a rule (for a destination no rule allows) or a standing approval (for a
//!   rule that asks) written into the agent's approvals file in the policy directory
//!   (`<cgroup, / as .>.approved.toml`, `approvals = true`). The policy directory is loaded with
//!   the change before anything is written: a decision the parent's policy does not allow
//!   (delegation narrowing) is refused with the loader's reason, and nothing is written;
//! - deny, with a reason the agent is told.

pub mod webhook;

use std::{
    collections::BTreeMap,
    fmt::Write as _,
    path::PathBuf,
    sync::{Arc, Mutex, PoisonError},
    time::{Duration, Instant, SystemTime, UNIX_EPOCH},
};

use agent_broker_core::{cgroup::CgroupPath, fmt::error_chain, policy::Policy};
use agent_broker_protocol::{
    ApprovalDecision, ApprovalRef, AuditEvent, Decision, EventKind, PendingApproval,
};
use tokio::sync::oneshot;
use tracing::{info, warn};

use crate::{audit::EventSink, capture::ConnectionOrigin, policy_store::PolicyStore};

/// How long a held request waits for a decision unless configured.
pub const DEFAULT_TIMEOUT: Duration = Duration::from_secs(60);
/// How many requests of one agent may wait at once unless configured.
pub const DEFAULT_PER_AGENT: usize = 8;
/// How long a request an agent filed without waiting (`request_access`) stays listed.
pub const FILED_EXPIRY: Duration = Duration::from_secs(3600);
/// How long "allow once" of a filed request waits for the agent's matching request.
pub const FILED_GRANT: Duration = Duration::from_secs(600);

/// How approvals behave (brokerd's settings).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ApprovalConfig {
    pub timeout: Duration,
    pub per_agent: usize,
    /// Where each new pending request is POSTed (`http://host:port/path`), if anywhere.
    pub webhook: Option<webhook::Target>,
    /// Where brokerd accepts webhook decisions (`POST /approvals/ID`), if anywhere.
    pub callback: Option<std::net::SocketAddr>,
}

impl Default for ApprovalConfig {
    fn default() -> Self {
        Self {
            timeout: DEFAULT_TIMEOUT,
            per_agent: DEFAULT_PER_AGENT,
            webhook: None,
            callback: None,
        }
    }
}

/// What is asked: one request, as the proxy saw it.
pub struct Ask<'a> {
    pub origin: &'a ConnectionOrigin,
    pub method: &'a str,
    pub host: &'a str,
    pub port: u16,
    pub path: &'a str,
    /// The rule that asked; none for a destination no rule allows.
    pub rule: Option<AskingRule>,
    /// Why it waits, in words.
    pub why: String,
}

/// The rule that asked and the cgroup of the policy file it is written in (where its standing
/// approvals go).
#[derive(Clone, Debug)]
pub struct AskingRule {
    pub rule: String,
    pub level: CgroupPath,
}

/// An operator let a request through.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Approved {
    pub id: u64,
    pub by: String,
}

/// The request may not go: why, and the approval it was about (none when it never waited).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Refused {
    pub id: Option<u64>,
    pub by: Option<String>,
    pub reason: String,
}

/// Which requests a decision or grant covers: one agent's, one method, one host and port.
#[derive(Clone, Debug, PartialEq, Eq)]
struct Key {
    agent: String,
    method: String,
    host: String,
    port: u16,
}

impl Key {
    fn of(agent: &CgroupPath, method: &str, host: &str, port: u16) -> Self {
        Self {
            agent: agent.as_str().to_string(),
            method: method.to_ascii_uppercase(),
            host: host.to_ascii_lowercase(),
            port,
        }
    }
}

struct Pending {
    info: PendingApproval,
    key: Key,
    /// The agent's governing policy file's cgroup (where a rule "allow always" writes goes),
    /// or the level of the rule that asked.
    asking: Option<AskingRule>,
    /// The request's task, awaiting the decision; none for a filed request.
    waiter: Option<oneshot::Sender<Result<Approved, Refused>>>,
    /// SHA-256 of the webhook callback's token for this request.
    token_hash: Option<[u8; 32]>,
    /// When a filed request is dropped from the list.
    expires: Instant,
}

/// A decision that covers later requests (allow until; allow once of a filed request).
struct Standing {
    key: Key,
    until: Instant,
    once: bool,
    approved: Approved,
}

#[derive(Default)]
struct State {
    next_id: u64,
    pending: BTreeMap<u64, Pending>,
    standing: Vec<Standing>,
}

/// The requests waiting for approval, and the decisions that cover later ones.
pub struct Approvals {
    config: ApprovalConfig,
    policy: Arc<PolicyStore>,
    events: Arc<dyn EventSink>,
    state: Mutex<State>,
    /// One "allow always" at a time: each reads, checks and writes the policy directory.
    writing: Mutex<()>,
}

impl Approvals {
    pub fn new(
        config: ApprovalConfig,
        policy: Arc<PolicyStore>,
        events: Arc<dyn EventSink>,
    ) -> Arc<Self> {
        Arc::new(Self {
            config,
            policy,
            events,
            state: Mutex::new(State {
                next_id: 1,
                ..State::default()
            }),
            writing: Mutex::new(()),
        })
    }

    fn state(&self) -> std::sync::MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// A standing decision that lets this request through without asking (consuming a
    /// once-only one).
    pub fn standing(
        &self,
        agent: &CgroupPath,
        method: &str,
        host: &str,
        port: u16,
    ) -> Option<Approved> {
        let key = Key::of(agent, method, host, port);
        let now = Instant::now();
        let mut state = self.state();
        state.standing.retain(|s| s.until > now);
        let i = state.standing.iter().position(|s| s.key == key)?;
        let approved = state.standing[i].approved.clone();
        if state.standing[i].once {
            state.standing.remove(i);
        }
        Some(approved)
    }

    /// Holds a request for a decision: `Err` at once when the agent has too many waiting;
    /// otherwise a future that resolves when an operator decides or the wait times out.
    pub fn hold(
        self: &Arc<Self>,
        ask: Ask<'_>,
    ) -> Result<impl Future<Output = Result<Approved, Refused>> + Send + 'static, Refused> {
        let (tx, rx) = oneshot::channel();
        let (id, _token) = self.enter(&ask, Some(tx), None, self.config.timeout)?;
        let this = self.clone();
        let timeout = self.config.timeout;
        Ok(async move {
            match tokio::time::timeout(timeout, rx).await {
                Ok(Ok(verdict)) => verdict,
                // Dropped without a decision: brokerd is shutting down.
                Ok(Err(_)) => Err(Refused {
                    id: Some(id),
                    by: None,
                    reason: format!("approval request #{id} was dropped (brokerd is stopping)"),
                }),
                Err(_) => this.timed_out(id),
            }
        })
    }

    /// Files a request the agent makes for later (`request_access`): listed for
    /// [`FILED_EXPIRY`]; "allow once" lets its next matching request through.
    pub fn file(
        self: &Arc<Self>,
        origin: &ConnectionOrigin,
        method: &str,
        url: &str,
        reason: &str,
        policy: &Policy,
    ) -> Result<u64, String> {
        let uri: http::Uri = url
            .parse()
            .map_err(|e| format!("{url:?} is not a URL: {e}"))?;
        let host = uri
            .host()
            .ok_or_else(|| format!("{url:?} names no host"))?
            .trim_start_matches('[')
            .trim_end_matches(']')
            .to_ascii_lowercase();
        let tls = uri.scheme_str() != Some("http");
        let port = uri.port_u16().unwrap_or(if tls { 443 } else { 80 });
        let method = http::Method::from_bytes(method.to_ascii_uppercase().as_bytes())
            .map_err(|_| format!("{method:?} is not an HTTP method"))?;
        let path = uri.path().to_string();
        let reason: String = reason.chars().take(500).collect();
        if policy.file_for(&origin.cgroup).is_none() {
            return Err(format!("no policy file governs {}", origin.cgroup));
        }
        let ask = Ask {
            origin,
            method: method.as_str(),
            host: &host,
            port,
            path: &path,
            rule: None,
            why: format!("the agent asks for {method} {host}:{port}{path}"),
        };
        self.enter(&ask, None, Some(reason), FILED_EXPIRY)
            .map(|(id, _)| id)
            .map_err(|r| r.reason)
    }

    /// Adds a pending request, audits it, and sends it to the webhook.
    fn enter(
        self: &Arc<Self>,
        ask: &Ask<'_>,
        waiter: Option<oneshot::Sender<Result<Approved, Refused>>>,
        agent_reason: Option<String>,
        wait: Duration,
    ) -> Result<(u64, Option<String>), Refused> {
        let key = Key::of(&ask.origin.cgroup, ask.method, ask.host, ask.port);
        let token = self.config.webhook.as_ref().map(|_| webhook::new_token());
        let now_ms = now_ms();
        let (info, gone) = {
            let mut state = self.state();
            let now = Instant::now();
            let gone = prune(&mut state.pending);
            let waiting = state
                .pending
                .values()
                .filter(|p| p.key.agent == key.agent)
                .count();
            if waiting >= self.config.per_agent {
                drop(state);
                self.audit_gone(gone);
                return Err(Refused {
                    id: None,
                    by: None,
                    reason: format!(
                        "{} already has {waiting} requests waiting for an operator's approval \
                         (at most {}); try again once they are decided",
                        key.agent, self.config.per_agent
                    ),
                });
            }
            let id = state.next_id;
            state.next_id += 1;
            let info = PendingApproval {
                id,
                agent: key.agent.clone(),
                pid: Some(ask.origin.pid),
                comm: Some(ask.origin.comm.clone()),
                exe: ask.origin.exe.clone(),
                method: key.method.clone(),
                host: key.host.clone(),
                port: ask.port,
                path: ask.path.to_string(),
                rule: ask.rule.as_ref().map(|r| r.rule.clone()),
                why: ask.why.clone(),
                agent_reason,
                held: waiter.is_some(),
                asked_ms: now_ms,
                expires_ms: now_ms.saturating_add(wait.as_millis() as u64),
            };
            state.pending.insert(
                id,
                Pending {
                    info: info.clone(),
                    key,
                    asking: ask.rule.clone(),
                    waiter,
                    token_hash: token.as_deref().map(webhook::token_hash),
                    expires: now + wait,
                },
            );
            (info, gone)
        };
        self.audit_gone(gone);
        crate::metrics::global().approval_asked(&info.agent);
        info!(id = info.id, agent = %info.agent, method = %info.method, host = %info.host, port = info.port, "request waits for approval");
        self.audit(&info, ask.origin, None, None, Some(&info.why));
        if let (Some(target), Some(token)) = (&self.config.webhook, &token) {
            let payload = webhook::payload(&info, self.config.callback, token);
            let target = target.clone();
            tokio::spawn(async move {
                if let Err(e) = webhook::post(&target, payload).await {
                    warn!(id = info.id, webhook = %target, error = %e, "approval webhook failed");
                }
            });
        }
        Ok((info.id, token))
    }

    /// Denies a held request whose wait ended without a decision.
    fn timed_out(&self, id: u64) -> Result<Approved, Refused> {
        let pending = self.state().pending.remove(&id);
        let reason = format!(
            "no operator approved this request (approval #{id}) within {}",
            humantime::format_duration(self.config.timeout)
        );
        if let Some(p) = pending {
            crate::metrics::global()
                .approval_decided(&p.info.agent, crate::metrics::ApprovalDecision::Timeout);
            self.audit_decided(&p.info, None, Decision::Deny, &reason);
        }
        Err(Refused {
            id: Some(id),
            by: None,
            reason,
        })
    }

    /// The requests waiting, oldest first (filed requests past their time are dropped).
    pub fn list(&self) -> Vec<PendingApproval> {
        let (list, gone) = {
            let mut state = self.state();
            let gone = prune(&mut state.pending);
            (
                state.pending.values().map(|p| p.info.clone()).collect(),
                gone,
            )
        };
        self.audit_gone(gone);
        list
    }

    /// Records the requests [`prune`] dropped.
    fn audit_gone(&self, gone: Vec<(PendingApproval, &'static str)>) {
        for (info, why) in gone {
            self.audit_decided(&info, None, Decision::Deny, why);
        }
    }

    /// Decides request `id`; `by` names who (`cli uid 0`, `console uid 0`, `webhook`).
    /// `Ok` says what was done; `Err` why nothing was (the request then still waits).
    pub fn decide(&self, id: u64, decision: ApprovalDecision, by: &str) -> Result<String, String> {
        let pending = self.state().pending.remove(&id).ok_or_else(|| {
            format!(
                "no request #{id} is waiting for approval (it was decided, timed out, or never \
                 asked); `brokerctl approve list` shows those that are"
            )
        })?;
        let approved = Approved {
            id,
            by: by.to_string(),
        };
        let key = pending.key.clone();
        let what = format!("{} {}:{}", key.method, key.host, key.port);
        let (outcome, release_like) = match &decision {
            ApprovalDecision::AllowOnce => {
                if pending.waiter.is_none() {
                    self.state().standing.push(Standing {
                        key: key.clone(),
                        until: Instant::now() + FILED_GRANT,
                        once: true,
                        approved: approved.clone(),
                    });
                    (
                        format!(
                            "allowed once: the next {what} of {} within {}",
                            key.agent,
                            humantime::format_duration(FILED_GRANT)
                        ),
                        false,
                    )
                } else {
                    (format!("allowed once: {what} of {}", key.agent), false)
                }
            }
            ApprovalDecision::AllowUntil { until_ms } => {
                let now = now_ms();
                if *until_ms <= now {
                    self.put_back(id, pending);
                    return Err("--until is in the past; give a time to come".into());
                }
                let until = Instant::now() + Duration::from_millis(until_ms - now);
                self.state().standing.push(Standing {
                    key: key.clone(),
                    until,
                    once: false,
                    approved: approved.clone(),
                });
                (
                    format!(
                        "allowed {what} for {} until {}",
                        key.agent,
                        humantime::format_rfc3339_seconds(
                            UNIX_EPOCH + Duration::from_millis(*until_ms)
                        )
                    ),
                    true,
                )
            }
            ApprovalDecision::AllowAlways => match self.write_always(&pending) {
                Ok(file) => (
                    format!(
                        "allowed {what} for {} always: written to {}",
                        key.agent,
                        file.display()
                    ),
                    true,
                ),
                Err(e) => {
                    self.put_back(id, pending);
                    return Err(e);
                }
            },
            ApprovalDecision::Deny { reason } => {
                let reason = reason
                    .clone()
                    .unwrap_or_else(|| "an operator said no".into());
                let reason =
                    format!("an operator denied this request (approval #{id}, {by}): {reason}");
                count_decided(&pending.info.agent, &decision);
                self.audit_decided(&pending.info, Some(by), Decision::Deny, &reason);
                if let Some(waiter) = pending.waiter {
                    let _ = waiter.send(Err(Refused {
                        id: Some(id),
                        by: Some(by.to_string()),
                        reason: reason.clone(),
                    }));
                }
                return Ok(format!("denied #{id}"));
            }
        };
        info!(id, %by, %outcome, "approval decided");
        count_decided(&pending.info.agent, &decision);
        self.audit_decided(&pending.info, Some(by), Decision::Allow, &outcome);
        if let Some(waiter) = pending.waiter {
            let _ = waiter.send(Ok(approved.clone()));
        }
        if release_like {
            // Requests waiting for the same thing go too.
            let others: Vec<Pending> = {
                let mut state = self.state();
                let ids: Vec<u64> = state
                    .pending
                    .iter()
                    .filter(|(_, p)| p.key == key)
                    .map(|(i, _)| *i)
                    .collect();
                ids.iter().filter_map(|i| state.pending.remove(i)).collect()
            };
            for other in others {
                count_decided(&other.info.agent, &decision);
                self.audit_decided(&other.info, Some(by), Decision::Allow, &outcome);
                if let Some(waiter) = other.waiter {
                    let _ = waiter.send(Ok(Approved {
                        id: other.info.id,
                        by: by.to_string(),
                    }));
                }
            }
        }
        Ok(outcome)
    }

    /// Decides with a webhook callback's token: refused unless it is request `id`'s.
    pub fn decide_with_token(
        &self,
        id: u64,
        token: &str,
        decision: ApprovalDecision,
    ) -> Result<String, webhook::CallbackError> {
        let expected = self
            .state()
            .pending
            .get(&id)
            .map(|p| p.token_hash)
            .ok_or(webhook::CallbackError::Unknown(id))?;
        // Hashes are compared, so how long the comparison takes says nothing about the token.
        let matches = expected.is_some_and(|h| h == webhook::token_hash(token));
        if !matches {
            return Err(webhook::CallbackError::BadToken(id));
        }
        self.decide(id, decision, "webhook")
            .map_err(webhook::CallbackError::Refused)
    }

    fn put_back(&self, id: u64, pending: Pending) {
        self.state().pending.insert(id, pending);
    }

    /// Writes "allow always" for `pending` into its approvals file, after checking that the
    /// policy directory loads with it; the store is reloaded at once.
    fn write_always(&self, pending: &Pending) -> Result<PathBuf, String> {
        let _writing = self.writing.lock().unwrap_or_else(PoisonError::into_inner);
        let policy = self.policy.current();
        let agent = CgroupPath::parse(&pending.key.agent)
            .map_err(|e| format!("agent {}: {e}", pending.key.agent))?;
        let level = match &pending.asking {
            Some(asking) => asking.level.clone(),
            None => policy
                .file_for(&agent)
                .map(|f| f.cgroup().clone())
                .ok_or_else(|| format!("no policy file governs {agent}"))?,
        };
        let dir = self.policy.dir().to_path_buf();
        let path = dir.join(approvals_file_name(&level));
        let existing = match std::fs::read_to_string(&path) {
            Ok(text) => Some(text),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => None,
            Err(e) => return Err(format!("cannot read {}: {e}", path.display())),
        };
        let text = with_entry(existing.as_deref(), &level, pending)?;
        let mut files = Policy::read_dir_files(&dir).map_err(|e| error_chain(&e))?;
        files.retain(|(p, _)| p != &path);
        files.push((path.clone(), text.clone()));
        Policy::from_files(files).map_err(|e| {
            format!(
                "\"allow always\" would not load, so nothing was written: {}",
                error_chain(&e)
            )
        })?;
        write_atomically(&path, &text)
            .map_err(|e| format!("cannot write {}: {e}", path.display()))?;
        self.policy.reload().map_err(|e| {
            format!(
                "wrote {}, but the policy did not reload: {}",
                path.display(),
                error_chain(&e)
            )
        })?;
        Ok(path)
    }

    fn audit(
        &self,
        info: &PendingApproval,
        origin: &ConnectionOrigin,
        by: Option<&str>,
        decision: Option<Decision>,
        reason: Option<&str>,
    ) {
        self.events.record(AuditEvent {
            kind: Some(EventKind::Approval),
            cgroup: Some(info.agent.clone()),
            cgroup_path: origin.cgroup_path.as_ref().map(|c| c.as_str().to_string()),
            pod: origin.pod.clone(),
            pid: info.pid,
            comm: info.comm.clone(),
            exe: info.exe.clone(),
            original_dst: Some(origin.original_dst),
            method: Some(info.method.clone()),
            host: Some(info.host.clone()),
            path: Some(info.path.clone()),
            rule: info.rule.clone(),
            decision,
            reason: reason.map(str::to_string),
            approval: Some(ApprovalRef {
                id: info.id,
                by: by.map(str::to_string),
            }),
            ..AuditEvent::default()
        });
    }

    fn audit_decided(
        &self,
        info: &PendingApproval,
        by: Option<&str>,
        decision: Decision,
        what: &str,
    ) {
        self.events.record(AuditEvent {
            kind: Some(EventKind::Approval),
            cgroup: Some(info.agent.clone()),
            pid: info.pid,
            comm: info.comm.clone(),
            exe: info.exe.clone(),
            method: Some(info.method.clone()),
            host: Some(info.host.clone()),
            path: Some(info.path.clone()),
            rule: info.rule.clone(),
            decision: Some(decision),
            reason: Some(what.to_string()),
            approval: Some(ApprovalRef {
                id: info.id,
                by: by.map(str::to_string),
            }),
            ..AuditEvent::default()
        });
    }
}

/// What an agent asks for through `agent-broker.internal` (`request_access`), filed here.
pub struct Filed {
    approvals: Arc<Approvals>,
    policy: Arc<PolicyStore>,
}

impl Filed {
    pub fn new(approvals: Arc<Approvals>, policy: Arc<PolicyStore>) -> Self {
        Self { approvals, policy }
    }
}

impl crate::agent_api::AccessRequests for Filed {
    fn request_access(
        &self,
        _agent: &str,
        origin: &ConnectionOrigin,
        method: &str,
        url: &str,
        reason: &str,
    ) -> Result<String, String> {
        let policy = self.policy.current();
        let id = self.approvals.file(origin, method, url, reason, &policy)?;
        Ok(format!(
            "filed as request #{id}: an operator sees it (`brokerctl approve list`, the console); \
             if allowed once, your next {} {url} within {} goes through; it is dropped after {} \
             without a decision",
            method.to_ascii_uppercase(),
            humantime::format_duration(FILED_GRANT),
            humantime::format_duration(FILED_EXPIRY)
        ))
    }
}

/// The approvals file of the policy file for `cgroup`: `agents/coder` → `agents.coder.approved.toml`.
pub fn approvals_file_name(cgroup: &CgroupPath) -> String {
    format!("{}.approved.toml", cgroup.as_str().replace('/', "."))
}

/// The approvals file's text with `pending`'s "allow always" added: a `[[approved]]` entry for
/// a rule that asked, an `[[allow]]` rule for a destination no rule allows.
fn with_entry(
    existing: Option<&str>,
    level: &CgroupPath,
    pending: &Pending,
) -> Result<String, String> {
    let mut text = match existing {
        Some(t) => {
            // Check it is ours before adding to it.
            let table: toml::Table =
                toml::from_str(t).map_err(|e| format!("the approvals file does not parse: {e}"))?;
            if table.get("approvals").and_then(toml::Value::as_bool) != Some(true) {
                return Err("the approvals file lacks `approvals = true`; fix or remove it".into());
            }
            let mut t = t.to_string();
            if !t.ends_with('\n') {
                t.push('\n');
            }
            t
        }
        None => format!(
            "# Written by brokerd: decisions an operator made to allow always (brokerctl approve,\n\
             # the console, the webhook). Edit or remove entries as with any policy file.\n\
             approvals = true\ncgroup = {}\n",
            toml_str(level.as_str())
        ),
    };
    let key = &pending.key;
    let host = toml_str(&key.host);
    let method = toml_str(&key.method);
    let by = format!(
        "# approval #{} on {}\n",
        pending.info.id,
        humantime::format_rfc3339_seconds(SystemTime::now())
    );
    if pending.asking.is_some() {
        let _ = write!(
            text,
            "\n{by}[[approved]]\nhost = {host}\nport = {}\nmethods = [{method}]\n",
            key.port
        );
    } else {
        let _ = write!(
            text,
            "\n{by}[[allow]]\nhost = {host}\nport = {}\nmethods = [{method}]\n",
            key.port
        );
    }
    Ok(text)
}

/// A TOML basic string.
fn toml_str(s: &str) -> String {
    toml::Value::String(s.to_string()).to_string()
}

/// Writes `path` through a hidden temporary file in the same directory and a rename, so the
/// policy watcher never reads half a file.
fn write_atomically(path: &std::path::Path, text: &str) -> std::io::Result<()> {
    use std::io::Write as _;
    let dir = path.parent().unwrap_or(std::path::Path::new("."));
    let name = path
        .file_name()
        .and_then(|n| n.to_str())
        .unwrap_or("approvals");
    let tmp = dir.join(format!(".{name}.tmp"));
    let mut f = std::fs::File::create(&tmp)?;
    f.write_all(text.as_bytes())?;
    f.sync_all()?;
    std::fs::rename(&tmp, path)
}

/// Counts a decision in the metrics (the request is no longer pending).
fn count_decided(agent: &str, decision: &ApprovalDecision) {
    use crate::metrics::ApprovalDecision as M;
    let kind = match decision {
        ApprovalDecision::AllowOnce => M::AllowOnce,
        ApprovalDecision::AllowUntil { .. } => M::AllowUntil,
        ApprovalDecision::AllowAlways => M::AllowAlways,
        ApprovalDecision::Deny { .. } => M::Deny,
    };
    crate::metrics::global().approval_decided(agent, kind);
}

/// Drops filed requests past their time and held requests whose agent stopped waiting (its
/// connection closed), counting each as timed out; what was dropped, and why, for the record.
fn prune(pending: &mut BTreeMap<u64, Pending>) -> Vec<(PendingApproval, &'static str)> {
    let now = Instant::now();
    let mut gone = Vec::new();
    pending.retain(|_, p| {
        let why = match &p.waiter {
            Some(waiter) if waiter.is_closed() => {
                "the agent stopped waiting (its connection closed)"
            }
            Some(_) => return true,
            None if p.expires > now => return true,
            None => "nobody decided the filed request in time",
        };
        crate::metrics::global()
            .approval_decided(&p.info.agent, crate::metrics::ApprovalDecision::Timeout);
        gone.push((p.info.clone(), why));
        false
    });
    gone
}

fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64)
}

#[cfg(test)]
mod tests;
