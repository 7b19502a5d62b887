//! brokerd's metrics, in the Prometheus / OpenMetrics text exposition (`prometheus-client`):
//! served over HTTP on a loopback address when `metrics_addr` is set ([`serve`], `GET /metrics`
//! only) and through the control socket for `brokerctl metrics` ([`Exporter::render`]).
//!
//! Per agent, from the audit events every recorder already produces ([`MeteredSink`] sees each
//! one on its way to the log, so nothing on the request path is counted twice or missed):
//! requests by decision and status class, denials by reason kind, request latency, bytes, limit
//! hits. Upstream latency, TLS handshakes, leaf cache lookups, open connections, the upstream
//! pool and the audit writer's commits are counted where they happen, through [`global`].
//! The eBPF programs' counters and the audit queue depth are read at scrape time.
//!
//! Label values are bounded: `agent` is the cgroup of the policy file that governs the agent
//! (the agent's own name when no file does), never a pid; `host` is a host a policy rule names
//! (its pattern for a `*.suffix` rule), else `other`; reason kinds, outcomes and answers are
//! fixed sets. No path ever becomes a label.
//!
//! Cost on the request path: one read lock and hash lookup for the agent's cached handles, a
//! few atomic adds, and a histogram observation (a short mutex). No lock is held across an
//! await.

use std::{
    collections::{HashMap, HashSet},
    fmt::Write as _,
    net::SocketAddr,
    sync::{
        Arc, LazyLock, Mutex, RwLock,
        atomic::{AtomicI64, Ordering},
    },
    time::Duration,
};

use agent_broker_core::policy::{Destination, HostPattern, Policy};
use agent_broker_protocol::{
    AuditEvent, Counters, Decision, EventKind, RequestOutcome, RuntimeGauges,
};
use prometheus_client::{
    collector::Collector,
    encoding::{DescriptorEncoder, EncodeLabelSet, EncodeMetric as _},
    metrics::{
        MetricType,
        counter::{ConstCounter, Counter},
        family::Family,
        gauge::{ConstGauge, Gauge},
        histogram::{Histogram, exponential_buckets},
    },
    registry::Registry,
};

use crate::audit::EventSink;

pub mod runtime;

/// Prefix of every metric name.
pub const PREFIX: &str = "agent_broker";
/// The exposition's content type (OpenMetrics text 1.0.0).
pub const CONTENT_TYPE: &str = "application/openmetrics-text; version=1.0.0; charset=utf-8";
/// The `host` label of a host no policy rule names.
pub const OTHER_HOST: &str = "other";
/// More agents than this in the handle cache and it starts over (the labels stay bounded by
/// the policy files; this only bounds the cache of raw agent names).
const AGENT_CACHE_CAPACITY: usize = 4096;

/// The metrics of the running brokerd, shared by every module that counts something.
pub fn global() -> &'static Arc<Metrics> {
    static GLOBAL: LazyLock<Arc<Metrics>> = LazyLock::new(|| Arc::new(Metrics::new()));
    &GLOBAL
}

/// Why a request or connection was refused, as the `reason` label of
/// `agent_broker_denials_total`: a small fixed set.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum DenialKind {
    /// No rule allows it (the policy said no).
    Policy,
    /// A rule allows the destination but cannot be carried out for this request.
    Rule,
    /// The request's own form (hosts that disagree, a tunnel past the broker).
    Request,
    /// A handle used where it is not valid.
    Handle,
    /// A rule's rate limit.
    RateLimit,
    /// A rule's daily budget.
    Budget,
    /// The agent's share of brokerd (connections, handshakes, requests in flight).
    Share,
    /// The TLS handshake with the agent failed.
    Tls,
    /// Anything else brokerd refused (an origin it cannot identify, a connection refusal).
    Other,
}

impl DenialKind {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Policy => "policy",
            Self::Rule => "rule",
            Self::Request => "request",
            Self::Handle => "handle",
            Self::RateLimit => "rate_limit",
            Self::Budget => "budget",
            Self::Share => "share",
            Self::Tls => "tls",
            Self::Other => "other",
        }
    }

    /// The kind of a denial record. Limits and shares are told apart by the words
    /// `core::policy::limits` and `shares` write; a denial that names a rule was refused by it.
    fn of(event: &AuditEvent) -> Self {
        let reason = event.reason.as_deref().unwrap_or_default();
        match event.kind {
            Some(EventKind::HandleMisuse) => return Self::Handle,
            Some(EventKind::TlsFailure) => return Self::Tls,
            _ => {}
        }
        if event.status == Some(429) {
            return Self::of_limit(reason);
        }
        if event.method.is_none() {
            return Self::Other;
        }
        // The proxy's refusals of requests say their kind (see [`recording_denial`]); a
        // request refused elsewhere is the policy's.
        Self::Policy
    }

    /// A 429's kind, by the words `core::policy::limits` writes (a share's refusal otherwise).
    pub fn of_limit(reason: &str) -> Self {
        if reason.starts_with("rate limit") {
            Self::RateLimit
        } else if reason.starts_with("daily budget") {
            Self::Budget
        } else {
            Self::Share
        }
    }
}

thread_local! {
    /// The kind of the denial being recorded on this thread, set by [`recording_denial`].
    static DENIAL_KIND: std::cell::Cell<Option<DenialKind>> = const { std::cell::Cell::new(None) };
}

/// Runs `record`, which records one refusal's audit event through the metered sink on this
/// thread, with the refusal's kind known to the metrics: the proxy knows why it refused a
/// request (the policy, a rule, the request's form...), the audit event says it only in words.
pub fn recording_denial<T>(kind: Option<DenialKind>, record: impl FnOnce() -> T) -> T {
    let before = DENIAL_KIND.replace(kind);
    let out = record();
    DENIAL_KIND.set(before);
    out
}

/// How an operator (or a timeout) decided an approval request; the `decision` label of
/// `agent_broker_approvals_decided_total`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum ApprovalDecision {
    AllowOnce,
    AllowUntil,
    AllowAlways,
    Deny,
    /// Nobody decided in time: denied.
    Timeout,
}

impl ApprovalDecision {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::AllowOnce => "allow_once",
            Self::AllowUntil => "allow_until",
            Self::AllowAlways => "allow_always",
            Self::Deny => "deny",
            Self::Timeout => "timeout",
        }
    }
}

/// How a TLS handshake with an agent ended (`agent_broker_tls_handshakes_total{outcome}`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum HandshakeOutcome {
    Ok,
    /// The agent's ClientHello was malformed.
    Malformed,
    /// The handshake itself failed (typically: the agent does not trust the broker CA).
    Failed,
    /// ClientHello or handshake timed out.
    Timeout,
    /// brokerd could not mint a certificate for the name.
    MintFailed,
}

impl HandshakeOutcome {
    fn as_str(self) -> &'static str {
        match self {
            Self::Ok => "ok",
            Self::Malformed => "malformed",
            Self::Failed => "failed",
            Self::Timeout => "timeout",
            Self::MintFailed => "mint_failed",
        }
    }
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct AgentLabels {
    agent: Arc<str>,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct RequestLabels {
    agent: Arc<str>,
    host: Arc<str>,
    decision: &'static str,
    status_class: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct ReasonLabels {
    agent: Arc<str>,
    reason: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct LimitLabels {
    agent: Arc<str>,
    limit: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct DecisionLabels {
    agent: Arc<str>,
    decision: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct OutcomeLabels {
    outcome: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct ResultLabels {
    result: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct AnswerLabels {
    answer: &'static str,
}

type HistogramFamily<L> = Family<L, Histogram, fn() -> Histogram>;

/// Seconds, 1 ms to about 65 s.
fn latency_histogram() -> Histogram {
    Histogram::new(exponential_buckets(0.001, 2.0, 17))
}

/// Seconds, 0.5 ms to about 1 s.
fn commit_histogram() -> Histogram {
    Histogram::new(exponential_buckets(0.0005, 2.0, 12))
}

/// One agent's handles, cached so an event costs no label-set allocation.
struct AgentHandles {
    label: Arc<str>,
    request_latency: Histogram,
    upstream_latency: Histogram,
    bytes_in: Counter,
    bytes_out: Counter,
}

/// What the policy says about labels: the agents (policy files' cgroups) and the hosts its
/// rules name. Replaced whole on each policy change.
#[derive(Default)]
struct LabelPolicy {
    agents: HashSet<String>,
    exact_hosts: HashMap<String, Arc<str>>,
    /// `*.suffix` rules: the suffix and its label (the pattern).
    wildcards: Vec<(String, Arc<str>)>,
}

impl LabelPolicy {
    fn of(policy: &Policy) -> Self {
        let mut out = Self::default();
        for file in policy.files() {
            out.agents.insert(file.cgroup().as_str().to_owned());
            for rule in file.rules() {
                match rule.destination() {
                    Destination::Host(HostPattern::Exact(h)) => {
                        out.exact_hosts.insert(h.clone(), Arc::from(h.as_str()));
                    }
                    Destination::Host(HostPattern::Wildcard(s)) => {
                        if !out.wildcards.iter().any(|(w, _)| w == s) {
                            out.wildcards
                                .push((s.clone(), Arc::from(format!("*.{s}").as_str())));
                        }
                    }
                    Destination::Ip(_) => {}
                }
            }
        }
        // Longest suffix first: the most specific rule names the host.
        out.wildcards
            .sort_by_key(|(s, _)| std::cmp::Reverse(s.len()));
        out
    }

    /// The `agent` label of an agent name: the nearest policy file at or above it.
    fn agent_label(&self, agent: &str) -> Arc<str> {
        let mut at = agent.trim_matches('/');
        loop {
            if self.agents.contains(at) {
                return Arc::from(at);
            }
            match at.rsplit_once('/') {
                Some((parent, _)) => at = parent,
                None => return Arc::from(agent),
            }
        }
    }

    fn host_label(&self, host: Option<&str>, other: &Arc<str>) -> Arc<str> {
        let Some(host) = host else {
            return other.clone();
        };
        let host = host.trim_end_matches('.');
        if let Some(l) = self.exact_hosts.get(host) {
            return l.clone();
        }
        let lower;
        let host = if host.bytes().any(|b| b.is_ascii_uppercase()) {
            lower = host.to_ascii_lowercase();
            if let Some(l) = self.exact_hosts.get(&lower) {
                return l.clone();
            }
            lower.as_str()
        } else {
            host
        };
        self.wildcards
            .iter()
            .find(|(suffix, _)| {
                host.len() > suffix.len() + 1
                    && host.ends_with(suffix.as_str())
                    && host.as_bytes()[host.len() - suffix.len() - 1] == b'.'
            })
            .map_or_else(|| other.clone(), |(_, l)| l.clone())
    }
}

/// The eBPF programs' counters as last read, exposed as counters.
#[derive(Debug, Default)]
struct KernelCounters(Mutex<Option<Counters>>);

impl Collector for KernelCounters {
    fn encode(&self, mut encoder: DescriptorEncoder) -> Result<(), std::fmt::Error> {
        let Some(c) = self.0.lock().ok().and_then(|c| *c) else {
            return Ok(());
        };
        let redirects = [("connect", c.redirected), ("dns", c.dns_redirected)];
        let mut m = encoder.encode_descriptor(
            "ebpf_redirects",
            "Connections and DNS datagrams the eBPF programs redirected to brokerd",
            None,
            MetricType::Counter,
        )?;
        for (kind, v) in redirects {
            ConstCounter::new(v).encode(m.encode_family(&[("kind", kind)])?)?;
        }
        let refusals = [
            ("connect", c.refused),
            ("rekey_failed", c.rekey_failed),
            ("udp", c.udp_refused),
            ("socket", c.socket_refused),
            ("bind", c.bind_refused),
            ("egress", c.egress_dropped),
            ("ingress", c.ingress_dropped),
            ("netns", c.netns_refused),
            ("connect_paced", c.connect_paced),
        ];
        let mut m = encoder.encode_descriptor(
            "ebpf_refusals",
            "What the eBPF programs refused or dropped in the kernel, by kind",
            None,
            MetricType::Counter,
        )?;
        for (kind, v) in refusals {
            ConstCounter::new(v).encode(m.encode_family(&[("kind", kind)])?)?;
        }
        Ok(())
    }
}

/// Values read at scrape time.
#[derive(Debug, Default)]
struct Sampled {
    audit_queue: AtomicI64,
    pool: AtomicI64,
    leaf_cache: AtomicI64,
    answered_names: AtomicI64,
    /// The rest of [`RuntimeGauges`], as of the last [`Metrics::sample`].
    tasks: AtomicI64,
    rss_bytes: AtomicI64,
    open_fds: AtomicI64,
}

#[derive(Debug)]
struct SampledGauges(Arc<Sampled>);

impl Collector for SampledGauges {
    fn encode(&self, mut encoder: DescriptorEncoder) -> Result<(), std::fmt::Error> {
        let gauges = [
            (
                "audit_queue_depth",
                "Audit events queued for the writer",
                self.0.audit_queue.load(Ordering::Relaxed),
            ),
            (
                "upstream_pool_connections",
                "Upstream connections pooled by the proxy threads (idle HTTP/1.1 and HTTP/2)",
                self.0.pool.load(Ordering::Relaxed),
            ),
            (
                "runtime_tasks",
                "Tasks alive on brokerd's async runtimes (the main one and every proxy thread's)",
                self.0.tasks.load(Ordering::Relaxed),
            ),
            (
                "runtime_leaf_cache_entries",
                "Leaf certificates cached for the agents' TLS connections",
                self.0.leaf_cache.load(Ordering::Relaxed),
            ),
            (
                "runtime_answered_names",
                "Entries in the table of names brokerd's DNS answered, by agent and address",
                self.0.answered_names.load(Ordering::Relaxed),
            ),
            (
                "runtime_rss_bytes",
                "brokerd's resident memory (VmRSS)",
                self.0.rss_bytes.load(Ordering::Relaxed),
            ),
            (
                "runtime_open_fds",
                "File descriptors brokerd holds open",
                self.0.open_fds.load(Ordering::Relaxed),
            ),
        ];
        for (name, help, v) in gauges {
            let m = encoder.encode_descriptor(name, help, None, MetricType::Gauge)?;
            ConstGauge::new(v).encode(m)?;
        }
        Ok(())
    }
}

/// Every metric brokerd exports. One instance per brokerd ([`global`]); tests make their own.
pub struct Metrics {
    registry: Registry,
    requests: Family<RequestLabels, Counter>,
    denials: Family<ReasonLabels, Counter>,
    limit_hits: Family<LimitLabels, Counter>,
    request_latency: HistogramFamily<AgentLabels>,
    upstream_latency: HistogramFamily<AgentLabels>,
    bytes_in: Family<AgentLabels, Counter>,
    bytes_out: Family<AgentLabels, Counter>,
    approvals_pending: Family<AgentLabels, Gauge>,
    approvals_decided: Family<DecisionLabels, Counter>,
    connections_open: Gauge,
    tls_handshakes: Family<OutcomeLabels, Counter>,
    leaf_cache: Family<ResultLabels, Counter>,
    audit_commit: Histogram,
    dns_queries: Family<AnswerLabels, Counter>,
    kernel: Arc<KernelCounters>,
    sampled: Arc<Sampled>,
    policy: RwLock<Arc<LabelPolicy>>,
    agents: RwLock<HashMap<String, Arc<AgentHandles>>>,
    other_host: Arc<str>,
}

impl std::fmt::Debug for Metrics {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Metrics").finish_non_exhaustive()
    }
}

impl Default for Metrics {
    fn default() -> Self {
        Self::new()
    }
}

impl Metrics {
    pub fn new() -> Self {
        let mut registry = Registry::with_prefix(PREFIX);
        let requests = Family::default();
        registry.register(
            "requests",
            "HTTP requests of agents, by decision and status class of the answer they got",
            requests.clone(),
        );
        let denials = Family::default();
        registry.register(
            "denials",
            "Requests and connections brokerd refused, by reason kind",
            denials.clone(),
        );
        let limit_hits = Family::default();
        registry.register(
            "limit_hits",
            "Requests refused by a rule's rate limit or daily budget",
            limit_hits.clone(),
        );
        let request_latency: HistogramFamily<AgentLabels> =
            Family::new_with_constructor(latency_histogram);
        registry.register(
            "request_duration_seconds",
            "From a request's arrival to brokerd's answer: the response head passed on, or the refusal",
            request_latency.clone(),
        );
        let upstream_latency: HistogramFamily<AgentLabels> =
            Family::new_with_constructor(latency_histogram);
        registry.register(
            "upstream_duration_seconds",
            "From sending a request upstream to the upstream's response head",
            upstream_latency.clone(),
        );
        let bytes_in = Family::default();
        registry.register(
            "request_bytes",
            "Request body bytes from agents",
            bytes_in.clone(),
        );
        let bytes_out = Family::default();
        registry.register(
            "response_bytes",
            "Response body bytes to agents",
            bytes_out.clone(),
        );
        let approvals_pending = Family::default();
        registry.register(
            "approvals_pending",
            "Requests held for an operator's approval",
            approvals_pending.clone(),
        );
        let approvals_decided = Family::default();
        registry.register(
            "approvals_decided",
            "Approval requests decided, by decision",
            approvals_decided.clone(),
        );
        let connections_open = Gauge::default();
        registry.register(
            "connections_open",
            "Agent connections brokerd is serving",
            connections_open.clone(),
        );
        let tls_handshakes = Family::default();
        registry.register(
            "tls_handshakes",
            "TLS handshakes with agents, by outcome",
            tls_handshakes.clone(),
        );
        let leaf_cache = Family::default();
        registry.register(
            "leaf_cache_lookups",
            "Lookups of the minted leaf certificate cache, by result (hit, miss)",
            leaf_cache.clone(),
        );
        let audit_commit = commit_histogram();
        registry.register(
            "audit_commit_duration_seconds",
            "How long the audit writer's durable commits take",
            audit_commit.clone(),
        );
        let dns_queries = Family::default();
        registry.register(
            "dns_queries",
            "Agents' DNS queries, by answer",
            dns_queries.clone(),
        );
        let kernel = Arc::new(KernelCounters::default());
        registry.register_collector(Box::new(kernel.clone()));
        let sampled = Arc::new(Sampled::default());
        registry.register_collector(Box::new(SampledGauges(sampled.clone())));
        Self {
            registry,
            requests,
            denials,
            limit_hits,
            request_latency,
            upstream_latency,
            bytes_in,
            bytes_out,
            approvals_pending,
            approvals_decided,
            connections_open,
            tls_handshakes,
            leaf_cache,
            audit_commit,
            dns_queries,
            kernel,
            sampled,
            policy: RwLock::default(),
            agents: RwLock::default(),
            other_host: Arc::from(OTHER_HOST),
        }
    }

    /// The exposition, OpenMetrics text (ends with `# EOF`).
    pub fn encode(&self) -> String {
        let mut out = String::new();
        if prometheus_client::encoding::text::encode(&mut out, &self.registry).is_err() {
            // Writing to a String cannot fail; say so rather than serve half a page.
            out.clear();
            let _ = writeln!(out, "# EOF");
        }
        out
    }

    /// Takes the agents and rule hosts of a new policy (labels from then on).
    pub fn set_policy(&self, policy: &Policy) {
        let labels = Arc::new(LabelPolicy::of(policy));
        if let Ok(mut p) = self.policy.write() {
            *p = labels;
        }
        if let Ok(mut a) = self.agents.write() {
            a.clear();
        }
    }

    fn label_policy(&self) -> Arc<LabelPolicy> {
        self.policy
            .read()
            .map(|p| p.clone())
            .unwrap_or_else(|_| Arc::new(LabelPolicy::default()))
    }

    /// The cached handles of an agent (by the name its records carry).
    fn agent(&self, agent: &str) -> Arc<AgentHandles> {
        if let Some(h) = self.agents.read().ok().and_then(|a| a.get(agent).cloned()) {
            return h;
        }
        let label = self.label_policy().agent_label(agent);
        let key = AgentLabels {
            agent: label.clone(),
        };
        let handles = Arc::new(AgentHandles {
            request_latency: self.request_latency.get_or_create_owned(&key),
            upstream_latency: self.upstream_latency.get_or_create_owned(&key),
            bytes_in: self.bytes_in.get_or_create_owned(&key),
            bytes_out: self.bytes_out.get_or_create_owned(&key),
            label,
        });
        if let Ok(mut a) = self.agents.write() {
            if a.len() >= AGENT_CACHE_CAPACITY {
                a.clear();
            }
            a.insert(agent.to_owned(), handles.clone());
        }
        handles
    }

    /// Counts what an audit event says (see [`MeteredSink`]).
    pub fn observe(&self, event: &AuditEvent) {
        let n = event.count.unwrap_or(1);
        match event.kind {
            Some(EventKind::Dns) => {
                self.dns_queries
                    .get_or_create(&AnswerLabels {
                        answer: dns_answer(event),
                    })
                    .inc_by(n);
                return;
            }
            Some(
                EventKind::Request
                | EventKind::Denial
                | EventKind::TlsFailure
                | EventKind::HandleMisuse,
            ) => {}
            _ => return,
        }
        // A forwarded request is counted once, when it ends.
        if event.outcome == Some(RequestOutcome::Forwarded) {
            return;
        }
        let Some(agent) = event.cgroup.as_deref() else {
            return;
        };
        let handles = self.agent(agent);
        if event.method.is_some() {
            let host = self.label_policy().host_label(
                event.host.as_deref().or(event.sni.as_deref()),
                &self.other_host,
            );
            self.requests
                .get_or_create(&RequestLabels {
                    agent: handles.label.clone(),
                    host,
                    decision: match event.decision {
                        Some(Decision::Allow) => "allow",
                        Some(Decision::Deny) => "deny",
                        None => "none",
                    },
                    status_class: status_class(event.status),
                })
                .inc_by(n);
            if let Some(us) = event.latency_us {
                handles
                    .request_latency
                    .observe(Duration::from_micros(us).as_secs_f64());
            }
            handles.bytes_in.inc_by(event.bytes_in);
            handles.bytes_out.inc_by(event.bytes_out);
        }
        if event.is_denial() {
            let kind = DENIAL_KIND.get().unwrap_or_else(|| DenialKind::of(event));
            self.denials
                .get_or_create(&ReasonLabels {
                    agent: handles.label.clone(),
                    reason: kind.as_str(),
                })
                .inc_by(n);
            if matches!(kind, DenialKind::RateLimit | DenialKind::Budget) {
                self.limit_hits
                    .get_or_create(&LimitLabels {
                        agent: handles.label.clone(),
                        limit: kind.as_str(),
                    })
                    .inc_by(n);
            }
        }
    }

    /// How long an agent's request waited for the upstream's response head.
    pub fn upstream_latency(&self, agent: &str, took: Duration) {
        self.agent(agent)
            .upstream_latency
            .observe(took.as_secs_f64());
    }

    /// An agent connection is being served until the guard drops.
    pub fn connection_opened(self: &Arc<Self>) -> OpenConnection {
        self.connections_open.inc();
        OpenConnection(self.clone())
    }

    pub fn tls_handshake(&self, outcome: HandshakeOutcome) {
        self.tls_handshakes
            .get_or_create(&OutcomeLabels {
                outcome: outcome.as_str(),
            })
            .inc();
    }

    pub fn leaf_cache(&self, hit: bool) {
        self.leaf_cache
            .get_or_create(&ResultLabels {
                result: if hit { "hit" } else { "miss" },
            })
            .inc();
    }

    /// A proxy thread's pool changed size by `delta` connections.
    pub fn upstream_pool_changed(&self, delta: i64) {
        self.sampled.pool.fetch_add(delta, Ordering::Relaxed);
    }

    pub fn audit_committed(&self, took: Duration) {
        self.audit_commit.observe(took.as_secs_f64());
    }

    /// The leaf certificate cache now holds `entries`.
    pub fn leaf_cache_size(&self, entries: usize) {
        self.sampled.leaf_cache.store(
            i64::try_from(entries).unwrap_or(i64::MAX),
            Ordering::Relaxed,
        );
    }

    /// The answered-names table now holds `entries`.
    pub fn answered_names_size(&self, entries: usize) {
        self.sampled.answered_names.store(
            i64::try_from(entries).unwrap_or(i64::MAX),
            Ordering::Relaxed,
        );
    }

    /// Values read at scrape time: the eBPF counters, the audit queue depth and the rest of
    /// the runtime gauges (tasks, memory, descriptors), which it returns.
    pub fn sample(&self, kernel: Option<Counters>, audit_queue: u64) -> RuntimeGauges {
        if let (Some(c), Ok(mut k)) = (kernel, self.kernel.0.lock()) {
            *k = Some(c);
        }
        let process = runtime::sample_process();
        let tasks = runtime::alive_tasks();
        let store = |gauge: &AtomicI64, v: u64| {
            gauge.store(i64::try_from(v).unwrap_or(i64::MAX), Ordering::Relaxed);
        };
        store(&self.sampled.audit_queue, audit_queue);
        store(&self.sampled.tasks, tasks);
        store(&self.sampled.rss_bytes, process.rss_bytes);
        store(&self.sampled.open_fds, process.open_fds);
        let read = |gauge: &AtomicI64| u64::try_from(gauge.load(Ordering::Relaxed)).unwrap_or(0);
        RuntimeGauges {
            tasks,
            upstream_pool: read(&self.sampled.pool),
            leaf_cache: read(&self.sampled.leaf_cache),
            answered_names: read(&self.sampled.answered_names),
            audit_queue,
            rss_bytes: process.rss_bytes,
            open_fds: process.open_fds,
        }
    }
}

/// What the approvals (issue 16 part 1) report: call them through [`global`].
impl Metrics {
    /// An approval request was filed for `agent` (it is now pending).
    pub fn approval_asked(&self, agent: &str) {
        self.approvals_pending
            .get_or_create(&self.agent_key(agent))
            .inc();
    }

    /// A pending approval request of `agent` was decided (it is no longer pending).
    pub fn approval_decided(&self, agent: &str, decision: ApprovalDecision) {
        let key = self.agent_key(agent);
        self.approvals_pending.get_or_create(&key).dec();
        self.approvals_decided
            .get_or_create(&DecisionLabels {
                agent: key.agent,
                decision: decision.as_str(),
            })
            .inc();
    }

    fn agent_key(&self, agent: &str) -> AgentLabels {
        AgentLabels {
            agent: self.agent(agent).label.clone(),
        }
    }
}

/// Counts an open connection until dropped.
pub struct OpenConnection(Arc<Metrics>);

impl Drop for OpenConnection {
    fn drop(&mut self) {
        self.0.connections_open.dec();
    }
}

fn status_class(status: Option<u16>) -> &'static str {
    match status {
        Some(100..=199) => "1xx",
        Some(200..=299) => "2xx",
        Some(300..=399) => "3xx",
        Some(400..=499) => "4xx",
        Some(500..=599) => "5xx",
        _ => "none",
    }
}

/// The answer of a DNS record: refused by policy, or the response code brokerd gave.
fn dns_answer(event: &AuditEvent) -> &'static str {
    if event.decision == Some(Decision::Deny) {
        return "refused";
    }
    match event.status {
        Some(0) => "allowed",
        Some(2) => "servfail",
        Some(3) => "nxdomain",
        Some(5) => "refused",
        _ => "other",
    }
}

/// The audit sink with metrics: counts each event, then passes it on.
pub struct MeteredSink {
    inner: Arc<dyn EventSink>,
    metrics: Arc<Metrics>,
}

impl MeteredSink {
    pub fn new(inner: Arc<dyn EventSink>, metrics: Arc<Metrics>) -> Self {
        Self { inner, metrics }
    }
}

impl EventSink for MeteredSink {
    fn record(&self, event: AuditEvent) {
        self.metrics.observe(&event);
        self.inner.record(event);
    }

    fn writable(&self) -> Result<(), String> {
        self.inner.writable()
    }
}

/// What a scrape reads besides the counters: the kernel's counters and the audit queue.
pub struct Exporter {
    pub metrics: Arc<Metrics>,
    pub capture: crate::capture::CaptureHandle,
    pub audit: crate::audit::AuditHandle,
}

/// What the metrics listener serves: the exposition as of now.
pub trait Scrape: Send + Sync + 'static {
    fn scrape(&self) -> std::pin::Pin<Box<dyn Future<Output = String> + Send + '_>>;
}

impl Scrape for Exporter {
    fn scrape(&self) -> std::pin::Pin<Box<dyn Future<Output = String> + Send + '_>> {
        Box::pin(self.render())
    }
}

impl Exporter {
    /// The exposition, with the sampled values read now.
    pub async fn render(&self) -> String {
        let kernel = match self.capture.status().await {
            Ok((_, counters)) => Some(counters),
            Err(e) => {
                tracing::warn!(error = %e, "metrics: cannot read the eBPF counters");
                None
            }
        };
        self.metrics.sample(kernel, self.audit.queue_depth());
        self.metrics.encode()
    }

    /// The runtime gauges as of now (the eBPF counters are left as last read).
    pub fn runtime(&self) -> RuntimeGauges {
        self.metrics.sample(None, self.audit.queue_depth())
    }
}

/// Keeps the labels in step with the policy until `cancel`.
pub async fn follow_policy(
    metrics: Arc<Metrics>,
    mut policy: tokio::sync::watch::Receiver<Arc<Policy>>,
    cancel: tokio_util::sync::CancellationToken,
) {
    loop {
        let current = policy.borrow_and_update().clone();
        metrics.set_policy(&current);
        tokio::select! {
            () = cancel.cancelled() => return,
            changed = policy.changed() => if changed.is_err() { return },
        }
    }
}

/// Errors of the metrics listener.
#[derive(Debug, thiserror::Error)]
pub enum ServeError {
    #[error("cannot bind the metrics listener {addr}")]
    Bind {
        addr: SocketAddr,
        #[source]
        source: std::io::Error,
    },
}

/// Binds the metrics listener (the address was checked to be loopback by the config).
pub async fn bind(addr: SocketAddr) -> Result<tokio::net::TcpListener, ServeError> {
    tokio::net::TcpListener::bind(addr)
        .await
        .map_err(|source| ServeError::Bind { addr, source })
}

/// Serves `GET /metrics` (HTTP/1.1) on `listener` until `cancel`; anything else is a 404 or
/// 405.
pub async fn serve(
    listener: tokio::net::TcpListener,
    exporter: Arc<dyn Scrape>,
    cancel: tokio_util::sync::CancellationToken,
) {
    use hyper::{server::conn::http1, service::service_fn};
    use hyper_util::rt::{TokioIo, TokioTimer};
    loop {
        let accepted = tokio::select! {
            () = cancel.cancelled() => return,
            a = listener.accept() => a,
        };
        let stream = match accepted {
            Ok((s, _)) => s,
            Err(e) => {
                tracing::warn!(error = %e, "metrics accept failed");
                tokio::time::sleep(Duration::from_millis(50)).await;
                continue;
            }
        };
        let exporter = exporter.clone();
        tokio::spawn(async move {
            let service = service_fn(move |req: http::Request<hyper::body::Incoming>| {
                let exporter = exporter.clone();
                async move { Ok::<_, std::convert::Infallible>(answer(&exporter, &req).await) }
            });
            let conn = http1::Builder::new()
                .timer(TokioTimer::new())
                .header_read_timeout(Duration::from_secs(10))
                .serve_connection(TokioIo::new(stream), service);
            let _ = tokio::time::timeout(Duration::from_secs(60), conn).await;
        });
    }
}

async fn answer<B>(
    exporter: &Arc<dyn Scrape>,
    req: &http::Request<B>,
) -> http::Response<http_body_util::Full<bytes::Bytes>> {
    use http::{StatusCode, header};
    let reply = |status: StatusCode, text: &'static str| {
        let mut r = http::Response::new(http_body_util::Full::new(bytes::Bytes::from_static(
            text.as_bytes(),
        )));
        *r.status_mut() = status;
        r
    };
    if req.uri().path() != "/metrics" {
        return reply(StatusCode::NOT_FOUND, "brokerd serves /metrics only\n");
    }
    if req.method() != http::Method::GET && req.method() != http::Method::HEAD {
        let mut r = reply(StatusCode::METHOD_NOT_ALLOWED, "GET /metrics only\n");
        r.headers_mut()
            .insert(header::ALLOW, http::HeaderValue::from_static("GET, HEAD"));
        return r;
    }
    let mut r = http::Response::new(http_body_util::Full::new(bytes::Bytes::from(
        exporter.scrape().await,
    )));
    r.headers_mut().insert(
        header::CONTENT_TYPE,
        http::HeaderValue::from_static(CONTENT_TYPE),
    );
    r
}

/// A counter value as it would be sampled from the text, for tests.
#[cfg(test)]
pub(crate) fn sample_value(text: &str, series: &str) -> Option<f64> {
    text.lines()
        .find_map(|l| l.strip_prefix(series)?.strip_prefix(' ')?.parse().ok())
}

#[cfg(test)]
mod tests;
