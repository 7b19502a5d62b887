//! The broker's decisions: the [`Authorizer`] the proxy asks about every connection and request.
//!
//! A request goes through four steps, in this order, each in its own module: the policy
//! decides ([`request`]); a handle the agent holds (`brk_...` or shaped) is swapped for its secret
//! ([`handles`]); the rule's credentials are written into the request ([`inject`]); and the
//! rule's rate limits and budgets are charged ([`limits`], last, so a request refused for
//! another reason does not use one up). Connections are decided in [`connection`]. Secrets are
//! looked up in the vault only after the policy allowed the destination, and are written only
//! into the slots the rule names (or where the agent put a valid handle).

mod connection;
mod handles;
mod inject;
mod limits;
mod names;
mod request;

use std::sync::{Arc, Mutex};

use agent_broker_core::{
    fmt::error_chain,
    policy::{Limiter, Policy},
    secret::{SecretName, SecretValue},
};
use http::request::Parts;
use tokio::sync::watch;
use tracing::warn;

use crate::{
    capture::ConnectionOrigin,
    dns::AnsweredNames,
    proxy::{Authorizer, ConnectionVerdict, Denial, Grant, RequestFacts},
    vault::Vault,
};

pub use names::NameProof;

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

    /// The policy current now; drops the counters of rules a reload removed (once per new
    /// policy).
    fn current_policy(&self) -> Arc<Policy> {
        let policy = self.policy.borrow().clone();
        let id = Arc::as_ptr(&policy) as usize;
        if let Ok(mut seen) = self.limiter_policy.lock()
            && *seen != id
        {
            *seen = id;
            self.limiter.retain_for(&policy);
        }
        policy
    }

    /// A secret's value from the vault; a vault that cannot be read is logged and the secret
    /// treated as missing (the request is then refused by the step that needed it).
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
        let policy = self.current_policy();
        connection::decide(self, &policy, origin, sni)
    }

    fn authorize(&self, facts: &RequestFacts<'_>, parts: &mut Parts) -> Result<Grant, Denial> {
        let policy = self.current_policy();
        let allowed = request::decide(&policy, facts, parts)?;
        let mut grant = Grant {
            rule: allowed.rule.clone(),
            idle_timeout: allowed.idle_timeout,
            bind_name: allowed.bind_name.clone(),
            ..Grant::default()
        };
        handles::swap(self, facts, parts, &allowed, &mut grant)?;
        inject::write(self, facts.host, (parts, &allowed), &mut grant)?;
        limits::charge(&self.limiter, allowed, &mut grant)?;
        Ok(grant)
    }
}
