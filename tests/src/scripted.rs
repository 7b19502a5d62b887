//! A scripted upstream: a TLS server whose connections each do what the test queued next
//! (serve a request with a certificate of some CA, or answer the ClientHello with a fatal TLS
//! alert, or stream events and end the stream by a reset, a half-close or a close), for the
//! fault tests (tests/tests/faults.rs). Connections past the script repeat its
//! last step. It records what each connection got (the SNI, and whether a request arrived and
//! carried an Authorization header, by hash only).
//!
//! Plain std threads and rustls's blocking API: each connection is handled to its end before
//! the next is accepted, which is all a script needs.

use std::{
    collections::VecDeque,
    io::{BufRead as _, BufReader, Read as _, Write as _},
    net::{IpAddr, SocketAddr, TcpListener, TcpStream},
    sync::{Arc, Mutex},
    thread,
    time::Duration,
};

use rustls::{ServerConfig, ServerConnection, StreamOwned};

use crate::{TestCa, sha256_hex};

/// What one connection does.
#[derive(Clone)]
pub enum Step {
    /// Complete the handshake with this certificate chain, answer one HTTP/1.1 request with
    /// 200 and a small JSON body, and close.
    Serve(Arc<ServerConfig>),
    /// Read the ClientHello and answer it with a fatal `handshake_failure` alert.
    Alert,
    /// Complete the handshake and answer `requests` requests on the connection with 200 and a
    /// small JSON body (keep-alive: no `connection: close`); then read the next request's head
    /// and close the connection without an answer, as a server does that evicts an idle
    /// connection just as a request arrives on it.
    KeepAlive {
        config: Arc<ServerConfig>,
        requests: usize,
    },
    /// Complete the handshake, answer one request with 200 and a `text/event-stream` body of
    /// `events` events (the last one `data: [DONE]`, so a whole stream is recognisable), and
    /// end as `end` says.
    Stream {
        config: Arc<ServerConfig>,
        events: usize,
        end: End,
    },
}

/// How a [`Step::Stream`] ends.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum End {
    /// Chunked; after all but the last event, the connection is reset (TCP RST).
    Reset,
    /// Chunked; after all but the last event, the upstream shuts down its sending side (a TCP
    /// FIN, no TLS close_notify, no last chunk) and goes on reading for a while.
    HalfClose,
    /// Neither a length nor chunked: the body ends when the connection does. Every event, then
    /// TLS close_notify and FIN: a complete reply by HTTP/1.1's rules.
    CloseDelimited,
    /// As [`End::CloseDelimited`], but after all but the last event, a FIN without close_notify:
    /// a truncated reply, which TLS lets the client tell from a complete one.
    CloseDelimitedTruncated,
}

impl Step {
    /// Serve with a leaf for `names` issued by `ca`.
    pub fn serve(ca: &TestCa, names: &[&str]) -> Self {
        let names: Vec<String> = names.iter().map(|n| n.to_string()).collect();
        let (chain, key) = ca.leaf(&names);
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let mut config = ServerConfig::builder_with_provider(provider)
            .with_safe_default_protocol_versions()
            .unwrap_or_else(|e| panic!("rustls protocol versions: {e}"))
            .with_no_client_auth()
            .with_single_cert(chain, key)
            .unwrap_or_else(|e| panic!("scripted upstream certificate: {e}"));
        config.alpn_protocols = vec![b"http/1.1".to_vec()];
        Self::Serve(Arc::new(config))
    }

    /// Stream `events` server-sent events with a leaf for `names` issued by `ca`, ending as
    /// `end` says.
    pub fn stream(ca: &TestCa, names: &[&str], events: usize, end: End) -> Self {
        let Self::Serve(config) = Self::serve(ca, names) else {
            unreachable!("serve makes a Serve step")
        };
        Self::Stream {
            config,
            events,
            end,
        }
    }

    /// Answer `requests` requests per connection with a leaf for `names` issued by `ca`, then
    /// drop the next one (see [`Step::KeepAlive`]).
    pub fn keep_alive(ca: &TestCa, names: &[&str], requests: usize) -> Self {
        let Self::Serve(config) = Self::serve(ca, names) else {
            unreachable!("serve makes a Serve step")
        };
        Self::KeepAlive { config, requests }
    }
}

/// The `i`th event of a scripted stream.
pub fn event(i: usize) -> String {
    format!("data: {{\"choices\":[{{\"delta\":{{\"content\":\"scripted token {i}\"}}}}]}}\n\n")
}

/// The last event of a whole scripted stream.
pub const LAST_EVENT: &str = "data: [DONE]\n\n";

/// What a connection got.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Seen {
    pub sni: Option<String>,
    /// The request line, when a request arrived.
    pub request: Option<String>,
    /// sha256 hex of the Authorization header's value, when there was one.
    pub authorization_sha256: Option<String>,
    /// Whether a [`Step::KeepAlive`] connection answered the request.
    pub answered: bool,
}

struct State {
    script: VecDeque<Step>,
    last: Option<Step>,
    seen: Vec<Seen>,
}

/// The server; it stops accepting when dropped (its thread ends at the next connection).
pub struct ScriptedUpstream {
    addr: SocketAddr,
    state: Arc<Mutex<State>>,
}

impl ScriptedUpstream {
    /// Listens on `ip` (port chosen by the kernel) and follows `script`.
    pub fn start(ip: IpAddr, script: Vec<Step>) -> Self {
        let listener = TcpListener::bind((ip, 0)).unwrap_or_else(|e| panic!("bind {ip}: {e}"));
        let addr = listener
            .local_addr()
            .unwrap_or_else(|e| panic!("addr: {e}"));
        let state = Arc::new(Mutex::new(State {
            script: script.into(),
            last: None,
            seen: Vec::new(),
        }));
        let weak = Arc::downgrade(&state);
        thread::spawn(move || {
            for stream in listener.incoming() {
                let Some(state) = weak.upgrade() else {
                    return;
                };
                let Ok(stream) = stream else { continue };
                let step = {
                    let mut s = state.lock().unwrap_or_else(|e| e.into_inner());
                    let next = s.script.pop_front().or_else(|| s.last.clone());
                    s.last.clone_from(&next);
                    next
                };
                // Each connection on a thread of its own, so a client may hold several.
                thread::spawn(move || {
                    let seen = match step {
                        Some(step) => handle(stream, step),
                        None => Vec::new(),
                    };
                    state
                        .lock()
                        .unwrap_or_else(|e| e.into_inner())
                        .seen
                        .extend(seen);
                });
            }
        });
        Self { addr, state }
    }

    pub fn port(&self) -> u16 {
        self.addr.port()
    }

    /// What each request so far got (a connection that got none: one entry without a
    /// request), in the order their connections ended.
    pub fn seen(&self) -> Vec<Seen> {
        self.state
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .seen
            .clone()
    }
}

fn handle(stream: TcpStream, step: Step) -> Vec<Seen> {
    let _ = stream.set_read_timeout(Some(Duration::from_secs(10)));
    match step {
        Step::Alert => {
            let mut stream = stream;
            let mut hello = [0u8; 5];
            let _ = stream.read_exact(&mut hello);
            // A TLS 1.2 record: alert, fatal (2), handshake_failure (40).
            let _ = stream.write_all(&[0x15, 0x03, 0x03, 0x00, 0x02, 0x02, 0x28]);
            let _ = stream.flush();
            vec![Seen::default()]
        }
        Step::Serve(config) => vec![serve(stream, config, None)],
        Step::Stream {
            config,
            events,
            end,
        } => vec![serve(stream, config, Some((events, end)))],
        Step::KeepAlive { config, requests } => keep_alive(stream, config, requests),
    }
}

/// Completes the handshake, reads one request head, and answers it (see [`Step`]).
fn serve(stream: TcpStream, config: Arc<ServerConfig>, sse: Option<(usize, End)>) -> Seen {
    let Ok(conn) = ServerConnection::new(config) else {
        return Seen::default();
    };
    let mut tls = StreamOwned::new(conn, stream);
    let mut reader = BufReader::new(&mut tls);
    let seen = read_head(&mut reader);
    if seen.request.is_none() {
        return seen;
    }
    if let Some((events, end)) = sse {
        stream_events(&mut tls, events, end);
        return seen;
    }
    let body = r#"{"scripted":true}"#;
    let _ = write!(
        tls,
        "HTTP/1.1 200 OK\r\ncontent-type: application/json\r\ncontent-length: {}\r\nconnection: close\r\n\r\n{body}",
        body.len()
    );
    tls.conn.send_close_notify();
    let _ = tls.flush();
    seen
}

/// Reads one request head (no body: the tests send none), noting what [`Seen`] records.
fn read_head(reader: &mut BufReader<&mut StreamOwned<ServerConnection, TcpStream>>) -> Seen {
    let mut seen = Seen::default();
    let mut line = String::new();
    if reader.read_line(&mut line).unwrap_or(0) > 0 {
        seen.request = Some(line.trim_end().to_string());
    }
    while seen.request.is_some() {
        let mut header = String::new();
        if reader.read_line(&mut header).unwrap_or(0) == 0 || header == "\r\n" {
            break;
        }
        if let Some((name, value)) = header.split_once(':')
            && name.eq_ignore_ascii_case("authorization")
        {
            seen.authorization_sha256 = Some(sha256_hex(value.trim().as_bytes()));
        }
    }
    seen.sni = reader.get_ref().conn.server_name().map(str::to_string);
    seen
}

/// A [`Step::KeepAlive`] connection: what each of its requests got, the dropped one last
/// (with `answered` false).
fn keep_alive(stream: TcpStream, config: Arc<ServerConfig>, requests: usize) -> Vec<Seen> {
    let Ok(conn) = ServerConnection::new(config) else {
        return vec![Seen::default()];
    };
    let mut tls = StreamOwned::new(conn, stream);
    let mut reader = BufReader::new(&mut tls);
    let mut seen = Vec::new();
    for _ in 0..requests {
        let mut one = read_head(&mut reader);
        if one.request.is_none() {
            return seen;
        }
        let body = r#"{"scripted":true}"#;
        let tls = reader.get_mut();
        let answered = write!(
            tls,
            "HTTP/1.1 200 OK\r\ncontent-type: application/json\r\ncontent-length: {}\r\n\r\n{body}",
            body.len()
        )
        .and_then(|()| tls.flush());
        one.answered = answered.is_ok();
        seen.push(one);
    }
    // The next request arrives and the connection closes under it.
    let dropped = read_head(&mut reader);
    if dropped.request.is_some() {
        seen.push(dropped);
    }
    seen
}

/// Writes a [`Step::Stream`]'s answer and ends it as `end` says.
fn stream_events(tls: &mut StreamOwned<ServerConnection, TcpStream>, events: usize, end: End) {
    let chunked = matches!(end, End::Reset | End::HalfClose);
    let framing = if chunked {
        "transfer-encoding: chunked"
    } else {
        "connection: close"
    };
    let _ = write!(
        tls,
        "HTTP/1.1 200 OK\r\ncontent-type: text/event-stream\r\ncache-control: no-cache\r\n{framing}\r\n\r\n"
    );
    let whole = matches!(end, End::CloseDelimited);
    let sent = if whole {
        events
    } else {
        events.saturating_sub(1)
    };
    for i in 0..sent {
        let data = if whole && i + 1 == events {
            LAST_EVENT.to_string()
        } else {
            event(i)
        };
        let _ = if chunked {
            write!(tls, "{:x}\r\n{data}\r\n", data.len())
        } else {
            tls.write_all(data.as_bytes())
        };
        let _ = tls.flush();
        // Each event on its own, as a model streams tokens.
        thread::sleep(Duration::from_millis(20));
    }
    match end {
        End::Reset => {
            let linger = libc::linger {
                l_onoff: 1,
                l_linger: 0,
            };
            let _ =
                nix::sys::socket::setsockopt(&tls.sock, nix::sys::socket::sockopt::Linger, &linger);
        }
        End::HalfClose => {
            let _ = tls.sock.shutdown(std::net::Shutdown::Write);
            // Still reading: whatever the client sends, until it gives up or 5 s pass.
            let _ = tls.sock.set_read_timeout(Some(Duration::from_secs(5)));
            let mut sink = [0u8; 4096];
            while matches!(tls.sock.read(&mut sink), Ok(n) if n > 0) {}
        }
        End::CloseDelimited => {
            tls.conn.send_close_notify();
            let _ = tls.flush();
        }
        End::CloseDelimitedTruncated => {}
    }
    // Dropping the stream closes the socket: a FIN, or an RST after a zero linger.
}
