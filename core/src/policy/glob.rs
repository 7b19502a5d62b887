//! Path patterns of `paths = [...]`: exact paths and globs, matched against a request's path
//! (without the query), case-sensitively.
//!
//! - no `*`: the path must be exactly this (`/v1/models`);
//! - `*` matches any characters within one segment, never a `/` (`/v1/chat/*` matches
//!   `/v1/chat/completions`, not `/v1/chat/a/b`);
//! - `**` matches any characters, `/` included (`/v1/**` matches everything below `/v1/`).
//!
//! Because a glob looks at the path as sent, a request path that a server could read as another
//! path is refused by rules with `paths` ([`is_canonical`]): dot segments, empty segments, a
//! backslash, percent-encoded `/`, `\` or `.`, and segments that are dot or empty once their
//! path parameters are stripped (`..;x`, `..%3b`, `;x`), as Tomcat-style servers read them.

use std::fmt;

/// Longest pattern accepted.
const MAX_PATTERN_LEN: usize = 1024;

/// Why a path pattern was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum GlobError {
    #[error("a path pattern starts with `/`")]
    NoLeadingSlash,
    #[error(
        "a path pattern matches the path only; the query (`?...`) and fragment (`#...`) are \
         not matched, drop them"
    )]
    HasQuery,
    #[error("`***` is not a pattern; use `*` (one segment) or `**` (any depth)")]
    TripleStar,
    #[error("{0} is not allowed in a path pattern")]
    BadChar(String),
    #[error(
        "`.` and `..` segments and empty segments (`//`) never match, since requests with them \
         are refused"
    )]
    DotSegment,
    #[error("percent-encoded `/`, `\\` or `.` never match, since requests with them are refused")]
    EncodedSeparator,
    #[error("the pattern is {0} characters long; at most {MAX_PATTERN_LEN} are allowed")]
    TooLong(usize),
}

#[derive(Clone, Debug, PartialEq, Eq, Hash)]
enum Token {
    Literal(String),
    /// `*`: any characters but `/`.
    Star,
    /// `**`: any characters.
    DoubleStar,
}

/// How a pattern is matched, chosen at parse time so common forms need no glob engine.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
enum Shape {
    Exact,
    /// `prefix**`.
    Prefix(String),
    /// `prefix*`.
    SegmentPrefix(String),
    Glob,
}

/// A validated path pattern.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub struct PathPattern {
    source: String,
    tokens: Vec<Token>,
    shape: Shape,
}

impl PathPattern {
    /// Validates a pattern as an operator writes it.
    pub fn parse(raw: &str) -> Result<Self, GlobError> {
        if raw.len() > MAX_PATTERN_LEN {
            return Err(GlobError::TooLong(raw.len()));
        }
        if !raw.starts_with('/') {
            return Err(GlobError::NoLeadingSlash);
        }
        if raw.contains(['?', '#']) {
            return Err(GlobError::HasQuery);
        }
        if let Some(c) = raw.chars().find(|&c| !c.is_ascii_graphic() || c == '\\') {
            return Err(GlobError::BadChar(if c == ' ' {
                "a space".into()
            } else if c.is_ascii_graphic() {
                format!("`{c}`")
            } else {
                format!("U+{:04X}", u32::from(c))
            }));
        }
        if raw.contains("***") {
            return Err(GlobError::TripleStar);
        }
        if has_encoded_separator(raw) {
            return Err(GlobError::EncodedSeparator);
        }
        if !is_canonical(raw) {
            return Err(GlobError::DotSegment);
        }
        let mut tokens = Vec::new();
        let mut literal = String::new();
        let mut rest = raw;
        while !rest.is_empty() {
            if let Some(r) = rest.strip_prefix("**") {
                flush(&mut literal, &mut tokens);
                tokens.push(Token::DoubleStar);
                rest = r;
            } else if let Some(r) = rest.strip_prefix('*') {
                flush(&mut literal, &mut tokens);
                tokens.push(Token::Star);
                rest = r;
            } else {
                let c = rest.chars().next().unwrap_or_default();
                literal.push(c);
                rest = &rest[c.len_utf8()..];
            }
        }
        flush(&mut literal, &mut tokens);
        let shape = match tokens.as_slice() {
            [Token::Literal(_)] => Shape::Exact,
            [Token::Literal(p), Token::DoubleStar] => Shape::Prefix(p.clone()),
            [Token::Literal(p), Token::Star] => Shape::SegmentPrefix(p.clone()),
            _ => Shape::Glob,
        };
        Ok(Self {
            source: raw.to_string(),
            tokens,
            shape,
        })
    }

    /// The pattern as written.
    pub fn as_str(&self) -> &str {
        &self.source
    }

    /// Whether `path` (no query) matches.
    pub fn matches(&self, path: &str) -> bool {
        match &self.shape {
            Shape::Exact => path == self.source,
            Shape::Prefix(p) => path.starts_with(p.as_str()),
            Shape::SegmentPrefix(p) => path
                .strip_prefix(p.as_str())
                .is_some_and(|rest| !rest.contains('/')),
            Shape::Glob => {
                let units: Vec<Unit> = path.chars().map(Unit::Char).collect();
                glob_match(&self.tokens, &units)
            }
        }
    }

    /// Whether every path this pattern matches, `parent` matches too. Sound but not complete:
    /// `true` is always right; a `false` for a pattern that is in fact covered only happens
    /// when no single reading of the parent's wildcards absorbs the child's (then the child
    /// must be written more narrowly).
    pub fn is_covered_by(&self, parent: &PathPattern) -> bool {
        let units: Vec<Unit> = self
            .tokens
            .iter()
            .flat_map(|t| -> Vec<Unit> {
                match t {
                    Token::Literal(s) => s.chars().map(Unit::Char).collect(),
                    Token::Star => vec![Unit::Star],
                    Token::DoubleStar => vec![Unit::DoubleStar],
                }
            })
            .collect();
        glob_match(&parent.tokens, &units)
    }
}

impl fmt::Display for PathPattern {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.source)
    }
}

fn flush(literal: &mut String, tokens: &mut Vec<Token>) {
    if !literal.is_empty() {
        tokens.push(Token::Literal(std::mem::take(literal)));
    }
}

/// What a pattern is matched against: a path's characters, or a child pattern's pieces (for
/// coverage, a child's wildcard is a unit only a parent wildcard as wide can absorb).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Unit {
    Char(char),
    Star,
    DoubleStar,
}

impl Unit {
    /// Whether a `*` may absorb this unit (it never produces a `/`).
    fn within_segment(self) -> bool {
        match self {
            Self::Char(c) => c != '/',
            Self::Star => true,
            Self::DoubleStar => false,
        }
    }
}

/// Whether `tokens` match the whole of `units`: one pass per token over the set of positions
/// reachable so far, so time is linear in the path per token (no backtracking blow-up).
fn glob_match(tokens: &[Token], units: &[Unit]) -> bool {
    let n = units.len();
    let mut reach = vec![false; n + 1];
    reach[0] = true;
    let mut next = vec![false; n + 1];
    for token in tokens {
        next.iter_mut().for_each(|r| *r = false);
        match token {
            Token::Literal(s) => {
                let lit: Vec<char> = s.chars().collect();
                for i in 0..=n {
                    if reach[i]
                        && i + lit.len() <= n
                        && lit
                            .iter()
                            .zip(&units[i..])
                            .all(|(c, u)| *u == Unit::Char(*c))
                    {
                        next[i + lit.len()] = true;
                    }
                }
            }
            Token::Star => {
                let mut open = false;
                for j in 0..=n {
                    open |= reach[j];
                    next[j] = open;
                    if j < n && !units[j].within_segment() {
                        open = false;
                    }
                }
            }
            Token::DoubleStar => {
                let mut open = false;
                for j in 0..=n {
                    open |= reach[j];
                    next[j] = open;
                }
            }
        }
        std::mem::swap(&mut reach, &mut next);
        if !reach.iter().any(|&r| r) {
            return false;
        }
    }
    reach[n]
}

/// Whether `s` contains `%2f`, `%5c` or `%2e` in any case.
fn has_encoded_separator(s: &str) -> bool {
    s.as_bytes().windows(3).any(|w| {
        w[0] == b'%'
            && matches!(
                (w[1], w[2].to_ascii_lowercase()),
                (b'2', b'f') | (b'5', b'c') | (b'2', b'e')
            )
    })
}

/// Whether a request path reads the same to every server: starts with `/`, no `.`/`..` or
/// empty segments (also after stripping `;` or `%3b` path parameters), no backslash, no
/// percent-encoded `/`, `\` or `.`. Rules with `paths` only match such paths.
pub fn is_canonical(path: &str) -> bool {
    let Some(rest) = path.strip_prefix('/') else {
        return false;
    };
    if path.contains('\\') || has_encoded_separator(path) {
        return false;
    }
    let mut segments = rest.split('/').peekable();
    while let Some(segment) = segments.next() {
        let last = segments.peek().is_none();
        if matches!(segment, "." | "..") || (segment.is_empty() && !last) {
            return false;
        }
        // Servers that strip path parameters (Tomcat, Jetty, Spring) read `..;x` as `..` and
        // `;x` as an empty segment, whether the `;` is literal or `%3b`.
        let name = segment_name(segment);
        if name.len() != segment.len() && matches!(name, "" | "." | "..") {
            return false;
        }
    }
    true
}

/// A segment without its path parameters: what precedes the first `;` or `%3b` (any case).
fn segment_name(segment: &str) -> &str {
    let bytes = segment.as_bytes();
    let end = (0..bytes.len())
        .find(|&i| {
            bytes[i] == b';'
                || (bytes[i] == b'%'
                    && bytes.get(i + 1) == Some(&b'3')
                    && bytes.get(i + 2).map(u8::to_ascii_lowercase) == Some(b'b'))
        })
        .unwrap_or(bytes.len());
    &segment[..end]
}

#[cfg(test)]
mod tests {
    use super::*;

    fn pat(s: &str) -> PathPattern {
        PathPattern::parse(s).unwrap_or_else(|e| panic!("{s}: {e}"))
    }

    #[test]
    fn exact_star_and_double_star() {
        let exact = pat("/v1/models");
        assert!(exact.matches("/v1/models"));
        assert!(!exact.matches("/v1/models/"));
        assert!(!exact.matches("/v1/models/x"));
        assert!(!exact.matches("/V1/models"));

        let star = pat("/v1/chat/*");
        assert!(star.matches("/v1/chat/completions"));
        assert!(star.matches("/v1/chat/"));
        assert!(!star.matches("/v1/chat"));
        assert!(!star.matches("/v1/chat/a/b"));

        let deep = pat("/v1/**");
        assert!(deep.matches("/v1/"));
        assert!(deep.matches("/v1/a/b/c"));
        assert!(!deep.matches("/v1"));
        assert!(!deep.matches("/v2/a"));

        let mid = pat("/v*/files/*/content");
        assert!(mid.matches("/v1/files/abc/content"));
        assert!(mid.matches("/v/files/x/content"));
        assert!(!mid.matches("/v1/files/a/b/content"));
        assert!(!mid.matches("/v1/x/files/a/content"));

        let mixed = pat("/repos/**/pulls/*");
        assert!(mixed.matches("/repos/o/r/pulls/1"));
        assert!(mixed.matches("/repos//pulls/1"));
        assert!(!mixed.matches("/repos/o/r/pulls/1/files"));

        let suffix = pat("/**.json");
        assert!(suffix.matches("/a/b.json"));
        assert!(!suffix.matches("/a/b.jsonx"));

        assert!(pat("/").matches("/"));
        assert!(!pat("/").matches("/x"));
        assert!(pat("/*").matches("/x"));
        assert!(pat("/**").matches("/x/y"));
        assert!(pat("/a*b*c").matches("/aXbYc"));
        assert!(pat("/a*b*c").matches("/abc"));
        assert!(!pat("/a*b*c").matches("/a/b/c"));
    }

    #[test]
    fn long_paths_do_not_blow_up() {
        let p = pat("/**a**a**a**a**a**b");
        let path = format!("/{}", "a".repeat(5000));
        assert!(!p.matches(&path));
    }

    #[test]
    fn bad_patterns_say_why() {
        for (raw, want) in [
            ("v1/models", GlobError::NoLeadingSlash),
            ("", GlobError::NoLeadingSlash),
            ("/v1/models?x=1", GlobError::HasQuery),
            ("/v1/#x", GlobError::HasQuery),
            ("/v1/***", GlobError::TripleStar),
            ("/v1/a b", GlobError::BadChar("a space".into())),
            ("/v1\\a", GlobError::BadChar("`\\`".into())),
            ("/v1/../x", GlobError::DotSegment),
            ("/v1/./x", GlobError::DotSegment),
            ("/v1//x", GlobError::DotSegment),
            ("/v1/%2e%2e/x", GlobError::EncodedSeparator),
            ("/v1%2Fx", GlobError::EncodedSeparator),
        ] {
            assert_eq!(PathPattern::parse(raw), Err(want), "{raw:?}");
        }
        assert!(matches!(
            PathPattern::parse(&format!("/{}", "a".repeat(1100))),
            Err(GlobError::TooLong(_))
        ));
        assert!(PathPattern::parse("/v1/a%20b").is_ok());
        assert!(PathPattern::parse("/v1/").is_ok());
    }

    #[test]
    fn canonical_paths() {
        for ok in [
            "/",
            "/v1",
            "/v1/",
            "/v1/a.b",
            "/v1/..a",
            "/a%20b",
            "/v1/a;v=1/b",
            "/v1/...;x",
            "/v1/x%3Bb",
        ] {
            assert!(is_canonical(ok), "{ok}");
        }
        for bad in [
            "",
            "*",
            "v1",
            "/v1/../x",
            "/v1/./x",
            "/v1/..",
            "/v1//x",
            "//v1",
            "/v1\\x",
            "/v1/%2e%2e/x",
            "/v1/%2E/x",
            "/v1%2fx",
            "/v1%5Cx",
            "/v1/..;/admin",
            "/v1/..;x=1/admin",
            "/v1/.;/admin",
            "/v1/..%3b/admin",
            "/v1/..%3B/admin",
            "/v1/;/admin",
            "/v1/;x",
            "/v1/%3bx/admin",
        ] {
            assert!(!is_canonical(bad), "{bad}");
        }
    }

    #[test]
    fn coverage_is_sound() {
        let covered = |child: &str, parent: &str| pat(child).is_covered_by(&pat(parent));
        assert!(covered("/v1/models", "/v1/models"));
        assert!(covered("/v1/models", "/v1/*"));
        assert!(covered("/v1/models", "/v1/**"));
        assert!(covered("/v1/chat/*", "/v1/**"));
        assert!(covered("/v1/chat/*", "/v1/chat/*"));
        assert!(covered("/v1/chat/x*", "/v1/chat/*"));
        assert!(covered("/v1/**", "/**"));
        assert!(covered("/v1/a/**", "/v1/**"));
        assert!(covered("/v1/*/x", "/v1/**"));
        assert!(covered("/v1/*/x", "/v1/*/*"));
        assert!(!covered("/v1/**", "/v1/*"));
        assert!(!covered("/v1/*", "/v1/models"));
        assert!(!covered("/v2/x", "/v1/**"));
        assert!(!covered("/v1", "/v1/**"));
        assert!(!covered("/v1/a/b", "/v1/*"));
        assert!(!covered("/v1/chat/*", "/v1/chat/x*"));
    }
}
