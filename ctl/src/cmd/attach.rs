//! `brokerctl attach` and `brokerctl detach`: tag and untag a cgroup, so that the TCP
//! connections made inside it go to brokerd (or no longer do).

use std::path::Path;

use agent_broker_core::cgroup::CgroupPath;
use agent_broker_protocol::{Request, Response, TaggedCgroup};

use crate::control::{call, unexpected};

/// Tag a cgroup: every TCP connection made inside it (and below it) goes to brokerd.
#[derive(Debug, clap::Args)]
pub struct AttachArgs {
    /// cgroup path relative to the cgroup2 mount.
    #[arg(long, value_name = "PATH")]
    cgroup: String,
    /// Create the cgroup if it does not exist.
    #[arg(long)]
    create: bool,
}

/// Untag a cgroup: its connections are no longer redirected.
#[derive(Debug, clap::Args)]
pub struct DetachArgs {
    /// cgroup path relative to the cgroup2 mount.
    #[arg(long, value_name = "PATH")]
    cgroup: String,
}

pub fn attach(run_dir: &Path, args: AttachArgs) -> anyhow::Result<()> {
    let path = CgroupPath::parse(&args.cgroup)?;
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
