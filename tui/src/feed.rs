//! The event reader: one std thread that talks to brokerd's control socket and hands what it
//! hears to the UI through a bounded channel.
//!
//! Per connection it asks for `status`, then for the recent log followed by live events
//! (`logs` with `follow`), falling back to `subscribe` when brokerd has no stored log. When the
//! connection is lost or refused it says so and tries again every [`RETRY_EVERY`]. Everything it
//! parses goes through [`StreamDecoder`], which tests drive with the same JSON lines.

use std::{
    io::{self, BufRead as _, BufReader, Read, Write as _},
    os::unix::net::UnixStream,
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
    self as protocol, AuditEvent, LogFilter, Request, Response, SOCKET_NAME, StatusReport,
};

/// Stored records asked for on each connect, so a fresh console shows recent calls.
pub const HISTORY_ON_CONNECT: usize = 200;

/// Pause between connection attempts.
pub const RETRY_EVERY: Duration = Duration::from_secs(1);

/// Longest line accepted from brokerd; a longer one ends the connection (and it is retried).
pub const MAX_LINE: usize = 1 << 20;

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
}

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
    run_dir.join(SOCKET_NAME)
}

/// The running reader thread. Dropping it stops the thread and waits for it (at most about
/// [`POLL`] plus one connect attempt).
#[derive(Debug)]
pub struct Feed {
    stop: Arc<AtomicBool>,
    thread: Option<JoinHandle<()>>,
}

impl Feed {
    /// Starts reading from `<run_dir>/control.sock`; the UI reads the returned channel.
    pub fn spawn(run_dir: &Path) -> io::Result<(Self, Receiver<FeedMsg>)> {
        let (tx, rx) = mpsc::sync_channel(CHANNEL_DEPTH);
        let stop = Arc::new(AtomicBool::new(false));
        let path = socket_path(run_dir);
        let thread = thread::Builder::new().name("console-feed".into()).spawn({
            let stop = stop.clone();
            move || read_forever(&path, &tx, &stop)
        })?;
        Ok((
            Self {
                stop,
                thread: Some(thread),
            },
            rx,
        ))
    }
}

impl Drop for Feed {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(thread) = self.thread.take() {
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

fn read_forever(path: &Path, tx: &SyncSender<FeedMsg>, stop: &AtomicBool) {
    loop {
        let reason = match session(path, tx, stop) {
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
    path: &Path,
    tx: &SyncSender<FeedMsg>,
    stop: &AtomicBool,
) -> Result<std::convert::Infallible, Ended> {
    let stream = UnixStream::connect(path)
        .map_err(|e| Ended::Lost(format!("cannot connect to {}: {e}", path.display())))?;
    stream
        .set_read_timeout(Some(POLL))
        .map_err(|e| Ended::Lost(format!("cannot set a read timeout: {e}")))?;
    let mut writer = stream
        .try_clone()
        .map_err(|e| Ended::Lost(format!("cannot clone the socket: {e}")))?;
    let mut lines = LineReader::new(stream, stop);

    write_request(&mut writer, &Request::Status)?;
    let status = match protocol::decode_line::<Response>(&lines.next_line()?) {
        Ok(Response::Status(status)) => Some(Box::new(status)),
        Ok(Response::Error { message, .. }) => {
            return Err(Ended::Lost(format!("brokerd refused: {message}")));
        }
        // Not fatal: the console shows events without the header.
        Ok(_) | Err(_) => None,
    };
    send(tx, stop, FeedMsg::Connected(status))?;

    write_request(&mut writer, &history_request())?;
    let mut decoder = StreamDecoder::for_logs();
    match decoder.decode(&lines.next_line()?) {
        Decoded::Msg(msg) => send(tx, stop, msg)?,
        Decoded::Refused(reason) => {
            write_request(&mut writer, &Request::Subscribe)?;
            decoder = StreamDecoder::for_subscribe();
            send(tx, stop, FeedMsg::LiveOnly(reason))?;
        }
    }
    loop {
        match decoder.decode(&lines.next_line()?) {
            Decoded::Msg(msg) => send(tx, stop, msg)?,
            Decoded::Refused(reason) => return Err(Ended::Lost(format!("brokerd: {reason}"))),
        }
    }
}

fn write_request(writer: &mut UnixStream, request: &Request) -> Result<(), Ended> {
    let line = protocol::encode_line(request)
        .map_err(|e| Ended::Lost(format!("cannot encode a request: {e}")))?;
    writer
        .write_all(&line)
        .map_err(|e| Ended::Lost(format!("cannot write to brokerd: {e}")))
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

/// Reads newline-terminated lines, bounded by [`MAX_LINE`], waking up to check the stop flag.
struct LineReader<'a, R> {
    reader: BufReader<R>,
    buf: Vec<u8>,
    stop: &'a AtomicBool,
}

impl<'a, R: Read> LineReader<'a, R> {
    fn new(inner: R, stop: &'a AtomicBool) -> Self {
        Self {
            reader: BufReader::new(inner),
            buf: Vec::new(),
            stop,
        }
    }

    fn next_line(&mut self) -> Result<Vec<u8>, Ended> {
        self.buf.clear();
        loop {
            if self.stop.load(Ordering::Relaxed) {
                return Err(Ended::Stopped);
            }
            let room = (MAX_LINE + 1).saturating_sub(self.buf.len()) as u64;
            // On a timeout, read_until keeps what it read in `buf`; the next call goes on.
            match (&mut self.reader)
                .take(room)
                .read_until(b'\n', &mut self.buf)
            {
                Ok(0) if self.buf.is_empty() => {
                    return Err(Ended::Lost("brokerd closed the connection".into()));
                }
                Ok(0) => return Err(Ended::Lost("brokerd closed the connection mid-line".into())),
                Ok(_) if self.buf.ends_with(b"\n") => return Ok(std::mem::take(&mut self.buf)),
                Ok(_) if self.buf.len() > MAX_LINE => {
                    return Err(Ended::Lost(format!(
                        "brokerd sent a line longer than {MAX_LINE} bytes"
                    )));
                }
                Ok(_) => {}
                Err(e)
                    if matches!(
                        e.kind(),
                        io::ErrorKind::WouldBlock
                            | io::ErrorKind::TimedOut
                            | io::ErrorKind::Interrupted
                    ) => {}
                Err(e) => return Err(Ended::Lost(format!("cannot read from brokerd: {e}"))),
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn line_reader_splits_and_bounds_lines() {
        let stop = AtomicBool::new(false);
        let mut data = b"one\ntwo\n".to_vec();
        data.extend(std::iter::repeat_n(b'x', MAX_LINE + 10));
        data.push(b'\n');
        let mut lines = LineReader::new(io::Cursor::new(data), &stop);
        assert_eq!(lines.next_line().ok(), Some(b"one\n".to_vec()));
        assert_eq!(lines.next_line().ok(), Some(b"two\n".to_vec()));
        assert!(matches!(lines.next_line(), Err(Ended::Lost(r)) if r.contains("longer")));
    }

    #[test]
    fn line_reader_reports_eof() {
        let stop = AtomicBool::new(false);
        let mut lines = LineReader::new(io::Cursor::new(b"half".to_vec()), &stop);
        assert!(matches!(lines.next_line(), Err(Ended::Lost(r)) if r.contains("mid-line")));
        let mut lines = LineReader::new(io::Cursor::new(Vec::new()), &stop);
        assert!(matches!(lines.next_line(), Err(Ended::Lost(r)) if r.contains("closed")));
    }

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
