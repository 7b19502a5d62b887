//! The three parts of a canonical request that need more than copying: the URI path, the query
//! string and the header block.
//!
//! The path is taken as the request line carries it (still percent-encoded). Every service but
//! S3 removes `.` and `..` segments and empty segments, then percent-encodes each segment again,
//! so `%20` on the wire becomes `%2520` (AWS's "double encoding"); S3 uses the path exactly as
//! sent. This is what botocore and the other SDKs compute, so a path the agent's SDK signed
//! verifies here unchanged.
//!
//! The query is decoded and re-encoded with RFC 3986's unreserved set and uppercase hex (`+` is
//! a plus, not a space), then sorted by encoded name, then by encoded value; a parameter without
//! `=` has an empty value.
//!
//! Header names are lowercased; each value is trimmed and every run of whitespace inside it
//! becomes one space; repeated headers are joined with `,` in the order they arrived.

use http::HeaderMap;
use zeroize::Zeroizing;

use crate::percent::{self, HexCase, Plus};

/// How the canonical URI is derived from the request path.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum UriPath {
    /// Every service but S3: remove dot and empty segments, then percent-encode each segment.
    Normalize,
    /// S3: the path exactly as the request line carries it.
    AsSent,
}

impl UriPath {
    /// The rule the named service (the credential scope's service) follows: S3 (`s3`, and S3
    /// Express's `s3express`) takes the path as sent, every other service normalizes it.
    pub fn for_service(service: &str) -> Self {
        match service {
            "s3" | "s3express" => Self::AsSent,
            _ => Self::Normalize,
        }
    }
}

/// The canonical URI of `path` under `rule`.
pub fn canonical_uri(path: &str, rule: UriPath) -> String {
    if path.is_empty() {
        return "/".to_owned();
    }
    match rule {
        UriPath::AsSent => path.to_owned(),
        UriPath::Normalize => {
            let mut segments: Vec<&str> = Vec::new();
            for segment in path.split('/') {
                match segment {
                    "" | "." => {}
                    ".." => {
                        segments.pop();
                    }
                    s => segments.push(s),
                }
            }
            let mut out = Zeroizing::new(Vec::with_capacity(path.len() + 8));
            if path.starts_with('/') {
                out.push(b'/');
            }
            for (i, segment) in segments.iter().enumerate() {
                if i > 0 {
                    out.push(b'/');
                }
                percent::encode_into(segment.as_bytes(), &mut out, HexCase::Upper);
            }
            if path.ends_with('/') && !segments.is_empty() {
                out.push(b'/');
            }
            // Only unreserved characters, `/` and `%XX` escapes were written.
            String::from_utf8_lossy(&out).into_owned()
        }
    }
}

/// The canonical query string of `query` (without the `?`); empty for none.
pub fn canonical_query(query: Option<&str>) -> String {
    let Some(query) = query else {
        return String::new();
    };
    let mut pairs: Vec<(String, String)> = query
        .split('&')
        .filter(|pair| !pair.is_empty())
        .map(|pair| {
            let (name, value) = pair.split_once('=').unwrap_or((pair, ""));
            (reencode(name), reencode(value))
        })
        .collect();
    pairs.sort();
    let mut out = String::with_capacity(query.len() + 8);
    for (i, (name, value)) in pairs.iter().enumerate() {
        if i > 0 {
            out.push('&');
        }
        out.push_str(name);
        out.push('=');
        out.push_str(value);
    }
    out
}

/// `raw` decoded, then encoded with RFC 3986's unreserved set and uppercase hex.
fn reencode(raw: &str) -> String {
    let decoded = percent::decode(raw.as_bytes(), Plus::Keep);
    let mut out = Zeroizing::new(Vec::with_capacity(decoded.len() * 3));
    percent::encode_into(&decoded, &mut out, HexCase::Upper);
    String::from_utf8_lossy(&out).into_owned()
}

/// Appends the canonical header lines (`name:value\n`) for `signed` (lowercase names, sorted)
/// from `headers`. Returns the first signed name that `headers` lacks, as an error.
pub(crate) fn canonical_headers_into<'a>(
    headers: &HeaderMap,
    signed: &'a [String],
    out: &mut Vec<u8>,
) -> Result<(), &'a str> {
    for name in signed {
        let mut values = headers.get_all(name.as_str()).iter().peekable();
        if values.peek().is_none() {
            return Err(name);
        }
        out.extend_from_slice(name.as_bytes());
        out.push(b':');
        for (i, value) in values.enumerate() {
            if i > 0 {
                out.push(b',');
            }
            push_trimmed(value.as_bytes(), out);
        }
        out.push(b'\n');
    }
    Ok(())
}

/// Appends `value` trimmed, with each run of whitespace inside it written as one space.
fn push_trimmed(value: &[u8], out: &mut Vec<u8>) {
    let mut first = true;
    for word in value
        .split(|b| b.is_ascii_whitespace())
        .filter(|w| !w.is_empty())
    {
        if !first {
            out.push(b' ');
        }
        out.extend_from_slice(word);
        first = false;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn normalized_paths() {
        for (path, expected) in [
            ("", "/"),
            ("/", "/"),
            ("//", "/"),
            ("/./", "/"),
            ("/./example", "/example"),
            ("//example//", "/example/"),
            ("/example/..", "/"),
            ("/example1/example2/../..", "/"),
            ("/a/b/../c/", "/a/c/"),
            ("/..", "/"),
            ("/example space/", "/example%20space/"),
            ("/example%20space/", "/example%2520space/"),
            ("/\u{1234}", "/%E1%88%B4"),
            ("/a:b@c!d$e", "/a%3Ab%40c%21d%24e"),
            (
                "/-._~0123456789ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz",
                "/-._~0123456789ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz",
            ),
        ] {
            assert_eq!(canonical_uri(path, UriPath::Normalize), expected, "{path}");
        }
    }

    #[test]
    fn s3_paths_are_used_as_sent() {
        for path in [
            "//example//",
            "/./",
            "/a/../b",
            "/key%20with%20spaces",
            "/a%2Fb",
        ] {
            assert_eq!(canonical_uri(path, UriPath::AsSent), path);
        }
        assert_eq!(canonical_uri("", UriPath::AsSent), "/");
        assert_eq!(UriPath::for_service("s3"), UriPath::AsSent);
        assert_eq!(UriPath::for_service("s3express"), UriPath::AsSent);
        assert_eq!(UriPath::for_service("iam"), UriPath::Normalize);
        assert_eq!(UriPath::for_service("service"), UriPath::Normalize);
    }

    #[test]
    fn queries_are_reencoded_and_sorted() {
        for (query, expected) in [
            (None, ""),
            (Some(""), ""),
            (
                Some("Param2=value2&Param1=value1"),
                "Param1=value1&Param2=value2",
            ),
            (
                Some("Param-3=Value3&Param=Value2&%E1%88%B4=Value1"),
                "%E1%88%B4=Value1&Param=Value2&Param-3=Value3",
            ),
            (Some("\u{1234}=bar"), "%E1%88%B4=bar"),
            (Some("b=2&a&c="), "a=&b=2&c="),
            (Some("a=2&a=1&A=3"), "A=3&a=1&a=2"),
            (Some("k=a b+c%2bd%2Fe/f"), "k=a%20b%2Bc%2Bd%2Fe%2Ff"),
            (Some("x=%7e%7E~"), "x=~~~"),
            (Some("a=1&&b=2&"), "a=1&b=2"),
            (Some("uploads"), "uploads="),
            (Some("k=v=w"), "k=v%3Dw"),
        ] {
            assert_eq!(canonical_query(query), expected, "{query:?}");
        }
    }

    #[test]
    fn header_values_are_trimmed_and_joined() {
        let mut headers = HeaderMap::new();
        headers.insert("host", "example.amazonaws.com".parse().expect("value"));
        headers.append("my-header1", "  value1  ".parse().expect("value"));
        headers.append("my-header1", "a \t  b".parse().expect("value"));
        headers.insert("my-header2", "\"a   b   c\"".parse().expect("value"));
        let signed: Vec<String> = ["host", "my-header1", "my-header2"]
            .map(String::from)
            .to_vec();
        let mut out = Vec::new();
        canonical_headers_into(&headers, &signed, &mut out).expect("all present");
        assert_eq!(
            String::from_utf8(out).expect("ASCII"),
            "host:example.amazonaws.com\nmy-header1:value1,a b\nmy-header2:\"a b c\"\n"
        );
        let missing: Vec<String> = vec!["host".into(), "x-amz-date".into()];
        assert_eq!(
            canonical_headers_into(&headers, &missing, &mut Vec::new()),
            Err("x-amz-date")
        );
    }
}
