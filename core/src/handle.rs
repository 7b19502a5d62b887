//! Handles: opaque strings an agent may hold in place of a real key.
//!
//! `brokerctl handle mint` binds a fresh random token to (cgroup subtree, secret, host, expiry)
//! and prints it once; the broker stores only its SHA-256 ([`HandleRecord`]). A token is either
//! *marked*, `brk_` + 52 base32 characters, or *shaped* ([`shape`]): the same prefix, length
//! and alphabet as the secret it stands for (`ghp_` + 36 letters and digits for a `ghp_` key),
//! with a fresh random body, for clients that refuse a token that does not look like theirs.
//!
//! The agent puts the token wherever a key goes: any header (`Bearer brk_...`, `x-api-key`),
//! basic auth (inside the base64 `user:pass`), or a query parameter (also percent-encoded).
//! [`swap_handles`] finds the tokens in a request, checks each against its record ([`check`]),
//! and rewrites the request with the secret in the token's place; any failed check denies the
//! whole request with a reason the agent can read. Bodies and paths are not searched.
//!
//! Finding marked tokens needs nothing but the marker, and an unknown `brk_` token denies the
//! request (it is a mistyped or deleted handle). A shaped token has no marker: the caller
//! passes the shapes of the shaped handles it has stored ([`SwapContext::shapes`]), every match
//! of one is a candidate, and a candidate is a handle when its hash is a stored handle's (then
//! it is checked, and denied or swapped, exactly like a `brk_` one). A candidate no handle has
//! is not a handle (it may be a real token of the same kind) and is left as it is; so handle
//! records are kept after they expire or are revoked, and a failed lookup denies the request
//! rather than let a handle through unswapped.
//!
//! Pure: the caller supplies the time, the record lookup and the secret lookup. The only effect
//! is drawing randomness in [`mint`], [`mint_shaped`] and [`placeholder`].

use std::{
    borrow::Borrow, collections::HashMap, fmt, ops::Range, time::Duration, time::SystemTime,
};

use data_encoding::{BASE32_NOPAD, BASE64, BASE64_NOPAD, HEXLOWER};
use http::{HeaderMap, HeaderValue};
use sha2::{Digest as _, Sha256};
use zeroize::Zeroizing;

use crate::{
    cgroup::CgroupPath,
    inject::{SecretBytes, reserve_zeroizing},
    percent::{self, HexCase, Plus},
    policy::{HostError, HostPattern},
    secret::SecretName,
    time::format_rfc3339,
};

pub mod shape;

pub use shape::{Alphabet, MIN_RANDOM_BITS, ShapeError, TokenShape};

/// Every marked token starts with this.
pub const TOKEN_PREFIX: &str = "brk_";
/// Random bytes in a token.
const TOKEN_RANDOM_BYTES: usize = 32;
/// Characters after the prefix: 32 bytes in unpadded base32.
pub const TOKEN_BODY_LEN: usize = 52;
/// Random bytes in a handle id (`h_` + 8 hex digits).
const ID_RANDOM_BYTES: usize = 4;
/// TTL when `--ttl` is not given.
pub const DEFAULT_TTL: Duration = Duration::from_secs(15 * 60);
/// Longest TTL accepted.
pub const MAX_TTL: Duration = Duration::from_secs(365 * 24 * 60 * 60);

/// Errors minting handles or parsing their parameters.
#[derive(Debug, thiserror::Error)]
pub enum HandleError {
    #[error("invalid ttl {input:?}: {reason}; write a duration such as 30s, 15m, 1h or 2d")]
    Ttl { input: String, reason: String },
    #[error("invalid host {input:?} for a handle: {source}")]
    Host {
        input: String,
        #[source]
        source: HostError,
    },
    #[error("invalid handle id {0:?}: expected h_ followed by 8 lowercase hex digits")]
    Id(String),
    #[error("the handle's expiry is out of range")]
    ExpiryOutOfRange,
    #[error("a handle's lifetime must be between 1s and 365d (asked for {}s)", .0.as_secs())]
    TtlOutOfRange(Duration),
    #[error("cannot draw random bytes for a handle")]
    Random(#[source] getrandom::Error),
}

/// The store of handle records could not be read. A request that may carry a handle is then
/// refused, never forwarded with the handle in it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct LookupFailed;

/// Why a request carrying a handle was refused. Messages are for the agent: they say what is
/// wrong without revealing the binding; the fields carry the details for the audit log.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum HandleDenial {
    #[error(
        "the request carries a handle ({shown}...) that the broker does not know; it may be \
         mistyped or deleted"
    )]
    Unknown {
        /// The prefix and first characters of the token.
        shown: String,
    },
    #[error("handle {id} expired at {}", format_rfc3339(*.expired_at))]
    Expired {
        id: HandleId,
        expired_at: SystemTime,
    },
    #[error("handle {id} was revoked")]
    Revoked { id: HandleId },
    #[error("handle {id} is not valid for cgroup {caller}")]
    WrongCgroup {
        id: HandleId,
        caller: CgroupPath,
        bound: CgroupPath,
    },
    #[error("handle {id} is not valid for host {host}")]
    WrongHost {
        id: HandleId,
        host: String,
        bound: HostPattern,
    },
    #[error("handle {id} refers to secret {secret}, which is not in the vault")]
    MissingSecret { id: HandleId, secret: SecretName },
    #[error("the secret behind handle {id} cannot be written where the handle is: {reason}")]
    Unencodable { id: HandleId, reason: &'static str },
    #[error(
        "the broker cannot read its handles now, and the request carries a token that may be \
         one; try again later"
    )]
    Unavailable,
}

/// A handle's public id, `h_` + 8 hex digits: what `handle list` shows and `handle revoke`
/// takes. Not a credential.
#[derive(Clone, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct HandleId(String);

impl HandleId {
    pub fn parse(raw: &str) -> Result<Self, HandleError> {
        let ok = raw.strip_prefix("h_").is_some_and(|hex| {
            hex.len() == 2 * ID_RANDOM_BYTES
                && hex
                    .bytes()
                    .all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b))
        });
        if ok {
            Ok(Self(raw.to_string()))
        } else {
            Err(HandleError::Id(raw.to_string()))
        }
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl fmt::Display for HandleId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

/// SHA-256 of a token string: what the broker stores and looks tokens up by. Marked tokens
/// carry 256 random bits and shaped ones at least [`MIN_RANDOM_BITS`], so a plain hash cannot be
/// reversed or guessed.
#[derive(Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct TokenHash(pub [u8; 32]);

impl TokenHash {
    pub fn of(token: &str) -> Self {
        Self::of_bytes(token.as_bytes())
    }

    fn of_bytes(token: &[u8]) -> Self {
        Self(Sha256::digest(token).into())
    }

    /// Lowercase hex, for storage.
    pub fn to_hex(&self) -> String {
        HEXLOWER.encode(&self.0)
    }

    /// Parses [`TokenHash::to_hex`] output.
    pub fn from_hex(hex: &str) -> Option<Self> {
        let bytes = HEXLOWER.decode(hex.as_bytes()).ok()?;
        bytes.try_into().ok().map(Self)
    }
}

impl fmt::Debug for TokenHash {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "TokenHash({})", self.to_hex())
    }
}

/// The token string, shown to the operator once at mint. Debug is redacted.
pub struct HandleToken(Zeroizing<String>);

impl HandleToken {
    /// The token string (`brk_...`, or shaped), to print for the operator.
    pub fn expose(&self) -> &str {
        &self.0
    }
}

impl fmt::Debug for HandleToken {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("HandleToken(<redacted>)")
    }
}

/// What a handle is bound to.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct HandleBinding {
    /// The handle works for requests from this cgroup and every cgroup below it.
    pub cgroup: CgroupPath,
    /// The secret it stands for.
    pub secret: SecretName,
    /// The host it may be sent to (exact, or `*.suffix`).
    pub host: HostPattern,
}

impl HandleBinding {
    /// Validates the host as policy files do.
    pub fn new(cgroup: CgroupPath, secret: SecretName, host: &str) -> Result<Self, HandleError> {
        let host = HostPattern::parse(host).map_err(|source| HandleError::Host {
            input: host.to_string(),
            source,
        })?;
        Ok(Self {
            cgroup,
            secret,
            host,
        })
    }
}

/// What the broker stores for a handle: never the token, only its hash.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct HandleRecord {
    pub id: HandleId,
    pub token_hash: TokenHash,
    pub binding: HandleBinding,
    pub created: SystemTime,
    pub expires: SystemTime,
    pub revoked: bool,
    /// The shape of a shaped handle's token; `None` for a marked (`brk_`) one.
    pub shape: Option<TokenShape>,
}

/// Mints a handle: a fresh token (returned once) and the record to store. Storage should
/// refuse an id that is already taken (ids are 32 random bits), and mint again. A `ttl` under a
/// second or over [`MAX_TTL`] is refused, whoever asks (brokerctl or a raw control client).
pub fn mint(
    now: SystemTime,
    ttl: Duration,
    binding: HandleBinding,
) -> Result<(HandleToken, HandleRecord), HandleError> {
    mint_with(now, ttl, binding, None, os_random)
}

/// Mints a shaped handle: like [`mint`], with a token of `shape` (the shape of the secret it
/// stands for, [`TokenShape::of_secret`]): its prefix and a fresh random body.
pub fn mint_shaped(
    now: SystemTime,
    ttl: Duration,
    binding: HandleBinding,
    shape: TokenShape,
) -> Result<(HandleToken, HandleRecord), HandleError> {
    mint_with(now, ttl, binding, Some(shape), os_random)
}

/// A placeholder of `shape`: a fresh random token that looks like the secret (same prefix,
/// length and alphabet) and is bound to nothing, for an agent's environment where a policy rule
/// injects the real secret anyway. Nothing of the secret is in it but the prefix.
pub fn placeholder(shape: &TokenShape) -> Result<HandleToken, HandleError> {
    shape::random_token(shape, os_random).map(HandleToken)
}

fn os_random(buf: &mut [u8]) -> Result<(), HandleError> {
    getrandom::fill(buf).map_err(HandleError::Random)
}

fn mint_with(
    now: SystemTime,
    ttl: Duration,
    binding: HandleBinding,
    shape: Option<TokenShape>,
    mut random: impl FnMut(&mut [u8]) -> Result<(), HandleError>,
) -> Result<(HandleToken, HandleRecord), HandleError> {
    if ttl < Duration::from_secs(1) || ttl > MAX_TTL {
        return Err(HandleError::TtlOutOfRange(ttl));
    }
    let expires = now.checked_add(ttl).ok_or(HandleError::ExpiryOutOfRange)?;
    let token = match &shape {
        Some(shape) => shape::random_token(shape, &mut random)?,
        None => marked_token(&mut random)?,
    };
    let mut id = [0u8; ID_RANDOM_BYTES];
    random(&mut id)?;
    let record = HandleRecord {
        id: HandleId(format!("h_{}", HEXLOWER.encode(&id))),
        token_hash: TokenHash::of(&token),
        binding,
        created: now,
        expires,
        revoked: false,
        shape,
    };
    Ok((HandleToken(token), record))
}

/// `brk_` + 32 random bytes in lowercase unpadded base32.
fn marked_token(
    mut random: impl FnMut(&mut [u8]) -> Result<(), HandleError>,
) -> Result<Zeroizing<String>, HandleError> {
    let mut bytes = Zeroizing::new([0u8; TOKEN_RANDOM_BYTES]);
    random(&mut bytes[..])?;
    let mut token = Zeroizing::new(String::with_capacity(TOKEN_PREFIX.len() + TOKEN_BODY_LEN));
    token.push_str(TOKEN_PREFIX);
    let mut body = Zeroizing::new(vec![0u8; BASE32_NOPAD.encode_len(TOKEN_RANDOM_BYTES)]);
    BASE32_NOPAD.encode_mut(&bytes[..], &mut body);
    for &b in body.iter() {
        token.push(char::from(b.to_ascii_lowercase()));
    }
    Ok(token)
}

/// Parses a TTL such as `30s`, `15m`, `1h`, `2d` or `1h30m`.
pub fn parse_ttl(input: &str) -> Result<Duration, HandleError> {
    let fail = |reason: String| HandleError::Ttl {
        input: input.to_string(),
        reason,
    };
    let ttl = humantime::parse_duration(input.trim()).map_err(|e| fail(e.to_string()))?;
    if ttl < Duration::from_secs(1) {
        return Err(fail("a handle must live at least 1s".into()));
    }
    if ttl > MAX_TTL {
        return Err(fail("the longest ttl is 365d".into()));
    }
    Ok(ttl)
}

/// Whether `record` may be used by a request from `caller` to `host` at `now`.
pub fn check(
    record: &HandleRecord,
    caller: &CgroupPath,
    host: &str,
    now: SystemTime,
) -> Result<(), HandleDenial> {
    let id = || record.id.clone();
    if record.revoked {
        return Err(HandleDenial::Revoked { id: id() });
    }
    if now >= record.expires {
        return Err(HandleDenial::Expired {
            id: id(),
            expired_at: record.expires,
        });
    }
    if !record.binding.cgroup.is_ancestor_or_self_of(caller) {
        return Err(HandleDenial::WrongCgroup {
            id: id(),
            caller: caller.clone(),
            bound: record.binding.cgroup.clone(),
        });
    }
    if !record.binding.host.matches(host) {
        return Err(HandleDenial::WrongHost {
            id: id(),
            host: host.to_string(),
            bound: record.binding.host.clone(),
        });
    }
    Ok(())
}

fn is_token_body_byte(b: u8) -> bool {
    b.is_ascii_lowercase() || (b'2'..=b'7').contains(&b)
}

/// A byte that would make a `brk_` string part of a longer word.
fn is_word_byte(b: u8) -> bool {
    b.is_ascii_alphanumeric() || b == b'_'
}

/// Every well-formed marked token in `haystack`: `brk_` plus exactly 52 base32 characters, not
/// preceded or followed by a letter, digit or `_`.
pub fn find_tokens(haystack: &[u8]) -> impl Iterator<Item = Range<usize>> + '_ {
    memchr::memmem::find_iter(haystack, TOKEN_PREFIX.as_bytes()).filter_map(move |start| {
        let body_start = start + TOKEN_PREFIX.len();
        let end = body_start + TOKEN_BODY_LEN;
        let body = haystack.get(body_start..end)?;
        let clean_start = start == 0 || !is_word_byte(haystack[start - 1]);
        let clean_end = haystack.get(end).is_none_or(|&b| !is_word_byte(b));
        (clean_start && clean_end && body.iter().all(|&b| is_token_body_byte(b)))
            .then_some(start..end)
    })
}

/// Who is asking, for [`swap_handles`].
#[derive(Clone, Copy, Debug)]
pub struct SwapContext<'a> {
    /// The caller's cgroup.
    pub cgroup: &'a CgroupPath,
    /// The host the request goes to (as policy decided it).
    pub host: &'a str,
    pub now: SystemTime,
    /// The shapes of the stored shaped handles (expired and revoked ones included), each once:
    /// what shaped candidates are looked for.
    pub shapes: &'a [TokenShape],
}

/// A handle a request used.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct UsedHandle {
    pub id: HandleId,
    pub secret: SecretName,
}

/// A request with its handles swapped for secrets. Debug shows no values.
#[derive(Default)]
pub struct Swapped {
    /// The full header map with secrets in place of tokens, when any header held a token
    /// (swapped values are marked sensitive, so HTTP/2 never indexes them).
    pub headers: Option<HeaderMap>,
    /// The new query string (without `?`), when the query held a token.
    pub query: Option<Zeroizing<String>>,
    /// Each handle used, once, in order of first use: for the audit record.
    pub used: Vec<UsedHandle>,
    /// The secret of each entry in `used`, same order: for response scrubbing.
    pub secret_values: Vec<Zeroizing<Vec<u8>>>,
}

impl fmt::Debug for Swapped {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Swapped")
            .field("headers_changed", &self.headers.is_some())
            .field("query_changed", &self.query.is_some())
            .field("used", &self.used)
            .finish_non_exhaustive()
    }
}

impl Swapped {
    /// Writes the swapped headers and query into a request.
    pub fn apply(self, parts: &mut http::request::Parts) -> Result<(), http::Error> {
        if let Some(headers) = self.headers {
            parts.headers = headers;
        }
        if let Some(query) = self.query {
            let path = parts.uri.path();
            let mut uri = http::uri::Parts::from(parts.uri.clone());
            uri.path_and_query = Some(http::uri::PathAndQuery::try_from(format!(
                "{path}?{}",
                query.as_str()
            ))?);
            parts.uri = http::Uri::from_parts(uri)?;
        }
        Ok(())
    }
}

/// What a candidate token is.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Kind {
    /// `brk_...`: a handle, or a mistyped or deleted one (denied).
    Marked,
    /// A match of a shaped handle's shape: a handle only when one is stored with its hash.
    Shaped,
}

/// Every candidate token in `text`, `brk_` ones and matches of `shapes`, by start (the longest
/// first where two start together). Candidates of different kinds may overlap.
fn candidates(text: &[u8], shapes: &[TokenShape]) -> Vec<(Range<usize>, Kind)> {
    let mut out: Vec<(Range<usize>, Kind)> = find_tokens(text).map(|r| (r, Kind::Marked)).collect();
    for shape in shapes {
        out.extend(shape.find_in(text).into_iter().map(|r| (r, Kind::Shaped)));
    }
    out.sort_by_key(|(r, _)| (r.start, std::cmp::Reverse(r.end)));
    out
}

/// A token whose record passed [`check`].
struct Admitted {
    id: HandleId,
    secret: SecretName,
    /// Index into `Swapped::secret_values` once the secret was fetched.
    value: Option<usize>,
}

/// What a candidate turned out to be.
enum Seen {
    /// A handle that passed its check.
    Handle(Admitted),
    /// A shaped candidate that no stored handle has.
    NotAHandle,
}

/// Where a header value's handles are.
enum HeaderPlan {
    /// In the value as sent.
    Raw(Vec<Range<usize>>),
    /// Inside `Basic` credentials: the scheme text's length (with its space), the decoded
    /// `user:pass`, and the handles in it.
    Basic {
        scheme_len: usize,
        decoded: Zeroizing<Vec<u8>>,
        handles: Vec<Range<usize>>,
    },
}

/// Where a query's handles are: in its percent-decoded bytes, each decoded byte's offset in
/// the query as sent (see [`percent::decode_with_offsets`]).
struct QueryPlan {
    decoded: Zeroizing<Vec<u8>>,
    starts: Vec<usize>,
    handles: Vec<Range<usize>>,
}

/// Checks every candidate first (planning where the handles are), then fetches secrets and
/// rewrites, so a request that is denied never has any secret decrypted for it.
struct Resolver<'c, R, S> {
    ctx: &'c SwapContext<'c>,
    records: R,
    secrets: S,
    /// Every candidate looked up so far, by the hash of its text.
    seen: HashMap<TokenHash, Seen>,
    out: Swapped,
}

impl<R, Rec, S, V> Resolver<'_, R, S>
where
    R: FnMut(&TokenHash) -> Result<Option<Rec>, LookupFailed>,
    Rec: Borrow<HandleRecord>,
    S: FnMut(&SecretName) -> Option<V>,
    V: SecretBytes,
{
    /// Looks a candidate's record up and checks it: `Ok(true)` for a handle this request may
    /// use, `Ok(false)` for a shaped candidate that is no handle, a denial otherwise.
    fn admit(&mut self, token: &[u8], kind: Kind) -> Result<bool, HandleDenial> {
        let hash = TokenHash::of_bytes(token);
        match self.seen.get(&hash) {
            Some(Seen::Handle(_)) => return Ok(true),
            Some(Seen::NotAHandle) => return Ok(false),
            None => {}
        }
        let found = (self.records)(&hash).map_err(|LookupFailed| HandleDenial::Unavailable)?;
        let Some(record) = found.filter(|r| r.borrow().token_hash == hash) else {
            return match kind {
                Kind::Marked => Err(HandleDenial::Unknown {
                    // Marked tokens are ASCII: the marker and four characters.
                    shown: String::from_utf8_lossy(&token[..TOKEN_PREFIX.len() + 4]).into_owned(),
                }),
                Kind::Shaped => {
                    self.seen.insert(hash, Seen::NotAHandle);
                    Ok(false)
                }
            };
        };
        let record = record.borrow();
        check(record, self.ctx.cgroup, self.ctx.host, self.ctx.now)?;
        let admitted = Admitted {
            id: record.id.clone(),
            secret: record.binding.secret.clone(),
            value: None,
        };
        self.seen.insert(hash, Seen::Handle(admitted));
        Ok(true)
    }

    /// The handles in `text`, in order and not overlapping, after checking every candidate
    /// (the first denial wins).
    fn handles_in(&mut self, text: &[u8]) -> Result<Vec<Range<usize>>, HandleDenial> {
        let mut handles: Vec<Range<usize>> = Vec::new();
        for (range, kind) in candidates(text, self.ctx.shapes) {
            if self.admit(&text[range.clone()], kind)?
                && handles.last().is_none_or(|last| last.end <= range.start)
            {
                handles.push(range);
            }
        }
        Ok(handles)
    }

    /// Where a header value's handles are: inside `Basic` credentials when those hold any,
    /// else in the raw value; `None` when it holds none.
    fn plan_header(&mut self, value: &[u8]) -> Result<Option<HeaderPlan>, HandleDenial> {
        if let Some((scheme, decoded)) = basic_credentials(value) {
            let handles = self.handles_in(&decoded)?;
            if !handles.is_empty() {
                return Ok(Some(HeaderPlan::Basic {
                    scheme_len: scheme.len(),
                    decoded,
                    handles,
                }));
            }
        }
        let handles = self.handles_in(value)?;
        Ok((!handles.is_empty()).then_some(HeaderPlan::Raw(handles)))
    }

    /// Where the query's handles are, after percent-decoding; `None` when it holds none.
    fn plan_query(&mut self, query: &str) -> Result<Option<QueryPlan>, HandleDenial> {
        // `+` stays `+`: the bytes around the tokens are copied as sent.
        let (decoded, starts) = percent::decode_with_offsets(query.as_bytes(), Plus::Keep);
        let decoded = Zeroizing::new(decoded);
        let handles = self.handles_in(&decoded)?;
        Ok((!handles.is_empty()).then_some(QueryPlan {
            decoded,
            starts,
            handles,
        }))
    }

    /// The index of an admitted token's secret in `out.secret_values`, fetching it once.
    fn resolve(&mut self, token: &[u8]) -> Result<usize, HandleDenial> {
        let Some(Seen::Handle(admitted)) = self.seen.get_mut(&TokenHash::of_bytes(token)) else {
            // Every handle was admitted when it was planned; refuse rather than trust that.
            return Err(HandleDenial::Unavailable);
        };
        if let Some(i) = admitted.value {
            return Ok(i);
        }
        let value =
            (self.secrets)(&admitted.secret).ok_or_else(|| HandleDenial::MissingSecret {
                id: admitted.id.clone(),
                secret: admitted.secret.clone(),
            })?;
        let bytes = value.secret_bytes();
        if bytes.is_empty() {
            return Err(HandleDenial::Unencodable {
                id: admitted.id.clone(),
                reason: "the secret is empty",
            });
        }
        let i = self.out.secret_values.len();
        self.out.secret_values.push(Zeroizing::new(bytes.to_vec()));
        self.out.used.push(UsedHandle {
            id: admitted.id.clone(),
            secret: admitted.secret.clone(),
        });
        admitted.value = Some(i);
        Ok(i)
    }

    /// The handle whose secret was spliced in last (for an error about the result).
    fn last_used_id(&self) -> HandleId {
        self.out
            .used
            .last()
            .map_or_else(|| HandleId(String::new()), |u| u.id.clone())
    }

    /// `input` with each handle replaced by the raw secret.
    fn replace(
        &mut self,
        input: &[u8],
        handles: &[Range<usize>],
    ) -> Result<Zeroizing<Vec<u8>>, HandleDenial> {
        let mut out = Zeroizing::new(Vec::with_capacity(input.len() + 64));
        let mut last = 0;
        for r in handles {
            let i = self.resolve(&input[r.clone()])?;
            out.extend_from_slice(&input[last..r.start]);
            let secret = &self.out.secret_values[i];
            reserve_zeroizing(&mut out, secret.len());
            out.extend_from_slice(secret);
            last = r.end;
        }
        out.extend_from_slice(&input[last..]);
        Ok(out)
    }

    /// A header value with its handles swapped, as `plan` says.
    fn header_value(
        &mut self,
        value: &[u8],
        plan: HeaderPlan,
    ) -> Result<HeaderValue, HandleDenial> {
        let swapped = match plan {
            HeaderPlan::Basic {
                scheme_len,
                decoded,
                handles,
            } => {
                let swapped = self.replace(&decoded, &handles)?;
                let len = scheme_len + BASE64.encode_len(swapped.len());
                let mut out = Zeroizing::new(Vec::with_capacity(len));
                out.extend_from_slice(&value[..scheme_len]);
                out.resize(len, 0);
                BASE64.encode_mut(&swapped, &mut out[scheme_len..]);
                out
            }
            HeaderPlan::Raw(handles) => self.replace(value, &handles)?,
        };
        let mut value =
            HeaderValue::from_bytes(&swapped).map_err(|_| HandleDenial::Unencodable {
                id: self.last_used_id(),
                reason: "the secret holds bytes that cannot go into a header",
            })?;
        value.set_sensitive(true);
        Ok(value)
    }

    /// The query with its handles swapped, as `plan` says; bytes around the handles are kept
    /// exactly as they were sent.
    fn query(&mut self, query: &str, plan: QueryPlan) -> Result<Zeroizing<String>, HandleDenial> {
        let raw = query.as_bytes();
        let QueryPlan {
            decoded,
            starts,
            handles,
        } = plan;
        let mut out = Zeroizing::new(Vec::with_capacity(raw.len() + 64));
        let mut last = 0;
        for r in handles {
            let secret = self.resolve(&decoded[r.clone()])?;
            out.extend_from_slice(&raw[last..starts[r.start]]);
            let value = &self.out.secret_values[secret];
            percent::encode_into(value, &mut out, HexCase::Upper);
            last = starts[r.end];
        }
        out.extend_from_slice(&raw[last..]);
        let bytes = std::mem::take(&mut *out);
        match String::from_utf8(bytes) {
            Ok(s) => Ok(Zeroizing::new(s)),
            Err(e) => {
                // Unreachable: the input was UTF-8 and only ASCII was spliced in.
                drop(Zeroizing::new(e.into_bytes()));
                Err(HandleDenial::Unencodable {
                    id: self.last_used_id(),
                    reason: "the query string could not be rebuilt",
                })
            }
        }
    }
}

/// `Basic base64(user:pass)`: the scheme text as sent (with its space) and the decoded
/// credentials, when the value is that and decodes.
fn basic_credentials(value: &[u8]) -> Option<(&[u8], Zeroizing<Vec<u8>>)> {
    const SCHEME: &[u8] = b"basic ";
    if !starts_with_ignore_case(value, SCHEME) {
        return None;
    }
    let (scheme, encoded) = value.split_at(SCHEME.len());
    Some((scheme, decode_base64(encoded.trim_ascii())?))
}

fn starts_with_ignore_case(value: &[u8], prefix: &[u8]) -> bool {
    value
        .get(..prefix.len())
        .is_some_and(|p| p.eq_ignore_ascii_case(prefix))
}

fn decode_base64(encoded: &[u8]) -> Option<Zeroizing<Vec<u8>>> {
    for encoding in [&BASE64, &BASE64_NOPAD] {
        let Ok(len) = encoding.decode_len(encoded.len()) else {
            continue;
        };
        let mut out = Zeroizing::new(vec![0u8; len]);
        if let Ok(n) = encoding.decode_mut(encoded, &mut out) {
            out.truncate(n);
            return Some(out);
        }
    }
    None
}

/// Swaps every handle in a request's headers and query for its secret.
///
/// `records` looks a record up by token hash (`Err` when the store cannot be read); `secrets`
/// fetches a secret's value (called only after every handle's [`check`] passed). Returns
/// `Ok(None)` when the request holds no handle, and the first denial when a `brk_` token is
/// unknown, a handle fails its check, or a lookup fails: the request must then not be
/// forwarded. Shaped candidates that are no handle's are left as they are.
pub fn swap_handles<R, Rec, S, V>(
    headers: &HeaderMap,
    query: Option<&str>,
    ctx: &SwapContext<'_>,
    records: R,
    secrets: S,
) -> Result<Option<Swapped>, HandleDenial>
where
    R: FnMut(&TokenHash) -> Result<Option<Rec>, LookupFailed>,
    Rec: Borrow<HandleRecord>,
    S: FnMut(&SecretName) -> Option<V>,
    V: SecretBytes,
{
    let mut resolver = Resolver {
        ctx,
        records,
        secrets,
        seen: HashMap::new(),
        out: Swapped::default(),
    };
    // First pass: every candidate is looked up, and every handle must pass its check, before
    // any secret is fetched.
    let mut header_plans = Vec::new();
    for (index, value) in headers.values().enumerate() {
        if let Some(plan) = resolver.plan_header(value.as_bytes())? {
            header_plans.push((index, plan));
        }
    }
    let query_plan = match query {
        Some(q) => resolver.plan_query(q)?,
        None => None,
    };
    if header_plans.is_empty() && query_plan.is_none() {
        return Ok(None);
    }
    let mut replacements = Vec::with_capacity(header_plans.len());
    let mut plans = header_plans.into_iter().peekable();
    for (index, value) in headers.values().enumerate() {
        if let Some((_, plan)) = plans.next_if(|(i, _)| *i == index) {
            replacements.push((index, resolver.header_value(value.as_bytes(), plan)?));
        }
    }
    if let (Some(q), Some(plan)) = (query, query_plan) {
        resolver.out.query = Some(resolver.query(q, plan)?);
    }
    if !replacements.is_empty() {
        let mut rebuilt = HeaderMap::with_capacity(headers.len());
        let mut replacements = replacements.into_iter().peekable();
        for (index, (name, value)) in headers.iter().enumerate() {
            let value = match replacements.next_if(|(i, _)| *i == index) {
                Some((_, new)) => new,
                None => value.clone(),
            };
            rebuilt.append(name.clone(), value);
        }
        resolver.out.headers = Some(rebuilt);
    }
    if resolver.out.used.is_empty() {
        return Ok(None);
    }
    Ok(Some(resolver.out))
}

#[cfg(test)]
mod tests;
