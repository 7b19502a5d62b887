//! What a rule writes into a request: headers (from [`InjectSpec`]), HTTP basic auth, and query
//! parameters, each a template naming vault secrets. Rendering asks a caller-supplied lookup for
//! the values, like [`InjectSpec::render`]; nothing here logs or displays a value.

use std::{collections::BTreeSet, fmt};

use data_encoding::BASE64;
use zeroize::Zeroizing;

use super::{InjectError, InjectSpec, SecretBytes, Template, reserve_zeroizing};
use crate::{
    percent::{self, HexCase, Plus},
    secret::SecretName,
};

/// `inject.basic_auth`: sets `authorization: Basic base64(username:password)`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct BasicAuth {
    pub(crate) username: Template,
    pub(crate) password: Template,
}

impl BasicAuth {
    pub fn username(&self) -> &Template {
        &self.username
    }
    pub fn password(&self) -> &Template {
        &self.password
    }
}

/// `inject.aws_sigv4`: the agent signs with the placeholder credentials of a SigV4 credential
/// (`crate::credential::CredentialSpec::Sigv4`); brokerd checks that signature and signs the
/// request again with the real ones. Empty lists allow any service, region or action.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct AwsSigV4 {
    pub(crate) secret: SecretName,
    pub(crate) services: Vec<String>,
    pub(crate) regions: Vec<String>,
    pub(crate) actions: Vec<String>,
}

impl AwsSigV4 {
    /// The SigV4 credential.
    pub fn secret(&self) -> &SecretName {
        &self.secret
    }

    /// Whether the credential scope's service may be signed for.
    pub fn allows_service(&self, service: &str) -> bool {
        self.services.is_empty() || self.services.iter().any(|s| s == service)
    }

    /// Whether the credential scope's region may be signed for.
    pub fn allows_region(&self, region: &str) -> bool {
        self.regions.is_empty() || self.regions.iter().any(|r| r == region)
    }

    /// Whether the request's `Action` (the query's or a form body's) may be signed: with
    /// actions listed, a request must name one of them.
    pub fn allows_action(&self, action: Option<&str>) -> bool {
        self.actions.is_empty() || action.is_some_and(|a| self.actions.iter().any(|x| x == a))
    }

    pub fn actions(&self) -> &[String] {
        &self.actions
    }
}

/// `inject.capture_tokens`: the rule's destination is an OAuth token endpoint the agent calls
/// itself. The real tokens in its answers are kept by brokerd, and the agent gets placeholders
/// of their shape: the access token's usable at `use_at` (exact or `*.suffix`), the refresh
/// token's at the token endpoint. Placeholders the agent sends back in a form body to the
/// endpoint (a refresh) are swapped for the real tokens.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct CaptureTokens {
    pub(crate) use_at: String,
}

impl CaptureTokens {
    /// Where the captured access token may be used (a host pattern as policy writes it).
    pub fn use_at(&self) -> &str {
        &self.use_at
    }
}

/// Everything one rule injects.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Injection {
    pub(crate) headers: InjectSpec,
    pub(crate) basic_auth: Option<BasicAuth>,
    /// Parameter name (as written, unencoded) and value template, sorted by name.
    pub(crate) query: Vec<(String, Template)>,
    pub(crate) aws_sigv4: Option<AwsSigV4>,
    pub(crate) capture_tokens: Option<CaptureTokens>,
}

/// The header basic auth sets.
const AUTHORIZATION: &str = "authorization";

impl Injection {
    /// Nothing to inject.
    pub fn empty() -> Self {
        Self::default()
    }

    /// Headers to set (`inject.headers`).
    pub fn headers(&self) -> &InjectSpec {
        &self.headers
    }

    /// `inject.basic_auth`, if any.
    pub fn basic_auth(&self) -> Option<&BasicAuth> {
        self.basic_auth.as_ref()
    }

    /// Query parameters to set (`inject.query`), sorted by name.
    pub fn query(&self) -> &[(String, Template)] {
        &self.query
    }

    /// `inject.aws_sigv4`, if any.
    pub fn aws_sigv4(&self) -> Option<&AwsSigV4> {
        self.aws_sigv4.as_ref()
    }

    /// `inject.capture_tokens`, if any.
    pub fn capture_tokens(&self) -> Option<&CaptureTokens> {
        self.capture_tokens.as_ref()
    }

    /// Whether the rule injects nothing.
    pub fn is_empty(&self) -> bool {
        self.headers.is_empty()
            && self.basic_auth.is_none()
            && self.query.is_empty()
            && self.aws_sigv4.is_none()
            && self.capture_tokens.is_none()
    }

    /// Every header this sets, lowercase (basic auth sets `authorization`): whatever the agent
    /// sent under these names is replaced.
    pub fn header_names(&self) -> impl Iterator<Item = &str> {
        self.headers
            .header_names()
            .chain(self.basic_auth.iter().map(|_| AUTHORIZATION))
    }

    /// Every secret named, each once, sorted.
    pub fn secret_names(&self) -> BTreeSet<&SecretName> {
        let mut names = self.headers.secret_names();
        if let Some(b) = &self.basic_auth {
            names.extend(b.username.secret_names());
            names.extend(b.password.secret_names());
        }
        names.extend(self.query.iter().flat_map(|(_, t)| t.secret_names()));
        names.extend(self.aws_sigv4.iter().map(|s| &s.secret));
        names
    }

    /// Where this writes, for `policy explain` and audit: `header authorization`,
    /// `basic auth`, `query api_key`. Never values.
    pub fn slots(&self) -> Vec<String> {
        self.headers
            .header_names()
            .map(|n| format!("header {n}"))
            .chain(self.basic_auth.iter().map(|_| "basic auth".to_string()))
            .chain(self.query.iter().map(|(n, _)| format!("query {n}")))
            .chain(
                self.aws_sigv4
                    .iter()
                    .map(|_| "aws sigv4 signature".to_string()),
            )
            .collect()
    }

    /// Renders every header, the basic-auth credentials and the query values. Secrets are
    /// looked up once each.
    pub fn render<F, V>(&self, mut lookup: F) -> Result<RenderedInjection, InjectError>
    where
        F: FnMut(&SecretName) -> Option<V>,
        V: SecretBytes,
    {
        let mut out = RenderedInjection::default();
        let mut fetch = |out: &mut RenderedInjection, name: &SecretName| -> Option<usize> {
            if let Some(i) = out.secrets.iter().position(|s| s == name) {
                return Some(i);
            }
            let value = lookup(name)?;
            out.secrets.push(name.clone());
            out.secret_values
                .push(Zeroizing::new(value.secret_bytes().to_vec()));
            Some(out.secrets.len() - 1)
        };
        // Render against the values fetched so far, so each secret is read once.
        let render =
            |out: &mut RenderedInjection,
             fetch: &mut dyn FnMut(&mut RenderedInjection, &SecretName) -> Option<usize>,
             t: &Template|
             -> Result<Zeroizing<Vec<u8>>, InjectError> {
                let mut found = Vec::new();
                for name in t.secret_names() {
                    found.push((name, fetch(out, name)));
                }
                t.render(|name| {
                    let i = found.iter().find(|(n, _)| *n == name)?.1?;
                    out.secret_values.get(i).map(|v| v.as_slice())
                })
            };

        for (name, template) in self.headers.headers() {
            let value = render(&mut out, &mut fetch, template)?;
            out.headers.push((name.clone(), value));
        }
        if let Some(basic) = &self.basic_auth {
            let user = render(&mut out, &mut fetch, &basic.username)?;
            if user.contains(&b':') {
                let name = basic
                    .username
                    .secret_names()
                    .next()
                    .cloned()
                    .ok_or_else(|| InjectError::Template {
                        template: basic.username.as_str().to_string(),
                        reason: "a basic-auth username cannot contain `:`".into(),
                    })?;
                return Err(InjectError::UnusableSecret {
                    name,
                    reason: "a basic-auth username cannot contain `:`",
                });
            }
            let pass = render(&mut out, &mut fetch, &basic.password)?;
            let mut credentials = Zeroizing::new(Vec::new());
            reserve_zeroizing(&mut credentials, user.len() + 1 + pass.len());
            credentials.extend_from_slice(&user);
            credentials.push(b':');
            credentials.extend_from_slice(&pass);
            let mut value = Zeroizing::new(Vec::new());
            reserve_zeroizing(&mut value, 6 + BASE64.encode_len(credentials.len()));
            value.extend_from_slice(b"Basic ");
            let start = value.len();
            value.resize(start + BASE64.encode_len(credentials.len()), 0);
            BASE64.encode_mut(&credentials, &mut value[start..]);
            out.headers.push((AUTHORIZATION.to_string(), value));
            // The agent could see `user:pass` only base64-encoded; scrub that form too.
            out.extra_needles.push(credentials);
        }
        for (name, template) in &self.query {
            let value = render(&mut out, &mut fetch, template)?;
            out.query.push((name.clone(), value));
        }
        Ok(out)
    }
}

/// The output of [`Injection::render`]. Debug shows names and lengths only.
#[derive(Default)]
pub struct RenderedInjection {
    /// Lowercase header name and the value to set (replacing any the agent sent); basic auth
    /// is here as `authorization`.
    pub headers: Vec<(String, Zeroizing<Vec<u8>>)>,
    /// Query parameter name (unencoded) and raw value; see [`RenderedInjection::rewrite_query`].
    pub query: Vec<(String, Zeroizing<Vec<u8>>)>,
    /// The secrets used, each once: for the audit record.
    pub secrets: Vec<SecretName>,
    /// The plaintext of each secret in `secrets`, same order.
    pub secret_values: Vec<Zeroizing<Vec<u8>>>,
    /// Further values to scrub from responses (the `user:pass` of basic auth).
    pub extra_needles: Vec<Zeroizing<Vec<u8>>>,
}

impl RenderedInjection {
    /// Everything response scrubbing must look for.
    pub fn needles(&self) -> impl Iterator<Item = &Zeroizing<Vec<u8>>> {
        self.secret_values.iter().chain(&self.extra_needles)
    }

    /// The request's query with the injected parameters: any parameter the agent sent under an
    /// injected name (compared after percent-decoding) is dropped, the injected ones are
    /// appended percent-encoded. `None` when nothing is injected into the query.
    pub fn rewrite_query(&self, original: Option<&str>) -> Option<Zeroizing<String>> {
        if self.query.is_empty() {
            return None;
        }
        let mut out = Zeroizing::new(Vec::new());
        for pair in original.unwrap_or("").split('&').filter(|p| !p.is_empty()) {
            let key = pair.split_once('=').map_or(pair, |(k, _)| k);
            // Form semantics, as servers read queries: `+` is a space.
            let decoded = percent::decode(key.as_bytes(), Plus::Space);
            if self
                .query
                .iter()
                .any(|(n, _)| n.as_bytes() == decoded.as_slice())
            {
                continue;
            }
            push_sep(&mut out);
            reserve_zeroizing(&mut out, pair.len());
            out.extend_from_slice(pair.as_bytes());
        }
        for (name, value) in &self.query {
            push_sep(&mut out);
            percent::encode_into(name.as_bytes(), &mut out, HexCase::Upper);
            reserve_zeroizing(&mut out, 1);
            out.push(b'=');
            percent::encode_into(value, &mut out, HexCase::Upper);
        }
        // Only ASCII was written: original pairs come from a &str, the rest is encoded.
        let text = String::from_utf8(std::mem::take(&mut *out)).unwrap_or_default();
        Some(Zeroizing::new(text))
    }
}

impl fmt::Debug for RenderedInjection {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let show = |v: &[(String, Zeroizing<Vec<u8>>)]| -> Vec<String> {
            v.iter()
                .map(|(n, v)| format!("{n}: <redacted, {} bytes>", v.len()))
                .collect()
        };
        f.debug_struct("RenderedInjection")
            .field("headers", &show(&self.headers))
            .field("query", &show(&self.query))
            .field("secrets", &self.secrets)
            .finish_non_exhaustive()
    }
}

fn push_sep(out: &mut Zeroizing<Vec<u8>>) {
    if !out.is_empty() {
        reserve_zeroizing(out, 1);
        out.push(b'&');
    }
}

/// Why a name cannot be an `inject.query` parameter name.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum QueryNameError {
    #[error("the parameter name is empty")]
    Empty,
    #[error("the parameter name is longer than 64 characters")]
    TooLong,
    #[error(
        "{} is not allowed in a parameter name (letters, digits and -._~[])",
        show_char(*.0)
    )]
    Character(char),
}

/// `` `c` `` for a visible ASCII character, `U+XXXX` otherwise.
fn show_char(c: char) -> String {
    if c.is_ascii_graphic() {
        format!("`{c}`")
    } else {
        format!("U+{:04X}", u32::from(c))
    }
}

/// Validates a query parameter name for `inject.query`: RFC 3986 unreserved characters plus
/// `[` and `]` (for `key[]` forms), 1 to 64 of them.
pub(crate) fn parse_query_name(raw: &str) -> Result<String, QueryNameError> {
    if raw.is_empty() {
        return Err(QueryNameError::Empty);
    }
    if raw.len() > 64 {
        return Err(QueryNameError::TooLong);
    }
    if let Some(c) = raw
        .chars()
        .find(|&c| !(c.is_ascii_alphanumeric() || "-._~[]".contains(c)))
    {
        return Err(QueryNameError::Character(c));
    }
    Ok(raw.to_string())
}

#[cfg(test)]
mod tests {
    use std::collections::HashMap;

    use super::*;

    fn name(s: &str) -> SecretName {
        SecretName::new(s).expect(s)
    }

    fn t(s: &str) -> Template {
        Template::parse(s).expect(s)
    }

    fn full() -> Injection {
        Injection {
            headers: InjectSpec::parse([("x-api-key", "{secret:A}")]).expect("spec"),
            basic_auth: Some(BasicAuth {
                username: t("user"),
                password: t("{secret:B}"),
            }),
            query: vec![("api_key".into(), t("{secret:A}")), ("v".into(), t("2"))],
            aws_sigv4: None,
            capture_tokens: None,
        }
    }

    #[test]
    fn renders_headers_basic_auth_and_query() {
        let vault: HashMap<SecretName, Vec<u8>> =
            [(name("A"), b"a&b c".to_vec()), (name("B"), b"pw".to_vec())]
                .into_iter()
                .collect();
        let mut lookups = 0;
        let inj = full();
        let r = inj
            .render(|n| {
                lookups += 1;
                vault.get(n).map(Vec::as_slice)
            })
            .expect("renders");
        assert_eq!(lookups, 2, "each secret is read once");
        assert_eq!(r.headers.len(), 2);
        assert_eq!(r.headers[0].0, "x-api-key");
        assert_eq!(&r.headers[0].1[..], b"a&b c");
        assert_eq!(r.headers[1].0, "authorization");
        assert_eq!(&r.headers[1].1[..], b"Basic dXNlcjpwdw==");
        assert_eq!(r.secrets, [name("A"), name("B")]);
        let needles: Vec<&[u8]> = r.needles().map(|n| n.as_slice()).collect();
        assert_eq!(needles, [&b"a&b c"[..], b"pw", b"user:pw"]);
        assert_eq!(
            r.rewrite_query(Some("q=1&api_key=agent&api%5Fkey=x&x="))
                .as_deref()
                .map(|s| s.as_str()),
            Some("q=1&x=&api_key=a%26b%20c&v=2")
        );
        assert_eq!(
            r.rewrite_query(None).as_deref().map(|s| s.as_str()),
            Some("api_key=a%26b%20c&v=2")
        );
        let shown = format!("{r:?}");
        assert!(!shown.contains("a&b") && !shown.contains("pw"), "{shown}");

        let names: Vec<&str> = inj
            .secret_names()
            .into_iter()
            .map(SecretName::as_str)
            .collect();
        assert_eq!(names, ["A", "B"]);
        assert_eq!(
            inj.header_names().collect::<Vec<_>>(),
            ["x-api-key", "authorization"]
        );
        assert_eq!(
            inj.slots(),
            ["header x-api-key", "basic auth", "query api_key", "query v"]
        );
        assert!(Injection::empty().is_empty());
        assert!(
            Injection::empty()
                .render(|_| None::<&[u8]>)
                .expect("empty")
                .rewrite_query(Some("a=1"))
                .is_none()
        );
    }

    #[test]
    fn missing_or_unusable_secrets_are_named() {
        let inj = full();
        let e = inj
            .render(|n| (n.as_str() == "A").then_some(&b"a"[..]))
            .expect_err("B missing");
        assert_eq!(e, InjectError::MissingSecret { name: name("B") });

        let inj = Injection {
            basic_auth: Some(BasicAuth {
                username: t("{secret:U}"),
                password: t("x"),
            }),
            ..Injection::default()
        };
        let e = inj.render(|_| Some(&b"a:b"[..])).expect_err("colon");
        assert!(matches!(e, InjectError::UnusableSecret { .. }), "{e}");
        assert!(!e.to_string().contains("a:b"));
    }

    #[test]
    fn query_names() {
        assert_eq!(parse_query_name("api_key"), Ok("api_key".into()));
        assert_eq!(parse_query_name("ids[]"), Ok("ids[]".into()));
        assert_eq!(parse_query_name(""), Err(QueryNameError::Empty));
        assert_eq!(
            parse_query_name(&"a".repeat(65)),
            Err(QueryNameError::TooLong)
        );
        assert!(parse_query_name(&"a".repeat(64)).is_ok());
        assert_eq!(
            parse_query_name("a b").map_err(|e| e.to_string()),
            Err("U+0020 is not allowed in a parameter name (letters, digits and -._~[])".into())
        );
        assert_eq!(
            parse_query_name("a=b").map_err(|e| e.to_string()),
            Err("`=` is not allowed in a parameter name (letters, digits and -._~[])".into())
        );
        assert!(parse_query_name("a&b").is_err());
    }
}
