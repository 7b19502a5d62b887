//! brokerd's listeners inside a workload's network namespace (issue 14, the Istio ambient /
//! ztunnel in-pod model; `docs/design/netns.md` §2).
//!
//! A workload (a container, or any process tree) with a network namespace of its own cannot
//! reach brokerd's listeners in brokerd's namespace: its loopback is another one. So brokerd
//! opens a TCP proxy listener (v4, and v6 where `::1` binds), the UDP DNS sockets and a
//! sock_diag socket *inside* the workload's namespace, on loopback and on the same ports as its
//! own, and serves them from its own threads. A socket stays in the namespace it was made in
//! whichever thread uses it later, so only a short-lived thread of its own ([`open_in`]) ever
//! enters the workload's namespace: no runtime thread changes namespace, and upstream
//! connections, which runtime threads make, leave from brokerd's.
//!
//! The namespace is entered through a pidfd of a process in it (`pidfd_open` + `setns`), which
//! closes the race of a pid reused between the operator naming it and brokerd entering it.
//!
//! What this module must never do: leave a thread other than its own in a workload's
//! namespace, or report a namespace as served before its sockets exist.

use std::{
    io,
    net::{IpAddr, SocketAddr, UdpSocket},
    os::fd::{AsFd as _, AsRawFd as _, FromRawFd as _, OwnedFd},
    path::Path,
    sync::Mutex,
};

use agent_broker_core::cgroup::{CgroupPath, CgroupRoot};

use super::sock_diag::{self, Diag, DiagSocket};

/// `NS_GET_ID` (`_IOR(0xb7, 0xd, u64)`, Linux 6.x): the id of a namespace file, which for a
/// network namespace is its cookie (the one `SO_NETNS_COOKIE` and `bpf_get_netns_cookie` give;
/// verified on this kernel, netns.md §2.1).
const NS_GET_ID: libc::c_ulong = 0x8008_b70d;

/// Why a workload's namespace could not be served.
#[derive(Debug, thiserror::Error)]
pub enum NetnsError {
    #[error("process {pid}: {source}")]
    Process {
        pid: u32,
        #[source]
        source: io::Error,
    },
    #[error("cannot enter the network namespace: {0}")]
    Enter(#[source] io::Error),
    #[error(
        "the loopback interface `lo` is down in the workload's network namespace: brokerd's \
         listeners there could not be reached (bring lo up, e.g. `ip link set lo up` inside \
         it, or run the container with a network mode that does); nothing is served there and \
         its connections stay refused"
    )]
    LoopbackDown,
    #[error("cannot check the loopback interface in the workload's network namespace: {0}")]
    LoopbackCheck(#[source] io::Error),
    #[error("cannot bind {addr} in the workload's network namespace: {source}")]
    Bind {
        addr: SocketAddr,
        #[source]
        source: io::Error,
    },
    #[error("cannot read the workload's network namespace cookie (SO_NETNS_COOKIE): {0}")]
    Cookie(#[source] io::Error),
    #[error("cannot open a sock_diag socket in the workload's network namespace: {0}")]
    Diag(#[source] io::Error),
    #[error("brokerd has no IPv4 listener to mirror in the workload's network namespace")]
    NoV4,
    #[error("the thread that enters the network namespace failed: {0}")]
    Thread(String),
}

/// The sockets opened inside a workload's network namespace (std sockets, non-blocking, for
/// tokio's `from_std` in a runtime).
pub struct Opened {
    /// The namespace's cookie.
    pub cookie: u64,
    /// TCP listeners: the IPv4 one first, then the IPv6 one where `::1` bound.
    pub tcp: Vec<std::net::TcpListener>,
    /// UDP DNS sockets, one per TCP listener's address.
    pub udp: Vec<UdpSocket>,
    /// A sock_diag socket made in the namespace.
    pub diag: Diag,
}

impl Opened {
    /// Whether an IPv6 listener (`::1`) is open.
    pub fn has_v6(&self) -> bool {
        self.tcp
            .iter()
            .any(|l| l.local_addr().is_ok_and(|a| a.is_ipv6()))
    }
}

/// A pidfd for `pid` (`pidfd_open`, Linux 5.3+).
pub fn pidfd_open(pid: u32) -> Result<OwnedFd, NetnsError> {
    // SAFETY: pidfd_open takes a pid and flags and returns a new fd or -1.
    let fd = unsafe { libc::syscall(libc::SYS_pidfd_open, pid as libc::pid_t, 0) };
    if fd < 0 {
        return Err(NetnsError::Process {
            pid,
            source: io::Error::last_os_error(),
        });
    }
    // SAFETY: the kernel just returned this fd to us; nothing else owns it.
    Ok(unsafe { OwnedFd::from_raw_fd(fd as libc::c_int) })
}

/// Whether the process of `pidfd` is still running (signal 0 through the pidfd). A pid read
/// before this answers true still named that very process.
pub fn pidfd_alive(pidfd: &OwnedFd) -> bool {
    // SAFETY: pidfd_send_signal with signal 0 only checks; the fd is a valid pidfd we own.
    let r = unsafe {
        libc::syscall(
            libc::SYS_pidfd_send_signal,
            pidfd.as_raw_fd(),
            0,
            std::ptr::null::<libc::siginfo_t>(),
            0,
        )
    };
    r == 0
}

/// The cookie of the network namespace a namespace file names (`/proc/<pid>/ns/net`), read
/// without entering it.
pub fn netns_id(path: &Path) -> io::Result<u64> {
    let file = std::fs::File::open(path)?;
    // SAFETY: NS_GET_ID writes one u64 to the pointer; the fd is a namespace file we hold.
    let mut id: u64 = 0;
    let r = unsafe { libc::ioctl(file.as_raw_fd(), NS_GET_ID, &mut id as *mut u64) };
    if r != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(id)
}

/// The network namespace cookie of a socket (`SO_NETNS_COOKIE`, Linux 5.14+).
pub fn socket_netns_cookie(socket: &impl std::os::fd::AsRawFd) -> io::Result<u64> {
    let mut cookie: u64 = 0;
    let mut len = std::mem::size_of::<u64>() as libc::socklen_t;
    // SAFETY: getsockopt writes at most `len` bytes into `cookie`, a valid u64.
    let r = unsafe {
        libc::getsockopt(
            socket.as_raw_fd(),
            libc::SOL_SOCKET,
            libc::SO_NETNS_COOKIE,
            &mut cookie as *mut u64 as *mut libc::c_void,
            &mut len,
        )
    };
    if r != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(cookie)
}

/// Opens brokerd's listeners in the network namespace of the process `pidfd` refers to (or the
/// namespace file `ns` names): a TCP listener on each of `listen`'s addresses with its port (an
/// IPv6 one only where it binds), a UDP DNS socket on each bound address at `dns_port` (none
/// when 0), and a sock_diag socket. Runs on a thread of its own, which is the only one that
/// enters the namespace and which exits afterwards.
///
/// `Ok(None)`: the namespace is `host_cookie`'s, brokerd's own (nothing to open).
pub fn open_in(
    ns: OwnedFd,
    host_cookie: u64,
    listen: Vec<SocketAddr>,
    dns_port: u16,
) -> Result<Option<Opened>, NetnsError> {
    std::thread::Builder::new()
        .name("netns-open".into())
        .spawn(move || -> Result<Option<Opened>, NetnsError> {
            nix::sched::setns(ns.as_fd(), nix::sched::CloneFlags::CLONE_NEWNET)
                .map_err(|e| NetnsError::Enter(io::Error::from(e)))?;
            let probe = UdpSocket::bind("127.0.0.1:0").map_err(NetnsError::Cookie)?;
            let cookie = socket_netns_cookie(&probe).map_err(NetnsError::Cookie)?;
            if cookie == host_cookie {
                return Ok(None);
            }
            if !loopback_up().map_err(NetnsError::LoopbackCheck)? {
                return Err(NetnsError::LoopbackDown);
            }
            open_here(cookie, &listen, dns_port).map(Some)
        })
        .map_err(|e| NetnsError::Thread(e.to_string()))?
        .join()
        .map_err(|_| NetnsError::Thread("it panicked".into()))?
}

/// Opens the sockets in the calling thread's namespace, whose cookie is `cookie`.
fn open_here(cookie: u64, listen: &[SocketAddr], dns_port: u16) -> Result<Opened, NetnsError> {
    let mut tcp = Vec::new();
    for addr in listen {
        match std::net::TcpListener::bind(addr) {
            Ok(l) => {
                l.set_nonblocking(true).map_err(|source| NetnsError::Bind {
                    addr: *addr,
                    source,
                })?;
                tcp.push(l);
            }
            // No `::1` there: IPv6 connects go to the IPv4 listener's v4-mapped address.
            Err(_) if addr.is_ipv6() => {}
            Err(source) => {
                return Err(NetnsError::Bind {
                    addr: *addr,
                    source,
                });
            }
        }
    }
    if !tcp
        .iter()
        .any(|l| l.local_addr().is_ok_and(|a| a.is_ipv4()))
    {
        return Err(NetnsError::NoV4);
    }
    let mut udp = Vec::new();
    if dns_port != 0 {
        for l in &tcp {
            let ip = l
                .local_addr()
                .map_err(|source| NetnsError::Bind {
                    addr: SocketAddr::new(IpAddr::from([127, 0, 0, 1]), dns_port),
                    source,
                })?
                .ip();
            let addr = SocketAddr::new(ip, dns_port);
            let s = UdpSocket::bind(addr).map_err(|source| NetnsError::Bind { addr, source })?;
            s.set_nonblocking(true)
                .map_err(|source| NetnsError::Bind { addr, source })?;
            udp.push(s);
        }
    }
    let diag = Diag::open().map_err(NetnsError::Diag)?;
    Ok(Opened {
        cookie,
        tcp,
        udp,
        diag,
    })
}

/// Whether `lo` is up in the calling thread's network namespace (`SIOCGIFFLAGS`). With lo
/// down, a bind to 127.0.0.1 succeeds but a connect to it fails (`ENETUNREACH`, netns.md §2.1).
fn loopback_up() -> io::Result<bool> {
    let socket = UdpSocket::bind("127.0.0.1:0")?;
    // SAFETY: an all-zero ifreq is a valid value (a name and a union of plain integers).
    let mut req: libc::ifreq = unsafe { std::mem::zeroed() };
    for (dst, src) in req.ifr_name.iter_mut().zip(b"lo\0") {
        *dst = *src as libc::c_char;
    }
    // SAFETY: SIOCGIFFLAGS reads the name and writes the flags into `req`, which we own.
    let r = unsafe { libc::ioctl(socket.as_raw_fd(), libc::SIOCGIFFLAGS, &mut req) };
    if r != 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: SIOCGIFFLAGS filled the flags member of the union.
    let flags = unsafe { req.ifr_ifru.ifru_flags };
    Ok(flags & libc::IFF_UP as libc::c_short != 0)
}

/// The network namespace an accepted connection or a received datagram came from, and how to
/// ask the kernel about its sockets there.
pub struct NetnsCtx {
    /// The namespace's cookie: the netns part of the redirect records' keys.
    pub cookie: u64,
    /// A sock_diag socket made in a workload's namespace; `None` for brokerd's own, whose
    /// lookups use each thread's own socket (the fast path).
    diag: Option<Mutex<Diag>>,
    /// An unprivileged sandbox's namespace: whose its connections are, with no redirect record
    /// to look up (see [`super::original_dst`]).
    sandbox: Option<super::original_dst::SandboxAgent>,
}

impl NetnsCtx {
    /// brokerd's own namespace.
    pub fn host(cookie: u64) -> Self {
        Self {
            cookie,
            diag: None,
            sandbox: None,
        }
    }

    /// A workload's namespace, with a sock_diag socket made there.
    pub fn workload(cookie: u64, diag: Diag) -> Self {
        Self {
            cookie,
            diag: Some(Mutex::new(diag)),
            sandbox: None,
        }
    }

    /// An unprivileged sandbox's namespace, all of whose connections are `agent`'s.
    pub fn sandbox(cookie: u64, agent: super::original_dst::SandboxAgent) -> Self {
        Self {
            cookie,
            diag: None,
            sandbox: Some(agent),
        }
    }

    /// The sandbox's agent, for an unprivileged sandbox's namespace.
    pub fn sandbox_agent(&self) -> Option<&super::original_dst::SandboxAgent> {
        self.sandbox.as_ref()
    }

    /// Whether this is a workload's namespace (not brokerd's own).
    pub fn is_workload(&self) -> bool {
        self.diag.is_some()
    }

    /// The socket at the far end of the connection `near` -> `far` in this namespace.
    pub fn far_end(&self, near: SocketAddr, far: SocketAddr) -> io::Result<Option<DiagSocket>> {
        match &self.diag {
            None => sock_diag::far_end(near, far),
            Some(diag) => {
                let mut diag = diag
                    .lock()
                    .map_err(|_| io::Error::other("sock_diag lock poisoned"))?;
                sock_diag::far_end_with(&mut diag, near, far)
            }
        }
    }

    /// The cookies of every TCP socket in this namespace.
    pub fn tcp_cookies(&self) -> io::Result<std::collections::HashSet<u64>> {
        match &self.diag {
            None => sock_diag::tcp_cookies(),
            Some(diag) => {
                let mut diag = diag
                    .lock()
                    .map_err(|_| io::Error::other("sock_diag lock poisoned"))?;
                sock_diag::tcp_cookies_with(&mut diag)
            }
        }
    }
}

/// Whether a workload may be sent where it asked to go: from a workload's namespace, a loopback
/// or unspecified destination names that namespace's own loopback, and brokerd, which dials
/// from its own, would reach a different service (the host's). Refused in v1 (netns.md
/// decision 6).
pub fn loopback_in_workload(dst: SocketAddr) -> bool {
    let ip = match dst.ip() {
        IpAddr::V6(v6) => v6.to_ipv4_mapped().map_or(IpAddr::V6(v6), IpAddr::V4),
        ip => ip,
    };
    ip.is_loopback() || ip.is_unspecified()
}

/// The reason recorded when [`loopback_in_workload`] refuses.
pub const LOOPBACK_REFUSED: &str =
    "loopback destination inside a container's network namespace: not brokered";

/// The processes of `cgroup` and every cgroup below it.
pub fn member_pids(root: &CgroupRoot, cgroup: &CgroupPath) -> Vec<u32> {
    let mut out = Vec::new();
    let mut dirs = vec![root.dir(cgroup)];
    while let Some(dir) = dirs.pop() {
        if let Ok(text) = std::fs::read_to_string(dir.join("cgroup.procs")) {
            out.extend(text.lines().filter_map(|l| l.trim().parse::<u32>().ok()));
        }
        if let Ok(entries) = std::fs::read_dir(&dir) {
            for e in entries.flatten() {
                if e.file_type().is_ok_and(|t| t.is_dir()) {
                    dirs.push(e.path());
                }
            }
        }
        if out.len() > 100_000 {
            break;
        }
    }
    out
}

/// The `populated` value of a `cgroup.events` file's text.
pub fn populated(events: &str) -> Option<bool> {
    events.lines().find_map(|l| {
        let (key, value) = l.split_once(' ')?;
        (key == "populated").then(|| value.trim() == "1")
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn a(s: &str) -> SocketAddr {
        s.parse().expect("addr")
    }

    #[test]
    fn loopback_and_unspecified_destinations_are_the_workloads_own() {
        for dst in [
            "127.0.0.1:8080",
            "127.9.9.9:1",
            "[::1]:443",
            "0.0.0.0:80",
            "[::]:80",
            "[::ffff:127.0.0.1]:8080",
            "[::ffff:0.0.0.0]:8080",
        ] {
            assert!(loopback_in_workload(a(dst)), "{dst}");
        }
        for dst in ["10.1.2.3:443", "[2001:db8::1]:443", "[::ffff:10.0.0.1]:443"] {
            assert!(!loopback_in_workload(a(dst)), "{dst}");
        }
    }

    #[test]
    fn parses_populated() {
        assert_eq!(populated("populated 1\nfrozen 0\n"), Some(true));
        assert_eq!(populated("populated 0\nfrozen 0\n"), Some(false));
        assert_eq!(populated("frozen 0\n"), None);
    }
}
