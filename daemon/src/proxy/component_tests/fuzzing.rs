//! The `proxy` fuzz target's rig (`crate::fuzzing::proxy`): the real proxy ([`Proxy::serve`]:
//! sniffing, TLS termination, the exchange, the policy authorizer over a vault, injection,
//! decoding, scrubbing, and the events the audit writer would commit) between an in-process
//! agent and a scripted in-process upstream, on the component tests' harness.
//!
//! Loopback TCP (127.0.0.1 only), not in-memory streams: [`Proxy::serve`] takes a `TcpStream`
//! (it peeks at the first bytes with `MSG_PEEK` to sniff the protocol and read the ClientHello,
//! and splices tcp rules' connections with the socket), and the upstream client dials the
//! original destination's address. Making both generic over an in-memory stream would change
//! the code under test; the harness already stands the proxy up this way, unprivileged.
//!
//! One single-threaded runtime and two rigs (an upstream offering HTTP/1.1 only, and one
//! preferring h2), built once per thread and reused by every input. Between inputs the events
//! and the upstream's log of requests are forgotten (after every request's record is complete),
//! so memory stays flat over millions of inputs.
//!
//! The secret is random per process and never printed; [`leaks`] tells whether bytes hold it.

use std::{
    cell::OnceCell,
    collections::HashMap,
    convert::Infallible,
    io::Write as _,
    path::PathBuf,
    sync::{Arc, Mutex},
    time::{Duration, Instant},
};

use agent_broker_core::{
    policy::Policy,
    secret::{SecretName, SecretValue},
};
use bytes::Bytes;
use futures_util::stream;
use http::{HeaderMap, HeaderName, HeaderValue, Method, Request, StatusCode, Version, header};
use http_body_util::{BodyExt as _, StreamBody, combinators::UnsyncBoxBody};
use hyper::{
    body::{Frame, Incoming},
    client::conn::{http1, http2},
};
use hyper_util::rt::{TokioExecutor, TokioIo};
use tokio::{
    io::{AsyncReadExt as _, AsyncWriteExt as _},
    sync::watch,
};

use super::{
    AuditEvent, Deadlines,
    harness::{
        Broker, HOST, Offer, SECRET_NAME, Step, TestSecret, TestUpstream, contains, handler,
        streamed, tls_connect,
    },
};
use crate::{
    broker::PolicyAuthorizer,
    vault::{KeySource, Vault},
};

/// A protocol, of the agent's connection (by ALPN) or of what the upstream offers.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Proto {
    H1,
    H2,
}

/// One input: which upstream, how the agent connects, and what happens, in order.
#[derive(Clone, Debug)]
pub struct Case {
    pub upstream: Proto,
    pub agent: Proto,
    pub exchanges: Vec<Exchange>,
}

/// One step of the agent.
#[derive(Clone, Debug)]
pub enum Exchange {
    /// A request hyper's client writes on the agent's connection (reconnecting when the proxy
    /// closed it), and the upstream's scripted answer to it.
    Request(AgentRequest, UpstreamResponse),
    /// Raw bytes on a new HTTP/1.1 TLS connection, then the write side closed: a request
    /// hyper's server may not parse.
    Raw(Vec<u8>),
}

/// A request as the agent asks for it.
#[derive(Clone, Debug)]
pub struct AgentRequest {
    /// An invalid method becomes GET.
    pub method: Vec<u8>,
    /// The `Host` (HTTP/1.1) or `:authority` (h2); an invalid one becomes [`HOST`].
    pub host: String,
    /// After the rig's own first segment; bytes a path cannot hold are dropped.
    pub path: Vec<u8>,
    /// Invalid names or values are skipped.
    pub headers: Vec<(Vec<u8>, Vec<u8>)>,
    /// Each a frame of its own.
    pub body: Vec<Vec<u8>>,
}

/// How the upstream answers one request.
#[derive(Clone, Debug)]
pub struct UpstreamResponse {
    /// 200..=599 (others become 200).
    pub status: u16,
    /// Invalid names or values are skipped; `Content-Length` is the rig's (see [`End`]).
    pub headers: Vec<(Vec<u8>, Vec<u8>)>,
    /// Applied in order and listed in `Content-Encoding`.
    pub codings: Vec<Coding>,
    /// `text/event-stream`, each piece a `data:` event.
    pub sse: bool,
    pub pieces: Vec<Piece>,
    /// Frame sizes the (encoded) body is cut into; the last frame takes the rest.
    pub frames: Vec<u16>,
    pub end: End,
}

/// A content coding of the upstream's body.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Coding {
    Gzip,
    /// zlib-wrapped, as HTTP's `deflate` is.
    Deflate,
    Br,
    Zstd,
    Identity,
    /// `Content-Encoding: x-bogus`, body as is.
    Bogus,
    /// `Content-Encoding: gzip` over a body that is not gzip.
    Lying,
}

/// A piece of the upstream's answer.
#[derive(Clone, Debug)]
pub enum Piece {
    Text(Vec<u8>),
    /// The secret as the upstream received it (the `Authorization` value after `Bearer `).
    Echo,
    /// The value of the injected `api_key` query parameter as received.
    EchoQuery,
    /// The secret in standard base64.
    EchoBase64,
    /// The secret in lowercase hex.
    EchoHex,
    /// The secret in a response header `x-echo`.
    EchoHeader,
    /// The secret in a trailer `x-echo`.
    EchoTrailer,
    /// Part of the secret (from `at`, `len` bytes), to be joined by the next pieces.
    EchoPart {
        at: u8,
        len: u8,
    },
}

/// How the upstream ends the body.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum End {
    Whole,
    /// A `Content-Length` this many bytes (plus one) beyond the body: the upstream closes
    /// (HTTP/1.1) or resets the stream (h2) early.
    Short(u16),
}

/// What the agent received in one exchange.
#[derive(Clone, Debug, Default)]
pub struct Received {
    /// The response's status, `None` when no response head arrived.
    pub status: Option<u16>,
    /// Every header name and value (and the reason phrase), each followed by a newline.
    pub head: Vec<u8>,
    /// `Content-Encoding` as received, in order.
    pub codings: Vec<String>,
    /// The body's bytes as they arrived (raw bytes for [`Exchange::Raw`]).
    pub body: Vec<u8>,
    /// Every trailer name and value.
    pub trailers: Vec<u8>,
}

/// What one input did.
#[derive(Debug)]
pub struct Outcome {
    /// Per exchange, in order.
    pub received: Vec<Received>,
    /// Per exchange, the path prefix of its request (`None` for a raw exchange): every record
    /// of that request has a path starting with it.
    pub prefixes: Vec<Option<String>>,
    /// Every record of this input, as the audit writer commits them (a forwarded request's
    /// `forwarded` record replaced by how it ended).
    pub records: Vec<AuditEvent>,
    /// Records still `forwarded` after the wait for their ending.
    pub unfinished: usize,
}

/// Longest one exchange may take; the proxy's own deadlines are shorter.
const EXCHANGE: Duration = Duration::from_secs(8);
/// The proxy's deadlines in the rig: short, so a stalled exchange ends in seconds.
const DEADLINE: Duration = Duration::from_secs(3);

type Scripts = Arc<Mutex<HashMap<String, UpstreamResponse>>>;

struct Rig {
    upstream: TestUpstream,
    broker: Broker,
    scripts: Scripts,
    _policy: watch::Sender<Arc<Policy>>,
    _vault_dir: tempfile::TempDir,
}

struct World {
    runtime: tokio::runtime::Runtime,
    secret: TestSecret,
    h1: Rig,
    h2: Rig,
    /// Per-input path prefixes never repeat.
    inputs: std::cell::Cell<u64>,
    nonce: String,
}

thread_local! {
    static WORLD: OnceCell<World> = const { OnceCell::new() };
}

fn with_world<T>(f: impl FnOnce(&World) -> T) -> T {
    WORLD.with(|cell| f(cell.get_or_init(World::build)))
}

/// Whether `bytes` hold the rig's secret.
pub fn leaks(bytes: &[u8]) -> bool {
    with_world(|w| contains(bytes, w.secret.expose().as_bytes()))
}

/// Runs one input through the rig.
pub fn run(case: &Case) -> Outcome {
    with_world(|w| w.run(case))
}

/// Ignores SIGPIPE, as every Rust `main` does before it runs (and so brokerd does). libFuzzer
/// owns `main` in the fuzz build, so without this a write to a socket the peer already closed
/// (hyper's vectored writes use `writev`, which has no `MSG_NOSIGNAL`) kills the fuzzer with
/// signal 13 instead of returning `EPIPE` to the proxy.
fn ignore_sigpipe() {
    use nix::sys::signal::{SigHandler, Signal, signal};
    // SAFETY: installs SIG_IGN, no handler code; the previous disposition is not used.
    unsafe { signal(Signal::SIGPIPE, SigHandler::SigIgn) }.expect("ignoring SIGPIPE");
}

impl World {
    fn build() -> Self {
        ignore_sigpipe();
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .expect("a runtime");
        let secret = TestSecret::generate();
        let (h1, h2) = runtime.block_on(async {
            (
                Rig::start(Offer::H1, &secret).await,
                Rig::start(Offer::H2, &secret).await,
            )
        });
        Self {
            runtime,
            secret,
            h1,
            h2,
            inputs: std::cell::Cell::new(0),
            nonce: super::harness::random_token(""),
        }
    }

    fn run(&self, case: &Case) -> Outcome {
        let rig = match case.upstream {
            Proto::H1 => &self.h1,
            Proto::H2 => &self.h2,
        };
        let input = self.inputs.get();
        self.inputs.set(input + 1);
        rig.broker.events.forget();
        rig.upstream.forget();
        let prefixes: Vec<Option<String>> = case
            .exchanges
            .iter()
            .enumerate()
            .map(|(i, e)| {
                matches!(e, Exchange::Request(..)).then(|| format!("/{}-{input}-{i}/", self.nonce))
            })
            .collect();
        {
            let mut scripts = rig.scripts.lock().expect("scripts");
            scripts.clear();
            for (prefix, exchange) in prefixes.iter().zip(&case.exchanges) {
                if let (Some(prefix), Exchange::Request(_, response)) = (prefix, exchange) {
                    scripts.insert(prefix.trim_matches('/').to_string(), response.clone());
                }
            }
        }
        self.runtime.block_on(async {
            let mut agent: Option<Sender> = None;
            let mut received = Vec::new();
            for (exchange, prefix) in case.exchanges.iter().zip(&prefixes) {
                let got = match (exchange, prefix) {
                    (Exchange::Request(request, _), Some(prefix)) => {
                        tokio::time::timeout(
                            EXCHANGE,
                            request_once(rig, case.agent, &mut agent, request, prefix),
                        )
                        .await
                    }
                    (Exchange::Raw(bytes), _) => {
                        tokio::time::timeout(EXCHANGE, raw_once(rig, bytes)).await
                    }
                    (Exchange::Request(..), None) => unreachable!("a request has a prefix"),
                };
                match got {
                    Ok(r) => received.push(r),
                    Err(_) => panic!("an exchange took more than {EXCHANGE:?}"),
                }
            }
            drop(agent);
            let unfinished = settle(rig).await;
            Outcome {
                received,
                prefixes,
                records: rig.broker.events.merged(),
                unfinished,
            }
        })
    }
}

/// Waits until every forwarded request's record is complete (or the deadline passed); returns
/// how many are not.
async fn settle(rig: &Rig) -> usize {
    let unfinished = || {
        rig.broker
            .events
            .merged()
            .iter()
            .filter(|e| e.outcome == Some(agent_broker_protocol::RequestOutcome::Forwarded))
            .count()
    };
    let start = Instant::now();
    loop {
        let n = unfinished();
        if n == 0 || start.elapsed() > EXCHANGE {
            return n;
        }
        tokio::time::sleep(Duration::from_millis(1)).await;
    }
}

impl Rig {
    async fn start(offer: Offer, secret: &TestSecret) -> Self {
        let scripts: Scripts = Arc::default();
        let upstream = TestUpstream::start(offer, upstream_handler(scripts.clone())).await;
        let dir = tempfile::tempdir().expect("a vault directory");
        let vault = Vault::open(dir.path(), KeySource::File(dir.path().join("master.key")))
            .expect("the vault");
        vault
            .set(
                &SecretName::new(SECRET_NAME).expect("secret name"),
                SecretValue::new(secret.expose().as_bytes().to_vec()).expect("secret value"),
            )
            .expect("store the secret");
        let policy = Policy::from_files(vec![(
            PathBuf::from("fuzz.toml"),
            format!(
                "cgroup = \"{}\"\n\n[[allow]]\nhost = \"{HOST}\"\nport = {}\n\
                 inject.headers = {{ authorization = \"Bearer {{secret:{SECRET_NAME}}}\" }}\n\
                 inject.query = {{ api_key = \"{{secret:{SECRET_NAME}}}\" }}\n",
                super::harness::AGENT_CGROUP,
                upstream.addr.port()
            ),
        )])
        .expect("the rig's policy");
        let (policy_tx, policy_rx) = watch::channel(Arc::new(policy));
        let authorizer = Arc::new(PolicyAuthorizer::new(policy_rx, Arc::new(vault)));
        let deadlines = Deadlines {
            response_head: DEADLINE,
            body_idle: DEADLINE,
            request_head: DEADLINE,
            connection_idle: DEADLINE,
        };
        let broker =
            Broker::start_serving(authorizer, &upstream.ca_pem, upstream.addr, deadlines).await;
        Self {
            upstream,
            broker,
            scripts,
            _policy: policy_tx,
            _vault_dir: dir,
        }
    }
}

// --- The agent -----------------------------------------------------------------------------

type AgentBody = UnsyncBoxBody<Bytes, Infallible>;

enum Sender {
    H1(http1::SendRequest<AgentBody>),
    H2(http2::SendRequest<AgentBody>),
}

async fn connect(rig: &Rig, proto: Proto) -> Option<Sender> {
    let alpn: &[u8] = match proto {
        Proto::H1 => b"http/1.1",
        Proto::H2 => b"h2",
    };
    let tls = tls_connect(rig.broker.addr, &rig.broker.ca, HOST, &[alpn])
        .await
        .ok()?;
    let io = TokioIo::new(tls);
    Some(match proto {
        Proto::H1 => {
            let (sender, conn) = http1::handshake(io).await.ok()?;
            tokio::spawn(async move {
                let _ = conn.await;
            });
            Sender::H1(sender)
        }
        Proto::H2 => {
            let (sender, conn) = http2::handshake(TokioExecutor::new(), io).await.ok()?;
            tokio::spawn(async move {
                let _ = conn.await;
            });
            Sender::H2(sender)
        }
    })
}

/// The path bytes kept: unreserved characters, `%`, `/` and sub-delimiters.
fn path_byte(b: u8) -> bool {
    b.is_ascii_alphanumeric() || b"-._~%/!$&'()*+,;=:@?".contains(&b)
}

fn build_request(proto: Proto, request: &AgentRequest, prefix: &str) -> Request<AgentBody> {
    let method = Method::from_bytes(&request.method)
        .ok()
        .filter(|m| *m != Method::CONNECT)
        .unwrap_or(Method::GET);
    let suffix: String = request
        .path
        .iter()
        .copied()
        .filter(|b| path_byte(*b))
        .map(char::from)
        .collect();
    let path = format!("{prefix}{suffix}");
    let host = if http::uri::Authority::try_from(request.host.as_str()).is_ok() {
        request.host.as_str()
    } else {
        HOST
    };
    let build = |host: &str, path: &str| -> Result<Request<()>, http::Error> {
        match proto {
            Proto::H1 => Request::builder()
                .method(method.clone())
                .uri(path)
                .header(header::HOST, host)
                .body(()),
            Proto::H2 => Request::builder()
                .method(method.clone())
                .uri(format!("https://{host}{path}"))
                .version(Version::HTTP_2)
                .body(()),
        }
    };
    let head = build(host, &path)
        .or_else(|_| build(HOST, &path))
        .or_else(|_| build(HOST, prefix))
        .expect("a request for the rig's host");
    let (mut parts, ()) = head.into_parts();
    for (name, value) in &request.headers {
        if let (Ok(name), Ok(value)) =
            (HeaderName::from_bytes(name), HeaderValue::from_bytes(value))
        {
            parts.headers.append(name, value);
        }
    }
    let frames: Vec<Result<Frame<Bytes>, Infallible>> = request
        .body
        .iter()
        .map(|c| Ok(Frame::data(Bytes::copy_from_slice(c))))
        .collect();
    let body = UnsyncBoxBody::new(StreamBody::new(stream::iter(frames)));
    Request::from_parts(parts, body)
}

async fn request_once(
    rig: &Rig,
    proto: Proto,
    agent: &mut Option<Sender>,
    request: &AgentRequest,
    prefix: &str,
) -> Received {
    // A connection the proxy closed (or never finished opening) is opened again.
    let ready = match agent.as_mut() {
        Some(Sender::H1(s)) => s.ready().await.is_ok(),
        Some(Sender::H2(s)) => s.ready().await.is_ok(),
        None => false,
    };
    if !ready {
        *agent = connect(rig, proto).await;
    }
    let req = build_request(proto, request, prefix);
    let response = match agent.as_mut() {
        Some(Sender::H1(s)) => match s.ready().await {
            Ok(()) => s.send_request(req).await,
            Err(_) => return Received::default(),
        },
        Some(Sender::H2(s)) => match s.ready().await {
            Ok(()) => s.send_request(req).await,
            Err(_) => return Received::default(),
        },
        None => return Received::default(),
    };
    let Ok(response) = response else {
        return Received::default();
    };
    let (parts, mut body) = response.into_parts();
    let mut received = Received {
        status: Some(parts.status.as_u16()),
        ..Received::default()
    };
    if let Some(reason) = parts.extensions.get::<hyper::ext::ReasonPhrase>() {
        received.head.extend_from_slice(reason.as_bytes());
        received.head.push(b'\n');
    }
    write_headers(&parts.headers, &mut received.head);
    received.codings = parts
        .headers
        .get_all(header::CONTENT_ENCODING)
        .iter()
        .flat_map(|v| {
            String::from_utf8_lossy(v.as_bytes())
                .split(',')
                .map(|c| c.trim().to_ascii_lowercase())
                .filter(|c| !c.is_empty())
                .collect::<Vec<_>>()
        })
        .collect();
    while let Some(frame) = body.frame().await {
        let Ok(frame) = frame else { break };
        match frame.into_data() {
            Ok(data) => received.body.extend_from_slice(&data),
            Err(frame) => {
                if let Ok(trailers) = frame.into_trailers() {
                    write_headers(&trailers, &mut received.trailers);
                }
            }
        }
    }
    received
}

fn write_headers(headers: &HeaderMap, out: &mut Vec<u8>) {
    for (name, value) in headers {
        out.extend_from_slice(name.as_str().as_bytes());
        out.extend_from_slice(b": ");
        out.extend_from_slice(value.as_bytes());
        out.push(b'\n');
    }
}

async fn raw_once(rig: &Rig, bytes: &[u8]) -> Received {
    let mut received = Received::default();
    let Ok(mut tls) = tls_connect(
        rig.broker.addr,
        &rig.broker.ca,
        HOST,
        &[b"http/1.1".as_slice()],
    )
    .await
    else {
        return received;
    };
    if tls.write_all(bytes).await.is_err() || tls.shutdown().await.is_err() {
        return received;
    }
    // What the proxy wrote before it closed; a reset or a missing close_notify ends it too.
    let mut buf = [0u8; 4096];
    while let Ok(n) = tls.read(&mut buf).await {
        if n == 0 || received.body.len() > 1 << 20 {
            break;
        }
        received.body.extend_from_slice(&buf[..n]);
    }
    received
}

// --- The upstream --------------------------------------------------------------------------

fn upstream_handler(scripts: Scripts) -> super::harness::Handler {
    handler(move |req: Request<Incoming>| {
        let scripts = scripts.clone();
        async move {
            let key = req
                .uri()
                .path()
                .trim_start_matches('/')
                .split('/')
                .next()
                .unwrap_or("")
                .to_string();
            let secret = req
                .headers()
                .get(header::AUTHORIZATION)
                .map(|v| {
                    let v = v.as_bytes();
                    v.strip_prefix(b"Bearer ").unwrap_or(v).to_vec()
                })
                .unwrap_or_default();
            let query_secret = req
                .uri()
                .query()
                .unwrap_or("")
                .split('&')
                .find_map(|p| p.strip_prefix("api_key="))
                .map(|v| v.as_bytes().to_vec())
                .unwrap_or_default();
            let script = scripts.lock().expect("scripts").get(&key).cloned();
            // The request's body, read whole (bounded by the rig's inputs) before answering.
            let _ = tokio::time::timeout(DEADLINE, req.into_body().collect()).await;
            match script {
                Some(script) => answer(&script, &secret, &query_secret),
                None => super::harness::full(StatusCode::OK, "no script\n"),
            }
        }
    })
}

fn answer(
    script: &UpstreamResponse,
    secret: &[u8],
    query_secret: &[u8],
) -> http::Response<super::harness::TestBody> {
    let mut headers = HeaderMap::new();
    let mut trailers = HeaderMap::new();
    let mut body = Vec::new();
    for piece in &script.pieces {
        let bytes: Vec<u8> = match piece {
            Piece::Text(t) => t.clone(),
            Piece::Echo => secret.to_vec(),
            Piece::EchoQuery => query_secret.to_vec(),
            Piece::EchoBase64 => data_encoding::BASE64.encode(secret).into_bytes(),
            Piece::EchoHex => data_encoding::HEXLOWER.encode(secret).into_bytes(),
            Piece::EchoPart { at, len } => {
                let at = usize::from(*at).min(secret.len());
                let end = (at + usize::from(*len)).min(secret.len());
                secret[at..end].to_vec()
            }
            Piece::EchoHeader => {
                if let Ok(v) = HeaderValue::from_bytes(secret) {
                    headers.append("x-echo", v);
                }
                continue;
            }
            Piece::EchoTrailer => {
                if let Ok(v) = HeaderValue::from_bytes(secret) {
                    trailers.append("x-echo", v);
                }
                continue;
            }
        };
        if script.sse {
            body.extend_from_slice(b"data: ");
            body.extend_from_slice(&bytes);
            body.extend_from_slice(b"\n\n");
        } else {
            body.extend_from_slice(&bytes);
        }
    }
    let mut names = Vec::new();
    for coding in &script.codings {
        let (name, encoded) = encode(*coding, &body);
        names.push(name);
        body = encoded;
    }
    let mut steps = Vec::new();
    let mut rest: &[u8] = &body;
    for &size in &script.frames {
        if rest.is_empty() {
            break;
        }
        let (frame, tail) = rest.split_at(usize::from(size.max(1)).min(rest.len()));
        steps.push(Step::Data(frame.to_vec()));
        rest = tail;
    }
    if !rest.is_empty() {
        steps.push(Step::Data(rest.to_vec()));
    }
    if !trailers.is_empty() {
        steps.push(Step::Trailers(trailers));
    }
    let mut response = streamed(steps);
    *response.status_mut() = StatusCode::from_u16(script.status)
        .ok()
        .filter(|s| s.as_u16() >= 200)
        .unwrap_or(StatusCode::OK);
    for (name, value) in &script.headers {
        if let (Ok(name), Ok(value)) =
            (HeaderName::from_bytes(name), HeaderValue::from_bytes(value))
            && name != header::CONTENT_LENGTH
        {
            response.headers_mut().append(name, value);
        }
    }
    response.headers_mut().extend(headers);
    if script.sse {
        response.headers_mut().insert(
            header::CONTENT_TYPE,
            HeaderValue::from_static("text/event-stream"),
        );
    }
    if !names.is_empty()
        && let Ok(v) = HeaderValue::from_str(&names.join(", "))
    {
        response.headers_mut().insert(header::CONTENT_ENCODING, v);
    }
    match script.end {
        End::Whole => {}
        End::Short(extra) => {
            let length = body.len() as u64 + 1 + u64::from(extra);
            response
                .headers_mut()
                .insert(header::CONTENT_LENGTH, HeaderValue::from(length));
        }
    }
    response
}

/// The coding's `Content-Encoding` name and `body` encoded with it.
fn encode(coding: Coding, body: &[u8]) -> (&'static str, Vec<u8>) {
    match coding {
        Coding::Gzip => {
            let mut e = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::fast());
            let _ = e.write_all(body);
            ("gzip", e.finish().unwrap_or_default())
        }
        Coding::Deflate => {
            let mut e = flate2::write::ZlibEncoder::new(Vec::new(), flate2::Compression::fast());
            let _ = e.write_all(body);
            ("deflate", e.finish().unwrap_or_default())
        }
        Coding::Br => {
            let mut out = Vec::new();
            {
                let mut e = brotli::CompressorWriter::new(&mut out, 4096, 1, 18);
                let _ = e.write_all(body);
            }
            ("br", out)
        }
        Coding::Zstd => ("zstd", zstd::encode_all(body, 1).unwrap_or_default()),
        Coding::Identity => ("identity", body.to_vec()),
        Coding::Bogus => ("x-bogus", body.to_vec()),
        Coding::Lying => ("gzip", body.to_vec()),
    }
}
