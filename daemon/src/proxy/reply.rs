//! brokerd's own replies to the agent: a denial or failure as JSON plain enough for an LLM
//! agent to read and adapt to.

use bytes::Bytes;
use http::{HeaderValue, Response, StatusCode, header};
use http_body_util::{BodyExt as _, Full};

use super::{Denial, body::AgentBody};
use crate::capture::ConnectionOrigin;

/// The JSON body of a denial: plain enough for an LLM agent to adapt.
pub(super) fn error_body(
    error: &str,
    reason: &str,
    rule: Option<&str>,
    origin: &ConnectionOrigin,
) -> serde_json::Value {
    let mut body = serde_json::json!({
        "error": error,
        "reason": reason,
        "agent": origin.cgroup.to_string(),
    });
    if let Some(rule) = rule {
        body["rule"] = serde_json::Value::String(rule.to_string());
    }
    body
}

pub(super) fn deny(origin: &ConnectionOrigin, denial: Denial) -> Response<AgentBody> {
    let mut response = json_response(
        denial.status,
        &error_body(
            "denied by agent-broker",
            &denial.reason.to_string(),
            denial.rule.as_deref(),
            origin,
        ),
    );
    if let Some(after) = denial.retry_after {
        // Whole seconds, rounded up, at least 1.
        let secs = after.as_secs() + u64::from(after.subsec_nanos() > 0);
        if let Ok(v) = HeaderValue::from_str(&secs.max(1).to_string()) {
            response.headers_mut().insert(header::RETRY_AFTER, v);
        }
    }
    response
}

pub(super) fn json_response(status: StatusCode, body: &serde_json::Value) -> Response<AgentBody> {
    let mut bytes = serde_json::to_vec(body).unwrap_or_default();
    bytes.push(b'\n');
    let body = Full::new(Bytes::from(bytes))
        .map_err(|never| match never {})
        .boxed_unsync();
    let mut response = Response::new(body);
    *response.status_mut() = status;
    response.headers_mut().insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("application/json"),
    );
    response
}
