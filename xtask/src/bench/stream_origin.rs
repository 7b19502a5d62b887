//! The streaming origin of the SSE and bulk rows (issue 12): a small HTTPS server in xtask (tokio,
//! hyper, rustls), which the bench runs as a process of its own from the release build
//! (`xtask bench-origin`), on the origin's address, http/1.1 over TLS like the nginx origin, with
//! the same certificate. nginx cannot pace a stream or count an upload, so these rows need an
//! origin of their own. Every path answers 401 without `Authorization: <the real key>`:
//!
//! - `GET /v1/events`: `text/event-stream`, [`EVENTS`] events [`EVENT_GAP`] apart, the first at
//!   once, each sent (and flushed) at its scheduled time after the request arrived. A thread of
//!   its own sleeps until each event is due (tokio's timers tick in whole milliseconds, which would
//!   blur the lag being measured) and hands the event to the connection.
//! - `GET /v1/download?bytes=N`: N bytes of printable pseudo-random text with a Content-Length,
//!   streamed from one shared 1 MiB block, never held whole.
//! - `POST /v1/upload`: reads the body as it streams and discards it, answering
//!   `{"bytes": <how many arrived>}`.

use std::{
    convert::Infallible,
    net::SocketAddr,
    pin::Pin,
    sync::Arc,
    task::{Context as TaskContext, Poll},
    thread,
    time::{Duration, Instant},
};

use anyhow::{Context as _, Result};
use bytes::Bytes;
use http::{Method, Request, Response, StatusCode, header};
use http_body_util::BodyExt as _;
use hyper::body::{Body, Frame, Incoming, SizeHint};
use hyper_util::rt::TokioIo;
use rustls::{
    ServerConfig,
    pki_types::{CertificateDer, PrivateKeyDer, pem::PemObject as _},
};
use tokio::sync::{mpsc, watch};

use super::pki::CertFiles;

/// How many events `/v1/events` sends.
pub const EVENTS: usize = 100;
/// The time between two events of `/v1/events`.
pub const EVENT_GAP: Duration = Duration::from_millis(20);
/// The size of the block `/v1/download` repeats.
const BLOCK_LEN: usize = 1 << 20;
/// The most `/v1/download` puts in one body frame.
const FRAME_LEN: usize = 256 * 1024;

/// The running origin; stopped when dropped.
pub struct StreamOrigin {
    addr: SocketAddr,
    shutdown: Option<watch::Sender<bool>>,
    thread: Option<thread::JoinHandle<()>>,
}

/// What every connection shares.
struct Shared {
    /// The whole `Authorization` value a request must carry.
    authorization: String,
    /// What `/v1/download` repeats.
    block: Bytes,
}

impl StreamOrigin {
    /// Listens on `listen` (port 0: a free one) with `cert`, accepting requests that carry
    /// `authorization`.
    pub fn start(listen: SocketAddr, cert: &CertFiles, authorization: &str) -> Result<Self> {
        let config = Arc::new(tls_config(cert)?);
        let listener = std::net::TcpListener::bind(listen)
            .with_context(|| format!("binding the streaming origin on {listen}"))?;
        listener.set_nonblocking(true)?;
        let addr = listener.local_addr()?;
        let shared = Arc::new(Shared {
            authorization: authorization.to_owned(),
            block: text_block(),
        });
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .context("starting the streaming origin's runtime")?;
        let (shutdown, mut stopped) = watch::channel(false);
        let thread = thread::Builder::new()
            .name("bench-origin".into())
            .spawn(move || {
                runtime.block_on(async move {
                    let Ok(listener) = tokio::net::TcpListener::from_std(listener) else {
                        eprintln!("bench: the streaming origin cannot use its listener");
                        return;
                    };
                    let acceptor = tokio_rustls::TlsAcceptor::from(config);
                    loop {
                        tokio::select! {
                            _ = stopped.changed() => break,
                            accepted = listener.accept() => {
                                if let Ok((tcp, _)) = accepted {
                                    let _ = tcp.set_nodelay(true);
                                    tokio::spawn(serve(tcp, acceptor.clone(), shared.clone()));
                                }
                            }
                        }
                    }
                });
                runtime.shutdown_timeout(Duration::from_secs(1));
            })
            .context("starting the streaming origin's thread")?;
        Ok(Self {
            addr,
            shutdown: Some(shutdown),
            thread: Some(thread),
        })
    }

    /// Where it listens.
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }
}

impl Drop for StreamOrigin {
    fn drop(&mut self) {
        if let Some(shutdown) = self.shutdown.take() {
            let _ = shutdown.send(true);
        }
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
    }
}

/// The server's TLS settings: `cert`, http/1.1 only (as the nginx origin's listener for the
/// proxies), TLS 1.2 and 1.3.
fn tls_config(cert: &CertFiles) -> Result<ServerConfig> {
    let chain = CertificateDer::pem_file_iter(&cert.cert)
        .and_then(|certs| certs.collect::<Result<Vec<_>, _>>())
        .with_context(|| format!("reading {}", cert.cert.display()))?;
    let key = PrivateKeyDer::from_pem_file(&cert.key)
        .with_context(|| format!("reading {}", cert.key.display()))?;
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let mut config = ServerConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()?
        .with_no_client_auth()
        .with_single_cert(chain, key)
        .context("the streaming origin's certificate")?;
    config.alpn_protocols = vec![b"http/1.1".to_vec()];
    Ok(config)
}

/// 1 MiB of printable pseudo-random text (base64's alphabet, a line break every 76 bytes): what a
/// large API answer looks like to the scrubber, which has to look at every byte of it.
fn text_block() -> Bytes {
    const ALPHABET: &[u8; 64] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";
    let mut state: u64 = 0x9e37_79b9_7f4a_7c15;
    let block: Vec<u8> = (0..BLOCK_LEN)
        .map(|i| {
            if i % 77 == 76 {
                return b'\n';
            }
            // xorshift64: cheap, and no dependency for bytes nobody checks.
            state ^= state << 13;
            state ^= state >> 7;
            state ^= state << 17;
            ALPHABET[(state % 64) as usize]
        })
        .collect();
    Bytes::from(block)
}

async fn serve(
    tcp: tokio::net::TcpStream,
    acceptor: tokio_rustls::TlsAcceptor,
    shared: Arc<Shared>,
) {
    let Ok(tls) = acceptor.accept(tcp).await else {
        return;
    };
    let service = hyper::service::service_fn(move |request| {
        let shared = shared.clone();
        async move { Ok::<_, Infallible>(respond(request, &shared).await) }
    });
    let _ = hyper::server::conn::http1::Builder::new()
        .serve_connection(TokioIo::new(tls), service)
        .await;
}

async fn respond(request: Request<Incoming>, shared: &Shared) -> Response<OriginBody> {
    let authorized = request
        .headers()
        .get(header::AUTHORIZATION)
        .is_some_and(|value| value.as_bytes() == shared.authorization.as_bytes());
    if !authorized {
        return small(StatusCode::UNAUTHORIZED, r#"{"authorized":false}"#.into());
    }
    match (request.method(), request.uri().path()) {
        (&Method::GET, "/v1/events") => events(),
        (&Method::GET, "/v1/download") => {
            let bytes = request
                .uri()
                .query()
                .and_then(|q| q.split('&').find_map(|pair| pair.strip_prefix("bytes=")))
                .and_then(|n| n.parse::<u64>().ok());
            match bytes {
                Some(bytes) => download(shared.block.clone(), bytes),
                None => small(
                    StatusCode::BAD_REQUEST,
                    r#"{"error":"say how many bytes: /v1/download?bytes=N"}"#.into(),
                ),
            }
        }
        (&Method::POST, "/v1/upload") => {
            let mut body = request.into_body();
            let mut received: u64 = 0;
            while let Some(frame) = body.frame().await {
                match frame {
                    Ok(frame) => {
                        if let Some(data) = frame.data_ref() {
                            received += data.len() as u64;
                        }
                    }
                    Err(_) => {
                        return small(
                            StatusCode::BAD_REQUEST,
                            r#"{"error":"the upload was cut"}"#.into(),
                        );
                    }
                }
            }
            small(StatusCode::OK, format!(r#"{{"bytes":{received}}}"#))
        }
        _ => small(StatusCode::NOT_FOUND, r#"{"error":"no such path"}"#.into()),
    }
}

fn small(status: StatusCode, json: String) -> Response<OriginBody> {
    let mut response = Response::new(OriginBody::Full(Some(Bytes::from(json))));
    *response.status_mut() = status;
    response.headers_mut().insert(
        header::CONTENT_TYPE,
        header::HeaderValue::from_static("application/json"),
    );
    response
}

fn download(block: Bytes, bytes: u64) -> Response<OriginBody> {
    let mut response = Response::new(OriginBody::Download {
        block,
        remaining: bytes,
        offset: 0,
    });
    let headers = response.headers_mut();
    headers.insert(
        header::CONTENT_TYPE,
        header::HeaderValue::from_static("text/plain"),
    );
    headers.insert(header::CONTENT_LENGTH, header::HeaderValue::from(bytes));
    response
}

/// The event stream: a pacing thread sends each event when it is due, measured from now.
fn events() -> Response<OriginBody> {
    let (sender, receiver) = mpsc::channel(EVENTS);
    let started = Instant::now();
    let paced = thread::Builder::new()
        .name("bench-events".into())
        .spawn(move || {
            for index in 0..EVENTS {
                let due = started + EVENT_GAP * index as u32;
                thread::sleep(due.saturating_duration_since(Instant::now()));
                let event = format!(
                    "id: {index}\nevent: delta\ndata: {{\"index\":{index},\"text\":\"a token or \
                     two of a streamed answer\"}}\n\n"
                );
                if sender.blocking_send(Bytes::from(event)).is_err() {
                    // The client went away.
                    return;
                }
            }
        });
    if paced.is_err() {
        return small(
            StatusCode::INTERNAL_SERVER_ERROR,
            r#"{"error":"cannot start the pacing thread"}"#.into(),
        );
    }
    let mut response = Response::new(OriginBody::Events(receiver));
    let headers = response.headers_mut();
    headers.insert(
        header::CONTENT_TYPE,
        header::HeaderValue::from_static("text/event-stream"),
    );
    headers.insert(
        header::CACHE_CONTROL,
        header::HeaderValue::from_static("no-cache"),
    );
    response
}

/// Every body the origin sends.
enum OriginBody {
    Full(Option<Bytes>),
    /// `remaining` more bytes of `block` repeated, the next from `offset`.
    Download {
        block: Bytes,
        remaining: u64,
        offset: usize,
    },
    Events(mpsc::Receiver<Bytes>),
}

impl Body for OriginBody {
    type Data = Bytes;
    type Error = Infallible;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut TaskContext<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, Infallible>>> {
        match self.get_mut() {
            Self::Full(bytes) => Poll::Ready(bytes.take().map(|b| Ok(Frame::data(b)))),
            Self::Download {
                block,
                remaining,
                offset,
            } => {
                if *remaining == 0 {
                    return Poll::Ready(None);
                }
                let len = usize::try_from(*remaining)
                    .unwrap_or(usize::MAX)
                    .min(FRAME_LEN)
                    .min(block.len() - *offset);
                let frame = block.slice(*offset..*offset + len);
                *offset = (*offset + len) % block.len();
                *remaining -= len as u64;
                Poll::Ready(Some(Ok(Frame::data(frame))))
            }
            Self::Events(receiver) => receiver
                .poll_recv(cx)
                .map(|event| event.map(|e| Ok(Frame::data(e)))),
        }
    }

    fn is_end_stream(&self) -> bool {
        match self {
            Self::Full(bytes) => bytes.is_none(),
            Self::Download { remaining, .. } => *remaining == 0,
            Self::Events(_) => false,
        }
    }

    fn size_hint(&self) -> SizeHint {
        match self {
            Self::Full(bytes) => SizeHint::with_exact(bytes.as_ref().map_or(0, |b| b.len() as u64)),
            Self::Download { remaining, .. } => SizeHint::with_exact(*remaining),
            Self::Events(_) => SizeHint::default(),
        }
    }
}

#[cfg(test)]
mod tests {
    use std::path::Path;

    use http_body_util::{Empty, Full};
    use rcgen::{BasicConstraints, CertificateParams, IsCa, Issuer, KeyPair};
    use rustls::{ClientConfig, RootCertStore, pki_types::ServerName};

    use super::*;

    /// A CA and a leaf for 127.0.0.1 it signed, as PEM files in `dir`; the CA's certificate.
    fn certificates(dir: &Path) -> Result<(CertFiles, CertificateDer<'static>)> {
        let ca_key = KeyPair::generate()?;
        let mut ca_params = CertificateParams::new(Vec::<String>::new())?;
        ca_params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        let ca = ca_params.self_signed(&ca_key)?;
        let issuer = Issuer::new(ca_params, ca_key);
        let key = KeyPair::generate()?;
        let leaf =
            CertificateParams::new(vec!["127.0.0.1".to_owned()])?.signed_by(&key, &issuer)?;
        let files = CertFiles {
            cert: dir.join("origin.pem"),
            key: dir.join("origin.key"),
        };
        std::fs::write(&files.cert, leaf.pem())?;
        std::fs::write(&files.key, key.serialize_pem())?;
        Ok((files, ca.der().clone()))
    }

    type Sender<B> = hyper::client::conn::http1::SendRequest<B>;

    /// An http/1.1 connection over TLS to `addr`, trusting `ca`.
    async fn connect<B>(addr: SocketAddr, ca: &CertificateDer<'static>) -> Result<Sender<B>>
    where
        B: Body + Send + 'static,
        B::Data: Send,
        B::Error: Into<Box<dyn std::error::Error + Send + Sync>>,
    {
        let mut roots = RootCertStore::empty();
        roots.add(ca.clone())?;
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let mut config = ClientConfig::builder_with_provider(provider)
            .with_safe_default_protocol_versions()?
            .with_root_certificates(roots)
            .with_no_client_auth();
        config.alpn_protocols = vec![b"http/1.1".to_vec()];
        let tcp = tokio::net::TcpStream::connect(addr).await?;
        let tls = tokio_rustls::TlsConnector::from(Arc::new(config))
            .connect(ServerName::IpAddress(addr.ip().into()), tcp)
            .await?;
        let (sender, connection) = hyper::client::conn::http1::handshake(TokioIo::new(tls)).await?;
        tokio::spawn(connection);
        Ok(sender)
    }

    fn request<B>(method: Method, path: &str, key: &str, body: B) -> Result<Request<B>> {
        Ok(Request::builder()
            .method(method)
            .uri(path)
            .header(header::HOST, "127.0.0.1")
            .header(header::AUTHORIZATION, key)
            .body(body)?)
    }

    #[test]
    fn paces_events_streams_downloads_counts_uploads_and_wants_the_key() -> Result<()> {
        let dir = tempfile::tempdir()?;
        let (cert, ca) = certificates(dir.path())?;
        let origin = StreamOrigin::start("127.0.0.1:0".parse()?, &cert, "Bearer k")?;
        let addr = origin.addr();
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()?;
        runtime.block_on(async {
            let mut get = connect::<Empty<Bytes>>(addr, &ca).await?;
            let refused = get
                .send_request(request(
                    Method::GET,
                    "/v1/events",
                    "Bearer x",
                    Empty::new(),
                )?)
                .await?;
            assert_eq!(refused.status(), StatusCode::UNAUTHORIZED);
            refused.into_body().collect().await?;

            // Events: each one its own frame, none before its time.
            let started = Instant::now();
            let response = get
                .send_request(request(
                    Method::GET,
                    "/v1/events",
                    "Bearer k",
                    Empty::new(),
                )?)
                .await?;
            assert_eq!(response.status(), StatusCode::OK);
            assert_eq!(
                response.headers().get(header::CONTENT_TYPE),
                Some(&header::HeaderValue::from_static("text/event-stream"))
            );
            let mut body = response.into_body();
            let mut arrivals = Vec::new();
            while let Some(frame) = body.frame().await {
                if let Some(data) = frame?.data_ref() {
                    let text = std::str::from_utf8(data)?;
                    assert!(
                        text.starts_with(&format!("id: {}\n", arrivals.len())),
                        "{text:?}"
                    );
                    assert!(text.ends_with("\n\n"), "{text:?}");
                    arrivals.push(started.elapsed());
                }
            }
            assert_eq!(arrivals.len(), EVENTS);
            for (index, arrived) in arrivals.iter().enumerate() {
                assert!(
                    *arrived >= EVENT_GAP * index as u32,
                    "event {index} at {arrived:?}"
                );
            }

            // A download: exactly the bytes asked for, over several frames, all printable.
            let length = 3 * BLOCK_LEN as u64 + 12_345;
            let response = get
                .send_request(request(
                    Method::GET,
                    &format!("/v1/download?bytes={length}"),
                    "Bearer k",
                    Empty::new(),
                )?)
                .await?;
            assert_eq!(response.status(), StatusCode::OK);
            let body = response.into_body().collect().await?.to_bytes();
            assert_eq!(body.len() as u64, length);
            assert!(body.iter().all(|b| b.is_ascii_graphic() || *b == b'\n'));

            // An upload: counted, not kept.
            let mut post = connect::<Full<Bytes>>(addr, &ca).await?;
            let sent = vec![7u8; 5 * BLOCK_LEN + 3];
            let response = post
                .send_request(request(
                    Method::POST,
                    "/v1/upload",
                    "Bearer k",
                    Full::new(Bytes::from(sent)),
                )?)
                .await?;
            assert_eq!(response.status(), StatusCode::OK);
            let answer = response.into_body().collect().await?.to_bytes();
            assert_eq!(answer, format!(r#"{{"bytes":{}}}"#, 5 * BLOCK_LEN + 3));
            Ok::<_, anyhow::Error>(())
        })?;
        drop(origin);
        Ok(())
    }
}
