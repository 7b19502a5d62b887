//! The primitives SigV4 is built from: HMAC-SHA256 (RFC 2104, over the workspace's `sha2`),
//! SHA-256 in lowercase hex, and a comparison whose time does not depend on where two
//! signatures first differ.

use data_encoding::HEXLOWER;
use sha2::{Digest as _, Sha256};
use zeroize::Zeroizing;

/// SHA-256's block size, in bytes: HMAC pads its key to this length.
const BLOCK: usize = 64;

/// HMAC-SHA256, fed incrementally. Its key schedule is zeroized on drop.
pub(crate) struct HmacSha256 {
    inner: Sha256,
    outer_key: Zeroizing<[u8; BLOCK]>,
}

impl HmacSha256 {
    pub(crate) fn new(key: &[u8]) -> Self {
        let mut block = Zeroizing::new([0u8; BLOCK]);
        if key.len() > BLOCK {
            let hashed: Zeroizing<[u8; 32]> = Zeroizing::new(Sha256::digest(key).into());
            block[..32].copy_from_slice(&hashed[..]);
        } else {
            block[..key.len()].copy_from_slice(key);
        }
        let mut inner_key = Zeroizing::new([0u8; BLOCK]);
        let mut outer_key = Zeroizing::new([0u8; BLOCK]);
        for i in 0..BLOCK {
            inner_key[i] = block[i] ^ 0x36;
            outer_key[i] = block[i] ^ 0x5c;
        }
        let mut inner = Sha256::new();
        inner.update(&inner_key[..]);
        Self { inner, outer_key }
    }

    pub(crate) fn update(&mut self, data: &[u8]) {
        self.inner.update(data);
    }

    pub(crate) fn finalize(self) -> [u8; 32] {
        let inner: [u8; 32] = self.inner.finalize().into();
        let mut outer = Sha256::new();
        outer.update(&self.outer_key[..]);
        outer.update(inner);
        outer.finalize().into()
    }
}

/// HMAC-SHA256 of `data` under `key`, in one call.
pub(crate) fn hmac(key: &[u8], data: &[u8]) -> [u8; 32] {
    let mut mac = HmacSha256::new(key);
    mac.update(data);
    mac.finalize()
}

/// Lowercase hex of `bytes`, as SigV4 writes hashes and signatures.
pub(crate) fn hex(bytes: &[u8]) -> String {
    HEXLOWER.encode(bytes)
}

/// SHA-256 of `data` in lowercase hex: a payload hash as `x-amz-content-sha256` carries it.
pub fn hex_sha256(data: &[u8]) -> String {
    hex(&Sha256::digest(data))
}

/// Whether `a` and `b` are equal, in time that depends on their lengths only.
pub(crate) fn constant_time_eq(a: &[u8], b: &[u8]) -> bool {
    if a.len() != b.len() {
        return false;
    }
    let diff = a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y));
    std::hint::black_box(diff) == 0
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hmac_matches_rfc_4231() {
        // Test case 1.
        assert_eq!(
            hex(&hmac(&[0x0b; 20], b"Hi There")),
            "b0344c61d8db38535ca8afceaf0bf12b881dc200c9833da726e9376c2e32cff7"
        );
        // Test case 2: a key shorter than the output.
        assert_eq!(
            hex(&hmac(b"Jefe", b"what do ya want for nothing?")),
            "5bdcc146bf60754e6a042426089575c75a003f089d2739839dec58b964ec3843"
        );
        // Test case 6: a key longer than the block, hashed first.
        assert_eq!(
            hex(&hmac(
                &[0xaa; 131],
                b"Test Using Larger Than Block-Size Key - Hash Key First"
            )),
            "60e431591ee0b67f0d8a26aacbf5b77f8e0bc6213728c5140546040f0ee37f54"
        );
    }

    #[test]
    fn incremental_hmac_equals_one_shot() {
        let mut mac = HmacSha256::new(b"key");
        mac.update(b"The quick brown fox ");
        mac.update(b"jumps over the lazy dog");
        assert_eq!(
            hex(&mac.finalize()),
            "f7bc83f430538424b13298e6aa6fb143ef4d59a14946175997479dbc2d1a3cd8"
        );
    }

    #[test]
    fn empty_hash_and_comparison() {
        assert_eq!(
            hex_sha256(b""),
            "e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855"
        );
        assert!(constant_time_eq(b"abc", b"abc"));
        assert!(!constant_time_eq(b"abc", b"abd"));
        assert!(!constant_time_eq(b"abc", b"ab"));
        assert!(constant_time_eq(b"", b""));
    }
}
