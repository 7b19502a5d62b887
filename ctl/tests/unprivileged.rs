//! Issue 19: `brokerctl run --unprivileged`, run for real as uid 65534 (no capabilities)
//! against a fake brokerd written here: it receives the hello and the sockets on
//! `sandbox.sock`, answers `Serving` with a test CA, accepts the redirected connections and
//! reads their original destinations with `SO_ORIGINAL_DST`, and answers DNS datagrams.
//!
//! The test runs as root only to drop to uid 65534 (`setpriv`); it fails rather than skips
//! without root. Every destination the agent dials is a TEST-NET / documentation address or
//! loopback, dialled only from inside the sandbox's network namespace, which has nothing but
//! `lo`: the agent script refuses to run in the host's network namespace, and nothing here
//! sends anything anywhere else (no AF_VSOCK beyond creating a socket, which must fail).

use std::{
    io::{BufRead as _, BufReader, IoSliceMut, Write as _},
    net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr},
    os::{
        fd::{AsRawFd as _, FromRawFd as _, OwnedFd, RawFd},
        unix::{
            fs::PermissionsExt as _,
            net::{UnixListener, UnixStream},
        },
    },
    path::{Path, PathBuf},
    process::{Child, Command, Stdio},
    sync::mpsc,
    time::{Duration, Instant},
};

use agent_broker_protocol::sandbox::{SandboxHello, SandboxReply, SandboxSocket};
use nix::sys::socket::{ControlMessageOwned, MsgFlags, UnixAddr, recvmsg};

const NOBODY: u32 = 65534;
const PYTHON: &str = "/usr/bin/python3";
const DEADLINE: Duration = Duration::from_secs(20);

/// A public, self-signed test CA certificate (no key anywhere).
const TEST_CA: &str = "-----BEGIN CERTIFICATE-----
MIIBwjCCAWmgAwIBAgIUEqDZFr+9AZ+n25iR7sygcUIOudUwCgYIKoZIzj0EAwIw
NjEdMBsGA1UEAwwUYWdlbnQtYnJva2VyIHRlc3QgQ0ExFTATBgNVBAoMDGFnZW50
LWJyb2tlcjAgFw0yNjEyMDMxMjIwMTVaGA8yMTI2MTEwOTEyMjAxNVowNjEdMBsG
A1UEAwwUYWdlbnQtYnJva2VyIHRlc3QgQ0ExFTATBgNVBAoMDGFnZW50LWJyb2tl
cjBZMBMGByqGSM49AgEGCCqGSM49AwEHA0IABJPUHpe0msp2cYxRfDYiVBLJdH5A
ufaPGFhCUH/7pMQ/N1AeFPvYb9kZMbnmPnFixwGvmjPF1tu9tLcvguy+ahijUzBR
MB0GA1UdDgQWBBSAI2TLxw5+yuYAJYDSl6O5tI2AZTAfBgNVHSMEGDAWgBSAI2TL
xw5+yuYAJYDSl6O5tI2AZTAPBgNVHRMBAf8EBTADAQH/MAoGCCqGSM49BAMCA0cA
MEQCIFqbb1uqTxm1oKMH8KkOI2fWTnHz+KFWNpcGt8qZ57VUAiBH32DLr661PtSc
ghcgmsOmKa3erQWgYBBw1MSSoGI3XA==
-----END CERTIFICATE-----
";

/// The agent: escape attempts first (so the connects after them show the rules held), then
/// the redirected traffic, then (after brokerctl's stdin says so) a connect once the fake
/// brokerd has gone.
const AGENT: &str = r#"
import os, socket, subprocess, sys, ctypes
if os.readlink("/proc/self/ns/net") == os.environ["HOST_NETNS"]:
    print("REFUSING: in the host network namespace", flush=True); sys.exit(99)
def out(*a): print(*a, flush=True)
def err(e): return "ERR " + (os.strerror(e.errno) if getattr(e, "errno", None) else repr(e))
def run(*cmd):
    try:
        return "rc=%d" % subprocess.run(cmd, capture_output=True).returncode
    except OSError as e:
        return err(e)
out("uid", os.getuid(), "pid", os.getpid())
out("nft-flush", run("/usr/sbin/nft", "flush", "ruleset"))
out("iptables-flush", run("/usr/sbin/iptables-nft", "-t", "nat", "-F"))
out("route-del", run("/usr/sbin/ip", "route", "del", "default"))
def attempt(name, f):
    try:
        f(); out(name, "OK")
    except OSError as e:
        out(name, err(e))
attempt("raw", lambda: socket.socket(socket.AF_INET, socket.SOCK_RAW, socket.IPPROTO_TCP))
attempt("packet", lambda: socket.socket(socket.AF_PACKET, socket.SOCK_RAW, 0))
attempt("vsock", lambda: socket.socket(40, socket.SOCK_STREAM))
attempt("so-mark", lambda: socket.socket().setsockopt(socket.SOL_SOCKET, 36, 0xa11))
libc = ctypes.CDLL(None, use_errno=True)
def unshare(flags):
    if libc.unshare(flags) != 0:
        e = ctypes.get_errno(); raise OSError(e, os.strerror(e))
attempt("unshare-net", lambda: unshare(0x40000000))
attempt("unshare-user", lambda: unshare(0x10000000))
brokerctl = int(sys.stdin.readline())
attempt("kill-brokerctl", lambda: os.kill(brokerctl, 0))
attempt("sandbox-sock", lambda: socket.socket(socket.AF_UNIX).connect(os.environ["SANDBOX_SOCK"]))
attempt("proc1-mem", lambda: open("/proc/1/mem", "rb"))
for host, port in (("192.0.2.1", 443), ("2001:db8::1", 443), ("127.0.0.1", 8080)):
    s = socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET); s.settimeout(5)
    try:
        s.connect((host, port)); out("tcp", host, port, s.recv(100).decode().strip())
    except OSError as e:
        out("tcp", host, port, err(e))
u = socket.socket(socket.AF_INET, socket.SOCK_DGRAM); u.settimeout(5)
try:
    u.sendto(b"\x12\x34query", ("8.8.8.8", 53)); d, peer = u.recvfrom(100)
    out("dns", d.decode(), peer[0], peer[1])
except OSError as e:
    out("dns", err(e))
attempt("udp-123", lambda: u.sendto(b"x", ("8.8.8.8", 123)))
out("resolv", open("/etc/resolv.conf").read().split("\n")[1])
out("phase1-done")
sys.stdin.readline()
s = socket.socket(); s.settimeout(5)
attempt("after-brokerd", lambda: s.connect(("192.0.2.1", 443)))
"#;

fn require_root() {
    assert!(
        nix::unistd::geteuid().is_root(),
        "this test runs brokerctl as uid 65534 through setpriv and must run as root (it fails \
         instead of skipping)"
    );
    for tool in ["/usr/bin/setpriv", PYTHON] {
        assert!(Path::new(tool).exists(), "{tool} is needed");
    }
    assert!(
        [
            "/usr/sbin/nft",
            "/usr/sbin/iptables-nft-restore",
            "/sbin/nft"
        ]
        .iter()
        .any(|p| Path::new(p).exists()),
        "nftables is needed (apt-get install nftables)"
    );
}

/// A directory uid 65534 owns.
fn nobody_dir() -> tempfile::TempDir {
    let dir = tempfile::tempdir().expect("tempdir");
    std::os::unix::fs::chown(dir.path(), Some(NOBODY), Some(NOBODY)).expect("chown");
    std::fs::set_permissions(dir.path(), std::fs::Permissions::from_mode(0o700)).expect("chmod");
    dir
}

fn brokerctl() -> PathBuf {
    let bin = PathBuf::from(env!("CARGO_BIN_EXE_brokerctl"));
    for dir in bin.ancestors().skip(1) {
        let mode = std::fs::metadata(dir).expect("stat").permissions().mode();
        assert!(
            mode & 0o001 != 0,
            "{} is not searchable by others, so uid 65534 cannot run {}",
            dir.display(),
            bin.display()
        );
    }
    bin
}

/// `brokerctl --run-dir RUN run --unprivileged --as agents/unpriv -- CMD...` as uid 65534.
fn spawn_brokerctl(run: &Path, work: &Path, cmd: &[&str]) -> Child {
    let mut command = Command::new("/usr/bin/setpriv");
    command
        .args([
            "--reuid",
            "65534",
            "--regid",
            "65534",
            "--clear-groups",
            "--",
        ])
        .arg(brokerctl());
    spawn_with(command, run, work, cmd)
}

/// The same, run by `command` (setpriv, or brokerctl itself as root).
fn spawn_with(mut command: Command, run: &Path, work: &Path, cmd: &[&str]) -> Child {
    let host_netns = std::fs::read_link("/proc/self/ns/net").expect("netns");
    command
        .arg("--run-dir")
        .arg(run)
        .args([
            "run",
            "--unprivileged",
            "--as",
            "agents/unpriv",
            "--workdir",
        ])
        .arg(work)
        .arg("--")
        .args(cmd)
        .env_remove("XDG_RUNTIME_DIR")
        .env("HOST_NETNS", host_netns)
        .env("SANDBOX_SOCK", run.join("sandbox.sock"))
        .current_dir(work)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("start brokerctl")
}

/// The fake brokerd's socket, connectable by uid 65534.
fn sandbox_listener(run: &Path) -> UnixListener {
    let path = run.join("sandbox.sock");
    let listener = UnixListener::bind(&path).expect("bind sandbox.sock");
    std::os::unix::fs::chown(&path, Some(NOBODY), Some(NOBODY)).expect("chown sandbox.sock");
    listener
}

/// Receives the hello and its sockets.
fn receive_hello(conn: &UnixStream) -> (SandboxHello, Vec<OwnedFd>) {
    let mut buf = vec![0u8; 64 * 1024];
    let mut cmsg = nix::cmsg_space!([RawFd; 8]);
    let mut iov = [IoSliceMut::new(&mut buf)];
    let msg = recvmsg::<UnixAddr>(
        conn.as_raw_fd(),
        &mut iov,
        Some(&mut cmsg),
        // Close-on-exec: the other test's brokerctl must not inherit them (and keep a listener
        // open after this fake brokerd closed its copies).
        MsgFlags::MSG_CMSG_CLOEXEC,
    )
    .expect("recvmsg");
    let mut fds = Vec::new();
    for c in msg.cmsgs().expect("cmsgs") {
        if let ControlMessageOwned::ScmRights(raw) = c {
            // SAFETY: the kernel just installed these descriptors in this process.
            fds.extend(
                raw.into_iter()
                    .map(|fd| unsafe { OwnedFd::from_raw_fd(fd) }),
            );
        }
    }
    let n = msg.bytes;
    let line = std::str::from_utf8(&buf[..n]).expect("utf-8 hello");
    assert!(line.ends_with('\n'), "the hello is one line: {line:?}");
    let hello: SandboxHello = serde_json::from_str(line.trim_end()).expect("a hello");
    (hello, fds)
}

fn reply(conn: &UnixStream, reply: &SandboxReply) {
    let mut line = serde_json::to_vec(reply).expect("json");
    line.push(b'\n');
    (&*conn).write_all(&line).expect("reply");
}

/// `SO_ORIGINAL_DST` (IPv4) or `IP6T_SO_ORIGINAL_DST` (IPv6) of an accepted connection.
fn original_dst(fd: RawFd, v6: bool) -> SocketAddr {
    const SO_ORIGINAL_DST: libc::c_int = 80;
    if v6 {
        // SAFETY: zeroed sockaddr_in6 is valid; getsockopt writes at most `len` bytes.
        let mut addr: libc::sockaddr_in6 = unsafe { std::mem::zeroed() };
        let mut len = std::mem::size_of::<libc::sockaddr_in6>() as libc::socklen_t;
        // SAFETY: as above.
        let r = unsafe {
            libc::getsockopt(
                fd,
                libc::SOL_IPV6,
                SO_ORIGINAL_DST,
                (&mut addr as *mut libc::sockaddr_in6).cast(),
                &mut len,
            )
        };
        assert_eq!(
            r,
            0,
            "IP6T_SO_ORIGINAL_DST: {}",
            std::io::Error::last_os_error()
        );
        SocketAddr::new(
            IpAddr::V6(Ipv6Addr::from(addr.sin6_addr.s6_addr)),
            u16::from_be(addr.sin6_port),
        )
    } else {
        // SAFETY: zeroed sockaddr_in is valid; getsockopt writes at most `len` bytes.
        let mut addr: libc::sockaddr_in = unsafe { std::mem::zeroed() };
        let mut len = std::mem::size_of::<libc::sockaddr_in>() as libc::socklen_t;
        // SAFETY: as above.
        let r = unsafe {
            libc::getsockopt(
                fd,
                libc::SOL_IP,
                SO_ORIGINAL_DST,
                (&mut addr as *mut libc::sockaddr_in).cast(),
                &mut len,
            )
        };
        assert_eq!(r, 0, "SO_ORIGINAL_DST: {}", std::io::Error::last_os_error());
        SocketAddr::new(
            IpAddr::V4(Ipv4Addr::from(u32::from_be(addr.sin_addr.s_addr))),
            u16::from_be(addr.sin_port),
        )
    }
}

/// What the fake brokerd saw.
#[derive(Debug)]
enum Seen {
    Tcp(SocketAddr),
    Dns(Vec<u8>),
}

/// Serves the passed sockets until `stop` says so: every connection gets its original
/// destination as one line, every datagram the answer "answer".
fn serve(
    sockets: Vec<(SandboxSocket, OwnedFd)>,
    seen: mpsc::Sender<Seen>,
    stop: mpsc::Receiver<()>,
) {
    let mut tcp = Vec::new();
    let mut dns = Vec::new();
    for (kind, fd) in sockets {
        match kind {
            SandboxSocket::Tcp => {
                let l = std::net::TcpListener::from(fd);
                l.set_nonblocking(true).expect("nonblocking");
                tcp.push(l);
            }
            SandboxSocket::Dns => {
                let u = std::net::UdpSocket::from(fd);
                u.set_nonblocking(true).expect("nonblocking");
                dns.push(u);
            }
        }
    }
    while stop.try_recv().is_err() {
        let mut idle = true;
        for l in &tcp {
            if let Ok((mut conn, _)) = l.accept() {
                idle = false;
                let v6 = l.local_addr().expect("addr").is_ipv6();
                let dst = original_dst(conn.as_raw_fd(), v6);
                conn.set_nonblocking(false).expect("blocking");
                // Recorded before the answer, which the test waits for.
                let _ = seen.send(Seen::Tcp(dst));
                // One write: the agent reads once.
                let _ = conn.write_all(format!("orig {dst}\n").as_bytes());
            }
        }
        for u in &dns {
            let mut buf = [0u8; 512];
            if let Ok((n, peer)) = u.recv_from(&mut buf) {
                idle = false;
                let _ = seen.send(Seen::Dns(buf[..n].to_vec()));
                let _ = u.send_to(b"answer", peer);
            }
        }
        if idle {
            std::thread::sleep(Duration::from_millis(10));
        }
    }
    // Dropping the listeners closes brokerd's (the only) copies.
}

/// Reads the agent's lines until `until` (or the end), with a deadline.
fn read_until(lines: &mpsc::Receiver<String>, until: &str) -> Vec<String> {
    let start = Instant::now();
    let mut got = Vec::new();
    while start.elapsed() < DEADLINE {
        match lines.recv_timeout(Duration::from_millis(200)) {
            Ok(line) => {
                let done = line == until;
                got.push(line);
                if done {
                    return got;
                }
            }
            Err(mpsc::RecvTimeoutError::Timeout) => {}
            Err(mpsc::RecvTimeoutError::Disconnected) => break,
        }
    }
    got
}

fn line_of<'a>(lines: &'a [String], prefix: &str) -> &'a str {
    lines
        .iter()
        .find(|l| l.starts_with(prefix))
        .map(String::as_str)
        .unwrap_or_else(|| panic!("no {prefix:?} line in {lines:#?}"))
}

fn wait_with_deadline(child: &mut Child) -> std::process::ExitStatus {
    let start = Instant::now();
    loop {
        if let Some(status) = child.try_wait().expect("wait") {
            return status;
        }
        if start.elapsed() > DEADLINE {
            let _ = child.kill();
            panic!("brokerctl did not exit in time");
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// How the sandbox's rules are loaded.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Firewall {
    Nft,
    /// `nft` hidden (/dev/null over it in a private mount namespace of brokerctl's): brokerctl
    /// falls back to iptables-nft-restore and ip6tables-nft-restore.
    IptablesNft,
}

#[test]
fn an_unprivileged_sandbox_redirects_everything_to_brokerd_and_fails_closed() {
    redirects_everything_and_fails_closed(Firewall::Nft);
}

#[test]
fn without_nft_the_iptables_nft_rules_do_the_same() {
    redirects_everything_and_fails_closed(Firewall::IptablesNft);
}

fn redirects_everything_and_fails_closed(firewall: Firewall) {
    require_root();
    let run = nobody_dir();
    let work = nobody_dir();
    let agent = work.path().join("agent.py");
    std::fs::write(&agent, AGENT).expect("agent script");
    std::fs::set_permissions(&agent, std::fs::Permissions::from_mode(0o644)).expect("chmod");
    let listener = sandbox_listener(run.path());
    let cmd = [PYTHON, agent.to_str().expect("utf-8")];
    let mut child = match firewall {
        Firewall::Nft => spawn_brokerctl(run.path(), work.path(), &cmd),
        Firewall::IptablesNft => {
            let nft = ["/usr/sbin/nft", "/sbin/nft"]
                .into_iter()
                .find(|p| Path::new(p).exists())
                .expect("nft is installed (it is hidden for this test)");
            // util-linux unshare makes the new mount namespace's mounts private; each command
            // executes the next in place, so the child's pid is brokerctl's.
            let mut command = Command::new("unshare");
            command
                .args(["--mount", "--", "/bin/sh", "-c"])
                .arg(format!(
                    "mount --bind /dev/null {nft} && exec \"$0\" \"$@\""
                ))
                .args([
                    "/usr/bin/setpriv",
                    "--reuid",
                    "65534",
                    "--regid",
                    "65534",
                    "--clear-groups",
                    "--",
                ])
                .arg(brokerctl());
            spawn_with(command, run.path(), work.path(), &cmd)
        }
    };
    let brokerctl_pid = child.id();
    let mut stdin = child.stdin.take().expect("stdin");
    writeln!(stdin, "{brokerctl_pid}").expect("write the pid");
    let stdout = child.stdout.take().expect("stdout");
    let (line_tx, lines) = mpsc::channel();
    std::thread::spawn(move || {
        for line in BufReader::new(stdout).lines().map_while(Result::ok) {
            if line_tx.send(line).is_err() {
                break;
            }
        }
    });

    // The hello.
    listener.set_nonblocking(false).expect("blocking");
    let (conn, _) = listener.accept().expect("brokerctl connects");
    let (hello, fds) = receive_hello(&conn);
    assert_eq!(hello.name, "agents/unpriv");
    assert_eq!(hello.sockets.len(), fds.len(), "{hello:?}");
    assert!(
        hello.sockets.contains(&SandboxSocket::Tcp) && hello.sockets.contains(&SandboxSocket::Dns)
    );
    // The pid is the agent's, as this (the host's) pid namespace sees it: pid 2 of its own.
    let status = std::fs::read_to_string(format!("/proc/{}/status", hello.pid)).expect("status");
    let nspid = status
        .lines()
        .find(|l| l.starts_with("NSpid:"))
        .expect("NSpid");
    assert!(nspid.split_whitespace().last() == Some("2"), "{nspid}");
    reply(
        &conn,
        &SandboxReply::Serving {
            agent: hello.name.clone(),
            ca_pem: TEST_CA.into(),
            hide: vec![],
        },
    );
    let (seen_tx, seen) = mpsc::channel();
    let (stop_tx, stop) = mpsc::channel();
    let sockets: Vec<_> = hello.sockets.iter().copied().zip(fds).collect();
    let server = std::thread::spawn(move || serve(sockets, seen_tx, stop));

    let got = read_until(&lines, "phase1-done");
    assert_eq!(
        got.last().map(String::as_str),
        Some("phase1-done"),
        "{got:#?}"
    );
    assert_eq!(line_of(&got, "uid"), "uid 65534 pid 2");
    if firewall == Firewall::IptablesNft {
        // The hiding worked (nft is /dev/null here), so the rules came from iptables-nft.
        let line = line_of(&got, "nft-flush");
        assert!(line.contains(" ERR "), "{line}");
    }
    for escape in ["nft-flush", "iptables-flush", "route-del"] {
        let line = line_of(&got, escape);
        assert!(!line.ends_with("rc=0"), "{line}");
    }
    for refused in [
        "raw ",
        "packet ",
        "vsock ",
        "so-mark ",
        "unshare-net ",
        "unshare-user ",
        "kill-brokerctl ",
        "sandbox-sock ",
        "proc1-mem ",
        "udp-123 ",
    ] {
        let line = line_of(&got, refused);
        assert!(line.contains(" ERR "), "{line}");
    }
    assert_eq!(
        line_of(&got, "tcp 192.0.2.1"),
        "tcp 192.0.2.1 443 orig 192.0.2.1:443"
    );
    assert_eq!(
        line_of(&got, "tcp 2001:db8::1"),
        "tcp 2001:db8::1 443 orig [2001:db8::1]:443"
    );
    assert_eq!(
        line_of(&got, "tcp 127.0.0.1"),
        "tcp 127.0.0.1 8080 orig 127.0.0.1:8080"
    );
    assert_eq!(line_of(&got, "dns"), "dns answer 8.8.8.8 53");
    assert_eq!(line_of(&got, "resolv"), "resolv nameserver 127.0.0.1");
    let mut tcp = Vec::new();
    let mut datagrams = Vec::new();
    while let Ok(s) = seen.try_recv() {
        match s {
            Seen::Tcp(a) => tcp.push(a.to_string()),
            Seen::Dns(d) => datagrams.push(d),
        }
    }
    assert_eq!(
        tcp,
        ["192.0.2.1:443", "[2001:db8::1]:443", "127.0.0.1:8080"]
    );
    assert_eq!(
        datagrams,
        [b"\x12\x34query".to_vec()],
        "only the port-53 datagram arrives"
    );

    // brokerd goes away: its sockets and the sandbox connection close; connects are refused.
    stop_tx.send(()).expect("stop");
    server.join().expect("fake brokerd");
    drop(conn);
    writeln!(stdin, "go").expect("go on");
    let got = read_until(&lines, "");
    assert_eq!(
        line_of(&got, "after-brokerd"),
        "after-brokerd ERR Connection refused"
    );
    let status = wait_with_deadline(&mut child);
    assert_eq!(status.code(), Some(0), "{status:?}");
}

#[test]
fn a_refused_sandbox_starts_nothing_and_exit_statuses_pass_through() {
    require_root();
    let run = nobody_dir();
    let work = nobody_dir();
    let marker = work.path().join("started");
    let listener = sandbox_listener(run.path());

    // Refused: the command never runs.
    let script = format!("touch {}", marker.display());
    let mut child = spawn_brokerctl(run.path(), work.path(), &["/bin/sh", "-c", &script]);
    let (conn, _) = listener.accept().expect("brokerctl connects");
    let (hello, fds) = receive_hello(&conn);
    drop(fds);
    reply(
        &conn,
        &SandboxReply::Refused {
            message: format!("no policy for {}", hello.name),
        },
    );
    let status = wait_with_deadline(&mut child);
    let mut stderr = String::new();
    std::io::Read::read_to_string(&mut child.stderr.take().expect("stderr"), &mut stderr)
        .expect("stderr");
    assert!(!status.success(), "{status:?}");
    assert!(
        stderr.contains("brokerd refused the sandbox: no policy for agents/unpriv"),
        "{stderr}"
    );
    assert!(!marker.exists(), "the command ran although brokerd refused");

    // Served: the command's exit status, and 128 + signal when it is killed.
    for (script, code) in [("exit 7", 7), ("kill -TERM $$", 128 + libc::SIGTERM)] {
        let mut child = spawn_brokerctl(run.path(), work.path(), &["/bin/sh", "-c", script]);
        let (conn, _) = listener.accept().expect("brokerctl connects");
        let (hello, _fds) = receive_hello(&conn);
        reply(
            &conn,
            &SandboxReply::Serving {
                agent: hello.name,
                ca_pem: TEST_CA.into(),
                hide: vec![],
            },
        );
        let status = wait_with_deadline(&mut child);
        assert_eq!(status.code(), Some(code), "{script}: {status:?}");
    }

    // Signals to brokerctl reach the agent (pid 2 of its namespace, so not ignored as a pid 1
    // would ignore them), and the status says so.
    let mut child = spawn_brokerctl(
        run.path(),
        work.path(),
        &["/bin/sh", "-c", "echo started; exec sleep 30"],
    );
    let (conn, _) = listener.accept().expect("brokerctl connects");
    let (hello, _fds) = receive_hello(&conn);
    reply(
        &conn,
        &SandboxReply::Serving {
            agent: hello.name,
            ca_pem: TEST_CA.into(),
            hide: vec![],
        },
    );
    let mut line = String::new();
    BufReader::new(child.stdout.as_mut().expect("stdout"))
        .read_line(&mut line)
        .expect("read");
    assert_eq!(line, "started\n");
    // SAFETY: signals our own child (brokerctl; setpriv executed it in place).
    assert_eq!(unsafe { libc::kill(child.id() as i32, libc::SIGTERM) }, 0);
    let status = wait_with_deadline(&mut child);
    assert_eq!(status.code(), Some(128 + libc::SIGTERM), "{status:?}");

    // Run by root, the sandbox is the same: uid 65534 and no supplementary groups (root's
    // would survive a user namespace otherwise).
    let mut child = spawn_with(
        Command::new(brokerctl()),
        run.path(),
        work.path(),
        &[
            "/bin/sh",
            "-c",
            "id -u; grep -E '^(Groups|SigIgn):' /proc/self/status",
        ],
    );
    let (conn, _) = listener.accept().expect("brokerctl connects");
    let (hello, _fds) = receive_hello(&conn);
    reply(
        &conn,
        &SandboxReply::Serving {
            agent: hello.name,
            ca_pem: TEST_CA.into(),
            hide: vec![],
        },
    );
    let status = wait_with_deadline(&mut child);
    let mut out = String::new();
    std::io::Read::read_to_string(&mut child.stdout.take().expect("stdout"), &mut out)
        .expect("stdout");
    assert!(status.success(), "{status:?}");
    let words: Vec<&str> = out.split_whitespace().collect();
    assert_eq!(words[..3], ["65534", "Groups:", "SigIgn:"], "{out}");
    // brokerctl's own SIGPIPE disposition (ignored by Rust's runtime) is not inherited.
    let ignored = u64::from_str_radix(words[3], 16).expect("SigIgn mask");
    assert_eq!(ignored & (1 << (libc::SIGPIPE - 1)), 0, "{out}");

    // No brokerd: the error names the socket and what to start.
    drop(listener);
    std::fs::remove_file(run.path().join("sandbox.sock")).expect("remove the socket");
    let out = spawn_brokerctl(run.path(), work.path(), &["/bin/sh", "-c", &script])
        .wait_with_output()
        .expect("brokerctl");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success());
    assert!(
        stderr.contains("sandbox.sock") && stderr.contains("brokerd --unprivileged"),
        "{stderr}"
    );
    assert!(!marker.exists());
}
