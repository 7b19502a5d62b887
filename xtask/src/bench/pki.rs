//! The bench's certificates, made with the openssl command: a throwaway CA (brokerd trusts it
//! for upstream connections through `--upstream-ca`, nginx through `proxy_ssl_trusted_certificate`)
//! and the certificates of the origin API and of the nginx peer. ECDSA P-256 throughout, the key
//! type of brokerd's minted leaves, so every TLS endpoint in the comparison signs the same way.

use std::{
    fs,
    path::{Path, PathBuf},
    process::Command,
};

use anyhow::{Context as _, Result};

use crate::cmd;

/// A certificate and its private key, as PEM files.
pub struct CertFiles {
    pub cert: PathBuf,
    pub key: PathBuf,
}

/// Everything [`create`] made.
pub struct Pki {
    /// The CA certificate.
    pub ca: PathBuf,
    /// The origin API's certificate: `api.example.test`, any `*.bench.test` name (the first-seen
    /// host workload) and the address 127.0.0.2 (what brokerd verifies for agents that dial the
    /// address without SNI).
    pub origin: CertFiles,
    /// The nginx peer's certificate: 127.0.0.1, where it listens, and `*.bench.test`.
    pub proxy: CertFiles,
}

/// Creates the CA and both certificates in `dir`.
pub fn create(openssl: &Path, dir: &Path) -> Result<Pki> {
    let ca = CertFiles {
        cert: dir.join("bench-ca.pem"),
        key: dir.join("bench-ca.key"),
    };
    let mut self_signed = Command::new(openssl);
    self_signed
        .args(["req", "-x509", "-days", "2", "-nodes"])
        .args(P256)
        .arg("-keyout")
        .arg(&ca.key)
        .arg("-out")
        .arg(&ca.cert)
        .args(["-subj", "/CN=agent-broker bench CA"])
        .args(["-addext", "basicConstraints=critical,CA:TRUE"])
        .args(["-addext", "keyUsage=critical,keyCertSign,cRLSign"]);
    quiet(&mut self_signed).context("creating the bench CA")?;
    let origin = leaf(
        openssl,
        dir,
        &ca,
        "origin",
        "DNS:api.example.test,DNS:*.bench.test,IP:127.0.0.2,IP:10.253.0.1",
    )?;
    let proxy = leaf(
        openssl,
        dir,
        &ca,
        "nginx-proxy",
        "IP:127.0.0.1,DNS:*.bench.test",
    )?;
    Ok(Pki {
        ca: ca.cert,
        origin,
        proxy,
    })
}

/// The openssl arguments for a new ECDSA P-256 key.
const P256: [&str; 4] = ["-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1"];

/// A server certificate for `names` (a subjectAltName value) signed by `ca`.
fn leaf(openssl: &Path, dir: &Path, ca: &CertFiles, stem: &str, names: &str) -> Result<CertFiles> {
    let files = CertFiles {
        cert: dir.join(format!("{stem}.pem")),
        key: dir.join(format!("{stem}.key")),
    };
    let request = dir.join(format!("{stem}.csr"));
    let extensions = dir.join(format!("{stem}.ext"));
    fs::write(
        &extensions,
        format!(
            "subjectAltName={names}\nextendedKeyUsage=serverAuth\n\
             basicConstraints=critical,CA:FALSE\nkeyUsage=critical,digitalSignature\n"
        ),
    )?;
    let mut new_request = Command::new(openssl);
    new_request
        .args(["req", "-new", "-nodes"])
        .args(P256)
        .arg("-keyout")
        .arg(&files.key)
        .arg("-out")
        .arg(&request)
        .args(["-subj", &format!("/CN={stem}")]);
    quiet(&mut new_request).with_context(|| format!("creating the {stem} key"))?;
    let mut sign = Command::new(openssl);
    sign.args(["x509", "-req", "-days", "2", "-CAcreateserial"])
        .arg("-in")
        .arg(&request)
        .arg("-CA")
        .arg(&ca.cert)
        .arg("-CAkey")
        .arg(&ca.key)
        .arg("-extfile")
        .arg(&extensions)
        .arg("-out")
        .arg(&files.cert);
    quiet(&mut sign).with_context(|| format!("signing the {stem} certificate"))?;
    Ok(files)
}

/// Runs an openssl command, showing its chatter only when it fails.
fn quiet(command: &mut Command) -> Result<()> {
    let shown = cmd::echo(command);
    let out = command
        .output()
        .with_context(|| format!("starting `{shown}`"))?;
    if !out.status.success() {
        anyhow::bail!(
            "`{shown}` failed ({}): {}",
            out.status,
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    Ok(())
}
