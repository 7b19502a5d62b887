//! `brokerctl attach` and `brokerctl detach`: tag and untag a cgroup, so that the TCP
//! connections made inside it go to brokerd (or no longer do).

use std::path::Path;

use agent_broker_core::cgroup::CgroupPath;
use agent_broker_protocol::{Request, Response, TaggedCgroup};

use crate::control::{call, unexpected};

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
#[derive(Debug, clap::Args)]
pub struct AttachArgs {
    /// cgroup path relative to the cgroup2 mount.
    #[arg(long, value_name = "PATH")]
    cgroup: String,
    /// Create the cgroup if it does not exist.
    #[arg(long)]
    create: bool,
    /// The agent name the cgroup runs under, a cgroup-style path such as `agents/foo`
    /// [default: the cgroup path].
    #[arg(long = "as", value_name = "NAME")]
    name: Option<String>,
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
    let path = CgroupPath::parse(&args.cgroup)?;
    let name = parse_name(args.name.as_deref())?;
    let (tagged, already) = tag(run_dir, &path, args.create, name.as_ref())?;
    let agent = match &tagged.name {
        Some(name) => format!(" as agent {name}"),
        None => String::new(),
    };
    if already && tagged.path == path.to_string() {
        outln!("{} is already tagged{agent}", tagged.path);
    } else if already {
        outln!("{path} is covered by tagged cgroup {}{agent}", tagged.path);
    } else {
        outln!("tagged {}{agent} (cgroup id {})", tagged.path, tagged.id);
    }
    Ok(())
}

/// Validates an agent name given with `--as` (a cgroup-style path such as `agents/foo`).
pub fn parse_name(raw: Option<&str>) -> anyhow::Result<Option<CgroupPath>> {
    raw.map(|n| CgroupPath::parse(n).map_err(|e| anyhow::anyhow!("--as: {e}")))
        .transpose()
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
