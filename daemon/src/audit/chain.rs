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
                        after(prev, floor)
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

/// What a record follows, for messages.
fn after(prev: Link, floor: Link) -> String {
    match prev.seq {
        0 => "the start of the log".to_string(),
        seq if seq == floor.seq => format!("the retention floor (record {seq})"),
        seq => format!("record {seq}"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Records 1..=n, correctly chained; and the link of each.
    fn chain(n: u64) -> (Vec<(u64, Vec<u8>)>, Vec<Link>) {
        let mut prev = Link::ORIGIN;
        let mut records = Vec::new();
        let mut links = vec![Link::ORIGIN];
        for seq in 1..=n {
            let json = serde_json::to_vec(&AuditEvent {
                seq,
                time_ms: seq,
                ..AuditEvent::default()
            })
            .expect("json");
            let hash = record_hash(&prev.hash, seq, &json);
            records.push((seq, StoredRecord::encode(&prev.hash, &hash, &json)));
            prev = Link { seq, hash };
            links.push(prev);
        }
        (records, links)
    }

    fn first_bad(report: VerifyReport) -> (u64, String) {
        let bad = report.first_bad.expect("a bad record");
        (bad.seq, bad.problem)
    }

    #[test]
    fn an_intact_chain_verifies_from_its_floor() {
        let (records, links) = chain(5);
        let report = verify(Link::ORIGIN, links[5], records.clone());
        assert_eq!((report.records, report.first_bad), (5, None));
        let report = verify(links[2], links[5], records[2..].to_vec());
        assert_eq!((report.records, report.first_bad), (3, None));
        let report = verify(links[5], links[5], Vec::new());
        assert_eq!((report.records, report.first_bad), (0, None));
    }

    #[test]
    fn the_ends_of_the_chain_are_checked() {
        let (records, links) = chain(5);
        let wrong = Link {
            seq: 5,
            hash: [7; 32],
        };
        let (seq, problem) = first_bad(verify(Link::ORIGIN, wrong, records.clone()));
        assert_eq!(seq, 5, "{problem}");
        assert!(problem.contains("chain head"), "{problem}");

        let (seq, problem) = first_bad(verify(Link::ORIGIN, links[4], records.clone()));
        assert_eq!(seq, 5, "{problem}");
        assert!(problem.contains("past the chain head"), "{problem}");

        let forged_floor = Link {
            seq: 2,
            hash: [7; 32],
        };
        let (seq, problem) = first_bad(verify(forged_floor, links[5], records[2..].to_vec()));
        assert_eq!(seq, 3, "{problem}");
        assert!(problem.contains("retention floor (record 2)"), "{problem}");

        let (seq, problem) = first_bad(verify(links[2], links[5], records[1..].to_vec()));
        assert_eq!(seq, 2, "{problem}");
        assert!(problem.contains("retention floor"), "{problem}");
    }
}
