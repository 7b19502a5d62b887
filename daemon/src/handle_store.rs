//! Handles as brokerd stores and serves them: conversion between the vault's storage record and
//! [`agent_broker_core::handle::HandleRecord`], and the control operations (mint, list, revoke).

use agent_broker_core::fmt::error_chain;
use std::{
    sync::Arc,
    time::{Duration, SystemTime, UNIX_EPOCH},
};

use agent_broker_protocol::{ErrorKind, HandleInfo, Response};
use tracing::info;

use crate::{
    control::{blocking, error},
    vault::{self, Vault},
};
use agent_broker_core::{
    cgroup::CgroupPath,
    handle::{self, HandleBinding, HandleId, HandleRecord, TokenHash},
    secret::SecretName,
};

fn unix(t: SystemTime) -> u64 {
    t.duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}

/// The storage form of a handle record.
pub fn to_vault(r: &HandleRecord) -> vault::HandleRecord {
    vault::HandleRecord {
        id: r.id.as_str().to_string(),
        token_sha256: r.token_hash.0,
        cgroup: r.binding.cgroup.as_str().to_string(),
        secret: r.binding.secret.as_str().to_string(),
        host: r.binding.host.to_string(),
        expires_unix: unix(r.expires),
        created_unix: unix(r.created),
        revoked: r.revoked,
    }
}

/// The checked form of a stored record; `None` when it no longer parses (it is then unusable).
pub fn from_vault(r: vault::HandleRecord) -> Option<HandleRecord> {
    let binding = HandleBinding::new(
        CgroupPath::parse(&r.cgroup).ok()?,
        SecretName::new(r.secret).ok()?,
        &r.host,
    )
    .ok()?;
    Some(HandleRecord {
        id: HandleId::parse(&r.id).ok()?,
        token_hash: TokenHash(r.token_sha256),
        binding,
        created: UNIX_EPOCH + Duration::from_secs(r.created_unix),
        expires: UNIX_EPOCH + Duration::from_secs(r.expires_unix),
        revoked: r.revoked,
    })
}

fn info(r: &vault::HandleRecord) -> HandleInfo {
    HandleInfo {
        id: r.id.clone(),
        cgroup: r.cgroup.clone(),
        secret: r.secret.clone(),
        host: r.host.clone(),
        created_unix: r.created_unix,
        expires_unix: r.expires_unix,
        revoked: r.revoked,
    }
}

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
        let stored = to_vault(&record);
        let v = vault.clone();
        let secret_name = record.binding.secret.clone();
        let to_store = stored.clone();
        let result = blocking(move || {
            if v.get(&secret_name)?.is_none() {
                return Ok(Minted::NoSecret);
            }
            if v.get_handle(&to_store.id)?.is_some() {
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
            info!(handle = %stored.id, cgroup = %stored.cgroup, secret = %stored.secret, host = %stored.host, "handle minted");
            Response::HandleMinted {
                handle: info(&stored),
                token: token.expose().to_string(),
            }
        }
        Ok(Minted::NoSecret) => error(
            ErrorKind::NotFound,
            format!(
                "no secret named {}; store it first with `brokerctl secret set`",
                stored.secret
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
