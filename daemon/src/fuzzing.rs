//! Thin public wrappers around brokerd's private parsers, for the fuzz targets in
//! `fuzz/targets` (built only with the `fuzzing` feature; brokerd never enables it). Each
//! wrapper calls the code the daemon runs; the targets hold the invariants.

use bytes::Bytes;
use zeroize::Zeroizing;

pub use hickory_proto::op::ResponseCode;
pub use hickory_proto::rr::RecordType;

pub use crate::dns::fuzzing::Checked as DnsQuestion;
pub use crate::proxy::{Coding, DecodeLimits, Needles, PLACEHOLDER, Peeked, Sniffed};

/// The protocol sniffer: what a connection's first bytes are.
pub fn sniff(first: &[u8]) -> Sniffed {
    crate::proxy::sniff(first)
}

/// The ClientHello/SNI peek over bytes at the start of a connection.
pub fn client_hello_sni(bytes: &[u8]) -> Peeked {
    crate::proxy::client_hello_sni(bytes)
}

/// The check of an agent's DNS query (see `DnsServer::answer`): `Ok` with the question,
/// `Err(Some(reply))` for an error answer, `Err(None)` when the query is dropped.
pub fn dns_check_query(query: &[u8]) -> Result<DnsQuestion, Option<Vec<u8>>> {
    crate::dns::fuzzing::check(query)
}

/// The answer brokerd builds itself for a checked question (a refusal, `NoError` without
/// records, `ServFail`).
pub fn dns_reply_with(question: &DnsQuestion, code: ResponseCode) -> Vec<u8> {
    crate::dns::fuzzing::reply(question, code)
}

/// An upstream resolver's reply, kept only if it answers `question`.
pub fn dns_upstream_reply(reply: Vec<u8>, question: &DnsQuestion) -> Option<Vec<u8>> {
    crate::dns::fuzzing::upstream_reply(reply, question)
}

/// A reply cut to fit the agent's UDP buffer, and whether it says it was truncated.
pub fn dns_for_udp(reply: Vec<u8>, query: &[u8]) -> (Vec<u8>, bool) {
    crate::dns::fuzzing::for_udp(reply, query)
}

/// The needles (secret values and their encodings) for these secrets, `None` when they cannot
/// be built.
pub fn needles(secrets: &[&[u8]]) -> Option<Needles> {
    Needles::new(secrets.iter().map(|s| Zeroizing::new(s.to_vec())).collect()).ok()
}

/// One-shot replacement of every needle in `haystack` (`None`: nothing to replace).
pub fn scrub_once(needles: &Needles, haystack: &[u8]) -> Option<Vec<u8>> {
    needles.scrub(haystack)
}

/// How [`scrub_streaming`] feeds a chunk.
#[derive(Clone, Copy, Debug)]
pub enum Push {
    /// `Scrubber::push_bytes` (the response-body path).
    Bytes,
    /// `Scrubber::push_into` (the WebSocket path).
    Into,
}

/// The streaming scrubber over `chunks`, each fed the way its `Push` says, then finished.
pub fn scrub_streaming(needles: &Needles, chunks: &[(&[u8], Push)]) -> Vec<u8> {
    let mut scrubber = needles.scrubber();
    let mut out = Vec::new();
    for (chunk, push) in chunks {
        match push {
            Push::Bytes => {
                for piece in scrubber.push_bytes(Bytes::copy_from_slice(chunk)) {
                    out.extend_from_slice(&piece);
                }
            }
            Push::Into => scrubber.push_into(chunk, &mut out),
        }
    }
    out.extend(scrubber.finish());
    out
}

/// Why [`decode_capped`] stopped.
#[derive(Debug, PartialEq, Eq)]
pub enum DecodeEnd {
    /// The stream ended cleanly.
    Done,
    /// The input does not decode (or is cut short).
    Undecodable,
    /// Past `max_decoded`.
    TooLarge,
    /// Past `max_ratio`.
    Bomb,
    /// Any other error (a bug: decoding only fails in the three ways above).
    Other(String),
}

/// The response decoder with its caps over `chunks`: the bytes it let out, and how it ended.
pub fn decode_capped(coding: Coding, limits: DecodeLimits, chunks: &[&[u8]]) -> (u64, DecodeEnd) {
    use crate::proxy::BodyError;
    let mut out = 0u64;
    let end = |e: BodyError| match e {
        BodyError::Decode(_) => DecodeEnd::Undecodable,
        BodyError::TooLarge(_) => DecodeEnd::TooLarge,
        BodyError::Bomb(_) => DecodeEnd::Bomb,
        other => DecodeEnd::Other(other.to_string()),
    };
    let mut capped = match crate::proxy::Capped::new(coding, limits) {
        Ok(c) => c,
        Err(e) => return (0, DecodeEnd::Other(e.to_string())),
    };
    for chunk in chunks {
        match capped.decode(chunk) {
            Ok(decoded) => out += decoded.len() as u64,
            Err(e) => return (out, end(e)),
        }
    }
    match capped.finish() {
        Ok(rest) => (out + rest.len() as u64, DecodeEnd::Done),
        Err(e) => (out, end(e)),
    }
}

/// The audit log's steps for the `audit` target: append through the writer's own code, edit
/// the stored records behind the log's back, open and verify as `brokerctl logs verify` does.
pub mod audit {
    pub use crate::audit::fuzzing::{
        RawRecord, Verified, append_batches, open_and_verify, read_records, write_records,
    };
}

/// The `proxy` target's rig: the real proxy between an agent and a scripted upstream (see
/// `proxy/component_tests/fuzzing.rs`).
pub mod proxy {
    pub use crate::proxy::fuzz_rig::{
        AgentRequest, Case, Coding, End, Exchange, Outcome, Piece, Proto, Received,
        UpstreamResponse, leaks, run,
    };
}
