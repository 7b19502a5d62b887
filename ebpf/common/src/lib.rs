//! Types shared by the agent-broker eBPF programs (kernel side) and brokerd (user side).
//!
//! Every type is `#[repr(C)]` with explicit padding and a compile-time size check, because the
//! kernel and user space read the same bytes through BPF maps. Nothing here may allocate or
//! depend on `std`: the kernel side is `no_std`. With the `user` feature the types implement
//! `aya::Pod` so brokerd can use them as map keys and values.
#![no_std]

/// `AF_INET`, as stored in [`Origin::family`].
pub const AF_INET: u16 = 2;
/// `AF_INET6`, as stored in [`Origin::family`].
pub const AF_INET6: u16 = 10;

/// Map names, as declared by the eBPF object and looked up by brokerd.
pub mod maps {
    /// `LruHashMap<u64 socket cookie, Origin>`: written by connect4/6 and sendmsg4/6, read by
    /// sockops, cgroup_skb egress, recvmsg4/6 and getpeername4/6.
    ///
    /// Maps whose key or value layout changed get a new name: aya reuses a pinned map of the
    /// same name without checking its key or value size, so an old pin would be read with the
    /// new layout. brokerd removes the old pins ([`LEGACY`]) at start.
    pub const ORIGIN_BY_COOKIE: &str = "ORIGIN_BY_COOKIE2";
    /// `LruHashMap<PeerKey, Redirect>`: written by sockops when the redirected SYN is about to
    /// leave, with the agent socket's cookie; consumed (looked up, then deleted) by brokerd on
    /// accept when the accepted connection's far end is that very socket; deleted by sockops
    /// when the socket closes. Keyed by network namespace and address: equal loopback addresses
    /// in two namespaces are different sockets.
    pub const REDIRECT_BY_PEER: &str = "REDIRECT_BY_NSPEER";
    /// `Array<BrokerConfig>` with one entry: brokerd's ports. Zero port means "no broker
    /// configured": connects fail with EPERM rather than going direct.
    pub const CONFIG: &str = "CONFIG";
    /// `PerCpuArray<u64>` of [`super::Counter`] values, for `brokerctl status` (named anew
    /// when a counter is added, since its size is part of its layout).
    pub const COUNTERS: &str = "COUNTERS2";
    /// `LruHashMap<u64 cgroup id, u64>`: each connecting cgroup's pace of new TCP connections
    /// (as [`DNS_PACE`], within [`super::CONNECTS_PER_SECOND`]). Written and read by
    /// connect4/6 only.
    pub const CONNECT_PACE: &str = "CONNECT_PACE";
    /// `LruHashMap<PeerKey, Origin>`: who sent the DNS datagrams arriving at brokerd's DNS
    /// listener from a given source address in a given network namespace (written by
    /// cgroup_skb/egress, read by brokerd for every datagram; not consumed, since one socket may
    /// send many queries).
    pub const DNS_BY_PEER: &str = "DNS_BY_NSPEER";
    /// `LruHashMap<u64 cgroup id, u64>`: each sending cgroup's DNS pace (the theoretical
    /// arrival time, in `bpf_ktime_get_ns` nanoseconds, of its next datagram within
    /// [`super::DNS_DATAGRAMS_PER_SECOND`]). Written and read by cgroup_skb/egress only.
    pub const DNS_PACE: &str = "DNS_PACE";
    /// `HashMap<u64 netns cookie, NetnsListener>`: the network namespaces brokerd listens in,
    /// and where its listeners are there. Written by brokerd (its own namespace at start),
    /// read by connect4/6 and sendmsg4/6. A namespace with no entry is refused.
    pub const NETNS_LISTENERS: &str = "NETNS_LISTENERS";
    /// `HashMap<u64 cgroup id, u8>`: the tagged cgroups, for the optional LSM program (which is
    /// global, so it must find out itself whether the current task is in a tagged subtree).
    pub const TAGGED_IDS: &str = "TAGGED_IDS";
    /// Pins of maps earlier builds used, under names whose layout has changed since (or that
    /// nothing reads any more). brokerd removes them at start.
    pub const LEGACY: [&str; 5] = [
        "COUNTERS",
        "ORIGIN_BY_PEER",
        "ORIGIN_BY_COOKIE",
        "REDIRECT_BY_PEER",
        "DNS_BY_PEER",
    ];
}

/// Program names (the Rust function names in the eBPF crate).
pub mod programs {
    /// cgroup/connect4
    pub const CONNECT4: &str = "redirect_connect4";
    /// cgroup/connect6
    pub const CONNECT6: &str = "redirect_connect6";
    /// sockops
    pub const SOCKOPS: &str = "rekey_origin";
    /// cgroup/getpeername4
    pub const GETPEERNAME4: &str = "restore_peer4";
    /// cgroup/getpeername6
    pub const GETPEERNAME6: &str = "restore_peer6";
    /// cgroup/sendmsg4
    pub const SENDMSG4: &str = "udp_sendmsg4";
    /// cgroup/sendmsg6
    pub const SENDMSG6: &str = "udp_sendmsg6";
    /// cgroup/recvmsg4
    pub const RECVMSG4: &str = "udp_recvmsg4";
    /// cgroup/recvmsg6
    pub const RECVMSG6: &str = "udp_recvmsg6";
    /// cgroup/sock_create
    pub const SOCK_CREATE: &str = "only_tcp_udp";
    /// cgroup/bind4
    pub const BIND4: &str = "loopback_bind4";
    /// cgroup/bind6
    pub const BIND6: &str = "loopback_bind6";
    /// cgroup_skb/egress
    pub const EGRESS: &str = "loopback_egress";
    /// cgroup_skb/ingress
    pub const INGRESS: &str = "loopback_ingress";
    /// lsm/socket_create (optional: only where the kernel lets BPF LSM programs load)
    pub const LSM_SOCKET_CREATE: &str = "lsm_socket_families";
}

/// The most DNS datagrams a second one cgroup may send to brokerd (a second's worth may come
/// at once); more are dropped in the kernel, their `send` failing with EPERM. brokerd reads
/// every DNS datagram of every agent from one socket: without this, one agent sending faster
/// than brokerd reads would fill that socket's buffer and the kernel would drop the other
/// agents' queries before brokerd saw them. Well above any agent's `dns_queries_per_second`
/// share, which brokerd enforces on what arrives.
pub const DNS_DATAGRAMS_PER_SECOND: u64 = 2048;
/// Capacity of [`maps::DNS_PACE`].
pub const DNS_PACE_CAPACITY: u32 = 16_384;

/// The most new TCP connections a second one cgroup may open to brokerd (a second's worth may
/// come at once); past it `connect` fails with EPERM before any handshake. brokerd accepts
/// every agent's connections from one listener: without this, one agent connecting in a loop
/// makes brokerd accept and close tens of thousands of connections a second, and the others'
/// connections queue behind them. Eight times the default `new_connections_per_second` share,
/// which brokerd enforces on what arrives; a policy's larger share is capped here.
pub const CONNECTS_PER_SECOND: u64 = 2048;
/// Capacity of [`maps::CONNECT_PACE`].
pub const CONNECT_PACE_CAPACITY: u32 = 16_384;

/// Capacity of [`maps::TAGGED_IDS`].
pub const TAGGED_CAPACITY: u32 = 4096;
/// How many cgroup levels the LSM program walks up looking for a tagged ancestor.
pub const MAX_CGROUP_DEPTH: i32 = 16;

/// Capacity of [`maps::NETNS_LISTENERS`].
pub const NETNS_CAPACITY: u32 = TAGGED_CAPACITY;

/// Capacity of the origin maps. LRU, so a flood evicts the oldest unconsumed records; an evicted
/// record makes brokerd refuse that connection (fail closed), never pass it through.
pub const ORIGIN_MAP_CAPACITY: u32 = 65_536;

/// Who opened a redirected connection and where it was going.
///
/// Recorded by connect4/connect6 at `connect()` time, in the context of the calling thread.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Origin {
    /// Original destination address, network byte order. IPv4 destinations are stored as
    /// v4-mapped IPv6 (`::ffff:a.b.c.d`), both from connect4 and from a v4-mapped connect6.
    pub dst_addr: [u32; 4],
    /// Original destination port, host byte order.
    pub dst_port: u16,
    /// Address family of the agent's socket ([`AF_INET`] or [`AF_INET6`]).
    pub family: u16,
    /// Thread group id (the process id as user space knows it) of the caller.
    pub tgid: u32,
    /// Thread id of the caller.
    pub pid: u32,
    /// 1 when the connection was sent to the IPv4 listener (IPv4 or v4-mapped destination).
    pub via_v4: u32,
    /// cgroup v2 id (inode number of the cgroup directory) of the calling task.
    pub cgroup_id: u64,
    /// `comm` of the calling thread, NUL padded.
    pub comm: [u8; 16],
    /// Cookie of the network namespace the connect or send was made in
    /// (`bpf_get_netns_cookie`, `SO_NETNS_COOKIE`).
    pub netns_cookie: u64,
}
const _: () = assert!(core::mem::size_of::<Origin>() == 64);

/// A redirected connection's record in [`maps::REDIRECT_BY_PEER`]: its [`Origin`] and the
/// identity of the agent socket that made it.
///
/// The key (the socket's local address) is only where to look; an address can be taken over by
/// another socket once the agent's is gone (or beside it, with `SO_REUSEADDR`), so brokerd hands
/// out the origin only to a connection whose far end is the socket with this cookie.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Redirect {
    pub origin: Origin,
    /// Socket cookie (`bpf_get_socket_cookie`, `SO_COOKIE`, sock_diag's `idiag_cookie`) of the
    /// agent's socket. Cookies are never reused while the system runs.
    pub cookie: u64,
}
const _: () = assert!(core::mem::size_of::<Redirect>() == 72);

/// Key of [`maps::REDIRECT_BY_PEER`] and [`maps::DNS_BY_PEER`]: the agent socket's network
/// namespace and local address, which is the peer address brokerd sees on the socket that
/// accepted (or received) in that namespace. Every field, `_pad` included, must be written: the
/// kernel hashes all 32 bytes.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct PeerKey {
    /// Cookie of the agent socket's network namespace.
    pub netns_cookie: u64,
    /// Network byte order; IPv4 as v4-mapped IPv6.
    pub addr: [u32; 4],
    /// Host byte order.
    pub port: u32,
    /// Always zero.
    pub _pad: u32,
}
const _: () = assert!(core::mem::size_of::<PeerKey>() == 32);

/// Value of [`maps::NETNS_LISTENERS`]: where brokerd listens in one network namespace.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub struct NetnsListener {
    /// IPv4 listener address, network byte order.
    pub v4_addr: u32,
    /// IPv6 listener address, network byte order (v4-mapped when there is no IPv6 listener).
    pub v6_addr: [u32; 4],
    /// TCP listener port, host byte order.
    pub port: u16,
    /// DNS listener port (UDP, on the same addresses), host byte order. Zero: DNS is refused.
    pub dns_port: u16,
    /// The tagged cgroup this namespace's listeners were opened for; zero for brokerd's own
    /// namespace.
    pub tag_cgroup_id: u64,
}
const _: () = assert!(core::mem::size_of::<NetnsListener>() == 32);

/// Whether a broker is configured, and brokerd's ports (which bind4/6 refuse to tagged
/// cgroups). Where a connection is sent is [`maps::NETNS_LISTENERS`]' entry for its namespace.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub struct BrokerConfig {
    /// IPv4 listener address, network byte order.
    pub v4_addr: u32,
    /// IPv6 listener address, network byte order.
    pub v6_addr: [u32; 4],
    /// Listener port, host byte order. Zero: no broker configured, connects are refused.
    pub port: u16,
    /// DNS listener port (UDP, on the same addresses), host byte order. Zero: DNS is refused.
    pub dns_port: u16,
    /// Cookie of brokerd's own network namespace. The current programs do not read it (which
    /// namespaces are served is [`maps::NETNS_LISTENERS`]); programs of earlier builds, still
    /// attached through adopted pinned links after an upgrade, refuse every other namespace by
    /// it, so brokerd keeps writing it.
    pub netns_cookie: u64,
}
const _: () = assert!(core::mem::size_of::<BrokerConfig>() == 32);

/// Indices into [`maps::COUNTERS`].
#[repr(u32)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Counter {
    /// Connections redirected to the broker.
    Redirected = 0,
    /// Connects refused because the origin record could not be stored or no broker is configured.
    Refused = 1,
    /// Redirected connections whose record sockops could not re-key.
    RekeyFailed = 2,
    /// DNS datagrams and connections sent to brokerd's DNS listener.
    DnsRedirected = 3,
    /// UDP sends and connects refused (anything but DNS: QUIC, other datagrams).
    UdpRefused = 4,
    /// Sockets refused at creation (raw, ICMP, MPTCP, SCTP, UDP-Lite, ...).
    SocketRefused = 5,
    /// Binds refused (a non-loopback address or one of brokerd's ports).
    BindRefused = 6,
    /// Packets dropped by the egress filter (destination not loopback).
    EgressDropped = 7,
    /// Packets dropped by the ingress filter (source not loopback).
    IngressDropped = 8,
    /// Connects and sends refused because they came from a network namespace brokerd has no
    /// listener in (no [`maps::NETNS_LISTENERS`] entry).
    NetnsRefused = 9,
    /// TCP connects refused for coming faster than [`CONNECTS_PER_SECOND`] from one cgroup.
    ConnectPaced = 10,
}
/// Number of entries in [`maps::COUNTERS`].
pub const COUNTER_COUNT: u32 = 11;

/// The DNS port agents' resolvers send to, redirected to brokerd's DNS listener.
pub const DNS_PORT: u16 = 53;

/// The v4-mapped IPv6 form of an IPv4 address given in network byte order.
#[inline(always)]
pub const fn v4_mapped(ip4_be: u32) -> [u32; 4] {
    // ::ffff:a.b.c.d; the third word is 0x0000ffff in network byte order.
    [0, 0, u32::from_ne_bytes([0, 0, 0xff, 0xff]), ip4_be]
}

/// Whether a network-byte-order IPv6 address is v4-mapped.
#[inline(always)]
pub const fn is_v4_mapped(ip6: &[u32; 4]) -> bool {
    ip6[0] == 0 && ip6[1] == 0 && ip6[2] == u32::from_ne_bytes([0, 0, 0xff, 0xff])
}

#[cfg(feature = "user")]
mod user {
    // SAFETY: plain-old-data, #[repr(C)], no implicit padding (checked by the size asserts).
    unsafe impl aya::Pod for super::Origin {}
    // SAFETY: as above.
    unsafe impl aya::Pod for super::Redirect {}
    // SAFETY: as above.
    unsafe impl aya::Pod for super::PeerKey {}
    // SAFETY: as above.
    unsafe impl aya::Pod for super::BrokerConfig {}
    // SAFETY: as above.
    unsafe impl aya::Pod for super::NetnsListener {}
}
