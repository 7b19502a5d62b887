//! Issue 13, items 9 and 13: sockets the tag's hooks never see.
//!
//! 9. The kernel runs a cgroup's socket hooks for the cgroup a socket was made in. A process
//!    moved into a tagged cgroup keeps the sockets it made outside: not redirected, not
//!    filtered. brokerd cannot take them away; `status` and `doctor` name every process in a
//!    tagged cgroup that holds one (its pid, descriptor, protocol, addresses and the cgroup the
//!    socket was made in), and do not name a process whose sockets were all made inside.
//! 13. cgroup/sock_create does not run for AF_NETLINK sockets (the kernel runs it for AF_INET
//!     and AF_INET6 only), so only the launcher's seccomp filter (or the BPF LSM layer, where the
//!     kernel allows it) keeps an agent from reading the host's socket table through sock_diag;
//!     `doctor` warns about every process in a tagged cgroup without that filter.
//!
//! Needs root, cgroup v2, BPF, python3 and ip (iproute2). Every destination is on loopback or
//! in a network namespace the test made.
//!
//! Run as root: `cargo test -p agent-broker-tests --test attack_sockets -- --test-threads=1`.

use std::{
    io::{BufRead as _, BufReader, Read as _, Write as _},
    net::TcpListener,
    process::{Child, Command, Stdio},
    time::Duration,
};

use agent_broker_protocol::OutsideSocket;
use agent_broker_tests::{
    Broker, SHORT, TestCgroup, TestHost, cgroup::cgroup_dir, cgroup_of, poll_until,
    require_privileges, spawn_in_cgroup,
};

/// A python3 process that runs `script` with piped stdin and stdout.
fn python(script: &str) -> Command {
    let mut cmd = Command::new("python3");
    cmd.args(["-c", script])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit());
    cmd
}

/// The next line the child prints (panics when it ends first).
fn line_of(child: &mut Child) -> String {
    let out = child.stdout.as_mut().expect("piped stdout");
    let mut reader = BufReader::new(out);
    let mut line = String::new();
    reader.read_line(&mut line).expect("read the child's line");
    assert!(!line.is_empty(), "the child ended before printing its line");
    line.trim_end().to_string()
}

fn stop(mut child: Child) {
    let _ = child.kill();
    let _ = child.wait();
}

#[test]
fn sockets_made_outside_and_moved_in_are_named_by_status_and_doctor() {
    require_privileges();
    let cg = TestCgroup::new();
    let broker = Broker::start();
    broker.attach(cg.path());
    // A loopback service outside the broker, and a host that is not on loopback (in a network
    // namespace of the test's own).
    let service = TcpListener::bind("127.0.0.1:0").expect("listen");
    let port = service.local_addr().expect("addr").port();
    let far = TestHost::start();
    let (far_ip, far_port) = (far.addr().ip(), far.addr().port());

    // Made outside: a TCP connection to the service, a bound UDP socket and a TCP socket
    // neither bound nor connected. After the move it connects that one to the far host, and
    // makes a new socket (inside) to do the same.
    let mut outsider = python(&format!(
        "import socket, sys\n\
         t = socket.create_connection(('127.0.0.1', {port}))\n\
         u = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)\n\
         u.bind(('127.0.0.1', 0))\n\
         f = socket.socket()\n\
         print(t.fileno(), u.fileno(), u.getsockname()[1], f.fileno(), flush=True)\n\
         sys.stdin.readline()\n\
         t.sendall(b'sent after the move\\n')\n\
         f.settimeout(10)\n\
         f.connect(('{far_ip}', {far_port}))\n\
         print('sent', flush=True)\n\
         sys.stdin.readline()\n\
         try:\n\
         \x20   socket.create_connection(('{far_ip}', {far_port}), timeout=10).close()\n\
         except OSError:\n\
         \x20   pass\n\
         print('new', flush=True)\n\
         sys.stdin.readline()\n"
    ))
    .spawn()
    .expect("python3");
    let ready = line_of(&mut outsider);
    let numbers: Vec<u32> = ready
        .split_whitespace()
        .map(|n| n.parse().expect("a number"))
        .collect();
    let [tcp_fd, udp_fd, udp_port, fresh_fd] = numbers[..] else {
        panic!("unexpected line {ready:?}");
    };
    let (mut at_service, _) = service.accept().expect("accept");
    let made_in = match cgroup_of(outsider.id()) {
        cg if cg.is_empty() => "/".to_string(),
        cg => cg,
    };
    // Moved into the tagged cgroup, as an operator (or anything with root) can.
    let moved = cg.create_child("moved");
    std::fs::write(
        cgroup_dir(&moved).join("cgroup.procs"),
        outsider.id().to_string(),
    )
    .expect("move the process into the tagged cgroup");
    assert_eq!(cgroup_of(outsider.id()), moved);

    // Made inside: a listener and a bound UDP socket of a process started in the cgroup.
    let inside = cg.create_child("inside");
    let mut insider = spawn_in_cgroup(
        &inside,
        &mut python(
            "import socket, sys\n\
             l = socket.socket(); l.bind(('127.0.0.1', 0)); l.listen()\n\
             u = socket.socket(socket.AF_INET, socket.SOCK_DGRAM); u.bind(('127.0.0.1', 0))\n\
             print(l.fileno(), u.fileno(), flush=True)\n\
             sys.stdin.readline()\n",
        ),
    );
    let insider_fds = line_of(&mut insider);
    for fd in insider_fds.split_whitespace() {
        let link = std::fs::read_link(format!("/proc/{}/fd/{fd}", insider.id()))
            .expect("the insider's descriptor");
        assert!(
            link.to_string_lossy().starts_with("socket:["),
            "the insider holds sockets: {link:?}"
        );
    }

    // status names the moved process's three sockets, and nothing of the insider's.
    let found: Vec<OutsideSocket> = poll_until(Duration::from_secs(10), || {
        let s = broker.status();
        let mine: Vec<OutsideSocket> = s
            .outside_sockets
            .iter()
            .filter(|o| o.pid == outsider.id())
            .cloned()
            .collect();
        (mine.len() >= 3).then_some(s.outside_sockets)
    })
    .unwrap_or_else(|| {
        panic!(
            "status should name the moved process: {:#?}",
            broker.status()
        )
    });
    let by_fd = |fd: u32| {
        found
            .iter()
            .find(|o| o.pid == outsider.id() && o.fd == fd)
            .unwrap_or_else(|| panic!("fd {fd} of the moved process is not named: {found:#?}"))
    };
    let tcp = by_fd(tcp_fd);
    assert_eq!(
        (
            tcp.cgroup.as_str(),
            tcp.comm.as_str(),
            tcp.protocol.as_str(),
            tcp.state.as_str()
        ),
        (moved.as_str(), "python3", "TCP", "ESTABLISHED"),
        "{tcp:#?}"
    );
    assert_eq!(tcp.remote, Some(service.local_addr().expect("addr")));
    assert_eq!(tcp.socket_cgroup.as_deref(), Some(made_in.as_str()));
    let udp = by_fd(udp_fd);
    assert_eq!(
        (udp.protocol.as_str(), udp.state.as_str()),
        ("UDP", "CLOSE"),
        "{udp:#?}"
    );
    assert_eq!(udp.local.map(|a| a.port()), Some(udp_port as u16));
    assert_eq!(udp.socket_cgroup.as_deref(), Some(made_in.as_str()));
    // Neither bound nor connected: in no table sock_diag dumps, so where it was made is unknown.
    let fresh = by_fd(fresh_fd);
    assert_eq!(
        (
            fresh.protocol.as_str(),
            fresh.state.as_str(),
            fresh.socket_cgroup.as_deref()
        ),
        ("TCP", "unlisted", None),
        "{fresh:#?}"
    );
    assert!(
        !found.iter().any(|o| o.pid == insider.id()),
        "sockets made inside are not named: {found:#?}"
    );

    // brokerctl status prints a warning naming it.
    let text = broker.ctl_ok(&["status"]);
    let line = text
        .lines()
        .find(|l| {
            l.contains(&format!("pid {} ", outsider.id()))
                && l.contains(&format!("fd {tcp_fd} TCP"))
        })
        .unwrap_or_else(|| panic!("status should name the moved process:\n{text}"));
    assert!(line.contains(&format!("made in {made_in}")), "{line}");
    assert!(text.contains("WARNING"), "{text}");
    // (The insider is named only as a process the launcher did not start.)
    assert!(
        !text
            .lines()
            .any(|l| l.starts_with(&format!("  pid {} ", insider.id()))),
        "status should not name the insider's sockets:\n{text}"
    );

    // doctor fails, names it and says how to fix it.
    let state = broker.state_dir();
    let doctor = broker.ctl_output(&["doctor", "--state-dir", &state.to_string_lossy()]);
    let text = String::from_utf8_lossy(&doctor.stdout);
    assert_eq!(doctor.status.code(), Some(1), "doctor must fail:\n{text}");
    let lines: Vec<&str> = text.lines().collect();
    let at = lines
        .iter()
        .position(|l| {
            l.starts_with("FAIL")
                && l.contains("socket made outside")
                && l.contains(&format!("pid {} (python3) in {moved}", outsider.id()))
        })
        .unwrap_or_else(|| panic!("doctor should name the moved process:\n{text}"));
    assert!(
        lines[at].contains(&format!("fd {udp_fd} UDP")),
        "{}",
        lines[at]
    );
    assert!(
        lines
            .get(at + 1)
            .is_some_and(|l| l.contains("fix:") && l.contains("brokerctl run")),
        "doctor should say how to fix it:\n{text}"
    );
    assert!(
        !text
            .lines()
            .any(|l| l.contains("socket made outside")
                && l.contains(&format!("pid {} ", insider.id()))),
        "doctor should not name the insider:\n{text}"
    );

    // Why it matters: the connection made outside still reaches the service directly.
    writeln!(outsider.stdin.as_mut().expect("stdin")).expect("go");
    assert_eq!(line_of(&mut outsider), "sent");
    at_service
        .set_read_timeout(Some(SHORT))
        .expect("read timeout");
    let mut got = [0u8; 20];
    at_service
        .read_exact(&mut got)
        .expect("the service hears from the moved process");
    assert_eq!(&got, b"sent after the move\n");
    // And the socket made outside connects to a host that is not on loopback: neither
    // connect4 nor the egress filter of the tag ran for it.
    assert!(
        far.wait_accepted(1, SHORT),
        "the far host should hear from the socket made outside"
    );
    // A socket made after the move is the tag's: redirected to brokerd, never at the far host.
    writeln!(outsider.stdin.as_mut().expect("stdin")).expect("go on");
    assert_eq!(line_of(&mut outsider), "new");
    std::thread::sleep(Duration::from_millis(300));
    assert_eq!(far.accepted().len(), 1, "{:?}", far.accepted());

    // Once the process is gone, nothing is named.
    stop(outsider);
    let after = broker.status();
    assert!(
        after.outside_sockets.is_empty(),
        "{:#?}",
        after.outside_sockets
    );
    assert_eq!(after.outside_sockets_note, None);
    stop(insider);
}

#[test]
fn netlink_sock_diag_is_refused_by_the_launcher_only_and_doctor_says_so() {
    require_privileges();
    let cg = TestCgroup::new();
    let broker = Broker::start();
    broker.attach(cg.path());
    let lsm_active = broker.status().lsm.starts_with("active");
    let probe = "import socket, sys\n\
                 def tries(family, kind, proto):\n\
                 \x20   try:\n\
                 \x20       socket.socket(family, kind, proto).close()\n\
                 \x20       return 'ok'\n\
                 \x20   except OSError as e:\n\
                 \x20       return 'refused'\n\
                 print(tries(socket.AF_NETLINK, socket.SOCK_RAW, 4),\n\
                 \x20     tries(socket.AF_NETLINK, socket.SOCK_RAW, 0),\n\
                 \x20     tries(socket.AF_INET, socket.SOCK_RAW, socket.IPPROTO_ICMP), flush=True)\n\
                 sys.stdin.readline()\n";
    // Started in the tagged cgroup without the launcher (as root, with CAP_NET_RAW): the inet
    // raw socket is refused by cgroup/sock_create, the netlink ones are not seen by it.
    let raw = cg.create_child("raw");
    let mut plain = spawn_in_cgroup(&raw, &mut python(probe));
    let seen = line_of(&mut plain);
    let expected = if lsm_active {
        "refused ok refused"
    } else {
        "ok ok refused"
    };
    assert_eq!(
        seen, expected,
        "NETLINK_SOCK_DIAG, NETLINK_ROUTE, AF_INET raw (LSM layer active: {lsm_active})"
    );
    // Under the launcher: its seccomp filter refuses sock_diag and keeps route.
    let agent = cg.child("agent");
    let launched = broker.ctl_output(&[
        "run", "--cgroup", &agent, "--create", "--", "python3", "-c", probe,
    ]);
    assert_eq!(
        String::from_utf8_lossy(&launched.stdout).trim(),
        "refused ok refused",
        "{launched:?}"
    );
    // doctor explains why the cgroup hooks cannot help, and names the process without the
    // filter (unless the LSM layer refuses netlink for it).
    let state = broker.state_dir();
    let doctor = broker.ctl_output(&["doctor", "--state-dir", &state.to_string_lossy()]);
    let text = String::from_utf8_lossy(&doctor.stdout);
    let line = text
        .lines()
        .find(|l| l.split_whitespace().nth(1) == Some("netlink"))
        .unwrap_or_else(|| panic!("doctor should have a netlink check:\n{text}"));
    assert!(
        line.contains("AF_INET and AF_INET6 sockets only"),
        "doctor should say why sock_create cannot refuse netlink: {line}"
    );
    if lsm_active {
        assert!(line.starts_with("ok"), "{line}");
    } else {
        assert!(line.starts_with("WARN"), "{line}");
        assert!(
            line.contains(&format!("pid {} (python3) in {raw}", plain.id())),
            "doctor should name the process without a seccomp filter: {line}"
        );
    }
    stop(plain);
}
