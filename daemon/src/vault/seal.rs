//! AES-256-GCM sealing with a fresh random 96-bit nonce per record.

use aes_gcm::aead::{AeadInOut, KeyInit};
use aes_gcm::{Aes256Gcm, Nonce};
use zeroize::Zeroizing;

use super::tables::{NONCE_LEN, Sealed, TAG_LEN};

/// Length of the master key in bytes (AES-256).
pub const MASTER_KEY_LEN: usize = 32;

/// The master key in memory, zeroized on drop.
pub(super) struct MasterKey(Zeroizing<[u8; MASTER_KEY_LEN]>);

impl MasterKey {
    pub fn from_bytes(bytes: Zeroizing<[u8; MASTER_KEY_LEN]>) -> Self {
        Self(bytes)
    }

    /// 32 bytes from the operating system's random source.
    pub fn generate() -> Result<Self, getrandom::Error> {
        let mut key = Zeroizing::new([0u8; MASTER_KEY_LEN]);
        getrandom::fill(key.as_mut_slice())?;
        Ok(Self(key))
    }

    pub fn bytes(&self) -> &[u8; MASTER_KEY_LEN] {
        &self.0
    }
}

/// Why sealing failed: only the random source can fail in practice.
#[derive(Debug)]
pub(super) enum SealError {
    Random(getrandom::Error),
    /// AES-GCM refused the input (longer than 64 GiB).
    TooLong,
}

/// The vault's cipher. `Aes256Gcm` zeroizes its key schedule on drop (feature `zeroize`).
pub(super) struct Cipher(Aes256Gcm);

impl Cipher {
    pub fn new(key: &MasterKey) -> Self {
        Self(Aes256Gcm::new(&(*key.bytes()).into()))
    }

    pub fn seal(&self, aad: &[u8], plaintext: &[u8]) -> Result<Sealed, SealError> {
        let mut nonce = [0u8; NONCE_LEN];
        getrandom::fill(&mut nonce).map_err(SealError::Random)?;
        // Capacity for the tag up front: the buffer never reallocates, so no copy of the
        // plaintext is left behind in freed memory; Zeroizing covers the error path.
        let mut buf = Zeroizing::new(Vec::with_capacity(plaintext.len() + TAG_LEN));
        buf.extend_from_slice(plaintext);
        self.0
            .encrypt_in_place(&Nonce::from(nonce), aad, &mut *buf)
            .map_err(|_| SealError::TooLong)?;
        Ok(Sealed {
            nonce,
            ciphertext: std::mem::take(&mut *buf),
        })
    }

    /// The plaintext, or `None` when the tag does not verify: wrong key, wrong associated data
    /// (a record moved to another name or version), or altered bytes.
    pub fn open(&self, aad: &[u8], sealed: &Sealed) -> Option<Zeroizing<Vec<u8>>> {
        let mut buf = Zeroizing::new(sealed.ciphertext.clone());
        self.0
            .decrypt_in_place(&Nonce::from(sealed.nonce), aad, &mut *buf)
            .ok()?;
        Some(buf)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cipher(byte: u8) -> Cipher {
        Cipher::new(&MasterKey::from_bytes(Zeroizing::new(
            [byte; MASTER_KEY_LEN],
        )))
    }

    #[test]
    fn seal_open_round_trip_with_fresh_nonces() {
        let c = cipher(1);
        let a = c.seal(b"aad", b"plaintext").expect("seal");
        let b = c.seal(b"aad", b"plaintext").expect("seal");
        assert_ne!(a.nonce, b.nonce);
        assert_ne!(a.ciphertext, b.ciphertext);
        assert_eq!(a.ciphertext.len(), 9 + TAG_LEN);
        let opened = c.open(b"aad", &a).expect("open");
        assert!(opened.as_slice() == b"plaintext");
    }

    #[test]
    fn open_fails_on_wrong_key_aad_or_bytes() {
        let c = cipher(1);
        let sealed = c.seal(b"aad", b"plaintext").expect("seal");
        assert!(cipher(2).open(b"aad", &sealed).is_none());
        assert!(c.open(b"other", &sealed).is_none());
        let mut flipped = sealed.clone();
        flipped.ciphertext[0] ^= 1;
        assert!(c.open(b"aad", &flipped).is_none());
        let mut nonce = sealed;
        nonce.nonce[0] ^= 1;
        assert!(c.open(b"aad", &nonce).is_none());
    }
}
