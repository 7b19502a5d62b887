//! Sockets made outside every tagged cgroup and held by a process inside one (issue 13.9).
//!
//! The kernel runs a cgroup's socket hooks for the cgroup a socket was *made* in, which it
//! records when the socket is created: connect4/6, sendmsg4/6, bind4/6, sockops and the
//! cgroup_skb filters all go by the socket's cgroup, not by the cgroup of the process that
//! uses it. A process moved into a tagged cgroup (its pid written to `cgroup.procs`), or one
//! that inherited or was sent a socket made outside, holds a socket no hook of the tag ever
//! sees: not redirected, not filtered, and free to be aimed anywhere (a TCP socket can be
//! disconnected with `connect(AF_UNSPEC)` and connected again, a UDP socket sends where it
//! likes). Nothing brokerd can do to the socket takes that away (see the README's "What attach
//! can and cannot promise"); this scan names such processes, so `status` and `doctor` can.
//!
//! For every process in a tagged cgroup (and below), its socket descriptors
//! (`/proc/<pid>/fd` -> `socket:[inode]`) are matched against a sock_diag dump of the TCP and
//! UDP sockets (IPv4 and IPv6) of the process's network namespace; the dump carries each
//! socket's creation cgroup. A socket made in a cgroup outside every tagged subtree is
//! reported. So is an inet socket the dump does not list (sock_diag lists no socket that is
//! neither bound nor connected, and no raw socket), whose cgroup the kernel cannot tell: it
//! may be a fresh socket of the agent's own, or one made outside and not yet used.
//!
//! The scan is bounded ([`LIMITS`]) and says what it left out.

use std::{
    collections::{HashMap, HashSet},
    ffi::CString,
    fs,
    net::SocketAddr,
    os::unix::fs::MetadataExt as _,
    path::{Path, PathBuf},
};

use agent_broker_protocol::OutsideSocket;

use crate::capture::sock_diag::{self, DiagSocket, Transport};

/// How far one scan goes.
#[derive(Clone, Copy, Debug)]
pub struct Limits {
    /// cgroup directories walked (in tagged subtrees, and again to name outside cgroups).
    pub cgroups: usize,
    /// Processes whose descriptors are read.
    pub processes: usize,
    /// Descriptors read, over all processes.
    pub descriptors: usize,
    /// Sockets reported.
    pub reported: usize,
}

/// The limits `status` and `doctor` scan with.
pub const LIMITS: Limits = Limits {
    cgroups: 4096,
    processes: 4096,
    descriptors: 65_536,
    reported: 64,
};

/// What one scan found, and what it left out.
#[derive(Debug, Default)]
pub struct Scan {
    pub found: Vec<OutsideSocket>,
    /// What was not scanned, when something was not.
    pub note: Option<String>,
}

/// A socket descriptor of a process in a tagged cgroup.
#[derive(Clone, Debug, PartialEq, Eq)]
struct Held {
    /// The cgroup the process is in.
    cgroup: String,
    pid: u32,
    comm: String,
    fd: u32,
    inode: u64,
    /// The process's network namespace (the `/proc/<pid>/ns/net` link text).
    netns: String,
}

/// The inode of a socket, from a `/proc/<pid>/fd/<n>` link's text (`socket:[12345]`).
pub fn socket_inode(link: &str) -> Option<u64> {
    link.strip_prefix("socket:[")?
        .strip_suffix(']')?
        .parse()
        .ok()
}

/// Whether the kernel's name for a socket's protocol (the `system.sockprotoname` attribute
/// of the socket's inode) is an AF_INET or AF_INET6 protocol, whose traffic the tag's hooks
/// would govern had the socket been made inside.
pub fn is_inet_protocol(name: &str) -> bool {
    const INET: [&str; 9] = [
        "TCP", "UDP", "UDP-Lite", "UDPLITE", "RAW", "PING", "MPTCP", "SCTP", "L2TP/IP",
    ];
    let base = name.strip_suffix("v6").unwrap_or(name);
    INET.contains(&base)
}

/// The name of a TCP state number as sock_diag reports it (UDP sockets use the same numbers:
/// `ESTABLISHED` when connected, `CLOSE` when not).
pub fn state_name(state: u8) -> &'static str {
    match state {
        1 => "ESTABLISHED",
        2 => "SYN_SENT",
        3 => "SYN_RECV",
        4 => "FIN_WAIT1",
        5 => "FIN_WAIT2",
        6 => "TIME_WAIT",
        7 => "CLOSE",
        8 => "CLOSE_WAIT",
        9 => "LAST_ACK",
        10 => "LISTEN",
        11 => "CLOSING",
        12 => "NEW_SYN_RECV",
        13 => "BOUND_INACTIVE",
        _ => "UNKNOWN",
    }
}

/// Where a held socket was made, as far as the dump tells.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Made {
    /// In a tagged cgroup or below one: the tag's hooks govern it.
    Inside,
    /// In the cgroup with this id, outside every tagged subtree.
    Outside(u64),
    /// The dump does not list it, or lists it without a cgroup.
    Unknown,
}

/// Where the socket `listed` (its dump entry, if any) was made, given the ids of every cgroup in
/// the tagged subtrees.
fn made(listed: Option<&DiagSocket>, inside: &HashSet<u64>) -> Made {
    match listed.and_then(|s| s.cgroup_id) {
        Some(id) if inside.contains(&id) => Made::Inside,
        Some(id) => Made::Outside(id),
        None => Made::Unknown,
    }
}

/// An address worth showing: not the unspecified `0.0.0.0:0` / `[::]:0` of an unbound or
/// unconnected side.
fn shown(addr: SocketAddr) -> Option<SocketAddr> {
    (!(addr.ip().is_unspecified() && addr.port() == 0)).then_some(addr)
}

/// Scans every process in the tagged cgroups `tags` (paths relative to `mount`, the cgroup2
/// mount) for sockets made outside them.
pub fn scan(mount: &Path, tags: &[String], limits: Limits) -> Scan {
    let mut notes = Vec::new();
    let (inside, members) = walk_tagged(mount, tags, limits, &mut notes);
    let held = held_sockets(&members, limits, &mut notes);
    let listed = dump_namespaces(&held, &mut notes);
    let mut found = Vec::new();
    let mut outside_ids = HashSet::new();
    for h in &held {
        let entry = listed.get(&(h.netns.clone(), h.inode));
        let verdict = made(entry.map(|(_, s)| s), &inside);
        if verdict == Made::Inside {
            continue;
        }
        // The kernel's name for the protocol; a descriptor closed meanwhile has none (skipped).
        let Some(protocol) = protocol_name(h.pid, h.fd) else {
            continue;
        };
        if entry.is_none() && !is_inet_protocol(&protocol) {
            // AF_UNIX, netlink...: not what the tag's inet hooks govern.
            continue;
        }
        if found.len() >= limits.reported {
            notes.push(format!(
                "more than {} such sockets; only the first {} are named",
                limits.reported, limits.reported
            ));
            break;
        }
        if let Made::Outside(id) = verdict {
            outside_ids.insert(id);
        }
        found.push((
            verdict,
            OutsideSocket {
                cgroup: h.cgroup.clone(),
                pid: h.pid,
                comm: h.comm.clone(),
                fd: h.fd,
                protocol,
                state: entry
                    .map_or("unlisted", |(_, s)| state_name(s.state))
                    .into(),
                local: entry.and_then(|(_, s)| shown(s.local)),
                remote: entry.and_then(|(_, s)| shown(s.remote)),
                socket_cgroup: None,
            },
        ));
    }
    let names = name_cgroups(mount, &outside_ids, limits);
    let found = found
        .into_iter()
        .map(|(verdict, mut s)| {
            if let Made::Outside(id) = verdict {
                s.socket_cgroup = Some(
                    names
                        .get(&id)
                        .cloned()
                        .unwrap_or_else(|| format!("id {id}")),
                );
            }
            s
        })
        .collect();
    notes.dedup();
    Scan {
        found,
        note: (!notes.is_empty()).then(|| notes.join("; ")),
    }
}

/// The ids of every cgroup in the tagged subtrees, and the processes in them (cgroup, pid).
fn walk_tagged(
    mount: &Path,
    tags: &[String],
    limits: Limits,
    notes: &mut Vec<String>,
) -> (HashSet<u64>, Vec<(String, u32)>) {
    let mut inside = HashSet::new();
    let mut members = Vec::new();
    let mut stack: Vec<(PathBuf, String)> =
        tags.iter().map(|t| (mount.join(t), t.clone())).collect();
    let mut walked = 0;
    while let Some((dir, name)) = stack.pop() {
        walked += 1;
        if walked > limits.cgroups {
            notes.push(format!(
                "stopped after {} cgroups of the tagged subtrees",
                limits.cgroups
            ));
            break;
        }
        let Ok(meta) = fs::metadata(&dir) else {
            continue;
        };
        inside.insert(meta.ino());
        if let Ok(procs) = fs::read_to_string(dir.join("cgroup.procs")) {
            for pid in procs.lines().filter_map(|l| l.trim().parse::<u32>().ok()) {
                members.push((name.clone(), pid));
            }
        }
        for e in fs::read_dir(&dir).into_iter().flatten().flatten() {
            if e.file_type().is_ok_and(|t| t.is_dir()) {
                let child = format!("{name}/{}", e.file_name().to_string_lossy());
                stack.push((e.path(), child));
            }
        }
    }
    if members.len() > limits.processes {
        notes.push(format!(
            "{} processes in tagged cgroups, only the first {} scanned",
            members.len(),
            limits.processes
        ));
        members.truncate(limits.processes);
    }
    (inside, members)
}

/// The socket descriptors of `members`.
fn held_sockets(members: &[(String, u32)], limits: Limits, notes: &mut Vec<String>) -> Vec<Held> {
    let mut held = Vec::new();
    let mut read = 0usize;
    'processes: for (cgroup, pid) in members {
        let Ok(netns) = fs::read_link(format!("/proc/{pid}/ns/net")) else {
            // Gone (or a kernel thread).
            continue;
        };
        let comm = fs::read_to_string(format!("/proc/{pid}/comm"))
            .map(|c| c.trim_end().to_string())
            .unwrap_or_default();
        let Ok(entries) = fs::read_dir(format!("/proc/{pid}/fd")) else {
            continue;
        };
        for e in entries.flatten() {
            read += 1;
            if read > limits.descriptors {
                notes.push(format!(
                    "stopped after {} descriptors (at pid {pid})",
                    limits.descriptors
                ));
                break 'processes;
            }
            let Some(fd) = e.file_name().to_str().and_then(|n| n.parse::<u32>().ok()) else {
                continue;
            };
            let Some(inode) = fs::read_link(e.path())
                .ok()
                .and_then(|l| socket_inode(&l.to_string_lossy()))
            else {
                continue;
            };
            held.push(Held {
                cgroup: cgroup.clone(),
                pid: *pid,
                comm: comm.clone(),
                fd,
                inode,
                netns: netns.to_string_lossy().into_owned(),
            });
        }
    }
    held
}

/// The TCP and UDP sockets of every network namespace a held socket's process is in, by
/// (namespace, inode). Read after the descriptors, so every socket seen there that is still
/// open is listed (if sock_diag lists its kind at all).
fn dump_namespaces(
    held: &[Held],
    notes: &mut Vec<String>,
) -> HashMap<(String, u64), (Transport, DiagSocket)> {
    let own = fs::read_link("/proc/self/ns/net")
        .map(|l| l.to_string_lossy().into_owned())
        .unwrap_or_default();
    // One process per namespace, to enter it through.
    let mut namespaces: HashMap<&str, u32> = HashMap::new();
    for h in held {
        namespaces.entry(h.netns.as_str()).or_insert(h.pid);
    }
    let mut listed = HashMap::new();
    for (netns, pid) in namespaces {
        let path = format!("/proc/{pid}/ns/net");
        let dumped = if netns == own {
            sock_diag::inet_sockets(None)
        } else {
            sock_diag::inet_sockets(Some(Path::new(&path)))
        };
        match dumped {
            Ok(sockets) => {
                for (transport, s) in sockets {
                    listed.insert((netns.to_string(), u64::from(s.inode)), (transport, s));
                }
            }
            Err(e) => notes.push(format!(
                "cannot list the sockets of network namespace {netns} (pid {pid}): {e}"
            )),
        }
    }
    listed
}

/// The kernel's name for the protocol of `pid`'s descriptor `fd`, read from the socket's inode
/// (`system.sockprotoname`).
fn protocol_name(pid: u32, fd: u32) -> Option<String> {
    let path = CString::new(format!("/proc/{pid}/fd/{fd}")).ok()?;
    let attr = c"system.sockprotoname";
    let mut buf = [0u8; 64];
    // SAFETY: both strings are NUL-terminated and `buf` is valid for `buf.len()` bytes.
    let n = unsafe {
        libc::getxattr(
            path.as_ptr(),
            attr.as_ptr(),
            buf.as_mut_ptr().cast(),
            buf.len(),
        )
    };
    let n = usize::try_from(n).ok()?;
    let name = buf.get(..n)?;
    let name = name.split(|&b| b == 0).next().unwrap_or(name);
    Some(String::from_utf8_lossy(name).into_owned())
}

/// The paths of the cgroups `ids` (relative to the mount, `/` for the root), as far as a walk of
/// the hierarchy bounded by `limits` finds them.
fn name_cgroups(mount: &Path, ids: &HashSet<u64>, limits: Limits) -> HashMap<u64, String> {
    let mut names = HashMap::new();
    if ids.is_empty() {
        return names;
    }
    let mut stack = vec![(mount.to_path_buf(), String::new())];
    let mut walked = 0;
    while let Some((dir, name)) = stack.pop() {
        walked += 1;
        if walked > limits.cgroups || names.len() == ids.len() {
            break;
        }
        let Ok(meta) = fs::metadata(&dir) else {
            continue;
        };
        if ids.contains(&meta.ino()) {
            let shown = if name.is_empty() {
                "/".to_string()
            } else {
                name.clone()
            };
            names.insert(meta.ino(), shown);
        }
        for e in fs::read_dir(&dir).into_iter().flatten().flatten() {
            if e.file_type().is_ok_and(|t| t.is_dir()) {
                let file = e.file_name();
                let file = file.to_string_lossy();
                let child = if name.is_empty() {
                    file.into_owned()
                } else {
                    format!("{name}/{file}")
                };
                stack.push((e.path(), child));
            }
        }
    }
    names
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::net::{TcpListener, TcpStream, UdpSocket};
    use std::os::fd::AsRawFd as _;

    fn diag(cgroup_id: Option<u64>) -> DiagSocket {
        DiagSocket {
            cookie: 1,
            state: 1,
            cgroup_id,
            local: "127.0.0.1:1".parse().expect("addr"),
            remote: "127.0.0.1:2".parse().expect("addr"),
            inode: 7,
        }
    }

    #[test]
    fn socket_links_give_their_inode_and_nothing_else_does() {
        assert_eq!(socket_inode("socket:[12345]"), Some(12345));
        assert_eq!(socket_inode("socket:[4294967296]"), Some(4_294_967_296));
        for other in [
            "pipe:[12345]",
            "anon_inode:[eventfd]",
            "/dev/null",
            "socket:[]",
            "socket:[12x]",
            "socket:[1",
            "/tmp/socket:[1]",
        ] {
            assert_eq!(socket_inode(other), None, "{other}");
        }
    }

    #[test]
    fn inet_protocols_are_told_from_the_others() {
        for inet in [
            "TCP", "TCPv6", "UDP", "UDPv6", "RAW", "RAWv6", "PING", "MPTCPv6",
        ] {
            assert!(is_inet_protocol(inet), "{inet}");
        }
        for other in [
            "UNIX",
            "UNIX-STREAM",
            "NETLINK",
            "PACKET",
            "AF_VSOCK",
            "",
            "v6",
        ] {
            assert!(!is_inet_protocol(other), "{other}");
        }
    }

    #[test]
    fn a_socket_is_inside_only_when_its_cgroup_is_in_a_tagged_subtree() {
        let inside: HashSet<u64> = [10, 11].into();
        assert_eq!(made(Some(&diag(Some(10))), &inside), Made::Inside);
        assert_eq!(made(Some(&diag(Some(11))), &inside), Made::Inside);
        assert_eq!(made(Some(&diag(Some(1))), &inside), Made::Outside(1));
        assert_eq!(made(Some(&diag(None)), &inside), Made::Unknown);
        assert_eq!(made(None, &inside), Made::Unknown);
    }

    #[test]
    fn unbound_and_unconnected_sides_are_not_shown() {
        assert_eq!(shown("0.0.0.0:0".parse().expect("addr")), None);
        assert_eq!(shown("[::]:0".parse().expect("addr")), None);
        let wildcard: SocketAddr = "0.0.0.0:80".parse().expect("addr");
        assert_eq!(shown(wildcard), Some(wildcard));
        assert_eq!(state_name(10), "LISTEN");
        assert_eq!(state_name(7), "CLOSE");
        assert_eq!(state_name(200), "UNKNOWN");
    }

    /// The inode of one of this process's descriptors.
    fn own_inode(fd: i32) -> u64 {
        let link = fs::read_link(format!("/proc/self/fd/{fd}")).expect("fd link");
        socket_inode(&link.to_string_lossy()).expect("a socket")
    }

    #[test]
    fn the_dump_finds_this_process_sockets_by_inode_with_their_cgroup() {
        let listener = TcpListener::bind("127.0.0.1:0").expect("listen");
        let client = TcpStream::connect(listener.local_addr().expect("addr")).expect("dial");
        let udp = UdpSocket::bind("[::1]:0").expect("udp");
        let dumped = sock_diag::inet_sockets(None).expect("dump");
        let by_inode: HashMap<u64, (Transport, DiagSocket)> = dumped
            .into_iter()
            .map(|(t, s)| (u64::from(s.inode), (t, s)))
            .collect();
        let (t, s) = by_inode
            .get(&own_inode(client.as_raw_fd()))
            .expect("the client socket is listed");
        assert_eq!(*t, Transport::Tcp);
        assert_eq!(s.remote, listener.local_addr().expect("addr"));
        assert!(s.cgroup_id.is_some(), "the kernel names its cgroup");
        let (t, s) = by_inode
            .get(&own_inode(listener.as_raw_fd()))
            .expect("the listener is listed");
        assert_eq!((*t, state_name(s.state)), (Transport::Tcp, "LISTEN"));
        let (t, s) = by_inode
            .get(&own_inode(udp.as_raw_fd()))
            .expect("the UDP socket is listed");
        assert_eq!(*t, Transport::Udp);
        assert_eq!(s.local, udp.local_addr().expect("addr"));
        assert_eq!(
            protocol_name(std::process::id(), udp.as_raw_fd() as u32).as_deref(),
            Some("UDPv6")
        );
    }

    #[test]
    fn a_scan_names_sockets_made_outside_the_tagged_subtree() {
        // A stand-in hierarchy: one "tagged cgroup" directory listing this process. Its sockets
        // were made in this process's real cgroup, which is no directory of this tree.
        let mount = tempfile::tempdir().expect("tempdir");
        fs::create_dir(mount.path().join("agents")).expect("mkdir");
        fs::write(
            mount.path().join("agents/cgroup.procs"),
            format!("{}\n", std::process::id()),
        )
        .expect("cgroup.procs");
        let listener = TcpListener::bind("127.0.0.1:0").expect("listen");
        let fresh = nix::sys::socket::socket(
            nix::sys::socket::AddressFamily::Inet,
            nix::sys::socket::SockType::Stream,
            nix::sys::socket::SockFlag::SOCK_CLOEXEC,
            None,
        )
        .expect("socket");
        let scan = scan(mount.path(), &["agents".to_string()], LIMITS);
        let mine = |fd: i32| {
            scan.found
                .iter()
                .find(|s| s.pid == std::process::id() && s.fd == fd as u32)
                .unwrap_or_else(|| panic!("fd {fd} should be named: {scan:#?}"))
        };
        let l = mine(listener.as_raw_fd());
        assert_eq!(
            (l.cgroup.as_str(), l.protocol.as_str(), l.state.as_str()),
            ("agents", "TCP", "LISTEN")
        );
        assert_eq!(l.local, Some(listener.local_addr().expect("addr")));
        assert_eq!(l.remote, None);
        // Made in a cgroup this tree does not hold: named by id.
        let made_in = l
            .socket_cgroup
            .as_deref()
            .expect("the kernel names its cgroup");
        assert!(made_in.starts_with("id "), "{made_in}");
        // A socket neither bound nor connected is in no table sock_diag dumps: named, with its
        // cgroup unknown.
        let f = mine(fresh.as_raw_fd());
        assert_eq!(
            (f.state.as_str(), f.socket_cgroup.as_deref()),
            ("unlisted", None)
        );
        assert_eq!(f.protocol, "TCP");
        assert!(scan.note.is_none(), "{:?}", scan.note);
        // Limits are said when hit.
        let tight = Limits {
            reported: 1,
            ..LIMITS
        };
        let capped = super::scan(mount.path(), &["agents".to_string()], tight);
        assert_eq!(capped.found.len(), 1);
        assert!(
            capped
                .note
                .as_deref()
                .is_some_and(|n| n.contains("only the first 1")),
            "{:?}",
            capped.note
        );
        let few = Limits {
            descriptors: 1,
            ..LIMITS
        };
        let capped = super::scan(mount.path(), &["agents".to_string()], few);
        assert!(
            capped
                .note
                .as_deref()
                .is_some_and(|n| n.contains("stopped after 1 descriptors")),
            "{:?}",
            capped.note
        );
    }
}
