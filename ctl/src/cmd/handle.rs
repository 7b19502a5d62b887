//! `brokerctl handle`: mint, list and revoke handles, the opaque `brk_...` tokens an agent
//! uses in place of a secret. A token is printed once, when it is minted; brokerd keeps only
//! its hash, and listings show ids.

use std::path::Path;

use agent_broker_core::cgroup::CgroupPath;
use agent_broker_protocol::{Request, Response};

use crate::control::{call, unexpected};
use crate::print::{date, json_pretty};

/// Handles: opaque `brk_...` tokens an agent may use in place of a secret.
#[derive(Debug, clap::Subcommand)]
pub enum Command {
    /// Mint a handle for SECRET, usable only from the cgroup subtree PATH towards HOST until it
    /// expires. Prints the token once; brokerd keeps only its hash.
    Mint {
        #[arg(long, value_name = "PATH")]
        cgroup: String,
        #[arg(long, value_name = "NAME")]
        secret: String,
        #[arg(long, value_name = "HOST")]
        host: String,
        /// Lifetime, e.g. 30s, 15m, 2h, 1d; at least 1s, at most 365d.
        #[arg(long, default_value = "15m", value_parser = agent_broker_core::handle::parse_ttl)]
        ttl: std::time::Duration,
    },
    /// The handles (never their tokens).
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
        } => {
            let cgroup = CgroupPath::parse(&cgroup)?.to_string();
            let request = Request::HandleMint {
                cgroup,
                secret,
                host,
                ttl_secs: ttl.as_secs(),
            };
            match call(run_dir, &request)? {
                Response::HandleMinted { token, handle } => {
                    // The description to stderr, the token alone to stdout, for `$(...)`.
                    eprintln!(
                        "handle {} for {} towards {} from {}, expires {}",
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
                    "{:<12} {:<24} {:<20} {:<28} {:<20} STATE",
                    "ID",
                    "CGROUP",
                    "SECRET",
                    "HOST",
                    "EXPIRES"
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
                        "{:<12} {:<24} {:<20} {:<28} {:<20} {state}",
                        h.id,
                        h.cgroup,
                        h.secret,
                        h.host,
                        date(h.expires_unix)
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
