//! The audit log's steps for the `audit` fuzz target (`crate::fuzzing`) only: create a log,
//! append batches through the writer's own [`append`](super::writer) and commit, read and
//! rewrite the stored records behind the log's back (as someone with write access to the file
//! would), and open and verify the result as `brokerctl logs verify` does.

use std::path::Path;

use agent_broker_core::fmt::error_chain;
use agent_broker_protocol::{AuditEvent, LogFilter, VerifyReport};
use redb::{Database, ReadableDatabase as _, ReadableTable as _};

use super::{AuditError, AuditLog, RECORDS, Retention, writer};

/// A stored record: its key and its bytes as stored.
pub type RawRecord = (u64, Vec<u8>);

/// Creates the log in `state_dir` and commits each batch in a write transaction of its own,
/// as the writer thread commits a batch. Returns every event as it reads back, oldest first.
pub fn append_batches(
    state_dir: &Path,
    batches: Vec<Vec<AuditEvent>>,
) -> Result<Vec<AuditEvent>, AuditError> {
    let log = AuditLog::open(state_dir, Retention::KEEP_ALL)?;
    let store = &log.store;
    let mut tail = {
        let txn = store.read_txn()?;
        writer::tail(&txn, store)?
    };
    for mut batch in batches {
        let mut txn = store.begin_write()?;
        txn.set_quick_repair(true);
        tail = writer::append(&txn, store, tail, &mut batch)?;
        txn.commit().map_err(store.storage("committing records"))?;
    }
    store.query(&LogFilter::default())
}

/// Every stored record, in key order, read straight from the file (no lock, no check).
pub fn read_records(path: &Path) -> Result<Vec<RawRecord>, redb::Error> {
    let db = Database::open(path)?;
    let txn = db.begin_read()?;
    let table = txn.open_table(RECORDS)?;
    let mut out = Vec::new();
    for entry in table.iter()? {
        let (key, value) = entry?;
        out.push((key.value(), value.value().to_vec()));
    }
    Ok(out)
}

/// Replaces every stored record with `records`, leaving the meta table (chain head and floor)
/// as it is: an edit of the log outside the broker.
pub fn write_records(path: &Path, records: &[RawRecord]) -> Result<(), redb::Error> {
    let db = Database::open(path)?;
    let txn = db.begin_write()?;
    {
        let mut table = txn.open_table(RECORDS)?;
        table.retain(|_, _| false)?;
        for (key, value) in records {
            table.insert(*key, value.as_slice())?;
        }
    }
    txn.commit()?;
    Ok(())
}

/// What opening and verifying a log found.
#[derive(Debug)]
pub enum Verified {
    /// [`AuditLog::open`] or the verification refused the file (corrupt, foreign, unreadable).
    Refused(String),
    /// The log opened and verification read it.
    Report {
        report: VerifyReport,
        /// The records as stored, read in the same open as the verification.
        records: Vec<RawRecord>,
    },
}

/// Opens the log in `state_dir` as brokerd does (checking the file first) and verifies its
/// chain as `brokerctl logs verify` does.
pub fn open_and_verify(state_dir: &Path) -> Verified {
    let log = match AuditLog::open(state_dir, Retention::KEEP_ALL) {
        Ok(log) => log,
        Err(e) => return Verified::Refused(error_chain(&e)),
    };
    let store = &log.store;
    let report = match store.verify() {
        Ok(report) => report,
        Err(e) => return Verified::Refused(error_chain(&e)),
    };
    let records = (|| -> Result<Vec<RawRecord>, AuditError> {
        let txn = store.read_txn()?;
        let table = txn
            .open_table(RECORDS)
            .map_err(store.storage("opening the records table"))?;
        let mut out = Vec::new();
        for entry in table.iter().map_err(store.storage("reading records"))? {
            let (key, value) = entry.map_err(store.storage("reading records"))?;
            out.push((key.value(), value.value().to_vec()));
        }
        Ok(out)
    })();
    match records {
        Ok(records) => Verified::Report { report, records },
        Err(e) => Verified::Refused(error_chain(&e)),
    }
}
