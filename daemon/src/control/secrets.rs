//! The vault's secrets: `secret set`, `secret list`, `secret remove` and `secret placeholder`.
//! A value arrives once, in a set request, and is never sent back; a placeholder holds nothing
//! of it but its prefix (see `agent_broker_core::handle::shape`).

use std::sync::Arc;

use agent_broker_core::{
    fmt::error_chain,
    handle::{self, ShapeError, TokenShape},
    secret::{SecretName, SecretValue},
};
use agent_broker_protocol::{ErrorKind, Response, SecretInfo, SecretInput};
use tracing::info;

use super::{
    ControlState,
    reply::{blocking, error},
};
use crate::vault::{SecretMeta, Vault};

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

/// A random placeholder of the secret's shape, bound to nothing and stored nowhere.
pub async fn placeholder(state: &ControlState, name: String) -> Response {
    let name = match SecretName::new(name) {
        Ok(n) => n,
        Err(e) => return error(ErrorKind::BadRequest, e.to_string()),
    };
    let shape = match shape_of(&state.vault, &name).await {
        Ok(Ok(shape)) => shape,
        Ok(Err(e)) => {
            return error(
                ErrorKind::BadRequest,
                format!(
                    "secret {} has no shape a placeholder can copy: {e}",
                    name.as_str()
                ),
            );
        }
        Err(response) => return response,
    };
    match handle::placeholder(&shape) {
        Ok(token) => {
            info!(secret = %name.as_str(), %shape, "placeholder made");
            Response::SecretPlaceholder {
                name: name.as_str().to_string(),
                shape: shape.to_string(),
                placeholder: token.expose().to_string(),
            }
        }
        Err(e) => error(ErrorKind::Internal, error_chain(&e)),
    }
}

/// The shape of secret `name` (its prefix, length and alphabet), or why it has none. The value
/// is read and dropped inside the vault task; only the shape comes out.
pub(super) async fn shape_of(
    vault: &Arc<Vault>,
    name: &SecretName,
) -> Result<Result<TokenShape, ShapeError>, Response> {
    let v = vault.clone();
    let lookup = name.clone();
    let shape = blocking(move || {
        Ok(v.get(&lookup)?
            .map(|value| TokenShape::of_secret(value.expose())))
    })
    .await?;
    shape.ok_or_else(|| no_secret(name))
}

/// The reply for a secret that is not in the vault.
pub(super) fn no_secret(name: &SecretName) -> Response {
    error(
        ErrorKind::NotFound,
        format!(
            "no secret named {}; store it first with `brokerctl secret set`",
            name.as_str()
        ),
    )
}

fn secret_info(meta: SecretMeta) -> SecretInfo {
    SecretInfo {
        name: meta.name.as_str().to_string(),
        version: meta.version,
        created_unix: meta.created_unix,
        updated_unix: meta.updated_unix,
    }
}
