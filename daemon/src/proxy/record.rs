//! What the proxy records: the audit event of a connection or request, started when it
//! arrives and completed when its outcome is known. A forwarded request is recorded twice, with
//! one request id: as forwarded before it goes upstream, and how it ended (see [`InFlight`]):
//! when the response body ends or the agent goes away, or for an upgraded connection when it
//! ends. A response that quoted a secret value says so in its record's reason.

use std::{
    sync::{
        Arc, OnceLock,
        atomic::{AtomicU64, Ordering},
    },
    time::Instant,
};

use agent_broker_core::{
    policy::{UsageMeter, UsageReading},
    time::now_unix_ms,
};
use agent_broker_protocol::{AuditEvent, Decision, EventKind, RequestOutcome, Side};
use http::{Request, Response, StatusCode};
use http_body_util::combinators::UnsyncBoxBody;

use super::{
    Completion, Grant,
    authorizer::OnComplete,
    body::{AgentBody, AgentFault, End, Ended, Observed},
    exchange::Failure,
    tunnel::Tunnel,
};
use crate::{audit::EventSink, capture::ConnectionOrigin};

/// An event with the fields every event about a connection carries.
pub(super) fn connection_event(origin: &ConnectionOrigin, sni: Option<&str>) -> AuditEvent {
    AuditEvent {
        time_ms: now_unix_ms(),
        cgroup: Some(origin.cgroup.to_string()),
        cgroup_path: origin.cgroup_path.as_ref().map(ToString::to_string),
        pod: origin.pod.clone(),
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

/// A request on its way upstream, and the guard that records how it ends.
///
/// [`InFlight::start`] records the request as `forwarded` before it is written upstream, so a
/// request that left brokerd with a credential is in the audit log within the writer's crash
/// window whatever happens next. How it ends is recorded exactly once, with the same request
/// id: by [`InFlight::fail`] (the upstream failed), when the response body ends, is cut or is
/// dropped ([`InFlight::answered`]), or, when the guard itself is dropped first, as cancelled:
/// hyper drops the exchange when the agent closes its connection (HTTP/1.1) or resets its
/// stream (HTTP/2) before the response head. The grant's completion callback (budgets) runs
/// then too, so a cancelled request is charged as well.
pub(super) struct InFlight(Option<Pending>);

struct Pending {
    event: AuditEvent,
    started: Instant,
    bytes_in: Arc<AtomicU64>,
    meter_usage: bool,
    on_complete: Option<OnComplete>,
    events: Arc<dyn EventSink>,
    /// Secret values replaced in what the agent got.
    redactions: Arc<AtomicU64>,
    /// Set when the agent's request body failed: a stream cut after that is the agent's doing.
    agent_fault: Option<Arc<AgentFault>>,
}

/// How a forwarded request ended, for its record.
struct Ending {
    outcome: RequestOutcome,
    status: Option<u16>,
    bytes_out: u64,
    usage: Option<UsageReading>,
    reason: Option<String>,
    /// Which side cut an upgraded connection, when one did.
    side: Option<Side>,
}

impl InFlight {
    /// Records `event` (the request as it arrived, for `host`, allowed by `grant`) as
    /// forwarded, and returns the guard that records how it ends. Takes the grant's completion
    /// callback.
    pub(super) fn start(
        event: &AuditEvent,
        host: &str,
        grant: &mut Grant,
        bytes_in: Arc<AtomicU64>,
        events: Arc<dyn EventSink>,
        started: Instant,
    ) -> Self {
        let event = AuditEvent {
            kind: Some(EventKind::Request),
            decision: Some(Decision::Allow),
            host: Some(host.to_string()).filter(|h| !h.is_empty()),
            rule: Some(grant.rule.clone()),
            secrets: grant.secrets.clone(),
            request_id: Some(next_request_id()),
            ..event.clone()
        };
        events.record(AuditEvent {
            outcome: Some(RequestOutcome::Forwarded),
            ..event.clone()
        });
        Self(Some(Pending {
            event,
            started,
            bytes_in,
            meter_usage: grant.meter_usage,
            on_complete: grant.on_complete.take(),
            events,
            redactions: Arc::default(),
            agent_fault: None,
        }))
    }

    /// Watches the request body going upstream: when it fails, what fails after it (the
    /// response stream) is recorded as the agent's failure, not the upstream's.
    pub(super) fn watch_agent_body(&mut self, fault: Arc<AgentFault>) {
        if let Some(pending) = self.0.as_mut() {
            pending.agent_fault = Some(fault);
        }
    }

    /// Counts the secret values the scrubber replaces into `redactions`, for the record.
    pub(super) fn redactions(&self) -> Arc<AtomicU64> {
        self.0
            .as_ref()
            .map_or_else(Arc::default, |p| p.redactions.clone())
    }

    /// Relays an upgraded connection and records how it ended, with the bytes both ways.
    pub(super) async fn after_tunnel(mut self, tunnel: Tunnel) {
        let end = tunnel.run().await;
        if let Some(pending) = self.0.take() {
            pending.bytes_in.fetch_add(end.bytes_in, Ordering::Relaxed);
            let (outcome, reason, side) = match end.cut {
                Some((why, side)) => (RequestOutcome::Failed, Some(why), Some(side)),
                None => (RequestOutcome::Completed, None, None),
            };
            pending.end(Ending {
                outcome,
                status: Some(101),
                bytes_out: end.bytes_out,
                usage: None,
                reason,
                side,
            });
        }
    }

    /// Records the request's failure, `side`'s doing: the upstream could not be reached, sent
    /// no answer in time, or answered what cannot be passed on, or the agent's request body
    /// failed; the agent got `status` with `reason`.
    pub(super) fn fail(mut self, status: StatusCode, reason: String, side: Side) {
        if let Some(pending) = self.0.take() {
            let usage = pending.meter_usage.then(|| UsageMeter::new().finish(false));
            pending.end(Ending {
                outcome: RequestOutcome::Failed,
                status: Some(status.as_u16()),
                bytes_out: 0,
                usage,
                reason: Some(reason),
                side: Some(side),
            });
        }
    }

    /// Records that brokerd refused to write the request upstream after all (the failure's
    /// kind, reason and rule; the agent got `status`): nothing left brokerd.
    pub(super) fn refuse(mut self, status: StatusCode, failure: super::exchange::Failure) {
        if let Some(mut pending) = self.0.take() {
            pending.event.kind = Some(failure.kind);
            pending.event.decision = Some(Decision::Deny);
            if failure.rule.is_some() {
                pending.event.rule = failure.rule;
            }
            // Nothing was sent: there is nothing to charge.
            pending.on_complete = None;
            pending.meter_usage = false;
            pending.end(Ending {
                outcome: RequestOutcome::Failed,
                status: Some(status.as_u16()),
                bytes_out: 0,
                usage: None,
                reason: Some(failure.reason),
                side: None,
            });
        }
    }

    /// Hands the record to `response`'s body: it is completed when the body ends, is cut or is
    /// dropped. `bodyless`: the response has no body (to HEAD, or 1xx, 204, 304).
    pub(super) fn answered(
        mut self,
        response: Response<AgentBody>,
        bodyless: bool,
    ) -> Response<AgentBody> {
        let Some(mut pending) = self.0.take() else {
            return response;
        };
        let status = response.status().as_u16();
        pending.event.latency_us = Some(pending.started.elapsed().as_micros() as u64);
        let meter = pending.meter_usage;
        let (parts, body) = response.into_parts();
        let done = Box::new(move |ended: Ended| {
            let agent_fault = pending
                .agent_fault
                .as_ref()
                .and_then(|f| f.get().map(str::to_string));
            let mut side = None;
            let (outcome, reason) = match ended.end {
                End::Completed => (RequestOutcome::Completed, None),
                End::Cut(why) => match agent_fault {
                    Some(fault) => {
                        side = Some(Side::Agent);
                        (RequestOutcome::Failed, Some(format!("{fault}; then {why}")))
                    }
                    None => (RequestOutcome::Failed, Some(why)),
                },
                End::Dropped => (
                    RequestOutcome::Cancelled,
                    Some(
                        "the agent went away before the response ended (closed its connection \
                         or reset its stream)"
                            .to_string(),
                    ),
                ),
            };
            pending.end(Ending {
                outcome,
                status: Some(status),
                bytes_out: ended.bytes_out,
                usage: ended.usage,
                reason,
                side,
            });
        });
        let observed = Observed::new(body, meter, bodyless, done);
        Response::from_parts(parts, UnsyncBoxBody::new(observed))
    }
}

impl Drop for InFlight {
    fn drop(&mut self) {
        if let Some(pending) = self.0.take() {
            let usage = pending.meter_usage.then(|| UsageMeter::new().finish(false));
            pending.end(Ending {
                outcome: RequestOutcome::Cancelled,
                status: None,
                bytes_out: 0,
                usage,
                reason: Some(
                    "the agent went away before the upstream answered (closed its connection or \
                     reset its stream); the upstream may still have acted on the request"
                        .into(),
                ),
                side: None,
            });
        }
    }
}

impl Pending {
    /// Runs the completion callback and records how the request ended.
    fn end(self, ending: Ending) {
        let mut event = self.event;
        let completion = Completion {
            bytes_in: self.bytes_in.load(Ordering::Relaxed),
            bytes_out: ending.bytes_out,
            usage: ending.usage,
        };
        event.bytes_in = completion.bytes_in;
        event.bytes_out = completion.bytes_out;
        event.status = ending.status;
        event.latency_us = event
            .latency_us
            .or_else(|| Some(self.started.elapsed().as_micros() as u64));
        event.outcome = Some(ending.outcome);
        if event.decision == Some(Decision::Deny) {
            event.side = Some(Side::Broker);
        } else if ending.outcome == RequestOutcome::Failed {
            event.side = Some(Side::Upstream);
        } else if ending.outcome == RequestOutcome::Cancelled {
            event.side = Some(Side::Agent);
        }
        if let Some(side) = ending.side {
            event.side = Some(side);
        }
        let redactions = self.redactions.load(Ordering::Relaxed);
        let scrubbed = (redactions > 0).then(|| {
            format!(
                "the response quoted a secret value of the agent's policy {redactions} time{}; \
                 brokerd replaced it before it reached the agent",
                if redactions == 1 { "" } else { "s" }
            )
        });
        event.reason = match (ending.reason, scrubbed) {
            (Some(reason), Some(scrubbed)) => Some(format!("{reason}; {scrubbed}")),
            (reason, scrubbed) => reason.or(scrubbed),
        };
        if let Some(f) = self.on_complete {
            let charge = f(&completion);
            event.tokens = charge.tokens;
            event.tokens_estimated = charge.estimated;
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
            outcome = %ending.outcome,
            rule = event.rule.as_deref().unwrap_or(""),
            secrets = %event.secrets.join(","),
            latency_us = event.latency_us.unwrap_or(0),
            bytes_in = event.bytes_in,
            bytes_out = event.bytes_out,
            "request"
        );
        self.events.record(event);
    }
}

/// A new request id: random at start (so ids do not repeat across brokerd's runs) and counted
/// up from there, below 2^53 so every JSON reader keeps it exact.
fn next_request_id() -> u64 {
    static NEXT: OnceLock<AtomicU64> = OnceLock::new();
    NEXT.get_or_init(|| {
        let mut seed = [0u8; 8];
        let start = match getrandom::fill(&mut seed) {
            Ok(()) => u64::from_le_bytes(seed) >> 12,
            Err(_) => now_unix_ms() << 10,
        };
        AtomicU64::new(start & ((1 << 53) - 1))
    })
    .fetch_add(1, Ordering::Relaxed)
}
