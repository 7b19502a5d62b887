//! `brokerctl oci-hook`: an OCI runtime hook (the `createRuntime` stage) that has brokerd tag an
//! agent's pod before the pod's first process runs.
//!
//! A container runtime (runc, crun) runs the hook after it made the container's namespaces and
//! cgroup and before the container's process starts, with the container's state on stdin (its
//! id, the pid of its init process, its bundle and annotations). When the annotations name an
//! agent ([`AGENT_ANNOTATION`]), the hook asks brokerd to tag the container's pod
//! ([`Request::AttachOci`]) and waits for the answer: brokerd tags the pod-level cgroup and
//! opens its listeners in the pod's network namespace. When brokerd cannot be reached or
//! refuses, the hook fails, and so does the container's start: an agent's container never runs
//! unbrokered. A container whose annotations name no agent is left alone without asking brokerd.
//!
//! Where the pod's identity comes from, by runtime:
//!
//! | runtime | agent | namespace, name, uid |
//! |---|---|---|
//! | containerd (CRI) | the pod annotation, passed through by `pod_annotations` | `io.kubernetes.cri.sandbox-{namespace,name,uid}` |
//! | CRI-O | the pod annotation, or the sandbox's labels (`io.kubernetes.cri-o.Labels`) | `io.kubernetes.pod.{namespace,name,uid}` |
//! | podman (`kube play`) | the pod annotation | none: the pod's hostname (its name, unless the manifest sets another), the pod id from its cgroup |
//! | a container outside a pod (`podman run --annotation`) | the annotation | the container id's first 12 characters |

use std::{
    collections::BTreeMap,
    io::Read,
    path::{Path, PathBuf},
};

use agent_broker_protocol::{OciPod, Request, Response};
use anyhow::Context as _;
use serde::Deserialize;

use crate::control::{call, unexpected};

/// The annotation (and pod label) that names a container's agent.
pub const AGENT_ANNOTATION: &str = "agent-broker.io/agent";
/// Longest state or config document read, in bytes.
const MAX_DOCUMENT: u64 = 4 * 1024 * 1024;

/// Run by a container runtime as an OCI hook at the createRuntime stage: tags the pod of a
/// container whose annotations name an agent (`agent-broker.io/agent=<name>`) before the
/// container's first process runs, and fails (so the container does not start) when brokerd
/// cannot tag it. Containers without the annotation are left alone. Reads the container's
/// state (OCI runtime spec, "State") from stdin. Install it with a hooks.d file
/// (deploy/oci-hooks/agent-broker.json) for podman and CRI-O, or a base runtime spec for
/// containerd.
#[derive(Debug, clap::Args)]
pub struct Args {
    /// Read the state from this file instead of stdin.
    #[arg(long, value_name = "FILE")]
    state: Option<PathBuf>,
}

/// The container state a runtime passes to a hook.
#[derive(Debug, Deserialize)]
struct State {
    id: String,
    #[serde(default)]
    status: String,
    #[serde(default)]
    pid: u32,
    bundle: PathBuf,
    #[serde(default)]
    annotations: BTreeMap<String, String>,
}

/// What the hook reads of the bundle's `config.json`.
#[derive(Debug, Default, Deserialize)]
struct Config {
    #[serde(default)]
    annotations: BTreeMap<String, String>,
    #[serde(default)]
    hostname: Option<String>,
    #[serde(default)]
    process: Option<Process>,
}

#[derive(Debug, Default, Deserialize)]
struct Process {
    #[serde(default)]
    env: Vec<String>,
}

pub fn run(run_dir: &Path, args: Args) -> anyhow::Result<()> {
    let text = match &args.state {
        Some(path) => read_bounded(path)?,
        None => {
            let mut text = String::new();
            std::io::stdin()
                .take(MAX_DOCUMENT)
                .read_to_string(&mut text)
                .context("cannot read the container state from stdin")?;
            text
        }
    };
    let state: State = serde_json::from_str(&text)
        .context("the container state on stdin is not an OCI state document")?;
    let config_path = state.bundle.join("config.json");
    let config: Config = match read_bounded(&config_path) {
        Ok(text) => serde_json::from_str(&text)
            .with_context(|| format!("{} is not an OCI config", config_path.display()))?,
        // The state's annotations are the config's; a runtime that removed the bundle's config
        // already still gives them.
        Err(_) => Config::default(),
    };
    let Some(pod) = claim(&state, &config)? else {
        return Ok(());
    };
    if !matches!(state.status.as_str(), "creating" | "created" | "") {
        anyhow::bail!(
            "container {} is {:?}: the hook tags at the createRuntime stage (state \"creating\"), \
             before the container runs",
            state.id,
            state.status
        );
    }
    if state.pid == 0 {
        anyhow::bail!("container {}: the runtime gave no pid", state.id);
    }
    let agent = pod.agent.clone();
    let request = Request::AttachOci {
        pid: state.pid,
        pod,
    };
    match call(run_dir, &request).with_context(|| {
        format!(
            "container {} of agent {agent} is not started: brokerd did not tag it",
            state.id
        )
    })? {
        Response::Attached { .. } => Ok(()),
        other => Err(unexpected(other)),
    }
}

fn read_bounded(path: &Path) -> anyhow::Result<String> {
    let file =
        std::fs::File::open(path).with_context(|| format!("cannot open {}", path.display()))?;
    let mut text = String::new();
    file.take(MAX_DOCUMENT)
        .read_to_string(&mut text)
        .with_context(|| format!("cannot read {}", path.display()))?;
    Ok(text)
}

/// The pod the container's annotations claim for an agent; `None` when they name no agent.
fn claim(state: &State, config: &Config) -> anyhow::Result<Option<OciPod>> {
    // The state's annotations win; the config's fill in what a runtime left out of the state.
    let mut annotations = config.annotations.clone();
    annotations.extend(state.annotations.clone());
    let get = |key: &str| annotations.get(key).filter(|v| !v.is_empty()).cloned();

    let agent = match get(AGENT_ANNOTATION) {
        Some(agent) => agent,
        None => match get("io.kubernetes.cri-o.Labels") {
            Some(labels) => {
                let labels: BTreeMap<String, String> = serde_json::from_str(&labels)
                    .context("annotation io.kubernetes.cri-o.Labels is not a JSON map")?;
                match labels.get(AGENT_ANNOTATION) {
                    Some(agent) => agent.clone(),
                    None => return Ok(None),
                }
            }
            None => return Ok(None),
        },
    };

    // Kubernetes, through containerd's CRI plugin or CRI-O.
    let kube = |containerd: &str, crio: &str| get(containerd).or_else(|| get(crio));
    let namespace = kube(
        "io.kubernetes.cri.sandbox-namespace",
        "io.kubernetes.pod.namespace",
    );
    let name = kube("io.kubernetes.cri.sandbox-name", "io.kubernetes.pod.name");
    let uid = kube("io.kubernetes.cri.sandbox-uid", "io.kubernetes.pod.uid");
    let mut pod = OciPod {
        agent,
        container: state.id.clone(),
        ..OciPod::default()
    };
    match (namespace, name, uid) {
        (Some(namespace), Some(name), Some(uid)) => {
            pod.namespace = namespace;
            pod.name = name;
            pod.uid = uid;
            pod.in_pod = true;
        }
        (None, None, None) if get("io.kubernetes.cri-o.SandboxID").is_some() => {
            // podman: a container of a pod, which shares the pod's UTS namespace; its
            // hostname (or the HOSTNAME podman sets) is the pod's.
            let env_hostname = config.process.as_ref().and_then(|p| {
                p.env
                    .iter()
                    .find_map(|e| e.strip_prefix("HOSTNAME="))
                    .map(str::to_owned)
            });
            pod.name = config
                .hostname
                .clone()
                .filter(|h| !h.is_empty())
                .or(env_hostname)
                .filter(|h| !h.is_empty())
                .with_context(|| {
                    format!(
                        "container {} is in a podman pod, but its config names no hostname to \
                         name the pod by",
                        state.id
                    )
                })?;
            pod.in_pod = true;
        }
        (None, None, None) => {
            pod.name = state.id.chars().take(12).collect();
        }
        _ => anyhow::bail!(
            "container {} has only some of the Kubernetes pod annotations (namespace, name, uid)",
            state.id
        ),
    }
    Ok(Some(pod))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn state(annotations: &[(&str, &str)]) -> State {
        State {
            id: "0123456789abcdef0123".into(),
            status: "creating".into(),
            pid: 42,
            bundle: PathBuf::from("/nonexistent"),
            annotations: annotations
                .iter()
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .collect(),
        }
    }

    #[test]
    fn a_container_without_the_annotation_is_left_alone() {
        let s = state(&[("io.kubernetes.cri.sandbox-name", "web")]);
        assert_eq!(claim(&s, &Config::default()).expect("claim"), None);
        let s = state(&[("io.kubernetes.cri-o.Labels", r#"{"app":"web"}"#)]);
        assert_eq!(claim(&s, &Config::default()).expect("claim"), None);
    }

    #[test]
    fn containerd_and_cri_o_name_the_kubernetes_pod() {
        let s = state(&[
            (AGENT_ANNOTATION, "coder"),
            ("io.kubernetes.cri.sandbox-namespace", "team-a"),
            ("io.kubernetes.cri.sandbox-name", "coder-7d9f"),
            (
                "io.kubernetes.cri.sandbox-uid",
                "1b2c3d4e-0000-1111-2222-333344445555",
            ),
        ]);
        let pod = claim(&s, &Config::default())
            .expect("claim")
            .expect("an agent");
        assert_eq!(
            (
                pod.agent.as_str(),
                pod.namespace.as_str(),
                pod.name.as_str()
            ),
            ("coder", "team-a", "coder-7d9f")
        );
        assert_eq!(pod.uid, "1b2c3d4e-0000-1111-2222-333344445555");
        assert!(pod.in_pod);

        // CRI-O: the agent from the sandbox's labels.
        let s = state(&[
            (
                "io.kubernetes.cri-o.Labels",
                r#"{"agent-broker.io/agent":"coder","io.kubernetes.pod.name":"x"}"#,
            ),
            ("io.kubernetes.pod.namespace", "team-b"),
            ("io.kubernetes.pod.name", "coder-1"),
            ("io.kubernetes.pod.uid", "u-1"),
        ]);
        let pod = claim(&s, &Config::default())
            .expect("claim")
            .expect("an agent");
        assert_eq!(
            (pod.agent.as_str(), pod.namespace.as_str(), pod.uid.as_str()),
            ("coder", "team-b", "u-1")
        );
    }

    #[test]
    fn a_podman_pod_is_named_by_its_hostname() {
        let s = state(&[
            (AGENT_ANNOTATION, "coder"),
            ("io.kubernetes.cri-o.SandboxID", "ffff"),
        ]);
        let config = Config {
            process: Some(Process {
                env: vec!["PATH=/bin".into(), "HOSTNAME=mypod".into()],
            }),
            ..Config::default()
        };
        let pod = claim(&s, &config).expect("claim").expect("an agent");
        assert_eq!((pod.name.as_str(), pod.in_pod), ("mypod", true));
        assert!(pod.namespace.is_empty() && pod.uid.is_empty());
        assert!(claim(&s, &Config::default()).is_err(), "no hostname at all");
    }

    #[test]
    fn a_container_outside_a_pod_is_a_pod_of_one() {
        let s = state(&[(AGENT_ANNOTATION, "coder")]);
        let pod = claim(&s, &Config::default())
            .expect("claim")
            .expect("an agent");
        assert_eq!((pod.name.as_str(), pod.in_pod), ("0123456789ab", false));
    }

    #[test]
    fn partial_kubernetes_annotations_are_refused() {
        let s = state(&[
            (AGENT_ANNOTATION, "coder"),
            ("io.kubernetes.cri.sandbox-name", "web"),
        ]);
        let e = claim(&s, &Config::default()).expect_err("partial");
        assert!(e.to_string().contains("only some"), "{e}");
    }

    #[test]
    fn the_state_document_of_runc_parses() {
        let text = r#"{"ociVersion":"1.0.2-dev","id":"abc","status":"creating","pid":4943,
            "bundle":"/var/lib/x/userdata","annotations":{"agent-broker.io/agent":"a"}}"#;
        let s: State = serde_json::from_str(text).expect("state");
        assert_eq!((s.pid, s.status.as_str()), (4943, "creating"));
    }
}
