//! `brokerctl secret`: store, rotate, list and remove secrets in brokerd's vault, and make
//! placeholders that look like them.
//!
//! A value is read from stdin or from a prompt that does not echo, never from the command line
//! (where `ps` and shell history would see it), goes to brokerd as a `SecretInput`, and is never
//! printed: brokerd answers with names, versions and dates only, and for `placeholder` with a
//! random string of the secret's shape.

use std::path::Path;

use agent_broker_protocol::{Request, Response, SecretInput};
use anyhow::Context as _;

use crate::control::{call, unexpected};
use crate::print::{date, json_pretty};

/// Store, list, rotate and remove secrets in brokerd's encrypted vault, and print placeholders
/// shaped like them.
#[derive(Debug, clap::Subcommand)]
pub enum Command {
    /// Store a secret (a new version if NAME exists). The value is read from stdin when it is
    /// not a terminal, else from a prompt that does not echo; never from the command line.
    ///
    /// Credentials that are not static values: `--kind oauth` (refresh-token grant: stdin holds
    /// the refresh token, or a JSON object with `refresh_token` and `client_secret`), `--kind
    /// oauth-client` (client-credentials grant: stdin holds the client secret), both with
    /// --token-url and --client-id, and `--kind gcp --scope SCOPE` (stdin holds a Google service
    /// account's JSON key file); brokerd fetches and refreshes the access token and injects it.
    /// `--kind sigv4` (stdin: `{"access_key_id": ..., "secret_access_key": ...}`) stores AWS keys
    /// that brokerd signs requests with; `secret placeholder NAME` prints the placeholder pair
    /// agents sign with instead. `--from exec:COMMAND` (the command's output, run again after --ttl) and `--from
    /// file:PATH` (the file's content, read again when it changes) read nothing from stdin.
    Set {
        /// Secret name: letters, digits, `_`, `-`, `.`; starts with a letter.
        name: String,
        #[command(flatten)]
        kind: KindArgs,
    },
    /// Replace the value of an existing secret (its version goes up). Value as for `set`.
    Rotate {
        name: String,
        #[command(flatten)]
        kind: KindArgs,
    },
    /// Names, versions and dates of the stored secrets. Values are never shown.
    List {
        /// Print as JSON.
        #[arg(long)]
        json: bool,
    },
    /// Delete a secret.
    Rm { name: String },
    /// Print a random placeholder shaped like secret NAME (its prefix, such as `ghp_` or
    /// `sk-proj-`, its length and its alphabet), for an agent's environment where a policy rule
    /// injects the secret anyway, and the client checks what its key looks like. It is bound to
    /// nothing, stored nowhere, and holds nothing of the secret but the prefix; a new one each
    /// time. The shape goes to stderr, the placeholder alone to stdout.
    Placeholder { name: String },
}

/// What kind of credential `set` and `rotate` store (default: a static value from stdin).
#[derive(Debug, Default, clap::Args)]
pub struct KindArgs {
    /// `oauth` (refresh-token grant), `oauth-client` (client-credentials grant), `gcp` (a
    /// Google service account's JSON key on stdin; JWT-bearer grant) or `sigv4` (AWS keys on
    /// stdin as JSON: `access_key_id`, `secret_access_key`, optional `session_token`).
    #[arg(long, value_name = "KIND", value_parser = ["oauth", "oauth-client", "gcp", "sigv4"], conflicts_with = "from")]
    kind: Option<String>,
    /// The OAuth token endpoint (https) [gcp: the key file's token_uri].
    #[arg(long, value_name = "URL", requires = "kind")]
    token_url: Option<String>,
    /// The OAuth client id.
    #[arg(long, value_name = "ID", requires = "kind")]
    client_id: Option<String>,
    /// The OAuth scope to ask for.
    #[arg(long, value_name = "SCOPE", requires = "kind")]
    scope: Option<String>,
    /// `exec:COMMAND` (an absolute path and its arguments, split like a shell would, no shell
    /// run) or `file:PATH`.
    #[arg(long, value_name = "SOURCE")]
    from: Option<String>,
    /// How long an exec source's value is used before the command runs again.
    #[arg(long, value_name = "DURATION", value_parser = humantime::parse_duration, requires = "from")]
    ttl: Option<std::time::Duration>,
    /// How long an exec source's command may run.
    #[arg(long, value_name = "DURATION", value_parser = humantime::parse_duration, requires = "from")]
    timeout: Option<std::time::Duration>,
    /// Keep using an exec source's last value past its TTL while the command fails.
    #[arg(long, requires = "from")]
    allow_stale: bool,
}

pub fn run(run_dir: &Path, command: Command) -> anyhow::Result<()> {
    match command {
        Command::Set { name, kind } => store(run_dir, name, false, &kind),
        Command::Rotate { name, kind } => store(run_dir, name, true, &kind),
        Command::List { json } => match call(run_dir, &Request::SecretList)? {
            Response::Secrets { secrets } if json => json_pretty(&secrets),
            Response::Secrets { secrets } => {
                outln!(
                    "{:<32} {:>8} {:<12} {:<20} {:<20} STATE",
                    "NAME",
                    "VERSION",
                    "KIND",
                    "UPDATED",
                    "LAST USED"
                );
                for s in secrets {
                    let mut state = s.state.clone().unwrap_or_default();
                    if let Some(until) = s.valid_until_unix {
                        state.push_str(&format!(" (until {})", date(until)));
                    }
                    if let Some(source) = &s.source {
                        state.push_str(&format!("; {source}"));
                    }
                    outln!(
                        "{:<32} {:>8} {:<12} {:<20} {:<20} {}",
                        s.name,
                        s.version,
                        s.kind,
                        date(s.updated_unix),
                        s.last_used_unix.map(date).unwrap_or_else(|| "-".into()),
                        state
                    );
                }
                Ok(())
            }
            other => Err(unexpected(other)),
        },
        Command::Placeholder { name } => {
            match call(run_dir, &Request::SecretPlaceholder { name })? {
                Response::SecretPlaceholder {
                    name,
                    shape,
                    placeholder,
                } => {
                    eprintln!("placeholder for {name}, shaped {shape}");
                    println!("{placeholder}");
                    Ok(())
                }
                other => Err(unexpected(other)),
            }
        }
        Command::Rm { name } => match call(run_dir, &Request::SecretRemove { name })? {
            Response::SecretRemoved { name } => {
                outln!("removed secret {name}");
                Ok(())
            }
            other => Err(unexpected(other)),
        },
    }
}

/// Reads a value: stdin, or a prompt without echo on a terminal.
fn read_value(prompt: &str) -> anyhow::Result<String> {
    use std::io::{IsTerminal as _, Read as _};
    if std::io::stdin().is_terminal() {
        rpassword::prompt_password(format!("{prompt} (not echoed): ")).context("reading the value")
    } else {
        let mut v = String::new();
        std::io::stdin()
            .read_to_string(&mut v)
            .context("reading the value from stdin")?;
        Ok(v)
    }
}

/// The credential spec (JSON of `agent_broker_core::credential::CredentialSpec`) `kind` asks
/// for; `None` for a static value. Secret material comes from stdin only.
fn spec(name: &str, kind: &KindArgs) -> anyhow::Result<Option<String>> {
    use serde_json::json;
    if let Some(from) = &kind.from {
        let spec = if let Some(command) = from.strip_prefix("exec:") {
            let command = shlex::split(command)
                .filter(|c| !c.is_empty())
                .with_context(|| format!("--from exec: cannot split {command:?} into arguments"))?;
            json!({
                "kind": "exec",
                "command": command,
                "ttl_secs": kind.ttl.map_or(agent_broker_core::credential::DEFAULT_EXEC_TTL_SECS, |d| d.as_secs()),
                "timeout_secs": kind.timeout.map_or(agent_broker_core::credential::DEFAULT_EXEC_TIMEOUT_SECS, |d| d.as_secs()),
                "allow_stale": kind.allow_stale,
            })
        } else if let Some(path) = from.strip_prefix("file:") {
            json!({ "kind": "file", "path": path })
        } else {
            anyhow::bail!("--from {from:?}: expected exec:COMMAND or file:PATH");
        };
        return Ok(Some(spec.to_string()));
    }
    let Some(k) = &kind.kind else {
        return Ok(None);
    };
    if k == "sigv4" {
        let keys = read_value(&format!("AWS keys (JSON) for {name}"))?;
        let keys: serde_json::Map<String, serde_json::Value> = serde_json::from_str(keys.trim())
            .map_err(|e| anyhow::anyhow!("stdin is not a JSON object: {}", e.classify_name()))?;
        let mut spec = json!({ "kind": "sigv4" });
        for (key, value) in keys {
            anyhow::ensure!(
                ["access_key_id", "secret_access_key", "session_token"].contains(&key.as_str()),
                "stdin: field {key:?} does not belong to a sigv4 credential (access_key_id, \
                 secret_access_key, session_token)"
            );
            spec[key] = value;
        }
        return Ok(Some(spec.to_string()));
    }
    if k == "gcp" {
        let key = read_value(&format!("service account JSON key for {name}"))?;
        let key: serde_json::Map<String, serde_json::Value> = serde_json::from_str(key.trim())
            .map_err(|e| anyhow::anyhow!("stdin is not a JSON key file: {}", e.classify_name()))?;
        let text = |field: &str| key.get(field).and_then(|v| v.as_str()).map(str::to_owned);
        let token_url = kind
            .token_url
            .clone()
            .or_else(|| text("token_uri"))
            .context("the key file has no token_uri; give --token-url")?;
        let mut spec = json!({
            "kind": "gcp",
            "token_url": token_url,
            "client_email": text("client_email").context("the key file has no client_email")?,
            "private_key": text("private_key").context("the key file has no private_key")?,
            "scope": kind.scope.as_deref().context("--kind gcp needs --scope")?,
        });
        if let Some(id) = text("private_key_id") {
            spec["private_key_id"] = json!(id);
        }
        return Ok(Some(spec.to_string()));
    }
    let token_url = kind
        .token_url
        .as_deref()
        .context("--kind oauth needs --token-url")?;
    let client_id = kind
        .client_id
        .as_deref()
        .context("--kind oauth needs --client-id")?;
    let material = read_value(&format!("{k} secret material for {name}"))?;
    let material = material.trim();
    // A JSON object names its fields; a bare line is the refresh token (oauth) or the client
    // secret (oauth-client).
    let fields: serde_json::Map<String, serde_json::Value> = if material.starts_with('{') {
        serde_json::from_str(material)
            .map_err(|e| anyhow::anyhow!("stdin is not a JSON object: {}", e.classify_name()))?
    } else if k == "oauth" {
        [("refresh_token".to_string(), json!(material))]
            .into_iter()
            .collect()
    } else {
        [("client_secret".to_string(), json!(material))]
            .into_iter()
            .collect()
    };
    let mut spec = json!({
        "kind": k,
        "token_url": token_url,
        "client_id": client_id,
    });
    if let Some(scope) = &kind.scope {
        spec["scope"] = json!(scope);
    }
    for (key, value) in fields {
        let allowed = if k == "oauth" {
            ["refresh_token", "client_secret"].contains(&key.as_str())
        } else {
            key == "client_secret"
        };
        anyhow::ensure!(
            allowed,
            "stdin: field {key:?} does not belong to a {k} credential"
        );
        spec[key] = value;
    }
    Ok(Some(spec.to_string()))
}

/// serde_json's error category, without the text around the position (which could echo input).
trait Classify {
    fn classify_name(&self) -> String;
}

impl Classify for serde_json::Error {
    fn classify_name(&self) -> String {
        format!(
            "{:?} error at line {} column {}",
            self.classify(),
            self.line(),
            self.column()
        )
    }
}

/// `set` and `rotate`: reads the value (stdin, or a prompt without echo on a terminal), or
/// builds the credential spec, and sends it to brokerd.
fn store(run_dir: &Path, name: String, rotate: bool, kind: &KindArgs) -> anyhow::Result<()> {
    let (value, spec) = match spec(&name, kind)? {
        Some(spec) => (spec, true),
        None => (read_value(&format!("value for {name}"))?, false),
    };
    let value = SecretInput::new(value);
    let request = Request::SecretSet {
        name,
        value,
        rotate,
        spec,
    };
    match call(run_dir, &request)? {
        Response::SecretStored { secret } => {
            if secret.kind == "static" {
                outln!("stored secret {} version {}", secret.name, secret.version);
            } else {
                outln!(
                    "stored {} credential {} version {}: {}",
                    secret.kind,
                    secret.name,
                    secret.version,
                    secret.source.unwrap_or_default()
                );
            }
            Ok(())
        }
        other => Err(unexpected(other)),
    }
}
