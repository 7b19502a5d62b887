//! Handles: `handle mint`, `handle list` and `handle revoke`. The vault stores the typed
//! `HandleRecord`; a token is in the mint reply once and nowhere else.

use std::{
    sync::Arc,
    time::{Duration, SystemTime},
};

use agent_broker_core::fmt::error_chain;
use agent_broker_protocol::{ErrorKind, Response};
use tracing::info;

use super::reply::{blocking, error};
use crate::vault::{Vault, handle_info as info};
use agent_broker_core::{
    cgroup::CgroupPath,
    handle::{self, HandleBinding},
    secret::SecretName,
};

/// Mints a handle and stores its record. The token is in the reply once and nowhere else.
pub async fn mint(
    vault: &Arc<Vault>,
    cgroup: &str,
    secret: &str,
    host: &str,
    ttl_secs: u64,
) -> Response {
    let binding = match (CgroupPath::parse(cgroup), SecretName::new(secret)) {
        (Ok(c), Ok(s)) => match HandleBinding::new(c, s, host) {
            Ok(b) => b,
            Err(e) => return error(ErrorKind::BadRequest, error_chain(&e)),
        },
        (Err(e), _) => return error(ErrorKind::BadRequest, e.to_string()),
        (_, Err(e)) => return error(ErrorKind::BadRequest, e.to_string()),
    };
    // Ids are 32 random bits: on the rare collision with a stored handle, mint again.
    let mut attempts = 0;
    let (token, stored, result) = loop {
        attempts += 1;
        let (token, record) = match handle::mint(
            SystemTime::now(),
            Duration::from_secs(ttl_secs),
            binding.clone(),
        ) {
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
            info!(handle = %stored.id.as_str(), cgroup = %stored.binding.cgroup, secret = %stored.binding.secret.as_str(), host = %stored.binding.host, "handle minted");
            Response::HandleMinted {
                handle: info(&stored),
                token: token.expose().to_string(),
            }
        }
        Ok(Minted::NoSecret) => error(
            ErrorKind::NotFound,
            format!(
                "no secret named {}; store it first with `brokerctl secret set`",
                stored.binding.secret.as_str()
            ),
        ),
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
