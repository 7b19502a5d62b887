//! Loopback plain-HTTP servers that say who connected to them.
//!
//! A connection relayed by brokerd arrives from brokerd's own socket; a direct one arrives from
//! the agent's socket. Each server records, per accepted connection, the peer address and the
//! pid that owns the peer socket (looked up in /proc while the connection is open), so a test
//! can assert "relayed by brokerd" or "direct from the agent" without guessing.
//!
//! They speak HTTP/1.1 (one request per connection, then close) because brokerd terminates
//! HTTP: a server that speaks first, or any non-HTTP protocol, is refused by it.

use std::{
    fs,
    io::{Read as _, Write as _},
    net::{Ipv4Addr, Ipv6Addr, SocketAddr, TcpListener, TcpStream},
    sync::{
        Arc, Mutex,
        atomic::{AtomicBool, Ordering},
    },
    thread,
    time::Duration,
};

use crate::canon;

/// One connection a [`TestServer`] accepted.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Accepted {
    /// The peer address the server saw.
    pub peer: SocketAddr,
    /// The process owning the peer socket at accept time, if it could be found.
    pub owner: Option<u32>,
}

#[derive(Clone)]
enum Kind {
    /// Answers one HTTP/1.1 request with 200 and the body `peer=<peer>\n<request target without
    /// its leading slash>`, then closes.
    Echo,
    /// Answers one HTTP/1.1 request with 200 and this body, then closes.
    Http(Arc<String>),
}

/// A TCP server on a loopback address and an OS-chosen port, stopped on Drop.
pub struct TestServer {
    addr: SocketAddr,
    accepted: Arc<Mutex<Vec<Accepted>>>,
    stop: Arc<AtomicBool>,
    thread: Option<thread::JoinHandle<()>>,
}

impl TestServer {
    /// An HTTP "who are you" server on `bind` (e.g. `"127.0.0.1:0"` or `"[::1]:0"`): each request
    /// `GET /<payload>` is answered with the body `peer=<the peer address it sees>\n<payload>`.
    pub fn echo(bind: &str) -> Self {
        Self::start(bind, Kind::Echo)
    }

    /// A minimal HTTP server answering every request with 200 and `body`.
    pub fn http(bind: &str, body: &str) -> Self {
        Self::start(bind, Kind::Http(Arc::new(body.to_string())))
    }

    fn start(bind: &str, kind: Kind) -> Self {
        let listener = TcpListener::bind(bind)
            .unwrap_or_else(|e| panic!("cannot bind test server {bind}: {e}"));
        let addr = listener
            .local_addr()
            .unwrap_or_else(|e| panic!("test server local_addr: {e}"));
        listener
            .set_nonblocking(true)
            .unwrap_or_else(|e| panic!("test server set_nonblocking: {e}"));
        let accepted = Arc::new(Mutex::new(Vec::new()));
        let stop = Arc::new(AtomicBool::new(false));
        let thread = {
            let accepted = accepted.clone();
            let stop = stop.clone();
            thread::spawn(move || accept_loop(&listener, &kind, &accepted, &stop))
        };
        Self {
            addr,
            accepted,
            stop,
            thread: Some(thread),
        }
    }

    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// Every connection accepted so far, oldest first.
    pub fn accepted(&self) -> Vec<Accepted> {
        self.accepted.lock().map(|a| a.clone()).unwrap_or_default()
    }
}

impl Drop for TestServer {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

fn accept_loop(
    listener: &TcpListener,
    kind: &Kind,
    accepted: &Mutex<Vec<Accepted>>,
    stop: &AtomicBool,
) {
    while !stop.load(Ordering::Relaxed) {
        match listener.accept() {
            Ok((stream, peer)) => {
                // Look the owner up now, while the peer socket certainly exists.
                let owner = tcp_socket_owner(peer);
                if let Ok(mut a) = accepted.lock() {
                    a.push(Accepted { peer, owner });
                }
                let kind = kind.clone();
                thread::spawn(move || {
                    let _ = serve(stream, peer, &kind);
                });
            }
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {
                thread::sleep(Duration::from_millis(5));
            }
            Err(e) => {
                eprintln!("test server accept failed: {e}");
                thread::sleep(Duration::from_millis(20));
            }
        }
    }
}

fn serve(mut stream: TcpStream, peer: SocketAddr, kind: &Kind) -> std::io::Result<()> {
    stream.set_nonblocking(false)?;
    stream.set_read_timeout(Some(Duration::from_secs(10)))?;
    stream.set_write_timeout(Some(Duration::from_secs(10)))?;
    let mut req = Vec::new();
    let mut buf = [0u8; 4096];
    while !req.windows(4).any(|w| w == b"\r\n\r\n") && req.len() < 64 * 1024 {
        let n = stream.read(&mut buf)?;
        if n == 0 {
            return Ok(());
        }
        req.extend_from_slice(&buf[..n]);
    }
    let body = match kind {
        Kind::Echo => {
            // Request line: METHOD SP TARGET SP VERSION.
            let head = String::from_utf8_lossy(&req);
            let target = head.split_whitespace().nth(1).unwrap_or("/");
            format!("peer={peer}\n{}", target.trim_start_matches('/'))
        }
        Kind::Http(body) => body.to_string(),
    };
    let head = format!(
        "HTTP/1.1 200 OK\r\nContent-Type: text/plain\r\nContent-Length: {}\r\n\
         Connection: close\r\n\r\n",
        body.len()
    );
    stream.write_all(head.as_bytes())?;
    stream.write_all(body.as_bytes())?;
    stream.flush()
}

/// The pid of the process that owns the TCP socket whose local address is `local`, found through
/// /proc/net/tcp{,6} (socket inode) and /proc/*/fd (who holds `socket:[inode]`).
pub fn tcp_socket_owner(local: SocketAddr) -> Option<u32> {
    let inode = tcp_socket_inode(local)?;
    let target = format!("socket:[{inode}]");
    for proc_entry in fs::read_dir("/proc").ok()?.flatten() {
        let Some(pid) = proc_entry
            .file_name()
            .to_str()
            .and_then(|s| s.parse::<u32>().ok())
        else {
            continue;
        };
        let Ok(fds) = fs::read_dir(proc_entry.path().join("fd")) else {
            continue;
        };
        for fd in fds.flatten() {
            if fs::read_link(fd.path()).is_ok_and(|l| l.as_os_str() == target.as_str()) {
                return Some(pid);
            }
        }
    }
    None
}

fn tcp_socket_inode(local: SocketAddr) -> Option<u64> {
    let want = canon(local);
    for table in ["/proc/net/tcp", "/proc/net/tcp6"] {
        let Ok(text) = fs::read_to_string(table) else {
            continue;
        };
        for line in text.lines().skip(1) {
            let fields: Vec<&str> = line.split_whitespace().collect();
            let (Some(addr), Some(inode)) = (fields.get(1), fields.get(9)) else {
                continue;
            };
            let Ok(inode) = inode.parse::<u64>() else {
                continue;
            };
            // inode 0: a TIME_WAIT or orphaned entry that no process owns.
            if inode != 0 && parse_proc_net_addr(addr).map(canon) == Some(want) {
                return Some(inode);
            }
        }
    }
    None
}

/// Parses `0100007F:1F90` (IPv4) or 32 hex digits `:PORT` (IPv6). The kernel prints each 32-bit
/// word of the address as a native-endian integer, the port in host order.
fn parse_proc_net_addr(field: &str) -> Option<SocketAddr> {
    let (addr, port) = field.split_once(':')?;
    let port = u16::from_str_radix(port, 16).ok()?;
    let word = |s: &str| u32::from_str_radix(s, 16).ok().map(u32::to_ne_bytes);
    match addr.len() {
        8 => Some(SocketAddr::from((Ipv4Addr::from(word(addr)?), port))),
        32 => {
            let mut octets = [0u8; 16];
            for (i, chunk) in octets.chunks_exact_mut(4).enumerate() {
                chunk.copy_from_slice(&word(addr.get(i * 8..i * 8 + 8)?)?);
            }
            Some(SocketAddr::from((Ipv6Addr::from(octets), port)))
        }
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_proc_net_addresses() {
        #[cfg(target_endian = "little")]
        {
            assert_eq!(
                parse_proc_net_addr("0100007F:1F90"),
                Some("127.0.0.1:8080".parse().expect("addr"))
            );
            assert_eq!(
                parse_proc_net_addr("00000000000000000000000001000000:0050"),
                Some("[::1]:80".parse().expect("addr"))
            );
            assert_eq!(
                parse_proc_net_addr("0000000000000000FFFF00000100007F:0050").map(canon),
                Some("127.0.0.1:80".parse().expect("addr"))
            );
        }
        assert_eq!(parse_proc_net_addr("zz"), None);
    }

    #[test]
    fn finds_the_owner_of_its_own_socket_and_answers_http() {
        let server = TestServer::echo("127.0.0.1:0");
        let mut client = TcpStream::connect(server.addr()).expect("connect");
        let local = client.local_addr().expect("local_addr");
        client
            .write_all(b"GET /hello-42 HTTP/1.1\r\nHost: x\r\n\r\n")
            .expect("write");
        let mut answer = String::new();
        client.read_to_string(&mut answer).expect("read");
        assert!(answer.starts_with("HTTP/1.1 200 OK\r\n"), "{answer}");
        assert!(
            answer.ends_with(&format!("\r\n\r\npeer={local}\nhello-42")),
            "{answer}"
        );
        assert_eq!(tcp_socket_owner(local), Some(std::process::id()));
        let seen = crate::poll_until(Duration::from_secs(5), || {
            server.accepted().first().cloned()
        })
        .expect("server accepted nothing");
        assert_eq!(seen.peer, local);
        assert_eq!(seen.owner, Some(std::process::id()));
    }
}
