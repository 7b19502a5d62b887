//! Canary secrets: random values the tests store in the vault and then look for everywhere the
//! agent (or a log) could see them.
//!
//! A canary is never printed. Its `Debug` shows only its sha256; every text the harness prints
//! in a failure message (brokerd's log, brokerctl output, client output) goes through [`redact`],
//! which replaces any registered canary, in any of the encodings [`Canary::find_in`] looks for,
//! with `<canary sha256:...>`.

use std::{fmt, sync::Mutex};

use data_encoding::{BASE64, BASE64_NOPAD, BASE64URL_NOPAD, HEXLOWER, HEXUPPER};
use sha2::{Digest as _, Sha256};

/// Every canary made by this test process, for [`redact`].
static REGISTRY: Mutex<Vec<(Vec<u8>, String)>> = Mutex::new(Vec::new());

/// sha256 of `bytes`, lowercase hex.
pub fn sha256_hex(bytes: &[u8]) -> String {
    HEXLOWER.encode(&Sha256::digest(bytes))
}

/// A random secret value, `abtest-secret-` + 32 hex digits (nothing like a real key).
#[derive(Clone, PartialEq, Eq)]
pub struct Canary {
    value: String,
}

impl Canary {
    /// A fresh random canary with the given prefix (e.g. `abtest-secret-`).
    pub fn with_prefix(prefix: &str) -> Self {
        let mut raw = [0u8; 16];
        getrandom::fill(&mut raw).unwrap_or_else(|e| panic!("getrandom failed: {e}"));
        let canary = Self {
            value: format!("{prefix}{}", HEXLOWER.encode(&raw)),
        };
        canary.register();
        canary
    }

    /// A fresh random secret, `abtest-secret-<32 hex>`.
    pub fn new() -> Self {
        Self::with_prefix("abtest-secret-")
    }

    /// A fresh random value of `prefix` and `len` characters drawn uniformly from `alphabet`
    /// (e.g. a `ghp_`-like key: `ghp_` and 36 letters and digits), for what a key's form
    /// matters to. Made here, per test: nothing like it is written anywhere.
    pub fn shaped(prefix: &str, alphabet: &[u8], len: usize) -> Self {
        assert!(
            !alphabet.is_empty() && alphabet.len() <= 256,
            "an alphabet of 1 to 256 characters"
        );
        // Bytes at or above `limit` are drawn again, so every character is equally likely.
        let limit = 256 - 256 % alphabet.len();
        let mut value = prefix.to_string();
        while value.len() < prefix.len() + len {
            let mut raw = [0u8; 64];
            getrandom::fill(&mut raw).unwrap_or_else(|e| panic!("getrandom failed: {e}"));
            for b in raw {
                if usize::from(b) < limit && value.len() < prefix.len() + len {
                    value.push(char::from(alphabet[usize::from(b) % alphabet.len()]));
                }
            }
        }
        let canary = Self { value };
        canary.register();
        canary
    }

    /// Registers a value that must be redacted from printed text (e.g. a handle token).
    pub fn adopt(value: &str) -> Self {
        let canary = Self {
            value: value.to_string(),
        };
        canary.register();
        canary
    }

    fn register(&self) {
        if let Ok(mut r) = REGISTRY.lock() {
            for needle in self.needles() {
                r.push((needle.1, self.sha256()));
            }
            // Longest first, so a longer encoding is replaced before a substring of it.
            r.sort_by_key(|(n, _)| std::cmp::Reverse(n.len()));
        }
    }

    /// The value, to hand to brokerctl (stdin) or to compare hashes. Never print it.
    pub fn expose(&self) -> &str {
        &self.value
    }

    pub fn len(&self) -> usize {
        self.value.len()
    }

    pub fn is_empty(&self) -> bool {
        self.value.is_empty()
    }

    /// sha256 of the value, lowercase hex.
    pub fn sha256(&self) -> String {
        sha256_hex(self.value.as_bytes())
    }

    /// sha256 of `prefix + value` (e.g. the whole `Bearer <value>` header).
    pub fn sha256_with_prefix(&self, prefix: &str) -> String {
        sha256_hex(format!("{prefix}{}", self.value).as_bytes())
    }

    /// The byte strings that betray the value: raw, hex, percent-encoded, JSON-escaped, and the
    /// base64 forms (standard, URL-safe, and the core of the value inside a longer base64 text
    /// at each of the three alignments). As (encoding name, bytes).
    pub fn needles(&self) -> Vec<(&'static str, Vec<u8>)> {
        let v = self.value.as_bytes();
        let mut out: Vec<(&'static str, Vec<u8>)> = vec![
            ("raw", v.to_vec()),
            ("hex", HEXLOWER.encode(v).into_bytes()),
            ("HEX", HEXUPPER.encode(v).into_bytes()),
            ("base64", BASE64.encode(v).into_bytes()),
            ("base64url", BASE64URL_NOPAD.encode(v).into_bytes()),
        ];
        for k in 0..3usize {
            let mut padded = vec![0u8; k];
            padded.extend_from_slice(v);
            let enc = BASE64_NOPAD.encode(&padded);
            // Characters that depend only on the value's bits.
            let start = (8 * k).div_ceil(6);
            let end = (8 * (k + v.len())) / 6;
            if end > start + 8 {
                out.push(("base64-aligned", enc.as_bytes()[start..end].to_vec()));
                let url = enc.replace('+', "-").replace('/', "_");
                out.push(("base64url-aligned", url.as_bytes()[start..end].to_vec()));
            }
        }
        let pct: String = v
            .iter()
            .map(|&b| {
                if b.is_ascii_alphanumeric() || b"-._~".contains(&b) {
                    (b as char).to_string()
                } else {
                    format!("%{b:02X}")
                }
            })
            .collect();
        out.push(("percent", pct.into_bytes()));
        out.push((
            "json",
            serde_json::to_string(&self.value)
                .unwrap_or_default()
                .trim_matches('"')
                .as_bytes()
                .to_vec(),
        ));
        // Keep the first (most telling) name of identical byte strings: "raw" before "json".
        let mut unique: Vec<(&'static str, Vec<u8>)> = Vec::with_capacity(out.len());
        for (name, bytes) in out {
            if !unique.iter().any(|(_, b)| *b == bytes) {
                unique.push((name, bytes));
            }
        }
        unique
    }

    /// Where the value (in any encoding of [`Canary::needles`]) occurs in `haystack`: the
    /// encoding's name and the byte offset of the first hit.
    pub fn find_in(&self, haystack: &[u8]) -> Option<(&'static str, usize)> {
        self.needles()
            .into_iter()
            .filter_map(|(name, n)| find(haystack, &n).map(|at| (name, at)))
            .min_by_key(|&(_, at)| at)
    }

    /// Panics (without printing the value) when it occurs in `haystack`; `what` names the
    /// haystack.
    pub fn assert_absent(&self, haystack: &[u8], what: &str) {
        if let Some((encoding, at)) = self.find_in(haystack) {
            panic!(
                "{what} contains the secret {self:?} ({encoding}) at byte {at} of {}; redacted \
                 text:\n{}",
                haystack.len(),
                redact(&String::from_utf8_lossy(haystack))
            );
        }
    }
}

impl Default for Canary {
    fn default() -> Self {
        Self::new()
    }
}

impl fmt::Debug for Canary {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "Canary(sha256:{}, {} bytes)",
            &self.sha256()[..16],
            self.value.len()
        )
    }
}

/// Where `needle` first occurs in `haystack`.
pub fn find(haystack: &[u8], needle: &[u8]) -> Option<usize> {
    if needle.is_empty() || needle.len() > haystack.len() {
        return None;
    }
    haystack.windows(needle.len()).position(|w| w == needle)
}

/// `text` with every registered canary (in every encoding) replaced by `<canary sha256:...>`.
pub fn redact(text: &str) -> String {
    let Ok(registry) = REGISTRY.lock() else {
        return "<text withheld: the canary registry is poisoned>".into();
    };
    let mut out = text.as_bytes().to_vec();
    for (needle, hash) in registry.iter() {
        if find(&out, needle).is_none() {
            continue;
        }
        let label = format!("<canary sha256:{}>", &hash[..16]);
        let mut next = Vec::with_capacity(out.len());
        let mut i = 0;
        while i < out.len() {
            if out[i..].starts_with(needle) {
                next.extend_from_slice(label.as_bytes());
                i += needle.len();
            } else {
                next.push(out[i]);
                i += 1;
            }
        }
        out = next;
    }
    String::from_utf8_lossy(&out).into_owned()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn finds_and_redacts_every_encoding() {
        let c = Canary::new();
        assert_eq!(c.len(), "abtest-secret-".len() + 32);
        let v = c.expose().to_string();
        for (name, n) in c.needles() {
            let text = format!("before {} after", String::from_utf8_lossy(&n));
            assert!(c.find_in(text.as_bytes()).is_some(), "{name}");
            let red = redact(&text);
            assert!(c.find_in(red.as_bytes()).is_none(), "{name}: {red}");
            assert!(red.contains("<canary sha256:"), "{name}");
        }
        // A base64 echo of a whole header finds the value inside it.
        let header = BASE64.encode(format!("Bearer {v}").as_bytes());
        assert!(c.find_in(header.as_bytes()).is_some());
        let basic = BASE64.encode(format!("user:{v}").as_bytes());
        assert!(c.find_in(basic.as_bytes()).is_some());
        assert!(!format!("{c:?}").contains(&v));
        assert!(c.find_in(b"nothing to see").is_none());
    }
}
