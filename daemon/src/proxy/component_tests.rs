//! Component tests of the proxy, without root or BPF: [`Proxy::serve`] is driven over loopback
//! TCP with a made-up [`ConnectionOrigin`], a test [`Authorizer`] and a test [`EventSink`],
//! against an in-process HTTPS upstream with a CA of its own, by an in-process rustls/hyper
//! agent that trusts the broker CA.
//!
//! Secrets are random per test and never printed: assertions compare bytes, and failure
//! messages show lengths and SHA-256 digests only.
//!
//! The crate paths this suite depends on are all imported here, so a move of the proxy or its
//! neighbours means re-pointing these lines only.

use agent_broker_protocol::{AuditEvent, EventKind, Side};

use agent_broker_core::cgroup::{CgroupId, CgroupPath};

use crate::{
    audit::EventSink,
    capture::{ConnectionOrigin, ListenerOwner},
    proxy::{
        Authorizer, BindReason, Charge, Completion, ConnectionVerdict, Deadlines, Denial, Grant,
        LocalService, NameBinding, NameCheck, Proxy, RequestFacts,
        scrub::PLACEHOLDER,
        tls::{BrokerCa, LeafMinter},
        upstream::{ListenerCheck, Upstream},
    },
};

mod harness;

mod aborts;
mod connections;
mod denials;
mod encodings;
mod hosts;
mod injection;
mod leaks;
mod local;
mod protocol;
mod scrubbing;
mod shares;
mod streams;
mod upgrades;

/// The agent cgroup of the harness's first agent.
fn harness_agent_cgroup() -> &'static str {
    harness::AGENT_CGROUP
}
