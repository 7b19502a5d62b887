//! Credential injection: header templates such as `Bearer {secret:EXAMPLE_KEY}` and their
//! rendering into header values, and what a policy rule writes into a request ([`Injection`]:
//! headers, basic auth, query parameters). The broker writes the rendered result into the
//! request; this module decides what it is.
//!
//! Templates come from policy files and name secrets; they never hold values. Rendering asks a
//! caller-supplied lookup (the vault) for each named secret and returns the header value as
//! [`Zeroizing`] bytes, since from then on it is secret material. Pure: no I/O, no logging.
//!
//! Template syntax: literal text, `{secret:NAME}` placeholders, `{{` and `}}` for literal braces.
//! Anything else in braces is an error that names the template, so a typo such as
//! `{secrets:KEY}` fails at load instead of sending the typo upstream.

use std::{collections::BTreeSet, fmt};

use zeroize::Zeroizing;

use crate::secret::{SecretName, SecretValue};

mod rule;

pub(crate) use rule::parse_query_name;
pub use rule::{AwsSigV4, BasicAuth, CaptureTokens, Injection, QueryNameError, RenderedInjection};

/// Errors of this module. None carries a secret value.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum InjectError {
    #[error("invalid template {template:?}: {reason}")]
    Template { template: String, reason: String },
    #[error("invalid header name {name:?}: {reason}")]
    HeaderName { name: String, reason: String },
    #[error("header {name} is set more than once (header names are case-insensitive)")]
    DuplicateHeader { name: String },
    #[error("secret {name} is not in the vault")]
    MissingSecret { name: SecretName },
    #[error("secret {name} cannot be written into a header: {reason}")]
    UnusableSecret {
        name: SecretName,
        reason: &'static str,
    },
}

/// Bytes of a secret, as a lookup hands them to [`Template::render`].
///
/// Implemented for the vault's [`SecretValue`] and for plain byte containers, so the caller can
/// pass whatever it already holds without copying into a new type.
pub trait SecretBytes {
    /// The plaintext. Keep the borrow short; never log it.
    fn secret_bytes(&self) -> &[u8];
}

impl SecretBytes for SecretValue {
    fn secret_bytes(&self) -> &[u8] {
        self.expose()
    }
}

impl SecretBytes for Zeroizing<Vec<u8>> {
    fn secret_bytes(&self) -> &[u8] {
        self
    }
}

impl SecretBytes for [u8] {
    fn secret_bytes(&self) -> &[u8] {
        self
    }
}

impl<T: SecretBytes + ?Sized> SecretBytes for &T {
    fn secret_bytes(&self) -> &[u8] {
        (**self).secret_bytes()
    }
}

/// One piece of a template.
#[derive(Clone, Debug, PartialEq, Eq)]
enum Part {
    Literal(String),
    Secret(SecretName),
}

/// A parsed header value template.
#[derive(Clone, PartialEq, Eq)]
pub struct Template {
    /// The text as written in the policy (for `policy show` and error messages).
    source: String,
    parts: Vec<Part>,
}

impl Template {
    /// Parses `Bearer {secret:NAME}`-style text.
    pub fn parse(source: &str) -> Result<Self, InjectError> {
        let fail = |reason: String| InjectError::Template {
            template: source.to_string(),
            reason,
        };
        if source.is_empty() {
            return Err(fail("the template is empty".into()));
        }
        let mut parts = Vec::new();
        let mut literal = String::new();
        let mut rest = source;
        while let Some(c) = rest.chars().next() {
            let at = source.len() - rest.len();
            match c {
                '{' if rest.starts_with("{{") => {
                    literal.push('{');
                    rest = &rest[2..];
                }
                '}' if rest.starts_with("}}") => {
                    literal.push('}');
                    rest = &rest[2..];
                }
                '}' => {
                    return Err(fail(format!(
                        "unmatched `}}` at byte {at} (write `}}}}` for a literal brace)"
                    )));
                }
                '{' => {
                    let Some(end) = rest.find('}') else {
                        return Err(fail(format!(
                            "unclosed `{{` at byte {at} (write `{{{{` for a literal brace)"
                        )));
                    };
                    let inner = &rest[1..end];
                    let Some(name) = inner.strip_prefix("secret:") else {
                        return Err(fail(format!(
                            "unknown placeholder `{{{inner}}}` at byte {at}; the only placeholder \
                             is `{{secret:NAME}}` (write `{{{{` for a literal brace)"
                        )));
                    };
                    let name = SecretName::new(name)
                        .map_err(|e| fail(format!("placeholder at byte {at}: {e}")))?;
                    if !literal.is_empty() {
                        parts.push(Part::Literal(std::mem::take(&mut literal)));
                    }
                    parts.push(Part::Secret(name));
                    rest = &rest[end + 1..];
                }
                c if is_header_value_char(c) => {
                    literal.push(c);
                    rest = &rest[c.len_utf8()..];
                }
                c => {
                    return Err(fail(format!(
                        "character U+{:04X} at byte {at} cannot appear in a header value",
                        u32::from(c)
                    )));
                }
            }
        }
        if !literal.is_empty() {
            parts.push(Part::Literal(literal));
        }
        Ok(Self {
            source: source.to_string(),
            parts,
        })
    }

    /// The template as written.
    pub fn as_str(&self) -> &str {
        &self.source
    }

    /// The secrets this template names, in order of appearance (repeats included).
    pub fn secret_names(&self) -> impl Iterator<Item = &SecretName> {
        self.parts.iter().filter_map(|p| match p {
            Part::Secret(name) => Some(name),
            Part::Literal(_) => None,
        })
    }

    /// Renders the header value, looking each secret up. A missing secret is an error naming
    /// it; so is a value that would break the header (empty, CR, LF or NUL).
    pub fn render<F, V>(&self, mut lookup: F) -> Result<Zeroizing<Vec<u8>>, InjectError>
    where
        F: FnMut(&SecretName) -> Option<V>,
        V: SecretBytes,
    {
        let mut out = Zeroizing::new(Vec::new());
        for part in &self.parts {
            match part {
                Part::Literal(text) => out.extend_from_slice(text.as_bytes()),
                Part::Secret(name) => {
                    let value = lookup(name)
                        .ok_or_else(|| InjectError::MissingSecret { name: name.clone() })?;
                    let bytes = value.secret_bytes();
                    check_secret(name, bytes)?;
                    // Grow through a zeroizing buffer: `extend` may reallocate and would leave
                    // a plaintext copy behind in the freed block.
                    reserve_zeroizing(&mut out, bytes.len());
                    out.extend_from_slice(bytes);
                }
            }
        }
        Ok(out)
    }
}

impl fmt::Debug for Template {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        // Templates hold names, not values: showing them is safe.
        write!(f, "Template({:?})", self.source)
    }
}

impl fmt::Display for Template {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.source)
    }
}

/// Grows `buf` so that `extra` more bytes fit without reallocating, zeroizing the old block if a
/// reallocation is needed.
pub fn reserve_zeroizing(buf: &mut Zeroizing<Vec<u8>>, extra: usize) {
    let needed = buf.len() + extra;
    if needed > buf.capacity() {
        let mut grown = Zeroizing::new(Vec::with_capacity(needed.max(buf.capacity() * 2)));
        grown.extend_from_slice(buf);
        // The old buffer is zeroized when it drops here.
        *buf = grown;
    }
}

fn check_secret(name: &SecretName, bytes: &[u8]) -> Result<(), InjectError> {
    let reason = if bytes.is_empty() {
        "the value is empty"
    } else if bytes.iter().any(|&b| matches!(b, b'\r' | b'\n' | 0)) {
        "the value contains CR, LF or NUL"
    } else {
        return Ok(());
    };
    Err(InjectError::UnusableSecret {
        name: name.clone(),
        reason,
    })
}

/// Whether a template's literal text may contain `c`: tab, visible ASCII, space, or non-ASCII
/// (sent as UTF-8 obs-text).
fn is_header_value_char(c: char) -> bool {
    c == '\t' || c == ' ' || c.is_ascii_graphic() || !c.is_ascii()
}

/// Headers a rule may not set: they frame the message or name its destination, and the proxy
/// owns them (a rule setting `host` could send a request somewhere its SNI does not say).
const RESERVED_HEADERS: &[&str] = &[
    "connection",
    "content-length",
    "host",
    "keep-alive",
    "proxy-connection",
    "te",
    "trailer",
    "transfer-encoding",
    "upgrade",
];

/// Validates a header name for injection and returns it lowercase.
pub fn parse_header_name(raw: &str) -> Result<String, InjectError> {
    let fail = |reason: String| InjectError::HeaderName {
        name: raw.to_string(),
        reason,
    };
    if raw.is_empty() {
        return Err(fail("the name is empty".into()));
    }
    if let Some(c) = raw.chars().find(|&c| !is_token_char(c)) {
        return Err(fail(format!(
            "{} is not allowed (header names are letters, digits and !#$%&'*+-.^_`|~)",
            if c.is_ascii_graphic() {
                format!("`{c}`")
            } else if c == ' ' {
                "a space".to_string()
            } else {
                format!("U+{:04X}", u32::from(c))
            }
        )));
    }
    let lower = raw.to_ascii_lowercase();
    if RESERVED_HEADERS.contains(&lower.as_str()) {
        return Err(fail("the broker manages this header itself".into()));
    }
    Ok(lower)
}

/// RFC 9110 `tchar`.
fn is_token_char(c: char) -> bool {
    c.is_ascii_alphanumeric() || "!#$%&'*+-.^_`|~".contains(c)
}

/// The headers one rule injects.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct InjectSpec {
    /// Lowercase header name and its template, sorted by name, names unique.
    headers: Vec<(String, Template)>,
}

impl InjectSpec {
    /// Nothing to inject.
    pub fn empty() -> Self {
        Self::default()
    }

    /// Builds a spec from raw `(name, template)` pairs, validating both.
    pub fn parse<'a>(
        headers: impl IntoIterator<Item = (&'a str, &'a str)>,
    ) -> Result<Self, InjectError> {
        let parsed = headers
            .into_iter()
            .map(|(name, template)| Ok((parse_header_name(name)?, Template::parse(template)?)))
            .collect::<Result<Vec<_>, InjectError>>()?;
        Self::from_parsed(parsed)
    }

    /// Builds a spec from names already validated with [`parse_header_name`]; refuses a name
    /// given twice.
    pub fn from_parsed(mut headers: Vec<(String, Template)>) -> Result<Self, InjectError> {
        headers.sort_by(|a, b| a.0.cmp(&b.0));
        if let Some(pair) = headers.windows(2).find(|w| w[0].0 == w[1].0) {
            return Err(InjectError::DuplicateHeader {
                name: pair[0].0.clone(),
            });
        }
        Ok(Self { headers })
    }

    /// Lowercase header names with their templates.
    pub fn headers(&self) -> &[(String, Template)] {
        &self.headers
    }

    /// Whether the rule injects nothing.
    pub fn is_empty(&self) -> bool {
        self.headers.is_empty()
    }

    /// The header names this spec sets: whatever the agent sent under these names is replaced.
    pub fn header_names(&self) -> impl Iterator<Item = &str> {
        self.headers.iter().map(|(n, _)| n.as_str())
    }

    /// Every secret named, each once, sorted.
    pub fn secret_names(&self) -> BTreeSet<&SecretName> {
        self.headers
            .iter()
            .flat_map(|(_, t)| t.secret_names())
            .collect()
    }

    /// Renders every header. On success the result also lists the secret values used, which
    /// are what response scrubbing must look for.
    pub fn render<F, V>(&self, mut lookup: F) -> Result<Rendered, InjectError>
    where
        F: FnMut(&SecretName) -> Option<V>,
        V: SecretBytes,
    {
        let mut rendered = Rendered::default();
        for (name, template) in &self.headers {
            let value = template.render(|secret| {
                let value = lookup(secret)?;
                if !rendered.secrets.contains(secret) {
                    rendered.secrets.push(secret.clone());
                    rendered
                        .secret_values
                        .push(Zeroizing::new(value.secret_bytes().to_vec()));
                }
                Some(value)
            })?;
            rendered.headers.push((name.clone(), value));
        }
        Ok(rendered)
    }
}

/// The output of [`InjectSpec::render`]. Debug shows names and lengths only.
#[derive(Default)]
pub struct Rendered {
    /// Lowercase header name and the value to set (replacing any the agent sent).
    pub headers: Vec<(String, Zeroizing<Vec<u8>>)>,
    /// The secrets used, each once: for the audit record.
    pub secrets: Vec<SecretName>,
    /// The plaintext of each secret in `secrets`, same order: for response scrubbing.
    pub secret_values: Vec<Zeroizing<Vec<u8>>>,
}

impl fmt::Debug for Rendered {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let headers: Vec<String> = self
            .headers
            .iter()
            .map(|(n, v)| format!("{n}: <redacted, {} bytes>", v.len()))
            .collect();
        f.debug_struct("Rendered")
            .field("headers", &headers)
            .field("secrets", &self.secrets)
            .finish_non_exhaustive()
    }
}

#[cfg(test)]
mod tests {
    use std::collections::HashMap;

    use super::*;

    fn name(s: &str) -> SecretName {
        SecretName::new(s).expect(s)
    }

    fn vault(pairs: &[(&str, &str)]) -> HashMap<SecretName, Vec<u8>> {
        pairs
            .iter()
            .map(|(k, v)| (name(k), v.as_bytes().to_vec()))
            .collect()
    }

    fn render(t: &str, v: &HashMap<SecretName, Vec<u8>>) -> Result<Vec<u8>, InjectError> {
        Template::parse(t)
            .expect(t)
            .render(|n| v.get(n).map(Vec::as_slice))
            .map(|z| z.to_vec())
    }

    #[test]
    fn renders_literals_and_placeholders() {
        let v = vault(&[("EXAMPLE_KEY", "k-123"), ("B", "xyz")]);
        assert_eq!(
            render("Bearer {secret:EXAMPLE_KEY}", &v).expect("ok"),
            b"Bearer k-123"
        );
        assert_eq!(render("{secret:EXAMPLE_KEY}", &v).expect("ok"), b"k-123");
        assert_eq!(render("{secret:B}:{secret:B}", &v).expect("ok"), b"xyz:xyz");
        assert_eq!(
            render("{{literal}} {secret:B}", &v).expect("ok"),
            b"{literal} xyz"
        );
        assert_eq!(render("a}}b{{c", &v).expect("ok"), b"a}b{c");
        assert_eq!(render("no secret", &v).expect("ok"), b"no secret");
    }

    #[test]
    fn secret_names_in_order() {
        let t = Template::parse("{secret:A} {secret:B} {secret:A}").expect("ok");
        let names: Vec<&str> = t.secret_names().map(SecretName::as_str).collect();
        assert_eq!(names, ["A", "B", "A"]);
        assert_eq!(t.as_str(), "{secret:A} {secret:B} {secret:A}");
    }

    #[test]
    fn bad_templates_name_the_template_and_the_problem() {
        for (t, needle) in [
            ("", "empty"),
            ("Bearer {secret:KEY", "unclosed `{` at byte 7"),
            ("Bearer }", "unmatched `}` at byte 7"),
            ("Bearer {env:KEY}", "unknown placeholder `{env:KEY}`"),
            ("Bearer {secrets:KEY}", "unknown placeholder"),
            ("Bearer {}", "unknown placeholder `{}`"),
            ("Bearer {secret:}", "invalid secret name"),
            ("Bearer {secret:1BAD}", "invalid secret name"),
            ("Bearer {secret: KEY}", "invalid secret name"),
            ("a\nb", "U+000A"),
            ("a\rb", "U+000D"),
            ("a\u{7f}", "U+007F"),
        ] {
            let e = Template::parse(t).expect_err(t).to_string();
            assert!(e.starts_with(&format!("invalid template {t:?}: ")), "{e}");
            assert!(e.contains(needle), "{t:?}: {e}");
        }
    }

    #[test]
    fn missing_secret_is_named() {
        let v = vault(&[]);
        let e = render("Bearer {secret:NOPE}", &v).expect_err("missing");
        assert_eq!(e, InjectError::MissingSecret { name: name("NOPE") });
        assert_eq!(e.to_string(), "secret NOPE is not in the vault");
    }

    #[test]
    fn header_breaking_values_are_refused_without_echoing_them() {
        for value in ["", "a\r\nx-evil: 1", "a\0b", "a\nb"] {
            let v = vault(&[("K", value)]);
            let e = render("{secret:K}", &v).expect_err("unusable");
            assert!(matches!(e, InjectError::UnusableSecret { .. }), "{e}");
            if !value.is_empty() {
                assert!(!e.to_string().contains(value));
            }
        }
    }

    #[test]
    fn renders_from_secret_values() {
        let sv = SecretValue::from_string("sv-value".into()).expect("valid");
        let t = Template::parse("Token {secret:K}").expect("ok");
        let out = t.render(|_| Some(&sv)).expect("ok");
        assert_eq!(out.len(), "Token sv-value".len());
        assert!(out.starts_with(b"Token "));
    }

    #[test]
    fn header_names_are_tokens_lowercased_and_not_reserved() {
        assert_eq!(
            parse_header_name("Authorization").expect("ok"),
            "authorization"
        );
        assert_eq!(parse_header_name("X-Api-Key").expect("ok"), "x-api-key");
        assert_eq!(parse_header_name("x_weird~!").expect("ok"), "x_weird~!");
        for bad in ["", "x api", "x:y", ":authority", "x\u{e9}", "a\tb", "(x)"] {
            let e = parse_header_name(bad).expect_err(bad).to_string();
            assert!(e.starts_with("invalid header name"), "{e}");
        }
        for reserved in ["Host", "content-length", "Transfer-Encoding", "connection"] {
            let e = parse_header_name(reserved).expect_err(reserved).to_string();
            assert!(e.contains("manages this header"), "{e}");
        }
    }

    #[test]
    fn spec_refuses_duplicates_and_renders_all() {
        let e = InjectSpec::parse([("Authorization", "a"), ("authorization", "b")])
            .expect_err("duplicate");
        assert_eq!(
            e,
            InjectError::DuplicateHeader {
                name: "authorization".into()
            }
        );

        let spec = InjectSpec::parse([
            ("X-Api-Key", "{secret:A}"),
            ("authorization", "Bearer {secret:A}.{secret:B}"),
        ])
        .expect("valid");
        assert_eq!(
            spec.header_names().collect::<Vec<_>>(),
            ["authorization", "x-api-key"]
        );
        let names: Vec<&str> = spec
            .secret_names()
            .into_iter()
            .map(SecretName::as_str)
            .collect();
        assert_eq!(names, ["A", "B"]);

        let v = vault(&[("A", "aaaa"), ("B", "bb")]);
        let r = spec.render(|n| v.get(n).map(Vec::as_slice)).expect("ok");
        assert_eq!(r.headers.len(), 2);
        assert_eq!(r.headers[0].0, "authorization");
        assert_eq!(&r.headers[0].1[..], b"Bearer aaaa.bb");
        assert_eq!(&r.headers[1].1[..], b"aaaa");
        assert_eq!(r.secrets, [name("A"), name("B")]);
        let lens: Vec<usize> = r.secret_values.iter().map(|v| v.len()).collect();
        assert_eq!(lens, [4, 2]);
        let shown = format!("{r:?}");
        assert!(!shown.contains("aaaa"), "{shown}");
        assert!(shown.contains("<redacted, 14 bytes>"), "{shown}");

        let e = spec.render(|n| v.get(n).filter(|_| n.as_str() == "A").map(Vec::as_slice));
        assert_eq!(
            e.map(|_| ()),
            Err(InjectError::MissingSecret { name: name("B") })
        );
        assert!(InjectSpec::empty().is_empty());
    }

    #[test]
    fn reserve_zeroizing_keeps_contents() {
        let mut buf = Zeroizing::new(b"abc".to_vec());
        reserve_zeroizing(&mut buf, 100);
        assert!(buf.capacity() >= 103);
        assert_eq!(&buf[..], b"abc");
    }
}
