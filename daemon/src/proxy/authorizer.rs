//! The seam between HTTP mechanics and decisions: what the proxy asks ([`Authorizer`]) and
//! what it gets back. The proxy never decides; an authorizer never touches a socket.

use std::time::Duration;

use http::{StatusCode, request::Parts};
use zeroize::Zeroizing;

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
    /// The secret values written into the request, to scrub from the response.
    pub needles: Vec<Zeroizing<Vec<u8>>>,
    /// Keep up to this many bytes of the response body for [`Grant::on_complete`] (token
    /// budgets read the JSON `usage` of LLM APIs); 0 keeps none.
    pub capture_body: usize,
    /// Called once when the exchange is over (response body finished or dropped).
    pub on_complete: Option<OnComplete>,
}

/// A callback run once when an exchange is over.
pub type OnComplete = Box<dyn FnOnce(&Completion) + Send>;

/// What is known when a brokered exchange is over.
#[derive(Debug, Default)]
pub struct Completion {
    /// Request body bytes the agent sent.
    pub bytes_in: u64,
    /// Response body bytes sent to the agent.
    pub bytes_out: u64,
    /// The start of the response body, up to [`Grant::capture_body`] bytes.
    pub body: Vec<u8>,
}

/// Why a request was refused.
#[derive(Debug)]
pub struct Denial {
    pub status: StatusCode,
    pub reason: String,
    pub rule: Option<String>,
    /// For 429: when to try again.
    pub retry_after: Option<Duration>,
    /// A handle was misused (unknown, expired, revoked, wrong cgroup or host).
    pub handle_misuse: bool,
}

impl Denial {
    pub fn forbidden(reason: impl Into<String>) -> Self {
        Self {
            status: StatusCode::FORBIDDEN,
            reason: reason.into(),
            rule: None,
            retry_after: None,
            handle_misuse: false,
        }
    }
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
    },
    /// Close it, for this reason.
    #[expect(
        dead_code,
        reason = "the proxy acts only on Splice before the first bytes; a refused connection is \
                  still intercepted and each of its requests denied with the policy's reason"
    )]
    Refuse(String),
}

/// Decides requests and rewrites them (injection, handle swaps).
pub trait Authorizer: Send + Sync + 'static {
    /// Decides a connection by its destination and, for TLS, the SNI (None before the
    /// ClientHello is seen). Only `Splice` is final before the first bytes are read.
    fn connection(&self, origin: &ConnectionOrigin, sni: Option<&str>) -> ConnectionVerdict;

    /// Authorizes one request; on success the parts carry the injected credentials.
    fn authorize(&self, facts: &RequestFacts<'_>, parts: &mut Parts) -> Result<Grant, Denial>;
}
