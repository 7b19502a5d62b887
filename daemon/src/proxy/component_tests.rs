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
//!
//! With the `fuzzing` feature the harness is built outside tests too, for the `proxy` fuzz
//! target's rig (`fuzzing.rs`); the tests themselves are not.

// Some of these serve only the tests.
#![cfg_attr(not(test), allow(unused_imports))]

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

// Built for the `proxy` fuzz target too (the `fuzzing` feature), which uses a part of it.
#[cfg_attr(not(test), allow(dead_code, unused_imports))]
mod harness;

/// The `proxy` fuzz target's rig, on this harness.
#[cfg(feature = "fuzzing")]
pub(crate) mod fuzzing;

#[cfg(test)]
mod aborts;
#[cfg(test)]
mod connections;
#[cfg(test)]
mod denials;
#[cfg(test)]
mod encodings;
#[cfg(test)]
mod hosts;
#[cfg(test)]
mod injection;
#[cfg(test)]
mod leaks;
#[cfg(test)]
mod local;
#[cfg(test)]
mod protocol;
#[cfg(test)]
mod scrubbing;
#[cfg(test)]
mod shares;
#[cfg(test)]
mod streams;
#[cfg(test)]
mod upgrades;

/// The agent cgroup of the harness's first agent.
#[cfg(test)]
fn harness_agent_cgroup() -> &'static str {
    harness::AGENT_CGROUP
}
