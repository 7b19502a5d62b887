//! The hardened launcher behind `brokerctl run` (THREAT-MODEL.md 3.2).
//!
//! The agent is created directly inside its cgroup (`clone3` with `CLONE_INTO_CGROUP`), so not
//! one instruction of it runs outside the tagged cgroup, and it starts with nothing but stdio.
//! Before `execve`, in this order, the child:
//!
//! 1. enters a private mount namespace and removes every cgroup, cgroup2 and bpf filesystem from
//!    it (so it cannot move itself out of its cgroup or open the pinned links even if it found a
//!    way to root), and makes it trust the broker CA, all read-only ([`trust`]): a merged CA
//!    bundle (system roots + the broker CA) over the standard bundle paths, the broker CA and
//!    its OpenSSL hash link (`<hash>.0`) in `/etc/ssl/certs` (an overlay), and a JVM trust
//!    store with the same certificates over every JVM `cacerts` found (the system ones,
//!    `$JAVA_HOME`'s, the `java` on `PATH`, the JDKs under /usr/lib/jvm); only
//!    `SSL_CERT_FILE`, `NODE_EXTRA_CA_CERTS` and `GRPC_DEFAULT_SSL_ROOTS_FILE_PATH` are set, so
//!    a CA the agent names itself (`pip --cert`, `REQUESTS_CA_BUNDLE`) still counts;
//! 2. takes its identity: a dedicated unprivileged uid (`--user`), or root inside a new user
//!    namespace whose root maps to an unprivileged host uid (`--userns`). The mounts of step 1
//!    were made before, by real root, so the namespace's root cannot undo them;
//! 3. drops every capability (bounding, ambient, permitted, effective, inheritable) and sets
//!    `no_new_privs`, so setuid binaries and file capabilities give nothing back;
//! 4. enters a Landlock domain where available: the file system is read-only except the work
//!    directory, `--allow-write` directories and the usual scratch places, and abstract UNIX
//!    sockets and signals cannot reach outside the sandbox (brokerd, the user's processes);
//! 5. installs a seccomp filter returning EPERM for socket families the cgroup hooks cannot see
//!    (AF_PACKET, AF_VSOCK, AF_XDP, AF_SMC, AF_KEY, AF_ALG, and AF_NETLINK but NETLINK_ROUTE), for `bpf`, `ptrace`,
//!    `process_vm_readv/writev`, `perf_event_open`, kernel keyrings, module and kexec calls,
//!    `userfaultfd`, for io_uring (whose socket operations would bypass the `socket` check),
//!    and for the `TIOCSTI` and `TIOCLINUX` ioctls (input pushed into the user's terminal);
//! 6. closes every descriptor above stderr and executes the command.
//!
//! brokerctl stays as the agent's parent: it forwards SIGINT, SIGTERM, SIGHUP and SIGQUIT and
//! exits with the agent's status (128 + signal when it was killed).
//!
//! `brokerctl run --unprivileged` is [`unprivileged`]: no cgroup and no root, the agent in
//! namespaces of its own whose redirect rules send its connections to brokerd; it shares steps
//! 1 and 3 to 6 with this launcher.

mod confine;
pub mod trust;
pub mod unprivileged;

pub use trust::TrustStores;

use std::{
    ffi::{CString, OsString},
    fs,
    io::{Read as _, Write as _},
    os::{
        fd::{AsRawFd as _, FromRawFd as _, OwnedFd},
        unix::ffi::{OsStrExt as _, OsStringExt as _},
    },
    path::PathBuf,
    sync::atomic::{AtomicI32, Ordering},
};

/// Who the agent runs as.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Identity {
    /// A dedicated unprivileged uid and gid; supplementary groups are cleared.
    User { uid: u32, gid: u32 },
    /// Root inside a new user namespace whose uid and gid 0 map to these host ids.
    UserNs { host_uid: u32, host_gid: u32 },
}

/// Why a `--user` value is refused.
#[derive(Debug, PartialEq, Eq, thiserror::Error)]
pub enum IdentityError {
    #[error("{0:?} is not a numeric uid")]
    Uid(String),
    #[error("{0:?} is not a numeric gid")]
    Gid(String),
    #[error(
        "the agent may not run as root (uid or gid 0): it could leave its cgroup; use --userns \
         for root inside a user namespace"
    )]
    Root,
}

impl Identity {
    /// Parses `--user UID[:GID]` (the gid defaults to the uid). Root is refused: an agent that
    /// is real root can leave its cgroup and detach the programs.
    pub fn parse_user(s: &str) -> Result<Self, IdentityError> {
        let (uid, gid) = match s.split_once(':') {
            Some((u, g)) => (u, Some(g)),
            None => (s, None),
        };
        let uid: u32 = uid
            .parse()
            .map_err(|_| IdentityError::Uid(uid.to_string()))?;
        let gid: u32 = match gid {
            Some(g) => g.parse().map_err(|_| IdentityError::Gid(g.to_string()))?,
            None => uid,
        };
        if uid == 0 || gid == 0 {
            return Err(IdentityError::Root);
        }
        Ok(Self::User { uid, gid })
    }
}

/// What to start and how.
#[derive(Clone, Debug)]
pub struct LaunchSpec {
    /// The cgroup directory (under the cgroup2 mount) the agent is created in.
    pub cgroup_dir: PathBuf,
    pub identity: Identity,
    /// The agent's working directory (writable under Landlock).
    pub workdir: PathBuf,
    /// Whether `workdir` was asked for; an inherited one the agent cannot enter is replaced
    /// by /tmp, an asked-for one is an error.
    pub workdir_given: bool,
    /// More directories the agent may write.
    pub allow_write: Vec<PathBuf>,
    /// What the agent is made to trust (the broker CA among the system roots).
    pub trust: TrustStores,
    pub program: OsString,
    pub args: Vec<OsString>,
}

/// Errors before the agent was started.
#[derive(Debug, thiserror::Error)]
pub enum LaunchError {
    #[error("{what}: {source}")]
    Io {
        what: String,
        #[source]
        source: std::io::Error,
    },
    #[error("{0}")]
    Invalid(String),
}

fn io(what: impl Into<String>) -> impl FnOnce(std::io::Error) -> LaunchError {
    let what = what.into();
    move |source| LaunchError::Io { what, source }
}

/// Refuses to start an agent whose stdio (`fds`) includes an IPv4 or IPv6 socket. The kernel
/// runs the cgroup hooks for the cgroup a socket was *created* in, so a socket made out here
/// would be neither redirected nor filtered in the agent's hands: it could disconnect it and
/// connect it anywhere (issue 13.9). AF_UNIX sockets, pipes, files and terminals are fine.
fn refuse_inet_stdio(fds: &[libc::c_int]) -> Result<(), LaunchError> {
    const NAMES: [&str; 3] = ["stdin", "stdout", "stderr"];
    for &fd in fds {
        let mut domain: libc::c_int = 0;
        let mut len = std::mem::size_of::<libc::c_int>() as libc::socklen_t;
        // SAFETY: getsockopt writes at most `len` bytes into `domain`; a descriptor that is not
        // a socket (or not open) fails with ENOTSOCK/EBADF and is left alone.
        let r = unsafe {
            libc::getsockopt(
                fd,
                libc::SOL_SOCKET,
                libc::SO_DOMAIN,
                (&mut domain as *mut libc::c_int).cast(),
                &mut len,
            )
        };
        if r == 0 && matches!(domain, libc::AF_INET | libc::AF_INET6) {
            let name = usize::try_from(fd)
                .ok()
                .and_then(|i| NAMES.get(i).copied())
                .map_or_else(|| format!("descriptor {fd}"), str::to_string);
            return Err(LaunchError::Invalid(format!(
                "{name} is an IPv4/IPv6 socket made outside the agent's cgroup: the kernel hooks \
                 never see it, so the agent could re-aim it anywhere; give the agent a pipe, a \
                 file or a terminal instead (e.g. `| brokerctl run ...` or `< file`)"
            )));
        }
    }
    Ok(())
}

/// The agent's pid, for the signal forwarder.
static CHILD: AtomicI32 = AtomicI32::new(0);

extern "C" fn forward_signal(sig: libc::c_int) {
    let pid = CHILD.load(Ordering::SeqCst);
    if pid > 0 {
        // SAFETY: kill is async-signal-safe.
        unsafe { libc::kill(pid, sig) };
    }
}

#[repr(C)]
#[derive(Default)]
struct CloneArgs {
    flags: u64,
    pidfd: u64,
    child_tid: u64,
    parent_tid: u64,
    exit_signal: u64,
    stack: u64,
    stack_size: u64,
    tls: u64,
    set_tid: u64,
    set_tid_size: u64,
    cgroup: u64,
}

const CLONE_INTO_CGROUP: u64 = 0x2_0000_0000;

/// Ends a forked child of brokerctl whose setup failed before `execve` (`result`, an error by
/// then): says why on stderr and exits 126 ("could not be started") without running the
/// parent's exit handlers.
fn end_child(result: Result<std::convert::Infallible, LaunchError>) -> ! {
    let Err(e) = result;
    let _ = writeln!(
        std::io::stderr(),
        "brokerctl run: {e}; the agent was not started"
    );
    // SAFETY: _exit ends the child without running the parent's atexit handlers twice.
    unsafe { libc::_exit(126) }
}

fn pipe() -> Result<(OwnedFd, OwnedFd), LaunchError> {
    let mut fds = [0; 2];
    // SAFETY: `fds` has room for the two descriptors pipe2 writes.
    if unsafe { libc::pipe2(fds.as_mut_ptr(), libc::O_CLOEXEC) } != 0 {
        return Err(io("pipe")(std::io::Error::last_os_error()));
    }
    // SAFETY: both descriptors were just created and are owned by nobody else.
    Ok(unsafe { (OwnedFd::from_raw_fd(fds[0]), OwnedFd::from_raw_fd(fds[1])) })
}

/// Starts the agent as described in the module documentation and waits for it. Returns the
/// exit code brokerctl should exit with. Must be called while the process is single-threaded
/// (the child runs Rust code between clone and exec).
pub fn launch(spec: &LaunchSpec) -> Result<i32, LaunchError> {
    let cgroup = fs::File::open(&spec.cgroup_dir)
        .map_err(io(format!("opening cgroup {}", spec.cgroup_dir.display())))?;
    // Everything the child needs is prepared here, so a failure is reported before anything
    // starts, and the child only makes system calls.
    let program = CString::new(spec.program.as_bytes())
        .map_err(|_| LaunchError::Invalid("the command contains a NUL byte".into()))?;
    let mut argv = vec![program.clone()];
    for a in &spec.args {
        argv.push(CString::new(a.as_bytes()).map_err(|_| {
            LaunchError::Invalid("an argument of the command contains a NUL byte".into())
        })?);
    }
    refuse_inet_stdio(&[0, 1, 2])?;
    let filter = confine::seccomp_filter()?;
    let plan = confine::Plan {
        workdir: spec.workdir.clone(),
        workdir_given: spec.workdir_given,
        allow_write: spec.allow_write.clone(),
    };
    let (ready_r, ready_w) = pipe()?; // child -> parent: user namespace created
    let (go_r, go_w) = pipe()?; // parent -> child: ids mapped

    let args = CloneArgs {
        flags: CLONE_INTO_CGROUP,
        exit_signal: libc::SIGCHLD as u64,
        cgroup: cgroup.as_raw_fd() as u64,
        ..Default::default()
    };
    // SAFETY: clone3 with a fully initialised clone_args of the size passed and no stack, so
    // the child continues on a copy of this stack, like fork. The process is single-threaded
    // (documented precondition), so no lock is held by a thread that does not exist in the child.
    let pid = unsafe {
        libc::syscall(
            libc::SYS_clone3,
            &args as *const CloneArgs,
            std::mem::size_of::<CloneArgs>(),
        )
    };
    if pid < 0 {
        let e = std::io::Error::last_os_error();
        return Err(io(format!(
            "starting the agent in cgroup {} (clone3 with CLONE_INTO_CGROUP needs Linux 5.7)",
            spec.cgroup_dir.display()
        ))(e));
    }
    if pid == 0 {
        drop(ready_r);
        drop(go_w);
        end_child(confine::child(
            spec.identity,
            &spec.trust,
            &plan,
            &filter,
            ready_w,
            go_r,
            &program,
            &argv,
        ));
    }
    let pid = pid as i32;
    CHILD.store(pid, Ordering::SeqCst);
    for sig in [libc::SIGINT, libc::SIGTERM, libc::SIGHUP, libc::SIGQUIT] {
        // SAFETY: installs an async-signal-safe handler.
        unsafe { libc::signal(sig, forward_signal as *const () as libc::sighandler_t) };
    }
    drop(ready_w);
    drop(go_r);
    drop(cgroup);
    if let Identity::UserNs { host_uid, host_gid } = spec.identity {
        let mut ready = fs::File::from(ready_r);
        let mut byte = [0u8; 1];
        // The child writes one byte after unshare(CLONE_NEWUSER), or exits on a failure (EOF).
        if matches!(ready.read(&mut byte), Ok(1)) {
            let mapped = write_id_maps(pid, host_uid, host_gid);
            let mut go = fs::File::from(go_w);
            let _ = go.write_all(if mapped.is_ok() { b"1" } else { b"0" });
            if let Err(e) = mapped {
                eprintln!("brokerctl run: {e}");
            }
        }
    } else {
        drop(ready_r);
        drop(go_w);
    }
    wait_for(pid)
}

fn write_id_maps(pid: i32, host_uid: u32, host_gid: u32) -> Result<(), LaunchError> {
    let proc = PathBuf::from(format!("/proc/{pid}"));
    fs::write(proc.join("setgroups"), "deny").map_err(io("writing setgroups deny"))?;
    fs::write(proc.join("uid_map"), format!("0 {host_uid} 1\n"))
        .map_err(io("writing the agent's uid_map"))?;
    fs::write(proc.join("gid_map"), format!("0 {host_gid} 1\n"))
        .map_err(io("writing the agent's gid_map"))?;
    Ok(())
}

fn wait_for(pid: i32) -> Result<i32, LaunchError> {
    loop {
        let mut status = 0;
        // SAFETY: waits for our own child; `status` is a valid out pointer.
        let r = unsafe { libc::waitpid(pid, &mut status, 0) };
        if r < 0 {
            let e = std::io::Error::last_os_error();
            if e.kind() == std::io::ErrorKind::Interrupted {
                continue;
            }
            return Err(io("waiting for the agent")(e));
        }
        if libc::WIFEXITED(status) {
            return Ok(libc::WEXITSTATUS(status));
        }
        if libc::WIFSIGNALED(status) {
            return Ok(128 + libc::WTERMSIG(status));
        }
    }
}

/// Decodes the octal escapes (`\040` for a space) of a mountinfo path.
fn unescape_mount_path(s: &str) -> PathBuf {
    let b = s.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        if b[i] == b'\\'
            && i + 4 <= b.len()
            && b[i + 1..i + 4].iter().all(|c| (b'0'..=b'7').contains(c))
        {
            out.push((b[i + 1] - b'0') * 64 + (b[i + 2] - b'0') * 8 + (b[i + 3] - b'0'));
            i += 4;
        } else {
            out.push(b[i]);
            i += 1;
        }
    }
    PathBuf::from(OsString::from_vec(out))
}

/// Mount points of the given file system types in a mountinfo text, deepest first.
fn mounts_of_types(mountinfo: &str, types: &[&str]) -> Vec<PathBuf> {
    let mut found: Vec<PathBuf> = mountinfo
        .lines()
        .filter_map(|line| {
            let (left, right) = line.split_once(" - ")?;
            let fstype = right.split_whitespace().next()?;
            let point = left.split_whitespace().nth(4)?;
            types.contains(&fstype).then(|| unescape_mount_path(point))
        })
        .collect();
    found.sort_by_key(|p| std::cmp::Reverse(p.as_os_str().len()));
    found.dedup();
    found
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn user_ids_parse_and_root_is_refused() {
        assert_eq!(
            Identity::parse_user("1000"),
            Ok(Identity::User {
                uid: 1000,
                gid: 1000
            })
        );
        assert_eq!(
            Identity::parse_user("1000:2000"),
            Ok(Identity::User {
                uid: 1000,
                gid: 2000
            })
        );
        for bad in ["0", "0:5", "5:0", "root", "", "1000:", "-1"] {
            assert!(Identity::parse_user(bad).is_err(), "{bad:?}");
        }
    }

    #[test]
    fn mountinfo_cgroup_and_bpf_mounts_are_found_deepest_first() {
        let text = "\
22 1 0:21 / /sys rw,nosuid - sysfs sysfs rw
30 22 0:26 / /sys/fs/cgroup ro - tmpfs tmpfs ro
31 30 0:27 / /sys/fs/cgroup/unified rw - cgroup2 cgroup2 rw
32 30 0:28 / /sys/fs/cgroup/cpu rw - cgroup cgroup rw,cpu
40 22 0:35 / /sys/fs/bpf rw - bpf bpf rw
41 1 0:36 / /mnt/with\\040space rw - bpf bpf rw
";
        let found = mounts_of_types(text, &["cgroup", "cgroup2", "bpf"]);
        assert_eq!(
            found,
            [
                PathBuf::from("/sys/fs/cgroup/unified"),
                PathBuf::from("/sys/fs/cgroup/cpu"),
                PathBuf::from("/mnt/with space"),
                PathBuf::from("/sys/fs/bpf"),
            ]
        );
    }

    #[test]
    fn inet_sockets_as_stdio_are_refused_and_unix_sockets_pipes_and_files_are_not() {
        use std::os::fd::AsRawFd as _;
        let listener = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
        let udp = std::net::UdpSocket::bind("[::1]:0").expect("bind v6");
        for fd in [listener.as_raw_fd(), udp.as_raw_fd()] {
            let err = refuse_inet_stdio(&[fd]).expect_err("an inet socket is refused");
            assert!(
                err.to_string().contains("made outside the agent's cgroup"),
                "{err}"
            );
        }
        let (unix, _peer) = std::os::unix::net::UnixStream::pair().expect("socketpair");
        let (r, w) = pipe().expect("pipe");
        let file = tempfile::tempfile().expect("file");
        refuse_inet_stdio(&[
            unix.as_raw_fd(),
            r.as_raw_fd(),
            w.as_raw_fd(),
            file.as_raw_fd(),
        ])
        .expect("AF_UNIX, pipes and files are fine");
    }
}
