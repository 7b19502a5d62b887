//! Upstream connections: pooled HTTP clients that always dial the agent's original destination
//! and verify the server's certificate for the request's host.
//!
//! The host name used for SNI and certificate verification comes from the request URI (which
//! the proxy builds from the agreed SNI/Host), while the TCP connection always goes to the
//! original destination address the agent dialed: brokerd never resolves a name to pick where to
//! connect, so an agent cannot make it connect somewhere it did not. Verification uses the system roots plus
//! any `--upstream-ca` files; there is no way to turn it off.
//!
//! Plain HTTP proves nothing about the server, and an agent may listen on loopback: while a
//! local service is down, an agent can take its address and port. So before a request carrying
//! a credential goes out over plain HTTP, brokerd asks the kernel whose socket answered its
//! connection ([`ListenerCheck`]) and refuses when it is an agent's (a socket created in a tagged
//! cgroup): the credential never reaches an agent's listener. Such connections are pooled apart
//! from the others, so a connection checked once is the only kind a credential rides on.

use std::{
    cell::RefCell,
    collections::{HashMap, HashSet},
    net::SocketAddr,
    path::{Path, PathBuf},
    pin::Pin,
    sync::Arc,
    task::{Context, Poll},
    time::{Duration, Instant},
};

use bytes::Bytes;
use http::{HeaderValue, Method, Request, Response, Uri, Version, header, uri::PathAndQuery};
use http_body_util::{BodyExt as _, combinators::UnsyncBoxBody};
use hyper::{
    body::{Body, Frame, Incoming, SizeHint},
    client::conn::{http1, http2},
};
use hyper_util::rt::{TokioExecutor, TokioIo};
use rustls::{
    ClientConfig, RootCertStore,
    pki_types::{CertificateDer, ServerName},
};
use tokio::{net::TcpStream, sync::Notify};
use tokio_rustls::TlsConnector;
use tracing::{debug, warn};

use crate::capture::ListenerOwner;

/// Request bodies sent upstream.
pub type UpstreamBody = UnsyncBoxBody<Bytes, super::body::RequestBodyError>;

/// How long an idle pooled upstream connection is kept.
const POOL_IDLE: Duration = Duration::from_secs(90);
/// How often a proxy thread's pool closes connections idle for longer than [`POOL_IDLE`].
const SWEEP_EVERY: Duration = Duration::from_secs(30);
/// Deadline for the TCP connect and the TLS handshake to the original destination.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(10);
/// Bound on the number of distinct destinations a proxy thread pools connections for.
const MAX_DESTINATIONS: usize = 4096;
/// Bound on the idle HTTP/1.1 connections kept per destination.
const MAX_IDLE_PER_DESTINATION: usize = 256;
/// How long the far end of a plain connection may stay in its handshake (`SYN_RECV`) before
/// brokerd gives up on learning whose it is (and refuses to send the credential).
const OWNER_SETTLE: Duration = Duration::from_millis(500);

/// Tells whose socket is at the far end of a connection brokerd made (brokerd: the capture
/// layer's [`crate::capture::OriginResolver`], through the kernel's sock_diag).
pub trait ListenerCheck: Send + Sync {
    /// The owner of the socket at the far end of the TCP connection from `local` to `peer`.
    fn owner(&self, local: SocketAddr, peer: SocketAddr) -> Result<ListenerOwner, String>;
}

impl ListenerCheck for crate::capture::OriginResolver {
    fn owner(&self, local: SocketAddr, peer: SocketAddr) -> Result<ListenerOwner, String> {
        self.listener_owner(local, peer)
    }
}

/// Errors building the upstream TLS configuration.
#[derive(Debug, thiserror::Error)]
pub enum UpstreamError {
    #[error("cannot read upstream CA file {path}")]
    ReadCa {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("upstream CA file {path} holds no usable certificate: {message}")]
    BadCa { path: PathBuf, message: String },
    #[error(
        "no trusted root certificates: the system store is empty and no --upstream-ca was given"
    )]
    NoRoots,
    #[error("cannot build the upstream TLS config")]
    Tls(#[source] rustls::Error),
}

/// Why an upstream request failed.
#[derive(Debug, thiserror::Error)]
pub enum RequestError {
    #[error("the request URI names no host")]
    NoHost,
    #[error("{host} is not a valid TLS server name")]
    ServerName { host: String },
    #[error("cannot connect")]
    Connect(#[source] std::io::Error),
    #[error("connecting timed out after {0:?}")]
    ConnectTimeout(Duration),
    #[error("TLS handshake failed")]
    Tls(#[source] std::io::Error),
    #[error("HTTP handshake failed")]
    Handshake(#[source] hyper::Error),
    #[error("request failed")]
    Request(#[source] hyper::Error),
    #[error(
        "the listener at {peer} belongs to agent cgroup {cgroup} (an agent took the service's \
         address while it was down?): brokerd sends no credential to an agent's listener"
    )]
    AgentListener { peer: SocketAddr, cgroup: String },
    #[error(
        "cannot tell whose listener answered at {peer} ({message}): no credential is sent over \
         plain HTTP to a listener that may be an agent's"
    )]
    ListenerUnknown { peer: SocketAddr, message: String },
}

impl RequestError {
    /// Whether brokerd refused to send the request (rather than the upstream failing it).
    pub fn is_refusal(&self) -> bool {
        matches!(
            self,
            RequestError::AgentListener { .. } | RequestError::ListenerUnknown { .. }
        )
    }
}

/// Which HTTP versions an upstream connection may negotiate.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Protocols {
    /// h2 when the server offers it, else http/1.1.
    Any,
    /// http/1.1 only: for requests that upgrade the connection (WebSocket), which HTTP/2
    /// cannot carry the same way.
    Http1Only,
}

/// Upstream connections, pooled per proxy thread.
///
/// brokerd serves connections on one single-threaded runtime per core, and each of those
/// threads keeps its own pool (a thread-local): an agent connection, the upstream connection
/// its request takes and both connections' tasks stay on one thread, and taking a pooled
/// connection needs no lock. A pool entry is keyed by the original destination address, the
/// scheme and authority of the request (the TLS server name) and the protocols allowed. A TLS
/// connection is reused for another host name only when the certificate verified on it is valid
/// for that name too, to the same address and port, for the same agent and credentials
/// (connection reuse as RFC 9110, 4.3.4 and RFC 9113, 9.1.1 allow it): what proves a name is
/// the certificate, and it proves this one as a new handshake would. A first-seen host name of
/// a wildcard or multi-name certificate then costs brokerd a leaf, not an upstream handshake.
pub struct Upstream {
    /// ALPN h2 and http/1.1.
    tls_any: TlsConnector,
    /// ALPN http/1.1 only.
    tls_http1: TlsConnector,
    /// Whose listener answered a plain connection; without one, credentials are never sent over
    /// plain HTTP.
    listeners: Option<Arc<dyn ListenerCheck>>,
}

/// Whose requests a pooled connection may carry: one agent's, with one set of credentials
/// written into them by brokerd.
///
/// Some upstreams authenticate a connection rather than each request (NTLM, Negotiate, some
/// proxies and gateways): a connection that carried a credential may serve later requests on it
/// as that credential's. Pooling per agent (cgroup) and per credential set keeps such a
/// connection from serving another agent, or this agent's requests that carry no credential or
/// another one (a rule that injects nothing, or the agent's own header). Across agents that
/// costs reuse only: each agent has its own connections.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub struct Partition {
    /// The agent's cgroup.
    agent: String,
    /// The names of the secrets written into the request, sorted.
    credentials: Vec<String>,
}

impl Partition {
    pub fn new(agent: &str, credentials: &[String]) -> Self {
        let mut credentials = credentials.to_vec();
        credentials.sort_unstable();
        credentials.dedup();
        Self {
            agent: agent.to_string(),
            credentials,
        }
    }
}

/// What a pooled connection is keyed by.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
struct Key {
    dst: SocketAddr,
    tls: bool,
    /// `host[:port]` as in the request URI.
    authority: String,
    protocols: Protocols,
    /// A plain connection whose listener was checked not to be an agent's, for requests that
    /// carry a credential. (TLS connections are verified by certificate instead: always false.)
    checked: bool,
    partition: Partition,
}

/// One proxy thread's connections.
#[derive(Default)]
struct Pool {
    /// Idle HTTP/1.1 connections, most recently used last.
    idle: HashMap<Key, Vec<Idle>>,
    /// One multiplexed HTTP/2 connection per destination, with when a request last went out
    /// on it: one unused for [`POOL_IDLE`] is dropped like an idle HTTP/1.1 connection (else an
    /// agent that left would keep its connections for as long as the upstream does).
    h2: HashMap<Key, PooledH2>,
    /// Destinations a new connection is being made to that may speak h2, each with how the
    /// requests waiting for it learn it is done (see [`Lead`]).
    connecting: HashMap<Key, Arc<Notify>>,
    /// Destinations whose last new connection negotiated HTTP/1.1: their concurrent requests
    /// each connect at once, since they cannot share a connection.
    speaks_http1: HashSet<Key>,
    /// Destinations that answered 421 to a request on a connection made for another of the
    /// certificate's names: they route by SNI, and get no such request again.
    sni_routed: HashSet<SocketAddr>,
    /// Whether this thread's sweeper task runs.
    sweeping: bool,
    /// The size last added to the metrics' pool gauge (see [`Pool::report`]).
    reported: i64,
}

impl Pool {
    /// Adds this pool's change in size since the last report to the metrics' gauge of all
    /// proxy threads' pools.
    fn report(&mut self) {
        let size = self.idle.values().map(Vec::len).sum::<usize>() + self.h2.len();
        let size = i64::try_from(size).unwrap_or(i64::MAX);
        if size != self.reported {
            crate::metrics::global().upstream_pool_changed(size - self.reported);
            self.reported = size;
        }
    }
}

struct Idle {
    conn: Http1Conn,
    since: Instant,
}

/// An HTTP/1.1 connection upstream, with the certificate verified on it (TLS only).
struct Http1Conn {
    sender: http1::SendRequest<UpstreamBody>,
    cert: Option<PeerCert>,
}

/// The end-entity certificate an upstream presented and brokerd verified, kept to tell whether
/// the connection may carry requests for another host name ([`Key::reusable_for`]).
type PeerCert = Arc<CertificateDer<'static>>;

struct PooledH2 {
    sender: http2::SendRequest<UpstreamBody>,
    cert: Option<PeerCert>,
    last_used: Instant,
}

impl Key {
    /// Whether a connection pooled under `self`, whose verified certificate is `cert`, may carry
    /// a request for `other`: the same destination, protocols and partition, over TLS, with a
    /// certificate valid for `other`'s host name as well.
    fn reusable_for(&self, other: &Key, cert: Option<&PeerCert>, host: &ServerName<'_>) -> bool {
        self.tls
            && other.tls
            && self.dst == other.dst
            && self.protocols == other.protocols
            && self.checked == other.checked
            && self.partition == other.partition
            && cert.is_some_and(|cert| certificate_names(cert, host))
    }
}

/// Whether `cert` (verified when its connection was made) is valid for `host`.
fn certificate_names(cert: &CertificateDer<'_>, host: &ServerName<'_>) -> bool {
    rustls::server::ParsedCertificate::try_from(cert)
        .is_ok_and(|parsed| rustls::client::verify_server_name(&parsed, host).is_ok())
}

impl Pool {
    /// Drops the connections idle (HTTP/1.1) or unused (h2) for longer than [`POOL_IDLE`] at
    /// `now`, and the closed ones. Dropping an h2 sender lets its connection close once its
    /// streams in flight end. Returns whether the pool is now empty.
    fn sweep(&mut self, now: Instant) -> bool {
        let fresh = |since: Instant| now.saturating_duration_since(since) <= POOL_IDLE;
        self.idle.retain(|_, idle| {
            idle.retain(|i| fresh(i.since) && !i.conn.sender.is_closed());
            !idle.is_empty()
        });
        self.h2
            .retain(|_, h2| fresh(h2.last_used) && !h2.sender.is_closed());
        // What a destination negotiated is kept while connections to it are.
        self.speaks_http1.retain(|key| self.idle.contains_key(key));
        self.report();
        self.idle.is_empty() && self.h2.is_empty()
    }

    /// Marks the sweeper running; true when it was not (the caller starts it).
    fn start_sweeping(&mut self) -> bool {
        !std::mem::replace(&mut self.sweeping, true)
    }

    /// The pooled h2 connection to `key`'s destination, marked used.
    fn h2_sender(&mut self, key: &Key) -> Option<http2::SendRequest<UpstreamBody>> {
        self.h2.get_mut(key).map(|h2| {
            h2.last_used = Instant::now();
            h2.sender.clone()
        })
    }

    /// A pooled h2 connection made for another name of `key`'s destination whose certificate
    /// is valid for `host`, marked used.
    fn h2_reusable(
        &mut self,
        key: &Key,
        host: &ServerName<'_>,
    ) -> Option<http2::SendRequest<UpstreamBody>> {
        if self.sni_routed.contains(&key.dst) {
            return None;
        }
        self.h2
            .iter_mut()
            .find(|(pooled, h2)| {
                pooled.reusable_for(key, h2.cert.as_ref(), host) && !h2.sender.is_closed()
            })
            .map(|(_, h2)| {
                h2.last_used = Instant::now();
                h2.sender.clone()
            })
    }

    /// Takes the most recently pooled idle HTTP/1.1 connection made for another name of `key`'s
    /// destination whose certificate is valid for `host`.
    fn take_reusable(&mut self, key: &Key, host: &ServerName<'_>) -> Option<Idle> {
        if self.sni_routed.contains(&key.dst) {
            return None;
        }
        let (_, idle) = self.idle.iter_mut().find(|(pooled, idle)| {
            idle.last()
                .is_some_and(|i| pooled.reusable_for(key, i.conn.cert.as_ref(), host))
        })?;
        let taken = idle.pop();
        self.report();
        taken
    }

    /// Remembers which protocol a new connection to `key`'s destination negotiated.
    fn negotiated(&mut self, key: &Key, http1: bool) {
        if !http1 {
            self.speaks_http1.remove(key);
        } else if !self.speaks_http1.contains(key) {
            if self.speaks_http1.len() >= MAX_DESTINATIONS {
                self.speaks_http1.clear();
            }
            self.speaks_http1.insert(key.clone());
        }
    }
}

/// One request's part in making a new connection to a destination that may speak h2.
///
/// Without it, a burst of requests to a new h2 upstream (or one whose connection just closed)
/// would each open a connection of their own, and all but one of them would be idle after: 100
/// concurrent streams from an agent made 101 upstream connections. So the first request leads:
/// it connects while the others follow, waiting until it is done, and then take the h2
/// connection it pooled (or, when it negotiated HTTP/1.1 or failed, connect on their own).
enum Coalesce {
    /// This request connects; the others wait until the [`Lead`] is dropped.
    Lead(Lead),
    /// Another request is connecting: wait for it.
    Follow(Arc<Notify>),
    /// Connect at once (plain HTTP, HTTP/1.1 only, or a destination known to speak HTTP/1.1).
    Alone,
}

impl Coalesce {
    fn for_key(key: &Key) -> Self {
        if !key.tls || key.protocols != Protocols::Any {
            return Coalesce::Alone;
        }
        POOL.with(|p| {
            let mut pool = p.borrow_mut();
            if pool.speaks_http1.contains(key) {
                return Coalesce::Alone;
            }
            if let Some(notify) = pool.connecting.get(key) {
                return Coalesce::Follow(notify.clone());
            }
            if pool.connecting.len() >= MAX_DESTINATIONS {
                return Coalesce::Alone;
            }
            let notify = Arc::new(Notify::new());
            pool.connecting.insert(key.clone(), notify.clone());
            Coalesce::Lead(Lead {
                key: key.clone(),
                notify,
            })
        })
    }
}

/// The request connecting for the others to `key`'s destination; dropped (done, failed or
/// cancelled), it wakes them.
struct Lead {
    key: Key,
    notify: Arc<Notify>,
}

impl Drop for Lead {
    fn drop(&mut self) {
        let _ = POOL.try_with(|p| {
            let mut pool = p.borrow_mut();
            if pool
                .connecting
                .get(&self.key)
                .is_some_and(|n| Arc::ptr_eq(n, &self.notify))
            {
                pool.connecting.remove(&self.key);
            }
        });
        self.notify.notify_waiters();
    }
}

thread_local! {
    static POOL: RefCell<Pool> = RefCell::new(Pool::default());
}

impl Upstream {
    /// Trusts the system roots plus the certificates in `extra_ca_files`.
    pub fn new(extra_ca_files: &[PathBuf]) -> Result<Self, UpstreamError> {
        let mut roots = RootCertStore::empty();
        let native = rustls_native_certs::load_native_certs();
        for e in &native.errors {
            warn!(error = %e, "some system root certificates could not be loaded");
        }
        let (_added, _ignored) = roots.add_parsable_certificates(native.certs);
        for path in extra_ca_files {
            for cert in read_pem_certs(path)? {
                roots.add(cert).map_err(|e| UpstreamError::BadCa {
                    path: path.clone(),
                    message: e.to_string(),
                })?;
            }
        }
        if roots.is_empty() {
            return Err(UpstreamError::NoRoots);
        }
        let config = |alpn: &[&[u8]]| -> Result<TlsConnector, UpstreamError> {
            let mut config =
                ClientConfig::builder_with_provider(crate::proxy::tls::crypto_provider())
                    .with_safe_default_protocol_versions()
                    .map_err(UpstreamError::Tls)?
                    .with_root_certificates(roots.clone())
                    .with_no_client_auth();
            config.alpn_protocols = alpn.iter().map(|p| p.to_vec()).collect();
            Ok(TlsConnector::from(Arc::new(config)))
        };
        Ok(Self {
            tls_any: config(&[b"h2", b"http/1.1"])?,
            tls_http1: config(&[b"http/1.1"])?,
            listeners: None,
        })
    }

    /// Checks with `check` whose listener answers before a credential goes out over plain HTTP.
    pub fn with_listener_check(mut self, check: Arc<dyn ListenerCheck>) -> Self {
        self.listeners = Some(check);
        self
    }

    /// Sends `req` (absolute URI: scheme, host for TLS verification, path) over a pooled or
    /// new connection to `dst`, never to an address of the host name. `credentialed`: the
    /// request carries a credential brokerd wrote into it (over plain HTTP it then goes only to
    /// a listener that is not an agent's). Must run on a Tokio runtime; the response body gives
    /// its connection back to this thread's pool when it ends.
    ///
    /// A request that went out on a connection made for another host name of the same
    /// certificate and was answered 421 (Misdirected Request: the server routes by SNI) goes
    /// once more on a connection of its own, when it can be sent twice (see `replayable`).
    pub async fn request(
        &self,
        dst: SocketAddr,
        protocols: Protocols,
        credentialed: bool,
        mut partition: Partition,
        mut req: Request<UpstreamBody>,
    ) -> Result<Response<PooledBody>, RequestError> {
        let mut other_names = true;
        loop {
            let sent = self
                .request_on(dst, protocols, credentialed, partition, req, other_names)
                .await?;
            match sent {
                Sent::Response(response) => return Ok(response),
                Sent::Misdirected(again, back) => {
                    debug!("421 on a connection made for another name; sending on its own");
                    (req, partition, other_names) = (again, back, false);
                }
            }
        }
    }

    /// [`Upstream::request`], on a connection made for another name of the same certificate
    /// only when `other_names`.
    async fn request_on(
        &self,
        dst: SocketAddr,
        protocols: Protocols,
        credentialed: bool,
        partition: Partition,
        mut req: Request<UpstreamBody>,
        other_names: bool,
    ) -> Result<Sent, RequestError> {
        let authority = req.uri().authority().ok_or(RequestError::NoHost)?.clone();
        let tls = req.uri().scheme() == Some(&http::uri::Scheme::HTTPS);
        let key = Key {
            dst,
            tls,
            authority: authority.as_str().to_ascii_lowercase(),
            protocols,
            checked: credentialed && !tls,
            partition,
        };
        if let Some(mut h2) = POOL.with(|p| p.borrow_mut().h2_sender(&key)) {
            if h2.ready().await.is_ok() {
                return send_h2(&mut h2, req).await.map(Sent::Response);
            }
            POOL.with(|p| {
                let mut pool = p.borrow_mut();
                pool.h2.remove(&key);
                pool.report();
            });
        }
        // A host name not yet pooled may share a connection made for another name of the same
        // certificate (see [`Upstream`]). Its server name is made only when something pooled
        // could be shared: a request on its own pooled connection (the usual case) needs none.
        let server_name = || {
            (tls && other_names)
                .then(|| tls_server_name(authority.host()).ok())
                .flatten()
        };
        if tls
            && other_names
            && POOL.with(|p| !p.borrow().h2.is_empty())
            && let Some(name) = server_name()
            && let Some(mut h2) = POOL.with(|p| p.borrow_mut().h2_reusable(&key, &name))
            && h2.ready().await.is_ok()
        {
            let again = replayable(&req);
            let response = send_h2(&mut h2, req).await?;
            return Ok(misdirected(response, again, key));
        }
        let mut other_name = false;
        let idle = match take_idle(&key).await {
            Some(conn) => Some(conn),
            None => match server_name() {
                Some(name) => {
                    let conn = take_reusable(&key, &name).await;
                    other_name = conn.is_some();
                    conn
                }
                None => None,
            },
        };
        let (mut conn, reused) = match idle {
            Some(conn) => (conn, true),
            None => {
                let lead = match Coalesce::for_key(&key) {
                    Coalesce::Lead(lead) => Some(lead),
                    Coalesce::Alone => None,
                    Coalesce::Follow(notify) => {
                        let notified = notify.notified();
                        // The leader's connect has its own deadline; this one only bounds the
                        // wait should the leader's task stall on something else.
                        let _ = tokio::time::timeout(CONNECT_TIMEOUT, notified).await;
                        if let Some(mut h2) = POOL.with(|p| p.borrow_mut().h2_sender(&key))
                            && h2.ready().await.is_ok()
                        {
                            return send_h2(&mut h2, req).await.map(Sent::Response);
                        }
                        None
                    }
                };
                // Boxed, here and below: connecting is most of this future's size, and a request
                // on a pooled connection (the usual case) would otherwise carry, and copy, room
                // for it wherever its future is moved.
                let connection = Box::pin(self.connect(&key, authority.host())).await;
                if let Ok(connection) = &connection {
                    let http1 = matches!(connection, Connection::Http1(_));
                    POOL.with(|p| p.borrow_mut().negotiated(&key, http1));
                }
                match connection? {
                    Connection::Http1(conn) => {
                        drop(lead);
                        (conn, false)
                    }
                    Connection::Http2(mut h2, cert) => {
                        let start_sweeper = POOL.with(|p| {
                            let mut pool = p.borrow_mut();
                            if pool.h2.len() >= MAX_DESTINATIONS {
                                pool.h2.clear();
                            }
                            pool.h2.insert(
                                key.clone(),
                                PooledH2 {
                                    sender: h2.clone(),
                                    cert,
                                    last_used: Instant::now(),
                                },
                            );
                            pool.report();
                            pool.start_sweeping()
                        });
                        // The followers find it pooled.
                        drop(lead);
                        if start_sweeper {
                            tokio::spawn(sweep());
                        }
                        return send_h2(&mut h2, req).await.map(Sent::Response);
                    }
                }
            }
        };
        let again = if other_name { replayable(&req) } else { None };
        // HTTP/1.1 on the wire: origin-form target and a Host header.
        let path = req
            .uri()
            .path_and_query()
            .cloned()
            .unwrap_or_else(|| PathAndQuery::from_static("/"));
        let host = HeaderValue::from_str(authority.as_str()).map_err(|_| RequestError::NoHost)?;
        *req.uri_mut() = Uri::from(path);
        req.headers_mut().insert(header::HOST, host);
        *req.version_mut() = Version::HTTP_11;
        let response = if reused {
            // The upstream may have closed this connection while it sat in the pool, even as
            // the request goes out on it (servers drop idle connections on their own clocks).
            // Then the request goes once more, on a new connection: when none of it was sent,
            // or when sending it twice means nothing (see `replayable`).
            let replay = replayable(&req);
            match conn.sender.try_send_request(req).await {
                Ok(response) => response,
                Err(mut failed) => {
                    let Some(req) = failed.take_message().or(replay) else {
                        return Err(RequestError::Request(failed.into_error()));
                    };
                    debug!(error = %failed.error(), "a pooled upstream connection was gone; sending again on a new one");
                    let Connection::Http1(fresh) =
                        Box::pin(self.connect(&key, authority.host())).await?
                    else {
                        // The upstream now speaks HTTP/2 on new connections; the request is in
                        // HTTP/1.1's form. Rare enough to leave to the agent's own retry.
                        return Err(RequestError::Request(failed.into_error()));
                    };
                    conn = fresh;
                    conn.sender
                        .send_request(req)
                        .await
                        .map_err(RequestError::Request)?
                }
            }
        } else {
            conn.sender
                .send_request(req)
                .await
                .map_err(RequestError::Request)?
        };
        // An upgraded connection (WebSocket) belongs to the upgrade, not to the pool. A
        // connection taken for another name goes back under this request's name.
        if other_name && response.status() == http::StatusCode::MISDIRECTED_REQUEST {
            // The connection goes with the answer (dropped unread); the request goes again.
            return Ok(misdirected(
                response.map(|body| PooledBody::new(body, None)),
                again,
                key,
            ));
        }
        let give_back =
            (response.status() != http::StatusCode::SWITCHING_PROTOCOLS).then_some((key, conn));
        Ok(Sent::Response(
            response.map(|body| PooledBody::new(body, give_back)),
        ))
    }

    /// A new connection to `key.dst`, TLS verified for `host` when `key.tls`.
    async fn connect(&self, key: &Key, host: &str) -> Result<Connection, RequestError> {
        let dst = key.dst;
        let tcp = tokio::time::timeout(CONNECT_TIMEOUT, TcpStream::connect(dst))
            .await
            .map_err(|_| RequestError::ConnectTimeout(CONNECT_TIMEOUT))?
            .map_err(RequestError::Connect)?;
        tcp.set_nodelay(true).map_err(RequestError::Connect)?;
        if !key.tls {
            if key.checked {
                self.check_listener(&tcp).await?;
            }
            return http1_connection(TokioIo::new(tcp), None).await;
        }
        let server_name = tls_server_name(host)?;
        let connector = match key.protocols {
            Protocols::Any => &self.tls_any,
            Protocols::Http1Only => &self.tls_http1,
        };
        let tls = tokio::time::timeout(CONNECT_TIMEOUT, connector.connect(server_name, tcp))
            .await
            .map_err(|_| RequestError::ConnectTimeout(CONNECT_TIMEOUT))?
            .map_err(RequestError::Tls)?;
        let cert = tls
            .get_ref()
            .1
            .peer_certificates()
            .and_then(<[_]>::first)
            .map(|cert| Arc::new(cert.clone().into_owned()));
        if tls.get_ref().1.alpn_protocol() == Some(b"h2") {
            let (sender, connection) = http2::handshake(TokioExecutor::new(), TokioIo::new(tls))
                .await
                .map_err(RequestError::Handshake)?;
            tokio::spawn(async move {
                let _ = connection.await;
            });
            return Ok(Connection::Http2(sender, cert));
        }
        http1_connection(TokioIo::new(tls), cert).await
    }
}

impl Upstream {
    /// Refuses a plain connection whose far end is an agent's socket (or cannot be told).
    async fn check_listener(&self, tcp: &TcpStream) -> Result<(), RequestError> {
        let peer = tcp.peer_addr().map_err(RequestError::Connect)?;
        let unknown = |message: String| RequestError::ListenerUnknown { peer, message };
        let Some(check) = &self.listeners else {
            return Err(unknown("brokerd has no listener check".into()));
        };
        let local = tcp.local_addr().map_err(RequestError::Connect)?;
        let started = Instant::now();
        loop {
            match check.owner(local, peer).map_err(unknown)? {
                ListenerOwner::Agent(cgroup) => {
                    return Err(RequestError::AgentListener {
                        peer,
                        cgroup: cgroup.to_string(),
                    });
                }
                ListenerOwner::Other | ListenerOwner::NotLocal => return Ok(()),
                ListenerOwner::Unsettled if started.elapsed() < OWNER_SETTLE => {
                    tokio::time::sleep(Duration::from_millis(1)).await;
                }
                ListenerOwner::Unsettled => {
                    return Err(unknown(format!(
                        "its socket was still in its handshake after {OWNER_SETTLE:?}"
                    )));
                }
            }
        }
    }
}

/// What one attempt at a request came to.
enum Sent {
    Response(Response<PooledBody>),
    /// 421 on a connection made for another host name: the request to send again, and its
    /// partition.
    Misdirected(Request<UpstreamBody>, Partition),
}

/// `response`, unless it is a 421 and the request can go again (`again`).
fn misdirected(
    response: Response<PooledBody>,
    again: Option<Request<UpstreamBody>>,
    key: Key,
) -> Sent {
    match again {
        Some(again) if response.status() == http::StatusCode::MISDIRECTED_REQUEST => {
            POOL.with(|p| {
                let mut pool = p.borrow_mut();
                if pool.sni_routed.len() >= MAX_DESTINATIONS {
                    pool.sni_routed.clear();
                }
                pool.sni_routed.insert(key.dst);
            });
            Sent::Misdirected(again, key.partition)
        }
        _ => Sent::Response(response),
    }
}

enum Connection {
    Http1(Http1Conn),
    Http2(http2::SendRequest<UpstreamBody>, Option<PeerCert>),
}

/// The TLS server name for `host` as a URI writes it (an IPv6 address in brackets).
fn tls_server_name(host: &str) -> Result<ServerName<'static>, RequestError> {
    let name = host.trim_start_matches('[').trim_end_matches(']');
    ServerName::try_from(name.to_owned()).map_err(|_| RequestError::ServerName {
        host: name.to_owned(),
    })
}

/// An HTTP/1.1 client connection over `io`, driven by a task of its own on this thread.
async fn http1_connection<I>(io: I, cert: Option<PeerCert>) -> Result<Connection, RequestError>
where
    I: hyper::rt::Read + hyper::rt::Write + Unpin + Send + 'static,
{
    let (sender, connection) = http1::handshake(io)
        .await
        .map_err(RequestError::Handshake)?;
    tokio::spawn(async move {
        let _ = connection.with_upgrades().await;
    });
    Ok(Connection::Http1(Http1Conn { sender, cert }))
}

async fn send_h2(
    sender: &mut http2::SendRequest<UpstreamBody>,
    mut req: Request<UpstreamBody>,
) -> Result<Response<PooledBody>, RequestError> {
    *req.version_mut() = Version::HTTP_2;
    let response = sender
        .send_request(req)
        .await
        .map_err(RequestError::Request)?;
    Ok(response.map(|body| PooledBody::new(body, None)))
}

/// A copy of `req` to send again should the connection it goes out on turn out to be closed:
/// only for a request without a body whose method means the same when it arrives twice
/// (RFC 9110, 9.2.2: GET, HEAD, OPTIONS, TRACE, PUT, DELETE), as browsers and nginx
/// (`proxy_next_upstream`) retry. Extensions are not copied (none is set on the way upstream).
fn replayable(req: &Request<UpstreamBody>) -> Option<Request<UpstreamBody>> {
    let idempotent = matches!(
        *req.method(),
        Method::GET | Method::HEAD | Method::OPTIONS | Method::TRACE | Method::PUT | Method::DELETE
    );
    if !idempotent || !req.body().is_end_stream() {
        return None;
    }
    let mut copy = Request::new(UpstreamBody::new(
        http_body_util::Empty::new().map_err(|never| match never {}),
    ));
    *copy.method_mut() = req.method().clone();
    *copy.uri_mut() = req.uri().clone();
    *copy.version_mut() = req.version();
    *copy.headers_mut() = req.headers().clone();
    Some(copy)
}

/// The most recently used idle connection for `key` that is still open and ready, if any;
/// closed and expired ones are dropped on the way.
async fn take_idle(key: &Key) -> Option<Http1Conn> {
    loop {
        let idle = POOL.with(|p| {
            let mut pool = p.borrow_mut();
            let idle = pool.idle.get_mut(key).and_then(Vec::pop);
            pool.report();
            idle
        })?;
        if let Some(conn) = ready(idle).await {
            return Some(conn);
        }
    }
}

/// [`take_idle`] for a connection made for another host name whose certificate is valid for
/// `host` too ([`Key::reusable_for`]).
async fn take_reusable(key: &Key, host: &ServerName<'_>) -> Option<Http1Conn> {
    loop {
        let idle = POOL.with(|p| p.borrow_mut().take_reusable(key, host))?;
        if let Some(conn) = ready(idle).await {
            return Some(conn);
        }
    }
}

/// An idle connection, if it is still open, fresh and ready to send.
async fn ready(idle: Idle) -> Option<Http1Conn> {
    if idle.since.elapsed() > POOL_IDLE || idle.conn.sender.is_closed() {
        return None;
    }
    let mut conn = idle.conn;
    // Ready at once unless the previous response's end has not been processed yet.
    conn.sender.ready().await.ok()?;
    Some(conn)
}

/// Puts a connection whose exchange is over back into this thread's pool.
fn give_back(key: Key, conn: Http1Conn) {
    if conn.sender.is_closed() {
        return;
    }
    let start_sweeper = POOL.with(|p| {
        let mut pool = p.borrow_mut();
        if !pool.idle.contains_key(&key) && pool.idle.len() >= MAX_DESTINATIONS {
            // Dropping a sender closes its idle connection; requests in flight keep theirs.
            pool.idle.clear();
        }
        let idle = pool.idle.entry(key).or_default();
        if idle.len() < MAX_IDLE_PER_DESTINATION {
            idle.push(Idle {
                conn,
                since: Instant::now(),
            });
        }
        pool.report();
        pool.start_sweeping()
    });
    if start_sweeper && tokio::runtime::Handle::try_current().is_ok() {
        tokio::spawn(sweep());
    }
}

/// Closes this thread's connections idle or unused for longer than [`POOL_IDLE`] (and forgets
/// closed ones), every [`SWEEP_EVERY`], until the pool is empty.
async fn sweep() {
    loop {
        tokio::time::sleep(SWEEP_EVERY).await;
        let empty = POOL.with(|p| {
            let mut pool = p.borrow_mut();
            let empty = pool.sweep(Instant::now());
            if empty {
                pool.sweeping = false;
            }
            empty
        });
        if empty {
            return;
        }
    }
}

/// A response body from upstream; when it ends, its HTTP/1.1 connection goes back to the
/// pool. Dropped before its end, the connection is dropped with it (and closed).
pub struct PooledBody {
    inner: Incoming,
    give_back: Option<(Key, Http1Conn)>,
}

impl PooledBody {
    fn new(inner: Incoming, give_back: Option<(Key, Http1Conn)>) -> Self {
        let mut body = Self { inner, give_back };
        if body.inner.is_end_stream() {
            body.finish();
        }
        body
    }

    fn finish(&mut self) {
        if let Some((key, conn)) = self.give_back.take() {
            give_back(key, conn);
        }
    }
}

impl Body for PooledBody {
    type Data = Bytes;
    type Error = hyper::Error;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, hyper::Error>>> {
        let polled = Pin::new(&mut self.inner).poll_frame(cx);
        match &polled {
            Poll::Ready(None) => self.finish(),
            Poll::Ready(Some(Ok(_))) if self.inner.is_end_stream() => self.finish(),
            // A failed body leaves the connection in an unknown state: not reused.
            Poll::Ready(Some(Err(_))) => self.give_back = None,
            _ => {}
        }
        polled
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}

/// Reads every certificate in a PEM file.
fn read_pem_certs(path: &Path) -> Result<Vec<CertificateDer<'static>>, UpstreamError> {
    use rustls::pki_types::pem::PemObject as _;
    let bytes = std::fs::read(path).map_err(|source| UpstreamError::ReadCa {
        path: path.into(),
        source,
    })?;
    let certs: Vec<_> = CertificateDer::pem_slice_iter(&bytes)
        .collect::<Result<_, _>>()
        .map_err(|e| UpstreamError::BadCa {
            path: path.into(),
            message: e.to_string(),
        })?;
    if certs.is_empty() {
        return Err(UpstreamError::BadCa {
            path: path.into(),
            message: "no CERTIFICATE block".into(),
        });
    }
    Ok(certs)
}

#[cfg(test)]
mod tests {
    use super::*;

    use std::sync::atomic::{AtomicUsize, Ordering};

    use http_body_util::Empty;

    use crate::proxy::tls::{BrokerCa, LeafMinter, LeafName};

    /// A local HTTPS server with a test CA, answering every request with `body_len` bytes over
    /// h2 or http/1.1 (ALPN), counting the connections it accepts.
    struct TestServer {
        addr: SocketAddr,
        connections: Arc<AtomicUsize>,
        ca_file: tempfile::NamedTempFile,
    }

    async fn test_server(body_len: usize) -> TestServer {
        test_server_named(body_len, None, false).await
    }

    /// [`test_server`] presenting a certificate for `name` (a wildcard, say) whatever the SNI;
    /// without one, for the SNI alone. `by_sni`: a request for another host than the
    /// connection's SNI is answered 421, as a server that routes by SNI does.
    async fn test_server_named(
        body_len: usize,
        name: Option<&'static str>,
        by_sni: bool,
    ) -> TestServer {
        let (ca, _key) = BrokerCa::generate().expect("ca");
        let mut ca_file = tempfile::NamedTempFile::new().expect("tempfile");
        std::io::Write::write_all(&mut ca_file, ca.cert_pem().as_bytes()).expect("write ca");
        let minter = Arc::new(LeafMinter::new(ca).expect("minter"));
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind");
        let addr = listener.local_addr().expect("addr");
        let connections = Arc::new(AtomicUsize::new(0));
        let counted = connections.clone();
        tokio::spawn(async move {
            loop {
                let Ok((tcp, _)) = listener.accept().await else {
                    return;
                };
                counted.fetch_add(1, Ordering::SeqCst);
                let minter = minter.clone();
                tokio::spawn(async move {
                    let acceptor = tokio_rustls::LazyConfigAcceptor::new(
                        rustls::server::Acceptor::default(),
                        tcp,
                    );
                    let Ok(start) = acceptor.await else { return };
                    let sni = start.client_hello().server_name().map(str::to_owned);
                    let name = name.or(sni.as_deref()).unwrap_or("unnamed").to_owned();
                    let config = minter.server_config(&LeafName::Dns(name)).expect("leaf");
                    let Ok(tls) = start.into_stream(config).await else {
                        return;
                    };
                    let service =
                        hyper::service::service_fn(move |req: Request<Incoming>| {
                            let host = req
                                .uri()
                                .host()
                                .or_else(|| req.headers().get(header::HOST)?.to_str().ok())
                                .map(|h| h.split(':').next().unwrap_or(h).to_owned());
                            let misdirected = by_sni && host != sni;
                            async move {
                                let mut response = Response::new(http_body_util::Full::new(
                                    Bytes::from(vec![b'x'; body_len]),
                                ));
                                if misdirected {
                                    *response.status_mut() = http::StatusCode::MISDIRECTED_REQUEST;
                                }
                                Ok::<_, std::convert::Infallible>(response)
                            }
                        });
                    let _ = hyper_util::server::conn::auto::Builder::new(TokioExecutor::new())
                        .serve_connection(TokioIo::new(tls), service)
                        .await;
                });
            }
        });
        TestServer {
            addr,
            connections,
            ca_file,
        }
    }

    fn get(host: &str) -> Request<UpstreamBody> {
        Request::get(format!("https://{host}/v1"))
            .body(Empty::new().map_err(|never| match never {}).boxed_unsync())
            .expect("request")
    }

    fn agent() -> Partition {
        Partition::new("agents/a", &[])
    }

    async fn fetch(upstream: &Upstream, server: &TestServer, host: &str, p: Protocols) -> usize {
        let response = upstream
            .request(server.addr, p, false, agent(), get(host))
            .await
            .expect("response");
        assert_eq!(response.status(), http::StatusCode::OK);
        let body = response.into_body().collect().await.expect("body");
        body.to_bytes().len()
    }

    fn runtime() -> tokio::runtime::Runtime {
        tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .expect("runtime")
    }

    #[test]
    fn http1_connections_are_reused_per_host_and_only_after_a_complete_body() {
        runtime().block_on(async {
            let server = test_server(64 * 1024).await;
            let upstream = Upstream::new(&[server.ca_file.path().into()]).expect("upstream");
            let h1 = Protocols::Http1Only;
            for _ in 0..3 {
                assert_eq!(fetch(&upstream, &server, "a.test", h1).await, 64 * 1024);
            }
            assert_eq!(
                server.connections.load(Ordering::SeqCst),
                1,
                "one pooled connection"
            );
            // A connection verified for one name is never used for another.
            assert_eq!(fetch(&upstream, &server, "b.test", h1).await, 64 * 1024);
            assert_eq!(server.connections.load(Ordering::SeqCst), 2);
            // A body dropped before its end takes its connection with it.
            let response = upstream
                .request(server.addr, h1, false, agent(), get("a.test"))
                .await
                .expect("response");
            drop(response);
            assert_eq!(fetch(&upstream, &server, "a.test", h1).await, 64 * 1024);
            assert_eq!(server.connections.load(Ordering::SeqCst), 3);
        });
    }

    #[test]
    fn a_connection_is_reused_for_another_name_only_when_its_certificate_names_it() {
        runtime().block_on(async {
            let server = test_server_named(1024, Some("*.shared.test"), false).await;
            let upstream = Upstream::new(&[server.ca_file.path().into()]).expect("upstream");
            let count = || server.connections.load(Ordering::SeqCst);
            for protocols in [Protocols::Http1Only, Protocols::Any] {
                let before = count();
                for host in ["a.shared.test", "b.shared.test", "c.shared.test"] {
                    assert_eq!(fetch(&upstream, &server, host, protocols).await, 1024);
                }
                assert_eq!(
                    count() - before,
                    1,
                    "{protocols:?}: three names of one wildcard certificate share a connection"
                );
                // Not a name of the certificate: a new connection, whose verification fails.
                let refused = upstream
                    .request(server.addr, protocols, false, agent(), get("other.test"))
                    .await;
                assert!(
                    matches!(refused, Err(RequestError::Tls(_))),
                    "{protocols:?}: {:?}",
                    refused.map(|r| r.status())
                );
                assert_eq!(count() - before, 2);
                // Another agent, or another set of credentials, never shares it.
                let other = Partition::new("agents/b", &[]);
                let response = upstream
                    .request(server.addr, protocols, false, other, get("a.shared.test"))
                    .await
                    .expect("response");
                drop(response.into_body().collect().await.expect("body"));
                assert_eq!(count() - before, 3);
            }
        });
    }

    #[test]
    fn a_421_on_a_connection_made_for_another_name_sends_the_request_on_its_own() {
        runtime().block_on(async {
            // A server each: what one learns about its destination must not hide the other.
            for protocols in [Protocols::Http1Only, Protocols::Any] {
                let server = test_server_named(1024, Some("*.shared.test"), true).await;
                let upstream = Upstream::new(&[server.ca_file.path().into()]).expect("upstream");
                let count = || server.connections.load(Ordering::SeqCst);
                let before = count();
                assert_eq!(
                    fetch(&upstream, &server, "a.shared.test", protocols).await,
                    1024
                );
                // Tried on a.shared.test's connection, answered 421, sent again on its own.
                assert_eq!(
                    fetch(&upstream, &server, "b.shared.test", protocols).await,
                    1024
                );
                assert_eq!(count() - before, 2, "{protocols:?}");
                // The destination routes by SNI: no name shares a connection with another
                // there again. (The HTTP/1.1 connection that got the 421 went with it.)
                for host in ["b.shared.test", "a.shared.test", "c.shared.test"] {
                    assert_eq!(fetch(&upstream, &server, host, protocols).await, 1024);
                }
                let made = count() - before;
                for host in ["a.shared.test", "b.shared.test", "c.shared.test"] {
                    assert_eq!(fetch(&upstream, &server, host, protocols).await, 1024);
                }
                assert_eq!(
                    count() - before,
                    made,
                    "{protocols:?}: each name's own, pooled"
                );
            }
        });
    }

    #[test]
    fn h2_is_negotiated_and_multiplexed_on_one_connection() {
        runtime().block_on(async {
            let server = test_server(1024).await;
            let upstream = Upstream::new(&[server.ca_file.path().into()]).expect("upstream");
            let response = upstream
                .request(server.addr, Protocols::Any, false, agent(), get("c.test"))
                .await
                .expect("response");
            assert_eq!(response.version(), Version::HTTP_2);
            // Another request while the first body is still unread shares the connection.
            assert_eq!(
                fetch(&upstream, &server, "c.test", Protocols::Any).await,
                1024
            );
            drop(response);
            assert_eq!(
                fetch(&upstream, &server, "c.test", Protocols::Any).await,
                1024
            );
            assert_eq!(server.connections.load(Ordering::SeqCst), 1);
        });
    }

    #[test]
    fn concurrent_requests_to_a_new_h2_destination_share_one_connection() {
        runtime().block_on(async {
            let server = test_server(1024).await;
            let upstream = Upstream::new(&[server.ca_file.path().into()]).expect("upstream");
            let burst = (0..50).map(|_| fetch(&upstream, &server, "burst.test", Protocols::Any));
            let lengths = futures_util::future::join_all(burst).await;
            assert!(lengths.iter().all(|&n| n == 1024), "{lengths:?}");
            assert_eq!(
                server.connections.load(Ordering::SeqCst),
                1,
                "50 concurrent requests, one h2 connection"
            );
            POOL.with(|p| assert!(p.borrow().connecting.is_empty()));
        });
    }

    #[test]
    fn a_failed_leading_connect_wakes_the_waiting_requests() {
        runtime().block_on(async {
            // A port nothing listens on: the leader's connect is refused, and each follower
            // then tries (and fails) on its own rather than waiting out a deadline.
            let closed = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
            let dst = closed.local_addr().expect("addr");
            drop(closed);
            let (ca, _key) = BrokerCa::generate().expect("ca");
            let mut ca_file = tempfile::NamedTempFile::new().expect("tempfile");
            std::io::Write::write_all(&mut ca_file, ca.cert_pem().as_bytes()).expect("write ca");
            let upstream = Upstream::new(&[ca_file.path().into()]).expect("upstream");
            let started = Instant::now();
            let burst = (0..10)
                .map(|_| upstream.request(dst, Protocols::Any, false, agent(), get("down.test")));
            let results = futures_util::future::join_all(burst).await;
            assert!(
                results
                    .iter()
                    .all(|r| matches!(r, Err(RequestError::Connect(_)))),
                "{:?}",
                results
                    .iter()
                    .map(|r| r.as_ref().err().map(|e| e.to_string()))
                    .collect::<Vec<_>>()
            );
            assert!(
                started.elapsed() < Duration::from_secs(5),
                "{:?}",
                started.elapsed()
            );
            POOL.with(|p| assert!(p.borrow().connecting.is_empty()));
        });
    }

    #[test]
    fn an_unused_h2_connection_leaves_the_pool_after_the_idle_time() {
        runtime().block_on(async {
            let server = test_server(1024).await;
            let upstream = Upstream::new(&[server.ca_file.path().into()]).expect("upstream");
            let any = Protocols::Any;
            assert_eq!(fetch(&upstream, &server, "d.test", any).await, 1024);
            let h2 = || {
                POOL.with(|p| {
                    let pool = p.borrow();
                    (pool.h2.len(), pool.h2.values().map(|h| h.last_used).max())
                })
            };
            let (entries, first_use) = h2();
            assert_eq!(entries, 1);
            // Each request restarts its clock.
            assert_eq!(fetch(&upstream, &server, "d.test", any).await, 1024);
            let (_, last_use) = h2();
            assert!(last_use > first_use);
            assert_eq!(server.connections.load(Ordering::SeqCst), 1);
            let sweep_at = |at: Instant| POOL.with(|p| p.borrow_mut().sweep(at));
            let last_use = last_use.expect("an h2 entry");
            // Kept while it has been used within the idle time, though the upstream keeps it open.
            assert!(!sweep_at(last_use + POOL_IDLE));
            assert_eq!(h2().0, 1);
            // Dropped once unused for longer: an agent that left takes its connections along.
            assert!(sweep_at(last_use + POOL_IDLE + Duration::from_secs(1)));
            assert_eq!(h2().0, 0);
            assert_eq!(fetch(&upstream, &server, "d.test", any).await, 1024);
            assert_eq!(server.connections.load(Ordering::SeqCst), 2);
        });
    }

    #[test]
    fn connections_are_never_shared_across_agents_or_credentials() {
        runtime().block_on(async {
            for protocols in [Protocols::Http1Only, Protocols::Any] {
                let server = test_server(16).await;
                let upstream = Upstream::new(&[server.ca_file.path().into()]).expect("upstream");
                let key = ["KEY".to_string()];
                let partitions = [
                    Partition::new("agents/a", &key),
                    Partition::new("agents/a", &key),
                    Partition::new("agents/b", &key),
                    Partition::new("agents/a", &[]),
                    Partition::new("agents/b", &[]),
                ];
                for partition in partitions {
                    let response = upstream
                        .request(server.addr, protocols, false, partition, get("a.test"))
                        .await
                        .expect("response");
                    response.into_body().collect().await.expect("body");
                }
                // The second request of agents/a with KEY reused the first one's connection;
                // every other partition has its own.
                assert_eq!(
                    server.connections.load(Ordering::SeqCst),
                    4,
                    "{protocols:?}"
                );
            }
        });
    }

    #[test]
    fn a_certificate_for_another_name_or_ca_is_refused() {
        runtime().block_on(async {
            let server = test_server(16).await;
            // Trusting only another CA: the server's leaf does not verify.
            let other = test_server(16).await;
            let upstream = Upstream::new(&[other.ca_file.path().into()]).expect("upstream");
            let err = upstream
                .request(server.addr, Protocols::Any, false, agent(), get("a.test"))
                .await
                .err()
                .expect("refused");
            assert!(matches!(err, RequestError::Tls(_)), "{err:?}");
        });
    }

    #[test]
    fn only_bodiless_idempotent_requests_are_sent_again() {
        let request = |method: Method, body: &'static [u8]| {
            let body = if body.is_empty() {
                UpstreamBody::new(http_body_util::Empty::new().map_err(|never| match never {}))
            } else {
                UpstreamBody::new(
                    http_body_util::Full::new(Bytes::from_static(body))
                        .map_err(|never| match never {}),
                )
            };
            Request::builder()
                .method(method)
                .uri("/v1/thing?i=1")
                .header("authorization", "Bearer abtest-not-a-secret")
                .body(body)
                .expect("request")
        };
        for method in [Method::GET, Method::HEAD, Method::PUT, Method::DELETE] {
            let copy = replayable(&request(method.clone(), b"")).expect("replayable");
            assert_eq!(copy.method(), method);
            assert_eq!(copy.uri(), "/v1/thing?i=1");
            assert_eq!(copy.headers().len(), 1);
            assert!(copy.body().is_end_stream());
        }
        assert!(replayable(&request(Method::POST, b"")).is_none());
        assert!(replayable(&request(Method::PATCH, b"")).is_none());
        assert!(replayable(&request(Method::PUT, b"{}")).is_none());
    }

    #[test]
    fn a_missing_ca_file_is_named() {
        let err = Upstream::new(&[PathBuf::from("/nonexistent/ca.pem")])
            .err()
            .expect("error");
        assert!(err.to_string().contains("/nonexistent/ca.pem"), "{err}");
    }

    #[test]
    fn a_file_without_certificates_is_refused() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("ca.pem");
        std::fs::write(&path, "hello").expect("write");
        let err = Upstream::new(&[path]).err().expect("error");
        assert!(err.to_string().contains("no usable certificate"), "{err}");
    }
}
