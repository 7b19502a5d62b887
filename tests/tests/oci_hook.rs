//! Issue 14: a pod tagged before its first process runs. podman runs `brokerctl oci-hook` at
//! the createRuntime stage (the shipped `deploy/oci-hooks/agent-broker.json`, in a hooks dir of
//! the test's own): a pod annotated `agent-broker.io/agent=<name>` is tagged by brokerd before
//! its container's process starts, so the very first call the process makes is brokered; with
//! brokerd down, such a pod does not start at all, while other pods are not affected. With a
//! pod source beside it, the source takes over the hook's tag (whatever the pod's hostname) and
//! untags the pod when it is removed.

use std::{
    net::IpAddr,
    path::Path,
    time::{Duration, Instant},
};

use agent_broker_protocol::{AuditEvent, EventKind};
use agent_broker_tests::{
    Broker, Canary, TestCa, TestHost, TestUpstream, UpstreamOptions, bin,
    container::{AGENT_LABEL, PodSpec, Podman},
    require_privileges, unique_name, wait_for,
    world::{API, SECRET_NAME, rule},
};

/// The pod's command: `python3 /ct/client.py <out> <api ip> <api port> <placeholder> <ca file>
/// <denied name>`, as the container's first process. It writes to `<out>` `api <status>
/// <body>` for an HTTPS `GET /hash` as api.example.test with the placeholder as bearer token
/// (or `api error <what>` when it cannot connect), then `dns <rcode>` for an A query of the
/// denied name to 127.0.0.1:53, then sleeps.
const CLIENT_PY: &str = r#"
import http.client, socket, ssl, struct, sys, time
out, api_ip, api_port, placeholder, cafile, denied = sys.argv[1:7]
lines = []
try:
    ctx = ssl.create_default_context(cafile=cafile)
    class Conn(http.client.HTTPSConnection):
        def connect(self):
            self.sock = ctx.wrap_socket(socket.create_connection((api_ip, int(api_port)), timeout=5),
                                        server_hostname="api.example.test")
    c = Conn("api.example.test", int(api_port), context=ctx, timeout=10)
    c.request("GET", "/hash", headers={"Authorization": "Bearer " + placeholder})
    r = c.getresponse()
    lines.append("api %d %s" % (r.status, r.read().decode("latin-1")))
except Exception as e:
    lines.append("api error %r" % (e,))
try:
    q = struct.pack(">HHHHHH", 0x4243, 0x0100, 1, 0, 0, 0)
    for label in denied.split("."):
        q += bytes([len(label)]) + label.encode()
    q += b"\0" + struct.pack(">HH", 1, 1)
    s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    s.settimeout(5)
    s.sendto(q, ("127.0.0.1", 53))
    lines.append("dns %d" % (s.recv(4096)[3] & 0xF))
except Exception as e:
    lines.append("dns error %r" % (e,))
with open(out + ".tmp", "w") as f:
    f.write("\n".join(lines) + "\n")
import os
os.rename(out + ".tmp", out)
time.sleep(600)
"#;

const WAIT: Duration = Duration::from_secs(60);

/// The file a pod's client wrote, once it is there.
fn client_output(path: &Path, broker: &Broker) -> String {
    wait_for(
        &format!(
            "the pod's first process should write {}; brokerd's log:\n{}",
            path.display(),
            broker.log()
        ),
        WAIT,
        || path.exists(),
    );
    std::fs::read_to_string(path).unwrap_or_default()
}

/// brokerd, a TLS API on a test host, and the policy of `agents/<label>` injecting the key.
struct World {
    broker: Broker,
    api: TestUpstream,
    secret: Canary,
    placeholder: Canary,
    root_ip: std::net::Ipv4Addr,
    _host: TestHost,
}

fn world(label: &str, pod_source: Option<&str>) -> World {
    let host = TestHost::start();
    let root_ip = host.root_ip();
    let ca = TestCa::new("abtest oci-hook upstream CA");
    let mut options = UpstreamOptions::api();
    options.ip = IpAddr::V4(root_ip);
    options.plain = false;
    let api = TestUpstream::start(&ca, options);
    let mut builder = Broker::builder();
    if let Some(source) = pod_source {
        builder = builder.arg("--pod-source").arg(source);
    }
    let broker = builder
        .upstream_ca(ca.pem_path())
        .name(API, root_ip)
        .policy(
            "pod",
            &format!(
                "cgroup = \"agents/{label}\"\n{}",
                rule(API, api.port(), true)
            ),
        )
        .start();
    let secret = Canary::new();
    broker.secret_set(SECRET_NAME, secret.expose().as_bytes());
    api.watch_for("secret", &secret);
    World {
        broker,
        api,
        secret,
        placeholder: Canary::with_prefix("abtest-placeholder-"),
        root_ip,
        _host: host,
    }
}

/// The pod's command: the client as its first process (see [`CLIENT_PY`]), writing `out` in
/// the share dir.
fn client_cmd(podman: &Podman, w: &World, out: &str) -> Vec<String> {
    std::fs::write(podman.share_dir().join("client.py"), CLIENT_PY)
        .unwrap_or_else(|e| panic!("cannot write the client: {e}"));
    std::fs::copy(
        w.broker.export_ca(),
        podman.share_dir().join("broker-ca.pem"),
    )
    .unwrap_or_else(|e| panic!("cannot copy the broker CA for the pod: {e}"));
    [
        "python3",
        "/ct/client.py",
        &format!("/ct/{out}"),
        &w.root_ip.to_string(),
        &w.api.port().to_string(),
        w.placeholder.expose(),
        "/ct/broker-ca.pem",
        "denied.example.test",
    ]
    .iter()
    .map(|s| s.to_string())
    .collect()
}

/// The client's output says: the API answered 200 with the key brokerd injected, and the
/// denied name was REFUSED by brokerd's DNS in the pod.
fn assert_brokered(printed: &str, w: &World) {
    w.secret
        .assert_absent(printed.as_bytes(), "the pod's output");
    let api_line = printed
        .lines()
        .find(|l| l.starts_with("api "))
        .unwrap_or("");
    assert!(
        api_line.starts_with("api 200 "),
        "the pod's first process could not call the API through brokerd: {printed}\nbrokerd's log:\n{}",
        w.broker.log()
    );
    let body: serde_json::Value =
        serde_json::from_str(api_line.trim_start_matches("api 200 ")).unwrap_or_default();
    assert_eq!(
        body["authorization_sha256"].as_str(),
        Some(w.secret.sha256_with_prefix("Bearer ").as_str()),
        "the API receives the key brokerd injected for the pod's agent"
    );
    assert!(
        printed.lines().any(|l| l == "dns 5"),
        "a name the policy does not allow is REFUSED by brokerd's DNS in the pod: {printed}"
    );
}

#[test]
fn an_annotated_pod_is_tagged_by_the_oci_hook_before_its_first_process_runs() {
    require_privileges();
    let label = unique_name();
    // No pod source: the hook alone tags the pod.
    let w = world(&label, None);
    let podman = Podman::with_oci_hook(&bin("brokerctl"), &w.broker.run_dir());
    let cmd = client_cmd(&podman, &w, "first-call.txt");
    let cmd: Vec<&str> = cmd.iter().map(String::as_str).collect();
    let (pod, started) = podman.try_kube_play(&PodSpec {
        labels: &[(AGENT_LABEL, &label)],
        annotations: &[(AGENT_LABEL, &label)],
        cmd: &cmd,
        ..PodSpec::default()
    });
    if let Err(e) = started {
        panic!("{e}\nbrokerd's log:\n{}", w.broker.log());
    }
    // Its network namespace has only `lo`: untagged, the client's connect would fail at once
    // (ENETUNREACH), and nothing would answer DNS.
    let printed = client_output(&podman.share_dir().join("first-call.txt"), &w.broker);
    assert_brokered(&printed, &w);

    // podman gives a pod's containers the pod's name as hostname; the hook names the pod by it.
    let tag_name = format!("agents/{label}/{}", pod.name);
    assert_eq!(
        w.broker.tag_name_of(&pod.cgroup),
        Some(Some(tag_name.clone())),
        "the pod's cgroup ({}) runs as agents/<label>/<pod name>",
        pod.cgroup
    );
    let of_pod = |r: &AuditEvent| r.pod.as_ref().is_some_and(|p| p.uid == pod.id);
    let attach = w
        .broker
        .wait_record("the hook's attach, naming the pod", WAIT, |r| {
            of_pod(r) && r.kind == Some(EventKind::Attach)
        });
    assert_eq!(attach.cgroup.as_deref(), Some(tag_name.as_str()));
    let request = w
        .broker
        .wait_record("the first call's record, naming the pod", WAIT, |r| {
            of_pod(r) && r.kind == Some(EventKind::Request) && r.status == Some(200)
        });
    assert!(
        request
            .cgroup
            .as_deref()
            .is_some_and(|c| c.starts_with(&format!("{tag_name}/"))),
        "the call runs as a sub-agent of the pod's tag: {request:?}"
    );
    assert_eq!(
        request.pod.as_ref().map(|p| p.name.as_str()),
        Some(pod.name.as_str())
    );
}

#[test]
fn with_brokerd_down_an_annotated_pod_does_not_start_and_other_pods_do() {
    require_privileges();
    // A run dir with no brokerd behind it.
    let run_dir = tempfile::tempdir().unwrap_or_else(|e| panic!("cannot make a run dir: {e}"));
    let podman = Podman::with_oci_hook(&bin("brokerctl"), run_dir.path());
    let marker = |name: &str| {
        vec![
            "sh".to_string(),
            "-c".to_string(),
            format!("touch /ct/{name}; exec sleep 600"),
        ]
    };
    let label = unique_name();
    let cmd = marker("agent-ran");
    let cmd: Vec<&str> = cmd.iter().map(String::as_str).collect();
    let (agent_pod, started) = podman.try_kube_play(&PodSpec {
        labels: &[(AGENT_LABEL, &label)],
        annotations: &[(AGENT_LABEL, &label)],
        cmd: &cmd,
        ..PodSpec::default()
    });
    let Err(error) = started else {
        panic!("an annotated pod started while brokerd was down")
    };
    assert!(
        error.contains("brokerd did not tag it"),
        "podman reports the hook's reason: {error}"
    );
    let cmd = marker("other-ran");
    let cmd: Vec<&str> = cmd.iter().map(String::as_str).collect();
    let other = podman.kube_play(&[("tier", "abtest-unannotated")], &cmd);
    let other_marker = podman.share_dir().join("other-ran");
    let deadline = Instant::now() + WAIT;
    while !other_marker.exists() {
        assert!(
            Instant::now() < deadline,
            "a pod without the annotation should start and run while brokerd is down"
        );
        std::thread::sleep(Duration::from_millis(100));
    }
    assert!(
        !podman.share_dir().join("agent-ran").exists(),
        "the annotated pod's process must never have run"
    );
    drop(other);
    drop(agent_pod);
}

#[test]
fn a_pod_source_takes_over_the_hooks_tag_and_untags_the_pod_when_it_goes() {
    require_privileges();
    let label = unique_name();
    let podman_for_api = Podman::new();
    let api_service = podman_for_api.api_service();
    let source = format!("podman:{}", api_service.socket.display());
    let w = world(&label, Some(&source));
    let podman = Podman::with_oci_hook(&bin("brokerctl"), &w.broker.run_dir());
    let cmd = client_cmd(&podman, &w, "with-source.txt");
    let cmd: Vec<&str> = cmd.iter().map(String::as_str).collect();
    // A hostname other than the pod's name: the hook's tag is named by it, and the source,
    // which names pods by their name, keeps the tag as it is.
    let hostname = format!("host-{label}");
    let (pod, started) = podman.try_kube_play(&PodSpec {
        labels: &[(AGENT_LABEL, &label)],
        annotations: &[(AGENT_LABEL, &label)],
        hostname: Some(&hostname),
        cmd: &cmd,
    });
    if let Err(e) = started {
        panic!("{e}\nbrokerd's log:\n{}", w.broker.log());
    }
    let printed = client_output(&podman.share_dir().join("with-source.txt"), &w.broker);
    assert_brokered(&printed, &w);
    let tag_name = format!("agents/{label}/{hostname}");
    assert_eq!(
        w.broker.tag_name_of(&pod.cgroup),
        Some(Some(tag_name.clone()))
    );
    // The source lists the pod (every 2 s at most) and keeps the tag: no failure is logged,
    // and the tag is unchanged.
    std::thread::sleep(Duration::from_secs(5));
    assert_eq!(
        w.broker.tag_name_of(&pod.cgroup),
        Some(Some(tag_name.clone()))
    );
    let log = w.broker.log();
    assert!(
        !log.contains("pod not (un)tagged"),
        "the pod source failed on the hook's tag:\n{log}"
    );

    let cgroup = pod.cgroup.clone();
    let id = pod.id.clone();
    drop(pod);
    wait_for(
        &format!("brokerd's pod source should untag removed pod {id}"),
        WAIT,
        || w.broker.tag_name_of(&cgroup).is_none(),
    );
    w.broker.wait_record("the untag, with the pod", WAIT, |r| {
        r.kind == Some(EventKind::Detach) && r.pod.as_ref().is_some_and(|p| p.uid == id)
    });
}

#[test]
fn an_annotated_container_outside_a_pod_is_tagged_itself_before_it_runs() {
    require_privileges();
    let label = unique_name();
    let w = world(&label, None);
    let podman = Podman::with_oci_hook(&bin("brokerctl"), &w.broker.run_dir());
    let cmd = client_cmd(&podman, &w, "container.txt");
    let cmd: Vec<&str> = cmd.iter().map(String::as_str).collect();
    let container = podman.run_annotated(&[(AGENT_LABEL, &label)], &cmd);
    let printed = client_output(&podman.share_dir().join("container.txt"), &w.broker);
    assert_brokered(&printed, &w);
    let short: String = container.id.chars().take(12).collect();
    assert_eq!(
        w.broker.tag_name_of(&container.cgroup),
        Some(Some(format!("agents/{label}/{short}"))),
        "the container's own cgroup ({}) runs as agents/<label>/<short id>",
        container.cgroup
    );
}
