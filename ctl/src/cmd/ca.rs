//! `brokerctl ca`: the broker CA certificate, exported to a file or stdout, or installed in the
//! system trust store. Only the certificate: its key never leaves brokerd.

use std::path::{Path, PathBuf};

use agent_broker_protocol::{Request, Response};
use anyhow::{Context as _, bail};

use crate::control::{call, unexpected};

/// The broker CA that signs the certificates agents see.
#[derive(Debug, clap::Subcommand)]
pub enum Command {
    /// Write the broker CA certificate (PEM) to FILE, or to stdout.
    Export {
        #[arg(long, value_name = "FILE")]
        out: Option<PathBuf>,
    },
    /// Add the broker CA to the system trust store (Debian: update-ca-certificates).
    ///
    /// curl, Python's ssl module and most OpenSSL-based tools then trust it. Others keep their
    /// own stores: Node.js needs NODE_EXTRA_CA_CERTS=/usr/local/share/ca-certificates/agent-broker.crt
    /// (or --use-openssl-ca); Python requests/httpx use certifi unless REQUESTS_CA_BUNDLE or
    /// SSL_CERT_FILE points at /etc/ssl/certs/ca-certificates.crt; Go, Rust rustls-native-certs
    /// and Java read the system store (Java after its own cacerts update).
    Install,
}

/// Where `brokerctl ca install` puts the CA for update-ca-certificates.
const SYSTEM_CA_PATH: &str = "/usr/local/share/ca-certificates/agent-broker.crt";

pub fn run(run_dir: &Path, command: Command) -> anyhow::Result<()> {
    let pem = pem(run_dir)?;
    match command {
        Command::Export { out: None } => out!("{pem}"),
        Command::Export { out: Some(path) } => {
            write_atomically(&path, pem.as_bytes())?;
            outln!("wrote the broker CA to {}", path.display());
        }
        Command::Install => {
            let path = Path::new(SYSTEM_CA_PATH);
            if let Some(dir) = path.parent() {
                std::fs::create_dir_all(dir)
                    .with_context(|| format!("creating {}", dir.display()))?;
            }
            write_atomically(path, pem.as_bytes())?;
            let status = std::process::Command::new("update-ca-certificates")
                .status()
                .context("running update-ca-certificates (Debian package ca-certificates)")?;
            if !status.success() {
                bail!("update-ca-certificates failed ({status})");
            }
            outln!(
                "installed the broker CA as {SYSTEM_CA_PATH} and updated the system trust store"
            );
            outln!(
                "Node.js: set NODE_EXTRA_CA_CERTS={SYSTEM_CA_PATH}; Python requests/httpx: set REQUESTS_CA_BUNDLE=/etc/ssl/certs/ca-certificates.crt"
            );
        }
    }
    Ok(())
}

/// The broker CA certificate (PEM), from brokerd. `brokerctl run` mounts it into the agent's
/// CA bundle.
pub fn pem(run_dir: &Path) -> anyhow::Result<String> {
    match call(run_dir, &Request::CaCert)? {
        Response::CaCert { pem } => Ok(pem),
        other => Err(unexpected(other)),
    }
}

/// Writes a file atomically, naming it in the error.
fn write_atomically(path: &Path, bytes: &[u8]) -> anyhow::Result<()> {
    agent_broker_core::fs::write_file_atomically(path, bytes)
        .with_context(|| format!("writing {}", path.display()))
}
