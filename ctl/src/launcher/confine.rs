//! The child's side of the launcher: the steps between `clone3` and `execve`. The unprivileged
//! launcher (`super::unprivileged`) uses the same mount layers ([`private_mounts`]) and last
//! steps ([`confine_and_exec`]) around its own namespaces.
//!
//! Runs in the freshly cloned, single-threaded child. Every failure is returned with the step
//! that failed; the caller prints it and exits 126 without starting the agent.

use std::{
    collections::BTreeMap,
    convert::Infallible,
    ffi::{CStr, CString},
    fs,
    io::{Read as _, Write as _},
    os::fd::{AsRawFd as _, OwnedFd},
    path::{Path, PathBuf},
};

use landlock::{
    ABI, Access, AccessFs, CompatLevel, Compatible, Ruleset, RulesetAttr, RulesetCreatedAttr,
    Scope, path_beneath_rules,
};
use nix::mount::{MntFlags, MsFlags};
use seccompiler::{
    BpfProgram, SeccompAction, SeccompCmpArgLen, SeccompCmpOp, SeccompCondition, SeccompFilter,
    SeccompRule, TargetArch,
};

use super::{
    Identity, LaunchError, io, mounts_of_types,
    trust::{BROKER_CA_FILE, CA_BUNDLE_PATHS, CA_DIR, CA_ENV, TrustStores},
};

/// The confinement both launchers apply last (Landlock and the work directory).
pub struct Plan {
    pub workdir: PathBuf,
    /// Whether the work directory was asked for (`--workdir`) rather than inherited.
    pub workdir_given: bool,
    pub allow_write: Vec<PathBuf>,
}

/// A small file brokerctl writes into the sandbox's staging tmpfs and bind-mounts read-only
/// over `target` (when `target` exists), e.g. the unprivileged sandbox's `/etc/resolv.conf`.
pub struct StagedFile {
    /// File name in the staging directory.
    pub name: &'static str,
    pub target: PathBuf,
    pub contents: Vec<u8>,
}

/// Socket families refused by the seccomp filter: the cgroup hooks only see AF_INET, AF_INET6
/// and AF_UNIX. AF_VSOCK needs no privilege and reaches the hypervisor on a VM.
pub const DENIED_FAMILIES: [(i32, &str); 6] = [
    (libc::AF_PACKET, "AF_PACKET"),
    (libc::AF_VSOCK, "AF_VSOCK"),
    (libc::AF_XDP, "AF_XDP"),
    (43, "AF_SMC"),
    (libc::AF_KEY, "AF_KEY"),
    (libc::AF_ALG, "AF_ALG"),
];

/// System calls refused outright (EPERM).
const DENIED_SYSCALLS: [(libc::c_long, &str); 17] = [
    (libc::SYS_bpf, "bpf"),
    (libc::SYS_ptrace, "ptrace"),
    (libc::SYS_process_vm_readv, "process_vm_readv"),
    (libc::SYS_process_vm_writev, "process_vm_writev"),
    (libc::SYS_perf_event_open, "perf_event_open"),
    (libc::SYS_kexec_load, "kexec_load"),
    (libc::SYS_kexec_file_load, "kexec_file_load"),
    (libc::SYS_init_module, "init_module"),
    (libc::SYS_finit_module, "finit_module"),
    (libc::SYS_delete_module, "delete_module"),
    (libc::SYS_keyctl, "keyctl"),
    (libc::SYS_add_key, "add_key"),
    (libc::SYS_request_key, "request_key"),
    (libc::SYS_userfaultfd, "userfaultfd"),
    (libc::SYS_io_uring_setup, "io_uring_setup"),
    (libc::SYS_io_uring_enter, "io_uring_enter"),
    (libc::SYS_io_uring_register, "io_uring_register"),
];

/// ioctl requests refused (EPERM): `TIOCSTI` and `TIOCLINUX` (see [`seccomp_filter`]).
const DENIED_IOCTLS: [u64; 2] = [libc::TIOCSTI, libc::TIOCLINUX];

/// The seccomp filter (built before the clone, so the child does not allocate for it).
pub fn seccomp_filter() -> Result<BpfProgram, LaunchError> {
    let err = |e: seccompiler::BackendError| LaunchError::Invalid(format!("seccomp filter: {e}"));
    let mut rules: BTreeMap<i64, Vec<SeccompRule>> = BTreeMap::new();
    for (nr, _) in DENIED_SYSCALLS {
        rules.insert(nr, Vec::new());
    }
    for syscall in [libc::SYS_socket, libc::SYS_socketpair] {
        let mut by_family = Vec::new();
        for (family, _) in DENIED_FAMILIES {
            by_family.push(
                SeccompRule::new(vec![
                    SeccompCondition::new(
                        0,
                        SeccompCmpArgLen::Dword,
                        SeccompCmpOp::Eq,
                        family as u64,
                    )
                    .map_err(err)?,
                ])
                .map_err(err)?,
            );
        }
        if syscall == libc::SYS_socket {
            // Netlink other than NETLINK_ROUTE (which getaddrinfo uses): sock_diag would list
            // every TCP socket of the host, audit and others reach further.
            by_family.push(
                SeccompRule::new(vec![
                    SeccompCondition::new(
                        0,
                        SeccompCmpArgLen::Dword,
                        SeccompCmpOp::Eq,
                        libc::AF_NETLINK as u64,
                    )
                    .map_err(err)?,
                    SeccompCondition::new(
                        2,
                        SeccompCmpArgLen::Dword,
                        SeccompCmpOp::Ne,
                        libc::NETLINK_ROUTE as u64,
                    )
                    .map_err(err)?,
                ])
                .map_err(err)?,
            );
        }
        rules.insert(syscall, by_family);
    }
    // Terminal ioctls that make a terminal act on the agent's behalf: TIOCSTI pushes bytes into
    // the terminal's input (the user's shell would run them once the agent exits), TIOCLINUX
    // reaches the console's selection. The agent keeps its terminal for input and output.
    let mut ioctls = Vec::new();
    for request in DENIED_IOCTLS {
        ioctls.push(
            SeccompRule::new(vec![
                SeccompCondition::new(1, SeccompCmpArgLen::Dword, SeccompCmpOp::Eq, request)
                    .map_err(err)?,
            ])
            .map_err(err)?,
        );
    }
    rules.insert(libc::SYS_ioctl, ioctls);
    let arch = TargetArch::try_from(std::env::consts::ARCH)
        .map_err(|e| LaunchError::Invalid(format!("seccomp: {e}")))?;
    let filter = SeccompFilter::new(
        rules,
        SeccompAction::Allow,
        SeccompAction::Errno(libc::EPERM as u32),
        arch,
    )
    .map_err(err)?;
    BpfProgram::try_from(filter).map_err(err)
}

pub fn last_os(what: &str) -> LaunchError {
    io(what.to_string())(std::io::Error::last_os_error())
}

pub fn check(r: libc::c_int, what: &str) -> Result<(), LaunchError> {
    if r < 0 { Err(last_os(what)) } else { Ok(()) }
}

/// Runs the steps and executes the agent; returns only on failure.
#[expect(
    clippy::too_many_arguments,
    reason = "the root launcher's child state, passed once"
)]
pub fn child(
    identity: Identity,
    trust: &TrustStores,
    plan: &Plan,
    filter: &BpfProgram,
    ready: OwnedFd,
    go: OwnedFd,
    program: &CStr,
    argv: &[CString],
) -> Result<Infallible, LaunchError> {
    private_mounts(trust, &[], KernelFs::Unmount)?;
    match identity {
        Identity::User { uid, gid } => {
            drop_bounding_set()?;
            // SAFETY: plain system calls with valid arguments.
            unsafe {
                check(
                    libc::setgroups(0, std::ptr::null()),
                    "clearing supplementary groups",
                )?;
                check(libc::setresgid(gid, gid, gid), "setting the agent's gid")?;
                check(libc::setresuid(uid, uid, uid), "setting the agent's uid")?;
            }
        }
        Identity::UserNs { .. } => {
            // SAFETY: plain system call.
            check(
                unsafe { libc::unshare(libc::CLONE_NEWUSER) },
                "creating the user namespace",
            )?;
            let mut ready = fs::File::from(ready);
            ready
                .write_all(b"1")
                .map_err(io("telling brokerctl the user namespace exists"))?;
            drop(ready);
            let mut go = fs::File::from(go);
            let mut answer = [0u8; 1];
            if !matches!(go.read(&mut answer), Ok(1)) || answer[0] != b'1' {
                return Err(LaunchError::Invalid(
                    "brokerctl could not map the user namespace's ids".into(),
                ));
            }
            // SAFETY: plain system calls; uid/gid 0 are mapped by now.
            unsafe {
                check(
                    libc::setresgid(0, 0, 0),
                    "becoming gid 0 in the user namespace",
                )?;
                check(
                    libc::setresuid(0, 0, 0),
                    "becoming uid 0 in the user namespace",
                )?;
            }
            drop_bounding_set()?;
        }
    }
    confine_and_exec(plan, filter, program, argv)
}

/// Steps 3 to 6, shared with the unprivileged launcher: no capabilities, no_new_privs,
/// Landlock, the work directory, seccomp, only stdio open, execve. The bounding set must be
/// dropped already (it needs a capability this drops). Returns only on failure.
pub fn confine_and_exec(
    plan: &Plan,
    filter: &BpfProgram,
    program: &CStr,
    argv: &[CString],
) -> Result<Infallible, LaunchError> {
    drop_capabilities()?;
    // SAFETY: plain prctl.
    check(
        unsafe { libc::prctl(libc::PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0) },
        "setting no_new_privs",
    )?;
    landlock(plan)?;
    if let Err(e) = std::env::set_current_dir(&plan.workdir) {
        if plan.workdir_given {
            return Err(io(format!(
                "changing to the work directory {}",
                plan.workdir.display()
            ))(e));
        }
        // The caller's directory is not reachable for the agent's identity (a home under /root,
        // say): start in /tmp rather than not at all.
        let _ = writeln!(
            std::io::stderr(),
            "brokerctl run: the agent cannot enter {} ({e}); starting it in /tmp",
            plan.workdir.display()
        );
        std::env::set_current_dir("/tmp").map_err(io("changing to /tmp"))?;
    }
    seccompiler::apply_filter(filter)
        .map_err(|e| LaunchError::Invalid(format!("installing the seccomp filter: {e}")))?;
    // SAFETY: closes every descriptor from 3 up; nothing in this process uses them any more.
    check(
        unsafe { libc::syscall(libc::SYS_close_range, 3u32, u32::MAX, 0u32) as libc::c_int },
        "closing inherited descriptors",
    )?;
    let err = nix::unistd::execvp(program, argv).unwrap_err();
    Err(LaunchError::Invalid(format!(
        "cannot execute {}: {err}",
        program.to_string_lossy()
    )))
}

/// How cgroupfs and bpffs are taken out of the agent's mount namespace.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum KernelFs {
    /// Unmounted (real root can), and it is an error if one is still mounted: the root
    /// launcher's protection rests on it.
    Unmount,
    /// Unmounted where possible, else covered with an empty tmpfs: in a user namespace the
    /// inherited mounts are locked and stay in mountinfo under the cover. The unprivileged
    /// sandbox's protection does not rest on cgroups.
    Cover,
}

/// Step 1: private mount namespace without cgroupfs and bpffs, the broker CA trusted, and the
/// `files` staged over their targets.
pub fn private_mounts(
    trust: &TrustStores,
    files: &[StagedFile],
    kernel_fs: KernelFs,
) -> Result<(), LaunchError> {
    // SAFETY: plain system call.
    check(
        unsafe { libc::unshare(libc::CLONE_NEWNS) },
        "creating the mount namespace",
    )?;
    nix::mount::mount(
        None::<&str>,
        "/",
        None::<&str>,
        MsFlags::MS_REC | MsFlags::MS_PRIVATE,
        None::<&str>,
    )
    .map_err(|e| io("making the mounts private")(e.into()))?;
    let mountinfo =
        fs::read_to_string("/proc/self/mountinfo").map_err(io("reading /proc/self/mountinfo"))?;
    for point in mounts_of_types(&mountinfo, &["cgroup", "cgroup2", "bpf"]) {
        if nix::mount::umount2(&point, MntFlags::MNT_DETACH).is_err() {
            // Not unmountable (already covered, or busy): cover it with an empty read-only tmpfs.
            nix::mount::mount(
                Some("tmpfs"),
                &point,
                Some("tmpfs"),
                MsFlags::MS_RDONLY | MsFlags::MS_NOSUID | MsFlags::MS_NODEV | MsFlags::MS_NOEXEC,
                Some("size=4k,mode=0555"),
            )
            .map_err(|e| io(format!("hiding {}", point.display()))(e.into()))?;
        }
    }
    let still = if kernel_fs == KernelFs::Cover {
        Vec::new()
    } else {
        mounts_of_types(
            &fs::read_to_string("/proc/self/mountinfo")
                .map_err(io("reading /proc/self/mountinfo"))?,
            &["cgroup", "cgroup2", "bpf"],
        )
    };
    if !still.is_empty() {
        return Err(LaunchError::Invalid(format!(
            "cgroup or bpf file systems are still mounted at {still:?}"
        )));
    }
    mount_trust(trust, files)
}

/// Writes `bytes` as a read-only file at `path`.
fn write_read_only(path: &Path, bytes: &[u8]) -> Result<(), LaunchError> {
    let what = || format!("writing {}", path.display());
    let mut file = fs::File::create(path).map_err(io(what()))?;
    file.write_all(bytes).map_err(io(what()))?;
    // SAFETY: plain system call on our own descriptor.
    check(
        unsafe { libc::fchmod(file.as_raw_fd(), 0o444) },
        &format!("chmod of {}", path.display()),
    )
}

/// Bind-mounts `source` read-only over the file `target`.
fn bind_read_only(source: &Path, target: &Path) -> Result<(), LaunchError> {
    nix::mount::mount(
        Some(source),
        target,
        None::<&str>,
        MsFlags::MS_BIND,
        None::<&str>,
    )
    .map_err(|e| {
        io(format!(
            "mounting {} over {}",
            source.display(),
            target.display()
        ))(e.into())
    })?;
    nix::mount::mount(
        None::<&str>,
        target,
        None::<&str>,
        MsFlags::MS_BIND | MsFlags::MS_REMOUNT | MsFlags::MS_RDONLY,
        None::<&str>,
    )
    .map_err(|e| io(format!("making {} read-only", target.display()))(e.into()))
}

/// The broker CA and its hashed link as a layer over [`CA_DIR`]: `<hash>.<n>` with the first
/// `n` the directory does not use yet.
fn stage_ca_dir(layer: &Path, trust: &TrustStores, hash: &str) -> Result<(), LaunchError> {
    fs::create_dir(layer).map_err(io(format!("creating {}", layer.display())))?;
    write_read_only(&layer.join(BROKER_CA_FILE), &trust.broker_ca)?;
    let link = (0..100)
        .map(|n| format!("{hash}.{n}"))
        .find(|name| fs::symlink_metadata(Path::new(CA_DIR).join(name)).is_err())
        .ok_or_else(|| LaunchError::Invalid(format!("{CA_DIR} has no free {hash}.<n> name")))?;
    std::os::unix::fs::symlink(BROKER_CA_FILE, layer.join(&link))
        .map_err(io(format!("linking {link} to the broker CA")))
}

fn mount_trust(trust: &TrustStores, files: &[StagedFile]) -> Result<(), LaunchError> {
    let targets: Vec<&str> = CA_BUNDLE_PATHS
        .iter()
        .copied()
        .filter(|p| Path::new(p).is_file())
        .collect();
    // The files need a mount of this namespace to be bind-mounted from (a memfd's internal
    // mount is refused). A small tmpfs over the cgroup directory serves as that, and also
    // leaves nothing of cgroupfs to see there.
    let staging = ["/sys/fs/cgroup", "/mnt"]
        .into_iter()
        .find(|d| Path::new(d).is_dir())
        .ok_or_else(|| LaunchError::Invalid("no directory to stage the CA bundle in".into()))?;
    nix::mount::mount(
        Some("tmpfs"),
        staging,
        Some("tmpfs"),
        MsFlags::MS_NOSUID | MsFlags::MS_NODEV | MsFlags::MS_NOEXEC,
        Some("size=8m,mode=0755"),
    )
    .map_err(|e| io(format!("mounting a tmpfs on {staging}"))(e.into()))?;
    let staging = Path::new(staging);
    let source = staging.join("agent-broker-ca-bundle.pem");
    write_read_only(&source, &trust.bundle)?;
    let jvm_store = staging.join("agent-broker-cacerts.jks");
    if let Some(jvm) = &trust.jvm {
        write_read_only(&jvm_store, &jvm.store)?;
    }
    // Each staged file goes over a target that exists (a bind mount needs one); a dangling
    // symbolic link (resolv.conf of a resolver that is not running) is left as it is.
    let mut staged_files = Vec::new();
    for file in files {
        if file.target.is_file() {
            let source = staging.join(file.name);
            write_read_only(&source, &file.contents)?;
            staged_files.push((source, file.target.as_path()));
        }
    }
    let ca_layer = staging.join("ca-dir");
    let ca_dir_layer = match &trust.subject_hash {
        Some(hash) if Path::new(CA_DIR).is_dir() => {
            stage_ca_dir(&ca_layer, trust, hash)?;
            true
        }
        _ => false,
    };
    nix::mount::mount(
        None::<&str>,
        staging,
        None::<&str>,
        MsFlags::MS_REMOUNT
            | MsFlags::MS_RDONLY
            | MsFlags::MS_NOSUID
            | MsFlags::MS_NODEV
            | MsFlags::MS_NOEXEC,
        None::<&str>,
    )
    .map_err(|e| io(format!("making {} read-only", staging.display()))(e.into()))?;
    // First the directory (a read-only overlay: the staged layer above the real directory),
    // then the files, some of which are inside it.
    if ca_dir_layer {
        let options = format!("lowerdir={}:{CA_DIR}", ca_layer.display());
        if let Err(e) = nix::mount::mount(
            Some("overlay"),
            CA_DIR,
            Some("overlay"),
            MsFlags::MS_RDONLY | MsFlags::MS_NOSUID | MsFlags::MS_NODEV,
            Some(options.as_str()),
        ) {
            // The bundle paths below still carry the broker CA; only capath lookups miss it.
            let _ = writeln!(
                std::io::stderr(),
                "brokerctl run: cannot add the broker CA to {CA_DIR} (overlay: {e}); clients \
                 that read it as a CA directory will not find it"
            );
        }
    }
    for target in &targets {
        bind_read_only(&source, Path::new(target))?;
    }
    if let Some(jvm) = &trust.jvm {
        for target in &jvm.targets {
            bind_read_only(&jvm_store, target)?;
        }
    }
    for (source, target) in &staged_files {
        bind_read_only(source, target)?;
    }
    // The variables name a standard path when there is one (what tools expect), else the
    // staged file itself (a host without a system bundle).
    let bundle = targets
        .first()
        .map_or_else(|| source.clone(), PathBuf::from);
    for var in CA_ENV {
        // SAFETY: the child is single-threaded; nothing reads the environment concurrently.
        unsafe { std::env::set_var(var, &bundle) };
    }
    Ok(())
}

fn last_cap() -> u32 {
    fs::read_to_string("/proc/sys/kernel/cap_last_cap")
        .ok()
        .and_then(|s| s.trim().parse().ok())
        .unwrap_or(40)
}

pub fn drop_bounding_set() -> Result<(), LaunchError> {
    for cap in 0..=last_cap() {
        // SAFETY: plain prctl; EINVAL for a capability this kernel does not know is ignored.
        let r = unsafe { libc::prctl(libc::PR_CAPBSET_DROP, cap as libc::c_ulong, 0, 0, 0) };
        if r != 0 && std::io::Error::last_os_error().raw_os_error() != Some(libc::EINVAL) {
            return Err(last_os("dropping the capability bounding set"));
        }
    }
    Ok(())
}

#[repr(C)]
struct CapHeader {
    version: u32,
    pid: i32,
}

#[repr(C)]
#[derive(Default, Clone, Copy)]
struct CapData {
    effective: u32,
    permitted: u32,
    inheritable: u32,
}

fn drop_capabilities() -> Result<(), LaunchError> {
    // SAFETY: plain prctl.
    check(
        unsafe {
            libc::prctl(
                libc::PR_CAP_AMBIENT,
                libc::PR_CAP_AMBIENT_CLEAR_ALL,
                0,
                0,
                0,
            )
        },
        "clearing ambient capabilities",
    )?;
    let header = CapHeader {
        version: 0x2008_0522, // _LINUX_CAPABILITY_VERSION_3
        pid: 0,
    };
    let data = [CapData::default(); 2];
    // SAFETY: capset with a v3 header and the two data words it expects.
    let r = unsafe { libc::syscall(libc::SYS_capset, &header, data.as_ptr()) };
    check(r as libc::c_int, "dropping capabilities")
}

/// Step 4: Landlock, best effort for the running kernel's ABI.
fn landlock(plan: &Plan) -> Result<(), LaunchError> {
    let abi = ABI::V6;
    let err = |e: landlock::RulesetError| LaunchError::Invalid(format!("landlock: {e}"));
    let mut writable: Vec<PathBuf> = vec![
        plan.workdir.clone(),
        "/tmp".into(),
        "/var/tmp".into(),
        "/dev/shm".into(),
        "/dev/null".into(),
        "/dev/zero".into(),
        "/dev/full".into(),
        "/dev/tty".into(),
        "/dev/pts".into(),
        "/dev/urandom".into(),
        "/dev/random".into(),
    ];
    writable.extend(plan.allow_write.iter().cloned());
    writable.retain(|p| p.exists());
    Ruleset::default()
        .set_compatibility(CompatLevel::BestEffort)
        .handle_access(AccessFs::from_all(abi))
        .map_err(err)?
        .scope(Scope::from_all(abi))
        .map_err(err)?
        .create()
        .map_err(err)?
        .add_rules(path_beneath_rules(["/"], AccessFs::from_read(abi)))
        .map_err(err)?
        .add_rules(path_beneath_rules(&writable, AccessFs::from_all(abi)))
        .map_err(err)?
        .restrict_self()
        .map_err(err)?;
    Ok(())
}
