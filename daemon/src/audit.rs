//! The audit log: every brokered request, denial, TLS failure, handle misuse, attach/detach and
//! policy reload, as [`AuditEvent`]s in `<state_dir>/audit.redb` (mode 0600), append-only and
//! hash-chained, written by group commit off the request path.
//!
//! # Records and the chain
//!
//! Records are keyed by `seq` (u64, from 1, dense) and hold the event's JSON with `seq` set,
//! its `prev_hash` and its `hash`, where
//! `hash = SHA-256(prev_hash || seq as u64 big-endian || the event's JSON bytes as stored)` and
//! record 1's `prev_hash` is 32 zero bytes (layout in `audit/tables.rs`). A small meta table
//! keeps the chain head (last seq and hash) and the retention floor (seq and hash of the last
//! record retention removed; 0 and zeros until then), both updated in the same transaction as
//! the records. [`AuditHandle::verify`] recomputes the chain from the floor and names the first
//! record that was edited, removed or reordered; records removed by retention are not
//! tampering. What the chain cannot show: someone who can write the file may rewrite a whole
//! suffix of the log together with the head, or raise the floor; comparing the head with a
//! copy kept elsewhere catches that (the writer logs the head, seq and hash, when it stops).
//!
//! # Writing: group commit, and what a crash can lose
//!
//! [`AuditLog::writer`] moves the log to a writer thread and returns an [`AuditHandle`].
//! [`AuditHandle::record`] is all the request path pays: a non-blocking send of the already
//! built event into a bounded queue ([`WriterConfig::queue_capacity`], 65 536 by default). When
//! the queue is full (the disk cannot keep up) the event is dropped, never the request delayed:
//! the drop is counted ([`AuditHandle::dropped`]), logged as a warning (on the 1st, 2nd, 4th,
//! 8th... drop), and the writer appends a record saying how many events were lost, so the gap
//! is visible in the log itself.
//!
//! The writer takes everything pending and commits it in one redb write transaction, durably
//! (`Durability::Immediate`, fsync), at most [`WriterConfig::commit_interval`] (50 ms) after
//! the first event of the batch arrived, or at once when [`WriterConfig::max_batch`] (512)
//! are pending; seq and hashes are assigned in commit order. Committed events then go to live
//! subscribers ([`AuditHandle::subscribe`]); a slow subscriber lags, it never holds the writer.
//!
//! **Forwarded requests.** A request brokerd forwards upstream is recorded before it is written
//! upstream (outcome `forwarded`) and again when it ends (completed, cancelled by the agent, or
//! failed), both with one `request_id`. When the ending arrives before the forwarded record is
//! committed, the writer commits only the ending, in the forwarded record's place: a request that
//! takes less than the commit interval costs one record, and any request is in the log from the
//! first commit after it was forwarded, however long it runs or however it ends. A `forwarded`
//! record without a later record of its id was under way when brokerd was killed.
//!
//! **Crash window.** A SIGKILL (or power loss) loses the events recorded in the last
//! `commit_interval` before it, plus those of a commit in flight: at the default, the last
//! 50 ms plus one commit. A commit is a two-phase redb commit with its allocator state saved
//! (so reopening after a crash needs no full repair); measured on the development VM's disk it
//! takes 2-7 ms on average and under 20 ms at worst for a 512-record batch, so a SIGKILL loses
//! at most about the last 70 ms of records. Everything [`AuditHandle::committed_seq`] reported
//! is on disk. SIGTERM/SIGINT lose nothing: [`AuditHandle::flush_and_stop`] commits everything
//! pending, durably, before it returns.
//!
//! Cost, same machine, release build: `record()` about 0.5-0.9 us (a box and a channel send);
//! the writer sustains several tens of thousands of records a second (a burst beyond the queue
//! is what drops); opening a 71 MB log (about 135 000 records) takes 0.1-0.2 s, verifying it
//! 0.3-1 s.
//!
//! # Opening
//!
//! [`AuditLog::open`] creates the log on first start (built under a temporary name and linked
//! into place complete). An existing file is checked first on a copy-on-write view of it (redb
//! repairs and verifies every page checksum there, and the tables must say this is an
//! agent-broker audit log), so a corrupt or foreign file is refused with an error naming it and
//! not one byte of it changed. Only then is it opened for writing (repairing after a crash).
//! `<state_dir>/audit.lock` is held while it is open, so two brokers never share one log. The
//! file's life (lock, creation, check, open) is `crate::store`'s; this module says what a new
//! log holds and what makes a file an audit log.
//!
//! redb is synchronous, and so is this API: from async code call [`AuditHandle::query`],
//! [`AuditHandle::verify`] and [`AuditHandle::flush_and_stop`] through
//! `tokio::task::spawn_blocking`. [`AuditHandle::record`] and [`AuditHandle::subscribe`] never
//! block and may be called anywhere.
//!
//! Never: store a secret value (the event type has secret names only), overwrite or renumber a
//! record, or block a request on the disk.

mod chain;
#[cfg(feature = "fuzzing")]
pub(crate) mod fuzzing;
mod ports;
mod priority;
mod tables;
#[cfg(test)]
mod tests;
mod writer;

pub use ports::{AuditAccess, EventSink, matches};

use std::fs::File;
use std::io;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use agent_broker_protocol::{AuditEvent, LogFilter, VerifyReport};
use nix::fcntl::Flock;
use redb::{
    Database, ReadTransaction, ReadableDatabase, ReadableTable, TableError, WriteTransaction,
};

use crate::store::{self, Locked, Opened, StoreError, StoreName};

use tables::{
    FLOOR_KEY, FORMAT, FORMAT_KEY, HEAD_KEY, KIND, KIND_KEY, Link, META, RECORDS, StoredRecord,
};

pub use writer::{AuditHandle, WriterConfig};

/// File name of the audit log inside the state directory.
pub const AUDIT_FILE: &str = "audit.redb";
/// What messages call the log and its file.
const NAME: StoreName = StoreName::same("audit log");
/// The log as a redb store file (`audit.lock` is held while it is open).
static STORE: store::Spec = store::Spec {
    name: NAME,
    file: AUDIT_FILE,
    // Reads are mostly sequential scans and writes append, so a small cache serves both;
    // redb's default (1 GiB) is far more than a log needs. brokerd locks its memory, so every
    // cached page stays resident: at 64 MiB the 60-minute soak saw resident memory climb for
    // the whole hour as the cache filled behind a growing log, for no measurable gain.
    cache_size: 8 * 1024 * 1024,
    // The whole-file check reads every page (about 1 ms per MB here). Above this size brokerd
    // starts in the same time whatever the log's size (200,000 records open in 5 ms), and
    // `brokerctl logs verify` reads every record.
    full_check_below: Some(16 * 1024 * 1024),
};

/// How long records are kept. Both limits apply when both are set; `None` keeps everything.
/// The writer thread applies it at most once per [`WriterConfig::retention_interval`], removing
/// the oldest records and advancing the retention floor in the same transaction.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Retention {
    /// Remove records older than this (by their `time_ms`, oldest first, stopping at the first
    /// younger one).
    pub max_age: Option<Duration>,
    /// Keep at most this many records (at least 1).
    pub max_records: Option<u64>,
}

impl Retention {
    /// Keep everything.
    pub const KEEP_ALL: Retention = Retention {
        max_age: None,
        max_records: None,
    };

    fn is_set(&self) -> bool {
        self.max_age.is_some() || self.max_records.is_some()
    }
}

/// Everything the audit log can refuse. Messages name the file.
#[derive(Debug, thiserror::Error)]
pub enum AuditError {
    /// Locking, creating, checking or opening the file, or reading or writing it.
    #[error(transparent)]
    Store(#[from] StoreError),
    #[error(
        "audit log {path}: record {seq} already exists past the chain head; refusing to overwrite it (was the file changed while brokerd ran?)"
    )]
    Occupied { path: PathBuf, seq: u64 },
    #[error("invalid audit retention: {reason}")]
    InvalidRetention { reason: &'static str },
    #[error("invalid audit writer settings: {reason}")]
    InvalidWriterConfig { reason: &'static str },
    #[error("cannot start the audit writer thread")]
    Spawn {
        #[source]
        source: io::Error,
    },
    #[error("cannot encode audit record")]
    Encode {
        #[source]
        source: serde_json::Error,
    },
    #[error("the audit writer has stopped")]
    WriterStopped,
    #[error("the audit writer failed to commit")]
    WriterFailed {
        #[source]
        source: Arc<AuditError>,
    },
}

// The log is shared between the writer thread and query callers; errors cross threads.
const _: fn() = || {
    fn assert_send_sync<T: Send + Sync>() {}
    assert_send_sync::<AuditLog>();
    assert_send_sync::<AuditError>();
};

/// The open audit log. See the module docs.
pub struct AuditLog {
    store: Arc<Store>,
}

/// What the log and the writer share.
struct Store {
    // Declared before `_lock`: the database closes before the lock is released. None only
    // while it is being reopened after an I/O error (see [`Store::begin_write`]).
    db: std::sync::RwLock<Option<Database>>,
    path: PathBuf,
    retention: Retention,
    _lock: Flock<File>,
}

impl std::fmt::Debug for AuditLog {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("AuditLog")
            .field("path", &self.store.path)
            .field("retention", &self.store.retention)
            .finish_non_exhaustive()
    }
}

impl AuditLog {
    /// Opens `<state_dir>/audit.redb`, creating the state directory (0700) and the log (0600)
    /// when missing.
    ///
    /// Refuses, without writing to the file: a corrupt file, one that is not an agent-broker
    /// audit log (another redb file such as the vault, or no redb file at all), a later format,
    /// a symlink, and a log another process has open.
    pub fn open(state_dir: &Path, retention: Retention) -> Result<AuditLog, AuditError> {
        if retention.max_records == Some(0) {
            return Err(AuditError::InvalidRetention {
                reason: "max_records must be at least 1",
            });
        }
        if retention.max_age == Some(Duration::ZERO) {
            return Err(AuditError::InvalidRetention {
                reason: "max_age must be more than zero",
            });
        }
        let locked = Locked::take(&STORE, state_dir)?;
        if !locked.exists()? {
            locked.create(init_log)?;
        }
        let checked = locked.path().to_path_buf();
        let Opened { db, path, lock } = locked.open(|db| -> Result<(), AuditError> {
            let txn = db
                .begin_read()
                .map_err(storage_error(&checked, "starting a read transaction"))?;
            chain_state(&txn, &checked).map(drop)
        })?;
        let store = Store {
            db: std::sync::RwLock::new(Some(db)),
            path,
            retention,
            _lock: lock,
        };
        let txn = store.read_txn()?;
        chain_state(&txn, &store.path)?;
        drop(txn);
        Ok(AuditLog {
            store: Arc::new(store),
        })
    }

    /// The log file's path.
    #[cfg(test)]
    pub fn path(&self) -> &Path {
        &self.store.path
    }

    /// The records matching `filter`, oldest first (see [`LogFilter`] and
    /// [`matches`]: `cgroup` is that cgroup or below it; `denied_only` is
    /// decision "deny" or a denial, TLS failure or handle misuse; `limit` keeps the newest). A record that does not decode is skipped here (with a
    /// warning) and reported by [`AuditHandle::verify`].
    #[cfg(test)]
    pub fn query(&self, filter: &LogFilter) -> Result<Vec<AuditEvent>, AuditError> {
        self.store.query(filter)
    }

    /// Recomputes the hash chain from the retention floor and names the first record that was
    /// edited, removed or reordered. An error here is a storage failure, not a broken chain.
    #[cfg(test)]
    pub fn verify(&self) -> Result<VerifyReport, AuditError> {
        self.store.verify()
    }

    /// The seq of the last record (0 for an empty log).
    #[cfg(test)]
    pub fn last_seq(&self) -> Result<u64, AuditError> {
        let txn = self.store.read_txn()?;
        Ok(chain_state(&txn, &self.store.path)?.head.seq)
    }

    /// Starts the writer thread with the default [`WriterConfig`].
    pub fn writer(
        self,
    ) -> Result<(AuditHandle, std::thread::JoinHandle<Result<(), AuditError>>), AuditError> {
        self.writer_with(WriterConfig::default())
    }

    /// Starts the writer thread. The thread ends after [`AuditHandle::flush_and_stop`], or when
    /// every handle is dropped (committing what is pending either way); its result is the
    /// final commit's.
    pub fn writer_with(
        self,
        config: WriterConfig,
    ) -> Result<(AuditHandle, std::thread::JoinHandle<Result<(), AuditError>>), AuditError> {
        writer::start(self.store, config)
    }
}

/// The chain's two ends as stored.
#[derive(Clone, Copy, Debug)]
struct ChainState {
    head: Link,
    floor: Link,
}

impl Store {
    fn query(&self, filter: &LogFilter) -> Result<Vec<AuditEvent>, AuditError> {
        let txn = self.read_txn()?;
        let table = txn
            .open_table(RECORDS)
            .map_err(self.storage("opening the records table"))?;
        let iter = table.iter().map_err(self.storage("reading records"))?;
        let mut out = Vec::new();
        let mut visit = |entry: Result<_, redb::StorageError>| -> Result<bool, AuditError> {
            let (key, value): (redb::AccessGuard<'_, u64>, redb::AccessGuard<'_, &[u8]>) =
                entry.map_err(self.storage("reading records"))?;
            let seq = key.value();
            let Some(event) = StoredRecord::decode(value.value())
                .and_then(|r| serde_json::from_slice::<AuditEvent>(r.event_json).ok())
            else {
                tracing::warn!(path = %self.path.display(), seq, "skipping a malformed audit record; run `brokerctl logs verify`");
                return Ok(true);
            };
            if matches(filter, &event) {
                out.push(event);
            }
            Ok(filter.limit == 0 || out.len() < filter.limit)
        };
        if filter.limit == 0 {
            for entry in iter {
                visit(entry)?;
            }
        } else {
            for entry in iter.rev() {
                if !visit(entry)? {
                    break;
                }
            }
            out.reverse();
        }
        Ok(out)
    }

    fn verify(&self) -> Result<VerifyReport, AuditError> {
        let txn = self.read_txn()?;
        let state = chain_state(&txn, &self.path)?;
        let table = txn
            .open_table(RECORDS)
            .map_err(self.storage("opening the records table"))?;
        let iter = table.iter().map_err(self.storage("reading records"))?;
        let mut failure = None;
        let records = iter.map_while(|entry| match entry {
            Ok((key, value)) => Some((key.value(), value.value().to_vec())),
            Err(e) => {
                failure = Some(e);
                None
            }
        });
        let report = chain::verify(state.floor, state.head, records);
        if let Some(e) = failure {
            return Err(self.storage("reading records")(e));
        }
        Ok(report)
    }

    fn read_txn(&self) -> Result<ReadTransaction, AuditError> {
        {
            let db = self
                .db
                .read()
                .unwrap_or_else(std::sync::PoisonError::into_inner);
            if let Some(db) = db.as_ref() {
                return db
                    .begin_read()
                    .map_err(self.storage("starting a read transaction"));
            }
        }
        // An earlier reopen failed (the file system is still read-only, say): try again, so
        // the error names today's cause rather than redb's "previous I/O error".
        self.reopen()?;
        let db = self
            .db
            .read()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        db.as_ref()
            .ok_or_else(|| self.reopening())?
            .begin_read()
            .map_err(self.storage("starting a read transaction"))
    }

    /// A write transaction. After an I/O error (a full or read-only disk) redb refuses every
    /// transaction until the database is opened again: then it is reopened here (redb
    /// recovers to the last commit, which is all the chain has), and the transaction begun on
    /// the new handle.
    fn begin_write(&self) -> Result<redb::WriteTransaction, AuditError> {
        {
            let db = self
                .db
                .read()
                .unwrap_or_else(std::sync::PoisonError::into_inner);
            // No handle: an earlier reopen failed; reopening again names the cause.
            if let Some(db) = db.as_ref() {
                match db.begin_write() {
                    Ok(txn) => return Ok(txn),
                    Err(redb::TransactionError::Storage(redb::StorageError::PreviousIo)) => {}
                    Err(e) => return Err(self.storage("starting a write transaction")(e)),
                }
            }
        }
        self.reopen()?;
        let db = self
            .db
            .read()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        db.as_ref()
            .ok_or_else(|| self.reopening())?
            .begin_write()
            .map_err(self.storage("starting a write transaction"))
    }

    /// Closes the database and opens it again from its file.
    fn reopen(&self) -> Result<(), AuditError> {
        let mut db = self
            .db
            .write()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        // The old handle holds the file's lock: it goes first.
        drop(db.take());
        let file = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .open(&self.path)
            .map_err(|e| self.storage("reopening after an I/O error")(redb::StorageError::Io(e)))?;
        let reopened = redb::backends::FileBackend::new(file)
            .map_err(|e| {
                AuditError::from(StoreError::storage(
                    NAME,
                    &self.path,
                    "reopening after an I/O error",
                )(e))
            })
            .and_then(|backend| {
                redb::Builder::new()
                    .create_with_backend(backend)
                    .map_err(|e| {
                        AuditError::from(StoreError::storage(
                            NAME,
                            &self.path,
                            "reopening after an I/O error",
                        )(e))
                    })
            })?;
        *db = Some(reopened);
        tracing::info!(path = %self.path.display(), "audit log reopened after an I/O error");
        Ok(())
    }

    fn reopening(&self) -> AuditError {
        StoreError::storage(NAME, &self.path, "reopening after an I/O error")(
            redb::StorageError::PreviousIo,
        )
        .into()
    }

    fn storage<E: Into<redb::Error>>(&self, action: &'static str) -> impl FnOnce(E) -> AuditError {
        storage_error(&self.path, action)
    }
}

fn storage_error<E: Into<redb::Error>>(
    path: &Path,
    action: &'static str,
) -> impl FnOnce(E) -> AuditError {
    let storage = StoreError::storage(NAME, path, action);
    move |e| storage(e).into()
}

/// Reads and checks the meta table: this is an audit log of our format with a sane chain state.
fn chain_state(txn: &ReadTransaction, path: &Path) -> Result<ChainState, AuditError> {
    let corrupt = |detail: &str| AuditError::from(StoreError::corrupt(NAME, path, detail));
    let storage = |action| storage_error::<redb::Error>(path, action);
    let meta = match txn.open_table(META) {
        Ok(t) => t,
        Err(TableError::TableDoesNotExist(_)) => {
            return Err(corrupt(
                "it has no audit tables (is it another redb file, such as the vault?)",
            ));
        }
        Err(e) => return Err(storage("opening the meta table")(e.into())),
    };
    let get = |key: &str| -> Result<Option<Vec<u8>>, AuditError> {
        Ok(meta
            .get(key)
            .map_err(|e| storage("reading the meta table")(e.into()))?
            .map(|g| g.value().to_vec()))
    };
    if get(KIND_KEY)?.as_deref() != Some(KIND) {
        return Err(corrupt("its meta table does not name it an audit log"));
    }
    store::check_format(NAME, path, get(FORMAT_KEY)?.as_deref(), FORMAT)?;
    let head = get(HEAD_KEY)?
        .and_then(|b| Link::decode(&b))
        .ok_or_else(|| corrupt("its chain head is missing or malformed"))?;
    let floor = get(FLOOR_KEY)?
        .and_then(|b| Link::decode(&b))
        .ok_or_else(|| corrupt("its retention floor is missing or malformed"))?;
    if head.seq < floor.seq {
        return Err(corrupt("its chain head is below its retention floor"));
    }
    match txn.open_table(RECORDS) {
        Ok(_) => {}
        Err(TableError::TableDoesNotExist(_)) => {
            return Err(corrupt("it has no records table"));
        }
        Err(e) => return Err(storage("opening the records table")(e.into())),
    }
    Ok(ChainState { head, floor })
}

/// What a new log holds: the meta records of an empty chain, and no records.
fn init_log(txn: &WriteTransaction) -> Result<(), redb::Error> {
    let mut meta = txn.open_table(META)?;
    let origin = Link::ORIGIN.encode();
    for (key, value) in [
        (KIND_KEY, KIND),
        (FORMAT_KEY, FORMAT.to_be_bytes().as_slice()),
        (HEAD_KEY, origin.as_slice()),
        (FLOOR_KEY, origin.as_slice()),
    ] {
        meta.insert(key, value)?;
    }
    txn.open_table(RECORDS)?;
    Ok(())
}

store::wraps_store_error!(AuditError);

/// The proxy (and the control socket, for attach/detach/reload) report straight into the log.
impl EventSink for AuditHandle {
    fn record(&self, event: AuditEvent) {
        AuditHandle::record(self, event);
    }

    fn writable(&self) -> Result<(), String> {
        AuditHandle::writable(self)
    }
}

/// What the control socket serves `logs`, `logs verify` and `subscribe` from.
impl AuditAccess for AuditHandle {
    fn subscribe(&self) -> tokio::sync::broadcast::Receiver<AuditEvent> {
        AuditHandle::subscribe(self)
    }

    fn query(&self, filter: &LogFilter) -> Result<Vec<AuditEvent>, AuditError> {
        AuditHandle::query(self, filter)
    }

    fn verify(&self) -> Result<VerifyReport, AuditError> {
        AuditHandle::verify(self)
    }

    fn failing(&self) -> Option<String> {
        AuditHandle::failing(self)
    }

    fn dropped(&self) -> u64 {
        AuditHandle::dropped(self)
    }
}
