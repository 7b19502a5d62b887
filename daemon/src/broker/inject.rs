//! The third step: the rule's credentials, rendered from the vault, are written into the
//! request's headers and query, replacing whatever the agent put there.

use http::{HeaderName, HeaderValue, request::Parts};

use super::{PolicyAuthorizer, request::Allowed};
use agent_broker_core::inject::InjectError;

use crate::credentials::Lookup;
use crate::proxy::{Denial, Grant, RequestFacts};

/// Writes what the rule injects into the request for `host`; the values go into the grant's
/// needles, to be scrubbed from the response.
pub(super) fn write(
    broker: &PolicyAuthorizer,
    facts: &RequestFacts<'_>,
    (parts, allowed): (&mut Parts, &Allowed<'_>),
    grant: &mut Grant,
) -> Result<(), Denial> {
    let host = facts.host;
    if allowed.inject.is_empty() {
        return Ok(());
    }
    let deny = |reason: String| allowed.cannot(reason);
    if !allowed.may_write_secrets {
        return Err(deny(format!(
            "{} is reached over plain HTTP and the rule injects credentials; use https (or set \
             plain_http = true in the rule if this host has no TLS)",
            host
        )));
    }
    if let Some(rule) = allowed.inject.aws_sigv4() {
        super::sigv4::apply(broker, facts, parts, allowed, rule, grant)?;
    }
    if let Some(capture) = allowed.inject.capture_tokens() {
        super::capture::apply(broker, facts, parts, allowed, capture, grant)?;
    }
    let rendered =
        allowed
            .inject
            .render(|name| broker.secret(name))
            .map_err(|e| match not_ready(broker, &e) {
                // A credential whose value brokerd could not fetch: 503, naming why (the agent may
                // try again; the failure is audited once by the credentials).
                Some(why) => Denial {
                    status: http::StatusCode::SERVICE_UNAVAILABLE,
                    retry_after: Some(crate::credentials::RETRY_AFTER),
                    ..allowed.cannot(why)
                },
                None => deny(format!("cannot inject credentials: {e}")),
            })?;
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
    Ok(())
}

/// Why a secret the rendering missed has no value, when it is a credential brokerd fetches.
fn not_ready(broker: &PolicyAuthorizer, error: &InjectError) -> Option<String> {
    let InjectError::MissingSecret { name } = error else {
        return None;
    };
    match broker.credentials.as_ref()?.lookup(name) {
        Lookup::NotReady(why) => Some(why),
        Lookup::Ready(_) | Lookup::Static => None,
    }
}
