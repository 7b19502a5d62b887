//! Response scrubbing: replacing secret values in what an upstream sends back, so an API that
//! echoes the request (a debug endpoint, an error message quoting the header) or stored it for a
//! later request cannot hand the agent the credential (ARCHITECTURE invariant 1).
//!
//! [`Needles`] is the set of byte strings to replace, built from secret values: the values and
//! their encodings, precomputed once per agent policy and vault generation (the broker caches
//! it), so a response is scanned once whatever the number of secrets and forms. The needles
//! without a line break (a few per secret) are found by a SIMD multi-pattern search (Teddy, from
//! the aho-corasick crate, leftmost-longest; an Aho-Corasick automaton past 64 needles). The
//! line-wrapped base64 forms (hundreds per secret) have an automaton of their own, run only on
//! text that has a line break with the bytes around it that one of them has around its first
//! break: base64 text in lines, which they resemble, would otherwise cost an automaton step per
//! byte. [`Scrubber`] applies the needles to a body streamed in chunks of any size: every
//! occurrence is replaced by [`PLACEHOLDER`], including one split across chunks. Only the bytes
//! that could still become a match are held back: the longest tail of what arrived that is a
//! proper prefix of some needle (at most `max_len - 1` bytes). A chunk that ends in a byte no
//! needle continues with (an SSE event's `\n\n`, a JSON brace) goes out whole at once, so
//! streams flow. A chunk in which nothing is replaced passes on uncopied (a slice of it).
//! Matching is leftmost-longest, identical to a one-shot replacement of the whole body.
//!
//! What is covered, per secret value `S`:
//! - `S` itself, anywhere in header values, the reason phrase, the body and trailers, and in
//!   header names regardless of ASCII case (a header whose name holds a needle is dropped);
//! - `S` JSON-escaped, when that differs: the minimal escaping (`"` `\` control characters,
//!   with and without `/` as `\/`), with `<` `>` `&` as `\u003c`-style escapes (Go), with
//!   non-ASCII escaped (Python's `ensure_ascii`), and every character as `\uXXXX` (lower- and
//!   uppercase hex);
//! - `S` percent-encoded, when that differs (upper- and lowercase hex);
//! - `S` HTML-escaped, when it holds `&` `<` `>` `"` or `'` (the escapes of Python's
//!   `html.escape`, Go's `html.EscapeString`, PHP's `htmlspecialchars` and `&`/`<`/`>` only);
//! - for `S` of at least [`MIN_ENCODED_LEN`] bytes: `S` in hex (lower- and uppercase); `S` in
//!   base64, standard and URL-safe alphabets, with or without padding, also when it sits at any
//!   offset inside a longer base64 text (e.g. a base64 echo of the whole `Authorization`
//!   header); and that standard base64 text wrapped in MIME lines of 76 or 64 characters with
//!   CRLF or LF line ends, wherever the breaks fall.
//!
//! Not covered here: compressed bodies (the proxy asks for `identity` and decodes what comes
//! compressed anyway before it gets here, see `proxy::decode`), other encodings (hex with
//! separators or mixed case, base32, HTML numeric entities for ordinary characters such as
//! `&#115;`, other line widths), a secret split or transformed by the upstream (a prefix, split
//! across two responses or WebSocket messages, reversed, case-changed in a body), and encryption
//! inside the body. The automaton's tables hold the needles and are not zeroized when dropped
//! (brokerd's memory is locked and not dumpable).
//!
//! Pure and synchronous; no I/O.

use std::sync::{
    Arc, OnceLock,
    atomic::{AtomicU64, Ordering},
};

use aho_corasick::{AhoCorasick, AhoCorasickKind, Input, Match, MatchKind, Span, packed};
use bytes::Bytes;
use data_encoding::{BASE64_NOPAD, BASE64URL_NOPAD, Encoding, HEXLOWER, HEXUPPER};
use zeroize::{Zeroize as _, Zeroizing};

use agent_broker_core::{
    inject::reserve_zeroizing,
    percent::{self, HexCase},
};

/// What a secret value is replaced with.
pub const PLACEHOLDER: &[u8] = b"[redacted by agent-broker]";

/// Secrets shorter than this are not also searched for in base64 or hex: the encoded core of a
/// very short value is short enough to match unrelated text.
pub const MIN_ENCODED_LEN: usize = 8;

/// The line widths of MIME (76) and PEM (64) base64.
const MIME_WIDTHS: [usize; 2] = [76, 64];

/// Why a set of needles could not be built (only absurdly many or long secrets fail).
#[derive(Debug, thiserror::Error)]
#[error("cannot build the response scrubber for {needles} needles: {source}")]
pub struct NeedlesError {
    needles: usize,
    #[source]
    source: aho_corasick::BuildError,
}

/// The byte strings to replace. Cheap to clone (shared).
#[derive(Clone, Default)]
pub struct Needles {
    inner: Arc<NeedleSet>,
}

#[derive(Default)]
struct NeedleSet {
    /// The secret values the needles were made from, distinct (for [`Needles::with_extra`]).
    secrets: Vec<Zeroizing<Vec<u8>>>,
    /// Non-empty, distinct, sorted (for the prefix lookup of [`NeedleSet::undecided_from`]).
    needles: Vec<Zeroizing<Vec<u8>>>,
    /// Whether some needle starts with the byte.
    first: FirstBytes,
    max_len: usize,
    /// The shortest needle.
    min_len: usize,
    /// Leftmost-longest over the needles without a line break; `None` when there are none.
    plain: Option<Plain>,
    /// Leftmost-longest over the line-wrapped (MIME) forms, hundreds per secret: searched only
    /// in text where [`NeedleSet::breaks`] finds a line break that one of them could hold.
    wrapped: Option<AhoCorasick>,
    /// What the wrapped needles show around their first line break.
    breaks: BreakContexts,
    /// The unwrapped needles, ignoring ASCII case, for header names; built when first needed.
    names: OnceLock<Option<AhoCorasick>>,
}

/// A 256-bit set of bytes.
#[derive(Default)]
struct FirstBytes([u64; 4]);

impl FirstBytes {
    fn insert(&mut self, b: u8) {
        self.0[usize::from(b >> 6)] |= 1 << (b & 63);
    }

    fn contains(&self, b: u8) -> bool {
        self.0[usize::from(b >> 6)] & (1 << (b & 63)) != 0
    }
}

impl Needles {
    /// The needles for a set of secret values: each value and its encodings (see the module
    /// documentation for which).
    pub fn new(secrets: Vec<Zeroizing<Vec<u8>>>) -> Result<Self, NeedlesError> {
        let mut distinct: Vec<Zeroizing<Vec<u8>>> = Vec::with_capacity(secrets.len());
        for secret in secrets {
            if !secret.is_empty() && !distinct.iter().any(|d| **d == *secret) {
                distinct.push(secret);
            }
        }
        let mut all = Vec::with_capacity(distinct.len() * 16);
        for secret in &distinct {
            all.extend(encoded_forms(secret));
            all.push(secret.clone());
        }
        Self::build(distinct, all)
    }

    /// Exactly these byte strings, no encodings added (empty ones are dropped).
    #[cfg(test)]
    pub fn exact(needles: Vec<Zeroizing<Vec<u8>>>) -> Result<Self, NeedlesError> {
        Self::build(needles.clone(), needles)
    }

    fn build(
        secrets: Vec<Zeroizing<Vec<u8>>>,
        needles: Vec<Zeroizing<Vec<u8>>>,
    ) -> Result<Self, NeedlesError> {
        let mut needles: Vec<Zeroizing<Vec<u8>>> =
            needles.into_iter().filter(|n| !n.is_empty()).collect();
        needles.sort_unstable_by(|a, b| a.as_slice().cmp(b.as_slice()));
        needles.dedup_by(|a, b| **a == **b);
        let max_len = needles.iter().map(|n| n.len()).max().unwrap_or(0);
        let min_len = needles.iter().map(|n| n.len()).min().unwrap_or(0);
        let mut first = FirstBytes::default();
        for n in &needles {
            first.insert(n[0]);
        }
        type Refs<'a> = Vec<&'a Zeroizing<Vec<u8>>>;
        let (wrapped, plain): (Refs<'_>, Refs<'_>) =
            needles.iter().partition(|n| n.contains(&b'\n'));
        let breaks = BreakContexts::of(&wrapped);
        let wrapped = (!wrapped.is_empty())
            .then(|| automaton(&wrapped, false, true))
            .transpose()?;
        let plain = (!plain.is_empty())
            .then(|| Plain::new(&plain))
            .transpose()?;
        Ok(Self {
            inner: Arc::new(NeedleSet {
                secrets,
                needles,
                first,
                max_len,
                min_len,
                plain,
                wrapped,
                breaks,
                names: OnceLock::new(),
            }),
        })
    }

    /// Whether every value of `extra` is one of the secrets these needles were made from.
    pub fn covers(&self, extra: &[Zeroizing<Vec<u8>>]) -> bool {
        extra
            .iter()
            .all(|s| s.is_empty() || self.inner.secrets.iter().any(|k| **k == **s))
    }

    /// These needles and those of `extra` secret values: `self` again (no new automaton) when
    /// it [covers](Needles::covers) them.
    pub fn with_extra(&self, extra: &[Zeroizing<Vec<u8>>]) -> Result<Self, NeedlesError> {
        if self.covers(extra) {
            return Ok(self.clone());
        }
        let mut secrets = self.inner.secrets.clone();
        secrets.extend(extra.iter().cloned());
        Self::new(secrets)
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
        let (rest, replaced) = self.inner.scan(haystack, 0, haystack.len(), &mut out);
        debug_assert_eq!(rest, haystack.len());
        (replaced > 0).then_some(out)
    }

    /// A response header value with every needle replaced, or `None` when it holds none. The
    /// result is a valid header value whenever the input was (the placeholder is visible ASCII).
    pub fn scrub_header_value(&self, value: &[u8]) -> Option<Vec<u8>> {
        self.scrub(value)
    }

    /// Whether a header name holds a needle, in any ASCII case (names arrive lowercased).
    pub fn in_header_name(&self, name: &[u8]) -> bool {
        let Some(automaton) = self.inner.names.get_or_init(|| {
            // Names hold no line break. Built from needles that built case-sensitively
            // already: cannot fail for size.
            let plain: Vec<&Zeroizing<Vec<u8>>> = self
                .inner
                .needles
                .iter()
                .filter(|n| !n.contains(&b'\n'))
                .collect();
            (!plain.is_empty())
                .then(|| automaton(&plain, true, false).ok())
                .flatten()
        }) else {
            // No automaton: no needles, or (never seen) one that could not be built, in which
            // case a plain search decides.
            return self.inner.needles.iter().any(|n| {
                name.len() >= n.len()
                    && name
                        .windows(n.len())
                        .any(|w| w.eq_ignore_ascii_case(n.as_slice()))
            });
        };
        automaton.is_match(name)
    }

    /// A streaming scrubber over these needles.
    pub fn scrubber(&self) -> Scrubber {
        Scrubber {
            needles: self.clone(),
            held: Zeroizing::new(Vec::new()),
            redactions: None,
        }
    }
}

/// The searcher of the needles without a line break: a few per secret (the value, its hex,
/// base64 and escaped forms).
enum Plain {
    /// Teddy (SIMD, up to 64 needles): several GB/s on text, where the automaton walks every
    /// byte at a few hundred MB/s.
    Packed(packed::Searcher),
    /// More needles than Teddy takes, or a CPU without its instructions.
    Automaton(AhoCorasick),
}

impl Plain {
    fn new(needles: &[&Zeroizing<Vec<u8>>]) -> Result<Self, NeedlesError> {
        let packed = packed::Config::new()
            .match_kind(packed::MatchKind::LeftmostLongest)
            .builder()
            .extend(needles.iter().map(|n| n.as_slice()))
            .build();
        match packed {
            Some(searcher) => Ok(Self::Packed(searcher)),
            None => automaton(needles, false, false).map(Self::Automaton),
        }
    }

    /// The leftmost-longest match in `buf` that starts at `from` or later.
    fn find(&self, buf: &[u8], from: usize) -> Option<Match> {
        match self {
            Self::Packed(searcher) => searcher.find_in(buf, Span::from(from..buf.len())),
            Self::Automaton(automaton) => automaton.find(Input::new(buf).range(from..)),
        }
    }
}

/// Bytes of context kept on each side of a wrapped needle's first line break.
const BREAK_CONTEXT: usize = 3;
/// Bits of the table that rejects most line breaks with one load.
const BREAK_TABLE_BITS: u32 = 17;

/// The bytes each wrapped needle has around its first line break (up to [`BREAK_CONTEXT`]
/// each side), so a text whose line breaks show none of them is known to hold no wrapped
/// needle without running the automaton over it. A base64 text wrapped in lines (the very
/// thing the wrapped needles look like) would otherwise cost a walk of the automaton over
/// every byte.
#[derive(Default)]
struct BreakContexts {
    /// The (bytes before, bytes after) lengths that occur.
    shapes: Vec<(usize, usize)>,
    /// Every context, packed by [`break_key`], sorted.
    keys: Vec<u64>,
    /// One bit per [`break_slot`] of some key.
    table: Vec<u64>,
    /// One bit per (byte before, byte after) a first line break, when every needle has a byte
    /// on each side of it (the wrapped forms all have): most line breaks fail this one load.
    pairs: Option<Box<[u64; 1024]>>,
}

fn break_key(before: &[u8], after: &[u8]) -> u64 {
    let mut key = ((before.len() as u64) << 60) | ((after.len() as u64) << 56);
    for (i, &b) in before.iter().chain(after).enumerate() {
        key |= u64::from(b) << (8 * i);
    }
    key
}

fn break_pair(before: u8, after: u8) -> usize {
    (usize::from(before) << 8) | usize::from(after)
}

fn break_slot(key: u64) -> usize {
    (key.wrapping_mul(0x9e37_79b9_7f4a_7c15) >> (64 - BREAK_TABLE_BITS)) as usize
}

impl BreakContexts {
    fn of(wrapped: &[&Zeroizing<Vec<u8>>]) -> Self {
        let mut contexts = Self::default();
        if wrapped.is_empty() {
            return contexts;
        }
        contexts.table = vec![0; (1 << BREAK_TABLE_BITS) / 64];
        let mut pairs = Box::new([0u64; 1024]);
        let mut every_needle_has_a_pair = true;
        for needle in wrapped {
            let Some(at) = memchr::memchr(b'\n', needle) else {
                continue;
            };
            let before = at.min(BREAK_CONTEXT);
            let after = (needle.len() - at - 1).min(BREAK_CONTEXT);
            let key = break_key(&needle[at - before..at], &needle[at + 1..at + 1 + after]);
            contexts.keys.push(key);
            let slot = break_slot(key);
            contexts.table[slot / 64] |= 1 << (slot % 64);
            if !contexts.shapes.contains(&(before, after)) {
                contexts.shapes.push((before, after));
            }
            if before == 0 || after == 0 {
                every_needle_has_a_pair = false;
            } else {
                let pair = break_pair(needle[at - 1], needle[at + 1]);
                pairs[pair / 64] |= 1 << (pair % 64);
            }
        }
        contexts.pairs = every_needle_has_a_pair.then_some(pairs);
        contexts.keys.sort_unstable();
        contexts.keys.dedup();
        contexts
    }

    /// Whether `buf` has a line break with the context of some wrapped needle's first one:
    /// false when no wrapped needle lies wholly inside `buf`.
    fn may_hold_one(&self, buf: &[u8]) -> bool {
        if self.keys.is_empty() {
            return false;
        }
        memchr::memchr_iter(b'\n', buf).any(|at| {
            if let Some(pairs) = &self.pairs {
                if at == 0 || at + 1 >= buf.len() {
                    return false;
                }
                let pair = break_pair(buf[at - 1], buf[at + 1]);
                if pairs[pair / 64] & (1 << (pair % 64)) == 0 {
                    return false;
                }
            }
            self.shapes.iter().any(|&(before, after)| {
                if at < before || at + 1 + after > buf.len() {
                    return false;
                }
                let key = break_key(&buf[at - before..at], &buf[at + 1..at + 1 + after]);
                let slot = break_slot(key);
                self.table[slot / 64] & (1 << (slot % 64)) != 0
                    && self.keys.binary_search(&key).is_ok()
            })
        })
    }
}

/// A leftmost-longest automaton (a contiguous NFA: compact, and as fast as a DFA here) over
/// `needles`, optionally ignoring ASCII case. A prefilter pays only for the line-wrapped forms
/// (every one holds a line break, a rare byte); base64 and hex cores start with the letters and
/// digits of ordinary text, where a prefilter's false candidates made a scan ten times slower.
fn automaton(
    needles: &[&Zeroizing<Vec<u8>>],
    ignore_case: bool,
    prefilter: bool,
) -> Result<AhoCorasick, NeedlesError> {
    AhoCorasick::builder()
        .match_kind(MatchKind::LeftmostLongest)
        .ascii_case_insensitive(ignore_case)
        .kind(Some(AhoCorasickKind::ContiguousNFA))
        .prefilter(prefilter)
        .build(needles.iter().map(|n| n.as_slice()))
        .map_err(|source| NeedlesError {
            needles: needles.len(),
            source,
        })
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
                // The needles are sorted: the first one greater than the tail starts with it
                // when any longer needle does.
                self.first.contains(tail[0]) && {
                    let i = self.needles.partition_point(|n| n.as_slice() <= tail);
                    self.needles.get(i).is_some_and(|n| n.starts_with(tail))
                }
            })
            .unwrap_or(buf.len())
    }

    /// The leftmost-longest match in `buf` that starts at `from` or later, of either kind.
    /// `wrapped` is whether wrapped needles may be in `buf` at all ([`BreakContexts`]).
    fn find(&self, buf: &[u8], from: usize, wrapped: bool) -> Option<Match> {
        let plain = self.plain.as_ref().and_then(|p| p.find(buf, from));
        let wrapped = self
            .wrapped
            .as_ref()
            .filter(|_| wrapped)
            .and_then(|a| a.find(Input::new(buf).range(from..)));
        // Leftmost start, then longest: the two sets of needles are disjoint.
        [plain, wrapped]
            .into_iter()
            .flatten()
            .min_by(|a, b| a.start().cmp(&b.start()).then(b.len().cmp(&a.len())))
    }

    /// Whether `buf` may hold a wrapped needle.
    fn may_hold_wrapped(&self, buf: &[u8]) -> bool {
        self.wrapped.is_some() && self.breaks.may_hold_one(buf)
    }

    /// Replaces, leftmost-longest, every match that starts in `from..safe` (each is complete
    /// and decided in `buf` when `safe` is at most [`NeedleSet::undecided_from`], and `from`
    /// is where an earlier scan of the same text stopped), appending the result from `from`
    /// to `out` up to the resume position it returns, and how many it replaced. The caller
    /// keeps `buf[resume..]` for the next round; no match starts in between.
    fn scan(&self, buf: &[u8], from: usize, safe: usize, out: &mut Vec<u8>) -> (usize, u64) {
        let mut cursor = from;
        let mut replaced = 0;
        // Most header values and many chunks are shorter than any needle.
        if buf.len() - from >= self.min_len {
            let wrapped = self.may_hold_wrapped(buf);
            while let Some(m) = self.find(buf, cursor, wrapped).filter(|m| m.start() < safe) {
                out.extend_from_slice(&buf[cursor..m.start()]);
                out.extend_from_slice(PLACEHOLDER);
                replaced += 1;
                cursor = m.end();
            }
        }
        let resume = cursor.max(safe).min(buf.len());
        if resume > cursor {
            out.extend_from_slice(&buf[cursor..resume]);
        }
        (resume, replaced)
    }
}

/// Scrubs one response body (or one WebSocket message) delivered in chunks.
pub struct Scrubber {
    needles: Needles,
    /// The tail that could still be the start of a match. May hold part of a secret.
    held: Zeroizing<Vec<u8>>,
    /// Where replacements are counted, if anywhere.
    redactions: Option<Arc<AtomicU64>>,
}

impl Scrubber {
    /// A scrubber for these secret values (their encodings are added, see [`Needles::new`]).
    #[cfg(test)]
    pub fn new(secrets: Vec<Zeroizing<Vec<u8>>>) -> Self {
        Needles::new(secrets).expect("needles").scrubber()
    }

    /// Counts every replacement into `counter` as well.
    pub fn counting(mut self, counter: Arc<AtomicU64>) -> Self {
        self.redactions = Some(counter);
        self
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

    /// Counts one replacement made outside the stream (a WebSocket control frame).
    pub fn count_redaction(&self) {
        self.count(1);
    }

    fn count(&self, replaced: u64) {
        if replaced > 0
            && let Some(counter) = &self.redactions
        {
            counter.fetch_add(replaced, Ordering::Relaxed);
        }
    }

    /// Feeds the next chunk; returns every byte that can no longer be part of a match (possibly
    /// none, when the whole chunk might still start one).
    #[cfg(test)]
    pub fn push(&mut self, chunk: &[u8]) -> Vec<u8> {
        let [first, second] = self.push_bytes(Bytes::copy_from_slice(chunk));
        [first, second].concat()
    }

    /// Feeds the next chunk; returns every byte that can no longer be part of a match, in up to
    /// two pieces (either may be empty). A chunk at least twice as long as the longest needle
    /// in which nothing is replaced passes uncopied: the second piece is a slice of it, the
    /// first the few bytes held back from before that turned out clean.
    pub fn push_bytes(&mut self, chunk: Bytes) -> [Bytes; 2] {
        let set = &self.needles.inner;
        if set.needles.is_empty() {
            return [chunk, Bytes::new()];
        }
        let longest = set.max_len;
        if chunk.len() < 2 * longest {
            let mut out = Vec::with_capacity(self.held.len() + chunk.len());
            self.push_into(&chunk, &mut out);
            return [Bytes::from(out), Bytes::new()];
        }
        let mut replaced = 0;
        let mut head = Vec::new();
        // Where the chunk's part of the output starts: past a match that began in the held
        // tail and ended in the chunk.
        let mut from = 0;
        if !self.held.is_empty() {
            // Every match that starts in the held tail ends within `longest` bytes of the
            // chunk: decide those on a copy of the seam alone.
            let seam = self.held.len();
            let mut buf = Zeroizing::new(Vec::with_capacity(seam + longest));
            buf.extend_from_slice(&self.held);
            buf.extend_from_slice(&chunk[..longest]);
            self.held.zeroize();
            let (resume, r) = set.scan(&buf, 0, seam, &mut head);
            replaced += r;
            from = resume - seam;
        }
        // The chunk is longer than a needle: its undecided tail is its own.
        let safe = set.undecided_from(&chunk);
        let wrapped = set.may_hold_wrapped(&chunk);
        let body = match set.find(&chunk, from, wrapped) {
            Some(m) if m.start() < safe => {
                let mut out = Vec::with_capacity(chunk.len() - from);
                let (resume, r) = set.scan(&chunk, from, safe, &mut out);
                replaced += r;
                self.held.extend_from_slice(&chunk[resume..]);
                Bytes::from(out)
            }
            _ => {
                self.held.extend_from_slice(&chunk[safe..]);
                chunk.slice(from..safe)
            }
        };
        self.count(replaced);
        [Bytes::from(head), body]
    }

    /// [`Scrubber::push`], appending to `out`.
    pub fn push_into(&mut self, chunk: &[u8], out: &mut Vec<u8>) {
        let set = &self.needles.inner;
        if set.needles.is_empty() {
            out.extend_from_slice(chunk);
            return;
        }
        let replaced = if self.held.is_empty() {
            let safe = set.undecided_from(chunk);
            let (resume, replaced) = set.scan(chunk, 0, safe, out);
            self.held.extend_from_slice(&chunk[resume..]);
            replaced
        } else {
            // The chunk itself is the upstream's buffer, not zeroized either: only the held
            // tail (a possible start of a secret, kept across chunks) is.
            let seam = self.held.len();
            let mut buf = Vec::with_capacity(seam + chunk.len());
            buf.extend_from_slice(&self.held);
            buf.extend_from_slice(chunk);
            self.held.zeroize();
            let safe = set.undecided_from(&buf);
            let (resume, replaced) = set.scan(&buf, 0, safe, out);
            self.held.extend_from_slice(&buf[resume..]);
            // Clear what this copy took of the held tail.
            buf[..seam].zeroize();
            replaced
        };
        self.count(replaced);
    }

    /// Ends the body: returns the held-back tail, scrubbed.
    pub fn finish(mut self) -> Vec<u8> {
        let mut out = Vec::with_capacity(self.held.len());
        self.finish_into(&mut out);
        out
    }

    /// Ends the current stretch (a WebSocket message): appends the held-back tail, scrubbed, to
    /// `out`, and starts afresh.
    pub fn finish_into(&mut self, out: &mut Vec<u8>) {
        let held = std::mem::take(&mut self.held);
        let (_, replaced) = self.needles.inner.scan(&held, 0, held.len(), out);
        self.count(replaced);
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
    // Built once per policy and vault generation: skip the encodings that would equal the value
    // itself (the usual case for API keys, which are plain ASCII letters, digits and `-_`).
    forms.extend(json_forms(secret));
    if !secret.iter().all(|&b| percent::is_unreserved(b)) {
        for case in [HexCase::Upper, HexCase::Lower] {
            let mut encoded = Zeroizing::new(Vec::new());
            percent::encode_into(secret, &mut encoded, case);
            forms.push(encoded);
        }
    }
    forms.extend(html_forms(secret));
    if secret.len() >= MIN_ENCODED_LEN {
        for hex in [&HEXLOWER, &HEXUPPER] {
            let mut encoded = Zeroizing::new(vec![0u8; hex.encode_len(secret.len())]);
            hex.encode_mut(secret, &mut encoded);
            forms.push(encoded);
        }
        // Two zero bytes, then the secret: the input for offset k starts 2 - k bytes in.
        let mut padded = Zeroizing::new(Vec::new());
        reserve_zeroizing(&mut padded, secret.len() + 2);
        padded.extend_from_slice(&[0, 0]);
        padded.extend_from_slice(secret);
        // MIME wraps the standard alphabet only.
        for (encoding, mime) in [(&BASE64_NOPAD, true), (&BASE64URL_NOPAD, false)] {
            for offset in 0..3 {
                let core = base64_core(encoding, &padded[2 - offset..], offset);
                if mime {
                    forms.extend(mime_wrapped(&core));
                }
                forms.push(core);
            }
        }
    }
    forms.retain(|f| !f.is_empty() && **f != *secret);
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

/// `core` as it appears in base64 text wrapped in lines of each MIME width, with CRLF or LF line
/// ends: one form per position of the first line break inside it (later breaks follow a width
/// apart). A core with no break inside is `core` itself.
fn mime_wrapped(core: &[u8]) -> Vec<Zeroizing<Vec<u8>>> {
    let mut forms = Vec::new();
    for width in MIME_WIDTHS {
        for newline in [&b"\r\n"[..], b"\n"] {
            for first_break in 1..=width.min(core.len().saturating_sub(1)) {
                let mut form = Zeroizing::new(Vec::new());
                reserve_zeroizing(
                    &mut form,
                    core.len() + newline.len() * (core.len() / width + 1),
                );
                let mut at = 0;
                let mut next = first_break;
                while next < core.len() {
                    form.extend_from_slice(&core[at..next]);
                    form.extend_from_slice(newline);
                    at = next;
                    next += width;
                }
                form.extend_from_slice(&core[at..]);
                forms.push(form);
            }
        }
    }
    forms
}

/// How a JSON encoder escapes a string.
#[derive(Clone, Copy)]
struct JsonStyle {
    /// `/` as `\/`.
    slash: bool,
    /// `<` `>` `&` (and U+2028, U+2029) as `\u003c`-style escapes, as Go does.
    html: bool,
    /// Every non-ASCII character as `\uXXXX` (Python's `ensure_ascii`).
    non_ascii: bool,
    /// Every character as `\uXXXX`.
    all: bool,
    upper: bool,
}

/// The JSON-escaped forms of `secret` that differ from it. Non-UTF-8 secrets (JSON cannot hold
/// them as they are) get the minimal forms only.
fn json_forms(secret: &[u8]) -> Vec<Zeroizing<Vec<u8>>> {
    let minimal = JsonStyle {
        slash: false,
        html: false,
        non_ascii: false,
        all: false,
        upper: false,
    };
    let mut styles = vec![
        minimal,
        JsonStyle {
            slash: true,
            ..minimal
        },
    ];
    if secret.iter().any(|b| matches!(b, b'<' | b'>' | b'&')) {
        styles.push(JsonStyle {
            html: true,
            ..minimal
        });
    }
    if !secret.is_ascii() {
        styles.push(JsonStyle {
            non_ascii: true,
            ..minimal
        });
    }
    for upper in [false, true] {
        styles.push(JsonStyle {
            all: true,
            upper,
            ..minimal
        });
    }
    let text = std::str::from_utf8(secret).ok();
    let mut forms: Vec<Zeroizing<Vec<u8>>> = Vec::new();
    for style in styles {
        let form = match text {
            Some(text) => json_escaped(text, style),
            None if !style.all && !style.non_ascii => json_escaped_bytes(secret, style.slash),
            None => continue,
        };
        if *form != *secret && !forms.iter().any(|f| **f == *form) {
            forms.push(form);
        }
    }
    forms
}

fn push_u_escape(out: &mut Zeroizing<Vec<u8>>, unit: u16, upper: bool) {
    let case = if upper {
        HexCase::Upper
    } else {
        HexCase::Lower
    };
    reserve_zeroizing(out, 6);
    out.extend_from_slice(b"\\u");
    for shift in [12, 8, 4, 0] {
        out.push(case.digit(((unit >> shift) & 0xf) as u8));
    }
}

fn json_escaped(text: &str, style: JsonStyle) -> Zeroizing<Vec<u8>> {
    let mut out = Zeroizing::new(Vec::with_capacity(
        text.len() * if style.all { 6 } else { 2 },
    ));
    let mut units = [0u16; 2];
    for c in text.chars() {
        let escape_u = style.all
            || (style.non_ascii && !c.is_ascii())
            || (style.html && matches!(c, '<' | '>' | '&' | '\u{2028}' | '\u{2029}'));
        if escape_u {
            for unit in c.encode_utf16(&mut units) {
                push_u_escape(&mut out, *unit, style.upper);
            }
            continue;
        }
        reserve_zeroizing(&mut out, 6);
        match c {
            '"' => out.extend_from_slice(b"\\\""),
            '\\' => out.extend_from_slice(b"\\\\"),
            '/' if style.slash => out.extend_from_slice(b"\\/"),
            '\u{8}' => out.extend_from_slice(b"\\b"),
            '\u{c}' => out.extend_from_slice(b"\\f"),
            '\t' => out.extend_from_slice(b"\\t"),
            c if (c as u32) < 0x20 => push_u_escape(&mut out, c as u16, false),
            c => {
                let mut buf = [0u8; 4];
                out.extend_from_slice(c.encode_utf8(&mut buf).as_bytes());
            }
        }
    }
    out
}

/// The minimal JSON escaping of bytes that are not UTF-8 (the other bytes pass as they are).
fn json_escaped_bytes(secret: &[u8], escape_slash: bool) -> Zeroizing<Vec<u8>> {
    let mut out = Zeroizing::new(Vec::with_capacity(secret.len() * 2));
    for &b in secret {
        match b {
            b'"' => out.extend_from_slice(b"\\\""),
            b'\\' => out.extend_from_slice(b"\\\\"),
            b'/' if escape_slash => out.extend_from_slice(b"\\/"),
            0x08 => out.extend_from_slice(b"\\b"),
            0x0c => out.extend_from_slice(b"\\f"),
            b'\t' => out.extend_from_slice(b"\\t"),
            b if b < 0x20 => push_u_escape(&mut out, u16::from(b), false),
            b => out.push(b),
        }
    }
    out
}

/// The HTML-escaped forms of `secret`, when it holds a character HTML escapes.
fn html_forms(secret: &[u8]) -> Vec<Zeroizing<Vec<u8>>> {
    if !secret
        .iter()
        .any(|b| matches!(b, b'&' | b'<' | b'>' | b'"' | b'\''))
    {
        return Vec::new();
    }
    // (double quote, single quote) escapes; `&` `<` `>` are the same everywhere.
    type Quotes = (Option<&'static [u8]>, Option<&'static [u8]>);
    let styles: [Quotes; 4] = [
        (Some(b"&quot;"), Some(b"&#x27;")), // Python html.escape
        (Some(b"&#34;"), Some(b"&#39;")),   // Go html.EscapeString
        (Some(b"&quot;"), Some(b"&#039;")), // PHP htmlspecialchars(ENT_QUOTES)
        (None, None),                       // `&` `<` `>` only
    ];
    let mut forms: Vec<Zeroizing<Vec<u8>>> = Vec::new();
    for (double, single) in styles {
        let mut out = Zeroizing::new(Vec::with_capacity(secret.len() * 2));
        for &b in secret {
            reserve_zeroizing(&mut out, 6);
            match b {
                b'&' => out.extend_from_slice(b"&amp;"),
                b'<' => out.extend_from_slice(b"&lt;"),
                b'>' => out.extend_from_slice(b"&gt;"),
                b'"' | b'\'' => match if b == b'"' { double } else { single } {
                    Some(escape) => out.extend_from_slice(escape),
                    None => out.push(b),
                },
                b => out.push(b),
            }
        }
        if *out != *secret && !forms.iter().any(|f| **f == *out) {
            forms.push(out);
        }
    }
    forms
}

#[cfg(test)]
mod tests {
    use data_encoding::{BASE64, BASE64URL};

    use std::sync::atomic::AtomicU64;

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
        let needles = Needles::exact(vec![z(b"sk-secret-value"), z(b"other")]).expect("needles");
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
        let needles = Needles::exact(vec![z(b"abc"), z(b"abcdef")]).expect("needles");
        let mut s = needles.scrubber();
        assert_eq!(s.push(b"x abc"), b"x ");
        assert_eq!(s.push(b"!"), [PLACEHOLDER, b"!"].concat());
        assert_eq!(s.push(b"abcde"), b"");
        assert_eq!(s.push(b"f."), [PLACEHOLDER, b"."].concat());
    }

    #[test]
    fn replaces_in_one_chunk_and_across_chunks() {
        let needles = Needles::exact(vec![z(b"sk-secret")]).expect("needles");
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
        let mut s = Needles::exact(vec![z(b"abcdef")])
            .expect("needles")
            .scrubber();
        // No tail of these starts the needle: nothing waits.
        assert_eq!(s.push(b"hello world"), b"hello world");
        assert_eq!(s.held_len(), 0);
        assert_eq!(s.push(b"!"), b"!");
        assert_eq!(s.finish(), b"");
        let mut s = Needles::exact(vec![z(b"abcdef")])
            .expect("needles")
            .scrubber();
        assert_eq!(s.push(b"xxabc"), b"xx");
        assert_eq!(s.held_len(), 3);
        assert_eq!(s.push(b"def tail"), b"[redacted by agent-broker] tail");
        assert_eq!(s.finish(), b"");
        let mut s = Needles::exact(vec![z(b"abcdef")])
            .expect("needles")
            .scrubber();
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
        let needles =
            Needles::exact(vec![z(b"abc"), z(b"abcde"), z(b"cdx"), z(b"e")]).expect("needles");
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

            let set = Needles::exact(needles.iter().map(|n| z(n)).collect()).expect("needles");
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
        let set = Needles::new(vec![z(secret)]).expect("needles");
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
        let set = Needles::new(vec![z(secret)]).expect("needles");
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
        let set = Needles::new(vec![z(b"short")]).expect("needles");
        // The value and its JSON form with every character escaped (lower and upper hex).
        assert_eq!(set.len(), 3);
        assert_eq!(set.scrub(HEXLOWER.encode(b"short").as_bytes()), None);
        assert_eq!(
            set.scrub(b"a short b").as_deref(),
            Some(&b"a [redacted by agent-broker] b"[..])
        );
        assert_eq!(set.scrub(BASE64.encode(b"short").as_bytes()), None);
    }

    #[test]
    fn json_and_percent_forms() {
        let secret = br#"pa"ss/wo\rd+1"#;
        let set = Needles::new(vec![z(secret)]).expect("needles");
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
        // Plain ASCII secrets have no distinct minimal JSON or percent form: only the
        // everything-escaped JSON form (`\u0061\u0062\u0063`, the same in both cases).
        assert_eq!(Needles::new(vec![z(b"abc")]).expect("needles").len(), 2);
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

    /// Every needle of a set, for the reference implementation.
    fn all_needles(set: &Needles) -> Vec<Vec<u8>> {
        set.inner.needles.iter().map(|n| n.to_vec()).collect()
    }

    #[test]
    fn hex_and_fully_escaped_json_forms() {
        let secret = b"sk-live-0123456789abcdef";
        let set = Needles::new(vec![z(secret)]).expect("needles");
        let upper_u: String = secret.iter().map(|b| format!("\\u{b:04X}")).collect();
        let lower_u: String = secret.iter().map(|b| format!("\\u{b:04x}")).collect();
        for form in [
            HEXLOWER.encode(secret),
            HEXUPPER.encode(secret),
            upper_u,
            lower_u,
        ] {
            let body = format!("{{\"echo\":\"xx{form}yy\"}}");
            let out = set.scrub(body.as_bytes()).expect("found");
            assert_eq!(out, b"{\"echo\":\"xx[redacted by agent-broker]yy\"}");
        }
        // Non-ASCII: `ensure_ascii` escapes only those characters (a surrogate pair here).
        let secret = "key-\u{e9}t\u{e9}-\u{1f511}-0123".as_bytes();
        let set = Needles::new(vec![z(secret)]).expect("needles");
        let ensure_ascii = serde_json_ascii(std::str::from_utf8(secret).expect("utf-8"));
        assert!(ensure_ascii.contains("\\ud83d\\udd11"), "{ensure_ascii}");
        assert!(set.scrub(ensure_ascii.as_bytes()).is_some());
        // Go escapes `<` `>` `&` for HTML safety.
        let set = Needles::new(vec![z(b"a<b>&c-0123456")]).expect("needles");
        assert!(set.scrub(b"a\\u003cb\\u003e\\u0026c-0123456").is_some());
    }

    /// JSON with every non-ASCII character escaped, as Python's `json.dumps` writes it.
    fn serde_json_ascii(text: &str) -> String {
        let mut out = String::new();
        let mut units = [0u16; 2];
        for c in text.chars() {
            if c.is_ascii() {
                out.push(c);
            } else {
                for u in c.encode_utf16(&mut units) {
                    out.push_str(&format!("\\u{u:04x}"));
                }
            }
        }
        out
    }

    #[test]
    fn html_escaped_forms() {
        let secret = br#"p&ss<w>"rd'9"#;
        let set = Needles::new(vec![z(secret)]).expect("needles");
        for form in [
            &b"p&amp;ss&lt;w&gt;&quot;rd&#x27;9"[..],
            b"p&amp;ss&lt;w&gt;&#34;rd&#39;9",
            b"p&amp;ss&lt;w&gt;&quot;rd&#039;9",
            b"p&amp;ss&lt;w&gt;\"rd'9",
        ] {
            let mut body = b"<td>".to_vec();
            body.extend_from_slice(form);
            body.extend_from_slice(b"</td>");
            assert_eq!(
                set.scrub(&body).expect("found"),
                b"<td>[redacted by agent-broker]</td>"
            );
        }
    }

    /// A MIME-wrapped base64 text (`width` characters a line, `newline` line ends) of `plain`.
    fn mime(plain: &[u8], width: usize, newline: &str) -> String {
        let flat = BASE64.encode(plain);
        flat.as_bytes()
            .chunks(width)
            .map(|l| std::str::from_utf8(l).expect("ascii"))
            .collect::<Vec<_>>()
            .join(newline)
    }

    /// Property, for chunks long enough to pass uncopied: base64 text in MIME lines (what the
    /// wrapped needles look like) with every form of a secret planted in it, cut at random,
    /// streams out exactly as a one-shot replacement does, with no needle left.
    #[test]
    fn long_chunks_match_one_shot_replacement() {
        let mut rng = Rng(0x2545_f491_4f6c_dd1d);
        let base64: &[u8] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";
        for round in 0..200 {
            let secret: Vec<u8> = (0..8 + rng.below(40))
                .map(|_| base64[rng.below(base64.len())])
                .collect();
            let set = Needles::new(vec![z(&secret)]).expect("needles");
            let needles = all_needles(&set);
            let mut haystack = Vec::new();
            let len = rng.below(6000);
            let width = [76, 64][rng.below(2)];
            let mut column = 0;
            while haystack.len() < len {
                if rng.below(300) == 0 {
                    haystack.extend_from_slice(&needles[rng.below(needles.len())]);
                } else if column == width {
                    haystack.push(b'\n');
                    column = 0;
                } else {
                    haystack.push(base64[rng.below(base64.len())]);
                    column += 1;
                }
            }
            let mut cuts: Vec<usize> = (0..rng.below(8))
                .map(|_| rng.below(haystack.len() + 1))
                .collect();
            cuts.sort_unstable();
            let want = naive(&haystack, &needles);
            let streamed = stream(&set, &haystack, &cuts);
            assert_eq!(streamed, want, "round {round}: cuts {cuts:?}");
            for n in &needles {
                assert!(!contains(&streamed, n), "round {round}: a needle survived");
            }
        }
    }

    #[test]
    fn a_clean_long_chunk_passes_uncopied() {
        let set =
            Needles::new(vec![z(b"sk-live-4f9a2b7c1d8e3f6a0b5c9d2e7f1a4b8c")]).expect("needles");
        let mut s = set.scrubber();
        let chunk = Bytes::from(
            (0..16 * 1024)
                .map(|i: u32| {
                    if i % 77 == 76 {
                        b'\n'
                    } else {
                        b"ABCDEFGH"[(i % 8) as usize]
                    }
                })
                .collect::<Vec<u8>>(),
        );
        let [first, second] = s.push_bytes(chunk.clone());
        assert!(first.is_empty());
        assert_eq!(second.as_ptr(), chunk.as_ptr(), "the chunk was copied");
        // Another after it: the held tail (if any) comes first, then a slice of the chunk.
        let [third, fourth] = s.push_bytes(chunk.clone());
        let inside = chunk.as_ptr_range();
        assert!(inside.contains(&fourth.as_ptr()), "the chunk was copied");
        let out = first.len() + second.len() + third.len() + fourth.len();
        assert_eq!(out + s.held_len(), 2 * chunk.len());
    }

    #[test]
    fn mime_wrapped_base64_is_scrubbed_wherever_the_lines_break() {
        // Long enough that its base64 spans more than one 64-character line.
        let secret = b"sk-ant-api03-0123456789abcdefghijklmnopqrstuvwxyzABCDEFGHIJ+/=?~";
        let set = Needles::new(vec![z(secret)]).expect("needles");
        for width in [76, 64] {
            for newline in ["\r\n", "\n"] {
                // Every alignment of the secret against the lines and the 3-byte groups.
                for prefix_len in 0..(width + 3) {
                    let mut plain = b"Authorization: Bearer ".to_vec();
                    plain.extend(std::iter::repeat_n(b'x', prefix_len));
                    plain.extend_from_slice(secret);
                    plain.extend_from_slice(b"\r\n\r\n");
                    let text = mime(&plain, width, newline);
                    let out = set
                        .scrub(text.as_bytes())
                        .unwrap_or_else(|| panic!("width {width} prefix {prefix_len}: not found"));
                    // Whatever is left decodes to no copy of the secret.
                    let flat: Vec<u8> = out
                        .iter()
                        .copied()
                        .filter(|b| !b"\r\n".contains(b))
                        .collect();
                    let exact = BASE64_NOPAD.encode(secret);
                    assert!(!contains(&flat, &exact.as_bytes()[1..exact.len() - 2]));
                    assert!(contains(&out, PLACEHOLDER));
                }
            }
        }
    }

    #[test]
    fn header_names_match_in_any_case() {
        let set = Needles::new(vec![z(b"sk-Live-0123456789")]).expect("needles");
        assert!(set.in_header_name(b"x-key-sk-live-0123456789"));
        assert!(set.in_header_name(b"sk-live-0123456789"));
        assert!(!set.in_header_name(b"content-type"));
        assert!(!Needles::default().in_header_name(b"anything"));
    }

    #[test]
    fn extra_secrets_reuse_the_set_when_known() {
        let set = Needles::new(vec![z(b"first-secret-1"), z(b"second-secret-2")]).expect("set");
        let same = set.with_extra(&[z(b"second-secret-2")]).expect("same");
        assert!(Arc::ptr_eq(&set.inner, &same.inner), "no new automaton");
        let more = set.with_extra(&[z(b"third-secret-33")]).expect("more");
        assert!(more.scrub(b"a third-secret-33 b").is_some());
        assert!(more.scrub(b"a first-secret-1 b").is_some());
        assert!(set.scrub(b"a third-secret-33 b").is_none());
    }

    #[test]
    fn replacements_are_counted() {
        let counter = Arc::new(AtomicU64::new(0));
        let set = Needles::exact(vec![z(b"abcdef")]).expect("needles");
        let mut s = set.scrubber().counting(counter.clone());
        s.push(b"xx abcdef yy abc");
        s.push(b"def zz abc");
        s.finish();
        assert_eq!(counter.load(Ordering::Relaxed), 2);
    }

    /// Property, with the real encodings: for random secrets (some with characters that JSON,
    /// percent and HTML escape), bodies with encoded forms planted in random filler, and random
    /// splits, the streamed output equals the one-shot output and the reference over every
    /// needle the set holds, and no needle survives.
    #[test]
    fn random_encoded_echoes_match_one_shot_replacement() {
        let mut rng = Rng(0x51ed_270b_9a3c_44e1);
        let secret_alphabet: &[u8] =
            b"abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789-_+/=\"<&'";
        let filler_alphabet: &[u8] = b"abc0123 {}:\",\r\n\\/%&;#xu";
        for round in 0..300 {
            let secret: Vec<u8> = (0..8 + rng.below(40))
                .map(|_| secret_alphabet[rng.below(secret_alphabet.len())])
                .collect();
            let set = Needles::new(vec![z(&secret)]).expect("needles");
            let needles = all_needles(&set);
            let mut haystack = Vec::new();
            let len = rng.below(600);
            while haystack.len() < len {
                if rng.below(40) == 0 {
                    haystack.extend_from_slice(&needles[rng.below(needles.len())]);
                } else {
                    haystack.push(filler_alphabet[rng.below(filler_alphabet.len())]);
                }
            }
            let mut cuts: Vec<usize> = (0..rng.below(16))
                .map(|_| rng.below(haystack.len() + 1))
                .collect();
            cuts.sort_unstable();
            let want = naive(&haystack, &needles);
            let one_shot = set.scrub(&haystack).unwrap_or_else(|| haystack.clone());
            assert_eq!(one_shot, want, "round {round}: one-shot differs");
            let streamed = stream(&set, &haystack, &cuts);
            assert_eq!(streamed, want, "round {round}: cuts {cuts:?}");
            assert!(
                !contains(&streamed, &secret),
                "round {round}: the secret survived"
            );
        }
    }

    /// Not a benchmark that can fail: prints how fast a realistic set scans, for the README.
    #[test]
    fn scanning_cost_with_every_form() {
        let secrets: Vec<Zeroizing<Vec<u8>>> = (0..4)
            .map(|i| z(format!("sk-live-{i}-4f9a2b7c1d8e3f6a0b5c9d2e7f1a4b8c").as_bytes()))
            .collect();
        let built = std::time::Instant::now();
        let set = Needles::new(secrets).expect("needles");
        println!("built {} needles in {:?}", set.len(), built.elapsed());
        let body: Vec<u8> = (0..1 << 20)
            .map(|i: u32| b"abcdefghijklmnopqrstuvwxyz {}\",:0123456789\n"[(i % 43) as usize])
            .collect();
        let started = std::time::Instant::now();
        let mut s = set.scrubber();
        for chunk in body.chunks(16 * 1024) {
            s.push(chunk);
        }
        s.finish();
        let elapsed = started.elapsed();
        println!(
            "{} needles, 1 MiB in 16 KiB chunks: {:?} ({:.0} MiB/s)",
            set.len(),
            elapsed,
            1.0 / elapsed.as_secs_f64()
        );
    }
}
