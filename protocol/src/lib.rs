//! The control protocol between brokerd and its clients (brokerctl, the console).
//!
//! Framing: newline-delimited JSON over brokerd's Unix socket (`<run-dir>/control.sock`). A client
//! writes one [`Request`] per line and reads one [`Response`] per line, in order. This crate is
//! serde types only (plus the blocking client, and [`docs`], which writes the binaries' man pages
//! and completions): it must never depend on aya, redb, rustls or tokio, so the console can link
//! it without linking the daemon. [`client`] is the one blocking client of the socket, with
//! bounded lines, for both. A secret value travels in one direction only, from brokerctl to
//! brokerd in [`Request::SecretSet`], wrapped in [`SecretInput`] (redacted `Debug`, zeroized on
//! drop); no response ever carries one.

use std::{fmt, net::SocketAddr};

pub mod client;
pub mod docs;
pub mod peer;
pub mod sandbox;

use serde::{Deserialize, Serialize};

/// Default state directory of brokerd (vault, CA, audit log).
pub const DEFAULT_STATE_DIR: &str = "/var/lib/agent-broker";
/// Default run directory of brokerd (its control socket).
pub const DEFAULT_RUN_DIR: &str = "/run/agent-broker";
/// Default policy directory.
pub const DEFAULT_POLICY_DIR: &str = "/etc/agent-broker/policies";

/// File name of the control socket inside the run directory.
pub const SOCKET_NAME: &str = "control.sock";

/// Longest request line brokerd accepts, in bytes. Longer lines are an error, not a crash.
pub const MAX_REQUEST_LINE: usize = 64 * 1024;

/// A request from a client.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "request", rename_all = "snake_case", deny_unknown_fields)]
pub enum Request {
    /// Daemon state: listeners, tagged cgroups, counters.
    Status,
    /// Tag a cgroup: attach the redirect programs to it (pinned, so they outlive brokerd).
    Attach {
        /// Path relative to the cgroup2 mount, e.g. `agents/demo`.
        cgroup: String,
        /// Create the cgroup directory when it does not exist.
        #[serde(default)]
        create: bool,
        /// The agent name the cgroup runs under (`--as`, e.g. `agents/foo`): policy files,
        /// audit records, the console and `status` use it instead of the cgroup path, and a
        /// cgroup `x` below the tagged one runs as `NAME/x`. None: the name is the path.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        name: Option<String>,
    },
    /// Tag the cgroup of a running process (its cgroup2 path), and, when the process has a
    /// network namespace of its own (a container's), open brokerd's listeners there.
    AttachPid {
        /// The process, as a pid of brokerd's pid namespace (the host's).
        pid: u32,
        /// The agent name its cgroup runs under, as for [`Request::Attach`].
        #[serde(default, skip_serializing_if = "Option::is_none")]
        name: Option<String>,
        /// Refuse unless the process is in this cgroup or below it, checked once brokerd has
        /// pinned the process: `attach --container` names the cgroup it read for the
        /// container's pid, so a pid reused since is not tagged instead.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        within: Option<String>,
    },
    /// Tag the pod of a container that is being created, before its first process runs: what
    /// the OCI hook (`brokerctl oci-hook`, at the runtime's createRuntime stage) asks for a
    /// container whose annotations name an agent. brokerd tags the pod-level cgroup (the
    /// parent of the container's) as a pod source would, and opens its listeners in the
    /// container's network namespace, before the hook returns.
    AttachOci {
        /// The container's init process, as the runtime's state names it (a host pid).
        pid: u32,
        pod: OciPod,
    },
    /// Untag a cgroup: detach and unpin its programs.
    Detach {
        /// Path relative to the cgroup2 mount.
        cgroup: String,
    },
    /// The most recent connections brokerd accepted, newest last.
    Connections {
        /// At most this many records.
        limit: usize,
    },
    /// Store a secret (a new version if it exists). With `rotate`, the secret must exist.
    SecretSet {
        name: String,
        value: SecretInput,
        #[serde(default)]
        rotate: bool,
        /// `value` is a credential spec (JSON, `agent_broker_core::credential::CredentialSpec`:
        /// an OAuth grant, an exec or file source) rather than a static value.
        #[serde(default, skip_serializing_if = "std::ops::Not::not")]
        spec: bool,
    },
    /// Names, versions and dates of the stored secrets (never values).
    SecretList,
    /// Delete a secret.
    SecretRemove { name: String },
    /// A random placeholder of the shape of secret `name` (its prefix, length and alphabet), to
    /// put in an agent's environment where a policy rule injects the secret anyway. Bound to
    /// nothing and stored nowhere; it holds nothing of the secret but the prefix.
    SecretPlaceholder { name: String },
    /// The broker CA certificate (PEM).
    CaCert,
    /// Mint a handle: an opaque token the agent may use in place of the secret.
    HandleMint {
        cgroup: String,
        secret: String,
        host: String,
        ttl_secs: u64,
        /// A token of the secret's shape (its prefix, length and alphabet, with a random body)
        /// instead of `brk_...`; refused when the secret has no usable shape.
        #[serde(default)]
        shaped: bool,
    },
    /// The handles (never their tokens).
    HandleList,
    /// Revoke a handle by id.
    HandleRevoke { id: String },
    /// Load the policy directory now (it also reloads by itself within a second of a change).
    PolicyReload,
    /// The effective policy of a cgroup, after narrowing by its ancestors' files.
    PolicyShow { cgroup: String },
    /// Would this request be allowed, and by which rule and file?
    PolicyExplain {
        cgroup: String,
        method: String,
        url: String,
    },
    /// Audit records matching `filter`, oldest first, each as a [`Response::Event`], then
    /// [`Response::EndOfLog`]. With `follow`, live records keep coming after `EndOfLog` until
    /// the client disconnects.
    Logs {
        #[serde(default)]
        filter: LogFilter,
        #[serde(default)]
        follow: bool,
    },
    /// Check the audit log's hash chain.
    LogsVerify,
    /// Live events only (what the console shows), as [`Response::Event`]s, until the client
    /// disconnects.
    Subscribe,
    /// Requests waiting for an operator's approval (a rule with `approve = "ask"`, or a
    /// destination no rule allows under `on_unknown = "ask"`), oldest first.
    ApprovalList,
    /// Decide a waiting request. brokerd records who decided: `via` (the client, e.g.
    /// `cli`, `console`) and the caller's uid.
    ApprovalDecide {
        id: u64,
        decision: ApprovalDecision,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        via: Option<String>,
    },
    /// brokerd's metrics now, as [`Response::Metrics`] (`brokerctl metrics`).
    Metrics,
}

/// An operator's decision about a request waiting for approval.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "decision", rename_all = "snake_case", deny_unknown_fields)]
pub enum ApprovalDecision {
    /// This request only (for a request an agent filed without waiting, its next matching
    /// request, within 10 minutes).
    AllowOnce,
    /// Requests of this agent with the same method to the same host and port, until
    /// `until_ms` (Unix milliseconds); kept in memory, not across a restart.
    AllowUntil { until_ms: u64 },
    /// Always: brokerd writes a rule (for a destination no rule allows) or a standing approval
    /// (for a rule that asks) into the agent's approvals file in the policy directory. Refused
    /// when the result does not load, e.g. because the parent's policy does not allow it.
    AllowAlways,
    /// Refuse the request, with a reason the agent is told.
    Deny {
        #[serde(default, skip_serializing_if = "Option::is_none")]
        reason: Option<String>,
    },
}

/// A request waiting for an operator's approval, as `approve list`, the console and the
/// webhook show it. Never a secret value.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PendingApproval {
    pub id: u64,
    /// The agent (its name, or cgroup path).
    pub agent: String,
    pub pid: Option<u32>,
    pub comm: Option<String>,
    pub exe: Option<String>,
    pub method: String,
    pub host: String,
    pub port: u16,
    /// The path, without the query.
    pub path: String,
    /// The rule that asked (`approve = "ask"`); none for a destination no rule allows.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rule: Option<String>,
    /// Why it waits, in words.
    pub why: String,
    /// What the agent said it needs it for (a request it filed itself).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub agent_reason: Option<String>,
    /// Whether a request is held open for the decision (false: filed by the agent).
    pub held: bool,
    pub asked_ms: u64,
    /// When it is denied for want of a decision.
    pub expires_ms: u64,
}

/// Which audit records to return.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct LogFilter {
    /// Only records of this agent or below it: its name (`attach --as`) or its cgroup path.
    #[serde(default)]
    pub cgroup: Option<String>,
    /// Only denials (and failures).
    #[serde(default)]
    pub denied_only: bool,
    /// Only records at or after this Unix time in milliseconds.
    #[serde(default)]
    pub since_ms: Option<u64>,
    /// At most this many (the newest), 0 for all.
    #[serde(default)]
    pub limit: usize,
}

/// What an audit record is about.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum EventKind {
    /// An HTTP request that was forwarded (whatever status came back).
    Request,
    /// A request or connection brokerd refused.
    Denial,
    /// A TLS handshake that failed (e.g. the agent rejected the broker CA).
    TlsFailure,
    /// A handle used where it is not valid (wrong cgroup or host, expired, revoked, unknown).
    HandleMisuse,
    /// A cgroup was tagged.
    Attach,
    /// A cgroup was untagged.
    Detach,
    /// The policy was (re)loaded, or a reload failed.
    PolicyReload,
    /// A DNS query from an agent: `host` is the name, `method` the record type, `status` the
    /// DNS response code, `decision` allow or deny.
    Dns,
    /// A credential's value was fetched (an OAuth token, a command's output, a file), or could
    /// not be: `secrets` names it, `host` is its token endpoint, `decision` allow (fetched) or
    /// deny (failed), `reason` what happened. Never a value.
    Credential,
    /// A request waits for an operator's approval (`decision` none), or an operator decided
    /// (`decision` allow or deny, `approval.by` who).
    Approval,
}

/// What was decided about a request, connection, query or operator action.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Decision {
    Allow,
    Deny,
}

/// How far a forwarded request got. Every request that leaves brokerd for an upstream (with
/// whatever credential its rule injects) is recorded as `forwarded` before it is written
/// upstream, and again when it ends, with the same `request_id`. The audit writer commits both
/// as one record (the ending, in the forwarded record's place) when the request ends before
/// its forwarded record is committed (within the writer's commit interval, 50 ms); a
/// `forwarded` record with no later record of its id is a request that was under way when
/// brokerd was killed.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum RequestOutcome {
    /// On its way upstream; how it ends is a later record.
    Forwarded,
    /// The response was passed on to its end.
    Completed,
    /// The agent went away first: it closed its connection (HTTP/1.1), reset its stream
    /// (HTTP/2) or stopped reading, before or while the response came. The upstream may still
    /// have acted on the request.
    Cancelled,
    /// The upstream failed, timed out, cut its response or sent one that could not be passed
    /// on; `reason` says which.
    Failed,
}

/// Which side a failure came from.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Side {
    Agent,
    Upstream,
    Broker,
}

/// One audit record, also the live event. It never holds a secret value: secrets appear by
/// name only, paths without their query.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AuditEvent {
    /// Position in the log, from 1; 0 before it is stored.
    pub seq: u64,
    /// Unix time in milliseconds.
    pub time_ms: u64,
    pub kind: Option<EventKind>,
    /// The agent: the cgroup path, or the name its tag runs under (`attach --as`).
    pub cgroup: Option<String>,
    pub pid: Option<u32>,
    pub comm: Option<String>,
    /// The connecting process's executable (`/proc/PID/exe`), when it could be read.
    pub exe: Option<String>,
    pub original_dst: Option<SocketAddr>,
    pub sni: Option<String>,
    pub method: Option<String>,
    pub host: Option<String>,
    /// Request path without the query string.
    pub path: Option<String>,
    /// HTTP status returned to the agent.
    pub status: Option<u16>,
    /// Request body bytes from the agent, response body bytes to the agent.
    pub bytes_in: u64,
    pub bytes_out: u64,
    pub latency_us: Option<u64>,
    /// Allowed or denied (none for records that decide nothing, such as a drop notice).
    pub decision: Option<Decision>,
    /// The rule that decided (file:line allow[i]).
    pub rule: Option<String>,
    /// Why it was denied or failed.
    pub reason: Option<String>,
    /// Names of the secrets written into the request.
    pub secrets: Vec<String>,
    /// Which side failed, for failures.
    pub side: Option<Side>,
    /// Links the records of one forwarded request: the `forwarded` record written before the
    /// request left brokerd and the record of how it ended carry the same id (unique across
    /// brokerd's runs). None for records that are not about a forwarded request.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub request_id: Option<u64>,
    /// For a forwarded request: how far it got (see [`RequestOutcome`]).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub outcome: Option<RequestOutcome>,
    /// LLM tokens charged to the rule's `tokens_per_day` budget for this request (requests
    /// under such a budget only).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tokens: Option<u64>,
    /// Set when `tokens` is an estimate because the response's `usage` could not be read: why
    /// not, and how the estimate was made.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tokens_estimated: Option<String>,
    /// Set on a record that stands for several like events brokerd refused in a burst (a
    /// flood of connections or DNS queries is audited as its first event, then one such
    /// record per second): how many events it stands for.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub count: Option<u64>,
    /// The real cgroup path (relative to the cgroup2 mount), set only when the agent in
    /// `cgroup` is a name given at attach (`--as`) that differs from it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cgroup_path: Option<String>,
    /// The pod the agent runs in, for agents a pod source tagged (`brokerd --pod-source`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub pod: Option<PodRef>,
    /// For a request that waited for approval, and for approval records: which, and who
    /// decided.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub approval: Option<ApprovalRef>,
}

/// An approval an audit record is about.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ApprovalRef {
    pub id: u64,
    /// Who decided: `cli uid 0`, `console uid 1000`, `webhook`; none while it waits or when it
    /// timed out.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub by: Option<String>,
}

/// A container's pod as the OCI hook reads it from the runtime's annotations.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct OciPod {
    /// The value of `agent-broker.io/agent`.
    pub agent: String,
    /// The Kubernetes namespace; empty for podman pods.
    #[serde(default)]
    pub namespace: String,
    /// The pod's name: Kubernetes' (from the CRI annotations), or for a podman pod the hostname
    /// podman gives it (the pod's name, unless its manifest sets another). A container outside
    /// any pod is a pod of one, named by its id's first 12 characters.
    pub name: String,
    /// Kubernetes: the pod's `metadata.uid`. Empty for podman: brokerd takes the pod id from
    /// the pod's cgroup.
    #[serde(default)]
    pub uid: String,
    /// The container's id.
    pub container: String,
    /// Whether the container belongs to a pod, whose cgroup is the parent of its own.
    pub in_pod: bool,
}

/// A pod as its engine names it.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct PodRef {
    /// The Kubernetes namespace; empty for podman pods.
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub namespace: String,
    pub name: String,
    /// Kubernetes: `metadata.uid`; podman: the pod id.
    pub uid: String,
}

impl fmt::Display for PodRef {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if !self.namespace.is_empty() {
            write!(f, "{}/", self.namespace)?;
        }
        write!(f, "{} (uid {})", self.name, self.uid)
    }
}

impl AuditEvent {
    /// A denial or failure the operator must notice: what `logs --denied` shows and the
    /// console highlights. A failed policy reload is one (it is denied); a lost-records notice
    /// is not.
    pub fn is_denial(&self) -> bool {
        self.decision == Some(Decision::Deny)
            || matches!(
                self.kind,
                Some(EventKind::Denial | EventKind::TlsFailure | EventKind::HandleMisuse)
            )
    }
}

/// What an operator does about an agent's client that failed the TLS handshake with brokerd:
/// shown by `brokerctl doctor`, `brokerctl logs --denied` and the console.
pub const TLS_REFUSAL_FIX: &str = "make the client trust the broker CA (SSL_CERT_FILE, \
     NODE_EXTRA_CA_CERTS, a JVM truststore; clients with bundled roots such as reqwest with \
     webpki-roots or Bun need their own setting, see the README), or pass its host through with \
     a `tcp = true` rule";

/// Failed TLS handshakes counted per (agent, program): the clients that likely do not trust
/// the broker CA. Agents and programs brokerd could not name count as `?`.
pub fn tls_refusals_by_client<'a>(
    events: impl IntoIterator<Item = &'a AuditEvent>,
) -> std::collections::BTreeMap<(String, String), u64> {
    let mut by_client = std::collections::BTreeMap::new();
    for e in events {
        if e.kind != Some(EventKind::TlsFailure) {
            continue;
        }
        let agent = e.cgroup.clone().unwrap_or_else(|| "?".into());
        let comm = e.comm.clone().unwrap_or_else(|| "?".into());
        *by_client.entry((agent, comm)).or_default() += 1;
    }
    by_client
}

/// The one spelling of each variant, the same as on the wire (snake_case), for every output.
macro_rules! wire_names {
    ($ty:ty { $($variant:ident => $name:literal),+ $(,)? }) => {
        impl $ty {
            /// Every variant, in declaration order.
            pub const ALL: &'static [$ty] = &[$(<$ty>::$variant),+];

            /// The name this variant has on the wire, in the audit log and in every output.
            pub const fn as_str(self) -> &'static str {
                match self {
                    $(<$ty>::$variant => $name),+
                }
            }
        }

        impl std::fmt::Display for $ty {
            fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
                f.write_str(self.as_str())
            }
        }
    };
}

wire_names!(EventKind {
    Request => "request",
    Denial => "denial",
    TlsFailure => "tls_failure",
    HandleMisuse => "handle_misuse",
    Attach => "attach",
    Detach => "detach",
    PolicyReload => "policy_reload",
    Dns => "dns",
    Credential => "credential",
    Approval => "approval",
});
wire_names!(Decision { Allow => "allow", Deny => "deny" });
wire_names!(RequestOutcome {
    Forwarded => "forwarded",
    Completed => "completed",
    Cancelled => "cancelled",
    Failed => "failed",
});
wire_names!(Side { Agent => "agent", Upstream => "upstream", Broker => "broker" });
wire_names!(ErrorKind {
    BadRequest => "bad_request",
    Forbidden => "forbidden",
    NotFound => "not_found",
    Internal => "internal",
});

/// The result of checking the audit chain.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct VerifyReport {
    /// Records checked.
    pub records: u64,
    /// None when the chain is intact; else the first record that was edited, removed or
    /// reordered, and what is wrong with it.
    pub first_bad: Option<BadRecord>,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct BadRecord {
    pub seq: u64,
    pub problem: String,
}

/// A secret value on its way into the vault. `Debug` never shows it; it is zeroized on drop.
#[derive(Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(transparent)]
pub struct SecretInput(String);

impl SecretInput {
    pub fn new(value: String) -> Self {
        Self(value)
    }

    /// The value, for the vault.
    pub fn expose(&self) -> &str {
        &self.0
    }
}

impl std::fmt::Debug for SecretInput {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "SecretInput(<redacted, {} bytes>)", self.0.len())
    }
}

impl Drop for SecretInput {
    fn drop(&mut self) {
        zeroize::Zeroize::zeroize(&mut self.0);
    }
}

/// A stored secret, without its value.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SecretInfo {
    pub name: String,
    pub version: u64,
    pub created_unix: u64,
    pub updated_unix: u64,
    /// `static`, `oauth`, `oauth-client`, `exec` or `file`.
    #[serde(default = "static_kind")]
    pub kind: String,
    /// Where a credential that is not static comes from (token endpoint and client, command,
    /// file); no secret material.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub source: Option<String>,
    /// `valid`, `refreshing`, `expired`, `not fetched yet`, `failed: <why>`; none for static.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub state: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub valid_until_unix: Option<u64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last_used_unix: Option<u64>,
}

fn static_kind() -> String {
    "static".into()
}

/// A handle, without its token.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct HandleInfo {
    pub id: String,
    pub cgroup: String,
    pub secret: String,
    pub host: String,
    pub created_unix: u64,
    pub expires_unix: u64,
    pub revoked: bool,
    /// A shaped handle's token shape, written `PREFIX[CLASS]{N}` (e.g. `ghp_[0-9A-Za-z]{36}`);
    /// absent for a `brk_` handle.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub shape: Option<String>,
}

/// brokerd's answer to one [`Request`].
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "response", rename_all = "snake_case", deny_unknown_fields)]
pub enum Response {
    Status(StatusReport),
    Attached {
        cgroup: TaggedCgroup,
        /// True when the cgroup was already tagged and nothing was attached again.
        already: bool,
    },
    /// The answer to [`Request::AttachPid`].
    AttachedPid {
        cgroup: TaggedCgroup,
        /// True when the cgroup was already tagged and nothing was attached again.
        already: bool,
        /// The process's network namespace, when it is not brokerd's own.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        workload: Option<WorkloadStatus>,
    },
    Detached {
        cgroup: String,
    },
    Connections {
        connections: Vec<ConnectionRecord>,
    },
    SecretStored {
        secret: SecretInfo,
    },
    Secrets {
        secrets: Vec<SecretInfo>,
    },
    SecretRemoved {
        name: String,
    },
    CaCert {
        pem: String,
    },
    /// A placeholder of a secret's shape (`shape`, written `PREFIX[CLASS]{N}`).
    SecretPlaceholder {
        name: String,
        shape: String,
        placeholder: String,
    },
    /// A new handle; `token` is shown once, here, and stored only as a hash.
    HandleMinted {
        handle: HandleInfo,
        token: String,
    },
    Handles {
        handles: Vec<HandleInfo>,
    },
    HandleRevoked {
        id: String,
    },
    PolicyReloaded {
        files: usize,
    },
    /// Human-readable policy text (`policy show`).
    PolicyText {
        text: String,
    },
    /// The answer to `PolicyExplain`.
    PolicyExplained {
        allowed: bool,
        text: String,
    },
    /// One audit record or live event.
    Event {
        event: AuditEvent,
    },
    /// The stored records of a `Logs` request are all sent.
    EndOfLog,
    /// The answer to `LogsVerify`.
    Verified {
        report: VerifyReport,
    },
    /// The answer to `ApprovalList`.
    Approvals {
        pending: Vec<PendingApproval>,
    },
    /// The answer to `ApprovalDecide`: what was done.
    ApprovalDecided {
        id: u64,
        outcome: String,
    },
    /// The request failed; `message` says what was wrong and what to do about it.
    Error {
        kind: ErrorKind,
        message: String,
    },
    /// The answer to [`Request::Metrics`]: the exposition in OpenMetrics text, as brokerd's
    /// metrics listener serves it (ends with `# EOF`).
    Metrics {
        text: String,
    },
}

/// Broad class of a failed request.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ErrorKind {
    /// The request was malformed or named something invalid (a bad cgroup path).
    BadRequest,
    /// The caller may not ask this (for example it runs inside a tagged cgroup).
    Forbidden,
    /// The thing named does not exist (an untagged cgroup on detach).
    NotFound,
    /// brokerd failed to do it (the kernel refused an attach).
    Internal,
}

/// Daemon state for `brokerctl status`.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct StatusReport {
    /// brokerd's version.
    pub version: String,
    /// brokerd's process id.
    pub pid: u32,
    /// Addresses brokerd accepts redirected connections on.
    pub listeners: Vec<SocketAddr>,
    /// Absolute path of the cgroup2 mount brokerd uses.
    pub cgroup_root: String,
    /// bpffs directory holding the pinned maps and links.
    pub pin_dir: String,
    /// Tagged cgroups.
    pub cgroups: Vec<TaggedCgroup>,
    /// Kernel-side counters.
    pub counters: Counters,
    /// The policy directory and its load state.
    pub policy: PolicyStatus,
    /// Where agents' DNS is answered (UDP).
    #[serde(default)]
    pub dns_listeners: Vec<SocketAddr>,
    /// The kernel hooks attached to every tagged cgroup.
    #[serde(default)]
    pub hooks: Vec<String>,
    /// The optional BPF LSM layer: `active: ...` or `not loaded: <why>`.
    #[serde(default)]
    pub lsm: String,
    /// brokerd's own hardening, e.g. `not dumpable, no core dumps, memory locked`.
    #[serde(default)]
    pub hardening: String,
    /// Processes in tagged cgroups that lack launcher protections (started without
    /// `brokerctl run`), at most 64.
    #[serde(default)]
    pub unprotected: Vec<ProcessProtections>,
    /// Inet sockets made outside every tagged cgroup and held by a process inside one (no
    /// hook of the tag runs for them), at most 64.
    #[serde(default)]
    pub outside_sockets: Vec<OutsideSocket>,
    /// What the scan for [`Self::outside_sockets`] left out (a limit it stopped at, a network
    /// namespace it could not read), when it left something out.
    #[serde(default)]
    pub outside_sockets_note: Option<String>,
    /// What each agent seen in the last minute holds of its shares of brokerd.
    #[serde(default)]
    pub shares: Vec<AgentShareUse>,
    /// Connections brokerd serves now, all agents together.
    #[serde(default)]
    pub open_connections: u64,
    /// The most connections brokerd serves at once (from its file descriptor limit).
    #[serde(default)]
    pub max_connections: u64,
    /// Workload network namespaces brokerd serves listeners in.
    #[serde(default)]
    pub workloads: Vec<WorkloadStatus>,
    /// Why the audit log cannot be written now (its last commit failed), when it cannot.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub audit_error: Option<String>,
    /// Audit records dropped since brokerd started (the queue overflowed while the disk was
    /// slow, full or read-only).
    #[serde(default)]
    pub audit_dropped: u64,
    /// What brokerd's process and runtimes hold now.
    #[serde(default)]
    pub runtime: RuntimeGauges,
    /// brokerd runs `--unprivileged` (issue 19): no eBPF, no tagged cgroups; its agents are
    /// the sandboxes `brokerctl run --unprivileged` hands it, listed in `workloads`.
    #[serde(default)]
    pub unprivileged: bool,
}

/// What brokerd holds now, sampled when asked: the gauges a soak watches for drift.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RuntimeGauges {
    /// Tasks alive on brokerd's async runtimes (the main one and every proxy thread's).
    pub tasks: u64,
    /// Upstream connections pooled (idle HTTP/1.1 and HTTP/2).
    pub upstream_pool: u64,
    /// Leaf certificates cached for agents' TLS connections.
    pub leaf_cache: u64,
    /// Entries in the table of names brokerd's DNS answered, by agent and address.
    pub answered_names: u64,
    /// Audit records waiting for the writer.
    pub audit_queue: u64,
    /// brokerd's resident memory (VmRSS), in bytes.
    pub rss_bytes: u64,
    /// File descriptors brokerd holds open.
    pub open_fds: u64,
}

/// An inet socket held by a process in a tagged cgroup but made outside every tagged cgroup.
///
/// The kernel runs cgroup hooks for the cgroup a socket was made in, so none of the tag's
/// programs see this one: its connections are not redirected, its packets not filtered, and it
/// can be disconnected and aimed anywhere. Only ending the process (and starting it again
/// inside the cgroup, e.g. with `brokerctl run`) takes it away.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct OutsideSocket {
    /// The cgroup the process is in (a tagged one or one below it).
    pub cgroup: String,
    pub pid: u32,
    pub comm: String,
    /// The descriptor number in the process.
    pub fd: u32,
    /// The kernel's name for the socket's protocol (`TCP`, `TCPv6`, `UDP`, `UDPv6`, `RAW`...).
    pub protocol: String,
    /// The socket's state as sock_diag reports it (`ESTABLISHED`, `LISTEN`, `CLOSE`...), or
    /// `unlisted` for a socket sock_diag does not list (neither bound nor connected yet, or a
    /// kind it does not dump).
    pub state: String,
    /// The socket's own address, when it has one.
    pub local: Option<SocketAddr>,
    /// Its peer, when it is connected.
    pub remote: Option<SocketAddr>,
    /// The cgroup the socket was made in (`/` for the root cgroup, `id N` for one no longer in
    /// the hierarchy); `None` when the kernel could not say (an unlisted socket).
    pub socket_cgroup: Option<String>,
}

/// One agent's use of its shares of brokerd (`[shares]` in the policy).
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AgentShareUse {
    /// The agent's cgroup.
    pub cgroup: String,
    pub connections: u32,
    pub connections_limit: u32,
    /// Connections not yet at HTTP.
    pub handshakes: u32,
    pub handshakes_limit: u32,
    /// HTTP requests in flight.
    pub requests: u32,
    pub requests_limit: u32,
    /// HTTP requests the agent may start a second (a rate: nothing is held).
    #[serde(default)]
    pub requests_per_second_limit: u32,
    /// Connections, requests and DNS queries refused for a share since brokerd started.
    pub refused: u64,
}

/// A process in a tagged cgroup and the launcher protections it lacks.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ProcessProtections {
    /// The cgroup it is in.
    pub cgroup: String,
    pub pid: u32,
    pub comm: String,
    /// What it lacks, most serious first.
    pub missing: Vec<String>,
}

/// The policy as loaded.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PolicyStatus {
    pub dir: String,
    /// Files in the active policy.
    pub files: usize,
    /// When the active policy was loaded (Unix seconds).
    pub loaded_unix: u64,
    /// Why the newest files did not load, when they did not (the previous policy is active).
    pub error: Option<String>,
}

/// One tagged cgroup.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TaggedCgroup {
    /// Path relative to the cgroup2 mount.
    pub path: String,
    /// The agent name it runs under (`attach --as`), when that is not `path`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub name: Option<String>,
    /// cgroup id (inode of the cgroup directory).
    pub id: u64,
    /// Processes in the cgroup and every cgroup below it.
    pub processes: u64,
    /// Number of programs attached through pinned links (5 when fully tagged).
    pub links: u32,
}

/// A workload's network namespace in which brokerd serves listeners of its own (a container's).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct WorkloadStatus {
    /// The network namespace's cookie (`NS_GET_ID` of `/proc/<pid>/ns/net`).
    pub netns_cookie: u64,
    /// The cgroup of the process it was attached by (relative to the cgroup2 mount).
    pub cgroup: String,
    /// The tagged cgroup that covers it.
    pub tag: String,
    /// The process brokerd entered the namespace through (at attach, or at brokerd's start).
    pub pid: u32,
    /// brokerd's TCP listeners inside the namespace.
    pub listeners: Vec<SocketAddr>,
    /// brokerd's UDP DNS listeners inside the namespace.
    pub dns_listeners: Vec<SocketAddr>,
    /// `serving`, or why not.
    pub state: String,
    /// When the listeners were opened (by this brokerd), Unix milliseconds.
    pub opened_ms: u64,
}

/// Kernel-side counters, summed over CPUs.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Counters {
    /// Connects redirected to brokerd.
    pub redirected: u64,
    /// Connects refused in the kernel (origin not recordable, no broker configured).
    pub refused: u64,
    /// Redirected connections whose origin record could not be re-keyed.
    pub rekey_failed: u64,
    /// DNS datagrams and connects sent to brokerd's DNS listener.
    #[serde(default)]
    pub dns_redirected: u64,
    /// UDP sends and connects refused (anything but DNS, QUIC included).
    #[serde(default)]
    pub udp_refused: u64,
    /// Sockets refused at creation (raw, ICMP, MPTCP, SCTP, UDP-Lite...).
    #[serde(default)]
    pub socket_refused: u64,
    /// Binds refused (a non-loopback address or one of brokerd's ports).
    #[serde(default)]
    pub bind_refused: u64,
    /// Packets the egress filter dropped (destination not loopback).
    #[serde(default)]
    pub egress_dropped: u64,
    /// Packets the ingress filter dropped (source not loopback).
    #[serde(default)]
    pub ingress_dropped: u64,
    /// Connects and sends refused for coming from another network namespace.
    #[serde(default)]
    pub netns_refused: u64,
    /// TCP connects refused for coming faster than the kernel's pace of one cgroup's new
    /// connections.
    #[serde(default)]
    pub connect_paced: u64,
}

/// One connection brokerd accepted.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ConnectionRecord {
    /// Unix time of the accept, in milliseconds.
    pub time_ms: u64,
    /// The accepted socket's peer (the agent socket's local address).
    pub peer: SocketAddr,
    /// Who made it; `None` when brokerd could not resolve the origin (then it refused it).
    pub origin: Option<OriginRecord>,
    /// What brokerd did with it.
    pub outcome: Outcome,
}

/// The resolved origin of a redirected connection.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct OriginRecord {
    /// cgroup path relative to the cgroup2 mount.
    pub cgroup: String,
    /// cgroup id.
    pub cgroup_id: u64,
    /// Process id (thread group id) of the connecting process.
    pub pid: u32,
    /// Thread id of the connecting thread.
    pub tid: u32,
    /// `comm` of the connecting thread.
    pub comm: String,
    /// The destination the agent asked for.
    pub original_dst: SocketAddr,
}

/// What brokerd did with a connection.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "outcome", rename_all = "snake_case", deny_unknown_fields)]
pub enum Outcome {
    /// Handed to the proxy: TLS or HTTP is terminated and each request is decided on its own.
    Brokered,
    /// Closed without relaying.
    Refused { reason: String },
}

/// Encodes a message as one protocol line (JSON plus `\n`).
pub fn encode_line<T: Serialize>(msg: &T) -> Result<Vec<u8>, serde_json::Error> {
    let mut line = serde_json::to_vec(msg)?;
    line.push(b'\n');
    Ok(line)
}

/// Decodes one protocol line (with or without its trailing newline).
pub fn decode_line<'a, T: Deserialize<'a>>(line: &'a [u8]) -> Result<T, serde_json::Error> {
    let line = line.strip_suffix(b"\n").unwrap_or(line);
    serde_json::from_slice(line)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The one spelling of each name is the wire's: serde and `as_str` never disagree.
    fn same_as_wire<T: Serialize + std::fmt::Display>(all: &[T]) {
        for value in all {
            let wire = serde_json::to_string(value).expect("serializes");
            assert_eq!(wire, format!("\"{value}\""));
        }
    }

    #[test]
    fn names_are_spelled_as_on_the_wire() {
        same_as_wire(EventKind::ALL);
        same_as_wire(Decision::ALL);
        same_as_wire(Side::ALL);
        same_as_wire(ErrorKind::ALL);
        same_as_wire(RequestOutcome::ALL);
        assert_eq!(
            EventKind::ALL.len(),
            10,
            "a new kind needs its name in wire_names!"
        );
    }

    #[test]
    fn records_written_before_outcomes_existed_still_read_and_keep_their_bytes() {
        // A request record as brokerd wrote it before request ids, outcomes and token charges.
        let old = r#"{"seq":7,"time_ms":1,"kind":"request","cgroup":"agents/a","pid":1,"comm":"c","exe":null,"original_dst":"127.0.0.1:443","sni":null,"method":"GET","host":"h","path":"/","status":200,"bytes_in":0,"bytes_out":2,"latency_us":5,"decision":"allow","rule":"r","reason":null,"secrets":[],"side":null}"#;
        let event: AuditEvent = serde_json::from_str(old).expect("an old record reads");
        assert_eq!(event.request_id, None);
        assert_eq!(event.outcome, None);
        assert_eq!(event.tokens, None);
        assert_eq!(event.cgroup_path, None);
        // Unset, the new fields are not written: such a record encodes as before.
        assert_eq!(serde_json::to_string(&event).expect("encodes"), old);
        let forwarded = AuditEvent {
            request_id: Some(3),
            outcome: Some(RequestOutcome::Forwarded),
            ..event
        };
        let json = serde_json::to_string(&forwarded).expect("encodes");
        assert!(
            json.ends_with(r#""request_id":3,"outcome":"forwarded"}"#),
            "{json}"
        );
        assert_eq!(
            serde_json::from_str::<AuditEvent>(&json).expect("reads"),
            forwarded
        );
    }

    #[test]
    fn a_named_agents_record_carries_its_cgroup_path_and_reads_back() {
        let event = AuditEvent {
            seq: 1,
            cgroup: Some("agents/foo/tool".into()),
            cgroup_path: Some("libpod_parent/libpod-0a1b/tool".into()),
            ..AuditEvent::default()
        };
        let json = serde_json::to_string(&event).expect("encodes");
        assert!(
            json.ends_with(r#""cgroup_path":"libpod_parent/libpod-0a1b/tool"}"#),
            "{json}"
        );
        assert_eq!(serde_json::from_str::<AuditEvent>(&json).ok(), Some(event));
        let tagged: TaggedCgroup =
            serde_json::from_str(r#"{"path":"a","id":1,"processes":0,"links":16}"#)
                .expect("a status from before names reads");
        assert_eq!(tagged.name, None);
    }

    #[test]
    fn denials_are_denied_decisions_and_failure_kinds() {
        let with = |kind, decision| AuditEvent {
            kind,
            decision,
            ..AuditEvent::default()
        };
        assert!(with(Some(EventKind::Request), Some(Decision::Deny)).is_denial());
        assert!(with(Some(EventKind::TlsFailure), None).is_denial());
        assert!(with(Some(EventKind::HandleMisuse), Some(Decision::Allow)).is_denial());
        assert!(with(Some(EventKind::Denial), None).is_denial());
        assert!(!with(Some(EventKind::Request), Some(Decision::Allow)).is_denial());
        assert!(!with(Some(EventKind::PolicyReload), Some(Decision::Allow)).is_denial());
        assert!(!with(None, None).is_denial());
    }

    #[test]
    fn tls_refusals_are_counted_per_agent_and_program() {
        let event = |kind, cgroup: Option<&str>, comm: Option<&str>| AuditEvent {
            kind: Some(kind),
            cgroup: cgroup.map(Into::into),
            comm: comm.map(Into::into),
            ..AuditEvent::default()
        };
        let events = [
            event(EventKind::TlsFailure, Some("agents/a"), Some("bun")),
            event(EventKind::Denial, Some("agents/a"), Some("bun")),
            event(EventKind::TlsFailure, Some("agents/a"), Some("bun")),
            event(EventKind::TlsFailure, Some("agents/b"), None),
        ];
        let got: Vec<_> = tls_refusals_by_client(&events).into_iter().collect();
        assert_eq!(
            got,
            [
                (("agents/a".into(), "bun".into()), 2),
                (("agents/b".into(), "?".into()), 1)
            ]
        );
    }

    #[test]
    fn request_round_trips_as_one_line() {
        let req = Request::Attach {
            cgroup: "agents/demo".into(),
            create: true,
            name: None,
        };
        let line = encode_line(&req).expect("encode");
        assert_eq!(line.iter().filter(|b| **b == b'\n').count(), 1);
        assert_eq!(decode_line::<Request>(&line).expect("decode"), req);
        // Without a name the line is what it was before names existed.
        assert!(!String::from_utf8_lossy(&line).contains("name"));
        let named = Request::Attach {
            cgroup: "libpod_parent/libpod-0a1b".into(),
            create: false,
            name: Some("agents/foo".into()),
        };
        let line = encode_line(&named).expect("encode");
        assert_eq!(decode_line::<Request>(&line).expect("decode"), named);
    }

    #[test]
    fn unknown_fields_and_requests_are_rejected() {
        assert!(decode_line::<Request>(br#"{"request":"detach","cgroup":"a","extra":1}"#).is_err());
        assert!(decode_line::<Request>(br#"{"request":"format_disk"}"#).is_err());
        assert!(decode_line::<Request>(b"not json").is_err());
    }

    #[test]
    fn secret_input_is_redacted_in_debug() {
        let value = "do-not-print-me";
        let req = Request::SecretSet {
            name: "K".into(),
            value: SecretInput::new(value.into()),
            rotate: false,
            spec: true,
        };
        let shown = format!("{req:?}");
        assert!(!shown.contains(value), "{shown}");
        assert!(shown.contains("redacted"));
    }

    #[test]
    fn shaped_is_optional_and_brk_handles_show_no_shape() {
        let req: Request = decode_line(
            br#"{"request":"handle_mint","cgroup":"a","secret":"K","host":"h.test","ttl_secs":60}"#,
        )
        .expect("decode");
        assert!(
            matches!(req, Request::HandleMint { shaped: false, .. }),
            "{req:?}"
        );
        let info = HandleInfo {
            id: "h_0123abcd".into(),
            cgroup: "a".into(),
            secret: "K".into(),
            host: "h.test".into(),
            created_unix: 1,
            expires_unix: 2,
            revoked: false,
            shape: None,
        };
        let json = serde_json::to_string(&info).expect("encode");
        assert!(!json.contains("shape"), "{json}");
        assert_eq!(serde_json::from_str::<HandleInfo>(&json).ok(), Some(info));
    }

    #[test]
    fn attach_by_pid_is_its_own_request_and_old_attaches_still_parse() {
        let req: Request = decode_line(br#"{"request":"attach_pid","pid":4242}"#).expect("decode");
        assert_eq!(
            req,
            Request::AttachPid {
                pid: 4242,
                name: None,
                within: None
            }
        );
        assert!(decode_line::<Request>(br#"{"request":"attach","cgroup":"a","pid":1}"#).is_err());
        let reply = Response::AttachedPid {
            cgroup: TaggedCgroup {
                path: "a".into(),
                id: 1,
                processes: 1,
                links: 16,
                name: None,
            },
            already: false,
            workload: None,
        };
        let line = encode_line(&reply).expect("encode");
        assert!(!String::from_utf8_lossy(&line).contains("workload"));
        assert_eq!(decode_line::<Response>(&line).expect("decode"), reply);
    }

    #[test]
    fn create_defaults_to_false() {
        let req: Request = decode_line(br#"{"request":"attach","cgroup":"a"}"#).expect("decode");
        assert_eq!(
            req,
            Request::Attach {
                cgroup: "a".into(),
                create: false,
                name: None,
            }
        );
    }
}
