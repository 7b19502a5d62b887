//! Issue 14, step 2: agents in a network namespace of their own (as in a `--network none`
//! container), brokered through listeners brokerd opens inside that namespace
//! (`brokerctl attach --pid`).
//!
//! Each test makes bare namespaces (`lo` up, nothing else: [`TestNetns`]) and a long-lived
//! process in each (`sleep`, placed in a test cgroup before it runs), attaches by that pid, and
//! runs python clients in the same namespace and cgroup. The HTTPS test API listens on the root
//! namespace's end of a [`TestHost`] veth pair (10.x.y.1): an address of brokerd's namespace
//! that is not loopback, since a loopback destination from a workload namespace names the
//! workload's own loopback and is refused. The namespaces have no route anywhere, so a
//! connection that was not redirected could not reach the API at all.
//!
//! Oracles: the API's record of what it received (hashes only), brokerd's connection records
//! (cgroup, pid, original destination), its audit records, `brokerctl status`, and the pinned
//! `NETNS_LISTENERS` map.
//!
//! Run as root: `cargo test -p agent-broker-tests --test netns -- --test-threads=1`.

use std::{
    net::{IpAddr, Ipv4Addr, SocketAddr},
    path::PathBuf,
    process::{Child, Stdio},
    time::Duration,
};

use agent_broker_protocol::{Outcome, Request, Response, WorkloadStatus};
use agent_broker_tests::{
    Broker, Canary, SHORT, TestCa, TestCgroup, TestHost, TestNetns, TestServer, TestUpstream,
    UpstreamOptions,
    agent::python,
    bpf::pinned_map_entries,
    poll_until, require_privileges, spawn_in_cgroup, wait_with_timeout,
    world::{API, SECRET_NAME, rule},
};
use nix::{
    sys::signal::{Signal, kill},
    unistd::Pid,
};

/// The reason brokerd records for a loopback destination from a workload namespace.
const LOOPBACK_REFUSED: &str =
    "loopback destination inside a container's network namespace: not brokered";

/// The client run inside a workload namespace. Its one argument is a JSON object: `mode`
/// `https` (GET /hash from the API as `host`, dialling `ip:port`, trusting `ca`, from local
/// port `bind` if given), `dns` (an A query for `name` to 127.0.0.1:53, the namespace's own
/// loopback: brokerd's DNS listener there answers), or `tcp` (connect to `ip:port`, send a line,
/// read until EOF). Prints one JSON line.
const CLIENT_PY: &str = r#"
import errno, http.client, json, os, socket, ssl, struct, sys
cfg = json.loads(sys.argv[1])
out = {"pid": os.getpid()}
def name_of(e):
    if isinstance(e, OSError) and e.errno:
        return errno.errorcode.get(e.errno, str(e.errno))
    return type(e).__name__ + ": " + str(e)
def dial():
    s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    s.settimeout(10)
    if cfg.get("bind"):
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        s.bind(("127.0.0.1", cfg["bind"]))
    s.connect((cfg["ip"], cfg["port"]))
    out["local"] = s.getsockname()[1]
    return s
try:
    if cfg["mode"] == "https":
        ctx = ssl.create_default_context(cafile=cfg["ca"])
        class Conn(http.client.HTTPSConnection):
            def connect(self):
                self.sock = ctx.wrap_socket(dial(), server_hostname=cfg["host"])
        c = Conn(cfg["host"], cfg["port"], context=ctx, timeout=10)
        c.request("GET", "/hash", headers={"Authorization": "Bearer " + cfg["placeholder"]})
        r = c.getresponse()
        out["status"] = r.status
        out["body"] = r.read().decode(errors="replace")
    elif cfg["mode"] == "dns":
        q = struct.pack(">HHHHHH", 0x4242, 0x0100, 1, 0, 0, 0)
        for label in cfg["name"].split("."):
            q += bytes([len(label)]) + label.encode()
        q += b"\0" + struct.pack(">HH", 1, 1)
        s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        s.settimeout(5)
        s.sendto(q, ("127.0.0.1", 53))
        data, src = s.recvfrom(4096)
        out["rcode"] = data[3] & 0x0F
        out["from"] = "%s:%d" % src
        out["answer_hex"] = data[len(q):].hex()
    elif cfg["mode"] == "dnstcp":
        q = struct.pack(">HHHHHH", 0x4243, 0x0100, 1, 0, 0, 0)
        for label in cfg["name"].split("."):
            q += bytes([len(label)]) + label.encode()
        q += b"\0" + struct.pack(">HH", 1, 1)
        s = socket.create_connection(("127.0.0.53", 53), timeout=5)
        s.sendall(struct.pack(">H", len(q)) + q)
        data = b""
        while len(data) < 2 or len(data) < 2 + struct.unpack(">H", data[:2])[0]:
            chunk = s.recv(4096)
            if not chunk:
                break
            data += chunk
        out["rcode"] = data[5] & 0x0F if len(data) > 5 else None
        out["answer_hex"] = data[2 + len(q):].hex()
    elif cfg["mode"] == "tcp":
        s = dial()
        s.sendall(b"hello\n")
        got = b""
        while True:
            chunk = s.recv(4096)
            if not chunk:
                break
            got += chunk
        out["got"] = got.decode(errors="replace")
except Exception as e:
    out["error"] = name_of(e)
print(json.dumps(out), flush=True)
"#;

/// A workload: a namespace of its own and a long-lived process in it, in cgroup `cgroup`.
/// Drop kills the process (by pid) before the namespace goes.
struct Workload {
    keeper: Option<Child>,
    cgroup: String,
    ns: TestNetns,
}

impl Workload {
    fn start(cgroup: &str) -> Self {
        let ns = TestNetns::new();
        let mut cmd = ns.command("sleep");
        cmd.arg("1000")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null());
        let keeper = spawn_in_cgroup(cgroup, &mut cmd);
        let w = Self {
            keeper: Some(keeper),
            cgroup: cgroup.to_string(),
            ns,
        };
        // `ip netns exec` enters the namespace, then execs sleep (same pid).
        let pid = w.pid();
        let entered = poll_until(SHORT, || {
            let mine = std::fs::read_link("/proc/self/ns/net").ok()?;
            let its = std::fs::read_link(format!("/proc/{pid}/ns/net")).ok()?;
            let exe = std::fs::read_link(format!("/proc/{pid}/exe")).ok()?;
            (its != mine && exe.to_string_lossy().contains("sleep")).then_some(())
        });
        assert!(
            entered.is_some(),
            "the keeper process {pid} never ran sleep in its namespace"
        );
        w
    }

    fn pid(&self) -> u32 {
        self.keeper.as_ref().map_or(0, Child::id)
    }

    /// Runs the client in this workload's namespace and cgroup and returns its JSON report.
    fn client(&self, cfg: serde_json::Value) -> serde_json::Value {
        let mut cmd = self.ns.command(python());
        cmd.args(["-c", CLIENT_PY])
            .arg(cfg.to_string())
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped());
        let child = spawn_in_cgroup(&self.cgroup, &mut cmd);
        let out = wait_with_timeout(child, Duration::from_secs(30), "client in a workload netns");
        let stdout = String::from_utf8_lossy(&out.stdout);
        serde_json::from_str(stdout.trim()).unwrap_or_else(|e| {
            panic!(
                "the client printed {stdout:?} ({e}); stderr: {}",
                String::from_utf8_lossy(&out.stderr)
            )
        })
    }

    /// Tries to bind 127.0.0.1:`port` inside the namespace from a process in the test's own
    /// (untagged) cgroup: `ok` or the errno's name.
    fn bind_outside_cgroup(&self, port: u16) -> String {
        let out = self
            .ns
            .command(python())
            .args([
                "-c",
                "import errno, socket, sys\n\
                 s = socket.socket()\n\
                 try:\n    s.bind(('127.0.0.1', int(sys.argv[1]))); print('ok')\n\
                 except OSError as e:\n    print(errno.errorcode.get(e.errno, e.errno))",
            ])
            .arg(port.to_string())
            .output()
            .expect("python in the namespace");
        String::from_utf8_lossy(&out.stdout).trim().to_string()
    }

    fn kill(&mut self) {
        if let Some(mut child) = self.keeper.take() {
            if let Ok(pid) = i32::try_from(child.id()) {
                let _ = kill(Pid::from_raw(pid), Signal::SIGKILL);
            }
            let _ = child.wait();
        }
    }
}

impl Drop for Workload {
    fn drop(&mut self) {
        self.kill();
    }
}

/// The test's world: a cgroup, the HTTPS API on a non-loopback address of brokerd's namespace,
/// a brokerd trusting the API's CA whose policy lets the cgroup (and below) call the API with
/// the secret injected, and the broker CA exported for the clients.
struct Setup {
    broker: Broker,
    api: TestUpstream,
    _ca: TestCa,
    broker_ca: PathBuf,
    secret: Canary,
    placeholder: Canary,
    root_ip: Ipv4Addr,
    /// Keeps the veth (and so `root_ip`) alive.
    _host: TestHost,
    cg: TestCgroup,
}

impl Setup {
    fn new() -> Self {
        require_privileges();
        let host = TestHost::start();
        let root_ip = host.root_ip();
        let cg = TestCgroup::new();
        let ca = TestCa::new("abtest netns upstream CA");
        let mut options = UpstreamOptions::api();
        options.ip = IpAddr::V4(root_ip);
        options.plain = false;
        let api = TestUpstream::start(&ca, options);
        let policy = format!(
            "cgroup = \"{}\"\n{}",
            cg.path(),
            rule(API, api.port(), true)
        );
        let broker = Broker::builder()
            .upstream_ca(ca.pem_path())
            .name(API, root_ip)
            .policy("netns", &policy)
            .start();
        let secret = Canary::new();
        broker.secret_set(SECRET_NAME, secret.expose().as_bytes());
        let placeholder = Canary::with_prefix("abtest-placeholder-");
        api.watch_for("secret", &secret);
        api.watch_for("placeholder", &placeholder);
        let broker_ca = broker.export_ca();
        Self {
            broker,
            api,
            _ca: ca,
            broker_ca,
            secret,
            placeholder,
            root_ip,
            _host: host,
            cg,
        }
    }

    fn https(&self, bind: Option<u16>) -> serde_json::Value {
        let mut cfg = serde_json::json!({
            "mode": "https",
            "host": API,
            "ip": self.root_ip.to_string(),
            "port": self.api.port(),
            "ca": self.broker_ca.display().to_string(),
            "placeholder": self.placeholder.expose(),
        });
        if let Some(port) = bind {
            cfg["bind"] = port.into();
        }
        cfg
    }

    /// `brokerctl attach --pid`; returns the workload brokerd now serves.
    fn attach_pid(&self, pid: u32) -> WorkloadStatus {
        let out = self.broker.ctl_ok(&["attach", "--pid", &pid.to_string()]);
        assert!(
            out.contains("serving network namespace"),
            "attach --pid {pid} should open listeners in its namespace: {out}"
        );
        self.broker
            .status()
            .workloads
            .into_iter()
            .find(|w| w.pid == pid)
            .unwrap_or_else(|| panic!("status lists no workload for pid {pid}: {out}"))
    }

    /// Asserts a 200 from /hash proving the API received `Bearer <secret>` from brokerd, and
    /// that brokerd attributed the call to `cgroup` and the client's pid.
    fn assert_injected(&self, what: &str, report: &serde_json::Value, cgroup: &str) {
        assert_eq!(
            report["status"].as_u64(),
            Some(200),
            "{what}: {report}\nbrokerd's log:\n{}",
            self.broker.log()
        );
        let body: serde_json::Value =
            serde_json::from_str(report["body"].as_str().unwrap_or("")).unwrap_or_default();
        assert_eq!(
            body["authorization_sha256"].as_str(),
            Some(self.secret.sha256_with_prefix("Bearer ").as_str()),
            "{what}: the API did not receive `Bearer <secret>`"
        );
        self.secret
            .assert_absent(report.to_string().as_bytes(), "the client's output");
        let pid = report["pid"].as_u64().unwrap_or(0) as u32;
        let conn = self
            .broker
            .wait_connection(what, |c| c.origin.as_ref().is_some_and(|o| o.pid == pid));
        let origin = conn.origin.clone().unwrap_or_else(|| panic!("{conn:?}"));
        assert_eq!(origin.cgroup, cgroup, "{what}: {conn:?}");
        assert_eq!(
            origin.original_dst,
            SocketAddr::new(IpAddr::V4(self.root_ip), self.api.port()),
            "{what}: {conn:?}"
        );
        self.api
            .assert_injected_by(what, "/hash", self.broker.pid());
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
}

/// A DNS name's A answer holds `ip` (the 4 bytes appear in the answer section).
fn answer_has(report: &serde_json::Value, ip: Ipv4Addr) -> bool {
    let hex: String = ip.octets().iter().map(|b| format!("{b:02x}")).collect();
    report["answer_hex"]
        .as_str()
        .is_some_and(|a| a.contains(&hex))
}

/// An agent in a namespace of its own, attached by pid: its HTTPS call gets the key injected
/// by brokerd; brokerd's DNS answers inside the namespace (an allowed name with its address, a
/// name no rule allows with REFUSED); a host loopback service is neither reached directly nor
/// through brokerd (refused, audited); `status` lists the namespace; and killing the workload
/// releases the listeners and the namespace's map entry.
#[test]
fn workload_namespace_is_brokered_and_released() {
    let s = Setup::new();
    let cg = s.cg.path().to_string();
    let mut w = Workload::start(&cg);
    let workload = s.attach_pid(w.pid());
    assert_eq!(workload.cgroup, cg);
    assert_eq!(workload.tag, cg);
    assert_eq!(workload.state, "serving");
    assert!(
        workload
            .listeners
            .iter()
            .any(|a| a.ip() == IpAddr::from([127, 0, 0, 1])),
        "{workload:?}"
    );
    let again = s.broker.ctl_ok(&["attach", "--pid", &w.pid().to_string()]);
    assert!(
        again.contains("already tagged")
            && again.contains(&format!(
                "serving network namespace {}",
                workload.netns_cookie
            )),
        "a second attach of the same workload is answered with its state: {again}"
    );
    assert_eq!(s.broker.status().workloads.len(), 1);
    let own = agent_broker_tests::bpf::own_netns_cookie().expect("own cookie");
    assert_ne!(workload.netns_cookie, own);
    assert!(s.served_cookies().contains(&workload.netns_cookie));
    let text = s.broker.ctl_ok(&["status"]);
    assert!(
        text.contains("WORKLOAD NETNS") && text.contains(&workload.netns_cookie.to_string()),
        "status should list the workload namespace: {text}"
    );

    let report = w.client(s.https(None));
    s.assert_injected("https from the workload namespace", &report, &cg);

    // brokerd's DNS inside the namespace, whatever resolver the client names.
    let allowed = w.client(serde_json::json!({"mode": "dns", "name": API}));
    assert_eq!(allowed["rcode"].as_u64(), Some(0), "{allowed}");
    assert!(answer_has(&allowed, s.root_ip), "{allowed}");
    assert_eq!(allowed["from"].as_str(), Some("127.0.0.1:53"), "{allowed}");
    // DNS over TCP to a loopback resolver (127.0.0.53) is answered by brokerd too, not refused
    // as a loopback destination (which would close it unanswered). The harness's resolver
    // speaks UDP only, so the answer checked is brokerd's own REFUSED for a name no rule allows.
    let over_tcp =
        w.client(serde_json::json!({"mode": "dnstcp", "name": "not-allowed.example.test"}));
    assert_eq!(over_tcp["rcode"].as_u64(), Some(5), "{over_tcp}");
    let refused = w.client(serde_json::json!({"mode": "dns", "name": "not-allowed.example.test"}));
    assert_eq!(
        refused["rcode"].as_u64(),
        Some(5),
        "a name no rule allows must get REFUSED from brokerd: {refused}"
    );

    // A host loopback service: from the namespace, 127.0.0.1 is the namespace's own loopback.
    let host_service = TestServer::echo("127.0.0.1:0");
    let report = w.client(serde_json::json!({
        "mode": "tcp", "ip": "127.0.0.1", "port": host_service.addr().port()
    }));
    assert!(
        report["got"].as_str().is_none_or(str::is_empty),
        "nothing may answer a loopback destination from the workload: {report}"
    );
    std::thread::sleep(Duration::from_millis(300));
    assert!(
        host_service.accepted().is_empty(),
        "the host's loopback service must not be reached: {:?}",
        host_service.accepted()
    );
    let pid = report["pid"].as_u64().unwrap_or(0) as u32;
    let conn = s.broker.wait_connection("loopback destination", |c| {
        c.origin.as_ref().is_some_and(|o| o.pid == pid)
    });
    assert_eq!(
        conn.outcome,
        Outcome::Refused {
            reason: LOOPBACK_REFUSED.into()
        },
        "{conn:?}"
    );
    let audited = poll_until(SHORT, || {
        s.broker.audit_records().into_iter().find(|e| {
            e.pid == Some(pid)
                && e.reason
                    .as_deref()
                    .is_some_and(|r| r.contains(LOOPBACK_REFUSED))
        })
    });
    assert!(audited.is_some(), "the refusal must be audited");

    // brokerd's listener holds its port inside the namespace (a process outside the tagged
    // cgroup cannot bind it there) until the namespace is released.
    let port = workload.listeners[0].port();
    assert_eq!(w.bind_outside_cgroup(port), "EADDRINUSE");

    // Removing the workload (its last process exits) releases the namespace.
    w.kill();
    let released = poll_until(Duration::from_secs(10), || {
        s.broker.status().workloads.is_empty().then_some(())
    });
    assert!(
        released.is_some(),
        "status still lists the workload after its last process exited: {:?}",
        s.broker.status().workloads
    );
    assert!(
        !s.served_cookies().contains(&workload.netns_cookie),
        "the released namespace's NETNS_LISTENERS entry must be gone"
    );
    let freed = poll_until(SHORT, || {
        (w.bind_outside_cgroup(port) == "ok").then_some(())
    });
    assert!(
        freed.is_some(),
        "brokerd's listener in the released namespace must be closed"
    );
    let audited = poll_until(SHORT, || {
        s.broker.audit_records().into_iter().find(|e| {
            e.reason.as_deref().is_some_and(|r| {
                r.contains("released") && r.contains(&workload.netns_cookie.to_string())
            })
        })
    });
    assert!(audited.is_some(), "the release must be audited");
}

/// Two workload namespaces whose clients use the same loopback source address and port: each
/// call is attributed to its own cgroup (the records are keyed by namespace as well as address).
#[test]
fn equal_source_ports_in_two_namespaces_are_attributed_apart() {
    let s = Setup::new();
    let (a, b) = (s.cg.create_child("a"), s.cg.create_child("b"));
    let wa = Workload::start(&a);
    let wb = Workload::start(&b);
    let (na, nb) = (s.attach_pid(wa.pid()), s.attach_pid(wb.pid()));
    assert_ne!(na.netns_cookie, nb.netns_cookie);
    let port = 20_000 + (std::process::id() % 20_000) as u16;
    let (ra, rb) = std::thread::scope(|scope| {
        let ha = scope.spawn(|| wa.client(s.https(Some(port))));
        let hb = scope.spawn(|| wb.client(s.https(Some(port))));
        (ha.join().expect("client a"), hb.join().expect("client b"))
    });
    assert_eq!(ra["local"].as_u64(), Some(u64::from(port)), "{ra}");
    assert_eq!(rb["local"].as_u64(), Some(u64::from(port)), "{rb}");
    s.assert_injected("namespace a", &ra, &a);
    s.assert_injected("namespace b", &rb, &b);

    // Detaching a's tag releases a's namespace only.
    s.broker.detach(&a);
    let status = s.broker.status();
    assert_eq!(
        status
            .workloads
            .iter()
            .map(|w| w.cgroup.as_str())
            .collect::<Vec<_>>(),
        [b.as_str()],
        "{:?}",
        status.workloads
    );
    let served = s.served_cookies();
    assert!(!served.contains(&na.netns_cookie) && served.contains(&nb.netns_cookie));
}

/// `attach --cgroup` of a cgroup whose process already runs in a namespace of its own opens
/// listeners there too.
#[test]
fn attach_cgroup_serves_the_namespaces_of_its_processes() {
    let s = Setup::new();
    let cg = s.cg.path().to_string();
    let w = Workload::start(&cg);
    s.broker.attach(&cg);
    let status = s.broker.status();
    let workload = status
        .workloads
        .iter()
        .find(|x| x.pid == w.pid())
        .unwrap_or_else(|| {
            panic!(
                "no workload for the cgroup's process: {:?}",
                status.workloads
            )
        });
    assert_eq!(workload.cgroup, cg);
    let report = w.client(s.https(None));
    s.assert_injected("after attach --cgroup", &report, &cg);
}

/// kill -9 of brokerd: calls from the workload namespace are refused (the namespace's entry
/// still redirects to brokerd's port there, where nothing listens), never direct; brokerd
/// restarted with the same state and pin dirs re-opens the namespace with no new attach.
#[test]
fn workload_namespace_fails_closed_while_brokerd_is_down_and_is_reopened_at_restart() {
    let mut s = Setup::new();
    let cg = s.cg.path().to_string();
    let w = Workload::start(&cg);
    let workload = s.attach_pid(w.pid());
    let report = w.client(s.https(None));
    s.assert_injected("before the restart", &report, &cg);

    s.broker.kill9();
    let handshakes = s.api.handshakes();
    let report = w.client(s.https(None));
    assert_eq!(
        report["error"].as_str(),
        Some("ECONNREFUSED"),
        "with brokerd down the call must be refused: {report}"
    );
    assert_eq!(
        s.api.handshakes(),
        handshakes,
        "nothing may reach the API directly"
    );
    assert!(
        s.served_cookies().contains(&workload.netns_cookie),
        "the pinned entry keeps redirecting while brokerd is down"
    );

    s.broker.restart();
    let reopened = poll_until(SHORT, || {
        s.broker
            .status()
            .workloads
            .into_iter()
            .find(|x| x.netns_cookie == workload.netns_cookie)
    });
    let reopened = reopened.unwrap_or_else(|| {
        panic!(
            "the restarted brokerd does not serve the namespace again:\n{}",
            s.broker.log()
        )
    });
    assert_eq!(reopened.cgroup, cg);
    assert_eq!(reopened.pid, w.pid());
    let report = w.client(s.https(None));
    s.assert_injected("after the restart", &report, &cg);

    // Gone while brokerd is down: not re-opened, and its entry is deleted at start.
    s.broker.kill9();
    let mut w = w;
    w.kill();
    s.broker.restart();
    let status = s.broker.status();
    assert!(status.workloads.is_empty(), "{:?}", status.workloads);
    assert!(
        !s.served_cookies().contains(&workload.netns_cookie),
        "an entry no live workload claims must be deleted at start"
    );
}

/// A namespace whose `lo` is down could not reach listeners there: the attach fails with that
/// reason, the tag it made is undone, and the namespace gets no entry (its connects stay
/// refused in the kernel).
#[test]
fn attach_pid_refuses_a_namespace_whose_loopback_is_down() {
    let s = Setup::new();
    let cg = s.cg.path().to_string();
    let w = Workload::start(&cg);
    let down = std::process::Command::new("ip")
        .args(["-n", w.ns.name(), "link", "set", "lo", "down"])
        .status()
        .expect("ip link set lo down");
    assert!(down.success());
    let cookies_before = s.served_cookies();
    let out = s
        .broker
        .ctl_output(&["attach", "--pid", &w.pid().to_string()]);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "attach must fail: {stderr}");
    assert!(
        stderr.contains("loopback interface `lo` is down"),
        "the error must say why: {stderr}"
    );
    assert_eq!(s.served_cookies(), cookies_before, "no entry may be left");
    let status = s.broker.status();
    assert!(status.workloads.is_empty(), "{:?}", status.workloads);
    assert!(
        status.cgroups.iter().all(|c| c.path != cg),
        "the tag the failed attach made must be undone: {:?}",
        status.cgroups
    );
}

/// `attach --pid` of a process in brokerd's own namespace only tags its cgroup (nothing to
/// open); a pid that names no process is refused and tags nothing.
#[test]
fn attach_pid_in_brokerds_namespace_only_tags_and_a_missing_pid_is_refused() {
    let s = Setup::new();
    let cg = s.cg.path().to_string();
    let mut cmd = std::process::Command::new("sleep");
    cmd.arg("1000")
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null());
    let mut keeper = spawn_in_cgroup(&cg, &mut cmd);
    let pid = keeper.id();
    // `attach --container` names the cgroup it read for the pid: brokerd refuses a process
    // found elsewhere (a pid reused since), and tags nothing.
    let elsewhere = format!("{cg}-elsewhere");
    let refused = s.broker.request(&Request::AttachPid {
        pid,
        name: None,
        within: Some(elsewhere.clone()),
    });
    assert!(
        matches!(&refused, Response::Error { message, .. }
            if message.contains(&format!("not in {elsewhere}"))),
        "{refused:?}"
    );
    assert!(s.broker.status().cgroups.iter().all(|c| c.path != cg));
    let out = s.broker.ctl_ok(&["attach", "--pid", &pid.to_string()]);
    assert!(
        out.contains(&format!("tagged {cg}")) && out.contains("brokerd's own network namespace"),
        "{out}"
    );
    let status = s.broker.status();
    assert!(
        status.cgroups.iter().any(|c| c.path == cg),
        "{:?}",
        status.cgroups
    );
    assert!(status.workloads.is_empty(), "{:?}", status.workloads);
    let _ = kill(
        Pid::from_raw(i32::try_from(pid).unwrap_or(i32::MAX)),
        Signal::SIGKILL,
    );
    let _ = keeper.wait();

    // A pid beyond pid_max names no process.
    let out = s.broker.ctl_output(&["attach", "--pid", "2147483647"]);
    assert!(!out.status.success());
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("2147483647"), "{stderr}");
}
