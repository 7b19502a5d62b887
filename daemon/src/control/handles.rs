//! Handles: `handle mint` (`--shaped` too), `handle list` and `handle revoke`. The vault stores
//! the typed `HandleRecord`; a token is in the mint reply once and nowhere else. A shaped
//! handle's shape is derived here from the secret, which never leaves brokerd.

use std::{
    sync::Arc,
    time::{Duration, SystemTime},
};

use agent_broker_core::fmt::error_chain;
use agent_broker_protocol::{ErrorKind, Response};
use tracing::info;

use super::{
    reply::{blocking, error},
    secrets::{no_secret, shape_of},
};
use crate::vault::{Vault, handle_info as info};
use agent_broker_core::{
    cgroup::CgroupPath,
    handle::{self, HandleBinding},
    secret::SecretName,
};

/// What `handle mint` asks for.
pub struct MintRequest<'a> {
    pub cgroup: &'a str,
    pub secret: &'a str,
    pub host: &'a str,
    pub ttl_secs: u64,
    /// A token of the secret's shape instead of `brk_...`.
    pub shaped: bool,
}

/// Mints a handle and stores its record. The token is in the reply once and nowhere else.
pub async fn mint(vault: &Arc<Vault>, request: MintRequest<'_>) -> Response {
    let MintRequest {
        cgroup,
        secret,
        host,
        ttl_secs,
        shaped,
    } = request;
    let binding = match (CgroupPath::parse(cgroup), SecretName::new(secret)) {
        (Ok(c), Ok(s)) => match HandleBinding::new(c, s, host) {
            Ok(b) => b,
            Err(e) => return error(ErrorKind::BadRequest, error_chain(&e)),
        },
        (Err(e), _) => return error(ErrorKind::BadRequest, e.to_string()),
        (_, Err(e)) => return error(ErrorKind::BadRequest, e.to_string()),
    };
    let shape = if shaped {
        match shape_of(vault, &binding.secret).await {
            Ok(Ok(shape)) => Some(shape),
            Ok(Err(e)) => {
                return error(
                    ErrorKind::BadRequest,
                    format!(
                        "secret {} cannot be copied into a shaped handle: {e}; without --shaped, \
                         mint a brk_ handle",
                        binding.secret.as_str()
                    ),
                );
            }
            Err(response) => return response,
        }
    } else {
        None
    };
    // Ids are 32 random bits: on the rare collision with a stored handle, mint again.
    let mut attempts = 0;
    let (token, stored, result) = loop {
        attempts += 1;
        let (now, ttl) = (SystemTime::now(), Duration::from_secs(ttl_secs));
        let minted = match &shape {
            Some(shape) => handle::mint_shaped(now, ttl, binding.clone(), shape.clone()),
            None => handle::mint(now, ttl, binding.clone()),
        };
        let (token, record) = match minted {
            Ok(m) => m,
            Err(e) => return error(ErrorKind::BadRequest, error_chain(&e)),
        };
        let stored = record.clone();
        let v = vault.clone();
        let secret_name = record.binding.secret.clone();
        let to_store = record;
        let result = blocking(move || {
            if v.get(&secret_name)?.is_none() {
                return Ok(Minted::NoSecret);
            }
            if v.get_handle(to_store.id.as_str())?.is_some() {
                return Ok(Minted::IdTaken);
            }
            v.put_handle(&to_store)?;
            Ok(Minted::Stored)
        })
        .await;
        if !matches!(result, Ok(Minted::IdTaken)) || attempts >= 5 {
            break (token, stored, result);
        }
    };
    match result {
        Ok(Minted::Stored) => {
            let shape = stored
                .shape
                .as_ref()
                .map_or_else(|| "brk_".to_string(), ToString::to_string);
            info!(handle = %stored.id.as_str(), cgroup = %stored.binding.cgroup, secret = %stored.binding.secret.as_str(), host = %stored.binding.host, %shape, "handle minted");
            Response::HandleMinted {
                handle: info(&stored),
                token: token.expose().to_string(),
            }
        }
        Ok(Minted::NoSecret) => no_secret(&stored.binding.secret),
        Ok(Minted::IdTaken) => error(
            ErrorKind::Internal,
            "could not find a free handle id".into(),
        ),
        Err(response) => response,
    }
}

/// What happened to a freshly minted handle.
enum Minted {
    Stored,
    NoSecret,
    IdTaken,
}

/// Every stored handle, without tokens.
pub async fn list(vault: &Arc<Vault>) -> Response {
    let v = vault.clone();
    match blocking(move || v.list_handles()).await {
        Ok(records) => Response::Handles {
            handles: records.iter().map(info).collect(),
        },
        Err(response) => response,
    }
}

/// Revokes a handle.
pub async fn revoke(vault: &Arc<Vault>, id: String) -> Response {
    let v = vault.clone();
    let lookup = id.clone();
    match blocking(move || v.revoke_handle(&lookup)).await {
        Ok(true) => {
            info!(handle = %id, "handle revoked");
            Response::HandleRevoked { id }
        }
        Ok(false) => error(ErrorKind::NotFound, format!("no handle with id {id}")),
        Err(response) => response,
    }
}
