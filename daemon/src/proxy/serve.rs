//! One captured connection, from its first bytes to HTTP: a tcp rule splices it, TLS is
//! terminated with a leaf minted for its SNI (or the original IP), plain HTTP is served as is,
//! and anything else is refused and recorded.

use std::{
    future::Future,
    pin::Pin,
    sync::{
        Arc,
        atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering},
    },
    time::{Duration, Instant},
};

use agent_broker_core::{fmt::error_chain, policy::ShareKind};
use agent_broker_protocol::{Decision, EventKind, Side};
use http::StatusCode;
use http_body_util::BodyExt as _;
use hyper_util::{
    rt::{TokioExecutor, TokioIo, TokioTimer},
    server::conn::auto,
};
use tokio::net::TcpStream;
use tokio_rustls::LazyConfigAcceptor;
use tracing::info;

use super::{
    BindReason, ConnectionVerdict, Deadlines, Denial, DenialReason, HANDSHAKE_TIMEOUT, Proxy,
    body::AgentBody,
    record::{self, connection_event},
    reply,
    sniff::{Sniffed, peek_sni, sniff},
    tls::LeafName,
};
use crate::{
    capture::ConnectionOrigin,
    metrics::HandshakeOutcome,
    shares::{Held, ReadPace},
};

/// HTTP/1.1: the most an agent's request head (request line and headers) may take, as hyper's
/// read buffer; past it the agent gets 431 and the connection closes.
pub(super) const H1_MAX_HEAD: usize = 64 * 1024;
/// HTTP/2: streams an agent may have open at once on one connection (SETTINGS); more are
/// refused (RST_STREAM REFUSED_STREAM).
pub(super) const H2_MAX_CONCURRENT_STREAMS: u32 = 100;
/// HTTP/2: the most a request's decoded header list may take (SETTINGS); past it the stream
/// gets 431, and at twice it (an HPACK bomb) the connection GOAWAY ENHANCE_YOUR_CALM.
pub(super) const H2_MAX_HEADER_LIST: u32 = 64 * 1024;
/// HTTP/2: streams the agent opened and reset before brokerd served them (Rapid Reset,
/// CVE-2023-44487) that may be pending at once; past it, GOAWAY ENHANCE_YOUR_CALM.
pub(super) const H2_MAX_PENDING_ACCEPT_RESETS: usize = 50;
/// HTTP/2: streams brokerd had to reset for the agent's errors (MadeYouReset, CVE-2025-8671:
/// WINDOW_UPDATE overflow, DATA past the window or on a closed stream) on one connection;
/// past it, GOAWAY ENHANCE_YOUR_CALM.
pub(super) const H2_MAX_LOCAL_ERROR_RESETS: usize = 100;

/// Why an agent connection that ended with `error` was the agent's breach of the protocol,
/// for its audit record; `None` for an agent that merely went away (a reset or a close).
/// `head_begun`: whether the agent sent bytes since its last request ended (or since the
/// connection reached HTTP), which tells a head sent too slowly from a keep-alive connection
/// that merely stayed idle until the same deadline closed it.
fn protocol_violation(
    error: &(dyn std::error::Error + 'static),
    head_timeout: Duration,
    head_begun: bool,
) -> Option<String> {
    let mut source: Option<&(dyn std::error::Error + 'static)> = Some(error);
    while let Some(e) = source {
        if let Some(h2) = e.downcast_ref::<h2::Error>() {
            // brokerd's own GOAWAY for the agent's error (a flood, a malformed frame).
            return (h2.is_go_away() && h2.is_library()).then(|| {
                let reason = h2.reason().unwrap_or(h2::Reason::PROTOCOL_ERROR);
                format!("HTTP/2 connection closed with GOAWAY {reason:?}: {h2}")
            });
        }
        if let Some(hyper) = e.downcast_ref::<hyper::Error>() {
            if hyper.is_parse_too_large() {
                return Some(format!(
                    "HTTP/1.1 request head over {} KiB or over 100 header fields (431): {}",
                    H1_MAX_HEAD / 1024,
                    error_chain(hyper)
                ));
            }
            if hyper.is_parse() {
                return Some(format!(
                    "malformed HTTP/1.1 request (400): {}",
                    error_chain(hyper)
                ));
            }
            if hyper.is_timeout() {
                return head_begun.then(|| {
                    format!(
                        "no complete HTTP/1.1 request head within {}; the connection was closed",
                        humantime::format_duration(head_timeout)
                    )
                });
            }
        }
        source = e.source();
    }
    None
}

/// Resolves when the connection has had no request in flight for its deadline:
/// `request_head` before its first request, `connection_idle` after.
async fn idle(activity: &Activity, epoch: Instant, deadlines: Deadlines) {
    loop {
        let limit = if activity.seen.load(Ordering::Relaxed) {
            deadlines.connection_idle
        } else {
            deadlines.request_head
        };
        let last = Duration::from_millis(activity.last_ms.load(Ordering::Relaxed));
        let since = epoch.elapsed().saturating_sub(last);
        if activity.in_flight.load(Ordering::Relaxed) == 0 && since >= limit {
            return;
        }
        // Check again when the deadline would fall if nothing happens meanwhile (while
        // requests are in flight, a deadline apart).
        let wait = match limit.saturating_sub(since) {
            Duration::ZERO => limit,
            left => left,
        };
        tokio::time::sleep(wait).await;
    }
}

/// A response body that gives back its request's place in the share when it ends or is
/// dropped.
struct Guarded {
    body: AgentBody,
    _guard: RequestGuard,
}

impl hyper::body::Body for Guarded {
    type Data = bytes::Bytes;
    type Error = super::body::BodyError;

    fn poll_frame(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Option<Result<hyper::body::Frame<Self::Data>, Self::Error>>> {
        std::pin::Pin::new(&mut self.body).poll_frame(cx)
    }

    fn is_end_stream(&self) -> bool {
        self.body.is_end_stream()
    }

    fn size_hint(&self) -> hyper::body::SizeHint {
        self.body.size_hint()
    }
}

/// How much of a connection is read at a time while its agent is past its requests per
/// second: about one HTTP/2 request (a HEADERS frame of a repeated request is some 20 bytes).
const PACED_READ: usize = 32;

/// How long the 429 of a request refused for its agent's requests per second is held back
/// (up to a bound per agent, see [`Held::hold_refusal`]): its stream stays open meanwhile, so a
/// stream flood is bounded by the streams its connections may have open (200 each), not only
/// by how fast brokerd answers.
const RATE_REFUSAL_HOLD: Duration = Duration::from_secs(1);

/// The agent's side of a connection, read freely while its agent has requests per second
/// left. Past that share, the requests already read get 429s, and the agent's connections are
/// read [`PACED_READ`] bytes at a time, at the share's rate for all of them together: an
/// HTTP/2 stream flood then waits in the kernel's socket buffers (and the sender's flow
/// control) instead of costing brokerd a decoded, refused and audited stream each, so the
/// other agents keep the CPU. Writes pass through.
struct Paced<I> {
    io: I,
    conn: Arc<Conn>,
    wait: Option<std::pin::Pin<Box<tokio::time::Sleep>>>,
}

impl<I: hyper::rt::Read + Unpin> hyper::rt::Read for Paced<I> {
    fn poll_read(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
        buf: hyper::rt::ReadBufCursor<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        loop {
            if let Some(wait) = self.wait.as_mut() {
                std::task::ready!(std::future::Future::poll(wait.as_mut(), cx));
                self.wait = None;
            }
            match self.conn.admitted.read_pace() {
                ReadPace::Free => return std::pin::Pin::new(&mut self.io).poll_read(cx, buf),
                ReadPace::Paced => break,
                ReadPace::Wait(wait) => {
                    self.wait = Some(Box::pin(tokio::time::sleep(wait)));
                }
            }
        }
        // Past the share, one request's worth of bytes per read: a read of a whole buffer
        // would bring hundreds of HTTP/2 streams in at once.
        let mut small = [0u8; PACED_READ];
        let mut limit = PACED_READ.min(buf.remaining());
        if limit == 0 {
            limit = PACED_READ;
        }
        let mut read = hyper::rt::ReadBuf::new(&mut small[..limit]);
        std::task::ready!(std::pin::Pin::new(&mut self.io).poll_read(cx, read.unfilled()))?;
        let mut buf = buf;
        buf.put_slice(read.filled());
        std::task::Poll::Ready(Ok(()))
    }
}

impl<I: hyper::rt::Write + Unpin> hyper::rt::Write for Paced<I> {
    fn poll_write(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
        buf: &[u8],
    ) -> std::task::Poll<std::io::Result<usize>> {
        std::pin::Pin::new(&mut self.io).poll_write(cx, buf)
    }

    fn poll_flush(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        std::pin::Pin::new(&mut self.io).poll_flush(cx)
    }

    fn poll_shutdown(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        std::pin::Pin::new(&mut self.io).poll_shutdown(cx)
    }

    fn is_write_vectored(&self) -> bool {
        self.io.is_write_vectored()
    }

    fn poll_write_vectored(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
        bufs: &[std::io::IoSlice<'_>],
    ) -> std::task::Poll<std::io::Result<usize>> {
        std::pin::Pin::new(&mut self.io).poll_write_vectored(cx, bufs)
    }
}

/// The per-connection context handed to every request.
pub(super) struct Conn {
    pub(super) origin: ConnectionOrigin,
    /// SNI, lowercase, when the agent spoke TLS and sent one.
    pub(super) sni: Option<String>,
    pub(super) tls: bool,
    /// The connection's place in its agent's share, held while it is open.
    pub(super) admitted: Held,
    /// Requests of this connection in flight, and when the last one started or ended.
    pub(super) activity: Arc<Activity>,
}

/// What a connection's idle deadline watches.
#[derive(Default)]
pub(super) struct Activity {
    in_flight: AtomicUsize,
    /// Milliseconds since `epoch` of the last request start or end.
    last_ms: AtomicU64,
    /// Whether a request has started.
    seen: AtomicBool,
    /// Milliseconds since `epoch` of the last read that brought bytes from the agent.
    last_read_ms: AtomicU64,
}

impl Activity {
    fn touch(&self, epoch: Instant) {
        let ms = u64::try_from(epoch.elapsed().as_millis()).unwrap_or(u64::MAX);
        self.last_ms.store(ms, Ordering::Relaxed);
    }

    /// Whether bytes came from the agent since its last request started or ended (or since
    /// the connection reached HTTP): with nothing in flight, the start of a request head.
    fn head_begun(&self) -> bool {
        self.in_flight.load(Ordering::Relaxed) == 0
            && self.last_read_ms.load(Ordering::Relaxed) > self.last_ms.load(Ordering::Relaxed)
    }
}

/// The agent's side of a connection, noting when bytes last came from it (see
/// [`Activity::head_begun`]).
struct ReadClock<I> {
    inner: I,
    activity: Arc<Activity>,
    epoch: Instant,
}

impl<I: hyper::rt::Read + Unpin> hyper::rt::Read for ReadClock<I> {
    fn poll_read(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
        mut buf: hyper::rt::ReadBufCursor<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        // SAFETY: the inner reader only writes initialized bytes into this slice (ReadBuf
        // tracks how many), and `advance` below counts exactly those.
        let raw = unsafe { buf.as_mut() };
        let mut inner_buf = hyper::rt::ReadBuf::uninit(raw);
        let polled = std::pin::Pin::new(&mut self.inner).poll_read(cx, inner_buf.unfilled());
        let n = inner_buf.filled().len();
        if n > 0 {
            // SAFETY: the inner reader filled (initialized) the first `n` bytes.
            unsafe { buf.advance(n) };
            let ms = u64::try_from(self.epoch.elapsed().as_millis()).unwrap_or(u64::MAX);
            self.activity.last_read_ms.store(ms, Ordering::Relaxed);
        }
        polled
    }
}

impl<I: hyper::rt::Write + Unpin> hyper::rt::Write for ReadClock<I> {
    fn poll_write(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
        buf: &[u8],
    ) -> std::task::Poll<std::io::Result<usize>> {
        std::pin::Pin::new(&mut self.inner).poll_write(cx, buf)
    }

    fn poll_flush(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        std::pin::Pin::new(&mut self.inner).poll_flush(cx)
    }

    fn poll_shutdown(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        std::pin::Pin::new(&mut self.inner).poll_shutdown(cx)
    }

    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }

    fn poll_write_vectored(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
        bufs: &[std::io::IoSlice<'_>],
    ) -> std::task::Poll<std::io::Result<usize>> {
        std::pin::Pin::new(&mut self.inner).poll_write_vectored(cx, bufs)
    }
}

/// A request in flight: its place in the agent's share and in its connection's activity,
/// given back when the response ends (the guard travels with the response body).
pub(super) struct RequestGuard {
    _held: Held,
    activity: Arc<Activity>,
    epoch: Instant,
}

impl Drop for RequestGuard {
    fn drop(&mut self) {
        self.activity.touch(self.epoch);
        self.activity.in_flight.fetch_sub(1, Ordering::Relaxed);
    }
}

impl Proxy {
    /// Splices a connection a tcp rule allows, once the name it matched by (if only the
    /// agent's SNI ties it to the address) is proven to own the address; refused otherwise.
    async fn splice_proven(
        &self,
        stream: TcpStream,
        origin: ConnectionOrigin,
        sni: Option<String>,
        rule: String,
        on_done: Option<Box<dyn FnOnce(u64) + Send>>,
        bind_name: Option<String>,
    ) {
        if let Some(name) = bind_name
            && let Err(reason) = self
                .names
                .check(&origin, &name, BindReason::MatchedByName)
                .await
        {
            return self.refused_connection(&origin, sni.as_deref(), EventKind::Denial, &reason);
        }
        self.splice(stream, origin, sni, rule, on_done).await
    }

    /// Serves one captured connection to completion; `admitted` is its place in the agent's
    /// share of connections. Until the connection reaches HTTP it also holds one of the
    /// agent's pending handshakes.
    pub async fn serve(
        self: Arc<Self>,
        stream: TcpStream,
        origin: ConnectionOrigin,
        admitted: Held,
    ) {
        let _ = stream.set_nodelay(true);
        let handshake = match self.shares.handshake(&admitted) {
            Ok(h) => h,
            Err(refused) => {
                self.shares.refusals().refused_connection(&origin, &refused);
                return;
            }
        };
        // A tcp rule for the destination itself: splice at once (server-first protocols too).
        // Never the local service's address: nothing there goes anywhere else.
        if !self.is_local_connection(&origin, None)
            && let ConnectionVerdict::Splice {
                rule,
                on_done,
                bind_name,
            } = self.authorizer.connection(&origin, None)
        {
            drop(handshake);
            return Box::pin(self.splice_proven(stream, origin, None, rule, on_done, bind_name))
                .await;
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
                if !self.is_local_connection(&origin, sni.as_deref())
                    && let ConnectionVerdict::Splice {
                        rule,
                        on_done,
                        bind_name,
                    } = self.authorizer.connection(&origin, sni.as_deref())
                {
                    drop(handshake);
                    return Box::pin(
                        self.splice_proven(stream, origin, sni, rule, on_done, bind_name),
                    )
                    .await;
                }
                self.serve_tls(stream, origin, admitted, handshake).await
            }
            Sniffed::Http => {
                drop(handshake);
                let conn = Arc::new(Conn {
                    origin,
                    sni: None,
                    tls: false,
                    admitted,
                    activity: Arc::default(),
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

    async fn serve_tls(
        self: Arc<Self>,
        stream: TcpStream,
        origin: ConnectionOrigin,
        admitted: Held,
        handshake: Held,
    ) {
        // The handshake's futures are boxed, as the splice above is: a connection's task keeps
        // the size of its largest state for as long as it lives, and what an idle connection
        // holds is the HTTP state below.
        let acceptor = LazyConfigAcceptor::new(rustls::server::Acceptor::default(), stream);
        let start = match tokio::time::timeout(HANDSHAKE_TIMEOUT, Box::pin(acceptor)).await {
            Ok(Ok(s)) => s,
            Ok(Err(e)) => {
                crate::metrics::global().tls_handshake(HandshakeOutcome::Malformed);
                let reason = format!("malformed TLS ClientHello: {e}");
                return self.refused_connection(&origin, None, EventKind::TlsFailure, &reason);
            }
            Err(_) => {
                crate::metrics::global().tls_handshake(HandshakeOutcome::Timeout);
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
                crate::metrics::global().tls_handshake(HandshakeOutcome::MintFailed);
                let reason = format!("cannot mint a certificate for {leaf}: {}", error_chain(&e));
                return self.refused_connection(
                    &origin,
                    sni.as_deref(),
                    EventKind::TlsFailure,
                    &reason,
                );
            }
        };
        let tls = match tokio::time::timeout(HANDSHAKE_TIMEOUT, Box::pin(start.into_stream(config)))
            .await
        {
            Ok(Ok(t)) => {
                crate::metrics::global().tls_handshake(HandshakeOutcome::Ok);
                t
            }
            Ok(Err(e)) => {
                crate::metrics::global().tls_handshake(HandshakeOutcome::Failed);
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
                crate::metrics::global().tls_handshake(HandshakeOutcome::Timeout);
                let reason = "TLS handshake timed out";
                return self.refused_connection(
                    &origin,
                    sni.as_deref(),
                    EventKind::TlsFailure,
                    reason,
                );
            }
        };
        drop(handshake);
        let conn = Arc::new(Conn {
            origin,
            sni,
            tls: true,
            admitted,
            activity: Arc::default(),
        });
        self.serve_http(TokioIo::new(tls), conn).await;
    }

    async fn serve_http<I>(self: Arc<Self>, io: I, conn: Arc<Conn>)
    where
        I: hyper::rt::Read + hyper::rt::Write + Unpin + Send + 'static,
    {
        let proxy = self.clone();
        let service_conn = conn.clone();
        let epoch = Instant::now();
        let service = hyper::service::service_fn(move |req| {
            let proxy = proxy.clone();
            let conn = service_conn.clone();
            // Boxed: hyper keeps room for one in-flight request future in every connection,
            // idle or not, and this one's state machine is kilobytes. On the heap only while a
            // request is served, an idle connection holds a pointer.
            let serve: Pin<Box<dyn Future<Output = _> + Send>> = Box::pin(async move {
                Ok::<_, std::convert::Infallible>(proxy.serve_within_share(req, &conn, epoch).await)
            });
            serve
        });
        let mut builder = auto::Builder::new(TokioExecutor::new());
        // hyper's default of 100 header fields (431 past it) stays: setting it moves every
        // request's header array to the heap.
        builder
            .http1()
            .timer(TokioTimer::new())
            .header_read_timeout(self.deadlines.request_head)
            .max_buf_size(H1_MAX_HEAD);
        builder
            .http2()
            .max_concurrent_streams(H2_MAX_CONCURRENT_STREAMS)
            .max_header_list_size(H2_MAX_HEADER_LIST)
            .max_pending_accept_reset_streams(H2_MAX_PENDING_ACCEPT_RESETS)
            .max_local_error_reset_streams(H2_MAX_LOCAL_ERROR_RESETS);
        // The clock sees what the agent sent; the pace slows an agent over its request rate.
        let io = ReadClock {
            inner: Paced {
                io,
                conn: conn.clone(),
                wait: None,
            },
            activity: conn.activity.clone(),
            epoch,
        };
        let served = builder.serve_connection_with_upgrades(io, service);
        tokio::pin!(served);
        let result = tokio::select! {
            r = &mut served => r,
            () = idle(&conn.activity, epoch, self.deadlines) => {
                // Nothing in flight for too long (or no first request in time): let hyper
                // close it cleanly (HTTP/2 GOAWAY), then stop waiting.
                served.as_mut().graceful_shutdown();
                match tokio::time::timeout(HANDSHAKE_TIMEOUT, &mut served).await {
                    Ok(r) => r,
                    Err(_) => Ok(()),
                }
            }
        };
        if let Err(e) = result {
            // Malformed HTTP from the agent ends up here: the connection closes.
            info!(cgroup = %conn.origin.cgroup, pid = conn.origin.pid, error = %e, "agent connection ended with an error");
            let head_begun = conn.activity.head_begun();
            if let Some(reason) = protocol_violation(&*e, self.deadlines.request_head, head_begun) {
                let mut event = connection_event(&conn.origin, conn.sni.as_deref());
                event.kind = Some(EventKind::Denial);
                event.decision = Some(Decision::Deny);
                event.reason = Some(reason);
                event.side = Some(Side::Agent);
                self.shares.refusals().protocol_error(&conn.origin, event);
            }
        }
    }

    /// Serves a request within the agent's shares of requests per second and in flight; over
    /// either, a 429.
    async fn serve_within_share(
        &self,
        req: hyper::Request<hyper::body::Incoming>,
        conn: &Conn,
        epoch: Instant,
    ) -> hyper::Response<AgentBody> {
        let held = match self.shares.request(&conn.admitted) {
            Ok(held) => held,
            Err(refused) => {
                let mut event = record::request_event(&conn.origin, conn.sni.as_deref(), &req);
                event.status = Some(StatusCode::TOO_MANY_REQUESTS.as_u16());
                event.reason = Some(refused.reason.clone());
                event.side = Some(Side::Agent);
                let kind = refused.kind.unwrap_or(ShareKind::RequestsInFlight);
                self.shares
                    .refusals()
                    .refused_request(&conn.origin, kind, event);
                if kind == ShareKind::RequestsPerSecond
                    && let Some(_held) = conn.admitted.hold_refusal()
                {
                    tokio::time::sleep(RATE_REFUSAL_HOLD).await;
                }
                return reply::deny(
                    &conn.origin,
                    Denial {
                        status: StatusCode::TOO_MANY_REQUESTS,
                        reason: DenialReason::Limit(refused.reason),
                        rule: None,
                        retry_after: Some(Duration::from_secs(1)),
                    },
                );
            }
        };
        conn.activity.in_flight.fetch_add(1, Ordering::Relaxed);
        conn.activity.seen.store(true, Ordering::Relaxed);
        conn.activity.touch(epoch);
        let guard = RequestGuard {
            _held: held,
            activity: conn.activity.clone(),
            epoch,
        };
        self.serve_request(req, conn).await.map(|body| {
            Guarded {
                body,
                _guard: guard,
            }
            .boxed_unsync()
        })
    }

    /// Records a connection that never got to HTTP (TLS failure, unknown protocol).
    pub(super) fn refused_connection(
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
        let mut event = connection_event(origin, sni);
        event.kind = Some(kind);
        event.decision = Some(Decision::Deny);
        event.reason = Some(reason.to_string());
        event.side = Some(Side::Agent);
        self.events.record(event);
    }
}
