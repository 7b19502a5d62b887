//! The last step: the rule's rate limits and budgets. Checked last, so a request refused for
//! another reason does not use one up; charged when the exchange is over, with its bytes and
//! the tokens an LLM API reports in its `usage`, or for an upgraded (WebSocket) connection as
//! its bytes pass (the proxy cuts it once a bytes budget is used up).

use std::{
    sync::{
        Arc,
        atomic::{AtomicU64, Ordering},
    },
    time::Instant,
};

use agent_broker_core::policy::{LimitKey, Limiter, usage_tokens};
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
    let limit_keys: Arc<[LimitKey]> = allowed.limit_keys.into();
    // Bytes an upgraded connection charged as they passed: not charged again at the end.
    let metered = Arc::new(AtomicU64::new(0));
    grant.capture_body = USAGE_CAPTURE;
    grant.meter = Some(Arc::new({
        let (limiter, limit_keys, metered) = (limiter.clone(), limit_keys.clone(), metered.clone());
        move |bytes| {
            metered.fetch_add(bytes, Ordering::Relaxed);
            limiter
                .charge_bytes(&limit_keys, bytes, Instant::now())
                .map_err(|limited| limited.reason)
        }
    }));
    let limiter = limiter.clone();
    grant.on_complete = Some(Box::new(move |done| {
        let tokens = usage_tokens(&done.body).unwrap_or(0);
        let bytes =
            (done.bytes_in + done.bytes_out).saturating_sub(metered.load(Ordering::Relaxed));
        limiter.record(&limit_keys, bytes, tokens, Instant::now());
    }));
    Ok(())
}
