//! Issue 2, transparent capture: the real eBPF path on fresh cgroups, real python and curl clients.
//!
//! Each test has its own cgroup, brokerd, pin dir and temp dirs, and cleans them up on failure.
//! Oracles: brokerd's connection records (`brokerctl connections --json`), the test servers'
//! view of who connected (peer address and the pid owning the peer socket), what the agent saw
//! (getsockname/getpeername, the HTTP answer), and the kernel's own count of attached programs.
//!
//! brokerd terminates HTTP and decides every request by policy (default deny, loopback is not
//! special), so the servers here are plain-HTTP loopback servers and each test that expects a
//! brokered round trip writes a policy allowing exactly those servers before brokerd starts. One
//! test, a process outside every tagged cgroup dialling brokerd's port itself, uses the HTTPS
//! test API instead (`agent_broker_tests::world`): brokerd serves only what the kernel redirected.
//!
//! Needs root, cgroup v2 and BPF; python3 and curl; `ip` (iproute2) for the network namespace of
//! the non-loopback test host.
//!
//! Run as root: `cargo test -p agent-broker-tests --test capture -- --test-threads=1`.

use std::{
    net::{Ipv4Addr, SocketAddr, TcpStream},
    process::Stdio,
    thread,
    time::Duration,
};

use agent_broker_protocol::{ConnectionRecord, Outcome, Request, Response};
use agent_broker_tests::{
    AgentRun, Broker, HOOKS, Mode, SHORT, TestCgroup, TestHost, TestNetns, TestServer, agent,
    attached_programs, canon, cgroup_of, redact, require_privileges, spawn_in_cgroup,
    wait_with_timeout,
    world::{API, World},
};

/// A policy for `cgroup` (and below) allowing plain HTTP to exactly these servers.
fn allow_servers(cgroup: &str, servers: &[&TestServer]) -> String {
    let mut toml = format!("cgroup = \"{cgroup}\"\n");
    for server in servers {
        toml.push_str(&format!(
            "\n[[allow]]\nhost = \"{}\"\nport = {}\n",
            server.addr().ip(),
            server.addr().port()
        ));
    }
    toml
}

/// A brokerd whose policy lets `cgroup` reach `servers`.
fn broker_allowing(cgroup: &str, servers: &[&TestServer]) -> Broker {
    Broker::builder()
        .policy("capture", &allow_servers(cgroup, servers))
        .start()
}

/// Whether brokerd took the connection (anything but a refusal: `brokered`, or a later variant).
fn not_refused(outcome: &Outcome) -> bool {
    !matches!(outcome, Outcome::Refused { .. })
}

/// Asserts that `run` (an agent in cgroup `cgroup`) was captured and relayed by `broker` to
/// `server`, whose address the agent dialled as `dst`. Returns brokerd's record.
fn assert_brokered(
    what: &str,
    broker: &Broker,
    server: &TestServer,
    accepted_before: usize,
    run: &AgentRun,
    cgroup: &str,
    dst: SocketAddr,
) -> ConnectionRecord {
    let r = &run.report;
    run.assert_round_trip(what);
    let local = run.local();
    assert_eq!(
        r.peer,
        Some(dst),
        "{what}: getpeername in the agent must show the original destination, not the broker"
    );

    let record = broker.wait_connection(what, |c| canon(c.peer) == canon(local));
    let origin = record.origin.clone().unwrap_or_else(|| {
        panic!(
            "{what}: brokerd could not resolve the origin: {record:?}\n{}",
            broker.log()
        )
    });
    assert_eq!(origin.cgroup, cgroup, "{what}: cgroup in {record:?}");
    assert_eq!(origin.pid, r.pid, "{what}: pid in {record:?}");
    assert_eq!(origin.tid, r.tid, "{what}: tid in {record:?}");
    assert_eq!(
        canon(origin.original_dst),
        canon(dst),
        "{what}: original destination in {record:?}"
    );
    assert!(
        not_refused(&record.outcome),
        "{what}: brokerd refused the connection: {record:?}"
    );

    let accepted = server.accepted();
    let new = &accepted[accepted_before.min(accepted.len())..];
    assert_eq!(
        new.len(),
        1,
        "{what}: the server should have accepted exactly one connection (brokerd's): {new:?}"
    );
    assert_ne!(
        canon(new[0].peer),
        canon(local),
        "{what}: the server saw the agent's own socket, so the connection went direct"
    );
    assert_eq!(
        new[0].owner,
        Some(broker.pid()),
        "{what}: the server's peer socket {} should belong to brokerd (pid {}), the agent is pid {}",
        new[0].peer,
        broker.pid(),
        r.pid
    );
    assert_eq!(
        r.greeting.as_deref(),
        Some(format!("peer={}", new[0].peer).as_str()),
        "{what}: the agent should read the answer the server sent to brokerd"
    );
    record
}

/// Asserts that `run` went straight to `server`, with no trace in brokerd.
fn assert_direct(
    what: &str,
    broker: &Broker,
    server: &TestServer,
    accepted_before: usize,
    run: &AgentRun,
) {
    let r = &run.report;
    run.assert_round_trip(what);
    let local = run.local();
    let accepted = server.accepted();
    let new = &accepted[accepted_before.min(accepted.len())..];
    assert_eq!(new.len(), 1, "{what}: server accepted {new:?}");
    assert_eq!(
        canon(new[0].peer),
        canon(local),
        "{what}: the server should see the agent's own socket (direct connection)"
    );
    assert_eq!(
        new[0].owner,
        Some(r.pid),
        "{what}: the server's peer socket should belong to the agent"
    );
    assert_eq!(
        r.greeting.as_deref(),
        Some(format!("peer={local}").as_str()),
        "{what}: greeting"
    );
    let leaked: Vec<_> = broker
        .connections()
        .into_iter()
        .filter(|c| {
            canon(c.peer) == canon(local) || c.origin.as_ref().is_some_and(|o| o.pid == r.pid)
        })
        .collect();
    assert!(
        leaked.is_empty(),
        "{what}: brokerd has records for a connection that should not be redirected: {leaked:?}"
    );
}

/// Panics unless the kernel reports exactly `n` programs attached directly to `cgroup` on every
/// one of the hooks in [`HOOKS`].
fn assert_programs_attached(cgroup: &str, n: u32, what: &str) {
    let counts = attached_programs(cgroup);
    assert!(
        counts.iter().all(|&(_, c)| c == n),
        "{what}: expected {n} program(s) attached to {cgroup} on each hook, the kernel reports \
         {counts:?}"
    );
}

#[test]
fn ipv4_ipv6_and_v4_mapped_connects_are_captured_and_relayed() {
    require_privileges();
    let cg = TestCgroup::new();
    let echo4 = TestServer::echo("127.0.0.1:0");
    let echo6 = TestServer::echo("[::1]:0");
    let broker = broker_allowing(cg.path(), &[&echo4, &echo6]);
    let agent_cg = cg.path().to_string();
    broker.attach(&agent_cg);
    assert_programs_attached(&agent_cg, 1, "after attach");

    let mapped = SocketAddr::from((Ipv4Addr::LOCALHOST.to_ipv6_mapped(), echo4.addr().port()));
    for (what, server, dst) in [
        ("IPv4", &echo4, echo4.addr()),
        ("IPv6", &echo6, echo6.addr()),
        ("v4-mapped IPv6", &echo4, mapped),
    ] {
        let before = server.accepted().len();
        let run = agent::connect(&agent_cg, Mode::Connect, dst);
        assert_eq!(run.report.pid, run.spawned_pid, "{what}: agent pid");
        assert_brokered(what, &broker, server, before, &run, &agent_cg, dst);
    }
    assert!(
        broker.status().counters.redirected >= 3,
        "kernel counter of redirected connects: {:?}",
        broker.status().counters
    );
}

/// Run inside a network namespace of its own: listens on loopback there (so a connect that went
/// direct would succeed), then tries TCP over IPv4 and IPv6 to those listeners and a DNS
/// datagram, and prints `pid`, `netns` (its namespace's cookie) and the outcome of each as JSON.
const IN_NETNS_PY: &str = r#"
import errno, json, os, socket
SO_NETNS_COOKIE = 71
out = {"pid": os.getpid()}
probe = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
out["netns"] = int.from_bytes(probe.getsockopt(socket.SOL_SOCKET, SO_NETNS_COOKIE, 8), "little")
def outcome(fn):
    try:
        fn()
        return "ok"
    except OSError as e:
        return errno.errorcode.get(e.errno, str(e.errno))
listeners = {}
for fam, host in ((socket.AF_INET, "127.0.0.1"), (socket.AF_INET6, "::1")):
    l = socket.socket(fam, socket.SOCK_STREAM)
    l.bind((host, 0))
    l.listen(4)
    listeners[fam] = (host, l.getsockname()[1], l)
def tcp(fam):
    host, port, _ = listeners[fam]
    s = socket.socket(fam, socket.SOCK_STREAM)
    s.settimeout(5)
    s.connect((host, port))
out["tcp4"] = outcome(lambda: tcp(socket.AF_INET))
out["tcp6"] = outcome(lambda: tcp(socket.AF_INET6))
def dns():
    s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    s.sendto(b"\0" * 12, ("127.0.0.1", 53))
out["dns"] = outcome(dns)
print(json.dumps(out), flush=True)
"#;

/// Issue 14, step 1 (the kernel maps keyed by network namespace): brokerd serves only its own
/// namespace's entry, so two agents of the tagged cgroup, each in a network namespace of its
/// own (`lo` up, as a `--network none` container has it), are refused in the kernel and counted,
/// concurrently, while the same cgroup's agent in brokerd's namespace is brokered before and
/// after.
#[test]
fn agents_in_namespaces_without_a_listener_are_refused_while_the_host_agent_is_brokered() {
    require_privileges();
    let cg = TestCgroup::new();
    let echo = TestServer::echo("127.0.0.1:0");
    let broker = broker_allowing(cg.path(), &[&echo]);
    let agent_cg = cg.path().to_string();
    broker.attach(&agent_cg);

    let before = echo.accepted().len();
    let run = agent::connect(&agent_cg, Mode::Connect, echo.addr());
    assert_brokered(
        "host namespace, before",
        &broker,
        &echo,
        before,
        &run,
        &agent_cg,
        echo.addr(),
    );
    let counted_before = broker.status().counters.netns_refused;

    let namespaces = [TestNetns::new(), TestNetns::new()];
    let clients: Vec<_> = namespaces
        .iter()
        .map(|ns| {
            let mut cmd = ns.command(agent_broker_tests::agent::python());
            cmd.args(["-c", IN_NETNS_PY])
                .stdin(Stdio::null())
                .stdout(Stdio::piped())
                .stderr(Stdio::piped());
            (ns.name().to_string(), spawn_in_cgroup(&agent_cg, &mut cmd))
        })
        .collect();
    let mut cookies = Vec::new();
    for (ns, child) in clients {
        let out = wait_with_timeout(child, SHORT, &format!("client in netns {ns}"));
        let stdout = String::from_utf8_lossy(&out.stdout);
        assert!(
            out.status.success(),
            "client in netns {ns} failed: {stdout}\n{}",
            String::from_utf8_lossy(&out.stderr)
        );
        let report: serde_json::Value = serde_json::from_str(stdout.trim())
            .unwrap_or_else(|e| panic!("client in netns {ns} printed {stdout:?}: {e}"));
        for what in ["tcp4", "tcp6", "dns"] {
            assert_eq!(
                report[what].as_str(),
                Some("EPERM"),
                "netns {ns}, {what}: a namespace without a brokerd listener must be refused in \
                 the kernel (EPERM), neither connected there nor sent to brokerd: {report}"
            );
        }
        let pid = report["pid"]
            .as_u64()
            .unwrap_or_else(|| panic!("pid in {report}"));
        let traced: Vec<_> = broker
            .connections()
            .into_iter()
            .filter(|c| c.origin.as_ref().is_some_and(|o| u64::from(o.pid) == pid))
            .collect();
        assert!(
            traced.is_empty(),
            "netns {ns}: brokerd has records of a refused client: {traced:?}"
        );
        cookies.push(report["netns"].as_u64().unwrap_or(0));
    }
    assert!(
        cookies[0] != 0 && cookies[1] != 0 && cookies[0] != cookies[1],
        "the two clients should report two different namespace cookies: {cookies:?}"
    );
    let counters = broker.status().counters;
    assert!(
        counters.netns_refused >= counted_before + 6,
        "three refusals per namespace should be counted as netns refused (before: \
         {counted_before}): {counters:?}"
    );

    let before = echo.accepted().len();
    let run = agent::connect(&agent_cg, Mode::Connect, echo.addr());
    assert_brokered(
        "host namespace, after",
        &broker,
        &echo,
        before,
        &run,
        &agent_cg,
        echo.addr(),
    );
}

/// Issue 14, step 1: the maps whose layout changed have new names, so a pin an earlier build left
/// under an old name (which aya would reuse as is, whatever its key and value sizes) is removed
/// at start instead of being read with the new layout; and brokerd's own network namespace is
/// the one entry of the namespace map, pointing at its listeners.
#[test]
fn old_layout_pins_are_removed_and_the_own_namespace_is_the_only_listener_entry() {
    use agent_broker_tests::bpf::{
        MAP_TYPE_LRU_HASH, create_pinned_map, own_netns_cookie, pinned_map_entries,
    };
    require_privileges();
    let cg = TestCgroup::new();
    let echo = TestServer::echo("127.0.0.1:0");
    let mut broker = Broker::builder()
        .policy("capture", &allow_servers(cg.path(), &[&echo]))
        .prepare();
    let maps = broker.pin_dir().join("maps");
    std::fs::create_dir_all(&maps).unwrap_or_else(|e| panic!("cannot create {maps:?}: {e}"));
    // The layouts of the build before: 20-byte address keys, 56-byte origins, 64-byte records.
    let legacy = [
        ("ORIGIN_BY_PEER", 20, 56),
        ("ORIGIN_BY_COOKIE", 8, 56),
        ("REDIRECT_BY_PEER", 20, 64),
        ("DNS_BY_PEER", 20, 56),
    ];
    for (name, key, value) in legacy {
        create_pinned_map(&maps.join(name), MAP_TYPE_LRU_HASH, key, value, 16)
            .unwrap_or_else(|e| panic!("cannot pin a stand-in for the old {name}: {e}"));
    }
    broker
        .try_start()
        .unwrap_or_else(|e| panic!("brokerd did not start over old pins: {e}"));
    for (name, _, _) in legacy {
        assert!(
            !maps.join(name).exists(),
            "brokerd left the old-layout pin {name} in place"
        );
    }
    for name in [
        "ORIGIN_BY_COOKIE2",
        "REDIRECT_BY_NSPEER",
        "DNS_BY_NSPEER",
        "NETNS_LISTENERS",
    ] {
        assert!(maps.join(name).exists(), "no pin for {name} in {maps:?}");
    }

    let own = own_netns_cookie().expect("SO_NETNS_COOKIE");
    let entries = pinned_map_entries(&maps.join("NETNS_LISTENERS"), 8, 32)
        .unwrap_or_else(|e| panic!("cannot read NETNS_LISTENERS: {e}"));
    assert_eq!(
        entries.len(),
        1,
        "brokerd serves only its own namespace: {entries:?}"
    );
    let (key, value) = &entries[0];
    let u16_at = |o: usize| u16::from_ne_bytes([value[o], value[o + 1]]);
    assert_eq!(
        u64::from_ne_bytes(key[..8].try_into().expect("8 bytes")),
        own,
        "the entry is for brokerd's (and the test's) network namespace"
    );
    assert_eq!(&value[0..4], &[127, 0, 0, 1], "IPv4 listener address");
    let mut v6 = [0u8; 16];
    v6[15] = 1;
    assert_eq!(&value[4..20], &v6, "IPv6 listener address (::1)");
    assert_ne!(u16_at(20), 0, "listener port");
    assert_ne!(u16_at(22), 0, "DNS port");
    assert_eq!(
        &value[24..32],
        &[0; 8],
        "no tag for brokerd's own namespace"
    );

    // The renamed maps are the ones the programs use: the agent is brokered.
    let agent_cg = cg.path().to_string();
    broker.attach(&agent_cg);
    let before = echo.accepted().len();
    let run = agent::connect(&agent_cg, Mode::Connect, echo.addr());
    assert_brokered(
        "after start over old pins",
        &broker,
        &echo,
        before,
        &run,
        &agent_cg,
        echo.addr(),
    );
}

/// Pinned links outlive brokerd; after an upgrade they would keep running the earlier build's
/// programs, which read maps of the earlier layout. A link pinned for a tagged cgroup with a
/// program that is not this build's (here one that allows every connect, standing in for an
/// earlier build's connect4) is switched in place, atomically, to this build's program when
/// brokerd adopts it: from then on the cgroup's connects are redirected, never direct.
#[test]
fn adopted_links_are_switched_to_this_builds_programs() {
    use agent_broker_tests::{
        bpf::{pin_allow_all_connect4_link, pinned_link_program_id},
        cgroup::cgroup_dir,
    };
    use std::os::unix::fs::MetadataExt as _;
    require_privileges();
    let cg = TestCgroup::new();
    let echo = TestServer::echo("127.0.0.1:0");
    let mut broker = Broker::builder()
        .policy("capture", &allow_servers(cg.path(), &[&echo]))
        .prepare();
    let agent_cg = cg.path().to_string();
    let dir = cgroup_dir(&agent_cg);
    let id = std::fs::metadata(&dir).expect("cgroup dir").ino();
    let links = broker
        .pin_dir()
        .join("links")
        .join(format!("{agent_cg}@{id}"));
    std::fs::create_dir_all(&links).unwrap_or_else(|e| panic!("cannot create {links:?}: {e}"));
    let pin = links.join("connect4");
    let old = pin_allow_all_connect4_link(&dir, &pin)
        .unwrap_or_else(|e| panic!("cannot pin a stand-in connect4 link: {e}"));

    // The stand-in lets the connect through: the oracle sees a direct connection.
    let before = echo.accepted().len();
    let run = agent::connect(&agent_cg, Mode::Connect, echo.addr());
    run.assert_round_trip("before brokerd");
    let accepted = echo.accepted();
    let new = &accepted[before.min(accepted.len())..];
    assert!(
        new.len() == 1 && canon(new[0].peer) == canon(run.local()),
        "before brokerd, the stand-in program should let the connect go direct: {new:?}"
    );

    broker
        .try_start()
        .unwrap_or_else(|e| panic!("brokerd did not start: {e}"));
    let now = pinned_link_program_id(&pin).expect("link info");
    assert_ne!(
        now,
        old,
        "the adopted link still runs the stand-in program\n{}",
        broker.log()
    );
    // Only connect4 was pinned, so nothing re-keys the record and brokerd refuses the
    // connection at accept; what matters is that it no longer goes direct.
    let before = echo.accepted().len();
    let _ = agent::connect(&agent_cg, Mode::Connect, echo.addr());
    thread::sleep(Duration::from_millis(200));
    let accepted = echo.accepted();
    assert!(
        accepted[before.min(accepted.len())..].is_empty(),
        "after the switch the connect still reached the server directly: {accepted:?}"
    );
    assert!(
        broker.status().counters.redirected >= 1,
        "the switched connect4 should have redirected the connect: {:?}",
        broker.status().counters
    );
}

#[test]
fn child_process_second_thread_and_nested_cgroup_are_captured() {
    require_privileges();
    let cg = TestCgroup::new();
    let echo = TestServer::echo("127.0.0.1:0");
    let broker = broker_allowing(cg.path(), &[&echo]);
    let agent_cg = cg.path().to_string();
    broker.attach(&agent_cg);

    // A child process: the record names the child, not the process the test started.
    let before = echo.accepted().len();
    let run = agent::connect(&agent_cg, Mode::Child, echo.addr());
    assert_eq!(run.report.parent_pid, Some(run.spawned_pid), "{run:?}");
    assert_ne!(
        run.report.pid, run.spawned_pid,
        "the child is a separate process: {run:?}"
    );
    let rec = assert_brokered(
        "child process",
        &broker,
        &echo,
        before,
        &run,
        &agent_cg,
        echo.addr(),
    );
    assert_eq!(rec.origin.map(|o| o.pid), Some(run.report.pid));

    // A second thread: pid is the process, tid is the thread that connected.
    let before = echo.accepted().len();
    let run = agent::connect(&agent_cg, Mode::Thread, echo.addr());
    assert_eq!(run.report.pid, run.spawned_pid, "{run:?}");
    assert_eq!(run.report.main_tid, Some(run.spawned_pid), "{run:?}");
    assert_ne!(
        run.report.tid, run.report.pid,
        "the connect came from a second thread: {run:?}"
    );
    let rec = assert_brokered(
        "second thread",
        &broker,
        &echo,
        before,
        &run,
        &agent_cg,
        echo.addr(),
    );
    let origin = rec.origin.unwrap_or_else(|| panic!("no origin"));
    assert_eq!((origin.pid, origin.tid), (run.spawned_pid, run.report.tid));

    // A process in a cgroup below the tagged one is captured (the programs are inherited), and
    // the record names the cgroup it actually runs in.
    let nested = cg.create_child("tool");
    let before = echo.accepted().len();
    let run = agent::connect(&nested, Mode::Connect, echo.addr());
    assert_brokered(
        "nested cgroup",
        &broker,
        &echo,
        before,
        &run,
        &nested,
        echo.addr(),
    );
}

#[test]
fn untagged_sibling_and_detached_cgroup_are_not_redirected() {
    require_privileges();
    let cg = TestCgroup::new();
    let echo = TestServer::echo("127.0.0.1:0");
    let echo6 = TestServer::echo("[::1]:0");
    let broker = broker_allowing(cg.path(), &[&echo, &echo6]);
    let tagged = cg.create_child("agent");
    let sibling = cg.create_child("sibling");
    broker.attach(&tagged);

    // The oracle works here: the tagged cgroup is brokered.
    let before = echo.accepted().len();
    let run = agent::connect(&tagged, Mode::Connect, echo.addr());
    assert_brokered(
        "tagged cgroup",
        &broker,
        &echo,
        before,
        &run,
        &tagged,
        echo.addr(),
    );

    for (what, server) in [("sibling, IPv4", &echo), ("sibling, IPv6", &echo6)] {
        let before = server.accepted().len();
        let run = agent::connect(&sibling, Mode::Connect, server.addr());
        assert_direct(what, &broker, server, before, &run);
    }
    assert_programs_attached(&sibling, 0, "untagged sibling");

    broker.detach(&tagged);
    let status = broker.status();
    assert!(
        status.cgroups.iter().all(|c| c.path != tagged),
        "status still lists {tagged} after detach: {status:?}"
    );
    assert_programs_attached(&tagged, 0, "after detach");
    for (what, server) in [
        ("after detach, IPv4", &echo),
        ("after detach, IPv6", &echo6),
    ] {
        let before = server.accepted().len();
        let run = agent::connect(&tagged, Mode::Connect, server.addr());
        assert_direct(what, &broker, server, before, &run);
    }
}

#[test]
fn fail_closed_after_sigkill_and_adopted_after_restart() {
    require_privileges();
    let cg = TestCgroup::new();
    let echo = TestServer::echo("127.0.0.1:0");
    let echo6 = TestServer::echo("[::1]:0");
    let mut broker = broker_allowing(cg.path(), &[&echo, &echo6]);
    let agent_cg = cg.path().to_string();
    broker.attach(&agent_cg);

    let before = echo.accepted().len();
    let run = agent::connect(&agent_cg, Mode::Connect, echo.addr());
    assert_brokered(
        "before the kill",
        &broker,
        &echo,
        before,
        &run,
        &agent_cg,
        echo.addr(),
    );

    broker.kill9();
    for (what, server) in [("IPv4", &echo), ("IPv6", &echo6)] {
        let before = server.accepted().len();
        let run = agent::connect(&agent_cg, Mode::Connect, server.addr());
        assert_eq!(
            run.report.errno,
            Some(libc::ECONNREFUSED),
            "{what}: with brokerd killed, the agent's connect must be refused: {:?}",
            run.report
        );
        // Give a connection that slipped through time to show up before concluding it did not.
        thread::sleep(Duration::from_millis(200));
        let after = server.accepted();
        assert_eq!(
            after.len(),
            before,
            "{what}: with brokerd down the server got a connection (it went direct): {:?}",
            &after[before..]
        );
    }
    assert_programs_attached(&agent_cg, 1, "links pinned while brokerd is down");

    broker.restart();
    let status = broker.status();
    let entry = status
        .cgroups
        .iter()
        .find(|c| c.path == agent_cg)
        .unwrap_or_else(|| panic!("restarted brokerd does not list {agent_cg}: {status:?}"));
    assert_eq!(entry.links, HOOKS.len() as u32, "adopted links: {entry:?}");
    assert_programs_attached(&agent_cg, 1, "after restart (adopted, not attached twice)");

    for (what, server) in [
        ("after restart, IPv4", &echo),
        ("after restart, IPv6", &echo6),
    ] {
        let before = server.accepted().len();
        let run = agent::connect(&agent_cg, Mode::Connect, server.addr());
        assert_brokered(
            what,
            &broker,
            server,
            before,
            &run,
            &agent_cg,
            server.addr(),
        );
    }
}

#[test]
fn refusals_root_dotdot_own_cgroup_and_control_from_tagged_cgroup() {
    require_privileges();
    let cg = TestCgroup::new();
    let daemon_cg = cg.create_child("daemon");
    let broker = Broker::start_in_cgroup(&daemon_cg);
    assert_eq!(
        cgroup_of(broker.pid()),
        daemon_cg,
        "brokerd runs in its test cgroup"
    );

    let refused = |what: &str, path: &str| {
        for create in [false, true] {
            let mut args = vec!["attach", "--cgroup", path];
            if create {
                args.push("--create");
            }
            let out = broker.ctl_output(&args);
            let stderr = String::from_utf8_lossy(&out.stderr);
            assert!(
                !out.status.success(),
                "brokerctl attach of {what} ({path:?}, create {create}) must be refused; stdout: \
                 {}",
                String::from_utf8_lossy(&out.stdout)
            );
            assert!(
                !stderr.trim().is_empty(),
                "brokerctl attach of {what} ({path:?}) failed without a message"
            );
            // The daemon refuses too, not only brokerctl's own parsing.
            let answer = broker.request(&Request::Attach {
                cgroup: path.to_string(),
                create,
                name: None,
            });
            assert!(
                matches!(answer, Response::Error { .. }),
                "brokerd must refuse attach of {what} ({path:?}, create {create}): {answer:?}"
            );
        }
    };
    for (what, path) in [
        ("the root", ""),
        ("the root", "/"),
        ("the root", "."),
        ("a path with ..", "a/../b"),
        ("a path with ..", ".."),
        ("a path with ..", "../x"),
        ("a path with ..", &format!("{}/..", cg.path())),
        ("brokerd's own cgroup", &daemon_cg),
        ("brokerd's own cgroup", &format!("/{daemon_cg}/")),
        ("an ancestor of brokerd's cgroup", cg.path()),
    ] {
        refused(what, path);
    }
    let status = broker.status();
    assert!(
        status.cgroups.is_empty(),
        "nothing may be tagged: {status:?}"
    );
    assert_programs_attached(&daemon_cg, 0, "brokerd's own cgroup");
    assert_programs_attached(cg.path(), 0, "brokerd's parent cgroup");

    // A client inside a tagged cgroup, or below one, cannot reach the control socket: the
    // connect_unix hook refuses every AF_UNIX connect in the kernel (brokerd's own check of the
    // caller's cgroup stays behind it as a second layer).
    let agent_cg = cg.create_child("agent");
    broker.attach(&agent_cg);
    let below = cg.create_child("agent/sub");
    for (where_, args) in [
        (&agent_cg, vec!["status", "--json"]),
        (&below, vec!["status"]),
        (&agent_cg, vec!["detach", "--cgroup", agent_cg.as_str()]),
    ] {
        let mut cmd = broker.ctl();
        cmd.args(&args)
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped());
        let child = spawn_in_cgroup(where_, &mut cmd);
        let out = wait_with_timeout(child, SHORT, "brokerctl in a tagged cgroup");
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(
            !out.status.success(),
            "brokerctl {args:?} from inside tagged cgroup {where_} must be refused; stdout: {}",
            String::from_utf8_lossy(&out.stdout)
        );
        assert!(
            stderr.contains("cannot reach brokerd") && stderr.contains("Operation not permitted"),
            "the kernel should refuse the AF_UNIX connect (EPERM): {stderr}"
        );
    }
    let status = broker.status();
    assert!(
        status
            .cgroups
            .iter()
            .any(|c| c.path == agent_cg && c.links == HOOKS.len() as u32),
        "{agent_cg} must still be tagged after a refused detach: {status:?}"
    );
}

#[test]
fn non_loopback_destination_without_a_rule_is_denied_and_nothing_arrives() {
    require_privileges();
    let cg = TestCgroup::new();
    // A policy for this cgroup that allows something else: the host still has no rule.
    let decoy = TestServer::echo("127.0.0.1:0");
    let broker = broker_allowing(cg.path(), &[&decoy]);
    let agent_cg = cg.path().to_string();
    broker.attach(&agent_cg);
    let host = TestHost::start();

    // The oracle is meaningful: the host is reachable directly from the root namespace.
    let direct = TcpStream::connect_timeout(&host.addr(), Duration::from_secs(3))
        .unwrap_or_else(|e| panic!("test host {} unreachable from the test: {e}", host.addr()));
    drop(direct);
    assert!(
        host.wait_accepted(1, Duration::from_secs(3)),
        "the test host never saw the direct connection"
    );
    let before = host.accepted().len();

    let run = agent::connect(&agent_cg, Mode::Connect, host.addr());
    let r = &run.report;
    assert!(
        r.echo.is_none() && r.greeting.is_none(),
        "the agent must not get a working connection to {}: {r:?}",
        host.addr()
    );
    if let Some(local) = r.local {
        assert!(
            local.ip().is_loopback(),
            "a redirected connect has a loopback local address, this one went out: {r:?}"
        );
    }
    let record = broker.wait_connection("the non-loopback connect", |c| {
        c.origin.as_ref().is_some_and(|o| o.pid == run.spawned_pid)
    });
    let origin = record.origin.clone().unwrap_or_else(|| panic!("no origin"));
    assert_eq!(origin.cgroup, agent_cg, "{record:?}");
    assert_eq!(origin.original_dst, host.addr(), "{record:?}");
    // Either brokerd closes the connection, or it answers the request with its JSON 403.
    match r.status {
        Some(403) => {
            let body: serde_json::Value = serde_json::from_str(r.body.as_deref().unwrap_or(""))
                .unwrap_or_else(|e| panic!("the 403 body is not JSON ({e}): {r:?}"));
            assert_eq!(
                body["error"].as_str(),
                Some("denied by agent-broker"),
                "{r:?}"
            );
            assert_eq!(body["agent"].as_str(), Some(agent_cg.as_str()), "{r:?}");
            assert!(
                body["reason"].as_str().is_some_and(|s| !s.is_empty()),
                "the denial must say why: {r:?}"
            );
        }
        None => assert!(
            r.closed_early
                || r.errno.is_some()
                || matches!(record.outcome, Outcome::Refused { .. }),
            "without an HTTP answer the connection must have been closed: {r:?} {record:?}"
        ),
        Some(other) => panic!("a destination without a rule got HTTP {other}: {r:?}"),
    }
    thread::sleep(Duration::from_millis(500));
    assert_eq!(
        host.accepted().len(),
        before,
        "the test host received a connection from the agent: {:?}",
        host.accepted()
    );
    assert!(
        decoy.accepted().is_empty(),
        "nothing may reach the allowed decoy either: {:?}",
        decoy.accepted()
    );
}

#[test]
fn acceptance_brokerctl_run_curl_reaches_local_http_server() {
    require_privileges();
    let cg = TestCgroup::new();
    let demo = cg.child("demo");
    let body = format!("hello from the abtest http server {}\n", std::process::id());
    let http = TestServer::http("127.0.0.1:0", &body);
    let broker = broker_allowing(&demo, &[&http]);
    let url = format!("http://{}/", http.addr());

    let mut cmd = broker.ctl();
    cmd.args(["run", "--cgroup", &demo, "--create", "--"])
        .args(["curl", "-s", "--noproxy", "*", "--max-time", "5", &url])
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    let child = cmd
        .spawn()
        .unwrap_or_else(|e| panic!("cannot start {cmd:?}: {e}"));
    let launcher_pid = child.id();
    let out = wait_with_timeout(child, SHORT * 2, "brokerctl run -- curl");
    assert!(
        out.status.success(),
        "brokerctl run -- curl failed ({}): {}\nbrokerd's log:\n{}",
        out.status,
        String::from_utf8_lossy(&out.stderr),
        broker.log()
    );
    assert_eq!(String::from_utf8_lossy(&out.stdout), body, "curl's output");

    let record = broker.wait_connection("curl", |c| {
        c.origin.as_ref().is_some_and(|o| o.comm == "curl")
    });
    let origin = record.origin.clone().unwrap_or_else(|| panic!("no origin"));
    // The launcher stays as curl's parent (it forwards signals and reports the exit status), so
    // curl has a pid of its own.
    let curl_pid = origin.pid;
    assert_ne!(curl_pid, launcher_pid, "{record:?}");
    assert_eq!(origin.cgroup, demo, "{record:?}");
    assert_eq!(origin.comm, "curl", "{record:?}");
    assert_eq!(origin.original_dst, http.addr(), "{record:?}");
    assert!(not_refused(&record.outcome), "{record:?}");
    let accepted = http.accepted();
    assert_eq!(accepted.len(), 1, "{accepted:?}");
    assert_eq!(
        accepted[0].owner,
        Some(broker.pid()),
        "the HTTP server should have been reached by brokerd: {accepted:?}"
    );

    let log = broker.log();
    assert!(
        log.lines().any(|l| l.contains(&format!("cgroup={demo}"))
            && l.contains(&format!("pid={curl_pid}"))
            && l.contains("comm=curl")
            && l.contains(&format!("original_dst={}", http.addr()))
            && l.contains("outcome=")),
        "brokerd's log should have a line for curl's connection (cgroup={demo} pid={curl_pid} \
         comm=curl original_dst={}):\n{log}",
        http.addr()
    );

    let status = broker.status();
    assert!(
        status
            .cgroups
            .iter()
            .any(|c| c.path == demo && c.links == HOOKS.len() as u32),
        "status should list {demo} with {} links: {status:?}",
        HOOKS.len()
    );
    let text = broker.ctl_ok(&["status"]);
    assert!(
        text.contains(&demo),
        "plain `brokerctl status` should list {demo}:\n{text}"
    );
    assert_programs_attached(&demo, 1, "agents/demo");
}

/// Connects from inside `cgroup` to `dst`, sends `payload` (not HTTP, not TLS) and prints what
/// came back as JSON: `{"data": "<text>", "closed": true|false, "error": ...}`.
const RAW_PY: &str = r#"
import json, socket, sys
host, port, payload = sys.argv[1], int(sys.argv[2]), sys.argv[3]
out = {"data": "", "closed": False}
try:
    s = socket.create_connection((host, port), timeout=5)
    s.sendall(payload.encode())
    buf = b""
    while True:
        c = s.recv(4096)
        if not c:
            out["closed"] = True
            break
        buf += c
    out["data"] = buf.decode("utf-8", "replace")
except ConnectionResetError:
    out["closed"] = True
except OSError as e:
    out["error"] = str(e)
print(json.dumps(out), flush=True)
"#;

#[test]
fn non_http_traffic_to_an_allowed_destination_is_closed_and_reaches_nothing() {
    require_privileges();
    let cg = TestCgroup::new();
    let server = TestServer::echo("127.0.0.1:0");
    let broker = broker_allowing(cg.path(), &[&server]);
    broker.attach(cg.path());

    let mut cmd = std::process::Command::new(agent::python());
    cmd.args(["-c", RAW_PY])
        .arg(server.addr().ip().to_string())
        .arg(server.addr().port().to_string())
        .arg("SSH-2.0-abtest\r\n")
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    let child = spawn_in_cgroup(cg.path(), &mut cmd);
    let pid = child.id();
    let out = wait_with_timeout(child, SHORT * 2, "raw python agent");
    let stdout = String::from_utf8_lossy(&out.stdout);
    let report: serde_json::Value = serde_json::from_str(stdout.trim()).unwrap_or_else(|e| {
        panic!(
            "the raw agent printed no report ({e}): {stdout}\n{}",
            String::from_utf8_lossy(&out.stderr)
        )
    });
    assert_eq!(
        report["closed"], true,
        "brokerd must close a connection that is neither TLS nor HTTP: {report}"
    );
    assert_eq!(
        report["data"], "",
        "the agent must get nothing back: {report}"
    );
    let record = broker.wait_connection("the raw connection", |c| {
        c.origin.as_ref().is_some_and(|o| o.pid == pid)
    });
    assert_eq!(
        record.origin.map(|o| o.original_dst),
        Some(server.addr()),
        "brokerd records where it was going"
    );
    thread::sleep(Duration::from_millis(300));
    assert!(
        server.accepted().is_empty(),
        "non-HTTP bytes must not be relayed to the server: {:?}",
        server.accepted()
    );
}

/// Connects, sends `payload`, and reports what came back within a second.
const TCP_PY: &str = r#"
import json, socket, sys, time
host, port, payload = sys.argv[1], int(sys.argv[2]), sys.argv[3]
s = socket.create_connection((host, port), timeout=5)
s.sendall(payload.encode())
s.settimeout(0.2)
buf, end = b"", time.time() + 1.0
while time.time() < end:
    try:
        c = s.recv(4096)
    except socket.timeout:
        continue
    if not c:
        break
    buf += c
print(json.dumps({"data": buf.decode("utf-8", "replace")}), flush=True)
"#;

#[test]
fn tcp_rule_passes_a_connection_through_unread() {
    require_privileges();
    let cg = TestCgroup::new();
    let server = TestServer::echo("127.0.0.1:0");
    let policy = format!(
        "cgroup = \"{}\"\n[[allow]]\nip = \"127.0.0.1\"\nport = {}\ntcp = true\n",
        cg.path(),
        server.addr().port()
    );
    let broker = Broker::builder().policy("tcp", &policy).start();
    broker.attach(cg.path());

    let mut cmd = std::process::Command::new(agent::python());
    cmd.args(["-c", TCP_PY])
        .arg(server.addr().ip().to_string())
        .arg(server.addr().port().to_string())
        // The test server answers one HTTP request; spliced, the bytes reach it unread (an
        // intercepted request would be re-framed by brokerd, and the answer's peer would differ).
        .arg("GET /abtest-tcp HTTP/1.1\r\nHost: raw\r\nX-Raw: yes\r\n\r\n")
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    let child = spawn_in_cgroup(cg.path(), &mut cmd);
    let out = wait_with_timeout(child, SHORT * 2, "tcp agent");
    let stdout = String::from_utf8_lossy(&out.stdout);
    let report: serde_json::Value = serde_json::from_str(stdout.trim()).unwrap_or_else(|e| {
        panic!(
            "the tcp agent printed no report ({e}): {stdout}\n{}\nbrokerd's log:\n{}",
            String::from_utf8_lossy(&out.stderr),
            broker.log()
        )
    });
    let data = report["data"].as_str().unwrap_or_default();
    assert!(
        data.contains("peer=") && data.contains("abtest-tcp"),
        "the server's greeting and the echo must come back unchanged: {report}\n{}",
        broker.log()
    );
    let accepted = server.accepted();
    assert_eq!(accepted.len(), 1, "{accepted:?}");
    assert_eq!(
        accepted[0].owner,
        Some(broker.pid()),
        "the server was reached by brokerd, not directly: {accepted:?}"
    );
}

#[test]
fn process_outside_tagged_cgroups_dialling_the_broker_port_gets_nothing() {
    // brokerd is no credential oracle: a local process that is not an agent connects straight
    // to its listener, asking for api.example.test with the placeholder.
    let w = World::new();
    let listener = w
        .broker
        .status()
        .listeners
        .into_iter()
        .find(std::net::SocketAddr::is_ipv4)
        .unwrap_or_else(|| panic!("brokerd reports no IPv4 listener"));
    let before = w.api.requests().len();
    let out = agent_broker_tests::run_with_timeout(
        std::process::Command::new("curl")
            .args(["-sS", "--noproxy", "*", "--max-time", "10", "--http1.1"])
            .arg("--cacert")
            .arg(&w.broker_ca)
            .arg("--resolve")
            .arg(format!("{API}:{}:{}", listener.port(), listener.ip()))
            .args([
                "-H",
                &format!("Authorization: Bearer {}", w.placeholder.expose()),
            ])
            .args(["-w", "%{stderr}ABTEST status=%{http_code}\\n"])
            .arg(format!("https://{API}:{}/hash", listener.port())),
        Duration::from_secs(20),
    );
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        !out.status.success() || stderr.contains("ABTEST status=000"),
        "a direct connection to brokerd's port must be refused: {}\n{}",
        redact(&String::from_utf8_lossy(&out.stdout)),
        redact(&stderr)
    );
    w.secret.assert_absent(&out.stdout, "curl's stdout");
    w.secret.assert_absent(&out.stderr, "curl's stderr");
    std::thread::sleep(Duration::from_millis(200));
    assert_eq!(
        w.api.requests().len(),
        before,
        "the API received a request from a process outside any agent cgroup"
    );
    let refused = w.broker.wait_connection("the direct connection", |c| {
        c.origin.is_none() && matches!(c.outcome, agent_broker_protocol::Outcome::Refused { .. })
    });
    assert!(refused.peer.ip().is_loopback(), "{refused:?}");
    w.assert_no_secret_in_logs();
}
