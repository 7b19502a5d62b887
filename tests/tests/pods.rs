//! Issue 14: brokerd's pod source. A `podman kube play` pod labelled
//! `agent-broker.io/agent=<name>` is tagged by brokerd itself (`--pod-source podman:SOCKET`,
//! podman's REST API) as `agents/<name>/<pod name>`, a sub-agent governed by the policy of
//! `agents/<name>`, brokered in its own network
//! namespace with the key its policy injects, named in the audit records (pod name and id), and
//! untagged when the pod is removed. A pod without the label is never tagged. The same for the
//! kube source, against a mock of the Kubernetes API server.

use std::{net::IpAddr, time::Duration};

use agent_broker_protocol::{AuditEvent, EventKind};
use agent_broker_tests::{
    Broker, Canary, SHORT, TestCa, TestCgroup, TestHost, TestUpstream, UpstreamOptions,
    cgroup::spawn_in_cgroup,
    container::{AGENT_LABEL, Podman},
    kube_api::{FakeKubeApi, pod as kube_pod},
    netns::TestNetns,
    require_privileges, run_with_timeout, unique_name, wait_for,
    world::{API, SECRET_NAME, rule},
};

/// Run in the pod: `python3 -c POD_CLIENT_PY <api ip> <api port> <placeholder> <ca file>
/// <denied name>`. Prints `api <status> <body>` for an HTTPS `GET /hash` as api.example.test
/// with the placeholder as bearer token, then `dns <rcode>` for an A query of the denied name
/// to 127.0.0.1:53 (which brokerd answers inside the pod's namespace).
const POD_CLIENT_PY: &str = r#"
import http.client, socket, ssl, struct, sys
api_ip, api_port, placeholder, cafile, denied = sys.argv[1:6]
ctx = ssl.create_default_context(cafile=cafile)
class Conn(http.client.HTTPSConnection):
    def connect(self):
        self.sock = ctx.wrap_socket(socket.create_connection((api_ip, int(api_port)), timeout=5),
                                    server_hostname="api.example.test")
c = Conn("api.example.test", int(api_port), context=ctx, timeout=10)
c.request("GET", "/hash", headers={"Authorization": "Bearer " + placeholder})
r = c.getresponse()
print("api %d %s" % (r.status, r.read().decode("latin-1")), flush=True)
q = struct.pack(">HHHHHH", 0x4243, 0x0100, 1, 0, 0, 0)
for label in denied.split("."):
    q += bytes([len(label)]) + label.encode()
q += b"\0" + struct.pack(">HH", 1, 1)
s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
s.settimeout(5)
s.sendto(q, ("127.0.0.1", 53))
print("dns %d" % (s.recv(4096)[3] & 0xF), flush=True)
"#;

/// How long the pod source may take to notice a pod (it lists at least every 2 s).
const NOTICE: Duration = Duration::from_secs(20);

#[test]
fn a_labelled_pod_is_tagged_by_brokerds_pod_source_brokered_and_released() {
    require_privileges();
    let podman = Podman::new();
    let api_service = podman.api_service();
    // A label value of this run only, so pods of other runs never match the policy.
    let label = unique_name();
    let agent = format!("agents/{label}");

    let host = TestHost::start();
    let root_ip = host.root_ip();
    let ca = TestCa::new("abtest pods upstream CA");
    let mut options = UpstreamOptions::api();
    options.ip = IpAddr::V4(root_ip);
    options.plain = false;
    let api = TestUpstream::start(&ca, options);
    let source = format!("podman:{}", api_service.socket.display());
    let broker = Broker::builder()
        .arg("--pod-source")
        .arg(&source)
        .upstream_ca(ca.pem_path())
        .name(API, root_ip)
        .policy(
            "pod",
            &format!("cgroup = \"{agent}\"\n{}", rule(API, api.port(), true)),
        )
        .start();
    let secret = Canary::new();
    broker.secret_set(SECRET_NAME, secret.expose().as_bytes());
    let placeholder = Canary::with_prefix("abtest-placeholder-");
    api.watch_for("secret", &secret);
    std::fs::copy(broker.export_ca(), podman.share_dir().join("broker-ca.pem"))
        .unwrap_or_else(|e| panic!("cannot copy the broker CA for the pod: {e}"));

    let unlabelled = podman.kube_play(&[("tier", "abtest-unlabelled")], &["sleep", "600"]);
    let pod = podman.kube_play(&[(AGENT_LABEL, &label)], &["sleep", "600"]);
    wait_for(
        &format!(
            "brokerd's pod source should tag pod {} ({})",
            pod.name, pod.cgroup
        ),
        NOTICE,
        || broker.tag_name_of(&pod.cgroup).is_some(),
    );
    let tag_name = format!("{agent}/{}", pod.name);
    assert_eq!(
        broker.tag_name_of(&pod.cgroup),
        Some(Some(tag_name.clone())),
        "the pod's cgroup runs as agents/<label>/<pod name>"
    );
    let status = broker.status();
    assert!(
        status
            .workloads
            .iter()
            .any(|w| w.cgroup.starts_with(&pod.cgroup)),
        "brokerd serves the pod's network namespace: {:?}",
        status.workloads
    );
    assert_eq!(
        broker.tag_name_of(&unlabelled.cgroup),
        None,
        "a pod without {AGENT_LABEL} is never tagged"
    );

    let out = run_with_timeout(
        &mut pod.exec(&[
            "python3",
            "-c",
            POD_CLIENT_PY,
            &root_ip.to_string(),
            &api.port().to_string(),
            placeholder.expose(),
            "/ct/broker-ca.pem",
            "denied.example.test",
        ]),
        SHORT * 4,
    );
    let printed = String::from_utf8_lossy(&out.stdout).to_string();
    assert!(
        out.status.success(),
        "the client in the pod failed: {printed}\n{}\nbrokerd's log:\n{}",
        String::from_utf8_lossy(&out.stderr),
        broker.log()
    );
    secret.assert_absent(printed.as_bytes(), "the pod's output");
    let api_line = printed
        .lines()
        .find(|l| l.starts_with("api "))
        .unwrap_or("");
    assert!(
        api_line.starts_with("api 200 "),
        "the pod's call: {printed}"
    );
    let body: serde_json::Value =
        serde_json::from_str(api_line.trim_start_matches("api 200 ")).unwrap_or_default();
    assert_eq!(
        body["authorization_sha256"].as_str(),
        Some(secret.sha256_with_prefix("Bearer ").as_str()),
        "the API receives the key brokerd injected for the pod's agent"
    );
    assert!(
        printed.lines().any(|l| l == "dns 5"),
        "a name the pod's policy does not allow is REFUSED by brokerd's DNS in the pod: {printed}"
    );

    let of_pod = |r: &AuditEvent| r.pod.as_ref().is_some_and(|p| p.uid == pod.id);
    let request = broker.wait_record("a request record naming the pod", NOTICE, |r| {
        of_pod(r) && r.kind == Some(EventKind::Request) && r.status == Some(200)
    });
    // The agent container's cgroup is below the pod's: a sub-agent of the pod's tag, governed by
    // the policy of agents/<label>.
    let agent_container = pod
        .agent()
        .cgroup
        .trim_start_matches(&format!("{}/", pod.cgroup))
        .to_string();
    assert_eq!(
        request.cgroup.as_deref(),
        Some(format!("{tag_name}/{agent_container}").as_str())
    );
    assert_eq!(
        request.pod.as_ref().map(|p| p.name.as_str()),
        Some(pod.name.as_str())
    );
    assert!(
        request
            .cgroup_path
            .as_deref()
            .is_some_and(|p| p.starts_with(&pod.cgroup)),
        "the record keeps the real cgroup path: {request:?}"
    );
    broker.wait_record("the pod source's attach, with the pod", NOTICE, |r| {
        of_pod(r) && r.kind == Some(EventKind::Attach)
    });

    // Removing the pod untags it.
    let cgroup = pod.cgroup.clone();
    let id = pod.id.clone();
    drop(pod);
    wait_for(
        &format!("brokerd's pod source should untag removed pod {id}"),
        NOTICE,
        || broker.tag_name_of(&cgroup).is_none(),
    );
    broker.wait_record("the untag, with the pod", NOTICE, |r| {
        r.kind == Some(EventKind::Detach) && r.pod.as_ref().is_some_and(|p| p.uid == id)
    });
    drop(unlabelled);
}

/// The kube source, against a mock of the API server (there is none here; see
/// `agent_broker_tests::kube_api`) and a pod laid out as the kubelet lays it out with the
/// cgroupfs driver (`kubepods/besteffort/pod<uid>/<container id>`, below the test's cgroup), with
/// a process in a network namespace of its own: brokerd finds the pod's cgroup from its UID, tags
/// it under `agents/<label>`, serves its namespace, audits it with the pod's namespace, name and
/// UID, and untags it when the API server no longer lists it. Pods of another node and pods
/// without the label are not tagged.
#[test]
fn a_labelled_kubernetes_pod_of_this_node_is_tagged_by_the_kube_source_and_released() {
    require_privileges();
    let mut api = FakeKubeApi::start();
    let cg = TestCgroup::new();
    let n = std::process::id();
    let uid = format!("{n:08x}-0000-4000-8000-00000000000a");
    let unlabelled_uid = format!("{n:08x}-0000-4000-8000-00000000000b");
    let pod_cgroup = cg.create_child(&format!("kubepods/besteffort/pod{uid}"));
    let container = cg.create_child(&format!("kubepods/besteffort/pod{uid}/{}", "c".repeat(64)));
    let unlabelled_cgroup = cg.create_child(&format!("kubepods/besteffort/pod{unlabelled_uid}"));
    let netns = TestNetns::new();
    let mut sleeper = spawn_in_cgroup(&container, netns.command("sleep").arg("600"));
    // A second container of the same pod, in the same namespace.
    let sidecar_container =
        cg.create_child(&format!("kubepods/besteffort/pod{uid}/{}", "e".repeat(64)));
    let mut sidecar = spawn_in_cgroup(&sidecar_container, netns.command("sleep").arg("600"));
    let label = unique_name();
    // The namespace is part of the agent: a pod in another namespace with the same label is
    // another agent.
    let agent = format!("agents/team-a/{label}");
    let replica_uid = format!("{n:08x}-0000-4000-8000-00000000000c");
    let replica_cgroup = cg.create_child(&format!("kubepods/besteffort/pod{replica_uid}"));
    let replica_container = cg.create_child(&format!(
        "kubepods/besteffort/pod{replica_uid}/{}",
        "d".repeat(64)
    ));
    let replica_netns = TestNetns::new();
    let mut replica = spawn_in_cgroup(
        &replica_container,
        replica_netns.command("sleep").arg("600"),
    );

    let mut broker = Broker::builder()
        .arg("--pod-source")
        .arg("kube")
        .env("KUBECONFIG", &api.kubeconfig().display().to_string())
        .env("NODE_NAME", "abtest-node")
        .policy("pod", &format!("cgroup = \"{agent}\"\n"))
        .start();
    let labels = serde_json::json!({ AGENT_LABEL: label });
    let labels_again = labels.clone();
    api.set_pods(&[
        kube_pod("team-a", "coder-0", &uid, "abtest-node", labels.clone()),
        // A replica of the same agent: a sibling tag, not a second claim on one name.
        kube_pod(
            "team-a",
            "coder-2",
            &replica_uid,
            "abtest-node",
            labels.clone(),
        ),
        // Same label, another node: its watch never shows it here.
        kube_pod(
            "team-a",
            "coder-1",
            "11111111-2222-4333-8444-555555555555",
            "other-node",
            labels,
        ),
        kube_pod(
            "team-a",
            "web-0",
            &unlabelled_uid,
            "abtest-node",
            serde_json::json!({}),
        ),
    ]);
    wait_for(
        &format!("brokerd's kube source should tag pod {uid} ({pod_cgroup})"),
        NOTICE,
        || broker.tag_name_of(&pod_cgroup).is_some(),
    );
    let tag_name = format!("{agent}/coder-0");
    assert_eq!(
        broker.tag_name_of(&pod_cgroup),
        Some(Some(tag_name.clone()))
    );
    wait_for("the replica should be tagged too", NOTICE, || {
        broker.tag_name_of(&replica_cgroup).is_some()
    });
    assert_eq!(
        broker.tag_name_of(&replica_cgroup),
        Some(Some(format!("{agent}/coder-2")))
    );
    assert_eq!(broker.tag_name_of(&unlabelled_cgroup), None);
    let status = broker.status();
    assert_eq!(
        status.cgroups.len(),
        2,
        "only the labelled pods of this node are tagged: {:?}",
        status.cgroups
    );
    let served_through = status
        .workloads
        .iter()
        .find(|w| w.tag == pod_cgroup)
        .map(|w| w.pid)
        .unwrap_or_else(|| {
            panic!(
                "brokerd serves the pod's network namespace: {:?}",
                status.workloads
            )
        });
    assert!(
        [sleeper.id(), sidecar.id()].contains(&served_through),
        "through one of the pod's processes"
    );
    // The container it is served through exits: the pod's other container still runs in the
    // namespace, so it stays served (through that one), not released.
    let (gone, stays) = if served_through == sleeper.id() {
        (&mut sleeper, sidecar.id())
    } else {
        (&mut sidecar, sleeper.id())
    };
    let _ = gone.kill();
    let _ = gone.wait();
    wait_for(
        "the namespace should stay served through the pod's other container",
        NOTICE,
        || {
            broker
                .status()
                .workloads
                .iter()
                .any(|w| w.tag == pod_cgroup && w.pid == stays)
        },
    );
    let attach = broker.wait_record("the kube source's attach", NOTICE, |r| {
        r.kind == Some(EventKind::Attach) && r.pod.as_ref().is_some_and(|p| p.uid == uid)
    });
    let pod = attach.pod.as_ref().unwrap_or_else(|| panic!("{attach:?}"));
    assert_eq!(
        (pod.namespace.as_str(), pod.name.as_str(), pod.uid.as_str()),
        ("team-a", "coder-0", uid.as_str())
    );
    assert_eq!(attach.cgroup.as_deref(), Some(tag_name.as_str()));
    assert_eq!(attach.cgroup_path.as_deref(), Some(pod_cgroup.as_str()));

    // brokerd is killed, and while it is down the replica loses its label: the next brokerd
    // remembers the pods its source tagged, so it untags the replica and keeps coder-0.
    broker.kill9();
    api.set_pods(&[
        kube_pod(
            "team-a",
            "coder-0",
            &uid,
            "abtest-node",
            labels_again.clone(),
        ),
        kube_pod(
            "team-a",
            "coder-2",
            &replica_uid,
            "abtest-node",
            serde_json::json!({}),
        ),
    ]);
    broker.restart();
    wait_for(
        "the restarted brokerd should untag the replica whose label was removed while it was down",
        NOTICE,
        || broker.tag_name_of(&replica_cgroup).is_none(),
    );
    assert_eq!(
        broker.tag_name_of(&pod_cgroup),
        Some(Some(tag_name.clone()))
    );

    // The pod is deleted: the source untags it.
    api.set_pods(&[]);
    wait_for(
        &format!("brokerd's kube source should untag deleted pod {uid}"),
        NOTICE,
        || broker.tag_name_of(&pod_cgroup).is_none(),
    );
    broker.wait_record("the untag, with the pod", NOTICE, |r| {
        r.kind == Some(EventKind::Detach) && r.pod.as_ref().is_some_and(|p| p.uid == uid)
    });
    for child in [&mut sleeper, &mut sidecar, &mut replica] {
        let _ = child.kill();
        let _ = child.wait();
    }
}
