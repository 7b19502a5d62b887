//! `brokerctl approve` and the console's approvals pane: list the requests waiting for an
//! operator, and decide one. The record of each decision names the client and the caller's uid.

use agent_broker_protocol::{ApprovalDecision, ErrorKind, Response};

use super::{ControlState, reply::error};

pub fn list(state: &ControlState) -> Response {
    Response::Approvals {
        pending: state.approvals.list(),
    }
}

pub async fn decide(
    state: &ControlState,
    id: u64,
    decision: ApprovalDecision,
    via: Option<String>,
    uid: u32,
) -> Response {
    // Only a short word naming the client, so a record cannot be made to say anything else.
    let via = via
        .filter(|v| !v.is_empty() && v.len() <= 16 && v.bytes().all(|b| b.is_ascii_lowercase()))
        .unwrap_or_else(|| "control".into());
    let by = format!("{via} uid {uid}");
    let approvals = state.approvals.clone();
    // "allow always" reads and writes the policy directory.
    match tokio::task::spawn_blocking(move || approvals.decide(id, decision, &by)).await {
        Ok(Ok(outcome)) => Response::ApprovalDecided { id, outcome },
        Ok(Err(message)) => error(ErrorKind::BadRequest, message),
        Err(e) => error(ErrorKind::Internal, format!("approval task failed: {e}")),
    }
}
