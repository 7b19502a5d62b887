//! agent-broker's kernel side: cgroup programs that hand every outbound TCP connection of a
//! tagged cgroup to brokerd.
//!
//! - `connect4`/`connect6` record who is connecting where ([`Origin`], keyed by socket cookie) and
//!   rewrite the destination to brokerd's listener. If the record cannot be stored, or no broker
//!   is configured, the connect fails with EPERM: a connection is never let through unrecorded.
//! - `sockops` re-keys the record by the agent socket's local address at
//!   `BPF_SOCK_OPS_TCP_CONNECT_CB` (source port assigned, SYN not yet sent), so brokerd can find it
//!   from the accepted socket's peer address without racing the handshake.
//! - `getpeername4`/`getpeername6` show the agent the address it asked for, not the broker's.
//!
//! These programs must never let a tagged cgroup's TCP connect reach any address but the broker.
#![no_std]
#![no_main]

use agent_broker_common::{
    AF_INET, AF_INET6, BrokerConfig, COUNTER_COUNT, Counter, ORIGIN_MAP_CAPACITY, Origin, PeerKey,
    is_v4_mapped, v4_mapped,
};
use aya_ebpf::{
    EbpfContext as _,
    bindings::{BPF_SOCK_OPS_TCP_CONNECT_CB, bpf_sock_addr},
    helpers::{
        bpf_get_current_cgroup_id, bpf_get_current_comm, bpf_get_current_pid_tgid,
        generated::bpf_get_socket_cookie,
    },
    macros::{cgroup_sock_addr, map, sock_ops},
    maps::{Array, LruHashMap, PerCpuArray},
    programs::{SockAddrContext, SockOpsContext},
};
use aya_log_ebpf::warn;

/// Return values of cgroup sock_addr programs.
const ALLOW: i32 = 1;
const REFUSE: i32 = 0;
const SOCK_STREAM: u32 = 1;

#[map]
static ORIGIN_BY_COOKIE: LruHashMap<u64, Origin> = LruHashMap::pinned(ORIGIN_MAP_CAPACITY, 0);

#[map]
static ORIGIN_BY_PEER: LruHashMap<PeerKey, Origin> = LruHashMap::pinned(ORIGIN_MAP_CAPACITY, 0);

#[map]
static CONFIG: Array<BrokerConfig> = Array::pinned(1, 0);

#[map]
static COUNTERS: PerCpuArray<u64> = PerCpuArray::pinned(COUNTER_COUNT, 0);

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
    };
    // SAFETY: bpf_get_socket_cookie accepts a sock_addr context.
    let cookie = unsafe { bpf_get_socket_cookie(ctx.as_ptr()) };
    if ORIGIN_BY_COOKIE.insert(&cookie, &origin, 0).is_err() {
        warn!(ctx, "agent-broker: cannot record origin, refusing connect");
        return false;
    }
    true
}

#[cgroup_sock_addr(connect4)]
pub fn redirect_connect4(ctx: SockAddrContext) -> i32 {
    let sa = sock_addr(&ctx);
    if sa.type_ != SOCK_STREAM {
        // UDP and other datagram sockets belong to the bypass-resistance hook set.
        return ALLOW;
    }
    let Some(cfg) = config() else {
        count(Counter::Refused);
        return REFUSE;
    };
    if !record(&ctx, v4_mapped(sa.user_ip4), sa.user_port, AF_INET, true) {
        count(Counter::Refused);
        return REFUSE;
    }
    sa.user_ip4 = cfg.v4_addr;
    sa.user_port = u32::from(cfg.port.to_be());
    count(Counter::Redirected);
    ALLOW
}

#[cgroup_sock_addr(connect6)]
pub fn redirect_connect6(ctx: SockAddrContext) -> i32 {
    let sa = sock_addr(&ctx);
    if sa.type_ != SOCK_STREAM {
        return ALLOW;
    }
    let Some(cfg) = config() else {
        count(Counter::Refused);
        return REFUSE;
    };
    let dst = read_user_ip6(sa);
    // A v4-mapped destination is an IPv4 connection on the wire: send it to the IPv4 listener
    // through its mapped form, so the socket stays a valid AF_INET6 socket.
    let mapped = is_v4_mapped(&dst);
    if !record(&ctx, dst, sa.user_port, AF_INET6, mapped) {
        count(Counter::Refused);
        return REFUSE;
    }
    write_user_ip6(
        sa,
        if mapped {
            v4_mapped(cfg.v4_addr)
        } else {
            cfg.v6_addr
        },
    );
    sa.user_port = u32::from(cfg.port.to_be());
    count(Counter::Redirected);
    ALLOW
}

#[sock_ops]
pub fn rekey_origin(ctx: SockOpsContext) -> u32 {
    if ctx.op() == BPF_SOCK_OPS_TCP_CONNECT_CB {
        // SAFETY: bpf_get_socket_cookie accepts a sock_ops context.
        let cookie = unsafe { bpf_get_socket_cookie(ctx.as_ptr()) };
        // SAFETY: the value is copied out before any other map operation.
        if let Some(origin) = unsafe { ORIGIN_BY_COOKIE.get(&cookie) } {
            let origin = *origin;
            // Read every field at its fixed offset first: the verifier rejects a context access
            // through a pointer whose offset depends on a branch, which is what the optimiser
            // makes of reading one field or the other.
            let ops = ctx.ops;
            // SAFETY: `ops` is the valid bpf_sock_ops the kernel passed; volatile keeps each
            // read a separate load at a constant offset.
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
            // Which local address to key by follows from which listener the connect went to:
            // IPv4 and v4-mapped connections have their source in the IPv4 field.
            let addr = if origin.via_v4 != 0 {
                v4_mapped(local_ip4)
            } else {
                local_ip6
            };
            let key = PeerKey {
                addr,
                port: local_port,
            };
            if ORIGIN_BY_PEER.insert(&key, &origin, 0).is_err() {
                count(Counter::RekeyFailed);
            }
        }
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

#[cfg(not(test))]
#[panic_handler]
fn panic(_info: &core::panic::PanicInfo) -> ! {
    loop {}
}

#[unsafe(link_section = "license")]
#[unsafe(no_mangle)]
static LICENSE: [u8; 4] = *b"GPL\0";
