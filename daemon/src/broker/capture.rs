//! `inject.capture_tokens`: an OAuth token endpoint the agent calls itself (an authorization
//! code or device flow it runs). The real tokens of each answer are kept in the vault and the
//! agent gets placeholders of their shape instead, handles bound to the agent's cgroup: the
//! access token's to the hosts the rule names (`use_at`), the refresh token's to the token
//! endpoint. When the agent later sends a placeholder back in the endpoint's form body (a
//! refresh, a revocation), it is swapped for the real token, as a handle in a header is.

use std::{
    sync::Arc,
    time::{Duration, SystemTime},
};

use agent_broker_core::{
    cgroup::CgroupPath,
    fmt::error_chain,
    handle::{self, HandleBinding, TokenHash, TokenShape},
    inject::CaptureTokens,
    percent::{self, Plus},
    secret::{SecretName, SecretValue},
};
use bytes::Bytes;
use http::{header, request::Parts};
use tracing::info;
use zeroize::Zeroizing;

use super::{PolicyAuthorizer, request::Allowed};
use crate::{
    proxy::{Denial, Grant, ReadBody, RequestFacts},
    vault::Vault,
};

/// How long a captured access token's placeholder works when the answer names no lifetime.
const ACCESS_TTL: Duration = Duration::from_secs(3600);
/// How long a captured refresh token's placeholder works.
const REFRESH_TTL: Duration = Duration::from_secs(90 * 24 * 3600);
/// The fields of a token answer (RFC 6749 5.1) that carry tokens.
const TOKEN_FIELDS: [&str; 2] = ["access_token", "refresh_token"];

/// Whether the request carries a form body (`application/x-www-form-urlencoded`).
pub(super) fn is_form(parts: &Parts) -> bool {
    parts.headers.get(header::CONTENT_TYPE).is_some_and(|c| {
        c.as_bytes()
            .starts_with(b"application/x-www-form-urlencoded")
    })
}

/// Swaps the placeholders in the form body for the real tokens, and arranges for the answer's
/// tokens to be kept.
pub(super) fn apply(
    broker: &PolicyAuthorizer,
    facts: &RequestFacts<'_>,
    parts: &mut Parts,
    allowed: &Allowed<'_>,
    capture: &CaptureTokens,
    grant: &mut Grant,
) -> Result<(), Denial> {
    if let Some(body) = parts.extensions.get::<ReadBody>().map(|b| b.0.clone())
        && is_form(parts)
    {
        let swapped = swap_form(broker, facts, &body).map_err(|reason| allowed.deny(reason))?;
        if let Some((form, used)) = swapped {
            if !allowed.may_write_secrets {
                return Err(
                    allowed.cannot("placeholders of captured tokens go only over TLS".to_string())
                );
            }
            for (name, value) in used {
                if !grant.secrets.contains(&name) {
                    grant.secrets.push(name);
                }
                grant.needles.push(value);
            }
            parts
                .extensions
                .insert(ReadBody(Bytes::from(form.to_vec())));
        }
    }
    let vault = broker.vault.clone();
    let cgroup = facts.origin.cgroup.clone();
    let use_at = capture.use_at().to_string();
    let endpoint = facts.host.to_string();
    grant.capture = Some(Box::new(move |body| {
        keep_tokens(&vault, &cgroup, (&use_at, &endpoint), &body)
    }));
    Ok(())
}

/// The form with every value that is a placeholder of a captured (or any) handle valid for
/// this agent and host replaced by its secret; `None` when it holds none. A placeholder of
/// another agent, host or an expired one is refused.
#[expect(
    clippy::type_complexity,
    reason = "a form and the secrets written into it"
)]
fn swap_form(
    broker: &PolicyAuthorizer,
    facts: &RequestFacts<'_>,
    body: &[u8],
) -> Result<
    Option<(Zeroizing<Vec<u8>>, Vec<(String, Zeroizing<Vec<u8>>)>)>,
    crate::proxy::DenialReason,
> {
    let mut out = Zeroizing::new(Vec::with_capacity(body.len()));
    let mut used = Vec::new();
    for (i, pair) in body.split(|b| *b == b'&').enumerate() {
        if i > 0 {
            out.push(b'&');
        }
        let (key, value) = match pair.iter().position(|b| *b == b'=') {
            Some(at) => (&pair[..at], &pair[at + 1..]),
            None => (pair, &b""[..]),
        };
        let decoded = Zeroizing::new(percent::decode(value, Plus::Space));
        let record = match std::str::from_utf8(&decoded) {
            Ok(text) if text.len() >= 16 => broker
                .vault
                .handle_by_token_hash(&TokenHash::of(text))
                .map_err(|e| {
                    crate::proxy::DenialReason::Rule(format!(
                        "cannot read handles: {}",
                        error_chain(&e)
                    ))
                })?,
            _ => None,
        };
        let Some(record) = record else {
            out.extend_from_slice(pair);
            continue;
        };
        handle::check(&record, &facts.origin.cgroup, facts.host, SystemTime::now())
            .map_err(|d| crate::proxy::DenialReason::Handle(Box::new(d)))?;
        let secret = broker.secret(&record.binding.secret).ok_or_else(|| {
            crate::proxy::DenialReason::Rule(format!(
                "the secret of handle {} is gone",
                record.id.as_str()
            ))
        })?;
        out.extend_from_slice(key);
        out.push(b'=');
        percent::encode_into(secret.expose(), &mut out, percent::HexCase::Upper);
        used.push((
            record.binding.secret.as_str().to_string(),
            Zeroizing::new(secret.expose().to_vec()),
        ));
    }
    Ok((!used.is_empty()).then_some((out, used)))
}

/// Keeps each token of a token answer in the vault and puts a placeholder (a handle of its
/// shape, or a `brk_` one) in its place. A body that is not a JSON object is passed on as it
/// is (an error answer carries no tokens).
fn keep_tokens(
    vault: &Arc<Vault>,
    cgroup: &CgroupPath,
    (use_at, endpoint): (&str, &str),
    body: &[u8],
) -> Result<Bytes, String> {
    let Ok(serde_json::Value::Object(mut answer)) = serde_json::from_slice(body) else {
        return Ok(Bytes::from(body.to_vec()));
    };
    let lifetime = answer
        .get("expires_in")
        .and_then(|v| {
            v.as_u64()
                .or_else(|| v.as_str().and_then(|s| s.parse().ok()))
        })
        .map_or(ACCESS_TTL, |s| {
            Duration::from_secs(s.clamp(60, 30 * 24 * 3600) + 60)
        });
    let mut kept = 0;
    for field in TOKEN_FIELDS {
        let Some(serde_json::Value::String(real)) = answer.get(field) else {
            continue;
        };
        let real = Zeroizing::new(real.clone());
        let (host, ttl) = if field == "access_token" {
            (use_at, lifetime)
        } else {
            (endpoint, REFRESH_TTL)
        };
        let placeholder = keep_one(vault, cgroup, host, ttl, &real)?;
        answer.insert(
            field.to_string(),
            serde_json::Value::String(placeholder.to_string()),
        );
        kept += 1;
    }
    if kept > 0 {
        info!(cgroup = %cgroup, tokens = kept, endpoint, "captured the tokens of an OAuth answer; the agent got placeholders");
    }
    serde_json::to_vec(&serde_json::Value::Object(answer))
        .map(Bytes::from)
        .map_err(|e| e.to_string())
}

/// Stores `real` as a secret of its own and mints a handle for it; returns the handle's token.
fn keep_one(
    vault: &Vault,
    cgroup: &CgroupPath,
    host: &str,
    ttl: Duration,
    real: &str,
) -> Result<Zeroizing<String>, String> {
    let value = SecretValue::from_string(real.to_string())
        .map_err(|e| format!("a token cannot be kept: {e}"))?;
    let mut id = [0u8; 8];
    getrandom::fill(&mut id).map_err(|e| e.to_string())?;
    let name = SecretName::new(format!("captured.{}", data_encoding::HEXLOWER.encode(&id)))
        .map_err(|e| e.to_string())?;
    let shape = TokenShape::of_secret(value.expose()).ok();
    vault
        .set(&name, value)
        .map_err(|e| format!("cannot store a captured token: {}", error_chain(&e)))?;
    let binding = HandleBinding::new(cgroup.clone(), name, host).map_err(|e| e.to_string())?;
    let now = SystemTime::now();
    let (token, record) = match shape {
        Some(shape) => handle::mint_shaped(now, ttl, binding, shape),
        None => handle::mint(now, ttl, binding),
    }
    .map_err(|e| e.to_string())?;
    vault
        .put_handle(&record)
        .map_err(|e| format!("cannot store a placeholder: {}", error_chain(&e)))?;
    Ok(Zeroizing::new(token.expose().to_string()))
}
