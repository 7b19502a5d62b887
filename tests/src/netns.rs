//! Network namespaces of the tests' own.
//!
//! [`TestHost`]: a non-loopback test host, a network namespace joined to the root namespace by a
//! veth pair with private 10.x addresses, running a python listener that prints every connection
//! it accepts. Drop kills the listener by pid and deletes the namespace and the veth.
//!
//! [`TestNetns`]: a bare namespace with only `lo`, up, as a container with `--network none` has.
//! Drop deletes it.

use std::{
    io::{BufRead as _, BufReader},
    net::{Ipv4Addr, SocketAddr},
    process::{Child, Command, Stdio},
    sync::{Arc, Mutex, mpsc},
    thread,
    time::Duration,
};

use nix::{
    sys::signal::{Signal, kill},
    unistd::Pid,
};

use crate::{SHORT, agent::python, run_with_timeout, unique_name};

/// Prints `port N` once listening, then `accepted HOST:PORT` per connection.
const LISTENER_PY: &str = r#"
import socket, sys
s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
s.bind((sys.argv[1], 0))
s.listen(16)
print("port %d" % s.getsockname()[1], flush=True)
while True:
    c, a = s.accept()
    print("accepted %s:%d" % a, flush=True)
    c.close()
"#;

/// A host at 10.x.y.2 inside its own network namespace; the root namespace is 10.x.y.1.
pub struct TestHost {
    netns: String,
    veth: String,
    host_ip: Ipv4Addr,
    port: u16,
    listener: Option<Child>,
    accepted: Arc<Mutex<Vec<String>>>,
}

impl TestHost {
    pub fn start() -> Self {
        let name = unique_name();
        // abtest-<pid>-<n>: derive a /30 and short interface names from pid and n.
        let mut parts = name.rsplit('-');
        let n: u32 = parts.next().and_then(|s| s.parse().ok()).unwrap_or(0);
        let pid = std::process::id();
        // 10.<100 + pid % 100>.<n % 256>.0/30: .1 in the root namespace, .2 in the host's.
        let (b, c) = (100 + (pid % 100) as u8, (n % 256) as u8);
        let root_ip = Ipv4Addr::new(10, b, c, 1);
        let host_ip = Ipv4Addr::new(10, b, c, 2);
        let veth = format!("abh{}x{}", pid % 100_000, n % 100);
        let peer = format!("abp{}x{}", pid % 100_000, n % 100);
        let mut host = Self {
            netns: name,
            veth: veth.clone(),
            host_ip,
            port: 0,
            listener: None,
            accepted: Arc::new(Mutex::new(Vec::new())),
        };
        let ns = host.netns.clone();
        ip(&["netns", "add", &ns]);
        ip(&["link", "add", &veth, "type", "veth", "peer", "name", &peer]);
        ip(&["link", "set", &peer, "netns", &ns]);
        ip(&["addr", "add", &format!("{root_ip}/30"), "dev", &veth]);
        ip(&["link", "set", &veth, "up"]);
        ip(&[
            "-n",
            &ns,
            "addr",
            "add",
            &format!("{host_ip}/30"),
            "dev",
            &peer,
        ]);
        ip(&["-n", &ns, "link", "set", &peer, "up"]);
        ip(&["-n", &ns, "link", "set", "lo", "up"]);

        let mut child = Command::new("ip")
            .args(["netns", "exec", &ns])
            .arg(python())
            .args(["-c", LISTENER_PY])
            .arg(host_ip.to_string())
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .spawn()
            .unwrap_or_else(|e| panic!("cannot start the listener in netns {ns}: {e}"));
        let stdout = child.stdout.take();
        host.listener = Some(child);
        let (port_tx, port_rx) = mpsc::channel();
        let accepted = host.accepted.clone();
        thread::spawn(move || {
            let Some(stdout) = stdout else { return };
            for line in BufReader::new(stdout).lines().map_while(Result::ok) {
                if let Some(p) = line.strip_prefix("port ") {
                    let _ = port_tx.send(p.trim().parse::<u16>().unwrap_or(0));
                } else if let Some(a) = line.strip_prefix("accepted ")
                    && let Ok(mut acc) = accepted.lock()
                {
                    acc.push(a.to_string());
                }
            }
        });
        host.port = port_rx
            .recv_timeout(SHORT)
            .unwrap_or_else(|e| panic!("the listener in netns {ns} did not report its port: {e}"));
        assert_ne!(host.port, 0, "the listener in netns {ns} reported no port");
        host
    }

    /// The root namespace's end of the veth pair (10.x.y.1): an address of brokerd's own
    /// namespace that is not loopback, for servers a workload namespace's agent reaches through
    /// brokerd (loopback destinations from a workload namespace are refused).
    pub fn root_ip(&self) -> Ipv4Addr {
        let [a, b, c, _] = self.host_ip.octets();
        Ipv4Addr::new(a, b, c, 1)
    }

    /// The listener's address (non-loopback, reachable from the root namespace).
    pub fn addr(&self) -> SocketAddr {
        SocketAddr::from((self.host_ip, self.port))
    }

    /// Peers of every connection the listener accepted, oldest first.
    pub fn accepted(&self) -> Vec<String> {
        self.accepted.lock().map(|a| a.clone()).unwrap_or_default()
    }

    /// Waits until the listener has accepted at least `n` connections; false after `timeout`.
    pub fn wait_accepted(&self, n: usize, timeout: Duration) -> bool {
        crate::poll_until(timeout, || (self.accepted().len() >= n).then_some(())).is_some()
    }
}

impl Drop for TestHost {
    fn drop(&mut self) {
        if let Some(mut child) = self.listener.take() {
            if let Ok(pid) = i32::try_from(child.id()) {
                let _ = kill(Pid::from_raw(pid), Signal::SIGKILL);
            }
            let _ = child.wait();
        }
        // Deleting the namespace destroys the peer end, which destroys the pair; the explicit
        // link delete covers a setup that failed before the peer moved.
        let _ = Command::new("ip")
            .args(["netns", "del", &self.netns])
            .stderr(Stdio::null())
            .status();
        let _ = Command::new("ip")
            .args(["link", "del", &self.veth])
            .stderr(Stdio::null())
            .status();
    }
}

/// A network namespace with only `lo` (up), named `abtest-<pid>-<n>`. Drop deletes it; the
/// caller stops what it started in it first.
pub struct TestNetns {
    name: String,
}

impl TestNetns {
    pub fn new() -> Self {
        let ns = Self {
            name: unique_name(),
        };
        ip(&["netns", "add", &ns.name]);
        ip(&["-n", &ns.name, "link", "set", "lo", "up"]);
        ns
    }

    /// The name `ip netns` knows it by.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// A command that runs `program` inside the namespace (`ip netns exec`).
    pub fn command(&self, program: impl AsRef<std::ffi::OsStr>) -> Command {
        let mut cmd = Command::new("ip");
        cmd.args(["netns", "exec", &self.name]).arg(program);
        cmd
    }
}

impl Default for TestNetns {
    fn default() -> Self {
        Self::new()
    }
}

impl Drop for TestNetns {
    fn drop(&mut self) {
        let _ = Command::new("ip")
            .args(["netns", "del", &self.name])
            .stderr(Stdio::null())
            .status();
    }
}

fn ip(args: &[&str]) {
    let out = run_with_timeout(Command::new("ip").args(args), SHORT);
    assert!(
        out.status.success(),
        "ip {} failed: {}",
        args.join(" "),
        String::from_utf8_lossy(&out.stderr)
    );
}
