//! An upgraded (WebSocket) connection, once both sides switched protocols.
//!
//! The agent's bytes go upstream as they are. When the agent's policy has secrets, the
//! upstream's bytes are parsed as WebSocket frames ([`FrameScrubber`]) and each data message's
//! payload is scrubbed as one stream, fragments and TCP segments notwithstanding, then re-framed
//! (a payload's length changes when a value is replaced; RFC 6455 5.4 lets an intermediary
//! refragment a message that uses no extension): a secret split across frames or fragments
//! never reaches the agent. Control frames (close, ping, pong) are scrubbed whole. A frame with
//! a reserved bit set (an extension such as `permessage-deflate`, which brokerd never offers on
//! such a connection and refuses in the upstream's 101) or that breaks the framing rules ends
//! the connection. Masked frames (servers must not mask) are unmasked first.
//!
//! Bytes are counted both ways and charged to the rule's budgets as they pass ([`Meter`]): the
//! chunk that would use a budget up is not forwarded, and the connection is cut.

use std::{
    io::Cursor,
    sync::{
        Arc,
        atomic::{AtomicU64, Ordering},
    },
};

use agent_broker_protocol::Side;
use hyper_util::rt::TokioIo;
use tokio::io::{AsyncRead, AsyncReadExt as _, AsyncWrite, AsyncWriteExt as _};
use tungstenite::protocol::frame::{
    FrameHeader,
    coding::{Control, Data, OpCode},
};

use super::{Meter, scrub::Needles, scrub::Scrubber};

/// An upgraded connection to relay: both sides' upgrades, and what to do with the bytes.
pub(super) struct Tunnel {
    pub(super) agent: hyper::upgrade::OnUpgrade,
    pub(super) upstream: hyper::upgrade::OnUpgrade,
    /// The secret values to scrub from the upstream's frames; `None`: the bytes pass as they are.
    pub(super) needles: Option<Needles>,
    pub(super) meter: Option<Meter>,
    /// Where replacements are counted.
    pub(super) redactions: Arc<AtomicU64>,
}

/// How a relayed connection went.
#[derive(Debug, Default)]
pub(super) struct TunnelEnd {
    /// Bytes from the agent to the upstream after the upgrade.
    pub(super) bytes_in: u64,
    /// Bytes to the agent after the upgrade.
    pub(super) bytes_out: u64,
    /// Why brokerd ended it, and whose doing it was.
    pub(super) cut: Option<(String, Side)>,
}

/// Why a direction stopped early.
enum Stop {
    /// A socket failed or was reset: the connection just ends.
    Io,
    /// brokerd ended it, for this reason.
    Cut(String, Side),
}

const BUFFER: usize = 16 * 1024;

impl Tunnel {
    /// Relays until both directions end, or until one is cut.
    pub(super) async fn run(self) -> TunnelEnd {
        let (agent, upstream) = match tokio::try_join!(self.agent, self.upstream) {
            Ok(pair) => pair,
            Err(e) => {
                tracing::info!(error = %e, "upgrade failed");
                return TunnelEnd {
                    cut: Some((format!("the upgrade failed: {e}"), Side::Upstream)),
                    ..TunnelEnd::default()
                };
            }
        };
        let (agent_read, agent_write) = tokio::io::split(TokioIo::new(agent));
        let (upstream_read, upstream_write) = tokio::io::split(TokioIo::new(upstream));
        let bytes_in = AtomicU64::new(0);
        let bytes_out = AtomicU64::new(0);
        let frames = self
            .needles
            .map(|n| FrameScrubber::new(n.scrubber().counting(self.redactions.clone())));
        let meter = self.meter.as_ref();
        let up = relay(agent_read, upstream_write, None, meter, &bytes_in);
        let down = relay(upstream_read, agent_write, frames, meter, &bytes_out);
        let cut = match tokio::try_join!(up, down) {
            Ok(_) | Err(Stop::Io) => None,
            Err(Stop::Cut(reason, side)) => {
                tracing::warn!(%reason, "an upgraded connection was cut");
                Some((reason, side))
            }
        };
        TunnelEnd {
            bytes_in: bytes_in.load(Ordering::Relaxed),
            bytes_out: bytes_out.load(Ordering::Relaxed),
            cut,
        }
    }
}

/// Copies `from` to `to` until `from` ends (then shuts `to` down), scrubbing WebSocket frames
/// when `frames` is given, charging and counting what it writes.
async fn relay<R, W>(
    mut from: R,
    mut to: W,
    mut frames: Option<FrameScrubber>,
    meter: Option<&Meter>,
    counted: &AtomicU64,
) -> Result<(), Stop>
where
    R: AsyncRead + Unpin,
    W: AsyncWrite + Unpin,
{
    let mut buf = vec![0u8; BUFFER];
    let mut scrubbed = Vec::with_capacity(BUFFER + 64);
    loop {
        let n = from.read(&mut buf).await.map_err(|_| Stop::Io)?;
        if n == 0 {
            let _ = to.shutdown().await;
            return Ok(());
        }
        let out = match frames.as_mut() {
            Some(frames) => {
                scrubbed.clear();
                frames
                    .push(&buf[..n], &mut scrubbed)
                    .map_err(|e| Stop::Cut(e, Side::Upstream))?;
                &scrubbed[..]
            }
            None => &buf[..n],
        };
        if out.is_empty() {
            continue;
        }
        if let Some(meter) = meter {
            meter(out.len() as u64).map_err(|reason| {
                Stop::Cut(
                    format!("{reason}; the WebSocket connection was cut"),
                    Side::Agent,
                )
            })?;
        }
        to.write_all(out).await.map_err(|_| Stop::Io)?;
        to.flush().await.map_err(|_| Stop::Io)?;
        counted.fetch_add(out.len() as u64, Ordering::Relaxed);
    }
}

/// Where the parser is in the upstream's byte stream.
enum State {
    /// Between frames: the bytes gathered are the start of a header.
    Header,
    /// Inside a data frame's payload.
    Data {
        mask: Option<[u8; 4]>,
        /// Payload bytes read so far (for the mask's phase).
        offset: u64,
        left: u64,
        fin: bool,
    },
    /// Inside a control frame's payload (gathered whole: at most 125 bytes).
    Control {
        opcode: Control,
        mask: Option<[u8; 4]>,
        left: u64,
        payload: Vec<u8>,
    },
}

/// The data message being relayed.
struct Message {
    opcode: Data,
    /// Whether a frame of it went out (the rest go as continuations).
    started: bool,
}

/// Parses a server's WebSocket frames and writes them back out with every secret value
/// replaced in their payloads.
pub(super) struct FrameScrubber {
    /// Over the payload of the current data message.
    scrubber: Scrubber,
    /// Bytes not yet parsed (a partial header or control payload).
    pending: Vec<u8>,
    state: State,
    message: Option<Message>,
    /// Scrubbed payload of the current piece.
    piece: Vec<u8>,
}

impl FrameScrubber {
    pub(super) fn new(scrubber: Scrubber) -> Self {
        Self {
            scrubber,
            pending: Vec::new(),
            state: State::Header,
            message: None,
            piece: Vec::new(),
        }
    }

    /// Parses `input`, appending the frames that can go out to `out`. `Err` says why the stream
    /// cannot be relayed (the connection is cut).
    pub(super) fn push(&mut self, input: &[u8], out: &mut Vec<u8>) -> Result<(), String> {
        let mut input = input;
        loop {
            match &mut self.state {
                State::Header => {
                    if input.is_empty() && self.pending.is_empty() {
                        return Ok(());
                    }
                    // At most a header's worth of bytes is gathered before parsing.
                    let room = 14usize.saturating_sub(self.pending.len()).min(input.len());
                    self.pending.extend_from_slice(&input[..room]);
                    let mut cursor = Cursor::new(&self.pending[..]);
                    let parsed = FrameHeader::parse(&mut cursor).map_err(|e| {
                        format!("the upstream broke the WebSocket framing ({e}); cut")
                    })?;
                    let Some((header, len)) = parsed else {
                        input = &input[room..];
                        if input.is_empty() {
                            return Ok(());
                        }
                        continue;
                    };
                    // The header ended inside what was just gathered: give the rest back.
                    let used = cursor.position() as usize;
                    let extra = self.pending.len() - used;
                    input = &input[room - extra..];
                    self.pending.clear();
                    self.start_frame(header, len, out)?;
                }
                State::Data {
                    mask,
                    offset,
                    left,
                    fin,
                } => {
                    if *left > 0 && input.is_empty() {
                        return Ok(());
                    }
                    let take = usize::try_from(*left).map_or(input.len(), |l| l.min(input.len()));
                    let (chunk, rest) = input.split_at(take);
                    input = rest;
                    self.piece.clear();
                    match mask {
                        Some(mask) => {
                            let mut plain = chunk.to_vec();
                            unmask(&mut plain, *mask, *offset);
                            self.scrubber.push_into(&plain, &mut self.piece);
                        }
                        None => self.scrubber.push_into(chunk, &mut self.piece),
                    }
                    *offset += take as u64;
                    *left -= take as u64;
                    let (done, fin) = (*left == 0, *fin);
                    if done && fin {
                        self.scrubber.finish_into(&mut self.piece);
                    }
                    if !self.piece.is_empty() || (done && fin) {
                        let piece = std::mem::take(&mut self.piece);
                        self.write_data(&piece, done && fin, out);
                        self.piece = piece;
                    }
                    if done {
                        if fin {
                            self.message = None;
                        }
                        self.state = State::Header;
                    }
                }
                State::Control {
                    opcode,
                    mask,
                    left,
                    payload,
                } => {
                    let take = usize::try_from(*left).map_or(input.len(), |l| l.min(input.len()));
                    payload.extend_from_slice(&input[..take]);
                    input = &input[take..];
                    *left -= take as u64;
                    if *left > 0 {
                        return Ok(());
                    }
                    let (opcode, mask, mut payload) = (*opcode, *mask, std::mem::take(payload));
                    self.state = State::Header;
                    if let Some(mask) = mask {
                        unmask(&mut payload, mask, 0);
                    }
                    self.write_control(opcode, payload, out);
                }
            }
        }
    }

    /// Checks a frame header and starts reading its payload.
    fn start_frame(
        &mut self,
        header: FrameHeader,
        len: u64,
        out: &mut Vec<u8>,
    ) -> Result<(), String> {
        if header.rsv1 || header.rsv2 || header.rsv3 {
            return Err(
                "the upstream sent a WebSocket frame with a reserved bit set (a compressed or \
                 otherwise extended frame brokerd did not negotiate), whose payload cannot be \
                 checked for secrets; cut"
                    .into(),
            );
        }
        match header.opcode {
            OpCode::Control(opcode) => {
                if len > 125 || !header.is_final {
                    return Err(
                        "the upstream sent a WebSocket control frame that is fragmented or longer \
                         than 125 bytes; cut"
                            .into(),
                    );
                }
                self.state = State::Control {
                    opcode,
                    mask: header.mask,
                    left: len,
                    payload: Vec::with_capacity(len as usize),
                };
                if len == 0 {
                    self.state = State::Header;
                    self.write_control(opcode, Vec::new(), out);
                }
            }
            OpCode::Data(opcode) => {
                match (opcode, &self.message) {
                    (Data::Continue, Some(_)) => {}
                    (Data::Text | Data::Binary, None) => {
                        self.message = Some(Message {
                            opcode,
                            started: false,
                        });
                    }
                    _ => {
                        return Err(
                            "the upstream sent a WebSocket frame out of its message's order; cut"
                                .into(),
                        );
                    }
                }
                self.state = State::Data {
                    mask: header.mask,
                    offset: 0,
                    left: len,
                    fin: header.is_final,
                };
                if len == 0 && !header.is_final {
                    // An empty fragment: nothing to send.
                    self.state = State::Header;
                }
            }
        }
        Ok(())
    }

    /// Writes a data frame of the current message: its opcode first, continuations after.
    fn write_data(&mut self, payload: &[u8], fin: bool, out: &mut Vec<u8>) {
        let opcode = match &mut self.message {
            Some(message) if !message.started => {
                message.started = true;
                message.opcode
            }
            _ => Data::Continue,
        };
        write_frame(OpCode::Data(opcode), fin, payload, out);
    }

    /// Writes a control frame with its payload scrubbed (cut back to 125 bytes when a
    /// replacement made it longer; a close frame keeps its code and a valid UTF-8 reason).
    fn write_control(&self, opcode: Control, payload: Vec<u8>, out: &mut Vec<u8>) {
        let needles = self.scrubber.needles();
        let payload = match opcode {
            Control::Close if payload.len() >= 2 => {
                let (code, reason) = payload.split_at(2);
                let mut reason = match needles.scrub(reason) {
                    Some(clean) => {
                        self.scrubber.count_redaction();
                        clean
                    }
                    None => reason.to_vec(),
                };
                reason.truncate(123);
                let valid = match std::str::from_utf8(&reason) {
                    Ok(_) => reason.len(),
                    Err(e) => e.valid_up_to(),
                };
                reason.truncate(valid);
                [code, &reason].concat()
            }
            _ => {
                let mut clean = match needles.scrub(&payload) {
                    Some(clean) => {
                        self.scrubber.count_redaction();
                        clean
                    }
                    None => payload,
                };
                clean.truncate(125);
                clean
            }
        };
        write_frame(OpCode::Control(opcode), true, &payload, out);
    }
}

/// A server frame (unmasked, no reserved bit) with `payload`.
fn write_frame(opcode: OpCode, fin: bool, payload: &[u8], out: &mut Vec<u8>) {
    let header = FrameHeader {
        is_final: fin,
        rsv1: false,
        rsv2: false,
        rsv3: false,
        opcode,
        mask: None,
    };
    // Writing into a Vec cannot fail.
    let _ = header.format(payload.len() as u64, out);
    out.extend_from_slice(payload);
}

/// Unmasks `payload`, which starts `offset` bytes into its frame's payload.
fn unmask(payload: &mut [u8], mask: [u8; 4], offset: u64) {
    for (i, b) in payload.iter_mut().enumerate() {
        *b ^= mask[((offset + i as u64) % 4) as usize];
    }
}

#[cfg(test)]
mod tests {
    use zeroize::Zeroizing;

    use super::*;
    use crate::proxy::scrub::PLACEHOLDER;

    fn frame(opcode: OpCode, fin: bool, mask: Option<[u8; 4]>, payload: &[u8]) -> Vec<u8> {
        let header = FrameHeader {
            is_final: fin,
            rsv1: false,
            rsv2: false,
            rsv3: false,
            opcode,
            mask,
        };
        let mut out = Vec::new();
        header
            .format(payload.len() as u64, &mut out)
            .expect("header");
        let mut body = payload.to_vec();
        if let Some(mask) = mask {
            unmask(&mut body, mask, 0);
        }
        out.extend_from_slice(&body);
        out
    }

    /// The messages (opcode, payload) and control frames in a server's byte stream.
    fn parse(mut bytes: &[u8]) -> Vec<(OpCode, Vec<u8>)> {
        let mut messages = Vec::new();
        let mut current: Option<(OpCode, Vec<u8>)> = None;
        while !bytes.is_empty() {
            let mut cursor = Cursor::new(bytes);
            let (header, len) = FrameHeader::parse(&mut cursor)
                .expect("valid")
                .expect("whole header");
            assert!(header.mask.is_none(), "server frames go out unmasked");
            let start = cursor.position() as usize;
            let payload = bytes[start..start + len as usize].to_vec();
            bytes = &bytes[start + len as usize..];
            match header.opcode {
                OpCode::Control(_) => messages.push((header.opcode, payload)),
                OpCode::Data(Data::Continue) => {
                    let (_, data) = current.as_mut().expect("a message in progress");
                    data.extend_from_slice(&payload);
                }
                op => {
                    assert!(current.is_none(), "a message began inside another");
                    current = Some((op, payload));
                }
            }
            if header.is_final
                && let OpCode::Data(_) = header.opcode
                && let Some(done) = current.take()
            {
                messages.push(done);
            }
        }
        assert!(current.is_none(), "a message was left open");
        messages
    }

    fn scrubber(secret: &[u8]) -> FrameScrubber {
        let needles = Needles::new(vec![Zeroizing::new(secret.to_vec())]).expect("needles");
        FrameScrubber::new(needles.scrubber())
    }

    #[test]
    fn a_secret_split_across_fragments_masks_and_reads_is_replaced() {
        let secret = b"sk-live-0123456789abcdef";
        let text = [b"key: ".as_slice(), secret, b" end"].concat();
        // One text message in three fragments split inside the secret, the middle one masked,
        // with a ping between fragments; then a binary message holding the secret whole.
        let mut stream = frame(OpCode::Data(Data::Text), false, None, &text[..9]);
        stream.extend(frame(
            OpCode::Data(Data::Continue),
            false,
            Some([1, 2, 3, 4]),
            &text[9..20],
        ));
        stream.extend(frame(OpCode::Control(Control::Ping), true, None, b"hi"));
        stream.extend(frame(OpCode::Data(Data::Continue), true, None, &text[20..]));
        stream.extend(frame(OpCode::Data(Data::Binary), true, None, secret));
        let want_text = [b"key: ".as_slice(), PLACEHOLDER, b" end"].concat();
        for step in [1, 2, 3, 7, 64, stream.len()] {
            let mut frames = scrubber(secret);
            let mut out = Vec::new();
            for piece in stream.chunks(step) {
                frames.push(piece, &mut out).expect("relayed");
                assert!(
                    !out.windows(secret.len()).any(|w| w == secret),
                    "step {step}: the secret went out"
                );
            }
            let messages = parse(&out);
            assert_eq!(
                messages,
                vec![
                    (OpCode::Control(Control::Ping), b"hi".to_vec()),
                    (OpCode::Data(Data::Text), want_text.clone()),
                    (OpCode::Data(Data::Binary), PLACEHOLDER.to_vec()),
                ],
                "step {step}"
            );
        }
    }

    #[test]
    fn a_close_reason_is_scrubbed_and_stays_short() {
        let secret = b"sk-0123456789";
        let mut payload = 1000u16.to_be_bytes().to_vec();
        payload.extend_from_slice(b"bad key ");
        payload.extend_from_slice(secret);
        let mut frames = scrubber(secret);
        let mut out = Vec::new();
        frames
            .push(
                &frame(OpCode::Control(Control::Close), true, None, &payload),
                &mut out,
            )
            .expect("relayed");
        let messages = parse(&out);
        let (_, got) = &messages[0];
        assert_eq!(&got[..2], &1000u16.to_be_bytes());
        assert_eq!(&got[2..], [b"bad key ".as_slice(), PLACEHOLDER].concat());
    }

    #[test]
    fn extended_or_disordered_frames_cut_the_connection() {
        let mut compressed = frame(OpCode::Data(Data::Text), true, None, b"xx");
        compressed[0] |= 0x40; // RSV1: permessage-deflate
        assert!(
            scrubber(b"sk-0123456789")
                .push(&compressed, &mut Vec::new())
                .is_err()
        );
        let stray = frame(OpCode::Data(Data::Continue), true, None, b"xx");
        assert!(
            scrubber(b"sk-0123456789")
                .push(&stray, &mut Vec::new())
                .is_err()
        );
        let long_ping = frame(OpCode::Control(Control::Ping), true, None, &[0u8; 126]);
        assert!(
            scrubber(b"sk-0123456789")
                .push(&long_ping, &mut Vec::new())
                .is_err()
        );
    }
}
