//! Tagging for the pod sources ([`crate::pods`]): what `brokerctl attach --cgroup POD_CGROUP
//! --as agents/<label>` and then `brokerctl attach --pid INFRA_PID` do, with the pod registered
//! so that its attach, detach and connection records name it.

use std::sync::Arc;

use agent_broker_core::cgroup::CgroupPath;
use agent_broker_protocol::{ErrorKind, PodRef, Response};

use super::{ControlState, cgroups};
use crate::pods::{Pod, Tagger};

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

impl Tagger for ControlTagger {
    async fn tag(&self, pod: &Pod) -> Result<(), String> {
        let name = pod.tag_name()?;
        let cgroup = CgroupPath::parse(&pod.cgroup).map_err(|e| e.to_string())?;
        let state = &self.state;
        state.resolver.set_pod(cgroup.clone(), Some(pod_ref(pod)));
        let attached =
            cgroups::attach(state, pod.cgroup.clone(), false, Some(name.to_string())).await;
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
