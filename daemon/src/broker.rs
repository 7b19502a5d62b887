//! The broker's decisions: the [`Authorizer`] the proxy asks about every connection and request.
//!
//! A request goes through four steps, in this order, each in its own module: the policy
//! decides ([`request`]); a handle the agent holds (`brk_...` or shaped) is swapped for its secret
//! ([`handles`]); the rule's credentials are written into the request ([`inject`]); and the
//! rule's rate limits and budgets are charged ([`limits`], last, so a request refused for
//! another reason does not use one up). Connections are decided in [`connection`]. Secrets are
//! looked up in the vault only after the policy allowed the destination, and are written only
//! into the slots the rule names (or where the agent put a valid handle). Every grant carries
//! the scrubbing set of the agent's policy: every secret value its rules can inject, prebuilt
//! once per policy, vault generation and governing file.

mod capture;
mod connection;
mod handles;
mod inject;
mod limits;
mod names;
mod request;
mod sigv4;

use std::{
    collections::HashMap,
    sync::{Arc, Mutex},
};

use agent_broker_core::{
    cgroup::CgroupPath,
    credential,
    fmt::error_chain,
    policy::{Limiter, Policy},
    secret::{SecretName, SecretValue},
};
use http::request::Parts;
use tokio::sync::watch;
use tracing::warn;
use zeroize::Zeroizing;

use crate::{
    approvals::{Approvals, Ask, Refused},
    capture::ConnectionOrigin,
    credentials::{Credentials, Lookup},
    dns::AnsweredNames,
    proxy::{
        Approval, Authorizer, ConnectionVerdict, Denial, DenialReason, Grant, Needles,
        NeedlesError, Prepared, RequestFacts,
    },
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
    /// Every secret each policy file's agents can have injected, prebuilt for scrubbing.
    scrub_sets: Mutex<ScrubSets>,
    /// Credentials whose values brokerd fetches (OAuth, exec, file); none in tests that use
    /// static secrets only.
    credentials: Option<Arc<Credentials>>,
    /// Where requests that ask for an operator's approval wait; without it they are refused.
    approvals: Option<Arc<Approvals>>,
    /// Static secrets already decrypted, for one vault generation and policy snapshot.
    decrypted: Mutex<Decrypted>,
}

/// The vault's static secrets, decrypted once per vault generation and policy snapshot rather
/// than per request (a redb read and an AES-GCM open each; ARCHITECTURE.md invariant 1 allows
/// this). The values are [`SecretValue`]s: zeroized when dropped, which is when a secret is
/// stored, rotated or removed (the vault's generation moves), when the policy is reloaded, and
/// when brokerd exits; redacted in `Debug`; in brokerd's memory, which it locks and keeps out
/// of core dumps (`harden`). Only names some request needed are here, and a name the vault
/// lacks is remembered as missing; a vault read that fails is not remembered.
#[derive(Default)]
struct Decrypted {
    generation: u64,
    values: HashMap<SecretName, Option<SecretValue>>,
}

impl Decrypted {
    /// The cached value of `name` for the vault's `generation`, forgetting every value first
    /// when the generation moved.
    fn get(&mut self, generation: u64, name: &SecretName) -> Option<Option<SecretValue>> {
        if self.generation != generation {
            self.forget();
            self.generation = generation;
        }
        self.values.get(name).cloned()
    }

    fn forget(&mut self) {
        // Dropping the values zeroizes them.
        self.values.clear();
    }
}

/// The 403 of a request that waited for approval and may not go.
fn refusal(refused: Refused) -> Denial {
    Denial::forbidden(DenialReason::Policy(refused.reason))
}

/// The scrubbing sets of one policy and vault generation, by the cgroup of the governing file
/// (and, for a request carrying a handle's secret that no rule names, by the secrets' names).
#[derive(Default)]
struct ScrubSets {
    /// Held, so its address cannot be reused by a later policy while it is compared.
    policy: Option<Arc<Policy>>,
    /// The vault's generation and the credentials' (a fetched token changes the set).
    vault: (u64, u64),
    by_file: HashMap<String, Needles>,
}

impl PolicyAuthorizer {
    pub fn new(policy: watch::Receiver<Arc<Policy>>, vault: Arc<Vault>) -> Self {
        Self {
            policy,
            vault,
            limiter: Arc::new(Limiter::new()),
            limiter_policy: Mutex::new(0),
            answered: None,
            scrub_sets: Mutex::default(),
            credentials: None,
            approvals: None,
            decrypted: Mutex::default(),
        }
    }

    /// Holds requests that ask for an operator's approval there.
    pub fn with_approvals(mut self, approvals: Arc<Approvals>) -> Self {
        self.approvals = Some(approvals);
        self
    }

    /// Injects the values of credentials that are not static (see [`crate::credentials`]).
    pub fn with_credentials(mut self, credentials: Arc<Credentials>) -> Self {
        self.credentials = Some(credentials);
        self
    }

    /// The rate limits' and budgets' counters, for reading what is left (the agent API).
    pub fn limiter(&self) -> Arc<Limiter> {
        self.limiter.clone()
    }

    /// The generations a scrubbing set is built for.
    fn generations(&self) -> (u64, u64) {
        (
            self.vault.generation(),
            self.credentials.as_ref().map_or(0, |c| c.generation()),
        )
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
            self.decrypted().forget();
        }
        policy
    }

    /// A secret's value from the vault; a vault that cannot be read is logged and the secret
    /// treated as missing (the request is then refused by the step that needed it).
    fn secret(&self, name: &SecretName) -> Option<SecretValue> {
        if let Some(credentials) = &self.credentials {
            match credentials.lookup(name) {
                Lookup::Ready(value) => return Some(value),
                Lookup::NotReady(_) => return None,
                Lookup::Static => {}
            }
        }
        // Read before the vault is, so a value stored meanwhile is cached under the old
        // generation and forgotten at the next lookup.
        let generation = self.vault.generation();
        if let Some(cached) = self.decrypted().get(generation, name) {
            return cached;
        }
        let value = match self.vault.get(name) {
            // A credential spec is never a value to inject (one the credentials have not
            // loaded yet is missing until they do).
            Ok(Some(v)) if credential::is_spec(&v) => None,
            Ok(v) => v,
            Err(e) => {
                warn!(secret = %name.as_str(), error = %error_chain(&e), "cannot read secret");
                return None;
            }
        };
        let mut decrypted = self.decrypted();
        if decrypted.generation == generation {
            decrypted.values.insert(name.clone(), value.clone());
        }
        value
    }

    fn decrypted(&self) -> std::sync::MutexGuard<'_, Decrypted> {
        self.decrypted
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// The scrubbing set of `cgroup`'s policy file plus the secrets `grant` carries that it
    /// lacks (a handle's), cached like the policy's own set, by the secrets' names.
    fn scrub_set_with(
        &self,
        policy: &Arc<Policy>,
        cgroup: &CgroupPath,
        grant: &Grant,
    ) -> Result<Needles, NeedlesError> {
        let file = policy.file_for(cgroup).map_or("", |f| f.cgroup().as_str());
        let mut names = grant.secrets.clone();
        names.sort_unstable();
        // NUL separates: it is in no cgroup path or secret name.
        let key = format!("{file}\0{}", names.join("\0"));
        let vault = self.generations();
        let current = |sets: &ScrubSets| {
            sets.vault == vault && sets.policy.as_ref().is_some_and(|p| Arc::ptr_eq(p, policy))
        };
        {
            let sets = self
                .scrub_sets
                .lock()
                .unwrap_or_else(std::sync::PoisonError::into_inner);
            if current(&sets)
                && let Some(set) = sets.by_file.get(&key)
                && set.covers(&grant.needles)
            {
                return Ok(set.clone());
            }
        }
        let set = grant.scrub.with_extra(&grant.needles)?;
        let mut sets = self
            .scrub_sets
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        if current(&sets) {
            sets.by_file.insert(key, set.clone());
        }
        Ok(set)
    }

    /// Every secret value the policy chain governing `cgroup` can inject (each value, and the
    /// `user:pass` of basic auth), as one prebuilt set: built once per policy, vault generation
    /// and governing file, then shared by every response to those agents.
    fn scrub_set(
        &self,
        policy: &Arc<Policy>,
        cgroup: &CgroupPath,
    ) -> Result<Needles, NeedlesError> {
        let Some(file) = policy.file_for(cgroup) else {
            return Ok(Needles::default());
        };
        let vault = self.generations();
        let current = |sets: &ScrubSets| {
            sets.vault == vault && sets.policy.as_ref().is_some_and(|p| Arc::ptr_eq(p, policy))
        };
        let key = file.cgroup().as_str();
        {
            let mut sets = self
                .scrub_sets
                .lock()
                .unwrap_or_else(std::sync::PoisonError::into_inner);
            if !current(&sets) {
                *sets = ScrubSets {
                    policy: Some(policy.clone()),
                    vault,
                    by_file: HashMap::new(),
                };
            }
            if let Some(set) = sets.by_file.get(key) {
                return Ok(set.clone());
            }
        }
        let mut values: Vec<Zeroizing<Vec<u8>>> = Vec::new();
        for rule in policy.chain(cgroup).into_iter().flat_map(|f| f.rules()) {
            let injection = rule.injection();
            if injection.is_empty() {
                continue;
            }
            for name in injection.secret_names() {
                if let Some(value) = self.secret(name) {
                    values.push(Zeroizing::new(value.expose().to_vec()));
                }
                // A credential's earlier values and its refresh token too.
                if let Some(credentials) = &self.credentials {
                    values.extend(
                        credentials
                            .needles(name)
                            .iter()
                            .map(|v| Zeroizing::new(v.expose().to_vec())),
                    );
                }
            }
            // Basic auth's `user:pass` (seen base64-encoded); fails only on a missing secret.
            if let Ok(rendered) = injection.render(|name| self.secret(name)) {
                values.extend(rendered.extra_needles);
            }
        }
        let set = Needles::new(values)?;
        let mut sets = self
            .scrub_sets
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        // Another request may have moved the cache on meanwhile: store only for the same state.
        if current(&sets) {
            sets.by_file.insert(key.to_string(), set.clone());
        }
        Ok(set)
    }
}

impl Authorizer for PolicyAuthorizer {
    fn connection(&self, origin: &ConnectionOrigin, sni: Option<&str>) -> ConnectionVerdict {
        let policy = self.current_policy();
        connection::decide(self, &policy, origin, sni)
    }

    fn prepare(&self, facts: &RequestFacts<'_>, parts: &Parts) -> Option<Prepared> {
        let policy = self.current_policy();
        // A request that asks waits for an operator first, unless a standing decision covers it.
        let mut approval = None;
        let mut hold = None;
        // Deciding again is work on every request: only where some file can ask.
        if let Some(approvals) = &self.approvals
            && policy.may_ask()
            && let Some(needs) = request::needs_approval(&policy, facts, parts)
        {
            let method = parts.method.as_str();
            match approvals.standing(&facts.origin.cgroup, method, facts.host, facts.port) {
                Some(a) => approval = Some(Approval { id: a.id, by: a.by }),
                None => {
                    let ask = Ask {
                        origin: facts.origin,
                        method,
                        host: facts.host,
                        port: facts.port,
                        path: parts.uri.path(),
                        rule: needs.rule,
                        why: needs.why,
                    };
                    match approvals.hold(ask) {
                        Ok(wait) => hold = Some(wait),
                        Err(refused) => {
                            return Some(Box::pin(std::future::ready(Err(refusal(refused)))));
                        }
                    }
                }
            }
        }
        // The decision again, read-only (as if approved): authorize makes it for real.
        let probe = approval
            .clone()
            .or_else(|| hold.is_some().then(Approval::probe));
        let fetch = self
            .credentials
            .as_ref()
            .filter(|c| c.any())
            .and_then(|credentials| {
                let allowed = request::decide(&policy, facts, parts, probe.as_ref()).ok()?;
                let names: Vec<&SecretName> = allowed.inject.secret_names().into_iter().collect();
                let pending = credentials.pending(&names);
                (!pending.is_empty()).then(|| (credentials.clone(), pending))
            });
        if hold.is_none() && fetch.is_none() {
            return approval.map(|a| Box::pin(std::future::ready(Ok(Some(a)))) as Prepared);
        }
        Some(Box::pin(async move {
            let approval = match hold {
                Some(wait) => match wait.await {
                    Ok(a) => Some(Approval { id: a.id, by: a.by }),
                    Err(refused) => return Err(refusal(refused)),
                },
                None => approval,
            };
            if let Some((credentials, pending)) = fetch {
                credentials.ensure(&pending).await;
            }
            Ok(approval)
        }))
    }

    fn reads_body(&self, facts: &RequestFacts<'_>, parts: &Parts) -> bool {
        // Only a form can be one (checked first: every request passes here), and only a
        // capturing rule's.
        if !capture::is_form(parts) {
            return false;
        }
        let policy = self.current_policy();
        request::decide(&policy, facts, parts, Some(&Approval::probe()))
            .is_ok_and(|allowed| allowed.inject.capture_tokens().is_some())
    }

    fn rejected(&self, grant: &Grant) {
        let Some(credentials) = self.credentials.clone() else {
            return;
        };
        let names: Vec<SecretName> = grant
            .secrets
            .iter()
            .filter_map(|s| SecretName::new(s.as_str()).ok())
            .collect();
        tokio::spawn(async move { credentials.rejected(&names).await });
    }

    fn authorize(&self, facts: &RequestFacts<'_>, parts: &mut Parts) -> Result<Grant, Denial> {
        let policy = self.current_policy();
        let approval = parts.extensions.get::<Approval>().cloned();
        let allowed = request::decide(&policy, facts, parts, approval.as_ref())?;
        let scrub = self
            .scrub_set(&policy, &facts.origin.cgroup)
            .map_err(|e| allowed.cannot(error_chain(&e)))?;
        let mut grant = Grant {
            rule: allowed.rule.clone(),
            idle_timeout: allowed.idle_timeout,
            bind_name: allowed.bind_name.clone(),
            scrub,
            ..Grant::default()
        };
        handles::swap(self, facts, parts, &allowed, &mut grant)?;
        inject::write(self, facts, (parts, &allowed), &mut grant)?;
        if !grant.scrub.covers(&grant.needles) {
            // A handle's secret that no rule names: its set is cached too.
            grant.scrub = self
                .scrub_set_with(&policy, &facts.origin.cgroup, &grant)
                .map_err(|e| allowed.cannot(error_chain(&e)))?;
        }
        // A credential goes only to the name's own addresses, whatever certificate another
        // address holds for the name (issue 13.18). Requests that carry none are not bound.
        if !grant.secrets.is_empty() && grant.bind_name.is_none() {
            grant.bind_name = allowed.credential_name.clone();
        }
        limits::charge_when_admitted(&self.limiter, allowed, &mut grant);
        Ok(grant)
    }
}
