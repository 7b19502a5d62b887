//! A test HTTPS API: the "real" upstream that brokerd forwards to, with its own CA.
//!
//! [`TestCa`] is generated at runtime (rcgen) and written as PEM to a temp file for brokerd's
//! `--upstream-ca`. [`TestUpstream`] runs in-process on its own tokio runtime thread: a TLS
//! listener (ALPN h2 and/or http/1.1, hyper-util's auto server) on a loopback address such as
//! 127.0.0.2, and optionally a plain-HTTP listener on the same address. Endpoints:
//!
//! - `/hash`: JSON with the sha256 (hex) of the `Authorization` header, of `x-api-key`, of the
//!   query string, plus the HTTP version, Host, :authority, SNI and ALPN it saw;
//! - `/echo`: JSON `{"headers": {name: value}, "authorization_base64": ...}` of every request
//!   header (and the Authorization value in base64), and the `Authorization` value copied into
//!   the response header `x-echo-authorization` (the worst-case reflecting API that brokerd
//!   must scrub);
//! - `/stream`: [`STREAM_CHUNKS`] chunks of [`STREAM_CHUNK_LEN`] bytes, [`STREAM_GAP`] apart
//!   (chunked transfer over HTTP/1.1, DATA frames over h2);
//! - `/ws`: a WebSocket echo (HTTP/1.1 upgrade);
//! - `/bulk/down?bytes=N`: N pseudo-random bytes, streamed (the sha256 of each body sent in full
//!   is kept, see [`TestUpstream::bulk_sent`]); `/bulk/up`: hashes the request body as it
//!   arrives and answers its length and sha256;
//! - `/v1/...` (but `/v1/whoami`): 200 with what `/hash` says plus the method and path, an API
//!   shaped like the ones policies name paths of (`/v1/models`, `/v1/chat/completions`);
//! - `/reflect/...`: an API that hands back the credential it received (the token after
//!   `Bearer `) every way an attack run found around brokerd's scrubber (see [`reflect`]), and
//!   `/ws/reflect`, `/ws/deflate`: WebSocket endpoints that send it in fragmented frames, or
//!   accept `permessage-deflate` unasked.
//!
//! Every request is recorded as an [`UpstreamRequest`]: hashes and lengths, never values. A test
//! can register canaries ([`TestUpstream::watch_for`]); a request in which one occurs (in any
//! header, the path, the query or the body, in any encoding [`Canary::find_in`] knows) records
//! where, so "the attacker got nothing" and "the placeholder was not forwarded" are checkable.

use std::{
    collections::BTreeMap,
    convert::Infallible,
    net::{IpAddr, SocketAddr},
    path::{Path, PathBuf},
    sync::{
        Arc, Mutex,
        atomic::{AtomicUsize, Ordering},
    },
    thread,
    time::Duration,
};

use bytes::Bytes;
use futures_util::{SinkExt as _, StreamExt as _};
use http::{Request, Response, StatusCode, header};
use http_body_util::{BodyExt as _, Full, StreamBody, combinators::BoxBody};
use hyper::body::{Frame, Incoming};
use hyper_util::{
    rt::{TokioExecutor, TokioIo},
    server::conn::auto,
};
use rcgen::{
    BasicConstraints, CertificateParams, DistinguishedName, DnType, IsCa, Issuer, KeyPair,
    KeyUsagePurpose,
};
use rustls::{
    ServerConfig,
    pki_types::{CertificateDer, PrivateKeyDer, PrivatePkcs8KeyDer},
};
use serde::Serialize;
use sha2::{Digest as _, Sha256};
use tokio::sync::watch;
use tokio_tungstenite::{
    WebSocketStream,
    tungstenite::{Message, handshake::derive_accept_key, protocol::Role},
};

use crate::{
    canary::{Canary, sha256_hex},
    tcp_socket_owner,
};

/// `/stream`: how many chunks.
pub const STREAM_CHUNKS: usize = 5;
/// `/stream`: bytes per chunk (each ends with `\n`).
pub const STREAM_CHUNK_LEN: usize = 256;
/// `/stream`: pause between chunks.
pub const STREAM_GAP: Duration = Duration::from_millis(300);

/// `/bulk/down`: bytes per DATA frame / chunk.
const BULK_CHUNK: usize = 64 * 1024;

/// How long the LLM-shaped endpoints pause between the first streamed event and the rest, like a
/// model that reasons before it goes on.
pub const LLM_PAUSE: Duration = Duration::from_millis(1500);

/// A certificate authority of the test's own (ECDSA P-256), its certificate in a temp PEM file.
pub struct TestCa {
    issuer: Issuer<'static, KeyPair>,
    cert_der: CertificateDer<'static>,
    _dir: tempfile::TempDir,
    pem_path: PathBuf,
}

impl TestCa {
    /// A new CA whose common name is `name`.
    pub fn new(name: &str) -> Self {
        let key = KeyPair::generate().unwrap_or_else(|e| panic!("test CA key: {e}"));
        let mut params = CertificateParams::default();
        let mut dn = DistinguishedName::new();
        dn.push(DnType::CommonName, name);
        dn.push(DnType::OrganizationName, "agent-broker tests");
        params.distinguished_name = dn;
        params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        params.key_usages = vec![
            KeyUsagePurpose::KeyCertSign,
            KeyUsagePurpose::CrlSign,
            KeyUsagePurpose::DigitalSignature,
        ];
        let cert = params
            .self_signed(&key)
            .unwrap_or_else(|e| panic!("test CA certificate: {e}"));
        let dir = tempfile::Builder::new()
            .prefix("abtest-ca-")
            .tempdir()
            .unwrap_or_else(|e| panic!("temp dir for the test CA: {e}"));
        // A public certificate: an unprivileged brokerd (issue 19) reads it too.
        std::fs::set_permissions(
            dir.path(),
            std::os::unix::fs::PermissionsExt::from_mode(0o755),
        )
        .unwrap_or_else(|e| panic!("cannot open up the test CA's dir: {e}"));
        let pem_path = dir.path().join("test-ca.pem");
        std::fs::write(&pem_path, cert.pem())
            .unwrap_or_else(|e| panic!("cannot write {}: {e}", pem_path.display()));
        Self {
            issuer: Issuer::new(params, key),
            cert_der: cert.der().clone(),
            _dir: dir,
            pem_path,
        }
    }

    /// The CA certificate as a PEM file (for `--upstream-ca`).
    pub fn pem_path(&self) -> &Path {
        &self.pem_path
    }

    /// A server certificate chain and key for `names` (DNS names or IP literals).
    pub(crate) fn leaf(
        &self,
        names: &[String],
    ) -> (Vec<CertificateDer<'static>>, PrivateKeyDer<'static>) {
        let (cert, key) = self.issue(names);
        let key = PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(key.serialize_der()));
        (vec![cert.der().clone(), self.cert_der.clone()], key)
    }

    /// A server certificate chain (leaf, then this CA) and its private key for `names`, both as
    /// PEM, for servers outside this process (such as the gRPC server in [`crate::grpc`]).
    pub fn leaf_pem(&self, names: &[String]) -> (String, String) {
        let (cert, key) = self.issue(names);
        let ca = std::fs::read_to_string(&self.pem_path)
            .unwrap_or_else(|e| panic!("cannot read {}: {e}", self.pem_path.display()));
        (format!("{}{ca}", cert.pem()), key.serialize_pem())
    }

    /// A new key and a server certificate for `names` signed by this CA.
    fn issue(&self, names: &[String]) -> (rcgen::Certificate, KeyPair) {
        let key = KeyPair::generate().unwrap_or_else(|e| panic!("leaf key: {e}"));
        let mut params = CertificateParams::new(names.to_vec())
            .unwrap_or_else(|e| panic!("leaf params for {names:?}: {e}"));
        let mut dn = DistinguishedName::new();
        dn.push(
            DnType::CommonName,
            names.first().cloned().unwrap_or_default(),
        );
        params.distinguished_name = dn;
        params.extended_key_usages = vec![rcgen::ExtendedKeyUsagePurpose::ServerAuth];
        let cert = params
            .signed_by(&key, &self.issuer)
            .unwrap_or_else(|e| panic!("leaf for {names:?}: {e}"));
        (cert, key)
    }
}

/// Which ALPN protocols the TLS listener offers.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Alpn {
    /// h2 and http/1.1 (h2 preferred).
    Both,
    /// http/1.1 only.
    Http1Only,
}

/// How to start a [`TestUpstream`].
#[derive(Clone, Debug)]
pub struct UpstreamOptions {
    /// Address to listen on (port chosen by the kernel).
    pub ip: IpAddr,
    /// Names in the server certificate.
    pub names: Vec<String>,
    pub alpn: Alpn,
    /// Also listen for plain HTTP.
    pub plain: bool,
    /// Port of the plain-HTTP listener; 0 lets the kernel choose.
    pub plain_port: u16,
    /// Port of the TLS listener; 0 lets the kernel choose.
    pub port: u16,
    /// sha256 hex of the Authorization value `/v1/whoami` accepts (the demo's "real key").
    pub expect_authorization_sha256: Option<String>,
}

impl UpstreamOptions {
    /// 127.0.0.2, certificate for api.example.test and other.example.test, h2 + http/1.1,
    /// with a plain listener.
    pub fn api() -> Self {
        Self {
            ip: IpAddr::from([127, 0, 0, 2]),
            names: vec!["api.example.test".into(), "other.example.test".into()],
            alpn: Alpn::Both,
            plain: true,
            plain_port: 0,
            port: 0,
            expect_authorization_sha256: None,
        }
    }
}

/// One request the upstream received. Values never appear: only hashes, lengths and names.
#[derive(Clone, Debug, Serialize)]
pub struct UpstreamRequest {
    /// Whether it came over the TLS listener.
    pub tls: bool,
    /// The TCP peer and the pid owning the peer socket (brokerd's, when relayed).
    pub peer: SocketAddr,
    pub peer_owner: Option<u32>,
    pub sni: Option<String>,
    pub alpn: Option<String>,
    /// `HTTP/1.1` or `HTTP/2.0`.
    pub version: String,
    pub method: String,
    /// The path, without the query.
    pub path: String,
    /// The Host header, if any.
    pub host: Option<String>,
    /// The request URI's authority (h2 `:authority`), if any.
    pub authority: Option<String>,
    /// sha256 hex of each value of each header, by lowercase name.
    pub header_sha256: BTreeMap<String, Vec<String>>,
    /// sha256 hex of the query string (without `?`), if there is one.
    pub query_sha256: Option<String>,
    pub body_len: usize,
    /// Where a watched canary occurred, e.g. `secret in header authorization (raw)`.
    pub canary_hits: Vec<String>,
}

impl UpstreamRequest {
    /// sha256 of the (single) value of header `name`.
    pub fn header_hash(&self, name: &str) -> Option<&str> {
        self.header_sha256
            .get(name)
            .and_then(|v| v.first())
            .map(String::as_str)
    }
}

#[derive(Default)]
struct State {
    requests: Mutex<Vec<UpstreamRequest>>,
    /// TCP connections accepted, TLS handshakes completed.
    accepted: AtomicUsize,
    handshakes: AtomicUsize,
    canaries: Mutex<Vec<(String, Canary)>>,
    /// WebSocket messages echoed.
    ws_messages: AtomicUsize,
    /// `/bulk/down` bodies sent in full: (length, sha256 hex), in order.
    bulk_sent: Mutex<Vec<(u64, String)>>,
    /// What `/v1/whoami` accepts.
    expect_authorization_sha256: Option<String>,
    /// The credential `/reflect/store` kept for `/reflect/load`.
    stored: Mutex<Option<String>>,
}

/// An HTTPS (and optionally plain HTTP) test API on a loopback address; stopped on Drop.
pub struct TestUpstream {
    tls_addr: SocketAddr,
    plain_addr: Option<SocketAddr>,
    state: Arc<State>,
    shutdown: Option<watch::Sender<bool>>,
    thread: Option<thread::JoinHandle<()>>,
}

/// The connection a request came on.
#[derive(Clone)]
struct ConnInfo {
    tls: bool,
    peer: SocketAddr,
    peer_owner: Option<u32>,
    sni: Option<String>,
    alpn: Option<String>,
    /// `/attack/conn-auth`: a request with an Authorization header authenticated this
    /// connection (as upstreams that authenticate connections, not requests, do).
    authenticated: Arc<std::sync::atomic::AtomicBool>,
}

impl TestUpstream {
    /// Starts the API with a certificate from `ca`.
    pub fn start(ca: &TestCa, options: UpstreamOptions) -> Self {
        let (chain, key) = ca.leaf(&options.names);
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let mut config = ServerConfig::builder_with_provider(provider)
            .with_safe_default_protocol_versions()
            .unwrap_or_else(|e| panic!("rustls protocol versions: {e}"))
            .with_no_client_auth()
            .with_single_cert(chain, key)
            .unwrap_or_else(|e| panic!("upstream server config: {e}"));
        config.alpn_protocols = match options.alpn {
            Alpn::Both => vec![b"h2".to_vec(), b"http/1.1".to_vec()],
            Alpn::Http1Only => vec![b"http/1.1".to_vec()],
        };
        let config = Arc::new(config);

        let bind = |what: &str, port: u16| {
            let l = std::net::TcpListener::bind(SocketAddr::new(options.ip, port)).unwrap_or_else(
                |e| panic!("cannot bind the {what} upstream on {}: {e}", options.ip),
            );
            l.set_nonblocking(true)
                .unwrap_or_else(|e| panic!("set_nonblocking: {e}"));
            l
        };
        let tls_listener = bind("TLS", options.port);
        let plain_listener = options.plain.then(|| bind("plain", options.plain_port));
        let tls_addr = tls_listener
            .local_addr()
            .unwrap_or_else(|e| panic!("local_addr: {e}"));
        let plain_addr = plain_listener
            .as_ref()
            .map(|l| l.local_addr().unwrap_or_else(|e| panic!("local_addr: {e}")));

        let state = Arc::new(State {
            expect_authorization_sha256: options.expect_authorization_sha256.clone(),
            ..State::default()
        });
        let (tx, rx) = watch::channel(false);
        let thread = {
            let state = state.clone();
            thread::Builder::new()
                .name("abtest-upstream".into())
                .spawn(move || {
                    let rt = tokio::runtime::Builder::new_multi_thread()
                        .worker_threads(2)
                        .enable_all()
                        .build()
                        .unwrap_or_else(|e| panic!("upstream runtime: {e}"));
                    rt.block_on(async move {
                        let tls = tokio::net::TcpListener::from_std(tls_listener)
                            .unwrap_or_else(|e| panic!("tokio listener: {e}"));
                        let acceptor = tokio_rustls::TlsAcceptor::from(config);
                        let mut tasks = vec![tokio::spawn(accept_loop(
                            tls,
                            Some(acceptor),
                            state.clone(),
                            rx.clone(),
                        ))];
                        if let Some(plain) = plain_listener {
                            let plain = tokio::net::TcpListener::from_std(plain)
                                .unwrap_or_else(|e| panic!("tokio listener: {e}"));
                            tasks.push(tokio::spawn(accept_loop(
                                plain,
                                None,
                                state.clone(),
                                rx.clone(),
                            )));
                        }
                        let mut rx = rx;
                        while !*rx.borrow() {
                            if rx.changed().await.is_err() {
                                break;
                            }
                        }
                        for t in tasks {
                            t.abort();
                        }
                    });
                    rt.shutdown_timeout(Duration::from_secs(1));
                })
                .unwrap_or_else(|e| panic!("cannot start the upstream thread: {e}"))
        };
        Self {
            tls_addr,
            plain_addr,
            state,
            shutdown: Some(tx),
            thread: Some(thread),
        }
    }

    /// The TLS listener.
    pub fn addr(&self) -> SocketAddr {
        self.tls_addr
    }

    pub fn port(&self) -> u16 {
        self.tls_addr.port()
    }

    /// The plain-HTTP listener; panics when it was not asked for.
    pub fn plain_addr(&self) -> SocketAddr {
        self.plain_addr
            .unwrap_or_else(|| panic!("this upstream has no plain HTTP listener"))
    }

    /// Every request received so far, oldest first.
    pub fn requests(&self) -> Vec<UpstreamRequest> {
        self.state
            .requests
            .lock()
            .map(|r| r.clone())
            .unwrap_or_default()
    }

    /// The latest request for `path`, which must have come from the socket of process
    /// `broker_pid` (brokerd's) with the canary watched as "secret" in its Authorization header
    /// and nowhere else: a key brokerd injected. `what` names the call in failures.
    pub fn assert_injected_by(&self, what: &str, path: &str, broker_pid: u32) -> UpstreamRequest {
        let record = self
            .requests()
            .into_iter()
            .rev()
            .find(|r| r.path == path)
            .unwrap_or_else(|| panic!("{what}: the API has no record of a request for {path}"));
        assert_eq!(
            record.peer_owner,
            Some(broker_pid),
            "{what}: the API's peer socket must be brokerd's: {record:?}"
        );
        assert_eq!(
            record.canary_hits,
            vec!["secret in header authorization (raw)".to_string()],
            "{what}: the secret must reach the API in Authorization only: {record:?}"
        );
        record
    }

    /// TCP connections accepted on either listener.
    pub fn connections(&self) -> usize {
        self.state.accepted.load(Ordering::Relaxed)
    }

    /// TLS handshakes completed.
    pub fn handshakes(&self) -> usize {
        self.state.handshakes.load(Ordering::Relaxed)
    }

    /// WebSocket messages echoed.
    /// The `/bulk/down` bodies sent in full so far: (length, sha256 hex of the bytes).
    pub fn bulk_sent(&self) -> Vec<(u64, String)> {
        self.state
            .bulk_sent
            .lock()
            .map(|v| v.clone())
            .unwrap_or_default()
    }

    pub fn ws_messages(&self) -> usize {
        self.state.ws_messages.load(Ordering::Relaxed)
    }

    /// Record where `canary` occurs in requests from now on, under `label`.
    pub fn watch_for(&self, label: &str, canary: &Canary) {
        if let Ok(mut c) = self.state.canaries.lock() {
            c.push((label.to_string(), canary.clone()));
        }
    }

    /// Waits up to `timeout` for a request matching `pred`.
    pub fn wait_request(
        &self,
        timeout: Duration,
        pred: impl Fn(&UpstreamRequest) -> bool,
    ) -> Option<UpstreamRequest> {
        crate::poll_until(timeout, || self.requests().into_iter().find(|r| pred(r)))
    }
}

impl Drop for TestUpstream {
    fn drop(&mut self) {
        if let Some(tx) = self.shutdown.take() {
            let _ = tx.send(true);
        }
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

async fn accept_loop(
    listener: tokio::net::TcpListener,
    tls: Option<tokio_rustls::TlsAcceptor>,
    state: Arc<State>,
    mut stop: watch::Receiver<bool>,
) {
    loop {
        let (stream, peer) = tokio::select! {
            r = listener.accept() => match r {
                Ok(pair) => pair,
                Err(_) => {
                    tokio::time::sleep(Duration::from_millis(20)).await;
                    continue;
                }
            },
            _ = stop.changed() => return,
        };
        state.accepted.fetch_add(1, Ordering::Relaxed);
        // Look the owner up now, while the peer socket certainly exists.
        let peer_owner = tokio::task::spawn_blocking(move || tcp_socket_owner(peer))
            .await
            .ok()
            .flatten();
        let state = state.clone();
        let tls = tls.clone();
        tokio::spawn(async move {
            let _ = stream.set_nodelay(true);
            match tls {
                Some(acceptor) => {
                    let Ok(Ok(stream)) =
                        tokio::time::timeout(Duration::from_secs(10), acceptor.accept(stream))
                            .await
                    else {
                        return;
                    };
                    state.handshakes.fetch_add(1, Ordering::Relaxed);
                    let (_, conn) = stream.get_ref();
                    let info = ConnInfo {
                        tls: true,
                        peer,
                        peer_owner,
                        sni: conn.server_name().map(str::to_string),
                        alpn: conn
                            .alpn_protocol()
                            .map(|p| String::from_utf8_lossy(p).into_owned()),
                        authenticated: Arc::default(),
                    };
                    serve(TokioIo::new(stream), info, state).await;
                }
                None => {
                    let info = ConnInfo {
                        tls: false,
                        peer,
                        peer_owner,
                        sni: None,
                        alpn: None,
                        authenticated: Arc::default(),
                    };
                    serve(TokioIo::new(stream), info, state).await;
                }
            }
        });
    }
}

type Body = BoxBody<Bytes, Infallible>;

async fn serve<I>(io: I, info: ConnInfo, state: Arc<State>)
where
    I: hyper::rt::Read + hyper::rt::Write + Unpin + Send + 'static,
{
    let service = hyper::service::service_fn(move |req| {
        let info = info.clone();
        let state = state.clone();
        async move { Ok::<_, Infallible>(respond(req, &info, &state).await) }
    });
    let _ = auto::Builder::new(TokioExecutor::new())
        .serve_connection_with_upgrades(io, service)
        .await;
}

fn full(bytes: impl Into<Bytes>) -> Body {
    Full::new(bytes.into()).boxed()
}

fn json(status: StatusCode, value: &serde_json::Value) -> Response<Body> {
    let mut r = Response::new(full(serde_json::to_vec(value).unwrap_or_default()));
    *r.status_mut() = status;
    r.headers_mut().insert(
        header::CONTENT_TYPE,
        header::HeaderValue::from_static("application/json"),
    );
    r
}

fn version_name(v: http::Version) -> String {
    format!("{v:?}")
}

async fn respond(
    mut req: Request<Incoming>,
    info: &ConnInfo,
    state: &Arc<State>,
) -> Response<Body> {
    let is_ws = matches!(req.uri().path(), "/ws" | "/ws/reflect" | "/ws/deflate");
    let upgrade = is_ws.then(|| hyper::upgrade::on(&mut req));
    let (parts, body) = req.into_parts();
    // `/bulk/up` is hashed as it arrives, never held whole.
    let mut upload = None;
    let body = if is_ws {
        Bytes::new()
    } else if parts.uri.path() == "/bulk/up" {
        upload = Some(hash_upload(body).await);
        Bytes::new()
    } else {
        match body.collect().await {
            Ok(b) => b.to_bytes(),
            Err(_) => Bytes::new(),
        }
    };

    let mut header_sha256: BTreeMap<String, Vec<String>> = BTreeMap::new();
    for (name, value) in &parts.headers {
        header_sha256
            .entry(name.as_str().to_string())
            .or_default()
            .push(sha256_hex(value.as_bytes()));
    }
    let query = parts.uri.query().map(str::to_string);
    let mut hits = Vec::new();
    if let Ok(canaries) = state.canaries.lock() {
        for (label, canary) in canaries.iter() {
            for (name, value) in &parts.headers {
                if let Some((enc, _)) = canary.find_in(value.as_bytes()) {
                    hits.push(format!("{label} in header {name} ({enc})"));
                }
            }
            if let Some((enc, _)) = canary.find_in(parts.uri.path().as_bytes()) {
                hits.push(format!("{label} in the path ({enc})"));
            }
            if let Some(q) = &query
                && let Some((enc, _)) = canary.find_in(q.as_bytes())
            {
                hits.push(format!("{label} in the query ({enc})"));
            }
            if let Some((enc, _)) = canary.find_in(&body) {
                hits.push(format!("{label} in the body ({enc})"));
            }
        }
    }
    let host = parts
        .headers
        .get(header::HOST)
        .and_then(|h| h.to_str().ok())
        .map(str::to_string);
    let authority = parts.uri.authority().map(|a| a.to_string());
    let record = UpstreamRequest {
        tls: info.tls,
        peer: info.peer,
        peer_owner: info.peer_owner,
        sni: info.sni.clone(),
        alpn: info.alpn.clone(),
        version: version_name(parts.version),
        method: parts.method.to_string(),
        path: parts.uri.path().to_string(),
        host: host.clone(),
        authority: authority.clone(),
        header_sha256,
        query_sha256: query.as_deref().map(|q| sha256_hex(q.as_bytes())),
        body_len: upload.as_ref().map_or(body.len(), |u| u.len),
        canary_hits: hits,
    };
    if let Ok(mut r) = state.requests.lock() {
        r.push(record.clone());
    }

    match parts.uri.path() {
        "/hash" => json(
            StatusCode::OK,
            &serde_json::json!({
                "authorization_sha256": record.header_hash("authorization"),
                "x_api_key_sha256": record.header_hash("x-api-key"),
                "query_sha256": record.query_sha256,
                "version": record.version,
                "host": host,
                "authority": authority,
                "sni": info.sni,
                "alpn": info.alpn,
            }),
        ),
        "/echo" => {
            let headers: serde_json::Map<String, serde_json::Value> = parts
                .headers
                .iter()
                .map(|(n, v)| {
                    (
                        n.as_str().to_string(),
                        serde_json::Value::String(String::from_utf8_lossy(v.as_bytes()).into()),
                    )
                })
                .collect();
            // Also the Authorization value in base64, as some debug endpoints echo it.
            let b64 = parts
                .headers
                .get(header::AUTHORIZATION)
                .map(|v| data_encoding::BASE64.encode(v.as_bytes()));
            let mut r = json(
                StatusCode::OK,
                &serde_json::json!({ "headers": headers, "authorization_base64": b64 }),
            );
            if let Some(auth) = parts.headers.get(header::AUTHORIZATION) {
                r.headers_mut().insert("x-echo-authorization", auth.clone());
            }
            r
        }
        "/v1/whoami" => {
            let got = record.header_hash("authorization");
            let authorized = got.is_some() && got == state.expect_authorization_sha256.as_deref();
            let status = if authorized {
                StatusCode::OK
            } else {
                StatusCode::UNAUTHORIZED
            };
            json(
                status,
                &serde_json::json!({ "authorized": authorized, "authorization_sha256": got }),
            )
        }
        "/stream" => {
            let stream = futures_util::stream::unfold(0usize, |i| async move {
                if i >= STREAM_CHUNKS {
                    return None;
                }
                if i > 0 {
                    tokio::time::sleep(STREAM_GAP).await;
                }
                let mut line = format!("chunk {i} ");
                while line.len() < STREAM_CHUNK_LEN - 1 {
                    line.push('.');
                }
                line.push('\n');
                Some((Ok::<_, Infallible>(Frame::data(Bytes::from(line))), i + 1))
            });
            let mut r = Response::new(BoxBody::new(StreamBody::new(stream)));
            r.headers_mut().insert(
                header::CONTENT_TYPE,
                header::HeaderValue::from_static("text/plain"),
            );
            r
        }
        "/ws" => websocket(&parts, upgrade, state),
        "/ws/reflect" | "/ws/deflate" => reflect_websocket(&parts, upgrade),
        p if p.starts_with("/reflect/") => reflect(&parts, state),
        "/bulk/up" => json(
            StatusCode::OK,
            &serde_json::json!({
                "len": record.body_len,
                "sha256": upload.map(|u| u.sha256),
                "authorization_sha256": record.header_hash("authorization"),
            }),
        ),
        "/bulk/down" => bulk_down(query.as_deref(), state),
        // The shapes of the OpenAI and Anthropic APIs (POST), as their official SDKs read them;
        // the reply says which credential arrived (hashes only).
        "/v1/chat/completions" | "/v1/messages" if parts.method == http::Method::POST => {
            llm(parts.uri.path(), &body, &record)
        }
        p if p.starts_with("/attack/") => attack(p, query.as_deref(), &record, info).await,
        // An API shaped like the LLM APIs policies are written for (`/v1/models`,
        // `/v1/chat/completions`, ...): what `/hash` says, plus the method and path it saw.
        p if p.starts_with("/v1/") => json(
            StatusCode::OK,
            &serde_json::json!({
                "method": record.method,
                "path": record.path,
                "authorization_sha256": record.header_hash("authorization"),
                "x_api_key_sha256": record.header_hash("x-api-key"),
                "query_sha256": record.query_sha256,
                "body_len": record.body_len,
                "version": record.version,
                "host": host,
                "authority": authority,
                "sni": info.sni,
            }),
        ),
        _ => json(
            StatusCode::NOT_FOUND,
            &serde_json::json!({"error": "no such endpoint", "path": parts.uri.path()}),
        ),
    }
}

/// What an upload hashed to.
struct Upload {
    len: usize,
    sha256: String,
}

async fn hash_upload(mut body: Incoming) -> Upload {
    let mut hasher = Sha256::new();
    let mut len = 0;
    while let Some(Ok(frame)) = body.frame().await {
        if let Ok(data) = frame.into_data() {
            len += data.len();
            hasher.update(&data);
        }
    }
    Upload {
        len,
        sha256: data_encoding::HEXLOWER.encode(&hasher.finalize()),
    }
}

/// `/bulk/down?bytes=N`: N pseudo-random bytes (a splitmix64 stream), generated and hashed as
/// they are sent; a body sent in full is recorded in [`TestUpstream::bulk_sent`].
fn bulk_down(query: Option<&str>, state: &Arc<State>) -> Response<Body> {
    let total: u64 = query
        .and_then(|q| q.strip_prefix("bytes="))
        .and_then(|n| n.parse().ok())
        .unwrap_or(0);
    struct Gen {
        left: u64,
        x: u64,
        hasher: Sha256,
        state: Arc<State>,
        total: u64,
    }
    let start = Gen {
        left: total,
        x: 0x9e37_79b9_7f4a_7c15,
        hasher: Sha256::new(),
        state: state.clone(),
        total,
    };
    let stream = futures_util::stream::unfold(start, |mut g| async move {
        if g.left == 0 {
            let sha = data_encoding::HEXLOWER.encode(&g.hasher.finalize());
            if let Ok(mut sent) = g.state.bulk_sent.lock() {
                sent.push((g.total, sha));
            }
            return None;
        }
        let n = usize::try_from(g.left).map_or(BULK_CHUNK, |l| l.min(BULK_CHUNK));
        let mut chunk = Vec::with_capacity(n + 8);
        while chunk.len() < n {
            g.x = g.x.wrapping_add(0x9e37_79b9_7f4a_7c15);
            let mut z = g.x;
            z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
            z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
            chunk.extend_from_slice(&(z ^ (z >> 31)).to_le_bytes());
        }
        chunk.truncate(n);
        g.hasher.update(&chunk);
        g.left -= n as u64;
        Some((Ok::<_, Infallible>(Frame::data(Bytes::from(chunk))), g))
    });
    let mut r = Response::new(BoxBody::new(StreamBody::new(stream)));
    r.headers_mut().insert(
        header::CONTENT_TYPE,
        header::HeaderValue::from_static("application/octet-stream"),
    );
    r
}

fn websocket(
    parts: &http::request::Parts,
    upgrade: Option<hyper::upgrade::OnUpgrade>,
    state: &Arc<State>,
) -> Response<Body> {
    let key = parts.headers.get("sec-websocket-key");
    let wants = parts
        .headers
        .get(header::UPGRADE)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|v| v.eq_ignore_ascii_case("websocket"));
    let (Some(key), true, Some(upgrade)) = (key, wants, upgrade) else {
        return json(
            StatusCode::BAD_REQUEST,
            &serde_json::json!({"error": "not a websocket upgrade"}),
        );
    };
    let accept = derive_accept_key(key.as_bytes());
    let state = state.clone();
    tokio::spawn(async move {
        let Ok(upgraded) = upgrade.await else { return };
        let mut ws =
            WebSocketStream::from_raw_socket(TokioIo::new(upgraded), Role::Server, None).await;
        while let Some(Ok(msg)) = ws.next().await {
            match msg {
                Message::Text(_) | Message::Binary(_) => {
                    state.ws_messages.fetch_add(1, Ordering::Relaxed);
                    if ws.send(msg).await.is_err() {
                        break;
                    }
                }
                Message::Close(_) => {
                    let _ = ws.close(None).await;
                    break;
                }
                _ => {}
            }
        }
    });
    let mut r = Response::new(full(Bytes::new()));
    *r.status_mut() = StatusCode::SWITCHING_PROTOCOLS;
    let h = r.headers_mut();
    h.insert(
        header::UPGRADE,
        header::HeaderValue::from_static("websocket"),
    );
    h.insert(
        header::CONNECTION,
        header::HeaderValue::from_static("Upgrade"),
    );
    if let Ok(v) = header::HeaderValue::from_str(&accept) {
        h.insert("sec-websocket-accept", v);
    }
    r
}

/// An LLM API answer: JSON, or with `"stream": true` server-sent events, the first at once and
/// the rest after [`LLM_PAUSE`]. The text names the hashes of the credentials that arrived.
fn llm(path: &str, body: &[u8], record: &UpstreamRequest) -> Response<Body> {
    let request: serde_json::Value = serde_json::from_slice(body).unwrap_or_default();
    let stream = request["stream"].as_bool().unwrap_or(false);
    let credential = format!(
        "auth={} key={}",
        record.header_hash("authorization").unwrap_or_default(),
        record.header_hash("x-api-key").unwrap_or_default()
    );
    let openai = path == "/v1/chat/completions";
    if !stream {
        let answer = if openai {
            serde_json::json!({
                "id": "chatcmpl-abtest", "object": "chat.completion", "created": 0,
                "model": "abtest", "choices": [{"index": 0, "finish_reason": "stop",
                "message": {"role": "assistant", "content": credential}}],
                "usage": {"prompt_tokens": 1, "completion_tokens": 1, "total_tokens": 2}
            })
        } else {
            serde_json::json!({
                "id": "msg_abtest", "type": "message", "role": "assistant", "model": "abtest",
                "content": [{"type": "text", "text": credential}], "stop_reason": "end_turn",
                "stop_sequence": null, "usage": {"input_tokens": 1, "output_tokens": 1}
            })
        };
        return json(StatusCode::OK, &answer);
    }
    let (first, rest): (Vec<String>, Vec<String>) = if openai {
        let chunk = |content: &str, finish: serde_json::Value| {
            format!(
                "data: {}\n\n",
                serde_json::json!({
                    "id": "chatcmpl-abtest", "object": "chat.completion.chunk", "created": 0,
                    "model": "abtest", "choices": [{"index": 0, "delta": {"content": content},
                    "finish_reason": finish}]
                })
            )
        };
        (
            vec![chunk("first ", serde_json::Value::Null)],
            vec![
                chunk(&credential, serde_json::Value::Null),
                chunk("", "stop".into()),
                "data: [DONE]\n\n".to_string(),
            ],
        )
    } else {
        let event =
            |name: &str, data: serde_json::Value| format!("event: {name}\ndata: {data}\n\n");
        let delta = |text: &str| {
            event(
                "content_block_delta",
                serde_json::json!({"type": "content_block_delta", "index": 0,
                    "delta": {"type": "text_delta", "text": text}}),
            )
        };
        (
            vec![
                event(
                    "message_start",
                    serde_json::json!({"type": "message_start", "message": {
                    "id": "msg_abtest", "type": "message", "role": "assistant", "model": "abtest",
                    "content": [], "stop_reason": null, "stop_sequence": null,
                    "usage": {"input_tokens": 1, "output_tokens": 0}}}),
                ),
                event(
                    "content_block_start",
                    serde_json::json!({"type": "content_block_start",
                    "index": 0, "content_block": {"type": "text", "text": ""}}),
                ),
                delta("first "),
            ],
            vec![
                delta(&credential),
                event(
                    "content_block_stop",
                    serde_json::json!({"type": "content_block_stop", "index": 0}),
                ),
                event(
                    "message_delta",
                    serde_json::json!({"type": "message_delta",
                    "delta": {"stop_reason": "end_turn", "stop_sequence": null},
                    "usage": {"output_tokens": 2}}),
                ),
                event("message_stop", serde_json::json!({"type": "message_stop"})),
            ],
        )
    };
    let first = Bytes::from(first.concat());
    let rest = Bytes::from(rest.concat());
    let stream = futures_util::stream::unfold(0u8, move |step| {
        let (first, rest) = (first.clone(), rest.clone());
        async move {
            match step {
                0 => Some((Ok::<_, Infallible>(Frame::data(first)), 1)),
                1 => {
                    tokio::time::sleep(LLM_PAUSE).await;
                    Some((Ok(Frame::data(rest)), 2))
                }
                _ => None,
            }
        }
    });
    let mut r = Response::new(BoxBody::new(StreamBody::new(stream)));
    r.headers_mut().insert(
        header::CONTENT_TYPE,
        header::HeaderValue::from_static("text/event-stream"),
    );
    r
}

/// The endpoints of the issue-13 attack tests (`tests/tests/attack_audit.rs`):
///
/// - `/attack/slow?ms=N`: answers after N ms (a request the agent abandons, or brokerd is killed
///   during);
/// - `/attack/big-usage?tokens=T&pad=B`: an OpenAI-shaped JSON answer with B bytes of choices
///   before its `usage` of T tokens (n > 1, logprobs);
/// - `/attack/stream-cut?events=N`: an event stream of N chunks at once, then silence for 60 s
///   before its usage event (a stream the agent cuts before its usage);
/// - `/attack/conn-auth`: authenticates the connection when the request carries an
///   Authorization header, and says whether the connection is authenticated.
///
/// And of the issue-17 protocol attacks (`tests/tests/attacks_wire.rs`):
///
/// - `/attack/bomb?coding=gzip|br&mb=N`: N MiB of zeros (64 unless given) compressed with that
///   `Content-Encoding` into a few KiB (gzip as concatenated members of 1 MiB each);
/// - `/attack/bomb?coding=gzip&garbage=1`: `Content-Encoding: gzip` over bytes that are not;
/// - `/attack/bomb?coding=x-abtest`: a content coding nobody knows;
/// - `/attack/lying-length`: `Content-Length: 1000` over a body of 10 bytes.
async fn attack(
    path: &str,
    query: Option<&str>,
    record: &UpstreamRequest,
    info: &ConnInfo,
) -> Response<Body> {
    let param = |name: &str| -> u64 {
        query
            .unwrap_or_default()
            .split('&')
            .find_map(|kv| kv.strip_prefix(name)?.strip_prefix('='))
            .and_then(|v| v.parse().ok())
            .unwrap_or(0)
    };
    match path {
        "/attack/slow" => {
            tokio::time::sleep(Duration::from_millis(param("ms"))).await;
            json(StatusCode::OK, &serde_json::json!({"slow": true}))
        }
        "/attack/big-usage" => {
            let pad = usize::try_from(param("pad")).unwrap_or(0);
            let mut body = String::from(r#"{"id":"chatcmpl-abtest","choices":["#);
            while body.len() < pad {
                body.push_str(r#"{"index":0,"logprobs":{"content":[{"token":"a","logprob":-0.1}]},"message":{"content":"abtest padding"}},"#);
            }
            body.push_str(&format!(
                r#"{{"index":0}}],"usage":{{"prompt_tokens":0,"completion_tokens":{t},"total_tokens":{t}}}}}"#,
                t = param("tokens")
            ));
            let mut r = Response::new(BoxBody::new(Full::new(Bytes::from(body))));
            r.headers_mut().insert(
                header::CONTENT_TYPE,
                header::HeaderValue::from_static("application/json"),
            );
            r
        }
        "/attack/stream-cut" => {
            let events = param("events");
            let mut first = String::new();
            for i in 0..events {
                first.push_str(&format!(
                    "data: {}\n\n",
                    serde_json::json!({"object": "chat.completion.chunk", "choices": [{"index": 0,
                        "delta": {"content": format!("token {i} of a long answer")}}]})
                ));
            }
            let last = "data: {\"choices\":[],\"usage\":{\"total_tokens\":1}}\n\ndata: [DONE]\n\n";
            let stream = futures_util::stream::unfold(0u8, move |step| {
                let first = first.clone();
                async move {
                    let data = match step {
                        0 => Bytes::from(first),
                        1 => {
                            tokio::time::sleep(Duration::from_secs(60)).await;
                            Bytes::from_static(last.as_bytes())
                        }
                        _ => return None,
                    };
                    Some((Ok::<_, Infallible>(Frame::data(data)), step + 1))
                }
            });
            let mut r = Response::new(BoxBody::new(StreamBody::new(stream)));
            r.headers_mut().insert(
                header::CONTENT_TYPE,
                header::HeaderValue::from_static("text/event-stream"),
            );
            r
        }
        "/attack/bomb" => bomb(
            query.unwrap_or_default(),
            param("mb"),
            param("garbage") == 1,
        ),
        "/attack/lying-length" => {
            // Streamed, so hyper cannot put the true length in its place.
            let stream = futures_util::stream::iter([Ok::<_, Infallible>(Frame::data(
                Bytes::from_static(b"ten bytes!"),
            ))]);
            let mut r = Response::new(BoxBody::new(StreamBody::new(stream)));
            r.headers_mut().insert(
                header::CONTENT_LENGTH,
                header::HeaderValue::from_static("1000"),
            );
            r
        }
        "/attack/conn-auth" => {
            use std::sync::atomic::Ordering::SeqCst;
            if record.header_hash("authorization").is_some() {
                info.authenticated.store(true, SeqCst);
            }
            json(
                StatusCode::OK,
                &serde_json::json!({
                    "authenticated": info.authenticated.load(SeqCst),
                    "authorization_sha256": record.header_hash("authorization"),
                }),
            )
        }
        _ => json(
            StatusCode::NOT_FOUND,
            &serde_json::json!({"error": "no such attack endpoint", "path": path}),
        ),
    }
}

/// `/attack/bomb`: see [`attack`].
fn bomb(query: &str, mb: u64, garbage: bool) -> Response<Body> {
    let coding = query
        .split('&')
        .find_map(|kv| kv.strip_prefix("coding="))
        .unwrap_or("gzip")
        .to_string();
    let mib = usize::try_from(if mb == 0 { 64 } else { mb }).unwrap_or(64);
    let zeros = vec![0u8; 1 << 20];
    let body: Vec<u8> = match coding.as_str() {
        _ if garbage => b"this is not what its Content-Encoding says".to_vec(),
        "gzip" => {
            use std::io::Write as _;
            let mut gz = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::best());
            let _ = gz.write_all(&zeros);
            let member = gz.finish().unwrap_or_default();
            member.repeat(mib)
        }
        "br" => {
            use std::io::Write as _;
            let mut out = Vec::new();
            {
                let mut br = brotli::CompressorWriter::new(&mut out, 4096, 1, 22);
                for _ in 0..mib {
                    let _ = br.write_all(&zeros);
                }
            }
            out
        }
        _ => b"abtest".to_vec(),
    };
    let mut r = Response::new(full(body));
    if let Ok(v) = header::HeaderValue::from_str(&coding) {
        r.headers_mut().insert(header::CONTENT_ENCODING, v);
    }
    r.headers_mut().insert(
        header::CONTENT_TYPE,
        header::HeaderValue::from_static("application/octet-stream"),
    );
    r
}

/// The credential of a request: the token after `Bearer ` in its Authorization header.
fn credential(parts: &http::request::Parts) -> String {
    parts
        .headers
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .map(|v| v.strip_prefix("Bearer ").unwrap_or(v).to_string())
        .unwrap_or_default()
}

/// `/reflect/...`: hands the credential back where a careless or hostile API might.
///
/// - `trailer`: a gRPC-style answer whose `grpc-message` trailer quotes it;
/// - `reason`: 401 with a reason phrase quoting it (HTTP/1.1 only);
/// - `header-name`: a response header named `x-echo-<credential>`;
/// - `te-gzip`: `Transfer-Encoding: gzip, chunked`, the body gzip-compressed (HTTP/1.1 only);
/// - `encodings`: JSON with it in hex, both cases, and JSON-escaped character by character
///   (`\u`, both cases), then MIME base64 of a header block holding it, wrapped at 76 (CRLF)
///   and at 64 (LF);
/// - `store`: keeps it; `load`: hands back what `store` kept, in the body and a header.
fn reflect(parts: &http::request::Parts, state: &Arc<State>) -> Response<Body> {
    let key = credential(parts);
    match parts.uri.path() {
        "/reflect/trailer" => {
            let mut trailers = http::HeaderMap::new();
            trailers.insert("grpc-status", header::HeaderValue::from_static("16"));
            if let Ok(v) = header::HeaderValue::from_str(&format!("invalid API key {key}")) {
                trailers.insert("grpc-message", v);
            }
            let frames = vec![
                Ok::<_, Infallible>(Frame::data(Bytes::from_static(b"\0\0\0\0\0"))),
                Ok(Frame::trailers(trailers)),
            ];
            let mut r = Response::new(BoxBody::new(StreamBody::new(futures_util::stream::iter(
                frames,
            ))));
            r.headers_mut().insert(
                header::CONTENT_TYPE,
                header::HeaderValue::from_static("application/grpc"),
            );
            r
        }
        "/reflect/reason" => {
            let mut r = json(
                StatusCode::UNAUTHORIZED,
                &serde_json::json!({"error": "unauthorized"}),
            );
            if let Ok(reason) = hyper::ext::ReasonPhrase::try_from(format!("Bad key {key}")) {
                r.extensions_mut().insert(reason);
            }
            r
        }
        "/reflect/header-name" => {
            let mut r = json(StatusCode::OK, &serde_json::json!({"ok": true}));
            if let Ok(name) = header::HeaderName::from_bytes(format!("x-echo-{key}").as_bytes()) {
                r.headers_mut()
                    .insert(name, header::HeaderValue::from_static("1"));
            }
            r
        }
        "/reflect/te-gzip" => {
            use std::io::Write as _;
            let mut gz = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::default());
            let _ = gz.write_all(format!("key: {key}\n").as_bytes());
            let body = gz.finish().unwrap_or_default();
            let mut r = Response::new(full(body));
            r.headers_mut().insert(
                header::TRANSFER_ENCODING,
                header::HeaderValue::from_static("gzip, chunked"),
            );
            r
        }
        "/reflect/encodings" => {
            let bytes = key.as_bytes();
            let escaped = |upper: bool| -> String {
                bytes
                    .iter()
                    .map(|b| {
                        if upper {
                            format!("\\u{b:04X}")
                        } else {
                            format!("\\u{b:04x}")
                        }
                    })
                    .collect()
            };
            let block = format!("Authorization: Bearer {key}\r\nX-Request: 1\r\n\r\n");
            let mime = |width: usize, newline: &str| -> String {
                let flat = data_encoding::BASE64.encode(block.as_bytes());
                flat.as_bytes()
                    .chunks(width)
                    .map(|l| String::from_utf8_lossy(l).into_owned())
                    .collect::<Vec<_>>()
                    .join(newline)
            };
            // Built as text: serde would escape the backslashes of the `\u` forms again.
            let body = format!(
                "{{\"hex\":\"{}\",\"HEX\":\"{}\",\"json_u\":\"{}\",\"JSON_U\":\"{}\"}}",
                data_encoding::HEXLOWER.encode(bytes),
                data_encoding::HEXUPPER.encode(bytes),
                escaped(false),
                escaped(true),
            );
            // The MIME texts as they arrive in a mail or PEM body: raw line breaks.
            let raw = format!("\n{}\n{}\n", mime(76, "\r\n"), mime(64, "\n"));
            let mut r = Response::new(full(format!("{body}{raw}")));
            r.headers_mut().insert(
                header::CONTENT_TYPE,
                header::HeaderValue::from_static("text/plain"),
            );
            r
        }
        "/reflect/store" => {
            if let Ok(mut stored) = state.stored.lock() {
                *stored = Some(key);
            }
            json(StatusCode::OK, &serde_json::json!({"stored": true}))
        }
        "/reflect/load" => {
            let stored = state
                .stored
                .lock()
                .ok()
                .and_then(|s| s.clone())
                .unwrap_or_default();
            let mut r = json(StatusCode::OK, &serde_json::json!({"stored": stored}));
            if let Ok(v) = header::HeaderValue::from_str(&stored) {
                r.headers_mut().insert("x-stored", v);
            }
            r
        }
        _ => json(
            StatusCode::NOT_FOUND,
            &serde_json::json!({"error": "no such endpoint", "path": parts.uri.path()}),
        ),
    }
}

/// A WebSocket server frame, masked when `mask` is given (servers must not; brokerd unmasks).
fn ws_frame(opcode: u8, fin: bool, mask: Option<[u8; 4]>, payload: &[u8]) -> Vec<u8> {
    let mut out = vec![if fin { 0x80 } else { 0 } | opcode];
    let masked = if mask.is_some() { 0x80 } else { 0 };
    match payload.len() {
        n if n < 126 => out.push(masked | n as u8),
        n if n < 65_536 => {
            out.push(masked | 126);
            out.extend_from_slice(&(n as u16).to_be_bytes());
        }
        n => {
            out.push(masked | 127);
            out.extend_from_slice(&(n as u64).to_be_bytes());
        }
    }
    match mask {
        Some(mask) => {
            out.extend_from_slice(&mask);
            out.extend(payload.iter().enumerate().map(|(i, b)| b ^ mask[i % 4]));
        }
        None => out.extend_from_slice(payload),
    }
    out
}

/// `/ws/reflect`: once upgraded, sends `you sent: <credential> ok` as one text message in three
/// fragments cut inside the credential (the middle one masked, a ping between them), then waits
/// for the client to close. `/ws/deflate`: answers the upgrade accepting `permessage-deflate`,
/// whether offered or not.
fn reflect_websocket(
    parts: &http::request::Parts,
    upgrade: Option<hyper::upgrade::OnUpgrade>,
) -> Response<Body> {
    let (Some(key), Some(upgrade)) = (parts.headers.get("sec-websocket-key"), upgrade) else {
        return json(
            StatusCode::BAD_REQUEST,
            &serde_json::json!({"error": "not a websocket upgrade"}),
        );
    };
    let accept = derive_accept_key(key.as_bytes());
    let text = format!("you sent: {} ok", credential(parts)).into_bytes();
    tokio::spawn(async move {
        use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
        let Ok(upgraded) = upgrade.await else { return };
        let mut io = TokioIo::new(upgraded);
        let cut = (15).min(text.len());
        let cut2 = (cut + 20).min(text.len());
        let mut out = ws_frame(0x1, false, None, &text[..cut]);
        out.extend(ws_frame(0x0, false, Some([7, 1, 9, 3]), &text[cut..cut2]));
        out.extend(ws_frame(0x9, true, None, b"ping"));
        out.extend(ws_frame(0x0, true, None, &text[cut2..]));
        if io.write_all(&out).await.is_err() {
            return;
        }
        let mut buf = [0u8; 1024];
        while let Ok(n) = io.read(&mut buf).await {
            if n == 0 {
                break;
            }
        }
    });
    let mut r = Response::new(full(Bytes::new()));
    *r.status_mut() = StatusCode::SWITCHING_PROTOCOLS;
    let h = r.headers_mut();
    h.insert(
        header::UPGRADE,
        header::HeaderValue::from_static("websocket"),
    );
    h.insert(
        header::CONNECTION,
        header::HeaderValue::from_static("Upgrade"),
    );
    if let Ok(v) = header::HeaderValue::from_str(&accept) {
        h.insert("sec-websocket-accept", v);
    }
    if parts.uri.path() == "/ws/deflate" {
        h.insert(
            header::SEC_WEBSOCKET_EXTENSIONS,
            header::HeaderValue::from_static("permessage-deflate"),
        );
    }
    r
}
