//! Response scrubbing: replacing injected secret values in what an upstream sends back, so an API
//! that echoes the request (a debug endpoint, an error message quoting the header) cannot hand
//! the agent the credential (ARCHITECTURE invariant 1).
//!
//! [`Needles`] is the set of byte strings to replace, built once per request from the secret
//! values injected into it. [`Scrubber`] applies it to a body streamed in chunks of any size:
//! every occurrence is replaced by [`PLACEHOLDER`], including one split across chunks. Only the
//! bytes that could still become a match are held back: the longest tail of what arrived that
//! is a proper prefix of some needle (at most `max_len - 1` bytes). A chunk that ends in a byte
//! no needle continues with (an SSE event's `\n\n`, a JSON brace) goes out whole at once, so
//! streams flow. Matching is leftmost-longest, identical to a one-shot replacement of the whole
//! body.
//!
//! What is covered, per secret value `S`:
//! - `S` itself, anywhere in headers or body (JSON strings hold plain ASCII unchanged);
//! - `S` JSON-escaped, when that differs (`"` `\` control characters, and `/` as `\/`);
//! - `S` percent-encoded, when that differs (upper- and lowercase hex);
//! - for `S` of at least [`MIN_ENCODED_LEN`] bytes, `S` in base64, standard and URL-safe
//!   alphabets, with or without padding, and also when it sits at any offset inside a longer
//!   base64 text (e.g. a base64 echo of the whole `Authorization` header).
//!
//! Not covered here: compressed bodies (the proxy asks for `identity` whenever it injected and
//! decodes what comes compressed anyway before it gets here, see `proxy::decode`), hex or other
//! encodings, a secret split or transformed by the
//! upstream (a prefix, reversed, case-changed, HTML entities), and encryption inside the body.
//!
//! Pure and synchronous; no I/O.

use std::sync::Arc;

use data_encoding::{BASE64_NOPAD, BASE64URL_NOPAD, Encoding};
use zeroize::Zeroizing;

use agent_broker_core::{
    inject::reserve_zeroizing,
    percent::{self, HexCase},
};

/// What a secret value is replaced with.
pub const PLACEHOLDER: &[u8] = b"[redacted by agent-broker]";

/// Secrets shorter than this are not also searched for in base64: the encoded core of a very
/// short value is short enough to match unrelated base64 text.
pub const MIN_ENCODED_LEN: usize = 8;

/// The byte strings to replace. Cheap to clone (shared).
#[derive(Clone, Default)]
pub struct Needles {
    inner: Arc<NeedleSet>,
}

#[derive(Default)]
struct NeedleSet {
    /// Non-empty, distinct.
    needles: Vec<Zeroizing<Vec<u8>>>,
    max_len: usize,
}

impl Needles {
    /// The needles for a set of secret values: each value and its encodings (see the module
    /// documentation for which).
    pub fn new(secrets: Vec<Zeroizing<Vec<u8>>>) -> Self {
        let mut all = Vec::with_capacity(secrets.len() * 10);
        for secret in secrets {
            if secret.is_empty() {
                continue;
            }
            all.extend(encoded_forms(&secret));
            all.push(secret);
        }
        Self::exact(all)
    }

    /// Exactly these byte strings, no encodings added (empty ones are dropped).
    pub fn exact(needles: Vec<Zeroizing<Vec<u8>>>) -> Self {
        let mut unique: Vec<Zeroizing<Vec<u8>>> = Vec::with_capacity(needles.len());
        for n in needles {
            if !n.is_empty() && !unique.iter().any(|u| **u == *n) {
                unique.push(n);
            }
        }
        let max_len = unique.iter().map(|n| n.len()).max().unwrap_or(0);
        Self {
            inner: Arc::new(NeedleSet {
                needles: unique,
                max_len,
            }),
        }
    }

    /// Whether there is nothing to replace.
    pub fn is_empty(&self) -> bool {
        self.inner.needles.is_empty()
    }

    /// Number of distinct needles, encodings included.
    pub fn len(&self) -> usize {
        self.inner.needles.len()
    }

    /// Length of the longest needle: a streaming scrubber holds back at most one less.
    pub fn max_len(&self) -> usize {
        self.inner.max_len
    }

    /// Replaces every needle in `haystack`; `None` when there was nothing to replace.
    pub fn scrub(&self, haystack: &[u8]) -> Option<Vec<u8>> {
        if self.is_empty() {
            return None;
        }
        let mut out = Vec::new();
        let (rest, replaced) = self.inner.scan(haystack, haystack.len(), &mut out);
        debug_assert_eq!(rest, haystack.len());
        replaced.then_some(out)
    }

    /// A response header value with every needle replaced, or `None` when it holds none. The
    /// result is a valid header value whenever the input was (the placeholder is visible ASCII).
    pub fn scrub_header_value(&self, value: &[u8]) -> Option<Vec<u8>> {
        self.scrub(value)
    }

    /// A streaming scrubber over these needles.
    pub fn scrubber(&self) -> Scrubber {
        Scrubber {
            needles: self.clone(),
            held: Zeroizing::new(Vec::new()),
        }
    }
}

impl std::fmt::Debug for Needles {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "Needles(<redacted, {} needles, longest {} bytes>)",
            self.len(),
            self.max_len()
        )
    }
}

impl NeedleSet {
    /// Where the undecided tail of `buf` starts: the longest suffix that is a proper prefix of
    /// some needle (it may still grow into a match, or into a longer one); `buf.len()` when no
    /// suffix is. Every position before it is decided: each needle there either matches whole
    /// or cannot match, since a longer suffix than `max_len - 1` bytes is no proper prefix.
    fn undecided_from(&self, buf: &[u8]) -> usize {
        let earliest = buf.len().saturating_sub(self.max_len.saturating_sub(1));
        (earliest..buf.len())
            .find(|&start| {
                let tail = &buf[start..];
                self.needles
                    .iter()
                    .any(|n| n.len() > tail.len() && n.starts_with(tail))
            })
            .unwrap_or(buf.len())
    }

    /// Replaces, leftmost-longest, every match that starts before `safe` (each is complete and
    /// decided in `buf` when `safe` is at most [`NeedleSet::undecided_from`]), appending the
    /// result to `out` up to the
    /// resume position it returns, and whether anything was replaced. The caller keeps
    /// `buf[resume..]` for the next round; no match starts in between.
    fn scan(&self, buf: &[u8], safe: usize, out: &mut Vec<u8>) -> (usize, bool) {
        let find = |needle: &[u8], from: usize| {
            buf.get(from..)
                // Most header values and many chunks are shorter than a secret.
                .filter(|rest| rest.len() >= needle.len())
                .and_then(|rest| memchr::memmem::find(rest, needle))
                .map(|p| p + from)
        };
        let mut next: Vec<Option<usize>> = self.needles.iter().map(|n| find(n, 0)).collect();
        let mut cursor = 0;
        let mut replaced = false;
        loop {
            // Leftmost start, then longest needle.
            let best = next
                .iter()
                .zip(&self.needles)
                .filter_map(|(pos, n)| pos.map(|p| (p, n.len())))
                .min_by(|a, b| a.0.cmp(&b.0).then(b.1.cmp(&a.1)));
            let Some((start, len)) = best.filter(|&(start, _)| start < safe) else {
                break;
            };
            out.extend_from_slice(&buf[cursor..start]);
            out.extend_from_slice(PLACEHOLDER);
            replaced = true;
            cursor = start + len;
            for (pos, needle) in next.iter_mut().zip(&self.needles) {
                if pos.is_some_and(|p| p < cursor) {
                    *pos = find(needle, cursor);
                }
            }
        }
        let resume = cursor.max(safe).min(buf.len());
        if resume > cursor {
            out.extend_from_slice(&buf[cursor..resume]);
        }
        (resume, replaced)
    }
}

/// Scrubs one response body delivered in chunks.
pub struct Scrubber {
    needles: Needles,
    /// The tail that could still be the start of a match. May hold part of a secret.
    held: Zeroizing<Vec<u8>>,
}

impl Scrubber {
    /// A scrubber for these secret values (their encodings are added, see [`Needles::new`]).
    #[cfg(test)]
    pub fn new(secrets: Vec<Zeroizing<Vec<u8>>>) -> Self {
        Needles::new(secrets).scrubber()
    }

    /// The needles this scrubber replaces.
    pub fn needles(&self) -> &Needles {
        &self.needles
    }

    /// A header value with every needle replaced, or `None` when it holds none (does not touch
    /// the body state).
    #[cfg(test)]
    pub fn scrub_header_value(&self, value: &[u8]) -> Option<Vec<u8>> {
        self.needles.scrub_header_value(value)
    }

    /// Feeds the next chunk; returns every byte that can no longer be part of a match (possibly
    /// none, when the whole chunk might still start one).
    pub fn push(&mut self, chunk: &[u8]) -> Vec<u8> {
        let set = &self.needles.inner;
        if set.needles.is_empty() {
            return chunk.to_vec();
        }
        let mut out = Vec::with_capacity(self.held.len() + chunk.len());
        if self.held.is_empty() {
            let safe = set.undecided_from(chunk);
            let (resume, _) = set.scan(chunk, safe, &mut out);
            self.held.extend_from_slice(&chunk[resume..]);
        } else {
            let mut buf = std::mem::take(&mut self.held);
            reserve_zeroizing(&mut buf, chunk.len());
            buf.extend_from_slice(chunk);
            let safe = set.undecided_from(&buf);
            let (resume, _) = set.scan(&buf, safe, &mut out);
            self.held.extend_from_slice(&buf[resume..]);
        }
        out
    }

    /// Ends the body: returns the held-back tail, scrubbed.
    pub fn finish(mut self) -> Vec<u8> {
        let held = std::mem::take(&mut self.held);
        let set = &self.needles.inner;
        let mut out = Vec::with_capacity(held.len());
        set.scan(&held, held.len(), &mut out);
        out
    }

    /// Bytes currently held back (at most `max_len - 1`).
    #[cfg(test)]
    pub fn held_len(&self) -> usize {
        self.held.len()
    }
}

/// The encoded forms of one secret that an echoing upstream may return, excluding the secret
/// itself.
fn encoded_forms(secret: &[u8]) -> Vec<Zeroizing<Vec<u8>>> {
    let mut forms = Vec::new();
    // Built once per request: skip the encodings that would equal the value itself (the usual
    // case for API keys, which are plain ASCII letters, digits and `-_`).
    let json_special = |b: &u8| *b < 0x20 || matches!(b, b'"' | b'\\' | b'/');
    if secret.iter().any(json_special) {
        for escape_slash in [false, true] {
            forms.push(json_escaped(secret, escape_slash));
        }
    }
    if !secret.iter().all(|&b| percent::is_unreserved(b)) {
        for case in [HexCase::Upper, HexCase::Lower] {
            let mut encoded = Zeroizing::new(Vec::new());
            percent::encode_into(secret, &mut encoded, case);
            forms.push(encoded);
        }
    }
    if secret.len() >= MIN_ENCODED_LEN {
        // Two zero bytes, then the secret: the input for offset k starts 2 - k bytes in.
        let mut padded = Zeroizing::new(Vec::new());
        reserve_zeroizing(&mut padded, secret.len() + 2);
        padded.extend_from_slice(&[0, 0]);
        padded.extend_from_slice(secret);
        for encoding in [&BASE64_NOPAD, &BASE64URL_NOPAD] {
            for offset in 0..3 {
                forms.push(base64_core(encoding, &padded[2 - offset..], offset));
            }
        }
    }
    forms.retain(|f| **f != *secret);
    forms
}

/// The base64 characters that depend only on the secret when it starts `offset` bytes into a
/// 3-byte group of a longer base64 text: the same characters appear in every encoding of any
/// text that contains the secret at such a position. `input` is `offset` zero bytes, then the
/// secret.
fn base64_core(encoding: &Encoding, input: &[u8], offset: usize) -> Zeroizing<Vec<u8>> {
    let secret_len = input.len() - offset;
    let mut encoded = Zeroizing::new(vec![0u8; encoding.encode_len(input.len())]);
    encoding.encode_mut(input, &mut encoded);
    // Character i covers bits [6i, 6i + 6); keep those inside the secret's bits.
    let first = (8 * offset).div_ceil(6);
    let end = ((8 * (offset + secret_len)) / 6).min(encoded.len());
    if first >= end {
        encoded.clear();
        return encoded;
    }
    // In place: the discarded characters are overwritten or cut off, never left behind.
    encoded.copy_within(first..end, 0);
    encoded.truncate(end - first);
    encoded
}

fn json_escaped(secret: &[u8], escape_slash: bool) -> Zeroizing<Vec<u8>> {
    let mut out = Zeroizing::new(Vec::with_capacity(secret.len() * 2));
    for &b in secret {
        match b {
            b'"' => out.extend_from_slice(b"\\\""),
            b'\\' => out.extend_from_slice(b"\\\\"),
            b'/' if escape_slash => out.extend_from_slice(b"\\/"),
            0x08 => out.extend_from_slice(b"\\b"),
            0x0c => out.extend_from_slice(b"\\f"),
            b'\t' => out.extend_from_slice(b"\\t"),
            b if b < 0x20 => {
                out.extend_from_slice(b"\\u00");
                out.push(HexCase::Lower.digit(b >> 4));
                out.push(HexCase::Lower.digit(b & 0xf));
            }
            b => out.push(b),
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use data_encoding::{BASE64, BASE64URL};

    use super::*;

    fn z(s: &[u8]) -> Zeroizing<Vec<u8>> {
        Zeroizing::new(s.to_vec())
    }

    /// A small deterministic generator (xorshift64*), so failures reproduce.
    struct Rng(u64);
    impl Rng {
        fn next(&mut self) -> u64 {
            self.0 ^= self.0 >> 12;
            self.0 ^= self.0 << 25;
            self.0 ^= self.0 >> 27;
            self.0.wrapping_mul(0x2545_f491_4f6c_dd1d)
        }
        fn below(&mut self, n: usize) -> usize {
            (self.next() % n as u64) as usize
        }
    }

    /// Reference: at each position the longest needle that matches there, else copy a byte.
    fn naive(haystack: &[u8], needles: &[Vec<u8>]) -> Vec<u8> {
        let mut out = Vec::new();
        let mut i = 0;
        while i < haystack.len() {
            let best = needles
                .iter()
                .filter(|n| !n.is_empty() && haystack[i..].starts_with(n))
                .map(Vec::len)
                .max();
            match best {
                Some(len) => {
                    out.extend_from_slice(PLACEHOLDER);
                    i += len;
                }
                None => {
                    out.push(haystack[i]);
                    i += 1;
                }
            }
        }
        out
    }

    fn stream(needles: &Needles, haystack: &[u8], cuts: &[usize]) -> Vec<u8> {
        let mut s = needles.scrubber();
        let mut out = Vec::new();
        let mut last = 0;
        for &cut in cuts {
            out.extend(s.push(&haystack[last..cut]));
            assert!(s.held_len() < needles.max_len().max(1), "held too much");
            last = cut;
        }
        out.extend(s.push(&haystack[last..]));
        out.extend(s.finish());
        out
    }

    fn contains(haystack: &[u8], needle: &[u8]) -> bool {
        memchr::memmem::find(haystack, needle).is_some()
    }

    #[test]
    fn only_a_tail_that_may_still_match_is_held_back() {
        let needles = Needles::exact(vec![z(b"sk-secret-value"), z(b"other")]);
        let mut s = needles.scrubber();
        // An SSE event ends in bytes no needle continues with: it goes out whole, at once.
        let event = b"data: {\"token\":\"hi\"}\n\n";
        assert_eq!(s.push(event), event);
        assert_eq!(s.held_len(), 0);
        // A tail that starts a needle waits; the rest of the chunk goes.
        assert_eq!(s.push(b"data: sk-sec"), b"data: ");
        assert_eq!(s.held_len(), 6);
        // It turns out not to be the secret: released as soon as that is known.
        assert_eq!(s.push(b"x\n\n"), b"sk-secx\n\n");
        assert_eq!(s.held_len(), 0);
        // A whole needle that a longer one continues waits for the next byte to decide.
        let needles = Needles::exact(vec![z(b"abc"), z(b"abcdef")]);
        let mut s = needles.scrubber();
        assert_eq!(s.push(b"x abc"), b"x ");
        assert_eq!(s.push(b"!"), [PLACEHOLDER, b"!"].concat());
        assert_eq!(s.push(b"abcde"), b"");
        assert_eq!(s.push(b"f."), [PLACEHOLDER, b"."].concat());
    }

    #[test]
    fn replaces_in_one_chunk_and_across_chunks() {
        let needles = Needles::exact(vec![z(b"sk-secret")]);
        let body = b"{\"auth\":\"Bearer sk-secret\",\"again\":\"sk-secret\"}";
        let want = b"{\"auth\":\"Bearer [redacted by agent-broker]\",\"again\":\"[redacted by agent-broker]\"}";
        assert_eq!(needles.scrub(body).as_deref(), Some(&want[..]));
        for cut in 0..=body.len() {
            assert_eq!(stream(&needles, body, &[cut]), want, "cut at {cut}");
        }
        let bytewise: Vec<usize> = (1..body.len()).collect();
        assert_eq!(stream(&needles, body, &bytewise), want);
    }

    #[test]
    fn holds_back_only_a_possible_prefix() {
        let mut s = Needles::exact(vec![z(b"abcdef")]).scrubber();
        // No tail of these starts the needle: nothing waits.
        assert_eq!(s.push(b"hello world"), b"hello world");
        assert_eq!(s.held_len(), 0);
        assert_eq!(s.push(b"!"), b"!");
        assert_eq!(s.finish(), b"");
        let mut s = Needles::exact(vec![z(b"abcdef")]).scrubber();
        assert_eq!(s.push(b"xxabc"), b"xx");
        assert_eq!(s.held_len(), 3);
        assert_eq!(s.push(b"def tail"), b"[redacted by agent-broker] tail");
        assert_eq!(s.finish(), b"");
        let mut s = Needles::exact(vec![z(b"abcdef")]).scrubber();
        assert_eq!(s.push(b"ab"), b"");
        assert_eq!(s.finish(), b"ab");
    }

    #[test]
    fn no_needles_passes_through() {
        let mut s = Scrubber::new(vec![z(b"")]);
        assert!(s.needles().is_empty());
        assert_eq!(s.push(b"abc"), b"abc");
        assert_eq!(s.finish(), b"");
        assert_eq!(Needles::default().scrub(b"abc"), None);
    }

    #[test]
    fn overlapping_and_prefix_needles_are_leftmost_longest() {
        let needles = Needles::exact(vec![z(b"abc"), z(b"abcde"), z(b"cdx"), z(b"e")]);
        let raw: Vec<Vec<u8>> = vec![
            b"abc".to_vec(),
            b"abcde".to_vec(),
            b"cdx".to_vec(),
            b"e".to_vec(),
        ];
        for hay in [&b"abcdex"[..], b"abcdx", b"xabcdxe", b"ababcde", b"eeabce"] {
            let want = naive(hay, &raw);
            assert_eq!(needles.scrub(hay).unwrap_or_else(|| hay.to_vec()), want);
            for cut in 0..=hay.len() {
                assert_eq!(stream(&needles, hay, &[cut]), want);
            }
        }
    }

    /// Property: for random needles, haystacks with needles planted in them, and random splits,
    /// the streamed output equals the one-shot output and the reference, and holds no needle.
    #[test]
    fn random_splits_match_one_shot_replacement() {
        let mut rng = Rng(0x9e37_79b9_7f4a_7c15);
        for round in 0..3000 {
            // A tiny alphabet disjoint from the placeholder's bytes makes overlaps common and
            // keeps replacements from forming needles with their neighbours.
            let alphabet: &[u8] = &[0, 1, 2, 3];
            let needle_count = 1 + rng.below(4);
            let needles: Vec<Vec<u8>> = (0..needle_count)
                .map(|_| {
                    let len = 1 + rng.below(8);
                    (0..len).map(|_| alphabet[rng.below(3)]).collect()
                })
                .collect();
            let mut haystack = Vec::new();
            let len = rng.below(200);
            while haystack.len() < len {
                if rng.below(5) == 0 {
                    haystack.extend_from_slice(&needles[rng.below(needle_count)]);
                } else {
                    haystack.push(alphabet[rng.below(alphabet.len())]);
                }
            }
            let mut cuts: Vec<usize> = (0..rng.below(12))
                .map(|_| rng.below(haystack.len() + 1))
                .collect();
            cuts.sort_unstable();

            let set = Needles::exact(needles.iter().map(|n| z(n)).collect());
            let want = naive(&haystack, &needles);
            let one_shot = set.scrub(&haystack).unwrap_or_else(|| haystack.clone());
            let streamed = stream(&set, &haystack, &cuts);
            assert_eq!(
                one_shot, want,
                "round {round}: one-shot differs from reference"
            );
            assert_eq!(streamed, want, "round {round}: cuts {cuts:?}");
            for n in &needles {
                assert!(!contains(&streamed, n), "round {round}: a needle survived");
            }
        }
    }

    #[test]
    fn realistic_secret_in_random_chunks() {
        let secret = b"sk-live-4f9a2b7c1d8e3f6a0b5c9d2e7f1a4b8c";
        let mut rng = Rng(42);
        let mut body = Vec::new();
        for i in 0..200 {
            body.extend_from_slice(format!("line {i} ").as_bytes());
            if i % 37 == 0 {
                body.extend_from_slice(secret);
            }
        }
        let set = Needles::new(vec![z(secret)]);
        for _ in 0..200 {
            let mut cuts: Vec<usize> = (0..rng.below(40))
                .map(|_| rng.below(body.len() + 1))
                .collect();
            cuts.sort_unstable();
            let out = stream(&set, &body, &cuts);
            assert!(!contains(&out, secret));
            assert_eq!(
                out.len(),
                body.len() - 6 * (secret.len() - PLACEHOLDER.len())
            );
        }
    }

    #[test]
    fn base64_forms_are_scrubbed_at_any_alignment() {
        let secret = b"sk-test-0123456789?>?>~~"; // `?>` and `~~` produce `+` and `/` in base64
        let set = Needles::new(vec![z(secret)]);
        for encoding in [&BASE64, &BASE64URL, &BASE64_NOPAD, &BASE64URL_NOPAD] {
            for prefix in ["", "a", "ab", "Authorization: Bearer "] {
                for suffix in ["", "x", "xy", "\r\n"] {
                    let mut plain = prefix.as_bytes().to_vec();
                    plain.extend_from_slice(secret);
                    plain.extend_from_slice(suffix.as_bytes());
                    let echoed = encoding.encode(&plain);
                    let out = set.scrub(echoed.as_bytes()).expect("found");
                    // Decoding what is left can no longer yield the secret.
                    assert!(!contains(&out, secret));
                    assert!(contains(&out, PLACEHOLDER));
                    let exact_b64 = BASE64_NOPAD.encode(secret);
                    assert!(!contains(&out, exact_b64.as_bytes()));
                }
            }
        }
    }

    #[test]
    fn short_secrets_skip_base64_but_keep_raw() {
        let set = Needles::new(vec![z(b"short")]);
        assert_eq!(set.len(), 1);
        assert_eq!(
            set.scrub(b"a short b").as_deref(),
            Some(&b"a [redacted by agent-broker] b"[..])
        );
        assert_eq!(set.scrub(BASE64.encode(b"short").as_bytes()), None);
    }

    #[test]
    fn json_and_percent_forms() {
        let secret = br#"pa"ss/wo\rd+1"#;
        let set = Needles::new(vec![z(secret)]);
        for form in [
            &br#"pa\"ss/wo\\rd+1"#[..],
            br#"pa\"ss\/wo\\rd+1"#,
            b"pa%22ss%2Fwo%5Crd%2B1",
            b"pa%22ss%2fwo%5crd%2b1",
        ] {
            let mut body = b"{\"echo\":\"".to_vec();
            body.extend_from_slice(form);
            body.extend_from_slice(b"\"}");
            let out = set.scrub(&body).expect("found");
            assert_eq!(out, b"{\"echo\":\"[redacted by agent-broker]\"}");
        }
        // Plain ASCII secrets have no distinct JSON or percent form.
        assert_eq!(Needles::new(vec![z(b"abc")]).len(), 1);
    }

    #[test]
    fn header_values() {
        let s = Scrubber::new(vec![z(b"sk-secret-value")]);
        assert_eq!(
            s.scrub_header_value(b"Bearer sk-secret-value").as_deref(),
            Some(&b"Bearer [redacted by agent-broker]"[..])
        );
        assert_eq!(s.scrub_header_value(b"text/plain"), None);
        let shown = format!("{:?}", s.needles());
        assert!(!shown.contains("sk-secret"), "{shown}");
    }

    #[test]
    fn base64_core_bounds() {
        // 3 bytes at offset 0 -> 4 characters, all secret-only.
        assert_eq!(&base64_core(&BASE64_NOPAD, b"abc", 0)[..], b"YWJj");
        // At offset 1 the first character mixes in the prefix byte and is dropped.
        let core = base64_core(&BASE64_NOPAD, b"\0abcdef", 1);
        let full = BASE64_NOPAD.encode(b"\0abcdef");
        assert!(full.contains(std::str::from_utf8(&core).expect("ascii")));
        assert_eq!(core.len(), (8 * 7) / 6 - 2);
    }
}
