//! `brokerctl policy show` and `policy explain`: the policy's answers in words, for operators.

use agent_broker_protocol::{ErrorKind, Response};

use crate::control::error;
use agent_broker_core::{cgroup::CgroupPath, policy::Policy};

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
    match policy.explain(&cgroup, method, url, std::time::SystemTime::now()) {
        Ok(explanation) => Response::PolicyExplained {
            allowed: explanation.allowed,
            text: explanation.to_string(),
        },
        Err(e) => error(ErrorKind::BadRequest, e.to_string()),
    }
}
