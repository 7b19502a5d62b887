//! One HTTP request through the broker: check its shape and host, ask the authorizer, forward
//! it upstream, and turn the answer (or the failure) into the response the agent gets, with
//! its audit record.

use crate::metrics::{self, DenialKind};
use std::{
    sync::{
        Arc,
        atomic::{AtomicU64, Ordering},
    },
    time::{Duration, Instant},
};

use agent_broker_core::fmt::error_chain;
use agent_broker_protocol::{AuditEvent, EventKind, Side};
use http::{Method, Request, Response, StatusCode, header, request::Parts};
use http_body_util::{BodyExt as _, combinators::UnsyncBoxBody};
use hyper::{body::Incoming, ext::ReasonPhrase};
use tracing::{info, warn};

use super::{
    Denial, DenialReason, Grant, Proxy, RequestFacts,
    body::{
        AgentBody, AgentFault, BodyError, Counted, Transformed, Watched, scrub_headers,
        scrubbed_body,
    },
    decode::{Coding, Decoded, Limits as DecodeLimits},
    http::{
        Refusal, check_request_shape, prepare_upstream, request_host, strip_hop_by_hop,
        strip_request_hop_by_hop,
    },
    record::{self, InFlight},
    reply::{deny, error_body, json_response},
    scrub::Needles,
    serve::Conn,
    tunnel::Tunnel,
    upstream::{Partition, Protocols},
};
use crate::capture::ConnectionOrigin;

impl Proxy {
    /// Serves one request: forwards it (or refuses it) and records its outcome. A forwarded
    /// request is recorded as such before it goes upstream, and again when it ends (see
    /// [`InFlight`]).
    pub(super) async fn serve_request(
        &self,
        req: Request<Incoming>,
        conn: &Conn,
    ) -> Response<AgentBody> {
        super::spin::kick();
        let started = Instant::now();
        let mut event = record::request_event(&conn.origin, conn.sni.as_deref(), &req);
        let head_request = req.method() == Method::HEAD;
        let exchange = self.forward(req, conn, &event, started).await;
        super::spin::kick();
        let status = exchange.response.status();
        if let Some(failure) = &exchange.failure {
            info!(
                cgroup = %conn.origin.cgroup,
                pid = conn.origin.pid,
                comm = %conn.origin.comm,
                host = %exchange.host,
                method = event.method.as_deref().unwrap_or(""),
                path = event.path.as_deref().unwrap_or(""),
                status = status.as_u16(),
                reason = %failure.reason,
                "request refused"
            );
        }
        match (exchange.failure, exchange.inflight) {
            (Some(failure), Some(inflight)) if failure.metric.is_none() => {
                inflight.fail(status, failure.reason, failure.side);
                exchange.response
            }
            (Some(failure), Some(inflight)) => {
                let kind = failure.metric;
                metrics::recording_denial(kind, || inflight.refuse(status, failure));
                exchange.response
            }
            (Some(failure), None) => {
                event.host = Some(exchange.host).filter(|h| !h.is_empty());
                event.status = Some(status.as_u16());
                event.latency_us = Some(started.elapsed().as_micros() as u64);
                let kind = failure.metric;
                record::failed(&mut event, failure, exchange.grant);
                metrics::recording_denial(kind, || self.events.record(event));
                exchange.response
            }
            (None, Some(inflight)) => match exchange.tunnel {
                Some(tunnel) => {
                    tokio::spawn(inflight.after_tunnel(tunnel));
                    exchange.response
                }
                None => {
                    let bodyless = head_request
                        || status.is_informational()
                        || status == StatusCode::NO_CONTENT
                        || status == StatusCode::NOT_MODIFIED;
                    inflight.answered(exchange.response, bodyless)
                }
            },
            (None, None) => exchange.response,
        }
    }

    /// Authorizes and forwards one request. A refused request's body is read (up to a bound)
    /// before the refusal is sent: an HTTP/2 stream reset for an unread body makes some
    /// clients (curl) drop the 403 and its reason.
    async fn forward(
        &self,
        req: Request<Incoming>,
        conn: &Conn,
        event: &AuditEvent,
        started: Instant,
    ) -> Exchange {
        let (parts, body) = req.into_parts();
        let mut body = Some(body);
        let exchange = self
            .forward_parts(parts, &mut body, conn, event, started)
            .await;
        if let Some(unread) = body {
            drain(unread).await;
        }
        exchange
    }

    /// [`Proxy::forward`]; takes `body` only when the request goes upstream, and records it as
    /// forwarded (from `event`, the request as it arrived) just before.
    async fn forward_parts(
        &self,
        mut parts: Parts,
        body: &mut Option<Incoming>,
        conn: &Conn,
        event: &AuditEvent,
        started: Instant,
    ) -> Exchange {
        let bytes_in = Arc::new(AtomicU64::new(0));
        if let Err(reason) = check_request_shape(&parts) {
            return Exchange::refused(&conn.origin, String::new(), Denial::from(reason), None);
        }
        // A call that cannot be recorded does not go (when brokerd is set to refuse then).
        if let Err(why) = self.events.writable() {
            let denial = Denial {
                status: StatusCode::SERVICE_UNAVAILABLE,
                retry_after: Some(std::time::Duration::from_secs(5)),
                ..Denial::forbidden(DenialReason::Rule(why))
            };
            return Exchange::refused(&conn.origin, String::new(), denial, None);
        }
        let host = match request_host(&parts, conn) {
            Ok(h) => h,
            Err(reason) => {
                return Exchange::refused(&conn.origin, String::new(), Denial::from(reason), None);
            }
        };
        if let Some(response) = self.serve_local(&parts, body, &host, conn).await {
            return Exchange::local(response, host);
        }
        // Before the policy sees the request, so nothing it checked or the authorizer wrote is
        // removed after the decision.
        let hop = strip_request_hop_by_hop(&mut parts);
        let port = conn.origin.original_dst.port();
        let facts = RequestFacts {
            origin: &conn.origin,
            host: &host,
            port,
            tls: conn.tls,
        };
        // A SigV4-signed request that declares no payload hash (AWS's query and JSON APIs) is
        // signed over its body: it is read first, bounded, for the signature check and the
        // rule's action check, and sent upstream as read.
        let mut read_first: Option<bytes::Bytes> = None;
        if super::reads_body_first(&parts) || self.authorizer.reads_body(&facts, &parts) {
            let Some(inner) = body.take() else {
                let denial = Denial::forbidden(Refusal::BodyConsumed.into());
                return Exchange::refused(&conn.origin, host, denial, None);
            };
            match http_body_util::Limited::new(inner, super::MAX_READ_BODY)
                .collect()
                .await
            {
                Ok(collected) => {
                    let bytes = collected.to_bytes();
                    parts.extensions.insert(super::ReadBody(bytes.clone()));
                    read_first = Some(bytes);
                }
                Err(e) => {
                    let denial = Denial {
                        status: StatusCode::PAYLOAD_TOO_LARGE,
                        ..Denial::forbidden(DenialReason::Rule(format!(
                            "a SigV4-signed request without x-amz-content-sha256 is signed over \
                             its body, which brokerd reads whole, up to {} bytes: {e}",
                            super::MAX_READ_BODY
                        )))
                    };
                    return Exchange::refused(&conn.origin, host, denial, None);
                }
            }
        }
        if let Some(ready) = self.authorizer.prepare(&facts, &parts) {
            match ready.await {
                Ok(Some(approval)) => {
                    parts.extensions.insert(approval);
                }
                Ok(None) => {}
                Err(denial) => return Exchange::refused(&conn.origin, host, denial, None),
            }
        }
        let mut grant = match self.authorizer.authorize(&facts, &mut parts) {
            Ok(g) => g,
            Err(denial) => return Exchange::refused(&conn.origin, host, denial, None),
        };
        if let Some(bind) = &grant.bind_name
            && let Err(reason) = self.names.check(&conn.origin, &bind.name, bind.why).await
        {
            let denial = Denial {
                rule: Some(grant.rule.clone()),
                ..Denial::forbidden(DenialReason::Rule(reason))
            };
            return Exchange::refused(&conn.origin, host, denial, Some(grant));
        }
        // Last: the rule's limits, so a request refused above used none of them up.
        if let Some(admit) = grant.admit.take()
            && let Err(denial) = admit(&mut grant)
        {
            return Exchange::refused(&conn.origin, host, denial, Some(grant));
        }
        // Every secret of the agent's policy, and any other this request carries (a handle's).
        let needles = match grant.scrub.with_extra(&grant.needles) {
            Ok(n) => n,
            Err(e) => {
                let denial = Denial {
                    rule: Some(grant.rule.clone()),
                    ..Denial::forbidden(DenialReason::Rule(error_chain(&e)))
                };
                return Exchange::refused(&conn.origin, host, denial, Some(grant));
            }
        };
        let scrubbing = !needles.is_empty();
        let agent_upgrade = if hop.upgrade {
            parts.extensions.remove::<hyper::upgrade::OnUpgrade>()
        } else {
            None
        };
        if let Err(reason) = prepare_upstream(&mut parts, (&host, port), conn.tls, scrubbing, hop) {
            return Exchange::refused(&conn.origin, host, Denial::from(reason), Some(grant));
        }
        // The authorizer may have rewritten the body it read (placeholders swapped).
        let read_first = match parts.extensions.remove::<super::ReadBody>() {
            Some(body) if read_first.is_some() => {
                parts.headers.remove(header::CONTENT_LENGTH);
                Some(body.0)
            }
            _ => read_first,
        };
        let fault = Arc::new(AgentFault::default());
        let upstream_body = match read_first {
            Some(bytes) => {
                bytes_in.store(bytes.len() as u64, std::sync::atomic::Ordering::Relaxed);
                http_body_util::Full::new(bytes)
                    .map_err(|never: std::convert::Infallible| match never {})
                    .boxed_unsync()
            }
            None => {
                let Some(inner) = body.take() else {
                    let denial = Denial::forbidden(Refusal::BodyConsumed.into());
                    return Exchange::refused(&conn.origin, host, denial, Some(grant));
                };
                // The agent's body pauses no longer than the upstream's may.
                let idle = grant.idle_timeout.unwrap_or(self.deadlines.body_idle);
                UnsyncBoxBody::new(Counted::new(inner, bytes_in.clone(), idle, fault.clone()))
            }
        };
        let upstream_body = match grant.body_transform.take() {
            Some(transform) => UnsyncBoxBody::new(Transformed::new(upstream_body, transform)),
            None => upstream_body,
        };
        if grant.meter_usage || grant.capture.is_some() {
            // The usage is read as the body streams, a token answer whole: neither may come
            // compressed.
            parts.headers.insert(
                header::ACCEPT_ENCODING,
                http::HeaderValue::from_static("identity"),
            );
        }
        let upstream_req = Request::from_parts(parts, upstream_body);
        let protocols = if hop.upgrade {
            Protocols::Http1Only
        } else {
            Protocols::Any
        };
        let credentialed = !grant.needles.is_empty();
        // Connections are pooled per agent and credential: one an upstream authenticated for a
        // credential never carries another agent's requests, nor this agent's without it.
        let partition = Partition::new(conn.origin.cgroup.as_str(), &grant.secrets);
        let mut inflight = InFlight::start(
            event,
            &host,
            &mut grant,
            bytes_in,
            self.events.clone(),
            started,
        );
        inflight.watch_agent_body(fault.clone());
        let sent = self.upstream.request(
            conn.origin.original_dst,
            protocols,
            credentialed,
            partition,
            upstream_req,
        );
        let head = self.deadlines.response_head;
        let sent_at = Instant::now();
        let mut response = match tokio::time::timeout(head, sent).await {
            Ok(Ok(r)) => {
                crate::metrics::global()
                    .upstream_latency(conn.origin.cgroup.as_str(), sent_at.elapsed());
                r
            }
            Ok(Err(e)) if e.is_refusal() => {
                // The credential would go to a listener that may be an agent's: refused, and
                // the request never sent.
                let reason = format!("{host}: {e}");
                warn!(cgroup = %conn.origin.cgroup, %reason, "request refused");
                let denial = Denial {
                    rule: Some(grant.rule.clone()),
                    ..Denial::forbidden(DenialReason::Rule(reason))
                };
                return Exchange::refused_in_flight(&conn.origin, host, denial, inflight);
            }
            Ok(Err(_)) if fault.get().is_some() => {
                // The agent's body failed (reset, cut, stalled): the upstream request was cut
                // for it, and the fault is the agent's.
                let why = fault.get().unwrap_or_default();
                let reason = format!("request to {host} cut: {why}");
                info!(cgroup = %conn.origin.cgroup, %reason, "agent request body failed");
                let body = error_body("request body failed", &reason, None, &conn.origin);
                return Exchange::agent_failed(
                    StatusCode::BAD_REQUEST,
                    body,
                    reason,
                    host,
                    inflight,
                );
            }
            Ok(Err(e)) => {
                let reason = format!(
                    "upstream {host} ({}) failed: {}",
                    conn.origin.original_dst,
                    error_chain(&e)
                );
                warn!(cgroup = %conn.origin.cgroup, %reason, "upstream failure");
                let body = error_body("upstream failed", &reason, None, &conn.origin);
                let status = StatusCode::BAD_GATEWAY;
                return Exchange::upstream_failed(status, body, reason, host, inflight);
            }
            Err(_) => {
                let reason = format!(
                    "upstream {host} ({}) sent no response within {}s",
                    conn.origin.original_dst,
                    head.as_secs()
                );
                warn!(cgroup = %conn.origin.cgroup, %reason, "upstream timeout");
                let body = error_body("upstream timed out", &reason, None, &conn.origin);
                let status = StatusCode::GATEWAY_TIMEOUT;
                return Exchange::upstream_failed(status, body, reason, host, inflight);
            }
        };
        if response.status() == StatusCode::UNAUTHORIZED && !grant.secrets.is_empty() {
            self.authorizer.rejected(&grant);
        }
        let switching = response.status() == StatusCode::SWITCHING_PROTOCOLS;
        let upstream_upgrade = match agent_upgrade {
            Some(agent) if switching => Some((agent, hyper::upgrade::on(&mut response))),
            _ => None,
        };
        let (mut resp_parts, resp_body) = response.into_parts();
        // We asked for identity, but CDNs compress anyway: a known coding is decoded so the
        // scrubber reads the plain body; anything else could carry the secret past it. Read
        // before the hop-by-hop headers go: `Transfer-Encoding: gzip, chunked` is a coding too.
        let coding = if scrubbing {
            Coding::of(&resp_parts.headers)
        } else {
            Ok(None)
        };
        let withheld = match (&coding, &upstream_upgrade) {
            (Err(refusal), _) => Some(refusal.to_string()),
            (Ok(_), Some(_)) if scrubbing => upgrade_refusal(&resp_parts.headers),
            _ => None,
        };
        if let Some(refusal) = withheld {
            let reason = format!(
                "upstream {host} sent a response that cannot be checked for the credentials \
                 of the agent's policy: {refusal}; it is withheld"
            );
            warn!(cgroup = %conn.origin.cgroup, %reason, "response withheld");
            let body = error_body(
                "response withheld by agent-broker",
                &reason,
                Some(&grant.rule),
                &conn.origin,
            );
            let status = StatusCode::BAD_GATEWAY;
            return Exchange::upstream_failed(status, body, reason, host, inflight);
        }
        strip_hop_by_hop(&mut resp_parts.headers, switching);
        let redactions = inflight.redactions();
        let tunnel = upstream_upgrade.map(|(agent, upstream)| Tunnel {
            agent,
            upstream,
            needles: scrubbing.then(|| needles.clone()),
            meter: grant.meter.take(),
            redactions: redactions.clone(),
        });
        let idle = grant.idle_timeout.unwrap_or(self.deadlines.body_idle);
        let resp_body = Watched::new(resp_body, idle, host.clone());
        // A token endpoint's answer whose tokens brokerd keeps: read whole and rewritten.
        let answer = match grant.capture.take() {
            Some(capture) if resp_parts.status.is_success() => {
                match captured(resp_body, &resp_parts.headers, capture).await {
                    Ok(body) => {
                        resp_parts
                            .headers
                            .insert(header::CONTENT_LENGTH, http::HeaderValue::from(body.len()));
                        Answer::Whole(body)
                    }
                    Err(why) => {
                        let reason = format!(
                            "the token endpoint {host} answered, and its tokens could not be \
                             kept: {why}; the answer is withheld"
                        );
                        warn!(cgroup = %conn.origin.cgroup, %reason, "token answer withheld");
                        let body = error_body(
                            "response withheld by agent-broker",
                            &reason,
                            Some(&grant.rule),
                            &conn.origin,
                        );
                        let status = StatusCode::BAD_GATEWAY;
                        return Exchange::upstream_failed(status, body, reason, host, inflight);
                    }
                }
            }
            _ => Answer::Stream(resp_body),
        };
        let body = if !scrubbing {
            match answer {
                Answer::Whole(bytes) => whole(bytes),
                Answer::Stream(resp_body) => resp_body.boxed_unsync(),
            }
        } else {
            let replaced = scrub_headers(&mut resp_parts.headers, &needles)
                + scrub_reason_phrase(&mut resp_parts.extensions, &needles);
            redactions.fetch_add(replaced, Ordering::Relaxed);
            // The length changes when a value is replaced.
            resp_parts.headers.remove(header::CONTENT_LENGTH);
            match (answer, coding) {
                (Answer::Whole(bytes), _) => {
                    scrubbed_body(whole(bytes), needles.scrubber(), redactions.clone())
                }
                (Answer::Stream(resp_body), Ok(Some(coding))) => {
                    // Forwarded as identity: the coding removed is never re-advertised.
                    resp_parts.headers.remove(header::CONTENT_ENCODING);
                    let decoded = match Decoded::new(resp_body, coding, DecodeLimits::default()) {
                        Ok(mut decoded) => decoded.prime().await.map(|()| decoded),
                        Err(e) => Err(BodyError::Decode(e)),
                    };
                    match decoded {
                        Ok(decoded) => {
                            scrubbed_body(decoded, needles.scrubber(), redactions.clone())
                        }
                        Err(e) => {
                            let reason = format!(
                                "cannot pass on the response of {host}: {}",
                                error_chain(&e)
                            );
                            let body = error_body("upstream failed", &reason, None, &conn.origin);
                            let status = StatusCode::BAD_GATEWAY;
                            return Exchange::upstream_failed(status, body, reason, host, inflight);
                        }
                    }
                }
                (Answer::Stream(resp_body), _) => {
                    scrubbed_body(resp_body, needles.scrubber(), redactions.clone())
                }
            }
        };
        Exchange {
            response: Response::from_parts(resp_parts, body),
            host,
            grant: None,
            inflight: Some(inflight),
            failure: None,
            tunnel,
        }
    }
}

/// A response body as it goes on: streamed from the upstream, or read whole and rewritten.
#[expect(
    clippy::large_enum_variant,
    reason = "one per response, on the stack; boxing the common case would allocate per request"
)]
enum Answer {
    Stream(Watched),
    Whole(bytes::Bytes),
}

fn whole(bytes: bytes::Bytes) -> UnsyncBoxBody<bytes::Bytes, BodyError> {
    http_body_util::Full::new(bytes)
        .map_err(|never: std::convert::Infallible| match never {})
        .boxed_unsync()
}

/// Reads a token endpoint's answer whole (uncompressed, bounded) and has `capture` keep its
/// tokens, off the proxy's threads (it writes the vault).
async fn captured<B>(
    body: B,
    headers: &http::HeaderMap,
    capture: super::Capture,
) -> Result<bytes::Bytes, String>
where
    B: hyper::body::Body<Data = bytes::Bytes, Error = BodyError> + Send,
{
    if let Some(coding) = headers.get(header::CONTENT_ENCODING)
        && !coding.as_bytes().eq_ignore_ascii_case(b"identity")
    {
        return Err(format!(
            "it came compressed ({}) although brokerd asked for identity",
            String::from_utf8_lossy(coding.as_bytes())
        ));
    }
    let bytes = http_body_util::Limited::new(body, super::MAX_CAPTURED_BODY)
        .collect()
        .await
        .map_err(|e| format!("reading it: {e}"))?
        .to_bytes();
    tokio::task::spawn_blocking(move || capture(bytes))
        .await
        .map_err(|e| format!("the capture task failed: {e}"))?
}

/// Why a WebSocket upgrade answered with 101 cannot be relayed with its frames scrubbed: the
/// upstream switched to another protocol, or accepted an extension (`permessage-deflate`
/// compresses frames) that brokerd never offered. `None` when it can.
fn upgrade_refusal(headers: &http::HeaderMap) -> Option<String> {
    let websocket = headers
        .get(header::UPGRADE)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|v| v.trim().eq_ignore_ascii_case("websocket"));
    if !websocket {
        return Some(
            "it switched to a protocol other than WebSocket, whose bytes brokerd cannot scrub"
                .into(),
        );
    }
    let extensions: Vec<String> = headers
        .get_all(header::SEC_WEBSOCKET_EXTENSIONS)
        .iter()
        .map(|v| String::from_utf8_lossy(v.as_bytes()).trim().to_string())
        .filter(|v| !v.is_empty())
        .collect();
    (!extensions.is_empty()).then(|| {
        format!(
            "it accepted the WebSocket extension {:?}, which brokerd did not offer \
             (permessage-deflate would compress the frames brokerd scrubs)",
            extensions.join(", ")
        )
    })
}

/// Replaces needles in an HTTP/1.1 reason phrase (forwarded to HTTP/1.1 agents); one that no
/// longer is a valid reason phrase is dropped (the agent gets the status's canonical one).
fn scrub_reason_phrase(extensions: &mut http::Extensions, needles: &Needles) -> u64 {
    let Some(reason) = extensions.get::<ReasonPhrase>() else {
        return 0;
    };
    let Some(clean) = needles.scrub(reason.as_bytes()) else {
        return 0;
    };
    extensions.remove::<ReasonPhrase>();
    if let Ok(clean) = ReasonPhrase::try_from(clean) {
        extensions.insert(clean);
    }
    1
}

/// One request's result, for [`Proxy::serve_request`].
pub(super) struct Exchange {
    response: Response<AgentBody>,
    host: String,
    /// The grant of a request refused after it was authorized (for the secrets it names).
    grant: Option<Grant>,
    /// Set once the request went upstream: its record is completed from here.
    inflight: Option<InFlight>,
    /// Set when the request was refused or failed.
    failure: Option<Failure>,
    /// An upgraded connection to relay once both sides switched protocols.
    tunnel: Option<Tunnel>,
}

pub(super) struct Failure {
    pub(super) kind: EventKind,
    pub(super) reason: String,
    pub(super) rule: Option<String>,
    pub(super) side: Side,
    /// What the metrics count a refusal as (None for an upstream's failure).
    pub(super) metric: Option<DenialKind>,
}

impl Exchange {
    /// A request the local service answered (it recorded the call itself).
    fn local(response: Response<AgentBody>, host: String) -> Self {
        Self {
            response,
            host,
            grant: None,
            inflight: None,
            failure: None,
            tunnel: None,
        }
    }

    /// A forwarded request whose upstream failed, timed out or answered what cannot be passed
    /// on: `status` (502, 504) with `body`, recorded as the upstream's failure.
    fn upstream_failed(
        status: StatusCode,
        body: serde_json::Value,
        reason: String,
        host: String,
        inflight: InFlight,
    ) -> Self {
        let failure = Failure {
            kind: EventKind::Request,
            reason,
            rule: None,
            side: Side::Upstream,
            metric: None,
        };
        Self {
            response: json_response(status, &body),
            host,
            grant: None,
            inflight: Some(inflight),
            failure: Some(failure),
            tunnel: None,
        }
    }

    /// A forwarded request the agent's own body cut (reset, closed, or stalled past the idle
    /// deadline): `status` (400) with `body`, recorded as the agent's failure.
    fn agent_failed(
        status: StatusCode,
        body: serde_json::Value,
        reason: String,
        host: String,
        inflight: InFlight,
    ) -> Self {
        let failure = Failure {
            kind: EventKind::Request,
            reason,
            rule: None,
            side: Side::Agent,
            metric: None,
        };
        Self {
            response: json_response(status, &body),
            host,
            grant: None,
            inflight: Some(inflight),
            failure: Some(failure),
            tunnel: None,
        }
    }

    /// A request recorded as forwarded that brokerd then refused to write upstream (its
    /// credential would have gone to an agent's listener): its record ends as a denial.
    fn refused_in_flight(
        origin: &ConnectionOrigin,
        host: String,
        denial: Denial,
        inflight: InFlight,
    ) -> Self {
        let failure = Failure {
            kind: denial.event_kind(),
            reason: denial.reason.to_string(),
            rule: denial.rule.clone(),
            side: Side::Broker,
            metric: Some(denial.metric_kind()),
        };
        Self {
            response: deny(origin, denial),
            host,
            grant: None,
            inflight: Some(inflight),
            failure: Some(failure),
            tunnel: None,
        }
    }

    fn refused(
        origin: &ConnectionOrigin,
        host: String,
        denial: Denial,
        grant: Option<Grant>,
    ) -> Self {
        let failure = Failure {
            kind: denial.event_kind(),
            reason: denial.reason.to_string(),
            rule: denial.rule.clone(),
            side: Side::Agent,
            metric: Some(denial.metric_kind()),
        };
        Self {
            response: deny(origin, denial),
            host,
            grant,
            inflight: None,
            failure: Some(failure),
            tunnel: None,
        }
    }
}

/// Reads and discards what is left of a refused request's body: at most [`DRAIN_LIMIT`] bytes,
/// for at most [`DRAIN_TIME`].
async fn drain(mut body: Incoming) {
    let mut read = 0usize;
    let _ = tokio::time::timeout(DRAIN_TIME, async {
        while read < DRAIN_LIMIT {
            match body.frame().await {
                Some(Ok(frame)) => read += frame.data_ref().map_or(0, |d| d.len()),
                _ => break,
            }
        }
    })
    .await;
}

const DRAIN_LIMIT: usize = 64 * 1024;

const DRAIN_TIME: Duration = Duration::from_secs(1);
