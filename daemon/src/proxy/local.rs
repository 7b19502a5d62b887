//! A name brokerd serves itself ([`LocalService`]): its requests never go upstream. TLS is
//! terminated with a leaf from the broker CA as for any host; the proxy reads the request
//! (bounded), hands it to the service with the connection's kernel origin, and records the call
//! like any other request, with the service's name as its rule.
//!
//! A connection belongs to the service when its server name (SNI, or `Host` over plain HTTP)
//! is the service's name, or when the agent dialed the service's address. At that address
//! nothing but the service is served: a request there for another name is refused, never
//! forwarded, so the name cannot be used to reach anything else, and no policy rule is needed
//! or consulted for it.

use std::{future::Future, net::IpAddr, pin::Pin, time::Instant};

use agent_broker_protocol::{Decision, EventKind, Side};
use bytes::Bytes;
use http::{Request, Response, StatusCode, request::Parts};
use http_body_util::{BodyExt as _, Full};
use hyper::body::Incoming;

use super::{
    Proxy,
    body::AgentBody,
    record,
    reply::{error_body, json_response},
    serve::Conn,
};
use crate::capture::ConnectionOrigin;

/// Longest request body a local service is given; a longer one is answered 413.
pub const MAX_LOCAL_BODY: usize = 64 * 1024;

/// What a local service answered, and how the call is recorded.
pub struct LocalAnswer {
    pub response: Response<Bytes>,
    /// `Some(why)`: the service refused the call (recorded as a denial with this reason).
    pub refused: Option<String>,
    /// What the call did, for the record of an answered call (`tools/call explain`).
    pub note: Option<String>,
}

impl LocalAnswer {
    /// An answered call.
    pub fn answered(response: Response<Bytes>, note: Option<String>) -> Self {
        Self {
            response,
            refused: None,
            note,
        }
    }
}

/// A service brokerd answers itself under a reserved name. Identity is `origin`, the kernel's
/// attribution of the connection; a service must never take it from the request.
pub trait LocalService: Send + Sync + 'static {
    /// The reserved name, lowercase.
    fn name(&self) -> &str;

    /// The address brokerd's DNS gives agents for the name. The agent's connect to it is
    /// redirected to brokerd like every other, so it is never dialed; a connection to it is
    /// for this service only.
    fn address(&self) -> IpAddr;

    /// Answers one request, its body read whole.
    fn serve<'a>(
        &'a self,
        origin: &'a ConnectionOrigin,
        request: Request<Bytes>,
    ) -> Pin<Box<dyn Future<Output = LocalAnswer> + Send + 'a>>;
}

impl Proxy {
    /// Whether a connection is the local service's before any request is read: its SNI is the
    /// service's name or the agent dialed the service's address. A tcp rule never splices it.
    pub(super) fn is_local_connection(&self, origin: &ConnectionOrigin, sni: Option<&str>) -> bool {
        self.local.as_ref().is_some_and(|local| {
            sni == Some(local.name()) || origin.original_dst.ip() == local.address()
        })
    }

    /// `Some` when the request is the local service's (see the module doc): the service's
    /// answer, or the refusal of another name at its address.
    pub(super) async fn serve_local(
        &self,
        parts: &Parts,
        body: &mut Option<Incoming>,
        host: &str,
        conn: &Conn,
    ) -> Option<Response<AgentBody>> {
        let local = self.local.as_ref()?;
        let at_address = conn.origin.original_dst.ip() == local.address();
        let for_name = host == local.name();
        if !for_name && !at_address {
            return None;
        }
        let started = Instant::now();
        let mut event = record::connection_event(&conn.origin, conn.sni.as_deref());
        event.method = Some(parts.method.to_string());
        // Never the query: it may carry what the agent asked about.
        event.path = Some(parts.uri.path().to_string());
        event.host = Some(host.to_string());
        event.rule = Some(local.name().to_string());
        let (status, response, refused, note) = if !for_name {
            let reason = format!(
                "{} is the address of {}, which brokerd serves itself; it serves nothing else \
                 (asked for {host})",
                local.address(),
                local.name()
            );
            let status = StatusCode::FORBIDDEN;
            let body = error_body("denied by agent-broker", &reason, None, &conn.origin);
            (status, json_response(status, &body), Some(reason), None)
        } else {
            let read = match body.take() {
                Some(incoming) => http_body_util::Limited::new(incoming, MAX_LOCAL_BODY)
                    .collect()
                    .await
                    .map(|c| c.to_bytes()),
                None => Ok(Bytes::new()),
            };
            match read {
                Ok(bytes) => {
                    event.bytes_in = bytes.len() as u64;
                    let request = Request::from_parts(parts.clone(), bytes);
                    let answer = local.serve(&conn.origin, request).await;
                    let (head, bytes) = answer.response.into_parts();
                    event.bytes_out = bytes.len() as u64;
                    let response = Response::from_parts(
                        head,
                        Full::new(bytes)
                            .map_err(|never| match never {})
                            .boxed_unsync(),
                    );
                    (response.status(), response, answer.refused, answer.note)
                }
                Err(e) => {
                    let reason = format!(
                        "a request to {} has at most {MAX_LOCAL_BODY} bytes of body: {e}",
                        local.name()
                    );
                    let status = StatusCode::PAYLOAD_TOO_LARGE;
                    let body = error_body("denied by agent-broker", &reason, None, &conn.origin);
                    (status, json_response(status, &body), Some(reason), None)
                }
            }
        };
        event.status = Some(status.as_u16());
        event.latency_us = Some(started.elapsed().as_micros() as u64);
        match refused {
            Some(reason) => {
                event.kind = Some(EventKind::Denial);
                event.decision = Some(Decision::Deny);
                event.side = Some(Side::Agent);
                event.reason = Some(reason);
            }
            None => {
                event.kind = Some(EventKind::Request);
                event.decision = Some(Decision::Allow);
                event.reason = note;
            }
        }
        self.events.record(event);
        Some(response)
    }
}
