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
                workloads: {
                    let mut w = state.workloads.status();
                    w.extend(state.sandboxes.status());
                    w
                },
                audit_error: state.audit.failing(),
                audit_dropped: state.audit.dropped(),
                runtime: state.metrics.runtime(),
                unprivileged: state.unprivileged,
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
    let name = match parse_name(name) {
        Ok(n) => n,
        Err(response) => return *response,
    };
    match state.capture.attach(cgroup.clone(), create, name).await {
        Ok((tagged, already)) => {
            if !already {
                state.events.record(attach_event(state, &tagged));
            }
            // Processes of the cgroup that already run in a network namespace of their own (a
            // container's) get listeners there too; `status` lists them, and a namespace that
            // cannot be served stays refused (logged and audited by the workloads module).
            if let Ok(tag) = CgroupPath::parse(&tagged.path) {
                let id = agent_broker_core::cgroup::CgroupId(tagged.id);
                for (pid, opened) in state.workloads.open_members(&cgroup, (tag, id)).await {
                    if let Err(e) = opened {
                        tracing::warn!(cgroup = %cgroup, pid, error = %e, "cannot open brokerd's listeners in the network namespace of a process of the attached cgroup; its connections stay refused");
                    }
                }
            }
            Response::Attached {
                cgroup: tagged,
                already,
            }
        }
        Err(e) => capture_error(e),
    }
}

/// The agent name given with `--as`, validated; an error response names what is wrong.
fn parse_name(name: Option<String>) -> Result<Option<CgroupPath>, Box<Response>> {
    name.as_deref()
        .map(CgroupPath::parse)
        .transpose()
        .map_err(|e| {
            Box::new(error(
                ErrorKind::BadRequest,
                format!("agent name (--as): {e}"),
            ))
        })
}

/// The audit record of a tag made: its agent name, its real path when that differs, and its
/// pod when a pod source tagged it.
fn attach_event(state: &ControlState, tagged: &agent_broker_protocol::TaggedCgroup) -> AuditEvent {
    let mut event = operator_event(
        EventKind::Attach,
        tagged.name.as_ref().unwrap_or(&tagged.path),
    );
    event.cgroup_path = tagged.name.as_ref().map(|_| tagged.path.clone());
    event.pod = CgroupPath::parse(&tagged.path)
        .ok()
        .and_then(|p| state.resolver.pod_of(&p));
    event
}

/// Tags the cgroup of the process `pid` and, when the process has a network namespace of its
/// own, opens brokerd's listeners there. A pidfd taken first pins the process: its cgroup is
/// read, then the pidfd is checked live (so the pid was not reused in between), and the
/// namespace is entered through the pidfd. A failure to open the namespace undoes a tag this
/// request made, and leaves no namespace entry (its connects stay refused).
///
/// With `within`, refuses a process that is not in that cgroup or below it (checked once the
/// pidfd pins the process): a pod source's or `attach --container`'s pid was looked up before,
/// and must not tag another cgroup if it was reused since.
pub async fn attach_pid_within(
    state: &ControlState,
    pid: u32,
    name: Option<String>,
    within: Option<&CgroupPath>,
) -> Response {
    use crate::capture::netns;
    let name = match parse_name(name) {
        Ok(n) => n,
        Err(response) => return *response,
    };
    let pidfd = match netns::pidfd_open(pid) {
        Ok(fd) => fd,
        Err(e) => return error(ErrorKind::NotFound, e.to_string()),
    };
    let cgroup = match state.root.cgroup_of(pid) {
        Ok(Some(c)) if !c.is_root() => c,
        Ok(_) => {
            return error(
                ErrorKind::BadRequest,
                format!(
                    "process {pid} is in the root cgroup or outside the cgroup2 hierarchy at {}; \
                     it needs a cgroup of its own to be tagged",
                    state.root.mount().display()
                ),
            );
        }
        Err(e) => return error(ErrorKind::NotFound, format!("process {pid}: {e}")),
    };
    if !netns::pidfd_alive(&pidfd) {
        return error(ErrorKind::NotFound, format!("process {pid} has exited"));
    }
    if let Some(within) = within
        && !within.is_ancestor_or_self_of(&cgroup)
    {
        return error(
            ErrorKind::BadRequest,
            format!("process {pid} is in cgroup {cgroup}, not in {within} or below it"),
        );
    }
    let (tagged, already) = match state.capture.attach(cgroup.clone(), false, name).await {
        Ok(t) => t,
        Err(e) => return capture_error(e),
    };
    let tag = match CgroupPath::parse(&tagged.path) {
        Ok(t) => t,
        Err(e) => return error(ErrorKind::Internal, e.to_string()),
    };
    let opened = state
        .workloads
        .open(
            pidfd,
            pid,
            cgroup.clone(),
            (tag.clone(), agent_broker_core::cgroup::CgroupId(tagged.id)),
        )
        .await;
    match opened {
        Ok(workload) => {
            if !already {
                state.events.record(attach_event(state, &tagged));
            }
            Response::AttachedPid {
                cgroup: tagged,
                already,
                workload,
            }
        }
        Err(e) => {
            if !already {
                let _ = state.capture.detach(tag).await;
            }
            error(
                ErrorKind::Internal,
                format!(
                    "cannot open brokerd's listeners in the network namespace of process {pid}: {e}"
                ),
            )
        }
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
            state
                .workloads
                .release_under(&cgroup, "its tag was detached");
            let kind = EventKind::Detach;
            let mut event = operator_event(kind, &cgroup.to_string());
            event.pod = state.resolver.pod_of(&cgroup);
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
