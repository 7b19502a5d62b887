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
    Set {
        /// Secret name: letters, digits, `_`, `-`, `.`; starts with a letter.
        name: String,
    },
    /// Replace the value of an existing secret (its version goes up). Value as for `set`.
    Rotate { name: String },
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

pub fn run(run_dir: &Path, command: Command) -> anyhow::Result<()> {
    match command {
        Command::Set { name } => store(run_dir, name, false),
        Command::Rotate { name } => store(run_dir, name, true),
        Command::List { json } => match call(run_dir, &Request::SecretList)? {
            Response::Secrets { secrets } if json => json_pretty(&secrets),
            Response::Secrets { secrets } => {
                outln!(
                    "{:<32} {:>8} {:<20} {:<20}",
                    "NAME",
                    "VERSION",
                    "CREATED",
                    "UPDATED"
                );
                for s in secrets {
                    outln!(
                        "{:<32} {:>8} {:<20} {:<20}",
                        s.name,
                        s.version,
                        date(s.created_unix),
                        date(s.updated_unix)
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

/// `set` and `rotate`: reads the value (stdin, or a prompt without echo on a terminal) and
/// sends it to brokerd.
fn store(run_dir: &Path, name: String, rotate: bool) -> anyhow::Result<()> {
    use std::io::{IsTerminal as _, Read as _};
    let value = if std::io::stdin().is_terminal() {
        rpassword::prompt_password(format!("value for {name} (not echoed): "))
            .context("reading the value")?
    } else {
        let mut v = String::new();
        std::io::stdin()
            .read_to_string(&mut v)
            .context("reading the value from stdin")?;
        v
    };
    let value = SecretInput::new(value);
    let request = Request::SecretSet {
        name,
        value,
        rotate,
    };
    match call(run_dir, &request)? {
        Response::SecretStored { secret } => {
            outln!("stored secret {} version {}", secret.name, secret.version);
            Ok(())
        }
        other => Err(unexpected(other)),
    }
}
