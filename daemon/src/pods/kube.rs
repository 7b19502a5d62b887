//! The Kubernetes pod source: the pods of this node labelled [`AGENT_LABEL`], watched through the
//! API server with kube-rs (in-cluster config in a DaemonSet, else `KUBECONFIG`).
//!
//! A watcher task keeps the labelled pods by UID (`spec.nodeName=$NODE_NAME` when the DaemonSet
//! passes the node name, so each brokerd sees only its own node's pods). A list turns the
//! running ones into [`Pod`]s: the pod cgroup found from the UID ([`super::kube_paths`]), and a
//! process in it for the network namespace. A pod whose cgroup or processes are not there yet is
//! left out and listed again on the next wake-up; a pod of another node has no cgroup here and
//! is never tagged.

use std::{
    collections::BTreeMap,
    path::{Path, PathBuf},
    sync::{Arc, Mutex},
};

use anyhow::Context as _;
use futures_util::StreamExt as _;
use k8s_openapi::api::core::v1::Pod as KubePod;
use kube::{
    Api, Client,
    runtime::{WatchStreamExt as _, watcher},
};
use tokio::sync::Notify;

use agent_broker_core::cgroup::{CgroupPath, CgroupRoot};

use super::{AGENT_LABEL, Pod, PodSource, RESYNC, kube_paths};
use crate::capture::netns::member_pids;

/// The environment variable the DaemonSet sets from `spec.nodeName`.
pub const NODE_NAME_ENV: &str = "NODE_NAME";

/// Labelled pods from the Kubernetes API.
pub struct Kube {
    mount: PathBuf,
    pods: Arc<Mutex<Watched>>,
    changed: Arc<Notify>,
    task: tokio::task::JoinHandle<()>,
}

#[derive(Default)]
struct Watched {
    pods: BTreeMap<String, KubePod>,
    /// Filled during a (re-)list, swapped in when it is done.
    next: Option<BTreeMap<String, KubePod>>,
    error: Option<String>,
}

impl Kube {
    /// Connects with the inferred configuration and starts watching. `node` narrows the watch
    /// to one node's pods.
    pub async fn start(mount: PathBuf, node: Option<String>) -> anyhow::Result<Self> {
        let client = Client::try_default().await.context(
            "no Kubernetes API configuration (in-cluster service account or KUBECONFIG)",
        )?;
        let api: Api<KubePod> = Api::all(client);
        let mut config = watcher::Config::default().labels(AGENT_LABEL);
        if let Some(node) = &node {
            config = config.fields(&format!("spec.nodeName={node}"));
        }
        let pods = Arc::new(Mutex::new(Watched::default()));
        let changed = Arc::new(Notify::new());
        let task = tokio::spawn({
            let (pods, changed) = (pods.clone(), changed.clone());
            async move {
                let mut events = watcher(api, config).default_backoff().boxed();
                while let Some(event) = events.next().await {
                    let mut w = pods.lock().unwrap_or_else(|e| e.into_inner());
                    match event {
                        Ok(event) => {
                            w.error = None;
                            apply(&mut w, event);
                        }
                        Err(e) => w.error = Some(e.to_string()),
                    }
                    drop(w);
                    changed.notify_one();
                }
            }
        });
        Ok(Self {
            mount,
            pods,
            changed,
            task,
        })
    }
}

impl Drop for Kube {
    fn drop(&mut self) {
        self.task.abort();
    }
}

fn uid(pod: &KubePod) -> Option<String> {
    pod.metadata.uid.clone()
}

fn apply(w: &mut Watched, event: watcher::Event<KubePod>) {
    match event {
        watcher::Event::Init => w.next = Some(BTreeMap::new()),
        watcher::Event::InitApply(pod) => {
            if let (Some(next), Some(uid)) = (w.next.as_mut(), uid(&pod)) {
                next.insert(uid, pod);
            }
        }
        watcher::Event::InitDone => {
            if let Some(next) = w.next.take() {
                w.pods = next;
            }
        }
        watcher::Event::Apply(pod) => {
            if let Some(uid) = uid(&pod) {
                w.pods.insert(uid, pod);
            }
        }
        watcher::Event::Delete(pod) => {
            if let Some(uid) = uid(&pod) {
                w.pods.remove(&uid);
            }
        }
    }
}

/// The pod as brokerd tags it, if it runs on this node with a network namespace of its own.
fn pod_of(mount: &Path, pod: &KubePod) -> Option<Pod> {
    let uid = pod.metadata.uid.as_deref()?;
    let agent = pod.metadata.labels.as_ref()?.get(AGENT_LABEL)?;
    let status = pod.status.as_ref()?;
    if status.phase.as_deref() != Some("Running") {
        return None;
    }
    if pod
        .spec
        .as_ref()
        .and_then(|s| s.host_network)
        .unwrap_or(false)
    {
        // A hostNetwork pod shares the node's namespace: tag it by cgroup like a host agent.
        tracing::debug!(pod = uid, "hostNetwork pod: tagged in the node's namespace");
    }
    let cgroup = kube_paths::find_pod_cgroup(mount, uid)?;
    let path = CgroupPath::parse(&cgroup).ok()?;
    let pid = *member_pids(&CgroupRoot::at(mount), &path).first()?;
    Some(Pod {
        uid: uid.to_owned(),
        namespace: pod.metadata.namespace.clone().unwrap_or_default(),
        name: pod.metadata.name.clone().unwrap_or_default(),
        agent: agent.clone(),
        cgroup,
        pid,
    })
}

impl PodSource for Kube {
    async fn list(&mut self) -> anyhow::Result<Vec<Pod>> {
        let (pods, error) = {
            let w = self.pods.lock().unwrap_or_else(|e| e.into_inner());
            (
                w.pods.values().cloned().collect::<Vec<_>>(),
                w.error.clone(),
            )
        };
        if let Some(error) = error
            && pods.is_empty()
        {
            anyhow::bail!("watching pods: {error}");
        }
        let mount = self.mount.clone();
        // Walks of the cgroup tree: off the async threads.
        tokio::task::spawn_blocking(move || pods.iter().filter_map(|p| pod_of(&mount, p)).collect())
            .await
            .context("listing pod cgroups")
    }

    async fn changed(&mut self) {
        let _ = tokio::time::timeout(RESYNC, self.changed.notified()).await;
    }

    fn name(&self) -> &'static str {
        "kube"
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn kube_pod(uid: &str, phase: &str, label: Option<&str>) -> KubePod {
        serde_json::from_value(serde_json::json!({
            "metadata": {
                "uid": uid, "name": "coder-0", "namespace": "team-a",
                "labels": label.map(|l| serde_json::json!({ AGENT_LABEL: l })),
            },
            "spec": { "containers": [] },
            "status": { "phase": phase },
        }))
        .expect("the fixture is a Pod")
    }

    #[test]
    fn a_running_labelled_pod_of_this_node_becomes_a_pod_with_its_cgroup_and_a_pid() {
        let uid = "3f2c1a9e-8b7d-4c6e-9a1b-2d3e4f5a6b7c";
        let root = tempfile::tempdir().expect("a temp dir");
        let pod_dir = root.path().join(format!("kubepods/besteffort/pod{uid}"));
        let ctr = pod_dir.join("a".repeat(64));
        std::fs::create_dir_all(&ctr).expect("a test cgroup tree");
        std::fs::write(pod_dir.join("cgroup.procs"), "").expect("a test cgroup.procs");
        std::fs::write(ctr.join("cgroup.procs"), "4242\n4243\n").expect("a test cgroup.procs");

        let got = pod_of(root.path(), &kube_pod(uid, "Running", Some("coder"))).expect("listed");
        assert_eq!(got.cgroup, format!("kubepods/besteffort/pod{uid}"));
        assert_eq!((got.pid, got.agent.as_str()), (4242, "coder"));
        assert_eq!(got.display_name(), "team-a/coder-0");

        assert_eq!(
            pod_of(root.path(), &kube_pod(uid, "Pending", Some("coder"))),
            None
        );
        assert_eq!(pod_of(root.path(), &kube_pod(uid, "Running", None)), None);
        // Another node's pod: no cgroup here.
        let other = "11111111-2222-3333-4444-555555555555";
        assert_eq!(
            pod_of(root.path(), &kube_pod(other, "Running", Some("coder"))),
            None
        );
    }

    #[test]
    fn a_relist_replaces_the_pods_and_deletes_remove_them() {
        let mut w = Watched::default();
        apply(
            &mut w,
            watcher::Event::Apply(kube_pod("a", "Running", Some("x"))),
        );
        apply(
            &mut w,
            watcher::Event::Apply(kube_pod("b", "Running", Some("x"))),
        );
        apply(
            &mut w,
            watcher::Event::Delete(kube_pod("a", "Running", Some("x"))),
        );
        assert_eq!(w.pods.keys().collect::<Vec<_>>(), ["b"]);
        apply(&mut w, watcher::Event::Init);
        apply(
            &mut w,
            watcher::Event::InitApply(kube_pod("c", "Running", Some("x"))),
        );
        assert_eq!(
            w.pods.keys().collect::<Vec<_>>(),
            ["b"],
            "swapped only when done"
        );
        apply(&mut w, watcher::Event::InitDone);
        assert_eq!(w.pods.keys().collect::<Vec<_>>(), ["c"]);
    }
}
