//! A local OAuth 2.0 authorization server and protected resource, for tests of brokerd's token
//! refresh: brokerd POSTs to the token endpoint itself, then forwards agents' requests to the
//! resource with `Authorization: Bearer <access token>`.
//!
//! [`TestOAuth`] runs in-process on its own tokio runtime thread, one HTTPS listener (h2 and
//! http/1.1) with a certificate from a [`TestCa`] for the names in [`OAuthOptions::names`]
//! (`auth.example.test` by default). It serves, under any of those names:
//!
//! - `POST /token` (RFC 6749, `application/x-www-form-urlencoded`), grants:
//!   - `refresh_token`: issues an access token and rotates the refresh token. Each refresh token
//!     is single use: presenting one already used (a replay) or revoked is `400 invalid_grant`.
//!     [`OAuthOptions::rotate_refresh_tokens`] off keeps refresh tokens valid and answers
//!     without a new one; [`OAuthOptions::revoke_family_on_replay`] makes a replay revoke every
//!     token descended from the same first one;
//!   - `client_credentials`: a confidential client's own access token, no refresh token;
//!   - `urn:ietf:params:oauth:grant-type:jwt-bearer` (RFC 7523, Google's service-account flow):
//!     an RS256 JWT whose `iss` is a service account made by [`TestOAuth::service_account`],
//!     whose `aud` is [`TestOAuth::token_url`], with `iat`/`exp` at most an hour apart.
//!
//!   Clients authenticate with `client_id`/`client_secret` in the form or with HTTP Basic
//!   (RFC 6749 2.3.1). Errors are RFC 6749 5.2 JSON: `invalid_request`, `invalid_client` (401),
//!   `invalid_grant`, `unsupported_grant_type`, `invalid_scope`; an injected failure is `503
//!   temporarily_unavailable`.
//! - `GET /resource` and anything under `/api/`: 200 `{"authorization_sha256": ...,
//!   "token_valid": true, ...}` for a current access token, else 401 with
//!   `WWW-Authenticate: Bearer error="invalid_token"`.
//!
//! The test drives it through thread-safe methods: register clients, mint a first refresh token,
//! revoke, change `expires_in`, stall or fail the next token calls, and read counters (calls per
//! grant, presentations per refresh token by sha256, 401s of the resource).
//!
//! Tokens are `at_`/`rt_` and 43 base64url characters of 32 bytes from the OS CSPRNG. Nothing
//! here prints or logs one: every token issued is registered with [`Canary::adopt`] so
//! [`crate::redact`] hides it, and the counters name tokens by sha256 only.

use std::{
    collections::{BTreeMap, HashMap},
    convert::Infallible,
    fmt,
    net::{IpAddr, SocketAddr},
    sync::{Arc, Mutex, MutexGuard},
    thread,
    time::{Duration, Instant, SystemTime, UNIX_EPOCH},
};

use bytes::Bytes;
use data_encoding::{BASE64, BASE64URL_NOPAD};
use http::{Request, Response, StatusCode, header};
use http_body_util::{BodyExt as _, Full};
use hyper::body::Incoming;
use hyper_util::{
    rt::{TokioExecutor, TokioIo},
    server::conn::auto,
};
use rustls::ServerConfig;
use tokio::sync::watch;
use zeroize::Zeroizing;

use crate::{
    canary::{Canary, sha256_hex},
    upstream::TestCa,
};

/// Prefix of every access token.
pub const ACCESS_PREFIX: &str = "at_";
/// Prefix of every refresh token.
pub const REFRESH_PREFIX: &str = "rt_";
/// Characters after the prefix: 32 random bytes in base64url without padding.
pub const TOKEN_RANDOM_LEN: usize = 43;
/// The RFC 7523 grant type.
pub const JWT_BEARER: &str = "urn:ietf:params:oauth:grant-type:jwt-bearer";
/// Longest `exp - iat` a jwt-bearer assertion may have (Google's limit).
const MAX_ASSERTION_LIFETIME: u64 = 3600;
/// How far an assertion's `iat` may be in the future (clock skew).
const CLOCK_SKEW: u64 = 60;

/// A `grant_type` of a token request, as counted by [`TestOAuth::token_calls`].
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Grant {
    RefreshToken,
    ClientCredentials,
    JwtBearer,
    /// Missing or any other `grant_type`.
    Unsupported,
}

impl Grant {
    fn parse(value: Option<&str>) -> Self {
        match value {
            Some("refresh_token") => Self::RefreshToken,
            Some("client_credentials") => Self::ClientCredentials,
            Some(JWT_BEARER) => Self::JwtBearer,
            _ => Self::Unsupported,
        }
    }
}

/// How to start a [`TestOAuth`].
#[derive(Clone, Debug)]
pub struct OAuthOptions {
    /// Address to listen on.
    pub ip: IpAddr,
    /// Port; 0 lets the kernel choose.
    pub port: u16,
    /// Names in the server certificate; the first one is the name of [`TestOAuth::token_url`].
    pub names: Vec<String>,
    /// `expires_in` of the access tokens issued, in seconds (changeable with
    /// [`TestOAuth::set_expires_in`]).
    pub expires_in: u64,
    /// Refresh tokens are single use and each refresh answers a new one. Off: a refresh token
    /// stays valid until revoked and refresh answers carry none.
    pub rotate_refresh_tokens: bool,
    /// A replayed (already used) refresh token also revokes every token rotated from the same
    /// first one, and the access tokens they gave (OAuth 2.0 Security BCP 4.14.2, as Auth0 and
    /// Okta do): a double refresh then logs the client out.
    pub revoke_family_on_replay: bool,
}

impl OAuthOptions {
    /// `auth.example.test` on `ip`, port chosen by the kernel, tokens for an hour, rotation on.
    pub fn on(ip: IpAddr) -> Self {
        Self {
            ip,
            port: 0,
            names: vec!["auth.example.test".into()],
            expires_in: 3600,
            rotate_refresh_tokens: true,
            revoke_family_on_replay: false,
        }
    }

    /// [`OAuthOptions::on`] 127.0.0.1.
    pub fn loopback() -> Self {
        Self::on(IpAddr::from([127, 0, 0, 1]))
    }
}

/// What became of a refresh token.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum RefreshState {
    /// Still accepted.
    Active,
    /// Exchanged once (rotation on); presenting it again is a replay.
    Used,
    /// Revoked by the test.
    Revoked,
}

/// One refresh token the server issued, named by its sha256 (never its value).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct RefreshTokenUse {
    /// sha256 hex of the token.
    pub sha256: String,
    pub client_id: String,
    /// How many token requests presented it (every one after the first is a reuse when
    /// rotation is on).
    pub presented: usize,
    pub state: RefreshState,
}

struct Client {
    /// `None`: a public client, which sends no secret.
    secret: Option<Zeroizing<String>>,
}

struct RefreshEntry {
    /// Mint order, for listing.
    seq: usize,
    /// The `seq` of the minted token this one was rotated from (itself, for a minted one).
    family: usize,
    client_id: String,
    scope: Option<String>,
    presented: usize,
    state: RefreshState,
}

struct AccessEntry {
    client_id: String,
    /// The refresh-token family it came from, if any.
    family: Option<usize>,
    scope: Option<String>,
    expires_at: Instant,
}

struct ServiceAccountKey {
    key_id: String,
    /// PKCS#1 RSAPublicKey DER.
    public_key: Vec<u8>,
}

/// Everything the test and the handlers share, behind one lock so each token exchange is
/// atomic: two concurrent refreshes with one token cannot both succeed.
#[derive(Default)]
struct Registry {
    clients: HashMap<String, Client>,
    service_accounts: HashMap<String, ServiceAccountKey>,
    refresh: HashMap<String, RefreshEntry>,
    access: HashMap<String, AccessEntry>,
    next_seq: usize,
    expires_in: u64,
    fail_next: usize,
    stall_next: usize,
    stall_for: Duration,
    calls: BTreeMap<Grant, usize>,
    issued: BTreeMap<Grant, usize>,
    unknown_refresh_presented: usize,
    resource_ok: usize,
    resource_unauthorized: usize,
}

impl Registry {
    /// A new token with `prefix`, remembered for [`crate::redact`].
    fn new_token(prefix: &str) -> String {
        let mut raw = Zeroizing::new([0u8; 32]);
        getrandom::fill(raw.as_mut()).expect("the OS CSPRNG must work");
        let token = format!("{prefix}{}", BASE64URL_NOPAD.encode(raw.as_ref()));
        Canary::adopt(&token);
        token
    }

    /// A refresh token in `family`, or (`None`) the first of a new family.
    fn issue_refresh(
        &mut self,
        client_id: &str,
        scope: Option<String>,
        family: Option<usize>,
    ) -> String {
        let token = Self::new_token(REFRESH_PREFIX);
        self.next_seq += 1;
        self.refresh.insert(
            token.clone(),
            RefreshEntry {
                seq: self.next_seq,
                family: family.unwrap_or(self.next_seq),
                client_id: client_id.to_string(),
                scope,
                presented: 0,
                state: RefreshState::Active,
            },
        );
        token
    }

    fn issue_access(
        &mut self,
        client_id: &str,
        scope: Option<String>,
        family: Option<usize>,
    ) -> String {
        let token = Self::new_token(ACCESS_PREFIX);
        self.access.insert(
            token.clone(),
            AccessEntry {
                client_id: client_id.to_string(),
                family,
                scope,
                expires_at: Instant::now() + Duration::from_secs(self.expires_in),
            },
        );
        token
    }

    /// Revokes every refresh token of `family` and the access tokens they gave.
    fn revoke_family(&mut self, family: usize) {
        for entry in self.refresh.values_mut() {
            if entry.family == family && entry.state == RefreshState::Active {
                entry.state = RefreshState::Revoked;
            }
        }
        self.access.retain(|_, a| a.family != Some(family));
    }
}

struct State {
    registry: Mutex<Registry>,
    rotate: bool,
    revoke_family_on_replay: bool,
    token_url: String,
}

impl State {
    fn lock(&self) -> MutexGuard<'_, Registry> {
        // A test that panicked while holding the lock left consistent data: every update is a
        // single statement or ends before any code that can panic.
        self.registry.lock().unwrap_or_else(|p| p.into_inner())
    }
}

/// A local OAuth 2.0 authorization server and protected resource over HTTPS; stopped on Drop.
pub struct TestOAuth {
    addr: SocketAddr,
    name: String,
    state: Arc<State>,
    shutdown: Option<watch::Sender<bool>>,
    thread: Option<thread::JoinHandle<()>>,
}

impl TestOAuth {
    /// Starts the server with a certificate from `ca` for `options.names`.
    pub fn start(ca: &TestCa, options: OAuthOptions) -> Self {
        let name = options
            .names
            .first()
            .cloned()
            .expect("OAuthOptions::names must name the server");
        let (chain, key) = ca.leaf(&options.names);
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let mut config = ServerConfig::builder_with_provider(provider)
            .with_safe_default_protocol_versions()
            .expect("rustls protocol versions")
            .with_no_client_auth()
            .with_single_cert(chain, key)
            .expect("OAuth server TLS config");
        config.alpn_protocols = vec![b"h2".to_vec(), b"http/1.1".to_vec()];
        let acceptor = tokio_rustls::TlsAcceptor::from(Arc::new(config));

        let listener = std::net::TcpListener::bind(SocketAddr::new(options.ip, options.port))
            .unwrap_or_else(|e| panic!("cannot bind the OAuth server on {}: {e}", options.ip));
        listener
            .set_nonblocking(true)
            .expect("set_nonblocking on the OAuth listener");
        let addr = listener
            .local_addr()
            .expect("local_addr of the OAuth listener");

        let state = Arc::new(State {
            registry: Mutex::new(Registry {
                expires_in: options.expires_in,
                ..Registry::default()
            }),
            rotate: options.rotate_refresh_tokens,
            revoke_family_on_replay: options.revoke_family_on_replay,
            token_url: format!("https://{name}:{}/token", addr.port()),
        });
        let (tx, rx) = watch::channel(false);
        let thread = {
            let state = state.clone();
            thread::Builder::new()
                .name("abtest-oauth".into())
                .spawn(move || {
                    let rt = tokio::runtime::Builder::new_multi_thread()
                        .worker_threads(2)
                        .enable_all()
                        .build()
                        .expect("OAuth server runtime");
                    rt.block_on(async move {
                        let listener = tokio::net::TcpListener::from_std(listener)
                            .expect("tokio listener for the OAuth server");
                        accept_loop(listener, acceptor, state, rx).await;
                    });
                    rt.shutdown_timeout(Duration::from_secs(1));
                })
                .expect("cannot start the OAuth server thread")
        };
        Self {
            addr,
            name,
            state,
            shutdown: Some(tx),
            thread: Some(thread),
        }
    }

    /// The listener's address.
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    pub fn port(&self) -> u16 {
        self.addr.port()
    }

    /// The server's first name (the one in [`TestOAuth::token_url`]).
    pub fn name(&self) -> &str {
        &self.name
    }

    /// `https://<name>:<port>/token`: the token endpoint, and the `aud` jwt-bearer assertions
    /// must carry.
    pub fn token_url(&self) -> String {
        self.state.token_url.clone()
    }

    /// `https://<name>:<port>/resource`: the protected resource.
    pub fn resource_url(&self) -> String {
        format!("https://{}:{}/resource", self.name, self.port())
    }

    /// Registers (or replaces) a client; `secret` `None` makes it a public client.
    pub fn register_client(&self, client_id: &str, secret: Option<&str>) {
        self.state.lock().clients.insert(
            client_id.to_string(),
            Client {
                secret: secret.map(|s| Zeroizing::new(s.to_string())),
            },
        );
    }

    /// A first refresh token for a registered client (as an authorization-code exchange would
    /// have given it), as a canary: redacted from printed text, never printed.
    pub fn mint_refresh_token(&self, client_id: &str, scope: Option<&str>) -> Canary {
        let mut reg = self.state.lock();
        assert!(
            reg.clients.contains_key(client_id),
            "mint_refresh_token: register client {client_id} first"
        );
        Canary::adopt(&reg.issue_refresh(client_id, scope.map(str::to_string), None))
    }

    /// Revokes one refresh token (the client's access tokens stay valid). False when the server
    /// never issued it.
    pub fn revoke_refresh_token(&self, token: &Canary) -> bool {
        match self.state.lock().refresh.get_mut(token.expose()) {
            Some(entry) => {
                entry.state = RefreshState::Revoked;
                true
            }
            None => false,
        }
    }

    /// Revokes every refresh token and access token of `client_id` (the client stays
    /// registered and can be given new ones).
    pub fn revoke_client(&self, client_id: &str) {
        let mut reg = self.state.lock();
        for entry in reg.refresh.values_mut() {
            if entry.client_id == client_id {
                entry.state = RefreshState::Revoked;
            }
        }
        reg.access.retain(|_, a| a.client_id != client_id);
    }

    /// Revokes the client's access tokens only (its refresh tokens stay valid): an upstream
    /// that rejects a token before its time, as after a password change.
    pub fn revoke_access_tokens(&self, client_id: &str) {
        self.state
            .lock()
            .access
            .retain(|_, a| a.client_id != client_id);
    }

    /// `expires_in` of the access tokens issued from now on (0: expired at once).
    pub fn set_expires_in(&self, seconds: u64) {
        self.state.lock().expires_in = seconds;
    }

    /// The next `calls` token requests wait `delay` before they are handled (a slow server).
    pub fn stall_next(&self, calls: usize, delay: Duration) {
        let mut reg = self.state.lock();
        reg.stall_next = calls;
        reg.stall_for = delay;
    }

    /// The next `calls` token requests fail with `503 temporarily_unavailable`, consuming
    /// nothing (a refresh token presented then stays valid).
    pub fn fail_next(&self, calls: usize) {
        self.state.lock().fail_next = calls;
    }

    /// Token requests received with `grant`, whatever their outcome (failed, stalled, refused).
    pub fn token_calls(&self, grant: Grant) -> usize {
        self.state.lock().calls.get(&grant).copied().unwrap_or(0)
    }

    /// Token requests with `grant` that were answered with a token.
    pub fn tokens_issued(&self, grant: Grant) -> usize {
        self.state.lock().issued.get(&grant).copied().unwrap_or(0)
    }

    /// Every refresh token issued (minted or rotated), oldest first, with how often each was
    /// presented.
    pub fn refresh_tokens(&self) -> Vec<RefreshTokenUse> {
        let reg = self.state.lock();
        let mut all: Vec<_> = reg
            .refresh
            .iter()
            .map(|(token, e)| {
                (
                    e.seq,
                    RefreshTokenUse {
                        sha256: sha256_hex(token.as_bytes()),
                        client_id: e.client_id.clone(),
                        presented: e.presented,
                        state: e.state,
                    },
                )
            })
            .collect();
        all.sort_by_key(|(seq, _)| *seq);
        all.into_iter().map(|(_, u)| u).collect()
    }

    /// How many token requests presented `token` as a refresh token.
    pub fn presented(&self, token: &Canary) -> usize {
        self.state
            .lock()
            .refresh
            .get(token.expose())
            .map_or(0, |e| e.presented)
    }

    /// Refresh tokens presented more than once (replays, when rotation is on).
    pub fn reused_refresh_tokens(&self) -> usize {
        self.state
            .lock()
            .refresh
            .values()
            .filter(|e| e.presented > 1)
            .count()
    }

    /// Refresh requests that presented a token this server never issued.
    pub fn unknown_refresh_presented(&self) -> usize {
        self.state.lock().unknown_refresh_presented
    }

    /// Requests the resource answered 200.
    pub fn resource_ok(&self) -> usize {
        self.state.lock().resource_ok
    }

    /// Requests the resource answered 401.
    pub fn resource_unauthorized(&self) -> usize {
        self.state.lock().resource_unauthorized
    }

    /// Whether `token` is an access token the resource accepts now.
    pub fn access_token_valid(&self, token: &str) -> bool {
        let reg = self.state.lock();
        reg.access
            .get(token)
            .is_some_and(|a| Instant::now() < a.expires_at)
    }

    /// A new Google-style service account `client_email` with a fresh 2048-bit RSA key, whose
    /// jwt-bearer assertions this server accepts.
    pub fn service_account(&self, client_email: &str) -> ServiceAccount {
        let account = ServiceAccount::generate(client_email, &self.token_url());
        self.state.lock().service_accounts.insert(
            client_email.to_string(),
            ServiceAccountKey {
                key_id: account.private_key_id.clone(),
                public_key: account.public_key.clone(),
            },
        );
        account
    }
}

impl Drop for TestOAuth {
    fn drop(&mut self) {
        if let Some(tx) = self.shutdown.take() {
            let _ = tx.send(true);
        }
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

/// A service account and its private key (Debug shows only the email and key id).
pub struct ServiceAccount {
    pub client_email: String,
    pub private_key_id: String,
    pub token_uri: String,
    private_key_pem: Zeroizing<String>,
    /// PKCS#8 DER, for signing.
    private_key_der: Zeroizing<Vec<u8>>,
    /// PKCS#1 RSAPublicKey DER.
    public_key: Vec<u8>,
}

impl fmt::Debug for ServiceAccount {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ServiceAccount")
            .field("client_email", &self.client_email)
            .field("private_key_id", &self.private_key_id)
            .field("private_key", &"<redacted>")
            .finish()
    }
}

impl ServiceAccount {
    fn generate(client_email: &str, token_uri: &str) -> Self {
        use rsa::pkcs8::{EncodePrivateKey as _, LineEnding};
        let key =
            rsa::RsaPrivateKey::new(&mut rsa::rand_core::OsRng, 2048).expect("RSA key generation");
        let der = key.to_pkcs8_der().expect("RSA key as PKCS#8 DER");
        let pem = key
            .to_pkcs8_pem(LineEnding::LF)
            .expect("RSA key as PKCS#8 PEM");
        let pair = ring::signature::RsaKeyPair::from_pkcs8(der.as_bytes())
            .expect("ring accepts the generated RSA key");
        let public_key = pair.public().as_ref().to_vec();
        let mut id = [0u8; 20];
        getrandom::fill(&mut id).expect("the OS CSPRNG must work");
        let account = Self {
            client_email: client_email.to_string(),
            private_key_id: data_encoding::HEXLOWER.encode(&id),
            token_uri: token_uri.to_string(),
            private_key_pem: Zeroizing::new(pem.to_string()),
            private_key_der: Zeroizing::new(der.as_bytes().to_vec()),
            public_key,
        };
        Canary::adopt(&account.private_key_pem);
        account
    }

    /// The key file as Google issues it (`type`, `project_id`, `private_key_id`,
    /// `private_key`, `client_email`, `client_id`, `auth_uri`, `token_uri`, ...): a secret.
    pub fn json(&self) -> Zeroizing<String> {
        let json = Zeroizing::new(
            serde_json::json!({
                "type": "service_account",
                "project_id": "abtest-project",
                "private_key_id": self.private_key_id,
                "private_key": self.private_key_pem.as_str(),
                "client_email": self.client_email,
                "client_id": "100000000000000000001",
                "auth_uri": "https://accounts.example.test/o/oauth2/auth",
                "token_uri": self.token_uri,
                "auth_provider_x509_cert_url": "https://www.example.test/oauth2/v1/certs",
                "universe_domain": "example.test",
            })
            .to_string(),
        );
        Canary::adopt(&json);
        json
    }

    /// An RS256 assertion for the jwt-bearer grant, as Google's client libraries make it:
    /// `iss` the account, `aud` as given, `scope`, `iat` now and `exp` after `lifetime`.
    pub fn assertion(&self, aud: &str, scope: &str, lifetime: Duration) -> Zeroizing<String> {
        let now = unix_now();
        let claims = serde_json::json!({
            "iss": self.client_email,
            "aud": aud,
            "scope": scope,
            "iat": now,
            "exp": now + lifetime.as_secs(),
        });
        self.sign(&claims)
    }

    /// A JWT of `claims`, signed RS256 with this account's key (for tests of bad claims).
    pub fn sign(&self, claims: &serde_json::Value) -> Zeroizing<String> {
        let header = serde_json::json!({"alg": "RS256", "typ": "JWT", "kid": self.private_key_id});
        let input = format!(
            "{}.{}",
            BASE64URL_NOPAD.encode(header.to_string().as_bytes()),
            BASE64URL_NOPAD.encode(claims.to_string().as_bytes())
        );
        let pair = ring::signature::RsaKeyPair::from_pkcs8(&self.private_key_der)
            .expect("ring accepts the generated RSA key");
        let mut sig = vec![0u8; pair.public().modulus_len()];
        pair.sign(
            &ring::signature::RSA_PKCS1_SHA256,
            &ring::rand::SystemRandom::new(),
            input.as_bytes(),
            &mut sig,
        )
        .expect("RS256 signing");
        Zeroizing::new(format!("{input}.{}", BASE64URL_NOPAD.encode(&sig)))
    }
}

fn unix_now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}

async fn accept_loop(
    listener: tokio::net::TcpListener,
    acceptor: tokio_rustls::TlsAcceptor,
    state: Arc<State>,
    mut stop: watch::Receiver<bool>,
) {
    loop {
        let stream = tokio::select! {
            r = listener.accept() => match r {
                Ok((stream, _)) => stream,
                Err(_) => {
                    tokio::time::sleep(Duration::from_millis(20)).await;
                    continue;
                }
            },
            _ = stop.changed() => return,
        };
        let state = state.clone();
        let acceptor = acceptor.clone();
        tokio::spawn(async move {
            let _ = stream.set_nodelay(true);
            let Ok(Ok(stream)) =
                tokio::time::timeout(Duration::from_secs(10), acceptor.accept(stream)).await
            else {
                return;
            };
            let service = hyper::service::service_fn(move |req| {
                let state = state.clone();
                async move { Ok::<_, Infallible>(respond(req, &state).await) }
            });
            let _ = auto::Builder::new(TokioExecutor::new())
                .serve_connection(TokioIo::new(stream), service)
                .await;
        });
    }
}

type Body = Full<Bytes>;

fn json(status: StatusCode, value: &serde_json::Value) -> Response<Body> {
    let mut r = Response::new(Full::new(Bytes::from(
        serde_json::to_vec(value).unwrap_or_default(),
    )));
    *r.status_mut() = status;
    let h = r.headers_mut();
    h.insert(
        header::CONTENT_TYPE,
        header::HeaderValue::from_static("application/json"),
    );
    h.insert(
        header::CACHE_CONTROL,
        header::HeaderValue::from_static("no-store"),
    );
    r
}

/// An RFC 6749 5.2 error. `description` never quotes what the client sent.
struct OAuthError {
    status: StatusCode,
    error: &'static str,
    description: &'static str,
}

fn oauth_error(status: StatusCode, error: &'static str, description: &'static str) -> OAuthError {
    OAuthError {
        status,
        error,
        description,
    }
}

impl OAuthError {
    fn response(&self) -> Response<Body> {
        let mut r = json(
            self.status,
            &serde_json::json!({"error": self.error, "error_description": self.description}),
        );
        if self.status == StatusCode::UNAUTHORIZED {
            r.headers_mut().insert(
                header::WWW_AUTHENTICATE,
                header::HeaderValue::from_static("Basic realm=\"abtest-oauth\""),
            );
        }
        r
    }
}

async fn respond(req: Request<Incoming>, state: &Arc<State>) -> Response<Body> {
    let path = req.uri().path().to_string();
    if path == "/token" {
        if req.method() != http::Method::POST {
            return oauth_error(
                StatusCode::METHOD_NOT_ALLOWED,
                "invalid_request",
                "the token endpoint takes POST",
            )
            .response();
        }
        let (parts, body) = req.into_parts();
        let body = match body.collect().await {
            Ok(b) => Zeroizing::new(b.to_bytes().to_vec()),
            Err(_) => {
                return oauth_error(
                    StatusCode::BAD_REQUEST,
                    "invalid_request",
                    "unreadable body",
                )
                .response();
            }
        };
        return token(&parts, &body, state).await;
    }
    if path == "/resource" || path.starts_with("/api/") {
        return resource(&req, state);
    }
    json(
        StatusCode::NOT_FOUND,
        &serde_json::json!({"error": "not_found"}),
    )
}

/// The form fields of a token request, decoded (values are secrets: never printed).
struct Form(HashMap<String, Zeroizing<String>>);

impl Form {
    fn parse(body: &[u8]) -> Self {
        let mut fields = HashMap::new();
        for pair in body.split(|&b| b == b'&').filter(|p| !p.is_empty()) {
            let mut kv = pair.splitn(2, |&b| b == b'=');
            let key = form_decode(kv.next().unwrap_or_default());
            let value = form_decode(kv.next().unwrap_or_default());
            fields.insert(key.to_string(), value);
        }
        Self(fields)
    }

    fn get(&self, name: &str) -> Option<&str> {
        self.0
            .get(name)
            .map(|v| v.as_str())
            .filter(|v| !v.is_empty())
    }
}

/// `application/x-www-form-urlencoded` decoding of one name or value.
fn form_decode(raw: &[u8]) -> Zeroizing<String> {
    let mut out = Zeroizing::new(Vec::with_capacity(raw.len()));
    let mut i = 0;
    while i < raw.len() {
        match raw[i] {
            b'+' => out.push(b' '),
            b'%' => {
                let hex = raw.get(i + 1..i + 3).and_then(|h| {
                    std::str::from_utf8(h)
                        .ok()
                        .and_then(|h| u8::from_str_radix(h, 16).ok())
                });
                match hex {
                    Some(b) => {
                        out.push(b);
                        i += 2;
                    }
                    None => out.push(b'%'),
                }
            }
            b => out.push(b),
        }
        i += 1;
    }
    Zeroizing::new(String::from_utf8_lossy(&out).into_owned())
}

/// The client credentials of a request: HTTP Basic (RFC 6749 2.3.1, each part form-encoded)
/// or `client_id`/`client_secret` in the form. Err: a malformed Basic header.
fn client_credentials(
    parts: &http::request::Parts,
    form: &Form,
) -> Result<(Option<String>, Option<Zeroizing<String>>), ()> {
    if let Some(value) = parts.headers.get(header::AUTHORIZATION) {
        let value = value.to_str().map_err(|_| ())?;
        let Some((scheme, encoded)) = value.split_once(' ') else {
            return Err(());
        };
        if scheme.eq_ignore_ascii_case("basic") {
            let decoded = Zeroizing::new(BASE64.decode(encoded.trim().as_bytes()).map_err(|_| ())?);
            let colon = decoded.iter().position(|&b| b == b':').ok_or(())?;
            let id = form_decode(&decoded[..colon]);
            let secret = form_decode(&decoded[colon + 1..]);
            return Ok((Some(id.to_string()), Some(secret)));
        }
    }
    Ok((
        form.get("client_id").map(str::to_string),
        form.get("client_secret")
            .map(|s| Zeroizing::new(s.to_string())),
    ))
}

/// Constant-time comparison, as a real server would compare secrets.
fn same_secret(a: &str, b: &str) -> bool {
    a.len() == b.len()
        && a.bytes()
            .zip(b.bytes())
            .fold(0u8, |acc, (x, y)| acc | (x ^ y))
            == 0
}

async fn token(parts: &http::request::Parts, body: &[u8], state: &Arc<State>) -> Response<Body> {
    let form = Form::parse(body);
    let grant = Grant::parse(form.get("grant_type"));
    let (stall, fail) = {
        let mut reg = state.lock();
        *reg.calls.entry(grant).or_default() += 1;
        let stall = (reg.stall_next > 0).then_some(reg.stall_for);
        reg.stall_next = reg.stall_next.saturating_sub(1);
        let fail = reg.fail_next > 0;
        reg.fail_next = reg.fail_next.saturating_sub(1);
        (stall, fail)
    };
    if let Some(delay) = stall {
        tokio::time::sleep(delay).await;
    }
    if fail {
        return oauth_error(
            StatusCode::SERVICE_UNAVAILABLE,
            "temporarily_unavailable",
            "injected failure",
        )
        .response();
    }
    let answer = match grant {
        Grant::RefreshToken => refresh_grant(parts, &form, state),
        Grant::ClientCredentials => client_credentials_grant(parts, &form, state),
        Grant::JwtBearer => jwt_bearer_grant(&form, state),
        Grant::Unsupported => Err(oauth_error(
            StatusCode::BAD_REQUEST,
            if form.get("grant_type").is_some() {
                "unsupported_grant_type"
            } else {
                "invalid_request"
            },
            "grant_type must be refresh_token, client_credentials or jwt-bearer",
        )),
    };
    match answer {
        Ok(body) => {
            *state.lock().issued.entry(grant).or_default() += 1;
            json(StatusCode::OK, &body)
        }
        Err(error) => error.response(),
    }
}

/// Authenticates the client of a request against the registry. `confidential`: a secret is
/// required.
fn authenticate(
    parts: &http::request::Parts,
    form: &Form,
    reg: &Registry,
    confidential: bool,
) -> Result<String, OAuthError> {
    let bad = |what: &'static str| oauth_error(StatusCode::UNAUTHORIZED, "invalid_client", what);
    let Ok((id, secret)) = client_credentials(parts, form) else {
        return Err(bad("malformed client authentication"));
    };
    let Some(id) = id else {
        return Err(bad("no client_id"));
    };
    let Some(client) = reg.clients.get(&id) else {
        return Err(bad("unknown client"));
    };
    match (&client.secret, secret) {
        (Some(expected), Some(given)) if same_secret(expected, &given) => Ok(id),
        (Some(_), _) => Err(bad("client authentication failed")),
        (None, _) if confidential => Err(bad("a public client cannot use this grant")),
        (None, _) => Ok(id),
    }
}

fn token_body(
    access: &str,
    expires_in: u64,
    refresh: Option<&str>,
    scope: Option<&str>,
) -> serde_json::Value {
    let mut body = serde_json::json!({
        "access_token": access,
        "token_type": "Bearer",
        "expires_in": expires_in,
    });
    if let Some(r) = refresh {
        body["refresh_token"] = r.into();
    }
    if let Some(s) = scope {
        body["scope"] = s.into();
    }
    body
}

fn refresh_grant(
    parts: &http::request::Parts,
    form: &Form,
    state: &State,
) -> Result<serde_json::Value, OAuthError> {
    let invalid_grant =
        |what: &'static str| oauth_error(StatusCode::BAD_REQUEST, "invalid_grant", what);
    // One lock for check, consume and issue: concurrent uses of one token cannot both win.
    let mut reg = state.lock();
    let client_id = authenticate(parts, form, &reg, false)?;
    let Some(presented) = form.get("refresh_token") else {
        return Err(oauth_error(
            StatusCode::BAD_REQUEST,
            "invalid_request",
            "no refresh_token",
        ));
    };
    let Some(entry) = reg.refresh.get_mut(presented) else {
        reg.unknown_refresh_presented += 1;
        return Err(invalid_grant("unknown refresh token"));
    };
    entry.presented += 1;
    if entry.client_id != client_id {
        return Err(invalid_grant("refresh token issued to another client"));
    }
    let family = entry.family;
    match entry.state {
        RefreshState::Active => {}
        RefreshState::Used => {
            if state.revoke_family_on_replay {
                reg.revoke_family(family);
            }
            return Err(invalid_grant("refresh token already used"));
        }
        RefreshState::Revoked => return Err(invalid_grant("refresh token revoked")),
    }
    let scope = entry.scope.clone();
    if let Some(asked) = form.get("scope")
        && scope.as_deref() != Some(asked)
    {
        // Narrowing is allowed by RFC 6749 6; this server only accepts the same scope.
        return Err(oauth_error(
            StatusCode::BAD_REQUEST,
            "invalid_scope",
            "scope differs from the original grant",
        ));
    }
    let next = if state.rotate {
        entry.state = RefreshState::Used;
        Some(reg.issue_refresh(&client_id, scope.clone(), Some(family)))
    } else {
        None
    };
    let access = reg.issue_access(&client_id, scope.clone(), Some(family));
    Ok(token_body(
        &access,
        reg.expires_in,
        next.as_deref(),
        scope.as_deref(),
    ))
}

fn client_credentials_grant(
    parts: &http::request::Parts,
    form: &Form,
    state: &State,
) -> Result<serde_json::Value, OAuthError> {
    let mut reg = state.lock();
    let client_id = authenticate(parts, form, &reg, true)?;
    let scope = form.get("scope").map(str::to_string);
    let access = reg.issue_access(&client_id, scope.clone(), None);
    Ok(token_body(&access, reg.expires_in, None, scope.as_deref()))
}

fn jwt_bearer_grant(form: &Form, state: &State) -> Result<serde_json::Value, OAuthError> {
    let invalid_grant =
        |what: &'static str| oauth_error(StatusCode::BAD_REQUEST, "invalid_grant", what);
    let Some(assertion) = form.get("assertion") else {
        return Err(oauth_error(
            StatusCode::BAD_REQUEST,
            "invalid_request",
            "no assertion",
        ));
    };
    let segments: Vec<&str> = assertion.split('.').collect();
    let [header_b64, claims_b64, sig_b64] = segments[..] else {
        return Err(invalid_grant(
            "the assertion is not a JWS compact serialisation",
        ));
    };
    let decode_json = |segment: &str| -> Option<serde_json::Value> {
        let bytes = BASE64URL_NOPAD.decode(segment.as_bytes()).ok()?;
        serde_json::from_slice(&bytes).ok()
    };
    let (Some(jose), Some(claims), Ok(sig)) = (
        decode_json(header_b64),
        decode_json(claims_b64),
        BASE64URL_NOPAD.decode(sig_b64.as_bytes()),
    ) else {
        return Err(invalid_grant("the assertion does not decode"));
    };
    if jose["alg"] != "RS256" {
        return Err(invalid_grant("the assertion must be signed RS256"));
    }
    let Some(iss) = claims["iss"].as_str() else {
        return Err(invalid_grant("the assertion has no iss"));
    };
    let mut reg = state.lock();
    let Some(key) = reg.service_accounts.get(iss) else {
        return Err(invalid_grant("unknown service account"));
    };
    if let Some(kid) = jose["kid"].as_str()
        && kid != key.key_id
    {
        return Err(invalid_grant("unknown key id"));
    }
    let signed = &assertion[..header_b64.len() + 1 + claims_b64.len()];
    ring::signature::UnparsedPublicKey::new(
        &ring::signature::RSA_PKCS1_2048_8192_SHA256,
        &key.public_key,
    )
    .verify(signed.as_bytes(), &sig)
    .map_err(|_| invalid_grant("invalid assertion signature"))?;
    if claims["aud"].as_str() != Some(state.token_url.as_str()) {
        return Err(invalid_grant(
            "the assertion's aud is not this token endpoint",
        ));
    }
    let (Some(iat), Some(exp)) = (claims["iat"].as_u64(), claims["exp"].as_u64()) else {
        return Err(invalid_grant("the assertion needs numeric iat and exp"));
    };
    let now = unix_now();
    if iat > now + CLOCK_SKEW {
        return Err(invalid_grant("the assertion is issued in the future"));
    }
    if exp <= now {
        return Err(invalid_grant("the assertion has expired"));
    }
    if exp < iat || exp - iat > MAX_ASSERTION_LIFETIME {
        return Err(invalid_grant("the assertion lives longer than an hour"));
    }
    let scope = claims["scope"].as_str().map(str::to_string);
    let iss = iss.to_string();
    let access = reg.issue_access(&iss, scope, None);
    // Google answers a jwt-bearer grant without a scope or a refresh token.
    Ok(token_body(&access, reg.expires_in, None, None))
}

fn resource(req: &Request<Incoming>, state: &State) -> Response<Body> {
    let authorization = req.headers().get(header::AUTHORIZATION);
    let bearer = authorization
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.split_once(' '))
        .filter(|(scheme, _)| scheme.eq_ignore_ascii_case("bearer"))
        .map(|(_, token)| token.trim());
    let authorization_sha256 = authorization.map(|v| sha256_hex(v.as_bytes()));
    let mut reg = state.lock();
    let valid = bearer.and_then(|t| {
        reg.access
            .get(t)
            .filter(|a| Instant::now() < a.expires_at)
            .map(|a| (a.client_id.clone(), a.scope.clone()))
    });
    match valid {
        Some((client_id, scope)) => {
            reg.resource_ok += 1;
            json(
                StatusCode::OK,
                &serde_json::json!({
                    "authorization_sha256": authorization_sha256,
                    "token_valid": true,
                    "client_id": client_id,
                    "scope": scope,
                    "path": req.uri().path(),
                }),
            )
        }
        None => {
            reg.resource_unauthorized += 1;
            let mut r = json(
                StatusCode::UNAUTHORIZED,
                &serde_json::json!({
                    "authorization_sha256": authorization_sha256,
                    "token_valid": false,
                    "error": "invalid_token",
                }),
            );
            let challenge = if authorization.is_some() {
                "Bearer error=\"invalid_token\""
            } else {
                "Bearer"
            };
            r.headers_mut().insert(
                header::WWW_AUTHENTICATE,
                header::HeaderValue::from_static(challenge),
            );
            r
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use rustls::pki_types::{CertificateDer, ServerName, pem::PemObject as _};

    const CLIENT: &str = "abtest-client";

    /// An answer of the server. Debug shows the status and error only, never a token.
    struct Reply {
        status: u16,
        json: serde_json::Value,
        www_authenticate: Option<String>,
    }

    impl fmt::Debug for Reply {
        fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
            f.debug_struct("Reply")
                .field("status", &self.status)
                .field("error", &self.json["error"])
                .field("error_description", &self.json["error_description"])
                .field("www_authenticate", &self.www_authenticate)
                .finish()
        }
    }

    impl Reply {
        fn field(&self, name: &str) -> String {
            self.json[name]
                .as_str()
                .unwrap_or_else(|| panic!("the answer has no string {name}: {self:?}"))
                .to_string()
        }
    }

    /// A real HTTPS client trusting only the test CA, dialing the server's address with its name
    /// as SNI and Host.
    struct Http {
        config: Arc<rustls::ClientConfig>,
        addr: SocketAddr,
        name: String,
        /// Speak h2 (else HTTP/1.1).
        h2: bool,
    }

    impl Http {
        fn new(ca: &TestCa, server: &TestOAuth) -> Self {
            Self::with_protocol(ca, server, false)
        }

        fn with_protocol(ca: &TestCa, server: &TestOAuth, h2: bool) -> Self {
            let mut roots = rustls::RootCertStore::empty();
            roots
                .add(CertificateDer::from_pem_file(ca.pem_path()).expect("the test CA's PEM"))
                .expect("the test CA as a root");
            let provider = Arc::new(rustls::crypto::ring::default_provider());
            let mut config = rustls::ClientConfig::builder_with_provider(provider)
                .with_safe_default_protocol_versions()
                .expect("rustls protocol versions")
                .with_root_certificates(roots)
                .with_no_client_auth();
            config.alpn_protocols = vec![if h2 {
                b"h2".to_vec()
            } else {
                b"http/1.1".to_vec()
            }];
            Self {
                config: Arc::new(config),
                addr: server.addr(),
                name: server.name().to_string(),
                h2,
            }
        }

        fn send(
            &self,
            method: &str,
            path: &str,
            headers: &[(&str, String)],
            body: String,
        ) -> Reply {
            let rt = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .expect("client runtime");
            rt.block_on(async {
                let tcp = tokio::net::TcpStream::connect(self.addr)
                    .await
                    .expect("connect to the OAuth server");
                let name = ServerName::try_from(self.name.clone()).expect("server name");
                let tls = tokio_rustls::TlsConnector::from(self.config.clone())
                    .connect(name, tcp)
                    .await
                    .expect("TLS handshake with the OAuth server, trusting the test CA");
                let mut req = Request::builder().method(method);
                req = if self.h2 {
                    assert_eq!(tls.get_ref().1.alpn_protocol(), Some(&b"h2"[..]), "ALPN h2");
                    req.uri(format!("https://{}:{}{path}", self.name, self.addr.port()))
                } else {
                    req.uri(path).header(header::HOST, self.name.as_str())
                };
                for (name, value) in headers {
                    req = req.header(*name, value.as_str());
                }
                let req = req.body(Full::new(Bytes::from(body))).expect("request");
                let io = TokioIo::new(tls);
                let resp = if self.h2 {
                    let (mut sender, conn) =
                        hyper::client::conn::http2::handshake(TokioExecutor::new(), io)
                            .await
                            .expect("h2 handshake");
                    tokio::spawn(conn);
                    sender.send_request(req).await.expect("send the request")
                } else {
                    let (mut sender, conn) = hyper::client::conn::http1::handshake(io)
                        .await
                        .expect("HTTP/1.1 handshake");
                    tokio::spawn(conn);
                    sender.send_request(req).await.expect("send the request")
                };
                let status = resp.status().as_u16();
                let www_authenticate = resp
                    .headers()
                    .get(header::WWW_AUTHENTICATE)
                    .and_then(|v| v.to_str().ok())
                    .map(str::to_string);
                let bytes = resp
                    .into_body()
                    .collect()
                    .await
                    .expect("response body")
                    .to_bytes();
                Reply {
                    status,
                    json: serde_json::from_slice(&bytes).unwrap_or(serde_json::Value::Null),
                    www_authenticate,
                }
            })
        }

        fn token(&self, pairs: &[(&str, &str)]) -> Reply {
            self.token_with(pairs, &[])
        }

        fn token_basic(&self, id: &str, secret: &str, pairs: &[(&str, &str)]) -> Reply {
            let basic = format!(
                "Basic {}",
                BASE64.encode(format!("{}:{}", encode(id), encode(secret)).as_bytes())
            );
            self.token_with(pairs, &[("authorization", basic)])
        }

        fn token_with(&self, pairs: &[(&str, &str)], extra: &[(&str, String)]) -> Reply {
            let mut headers = vec![(
                "content-type",
                "application/x-www-form-urlencoded".to_string(),
            )];
            headers.extend(extra.iter().cloned());
            let body = pairs
                .iter()
                .map(|(k, v)| format!("{}={}", encode(k), encode(v)))
                .collect::<Vec<_>>()
                .join("&");
            self.send("POST", "/token", &headers, body)
        }

        fn resource(&self, path: &str, bearer: Option<&str>) -> Reply {
            let headers: Vec<_> = bearer
                .map(|t| ("authorization", format!("Bearer {t}")))
                .into_iter()
                .collect();
            self.send("GET", path, &headers, String::new())
        }
    }

    /// Form encoding of one name or value.
    fn encode(s: &str) -> String {
        s.bytes()
            .map(|b| match b {
                b'A'..=b'Z' | b'a'..=b'z' | b'0'..=b'9' | b'-' | b'.' | b'_' | b'~' => {
                    char::from(b).to_string()
                }
                _ => format!("%{b:02X}"),
            })
            .collect()
    }

    fn start(options: OAuthOptions) -> (TestCa, TestOAuth, Http) {
        let ca = TestCa::new("abtest OAuth CA");
        let server = TestOAuth::start(&ca, options);
        let http = Http::new(&ca, &server);
        (ca, server, http)
    }

    fn refresh(http: &Http, token: &str, secret: &str) -> Reply {
        http.token(&[
            ("grant_type", "refresh_token"),
            ("refresh_token", token),
            ("client_id", CLIENT),
            ("client_secret", secret),
        ])
    }

    fn assert_token_shape(token: &str, prefix: &str) {
        assert!(
            token.starts_with(prefix),
            "a token must start with {prefix}"
        );
        assert_eq!(token.len(), prefix.len() + TOKEN_RANDOM_LEN, "token length");
        assert!(
            token[prefix.len()..]
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_'),
            "a token must be URL-safe"
        );
    }

    fn assert_error(reply: &Reply, status: u16, error: &str) {
        assert_eq!(reply.status, status, "{reply:?}");
        assert_eq!(reply.json["error"], error, "{reply:?}");
    }

    #[test]
    fn refresh_rotates_and_rejects_replay() {
        let (_ca, server, http) = start(OAuthOptions::loopback());
        let secret = Canary::new();
        server.register_client(CLIENT, Some(secret.expose()));
        let first = server.mint_refresh_token(CLIENT, Some("read"));
        assert_token_shape(first.expose(), REFRESH_PREFIX);

        let r = refresh(&http, first.expose(), secret.expose());
        assert_eq!(r.status, 200, "{r:?}");
        assert_eq!(r.json["token_type"], "Bearer");
        assert_eq!(r.json["expires_in"], 3600);
        assert_eq!(r.json["scope"], "read");
        let access = r.field("access_token");
        let second = r.field("refresh_token");
        assert_token_shape(&access, ACCESS_PREFIX);
        assert_token_shape(&second, REFRESH_PREFIX);
        assert_ne!(
            sha256_hex(second.as_bytes()),
            first.sha256(),
            "rotation issues a new refresh token"
        );

        let ok = http.resource("/resource", Some(&access));
        assert_eq!(ok.status, 200, "{ok:?}");
        assert_eq!(ok.json["token_valid"], true);
        assert_eq!(
            ok.json["authorization_sha256"],
            sha256_hex(format!("Bearer {access}").as_bytes())
        );
        assert_eq!(http.resource("/api/v1/things", Some(&access)).status, 200);

        // The first refresh token again: a replay.
        assert_error(
            &refresh(&http, first.expose(), secret.expose()),
            400,
            "invalid_grant",
        );
        // The rotated one works once, here with HTTP Basic client authentication.
        let r = http.token_basic(
            CLIENT,
            secret.expose(),
            &[("grant_type", "refresh_token"), ("refresh_token", &second)],
        );
        assert_eq!(r.status, 200, "{r:?}");
        // A wrong secret, an unknown client, an unknown token.
        let wrong = refresh(&http, &r.field("refresh_token"), "not-the-secret");
        assert_error(&wrong, 401, "invalid_client");
        assert!(
            wrong
                .www_authenticate
                .as_deref()
                .is_some_and(|w| w.starts_with("Basic")),
            "{wrong:?}"
        );
        assert_error(
            &http.token(&[
                ("grant_type", "refresh_token"),
                ("refresh_token", &second),
                ("client_id", "nobody"),
            ]),
            401,
            "invalid_client",
        );
        let unknown = Canary::with_prefix(REFRESH_PREFIX);
        assert_error(
            &refresh(&http, unknown.expose(), secret.expose()),
            400,
            "invalid_grant",
        );

        assert_eq!(server.presented(&first), 2);
        assert_eq!(server.reused_refresh_tokens(), 1);
        assert_eq!(server.unknown_refresh_presented(), 1);
        let uses = server.refresh_tokens();
        let states: Vec<_> = uses.iter().map(|u| (u.presented, u.state)).collect();
        assert_eq!(
            states,
            vec![
                (2, RefreshState::Used),
                (1, RefreshState::Used),
                (0, RefreshState::Active),
            ]
        );
        assert_eq!(uses[0].sha256, first.sha256());
        assert!(uses.iter().all(|u| u.client_id == CLIENT));
        assert_eq!(server.token_calls(Grant::RefreshToken), 6);
        assert_eq!(server.tokens_issued(Grant::RefreshToken), 2);
        assert_eq!(server.token_calls(Grant::ClientCredentials), 0);
        assert_eq!(server.resource_ok(), 2);
    }

    #[test]
    fn refresh_without_rotation_keeps_the_token() {
        let mut options = OAuthOptions::loopback();
        options.rotate_refresh_tokens = false;
        options.expires_in = 120;
        let (_ca, server, http) = start(options);
        server.register_client(CLIENT, None);
        let token = server.mint_refresh_token(CLIENT, None);
        for _ in 0..2 {
            let r = http.token(&[
                ("grant_type", "refresh_token"),
                ("refresh_token", token.expose()),
                ("client_id", CLIENT),
            ]);
            assert_eq!(r.status, 200, "{r:?}");
            assert_eq!(r.json["expires_in"], 120);
            assert!(r.json.get("refresh_token").is_none(), "{r:?}");
        }
        assert_eq!(server.presented(&token), 2);
        assert_eq!(server.refresh_tokens()[0].state, RefreshState::Active);
    }

    #[test]
    fn client_credentials_and_grant_errors() {
        let (_ca, server, http) = start(OAuthOptions::loopback());
        let secret = Canary::new();
        server.register_client(CLIENT, Some(secret.expose()));
        server.register_client("public", None);

        let r = http.token(&[
            ("grant_type", "client_credentials"),
            ("client_id", CLIENT),
            ("client_secret", secret.expose()),
            ("scope", "a b"),
        ]);
        assert_eq!(r.status, 200, "{r:?}");
        assert_eq!(r.json["scope"], "a b");
        assert!(r.json.get("refresh_token").is_none(), "{r:?}");
        let ok = http.resource("/resource", Some(&r.field("access_token")));
        assert_eq!(ok.status, 200, "{ok:?}");
        assert_eq!(ok.json["client_id"], CLIENT);

        let basic = http.token_basic(
            CLIENT,
            secret.expose(),
            &[("grant_type", "client_credentials")],
        );
        assert_eq!(basic.status, 200, "{basic:?}");
        assert_error(
            &http.token_basic(CLIENT, "wrong", &[("grant_type", "client_credentials")]),
            401,
            "invalid_client",
        );
        assert_error(
            &http.token(&[
                ("grant_type", "client_credentials"),
                ("client_id", "public"),
            ]),
            401,
            "invalid_client",
        );
        assert_error(
            &http.token(&[("grant_type", "password"), ("client_id", CLIENT)]),
            400,
            "unsupported_grant_type",
        );
        assert_error(
            &http.token(&[("client_id", CLIENT)]),
            400,
            "invalid_request",
        );
        let get = http.send("GET", "/token", &[], String::new());
        assert_eq!(get.status, 405, "{get:?}");

        assert_eq!(server.token_calls(Grant::ClientCredentials), 4);
        assert_eq!(server.tokens_issued(Grant::ClientCredentials), 2);
        assert_eq!(server.token_calls(Grant::Unsupported), 2);
    }

    #[test]
    fn access_tokens_expire_by_the_clock() {
        let (_ca, server, http) = start(OAuthOptions::loopback());
        let secret = Canary::new();
        server.register_client(CLIENT, Some(secret.expose()));
        let cc = [
            ("grant_type", "client_credentials"),
            ("client_id", CLIENT),
            ("client_secret", secret.expose()),
        ];

        server.set_expires_in(1);
        let r = http.token(&cc);
        assert_eq!(r.json["expires_in"], 1, "{r:?}");
        let access = r.field("access_token");
        assert_eq!(http.resource("/resource", Some(&access)).status, 200);
        assert!(server.access_token_valid(&access));
        thread::sleep(Duration::from_millis(1100));
        let expired = http.resource("/resource", Some(&access));
        assert_eq!(expired.status, 401, "{expired:?}");
        assert_eq!(
            expired.www_authenticate.as_deref(),
            Some("Bearer error=\"invalid_token\"")
        );
        assert!(!server.access_token_valid(&access));

        server.set_expires_in(0);
        let r = http.token(&cc);
        assert_eq!(r.json["expires_in"], 0, "{r:?}");
        assert_eq!(
            http.resource("/resource", Some(&r.field("access_token")))
                .status,
            401
        );
        assert_eq!(server.resource_unauthorized(), 2);
        assert_eq!(server.resource_ok(), 1);
    }

    #[test]
    fn revocation() {
        let (_ca, server, http) = start(OAuthOptions::loopback());
        let secret = Canary::new();
        server.register_client(CLIENT, Some(secret.expose()));
        let revoked = server.mint_refresh_token(CLIENT, None);
        let kept = server.mint_refresh_token(CLIENT, None);
        assert!(server.revoke_refresh_token(&revoked));
        assert!(!server.revoke_refresh_token(&Canary::with_prefix(REFRESH_PREFIX)));
        assert_error(
            &refresh(&http, revoked.expose(), secret.expose()),
            400,
            "invalid_grant",
        );

        let r = refresh(&http, kept.expose(), secret.expose());
        assert_eq!(r.status, 200, "{r:?}");
        let access = r.field("access_token");
        let rotated = r.field("refresh_token");
        assert_eq!(http.resource("/resource", Some(&access)).status, 200);

        server.revoke_client(CLIENT);
        let gone = http.resource("/resource", Some(&access));
        assert_eq!(gone.status, 401, "{gone:?}");
        assert_error(
            &refresh(&http, &rotated, secret.expose()),
            400,
            "invalid_grant",
        );
        assert!(
            server
                .refresh_tokens()
                .iter()
                .all(|u| u.state != RefreshState::Active)
        );
        // The client stays registered: a new grant works.
        let fresh = server.mint_refresh_token(CLIENT, None);
        assert_eq!(refresh(&http, fresh.expose(), secret.expose()).status, 200);

        let anonymous = http.resource("/resource", None);
        assert_eq!(anonymous.status, 401);
        assert_eq!(anonymous.www_authenticate.as_deref(), Some("Bearer"));
        assert_eq!(server.resource_unauthorized(), 2);
    }

    #[test]
    fn failure_injection_and_stalls() {
        let (_ca, server, http) = start(OAuthOptions::loopback());
        let secret = Canary::new();
        server.register_client(CLIENT, Some(secret.expose()));
        let token = server.mint_refresh_token(CLIENT, None);

        server.fail_next(2);
        for _ in 0..2 {
            assert_error(
                &refresh(&http, token.expose(), secret.expose()),
                503,
                "temporarily_unavailable",
            );
        }
        assert_eq!(
            server.presented(&token),
            0,
            "a failed call consumes nothing"
        );
        server.stall_next(1, Duration::from_millis(600));
        let started = Instant::now();
        let r = refresh(&http, token.expose(), secret.expose());
        assert_eq!(r.status, 200, "{r:?}");
        assert!(started.elapsed() >= Duration::from_millis(600));
        let started = Instant::now();
        let r = refresh(&http, &r.field("refresh_token"), secret.expose());
        assert_eq!(r.status, 200, "{r:?}");
        assert!(
            started.elapsed() < Duration::from_millis(600),
            "one stall only"
        );

        assert_eq!(server.token_calls(Grant::RefreshToken), 4);
        assert_eq!(server.tokens_issued(Grant::RefreshToken), 2);
    }

    #[test]
    fn concurrent_uses_of_one_refresh_token_succeed_once() {
        let (_ca, server, http) = start(OAuthOptions::loopback());
        let secret = Canary::new();
        server.register_client(CLIENT, Some(secret.expose()));
        let token = server.mint_refresh_token(CLIENT, None);
        // Held so all requests are in flight together.
        server.stall_next(8, Duration::from_millis(300));
        let statuses: Vec<u16> = thread::scope(|s| {
            let handles: Vec<_> = (0..8)
                .map(|_| s.spawn(|| refresh(&http, token.expose(), secret.expose()).status))
                .collect();
            handles
                .into_iter()
                .map(|h| h.join().expect("client thread"))
                .collect()
        });
        assert_eq!(
            statuses.iter().filter(|&&s| s == 200).count(),
            1,
            "{statuses:?}"
        );
        assert_eq!(
            statuses.iter().filter(|&&s| s == 400).count(),
            7,
            "{statuses:?}"
        );
        assert_eq!(server.token_calls(Grant::RefreshToken), 8);
        assert_eq!(server.tokens_issued(Grant::RefreshToken), 1);
        assert_eq!(server.presented(&token), 8);
        assert_eq!(server.reused_refresh_tokens(), 1);
    }

    /// The label of a PKCS#8 private key's PEM lines.
    const PKCS8_LABEL: &str = concat!("PRIVATE", " KEY");

    /// The label of a PEM `BEGIN` line.
    fn pem_label(line: &str) -> Option<&str> {
        line.strip_prefix("-----BEGIN ")?.strip_suffix("-----")
    }

    #[test]
    fn jwt_bearer_service_account() {
        let (_ca, server, http) = start(OAuthOptions::loopback());
        let email = "abtest@abtest-project.iam.gserviceaccount.com";
        let account = server.service_account(email);
        let debug = format!("{account:?}");
        assert!(!debug.contains(PKCS8_LABEL), "Debug must hide the key");

        let file: serde_json::Value =
            serde_json::from_str(&account.json()).expect("the key file is JSON");
        assert_eq!(file["type"], "service_account");
        assert_eq!(file["client_email"], email);
        assert_eq!(file["token_uri"], server.token_url().as_str());
        assert_eq!(file["private_key_id"], account.private_key_id.as_str());
        // A PKCS#8 PEM: its first line's label is the one PKCS#8 keys carry.
        let first_line = file["private_key"]
            .as_str()
            .and_then(|k| k.lines().next())
            .unwrap_or_default();
        assert_eq!(
            pem_label(first_line),
            Some(PKCS8_LABEL),
            "private_key must be a PKCS#8 PEM"
        );

        let grant =
            |assertion: &str| http.token(&[("grant_type", JWT_BEARER), ("assertion", assertion)]);
        let hour = Duration::from_secs(3600);
        let scope = "https://www.googleapis.com/auth/cloud-platform";
        let r = grant(&account.assertion(&server.token_url(), scope, hour));
        assert_eq!(r.status, 200, "{r:?}");
        assert_eq!(r.json["token_type"], "Bearer");
        assert!(r.json.get("refresh_token").is_none(), "{r:?}");
        let access = r.field("access_token");
        assert_token_shape(&access, ACCESS_PREFIX);
        let ok = http.resource("/api/projects", Some(&access));
        assert_eq!(ok.status, 200, "{ok:?}");
        assert_eq!(ok.json["client_id"], email);
        assert_eq!(ok.json["scope"], scope);

        // Wrong audience, too long a lifetime, expired, forged, unknown issuer, garbage.
        let rejected = |assertion: &str| assert_error(&grant(assertion), 400, "invalid_grant");
        rejected(&account.assertion("https://oauth2.example.test/token", scope, hour));
        rejected(&account.assertion(&server.token_url(), scope, hour * 2));
        let now = unix_now();
        rejected(&account.sign(&serde_json::json!({
            "iss": email, "aud": server.token_url(), "scope": scope,
            "iat": now - 7200, "exp": now - 3600,
        })));
        let other = ServiceAccount::generate(email, &server.token_url());
        let mut forged = other
            .assertion(&server.token_url(), scope, hour)
            .to_string();
        // Keep the registered kid so only the signature is wrong.
        let (_, rest) = forged.split_once('.').expect("a JWT");
        let header =
            serde_json::json!({"alg": "RS256", "typ": "JWT", "kid": account.private_key_id});
        forged = format!(
            "{}.{rest}",
            BASE64URL_NOPAD.encode(header.to_string().as_bytes())
        );
        rejected(&forged);
        let stranger = server.service_account("stranger@abtest-project.iam.gserviceaccount.com");
        let stranger_claims = serde_json::json!({
            "iss": "nobody@abtest-project.iam.gserviceaccount.com",
            "aud": server.token_url(), "scope": scope, "iat": now, "exp": now + 60,
        });
        rejected(&stranger.sign(&stranger_claims));
        rejected("not.a.jwt");
        assert_error(
            &http.token(&[("grant_type", JWT_BEARER)]),
            400,
            "invalid_request",
        );

        assert_eq!(server.token_calls(Grant::JwtBearer), 8);
        assert_eq!(server.tokens_issued(Grant::JwtBearer), 1);
    }

    #[test]
    fn replay_revokes_the_family_when_asked() {
        let mut options = OAuthOptions::loopback();
        options.revoke_family_on_replay = true;
        let (_ca, server, http) = start(options);
        let secret = Canary::new();
        server.register_client(CLIENT, Some(secret.expose()));
        let first = server.mint_refresh_token(CLIENT, None);
        let other = server.mint_refresh_token(CLIENT, None);

        let r = refresh(&http, first.expose(), secret.expose());
        assert_eq!(r.status, 200, "{r:?}");
        let (access, second) = (r.field("access_token"), r.field("refresh_token"));
        assert_error(
            &refresh(&http, first.expose(), secret.expose()),
            400,
            "invalid_grant",
        );
        // The replay logged the family out: its rotated token and its access token.
        assert_error(
            &refresh(&http, &second, secret.expose()),
            400,
            "invalid_grant",
        );
        assert_eq!(http.resource("/resource", Some(&access)).status, 401);
        // Another grant of the same client is untouched.
        assert_eq!(refresh(&http, other.expose(), secret.expose()).status, 200);
        let states: Vec<_> = server.refresh_tokens().iter().map(|u| u.state).collect();
        assert_eq!(
            states,
            vec![
                RefreshState::Used,
                RefreshState::Used,
                RefreshState::Revoked,
                RefreshState::Active,
            ]
        );
    }

    #[test]
    fn h2_and_form_encoded_basic_credentials() {
        let (ca, server, _) = start(OAuthOptions::loopback());
        let h2 = Http::with_protocol(&ca, &server, true);
        // RFC 6749 2.3.1: id and secret are form-encoded before Basic; the server decodes them.
        let secret = "p@ss:w+rd/%é 1";
        server.register_client("client:1", Some(secret));
        let r = h2.token_basic("client:1", secret, &[("grant_type", "client_credentials")]);
        assert_eq!(r.status, 200, "{r:?}");
        let ok = h2.resource("/api/x", Some(&r.field("access_token")));
        assert_eq!(ok.status, 200, "{ok:?}");
        assert_eq!(ok.json["path"], "/api/x");
        let r = h2.token(&[
            ("grant_type", "client_credentials"),
            ("client_id", "client:1"),
            ("client_secret", secret),
        ]);
        assert_eq!(r.status, 200, "{r:?}");
        assert_eq!(h2.resource("/elsewhere", None).status, 404);
    }
}
