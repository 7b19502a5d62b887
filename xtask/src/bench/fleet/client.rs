//! One fleet agent's load (`xtask bench-fleet-client`, hidden from `--help`): N keep-alive
//! HTTP/1.1 connections over TLS on one thread, as `wrk -t1 -cN` makes them, but with the
//! connections opened (and one request made on each) before the clock starts, and the clock
//! started by the bench: the process prints `fleet-ready` and waits for a line on stdin.
//!
//! Why not wrk: 100 wrk processes starting TLS at once starve each other on two cores. wrk
//! retries `SSL_connect` every time the socket is writable, which it always is while the
//! handshake waits for the server, so each handshaking wrk spins; in a trial against a bare
//! nginx a third of 100 processes made no request at all in 5 s. Here the handshakes are done
//! before anything is timed, so every agent runs the same seconds.
//!
//! It then sends `GET <path>` on every connection, one request at a time each, until the
//! seconds are up, and prints `fleet-summary <requests> <failures> <seconds>` and
//! `fleet-latency <µs>:<count> ...` (each request's time from sending it to the end of its
//! answer). A failure is an answer other than 200, an error or no answer within 5 s (wrk's
//! `--timeout` in the other rows); the connection is then opened again. Like wrk, it does not
//! check certificates: every endpoint is on loopback, and the proxies' own upstream
//! verification is part of what is measured.

use std::{
    collections::BTreeMap,
    io::{BufRead as _, Write as _},
    net::SocketAddr,
    sync::Arc,
    time::{Duration, Instant},
};

use anyhow::{Context as _, Result, bail};
use bytes::Bytes;
use http::{Request, StatusCode, header};
use http_body_util::{BodyExt as _, Empty};
use hyper_util::rt::TokioIo;
use rustls::{
    ClientConfig, DigitallySignedStruct, SignatureScheme,
    client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier},
    crypto::{CryptoProvider, verify_tls12_signature, verify_tls13_signature},
    pki_types::{CertificateDer, ServerName, UnixTime},
};

use super::{LATENCY, READY, SUMMARY};

/// How long a request may take before it counts as failed.
const REQUEST_TIMEOUT: Duration = Duration::from_secs(5);

/// What one agent's client is asked to do.
pub struct ClientOptions {
    pub connect: SocketAddr,
    pub connections: u32,
    pub seconds: u64,
    /// The whole Authorization value each request carries.
    pub authorization: String,
    pub path: String,
}

/// Runs the client; see the module documentation.
pub fn run(options: &ClientOptions) -> Result<()> {
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    let client = Client::new(options)?;
    let mut senders = Vec::new();
    runtime.block_on(async {
        for _ in 0..options.connections {
            let mut sender = client.connect().await?;
            let (_, ok) = client.request(&mut sender).await;
            if !ok {
                bail!(
                    "the first request on a new connection to {} failed",
                    options.connect
                );
            }
            senders.push(sender);
        }
        Ok(())
    })?;

    let mut stdout = std::io::stdout();
    writeln!(stdout, "{READY}")?;
    stdout.flush()?;
    let mut gate = String::new();
    std::io::stdin().lock().read_line(&mut gate)?;

    let started = Instant::now();
    let deadline = started + Duration::from_secs(options.seconds);
    let results = runtime.block_on(async {
        let mut tasks = tokio::task::JoinSet::new();
        for sender in senders {
            let client = client.clone();
            tasks.spawn(async move { client.until(sender, deadline).await });
        }
        let mut results = Vec::new();
        while let Some(result) = tasks.join_next().await {
            results.push(result.context("a connection's task failed")?);
        }
        anyhow::Ok(results)
    })?;
    let seconds = started.elapsed().as_secs_f64();

    let mut latencies: BTreeMap<u64, u64> = BTreeMap::new();
    let (mut requests, mut failures) = (0u64, 0u64);
    for result in results {
        requests += result.requests;
        failures += result.failures;
        for (us, count) in result.latencies {
            *latencies.entry(us).or_default() += count;
        }
    }
    let buckets: Vec<String> = latencies
        .iter()
        .map(|(us, count)| format!("{us}:{count}"))
        .collect();
    writeln!(stdout, "{SUMMARY} {requests} {failures} {seconds:.6}")?;
    writeln!(stdout, "{LATENCY} {}", buckets.join(" "))?;
    stdout.flush()?;
    Ok(())
}

type Sender = hyper::client::conn::http1::SendRequest<Empty<Bytes>>;

/// What one connection did in the measured seconds.
struct ConnectionResult {
    requests: u64,
    failures: u64,
    latencies: BTreeMap<u64, u64>,
}

#[derive(Clone)]
struct Client {
    tls: tokio_rustls::TlsConnector,
    connect: SocketAddr,
    host: String,
    authorization: String,
    path: String,
}

impl Client {
    fn new(options: &ClientOptions) -> Result<Self> {
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let mut config = ClientConfig::builder_with_provider(provider.clone())
            .with_safe_default_protocol_versions()?
            .dangerous()
            .with_custom_certificate_verifier(Arc::new(AnyCertificate(provider)))
            .with_no_client_auth();
        config.alpn_protocols = vec![b"http/1.1".to_vec()];
        Ok(Self {
            tls: tokio_rustls::TlsConnector::from(Arc::new(config)),
            connect: options.connect,
            host: options.connect.to_string(),
            authorization: options.authorization.clone(),
            path: options.path.clone(),
        })
    }

    async fn connect(&self) -> Result<Sender> {
        let tcp = tokio::net::TcpStream::connect(self.connect).await?;
        tcp.set_nodelay(true)?;
        // An address as the server name: rustls sends no SNI for it, as a client dialing an
        // address does not.
        let tls = self
            .tls
            .connect(ServerName::IpAddress(self.connect.ip().into()), tcp)
            .await?;
        let (sender, connection) = hyper::client::conn::http1::handshake(TokioIo::new(tls)).await?;
        tokio::spawn(connection);
        Ok(sender)
    }

    /// One request on `sender`: its time in µs and whether it was answered 200 in time.
    async fn request(&self, sender: &mut Sender) -> (u64, bool) {
        let started = Instant::now();
        let answered = tokio::time::timeout(REQUEST_TIMEOUT, async {
            let request = Request::get(self.path.as_str())
                .header(header::HOST, self.host.as_str())
                .header(header::AUTHORIZATION, self.authorization.as_str())
                .body(Empty::<Bytes>::new())?;
            sender.ready().await?;
            let response = sender.send_request(request).await?;
            let status = response.status();
            response.into_body().collect().await?;
            anyhow::Ok(status == StatusCode::OK)
        })
        .await;
        let us = u64::try_from(started.elapsed().as_micros()).unwrap_or(u64::MAX);
        (us, matches!(answered, Ok(Ok(true))))
    }

    /// Requests one after another on `sender` until `deadline`, opening the connection again
    /// after a failure.
    async fn until(&self, mut sender: Sender, deadline: Instant) -> ConnectionResult {
        let mut result = ConnectionResult {
            requests: 0,
            failures: 0,
            latencies: BTreeMap::new(),
        };
        while Instant::now() < deadline {
            let (us, ok) = self.request(&mut sender).await;
            result.requests += 1;
            if ok {
                *result.latencies.entry(us).or_default() += 1;
                continue;
            }
            result.failures += 1;
            match self.connect().await {
                Ok(fresh) => sender = fresh,
                // Nothing to send on: wait a little rather than spin on a refused connect.
                Err(_) => tokio::time::sleep(Duration::from_millis(100)).await,
            }
        }
        result
    }
}

/// Accepts any server certificate (the handshake's signatures are still checked): the bench
/// measures, on loopback, and does not authenticate the proxies.
#[derive(Debug)]
struct AnyCertificate(Arc<CryptoProvider>);

impl ServerCertVerifier for AnyCertificate {
    fn verify_server_cert(
        &self,
        _end_entity: &CertificateDer<'_>,
        _intermediates: &[CertificateDer<'_>],
        _server_name: &ServerName<'_>,
        _ocsp_response: &[u8],
        _now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        Ok(ServerCertVerified::assertion())
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        verify_tls12_signature(
            message,
            cert,
            dss,
            &self.0.signature_verification_algorithms,
        )
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        verify_tls13_signature(
            message,
            cert,
            dss,
            &self.0.signature_verification_algorithms,
        )
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.0.signature_verification_algorithms.supported_schemes()
    }
}
