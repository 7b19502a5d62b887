//! The broker's HTTP(S) front: what happens to a captured connection once its origin is known.
//!
//! A TLS ClientHello is answered with a leaf minted for its SNI (or the original IP), and the
//! decrypted HTTP/1.1 or HTTP/2 is served with hyper; plain HTTP goes down the same path without
//! TLS; anything else is closed. Every request is authorized by an [`Authorizer`] (policy,
//! injection, handles), then forwarded to the original destination over verified TLS (see
//! [`crate::upstream`]), and the response is streamed back, scrubbed of any secret value that was
//! injected into the request. Bodies are never buffered whole; WebSocket upgrades are spliced.
//!
//! This module does HTTP mechanics only; it never decides what is allowed.

use agent_broker_core::fmt::error_chain;
use agent_broker_protocol::Decision;
use std::{
    sync::{
        Arc,
        atomic::{AtomicU64, Ordering},
    },
    time::{Duration, Instant, SystemTime, UNIX_EPOCH},
};

use agent_broker_protocol::{AuditEvent, EventKind, Side};

use bytes::Bytes;
use http::{
    HeaderMap, HeaderName, HeaderValue, Request, Response, StatusCode, Uri, header, request::Parts,
};
use http_body_util::{BodyExt as _, Full, combinators::UnsyncBoxBody};
use hyper::body::{Frame, Incoming};
use hyper_util::{
    rt::{TokioExecutor, TokioIo},
    server::conn::auto,
};
use tokio::net::TcpStream;
use tokio_rustls::LazyConfigAcceptor;
use tracing::{info, warn};
use zeroize::Zeroizing;

use crate::{
    capture::ConnectionOrigin,
    scrub::Needles,
    tls::{LeafMinter, LeafName},
    upstream::{PooledBody, Protocols, Upstream, UpstreamBody},
};

/// Deadline for the first bytes of a connection and for the TLS handshake.
const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);

/// Facts about one request that authorization depends on.
#[derive(Debug)]
pub struct RequestFacts<'a> {
    pub origin: &'a ConnectionOrigin,
    /// The host the request is for (SNI, Host and :authority agree on it), lowercase, no port.
    pub host: &'a str,
    /// The original destination port.
    pub port: u16,
    /// Whether the agent spoke TLS to us (and we will to upstream).
    pub tls: bool,
}

/// What authorization granted: the request parts are already rewritten.
#[derive(Default)]
pub struct Grant {
    /// Which rule allowed it (file and index), for logs and audit.
    pub rule: String,
    /// Names of the secrets written into the request (never values).
    pub secrets: Vec<String>,
    /// The secret values written into the request, to scrub from the response.
    pub needles: Vec<Zeroizing<Vec<u8>>>,
    /// Keep up to this many bytes of the response body for [`Grant::on_complete`] (token
    /// budgets read the JSON `usage` of LLM APIs); 0 keeps none.
    pub capture_body: usize,
    /// Called once when the exchange is over (response body finished or dropped).
    pub on_complete: Option<OnComplete>,
}

/// A callback run once when an exchange is over.
pub type OnComplete = Box<dyn FnOnce(&Completion) + Send>;

/// What is known when a brokered exchange is over.
#[derive(Debug, Default)]
pub struct Completion {
    /// Request body bytes the agent sent.
    pub bytes_in: u64,
    /// Response body bytes sent to the agent.
    pub bytes_out: u64,
    /// The start of the response body, up to [`Grant::capture_body`] bytes.
    pub body: Vec<u8>,
}

/// Why a request was refused.
#[derive(Debug)]
pub struct Denial {
    pub status: StatusCode,
    pub reason: String,
    pub rule: Option<String>,
    /// For 429: when to try again.
    pub retry_after: Option<Duration>,
    /// A handle was misused (unknown, expired, revoked, wrong cgroup or host).
    pub handle_misuse: bool,
}

impl Denial {
    pub fn forbidden(reason: impl Into<String>) -> Self {
        Self {
            status: StatusCode::FORBIDDEN,
            reason: reason.into(),
            rule: None,
            retry_after: None,
            handle_misuse: false,
        }
    }
}

/// Where the proxy reports each exchange, denial and failed handshake (the audit log).
pub trait EventSink: Send + Sync + 'static {
    fn record(&self, event: AuditEvent);
}

/// What to do with a connection before any request is read.
pub enum ConnectionVerdict {
    /// Terminate TLS (or read plain HTTP) and decide each request.
    Intercept,
    /// Splice the bytes to the original destination unread (a `tcp = true` rule): no
    /// interception, no injection. `on_done` gets the bytes spliced both ways.
    Splice {
        rule: String,
        on_done: Option<Box<dyn FnOnce(u64) + Send>>,
    },
    /// Close it.
    Refuse(String),
}

/// Decides requests and rewrites them (injection, handle swaps).
pub trait Authorizer: Send + Sync + 'static {
    /// Decides a connection by its destination and, for TLS, the SNI (None before the
    /// ClientHello is seen). Only `Splice` is final before the first bytes are read.
    fn connection(&self, origin: &ConnectionOrigin, sni: Option<&str>) -> ConnectionVerdict;

    /// Authorizes one request; on success the parts carry the injected credentials.
    fn authorize(&self, facts: &RequestFacts<'_>, parts: &mut Parts) -> Result<Grant, Denial>;
}

/// Everything the proxy needs, shared by all connections.
pub struct Proxy {
    pub minter: LeafMinter,
    pub upstream: Upstream,
    pub authorizer: Arc<dyn Authorizer>,
    pub events: Arc<dyn EventSink>,
}

/// What kind of traffic a connection starts with.
#[derive(Debug, PartialEq, Eq)]
pub enum Sniffed {
    Tls,
    Http,
    Other,
}

/// Classifies the first bytes of a connection.
pub fn sniff(first: &[u8]) -> Sniffed {
    match first {
        // TLS record: handshake (22), version major 3.
        [0x16, 0x03, ..] | [0x16] => Sniffed::Tls,
        _ => {
            let token_len = first.iter().take_while(|b| b.is_ascii_uppercase()).count();
            if token_len > 0 && (token_len == first.len() || first[token_len] == b' ') {
                Sniffed::Http
            } else {
                Sniffed::Other
            }
        }
    }
}

/// The SNI of a TLS ClientHello still in the socket's receive queue (peeked, not consumed),
/// when it arrives whole within a short wait.
async fn peek_sni(stream: &TcpStream) -> Option<String> {
    let mut buf = vec![0u8; 16 * 1024];
    for _ in 0..20 {
        let n = stream.peek(&mut buf).await.ok()?;
        let mut acceptor = rustls::server::Acceptor::default();
        let mut slice = &buf[..n];
        if acceptor.read_tls(&mut slice).is_err() {
            return None;
        }
        match acceptor.accept() {
            Ok(Some(accepted)) => {
                return accepted
                    .client_hello()
                    .server_name()
                    .map(|s| s.to_ascii_lowercase());
            }
            // Not all of it has arrived yet.
            Ok(None) if n < buf.len() => tokio::time::sleep(Duration::from_millis(5)).await,
            _ => return None,
        }
    }
    None
}

/// The per-connection context handed to every request.
struct Conn {
    origin: ConnectionOrigin,
    /// SNI, lowercase, when the agent spoke TLS and sent one.
    sni: Option<String>,
    tls: bool,
}

impl Proxy {
    /// Serves one captured connection to completion.
    pub async fn serve(self: Arc<Self>, stream: TcpStream, origin: ConnectionOrigin) {
        let _ = stream.set_nodelay(true);
        // A tcp rule for the destination itself: splice at once (server-first protocols too).
        if let ConnectionVerdict::Splice { rule, on_done } =
            self.authorizer.connection(&origin, None)
        {
            return self.splice(stream, origin, None, rule, on_done).await;
        }
        let mut first = [0u8; 8];
        let n = match tokio::time::timeout(HANDSHAKE_TIMEOUT, stream.peek(&mut first)).await {
            Ok(Ok(n)) => n,
            Ok(Err(e)) => {
                return self.refused_connection(
                    &origin,
                    None,
                    EventKind::Denial,
                    &format!("read failed: {e}"),
                );
            }
            Err(_) => {
                return self.refused_connection(
                    &origin,
                    None,
                    EventKind::Denial,
                    "the agent sent nothing (server-first protocols are not brokered)",
                );
            }
        };
        match sniff(&first[..n]) {
            Sniffed::Tls => {
                let sni = peek_sni(&stream).await;
                if let ConnectionVerdict::Splice { rule, on_done } =
                    self.authorizer.connection(&origin, sni.as_deref())
                {
                    return self.splice(stream, origin, sni, rule, on_done).await;
                }
                self.serve_tls(stream, origin).await
            }
            Sniffed::Http => {
                let conn = Arc::new(Conn {
                    origin,
                    sni: None,
                    tls: false,
                });
                self.serve_http(TokioIo::new(stream), conn).await;
            }
            Sniffed::Other => self.refused_connection(
                &origin,
                None,
                EventKind::Denial,
                "neither TLS nor HTTP, and no tcp rule allows this destination",
            ),
        }
    }

    async fn serve_tls(self: Arc<Self>, stream: TcpStream, origin: ConnectionOrigin) {
        let acceptor = LazyConfigAcceptor::new(rustls::server::Acceptor::default(), stream);
        let start = match tokio::time::timeout(HANDSHAKE_TIMEOUT, acceptor).await {
            Ok(Ok(s)) => s,
            Ok(Err(e)) => {
                let reason = format!("malformed TLS ClientHello: {e}");
                return self.refused_connection(&origin, None, EventKind::TlsFailure, &reason);
            }
            Err(_) => {
                let reason = "TLS ClientHello timed out";
                return self.refused_connection(&origin, None, EventKind::TlsFailure, reason);
            }
        };
        let sni = start
            .client_hello()
            .server_name()
            .map(|s| s.to_ascii_lowercase());
        let leaf = match &sni {
            Some(name) => LeafName::Dns(name.clone()),
            None => LeafName::Ip(origin.original_dst.ip()),
        };
        let config = match self.minter.server_config(&leaf) {
            Ok(c) => c,
            Err(e) => {
                let reason = format!("cannot mint a certificate for {leaf}: {}", error_chain(&e));
                return self.refused_connection(
                    &origin,
                    sni.as_deref(),
                    EventKind::TlsFailure,
                    &reason,
                );
            }
        };
        let tls = match tokio::time::timeout(HANDSHAKE_TIMEOUT, start.into_stream(config)).await {
            Ok(Ok(t)) => t,
            Ok(Err(e)) => {
                // Typically the client does not trust the broker CA (alert unknown_ca): the
                // connection fails; it is never passed through uninspected.
                let reason = format!(
                    "TLS handshake with the agent failed (does it trust the broker CA?): {e}"
                );
                return self.refused_connection(
                    &origin,
                    sni.as_deref(),
                    EventKind::TlsFailure,
                    &reason,
                );
            }
            Err(_) => {
                let reason = "TLS handshake timed out";
                return self.refused_connection(
                    &origin,
                    sni.as_deref(),
                    EventKind::TlsFailure,
                    reason,
                );
            }
        };
        let conn = Arc::new(Conn {
            origin,
            sni,
            tls: true,
        });
        self.serve_http(TokioIo::new(tls), conn).await;
    }

    async fn serve_http<I>(self: Arc<Self>, io: I, conn: Arc<Conn>)
    where
        I: hyper::rt::Read + hyper::rt::Write + Unpin + Send + 'static,
    {
        let proxy = self.clone();
        let service_conn = conn.clone();
        let service = hyper::service::service_fn(move |req| {
            let proxy = proxy.clone();
            let conn = service_conn.clone();
            async move { Ok::<_, std::convert::Infallible>(proxy.handle(req, &conn).await) }
        });
        let builder = auto::Builder::new(TokioExecutor::new());
        if let Err(e) = builder.serve_connection_with_upgrades(io, service).await {
            // Malformed HTTP from the agent ends up here: the connection closes.
            info!(cgroup = %conn.origin.cgroup, pid = conn.origin.pid, error = %e, "agent connection ended with an error");
        }
    }

    async fn handle(&self, req: Request<Incoming>, conn: &Conn) -> Response<UpstreamBody> {
        crate::spin::kick();
        let started = Instant::now();
        let mut event = base_event(&conn.origin, conn.sni.as_deref());
        event.method = Some(req.method().to_string());
        // The query may hold a handle or other credentials: it is never recorded.
        event.path = Some(req.uri().path().to_string());
        let exchange = self.forward(req, conn).await;
        crate::spin::kick();
        event.host = Some(exchange.host.clone()).filter(|h| !h.is_empty());
        event.status = Some(exchange.response.status().as_u16());
        event.latency_us = Some(started.elapsed().as_micros() as u64);
        match exchange.failure {
            Some(failure) => {
                info!(
                    cgroup = %conn.origin.cgroup,
                    pid = conn.origin.pid,
                    comm = %conn.origin.comm,
                    host = %exchange.host,
                    method = event.method.as_deref().unwrap_or(""),
                    path = event.path.as_deref().unwrap_or(""),
                    status = exchange.response.status().as_u16(),
                    reason = %failure.reason,
                    "request refused"
                );
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
                if let Some(grant) = exchange.grant {
                    event.secrets = grant.secrets;
                }
                self.events.record(event);
                exchange.response
            }
            None => {
                let Some(grant) = exchange.grant else {
                    return exchange.response;
                };
                event.kind = Some(EventKind::Request);
                event.decision = Some(Decision::Allow);
                event.rule = Some(grant.rule.clone());
                event.secrets = grant.secrets.clone();
                let events = self.events.clone();
                let bytes_in = exchange.bytes_in;
                let on_complete = grant.on_complete;
                let (parts, body) = exchange.response.into_parts();
                let observed = Observed {
                    inner: body,
                    bytes_out: 0,
                    capture: Vec::new(),
                    capture_limit: grant.capture_body,
                    done: Some(Box::new(move |bytes_out, body| {
                        let completion = Completion {
                            bytes_in: bytes_in.load(Ordering::Relaxed),
                            bytes_out,
                            body,
                        };
                        event.bytes_in = completion.bytes_in;
                        event.bytes_out = completion.bytes_out;
                        // Debug level: every brokered request is an audit record already
                        // (`brokerctl logs`), and a log line per request costs a write(2).
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
                    })),
                };
                Response::from_parts(parts, UnsyncBoxBody::new(observed))
            }
        }
    }

    /// Authorizes and forwards one request. A refused request's body is read (up to a bound)
    /// before the refusal is sent: an HTTP/2 stream reset for an unread body makes some
    /// clients (curl) drop the 403 and its reason.
    async fn forward(&self, req: Request<Incoming>, conn: &Conn) -> Exchange {
        let (parts, body) = req.into_parts();
        let mut body = Some(body);
        let exchange = self.forward_parts(parts, &mut body, conn).await;
        if let Some(unread) = body {
            drain(unread).await;
        }
        exchange
    }

    /// [`Proxy::forward`]; takes `body` only when the request goes upstream.
    async fn forward_parts(
        &self,
        mut parts: Parts,
        body: &mut Option<Incoming>,
        conn: &Conn,
    ) -> Exchange {
        let bytes_in = Arc::new(AtomicU64::new(0));
        if let Err(reason) = check_request_shape(&parts) {
            return Exchange::refused(&conn.origin, String::new(), Denial::forbidden(reason), None);
        }
        let host = match request_host(&parts, conn) {
            Ok(h) => h,
            Err(reason) => {
                return Exchange::refused(
                    &conn.origin,
                    String::new(),
                    Denial::forbidden(reason),
                    None,
                );
            }
        };
        let port = conn.origin.original_dst.port();
        let facts = RequestFacts {
            origin: &conn.origin,
            host: &host,
            port,
            tls: conn.tls,
        };
        let grant = match self.authorizer.authorize(&facts, &mut parts) {
            Ok(g) => g,
            Err(denial) => return Exchange::refused(&conn.origin, host, denial, None),
        };
        let upgrade = is_upgrade(&parts.headers);
        let agent_upgrade = if upgrade {
            parts.extensions.remove::<hyper::upgrade::OnUpgrade>()
        } else {
            None
        };
        if let Err(reason) = prepare_upstream(
            &mut parts,
            &host,
            port,
            conn.tls,
            !grant.needles.is_empty(),
            upgrade,
        ) {
            return Exchange::refused(&conn.origin, host, Denial::forbidden(reason), Some(grant));
        }
        let Some(inner) = body.take() else {
            let denial = Denial::forbidden("the request body was already consumed");
            return Exchange::refused(&conn.origin, host, denial, Some(grant));
        };
        let counted = Counted {
            inner,
            bytes: bytes_in.clone(),
        };
        let upstream_req = Request::from_parts(parts, UnsyncBoxBody::new(counted));
        let protocols = if upgrade {
            Protocols::Http1Only
        } else {
            Protocols::Any
        };
        let mut response = match self
            .upstream
            .request(conn.origin.original_dst, protocols, upstream_req)
            .await
        {
            Ok(r) => r,
            Err(e) => {
                let reason = format!(
                    "upstream {host} ({}) failed: {}",
                    conn.origin.original_dst,
                    error_chain(&e)
                );
                warn!(cgroup = %conn.origin.cgroup, %reason, "upstream failure");
                let response = json_response(
                    StatusCode::BAD_GATEWAY,
                    &error_body("upstream failed", &reason, None, &conn.origin),
                );
                let failure = Failure {
                    kind: EventKind::Request,
                    reason,
                    rule: Some(grant.rule.clone()),
                    side: Side::Upstream,
                };
                return Exchange {
                    response,
                    host,
                    grant: Some(grant),
                    failure: Some(failure),
                    bytes_in,
                };
            }
        };
        if response.status() == StatusCode::SWITCHING_PROTOCOLS
            && let Some(agent_upgrade) = agent_upgrade
        {
            let upstream_upgrade = hyper::upgrade::on(&mut response);
            tokio::spawn(splice_upgrade(agent_upgrade, upstream_upgrade));
        }
        let (mut resp_parts, resp_body) = response.into_parts();
        strip_hop_by_hop(
            &mut resp_parts.headers,
            resp_parts.status == StatusCode::SWITCHING_PROTOCOLS,
        );
        if !grant.needles.is_empty() && is_encoded(&resp_parts.headers) {
            // We asked for identity; a compressed body could carry the secret past the scrubber.
            let reason = format!(
                "upstream {host} sent an encoded (compressed) response to a request carrying a \
                 credential; it cannot be checked for the credential, so it is withheld"
            );
            warn!(cgroup = %conn.origin.cgroup, %reason, "response withheld");
            let body = error_body(
                "response withheld by agent-broker",
                &reason,
                Some(&grant.rule),
                &conn.origin,
            );
            let failure = Failure {
                kind: EventKind::Request,
                reason,
                rule: Some(grant.rule.clone()),
                side: Side::Upstream,
            };
            return Exchange {
                response: json_response(StatusCode::BAD_GATEWAY, &body),
                host,
                grant: Some(grant),
                failure: Some(failure),
                bytes_in,
            };
        }
        let body = if grant.needles.is_empty() {
            resp_body.boxed_unsync()
        } else {
            let needles = Needles::new(grant.needles.clone());
            scrub_headers(&mut resp_parts.headers, &needles);
            // The length changes when a value is replaced.
            resp_parts.headers.remove(header::CONTENT_LENGTH);
            scrubbed_body(resp_body, needles.scrubber())
        };
        Exchange {
            response: Response::from_parts(resp_parts, body),
            host,
            grant: Some(grant),
            failure: None,
            bytes_in,
        }
    }

    /// Splices a connection a tcp rule allows to its original destination, unread.
    async fn splice(
        &self,
        mut agent: TcpStream,
        origin: ConnectionOrigin,
        sni: Option<String>,
        rule: String,
        on_done: Option<Box<dyn FnOnce(u64) + Send>>,
    ) {
        let started = Instant::now();
        let mut event = base_event(&origin, sni.as_deref());
        event.kind = Some(EventKind::Request);
        event.rule = Some(rule);
        let connected =
            tokio::time::timeout(HANDSHAKE_TIMEOUT, TcpStream::connect(origin.original_dst)).await;
        let mut upstream = match connected {
            Ok(Ok(s)) => s,
            Ok(Err(e)) => {
                return self.splice_failed(
                    event,
                    format!("cannot connect to {}: {e}", origin.original_dst),
                );
            }
            Err(_) => {
                return self.splice_failed(
                    event,
                    format!("connecting to {} timed out", origin.original_dst),
                );
            }
        };
        let _ = upstream.set_nodelay(true);
        info!(cgroup = %origin.cgroup, pid = origin.pid, original_dst = %origin.original_dst, "tcp passthrough");
        let (to_upstream, to_agent) = tokio::io::copy_bidirectional(&mut agent, &mut upstream)
            .await
            .unwrap_or((0, 0));
        event.decision = Some(Decision::Allow);
        event.bytes_in = to_upstream;
        event.bytes_out = to_agent;
        event.latency_us = Some(started.elapsed().as_micros() as u64);
        if let Some(done) = on_done {
            done(to_upstream + to_agent);
        }
        self.events.record(event);
    }

    fn splice_failed(&self, mut event: AuditEvent, reason: String) {
        warn!(cgroup = event.cgroup.as_deref().unwrap_or(""), %reason, "tcp passthrough failed");
        event.decision = Some(Decision::Allow);
        event.reason = Some(reason);
        event.side = Some(Side::Upstream);
        self.events.record(event);
    }

    /// Records a connection that never got to HTTP (TLS failure, unknown protocol).
    fn refused_connection(
        &self,
        origin: &ConnectionOrigin,
        sni: Option<&str>,
        kind: EventKind,
        reason: &str,
    ) {
        info!(
            cgroup = %origin.cgroup,
            pid = origin.pid,
            comm = %origin.comm,
            original_dst = %origin.original_dst,
            outcome = "refused",
            reason,
            "connection"
        );
        let mut event = base_event(origin, sni);
        event.kind = Some(kind);
        event.decision = Some(Decision::Deny);
        event.reason = Some(reason.to_string());
        event.side = Some(Side::Agent);
        self.events.record(event);
    }
}

/// One request's result, for [`Proxy::handle`].
struct Exchange {
    response: Response<UpstreamBody>,
    host: String,
    grant: Option<Grant>,
    /// Set when the request was refused or failed.
    failure: Option<Failure>,
    bytes_in: Arc<AtomicU64>,
}

struct Failure {
    kind: EventKind,
    reason: String,
    rule: Option<String>,
    side: Side,
}

impl Exchange {
    fn refused(
        origin: &ConnectionOrigin,
        host: String,
        denial: Denial,
        grant: Option<Grant>,
    ) -> Self {
        let failure = Failure {
            kind: if denial.handle_misuse {
                EventKind::HandleMisuse
            } else {
                EventKind::Denial
            },
            reason: denial.reason.clone(),
            rule: denial.rule.clone(),
            side: Side::Agent,
        };
        Self {
            response: deny(origin, denial),
            host,
            grant,
            failure: Some(failure),
            bytes_in: Arc::new(AtomicU64::new(0)),
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

/// The fields every event about a connection carries.
fn base_event(origin: &ConnectionOrigin, sni: Option<&str>) -> AuditEvent {
    AuditEvent {
        time_ms: SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map(|d| d.as_millis() as u64)
            .unwrap_or(0),
        cgroup: Some(origin.cgroup.to_string()),
        pid: Some(origin.pid),
        comm: Some(origin.comm.clone()),
        exe: origin.exe.clone(),
        original_dst: Some(origin.original_dst),
        sni: sni.map(str::to_string),
        ..AuditEvent::default()
    }
}

/// A request body on its way upstream, counted.
struct Counted {
    inner: Incoming,
    bytes: Arc<AtomicU64>,
}

impl hyper::body::Body for Counted {
    type Data = Bytes;
    type Error = hyper::Error;

    fn poll_frame(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Option<Result<Frame<Bytes>, hyper::Error>>> {
        let polled = std::pin::Pin::new(&mut self.inner).poll_frame(cx);
        if let std::task::Poll::Ready(Some(Ok(frame))) = &polled
            && let Some(data) = frame.data_ref()
        {
            self.bytes.fetch_add(data.len() as u64, Ordering::Relaxed);
        }
        polled
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> hyper::body::SizeHint {
        self.inner.size_hint()
    }
}

/// Called once with the response bytes sent and the captured start of the body.
type Done = Box<dyn FnOnce(u64, Vec<u8>) + Send>;

/// A response body on its way to the agent: counted, optionally captured, and reported once
/// when it ends or is dropped (the agent went away).
struct Observed {
    inner: UpstreamBody,
    bytes_out: u64,
    capture: Vec<u8>,
    capture_limit: usize,
    done: Option<Done>,
}

impl Observed {
    fn finish(&mut self) {
        if let Some(done) = self.done.take() {
            done(self.bytes_out, std::mem::take(&mut self.capture));
        }
    }
}

impl Drop for Observed {
    fn drop(&mut self) {
        self.finish();
    }
}

impl hyper::body::Body for Observed {
    type Data = Bytes;
    type Error = hyper::Error;

    fn poll_frame(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Option<Result<Frame<Bytes>, hyper::Error>>> {
        let polled = std::pin::Pin::new(&mut self.inner).poll_frame(cx);
        match &polled {
            std::task::Poll::Ready(Some(Ok(frame))) => {
                if let Some(data) = frame.data_ref() {
                    self.bytes_out += data.len() as u64;
                    let room = self.capture_limit.saturating_sub(self.capture.len());
                    if room > 0 {
                        let take = room.min(data.len());
                        self.capture.extend_from_slice(&data[..take]);
                    }
                }
            }
            std::task::Poll::Ready(None) | std::task::Poll::Ready(Some(Err(_))) => self.finish(),
            std::task::Poll::Pending => {}
        }
        polled
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> hyper::body::SizeHint {
        self.inner.size_hint()
    }
}

/// The host a request is for, after checking that SNI, Host and :authority agree.
fn request_host(parts: &Parts, conn: &Conn) -> Result<String, String> {
    let authority = parts.uri.authority().map(|a| a.host().to_ascii_lowercase());
    let host_header = match parts.headers.get(header::HOST) {
        Some(v) => Some(
            v.to_str()
                .map_err(|_| "the Host header is not valid text".to_string())?
                .to_ascii_lowercase(),
        ),
        None => None,
    };
    let host_header = host_header.map(|h| strip_port(&h).to_string());
    let host = match (&authority, &host_header) {
        (Some(a), Some(h)) if a != h => {
            return Err(format!(
                "the request names two hosts: :authority {a} and Host {h}"
            ));
        }
        (Some(a), _) => a.clone(),
        (None, Some(h)) => h.clone(),
        (None, None) => return Err("the request names no host (no Host header)".into()),
    };
    let host = host
        .trim_start_matches('[')
        .trim_end_matches(']')
        .to_string();
    if host.is_empty() {
        return Err("the request names an empty host".into());
    }
    if conn.tls {
        let expected = match &conn.sni {
            Some(sni) => sni.clone(),
            None => conn.origin.original_dst.ip().to_string(),
        };
        if host != expected {
            let what = if conn.sni.is_some() {
                "the TLS server name (SNI)"
            } else {
                "the IP address the agent connected to (no SNI was sent)"
            };
            return Err(format!(
                "the request is for host {host} but {what} is {expected}; they must agree"
            ));
        }
    }
    Ok(host)
}

/// Refuses request forms that would tunnel past per-request decisions or reflect headers: a
/// CONNECT tunnel, TRACE (echoes the request, credentials included), and upgrades to anything
/// but WebSocket (`h2c` would switch protocols under the proxy).
fn check_request_shape(parts: &Parts) -> Result<(), String> {
    if parts.method == http::Method::CONNECT {
        return Err("CONNECT tunnels are not brokered; make the request directly".into());
    }
    if parts.method == http::Method::TRACE {
        return Err("TRACE is not allowed through the broker".into());
    }
    if let Some(upgrade) = parts.headers.get(header::UPGRADE) {
        let websocket = upgrade
            .to_str()
            .is_ok_and(|u| u.trim().eq_ignore_ascii_case("websocket"));
        if !websocket {
            return Err("only WebSocket upgrades are brokered".into());
        }
    }
    Ok(())
}

fn strip_port(host: &str) -> &str {
    if let Some(rest) = host.strip_prefix('[') {
        // [v6]:port
        return rest.split(']').next().unwrap_or(rest);
    }
    match host.rsplit_once(':') {
        Some((h, p)) if !h.contains(':') && p.chars().all(|c| c.is_ascii_digit()) => h,
        _ => host,
    }
}

fn is_upgrade(headers: &HeaderMap) -> bool {
    headers.contains_key(header::UPGRADE)
        && headers.get_all(header::CONNECTION).iter().any(|v| {
            v.to_str().is_ok_and(|s| {
                s.split(',')
                    .any(|t| t.trim().eq_ignore_ascii_case("upgrade"))
            })
        })
}

/// Headers that belong to one hop and are never forwarded.
const HOP_BY_HOP: [&str; 8] = [
    "connection",
    "keep-alive",
    "proxy-connection",
    "proxy-authenticate",
    "proxy-authorization",
    "te",
    "trailer",
    "transfer-encoding",
];

fn strip_hop_by_hop(headers: &mut HeaderMap, keep_upgrade: bool) {
    // Most messages carry none of these: one pass over the names decides, without a lookup
    // (and a name parse) per hop-by-hop header.
    const KEEP_ALIVE: HeaderName = HeaderName::from_static("keep-alive");
    const PROXY_CONNECTION: HeaderName = HeaderName::from_static("proxy-connection");
    let any = headers.keys().any(|name| {
        // Standard names compare as enum tags; only the two custom ones compare bytes.
        *name == header::CONNECTION
            || *name == header::UPGRADE
            || *name == header::TE
            || *name == header::TRAILER
            || *name == header::TRANSFER_ENCODING
            || *name == header::PROXY_AUTHENTICATE
            || *name == header::PROXY_AUTHORIZATION
            || *name == KEEP_ALIVE
            || *name == PROXY_CONNECTION
    });
    if !any {
        return;
    }
    // Headers named in Connection are hop-by-hop too.
    let named: Vec<HeaderName> = headers
        .get_all(header::CONNECTION)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|s| {
            s.split(',')
                .map(|t| t.trim().to_ascii_lowercase())
                .collect::<Vec<_>>()
        })
        .filter(|t| !(keep_upgrade && t == "upgrade"))
        .filter_map(|t| HeaderName::from_bytes(t.as_bytes()).ok())
        .collect();
    for name in named {
        headers.remove(name);
    }
    for name in HOP_BY_HOP {
        if keep_upgrade && name == "connection" {
            continue;
        }
        headers.remove(name);
    }
    if !keep_upgrade {
        headers.remove(header::UPGRADE);
    }
}

/// Turns the agent's request into the upstream request: absolute URI for the pool, Host set,
/// hop-by-hop headers removed.
fn prepare_upstream(
    parts: &mut Parts,
    host: &str,
    port: u16,
    tls: bool,
    injected: bool,
    upgrade: bool,
) -> Result<(), String> {
    let scheme = if tls { "https" } else { "http" };
    let default_port = if tls { 443 } else { 80 };
    let host_for_uri = if host.contains(':') {
        format!("[{host}]")
    } else {
        host.to_string()
    };
    let authority = if port == default_port {
        host_for_uri
    } else {
        format!("{host_for_uri}:{port}")
    };
    let path_and_query = parts
        .uri
        .path_and_query()
        .map(|p| p.as_str())
        .unwrap_or("/");
    parts.uri = Uri::builder()
        .scheme(scheme)
        .authority(authority.as_str())
        .path_and_query(path_and_query)
        .build()
        .map_err(|e| format!("cannot build the upstream URI: {e}"))?;
    strip_hop_by_hop(&mut parts.headers, upgrade);
    if upgrade {
        parts
            .headers
            .insert(header::CONNECTION, HeaderValue::from_static("upgrade"));
    }
    // The host travels in the URI's authority: the pooled client writes it as `Host` on an
    // HTTP/1.1 connection and as `:authority` on HTTP/2, where a `Host` header as well would be
    // a duplicate that servers such as nginx refuse.
    parts.headers.remove(header::HOST);
    if injected {
        // A compressed echo of an injected secret could not be scrubbed.
        parts.headers.insert(
            header::ACCEPT_ENCODING,
            HeaderValue::from_static("identity"),
        );
    }
    // The upstream protocol is negotiated by ALPN; the pool converts as needed.
    parts.version = http::Version::HTTP_11;
    Ok(())
}

/// Whether a response body carries a content coding other than identity.
fn is_encoded(headers: &HeaderMap) -> bool {
    headers.get_all(header::CONTENT_ENCODING).iter().any(|v| {
        v.to_str()
            .map(|s| {
                s.split(',')
                    .any(|c| !c.trim().is_empty() && !c.trim().eq_ignore_ascii_case("identity"))
            })
            .unwrap_or(true)
    })
}

fn scrub_headers(headers: &mut HeaderMap, needles: &Needles) {
    for value in headers.values_mut() {
        if let Some(clean) = needles.scrub_header_value(value.as_bytes()) {
            match HeaderValue::from_bytes(&clean) {
                Ok(v) => *value = v,
                // Never let a header that held a secret through unscrubbed.
                Err(_) => *value = HeaderValue::from_static("[redacted by agent-broker]"),
            }
        }
    }
}

fn scrubbed_body(body: PooledBody, scrubber: crate::scrub::Scrubber) -> UpstreamBody {
    UnsyncBoxBody::new(Scrubbed {
        inner: body,
        scrubber: Some(scrubber),
        pending: None,
    })
}

/// A response body with every injected secret replaced as it streams (see [`crate::scrub`]).
struct Scrubbed {
    inner: PooledBody,
    /// While data may still come; taken when the data ends (trailers, end or error), after
    /// which anything left passes through.
    scrubber: Option<crate::scrub::Scrubber>,
    /// Trailers waiting for the held-back tail to go first.
    pending: Option<Frame<Bytes>>,
}

impl Scrubbed {
    /// Ends scrubbing (the data is over) and returns the held-back tail, scrubbed.
    fn finish_scrubbing(&mut self) -> Vec<u8> {
        self.scrubber
            .take()
            .map(crate::scrub::Scrubber::finish)
            .unwrap_or_default()
    }
}

impl hyper::body::Body for Scrubbed {
    type Data = Bytes;
    type Error = hyper::Error;

    fn poll_frame(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Option<Result<Frame<Bytes>, hyper::Error>>> {
        use std::task::Poll;
        let this = &mut *self;
        if let Some(frame) = this.pending.take() {
            return Poll::Ready(Some(Ok(frame)));
        }
        loop {
            let Some(active) = this.scrubber.as_mut() else {
                return std::pin::Pin::new(&mut this.inner).poll_frame(cx);
            };
            let frame = match std::pin::Pin::new(&mut this.inner).poll_frame(cx) {
                Poll::Pending => return Poll::Pending,
                Poll::Ready(frame) => frame,
            };
            match frame {
                Some(Ok(frame)) => match frame.into_data() {
                    Ok(data) => {
                        let out = active.push(&data);
                        if !out.is_empty() {
                            return Poll::Ready(Some(Ok(Frame::data(Bytes::from(out)))));
                        }
                        // All of it held back (it may be the start of a secret): read on.
                    }
                    Err(trailers) => {
                        // Flush what is held back before the trailers.
                        let rest = this.finish_scrubbing();
                        if rest.is_empty() {
                            return Poll::Ready(Some(Ok(trailers)));
                        }
                        this.pending = Some(trailers);
                        return Poll::Ready(Some(Ok(Frame::data(Bytes::from(rest)))));
                    }
                },
                Some(Err(e)) => {
                    this.scrubber = None;
                    return Poll::Ready(Some(Err(e)));
                }
                None => {
                    let rest = this.finish_scrubbing();
                    if rest.is_empty() {
                        return Poll::Ready(None);
                    }
                    return Poll::Ready(Some(Ok(Frame::data(Bytes::from(rest)))));
                }
            }
        }
    }

    fn is_end_stream(&self) -> bool {
        self.pending.is_none() && self.scrubber.is_none() && self.inner.is_end_stream()
    }
}

async fn splice_upgrade(agent: hyper::upgrade::OnUpgrade, upstream: hyper::upgrade::OnUpgrade) {
    let (agent, upstream) = match tokio::try_join!(agent, upstream) {
        Ok(pair) => pair,
        Err(e) => {
            info!(error = %e, "upgrade failed");
            return;
        }
    };
    let mut agent = TokioIo::new(agent);
    let mut upstream = TokioIo::new(upstream);
    let _ = tokio::io::copy_bidirectional(&mut agent, &mut upstream).await;
}

/// The JSON body of a denial: plain enough for an LLM agent to adapt.
fn error_body(
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

fn deny(origin: &ConnectionOrigin, denial: Denial) -> Response<UpstreamBody> {
    let mut response = json_response(
        denial.status,
        &error_body(
            "denied by agent-broker",
            &denial.reason,
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

fn json_response(status: StatusCode, body: &serde_json::Value) -> Response<UpstreamBody> {
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sniffs_tls_http_and_other() {
        assert_eq!(sniff(&[0x16, 0x03, 0x01, 0, 0]), Sniffed::Tls);
        assert_eq!(sniff(b"GET / HT"), Sniffed::Http);
        assert_eq!(sniff(b"POST /x "), Sniffed::Http);
        assert_eq!(sniff(b"SSH-2.0-"), Sniffed::Other);
        assert_eq!(sniff(b"\x00\x01"), Sniffed::Other);
        assert_eq!(sniff(b"get / "), Sniffed::Other);
    }

    #[test]
    fn content_codings_other_than_identity_are_encoded() {
        let mut h = HeaderMap::new();
        assert!(!is_encoded(&h));
        h.insert(
            header::CONTENT_ENCODING,
            HeaderValue::from_static("identity"),
        );
        assert!(!is_encoded(&h));
        h.insert(header::CONTENT_ENCODING, HeaderValue::from_static("gzip"));
        assert!(is_encoded(&h));
        h.insert(
            header::CONTENT_ENCODING,
            HeaderValue::from_static("identity, br"),
        );
        assert!(is_encoded(&h));
    }

    #[test]
    fn connect_trace_and_h2c_are_refused() {
        let parts = |method: &str, upgrade: Option<&str>| {
            let mut b = Request::builder().method(method).uri("/");
            if let Some(u) = upgrade {
                b = b
                    .header(header::UPGRADE, u)
                    .header(header::CONNECTION, "upgrade");
            }
            b.body(()).expect("request").into_parts().0
        };
        assert!(check_request_shape(&parts("CONNECT", None)).is_err());
        assert!(check_request_shape(&parts("TRACE", None)).is_err());
        assert!(check_request_shape(&parts("GET", Some("h2c"))).is_err());
        assert!(check_request_shape(&parts("GET", Some("websocket"))).is_ok());
        assert!(check_request_shape(&parts("POST", None)).is_ok());
    }

    #[test]
    fn every_hop_by_hop_header_is_stripped_alone() {
        for name in HOP_BY_HOP.iter().chain(&["upgrade"]) {
            let mut h = HeaderMap::new();
            h.insert(HeaderName::from_static(name), HeaderValue::from_static("x"));
            h.insert(header::CONTENT_TYPE, HeaderValue::from_static("text/plain"));
            strip_hop_by_hop(&mut h, false);
            assert!(!h.contains_key(*name), "{name} was forwarded");
            assert!(h.contains_key(header::CONTENT_TYPE));
        }
        // Names listed in Connection go too; an upgrade keeps its Upgrade and Connection.
        let mut h = HeaderMap::new();
        h.insert(
            header::CONNECTION,
            HeaderValue::from_static("x-hop, upgrade"),
        );
        h.insert("x-hop", HeaderValue::from_static("1"));
        h.insert(header::UPGRADE, HeaderValue::from_static("websocket"));
        strip_hop_by_hop(&mut h, true);
        assert!(!h.contains_key("x-hop"));
        assert!(h.contains_key(header::UPGRADE) && h.contains_key(header::CONNECTION));
    }

    #[test]
    fn ports_are_stripped_from_host_headers() {
        assert_eq!(strip_port("api.example.test:8443"), "api.example.test");
        assert_eq!(strip_port("api.example.test"), "api.example.test");
        assert_eq!(strip_port("[::1]:443"), "::1");
        assert_eq!(strip_port("127.0.0.2:80"), "127.0.0.2");
    }
}
