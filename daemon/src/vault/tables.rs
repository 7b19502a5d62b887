//! The vault's on-disk layout: every redb table, and the byte layout of every record.
//!
//! All integers are big-endian. Each sealed record starts with a layout byte so a later format
//! can be told apart from this one.

use redb::TableDefinition;

/// Vault bookkeeping: [`FORMAT_KEY`] and [`KEY_CHECK_KEY`].
pub(super) const META: TableDefinition<&str, &[u8]> = TableDefinition::new("meta");
/// Secret name -> [`SecretRecord`].
pub(super) const SECRETS: TableDefinition<&str, &[u8]> = TableDefinition::new("secrets");
/// Internal blob name (e.g. the CA private key) -> [`Sealed`].
pub(super) const BLOBS: TableDefinition<&str, &[u8]> = TableDefinition::new("blobs");
/// Handle id -> handle record as JSON (not secret: holds the token's hash, never the token).
pub(super) const HANDLES: TableDefinition<&str, &[u8]> = TableDefinition::new("handles");
/// SHA-256 of a handle token -> handle id.
pub(super) const HANDLE_TOKENS: TableDefinition<&[u8], &str> =
    TableDefinition::new("handle_tokens");

/// `META` key of the vault format number, a u64.
pub(super) const FORMAT_KEY: &str = "format";
/// `META` key of the sealed key-check record.
pub(super) const KEY_CHECK_KEY: &str = "key_check";
/// The format this code writes and reads.
pub(super) const FORMAT: u64 = 1;

/// Plaintext of the key-check record; opening it proves the master key is the vault's.
pub(super) const KEY_CHECK_PLAINTEXT: &[u8] = b"agent-broker vault key check v1";

pub(super) const NONCE_LEN: usize = 12;
pub(super) const TAG_LEN: usize = 16;

const SEALED_LAYOUT: u8 = 1;
const SECRET_LAYOUT: u8 = 1;

/// AES-256-GCM output: nonce and ciphertext with its tag appended.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(super) struct Sealed {
    pub nonce: [u8; NONCE_LEN],
    pub ciphertext: Vec<u8>,
}

impl Sealed {
    /// `[layout=1][nonce 12][ciphertext+tag]`
    pub fn encode(&self) -> Vec<u8> {
        let mut out = Vec::with_capacity(1 + NONCE_LEN + self.ciphertext.len());
        out.push(SEALED_LAYOUT);
        self.encode_body(&mut out);
        out
    }

    pub fn decode(bytes: &[u8]) -> Option<Self> {
        match bytes.split_first() {
            Some((&SEALED_LAYOUT, body)) => Self::decode_body(body),
            _ => None,
        }
    }

    fn encode_body(&self, out: &mut Vec<u8>) {
        out.extend_from_slice(&self.nonce);
        out.extend_from_slice(&self.ciphertext);
    }

    fn decode_body(body: &[u8]) -> Option<Self> {
        let (nonce, ciphertext) = body.split_first_chunk::<NONCE_LEN>()?;
        if ciphertext.len() < TAG_LEN {
            return None;
        }
        Some(Self {
            nonce: *nonce,
            ciphertext: ciphertext.to_vec(),
        })
    }
}

/// The latest version of one secret.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(super) struct SecretRecord {
    pub version: u64,
    pub created_unix: u64,
    pub updated_unix: u64,
    pub sealed: Sealed,
}

impl SecretRecord {
    /// `[layout=1][version u64][created u64][updated u64][nonce 12][ciphertext+tag]`
    pub fn encode(&self) -> Vec<u8> {
        let mut out = Vec::with_capacity(1 + 24 + NONCE_LEN + self.sealed.ciphertext.len());
        out.push(SECRET_LAYOUT);
        out.extend_from_slice(&self.version.to_be_bytes());
        out.extend_from_slice(&self.created_unix.to_be_bytes());
        out.extend_from_slice(&self.updated_unix.to_be_bytes());
        self.sealed.encode_body(&mut out);
        out
    }

    pub fn decode(bytes: &[u8]) -> Option<Self> {
        let (&SECRET_LAYOUT, rest) = bytes.split_first()? else {
            return None;
        };
        let (version, rest) = rest.split_first_chunk::<8>()?;
        let (created, rest) = rest.split_first_chunk::<8>()?;
        let (updated, rest) = rest.split_first_chunk::<8>()?;
        Some(Self {
            version: u64::from_be_bytes(*version),
            created_unix: u64::from_be_bytes(*created),
            updated_unix: u64::from_be_bytes(*updated),
            sealed: Sealed::decode_body(rest)?,
        })
    }
}

/// Associated data of a secret version: `"agent-broker secret\0" name "\0" version(u64 BE)`.
/// Names cannot contain NUL, so the encoding is unambiguous.
pub(super) fn secret_aad(name: &str, version: u64) -> Vec<u8> {
    let mut aad = Vec::with_capacity(20 + name.len() + 1 + 8);
    aad.extend_from_slice(b"agent-broker secret\0");
    aad.extend_from_slice(name.as_bytes());
    aad.push(0);
    aad.extend_from_slice(&version.to_be_bytes());
    aad
}

/// Associated data of an internal blob: `"agent-broker blob\0" name`.
pub(super) fn blob_aad(name: &str) -> Vec<u8> {
    let mut aad = Vec::with_capacity(18 + name.len());
    aad.extend_from_slice(b"agent-broker blob\0");
    aad.extend_from_slice(name.as_bytes());
    aad
}

/// Associated data of the key-check record.
pub(super) const KEY_CHECK_AAD: &[u8] = b"agent-broker key check\0";

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn records_round_trip_and_refuse_short_input() {
        let sealed = Sealed {
            nonce: [7; NONCE_LEN],
            ciphertext: vec![9; TAG_LEN + 3],
        };
        assert_eq!(Sealed::decode(&sealed.encode()), Some(sealed.clone()));
        let rec = SecretRecord {
            version: 3,
            created_unix: 10,
            updated_unix: 20,
            sealed,
        };
        let bytes = rec.encode();
        assert_eq!(SecretRecord::decode(&bytes), Some(rec));
        for len in 0..bytes.len() - 3 {
            assert_eq!(SecretRecord::decode(&bytes[..len]), None, "prefix {len}");
        }
        assert_eq!(Sealed::decode(b""), None);
        assert_eq!(Sealed::decode(&[2; 40]), None);
    }

    #[test]
    fn aad_binds_name_and_version() {
        assert_ne!(secret_aad("A", 1), secret_aad("A", 2));
        assert_ne!(secret_aad("A", 1), secret_aad("B", 1));
        assert_ne!(secret_aad("A", 1), blob_aad("A"));
        assert_eq!(
            secret_aad("K", 1),
            b"agent-broker secret\0K\0\0\0\0\0\0\0\0\x01"
        );
    }
}
