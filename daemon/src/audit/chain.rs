//! Checking the hash chain: pure, over the stored records in key order.

use agent_broker_protocol::{AuditEvent, BadRecord, VerifyReport};

use super::tables::{Link, StoredRecord, hex, record_hash};

/// Walks the records after `floor` (the retention floor) in key order and reports the first
/// one that was edited, removed or reordered, checking the last against `head`.
///
/// Per record, in this order:
/// 1. a seq gap after the previous record: the missing records were removed;
/// 2. the stored bytes do not decode, or the event's own `seq` is not its key: edited, or
///    moved (reordered);
/// 3. the hash does not match the record's contents: edited;
/// 4. the record's `prev_hash` is not the previous record's hash: the previous record was
///    rewritten with a recomputed hash (or this link was), named as the previous record; for
///    the first record after the floor, records before it were removed.
pub(super) fn verify<I>(floor: Link, head: Link, records: I) -> VerifyReport
where
    I: IntoIterator<Item = (u64, Vec<u8>)>,
{
    let mut checked = 0u64;
    let mut prev = floor;
    let bad = |checked: u64, seq: u64, problem: String| VerifyReport {
        records: checked,
        first_bad: Some(BadRecord { seq, problem }),
    };
    for (seq, bytes) in records {
        checked += 1;
        let expected = prev.seq.saturating_add(1);
        if seq < expected {
            return bad(
                checked,
                seq,
                format!(
                    "record {seq} is at or below the retention floor (record {}): it was inserted after retention removed it",
                    floor.seq
                ),
            );
        }
        if seq > expected {
            let missing = if seq - expected == 1 {
                format!("record {expected} is missing")
            } else {
                format!("records {expected}..={} are missing", seq - 1)
            };
            return bad(
                checked,
                expected,
                format!(
                    "{missing} (removed): record {seq} follows record {}",
                    prev.seq
                ),
            );
        }
        let Some(record) = StoredRecord::decode(&bytes) else {
            return bad(
                checked,
                seq,
                format!("record {seq} was edited: its stored bytes are malformed"),
            );
        };
        let event: AuditEvent = match serde_json::from_slice(record.event_json) {
            Ok(event) => event,
            Err(e) => {
                return bad(
                    checked,
                    seq,
                    format!("record {seq} was edited: its event is not valid JSON ({e})"),
                );
            }
        };
        if event.seq != seq {
            return bad(
                checked,
                seq,
                format!(
                    "record {seq} is out of order: position {seq} holds record {} (records were reordered or renumbered)",
                    event.seq
                ),
            );
        }
        if record_hash(&record.prev_hash, seq, record.event_json) != record.hash {
            return bad(
                checked,
                seq,
                format!("record {seq} was edited: its contents do not match its hash"),
            );
        }
        if record.prev_hash != prev.hash {
            return if prev.seq == floor.seq {
                bad(
                    checked,
                    seq,
                    format!(
                        "record {seq} does not chain to {}: records before it were removed or replaced",
                        if floor.seq == 0 {
                            "the start of the log".to_string()
                        } else {
                            format!("the retention floor (record {})", floor.seq)
                        }
                    ),
                )
            } else {
                bad(
                    checked,
                    prev.seq,
                    format!(
                        "record {} was rewritten: its hash {} is not the prev_hash {} stored in record {seq}",
                        prev.seq,
                        hex(&prev.hash),
                        hex(&record.prev_hash)
                    ),
                )
            };
        }
        prev = Link {
            seq,
            hash: record.hash,
        };
    }
    if prev.seq < head.seq {
        let first = prev.seq + 1;
        let missing = if head.seq == first {
            format!("record {first} is missing")
        } else {
            format!("records {first}..={} are missing", head.seq)
        };
        return bad(
            checked,
            first,
            format!(
                "{missing} (removed from the end): the chain head is record {}",
                head.seq
            ),
        );
    }
    if prev.seq > head.seq {
        return bad(
            checked,
            head.seq + 1,
            format!(
                "record {} is past the chain head (record {}): it was appended outside the broker",
                head.seq + 1,
                head.seq
            ),
        );
    }
    if prev.hash != head.hash {
        return bad(
            checked,
            prev.seq,
            format!(
                "record {} was rewritten: its hash does not match the chain head",
                prev.seq
            ),
        );
    }
    VerifyReport {
        records: checked,
        first_bad: None,
    }
}
