//! Re-signing an `aws-chunked` body (`STREAMING-AWS4-HMAC-SHA256-PAYLOAD`) as it streams.
//!
//! The body is a series of chunks, `<hex size>;chunk-signature=<signature>\r\n<data>\r\n`,
//! ending with a zero-size chunk (`0;chunk-signature=<signature>\r\n\r\n`). Each signature
//! covers the chunk's data and the previous signature, starting from the request's own
//! signature (the seed). The agent's chunks are signed in the placeholder's chain; the ones sent
//! upstream must be signed in the real credentials' chain.
//!
//! A chunk's signature sits in its header, before its data, but signs that data: the agent's
//! can be checked only once the data has arrived, and the real one can be computed only then,
//! yet must be written before the data. So [`ChunkResigner`] holds back one chunk at a time:
//! it hashes the data as it arrives, and when the chunk is complete it verifies the agent's
//! signature and emits the header with the new signature, the data, and the CRLF. The memory
//! this needs is bounded by the largest chunk allowed (`max_chunk`, [`DEFAULT_MAX_CHUNK`] by
//! default; the SDKs send 64 KiB to 8 MiB chunks) plus a chunk header
//! ([`MAX_CHUNK_HEADER`]). Nothing is emitted for a chunk whose signature does not verify.
//!
//! The output has the same length as the input (the size is copied as the agent wrote it, and
//! every signature is 64 hex digits), so `Content-Length` and
//! `X-Amz-Decoded-Content-Length` stay valid.
//!
//! Trailing headers (`STREAMING-AWS4-HMAC-SHA256-PAYLOAD-TRAILER`) are refused: their
//! signature is not re-signed yet. `STREAMING-UNSIGNED-PAYLOAD-TRAILER` bodies carry no
//! signatures and pass through unchanged, so they need no re-signer.

use sha2::{Digest as _, Sha256};

use super::{ChunkChain, PayloadHash, crypto};

/// The largest chunk accepted unless the caller says otherwise: 16 MiB, twice the largest
/// chunk the AWS SDKs send.
pub const DEFAULT_MAX_CHUNK: usize = 16 << 20;

/// The longest chunk header line accepted, CRLF included: a size and a signature take about
/// 100 bytes.
pub const MAX_CHUNK_HEADER: usize = 4096;

const SIGNATURE_EXTENSION: &[u8] = b";chunk-signature=";

/// Why an `aws-chunked` body could not be re-signed. Chunks are counted from 0.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ChunkError {
    #[error(
        "trailing headers (STREAMING-AWS4-HMAC-SHA256-PAYLOAD-TRAILER) are not supported; only STREAMING-AWS4-HMAC-SHA256-PAYLOAD bodies are re-signed"
    )]
    TrailersUnsupported,
    #[error("a {mode} body has no chunk signatures to re-sign")]
    NotSignedChunks { mode: &'static str },
    #[error("the header of chunk {chunk} is longer than {MAX_CHUNK_HEADER} bytes")]
    HeaderTooLong { chunk: u64 },
    #[error("malformed header of chunk {chunk}: {reason}")]
    Header { chunk: u64, reason: &'static str },
    #[error("chunk {chunk} is {size} bytes, more than the {max} bytes allowed")]
    TooLarge { chunk: u64, size: u64, max: usize },
    #[error("chunk {chunk}'s data is not followed by CRLF")]
    MissingCrlf { chunk: u64 },
    #[error(
        "chunk {chunk}'s signature does not match its data (signed with another secret, or changed after signing)"
    )]
    Signature { chunk: u64 },
    #[error("bytes after the final (zero-size) chunk")]
    AfterFinal,
    #[error("the body ended {at}")]
    Truncated { at: &'static str },
    #[error("the body was refused earlier; nothing more is read")]
    Failed,
}

/// Where the parser is.
#[derive(Debug)]
enum State {
    /// Reading a chunk header line, up to its CRLF.
    Header,
    /// Reading a chunk's data; this many bytes still to come.
    Data { remaining: u64 },
    /// After a chunk's data: this many bytes of its CRLF seen.
    Crlf { seen: u8 },
    /// The zero-size chunk is done.
    Done,
    /// An error was returned; the stream is abandoned.
    Failed,
}

/// Verifies each chunk of an agent's `aws-chunked` body against the placeholder's chain and
/// emits it signed in the real chain. Feed it the body in slices of any size with
/// [`ChunkResigner::feed`]; call [`ChunkResigner::finish`] at the end of the body.
#[derive(Debug)]
pub struct ChunkResigner {
    agent: ChunkChain,
    real: ChunkChain,
    max_chunk: usize,
    state: State,
    /// The header line being read, then the current chunk's size as the agent wrote it.
    header: Vec<u8>,
    size_text_len: usize,
    agent_signature: [u8; 64],
    /// The current chunk's data, held until it is complete (at most `max_chunk` bytes).
    data: Vec<u8>,
    hasher: Sha256,
    chunk: u64,
    final_chunk: bool,
}

impl ChunkResigner {
    /// A re-signer for a body whose `X-Amz-Content-Sha256` is `mode`: `agent` is the chain
    /// [`verify`](super::verify) returned, `real` the one [`sign`](super::sign) returned.
    /// Refuses modes it cannot re-sign, and bodies without chunk signatures.
    pub fn new(
        mode: &PayloadHash,
        agent: ChunkChain,
        real: ChunkChain,
        max_chunk: usize,
    ) -> Result<Self, ChunkError> {
        match mode {
            PayloadHash::StreamingSigned => {}
            PayloadHash::StreamingSignedTrailer => return Err(ChunkError::TrailersUnsupported),
            other => {
                let mode = match other {
                    PayloadHash::StreamingUnsignedTrailer => "STREAMING-UNSIGNED-PAYLOAD-TRAILER",
                    PayloadHash::Unsigned => "UNSIGNED-PAYLOAD",
                    _ => "hashed-payload",
                };
                return Err(ChunkError::NotSignedChunks { mode });
            }
        }
        Ok(Self {
            agent,
            real,
            max_chunk,
            state: State::Header,
            header: Vec::with_capacity(128),
            size_text_len: 0,
            agent_signature: [0; 64],
            data: Vec::new(),
            hasher: Sha256::new(),
            chunk: 0,
            final_chunk: false,
        })
    }

    /// Reads `input`, the next bytes of the agent's body, and appends to `out` every chunk it
    /// completes, re-signed. After an error, every call fails.
    pub fn feed(&mut self, mut input: &[u8], out: &mut Vec<u8>) -> Result<(), ChunkError> {
        let result = (|| {
            while !input.is_empty() {
                input = self.step(input, out)?;
            }
            Ok(())
        })();
        if result.is_err() {
            self.state = State::Failed;
        }
        result
    }

    /// Checks that the body ended after its final chunk.
    pub fn finish(&self) -> Result<(), ChunkError> {
        match self.state {
            State::Done => Ok(()),
            State::Failed => Err(ChunkError::Failed),
            State::Header if self.header.is_empty() => Err(ChunkError::Truncated {
                at: "before the final zero-size chunk",
            }),
            State::Header => Err(ChunkError::Truncated {
                at: "inside a chunk header",
            }),
            State::Data { .. } => Err(ChunkError::Truncated {
                at: "inside a chunk's data",
            }),
            State::Crlf { .. } => Err(ChunkError::Truncated {
                at: "before a chunk's closing CRLF",
            }),
        }
    }

    /// Consumes some of `input`; returns the rest.
    fn step<'i>(&mut self, input: &'i [u8], out: &mut Vec<u8>) -> Result<&'i [u8], ChunkError> {
        let chunk = self.chunk;
        match self.state {
            State::Failed => Err(ChunkError::Failed),
            State::Done => Err(ChunkError::AfterFinal),
            State::Header => {
                let (line_end, rest) = match memchr::memchr(b'\n', input) {
                    Some(at) => (true, at + 1),
                    None => (false, input.len()),
                };
                if self.header.len() + rest > MAX_CHUNK_HEADER {
                    return Err(ChunkError::HeaderTooLong { chunk });
                }
                self.header.extend_from_slice(&input[..rest]);
                if line_end {
                    self.parse_header()?;
                }
                Ok(&input[rest..])
            }
            State::Data { remaining } => {
                let take = usize::try_from(remaining).map_or(input.len(), |r| r.min(input.len()));
                let (data, rest) = input.split_at(take);
                self.hasher.update(data);
                self.data.extend_from_slice(data);
                let remaining = remaining - take as u64;
                self.state = if remaining == 0 {
                    State::Crlf { seen: 0 }
                } else {
                    State::Data { remaining }
                };
                Ok(rest)
            }
            State::Crlf { seen } => {
                let expected = if seen == 0 { b'\r' } else { b'\n' };
                if input[0] != expected {
                    return Err(ChunkError::MissingCrlf { chunk });
                }
                if seen == 0 {
                    self.state = State::Crlf { seen: 1 };
                } else {
                    self.complete_chunk(out)?;
                }
                Ok(&input[1..])
            }
        }
    }

    /// Parses the header line in `self.header` (`<hex size>;chunk-signature=<64 hex>\r\n`).
    fn parse_header(&mut self) -> Result<(), ChunkError> {
        let chunk = self.chunk;
        let bad = |reason| ChunkError::Header { chunk, reason };
        let line = self
            .header
            .strip_suffix(b"\r\n")
            .ok_or_else(|| bad("the line does not end in CRLF"))?;
        let at =
            memchr::memchr(b';', line).ok_or_else(|| bad("no ;chunk-signature= after the size"))?;
        let (size_text, extension) = line.split_at(at);
        if size_text.is_empty() || size_text.len() > 16 {
            return Err(bad("the size is not 1 to 16 hex digits"));
        }
        let mut size: u64 = 0;
        for &b in size_text {
            let digit = (b as char)
                .to_digit(16)
                .ok_or_else(|| bad("the size is not hex"))?;
            size = size << 4 | u64::from(digit);
        }
        let signature = extension
            .strip_prefix(SIGNATURE_EXTENSION)
            .ok_or_else(|| bad("the extension is not chunk-signature="))?;
        let signature: [u8; 64] = signature
            .try_into()
            .ok()
            .filter(|s: &[u8; 64]| s.iter().all(|b| matches!(b, b'0'..=b'9' | b'a'..=b'f')))
            .ok_or_else(|| bad("the chunk signature is not 64 lowercase hex digits"))?;
        if size > self.max_chunk as u64 {
            return Err(ChunkError::TooLarge {
                chunk,
                size,
                max: self.max_chunk,
            });
        }
        self.size_text_len = size_text.len();
        self.agent_signature = signature;
        self.final_chunk = size == 0;
        self.data.clear();
        self.state = if size == 0 {
            State::Crlf { seen: 0 }
        } else {
            State::Data { remaining: size }
        };
        Ok(())
    }

    /// The chunk's data and CRLF are in: verify the agent's signature, emit the chunk signed in
    /// the real chain.
    fn complete_chunk(&mut self, out: &mut Vec<u8>) -> Result<(), ChunkError> {
        let hash: [u8; 32] = std::mem::take(&mut self.hasher).finalize().into();
        let expected = self.agent.next_signature(&hash);
        if !crypto::constant_time_eq(expected.as_bytes(), &self.agent_signature) {
            return Err(ChunkError::Signature { chunk: self.chunk });
        }
        let signature = self.real.next_signature(&hash);
        out.reserve(self.size_text_len + SIGNATURE_EXTENSION.len() + 68 + self.data.len());
        out.extend_from_slice(&self.header[..self.size_text_len]);
        out.extend_from_slice(SIGNATURE_EXTENSION);
        out.extend_from_slice(signature.as_bytes());
        out.extend_from_slice(b"\r\n");
        out.extend_from_slice(&self.data);
        out.extend_from_slice(b"\r\n");
        self.header.clear();
        self.data.clear();
        self.chunk += 1;
        self.state = if self.final_chunk {
            State::Done
        } else {
            State::Header
        };
        Ok(())
    }
}
