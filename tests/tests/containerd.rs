//! containerd as a runtime of `brokerctl attach --container` (`--runtime containerd`), with a real
//! containerd of the test's own (`tests/src/containerd.rs`), containers run with `ctr run` and no
//! registry.
//!
//! - The brokered case: a container tagged by its ID (`--runtime containerd --namespace NS
//!   --address SOCK`) under a stable agent name calls the HTTPS API through brokerd (listeners in
//!   its own network namespace, which has only `lo`) and gets the key injected; the secret
//!   appears in no output.
//! - `attach --container` says clearly why it cannot tag: no such container in the namespace, the
//!   right container in another namespace, a stopped task, no containerd at the socket, and
//!   `--namespace` without `--runtime containerd`.
//! - The harness itself: the container's cgroup and network namespace (only `lo`), and that Drop
//!   stops containerd and removes its tasks, containers, cgroups and dirs.

use std::{
    net::{IpAddr, SocketAddr},
    path::PathBuf,
    process::Output,
};

use agent_broker_tests::{
    Broker, Canary, SHORT, TestCa, TestHost, TestUpstream, UpstreamOptions, attached_programs,
    cgroup2_mount,
    containerd::Containerd,
    require_privileges, run_with_timeout,
    world::{API, SECRET_NAME, rule},
};

/// Run inside the container: `python3 -c CLIENT_PY <api ip> <api port> <placeholder> <ca
/// file>`. HTTPS to the API as api.example.test, `GET /hash` with the placeholder as bearer
/// token; prints one JSON object `{"api": "ok <status> <body>"}` or the error.
const CLIENT_PY: &str = r#"
import http.client, json, socket, ssl, sys
api_ip, api_port, placeholder, cafile = sys.argv[1:5]
def https(host):
    ctx = ssl.create_default_context(cafile=cafile)
    class Conn(http.client.HTTPSConnection):
        def connect(self):
            raw = socket.create_connection((api_ip, int(api_port)), timeout=5)
            self.sock = ctx.wrap_socket(raw, server_hostname=host)
    c = Conn(host, int(api_port), context=ctx, timeout=10)
    c.request("GET", "/hash", headers={"Authorization": "Bearer " + placeholder})
    r = c.getresponse()
    return "ok %d %s" % (r.status, r.read().decode("latin-1"))
try:
    out = {"api": https("api.example.test")}
except Exception as e:
    out = {"api": type(e).__name__ + ": " + str(e)}
print(json.dumps(out), flush=True)
"#;

/// The agent name the brokered container runs under (`attach --as`).
const AGENT_NAME: &str = "agents/containerd";

fn stderr_of(out: &Output) -> String {
    String::from_utf8_lossy(&out.stderr).into_owned()
}

/// A container run by containerd, tagged by ID with `--runtime containerd`, calls the HTTPS API
/// through brokerd from its own network namespace and gets the key injected.
#[test]
fn containerd_container_tagged_by_id_is_brokered_with_an_injected_key() {
    require_privileges();
    let containerd = Containerd::start();
    let task = containerd.run(&["sleep", "600"]);
    let host = TestHost::start();
    let root_ip = host.root_ip();
    let ca = TestCa::new("abtest containerd upstream CA");
    let mut options = UpstreamOptions::api();
    options.ip = IpAddr::V4(root_ip);
    options.plain = false;
    let api = TestUpstream::start(&ca, options);
    let broker = Broker::builder()
        .upstream_ca(ca.pem_path())
        .name(API, root_ip)
        .policy(
            "containerd",
            &format!("cgroup = \"{AGENT_NAME}\"\n{}", rule(API, api.port(), true)),
        )
        .start();
    let secret = Canary::new();
    broker.secret_set(SECRET_NAME, secret.expose().as_bytes());
    let placeholder = Canary::with_prefix("abtest-placeholder-");
    api.watch_for("secret", &secret);
    api.watch_for("placeholder", &placeholder);
    std::fs::copy(
        broker.export_ca(),
        containerd.share_dir().join("broker-ca.pem"),
    )
    .unwrap_or_else(|e| panic!("cannot copy the broker CA for the container: {e}"));

    let address = containerd.address.display().to_string();
    let out = broker.ctl_ok(&[
        "attach",
        "--container",
        &task.id,
        "--runtime",
        "containerd",
        "--namespace",
        &containerd.namespace,
        "--address",
        &address,
        "--as",
        AGENT_NAME,
    ]);
    assert!(
        out.contains(&format!("process {}", task.pid)) && out.contains("serving network namespace"),
        "attach --container should find the task's pid {} and open brokerd's listeners in its \
         namespace: {out}",
        task.pid
    );
    let status = broker.status();
    assert!(
        status.cgroups.iter().any(|c| c.path == task.cgroup),
        "brokerd should list the container's cgroup {} as tagged: {:?}",
        task.cgroup,
        status.cgroups
    );
    assert!(
        !attached_programs(&task.cgroup).is_empty(),
        "no program is attached to the container's cgroup {}",
        task.cgroup
    );

    let (api_ip, api_port) = (api.addr().ip().to_string(), api.addr().port().to_string());
    let out = run_with_timeout(
        &mut task.exec(&[
            "python3",
            "-c",
            CLIENT_PY,
            &api_ip,
            &api_port,
            placeholder.expose(),
            "/ct/broker-ca.pem",
        ]),
        SHORT * 4,
    );
    let raw = String::from_utf8_lossy(&out.stdout).trim().to_string();
    secret.assert_absent(&out.stdout, "the container's output");
    secret.assert_absent(&out.stderr, "the container's stderr");
    assert!(
        out.status.success(),
        "the client in the container failed ({}): {raw}\n{}",
        out.status,
        stderr_of(&out)
    );
    let report: serde_json::Value =
        serde_json::from_str(&raw).unwrap_or_else(|e| panic!("the client printed {raw:?}: {e}"));
    let api_call = report["api"].as_str().unwrap_or_default();
    assert!(
        api_call.starts_with("ok 200 "),
        "allowed call through brokerd: {raw}\nbrokerd's log:\n{}",
        broker.log()
    );
    let body: serde_json::Value =
        serde_json::from_str(api_call.trim_start_matches("ok 200 ")).unwrap_or_default();
    assert_eq!(
        body["authorization_sha256"].as_str(),
        Some(secret.sha256_with_prefix("Bearer ").as_str()),
        "the API must receive `Bearer <{SECRET_NAME}>`, injected by brokerd: {raw}"
    );
    api.assert_injected_by("the container's call", "/hash", broker.pid());
    let conn = broker.wait_connection("containerd call", |c| {
        c.origin.as_ref().is_some_and(|o| {
            [task.cgroup.as_str(), AGENT_NAME].contains(&o.cgroup.trim_start_matches('/'))
                && o.original_dst == SocketAddr::new(IpAddr::V4(root_ip), api.port())
        })
    });
    assert!(conn.origin.is_some(), "{conn:?}");
    secret.assert_absent(containerd.log().as_bytes(), "containerd's log");
    secret.assert_absent(&broker.log_bytes(), "brokerd's log");
    secret.assert_absent(&broker.transcript(), "brokerctl's output");
}

/// `attach --container --runtime containerd` fails, tagging nothing, and says why.
#[test]
fn attach_containerd_says_why_it_cannot_tag() {
    require_privileges();
    let containerd = Containerd::start();
    let broker = Broker::start();
    let address = containerd.address.display().to_string();
    let attach = |id: &str, namespace: &str, address: &str| {
        broker.ctl_output(&[
            "attach",
            "--container",
            id,
            "--runtime",
            "containerd",
            "--namespace",
            namespace,
            "--address",
            address,
        ])
    };

    let out = attach("abtest-no-such-container", &containerd.namespace, &address);
    assert!(!out.status.success(), "attach of a missing container");
    assert!(
        stderr_of(&out).contains(&format!(
            "containerd has no task for container \"abtest-no-such-container\" in namespace \
             \"{}\"",
            containerd.namespace
        )),
        "missing container: {}",
        stderr_of(&out)
    );

    let task = containerd.run(&["sleep", "600"]);
    let out = attach(&task.id, "abtest-other-namespace", &address);
    assert!(!out.status.success(), "attach in the wrong namespace");
    assert!(
        stderr_of(&out).contains("in namespace \"abtest-other-namespace\""),
        "wrong namespace: {}",
        stderr_of(&out)
    );

    // The environment names the socket and namespace when the options do not.
    let mut cmd = broker.ctl();
    cmd.env("CONTAINERD_ADDRESS", &address)
        .env("CONTAINERD_NAMESPACE", "abtest-env-namespace")
        .args(["attach", "--container", &task.id, "--runtime", "containerd"]);
    let out = run_with_timeout(&mut cmd, SHORT);
    assert!(
        stderr_of(&out).contains("in namespace \"abtest-env-namespace\""),
        "CONTAINERD_NAMESPACE: {}",
        stderr_of(&out)
    );

    let nowhere = containerd.share_dir().join("no-containerd.sock");
    let out = attach(
        &task.id,
        &containerd.namespace,
        &nowhere.display().to_string(),
    );
    assert!(
        !out.status.success(),
        "attach with no containerd at the socket"
    );
    assert!(
        stderr_of(&out).contains(&format!("ctr --address {}", nowhere.display())),
        "no containerd: {}",
        stderr_of(&out)
    );

    let out = broker.ctl_output(&[
        "attach",
        "--container",
        &task.id,
        "--runtime",
        "podman",
        "--namespace",
        &containerd.namespace,
    ]);
    assert!(
        !out.status.success()
            && stderr_of(&out).contains("--namespace and --address are for --runtime containerd"),
        "--namespace with podman: {}",
        stderr_of(&out)
    );

    task.stop();
    let out = attach(&task.id, &containerd.namespace, &address);
    assert!(!out.status.success(), "attach of a stopped task");
    assert!(
        stderr_of(&out).contains(&format!(
            "containerd task \"{}\" (namespace \"{}\") is STOPPED, not running",
            task.id, containerd.namespace
        )),
        "stopped task: {}",
        stderr_of(&out)
    );
    assert!(
        broker
            .status()
            .cgroups
            .iter()
            .all(|c| c.path != task.cgroup),
        "nothing may be tagged after failed attaches"
    );
}

/// The harness: a container of its own containerd has a cgroup `<namespace>/<id>` and a network
/// namespace with only `lo`; Drop leaves no task, process, cgroup or dir behind.
#[test]
fn containerd_harness_runs_isolated_containers_and_cleans_up() {
    require_privileges();
    let containerd = Containerd::start();
    let dir: PathBuf = containerd
        .address
        .parent()
        .map(PathBuf::from)
        .unwrap_or_default();
    let containerd_pid = containerd.pid();
    let namespace = containerd.namespace.clone();
    let (cgroup, pid) = {
        let task = containerd.run(&["sleep", "600"]);
        assert_eq!(
            task.cgroup,
            format!("{}/{}", containerd.namespace, task.id),
            "the runc shim puts the container in /<namespace>/<id>"
        );
        let own_netns = std::fs::read_link("/proc/self/ns/net")
            .map(|p| p.display().to_string())
            .unwrap_or_default();
        assert_ne!(
            task.netns, own_netns,
            "the container has a netns of its own"
        );
        let out = run_with_timeout(
            &mut task.exec(&[
                "python3",
                "-c",
                "import socket; print(' '.join(n for _, n in socket.if_nameindex()))",
            ]),
            SHORT,
        );
        assert_eq!(
            String::from_utf8_lossy(&out.stdout).trim(),
            "lo",
            "the container's only interface: {}",
            stderr_of(&out)
        );
        assert!(task.exists());
        (task.cgroup.clone(), task.pid)
    };
    assert!(containerd.tasks().is_empty(), "Drop of the task deletes it");
    assert!(
        !std::path::Path::new(&format!("/proc/{pid}")).exists(),
        "the container's process is gone"
    );
    assert!(
        !cgroup2_mount().join(&cgroup).exists(),
        "the container's cgroup {cgroup} is removed"
    );
    drop(containerd);
    assert!(
        !std::path::Path::new(&format!("/proc/{containerd_pid}")).exists(),
        "containerd (pid {containerd_pid}) is stopped"
    );
    assert!(!dir.exists(), "{} is removed", dir.display());
    for root in std::fs::read_dir("/sys/fs/cgroup")
        .map(|e| e.flatten().map(|e| e.path()).collect::<Vec<_>>())
        .unwrap_or_default()
        .into_iter()
        .chain([cgroup2_mount().to_path_buf()])
    {
        assert!(
            !root.join(&namespace).exists(),
            "cgroup dir {} is removed",
            root.join(&namespace).display()
        );
    }
}
