//! Brief busy-polling on the proxy threads, so a request in flight does not pay for sleeping.
//!
//! A brokered request makes a proxy thread wait twice: for the upstream's answer and then for
//! the agent's next request. Both usually come back within tens of microseconds, but a thread
//! that sleeps in `epoll_wait` meanwhile must be woken, and on a virtual machine waking an idle
//! vCPU is an inter-processor interrupt and a VM exit on each side: measured on the bench
//! machine, about 3.5 cross-CPU wake-ups per request and a quarter of brokerd's CPU time inside
//! them. Go's scheduler and poll-mode servers answer this the same way: stay awake briefly.
//!
//! After a [`kick`] (a request started, a response arrived, a connection was accepted) the
//! thread's spinner keeps its runtime polling the sockets without sleeping for up to the spin
//! window: each round yields to the runtime (which then checks for I/O with a zero timeout)
//! and, when the round found no new work, to the kernel (`sched_yield`, so another process
//! runnable on this CPU goes first). When
//! the window passes with no new kick the spinner waits, and the thread sleeps as before. An
//! idle broker therefore costs nothing; a busy one spins at most one window after its last
//! request. A window of zero turns spinning off.

use std::{
    cell::Cell,
    time::{Duration, Instant},
};

use tokio::sync::Notify;

/// The spin window brokerd uses unless told otherwise (`--spin-us`).
pub const DEFAULT_WINDOW: Duration = Duration::from_micros(100);

/// One proxy thread's spinner state.
struct State {
    /// Bumped by every kick; the spinner extends its window when it changes.
    kicks: Cell<u64>,
    /// Wakes the spinner from its wait.
    wake: Notify,
}

thread_local! {
    /// Set on proxy threads by [`run`]; other threads have none and kicks there do nothing.
    static STATE: Cell<Option<&'static State>> = const { Cell::new(None) };
}

/// Tells this thread's spinner that work is in flight: keep polling for a window.
pub fn kick() {
    STATE.with(|s| {
        if let Some(state) = s.get() {
            state.kicks.set(state.kicks.get().wrapping_add(1));
            state.wake.notify_one();
        }
    });
}

/// The spinner: runs for the life of a proxy thread's runtime, beside its work (join or select
/// it with the thread's main future). Does nothing but wait when `window` is zero.
pub async fn run(window: Duration) {
    if window.is_zero() {
        return std::future::pending().await;
    }
    // One per proxy thread, for the thread's life.
    let state: &'static State = Box::leak(Box::new(State {
        kicks: Cell::new(0),
        wake: Notify::new(),
    }));
    STATE.with(|s| s.set(Some(state)));
    loop {
        state.wake.notified().await;
        let mut seen = state.kicks.get();
        let mut deadline = Instant::now() + window;
        loop {
            tokio::task::yield_now().await;
            let kicks = state.kicks.get();
            // Give the CPU away only in a round that found no new work: while requests keep
            // coming, a `sched_yield` each round only switched to other processes and back
            // (about 3% of brokerd's CPU per request and 5% of its throughput on 32 busy
            // connections, with the same 1-connection latency).
            if kicks == seen {
                std::thread::yield_now();
            }
            let now = Instant::now();
            if kicks != seen {
                seen = kicks;
                deadline = now + window;
            } else if now >= deadline {
                break;
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// How often this thread has slept (given up the CPU waiting for something).
    fn sleeps() -> u64 {
        let status = std::fs::read_to_string("/proc/thread-self/status").expect("status");
        status
            .lines()
            .find_map(|l| l.strip_prefix("voluntary_ctxt_switches:"))
            .and_then(|v| v.trim().parse().ok())
            .expect("voluntary_ctxt_switches")
    }

    /// Runs `body` on a single-threaded runtime beside a spinner with `window`, as a proxy
    /// thread does.
    fn on_proxy_thread<F: std::future::Future<Output = ()>>(window: Duration, body: F) {
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .expect("runtime");
        runtime.block_on(async {
            tokio::select! {
                () = body => {}
                () = run(window) => unreachable!("the spinner never ends"),
            }
        });
    }

    #[test]
    fn kicks_off_a_proxy_thread_do_nothing() {
        kick();
        assert!(STATE.with(Cell::get).is_none());
    }

    #[test]
    fn within_the_window_the_thread_waits_without_sleeping() {
        on_proxy_thread(Duration::from_millis(200), async {
            tokio::task::yield_now().await;
            kick();
            let before = sleeps();
            tokio::time::sleep(Duration::from_millis(5)).await;
            assert_eq!(sleeps() - before, 0, "the thread slept while spinning");
        });
    }

    #[test]
    fn without_a_kick_or_after_the_window_the_thread_sleeps() {
        on_proxy_thread(Duration::from_millis(10), async {
            tokio::task::yield_now().await;
            let before = sleeps();
            tokio::time::sleep(Duration::from_millis(5)).await;
            assert!(
                sleeps() > before,
                "no kick yet, but the thread did not sleep"
            );
            kick();
            tokio::time::sleep(Duration::from_millis(30)).await;
            let before = sleeps();
            tokio::time::sleep(Duration::from_millis(5)).await;
            assert!(
                sleeps() > before,
                "the window passed, but the thread did not sleep"
            );
        });
    }

    #[test]
    fn a_zero_window_never_spins() {
        on_proxy_thread(Duration::ZERO, async {
            kick();
            let before = sleeps();
            tokio::time::sleep(Duration::from_millis(5)).await;
            assert!(
                sleeps() > before,
                "spinning is off, but the thread did not sleep"
            );
        });
    }
}
