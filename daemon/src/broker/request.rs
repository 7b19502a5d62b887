//! The first step of a request: the policy's decision, and the plain-HTTP rule.

use std::time::SystemTime;

use agent_broker_core::{
    inject::Injection,
    policy::{LimitKey, Policy, RequestDecision, RequestInfo},
};
use http::{StatusCode, request::Parts};

use crate::proxy::{Denial, DenialReason, RequestFacts};

/// A request the policy allowed, and what the later steps need of the rule that allowed it.
pub(super) struct Allowed<'p> {
    /// The rule (file and index), for the grant, denials and the audit record.
    pub rule: String,
    /// What the rule writes into the request.
    pub inject: &'p Injection,
    /// Limits to charge, one per level whose rule has any.
    pub limit_keys: Vec<LimitKey>,
    /// Whether secrets may be written into this request: over TLS, or over plain HTTP when
    /// every level's rule says so (ARCHITECTURE invariant 2).
    pub may_write_secrets: bool,
    /// How long the response may pause between frames, when the rule says.
    pub idle_timeout: Option<std::time::Duration>,
    /// The `Host` a plain HTTP request was matched by: nothing but the agent's word ties it to
    /// the address, which must be proven to be the name's.
    pub bind_name: Option<String>,
}

impl Allowed<'_> {
    /// A 403 naming the rule that allowed the destination, for a later step's refusal.
    pub fn deny(&self, reason: DenialReason) -> Denial {
        Denial {
            status: StatusCode::FORBIDDEN,
            reason,
            rule: Some(self.rule.clone()),
            retry_after: None,
        }
    }

    /// A 403: the rule that allowed the destination cannot be carried out for this request.
    pub fn cannot(&self, reason: String) -> Denial {
        self.deny(DenialReason::Rule(reason))
    }
}

/// Asks the policy about the request; refuses plain HTTP that nothing proves reaches the host
/// it names.
pub(super) fn decide<'p>(
    policy: &'p Policy,
    facts: &RequestFacts<'_>,
    parts: &Parts,
) -> Result<Allowed<'p>, Denial> {
    let request = RequestInfo {
        method: &parts.method,
        path: parts.uri.path(),
        headers: &parts.headers,
        host: facts.host,
        port: facts.port,
        dst_ip: facts.origin.original_dst.ip(),
        tls: facts.tls,
        now: SystemTime::now(),
    };
    let allowed = match policy.decide_request(&facts.origin.cgroup, &request) {
        RequestDecision::Allow {
            rule,
            inject,
            plain_http,
            idle_timeout,
            limit_keys,
        } => Allowed {
            rule: rule.to_string(),
            inject,
            limit_keys,
            may_write_secrets: facts.tls || plain_http,
            idle_timeout,
            bind_name: (!facts.tls && !host_is_address(facts.host, facts.origin.original_dst.ip()))
                .then(|| facts.host.to_string()),
        },
        RequestDecision::Deny { reason, rule, .. } => {
            return Err(Denial {
                rule: rule.map(ToString::to_string),
                ..Denial::forbidden(DenialReason::Policy(reason))
            });
        }
    };
    // Over plain HTTP nothing proves who answers at the original address: a Host header naming
    // an allowed host could front any IP. Only an IP rule for that very address, or a rule that
    // opts in with plain_http, may pass plain HTTP.
    if !facts.tls
        && !allowed.may_write_secrets
        && !host_is_address(facts.host, facts.origin.original_dst.ip())
    {
        return Err(allowed.cannot(format!(
            "plain HTTP to {} cannot be verified (nothing proves that {} is that host); use \
             https, or allow the address itself",
            facts.host,
            facts.origin.original_dst.ip()
        )));
    }
    Ok(allowed)
}

/// Whether `host` is the literal form of `ip`.
fn host_is_address(host: &str, ip: std::net::IpAddr) -> bool {
    host.trim_start_matches('[')
        .trim_end_matches(']')
        .parse::<std::net::IpAddr>()
        .is_ok_and(|h| h == ip || h.to_canonical() == ip.to_canonical())
}

#[cfg(test)]
mod tests {
    use super::host_is_address;

    #[test]
    fn only_the_literal_address_counts() {
        let ip = "127.0.0.1".parse().expect("ip");
        assert!(host_is_address("127.0.0.1", ip));
        assert!(!host_is_address("127.0.0.2", ip));
        assert!(!host_is_address("api.example.test", ip));
        let v6 = "::1".parse().expect("ip");
        assert!(host_is_address("[::1]", v6));
        assert!(host_is_address("::1", v6));
    }
}
