//! What the agent trusts, prepared by brokerctl before the clone: the merged PEM bundle, the
//! broker CA for the OpenSSL CA directory, and a trust store for JVMs.
//!
//! - **PEM bundle**: the system bundle followed by the broker CA, mounted over every standard
//!   bundle path ([`CA_BUNDLE_PATHS`]).
//! - **CA directory**: clients that read `/etc/ssl/certs` as a directory (OpenSSL's `capath`,
//!   `SSL_CERT_DIR`) look a CA up by the hash of its subject, `<hash>.0`. The sandbox's
//!   `/etc/ssl/certs` gets the broker CA as `agent-broker-ca.pem` and that link, on an overlay
//!   ([`CA_DIR`]). The hash is OpenSSL's own (`openssl x509 -subject_hash`); without the
//!   `openssl` command the link is left out, with a note.
//! - **JVMs** read neither: they read the `cacerts` key store of their runtime. brokerctl builds
//!   one from the merged bundle, in the JKS format Debian's `ca-certificates-java` writes (every
//!   JDK reads it without a password; a PKCS#12 store whose certificates are encrypted, as
//!   `p12-keystore` writes them, would be read as empty), and mounts it over each `cacerts` it
//!   finds ([`jvm_cacerts_paths`]).
//!
//! Only the variables of runtimes that ignore the system paths are set ([`CA_ENV`]); variables
//! that would override a client's own choice of CA (`REQUESTS_CA_BUNDLE`, `CURL_CA_BUNDLE`,
//! `GIT_SSL_CAINFO` replace `pip --cert`, `session.verify` or `http.sslCAInfo`) are not.

use std::{
    ffi::OsStr,
    fs,
    io::Write as _,
    path::{Path, PathBuf},
    process::{Command, Stdio},
    time::SystemTime,
};

use super::LaunchError;

/// The standard CA bundle paths the merged bundle is mounted over (those that exist).
pub const CA_BUNDLE_PATHS: [&str; 4] = [
    "/etc/ssl/certs/ca-certificates.crt",
    "/etc/pki/tls/certs/ca-bundle.crt",
    "/etc/ssl/cert.pem",
    "/etc/ssl/ca-bundle.pem",
];

/// The OpenSSL CA directory that gets the broker CA and its hashed link (when it exists).
pub const CA_DIR: &str = "/etc/ssl/certs";

/// The broker CA's file name in [`CA_DIR`] (the hashed link points at it).
pub const BROKER_CA_FILE: &str = "agent-broker-ca.pem";

/// Environment variables pointed at the merged bundle: only for runtimes that ship roots of
/// their own and ignore the system paths (Node, grpcio), and `SSL_CERT_FILE`, which names the
/// default for clients that read it (OpenSSL, Go, httpx, rustls-native-certs) and never
/// overrides a CA a client was given explicitly.
pub const CA_ENV: [&str; 3] = [
    "SSL_CERT_FILE",
    "NODE_EXTRA_CA_CERTS",
    // grpcio's default credentials read their own bundled roots otherwise.
    "GRPC_DEFAULT_SSL_ROOTS_FILE_PATH",
];

/// System-wide JVM trust stores (Debian and Ubuntu, Fedora and RHEL); a JDK's own
/// `lib/security/cacerts` is often a link to one of them.
pub const JVM_SYSTEM_CACERTS: [&str; 2] = [
    "/etc/ssl/certs/java/cacerts",
    "/etc/pki/ca-trust/extracted/java/cacerts",
];

/// Where JDKs are installed by the distribution's packages.
const JVM_DIR: &str = "/usr/lib/jvm";

/// The password the JKS store's integrity digest is made with: the JDK's customary one, so
/// `keytool -list -storepass changeit` works. JVMs read `cacerts` without a password.
const JKS_PASSWORD: &[u8] = b"changeit";

/// Everything the agent's mount namespace is given to trust the broker.
#[derive(Clone, Debug)]
pub struct TrustStores {
    /// System roots followed by the broker CA (PEM).
    pub bundle: Vec<u8>,
    /// The broker CA alone (PEM).
    pub broker_ca: Vec<u8>,
    /// OpenSSL's subject hash of the broker CA (8 hex digits), when [`CA_DIR`] exists and it
    /// could be computed.
    pub subject_hash: Option<String>,
    /// The JVM trust store and where it goes, when a JVM trust store was found.
    pub jvm: Option<JvmTrust>,
}

/// A JKS trust store with the same certificates as the bundle, and the `cacerts` files it is
/// mounted over.
#[derive(Clone, Debug)]
pub struct JvmTrust {
    pub store: Vec<u8>,
    /// Canonical paths of existing `cacerts` files.
    pub targets: Vec<PathBuf>,
}

impl TrustStores {
    /// Prepares the trust material for `brokerctl run` from the broker CA (PEM). A missing
    /// `openssl` command costs only the hashed link (with a note on stderr); a broker CA that
    /// is not a PEM certificate is an error.
    pub fn prepare(broker_ca_pem: &str) -> Result<Self, LaunchError> {
        let broker_ca = pem_certificates(broker_ca_pem.as_bytes());
        if broker_ca.is_empty() {
            return Err(LaunchError::Invalid(
                "the broker CA is not a PEM certificate".into(),
            ));
        }
        let bundle = merged_ca_bundle(broker_ca_pem);
        let subject_hash = if Path::new(CA_DIR).is_dir() {
            match subject_hash(broker_ca_pem) {
                Ok(hash) => Some(hash),
                Err(e) => {
                    eprintln!(
                        "brokerctl run: {e}; the agent's {CA_DIR} gets the broker CA without \
                         its hashed link, so clients that read it as a CA directory will not \
                         find it"
                    );
                    None
                }
            }
        } else {
            None
        };
        let targets = jvm_cacerts_paths(
            std::env::var_os("JAVA_HOME").as_deref(),
            std::env::var_os("PATH").as_deref(),
        );
        let jvm = if targets.is_empty() {
            None
        } else {
            Some(JvmTrust {
                store: jvm_trust_store(&bundle, SystemTime::now())?,
                targets,
            })
        };
        Ok(Self {
            bundle,
            broker_ca: broker_ca_pem.as_bytes().to_vec(),
            subject_hash,
            jvm,
        })
    }
}

/// The system CA bundle followed by the broker CA.
pub fn merged_ca_bundle(broker_ca_pem: &str) -> Vec<u8> {
    let mut bundle = CA_BUNDLE_PATHS
        .iter()
        .find_map(|p| fs::read(p).ok())
        .unwrap_or_default();
    if !bundle.is_empty() && !bundle.ends_with(b"\n") {
        bundle.push(b'\n');
    }
    bundle.extend_from_slice(b"# agent-broker CA (added by brokerctl run)\n");
    bundle.extend_from_slice(broker_ca_pem.as_bytes());
    if !bundle.ends_with(b"\n") {
        bundle.push(b'\n');
    }
    bundle
}

/// The DER certificates of a PEM text; other blocks and unreadable ones are skipped, each on
/// its own (`pem::parse_many` refuses the whole text for one bad block).
fn pem_certificates(text: &[u8]) -> Vec<Vec<u8>> {
    const BEGIN: &str = "-----BEGIN CERTIFICATE-----";
    const END: &str = "-----END CERTIFICATE-----";
    let text = String::from_utf8_lossy(text);
    let mut certs = Vec::new();
    let mut rest: &str = &text;
    while let Some(start) = rest.find(BEGIN) {
        let Some(len) = rest[start..].find(END) else {
            break;
        };
        let end = start + len + END.len();
        if let Ok(p) = pem::parse(&rest[start..end]) {
            certs.push(p.into_contents());
        }
        rest = &rest[end..];
    }
    certs
}

/// A JKS store with every certificate of `bundle` as a trusted certificate entry: the system
/// roots as `system-ca-<n>`, the last one (the broker CA) as `agent-broker-ca`.
pub fn jvm_trust_store(bundle: &[u8], created: SystemTime) -> Result<Vec<u8>, LaunchError> {
    let err =
        |e: jks::KeyStoreError| LaunchError::Invalid(format!("building the JVM trust store: {e}"));
    let certs = pem_certificates(bundle);
    let last = certs.len().saturating_sub(1);
    let mut store = jks::KeyStore::new();
    for (i, der) in certs.into_iter().enumerate() {
        let alias = if i == last {
            "agent-broker-ca".to_string()
        } else {
            format!("system-ca-{i}")
        };
        let entry = jks::TrustedCertificateEntry {
            creation_time: created,
            certificate: jks::Certificate {
                cert_type: "X.509".into(),
                content: der,
            },
        };
        store
            .set_trusted_certificate_entry(&alias, entry)
            .map_err(err)?;
    }
    let mut out = Vec::new();
    store.store(&mut out, JKS_PASSWORD).map_err(err)?;
    Ok(out)
}

/// OpenSSL's hash of the certificate's subject (`openssl x509 -subject_hash`: SHA-1 of the
/// canonical name, the name of the link a CA directory finds it by).
fn subject_hash(pem: &str) -> Result<String, String> {
    let mut child = Command::new("openssl")
        .args(["x509", "-noout", "-subject_hash"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .map_err(|e| format!("cannot run openssl for the broker CA's subject hash: {e}"))?;
    if let Some(mut stdin) = child.stdin.take() {
        stdin
            .write_all(pem.as_bytes())
            .map_err(|e| format!("writing the broker CA to openssl: {e}"))?;
    }
    let out = child
        .wait_with_output()
        .map_err(|e| format!("waiting for openssl: {e}"))?;
    let text = String::from_utf8_lossy(&out.stdout);
    let hash = text.trim();
    if !out.status.success() || !is_subject_hash(hash) {
        return Err(format!(
            "openssl x509 -subject_hash failed ({}): {}",
            out.status,
            String::from_utf8_lossy(&out.stderr).trim()
        ));
    }
    Ok(hash.to_string())
}

fn is_subject_hash(s: &str) -> bool {
    s.len() == 8 && s.bytes().all(|b| b.is_ascii_hexdigit())
}

/// The `cacerts` files JVMs on this host read, canonical and without duplicates: the system
/// stores, `$JAVA_HOME`'s, the one of the `java` first on `PATH`, and each JDK's under
/// /usr/lib/jvm (`lib/security/cacerts`, or `jre/lib/security/cacerts` for Java 8).
pub fn jvm_cacerts_paths(java_home: Option<&OsStr>, path: Option<&OsStr>) -> Vec<PathBuf> {
    let mut homes: Vec<PathBuf> = Vec::new();
    if let Some(home) = java_home.filter(|h| !h.is_empty()) {
        homes.push(PathBuf::from(home));
    }
    if let Some(java) = path.and_then(|p| {
        std::env::split_paths(p)
            .map(|dir| dir.join("java"))
            .find(|j| j.is_file())
    }) && let Ok(real) = fs::canonicalize(java)
        && let Some(home) = real.parent().and_then(Path::parent)
    {
        homes.push(home.to_path_buf());
    }
    if let Ok(dir) = fs::read_dir(JVM_DIR) {
        let mut jdks: Vec<PathBuf> = dir.flatten().map(|e| e.path()).collect();
        jdks.sort();
        homes.extend(jdks);
    }
    let mut candidates: Vec<PathBuf> = JVM_SYSTEM_CACERTS.iter().map(PathBuf::from).collect();
    for home in homes {
        candidates.push(home.join("lib/security/cacerts"));
        candidates.push(home.join("jre/lib/security/cacerts"));
    }
    let mut found: Vec<PathBuf> = Vec::new();
    for candidate in candidates {
        if let Ok(real) = fs::canonicalize(&candidate)
            && real.is_file()
            && !found.contains(&real)
        {
            found.push(real);
        }
    }
    found
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A self-signed certificate (public data, no key) whose subject is
    /// `CN=agent-broker test CA, O=agent-broker`; OpenSSL's subject hash of it is `bff3fc92`.
    const TEST_CA: &str = "-----BEGIN CERTIFICATE-----
MIIBwjCCAWmgAwIBAgIUEqDZFr+9AZ+n25iR7sygcUIOudUwCgYIKoZIzj0EAwIw
NjEdMBsGA1UEAwwUYWdlbnQtYnJva2VyIHRlc3QgQ0ExFTATBgNVBAoMDGFnZW50
LWJyb2tlcjAgFw0yNjEyMDMxMjIwMTVaGA8yMTI2MTEwOTEyMjAxNVowNjEdMBsG
A1UEAwwUYWdlbnQtYnJva2VyIHRlc3QgQ0ExFTATBgNVBAoMDGFnZW50LWJyb2tl
cjBZMBMGByqGSM49AgEGCCqGSM49AwEHA0IABJPUHpe0msp2cYxRfDYiVBLJdH5A
ufaPGFhCUH/7pMQ/N1AeFPvYb9kZMbnmPnFixwGvmjPF1tu9tLcvguy+ahijUzBR
MB0GA1UdDgQWBBSAI2TLxw5+yuYAJYDSl6O5tI2AZTAfBgNVHSMEGDAWgBSAI2TL
xw5+yuYAJYDSl6O5tI2AZTAPBgNVHRMBAf8EBTADAQH/MAoGCCqGSM49BAMCA0cA
MEQCIFqbb1uqTxm1oKMH8KkOI2fWTnHz+KFWNpcGt8qZ57VUAiBH32DLr661PtSc
ghcgmsOmKa3erQWgYBBw1MSSoGI3XA==
-----END CERTIFICATE-----
";

    #[test]
    fn merged_bundle_ends_with_the_broker_ca() {
        let pem = "-----BEGIN CERTIFICATE-----\nMIIB\n-----END CERTIFICATE-----";
        let bundle = merged_ca_bundle(pem);
        let text = String::from_utf8(bundle).expect("utf8");
        assert!(text.ends_with(&format!("{pem}\n")));
    }

    #[test]
    fn the_subject_hash_is_openssls() {
        assert_eq!(subject_hash(TEST_CA).as_deref(), Ok("bff3fc92"));
        assert!(subject_hash("not a certificate").is_err());
    }

    #[test]
    fn the_jvm_store_holds_every_certificate_of_the_bundle() {
        let unreadable = "-----BEGIN CERTIFICATE-----\nnot base64!\n-----END CERTIFICATE-----\n";
        let bundle = format!("{unreadable}{TEST_CA}# agent-broker CA\n{TEST_CA}");
        let bytes = jvm_trust_store(bundle.as_bytes(), SystemTime::now()).expect("store");
        let mut store = jks::KeyStore::new();
        store.load(&bytes[..], JKS_PASSWORD).expect("a JKS store");
        let mut aliases = store.aliases();
        aliases.sort();
        assert_eq!(aliases, ["agent-broker-ca", "system-ca-0"]);
        let broker = store
            .get_trusted_certificate_entry("agent-broker-ca")
            .expect("the broker CA entry");
        assert_eq!(
            broker.certificate.content,
            pem_certificates(TEST_CA.as_bytes())[0]
        );
        assert_eq!(broker.certificate.cert_type, "X.509");
    }

    #[test]
    fn jvm_stores_are_found_through_java_home_and_path_once_each() {
        let dir = tempfile::tempdir().expect("temp dir");
        let jdk = dir.path().join("jdk");
        fs::create_dir_all(jdk.join("bin")).expect("bin");
        fs::create_dir_all(jdk.join("lib/security")).expect("lib/security");
        fs::write(jdk.join("bin/java"), "").expect("java");
        let store = dir.path().join("store");
        fs::write(&store, "").expect("store");
        std::os::unix::fs::symlink(&store, jdk.join("lib/security/cacerts")).expect("link");
        let bin = dir.path().join("bin");
        fs::create_dir_all(&bin).expect("bin");
        std::os::unix::fs::symlink(jdk.join("bin/java"), bin.join("java")).expect("link");
        let store = fs::canonicalize(&store).expect("canonical");

        let by_path = jvm_cacerts_paths(None, Some(bin.as_os_str()));
        assert_eq!(
            by_path.iter().filter(|p| **p == store).count(),
            1,
            "{by_path:?}"
        );
        let both = jvm_cacerts_paths(Some(jdk.as_os_str()), Some(bin.as_os_str()));
        assert_eq!(both.iter().filter(|p| **p == store).count(), 1, "{both:?}");
        let neither = jvm_cacerts_paths(None, None);
        assert!(!neither.contains(&store), "{neither:?}");
    }

    #[test]
    fn only_runtimes_that_ignore_the_system_paths_get_a_variable() {
        for overriding in ["REQUESTS_CA_BUNDLE", "CURL_CA_BUNDLE", "GIT_SSL_CAINFO"] {
            assert!(!CA_ENV.contains(&overriding), "{overriding}");
        }
        assert!(CA_ENV.contains(&"NODE_EXTRA_CA_CERTS"));
    }
}
