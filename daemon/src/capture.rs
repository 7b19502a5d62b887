//! The kernel path: loads the eBPF programs, tags cgroups with pinned links, and resolves each
//! redirected connection to the [`ConnectionOrigin`] the programs recorded.
//!
//! # Whose connection is it
//!
//! The programs record a redirected connect at `BPF_SOCK_OPS_TCP_CONNECT_CB` under the agent
//! socket's network namespace and local address (the peer address brokerd sees when it accepts
//! in that namespace), together with that socket's cookie. An address is no identity: once the agent's socket is gone, or beside it
//! with `SO_REUSEADDR`, any local process can bind it and dial brokerd, and the record of a
//! connect that never reaches brokerd's `accept` (brokerd down or restarting, a full backlog, a
//! SYN the listener drops, such as one carrying a TCP-MD5 option) stays as long as the agent
//! keeps that socket. So brokerd hands out an origin only to a connection whose far end is the
//! recorded socket itself: at accept it asks the kernel (sock_diag, [`sock_diag::far_end`])
//! which socket is at the other end of the accepted connection, by the connection's address
//! pair, and compares that socket's cookie with the recorded one. Anything else is refused, and
//! the record is left for its own socket.
//!
//! Why sock_diag: the accepted socket is brokerd's, not the agent's, and carries no trace of the
//! socket that dialed; the kernel's connection table does, exactly (one socket per address pair
//! in a network namespace, the table packets are delivered by), for any listener, and it costs
//! two system calls per accepted connection (about 16 us in a debug build). The alternatives are
//! weaker: a sockops program on brokerd's side (`PASSIVE_ESTABLISHED_CB`) would have to be
//! attached to brokerd's own cgroup or the root cgroup and could still only match the record by
//! address; socket storage and sockmaps hold per-socket data but do not link the two ends of a
//! connection; BPF LSM and tracing programs, which could, do not load on the hosts this must run
//! on. Records also die with their socket: sockops asks for the socket's state changes and
//! deletes its records when it reaches `TCP_CLOSE`; at start brokerd deletes the records whose
//! socket no longer exists ([`prune_stale_records`]); and the map is LRU.
//!
//! Which network namespaces are served is the pinned `NETNS_LISTENERS` map (netns cookie to
//! listener addresses): brokerd inserts its own namespace's entry at start, and the programs
//! refuse (EPERM, counted as netns refused) a connect or send from a namespace with no entry.
//! A workload with a namespace of its own gets an entry once brokerd has opened and serves its
//! listeners there ([`netns`]); an accept-side lookup is keyed by the cookie of the namespace
//! whose listener accepted, and asks sock_diag through a socket made in that namespace.
//!
//! The same lookup tells whose listener answered an upstream connection brokerd made
//! ([`OriginResolver::listener_owner`]): the cgroup the kernel recorded for it.
//!
//! This is the only module that uses aya. One thread ([`CaptureOwner`]) owns the loaded object and
//! the links; everything else talks to it through [`CaptureHandle`] and gets a reply on a oneshot
//! channel. The accept path only needs [`OriginResolver`], which holds its own map handle.
//!
//! Fail closed: links are pinned under `<pin-dir>/links`, maps under `<pin-dir>/maps`. Both outlive
//! brokerd, so while it is down the programs keep redirecting to a port nobody listens on
//! (ECONNREFUSED) instead of letting connections go direct. A restarted brokerd reuses the pinned
//! maps and adopts the pinned links instead of attaching twice.

use std::{
    collections::{BTreeMap, HashMap},
    fs,
    net::{Ipv4Addr, Ipv6Addr, SocketAddr, SocketAddrV4, SocketAddrV6},
    os::unix::fs::{DirBuilderExt as _, PermissionsExt as _},
    path::{Path, PathBuf},
    sync::{Arc, Mutex},
};

use agent_broker_common::{
    self as common, AF_INET, BrokerConfig, Counter, NetnsListener, Origin, PeerKey, Redirect,
    is_v4_mapped, v4_mapped,
};
use agent_broker_core::fmt::error_chain;
use agent_broker_protocol::{Counters, TaggedCgroup};
use aya::{
    Ebpf, EbpfLoader,
    maps::{Array, HashMap as BpfHashMap, MapData, PerCpuArray},
    programs::{
        CgroupAttachMode, CgroupSkb, CgroupSock, CgroupSockAddr, SockOps,
        links::{FdLink, PinnedLink},
    },
};
use tokio::sync::{mpsc, oneshot, watch};
use tracing::{info, warn};

use agent_broker_core::{
    agent_name::{self, NameError, NamedTag},
    cgroup::{CgroupError, CgroupId, CgroupPath, CgroupRoot},
};

mod link_update;
mod names;
pub mod netns;
pub mod original_dst;
pub mod sock_diag;
mod unix_hooks;
use unix_hooks::{UNIX_HOOKS, UnixPrograms};

/// The eBPF object built by `cargo xtask build`, embedded at compile time.
#[cfg(not(ebpf_object_skipped))]
static EBPF_OBJECT: &[u8] = aya::include_bytes_aligned!(env!("AGENT_BROKER_EBPF_OBJ"));
/// Built with `AGENT_BROKER_EBPF_SKIP` (see build.rs): no programs, and capture refuses to start.
#[cfg(ebpf_object_skipped)]
static EBPF_OBJECT: &[u8] = &[];

/// The programs attached to every tagged cgroup, by program name and pin file name. Besides
/// these, the two AF_UNIX hooks of [`unix_hooks`] are attached to every tagged cgroup.
const PROGRAMS: [(&str, &str); 14] = [
    (common::programs::CONNECT4, "connect4"),
    (common::programs::CONNECT6, "connect6"),
    (common::programs::SOCKOPS, "sockops"),
    (common::programs::GETPEERNAME4, "getpeername4"),
    (common::programs::GETPEERNAME6, "getpeername6"),
    (common::programs::SENDMSG4, "sendmsg4"),
    (common::programs::SENDMSG6, "sendmsg6"),
    (common::programs::RECVMSG4, "recvmsg4"),
    (common::programs::RECVMSG6, "recvmsg6"),
    (common::programs::SOCK_CREATE, "sock_create"),
    (common::programs::BIND4, "bind4"),
    (common::programs::BIND6, "bind6"),
    (common::programs::EGRESS, "egress"),
    (common::programs::INGRESS, "ingress"),
];

/// How many links a fully tagged cgroup has.
pub const LINKS_PER_CGROUP: usize = PROGRAMS.len() + UNIX_HOOKS.len();

/// The hooks brokerd attaches to a tagged cgroup, for `brokerctl status` and `doctor`.
pub fn hook_names() -> Vec<String> {
    PROGRAMS
        .iter()
        .map(|(_, pin)| pin.to_string())
        .chain(UNIX_HOOKS.iter().map(|h| h.pin_name.to_string()))
        .collect()
}

/// Attach flags for the cgroup links. The kernel refuses any flag on a cgroup `BPF_LINK_CREATE`
/// and always attaches links as multi-program, so other tools' programs on the same cgroup keep
/// working and ours keep running beside them.
const LINK_MODE: CgroupAttachMode = CgroupAttachMode::Single;

/// Errors of the capture layer.
#[derive(Debug, thiserror::Error)]
pub enum CaptureError {
    #[error("cannot prepare the bpffs pin directory {path}: {message}")]
    PinDir { path: PathBuf, message: String },
    #[error(
        "this brokerd was built without its eBPF programs (AGENT_BROKER_EBPF_SKIP): build it \
         with `cargo xtask build`"
    )]
    NotBuilt,
    #[error("cannot load the eBPF programs (is this root on a kernel with BPF and BTF?)")]
    Load(#[source] aya::EbpfError),
    #[error("eBPF program {name}: {message}")]
    Program { name: &'static str, message: String },
    #[error("eBPF map {name}: {message}")]
    Map { name: &'static str, message: String },
    #[error(transparent)]
    Cgroup(#[from] CgroupError),
    #[error(transparent)]
    Name(#[from] NameError),
    #[error("cannot record the agent name of cgroup {path}: {message}")]
    NameEntry { path: CgroupPath, message: String },
    #[error("cgroup {path} {reason}")]
    Forbidden { path: CgroupPath, reason: String },
    #[error("cgroup {0} is not tagged")]
    NotTagged(CgroupPath),
    #[error("cannot attach to cgroup {path}: {message}")]
    Attach { path: CgroupPath, message: String },
    #[error("cannot detach from cgroup {path}: {message}")]
    Detach { path: CgroupPath, message: String },
    #[error("the capture thread has stopped")]
    Stopped,
    #[error(
        "this brokerd runs --unprivileged: it loads no eBPF programs, so it cannot tag \
         cgroups; start agents with `brokerctl run --unprivileged --as NAME -- CMD`"
    )]
    Unprivileged,
    #[error(
        "--require-lsm: the BPF LSM program cannot be used on this host: {0} (BPF LSM needs \
         `bpf` in the kernel's lsm= list and a kernel that lets LSM programs load)"
    )]
    LsmRequired(String),
}

/// Why one program could not be loaded, attached or pinned.
#[derive(Debug, thiserror::Error)]
pub enum HookError {
    #[error("missing from the eBPF object")]
    Missing,
    #[error("unexpected program type")]
    UnexpectedType,
    #[error("a cgroup_skb program without ingress/egress in its section name")]
    NoDirection,
    #[error("`bpf` is not in /sys/kernel/security/lsm (or securityfs is not mounted)")]
    LsmNotListed,
    #[error("kernel BTF")]
    Btf(#[source] aya::BtfError),
    #[error(transparent)]
    Program(#[from] aya::programs::ProgramError),
    #[error(transparent)]
    Link(#[from] aya::programs::links::LinkError),
    #[error("pin {}", .path.display())]
    Pin {
        path: PathBuf,
        #[source]
        source: aya::pin::PinError,
    },
    #[error(transparent)]
    Dir(Box<CaptureError>),
}

/// Where the programs keep their state and where they redirect to.
#[derive(Clone, Debug)]
pub struct CaptureConfig {
    /// The cgroup2 hierarchy.
    pub root: CgroupRoot,
    /// bpffs directory for pinned maps and links.
    pub pin_dir: PathBuf,
    /// The broker's IPv4 listener.
    pub listen_v4: SocketAddrV4,
    /// The broker's IPv6 listener, if any. Without one, IPv6 connects go to the IPv4 listener's
    /// v4-mapped address.
    pub listen_v6: Option<SocketAddrV6>,
    /// The port of brokerd's UDP DNS listener (on the same addresses); 0 refuses all DNS.
    pub dns_port: u16,
    /// Fail unless the optional BPF LSM program loads and attaches.
    pub require_lsm: bool,
}

/// A tagged cgroup as the capture layer knows it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Tag {
    pub path: CgroupPath,
    pub id: CgroupId,
    /// The agent name it runs under (`attach --as`); its path when it was given none.
    pub name: CgroupPath,
}

impl Tag {
    fn named(&self) -> NamedTag<'_> {
        NamedTag {
            cgroup: &self.path,
            name: &self.name,
        }
    }
}

/// The set of tagged cgroups, replaced whole on every change.
pub type TagSet = Arc<Vec<Tag>>;

/// Who opened a redirected connection and where it was going.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ConnectionOrigin {
    /// The agent: the tagged cgroup (or a cgroup below one) the connecting thread was in, as
    /// named by its tag ([`agent_name`]: `NAME/x` for the cgroup `x` below a tag attached
    /// `--as NAME`). Policy, handles, shares and audit records know agents by this.
    pub cgroup: CgroupPath,
    /// The real cgroup path, when it differs from `cgroup` (a named tag).
    pub cgroup_path: Option<CgroupPath>,
    /// The pod, for a cgroup a pod source tagged ([`OriginResolver::set_pod`]).
    pub pod: Option<agent_broker_protocol::PodRef>,
    pub cgroup_id: CgroupId,
    /// Process id (thread group id).
    pub pid: u32,
    /// Thread id.
    pub tid: u32,
    pub comm: String,
    /// The process's executable, when it could still be read once the agent's share admitted
    /// the connection or query ([`ConnectionOrigin::with_exe`]); none on refusals for a share.
    pub exe: Option<String>,
    /// The destination the agent asked for.
    pub original_dst: SocketAddr,
    /// From an unprivileged sandbox ([`crate::sandbox`]): brokerd dials for it with the user's
    /// own network reach, so a destination that is not a public address must be proven to
    /// be the name a rule matched ([`ConnectionOrigin::needs_proven_address`]).
    pub sandboxed: bool,
}

impl ConnectionOrigin {
    /// Whether a rule that matches this connection by name lets it through only once the
    /// address it dialed is proven to be the name's (brokerd's DNS answer to the agent, or
    /// brokerd's own lookup), even where a verified certificate proves the name: an
    /// unprivileged sandbox's connection to an address that is not public (loopback, private,
    /// link-local such as cloud metadata, unique-local, carrier-grade NAT, multicast). An `ip`
    /// rule naming the address needs no proof.
    pub fn needs_proven_address(&self) -> bool {
        self.sandboxed && !agent_broker_core::net::is_public(self.original_dst.ip())
    }

    /// The origin with its process's executable, read from /proc now. Done only for what an
    /// agent's share admits (a readlink per refused connection would let a flood spend
    /// brokerd's time on lookups). A short-lived process may be gone already; the record keeps
    /// pid and comm.
    pub fn with_exe(mut self) -> Self {
        if self.exe.is_none() {
            self.exe = std::fs::read_link(format!("/proc/{}/exe", self.pid))
                .ok()
                .map(|p| printable(&p.display().to_string()));
        }
        self
    }
}

/// `text` (a process's command or executable, which the agent chooses) with its control
/// characters as `?`: a newline in a command name must not start a line of brokerd's log.
pub fn printable(text: &str) -> String {
    text.chars()
        .map(|c| if c.is_control() { '?' } else { c })
        .collect()
}

/// Why an accepted connection has no origin.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum ResolveError {
    #[error(
        "no redirect record for peer {0} (not a redirected connection, or the record was evicted)"
    )]
    NoRecord(SocketAddr),
    #[error(
        "peer {peer} is not the socket that was redirected from that address (a redirect record \
         exists for the address, made by another socket): not a redirected connection"
    )]
    NotTheRedirectedSocket { peer: SocketAddr },
    #[error(
        "the socket at peer {0} is gone (sock_diag finds no socket at the far end of the \
         connection): its origin cannot be proven"
    )]
    PeerGone(SocketAddr),
    #[error("cannot identify the socket at peer {peer}: {message}")]
    Diag { peer: SocketAddr, message: String },
    #[error("cgroup id {0} of the connecting process is in no tagged cgroup")]
    UnknownCgroup(CgroupId),
    #[error("redirect map lookup failed: {0}")]
    Map(String),
}

/// Who owns the socket at the far end of a connection brokerd made (see
/// [`OriginResolver::listener_owner`]).
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum ListenerOwner {
    /// A socket created in a tagged cgroup (or below one): an agent's.
    Agent(CgroupPath),
    /// A socket on this host created outside every tagged cgroup.
    Other,
    /// No socket on this host holds the far end (another host), or none a process can read
    /// from any more (`TIME_WAIT`).
    NotLocal,
    /// The far end is still completing its handshake: ask again.
    Unsettled,
}

/// Resolves accepted connections to their origin. Shared by all accept tasks.
pub struct OriginResolver {
    /// The programs' redirect and DNS records; none in the unprivileged mode
    /// ([`start_unprivileged`]), where no connection has one.
    by_peer: Option<Mutex<BpfHashMap<MapData, PeerKey, Redirect>>>,
    dns_by_peer: Option<Mutex<BpfHashMap<MapData, PeerKey, Origin>>>,
    root: CgroupRoot,
    tags: watch::Receiver<TagSet>,
    paths: Mutex<HashMap<CgroupId, CgroupPath>>,
    /// Pods by their tagged pod cgroup, as the pod source registered them.
    pods: Mutex<std::collections::BTreeMap<CgroupPath, agent_broker_protocol::PodRef>>,
}

impl OriginResolver {
    /// Looks up and consumes the record for an accepted connection, from `peer` to brokerd's
    /// `local` address: only when the connection's far end is the very socket the record was
    /// made for (see the module docs). One-shot: a second lookup for the same peer finds
    /// nothing.
    pub fn resolve(
        &self,
        ns: &netns::NetnsCtx,
        peer: SocketAddr,
        local: SocketAddr,
    ) -> Result<ConnectionOrigin, ResolveError> {
        let origin = self.take_record(ns.cookie, peer, || {
            ns.far_end(local, peer)
                .map(|found| found.map(|s| s.cookie))
                .map_err(|e| ResolveError::Diag {
                    peer,
                    message: e.to_string(),
                })
        })?;
        self.origin_of(origin)
    }

    /// Whose socket is at the far end of a TCP connection brokerd made from `local` to `peer`.
    pub fn listener_owner(
        &self,
        local: SocketAddr,
        peer: SocketAddr,
    ) -> Result<ListenerOwner, String> {
        let found = sock_diag::far_end(local, peer).map_err(|e| format!("sock_diag: {e}"))?;
        Ok(match found {
            None => ListenerOwner::NotLocal,
            Some(s) => match s.cgroup_id {
                Some(id) => match self.cgroup_path(CgroupId(id)) {
                    Some(path) => ListenerOwner::Agent(self.agent_of(path).0),
                    None => ListenerOwner::Other,
                },
                None if s.state == sock_diag::TCP_SYN_RECV => ListenerOwner::Unsettled,
                // Closed on that side: nobody reads what is sent.
                None if s.state == sock_diag::TCP_TIME_WAIT => ListenerOwner::NotLocal,
                None => {
                    return Err(format!(
                        "the kernel reported no cgroup for the socket at {peer} (TCP state {})",
                        s.state
                    ));
                }
            },
        })
    }

    /// The origin of a DNS datagram that arrived at brokerd's DNS listener from `peer`. Not
    /// consumed: one agent socket may send many queries. A datagram without a record (a local
    /// process sending to the DNS port directly) has no origin and gets no answer.
    pub fn resolve_dns(
        &self,
        netns_cookie: u64,
        peer: SocketAddr,
    ) -> Result<ConnectionOrigin, ResolveError> {
        let origin = {
            let map = self
                .dns_by_peer
                .as_ref()
                .ok_or(ResolveError::NoRecord(peer))?
                .lock()
                .map_err(|_| ResolveError::Map("resolver lock poisoned".into()))?;
            match map.get(&peer_key(netns_cookie, peer), 0) {
                Ok(o) => o,
                Err(aya::maps::MapError::KeyNotFound) => return Err(ResolveError::NoRecord(peer)),
                Err(e) => return Err(ResolveError::Map(e.to_string())),
            }
        };
        self.origin_of(origin)
    }

    /// The record for `peer`, consumed, if `far_end_cookie` (the cookie of the socket at the far
    /// end of the accepted connection) says the connection comes from the recorded socket.
    fn take_record(
        &self,
        netns_cookie: u64,
        peer: SocketAddr,
        far_end_cookie: impl FnOnce() -> Result<Option<u64>, ResolveError>,
    ) -> Result<Origin, ResolveError> {
        let key = peer_key(netns_cookie, peer);
        let read = || -> Result<Redirect, ResolveError> {
            let map = self
                .by_peer
                .as_ref()
                .ok_or(ResolveError::NoRecord(peer))?
                .lock()
                .map_err(|_| ResolveError::Map("resolver lock poisoned".into()))?;
            match map.get(&key, 0) {
                Ok(r) => Ok(r),
                Err(aya::maps::MapError::KeyNotFound) => Err(ResolveError::NoRecord(peer)),
                Err(e) => Err(ResolveError::Map(e.to_string())),
            }
        };
        let record = read()?;
        check_far_end(peer, record.cookie, far_end_cookie()?)?;
        let mut map = self
            .by_peer
            .as_ref()
            .ok_or(ResolveError::NoRecord(peer))?
            .lock()
            .map_err(|_| ResolveError::Map("resolver lock poisoned".into()))?;
        // Consume it only if it is still that socket's. A failed delete leaves a record that
        // dies with its socket (sockops deletes it at TCP_CLOSE).
        if map.get(&key, 0).is_ok_and(|r| r.cookie == record.cookie) {
            let _ = map.remove(&key);
        }
        Ok(record.origin)
    }

    fn origin_of(&self, origin: Origin) -> Result<ConnectionOrigin, ResolveError> {
        let cgroup_id = CgroupId(origin.cgroup_id);
        let path = self
            .cgroup_path(cgroup_id)
            .ok_or(ResolveError::UnknownCgroup(cgroup_id))?;
        let pod = self.pod_of(&path);
        let (cgroup, cgroup_path) = self.agent_of(path);
        let comm_len = origin
            .comm
            .iter()
            .position(|b| *b == 0)
            .unwrap_or(origin.comm.len());
        Ok(ConnectionOrigin {
            cgroup,
            cgroup_path,
            pod,
            cgroup_id,
            pid: origin.tgid,
            tid: origin.pid,
            comm: printable(&String::from_utf8_lossy(&origin.comm[..comm_len])),
            // Read once the connection or query is within the agent's share
            // ([`ConnectionOrigin::with_exe`]): a flood past it costs no /proc lookup.
            exe: None,
            original_dst: original_dst(&origin),
            sandboxed: false,
        })
    }

    /// Registers (or with `None` forgets) the pod whose pod-level cgroup is `tag`: connections
    /// from it and below it carry the pod in their records.
    pub fn set_pod(&self, tag: CgroupPath, pod: Option<agent_broker_protocol::PodRef>) {
        if let Ok(mut pods) = self.pods.lock() {
            match pod {
                Some(pod) => pods.insert(tag, pod),
                None => pods.remove(&tag),
            };
        }
    }

    /// The pod whose cgroup is `path` or an ancestor of it.
    pub fn pod_of(&self, path: &CgroupPath) -> Option<agent_broker_protocol::PodRef> {
        let pods = self.pods.lock().ok()?;
        pods.iter()
            .find(|(tag, _)| tag.is_ancestor_or_self_of(path))
            .map(|(_, pod)| pod.clone())
    }

    /// The agent a cgroup's connections are attributed to (the name of the tag covering it,
    /// rebased), and its real path when that differs. A cgroup no tag covers any more (detached
    /// since) keeps its path.
    pub fn agent_of(&self, path: CgroupPath) -> (CgroupPath, Option<CgroupPath>) {
        let tags = self.tags();
        match agent_name::agent_of(tags.iter().map(Tag::named), &path) {
            Some((name, _)) if name != path => (name, Some(path)),
            _ => (path, None),
        }
    }

    /// Deletes every redirect and DNS record of the network namespace `netns_cookie` (a
    /// workload's that is no longer served). Returns how many went.
    pub fn forget_netns(&self, netns_cookie: u64) -> usize {
        let mut removed = 0;
        if let Some(Ok(mut map)) = self.by_peer.as_ref().map(Mutex::lock) {
            let keys: Vec<PeerKey> = map
                .keys()
                .filter_map(Result::ok)
                .filter(|k| k.netns_cookie == netns_cookie)
                .collect();
            removed += keys.iter().filter(|k| map.remove(k).is_ok()).count();
        }
        if let Some(Ok(mut map)) = self.dns_by_peer.as_ref().map(Mutex::lock) {
            let keys: Vec<PeerKey> = map
                .keys()
                .filter_map(Result::ok)
                .filter(|k| k.netns_cookie == netns_cookie)
                .collect();
            removed += keys.iter().filter(|k| map.remove(k).is_ok()).count();
        }
        removed
    }

    /// Deletes the redirect records of the namespace `ns` whose socket is gone (see
    /// [`prune_stale_records`]), through a sock_diag socket of that namespace.
    pub fn prune_netns(&self, ns: &netns::NetnsCtx) -> Result<usize, String> {
        let Some(map) = &self.by_peer else {
            return Ok(0);
        };
        let mut map = map
            .lock()
            .map_err(|_| "resolver lock poisoned".to_string())?;
        prune_stale_records(&mut map, ns.cookie, || {
            ns.tcp_cookies().map_err(|e| format!("sock_diag: {e}"))
        })
    }

    /// The tagged cgroups, as last published by the owner.
    pub fn tags(&self) -> TagSet {
        self.tags.borrow().clone()
    }

    fn cgroup_path(&self, id: CgroupId) -> Option<CgroupPath> {
        if let Some(p) = self.paths.lock().ok()?.get(&id) {
            return Some(p.clone());
        }
        let tags = self.tags();
        let found = tags
            .iter()
            .find(|t| t.id == id)
            .map(|t| t.path.clone())
            .or_else(|| {
                tags.iter()
                    .find_map(|t| self.root.find_in_subtree(&t.path, id))
            })?;
        if let Ok(mut cache) = self.paths.lock() {
            // cgroup ids are not reused during a boot, so a cached path only goes stale if the
            // cgroup is renamed, which cgroupfs does not allow.
            if cache.len() > 16_384 {
                cache.clear();
            }
            cache.insert(id, found.clone());
        }
        Some(found)
    }
}

/// Whether an accepted connection from `peer` comes from the socket a record was made for:
/// `recorded` is the record's cookie, `far_end` the cookie of the socket at the other end of the
/// accepted connection (None: there is none any more).
pub fn check_far_end(
    peer: SocketAddr,
    recorded: u64,
    far_end: Option<u64>,
) -> Result<(), ResolveError> {
    match far_end {
        Some(cookie) if cookie == recorded => Ok(()),
        Some(_) => Err(ResolveError::NotTheRedirectedSocket { peer }),
        None => Err(ResolveError::PeerGone(peer)),
    }
}

/// Deletes the redirect records of the network namespace `netns_cookie` whose socket no longer
/// exists (a connect that never reached brokerd, whose socket closed while no program was there
/// to see it), given `live_cookies`, the cookies of every TCP socket of that namespace (listed
/// through a sock_diag socket made there). Returns how many went.
///
/// Only that namespace's records are touched (sock_diag answers for the namespace its socket
/// was made in), so records of any other namespace are left alone: their sockets cannot be seen
/// from there, and absent from that list is no proof they are gone. brokerd prunes its own at
/// start, and each workload's once its listeners are open again ([`OriginResolver::prune_netns`]).
///
/// Records are listed before the sockets, so a record made meanwhile is not touched, and one is
/// deleted only if it still holds the cookie listed.
fn prune_stale_records(
    map: &mut BpfHashMap<MapData, PeerKey, Redirect>,
    netns_cookie: u64,
    live_cookies: impl FnOnce() -> Result<std::collections::HashSet<u64>, String>,
) -> Result<usize, String> {
    let records: Vec<(PeerKey, u64)> = map
        .iter()
        .filter_map(Result::ok)
        .filter(|(k, _)| k.netns_cookie == netns_cookie)
        .map(|(k, r)| (k, r.cookie))
        .collect();
    if records.is_empty() {
        return Ok(0);
    }
    let live = live_cookies()?;
    let mut removed = 0;
    for (key, cookie) in records {
        if live.contains(&cookie) {
            continue;
        }
        if map.get(&key, 0).is_ok_and(|r| r.cookie == cookie) && map.remove(&key).is_ok() {
            removed += 1;
        }
    }
    Ok(removed)
}

/// The map key for a connection accepted (or a datagram received) in the network namespace
/// with cookie `netns_cookie`, from `peer`.
pub fn peer_key(netns_cookie: u64, peer: SocketAddr) -> PeerKey {
    let octets = match peer {
        SocketAddr::V4(a) => a.ip().to_ipv6_mapped().octets(),
        SocketAddr::V6(a) => a.ip().octets(),
    };
    PeerKey {
        netns_cookie,
        addr: words(octets),
        port: u32::from(peer.port()),
        _pad: 0,
    }
}

fn words(octets: [u8; 16]) -> [u32; 4] {
    let mut w = [0u32; 4];
    for (i, chunk) in octets.chunks_exact(4).enumerate() {
        w[i] = u32::from_ne_bytes([chunk[0], chunk[1], chunk[2], chunk[3]]);
    }
    w
}

fn octets(words: &[u32; 4]) -> [u8; 16] {
    let mut o = [0u8; 16];
    for (i, w) in words.iter().enumerate() {
        o[i * 4..i * 4 + 4].copy_from_slice(&w.to_ne_bytes());
    }
    o
}

/// The destination recorded by connect4/connect6: IPv4 (also when the agent used a v4-mapped
/// IPv6 address) or IPv6.
fn original_dst(origin: &Origin) -> SocketAddr {
    let ip6 = Ipv6Addr::from(octets(&origin.dst_addr));
    if origin.family == AF_INET || is_v4_mapped(&origin.dst_addr) {
        let [a, b, c, d] = origin.dst_addr[3].to_ne_bytes();
        SocketAddr::from((Ipv4Addr::new(a, b, c, d), origin.dst_port))
    } else {
        SocketAddr::from((ip6, origin.dst_port))
    }
}

/// The pinned `NETNS_LISTENERS` map: which network namespaces are served, and where their
/// connects are redirected. brokerd's own entry is written at start; workloads' entries are
/// inserted once their listeners are open and served, and deleted first when they are released.
pub struct NetnsMap {
    /// None in the unprivileged mode, which serves no namespace through the programs.
    map: Option<Mutex<BpfHashMap<MapData, u64, NetnsListener>>>,
    host: NetnsListener,
    host_cookie: u64,
}

impl NetnsMap {
    /// Serves the namespace `cookie`: its connects go to brokerd's ports on its loopback, IPv6
    /// ones to `::1` when `v6` (a listener there) or else to the IPv4 listener's v4-mapped
    /// address.
    pub fn insert(&self, cookie: u64, v6: bool, tag: CgroupId) -> Result<(), String> {
        let value = workload_listener(&self.host, v6, tag);
        self.map
            .as_ref()
            .ok_or_else(|| CaptureError::Unprivileged.to_string())?
            .lock()
            .map_err(|_| "NETNS_LISTENERS lock poisoned".to_string())?
            .insert(cookie, value, 0)
            .map_err(|e| e.to_string())
    }

    /// Stops serving the namespace `cookie`: its connects are refused (EPERM) from now on.
    pub fn remove(&self, cookie: u64) -> Result<(), String> {
        if cookie == self.host_cookie {
            return Err("refusing to delete brokerd's own namespace's entry".into());
        }
        let Some(map) = &self.map else {
            return Ok(());
        };
        let mut map = map
            .lock()
            .map_err(|_| "NETNS_LISTENERS lock poisoned".to_string())?;
        if map.get(&cookie, 0).is_err() {
            return Ok(());
        }
        map.remove(&cookie).map_err(|e| e.to_string())
    }

    /// Every served namespace's cookie, brokerd's own included.
    pub fn cookies(&self) -> Vec<u64> {
        match &self.map {
            Some(map) => map
                .lock()
                .map(|m| m.keys().filter_map(Result::ok).collect())
                .unwrap_or_default(),
            None => vec![self.host_cookie],
        }
    }

    /// brokerd's own namespace's cookie.
    pub fn host_cookie(&self) -> u64 {
        self.host_cookie
    }
}

/// The `NETNS_LISTENERS` value of a workload namespace served for the tag `tag`: brokerd's own
/// addresses and ports (its listeners there mirror them), with IPv6 connects sent to the IPv4
/// listener's v4-mapped address when no IPv6 listener could be opened there (`v6` false).
fn workload_listener(host: &NetnsListener, v6: bool, tag: CgroupId) -> NetnsListener {
    NetnsListener {
        v4_addr: host.v4_addr,
        v6_addr: if v6 {
            host.v6_addr
        } else {
            v4_mapped(host.v4_addr)
        },
        port: host.port,
        dns_port: host.dns_port,
        tag_cgroup_id: tag.0,
    }
}

/// A request to the owner thread.
enum Command {
    Attach {
        cgroup: CgroupPath,
        create: bool,
        name: Option<CgroupPath>,
        reply: oneshot::Sender<Result<(TaggedCgroup, bool), CaptureError>>,
    },
    Detach {
        cgroup: CgroupPath,
        reply: oneshot::Sender<Result<(), CaptureError>>,
    },
    Status {
        reply: oneshot::Sender<(Vec<TaggedCgroup>, Counters)>,
    },
}

/// Sends commands to the owner thread.
#[derive(Clone)]
pub struct CaptureHandle {
    tx: mpsc::Sender<Command>,
}

impl CaptureHandle {
    /// Tags a cgroup, under the agent `name` when one is given (see [`agent_name`]). Returns
    /// its state and whether it was already tagged.
    pub async fn attach(
        &self,
        cgroup: CgroupPath,
        create: bool,
        name: Option<CgroupPath>,
    ) -> Result<(TaggedCgroup, bool), CaptureError> {
        let (reply, rx) = oneshot::channel();
        self.send(Command::Attach {
            cgroup,
            create,
            name,
            reply,
        })
        .await?;
        rx.await.map_err(|_| CaptureError::Stopped)?
    }

    /// Untags a cgroup.
    pub async fn detach(&self, cgroup: CgroupPath) -> Result<(), CaptureError> {
        let (reply, rx) = oneshot::channel();
        self.send(Command::Detach { cgroup, reply }).await?;
        rx.await.map_err(|_| CaptureError::Stopped)?
    }

    /// Tagged cgroups and kernel counters.
    pub async fn status(&self) -> Result<(Vec<TaggedCgroup>, Counters), CaptureError> {
        let (reply, rx) = oneshot::channel();
        self.send(Command::Status { reply }).await?;
        rx.await.map_err(|_| CaptureError::Stopped)
    }

    async fn send(&self, cmd: Command) -> Result<(), CaptureError> {
        self.tx.send(cmd).await.map_err(|_| CaptureError::Stopped)
    }
}

/// A tagged cgroup's pinned links.
struct Tagged {
    id: CgroupId,
    /// The agent name it runs under, when it was given one (`attach --as`).
    name: Option<CgroupPath>,
    /// Directory holding this cgroup's link pins.
    pin_dir: PathBuf,
    links: Vec<PinnedLink>,
}

/// Owns the loaded eBPF object and every link. Runs on its own thread.
pub struct CaptureOwner {
    ebpf: Ebpf,
    root: CgroupRoot,
    links_dir: PathBuf,
    tagged: BTreeMap<CgroupPath, Tagged>,
    /// Mirror of `tagged`'s ids for the LSM program.
    tagged_ids: BpfHashMap<MapData, u64, u8>,
    unix: UnixPrograms,
    counters: PerCpuArray<MapData, u64>,
    tags_tx: watch::Sender<TagSet>,
}

/// What [`start`] hands back.
pub struct Capture {
    pub handle: CaptureHandle,
    pub resolver: Arc<OriginResolver>,
    /// Reads `aya-log` records of the programs; drive it with [`drive_logger_until`].
    pub logger: Option<aya_log::EbpfLogger<&'static dyn log::Log>>,
    /// The optional BPF LSM layer: `active: ...` or why it is not loaded.
    pub lsm: String,
    /// The served network namespaces (see [`netns`]).
    pub netns_map: Arc<NetnsMap>,
    /// The owner thread; it ends when every [`CaptureHandle`] is dropped.
    _owner: std::thread::JoinHandle<()>,
}

/// Loads the programs, reuses pinned maps, adopts pinned links, and starts the owner thread.
pub fn start(config: CaptureConfig) -> Result<Capture, CaptureError> {
    if EBPF_OBJECT.is_empty() {
        return Err(CaptureError::NotBuilt);
    }
    prepare_pin_dir(&config.pin_dir)?;
    let maps_dir = config.pin_dir.join("maps");
    let links_dir = config.pin_dir.join("links");
    for dir in [&maps_dir, &links_dir] {
        make_private_dir(dir)?;
    }

    let mut ebpf = EbpfLoader::new()
        .default_map_pin_directory(&maps_dir)
        .load(EBPF_OBJECT)
        .map_err(CaptureError::Load)?;

    let logger = match aya_log::EbpfLogger::init(&mut ebpf) {
        Ok(l) => Some(l),
        Err(e) => {
            warn!(error = %e, "eBPF programs' log records will not be shown");
            None
        }
    };

    for (name, _) in PROGRAMS {
        let program = ebpf.program_mut(name).ok_or(CaptureError::Program {
            name,
            message: "missing from the eBPF object".into(),
        })?;
        let loaded = match program {
            aya::programs::Program::CgroupSockAddr(p) => p.load(),
            aya::programs::Program::SockOps(p) => p.load(),
            aya::programs::Program::CgroupSock(p) => p.load(),
            aya::programs::Program::CgroupSkb(p) => p.load(),
            _ => {
                return Err(CaptureError::Program {
                    name,
                    message: "unexpected program type".into(),
                });
            }
        };
        loaded.map_err(|e| CaptureError::Program {
            name,
            message: error_chain(&e),
        })?;
    }

    let unix = UnixPrograms::load().map_err(|e| CaptureError::Program {
        name: "connect_unix/sendmsg_unix",
        message: e.to_string(),
    })?;

    // Pins of maps whose layout changed: aya would reuse one of the same name as is, so the
    // current maps have new names, and the old ones are read by nothing loaded from now on.
    for legacy in common::maps::LEGACY {
        let _ = fs::remove_file(maps_dir.join(legacy));
    }

    let netns_cookie = own_netns_cookie().map_err(|e| map_error(common::maps::CONFIG, e))?;
    let host_listener = write_config(&mut ebpf, &config, netns_cookie)?;
    let netns_map = take_map(&mut ebpf, common::maps::NETNS_LISTENERS)?;
    let netns_map = Arc::new(NetnsMap {
        map: Some(Mutex::new(
            BpfHashMap::try_from(netns_map)
                .map_err(|e| map_error(common::maps::NETNS_LISTENERS, e))?,
        )),
        host: host_listener,
        host_cookie: netns_cookie,
    });

    let by_peer = take_map(&mut ebpf, common::maps::REDIRECT_BY_PEER)?;
    let mut by_peer: BpfHashMap<MapData, PeerKey, Redirect> =
        BpfHashMap::try_from(by_peer).map_err(|e| map_error(common::maps::REDIRECT_BY_PEER, e))?;
    // Records left by connects that never reached a brokerd (this one was not running) are
    // deleted when their socket is gone; those of live sockets stay (a connection may be
    // waiting in the new listener's backlog already).
    match prune_stale_records(&mut by_peer, netns_cookie, || {
        sock_diag::tcp_cookies().map_err(|e| format!("sock_diag: {e}"))
    }) {
        Ok(0) => {}
        Ok(n) => info!(records = n, "deleted redirect records whose socket is gone"),
        Err(e) => {
            warn!(error = %e, "cannot check the redirect records for stale ones; they are refused at accept all the same")
        }
    }
    let dns_by_peer = take_map(&mut ebpf, common::maps::DNS_BY_PEER)?;
    let dns_by_peer: BpfHashMap<MapData, PeerKey, Origin> =
        BpfHashMap::try_from(dns_by_peer).map_err(|e| map_error(common::maps::DNS_BY_PEER, e))?;
    let tagged_ids = take_map(&mut ebpf, common::maps::TAGGED_IDS)?;
    let tagged_ids: BpfHashMap<MapData, u64, u8> =
        BpfHashMap::try_from(tagged_ids).map_err(|e| map_error(common::maps::TAGGED_IDS, e))?;
    let lsm = match load_lsm(&mut ebpf, &config.pin_dir) {
        Ok(()) => "active: lsm/socket_create refuses AF_PACKET, AF_VSOCK, AF_XDP, AF_SMC, AF_KEY \
                   and AF_ALG in tagged cgroups"
            .to_string(),
        Err(e) if config.require_lsm => return Err(CaptureError::LsmRequired(error_chain(&e))),
        Err(e) => {
            let reason = error_chain(&e);
            info!(%reason, "optional BPF LSM layer not loaded; the cgroup hooks and the launcher's seccomp filter do not need it");
            format!("not loaded: {reason}")
        }
    };
    let counters = take_map(&mut ebpf, common::maps::COUNTERS)?;
    let counters: PerCpuArray<MapData, u64> =
        PerCpuArray::try_from(counters).map_err(|e| map_error(common::maps::COUNTERS, e))?;

    let (tags_tx, tags_rx) = watch::channel(TagSet::default());
    let mut owner = CaptureOwner {
        ebpf,
        root: config.root.clone(),
        links_dir,
        tagged: BTreeMap::new(),
        tagged_ids,
        unix,
        counters,
        tags_tx,
    };
    owner.adopt_pinned_links();

    let resolver = Arc::new(OriginResolver {
        by_peer: Some(Mutex::new(by_peer)),
        dns_by_peer: Some(Mutex::new(dns_by_peer)),
        root: config.root,
        tags: tags_rx,
        paths: Mutex::new(HashMap::new()),
        pods: Mutex::new(std::collections::BTreeMap::new()),
    });
    let (tx, rx) = mpsc::channel(64);
    let owner = std::thread::Builder::new()
        .name("capture".into())
        .spawn(move || owner.run(rx))
        .map_err(|e| CaptureError::Program {
            name: "capture thread",
            message: e.to_string(),
        })?;
    Ok(Capture {
        handle: CaptureHandle { tx },
        resolver,
        logger,
        lsm,
        netns_map,
        _owner: owner,
    })
}

/// The capture layer of the unprivileged mode (`brokerd --unprivileged`, issue 19): no eBPF
/// program is loaded and no cgroup can be tagged (attach and detach answer
/// [`CaptureError::Unprivileged`], status lists nothing). Agents reach brokerd through the
/// listeners `brokerctl run --unprivileged` opens in their own network namespaces
/// ([`crate::sandbox`]), whose connections carry their destination (`SO_ORIGINAL_DST`) and
/// need no redirect record; every other connection has none and is refused.
pub fn start_unprivileged(root: CgroupRoot) -> Result<Capture, CaptureError> {
    let host_cookie = own_netns_cookie().map_err(|e| CaptureError::Map {
        name: "SO_NETNS_COOKIE",
        message: e.to_string(),
    })?;
    let (_tags_tx, tags_rx) = watch::channel(TagSet::default());
    let resolver = Arc::new(OriginResolver {
        by_peer: None,
        dns_by_peer: None,
        root,
        tags: tags_rx,
        paths: Mutex::new(HashMap::new()),
        pods: Mutex::new(std::collections::BTreeMap::new()),
    });
    let (tx, mut rx) = mpsc::channel::<Command>(64);
    let owner = std::thread::Builder::new()
        .name("capture".into())
        .spawn(move || {
            while let Some(command) = rx.blocking_recv() {
                match command {
                    Command::Attach { reply, .. } => {
                        let _ = reply.send(Err(CaptureError::Unprivileged));
                    }
                    Command::Detach { reply, .. } => {
                        let _ = reply.send(Err(CaptureError::Unprivileged));
                    }
                    Command::Status { reply } => {
                        let _ = reply.send((Vec::new(), Counters::default()));
                    }
                }
            }
        })
        .map_err(|e| CaptureError::Program {
            name: "capture thread",
            message: e.to_string(),
        })?;
    Ok(Capture {
        handle: CaptureHandle { tx },
        resolver,
        logger: None,
        lsm: "not loaded: brokerd runs --unprivileged (no eBPF)".into(),
        netns_map: Arc::new(NetnsMap {
            map: None,
            host: NetnsListener::default(),
            host_cookie,
        }),
        _owner: owner,
    })
}

/// Forwards the programs' `aya-log` records to brokerd's log until `cancel` fires.
pub async fn drive_logger_until(
    logger: aya_log::EbpfLogger<&'static dyn log::Log>,
    cancel: tokio_util::sync::CancellationToken,
) {
    // SAFETY: the logger owns its ring buffer fd for its whole life and always reports the same
    // fd; the AsyncFd owns the logger, so the fd outlives the registration.
    let registered = unsafe {
        tokio::io::unix::AsyncFd::register_with_interest(logger, tokio::io::Interest::READABLE)
    };
    let mut fd = match registered {
        Ok(fd) => fd,
        Err(e) => {
            warn!(error = %e, "cannot poll the eBPF log ring buffer");
            return;
        }
    };
    loop {
        let ready = tokio::select! {
            _ = cancel.cancelled() => return,
            r = fd.readable_mut() => r,
        };
        match ready {
            Ok(mut guard) => {
                guard.get_inner_mut().flush();
                guard.clear_ready();
            }
            Err(e) => {
                warn!(error = %e, "eBPF log ring buffer failed");
                return;
            }
        }
    }
}

fn take_map(ebpf: &mut Ebpf, name: &'static str) -> Result<aya::maps::Map, CaptureError> {
    ebpf.take_map(name).ok_or(CaptureError::Map {
        name,
        message: "missing from the eBPF object".into(),
    })
}

fn map_error(name: &'static str, e: impl std::fmt::Display) -> CaptureError {
    CaptureError::Map {
        name,
        message: e.to_string(),
    }
}

/// Publishes the listener addresses to the (pinned, shared) config map, and as the entry of
/// brokerd's own network namespace (`netns_cookie`) in the namespace map, so connects made there
/// are redirected to them. Programs attached by an earlier brokerd read the same maps, so they
/// follow a changed port too.
fn write_config(
    ebpf: &mut Ebpf,
    config: &CaptureConfig,
    netns_cookie: u64,
) -> Result<NetnsListener, CaptureError> {
    let name = common::maps::CONFIG;
    let map = ebpf.map_mut(name).ok_or(CaptureError::Map {
        name,
        message: "missing from the eBPF object".into(),
    })?;
    let mut array: Array<&mut MapData, BrokerConfig> =
        Array::try_from(map).map_err(|e| map_error(name, e))?;
    let v4 = config.listen_v4;
    let v4_be = u32::from_ne_bytes(v4.ip().octets());
    let v6_addr = match config.listen_v6 {
        Some(v6) => words(v6.ip().octets()),
        None => v4_mapped(v4_be),
    };
    let value = BrokerConfig {
        v4_addr: v4_be,
        v6_addr,
        port: v4.port(),
        dns_port: config.dns_port,
        netns_cookie,
    };
    array.set(0, value, 0).map_err(|e| map_error(name, e))?;

    let name = common::maps::NETNS_LISTENERS;
    let map = ebpf.map_mut(name).ok_or(CaptureError::Map {
        name,
        message: "missing from the eBPF object".into(),
    })?;
    let mut listeners: BpfHashMap<&mut MapData, u64, NetnsListener> =
        BpfHashMap::try_from(map).map_err(|e| map_error(name, e))?;
    let own = NetnsListener {
        v4_addr: value.v4_addr,
        v6_addr: value.v6_addr,
        port: value.port,
        dns_port: value.dns_port,
        tag_cgroup_id: 0,
    };
    listeners
        .insert(netns_cookie, own, 0)
        .map_err(|e| map_error(name, e))?;
    Ok(own)
}

impl CaptureOwner {
    fn run(mut self, mut rx: mpsc::Receiver<Command>) {
        while let Some(cmd) = rx.blocking_recv() {
            match cmd {
                Command::Attach {
                    cgroup,
                    create,
                    name,
                    reply,
                } => {
                    let _ = reply.send(self.attach(cgroup, create, name));
                }
                Command::Detach { cgroup, reply } => {
                    let _ = reply.send(self.detach(&cgroup));
                }
                Command::Status { reply } => {
                    let _ = reply.send((self.tagged_report(), self.counters()));
                }
            }
        }
        // Dropping `self` closes the link fds; the pins keep the programs attached.
    }

    fn publish(&mut self) {
        // Keep the LSM program's view in step: stale ids out, current ones in.
        let stale: Vec<u64> = self
            .tagged_ids
            .keys()
            .filter_map(Result::ok)
            .filter(|id| !self.tagged.values().any(|t| t.id.0 == *id))
            .collect();
        for id in stale {
            let _ = self.tagged_ids.remove(&id);
        }
        for t in self.tagged.values() {
            if let Err(e) = self.tagged_ids.insert(t.id.0, 1, 0) {
                warn!(id = t.id.0, error = %e, "cannot record a tagged cgroup for the LSM program");
            }
        }
        let tags: Vec<Tag> = self
            .tagged
            .iter()
            .map(|(path, t)| Tag {
                path: path.clone(),
                id: t.id,
                name: t.name.clone().unwrap_or_else(|| path.clone()),
            })
            .collect();
        self.tags_tx.send_replace(Arc::new(tags));
    }

    fn report(&self, path: &CgroupPath, t: &Tagged) -> TaggedCgroup {
        TaggedCgroup {
            path: path.to_string(),
            name: t.name.as_ref().map(ToString::to_string),
            id: t.id.0,
            processes: self.root.process_count(path),
            links: t.links.len() as u32,
        }
    }

    fn tagged_report(&self) -> Vec<TaggedCgroup> {
        self.tagged.iter().map(|(p, t)| self.report(p, t)).collect()
    }

    fn counters(&self) -> Counters {
        let sum = |c: Counter| {
            self.counters
                .get(&(c as u32), 0)
                .map(|per_cpu| per_cpu.iter().sum())
                .unwrap_or(0)
        };
        Counters {
            redirected: sum(Counter::Redirected),
            refused: sum(Counter::Refused),
            rekey_failed: sum(Counter::RekeyFailed),
            dns_redirected: sum(Counter::DnsRedirected),
            udp_refused: sum(Counter::UdpRefused),
            socket_refused: sum(Counter::SocketRefused),
            bind_refused: sum(Counter::BindRefused),
            egress_dropped: sum(Counter::EgressDropped),
            ingress_dropped: sum(Counter::IngressDropped),
            netns_refused: sum(Counter::NetnsRefused),
            connect_paced: sum(Counter::ConnectPaced),
        }
    }

    /// The tags with the names they run under.
    fn named_tags(&self) -> impl Iterator<Item = NamedTag<'_>> + Clone {
        self.tagged.iter().map(|(path, t)| NamedTag {
            cgroup: path,
            name: t.name.as_ref().unwrap_or(path),
        })
    }

    fn attach(
        &mut self,
        cgroup: CgroupPath,
        create: bool,
        name: Option<CgroupPath>,
    ) -> Result<(TaggedCgroup, bool), CaptureError> {
        // brokerd must never redirect itself: refuse its own cgroup and every ancestor.
        if let Some(own) = self.root.cgroup_of(std::process::id())?
            && cgroup.is_ancestor_or_self_of(&own)
        {
            {
                return Err(CaptureError::Forbidden {
                    path: cgroup,
                    reason: format!(
                        "contains brokerd itself (brokerd runs in {own}); tag a cgroup that \
                         brokerd is not in"
                    ),
                });
            }
        }
        // A name must be the one the cgroup runs under already, if it is tagged or covered, and
        // overlap no other tag's name if it is new.
        if let Some(wanted) = &name {
            agent_name::check(self.named_tags(), &cgroup, wanted)?;
        }
        if let Some(t) = self.tagged.get(&cgroup) {
            return Ok((self.report(&cgroup, t), true));
        }
        // Below a tagged cgroup: already covered, nothing to attach (the cgroup is still
        // created on request, so `brokerctl run` can start an agent there).
        if let Some((path, t)) = self
            .tagged
            .iter()
            .find(|(t, _)| t.is_ancestor_or_self_of(&cgroup))
        {
            if !self.root.exists(&cgroup) {
                if !create {
                    return Err(CgroupError::Missing(cgroup).into());
                }
                self.root.create(&cgroup)?;
            }
            return Ok((self.report(path, t), true));
        }
        // Tagging above a tagged cgroup would run the programs twice on its connects.
        if let Some(other) = self
            .tagged
            .keys()
            .find(|t| cgroup.is_ancestor_or_self_of(t))
        {
            return Err(CaptureError::Forbidden {
                path: cgroup.clone(),
                reason: format!(
                    "contains tagged cgroup {other}; a tag covers every cgroup below it, detach \
                     {other} first to tag at a higher level"
                ),
            });
        }
        // Without a name the path is the name, and it may not overlap a named tag's either.
        if name.is_none() {
            agent_name::check(self.named_tags(), &cgroup, &cgroup)?;
        }
        let name = name.filter(|n| *n != cgroup);
        if let Some(n) = &name
            && agent_name::encode(n).len() > names::MAX_ENCODED
        {
            return Err(CaptureError::NameEntry {
                path: cgroup,
                message: format!(
                    "agent name {n} is too long (at most {} bytes once encoded)",
                    names::MAX_ENCODED
                ),
            });
        }
        if !self.root.exists(&cgroup) {
            if !create {
                return Err(CgroupError::Missing(cgroup).into());
            }
            self.root.create(&cgroup)?;
        }
        let id = self.root.id(&cgroup)?;
        let dir = self.root.dir(&cgroup);
        let cgroup_fd = fs::File::open(&dir).map_err(|e| CaptureError::Attach {
            path: cgroup.clone(),
            message: format!("open {}: {e}", dir.display()),
        })?;
        let pin_dir = self.links_dir.join(link_dir_name(&cgroup, id));
        make_private_dir(&pin_dir)?;
        // The name goes in before the first link, so no link of this tag is ever pinned
        // without it (see `names`).
        if let Some(n) = &name
            && let Err(e) = names::write(&pin_dir, n)
        {
            remove_pins(&pin_dir);
            return Err(CaptureError::NameEntry {
                path: cgroup,
                message: e.to_string(),
            });
        }

        let mut links = Vec::with_capacity(LINKS_PER_CGROUP);
        let mut failure = None;
        for (name, pin_name) in PROGRAMS {
            match self.attach_one(name, &cgroup_fd, &pin_dir.join(pin_name)) {
                Ok(link) => links.push(link),
                Err(e) => {
                    failure = Some(format!("{name}: {}", error_chain(&e)));
                    break;
                }
            }
        }
        if failure.is_none() {
            match self.unix.attach_and_pin(&cgroup_fd, &pin_dir) {
                Ok(unix) => links.extend(unix),
                Err(e) => failure = Some(e.to_string()),
            }
        }
        if let Some(message) = failure {
            // Roll back: never leave a half-tagged cgroup.
            for link in links {
                let _ = link.unpin();
            }
            let _ = names::remove(&pin_dir);
            let _ = fs::remove_dir(&pin_dir);
            return Err(CaptureError::Attach {
                path: cgroup,
                message,
            });
        }
        match &name {
            Some(name) => {
                info!(cgroup = %cgroup, id = id.0, agent = %name, "tagged: connections from this cgroup now go to brokerd, as this agent")
            }
            None => {
                info!(cgroup = %cgroup, id = id.0, "tagged: connections from this cgroup now go to brokerd")
            }
        }
        let tagged = Tagged {
            id,
            name,
            pin_dir,
            links,
        };
        let report = self.report(&cgroup, &tagged);
        self.tagged.insert(cgroup, tagged);
        self.publish();
        Ok((report, false))
    }

    fn attach_one(
        &mut self,
        name: &str,
        cgroup: &fs::File,
        pin: &Path,
    ) -> Result<PinnedLink, HookError> {
        let program = self.ebpf.program_mut(name).ok_or(HookError::Missing)?;
        let fd_link: FdLink = match program {
            aya::programs::Program::CgroupSockAddr(p) => {
                let p: &mut CgroupSockAddr = p;
                let id = p.attach(cgroup, LINK_MODE)?;
                FdLink::try_from(p.take_link(id)?)?
            }
            aya::programs::Program::SockOps(p) => {
                let p: &mut SockOps = p;
                let id = p.attach(cgroup, LINK_MODE)?;
                FdLink::try_from(p.take_link(id)?)?
            }
            aya::programs::Program::CgroupSock(p) => {
                let p: &mut CgroupSock = p;
                let id = p.attach(cgroup, LINK_MODE)?;
                FdLink::try_from(p.take_link(id)?)?
            }
            aya::programs::Program::CgroupSkb(p) => {
                let p: &mut CgroupSkb = p;
                let attach_type = p.expected_attach_type().ok_or(HookError::NoDirection)?;
                let id = p.attach(cgroup, attach_type, LINK_MODE)?;
                FdLink::try_from(p.take_link(id)?)?
            }
            _ => return Err(HookError::UnexpectedType),
        };
        fd_link.pin(pin).map_err(|source| HookError::Pin {
            path: pin.to_path_buf(),
            source,
        })
    }

    fn detach(&mut self, cgroup: &CgroupPath) -> Result<(), CaptureError> {
        let tagged = self
            .tagged
            .remove(cgroup)
            .ok_or_else(|| CaptureError::NotTagged(cgroup.clone()))?;
        let mut failures = Vec::new();
        for link in tagged.links {
            // Unpinning and dropping the last fd detaches the program.
            if let Err(e) = link.unpin() {
                failures.push(e.to_string());
            }
        }
        if let Err(e) = names::remove(&tagged.pin_dir) {
            failures.push(format!("agent name in {}: {e}", tagged.pin_dir.display()));
        }
        if let Err(e) = fs::remove_dir(&tagged.pin_dir) {
            failures.push(format!("{}: {e}", tagged.pin_dir.display()));
        }
        self.publish();
        if failures.is_empty() {
            info!(cgroup = %cgroup, "untagged: connections from this cgroup are no longer redirected");
            Ok(())
        } else {
            Err(CaptureError::Detach {
                path: cgroup.clone(),
                message: failures.join("; "),
            })
        }
    }

    /// Takes over the links an earlier brokerd pinned. A pin whose cgroup is gone (or was
    /// replaced by a new cgroup of the same name) is removed: the kernel already detached it.
    /// Makes the adopted link pinned at `pin` run this build's `program` (see [`link_update`]).
    /// A link that cannot be switched keeps its program: it still never lets a connection go
    /// direct (an earlier build's programs redirect or refuse), but its connections may be
    /// refused at accept until the cgroup is detached and attached again, which the warning says.
    fn run_current_program(&self, cgroup: &CgroupPath, program: &str, pin: &Path) {
        let swapped = self
            .ebpf
            .program(program)
            .ok_or_else(|| "missing from the eBPF object".to_string())
            .and_then(|p| {
                let id = p.info().map_err(|e| e.to_string())?.id();
                let fd = p.fd().map_err(|e| e.to_string())?;
                link_update::run_program(pin, std::os::fd::AsFd::as_fd(fd), id)
                    .map_err(|e| e.to_string())
            });
        match swapped {
            Ok(false) => {}
            Ok(true) => {
                info!(cgroup = %cgroup, program, "adopted link now runs this build's program")
            }
            Err(error) => {
                warn!(cgroup = %cgroup, program, %error, "cannot switch an adopted link to this build's program; detach and attach the cgroup again")
            }
        }
    }

    fn adopt_pinned_links(&mut self) {
        let Ok(entries) = fs::read_dir(&self.links_dir) else {
            return;
        };
        for entry in entries.flatten() {
            let dir = entry.path();
            let Some((cgroup, id)) = entry.file_name().to_str().and_then(parse_link_dir_name)
            else {
                warn!(dir = %dir.display(), "ignoring unrecognised entry in the links pin directory");
                continue;
            };
            let current = self.root.id(&cgroup).ok();
            if current != Some(id) {
                info!(cgroup = %cgroup, "removing pinned links of a cgroup that no longer exists");
                remove_pins(&dir);
                continue;
            }
            // A tag whose name cannot be read is not adopted: its links stay pinned, so its
            // connections are refused (unknown origin) rather than judged under its path.
            let name = match names::read(&dir) {
                Ok(name) => name,
                Err(e) => {
                    warn!(cgroup = %cgroup, dir = %dir.display(), error = %e, "cannot read the agent name of a tagged cgroup; its connections are refused until its pin directory is removed and it is attached again");
                    continue;
                }
            };
            let mut links = Vec::new();
            let pins = PROGRAMS
                .iter()
                .map(|(program, pin)| (Some(*program), *pin))
                .chain(UNIX_HOOKS.iter().map(|h| (None, h.pin_name)));
            for (program, pin_name) in pins {
                let pin = dir.join(pin_name);
                match PinnedLink::from_pin(&pin) {
                    Ok(link) => {
                        // The AF_UNIX hooks are `r0 = 0` in every build; the others may be an
                        // earlier build's, reading maps of an earlier layout.
                        if let Some(program) = program {
                            self.run_current_program(&cgroup, program, &pin);
                        }
                        links.push(link);
                    }
                    Err(e) => warn!(pin = %pin.display(), error = %e, "cannot adopt pinned link"),
                }
            }
            if links.len() != LINKS_PER_CGROUP {
                warn!(cgroup = %cgroup, links = links.len(), "adopted an incompletely tagged cgroup; detach and attach it again");
            }
            match &name {
                Some(name) => {
                    info!(cgroup = %cgroup, agent = %name, links = links.len(), "adopted pinned links")
                }
                None => info!(cgroup = %cgroup, links = links.len(), "adopted pinned links"),
            }
            self.tagged.insert(
                cgroup,
                Tagged {
                    id,
                    name,
                    pin_dir: dir,
                    links,
                },
            );
        }
        self.publish();
    }
}

/// Loads and attaches the optional LSM program, pinned at `<pin_dir>/lsm/socket_create` so it
/// outlives brokerd like the cgroup links. A pin left by an earlier brokerd is replaced.
fn load_lsm(ebpf: &mut Ebpf, pin_dir: &Path) -> Result<(), HookError> {
    let lsm_list = Path::new("/sys/kernel/security/lsm");
    if !lsm_list.exists() {
        // securityfs lists the active LSMs; mount it where the host has not.
        let _ = nix::mount::mount(
            Some("securityfs"),
            "/sys/kernel/security",
            Some("securityfs"),
            nix::mount::MsFlags::MS_NOSUID
                | nix::mount::MsFlags::MS_NODEV
                | nix::mount::MsFlags::MS_NOEXEC,
            None::<&str>,
        );
    }
    let listed = fs::read_to_string(lsm_list).unwrap_or_default();
    if !listed.split(',').any(|l| l.trim() == "bpf") {
        return Err(HookError::LsmNotListed);
    }
    let btf = aya::Btf::from_sys_fs().map_err(HookError::Btf)?;
    let program: &mut aya::programs::Lsm = ebpf
        .program_mut(common::programs::LSM_SOCKET_CREATE)
        .ok_or(HookError::Missing)?
        .try_into()?;
    program.load("socket_create", &btf)?;
    let dir = pin_dir.join("lsm");
    make_private_dir(&dir).map_err(|e| HookError::Dir(Box::new(e)))?;
    let pin = dir.join("socket_create");
    if pin.exists()
        && let Ok(old) = PinnedLink::from_pin(&pin)
    {
        let _ = old.unpin();
    }
    let id = program.attach()?;
    let link: FdLink = program.take_link(id)?.into();
    link.pin(&pin)
        .map(drop)
        .map_err(|source| HookError::Pin { path: pin, source })
}

/// The cookie of the network namespace brokerd runs in (`SO_NETNS_COOKIE`, Linux 5.14+).
fn own_netns_cookie() -> std::io::Result<u64> {
    let socket = std::net::UdpSocket::bind("127.0.0.1:0")?;
    netns::socket_netns_cookie(&socket).map_err(|e| {
        std::io::Error::other(format!("SO_NETNS_COOKIE: {e} (needs Linux 5.14 or later)"))
    })
}

fn remove_pins(dir: &Path) {
    let _ = names::remove(dir);
    if let Ok(entries) = fs::read_dir(dir) {
        for e in entries.flatten() {
            let _ = fs::remove_file(e.path());
        }
    }
    let _ = fs::remove_dir(dir);
}

/// A pin directory name that identifies both the cgroup and its id: `agents%2Fdemo@1234`.
fn link_dir_name(cgroup: &CgroupPath, id: CgroupId) -> String {
    let mut name = String::new();
    for c in cgroup.as_str().chars() {
        match c {
            '/' => name.push_str("%2F"),
            '%' => name.push_str("%25"),
            '@' => name.push_str("%40"),
            c => name.push(c),
        }
    }
    format!("{name}@{}", id.0)
}

fn parse_link_dir_name(name: &str) -> Option<(CgroupPath, CgroupId)> {
    let (path, id) = name.rsplit_once('@')?;
    let id = id.parse().ok()?;
    let path = path
        .replace("%2F", "/")
        .replace("%40", "@")
        .replace("%25", "%");
    Some((CgroupPath::parse(&path).ok()?, CgroupId(id)))
}

fn make_private_dir(dir: &Path) -> Result<(), CaptureError> {
    let err = |message: String| CaptureError::PinDir {
        path: dir.into(),
        message,
    };
    match fs::DirBuilder::new()
        .recursive(true)
        .mode(0o700)
        .create(dir)
    {
        Ok(()) => {}
        Err(e) => return Err(err(e.to_string())),
    }
    fs::set_permissions(dir, fs::Permissions::from_mode(0o700)).map_err(|e| err(e.to_string()))
}

/// Makes sure the pin directory is on a bpf filesystem, mounting bpffs at /sys/fs/bpf when the
/// directory is below it and nothing is mounted there.
fn prepare_pin_dir(pin_dir: &Path) -> Result<(), CaptureError> {
    let err = |message: String| CaptureError::PinDir {
        path: pin_dir.into(),
        message,
    };
    let mountinfo = fs::read_to_string("/proc/self/mountinfo").map_err(|e| err(e.to_string()))?;
    let on_bpffs = |mounts: &str| {
        mounts.lines().any(|line| {
            let Some((left, right)) = line.split_once(" - ") else {
                return false;
            };
            let Some(point) = left.split_whitespace().nth(4) else {
                return false;
            };
            right.split_whitespace().next() == Some("bpf") && pin_dir.starts_with(point)
        })
    };
    if on_bpffs(&mountinfo) {
        return Ok(());
    }
    let default = Path::new("/sys/fs/bpf");
    if !pin_dir.starts_with(default) {
        return Err(err(format!(
            "it is not on a bpf filesystem; mount one (mount -t bpf bpf DIR) or use a pin dir \
             below {}",
            default.display()
        )));
    }
    fs::create_dir_all(default).map_err(|e| err(e.to_string()))?;
    nix::mount::mount(
        Some("bpf"),
        default,
        Some("bpf"),
        nix::mount::MsFlags::MS_NOSUID
            | nix::mount::MsFlags::MS_NODEV
            | nix::mount::MsFlags::MS_NOEXEC,
        Some("mode=0700"),
    )
    .map_err(|e| err(format!("mounting bpffs at {}: {e}", default.display())))?;
    info!(path = %default.display(), "mounted bpffs");
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn peer_keys_use_the_v4_mapped_form() {
        let v4 = peer_key(3, "127.0.0.1:4242".parse().expect("addr"));
        let mapped = peer_key(3, "[::ffff:127.0.0.1]:4242".parse().expect("addr"));
        assert_eq!(v4, mapped);
        assert_eq!(v4.port, 4242);
        assert_eq!(v4.addr, v4_mapped(u32::from_ne_bytes([127, 0, 0, 1])));
        assert_eq!((v4.netns_cookie, v4._pad), (3, 0));
    }

    #[test]
    fn workload_entries_mirror_brokerds_ports_and_fall_back_to_v4_mapped() {
        let host = NetnsListener {
            v4_addr: u32::from_ne_bytes([127, 0, 0, 1]),
            v6_addr: words(Ipv6Addr::LOCALHOST.octets()),
            port: 15001,
            dns_port: 15053,
            tag_cgroup_id: 0,
        };
        let with_v6 = workload_listener(&host, true, CgroupId(77));
        assert_eq!(
            (
                with_v6.v4_addr,
                with_v6.v6_addr,
                with_v6.port,
                with_v6.dns_port
            ),
            (host.v4_addr, host.v6_addr, 15001, 15053)
        );
        assert_eq!(with_v6.tag_cgroup_id, 77);
        let without = workload_listener(&host, false, CgroupId(77));
        assert_eq!(without.v6_addr, v4_mapped(host.v4_addr));
        assert_eq!((without.port, without.dns_port), (15001, 15053));
    }

    #[test]
    fn equal_addresses_in_two_namespaces_are_two_keys() {
        let peer: SocketAddr = "127.0.0.1:40000".parse().expect("addr");
        assert_ne!(peer_key(3, peer), peer_key(4798, peer));
    }

    #[test]
    fn original_dst_decodes_each_family() {
        let mut o = Origin {
            dst_addr: v4_mapped(u32::from_ne_bytes([127, 0, 0, 2])),
            dst_port: 8443,
            family: AF_INET,
            tgid: 1,
            pid: 1,
            via_v4: 1,
            cgroup_id: 1,
            comm: [0; 16],
            netns_cookie: 3,
        };
        assert_eq!(
            original_dst(&o),
            "127.0.0.2:8443".parse::<SocketAddr>().expect("addr")
        );
        o.family = common::AF_INET6; // v4-mapped from an IPv6 socket
        assert_eq!(
            original_dst(&o),
            "127.0.0.2:8443".parse::<SocketAddr>().expect("addr")
        );
        o.dst_addr = words(Ipv6Addr::LOCALHOST.octets());
        o.via_v4 = 0;
        assert_eq!(
            original_dst(&o),
            "[::1]:8443".parse::<SocketAddr>().expect("addr")
        );
    }

    #[test]
    fn only_the_recorded_socket_gets_the_origin() {
        let peer: SocketAddr = "127.0.0.1:40000".parse().expect("addr");
        assert_eq!(check_far_end(peer, 7, Some(7)), Ok(()));
        // Another socket holding the agent socket's address: not the agent.
        assert_eq!(
            check_far_end(peer, 7, Some(8)),
            Err(ResolveError::NotTheRedirectedSocket { peer })
        );
        // No socket at the far end any more: nothing proves who dialed.
        assert_eq!(
            check_far_end(peer, 7, None),
            Err(ResolveError::PeerGone(peer))
        );
        let reason = ResolveError::NotTheRedirectedSocket { peer }.to_string();
        assert!(reason.contains("127.0.0.1:40000"), "{reason}");
    }

    #[test]
    fn link_dir_names_round_trip() {
        for raw in ["agents/demo", "a%b/c@d", "x"] {
            let p = CgroupPath::parse(raw).expect(raw);
            let name = link_dir_name(&p, CgroupId(77));
            assert!(!name.contains('/'), "{name}");
            assert_eq!(parse_link_dir_name(&name), Some((p, CgroupId(77))));
        }
        assert_eq!(parse_link_dir_name("garbage"), None);
    }
}
