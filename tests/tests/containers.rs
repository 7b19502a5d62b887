//! Issue 14: real containers (Podman, `--network none`) and `podman kube play` pods.
//!
//! - A container tagged by name (`brokerctl attach --container`) reaches nothing on the host: not
//!   a loopback service, not the HTTPS API. Today the kernel refuses every connect of another
//!   network namespace (EPERM); once brokerd opens listeners in the container's namespace, the
//!   container's calls go to brokerd, which refuses what no policy allows. Either way nothing
//!   arrives, and this test holds both before and after. The same for a labelled `podman kube
//!   play` pod tagged by its pod cgroup.
//! - The brokered case: the container, attached by name under a stable agent name (`--as`),
//!   calls the HTTPS API through brokerd (listeners in its own network namespace) with an
//!   injected key, gets 403 for an unallowed host and REFUSED for an unallowed DNS name.
//! - kill -9 of brokerd while a brokered container calls in a loop: refused (ECONNREFUSED),
//!   never direct; restarted with the same state and pin dirs, brokerd serves the container's
//!   namespace again with no new attach (the same loop gets the key injected again).
//! - Two containers under two agent names whose clients bind the same loopback source port:
//!   each call is attributed to its own agent and container cgroup, and decided by its own
//!   policy (its own key; 403 where only the other agent is allowed).
//! - `podman rm -f` of an attached container releases its namespace: gone from `status`, its
//!   `NETNS_LISTENERS` entry deleted, the release audited under the agent's name.
//! - `brokerctl attach --container` says clearly why it cannot tag: no such container, a
//!   stopped one, a runtime that is not installed.
//! - The container harness itself: a container's and a pod's cgroup, network namespace (only
//!   `lo`) and labels, and that Drop removes them.

use std::{
    net::{IpAddr, Ipv4Addr, SocketAddr},
    path::Path,
    process::Output,
};

use agent_broker_protocol::{AuditEvent, Decision, RequestOutcome, StatusReport, WorkloadStatus};
use agent_broker_tests::{
    Broker, Canary, SHORT, TestCa, TestHost, TestServer, TestUpstream, UpstreamOptions,
    attached_programs,
    bpf::pinned_map_entries,
    cgroup::cgroup_dir,
    container::{AGENT_LABEL, Container, Podman, netns_of},
    poll_until, require_privileges, run_with_timeout,
    world::{API, OTHER, SECRET_NAME, World, rule},
};

/// Run inside a container: `python3 -c CLIENT_PY <service port> <api ip> <api port>
/// <placeholder> <ca file|-> <dns name>`. Tries, each on its own, and prints one JSON object with the outcome
/// of each (`ok ...` or the errno name / exception):
/// - `service`: TCP to 127.0.0.1:<service port>, sends `GET /container` and reads the answer;
/// - `api`: HTTPS to <api ip>:<api port> as api.example.test, `GET /hash` with the
///   placeholder as bearer token; `other`: the same as other.example.test;
/// - `dns`: an A query for <dns name> to 127.0.0.1:53 (loopback, never the host's resolver),
///   reporting the response code.
const CLIENT_PY: &str = r#"
import errno, http.client, json, os, socket, ssl, struct, sys
service_port, api_ip, api_port, placeholder, cafile, dns_name = sys.argv[1:7]
out = {"pid": os.getpid()}
def outcome(fn):
    try:
        return fn()
    except OSError as e:
        if e.errno is not None:
            return errno.errorcode.get(e.errno, str(e.errno))
        return type(e).__name__ + ": " + str(e)
    except Exception as e:
        return type(e).__name__ + ": " + str(e)
def service():
    s = socket.create_connection(("127.0.0.1", int(service_port)), timeout=5)
    s.sendall(b"GET /container HTTP/1.0\r\nHost: x\r\n\r\n")
    data = s.recv(4096)
    return "ok " + data.decode("latin-1") if data else "closed"
def https(host):
    ctx = ssl.create_default_context(cafile=None if cafile == "-" else cafile)
    class Conn(http.client.HTTPSConnection):
        def connect(self):
            raw = socket.create_connection((api_ip, int(api_port)), timeout=5)
            self.sock = ctx.wrap_socket(raw, server_hostname=host)
    c = Conn(host, int(api_port), context=ctx, timeout=10)
    c.request("GET", "/hash", headers={"Authorization": "Bearer " + placeholder})
    r = c.getresponse()
    return "ok %d %s" % (r.status, r.read().decode("latin-1"))
def dns():
    q = struct.pack(">HHHHHH", 0x4242, 0x0100, 1, 0, 0, 0)
    for label in dns_name.split("."):
        q += bytes([len(label)]) + label.encode()
    q += b"\0" + struct.pack(">HH", 1, 1)
    s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    s.settimeout(5)
    s.sendto(q, ("127.0.0.1", 53))
    r = s.recv(4096)
    return "ok rcode %d" % (r[3] & 0xF)
out["service"] = outcome(service)
out["api"] = outcome(lambda: https("api.example.test"))
out["other"] = outcome(lambda: https("other.example.test"))
out["dns"] = outcome(dns)
print(json.dumps(out), flush=True)
"#;

/// The agent name the brokered container runs under (`attach --as`).
const AGENT_NAME: &str = "agents/container";

/// What [`CLIENT_PY`] printed.
struct Report {
    json: serde_json::Value,
    raw: String,
}

impl Report {
    fn get(&self, what: &str) -> &str {
        self.json[what]
            .as_str()
            .unwrap_or_else(|| panic!("no {what} in the client's report: {}", self.raw))
    }
}

fn report_of(what: &str, out: &Output) -> Report {
    let raw = String::from_utf8_lossy(&out.stdout).trim().to_string();
    assert!(
        out.status.success(),
        "{what}: the client in the container failed ({}): {raw}\n{}",
        out.status,
        String::from_utf8_lossy(&out.stderr)
    );
    let json = serde_json::from_str(&raw)
        .unwrap_or_else(|e| panic!("{what}: the client printed {raw:?}: {e}"));
    Report { json, raw }
}

/// Runs [`CLIENT_PY`] in the container with `podman exec` (so in its cgroup and network
/// namespace).
fn run_client(
    podman_exec: &mut std::process::Command,
    what: &str,
    service_port: u16,
    api: SocketAddr,
    placeholder: &str,
    cafile: &str,
    dns_name: &str,
) -> Report {
    let service_port = service_port.to_string();
    let (api_ip, api_port) = (api.ip().to_string(), api.port().to_string());
    podman_exec.args([
        "python3",
        "-c",
        CLIENT_PY,
        &service_port,
        &api_ip,
        &api_port,
        placeholder,
        cafile,
        dns_name,
    ]);
    report_of(what, &run_with_timeout(podman_exec, SHORT * 4))
}

fn assert_tagged(broker: &Broker, cgroup: &str) {
    let status = broker.status();
    assert!(
        status.cgroups.iter().any(|c| c.path == cgroup),
        "brokerd should list the container's cgroup {cgroup} as tagged: {:?}",
        status.cgroups
    );
    assert!(
        !attached_programs(cgroup).is_empty(),
        "no program is attached to the container's cgroup {cgroup}"
    );
}

/// The tagged workload in cgroup `cgroup` reached nothing: every call of `report` failed (or was
/// brokerd's refusal), neither the host's loopback service nor the API saw anything, and the
/// tag was in force: the kernel refused the connects of the other namespace (today), or brokerd
/// received them and refused them (once it serves listeners there).
fn assert_reached_nothing(
    what: &str,
    world: &World,
    service: &TestServer,
    report: &Report,
    cgroup: &str,
    counted_before: u64,
) {
    for call in ["service", "api", "other"] {
        let outcome = report.get(call);
        assert!(
            !outcome.starts_with("ok ") || outcome.starts_with("ok 403"),
            "{what}, {call}: must be refused, got {outcome}: {}",
            report.raw
        );
    }
    let dns = report.get("dns");
    assert!(
        !dns.starts_with("ok ") || dns == "ok rcode 5",
        "{what}, DNS for a name no policy allows: refused or REFUSED, got {dns}"
    );
    assert!(
        service.accepted().is_empty(),
        "{what}: the host's loopback service must see nothing: {:?}",
        service.accepted()
    );
    assert!(
        world.api.requests().is_empty(),
        "{what}: the HTTPS API must receive nothing: {:#?}",
        world.api.requests()
    );
    let counters = world.broker.status().counters;
    let seen_by_brokerd = world.broker.connections().into_iter().any(|c| {
        c.origin.as_ref().is_some_and(|o| {
            let from = o.cgroup.trim_start_matches('/');
            from == cgroup || from.starts_with(&format!("{cgroup}/"))
        })
    });
    assert!(
        counters.netns_refused > counted_before || seen_by_brokerd,
        "{what}: its connects were neither refused in the kernel (netns refused \
         {counted_before} -> {}) nor seen by brokerd: {}",
        counters.netns_refused,
        report.raw
    );
}

/// A container with its own network namespace, tagged by name, reaches neither a loopback
/// service of the host nor the HTTPS API, and its DNS gets no answer from anywhere but brokerd.
/// No policy names the container, so this holds today (the kernel refuses another namespace)
/// and after brokerd serves listeners there (brokerd refuses what no policy allows).
#[test]
fn container_tagged_by_name_reaches_nothing_on_the_host() {
    require_privileges();
    let podman = Podman::new();
    let ct = podman.run(&["sleep", "600"]);
    assert_ne!(
        ct.netns,
        netns_of(std::process::id()),
        "the container must have a network namespace of its own"
    );
    let service = TestServer::echo("127.0.0.1:0");
    // The policy allows only the harness's own cgroup, not the container.
    let world = World::new();
    let ca_in_container = "/ct/broker-ca.pem";
    std::fs::copy(&world.broker_ca, podman.share_dir().join("broker-ca.pem"))
        .unwrap_or_else(|e| panic!("cannot copy the broker CA for the container: {e}"));
    let placeholder = world.placeholder.expose().to_string();

    // Before the attach the container's connects stay in its own namespace, where nothing
    // listens: refused there, and nothing reaches the host either.
    let before = run_client(
        &mut ct.exec(&[]),
        "untagged",
        service.addr().port(),
        world.api.addr(),
        &placeholder,
        ca_in_container,
        "denied.example.test",
    );
    assert_eq!(
        before.get("service"),
        "ECONNREFUSED",
        "untagged container: its 127.0.0.1 is its own loopback: {}",
        before.raw
    );

    let counted_before = world.broker.status().counters.netns_refused;
    let out = world.broker.ctl_ok(&["attach", "--container", &ct.name]);
    assert!(
        out.contains(&ct.cgroup) && out.contains(&ct.pid.to_string()),
        "attach --container should name the cgroup {} and pid {} it tagged: {out}",
        ct.cgroup,
        ct.pid
    );
    assert_tagged(&world.broker, &ct.cgroup);
    // By ID as well: the same cgroup, already tagged.
    let again = world.broker.ctl_ok(&["attach", "--container", &ct.id]);
    assert!(
        again.contains("already tagged") || again.contains("covered by tagged cgroup"),
        "attach by ID should find the cgroup tagged already: {again}"
    );

    let after = run_client(
        &mut ct.exec(&[]),
        "tagged",
        service.addr().port(),
        world.api.addr(),
        &placeholder,
        ca_in_container,
        "denied.example.test",
    );
    eprintln!(
        "untagged container: {}\ntagged container: {}",
        before.raw, after.raw
    );
    assert_reached_nothing(
        "tagged container",
        &world,
        &service,
        &after,
        &ct.cgroup,
        counted_before,
    );
    world.assert_no_secret_in_logs();
}

/// A `podman kube play` pod labelled `agent-broker.io/agent=...`, tagged by its pod cgroup
/// (which holds its containers and the infra container that owns its network namespace), reaches
/// nothing on the host either; no policy names it. The label alone tags nothing yet (brokerd's
/// pod source is to come).
#[test]
fn labelled_pod_tagged_by_its_cgroup_reaches_nothing_on_the_host() {
    require_privileges();
    let podman = Podman::new();
    let pod = podman.kube_play(&[(AGENT_LABEL, "pod-agent")], &["sleep", "600"]);
    let service = TestServer::echo("127.0.0.1:0");
    let world = World::new();
    std::fs::copy(&world.broker_ca, podman.share_dir().join("broker-ca.pem"))
        .unwrap_or_else(|e| panic!("cannot copy the broker CA for the pod: {e}"));
    let counted_before = world.broker.status().counters.netns_refused;
    world.broker.attach(&pod.cgroup);
    assert_tagged(&world.broker, &pod.cgroup);
    let report = run_client(
        &mut pod.exec(&[]),
        "tagged pod",
        service.addr().port(),
        world.api.addr(),
        world.placeholder.expose(),
        "/ct/broker-ca.pem",
        "denied.example.test",
    );
    eprintln!("tagged pod: {}", report.raw);
    assert_reached_nothing(
        "tagged pod",
        &world,
        &service,
        &report,
        &pod.cgroup,
        counted_before,
    );
    world.assert_no_secret_in_logs();
}

/// Issue 14's brokered container: tagged by name, it calls the HTTPS API through brokerd (which
/// injects the key in place of the placeholder), gets brokerd's 403 for a host no rule allows and
/// REFUSED for a DNS name no rule allows, and still reaches no loopback service of the host.
///
/// The API listens on an address of brokerd's namespace that is not loopback (the root end of a
/// [`TestHost`] veth pair, as in tests/tests/netns.rs): from a container, a loopback address
/// names the container's own loopback, and brokerd refuses it. The container itself has no
/// route anywhere (`--network none`): only brokerd can carry its call.
#[test]
fn container_tagged_by_name_is_brokered_with_an_injected_key() {
    require_privileges();
    let podman = Podman::new();
    let ct = podman.run(&["sleep", "600"]);
    let service = TestServer::echo("127.0.0.1:0");
    let host = TestHost::start();
    let root_ip = host.root_ip();
    let ca = TestCa::new("abtest containers upstream CA");
    let mut options = UpstreamOptions::api();
    options.ip = IpAddr::V4(root_ip);
    options.plain = false;
    let api = TestUpstream::start(&ca, options);
    let broker = Broker::builder()
        .upstream_ca(ca.pem_path())
        .name(API, root_ip)
        .name(OTHER, root_ip)
        .policy(
            "container",
            &format!("cgroup = \"{AGENT_NAME}\"\n{}", rule(API, api.port(), true)),
        )
        .start();
    let secret = Canary::new();
    broker.secret_set(SECRET_NAME, secret.expose().as_bytes());
    let placeholder = Canary::with_prefix("abtest-placeholder-");
    api.watch_for("secret", &secret);
    api.watch_for("placeholder", &placeholder);
    std::fs::copy(broker.export_ca(), podman.share_dir().join("broker-ca.pem"))
        .unwrap_or_else(|e| panic!("cannot copy the broker CA for the container: {e}"));

    // Under a stable agent name: the policy names the agent, not the runtime's cgroup path.
    let out = broker.ctl_ok(&["attach", "--container", &ct.name, "--as", AGENT_NAME]);
    assert!(
        out.contains("serving network namespace"),
        "attach --container should open brokerd's listeners in the container's namespace: {out}"
    );
    assert_tagged(&broker, &ct.cgroup);

    let report = run_client(
        &mut ct.exec(&[]),
        "brokered",
        service.addr().port(),
        api.addr(),
        placeholder.expose(),
        "/ct/broker-ca.pem",
        "denied.example.test",
    );
    let api_call = report.get("api");
    assert!(
        api_call.starts_with("ok 200 "),
        "allowed call through brokerd: {}\nbrokerd's log:\n{}",
        report.raw,
        broker.log()
    );
    let body: serde_json::Value =
        serde_json::from_str(api_call.trim_start_matches("ok 200 ")).unwrap_or_default();
    assert_eq!(
        body["authorization_sha256"].as_str(),
        Some(secret.sha256_with_prefix("Bearer ").as_str()),
        "the API must receive `Bearer <{SECRET_NAME}>`, injected by brokerd: {}",
        report.raw
    );
    secret.assert_absent(report.raw.as_bytes(), "the container's output");
    api.assert_injected_by("the container's call", "/hash", broker.pid());
    let other = report.get("other");
    assert!(
        other.starts_with("ok 403 "),
        "{OTHER} is allowed by no rule: brokerd answers 403, got {other}"
    );
    assert_eq!(
        report.get("dns"),
        "ok rcode 5",
        "a DNS name no rule allows gets REFUSED from brokerd"
    );
    let service_call = report.get("service");
    assert!(
        !service_call.starts_with("ok "),
        "a loopback service of the host is out of the container's reach: {service_call}"
    );
    assert!(
        service.accepted().is_empty(),
        "the host's loopback service must see nothing from the container: {:?}",
        service.accepted()
    );
    let conn = broker.wait_connection("container call", |c| {
        c.origin.as_ref().is_some_and(|o| {
            [ct.cgroup.as_str(), AGENT_NAME].contains(&o.cgroup.trim_start_matches('/'))
                && o.original_dst == SocketAddr::new(IpAddr::V4(root_ip), api.port())
        })
    });
    assert!(conn.origin.is_some(), "{conn:?}");
    secret.assert_absent(&broker.log_bytes(), "brokerd's log");
    secret.assert_absent(&broker.transcript(), "brokerctl's output");
}

fn stderr_of(out: &Output) -> String {
    String::from_utf8_lossy(&out.stderr).into_owned()
}

/// `attach --container` fails, and says why, for a container that does not exist, one that is
/// stopped, and a runtime that is not installed; nothing gets tagged.
#[test]
fn attach_container_says_why_it_cannot_tag() {
    require_privileges();
    let podman = Podman::new();
    let broker = Broker::start();

    let missing = "abtest-no-such-container";
    let out = broker.ctl_output(&["attach", "--container", missing]);
    assert!(!out.status.success(), "attach of a missing container");
    assert!(
        stderr_of(&out).contains(&format!("podman has no container named \"{missing}\"")),
        "missing container: {}",
        stderr_of(&out)
    );

    let ct = podman.run(&["sleep", "600"]);
    podman.ok(&["stop", "-t", "0", &ct.name]);
    let out = broker.ctl_output(&["attach", "--container", &ct.name]);
    assert!(!out.status.success(), "attach of a stopped container");
    assert!(
        stderr_of(&out).contains("is not running"),
        "stopped container: {}",
        stderr_of(&out)
    );

    // A PATH holding podman only: a named runtime that is missing, and no runtime at all.
    let only_podman = tempfile::tempdir().expect("tempdir");
    let podman_bin = which("podman");
    std::os::unix::fs::symlink(&podman_bin, only_podman.path().join("podman"))
        .unwrap_or_else(|e| panic!("symlink podman: {e}"));
    let nothing = tempfile::tempdir().expect("tempdir");
    for (path, runtime, expected) in [
        (
            only_podman.path(),
            Some("docker"),
            "container runtime docker is not on PATH",
        ),
        (
            nothing.path(),
            None,
            "no container runtime found: neither podman nor docker is on PATH",
        ),
    ] {
        let mut cmd = broker.ctl();
        cmd.env("PATH", path)
            .args(["attach", "--container", &ct.name]);
        if let Some(runtime) = runtime {
            cmd.args(["--runtime", runtime]);
        }
        let out = run_with_timeout(&mut cmd, SHORT);
        assert!(!out.status.success(), "attach with PATH={}", path.display());
        assert!(
            stderr_of(&out).contains(expected),
            "PATH={}: {}",
            path.display(),
            stderr_of(&out)
        );
    }
    let out = broker.ctl_output(&["attach", "--container", &ct.name, "--cgroup", "x"]);
    assert!(
        !out.status.success(),
        "--container and --cgroup together must be refused"
    );
    assert!(
        broker.status().cgroups.is_empty(),
        "nothing may be tagged: {:?}",
        broker.status().cgroups
    );
}

/// The absolute path of `program` on this process's PATH.
fn which(program: &str) -> std::path::PathBuf {
    std::env::var_os("PATH")
        .and_then(|p| {
            std::env::split_paths(&p)
                .map(|d| d.join(program))
                .find(|c| c.is_file())
        })
        .unwrap_or_else(|| panic!("{program} is not on PATH"))
}

/// The interfaces of the network namespace `pid` is in.
fn interfaces_of(pid: u32) -> Vec<String> {
    let dev = std::fs::read_to_string(format!("/proc/{pid}/net/dev"))
        .unwrap_or_else(|e| panic!("cannot read /proc/{pid}/net/dev: {e}"));
    dev.lines()
        .skip(2)
        .filter_map(|l| l.split(':').next())
        .map(|s| s.trim().to_string())
        .collect()
}

/// The harness: a `podman run` container has a cgroup and a network namespace of its own with
/// only `lo`, runs the host's python3 read-only, and is gone (cgroup dir included) after Drop.
#[test]
fn harness_container_has_its_own_cgroup_and_loopback_only_namespace() {
    require_privileges();
    let podman = Podman::new();
    let ct = podman.run(&["sleep", "600"]);
    assert!(
        ct.cgroup.starts_with("libpod_parent/libpod-") && ct.cgroup.ends_with(&ct.id),
        "a podman run container's cgroup: {}",
        ct.cgroup
    );
    assert!(cgroup_dir(&ct.cgroup).is_dir(), "{}", ct.cgroup);
    assert_ne!(ct.netns, netns_of(std::process::id()));
    assert_eq!(interfaces_of(ct.pid), vec!["lo".to_string()]);
    let out = run_with_timeout(
        &mut ct.exec(&[
            "python3",
            "-c",
            "import os; print(open('/proc/self/cgroup').read().strip().splitlines()[-1]); \
             print(os.readlink('/proc/self/ns/net'))",
        ]),
        SHORT * 3,
    );
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "exec python3: {}", stderr_of(&out));
    assert_eq!(
        stdout.lines().collect::<Vec<_>>(),
        vec![format!("0::/{}", ct.cgroup).as_str(), ct.netns.as_str()],
        "podman exec joins the container's cgroup and network namespace"
    );
    let name = ct.name.clone();
    let cgroup = cgroup_dir(&ct.cgroup);
    drop(ct);
    let exists = podman
        .command()
        .args(["container", "exists", &name])
        .output();
    assert!(
        exists.is_ok_and(|o| !o.status.success()),
        "container {name} still exists after Drop"
    );
    assert!(!cgroup.exists(), "{} left behind", cgroup.display());
}

/// The harness: a `podman kube play` pod labelled `agent-broker.io/agent=...` has its labels
/// readable through `podman pod inspect` and `pod ps --filter`, a pod cgroup holding its
/// containers (the infra container's too), one network namespace with only `lo` shared by them,
/// and is gone, cgroup dirs included, after Drop.
#[test]
fn harness_kube_pod_is_labelled_and_its_pod_cgroup_found() {
    require_privileges();
    let podman = Podman::new();
    let pod = podman.kube_play(&[(AGENT_LABEL, "demo")], &["sleep", "600"]);
    let labels = pod.labels();
    assert_eq!(
        labels.get(AGENT_LABEL).and_then(|v| v.as_str()),
        Some("demo"),
        "the Pod manifest's label: {labels:?}"
    );
    assert_eq!(
        pod.listed_with_label(AGENT_LABEL, "demo"),
        vec![pod.name.clone()]
    );
    assert!(
        pod.cgroup.starts_with("libpod_parent/") && pod.cgroup.ends_with(&pod.id),
        "the pod's cgroup: {}",
        pod.cgroup
    );
    let agent = pod.agent();
    assert!(
        agent.cgroup.starts_with(&format!("{}/libpod-", pod.cgroup))
            && agent.cgroup.ends_with(&agent.id),
        "the agent container's cgroup {} should be below the pod's {}",
        agent.cgroup,
        pod.cgroup
    );
    let infra_cgroup = agent_broker_tests::cgroup_of(pod.infra_pid);
    assert!(
        infra_cgroup.starts_with(&format!("{}/", pod.cgroup)),
        "the infra container's cgroup {infra_cgroup} should be below the pod's {}",
        pod.cgroup
    );
    assert_eq!(
        netns_of(pod.infra_pid),
        agent.netns,
        "one namespace per pod"
    );
    assert_ne!(agent.netns, netns_of(std::process::id()));
    assert_eq!(interfaces_of(agent.pid), vec!["lo".to_string()]);
    // The agent runs the host's programs (its /usr is the host's, read-only).
    let out = run_with_timeout(&mut pod.exec(&["python3", "-c", "print('ok')"]), SHORT * 3);
    assert!(
        out.status.success() && out.stdout.starts_with(b"ok"),
        "python3 in the pod: {}",
        stderr_of(&out)
    );

    let name = pod.name.clone();
    let dir = cgroup_dir(&pod.cgroup);
    drop(pod);
    let exists = podman.command().args(["pod", "exists", &name]).output();
    assert!(
        exists.is_ok_and(|o| !o.status.success()),
        "pod {name} still exists after Drop"
    );
    assert!(!dir.exists(), "{} left behind", dir.display());
    assert!(
        !Path::new("/sys/fs/cgroup/systemd")
            .join(
                dir.strip_prefix(agent_broker_tests::cgroup2_mount())
                    .unwrap_or(&dir)
            )
            .exists(),
        "the pod's name=systemd cgroup was left behind"
    );
}

/// Run inside a container by the kill -9, collision and removal tests: `python3 -c CALL_PY
/// <json>`. `mode` `https`: one GET /hash from the API as `host`, dialling `ip:port` from local
/// port `bind` if given (its own loopback, 127.0.0.1), trusting the broker CA at `ca`, with the
/// placeholder as bearer token; prints one JSON line (`status`, `auth_sha256`, the local port,
/// or `error`: the errno's name or the exception). `mode` `loop`: every 200 ms, that call and a
/// TCP connect to the host loopback service port `service` (127.0.0.1, the container's own
/// loopback), each outcome appended as one JSON line (with the call's start time `t`, Unix
/// seconds) to the file `log`, until the file `stop` exists. Only hashes leave the container.
const CALL_PY: &str = r#"
import errno, http.client, json, os, socket, ssl, sys, time
cfg = json.loads(sys.argv[1])
def name_of(e):
    if isinstance(e, OSError) and e.errno:
        return errno.errorcode.get(e.errno, str(e.errno))
    return type(e).__name__ + ": " + str(e)
def call_api():
    out = {}
    try:
        ctx = ssl.create_default_context(cafile=cfg["ca"])
        def dial():
            s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            s.settimeout(5)
            if cfg.get("bind"):
                s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
                s.bind(("127.0.0.1", cfg["bind"]))
            s.connect((cfg["ip"], cfg["port"]))
            out["local"] = s.getsockname()[1]
            return s
        class Conn(http.client.HTTPSConnection):
            def connect(self):
                self.sock = ctx.wrap_socket(dial(), server_hostname=cfg["host"])
        c = Conn(cfg["host"], cfg["port"], context=ctx, timeout=5)
        c.request("GET", "/hash", headers={"Authorization": "Bearer " + cfg["placeholder"]})
        r = c.getresponse()
        out["status"] = r.status
        body = r.read().decode(errors="replace")
        c.close()
        try:
            out["auth_sha256"] = json.loads(body).get("authorization_sha256")
        except ValueError:
            out["auth_sha256"] = None
    except Exception as e:
        out["error"] = name_of(e)
    return out
def call_service():
    try:
        s = socket.create_connection(("127.0.0.1", cfg["service"]), timeout=3)
        s.sendall(b"GET /container HTTP/1.0\r\nHost: x\r\n\r\n")
        data = s.recv(4096)
        return "ok" if data else "closed"
    except Exception as e:
        return name_of(e)
if cfg["mode"] == "loop":
    with open(cfg["log"], "a") as log:
        while not os.path.exists(cfg["stop"]):
            t = time.time()
            line = {"t": t, "api": call_api(), "service": call_service()}
            log.write(json.dumps(line) + "\n")
            log.flush()
            time.sleep(0.2)
else:
    print(json.dumps(call_api()), flush=True)
"#;

/// The second secret's name (the collision test's second agent gets it injected).
const SECRET_B: &str = "ABTEST_KEY_B";

/// A brokered-container world: the HTTPS API on the root end of a [`TestHost`] veth (see
/// [`container_tagged_by_name_is_brokered_with_an_injected_key`]), a brokerd trusting its CA
/// whose policies name agents (`attach --as`), two secrets in the vault, and the broker CA in
/// the share dir every container mounts at `/ct`.
struct CtWorld {
    broker: Broker,
    api: TestUpstream,
    _ca: TestCa,
    secret: Canary,
    secret_b: Canary,
    placeholder: Canary,
    root_ip: Ipv4Addr,
    /// Keeps the veth (and so `root_ip`) alive.
    _host: TestHost,
    podman: Podman,
}

impl CtWorld {
    /// `policies` gets the API's port and returns (file name, TOML) pairs.
    fn new(policies: impl FnOnce(u16) -> Vec<(String, String)>) -> Self {
        require_privileges();
        let podman = Podman::new();
        let host = TestHost::start();
        let root_ip = host.root_ip();
        let ca = TestCa::new("abtest containers upstream CA");
        let mut options = UpstreamOptions::api();
        options.ip = IpAddr::V4(root_ip);
        options.plain = false;
        let api = TestUpstream::start(&ca, options);
        let mut builder = Broker::builder()
            .upstream_ca(ca.pem_path())
            .name(API, root_ip)
            .name(OTHER, root_ip);
        for (name, toml) in policies(api.port()) {
            builder = builder.policy(&name, &toml);
        }
        let broker = builder.start();
        let secret = Canary::new();
        let secret_b = Canary::new();
        broker.secret_set(SECRET_NAME, secret.expose().as_bytes());
        broker.secret_set(SECRET_B, secret_b.expose().as_bytes());
        let placeholder = Canary::with_prefix("abtest-placeholder-");
        api.watch_for("secret", &secret);
        api.watch_for("secret-b", &secret_b);
        api.watch_for("placeholder", &placeholder);
        std::fs::copy(broker.export_ca(), podman.share_dir().join("broker-ca.pem"))
            .unwrap_or_else(|e| panic!("cannot copy the broker CA for the containers: {e}"));
        Self {
            broker,
            api,
            _ca: ca,
            secret,
            secret_b,
            placeholder,
            root_ip,
            _host: host,
            podman,
        }
    }

    /// `brokerctl attach --container NAME --as AGENT`; returns the workload brokerd serves.
    fn attach(&self, ct: &Container, agent: &str) -> WorkloadStatus {
        let out = self
            .broker
            .ctl_ok(&["attach", "--container", &ct.name, "--as", agent]);
        assert!(
            out.contains("serving network namespace"),
            "attach --container {} should open listeners in its namespace: {out}",
            ct.name
        );
        assert_tagged(&self.broker, &ct.cgroup);
        self.broker
            .status()
            .workloads
            .into_iter()
            .find(|w| w.cgroup == ct.cgroup)
            .unwrap_or_else(|| panic!("status lists no workload for {}: {out}", ct.cgroup))
    }

    /// The [`CALL_PY`] configuration of an HTTPS call to `host` (which brokerd resolves to the
    /// API), from local port `bind` if given.
    fn call(&self, host: &str, bind: Option<u16>) -> serde_json::Value {
        let mut cfg = serde_json::json!({
            "mode": "https",
            "host": host,
            "ip": self.root_ip.to_string(),
            "port": self.api.port(),
            "ca": "/ct/broker-ca.pem",
            "placeholder": self.placeholder.expose(),
        });
        if let Some(port) = bind {
            cfg["bind"] = port.into();
        }
        cfg
    }

    /// Runs [`CALL_PY`] once in container `ct` and returns its report.
    fn run(&self, ct: &Container, cfg: &serde_json::Value) -> serde_json::Value {
        let out = run_with_timeout(
            &mut ct.exec(&["python3", "-c", CALL_PY, &cfg.to_string()]),
            SHORT * 3,
        );
        let stdout = String::from_utf8_lossy(&out.stdout);
        assert!(
            out.status.success(),
            "the client in {} failed ({}): {stdout}\n{}",
            ct.name,
            out.status,
            stderr_of(&out)
        );
        self.assert_no_secret(stdout.as_bytes(), "the container's output");
        serde_json::from_str(stdout.trim())
            .unwrap_or_else(|e| panic!("the client in {} printed {stdout:?}: {e}", ct.name))
    }

    fn assert_no_secret(&self, bytes: &[u8], what: &str) {
        self.secret.assert_absent(bytes, what);
        self.secret_b.assert_absent(bytes, what);
    }

    /// A 200 whose API side received `Bearer <secret>` (by hash).
    fn assert_injected(&self, what: &str, report: &serde_json::Value, secret: &Canary) {
        assert_eq!(
            report["status"].as_u64(),
            Some(200),
            "{what}: {report}\nbrokerd's log:\n{}",
            self.broker.log()
        );
        assert_eq!(
            report["auth_sha256"].as_str(),
            Some(secret.sha256_with_prefix("Bearer ").as_str()),
            "{what}: the API did not receive the expected `Bearer <secret>`: {report}"
        );
    }

    /// The cookies in the pinned `NETNS_LISTENERS` map.
    fn served_cookies(&self) -> Vec<u64> {
        let path = self.broker.pin_dir().join("maps").join("NETNS_LISTENERS");
        pinned_map_entries(&path, 8, 32)
            .unwrap_or_else(|e| panic!("cannot read NETNS_LISTENERS: {e}"))
            .into_iter()
            .map(|(k, _)| u64::from_ne_bytes(k[..8].try_into().unwrap_or([0; 8])))
            .collect()
    }

    /// brokerd's audit records of requests to `host` made by agent `agent`.
    fn requests_of(&self, agent: &str, host: &str) -> Vec<AuditEvent> {
        self.broker
            .audit_records()
            .into_iter()
            .filter(|e| {
                e.cgroup.as_deref() == Some(agent)
                    && e.status.is_some()
                    && e.outcome != Some(RequestOutcome::Forwarded)
                    && e.host.as_deref().is_some_and(|h| h.starts_with(host))
            })
            .collect()
    }
}

fn unix_now_secs() -> f64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0.0, |d| d.as_secs_f64())
}

/// A [`CALL_PY`] loop running in a container (through `podman exec`), logging to the share
/// dir. Drop stops it (the stop file, then SIGKILL of the `podman exec` by pid).
struct CallLoop {
    child: Option<std::process::Child>,
    log: std::path::PathBuf,
    stop: std::path::PathBuf,
}

impl CallLoop {
    fn start(world: &CtWorld, ct: &Container, service_port: u16) -> Self {
        let share = world.podman.share_dir();
        let tag = &ct.name;
        let mut cfg = world.call(API, None);
        cfg["mode"] = "loop".into();
        cfg["service"] = service_port.into();
        cfg["log"] = format!("/ct/{tag}.loop.jsonl").into();
        cfg["stop"] = format!("/ct/{tag}.loop.stop").into();
        let child = ct
            .exec(&["python3", "-c", CALL_PY, &cfg.to_string()])
            .stdin(std::process::Stdio::null())
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null())
            .spawn()
            .unwrap_or_else(|e| panic!("cannot start the call loop in {tag}: {e}"));
        Self {
            child: Some(child),
            log: share.join(format!("{tag}.loop.jsonl")),
            stop: share.join(format!("{tag}.loop.stop")),
        }
    }

    /// The lines logged so far.
    fn lines(&self) -> Vec<serde_json::Value> {
        std::fs::read_to_string(&self.log)
            .unwrap_or_default()
            .lines()
            .filter_map(|l| serde_json::from_str(l).ok())
            .collect()
    }

    /// Waits up to `timeout` until at least `n` calls started after `since` (Unix seconds)
    /// were logged; returns those.
    fn wait_calls_after(
        &self,
        since: f64,
        n: usize,
        timeout: std::time::Duration,
    ) -> Vec<serde_json::Value> {
        let after = || -> Vec<serde_json::Value> {
            self.lines()
                .into_iter()
                .filter(|l| l["t"].as_f64().is_some_and(|t| t > since))
                .collect()
        };
        poll_until(timeout, || {
            let found = after();
            (found.len() >= n).then_some(found)
        })
        .unwrap_or_else(|| {
            panic!(
                "the call loop logged fewer than {n} calls after {since}: {:?}",
                self.lines()
            )
        })
    }

    fn stop(&mut self) {
        let _ = std::fs::write(&self.stop, b"");
        if let Some(mut child) = self.child.take() {
            let exited = poll_until(SHORT, || child.try_wait().ok().flatten());
            if exited.is_none() {
                if let Ok(pid) = i32::try_from(child.id()) {
                    let _ = nix::sys::signal::kill(
                        nix::unistd::Pid::from_raw(pid),
                        nix::sys::signal::Signal::SIGKILL,
                    );
                }
                let _ = child.wait();
            }
        }
    }
}

impl Drop for CallLoop {
    fn drop(&mut self) {
        self.stop();
    }
}

/// kill -9 of brokerd while a brokered container calls the API in a loop: from then on its
/// calls are refused (ECONNREFUSED: the namespace's pinned entry still redirects to brokerd's
/// port there, where nothing listens), and neither the API nor a loopback service of the host
/// sees anything. brokerd restarted with the same state and pin dirs serves the container's
/// namespace again with no new attach: the same running loop gets the key injected again,
/// attributed to the agent name.
#[test]
fn container_fails_closed_while_brokerd_is_down_and_is_brokered_again_after_restart() {
    const AGENT: &str = "agents/ct-restart";
    let mut w = CtWorld::new(|port| {
        vec![(
            "ct-restart".into(),
            format!("cgroup = \"{AGENT}\"\n{}", rule(API, port, true)),
        )]
    });
    let ct = w.podman.run(&["sleep", "600"]);
    let service = TestServer::echo("127.0.0.1:0");
    let workload = w.attach(&ct, AGENT);
    let mut calls = CallLoop::start(&w, &ct, service.addr().port());

    let before = calls.wait_calls_after(0.0, 2, SHORT * 2);
    for line in &before {
        w.assert_injected("a call before the kill", &line["api"], &w.secret);
    }

    w.broker.kill9();
    let killed_at = unix_now_secs();
    let handshakes = w.api.handshakes();
    let requests = w.api.requests().len();
    let down = calls.wait_calls_after(killed_at, 3, SHORT * 2);
    for line in &down {
        assert_eq!(
            line["api"]["error"].as_str(),
            Some("ECONNREFUSED"),
            "with brokerd down the container's call must be refused: {line}"
        );
        assert_eq!(
            line["service"].as_str(),
            Some("ECONNREFUSED"),
            "with brokerd down a loopback connect must be refused: {line}"
        );
    }
    assert_eq!(
        (w.api.handshakes(), w.api.requests().len()),
        (handshakes, requests),
        "nothing may reach the API while brokerd is down"
    );
    assert!(
        service.accepted().is_empty(),
        "the host's loopback service must see nothing from the container: {:?}",
        service.accepted()
    );
    assert!(
        w.served_cookies().contains(&workload.netns_cookie),
        "the pinned entry keeps redirecting while brokerd is down"
    );

    w.broker.restart();
    let reopened = poll_until(SHORT, || {
        w.broker
            .status()
            .workloads
            .into_iter()
            .find(|x| x.netns_cookie == workload.netns_cookie)
    })
    .unwrap_or_else(|| {
        panic!(
            "the restarted brokerd does not serve the container's namespace again:\n{}",
            w.broker.log()
        )
    });
    let reopened_at = unix_now_secs();
    assert_eq!(reopened.cgroup, ct.cgroup, "{reopened:?}");
    assert_eq!(reopened.pid, ct.pid, "{reopened:?}");
    assert_eq!(reopened.state, "serving", "{reopened:?}");

    // The loop that ran all along is brokered again.
    let after = calls.wait_calls_after(reopened_at, 2, SHORT * 2);
    for line in &after {
        w.assert_injected("a loop call after the restart", &line["api"], &w.secret);
    }
    calls.stop();
    w.assert_no_secret(
        &std::fs::read(&calls.log).unwrap_or_default(),
        "the call loop's log",
    );

    // A new process in the container too, and the API's peer is the new brokerd.
    let report = w.run(&ct, &w.call(API, None));
    w.assert_injected("a new call after the restart", &report, &w.secret);
    w.api
        .assert_injected_by("a new call after the restart", "/hash", w.broker.pid());
    let since_ms = (reopened_at * 1000.0) as u64;
    let audited = poll_until(SHORT, || {
        let found: Vec<_> = w
            .requests_of(AGENT, API)
            .into_iter()
            .filter(|e| e.time_ms >= since_ms && e.status == Some(200))
            .collect();
        (!found.is_empty()).then_some(found)
    })
    .unwrap_or_else(|| {
        panic!(
            "no audit record of {AGENT}'s calls after the restart: {:#?}",
            w.broker.audit_records()
        )
    });
    for e in &audited {
        assert_eq!(e.cgroup_path.as_deref(), Some(ct.cgroup.as_str()), "{e:?}");
        assert_eq!(e.secrets, vec![SECRET_NAME.to_string()], "{e:?}");
    }
    let cookie = workload.netns_cookie.to_string();
    let reopened_record = w
        .broker
        .audit_records()
        .into_iter()
        .find(|e| {
            e.reason
                .as_deref()
                .is_some_and(|r| r.contains("re-opened") && r.contains(&cookie))
        })
        .unwrap_or_else(|| panic!("the re-opening at start must be audited"));
    assert_eq!(
        (
            reopened_record.cgroup.as_deref(),
            reopened_record.cgroup_path.as_deref()
        ),
        (Some(AGENT), Some(ct.cgroup.as_str())),
        "the re-opening names the agent and keeps the container's cgroup: {reopened_record:?}"
    );
    w.assert_no_secret(&w.broker.log_bytes(), "brokerd's log");
    w.assert_no_secret(&w.broker.transcript(), "brokerctl's output");
}

/// Two containers attached under two agent names, whose clients bind the same loopback source
/// port (each on its own loopback) and call at the same time: brokerd attributes each call to
/// its own agent (audit records name the agent and that container's cgroup) and applies that
/// agent's policy: each gets its own key injected for the same host, and a host only ct-a's
/// policy allows is denied (403) to ct-b.
#[test]
fn containers_with_colliding_loopback_ports_are_attributed_apart() {
    const A: &str = "agents/ct-a";
    const B: &str = "agents/ct-b";
    let w = CtWorld::new(|port| {
        vec![
            (
                "ct-a".into(),
                format!(
                    "cgroup = \"{A}\"\n{}{}",
                    rule(API, port, true),
                    rule(OTHER, port, true)
                ),
            ),
            (
                "ct-b".into(),
                format!(
                    "cgroup = \"{B}\"\n\n[[allow]]\nhost = \"{API}\"\nport = {port}\n\
                     inject.headers = {{ authorization = \"Bearer {{secret:{SECRET_B}}}\" }}\n"
                ),
            ),
        ]
    });
    let a = w.podman.run(&["sleep", "600"]);
    let b = w.podman.run(&["sleep", "600"]);
    let (wa, wb) = (w.attach(&a, A), w.attach(&b, B));
    assert_ne!(wa.netns_cookie, wb.netns_cookie);
    assert_ne!(a.netns, b.netns);

    let port = 40_000 + (std::process::id() % 10_000) as u16;
    let both = |host: &str, bind: u16| {
        std::thread::scope(|scope| {
            let ha = scope.spawn(|| w.run(&a, &w.call(host, Some(bind))));
            let hb = scope.spawn(|| w.run(&b, &w.call(host, Some(bind))));
            (ha.join().expect("client a"), hb.join().expect("client b"))
        })
    };

    let (ra, rb) = both(API, port);
    assert_eq!(ra["local"].as_u64(), Some(u64::from(port)), "{ra}");
    assert_eq!(rb["local"].as_u64(), Some(u64::from(port)), "{rb}");
    w.assert_injected("ct-a's call", &ra, &w.secret);
    w.assert_injected("ct-b's call", &rb, &w.secret_b);

    // brokerd saw two connections from the same loopback address and port, one per container.
    let api_dst = SocketAddr::new(IpAddr::V4(w.root_ip), w.api.port());
    let from_port: Vec<_> = w
        .broker
        .connections()
        .into_iter()
        .filter(|c| c.peer.port() == port)
        .filter_map(|c| c.origin)
        .filter(|o| o.original_dst == api_dst)
        .collect();
    let mut cgroups: Vec<&str> = from_port
        .iter()
        .map(|o| o.cgroup.trim_start_matches('/'))
        .collect();
    cgroups.sort_unstable();
    let mut expected = [a.cgroup.as_str(), b.cgroup.as_str()];
    expected.sort_unstable();
    let mut named = [A, B];
    named.sort_unstable();
    assert!(
        cgroups == expected || cgroups == named,
        "one connection from port {port} per container, each from its own cgroup: {from_port:?}"
    );

    let (oa, ob) = both(OTHER, port + 1);
    w.assert_injected("ct-a's call to a host its policy allows", &oa, &w.secret);
    assert_eq!(
        ob["status"].as_u64(),
        Some(403),
        "ct-b's policy allows no {OTHER}: brokerd answers 403: {ob}"
    );

    // The four calls' records, once the group commit that stores the last one is done.
    poll_until(SHORT, || {
        [(A, API), (B, API), (A, OTHER), (B, OTHER)]
            .iter()
            .all(|(agent, host)| !w.requests_of(agent, host).is_empty())
            .then_some(())
    })
    .unwrap_or_else(|| panic!("the four calls' audit records did not all arrive"));
    for (agent, ct, secret_name) in [(A, &a, SECRET_NAME), (B, &b, SECRET_B)] {
        let records = w.requests_of(agent, API);
        assert_eq!(records.len(), 1, "{agent}: {records:#?}");
        let e = &records[0];
        assert_eq!(e.status, Some(200), "{e:?}");
        assert_eq!(e.cgroup_path.as_deref(), Some(ct.cgroup.as_str()), "{e:?}");
        assert_eq!(e.secrets, vec![secret_name.to_string()], "{e:?}");
    }
    let other_a = w.requests_of(A, OTHER);
    assert_eq!(
        other_a.iter().map(|e| e.status).collect::<Vec<_>>(),
        [Some(200)],
        "{other_a:#?}"
    );
    let other_b = w.requests_of(B, OTHER);
    assert_eq!(other_b.len(), 1, "{other_b:#?}");
    assert_eq!(other_b[0].status, Some(403), "{:?}", other_b[0]);
    assert_eq!(
        other_b[0].decision,
        Some(Decision::Deny),
        "{:?}",
        other_b[0]
    );
    assert_eq!(
        other_b[0].cgroup_path.as_deref(),
        Some(b.cgroup.as_str()),
        "{:?}",
        other_b[0]
    );
    let hits: Vec<_> = w
        .api
        .requests()
        .into_iter()
        .map(|r| r.canary_hits)
        .collect();
    assert_eq!(
        hits.iter()
            .filter(|h| h.as_slice() == ["secret-b in header authorization (raw)"])
            .count(),
        1,
        "secret B reaches the API once, in ct-b's Authorization only: {hits:?}"
    );
    w.assert_no_secret(&w.broker.log_bytes(), "brokerd's log");
    w.assert_no_secret(&w.broker.transcript(), "brokerctl's output");
}

/// `podman rm -f` of an attached container releases brokerd's listeners in its namespace:
/// `status --json` no longer lists the workload, its `NETNS_LISTENERS` entry is gone, and the
/// release is audited under the agent's name with the container's cgroup.
#[test]
fn removing_a_container_releases_its_namespace() {
    const AGENT: &str = "agents/ct-gone";
    let w = CtWorld::new(|port| {
        vec![(
            "ct-gone".into(),
            format!("cgroup = \"{AGENT}\"\n{}", rule(API, port, true)),
        )]
    });
    let ct = w.podman.run(&["sleep", "600"]);
    let workload = w.attach(&ct, AGENT);
    assert!(w.served_cookies().contains(&workload.netns_cookie));
    let report = w.run(&ct, &w.call(API, None));
    w.assert_injected("before the removal", &report, &w.secret);

    w.podman.ok(&["rm", "-f", "-t", "0", &ct.name]);
    assert!(!ct.exists(), "podman rm -f left {}", ct.name);
    let released = poll_until(SHORT, || {
        let status: StatusReport =
            serde_json::from_str(&w.broker.ctl_ok(&["status", "--json"])).ok()?;
        status
            .workloads
            .iter()
            .all(|x| x.netns_cookie != workload.netns_cookie)
            .then_some(())
    });
    assert!(
        released.is_some(),
        "status --json still lists the removed container's workload: {:?}\nbrokerd's log:\n{}",
        w.broker.status().workloads,
        w.broker.log()
    );
    assert!(
        !w.served_cookies().contains(&workload.netns_cookie),
        "the released namespace's NETNS_LISTENERS entry must be gone"
    );
    let cookie = workload.netns_cookie.to_string();
    let audited = poll_until(SHORT, || {
        w.broker.audit_records().into_iter().find(|e| {
            e.reason
                .as_deref()
                .is_some_and(|r| r.contains("released") && r.contains(&cookie))
        })
    })
    .unwrap_or_else(|| {
        panic!(
            "the release must be audited: {:#?}",
            w.broker.audit_records()
        )
    });
    assert_eq!(
        audited.cgroup.as_deref(),
        Some(AGENT),
        "the release names the agent: {audited:?}"
    );
    assert_eq!(
        audited.cgroup_path.as_deref(),
        Some(ct.cgroup.as_str()),
        "the release keeps the container's cgroup: {audited:?}"
    );
}
