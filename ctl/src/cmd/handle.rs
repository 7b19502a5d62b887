//! `brokerctl handle`: mint, list and revoke handles, the opaque tokens an agent uses in place
//! of a secret: `brk_...`, or with `--shaped` a token that looks like the secret (its prefix,
//! length and alphabet, with a random body). A token is printed once, when it is minted;
//! brokerd keeps only its hash, and listings show ids.

use std::path::Path;

use agent_broker_core::cgroup::CgroupPath;
use agent_broker_protocol::{Request, Response};

use crate::control::{call, unexpected};
use crate::print::{date, json_pretty};

/// Handles: opaque tokens (`brk_...`, or shaped like the secret) an agent may use in place of a
/// secret.
#[derive(Debug, clap::Subcommand)]
pub enum Command {
    /// Mint a handle for SECRET, usable only from the cgroup subtree PATH towards HOST until it
    /// expires. Prints the token once; brokerd keeps only its hash.
    Mint {
        /// The agent: a cgroup path, or the name a tag runs under (`attach --as`).
        #[arg(long, value_name = "PATH")]
        cgroup: String,
        #[arg(long, value_name = "NAME")]
        secret: String,
        #[arg(long, value_name = "HOST")]
        host: String,
        /// Lifetime, e.g. 30s, 15m, 2h, 1d; at least 1s, at most 365d.
        #[arg(long, default_value = "15m", value_parser = agent_broker_core::handle::parse_ttl)]
        ttl: std::time::Duration,
        /// Make the token look like the secret, for clients that check a token's form before
        /// sending it (gh wants `ghp_...`): the secret's prefix (its leading lowercase labels
        /// ending in `_` or `-`, such as `ghp_`, `github_pat_`, `sk-proj-`), length and alphabet,
        /// with a random body of at least 128 bits. Refused when the secret is too short for
        /// that or holds characters other than letters, digits, `_`, `-`, `+` and `/`.
        #[arg(long)]
        shaped: bool,
    },
    /// The handles (never their tokens); TOKEN is `brk_` or a shaped handle's shape.
    List {
        #[arg(long)]
        json: bool,
    },
    /// Revoke a handle by id.
    Revoke { id: String },
}

pub fn run(run_dir: &Path, command: Command) -> anyhow::Result<()> {
    match command {
        Command::Mint {
            cgroup,
            secret,
            host,
            ttl,
            shaped,
        } => {
            let cgroup = CgroupPath::parse(&cgroup)?.to_string();
            let request = Request::HandleMint {
                cgroup,
                secret,
                host,
                ttl_secs: ttl.as_secs(),
                shaped,
            };
            match call(run_dir, &request)? {
                Response::HandleMinted { token, handle } => {
                    // The description to stderr, the token alone to stdout, for `$(...)`.
                    let shape = handle
                        .shape
                        .as_ref()
                        .map(|s| format!(", shaped {s}"))
                        .unwrap_or_default();
                    eprintln!(
                        "handle {} for {} towards {} from {}, expires {}{shape}",
                        handle.id,
                        handle.secret,
                        handle.host,
                        handle.cgroup,
                        date(handle.expires_unix)
                    );
                    outln!("{token}");
                    Ok(())
                }
                other => Err(unexpected(other)),
            }
        }
        Command::List { json } => match call(run_dir, &Request::HandleList)? {
            Response::Handles { handles } if json => json_pretty(&handles),
            Response::Handles { handles } => {
                outln!(
                    "{:<12} {:<24} {:<20} {:<28} {:<20} {:<8} TOKEN",
                    "ID",
                    "CGROUP",
                    "SECRET",
                    "HOST",
                    "EXPIRES",
                    "STATE"
                );
                let now = std::time::SystemTime::now()
                    .duration_since(std::time::UNIX_EPOCH)
                    .map(|d| d.as_secs())
                    .unwrap_or(0);
                for h in handles {
                    let state = if h.revoked {
                        "revoked"
                    } else if h.expires_unix <= now {
                        "expired"
                    } else {
                        "active"
                    };
                    outln!(
                        "{:<12} {:<24} {:<20} {:<28} {:<20} {state:<8} {}",
                        h.id,
                        h.cgroup,
                        h.secret,
                        h.host,
                        date(h.expires_unix),
                        h.shape.as_deref().unwrap_or("brk_")
                    );
                }
                Ok(())
            }
            other => Err(unexpected(other)),
        },
        Command::Revoke { id } => match call(run_dir, &Request::HandleRevoke { id })? {
            Response::HandleRevoked { id } => {
                outln!("revoked handle {id}");
                Ok(())
            }
            other => Err(unexpected(other)),
        },
    }
}
