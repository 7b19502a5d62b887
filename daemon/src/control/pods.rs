//! Tagging for the pod sources ([`crate::pods`]) and the OCI hook: what `brokerctl attach
//! --cgroup POD_CGROUP --as agents/<label>/<pod>` and then `brokerctl attach --pid INFRA_PID` do,
//! with the pod registered so that its attach, detach and connection records name it.

use std::sync::Arc;

use agent_broker_core::cgroup::CgroupPath;
use agent_broker_protocol::{ErrorKind, OciPod, PodRef, Response};

use super::{ControlState, cgroups, reply::error};
use crate::pods::{Pod, Tagger, kube_paths};

/// Tags and untags pods through the control state, as an operator's attach would.
pub struct ControlTagger {
    state: Arc<ControlState>,
}

impl ControlTagger {
    pub fn new(state: Arc<ControlState>) -> Self {
        Self { state }
    }
}

fn pod_ref(pod: &Pod) -> PodRef {
    PodRef {
        namespace: pod.namespace.clone(),
        name: pod.name.clone(),
        uid: pod.uid.clone(),
    }
}

fn refused(what: &str, response: Response) -> String {
    match response {
        Response::Error { message, .. } => format!("{what}: {message}"),
        other => format!("{what}: unexpected answer {other:?}"),
    }
}

/// The name a pod's tag runs under: [`Pod::tag_name`], unless its cgroup is tagged already
/// under another name below the same agent. The OCI hook tags a podman pod by its hostname
/// before the podman source lists it by name; when the two differ, the first tag stands (a
/// tag's name never changes while it lives) and the source takes it over as it is.
fn tag_name(state: &ControlState, pod: &Pod, cgroup: &CgroupPath) -> Result<CgroupPath, String> {
    let wanted = pod.tag_name()?;
    let agent = pod.policy_name()?;
    let existing = state
        .resolver
        .tags()
        .iter()
        .find(|t| &t.path == cgroup)
        .map(|t| t.name.clone());
    Ok(match existing {
        Some(name) if name != agent && agent.is_ancestor_or_self_of(&name) => name,
        _ => wanted,
    })
}

/// `brokerctl oci-hook`: tags the pod of a container being created (see
/// [`agent_broker_protocol::Request::AttachOci`]), before its first process runs. The pod's
/// cgroup is the parent of the container's; a container outside any pod is tagged itself.
pub async fn attach_oci(state: &ControlState, pid: u32, claim: OciPod) -> Response {
    let pod = match oci_pod(state, pid, &claim) {
        Ok(pod) => pod,
        Err(message) => return error(ErrorKind::BadRequest, message),
    };
    match tag(state, &pod).await {
        Ok(()) => {
            let cgroup = CgroupPath::parse(&pod.cgroup).ok();
            match state
                .resolver
                .tags()
                .iter()
                .find(|t| Some(&t.path) == cgroup.as_ref())
            {
                Some(tag) => Response::Attached {
                    cgroup: agent_broker_protocol::TaggedCgroup {
                        path: tag.path.to_string(),
                        id: tag.id.0,
                        processes: state.root.process_count(&tag.path),
                        links: 0,
                        name: (tag.name != tag.path).then(|| tag.name.to_string()),
                    },
                    already: false,
                },
                None => error(
                    ErrorKind::Internal,
                    format!("pod cgroup {} was tagged and is gone again", pod.cgroup),
                ),
            }
        }
        Err(message) => error(ErrorKind::BadRequest, message),
    }
}

/// The [`Pod`] an OCI hook's claim describes, with its cgroup read from the process.
fn oci_pod(state: &ControlState, pid: u32, claim: &OciPod) -> Result<Pod, String> {
    let own = match state.root.cgroup_of(pid) {
        Ok(Some(c)) if !c.is_root() => c,
        Ok(_) => {
            return Err(format!(
                "container {} (process {pid}) has no cgroup of its own below {}",
                claim.container,
                state.root.mount().display()
            ));
        }
        Err(e) => {
            return Err(format!(
                "container {} (process {pid}): {e}",
                claim.container
            ));
        }
    };
    let (cgroup, uid) = if claim.in_pod {
        let parent = own.parent().filter(|p| !p.is_root()).ok_or_else(|| {
            format!(
                "container {} is in cgroup {own}, which has no pod cgroup above it",
                claim.container
            )
        })?;
        let last = parent.as_str().rsplit('/').next().unwrap_or_default();
        let uid = if claim.uid.is_empty() {
            // podman: `libpod_parent/<pod id>` (cgroupfs) or
            // `machine.slice/machine-libpod_pod_<pod id>.slice` (systemd).
            let id = last
                .trim_start_matches("machine-libpod_pod_")
                .trim_end_matches(".slice");
            if id.len() < 12 || !id.bytes().all(|b| b.is_ascii_hexdigit()) {
                return Err(format!(
                    "container {} is in cgroup {own}, whose parent is not a podman pod's",
                    claim.container
                ));
            }
            id.to_string()
        } else {
            if !kube_paths::names_pod(last, &claim.uid) {
                return Err(format!(
                    "container {} is in cgroup {own}, whose parent is not the cgroup of pod uid {}",
                    claim.container, claim.uid
                ));
            }
            claim.uid.clone()
        };
        (parent, uid)
    } else {
        (own, claim.container.clone())
    };
    Ok(Pod {
        uid,
        namespace: claim.namespace.clone(),
        name: claim.name.clone(),
        agent: claim.agent.clone(),
        cgroup: cgroup.to_string(),
        pid,
    })
}

/// Tags the pod's cgroup under its name and serves its network namespace.
async fn tag(state: &ControlState, pod: &Pod) -> Result<(), String> {
    let cgroup = CgroupPath::parse(&pod.cgroup).map_err(|e| e.to_string())?;
    let name = tag_name(state, pod, &cgroup)?;
    state.resolver.set_pod(cgroup.clone(), Some(pod_ref(pod)));
    let attached = cgroups::attach(state, pod.cgroup.clone(), false, Some(name.to_string())).await;
    if !matches!(attached, Response::Attached { .. }) {
        state.resolver.set_pod(cgroup, None);
        return Err(refused(
            &format!("tagging {} as {name}", pod.cgroup),
            attached,
        ));
    }
    // The pod's network namespace, through its infra process (the tag covers its cgroup,
    // so this only opens, or finds, the namespace's listeners).
    match cgroups::attach_pid_within(state, pod.pid, None, Some(&cgroup)).await {
        Response::AttachedPid { .. } => Ok(()),
        other => Err(refused(
            &format!("serving the network namespace of pid {}", pod.pid),
            other,
        )),
    }
}

impl Tagger for ControlTagger {
    async fn tag(&self, pod: &Pod) -> Result<(), String> {
        tag(&self.state, pod).await
    }

    async fn untag(&self, pod: &Pod) -> Result<(), String> {
        let cgroup = CgroupPath::parse(&pod.cgroup).map_err(|e| e.to_string())?;
        let detached = cgroups::detach(&self.state, pod.cgroup.clone()).await;
        let result = match detached {
            Response::Detached { .. } => Ok(()),
            // Untagged already (an operator detached it, or the engine removed the cgroup).
            Response::Error {
                kind: ErrorKind::NotFound,
                ..
            } => Ok(()),
            other => Err(refused(&format!("untagging {}", pod.cgroup), other)),
        };
        if result.is_ok() {
            self.state.resolver.set_pod(cgroup, None);
        }
        result
    }
}
