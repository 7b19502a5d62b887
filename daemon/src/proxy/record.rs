//! What the proxy records: the audit event of a connection or request, started when it
//! arrives and completed when its outcome is known (for a forwarded request, when the response
//! body ends or the agent goes away; for an upgraded one, when the connection ends). A
//! response that quoted a secret value says so in its record's reason.

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
    tunnel::Tunnel,
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

/// What completing a forwarded request's record needs.
pub(super) struct Done {
    pub(super) event: AuditEvent,
    pub(super) grant: Grant,
    /// Request body bytes the agent sent.
    pub(super) bytes_in: Arc<AtomicU64>,
    /// Secret values replaced in what the agent got.
    pub(super) redactions: Arc<AtomicU64>,
    pub(super) events: Arc<dyn EventSink>,
}

impl Done {
    /// Completes the event with the bytes each way and why the exchange ended early, if it did,
    /// runs the grant's completion callback and records the event.
    fn complete(
        self,
        (bytes_in, bytes_out): (u64, u64),
        body: Vec<u8>,
        cut: Option<(String, Side)>,
    ) {
        let Done {
            mut event,
            grant,
            redactions,
            events,
            ..
        } = self;
        event.kind = Some(EventKind::Request);
        event.decision = Some(Decision::Allow);
        event.rule = Some(grant.rule);
        event.secrets = grant.secrets;
        let completion = Completion {
            bytes_in,
            bytes_out,
            body,
        };
        event.bytes_in = completion.bytes_in;
        event.bytes_out = completion.bytes_out;
        let redactions = redactions.load(Ordering::Relaxed);
        let scrubbed = (redactions > 0).then(|| {
            format!(
                "the response quoted a secret value of the agent's policy {redactions} time{}; \
                 brokerd replaced it before it reached the agent",
                if redactions == 1 { "" } else { "s" }
            )
        });
        // The agent got what came before, and a stream it can tell was cut.
        event.reason = match (cut.as_ref(), scrubbed) {
            (Some((cut, _)), Some(scrubbed)) => Some(format!("{cut}; {scrubbed}")),
            (Some((cut, _)), None) => Some(cut.clone()),
            (None, scrubbed) => scrubbed,
        };
        event.side = cut.map(|(_, side)| side);
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
        if let Some(f) = grant.on_complete {
            f(&completion);
        }
        events.record(event);
    }
}

/// Records a forwarded request's event, and runs the grant's completion callback, once its
/// response body has ended or been dropped, with the bytes that went each way; a body the
/// upstream cut short is recorded as the upstream's failure, with why.
pub(super) fn when_done(response: Response<AgentBody>, done: Done) -> Response<AgentBody> {
    let capture = done.grant.capture_body;
    let bytes_in = done.bytes_in.clone();
    let (parts, body) = response.into_parts();
    let finish = Box::new(move |bytes_out, body, cut: Option<String>| {
        let bytes_in = bytes_in.load(Ordering::Relaxed);
        done.complete(
            (bytes_in, bytes_out),
            body,
            cut.map(|c| (c, Side::Upstream)),
        );
    });
    let observed = Observed::new(body, capture, finish);
    Response::from_parts(parts, UnsyncBoxBody::new(observed))
}

/// Relays an upgraded connection to its end, then records the request's event with the bytes
/// that went each way after the upgrade (plus the request body), and why it was cut, if it was.
pub(super) async fn after_tunnel(done: Done, tunnel: Tunnel) {
    let end = tunnel.run().await;
    let bytes_in = done.bytes_in.load(Ordering::Relaxed) + end.bytes_in;
    done.complete((bytes_in, end.bytes_out), Vec::new(), end.cut);
}
