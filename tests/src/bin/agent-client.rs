//! agent-client: a small HTTPS/WebSocket client for agent-broker's end-to-end tests, meant to be
//! built as a statically linked binary (no dynamic loader, no libssl): the kind of client that
//! cannot be made to use a proxy or an injected library, and that brokerd must still capture.
//!
//! It trusts the roots rustls-native-certs finds (`SSL_CERT_FILE` / `SSL_CERT_DIR`, else the
//! system store) and never resolves names: `--connect IP:PORT` says where to dial, the URL's
//! host is only the TLS server name and the Host / :authority.
//!
//! ```text
//! agent-client get URL --connect IP:PORT [--header 'name: value']... [--http1.1 | --http2]
//! agent-client ws  URL --connect IP:PORT [--header 'name: value']... --message TEXT
//! ```
//!
//! Prints one JSON object: `status`, `version`, `headers` (lowercase names), `body`, `chunk_ms`
//! (arrival time of each body piece, relative to the first), `ws_echo`, `error`. Exits 0 when
//! it got any HTTP answer, 1 otherwise.

use std::{collections::BTreeMap, net::SocketAddr, sync::Arc, time::Duration};

use bytes::Bytes;
use futures_util::{SinkExt as _, StreamExt as _};
use http::{Request, Uri, header};
use http_body_util::{BodyExt as _, Empty};
use hyper_util::rt::{TokioExecutor, TokioIo};
use rustls::{ClientConfig, RootCertStore, pki_types::ServerName};
use serde::Serialize;
use tokio::net::TcpStream;
use tokio_rustls::{TlsConnector, client::TlsStream};
use tokio_tungstenite::tungstenite::{self, client::IntoClientRequest as _};

#[derive(Default, Serialize)]
struct Report {
    status: u16,
    version: Option<String>,
    headers: BTreeMap<String, String>,
    body: String,
    chunk_ms: Vec<f64>,
    ws_echo: Option<String>,
    error: Option<String>,
}

#[derive(Debug, PartialEq, Eq)]
enum Proto {
    Any,
    Http1,
    Http2,
}

struct Args {
    command: String,
    url: Uri,
    connect: SocketAddr,
    headers: Vec<(String, String)>,
    proto: Proto,
    message: Option<String>,
}

const USAGE: &str = "usage: agent-client get|ws URL --connect IP:PORT [--header 'name: value']... \
                     [--http1.1|--http2] [--message TEXT]";

fn parse_args() -> Result<Args, String> {
    let mut it = std::env::args().skip(1);
    let command = it.next().ok_or(USAGE)?;
    if command != "get" && command != "ws" {
        return Err(format!("unknown command {command:?}; {USAGE}"));
    }
    let url: Uri = it
        .next()
        .ok_or(USAGE)?
        .parse()
        .map_err(|e| format!("bad URL: {e}"))?;
    let mut connect = None;
    let mut headers = Vec::new();
    let mut proto = Proto::Any;
    let mut message = None;
    while let Some(arg) = it.next() {
        match arg.as_str() {
            "--connect" => {
                let v = it.next().ok_or("--connect needs IP:PORT")?;
                connect = Some(v.parse().map_err(|e| format!("bad --connect {v}: {e}"))?);
            }
            "--header" => {
                let v = it.next().ok_or("--header needs 'name: value'")?;
                let (n, val) = v
                    .split_once(':')
                    .ok_or_else(|| format!("bad --header {v:?}: no colon"))?;
                headers.push((n.trim().to_string(), val.trim().to_string()));
            }
            "--http1.1" => proto = Proto::Http1,
            "--http2" => proto = Proto::Http2,
            "--message" => message = Some(it.next().ok_or("--message needs TEXT")?),
            other => return Err(format!("unknown argument {other:?}; {USAGE}")),
        }
    }
    Ok(Args {
        command,
        url,
        connect: connect.ok_or("--connect IP:PORT is required")?,
        headers,
        proto,
        message,
    })
}

fn main() {
    let mut report = Report::default();
    let ok = match parse_args() {
        Ok(args) => match tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
        {
            Ok(rt) => {
                let result = rt.block_on(async {
                    tokio::time::timeout(Duration::from_secs(30), run(&args, &mut report)).await
                });
                match result {
                    Ok(Ok(())) => true,
                    Ok(Err(e)) => {
                        report.error = Some(e);
                        report.status != 0
                    }
                    Err(_) => {
                        report.error = Some("timed out after 30 s".into());
                        false
                    }
                }
            }
            Err(e) => {
                report.error = Some(format!("tokio runtime: {e}"));
                false
            }
        },
        Err(e) => {
            report.error = Some(e);
            false
        }
    };
    println!(
        "{}",
        serde_json::to_string(&report).unwrap_or_else(|_| "{}".into())
    );
    std::process::exit(if ok { 0 } else { 1 });
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

async fn connect_tls(
    args: &Args,
    host: &str,
    alpn: &[&[u8]],
) -> Result<TlsStream<TcpStream>, String> {
    let config = tls_config(alpn)?;
    let tcp = TcpStream::connect(args.connect)
        .await
        .map_err(|e| format!("connect {}: {e}", args.connect))?;
    let _ = tcp.set_nodelay(true);
    let name = ServerName::try_from(host.to_string())
        .map_err(|e| format!("bad server name {host}: {e}"))?;
    TlsConnector::from(config)
        .connect(name, tcp)
        .await
        .map_err(|e| format!("TLS handshake with {host} via {}: {e}", args.connect))
}

async fn run(args: &Args, report: &mut Report) -> Result<(), String> {
    let host = args.url.host().ok_or("the URL has no host")?.to_string();
    let tls = matches!(args.url.scheme_str(), Some("https" | "wss"));
    let default_port = if tls { 443 } else { 80 };
    let port = args.url.port_u16().unwrap_or(default_port);
    let authority = if port == default_port {
        host.clone()
    } else {
        format!("{host}:{port}")
    };
    let path = args
        .url
        .path_and_query()
        .map(|p| p.as_str().to_string())
        .unwrap_or_else(|| "/".into());
    if args.command == "ws" {
        return websocket(args, report, &host, &authority, &path).await;
    }
    if !tls {
        return Err("only https URLs are supported for get".into());
    }
    let alpn: &[&[u8]] = match args.proto {
        Proto::Any => &[b"h2", b"http/1.1"],
        Proto::Http1 => &[b"http/1.1"],
        Proto::Http2 => &[b"h2"],
    };
    let stream = connect_tls(args, &host, alpn).await?;
    let h2 = stream.get_ref().1.alpn_protocol() == Some(b"h2");
    let io = TokioIo::new(stream);
    let mut builder = Request::builder().method("GET");
    if h2 {
        builder = builder.uri(format!("https://{authority}{path}"));
    } else {
        builder = builder.uri(path.as_str()).header(header::HOST, &authority);
    }
    for (n, v) in &args.headers {
        builder = builder.header(n.as_str(), v.as_str());
    }
    let request = builder
        .body(Empty::<Bytes>::new())
        .map_err(|e| format!("building the request: {e}"))?;
    let response = if h2 {
        let (mut sender, conn) = hyper::client::conn::http2::handshake(TokioExecutor::new(), io)
            .await
            .map_err(|e| format!("h2 handshake: {e}"))?;
        tokio::spawn(conn);
        sender
            .send_request(request)
            .await
            .map_err(|e| format!("h2 request: {e}"))?
    } else {
        let (mut sender, conn) = hyper::client::conn::http1::handshake(io)
            .await
            .map_err(|e| format!("http/1.1 handshake: {e}"))?;
        tokio::spawn(conn);
        sender
            .send_request(request)
            .await
            .map_err(|e| format!("http/1.1 request: {e}"))?
    };
    report.status = response.status().as_u16();
    report.version = Some(format!("{:?}", response.version()));
    for (n, v) in response.headers() {
        report.headers.insert(
            n.as_str().to_string(),
            String::from_utf8_lossy(v.as_bytes()).into_owned(),
        );
    }
    let mut body = response.into_body();
    let mut bytes = Vec::new();
    let mut first = None;
    while let Some(frame) = body.frame().await {
        let frame = frame.map_err(|e| format!("reading the body: {e}"))?;
        if let Ok(data) = frame.into_data()
            && !data.is_empty()
        {
            let now = std::time::Instant::now();
            let t0 = *first.get_or_insert(now);
            report
                .chunk_ms
                .push(now.duration_since(t0).as_secs_f64() * 1000.0);
            bytes.extend_from_slice(&data);
        }
    }
    report.body = String::from_utf8_lossy(&bytes).into_owned();
    Ok(())
}

async fn websocket(
    args: &Args,
    report: &mut Report,
    host: &str,
    authority: &str,
    path: &str,
) -> Result<(), String> {
    let stream = connect_tls(args, host, &[b"http/1.1"]).await?;
    let mut request = format!("wss://{authority}{path}")
        .into_client_request()
        .map_err(|e| format!("websocket request: {e}"))?;
    for (n, v) in &args.headers {
        let name = http::HeaderName::from_bytes(n.as_bytes())
            .map_err(|e| format!("bad header name {n}: {e}"))?;
        let value = http::HeaderValue::from_str(v).map_err(|e| format!("bad header value: {e}"))?;
        request.headers_mut().append(name, value);
    }
    let (mut ws, response) = match tokio_tungstenite::client_async(request, stream).await {
        Ok(pair) => pair,
        Err(tungstenite::Error::Http(response)) => {
            report.status = response.status().as_u16();
            for (n, v) in response.headers() {
                report.headers.insert(
                    n.as_str().to_string(),
                    String::from_utf8_lossy(v.as_bytes()).into_owned(),
                );
            }
            if let Some(body) = response.body() {
                report.body = String::from_utf8_lossy(body).into_owned();
            }
            return Err(format!("websocket handshake refused ({})", report.status));
        }
        Err(e) => return Err(format!("websocket handshake: {e}")),
    };
    report.status = response.status().as_u16();
    report.version = Some("HTTP/1.1".into());
    let message = args.message.clone().unwrap_or_else(|| "ping".into());
    ws.send(tungstenite::Message::text(message))
        .await
        .map_err(|e| format!("websocket send: {e}"))?;
    match ws.next().await {
        Some(Ok(tungstenite::Message::Text(t))) => report.ws_echo = Some(t.to_string()),
        Some(Ok(other)) => return Err(format!("unexpected websocket message: {other:?}")),
        Some(Err(e)) => return Err(format!("websocket receive: {e}")),
        None => return Err("the websocket closed without an echo".into()),
    }
    let _ = ws.close(None).await;
    Ok(())
}
