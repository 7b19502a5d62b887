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

use std::{
    sync::Arc,
    time::{Duration, Instant},
};

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
    upstream::{Protocols, Upstream, UpstreamBody},
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
}

/// Why a request was refused.
#[derive(Debug)]
pub struct Denial {
    pub status: StatusCode,
    pub reason: String,
    pub rule: Option<String>,
}

impl Denial {
    pub fn forbidden(reason: impl Into<String>) -> Self {
        Self {
            status: StatusCode::FORBIDDEN,
            reason: reason.into(),
            rule: None,
        }
    }
}

/// Decides requests and rewrites them (injection, handle swaps).
pub trait Authorizer: Send + Sync + 'static {
    /// Authorizes one request; on success the parts carry the injected credentials.
    fn authorize(&self, facts: &RequestFacts<'_>, parts: &mut Parts) -> Result<Grant, Denial>;
}

/// Everything the proxy needs, shared by all connections.
pub struct Proxy {
    pub minter: LeafMinter,
    pub upstream: Upstream,
    pub authorizer: Arc<dyn Authorizer>,
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
        let mut first = [0u8; 8];
        let n = match tokio::time::timeout(HANDSHAKE_TIMEOUT, stream.peek(&mut first)).await {
            Ok(Ok(n)) => n,
            Ok(Err(e)) => return log_refused(&origin, &format!("read failed: {e}")),
            Err(_) => {
                return log_refused(
                    &origin,
                    "the agent sent nothing (server-first protocols are not brokered)",
                );
            }
        };
        match sniff(&first[..n]) {
            Sniffed::Tls => self.serve_tls(stream, origin).await,
            Sniffed::Http => {
                let conn = Arc::new(Conn {
                    origin,
                    sni: None,
                    tls: false,
                });
                self.serve_http(TokioIo::new(stream), conn).await;
            }
            Sniffed::Other => log_refused(
                &origin,
                "neither TLS nor HTTP (TCP passthrough is not enabled)",
            ),
        }
    }

    async fn serve_tls(self: Arc<Self>, stream: TcpStream, origin: ConnectionOrigin) {
        let acceptor = LazyConfigAcceptor::new(rustls::server::Acceptor::default(), stream);
        let start = match tokio::time::timeout(HANDSHAKE_TIMEOUT, acceptor).await {
            Ok(Ok(s)) => s,
            Ok(Err(e)) => return log_refused(&origin, &format!("malformed TLS ClientHello: {e}")),
            Err(_) => return log_refused(&origin, "TLS ClientHello timed out"),
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
                return log_refused(
                    &origin,
                    &format!(
                        "cannot mint a certificate for {leaf}: {}",
                        crate::error_chain(&e)
                    ),
                );
            }
        };
        let tls = match tokio::time::timeout(HANDSHAKE_TIMEOUT, start.into_stream(config)).await {
            Ok(Ok(t)) => t,
            Ok(Err(e)) => {
                // Typically the client does not trust the broker CA (alert unknown_ca): the
                // connection fails; it is never passed through uninspected.
                return log_refused(
                    &origin,
                    &format!(
                        "TLS handshake with the agent failed (does it trust the broker CA?): {e}"
                    ),
                );
            }
            Err(_) => return log_refused(&origin, "TLS handshake timed out"),
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
        let started = Instant::now();
        let method = req.method().clone();
        let path = req.uri().path().to_string();
        let (response, host, grant) = self.forward(req, conn).await;
        let status = response.status();
        let (rule, secrets) = match &grant {
            Some(g) => (g.rule.as_str(), g.secrets.join(",")),
            None => ("", String::new()),
        };
        info!(
            cgroup = %conn.origin.cgroup,
            pid = conn.origin.pid,
            comm = %conn.origin.comm,
            original_dst = %conn.origin.original_dst,
            host = %host,
            %method,
            path = %path,
            status = status.as_u16(),
            rule,
            secrets = %secrets,
            latency_us = started.elapsed().as_micros() as u64,
            "request"
        );
        response
    }

    /// Authorizes and forwards one request. Returns the response, the host, and the grant.
    async fn forward(
        &self,
        req: Request<Incoming>,
        conn: &Conn,
    ) -> (Response<UpstreamBody>, String, Option<Grant>) {
        let (mut parts, body) = req.into_parts();
        let host = match request_host(&parts, conn) {
            Ok(h) => h,
            Err(reason) => {
                return (
                    deny(&conn.origin, Denial::forbidden(reason)),
                    String::new(),
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
            Err(denial) => return (deny(&conn.origin, denial), host, None),
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
            return (deny(&conn.origin, Denial::forbidden(reason)), host, None);
        }
        let upstream_req = Request::from_parts(parts, body.boxed_unsync());
        let protocols = if upgrade {
            Protocols::Http1Only
        } else {
            Protocols::Any
        };
        let client = self.upstream.client(conn.origin.original_dst, protocols);
        let mut response = match client.request(upstream_req).await {
            Ok(r) => r,
            Err(e) => {
                let reason = format!(
                    "upstream {host} ({}) failed: {}",
                    conn.origin.original_dst,
                    crate::error_chain(&e)
                );
                warn!(cgroup = %conn.origin.cgroup, %reason, "upstream failure");
                return (
                    json_response(
                        StatusCode::BAD_GATEWAY,
                        &error_body("upstream failed", &reason, None, &conn.origin),
                    ),
                    host,
                    Some(grant),
                );
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
            return (
                json_response(StatusCode::BAD_GATEWAY, &body),
                host,
                Some(grant),
            );
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
        (Response::from_parts(resp_parts, body), host, Some(grant))
    }
}

fn log_refused(origin: &ConnectionOrigin, reason: &str) {
    info!(
        cgroup = %origin.cgroup,
        pid = origin.pid,
        comm = %origin.comm,
        original_dst = %origin.original_dst,
        outcome = "refused",
        reason,
        "connection"
    );
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
    parts.headers.insert(
        header::HOST,
        HeaderValue::from_str(&authority).map_err(|e| format!("invalid host {authority}: {e}"))?,
    );
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

fn scrubbed_body(body: Incoming, scrubber: crate::scrub::Scrubber) -> UpstreamBody {
    use futures_util::StreamExt as _;
    /// The body, the scrubber while data may still come, and a frame waiting its turn.
    type State = (
        Incoming,
        Option<crate::scrub::Scrubber>,
        Option<Frame<Bytes>>,
    );
    let state: State = (body, Some(scrubber), None);
    let stream =
        futures_util::stream::unfold(state, |(mut body, mut scrubber, pending)| async move {
            if let Some(frame) = pending {
                return Some((Ok(frame), (body, scrubber, None)));
            }
            loop {
                let Some(active) = scrubber.as_mut() else {
                    // Data is over (trailers were sent); pass anything left through.
                    return body.frame().await.map(|f| (f, (body, None, None)));
                };
                match body.frame().await {
                    Some(Ok(frame)) => match frame.into_data() {
                        Ok(data) => {
                            let out = active.push(&data);
                            if !out.is_empty() {
                                let out = Frame::data(Bytes::from(out.to_vec()));
                                return Some((Ok(out), (body, scrubber, None)));
                            }
                        }
                        Err(trailers) => {
                            // Flush what is held back before the trailers.
                            let rest = scrubber
                                .take()
                                .map(crate::scrub::Scrubber::finish)
                                .unwrap_or_default();
                            if rest.is_empty() {
                                return Some((Ok(trailers), (body, None, None)));
                            }
                            let rest = Frame::data(Bytes::from(rest.to_vec()));
                            return Some((Ok(rest), (body, None, Some(trailers))));
                        }
                    },
                    Some(Err(e)) => return Some((Err(e), (body, None, None))),
                    None => {
                        let rest = scrubber
                            .take()
                            .map(crate::scrub::Scrubber::finish)
                            .unwrap_or_default();
                        if rest.is_empty() {
                            return None;
                        }
                        return Some((
                            Ok(Frame::data(Bytes::from(rest.to_vec()))),
                            (body, None, None),
                        ));
                    }
                }
            }
        });
    UnsyncBoxBody::new(http_body_util::StreamBody::new(stream.boxed()))
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
    info!(cgroup = %origin.cgroup, pid = origin.pid, reason = %denial.reason, "request denied");
    json_response(
        denial.status,
        &error_body(
            "denied by agent-broker",
            &denial.reason,
            denial.rule.as_deref(),
            origin,
        ),
    )
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
    fn ports_are_stripped_from_host_headers() {
        assert_eq!(strip_port("api.example.test:8443"), "api.example.test");
        assert_eq!(strip_port("api.example.test"), "api.example.test");
        assert_eq!(strip_port("[::1]:443"), "::1");
        assert_eq!(strip_port("127.0.0.2:80"), "127.0.0.2");
    }
}
