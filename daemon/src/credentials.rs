//! Credentials that are not static values (see `agent_broker_core::credential`): brokerd
//! turns each stored spec into the value a rule injects, keeps it current, and is the single
//! user of what it is derived from.
//!
//! - **OAuth** (`oauth`: refresh-token grant; `oauth-client`: client-credentials grant): the
//!   access token is fetched from the token endpoint ([`oauth`]) on first need and again shortly
//!   before it expires ([`REFRESH_BEFORE`]), or once when an upstream answers 401 to it. One
//!   request per credential is in flight at a time (single flight: concurrent requests wait for
//!   the same answer). A rotated refresh token is stored in the vault, durably, before the new
//!   access token is used, so a brokerd killed at any point never holds a refresh token the
//!   server has retired. A refused grant (`invalid_grant`, a revoked or reused refresh token)
//!   marks the credential failed: it is audited once and not tried again until the credential
//!   is set again. Other failures are retried with a backoff ([`RETRY_AFTER`]).
//! - **exec**: the command's standard output (one trailing newline dropped), used for its TTL,
//!   then the command runs again. A failure is an error naming its exit status and the first
//!   line of its standard error; the last value is not used past its TTL unless the spec says
//!   `allow_stale`.
//! - **file**: the file's content (one trailing newline dropped), read again when the file
//!   changes (its inode, size or modification time).
//!
//! Values live in brokerd's memory only (all of it locked by `harden`), in `SecretValue`s
//! that zeroize on drop. Every fetch and every failure is an audit record (`credential`) naming
//! the credential, never a value. Requests that started with a value finish with it: a rotation
//! replaces the value for the requests that come after.

pub mod oauth;
mod provider;

use std::{
    collections::HashMap,
    sync::{
        Arc, Mutex, RwLock,
        atomic::{AtomicU64, Ordering},
    },
    time::{Duration, Instant},
};

use agent_broker_core::{
    credential::CredentialSpec,
    fmt::error_chain,
    secret::{SecretName, SecretValue},
    time::now_unix_secs,
};
use agent_broker_protocol::{AuditEvent, Decision, EventKind, Side};
use serde::{Deserialize, Serialize};
use tokio_util::sync::CancellationToken;
use tracing::{info, warn};
use zeroize::Zeroizing;

use crate::{audit::EventSink, vault::Vault};

use oauth::TokenClient;

/// How long before an access token expires it is refreshed.
pub const REFRESH_BEFORE: Duration = Duration::from_secs(60);
/// How long after a failure that may pass (a 5xx, a timeout) it is tried again.
pub const RETRY_AFTER: Duration = Duration::from_secs(5);
/// How often the background task looks for values to renew and files that changed.
const TICK: Duration = Duration::from_secs(1);
/// A 401 refreshes a token only if it was fetched at least this long ago (one refresh per 401
/// burst, never a loop).
const REJECTED_AFTER: Duration = Duration::from_secs(5);
/// The vault blob holding an OAuth credential's rotated refresh token and current token.
const STATE_BLOB: &str = "credential-state/";

/// What a lookup of a secret name finds.
pub enum Lookup {
    /// Not a credential of this module: a static secret (or none).
    Static,
    Ready(SecretValue),
    /// A credential with no usable value now, and why.
    NotReady(String),
}

/// A credential's state, as `secret list` and `doctor` show it.
#[derive(Clone, Debug, Default)]
pub struct Status {
    pub kind: &'static str,
    pub source: String,
    /// `valid`, `refreshing`, `not fetched yet`, or `failed: <why>`.
    pub state: String,
    pub valid_until_unix: Option<u64>,
    pub last_used_unix: Option<u64>,
}

/// See the module documentation.
pub struct Credentials {
    vault: Arc<Vault>,
    tokens: Arc<dyn TokenClient>,
    events: Arc<dyn EventSink>,
    entries: RwLock<HashMap<SecretName, Arc<Entry>>>,
    /// Bumped whenever a value changes, so scrubbing sets built from the old values are rebuilt.
    generation: AtomicU64,
}

struct Entry {
    name: SecretName,
    version: u64,
    spec: CredentialSpec,
    state: Mutex<State>,
    /// Held while a value is fetched: the single flight.
    flight: tokio::sync::Mutex<()>,
}

#[derive(Default)]
struct State {
    current: Option<Current>,
    /// Values replaced lately, still scrubbed from responses.
    previous: Vec<SecretValue>,
    /// The refresh token now (the spec's, or the one the server rotated to).
    refresh_token: Option<SecretValue>,
    /// Set on a failure: why, whether it is final, and when it may be tried again.
    failure: Option<Failure>,
    last_used_unix: Option<u64>,
    /// A file provider's file as last read.
    file_stamp: Option<provider::Stamp>,
}

struct Current {
    value: SecretValue,
    /// Unix seconds; `None`: no expiry (a file's value, until the file changes).
    expires_unix: Option<u64>,
    /// Seconds it was valid for when fetched.
    lifetime_secs: u64,
    fetched: Instant,
}

/// How long before its expiry a value is fetched again: [`REFRESH_BEFORE`], or a quarter of
/// its lifetime for short-lived tokens (so a 2-minute token is not refreshed on every use).
fn refresh_margin(current: &Current) -> u64 {
    REFRESH_BEFORE.as_secs().min(current.lifetime_secs / 4)
}

#[derive(Clone)]
struct Failure {
    message: String,
    fatal: bool,
    retry_at: Instant,
}

/// What the vault keeps of an OAuth credential between brokerd's runs.
#[derive(Serialize, Deserialize)]
struct Persisted {
    /// The spec version it belongs to: a credential set again starts over.
    version: u64,
    refresh_token: Option<Zeroizing<String>>,
    access_token: Option<Zeroizing<String>>,
    expires_unix: Option<u64>,
}

impl Credentials {
    pub fn new(
        vault: Arc<Vault>,
        tokens: Arc<dyn TokenClient>,
        events: Arc<dyn EventSink>,
    ) -> Self {
        Self {
            vault,
            tokens,
            events,
            entries: RwLock::new(HashMap::new()),
            generation: AtomicU64::new(0),
        }
    }

    /// Changes whenever a credential's value does.
    pub fn generation(&self) -> u64 {
        self.generation.load(Ordering::Acquire)
    }

    /// Whether any credential is not static (the proxy skips its preparation step otherwise).
    pub fn any(&self) -> bool {
        self.entries.read().is_ok_and(|e| !e.is_empty())
    }

    fn entry(&self, name: &SecretName) -> Option<Arc<Entry>> {
        self.entries.read().ok()?.get(name).cloned()
    }

    /// Reads the specs from the vault (at start, and after a secret is set, rotated or
    /// removed): new and changed credentials start over, removed ones go. Blocking (redb).
    pub fn reload(&self) {
        let list = match self.vault.list() {
            Ok(l) => l,
            Err(e) => {
                warn!(error = %error_chain(&e), "cannot list the vault's secrets; credentials keep their state");
                return;
            }
        };
        let mut found: HashMap<SecretName, Arc<Entry>> = HashMap::new();
        for meta in list {
            let known = self.entry(&meta.name);
            if let Some(entry) = known.filter(|e| e.version == meta.version) {
                found.insert(meta.name.clone(), entry);
                continue;
            }
            let value = match self.vault.get(&meta.name) {
                Ok(Some(v)) => v,
                Ok(None) => continue,
                Err(e) => {
                    warn!(secret = %meta.name.as_str(), error = %error_chain(&e), "cannot read secret");
                    continue;
                }
            };
            let spec = match CredentialSpec::from_value(&value) {
                None => continue,
                // SigV4 material is used as it is, to sign (see `crate::broker`).
                Some(Ok(spec)) if !spec.is_fetched() => continue,
                Some(Ok(spec)) => spec,
                Some(Err(e)) => {
                    warn!(secret = %meta.name.as_str(), error = %e, "a stored credential spec cannot be read; set the credential again");
                    continue;
                }
            };
            let entry = Arc::new(Entry {
                name: meta.name.clone(),
                version: meta.version,
                spec,
                state: Mutex::new(State::default()),
                flight: tokio::sync::Mutex::new(()),
            });
            self.restore(&entry);
            found.insert(meta.name, entry);
        }
        if let Ok(mut entries) = self.entries.write() {
            for gone in entries.keys().filter(|k| !found.contains_key(*k)) {
                let _ = self
                    .vault
                    .remove_blob(&format!("{STATE_BLOB}{}", gone.as_str()));
            }
            *entries = found;
        }
        self.generation.fetch_add(1, Ordering::AcqRel);
    }

    /// Takes over what an earlier brokerd kept of an OAuth credential of the same version.
    fn restore(&self, entry: &Entry) {
        if entry.spec.token_url().is_none() {
            return;
        }
        let blob = format!("{STATE_BLOB}{}", entry.name.as_str());
        let persisted = match self.vault.get_blob(&blob) {
            Ok(Some(v)) => serde_json::from_slice::<Persisted>(v.expose()).ok(),
            _ => None,
        };
        let Some(p) = persisted.filter(|p| p.version == entry.version) else {
            return;
        };
        let mut state = lock(&entry.state);
        state.refresh_token = p
            .refresh_token
            .and_then(|t| SecretValue::from_string(t.to_string()).ok());
        let now = now_unix_secs();
        if let (Some(token), Some(expires)) = (p.access_token, p.expires_unix)
            && expires > now
            && let Ok(value) = SecretValue::from_string(token.to_string())
        {
            state.current = Some(Current {
                value,
                expires_unix: Some(expires),
                lifetime_secs: expires.saturating_sub(now),
                fetched: Instant::now(),
            });
        }
    }

    /// The value to inject for `name` now (see [`Lookup`]); counts as a use.
    pub fn lookup(&self, name: &SecretName) -> Lookup {
        let Some(entry) = self.entry(name) else {
            return Lookup::Static;
        };
        let mut state = lock(&entry.state);
        let now = now_unix_secs();
        let usable = |c: &Current| {
            c.expires_unix.is_none_or(|e| e > now)
                || matches!(
                    entry.spec,
                    CredentialSpec::Exec {
                        allow_stale: true,
                        ..
                    }
                )
        };
        match &state.current {
            Some(c) if usable(c) => {
                let value = c.value.clone();
                state.last_used_unix = Some(now);
                Lookup::Ready(value)
            }
            _ => Lookup::NotReady(match &state.failure {
                Some(f) => format!("credential {} failed: {}", name.as_str(), f.message),
                None => format!("credential {} has no current value yet", name.as_str()),
            }),
        }
    }

    /// Every value of `name` to scrub from responses: the current one, those replaced lately,
    /// and the refresh token.
    pub fn needles(&self, name: &SecretName) -> Vec<SecretValue> {
        let Some(entry) = self.entry(name) else {
            return Vec::new();
        };
        let state = lock(&entry.state);
        state
            .current
            .iter()
            .map(|c| c.value.clone())
            .chain(state.previous.iter().cloned())
            .chain(state.refresh_token.iter().cloned())
            .collect()
    }

    /// Which of `names` are credentials of this module with no value to use now, or whose value
    /// is about to expire: the proxy awaits [`Credentials::ensure`] for those first.
    pub fn pending(&self, names: &[&SecretName]) -> Vec<SecretName> {
        names
            .iter()
            .filter(|n| self.entry(n).is_some_and(|e| self.needs_fetch(&e, true)))
            .map(|n| (*n).clone())
            .collect()
    }

    /// Whether the entry's value should be fetched now: none, expired (or, with `soon`, about
    /// to), or its file changed; never while a failure's backoff runs.
    fn needs_fetch(&self, entry: &Entry, soon: bool) -> bool {
        let state = lock(&entry.state);
        if let Some(f) = &state.failure
            && (f.fatal || Instant::now() < f.retry_at)
        {
            return false;
        }
        let Some(current) = &state.current else {
            return true;
        };
        let now = now_unix_secs();
        let margin = if soon { refresh_margin(current) } else { 0 };
        match (&entry.spec, current.expires_unix) {
            (CredentialSpec::File { path }, _) => state.file_stamp != provider::stamp(path),
            (CredentialSpec::Exec { .. }, Some(expires)) => expires <= now,
            (_, Some(expires)) => expires <= now + margin,
            (_, None) => false,
        }
    }

    /// Fetches the value of each of `names` that needs it, each in a single flight; returns
    /// when all are done (whatever the outcome: a failure shows in [`Credentials::lookup`]).
    pub async fn ensure(&self, names: &[SecretName]) {
        for name in names {
            if let Some(entry) = self.entry(name) {
                self.fetch(&entry, false).await;
            }
        }
    }

    /// An upstream answered 401 to a request that carried `names`: their tokens are fetched
    /// again, once (a token fetched in the last few seconds is not).
    pub async fn rejected(&self, names: &[SecretName]) {
        for name in names {
            let Some(entry) = self.entry(name) else {
                continue;
            };
            if entry.spec.token_url().is_none() {
                continue;
            }
            let stale = lock(&entry.state)
                .current
                .as_ref()
                .is_some_and(|c| c.fetched.elapsed() >= REJECTED_AFTER);
            if stale {
                info!(secret = %name.as_str(), "an upstream refused the access token (401); fetching a new one");
                self.fetch(&entry, true).await;
            }
        }
    }

    /// The single flight: waits for any fetch under way, then fetches unless the value became
    /// fresh meanwhile (or `force`: a 401 said the current one is no good).
    async fn fetch(&self, entry: &Arc<Entry>, force: bool) {
        let before = lock(&entry.state).current.as_ref().map(|c| c.fetched);
        let _flight = entry.flight.lock().await;
        let after = lock(&entry.state).current.as_ref().map(|c| c.fetched);
        if after != before {
            return; // another request fetched it while this one waited
        }
        if !force && !self.needs_fetch(entry, true) {
            return;
        }
        let outcome = match &entry.spec {
            CredentialSpec::Sigv4 { .. } => Err(("SigV4 credentials are not fetched".into(), true)),
            CredentialSpec::Oauth { .. }
            | CredentialSpec::OauthClient { .. }
            | CredentialSpec::Gcp { .. } => self.fetch_token(entry).await,
            CredentialSpec::Exec {
                command,
                ttl_secs,
                timeout_secs,
                ..
            } => provider::run(command, Duration::from_secs(*timeout_secs))
                .await
                .map(|value| Fetched {
                    value,
                    expires_unix: Some(now_unix_secs() + ttl_secs),
                    stamp: None,
                    detail: format!("ran {}", command.first().map_or("", String::as_str)),
                })
                .map_err(|message| (message, false)),
            CredentialSpec::File { path } => {
                let path = path.clone();
                tokio::task::spawn_blocking(move || provider::read(&path))
                    .await
                    .map_err(|e| (format!("file provider task failed: {e}"), false))
                    .and_then(|r| r.map_err(|m| (m, false)))
                    .map(|(value, stamp)| Fetched {
                        value,
                        expires_unix: None,
                        stamp,
                        detail: "read the file".into(),
                    })
            }
        };
        self.settle(entry, outcome);
    }

    /// Publishes a fetched value, or records the failure; audits either.
    fn settle(&self, entry: &Entry, outcome: Result<Fetched, (String, bool)>) {
        let name = entry.name.as_str();
        let mut event = AuditEvent {
            time_ms: agent_broker_core::time::now_unix_ms(),
            kind: Some(EventKind::Credential),
            secrets: vec![name.to_string()],
            side: Some(Side::Broker),
            ..AuditEvent::default()
        };
        if let Some(token_url) = entry.spec.token_url() {
            event.host = token_url
                .parse::<http::Uri>()
                .ok()
                .and_then(|u| u.host().map(str::to_string));
        }
        match outcome {
            Ok(fetched) => {
                let mut state = lock(&entry.state);
                if let Some(old) = state.current.take() {
                    state.previous.insert(0, old.value);
                    state.previous.truncate(2);
                }
                state.current = Some(Current {
                    value: fetched.value,
                    lifetime_secs: fetched
                        .expires_unix
                        .map_or(0, |e| e.saturating_sub(now_unix_secs())),
                    expires_unix: fetched.expires_unix,
                    fetched: Instant::now(),
                });
                state.file_stamp = fetched.stamp;
                state.failure = None;
                drop(state);
                self.generation.fetch_add(1, Ordering::AcqRel);
                event.decision = Some(Decision::Allow);
                event.reason = Some(match fetched.expires_unix {
                    Some(e) => format!("{}; valid until unix {e}", fetched.detail),
                    None => fetched.detail,
                });
                info!(secret = %name, "credential value fetched");
            }
            Err((message, fatal)) => {
                warn!(secret = %name, fatal, error = %message, "credential fetch failed");
                let mut state = lock(&entry.state);
                let repeated = state.failure.as_ref().is_some_and(|f| f.message == message);
                state.failure = Some(Failure {
                    message: message.clone(),
                    fatal,
                    retry_at: Instant::now() + RETRY_AFTER,
                });
                drop(state);
                if repeated {
                    return; // audited once per distinct failure, not per retry
                }
                event.decision = Some(Decision::Deny);
                event.reason = Some(if fatal {
                    format!("{message}; not tried again until the credential is set again")
                } else {
                    format!("{message}; tried again in {}s", RETRY_AFTER.as_secs())
                });
            }
        }
        self.events.record(event);
    }

    /// One token request, and for a rotated refresh token, its durable store before use.
    async fn fetch_token(&self, entry: &Entry) -> Result<Fetched, (String, bool)> {
        let form = match &entry.spec {
            CredentialSpec::Oauth {
                client_id,
                client_secret,
                refresh_token,
                scope,
                ..
            } => {
                let current = lock(&entry.state).refresh_token.clone();
                let token = match &current {
                    Some(t) => String::from_utf8_lossy(t.expose()).to_string(),
                    None => refresh_token.clone(),
                };
                let token = Zeroizing::new(token);
                let mut pairs = vec![
                    ("grant_type", "refresh_token"),
                    ("refresh_token", token.as_str()),
                    ("client_id", client_id.as_str()),
                ];
                if let Some(secret) = client_secret {
                    pairs.push(("client_secret", secret.as_str()));
                }
                if let Some(scope) = scope {
                    pairs.push(("scope", scope.as_str()));
                }
                oauth::form(&pairs)
            }
            CredentialSpec::OauthClient {
                client_id,
                client_secret,
                scope,
                ..
            } => {
                let mut pairs = vec![
                    ("grant_type", "client_credentials"),
                    ("client_id", client_id.as_str()),
                    ("client_secret", client_secret.as_str()),
                ];
                if let Some(scope) = scope {
                    pairs.push(("scope", scope.as_str()));
                }
                oauth::form(&pairs)
            }
            CredentialSpec::Gcp {
                token_url,
                client_email,
                private_key,
                private_key_id,
                scope,
            } => {
                let jwt = oauth::assertion(
                    private_key,
                    private_key_id.as_deref(),
                    client_email,
                    token_url,
                    scope,
                    now_unix_secs(),
                )
                .map_err(|e| (e, true))?;
                oauth::form(&[
                    ("grant_type", oauth::JWT_BEARER),
                    ("assertion", jwt.as_str()),
                ])
            }
            _ => return Err(("not an OAuth credential".into(), true)),
        };
        let Some(token_url) = entry.spec.token_url() else {
            return Err(("not an OAuth credential".into(), true));
        };
        let response = self
            .tokens
            .post_form(token_url, form)
            .await
            .map_err(|e| (e, false))?;
        let tokens = oauth::parse(&response).map_err(|e| (e.message, e.fatal))?;
        let value = SecretValue::from_string(tokens.access_token.to_string())
            .map_err(|e| (format!("the access token cannot be injected: {e}"), true))?;
        let expires_unix = now_unix_secs() + tokens.expires_in;
        let rotated = match &tokens.refresh_token {
            Some(t) => Some(
                SecretValue::from_string(t.to_string())
                    .map_err(|e| (format!("the new refresh token is unusable: {e}"), true))?,
            ),
            None => None,
        };
        // Durable before the new token is used: the server may have retired the old refresh
        // token already.
        let keep = rotated
            .clone()
            .or_else(|| lock(&entry.state).refresh_token.clone());
        let persisted = Persisted {
            version: entry.version,
            refresh_token: keep
                .as_ref()
                .map(|t| Zeroizing::new(String::from_utf8_lossy(t.expose()).to_string())),
            access_token: Some(Zeroizing::new(tokens.access_token.to_string())),
            expires_unix: Some(expires_unix),
        };
        let vault = self.vault.clone();
        let blob = format!("{STATE_BLOB}{}", entry.name.as_str());
        let stored = tokio::task::spawn_blocking(move || {
            let bytes = Zeroizing::new(serde_json::to_vec(&persisted).map_err(|e| e.to_string())?);
            vault
                .put_blob(&blob, &SecretValue::binary(bytes.to_vec()))
                .map_err(|e| error_chain(&e))
        })
        .await
        .map_err(|e| e.to_string())
        .and_then(|r| r);
        if let Some(rotated) = rotated {
            lock(&entry.state).refresh_token = Some(rotated);
        }
        if let Err(e) = stored {
            warn!(secret = %entry.name.as_str(), error = %e, "cannot store the credential's new tokens in the vault; a restarted brokerd will use the refresh token it had");
        }
        Ok(Fetched {
            value,
            expires_unix: Some(expires_unix),
            stamp: None,
            detail: if tokens.refresh_token.is_some() {
                "token refreshed; refresh token rotated".into()
            } else {
                "token fetched".into()
            },
        })
    }

    /// Fetches, in the background, what is about to expire or changed (until `cancel`).
    pub async fn run(self: Arc<Self>, cancel: CancellationToken) {
        loop {
            let entries: Vec<Arc<Entry>> = self
                .entries
                .read()
                .map(|e| e.values().cloned().collect())
                .unwrap_or_default();
            for entry in entries {
                // Fetched ahead only once something used it (or it was fetched before).
                let used = {
                    let s = lock(&entry.state);
                    s.current.is_some() || s.last_used_unix.is_some()
                };
                if used && self.needs_fetch(&entry, true) {
                    let me = self.clone();
                    tokio::spawn(async move { me.fetch(&entry, false).await });
                }
            }
            tokio::select! {
                () = cancel.cancelled() => return,
                () = tokio::time::sleep(TICK) => {}
            }
        }
    }

    /// The state of credential `name`, if it is one of this module's.
    pub fn status(&self, name: &SecretName) -> Option<Status> {
        let entry = self.entry(name)?;
        let state = lock(&entry.state);
        let now = now_unix_secs();
        let (text, failed) = match (&state.failure, &state.current) {
            (Some(f), _) if f.fatal => (format!("failed: {}", f.message), true),
            (Some(f), _) => (format!("failed: {} (retrying)", f.message), true),
            (_, Some(c)) if c.expires_unix.is_none_or(|e| e > now) => ("valid".into(), false),
            (_, Some(_)) => ("expired".into(), false),
            (_, None) => ("not fetched yet".into(), false),
        };
        let refreshing = entry.flight.try_lock().is_err();
        Some(Status {
            kind: entry.spec.kind(),
            source: entry.spec.source(),
            state: if refreshing && !failed {
                "refreshing".into()
            } else {
                text
            },
            valid_until_unix: state.current.as_ref().and_then(|c| c.expires_unix),
            last_used_unix: state.last_used_unix,
        })
    }
}

struct Fetched {
    value: SecretValue,
    expires_unix: Option<u64>,
    stamp: Option<provider::Stamp>,
    detail: String,
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
}

#[cfg(test)]
mod tests;
