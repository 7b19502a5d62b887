//! Issue 14: brokerd's pod source. A `podman kube play` pod labelled
//! `agent-broker.io/agent=<name>` is tagged by brokerd itself (`--pod-source podman:SOCKET`,
//! podman's REST API) under the agent name `agents/<name>`, brokered in its own network
//! namespace with the key its policy injects, named in the audit records (pod name and id), and
//! untagged when the pod is removed. A pod without the label is never tagged.

use std::{
    net::{IpAddr, Ipv4Addr},
    time::{Duration, Instant},
};

use agent_broker_protocol::{AuditEvent, EventKind};
use agent_broker_tests::{
    Broker, Canary, SHORT, TestCa, TestHost, TestUpstream, UpstreamOptions,
    container::{AGENT_LABEL, Podman},
    require_privileges, run_with_timeout, unique_name,
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

fn wait_for(what: &str, mut done: impl FnMut() -> bool) {
    let deadline = Instant::now() + NOTICE;
    while !done() {
        assert!(Instant::now() < deadline, "{what} within {NOTICE:?}");
        std::thread::sleep(Duration::from_millis(200));
    }
}

fn tag_of(broker: &Broker, cgroup: &str) -> Option<Option<String>> {
    broker
        .status()
        .cgroups
        .into_iter()
        .find(|c| c.path == cgroup)
        .map(|c| c.name)
}

#[test]
fn a_labelled_pod_is_tagged_by_brokerds_pod_source_brokered_and_released() {
    require_privileges();
    let podman = Podman::new();
    let api_service = podman.api_service();
    // A label value of this run only, so pods of other runs never match the policy.
    let label = unique_name();
    let agent = format!("agents/{label}");

    let host = TestHost::start();
    let root_ip = match host.addr().ip() {
        IpAddr::V4(ip) => {
            let [a, b, c, _] = ip.octets();
            Ipv4Addr::new(a, b, c, 1)
        }
        IpAddr::V6(ip) => panic!("TestHost has an IPv6 address {ip}"),
    };
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

    let unlabelled = podman.kube_play(&[("app", "abtest-unlabelled")], &["sleep", "600"]);
    let pod = podman.kube_play(&[(AGENT_LABEL, &label)], &["sleep", "600"]);
    wait_for(
        &format!(
            "brokerd's pod source should tag pod {} ({})",
            pod.name, pod.cgroup
        ),
        || tag_of(&broker, &pod.cgroup).is_some(),
    );
    assert_eq!(
        tag_of(&broker, &pod.cgroup),
        Some(Some(agent.clone())),
        "the pod's cgroup runs under agents/<label>"
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
        tag_of(&broker, &unlabelled.cgroup),
        None,
        "a pod without {AGENT_LABEL} is never tagged"
    );

    let out = run_with_timeout(
        pod.exec(&[
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

    let records = broker.audit_records();
    let of_pod = |r: &&AuditEvent| r.pod.as_ref().is_some_and(|p| p.uid == pod.id);
    let request = records
        .iter()
        .filter(of_pod)
        .find(|r| r.kind == Some(EventKind::Request) && r.status == Some(200))
        .unwrap_or_else(|| panic!("no request record names the pod {}: {records:?}", pod.id));
    assert_eq!(request.cgroup.as_deref(), Some(agent.as_str()));
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
    assert!(
        records
            .iter()
            .filter(of_pod)
            .any(|r| r.kind == Some(EventKind::Attach)),
        "the pod source's attach is audited with the pod: {records:?}"
    );

    // Removing the pod untags it.
    let cgroup = pod.cgroup.clone();
    let id = pod.id.clone();
    drop(pod);
    wait_for(
        &format!("brokerd's pod source should untag removed pod {id}"),
        || tag_of(&broker, &cgroup).is_none(),
    );
    let records = broker.audit_records();
    assert!(
        records
            .iter()
            .any(|r| r.kind == Some(EventKind::Detach)
                && r.pod.as_ref().is_some_and(|p| p.uid == id)),
        "the untag is audited with the pod: {records:?}"
    );
    drop(unlabelled);
}
