//! `brokerctl run`: tag a cgroup, then start a command inside it through the hardened launcher
//! (`crate::launcher`), and exit with the command's status; or, with `--unprivileged`, start it
//! in a sandbox of its own namespaces served by a `brokerd --unprivileged`
//! (`crate::launcher::unprivileged`).

use std::{ffi::OsString, path::PathBuf};

use agent_broker_core::cgroup::{CgroupPath, CgroupRoot};
use anyhow::{Context as _, bail};

use crate::{cmd, launcher};

/// Start a command inside a tagged cgroup (tagging it first if needed), sandboxed; or, with
/// --unprivileged, in a sandbox of its own namespaces, as any user.
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
/// userfaultfd and io_uring, and the TIOCSTI and TIOCLINUX ioctls. brokerctl waits for CMD, forwards SIGINT, SIGTERM, SIGHUP and
/// SIGQUIT to it, and exits with its status (128 + signal if it was killed; 126 if it could
/// not be started). Needs root.
///
/// With --unprivileged (any user, no eBPF, no root): brokerctl hands brokerd's sandbox socket
/// (<run-dir>/sandbox.sock, served by `brokerd --unprivileged`) a listener and a DNS socket it
/// opened inside a new network namespace with only `lo`, where nftables rules redirect every TCP
/// connect (loopback included) to the listener and every UDP datagram to port 53 to the DNS
/// socket, and refuse everything else. CMD is not started if brokerd cannot be reached or
/// refuses. CMD runs as pid 2 of a new pid namespace with a fresh /proc, the same trust stores,
/// /etc/resolv.conf naming 127.0.0.1, brokerd's run directory, the user's runtime directory,
/// X11, D-Bus and Docker sockets hidden, in a nested user namespace as the same uid with no
/// capabilities, no_new_privs, the same Landlock domain and seccomp filter. When brokerctl is
/// root, the sandbox runs as uid and gid 65534. Needs the `ip` command, and `nft` (or
/// iptables-nft-restore and ip6tables-nft-restore); `brokerctl doctor` checks the host.
#[derive(Debug, clap::Args)]
pub struct Args {
    /// Start CMD in a sandbox of its own namespaces served by `brokerd --unprivileged`, as any
    /// user (needs --as; --cgroup, --create, --user and --userns* do not apply).
    #[arg(long, requires = "name")]
    unprivileged: bool,
    /// cgroup path relative to the cgroup2 mount (required unless --unprivileged).
    #[arg(
        long,
        value_name = "PATH",
        required_unless_present = "unprivileged",
        conflicts_with = "unprivileged"
    )]
    cgroup: Option<String>,
    /// Create the cgroup if it does not exist.
    #[arg(long, conflicts_with = "unprivileged")]
    create: bool,
    /// Tag the cgroup under this agent name (see `brokerctl attach --as`); a cgroup tagged
    /// already must run under this name already. With --unprivileged, the agent name brokerd
    /// serves the sandbox as (its policy, handles and audit records).
    #[arg(long = "as", value_name = "NAME")]
    name: Option<String>,
    /// Run as this unprivileged uid (and gid; default: the same number). 0 is refused.
    #[arg(long, value_name = "UID[:GID]", value_parser = launcher::Identity::parse_user, conflicts_with_all = ["userns", "unprivileged"])]
    user: Option<launcher::Identity>,
    /// Run as root inside a new user namespace whose root maps to --userns-uid on the host
    /// (the default when --user is not given).
    #[arg(long, conflicts_with = "unprivileged")]
    userns: bool,
    /// The host uid (and gid) the user namespace's root maps to.
    #[arg(long, value_name = "UID", default_value_t = 65534, value_parser = clap::value_parser!(u32).range(1..), conflicts_with = "unprivileged")]
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
    if args.unprivileged {
        return run_unprivileged(run_dir, args);
    }
    let Some(cgroup) = args.cgroup.as_deref() else {
        bail!("brokerctl run needs --cgroup (or --unprivileged)");
    };
    if !nix::unistd::geteuid().is_root() {
        bail!(
            "brokerctl run needs root: it starts the agent inside its cgroup with a \
             private mount namespace and an identity of its own (without root: \
             brokerctl run --unprivileged --as NAME, served by brokerd --unprivileged)"
        );
    }
    let path = CgroupPath::parse(cgroup)?;
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

/// `run --unprivileged`. Never returns on success: brokerctl exits with the command's status.
fn run_unprivileged(run_dir: &std::path::Path, args: Args) -> anyhow::Result<()> {
    let name =
        cmd::attach::parse_name(args.name.as_deref())?.context("--unprivileged needs --as NAME")?;
    let (program, rest) = args.command.split_first().context("no command given")?;
    let workdir_given = args.workdir.is_some();
    let workdir = match args.workdir {
        Some(w) => w,
        None => std::env::current_dir().context("reading the current directory")?,
    };
    let spec = launcher::unprivileged::Spec {
        name: name.to_string(),
        run_dir: run_dir.to_path_buf(),
        workdir,
        workdir_given,
        allow_write: args.allow_write,
        program: program.clone(),
        args: rest.to_vec(),
    };
    let code = launcher::unprivileged::launch(&spec)?;
    std::process::exit(code);
}

#[cfg(test)]
mod tests {
    use clap::Parser as _;

    #[derive(Debug, clap::Parser)]
    struct Cli {
        #[command(flatten)]
        run: super::Args,
    }

    fn parse(argv: &[&str]) -> Result<super::Args, clap::Error> {
        let mut full = vec!["run"];
        full.extend_from_slice(argv);
        Cli::try_parse_from(full).map(|c| c.run)
    }

    #[test]
    fn unprivileged_needs_a_name_and_no_cgroup() {
        let a = parse(&["--unprivileged", "--as", "agents/a", "--", "true"]).expect("parses");
        assert!(a.unprivileged && a.cgroup.is_none());
        assert_eq!(a.name.as_deref(), Some("agents/a"));
        let a = parse(&[
            "--unprivileged",
            "--as",
            "agents/a",
            "--workdir",
            "/tmp",
            "--allow-write",
            "/var/tmp",
            "--",
            "sh",
            "-c",
            "true",
        ])
        .expect("parses");
        assert_eq!(a.allow_write, [std::path::PathBuf::from("/var/tmp")]);
        assert_eq!(a.command.len(), 3);
        assert!(
            parse(&["--unprivileged", "--", "true"]).is_err(),
            "--as is needed"
        );
        for extra in [
            &["--cgroup", "agents/a"][..],
            &["--create"],
            &["--user", "1000"],
            &["--userns"],
            &["--userns-uid", "1000"],
        ] {
            let mut argv = vec!["--unprivileged", "--as", "agents/a"];
            argv.extend_from_slice(extra);
            argv.extend_from_slice(&["--", "true"]);
            assert!(parse(&argv).is_err(), "{extra:?} with --unprivileged");
        }
    }

    #[test]
    fn root_mode_still_needs_a_cgroup() {
        assert!(parse(&["--", "true"]).is_err());
        let a = parse(&["--cgroup", "agents/a", "--userns", "--", "true"]).expect("parses");
        assert_eq!(a.cgroup.as_deref(), Some("agents/a"));
        assert!(!a.unprivileged);
        assert_eq!(a.userns_uid, 65534);
    }
}
