//! The event reader: one std thread that talks to brokerd's control socket and hands what it
//! hears to the UI through a bounded channel.
//!
//! Per connection it asks for `status`, then for the recent log followed by live events
//! (`logs` with `follow`), falling back to `subscribe` when brokerd has no stored log. When the
//! connection is lost or refused it says so and tries again every [`RETRY_EVERY`]. Everything it
//! parses goes through [`StreamDecoder`], which tests drive with the same JSON lines.

use std::{
    io,
    path::{Path, PathBuf},
    sync::{
        Arc,
        atomic::{AtomicBool, Ordering},
        mpsc::{self, Receiver, SyncSender, TrySendError},
    },
    thread::{self, JoinHandle},
    time::Duration,
};

use agent_broker_protocol::{
    self as protocol, AuditEvent, LogFilter, Request, Response, StatusReport,
    client::{Client, ClientError},
};

/// Stored records asked for on each connect, so a fresh console shows recent calls.
pub const HISTORY_ON_CONNECT: usize = 200;

/// Pause between connection attempts.
pub const RETRY_EVERY: Duration = Duration::from_secs(1);

/// Messages in flight between the reader and the UI; when full, the reader waits, so a burst
/// is held back by the socket rather than by memory.
const CHANNEL_DEPTH: usize = 4096;

/// How often a blocked read or send looks at the stop flag.
const POLL: Duration = Duration::from_millis(100);

/// What the reader tells the UI.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum FeedMsg {
    /// Connected; brokerd's status when it answered the status request.
    Connected(Option<Box<StatusReport>>),
    /// One audit event; `history` when it is a stored record sent before the live ones.
    Event {
        event: Box<AuditEvent>,
        history: bool,
    },
    /// The stored records are all sent; what follows is live.
    EndOfLog,
    /// brokerd refused the log request (the reason); only live events will come.
    LiveOnly(String),
    /// The connection is gone or was refused (the reason); the reader retries.
    Disconnected(String),
    /// A line that was not a response the console understands (why); it was skipped.
    BadLine(String),
    /// The credentials brokerd fetches (every kind but static), with their states, as `secret
    /// list` shows them; polled every [`CREDENTIALS_EVERY`].
    Credentials(Vec<protocol::SecretInfo>),
    /// The requests waiting for an operator's approval, polled every [`APPROVALS_EVERY`].
    Approvals(Vec<protocol::PendingApproval>),
    /// What brokerd answered to a decision made in the console.
    Decided(String),
}

/// How often the console asks for the requests waiting for approval.
pub const APPROVALS_EVERY: Duration = Duration::from_millis(500);

/// How often the console asks for the credentials' states.
pub const CREDENTIALS_EVERY: Duration = Duration::from_secs(2);

/// The request a console sends first after `status`: the recent history, then live events.
pub fn history_request() -> Request {
    Request::Logs {
        filter: LogFilter {
            limit: HISTORY_ON_CONNECT,
            ..LogFilter::default()
        },
        follow: true,
    }
}

/// The result of decoding one line of an event stream.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Decoded {
    /// Something for the UI.
    Msg(FeedMsg),
    /// brokerd answered with an error (its message).
    Refused(String),
}

/// Decodes the lines brokerd sends after a `logs` or `subscribe` request.
#[derive(Clone, Debug)]
pub struct StreamDecoder {
    in_history: bool,
}

impl StreamDecoder {
    /// For the answer to [`history_request`]: stored records, `end_of_log`, then live events.
    pub fn for_logs() -> Self {
        Self { in_history: true }
    }

    /// For the answer to `subscribe`: live events only.
    pub fn for_subscribe() -> Self {
        Self { in_history: false }
    }

    /// Decodes one line (with or without its newline). Never panics on bad input.
    pub fn decode(&mut self, line: &[u8]) -> Decoded {
        match protocol::decode_line::<Response>(line) {
            Ok(Response::Event { event }) => Decoded::Msg(FeedMsg::Event {
                event: Box::new(event),
                history: self.in_history,
            }),
            Ok(Response::EndOfLog) => {
                self.in_history = false;
                Decoded::Msg(FeedMsg::EndOfLog)
            }
            Ok(Response::Error { kind, message }) => {
                Decoded::Refused(format!("{message} ({})", wire_name(&kind, None)))
            }
            Ok(other) => Decoded::Msg(FeedMsg::BadLine(format!(
                "unexpected {} response",
                wire_name(&other, Some("response"))
            ))),
            Err(e) => Decoded::Msg(FeedMsg::BadLine(format!("not a protocol line: {e}"))),
        }
    }
}

/// How `value` is spelled on the wire (`not_found`, `policy_reloaded`): the string itself, or
/// the string under `tag` of an internally tagged enum.
fn wire_name<T: serde::Serialize>(value: &T, tag: Option<&str>) -> String {
    let json = serde_json::to_value(value).ok();
    let name = match tag {
        Some(tag) => json.as_ref().and_then(|v| v.get(tag)),
        None => json.as_ref(),
    };
    name.and_then(|v| v.as_str())
        .unwrap_or("unknown")
        .to_string()
}

/// The socket the console connects to.
pub fn socket_path(run_dir: &Path) -> PathBuf {
    protocol::client::socket_path(run_dir)
}

/// The running reader thread. Dropping it stops the thread and waits for it (at most about
/// [`POLL`] plus one connect attempt).
#[derive(Debug)]
pub struct Feed {
    stop: Arc<AtomicBool>,
    thread: Option<JoinHandle<()>>,
    credentials: Option<JoinHandle<()>>,
    approvals: Option<JoinHandle<()>>,
    decider: Option<JoinHandle<()>>,
    decide: mpsc::Sender<(u64, protocol::ApprovalDecision)>,
}

impl Feed {
    /// Starts reading from `<run_dir>/control.sock`; the UI reads the returned channel.
    pub fn spawn(run_dir: &Path) -> io::Result<(Self, Receiver<FeedMsg>)> {
        let (tx, rx) = mpsc::sync_channel(CHANNEL_DEPTH);
        let stop = Arc::new(AtomicBool::new(false));
        let run_dir = run_dir.to_path_buf();
        let credentials = thread::Builder::new()
            .name("console-credentials".into())
            .spawn({
                let (stop, tx, run_dir) = (stop.clone(), tx.clone(), run_dir.clone());
                move || poll_credentials(&run_dir, &tx, &stop)
            })?;
        let approvals = thread::Builder::new()
            .name("console-approvals".into())
            .spawn({
                let (stop, tx, run_dir) = (stop.clone(), tx.clone(), run_dir.clone());
                move || poll_approvals(&run_dir, &tx, &stop)
            })?;
        let (decide_tx, decide_rx) = mpsc::channel();
        let decider = thread::Builder::new()
            .name("console-decide".into())
            .spawn({
                let (stop, tx, run_dir) = (stop.clone(), tx.clone(), run_dir.clone());
                move || send_decisions(&run_dir, &decide_rx, &tx, &stop)
            })?;
        let thread = thread::Builder::new().name("console-feed".into()).spawn({
            let stop = stop.clone();
            move || read_forever(&run_dir, &tx, &stop)
        })?;
        Ok((
            Self {
                stop,
                thread: Some(thread),
                credentials: Some(credentials),
                approvals: Some(approvals),
                decider: Some(decider),
                decide: decide_tx,
            },
            rx,
        ))
    }

    /// Sends a decision about a waiting request to brokerd (on a thread of its own); what
    /// brokerd answers comes back as [`FeedMsg::Decided`].
    pub fn decide(&self, id: u64, decision: protocol::ApprovalDecision) {
        let _ = self.decide.send((id, decision));
    }
}

impl Drop for Feed {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        for thread in [
            self.thread.take(),
            self.credentials.take(),
            self.approvals.take(),
            self.decider.take(),
        ]
        .into_iter()
        .flatten()
        {
            let _ = thread.join();
        }
    }
}

/// Why a session ended.
#[derive(Debug)]
enum Ended {
    /// The console is quitting.
    Stopped,
    /// Lost or refused, with the reason for the status line.
    Lost(String),
}

/// Asks for the secrets' list every [`CREDENTIALS_EVERY`] on a connection of its own, and
/// hands the credentials that are not static to the UI; a failed ask is tried again later (the
/// event reader reports the connection's state).
fn poll_credentials(run_dir: &Path, tx: &SyncSender<FeedMsg>, stop: &AtomicBool) {
    loop {
        let listed = Client::connect(run_dir)
            .and_then(|mut c| ask(&mut c, &Request::SecretList, stop))
            .ok();
        if let Some(Response::Secrets { secrets }) = listed {
            let credentials = secrets.into_iter().filter(|s| s.kind != "static").collect();
            if send(tx, stop, FeedMsg::Credentials(credentials)).is_err() {
                return;
            }
        }
        let mut waited = Duration::ZERO;
        while waited < CREDENTIALS_EVERY {
            if stop.load(Ordering::Relaxed) {
                return;
            }
            thread::sleep(POLL);
            waited += POLL;
        }
    }
}

/// Sends `request` and reads its answer, giving up as soon as the console stops (a brokerd
/// that accepted the connection but does not answer must not keep the console from quitting).
fn ask(client: &mut Client, request: &Request, stop: &AtomicBool) -> Result<Response, ClientError> {
    let keep_waiting = || !stop.load(Ordering::Relaxed);
    client.send(request)?;
    let line = client.next_line_polling(POLL, &keep_waiting)?;
    protocol::decode_line::<Response>(&line).map_err(|_| ClientError::NoAnswer)
}

/// Asks for the requests waiting for approval every [`APPROVALS_EVERY`] on a connection of
/// its own, as [`poll_credentials`] does.
fn poll_approvals(run_dir: &Path, tx: &SyncSender<FeedMsg>, stop: &AtomicBool) {
    let mut client: Option<Client> = None;
    loop {
        if client.is_none() {
            client = Client::connect(run_dir).ok();
        }
        let answer = client
            .as_mut()
            .map(|c| ask(c, &Request::ApprovalList, stop));
        match answer {
            Some(Ok(Response::Approvals { pending })) => {
                if send(tx, stop, FeedMsg::Approvals(pending)).is_err() {
                    return;
                }
            }
            // Asked again on a new connection next time.
            _ => client = None,
        }
        let mut waited = Duration::ZERO;
        while waited < APPROVALS_EVERY {
            if stop.load(Ordering::Relaxed) {
                return;
            }
            thread::sleep(POLL);
            waited += POLL;
        }
    }
}

/// Sends the console's decisions, one control call each, and reports brokerd's answers.
fn send_decisions(
    run_dir: &Path,
    decisions: &Receiver<(u64, protocol::ApprovalDecision)>,
    tx: &SyncSender<FeedMsg>,
    stop: &AtomicBool,
) {
    while !stop.load(Ordering::Relaxed) {
        let Ok((id, decision)) = decisions.recv_timeout(POLL) else {
            continue;
        };
        let request = Request::ApprovalDecide {
            id,
            decision,
            via: Some("console".into()),
        };
        let answer = Client::connect(run_dir).and_then(|mut c| ask(&mut c, &request, stop));
        let note = match answer {
            Ok(Response::ApprovalDecided { id, outcome }) => format!("#{id}: {outcome}"),
            Ok(Response::Error { message, .. }) => format!("#{id}: refused: {message}"),
            Ok(other) => format!(
                "#{id}: unexpected {} response",
                wire_name(&other, Some("response"))
            ),
            Err(e) => format!("#{id}: not sent: {e}"),
        };
        if send(tx, stop, FeedMsg::Decided(note)).is_err() {
            return;
        }
    }
}

fn read_forever(run_dir: &Path, tx: &SyncSender<FeedMsg>, stop: &AtomicBool) {
    loop {
        let reason = match session(run_dir, tx, stop) {
            Err(Ended::Stopped) => return,
            Err(Ended::Lost(reason)) => reason,
        };
        if send(tx, stop, FeedMsg::Disconnected(reason)).is_err() {
            return;
        }
        let mut waited = Duration::ZERO;
        while waited < RETRY_EVERY {
            if stop.load(Ordering::Relaxed) {
                return;
            }
            thread::sleep(POLL);
            waited += POLL;
        }
    }
}

/// One connection, from connect to loss. Only returns by ending.
fn session(
    run_dir: &Path,
    tx: &SyncSender<FeedMsg>,
    stop: &AtomicBool,
) -> Result<std::convert::Infallible, Ended> {
    let lost = |e: ClientError| match e {
        ClientError::Stopped => Ended::Stopped,
        ClientError::NoAnswer => Ended::Lost("brokerd closed the connection".into()),
        ClientError::Connect { path, source } => {
            Ended::Lost(format!("cannot connect to {}: {source}", path.display()))
        }
        e => Ended::Lost(e.to_string()),
    };
    let keep_waiting = || !stop.load(Ordering::Relaxed);
    let mut client = Client::connect(run_dir).map_err(lost)?;
    let next_line = |client: &mut Client| client.next_line_polling(POLL, &keep_waiting);

    client.send(&Request::Status).map_err(lost)?;
    let status = match protocol::decode_line::<Response>(&next_line(&mut client).map_err(lost)?) {
        Ok(Response::Status(status)) => Some(Box::new(status)),
        Ok(Response::Error { message, .. }) => {
            return Err(Ended::Lost(format!("brokerd refused: {message}")));
        }
        // Not fatal: the console shows events without the header.
        Ok(_) | Err(_) => None,
    };
    send(tx, stop, FeedMsg::Connected(status))?;

    client.send(&history_request()).map_err(lost)?;
    let mut decoder = StreamDecoder::for_logs();
    match decoder.decode(&next_line(&mut client).map_err(lost)?) {
        Decoded::Msg(msg) => send(tx, stop, msg)?,
        Decoded::Refused(reason) => {
            client.send(&Request::Subscribe).map_err(lost)?;
            decoder = StreamDecoder::for_subscribe();
            send(tx, stop, FeedMsg::LiveOnly(reason))?;
        }
    }
    loop {
        match decoder.decode(&next_line(&mut client).map_err(lost)?) {
            Decoded::Msg(msg) => send(tx, stop, msg)?,
            Decoded::Refused(reason) => return Err(Ended::Lost(format!("brokerd: {reason}"))),
        }
    }
}

/// Sends to the UI without blocking forever: a full channel is retried until the console stops.
fn send(tx: &SyncSender<FeedMsg>, stop: &AtomicBool, msg: FeedMsg) -> Result<(), Ended> {
    let mut msg = msg;
    loop {
        match tx.try_send(msg) {
            Ok(()) => return Ok(()),
            Err(TrySendError::Disconnected(_)) => return Err(Ended::Stopped),
            Err(TrySendError::Full(back)) => {
                if stop.load(Ordering::Relaxed) {
                    return Err(Ended::Stopped);
                }
                msg = back;
                thread::sleep(Duration::from_millis(5));
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn error_kind_is_shown_as_the_protocol_spells_it() {
        let mut decoder = StreamDecoder::for_logs();
        let refused = decoder.decode(
            br#"{"response":"error","kind":"not_found","message":"the audit log is not available"}"#,
        );
        assert_eq!(
            refused,
            Decoded::Refused("the audit log is not available (not_found)".into())
        );
    }

    #[test]
    fn unexpected_response_names_itself() {
        let mut decoder = StreamDecoder::for_logs();
        let got = decoder.decode(br#"{"response":"policy_reloaded","files":2}"#);
        assert_eq!(
            got,
            Decoded::Msg(FeedMsg::BadLine(
                "unexpected policy_reloaded response".into()
            ))
        );
    }
}
