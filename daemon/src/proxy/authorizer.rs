//! The seam between HTTP mechanics and decisions: what the proxy asks ([`Authorizer`]) and
//! what it gets back. The proxy never decides; an authorizer never touches a socket.

use std::{future::Future, pin::Pin, sync::Arc, time::Duration};

use agent_broker_core::{handle::HandleDenial, policy::UsageReading};
use agent_broker_protocol::EventKind;
use http::{StatusCode, request::Parts};
use zeroize::Zeroizing;

use super::{http::Refusal, scrub::Needles};
use crate::capture::ConnectionOrigin;

/// Facts about one request that authorization depends on.
#[derive(Debug)]
pub struct RequestFacts<'a> {
    pub origin: &'a ConnectionOrigin,
    /// The host the request is for (SNI, Host and :authority agree on it), lowercase, no port.
    pub host: &'a str,
    /// The original destination port.
    pub port: u16,
    /// Whether the agent spoke TLS to us (and we will to upstream).
    pub tls: bool,
}

/// What authorization granted: the request parts are already rewritten.
#[derive(Default)]
pub struct Grant {
    /// Which rule allowed it (file and index), for logs and audit.
    pub rule: String,
    /// Names of the secrets written into the request (never values).
    pub secrets: Vec<String>,
    /// The secret values written into the request (injection, handle swaps), to scrub from the
    /// response.
    pub needles: Vec<Zeroizing<Vec<u8>>>,
    /// Every secret value the agent's policy can inject, prebuilt (the broker caches one set per
    /// policy and vault generation): every response to the agent is scrubbed of these as well,
    /// on rules that inject nothing too, so a value that one request had an upstream store is
    /// scrubbed when a later request reads it back.
    pub scrub: Needles,
    /// Charges the bytes of an upgraded (WebSocket) connection to the rule's budgets as they
    /// pass; `Err` (why) once a budget is used up, and the proxy cuts the connection. Bytes
    /// charged here are not charged again by [`Grant::on_complete`].
    pub meter: Option<Meter>,
    /// Read the LLM `usage` the response reports as its body streams, for
    /// [`Completion::usage`] (token budgets). The upstream is then asked for an uncompressed
    /// response.
    pub meter_usage: bool,
    /// Called once when a forwarded exchange is over: the response body finished, was cut or
    /// dropped, the agent went away before the response came, or the upstream failed. What it
    /// returns is recorded with the exchange.
    pub on_complete: Option<OnComplete>,
    /// How long the response may pause between frames, overriding the proxy's default.
    pub idle_timeout: Option<Duration>,
    /// The name the request must be proven to reach: the request is forwarded only once
    /// [`NameCheck`] proves the address dialed is the name's. Set when no certificate will prove
    /// the name (plain HTTP by `Host`), and when a credential was written into the request (a
    /// certificate valid for the name may also be served at another address).
    pub bind_name: Option<NameBinding>,
    /// The rule's rate limits and budgets, checked (and the exchange arranged to be charged)
    /// only once everything else allows the request, the name proof included, so a request
    /// refused for another reason uses none of them up. `Err`: the 429 to answer.
    pub admit: Option<Admit>,
    /// Rewrites the request body as it streams upstream (SigV4's chunk signatures of an S3
    /// streaming upload, signed again).
    pub body_transform: Option<Box<dyn BodyTransform>>,
    /// Rewrites a successful response's body, read whole (bounded): an OAuth token endpoint's
    /// answer, whose real tokens brokerd keeps and replaces with placeholders. Blocking (it
    /// writes the vault): the proxy runs it off its threads.
    pub capture: Option<Capture>,
}

/// See [`Grant::capture`].
pub type Capture = Box<dyn FnOnce(bytes::Bytes) -> Result<bytes::Bytes, String> + Send>;

/// Longest response body [`Grant::capture`] reads.
pub const MAX_CAPTURED_BODY: usize = 64 * 1024;

/// A request body the proxy read whole before authorization (in the request's extensions): a
/// SigV4-signed request that declares no payload hash is signed over its body, which the
/// broker must hash, and whose `Action` a rule may restrict.
#[derive(Clone, Debug)]
pub struct ReadBody(pub bytes::Bytes);

/// Longest body read whole for [`ReadBody`]; a longer one is refused (413).
pub const MAX_READ_BODY: usize = 1024 * 1024;

/// Whether the proxy reads the request's body before authorization (see [`ReadBody`]).
pub fn reads_body_first(parts: &Parts) -> bool {
    parts
        .headers
        .get(http::header::AUTHORIZATION)
        .is_some_and(|a| a.as_bytes().starts_with(b"AWS4-HMAC-SHA256"))
        && !parts.headers.contains_key("x-amz-content-sha256")
}

/// A rewrite of a request body as it streams (see [`Grant::body_transform`]): `feed` takes each
/// piece the agent sent and appends what goes upstream; `finish` checks the body ended well.
/// An error ends the upstream body early, so the upstream sees a truncated request and fails it.
pub trait BodyTransform: Send {
    fn feed(&mut self, input: &[u8], out: &mut Vec<u8>) -> Result<(), String>;
    fn finish(&mut self) -> Result<(), String>;
}

/// See [`Grant::admit`].
pub type Admit = Box<dyn FnOnce(&mut Grant) -> Result<(), Denial> + Send>;

/// A name the address an agent dialed must be proven to belong to, and why.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct NameBinding {
    pub name: String,
    pub why: BindReason,
}

/// Why an address must be proven to be a name's before brokerd sends anything there.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum BindReason {
    /// Nothing but the agent's word ties the name to the address: a tcp passthrough matched by
    /// SNI, a plain HTTP request matched by `Host` (issue 12.2).
    MatchedByName,
    /// brokerd writes a credential into the request. The upstream's certificate proves the
    /// name, but a certificate valid for the name (a wildcard, a shared one) may be served at
    /// other addresses too, and the credential must not go there (issue 13.18). A rule lifts
    /// this with `any_address = true` on every level.
    Credential,
}

impl NameBinding {
    pub fn matched_by_name(name: &str) -> Self {
        Self {
            name: name.to_string(),
            why: BindReason::MatchedByName,
        }
    }

    pub fn credential(name: &str) -> Self {
        Self {
            name: name.to_string(),
            why: BindReason::Credential,
        }
    }
}

/// A callback run once when an exchange is over; it says what it charged.
pub type OnComplete = Box<dyn FnOnce(&Completion) -> Charge + Send>;

/// Charges bytes passing through an upgraded connection; see [`Grant::meter`].
pub type Meter = Arc<dyn Fn(u64) -> Result<(), String> + Send + Sync>;

/// What is known when a brokered exchange is over.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Completion {
    /// Request body bytes sent upstream.
    pub bytes_in: u64,
    /// Response body bytes sent to the agent.
    pub bytes_out: u64,
    /// What the response reported of its LLM usage, when [`Grant::meter_usage`] asked; an
    /// exchange that ended before a response body is unreadable.
    pub usage: Option<UsageReading>,
}

/// What [`Grant::on_complete`] charged to the rule's budgets, for the audit record.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Charge {
    /// LLM tokens charged to a `tokens_per_day` budget.
    pub tokens: Option<u64>,
    /// Set when `tokens` is an estimate: why the usage was not read, and how it was estimated.
    pub estimated: Option<String>,
}

/// A refused request: the status and reason the agent gets, and the rule for the record.
#[derive(Debug)]
pub struct Denial {
    pub status: StatusCode,
    pub reason: DenialReason,
    pub rule: Option<String>,
    /// For 429: when to try again.
    pub retry_after: Option<Duration>,
}

impl Denial {
    /// A 403 for `reason`, naming no rule.
    pub fn forbidden(reason: DenialReason) -> Self {
        Self {
            status: StatusCode::FORBIDDEN,
            reason,
            rule: None,
            retry_after: None,
        }
    }

    /// What the metrics count it as (`agent_broker_denials_total{reason}`).
    pub fn metric_kind(&self) -> crate::metrics::DenialKind {
        use crate::metrics::DenialKind;
        match &self.reason {
            DenialReason::Request(_) => DenialKind::Request,
            DenialReason::Policy(_) => DenialKind::Policy,
            DenialReason::Rule(_) => DenialKind::Rule,
            DenialReason::Handle(_) => DenialKind::Handle,
            DenialReason::Limit(reason) => DenialKind::of_limit(reason),
        }
    }

    /// What the audit log calls it: a handle's misuse is recorded as such.
    pub fn event_kind(&self) -> EventKind {
        match self.reason {
            DenialReason::Handle(_) => EventKind::HandleMisuse,
            _ => EventKind::Denial,
        }
    }
}

impl From<Refusal> for DenialReason {
    fn from(refusal: Refusal) -> Self {
        Self::Request(Box::new(refusal))
    }
}

impl From<HandleDenial> for DenialReason {
    fn from(misuse: HandleDenial) -> Self {
        Self::Handle(Box::new(misuse))
    }
}

/// Why a request was refused, by who refused it. Each says what is wrong in words an agent
/// can act on, and never holds a secret value.
#[derive(Debug, thiserror::Error)]
pub enum DenialReason {
    /// The request's own form: its hosts disagree, or it would tunnel past the broker.
    #[error(transparent)]
    Request(Box<Refusal>),
    /// The policy: no rule allows this request (the policy's words).
    #[error("{0}")]
    Policy(String),
    /// A rule allows the destination but cannot be carried out for this request (secrets
    /// over plain HTTP, a value that is not a valid header).
    #[error("{0}")]
    Rule(String),
    /// A handle the request carries (`brk_...` or shaped) may not be used here.
    #[error(transparent)]
    Handle(Box<HandleDenial>),
    /// A rate limit or budget of the rule is used up.
    #[error("{0}")]
    Limit(String),
}

/// What to do with a connection before any request is read.
pub enum ConnectionVerdict {
    /// Terminate TLS (or read plain HTTP) and decide each request.
    Intercept,
    /// Splice the bytes to the original destination unread (a `tcp = true` rule): no
    /// interception, no injection. `on_done` gets the bytes spliced both ways.
    Splice {
        rule: String,
        on_done: Option<Box<dyn FnOnce(u64) + Send>>,
        /// The name the rule matched by, when nothing but the agent's word (its SNI) ties it
        /// to the address dialed: the proxy splices only once [`NameCheck`] proves it.
        bind_name: Option<String>,
    },
    /// Close it, for this reason.
    #[expect(
        dead_code,
        reason = "the proxy acts only on Splice before the first bytes; a refused connection is \
                  still intercepted and each of its requests denied with the policy's reason"
    )]
    Refuse(String),
}

/// Proves that the address an agent dialed belongs to a name, where no certificate does (tcp
/// passthrough matched by SNI, plain HTTP matched by `Host`), or where a certificate is not
/// enough (a credential goes out): a name reaches only its own addresses (ARCHITECTURE
/// invariant 2).
pub trait NameCheck: Send + Sync + 'static {
    /// `Ok` when `origin.original_dst` is an address of `name`; otherwise why not, naming both
    /// (`why` says what the refusal should explain).
    fn check<'a>(
        &'a self,
        origin: &'a ConnectionOrigin,
        name: &'a str,
        why: BindReason,
    ) -> Pin<Box<dyn Future<Output = Result<(), String>> + Send + 'a>>;
}

/// What [`Authorizer::prepare`] has the proxy await.
pub type Prepared =
    Pin<Box<dyn Future<Output = Result<Option<Approval>, Denial>> + Send + 'static>>;

/// An operator approved a request that waited (see [`Authorizer::prepare`]): which approval,
/// and who gave it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Approval {
    pub id: u64,
    pub by: String,
}

impl Approval {
    /// Stands for an approval still to come, to ask read-only what an approved request would
    /// be granted.
    pub fn probe() -> Self {
        Self {
            id: 0,
            by: String::new(),
        }
    }
}

/// Decides requests and rewrites them (injection, handle swaps).
pub trait Authorizer: Send + Sync + 'static {
    /// Decides a connection by its destination and, for TLS, the SNI (None before the
    /// ClientHello is seen). Only `Splice` is final before the first bytes are read.
    fn connection(&self, origin: &ConnectionOrigin, sni: Option<&str>) -> ConnectionVerdict;

    /// Authorizes one request; on success the parts carry the injected credentials.
    fn authorize(&self, facts: &RequestFacts<'_>, parts: &mut Parts) -> Result<Grant, Denial>;

    /// Work to await before [`Authorizer::authorize`]: fetching the values of credentials the
    /// request will need that have none yet, or whose value is about to expire (an OAuth
    /// token on first use), and holding a request that waits for an operator's approval.
    /// `None`: nothing to wait for. The future's `Ok(Some)` is put in the request's
    /// extensions for `authorize`; `Err` refuses the request.
    fn prepare(&self, _facts: &RequestFacts<'_>, _parts: &Parts) -> Option<Prepared> {
        None
    }

    /// The upstream answered 401 to a request `grant` authorized: credentials it carried may
    /// be stale (an access token revoked before its time).
    fn rejected(&self, _grant: &Grant) {}

    /// Whether the request's body must be read whole before [`Authorizer::authorize`] (into
    /// [`ReadBody`]): a form the authorizer rewrites (placeholders swapped at an OAuth token
    /// endpoint).
    fn reads_body(&self, _facts: &RequestFacts<'_>, _parts: &Parts) -> bool {
        false
    }
}
