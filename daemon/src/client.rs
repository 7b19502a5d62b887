//! A blocking client of brokerd's control socket, for brokerctl.

use std::{
    io::{self, BufRead as _, BufReader, Write as _},
    os::unix::net::UnixStream,
    path::{Path, PathBuf},
    time::Duration,
};

use agent_broker_protocol::{self as protocol, Request, Response};

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
    #[error("unintelligible answer from brokerd: {0}")]
    Decode(#[from] serde_json::Error),
}

/// A connection to brokerd's control socket.
pub struct Client {
    reader: BufReader<UnixStream>,
    writer: UnixStream,
}

impl Client {
    /// Connects to `<run_dir>/control.sock`.
    pub fn connect(run_dir: &Path) -> Result<Self, ClientError> {
        let path = run_dir.join(protocol::SOCKET_NAME);
        let stream =
            UnixStream::connect(&path).map_err(|source| ClientError::Connect { path, source })?;
        stream.set_read_timeout(Some(Duration::from_secs(30)))?;
        let writer = stream.try_clone()?;
        Ok(Self {
            reader: BufReader::new(stream),
            writer,
        })
    }

    /// Sends one request and waits for its answer.
    pub fn call(&mut self, request: &Request) -> Result<Response, ClientError> {
        self.writer.write_all(&protocol::encode_line(request)?)?;
        self.read_answer()
    }

    /// The next answer on a streaming request (`Logs`, `Subscribe`); waits as long as it takes.
    pub fn next_streamed(&mut self) -> Result<Response, ClientError> {
        self.reader.get_ref().set_read_timeout(None)?;
        self.read_answer()
    }

    fn read_answer(&mut self) -> Result<Response, ClientError> {
        let mut line = Vec::new();
        if self.reader.read_until(b'\n', &mut line)? == 0 {
            return Err(ClientError::NoAnswer);
        }
        Ok(protocol::decode_line(&line)?)
    }
}
