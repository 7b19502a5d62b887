//! The bodies of agent-broker's fuzz targets. Each `pub fn NAME(data: &[u8])` is one target:
//! `fuzz/fuzz_targets/NAME.rs` hands it libFuzzer's input (nightly, `cargo xtask fuzz`), and
//! `tests/replay.rs` runs every file of `fuzz/corpus/NAME/` through it on stable (`cargo xtask
//! test`). A target panics only when an invariant of the code under test breaks; malformed
//! input is expected and must be refused without a panic.
//!
//! The daemon's parsers are private; its `fuzzing` feature exposes thin wrappers
//! (`agent_broker::fuzzing`). Core and protocol are public crates and are called directly.

use std::{path::PathBuf, time::SystemTime};

use agent_broker::fuzzing as daemon;
use agent_broker_core::{
    cgroup::CgroupPath,
    handle::{
        self, HandleBinding, HandleId, HandleRecord, SwapContext, TokenHash, TokenShape,
        swap_handles,
    },
    inject::{InjectSpec, Template},
    percent::{self, Plus},
    policy::Policy,
    secret::SecretName,
};
use agent_broker_protocol::{Request, decode_line, encode_line};

mod audit;
mod input;
mod proxy;

pub use audit::audit;
pub use proxy::proxy;

/// A target's body.
pub type Target = fn(&[u8]);

/// Every target, by name (the names of `fuzz/fuzz_targets/*.rs` and `fuzz/corpus/*/`).
pub const TARGETS: &[(&str, Target)] = &[
    ("sniff", sniff),
    ("dns_query", dns_query),
    ("dns_answer", dns_answer),
    ("scrub", scrub),
    ("decode", decode),
    ("policy", policy),
    ("template", template),
    ("handle_swap", handle_swap),
    ("control", control),
    ("audit", audit),
    ("proxy", proxy),
];

/// Splits `data` at the first occurrence of `sep`; the second part is empty when there is none.
fn split_at_sep<'a>(data: &'a [u8], sep: &[u8]) -> (&'a [u8], &'a [u8]) {
    match data.windows(sep.len()).position(|w| w == sep) {
        Some(i) => (&data[..i], &data[i + sep.len()..]),
        None => (data, &[]),
    }
}

/// The protocol sniffer and the ClientHello/SNI peek, over a connection's first bytes.
///
/// Invariants: a whole ClientHello is sniffed as TLS; its SNI is lowercase and a valid DNS
/// name; every prefix of a whole ClientHello is either incomplete or a whole ClientHello (a
/// peek that sees part of a hello must wait, not give up).
pub fn sniff(data: &[u8]) {
    let kind = daemon::sniff(data);
    let peeked = daemon::client_hello_sni(data);
    if let daemon::Peeked::Hello(sni) = &peeked {
        assert_eq!(
            kind,
            daemon::Sniffed::Tls,
            "a ClientHello not sniffed as TLS"
        );
        if let Some(sni) = sni {
            assert_eq!(sni, &sni.to_ascii_lowercase(), "SNI not lowercased");
            assert!(!sni.is_empty(), "empty SNI");
        }
        // Cut anywhere, a whole hello reads as incomplete until its end arrives.
        for cut in [1, 5, data.len() / 2, data.len().saturating_sub(1)] {
            if cut == 0 || cut >= data.len() {
                continue;
            }
            let partial = daemon::client_hello_sni(&data[..cut]);
            assert!(
                matches!(
                    partial,
                    daemon::Peeked::Incomplete | daemon::Peeked::Hello(_)
                ),
                "a prefix of {cut} bytes of a ClientHello is {partial:?}"
            );
        }
    }
}

/// An agent's DNS query, as `DnsServer::answer` checks it, and the answers brokerd builds.
///
/// Invariants: a checked name is lowercase, 1..=253 bytes; every reply brokerd builds (an
/// error, a refusal, an empty answer) is a response with the query's id.
pub fn dns_query(data: &[u8]) {
    match daemon::dns_check_query(data) {
        Ok(question) => {
            let (id, name, _qtype) = &question;
            assert!(
                !name.is_empty() && name.len() <= 253,
                "name length {}",
                name.len()
            );
            assert_eq!(name, &name.to_ascii_lowercase(), "name not lowercased");
            for code in [
                daemon::ResponseCode::Refused,
                daemon::ResponseCode::NoError,
                daemon::ResponseCode::ServFail,
            ] {
                let reply = daemon::dns_reply_with(&question, code);
                assert_reply(&reply, *id);
                // Read back as an upstream's reply would be (whether it matches depends on
                // how the name prints; it must not panic).
                let _ = daemon::dns_upstream_reply(reply.clone(), &question);
                let (cut, _) = daemon::dns_for_udp(reply, data);
                assert!(cut.len() <= 65535, "a UDP reply of {} bytes", cut.len());
            }
        }
        Err(Some(reply)) => {
            let id = u16::from_be_bytes([data[0], data[1]]);
            assert_reply(&reply, id);
        }
        Err(None) => {}
    }
}

fn assert_reply(reply: &[u8], id: u16) {
    assert!(reply.len() >= 12, "a reply of {} bytes", reply.len());
    assert_eq!(u16::from_be_bytes([reply[0], reply[1]]), id, "reply id");
    assert!(reply[2] & 0x80 != 0, "the reply is not a response");
}

/// An upstream resolver's reply: `data` is `query \0\0\0\0 reply`.
///
/// Invariants: an upstream reply is kept only as it came (same bytes); a reply cut for UDP is
/// marked truncated (TC) and keeps its header, or is empty when it cannot be read.
pub fn dns_answer(data: &[u8]) {
    let (query, reply) = split_at_sep(data, b"\0\0\0\0");
    let Ok(question) = daemon::dns_check_query(query) else {
        return;
    };
    if let Some(kept) = daemon::dns_upstream_reply(reply.to_vec(), &question) {
        assert_eq!(kept, reply, "an upstream reply was changed");
    }
    let (cut, truncated) = daemon::dns_for_udp(reply.to_vec(), query);
    if cut != reply && !cut.is_empty() {
        assert!(truncated, "a reply cut for UDP without TC");
        assert!(cut.len() >= 12, "a cut reply without a header");
    }
}

/// The response scrubber, differential: the streaming scrubber over the body cut at
/// fuzzer-chosen points must give exactly the one-shot replacement, and no secret survives.
///
/// `data`: a byte `n` (1 to 3 secrets), each secret as a length byte and its bytes, then a
/// byte per cut (cut sizes), `\xff\xff`, and the body. Secrets holding a byte of the
/// placeholder are skipped by the survival check (the placeholder itself may spell them).
pub fn scrub(data: &[u8]) {
    let Some((&n, mut rest)) = data.split_first() else {
        return;
    };
    let mut secrets: Vec<&[u8]> = Vec::new();
    for _ in 0..(n % 3 + 1) {
        let Some((&len, tail)) = rest.split_first() else {
            return;
        };
        let len = usize::from(len % 48);
        if tail.len() < len {
            return;
        }
        secrets.push(&tail[..len]);
        rest = &tail[len..];
    }
    let (cuts, body) = split_at_sep(rest, b"\xff\xff");
    let Some(needles) = cached_needles(&secrets) else {
        return;
    };
    let once = daemon::scrub_once(&needles, body).unwrap_or_else(|| body.to_vec());
    // The body cut into chunks whose sizes the fuzzer chose (the last one takes the rest),
    // alternating the two push paths as the cut byte's top bit says.
    let mut chunks = Vec::new();
    let mut at = 0;
    for &c in cuts {
        if at >= body.len() {
            break;
        }
        let size = usize::from(c & 0x7f).min(body.len() - at);
        let push = if c & 0x80 == 0 {
            daemon::Push::Bytes
        } else {
            daemon::Push::Into
        };
        chunks.push((&body[at..at + size], push));
        at += size;
    }
    chunks.push((&body[at..], daemon::Push::Bytes));
    let streamed = daemon::scrub_streaming(&needles, &chunks);
    assert!(
        streamed == once,
        "streaming ({} bytes) differs from one-shot ({} bytes) over {} chunks",
        streamed.len(),
        once.len(),
        chunks.len()
    );
    for secret in &secrets {
        if secret.is_empty() || secret.iter().any(|b| daemon::PLACEHOLDER.contains(b)) {
            continue;
        }
        assert!(
            !once.windows(secret.len()).any(|w| w == *secret),
            "a secret of {} bytes survived scrubbing",
            secret.len()
        );
    }
}

thread_local! {
    /// The needles of the last secrets seen: building them (hundreds of encoded forms and their
    /// automata) costs far more than a scan, and the fuzzer mostly mutates the body.
    static LAST_NEEDLES: std::cell::RefCell<Option<(Vec<Vec<u8>>, daemon::Needles)>> =
        const { std::cell::RefCell::new(None) };
}

fn cached_needles(secrets: &[&[u8]]) -> Option<daemon::Needles> {
    LAST_NEEDLES.with_borrow_mut(|last| {
        if let Some((seen, needles)) = last.as_ref()
            && seen.iter().map(Vec::as_slice).eq(secrets.iter().copied())
        {
            return Some(needles.clone());
        }
        let needles = daemon::needles(secrets)?;
        *last = Some((
            secrets.iter().map(|s| s.to_vec()).collect(),
            needles.clone(),
        ));
        Some(needles)
    })
}

/// The response decoders with their caps: `data` is a coding byte, a byte of chunk size, then
/// the compressed body. Invariants: decoding stops at the caps (never more than `max_decoded`
/// bytes out, never more than `max_ratio` per input byte past the floor); decoding fails only
/// as undecodable, too large or a bomb.
pub fn decode(data: &[u8]) {
    let [coding, chunk, body @ ..] = data else {
        return;
    };
    let coding = match coding % 4 {
        0 => daemon::Coding::Gzip,
        1 => daemon::Coding::Deflate,
        2 => daemon::Coding::Brotli,
        _ => daemon::Coding::Zstd,
    };
    let limits = daemon::DecodeLimits {
        max_decoded: 3 << 20,
        max_ratio: 50,
    };
    let chunk = usize::from(*chunk).max(1) * 16;
    let chunks: Vec<&[u8]> = body.chunks(chunk).collect();
    let (out, end) = daemon::decode_capped(coding, limits, &chunks);
    assert!(
        !matches!(end, daemon::DecodeEnd::Other(_)),
        "decoding failed otherwise: {end:?}"
    );
    assert!(
        out <= limits.max_decoded,
        "{out} bytes decoded past the cap"
    );
    // Past the 1 MiB floor the ratio holds (the error comes on the step that breaks it, so
    // what went out before it is within the ratio of the input read so far).
    if out > 1 << 20 {
        assert!(
            out <= (body.len() as u64).saturating_mul(limits.max_ratio),
            "{out} bytes out of {} in",
            body.len()
        );
    }
}

/// The policy loader and `policy explain`: `data` is up to four policy files separated by
/// NUL bytes. Invariants: loading is independent of the order the files are given in; a loaded
/// policy explains any request without a panic; every rule's injection renders to header
/// values HTTP accepts and a query that stays a valid URI query.
pub fn policy(data: &[u8]) {
    let files: Vec<(PathBuf, String)> = data
        .split(|&b| b == 0)
        .take(4)
        .enumerate()
        .filter_map(|(i, f)| {
            let text = std::str::from_utf8(f).ok()?;
            Some((
                PathBuf::from(format!("/etc/agent-broker/policy/{i}.toml")),
                text.to_string(),
            ))
        })
        .collect();
    let mut reversed = files.clone();
    reversed.reverse();
    let loaded = Policy::from_files(files);
    let again = Policy::from_files(reversed);
    assert_eq!(
        loaded.is_ok(),
        again.is_ok(),
        "loading depends on the order of the files"
    );
    let Ok(policy) = loaded else {
        return;
    };
    let now = SystemTime::UNIX_EPOCH + std::time::Duration::from_secs(1_800_000_000);
    let urls = [
        "https://api.example.com/v1/chat?x=1",
        "http://10.0.0.1:8080/",
        "https://github.com/",
        "https://xn--nxasmq6b.example/%2e%2e/",
    ];
    for file in policy.files() {
        let cgroup = file.cgroup().clone();
        let child = CgroupPath::parse(&format!("{}/child", cgroup.as_str())).ok();
        for cg in std::iter::once(&cgroup).chain(child.as_ref()) {
            for (method, url) in ["GET", "POST", "DELETE"].iter().zip(urls.iter().cycle()) {
                let _ = policy.explain(cg, method, url, now);
            }
        }
        for rule in file.rules() {
            let _ = policy.explain(&cgroup, "GET", &format!("https://{}/", rule.host()), now);
            check_injection(rule.injection());
        }
    }
}

fn check_injection(injection: &agent_broker_core::inject::Injection) {
    let Ok(rendered) = injection.render(|_| Some(b"s3cr&t v=lue+%" as &[u8])) else {
        return;
    };
    for (name, value) in &rendered.headers {
        assert!(
            http::HeaderName::from_bytes(name.as_bytes()).is_ok(),
            "an injected header name HTTP refuses"
        );
        assert!(
            http::HeaderValue::from_bytes(value).is_ok(),
            "an injected header value HTTP refuses"
        );
    }
    for original in [None, Some(""), Some("a=1&b=%41&&c"), Some("key=agent's")] {
        if let Some(query) = rendered.rewrite_query(original) {
            assert!(
                http::uri::PathAndQuery::try_from(format!("/p?{}", query.as_str())).is_ok(),
                "a rewritten query is not a valid URI query"
            );
        }
    }
}

/// Credential templates, header names, percent-decoding, handle ids, TTLs and token search.
/// Invariants: a parsed template shows its source and renders without CR, LF or NUL; percent
/// offsets map every decoded byte back into the input; found tokens are `brk_` + 52 bytes.
pub fn template(data: &[u8]) {
    let text = String::from_utf8_lossy(data);
    if let Ok(t) = Template::parse(&text) {
        assert_eq!(t.as_str(), text, "a template does not keep its source");
        if let Ok(value) = t.render(|_| Some(b"value" as &[u8])) {
            assert!(
                !value.iter().any(|b| matches!(b, b'\r' | b'\n' | 0)),
                "a rendered template breaks its header"
            );
        }
    }
    if let Some((name, template)) = text.split_once(':') {
        let _ = InjectSpec::parse([(name, template)]);
    }
    for plus in [Plus::Keep, Plus::Space] {
        let (decoded, starts) = percent::decode_with_offsets(data, plus);
        assert_eq!(decoded, percent::decode(data, plus));
        assert_eq!(starts.len(), decoded.len() + 1);
        assert!(
            starts.windows(2).all(|w| w[0] < w[1]),
            "offsets not increasing"
        );
        assert_eq!(starts.last().copied(), Some(data.len()));
    }
    if let Ok(id) = HandleId::parse(&text) {
        assert_eq!(id.as_str(), text);
    }
    if let Ok(ttl) = handle::parse_ttl(&text) {
        assert!(ttl.as_secs() >= 1 && ttl.as_secs() <= 366 * 86400);
    }
    if let Some(hash) = TokenHash::from_hex(&text) {
        assert_eq!(hash.to_hex(), text.to_ascii_lowercase());
    }
    for range in handle::find_tokens(data) {
        assert_eq!(range.len(), 56, "a token of {} bytes", range.len());
        assert!(data[range].starts_with(b"brk_"));
    }
    let _ = TokenShape::parse(&text);
    let _ = TokenShape::of_secret(data);
}

/// The secret every handle of [`handle_swap`] stands for.
const SWAP_SECRET: &[u8] = b"swapped-secret-value";

/// Handle swapping over a request's headers and query: `data` is `name: value` lines, then a
/// line `?query`. Every `brk_` token stands for a valid handle (of `api.example.com`, for the
/// caller's parent cgroup). Invariants: after a swap no handle is left in a swapped header or
/// query; each used handle has its secret; the swapped headers and query still make a request.
pub fn handle_swap(data: &[u8]) {
    let text = String::from_utf8_lossy(data);
    let mut headers = http::HeaderMap::new();
    let mut query = None;
    for line in text.split('\n') {
        if let Some(q) = line.strip_prefix('?') {
            query = Some(q.to_string());
        } else if let Some((name, value)) = line.split_once(':')
            && let Ok(name) = http::HeaderName::from_bytes(name.trim().as_bytes())
            && let Ok(value) = http::HeaderValue::from_str(value.trim())
        {
            headers.append(name, value);
        }
    }
    let (Ok(cgroup), Ok(caller), Ok(secret), Ok(id)) = (
        CgroupPath::parse("agents"),
        CgroupPath::parse("agents/one"),
        SecretName::new("API_KEY"),
        HandleId::parse("h_0badf00d"),
    ) else {
        panic!("fixed names refused");
    };
    let Ok(binding) = HandleBinding::new(cgroup, secret, "api.example.com") else {
        panic!("fixed binding refused");
    };
    let now = SystemTime::UNIX_EPOCH + std::time::Duration::from_secs(1_800_000_000);
    let shapes: Vec<TokenShape> = TokenShape::parse("ghp_[0-9A-Za-z]{36}")
        .into_iter()
        .collect();
    let ctx = SwapContext {
        cgroup: &caller,
        host: "api.example.com",
        now,
        shapes: &shapes,
    };
    let records = |hash: &TokenHash| {
        Ok(Some(HandleRecord {
            id: id.clone(),
            token_hash: *hash,
            binding: binding.clone(),
            created: now - std::time::Duration::from_secs(60),
            expires: now + std::time::Duration::from_secs(60),
            revoked: false,
            shape: None,
        }))
    };
    let valid_query = query
        .as_deref()
        .is_some_and(|q| http::uri::PathAndQuery::try_from(format!("/p?{q}")).is_ok());
    let Ok(Some(swapped)) = swap_handles(&headers, query.as_deref(), &ctx, records, |_| {
        Some(SWAP_SECRET)
    }) else {
        return;
    };
    assert!(!swapped.used.is_empty(), "a swap that used no handle");
    assert_eq!(swapped.used.len(), swapped.secret_values.len());
    assert!(
        swapped
            .secret_values
            .iter()
            .all(|v| v.as_slice() == SWAP_SECRET),
        "a handle swapped for another value"
    );
    if let Some(h) = &swapped.headers {
        for value in h.values() {
            assert!(
                handle::find_tokens(value.as_bytes()).next().is_none(),
                "a handle left in a swapped header"
            );
        }
    }
    if let Some(q) = &swapped.query {
        assert!(
            handle::find_tokens(q.as_bytes()).next().is_none(),
            "a handle left in a swapped query"
        );
    }
    let Ok(mut parts) = http::Request::builder()
        .uri(if valid_query {
            format!("/p?{}", query.as_deref().unwrap_or_default())
        } else {
            "/p".to_string()
        })
        .body(())
        .map(|r| r.into_parts().0)
    else {
        return;
    };
    if valid_query || swapped.query.is_none() {
        assert!(
            swapped.apply(&mut parts).is_ok(),
            "a swapped request is no longer a valid request"
        );
    }
}

/// The control protocol decoder. Invariant: a decoded request encodes to a line that decodes
/// to the same request.
pub fn control(data: &[u8]) {
    let Ok(request) = decode_line::<Request>(data) else {
        return;
    };
    let Ok(line) = encode_line(&request) else {
        panic!("a decoded request does not encode");
    };
    assert!(line.ends_with(b"\n") && !line[..line.len() - 1].contains(&b'\n'));
    match decode_line::<Request>(&line) {
        Ok(again) => assert!(again == request, "a request changes through a round trip"),
        Err(e) => panic!("an encoded request does not decode: {e}"),
    }
}
