//! The last step: the rule's rate limits and budgets. Checked last, so a request refused for
//! another reason does not use one up; charged when the exchange is over (the response ended,
//! was cut, the agent went away or the upstream failed), with its bytes and the LLM tokens, or
//! for an upgraded (WebSocket) connection as its bytes pass (the proxy cuts it once a bytes
//! budget is used up).
//!
//! Tokens are what the response reports in its `usage`, read as the body streams
//! ([`UsageMeter`](agent_broker_core::policy::UsageMeter)), whatever its size. When it cannot be
//! read (the stream was cut or abandoned before its usage, an event stream without usage, a
//! body that is not JSON) the exchange is charged an estimate, never zero: [`estimate`], one
//! token per byte of request and response body (every token is at least one byte of text, so
//! this is at least what passed through brokerd), or what the response reported before it was
//! cut if that is more. The audit record says the charge was estimated, and why.

use std::{
    sync::{
        Arc,
        atomic::{AtomicU64, Ordering},
    },
    time::Instant,
};

use agent_broker_core::policy::{LimitKey, Limiter, UsageReading};
use http::StatusCode;

use super::request::Allowed;
use crate::proxy::{Charge, Completion, Denial, DenialReason, Grant};

/// Arranges for the rule's limits to be checked once everything else has allowed the request
/// (see [`Grant::admit`]): then a request over a limit is refused (429, with when to try
/// again), and otherwise the exchange is charged when it completes.
pub(super) fn charge_when_admitted(
    limiter: &Arc<Limiter>,
    allowed: Allowed<'_>,
    grant: &mut Grant,
) {
    if allowed.limit_keys.is_empty() {
        return;
    }
    let limiter = limiter.clone();
    let refusal = allowed.deny(DenialReason::Limit(String::new()));
    let limit_keys = allowed.limit_keys;
    grant.admit = Some(Box::new(move |grant: &mut Grant| {
        charge(&limiter, limit_keys, refusal, grant)
    }));
}

/// Refuses (429, with when to try again) a request over a limit; otherwise arranges for the
/// exchange to be charged when it completes. `refusal` is the denial to fill in.
fn charge(
    limiter: &Arc<Limiter>,
    limit_keys: Vec<LimitKey>,
    refusal: Denial,
    grant: &mut Grant,
) -> Result<(), Denial> {
    if let Err(limited) = limiter.check(&limit_keys, Instant::now()) {
        return Err(Denial {
            status: StatusCode::TOO_MANY_REQUESTS,
            retry_after: Some(limited.retry_after),
            reason: DenialReason::Limit(limited.reason),
            ..refusal
        });
    }
    let limit_keys: Arc<[LimitKey]> = limit_keys.into();
    let counts_tokens = limit_keys.iter().any(|k| k.counts_tokens());
    grant.meter_usage = counts_tokens;
    // Bytes an upgraded connection charged as they passed: not charged again at the end.
    let metered = Arc::new(AtomicU64::new(0));
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
        let charge = if counts_tokens {
            tokens(done)
        } else {
            Charge::default()
        };
        let bytes =
            (done.bytes_in + done.bytes_out).saturating_sub(metered.load(Ordering::Relaxed));
        limiter.record(
            &limit_keys,
            bytes,
            charge.tokens.unwrap_or(0),
            Instant::now(),
        );
        charge
    }));
    Ok(())
}

/// The tokens to charge for an exchange: reported, or estimated (see the module docs).
fn tokens(done: &Completion) -> Charge {
    let unreadable = |why: &str, partial: Option<u64>| {
        let estimate = estimate(done);
        let tokens = estimate.max(partial.unwrap_or(0));
        Charge {
            tokens: Some(tokens),
            estimated: Some(format!(
                "{why}; charged {tokens} tokens: one per byte of request and response body \
                 ({estimate}){}",
                partial.map_or_else(String::new, |p| format!(
                    ", or the {p} reported before the end if more"
                ))
            )),
        }
    };
    match &done.usage {
        Some(UsageReading::Reported(n)) => Charge {
            tokens: Some(*n),
            estimated: None,
        },
        Some(UsageReading::NoneReported) => Charge {
            tokens: Some(0),
            estimated: None,
        },
        Some(UsageReading::Unreadable { why, partial }) => unreadable(why, *partial),
        None => unreadable("the response's usage was not read", None),
    }
}

/// Tokens charged for an exchange whose usage cannot be read: one per byte of the request body
/// sent upstream and of the response body sent to the agent.
pub fn estimate(done: &Completion) -> u64 {
    done.bytes_in.saturating_add(done.bytes_out)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn done(bytes_in: u64, bytes_out: u64, usage: Option<UsageReading>) -> Completion {
        Completion {
            bytes_in,
            bytes_out,
            usage,
        }
    }

    #[test]
    fn reported_usage_is_charged_and_unreadable_usage_is_estimated_never_zero() {
        let reported = tokens(&done(10, 20, Some(UsageReading::Reported(7))));
        assert_eq!(
            reported,
            Charge {
                tokens: Some(7),
                estimated: None
            }
        );
        let none = tokens(&done(10, 20, Some(UsageReading::NoneReported)));
        assert_eq!(
            none,
            Charge {
                tokens: Some(0),
                estimated: None
            }
        );
        let cut = tokens(&done(
            100,
            2000,
            Some(UsageReading::Unreadable {
                why: "the response was cut".into(),
                partial: None,
            }),
        ));
        assert_eq!(cut.tokens, Some(2100));
        let why = cut.estimated.expect("said to be estimated");
        assert!(
            why.starts_with("the response was cut; charged 2100 tokens"),
            "{why}"
        );
        // What was reported before the cut counts when it is more.
        let partial = tokens(&done(
            1,
            1,
            Some(UsageReading::Unreadable {
                why: "cut".into(),
                partial: Some(500),
            }),
        ));
        assert_eq!(partial.tokens, Some(500));
        // Cancelled before any response: the request body still counts.
        let cancelled = tokens(&done(300, 0, None));
        assert_eq!(cancelled.tokens, Some(300));
        assert!(cancelled.estimated.is_some());
    }
}
