//! fairness-load: the two sides of the fairness measurement (issue 17, part 4), run inside an
//! agent's cgroup by the `fairness` end-to-end test and by `cargo xtask bench --only fairness`.
//!
//! - `victim`: calls one after another for `--seconds`, each a DNS query for `--dns-name` (or
//!   `--host`; UDP to `--resolver`, redirected to brokerd) and a GET on a new TLS connection (to
//!   `--connect`, redirected to brokerd); prints how many there were, how many failed (with the
//!   first reasons) and the latency percentiles of the whole call.
//! - `half-open`: opens `--count` connections that send a TLS record header and never the rest
//!   of the ClientHello, holds them for `--seconds`, and counts those brokerd closed.
//! - `storm`: new connections as fast as `--concurrency` tasks can open them, each held until
//!   brokerd closes it or 100 ms pass, for `--seconds`; counts those brokerd closed at once.
//! - `h2-flood`: `--connections` HTTP/2 connections, each with `--streams` requests in flight at
//!   all times, for `--seconds`; counts the answers by status.
//! - `dns-flood`: DNS queries as fast as one socket sends them, for `--seconds`; counts the
//!   answers by response code.
//! - `spin`: no call at all, only CPU burnt on as many threads as the floods run on, for
//!   `--seconds`: the part of a flood's cost that is the machine's (two agents sharing its
//!   CPUs), not brokerd's.
//!
//! It trusts the roots rustls-native-certs finds (`SSL_CERT_FILE`) and never resolves names:
//! `--connect IP:PORT` says where to dial and `--host` is the TLS server name and Host. It only
//! sends where it is told, and the callers tell it loopback addresses.
//!
//! Prints one JSON object on stdout. A flooder first prints `{"flooding":true}` once its flood
//! has started. Exits 0 unless it could not run at all.

use std::{
    collections::BTreeMap,
    net::SocketAddr,
    sync::{
        Arc,
        atomic::{AtomicU64, Ordering},
    },
    time::{Duration, Instant},
};

use bytes::Bytes;
use http::{Request, header};
use http_body_util::{BodyExt as _, Empty};
use hyper_util::rt::{TokioExecutor, TokioIo};
use rustls::{ClientConfig, RootCertStore, pki_types::ServerName};
use serde_json::json;
use tokio::{
    io::{AsyncReadExt as _, AsyncWriteExt as _},
    net::{TcpStream, UdpSocket},
};
use tokio_rustls::TlsConnector;

const USAGE: &str = "usage: fairness-load victim|half-open|storm|h2-flood|dns-flood|spin \
                     [--connect IP:PORT] [--host NAME] [--dns-name NAME] [--path PATH] \
                     [--header 'name: value'] \
                     [--resolver IP:PORT] [--seconds N] [--count N] [--concurrency N] \
                     [--connections N] [--streams N]";

struct Args {
    mode: String,
    connect: Option<SocketAddr>,
    host: String,
    /// The name the victim's DNS query asks for (the host when not given).
    dns_name: Option<String>,
    path: String,
    headers: Vec<(String, String)>,
    resolver: Option<SocketAddr>,
    seconds: f64,
    count: usize,
    concurrency: usize,
    connections: usize,
    streams: usize,
}

fn parse_args() -> Result<Args, String> {
    let mut it = std::env::args().skip(1);
    let mode = it.next().ok_or(USAGE)?;
    let mut a = Args {
        mode,
        connect: None,
        host: String::new(),
        dns_name: None,
        path: "/".into(),
        headers: Vec::new(),
        resolver: None,
        seconds: 3.0,
        count: 1000,
        concurrency: 64,
        connections: 8,
        streams: 100,
    };
    while let Some(flag) = it.next() {
        let value = it
            .next()
            .ok_or_else(|| format!("{flag} needs a value; {USAGE}"))?;
        let number = |v: &str| {
            v.parse::<usize>()
                .map_err(|e| format!("{flag} {v}: {e}"))
                .and_then(|n| {
                    if n == 0 {
                        Err(format!("{flag} must be at least 1"))
                    } else {
                        Ok(n)
                    }
                })
        };
        match flag.as_str() {
            "--connect" => {
                a.connect = Some(
                    value
                        .parse()
                        .map_err(|e| format!("--connect {value}: {e}"))?,
                )
            }
            "--resolver" => {
                a.resolver = Some(
                    value
                        .parse()
                        .map_err(|e| format!("--resolver {value}: {e}"))?,
                )
            }
            "--host" => a.host = value,
            "--dns-name" => a.dns_name = Some(value),
            "--path" => a.path = value,
            "--header" => {
                let (n, v) = value
                    .split_once(':')
                    .ok_or_else(|| format!("--header {value:?}: no colon"))?;
                a.headers.push((n.trim().to_string(), v.trim().to_string()));
            }
            "--seconds" => {
                a.seconds = value
                    .parse::<f64>()
                    .ok()
                    .filter(|s| *s > 0.0 && *s <= 600.0)
                    .ok_or_else(|| format!("--seconds {value}: between 0 and 600"))?
            }
            "--count" => a.count = number(&value)?,
            "--concurrency" => a.concurrency = number(&value)?,
            "--connections" => a.connections = number(&value)?,
            "--streams" => a.streams = number(&value)?,
            other => return Err(format!("unknown argument {other:?}; {USAGE}")),
        }
    }
    Ok(a)
}

impl Args {
    fn connect(&self) -> Result<SocketAddr, String> {
        self.connect
            .ok_or_else(|| format!("--connect is required; {USAGE}"))
    }

    fn resolver(&self) -> Result<SocketAddr, String> {
        self.resolver
            .ok_or_else(|| format!("--resolver is required; {USAGE}"))
    }

    fn duration(&self) -> Duration {
        Duration::from_secs_f64(self.seconds)
    }

    fn tls_name(&self) -> Result<ServerName<'static>, String> {
        ServerName::try_from(self.host.clone()).map_err(|e| format!("--host {:?}: {e}", self.host))
    }
}

/// The runtime's worker threads, in every mode: a flooder can keep this many CPUs busy.
const WORKER_THREADS: usize = 2;

fn main() {
    let args = match parse_args() {
        Ok(a) => a,
        Err(e) => {
            eprintln!("fairness-load: {e}");
            std::process::exit(2);
        }
    };
    let rt = match tokio::runtime::Builder::new_multi_thread()
        .worker_threads(WORKER_THREADS)
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("fairness-load: tokio runtime: {e}");
            std::process::exit(2);
        }
    };
    let result = rt.block_on(async {
        match args.mode.as_str() {
            "victim" => victim(&args).await,
            "half-open" => half_open(&args).await,
            "storm" => storm(&args).await,
            "h2-flood" => h2_flood(&args).await,
            "dns-flood" => dns_flood(&args).await,
            "spin" => spin(&args).await,
            other => Err(format!("unknown mode {other:?}; {USAGE}")),
        }
    });
    match result {
        Ok(report) => println!("{report}"),
        Err(e) => {
            eprintln!("fairness-load: {e}");
            std::process::exit(2);
        }
    }
}

fn tls_config(alpn: &[&[u8]]) -> Result<Arc<ClientConfig>, String> {
    let found = rustls_native_certs::load_native_certs();
    let mut roots = RootCertStore::empty();
    let (added, _) = roots.add_parsable_certificates(found.certs);
    if added == 0 {
        return Err(format!(
            "no trusted roots found (SSL_CERT_FILE / system store): {:?}",
            found.errors
        ));
    }
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let mut config = ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .map_err(|e| format!("rustls: {e}"))?
        .with_root_certificates(roots)
        .with_no_client_auth();
    config.alpn_protocols = alpn.iter().map(|p| p.to_vec()).collect();
    Ok(Arc::new(config))
}

fn announce_flooding() {
    println!("{}", json!({"flooding": true}));
}

/// A DNS query for `name` (type A, recursion desired).
fn dns_query(id: u16, name: &str) -> Vec<u8> {
    let mut q = Vec::with_capacity(12 + name.len() + 6);
    q.extend_from_slice(&id.to_be_bytes());
    q.extend_from_slice(&[0x01, 0x00, 0, 1, 0, 0, 0, 0, 0, 0]);
    for label in name.split('.') {
        q.push(u8::try_from(label.len()).unwrap_or(63).min(63));
        q.extend_from_slice(&label.as_bytes()[..label.len().min(63)]);
    }
    q.extend_from_slice(&[0, 0, 1, 0, 1]);
    q
}

/// One victim call: a DNS query, then a GET on a new TLS connection.
async fn victim_call(
    args: &Args,
    config: &Arc<ClientConfig>,
    dns: &UdpSocket,
    id: u16,
) -> Result<(), String> {
    dns.send(&dns_query(
        id,
        args.dns_name.as_deref().unwrap_or(&args.host),
    ))
    .await
    .map_err(|e| format!("DNS send: {e}"))?;
    let mut buf = [0u8; 1500];
    loop {
        let n = tokio::time::timeout(Duration::from_secs(5), dns.recv(&mut buf))
            .await
            .map_err(|_| "DNS: no answer in 5 s".to_string())?
            .map_err(|e| format!("DNS receive: {e}"))?;
        if n >= 12 && u16::from_be_bytes([buf[0], buf[1]]) == id {
            let rcode = buf[3] & 0x0f;
            if rcode != 0 {
                return Err(format!("DNS: response code {rcode}"));
            }
            break;
        }
    }
    let call = async {
        let tcp = TcpStream::connect(args.connect()?)
            .await
            .map_err(|e| format!("connect: {e}"))?;
        let _ = tcp.set_nodelay(true);
        let tls = TlsConnector::from(config.clone())
            .connect(args.tls_name()?, tcp)
            .await
            .map_err(|e| format!("TLS: {e}"))?;
        let (mut sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(tls))
            .await
            .map_err(|e| format!("http/1.1 handshake: {e}"))?;
        tokio::spawn(conn);
        let mut request = Request::get(args.path.as_str()).header(header::HOST, &args.host);
        for (n, v) in &args.headers {
            request = request.header(n.as_str(), v.as_str());
        }
        let request = request
            .body(Empty::<Bytes>::new())
            .map_err(|e| format!("request: {e}"))?;
        let response = sender
            .send_request(request)
            .await
            .map_err(|e| format!("request: {e}"))?;
        let status = response.status();
        response
            .into_body()
            .collect()
            .await
            .map_err(|e| format!("body: {e}"))?;
        if !status.is_success() {
            return Err(format!("status {status}"));
        }
        Ok(())
    };
    tokio::time::timeout(Duration::from_secs(10), call)
        .await
        .map_err(|_| "HTTPS call: no answer in 10 s".to_string())?
}

async fn victim(args: &Args) -> Result<String, String> {
    let config = tls_config(&[b"http/1.1"])?;
    let dns = UdpSocket::bind("0.0.0.0:0")
        .await
        .map_err(|e| format!("UDP socket: {e}"))?;
    dns.connect(args.resolver()?)
        .await
        .map_err(|e| format!("UDP connect: {e}"))?;
    let until = Instant::now() + args.duration();
    let mut latencies = Vec::new();
    let mut errors: Vec<String> = Vec::new();
    let mut failures = 0u64;
    let mut id = 0u16;
    while Instant::now() < until {
        id = id.wrapping_add(1);
        let started = Instant::now();
        match victim_call(args, &config, &dns, id).await {
            Ok(()) => latencies.push(started.elapsed().as_secs_f64() * 1000.0),
            Err(e) => {
                failures += 1;
                if errors.len() < 5 {
                    errors.push(e);
                }
            }
        }
    }
    latencies.sort_by(f64::total_cmp);
    let pct = |p: f64| -> f64 {
        if latencies.is_empty() {
            return 0.0;
        }
        let i = ((latencies.len() as f64 * p).ceil() as usize).clamp(1, latencies.len()) - 1;
        latencies[i]
    };
    Ok(json!({
        "calls": latencies.len() as u64 + failures,
        "failures": failures,
        "errors": errors,
        "p50_ms": pct(0.50),
        "p99_ms": pct(0.99),
        "max_ms": latencies.last().copied().unwrap_or(0.0),
    })
    .to_string())
}

/// Whether brokerd closed `stream` (EOF or reset) within `wait`.
async fn closed_within(stream: &mut TcpStream, wait: Duration) -> bool {
    let mut b = [0u8; 64];
    match tokio::time::timeout(wait, stream.read(&mut b)).await {
        Ok(Ok(0)) | Ok(Err(_)) => true,
        Ok(Ok(_)) | Err(_) => false,
    }
}

async fn half_open(args: &Args) -> Result<String, String> {
    let to = args.connect()?;
    raise_open_files();
    let mut held = Vec::new();
    let mut connect_failed = 0u64;
    for _ in 0..args.count {
        match TcpStream::connect(to).await {
            Ok(mut s) => {
                // A TLS handshake record header: brokerd waits for the rest.
                let _ = s.write_all(&[0x16, 0x03, 0x01, 0x02, 0x00]).await;
                held.push(s);
            }
            Err(_) => connect_failed += 1,
        }
        if held.len() == 50 {
            announce_flooding();
        }
    }
    if held.len() < 50 {
        announce_flooding();
    }
    let opened = held.len();
    tokio::time::sleep(args.duration()).await;
    let mut closed = 0u64;
    for s in &mut held {
        if closed_within(s, Duration::from_millis(1)).await {
            closed += 1;
        }
    }
    Ok(json!({
        "attempted": args.count,
        "opened": opened,
        "connect_failed": connect_failed,
        "closed_by_broker": closed,
        "still_open": opened as u64 - closed,
    })
    .to_string())
}

fn raise_open_files() {
    let mut limit = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: getrlimit and setrlimit only read and write the struct passed.
    unsafe {
        if libc::getrlimit(libc::RLIMIT_NOFILE, &mut limit) == 0 {
            limit.rlim_cur = limit.rlim_max;
            libc::setrlimit(libc::RLIMIT_NOFILE, &limit);
        }
    }
}

async fn storm(args: &Args) -> Result<String, String> {
    let to = args.connect()?;
    let until = Instant::now() + args.duration();
    let attempts = Arc::new(AtomicU64::new(0));
    let closed = Arc::new(AtomicU64::new(0));
    let failed = Arc::new(AtomicU64::new(0));
    let mut tasks = Vec::new();
    for _ in 0..args.concurrency {
        let (attempts, closed, failed) = (attempts.clone(), closed.clone(), failed.clone());
        tasks.push(tokio::spawn(async move {
            while Instant::now() < until {
                attempts.fetch_add(1, Ordering::Relaxed);
                match TcpStream::connect(to).await {
                    Ok(mut s) => {
                        if closed_within(&mut s, Duration::from_millis(100)).await {
                            closed.fetch_add(1, Ordering::Relaxed);
                        }
                    }
                    Err(_) => {
                        failed.fetch_add(1, Ordering::Relaxed);
                    }
                }
            }
        }));
    }
    announce_flooding();
    for t in tasks {
        let _ = t.await;
    }
    Ok(json!({
        "attempts": attempts.load(Ordering::Relaxed),
        "closed_by_broker": closed.load(Ordering::Relaxed),
        "connect_failed": failed.load(Ordering::Relaxed),
    })
    .to_string())
}

async fn h2_flood(args: &Args) -> Result<String, String> {
    let to = args.connect()?;
    let config = tls_config(&[b"h2"])?;
    let until = Instant::now() + args.duration();
    let statuses = Arc::new(std::sync::Mutex::new(BTreeMap::<String, u64>::new()));
    let count = |statuses: &std::sync::Mutex<BTreeMap<String, u64>>, key: String| {
        if let Ok(mut s) = statuses.lock() {
            *s.entry(key).or_default() += 1;
        }
    };
    let uri = format!("https://{}{}", args.host, args.path);
    let mut conns = Vec::new();
    for _ in 0..args.connections {
        let tcp = TcpStream::connect(to)
            .await
            .map_err(|e| format!("connect: {e}"))?;
        let tls = TlsConnector::from(config.clone())
            .connect(args.tls_name()?, tcp)
            .await
            .map_err(|e| format!("TLS: {e}"))?;
        let (sender, conn) = hyper::client::conn::http2::Builder::new(TokioExecutor::new())
            .max_concurrent_reset_streams(0)
            .handshake(TokioIo::new(tls))
            .await
            .map_err(|e| format!("h2 handshake: {e}"))?;
        tokio::spawn(conn);
        conns.push(sender);
    }
    let mut tasks = Vec::new();
    for sender in conns {
        for _ in 0..args.streams {
            let mut sender = sender.clone();
            let statuses = statuses.clone();
            let uri = uri.clone();
            let headers = args.headers.clone();
            tasks.push(tokio::spawn(async move {
                while Instant::now() < until {
                    let mut request = Request::get(uri.as_str());
                    for (n, v) in &headers {
                        request = request.header(n.as_str(), v.as_str());
                    }
                    let Ok(request) = request.body(Empty::<Bytes>::new()) else {
                        return;
                    };
                    if sender.ready().await.is_err() {
                        count(&statuses, "connection closed".into());
                        return;
                    }
                    match sender.send_request(request).await {
                        Ok(r) => {
                            let status = r.status().as_u16().to_string();
                            let _ = r.into_body().collect().await;
                            count(&statuses, status);
                        }
                        Err(_) => count(&statuses, "error".into()),
                    }
                }
            }));
        }
    }
    announce_flooding();
    for t in tasks {
        let _ = t.await;
    }
    let statuses = statuses.lock().map(|s| s.clone()).unwrap_or_default();
    Ok(json!({ "statuses": statuses }).to_string())
}

async fn dns_flood(args: &Args) -> Result<String, String> {
    let resolver = args.resolver()?;
    let socket = UdpSocket::bind("0.0.0.0:0")
        .await
        .map_err(|e| format!("UDP socket: {e}"))?;
    socket
        .connect(resolver)
        .await
        .map_err(|e| format!("UDP connect: {e}"))?;
    let socket = Arc::new(socket);
    let until = Instant::now() + args.duration();
    let codes = Arc::new(std::sync::Mutex::new(BTreeMap::<String, u64>::new()));
    let reader = {
        let (socket, codes) = (socket.clone(), codes.clone());
        tokio::spawn(async move {
            let mut buf = [0u8; 1500];
            let stop = until + Duration::from_secs(1);
            while let Ok(Ok(n)) = tokio::time::timeout_at(stop.into(), socket.recv(&mut buf)).await
            {
                if n >= 4
                    && let Ok(mut c) = codes.lock()
                {
                    *c.entry((buf[3] & 0x0f).to_string()).or_default() += 1;
                }
            }
        })
    };
    announce_flooding();
    let mut sent = 0u64;
    let mut id = 0u16;
    while Instant::now() < until {
        for _ in 0..64 {
            id = id.wrapping_add(1);
            let name = format!("q{id:x}.flood.test");
            // A full send buffer drops the query: a flood does not wait.
            if socket.try_send(&dns_query(id, &name)).is_ok() {
                sent += 1;
            }
        }
        tokio::task::yield_now().await;
    }
    let _ = reader.await;
    let codes = codes.lock().map(|c| c.clone()).unwrap_or_default();
    Ok(json!({ "sent": sent, "codes": codes }).to_string())
}

async fn spin(args: &Args) -> Result<String, String> {
    let until = Instant::now() + args.duration();
    let mut tasks = Vec::new();
    for _ in 0..WORKER_THREADS {
        tasks.push(tokio::task::spawn_blocking(move || {
            let mut rounds = 0u64;
            while Instant::now() < until {
                for i in 0..1024u64 {
                    rounds = std::hint::black_box(rounds.wrapping_add(i));
                }
            }
            rounds
        }));
    }
    announce_flooding();
    for t in tasks {
        t.await.map_err(|e| format!("spinning thread: {e}"))?;
    }
    Ok(json!({ "threads": WORKER_THREADS }).to_string())
}
