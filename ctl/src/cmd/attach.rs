//! `brokerctl attach` and `brokerctl detach`: tag and untag a cgroup, so that the TCP
//! connections made inside it go to brokerd (or no longer do).

mod container;

use std::path::Path;

use agent_broker_core::cgroup::CgroupPath;
use agent_broker_protocol::{Request, Response, TaggedCgroup};

use crate::control::{call, unexpected};

pub use container::{Containerd, Runtime, container_pid};

/// Tag a cgroup: every TCP connection made inside it (and below it) goes to brokerd.
///
/// With --as NAME the cgroup runs under a stable agent name, for workloads whose cgroup a
/// container runtime puts at a path nobody can predict (`libpod_parent/libpod-<id>`,
/// `kubepods.slice/.../cri-containerd-<id>.scope`): its connections and DNS queries are
/// attributed to NAME, and those of a cgroup `x` below it to `NAME/x`. Policy files (`cgroup =
/// "NAME"`), handles, audit records, the console and `status` use the name, exactly as for a
/// cgroup at that path (a policy file for `NAME/x` narrows the sub-agent `x`); audit records
/// keep the real cgroup path beside it. The name stays with the tag across brokerd restarts and
/// goes on detach. A tagged cgroup cannot be attached again under another name (detach it
/// first), and names do not nest: NAME may not equal, contain or lie below the name or the path
/// of another tagged cgroup (a tag without a name is named by its path), nor PATH another tag's
/// name.
///
/// With --pid, tag the cgroup of a running process instead; when that process has a network
/// namespace of its own (a container's), brokerd also opens its proxy and DNS listeners inside
/// that namespace, on loopback with its own ports, so the workload is brokered there. Those
/// listeners are released when the process's cgroup has no process left (or is removed), or on
/// detach, and re-opened when brokerd restarts while the workload still runs. With --cgroup,
/// processes of the cgroup that already run in a network namespace of their own get listeners
/// there too.
#[derive(Debug, clap::Args)]
pub struct AttachArgs {
    /// cgroup path relative to the cgroup2 mount.
    #[arg(
        long,
        value_name = "PATH",
        required_unless_present_any = ["pid", "container"],
        conflicts_with = "pid"
    )]
    cgroup: Option<String>,
    /// Tag the cgroup (and serve the network namespace) of this running process (a host pid).
    #[arg(long, value_name = "PID", conflicts_with = "container")]
    pid: Option<u32>,
    /// Create the cgroup if it does not exist (with --cgroup).
    #[arg(long, requires = "cgroup")]
    create: bool,
    /// The agent name the cgroup runs under, a cgroup-style path such as `agents/foo`
    /// [default: the cgroup path].
    #[arg(long = "as", value_name = "NAME")]
    name: Option<String>,
    /// A running container, by name or ID: its init process is tagged as with --pid (found
    /// through the runtime's CLI: `podman inspect`, `docker inspect`, or containerd's `ctr task
    /// ls`, where the ID is the name).
    #[arg(long, value_name = "NAME|ID", conflicts_with = "cgroup")]
    container: Option<String>,
    /// The runtime that runs --container (default: podman if it is on PATH, else docker;
    /// containerd only when named).
    #[arg(long, value_name = "RUNTIME", requires = "container")]
    runtime: Option<Runtime>,
    /// containerd namespace of --container, with --runtime containerd (default:
    /// $CONTAINERD_NAMESPACE, else "default"; Kubernetes pods run in "k8s.io").
    #[arg(long, value_name = "NS", requires = "container")]
    namespace: Option<String>,
    /// containerd's socket, with --runtime containerd (default: $CONTAINERD_ADDRESS, else
    /// /run/containerd/containerd.sock).
    #[arg(long, value_name = "SOCKET", requires = "container")]
    address: Option<String>,
}

/// Untag a cgroup: its connections are no longer redirected, and the agent name it ran under
/// (`attach --as`) is given up.
#[derive(Debug, clap::Args)]
pub struct DetachArgs {
    /// cgroup path relative to the cgroup2 mount.
    #[arg(long, value_name = "PATH")]
    cgroup: String,
}

pub fn attach(run_dir: &Path, args: AttachArgs) -> anyhow::Result<()> {
    let name = parse_name(args.name.as_deref())?;
    if let Some(container) = &args.container {
        if args.runtime != Some(Runtime::Containerd)
            && (args.namespace.is_some() || args.address.is_some())
        {
            anyhow::bail!("--namespace and --address are for --runtime containerd");
        }
        let containerd = Containerd::resolve(args.address, args.namespace);
        return attach_container(run_dir, args.runtime, container, &containerd, name.as_ref());
    }
    if let Some(pid) = args.pid {
        return attach_pid(run_dir, pid, name.as_ref());
    }
    let Some(cgroup) = args.cgroup else {
        anyhow::bail!("give --cgroup PATH, --pid PID or --container NAME");
    };
    let path = CgroupPath::parse(&cgroup)?;
    let (tagged, already) = tag(run_dir, &path, args.create, name.as_ref())?;
    let agent = agent_suffix(&tagged);
    if already && tagged.path == path.to_string() {
        outln!("{} is already tagged{agent}", tagged.path);
    } else if already {
        outln!("{path} is covered by tagged cgroup {}{agent}", tagged.path);
    } else {
        outln!("tagged {}{agent} (cgroup id {})", tagged.path, tagged.id);
    }
    Ok(())
}

/// `attach --container`: tags the container's init process as `attach --pid` does, so brokerd
/// also serves the container's network namespace.
fn attach_container(
    run_dir: &Path,
    runtime: Option<Runtime>,
    container: &str,
    containerd: &Containerd,
    name: Option<&CgroupPath>,
) -> anyhow::Result<()> {
    let pid = container_pid(runtime, container, containerd)?;
    let path = container::pid_cgroup(pid, container)?;
    outln!("container {container}: process {pid}, cgroup {path}");
    attach_pid_within(run_dir, pid, name, Some(&path))
}

/// Validates an agent name given with `--as` (a cgroup-style path such as `agents/foo`).
pub fn parse_name(raw: Option<&str>) -> anyhow::Result<Option<CgroupPath>> {
    raw.map(|n| CgroupPath::parse(n).map_err(|e| anyhow::anyhow!("--as: {e}")))
        .transpose()
}

/// " as agent NAME" for a tag with a name of its own.
fn agent_suffix(tagged: &TaggedCgroup) -> String {
    match &tagged.name {
        Some(name) => format!(" as agent {name}"),
        None => String::new(),
    }
}

/// `attach --pid`: tags the process's cgroup and serves its network namespace.
pub fn attach_pid(run_dir: &Path, pid: u32, name: Option<&CgroupPath>) -> anyhow::Result<()> {
    attach_pid_within(run_dir, pid, name, None)
}

/// [`attach_pid`], refused by brokerd unless the process is in `within` or below it.
fn attach_pid_within(
    run_dir: &Path,
    pid: u32,
    name: Option<&CgroupPath>,
    within: Option<&CgroupPath>,
) -> anyhow::Result<()> {
    let request = Request::AttachPid {
        pid,
        name: name.map(ToString::to_string),
        within: within.map(ToString::to_string),
    };
    match call(run_dir, &request)? {
        Response::AttachedPid {
            cgroup,
            already,
            workload,
        } => {
            let agent = agent_suffix(&cgroup);
            if already {
                outln!("{} is already tagged{agent}", cgroup.path);
            } else {
                outln!("tagged {}{agent} (cgroup id {})", cgroup.path, cgroup.id);
            }
            match workload {
                Some(w) => {
                    let listeners: Vec<String> = w
                        .listeners
                        .iter()
                        .chain(&w.dns_listeners)
                        .map(|a| a.to_string())
                        .collect();
                    outln!(
                        "serving network namespace {} of process {pid} (cgroup {}): {}",
                        w.netns_cookie,
                        w.cgroup,
                        listeners.join(" ")
                    );
                }
                None => outln!("process {pid} is in brokerd's own network namespace"),
            }
            Ok(())
        }
        other => Err(unexpected(other)),
    }
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

/// Asks brokerd to tag `path` (creating it if `create`), under the agent `name` if given;
/// returns the tagged cgroup that covers it and whether it was tagged already. `brokerctl run`
/// tags through this too.
pub fn tag(
    run_dir: &Path,
    path: &CgroupPath,
    create: bool,
    name: Option<&CgroupPath>,
) -> anyhow::Result<(TaggedCgroup, bool)> {
    let request = Request::Attach {
        cgroup: path.to_string(),
        create,
        name: name.map(ToString::to_string),
    };
    match call(run_dir, &request)? {
        Response::Attached { cgroup, already } => Ok((cgroup, already)),
        other => Err(unexpected(other)),
    }
}
