//! Percent-encoding (RFC 3986), written once: the query parameters a rule injects, the secrets
//! swapped for handle tokens in a query, and the encoded forms response scrubbing looks for.
//!
//! The encoder keeps the unreserved characters (`A-Z a-z 0-9 - . _ ~`) and escapes every other
//! byte, writing into a buffer that zeroizes whatever it leaves behind as it grows, since what it
//! encodes is usually a secret. The decoder reads `%XX` in either case and keeps anything else,
//! an invalid escape included, as it is.

use zeroize::Zeroizing;

use crate::inject::reserve_zeroizing;

/// The case of the hex digits an encoder writes. Both are valid and mean the same; some
/// servers echo one, some the other.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum HexCase {
    /// `%2F`, what RFC 3986 recommends.
    Upper,
    /// `%2f`.
    Lower,
}

impl HexCase {
    /// The hex digit of `nibble` (0 to 15) in this case.
    pub fn digit(self, nibble: u8) -> u8 {
        let digits = match self {
            Self::Upper => b"0123456789ABCDEF",
            Self::Lower => b"0123456789abcdef",
        };
        digits[usize::from(nibble & 0xf)]
    }
}

/// What a decoder makes of `+`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Plus {
    /// `+` is a `+`: RFC 3986.
    Keep,
    /// `+` is a space: HTML forms (`application/x-www-form-urlencoded`).
    Space,
}

/// Whether `b` is an RFC 3986 unreserved character, the bytes the encoder leaves as they are.
pub fn is_unreserved(b: u8) -> bool {
    b.is_ascii_alphanumeric() || matches!(b, b'-' | b'.' | b'_' | b'~')
}

/// Appends `bytes` percent-encoded to `out`: unreserved characters as they are, every other
/// byte as `%XX`. Grows `out` without leaving copies of its contents behind.
pub fn encode_into(bytes: &[u8], out: &mut Zeroizing<Vec<u8>>, case: HexCase) {
    reserve_zeroizing(out, bytes.len() * 3);
    for &b in bytes {
        if is_unreserved(b) {
            out.push(b);
        } else {
            out.extend_from_slice(&[b'%', case.digit(b >> 4), case.digit(b & 0xf)]);
        }
    }
}

/// Percent-decodes `raw`. `%XX` (either case) is the byte it names; an invalid escape is kept
/// as it is; `+` is read as `plus` says.
pub fn decode(raw: &[u8], plus: Plus) -> Vec<u8> {
    let mut out = Vec::with_capacity(raw.len());
    decode_each(raw, plus, |b, _| out.push(b));
    out
}

/// [`decode`], also saying where each decoded byte's text starts in `raw`: `starts[i]` is the
/// offset of byte `i`'s text, and one more entry, `raw.len()`, closes the last. So decoded
/// bytes `a..b` were written as `raw[starts[a]..starts[b]]`.
pub fn decode_with_offsets(raw: &[u8], plus: Plus) -> (Vec<u8>, Vec<usize>) {
    let mut out = Vec::with_capacity(raw.len());
    let mut starts = Vec::with_capacity(raw.len() + 1);
    decode_each(raw, plus, |b, at| {
        out.push(b);
        starts.push(at);
    });
    starts.push(raw.len());
    (out, starts)
}

/// Calls `emit(byte, offset)` for each decoded byte, in order.
fn decode_each(raw: &[u8], plus: Plus, mut emit: impl FnMut(u8, usize)) {
    let mut i = 0;
    while i < raw.len() {
        let (byte, len) = match raw[i] {
            b'%' => match raw.get(i + 1..i + 3).and_then(hex_pair) {
                Some(b) => (b, 3),
                None => (b'%', 1),
            },
            b'+' if plus == Plus::Space => (b' ', 1),
            b => (b, 1),
        };
        emit(byte, i);
        i += len;
    }
}

/// The byte two hex digits (either case) name.
fn hex_pair(pair: &[u8]) -> Option<u8> {
    let digit = |b: u8| match b {
        b'0'..=b'9' => Some(b - b'0'),
        b'a'..=b'f' => Some(b - b'a' + 10),
        b'A'..=b'F' => Some(b - b'A' + 10),
        _ => None,
    };
    match pair {
        [h, l] => Some(digit(*h)? << 4 | digit(*l)?),
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::test_rng::Rng;

    fn encoded(bytes: &[u8], case: HexCase) -> String {
        let mut out = Zeroizing::new(Vec::new());
        encode_into(bytes, &mut out, case);
        String::from_utf8(out.to_vec()).expect("ASCII")
    }

    #[test]
    fn encodes_all_but_unreserved() {
        assert_eq!(encoded(b"AZaz09-._~", HexCase::Upper), "AZaz09-._~");
        assert_eq!(encoded(b"a&b c/+%", HexCase::Upper), "a%26b%20c%2F%2B%25");
        assert_eq!(encoded(b"a&b c/+%", HexCase::Lower), "a%26b%20c%2f%2b%25");
        assert_eq!(encoded(&[0, 0x7f, 0xff], HexCase::Upper), "%00%7F%FF");
        assert_eq!(encoded(&[0xab], HexCase::Lower), "%ab");
        assert_eq!(encoded(b"", HexCase::Upper), "");
        // Appends to what is there.
        let mut out = Zeroizing::new(b"k=".to_vec());
        encode_into(b"[]", &mut out, HexCase::Upper);
        assert_eq!(out.as_slice(), b"k=%5B%5D");
        let unreserved: Vec<u8> = (0..=255).filter(|&b| is_unreserved(b)).collect();
        assert_eq!(
            unreserved,
            b"-.0123456789ABCDEFGHIJKLMNOPQRSTUVWXYZ_abcdefghijklmnopqrstuvwxyz~"
        );
    }

    #[test]
    fn decodes_escapes_in_either_case_and_keeps_invalid_ones() {
        assert_eq!(decode(b"a%26b%20c%2f%2F", Plus::Keep), b"a&b c//");
        assert_eq!(decode(b"%zz%4%", Plus::Keep), b"%zz%4%");
        assert_eq!(decode(b"%%41", Plus::Keep), b"%A");
        assert_eq!(decode(b"%C3%A9", Plus::Keep), "é".as_bytes());
        assert_eq!(decode("é%".as_bytes(), Plus::Keep), "é%".as_bytes());
        assert_eq!(decode(b"", Plus::Space), b"");
    }

    #[test]
    fn plus_is_kept_or_a_space() {
        assert_eq!(decode(b"a+b%2B", Plus::Keep), b"a+b+");
        assert_eq!(decode(b"a+b%2B", Plus::Space), b"a b+");
    }

    #[test]
    fn offsets_point_at_each_bytes_text() {
        let raw = b"x%41+%zz";
        let (decoded, starts) = decode_with_offsets(raw, Plus::Keep);
        assert_eq!(decoded, b"xA+%zz");
        assert_eq!(starts, [0, 1, 4, 5, 6, 7, 8]);
        let (decoded, starts) = decode_with_offsets(b"", Plus::Keep);
        assert!(decoded.is_empty());
        assert_eq!(starts, [0]);
    }

    #[test]
    fn any_bytes_round_trip() {
        let mut rng = Rng(0x0BAD_5EED);
        let every_byte: Vec<u8> = (0..=255).collect();
        for _ in 0..5_000 {
            let bytes = rng.bytes(&every_byte);
            for case in [HexCase::Upper, HexCase::Lower] {
                let mut out = Zeroizing::new(Vec::new());
                encode_into(&bytes, &mut out, case);
                // Only unreserved characters and escapes in the asked case come out.
                let mut i = 0;
                while i < out.len() {
                    if out[i] == b'%' {
                        let pair = &out[i + 1..i + 3];
                        let b = hex_pair(pair).expect("escape");
                        assert_eq!(pair, [case.digit(b >> 4), case.digit(b & 0xf)]);
                        assert!(!is_unreserved(b), "{out:?}");
                        i += 3;
                    } else {
                        assert!(is_unreserved(out[i]), "{out:?}");
                        i += 1;
                    }
                }
                // Encoded text has no `+`, so both decoders give the bytes back.
                for plus in [Plus::Keep, Plus::Space] {
                    assert_eq!(decode(&out, plus), bytes, "{case:?} {plus:?}");
                }
            }
        }
    }

    #[test]
    fn any_text_decodes_consistently_with_its_offsets() {
        let mut rng = Rng(0x5EED_0FF5);
        // Mostly the characters that matter to a decoder.
        let alphabet = b"%%%+aF09gz/&= \xc3\xa9";
        for _ in 0..5_000 {
            let raw = rng.bytes(alphabet);
            for plus in [Plus::Keep, Plus::Space] {
                let (decoded, starts) = decode_with_offsets(&raw, plus);
                assert_eq!(decode(&raw, plus), decoded);
                assert_eq!(starts.len(), decoded.len() + 1);
                assert_eq!(starts.first(), Some(&0));
                assert_eq!(starts.last(), Some(&raw.len()));
                for (i, w) in starts.windows(2).enumerate() {
                    let text = &raw[w[0]..w[1]];
                    // Each byte's text decodes, alone, to that byte.
                    assert_eq!(decode(text, plus), [decoded[i]], "{raw:?}");
                }
            }
        }
    }
}
