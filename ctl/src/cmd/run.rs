//! `brokerctl run`: tag a cgroup, then start a command inside it through the hardened launcher
//! (`crate::launcher`), and exit with the command's status.

use std::{ffi::OsString, path::PathBuf};

use agent_broker_core::cgroup::{CgroupPath, CgroupRoot};
use anyhow::{Context as _, bail};

use crate::{cmd, launcher};

/// Start a command inside a tagged cgroup (tagging it first if needed), sandboxed.
///
/// brokerctl asks brokerd to tag the cgroup (CMD is not started if brokerd cannot be
/// reached), then starts CMD directly inside the cgroup (clone3 CLONE_INTO_CGROUP) with only
/// stdin, stdout and stderr open, and before executing it: a private mount namespace without
/// cgroupfs and bpffs, with the system CA bundle plus the broker CA mounted read-only over the
/// standard bundle paths (SSL_CERT_FILE, NODE_EXTRA_CA_CERTS and
/// GRPC_DEFAULT_SSL_ROOTS_FILE_PATH point at it), the broker CA and its subject-hash link in
/// /etc/ssl/certs, and a JVM trust store with the same certificates over the JVMs' cacerts;
/// an unprivileged identity (--user, or root inside a user namespace: --userns, the default);
/// no capabilities and no_new_privs; a Landlock domain (read-only file system except the work directory, --allow-write
/// directories and /tmp, /var/tmp, /dev/shm; no signals or abstract UNIX sockets outside it);
/// a seccomp filter refusing AF_PACKET, AF_VSOCK, AF_XDP, AF_SMC, AF_KEY and AF_ALG sockets
/// and netlink other than NETLINK_ROUTE,
/// bpf, ptrace, process_vm_readv/writev, perf_event_open, keyrings, modules, kexec,
/// userfaultfd and io_uring. brokerctl waits for CMD, forwards SIGINT, SIGTERM, SIGHUP and
/// SIGQUIT to it, and exits with its status (128 + signal if it was killed; 126 if it could
/// not be started). Needs root.
#[derive(Debug, clap::Args)]
pub struct Args {
    /// cgroup path relative to the cgroup2 mount.
    #[arg(long, value_name = "PATH")]
    cgroup: String,
    /// Create the cgroup if it does not exist.
    #[arg(long)]
    create: bool,
    /// Tag the cgroup under this agent name (see `brokerctl attach --as`); a cgroup tagged
    /// already must run under this name already.
    #[arg(long = "as", value_name = "NAME")]
    name: Option<String>,
    /// Run as this unprivileged uid (and gid; default: the same number). 0 is refused.
    #[arg(long, value_name = "UID[:GID]", value_parser = launcher::Identity::parse_user, conflicts_with = "userns")]
    user: Option<launcher::Identity>,
    /// Run as root inside a new user namespace whose root maps to --userns-uid on the host
    /// (the default when --user is not given).
    #[arg(long)]
    userns: bool,
    /// The host uid (and gid) the user namespace's root maps to.
    #[arg(long, value_name = "UID", default_value_t = 65534, value_parser = clap::value_parser!(u32).range(1..))]
    userns_uid: u32,
    /// Working directory of CMD, writable under Landlock [default: the current directory, or
    /// /tmp when the agent's identity cannot enter it].
    #[arg(long, value_name = "DIR")]
    workdir: Option<PathBuf>,
    /// A directory CMD may write besides the work directory and the scratch places
    /// (repeatable).
    #[arg(long, value_name = "DIR")]
    allow_write: Vec<PathBuf>,
    /// The command and its arguments.
    #[arg(required = true, last = true, value_name = "CMD")]
    command: Vec<OsString>,
}

/// Never returns on success: brokerctl exits with the command's status.
pub fn run(run_dir: &std::path::Path, args: Args) -> anyhow::Result<()> {
    if !nix::unistd::geteuid().is_root() {
        bail!(
            "brokerctl run needs root: it starts the agent inside its cgroup with a \
             private mount namespace and an identity of its own"
        );
    }
    let path = CgroupPath::parse(&args.cgroup)?;
    let name = cmd::attach::parse_name(args.name.as_deref())?;
    cmd::attach::tag(run_dir, &path, args.create, name.as_ref())?;
    let pem = cmd::ca::pem(run_dir)?;
    let root = CgroupRoot::discover()?;
    let (program, rest) = args.command.split_first().context("no command given")?;
    let workdir_given = args.workdir.is_some();
    let workdir = match args.workdir {
        Some(w) => w,
        None => std::env::current_dir().context("reading the current directory")?,
    };
    let spec = launcher::LaunchSpec {
        cgroup_dir: root.dir(&path),
        // --userns is the default; clap has already refused it together with --user.
        identity: args.user.unwrap_or(launcher::Identity::UserNs {
            host_uid: args.userns_uid,
            host_gid: args.userns_uid,
        }),
        workdir,
        workdir_given,
        allow_write: args.allow_write,
        trust: launcher::TrustStores::prepare(&pem)?,
        program: program.clone(),
        args: rest.to_vec(),
    };
    let code = launcher::launch(&spec)?;
    std::process::exit(code);
}
