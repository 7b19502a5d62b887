//! A brokerd of the test's own, and typed access to it through brokerctl.

use std::{
    fs::{self, OpenOptions},
    io::{BufRead as _, BufReader, Write as _},
    os::unix::net::UnixStream,
    path::{Path, PathBuf},
    process::{Child, Command, Output, Stdio},
    time::{Duration, Instant},
};

use agent_broker_protocol::{
    ConnectionRecord, Request, Response, SOCKET_NAME, StatusReport, decode_line, encode_line,
};
use nix::{
    sys::signal::{Signal, kill},
    unistd::Pid,
};

use crate::{SHORT, bin, poll_until, read_text, run_with_timeout, spawn_in_cgroup, unique_name};

/// How long brokerd may take to load its programs and answer `status`.
const READY_TIMEOUT: Duration = Duration::from_secs(20);

/// A running brokerd with its own temporary state/run/policy dirs, a unique bpffs pin dir under
/// /sys/fs/bpf, and listeners on 127.0.0.1 and [::1] at a port the kernel picks.
///
/// Its stderr (the tracing log) goes to `brokerd.log` in the temp dir, across restarts; every
/// failure message from this harness includes it. Drop kills brokerd by pid and removes the pin
/// dir, which unpins (and so detaches) every link it made, then the temp dirs.
pub struct Broker {
    child: Option<Child>,
    dir: tempfile::TempDir,
    pin_dir: PathBuf,
    /// cgroup (relative to the mount) brokerd is started in; None: the test's own cgroup.
    cgroup: Option<String>,
    starts: u32,
}

impl Broker {
    /// Starts brokerd in the test process's cgroup and waits until it answers `status`.
    pub fn start() -> Self {
        Self::start_with(None)
    }

    /// Starts brokerd inside the cgroup `rel` (relative to the mount).
    pub fn start_in_cgroup(rel: &str) -> Self {
        Self::start_with(Some(rel.to_string()))
    }

    fn start_with(cgroup: Option<String>) -> Self {
        let dir = tempfile::Builder::new()
            .prefix("abtest-broker-")
            .tempdir()
            .unwrap_or_else(|e| panic!("cannot create a temp dir for brokerd: {e}"));
        for sub in ["state", "policy"] {
            fs::create_dir(dir.path().join(sub))
                .unwrap_or_else(|e| panic!("cannot create {sub} dir: {e}"));
        }
        let mut broker = Self {
            child: None,
            dir,
            pin_dir: PathBuf::from("/sys/fs/bpf").join(unique_name()),
            cgroup,
            starts: 0,
        };
        broker.spawn();
        broker
    }

    fn spawn(&mut self) {
        assert!(self.child.is_none(), "brokerd is already running");
        self.starts += 1;
        let log_path = self.log_path();
        let mut log = OpenOptions::new()
            .create(true)
            .append(true)
            .open(&log_path)
            .unwrap_or_else(|e| panic!("cannot open {}: {e}", log_path.display()));
        let _ = writeln!(log, "===== harness: brokerd start #{} =====", self.starts);
        let mut cmd = Command::new(bin("brokerd"));
        cmd.arg("--state-dir")
            .arg(self.dir.path().join("state"))
            .arg("--run-dir")
            .arg(self.run_dir())
            .arg("--policy-dir")
            .arg(self.dir.path().join("policy"))
            .arg("--pin-dir")
            .arg(&self.pin_dir)
            .args(["--listen", "127.0.0.1:0", "--listen", "[::1]:0"])
            .env("RUST_LOG", "info")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(log);
        let child = match &self.cgroup {
            Some(rel) => spawn_in_cgroup(rel, &mut cmd),
            None => cmd
                .spawn()
                .unwrap_or_else(|e| panic!("cannot start {cmd:?}: {e}")),
        };
        let pid = child.id();
        self.child = Some(child);
        self.wait_ready(pid);
    }

    /// Polls `brokerctl status --json` until it answers with this brokerd's pid.
    fn wait_ready(&mut self, pid: u32) {
        let deadline = Instant::now() + READY_TIMEOUT;
        loop {
            if let Some(child) = self.child.as_mut()
                && let Ok(Some(status)) = child.try_wait()
            {
                self.child = None;
                panic!(
                    "brokerd exited during startup ({status}); its log:\n{}",
                    self.log()
                );
            }
            let out = self.ctl_output(&["status", "--json"]);
            let last = if out.status.success() {
                match serde_json::from_slice::<StatusReport>(&out.stdout) {
                    Ok(s) if s.pid == pid => return,
                    Ok(s) => format!("status answered by pid {}, expected {pid}", s.pid),
                    Err(e) => format!("status --json is not a StatusReport: {e}"),
                }
            } else {
                String::from_utf8_lossy(&out.stderr).into_owned()
            };
            assert!(
                Instant::now() < deadline,
                "brokerd (pid {pid}) not ready after {READY_TIMEOUT:?}; last brokerctl error: \
                 {last}\nbrokerd's log:\n{}",
                self.log()
            );
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// brokerd's pid. Panics when it is not running.
    pub fn pid(&self) -> u32 {
        self.child
            .as_ref()
            .map(Child::id)
            .unwrap_or_else(|| panic!("brokerd is not running"))
    }

    pub fn run_dir(&self) -> PathBuf {
        self.dir.path().join("run")
    }

    pub fn pin_dir(&self) -> &Path {
        &self.pin_dir
    }

    fn log_path(&self) -> PathBuf {
        self.dir.path().join("brokerd.log")
    }

    /// brokerd's stderr so far, over all starts.
    pub fn log(&self) -> String {
        read_text(&self.log_path())
    }

    /// A `brokerctl --run-dir <this broker's run dir>` command, for the caller to complete.
    pub fn ctl(&self) -> Command {
        let mut cmd = Command::new(bin("brokerctl"));
        cmd.arg("--run-dir")
            .arg(self.run_dir())
            .env_remove("AGENT_BROKER_RUN_DIR");
        cmd
    }

    /// Runs brokerctl with `args` and returns its output, whatever the exit status.
    pub fn ctl_output(&self, args: &[&str]) -> Output {
        run_with_timeout(self.ctl().args(args), SHORT)
    }

    /// Runs brokerctl with `args`, panicking (with brokerd's log) unless it succeeds; its stdout.
    pub fn ctl_ok(&self, args: &[&str]) -> String {
        let out = self.ctl_output(args);
        assert!(
            out.status.success(),
            "brokerctl {args:?} failed ({}): {}\nbrokerd's log:\n{}",
            out.status,
            String::from_utf8_lossy(&out.stderr),
            self.log()
        );
        String::from_utf8_lossy(&out.stdout).into_owned()
    }

    /// `brokerctl status --json`.
    pub fn status(&self) -> StatusReport {
        let out = self.ctl_ok(&["status", "--json"]);
        serde_json::from_str(&out)
            .unwrap_or_else(|e| panic!("status --json is not a StatusReport ({e}): {out}"))
    }

    /// `brokerctl connections --json`, oldest first.
    pub fn connections(&self) -> Vec<ConnectionRecord> {
        let out = self.ctl_ok(&["connections", "--limit", "1024", "--json"]);
        serde_json::from_str(&out).unwrap_or_else(|e| {
            panic!("connections --json is not a list of ConnectionRecord ({e}): {out}")
        })
    }

    /// Waits (up to a few seconds) for a connection record matching `pred`; panics listing every
    /// record and brokerd's log otherwise.
    pub fn wait_connection(
        &self,
        what: &str,
        pred: impl Fn(&ConnectionRecord) -> bool,
    ) -> ConnectionRecord {
        let found = poll_until(Duration::from_secs(5), || {
            self.connections().into_iter().find(|c| pred(c))
        });
        found.unwrap_or_else(|| {
            panic!(
                "brokerd recorded no connection for {what}; its records: {:#?}\nbrokerd's log:\n{}",
                self.connections(),
                self.log()
            )
        })
    }

    /// `brokerctl attach --cgroup rel`, which must succeed.
    pub fn attach(&self, rel: &str) {
        self.ctl_ok(&["attach", "--cgroup", rel]);
    }

    /// `brokerctl detach --cgroup rel`, which must succeed.
    pub fn detach(&self, rel: &str) {
        self.ctl_ok(&["detach", "--cgroup", rel]);
    }

    /// Sends one raw request over the control socket (bypassing brokerctl's own checks).
    pub fn request(&self, request: &Request) -> Response {
        let path = self.run_dir().join(SOCKET_NAME);
        let mut stream = UnixStream::connect(&path)
            .unwrap_or_else(|e| panic!("cannot connect to {}: {e}", path.display()));
        let _ = stream.set_read_timeout(Some(SHORT));
        let line = encode_line(request).unwrap_or_else(|e| panic!("cannot encode request: {e}"));
        stream
            .write_all(&line)
            .unwrap_or_else(|e| panic!("cannot send {request:?}: {e}"));
        let mut answer = Vec::new();
        BufReader::new(&stream)
            .read_until(b'\n', &mut answer)
            .unwrap_or_else(|e| panic!("no answer to {request:?}: {e}"));
        decode_line(&answer).unwrap_or_else(|e| {
            panic!(
                "answer to {request:?} is not a Response ({e}): {}",
                String::from_utf8_lossy(&answer)
            )
        })
    }

    /// SIGKILL brokerd (by pid) and reap it. Its pinned links stay attached.
    pub fn kill9(&mut self) {
        let mut child = self
            .child
            .take()
            .unwrap_or_else(|| panic!("brokerd is not running"));
        let pid = i32::try_from(child.id()).unwrap_or(i32::MAX);
        kill(Pid::from_raw(pid), Signal::SIGKILL)
            .unwrap_or_else(|e| panic!("cannot SIGKILL brokerd {pid}: {e}"));
        let _ = child.wait();
    }

    /// Starts brokerd again with the same dirs, pin dir and cgroup (after [`Broker::kill9`]).
    pub fn restart(&mut self) {
        self.spawn();
    }
}

impl Drop for Broker {
    fn drop(&mut self) {
        if let Some(mut child) = self.child.take() {
            if let Ok(pid) = i32::try_from(child.id()) {
                let _ = kill(Pid::from_raw(pid), Signal::SIGKILL);
            }
            let _ = child.wait();
        }
        // Unpinning the last reference to a link detaches it from its cgroup.
        if self.pin_dir.exists()
            && let Err(e) = fs::remove_dir_all(&self.pin_dir)
        {
            eprintln!(
                "warning: cannot remove brokerd's pin dir {}: {e}",
                self.pin_dir.display()
            );
        }
        if std::thread::panicking() {
            eprintln!(
                "---- brokerd's log ({}) ----\n{}---- end of brokerd's log ----",
                self.log_path().display(),
                self.log()
            );
        }
    }
}
