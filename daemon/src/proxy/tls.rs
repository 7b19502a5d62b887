//! The broker's local CA and the leaf certificates it mints for intercepted connections.
//!
//! One CA (ECDSA P-256), created on first start; its private key is sealed in the vault by the
//! caller, its certificate is public. Leaves are minted per server name (a DNS name from the SNI,
//! or the original IP when the client sent none), all with one leaf key distinct from the CA
//! key, and cached (bounded) as ready rustls server configs.
//!
//! This module never sees a credential; the only secret it holds is the CA key.

use std::{
    collections::{HashMap, VecDeque},
    net::IpAddr,
    sync::{Arc, Mutex},
    time::Duration,
};

use data_encoding::HEXLOWER;
use rcgen::{
    BasicConstraints, CertificateParams, DistinguishedName, DnType, ExtendedKeyUsagePurpose, IsCa,
    Issuer, KeyPair, KeyUsagePurpose, SanType,
};
use rustls::{
    ServerConfig,
    pki_types::{CertificateDer, PrivateKeyDer, PrivatePkcs8KeyDer},
};
use sha2::{Digest as _, Sha256};
use zeroize::Zeroizing;

/// How many minted server configs are kept.
const LEAF_CACHE_CAPACITY: usize = 1024;
/// Validity of the CA certificate.
const CA_VALIDITY: Duration = Duration::from_secs(10 * 365 * 24 * 3600);
/// Validity of a leaf; short, since leaves are cheap to mint again.
const LEAF_VALIDITY: Duration = Duration::from_secs(7 * 24 * 3600);
/// Allowance for clocks that are a little behind.
const BACKDATE: Duration = Duration::from_secs(3600);

/// Errors of this module.
#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    #[error("cannot generate a key pair")]
    KeyGen(#[source] rcgen::Error),
    #[error("cannot build certificate for {what}")]
    Cert {
        what: String,
        #[source]
        source: rcgen::Error,
    },
    #[error("the stored broker CA is unusable: {0}")]
    BadCa(String),
    #[error("cannot build a TLS server config for {name}")]
    ServerConfig {
        name: String,
        #[source]
        source: rustls::Error,
    },
    #[error("invalid server name {0:?} for a leaf certificate")]
    BadName(String),
}

/// The broker CA: issues leaves.
pub struct BrokerCa {
    issuer: Issuer<'static, KeyPair>,
    cert_pem: String,
    cert_der: CertificateDer<'static>,
}

impl BrokerCa {
    /// Creates a new CA. Returns it and its private key as PKCS#8 PEM, for the caller to seal.
    pub fn generate() -> Result<(Self, Zeroizing<String>), TlsError> {
        let key =
            KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256).map_err(TlsError::KeyGen)?;
        let mut params = CertificateParams::default();
        let mut dn = DistinguishedName::new();
        // A subject of its own: with several broker CAs on a host over time (a reinstall, a
        // new state dir, a second brokerd), a client must never build a chain to another one.
        let key_id = Sha256::digest(key.public_key_raw());
        dn.push(
            DnType::CommonName,
            format!("agent-broker local CA {}", HEXLOWER.encode(&key_id[..8])),
        );
        dn.push(DnType::OrganizationName, "agent-broker");
        params.distinguished_name = dn;
        params.is_ca = IsCa::Ca(BasicConstraints::Constrained(0));
        params.key_usages = vec![
            KeyUsagePurpose::KeyCertSign,
            KeyUsagePurpose::CrlSign,
            KeyUsagePurpose::DigitalSignature,
        ];
        let now = time::OffsetDateTime::now_utc();
        params.not_before = now - BACKDATE;
        params.not_after = now + CA_VALIDITY;
        let cert = params.self_signed(&key).map_err(|source| TlsError::Cert {
            what: "the broker CA".into(),
            source,
        })?;
        let key_pem = Zeroizing::new(key.serialize_pem());
        let cert_pem = cert.pem();
        let cert_der = cert.der().clone();
        Ok((
            Self {
                issuer: Issuer::new(params, key),
                cert_pem,
                cert_der,
            },
            key_pem,
        ))
    }

    /// Loads a CA from its certificate PEM and its private key PEM.
    pub fn load(cert_pem: &str, key_pem: &str) -> Result<Self, TlsError> {
        let key =
            KeyPair::from_pem(key_pem).map_err(|e| TlsError::BadCa(format!("private key: {e}")))?;
        let issuer = Issuer::from_ca_cert_pem(cert_pem, key)
            .map_err(|e| TlsError::BadCa(format!("certificate: {e}")))?;
        let der = rustls::pki_types::pem::PemObject::from_pem_slice(cert_pem.as_bytes())
            .map_err(|e| TlsError::BadCa(format!("certificate PEM: {e}")))?;
        Ok(Self {
            issuer,
            cert_pem: cert_pem.to_string(),
            cert_der: der,
        })
    }

    /// The CA certificate in PEM, for trust stores.
    pub fn cert_pem(&self) -> &str {
        &self.cert_pem
    }

    /// The CA certificate in DER.
    #[cfg(any(test, feature = "fuzzing"))]
    pub fn cert_der(&self) -> &CertificateDer<'static> {
        &self.cert_der
    }
}

/// A name a leaf is minted for.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub enum LeafName {
    Dns(String),
    Ip(IpAddr),
}

impl std::fmt::Display for LeafName {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Self::Dns(d) => f.write_str(d),
            Self::Ip(ip) => ip.fmt(f),
        }
    }
}

/// Mints and caches leaf server configs.
pub struct LeafMinter {
    ca: BrokerCa,
    /// One key for all leaves (minting is then one signature, no key generation).
    leaf_key: KeyPair,
    leaf_key_der: PrivatePkcs8KeyDer<'static>,
    cache: Mutex<LeafCache>,
}

#[derive(Default)]
struct LeafCache {
    configs: HashMap<LeafName, Arc<ServerConfig>>,
    order: VecDeque<LeafName>,
}

impl LeafMinter {
    /// A minter with a fresh leaf key.
    pub fn new(ca: BrokerCa) -> Result<Self, TlsError> {
        let leaf_key =
            KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256).map_err(TlsError::KeyGen)?;
        let leaf_key_der = PrivatePkcs8KeyDer::from(leaf_key.serialize_der());
        Ok(Self {
            ca,
            leaf_key,
            leaf_key_der,
            cache: Mutex::new(LeafCache::default()),
        })
    }

    /// The CA the leaves chain to.
    pub fn ca(&self) -> &BrokerCa {
        &self.ca
    }

    /// A server config presenting a leaf for `name`, offering h2 and http/1.1 by ALPN.
    pub fn server_config(&self, name: &LeafName) -> Result<Arc<ServerConfig>, TlsError> {
        if let Some(c) = self
            .cache
            .lock()
            .ok()
            .and_then(|c| c.configs.get(name).cloned())
        {
            crate::metrics::global().leaf_cache(true);
            return Ok(c);
        }
        crate::metrics::global().leaf_cache(false);
        let config = Arc::new(self.mint(name)?);
        if let Ok(mut cache) = self.cache.lock() {
            if cache.configs.len() >= LEAF_CACHE_CAPACITY
                && let Some(old) = cache.order.pop_front()
            {
                cache.configs.remove(&old);
            }
            if cache.configs.insert(name.clone(), config.clone()).is_none() {
                cache.order.push_back(name.clone());
            }
            crate::metrics::global().leaf_cache_size(cache.configs.len());
        }
        Ok(config)
    }

    /// A leaf for `name`, signed by the CA, naming the CA's key (authority key identifier) so
    /// clients pick the right CA even beside another with a similar name.
    fn leaf(&self, name: &LeafName) -> Result<rcgen::Certificate, TlsError> {
        let san = match name {
            LeafName::Dns(d) => SanType::DnsName(
                d.clone()
                    .try_into()
                    .map_err(|_| TlsError::BadName(d.clone()))?,
            ),
            LeafName::Ip(ip) => SanType::IpAddress(*ip),
        };
        let mut params = CertificateParams::default();
        let mut dn = DistinguishedName::new();
        dn.push(DnType::CommonName, name.to_string());
        params.distinguished_name = dn;
        params.subject_alt_names = vec![san];
        params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ServerAuth];
        params.key_usages = vec![KeyUsagePurpose::DigitalSignature];
        params.is_ca = IsCa::ExplicitNoCa;
        params.use_authority_key_identifier_extension = true;
        let now = time::OffsetDateTime::now_utc();
        params.not_before = now - BACKDATE;
        params.not_after = now + LEAF_VALIDITY;
        params
            .signed_by(&self.leaf_key, &self.ca.issuer)
            .map_err(|source| TlsError::Cert {
                what: format!("leaf {name}"),
                source,
            })
    }

    fn mint(&self, name: &LeafName) -> Result<ServerConfig, TlsError> {
        let leaf = self.leaf(name)?;
        let chain = vec![leaf.der().clone(), self.ca.cert_der.clone()];
        let key = PrivateKeyDer::Pkcs8(self.leaf_key_der.clone_key());
        let mut config = ServerConfig::builder_with_provider(crypto_provider())
            .with_safe_default_protocol_versions()
            .map_err(|source| TlsError::ServerConfig {
                name: name.to_string(),
                source,
            })?
            .with_no_client_auth()
            .with_single_cert(chain, key)
            .map_err(|source| TlsError::ServerConfig {
                name: name.to_string(),
                source,
            })?;
        config.alpn_protocols = vec![b"h2".to_vec(), b"http/1.1".to_vec()];
        Ok(config)
    }
}

/// The rustls crypto provider used everywhere in brokerd.
pub fn crypto_provider() -> Arc<rustls::crypto::CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ca_round_trips_through_pem() {
        let (ca, key_pem) = BrokerCa::generate().expect("generate");
        let again = BrokerCa::load(ca.cert_pem(), &key_pem).expect("load");
        assert_eq!(ca.cert_der(), again.cert_der());
    }

    #[test]
    fn leaves_are_cached_and_chain_to_the_ca() {
        let (ca, _) = BrokerCa::generate().expect("generate");
        let minter = LeafMinter::new(ca).expect("minter");
        let name = LeafName::Dns("api.example.test".into());
        let a = minter.server_config(&name).expect("mint");
        let b = minter.server_config(&name).expect("cached");
        assert!(Arc::ptr_eq(&a, &b));
        assert_eq!(a.alpn_protocols, vec![b"h2".to_vec(), b"http/1.1".to_vec()]);
        let ip = minter
            .server_config(&LeafName::Ip("127.0.0.2".parse().expect("ip")))
            .expect("ip leaf");
        assert!(!Arc::ptr_eq(&a, &ip));
    }

    /// The value of the subject key identifier extension in `der`.
    fn subject_key_id(der: &[u8]) -> Option<Vec<u8>> {
        // OID 2.5.29.14, then OCTET STRING { OCTET STRING (20 bytes) }.
        let marker = [0x06, 0x03, 0x55, 0x1d, 0x0e, 0x04, 0x16, 0x04, 0x14];
        let at = der.windows(marker.len()).position(|w| w == marker)? + marker.len();
        der.get(at..at + 20).map(<[u8]>::to_vec)
    }

    #[test]
    fn each_ca_has_a_subject_of_its_own_and_leaves_name_its_key() {
        let (a, _) = BrokerCa::generate().expect("generate");
        let (b, _) = BrokerCa::generate().expect("generate");
        let subject = |ca: &BrokerCa| {
            let der = ca.cert_der().to_vec();
            let prefix = b"agent-broker local CA ";
            let at = der
                .windows(prefix.len())
                .position(|w| w == prefix)
                .expect("the CA's name");
            der[at..at + prefix.len() + 16].to_vec()
        };
        assert_ne!(subject(&a), subject(&b), "two CAs share a subject");
        let key_id = subject_key_id(a.cert_der()).expect("the CA names its key");
        let minter = LeafMinter::new(a).expect("minter");
        let leaf = minter
            .leaf(&LeafName::Dns("api.example.test".into()))
            .expect("leaf");
        let der = leaf.der().to_vec();
        // OID 2.5.29.35: the authority key identifier, holding the CA's key id.
        assert!(der.windows(5).any(|w| w == [0x06, 0x03, 0x55, 0x1d, 0x23]));
        assert!(der.windows(20).any(|w| w == key_id.as_slice()));
    }

    #[test]
    fn garbage_ca_is_refused_with_a_reason() {
        let err = BrokerCa::load("not a cert", "not a key")
            .err()
            .expect("refused")
            .to_string();
        assert!(err.contains("stored broker CA is unusable"), "{err}");
    }
}
