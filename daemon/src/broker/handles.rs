//! The second step: a handle the agent put in a header or the query (a `brk_` token, or a
//! shaped one that looks like the secret) is swapped for the secret it stands for, when the
//! handle is valid for this agent, host and time.

use std::time::SystemTime;

use agent_broker_core::{
    fmt::error_chain,
    handle::{self, LookupFailed, SwapContext},
};
use http::request::Parts;
use tracing::warn;

use super::{PolicyAuthorizer, request::Allowed};
use crate::proxy::{Denial, Grant, RequestFacts};

/// Swaps every handle in the request; misuse (unknown, expired, revoked, another agent's or
/// another host's handle) is a denial marked as handle misuse. The request is searched for
/// `brk_` tokens and for the shapes of every shaped handle in the vault; a vault that cannot be
/// read refuses a request with a candidate rather than forward it.
pub(super) fn swap(
    broker: &PolicyAuthorizer,
    facts: &RequestFacts<'_>,
    parts: &mut Parts,
    allowed: &Allowed<'_>,
    grant: &mut Grant,
) -> Result<(), Denial> {
    let shapes = broker.vault.handle_shapes();
    let ctx = SwapContext {
        cgroup: &facts.origin.cgroup,
        host: facts.host,
        now: SystemTime::now(),
        shapes: &shapes,
    };
    let swapped = handle::swap_handles(
        &parts.headers,
        parts.uri.query(),
        &ctx,
        |hash| {
            broker.vault.handle_by_token_hash(hash).map_err(|e| {
                warn!(error = %error_chain(&e), "cannot read handle");
                LookupFailed
            })
        },
        |name| broker.secret(name),
    )
    .map_err(|misuse| allowed.deny(misuse.into()))?;
    let Some(swapped) = swapped else {
        return Ok(());
    };
    if !allowed.may_write_secrets {
        return Err(allowed.cannot(format!(
            "the request carries a handle but goes to {} over plain HTTP; use https (the rule \
             does not allow secrets over plain HTTP)",
            facts.host
        )));
    }
    grant
        .secrets
        .extend(swapped.used.iter().map(|u| u.secret.as_str().to_string()));
    grant.needles.extend(swapped.secret_values.iter().cloned());
    swapped.apply(parts).map_err(|e| {
        allowed.cannot(format!(
            "cannot rewrite the request with the handle's secret: {e}"
        ))
    })
}
