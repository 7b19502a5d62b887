//! The `audit` target: the audit record encoding and `logs verify` over corrupted stores.
//!
//! Input (read with [`Input`], so every input is a case): a byte for how many events (0 to
//! 12), a byte whose bits end a batch after event i (each batch one commit, as the writer
//! commits), each event's fields, then up to 8 corruptions, each an op byte and its operands:
//!
//! | op % 9 | corruption                                                              |
//! |--------|-------------------------------------------------------------------------|
//! | 0      | flip one bit of a stored record                                         |
//! | 1      | truncate a stored record                                                |
//! | 2      | delete a record                                                         |
//! | 3      | swap two records' bytes (reordered)                                     |
//! | 4      | move a record to another seq (renumbered)                               |
//! | 5      | edit a record's event and recompute its hash (a careful forger)         |
//! | 6      | flip one bit of the redb file                                           |
//! | 7      | truncate the redb file                                                  |
//! | 8      | zero a range of the redb file                                           |
//!
//! Record corruptions are written through redb, leaving the chain head and floor alone (an
//! edit behind the broker's back); file corruptions are applied to the file after that.
//!
//! Invariants:
//! - nothing panics (brokerd's open refuses a file redb cannot read);
//! - every event reads back as appended, with seq 1, 2, ... (the record encoding round-trips);
//! - the untouched log opens and verifies Ok, every record counted;
//! - after record corruptions only: verify is Ok exactly when the stored records are, byte for
//!   byte, the committed ones (so every edit, removal or reordering is reported);
//! - after a file corruption, Ok means the records are the committed ones, or the log as it
//!   was at an earlier commit: redb keeps the commit before the last as its fallback, and a
//!   flip that breaks the last commit's header slot opens the file at that commit. The chain
//!   cannot tell that log from one that was never longer (the limitation the audit module's
//!   docs name: a copy of the head kept elsewhere catches it).
//!
//! Each input gets its own state directory, on tmpfs (`/dev/shm`) when there is one: redb's
//! non-durable commits never reach the file that a reopen reads, so the real (fsync'd) commits
//! are kept and made cheap instead.

use std::path::{Path, PathBuf};

use agent_broker::fuzzing::audit::{self, RawRecord, Verified};
use agent_broker_protocol::{AuditEvent, Decision, EventKind, RequestOutcome, Side};
use sha2::{Digest as _, Sha256};

use crate::input::Input;

/// The stored record layout (audit/tables.rs): `[layout 1][prev_hash 32][hash 32][event JSON]`.
const HEADER_LEN: usize = 1 + 32 + 32;

fn event(input: &mut Input<'_>) -> AuditEvent {
    let shape = input.u8();
    let kinds = [
        EventKind::Request,
        EventKind::Denial,
        EventKind::TlsFailure,
        EventKind::HandleMisuse,
        EventKind::Attach,
        EventKind::Detach,
        EventKind::PolicyReload,
    ];
    let mut event = AuditEvent {
        time_ms: u64::from(input.u32()),
        kind: Some(kinds[usize::from(shape) % kinds.len()]),
        cgroup: Some(input.text(24)),
        method: Some(input.text(12)),
        host: Some(input.text(32)),
        path: Some(input.text(48)),
        status: Some(input.u16()),
        bytes_in: u64::from(input.u16()),
        bytes_out: u64::from(input.u32()),
        ..AuditEvent::default()
    };
    if shape & 0x08 != 0 {
        event.decision = Some(if shape & 0x10 != 0 {
            Decision::Allow
        } else {
            Decision::Deny
        });
        event.reason = Some(input.text(64));
        event.side = Some([Side::Agent, Side::Upstream, Side::Broker][usize::from(shape >> 6) % 3]);
    }
    if shape & 0x20 != 0 {
        event.request_id = Some(u64::from(input.u32()));
        event.outcome = Some(RequestOutcome::Completed);
        event.secrets = vec![input.text(16), input.text(16)];
        event.tokens = Some(u64::from(input.u16()));
    }
    event
}

/// Where each input's state directory goes: tmpfs when there is one.
fn scratch_base() -> PathBuf {
    let shm = Path::new("/dev/shm");
    if shm.is_dir() {
        shm.to_path_buf()
    } else {
        std::env::temp_dir()
    }
}

/// The record at index `i % len`, if any.
fn pick(records: &[RawRecord], i: u8) -> Option<usize> {
    (!records.is_empty()).then(|| usize::from(i) % records.len())
}

/// Edits record `at`'s event JSON (flips a byte) and recomputes its hash over the documented
/// layout, keeping its prev_hash: only the chain (the next record's prev_hash, or the head)
/// can tell.
fn forge(record: &mut RawRecord, at: u16) {
    let (seq, bytes) = record;
    if bytes.len() <= HEADER_LEN {
        return;
    }
    let json_len = bytes.len() - HEADER_LEN;
    let i = HEADER_LEN + usize::from(at) % json_len;
    bytes[i] ^= 0x01;
    let mut h = Sha256::new();
    h.update(&bytes[1..33]);
    h.update(seq.to_be_bytes());
    h.update(&bytes[HEADER_LEN..]);
    let hash: [u8; 32] = h.finalize().into();
    bytes[33..HEADER_LEN].copy_from_slice(&hash);
}

/// brokerd opens a file it has not checked yet under `catch_unwind` (redb may panic on a file
/// altered outside it; store.rs turns that into a refusal). libFuzzer's panic hook aborts on
/// any panic, caught or not, so panics raised inside redb's own code skip that hook: one
/// brokerd did not catch still unwinds out of the target, where libFuzzer reports it.
fn let_redb_panics_unwind() {
    static HOOK: std::sync::Once = std::sync::Once::new();
    HOOK.call_once(|| {
        let previous = std::panic::take_hook();
        std::panic::set_hook(Box::new(move |info| {
            let in_redb = info.location().is_some_and(|l| l.file().contains("/redb-"));
            if !in_redb {
                previous(info);
            }
        }));
    });
}

pub fn audit(data: &[u8]) {
    let_redb_panics_unwind();
    let mut input = Input::new(data);
    let n = usize::from(input.u8() % 13);
    let cuts = input.u16();
    let mut batches: Vec<Vec<AuditEvent>> = vec![Vec::new()];
    let mut appended = Vec::new();
    for i in 0..n {
        let e = event(&mut input);
        appended.push(e.clone());
        batches.last_mut().expect("a batch").push(e);
        if cuts & (1 << i) != 0 {
            batches.push(Vec::new());
        }
    }
    batches.retain(|b| !b.is_empty());
    // The committed seq at the end of each batch (0: the empty log).
    let mut boundaries = vec![0usize];
    for b in &batches {
        boundaries.push(boundaries.last().copied().unwrap_or(0) + b.len());
    }

    let dir = tempfile::Builder::new()
        .prefix("agent-broker-fuzz-audit")
        .tempdir_in(scratch_base())
        .expect("a state directory");
    let file = dir.path().join("audit.redb");

    let read_back = audit::append_batches(dir.path(), batches).expect("appending to a fresh log");
    assert_eq!(read_back.len(), appended.len(), "events read back");
    for (i, (got, mut want)) in read_back.iter().zip(appended).enumerate() {
        want.seq = i as u64 + 1;
        assert!(
            *got == want,
            "event {} does not read back as appended",
            i + 1
        );
    }

    let committed = match audit::open_and_verify(dir.path()) {
        Verified::Report { report, records } => {
            assert_eq!(report.first_bad, None, "an untouched log does not verify");
            assert_eq!(report.records, n as u64, "records verified");
            assert_eq!(records.len(), n, "records stored");
            records
        }
        Verified::Refused(e) => panic!("an untouched log is refused: {e}"),
    };
    assert_eq!(
        audit::read_records(&file).expect("read the records"),
        committed,
        "the records read straight from the file"
    );

    let mut records = committed.clone();
    let mut file_ops = Vec::new();
    for _ in 0..8 {
        if input.is_empty() {
            break;
        }
        let op = input.u8() % 9;
        match op {
            0 => {
                let (i, at, bit) = (input.u8(), input.u16(), input.u8());
                if let Some(i) = pick(&records, i)
                    && !records[i].1.is_empty()
                {
                    let len = records[i].1.len();
                    records[i].1[usize::from(at) % len] ^= 1 << (bit % 8);
                }
            }
            1 => {
                let (i, at) = (input.u8(), input.u16());
                if let Some(i) = pick(&records, i)
                    && !records[i].1.is_empty()
                {
                    let len = records[i].1.len();
                    records[i].1.truncate(usize::from(at) % len);
                }
            }
            2 => {
                if let Some(i) = pick(&records, input.u8()) {
                    records.remove(i);
                }
            }
            3 => {
                let (a, b) = (input.u8(), input.u8());
                if let (Some(a), Some(b)) = (pick(&records, a), pick(&records, b)) {
                    let bytes_a = records[a].1.clone();
                    records[a].1 = records[b].1.clone();
                    records[b].1 = bytes_a;
                }
            }
            4 => {
                let (i, to) = (input.u8(), u64::from(input.u8() % 16));
                if let Some(i) = pick(&records, i) {
                    let (_, bytes) = records.remove(i);
                    records.retain(|(seq, _)| *seq != to);
                    records.push((to, bytes));
                    records.sort_by_key(|(seq, _)| *seq);
                }
            }
            5 => {
                let (i, at) = (input.u8(), input.u16());
                if let Some(i) = pick(&records, i) {
                    forge(&mut records[i], at);
                }
            }
            _ => file_ops.push((op, input.u32(), input.u16(), input.u8())),
        }
    }
    if records != committed {
        audit::write_records(&file, &records).expect("rewrite the records");
    }
    for (op, at, len, bit) in &file_ops {
        let mut bytes = std::fs::read(&file).expect("read the log file");
        if bytes.is_empty() {
            break;
        }
        let at = *at as usize % bytes.len();
        match op {
            6 => bytes[at] ^= 1 << (bit % 8),
            7 => bytes.truncate(at),
            _ => {
                let end = (at + usize::from(*len % 4096)).min(bytes.len());
                bytes[at..end].fill(0);
            }
        }
        std::fs::write(&file, &bytes).expect("write the log file");
    }

    match audit::open_and_verify(dir.path()) {
        Verified::Report {
            report,
            records: stored,
        } if report.first_bad.is_none() => {
            if file_ops.is_empty() {
                assert!(
                    stored == committed,
                    "verify is Ok over {} records, but the committed records were changed, removed or reordered",
                    stored.len()
                );
            } else {
                assert!(
                    stored == committed
                        || boundaries
                            .iter()
                            .any(|&b| stored.as_slice() == &committed[..b]),
                    "verify is Ok over {} records after a file corruption, but they are not the log as it was at any commit",
                    stored.len()
                );
            }
            assert_eq!(report.records, stored.len() as u64, "records verified");
        }
        // A refusal or a reported break: the corruption was seen.
        Verified::Report { .. } | Verified::Refused(_) => {
            assert!(
                records != committed || !file_ops.is_empty(),
                "an untouched log does not verify on its second open"
            );
        }
    }
}
