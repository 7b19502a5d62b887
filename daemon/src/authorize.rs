//! Request authorization: policy decision, handle swaps and credential injection, in that order.
//!
//! The proxy hands each request here (with the host SNI/Host/:authority agreed on); the answer is
//! either a [`Grant`] with the request rewritten, or a [`Denial`] with a reason an agent can act
//! on. Secrets are looked up in the vault only after the policy allowed the destination, and are
//! written only into the slots the rule names (or where the agent put a valid handle).

use agent_broker_core::fmt::error_chain;
use std::{
    sync::{Arc, Mutex},
    time::{Instant, SystemTime},
};

use http::{HeaderName, HeaderValue, StatusCode, request::Parts};
use tokio::sync::watch;
use tracing::warn;

use crate::{
    answered::AnsweredNames,
    capture::ConnectionOrigin,
    handle_store,
    proxy::{Authorizer, ConnectionVerdict, Denial, Grant, RequestFacts},
    vault::Vault,
};
use agent_broker_core::{
    handle::{self, SwapContext},
    policy::ConnectionDecision,
    policy::{Limiter, Policy, RequestDecision, RequestInfo, usage_tokens},
    secret::{SecretName, SecretValue},
};

/// Authorizes against a policy snapshot and the vault.
pub struct PolicyAuthorizer {
    /// The live policy; each request takes the snapshot current when it arrives.
    policy: watch::Receiver<Arc<Policy>>,
    vault: Arc<Vault>,
    /// Rate limits and budgets, per agent cgroup and rule; kept across reloads for rules that
    /// still exist.
    limiter: Arc<Limiter>,
    /// The policy the limiter was last pruned for.
    limiter_policy: Mutex<usize>,
    /// Names brokerd's DNS gave agents, for connections that carry no server name.
    answered: Option<Arc<AnsweredNames>>,
}

/// How much of a limited response is kept to read an LLM API's `usage` from.
const USAGE_CAPTURE: usize = 256 * 1024;

impl PolicyAuthorizer {
    pub fn new(policy: watch::Receiver<Arc<Policy>>, vault: Arc<Vault>) -> Self {
        Self {
            policy,
            vault,
            limiter: Arc::new(Limiter::new()),
            limiter_policy: Mutex::new(0),
            answered: None,
        }
    }

    /// Lets connections without a server name be matched by the name brokerd's DNS gave the
    /// agent for the address it dialed.
    pub fn with_answered_names(mut self, answered: Arc<AnsweredNames>) -> Self {
        self.answered = Some(answered);
        self
    }

    /// Drops the counters of rules a reload removed (once per new policy).
    fn follow_reloads(&self, policy: &Arc<Policy>) {
        let id = Arc::as_ptr(policy) as usize;
        if let Ok(mut seen) = self.limiter_policy.lock()
            && *seen != id
        {
            *seen = id;
            self.limiter.retain_for(policy);
        }
    }

    fn secret(&self, name: &SecretName) -> Option<SecretValue> {
        match self.vault.get(name) {
            Ok(v) => v,
            Err(e) => {
                warn!(secret = %name.as_str(), error = %error_chain(&e), "cannot read secret");
                None
            }
        }
    }
}

impl Authorizer for PolicyAuthorizer {
    fn connection(&self, origin: &ConnectionOrigin, sni: Option<&str>) -> ConnectionVerdict {
        let policy = self.policy.borrow().clone();
        self.follow_reloads(&policy);
        let answered = match (sni, &self.answered) {
            (None, Some(names)) => names.lookup(&origin.cgroup, origin.original_dst.ip()),
            _ => None,
        };
        let name = sni.or(answered.as_deref());
        match policy.decide_connection(&origin.cgroup, origin.original_dst, name, SystemTime::now())
        {
            ConnectionDecision::Tcp { rule, limit_keys } => {
                if let Err(limited) = self.limiter.check(&limit_keys, Instant::now()) {
                    return ConnectionVerdict::Refuse(limited.reason);
                }
                let limiter = self.limiter.clone();
                ConnectionVerdict::Splice {
                    rule: rule.to_string(),
                    on_done: Some(Box::new(move |bytes| {
                        limiter.record(&limit_keys, bytes, 0, Instant::now());
                    })),
                }
            }
            ConnectionDecision::Http => ConnectionVerdict::Intercept,
            ConnectionDecision::Deny { reason, .. } => ConnectionVerdict::Refuse(reason),
        }
    }

    fn authorize(&self, facts: &RequestFacts<'_>, parts: &mut Parts) -> Result<Grant, Denial> {
        let cgroup = &facts.origin.cgroup;
        let policy = self.policy.borrow().clone();
        self.follow_reloads(&policy);
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
        let (rule, inject, plain_http, limit_keys) = match policy.decide_request(cgroup, &request) {
            RequestDecision::Allow {
                rule,
                inject,
                plain_http,
                limit_keys,
            } => (rule, inject, plain_http, limit_keys),
            RequestDecision::Deny { reason, rule, .. } => {
                return Err(Denial {
                    rule: rule.map(ToString::to_string),
                    ..Denial::forbidden(reason)
                });
            }
        };
        let rule_name = rule.to_string();
        let deny = |reason: String| Denial {
            status: StatusCode::FORBIDDEN,
            reason,
            rule: Some(rule_name.clone()),
            retry_after: None,
            handle_misuse: false,
        };
        // Over plain HTTP nothing proves who answers at the original address: a Host header
        // naming an allowed host could front any IP. Only an IP rule for that very address, or a
        // rule that opts in with plain_http, may pass plain HTTP.
        if !facts.tls && !plain_http && !host_is_address(facts.host, facts.origin.original_dst.ip())
        {
            return Err(deny(format!(
                "plain HTTP to {} cannot be verified (nothing proves that {} is that host); use \
                 https, or allow the address itself",
                facts.host,
                facts.origin.original_dst.ip()
            )));
        }
        // Secrets travel over plain HTTP only when the rule says so (ARCHITECTURE invariant 2).
        let may_write_secrets = facts.tls || plain_http;
        let mut grant = Grant {
            rule: rule_name.clone(),
            ..Grant::default()
        };

        let ctx = SwapContext {
            cgroup,
            host: facts.host,
            now: SystemTime::now(),
        };
        let swapped = handle::swap_handles(
            &parts.headers,
            parts.uri.query(),
            &ctx,
            |hash| match self.vault.handle_by_token_hash(&hash.0) {
                Ok(Some(record)) => handle_store::from_vault(record),
                Ok(None) => None,
                Err(e) => {
                    warn!(error = %error_chain(&e), "cannot read handle");
                    None
                }
            },
            |name| self.secret(name),
        )
        .map_err(|d| Denial {
            handle_misuse: true,
            ..deny(d.to_string())
        })?;
        if let Some(swapped) = swapped {
            if !may_write_secrets {
                return Err(deny(format!(
                    "the request carries a handle but goes to {} over plain HTTP; use https \
                     (the rule does not allow secrets over plain HTTP)",
                    facts.host
                )));
            }
            grant
                .secrets
                .extend(swapped.used.iter().map(|u| u.secret.as_str().to_string()));
            grant.needles.extend(swapped.secret_values.iter().cloned());
            swapped.apply(parts).map_err(|e| {
                deny(format!(
                    "cannot rewrite the request with the handle's secret: {e}"
                ))
            })?;
        }

        if !inject.is_empty() {
            if !may_write_secrets {
                return Err(deny(format!(
                    "{} is reached over plain HTTP and the rule injects credentials; use https \
                     (or set plain_http = true in the rule if this host has no TLS)",
                    facts.host
                )));
            }
            let rendered = inject
                .render(|name| self.secret(name))
                .map_err(|e| deny(format!("cannot inject credentials: {e}")))?;
            for (name, value) in &rendered.headers {
                let name = HeaderName::from_bytes(name.as_bytes())
                    .map_err(|e| deny(format!("invalid header name {name} in the rule: {e}")))?;
                let mut value = HeaderValue::from_bytes(value).map_err(|_| {
                    deny(format!(
                        "the value injected into {name} is not a valid header value"
                    ))
                })?;
                value.set_sensitive(true);
                // Whatever the agent sent in this header is replaced.
                parts.headers.remove(&name);
                parts.headers.insert(name, value);
            }
            if let Some(query) = rendered.rewrite_query(parts.uri.query()) {
                let path_and_query = format!("{}?{}", parts.uri.path(), query.as_str());
                let mut uri = http::uri::Parts::from(parts.uri.clone());
                uri.path_and_query = Some(
                    http::uri::PathAndQuery::try_from(path_and_query)
                        .map_err(|e| deny(format!("cannot inject into the query: {e}")))?,
                );
                parts.uri = http::Uri::from_parts(uri)
                    .map_err(|e| deny(format!("cannot inject into the query: {e}")))?;
            }
            for secret in &rendered.secrets {
                let secret = secret.as_str().to_string();
                if !grant.secrets.contains(&secret) {
                    grant.secrets.push(secret);
                }
            }
            grant.needles.extend(rendered.needles().cloned());
        }

        // Limits last: a request refused for another reason does not use up a budget.
        if !limit_keys.is_empty() {
            if let Err(limited) = self.limiter.check(&limit_keys, Instant::now()) {
                return Err(Denial {
                    status: StatusCode::TOO_MANY_REQUESTS,
                    retry_after: Some(limited.retry_after),
                    ..deny(limited.reason)
                });
            }
            let limiter = self.limiter.clone();
            grant.capture_body = USAGE_CAPTURE;
            grant.on_complete = Some(Box::new(move |done| {
                let tokens = usage_tokens(&done.body).unwrap_or(0);
                limiter.record(
                    &limit_keys,
                    done.bytes_in + done.bytes_out,
                    tokens,
                    Instant::now(),
                );
            }));
        }
        Ok(grant)
    }
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
