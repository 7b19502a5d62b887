//! Upstream connections: pooled HTTP clients that always dial the agent's original destination
//! and verify the server's certificate for the request's host.
//!
//! The host name used for SNI and certificate verification comes from the request URI (which
//! the proxy builds from the agreed SNI/Host), while the TCP connection always goes to the
//! original destination address the agent dialed: brokerd never resolves names itself, so an
//! agent cannot make it connect somewhere it did not. Verification uses the system roots plus
//! any `--upstream-ca` files; there is no way to turn it off.

use std::{
    collections::HashMap,
    future::Future,
    net::SocketAddr,
    path::{Path, PathBuf},
    pin::Pin,
    sync::Mutex,
    task::{Context, Poll},
    thread::ThreadId,
    time::Duration,
};

use bytes::Bytes;
use http_body_util::combinators::UnsyncBoxBody;
use hyper::Uri;
use hyper_rustls::HttpsConnector;
use hyper_util::{
    client::legacy::Client,
    rt::{TokioExecutor, TokioIo},
};
use rustls::{ClientConfig, RootCertStore, pki_types::CertificateDer};
use tokio::net::TcpStream;
use tracing::warn;

/// Request bodies sent upstream.
pub type UpstreamBody = UnsyncBoxBody<Bytes, hyper::Error>;
/// A pooled client for one original destination.
pub type UpstreamClient = Client<HttpsConnector<FixedDst>, UpstreamBody>;

/// How long an idle pooled upstream connection is kept.
const POOL_IDLE: Duration = Duration::from_secs(90);
/// Deadline for the TCP connect to the original destination.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(10);
/// Bound on the number of distinct destinations with a pool.
const MAX_DESTINATIONS: usize = 4096;

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

/// Pools of upstream connections, one per original destination and proxy thread.
///
/// brokerd serves connections on one single-threaded runtime per core, so keying the pools by
/// thread keeps an agent connection, its upstream connection and their tasks on one thread: a
/// request never wakes another core.
pub struct Upstream {
    tls: ClientConfig,
    clients: Mutex<HashMap<(SocketAddr, Protocols, ThreadId), UpstreamClient>>,
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
        let tls = ClientConfig::builder_with_provider(crate::tls::crypto_provider())
            .with_safe_default_protocol_versions()
            .map_err(UpstreamError::Tls)?
            .with_root_certificates(roots)
            .with_no_client_auth();
        Ok(Self {
            tls,
            clients: Mutex::new(HashMap::new()),
        })
    }

    /// The calling thread's pooled client that dials `dst` and may speak `protocols`.
    pub fn client(&self, dst: SocketAddr, protocols: Protocols) -> UpstreamClient {
        let key = (dst, protocols, std::thread::current().id());
        let mut clients = match self.clients.lock() {
            Ok(c) => c,
            Err(poisoned) => poisoned.into_inner(),
        };
        if let Some(c) = clients.get(&key) {
            return c.clone();
        }
        if clients.len() >= MAX_DESTINATIONS {
            // Dropping a client only drops its idle connections; requests in flight keep theirs.
            clients.clear();
        }
        let builder = hyper_rustls::HttpsConnectorBuilder::new()
            .with_tls_config(self.tls.clone())
            .https_or_http()
            .enable_http1();
        let connector = match protocols {
            Protocols::Any => builder.enable_http2().wrap_connector(FixedDst(dst)),
            Protocols::Http1Only => builder.wrap_connector(FixedDst(dst)),
        };
        let client = Client::builder(TokioExecutor::new())
            .pool_idle_timeout(POOL_IDLE)
            .build(connector);
        clients.insert(key, client.clone());
        client
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

/// A connector that ignores the URI's host and always dials one address.
#[derive(Clone, Copy, Debug)]
pub struct FixedDst(pub SocketAddr);

impl tower_service::Service<Uri> for FixedDst {
    type Response = TokioIo<TcpStream>;
    type Error = std::io::Error;
    type Future = Pin<Box<dyn Future<Output = Result<Self::Response, Self::Error>> + Send>>;

    fn poll_ready(&mut self, _: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, _uri: Uri) -> Self::Future {
        let dst = self.0;
        Box::pin(async move {
            let stream = tokio::time::timeout(CONNECT_TIMEOUT, TcpStream::connect(dst))
                .await
                .map_err(|_| {
                    std::io::Error::new(
                        std::io::ErrorKind::TimedOut,
                        format!("connect to {dst} timed out"),
                    )
                })??;
            stream.set_nodelay(true)?;
            Ok(TokioIo::new(stream))
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

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
