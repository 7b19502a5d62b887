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
//! - `brokerctl attach --container` says clearly why it cannot tag: no such container, a
//!   stopped one, a runtime that is not installed.
//! - The container harness itself: a container's and a pod's cgroup, network namespace (only
//!   `lo`) and labels, and that Drop removes them.

use std::{
    net::{IpAddr, Ipv4Addr, SocketAddr},
    path::Path,
    process::Output,
};

use agent_broker_tests::{
    Broker, Canary, SHORT, TestCa, TestHost, TestServer, TestUpstream, UpstreamOptions,
    attached_programs,
    cgroup::cgroup_dir,
    container::{AGENT_LABEL, Podman, netns_of},
    require_privileges, run_with_timeout,
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
    let root_ip = match host.addr().ip() {
        IpAddr::V4(ip) => {
            let [a, b, c, _] = ip.octets();
            Ipv4Addr::new(a, b, c, 1)
        }
        IpAddr::V6(ip) => panic!("TestHost has an IPv6 address {ip}"),
    };
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
    let record = api
        .requests()
        .into_iter()
        .find(|r| r.path == "/hash")
        .unwrap_or_else(|| panic!("the API has no record of the call"));
    assert_eq!(
        record.peer_owner,
        Some(broker.pid()),
        "the API's peer must be brokerd's socket: {record:?}"
    );
    assert_eq!(
        record.canary_hits,
        vec!["secret in header authorization (raw)".to_string()],
        "the secret reaches the API in Authorization only, the placeholder not at all"
    );
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
