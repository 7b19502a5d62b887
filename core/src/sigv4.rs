//! AWS Signature Version 4 (SigV4): reading a signed request, verifying it, and signing it
//! again with other credentials.
//!
//! brokerd uses this to stand between an agent and AWS. The agent holds a placeholder access key
//! id and secret that brokerd knows; it signs its requests with them as any AWS SDK does.
//! brokerd [`verify`]s that signature with the placeholder (so a request is only ever re-signed
//! if the agent really made it, unmodified, with the placeholder it was given), then [`sign`]s
//! the same request with the real credentials and writes the new headers ([`Resigned::apply`]).
//! S3 uploads in `aws-chunked` encoding carry a signature in every chunk, chained from the
//! request's; [`ChunkResigner`] verifies and replaces those as the body streams through.
//!
//! What is signed ([AWS's specification][spec]): a canonical request (method, canonical URI,
//! canonical query, the signed headers as `name:value` lines, the signed header names, the
//! payload hash; see [`canonical`] for the rules of each part), hashed into a string to sign
//! with the date and the credential scope (`date/region/service/aws4_request`), and signed with
//! a key derived from the secret through that scope ([`SigningKey`]).
//!
//! Only the `Authorization` header form is handled (not presigned query strings), and only
//! `AWS4-HMAC-SHA256` (not SigV4a's ECDSA). The payload hash is the caller's to supply: S3
//! requests declare it in `x-amz-content-sha256` ([`SignedRequest::declared_payload_hash`]);
//! other services' requests usually do not, and the caller hashes the body ([`hex_sha256`]).
//!
//! Pure: no I/O, no clock (the caller passes the time to [`check_clock_skew`]). Never: print or
//! log a secret access key, a derived key or a session token; every secret is a
//! [`SecretValue`], and a [`SigningKey`] is zeroized and redacted like one. The access key ids
//! and signatures are not secret (AWS logs them), but errors do not echo them either.
//!
//! [spec]: https://docs.aws.amazon.com/IAM/latest/UserGuide/reference_sigv-create-signed-request.html

use std::fmt;

use http::{HeaderMap, HeaderValue, header::AUTHORIZATION};
use zeroize::Zeroizing;

use crate::secret::SecretValue;

pub mod canonical;
mod chunked;
mod crypto;

pub use canonical::{UriPath, canonical_query, canonical_uri};
pub use chunked::{ChunkError, ChunkResigner, DEFAULT_MAX_CHUNK, MAX_CHUNK_HEADER};
pub use crypto::hex_sha256;

#[cfg(test)]
mod tests;

/// The only algorithm handled, as it opens the `Authorization` header and the string to sign.
pub const ALGORITHM: &str = "AWS4-HMAC-SHA256";
/// The request date header, `YYYYMMDD'T'HHMMSS'Z'`.
pub const X_AMZ_DATE: &str = "x-amz-date";
/// The payload hash header (required by S3, optional elsewhere).
pub const X_AMZ_CONTENT_SHA256: &str = "x-amz-content-sha256";
/// The session token header of temporary credentials.
pub const X_AMZ_SECURITY_TOKEN: &str = "x-amz-security-token";
/// The last component of every credential scope.
const TERMINATOR: &str = "aws4_request";
/// How far AWS lets a request's date be from its clock, in seconds.
pub const MAX_CLOCK_SKEW_SECS: u64 = 15 * 60;

/// An AWS credential: the key pair, and the session token of temporary credentials.
#[derive(Clone, Debug)]
pub struct Credentials {
    /// `AKIA...`/`ASIA...`: public, written into the `Authorization` header.
    pub access_key_id: String,
    pub secret_access_key: SecretValue,
    /// Present for temporary (STS) credentials; sent as `X-Amz-Security-Token`.
    pub session_token: Option<SecretValue>,
}

/// Why a request's SigV4 headers could not be read. Never carries a header's value.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ParseError {
    #[error("the request has no Authorization header")]
    NoAuthorization,
    #[error("the request has more than one {name} header")]
    Repeated { name: &'static str },
    #[error("the Authorization header is not SigV4: {reason}")]
    NotSigV4 { reason: String },
    #[error("malformed Authorization header: {reason}")]
    Authorization { reason: String },
    #[error("the request has no X-Amz-Date header (only X-Amz-Date is supported, not Date)")]
    NoDate,
    #[error("malformed X-Amz-Date: {reason} (expected YYYYMMDDTHHMMSSZ, as in 20150830T123600Z)")]
    Date { reason: String },
    #[error(
        "the credential scope's date is not the day of X-Amz-Date (the scope must name the day the request was signed)"
    )]
    ScopeDate,
    #[error(
        "malformed X-Amz-Content-Sha256: {reason} (expected a hex SHA-256, UNSIGNED-PAYLOAD or a STREAMING-... value)"
    )]
    ContentSha256 { reason: String },
    #[error("X-Amz-Security-Token is not text")]
    SecurityToken,
}

/// Why a request does not verify. Never carries a secret or a signature.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum VerifyError {
    #[error("signed header {name} is not in the request")]
    MissingSignedHeader { name: String },
    #[error("the request is signed with another access key id than the one this agent was given")]
    AccessKeyId,
    #[error("the request's X-Amz-Security-Token is not the session token this agent was given")]
    SecurityToken,
    #[error(
        "the signature does not match the request (signed with another secret, or changed after signing)"
    )]
    Signature,
    #[error("the request's date is {skew_secs} s from the broker's clock (at most {max_secs} s)")]
    ClockSkew { skew_secs: u64, max_secs: u64 },
}

/// Why a request could not be signed. Never carries a secret.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum SignError {
    #[error("signed header {name} is not in the request")]
    MissingSignedHeader { name: String },
    #[error(
        "the access key id cannot go into an Authorization header (it must be non-empty printable ASCII without '/', ',' or spaces)"
    )]
    AccessKeyId,
    #[error("the session token cannot go into an HTTP header")]
    SessionToken,
}

/// The credential scope: the day, region and service a signature is valid for.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Scope {
    /// `YYYYMMDD`.
    pub date: String,
    pub region: String,
    pub service: String,
}

impl fmt::Display for Scope {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "{}/{}/{}/{TERMINATOR}",
            self.date, self.region, self.service
        )
    }
}

/// A parsed `Authorization: AWS4-HMAC-SHA256 Credential=..., SignedHeaders=..., Signature=...`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Authorization {
    pub access_key_id: String,
    pub scope: Scope,
    /// Lowercase, sorted, no duplicates, `host` among them.
    pub signed_headers: Vec<String>,
    /// 64 lowercase hex digits.
    pub signature: String,
}

impl Authorization {
    /// Parses an `Authorization` header value. The three components may come in any order,
    /// separated by commas and optional spaces; each must appear once.
    pub fn parse(value: &[u8]) -> Result<Self, ParseError> {
        let malformed = |reason: &str| ParseError::Authorization {
            reason: reason.to_owned(),
        };
        let value = std::str::from_utf8(value)
            .ok()
            .filter(|v| v.is_ascii())
            .ok_or_else(|| ParseError::NotSigV4 {
                reason: "the value is not ASCII".into(),
            })?;
        let value = value.trim();
        let (algorithm, rest) = value.split_once([' ', '\t']).unwrap_or((value, ""));
        if algorithm != ALGORITHM {
            let shown = if algorithm.len() <= 32 && algorithm.bytes().all(|b| b.is_ascii_graphic())
            {
                format!("its scheme is {algorithm:?}")
            } else {
                "its scheme is not one word of at most 32 characters".to_owned()
            };
            return Err(ParseError::NotSigV4 {
                reason: format!("{shown}, expected {ALGORITHM}"),
            });
        }
        let (mut credential, mut signed_headers, mut signature) = (None, None, None);
        for component in rest.split(',').map(str::trim) {
            if component.is_empty() {
                return Err(malformed(
                    "an empty component (two commas in a row, or a trailing comma)",
                ));
            }
            let Some((key, val)) = component.split_once('=') else {
                return Err(malformed(
                    "a component without '=' (expected Credential=, SignedHeaders= and Signature=)",
                ));
            };
            let slot = match key {
                "Credential" => &mut credential,
                "SignedHeaders" => &mut signed_headers,
                "Signature" => &mut signature,
                _ => {
                    return Err(malformed(
                        "an unknown component (expected Credential=, SignedHeaders= and Signature=)",
                    ));
                }
            };
            if slot.replace(val).is_some() {
                return Err(ParseError::Authorization {
                    reason: format!("{key}= appears more than once"),
                });
            }
        }
        let missing = |key: &str| ParseError::Authorization {
            reason: format!("no {key}= component"),
        };
        let credential = credential.ok_or_else(|| missing("Credential"))?;
        let signed_headers = signed_headers.ok_or_else(|| missing("SignedHeaders"))?;
        let signature = signature.ok_or_else(|| missing("Signature"))?;

        let parts: Vec<&str> = credential.split('/').collect();
        let [access_key_id, date, region, service, terminator] = parts[..] else {
            return Err(malformed(
                "Credential= must have five parts: access key id/date/region/service/aws4_request",
            ));
        };
        if access_key_id.is_empty() {
            return Err(malformed("the access key id in Credential= is empty"));
        }
        if date.len() != 8 || !date.bytes().all(|b| b.is_ascii_digit()) {
            return Err(malformed("the date in Credential= is not YYYYMMDD"));
        }
        for (what, part) in [("region", region), ("service", service)] {
            if part.is_empty()
                || !part
                    .bytes()
                    .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_')
            {
                return Err(ParseError::Authorization {
                    reason: format!("the {what} in Credential= is empty or not [a-z0-9-]"),
                });
            }
        }
        if terminator != TERMINATOR {
            return Err(malformed("Credential= does not end in /aws4_request"));
        }

        let names: Vec<String> = signed_headers.split(';').map(str::to_owned).collect();
        if names.iter().any(|n| {
            n.is_empty()
                || !n
                    .bytes()
                    .all(|b| b.is_ascii_graphic() && !b.is_ascii_uppercase())
        }) {
            return Err(malformed(
                "SignedHeaders= must be lowercase header names separated by ';', none empty",
            ));
        }
        if names.windows(2).any(|w| w[0] >= w[1]) {
            return Err(malformed(
                "SignedHeaders= is not sorted, or names a header twice",
            ));
        }
        if !names.iter().any(|n| n == "host") {
            return Err(malformed("SignedHeaders= does not include host"));
        }

        if signature.len() != 64
            || !signature
                .bytes()
                .all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b))
        {
            return Err(malformed("Signature= is not 64 lowercase hex digits"));
        }

        Ok(Self {
            access_key_id: access_key_id.to_owned(),
            scope: Scope {
                date: date.to_owned(),
                region: region.to_owned(),
                service: service.to_owned(),
            },
            signed_headers: names,
            signature: signature.to_owned(),
        })
    }

    /// The header value, in the form the SDKs write.
    pub fn to_header_string(&self) -> String {
        format!(
            "{ALGORITHM} Credential={}/{}, SignedHeaders={}, Signature={}",
            self.access_key_id,
            self.scope,
            self.signed_headers.join(";"),
            self.signature
        )
    }
}

/// A request time as `X-Amz-Date` writes it: `YYYYMMDD'T'HHMMSS'Z'`, UTC.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct AmzDate {
    text: String,
    unix_secs: u64,
}

impl AmzDate {
    /// Parses and range-checks `YYYYMMDDTHHMMSSZ` (a year from 1970).
    pub fn parse(text: &str) -> Result<Self, ParseError> {
        let bad = |reason: &str| ParseError::Date {
            reason: reason.to_owned(),
        };
        let b = text.as_bytes();
        if b.len() != 16 {
            return Err(bad("it is not 16 characters long"));
        }
        if b[8] != b'T' || b[15] != b'Z' {
            return Err(bad("no 'T' after the date, or no 'Z' at the end"));
        }
        let digits = |range: std::ops::Range<usize>| -> Result<u32, ParseError> {
            let part = &text[range];
            if !part.bytes().all(|b| b.is_ascii_digit()) {
                return Err(bad("a non-digit where a digit belongs"));
            }
            part.parse().map_err(|_| bad("a number out of range"))
        };
        let (year, month, day) = (digits(0..4)?, digits(4..6)?, digits(6..8)?);
        let (hour, minute, second) = (digits(9..11)?, digits(11..13)?, digits(13..15)?);
        if year < 1970 || !(1..=12).contains(&month) || hour > 23 || minute > 59 || second > 59 {
            return Err(bad("a field out of range"));
        }
        let days = crate::time::days_from_civil(i64::from(year), month, day);
        if day == 0 || crate::time::civil_from_days(days) != (i64::from(year), month, day) {
            return Err(bad("no such day"));
        }
        let secs = u64::try_from(days).map_err(|_| bad("a date before 1970"))? * 86_400
            + u64::from(hour * 3600 + minute * 60 + second);
        Ok(Self {
            text: text.to_owned(),
            unix_secs: secs,
        })
    }

    /// The time `unix_secs` seconds after the Unix epoch.
    pub fn from_unix_secs(unix_secs: u64) -> Self {
        let days = i64::try_from(unix_secs / 86_400).unwrap_or(i64::MAX);
        let (y, m, d) = crate::time::civil_from_days(days);
        let rem = unix_secs % 86_400;
        Self {
            text: format!(
                "{y:04}{m:02}{d:02}T{:02}{:02}{:02}Z",
                rem / 3600,
                rem / 60 % 60,
                rem % 60
            ),
            unix_secs,
        }
    }

    pub fn as_str(&self) -> &str {
        &self.text
    }

    /// The day, `YYYYMMDD`, as the credential scope names it.
    pub fn day(&self) -> &str {
        &self.text[..8]
    }

    pub fn unix_secs(&self) -> u64 {
        self.unix_secs
    }
}

/// What `X-Amz-Content-Sha256` says about the payload.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum PayloadHash {
    /// The SHA-256 of the body, 64 lowercase hex digits (S3 checks the body against it).
    Sha256(String),
    /// `UNSIGNED-PAYLOAD`: the body is not covered by the signature.
    Unsigned,
    /// `STREAMING-AWS4-HMAC-SHA256-PAYLOAD`: `aws-chunked` body, each chunk signed
    /// ([`ChunkResigner`]).
    StreamingSigned,
    /// `STREAMING-AWS4-HMAC-SHA256-PAYLOAD-TRAILER`: signed chunks, then signed trailing
    /// headers.
    StreamingSignedTrailer,
    /// `STREAMING-UNSIGNED-PAYLOAD-TRAILER`: `aws-chunked` body without chunk signatures (it
    /// passes through unchanged), and unsigned trailing headers.
    StreamingUnsignedTrailer,
}

impl PayloadHash {
    pub const UNSIGNED: &str = "UNSIGNED-PAYLOAD";
    pub const STREAMING_SIGNED: &str = "STREAMING-AWS4-HMAC-SHA256-PAYLOAD";
    pub const STREAMING_SIGNED_TRAILER: &str = "STREAMING-AWS4-HMAC-SHA256-PAYLOAD-TRAILER";
    pub const STREAMING_UNSIGNED_TRAILER: &str = "STREAMING-UNSIGNED-PAYLOAD-TRAILER";

    /// Reads an `X-Amz-Content-Sha256` value. A hex hash may be in either case; it is kept as
    /// sent, since the signature covers it as sent.
    pub fn parse(value: &[u8]) -> Result<Self, ParseError> {
        let value = std::str::from_utf8(value).map_err(|_| ParseError::ContentSha256 {
            reason: "the value is not text".into(),
        })?;
        Ok(match value {
            Self::UNSIGNED => Self::Unsigned,
            Self::STREAMING_SIGNED => Self::StreamingSigned,
            Self::STREAMING_SIGNED_TRAILER => Self::StreamingSignedTrailer,
            Self::STREAMING_UNSIGNED_TRAILER => Self::StreamingUnsignedTrailer,
            hash if hash.len() == 64 && hash.bytes().all(|b| b.is_ascii_hexdigit()) => {
                Self::Sha256(hash.to_owned())
            }
            other if other.starts_with("STREAMING-") => {
                return Err(ParseError::ContentSha256 {
                    reason:
                        "an unsupported streaming mode (SigV4a's ECDSA modes are not supported)"
                            .into(),
                });
            }
            _ => {
                return Err(ParseError::ContentSha256 {
                    reason: "neither 64 hex digits nor a known keyword".into(),
                });
            }
        })
    }

    /// The value as the canonical request's last line carries it.
    pub fn as_str(&self) -> &str {
        match self {
            Self::Sha256(hash) => hash,
            Self::Unsigned => Self::UNSIGNED,
            Self::StreamingSigned => Self::STREAMING_SIGNED,
            Self::StreamingSignedTrailer => Self::STREAMING_SIGNED_TRAILER,
            Self::StreamingUnsignedTrailer => Self::STREAMING_UNSIGNED_TRAILER,
        }
    }
}

/// The parts of a request that signing reads. `path` and `query` are as the request line
/// carries them (still percent-encoded; `query` without the `?`). With HTTP/2, the caller puts
/// the `:authority` into a `host` header first.
#[derive(Clone, Copy, Debug)]
pub struct Request<'a> {
    pub method: &'a str,
    pub path: &'a str,
    pub query: Option<&'a str>,
    pub headers: &'a HeaderMap,
}

/// The SigV4 headers of a request, read and checked against each other by [`parse_request`].
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SignedRequest {
    pub authorization: Authorization,
    pub date: AmzDate,
    /// `X-Amz-Content-Sha256`, if the request has it.
    pub content_sha256: Option<PayloadHash>,
    /// Whether the request carries `X-Amz-Security-Token`.
    pub has_security_token: bool,
}

impl SignedRequest {
    /// The payload hash the request declares in `X-Amz-Content-Sha256`, as it goes into the
    /// canonical request; `None` when the header is absent, and the caller must hash the body.
    pub fn declared_payload_hash(&self) -> Option<&str> {
        self.content_sha256.as_ref().map(PayloadHash::as_str)
    }

    /// How the canonical URI is derived for this request's service.
    pub fn uri_path(&self) -> UriPath {
        UriPath::for_service(&self.authorization.scope.service)
    }
}

/// Reads the `Authorization`, `X-Amz-Date`, `X-Amz-Content-Sha256` and `X-Amz-Security-Token`
/// headers, and checks that the credential scope's day is X-Amz-Date's day and that
/// `x-amz-date` is among the signed headers (so a re-signed request may change it).
pub fn parse_request(headers: &HeaderMap) -> Result<SignedRequest, ParseError> {
    let authorization = single(headers, AUTHORIZATION.as_str(), "Authorization")?
        .ok_or(ParseError::NoAuthorization)?;
    let authorization = Authorization::parse(authorization.as_bytes())?;
    let date = single(headers, X_AMZ_DATE, "X-Amz-Date")?.ok_or(ParseError::NoDate)?;
    let date = AmzDate::parse(date.to_str().map_err(|_| ParseError::Date {
        reason: "the value is not text".into(),
    })?)?;
    if authorization.scope.date != date.day() {
        return Err(ParseError::ScopeDate);
    }
    if !authorization.signed_headers.iter().any(|n| n == X_AMZ_DATE) {
        return Err(ParseError::Authorization {
            reason: "SignedHeaders= does not include x-amz-date".into(),
        });
    }
    let content_sha256 = single(headers, X_AMZ_CONTENT_SHA256, "X-Amz-Content-Sha256")?
        .map(|v| PayloadHash::parse(v.as_bytes()))
        .transpose()?;
    let token = single(headers, X_AMZ_SECURITY_TOKEN, "X-Amz-Security-Token")?;
    if token.is_some_and(|t| t.to_str().is_err()) {
        return Err(ParseError::SecurityToken);
    }
    Ok(SignedRequest {
        authorization,
        date,
        content_sha256,
        has_security_token: token.is_some(),
    })
}

/// The one value of header `name`, if any; an error if it is repeated.
fn single<'h>(
    headers: &'h HeaderMap,
    name: &str,
    display: &'static str,
) -> Result<Option<&'h HeaderValue>, ParseError> {
    let mut values = headers.get_all(name).iter();
    let first = values.next();
    if values.next().is_some() {
        return Err(ParseError::Repeated { name: display });
    }
    Ok(first)
}

/// The canonical request of `request`: method, canonical URI (under `uri`), canonical query,
/// the `signed_headers` (lowercase, sorted) as `name:value` lines, their names, and
/// `payload_hash`. Errs with the name of a signed header the request lacks.
pub fn canonical_request(
    request: &Request<'_>,
    signed_headers: &[String],
    payload_hash: &str,
    uri: UriPath,
) -> Result<Vec<u8>, String> {
    let mut out = Vec::with_capacity(512);
    out.extend_from_slice(request.method.as_bytes());
    out.push(b'\n');
    out.extend_from_slice(canonical_uri(request.path, uri).as_bytes());
    out.push(b'\n');
    out.extend_from_slice(canonical_query(request.query).as_bytes());
    out.push(b'\n');
    canonical::canonical_headers_into(request.headers, signed_headers, &mut out)
        .map_err(str::to_owned)?;
    out.push(b'\n');
    out.extend_from_slice(signed_headers.join(";").as_bytes());
    out.push(b'\n');
    out.extend_from_slice(payload_hash.as_bytes());
    Ok(out)
}

/// The string to sign: algorithm, date, scope, and the hex SHA-256 of the canonical request.
pub fn string_to_sign(date: &AmzDate, scope: &Scope, canonical_request: &[u8]) -> String {
    format!(
        "{ALGORITHM}\n{}\n{scope}\n{}",
        date.as_str(),
        hex_sha256(canonical_request)
    )
}

/// The key a secret access key derives for one scope (`HMAC("AWS4" + secret, date)`, then
/// region, service and `aws4_request`). Zeroized on drop; `Debug` shows nothing of it.
#[derive(Clone)]
pub struct SigningKey(Zeroizing<[u8; 32]>);

impl SigningKey {
    pub fn derive(secret_access_key: &SecretValue, scope: &Scope) -> Self {
        let mut k_secret = Zeroizing::new(Vec::with_capacity(4 + secret_access_key.len()));
        k_secret.extend_from_slice(b"AWS4");
        k_secret.extend_from_slice(secret_access_key.expose());
        let mut key = Zeroizing::new(crypto::hmac(&k_secret, scope.date.as_bytes()));
        for part in [scope.region.as_str(), &scope.service, TERMINATOR] {
            key = Zeroizing::new(crypto::hmac(&key[..], part.as_bytes()));
        }
        Self(key)
    }

    /// The signature of `string_to_sign`, 64 lowercase hex digits.
    pub fn sign(&self, string_to_sign: &[u8]) -> String {
        crypto::hex(&crypto::hmac(&self.0[..], string_to_sign))
    }
}

impl fmt::Debug for SigningKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("SigningKey(<redacted>)")
    }
}

/// The signature of a canonical request, start to end: derive the key for `scope`, build the
/// string to sign, sign it.
pub fn signature(
    secret_access_key: &SecretValue,
    date: &AmzDate,
    scope: &Scope,
    canonical_request: &[u8],
) -> String {
    SigningKey::derive(secret_access_key, scope)
        .sign(string_to_sign(date, scope, canonical_request).as_bytes())
}

/// The chain of `aws-chunked` chunk signatures that starts at a request's signature (the seed):
/// each chunk's signature signs its data's hash and the previous signature.
#[derive(Clone, Debug)]
pub struct ChunkChain {
    key: SigningKey,
    date: AmzDate,
    scope: Scope,
    previous: String,
}

impl ChunkChain {
    /// A chain from `seed_signature`, the signature of the request's headers.
    pub fn new(key: SigningKey, date: AmzDate, scope: Scope, seed_signature: String) -> Self {
        Self {
            key,
            date,
            scope,
            previous: seed_signature,
        }
    }

    /// The signature of the next chunk, whose data hashes to `chunk_sha256`; the chain moves on
    /// to it.
    pub fn next_signature(&mut self, chunk_sha256: &[u8; 32]) -> String {
        let string_to_sign = format!(
            "AWS4-HMAC-SHA256-PAYLOAD\n{}\n{}\n{}\n{}\n{}",
            self.date.as_str(),
            self.scope,
            self.previous,
            hex_sha256(b""),
            crypto::hex(chunk_sha256)
        );
        self.previous = self.key.sign(string_to_sign.as_bytes());
        self.previous.clone()
    }

    /// The last signature of the chain (the seed, before any chunk).
    pub fn previous_signature(&self) -> &str {
        &self.previous
    }
}

/// Checks `request`'s signature against the `placeholder` credentials the agent was given:
/// same access key id, same session token if the placeholder has one (when it has none, a token
/// the agent sends is not checked: it is replaced or removed on re-signing), and a signature
/// that matches the request with `payload_hash` (compared in constant time). Returns the chunk
/// chain that verifies the agent's `aws-chunked` body, if it has one.
pub fn verify(
    request: &Request<'_>,
    signed: &SignedRequest,
    placeholder: &Credentials,
    payload_hash: &str,
) -> Result<ChunkChain, VerifyError> {
    let auth = &signed.authorization;
    if !crypto::constant_time_eq(
        auth.access_key_id.as_bytes(),
        placeholder.access_key_id.as_bytes(),
    ) {
        return Err(VerifyError::AccessKeyId);
    }
    if let Some(token) = &placeholder.session_token {
        let sent = request.headers.get(X_AMZ_SECURITY_TOKEN);
        if !sent.is_some_and(|sent| crypto::constant_time_eq(sent.as_bytes(), token.expose())) {
            return Err(VerifyError::SecurityToken);
        }
    }
    let canonical = canonical_request(
        request,
        &auth.signed_headers,
        payload_hash,
        signed.uri_path(),
    )
    .map_err(|name| VerifyError::MissingSignedHeader { name })?;
    let key = SigningKey::derive(&placeholder.secret_access_key, &auth.scope);
    let expected = key.sign(string_to_sign(&signed.date, &auth.scope, &canonical).as_bytes());
    if !crypto::constant_time_eq(expected.as_bytes(), auth.signature.as_bytes()) {
        return Err(VerifyError::Signature);
    }
    Ok(ChunkChain::new(
        key,
        signed.date.clone(),
        auth.scope.clone(),
        expected,
    ))
}

/// Checks that the request's date is at most `max_secs` from `now_unix_secs`
/// ([`MAX_CLOCK_SKEW_SECS`] is AWS's own bound).
pub fn check_clock_skew(
    signed: &SignedRequest,
    now_unix_secs: u64,
    max_secs: u64,
) -> Result<(), VerifyError> {
    let skew_secs = signed.date.unix_secs().abs_diff(now_unix_secs);
    if skew_secs > max_secs {
        return Err(VerifyError::ClockSkew {
            skew_secs,
            max_secs,
        });
    }
    Ok(())
}

/// The headers [`sign`] produced, to write over the request's.
#[derive(Debug)]
pub struct Resigned {
    /// The new `Authorization`, signed with the real credentials.
    pub authorization: HeaderValue,
    /// `X-Amz-Date`: the agent's unless [`sign`] was given another.
    pub x_amz_date: HeaderValue,
    /// `X-Amz-Security-Token` to set (marked sensitive), or `None` to remove the header.
    pub security_token: Option<HeaderValue>,
    /// The chain that signs the `aws-chunked` body, if the request has one.
    pub chunks: ChunkChain,
}

impl Resigned {
    /// Writes the new headers into `headers`: replaces `Authorization` and `X-Amz-Date`, sets
    /// or removes `X-Amz-Security-Token`. `X-Amz-Content-Sha256` is left as the agent sent it.
    pub fn apply(&self, headers: &mut HeaderMap) {
        headers.insert(AUTHORIZATION, self.authorization.clone());
        headers.insert(X_AMZ_DATE, self.x_amz_date.clone());
        match &self.security_token {
            Some(token) => {
                headers.insert(X_AMZ_SECURITY_TOKEN, token.clone());
            }
            None => {
                headers.remove(X_AMZ_SECURITY_TOKEN);
            }
        }
    }
}

/// Signs `request` again with the `real` credentials: same scope (region and service), same
/// signed headers, same `payload_hash`; `X-Amz-Date` kept unless `date` is given (then the
/// scope's day follows it); `X-Amz-Security-Token` set to the real session token and signed,
/// or removed and dropped from the signed headers when the real credentials have none.
pub fn sign(
    request: &Request<'_>,
    signed: &SignedRequest,
    real: &Credentials,
    payload_hash: &str,
    date: Option<AmzDate>,
) -> Result<Resigned, SignError> {
    if real.access_key_id.is_empty()
        || !real
            .access_key_id
            .bytes()
            .all(|b| b.is_ascii_graphic() && b != b'/' && b != b',')
    {
        return Err(SignError::AccessKeyId);
    }
    let date = date.unwrap_or_else(|| signed.date.clone());
    let scope = Scope {
        date: date.day().to_owned(),
        ..signed.authorization.scope.clone()
    };
    let x_amz_date = HeaderValue::from_str(date.as_str())
        .expect("an AmzDate is ASCII digits, 'T' and 'Z', valid in a header");
    let security_token = match &real.session_token {
        Some(token) => {
            let mut value =
                HeaderValue::from_bytes(token.expose()).map_err(|_| SignError::SessionToken)?;
            value.set_sensitive(true);
            Some(value)
        }
        None => None,
    };

    let mut headers = request.headers.clone();
    headers.insert(X_AMZ_DATE, x_amz_date.clone());
    headers.remove(X_AMZ_SECURITY_TOKEN);
    let mut signed_headers: Vec<String> = signed
        .authorization
        .signed_headers
        .iter()
        .filter(|n| *n != X_AMZ_SECURITY_TOKEN)
        .cloned()
        .collect();
    if let Some(token) = &security_token {
        headers.insert(X_AMZ_SECURITY_TOKEN, token.clone());
        let at = signed_headers
            .binary_search_by(|n| n.as_str().cmp(X_AMZ_SECURITY_TOKEN))
            .unwrap_or_else(|at| at);
        signed_headers.insert(at, X_AMZ_SECURITY_TOKEN.to_owned());
    }
    let view = Request {
        headers: &headers,
        ..*request
    };
    let canonical = canonical_request(&view, &signed_headers, payload_hash, signed.uri_path())
        .map_err(|name| SignError::MissingSignedHeader { name })?;
    let key = SigningKey::derive(&real.secret_access_key, &scope);
    let signature = key.sign(string_to_sign(&date, &scope, &canonical).as_bytes());
    let authorization = Authorization {
        access_key_id: real.access_key_id.clone(),
        scope: scope.clone(),
        signed_headers,
        signature: signature.clone(),
    };
    let authorization = HeaderValue::from_str(&authorization.to_header_string())
        .map_err(|_| SignError::AccessKeyId)?;
    Ok(Resigned {
        authorization,
        x_amz_date,
        security_token,
        chunks: ChunkChain::new(key, date, scope, signature),
    })
}
