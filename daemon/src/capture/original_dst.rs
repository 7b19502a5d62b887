//! The origin of a connection accepted on an unprivileged sandbox's listener (issue 19): the
//! agent is the sandbox's (its network namespace holds nothing else), and the destination it
//! dialed is what the namespace's nat redirect rule recorded, read with `SO_ORIGINAL_DST`
//! (`IP6T_SO_ORIGINAL_DST` for IPv6). No eBPF record is involved.

use std::{
    io,
    net::{Ipv4Addr, Ipv6Addr, SocketAddr},
    os::fd::AsRawFd,
};

use agent_broker_core::cgroup::{CgroupId, CgroupPath};

use super::{ConnectionOrigin, ResolveError};

/// `SO_ORIGINAL_DST` (linux/netfilter_ipv4.h) and `IP6T_SO_ORIGINAL_DST`
/// (linux/netfilter_ipv6/ip6_tables.h): both 80.
const SO_ORIGINAL_DST: libc::c_int = 80;

/// Who a sandbox's connections come from.
#[derive(Clone, Debug)]
pub struct SandboxAgent {
    /// The agent name the sandbox runs as (`brokerctl run --unprivileged --as NAME`).
    pub name: CgroupPath,
    /// Stands in for a cgroup id where brokerd keys state by one (an agent's shares): one of
    /// its own per sandbox ([`SandboxAgent::id_for`]), so one sandbox's flood never uses up
    /// another's share.
    pub id: CgroupId,
    /// The sandbox's agent process (a pid of brokerd's namespace, the one `brokerctl run`
    /// executes the command in), and its command when the sandbox was handed over.
    pub pid: u32,
    pub comm: String,
    /// The sandbox's own listeners (in its namespace): a connect to one of them directly is
    /// the agent dialing the broker itself.
    pub listeners: Vec<SocketAddr>,
}

impl SandboxAgent {
    /// The stand-in cgroup id of the sandbox whose network namespace is `netns_cookie`: the
    /// cookie with the top bit set, which no cgroup id has (they are inode numbers of the
    /// cgroup file system).
    pub fn id_for(netns_cookie: u64) -> CgroupId {
        CgroupId(netns_cookie | 1 << 63)
    }

    /// The origin of a connection the sandbox's listener accepted, or why it has none.
    pub fn origin_of(&self, socket: &impl AsRawFd) -> Result<ConnectionOrigin, ResolveError> {
        let original_dst = original_dst(socket).map_err(|e| ResolveError::Diag {
            peer: SocketAddr::from((Ipv4Addr::UNSPECIFIED, 0)),
            message: format!(
                "SO_ORIGINAL_DST of a connection from the sandbox of {}: {e}",
                self.name
            ),
        })?;
        let mut origin = self.origin(original_dst);
        // The sandbox's process has likely executed the agent since the hello: name that.
        if let Ok(comm) = std::fs::read_to_string(format!("/proc/{}/comm", self.pid)) {
            origin.comm = super::printable(comm.trim_end());
        }
        Ok(origin)
    }

    /// The origin of anything from the sandbox to `original_dst`.
    pub fn origin(&self, original_dst: SocketAddr) -> ConnectionOrigin {
        ConnectionOrigin {
            cgroup: self.name.clone(),
            cgroup_path: None,
            pod: None,
            cgroup_id: self.id,
            pid: self.pid,
            tid: self.pid,
            comm: self.comm.clone(),
            exe: None,
            original_dst,
            sandboxed: true,
        }
    }
}

/// The destination a redirected TCP connection was dialed to, as the nat table recorded it.
pub fn original_dst(socket: &impl AsRawFd) -> io::Result<SocketAddr> {
    let fd = socket.as_raw_fd();
    // SAFETY: getsockopt writes at most `len` bytes into the sockaddr we own, and sets `len`.
    unsafe {
        let mut v6: libc::sockaddr_in6 = std::mem::zeroed();
        let mut len = std::mem::size_of::<libc::sockaddr_in6>() as libc::socklen_t;
        if libc::getsockopt(
            fd,
            libc::SOL_IPV6,
            SO_ORIGINAL_DST,
            (&raw mut v6).cast(),
            &raw mut len,
        ) == 0
            && i32::from(v6.sin6_family) == libc::AF_INET6
        {
            let ip = Ipv6Addr::from(v6.sin6_addr.s6_addr);
            return Ok(SocketAddr::from((ip, u16::from_be(v6.sin6_port))));
        }
        let mut v4: libc::sockaddr_in = std::mem::zeroed();
        let mut len = std::mem::size_of::<libc::sockaddr_in>() as libc::socklen_t;
        if libc::getsockopt(
            fd,
            libc::SOL_IP,
            SO_ORIGINAL_DST,
            (&raw mut v4).cast(),
            &raw mut len,
        ) != 0
        {
            return Err(io::Error::last_os_error());
        }
        let ip = Ipv4Addr::from(u32::from_be(v4.sin_addr.s_addr));
        Ok(SocketAddr::from((ip, u16::from_be(v4.sin_port))))
    }
}
