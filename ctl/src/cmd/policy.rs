//! `brokerctl policy`: check policy files offline (loaded as brokerd would load them), and ask
//! brokerd to reload, show or explain the policy it runs.

use std::{collections::BTreeMap, ffi::OsString, path::Path, path::PathBuf};

use agent_broker_core::{cgroup::CgroupPath, fmt::error_chain, policy::Policy};
use agent_broker_protocol::{Request, Response};
use anyhow::{Context as _, bail};

use crate::control::{call, unexpected};

/// Check, reload, show and explain the policy.
#[derive(Debug, clap::Subcommand)]
pub enum Command {
    /// Validate policy files offline (no brokerd needed): the files of DIR, with FILES added or
    /// replacing the ones of the same name, are loaded together as brokerd would load them.
    Check {
        /// The policy directory the files belong to.
        #[arg(long, value_name = "DIR", default_value = agent_broker_protocol::DEFAULT_POLICY_DIR)]
        policy_dir: PathBuf,
        /// Files to check; none: the directory as it is.
        files: Vec<PathBuf>,
    },
    /// Make brokerd load its policy directory now (it also does so within a second of a change).
    Reload,
    /// The effective policy of a cgroup.
    Show {
        /// The agent: a cgroup path, or the name a tag runs under (`attach --as`).
        #[arg(long, value_name = "PATH")]
        cgroup: String,
    },
    /// Would METHOD URL from the cgroup be allowed? Prints the rule and file that decide.
    Explain {
        /// The agent: a cgroup path, or the name a tag runs under (`attach --as`).
        #[arg(long, value_name = "PATH")]
        cgroup: String,
        /// HTTP method, e.g. GET.
        method: String,
        /// Full URL, e.g. https://api.example.test/v1/models.
        url: String,
    },
}

pub fn run(run_dir: &Path, command: Command) -> anyhow::Result<()> {
    match command {
        Command::Check { policy_dir, files } => check(&policy_dir, &files),
        Command::Reload => match call(run_dir, &Request::PolicyReload)? {
            Response::PolicyReloaded { files } => {
                outln!("policy reloaded: {files} file(s)");
                Ok(())
            }
            other => Err(unexpected(other)),
        },
        Command::Show { cgroup } => {
            let cgroup = CgroupPath::parse(&cgroup)?.to_string();
            match call(run_dir, &Request::PolicyShow { cgroup })? {
                Response::PolicyText { text } => {
                    out!("{text}");
                    Ok(())
                }
                other => Err(unexpected(other)),
            }
        }
        Command::Explain {
            cgroup,
            method,
            url,
        } => {
            let cgroup = CgroupPath::parse(&cgroup)?.to_string();
            let request = Request::PolicyExplain {
                cgroup,
                method,
                url,
            };
            match call(run_dir, &request)? {
                Response::PolicyExplained { text, .. } => {
                    outln!("{text}");
                    Ok(())
                }
                other => Err(unexpected(other)),
            }
        }
    }
}

/// `policy check`: the `.toml` files of `policy_dir` (hidden ones skipped, as brokerd does),
/// with `files` added or replacing those of the same file name, loaded as one policy.
fn check(policy_dir: &Path, files: &[PathBuf]) -> anyhow::Result<()> {
    let mut set: BTreeMap<OsString, (PathBuf, String)> = BTreeMap::new();
    if policy_dir.is_dir() {
        for entry in std::fs::read_dir(policy_dir)
            .with_context(|| format!("reading {}", policy_dir.display()))?
        {
            let path = entry?.path();
            let name = path
                .file_name()
                .map(|n| n.to_os_string())
                .unwrap_or_default();
            let is_policy = path.extension().is_some_and(|e| e == "toml")
                && !name.to_string_lossy().starts_with('.')
                && path.is_file();
            if is_policy {
                let text = std::fs::read_to_string(&path)
                    .with_context(|| format!("reading {}", path.display()))?;
                set.insert(name, (path, text));
            }
        }
    } else if files.is_empty() {
        bail!(
            "{} is not a directory; give files to check or --policy-dir",
            policy_dir.display()
        );
    }
    for path in files {
        let text =
            std::fs::read_to_string(path).with_context(|| format!("reading {}", path.display()))?;
        let name = path
            .file_name()
            .map(|n| n.to_os_string())
            .unwrap_or_default();
        set.insert(name, (path.clone(), text));
    }
    let count = set.len();
    Policy::from_files(set.into_values().collect())
        .map_err(|e| anyhow::anyhow!("{}", error_chain(&e)))?;
    outln!("policy ok: {count} file(s)");
    Ok(())
}
