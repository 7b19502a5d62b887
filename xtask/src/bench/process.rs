//! Child processes: services started in their own process groups and stopped by pid, one-shot
//! commands bounded by a deadline, and what `/proc` says about a process tree (CPU time, resident
//! memory and its peak), which is how the bench charges each proxy for its work.

use std::{
    fs,
    net::{SocketAddr, TcpStream},
    os::unix::process::CommandExt as _,
    path::{Path, PathBuf},
    process::{Child, Command, ExitStatus, Stdio},
    sync::{
        Arc,
        atomic::{AtomicBool, AtomicU64, Ordering},
    },
    thread,
    time::{Duration, Instant},
};

use anyhow::{Context as _, Result, bail};
use nix::{
    sys::signal::{Signal, kill, killpg},
    unistd::Pid,
};

use super::stopping;
use crate::cmd;

/// What a one-shot command printed, and how it ended.
pub struct Output {
    pub status: ExitStatus,
    pub stdout: String,
    pub stderr: String,
}

impl Output {
    /// The last lines of stderr (or stdout when stderr is empty), for error messages.
    pub fn stderr_tail(&self) -> String {
        let text = if self.stderr.trim().is_empty() {
            &self.stdout
        } else {
            &self.stderr
        };
        let lines: Vec<&str> = text.lines().collect();
        lines[lines.len().saturating_sub(5)..].join(" | ")
    }
}

/// Runs `command` to completion in its own process group, printing it first. The group is killed
/// when the command outlives `deadline` or the bench is interrupted, so a hung load generator
/// cannot stall the bench.
pub fn output_within(command: &mut Command, deadline: Duration) -> Result<Output> {
    let shown = cmd::echo(command);
    let mut child = command
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .process_group(0)
        .spawn()
        .with_context(|| format!("starting `{shown}`"))?;
    let stdout = drain(child.stdout.take());
    let stderr = drain(child.stderr.take());
    let give_up = Instant::now() + deadline;
    let status = loop {
        if let Some(status) = child.try_wait()? {
            break status;
        }
        if Instant::now() > give_up || stopping() {
            kill_group(&child);
            let _ = child.wait();
            if stopping() {
                bail!("interrupted while running `{shown}`");
            }
            bail!("`{shown}` did not finish within {deadline:?}; killed it");
        }
        thread::sleep(Duration::from_millis(20));
    };
    Ok(Output {
        status,
        stdout: stdout.join().unwrap_or_default(),
        stderr: stderr.join().unwrap_or_default(),
    })
}

/// Reads a pipe to its end on a thread of its own, so neither pipe can fill up and block the
/// child while the other is being read.
fn drain(pipe: Option<impl std::io::Read + Send + 'static>) -> thread::JoinHandle<String> {
    thread::spawn(move || {
        let mut bytes = Vec::new();
        if let Some(mut pipe) = pipe {
            let _ = pipe.read_to_end(&mut bytes);
        }
        String::from_utf8_lossy(&bytes).into_owned()
    })
}

fn kill_group(child: &Child) {
    if let Ok(pid) = i32::try_from(child.id()) {
        let _ = killpg(Pid::from_raw(pid), Signal::SIGKILL);
    }
}

/// The long-running processes the bench starts, stopped in reverse order by [`Services::stop_all`].
pub struct Services {
    log_dir: PathBuf,
    running: Vec<(String, Child)>,
}

impl Services {
    /// Services whose output goes to `<log_dir>/<name>.log`.
    pub fn new(log_dir: &Path) -> Self {
        Self {
            log_dir: log_dir.to_owned(),
            running: Vec::new(),
        }
    }

    /// Starts `command` in its own process group (Ctrl-C reaches only xtask, which then stops
    /// the services in order) and returns its pid.
    pub fn start(&mut self, name: &str, mut command: Command) -> Result<u32> {
        let log = self.log_dir.join(format!("{name}.log"));
        let out = fs::File::create(&log).with_context(|| format!("creating {}", log.display()))?;
        command
            .stdout(out.try_clone()?)
            .stderr(out)
            .stdin(Stdio::null())
            .process_group(0);
        cmd::echo(&command);
        let child = command
            .spawn()
            .with_context(|| format!("starting {name}"))?;
        let pid = child.id();
        self.running.push((name.to_owned(), child));
        Ok(pid)
    }

    /// Waits until `ready` holds, failing early when a service exits or the bench is interrupted.
    pub fn wait_until(&mut self, what: &str, mut ready: impl FnMut() -> bool) -> Result<()> {
        let deadline = Instant::now() + Duration::from_secs(30);
        while !ready() {
            self.check_running()?;
            if stopping() {
                bail!("interrupted while waiting for {what}");
            }
            if Instant::now() > deadline {
                bail!("timed out waiting for {what}");
            }
            thread::sleep(Duration::from_millis(50));
        }
        Ok(())
    }

    /// Waits until something accepts TCP connections on `addr`.
    pub fn wait_listening(&mut self, name: &str, addr: SocketAddr) -> Result<()> {
        self.wait_until(&format!("{name} to listen on {addr}"), || {
            TcpStream::connect_timeout(&addr, Duration::from_millis(200)).is_ok()
        })
    }

    /// Fails when any service has exited, naming its log.
    pub fn check_running(&mut self) -> Result<()> {
        for (name, child) in &mut self.running {
            if let Ok(Some(status)) = child.try_wait() {
                bail!(
                    "{name} exited ({status}); see {}",
                    cmd::relative(&self.log_dir.join(format!("{name}.log")))
                );
            }
        }
        Ok(())
    }

    /// Stops every service, newest first.
    pub fn stop_all(&mut self) {
        while self.stop_newest() {}
    }

    /// Stops the most recently started service (SIGTERM, then SIGKILL if it is still there after
    /// 5 s); false when none is left.
    pub fn stop_newest(&mut self) -> bool {
        let Some((name, mut child)) = self.running.pop() else {
            return false;
        };
        if let Ok(pid) = i32::try_from(child.id()) {
            let _ = kill(Pid::from_raw(pid), Signal::SIGTERM);
            let deadline = Instant::now() + Duration::from_secs(5);
            while matches!(child.try_wait(), Ok(None)) && Instant::now() < deadline {
                thread::sleep(Duration::from_millis(20));
            }
            if matches!(child.try_wait(), Ok(None)) {
                eprintln!("bench: {name} (pid {pid}) ignored SIGTERM; killing it");
                let _ = kill(Pid::from_raw(pid), Signal::SIGKILL);
            }
        }
        let _ = child.wait();
        true
    }
}

/// CPU time (user + system) used so far by `pid` and its descendants, in seconds.
pub fn tree_cpu_seconds(pid: u32) -> Result<f64> {
    let ticks_per_second = clock_ticks_per_second();
    let mut ticks = 0;
    for pid in tree(pid) {
        let stat = fs::read_to_string(format!("/proc/{pid}/stat"))
            .with_context(|| format!("reading /proc/{pid}/stat"))?;
        ticks += cpu_ticks(&stat).with_context(|| format!("parsing /proc/{pid}/stat"))?;
    }
    Ok(ticks as f64 / ticks_per_second)
}

/// Resident memory of `pid` and its descendants, in KiB.
pub fn tree_rss_kib(pid: u32) -> Result<u64> {
    tree_status_kib(pid, "VmRSS:")
}

/// The sum of a `/proc/<pid>/status` field (`VmRSS:`, `VmHWM:`) over `pid` and its descendants,
/// in KiB.
fn tree_status_kib(pid: u32, field: &str) -> Result<u64> {
    let mut total = 0;
    for pid in tree(pid) {
        let status = fs::read_to_string(format!("/proc/{pid}/status"))
            .with_context(|| format!("reading /proc/{pid}/status"))?;
        total += status_kib(&status, field)
            .with_context(|| format!("no {field} in /proc/{pid}/status"))?;
    }
    Ok(total)
}

/// How much the resident memory of a process tree rises above where it was when
/// [`PeakRss::watch`] was called. The kernel's high-water mark of each process (`VmHWM`) is reset
/// to its current RSS at the start (`/proc/<pid>/clear_refs`), and VmRSS is also sampled every
/// 10 ms meanwhile, since the high-water mark is only updated when memory is unmapped; the peak is
/// the larger of the two. Over a tree the high-water marks add up per process, which can only
/// overstate the peak.
pub struct PeakRss {
    pid: u32,
    baseline_kib: u64,
    sampled_kib: Arc<AtomicU64>,
    stop: Arc<AtomicBool>,
    sampler: thread::JoinHandle<()>,
}

impl PeakRss {
    /// Starts watching `pid`'s tree.
    pub fn watch(pid: u32) -> Result<Self> {
        let baseline_kib = tree_rss_kib(pid)?;
        for pid in tree(pid) {
            // "5" resets the peak RSS (Linux 4.0). The sampler still sees the peak if it fails.
            let _ = fs::write(format!("/proc/{pid}/clear_refs"), "5");
        }
        let sampled_kib = Arc::new(AtomicU64::new(baseline_kib));
        let stop = Arc::new(AtomicBool::new(false));
        let sampler = thread::Builder::new()
            .name("bench-rss".into())
            .spawn({
                let sampled_kib = sampled_kib.clone();
                let stop = stop.clone();
                move || {
                    while !stop.load(Ordering::SeqCst) {
                        if let Ok(kib) = tree_rss_kib(pid) {
                            sampled_kib.fetch_max(kib, Ordering::SeqCst);
                        }
                        thread::sleep(Duration::from_millis(10));
                    }
                }
            })
            .context("starting the RSS sampler")?;
        Ok(Self {
            pid,
            baseline_kib,
            sampled_kib,
            stop,
            sampler,
        })
    }

    /// Stops watching; the growth of the peak over the baseline, in KiB.
    pub fn growth_kib(self) -> Result<u64> {
        self.stop.store(true, Ordering::SeqCst);
        let _ = self.sampler.join();
        let high_water = tree_status_kib(self.pid, "VmHWM:")?;
        let peak = high_water.max(self.sampled_kib.load(Ordering::SeqCst));
        Ok(peak.saturating_sub(self.baseline_kib))
    }
}

/// `pid` and its descendants (nginx's workers are its master's children), from the `children`
/// lists of each thread.
fn tree(pid: u32) -> Vec<u32> {
    let mut all = vec![pid];
    let mut next = 0;
    while let Some(&pid) = all.get(next) {
        next += 1;
        let Ok(tasks) = fs::read_dir(format!("/proc/{pid}/task")) else {
            continue;
        };
        for task in tasks.flatten() {
            let children = fs::read_to_string(task.path().join("children")).unwrap_or_default();
            all.extend(
                children
                    .split_whitespace()
                    .filter_map(|c| c.parse::<u32>().ok()),
            );
        }
    }
    all
}

fn clock_ticks_per_second() -> f64 {
    // SAFETY: sysconf only reads a configuration value; it has no preconditions.
    let ticks = unsafe { nix::libc::sysconf(nix::libc::_SC_CLK_TCK) };
    // USER_HZ is 100 on every Linux ABI; sysconf failing would be a broken libc.
    if ticks > 0 { ticks as f64 } else { 100.0 }
}

/// utime + stime from a `/proc/<pid>/stat` line. The command name in parentheses may hold spaces,
/// so the fields are counted from the last `)`: utime and stime are the 14th and 15th fields.
fn cpu_ticks(stat: &str) -> Option<u64> {
    let (_, after_name) = stat.rsplit_once(')')?;
    let fields: Vec<&str> = after_name.split_whitespace().collect();
    let utime: u64 = fields.get(11)?.parse().ok()?;
    let stime: u64 = fields.get(12)?.parse().ok()?;
    Some(utime + stime)
}

/// The value of a field such as `VmRSS:` of a `/proc/<pid>/status` file, in KiB.
fn status_kib(status: &str, field: &str) -> Option<u64> {
    status
        .lines()
        .find_map(|line| line.strip_prefix(field))?
        .split_whitespace()
        .next()?
        .parse()
        .ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_cpu_ticks_after_a_command_name_with_spaces() {
        let stat = "4242 (tokio worker) S 1 4242 4242 0 -1 4194560 100 0 0 0 250 75 0 0 20 0 3";
        assert_eq!(cpu_ticks(stat), Some(325));
        assert_eq!(cpu_ticks("4242 (x) S 1"), None);
    }

    #[test]
    fn reads_vm_rss_and_hwm() {
        let status = "Name:\tbrokerd\nVmPeak:\t  900 kB\nVmHWM:\t   20000 kB\nVmRSS:\t   12345 kB\nThreads:\t3\n";
        assert_eq!(status_kib(status, "VmRSS:"), Some(12345));
        assert_eq!(status_kib(status, "VmHWM:"), Some(20000));
        assert_eq!(status_kib("Name:\tx\n", "VmRSS:"), None);
    }

    #[test]
    fn a_peak_watch_sees_memory_touched_and_freed_meanwhile() -> Result<()> {
        let pid = std::process::id();
        let watch = PeakRss::watch(pid)?;
        // 64 MiB touched, then freed: the peak must show it although RSS is back down.
        let touched = vec![1u8; 64 << 20];
        thread::sleep(Duration::from_millis(50));
        assert_eq!(touched.iter().map(|b| u64::from(*b)).sum::<u64>(), 64 << 20);
        drop(touched);
        let growth = watch.growth_kib()?;
        assert!(growth >= 60 << 10, "{growth} KiB");
        Ok(())
    }
}
