//! Credentials that are not static values: what the vault stores for them, and how.
//!
//! A static secret is its value. Every other kind of credential is stored, sealed like any
//! secret under its name and version, as a [`CredentialSpec`]: what brokerd needs to get the
//! value it injects (an OAuth refresh token and its token endpoint, a client's id and secret,
//! a command to run, a file to read). brokerd turns the spec into the current value at run
//! time; policy files name the credential like any secret, and the agent never sees the spec.
//!
//! The spec is stored as [`SPEC_MARKER`] followed by its JSON. A static value can never start
//! with the marker: values are refused with a NUL byte in them, and the marker starts with one.
//!
//! A spec holds secret material (refresh tokens, client secrets, private keys): its `Debug`
//! shows none of it, it is zeroized on drop, and it is not `Display`.

use std::fmt;

use serde::{Deserialize, Serialize};
use zeroize::{Zeroize, ZeroizeOnDrop};

use crate::secret::SecretValue;

/// What a stored spec starts with (see the module documentation).
pub const SPEC_MARKER: &[u8] = b"\0agent-broker-credential\0";
/// Longest accepted command output or file value, in bytes.
pub const MAX_PROVIDED_VALUE: usize = 64 * 1024;
/// Default time an exec provider's value is used before the command runs again.
pub const DEFAULT_EXEC_TTL_SECS: u64 = 300;
/// Default time an exec provider's command may run.
pub const DEFAULT_EXEC_TIMEOUT_SECS: u64 = 10;

/// Why a spec was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum SpecError {
    #[error("{field}: {reason}")]
    Field { field: &'static str, reason: String },
    #[error("the stored credential spec cannot be read: {0}")]
    Malformed(String),
}

fn field(field: &'static str, reason: impl Into<String>) -> SpecError {
    SpecError::Field {
        field,
        reason: reason.into(),
    }
}

/// A credential that is not a static value. See the module documentation.
#[derive(Clone, PartialEq, Eq, Serialize, Deserialize, Zeroize, ZeroizeOnDrop)]
#[serde(tag = "kind", rename_all = "kebab-case", deny_unknown_fields)]
pub enum CredentialSpec {
    /// OAuth 2.0 refresh-token grant (RFC 6749 section 6): brokerd holds the refresh token and
    /// is its single user; it injects the current access token.
    Oauth {
        token_url: String,
        client_id: String,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        client_secret: Option<String>,
        refresh_token: String,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        scope: Option<String>,
    },
    /// OAuth 2.0 client-credentials grant (RFC 6749 section 4.4).
    OauthClient {
        token_url: String,
        client_id: String,
        client_secret: String,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        scope: Option<String>,
    },
    /// A Google service account (RFC 7523 JWT-bearer grant, as Google's client libraries use
    /// it): brokerd signs an assertion with the account's private key and exchanges it at the
    /// token endpoint for an access token. The key never leaves brokerd.
    Gcp {
        token_url: String,
        client_email: String,
        /// A PKCS#8 PEM key, as in the account's JSON key file.
        private_key: String,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        private_key_id: Option<String>,
        scope: String,
    },
    /// AWS credentials for Signature Version 4. The agent holds the placeholder pair (an access
    /// key id shaped like a real one and a secret key that is worth nothing elsewhere) and signs
    /// with it; brokerd checks that signature, then signs again with the real pair. The real
    /// secret key never travels; a session token is written only into the re-signed request.
    Sigv4 {
        access_key_id: String,
        secret_access_key: String,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        session_token: Option<String>,
        /// Made by brokerd when the credential is stored (`secret placeholder NAME` shows them).
        #[serde(default)]
        placeholder_access_key_id: String,
        #[serde(default)]
        placeholder_secret_access_key: String,
    },
    /// A value printed by a command (`op read ...`, `vault kv get -field=...`), run again once
    /// `ttl_secs` have passed.
    Exec {
        command: Vec<String>,
        ttl_secs: u64,
        timeout_secs: u64,
        /// Keep using the last value past its TTL while the command fails.
        #[serde(default)]
        allow_stale: bool,
    },
    /// A value read from a file an orchestrator writes (systemd credentials, Kubernetes secret
    /// volumes), read again when the file changes.
    File { path: String },
}

impl fmt::Debug for CredentialSpec {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "CredentialSpec({}: {})", self.kind(), self.source())
    }
}

impl CredentialSpec {
    /// The kind as `secret list` shows it.
    pub fn kind(&self) -> &'static str {
        match self {
            Self::Oauth { .. } => "oauth",
            Self::OauthClient { .. } => "oauth-client",
            Self::Gcp { .. } => "gcp",
            Self::Sigv4 { .. } => "sigv4",
            Self::Exec { .. } => "exec",
            Self::File { .. } => "file",
        }
    }

    /// Where the value comes from, as `secret list` shows it: no secret material.
    pub fn source(&self) -> String {
        match self {
            Self::Oauth {
                token_url,
                client_id,
                ..
            }
            | Self::OauthClient {
                token_url,
                client_id,
                ..
            } => format!("{token_url} (client {client_id})"),
            Self::Gcp {
                token_url,
                client_email,
                ..
            } => format!("{token_url} (service account {client_email})"),
            Self::Sigv4 {
                placeholder_access_key_id,
                ..
            } => format!("AWS SigV4 (agents sign as {placeholder_access_key_id})"),
            Self::Exec { command, .. } => format!("exec: {}", command.join(" ")),
            Self::File { path } => format!("file: {path}"),
        }
    }

    /// Checks the fields: URLs are https, names and paths are usable.
    pub fn validate(&self) -> Result<(), SpecError> {
        match self {
            Self::Oauth {
                token_url,
                client_id,
                refresh_token,
                ..
            } => {
                check_token_url(token_url)?;
                check_nonempty("client_id", client_id)?;
                check_nonempty("refresh_token", refresh_token)
            }
            Self::OauthClient {
                token_url,
                client_id,
                client_secret,
                ..
            } => {
                check_token_url(token_url)?;
                check_nonempty("client_id", client_id)?;
                check_nonempty("client_secret", client_secret)
            }
            Self::Gcp {
                token_url,
                client_email,
                private_key,
                scope,
                ..
            } => {
                check_token_url(token_url)?;
                check_nonempty("client_email", client_email)?;
                check_nonempty("scope", scope)?;
                if !is_pkcs8_pem(private_key) {
                    return Err(field(
                        "private_key",
                        "is not a PKCS#8 PEM key, as a service account's JSON key file holds",
                    ));
                }
                Ok(())
            }
            Self::Sigv4 {
                access_key_id,
                secret_access_key,
                placeholder_access_key_id,
                placeholder_secret_access_key,
                ..
            } => {
                check_nonempty("access_key_id", access_key_id)?;
                check_nonempty("secret_access_key", secret_access_key)?;
                check_nonempty("placeholder_access_key_id", placeholder_access_key_id)?;
                check_nonempty(
                    "placeholder_secret_access_key",
                    placeholder_secret_access_key,
                )?;
                if placeholder_access_key_id == access_key_id
                    || placeholder_secret_access_key == secret_access_key
                {
                    return Err(field(
                        "placeholder_secret_access_key",
                        "the placeholders must differ from the real credentials",
                    ));
                }
                Ok(())
            }
            Self::Exec {
                command,
                ttl_secs,
                timeout_secs,
                ..
            } => {
                let Some(program) = command.first() else {
                    return Err(field("command", "is empty"));
                };
                if !program.starts_with('/') {
                    return Err(field(
                        "command",
                        format!(
                            "{program:?} is not an absolute path (brokerd runs it without a \
                             shell or PATH search)"
                        ),
                    ));
                }
                if *ttl_secs == 0 {
                    return Err(field("ttl", "must be at least 1 second"));
                }
                if *timeout_secs == 0 || *timeout_secs > 300 {
                    return Err(field("timeout", "must be 1 to 300 seconds"));
                }
                Ok(())
            }
            Self::File { path } => {
                if !path.starts_with('/') {
                    return Err(field("path", format!("{path:?} is not an absolute path")));
                }
                Ok(())
            }
        }
    }

    /// The spec as the vault stores it: [`SPEC_MARKER`] then its JSON.
    pub fn to_value(&self) -> Result<SecretValue, SpecError> {
        self.validate()?;
        let json = zeroize::Zeroizing::new(
            serde_json::to_vec(self).map_err(|e| SpecError::Malformed(e.to_string()))?,
        );
        let mut bytes = zeroize::Zeroizing::new(Vec::with_capacity(SPEC_MARKER.len() + json.len()));
        bytes.extend_from_slice(SPEC_MARKER);
        bytes.extend_from_slice(&json);
        Ok(SecretValue::from_zeroizing(bytes))
    }

    /// The spec a stored value holds; `None` for a static value.
    pub fn from_value(value: &SecretValue) -> Option<Result<Self, SpecError>> {
        let json = value.expose().strip_prefix(SPEC_MARKER)?;
        Some(
            serde_json::from_slice::<Self>(json)
                .map_err(|e| SpecError::Malformed(e.to_string()))
                .and_then(|spec| spec.validate().map(|()| spec)),
        )
    }
}

impl CredentialSpec {
    /// The token endpoint of an OAuth kind (`oauth`, `oauth-client`, `gcp`); `None` for the
    /// others.
    pub fn token_url(&self) -> Option<&str> {
        match self {
            Self::Oauth { token_url, .. }
            | Self::OauthClient { token_url, .. }
            | Self::Gcp { token_url, .. } => Some(token_url),
            Self::Sigv4 { .. } | Self::Exec { .. } | Self::File { .. } => None,
        }
    }

    /// Whether brokerd fetches this kind's value (OAuth, exec, file) rather than using the
    /// material itself (SigV4 signs with it).
    pub fn is_fetched(&self) -> bool {
        !matches!(self, Self::Sigv4 { .. })
    }

    /// For SigV4: fills in placeholders made from `random` bytes (at least 60) where they are
    /// empty. The access key id keeps the real one's kind: `ASIA` for temporary credentials,
    /// `AKIA` otherwise.
    pub fn fill_placeholders(&mut self, random: &[u8]) {
        if let Self::Sigv4 {
            access_key_id,
            placeholder_access_key_id,
            placeholder_secret_access_key,
            ..
        } = self
        {
            const ID: &[u8] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZ234567";
            const SECRET: &[u8] =
                b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";
            let mut bytes = random.iter().copied().cycle();
            if placeholder_access_key_id.is_empty() {
                let prefix = if access_key_id.starts_with("ASIA") {
                    "ASIA"
                } else {
                    "AKIA"
                };
                let body: String = (0..16)
                    .map(|_| ID[usize::from(bytes.next().unwrap_or(0)) % ID.len()] as char)
                    .collect();
                *placeholder_access_key_id = format!("{prefix}{body}");
            }
            if placeholder_secret_access_key.is_empty() {
                *placeholder_secret_access_key = (0..40)
                    .map(|_| SECRET[usize::from(bytes.next().unwrap_or(0)) % SECRET.len()] as char)
                    .collect();
            }
        }
    }
}

/// Whether a stored value is a spec rather than a static value.
pub fn is_spec(value: &SecretValue) -> bool {
    value.expose().starts_with(SPEC_MARKER)
}

/// Whether `text` starts with the `BEGIN` line of a PKCS#8 private key's PEM (RFC 7468: the
/// label is the two words PRIVATE KEY).
fn is_pkcs8_pem(text: &str) -> bool {
    text.trim_start()
        .lines()
        .next()
        .and_then(|l| l.strip_prefix("-----BEGIN "))
        .and_then(|l| l.strip_suffix("-----"))
        .is_some_and(|label| label.split(' ').eq(["PRIVATE", "KEY"]))
}

fn check_nonempty(name: &'static str, value: &str) -> Result<(), SpecError> {
    if value.trim().is_empty() {
        Err(field(name, "is empty"))
    } else {
        Ok(())
    }
}

fn check_token_url(url: &str) -> Result<(), SpecError> {
    let Some(rest) = url.strip_prefix("https://") else {
        return Err(field(
            "token_url",
            format!(
                "{url:?} is not an https URL (brokerd sends client secrets and refresh tokens only over TLS)"
            ),
        ));
    };
    let authority = rest.split(['/', '?', '#']).next().unwrap_or_default();
    if authority.is_empty() || authority.contains('@') {
        return Err(field(
            "token_url",
            format!("{url:?} has no usable host (and must carry no user info)"),
        ));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn oauth() -> CredentialSpec {
        CredentialSpec::Oauth {
            token_url: "https://auth.example.test/token".into(),
            client_id: "agent".into(),
            client_secret: Some("cs-test-value".into()),
            refresh_token: "rt-test-value".into(),
            scope: None,
        }
    }

    #[test]
    fn a_spec_round_trips_through_its_stored_form_and_static_values_are_not_specs() {
        let spec = oauth();
        let value = spec.to_value().expect("valid");
        assert!(is_spec(&value));
        let back = CredentialSpec::from_value(&value)
            .expect("a spec")
            .expect("readable");
        assert_eq!(back, spec);
        let plain = SecretValue::from_string("abtest-static-value".into()).expect("value");
        assert!(!is_spec(&plain));
        assert!(CredentialSpec::from_value(&plain).is_none());
        // A NUL is refused in static values, so none can pass for a spec.
        assert!(SecretValue::from_string("\0agent-broker-credential\0{}".into()).is_err());
    }

    #[test]
    fn debug_and_source_show_no_secret_material() {
        let spec = oauth();
        for shown in [format!("{spec:?}"), spec.source()] {
            assert!(!shown.contains("rt-test-value"), "{shown}");
            assert!(!shown.contains("cs-test-value"), "{shown}");
        }
        assert_eq!(spec.kind(), "oauth");
    }

    #[test]
    fn bad_specs_are_refused_naming_the_field() {
        let bad = [
            (
                CredentialSpec::Oauth {
                    token_url: "http://auth.example.test/token".into(),
                    client_id: "a".into(),
                    client_secret: None,
                    refresh_token: "r".into(),
                    scope: None,
                },
                "token_url",
            ),
            (
                CredentialSpec::OauthClient {
                    token_url: "https://u@h/token".into(),
                    client_id: "a".into(),
                    client_secret: "s".into(),
                    scope: None,
                },
                "token_url",
            ),
            (
                CredentialSpec::Exec {
                    command: vec!["op".into(), "read".into()],
                    ttl_secs: 60,
                    timeout_secs: 5,
                    allow_stale: false,
                },
                "command",
            ),
            (
                CredentialSpec::Exec {
                    command: vec!["/bin/true".into()],
                    ttl_secs: 0,
                    timeout_secs: 5,
                    allow_stale: false,
                },
                "ttl",
            ),
            (
                CredentialSpec::File {
                    path: "relative/key".into(),
                },
                "path",
            ),
        ];
        for (spec, what) in bad {
            let e = spec.validate().expect_err("refused");
            assert!(e.to_string().starts_with(what), "{e}");
            assert!(spec.to_value().is_err());
        }
    }

    #[test]
    fn a_corrupt_stored_spec_is_an_error_not_a_static_value() {
        let mut bytes = SPEC_MARKER.to_vec();
        bytes.extend_from_slice(b"{\"kind\":\"oauth\"");
        let value = SecretValue::binary(bytes);
        assert!(matches!(
            CredentialSpec::from_value(&value),
            Some(Err(SpecError::Malformed(_)))
        ));
    }
}
