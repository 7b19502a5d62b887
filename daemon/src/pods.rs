//! Pod sources: brokerd tags the pods a container engine runs with the label
//! `agent-broker.io/agent=<name>` and untags them when they go. The agent is
//! `agents/<namespace>/<name>` (Kubernetes) or `agents/<name>` (podman, which has no
//! namespaces); each pod's tag runs as `<agent>/<pod name>`, a sub-agent its policy governs.
//!
//! A [`PodSource`] lists the pods of this node that carry the label ([`kube`]: the Kubernetes
//! API through kube-rs; [`podman`]: the podman REST API on its unix socket, the engine that
//! `podman kube play` runs Kubernetes Pod manifests with). The [`Reconciler`] compares each list with what it tagged before and asks a [`Tagger`]
//! to tag new pods (the pod-level cgroup, which covers every container of the pod and its infra
//! container, and the pod's network namespace through the infra container's pid) and to untag
//! pods that are gone or stopped. A source wakes the loop when its engine reports an event and
//! at least every [`RESYNC`], so a lost event costs at most that long.
//!
//! The window: a pod is tagged when the source first lists it running, which can be after its
//! first process started. Until then its traffic is not brokered: a pod with no network of its
//! own (`--network none`) reaches nothing, and one with a network is not yet covered. The OCI
//! hook (`brokerctl oci-hook`, [`crate::control`]'s `AttachOci`) closes it: the runtime tags
//! the pod through it before the pod's first process runs, under the name a source gives it,
//! and a source takes over a tag the hook made below the same agent as it is.

pub mod kube;
pub mod kube_paths;
pub mod podman;

use std::{
    collections::BTreeMap,
    future::Future,
    path::{Path, PathBuf},
    time::Duration,
};

use agent_broker_core::cgroup::CgroupPath;
use tokio_util::sync::CancellationToken;
use tracing::{info, warn};

/// The label that marks a pod as an agent; its value names the agent.
pub const AGENT_LABEL: &str = "agent-broker.io/agent";
/// Where the policy names of labelled pods live: `agents/<label value>`.
pub const POLICY_PARENT: &str = "agents";
/// The longest a source waits for an event before it lists again.
pub const RESYNC: Duration = Duration::from_secs(2);

/// A running pod that carries [`AGENT_LABEL`], as a source lists it.
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct Pod {
    /// The engine's unique id of the pod (Kubernetes: `metadata.uid`; podman: the pod id).
    pub uid: String,
    /// The Kubernetes namespace; empty for podman pods.
    pub namespace: String,
    pub name: String,
    /// The label's value.
    pub agent: String,
    /// The pod-level cgroup, relative to the cgroup2 mount.
    pub cgroup: String,
    /// A process in the pod's network namespace (the infra container's).
    pub pid: u32,
}

impl Pod {
    /// The agent whose policy governs the pod: `agents/<namespace>/<label value>` for a
    /// Kubernetes pod (the namespace is part of it, so a pod author cannot claim another
    /// namespace's agent by its label), `agents/<label value>` for a podman pod.
    pub fn policy_name(&self) -> Result<CgroupPath, String> {
        let agent = policy_name(&self.agent)?;
        if self.namespace.is_empty() {
            return Ok(agent);
        }
        let namespace = segment("namespace", &self.namespace)?;
        CgroupPath::parse(&format!("{POLICY_PARENT}/{namespace}/{}", self.agent))
            .map_err(|e| e.to_string())
    }

    /// The name the pod's tag runs under: its agent's name plus the pod's own name, so that
    /// replicas of one agent are sibling sub-agents (each a tag of its own, each governed by
    /// the agent's policy files) rather than two tags claiming one name.
    pub fn tag_name(&self) -> Result<CgroupPath, String> {
        let agent = self.policy_name()?;
        let name = segment("pod name", &self.name)?;
        CgroupPath::parse(&format!("{agent}/{name}")).map_err(|e| e.to_string())
    }

    /// `namespace/name`, or the name alone for a pod with no namespace.
    pub fn display_name(&self) -> String {
        if self.namespace.is_empty() {
            self.name.clone()
        } else {
            format!("{}/{}", self.namespace, self.name)
        }
    }
}

/// A namespace or pod name as one path segment (Kubernetes allows `a-z 0-9 - .` in both).
fn segment<'a>(what: &str, value: &'a str) -> Result<&'a str, String> {
    let ok = !value.is_empty()
        && value.len() <= 253
        && value
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.'))
        && !matches!(value, "." | "..");
    if ok {
        Ok(value)
    } else {
        Err(format!("{what} {value:?} is not usable in an agent name"))
    }
}

/// The policy name of a label value: one path segment below [`POLICY_PARENT`].
pub fn policy_name(agent: &str) -> Result<CgroupPath, String> {
    let ok = !agent.is_empty()
        && agent.len() <= 63
        && agent
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.'))
        && !matches!(agent, "." | "..");
    if !ok {
        return Err(format!(
            "label {AGENT_LABEL}={agent:?} is not a valid agent name (1 to 63 of a-z, A-Z, \
             0-9, '-', '_', '.')"
        ));
    }
    CgroupPath::parse(&format!("{POLICY_PARENT}/{agent}")).map_err(|e| e.to_string())
}

/// Lists labelled pods and says when to list again.
pub trait PodSource: Send {
    /// The running pods of this node that carry [`AGENT_LABEL`].
    fn list(&mut self) -> impl Future<Output = anyhow::Result<Vec<Pod>>> + Send;
    /// Returns when the pods may have changed: an engine event, or [`RESYNC`] passed.
    fn changed(&mut self) -> impl Future<Output = ()> + Send;
    /// The source's name for logs (`podman`).
    fn name(&self) -> &'static str;
}

/// Tags and untags pods: the same path as `brokerctl attach --pid ... --as ...`.
pub trait Tagger: Send + Sync {
    fn tag(&self, pod: &Pod) -> impl Future<Output = Result<(), String>> + Send;
    fn untag(&self, pod: &Pod) -> impl Future<Output = Result<(), String>> + Send;
}

/// What one reconciliation did, for logs and tests.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Changes {
    pub tagged: Vec<String>,
    pub untagged: Vec<String>,
    /// `(pod uid, why)` for every pod that could not be tagged or untagged; tried again on the
    /// next list.
    pub failed: Vec<(String, String)>,
}

/// The pods tagged so far, by uid.
#[derive(Debug, Default)]
pub struct Reconciler {
    tagged: BTreeMap<String, Pod>,
}

impl Reconciler {
    /// A reconciler that knows `pods` as tagged: what a source tagged before brokerd restarted
    /// ([`Memory`]). Those still listed are tagged again (a no-op but for the process their
    /// namespace is served through, unknown here: pid 0); those no longer listed (removed, or
    /// their label taken away while brokerd was down) are untagged on the first list.
    pub fn seeded(pods: Vec<Pod>) -> Self {
        Self {
            tagged: pods
                .into_iter()
                .map(|mut p| {
                    p.pid = 0;
                    (p.uid.clone(), p)
                })
                .collect(),
        }
    }

    /// Tags the listed pods not tagged yet, untags the tagged ones no longer listed (or listed
    /// under another cgroup or label), and serves a pod's namespace again through its new
    /// process when only that changed (a container restarted), without untagging it.
    pub async fn apply<T: Tagger>(&mut self, pods: Vec<Pod>, tagger: &T) -> Changes {
        let mut changes = Changes::default();
        let listed: BTreeMap<String, Pod> = pods.into_iter().map(|p| (p.uid.clone(), p)).collect();
        let gone: Vec<Pod> = self
            .tagged
            .values()
            .filter(|old| !listed.get(&old.uid).is_some_and(|new| same_tag(old, new)))
            .cloned()
            .collect();
        for old in gone {
            match tagger.untag(&old).await {
                Ok(()) => {
                    self.tagged.remove(&old.uid);
                    changes.untagged.push(old.uid.clone());
                }
                Err(why) => changes.failed.push((old.uid.clone(), why)),
            }
        }
        for (uid, pod) in listed {
            if self.tagged.get(&uid) == Some(&pod) {
                continue;
            }
            match tagger.tag(&pod).await {
                Ok(()) => {
                    changes.tagged.push(uid.clone());
                    self.tagged.insert(uid, pod);
                }
                Err(why) => changes.failed.push((uid, why)),
            }
        }
        changes
    }

    /// The pods tagged now.
    pub fn tagged(&self) -> impl Iterator<Item = &Pod> {
        self.tagged.values()
    }
}

/// Whether two listings of a pod need the same tag (only the process it is served through may
/// differ).
fn same_tag(old: &Pod, new: &Pod) -> bool {
    (&old.uid, &old.namespace, &old.name, &old.agent, &old.cgroup)
        == (&new.uid, &new.namespace, &new.name, &new.agent, &new.cgroup)
}

/// The pods a source has tagged, kept in `<state-dir>/pods-<source>.json` so that the next
/// brokerd knows them: a pod whose label was taken away (or that went) while brokerd was down
/// is then untagged on the first list, not left tagged for good.
pub struct Memory {
    path: PathBuf,
}

#[derive(serde::Serialize, serde::Deserialize)]
struct MemoryFile {
    pods: Vec<Pod>,
}

impl Memory {
    pub fn new(state_dir: &Path, source: &str) -> Self {
        Self {
            path: state_dir.join(format!("pods-{source}.json")),
        }
    }

    /// The pods tagged before; none (with a warning) when the file cannot be read.
    pub fn load(&self) -> Vec<Pod> {
        match std::fs::read(&self.path) {
            Ok(bytes) => match serde_json::from_slice::<MemoryFile>(&bytes) {
                Ok(file) => file.pods,
                Err(e) => {
                    warn!(file = %self.path.display(), error = %e, "the pods a source tagged before cannot be read; pods whose label was removed while brokerd was down stay tagged until detached");
                    Vec::new()
                }
            },
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Vec::new(),
            Err(e) => {
                warn!(file = %self.path.display(), error = %e, "the pods a source tagged before cannot be read");
                Vec::new()
            }
        }
    }

    fn save(&self, reconciler: &Reconciler) {
        let file = MemoryFile {
            pods: reconciler.tagged().cloned().collect(),
        };
        let written = serde_json::to_vec_pretty(&file)
            .map_err(|e| e.to_string())
            .and_then(|bytes| {
                agent_broker_core::fs::write_file_atomically(&self.path, &bytes)
                    .map_err(|e| e.to_string())
            });
        if let Err(e) = written {
            warn!(file = %self.path.display(), error = %e, "cannot record the pods a source tagged; a restarted brokerd will not untag those whose label is removed while it is down");
        }
    }
}

/// Lists, reconciles and waits, until `cancel`. Tags stay when brokerd stops: they are pinned,
/// and the next brokerd lists the pods again and finds them tagged; `memory` tells it which
/// pods it tagged, so that it untags those no longer listed.
pub async fn run<S: PodSource, T: Tagger>(
    mut source: S,
    tagger: T,
    memory: Memory,
    cancel: CancellationToken,
) {
    let mut reconciler = Reconciler::seeded(memory.load());
    let mut last_error: Option<String> = None;
    loop {
        match source.list().await {
            Ok(pods) => {
                if last_error.take().is_some() {
                    info!(source = source.name(), "pod source reachable again");
                }
                let changes = reconciler.apply(pods, &tagger).await;
                if !changes.tagged.is_empty() || !changes.untagged.is_empty() {
                    memory.save(&reconciler);
                }
                for uid in &changes.tagged {
                    let pod = reconciler.tagged().find(|p| p.uid == *uid);
                    info!(
                        source = source.name(),
                        pod = pod.map(Pod::display_name).unwrap_or_default(),
                        %uid,
                        agent = pod.map(|p| p.agent.as_str()).unwrap_or_default(),
                        "pod tagged"
                    );
                }
                for uid in &changes.untagged {
                    info!(source = source.name(), %uid, "pod untagged");
                }
                for (uid, why) in &changes.failed {
                    warn!(source = source.name(), %uid, %why, "pod not (un)tagged; trying again");
                }
            }
            Err(e) => {
                let why = agent_broker_core::fmt::error_chain(&*e);
                if last_error.as_deref() != Some(&why) {
                    warn!(source = source.name(), error = %why, "cannot list pods");
                }
                last_error = Some(why);
            }
        }
        tokio::select! {
            () = cancel.cancelled() => return,
            () = source.changed() => {}
        }
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Mutex;

    use super::*;

    fn pod(uid: &str, agent: &str, pid: u32) -> Pod {
        Pod {
            uid: uid.into(),
            namespace: String::new(),
            name: format!("pod-{uid}"),
            agent: agent.into(),
            cgroup: format!("libpod_parent/{uid}"),
            pid,
        }
    }

    #[derive(Default)]
    struct Recorder {
        calls: Mutex<Vec<String>>,
        refuse: Mutex<Vec<String>>,
    }

    impl Tagger for Recorder {
        async fn tag(&self, pod: &Pod) -> Result<(), String> {
            self.calls
                .lock()
                .expect("not poisoned")
                .push(format!("tag {} {}", pod.uid, pod.pid));
            if self.refuse.lock().expect("not poisoned").contains(&pod.uid) {
                return Err("refused".into());
            }
            Ok(())
        }
        async fn untag(&self, pod: &Pod) -> Result<(), String> {
            self.calls
                .lock()
                .expect("not poisoned")
                .push(format!("untag {} {}", pod.uid, pod.pid));
            Ok(())
        }
    }

    impl Recorder {
        fn take(&self) -> Vec<String> {
            std::mem::take(&mut *self.calls.lock().expect("not poisoned"))
        }
    }

    #[tokio::test]
    async fn tags_new_pods_once_and_untags_gone_ones() {
        let tagger = Recorder::default();
        let mut r = Reconciler::default();
        let c = r
            .apply(vec![pod("a", "x", 1), pod("b", "y", 2)], &tagger)
            .await;
        assert_eq!(c.tagged, ["a", "b"]);
        assert_eq!(tagger.take(), ["tag a 1", "tag b 2"]);
        // The same list again changes nothing.
        let c = r
            .apply(vec![pod("a", "x", 1), pod("b", "y", 2)], &tagger)
            .await;
        assert_eq!(c, Changes::default());
        assert!(tagger.take().is_empty());
        // b is gone.
        let c = r.apply(vec![pod("a", "x", 1)], &tagger).await;
        assert_eq!(c.untagged, ["b"]);
        assert_eq!(tagger.take(), ["untag b 2"]);
        assert_eq!(r.tagged().count(), 1);
    }

    #[tokio::test]
    async fn a_pod_served_through_a_new_process_is_tagged_again_without_an_untag() {
        let tagger = Recorder::default();
        let mut r = Reconciler::default();
        r.apply(vec![pod("a", "x", 1)], &tagger).await;
        tagger.take();
        // Its infra (or first) process changed: no window in which the pod is untagged.
        let c = r.apply(vec![pod("a", "x", 7)], &tagger).await;
        assert_eq!((c.untagged.len(), c.tagged.len()), (0, 1));
        assert_eq!(tagger.take(), ["tag a 7"]);
        // Its label changed: untagged, then tagged under the new name.
        let c = r.apply(vec![pod("a", "y", 7)], &tagger).await;
        assert_eq!((c.untagged.len(), c.tagged.len()), (1, 1));
        assert_eq!(tagger.take(), ["untag a 7", "tag a 7"]);
    }

    #[test]
    fn kubernetes_pods_are_named_by_namespace_label_and_pod() {
        let mut p = pod("u", "coder", 1);
        assert_eq!(p.policy_name().expect("valid").as_str(), "agents/coder");
        assert_eq!(p.tag_name().expect("valid").as_str(), "agents/coder/pod-u");
        p.namespace = "team-a".into();
        assert_eq!(
            p.policy_name().expect("valid").as_str(),
            "agents/team-a/coder"
        );
        assert_eq!(
            p.tag_name().expect("valid").as_str(),
            "agents/team-a/coder/pod-u"
        );
        p.name = "a/b".into();
        assert!(p.tag_name().expect_err("refused").contains("pod name"));
    }

    #[tokio::test]
    async fn a_refused_tag_is_tried_again_on_the_next_list() {
        let tagger = Recorder::default();
        tagger.refuse.lock().expect("not poisoned").push("a".into());
        let mut r = Reconciler::default();
        let c = r.apply(vec![pod("a", "x", 1)], &tagger).await;
        assert_eq!(c.failed, [("a".to_string(), "refused".to_string())]);
        assert_eq!(r.tagged().count(), 0);
        tagger.refuse.lock().expect("not poisoned").clear();
        let c = r.apply(vec![pod("a", "x", 1)], &tagger).await;
        assert_eq!(c.tagged, ["a"]);
    }

    #[tokio::test]
    async fn a_restarted_source_untags_the_pods_it_tagged_that_are_no_longer_listed() {
        let dir = tempfile::tempdir().expect("tempdir");
        let memory = Memory::new(dir.path(), "podman");
        let tagger = Recorder::default();
        let mut before = Reconciler::default();
        before
            .apply(vec![pod("a", "x", 1), pod("b", "x", 2)], &tagger)
            .await;
        memory.save(&before);
        tagger.take();

        // The next brokerd: "b" lost its label while brokerd was down.
        let mut after = Reconciler::seeded(memory.load());
        let c = after.apply(vec![pod("a", "x", 7)], &tagger).await;
        assert_eq!(c.untagged, ["b"]);
        assert_eq!(tagger.take(), ["untag b 0", "tag a 7"]);
        assert_eq!(
            after.tagged().map(|p| p.uid.as_str()).collect::<Vec<_>>(),
            ["a"]
        );
    }

    #[test]
    fn an_unreadable_memory_is_empty() {
        let dir = tempfile::tempdir().expect("tempdir");
        std::fs::write(dir.path().join("pods-kube.json"), b"{not json").expect("write");
        assert!(Memory::new(dir.path(), "kube").load().is_empty());
        assert!(Memory::new(dir.path(), "podman").load().is_empty());
    }

    #[test]
    fn label_values_become_one_segment_below_agents() {
        assert_eq!(
            policy_name("coder").expect("a valid label value").as_str(),
            "agents/coder"
        );
        assert_eq!(
            policy_name("a.b_c-1")
                .expect("a valid label value")
                .as_str(),
            "agents/a.b_c-1"
        );
        for bad in ["", ".", "..", "a/b", "a b", &"x".repeat(64), "ü"] {
            let e = policy_name(bad).expect_err("refused");
            assert!(e.contains(AGENT_LABEL), "{e}");
        }
    }
}
