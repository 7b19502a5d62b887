//! The one blocking client of brokerd's control socket, shared by brokerctl and the console.
//!
//! Every answer is read as one newline-terminated line of at most [`MAX_ANSWER_LINE`] bytes, so
//! a broken or hostile peer on the socket cannot make a client grow without bound.

use std::{
    io::{self, BufRead as _, BufReader, Read, Write as _},
    os::unix::net::UnixStream,
    path::{Path, PathBuf},
    time::Duration,
};

use crate::{Request, Response, SOCKET_NAME, decode_line, encode_line};

/// Longest answer line a client accepts, in bytes (a page of audit records fits many times).
pub const MAX_ANSWER_LINE: usize = 1 << 20;

/// How long [`Client::call`] waits for an answer.
const CALL_TIMEOUT: Duration = Duration::from_secs(30);

/// Errors talking to brokerd.
#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    #[error("cannot reach brokerd at {path} (is it running? is --run-dir right?)")]
    Connect {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("lost the connection to brokerd")]
    Io(#[from] io::Error),
    #[error("brokerd closed the connection without answering")]
    NoAnswer,
    #[error("brokerd closed the connection mid-line")]
    ClosedMidLine,
    #[error("brokerd sent a line longer than {MAX_ANSWER_LINE} bytes")]
    LineTooLong,
    #[error("unintelligible answer from brokerd")]
    Decode(#[from] serde_json::Error),
    #[error("stopped while waiting for brokerd")]
    Stopped,
    #[error("refusing to talk to {}: {reason}", path.display())]
    NotBrokerd { path: PathBuf, reason: String },
}

/// The control socket inside a run directory.
pub fn socket_path(run_dir: &Path) -> PathBuf {
    run_dir.join(SOCKET_NAME)
}

/// A connection to brokerd's control socket.
pub struct Client {
    lines: LineReader<UnixStream>,
    writer: UnixStream,
}

impl Client {
    /// Connects to `<run_dir>/control.sock`.
    pub fn connect(run_dir: &Path) -> Result<Self, ClientError> {
        let path = socket_path(run_dir);
        let stream = UnixStream::connect(&path).map_err(|source| ClientError::Connect {
            path: path.clone(),
            source,
        })?;
        crate::peer::check_server(&stream)
            .map_err(|reason| ClientError::NotBrokerd { path, reason })?;
        stream.set_read_timeout(Some(CALL_TIMEOUT))?;
        let writer = stream.try_clone()?;
        Ok(Self {
            lines: LineReader::new(stream),
            writer,
        })
    }

    /// Sends one request and waits for its answer.
    pub fn call(&mut self, request: &Request) -> Result<Response, ClientError> {
        self.send(request)?;
        self.read_answer()
    }

    /// Sends one request without waiting for its answer.
    pub fn send(&mut self, request: &Request) -> Result<(), ClientError> {
        self.writer.write_all(&encode_line(request)?)?;
        Ok(())
    }

    /// The next answer on a streaming request (`Logs`, `Subscribe`); waits as long as it takes.
    pub fn next_streamed(&mut self) -> Result<Response, ClientError> {
        self.lines.get_ref().set_read_timeout(None)?;
        self.read_answer()
    }

    /// The next raw answer line, waking every `poll` to ask `keep_waiting` whether to go on
    /// (the console uses this to stop promptly when it quits).
    pub fn next_line_polling(
        &mut self,
        poll: Duration,
        keep_waiting: &dyn Fn() -> bool,
    ) -> Result<Vec<u8>, ClientError> {
        self.lines.get_ref().set_read_timeout(Some(poll))?;
        self.lines.next_line(Some(keep_waiting))
    }

    fn read_answer(&mut self) -> Result<Response, ClientError> {
        let line = self.lines.next_line(None)?;
        Ok(decode_line(&line)?)
    }
}

/// Reads newline-terminated lines of at most [`MAX_ANSWER_LINE`] bytes. A read timeout on the
/// inner reader is a chance to ask whether to keep waiting; a partial line is kept meanwhile.
pub struct LineReader<R> {
    reader: BufReader<R>,
    buf: Vec<u8>,
}

impl<R: Read> LineReader<R> {
    pub fn new(inner: R) -> Self {
        Self {
            reader: BufReader::new(inner),
            buf: Vec::new(),
        }
    }

    pub fn get_ref(&self) -> &R {
        self.reader.get_ref()
    }

    /// The next line, with its newline. On a read timeout, `keep_waiting` (if given) decides
    /// whether to go on reading ([`ClientError::Stopped`] if not); without it a timeout is an
    /// error.
    pub fn next_line(
        &mut self,
        keep_waiting: Option<&dyn Fn() -> bool>,
    ) -> Result<Vec<u8>, ClientError> {
        self.buf.clear();
        loop {
            let room = (MAX_ANSWER_LINE + 1).saturating_sub(self.buf.len()) as u64;
            // On a timeout, read_until keeps what it read in `buf`; the next call goes on.
            match (&mut self.reader)
                .take(room)
                .read_until(b'\n', &mut self.buf)
            {
                Ok(0) if self.buf.is_empty() => return Err(ClientError::NoAnswer),
                Ok(0) => return Err(ClientError::ClosedMidLine),
                Ok(_) if self.buf.ends_with(b"\n") => return Ok(std::mem::take(&mut self.buf)),
                Ok(_) if self.buf.len() > MAX_ANSWER_LINE => return Err(ClientError::LineTooLong),
                Ok(_) => {}
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e)
                    if matches!(
                        e.kind(),
                        io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut
                    ) =>
                {
                    match keep_waiting {
                        Some(keep_waiting) if keep_waiting() => {}
                        Some(_) => return Err(ClientError::Stopped),
                        None => return Err(ClientError::Io(e)),
                    }
                }
                Err(e) => return Err(ClientError::Io(e)),
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn lines_are_split_and_bounded() {
        let mut input = b"one\ntwo\n".to_vec();
        input.extend(std::iter::repeat_n(b'x', MAX_ANSWER_LINE + 10));
        let mut lines = LineReader::new(&input[..]);
        assert_eq!(lines.next_line(None).expect("first"), b"one\n");
        assert_eq!(lines.next_line(None).expect("second"), b"two\n");
        assert!(matches!(
            lines.next_line(None),
            Err(ClientError::LineTooLong)
        ));
    }

    #[test]
    fn a_line_of_exactly_the_bound_is_read() {
        let mut input = vec![b'y'; MAX_ANSWER_LINE - 1];
        input.push(b'\n');
        let mut lines = LineReader::new(&input[..]);
        assert_eq!(lines.next_line(None).expect("line").len(), MAX_ANSWER_LINE);
    }

    #[test]
    fn end_of_stream_is_reported() {
        let mut lines = LineReader::new(&b""[..]);
        assert!(matches!(lines.next_line(None), Err(ClientError::NoAnswer)));
        let mut lines = LineReader::new(&b"partial"[..]);
        assert!(matches!(
            lines.next_line(None),
            Err(ClientError::ClosedMidLine)
        ));
    }
}
