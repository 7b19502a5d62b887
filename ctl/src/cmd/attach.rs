//! `brokerctl attach` and `brokerctl detach`: tag and untag a cgroup, so that the TCP
//! connections made inside it go to brokerd (or no longer do).

mod container;

use std::path::Path;

use agent_broker_core::cgroup::CgroupPath;
use agent_broker_protocol::{Request, Response, TaggedCgroup};

use crate::control::{call, unexpected};

pub use container::{Runtime, container_pid};

/// Tag a cgroup: every TCP connection made inside it (and below it) goes to brokerd.
#[derive(Debug, clap::Args)]
pub struct AttachArgs {
    /// cgroup path relative to the cgroup2 mount.
    #[arg(long, value_name = "PATH", required_unless_present = "container")]
    cgroup: Option<String>,
    /// Create the cgroup if it does not exist.
    #[arg(long)]
    create: bool,
    /// A running container, by name or ID: the cgroup of its init process is tagged (asked
    /// from the runtime's CLI: `podman inspect`, `docker inspect`).
    #[arg(long, value_name = "NAME|ID", conflicts_with_all = ["cgroup", "create"])]
    container: Option<String>,
    /// The runtime that runs --container (default: podman if it is on PATH, else docker).
    #[arg(long, value_name = "RUNTIME", requires = "container")]
    runtime: Option<Runtime>,
}

/// Untag a cgroup: its connections are no longer redirected.
#[derive(Debug, clap::Args)]
pub struct DetachArgs {
    /// cgroup path relative to the cgroup2 mount.
    #[arg(long, value_name = "PATH")]
    cgroup: String,
}

pub fn attach(run_dir: &Path, args: AttachArgs) -> anyhow::Result<()> {
    if let Some(name) = &args.container {
        return attach_container(run_dir, args.runtime, name);
    }
    let path = CgroupPath::parse(args.cgroup.as_deref().unwrap_or_default())?;
    let (tagged, already) = tag(run_dir, &path, args.create)?;
    if already && tagged.path == path.to_string() {
        outln!("{} is already tagged", tagged.path);
    } else if already {
        outln!("{path} is covered by tagged cgroup {}", tagged.path);
    } else {
        outln!("tagged {} (cgroup id {})", tagged.path, tagged.id);
    }
    Ok(())
}

/// `attach --container`: tags the cgroup of the container's init process.
// Issue 14: once `attach --pid` is on main, this becomes `attach_pid(run_dir, pid)`, so brokerd
// also opens listeners in the container's network namespace (branch try-merge-netns has it).
fn attach_container(run_dir: &Path, runtime: Option<Runtime>, name: &str) -> anyhow::Result<()> {
    let pid = container_pid(runtime, name)?;
    let path = container::pid_cgroup(pid, name)?;
    let (tagged, already) = tag(run_dir, &path, false)?;
    if already && tagged.path == path.to_string() {
        outln!("{path} is already tagged (container {name}, pid {pid})");
    } else if already {
        outln!(
            "container {name} (pid {pid}, cgroup {path}) is covered by tagged cgroup {}",
            tagged.path
        );
    } else {
        outln!(
            "tagged {} (cgroup id {}) for container {name} (pid {pid})",
            tagged.path,
            tagged.id
        );
    }
    Ok(())
}

pub fn detach(run_dir: &Path, args: DetachArgs) -> anyhow::Result<()> {
    let path = CgroupPath::parse(&args.cgroup)?;
    let request = Request::Detach {
        cgroup: path.to_string(),
    };
    match call(run_dir, &request)? {
        Response::Detached { cgroup } => {
            outln!("untagged {cgroup}");
            Ok(())
        }
        other => Err(unexpected(other)),
    }
}

/// Asks brokerd to tag `path` (creating it if `create`); returns the tagged cgroup that covers
/// it and whether it was tagged already. `brokerctl run` tags through this too.
pub fn tag(
    run_dir: &Path,
    path: &CgroupPath,
    create: bool,
) -> anyhow::Result<(TaggedCgroup, bool)> {
    let request = Request::Attach {
        cgroup: path.to_string(),
        create,
    };
    match call(run_dir, &request)? {
        Response::Attached { cgroup, already } => Ok((cgroup, already)),
        other => Err(unexpected(other)),
    }
}
