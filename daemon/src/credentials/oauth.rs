//! OAuth 2.0 token requests (RFC 6749): the refresh-token grant (section 6) and the
//! client-credentials grant (section 4.4), sent by brokerd itself to the credential's token
//! endpoint over verified TLS, and their answers.

use std::{convert::Infallible, net::SocketAddr, sync::Arc, time::Duration};

use bytes::Bytes;
use http::{Method, Request, header};
use http_body_util::{BodyExt as _, Full, Limited};
use hyper::body::Body as _;
use serde::Deserialize;
use zeroize::Zeroizing;

use crate::{
    dns::Resolver,
    proxy::upstream::{Partition, Protocols, Upstream},
};

/// Longest token response read, in bytes.
const MAX_RESPONSE: usize = 64 * 1024;
/// How long one token request may take, connect to last byte.
pub const TOKEN_TIMEOUT: Duration = Duration::from_secs(30);
/// What a token endpoint that names no lifetime gets (RFC 6749 leaves it to the server).
const DEFAULT_EXPIRES_IN: u64 = 3600;

/// A token endpoint's answer to one request.
pub struct TokenResponse {
    pub status: u16,
    pub body: Zeroizing<Vec<u8>>,
}

/// Sends a token request: a form POST to an https URL. A trait so the state machine above it
/// is unit-tested without a network.
pub trait TokenClient: Send + Sync + 'static {
    fn post_form(
        &self,
        url: &str,
        form: Zeroizing<String>,
    ) -> futures_util::future::BoxFuture<'_, Result<TokenResponse, String>>;
}

/// The tokens a successful answer carries.
pub struct Tokens {
    pub access_token: Zeroizing<String>,
    pub expires_in: u64,
    /// A new refresh token, when the server rotates it.
    pub refresh_token: Option<Zeroizing<String>>,
}

/// Why a token request failed: `fatal` failures (the grant or the client was refused) are not
/// retried until the credential is set again; others are, with a backoff.
#[derive(Debug)]
pub struct TokenError {
    pub fatal: bool,
    pub message: String,
}

#[derive(Deserialize)]
struct Success {
    access_token: Zeroizing<String>,
    #[serde(default)]
    token_type: Option<String>,
    #[serde(default)]
    expires_in: Option<serde_json::Value>,
    #[serde(default)]
    refresh_token: Option<Zeroizing<String>>,
}

#[derive(Deserialize)]
struct Failure {
    error: String,
    #[serde(default)]
    error_description: Option<String>,
}

/// `application/x-www-form-urlencoded` of `pairs`.
pub fn form(pairs: &[(&str, &str)]) -> Zeroizing<String> {
    let mut out = Zeroizing::new(String::new());
    for (i, (k, v)) in pairs.iter().enumerate() {
        if i > 0 {
            out.push('&');
        }
        out.push_str(&encode(k));
        out.push('=');
        out.push_str(&encode(v));
    }
    out
}

fn encode(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for b in s.bytes() {
        match b {
            b'A'..=b'Z' | b'a'..=b'z' | b'0'..=b'9' | b'-' | b'.' | b'_' | b'~' => {
                out.push(b as char)
            }
            b' ' => out.push('+'),
            _ => out.push_str(&format!("%{b:02X}")),
        }
    }
    out
}

/// The RFC 7523 grant type.
pub const JWT_BEARER: &str = "urn:ietf:params:oauth:grant-type:jwt-bearer";
/// Lifetime of a signed assertion (Google accepts at most an hour).
const ASSERTION_LIFETIME: u64 = 3600;

/// An RS256 JWT assertion for the JWT-bearer grant (RFC 7523 2.1), as Google's client
/// libraries make one for a service account: `iss` the account, `aud` the token endpoint,
/// `scope`, and `iat`/`exp` an hour apart. `private_key` is PKCS#8 PEM.
pub fn assertion(
    private_key: &str,
    key_id: Option<&str>,
    client_email: &str,
    token_url: &str,
    scope: &str,
    now_unix: u64,
) -> Result<Zeroizing<String>, String> {
    use data_encoding::BASE64URL_NOPAD;
    let pem = pem::parse(private_key.as_bytes())
        .map_err(|e| format!("the service account's private key is not PEM: {e}"))?;
    let der = Zeroizing::new(pem.into_contents());
    let key = ring::signature::RsaKeyPair::from_pkcs8(&der)
        .map_err(|e| format!("the service account's private key is not an RSA key: {e}"))?;
    let mut header = serde_json::json!({ "alg": "RS256", "typ": "JWT" });
    if let Some(kid) = key_id {
        header["kid"] = kid.into();
    }
    let claims = serde_json::json!({
        "iss": client_email,
        "scope": scope,
        "aud": token_url,
        "iat": now_unix,
        "exp": now_unix + ASSERTION_LIFETIME,
    });
    let mut jwt = Zeroizing::new(format!(
        "{}.{}",
        BASE64URL_NOPAD.encode(header.to_string().as_bytes()),
        BASE64URL_NOPAD.encode(claims.to_string().as_bytes())
    ));
    let mut signature = vec![0; key.public().modulus_len()];
    key.sign(
        &ring::signature::RSA_PKCS1_SHA256,
        &ring::rand::SystemRandom::new(),
        jwt.as_bytes(),
        &mut signature,
    )
    .map_err(|_| "signing the assertion failed".to_string())?;
    jwt.push('.');
    jwt.push_str(&BASE64URL_NOPAD.encode(&signature));
    Ok(jwt)
}

/// Reads a token endpoint's answer. RFC 6749 5.2: `invalid_grant` (a refresh token revoked,
/// expired or used already), `invalid_client` and `unauthorized_client` are final; anything
/// else (5xx, a body that is not JSON) is worth another try later.
pub fn parse(response: &TokenResponse) -> Result<Tokens, TokenError> {
    if (200..300).contains(&response.status) {
        let ok: Success = serde_json::from_slice(&response.body).map_err(|e| TokenError {
            fatal: false,
            message: format!(
                "the token endpoint answered {} with a body that is not a token response ({e})",
                response.status
            ),
        })?;
        if let Some(kind) = &ok.token_type
            && !kind.eq_ignore_ascii_case("bearer")
        {
            return Err(TokenError {
                fatal: true,
                message: format!("the token endpoint issued a {kind:?} token, not a Bearer token"),
            });
        }
        if ok.access_token.is_empty() {
            return Err(TokenError {
                fatal: false,
                message: "the token endpoint issued an empty access token".into(),
            });
        }
        // Some servers send expires_in as a string.
        let expires_in = match &ok.expires_in {
            Some(serde_json::Value::Number(n)) => n.as_u64(),
            Some(serde_json::Value::String(s)) => s.parse().ok(),
            _ => None,
        }
        .unwrap_or(DEFAULT_EXPIRES_IN);
        return Ok(Tokens {
            access_token: ok.access_token,
            expires_in,
            refresh_token: ok.refresh_token.filter(|t| !t.is_empty()),
        });
    }
    let described = serde_json::from_slice::<Failure>(&response.body).ok();
    let fatal = matches!(
        described.as_ref().map(|f| f.error.as_str()),
        Some("invalid_grant" | "invalid_client" | "unauthorized_client" | "invalid_scope")
    ) || matches!(response.status, 400 | 401 | 403) && described.is_some();
    let message = match described {
        Some(f) => format!(
            "the token endpoint refused ({} {}{})",
            response.status,
            f.error,
            f.error_description
                .map(|d| format!(": {}", d.chars().take(200).collect::<String>()))
                .unwrap_or_default()
        ),
        None => format!("the token endpoint answered {}", response.status),
    };
    Err(TokenError { fatal, message })
}

/// Token requests through brokerd's upstream connector (its trust roots, `--upstream-ca`
/// included) to the address brokerd's own resolver gives the token endpoint's host.
pub struct UpstreamTokenClient {
    upstream: Upstream,
    resolver: Arc<Resolver>,
}

impl UpstreamTokenClient {
    pub fn new(upstream: Upstream, resolver: Arc<Resolver>) -> Self {
        Self { upstream, resolver }
    }

    async fn post(&self, url: &str, form: Zeroizing<String>) -> Result<TokenResponse, String> {
        let uri: http::Uri = url.parse().map_err(|e| format!("token URL {url:?}: {e}"))?;
        let host = uri
            .host()
            .ok_or_else(|| format!("token URL {url:?} has no host"))?
            .trim_start_matches('[')
            .trim_end_matches(']')
            .to_string();
        let port = uri.port_u16().unwrap_or(443);
        let ip = match host.parse::<std::net::IpAddr>() {
            Ok(ip) => ip,
            Err(_) => *self
                .resolver
                .resolve(&host)
                .await
                .map_err(|e| format!("cannot resolve the token endpoint {host}: {e}"))?
                .first()
                .ok_or_else(|| format!("the token endpoint {host} resolves to no address"))?,
        };
        let body = Full::new(Bytes::from(form.as_bytes().to_vec()))
            .map_err(|never: Infallible| match never {})
            .boxed_unsync();
        let request = Request::builder()
            .method(Method::POST)
            .uri(uri)
            .header(header::CONTENT_TYPE, "application/x-www-form-urlencoded")
            .header(header::ACCEPT, "application/json")
            .body(body)
            .map_err(|e| format!("cannot build the token request: {e}"))?;
        // Pooled apart from every agent's connections.
        let partition = Partition::new("brokerd/oauth", &[]);
        let response = self
            .upstream
            .request(
                SocketAddr::new(ip, port),
                Protocols::Any,
                true,
                partition,
                request,
            )
            .await
            .map_err(|e| format!("token request to {host}: {e}"))?;
        let status = response.status().as_u16();
        let body = response.into_body();
        if body.size_hint().lower() > MAX_RESPONSE as u64 {
            return Err(format!("the token response from {host} is too large"));
        }
        let bytes = Limited::new(body, MAX_RESPONSE)
            .collect()
            .await
            .map_err(|e| format!("reading the token response from {host}: {e}"))?
            .to_bytes();
        Ok(TokenResponse {
            status,
            body: Zeroizing::new(bytes.to_vec()),
        })
    }
}

impl TokenClient for UpstreamTokenClient {
    fn post_form(
        &self,
        url: &str,
        form: Zeroizing<String>,
    ) -> futures_util::future::BoxFuture<'_, Result<TokenResponse, String>> {
        let url = url.to_string();
        Box::pin(async move {
            match tokio::time::timeout(TOKEN_TIMEOUT, self.post(&url, form)).await {
                Ok(r) => r,
                Err(_) => Err(format!(
                    "the token endpoint did not answer within {}s",
                    TOKEN_TIMEOUT.as_secs()
                )),
            }
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn answer(status: u16, body: &str) -> TokenResponse {
        TokenResponse {
            status,
            body: Zeroizing::new(body.as_bytes().to_vec()),
        }
    }

    #[test]
    fn a_token_response_is_read_with_its_rotation_and_lifetime() {
        let t = parse(&answer(
            200,
            r#"{"access_token":"at-1","token_type":"bearer","expires_in":"120","refresh_token":"rt-2"}"#,
        ))
        .map_err(|e| e.message)
        .expect("tokens");
        assert_eq!(t.access_token.as_str(), "at-1");
        assert_eq!(t.expires_in, 120);
        assert_eq!(t.refresh_token.as_deref().map(String::as_str), Some("rt-2"));
        let t = parse(&answer(200, r#"{"access_token":"at-1"}"#))
            .map_err(|e| e.message)
            .expect("tokens");
        assert_eq!(t.expires_in, DEFAULT_EXPIRES_IN);
        assert!(t.refresh_token.is_none());
    }

    #[test]
    fn a_refused_grant_is_final_and_a_server_error_is_not() {
        let e = parse(&answer(400, r#"{"error":"invalid_grant"}"#))
            .err()
            .expect("refused");
        assert!(e.fatal && e.message.contains("invalid_grant"), "{e:?}");
        let e = parse(&answer(503, "busy")).err().expect("refused");
        assert!(!e.fatal && e.message.contains("503"), "{e:?}");
        let e = parse(&answer(200, "<html>")).err().expect("refused");
        assert!(!e.fatal);
        let e = parse(&answer(200, r#"{"access_token":"x","token_type":"mac"}"#))
            .err()
            .expect("refused");
        assert!(e.fatal);
    }

    #[test]
    fn forms_are_encoded() {
        assert_eq!(
            form(&[("grant_type", "refresh_token"), ("scope", "a b/c&d")]).as_str(),
            "grant_type=refresh_token&scope=a+b%2Fc%26d"
        );
    }
}
