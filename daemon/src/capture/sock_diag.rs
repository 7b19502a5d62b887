//! Which socket is at the other end of a TCP connection on this host, through the kernel's
//! sock_diag netlink interface (`NETLINK_SOCK_DIAG`, `inet_diag`): its cookie, state and
//! cgroup.
//!
//! Two connections of brokerd need this. An accepted one: is its far end the very agent socket
//! the eBPF programs recorded (by cookie), or another socket that merely took the same address?
//! And an upstream one brokerd made over plain HTTP: is the listener that answered an agent's
//! (by the cgroup the kernel recorded when the socket was made)?
//!
//! And `status`: which sockets held by processes in tagged cgroups were made outside them
//! ([`inet_sockets`], matched by inode against /proc/<pid>/fd; see the control module
//! `outside_sockets`).
//!
//! The lookup is exact: the kernel finds the socket by the connection's address pair in the
//! network namespace brokerd runs in (where its loopback listeners are), the same table the
//! kernel delivers packets by. Each thread keeps one netlink socket; the kernel answers a query
//! within the `send`, so a lookup is two system calls.

use std::{
    cell::RefCell,
    collections::HashSet,
    io,
    net::{IpAddr, SocketAddr},
    os::fd::AsRawFd as _,
    time::Duration,
};

use netlink_packet_core::{
    NLM_F_DUMP, NLM_F_REQUEST, NetlinkHeader, NetlinkMessage, NetlinkPayload, Nla as _,
};
use netlink_packet_sock_diag::{
    SockDiagMessage,
    constants::{AF_INET, AF_INET6, IPPROTO_TCP, IPPROTO_UDP},
    inet::{ExtensionFlags, InetRequest, InetResponse, SocketId, StateFlags, nlas::Nla},
};
use netlink_sys::{Socket, SocketAddr as NetlinkAddr, protocols::NETLINK_SOCK_DIAG};

/// `INET_DIAG_CGROUP_ID` (Linux 5.8+): the cgroup v2 id of the socket, recorded when it was
/// created (an accepted socket has its listener's). Full sockets only: the kernel sends none for
/// a connection still in its handshake (`SYN_RECV`) or in `TIME_WAIT`.
const INET_DIAG_CGROUP_ID: u16 = 21;
/// Every cookie bit set: "any socket with this address pair".
const NO_COOKIE: [u8; 8] = [0xff; 8];
/// How long a reply may take (the kernel answers within the request; this bounds a surprise).
const REPLY_TIMEOUT: Duration = Duration::from_secs(2);
/// TCP states, as `inet_diag` reports them.
pub const TCP_SYN_RECV: u8 = 3;
pub const TCP_TIME_WAIT: u8 = 6;
pub const TCP_LISTEN: u8 = 10;

/// A socket as sock_diag reports it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct DiagSocket {
    /// The socket cookie (the same one `bpf_get_socket_cookie` and `SO_COOKIE` give).
    pub cookie: u64,
    /// TCP state (`TCP_ESTABLISHED` = 1, ... [`TCP_LISTEN`]).
    pub state: u8,
    /// The cgroup the socket was created in; `None` where the kernel sends none (see
    /// [`INET_DIAG_CGROUP_ID`]).
    pub cgroup_id: Option<u64>,
    /// The socket's own address (`idiag_src`).
    pub local: SocketAddr,
    /// Its peer (`idiag_dst`); unspecified for a listener.
    pub remote: SocketAddr,
    /// The socket's inode (`socket:[inode]` in /proc/<pid>/fd).
    pub inode: u32,
}

/// The transport of a socket in a dump.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Transport {
    Tcp,
    Udp,
}

/// `TCPF_BOUND_INACTIVE` (Linux 6.6+): also dump TCP sockets that are bound but neither
/// listening nor connected. Older kernels ignore the bit.
const TCP_BOUND_INACTIVE: u32 = 1 << 13;

thread_local! {
    static SOCKET: RefCell<Option<Diag>> = const { RefCell::new(None) };
}

/// The socket at the far end of the local TCP connection `near` -> `far`: the one whose own
/// address is `far` and whose peer is `near`. `Ok(None)` when this host's network namespace has
/// no such connection socket (the far end is another host, or gone).
pub fn far_end(near: SocketAddr, far: SocketAddr) -> io::Result<Option<DiagSocket>> {
    SOCKET.with(|cell| {
        let mut slot = cell.borrow_mut();
        if slot.is_none() {
            *slot = Some(Diag::open()?);
        }
        let Some(diag) = slot.as_mut() else {
            return Err(io::Error::other("sock_diag socket missing"));
        };
        let found = far_end_with(diag, near, far);
        if found.is_err() {
            // A socket left in an unknown state is not reused.
            *slot = None;
        }
        found
    })
}

/// [`far_end`] through `diag`, which answers for the network namespace it was made in (a
/// workload's: see [`Diag::open_in_fd`]).
pub fn far_end_with(
    diag: &mut Diag,
    near: SocketAddr,
    far: SocketAddr,
) -> io::Result<Option<DiagSocket>> {
    let found = diag.exact(far, near)?;
    // Without an exact match the kernel answers with the listener that would take a new
    // connection to `far` (a wildcard listener matches any address): that is not the far
    // end of this connection.
    Ok(found.filter(|s| s.state != TCP_LISTEN && s.local == far && s.remote == near))
}

/// The cookies of every TCP socket in the network namespace `diag` was made in.
pub fn tcp_cookies_with(diag: &mut Diag) -> io::Result<HashSet<u64>> {
    let mut cookies = HashSet::new();
    for family in [AF_INET, AF_INET6] {
        diag.dump(family, |s| {
            cookies.insert(s.cookie);
        })?;
    }
    Ok(cookies)
}

/// The cookies of every TCP socket (any state, both families) in this network namespace.
pub fn tcp_cookies() -> io::Result<HashSet<u64>> {
    tcp_cookies_with(&mut Diag::open()?)
}

/// Every TCP and UDP socket (both families, any state, bound-only TCP sockets included where
/// the kernel lists them) in the network namespace `netns` names (a `/proc/<pid>/ns/net`
/// file), or in brokerd's own with `None`. Sockets neither bound nor connected are in no table
/// the kernel dumps.
pub fn inet_sockets(netns: Option<&std::path::Path>) -> io::Result<Vec<(Transport, DiagSocket)>> {
    let mut diag = match netns {
        None => Diag::open()?,
        Some(ns) => Diag::open_in(ns)?,
    };
    let mut out = Vec::new();
    for (transport, protocol) in [(Transport::Tcp, IPPROTO_TCP), (Transport::Udp, IPPROTO_UDP)] {
        for family in [AF_INET, AF_INET6] {
            diag.dump_protocol(family, protocol, |s| out.push((transport, s)))?;
        }
    }
    Ok(out)
}

/// One netlink socket talking sock_diag, answering for the network namespace it was made in.
pub struct Diag {
    socket: Socket,
    sequence: u32,
    buf: Vec<u8>,
}

impl Diag {
    /// A sock_diag socket in the calling thread's network namespace.
    pub fn open() -> io::Result<Self> {
        let mut socket = Socket::new(NETLINK_SOCK_DIAG)?;
        socket.bind_auto()?;
        socket.connect(&NetlinkAddr::new(0, 0))?;
        let tv = libc::timeval {
            tv_sec: REPLY_TIMEOUT.as_secs() as libc::time_t,
            tv_usec: 0,
        };
        // SAFETY: a valid timeval for SO_RCVTIMEO on a socket we own.
        let r = unsafe {
            libc::setsockopt(
                socket.as_raw_fd(),
                libc::SOL_SOCKET,
                libc::SO_RCVTIMEO,
                &tv as *const libc::timeval as *const libc::c_void,
                std::mem::size_of::<libc::timeval>() as libc::socklen_t,
            )
        };
        if r != 0 {
            return Err(io::Error::last_os_error());
        }
        Ok(Self {
            socket,
            sequence: 0,
            buf: Vec::with_capacity(64 * 1024),
        })
    }

    /// A sock_diag socket in the network namespace `netns` names: made on a thread of its own
    /// that enters the namespace (a socket stays in the namespace it was made in), so no thread
    /// of brokerd's changes namespace.
    fn open_in(netns: &std::path::Path) -> io::Result<Self> {
        let ns = std::fs::File::open(netns)?;
        std::thread::Builder::new()
            .name("sock-diag-netns".into())
            .spawn(move || {
                nix::sched::setns(&ns, nix::sched::CloneFlags::CLONE_NEWNET)
                    .map_err(io::Error::from)?;
                Self::open()
            })?
            .join()
            .map_err(|_| io::Error::other("the sock_diag netns thread panicked"))?
    }

    /// The socket whose own address is `local` and whose peer is `remote` (or, failing that, the
    /// listener the kernel would pick for `local`).
    fn exact(&mut self, local: SocketAddr, remote: SocketAddr) -> io::Result<Option<DiagSocket>> {
        let (family, local, remote) = same_family(local, remote);
        let request = InetRequest {
            family,
            protocol: IPPROTO_TCP,
            extensions: ExtensionFlags::empty(),
            states: StateFlags::all(),
            socket_id: SocketId {
                source_port: local.port(),
                destination_port: remote.port(),
                source_address: local.ip(),
                destination_address: remote.ip(),
                interface_id: 0,
                cookie: NO_COOKIE,
            },
        };
        let mut found = None;
        match self.exchange(request, NLM_F_REQUEST, |s| found = Some(s)) {
            Ok(()) => Ok(found),
            Err(e) if e.raw_os_error() == Some(libc::ENOENT) => Ok(None),
            Err(e) => Err(e),
        }
    }

    /// Every TCP socket of `family`.
    fn dump(&mut self, family: u8, each: impl FnMut(DiagSocket)) -> io::Result<()> {
        self.dump_protocol(family, IPPROTO_TCP, each)
    }

    /// Every socket of `family` and `protocol` (TCP or UDP).
    fn dump_protocol(
        &mut self,
        family: u8,
        protocol: u8,
        each: impl FnMut(DiagSocket),
    ) -> io::Result<()> {
        let request = InetRequest {
            family,
            protocol,
            extensions: ExtensionFlags::empty(),
            states: StateFlags::from_bits_retain(StateFlags::all().bits() | TCP_BOUND_INACTIVE),
            socket_id: if family == AF_INET {
                SocketId::new_v4()
            } else {
                SocketId::new_v6()
            },
        };
        self.exchange(request, NLM_F_REQUEST | NLM_F_DUMP, each)
    }

    /// Sends `request` and hands each socket of the answer to `each`, until the answer ends (a
    /// single reply, or a dump's done message). A netlink error comes back as its errno.
    fn exchange(
        &mut self,
        request: InetRequest,
        flags: u16,
        mut each: impl FnMut(DiagSocket),
    ) -> io::Result<()> {
        self.sequence = self.sequence.wrapping_add(1);
        let sequence = self.sequence;
        let mut header = NetlinkHeader::default();
        header.flags = flags;
        header.sequence_number = sequence;
        let mut message = NetlinkMessage::new(header, SockDiagMessage::InetRequest(request).into());
        message.finalize();
        let mut out = vec![0u8; message.buffer_len()];
        message.serialize(&mut out);
        self.socket.send(&out, 0)?;
        let dump = flags & NLM_F_DUMP != 0;
        loop {
            self.buf.clear();
            let len = self.socket.recv(&mut self.buf, 0)?;
            let mut at = 0;
            while at < len.min(self.buf.len()) {
                let reply = NetlinkMessage::<SockDiagMessage>::deserialize(&self.buf[at..])
                    .map_err(|e| io::Error::other(format!("bad sock_diag reply: {e}")))?;
                let size = reply.header.length as usize;
                if size == 0 {
                    break;
                }
                at += size;
                if reply.header.sequence_number != sequence {
                    // The answer to an earlier request that timed out.
                    continue;
                }
                match reply.payload {
                    NetlinkPayload::InnerMessage(SockDiagMessage::InetResponse(r)) => {
                        each(diag_socket(&r));
                        if !dump {
                            return Ok(());
                        }
                    }
                    NetlinkPayload::Done(_) => return Ok(()),
                    NetlinkPayload::Error(e) => {
                        return match e.code {
                            None => Ok(()),
                            Some(_) => Err(e.to_io()),
                        };
                    }
                    _ => {}
                }
            }
        }
    }
}

/// Both addresses in one family: IPv4 when both are IPv4 (or v4-mapped), else IPv6 (an IPv4
/// address as v4-mapped).
fn same_family(a: SocketAddr, b: SocketAddr) -> (u8, SocketAddr, SocketAddr) {
    let (a, b) = (canonical(a), canonical(b));
    if a.is_ipv4() && b.is_ipv4() {
        return (AF_INET, a, b);
    }
    let v6 = |s: SocketAddr| match s.ip() {
        IpAddr::V4(v4) => SocketAddr::new(IpAddr::V6(v4.to_ipv6_mapped()), s.port()),
        IpAddr::V6(_) => s,
    };
    (AF_INET6, v6(a), v6(b))
}

/// A v4-mapped IPv6 address as the IPv4 address it is.
pub fn canonical(addr: SocketAddr) -> SocketAddr {
    match addr.ip() {
        IpAddr::V6(v6) => match v6.to_ipv4_mapped() {
            Some(v4) => SocketAddr::new(IpAddr::V4(v4), addr.port()),
            None => addr,
        },
        IpAddr::V4(_) => addr,
    }
}

fn diag_socket(r: &InetResponse) -> DiagSocket {
    let id = &r.header.socket_id;
    let c = id.cookie;
    let low = u32::from_ne_bytes([c[0], c[1], c[2], c[3]]);
    let high = u32::from_ne_bytes([c[4], c[5], c[6], c[7]]);
    let cgroup_id = r.nlas.iter().find_map(|nla| match nla {
        Nla::Other(other) if other.kind() == INET_DIAG_CGROUP_ID && other.value_len() == 8 => {
            let mut value = [0u8; 8];
            other.emit_value(&mut value);
            Some(u64::from_ne_bytes(value))
        }
        _ => None,
    });
    DiagSocket {
        cookie: (u64::from(high) << 32) | u64::from(low),
        state: r.header.state,
        cgroup_id,
        local: canonical(SocketAddr::new(id.source_address, id.source_port)),
        remote: canonical(SocketAddr::new(id.destination_address, id.destination_port)),
        inode: r.header.inode,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::net::{TcpListener, TcpStream};

    /// `SO_COOKIE` of a socket of this process.
    fn own_cookie(socket: &impl std::os::fd::AsRawFd) -> io::Result<u64> {
        let mut cookie: u64 = 0;
        let mut len = std::mem::size_of::<u64>() as libc::socklen_t;
        // SAFETY: getsockopt writes at most `len` bytes into `cookie`, a valid u64.
        let r = unsafe {
            libc::getsockopt(
                socket.as_raw_fd(),
                libc::SOL_SOCKET,
                libc::SO_COOKIE,
                &mut cookie as *mut u64 as *mut libc::c_void,
                &mut len,
            )
        };
        if r != 0 {
            return Err(io::Error::last_os_error());
        }
        Ok(cookie)
    }

    /// The cgroup v2 id of this process (the inode of its cgroup directory), when cgroup2 is
    /// mounted where /proc/self/mountinfo says.
    fn own_cgroup_id() -> Option<u64> {
        use std::os::unix::fs::MetadataExt as _;
        let rel = std::fs::read_to_string("/proc/self/cgroup")
            .ok()?
            .lines()
            .find_map(|l| l.strip_prefix("0::").map(str::to_owned))?;
        let mountinfo = std::fs::read_to_string("/proc/self/mountinfo").ok()?;
        let mount = mountinfo.lines().find_map(|line| {
            let (left, right) = line.split_once(" - ")?;
            (right.split_whitespace().next() == Some("cgroup2"))
                .then(|| left.split_whitespace().nth(4).map(str::to_owned))?
        })?;
        let dir = format!("{mount}{rel}");
        std::fs::metadata(dir).ok().map(|m| m.ino())
    }

    #[test]
    fn the_far_end_of_a_loopback_connection_is_the_dialing_socket() {
        for bind in ["127.0.0.1:0", "[::1]:0"] {
            let listener = TcpListener::bind(bind).expect("listen");
            let client = TcpStream::connect(listener.local_addr().expect("addr")).expect("dial");
            let (accepted, peer) = listener.accept().expect("accept");
            let near = accepted.local_addr().expect("local");
            let found = far_end(near, peer)
                .expect("sock_diag")
                .unwrap_or_else(|| panic!("{bind}: no far end found for {near} <- {peer}"));
            assert_eq!(
                found.cookie,
                own_cookie(&client).expect("SO_COOKIE"),
                "{bind}"
            );
            assert_ne!(
                found.cookie,
                own_cookie(&accepted).expect("SO_COOKIE"),
                "{bind}"
            );
            assert_eq!((found.local, found.remote), (peer, near), "{bind}");
            assert_eq!(found.state, 1, "{bind}: ESTABLISHED");
            if let Some(own) = own_cgroup_id() {
                assert_eq!(found.cgroup_id, Some(own), "{bind}: the client's cgroup");
            }
            // And from the client's side, the far end is the accepted socket.
            let back = far_end(peer, near).expect("sock_diag").expect("far end");
            assert_eq!(back.cookie, own_cookie(&accepted).expect("SO_COOKIE"));
        }
    }

    #[test]
    fn a_v4_mapped_client_is_found_through_the_ipv4_listener() {
        let listener = TcpListener::bind("127.0.0.1:0").expect("listen");
        let port = listener.local_addr().expect("addr").port();
        let client = TcpStream::connect(("::ffff:127.0.0.1", port)).expect("dial v4-mapped");
        let (accepted, peer) = listener.accept().expect("accept");
        let near = accepted.local_addr().expect("local");
        let found = far_end(near, peer).expect("sock_diag").expect("far end");
        assert_eq!(found.cookie, own_cookie(&client).expect("SO_COOKIE"));
    }

    #[test]
    fn another_socket_on_the_same_address_is_not_the_far_end() {
        // The far end of a connection is found by the whole address pair: a second connection
        // from the same local address (SO_REUSEADDR) to another listener has its own cookie.
        let a = TcpListener::bind("127.0.0.1:0").expect("listen a");
        let b = TcpListener::bind("127.0.0.1:0").expect("listen b");
        let bind_reused = |to: SocketAddr, from: Option<SocketAddr>| {
            let s = nix::sys::socket::socket(
                nix::sys::socket::AddressFamily::Inet,
                nix::sys::socket::SockType::Stream,
                nix::sys::socket::SockFlag::SOCK_CLOEXEC,
                None,
            )
            .expect("socket");
            nix::sys::socket::setsockopt(&s, nix::sys::socket::sockopt::ReuseAddr, &true)
                .expect("SO_REUSEADDR");
            let from = from.unwrap_or_else(|| "127.0.0.1:0".parse().expect("addr"));
            nix::sys::socket::bind(
                s.as_raw_fd(),
                &nix::sys::socket::SockaddrStorage::from(from),
            )
            .expect("bind");
            nix::sys::socket::connect(s.as_raw_fd(), &nix::sys::socket::SockaddrStorage::from(to))
                .expect("connect");
            TcpStream::from(s)
        };
        let first = bind_reused(a.local_addr().expect("a"), None);
        let shared = first.local_addr().expect("first's address");
        let second = bind_reused(b.local_addr().expect("b"), Some(shared));
        let (at_a, peer_a) = a.accept().expect("accept a");
        let (at_b, peer_b) = b.accept().expect("accept b");
        assert_eq!(peer_a, peer_b, "both connections come from one address");
        let far_a = far_end(at_a.local_addr().expect("a"), peer_a)
            .expect("sock_diag")
            .expect("far end a");
        let far_b = far_end(at_b.local_addr().expect("b"), peer_b)
            .expect("sock_diag")
            .expect("far end b");
        assert_eq!(far_a.cookie, own_cookie(&first).expect("cookie"));
        assert_eq!(far_b.cookie, own_cookie(&second).expect("cookie"));
        assert_ne!(far_a.cookie, far_b.cookie);
    }

    #[test]
    fn a_closed_connection_or_a_remote_address_has_no_far_end() {
        let listener = TcpListener::bind("127.0.0.1:0").expect("listen");
        let client = TcpStream::connect(listener.local_addr().expect("addr")).expect("dial");
        let (accepted, peer) = listener.accept().expect("accept");
        let near = accepted.local_addr().expect("local");
        // SO_LINGER 0: close with a reset, no TIME_WAIT left behind.
        nix::sys::socket::setsockopt(
            &client,
            nix::sys::socket::sockopt::Linger,
            &libc::linger {
                l_onoff: 1,
                l_linger: 0,
            },
        )
        .expect("SO_LINGER");
        drop(client);
        let gone = far_end(near, peer).expect("sock_diag");
        assert!(gone.is_none(), "the client socket is gone: {gone:?}");
        // A listener on the far address does not count as the far end of a connection.
        let wild = TcpListener::bind("0.0.0.0:0").expect("wildcard listener");
        let port = wild.local_addr().expect("addr").port();
        let remote: SocketAddr = SocketAddr::from(([192, 0, 2, 1], port));
        let none = far_end(near, remote).expect("sock_diag");
        assert!(none.is_none(), "{none:?}");
    }

    #[test]
    fn the_dump_lists_live_sockets() {
        let listener = TcpListener::bind("127.0.0.1:0").expect("listen");
        let listener6 = TcpListener::bind("[::1]:0").expect("listen6");
        let cookies = tcp_cookies().expect("dump");
        assert!(cookies.contains(&own_cookie(&listener).expect("cookie")));
        assert!(cookies.contains(&own_cookie(&listener6).expect("cookie")));
    }

    #[test]
    fn families_are_made_the_same() {
        let v4: SocketAddr = "127.0.0.1:1".parse().expect("addr");
        let mapped: SocketAddr = "[::ffff:127.0.0.1]:2".parse().expect("addr");
        let v6: SocketAddr = "[::1]:3".parse().expect("addr");
        assert_eq!(
            same_family(v4, mapped),
            (AF_INET, v4, "127.0.0.1:2".parse().expect("addr"))
        );
        assert_eq!(
            same_family(v4, v6),
            (AF_INET6, "[::ffff:127.0.0.1]:1".parse().expect("addr"), v6)
        );
    }
}
