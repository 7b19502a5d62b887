//! Host names as policy files and handles name them, and as requests carry them.
//!
//! A [`HostPattern`] is either an exact host (`api.example.test`, `127.0.0.2`, `::1`) or a
//! wildcard `*.example.test` that matches one or more labels below the suffix, never the suffix
//! itself. Matching is case-insensitive and ignores one trailing dot; [`normalize_host`] puts a
//! request's host into the form patterns are stored in, so a lookup is a string comparison.

use std::{borrow::Cow, fmt, net::Ipv6Addr};

/// Longest host name DNS allows, without the trailing dot.
const MAX_HOST_LEN: usize = 253;
/// Longest DNS label.
const MAX_LABEL_LEN: usize = 63;

/// Why a host pattern was refused. Each message says how to write it instead.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum HostError {
    #[error("the host is empty")]
    Empty,
    #[error("`*` alone would allow every host; name a domain, such as `*.example.test`")]
    BareWildcard,
    #[error("`*` may only be the whole leftmost label, as in `*.example.test`")]
    MisplacedWildcard,
    #[error("a host is a name, not a URL: drop the scheme and any path")]
    LooksLikeUrl,
    #[error("a host does not carry a port here; put the port in its own field")]
    HasPort,
    #[error("the host is {0} characters long; at most {MAX_HOST_LEN} are allowed")]
    TooLong(usize),
    #[error("the host has an empty label (a leading dot or two dots in a row)")]
    EmptyLabel,
    #[error("label {label:?} is longer than {MAX_LABEL_LEN} characters")]
    LabelTooLong { label: String },
    #[error("label {label:?} starts or ends with `-`")]
    HyphenAtEdge { label: String },
    #[error(
        "the host contains {0}, which is not allowed (ASCII letters, digits, `-`, `_` and `.`; \
         write internationalized names in punycode, `xn--...`)"
    )]
    BadChar(String),
}

/// A validated host pattern, stored lowercase without a trailing dot.
#[derive(Clone, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum HostPattern {
    /// Exactly this host: a DNS name, an IPv4 address, or an IPv6 address (canonical form, no
    /// brackets).
    Exact(String),
    /// `*.suffix`: any host one or more labels below `suffix` (stored without the `*.`).
    Wildcard(String),
}

impl HostPattern {
    /// Validates a pattern as an operator writes it: `api.example.test`, `*.example.test`,
    /// `127.0.0.2`, `::1` or `[::1]`. Upper case is accepted and lowered.
    pub fn parse(raw: &str) -> Result<Self, HostError> {
        if raw.is_empty() {
            return Err(HostError::Empty);
        }
        if raw.contains("://") || raw.contains('/') {
            return Err(HostError::LooksLikeUrl);
        }
        if let Some(ip) = parse_ipv6(raw) {
            return Ok(Self::Exact(ip.to_string()));
        }
        if raw.contains(':') {
            return Err(HostError::HasPort);
        }
        let lower = raw.to_ascii_lowercase();
        let name = lower.strip_suffix('.').unwrap_or(&lower);
        if name == "*" {
            return Err(HostError::BareWildcard);
        }
        match name.strip_prefix("*.") {
            Some(suffix) => {
                validate_name(suffix)?;
                Ok(Self::Wildcard(suffix.to_string()))
            }
            None => {
                validate_name(name)?;
                Ok(Self::Exact(name.to_string()))
            }
        }
    }

    /// Whether `host` (as a request names it, any case) matches.
    pub fn matches(&self, host: &str) -> bool {
        let Some(host) = normalize_host(host) else {
            return false;
        };
        match self {
            Self::Exact(exact) => *host == **exact,
            Self::Wildcard(suffix) => is_strictly_below(&host, suffix),
        }
    }

    /// Whether this is a `*.suffix` pattern.
    pub fn is_wildcard(&self) -> bool {
        matches!(self, Self::Wildcard(_))
    }
}

impl fmt::Display for HostPattern {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Exact(h) => f.write_str(h),
            Self::Wildcard(s) => write!(f, "*.{s}"),
        }
    }
}

/// Whether `host` is one or more labels below `suffix` (both normalized).
pub(crate) fn is_strictly_below(host: &str, suffix: &str) -> bool {
    host.strip_suffix(suffix)
        .and_then(|rest| rest.strip_suffix('.'))
        .is_some_and(|labels| !labels.is_empty())
}

/// A request's host (SNI, `Host` without port, or the original IP) in the form patterns are
/// stored in: ASCII lowercase, one trailing dot removed, IPv6 without brackets in canonical form.
/// `None` for something no pattern could match (empty, or not ASCII).
pub fn normalize_host(host: &str) -> Option<Cow<'_, str>> {
    if host.is_empty() || !host.is_ascii() {
        return None;
    }
    if host.contains(':') {
        return parse_ipv6(host).map(|ip| Cow::Owned(ip.to_string()));
    }
    let host = host.strip_suffix('.').unwrap_or(host);
    if host.is_empty() {
        return None;
    }
    if host.bytes().any(|b| b.is_ascii_uppercase()) {
        Some(Cow::Owned(host.to_ascii_lowercase()))
    } else {
        Some(Cow::Borrowed(host))
    }
}

fn parse_ipv6(raw: &str) -> Option<Ipv6Addr> {
    let inner = raw
        .strip_prefix('[')
        .and_then(|r| r.strip_suffix(']'))
        .unwrap_or(raw);
    inner.parse().ok()
}

/// Checks a lowercase DNS name (IPv4 literals pass as all-digit labels).
fn validate_name(name: &str) -> Result<(), HostError> {
    if name.is_empty() {
        return Err(HostError::EmptyLabel);
    }
    if name.len() > MAX_HOST_LEN {
        return Err(HostError::TooLong(name.len()));
    }
    if let Some(c) = name
        .chars()
        .find(|&c| !(c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.' | '*')))
    {
        let shown = if c.is_ascii_graphic() {
            format!("`{c}`")
        } else if c == ' ' {
            "a space".to_string()
        } else {
            format!("U+{:04X}", u32::from(c))
        };
        return Err(HostError::BadChar(shown));
    }
    for label in name.split('.') {
        if label.is_empty() {
            return Err(HostError::EmptyLabel);
        }
        if label.contains('*') {
            return Err(HostError::MisplacedWildcard);
        }
        if label.len() > MAX_LABEL_LEN {
            return Err(HostError::LabelTooLong {
                label: label.to_string(),
            });
        }
        if label.starts_with('-') || label.ends_with('-') {
            return Err(HostError::HyphenAtEdge {
                label: label.to_string(),
            });
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn pat(s: &str) -> HostPattern {
        HostPattern::parse(s).expect(s)
    }

    #[test]
    fn exact_and_wildcard_forms() {
        assert_eq!(
            pat("api.example.test"),
            HostPattern::Exact("api.example.test".into())
        );
        assert_eq!(
            pat("API.Example.Test."),
            HostPattern::Exact("api.example.test".into())
        );
        assert_eq!(
            pat("*.example.test"),
            HostPattern::Wildcard("example.test".into())
        );
        assert_eq!(pat("*.example.test").to_string(), "*.example.test");
        assert_eq!(pat("127.0.0.2"), HostPattern::Exact("127.0.0.2".into()));
        assert_eq!(pat("::1"), HostPattern::Exact("::1".into()));
        assert_eq!(pat("[0:0::1]"), HostPattern::Exact("::1".into()));
        assert_eq!(pat("localhost"), HostPattern::Exact("localhost".into()));
        assert_eq!(
            pat("_dmarc.example.test"),
            HostPattern::Exact("_dmarc.example.test".into())
        );
        assert_eq!(
            pat("xn--bcher-kva.test"),
            HostPattern::Exact("xn--bcher-kva.test".into())
        );
    }

    #[test]
    fn bad_patterns_say_why() {
        for (raw, want) in [
            ("", HostError::Empty),
            ("*", HostError::BareWildcard),
            ("*.", HostError::BareWildcard),
            ("**.example.test", HostError::MisplacedWildcard),
            ("*example.test", HostError::MisplacedWildcard),
            ("api*.example.test", HostError::MisplacedWildcard),
            ("api.*.test", HostError::MisplacedWildcard),
            ("*.*.test", HostError::MisplacedWildcard),
            ("https://api.example.test", HostError::LooksLikeUrl),
            ("api.example.test/v1", HostError::LooksLikeUrl),
            ("api.example.test:443", HostError::HasPort),
            ("api..example.test", HostError::EmptyLabel),
            (".example.test", HostError::EmptyLabel),
            ("*..test", HostError::EmptyLabel),
            (
                "-api.example.test",
                HostError::HyphenAtEdge {
                    label: "-api".into(),
                },
            ),
            ("api example.test", HostError::BadChar("a space".into())),
            ("bücher.test", HostError::BadChar("U+00FC".into())),
            ("api!.test", HostError::BadChar("`!`".into())),
        ] {
            assert_eq!(HostPattern::parse(raw), Err(want), "{raw:?}");
        }
        let long_label = format!("{}.test", "a".repeat(64));
        assert!(matches!(
            HostPattern::parse(&long_label),
            Err(HostError::LabelTooLong { .. })
        ));
        let long = ["abcdefghi"; 30].join(".");
        assert_eq!(HostPattern::parse(&long), Err(HostError::TooLong(299)));
    }

    #[test]
    fn matching_is_case_insensitive_and_wildcards_need_a_label() {
        let exact = pat("api.example.test");
        assert!(exact.matches("api.example.test"));
        assert!(exact.matches("API.EXAMPLE.TEST"));
        assert!(exact.matches("api.example.test."));
        assert!(!exact.matches("x.api.example.test"));
        assert!(!exact.matches("example.test"));

        let wild = pat("*.example.test");
        assert!(wild.matches("api.example.test"));
        assert!(wild.matches("a.b.example.test"));
        assert!(wild.matches("Api.Example.Test"));
        assert!(!wild.matches("example.test"));
        assert!(!wild.matches("badexample.test"));
        assert!(!wild.matches(".example.test"));
        assert!(!wild.matches("example.test.evil"));

        let v6 = pat("::1");
        assert!(v6.matches("[::1]"));
        assert!(v6.matches("0:0:0:0:0:0:0:1"));
        assert!(!v6.matches("::2"));
    }

    #[test]
    fn normalization() {
        assert_eq!(
            normalize_host("api.example.test").as_deref(),
            Some("api.example.test")
        );
        assert!(matches!(
            normalize_host("api.example.test"),
            Some(Cow::Borrowed(_))
        ));
        assert_eq!(
            normalize_host("API.example.test.").as_deref(),
            Some("api.example.test")
        );
        assert_eq!(normalize_host("[::1]").as_deref(), Some("::1"));
        assert_eq!(normalize_host(""), None);
        assert_eq!(normalize_host("."), None);
        assert_eq!(normalize_host("bücher.test"), None);
        assert_eq!(normalize_host("a:b"), None);
    }
}
