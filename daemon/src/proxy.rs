//! The broker's HTTP(S) front: what happens to a captured connection once its origin is known.
//!
//! A connection is accepted ([`accept`]), its first bytes sniffed ([`sniff`]), and TLS
//! terminated with a leaf minted for its SNI ([`serve`], [`tls`]); plain HTTP goes down the same
//! path without TLS, and a tcp rule splices the bytes unread ([`splice`]). Each request
//! ([`exchange`]) is checked ([`http`]), authorized through the [`Authorizer`] seam (policy,
//! injection, handles: [`crate::broker`]), and forwarded to the original destination over
//! verified TLS ([`upstream`]); the response streams back ([`body`]), decoded when it came
//! compressed ([`decode`]) and scrubbed of every secret value the agent's policy can inject
//! ([`scrub`]), and every outcome is recorded ([`record`]) into an [`EventSink`]. Denials are
//! JSON ([`reply`]). An upgraded (WebSocket) connection is relayed frame by frame, the
//! upstream's frames scrubbed, its bytes counted and charged ([`tunnel`]). A reserved name brokerd answers itself is served by a [`LocalService`]
//! ([`local`]), never upstream.
//!
//! This module does HTTP mechanics only; it never decides what is allowed.

pub mod accept;
mod authorizer;
mod body;
// Also the `proxy` fuzz target's rig (`crate::fuzzing::proxy`), which reuses the harness.
#[cfg(any(test, feature = "fuzzing"))]
mod component_tests;
mod decode;
mod exchange;
mod http;
pub mod local;
mod record;
mod reply;
mod scrub;
mod serve;
mod sniff;
pub mod spin;
mod splice;
pub mod tls;
mod tunnel;
pub mod upstream;

use std::{sync::Arc, time::Duration};

pub use authorizer::{
    Approval, Authorizer, BindReason, BodyTransform, Capture, Charge, Completion,
    ConnectionVerdict, Denial, DenialReason, Grant, MAX_CAPTURED_BODY, MAX_READ_BODY, Meter,
    NameBinding, NameCheck, Prepared, ReadBody, RequestFacts, reads_body_first,
};
pub use local::{LocalAnswer, LocalService};
pub use scrub::{Needles, NeedlesError};
/// For the fuzz targets (`crate::fuzzing`) only.
#[cfg(feature = "fuzzing")]
pub use {
    body::BodyError,
    decode::{Capped, Coding, Limits as DecodeLimits},
    scrub::PLACEHOLDER,
    sniff::{Peeked, Sniffed, client_hello_sni, sniff},
};

/// The `proxy` fuzz target's rig (`crate::fuzzing::proxy`).
#[cfg(feature = "fuzzing")]
pub(crate) use component_tests::fuzzing as fuzz_rig;

use crate::audit::EventSink;
use tls::LeafMinter;
use upstream::Upstream;

/// Deadline for the first bytes of a connection and for the TLS handshake.
const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);

/// How long the proxy waits on an upstream. Streams have no total deadline: an LLM's reply
/// may take minutes, and a reasoning model pauses between tokens.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Deadlines {
    /// From sending the request to the response head (status and headers).
    pub response_head: Duration,
    /// Between two frames of a response body, and before the first.
    pub body_idle: Duration,
    /// For the agent's request head: the first request of a connection must arrive this long
    /// after the connection reached HTTP, and an HTTP/1.1 request head within this long of the
    /// connection becoming ready for it (so a keep-alive connection waits this long for its
    /// next request). A half-sent request is never held longer.
    pub request_head: Duration,
    /// How long a connection with no request in flight stays open (HTTP/2; HTTP/1.1 is bound
    /// by `request_head` first).
    pub connection_idle: Duration,
}

impl Default for Deadlines {
    fn default() -> Self {
        Self {
            response_head: Duration::from_secs(10 * 60),
            body_idle: Duration::from_secs(10 * 60),
            request_head: Duration::from_secs(30),
            connection_idle: Duration::from_secs(120),
        }
    }
}

/// Everything the proxy needs, shared by all connections.
pub struct Proxy {
    pub minter: LeafMinter,
    pub upstream: Upstream,
    pub authorizer: Arc<dyn Authorizer>,
    pub events: Arc<dyn EventSink>,
    /// Proves name-matched destinations that no certificate proves.
    pub names: Arc<dyn NameCheck>,
    pub deadlines: Deadlines,
    /// Each agent's shares of brokerd: connections, handshakes, requests in flight.
    pub shares: Arc<crate::shares::ShareBook>,
    /// The name brokerd serves itself (`agent-broker.internal`), if any ([`local`]).
    pub local: Option<Arc<dyn LocalService>>,
}
