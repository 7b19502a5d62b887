//! The messages of the unprivileged launcher: between brokerctl and its sandbox processes (a
//! `SOCK_SEQPACKET` pair, one message per step), and the hello to brokerd's `sandbox.sock`
//! (`agent_broker_protocol::sandbox`).

use std::{
    io::{BufRead as _, BufReader, IoSlice, IoSliceMut, Read as _},
    os::{
        fd::{AsRawFd as _, FromRawFd as _, OwnedFd, RawFd},
        unix::net::UnixStream,
    },
    path::{Path, PathBuf},
    time::Duration,
};

use agent_broker_protocol::sandbox::{
    MAX_SANDBOX_SOCKETS, SANDBOX_SOCKET, SandboxHello, SandboxReply,
};
use nix::sys::socket::{ControlMessage, ControlMessageOwned, MsgFlags, UnixAddr, recvmsg, sendmsg};

use super::super::LaunchError;

/// How long brokerd may take to answer the hello.
const REPLY_TIMEOUT: Duration = Duration::from_secs(30);

/// The longest reply line read (a CA certificate and a message).
const MAX_REPLY: u64 = 256 * 1024;

/// One message on the launcher's socket pair.
pub struct Message {
    pub bytes: Vec<u8>,
    pub fds: Vec<OwnedFd>,
    /// The sender's pid in the receiver's pid namespace (`SO_PASSCRED` on the receiving end).
    pub pid: Option<i32>,
}

/// Sends `bytes` with `fds` as one message.
pub fn send(sock: RawFd, bytes: &[u8], fds: &[RawFd]) -> Result<(), LaunchError> {
    let iov = [IoSlice::new(bytes)];
    let rights = [ControlMessage::ScmRights(fds)];
    let cmsgs: &[ControlMessage] = if fds.is_empty() { &[] } else { &rights };
    sendmsg::<UnixAddr>(sock, &iov, cmsgs, MsgFlags::MSG_NOSIGNAL, None)
        .map(|_| ())
        .map_err(|e| LaunchError::Io {
            what: "sending to the other side of the launcher".into(),
            source: e.into(),
        })
}

/// Receives one message; `None` when the other side closed its end.
pub fn recv(sock: RawFd) -> Result<Option<Message>, LaunchError> {
    let mut buf = vec![0u8; 512 * 1024];
    let mut cmsg = nix::cmsg_space!([RawFd; MAX_SANDBOX_SOCKETS], libc::ucred);
    let (bytes, fds, pid) = loop {
        let mut iov = [IoSliceMut::new(&mut buf)];
        match recvmsg::<UnixAddr>(sock, &mut iov, Some(&mut cmsg), MsgFlags::MSG_CMSG_CLOEXEC) {
            Ok(msg) => {
                let mut fds = Vec::new();
                let mut pid = None;
                for c in msg.cmsgs().map_err(|e| LaunchError::Io {
                    what: "reading the launcher's message (too many descriptors)".into(),
                    source: e.into(),
                })? {
                    match c {
                        ControlMessageOwned::ScmRights(raw) => {
                            // SAFETY: the kernel just installed these descriptors for us.
                            fds.extend(
                                raw.into_iter()
                                    .map(|fd| unsafe { OwnedFd::from_raw_fd(fd) }),
                            );
                        }
                        ControlMessageOwned::ScmCredentials(cred) => pid = Some(cred.pid()),
                        _ => {}
                    }
                }
                break (msg.bytes, fds, pid);
            }
            Err(nix::errno::Errno::EINTR) => continue,
            Err(e) => {
                return Err(LaunchError::Io {
                    what: "receiving from the other side of the launcher".into(),
                    source: e.into(),
                });
            }
        }
    };
    if bytes == 0 && fds.is_empty() {
        return Ok(None);
    }
    buf.truncate(bytes);
    Ok(Some(Message {
        bytes: buf,
        fds,
        pid,
    }))
}

/// `<run-dir>/sandbox.sock`.
pub fn sandbox_socket(run_dir: &Path) -> PathBuf {
    run_dir.join(SANDBOX_SOCKET)
}

/// Connects to brokerd's sandbox socket, before anything is started.
pub fn connect(run_dir: &Path) -> Result<UnixStream, LaunchError> {
    let path = sandbox_socket(run_dir);
    let stream = UnixStream::connect(&path).map_err(|e| {
        LaunchError::Invalid(format!(
            "cannot reach brokerd's sandbox socket {}: {e}; start `brokerd --unprivileged` as \
             this user first (or point --run-dir / AGENT_BROKER_RUN_DIR at the run directory \
             of the brokerd to use); the agent was not started",
            path.display()
        ))
    })?;
    // Its listeners and its traffic go to whoever serves this socket: only this user's
    // brokerd (or root's) may.
    agent_broker_protocol::peer::check_server(&stream).map_err(|reason| {
        LaunchError::Invalid(format!(
            "refusing brokerd's sandbox socket {}: {reason}; the agent was not started",
            path.display()
        ))
    })?;
    Ok(stream)
}

/// Sends the hello with the sockets attached (one `sendmsg`) and reads brokerd's reply line.
pub fn hand_over(
    stream: &UnixStream,
    hello: &SandboxHello,
    fds: &[RawFd],
) -> Result<SandboxReply, LaunchError> {
    let mut line = serde_json::to_vec(hello)
        .map_err(|e| LaunchError::Invalid(format!("encoding the sandbox hello: {e}")))?;
    line.push(b'\n');
    let iov = [IoSlice::new(&line)];
    let rights = [ControlMessage::ScmRights(fds)];
    let sent = sendmsg::<UnixAddr>(
        stream.as_raw_fd(),
        &iov,
        &rights,
        MsgFlags::MSG_NOSIGNAL,
        None,
    )
    .map_err(|e| LaunchError::Io {
        what: "sending the sandbox hello to brokerd".into(),
        source: e.into(),
    })?;
    if sent != line.len() {
        return Err(LaunchError::Invalid(format!(
            "brokerd took {sent} of the hello's {} bytes",
            line.len()
        )));
    }
    stream
        .set_read_timeout(Some(REPLY_TIMEOUT))
        .map_err(|e| LaunchError::Io {
            what: "setting a timeout for brokerd's reply".into(),
            source: e,
        })?;
    let mut reply = String::new();
    BufReader::new(stream.take(MAX_REPLY))
        .read_line(&mut reply)
        .map_err(|e| LaunchError::Io {
            what: "reading brokerd's answer to the sandbox hello".into(),
            source: e,
        })?;
    // The connection stays open for the agent's life; nothing more is read from it.
    let _ = stream.set_read_timeout(None);
    if reply.is_empty() {
        return Err(LaunchError::Invalid(
            "brokerd closed the sandbox socket without answering the hello".into(),
        ));
    }
    serde_json::from_str(reply.trim_end()).map_err(|e| {
        LaunchError::Invalid(format!(
            "brokerd's answer to the sandbox hello is not a sandbox reply: {e}"
        ))
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use agent_broker_protocol::sandbox::SandboxSocket;

    #[test]
    fn the_hello_goes_as_one_line_with_its_sockets_and_the_reply_is_read() {
        let (ours, theirs) = UnixStream::pair().expect("pair");
        let passed = std::net::UdpSocket::bind("127.0.0.1:0").expect("udp");
        let port = passed.local_addr().expect("addr").port();
        let hello = SandboxHello {
            name: "agents/t".into(),
            pid: 7,
            sockets: vec![SandboxSocket::Dns],
        };
        let brokerd = std::thread::spawn(move || {
            let msg = recv(theirs.as_raw_fd()).expect("recv").expect("a message");
            assert_eq!(
                msg.bytes,
                b"{\"name\":\"agents/t\",\"pid\":7,\"sockets\":[\"dns\"]}\n"
            );
            assert_eq!(msg.fds.len(), 1);
            let got = std::net::UdpSocket::from(msg.fds.into_iter().next().expect("fd"));
            assert_eq!(got.local_addr().expect("addr").port(), port);
            use std::io::Write as _;
            (&theirs)
                .write_all(b"{\"reply\":\"refused\",\"message\":\"no such agent\"}\n")
                .expect("reply");
            theirs
        });
        let reply = hand_over(&ours, &hello, &[passed.as_raw_fd()]).expect("reply");
        assert_eq!(
            reply,
            SandboxReply::Refused {
                message: "no such agent".into()
            }
        );
        drop(brokerd.join().expect("fake brokerd"));
    }

    #[test]
    fn an_absent_brokerd_is_named_with_its_socket_and_what_to_start() {
        let dir = tempfile::tempdir().expect("tempdir");
        let err = connect(dir.path())
            .expect_err("nothing listens")
            .to_string();
        assert!(
            err.contains(&sandbox_socket(dir.path()).display().to_string()),
            "{err}"
        );
        assert!(err.contains("brokerd --unprivileged"), "{err}");
    }
}
