//! The vault's secrets: `secret set`, `secret list` and `secret remove`. A value arrives once,
//! in a set request, and is never sent back.

use agent_broker_core::secret::{SecretName, SecretValue};
use agent_broker_protocol::{ErrorKind, Response, SecretInfo, SecretInput};
use tracing::info;

use super::{
    ControlState,
    reply::{blocking, error},
};
use crate::vault::SecretMeta;

/// Stores (or, with `rotate`, rotates) a secret.
pub async fn set(state: &ControlState, name: String, value: SecretInput, rotate: bool) -> Response {
    let name = match SecretName::new(name) {
        Ok(n) => n,
        Err(e) => return error(ErrorKind::BadRequest, e.to_string()),
    };
    let value = match SecretValue::from_string(value.expose().to_string()) {
        Ok(v) => v,
        Err(e) => return error(ErrorKind::BadRequest, e.to_string()),
    };
    let vault = state.vault.clone();
    let stored = blocking(move || {
        if rotate {
            vault.rotate(&name, value)
        } else {
            vault.set(&name, value)
        }
    })
    .await;
    match stored {
        Ok(meta) => {
            info!(secret = %meta.name.as_str(), version = meta.version, "secret stored");
            Response::SecretStored {
                secret: secret_info(meta),
            }
        }
        Err(response) => response,
    }
}

/// Every secret's name and versions, never a value.
pub async fn list(state: &ControlState) -> Response {
    let vault = state.vault.clone();
    match blocking(move || vault.list()).await {
        Ok(list) => Response::Secrets {
            secrets: list.into_iter().map(secret_info).collect(),
        },
        Err(response) => response,
    }
}

/// Deletes a secret.
pub async fn remove(state: &ControlState, name: String) -> Response {
    let name = match SecretName::new(name) {
        Ok(n) => n,
        Err(e) => return error(ErrorKind::BadRequest, e.to_string()),
    };
    let vault = state.vault.clone();
    let shown = name.as_str().to_string();
    match blocking(move || vault.remove(&name)).await {
        Ok(true) => {
            info!(secret = %shown, "secret removed");
            Response::SecretRemoved { name: shown }
        }
        Ok(false) => error(ErrorKind::NotFound, format!("no secret named {shown}")),
        Err(response) => response,
    }
}

fn secret_info(meta: SecretMeta) -> SecretInfo {
    SecretInfo {
        name: meta.name.as_str().to_string(),
        version: meta.version,
        created_unix: meta.created_unix,
        updated_unix: meta.updated_unix,
    }
}
