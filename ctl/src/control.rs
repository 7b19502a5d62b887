//! Talking to brokerd from a subcommand: one request, one answer, with brokerd's refusals and
//! answers of the wrong kind turned into errors. The connection itself (bounds, timeouts,
//! framing) is `agent_broker_protocol::client::Client`'s.

use std::path::Path;

use agent_broker_protocol::{ErrorKind, Request, Response, client::Client};

/// One request, one answer; an error answer becomes an error.
pub fn call(run_dir: &Path, request: &Request) -> anyhow::Result<Response> {
    let mut client = Client::connect(run_dir)?;
    match client.call(request)? {
        Response::Error { kind, message } => Err(refused(kind, &message)),
        other => Ok(other),
    }
}

/// brokerd's error answer, as an error.
pub fn refused(kind: ErrorKind, message: &str) -> anyhow::Error {
    anyhow::anyhow!("brokerd refused ({kind}): {message}")
}

/// An answer that does not fit the request.
pub fn unexpected(response: Response) -> anyhow::Error {
    anyhow::anyhow!("unexpected answer from brokerd: {response:?}")
}
