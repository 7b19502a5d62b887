//! What the proxy records: the audit event of a connection or request, started when it
//! arrives and completed when its outcome is known (for a forwarded request, when the response
//! body ends or the agent goes away).

use std::sync::{
    Arc,
    atomic::{AtomicU64, Ordering},
};

use agent_broker_core::time::now_unix_ms;
use agent_broker_protocol::{AuditEvent, Decision, EventKind, Side};
use http::{Request, Response};
use http_body_util::combinators::UnsyncBoxBody;

use super::{
    Completion, Grant,
    body::{AgentBody, Observed},
    exchange::Failure,
};
use crate::{audit::EventSink, capture::ConnectionOrigin};

/// An event with the fields every event about a connection carries.
pub(super) fn connection_event(origin: &ConnectionOrigin, sni: Option<&str>) -> AuditEvent {
    AuditEvent {
        time_ms: now_unix_ms(),
        cgroup: Some(origin.cgroup.to_string()),
        pid: Some(origin.pid),
        comm: Some(origin.comm.clone()),
        exe: origin.exe.clone(),
        original_dst: Some(origin.original_dst),
        sni: sni.map(str::to_string),
        ..AuditEvent::default()
    }
}

/// The event of one request as it arrives. The query may hold a handle or other credentials:
/// it is never recorded.
pub(super) fn request_event<B>(
    origin: &ConnectionOrigin,
    sni: Option<&str>,
    req: &Request<B>,
) -> AuditEvent {
    AuditEvent {
        method: Some(req.method().to_string()),
        path: Some(req.uri().path().to_string()),
        ..connection_event(origin, sni)
    }
}

/// Completes the event of a request that was refused or failed.
pub(super) fn failed(event: &mut AuditEvent, failure: Failure, grant: Option<Grant>) {
    event.kind = Some(failure.kind);
    // An upstream failure was allowed; the broker or the agent's request refused it.
    event.decision = Some(if failure.side == Side::Upstream {
        Decision::Allow
    } else {
        Decision::Deny
    });
    event.reason = Some(failure.reason);
    event.rule = failure.rule;
    event.side = Some(failure.side);
    if let Some(grant) = grant {
        event.secrets = grant.secrets;
    }
}

/// Records a forwarded request's event, and runs the grant's completion callback, once its
/// response body has ended or been dropped, with the bytes that went each way; a body the
/// upstream cut short is recorded as the upstream's failure, with why.
pub(super) fn when_done(
    response: Response<AgentBody>,
    mut event: AuditEvent,
    grant: Grant,
    bytes_in: Arc<AtomicU64>,
    events: Arc<dyn EventSink>,
) -> Response<AgentBody> {
    event.kind = Some(EventKind::Request);
    event.decision = Some(Decision::Allow);
    event.rule = Some(grant.rule);
    event.secrets = grant.secrets;
    let on_complete = grant.on_complete;
    let (parts, body) = response.into_parts();
    let done = Box::new(move |bytes_out, body, cut: Option<String>| {
        let completion = Completion {
            bytes_in: bytes_in.load(Ordering::Relaxed),
            bytes_out,
            body,
        };
        event.bytes_in = completion.bytes_in;
        event.bytes_out = completion.bytes_out;
        if let Some(cut) = cut {
            // The agent got what came before, and a stream it can tell was cut.
            event.reason = Some(cut);
            event.side = Some(Side::Upstream);
        }
        // Debug level: every brokered request is an audit record already (`brokerctl logs`),
        // and a log line per request costs a write(2).
        tracing::debug!(
            cgroup = event.cgroup.as_deref().unwrap_or(""),
            pid = event.pid.unwrap_or(0),
            comm = event.comm.as_deref().unwrap_or(""),
            host = event.host.as_deref().unwrap_or(""),
            method = event.method.as_deref().unwrap_or(""),
            path = event.path.as_deref().unwrap_or(""),
            status = event.status.unwrap_or(0),
            rule = event.rule.as_deref().unwrap_or(""),
            secrets = %event.secrets.join(","),
            latency_us = event.latency_us.unwrap_or(0),
            bytes_in = event.bytes_in,
            bytes_out = event.bytes_out,
            "request"
        );
        if let Some(f) = on_complete {
            f(&completion);
        }
        events.record(event);
    });
    let observed = Observed::new(body, grant.capture_body, done);
    Response::from_parts(parts, UnsyncBoxBody::new(observed))
}
