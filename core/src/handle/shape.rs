//! Token shapes: the prefix, length and alphabet a secret has, so a handle or a placeholder can
//! look like the secret it stands for (`ghp_` + 36 letters and digits for a `ghp_` key) and pass
//! a client that checks what a token looks like before it sends it.
//!
//! [`TokenShape::of_secret`] derives a shape from a secret and reveals nothing else of it:
//!
//! - **Prefix**: the secret's leading *label segments*, each a lowercase ASCII letter, up to 7
//!   more lowercase letters or digits, and a `_` or `-`, as many as fit in the first
//!   [`MAX_PREFIX_LEN`] characters: `ghp_`, `github_pat_`, `sk-proj-`, `sk-ant-api03-`,
//!   `xoxb-`, `glpat-`, `sk_live_`; none for `AKIA...` or a bare hex key. A segment must start
//!   with a letter, so `xoxb-1234567890-...` keeps `xoxb-` and not the number after it. The
//!   prefix is meant to name the key's kind; should the random part of a key itself begin like a
//!   label (say `sk-proj-abc_...`), that segment counts too, within the same 16 characters.
//!   The shape is shown to the operator (`handle mint --shaped`, `handle list`), so such a case
//!   is visible.
//! - **Length**: the secret's length in bytes.
//! - **Alphabet**: the smallest [`Alphabet`] holding every character after the prefix (digits,
//!   hex in either case, lowercase or uppercase letters and digits, letters and digits, and
//!   those with `_`, `-`, both, or `+` and `/`). A secret with any other character after its
//!   prefix (`.`, `=`, a space, non-ASCII) has no shape.
//!
//! A token of a shape ([`super::mint_shaped`], [`super::placeholder`]) is the prefix and a body
//! of fresh random characters drawn uniformly from the alphabet, never derived from the secret. A shape whose body cannot
//! carry [`MIN_RANDOM_BITS`] random bits (fewer than 22 letters and digits, 32 hex digits) is
//! refused: a guessable handle would be worse than one a client rejects.
//!
//! Recognition ([`TokenShape::find_in`]): a shaped token has no fixed marker, so brokerd looks
//! for the shapes of the handles it has minted. A match is the prefix and exactly the body's
//! length of alphabet characters, with clean edges: the characters before and after are neither
//! letters, digits, `_`, nor in the alphabet. A match is only a *candidate*: it is a handle only
//! when its hash is a stored handle's; anything else of the same shape (a real token the agent
//! holds) is left as it is.

use std::{fmt, ops::Range};

use zeroize::Zeroizing;

/// Fewest random bits a shaped token's body must carry.
pub const MIN_RANDOM_BITS: u32 = 128;
/// The prefix is found within this many leading characters of a secret.
pub const MAX_PREFIX_LEN: usize = 16;
/// Longest label segment of a prefix, its separator not counted.
const MAX_SEGMENT_LEN: usize = 8;

const DIGITS: &[u8] = b"0123456789";
const HEX_LOWER: &[u8] = b"0123456789abcdef";
const HEX_UPPER: &[u8] = b"0123456789ABCDEF";
const LOWER_ALNUM: &[u8] = b"0123456789abcdefghijklmnopqrstuvwxyz";
const UPPER_ALNUM: &[u8] = b"0123456789ABCDEFGHIJKLMNOPQRSTUVWXYZ";
const ALNUM: &[u8] = b"0123456789ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz";
const ALNUM_UNDERSCORE: &[u8] = b"0123456789ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz_";
const ALNUM_DASH: &[u8] = b"0123456789ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz-";
const BASE64URL: &[u8] = b"0123456789ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz_-";
const BASE64: &[u8] = b"0123456789ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz+/";

/// The characters a shaped token's body is drawn from. Ordered smallest first: a secret gets
/// the first that holds all its characters.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Alphabet {
    /// `[0-9]`
    Digits,
    /// `[0-9a-f]`
    HexLower,
    /// `[0-9A-F]`
    HexUpper,
    /// `[0-9a-z]`
    LowerAlnum,
    /// `[0-9A-Z]`
    UpperAlnum,
    /// `[0-9A-Za-z]`
    Alnum,
    /// `[0-9A-Za-z_]`
    AlnumUnderscore,
    /// `[0-9A-Za-z-]`
    AlnumDash,
    /// `[0-9A-Za-z_-]`
    Base64Url,
    /// `[0-9A-Za-z+/]` (no `=` padding)
    Base64,
}

impl Alphabet {
    /// Every alphabet, smallest first.
    pub const ALL: [Alphabet; 10] = [
        Self::Digits,
        Self::HexLower,
        Self::HexUpper,
        Self::LowerAlnum,
        Self::UpperAlnum,
        Self::Alnum,
        Self::AlnumUnderscore,
        Self::AlnumDash,
        Self::Base64Url,
        Self::Base64,
    ];

    /// The characters, each once.
    pub const fn chars(self) -> &'static [u8] {
        match self {
            Self::Digits => DIGITS,
            Self::HexLower => HEX_LOWER,
            Self::HexUpper => HEX_UPPER,
            Self::LowerAlnum => LOWER_ALNUM,
            Self::UpperAlnum => UPPER_ALNUM,
            Self::Alnum => ALNUM,
            Self::AlnumUnderscore => ALNUM_UNDERSCORE,
            Self::AlnumDash => ALNUM_DASH,
            Self::Base64Url => BASE64URL,
            Self::Base64 => BASE64,
        }
    }

    /// As a character class, e.g. `[0-9A-Za-z]`: how shapes are written.
    pub const fn class(self) -> &'static str {
        match self {
            Self::Digits => "[0-9]",
            Self::HexLower => "[0-9a-f]",
            Self::HexUpper => "[0-9A-F]",
            Self::LowerAlnum => "[0-9a-z]",
            Self::UpperAlnum => "[0-9A-Z]",
            Self::Alnum => "[0-9A-Za-z]",
            Self::AlnumUnderscore => "[0-9A-Za-z_]",
            Self::AlnumDash => "[0-9A-Za-z-]",
            Self::Base64Url => "[0-9A-Za-z_-]",
            Self::Base64 => "[0-9A-Za-z+/]",
        }
    }

    pub fn contains(self, b: u8) -> bool {
        match self {
            Self::Digits => b.is_ascii_digit(),
            Self::HexLower => b.is_ascii_digit() || (b'a'..=b'f').contains(&b),
            Self::HexUpper => b.is_ascii_digit() || (b'A'..=b'F').contains(&b),
            Self::LowerAlnum => b.is_ascii_digit() || b.is_ascii_lowercase(),
            Self::UpperAlnum => b.is_ascii_digit() || b.is_ascii_uppercase(),
            Self::Alnum => b.is_ascii_alphanumeric(),
            Self::AlnumUnderscore => b.is_ascii_alphanumeric() || b == b'_',
            Self::AlnumDash => b.is_ascii_alphanumeric() || b == b'-',
            Self::Base64Url => b.is_ascii_alphanumeric() || b == b'_' || b == b'-',
            Self::Base64 => b.is_ascii_alphanumeric() || b == b'+' || b == b'/',
        }
    }

    /// The smallest alphabet holding every byte of `body`; `None` when none does.
    pub fn of(body: &[u8]) -> Option<Alphabet> {
        Self::ALL
            .into_iter()
            .find(|a| body.iter().all(|&b| a.contains(b)))
    }

    fn parse(class: &str) -> Option<Alphabet> {
        Self::ALL.into_iter().find(|a| a.class() == class)
    }

    /// Random bits one character carries.
    fn bits_per_char(self) -> f64 {
        (self.chars().len() as f64).log2()
    }
}

/// Why a secret has no shape, or a written shape does not parse. Messages never show a
/// character of the secret.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ShapeError {
    #[error(
        "the secret is a credential whose value brokerd fetches (OAuth, exec, file); it has no \
         fixed shape to copy"
    )]
    NotStatic,
    #[error(
        "the secret holds characters after its prefix{} that no token alphabet has (only \
         letters, digits and one of `_`, `-`, both, or `+` and `/` can be copied)",
        shown_prefix(.prefix)
    )]
    Alphabet { prefix: String },
    #[error(
        "the secret is too short to copy: {body_len} characters of {class} after its \
         prefix{} carry {bits} random bits, and a token needs at least {MIN_RANDOM_BITS}",
        shown_prefix(.prefix)
    )]
    TooShort {
        prefix: String,
        body_len: usize,
        class: &'static str,
        bits: u32,
    },
    #[error("invalid token shape {0:?}: expected PREFIX[CLASS]{{N}}, e.g. ghp_[0-9A-Za-z]{{36}}")]
    Syntax(String),
    #[error(
        "invalid token shape {0:?}: the prefix is not lowercase label segments ending in `_` or `-`, within {MAX_PREFIX_LEN} characters"
    )]
    Prefix(String),
}

fn shown_prefix(prefix: &str) -> String {
    if prefix.is_empty() {
        " (it has none)".into()
    } else {
        format!(" `{prefix}`")
    }
}

/// The prefix, length and alphabet of a secret: what a shaped token copies of it.
///
/// Written (`Display`, [`TokenShape::parse`]) as `PREFIX[CLASS]{N}`, e.g.
/// `ghp_[0-9A-Za-z]{36}`: the prefix, then N characters of the class. The prefix is the only
/// part of the secret it holds.
#[derive(Clone, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct TokenShape {
    prefix: String,
    body_len: usize,
    alphabet: Alphabet,
}

impl TokenShape {
    /// The shape of `secret`. See the module docs for what the prefix and alphabet are; refuses
    /// a secret with characters no alphabet has, and one whose body carries fewer than
    /// [`MIN_RANDOM_BITS`] random bits.
    pub fn of_secret(secret: &[u8]) -> Result<Self, ShapeError> {
        let prefix_len = label_prefix_len(secret);
        // The prefix is ASCII by construction.
        let prefix = String::from_utf8_lossy(&secret[..prefix_len]).into_owned();
        let body = &secret[prefix_len..];
        let alphabet = Alphabet::of(body).ok_or_else(|| ShapeError::Alphabet {
            prefix: prefix.clone(),
        })?;
        Self::new(prefix, body.len(), alphabet)
    }

    /// A shape from its parts; the prefix must be what [`TokenShape::of_secret`] could have
    /// found, and the body must carry [`MIN_RANDOM_BITS`].
    fn new(prefix: String, body_len: usize, alphabet: Alphabet) -> Result<Self, ShapeError> {
        if label_prefix_len(prefix.as_bytes()) != prefix.len() {
            return Err(ShapeError::Prefix(prefix));
        }
        let shape = Self {
            prefix,
            body_len,
            alphabet,
        };
        let bits = shape.random_bits();
        if bits < MIN_RANDOM_BITS {
            return Err(ShapeError::TooShort {
                prefix: shape.prefix,
                body_len,
                class: alphabet.class(),
                bits,
            });
        }
        Ok(shape)
    }

    /// Parses the written form, `PREFIX[CLASS]{N}`.
    pub fn parse(text: &str) -> Result<Self, ShapeError> {
        let syntax = || ShapeError::Syntax(text.to_string());
        let open = text.find('[').ok_or_else(syntax)?;
        let close = open + text[open..].find(']').ok_or_else(syntax)?;
        let (prefix, class) = (&text[..open], &text[open..=close]);
        let count = text[close + 1..]
            .strip_prefix('{')
            .and_then(|c| c.strip_suffix('}'))
            .filter(|c| !c.is_empty() && c.bytes().all(|b| b.is_ascii_digit()))
            .ok_or_else(syntax)?;
        let body_len = count.parse().map_err(|_| syntax())?;
        let alphabet = Alphabet::parse(class).ok_or_else(syntax)?;
        Self::new(prefix.to_string(), body_len, alphabet)
    }

    /// The prefix every token of this shape starts with (may be empty).
    pub fn prefix(&self) -> &str {
        &self.prefix
    }

    /// Characters after the prefix.
    pub fn body_len(&self) -> usize {
        self.body_len
    }

    /// Total length in bytes.
    pub fn len(&self) -> usize {
        self.prefix.len() + self.body_len
    }

    /// Never true: a shape carries at least [`MIN_RANDOM_BITS`] in its body.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    pub fn alphabet(&self) -> Alphabet {
        self.alphabet
    }

    /// Random bits a token's body carries, rounded down.
    pub fn random_bits(&self) -> u32 {
        let bits = self.body_len as f64 * self.alphabet.bits_per_char();
        if bits >= f64::from(u32::MAX) {
            u32::MAX
        } else {
            // In range and non-negative: the cast only drops the fraction.
            bits as u32
        }
    }

    /// Whether `token` is exactly of this shape.
    pub fn fits(&self, token: &[u8]) -> bool {
        token.len() == self.len()
            && token.starts_with(self.prefix.as_bytes())
            && token[self.prefix.len()..]
                .iter()
                .all(|&b| self.alphabet.contains(b))
    }

    /// A byte that would make a match part of a longer word.
    fn glued(&self, b: u8) -> bool {
        b.is_ascii_alphanumeric() || b == b'_' || self.alphabet.contains(b)
    }

    /// Every candidate token of this shape in `haystack`, in order, never overlapping: the
    /// prefix and exactly the body's length of alphabet characters, with neither a letter,
    /// digit, `_` nor an alphabet character just before or after.
    pub fn find_in(&self, haystack: &[u8]) -> Vec<Range<usize>> {
        let clean_before = |start: usize| start == 0 || !self.glued(haystack[start - 1]);
        let clean_after = |end: usize| haystack.get(end).is_none_or(|&b| !self.glued(b));
        if self.prefix.is_empty() {
            // Maximal runs of glued bytes that are exactly a token.
            let mut out = Vec::new();
            let mut i = 0;
            while i < haystack.len() {
                if !self.glued(haystack[i]) {
                    i += 1;
                    continue;
                }
                let start = i;
                while i < haystack.len() && self.glued(haystack[i]) {
                    i += 1;
                }
                if i - start == self.len() && self.fits(&haystack[start..i]) {
                    out.push(start..i);
                }
            }
            return out;
        }
        memchr::memmem::find_iter(haystack, self.prefix.as_bytes())
            .filter_map(|start| {
                let end = start + self.len();
                let token = haystack.get(start..end)?;
                (clean_before(start) && clean_after(end) && self.fits(token)).then_some(start..end)
            })
            .collect()
    }
}

impl fmt::Display for TokenShape {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "{}{}{{{}}}",
            self.prefix,
            self.alphabet.class(),
            self.body_len
        )
    }
}

/// Length of the label segments `secret` starts with (see the module docs), 0 for none.
fn label_prefix_len(secret: &[u8]) -> usize {
    let mut end = 0;
    loop {
        let rest = &secret[end..];
        if !rest.first().is_some_and(u8::is_ascii_lowercase) {
            return end;
        }
        let label = rest
            .iter()
            .take(MAX_SEGMENT_LEN)
            .take_while(|b| b.is_ascii_lowercase() || b.is_ascii_digit())
            .count();
        if !matches!(rest.get(label), Some(b'_' | b'-')) || end + label + 1 > MAX_PREFIX_LEN {
            return end;
        }
        end += label + 1;
    }
}

/// A fresh token of `shape`: its prefix and a body drawn uniformly from its alphabet with
/// `random`. Nothing of a secret goes in but the prefix.
pub(crate) fn random_token<E>(
    shape: &TokenShape,
    mut random: impl FnMut(&mut [u8]) -> Result<(), E>,
) -> Result<Zeroizing<String>, E> {
    let chars = shape.alphabet.chars();
    // Bytes at or above `limit` are drawn again, so every character is equally likely.
    let limit = 256 - 256 % chars.len();
    let mut token = Zeroizing::new(String::with_capacity(shape.len()));
    token.push_str(&shape.prefix);
    let mut pool = Zeroizing::new([0u8; 64]);
    while token.len() < shape.len() {
        random(&mut pool[..])?;
        for &b in pool.iter() {
            if token.len() == shape.len() {
                break;
            }
            if usize::from(b) < limit {
                token.push(char::from(chars[usize::from(b) % chars.len()]));
            }
        }
    }
    Ok(token)
}
