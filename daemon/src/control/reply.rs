//! How control requests are answered when they fail, and how vault work runs off the async
//! threads: shared by every request family.

use agent_broker_core::{cgroup::CgroupError, fmt::error_chain};
use agent_broker_protocol::{self as protocol, ErrorKind, Response};
use tracing::{info, warn};

use crate::{capture::CaptureError, vault::VaultError};

pub fn error(kind: ErrorKind, message: String) -> Response {
    Response::Error { kind, message }
}

pub fn encode(response: &Response) -> Vec<u8> {
    protocol::encode_line(response).unwrap_or_else(|_| {
        b"{\"response\":\"error\",\"kind\":\"internal\",\"message\":\"unencodable response\"}\n"
            .to_vec()
    })
}

/// Runs vault work (redb is synchronous) off the async threads; a failure is the error reply.
pub async fn blocking<T: Send + 'static>(
    f: impl FnOnce() -> Result<T, VaultError> + Send + 'static,
) -> Result<T, Response> {
    match tokio::task::spawn_blocking(f).await {
        Ok(Ok(v)) => Ok(v),
        Ok(Err(e)) => Err(vault_error(e)),
        Err(e) => Err(error(
            ErrorKind::Internal,
            format!("vault task failed: {e}"),
        )),
    }
}

fn vault_error(e: VaultError) -> Response {
    let kind = match &e {
        VaultError::NotFound { .. } => ErrorKind::NotFound,
        _ => ErrorKind::Internal,
    };
    let message = error_chain(&e);
    warn!(error = %message, "vault request failed");
    error(kind, message)
}

pub fn capture_error(e: CaptureError) -> Response {
    let kind = match &e {
        CaptureError::Forbidden { .. } => ErrorKind::Forbidden,
        CaptureError::NotTagged(_) | CaptureError::Cgroup(CgroupError::Missing(_)) => {
            ErrorKind::NotFound
        }
        CaptureError::Cgroup(CgroupError::InvalidPath { .. }) => ErrorKind::BadRequest,
        _ => ErrorKind::Internal,
    };
    let message = error_chain(&e);
    info!(error = %message, "control request failed");
    error(kind, message)
}
