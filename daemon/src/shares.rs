//! Each agent's share of brokerd, counted: connections open, new connections per second,
//! pending handshakes, requests in flight, requests per second, DNS queries per second (the
//! sizes come from the policy's `[shares]`, see [`agent_broker_core::policy::Shares`]). One
//! agent at its share is refused more of it; the others do not notice (THREAT-MODEL: one agent
//! must not make brokerd unavailable to all). On top of the agents' shares, brokerd keeps the connections it serves
//! below what its file descriptor limit allows, so its control socket always gets one.
//!
//! Refusals are audited through [`RefusalAudit`]: a flood is recorded as its first refusal, then
//! one record per second that says how many more there were, so it cannot grow the log by
//! megabytes a second.

use std::{
    collections::HashMap,
    sync::{
        Arc, Mutex,
        atomic::{AtomicU32, AtomicUsize, Ordering},
    },
    time::{Duration, Instant},
};

use agent_broker_core::{
    cgroup::{CgroupId, CgroupPath},
    policy::{Policy, ShareKind, Shares},
    time::now_unix_ms,
};
use agent_broker_protocol::{AgentShareUse, AuditEvent, Decision, EventKind, Side};
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;
use tracing::warn;

use crate::{audit::EventSink, capture::ConnectionOrigin};

/// How long a burst of like refusals is summed before its summary record.
pub const REFUSAL_WINDOW: Duration = Duration::from_secs(1);

/// How long an agent's counters outlive its last use.
const FORGET_AFTER: Duration = Duration::from_secs(60);

/// File descriptors kept free of proxied connections: the control socket, the audit and vault
/// files, DNS sockets, the eBPF maps.
const FD_RESERVE: u64 = 256;

/// What one agent holds and has spent.
pub struct AgentShare {
    cgroup: CgroupPath,
    cgroup_id: CgroupId,
    /// The sizes in force when this agent was last admitted.
    limits: Mutex<Shares>,
    connections: AtomicU32,
    handshakes: AtomicU32,
    requests: AtomicU32,
    new_connections: Mutex<Bucket>,
    /// Requests started: checked before anything else about a request is looked at, so a
    /// stream flood on a few connections (which the connection shares do not see) is refused
    /// at the rate it arrives.
    request_rate: Mutex<Bucket>,
    /// Reads of the agent's connections while it is past its requests per second, at that
    /// rate for all its connections together.
    paced_reads: Mutex<Bucket>,
    /// Requests refused for the agent's requests per second whose 429 is being held back.
    held_refusals: AtomicU32,
    dns_queries: Mutex<Bucket>,
    last_used: Mutex<Instant>,
}

impl AgentShare {
    fn counter(&self, kind: ShareKind) -> Option<&AtomicU32> {
        match kind {
            ShareKind::Connections => Some(&self.connections),
            ShareKind::PendingHandshakes => Some(&self.handshakes),
            ShareKind::RequestsInFlight => Some(&self.requests),
            ShareKind::NewConnectionsPerSecond
            | ShareKind::DnsQueriesPerSecond
            | ShareKind::RequestsPerSecond => None,
        }
    }

    fn limit(&self, kind: ShareKind) -> u32 {
        self.limits.lock().map(|l| l.get(kind)).unwrap_or(0)
    }

    fn is_idle(&self) -> bool {
        self.connections.load(Ordering::Relaxed) == 0
            && self.handshakes.load(Ordering::Relaxed) == 0
            && self.requests.load(Ordering::Relaxed) == 0
    }

    fn touch(&self) {
        if let Ok(mut t) = self.last_used.lock() {
            *t = Instant::now();
        }
    }
}

/// A token bucket: `rate` per second, up to `rate` saved.
struct Bucket {
    tokens: f64,
    at: Instant,
}

impl Bucket {
    fn full(rate: u32, now: Instant) -> Self {
        Self {
            tokens: f64::from(rate),
            at: now,
        }
    }

    fn take(&mut self, rate: u32, now: Instant) -> bool {
        let rate = f64::from(rate);
        let elapsed = now.saturating_duration_since(self.at).as_secs_f64();
        self.tokens = (self.tokens + elapsed * rate).min(rate);
        self.at = now;
        if self.tokens >= 1.0 {
            self.tokens -= 1.0;
            true
        } else {
            false
        }
    }
}

impl Bucket {
    /// How long until a token is there (zero: one is there now), without taking it.
    fn wait(&mut self, rate: u32, now: Instant) -> Duration {
        let per_second = f64::from(rate.max(1));
        let elapsed = now.saturating_duration_since(self.at).as_secs_f64();
        self.tokens = (self.tokens + elapsed * per_second).min(per_second);
        self.at = now;
        if self.tokens >= 1.0 {
            Duration::ZERO
        } else {
            Duration::from_secs_f64((1.0 - self.tokens) / per_second)
        }
    }
}

/// The most refusals of one agent's requests per second held back at once
/// ([`Held::hold_refusal`]): a few MiB of waiting streams at most.
const MAX_HELD_REFUSALS: u32 = 4096;

/// A refusal being held back; counted until dropped.
pub struct HeldRefusal(Arc<AgentShare>);

impl Drop for HeldRefusal {
    fn drop(&mut self) {
        self.0.held_refusals.fetch_sub(1, Ordering::Relaxed);
    }
}

/// How an agent's connection may be read now ([`Held::read_pace`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ReadPace {
    /// As much as is there: the agent is within its requests per second.
    Free,
    /// A little (about one request's worth): the agent is past its share, and this read took
    /// one of its paced reads.
    Paced,
    /// Not before this long: the agent's paced reads are spent.
    Wait(Duration),
}

/// Part of a share, held until dropped.
pub struct Held {
    agent: Arc<AgentShare>,
    kind: ShareKind,
    global: Option<Arc<AtomicUsize>>,
}

impl Drop for Held {
    fn drop(&mut self) {
        if let Some(counter) = self.agent.counter(self.kind) {
            counter.fetch_sub(1, Ordering::Relaxed);
        }
        if let Some(global) = &self.global {
            global.fetch_sub(1, Ordering::Relaxed);
        }
        self.agent.touch();
    }
}

impl Held {
    /// A place to hold back the 429 of a request refused for the agent's requests per second,
    /// if fewer than [`MAX_HELD_REFUSALS`] are held: while held, the stream stays open, so a
    /// stream flood is also bounded by the streams its connections may have open.
    pub fn hold_refusal(&self) -> Option<HeldRefusal> {
        self.agent
            .held_refusals
            .fetch_update(Ordering::Relaxed, Ordering::Relaxed, |n| {
                (n < MAX_HELD_REFUSALS).then_some(n + 1)
            })
            .ok()
            .map(|_| HeldRefusal(self.agent.clone()))
    }

    /// Whether one of the agent's connections may be read now: freely while the agent has
    /// requests per second left; past that share, a little at a time, all its connections
    /// together at the share's rate (see `proxy::serve`), so a stream flood waits in the
    /// kernel's buffers instead of costing brokerd a decoded and refused stream each.
    pub fn read_pace(&self) -> ReadPace {
        let rate = self.agent.limit(ShareKind::RequestsPerSecond);
        let now = Instant::now();
        // Past the share is less than a tenth of a second's worth left: with one token left,
        // a free read would bring in hundreds of streams for it.
        let reserve = (f64::from(rate) / 10.0).max(1.0);
        let over = self
            .agent
            .request_rate
            .lock()
            .map(|mut b| {
                b.wait(rate, now);
                b.tokens < reserve
            })
            .unwrap_or(false);
        if !over {
            return ReadPace::Free;
        }
        let Ok(mut reads) = self.agent.paced_reads.lock() else {
            return ReadPace::Free;
        };
        if reads.take(rate, now) {
            ReadPace::Paced
        } else {
            ReadPace::Wait(reads.wait(rate, now))
        }
    }
}

/// Why something was refused: the audit reason and what the agent is told.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Refused {
    pub kind: Option<ShareKind>,
    pub reason: String,
}

/// Every agent's shares.
pub struct ShareBook {
    policy: watch::Receiver<Arc<Policy>>,
    agents: Mutex<HashMap<CgroupId, Arc<AgentShare>>>,
    /// Connections being served, all agents together, and the most there may be.
    open: Arc<AtomicUsize>,
    max_open: usize,
    refusals: Arc<RefusalAudit>,
}

impl ShareBook {
    /// `max_open`: the most connections brokerd serves at once (see [`max_connections`]).
    pub fn new(
        policy: watch::Receiver<Arc<Policy>>,
        refusals: Arc<RefusalAudit>,
        max_open: usize,
    ) -> Self {
        Self {
            policy,
            agents: Mutex::new(HashMap::new()),
            open: Arc::new(AtomicUsize::new(0)),
            max_open: max_open.max(1),
            refusals,
        }
    }

    pub fn refusals(&self) -> &Arc<RefusalAudit> {
        &self.refusals
    }

    /// The agent's counters, with the sizes its policy gives it now.
    fn agent(&self, origin: &ConnectionOrigin) -> Arc<AgentShare> {
        let shares = self.policy.borrow().shares(&origin.cgroup);
        let now = Instant::now();
        let agent = {
            let Ok(mut agents) = self.agents.lock() else {
                return Arc::new(new_agent(origin, shares, now));
            };
            agents
                .entry(origin.cgroup_id)
                .or_insert_with(|| Arc::new(new_agent(origin, shares, now)))
                .clone()
        };
        if let Ok(mut l) = agent.limits.lock() {
            *l = shares;
        }
        agent.touch();
        agent
    }

    /// Admits a new connection: one of the agent's connections and of its new connections
    /// this second, within brokerd's own connection limit. Refused: audited (aggregated), and
    /// the caller closes the connection.
    pub fn admit(&self, origin: &ConnectionOrigin) -> Result<Held, Refused> {
        let agent = self.agent(origin);
        let refused = |kind: Option<ShareKind>, reason: String| {
            let refused = Refused { kind, reason };
            self.refusals.refused_connection(origin, &refused);
            Err(refused)
        };
        let rate = agent.limit(ShareKind::NewConnectionsPerSecond);
        let fresh = agent
            .new_connections
            .lock()
            .map(|mut b| b.take(rate, Instant::now()))
            .unwrap_or(false);
        if !fresh {
            return refused(
                Some(ShareKind::NewConnectionsPerSecond),
                over_share(&agent, ShareKind::NewConnectionsPerSecond),
            );
        }
        if self.open.fetch_add(1, Ordering::Relaxed) >= self.max_open {
            self.open.fetch_sub(1, Ordering::Relaxed);
            return refused(
                None,
                format!(
                    "brokerd serves its most connections at once ({}, from its file descriptor \
                     limit)",
                    self.max_open
                ),
            );
        }
        let global = Some(self.open.clone());
        match hold(&agent, ShareKind::Connections, global) {
            Ok(held) => Ok(held),
            Err(kind) => refused(Some(kind), over_share(&agent, kind)),
        }
    }

    /// One of the agent's pending handshakes, held until its connection reaches HTTP.
    pub fn handshake(&self, admitted: &Held) -> Result<Held, Refused> {
        self.hold_more(admitted, ShareKind::PendingHandshakes)
    }

    /// One of the agent's requests this second, and one of its requests in flight, held until
    /// the response ends.
    pub fn request(&self, admitted: &Held) -> Result<Held, Refused> {
        let agent = &admitted.agent;
        let rate = agent.limit(ShareKind::RequestsPerSecond);
        let started = agent
            .request_rate
            .lock()
            .map(|mut b| b.take(rate, Instant::now()))
            .unwrap_or(false);
        if !started {
            return Err(Refused {
                kind: Some(ShareKind::RequestsPerSecond),
                reason: over_share(agent, ShareKind::RequestsPerSecond),
            });
        }
        self.hold_more(admitted, ShareKind::RequestsInFlight)
    }

    fn hold_more(&self, admitted: &Held, kind: ShareKind) -> Result<Held, Refused> {
        hold(&admitted.agent, kind, None).map_err(|kind| Refused {
            kind: Some(kind),
            reason: over_share(&admitted.agent, kind),
        })
    }

    /// One DNS query of the agent's this second. Refused: the caller audits it with
    /// [`RefusalAudit::refused_dns_rate`].
    pub fn dns_query(&self, origin: &ConnectionOrigin) -> Result<(), Refused> {
        let agent = self.agent(origin);
        let rate = agent.limit(ShareKind::DnsQueriesPerSecond);
        let ok = agent
            .dns_queries
            .lock()
            .map(|mut b| b.take(rate, Instant::now()))
            .unwrap_or(false);
        if ok {
            return Ok(());
        }
        Err(Refused {
            kind: Some(ShareKind::DnsQueriesPerSecond),
            reason: over_share(&agent, ShareKind::DnsQueriesPerSecond),
        })
    }

    /// What each agent holds now, for `brokerctl status` and the console.
    pub fn usage(&self) -> Vec<AgentShareUse> {
        let Ok(agents) = self.agents.lock() else {
            return Vec::new();
        };
        let mut out: Vec<AgentShareUse> = agents
            .values()
            .map(|a| {
                let limits = a.limits.lock().map(|l| *l).unwrap_or_default();
                AgentShareUse {
                    cgroup: a.cgroup.to_string(),
                    connections: a.connections.load(Ordering::Relaxed),
                    connections_limit: limits.get(ShareKind::Connections),
                    handshakes: a.handshakes.load(Ordering::Relaxed),
                    handshakes_limit: limits.get(ShareKind::PendingHandshakes),
                    requests: a.requests.load(Ordering::Relaxed),
                    requests_limit: limits.get(ShareKind::RequestsInFlight),
                    requests_per_second_limit: limits.get(ShareKind::RequestsPerSecond),
                    refused: self.refusals.refused_total(a.cgroup_id),
                }
            })
            .collect();
        out.sort_by(|a, b| a.cgroup.cmp(&b.cgroup));
        out
    }

    /// Connections being served now, all agents together, and the most allowed.
    pub fn open_connections(&self) -> (usize, usize) {
        (self.open.load(Ordering::Relaxed), self.max_open)
    }

    /// Forgets agents idle for a while (their counters start afresh).
    fn prune(&self) {
        let now = Instant::now();
        if let Ok(mut agents) = self.agents.lock() {
            agents.retain(|_, a| {
                let recent = a
                    .last_used
                    .lock()
                    .map(|t| now.saturating_duration_since(*t) < FORGET_AFTER)
                    .unwrap_or(true);
                recent || !a.is_idle() || Arc::strong_count(a) > 1
            });
        }
    }

    /// Every second until `cancel`: writes the summaries of refusal bursts, forgets idle
    /// agents.
    pub async fn run(self: Arc<Self>, cancel: CancellationToken) {
        let mut tick = tokio::time::interval(REFUSAL_WINDOW);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tokio::select! {
                _ = cancel.cancelled() => break,
                _ = tick.tick() => {}
            }
            self.refusals.flush(false);
            self.prune();
        }
        self.refusals.flush(true);
    }
}

fn new_agent(origin: &ConnectionOrigin, shares: Shares, now: Instant) -> AgentShare {
    AgentShare {
        cgroup: origin.cgroup.clone(),
        cgroup_id: origin.cgroup_id,
        limits: Mutex::new(shares),
        connections: AtomicU32::new(0),
        handshakes: AtomicU32::new(0),
        requests: AtomicU32::new(0),
        new_connections: Mutex::new(Bucket::full(
            shares.get(ShareKind::NewConnectionsPerSecond),
            now,
        )),
        request_rate: Mutex::new(Bucket::full(shares.get(ShareKind::RequestsPerSecond), now)),
        paced_reads: Mutex::new(Bucket {
            tokens: 0.0,
            at: now,
        }),
        held_refusals: AtomicU32::new(0),
        dns_queries: Mutex::new(Bucket::full(
            shares.get(ShareKind::DnsQueriesPerSecond),
            now,
        )),
        last_used: Mutex::new(now),
    }
}

/// Takes one of `kind` from `agent` if it has one left; `Err(kind)` otherwise.
fn hold(
    agent: &Arc<AgentShare>,
    kind: ShareKind,
    global: Option<Arc<AtomicUsize>>,
) -> Result<Held, ShareKind> {
    let limit = agent.limit(kind);
    let Some(counter) = agent.counter(kind) else {
        return Err(kind);
    };
    let taken = counter.fetch_update(Ordering::Relaxed, Ordering::Relaxed, |n| {
        (n < limit).then_some(n + 1)
    });
    match taken {
        Ok(_) => Ok(Held {
            agent: agent.clone(),
            kind,
            global,
        }),
        Err(_) => {
            if let Some(g) = global {
                g.fetch_sub(1, Ordering::Relaxed);
            }
            Err(kind)
        }
    }
}

fn over_share(agent: &AgentShare, kind: ShareKind) -> String {
    format!(
        "agent {} is at its share of {} ({}; shares.{} in its policy)",
        agent.cgroup,
        kind,
        agent.limit(kind),
        kind.field()
    )
}

/// The most agent connections brokerd serves at once, from its open-file limit: three quarters
/// of what is left after [`FD_RESERVE`], the last quarter for upstream connections. An idle
/// agent connection holds no upstream descriptor (upstream connections are pooled and taken per
/// request), so the upstream side needs one only per request in flight, and those are bounded
/// per agent by its shares; should they still run out, the request gets a 502 naming the
/// error, and the control socket and the audit log keep the reserve.
pub fn max_connections(nofile: u64) -> usize {
    usize::try_from(nofile.saturating_sub(FD_RESERVE) / 4 * 3)
        .unwrap_or(usize::MAX)
        .max(16)
}

/// The open-file limit brokerd asks for when its hard limit is lower and it may raise it (as
/// root, `CAP_SYS_RESOURCE`): room for [`max_connections`] of about 49,000 connections, the
/// order of systemd's default hard limit for services, and within the kernel's `fs.nr_open`.
pub const WANTED_NOFILE: u64 = 65_536;

/// Raises the open-file limit, so the shares, not the limit, decide who gets a connection: the
/// hard limit to [`WANTED_NOFILE`] (never past `fs.nr_open`) where brokerd is allowed to, and
/// the soft limit to the hard one. Returns the limit now in force.
pub fn raise_fd_limit() -> u64 {
    let nr_open = std::fs::read_to_string("/proc/sys/fs/nr_open")
        .ok()
        .and_then(|s| s.trim().parse::<u64>().ok())
        .unwrap_or(WANTED_NOFILE);
    raise_fd_limit_to(WANTED_NOFILE.min(nr_open))
}

fn raise_fd_limit_to(wanted: u64) -> u64 {
    let mut limit = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: getrlimit only writes the struct passed to it.
    if unsafe { libc::getrlimit(libc::RLIMIT_NOFILE, &mut limit) } != 0 {
        warn!(error = %std::io::Error::last_os_error(), "cannot read RLIMIT_NOFILE");
        return 1024;
    }
    if limit.rlim_max < wanted {
        let raised = libc::rlimit {
            rlim_cur: wanted,
            rlim_max: wanted,
        };
        // SAFETY: valid rlimit. Refused (EPERM) without CAP_SYS_RESOURCE: then the soft limit
        // goes as far as the hard one below.
        if unsafe { libc::setrlimit(libc::RLIMIT_NOFILE, &raised) } == 0 {
            return wanted;
        }
    }
    if limit.rlim_cur < limit.rlim_max {
        let raised = libc::rlimit {
            rlim_cur: limit.rlim_max,
            rlim_max: limit.rlim_max,
        };
        // SAFETY: valid rlimit.
        if unsafe { libc::setrlimit(libc::RLIMIT_NOFILE, &raised) } == 0 {
            return raised.rlim_cur;
        }
        warn!(error = %std::io::Error::last_os_error(), "cannot raise RLIMIT_NOFILE");
    }
    limit.rlim_cur
}

/// Key of a burst of like refusals: the agent (none: a connection no agent is proven for) and
/// what was refused.
type BurstKey = (Option<CgroupId>, &'static str);

/// A burst being summed: its newest event and how many were not recorded.
struct Burst {
    started: Instant,
    suppressed: u64,
    latest: AuditEvent,
}

/// Audits refusals that a flood can repeat fast (connections, DNS queries): the first of a
/// burst at once, then, once a second while it lasts, one record with how many more there were
/// (`count`) and the newest of them.
pub struct RefusalAudit {
    events: Arc<dyn EventSink>,
    bursts: Mutex<HashMap<BurstKey, Burst>>,
    totals: Mutex<HashMap<CgroupId, u64>>,
}

impl RefusalAudit {
    pub fn new(events: Arc<dyn EventSink>) -> Self {
        Self {
            events,
            bursts: Mutex::new(HashMap::new()),
            totals: Mutex::new(HashMap::new()),
        }
    }

    /// Refusals of the agent since brokerd started (shares and DNS rate only).
    pub fn refused_total(&self, id: CgroupId) -> u64 {
        self.totals
            .lock()
            .map(|t| t.get(&id).copied().unwrap_or(0))
            .unwrap_or(0)
    }

    /// A connection refused for a share (or brokerd's own limit).
    pub fn refused_connection(&self, origin: &ConnectionOrigin, refused: &Refused) {
        self.count(origin.cgroup_id);
        let event = AuditEvent {
            kind: Some(EventKind::Denial),
            decision: Some(Decision::Deny),
            reason: Some(format!("connection refused: {}", refused.reason)),
            side: Some(Side::Agent),
            ..origin_event(origin)
        };
        let key = refused.kind.map_or("share:brokerd", |k| share_key(k));
        self.record((Some(origin.cgroup_id), key), event);
    }

    /// A DNS query refused for the agent's queries-per-second share (`event` names the query).
    pub fn refused_dns_rate(
        &self,
        origin: &ConnectionOrigin,
        refused: &Refused,
        event: AuditEvent,
    ) {
        self.count(origin.cgroup_id);
        let event = AuditEvent {
            kind: Some(EventKind::Dns),
            decision: Some(Decision::Deny),
            reason: Some(refused.reason.clone()),
            ..event
        };
        self.record(
            (
                Some(origin.cgroup_id),
                share_key(ShareKind::DnsQueriesPerSecond),
            ),
            event,
        );
    }

    /// A request refused for one of the agent's request shares (`kind`: in flight, or per
    /// second).
    pub fn refused_request(
        &self,
        origin: &ConnectionOrigin,
        kind: ShareKind,
        mut event: AuditEvent,
    ) {
        self.count(origin.cgroup_id);
        self.record((Some(origin.cgroup_id), share_key(kind)), {
            event.kind = Some(EventKind::Denial);
            event.decision = Some(Decision::Deny);
            event
        });
    }

    /// A connection brokerd closed because the agent broke the protocol (malformed or
    /// oversized HTTP, an HTTP/2 flood answered with GOAWAY, a request head too slow): `event`
    /// names the connection and the reason. Like ones of the same agent are summed, so a flood
    /// of such connections grows the log by a record a second.
    pub fn protocol_error(&self, origin: &ConnectionOrigin, event: AuditEvent) -> bool {
        self.record((Some(origin.cgroup_id), "connection:protocol"), event)
    }

    /// A DNS query the policy refused: like ones of the same agent are summed. Whether it was
    /// recorded at once (the caller logs only those).
    pub fn refused_dns_name(&self, origin: &ConnectionOrigin, event: AuditEvent) -> bool {
        self.record((Some(origin.cgroup_id), "dns:refused"), event)
    }

    /// A connection no agent is proven for. Whether it was recorded at once (the first of a
    /// burst): the caller logs only those, so a flood does not flood brokerd's log either.
    pub fn refused_unresolved(&self, event: AuditEvent) -> bool {
        self.record((None, "connection:unresolved"), event)
    }

    fn count(&self, id: CgroupId) {
        if let Ok(mut t) = self.totals.lock() {
            *t.entry(id).or_default() += 1;
        }
    }

    /// Records `event` now if it starts a burst (returns true), else sums it into the burst.
    fn record(&self, key: BurstKey, event: AuditEvent) -> bool {
        let now = Instant::now();
        let first = {
            let Ok(mut bursts) = self.bursts.lock() else {
                self.events.record(event);
                return true;
            };
            match bursts.get_mut(&key) {
                Some(burst) if now.saturating_duration_since(burst.started) < REFUSAL_WINDOW => {
                    burst.suppressed += 1;
                    burst.latest = event;
                    None
                }
                Some(burst) => {
                    let summary = summary(burst, now);
                    *burst = Burst {
                        started: now,
                        suppressed: 0,
                        latest: event.clone(),
                    };
                    Some((summary, event))
                }
                None => {
                    bursts.insert(
                        key,
                        Burst {
                            started: now,
                            suppressed: 0,
                            latest: event.clone(),
                        },
                    );
                    Some((None, event))
                }
            }
        };
        let Some((summary, event)) = first else {
            return false;
        };
        if let Some(s) = summary {
            self.events.record(s);
        }
        self.events.record(event);
        true
    }

    /// Writes the summaries of bursts whose window is over (all of them when `all`).
    pub fn flush(&self, all: bool) {
        let now = Instant::now();
        let mut out = Vec::new();
        if let Ok(mut bursts) = self.bursts.lock() {
            bursts.retain(|_, burst| {
                if !all && now.saturating_duration_since(burst.started) < REFUSAL_WINDOW {
                    return true;
                }
                out.extend(summary(burst, now));
                false
            });
        }
        for event in out {
            self.events.record(event);
        }
    }
}

fn share_key(kind: ShareKind) -> &'static str {
    match kind {
        ShareKind::Connections => "share:connections",
        ShareKind::NewConnectionsPerSecond => "share:new_connections",
        ShareKind::PendingHandshakes => "share:handshakes",
        ShareKind::RequestsInFlight => "share:requests",
        ShareKind::DnsQueriesPerSecond => "share:dns",
        ShareKind::RequestsPerSecond => "share:request_rate",
    }
}

/// The record of a burst's refusals that were not recorded one by one: the newest of them,
/// with their number.
fn summary(burst: &Burst, now: Instant) -> Option<AuditEvent> {
    if burst.suppressed == 0 {
        return None;
    }
    let secs = now.saturating_duration_since(burst.started).as_secs_f64();
    let mut event = burst.latest.clone();
    event.time_ms = now_unix_ms();
    event.count = Some(burst.suppressed);
    event.reason = Some(format!(
        "{} more like this in {secs:.1} s (the newest shown): {}",
        burst.suppressed,
        event.reason.as_deref().unwrap_or("refused")
    ));
    Some(event)
}

fn origin_event(origin: &ConnectionOrigin) -> AuditEvent {
    AuditEvent {
        time_ms: now_unix_ms(),
        cgroup: Some(origin.cgroup.to_string()),
        cgroup_path: origin.cgroup_path.as_ref().map(ToString::to_string),
        pod: origin.pod.clone(),
        pid: Some(origin.pid),
        comm: Some(origin.comm.clone()),
        exe: origin.exe.clone(),
        original_dst: Some(origin.original_dst),
        ..AuditEvent::default()
    }
}

#[cfg(test)]
mod tests;
