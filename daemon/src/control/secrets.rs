//! The vault's secrets: `secret set`, `secret list`, `secret remove` and `secret placeholder`.
//! A value arrives once, in a set request, and is never sent back; a placeholder holds nothing
//! of it but its prefix (see `agent_broker_core::handle::shape`).

use std::sync::Arc;

use agent_broker_core::{
    credential::{self, CredentialSpec},
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

/// Stores (or, with `rotate`, rotates) a secret: a static value, or with `spec` a credential
/// spec (JSON of `CredentialSpec`), validated and sealed like any value. The credentials take
/// the change at once; requests already under way finish with the value they started with.
pub async fn set(
    state: &ControlState,
    name: String,
    value: SecretInput,
    rotate: bool,
    spec: bool,
) -> Response {
    let name = match SecretName::new(name) {
        Ok(n) => n,
        Err(e) => return error(ErrorKind::BadRequest, e.to_string()),
    };
    let value = if spec {
        let parsed = serde_json::from_str::<CredentialSpec>(value.expose())
            .map_err(|e| format!("the credential spec is not valid: {e}"))
            .and_then(|mut spec| {
                // SigV4: the placeholder pair the agent signs with is made here.
                let mut random = zeroize::Zeroizing::new([0u8; 64]);
                ring::rand::SecureRandom::fill(&ring::rand::SystemRandom::new(), &mut *random)
                    .map_err(|_| "no randomness for the placeholders".to_string())?;
                spec.fill_placeholders(&*random);
                spec.to_value().map_err(|e| e.to_string())
            });
        match parsed {
            Ok(v) => v,
            // serde's message names the field and position, never the value of a string.
            Err(e) => return error(ErrorKind::BadRequest, e),
        }
    } else {
        match SecretValue::from_string(value.expose().to_string()) {
            Ok(v) => v,
            Err(e) => return error(ErrorKind::BadRequest, e.to_string()),
        }
    };
    let vault = state.vault.clone();
    let credentials = state.credentials.clone();
    let stored = blocking(move || {
        let meta = if rotate {
            vault.rotate(&name, value)
        } else {
            vault.set(&name, value)
        }?;
        credentials.reload();
        Ok(meta)
    })
    .await;
    match stored {
        Ok(meta) => {
            info!(secret = %meta.name.as_str(), version = meta.version, "secret stored");
            Response::SecretStored {
                secret: secret_info(state, meta),
            }
        }
        Err(response) => response,
    }
}

/// Every secret's name, versions and kind, and each credential's state; never a value.
pub async fn list(state: &ControlState) -> Response {
    let vault = state.vault.clone();
    match blocking(move || vault.list()).await {
        Ok(list) => Response::Secrets {
            secrets: list.into_iter().map(|m| secret_info(state, m)).collect(),
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
    let credentials = state.credentials.clone();
    match blocking(move || {
        let removed = vault.remove(&name)?;
        credentials.reload();
        Ok(removed)
    })
    .await
    {
        Ok(true) => {
            info!(secret = %shown, "secret removed");
            Response::SecretRemoved { name: shown }
        }
        Ok(false) => error(ErrorKind::NotFound, format!("no secret named {shown}")),
        Err(response) => response,
    }
}

/// A random placeholder of the secret's shape, bound to nothing and stored nowhere. For a
/// SigV4 credential: the placeholder pair its agents sign with, as environment lines.
pub async fn placeholder(state: &ControlState, name: String) -> Response {
    let name = match SecretName::new(name) {
        Ok(n) => n,
        Err(e) => return error(ErrorKind::BadRequest, e.to_string()),
    };
    let v = state.vault.clone();
    let lookup = name.clone();
    let pair = blocking(move || {
        Ok(v.get(&lookup)?.and_then(|value| match &CredentialSpec::from_value(&value) {
            Some(Ok(CredentialSpec::Sigv4 {
                placeholder_access_key_id,
                placeholder_secret_access_key,
                ..
            })) => Some(format!(
                "AWS_ACCESS_KEY_ID={placeholder_access_key_id}\nAWS_SECRET_ACCESS_KEY={placeholder_secret_access_key}"
            )),
            _ => None,
        }))
    })
    .await;
    match pair {
        Ok(Some(lines)) => {
            return Response::SecretPlaceholder {
                name: name.as_str().to_string(),
                shape: "AWS SigV4 placeholder credentials".into(),
                placeholder: lines,
            };
        }
        Ok(None) => {}
        Err(response) => return response,
    }
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
        Ok(v.get(&lookup)?.map(|value| {
            if credential::is_spec(&value) {
                Err(ShapeError::NotStatic)
            } else {
                TokenShape::of_secret(value.expose())
            }
        }))
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

fn secret_info(state: &ControlState, meta: SecretMeta) -> SecretInfo {
    let status = state.credentials.status(&meta.name);
    SecretInfo {
        name: meta.name.as_str().to_string(),
        version: meta.version,
        created_unix: meta.created_unix,
        updated_unix: meta.updated_unix,
        kind: status.as_ref().map_or("static", |s| s.kind).to_string(),
        source: status.as_ref().map(|s| s.source.clone()),
        state: status.as_ref().map(|s| s.state.clone()),
        valid_until_unix: status.as_ref().and_then(|s| s.valid_until_unix),
        last_used_unix: status.as_ref().and_then(|s| s.last_used_unix),
    }
}
