//! Issue 6, bypass resistance: the attack battery (`attack-battery`, a static binary) runs
//! inside a tagged cgroup under the real launcher (`brokerctl run`), once as an unprivileged uid
//! and once as root inside a user namespace, against a real brokerd with a canary secret.
//!
//! Pass means, for each tier: every row of the battery met its exact expectation; nothing
//! reached the "outside" recorders (a loopback TCP listener, a UDP socket, a pathname and an
//! abstract AF_UNIX socket run by the test, outside the broker); the canary secret is in none
//! of the battery's output, DNS answers included; the allowed API received the real secret
//! (the positive control); and the audit log has a denial for the blocked attempts that
//! reached brokerd (the HTTP request to the outside service, the refused DNS name).
//!
//! The battery's table is written to `$AGENT_BROKER_BATTERY_OUT/<tier>.txt` (`cargo xtask test`
//! prints it) or, without that variable, to the test's output.
//!
//! A third tier (issue 19), `attack_battery_in_an_unprivileged_sandbox`: the battery with
//! `--sandbox` under `brokerctl run --unprivileged --as <agent>` as uid 65534, against
//! `brokerd --unprivileged` as the same uid, with the same policy and the same oracles where
//! they apply (no kernel counters and no tagged cgroup in that mode; the denial names the
//! agent and its process instead; the squatted plain-HTTP address fails upstream, unwritten).
//!
//! Also here: brokerd's own hardening and what `status` and `doctor` report (hooks, processes
//! started without the launcher), `--require-lsm`, and the launcher's exit codes and refusals.
//!
//! Needs root, cgroup v2 and BPF; user namespaces (the second tier); the static `attack-battery`
//! from `$AGENT_BROKER_ATTACK_BATTERY` or target/static (`cargo xtask build`). BPF LSM is used
//! where the kernel has it; the `--require-lsm` test checks both cases.
//!
//! Run as root: `cargo test -p agent-broker-tests --test bypass -- --test-threads=1`.

use std::{
    io::{Read as _, Write as _},
    net::{SocketAddr, TcpListener, UdpSocket},
    os::unix::net::{UnixDatagram, UnixListener},
    path::PathBuf,
    process::Stdio,
    sync::{Arc, Mutex},
    thread,
    time::Duration,
};

use agent_broker_protocol::{Decision, EventKind};
use agent_broker_tests::{
    Broker, Canary, TestCa, TestCgroup, TestUpstream, UpstreamOptions, clients::agent_copy,
    require_privileges, sha256_hex, wait_with_timeout,
};

const SECRET_NAME: &str = "BATTERY_KEY";
/// The test API's certificate names it (see `TestUpstream`).
const API: &str = "api.example.test";
const DENIED_NAME: &str = "exfil.example.test";
/// The agent's share of connections to brokerd (N65 holds four times as many).
const BATTERY_CONNECTION_SHARE: usize = 16;
/// Where the battery's plain-HTTP "service" is (down; the battery listens there itself, N64).
const SQUAT_IP: std::net::Ipv4Addr = std::net::Ipv4Addr::new(127, 0, 64, 1);
/// The address the fake upstream resolver gives for every name but the API's.
const ANSWER: [u8; 4] = [192, 0, 2, 10];
/// Where the battery's decoy listens: a server with a valid certificate for the API's name at
/// an address the name does not resolve to (N69).
const DECOY_IP: std::net::Ipv4Addr = std::net::Ipv4Addr::new(127, 0, 69, 1);

/// Loopback services outside the broker that must never hear from the agent.
struct Outside {
    tcp: SocketAddr,
    udp: SocketAddr,
    unix: PathBuf,
    abstract_name: String,
    arrivals: Arc<Mutex<Vec<String>>>,
    _dir: tempfile::TempDir,
}

impl Outside {
    fn start() -> Self {
        let dir = tempfile::Builder::new()
            .prefix("abtest-outside-")
            .tempdir()
            .expect("tempdir");
        use std::os::unix::fs::PermissionsExt as _;
        std::fs::set_permissions(dir.path(), std::fs::Permissions::from_mode(0o755))
            .expect("chmod");
        let arrivals = Arc::new(Mutex::new(Vec::new()));
        let record = |what: String, arrivals: &Arc<Mutex<Vec<String>>>| {
            arrivals.lock().expect("arrivals").push(what);
        };
        let tcp = TcpListener::bind("127.0.0.1:0").expect("tcp");
        let tcp_addr = tcp.local_addr().expect("addr");
        let a = arrivals.clone();
        thread::spawn(move || {
            for s in tcp.incoming().flatten() {
                record(format!("tcp from {:?}", s.peer_addr()), &a);
            }
        });
        let udp = UdpSocket::bind("127.0.0.1:0").expect("udp");
        let udp_addr = udp.local_addr().expect("addr");
        let a = arrivals.clone();
        thread::spawn(move || {
            let mut buf = [0u8; 2048];
            while let Ok((_, from)) = udp.recv_from(&mut buf) {
                record(format!("udp from {from}"), &a);
            }
        });
        let unix = dir.path().join("outside.sock");
        let listener = UnixListener::bind(&unix).expect("unix");
        std::fs::set_permissions(&unix, std::fs::Permissions::from_mode(0o777)).expect("chmod");
        let a = arrivals.clone();
        thread::spawn(move || {
            for _ in listener.incoming().flatten() {
                record("unix stream".into(), &a);
            }
        });
        let dgram_path = PathBuf::from(format!("{}.dgram", unix.display()));
        let dgram = UnixDatagram::bind(&dgram_path).expect("unix dgram");
        std::fs::set_permissions(&dgram_path, std::fs::Permissions::from_mode(0o777))
            .expect("chmod");
        let a = arrivals.clone();
        thread::spawn(move || {
            let mut buf = [0u8; 2048];
            while dgram.recv(&mut buf).is_ok() {
                record("unix datagram".into(), &a);
            }
        });
        let abstract_name = format!("abtest-outside-{}", agent_broker_tests::unique_name());
        let abstract_listener = {
            use std::os::linux::net::SocketAddrExt as _;
            let addr = std::os::unix::net::SocketAddr::from_abstract_name(abstract_name.as_bytes())
                .expect("abstract addr");
            UnixListener::bind_addr(&addr).expect("abstract listener")
        };
        let a = arrivals.clone();
        thread::spawn(move || {
            for _ in abstract_listener.incoming().flatten() {
                record("unix abstract".into(), &a);
            }
        });
        Self {
            tcp: tcp_addr,
            udp: udp_addr,
            unix,
            abstract_name,
            arrivals,
            _dir: dir,
        }
    }

    fn arrivals(&self) -> Vec<String> {
        self.arrivals.lock().expect("arrivals").clone()
    }
}

/// A DNS resolver on loopback (UDP and TCP) answering every A query with [`ANSWER`], and the
/// API's name with the API's address (so brokerd's own lookup proves it): the "host's
/// resolver" brokerd forwards allowed names to and asks itself. Counts the queries it got.
struct FakeResolver {
    addr: SocketAddr,
    names: Arc<Mutex<Vec<String>>>,
}

fn dns_answer(query: &[u8], api: [u8; 4]) -> Option<(Vec<u8>, String)> {
    if query.len() < 17 {
        return None;
    }
    let mut i = 12;
    let mut labels = Vec::new();
    while *query.get(i)? != 0 {
        let len = usize::from(query[i]);
        labels.push(String::from_utf8_lossy(query.get(i + 1..i + 1 + len)?).into_owned());
        i += 1 + len;
    }
    let question_end = i + 5;
    let mut reply = query.get(..question_end)?.to_vec();
    reply[2] = 0x81;
    reply[3] = 0x80;
    reply[6..8].fill(0);
    reply[8..12].fill(0);
    let name = labels.join(".");
    let qtype = u16::from_be_bytes([query[i + 1], query[i + 2]]);
    if qtype != 1 {
        // No AAAA (or other) records: an empty answer.
        return Some((reply, name));
    }
    reply[6..8].copy_from_slice(&1u16.to_be_bytes());
    reply.extend_from_slice(&[0xc0, 0x0c, 0, 1, 0, 1, 0, 0, 0, 60, 0, 4]);
    reply.extend_from_slice(if name.eq_ignore_ascii_case(API) {
        &api
    } else {
        &ANSWER
    });
    Some((reply, name))
}

impl FakeResolver {
    fn start(api: std::net::Ipv4Addr) -> Self {
        let api = api.octets();
        for _ in 0..20 {
            let udp = UdpSocket::bind("127.0.0.1:0").expect("udp");
            let addr = udp.local_addr().expect("addr");
            let Ok(tcp) = TcpListener::bind(addr) else {
                continue;
            };
            let names = Arc::new(Mutex::new(Vec::new()));
            let n = names.clone();
            thread::spawn(move || {
                let mut buf = [0u8; 4096];
                while let Ok((len, from)) = udp.recv_from(&mut buf) {
                    if let Some((reply, name)) = dns_answer(&buf[..len], api) {
                        n.lock().expect("names").push(name);
                        let _ = udp.send_to(&reply, from);
                    }
                }
            });
            let n = names.clone();
            thread::spawn(move || {
                for mut s in tcp.incoming().flatten() {
                    let mut len = [0u8; 2];
                    if s.read_exact(&mut len).is_err() {
                        continue;
                    }
                    let mut q = vec![0u8; usize::from(u16::from_be_bytes(len))];
                    if s.read_exact(&mut q).is_err() {
                        continue;
                    }
                    if let Some((reply, name)) = dns_answer(&q, api) {
                        n.lock().expect("names").push(name);
                        let mut framed = (reply.len() as u16).to_be_bytes().to_vec();
                        framed.extend_from_slice(&reply);
                        let _ = s.write_all(&framed);
                    }
                }
            });
            return Self { addr, names };
        }
        panic!("no port for the fake resolver");
    }
}

fn battery_binary() -> PathBuf {
    let path = std::env::var_os("AGENT_BROKER_ATTACK_BATTERY")
        .map(PathBuf::from)
        .unwrap_or_else(|| {
            agent_broker_tests::workspace_dir().join("target/static/attack-battery")
        });
    assert!(
        path.is_file(),
        "the attack battery is missing at {}: build it with `cargo xtask build` (it links \
         attack-battery statically and copies it there), or set AGENT_BROKER_ATTACK_BATTERY",
        path.display()
    );
    path
}

#[derive(serde::Deserialize, Debug)]
struct Row {
    id: String,
    attack: String,
    expected: String,
    outcome: String,
    pass: bool,
}

fn table(tier: &str, rows: &[Row]) -> String {
    let mut t = format!(
        "attack battery, tier {tier}: {} rows, {} failed\n{:<5} {:<72} {:<36} {:<26} RESULT\n",
        rows.len(),
        rows.iter().filter(|r| !r.pass).count(),
        "ID",
        "ATTACK",
        "EXPECTED",
        "OUTCOME"
    );
    for r in rows {
        t.push_str(&format!(
            "{:<5} {:<72} {:<36} {:<26} {}\n",
            r.id,
            r.attack,
            r.expected,
            r.outcome,
            if r.pass { "pass" } else { "FAIL" }
        ));
    }
    t
}

fn publish(tier: &str, text: &str) {
    match std::env::var_os("AGENT_BROKER_BATTERY_OUT") {
        Some(dir) => {
            let dir = PathBuf::from(dir);
            std::fs::create_dir_all(&dir).expect("battery out dir");
            std::fs::write(dir.join(format!("{tier}.txt")), text).expect("write table");
        }
        None => println!("{text}"),
    }
}

/// How a tier starts the battery.
#[derive(Clone, Copy)]
enum Launch<'a> {
    /// `brokerctl run --cgroup <tagged> --create IDENTITY...` against a root brokerd (eBPF).
    Cgroup(&'a [&'a str]),
    /// `brokerctl run --unprivileged --as <agent>` as this uid, against `brokerd --unprivileged`
    /// running as the same uid (issue 19): the battery runs with `--sandbox`.
    Sandbox(u32),
}

fn run_tier(tier: &str, launch: Launch) {
    require_privileges();
    // A sandbox's agent is named like a cgroup (the policy's `cgroup` key names it), but no
    // cgroup is made or tagged.
    let (_cg, agent) = match launch {
        Launch::Cgroup(_) => {
            let cg = TestCgroup::new();
            let agent = cg.child("agent");
            (Some(cg), agent)
        }
        Launch::Sandbox(_) => (
            None,
            format!("abtest-sandbox-{}/agent", agent_broker_tests::unique_name()),
        ),
    };
    let outside = Outside::start();
    let ca = TestCa::new("abtest battery CA");
    let api = TestUpstream::start(&ca, UpstreamOptions::api());
    let std::net::IpAddr::V4(api_ip) = api.addr().ip() else {
        panic!("the test API listens on IPv4")
    };
    let resolver = FakeResolver::start(api_ip);
    // N69: a server with a valid certificate for the API's name, elsewhere.
    let decoy = TestUpstream::start(
        &ca,
        UpstreamOptions {
            ip: DECOY_IP.into(),
            plain: false,
            ..UpstreamOptions::api()
        },
    );
    // N64: a plain-HTTP service that is down; the battery listens on its address itself.
    let squat = std::net::TcpListener::bind((SQUAT_IP, 0))
        .and_then(|l| l.local_addr())
        .expect("a free port for the squatted service");
    let policy = format!(
        "cgroup = \"{agent}\"\n\n[[allow]]\nhost = \"{API}\"\nport = {}\n\
         inject.headers = {{ authorization = \"Bearer {{secret:{SECRET_NAME}}}\" }}\n\n\
         [[allow]]\nhost = \"{API}\"\nport = {}\n\
         inject.headers = {{ authorization = \"Bearer {{secret:{SECRET_NAME}}}\" }}\n\n\
         [[allow]]\nhost = \"{}\"\nport = {}\nplain_http = true\n\
         inject.headers = {{ authorization = \"Bearer {{secret:{SECRET_NAME}}}\" }}\n\n\
         [dns]\nallow = [\"{API}\"]\n\n\
         [shares]\nconnections = {BATTERY_CONNECTION_SHARE}\n",
        api.port(),
        decoy.port(),
        squat.ip(),
        squat.port()
    );
    let builder = match launch {
        Launch::Cgroup(_) => Broker::builder(),
        Launch::Sandbox(uid) => Broker::builder().unprivileged(uid),
    };
    let broker = builder
        .upstream_ca(ca.pem_path())
        .policy("battery", &policy)
        .arg("--dns-port")
        .arg("0")
        .arg("--dns-upstream")
        .arg(&resolver.addr.to_string())
        .start();
    let secret = Canary::new();
    broker.secret_set(SECRET_NAME, secret.expose().as_bytes());
    let placeholder = Canary::with_prefix("abtest-placeholder-");
    api.watch_for("secret", &secret);
    api.watch_for("placeholder", &placeholder);
    decoy.watch_for("secret", &secret);

    let status = broker.status();
    let tcp_port = status.listeners[0].port();
    let dns_port = status
        .dns_listeners
        .first()
        .map(|a| a.port())
        .unwrap_or_else(|| panic!("brokerd reports no DNS listener: {status:?}"));
    let battery = agent_copy(&broker, &battery_binary());
    let state = broker.state_dir();
    let mut cmd = match launch {
        Launch::Cgroup(identity) => {
            let mut cmd = broker.ctl();
            cmd.args(["run", "--cgroup", &agent, "--create"])
                .args(identity)
                .arg("--")
                .arg(&battery);
            cmd
        }
        Launch::Sandbox(uid) => {
            let argv = agent_broker_tests::as_uid(uid, &agent_broker_tests::bin("brokerctl"));
            let mut cmd = std::process::Command::new(&argv[0]);
            cmd.args(&argv[1..])
                .arg("--run-dir")
                .arg(broker.run_dir())
                .args(["run", "--unprivileged", "--as", &agent, "--"])
                .arg(&battery)
                .arg("--sandbox");
            cmd
        }
    };
    cmd.arg("--json")
        .args(["--outside-tcp", &outside.tcp.to_string()])
        .args(["--outside-udp", &outside.udp.to_string()])
        .arg("--outside-unix")
        .arg(&outside.unix)
        .args(["--outside-abstract", &outside.abstract_name])
        .args(["--broker-ports", &format!("{tcp_port},{dns_port}")])
        .args(["--broker-pid", &broker.pid().to_string()])
        // Any resolver address: the kernel sends port 53 to brokerd, so this never leaves.
        .args(["--resolver", "8.8.8.8:53"])
        .args(["--dns-name", API, "--dns-denied", DENIED_NAME])
        .args(["--allowed-host", API])
        .args(["--allowed-connect", &api.addr().to_string()])
        .args(["--placeholder", placeholder.expose()])
        .args(["--squat", &squat.to_string()])
        .args(["--connection-share", &BATTERY_CONNECTION_SHARE.to_string()])
        .args(["--decoy", &decoy.addr().to_string()])
        .arg("--protected-path")
        .arg(state.join("master.key"))
        .arg("--protected-path")
        .arg(state.join("vault.redb"))
        .arg("--protected-path")
        .arg(broker.run_dir().join("control.sock"));
    match launch {
        Launch::Cgroup(_) => cmd.arg("--protected-path").arg(broker.pin_dir()),
        // brokerd runs as the agent's uid here: its directories are hidden from the sandbox.
        Launch::Sandbox(_) => cmd
            .arg("--protected-path")
            .arg(broker.run_dir().join("sandbox.sock"))
            .arg("--protected-path")
            .arg(broker.policy_dir().join("battery")),
    };
    cmd.current_dir(broker.scratch_dir())
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    // A socket created outside the cgroup and leaked into brokerctl (fd 5, no close-on-exec):
    // it would carry traffic around the hooks (B30), so the launcher must not pass it on (the
    // battery's N38 row checks the agent's descriptors).
    let leaked = UdpSocket::bind("127.0.0.1:0").expect("socket to leak");
    let leaked_fd = std::os::fd::AsRawFd::as_raw_fd(&leaked);
    // SAFETY: dup2 is async-signal-safe; the fd stays open in the parent until the child ran.
    unsafe {
        std::os::unix::process::CommandExt::pre_exec(&mut cmd, move || {
            if libc::dup2(leaked_fd, 5) < 0 {
                return Err(std::io::Error::last_os_error());
            }
            Ok(())
        });
    }
    let child = cmd
        .spawn()
        .unwrap_or_else(|e| panic!("cannot start {cmd:?}: {e}"));
    let out = wait_with_timeout(child, Duration::from_secs(120), "attack-battery");
    drop(leaked);
    let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
    let stderr = String::from_utf8_lossy(&out.stderr).into_owned();
    secret.assert_absent(&out.stdout, "the battery's output");
    secret.assert_absent(&out.stderr, "the battery's stderr");
    // Nor in any file the agent could read or write in its directories, nor in the environment
    // it was started with.
    for entry in std::fs::read_dir(broker.scratch_dir())
        .expect("scratch dir")
        .flatten()
    {
        if entry.path().is_file() {
            let bytes = std::fs::read(entry.path()).unwrap_or_default();
            secret.assert_absent(&bytes, &format!("{}", entry.path().display()));
        }
    }
    let env: Vec<u8> = std::env::vars_os()
        .flat_map(|(k, v)| {
            let mut b = k.into_encoded_bytes();
            b.push(b'=');
            b.extend(v.into_encoded_bytes());
            b.push(0);
            b
        })
        .collect();
    secret.assert_absent(&env, "the environment the agent inherits");
    let rows: Vec<Row> = stdout
        .lines()
        .filter(|l| l.starts_with('{'))
        .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("bad row ({e}): {l}")))
        .collect();
    let text = table(tier, &rows);
    publish(tier, &text);
    assert!(
        !rows.is_empty(),
        "the battery printed no rows ({}); stderr:\n{stderr}\nbrokerd's log:\n{}",
        out.status,
        broker.log()
    );
    let failed: Vec<&Row> = rows.iter().filter(|r| !r.pass).collect();
    assert!(
        failed.is_empty(),
        "tier {tier}: rows failed: {failed:#?}\n{text}\nstderr:\n{stderr}"
    );
    assert!(
        out.status.success(),
        "battery exit {}: {stderr}",
        out.status
    );
    // Every row of 7.2 that applies to one host is accounted for.
    for id in [
        "N01", "N02", "N03", "N04", "N05", "N06", "N07", "N08", "N10", "N11", "N12", "N13", "N14",
        "N15", "N16", "N17", "N18", "N19", "N20", "N21", "N22", "N23", "N24", "N25", "N26", "N27",
        "N28", "N29", "N31", "N32", "N33", "N34", "N35", "N36", "N37", "N38", "N39", "N40", "N41",
        "N42", "N51", "N52", "N53", "N54", "N55", "N64", "N65", "N69",
    ] {
        assert!(
            rows.iter().any(|r| r.id == id),
            "row {id} missing from the battery:\n{text}"
        );
    }
    let sandboxed = matches!(launch, Launch::Sandbox(_));
    if sandboxed {
        // The sandbox's own rows (rules, routes, namespaces, SO_MARK), and every skipped row
        // says why.
        for id in ["U01", "U02", "U03", "U04"] {
            assert!(
                rows.iter().any(|r| r.id == id),
                "row {id} missing from the battery:\n{text}"
            );
        }
        for r in rows.iter().filter(|r| r.expected == "skipped") {
            assert!(
                r.outcome.starts_with("skipped: root mode only: ") && r.outcome.len() > 40,
                "a skipped row must give its reason: {r:?}"
            );
        }
    } else {
        assert!(
            rows.iter().all(|r| r.expected != "skipped"),
            "no row is skipped in root mode:\n{text}"
        );
    }

    // Independent oracles.
    thread::sleep(Duration::from_millis(300));
    let arrivals = outside.arrivals();
    assert!(
        arrivals.is_empty(),
        "tier {tier}: something reached the outside services directly: {arrivals:?}"
    );
    assert_eq!(
        (decoy.connections(), decoy.requests().len()),
        (0, 0),
        "tier {tier}: the decoy with a valid certificate for {API} was reached (N69)"
    );
    let names = resolver.names.lock().expect("names").clone();
    assert!(
        names.iter().all(|n| n == API),
        "tier {tier}: the host's resolver was asked for names the policy does not allow: {names:?}"
    );
    assert!(!names.is_empty(), "the allowed name was never forwarded");
    let expected_auth = sha256_hex(format!("Bearer {}", secret.expose()).as_bytes());
    assert!(
        api.requests()
            .iter()
            .any(|r| r.header_hash("authorization") == Some(expected_auth.as_str())),
        "tier {tier}: the allowed API never received the real secret (positive control)"
    );
    // Denials that reached brokerd are audited.
    let audit = {
        let mut found = Vec::new();
        for _ in 0..50 {
            found = broker.audit_records();
            let has_http = found
                .iter()
                .any(|e| e.original_dst == Some(outside.tcp) && e.decision == Some(Decision::Deny));
            let has_dns = found.iter().any(|e| {
                e.kind == Some(EventKind::Dns)
                    && e.host.as_deref() == Some(DENIED_NAME)
                    && e.decision == Some(Decision::Deny)
            });
            // In a sandbox the squatted listener is in the sandbox's network namespace, out of
            // brokerd's reach: the call fails upstream instead (N64).
            let has_squat = found.iter().any(|e| {
                e.original_dst == Some(squat) && (sandboxed || e.decision == Some(Decision::Deny))
            });
            let has_decoy = found.iter().any(|e| {
                e.original_dst == Some(decoy.addr()) && e.decision == Some(Decision::Deny)
            });
            if has_http && has_dns && has_squat && has_decoy {
                break;
            }
            thread::sleep(Duration::from_millis(100));
        }
        found
    };
    assert!(
        audit.iter().any(|e| e.original_dst == Some(outside.tcp)
            && e.decision == Some(Decision::Deny)
            && e.cgroup.as_deref() == Some(agent.as_str())),
        "tier {tier}: no audited denial for the request to the outside service: {audit:#?}"
    );
    assert!(
        audit.iter().any(|e| e.kind == Some(EventKind::Dns)
            && e.host.as_deref() == Some(DENIED_NAME)
            && e.decision == Some(Decision::Deny)),
        "tier {tier}: no audited DNS denial for {DENIED_NAME}"
    );
    if sandboxed {
        // The squatted listener is in the sandbox's network namespace: brokerd dialed the
        // address in its own, where nothing listens, and nothing was written anywhere (N64).
        assert!(
            audit.iter().any(|e| e.original_dst == Some(squat)
                && e.cgroup.as_deref() == Some(agent.as_str())
                && e.status == Some(502)
                && e.bytes_out == 0
                && e.reason
                    .as_deref()
                    .is_some_and(|r| r.contains("cannot connect"))),
            "tier {tier}: no audited failure for the call to {squat} (N64): {audit:#?}"
        );
    } else {
        assert!(
            audit.iter().any(|e| e.original_dst == Some(squat)
                && e.decision == Some(Decision::Deny)
                && e.cgroup.as_deref() == Some(agent.as_str())
                && e.reason.as_deref().is_some_and(
                    |r| r.contains("brokerd sends no credential to an agent's listener")
                )),
            "tier {tier}: no audited denial for the call to the agent's own listener on {squat} \
         (N64): {audit:#?}"
        );
    }
    assert!(
        audit.iter().any(|e| e.original_dst == Some(decoy.addr())
            && e.decision == Some(Decision::Deny)
            && e.cgroup.as_deref() == Some(agent.as_str())
            && e.reason.as_deref().is_some_and(|r| {
                r.contains(&format!("nothing proves that {DECOY_IP} is {API}"))
            })),
        "tier {tier}: no audited denial for the call to the decoy at {} (N69): {audit:#?}",
        decoy.addr()
    );
    secret.assert_absent(broker.log().as_bytes(), "brokerd's log");
    let status = broker.status();
    if sandboxed {
        // No eBPF: no tagged cgroup and no kernel counters. The sandbox's connections are the
        // agent's by name, and by its process (the battery, the command brokerctl executed).
        assert!(
            status.cgroups.is_empty(),
            "tier {tier}: an unprivileged brokerd tags no cgroup: {:?}",
            status.cgroups
        );
        let denial = audit
            .iter()
            .find(|e| e.original_dst == Some(outside.tcp) && e.decision == Some(Decision::Deny))
            .unwrap_or_else(|| panic!("tier {tier}: no denial of {}", outside.tcp));
        assert!(
            denial.pid.is_some_and(|p| p != broker.pid())
                && denial.comm.as_deref() == Some("attack-battery"),
            "tier {tier}: the denial names the sandbox's agent process: {denial:#?}"
        );
        return;
    }
    assert!(
        status.counters.udp_refused > 0
            && status.counters.socket_refused > 0
            && status.counters.bind_refused > 0
            && status.counters.dns_redirected > 0,
        "tier {tier}: the kernel counters should show the refusals: {:?}",
        status.counters
    );
}

#[test]
fn attack_battery_as_an_unprivileged_uid() {
    run_tier("unprivileged-uid", Launch::Cgroup(&["--user", "65534"]));
}

#[test]
fn attack_battery_as_root_in_a_user_namespace() {
    run_tier("userns-root", Launch::Cgroup(&["--userns"]));
}

/// Issue 19: the battery as the agent of `brokerctl run --unprivileged --as <agent>` run by uid
/// 65534, against `brokerd --unprivileged` as the same uid, with the same policy and oracles:
/// no eBPF, no root anywhere but the test itself.
#[test]
fn attack_battery_in_an_unprivileged_sandbox() {
    run_tier("unprivileged-sandbox", Launch::Sandbox(65534));
}

#[test]
fn require_lsm_refuses_to_start_where_bpf_lsm_cannot_load() {
    require_privileges();
    let probe = Broker::start();
    let lsm = probe.status().lsm;
    drop(probe);
    let mut strict = Broker::builder().arg("--require-lsm").prepare();
    let started = strict.try_start();
    if lsm.starts_with("active") {
        assert!(
            started.is_ok(),
            "BPF LSM works here, so --require-lsm must start: {started:?}"
        );
    } else {
        let err = started.expect_err("--require-lsm must refuse to start without BPF LSM");
        assert!(
            err.contains("--require-lsm") && err.contains("BPF LSM"),
            "the refusal should name --require-lsm and BPF LSM: {err}"
        );
        assert!(
            lsm.starts_with("not loaded:"),
            "status should say why: {lsm}"
        );
    }
}

#[test]
fn status_lists_every_hook_and_the_kernel_attaches_them() {
    require_privileges();
    let cg = TestCgroup::new();
    let broker = Broker::start();
    broker.attach(cg.path());
    let status = broker.status();
    for (hook, _) in agent_broker_tests::HOOKS {
        let name = hook.replace("sock_ops", "sockops");
        assert!(
            status.hooks.contains(&name),
            "status does not list {hook}: {:?}",
            status.hooks
        );
    }
    // brokerd's own hardening, as it reports it and as the kernel shows it.
    assert!(
        status.hardening.contains("not dumpable")
            && status.hardening.contains("no core dumps")
            && status.hardening.contains("memory locked"),
        "brokerd should be hardened: {:?}",
        status.hardening
    );
    let limits = std::fs::read_to_string(format!("/proc/{}/limits", broker.pid())).expect("limits");
    assert!(
        limits.lines().any(
            |l| l.starts_with("Max core file size") && l.split_whitespace().nth(4) == Some("0")
        ),
        "brokerd's core file size limit should be 0:\n{limits}"
    );
    let proc_status =
        std::fs::read_to_string(format!("/proc/{}/status", broker.pid())).expect("status");
    let locked: u64 = proc_status
        .lines()
        .find_map(|l| l.strip_prefix("VmLck:"))
        .and_then(|v| v.split_whitespace().next()?.parse().ok())
        .unwrap_or(0);
    assert!(
        locked > 0,
        "brokerd's memory should be locked (VmLck): {proc_status}"
    );
    // A process started in the tagged cgroup without the launcher is reported with what it
    // lacks; one started by `brokerctl run` lacks nothing.
    let raw = cg.create_child("raw");
    let mut raw_sleep =
        agent_broker_tests::spawn_in_cgroup(&raw, std::process::Command::new("sleep").arg("30"));
    let sandboxed = cg.child("sandboxed");
    let mut launched = broker
        .ctl()
        .args([
            "run", "--cgroup", &sandboxed, "--create", "--", "sleep", "30",
        ])
        .stdin(Stdio::null())
        .spawn()
        .expect("brokerctl run sleep");
    let mut seen = Vec::new();
    for _ in 0..50 {
        let sandboxed_running = std::fs::read_to_string(
            agent_broker_tests::cgroup2_mount()
                .join(&sandboxed)
                .join("cgroup.procs"),
        )
        // Running the agent itself, not the launcher's child still setting up the sandbox.
        .is_ok_and(|p| {
            p.lines().any(|pid| {
                std::fs::read_to_string(format!("/proc/{}/comm", pid.trim()))
                    .is_ok_and(|c| c.trim() == "sleep")
            })
        });
        // The snapshot is taken after the agent is known to run.
        seen = broker.status().unprotected;
        if sandboxed_running && seen.iter().any(|p| p.pid == raw_sleep.id()) {
            break;
        }
        thread::sleep(Duration::from_millis(100));
    }
    let raw_entry = seen
        .iter()
        .find(|p| p.pid == raw_sleep.id())
        .unwrap_or_else(|| panic!("status should report the unsandboxed process: {seen:#?}"));
    assert!(raw_entry.missing[0].contains("real root"), "{raw_entry:#?}");
    assert!(
        !seen.iter().any(|p| p.cgroup == sandboxed),
        "a process started by brokerctl run should lack nothing: {seen:#?}"
    );
    // doctor says the same, fails, and says how to fix it.
    let state = broker.state_dir();
    let doctor = broker.ctl_output(&["doctor", "--state-dir", &state.to_string_lossy()]);
    let text = String::from_utf8_lossy(&doctor.stdout);
    assert_eq!(
        doctor.status.code(),
        Some(1),
        "doctor must fail with a real-root agent:\n{text}"
    );
    assert!(
        text.lines()
            .any(|l| l.starts_with("FAIL") && l.contains("real root") && l.contains(&raw)),
        "doctor should name the real-root process:\n{text}"
    );
    assert!(
        text.contains("brokerctl run"),
        "doctor should say how to fix it:\n{text}"
    );
    let _ = raw_sleep.kill();
    let _ = raw_sleep.wait();
    // SAFETY: signalling our own child (brokerctl forwards SIGTERM to the agent).
    unsafe { libc::kill(launched.id() as i32, libc::SIGTERM) };
    let _ = launched.wait();
    let counts = agent_broker_tests::attached_programs(cg.path());
    assert!(
        counts.iter().all(|&(_, n)| n == 1),
        "the kernel should report one program on every hook: {counts:?}"
    );
}

#[test]
fn the_launcher_reports_exit_codes_refuses_root_and_starts_nothing_without_brokerd() {
    require_privileges();
    let cg = TestCgroup::new();
    let mut broker = Broker::start();
    let agent = cg.child("agent");
    // The agent's exit status is brokerctl's.
    let out = broker.ctl_output(&[
        "run", "--cgroup", &agent, "--create", "--", "sh", "-c", "exit 7",
    ]);
    assert_eq!(out.status.code(), Some(7), "{out:?}");
    // Killed by a signal: 128 + signal.
    let out = broker.ctl_output(&["run", "--cgroup", &agent, "--", "sh", "-c", "kill -TERM $$"]);
    assert_eq!(out.status.code(), Some(128 + libc::SIGTERM), "{out:?}");
    // Real root is refused, and so is a uid that is not a number.
    for bad in ["0", "0:0", "root"] {
        let out = broker.ctl_output(&["run", "--cgroup", &agent, "--user", bad, "--", "true"]);
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(2), "--user {bad}: {stderr}");
        assert!(
            stderr.contains("--user"),
            "--user {bad}: the error should name the flag: {stderr}"
        );
    }
    // A command that does not exist: 126 with the reason, nothing else started.
    let out = broker.ctl_output(&["run", "--cgroup", &agent, "--", "/nonexistent/agent"]);
    assert_eq!(out.status.code(), Some(126), "{out:?}");
    assert!(String::from_utf8_lossy(&out.stderr).contains("/nonexistent/agent"));
    // Issue 13.9: a TCP socket made out here is never handed to the agent as stdio (the
    // kernel hooks see a socket's creation cgroup, so the agent could re-aim it anywhere).
    let listener = TcpListener::bind("127.0.0.1:0").expect("listener");
    let socket =
        std::net::TcpStream::connect(listener.local_addr().expect("addr")).expect("connect");
    let marker = broker.scratch_dir().join("started-with-a-socket");
    let child = broker
        .ctl()
        .args(["run", "--cgroup", &agent, "--", "touch"])
        .arg(&marker)
        .stdin(Stdio::from(std::os::fd::OwnedFd::from(socket)))
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("start brokerctl run");
    let out = wait_with_timeout(child, Duration::from_secs(20), "brokerctl run < socket");
    assert_eq!(out.status.code(), Some(1), "{out:?}");
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("stdin is an IPv4/IPv6 socket"),
        "{out:?}"
    );
    assert!(
        !marker.exists(),
        "the agent must not start with an inet socket as stdin"
    );
    // brokerd down: the command is not started at all.
    broker.stop();
    let marker = broker.scratch_dir().join("started");
    let out = broker.ctl_output(&[
        "run",
        "--cgroup",
        &agent,
        "--",
        "touch",
        &marker.to_string_lossy(),
    ]);
    assert!(!out.status.success(), "{out:?}");
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("cannot reach brokerd"),
        "{out:?}"
    );
    assert!(
        !marker.exists(),
        "the agent must not start while brokerd is down"
    );
}
