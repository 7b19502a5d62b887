//! The sandboxes of the unprivileged capture mode (issue 19; the handoff is
//! `agent_broker_protocol::sandbox`): `brokerctl run --unprivileged --as NAME` opens a TCP
//! listener and DNS sockets inside its agent's network namespace, where a nat rule redirects
//! every connect and DNS datagram to them, and hands them to brokerd on `<run-dir>/sandbox.sock`.
//! brokerd serves them like its own listeners, with every connection attributed to `NAME`
//! ([`crate::capture::original_dst`]), until brokerctl closes that connection.
//!
//! What is checked before anything is served (a refusal serves nothing and says why):
//! - the peer is brokerd's user (or root), and runs in brokerd's user namespace: a process in a
//!   sandbox (a nested user namespace) may not hand over sockets;
//! - the hello is one JSON line of at most `MAX_HELLO` bytes, with as many sockets attached as it
//!   lists, at most `MAX_SANDBOX_SOCKETS`;
//! - each socket is what the hello says (a listening TCP socket, a bound UDP socket), all are in
//!   one network namespace, that namespace is not brokerd's own, and the named process is in it.
//!
//! Release: the handoff connection's end (brokerctl exited, or died) cancels the accept and DNS
//! tasks, which drops brokerd's copies of the sockets: from then on the agent's connects are
//! refused (nothing else listens in its namespace), never sent direct.

use std::{
    collections::BTreeMap,
    io::{self, IoSliceMut},
    net::SocketAddr,
    os::fd::{AsFd as _, AsRawFd as _, FromRawFd as _, OwnedFd, RawFd},
    path::{Path, PathBuf},
    sync::{Arc, Mutex, Weak},
    time::Duration,
};

use agent_broker_core::{cgroup::CgroupPath, time::now_unix_ms};
use agent_broker_protocol::{
    AuditEvent, Decision, EventKind, Side, WorkloadStatus,
    sandbox::{
        MAX_HELLO, MAX_SANDBOX_SOCKETS, SANDBOX_SOCKET, SandboxHello, SandboxReply, SandboxSocket,
    },
};
use nix::sys::socket::{self, ControlMessageOwned, MsgFlags, sockopt};
use tokio::{
    io::{AsyncReadExt as _, AsyncWriteExt as _, Interest},
    net::{UnixListener, UnixStream},
};
use tokio_util::sync::CancellationToken;
use tracing::{info, warn};

use crate::{
    audit::EventSink,
    capture::{
        netns::{self, NetnsCtx},
        original_dst::SandboxAgent,
    },
    dns::DnsServer,
    proxy::accept::{self, Dispatch},
};

/// How long brokerctl has to send its hello after connecting.
const HELLO_TIMEOUT: Duration = Duration::from_secs(5);

/// Why a hello is refused.
#[derive(Debug, thiserror::Error)]
pub enum HelloError {
    #[error("uid {0} may not hand sandboxes to this brokerd (it runs as uid {1})")]
    Uid(u32, u32),
    #[error(
        "the peer process runs in another user namespace than brokerd (a process inside a \
         sandbox?): refused"
    )]
    UserNamespace,
    #[error("cannot identify the peer: {0}")]
    Peer(String),
    #[error("no hello within {0:?}")]
    Timeout(Duration),
    #[error("cannot receive the hello: {0}")]
    Receive(#[source] io::Error),
    #[error("the connection closed before a hello")]
    Closed,
    #[error("the hello is not one JSON line of at most {MAX_HELLO} bytes ending in a newline")]
    Framing,
    #[error("malformed hello: {0}")]
    Json(#[source] serde_json::Error),
    #[error("the hello lists {listed} sockets and {attached} are attached")]
    Count { listed: usize, attached: usize },
    #[error("the hello lists no TCP listener")]
    NoListener,
    #[error("at most {MAX_SANDBOX_SOCKETS} sockets may be attached")]
    TooMany,
    #[error("agent name {name:?}: {message}")]
    Name { name: String, message: String },
    #[error("socket {index} ({kind:?}): {message}")]
    Socket {
        index: usize,
        kind: SandboxSocket,
        message: String,
    },
    #[error(
        "the sockets are in brokerd's own network namespace: a sandbox's must be made in its own"
    )]
    HostNamespace,
    #[error("the sockets are not all in one network namespace")]
    MixedNamespaces,
    #[error(
        "process {pid} is not in the sockets' network namespace ({reason}): name the sandbox's \
         own process"
    )]
    Process { pid: u32, reason: String },
    #[error("brokerd is shutting down")]
    ShuttingDown,
}

/// One served sandbox.
struct Served {
    status: WorkloadStatus,
}

/// The served sandboxes.
pub struct Sandboxes {
    dispatch: Weak<Dispatch>,
    dns: Arc<DnsServer>,
    events: Arc<dyn EventSink>,
    host_cookie: u64,
    ca_pem: String,
    /// brokerd's directories each sandbox hides from its agent (`SandboxReply::Serving`).
    hide: Vec<std::path::PathBuf>,
    served: Mutex<BTreeMap<u64, Served>>,
    next: std::sync::atomic::AtomicU64,
}

impl Sandboxes {
    pub fn new(
        dispatch: Weak<Dispatch>,
        dns: Arc<DnsServer>,
        events: Arc<dyn EventSink>,
        host_cookie: u64,
        ca_pem: String,
        hide: Vec<std::path::PathBuf>,
    ) -> Arc<Self> {
        Arc::new(Self {
            dispatch,
            dns,
            events,
            host_cookie,
            ca_pem,
            hide,
            served: Mutex::new(BTreeMap::new()),
            next: std::sync::atomic::AtomicU64::new(1),
        })
    }

    /// The served sandboxes, as `status` lists workloads (`tag` says `sandbox`, `cgroup` is
    /// the agent name).
    pub fn status(&self) -> Vec<WorkloadStatus> {
        self.served
            .lock()
            .map(|s| s.values().map(|s| s.status.clone()).collect())
            .unwrap_or_default()
    }

    /// Serves handoffs on `listener` until `cancel` fires.
    pub async fn serve(self: Arc<Self>, listener: UnixListener, cancel: CancellationToken) {
        loop {
            let accepted = tokio::select! {
                _ = cancel.cancelled() => return,
                a = listener.accept() => a,
            };
            match accepted {
                Ok((stream, _)) => {
                    let this = self.clone();
                    let cancel = cancel.clone();
                    tokio::spawn(async move { this.handoff(stream, cancel).await });
                }
                Err(e) => {
                    warn!(error = %e, "sandbox socket accept failed");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                }
            }
        }
    }

    /// One handoff: hello, checks, serving, reply; then the sandbox's life.
    async fn handoff(self: Arc<Self>, mut stream: UnixStream, cancel: CancellationToken) {
        let sandbox_cancel = cancel.child_token();
        let served = match self.accept_hello(&stream, &sandbox_cancel).await {
            Ok(served) => served,
            // A sandbox that failed before handing over (brokerctl reports why).
            Err(HelloError::Closed) => return,
            Err(e) => {
                let message = e.to_string();
                warn!(reason = %message, "sandbox handoff refused");
                self.record(None, format!("sandbox refused: {message}"), true);
                let _ = stream
                    .write_all(&reply_line(&SandboxReply::Refused { message }))
                    .await;
                return;
            }
        };
        let (id, agent) = served;
        let reply = SandboxReply::Serving {
            agent: agent.to_string(),
            ca_pem: self.ca_pem.clone(),
            hide: self.hide.clone(),
        };
        if stream.write_all(&reply_line(&reply)).await.is_ok() {
            // The sandbox lives as long as this connection: brokerctl writes nothing more.
            let mut buf = [0u8; 64];
            loop {
                tokio::select! {
                    _ = cancel.cancelled() => break,
                    r = stream.read(&mut buf) => match r {
                        Ok(0) | Err(_) => break,
                        Ok(_) => {}
                    },
                }
            }
        }
        sandbox_cancel.cancel();
        let status = self
            .served
            .lock()
            .ok()
            .and_then(|mut s| s.remove(&id))
            .map(|s| s.status);
        if let Some(status) = status {
            info!(agent = %agent, netns = status.netns_cookie, "sandbox released");
            self.record(
                Some(&agent),
                format!(
                    "sandbox released: listeners in network namespace {} closed (process {})",
                    status.netns_cookie, status.pid
                ),
                false,
            );
        }
    }

    /// Receives and checks the hello, and serves its sockets. Returns the sandbox's id and
    /// agent.
    async fn accept_hello(
        &self,
        stream: &UnixStream,
        cancel: &CancellationToken,
    ) -> Result<(u64, CgroupPath), HelloError> {
        check_peer(stream)?;
        let checked = tokio::time::timeout(HELLO_TIMEOUT, read_hello(stream, self.host_cookie))
            .await
            .map_err(|_| HelloError::Timeout(HELLO_TIMEOUT))??;
        self.serve_checked(checked, cancel)
    }

    /// Serves the checked sockets until `cancel` fires.
    fn serve_checked(
        &self,
        checked: Checked,
        cancel: &CancellationToken,
    ) -> Result<(u64, CgroupPath), HelloError> {
        let Checked {
            name,
            pid,
            comm,
            cookie,
            tcp,
            udp,
        } = checked;
        let dispatch = self.dispatch.upgrade().ok_or(HelloError::ShuttingDown)?;
        let listeners: Vec<SocketAddr> = tcp.iter().filter_map(|l| l.local_addr().ok()).collect();
        let dns_listeners: Vec<SocketAddr> =
            udp.iter().filter_map(|s| s.local_addr().ok()).collect();
        let agent = SandboxAgent {
            name: name.clone(),
            id: SandboxAgent::id_for(cookie),
            pid,
            comm,
            listeners: listeners.clone(),
        };
        let ctx = Arc::new(NetnsCtx::sandbox(cookie, agent.clone()));
        for l in tcp {
            let l = tokio::net::TcpListener::from_std(l).map_err(|e| HelloError::Socket {
                index: 0,
                kind: SandboxSocket::Tcp,
                message: e.to_string(),
            })?;
            tokio::spawn(accept::serve(
                l,
                dispatch.clone(),
                ctx.clone(),
                cancel.clone(),
            ));
        }
        for s in udp {
            let local = s.local_addr().ok();
            let s = tokio::net::UdpSocket::from_std(s).map_err(|e| HelloError::Socket {
                index: 0,
                kind: SandboxSocket::Dns,
                message: e.to_string(),
            })?;
            let agent = agent.clone();
            // Every datagram at the sandbox's DNS socket is its agent's: nothing else is in
            // its namespace. Its destination was port 53 (the rule redirects nothing else).
            let dst = SocketAddr::new(
                local.map_or(std::net::Ipv4Addr::LOCALHOST.into(), |a| a.ip()),
                53,
            );
            tokio::spawn(self.dns.clone().serve_udp(
                s,
                Arc::new(move |_peer| Some(agent.origin(dst))),
                cancel.clone(),
            ));
        }
        let id = self.next.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let status = WorkloadStatus {
            netns_cookie: cookie,
            cgroup: name.to_string(),
            tag: "sandbox (unprivileged)".into(),
            pid,
            listeners,
            dns_listeners,
            state: "serving".into(),
            opened_ms: now_unix_ms(),
        };
        info!(agent = %name, netns = cookie, pid = pid, listeners = ?status.listeners, "serving an unprivileged sandbox");
        self.record(
            Some(&name),
            format!(
                "sandbox served: listeners in network namespace {cookie} (process {})",
                pid
            ),
            false,
        );
        if let Ok(mut served) = self.served.lock() {
            served.insert(id, Served { status });
        }
        Ok((id, name))
    }

    fn record(&self, agent: Option<&CgroupPath>, reason: String, refused: bool) {
        self.events.record(AuditEvent {
            time_ms: now_unix_ms(),
            kind: Some(if refused {
                EventKind::Denial
            } else {
                EventKind::Attach
            }),
            decision: refused.then_some(Decision::Deny),
            cgroup: agent.map(ToString::to_string),
            reason: Some(reason),
            side: refused.then_some(Side::Agent),
            ..AuditEvent::default()
        });
    }
}

/// A hello whose sockets passed every check (see the module docs).
#[derive(Debug)]
struct Checked {
    name: CgroupPath,
    pid: u32,
    comm: String,
    cookie: u64,
    tcp: Vec<std::net::TcpListener>,
    udp: Vec<std::net::UdpSocket>,
}

/// Receives the hello on `stream` and checks it and its sockets; brokerd's own network
/// namespace is `host_cookie`.
async fn read_hello(stream: &UnixStream, host_cookie: u64) -> Result<Checked, HelloError> {
    let (hello, fds) = receive_hello(stream).await?;
    let name = CgroupPath::parse(&hello.name).map_err(|e| HelloError::Name {
        name: hello.name.clone(),
        message: e.to_string(),
    })?;
    if fds.len() != hello.sockets.len() {
        return Err(HelloError::Count {
            listed: hello.sockets.len(),
            attached: fds.len(),
        });
    }
    if !hello.sockets.contains(&SandboxSocket::Tcp) {
        return Err(HelloError::NoListener);
    }
    let mut cookie = None;
    let mut tcp = Vec::new();
    let mut udp = Vec::new();
    for (index, (kind, fd)) in hello.sockets.iter().zip(fds).enumerate() {
        let bad = |message: String| HelloError::Socket {
            index,
            kind: *kind,
            message,
        };
        let this = netns::socket_netns_cookie(&fd).map_err(|e| bad(e.to_string()))?;
        match cookie {
            None => cookie = Some(this),
            Some(c) if c != this => return Err(HelloError::MixedNamespaces),
            Some(_) => {}
        }
        check_kind(&fd, *kind).map_err(bad)?;
        match kind {
            SandboxSocket::Tcp => {
                let l = std::net::TcpListener::from(fd);
                l.set_nonblocking(true).map_err(|e| bad(e.to_string()))?;
                tcp.push(l);
            }
            SandboxSocket::Dns => {
                let s = std::net::UdpSocket::from(fd);
                s.set_nonblocking(true).map_err(|e| bad(e.to_string()))?;
                udp.push(s);
            }
        }
    }
    let cookie = cookie.ok_or(HelloError::NoListener)?;
    if cookie == host_cookie {
        return Err(HelloError::HostNamespace);
    }
    let process_ns =
        netns::netns_id(Path::new(&format!("/proc/{}/ns/net", hello.pid))).map_err(|e| {
            HelloError::Process {
                pid: hello.pid,
                reason: e.to_string(),
            }
        })?;
    if process_ns != cookie {
        return Err(HelloError::Process {
            pid: hello.pid,
            reason: format!("it is in network namespace {process_ns}, the sockets in {cookie}"),
        });
    }
    let comm = std::fs::read_to_string(format!("/proc/{}/comm", hello.pid))
        .map(|c| crate::capture::printable(c.trim_end()))
        .unwrap_or_default();
    Ok(Checked {
        name,
        pid: hello.pid,
        comm,
        cookie,
        tcp,
        udp,
    })
}

/// Binds `<run_dir>/sandbox.sock` (mode 0600: brokerd's user only; root passes anyway).
pub fn bind(run_dir: &Path) -> anyhow::Result<(UnixListener, PathBuf)> {
    use anyhow::Context as _;
    let path = run_dir.join(SANDBOX_SOCKET);
    match std::fs::remove_file(&path) {
        Ok(()) => {}
        Err(e) if e.kind() == io::ErrorKind::NotFound => {}
        Err(e) => return Err(e).with_context(|| format!("removing {}", path.display())),
    }
    let listener =
        UnixListener::bind(&path).with_context(|| format!("binding {}", path.display()))?;
    std::fs::set_permissions(&path, std::os::unix::fs::PermissionsExt::from_mode(0o600))
        .with_context(|| format!("setting the mode of {}", path.display()))?;
    Ok((listener, path))
}

/// Only brokerd's user (or root), from brokerd's user namespace.
fn check_peer(stream: &UnixStream) -> Result<(), HelloError> {
    let cred = stream
        .peer_cred()
        .map_err(|e| HelloError::Peer(e.to_string()))?;
    let own = nix::unistd::geteuid().as_raw();
    if cred.uid() != 0 && cred.uid() != own {
        return Err(HelloError::Uid(cred.uid(), own));
    }
    let pid = cred
        .pid()
        .and_then(|p| u32::try_from(p).ok())
        .ok_or_else(|| HelloError::Peer("no peer pid".into()))?;
    // A sandbox's processes run as brokerd's uid (root's sandboxes as 65534, refused above),
    // never as root, whose /proc entries brokerd's user could not read anyway.
    if cred.uid() == own && !agent_broker_protocol::peer::same_namespaces(pid) {
        return Err(HelloError::UserNamespace);
    }
    Ok(())
}

/// Reads the one hello message and the descriptors attached to it.
async fn receive_hello(stream: &UnixStream) -> Result<(SandboxHello, Vec<OwnedFd>), HelloError> {
    let mut buf = vec![0u8; MAX_HELLO + 1];
    let (len, fds, too_many) = loop {
        stream.readable().await.map_err(HelloError::Receive)?;
        match stream.try_io(Interest::READABLE, || {
            recv_with_fds(stream.as_fd().as_raw_fd(), &mut buf)
        }) {
            Ok(r) => break r,
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => continue,
            Err(e) => return Err(HelloError::Receive(e)),
        }
    };
    if too_many {
        return Err(HelloError::TooMany);
    }
    let line = &buf[..len];
    if len == 0 && fds.is_empty() {
        return Err(HelloError::Closed);
    }
    if len == 0 || len > MAX_HELLO || line.last() != Some(&b'\n') {
        return Err(HelloError::Framing);
    }
    let hello: SandboxHello = serde_json::from_slice(line).map_err(HelloError::Json)?;
    Ok((hello, fds))
}

/// The most descriptors one `SCM_RIGHTS` message can carry (`SCM_MAX_FD`).
const SCM_MAX_FD: usize = 253;

/// One `recvmsg` with room for every descriptor a message can carry, so none is ever cut off
/// (a cut-off message's descriptors could not be closed here), each taken into an [`OwnedFd`]
/// at once (close-on-exec); reports whether there are more than a hello may carry (they are
/// closed when dropped).
fn recv_with_fds(fd: RawFd, buf: &mut [u8]) -> io::Result<(usize, Vec<OwnedFd>, bool)> {
    let mut iov = [IoSliceMut::new(buf)];
    let mut space = nix::cmsg_space!([RawFd; SCM_MAX_FD]);
    let msg = socket::recvmsg::<()>(fd, &mut iov, Some(&mut space), MsgFlags::MSG_CMSG_CLOEXEC)
        .map_err(io::Error::from)?;
    let mut fds = Vec::new();
    for cmsg in msg.cmsgs().map_err(io::Error::from)? {
        if let ControlMessageOwned::ScmRights(received) = cmsg {
            // SAFETY: the kernel just installed these descriptors in this process for us.
            fds.extend(
                received
                    .into_iter()
                    .map(|f| unsafe { OwnedFd::from_raw_fd(f) }),
            );
        }
    }
    let too_many = fds.len() > MAX_SANDBOX_SOCKETS;
    Ok((msg.bytes, fds, too_many))
}

/// Whether `fd` is the kind of socket the hello says.
fn check_kind(fd: &OwnedFd, kind: SandboxSocket) -> Result<(), String> {
    let ty = socket::getsockopt(fd, sockopt::SockType).map_err(|e| format!("not a socket: {e}"))?;
    let addr = socket::getsockname::<socket::SockaddrStorage>(fd.as_raw_fd())
        .map_err(|e| e.to_string())?;
    if addr.as_sockaddr_in().is_none() && addr.as_sockaddr_in6().is_none() {
        return Err("not an IPv4 or IPv6 socket".into());
    }
    match kind {
        SandboxSocket::Tcp => {
            if ty != socket::SockType::Stream {
                return Err(format!("a {ty:?} socket, not TCP"));
            }
            if !socket::getsockopt(fd, sockopt::AcceptConn).map_err(|e| e.to_string())? {
                return Err("not listening".into());
            }
        }
        SandboxSocket::Dns => {
            if ty != socket::SockType::Datagram {
                return Err(format!("a {ty:?} socket, not UDP"));
            }
        }
    }
    Ok(())
}

fn reply_line(reply: &SandboxReply) -> Vec<u8> {
    let mut line = serde_json::to_vec(reply).unwrap_or_default();
    line.push(b'\n');
    line
}

#[cfg(test)]
mod tests;
