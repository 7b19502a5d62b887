//! The handoff's checks, over a real Unix socket pair with real sockets attached: what is
//! refused and why, and that a sandbox namespace's sockets are taken for its own process only.

use std::{
    io::IoSlice,
    net::{TcpListener, UdpSocket},
    os::fd::{AsRawFd as _, RawFd},
    process::{Child, Command},
    time::{Duration, Instant},
};

use nix::sys::socket::{AddressFamily, ControlMessage, SockFlag, SockType, sendmsg};

use super::*;

/// Sends `line` with `fds` attached in one message and runs the checks on the other end.
async fn hand(line: &[u8], fds: &[RawFd], host_cookie: u64) -> Result<Checked, HelloError> {
    let (ours, theirs) = std::os::unix::net::UnixStream::pair().expect("socketpair");
    let cmsg = [ControlMessage::ScmRights(fds)];
    let cmsgs: &[ControlMessage<'_>] = if fds.is_empty() { &[] } else { &cmsg };
    sendmsg::<()>(
        ours.as_raw_fd(),
        &[IoSlice::new(line)],
        cmsgs,
        MsgFlags::empty(),
        None,
    )
    .expect("sendmsg");
    theirs.set_nonblocking(true).expect("nonblocking");
    let theirs = UnixStream::from_std(theirs).expect("tokio stream");
    read_hello(&theirs, host_cookie).await
}

fn hello(name: &str, pid: u32, sockets: &[SandboxSocket]) -> Vec<u8> {
    let mut line = serde_json::to_vec(&SandboxHello {
        name: name.into(),
        pid,
        sockets: sockets.to_vec(),
    })
    .expect("json");
    line.push(b'\n');
    line
}

fn host_cookie() -> u64 {
    let probe = UdpSocket::bind("127.0.0.1:0").expect("probe");
    netns::socket_netns_cookie(&probe).expect("cookie")
}

#[tokio::test]
async fn a_hello_is_refused_unless_its_sockets_are_what_it_says() {
    use SandboxSocket::{Dns, Tcp};
    let host = host_cookie();
    let me = std::process::id();
    let listener = TcpListener::bind("127.0.0.1:0").expect("listen");
    let udp = UdpSocket::bind("127.0.0.1:0").expect("udp");
    let unbound = nix::sys::socket::socket(
        AddressFamily::Inet,
        SockType::Stream,
        SockFlag::empty(),
        None,
    )
    .expect("socket");
    let (unix, _other) = std::os::unix::net::UnixDatagram::pair().expect("unix pair");
    let l = listener.as_raw_fd();

    let err = |r: Result<Checked, HelloError>| match r {
        Ok(c) => panic!("accepted: {c:?}"),
        Err(e) => e.to_string(),
    };
    // brokerd's own namespace: not a sandbox's.
    assert!(matches!(
        hand(&hello("agents/a", me, &[Tcp]), &[l], host).await,
        Err(HelloError::HostNamespace)
    ));
    // As many sockets as listed.
    assert_eq!(
        err(hand(&hello("agents/a", me, &[Tcp, Dns]), &[l], host).await),
        "the hello lists 2 sockets and 1 are attached"
    );
    assert_eq!(
        err(hand(&hello("agents/a", me, &[Tcp]), &[], host).await),
        "the hello lists 1 sockets and 0 are attached"
    );
    // Each socket is what the hello says.
    assert_eq!(
        err(hand(&hello("agents/a", me, &[Tcp]), &[udp.as_raw_fd()], host).await),
        "socket 0 (Tcp): a Datagram socket, not TCP"
    );
    assert_eq!(
        err(hand(&hello("agents/a", me, &[Tcp]), &[unbound.as_raw_fd()], host).await),
        "socket 0 (Tcp): not listening"
    );
    assert_eq!(
        err(hand(&hello("agents/a", me, &[Tcp, Dns]), &[l, l], host).await),
        "socket 1 (Dns): a Stream socket, not UDP"
    );
    assert_eq!(
        err(hand(
            &hello("agents/a", me, &[Tcp, Dns]),
            &[l, unix.as_raw_fd()],
            host
        )
        .await),
        "socket 1 (Dns): not an IPv4 or IPv6 socket"
    );
    // A DNS socket alone serves nothing.
    assert_eq!(
        err(hand(&hello("agents/a", me, &[Dns]), &[udp.as_raw_fd()], host).await),
        "the hello lists no TCP listener"
    );
    // The name is an agent name.
    assert!(
        err(hand(&hello("../x", me, &[Tcp]), &[l], host).await).starts_with("agent name \"../x\"")
    );
    // Framing: one JSON line.
    assert_eq!(
        err(hand(
            br#"{"name":"agents/a","pid":1,"sockets":["tcp"]}"#,
            &[l],
            host
        )
        .await),
        "the hello is not one JSON line of at most 16384 bytes ending in a newline"
    );
    assert!(
        err(hand(b"{\"name\":\"agents/a\"}\n", &[l], host).await).starts_with("malformed hello")
    );
    // More descriptors than a hello may carry: the rest are cut off (and closed), refused.
    let many = [l; MAX_SANDBOX_SOCKETS + 1];
    assert_eq!(
        err(hand(
            &hello("agents/a", me, &[Tcp; MAX_SANDBOX_SOCKETS + 1]),
            &many,
            host
        )
        .await),
        format!("at most {MAX_SANDBOX_SOCKETS} sockets may be attached")
    );
}

/// A process in a network namespace of its own (`unshare -n`, root), with `lo` up.
struct NetnsProcess(Child);

impl NetnsProcess {
    fn start() -> Self {
        let child = Command::new("unshare")
            .args(["-n", "sh", "-c", "ip link set lo up && exec sleep 60"])
            .spawn()
            .expect("unshare -n (these tests run as root)");
        Self(child)
    }

    fn pid(&self) -> u32 {
        self.0.id()
    }

    /// Its namespace's sockets, opened as brokerd opens a workload's: once `lo` is up.
    fn open(&self, host: u64) -> netns::Opened {
        let deadline = Instant::now() + Duration::from_secs(5);
        loop {
            let pidfd = netns::pidfd_open(self.pid()).expect("pidfd");
            match netns::open_in(
                pidfd,
                host,
                vec!["127.0.0.1:0".parse().expect("addr")],
                15053,
            ) {
                Ok(Some(opened)) => return opened,
                Ok(None) if Instant::now() < deadline => {}
                Err(netns::NetnsError::LoopbackDown) if Instant::now() < deadline => {}
                other => panic!("cannot open sockets in the namespace: {:?}", other.err()),
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }
}

impl Drop for NetnsProcess {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

#[tokio::test]
async fn a_sandbox_namespaces_sockets_are_taken_for_a_process_in_it_only() {
    use SandboxSocket::{Dns, Tcp};
    let host = host_cookie();
    let sandbox = NetnsProcess::start();
    let opened = sandbox.open(host);
    let (l, u) = (opened.tcp[0].as_raw_fd(), opened.udp[0].as_raw_fd());

    let checked = hand(
        &hello("agents/a", sandbox.pid(), &[Tcp, Dns]),
        &[l, u],
        host,
    )
    .await
    .expect("a sandbox's own sockets, for its own process");
    assert_eq!(checked.cookie, opened.cookie);
    assert_eq!(checked.name.to_string(), "agents/a");
    assert_eq!((checked.tcp.len(), checked.udp.len()), (1, 1));
    assert_eq!(checked.comm, "sleep");

    // Another process (this one, in brokerd's namespace) may not claim them.
    let me = std::process::id();
    match hand(&hello("agents/a", me, &[Tcp, Dns]), &[l, u], host).await {
        Err(HelloError::Process { pid, .. }) => assert_eq!(pid, me),
        other => panic!("claimed by another process: {other:?}"),
    }
    // Sockets of two namespaces in one hello.
    let udp = UdpSocket::bind("127.0.0.1:0").expect("udp");
    assert!(matches!(
        hand(
            &hello("agents/a", sandbox.pid(), &[Tcp, Dns]),
            &[l, udp.as_raw_fd()],
            host
        )
        .await,
        Err(HelloError::MixedNamespaces)
    ));
}
