//! agent-broker's kernel side: cgroup programs that hand every outbound TCP connection of a
//! tagged cgroup to brokerd.
//!
//! - `connect4`/`connect6` record who is connecting where ([`Origin`], keyed by socket cookie) and
//!   rewrite the destination to brokerd's listener. If the record cannot be stored, or no broker
//!   is configured, the connect fails with EPERM: a connection is never let through unrecorded.
//! - `sockops` re-keys the record by the agent socket's local address at
//!   `BPF_SOCK_OPS_TCP_CONNECT_CB` (source port assigned, SYN not yet sent), so brokerd can find it
//!   from the accepted socket's peer address without racing the handshake. The record carries the
//!   socket's cookie: brokerd hands it out only to a connection whose far end is that socket (an
//!   address alone can be reused by any process). sockops also asks for the socket's state
//!   changes and deletes its records when it closes, so a connect that never reached brokerd
//!   (brokerd down, backlog full, a SYN the listener dropped) leaves nothing behind.
//! - `getpeername4`/`getpeername6` show the agent the address it asked for, not the broker's.
//! - UDP: `connect4`/`connect6` and `sendmsg4`/`sendmsg6` send port 53 to brokerd's DNS listener
//!   and refuse every other destination (QUIC included, so HTTP/3 clients fall back to TCP);
//!   `recvmsg4`/`recvmsg6` show the reply as coming from the resolver the agent asked.
//! - `sock_create` allows only TCP and UDP sockets in AF_INET/AF_INET6 (no raw, ICMP, MPTCP,
//!   SCTP, UDP-Lite, SMC).
//! - `bind4`/`bind6` keep the agent's listeners on loopback (a wildcard bind becomes a loopback
//!   bind) and off brokerd's ports.
//! - `cgroup_skb` egress and ingress are the backstop: no packet to or from anything but loopback.
//!
//! These programs must never let a tagged cgroup's traffic reach any address but the broker.
#![no_std]
#![no_main]

use agent_broker_common::{
    AF_INET, AF_INET6, BrokerConfig, CONNECT_PACE_CAPACITY, CONNECTS_PER_SECOND, COUNTER_COUNT,
    Counter, DNS_DATAGRAMS_PER_SECOND, DNS_PACE_CAPACITY, DNS_PORT, MAX_CGROUP_DEPTH,
    NETNS_CAPACITY, NetnsListener, ORIGIN_MAP_CAPACITY, Origin, PeerKey, Redirect, TAGGED_CAPACITY,
    is_v4_mapped, v4_mapped,
};
use aya_ebpf::{
    EbpfContext as _,
    bindings::{
        BPF_SOCK_OPS_STATE_CB, BPF_SOCK_OPS_STATE_CB_FLAG, BPF_SOCK_OPS_TCP_CONNECT_CB,
        BPF_TCP_CLOSE, bpf_sock_addr,
    },
    helpers::{
        bpf_get_current_cgroup_id, bpf_get_current_comm, bpf_get_current_pid_tgid,
        bpf_ktime_get_ns,
        generated::{
            bpf_get_current_ancestor_cgroup_id, bpf_get_netns_cookie, bpf_get_socket_cookie,
        },
    },
    macros::{cgroup_skb, cgroup_sock, cgroup_sock_addr, lsm, map, sock_ops},
    maps::{Array, HashMap, LruHashMap, PerCpuArray},
    programs::{LsmContext, SkBuffContext, SockAddrContext, SockContext, SockOpsContext},
};
use aya_log_ebpf::warn;

/// Return values of cgroup sock_addr programs.
const ALLOW: i32 = 1;
const REFUSE: i32 = 0;
/// Return values of cgroup_skb programs.
const PASS: i32 = 1;
const DROP: i32 = 0;
const SOCK_STREAM: u32 = 1;
const SOCK_DGRAM: u32 = 2;
const IPPROTO_TCP: u32 = 6;
const IPPROTO_UDP: u32 = 17;
/// 127.0.0.1 in network byte order.
const LOOPBACK4: u32 = u32::from_ne_bytes([127, 0, 0, 1]);
/// ::1 in network byte order.
const LOOPBACK6: [u32; 4] = [0, 0, 0, u32::from_ne_bytes([0, 0, 0, 1])];

// Map names follow `agent_broker_common::maps`: a map whose layout changed has a new name.

#[map(name = "ORIGIN_BY_COOKIE2")]
static ORIGIN_BY_COOKIE: LruHashMap<u64, Origin> = LruHashMap::pinned(ORIGIN_MAP_CAPACITY, 0);

#[map(name = "REDIRECT_BY_NSPEER")]
static REDIRECT_BY_PEER: LruHashMap<PeerKey, Redirect> = LruHashMap::pinned(ORIGIN_MAP_CAPACITY, 0);

#[map]
static NETNS_LISTENERS: HashMap<u64, NetnsListener> = HashMap::pinned(NETNS_CAPACITY, 0);

#[map]
static CONFIG: Array<BrokerConfig> = Array::pinned(1, 0);

#[map(name = "COUNTERS2")]
static COUNTERS: PerCpuArray<u64> = PerCpuArray::pinned(COUNTER_COUNT, 0);

#[map]
static TAGGED_IDS: HashMap<u64, u8> = HashMap::pinned(TAGGED_CAPACITY, 0);

#[map(name = "DNS_BY_NSPEER")]
static DNS_BY_PEER: LruHashMap<PeerKey, Origin> = LruHashMap::pinned(ORIGIN_MAP_CAPACITY, 0);

#[map]
static DNS_PACE: LruHashMap<u64, u64> = LruHashMap::pinned(DNS_PACE_CAPACITY, 0);

#[map]
static CONNECT_PACE: LruHashMap<u64, u64> = LruHashMap::pinned(CONNECT_PACE_CAPACITY, 0);

/// Whether `cgroup_id` may have one more of `per_second` now, `pace` holding each cgroup's
/// theoretical arrival time (a GCRA: one timestamp per cgroup, up to a second's worth at once).
/// Two CPUs racing may both pass; that only lets a few more through.
#[inline(always)]
fn paced(pace: &LruHashMap<u64, u64>, cgroup_id: u64, per_second: u64) -> bool {
    const BURST_NS: u64 = 1_000_000_000;
    let interval_ns = 1_000_000_000 / per_second;
    // SAFETY: bpf_ktime_get_ns has no preconditions.
    let now = unsafe { bpf_ktime_get_ns() };
    // SAFETY: copied out immediately.
    let tat = unsafe { pace.get(&cgroup_id) }.copied().unwrap_or(0);
    let tat = if tat > now { tat } else { now };
    if tat - now > BURST_NS {
        return false;
    }
    let _ = pace.insert(&cgroup_id, &(tat + interval_ns), 0);
    true
}

/// Whether a cgroup may send one more DNS datagram now, within [`DNS_DATAGRAMS_PER_SECOND`].
#[inline(always)]
fn dns_paced(cgroup_id: u64) -> bool {
    paced(&DNS_PACE, cgroup_id, DNS_DATAGRAMS_PER_SECOND)
}

/// Whether the current task's cgroup may open one more TCP connection to brokerd now, within
/// [`CONNECTS_PER_SECOND`]. Past it the connect fails with EPERM before a handshake, so a
/// connection storm costs brokerd nothing beyond the pace: without it one agent connecting in
/// a loop keeps brokerd accepting and closing tens of thousands of connections a second, and
/// the other agents' connections wait behind them in the one accept queue.
#[inline(always)]
fn connect_paced() -> bool {
    // SAFETY: no arguments; allowed in cgroup sock_addr programs.
    let cgroup_id = unsafe { bpf_get_current_cgroup_id() };
    paced(&CONNECT_PACE, cgroup_id, CONNECTS_PER_SECOND)
}

#[inline(always)]
fn count(counter: Counter) {
    if let Some(slot) = COUNTERS.get_ptr_mut(counter as u32) {
        // SAFETY: the pointer comes from a successful lookup in a per-CPU array, so no other
        // CPU writes this slot, and it stays valid for the program's run.
        unsafe { *slot += 1 };
    }
}

#[inline(always)]
fn config() -> Option<BrokerConfig> {
    let cfg = *CONFIG.get(0)?;
    if cfg.port == 0 { None } else { Some(cfg) }
}

#[inline(always)]
fn sock_addr(ctx: &SockAddrContext) -> &mut bpf_sock_addr {
    // SAFETY: the kernel passes a valid bpf_sock_addr for the program's whole run.
    unsafe { &mut *ctx.sock_addr }
}

/// Reads `user_ip6` one word at a time: the verifier only allows context accesses of at most
/// 4 bytes at constant offsets, so an array copy (a memcpy) is rejected.
#[inline(always)]
fn read_user_ip6(sa: &bpf_sock_addr) -> [u32; 4] {
    // SAFETY: plain loads from the kernel-provided context.
    unsafe {
        [
            core::ptr::read_volatile(&sa.user_ip6[0]),
            core::ptr::read_volatile(&sa.user_ip6[1]),
            core::ptr::read_volatile(&sa.user_ip6[2]),
            core::ptr::read_volatile(&sa.user_ip6[3]),
        ]
    }
}

/// Writes `user_ip6` one word at a time (see [`read_user_ip6`]).
#[inline(always)]
fn write_user_ip6(sa: &mut bpf_sock_addr, ip6: [u32; 4]) {
    // SAFETY: plain stores to the writable user_ip6 field of the context.
    unsafe {
        core::ptr::write_volatile(&mut sa.user_ip6[0], ip6[0]);
        core::ptr::write_volatile(&mut sa.user_ip6[1], ip6[1]);
        core::ptr::write_volatile(&mut sa.user_ip6[2], ip6[2]);
        core::ptr::write_volatile(&mut sa.user_ip6[3], ip6[3]);
    }
}

/// Stores the origin of the connection being made on `ctx`'s socket. False when it could not be
/// stored, in which case the caller must refuse the connect.
#[inline(always)]
fn record(
    ctx: &SockAddrContext,
    dst_addr: [u32; 4],
    dst_port_be: u32,
    family: u16,
    via_v4: bool,
    netns_cookie: u64,
) -> bool {
    let pid_tgid = bpf_get_current_pid_tgid();
    let origin = Origin {
        dst_addr,
        dst_port: u16::from_be(dst_port_be as u16),
        family,
        tgid: (pid_tgid >> 32) as u32,
        pid: pid_tgid as u32,
        via_v4: via_v4 as u32,
        // SAFETY: no arguments; allowed in cgroup sock_addr programs.
        cgroup_id: unsafe { bpf_get_current_cgroup_id() },
        comm: bpf_get_current_comm().unwrap_or([0; 16]),
        netns_cookie,
    };
    // SAFETY: bpf_get_socket_cookie accepts a sock_addr context.
    let cookie = unsafe { bpf_get_socket_cookie(ctx.as_ptr()) };
    if ORIGIN_BY_COOKIE.insert(&cookie, &origin, 0).is_err() {
        warn!(ctx, "agent-broker: cannot record origin, refusing connect");
        return false;
    }
    true
}

/// brokerd's listeners in the network namespace `ctx` runs in, and that namespace's cookie.
/// None where brokerd has no listener (an agent that made its own namespace, one brokerd never
/// opened): there the broker's loopback address would be the agent's own, so the caller refuses.
#[inline(always)]
fn netns_listener(ctx: &SockAddrContext) -> Option<(NetnsListener, u64)> {
    // SAFETY: bpf_get_netns_cookie accepts a sock_addr context.
    let netns = unsafe { bpf_get_netns_cookie(ctx.as_ptr()) };
    // SAFETY: copied out immediately.
    let listener = unsafe { NETNS_LISTENERS.get(&netns) }.copied()?;
    Some((listener, netns))
}

/// What to do with a connect or an unconnected send from a tagged cgroup, and in which network
/// namespace's listeners.
enum Verdict {
    /// TCP: to brokerd's listener.
    Broker(NetnsListener, u64),
    /// UDP to port 53: to brokerd's DNS listener.
    Dns(NetnsListener, u64),
}

/// Decides a connect (TCP or UDP) or an unconnected UDP send; `None` means refuse (EPERM).
/// Counts the refusals.
#[inline(always)]
fn verdict(ctx: &SockAddrContext, sa: &bpf_sock_addr, dst_port_be: u32) -> Option<Verdict> {
    if config().is_none() {
        count(Counter::Refused);
        return None;
    }
    let Some((listener, netns)) = netns_listener(ctx) else {
        count(Counter::NetnsRefused);
        return None;
    };
    if listener.port == 0 {
        count(Counter::Refused);
        return None;
    }
    let (ty, protocol) = (sa.type_, sa.protocol);
    if ty == SOCK_STREAM && protocol == IPPROTO_TCP {
        if !connect_paced() {
            count(Counter::ConnectPaced);
            return None;
        }
        return Some(Verdict::Broker(listener, netns));
    }
    if ty == SOCK_DGRAM
        && protocol == IPPROTO_UDP
        && u16::from_be(dst_port_be as u16) == DNS_PORT
        && listener.dns_port != 0
    {
        return Some(Verdict::Dns(listener, netns));
    }
    count(Counter::UdpRefused);
    None
}

/// Sends an IPv4 connect or send where [`verdict`] says, recording where it was going first.
#[inline(always)]
fn redirect4(ctx: &SockAddrContext) -> i32 {
    let sa = sock_addr(ctx);
    let dst_port = sa.user_port;
    let Some(v) = verdict(ctx, sa, dst_port) else {
        return REFUSE;
    };
    let (to, netns, port, counter) = match v {
        Verdict::Broker(l, netns) => (l, netns, l.port, Counter::Redirected),
        Verdict::Dns(l, netns) => (l, netns, l.dns_port, Counter::DnsRedirected),
    };
    if !record(ctx, v4_mapped(sa.user_ip4), dst_port, AF_INET, true, netns) {
        count(Counter::Refused);
        return REFUSE;
    }
    sa.user_ip4 = to.v4_addr;
    sa.user_port = u32::from(port.to_be());
    count(counter);
    ALLOW
}

/// IPv6 form of [`redirect4`].
#[inline(always)]
fn redirect6(ctx: &SockAddrContext) -> i32 {
    let sa = sock_addr(ctx);
    let dst_port = sa.user_port;
    let Some(v) = verdict(ctx, sa, dst_port) else {
        return REFUSE;
    };
    let dst = read_user_ip6(sa);
    // A v4-mapped destination is an IPv4 connection on the wire: send it to the IPv4 listener
    // through its mapped form, so the socket stays a valid AF_INET6 socket.
    let mapped = is_v4_mapped(&dst);
    let (to, netns, port, counter) = match v {
        Verdict::Broker(l, netns) => (l, netns, l.port, Counter::Redirected),
        Verdict::Dns(l, netns) => (l, netns, l.dns_port, Counter::DnsRedirected),
    };
    if !record(ctx, dst, dst_port, AF_INET6, mapped, netns) {
        count(Counter::Refused);
        return REFUSE;
    }
    write_user_ip6(
        sa,
        if mapped {
            v4_mapped(to.v4_addr)
        } else {
            to.v6_addr
        },
    );
    sa.user_port = u32::from(port.to_be());
    count(counter);
    ALLOW
}

#[cgroup_sock_addr(connect4)]
pub fn redirect_connect4(ctx: SockAddrContext) -> i32 {
    redirect4(&ctx)
}

#[cgroup_sock_addr(connect6)]
pub fn redirect_connect6(ctx: SockAddrContext) -> i32 {
    redirect6(&ctx)
}

/// Unconnected UDP sends (`sendto`/`sendmsg` with an address): DNS to brokerd, nothing else.
#[cgroup_sock_addr(sendmsg4)]
pub fn udp_sendmsg4(ctx: SockAddrContext) -> i32 {
    redirect4(&ctx)
}

#[cgroup_sock_addr(sendmsg6)]
pub fn udp_sendmsg6(ctx: SockAddrContext) -> i32 {
    redirect6(&ctx)
}

/// The resolver a DNS socket asked, if `ctx` is a datagram from brokerd's DNS listener to it.
#[inline(always)]
fn asked_resolver(ctx: &SockAddrContext, from_port_be: u32) -> Option<(Origin, BrokerConfig)> {
    let cfg = config()?;
    if cfg.dns_port == 0 || u16::from_be(from_port_be as u16) != cfg.dns_port {
        return None;
    }
    let origin = recorded_origin(ctx)?;
    if origin.dst_port != DNS_PORT {
        return None;
    }
    Some((origin, cfg))
}

/// Replies from brokerd's DNS listener appear to come from the resolver the agent asked, so stub
/// resolvers that check the reply's source accept them.
#[cgroup_sock_addr(recvmsg4)]
pub fn udp_recvmsg4(ctx: SockAddrContext) -> i32 {
    let sa = sock_addr(&ctx);
    if let Some((origin, cfg)) = asked_resolver(&ctx, sa.user_port) {
        if sa.user_ip4 == cfg.v4_addr && is_v4_mapped(&origin.dst_addr) {
            sa.user_ip4 = origin.dst_addr[3];
            sa.user_port = u32::from(origin.dst_port.to_be());
        }
    }
    ALLOW
}

#[cgroup_sock_addr(recvmsg6)]
pub fn udp_recvmsg6(ctx: SockAddrContext) -> i32 {
    let sa = sock_addr(&ctx);
    if let Some((origin, cfg)) = asked_resolver(&ctx, sa.user_port) {
        let from = read_user_ip6(sa);
        if from == cfg.v6_addr || from == v4_mapped(cfg.v4_addr) {
            write_user_ip6(sa, origin.dst_addr);
            sa.user_port = u32::from(origin.dst_port.to_be());
        }
    }
    ALLOW
}

/// Only TCP and UDP sockets in AF_INET/AF_INET6 may be created. (The kernel runs this hook for
/// those two families only: `inet_create` and `inet6_create` are its only callers, so it never
/// sees AF_NETLINK, AF_PACKET, AF_VSOCK... Those are the launcher's seccomp filter's job, and
/// the optional LSM layer's.)
#[cgroup_sock(sock_create)]
pub fn only_tcp_udp(ctx: SockContext) -> i32 {
    // SAFETY: plain loads from the kernel-provided bpf_sock.
    let (family, ty, protocol) = unsafe {
        (
            core::ptr::read_volatile(&(*ctx.sock).family),
            core::ptr::read_volatile(&(*ctx.sock).type_),
            core::ptr::read_volatile(&(*ctx.sock).protocol),
        )
    };
    let inet = family == u32::from(AF_INET) || family == u32::from(AF_INET6);
    let tcp = ty == SOCK_STREAM && protocol == IPPROTO_TCP;
    let udp = ty == SOCK_DGRAM && protocol == IPPROTO_UDP;
    if inet && (tcp || udp) {
        ALLOW
    } else {
        count(Counter::SocketRefused);
        REFUSE
    }
}

/// Whether `port_be` (as in `user_port`) is one of brokerd's listener ports.
#[inline(always)]
fn is_broker_port(cfg: &BrokerConfig, port_be: u32) -> bool {
    let port = u16::from_be(port_be as u16);
    port != 0 && (port == cfg.port || port == cfg.dns_port)
}

#[inline(always)]
fn is_loopback4(ip4_be: u32) -> bool {
    ip4_be.to_ne_bytes()[0] == 127
}

#[inline(always)]
fn is_loopback6(ip6: &[u32; 4]) -> bool {
    *ip6 == LOOPBACK6 || (is_v4_mapped(ip6) && is_loopback4(ip6[3]))
}

/// Whether the bind's port is allowed: a broker must be configured, and the port must not be
/// one of brokerd's (counts the refusal otherwise).
#[inline(always)]
fn bind_port_allowed(sa: &bpf_sock_addr) -> bool {
    match config() {
        Some(cfg) if !is_broker_port(&cfg, sa.user_port) => true,
        _ => {
            count(Counter::BindRefused);
            false
        }
    }
}

/// Agents listen on loopback only: a wildcard bind becomes a loopback bind, any other address is
/// refused, and so are brokerd's own ports (no squatting them while brokerd is down).
#[cgroup_sock_addr(bind4)]
pub fn loopback_bind4(ctx: SockAddrContext) -> i32 {
    let sa = sock_addr(&ctx);
    if !bind_port_allowed(sa) {
        return REFUSE;
    }
    let ip = sa.user_ip4;
    if ip == 0 {
        sa.user_ip4 = LOOPBACK4;
    } else if !is_loopback4(ip) {
        count(Counter::BindRefused);
        return REFUSE;
    }
    ALLOW
}

#[cgroup_sock_addr(bind6)]
pub fn loopback_bind6(ctx: SockAddrContext) -> i32 {
    let sa = sock_addr(&ctx);
    if !bind_port_allowed(sa) {
        return REFUSE;
    }
    let ip = read_user_ip6(sa);
    if ip == [0; 4] {
        write_user_ip6(sa, LOOPBACK6);
    } else if ip == v4_mapped(0) {
        write_user_ip6(sa, v4_mapped(LOOPBACK4));
    } else if !is_loopback6(&ip) {
        count(Counter::BindRefused);
        return REFUSE;
    }
    ALLOW
}

/// The addresses and ports of an IP packet, as far as the filters need them. Every field is
/// always set (zero when absent): the verifier rejects reading a register LLVM left undefined,
/// which is what an `Option` of a tuple can become.
struct Packet {
    /// Source and destination, IPv4 as v4-mapped IPv6, network byte order.
    src: [u32; 4],
    dst: [u32; 4],
    /// UDP ports (host byte order); zero unless the packet is UDP with its header in reach.
    udp_src: u16,
    udp_dst: u16,
}

#[inline(always)]
fn parse(ctx: &SkBuffContext) -> Option<Packet> {
    // cgroup_skb programs see the packet from its network header on.
    let first: u8 = ctx.load(0).ok()?;
    let (src, dst, l4_offset) = match first >> 4 {
        4 => {
            let header_len = u32::from(first & 0x0f) * 4;
            let protocol: u8 = ctx.load(9).ok()?;
            let src: u32 = ctx.load(12).ok()?;
            let dst: u32 = ctx.load(16).ok()?;
            let udp = u32::from(protocol) == IPPROTO_UDP && (20..=60).contains(&header_len);
            (
                v4_mapped(src),
                v4_mapped(dst),
                if udp { header_len } else { 0 },
            )
        }
        6 => {
            let next: u8 = ctx.load(6).ok()?;
            let src: [u32; 4] = ctx.load(8).ok()?;
            let dst: [u32; 4] = ctx.load(24).ok()?;
            (
                src,
                dst,
                if u32::from(next) == IPPROTO_UDP {
                    40
                } else {
                    0
                },
            )
        }
        _ => return None,
    };
    let mut packet = Packet {
        src,
        dst,
        udp_src: 0,
        udp_dst: 0,
    };
    if l4_offset != 0 {
        let ports: u32 = ctx.load(l4_offset as usize).unwrap_or(0);
        let [a, b, c, d] = ports.to_ne_bytes();
        packet.udp_src = u16::from_be_bytes([a, b]);
        packet.udp_dst = u16::from_be_bytes([c, d]);
    }
    Some(packet)
}

/// The backstop: whatever the other hooks missed, no packet leaves a tagged cgroup for anything
/// but loopback. DNS datagrams to brokerd also get their sender recorded here, where the source
/// port is known (for a connected UDP socket it is not yet bound at connect time).
#[cgroup_skb(egress)]
pub fn loopback_egress(ctx: SkBuffContext) -> i32 {
    let Some(packet) = parse(&ctx) else {
        count(Counter::EgressDropped);
        return DROP;
    };
    if !is_loopback6(&packet.dst) {
        count(Counter::EgressDropped);
        return DROP;
    }
    if let Some(cfg) = config() {
        if cfg.dns_port != 0 && packet.udp_dst == cfg.dns_port {
            // SAFETY: bpf_get_socket_cookie accepts an skb context.
            let cookie = unsafe { bpf_get_socket_cookie(ctx.as_ptr()) };
            // SAFETY: copied out immediately.
            if let Some(origin) = unsafe { ORIGIN_BY_COOKIE.get(&cookie) }.copied() {
                if !dns_paced(origin.cgroup_id) {
                    return DROP;
                }
                let key = PeerKey {
                    netns_cookie: origin.netns_cookie,
                    addr: packet.src,
                    port: u32::from(packet.udp_src),
                    _pad: 0,
                };
                let _ = DNS_BY_PEER.insert(&key, &origin, 0);
            }
        }
    }
    PASS
}

/// Nothing but loopback reaches a tagged cgroup's sockets (an agent's `listen()` without `bind()`
/// autobinds to the wildcard address; this keeps it unreachable from the network).
#[cgroup_skb(ingress)]
pub fn loopback_ingress(ctx: SkBuffContext) -> i32 {
    match parse(&ctx) {
        Some(packet) if is_loopback6(&packet.src) => PASS,
        _ => {
            count(Counter::IngressDropped);
            DROP
        }
    }
}

/// The local address of a sock_ops socket in the network namespace with cookie `netns_cookie`,
/// in both forms: IPv4 (as v4-mapped IPv6) and IPv6.
#[inline(always)]
fn local_keys(ctx: &SockOpsContext, netns_cookie: u64) -> (PeerKey, PeerKey) {
    // Read every field at its fixed offset first: the verifier rejects a context access through
    // a pointer whose offset depends on a branch, which is what the optimiser makes of reading
    // one field or the other.
    let ops = ctx.ops;
    // SAFETY: `ops` is the valid bpf_sock_ops the kernel passed; volatile keeps each read a
    // separate load at a constant offset.
    let (local_ip4, local_ip6, local_port) = unsafe {
        (
            core::ptr::read_volatile(&(*ops).local_ip4),
            [
                core::ptr::read_volatile(&(*ops).local_ip6[0]),
                core::ptr::read_volatile(&(*ops).local_ip6[1]),
                core::ptr::read_volatile(&(*ops).local_ip6[2]),
                core::ptr::read_volatile(&(*ops).local_ip6[3]),
            ],
            core::ptr::read_volatile(&(*ops).local_port),
        )
    };
    (
        PeerKey {
            netns_cookie,
            addr: v4_mapped(local_ip4),
            port: local_port,
            _pad: 0,
        },
        PeerKey {
            netns_cookie,
            addr: local_ip6,
            port: local_port,
            _pad: 0,
        },
    )
}

/// Deletes the record under `key` if it is this socket's (another socket may have made a newer
/// one for the same address).
#[inline(always)]
fn forget_redirect(key: &PeerKey, cookie: u64) {
    // SAFETY: only the cookie is read, at once.
    let ours = unsafe { REDIRECT_BY_PEER.get(key) }.is_some_and(|r| r.cookie == cookie);
    if ours {
        let _ = REDIRECT_BY_PEER.remove(key);
    }
}

#[sock_ops]
pub fn rekey_origin(ctx: SockOpsContext) -> u32 {
    let op = ctx.op();
    if op == BPF_SOCK_OPS_TCP_CONNECT_CB {
        // SAFETY: bpf_get_socket_cookie accepts a sock_ops context.
        let cookie = unsafe { bpf_get_socket_cookie(ctx.as_ptr()) };
        // SAFETY: the value is copied out before any other map operation.
        if let Some(origin) = unsafe { ORIGIN_BY_COOKIE.get(&cookie) } {
            let origin = *origin;
            // The namespace connect4/6 recorded: the socket's own, where its local address is.
            let (key4, key6) = local_keys(&ctx, origin.netns_cookie);
            // Which local address to key by follows from which listener the connect went to:
            // IPv4 and v4-mapped connections have their source in the IPv4 field.
            let key = if origin.via_v4 != 0 { key4 } else { key6 };
            let redirect = Redirect { origin, cookie };
            if REDIRECT_BY_PEER.insert(&key, &redirect, 0).is_err() {
                count(Counter::RekeyFailed);
            }
            // From now on the kernel reports this socket's state changes (below), so its
            // records go when it closes, whether brokerd ever accepted the connection or not.
            if ctx.set_cb_flags(BPF_SOCK_OPS_STATE_CB_FLAG as i32).is_err() {
                count(Counter::RekeyFailed);
            }
        }
    } else if op == BPF_SOCK_OPS_STATE_CB && ctx.arg(1) == BPF_TCP_CLOSE {
        // args: the old state, the new state. TCP_CLOSE is every socket's last state (a refused
        // or timed-out connect, a reset, the end of a connection, TIME_WAIT taking over); the
        // local address is still assigned when this runs.
        // SAFETY: bpf_get_socket_cookie accepts a sock_ops context.
        let cookie = unsafe { bpf_get_socket_cookie(ctx.as_ptr()) };
        // The socket's namespace from the helper, not from its origin record: that covers a
        // record the LRU map evicted too.
        // SAFETY: bpf_get_netns_cookie accepts a sock_ops context.
        let netns = unsafe { bpf_get_netns_cookie(ctx.as_ptr()) };
        let (key4, key6) = local_keys(&ctx, netns);
        forget_redirect(&key4, cookie);
        forget_redirect(&key6, cookie);
        // Cookies are never reused, so this only keeps the LRU map small; a socket that
        // connects again after a failed connect records itself again in connect4/6.
        let _ = ORIGIN_BY_COOKIE.remove(&cookie);
    }
    1
}

#[inline(always)]
fn recorded_origin(ctx: &SockAddrContext) -> Option<Origin> {
    // SAFETY: bpf_get_socket_cookie accepts a sock_addr context.
    let cookie = unsafe { bpf_get_socket_cookie(ctx.as_ptr()) };
    // SAFETY: copied out immediately.
    unsafe { ORIGIN_BY_COOKIE.get(&cookie) }.copied()
}

#[cgroup_sock_addr(getpeername4)]
pub fn restore_peer4(ctx: SockAddrContext) -> i32 {
    if let Some(origin) = recorded_origin(&ctx) {
        if origin.family == AF_INET {
            let sa = sock_addr(&ctx);
            sa.user_ip4 = origin.dst_addr[3];
            sa.user_port = u32::from(origin.dst_port.to_be());
        }
    }
    ALLOW
}

#[cgroup_sock_addr(getpeername6)]
pub fn restore_peer6(ctx: SockAddrContext) -> i32 {
    if let Some(origin) = recorded_origin(&ctx) {
        if origin.family == AF_INET6 {
            let sa = sock_addr(&ctx);
            write_user_ip6(sa, origin.dst_addr);
            sa.user_port = u32::from(origin.dst_port.to_be());
        }
    }
    ALLOW
}

/// Socket families no agent needs and the cgroup hooks cannot see: AF_KEY, AF_PACKET, AF_ALG,
/// AF_SMC, AF_XDP and AF_VSOCK (which reaches the hypervisor without any privilege).
const DENIED_FAMILIES: [i32; 6] = [15, 17, 38, 43, 44, 40];
/// AF_NETLINK: only NETLINK_ROUTE (protocol 0, which getaddrinfo and getifaddrs use) is
/// allowed; NETLINK_SOCK_DIAG would list the host's sockets.
const AF_NETLINK: i32 = 16;
const NETLINK_ROUTE: i32 = 0;
const EPERM: i32 = 1;

/// Whether the current task is in a tagged cgroup or below one.
#[inline(always)]
fn current_task_tagged() -> bool {
    let mut level = 1;
    while level <= MAX_CGROUP_DEPTH {
        // SAFETY: no pointers; the helper returns 0 above the task's own level.
        let id = unsafe { bpf_get_current_ancestor_cgroup_id(level) };
        if id == 0 {
            return false;
        }
        // SAFETY: only the presence of the key is used.
        if unsafe { TAGGED_IDS.get(&id) }.is_some() {
            return true;
        }
        level += 1;
    }
    false
}

/// Optional BPF LSM layer (loaded only where the kernel allows BPF LSM programs): refuses the
/// families of [`DENIED_FAMILIES`] and netlink but NETLINK_ROUTE to tagged cgroups, beside the
/// launcher's seccomp filter, so it also covers agents started without `brokerctl run`.
#[lsm(hook = "socket_create")]
pub fn lsm_socket_families(ctx: LsmContext) -> i32 {
    // socket_create(int family, int type, int protocol, int kern), then the previous verdict.
    let (family, protocol, kern, previous): (i32, i32, i32, i32) =
        (ctx.arg(0), ctx.arg(2), ctx.arg(3), ctx.arg(4));
    if previous != 0 {
        return previous;
    }
    let denied =
        DENIED_FAMILIES.contains(&family) || (family == AF_NETLINK && protocol != NETLINK_ROUTE);
    if kern != 0 || !denied {
        return 0;
    }
    if current_task_tagged() { -EPERM } else { 0 }
}

#[cfg(not(test))]
#[panic_handler]
fn panic(_info: &core::panic::PanicInfo) -> ! {
    loop {}
}

#[unsafe(link_section = "license")]
#[unsafe(no_mangle)]
static LICENSE: [u8; 4] = *b"GPL\0";
