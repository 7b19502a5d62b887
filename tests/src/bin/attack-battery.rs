//! attack-battery: tries, from inside a tagged cgroup, every bypass of THREAT-MODEL.md 7.2 that
//! applies to one host, and reports each as a row (id, attack, expected, outcome, pass).
//!
//! Built statically (`cargo xtask build` puts it at target/static/attack-battery) and run by the
//! `bypass` end-to-end test under `brokerctl run`, as an unprivileged uid and as root in a user
//! namespace. Each row expects one exact outcome (an errno, an HTTP status from brokerd, a DNS
//! response code), so it cannot pass by accident; the test adds the independent checks (nothing
//! arrived at the outside recorders, the canary secret is in no output, audit events exist).
//!
//! It never connects or sends over AF_VSOCK: it only checks that creating such a socket fails.
//! It refuses to run in the root cgroup, where nothing would redirect its traffic.
//!
//! With `--sandbox` it runs as the agent of `brokerctl run --unprivileged` (issue 19: user,
//! network, mount and pid namespaces, nft rules redirecting every TCP connect and DNS datagram
//! to `brokerd --unprivileged`, no eBPF) and refuses to run unless its network namespace has
//! only `lo`. Each row that applies there expects the outcome that mode gives (a UDP `connect`
//! succeeds and its first datagram is rejected with EPERM; brokerd's pid names no process;
//! the host's abstract sockets are in another network namespace; ...), the sandbox's own rows
//! (`U01`-`U04`: the rules, routes, namespaces and SO_MARK) are added, and a row that only
//! means something with the eBPF hooks (bind rewrites, cgroup moves, brokerd's host ports) or
//! that this mode does not enforce (host pathname sockets) is printed as
//! `skipped: root mode only: <reason>`. Without the flag the rows are those of root mode, as
//! before.
//!
//! Output: one JSON object per row on stdout (`--json`), or a table. Exit status 0 when every
//! row passed, 1 otherwise, 2 when it refused to run.

use std::{
    ffi::CString,
    io::{Read as _, Write as _},
    net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr, TcpStream, UdpSocket},
    os::fd::{AsRawFd as _, FromRawFd as _, OwnedFd},
    sync::Arc,
    time::Duration,
};

const TIMEOUT: Duration = Duration::from_secs(2);

/// Targets, from the command line.
#[derive(Default)]
struct Args {
    json: bool,
    /// Run as an agent of `brokerctl run --unprivileged` (issue 19): a sandbox of its own user,
    /// network, mount and pid namespaces whose nft rules redirect every TCP connect and DNS
    /// datagram to brokerd, instead of a tagged cgroup. Rows expect what that mode gives; rows
    /// that only mean something with the eBPF hooks are skipped with the reason.
    sandbox: bool,
    outside_tcp: Option<SocketAddr>,
    outside_udp: Option<SocketAddr>,
    outside_unix: Option<String>,
    outside_abstract: Option<String>,
    broker_ports: Vec<u16>,
    broker_pid: Option<i32>,
    resolver: Option<SocketAddr>,
    dns_name: Option<String>,
    dns_denied: Option<String>,
    allowed_host: Option<String>,
    allowed_connect: Option<SocketAddr>,
    placeholder: Option<String>,
    protected: Vec<String>,
    /// An address and port a `plain_http` rule injecting the key names, with nothing listening.
    squat: Option<SocketAddr>,
    /// The agent's `[shares] connections` in the battery's policy.
    connection_share: Option<usize>,
    /// Another server with a valid certificate for the allowed host, at an address the host
    /// does not resolve to, which a rule injecting the key allows by name.
    decoy: Option<SocketAddr>,
}

fn parse_args() -> Result<Args, String> {
    let mut a = Args::default();
    let mut it = std::env::args().skip(1);
    while let Some(flag) = it.next() {
        if flag == "--json" {
            a.json = true;
            continue;
        }
        if flag == "--sandbox" {
            a.sandbox = true;
            continue;
        }
        let value = it.next().ok_or(format!("{flag} needs a value"))?;
        let addr = |v: &str| {
            v.parse::<SocketAddr>()
                .map_err(|e| format!("{flag} {v}: {e}"))
        };
        match flag.as_str() {
            "--outside-tcp" => a.outside_tcp = Some(addr(&value)?),
            "--outside-udp" => a.outside_udp = Some(addr(&value)?),
            "--outside-unix" => a.outside_unix = Some(value),
            "--outside-abstract" => a.outside_abstract = Some(value),
            "--broker-ports" => {
                for p in value.split(',') {
                    a.broker_ports
                        .push(p.parse().map_err(|e| format!("--broker-ports {p}: {e}"))?);
                }
            }
            "--broker-pid" => {
                a.broker_pid = Some(value.parse().map_err(|e| format!("--broker-pid: {e}"))?)
            }
            "--resolver" => a.resolver = Some(addr(&value)?),
            "--dns-name" => a.dns_name = Some(value),
            "--dns-denied" => a.dns_denied = Some(value),
            "--allowed-host" => a.allowed_host = Some(value),
            "--allowed-connect" => a.allowed_connect = Some(addr(&value)?),
            "--placeholder" => a.placeholder = Some(value),
            "--protected-path" => a.protected.push(value),
            "--squat" => a.squat = Some(addr(&value)?),
            "--connection-share" => {
                a.connection_share = Some(
                    value
                        .parse()
                        .map_err(|e| format!("--connection-share: {e}"))?,
                )
            }
            "--decoy" => a.decoy = Some(addr(&value)?),
            other => return Err(format!("unknown argument {other}")),
        }
    }
    Ok(a)
}

/// One row of the table.
struct Row {
    id: &'static str,
    attack: String,
    expected: String,
    outcome: String,
    pass: bool,
}

struct Battery {
    rows: Vec<Row>,
}

impl Battery {
    /// Records a row whose outcome must be one of `expected`.
    fn row(
        &mut self,
        id: &'static str,
        attack: impl Into<String>,
        expected: &[&str],
        outcome: String,
    ) {
        let pass = expected.iter().any(|e| *e == outcome);
        self.rows.push(Row {
            id,
            attack: attack.into(),
            expected: expected.join(" | "),
            outcome,
            pass,
        });
    }

    /// Records a row that does not apply in this mode, and why (sandbox mode only).
    fn skip(&mut self, id: &'static str, attack: impl Into<String>, reason: &str) {
        self.rows.push(Row {
            id,
            attack: attack.into(),
            expected: "skipped".into(),
            outcome: format!("skipped: {reason}"),
            pass: true,
        });
    }
}

/// Where `brokerctl run --unprivileged` listens in the sandbox's own network namespace: the
/// TCP listener every connect is redirected to, and the DNS socket (both handed to brokerd).
const SANDBOX_TCP_PORT: u16 = 15001;
const SANDBOX_DNS_PORT: u16 = 15053;

/// The network interfaces of this network namespace (`/proc/net/dev`).
fn interfaces() -> Vec<String> {
    std::fs::read_to_string("/proc/net/dev")
        .unwrap_or_default()
        .lines()
        .skip(2)
        .filter_map(|l| l.split(':').next().map(|n| n.trim().to_string()))
        .collect()
}

fn errno_name(e: i32) -> String {
    match e {
        libc::EPERM => "EPERM",
        libc::EACCES => "EACCES",
        libc::ENOENT => "ENOENT",
        libc::ENETUNREACH => "ENETUNREACH",
        libc::ECONNREFUSED => "ECONNREFUSED",
        libc::EAFNOSUPPORT => "EAFNOSUPPORT",
        libc::EPROTONOSUPPORT => "EPROTONOSUPPORT",
        libc::ESOCKTNOSUPPORT => "ESOCKTNOSUPPORT",
        libc::EINVAL => "EINVAL",
        libc::EROFS => "EROFS",
        libc::EBADF => "EBADF",
        libc::ESRCH => "ESRCH",
        libc::ETIMEDOUT => "ETIMEDOUT",
        libc::EINPROGRESS => "EINPROGRESS",
        libc::ENOSYS => "ENOSYS",
        libc::ENOTDIR => "ENOTDIR",
        libc::EADDRNOTAVAIL => "EADDRNOTAVAIL",
        libc::ENODEV => "ENODEV",
        libc::EADDRINUSE => "EADDRINUSE",
        libc::ENOSPC => "ENOSPC",
        _ => return format!("errno {e}"),
    }
    .to_string()
}

fn last_errno() -> String {
    errno_name(std::io::Error::last_os_error().raw_os_error().unwrap_or(0))
}

fn io_errno(e: &std::io::Error) -> String {
    match e.raw_os_error() {
        Some(n) => errno_name(n),
        None if e.kind() == std::io::ErrorKind::TimedOut
            || e.kind() == std::io::ErrorKind::WouldBlock =>
        {
            "timeout".into()
        }
        None => e.kind().to_string(),
    }
}

/// `socket(domain, ty, protocol)`: "created" or the errno. The socket is closed at once.
fn try_socket(domain: i32, ty: i32, protocol: i32) -> String {
    // SAFETY: plain system call; the fd is closed below.
    let fd = unsafe { libc::socket(domain, ty | libc::SOCK_CLOEXEC, protocol) };
    if fd < 0 {
        return last_errno();
    }
    // SAFETY: we own fd.
    unsafe { libc::close(fd) };
    "created".into()
}

/// What came back for a plain HTTP request on `stream`: "403", another status, or "closed".
fn http_answer(mut stream: TcpStream, host: &str, request_line: &str) -> String {
    let _ = stream.set_read_timeout(Some(TIMEOUT));
    let req = format!("{request_line}\r\nHost: {host}\r\nConnection: close\r\n\r\n");
    if stream.write_all(req.as_bytes()).is_err() {
        return "closed".into();
    }
    read_status(&mut stream)
}

fn read_status(stream: &mut impl std::io::Read) -> String {
    let mut buf = Vec::new();
    let mut chunk = [0u8; 1024];
    loop {
        match stream.read(&mut chunk) {
            Ok(0) => break,
            Ok(n) => {
                buf.extend_from_slice(&chunk[..n]);
                if buf.len() > 12 {
                    break;
                }
            }
            Err(e) => {
                if buf.is_empty() {
                    return if matches!(
                        e.kind(),
                        std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
                    ) {
                        "timeout".into()
                    } else {
                        "closed".into()
                    };
                }
                break;
            }
        }
    }
    let text = String::from_utf8_lossy(&buf);
    match text.split_whitespace().nth(1) {
        Some(code) if text.starts_with("HTTP/") => code.to_string(),
        _ if buf.is_empty() => "closed".into(),
        _ => "non-HTTP answer".into(),
    }
}

/// Connects and sends a plain HTTP request; the outcome as [`http_answer`], or the errno.
fn tcp_http(dst: SocketAddr, host: &str) -> String {
    match TcpStream::connect_timeout(&dst, TIMEOUT) {
        Ok(s) => http_answer(s, host, "GET / HTTP/1.1"),
        Err(e) => io_errno(&e),
    }
}

fn sockaddr_in6(addr: Ipv6Addr, port: u16) -> libc::sockaddr_in6 {
    // SAFETY: sockaddr_in6 is plain data; zero is a valid start.
    let mut sa: libc::sockaddr_in6 = unsafe { std::mem::zeroed() };
    sa.sin6_family = libc::AF_INET6 as libc::sa_family_t;
    sa.sin6_port = port.to_be();
    sa.sin6_addr.s6_addr = addr.octets();
    sa
}

fn sockaddr_in(addr: Ipv4Addr, port: u16) -> libc::sockaddr_in {
    // SAFETY: as above.
    let mut sa: libc::sockaddr_in = unsafe { std::mem::zeroed() };
    sa.sin_family = libc::AF_INET as libc::sa_family_t;
    sa.sin_port = port.to_be();
    sa.sin_addr.s_addr = u32::from_ne_bytes(addr.octets());
    sa
}

fn owned_socket(domain: i32, ty: i32, protocol: i32) -> Result<OwnedFd, String> {
    // SAFETY: plain system call.
    let fd = unsafe { libc::socket(domain, ty | libc::SOCK_CLOEXEC, protocol) };
    if fd < 0 {
        Err(last_errno())
    } else {
        // SAFETY: fd was just created.
        Ok(unsafe { OwnedFd::from_raw_fd(fd) })
    }
}

fn set_timeouts(fd: &OwnedFd) {
    let tv = libc::timeval {
        tv_sec: TIMEOUT.as_secs() as libc::time_t,
        tv_usec: 0,
    };
    for opt in [libc::SO_RCVTIMEO, libc::SO_SNDTIMEO] {
        // SAFETY: valid timeval for the option.
        unsafe {
            libc::setsockopt(
                fd.as_raw_fd(),
                libc::SOL_SOCKET,
                opt,
                &tv as *const _ as *const libc::c_void,
                std::mem::size_of::<libc::timeval>() as libc::socklen_t,
            )
        };
    }
}

/// A TCP stream from a connected raw fd.
fn stream_of(fd: OwnedFd) -> TcpStream {
    TcpStream::from(fd)
}

/// Connects an AF_INET6 TCP socket (optionally v6-only) to `addr`.
fn connect6(addr: Ipv6Addr, port: u16, v6only: bool) -> Result<TcpStream, String> {
    let fd = owned_socket(libc::AF_INET6, libc::SOCK_STREAM, 0)?;
    set_timeouts(&fd);
    let on: libc::c_int = i32::from(v6only);
    // SAFETY: valid int option.
    unsafe {
        libc::setsockopt(
            fd.as_raw_fd(),
            libc::IPPROTO_IPV6,
            libc::IPV6_V6ONLY,
            &on as *const _ as *const libc::c_void,
            4,
        )
    };
    let sa = sockaddr_in6(addr, port);
    // SAFETY: valid sockaddr_in6.
    let r = unsafe {
        libc::connect(
            fd.as_raw_fd(),
            &sa as *const _ as *const libc::sockaddr,
            std::mem::size_of::<libc::sockaddr_in6>() as libc::socklen_t,
        )
    };
    if r != 0 {
        return Err(last_errno());
    }
    Ok(stream_of(fd))
}

/// A DNS query (A, IN, RD) for `name` with `id`.
fn dns_query(id: u16, name: &str) -> Vec<u8> {
    let mut q = Vec::new();
    q.extend_from_slice(&id.to_be_bytes());
    q.extend_from_slice(&[0x01, 0x00, 0, 1, 0, 0, 0, 0, 0, 0]);
    for label in name.split('.') {
        q.push(label.len() as u8);
        q.extend_from_slice(label.as_bytes());
    }
    q.extend_from_slice(&[0, 0, 1, 0, 1]);
    q
}

fn rcode_name(reply: &[u8]) -> String {
    match reply.get(3).map(|b| b & 0x0f) {
        Some(0) => "NOERROR".into(),
        Some(2) => "SERVFAIL".into(),
        Some(3) => "NXDOMAIN".into(),
        Some(5) => "REFUSED".into(),
        Some(n) => format!("rcode {n}"),
        None => "short reply".into(),
    }
}

/// Sends a DNS query over UDP; "RCODE from ADDR" or the errno/timeout.
fn dns_udp(resolver: SocketAddr, name: &str, connected: bool) -> String {
    let bind: SocketAddr = if resolver.is_ipv4() {
        (Ipv4Addr::UNSPECIFIED, 0).into()
    } else {
        (Ipv6Addr::UNSPECIFIED, 0).into()
    };
    let socket = match UdpSocket::bind(bind) {
        Ok(s) => s,
        Err(e) => return format!("bind {}", io_errno(&e)),
    };
    let _ = socket.set_read_timeout(Some(TIMEOUT));
    let id = 0x5a5a;
    let query = dns_query(id, name);
    let sent = if connected {
        socket.connect(resolver).and_then(|()| socket.send(&query))
    } else {
        socket.send_to(&query, resolver)
    };
    if let Err(e) = sent {
        return io_errno(&e);
    }
    let mut buf = [0u8; 1500];
    match socket.recv_from(&mut buf) {
        Ok((n, from)) if n >= 12 && buf[..2] == id.to_be_bytes() => {
            format!(
                "{} from {}",
                rcode_name(&buf[..n]),
                if from == resolver {
                    "resolver"
                } else {
                    "elsewhere"
                }
            )
        }
        Ok(_) => "unrelated reply".into(),
        Err(e) => io_errno(&e),
    }
}

fn dns_tcp(resolver: SocketAddr, name: &str) -> String {
    let mut s = match TcpStream::connect_timeout(&resolver, TIMEOUT) {
        Ok(s) => s,
        Err(e) => return io_errno(&e),
    };
    let _ = s.set_read_timeout(Some(TIMEOUT));
    let q = dns_query(0x4242, name);
    let mut framed = (q.len() as u16).to_be_bytes().to_vec();
    framed.extend_from_slice(&q);
    if s.write_all(&framed).is_err() {
        return "closed".into();
    }
    let mut len = [0u8; 2];
    if let Err(e) = s.read_exact(&mut len) {
        return if e.kind() == std::io::ErrorKind::UnexpectedEof {
            "closed".into()
        } else {
            io_errno(&e)
        };
    }
    let mut reply = vec![0u8; usize::from(u16::from_be_bytes(len))];
    match s.read_exact(&mut reply) {
        Ok(()) => rcode_name(&reply),
        Err(e) => io_errno(&e),
    }
}

/// TLS to `connect` for `server` with only `roots` trusted: "handshake ok <status>" or the
/// failure.
fn tls_get(
    path: &str,
    connect: SocketAddr,
    server: rustls::pki_types::ServerName<'static>,
    roots: rustls::RootCertStore,
    host: &str,
    headers: &str,
) -> String {
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let config = match rustls::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
    {
        Ok(b) => b.with_root_certificates(roots).with_no_client_auth(),
        Err(e) => return format!("tls config: {e}"),
    };
    let conn = match rustls::ClientConnection::new(Arc::new(config), server) {
        Ok(c) => c,
        Err(e) => return format!("tls: {e}"),
    };
    let sock = match TcpStream::connect_timeout(&connect, TIMEOUT) {
        Ok(s) => s,
        Err(e) => return io_errno(&e),
    };
    let _ = sock.set_read_timeout(Some(TIMEOUT));
    let mut tls = rustls::StreamOwned::new(conn, sock);
    let req = format!("GET {path} HTTP/1.1\r\nHost: {host}\r\n{headers}Connection: close\r\n\r\n");
    if let Err(e) = tls.write_all(req.as_bytes()) {
        return classify_tls_error(&e);
    }
    let mut buf = Vec::new();
    let mut chunk = [0u8; 2048];
    loop {
        match tls.read(&mut chunk) {
            Ok(0) => break,
            Ok(n) => {
                buf.extend_from_slice(&chunk[..n]);
                if buf.len() > 12 {
                    break;
                }
            }
            Err(e) => {
                if buf.is_empty() {
                    return classify_tls_error(&e);
                }
                break;
            }
        }
    }
    let text = String::from_utf8_lossy(&buf);
    match text.split_whitespace().nth(1) {
        Some(code) if text.starts_with("HTTP/") => format!("HTTP {code}"),
        _ => "closed".into(),
    }
}

/// TLS to `connect` for `server`, one HTTP/1.1 request with `Connection: close`: the whole
/// answer as it arrived, or why there is none.
fn tls_fetch(
    path: &str,
    connect: SocketAddr,
    server: rustls::pki_types::ServerName<'static>,
    roots: rustls::RootCertStore,
    host: &str,
    headers: &str,
) -> Result<Vec<u8>, String> {
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let config = rustls::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .map_err(|e| format!("tls config: {e}"))?
        .with_root_certificates(roots)
        .with_no_client_auth();
    let conn =
        rustls::ClientConnection::new(Arc::new(config), server).map_err(|e| format!("tls: {e}"))?;
    let sock = TcpStream::connect_timeout(&connect, TIMEOUT).map_err(|e| io_errno(&e))?;
    let _ = sock.set_read_timeout(Some(TIMEOUT));
    let mut tls = rustls::StreamOwned::new(conn, sock);
    let req = format!("GET {path} HTTP/1.1\r\nHost: {host}\r\n{headers}Connection: close\r\n\r\n");
    tls.write_all(req.as_bytes())
        .map_err(|e| classify_tls_error(&e))?;
    let mut buf = Vec::new();
    let mut chunk = [0u8; 4096];
    loop {
        match tls.read(&mut chunk) {
            Ok(0) => break,
            Ok(n) => buf.extend_from_slice(&chunk[..n]),
            // A peer that closes without close_notify still sent its answer.
            Err(e) if buf.is_empty() => return Err(classify_tls_error(&e)),
            Err(_) => break,
        }
    }
    Ok(buf)
}

fn classify_tls_error(e: &std::io::Error) -> String {
    let text = e.to_string();
    if text.contains("UnknownIssuer") || text.contains("invalid peer certificate") {
        "certificate rejected".into()
    } else {
        "closed".into()
    }
}

fn in_root_cgroup() -> bool {
    std::fs::read_to_string("/proc/self/cgroup")
        .map(|s| s.lines().any(|l| l == "0::/"))
        .unwrap_or(true)
}

fn open_errno(path: &str, write: bool) -> String {
    let Ok(c) = CString::new(path) else {
        return "bad path".into();
    };
    let flags = if write {
        libc::O_WRONLY
    } else {
        libc::O_RDONLY
    } | libc::O_CLOEXEC;
    // SAFETY: valid C string.
    let fd = unsafe { libc::open(c.as_ptr(), flags) };
    if fd < 0 {
        return last_errno();
    }
    // SAFETY: we own fd.
    unsafe { libc::close(fd) };
    "opened".into()
}

fn bpf_errno(cmd: i32) -> String {
    let mut attr = [0u64; 16];
    // SAFETY: a zeroed bpf_attr of 128 bytes; the call is expected to fail.
    let r = unsafe { libc::syscall(libc::SYS_bpf, cmd, attr.as_mut_ptr(), 128u32) };
    if r < 0 {
        last_errno()
    } else {
        // SAFETY: an fd we now own (should never happen).
        unsafe { libc::close(r as i32) };
        "succeeded".into()
    }
}

fn main() {
    let args = match parse_args() {
        Ok(a) => a,
        Err(e) => {
            eprintln!("attack-battery: {e}");
            std::process::exit(2);
        }
    };
    if args.sandbox {
        let ifaces = interfaces();
        if ifaces != ["lo"] {
            eprintln!(
                "attack-battery: --sandbox, but this network namespace has the interfaces \
                 {ifaces:?}, not only lo: nothing would redirect its traffic (run it with \
                 brokerctl run --unprivileged)"
            );
            std::process::exit(2);
        }
    } else if in_root_cgroup() {
        eprintln!(
            "attack-battery: refusing to run in the root cgroup: nothing would redirect its \
             traffic (run it with brokerctl run inside a tagged cgroup)"
        );
        std::process::exit(2);
    }
    let mut b = Battery { rows: Vec::new() };

    // N38 first: nothing but stdio may be open when the agent starts.
    let fds: Vec<String> = std::fs::read_dir("/proc/self/fd")
        .map(|d| {
            d.flatten()
                .map(|e| e.file_name().to_string_lossy().into_owned())
                .filter(|n| !["0", "1", "2"].contains(&n.as_str()))
                .collect()
        })
        .unwrap_or_default();
    // The directory listing itself holds one fd.
    b.row(
        "N38",
        "descriptors above stderr inherited at start",
        &["none"],
        if fds.len() <= 1 {
            "none".into()
        } else {
            format!("open: {fds:?}")
        },
    );

    let out_tcp = args.outside_tcp.unwrap_or(([127, 0, 0, 1], 9).into());
    let out_udp = args.outside_udp.unwrap_or(([127, 0, 0, 1], 9).into());
    let denied = &["403", "closed"];

    // Positive control: the allowed API with a placeholder works (no over-blocking).
    if let (Some(host), Some(connect)) = (&args.allowed_host, args.allowed_connect) {
        let mut roots = rustls::RootCertStore::empty();
        let bundle = std::env::var("SSL_CERT_FILE").unwrap_or_default();
        if let Ok(pem) = std::fs::read(&bundle) {
            use rustls::pki_types::pem::PemObject as _;
            for cert in rustls::pki_types::CertificateDer::pem_slice_iter(&pem).flatten() {
                let _ = roots.add(cert);
            }
        }
        let placeholder = args
            .placeholder
            .clone()
            .unwrap_or_else(|| "placeholder".into());
        let name = rustls::pki_types::ServerName::try_from(host.clone()).map(|n| n.to_owned());
        let outcome = match name.as_ref() {
            Ok(name) => tls_get(
                "/hash",
                connect,
                name.clone(),
                roots.clone(),
                host,
                &format!("Authorization: Bearer {placeholder}\r\n"),
            ),
            Err(e) => format!("bad host: {e}"),
        };
        b.row(
            "N02",
            format!("allowed API {host} with the placeholder (trusting $SSL_CERT_FILE)"),
            &["HTTP 200"],
            outcome,
        );
        // N51: a client with bundled roots that lack the broker CA.
        let outcome = match rustls::pki_types::ServerName::try_from(host.clone()) {
            Ok(name) => tls_get(
                "/",
                connect,
                name.to_owned(),
                rustls::RootCertStore::empty(),
                host,
                "",
            ),
            Err(e) => format!("bad host: {e}"),
        };
        b.row(
            "N51",
            "TLS with bundled roots only (no broker CA): never passed through",
            &["certificate rejected"],
            outcome,
        );
        // N53-N55 (issue 13): the API hands the key back; brokerd's placeholder must stand in
        // for it. The raw answers go to stderr, which the test scans for the canary.
        if let Ok(name) = name {
            let fetch = |path: &str| {
                let got = tls_fetch(
                    path,
                    connect,
                    name.clone(),
                    roots.clone(),
                    host,
                    &format!("Authorization: Bearer {placeholder}\r\n"),
                );
                if let Ok(raw) = &got {
                    eprintln!("{path}: {}", String::from_utf8_lossy(raw));
                }
                got
            };
            let placeholders = |raw: &[u8]| {
                String::from_utf8_lossy(raw)
                    .matches("[redacted by agent-broker]")
                    .count()
            };
            let outcome = match fetch("/reflect/encodings") {
                Ok(raw) => format!("{} placeholders", placeholders(&raw)),
                Err(e) => e,
            };
            b.row(
                "N53",
                "the API quotes the key in hex, \\u JSON and MIME base64 (both cases, 76/64 columns)",
                &["6 placeholders"],
                outcome,
            );
            let outcome = match fetch("/reflect/header-name") {
                Ok(raw) => {
                    let text = String::from_utf8_lossy(&raw).to_ascii_lowercase();
                    let head = text.split("\r\n\r\n").next().unwrap_or_default();
                    if head.contains("\r\nx-echo-") {
                        "a header named after the key".to_string()
                    } else {
                        "no such header".to_string()
                    }
                }
                Err(e) => e,
            };
            b.row(
                "N54",
                "the API names a response header after the key",
                &["no such header"],
                outcome,
            );
            let outcome = match fetch("/reflect/store").and_then(|_| fetch("/reflect/load")) {
                Ok(raw) => format!("{} placeholders", placeholders(&raw)),
                Err(e) => e,
            };
            b.row(
                "N55",
                "the API hands back the key an earlier request had it store",
                &["2 placeholders"],
                outcome,
            );
            // N69 (issue 13.18): the same name at another server that holds a valid
            // certificate for it (a wildcard, a shared one). The test checks that it got
            // nothing.
            if let Some(decoy) = args.decoy {
                b.row(
                    "N69",
                    format!(
                        "call {host} at {decoy}, another server with a valid certificate for it"
                    ),
                    &["HTTP 403"],
                    tls_get(
                        "/hash",
                        decoy,
                        name.clone(),
                        roots.clone(),
                        host,
                        &format!("Authorization: Bearer {placeholder}\r\n"),
                    ),
                );
            }
        }
    }

    b.row(
        "N01",
        format!("TCP connect to a non-allowed {out_tcp}, HTTP request"),
        denied,
        tcp_http(out_tcp, "outside.test"),
    );
    b.row(
        "N03",
        format!("IPv6 connect to [::1]:{}", out_tcp.port()),
        denied,
        match connect6(Ipv6Addr::LOCALHOST, out_tcp.port(), false) {
            Ok(s) => http_answer(s, "outside.test", "GET / HTTP/1.1"),
            Err(e) => e,
        },
    );
    let mapped = match out_tcp.ip() {
        IpAddr::V4(v4) => v4.to_ipv6_mapped(),
        IpAddr::V6(v6) => v6,
    };
    b.row(
        "N04",
        format!(
            "v4-mapped [{mapped}]:{} on a dual-stack socket",
            out_tcp.port()
        ),
        denied,
        match connect6(mapped, out_tcp.port(), false) {
            Ok(s) => http_answer(s, "outside.test", "GET / HTTP/1.1"),
            Err(e) => e,
        },
    );
    b.row(
        "N05",
        "v4-mapped destination on an IPV6_V6ONLY socket",
        &["ENETUNREACH", "EPERM", "EAFNOSUPPORT"],
        match connect6(mapped, out_tcp.port(), true) {
            Ok(s) => http_answer(s, "outside.test", "GET / HTTP/1.1"),
            Err(e) => e,
        },
    );
    b.row(
        "N06",
        "TCP Fast Open sendto(MSG_FASTOPEN) with data",
        denied,
        fastopen_sendto(out_tcp),
    );
    b.row(
        "N07",
        "TCP_FASTOPEN_CONNECT then write()",
        denied,
        fastopen_connect(out_tcp),
    );
    b.row(
        "N08",
        "io_uring (socket and connect ops would bypass the socket() filter)",
        &["EPERM"],
        {
            let mut params = [0u8; 120];
            // SAFETY: io_uring_setup with a zeroed params struct; expected to fail.
            let r = unsafe { libc::syscall(libc::SYS_io_uring_setup, 4u32, params.as_mut_ptr()) };
            if r < 0 {
                last_errno()
            } else {
                unsafe { libc::close(r as i32) };
                "io_uring available".into()
            }
        },
    );
    for (id, what, dst) in [
        ("N10", "UDP sendto the outside UDP service", out_udp),
        (
            "N10",
            "UDP sendto 1.1.1.1:443 (QUIC)",
            SocketAddr::from(([1, 1, 1, 1], 443)),
        ),
        (
            "N12",
            "UDP sendto 127.0.0.1:5353 (a local service)",
            SocketAddr::from(([127, 0, 0, 1], 5353)),
        ),
    ] {
        let outcome = match UdpSocket::bind("0.0.0.0:0").and_then(|s| s.send_to(b"probe", dst)) {
            Ok(_) => "sent".into(),
            Err(e) => io_errno(&e),
        };
        b.row(id, what, &["EPERM"], outcome);
    }
    if args.sandbox {
        // No hook refuses connect() here (it sends nothing); the first datagram is rejected.
        for (what, dst) in [
            ("1.1.1.1:443", SocketAddr::from(([1, 1, 1, 1], 443))),
            ("the outside UDP service", out_udp),
        ] {
            b.row(
                "N11",
                format!("UDP connect to {what}, then send (the rules reject the datagram)"),
                &["connected, send EPERM"],
                udp_connect_send(dst),
            );
        }
    } else {
        b.row(
            "N11",
            "UDP connect to 1.1.1.1:443",
            &["EPERM"],
            match UdpSocket::bind("0.0.0.0:0").and_then(|s| s.connect("1.1.1.1:443")) {
                Ok(()) => "connected".into(),
                Err(e) => io_errno(&e),
            },
        );
        b.row(
            "N11",
            "UDP connect to the outside UDP service",
            &["EPERM"],
            match UdpSocket::bind("0.0.0.0:0").and_then(|s| s.connect(out_udp)) {
                Ok(()) => "connected".into(),
                Err(e) => io_errno(&e),
            },
        );
    }

    if let (Some(resolver), Some(name)) = (args.resolver, &args.dns_name) {
        b.row(
            "N13",
            format!("DNS for allowed {name} to {resolver} (sendto)"),
            &["NOERROR from resolver"],
            dns_udp(resolver, name, false),
        );
        b.row(
            "N13",
            format!("DNS for allowed {name} to {resolver} (connected UDP)"),
            &["NOERROR from resolver"],
            dns_udp(resolver, name, true),
        );
        if args.sandbox {
            // Every datagram to port 53 is redirected, whatever the resolver's address.
            for other in [
                SocketAddr::from(([127, 0, 0, 53], 53)),
                SocketAddr::new(
                    IpAddr::V6(
                        "2001:4860:4860::8888"
                            .parse()
                            .unwrap_or(Ipv6Addr::LOCALHOST),
                    ),
                    53,
                ),
            ] {
                b.row(
                    "N13",
                    format!("DNS for allowed {name} to another resolver {other}"),
                    &["NOERROR from resolver"],
                    dns_udp(other, name, false),
                );
            }
        }
        if let Some(denied_name) = &args.dns_denied {
            b.row(
                "N14",
                format!("DNS for non-allowed {denied_name}"),
                &["REFUSED from resolver"],
                dns_udp(resolver, denied_name, false),
            );
        }
        // Data smuggled in labels (each at most 63 bytes, as DNS allows).
        let chunk = "6578666974726174696f6e2d6f662d612d736563726574";
        let tunnel = format!("{chunk}.{chunk}.{chunk}.{name}");
        b.row(
            "N14",
            "DNS tunnelling: long random subdomain of an allowed name",
            &["REFUSED from resolver"],
            dns_udp(resolver, &tunnel, false),
        );
        b.row(
            "N15",
            format!("DNS over TCP to {resolver}"),
            &["NOERROR"],
            dns_tcp(resolver, name),
        );
        if let Some(denied_name) = &args.dns_denied {
            b.row(
                "N15",
                "DNS over TCP for a non-allowed name",
                &["REFUSED"],
                dns_tcp(resolver, denied_name),
            );
        }
    }
    b.row(
        "N15",
        "DoT: TCP 1.1.1.1:853",
        denied,
        tcp_http(([1, 1, 1, 1], 853).into(), "one.one.one.one"),
    );
    b.row(
        "N15",
        "DoH: https://1.1.1.1/dns-query",
        &["closed", "certificate rejected", "HTTP 403"],
        tls_get(
            "/dns-query",
            ([1, 1, 1, 1], 443).into(),
            rustls::pki_types::ServerName::IpAddress(Ipv4Addr::new(1, 1, 1, 1).into()),
            rustls::RootCertStore::empty(),
            "1.1.1.1",
            "",
        ),
    );

    b.row(
        "N16",
        "raw socket (ICMP)",
        &["EPERM"],
        try_socket(libc::AF_INET, libc::SOCK_RAW, libc::IPPROTO_ICMP),
    );
    b.row(
        "N16",
        "raw socket (IPPROTO_RAW)",
        &["EPERM"],
        try_socket(libc::AF_INET, libc::SOCK_RAW, libc::IPPROTO_RAW),
    );
    b.row(
        "N16",
        "raw socket (ICMPv6)",
        &["EPERM"],
        try_socket(libc::AF_INET6, libc::SOCK_RAW, libc::IPPROTO_ICMPV6),
    );
    b.row(
        "N17",
        "ping socket (SOCK_DGRAM, IPPROTO_ICMP)",
        &["EPERM", "EACCES"],
        try_socket(libc::AF_INET, libc::SOCK_DGRAM, libc::IPPROTO_ICMP),
    );
    for (name, ty, proto) in [
        ("MPTCP", libc::SOCK_STREAM, 262),
        ("UDP-Lite", libc::SOCK_DGRAM, 136),
        ("SCTP", libc::SOCK_STREAM, 132),
        ("SMC (IPPROTO_SMC)", libc::SOCK_STREAM, 256),
    ] {
        if args.sandbox {
            // No hook refuses the socket here: what matters is where its traffic goes (MPTCP
            // is TCP on the wire, so redirected; UDP-Lite is not UDP, so port 53 is not
            // redirected either, and its datagrams are rejected).
            let (traffic, expected): (String, &[&str]) = if ty == libc::SOCK_STREAM {
                (
                    "connect and HTTP request".into(),
                    &[
                        "EPERM",
                        "EPROTONOSUPPORT",
                        "ESOCKTNOSUPPORT",
                        "created, 403",
                        "created, closed",
                    ],
                )
            } else {
                (
                    format!("sendto {out_udp} and 1.1.1.1:53"),
                    &[
                        "EPERM",
                        "EPROTONOSUPPORT",
                        "ESOCKTNOSUPPORT",
                        "created, send EPERM",
                    ],
                )
            };
            b.row(
                "N18",
                format!("{name} socket, then {traffic}"),
                expected,
                other_protocol(ty, proto, out_tcp, out_udp),
            );
            continue;
        }
        b.row(
            "N18",
            format!("{name} socket"),
            &["EPERM", "EPROTONOSUPPORT", "ESOCKTNOSUPPORT"],
            try_socket(libc::AF_INET, ty, proto),
        );
    }
    b.row(
        "N19",
        "AF_PACKET socket",
        &["EPERM"],
        try_socket(libc::AF_PACKET, libc::SOCK_RAW, 0),
    );
    // Creation only: never connect or send over vsock (it reaches the hypervisor).
    b.row(
        "N20",
        "AF_VSOCK socket (creation only)",
        &["EPERM"],
        try_socket(libc::AF_VSOCK, libc::SOCK_STREAM, 0),
    );
    b.row(
        "N21",
        "AF_XDP socket",
        &["EPERM"],
        try_socket(libc::AF_XDP, libc::SOCK_RAW, 0),
    );
    // Issue 13.13: sock_diag lists every TCP socket of the host; only NETLINK_ROUTE (for
    // getaddrinfo) is left.
    b.row(
        "F13.13",
        "AF_NETLINK NETLINK_SOCK_DIAG socket (the host's socket table)",
        &["EPERM"],
        try_socket(libc::AF_NETLINK, libc::SOCK_RAW, libc::NETLINK_SOCK_DIAG),
    );
    b.row(
        "F13.13",
        "AF_NETLINK NETLINK_AUDIT socket",
        &["EPERM"],
        try_socket(libc::AF_NETLINK, libc::SOCK_RAW, libc::NETLINK_AUDIT),
    );
    b.row(
        "F13.13",
        "AF_NETLINK NETLINK_ROUTE still works (getaddrinfo)",
        &["created"],
        try_socket(libc::AF_NETLINK, libc::SOCK_RAW, libc::NETLINK_ROUTE),
    );
    b.row(
        "N21",
        "AF_SMC socket",
        &["EPERM"],
        try_socket(43, libc::SOCK_STREAM, 0),
    );

    if let (true, Some(path)) = (args.sandbox, &args.outside_unix) {
        let reason = "root mode only: Landlock does not govern connect() or sendto() on a \
                      pathname socket, and this mode hides only brokerd's run directory, the \
                      user's runtime directory, X11, ICE, D-Bus and Docker (N41 covers those; \
                      docs/design/unprivileged.md, 'Host unix sockets')";
        b.skip("N22", format!("AF_UNIX stream connect to {path}"), reason);
        b.skip(
            "N23",
            format!("AF_UNIX datagram sendto {path}.dgram"),
            reason,
        );
    } else if let Some(path) = &args.outside_unix {
        b.row(
            "N22",
            format!("AF_UNIX stream connect to {path}"),
            &["EPERM"],
            unix_connect(path.as_bytes(), false),
        );
        b.row(
            "N23",
            format!("AF_UNIX datagram sendto {path}.dgram"),
            &["EPERM"],
            unix_sendto(format!("{path}.dgram").as_bytes()),
        );
    }
    if let Some(name) = &args.outside_abstract {
        if args.sandbox {
            b.row(
                "N22",
                format!(
                    "AF_UNIX connect to the host's abstract @{name} (abstract names are per \
                     network namespace)"
                ),
                &["ECONNREFUSED"],
                unix_connect(name.as_bytes(), true),
            );
        } else {
            b.row(
                "N22",
                format!("AF_UNIX connect to abstract @{name}"),
                &["EPERM"],
                unix_connect(name.as_bytes(), true),
            );
        }
    }
    b.row("N24", "socketpair() and pipe() still work", &["works"], {
        let mut sv = [0i32; 2];
        let mut p = [0i32; 2];
        // SAFETY: valid out arrays; the fds are closed below.
        let ok = unsafe {
            libc::socketpair(libc::AF_UNIX, libc::SOCK_STREAM, 0, sv.as_mut_ptr()) == 0
                && libc::pipe(p.as_mut_ptr()) == 0
        };
        for fd in sv.iter().chain(p.iter()).filter(|fd| **fd > 0) {
            // SAFETY: fds we created.
            unsafe { libc::close(*fd) };
        }
        if ok { "works".into() } else { last_errno() }
    });
    for (what, dst) in [
        (
            "169.254.169.254:80 (cloud metadata)",
            SocketAddr::from(([169, 254, 169, 254], 80)),
        ),
        (
            "127.0.0.1:22 (a local service)",
            SocketAddr::from(([127, 0, 0, 1], 22)),
        ),
        (
            "[fd00:ec2::254]:80",
            SocketAddr::new(
                IpAddr::V6("fd00:ec2::254".parse().unwrap_or(Ipv6Addr::LOCALHOST)),
                80,
            ),
        ),
    ] {
        b.row(
            "N25",
            format!("connect to {what}"),
            denied,
            tcp_http(dst, "metadata.test"),
        );
    }
    for port in &args.broker_ports {
        b.row(
            "N26",
            format!("connect straight to brokerd's port 127.0.0.1:{port}"),
            &["closed", "403"],
            tcp_http(([127, 0, 0, 1], *port).into(), "loop.test"),
        );
    }
    if args.sandbox {
        // The sandbox's own listener, which every connect is redirected to: brokerd refuses
        // a connection whose destination is the listener itself (a loop).
        for dst in [
            SocketAddr::from(([127, 0, 0, 1], SANDBOX_TCP_PORT)),
            SocketAddr::from((Ipv6Addr::LOCALHOST, SANDBOX_TCP_PORT)),
        ] {
            b.row(
                "N26",
                format!("connect to the sandbox's listener {dst} itself (a loop)"),
                &["closed", "403"],
                tcp_http(dst, "loop.test"),
            );
        }
    }
    b.row(
        "N26",
        "CONNECT request through the redirect",
        denied,
        match TcpStream::connect_timeout(&out_tcp, TIMEOUT) {
            Ok(s) => http_answer(
                s,
                &out_tcp.to_string(),
                &format!("CONNECT {out_tcp} HTTP/1.1"),
            ),
            Err(e) => io_errno(&e),
        },
    );
    b.row(
        "N26",
        "absolute-form URL to a non-allowed host",
        denied,
        match TcpStream::connect_timeout(&out_tcp, TIMEOUT) {
            Ok(s) => http_answer(s, "outside.test", "GET http://outside.test/ HTTP/1.1"),
            Err(e) => io_errno(&e),
        },
    );
    b.row(
        "N27",
        if args.sandbox {
            "listen() without bind(): autobound, in the sandbox's own network namespace (lo only)"
        } else {
            "listen() without bind(): autobound, reachable from loopback only (ingress filter)"
        },
        &["listening"],
        {
            match owned_socket(libc::AF_INET, libc::SOCK_STREAM, 0) {
                // SAFETY: listen on our own socket.
                Ok(fd) => {
                    if unsafe { libc::listen(fd.as_raw_fd(), 1) } == 0 {
                        "listening".into()
                    } else {
                        last_errno()
                    }
                }
                Err(e) => e,
            }
        },
    );
    if args.sandbox {
        b.skip(
            "N28",
            "bind(0.0.0.0:0) lands on loopback",
            "root mode only: the bind hook rewrites wildcard binds; here the namespace has only lo",
        );
        b.row(
            "N28",
            "network interfaces in the sandbox besides lo (a non-loopback address to bind)",
            &["none"],
            {
                let others: Vec<String> = interfaces().into_iter().filter(|i| i != "lo").collect();
                if others.is_empty() {
                    "none".into()
                } else {
                    format!("{others:?}")
                }
            },
        );
        b.row(
            "N28",
            format!(
                "bind 127.0.0.1:{SANDBOX_TCP_PORT} with SO_REUSEPORT (steal the listener \
                 handed to brokerd)"
            ),
            &["EADDRINUSE"],
            bind_reuseport(libc::SOCK_STREAM, SANDBOX_TCP_PORT),
        );
        b.row(
            "N28",
            format!(
                "bind UDP 127.0.0.1:{SANDBOX_DNS_PORT} with SO_REUSEPORT (steal the DNS socket \
                 handed to brokerd)"
            ),
            &["EADDRINUSE"],
            bind_reuseport(libc::SOCK_DGRAM, SANDBOX_DNS_PORT),
        );
        for port in &args.broker_ports {
            b.skip(
                "N28",
                format!("bind 127.0.0.1:{port} (squat brokerd's port)"),
                "root mode only: brokerd's ports are in its user's network namespace; the \
                 sandbox's 127.0.0.1 is its own",
            );
        }
    } else {
        b.row(
            "N28",
            "bind(0.0.0.0:0) lands on loopback",
            &["127.0.0.1"],
            match std::net::TcpListener::bind("0.0.0.0:0") {
                Ok(l) => l
                    .local_addr()
                    .map(|a| a.ip().to_string())
                    .unwrap_or_default(),
                Err(e) => io_errno(&e),
            },
        );
        if let Some(ip) = first_non_loopback_ip() {
            b.row(
                "N28",
                format!("bind a non-loopback address {ip}"),
                &["EPERM"],
                match std::net::TcpListener::bind((ip, 0)) {
                    Ok(l) => format!("bound {:?}", l.local_addr()),
                    Err(e) => io_errno(&e),
                },
            );
        }
        for port in &args.broker_ports {
            b.row(
                "N28",
                format!("bind 127.0.0.1:{port} (squat brokerd's port)"),
                &["EPERM"],
                match UdpSocket::bind(("127.0.0.1", *port))
                    .map(drop)
                    .and_then(|()| std::net::TcpListener::bind(("127.0.0.1", *port)).map(drop))
                {
                    Ok(()) => "bound".into(),
                    Err(e) => io_errno(&e),
                },
            );
        }
    }
    b.row(
        "N29",
        "new user+network namespace, then connect out",
        &["EPERM", "ENETUNREACH", "unshare refused"],
        in_new_netns(),
    );
    b.row(
        "N31",
        "SO_BINDTODEVICE lo, then connect to the outside service",
        &["EPERM", "403", "closed", "timeout"],
        {
            match owned_socket(libc::AF_INET, libc::SOCK_STREAM, 0) {
                Ok(fd) => {
                    // SAFETY: valid option value.
                    let r = unsafe {
                        libc::setsockopt(
                            fd.as_raw_fd(),
                            libc::SOL_SOCKET,
                            libc::SO_BINDTODEVICE,
                            c"lo".as_ptr() as *const libc::c_void,
                            3,
                        )
                    };
                    if r != 0 {
                        last_errno()
                    } else {
                        set_timeouts(&fd);
                        let sa = match out_tcp {
                            SocketAddr::V4(a) => sockaddr_in(*a.ip(), a.port()),
                            SocketAddr::V6(_) => sockaddr_in(Ipv4Addr::LOCALHOST, out_tcp.port()),
                        };
                        // SAFETY: valid sockaddr_in.
                        if unsafe {
                            libc::connect(
                                fd.as_raw_fd(),
                                &sa as *const _ as *const libc::sockaddr,
                                std::mem::size_of::<libc::sockaddr_in>() as u32,
                            )
                        } != 0
                        {
                            last_errno()
                        } else {
                            http_answer(stream_of(fd), "outside.test", "GET / HTTP/1.1")
                        }
                    }
                }
                Err(e) => e,
            }
        },
    );
    for path in [
        "/sys/fs/cgroup/cgroup.procs",
        "/sys/fs/cgroup/unified/cgroup.procs",
    ] {
        b.row(
            "N32",
            format!("write own pid to {path}"),
            &["ENOENT", "EACCES", "EROFS", "EPERM"],
            open_errno(path, true),
        );
    }
    if args.sandbox {
        let reason = "root mode only: no capture hook is attached to a cgroup in this mode, so a \
                      cgroup of its own would escape nothing (N32 shows cgroupfs is covered)";
        b.skip(
            "N33",
            "clone3(CLONE_INTO_CGROUP) into /sys/fs/cgroup",
            reason,
        );
        b.skip("N34", "create a sub-cgroup", reason);
    } else {
        b.row(
            "N33",
            "clone3(CLONE_INTO_CGROUP) into /sys/fs/cgroup",
            &["ENOENT", "EACCES", "EBADF", "EPERM", "EINVAL", "EOPNOTSUPP"],
            clone_into("/sys/fs/cgroup"),
        );
        b.row(
            "N34",
            "create a sub-cgroup",
            &["ENOENT", "EACCES", "EROFS", "EPERM"],
            {
                let own = std::fs::read_to_string("/proc/self/cgroup").unwrap_or_default();
                let rel = own
                    .lines()
                    .find_map(|l| l.strip_prefix("0::"))
                    .unwrap_or("/")
                    .to_string();
                let dir = format!("/sys/fs/cgroup/unified{rel}/escape");
                let c = CString::new(dir).unwrap_or_default();
                // SAFETY: valid path.
                if unsafe { libc::mkdir(c.as_ptr(), 0o755) } == 0 {
                    "created".into()
                } else {
                    last_errno()
                }
            },
        );
    }
    b.row("N35", "bpf(BPF_PROG_QUERY)", &["EPERM"], bpf_errno(16));
    b.row(
        "N35",
        "bpf(BPF_PROG_GET_FD_BY_ID)",
        &["EPERM"],
        bpf_errno(13),
    );
    b.row(
        "N35",
        "bpf(BPF_LINK_GET_NEXT_ID)",
        &["EPERM"],
        bpf_errno(31),
    );
    if args.sandbox {
        // In a user namespace the inherited mounts are locked, so bpffs is covered, not
        // unmounted: a root brokerd's pinned links (on the same host) must not show.
        b.row(
            "N36",
            "reach a root brokerd's pinned links: what does /sys/fs/bpf hold?",
            &["nothing", "ENOENT"],
            match std::fs::read_dir("/sys/fs/bpf") {
                Ok(d) => match d.count() {
                    0 => "nothing".into(),
                    n => format!("{n} entries"),
                },
                Err(e) => io_errno(&e),
            },
        );
    } else {
        b.row(
            "N36",
            "reach the pinned links: is any bpf file system mounted?",
            &["no bpffs mounted"],
            if std::fs::read_to_string("/proc/self/mountinfo")
                .unwrap_or_default()
                .lines()
                .any(|l| l.contains(" - bpf "))
            {
                "bpffs visible".into()
            } else {
                "no bpffs mounted".into()
            },
        );
    }
    b.row("N37", "bpf(BPF_PROG_LOAD)", &["EPERM"], bpf_errno(5));
    if let (true, Some(pid)) = (args.sandbox, args.broker_pid) {
        sandbox_broker_rows(&mut b, pid);
    } else if let Some(pid) = args.broker_pid {
        // SAFETY: ptrace attach attempt; expected to fail. Detached at once if it did not.
        let r = unsafe { libc::ptrace(libc::PTRACE_ATTACH, pid, 0, 0) };
        let outcome = if r == 0 {
            unsafe { libc::ptrace(libc::PTRACE_DETACH, pid, 0, 0) };
            "attached".into()
        } else {
            last_errno()
        };
        b.row("N39", "ptrace(PTRACE_ATTACH) brokerd", &["EPERM"], outcome);
        let mut buf = [0u8; 16];
        let local = libc::iovec {
            iov_base: buf.as_mut_ptr() as *mut libc::c_void,
            iov_len: 16,
        };
        let remote = libc::iovec {
            iov_base: 0x400000 as *mut libc::c_void,
            iov_len: 16,
        };
        // SAFETY: valid iovecs; expected to fail.
        let r = unsafe { libc::process_vm_readv(pid, &local, 1, &remote, 1, 0) };
        b.row(
            "N39",
            "process_vm_readv of brokerd",
            &["EPERM"],
            if r < 0 {
                last_errno()
            } else {
                "read memory".into()
            },
        );
        for file in ["environ", "mem", "maps"] {
            b.row(
                "N39",
                format!("open /proc/<brokerd>/{file}"),
                &["EACCES", "EPERM"],
                open_errno(&format!("/proc/{pid}/{file}"), false),
            );
        }
        // SAFETY: kill attempts; expected to fail.
        let r = unsafe { libc::kill(pid, libc::SIGKILL) };
        b.row(
            "N42",
            "kill -KILL brokerd",
            &["EPERM"],
            if r == 0 {
                "signal delivered".into()
            } else {
                last_errno()
            },
        );
        let r = unsafe { libc::kill(pid, libc::SIGSTOP) };
        b.row(
            "N42",
            "kill -STOP brokerd",
            &["EPERM"],
            if r == 0 {
                "signal delivered".into()
            } else {
                last_errno()
            },
        );
    }
    // SAFETY: plain system calls.
    let parent = unsafe { libc::getppid() };
    let r = unsafe { libc::ptrace(libc::PTRACE_ATTACH, parent, 0, 0) };
    b.row(
        "N40",
        if args.sandbox {
            "ptrace(PTRACE_ATTACH) the sandbox's init (brokerctl's, in the parent user namespace)"
        } else {
            "ptrace(PTRACE_ATTACH) the launcher (a process outside the sandbox)"
        },
        &["EPERM"],
        if r == 0 {
            unsafe { libc::ptrace(libc::PTRACE_DETACH, parent, 0, 0) };
            "attached".into()
        } else {
            last_errno()
        },
    );
    for path in &args.protected {
        b.row(
            "N41",
            format!("read {path}"),
            &["EACCES", "ENOENT", "EPERM"],
            if args.sandbox {
                // How much of it the agent got, where it could open it.
                match std::fs::read(path) {
                    Ok(bytes) => format!("read {} bytes", bytes.len()),
                    Err(e) => io_errno(&e),
                }
            } else {
                open_errno(path, false)
            },
        );
    }
    if let Some(squat) = args.squat {
        b.row(
            "N64",
            format!("listen on {squat} (a plain_http rule injects the key there) and call it"),
            // In the sandbox, the listener is in the sandbox's network namespace: brokerd
            // dials the address in its own, where nothing listens.
            if args.sandbox {
                &["502, never dialed"]
            } else {
                &["403, dialed, 0 bytes"]
            },
            squat_plain_http(squat),
        );
    }
    if let (Some(share), Some(connect)) = (args.connection_share, args.allowed_connect) {
        b.row(
            "N65",
            format!(
                "hold {} connections to {connect} (its share of brokerd is {share})",
                4 * share
            ),
            &["only the share held, the rest closed"],
            hold_connections(connect, 4 * share, share),
        );
    }
    if args.sandbox {
        sandbox_rows(&mut b);
    }
    b.row(
        "N52",
        format!("SNI-less TLS to {out_tcp}"),
        &["closed", "certificate rejected"],
        tls_get(
            "/",
            out_tcp,
            rustls::pki_types::ServerName::IpAddress(out_tcp.ip().into()),
            rustls::RootCertStore::empty(),
            &out_tcp.ip().to_string(),
            "",
        ),
    );

    let failed = b.rows.iter().filter(|r| !r.pass).count();
    if args.json {
        for r in &b.rows {
            println!("{}", json_row(r));
        }
    } else {
        println!(
            "{:<5} {:<70} {:<34} {:<28} RESULT",
            "ID", "ATTACK", "EXPECTED", "OUTCOME"
        );
        for r in &b.rows {
            println!(
                "{:<5} {:<70} {:<34} {:<28} {}",
                r.id,
                r.attack,
                r.expected,
                r.outcome,
                if r.pass { "pass" } else { "FAIL" }
            );
        }
        println!("{} rows, {} failed", b.rows.len(), failed);
    }
    std::process::exit(i32::from(failed > 0));
}

/// Listens on `addr` (the address of a plain-HTTP service that is down), then calls it through
/// Opens `n` connections to `addr` (redirected to brokerd) and holds them without a byte; a
/// moment later counts how many brokerd still holds open. The agent's share is `share`.
fn hold_connections(addr: SocketAddr, n: usize, share: usize) -> String {
    let mut held = Vec::new();
    let mut refused = 0;
    for _ in 0..n {
        match std::net::TcpStream::connect_timeout(&addr, TIMEOUT) {
            Ok(s) => held.push(s),
            Err(_) => refused += 1,
        }
    }
    std::thread::sleep(std::time::Duration::from_millis(500));
    let mut open = 0;
    for s in &held {
        let _ = s.set_nonblocking(true);
        let mut b = [0u8; 1];
        match s.peek(&mut b) {
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => open += 1,
            _ => {}
        }
    }
    let closed = held.len() - open + refused;
    if open > 0 && open <= share && closed >= n - share {
        "only the share held, the rest closed".into()
    } else {
        format!("{open} held, {closed} closed")
    }
}

/// the redirect: brokerd would write the rule's key into the request. The outcome: brokerd's
/// status, whether brokerd dialed the listener, and how many bytes reached it.
fn squat_plain_http(addr: SocketAddr) -> String {
    use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
    let listener = match std::net::TcpListener::bind(addr) {
        Ok(l) => l,
        Err(e) => return format!("bind: {}", io_errno(&e)),
    };
    if let Err(e) = listener.set_nonblocking(true) {
        return format!("nonblocking: {}", io_errno(&e));
    }
    let done = Arc::new(AtomicBool::new(false));
    let dialed = Arc::new(AtomicUsize::new(0));
    let received = Arc::new(AtomicUsize::new(0));
    let server = {
        let (done, dialed, received) = (done.clone(), dialed.clone(), received.clone());
        std::thread::spawn(move || {
            loop {
                match listener.accept() {
                    Ok((mut s, _)) => {
                        dialed.fetch_add(1, Ordering::SeqCst);
                        let _ = s.set_nonblocking(false);
                        let _ = s.set_read_timeout(Some(TIMEOUT));
                        let mut buf = [0u8; 4096];
                        if let Ok(n) = s.read(&mut buf)
                            && n > 0
                        {
                            received.fetch_add(n, Ordering::SeqCst);
                            // Answer like the service, so a request that got here completes.
                            let _ = s.write_all(
                                b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\nConnection: close\r\n\r\nok",
                            );
                        }
                    }
                    Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {
                        if done.load(Ordering::SeqCst) {
                            return;
                        }
                        std::thread::sleep(Duration::from_millis(10));
                    }
                    Err(_) => return,
                }
            }
        })
    };
    let status = match TcpStream::connect_timeout(&addr, TIMEOUT) {
        Ok(s) => http_answer(s, &addr.to_string(), "GET /squat HTTP/1.1"),
        Err(e) => io_errno(&e),
    };
    std::thread::sleep(Duration::from_millis(300));
    done.store(true, Ordering::SeqCst);
    let _ = server.join();
    match dialed.load(Ordering::SeqCst) {
        0 => format!("{status}, never dialed"),
        _ => format!(
            "{status}, dialed, {} bytes",
            received.load(Ordering::SeqCst)
        ),
    }
}

fn json_escape(s: &str) -> String {
    let mut out = String::with_capacity(s.len() + 2);
    for c in s.chars() {
        match c {
            '"' => out.push_str("\\\""),
            '\\' => out.push_str("\\\\"),
            c if (c as u32) < 0x20 => out.push_str(&format!("\\u{:04x}", c as u32)),
            c => out.push(c),
        }
    }
    out
}

fn json_row(r: &Row) -> String {
    format!(
        "{{\"id\":\"{}\",\"attack\":\"{}\",\"expected\":\"{}\",\"outcome\":\"{}\",\"pass\":{}}}",
        r.id,
        json_escape(&r.attack),
        json_escape(&r.expected),
        json_escape(&r.outcome),
        r.pass
    )
}

fn fastopen_sendto(dst: SocketAddr) -> String {
    let SocketAddr::V4(v4) = dst else {
        return "IPv4 only".into();
    };
    let fd = match owned_socket(libc::AF_INET, libc::SOCK_STREAM, 0) {
        Ok(fd) => fd,
        Err(e) => return e,
    };
    set_timeouts(&fd);
    let sa = sockaddr_in(*v4.ip(), v4.port());
    let req = b"GET / HTTP/1.1\r\nHost: outside.test\r\nConnection: close\r\n\r\n";
    // SAFETY: valid buffer and sockaddr.
    let r = unsafe {
        libc::sendto(
            fd.as_raw_fd(),
            req.as_ptr() as *const libc::c_void,
            req.len(),
            libc::MSG_FASTOPEN,
            &sa as *const _ as *const libc::sockaddr,
            std::mem::size_of::<libc::sockaddr_in>() as u32,
        )
    };
    if r < 0 {
        return last_errno();
    }
    read_status(&mut stream_of(fd))
}

fn fastopen_connect(dst: SocketAddr) -> String {
    let SocketAddr::V4(v4) = dst else {
        return "IPv4 only".into();
    };
    let fd = match owned_socket(libc::AF_INET, libc::SOCK_STREAM, 0) {
        Ok(fd) => fd,
        Err(e) => return e,
    };
    set_timeouts(&fd);
    let on: libc::c_int = 1;
    // SAFETY: valid int option (TCP_FASTOPEN_CONNECT = 30).
    unsafe {
        libc::setsockopt(
            fd.as_raw_fd(),
            libc::IPPROTO_TCP,
            30,
            &on as *const _ as *const libc::c_void,
            4,
        )
    };
    let sa = sockaddr_in(*v4.ip(), v4.port());
    // SAFETY: valid sockaddr.
    if unsafe {
        libc::connect(
            fd.as_raw_fd(),
            &sa as *const _ as *const libc::sockaddr,
            std::mem::size_of::<libc::sockaddr_in>() as u32,
        )
    } != 0
    {
        return last_errno();
    }
    http_answer(stream_of(fd), "outside.test", "GET / HTTP/1.1")
}

fn unix_addr(name: &[u8], abstract_ns: bool) -> (libc::sockaddr_un, libc::socklen_t) {
    // SAFETY: plain data.
    let mut sa: libc::sockaddr_un = unsafe { std::mem::zeroed() };
    sa.sun_family = libc::AF_UNIX as libc::sa_family_t;
    let offset = usize::from(abstract_ns);
    let n = name.len().min(sa.sun_path.len() - 1 - offset);
    for (i, byte) in name[..n].iter().enumerate() {
        sa.sun_path[i + offset] = *byte as libc::c_char;
    }
    let len = std::mem::size_of::<libc::sa_family_t>() + offset + n + usize::from(!abstract_ns);
    (sa, len as libc::socklen_t)
}

fn unix_connect(name: &[u8], abstract_ns: bool) -> String {
    let fd = match owned_socket(libc::AF_UNIX, libc::SOCK_STREAM, 0) {
        Ok(fd) => fd,
        Err(e) => return e,
    };
    let (sa, len) = unix_addr(name, abstract_ns);
    // SAFETY: valid sockaddr_un.
    if unsafe {
        libc::connect(
            fd.as_raw_fd(),
            &sa as *const _ as *const libc::sockaddr,
            len,
        )
    } == 0
    {
        "connected".into()
    } else {
        last_errno()
    }
}

fn unix_sendto(path: &[u8]) -> String {
    let fd = match owned_socket(libc::AF_UNIX, libc::SOCK_DGRAM, 0) {
        Ok(fd) => fd,
        Err(e) => return e,
    };
    let (sa, len) = unix_addr(path, false);
    // SAFETY: valid buffer and sockaddr.
    let r = unsafe {
        libc::sendto(
            fd.as_raw_fd(),
            b"probe".as_ptr() as *const libc::c_void,
            5,
            0,
            &sa as *const _ as *const libc::sockaddr,
            len,
        )
    };
    if r >= 0 { "sent".into() } else { last_errno() }
}

fn first_non_loopback_ip() -> Option<IpAddr> {
    let mut ifap: *mut libc::ifaddrs = std::ptr::null_mut();
    // SAFETY: getifaddrs fills ifap; freed below.
    if unsafe { libc::getifaddrs(&mut ifap) } != 0 {
        return None;
    }
    let mut found = None;
    let mut cur = ifap;
    while !cur.is_null() {
        // SAFETY: a node of the list getifaddrs returned.
        let ifa = unsafe { &*cur };
        if !ifa.ifa_addr.is_null()
            && unsafe { (*ifa.ifa_addr).sa_family } == libc::AF_INET as libc::sa_family_t
        {
            // SAFETY: an AF_INET address is a sockaddr_in.
            let sin = unsafe { &*(ifa.ifa_addr as *const libc::sockaddr_in) };
            let ip = Ipv4Addr::from(sin.sin_addr.s_addr.to_ne_bytes());
            if !ip.is_loopback() {
                found = Some(IpAddr::V4(ip));
                break;
            }
        }
        cur = ifa.ifa_next;
    }
    // SAFETY: the list from getifaddrs.
    unsafe { libc::freeifaddrs(ifap) };
    found
}

/// In a forked child: unshare a user and network namespace and connect out. The child reports
/// its outcome through a pipe.
fn in_new_netns() -> String {
    let mut p = [0i32; 2];
    // SAFETY: valid out array.
    if unsafe { libc::pipe(p.as_mut_ptr()) } != 0 {
        return last_errno();
    }
    // SAFETY: fork of a single-threaded process; the child only makes system calls and exits.
    let pid = unsafe { libc::fork() };
    if pid == 0 {
        // SAFETY: child side.
        let outcome = if unsafe { libc::unshare(libc::CLONE_NEWUSER | libc::CLONE_NEWNET) } != 0 {
            "unshare refused".to_string()
        } else {
            match TcpStream::connect_timeout(&SocketAddr::from(([10, 1, 2, 3], 443)), TIMEOUT) {
                Ok(_) => "connected".into(),
                Err(e) => io_errno(&e),
            }
        };
        // SAFETY: write to our pipe, then _exit.
        unsafe {
            libc::write(p[1], outcome.as_ptr() as *const libc::c_void, outcome.len());
            libc::_exit(0);
        }
    }
    // SAFETY: parent side: close the write end, read, reap.
    unsafe { libc::close(p[1]) };
    let mut out = String::new();
    // SAFETY: p[0] is our read end.
    let mut f = unsafe { std::fs::File::from_raw_fd(p[0]) };
    let _ = f.read_to_string(&mut out);
    let mut status = 0;
    // SAFETY: our child.
    unsafe { libc::waitpid(pid, &mut status, 0) };
    out
}

fn clone_into(dir: &str) -> String {
    let Ok(c) = CString::new(dir) else {
        return "bad path".into();
    };
    // SAFETY: valid path.
    let fd = unsafe {
        libc::open(
            c.as_ptr(),
            libc::O_RDONLY | libc::O_DIRECTORY | libc::O_CLOEXEC,
        )
    };
    if fd < 0 {
        return last_errno();
    }
    #[repr(C)]
    #[derive(Default)]
    struct CloneArgs {
        flags: u64,
        pidfd: u64,
        child_tid: u64,
        parent_tid: u64,
        exit_signal: u64,
        stack: u64,
        stack_size: u64,
        tls: u64,
        set_tid: u64,
        set_tid_size: u64,
        cgroup: u64,
    }
    let args = CloneArgs {
        flags: 0x2_0000_0000,
        exit_signal: libc::SIGCHLD as u64,
        cgroup: fd as u64,
        ..Default::default()
    };
    // SAFETY: clone3 like fork; the child exits at once.
    let pid = unsafe {
        libc::syscall(
            libc::SYS_clone3,
            &args as *const CloneArgs,
            std::mem::size_of::<CloneArgs>(),
        )
    };
    let outcome = if pid < 0 {
        last_errno()
    } else if pid == 0 {
        unsafe { libc::_exit(0) }
    } else {
        let mut status = 0;
        // SAFETY: our child.
        unsafe { libc::waitpid(pid as i32, &mut status, 0) };
        "child created in another cgroup".into()
    };
    // SAFETY: our fd.
    unsafe { libc::close(fd) };
    outcome
}

/// UDP connect to `dst` (sends nothing), then one datagram.
fn udp_connect_send(dst: SocketAddr) -> String {
    let socket = match UdpSocket::bind("0.0.0.0:0") {
        Ok(s) => s,
        Err(e) => return format!("bind {}", io_errno(&e)),
    };
    if let Err(e) = socket.connect(dst) {
        return io_errno(&e);
    }
    match socket.send(b"probe") {
        Ok(_) => "connected, sent".into(),
        Err(e) => format!("connected, send {}", io_errno(&e)),
    }
}

/// Binds 127.0.0.1:`port` with SO_REUSEADDR and SO_REUSEPORT: "bound" or the errno.
fn bind_reuseport(ty: i32, port: u16) -> String {
    let fd = match owned_socket(libc::AF_INET, ty, 0) {
        Ok(fd) => fd,
        Err(e) => return e,
    };
    let on: libc::c_int = 1;
    for opt in [libc::SO_REUSEADDR, libc::SO_REUSEPORT] {
        // SAFETY: valid int option.
        unsafe {
            libc::setsockopt(
                fd.as_raw_fd(),
                libc::SOL_SOCKET,
                opt,
                &on as *const _ as *const libc::c_void,
                4,
            )
        };
    }
    let sa = sockaddr_in(Ipv4Addr::LOCALHOST, port);
    // SAFETY: valid sockaddr_in.
    let r = unsafe {
        libc::bind(
            fd.as_raw_fd(),
            &sa as *const _ as *const libc::sockaddr,
            std::mem::size_of::<libc::sockaddr_in>() as u32,
        )
    };
    if r != 0 {
        return last_errno();
    }
    if ty == libc::SOCK_STREAM {
        // SAFETY: listen on our own socket.
        if unsafe { libc::listen(fd.as_raw_fd(), 1) } != 0 {
            return format!("bound, listen {}", last_errno());
        }
    }
    "bound".into()
}

/// Runs `f` in a forked child (its namespaces and credentials changes stay there) and returns
/// what it reported through a pipe.
fn in_child(f: fn() -> String) -> String {
    let mut p = [0i32; 2];
    // SAFETY: valid out array.
    if unsafe { libc::pipe(p.as_mut_ptr()) } != 0 {
        return last_errno();
    }
    // SAFETY: fork of a single-threaded process; the child makes system calls and exits.
    let pid = unsafe { libc::fork() };
    if pid == 0 {
        let outcome = f();
        // SAFETY: write to our pipe, then _exit.
        unsafe {
            libc::write(p[1], outcome.as_ptr() as *const libc::c_void, outcome.len());
            libc::_exit(0);
        }
    }
    // SAFETY: parent side: close the write end, read, reap.
    unsafe { libc::close(p[1]) };
    let mut out = String::new();
    // SAFETY: p[0] is our read end.
    let mut f = unsafe { std::fs::File::from_raw_fd(p[0]) };
    let _ = f.read_to_string(&mut out);
    let mut status = 0;
    // SAFETY: our child.
    unsafe { libc::waitpid(pid, &mut status, 0) };
    out
}

/// Deletes the default IPv4 route with rtnetlink (NETLINK_ROUTE is allowed, for getaddrinfo):
/// the kernel's answer as an errno, or "deleted".
fn rtnetlink_delete_default_route() -> String {
    let fd = match owned_socket(libc::AF_NETLINK, libc::SOCK_RAW, libc::NETLINK_ROUTE) {
        Ok(fd) => fd,
        Err(e) => return format!("socket {e}"),
    };
    set_timeouts(&fd);
    // nlmsghdr (16 bytes) + rtmsg (12 bytes).
    let mut msg = Vec::with_capacity(28);
    msg.extend_from_slice(&28u32.to_ne_bytes());
    msg.extend_from_slice(&libc::RTM_DELROUTE.to_ne_bytes());
    msg.extend_from_slice(&((libc::NLM_F_REQUEST | libc::NLM_F_ACK) as u16).to_ne_bytes());
    msg.extend_from_slice(&1u32.to_ne_bytes());
    msg.extend_from_slice(&0u32.to_ne_bytes());
    msg.extend_from_slice(&[
        libc::AF_INET as u8,
        0,
        0,
        0,
        libc::RT_TABLE_MAIN,
        0,
        libc::RT_SCOPE_NOWHERE,
        0,
    ]);
    msg.extend_from_slice(&0u32.to_ne_bytes());
    // SAFETY: a sockaddr_nl for the kernel (all zero but the family).
    let mut kernel: libc::sockaddr_nl = unsafe { std::mem::zeroed() };
    kernel.nl_family = libc::AF_NETLINK as libc::sa_family_t;
    // SAFETY: valid buffer and address.
    let r = unsafe {
        libc::sendto(
            fd.as_raw_fd(),
            msg.as_ptr() as *const libc::c_void,
            msg.len(),
            0,
            &kernel as *const _ as *const libc::sockaddr,
            std::mem::size_of::<libc::sockaddr_nl>() as u32,
        )
    };
    if r < 0 {
        return format!("send {}", last_errno());
    }
    let mut buf = [0u8; 512];
    // SAFETY: valid buffer.
    let n = unsafe {
        libc::recv(
            fd.as_raw_fd(),
            buf.as_mut_ptr() as *mut libc::c_void,
            buf.len(),
            0,
        )
    };
    if n < 20 {
        return if n < 0 {
            format!("recv {}", last_errno())
        } else {
            "short answer".into()
        };
    }
    let ty = u16::from_ne_bytes([buf[4], buf[5]]);
    if ty != libc::NLMSG_ERROR as u16 {
        return format!("answer type {ty}");
    }
    match i32::from_ne_bytes([buf[16], buf[17], buf[18], buf[19]]) {
        0 => "deleted".into(),
        e => errno_name(-e),
    }
}

/// The rows only the unprivileged sandbox has: the namespaces' own rules, routes and limits.
fn sandbox_rows(b: &mut Battery) {
    b.row(
        "U01",
        "AF_NETLINK NETLINK_NETFILTER socket (nft flush ruleset, iptables-nft -F)",
        &["EPERM"],
        try_socket(libc::AF_NETLINK, libc::SOCK_RAW, libc::NETLINK_NETFILTER),
    );
    b.row(
        "U02",
        "delete the default route over rtnetlink (RTM_DELROUTE)",
        &["EPERM"],
        in_child(rtnetlink_delete_default_route),
    );
    b.row(
        "U03",
        "unshare(CLONE_NEWNET): a network namespace without the rules",
        &["EPERM"],
        in_child(|| {
            // SAFETY: plain system call, in a child that exits.
            if unsafe { libc::unshare(libc::CLONE_NEWNET) } == 0 {
                "unshared".into()
            } else {
                last_errno()
            }
        }),
    );
    b.row(
        "U03",
        "unshare(CLONE_NEWUSER): a user namespace with capabilities of its own",
        &["ENOSPC", "EPERM"],
        in_child(|| {
            // SAFETY: plain system call, in a child that exits.
            if unsafe { libc::unshare(libc::CLONE_NEWUSER) } == 0 {
                "unshared".into()
            } else {
                last_errno()
            }
        }),
    );
    b.row(
        "U04",
        "setsockopt(SO_MARK) (a mark the rules would skip)",
        &["EPERM"],
        {
            match owned_socket(libc::AF_INET, libc::SOCK_STREAM, 0) {
                Ok(fd) => {
                    let mark: libc::c_int = 1;
                    // SAFETY: valid int option.
                    if unsafe {
                        libc::setsockopt(
                            fd.as_raw_fd(),
                            libc::SOL_SOCKET,
                            libc::SO_MARK,
                            &mark as *const _ as *const libc::c_void,
                            4,
                        )
                    } == 0
                    {
                        "set".into()
                    } else {
                        last_errno()
                    }
                }
                Err(e) => e,
            }
        },
    );
}

/// N39 and N42 in the sandbox: brokerd runs in another pid namespace, so its pid names no
/// process here (or, by chance, one of the sandbox's own, which is then left alone).
fn sandbox_broker_rows(b: &mut Battery, pid: i32) {
    let visible: Vec<String> = std::fs::read_dir("/proc")
        .map(|d| {
            d.flatten()
                .filter_map(|e| {
                    let name = e.file_name().to_string_lossy().into_owned();
                    name.parse::<u32>().ok()?;
                    let comm = std::fs::read_to_string(e.path().join("comm")).ok()?;
                    (comm.trim() == "brokerd").then_some(name)
                })
                .collect()
        })
        .unwrap_or_default();
    b.row(
        "N39",
        "find brokerd in /proc (another pid namespace)",
        &["not visible"],
        if visible.is_empty() {
            "not visible".into()
        } else {
            format!("visible as {visible:?}")
        },
    );
    let taken = std::path::Path::new(&format!("/proc/{pid}")).exists();
    b.row(
        "N39",
        format!("brokerd's pid {pid} in the sandbox's /proc"),
        &["absent"],
        if taken {
            "taken by a sandbox process".into()
        } else {
            "absent".into()
        },
    );
    // SAFETY: ptrace attach attempt; expected to fail. Detached at once if it did not.
    let r = unsafe { libc::ptrace(libc::PTRACE_ATTACH, pid, 0, 0) };
    let outcome = if r == 0 {
        unsafe { libc::ptrace(libc::PTRACE_DETACH, pid, 0, 0) };
        "attached".into()
    } else {
        last_errno()
    };
    b.row("N39", "ptrace(PTRACE_ATTACH) brokerd", &["EPERM"], outcome);
    let mut buf = [0u8; 16];
    let local = libc::iovec {
        iov_base: buf.as_mut_ptr() as *mut libc::c_void,
        iov_len: 16,
    };
    let remote = libc::iovec {
        iov_base: 0x400000 as *mut libc::c_void,
        iov_len: 16,
    };
    // SAFETY: valid iovecs; expected to fail.
    let r = unsafe { libc::process_vm_readv(pid, &local, 1, &remote, 1, 0) };
    b.row(
        "N39",
        "process_vm_readv of brokerd",
        &["EPERM"],
        if r < 0 {
            last_errno()
        } else {
            "read memory".into()
        },
    );
    for file in ["environ", "mem", "maps"] {
        b.row(
            "N39",
            format!("open /proc/<brokerd>/{file}"),
            &["ENOENT"],
            open_errno(&format!("/proc/{pid}/{file}"), false),
        );
    }
    for (what, sig) in [("KILL", libc::SIGKILL), ("STOP", libc::SIGSTOP)] {
        let outcome = if taken {
            "not sent: the pid is a sandbox process".to_string()
        } else {
            // SAFETY: a signal to a pid that names no process here; expected to fail.
            if unsafe { libc::kill(pid, sig) } == 0 {
                "signal delivered".into()
            } else {
                last_errno()
            }
        };
        b.row("N42", format!("kill -{what} brokerd"), &["ESRCH"], outcome);
    }
}

/// A socket of another IP protocol (MPTCP, UDP-Lite, ...) and what its traffic meets: the
/// errno of `socket()`, or "created, " and the answer (stream: connect to `tcp` and an HTTP
/// request; datagram: sendto `udp` and 1.1.1.1:53, "send EPERM" when both fail so).
fn other_protocol(ty: i32, proto: i32, tcp: SocketAddr, udp: SocketAddr) -> String {
    let fd = match owned_socket(libc::AF_INET, ty, proto) {
        Ok(fd) => fd,
        Err(e) => return e,
    };
    set_timeouts(&fd);
    let v4 = |a: SocketAddr| match a {
        SocketAddr::V4(v4) => sockaddr_in(*v4.ip(), v4.port()),
        SocketAddr::V6(_) => sockaddr_in(Ipv4Addr::LOCALHOST, a.port()),
    };
    let len = std::mem::size_of::<libc::sockaddr_in>() as u32;
    if ty == libc::SOCK_STREAM {
        let sa = v4(tcp);
        // SAFETY: valid sockaddr_in.
        if unsafe {
            libc::connect(
                fd.as_raw_fd(),
                &sa as *const _ as *const libc::sockaddr,
                len,
            )
        } != 0
        {
            return format!("created, connect {}", last_errno());
        }
        return format!(
            "created, {}",
            http_answer(stream_of(fd), "outside.test", "GET / HTTP/1.1")
        );
    }
    let mut outcomes = Vec::new();
    for dst in [udp, SocketAddr::from(([1, 1, 1, 1], 53))] {
        let sa = v4(dst);
        // SAFETY: valid buffer and sockaddr.
        let r = unsafe {
            libc::sendto(
                fd.as_raw_fd(),
                b"probe".as_ptr() as *const libc::c_void,
                5,
                0,
                &sa as *const _ as *const libc::sockaddr,
                len,
            )
        };
        outcomes.push(if r < 0 { last_errno() } else { "sent".into() });
    }
    if outcomes.iter().all(|o| o == "EPERM") {
        "created, send EPERM".into()
    } else {
        format!("created, send {}", outcomes.join(" / "))
    }
}
