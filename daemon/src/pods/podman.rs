//! The podman pod source: podman's REST API (libpod, v4) on its unix socket, as
//! `podman system service` serves it (`/run/podman/podman.sock` for the system service).
//!
//! A list is three kinds of call: the labelled pods (`/libpod/pods/json` with a label filter),
//! then for each running one its inspection (the pod cgroup and the infra container) and the
//! infra container's inspection (its pid, in the pod's network namespace). Changes come from the
//! event stream (`/libpod/events`, pods and containers), reopened when it ends.

use std::{
    collections::BTreeMap,
    path::{Path, PathBuf},
    time::Duration,
};

use anyhow::{Context as _, bail};
use bytes::Bytes;
use http_body_util::{BodyExt as _, Empty};
use hyper::body::Incoming;
use hyper_util::rt::TokioIo;
use serde::Deserialize;
use tokio::net::UnixStream;

use super::{AGENT_LABEL, Pod, PodSource, RESYNC};

/// The system service's socket.
pub const DEFAULT_SOCKET: &str = "/run/podman/podman.sock";
/// The API prefix: podman 4's libpod API.
const API: &str = "/v4.0.0/libpod";
/// How long one API call may take.
const CALL_TIMEOUT: Duration = Duration::from_secs(10);

/// Pods through podman's API.
pub struct Podman {
    socket: PathBuf,
    events: Option<Incoming>,
}

impl Podman {
    pub fn new(socket: impl Into<PathBuf>) -> Self {
        Self {
            socket: socket.into(),
            events: None,
        }
    }

    async fn get_json<T: serde::de::DeserializeOwned>(&self, path: &str) -> anyhow::Result<T> {
        self.get_json_if_found(path)
            .await?
            .with_context(|| format!("podman answered {path} with 404 Not Found"))
    }

    /// `None` only for a 404 (the pod or container is gone); any other failure is an error,
    /// so that a busy or failing podman fails the whole list instead of leaving pods out of it
    /// (which would untag them).
    async fn get_json_if_found<T: serde::de::DeserializeOwned>(
        &self,
        path: &str,
    ) -> anyhow::Result<Option<T>> {
        let body = tokio::time::timeout(CALL_TIMEOUT, async {
            let response = request(&self.socket, path).await?;
            let status = response.status();
            let body = response
                .into_body()
                .collect()
                .await
                .with_context(|| format!("reading podman's answer to {path}"))?
                .to_bytes();
            if status == hyper::StatusCode::NOT_FOUND {
                return Ok(None);
            }
            if !status.is_success() {
                bail!(
                    "podman answered {path} with {status}: {}",
                    String::from_utf8_lossy(&body[..body.len().min(300)]).trim()
                );
            }
            Ok(Some(body))
        })
        .await
        .with_context(|| format!("podman did not answer {path} within {CALL_TIMEOUT:?}"))??;
        body.map(|body| {
            serde_json::from_slice(&body).with_context(|| format!("podman's answer to {path}"))
        })
        .transpose()
    }
}

/// One GET on a new connection to the socket.
async fn request(socket: &Path, path: &str) -> anyhow::Result<hyper::Response<Incoming>> {
    let stream = UnixStream::connect(socket)
        .await
        .with_context(|| format!("connecting to podman's API at {}", socket.display()))?;
    let (mut sender, connection) = hyper::client::conn::http1::handshake(TokioIo::new(stream))
        .await
        .context("HTTP handshake with podman's API")?;
    tokio::spawn(async move {
        let _ = connection.await;
    });
    let request = hyper::Request::get(path)
        .header(hyper::header::HOST, "podman")
        .body(Empty::<Bytes>::new())?;
    sender
        .send_request(request)
        .await
        .with_context(|| format!("GET {path} from podman's API"))
}

/// `filters={"label":["agent-broker.io/agent"]}`, percent-encoded.
fn label_filter() -> String {
    let json = format!(r#"{{"label":["{AGENT_LABEL}"]}}"#);
    let mut out = String::new();
    for b in json.bytes() {
        if b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.') {
            out.push(b as char);
        } else {
            out.push_str(&format!("%{b:02X}"));
        }
    }
    out
}

#[derive(Debug, Deserialize)]
#[serde(rename_all = "PascalCase")]
struct ListedPod {
    id: String,
    name: String,
    #[serde(default)]
    namespace: String,
    status: String,
    #[serde(default)]
    labels: BTreeMap<String, String>,
}

#[derive(Debug, Deserialize)]
#[serde(rename_all = "PascalCase")]
struct InspectedPod {
    #[serde(default)]
    cgroup_path: String,
    #[serde(rename = "InfraContainerID", default)]
    infra_container_id: String,
}

#[derive(Debug, Deserialize)]
#[serde(rename_all = "PascalCase")]
struct InspectedContainer {
    state: ContainerState,
}

#[derive(Debug, Deserialize)]
#[serde(rename_all = "PascalCase")]
struct ContainerState {
    #[serde(default)]
    pid: u32,
    #[serde(default)]
    running: bool,
}

/// The pod from its list entry and inspections; `None` when it is not running yet or has no
/// infra process (a pod without an infra container has no network namespace of its own).
fn pod_of(listed: &ListedPod, pod: &InspectedPod, infra: &InspectedContainer) -> Option<Pod> {
    let agent = listed.labels.get(AGENT_LABEL)?;
    if !listed.status.eq_ignore_ascii_case("running")
        && !listed.status.eq_ignore_ascii_case("degraded")
    {
        return None;
    }
    if !infra.state.running || infra.state.pid == 0 {
        return None;
    }
    let cgroup = pod.cgroup_path.trim_matches('/').to_owned();
    if cgroup.is_empty() {
        return None;
    }
    Some(Pod {
        uid: listed.id.clone(),
        namespace: listed.namespace.clone(),
        name: listed.name.clone(),
        agent: agent.clone(),
        cgroup,
        pid: infra.state.pid,
    })
}

impl PodSource for Podman {
    async fn list(&mut self) -> anyhow::Result<Vec<Pod>> {
        let listed: Vec<ListedPod> = self
            .get_json(&format!("{API}/pods/json?filters={}", label_filter()))
            .await?;
        let mut pods = Vec::new();
        for entry in listed {
            if !entry.labels.contains_key(AGENT_LABEL) {
                continue;
            }
            // A pod that goes away between the list and its inspection (404) is not listed;
            // any other failure fails the list, and the tags stay as they are.
            let Some(pod) = self
                .get_json_if_found::<InspectedPod>(&format!("{API}/pods/{}/json", entry.id))
                .await?
            else {
                continue;
            };
            if pod.infra_container_id.is_empty() {
                tracing::warn!(pod = %entry.name, "labelled pod has no infra container (no network namespace of its own): not tagged");
                continue;
            }
            let Some(infra) = self
                .get_json_if_found::<InspectedContainer>(&format!(
                    "{API}/containers/{}/json",
                    pod.infra_container_id
                ))
                .await?
            else {
                continue;
            };
            pods.extend(pod_of(&entry, &pod, &infra));
        }
        Ok(pods)
    }

    async fn changed(&mut self) {
        if self.events.is_none() {
            let path = format!(
                "{API}/events?stream=true&filters={}",
                "%7B%22type%22%3A%5B%22pod%22%2C%22container%22%5D%7D"
            );
            if let Ok(Ok(response)) =
                tokio::time::timeout(CALL_TIMEOUT, request(&self.socket, &path)).await
                && response.status().is_success()
            {
                self.events = Some(response.into_body());
            }
        }
        let Some(events) = self.events.as_mut() else {
            tokio::time::sleep(RESYNC).await;
            return;
        };
        match tokio::time::timeout(RESYNC, events.frame()).await {
            Ok(Some(Ok(_))) => {
                // Events come in bursts (a pod start is several); let the burst finish.
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
            Ok(None | Some(Err(_))) => self.events = None,
            Err(_) => {} // resync
        }
    }

    fn name(&self) -> &'static str {
        "podman"
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_label_filter_is_percent_encoded_json() {
        assert_eq!(
            label_filter(),
            "%7B%22label%22%3A%5B%22agent-broker.io%2Fagent%22%5D%7D"
        );
    }

    /// Shapes as podman 4.3.1 answers them (trimmed).
    #[test]
    fn a_running_labelled_pod_with_an_infra_process_is_listed() {
        let listed: Vec<ListedPod> = serde_json::from_str(
            r#"[{"Cgroup":"/libpod_parent","Containers":[],"Id":"70b1","InfraId":"c4fc",
                "Name":"coder","Namespace":"","Networks":[],"Status":"Running",
                "Labels":{"agent-broker.io/agent":"coder","app":"x"}}]"#,
        )
        .expect("the fixture parses");
        let pod: InspectedPod = serde_json::from_str(
            r#"{"Id":"70b1","CgroupPath":"/libpod_parent/70b1","InfraContainerID":"c4fc","State":"Running"}"#,
        )
        .expect("the fixture parses");
        let infra: InspectedContainer =
            serde_json::from_str(r#"{"State":{"Pid":20437,"Running":true,"Status":"running"}}"#)
                .expect("the fixture parses");
        let got = pod_of(&listed[0], &pod, &infra).expect("the fixture parses");
        assert_eq!(got.cgroup, "libpod_parent/70b1");
        assert_eq!((got.pid, got.agent.as_str()), (20437, "coder"));

        let stopped: InspectedContainer =
            serde_json::from_str(r#"{"State":{"Pid":0,"Running":false}}"#)
                .expect("the fixture parses");
        assert_eq!(pod_of(&listed[0], &pod, &stopped), None);
        let mut exited = listed;
        exited[0].status = "Exited".into();
        assert_eq!(pod_of(&exited[0], &pod, &infra), None);
    }
}
