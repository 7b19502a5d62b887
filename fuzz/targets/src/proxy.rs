//! The `proxy` target, end to end in linkerd2-proxy's style: an arbitrary sequence of agent
//! requests and upstream answers driven through the real proxy (TLS termination, the exchange,
//! the policy authorizer injecting a vault secret into a header and a query parameter,
//! decoding, scrubbing, and the records the audit writer commits), on the component tests'
//! rig (`agent_broker::fuzzing::proxy`; loopback TCP, see the rig's docs for why not in-memory
//! streams). One single-threaded runtime and the rig are built once per thread and reused.
//!
//! Input (read with [`Input`]; every input is a case): a byte choosing the upstream (HTTP/1.1
//! only, or h2 preferred) and the agent's protocol, then up to 6 exchanges. An exchange is a
//! tag byte; `tag % 8 == 7` is raw bytes on a new HTTP/1.1 connection (a request hyper may not
//! parse), anything else a request and the upstream's answer to it:
//! - the request: a method (a list, or fuzzer bytes), a host (the rule's, another, or fuzzer
//!   text), a path, up to 5 headers (names and values from lists of interesting ones, among
//!   them placeholder forms, or fuzzer bytes), and up to 3 body chunks;
//! - the answer: a status, up to 3 headers, up to 2 stacked content codings (gzip, deflate, br,
//!   zstd, identity, a bogus one, or `gzip` over plain bytes), SSE or not, up to 8 pieces
//!   (fuzzer text, or the secret the upstream received echoed: whole, in part, base64, hex, in
//!   a header or a trailer), frame sizes, and whether it ends early (a `Content-Length` the
//!   body falls short of: HTTP/1.1 closes, h2 resets).
//!
//! Invariants:
//! - nothing panics, in this thread or in any task of the runtime;
//! - nothing the agent receives (status line's reason, headers, body, trailers) holds the
//!   secret, with the body also decoded as the agent would decode it (its `Content-Encoding`
//!   undone, when it decodes);
//! - exactly one record per request the proxy accepted: a request whose response head reached
//!   the agent has exactly one record, one that got no answer at most one, and no record is
//!   still `forwarded` once the exchanges ended; an empty 400 (hyper's own answer to a head it
//!   cannot take) at most one. A request hyper's server cannot parse (the raw
//!   exchanges) is answered by hyper itself (400, or the connection closed) before the proxy's
//!   service sees it, and gets no record today: the raw exchanges are held to the secret
//!   invariant only.

use std::{
    io::Read as _,
    sync::{
        Once,
        atomic::{AtomicBool, Ordering},
    },
};

use agent_broker::fuzzing::proxy::{
    self as rig, AgentRequest, Case, Coding, End, Exchange, Piece, Proto, UpstreamResponse,
};

use crate::input::Input;

const METHODS: &[&str] = &[
    "GET", "POST", "PUT", "PATCH", "DELETE", "HEAD", "OPTIONS", "TRACE",
];

const HEADER_NAMES: &[&str] = &[
    "authorization",
    "proxy-authorization",
    "x-api-key",
    "cookie",
    "accept-encoding",
    "te",
    "connection",
    "upgrade",
    "expect",
    "content-type",
    "transfer-encoding",
    "content-length",
    "host",
];

/// Values an agent holding no secret writes where a secret goes.
const PLACEHOLDER_FORMS: &[&str] = &[
    "Bearer placeholder",
    "Bearer {secret:TEST_KEY}",
    "{{TEST_KEY}}",
    "[redacted by agent-broker]",
    "Basic dXNlcjpwbGFjZWhvbGRlcg==",
    "brk_0123456789abcdef0123456789abcdef",
    "gzip, br, zstd, deflate",
    "100-continue",
    "",
];

const CODINGS: &[Coding] = &[
    Coding::Gzip,
    Coding::Deflate,
    Coding::Br,
    Coding::Zstd,
    Coding::Identity,
    Coding::Bogus,
    Coding::Lying,
];

fn agent_request(input: &mut Input<'_>) -> AgentRequest {
    let m = input.u8();
    let method = match METHODS.get(usize::from(m % 10)) {
        Some(m) => m.as_bytes().to_vec(),
        None => input.short(12).to_vec(),
    };
    let host = match input.u8() % 8 {
        0..=5 => "api.example.test".to_string(),
        6 => "other.example.test".to_string(),
        _ => input.text(32),
    };
    let path = input.short(64).to_vec();
    let mut headers = Vec::new();
    for _ in 0..input.u8() % 6 {
        let pick = input.u8();
        let name = match HEADER_NAMES.get(usize::from(pick % 16)) {
            Some(n) => n.as_bytes().to_vec(),
            None => input.short(24).to_vec(),
        };
        let value = match PLACEHOLDER_FORMS.get(usize::from(pick >> 4)) {
            Some(v) => v.as_bytes().to_vec(),
            None => input.short(64).to_vec(),
        };
        headers.push((name, value));
    }
    let body = (0..input.u8() % 4)
        .map(|_| input.short(255).to_vec())
        .collect();
    AgentRequest {
        method,
        host,
        path,
        headers,
        body,
    }
}

fn upstream_response(input: &mut Input<'_>) -> UpstreamResponse {
    let status = 200 + input.u16() % 400;
    let headers = (0..input.u8() % 4)
        .map(|_| (input.short(24).to_vec(), input.short(48).to_vec()))
        .collect();
    let shape = input.u8();
    // Bits 0-1: how many codings (3 reads as 0), bit 2: SSE, bit 3: an early end.
    let codings = (0..(shape & 0x03) % 3)
        .map(|_| CODINGS[usize::from(input.u8()) % CODINGS.len()])
        .collect();
    let sse = shape & 0x04 != 0;
    let mut pieces = Vec::new();
    for _ in 0..input.u8() % 9 {
        pieces.push(match input.u8() % 12 {
            0..=3 => Piece::Text(input.short(128).to_vec()),
            4 => Piece::Echo,
            5 => Piece::EchoQuery,
            6 => Piece::EchoBase64,
            7 => Piece::EchoHex,
            8 => Piece::EchoHeader,
            9 => Piece::EchoTrailer,
            _ => Piece::EchoPart {
                at: input.u8() % 64,
                len: input.u8() % 64,
            },
        });
    }
    let frames = (0..input.u8() % 6).map(|_| u16::from(input.u8())).collect();
    let end = if shape & 0x08 != 0 {
        End::Short(u16::from(input.u8()))
    } else {
        End::Whole
    };
    UpstreamResponse {
        status,
        headers,
        codings,
        sse,
        pieces,
        frames,
        end,
    }
}

fn case(data: &[u8]) -> Case {
    let mut input = Input::new(data);
    let flags = input.u8();
    let mut exchanges = Vec::new();
    while !input.is_empty() && exchanges.len() < 6 {
        let tag = input.u8();
        exchanges.push(if tag % 8 == 7 {
            Exchange::Raw(input.short(255).to_vec())
        } else {
            let request = agent_request(&mut input);
            Exchange::Request(request, upstream_response(&mut input))
        });
    }
    Case {
        upstream: if flags & 1 == 0 { Proto::H1 } else { Proto::H2 },
        agent: if flags & 2 == 0 { Proto::H1 } else { Proto::H2 },
        exchanges,
    }
}

/// Set by the panic hook: a panic in a task of the runtime is caught by tokio, not by the
/// fuzzer (libFuzzer's own hook aborts on it anyway; the stable replay needs this).
static PANICKED: AtomicBool = AtomicBool::new(false);

fn watch_panics() {
    static HOOK: Once = Once::new();
    HOOK.call_once(|| {
        let previous = std::panic::take_hook();
        std::panic::set_hook(Box::new(move |info| {
            PANICKED.store(true, Ordering::SeqCst);
            previous(info);
        }));
    });
}

/// Most bytes a decoded body may have here (the rig's bodies are far smaller).
const MAX_DECODED: u64 = 16 << 20;

/// `body` decoded as a client decodes `Content-Encoding` (the last coding first); `None` when
/// it does not decode (a client would show an error, not the bytes).
fn decoded(codings: &[String], body: &[u8]) -> Option<Vec<u8>> {
    let mut body = body.to_vec();
    for coding in codings.iter().rev() {
        let mut out = Vec::new();
        let read = match coding.as_str() {
            "identity" => continue,
            "gzip" | "x-gzip" => flate2::read::MultiGzDecoder::new(body.as_slice())
                .take(MAX_DECODED)
                .read_to_end(&mut out),
            "deflate" => flate2::read::ZlibDecoder::new(body.as_slice())
                .take(MAX_DECODED)
                .read_to_end(&mut out)
                .or_else(|_| {
                    out.clear();
                    flate2::read::DeflateDecoder::new(body.as_slice())
                        .take(MAX_DECODED)
                        .read_to_end(&mut out)
                }),
            "br" => brotli::Decompressor::new(body.as_slice(), 4096)
                .take(MAX_DECODED)
                .read_to_end(&mut out),
            "zstd" => zstd::stream::read::Decoder::new(body.as_slice())
                .and_then(|d| d.take(MAX_DECODED).read_to_end(&mut out)),
            _ => return None,
        };
        read.ok()?;
        body = out;
    }
    Some(body)
}

pub fn proxy(data: &[u8]) {
    watch_panics();
    PANICKED.store(false, Ordering::SeqCst);
    let case = case(data);
    let outcome = rig::run(&case);
    assert!(
        !PANICKED.load(Ordering::SeqCst),
        "a task panicked while the proxy served the input"
    );

    for (i, received) in outcome.received.iter().enumerate() {
        for (what, bytes) in [
            ("response head", &received.head),
            ("body", &received.body),
            ("trailers", &received.trailers),
        ] {
            assert!(
                !rig::leaks(bytes),
                "exchange {i}: the secret reached the agent in the {what}"
            );
        }
        if !received.codings.is_empty()
            && let Some(body) = decoded(&received.codings, &received.body)
        {
            assert!(
                !rig::leaks(&body),
                "exchange {i}: the secret reached the agent in the body decoded as {:?}",
                received.codings
            );
        }
    }

    assert_eq!(
        outcome.unfinished, 0,
        "records still `forwarded` after the exchanges ended"
    );
    for (i, (prefix, received)) in outcome.prefixes.iter().zip(&outcome.received).enumerate() {
        let Some(prefix) = prefix else { continue };
        let records = outcome
            .records
            .iter()
            .filter(|r| r.path.as_deref().is_some_and(|p| p.starts_with(prefix)))
            .count();
        if received.status == Some(400) && received.body.is_empty() {
            // hyper's server answers a head it cannot take (e.g. a `Transfer-Encoding` that does
            // not end in chunked) with an empty 400 before the proxy's service sees it: that is
            // the connection's protocol record (summed per agent, so not necessarily one per
            // input), not a request's. brokerd's own 400s carry a reason, except to HEAD.
            assert!(
                records <= 1,
                "exchange {i}: a request answered with an empty 400 has {records} records"
            );
        } else if received.status.is_some() {
            assert_eq!(
                records,
                1,
                "exchange {i}: a request answered with {:?} has {records} records; the answer: {}",
                received.status,
                String::from_utf8_lossy(&received.body)
            );
        } else {
            assert!(
                records <= 1,
                "exchange {i}: an unanswered request has {records} records"
            );
        }
    }
}
