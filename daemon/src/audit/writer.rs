//! The writer thread: group commit, retention, live fan-out. See the module docs of `audit`.

use std::collections::HashMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::mpsc::{self, Receiver, RecvTimeoutError, SyncSender, TryRecvError, TrySendError};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use agent_broker_core::{fmt::error_chain, time::now_unix_ms};
use agent_broker_protocol::{AuditEvent, LogFilter, RequestOutcome, Side, VerifyReport};
use redb::{ReadableTable, ReadableTableMetadata, WriteTransaction};
use serde::Deserialize;
use tokio::sync::broadcast;

use super::tables::{FLOOR_KEY, HEAD_KEY, Link, META, RECORDS, StoredRecord, record_hash};
use super::{AuditError, Store, chain_state};

/// Most records one retention pass removes, so one pass never holds a commit up for long; a
/// pass that hits it runs again at the next commit.
const PRUNE_LIMIT: u64 = 50_000;
/// Longest idle wait of the writer without retention to run.
const IDLE_WAIT: Duration = Duration::from_secs(3600);
/// At most one commit-failure log line per this long.
const ERROR_LOG_EVERY: Duration = Duration::from_secs(10);

/// How often the writer looks for new events while it gathers a batch.
const GATHER_TICK: Duration = Duration::from_millis(5);

/// How the writer batches. The defaults suit brokerd; tests shorten them.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct WriterConfig {
    /// Longest an event waits before its batch is committed. This is the crash window: a
    /// SIGKILL loses at most the events of the last `commit_interval` plus a commit in flight.
    pub commit_interval: Duration,
    /// A batch this large is committed at once.
    pub max_batch: usize,
    /// Events waiting for the writer; when full, [`AuditHandle::record`] drops (and counts).
    pub queue_capacity: usize,
    /// Retention runs at most this often (and never more often than `commit_interval`); the
    /// first pass is at the writer's first commit.
    pub retention_interval: Duration,
    /// Committed events a live subscriber may fall behind by before it lags (misses events).
    pub live_capacity: usize,
}

impl Default for WriterConfig {
    fn default() -> Self {
        Self {
            commit_interval: Duration::from_millis(50),
            max_batch: 512,
            queue_capacity: 65_536,
            retention_interval: Duration::from_secs(60),
            live_capacity: 4096,
        }
    }
}

type Reply = mpsc::Sender<Result<u64, AuditError>>;

enum Msg {
    // Boxed: the queue's slots are allocated up front, and an event is several hundred bytes.
    Event(Box<AuditEvent>),
    /// Tests: answered once everything recorded before it is committed.
    #[cfg(test)]
    Flush(Reply),
    Stop(Reply),
    /// Tests: the writer waits on this before reading the queue again.
    #[cfg(test)]
    Block(mpsc::Receiver<()>),
}

/// What handles and the writer share.
struct Shared {
    store: Arc<Store>,
    dropped: AtomicU64,
    committed_seq: AtomicU64,
    live: broadcast::Sender<AuditEvent>,
    /// The writer's scheduling class (see [`super::priority`]).
    priority: super::priority::Priority,
    /// Why the last commit failed, while commits fail (a full or read-only disk); cleared by
    /// the next commit that succeeds.
    failing: std::sync::Mutex<Option<String>>,
    /// Whether `failing` holds an error: what every request checks, without the lock.
    failed: std::sync::atomic::AtomicBool,
    /// Refuse new requests while commits fail (brokerd's `audit_unwritable = "refuse"`).
    refuse_when_failing: std::sync::atomic::AtomicBool,
}

/// The way into the audit log once its writer runs: cheap to clone, `Send + Sync`.
#[derive(Clone)]
pub struct AuditHandle {
    tx: SyncSender<Msg>,
    shared: Arc<Shared>,
}

impl std::fmt::Debug for AuditHandle {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("AuditHandle")
            .field("path", &self.shared.store.path)
            .field("committed_seq", &self.committed_seq())
            .field("dropped", &self.dropped())
            .finish_non_exhaustive()
    }
}

impl AuditHandle {
    /// Queues `event` for the log. Never blocks: when the queue is full, or the writer has
    /// stopped, the event is dropped and counted (see the module docs). `seq` is assigned by
    /// the writer; whatever the caller put there is replaced.
    pub fn record(&self, event: AuditEvent) {
        let sent = self.tx.try_send(Msg::Event(Box::new(event)));
        if sent.is_ok() {
            self.shared.priority.queued_one();
        }
        if let Err(e) = sent {
            let dropped = self.shared.dropped.fetch_add(1, Ordering::Relaxed) + 1;
            if dropped.is_power_of_two() {
                let why = match e {
                    TrySendError::Full(_) => "the audit queue is full (the disk cannot keep up)",
                    TrySendError::Disconnected(_) => "the audit writer has stopped",
                };
                tracing::warn!(dropped, "audit event dropped: {why}");
            }
        }
    }

    /// Live events: each committed record, with its seq, in commit order. A receiver that falls
    /// more than [`WriterConfig::live_capacity`] behind gets `RecvError::Lagged` and skips
    /// ahead; it never slows the writer.
    ///
    /// For stored-then-live (`logs --follow`) without a gap: subscribe first, then
    /// [`Self::query`], then skip live events whose seq is at or below the last stored one.
    pub fn subscribe(&self) -> broadcast::Receiver<AuditEvent> {
        self.shared.live.subscribe()
    }

    /// Waits until every event recorded before this call is committed; returns the last
    /// committed seq. Blocking (use `spawn_blocking` from async code).
    #[cfg(test)]
    pub fn flush(&self) -> Result<u64, AuditError> {
        self.request(Msg::Flush)
    }

    /// Commits everything pending, durably, and stops the writer (SIGTERM/SIGINT); returns the
    /// last committed seq. Events recorded afterwards are dropped and counted. Blocking. Once it
    /// returns the writer thread has finished its work; join its `JoinHandle` to reap it.
    pub fn flush_and_stop(&self) -> Result<u64, AuditError> {
        self.request(Msg::Stop)
    }

    fn request(&self, msg: impl FnOnce(Reply) -> Msg) -> Result<u64, AuditError> {
        let (reply, answer) = mpsc::channel();
        // Whoever waits for the writer needs it to get CPU.
        self.shared.priority.raise();
        // A blocking send: this is the shutdown or test path, and the writer is draining.
        self.tx
            .send(msg(reply))
            .map_err(|_| AuditError::WriterStopped)?;
        answer.recv().map_err(|_| AuditError::WriterStopped)?
    }

    /// The seq of the last record known to be committed durably (0 before the first).
    pub fn committed_seq(&self) -> u64 {
        self.shared.committed_seq.load(Ordering::Acquire)
    }

    /// Events queued for the writer and not yet taken (the metrics' audit queue depth).
    pub fn queue_depth(&self) -> u64 {
        self.shared.priority.queued() as u64
    }

    /// Why the audit log cannot be written now (its last commit failed), if so.
    pub fn failing(&self) -> Option<String> {
        self.shared.failing.lock().ok().and_then(|f| f.clone())
    }

    /// Whether requests are refused while the log cannot be written (see
    /// [`AuditHandle::writable`]); off unless set.
    pub fn refuse_when_failing(&self, refuse: bool) {
        self.shared
            .refuse_when_failing
            .store(refuse, Ordering::Relaxed);
    }

    /// `Err` (why) when requests must be refused because the log cannot record them.
    pub fn writable(&self) -> Result<(), String> {
        if !self.shared.refuse_when_failing.load(Ordering::Relaxed)
            || !self.shared.failed.load(Ordering::Relaxed)
        {
            return Ok(());
        }
        match self.failing() {
            None => Ok(()),
            Some(why) => Err(format!(
                "the audit log cannot be written ({why}); brokerd refuses requests it cannot \
                 record until it can"
            )),
        }
    }

    /// Events dropped because the queue was full or the writer had stopped.
    pub fn dropped(&self) -> u64 {
        self.shared.dropped.load(Ordering::Relaxed)
    }

    /// See `AuditLog::query` (tests). Blocking.
    pub fn query(&self, filter: &LogFilter) -> Result<Vec<AuditEvent>, AuditError> {
        self.shared.store.query(filter)
    }

    /// See `AuditLog::verify` (tests). Blocking.
    pub fn verify(&self) -> Result<VerifyReport, AuditError> {
        self.shared.store.verify()
    }

    /// The log file's path.
    pub fn path(&self) -> &std::path::Path {
        &self.shared.store.path
    }

    /// Tests: the writer thread's id (0 before it started).
    #[cfg(test)]
    pub(super) fn writer_tid(&self) -> i32 {
        self.shared.priority.tid()
    }

    /// Tests: stops the writer reading the queue until the returned sender is dropped.
    #[cfg(test)]
    pub(super) fn block_writer(&self) -> mpsc::Sender<()> {
        let (release, gate) = mpsc::channel();
        let _ = self.tx.send(Msg::Block(gate));
        release
    }
}

pub(super) fn start(
    store: Arc<Store>,
    config: WriterConfig,
) -> Result<(AuditHandle, JoinHandle<Result<(), AuditError>>), AuditError> {
    let invalid = |reason| Err(AuditError::InvalidWriterConfig { reason });
    if config.commit_interval.is_zero() {
        return invalid("commit_interval must be more than zero");
    }
    if config.max_batch == 0 || config.queue_capacity == 0 || config.live_capacity == 0 {
        return invalid("max_batch, queue_capacity and live_capacity must be at least 1");
    }
    let tail = {
        let txn = store.read_txn()?;
        tail(&txn, &store)?
    };
    let (tx, rx) = mpsc::sync_channel(config.queue_capacity);
    let (live, _) = broadcast::channel(config.live_capacity);
    let shared = Arc::new(Shared {
        store,
        dropped: AtomicU64::new(0),
        committed_seq: AtomicU64::new(tail.seq),
        live,
        priority: super::priority::Priority::default(),
        failing: std::sync::Mutex::new(None),
        failed: std::sync::atomic::AtomicBool::new(false),
        refuse_when_failing: std::sync::atomic::AtomicBool::new(false),
    });
    let mut writer = Writer {
        shared: shared.clone(),
        config,
        rx,
        tail,
        pending: Vec::new(),
        forwarded: HashMap::new(),
        waiters: Vec::new(),
        stop: None,
        disconnected: false,
        reported_dropped: 0,
        next_retention: Instant::now(),
        last_error_log: None,
    };
    let thread = std::thread::Builder::new()
        .name("audit-writer".into())
        .spawn(move || {
            writer.shared.priority.writer_started();
            writer.run()
        })
        .map_err(|source| AuditError::Spawn { source })?;
    Ok((AuditHandle { tx, shared }, thread))
}

/// Where the next record chains on: the head, unless records past it exist (written outside
/// the broker). Those are never overwritten: new records follow them, chained to the last
/// one's stored hash, and `verify` judges them.
pub(super) fn tail(txn: &redb::ReadTransaction, store: &Store) -> Result<Link, AuditError> {
    let state = chain_state(txn, &store.path)?;
    let table = txn
        .open_table(RECORDS)
        .map_err(store.storage("opening the records table"))?;
    let last = table.last().map_err(store.storage("reading records"))?;
    match last {
        Some((key, value)) if key.value() > state.head.seq => {
            let seq = key.value();
            tracing::warn!(
                path = %store.path.display(),
                head = state.head.seq,
                last = seq,
                "the audit log holds records past its chain head; run `brokerctl logs verify`"
            );
            let hash = StoredRecord::decode(value.value()).map_or(state.head.hash, |r| r.hash);
            Ok(Link { seq, hash })
        }
        _ => Ok(state.head),
    }
}

struct Writer {
    shared: Arc<Shared>,
    config: WriterConfig,
    rx: Receiver<Msg>,
    /// The last committed record.
    tail: Link,
    pending: Vec<AuditEvent>,
    /// Where in `pending` the `forwarded` record of each request id is: the record of how the
    /// request ended takes its place when it comes before the commit.
    forwarded: HashMap<u64, usize>,
    waiters: Vec<Reply>,
    stop: Option<Reply>,
    /// Every handle is gone: commit what is pending and end.
    disconnected: bool,
    reported_dropped: u64,
    next_retention: Instant,
    last_error_log: Option<Instant>,
}

impl Writer {
    fn run(&mut self) -> Result<(), AuditError> {
        loop {
            self.gather();
            let ending = self.ending();
            if ending {
                // Take what raced the stop too, at most one queue's worth.
                self.drain_queued();
            }
            let started = (!self.pending.is_empty()).then(Instant::now);
            let result = self.commit().map_err(Arc::new);
            if let Some(started) = started {
                crate::metrics::global().audit_committed(started.elapsed());
            }
            self.shared.priority.settle();
            let answer = || match &result {
                Ok(()) => Ok(self.tail.seq),
                Err(e) => Err(AuditError::WriterFailed { source: e.clone() }),
            };
            for waiter in std::mem::take(&mut self.waiters) {
                let _ = waiter.send(answer());
            }
            if ending {
                if result.is_err() {
                    let lost = self.pending.len() as u64;
                    self.shared.dropped.fetch_add(lost, Ordering::Relaxed);
                    tracing::error!(lost, "audit writer stopping with uncommitted events");
                }
                tracing::info!(
                    path = %self.shared.store.path.display(),
                    seq = self.tail.seq,
                    hash = %super::tables::hex(&self.tail.hash),
                    "audit log chain head"
                );
                if let Some(stop) = self.stop.take() {
                    let _ = stop.send(answer());
                }
                return result.map_err(|source| AuditError::WriterFailed { source });
            }
            if let Ok(mut failing) = self.shared.failing.lock() {
                *failing = result.as_ref().err().map(|e| error_chain(e));
                self.shared
                    .failed
                    .store(failing.is_some(), Ordering::Relaxed);
            }
            if let Err(e) = result {
                self.log_failure(&e);
                // Retry no sooner than the next commit, retention included.
                self.next_retention = self
                    .next_retention
                    .max(Instant::now() + self.config.commit_interval);
                // Bound memory while the disk refuses: drop the oldest beyond the queue size.
                let excess = self
                    .pending
                    .len()
                    .saturating_sub(self.config.queue_capacity);
                if excess > 0 {
                    self.pending.drain(..excess);
                    self.forwarded.clear();
                    self.shared
                        .dropped
                        .fetch_add(excess as u64, Ordering::Relaxed);
                }
            }
        }
    }

    /// Waits for the next batch: returns when it is due (commit interval since its first event,
    /// full, a flush or stop asked for), or when retention is due.
    fn gather(&mut self) {
        if self.pending.is_empty() && self.waiters.is_empty() && !self.ending() {
            let wait = if self.shared.store.retention.is_set() {
                self.next_retention
                    .saturating_duration_since(Instant::now())
            } else {
                IDLE_WAIT
            };
            match self.rx.recv_timeout(wait) {
                Ok(msg) => self.accept(msg),
                Err(RecvTimeoutError::Timeout) => return,
                Err(RecvTimeoutError::Disconnected) => self.disconnected = true,
            }
        }
        let deadline = Instant::now() + self.config.commit_interval;
        while self.pending.len() < self.config.max_batch
            && self.waiters.is_empty()
            && !self.ending()
        {
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                break;
            }
            // Poll in ticks instead of waking for every event: under load a wake-up per
            // request (a futex wake and a context switch on the request path's core) costs more
            // than the request's own audit work. A flush or stop waits at most one tick.
            std::thread::sleep(left.min(GATHER_TICK));
            self.drain_queued();
        }
    }

    fn ending(&self) -> bool {
        self.stop.is_some() || self.disconnected
    }

    fn accept(&mut self, msg: Msg) {
        match msg {
            Msg::Event(event) => {
                self.shared.priority.took(1);
                self.pend(*event);
            }
            #[cfg(test)]
            Msg::Flush(reply) => self.waiters.push(reply),
            Msg::Stop(reply) => match self.stop {
                // A second stop waits for the first one's commit.
                Some(_) => self.waiters.push(reply),
                None => self.stop = Some(reply),
            },
            #[cfg(test)]
            Msg::Block(gate) => {
                let _ = gate.recv();
            }
        }
    }

    /// Adds `event` to the batch. A request that ended before its `forwarded` record was
    /// committed is one record: how it ended, in the forwarded record's place (so a request
    /// is in the log from the commit after it was forwarded, and fast ones cost one record).
    fn pend(&mut self, event: AuditEvent) {
        match (event.request_id, event.outcome) {
            (Some(id), Some(RequestOutcome::Forwarded)) => {
                self.forwarded.insert(id, self.pending.len());
            }
            (Some(id), Some(_)) => {
                if let Some(at) = self.forwarded.remove(&id)
                    && let Some(slot) = self.pending.get_mut(at)
                    && slot.request_id == Some(id)
                {
                    *slot = event;
                    return;
                }
            }
            _ => {}
        }
        self.pending.push(event);
    }

    fn drain_queued(&mut self) {
        for _ in 0..self.config.queue_capacity {
            match self.rx.try_recv() {
                Ok(msg) => self.accept(msg),
                Err(TryRecvError::Empty) => break,
                Err(TryRecvError::Disconnected) => {
                    self.disconnected = true;
                    break;
                }
            }
        }
    }

    /// Appends `pending` (and a record of any drops) and runs retention when due, in one
    /// durable transaction; then publishes the new records.
    fn commit(&mut self) -> Result<(), AuditError> {
        let dropped = self.shared.dropped.load(Ordering::Relaxed);
        if dropped > self.reported_dropped {
            let lost = dropped - self.reported_dropped;
            tracing::warn!(
                lost,
                total = dropped,
                "audit events were dropped; recording the gap"
            );
            self.pending.push(drop_notice(lost, dropped));
            self.reported_dropped = dropped;
        }
        let retention_due =
            self.shared.store.retention.is_set() && Instant::now() >= self.next_retention;
        if self.pending.is_empty() && !retention_due {
            return Ok(());
        }
        let store = &self.shared.store;
        let mut txn = store.begin_write()?;
        // Two-phase commit and a saved allocator state: a crash never needs a full-file repair,
        // and the primary commit slot is always valid.
        txn.set_quick_repair(true);
        let tail = append(&txn, store, self.tail, &mut self.pending)?;
        let mut pruned = 0;
        if retention_due {
            pruned = prune(&txn, store, tail)?;
        }
        if self.pending.is_empty() && pruned == 0 {
            txn.abort()
                .map_err(store.storage("aborting a transaction"))?;
        } else {
            txn.commit().map_err(store.storage("committing records"))?;
        }
        if retention_due {
            self.next_retention = if pruned >= PRUNE_LIMIT {
                Instant::now()
            } else {
                // Never more often than commits, so an idle writer does not spin.
                Instant::now()
                    + self
                        .config
                        .retention_interval
                        .max(self.config.commit_interval)
            };
            if pruned > 0 {
                tracing::debug!(pruned, "audit retention removed records");
            }
        }
        self.tail = tail;
        self.shared.committed_seq.store(tail.seq, Ordering::Release);
        self.forwarded.clear();
        for event in self.pending.drain(..) {
            // No subscriber is not an error.
            let _ = self.shared.live.send(event);
        }
        Ok(())
    }

    fn log_failure(&mut self, e: &AuditError) {
        let now = Instant::now();
        if self
            .last_error_log
            .is_none_or(|last| now.duration_since(last) >= ERROR_LOG_EVERY)
        {
            self.last_error_log = Some(now);
            tracing::error!(
                error = %error_chain(e),
                pending = self.pending.len(),
                "audit commit failed; retrying"
            );
        }
    }
}

/// Writes `events` after `tail`, setting their seq; returns the new tail. Never overwrites.
pub(super) fn append(
    txn: &WriteTransaction,
    store: &Store,
    mut tail: Link,
    events: &mut [AuditEvent],
) -> Result<Link, AuditError> {
    if events.is_empty() {
        return Ok(tail);
    }
    let mut records = txn
        .open_table(RECORDS)
        .map_err(store.storage("opening the records table"))?;
    for event in events.iter_mut() {
        let seq = tail.seq + 1;
        event.seq = seq;
        let json = match serde_json::to_vec(&*event) {
            Ok(json) => json,
            // Not expected (the event is plain data), but one bad event must not wedge the
            // writer: it becomes a record saying so.
            Err(e) => {
                tracing::error!(error = %e, "cannot encode an audit event");
                *event = AuditEvent {
                    seq,
                    time_ms: event.time_ms,
                    side: Some(Side::Broker),
                    reason: Some(format!("an audit event could not be encoded: {e}")),
                    ..AuditEvent::default()
                };
                serde_json::to_vec(&*event).map_err(|source| AuditError::Encode { source })?
            }
        };
        let hash = record_hash(&tail.hash, seq, &json);
        let value = StoredRecord::encode(&tail.hash, &hash, &json);
        let previous = records
            .insert(seq, value.as_slice())
            .map_err(store.storage("writing a record"))?;
        if previous.is_some() {
            // Unreachable unless the file changed under the open log; refuse, never overwrite:
            // the error drops the transaction uncommitted, so the old record stays.
            return Err(AuditError::Occupied {
                path: store.path.clone(),
                seq,
            });
        }
        tail = Link { seq, hash };
    }
    let mut meta = txn
        .open_table(META)
        .map_err(store.storage("opening the meta table"))?;
    meta.insert(HEAD_KEY, tail.encode().as_slice())
        .map_err(store.storage("writing the chain head"))?;
    Ok(tail)
}

/// Removes the oldest records that retention no longer keeps (at most [`PRUNE_LIMIT`]) and
/// raises the floor to the last one removed. Never removes past `tail`.
fn prune(txn: &WriteTransaction, store: &Store, tail: Link) -> Result<u64, AuditError> {
    #[derive(Deserialize)]
    struct Time {
        time_ms: u64,
    }
    let retention = store.retention;
    let mut records = txn
        .open_table(RECORDS)
        .map_err(store.storage("opening the records table"))?;
    let len = records.len().map_err(store.storage("counting records"))?;
    let over_count = retention
        .max_records
        .map_or(0, |max| len.saturating_sub(max));
    let cutoff_ms = retention.max_age.map(|age| {
        now_unix_ms().saturating_sub(u64::try_from(age.as_millis()).unwrap_or(u64::MAX))
    });
    let mut floor = None;
    let mut pruned = 0u64;
    while pruned < PRUNE_LIMIT {
        let Some((key, value)) = records.first().map_err(store.storage("reading records"))? else {
            break;
        };
        let seq = key.value();
        if seq > tail.seq {
            break;
        }
        let Some(record) = StoredRecord::decode(value.value()) else {
            tracing::warn!(
                seq,
                "audit retention stopped at a malformed record; run `brokerctl logs verify`"
            );
            break;
        };
        let by_count = pruned < over_count;
        let by_age = cutoff_ms.is_some_and(|cutoff| {
            serde_json::from_slice::<Time>(record.event_json).is_ok_and(|t| t.time_ms < cutoff)
        });
        if !by_count && !by_age {
            break;
        }
        let hash = record.hash;
        drop((key, value));
        records
            .remove(seq)
            .map_err(store.storage("removing a record"))?;
        floor = Some(Link { seq, hash });
        pruned += 1;
    }
    if let Some(floor) = floor {
        let mut meta = txn
            .open_table(META)
            .map_err(store.storage("opening the meta table"))?;
        meta.insert(FLOOR_KEY, floor.encode().as_slice())
            .map_err(store.storage("writing the retention floor"))?;
    }
    Ok(pruned)
}

/// The record that says events were lost (the queue was full).
fn drop_notice(lost: u64, total: u64) -> AuditEvent {
    AuditEvent {
        time_ms: now_unix_ms(),
        side: Some(Side::Broker),
        reason: Some(format!(
            "audit queue full: {lost} events were dropped ({total} since brokerd started)"
        )),
        ..AuditEvent::default()
    }
}
