//! The pieces every component test is made of: a random secret, a test authorizer and event
//! sink, an HTTPS (or plain) upstream that records what reaches it, the broker serving
//! connections with a made-up origin, and an agent client.

use std::{
    convert::Infallible,
    future::Future,
    net::SocketAddr,
    path::PathBuf,
    pin::Pin,
    sync::{Arc, Mutex},
    task::{Context, Poll},
    time::Duration,
};

use agent_broker_core::policy::Policy;

use agent_broker_protocol::{Decision, RequestOutcome};

use bytes::Bytes;
use http::{HeaderMap, HeaderValue, Method, Request, Response, StatusCode, Version, header};
use http_body_util::{BodyExt as _, Full, combinators::UnsyncBoxBody};
use hyper::{
    body::{Body, Frame, Incoming},
    client::conn::{http1, http2},
};
use hyper_util::rt::{TokioExecutor, TokioIo};
use rcgen::{
    BasicConstraints, CertificateParams, DnType, ExtendedKeyUsagePurpose, IsCa, Issuer, KeyPair,
    KeyUsagePurpose,
};
use rustls::{
    ClientConfig, RootCertStore, ServerConfig,
    pki_types::{CertificateDer, PrivateKeyDer, PrivatePkcs8KeyDer, ServerName},
};
use sha2::{Digest as _, Sha256};
use tokio::{
    net::{TcpListener, TcpStream},
    sync::{Notify, mpsc, watch},
};
use tokio_rustls::{TlsAcceptor, TlsConnector, client::TlsStream};
use zeroize::Zeroizing;

use super::{
    AuditEvent, Authorizer, BindReason, BrokerCa, CgroupId, CgroupPath, Charge, Completion,
    ConnectionOrigin, ConnectionVerdict, Deadlines, Denial, EventKind, EventSink, Grant,
    LeafMinter, ListenerCheck, ListenerOwner, LocalService, NameCheck, Proxy, RequestFacts, Side,
    Upstream,
};
use crate::shares::{RefusalAudit, ShareBook};

/// The host the agent asks for; the upstream's certificate is valid for it (and 127.0.0.1).
pub(super) const HOST: &str = "api.example.test";
/// Another host, which the upstream's certificate does not cover.
pub(super) const OTHER: &str = "other.example.test";
/// The cgroup of the made-up origin.
pub(super) const AGENT_CGROUP: &str = "agents/component-test";
/// The cgroup of a second agent, whose connections come in at [`Broker::other_agent`].
pub(super) const OTHER_AGENT_CGROUP: &str = "agents/component-test-other";
/// The rule the test authorizer names in its grants.
pub(super) const RULE: &str = "policies/component-test.toml allow[0]";
/// The name of the injected secret.
pub(super) const SECRET_NAME: &str = "TEST_KEY";

/// How long any one step of a test may take before it fails.
const STEP: Duration = Duration::from_secs(5);

/// Runs `fut` with a deadline; a test never hangs.
pub(super) async fn within<T>(what: &str, fut: impl Future<Output = T>) -> T {
    match tokio::time::timeout(STEP, fut).await {
        Ok(v) => v,
        Err(_) => panic!("{what}: timed out after {STEP:?}"),
    }
}

// --- Secrets -------------------------------------------------------------------------------

/// A random credential made for one test: 32 random bytes in base64. Never printed.
pub(super) struct TestSecret(Zeroizing<String>);

impl TestSecret {
    pub(super) fn generate() -> Self {
        let mut raw = Zeroizing::new([0u8; 32]);
        getrandom::fill(&mut *raw).expect("random bytes");
        Self(Zeroizing::new(data_encoding::BASE64.encode(&*raw)))
    }

    /// A random credential that is also a valid header name, in mixed case: `sk-` and 24
    /// random bytes in URL-safe base64.
    pub(super) fn token() -> Self {
        let mut raw = Zeroizing::new([0u8; 24]);
        getrandom::fill(&mut *raw).expect("random bytes");
        Self(Zeroizing::new(format!(
            "sk-{}",
            data_encoding::BASE64URL_NOPAD.encode(&*raw)
        )))
    }

    pub(super) fn expose(&self) -> &str {
        &self.0
    }

    /// The header value the test authorizer injects.
    pub(super) fn bearer(&self) -> Zeroizing<String> {
        Zeroizing::new(format!("Bearer {}", self.expose()))
    }
}

impl std::fmt::Debug for TestSecret {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "TestSecret(<redacted, {} bytes>)", self.0.len())
    }
}

/// A random agent-supplied value (not a secret; still random so it cannot match by accident).
pub(super) fn random_token(prefix: &str) -> String {
    let mut raw = [0u8; 12];
    getrandom::fill(&mut raw).expect("random bytes");
    format!("{prefix}{}", data_encoding::HEXLOWER.encode(&raw))
}

pub(super) fn sha256_hex(bytes: &[u8]) -> String {
    data_encoding::HEXLOWER.encode(&Sha256::digest(bytes))
}

pub(super) fn contains(haystack: &[u8], needle: &[u8]) -> bool {
    !needle.is_empty() && haystack.windows(needle.len()).any(|w| w == needle)
}

/// Asserts two byte strings are equal, printing only lengths, digests and the first
/// difference's offset (either may hold a secret).
pub(super) fn assert_same_bytes(got: &[u8], want: &[u8], what: &str) {
    if got != want {
        let first_difference = got.iter().zip(want).position(|(a, b)| a != b);
        panic!(
            "{what}: got {} bytes (sha256 {}), want {} bytes (sha256 {}); first difference at \
             {first_difference:?}",
            got.len(),
            sha256_hex(got),
            want.len(),
            sha256_hex(want),
        );
    }
}

/// Asserts the secret does not occur in `bytes`, without printing either.
pub(super) fn assert_no_secret(bytes: &[u8], secret: &TestSecret, what: &str) {
    assert!(
        !contains(bytes, secret.expose().as_bytes()),
        "{what}: the secret ({} bytes) occurs in {} bytes",
        secret.expose().len(),
        bytes.len()
    );
}

// --- Authorizer ----------------------------------------------------------------------------

type Decide = Box<
    dyn Fn(&RequestFacts<'_>, &mut http::request::Parts) -> Result<Grant, Denial> + Send + Sync,
>;
type Verdict = Box<dyn Fn(Option<&str>) -> ConnectionVerdict + Send + Sync>;

/// What the authorizer was asked about one request.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(super) struct AskedRequest {
    pub(super) host: String,
    pub(super) port: u16,
    pub(super) tls: bool,
    pub(super) method: String,
    pub(super) path: String,
}

/// An [`Authorizer`] driven by closures, recording what it was asked.
pub(super) struct TestAuthorizer {
    verdict: Verdict,
    decide: Decide,
    /// The SNI of every `connection` call.
    connections: Mutex<Vec<Option<String>>>,
    requests: Mutex<Vec<AskedRequest>>,
    completions: Arc<Mutex<Vec<Completion>>>,
}

impl TestAuthorizer {
    pub(super) fn new(
        decide: impl Fn(&RequestFacts<'_>, &mut http::request::Parts) -> Result<Grant, Denial>
        + Send
        + Sync
        + 'static,
    ) -> Self {
        Self {
            verdict: Box::new(|_| ConnectionVerdict::Intercept),
            decide: Box::new(decide),
            connections: Mutex::default(),
            requests: Mutex::default(),
            completions: Arc::default(),
        }
    }

    /// Allows every request, injecting nothing.
    pub(super) fn allow() -> Self {
        Self::new(|_, _| Ok(grant()))
    }

    /// Denies every request with what `denial` makes.
    pub(super) fn deny(denial: impl Fn() -> Denial + Send + Sync + 'static) -> Self {
        Self::new(move |_, _| Err(denial()))
    }

    /// Allows every request and sets `Authorization: Bearer <secret>`, replacing whatever the
    /// agent sent there (as the policy authorizer does), and asks for the secret to be scrubbed.
    /// The grant meters the response's LLM usage for [`Grant::on_complete`].
    pub(super) fn injecting(secret: &TestSecret) -> Self {
        let value = secret.bearer();
        let needle = Zeroizing::new(secret.expose().as_bytes().to_vec());
        let completions = Arc::new(Mutex::new(Vec::new()));
        let recorded = completions.clone();
        let mut authorizer = Self::new(move |_, parts| {
            let mut v = HeaderValue::from_str(&value).expect("header value");
            v.set_sensitive(true);
            parts.headers.insert(header::AUTHORIZATION, v);
            let recorded = recorded.clone();
            Ok(Grant {
                rule: RULE.into(),
                secrets: vec![SECRET_NAME.into()],
                needles: vec![needle.clone()],
                meter_usage: true,
                idle_timeout: None,
                bind_name: None,
                on_complete: Some(Box::new(move |done: &Completion| {
                    recorded.lock().expect("completions").push(done.clone());
                    Charge::default()
                })),
                ..Grant::default()
            })
        });
        authorizer.completions = completions;
        authorizer
    }

    /// Answers `connection` with what `verdict` makes (given the SNI, if any).
    pub(super) fn with_verdict(
        mut self,
        verdict: impl Fn(Option<&str>) -> ConnectionVerdict + Send + Sync + 'static,
    ) -> Self {
        self.verdict = Box::new(verdict);
        self
    }

    pub(super) fn connections(&self) -> Vec<Option<String>> {
        self.connections.lock().expect("connections").clone()
    }

    pub(super) fn requests(&self) -> Vec<AskedRequest> {
        self.requests.lock().expect("requests").clone()
    }

    /// The completions reported to grants made by [`TestAuthorizer::injecting`]; waits until
    /// there are `n`.
    pub(super) async fn completions(&self, n: usize) -> Vec<Completion> {
        within("waiting for completions", async {
            loop {
                {
                    let done = self.completions.lock().expect("completions");
                    if done.len() >= n {
                        return done.clone();
                    }
                }
                tokio::time::sleep(Duration::from_millis(5)).await;
            }
        })
        .await
    }
}

/// A plain grant: no secrets.
pub(super) fn grant() -> Grant {
    Grant {
        rule: RULE.into(),
        ..Grant::default()
    }
}

impl Authorizer for TestAuthorizer {
    fn connection(&self, _origin: &ConnectionOrigin, sni: Option<&str>) -> ConnectionVerdict {
        self.connections
            .lock()
            .expect("connections")
            .push(sni.map(str::to_string));
        (self.verdict)(sni)
    }

    fn authorize(
        &self,
        facts: &RequestFacts<'_>,
        parts: &mut http::request::Parts,
    ) -> Result<Grant, Denial> {
        self.requests.lock().expect("requests").push(AskedRequest {
            host: facts.host.to_string(),
            port: facts.port,
            tls: facts.tls,
            method: parts.method.to_string(),
            path: parts.uri.path().to_string(),
        });
        (self.decide)(facts, parts)
    }
}

// --- Events --------------------------------------------------------------------------------

/// An [`EventSink`] that keeps every event, as the audit writer commits them when a request
/// ends before its forwarded record is committed: the record of how a request ended takes the
/// place of its `forwarded` record. Every event as it came is kept too ([`TestEvents::raw`]).
#[derive(Default)]
pub(super) struct TestEvents {
    events: Mutex<Vec<AuditEvent>>,
    raw: Mutex<Vec<AuditEvent>>,
}

impl EventSink for TestEvents {
    fn record(&self, event: AuditEvent) {
        self.raw.lock().expect("raw events").push(event.clone());
        let mut events = self.events.lock().expect("events");
        if let (Some(id), Some(outcome)) = (event.request_id, event.outcome)
            && outcome != RequestOutcome::Forwarded
            && let Some(forwarded) = events
                .iter_mut()
                .find(|e| e.request_id == Some(id) && e.outcome == Some(RequestOutcome::Forwarded))
        {
            *forwarded = event;
            return;
        }
        events.push(event);
    }
}

impl TestEvents {
    /// Waits until `n` events were recorded and returns them all.
    pub(super) async fn wait_for(&self, n: usize) -> Vec<AuditEvent> {
        within("waiting for events", async {
            loop {
                {
                    let events = self.events.lock().expect("events");
                    if events.len() >= n {
                        return events.clone();
                    }
                }
                tokio::time::sleep(Duration::from_millis(5)).await;
            }
        })
        .await
    }

    /// The one event recorded once its exchange ended (a forwarded request's record is
    /// completed when the response body or the upgraded connection ends); fails if there are
    /// more.
    pub(super) async fn single_ended(&self) -> AuditEvent {
        within("waiting for the exchange's record to be completed", async {
            loop {
                {
                    let events = self.events.lock().expect("events");
                    if events
                        .first()
                        .is_some_and(|e| e.outcome != Some(RequestOutcome::Forwarded))
                    {
                        break;
                    }
                }
                tokio::time::sleep(Duration::from_millis(5)).await;
            }
        })
        .await;
        self.single().await
    }

    /// The one event recorded, after a short wait; fails if there are more.
    pub(super) async fn single(&self) -> AuditEvent {
        let mut events = self.wait_for(1).await;
        // Anything recorded late would be a second event for one exchange.
        tokio::time::sleep(Duration::from_millis(20)).await;
        let late = self.events.lock().expect("events").len();
        assert_eq!(late, 1, "exactly one event");
        events.remove(0)
    }

    /// Forgets every event recorded so far (the fuzz target's events, between inputs).
    #[cfg(feature = "fuzzing")]
    pub(super) fn forget(&self) {
        self.events.lock().expect("events").clear();
        self.raw.lock().expect("raw events").clear();
    }

    /// Every event recorded so far, a forwarded request's `forwarded` record replaced by the
    /// record of how it ended.
    #[cfg(feature = "fuzzing")]
    pub(super) fn merged(&self) -> Vec<AuditEvent> {
        self.events.lock().expect("events").clone()
    }

    /// Every event recorded, in order, as it came (a forwarded request's `forwarded` record
    /// and the record of how it ended apart).
    pub(super) fn raw(&self) -> Vec<AuditEvent> {
        self.raw.lock().expect("raw events").clone()
    }

    /// Asserts no recorded event holds the secret (in any field).
    pub(super) fn assert_no_secret(&self, secret: &TestSecret) {
        for event in self.raw.lock().expect("raw events").iter() {
            let json = serde_json::to_vec(event).expect("event as JSON");
            assert_no_secret(&json, secret, "an audit event");
        }
    }
}

/// The event fields every event about the made-up origin carries.
pub(super) fn assert_origin(event: &AuditEvent, original_dst: SocketAddr) {
    assert_eq!(event.cgroup.as_deref(), Some(AGENT_CGROUP));
    assert_eq!(event.pid, Some(TEST_PID));
    assert_eq!(event.comm.as_deref(), Some(TEST_COMM));
    assert_eq!(event.original_dst, Some(original_dst));
}

// --- Upstream ------------------------------------------------------------------------------

/// Response bodies the test upstream sends.
pub(super) type TestBody = UnsyncBoxBody<Bytes, Infallible>;
type BoxFuture = Pin<Box<dyn Future<Output = Response<TestBody>> + Send>>;
/// What the test upstream answers a request with.
pub(super) type Handler = Arc<dyn Fn(Request<Incoming>) -> BoxFuture + Send + Sync>;

pub(super) fn handler<F, Fut>(f: F) -> Handler
where
    F: Fn(Request<Incoming>) -> Fut + Send + Sync + 'static,
    Fut: Future<Output = Response<TestBody>> + Send + 'static,
{
    Arc::new(move |req| Box::pin(f(req)))
}

/// A handler answering every request with 200 and `body`.
pub(super) fn answer(body: &'static str) -> Handler {
    handler(move |_req| async move { full(StatusCode::OK, body) })
}

pub(super) fn full(status: StatusCode, body: impl Into<Bytes>) -> Response<TestBody> {
    let mut response = Response::new(
        Full::new(body.into())
            .map_err(|never| match never {})
            .boxed_unsync(),
    );
    *response.status_mut() = status;
    response
}

/// One step of a streamed response body.
pub(super) enum Step {
    Data(Vec<u8>),
    Pause(Duration),
    /// Waits until the test notifies.
    Gate(Arc<Notify>),
    Trailers(HeaderMap),
}

/// A 200 response whose body is sent step by step (each `Data` a chunk or DATA frame of its
/// own, as the pauses between them make sure).
pub(super) fn streamed(steps: Vec<Step>) -> Response<TestBody> {
    let (tx, rx) = mpsc::channel(4);
    tokio::spawn(async move {
        for step in steps {
            let frame = match step {
                Step::Data(bytes) => Frame::data(Bytes::from(bytes)),
                Step::Trailers(trailers) => Frame::trailers(trailers),
                Step::Pause(d) => {
                    tokio::time::sleep(d).await;
                    continue;
                }
                Step::Gate(gate) => {
                    gate.notified().await;
                    continue;
                }
            };
            if tx.send(frame).await.is_err() {
                return;
            }
        }
    });
    Response::new(UnsyncBoxBody::new(ChannelBody(rx)))
}

struct ChannelBody(mpsc::Receiver<Frame<Bytes>>);

impl Body for ChannelBody {
    type Data = Bytes;
    type Error = Infallible;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, Infallible>>> {
        self.0.poll_recv(cx).map(|frame| frame.map(Ok))
    }
}

/// Which protocols the test upstream offers.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(super) enum Offer {
    /// TLS, ALPN http/1.1 only.
    H1,
    /// TLS, ALPN h2 and http/1.1 (h2 preferred, as most API servers do).
    H2,
    /// Plain HTTP/1.1.
    Plain,
}

/// The head of a request as the upstream received it.
pub(super) struct Seen {
    pub(super) version: Version,
    pub(super) method: Method,
    /// Path and query.
    pub(super) target: String,
    /// `:authority` on HTTP/2, the `Host` header on HTTP/1.1.
    pub(super) authority: Option<String>,
    /// May hold the injected secret: read through [`Seen::header`] (for values that are not
    /// secret) or [`Seen::header_digests`].
    headers: HeaderMap,
}

impl Seen {
    fn of(req: &Request<Incoming>) -> Self {
        let authority = req.uri().authority().map(|a| a.to_string()).or_else(|| {
            req.headers()
                .get(header::HOST)
                .and_then(|h| h.to_str().ok())
                .map(str::to_string)
        });
        Self {
            version: req.version(),
            method: req.method().clone(),
            target: req
                .uri()
                .path_and_query()
                .map_or_else(|| "/".to_string(), |p| p.to_string()),
            authority,
            headers: req.headers().clone(),
        }
    }

    /// Every value of a header that carries no secret, as text.
    pub(super) fn header(&self, name: &str) -> Vec<String> {
        self.headers
            .get_all(name)
            .iter()
            .map(|v| String::from_utf8_lossy(v.as_bytes()).into_owned())
            .collect()
    }

    /// The SHA-256 of every value of a header.
    pub(super) fn header_digests(&self, name: &str) -> Vec<String> {
        self.headers
            .get_all(name)
            .iter()
            .map(|v| sha256_hex(v.as_bytes()))
            .collect()
    }
}

/// An in-process upstream with a CA of its own, recording the head of every request.
pub(super) struct TestUpstream {
    pub(super) addr: SocketAddr,
    /// The upstream CA, PEM (the broker is told to trust it).
    pub(super) ca_pem: String,
    seen: Arc<Mutex<Vec<Seen>>>,
}

impl TestUpstream {
    pub(super) async fn start(offer: Offer, handler: Handler) -> Self {
        Self::per_connection(offer, move || handler.clone()).await
    }

    /// An upstream that answers each connection's requests with a handler of its own, made by
    /// `handler_of_connection` when the connection is accepted (for state per connection).
    pub(super) async fn per_connection(
        offer: Offer,
        handler_of_connection: impl Fn() -> Handler + Send + Sync + 'static,
    ) -> Self {
        let (config, ca_pem) = upstream_tls(offer);
        let listener = TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind upstream");
        let addr = listener.local_addr().expect("upstream addr");
        let seen = Arc::new(Mutex::new(Vec::new()));
        let recorded = seen.clone();
        let acceptor = TlsAcceptor::from(config);
        tokio::spawn(async move {
            loop {
                let Ok((tcp, _)) = listener.accept().await else {
                    return;
                };
                let service = {
                    let recorded = recorded.clone();
                    let handler = handler_of_connection();
                    hyper::service::service_fn(move |req: Request<Incoming>| {
                        recorded.lock().expect("seen").push(Seen::of(&req));
                        let answer = handler(req);
                        async move { Ok::<_, Infallible>(answer.await) }
                    })
                };
                let acceptor = acceptor.clone();
                tokio::spawn(async move {
                    let builder =
                        hyper_util::server::conn::auto::Builder::new(TokioExecutor::new());
                    if offer == Offer::Plain {
                        let _ = builder
                            .serve_connection_with_upgrades(TokioIo::new(tcp), service)
                            .await;
                        return;
                    }
                    // A client that rejects the certificate ends here.
                    let Ok(tls) = acceptor.accept(tcp).await else {
                        return;
                    };
                    let _ = builder
                        .serve_connection_with_upgrades(TokioIo::new(tls), service)
                        .await;
                });
            }
        });
        Self { addr, ca_pem, seen }
    }

    /// Forgets the requests seen so far (the fuzz target's upstream, between inputs).
    #[cfg(feature = "fuzzing")]
    pub(super) fn forget(&self) {
        self.seen.lock().expect("seen").clear();
    }

    /// How many requests reached the upstream.
    pub(super) fn count(&self) -> usize {
        self.seen.lock().expect("seen").len()
    }

    /// Runs `f` on the one request that reached the upstream.
    pub(super) fn single<T>(&self, f: impl FnOnce(&Seen) -> T) -> T {
        let seen = self.seen.lock().expect("seen");
        assert_eq!(seen.len(), 1, "requests that reached the upstream");
        f(&seen[0])
    }
}

/// A server config for the test upstream, with a leaf for [`HOST`] and 127.0.0.1 issued by a
/// fresh CA, and that CA's certificate in PEM.
fn upstream_tls(offer: Offer) -> (Arc<ServerConfig>, String) {
    let ca_key = KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256).expect("upstream CA key");
    let mut ca_params = CertificateParams::new(Vec::<String>::new()).expect("CA params");
    ca_params
        .distinguished_name
        .push(DnType::CommonName, "component-test upstream CA");
    ca_params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    ca_params.key_usages = vec![
        KeyUsagePurpose::KeyCertSign,
        KeyUsagePurpose::DigitalSignature,
    ];
    let ca_cert = ca_params.self_signed(&ca_key).expect("upstream CA");
    let issuer = Issuer::new(ca_params, ca_key);
    let leaf_key = KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256).expect("leaf key");
    let mut leaf_params =
        CertificateParams::new(vec![HOST.to_string(), "127.0.0.1".to_string()]).expect("leaf");
    leaf_params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ServerAuth];
    let leaf = leaf_params
        .signed_by(&leaf_key, &issuer)
        .expect("upstream leaf");
    let key = PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(leaf_key.serialize_der()));
    let mut config =
        ServerConfig::builder_with_provider(Arc::new(rustls::crypto::ring::default_provider()))
            .with_safe_default_protocol_versions()
            .expect("protocol versions")
            .with_no_client_auth()
            .with_single_cert(vec![leaf.der().clone(), ca_cert.der().clone()], key)
            .expect("upstream server config");
    config.alpn_protocols = match offer {
        Offer::H1 | Offer::Plain => vec![b"http/1.1".to_vec()],
        Offer::H2 => vec![b"h2".to_vec(), b"http/1.1".to_vec()],
    };
    (Arc::new(config), ca_cert.pem())
}

/// A TCP server that echoes what it reads (the destination of a spliced connection).
pub(super) async fn echo_server() -> SocketAddr {
    let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind echo");
    let addr = listener.local_addr().expect("echo addr");
    tokio::spawn(async move {
        while let Ok((mut tcp, _)) = listener.accept().await {
            tokio::spawn(async move {
                let (mut r, mut w) = tcp.split();
                let _ = tokio::io::copy(&mut r, &mut w).await;
            });
        }
    });
    addr
}

/// The PEM of a CA nobody uses, for a broker whose upstream is not HTTPS.
pub(super) fn throwaway_ca_pem() -> String {
    upstream_tls(Offer::H1).1
}

/// An address nothing listens on.
pub(super) async fn closed_port() -> SocketAddr {
    let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
    listener.local_addr().expect("addr")
}

// --- Broker --------------------------------------------------------------------------------

pub(super) const TEST_PID: u32 = 4242;
const TEST_COMM: &str = "component-agent";

/// The origin capture would have found for an agent connection to `original_dst`.
pub(super) fn test_origin(original_dst: SocketAddr) -> ConnectionOrigin {
    ConnectionOrigin {
        cgroup: CgroupPath::parse(AGENT_CGROUP).expect("cgroup path"),
        cgroup_id: CgroupId(4242),
        pid: TEST_PID,
        tid: TEST_PID + 1,
        comm: TEST_COMM.into(),
        exe: None,
        cgroup_path: None,
        pod: None,
        original_dst,
        sandboxed: false,
    }
}

/// A [`Proxy`] serving every connection to `addr` as if an agent had dialed `original_dst`.
pub(super) struct Broker {
    pub(super) addr: SocketAddr,
    /// The broker CA the agent trusts.
    pub(super) ca: CertificateDer<'static>,
    pub(super) authorizer: Arc<TestAuthorizer>,
    pub(super) events: Arc<TestEvents>,
    pub(super) names: Arc<TestNames>,
    pub(super) listeners: Arc<TestListeners>,
    /// Connections here come from a second agent ([`OTHER_AGENT_CGROUP`]).
    pub(super) other_agent: SocketAddr,
    /// Each agent's shares, as counted.
    pub(super) shares: Arc<ShareBook>,
    _policy: watch::Sender<Arc<Policy>>,
    _state: tempfile::TempDir,
}

/// A [`ListenerCheck`] that says every listener is owned by what the test sets (not an agent's
/// unless told otherwise), and records the connections it was asked about.
#[derive(Debug)]
pub(super) struct TestListeners {
    owner: Mutex<ListenerOwner>,
    asked: Mutex<Vec<(SocketAddr, SocketAddr)>>,
}

impl Default for TestListeners {
    fn default() -> Self {
        Self {
            owner: Mutex::new(ListenerOwner::Other),
            asked: Mutex::new(Vec::new()),
        }
    }
}

impl TestListeners {
    /// From now on, every listener belongs to `owner`.
    pub(super) fn set(&self, owner: ListenerOwner) {
        *self.owner.lock().expect("owner") = owner;
    }

    /// The (local, peer) pairs of the connections asked about so far.
    pub(super) fn asked(&self) -> Vec<(SocketAddr, SocketAddr)> {
        self.asked.lock().expect("asked").clone()
    }
}

impl ListenerCheck for TestListeners {
    fn owner(&self, local: SocketAddr, peer: SocketAddr) -> Result<ListenerOwner, String> {
        self.asked.lock().expect("asked").push((local, peer));
        Ok(self.owner.lock().expect("owner").clone())
    }
}

/// A [`NameCheck`] that proves exactly the names the test says own the upstream's address
/// ([`HOST`] unless told otherwise), and counts what it was asked.
#[derive(Debug)]
pub(super) struct TestNames {
    owners: Mutex<Vec<String>>,
    asked: Mutex<Vec<(String, BindReason)>>,
}

impl Default for TestNames {
    fn default() -> Self {
        Self {
            owners: Mutex::new(vec![HOST.to_string()]),
            asked: Mutex::new(Vec::new()),
        }
    }
}

impl TestNames {
    /// From now on, only `names` own the upstream's address.
    pub(super) fn set_owners(&self, names: &[&str]) {
        *self.owners.lock().expect("owners") = names.iter().map(|n| n.to_string()).collect();
    }

    /// The names asked about so far.
    pub(super) fn asked(&self) -> Vec<String> {
        self.asked_why().into_iter().map(|(name, _)| name).collect()
    }

    /// The names asked about so far, each with why it had to be proven.
    pub(super) fn asked_why(&self) -> Vec<(String, BindReason)> {
        self.asked.lock().expect("asked").clone()
    }
}

impl NameCheck for TestNames {
    fn check<'a>(
        &'a self,
        origin: &'a ConnectionOrigin,
        name: &'a str,
        why: BindReason,
    ) -> Pin<Box<dyn Future<Output = Result<(), String>> + Send + 'a>> {
        self.asked
            .lock()
            .expect("asked")
            .push((name.to_string(), why));
        let owned = self
            .owners
            .lock()
            .expect("owners")
            .iter()
            .any(|o| o == name);
        let addr = origin.original_dst.ip();
        Box::pin(async move {
            if owned {
                Ok(())
            } else {
                Err(format!("nothing proves that {addr} is {name}"))
            }
        })
    }
}

impl Broker {
    pub(super) async fn start(
        authorizer: TestAuthorizer,
        upstream_ca_pem: &str,
        original_dst: SocketAddr,
        deadlines: Deadlines,
    ) -> Self {
        Self::start_with_shares(authorizer, upstream_ca_pem, original_dst, deadlines, "").await
    }

    /// [`Broker::start`], with `shares` (the body of a `[shares]` table) for both agents.
    pub(super) async fn start_with_shares(
        authorizer: TestAuthorizer,
        upstream_ca_pem: &str,
        original_dst: SocketAddr,
        deadlines: Deadlines,
        shares: &str,
    ) -> Self {
        Self::start_inner(
            authorizer,
            upstream_ca_pem,
            original_dst,
            deadlines,
            shares,
            None,
            None,
        )
        .await
    }

    /// [`Broker::start`], serving `local` under its reserved name.
    pub(super) async fn start_with_local(
        authorizer: TestAuthorizer,
        upstream_ca_pem: &str,
        original_dst: SocketAddr,
        local: Arc<dyn LocalService>,
    ) -> Self {
        Self::start_inner(
            authorizer,
            upstream_ca_pem,
            original_dst,
            Deadlines::default(),
            "",
            Some(local),
            None,
        )
        .await
    }

    /// [`Broker::start`], with the proxy asking `serving` (the policy authorizer, for the
    /// `proxy` fuzz target) instead of a test authorizer; [`Broker::authorizer`] is then an
    /// unused [`TestAuthorizer::allow`].
    #[cfg(feature = "fuzzing")]
    pub(super) async fn start_serving(
        serving: Arc<dyn Authorizer>,
        upstream_ca_pem: &str,
        original_dst: SocketAddr,
        deadlines: Deadlines,
    ) -> Self {
        Self::start_inner(
            TestAuthorizer::allow(),
            upstream_ca_pem,
            original_dst,
            deadlines,
            "",
            None,
            Some(serving),
        )
        .await
    }

    async fn start_inner(
        authorizer: TestAuthorizer,
        upstream_ca_pem: &str,
        original_dst: SocketAddr,
        deadlines: Deadlines,
        shares: &str,
        local: Option<Arc<dyn LocalService>>,
        serving: Option<Arc<dyn Authorizer>>,
    ) -> Self {
        let state = tempfile::tempdir().expect("temp dir");
        let ca_file = state.path().join("upstream-ca.pem");
        std::fs::write(&ca_file, upstream_ca_pem).expect("write upstream CA");
        let (ca, _key) = BrokerCa::generate().expect("broker CA");
        let ca_der = ca.cert_der().clone();
        let authorizer = Arc::new(authorizer);
        let events = Arc::new(TestEvents::default());
        let names = Arc::new(TestNames::default());
        let listeners = Arc::new(TestListeners::default());
        let policy = Policy::from_files(vec![(
            PathBuf::from("shares.toml"),
            format!("cgroup = \"agents\"\n[shares]\n{shares}\n"),
        )])
        .expect("shares policy");
        let (policy_tx, policy_rx) = watch::channel(Arc::new(policy));
        let refusals = Arc::new(RefusalAudit::new(events.clone()));
        let share_book = Arc::new(ShareBook::new(policy_rx, refusals, 100_000));
        let proxy = Arc::new(Proxy {
            minter: LeafMinter::new(ca).expect("leaf minter"),
            upstream: Upstream::new(&[ca_file])
                .expect("upstream client")
                .with_listener_check(listeners.clone()),
            authorizer: serving.unwrap_or_else(|| authorizer.clone() as Arc<dyn Authorizer>),
            events: events.clone(),
            names: names.clone(),
            deadlines,
            shares: share_book.clone(),
            local,
        });
        let origin = test_origin(original_dst);
        let other = ConnectionOrigin {
            cgroup: CgroupPath::parse(OTHER_AGENT_CGROUP).expect("cgroup path"),
            cgroup_id: CgroupId(4343),
            ..origin.clone()
        };
        let mut addrs = Vec::new();
        for origin in [origin, other] {
            let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind broker");
            addrs.push(listener.local_addr().expect("broker addr"));
            let proxy = proxy.clone();
            tokio::spawn(async move {
                while let Ok((stream, _)) = listener.accept().await {
                    // Over the agent's share of connections: closed, as brokerd's accept does.
                    if let Ok(admitted) = proxy.shares.admit(&origin) {
                        tokio::spawn(proxy.clone().serve(stream, origin.clone(), admitted));
                    }
                }
            });
        }
        Self {
            addr: addrs[0],
            ca: ca_der,
            authorizer,
            events,
            names,
            listeners,
            other_agent: addrs[1],
            shares: share_book,
            _policy: policy_tx,
            _state: state,
        }
    }
}

/// An upstream and a broker in front of it.
pub(super) struct Setup {
    pub(super) upstream: TestUpstream,
    pub(super) broker: Broker,
}

impl Setup {
    pub(super) async fn start(offer: Offer, handler: Handler, authorizer: TestAuthorizer) -> Self {
        Self::with_deadlines(offer, handler, authorizer, Deadlines::default()).await
    }

    /// [`Setup::start`] with a broker that waits on its upstream only this long.
    pub(super) async fn with_deadlines(
        offer: Offer,
        handler: Handler,
        authorizer: TestAuthorizer,
        deadlines: Deadlines,
    ) -> Self {
        let upstream = TestUpstream::start(offer, handler).await;
        let broker = Broker::start(authorizer, &upstream.ca_pem, upstream.addr, deadlines).await;
        Self { upstream, broker }
    }

    /// A TLS agent connection with SNI [`HOST`].
    pub(super) async fn agent(&self, proto: AgentProto) -> Agent {
        Agent::tls(&self.broker, HOST, proto).await
    }
}

// --- Agent ---------------------------------------------------------------------------------

/// The protocol the agent speaks to the broker (chosen by ALPN).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(super) enum AgentProto {
    H1,
    H2,
}

pub(super) type AgentBody = Full<Bytes>;

/// An agent's HTTP connection to the broker.
pub(super) enum Agent {
    H1(http1::SendRequest<AgentBody>),
    H2(http2::SendRequest<AgentBody>),
}

/// A client config trusting only `ca`, offering `alpn`.
pub(super) fn client_config(ca: &CertificateDer<'static>, alpn: &[&[u8]]) -> Arc<ClientConfig> {
    let mut roots = RootCertStore::empty();
    roots.add(ca.clone()).expect("trust the CA");
    let mut config =
        ClientConfig::builder_with_provider(Arc::new(rustls::crypto::ring::default_provider()))
            .with_safe_default_protocol_versions()
            .expect("protocol versions")
            .with_root_certificates(roots)
            .with_no_client_auth();
    config.alpn_protocols = alpn.iter().map(|p| p.to_vec()).collect();
    Arc::new(config)
}

/// A TLS connection to the broker for `server_name` (a DNS name is sent as SNI; an IP
/// address means no SNI), trusting `ca`.
pub(super) async fn tls_connect(
    broker: SocketAddr,
    ca: &CertificateDer<'static>,
    server_name: &str,
    alpn: &[&[u8]],
) -> std::io::Result<TlsStream<TcpStream>> {
    let name = ServerName::try_from(server_name.to_string()).expect("server name");
    let tcp = TcpStream::connect(broker).await?;
    TlsConnector::from(client_config(ca, alpn))
        .connect(name, tcp)
        .await
}

impl Agent {
    /// Connects over TLS for `server_name`, negotiating `proto` by ALPN.
    pub(super) async fn tls(broker: &Broker, server_name: &str, proto: AgentProto) -> Self {
        Self::tls_at(broker, broker.addr, server_name, proto).await
    }

    /// [`Agent::tls`] to the broker's listener at `addr` ([`Broker::other_agent`] for the
    /// second agent).
    pub(super) async fn tls_at(
        broker: &Broker,
        addr: SocketAddr,
        server_name: &str,
        proto: AgentProto,
    ) -> Self {
        let alpn: &[u8] = match proto {
            AgentProto::H1 => b"http/1.1",
            AgentProto::H2 => b"h2",
        };
        let tls = within(
            "agent TLS handshake",
            tls_connect(addr, &broker.ca, server_name, &[alpn]),
        )
        .await
        .expect("agent TLS handshake");
        assert_eq!(
            tls.get_ref().1.alpn_protocol(),
            Some(alpn),
            "negotiated ALPN"
        );
        Self::over(TokioIo::new(tls), proto).await
    }

    /// Connects in plain HTTP/1.1.
    pub(super) async fn plain(broker: &Broker) -> Self {
        let tcp = TcpStream::connect(broker.addr).await.expect("connect");
        Self::over(TokioIo::new(tcp), AgentProto::H1).await
    }

    async fn over<I>(io: I, proto: AgentProto) -> Self
    where
        I: hyper::rt::Read + hyper::rt::Write + Unpin + Send + 'static,
    {
        match proto {
            AgentProto::H1 => {
                let (sender, conn) = http1::handshake(io).await.expect("h1 handshake");
                tokio::spawn(async move {
                    let _ = conn.with_upgrades().await;
                });
                Self::H1(sender)
            }
            AgentProto::H2 => {
                let (sender, conn) = http2::handshake(TokioExecutor::new(), io)
                    .await
                    .expect("h2 handshake");
                tokio::spawn(async move {
                    let _ = conn.await;
                });
                Self::H2(sender)
            }
        }
    }

    pub(super) fn proto(&self) -> AgentProto {
        match self {
            Self::H1(_) => AgentProto::H1,
            Self::H2(_) => AgentProto::H2,
        }
    }

    /// A request for `host` and `path` as this agent's protocol writes it: `Host` on HTTP/1.1,
    /// `:authority` on HTTP/2.
    pub(super) fn request(&self, method: &str, host: &str, path: &str) -> http::request::Builder {
        match self.proto() {
            AgentProto::H1 => Request::builder()
                .method(method)
                .uri(path)
                .header(header::HOST, host),
            AgentProto::H2 => Request::builder()
                .method(method)
                .uri(format!("https://{host}{path}"))
                .version(Version::HTTP_2),
        }
    }

    /// Sends a request and returns the response head (the body still streaming).
    pub(super) async fn send(&mut self, req: Request<AgentBody>) -> Response<Incoming> {
        within("agent request", async {
            match self {
                Self::H1(s) => {
                    s.ready().await.expect("h1 connection ready");
                    s.send_request(req).await
                }
                Self::H2(s) => {
                    s.ready().await.expect("h2 connection ready");
                    s.send_request(req).await
                }
            }
        })
        .await
        .expect("response from the broker")
    }

    /// Sends a request and reads the whole response.
    pub(super) async fn fetch(&mut self, req: Request<AgentBody>) -> Received {
        let response = self.send(req).await;
        Received::read(response).await
    }
}

pub(super) fn empty() -> AgentBody {
    Full::new(Bytes::new())
}

/// A whole response as the agent received it.
pub(super) struct Received {
    pub(super) status: StatusCode,
    pub(super) version: Version,
    pub(super) headers: HeaderMap,
    pub(super) body: Vec<u8>,
    pub(super) trailers: Option<HeaderMap>,
}

impl Received {
    pub(super) async fn read(response: Response<Incoming>) -> Self {
        let (parts, body) = response.into_parts();
        let collected = within("reading the response body", body.collect())
            .await
            .expect("response body");
        let trailers = collected.trailers().cloned();
        Self {
            status: parts.status,
            version: parts.version,
            headers: parts.headers,
            body: collected.to_bytes().to_vec(),
            trailers,
        }
    }

    /// The body as JSON (denials and failures).
    pub(super) fn json(&self) -> serde_json::Value {
        serde_json::from_slice(&self.body).expect("a JSON body")
    }

    pub(super) fn header(&self, name: &str) -> Option<&str> {
        self.headers.get(name).and_then(|v| v.to_str().ok())
    }
}

/// Asserts `received` is the broker's denial with `status` and `reason` contained in its
/// reason, as `deny` in proxy.rs writes it; returns the body.
pub(super) fn assert_denial(
    received: &Received,
    status: StatusCode,
    reason: &str,
) -> serde_json::Value {
    assert_eq!(received.status, status);
    assert_eq!(received.header("content-type"), Some("application/json"));
    assert!(
        received.body.ends_with(b"\n"),
        "the JSON ends with a newline"
    );
    let json = received.json();
    assert_eq!(json["error"], "denied by agent-broker");
    assert_eq!(json["agent"], AGENT_CGROUP);
    let got = json["reason"].as_str().expect("a reason");
    assert!(
        got.contains(reason),
        "reason {got:?} should contain {reason:?}"
    );
    json
}

/// Asserts `event` records a refusal of the agent's request.
pub(super) fn assert_denied_event(event: &AuditEvent, status: StatusCode, reason: &str) {
    assert_eq!(event.kind, Some(EventKind::Denial));
    assert_eq!(event.decision, Some(Decision::Deny));
    assert_eq!(event.side, Some(Side::Agent));
    assert_eq!(event.status, Some(status.as_u16()));
    let got = event.reason.as_deref().unwrap_or("");
    assert!(
        got.contains(reason),
        "event reason {got:?} should contain {reason:?}"
    );
}
