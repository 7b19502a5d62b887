//! The audit writer's CPU priority: idle class while it keeps up, batch class when it falls
//! behind.
//!
//! Every 50 ms the writer encodes, chains and commits the batch of records it gathered, about a
//! millisecond of CPU on a busy machine. As an ordinary thread that work lands on whichever
//! core it wakes on and delays the request in flight there: on the two-core bench machine it was
//! the 1-connection p99 (1.8 ms, against 0.26 ms with the writer in the idle class). So the writer
//! runs in `SCHED_IDLE`, using only CPU time nothing else wants. On a saturated machine an idle
//! class thread may get almost none, so it must not stay there when records wait: the handles
//! raise it to `SCHED_BATCH` (a full share of CPU, no wake-up preemption) as soon as
//! [`PROMOTE_QUEUED`] records are queued, or queued records have waited [`PROMOTE_AFTER`]
//! without the writer taking any. The raise comes from the recording thread, because a starved
//! writer cannot notice its own starvation. Once a commit leaves fewer than [`DEMOTE_BELOW`]
//! queued, the writer returns to the idle class. Flushes and stops raise it too. Changing the
//! policy is best effort: without the permission, the writer stays where it is.

use std::{
    sync::atomic::{AtomicBool, AtomicI32, AtomicU64, AtomicUsize, Ordering},
    time::{Duration, Instant},
};

/// Queued records that raise the writer out of the idle class.
pub const PROMOTE_QUEUED: usize = 1024;
/// How long queued records may wait with the writer taking none before it is raised.
pub const PROMOTE_AFTER: Duration = Duration::from_millis(100);
/// The writer returns to the idle class when a commit leaves fewer records queued than this.
pub const DEMOTE_BELOW: usize = 64;

/// Shared by the writer thread and every handle.
pub struct Priority {
    /// The writer's thread id; 0 until it starts.
    tid: AtomicI32,
    raised: AtomicBool,
    /// Records sent and not yet taken by the writer.
    queued: AtomicUsize,
    /// When the writer last took records, in ms since `epoch`.
    last_take_ms: AtomicU64,
    epoch: Instant,
}

impl Default for Priority {
    fn default() -> Self {
        Self {
            tid: AtomicI32::new(0),
            raised: AtomicBool::new(false),
            queued: AtomicUsize::new(0),
            last_take_ms: AtomicU64::new(0),
            epoch: Instant::now(),
        }
    }
}

/// Whether a record queued behind `before` others, `waited` after the writer last took any,
/// should raise the writer.
pub fn should_raise(before: usize, waited: Duration) -> bool {
    before >= PROMOTE_QUEUED || (before > 0 && waited >= PROMOTE_AFTER)
}

impl Priority {
    /// On the writer thread, once: registers it and moves it to the idle class.
    pub fn writer_started(&self) {
        // SAFETY: gettid has no preconditions.
        let tid = unsafe { libc::gettid() };
        self.tid.store(tid, Ordering::Release);
        self.last_take_ms.store(self.now_ms(), Ordering::Relaxed);
        set_policy(0, libc::SCHED_IDLE);
    }

    /// After a record was queued.
    pub fn queued_one(&self) {
        let before = self.queued.fetch_add(1, Ordering::Relaxed);
        if self.raised.load(Ordering::Relaxed) {
            return;
        }
        let waited = self
            .now_ms()
            .saturating_sub(self.last_take_ms.load(Ordering::Relaxed));
        if should_raise(before, Duration::from_millis(waited)) {
            self.raise();
        }
    }

    /// Moves the writer to the batch class (it has records to write and must get CPU).
    pub fn raise(&self) {
        let tid = self.tid.load(Ordering::Acquire);
        if tid != 0 && !self.raised.swap(true, Ordering::AcqRel) {
            set_policy(tid, libc::SCHED_BATCH);
        }
    }

    /// On the writer thread: it took `n` records off the queue.
    pub fn took(&self, n: usize) {
        self.queued.fetch_sub(n, Ordering::Relaxed);
        self.last_take_ms.store(self.now_ms(), Ordering::Relaxed);
    }

    /// On the writer thread, after a commit: back to the idle class once caught up.
    pub fn settle(&self) {
        if self.raised.load(Ordering::Acquire)
            && self.queued.load(Ordering::Relaxed) < DEMOTE_BELOW
            && self.raised.swap(false, Ordering::AcqRel)
        {
            set_policy(0, libc::SCHED_IDLE);
        }
    }

    /// Records queued and not yet taken by the writer.
    pub fn queued(&self) -> usize {
        self.queued.load(Ordering::Relaxed)
    }

    /// The writer's thread id (0 before it started).
    #[cfg(test)]
    pub fn tid(&self) -> i32 {
        self.tid.load(Ordering::Acquire)
    }

    fn now_ms(&self) -> u64 {
        self.epoch.elapsed().as_millis() as u64
    }
}

/// Sets thread `tid`'s (0: the caller's) scheduling policy, nice value unchanged. Best effort.
fn set_policy(tid: libc::pid_t, policy: libc::c_int) {
    let param = libc::sched_param { sched_priority: 0 };
    // SAFETY: a plain syscall with a valid parameter struct; a stale tid only fails (ESRCH).
    let rc = unsafe { libc::sched_setscheduler(tid, policy, &param) };
    if rc != 0 {
        tracing::debug!(
            tid,
            policy,
            error = %std::io::Error::last_os_error(),
            "cannot change the audit writer's scheduling class"
        );
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_backlog_or_a_stalled_writer_raises_it_and_an_empty_queue_never_does() {
        assert!(
            !should_raise(0, Duration::from_secs(60)),
            "idle writer, nothing queued"
        );
        assert!(!should_raise(10, Duration::from_millis(5)));
        assert!(should_raise(10, PROMOTE_AFTER));
        assert!(should_raise(PROMOTE_QUEUED, Duration::ZERO));
    }
}
