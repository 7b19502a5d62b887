//! Tagging: `status`, `attach`, `detach` and `connections`, each operator action recorded.

use agent_broker_core::{
    agent_name,
    cgroup::CgroupPath,
    time::{now_unix_ms, unix_secs},
};
use agent_broker_protocol::{
    AuditEvent, Decision, ErrorKind, EventKind, PolicyStatus, Response, Side, StatusReport,
};

use super::{
    ControlState,
    reply::{capture_error, error},
};
use crate::policy_store::PolicyStore;

/// Daemon state: listeners, tagged cgroups (with processes that lack the launcher's
/// protections, and sockets made outside them that processes inside hold), counters, policy,
/// hooks and hardening.
pub async fn status(state: &ControlState) -> Response {
    match state.capture.status().await {
        Ok((cgroups, counters)) => {
            let mount = state.root.mount().to_path_buf();
            let tags: Vec<String> = cgroups.iter().map(|c| c.path.clone()).collect();
            // /proc and sock_diag reads, off the async threads.
            let outside = tokio::task::spawn_blocking(move || {
                super::outside_sockets::scan(&mount, &tags, super::outside_sockets::LIMITS)
            })
            .await
            .unwrap_or_else(|e| super::outside_sockets::Scan {
                found: Vec::new(),
                note: Some(format!("the scan failed: {e}")),
            });
            Response::Status(StatusReport {
                unprotected: cgroups
                    .iter()
                    .flat_map(|c| {
                        let dir = state.root.mount().join(&c.path);
                        super::protections::unprotected_in(&dir, &c.path, 64)
                    })
                    .take(64)
                    .collect(),
                version: env!("CARGO_PKG_VERSION").into(),
                pid: std::process::id(),
                listeners: state.listeners.clone(),
                cgroup_root: state.root.mount().display().to_string(),
                pin_dir: state.pin_dir.display().to_string(),
                cgroups,
                counters,
                policy: policy_status(&state.policy),
                dns_listeners: state.dns_listeners.clone(),
                hooks: crate::capture::hook_names(),
                lsm: state.lsm.clone(),
                hardening: state.hardening.clone(),
                outside_sockets: outside.found,
                outside_sockets_note: outside.note,
                shares: state.shares.usage(),
                open_connections: state.shares.open_connections().0 as u64,
                max_connections: state.shares.open_connections().1 as u64,
            })
        }
        Err(e) => capture_error(e),
    }
}

/// Tags a cgroup (creating it with `create`), under the agent `name` when one is given.
pub async fn attach(
    state: &ControlState,
    cgroup: String,
    create: bool,
    name: Option<String>,
) -> Response {
    let cgroup = match CgroupPath::parse(&cgroup) {
        Ok(c) => c,
        Err(e) => return error(ErrorKind::BadRequest, e.to_string()),
    };
    let name = match name.as_deref().map(CgroupPath::parse).transpose() {
        Ok(n) => n,
        Err(e) => {
            return error(ErrorKind::BadRequest, format!("agent name (--as): {e}"));
        }
    };
    match state.capture.attach(cgroup, create, name).await {
        Ok((cgroup, already)) => {
            if !already {
                let kind = EventKind::Attach;
                let mut event = operator_event(kind, cgroup.name.as_ref().unwrap_or(&cgroup.path));
                event.cgroup_path = cgroup.name.as_ref().map(|_| cgroup.path.clone());
                state.events.record(event);
            }
            Response::Attached { cgroup, already }
        }
        Err(e) => capture_error(e),
    }
}

/// Untags a cgroup.
pub async fn detach(state: &ControlState, cgroup: String) -> Response {
    let cgroup = match CgroupPath::parse(&cgroup) {
        Ok(c) => c,
        Err(e) => return error(ErrorKind::BadRequest, e.to_string()),
    };
    let tags = state.resolver.tags();
    // The agent it ran as, for the record.
    let agent = tags
        .iter()
        .find(|t| t.path == cgroup)
        .map(|t| t.name.clone());
    // Detach takes the cgroup path; say which one when given a tag's agent name instead.
    if agent.is_none()
        && let Some(t) = tags.iter().find(|t| t.name == cgroup && t.path != cgroup)
    {
        return error(
            ErrorKind::NotFound,
            format!(
                "{cgroup} is the agent name of tagged cgroup {}; detach takes the cgroup path: \
                 brokerctl detach --cgroup {}",
                t.path, t.path
            ),
        );
    }
    match state.capture.detach(cgroup.clone()).await {
        Ok(()) => {
            let kind = EventKind::Detach;
            let mut event = operator_event(kind, &cgroup.to_string());
            if let Some(agent) = agent.filter(|a| *a != cgroup) {
                event.cgroup = Some(agent.to_string());
                event.cgroup_path = Some(cgroup.to_string());
            }
            state.events.record(event);
            Response::Detached {
                cgroup: cgroup.to_string(),
            }
        }
        Err(e) => capture_error(e),
    }
}

/// The agent an operator means by `raw`: the name a named tag runs under when `raw` is the
/// real path of that tag's cgroup (or of one below it), so `policy show/explain` and `handle
/// mint` given the runtime's path answer for (and bind to) the agent its connections are
/// attributed to. Anything else (an agent name, an unnamed tag's path, an invalid path, which
/// the request itself then refuses) is returned as it is.
pub fn agent_of(state: &ControlState, raw: String) -> String {
    let Ok(path) = CgroupPath::parse(&raw) else {
        return raw;
    };
    let tags = state.resolver.tags();
    let named = tags.iter().map(|t| agent_name::NamedTag {
        cgroup: &t.path,
        name: &t.name,
    });
    match agent_name::agent_of(named, &path) {
        Some((name, _)) => name.to_string(),
        None => raw,
    }
}

fn policy_status(store: &PolicyStore) -> PolicyStatus {
    let s = store.state();
    PolicyStatus {
        dir: store.dir().display().to_string(),
        files: s.files,
        loaded_unix: s.loaded.map_or(0, unix_secs),
        error: s.error,
    }
}

/// An operator action that was carried out (attach, detach), as an audit event. A refused one
/// is answered with its error and changes nothing, so it is not recorded.
fn operator_event(kind: EventKind, cgroup: &str) -> AuditEvent {
    AuditEvent {
        time_ms: now_unix_ms(),
        kind: Some(kind),
        cgroup: Some(cgroup.to_string()),
        decision: Some(Decision::Allow),
        side: Some(Side::Broker),
        ..Default::default()
    }
}
