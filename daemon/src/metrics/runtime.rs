//! What brokerd's process and runtimes hold now: the gauges `brokerctl status` shows and the
//! soak samples (issue 17). Read on demand, never on the request path.

use std::sync::Mutex;

/// The async runtimes whose tasks [`alive_tasks`] counts: the main one and each proxy thread's.
static RUNTIMES: Mutex<Vec<tokio::runtime::Handle>> = Mutex::new(Vec::new());

/// Counts `handle`'s tasks from now on. Runtimes live as long as brokerd, so none is removed.
pub fn register(handle: tokio::runtime::Handle) {
    if let Ok(mut runtimes) = RUNTIMES.lock() {
        runtimes.push(handle);
    }
}

/// Tasks alive on every registered runtime.
pub fn alive_tasks() -> u64 {
    RUNTIMES.lock().map_or(0, |runtimes| {
        runtimes
            .iter()
            .map(|h| h.metrics().num_alive_tasks() as u64)
            .sum()
    })
}

/// brokerd's resident memory and open descriptors.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct Process {
    pub rss_bytes: u64,
    pub open_fds: u64,
}

/// Reads [`Process`] from /proc/self (zero where it cannot be read).
pub fn sample_process() -> Process {
    let rss_bytes = std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|status| vm_rss_bytes(&status))
        .unwrap_or(0);
    // The directory's own descriptor, open while it is read, is not counted.
    let open_fds =
        std::fs::read_dir("/proc/self/fd").map_or(0, |dir| dir.count().saturating_sub(1) as u64);
    Process {
        rss_bytes,
        open_fds,
    }
}

/// `VmRSS` of a /proc/<pid>/status text, in bytes.
fn vm_rss_bytes(status: &str) -> Option<u64> {
    let line = status.lines().find(|l| l.starts_with("VmRSS:"))?;
    let mut words = line["VmRSS:".len()..].split_whitespace();
    let value: u64 = words.next()?.parse().ok()?;
    match words.next()? {
        "kB" => Some(value * 1024),
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_vm_rss_in_bytes() {
        let status = "Name:\tbrokerd\nVmPeak:\t  90000 kB\nVmRSS:\t   12345 kB\nThreads:\t5\n";
        assert_eq!(vm_rss_bytes(status), Some(12345 * 1024));
        assert_eq!(vm_rss_bytes("Name:\tx\n"), None);
        assert_eq!(vm_rss_bytes("VmRSS:\t12 MB\n"), None);
    }

    #[test]
    fn samples_this_process() {
        let p = sample_process();
        assert!(p.rss_bytes > 1024 * 1024, "{p:?}");
        // The test harness's standard streams at least (other tests open and close their own).
        assert!(p.open_fds >= 3, "{p:?}");
    }

    #[test]
    fn counts_the_tasks_of_registered_runtimes() {
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .expect("runtime");
        let before = alive_tasks();
        register(runtime.handle().clone());
        let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
        let task = runtime.spawn(async move {
            let _ = stopped.await;
        });
        assert_eq!(alive_tasks(), before + 1);
        let _ = stop.send(());
        runtime.block_on(task).expect("task");
        assert_eq!(alive_tasks(), before);
    }
}
