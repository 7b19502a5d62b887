//! The reader thread against a fake brokerd on a real Unix socket: history then live events,
//! the fallback to `subscribe`, and reconnecting when brokerd goes away and comes back.

#[expect(dead_code, reason = "this file needs only the fixed events")]
mod common;

use std::{
    fs,
    io::{BufRead as _, BufReader, Write as _},
    os::unix::net::{UnixListener, UnixStream},
    path::PathBuf,
    sync::mpsc::Receiver,
    time::{Duration, Instant, SystemTime, UNIX_EPOCH},
};

use agent_broker_console::{
    Feed, FeedMsg,
    feed::{history_request, socket_path},
};
use agent_broker_protocol::{
    AuditEvent, Counters, ErrorKind, PolicyStatus, Request, Response, StatusReport, decode_line,
    encode_line,
};

const WAIT: Duration = Duration::from_secs(10);

fn run_dir(name: &str) -> PathBuf {
    let nanos = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.subsec_nanos())
        .unwrap_or(0);
    let dir = std::env::temp_dir().join(format!("abc-{name}-{}-{nanos}", std::process::id()));
    fs::create_dir_all(&dir).expect("run dir");
    dir
}

fn status() -> StatusReport {
    StatusReport {
        version: "0.1.0-test".into(),
        pid: 4242,
        listeners: vec!["127.0.0.1:15001".parse().expect("addr")],
        cgroup_root: "/sys/fs/cgroup".into(),
        pin_dir: "/sys/fs/bpf/agent-broker".into(),
        cgroups: Vec::new(),
        counters: Counters::default(),
        policy: PolicyStatus {
            dir: "/etc/agent-broker/policies".into(),
            files: 1,
            loaded_unix: 0,
            error: None,
        },
        dns_listeners: Vec::new(),
        hooks: Vec::new(),
        lsm: String::new(),
        hardening: String::new(),
        unprotected: Vec::new(),
        outside_sockets: Vec::new(),
        outside_sockets_note: None,
        shares: Vec::new(),
        open_connections: 0,
        max_connections: 0,
        workloads: Vec::new(),
        audit_error: None,
        audit_dropped: 0,
        runtime: Default::default(),
        unprivileged: false,
    }
}

/// One accepted console connection of the event reader, seen from brokerd's side.
struct Peer {
    reader: BufReader<UnixStream>,
    writer: UnixStream,
    /// The first request, read to tell the reader's connection from the credentials poller's.
    first: Option<Request>,
}

impl Peer {
    /// The event reader's next connection; the credentials and approvals pollers' connections
    /// (a `secret_list` or `approval_list` first) are answered with an empty list on the way.
    fn accept(listener: &UnixListener) -> Self {
        loop {
            let (stream, _) = listener.accept().expect("accept");
            stream.set_read_timeout(Some(WAIT)).expect("timeout");
            let mut peer = Self {
                writer: stream.try_clone().expect("clone"),
                reader: BufReader::new(stream),
                first: None,
            };
            let Some(first) = peer.read_request() else {
                continue; // closed before it asked anything
            };
            if first == Request::SecretList {
                peer.send(&Response::Secrets {
                    secrets: Vec::new(),
                });
                continue;
            }
            if first == Request::ApprovalList {
                peer.send(&Response::Approvals {
                    pending: Vec::new(),
                });
                continue;
            }
            peer.first = Some(first);
            return peer;
        }
    }

    fn read_request(&mut self) -> Option<Request> {
        let mut line = Vec::new();
        match self.reader.read_until(b'\n', &mut line) {
            Ok(0) | Err(_) => None,
            Ok(_) => Some(decode_line(&line).expect("a protocol request")),
        }
    }

    fn request(&mut self) -> Request {
        if let Some(first) = self.first.take() {
            return first;
        }
        self.read_request().expect("read request")
    }

    fn send(&mut self, response: &Response) {
        self.writer
            .write_all(&encode_line(response).expect("encode"))
            .expect("write");
    }
}

fn event(seq: u64) -> AuditEvent {
    AuditEvent {
        seq,
        ..common::events()[1].clone()
    }
}

/// The next message of the event reader (the credentials poller's are skipped).
fn next(rx: &Receiver<FeedMsg>) -> FeedMsg {
    loop {
        match rx.recv_timeout(WAIT).expect("a message from the reader") {
            FeedMsg::Credentials(_) | FeedMsg::Approvals(_) => continue,
            msg => return msg,
        }
    }
}

#[test]
fn reads_history_then_live_and_reconnects() {
    let dir = run_dir("feed");
    let (feed, rx) = Feed::spawn(&dir).expect("spawn");

    // No brokerd yet: the reader says so and keeps trying.
    match next(&rx) {
        FeedMsg::Disconnected(reason) => assert!(reason.contains("cannot connect"), "{reason}"),
        other => panic!("{other:?}"),
    }

    let listener = UnixListener::bind(socket_path(&dir)).expect("bind");
    let mut peer = Peer::accept(&listener);
    assert_eq!(peer.request(), Request::Status);
    peer.send(&Response::Status(status()));
    assert_eq!(peer.request(), history_request());
    peer.send(&Response::Event { event: event(1) });
    peer.send(&Response::EndOfLog);
    peer.send(&Response::Event { event: event(2) });

    // Reconnect attempts before the listener existed may have queued more Disconnected.
    let mut msg = next(&rx);
    while matches!(msg, FeedMsg::Disconnected(_)) {
        msg = next(&rx);
    }
    match msg {
        FeedMsg::Connected(Some(s)) => assert_eq!(s.pid, 4242),
        other => panic!("{other:?}"),
    }
    assert_eq!(
        next(&rx),
        FeedMsg::Event {
            event: Box::new(event(1)),
            history: true
        }
    );
    assert_eq!(next(&rx), FeedMsg::EndOfLog);
    assert_eq!(
        next(&rx),
        FeedMsg::Event {
            event: Box::new(event(2)),
            history: false
        }
    );

    // brokerd stops: the console hears it, then retries within about a second.
    drop(peer);
    drop(listener);
    fs::remove_file(socket_path(&dir)).expect("remove socket");
    match next(&rx) {
        FeedMsg::Disconnected(reason) => assert!(reason.contains("closed"), "{reason}"),
        other => panic!("{other:?}"),
    }

    // A brokerd without a stored log: the console falls back to live events.
    let listener = UnixListener::bind(socket_path(&dir)).expect("rebind");
    let started = Instant::now();
    let mut peer = Peer::accept(&listener);
    assert!(
        started.elapsed() < Duration::from_secs(3),
        "retried too slowly"
    );
    assert_eq!(peer.request(), Request::Status);
    peer.send(&Response::Status(status()));
    assert_eq!(peer.request(), history_request());
    peer.send(&Response::Error {
        kind: ErrorKind::Internal,
        message: "the audit log is not available in this build".into(),
    });
    assert_eq!(peer.request(), Request::Subscribe);
    peer.send(&Response::Event { event: event(3) });

    let mut msg = next(&rx);
    while matches!(msg, FeedMsg::Disconnected(_)) {
        msg = next(&rx);
    }
    assert!(matches!(msg, FeedMsg::Connected(Some(_))), "{msg:?}");
    match next(&rx) {
        FeedMsg::LiveOnly(reason) => assert!(reason.contains("not available"), "{reason}"),
        other => panic!("{other:?}"),
    }
    assert_eq!(
        next(&rx),
        FeedMsg::Event {
            event: Box::new(event(3)),
            history: false
        }
    );

    // The console quits while connected: dropping the feed stops the thread promptly.
    let quitting = Instant::now();
    drop(rx);
    drop(feed);
    assert!(quitting.elapsed() < Duration::from_secs(3));
    drop(peer);
    let _ = fs::remove_dir_all(&dir);
}

#[test]
fn a_refusal_is_shown_and_retried() {
    let dir = run_dir("refuse");
    let listener = UnixListener::bind(socket_path(&dir)).expect("bind");
    let (feed, rx) = Feed::spawn(&dir).expect("spawn");
    let mut peer = Peer::accept(&listener);
    assert_eq!(peer.request(), Request::Status);
    peer.send(&Response::Error {
        kind: ErrorKind::Forbidden,
        message: "uid 1000 may not control brokerd".into(),
    });
    drop(peer);
    match next(&rx) {
        FeedMsg::Disconnected(reason) => {
            assert!(reason.contains("refused: uid 1000"), "{reason}")
        }
        other => panic!("{other:?}"),
    }
    // And it comes back for another try.
    let peer = Peer::accept(&listener);
    drop(peer);
    drop(rx);
    drop(feed);
    let _ = fs::remove_dir_all(&dir);
}
