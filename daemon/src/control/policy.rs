//! The policy: `policy reload`, and `policy show` and `policy explain`, its answers in words for
//! operators.

use std::time::SystemTime;

use agent_broker_core::{cgroup::CgroupPath, fmt::error_chain, policy::Policy};
use agent_broker_protocol::{ErrorKind, Response};

use super::{ControlState, reply::error};

/// Reloads the policy directory now (it is also watched); a bad file keeps the last good one.
pub async fn reload(state: &ControlState) -> Response {
    let store = state.policy.clone();
    match tokio::task::spawn_blocking(move || store.reload()).await {
        Ok(Ok(files)) => Response::PolicyReloaded { files },
        Ok(Err(e)) => error(ErrorKind::BadRequest, error_chain(&e)),
        Err(e) => error(ErrorKind::Internal, format!("reload task failed: {e}")),
    }
}

/// The effective rules of `cgroup`, after narrowing by its ancestors' files.
pub fn show(policy: &Policy, cgroup: &str) -> Response {
    let cgroup = match CgroupPath::parse(cgroup) {
        Ok(c) => c,
        Err(e) => return error(ErrorKind::BadRequest, e.to_string()),
    };
    Response::PolicyText {
        text: policy.effective(&cgroup).to_string(),
    }
}

/// Whether `METHOD url` from `cgroup` would be allowed now, by which rule and file, or why not.
pub fn explain(policy: &Policy, cgroup: &str, method: &str, url: &str) -> Response {
    let cgroup = match CgroupPath::parse(cgroup) {
        Ok(c) => c,
        Err(e) => return error(ErrorKind::BadRequest, e.to_string()),
    };
    match policy.explain(&cgroup, method, url, SystemTime::now()) {
        Ok(explanation) => Response::PolicyExplained {
            allowed: explanation.allowed,
            text: explanation.to_string(),
        },
        Err(e) => error(ErrorKind::BadRequest, e.to_string()),
    }
}
