//! The last step: the rule's rate limits and budgets. Checked last, so a request refused for
//! another reason does not use one up; charged when the exchange is over, with its bytes and
//! the tokens an LLM API reports in its `usage`.

use std::{sync::Arc, time::Instant};

use agent_broker_core::policy::{Limiter, usage_tokens};
use http::StatusCode;

use super::request::Allowed;
use crate::proxy::{Denial, DenialReason, Grant};

/// How much of a limited response is kept to read an LLM API's `usage` from.
const USAGE_CAPTURE: usize = 256 * 1024;

/// Refuses (429, with when to try again) a request over a limit; otherwise arranges for the
/// exchange to be charged when it completes.
pub(super) fn charge(
    limiter: &Arc<Limiter>,
    allowed: Allowed<'_>,
    grant: &mut Grant,
) -> Result<(), Denial> {
    if allowed.limit_keys.is_empty() {
        return Ok(());
    }
    if let Err(limited) = limiter.check(&allowed.limit_keys, Instant::now()) {
        return Err(Denial {
            status: StatusCode::TOO_MANY_REQUESTS,
            retry_after: Some(limited.retry_after),
            ..allowed.deny(DenialReason::Limit(limited.reason))
        });
    }
    let limiter = limiter.clone();
    let limit_keys = allowed.limit_keys;
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
    Ok(())
}
