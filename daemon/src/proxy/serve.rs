//! One captured connection, from its first bytes to HTTP: a tcp rule splices it, TLS is
//! terminated with a leaf minted for its SNI (or the original IP), plain HTTP is served as is,
//! and anything else is refused and recorded.

use std::sync::Arc;

use agent_broker_core::fmt::error_chain;
use agent_broker_protocol::{Decision, EventKind, Side};
use hyper_util::{
    rt::{TokioExecutor, TokioIo},
    server::conn::auto,
};
use tokio::net::TcpStream;
use tokio_rustls::LazyConfigAcceptor;
use tracing::info;

use super::{
    ConnectionVerdict, HANDSHAKE_TIMEOUT, Proxy,
    record::connection_event,
    sniff::{Sniffed, peek_sni, sniff},
    tls::LeafName,
};
use crate::capture::ConnectionOrigin;

/// The per-connection context handed to every request.
pub(super) struct Conn {
    pub(super) origin: ConnectionOrigin,
    /// SNI, lowercase, when the agent spoke TLS and sent one.
    pub(super) sni: Option<String>,
    pub(super) tls: bool,
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
            && let Err(reason) = self.names.check(&origin, &name).await
        {
            return self.refused_connection(&origin, sni.as_deref(), EventKind::Denial, &reason);
        }
        self.splice(stream, origin, sni, rule, on_done).await
    }

    /// Serves one captured connection to completion.
    pub async fn serve(self: Arc<Self>, stream: TcpStream, origin: ConnectionOrigin) {
        let _ = stream.set_nodelay(true);
        // A tcp rule for the destination itself: splice at once (server-first protocols too).
        if let ConnectionVerdict::Splice {
            rule,
            on_done,
            bind_name,
        } = self.authorizer.connection(&origin, None)
        {
            return self
                .splice_proven(stream, origin, None, rule, on_done, bind_name)
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
                if let ConnectionVerdict::Splice {
                    rule,
                    on_done,
                    bind_name,
                } = self.authorizer.connection(&origin, sni.as_deref())
                {
                    return self
                        .splice_proven(stream, origin, sni, rule, on_done, bind_name)
                        .await;
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
            async move { Ok::<_, std::convert::Infallible>(proxy.serve_request(req, &conn).await) }
        });
        let builder = auto::Builder::new(TokioExecutor::new());
        if let Err(e) = builder.serve_connection_with_upgrades(io, service).await {
            // Malformed HTTP from the agent ends up here: the connection closes.
            info!(cgroup = %conn.origin.cgroup, pid = conn.origin.pid, error = %e, "agent connection ended with an error");
        }
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
