//! The audit log's on-disk layout: every redb table, the byte layout of every record, and the
//! hash that chains them.
//!
//! All integers are big-endian. A stored record is
//! `[layout=1][prev_hash 32][hash 32][event JSON]`, where the event JSON is
//! `serde_json::to_vec(&AuditEvent)` with `seq` set, exactly as it was when the record was
//! written, and
//!
//! ```text
//! hash = SHA-256( prev_hash (32 bytes) || seq (u64 BE, 8 bytes) || event JSON bytes )
//! ```
//!
//! `prev_hash` of the first record is 32 zero bytes. The hash covers the stored bytes, not a
//! re-serialization, so a record stays verifiable when `AuditEvent` later gains a field.

use redb::TableDefinition;
use sha2::{Digest as _, Sha256};

/// Bookkeeping: [`KIND_KEY`], [`FORMAT_KEY`], [`HEAD_KEY`], [`FLOOR_KEY`].
pub(super) const META: TableDefinition<&str, &[u8]> = TableDefinition::new("audit_meta");
/// seq -> [`StoredRecord`] bytes.
pub(super) const RECORDS: TableDefinition<u64, &[u8]> = TableDefinition::new("audit_records");

/// `META` key whose value, [`KIND`], says this file is an audit log (and not, say, the vault).
pub(super) const KIND_KEY: &str = "kind";
pub(super) const KIND: &[u8] = b"agent-broker audit log";
/// `META` key of the format number, a u64.
pub(super) const FORMAT_KEY: &str = "format";
/// The format this code writes and reads.
pub(super) const FORMAT: u64 = 1;
/// `META` key of the chain head: the last appended record, as a [`Link`].
pub(super) const HEAD_KEY: &str = "head";
/// `META` key of the retention floor: the last record retention removed, as a [`Link`]
/// (`seq` 0 and a zero hash while nothing was removed). Verification starts from it.
pub(super) const FLOOR_KEY: &str = "floor";

pub(super) const HASH_LEN: usize = 32;
pub(super) type Hash = [u8; HASH_LEN];

const RECORD_LAYOUT: u8 = 1;
const HEADER_LEN: usize = 1 + 2 * HASH_LEN;

/// A position in the chain: a record's seq and hash.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(super) struct Link {
    pub seq: u64,
    pub hash: Hash,
}

impl Link {
    /// Before record 1: head and floor of a new log, and record 1's `prev_hash`.
    pub const ORIGIN: Link = Link {
        seq: 0,
        hash: [0; HASH_LEN],
    };

    /// `[seq u64][hash 32]`
    pub fn encode(&self) -> [u8; 8 + HASH_LEN] {
        let mut out = [0; 8 + HASH_LEN];
        out[..8].copy_from_slice(&self.seq.to_be_bytes());
        out[8..].copy_from_slice(&self.hash);
        out
    }

    pub fn decode(bytes: &[u8]) -> Option<Self> {
        let (seq, hash) = bytes.split_first_chunk::<8>()?;
        Some(Self {
            seq: u64::from_be_bytes(*seq),
            hash: <Hash>::try_from(hash).ok()?,
        })
    }
}

/// One stored record, borrowed from its bytes.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(super) struct StoredRecord<'a> {
    pub prev_hash: Hash,
    pub hash: Hash,
    pub event_json: &'a [u8],
}

impl<'a> StoredRecord<'a> {
    pub fn encode(prev_hash: &Hash, hash: &Hash, event_json: &[u8]) -> Vec<u8> {
        let mut out = Vec::with_capacity(HEADER_LEN + event_json.len());
        out.push(RECORD_LAYOUT);
        out.extend_from_slice(prev_hash);
        out.extend_from_slice(hash);
        out.extend_from_slice(event_json);
        out
    }

    pub fn decode(bytes: &'a [u8]) -> Option<Self> {
        let (&RECORD_LAYOUT, rest) = bytes.split_first()? else {
            return None;
        };
        let (prev_hash, rest) = rest.split_first_chunk::<HASH_LEN>()?;
        let (hash, event_json) = rest.split_first_chunk::<HASH_LEN>()?;
        Some(Self {
            prev_hash: *prev_hash,
            hash: *hash,
            event_json,
        })
    }
}

/// The chain hash of record `seq` (see the module docs).
pub(super) fn record_hash(prev_hash: &Hash, seq: u64, event_json: &[u8]) -> Hash {
    let mut h = Sha256::new();
    h.update(prev_hash);
    h.update(seq.to_be_bytes());
    h.update(event_json);
    h.finalize().into()
}

/// Lowercase hex, for messages.
pub(super) fn hex(hash: &Hash) -> String {
    data_encoding::HEXLOWER.encode(hash)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn records_and_links_round_trip_and_refuse_short_input() {
        let bytes = StoredRecord::encode(&[1; 32], &[2; 32], b"{}");
        let rec = StoredRecord::decode(&bytes).expect("decodes");
        assert_eq!(rec.prev_hash, [1; 32]);
        assert_eq!(rec.hash, [2; 32]);
        assert_eq!(rec.event_json, b"{}");
        for len in 0..HEADER_LEN {
            assert_eq!(StoredRecord::decode(&bytes[..len]), None, "prefix {len}");
        }
        assert_eq!(StoredRecord::decode(&[2; 80]), None, "unknown layout");

        let link = Link {
            seq: 7,
            hash: [9; 32],
        };
        assert_eq!(Link::decode(&link.encode()), Some(link));
        assert_eq!(Link::decode(&link.encode()[..39]), None);
        assert_eq!(Link::decode(&[0; 41]), None);
    }

    #[test]
    fn hash_is_the_documented_encoding() {
        let mut input = vec![3u8; 32];
        input.extend_from_slice(&5u64.to_be_bytes());
        input.extend_from_slice(b"{\"seq\":5}");
        let expected: Hash = Sha256::digest(&input).into();
        assert_eq!(record_hash(&[3; 32], 5, b"{\"seq\":5}"), expected);
        assert_ne!(record_hash(&[3; 32], 6, b"{\"seq\":5}"), expected);
        assert_ne!(record_hash(&[4; 32], 5, b"{\"seq\":5}"), expected);
    }
}
