//! A connection before any request: splice it (a tcp rule), intercept it, or refuse it.

use std::time::{Instant, SystemTime};

use agent_broker_core::policy::{ConnectionDecision, Policy};

use super::PolicyAuthorizer;
use crate::{capture::ConnectionOrigin, proxy::ConnectionVerdict};

/// Decides a connection by its destination and, for TLS, its SNI; with no SNI, by the name
/// brokerd's DNS gave the agent for the address it dialed.
pub(super) fn decide(
    broker: &PolicyAuthorizer,
    policy: &Policy,
    origin: &ConnectionOrigin,
    sni: Option<&str>,
) -> ConnectionVerdict {
    let answered = match (sni, &broker.answered) {
        (None, Some(names)) => names.lookup(&origin.cgroup, origin.original_dst.ip()),
        _ => None,
    };
    let name = sni.or(answered.as_deref());
    let now = SystemTime::now();
    match policy.decide_connection(&origin.cgroup, origin.original_dst, name, now) {
        ConnectionDecision::Tcp { rule, limit_keys } => {
            // Matched by the SNI alone (not by the address, not by a name brokerd's DNS gave
            // this agent for it): the address must be proven to be the name's before splicing.
            let by_address = matches!(
                policy.decide_connection(&origin.cgroup, origin.original_dst, None, now),
                ConnectionDecision::Tcp { rule: r, .. } if r == rule
            );
            let bind_name = match (sni, by_address) {
                (Some(sni), false) => Some(sni.to_string()),
                _ => None,
            };
            if let Err(limited) = broker.limiter.check(&limit_keys, Instant::now()) {
                return ConnectionVerdict::Refuse(limited.reason);
            }
            let limiter = broker.limiter.clone();
            ConnectionVerdict::Splice {
                rule: rule.to_string(),
                on_done: Some(Box::new(move |bytes| {
                    limiter.record(&limit_keys, bytes, 0, Instant::now());
                })),
                bind_name,
            }
        }
        ConnectionDecision::Http => ConnectionVerdict::Intercept,
        ConnectionDecision::Deny { reason, .. } => ConnectionVerdict::Refuse(reason),
    }
}
