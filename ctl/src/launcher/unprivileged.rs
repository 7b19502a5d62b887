//! `brokerctl run --unprivileged`: the capture layer without root (issue 19,
//! docs/design/unprivileged.md).
//!
//! No eBPF: the agent runs in a network namespace of its own that has only `lo`, where nft rules
//! redirect every TCP connect to a listener and every DNS datagram to a UDP socket
//! ([`netfilter`]). brokerctl opens those sockets inside the namespace and hands them to
//! brokerd (`<run-dir>/sandbox.sock`, [`handoff`]); brokerd accepts on them from the user's own
//! namespace and reads each connection's destination with `SO_ORIGINAL_DST`. Nothing needs a
//! privilege: user namespaces give the sandbox's first process the capabilities it needs over
//! its own namespaces, and the agent gets none of them.
//!
//! The processes (brokerctl is single-threaded, so it forks freely):
//!
//! - **brokerctl** (the user's namespaces) connects to `sandbox.sock` first (no sandbox is made
//!   when brokerd is not there), forks the sandbox, writes the first user namespace's id maps,
//!   sends brokerd the hello with the sockets, and on `Serving` lets the sandbox go on. It then
//!   forwards SIGINT, SIGTERM, SIGHUP and SIGQUIT to the agent, waits, and exits with its
//!   status, keeping the `sandbox.sock` connection (the sandbox's life at brokerd) open until
//!   then.
//! - **setup** (host pid namespace): `unshare(USER|NET|NS)`, root of the new user namespace
//!   (mapped to the user's uid; to nobody when brokerctl is root), brings up `lo` and the
//!   routes, loads the rules, binds the sockets, allows one more user namespace below its own
//!   (`user.max_user_namespaces` = 1), `unshare(PID)` and forks the init; then waits and passes
//!   the status on.
//! - **init** (pid 1 of the new pid namespace): forks the agent, reaps every orphan, and exits
//!   with the agent's status; its exit ends everything left in the namespace. It is not the
//!   agent itself because a pid 1 ignores every signal it has no handler for, so forwarded
//!   SIGINT/SIGTERM would be lost on most programs.
//! - **agent** (pid 2): passes the sockets to brokerctl (whose `SO_PASSCRED` learns the agent's
//!   pid in its own namespace), waits for the broker CA, mounts a fresh /proc, the trust stores,
//!   a resolv.conf naming 127.0.0.1, and empty read-only file systems over brokerd's run
//!   directory and the host's unix sockets; enters a nested user namespace (the user's own
//!   uid, mapped to the first namespace's root) and drops every capability, sets no_new_privs,
//!   enters the Landlock domain, installs the seccomp filter, and executes the command.

mod handoff;
pub mod netfilter;

use std::{
    convert::Infallible,
    ffi::{CString, OsString},
    fs,
    io::Write as _,
    net::{TcpListener, UdpSocket},
    os::{
        fd::{AsRawFd as _, OwnedFd, RawFd},
        unix::ffi::OsStrExt as _,
    },
    path::{Path, PathBuf},
    sync::atomic::Ordering,
};

use agent_broker_protocol::sandbox::{SandboxHello, SandboxReply, SandboxSocket};
use nix::{
    mount::MsFlags,
    sys::socket::{AddressFamily, SockFlag, SockType, setsockopt, socketpair, sockopt},
};
use seccompiler::BpfProgram;

use super::{
    CHILD, LaunchError, TrustStores,
    confine::{self, Plan, StagedFile, check, last_os},
    forward_signal, io, refuse_inet_stdio, wait_for, write_id_maps,
};
use netfilter::{DNS_PORT, NetTools, TCP_PORT};

/// The host uid (and gid) the sandbox runs as when brokerctl is root: root's own ids would make
/// the agent the owner of every root-owned file.
pub const ROOT_FALLBACK_ID: u32 = 65534;

/// The resolver the sandbox's resolv.conf names: any datagram to port 53 is redirected to
/// brokerd anyway, this only spares clients a resolver that does not answer.
const RESOLV_CONF: &str = "# written by brokerctl run --unprivileged: DNS goes to brokerd\n\
                           nameserver 127.0.0.1\n";

/// Host unix sockets and their directories hidden from the agent (besides brokerd's run
/// directory and the user's runtime directory).
const MASKED: [&str; 6] = [
    "/tmp/.X11-unix",
    "/tmp/.ICE-unix",
    "/run/dbus",
    "/var/run/dbus",
    "/run/docker.sock",
    "/var/run/docker.sock",
];

/// What to start and for whom.
#[derive(Clone, Debug)]
pub struct Spec {
    /// The agent name brokerd serves the sandbox as.
    pub name: String,
    /// brokerd's run directory (`sandbox.sock`); also hidden from the agent.
    pub run_dir: PathBuf,
    pub workdir: PathBuf,
    pub workdir_given: bool,
    pub allow_write: Vec<PathBuf>,
    pub program: OsString,
    pub args: Vec<OsString>,
}

/// What the sandbox's processes need, prepared before the fork.
struct SandboxPlan {
    tools: NetTools,
    masks: Vec<PathBuf>,
    /// The host ids the first user namespace's root maps to, and the agent's ids in the nested
    /// one.
    uid: u32,
    gid: u32,
    /// When brokerctl is root: the sandbox drops to these ids (and no supplementary groups)
    /// before it makes its namespaces, so it is the same sandbox an ordinary user gets.
    drop_to_root_fallback: bool,
    /// brokerctl's pid (the sandbox ends when it does).
    parent: i32,
    confine: Plan,
    filter: BpfProgram,
    program: CString,
    argv: Vec<CString>,
}

/// The directories and sockets masked in the sandbox: those of `candidates` that exist,
/// canonical, without one inside another.
pub fn masked_paths(candidates: &[PathBuf]) -> Vec<PathBuf> {
    let mut found: Vec<PathBuf> = candidates
        .iter()
        .filter_map(|p| fs::canonicalize(p).ok())
        .collect();
    found.sort();
    found.dedup();
    let mut kept: Vec<PathBuf> = Vec::new();
    for p in found {
        if !kept.iter().any(|k| p.starts_with(k)) {
            kept.push(p);
        }
    }
    kept
}

fn mask_candidates(run_dir: &Path, uid: u32) -> Vec<PathBuf> {
    let mut c = vec![
        run_dir.to_path_buf(),
        PathBuf::from(format!("/run/user/{uid}")),
    ];
    if let Some(xdg) = std::env::var_os("XDG_RUNTIME_DIR").filter(|x| !x.is_empty()) {
        c.push(PathBuf::from(xdg));
    }
    c.extend(MASKED.iter().map(PathBuf::from));
    c
}

/// Starts the agent as described in the module documentation and waits for it; returns the
/// exit code brokerctl should exit with. Must be called while the process is single-threaded.
pub fn launch(spec: &Spec) -> Result<i32, LaunchError> {
    let program = CString::new(spec.program.as_bytes())
        .map_err(|_| LaunchError::Invalid("the command contains a NUL byte".into()))?;
    let mut argv = vec![program.clone()];
    for a in &spec.args {
        argv.push(CString::new(a.as_bytes()).map_err(|_| {
            LaunchError::Invalid("an argument of the command contains a NUL byte".into())
        })?);
    }
    refuse_inet_stdio(&[0, 1, 2])?;
    let euid = nix::unistd::geteuid().as_raw();
    let (uid, gid) = if euid == 0 {
        (ROOT_FALLBACK_ID, ROOT_FALLBACK_ID)
    } else {
        (euid, nix::unistd::getegid().as_raw())
    };
    let plan = SandboxPlan {
        tools: NetTools::find(std::env::var_os("PATH").as_deref())?,
        masks: masked_paths(&mask_candidates(&spec.run_dir, euid)),
        uid,
        gid,
        drop_to_root_fallback: euid == 0,
        // SAFETY: plain system call.
        parent: unsafe { libc::getpid() },
        confine: Plan {
            workdir: spec.workdir.clone(),
            workdir_given: spec.workdir_given,
            allow_write: spec.allow_write.clone(),
        },
        filter: confine::seccomp_filter()?,
        program,
        argv,
    };
    // brokerd first: without it no namespace is made at all.
    let brokerd = handoff::connect(&spec.run_dir)?;
    let (ours, theirs) = socketpair(
        AddressFamily::Unix,
        SockType::SeqPacket,
        None,
        SockFlag::SOCK_CLOEXEC,
    )
    .map_err(|e| io("creating the launcher's socket pair")(e.into()))?;
    setsockopt(&ours, sockopt::PassCred, &true)
        .map_err(|e| io("asking for the sandbox's credentials (SO_PASSCRED)")(e.into()))?;

    // SAFETY: brokerctl is single-threaded (documented precondition), so the child may run
    // Rust code until it executes the agent.
    let setup = unsafe { libc::fork() };
    if setup < 0 {
        return Err(last_os("forking the sandbox"));
    }
    if setup == 0 {
        drop(ours);
        drop(brokerd);
        super::end_child(setup_process(&plan, theirs));
    }
    drop(theirs);
    match serve(spec, &plan, setup, &ours, &brokerd) {
        Ok(agent) => {
            drop(ours);
            CHILD.store(agent, Ordering::SeqCst);
            for sig in [libc::SIGINT, libc::SIGTERM, libc::SIGHUP, libc::SIGQUIT] {
                // SAFETY: installs an async-signal-safe handler.
                unsafe { libc::signal(sig, forward_signal as *const () as libc::sighandler_t) };
            }
            let code = wait_for(setup);
            // Only now: brokerd serves the sandbox as long as this connection is open.
            drop(brokerd);
            code
        }
        Err(Failure::Setup) => {
            drop(ours);
            wait_for(setup)
        }
        Err(Failure::Error(e)) => {
            // Every sandbox process waits on this socket pair (or on its child that does): at
            // its end they exit without starting anything, and none is left behind.
            drop(ours);
            let _ = wait_for(setup);
            Err(e)
        }
    }
}

enum Failure {
    /// The sandbox failed and said why on stderr; its exit status is brokerctl's.
    Setup,
    Error(LaunchError),
}

impl From<LaunchError> for Failure {
    fn from(e: LaunchError) -> Self {
        Self::Error(e)
    }
}

/// brokerctl's side until the agent is let go: the id maps, the hello, the CA. Returns the
/// agent's pid.
fn serve(
    spec: &Spec,
    plan: &SandboxPlan,
    setup: i32,
    sock: &OwnedFd,
    brokerd: &std::os::unix::net::UnixStream,
) -> Result<i32, Failure> {
    let sock = sock.as_raw_fd();
    // 1. The setup process made its user namespace: map its root to our uid.
    match handoff::recv(sock)? {
        Some(m) if m.bytes == b"U" => {}
        _ => return Err(Failure::Setup),
    }
    let mapped = write_id_maps(setup, plan.uid, plan.gid);
    handoff::send(sock, if mapped.is_ok() { b"M" } else { b"X" }, &[])?;
    mapped?;
    // brokerctl's own memory (the CA) is nobody's business; its children stay dumpable until
    // they have written their own maps.
    // SAFETY: plain prctl.
    unsafe { libc::prctl(libc::PR_SET_DUMPABLE, 0, 0, 0, 0) };
    // 2. The agent process sends the sockets; the kernel adds its pid as we see it.
    let msg = match handoff::recv(sock)? {
        Some(m) if m.bytes.first() == Some(&b'L') => m,
        _ => return Err(Failure::Setup),
    };
    let kinds = socket_kinds(&msg.bytes[1..])?;
    if kinds.len() != msg.fds.len() {
        return Err(LaunchError::Invalid(format!(
            "the sandbox passed {} sockets for {} kinds",
            msg.fds.len(),
            kinds.len()
        ))
        .into());
    }
    let agent = msg
        .pid
        .filter(|p| *p > 0)
        .ok_or_else(|| LaunchError::Invalid("the sandbox's pid did not come through".into()))?;
    let hello = SandboxHello {
        name: spec.name.clone(),
        pid: agent as u32,
        sockets: kinds,
    };
    let raw: Vec<RawFd> = msg.fds.iter().map(|f| f.as_raw_fd()).collect();
    let reply = handoff::hand_over(brokerd, &hello, &raw)?;
    // brokerd has its own copies now (or none, if it refused).
    drop(msg.fds);
    match reply {
        SandboxReply::Serving {
            agent: _,
            ca_pem,
            hide,
        } => {
            // The CA, then brokerd's directories to hide, each after a NUL (in no PEM).
            let mut go = b"G".to_vec();
            go.extend_from_slice(ca_pem.as_bytes());
            for dir in &hide {
                go.push(0);
                go.extend_from_slice(dir.as_os_str().as_bytes());
            }
            handoff::send(sock, &go, &[])?;
            Ok(agent)
        }
        SandboxReply::Refused { message } => Err(LaunchError::Invalid(format!(
            "brokerd refused the sandbox: {message}; the agent was not started"
        ))
        .into()),
    }
}

/// The socket kinds of an `L` message, one byte each.
fn socket_kinds(bytes: &[u8]) -> Result<Vec<SandboxSocket>, LaunchError> {
    bytes
        .iter()
        .map(|b| match b {
            b't' => Ok(SandboxSocket::Tcp),
            b'd' => Ok(SandboxSocket::Dns),
            other => Err(LaunchError::Invalid(format!(
                "the sandbox named an unknown socket kind {other:#x}"
            ))),
        })
        .collect()
}

fn kind_byte(kind: SandboxSocket) -> u8 {
    match kind {
        SandboxSocket::Tcp => b't',
        SandboxSocket::Dns => b'd',
    }
}

/// Ignores the signals brokerctl forwards (a terminal's ^C reaches the whole process group;
/// only brokerctl and the agent act on it). The agent puts them back to default.
fn ignore_forwarded_signals(disposition: libc::sighandler_t) {
    for sig in [libc::SIGINT, libc::SIGTERM, libc::SIGHUP, libc::SIGQUIT] {
        // SAFETY: SIG_IGN / SIG_DFL are valid dispositions.
        unsafe { libc::signal(sig, disposition) };
    }
}

/// The sandbox's first process; returns only on failure (the caller exits 126).
fn setup_process(plan: &SandboxPlan, sock: OwnedFd) -> Result<Infallible, LaunchError> {
    ignore_forwarded_signals(libc::SIG_IGN);
    if plan.drop_to_root_fallback {
        let id = ROOT_FALLBACK_ID;
        // SAFETY: plain system calls with valid arguments.
        unsafe {
            check(
                libc::setgroups(0, std::ptr::null()),
                "clearing supplementary groups",
            )?;
            check(libc::setresgid(id, id, id), "dropping to gid 65534")?;
            check(libc::setresuid(id, id, id), "dropping to uid 65534")?;
            // Changing ids made the process non-dumpable; its own /proc files (the nested
            // namespace's id maps) must stay its own.
            check(
                libc::prctl(libc::PR_SET_DUMPABLE, 1, 0, 0, 0),
                "keeping the sandbox dumpable",
            )?;
        }
    }
    // SAFETY: plain prctl (after any id change, which would clear it); brokerctl dying takes
    // the sandbox with it.
    unsafe { libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL, 0, 0, 0) };
    // SAFETY: plain system call.
    if unsafe { libc::getppid() } != plan.parent {
        return Err(LaunchError::Invalid("brokerctl exited".into()));
    }
    let raw = sock.as_raw_fd();
    // SAFETY: plain system call.
    check(
        unsafe { libc::unshare(libc::CLONE_NEWUSER | libc::CLONE_NEWNET | libc::CLONE_NEWNS) },
        "creating the user, network and mount namespaces (are unprivileged user namespaces \
         allowed? see `brokerctl doctor`)",
    )?;
    handoff::send(raw, b"U", &[])?;
    match handoff::recv(raw)? {
        Some(m) if m.bytes == b"M" => {}
        _ => {
            return Err(LaunchError::Invalid(
                "brokerctl could not map the user namespace's ids".into(),
            ));
        }
    }
    nix::mount::mount(
        None::<&str>,
        "/",
        None::<&str>,
        MsFlags::MS_REC | MsFlags::MS_PRIVATE,
        None::<&str>,
    )
    .map_err(|e| io("making the mounts private")(e.into()))?;
    let ipv6 = plan.tools.configure()?;
    let sockets = bind_sockets(ipv6)?;
    // Only the agent's nested user namespace may exist below this one: the agent cannot make
    // another (with a network namespace the rules do not cover, or capabilities of its own).
    fs::write("/proc/sys/user/max_user_namespaces", "1")
        .map_err(io("limiting user namespaces below the sandbox's"))?;
    // SAFETY: plain system call.
    check(
        unsafe { libc::unshare(libc::CLONE_NEWPID) },
        "creating the pid namespace",
    )?;
    // SAFETY: still single-threaded.
    let init = unsafe { libc::fork() };
    if init < 0 {
        return Err(last_os("forking the sandbox's init"));
    }
    if init == 0 {
        init_process(plan, sock, sockets);
    }
    drop(sockets);
    drop(sock);
    // SAFETY: plain prctl: the agent, in a nested namespace, cannot read this process.
    unsafe { libc::prctl(libc::PR_SET_DUMPABLE, 0, 0, 0, 0) };
    let code = wait_for(init)?;
    // SAFETY: ends the process with the init's status.
    unsafe { libc::_exit(code) }
}

/// The sockets brokerd serves, bound inside the namespace, non-blocking and close-on-exec.
fn bind_sockets(ipv6: bool) -> Result<Vec<(SandboxSocket, OwnedFd)>, LaunchError> {
    let mut out = Vec::new();
    let mut hosts = vec!["127.0.0.1"];
    if ipv6 {
        hosts.push("[::1]");
    }
    for (i, host) in hosts.iter().enumerate() {
        let tcp = TcpListener::bind(format!("{host}:{TCP_PORT}"));
        let udp = UdpSocket::bind(format!("{host}:{DNS_PORT}"));
        let (tcp, udp) = match (tcp, udp) {
            (Ok(t), Ok(u)) => (t, u),
            // ::1 may be missing (ipv6.disable_ipv6 on lo): IPv4 only; the rules refuse IPv6.
            _ if i > 0 => break,
            (Err(e), _) | (_, Err(e)) => {
                return Err(io(format!("binding the sandbox's sockets on {host}"))(e));
            }
        };
        tcp.set_nonblocking(true)
            .map_err(io("making the listener non-blocking"))?;
        udp.set_nonblocking(true)
            .map_err(io("making the DNS socket non-blocking"))?;
        out.push((SandboxSocket::Tcp, OwnedFd::from(tcp)));
        out.push((SandboxSocket::Dns, OwnedFd::from(udp)));
    }
    Ok(out)
}

/// Pid 1 of the sandbox: forks the agent, reaps, exits with the agent's status.
fn init_process(plan: &SandboxPlan, sock: OwnedFd, sockets: Vec<(SandboxSocket, OwnedFd)>) -> ! {
    // SAFETY: plain prctl: the setup process dying ends the sandbox.
    unsafe { libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL, 0, 0, 0) };
    // SAFETY: single-threaded.
    let agent = unsafe { libc::fork() };
    if agent == 0 {
        super::end_child(agent_process(plan, sock, sockets));
    }
    drop(sockets);
    drop(sock);
    let code = if agent < 0 {
        let _ = writeln!(
            std::io::stderr(),
            "brokerctl run: {}; the agent was not started",
            last_os("forking the agent")
        );
        126
    } else {
        // SAFETY: plain prctl.
        unsafe { libc::prctl(libc::PR_SET_DUMPABLE, 0, 0, 0, 0) };
        reap_until(agent)
    };
    // SAFETY: ends pid 1, and with it every process left in the namespace.
    unsafe { libc::_exit(code) }
}

/// Reaps every child (orphans are re-parented to pid 1) until `agent` exits; its status as an
/// exit code.
fn reap_until(agent: i32) -> i32 {
    loop {
        let mut status = 0;
        // SAFETY: `status` is a valid out pointer.
        let r = unsafe { libc::waitpid(-1, &mut status, 0) };
        if r < 0 {
            if std::io::Error::last_os_error().raw_os_error() == Some(libc::EINTR) {
                continue;
            }
            return 126;
        }
        if r == agent {
            if libc::WIFEXITED(status) {
                return libc::WEXITSTATUS(status);
            }
            if libc::WIFSIGNALED(status) {
                return 128 + libc::WTERMSIG(status);
            }
        }
    }
}

/// The agent's process up to `execve`.
fn agent_process(
    plan: &SandboxPlan,
    sock: OwnedFd,
    sockets: Vec<(SandboxSocket, OwnedFd)>,
) -> Result<Infallible, LaunchError> {
    let raw = sock.as_raw_fd();
    let mut kinds = vec![b'L'];
    kinds.extend(sockets.iter().map(|(k, _)| kind_byte(*k)));
    let fds: Vec<RawFd> = sockets.iter().map(|(_, f)| f.as_raw_fd()).collect();
    handoff::send(raw, &kinds, &fds)?;
    drop(sockets);
    let go = match handoff::recv(raw)? {
        Some(m) if m.bytes.first() == Some(&b'G') => m.bytes,
        // brokerctl refused (brokerd said no, or it failed): it says why.
        // SAFETY: ends the child quietly.
        _ => unsafe { libc::_exit(126) },
    };
    let mut parts = go[1..].split(|b| *b == 0);
    let ca_pem = String::from_utf8(parts.next().unwrap_or_default().to_vec())
        .map_err(|_| LaunchError::Invalid("the broker CA is not UTF-8".into()))?;
    // brokerd's own directories (its state and policies): the agent runs as brokerd's uid.
    let hidden: Vec<PathBuf> = parts
        .filter(|p| !p.is_empty())
        .map(|p| PathBuf::from(std::ffi::OsStr::from_bytes(p)))
        .filter(|p| p.is_absolute())
        .collect();
    let masks = masked_paths(&[plan.masks.clone(), hidden].concat());
    drop(sock);
    let trust = TrustStores::prepare(&ca_pem)?;
    nix::mount::mount(
        Some("proc"),
        "/proc",
        Some("proc"),
        MsFlags::MS_NOSUID | MsFlags::MS_NODEV | MsFlags::MS_NOEXEC,
        None::<&str>,
    )
    .map_err(|e| io("mounting the sandbox's /proc")(e.into()))?;
    confine::private_mounts(
        &trust,
        &[StagedFile {
            name: "resolv.conf",
            target: "/etc/resolv.conf".into(),
            contents: RESOLV_CONF.as_bytes().to_vec(),
        }],
        confine::KernelFs::Cover,
    )?;
    for path in &masks {
        mask(path)?;
    }
    ignore_forwarded_signals(libc::SIG_DFL);
    // Rust's runtime ignores SIGPIPE in brokerctl; an ignored signal stays ignored across
    // execve, and the agent's pipelines expect the default.
    // SAFETY: SIG_DFL is a valid disposition.
    unsafe { libc::signal(libc::SIGPIPE, libc::SIG_DFL) };
    nest_user_namespace(plan.uid, plan.gid)?;
    confine::drop_bounding_set()?;
    confine::confine_and_exec(&plan.confine, &plan.filter, &plan.program, &plan.argv)
}

/// Hides a directory under an empty read-only tmpfs, or a socket or file under /dev/null.
fn mask(path: &Path) -> Result<(), LaunchError> {
    let what = || format!("hiding {} from the agent", path.display());
    if path.is_dir() {
        nix::mount::mount(
            Some("tmpfs"),
            path,
            Some("tmpfs"),
            MsFlags::MS_RDONLY | MsFlags::MS_NOSUID | MsFlags::MS_NODEV | MsFlags::MS_NOEXEC,
            Some("size=4k,mode=0555"),
        )
    } else {
        nix::mount::mount(
            Some("/dev/null"),
            path,
            None::<&str>,
            MsFlags::MS_BIND,
            None::<&str>,
        )
    }
    .map_err(|e| io(what())(e.into()))
}

/// The agent's own user namespace, a child of the sandbox's: the user's uid and gid inside,
/// mapped to the sandbox's root, and no capability over the namespaces the sandbox's root owns
/// (network rules, routes, mounts).
fn nest_user_namespace(uid: u32, gid: u32) -> Result<(), LaunchError> {
    // SAFETY: plain system call.
    check(
        unsafe { libc::unshare(libc::CLONE_NEWUSER) },
        "creating the agent's nested user namespace",
    )?;
    // Already "deny", inherited from the sandbox's namespace; writing it again may fail.
    let _ = fs::write("/proc/self/setgroups", "deny");
    fs::write("/proc/self/uid_map", format!("{uid} 0 1\n"))
        .map_err(io("writing the agent's uid_map"))?;
    fs::write("/proc/self/gid_map", format!("{gid} 0 1\n"))
        .map_err(io("writing the agent's gid_map"))?;
    Ok(())
}

/// Whether this host lets an ordinary user make the sandbox's namespaces: a child (dropped to
/// uid and gid `as_id` first, when brokerctl is root, since root may always) tries
/// `unshare(USER|NET)`. `brokerctl doctor` reports it. Must be called while single-threaded.
pub fn probe_namespaces(as_id: Option<u32>) -> std::io::Result<()> {
    // SAFETY: single-threaded (documented); the child only makes async-signal-safe calls.
    let pid = unsafe { libc::fork() };
    if pid < 0 {
        return Err(std::io::Error::last_os_error());
    }
    if pid == 0 {
        // SAFETY: plain system calls, then _exit with the errno (0 on success).
        unsafe {
            if let Some(id) = as_id
                && (libc::setgroups(0, std::ptr::null()) != 0
                    || libc::setresgid(id, id, id) != 0
                    || libc::setresuid(id, id, id) != 0)
            {
                libc::_exit(255);
            }
            let r = libc::unshare(libc::CLONE_NEWUSER | libc::CLONE_NEWNET);
            libc::_exit(if r == 0 {
                0
            } else {
                *libc::__errno_location() & 0xff
            });
        }
    }
    let code = wait_for(pid).map_err(|e| std::io::Error::other(e.to_string()))?;
    match code {
        0 => Ok(()),
        255 => Err(std::io::Error::other(
            "could not drop to the probe's uid".to_string(),
        )),
        errno => Err(std::io::Error::from_raw_os_error(errno)),
    }
}

/// The running kernel's Landlock ABI version, or the errno that says why there is none
/// (EOPNOTSUPP: built but disabled at boot; ENOSYS: not built).
pub fn landlock_abi() -> Result<i32, std::io::Error> {
    const LANDLOCK_CREATE_RULESET_VERSION: libc::c_uint = 1;
    // SAFETY: the documented version query: no attribute, size 0.
    let r = unsafe {
        libc::syscall(
            libc::SYS_landlock_create_ruleset,
            std::ptr::null::<libc::c_void>(),
            0usize,
            LANDLOCK_CREATE_RULESET_VERSION,
        )
    };
    if r < 0 {
        Err(std::io::Error::last_os_error())
    } else {
        Ok(r as i32)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn masks_keep_existing_paths_once_and_not_inside_another() {
        let dir = tempfile::tempdir().expect("tempdir");
        let run = dir.path().join("run");
        let inner = run.join("agent-broker");
        fs::create_dir_all(&inner).expect("dirs");
        let sock = dir.path().join("docker.sock");
        fs::write(&sock, "").expect("file");
        let masks = masked_paths(&[
            inner.clone(),
            run.clone(),
            dir.path().join("absent"),
            sock.clone(),
            run.clone(),
        ]);
        let canon = |p: &Path| fs::canonicalize(p).expect("canonical");
        assert_eq!(masks, vec![canon(&sock), canon(&run)]);
    }

    #[test]
    fn socket_kinds_round_trip_and_unknown_ones_are_refused() {
        let kinds = [SandboxSocket::Tcp, SandboxSocket::Dns, SandboxSocket::Tcp];
        let bytes: Vec<u8> = kinds.iter().map(|k| kind_byte(*k)).collect();
        assert_eq!(socket_kinds(&bytes).expect("kinds"), kinds);
        assert!(socket_kinds(b"tx").is_err());
    }
}
