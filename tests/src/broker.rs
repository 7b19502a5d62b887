//! A brokerd of the test's own, and typed access to it through brokerctl.

use std::{
    ffi::OsString,
    fs::{self, OpenOptions},
    io::{BufRead as _, BufReader, Write as _},
    net::IpAddr,
    os::unix::{fs::PermissionsExt as _, net::UnixStream},
    path::{Path, PathBuf},
    process::{Child, Command, Output, Stdio},
    sync::Mutex,
    time::{Duration, Instant},
};

use agent_broker_protocol::{
    ConnectionRecord, Request, Response, SOCKET_NAME, StatusReport, decode_line, encode_line,
};
use nix::{
    sys::signal::{Signal, kill},
    unistd::Pid,
};

use crate::{
    SHORT, bin, poll_until, read_text, resolver::TestResolver, run_with_timeout, spawn_in_cgroup,
    unique_name,
};

/// How long brokerd may take to load its programs and answer `status`.
const READY_TIMEOUT: Duration = Duration::from_secs(20);

/// A running brokerd with its own temporary state/run/policy dirs, a unique bpffs pin dir under
/// /sys/fs/bpf, and listeners on `127.0.0.1` and `[::1]` at a port the kernel picks.
///
/// Its stderr (the tracing log) goes to `brokerd.log` in the temp dir, across restarts; every
/// failure message from this harness includes it. Unless the test passes `--dns-upstream`
/// itself, brokerd asks a [`TestResolver`] of its own, which knows the names the test gives
/// ([`BrokerBuilder::name`], [`Broker::add_name`]) and nothing else: brokerd never queries the
/// host's resolver, and proves a name's addresses (for credentials and name-matched rules) only
/// where the test says the name is. Drop kills brokerd by pid and removes the pin
/// dir, which unpins (and so detaches) every link it made, then the temp dirs.
pub struct Broker {
    child: Option<Child>,
    dir: tempfile::TempDir,
    pin_dir: PathBuf,
    /// cgroup (relative to the mount) brokerd is started in; None: the test's own cgroup.
    cgroup: Option<String>,
    /// `--upstream-ca` files.
    upstream_cas: Vec<PathBuf>,
    extra_args: Vec<String>,
    /// Extra environment variables for brokerd (e.g. `KUBECONFIG`).
    envs: Vec<(String, String)>,
    /// The command line brokerd's arguments follow, when not the built brokerd.
    command: Option<Vec<OsString>>,
    /// The resolver brokerd asks, unless the test named its own.
    resolver: Option<TestResolver>,
    starts: u32,
    /// Byte length of brokerd.log when the current (or last) start began.
    log_start: u64,
    /// stdout and stderr of every brokerctl run through this harness, for leak scans.
    transcript: Mutex<Vec<u8>>,
    /// `brokerd --unprivileged` running as this uid (see [`BrokerBuilder::unprivileged`]).
    unprivileged: Option<u32>,
}

/// How to start a [`Broker`]: where, with which policy files and upstream CAs.
///
/// Policy files are written into brokerd's policy dir before it starts (brokerd reads them at
/// start).
#[derive(Default)]
pub struct BrokerBuilder {
    cgroup: Option<String>,
    policies: Vec<(String, String)>,
    upstream_cas: Vec<PathBuf>,
    extra_args: Vec<String>,
    envs: Vec<(String, String)>,
    names: Vec<(String, IpAddr)>,
    command: Option<Vec<OsString>>,
    unprivileged: Option<u32>,
}

impl BrokerBuilder {
    /// An extra brokerd argument (e.g. `--dns-upstream`, `--require-lsm`).
    pub fn arg(mut self, arg: &str) -> Self {
        self.extra_args.push(arg.to_string());
        self
    }

    /// An environment variable for brokerd (e.g. `KUBECONFIG` for the kube pod source).
    pub fn env(mut self, key: &str, value: &str) -> Self {
        self.envs.push((key.to_string(), value.to_string()));
        self
    }

    /// Start brokerd as `command` followed by brokerd's arguments, instead of the built brokerd
    /// (e.g. the packaged brokerd under `setpriv` with its unit's capabilities).
    pub fn command(mut self, command: &[OsString]) -> Self {
        self.command = Some(command.to_vec());
        self
    }

    /// Start `brokerd --unprivileged` as the uid `uid` (and gid, the same number), without
    /// root and without eBPF (issue 19): its directories belong to that uid, and agents are
    /// started with `brokerctl run --unprivileged` as that uid too ([`crate::clients`]).
    pub fn unprivileged(mut self, uid: u32) -> Self {
        self.unprivileged = Some(uid);
        self
    }

    /// Start brokerd inside the cgroup `rel` (relative to the mount) instead of the test's own.
    pub fn in_cgroup(mut self, rel: &str) -> Self {
        self.cgroup = Some(rel.to_string());
        self
    }

    /// A policy file `<name>.toml` with this content.
    pub fn policy(mut self, name: &str, toml: &str) -> Self {
        self.policies
            .push((format!("{name}.toml"), toml.to_string()));
        self
    }

    /// A name brokerd's resolver answers with `ip` (see [`Broker`]).
    pub fn name(mut self, name: &str, ip: impl Into<IpAddr>) -> Self {
        self.names.push((name.to_string(), ip.into()));
        self
    }

    /// An extra trusted CA for upstream servers (`--upstream-ca FILE`).
    pub fn upstream_ca(mut self, pem: &Path) -> Self {
        self.upstream_cas.push(pem.to_path_buf());
        self
    }

    /// Starts brokerd and waits until it answers `status`; panics with its log otherwise.
    pub fn start(self) -> Broker {
        let mut broker = self.prepare();
        broker.spawn();
        broker
    }

    /// Creates the dirs and files but does not start brokerd (see [`Broker::try_start`]).
    pub fn prepare(self) -> Broker {
        let dir = tempfile::Builder::new()
            .prefix("abtest-broker-")
            .tempdir()
            .unwrap_or_else(|e| panic!("cannot create a temp dir for brokerd: {e}"));
        // Agents started with `brokerctl run` are unprivileged (uid 65534 or a user namespace
        // mapped to it): they must reach the scratch dir below, not brokerd's state.
        fs::set_permissions(dir.path(), fs::Permissions::from_mode(0o755))
            .unwrap_or_else(|e| panic!("cannot open up the temp dir: {e}"));
        for sub in ["state", "policy"] {
            fs::create_dir(dir.path().join(sub))
                .unwrap_or_else(|e| panic!("cannot create {sub} dir: {e}"));
        }
        fs::set_permissions(dir.path().join("state"), fs::Permissions::from_mode(0o700))
            .unwrap_or_else(|e| panic!("cannot restrict the state dir: {e}"));
        for (name, toml) in &self.policies {
            let path = dir.path().join("policy").join(name);
            fs::write(&path, toml)
                .unwrap_or_else(|e| panic!("cannot write policy {}: {e}", path.display()));
        }
        let mut extra_args = self.extra_args;
        let mut command = self.command;
        if let Some(uid) = self.unprivileged {
            let run = dir.path().join("run");
            fs::create_dir(&run).unwrap_or_else(|e| panic!("cannot create the run dir: {e}"));
            for sub in [dir.path().join("state"), run] {
                nix::unistd::chown(&sub, Some(uid.into()), Some(uid.into()))
                    .unwrap_or_else(|e| panic!("cannot give {} to uid {uid}: {e}", sub.display()));
            }
            assert!(
                command.is_none(),
                "an unprivileged brokerd runs the built brokerd"
            );
            command = Some(crate::as_uid(uid, &bin("brokerd")));
            extra_args.push("--unprivileged".into());
        }
        let resolver = if extra_args.iter().any(|a| a == "--dns-upstream") {
            assert!(
                self.names.is_empty(),
                "names for the harness's resolver, but the test chose its own --dns-upstream"
            );
            None
        } else {
            let resolver = TestResolver::start(&[] as &[(&str, IpAddr)]);
            for (name, ip) in &self.names {
                resolver.add(name, *ip);
            }
            extra_args.extend(["--dns-upstream".to_string(), resolver.addr().to_string()]);
            Some(resolver)
        };
        Broker {
            child: None,
            dir,
            pin_dir: PathBuf::from("/sys/fs/bpf").join(unique_name()),
            cgroup: self.cgroup,
            upstream_cas: self.upstream_cas,
            extra_args,
            envs: self.envs,
            command,
            resolver,
            starts: 0,
            log_start: 0,
            transcript: Mutex::new(Vec::new()),
            unprivileged: self.unprivileged,
        }
    }
}

impl Broker {
    /// Starts brokerd in the test process's cgroup and waits until it answers `status`.
    pub fn start() -> Self {
        Self::builder().start()
    }

    /// Starts brokerd inside the cgroup `rel` (relative to the mount).
    pub fn start_in_cgroup(rel: &str) -> Self {
        Self::builder().in_cgroup(rel).start()
    }

    /// A builder for a brokerd with policies and upstream CAs.
    pub fn builder() -> BrokerBuilder {
        BrokerBuilder::default()
    }

    fn spawn(&mut self) {
        if let Err(failure) = self.try_spawn() {
            panic!("{failure}");
        }
    }

    /// Starts brokerd and waits until it is ready. When it exits during startup instead, returns
    /// the exit status and its log from this start.
    fn try_spawn(&mut self) -> Result<(), String> {
        assert!(self.child.is_none(), "brokerd is already running");
        self.starts += 1;
        let log_path = self.log_path();
        self.log_start = fs::metadata(&log_path).map(|m| m.len()).unwrap_or(0);
        let mut log = OpenOptions::new()
            .create(true)
            .append(true)
            .open(&log_path)
            .unwrap_or_else(|e| panic!("cannot open {}: {e}", log_path.display()));
        let _ = writeln!(log, "===== harness: brokerd start #{} =====", self.starts);
        let mut cmd = match self.command.as_deref() {
            Some([program, args @ ..]) => {
                let mut cmd = Command::new(program);
                cmd.args(args);
                cmd
            }
            _ => Command::new(bin("brokerd")),
        };
        cmd.arg("--state-dir")
            .arg(self.state_dir())
            .arg("--run-dir")
            .arg(self.run_dir())
            .arg("--policy-dir")
            .arg(self.policy_dir())
            .arg("--pin-dir")
            .arg(&self.pin_dir)
            .args(["--listen", "127.0.0.1:0", "--listen", "[::1]:0"]);
        for ca in &self.upstream_cas {
            cmd.arg("--upstream-ca").arg(ca);
        }
        // A DNS port the kernel picks, unless the test chose one: runs side by side never
        // collide on the default port.
        if !self.extra_args.iter().any(|a| a == "--dns-port") {
            cmd.args(["--dns-port", "0"]);
        }
        cmd.args(&self.extra_args);
        cmd.envs(self.envs.iter().map(|(k, v)| (k, v)));
        cmd.env("RUST_LOG", "info")
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
        self.wait_ready(pid)
    }

    /// Polls `brokerctl status --json` until it answers with this brokerd's pid.
    fn wait_ready(&mut self, pid: u32) -> Result<(), String> {
        let deadline = Instant::now() + READY_TIMEOUT;
        loop {
            if let Some(child) = self.child.as_mut()
                && let Ok(Some(status)) = child.try_wait()
            {
                self.child = None;
                return Err(format!(
                    "brokerd exited during startup ({status}); its log:\n{}",
                    self.log()
                ));
            }
            let out = self.ctl_output(&["status", "--json"]);
            let last = if out.status.success() {
                match serde_json::from_slice::<StatusReport>(&out.stdout) {
                    Ok(s) if s.pid == pid => return Ok(()),
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

    /// Makes brokerd's resolver answer `name` with `ip` too (see [`TestResolver::add`]).
    /// Panics when the test gave brokerd a resolver of its own.
    pub fn add_name(&self, name: &str, ip: impl Into<IpAddr>) {
        self.resolver
            .as_ref()
            .unwrap_or_else(|| panic!("brokerd asks the test's own resolver, not the harness's"))
            .add(name, ip.into());
    }

    /// Makes brokerd's resolver answer `name` with `ips` only, with this TTL (see
    /// [`TestResolver::set`]).
    pub fn set_name(&self, name: &str, ips: &[IpAddr], ttl: u32) {
        self.resolver
            .as_ref()
            .unwrap_or_else(|| panic!("brokerd asks the test's own resolver, not the harness's"))
            .set(name, ips, ttl);
    }

    /// Every audit record, as `brokerctl logs --json` prints them.
    pub fn audit_records(&self) -> Vec<agent_broker_protocol::AuditEvent> {
        self.ctl_ok(&["logs", "--json"])
            .lines()
            .filter(|l| !l.trim().is_empty())
            .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("bad log line ({e}): {l}")))
            .collect()
    }

    /// The first audit record that `matches`, waiting up to `timeout` for the group commit that
    /// stores it; panics naming `what` when none comes.
    pub fn wait_record(
        &self,
        what: &str,
        timeout: Duration,
        matches: impl Fn(&agent_broker_protocol::AuditEvent) -> bool,
    ) -> agent_broker_protocol::AuditEvent {
        let mut found = None;
        crate::wait_for(
            &format!("{what} should be in the audit log"),
            timeout,
            || {
                found = self.audit_records().into_iter().find(|r| matches(r));
                found.is_some()
            },
        );
        found.unwrap_or_default()
    }

    /// The tag at cgroup path `cgroup`, as `status` lists it: `None` when it is not tagged,
    /// `Some(None)` when it runs under its path, `Some(Some(name))` under an agent name.
    pub fn tag_name_of(&self, cgroup: &str) -> Option<Option<String>> {
        self.status()
            .cgroups
            .into_iter()
            .find(|c| c.path == cgroup)
            .map(|c| c.name)
    }

    /// The uid an unprivileged brokerd runs as (`None`: root, with eBPF).
    pub fn unprivileged(&self) -> Option<u32> {
        self.unprivileged
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

    /// `--state-dir`: master.key, vault.redb, ...
    pub fn state_dir(&self) -> PathBuf {
        self.dir.path().join("state")
    }

    /// `--policy-dir`.
    pub fn policy_dir(&self) -> PathBuf {
        self.dir.path().join("policy")
    }

    /// Writes the policy file `<name>.toml` in the policy dir atomically, as an editor or a
    /// deployment tool does: the text goes to a dot-file (which brokerd ignores) that is then
    /// renamed over the file, so brokerd never reads a half-written file. Returns its path.
    pub fn write_policy(&self, name: &str, toml: &str) -> PathBuf {
        let dir = self.policy_dir();
        let path = dir.join(format!("{name}.toml"));
        let tmp = dir.join(format!(".{name}.toml.{}.tmp", unique_name()));
        fs::write(&tmp, toml).unwrap_or_else(|e| panic!("cannot write {}: {e}", tmp.display()));
        fs::rename(&tmp, &path).unwrap_or_else(|e| {
            panic!("cannot rename {} to {}: {e}", tmp.display(), path.display())
        });
        path
    }

    /// A scratch directory of this broker's temp dir (created), e.g. for an exported CA. It is
    /// world-writable (sticky, like /tmp): sandboxed agents write their reports there.
    pub fn scratch_dir(&self) -> PathBuf {
        let dir = self.dir.path().join("scratch");
        fs::create_dir_all(&dir).unwrap_or_else(|e| panic!("cannot create {}: {e}", dir.display()));
        fs::set_permissions(&dir, fs::Permissions::from_mode(0o1777))
            .unwrap_or_else(|e| panic!("cannot open up {}: {e}", dir.display()));
        dir
    }

    /// brokerd's stderr since the current (or last) start began.
    pub fn log_of_last_start(&self) -> String {
        let all = fs::read(self.log_path()).unwrap_or_default();
        let from = usize::try_from(self.log_start).unwrap_or(0).min(all.len());
        crate::canary::redact(&String::from_utf8_lossy(&all[from..]))
    }

    /// brokerd's whole log as bytes (for leak scans).
    pub fn log_bytes(&self) -> Vec<u8> {
        fs::read(self.log_path()).unwrap_or_default()
    }

    /// Everything brokerctl printed (stdout and stderr) through this harness so far.
    pub fn transcript(&self) -> Vec<u8> {
        self.transcript
            .lock()
            .map(|t| t.clone())
            .unwrap_or_default()
    }

    fn record_output(&self, out: &Output) {
        if let Ok(mut t) = self.transcript.lock() {
            t.extend_from_slice(&out.stdout);
            t.push(b'\n');
            t.extend_from_slice(&out.stderr);
            t.push(b'\n');
        }
    }

    fn log_path(&self) -> PathBuf {
        self.dir.path().join("brokerd.log")
    }

    /// brokerd's stderr so far, over all starts, with every canary secret redacted (this text
    /// goes into failure messages; scan [`Broker::log_bytes`] for leaks).
    pub fn log(&self) -> String {
        crate::canary::redact(&read_text(&self.log_path()))
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
        let out = run_with_timeout(self.ctl().args(args), SHORT);
        self.record_output(&out);
        out
    }

    /// Runs brokerctl with `args`, writing `stdin` to its standard input; its output, whatever
    /// the exit status.
    pub fn ctl_output_with_stdin(&self, args: &[&str], stdin: &[u8]) -> Output {
        let mut cmd = self.ctl();
        cmd.args(args)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped());
        let mut child = cmd
            .spawn()
            .unwrap_or_else(|e| panic!("cannot start brokerctl {args:?}: {e}"));
        if let Some(mut input) = child.stdin.take() {
            input
                .write_all(stdin)
                .unwrap_or_else(|e| panic!("cannot write to brokerctl {args:?}: {e}"));
            // Dropping it closes stdin: brokerctl reads to EOF.
        }
        let out = crate::wait_with_timeout(child, SHORT, &format!("brokerctl {args:?}"));
        self.record_output(&out);
        out
    }

    /// `brokerctl secret set NAME` with the value on stdin (never on the command line); must
    /// succeed. The value is never printed by the harness.
    pub fn secret_set(&self, name: &str, value: &[u8]) {
        let out = self.ctl_output_with_stdin(&["secret", "set", name], value);
        assert!(
            out.status.success(),
            "brokerctl secret set {name} failed ({}): {}\nbrokerd's log:\n{}",
            out.status,
            crate::canary::redact(&String::from_utf8_lossy(&out.stderr)),
            self.log()
        );
    }

    /// `brokerctl ca export --out <scratch>/broker-ca.pem`; the file's path.
    pub fn export_ca(&self) -> PathBuf {
        let path = self.scratch_dir().join("broker-ca.pem");
        let out = path.to_string_lossy().into_owned();
        self.ctl_ok(&["ca", "export", "--out", &out]);
        let pem = read_text(&path);
        assert!(
            pem.contains("-----BEGIN CERTIFICATE-----"),
            "brokerctl ca export wrote no PEM certificate to {out}: {pem}"
        );
        path
    }

    /// Runs brokerctl with `args`, panicking (with brokerd's log) unless it succeeds; its stdout.
    pub fn ctl_ok(&self, args: &[&str]) -> String {
        let out = self.ctl_output(args);
        assert!(
            out.status.success(),
            "brokerctl {args:?} failed ({}): {}\nbrokerd's log:\n{}",
            out.status,
            crate::canary::redact(&String::from_utf8_lossy(&out.stderr)),
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

    /// Starts brokerd (again), expecting it to work; Err with its exit status and log when it
    /// exits during startup instead.
    pub fn try_start(&mut self) -> Result<(), String> {
        self.try_spawn()
    }

    /// SIGTERM brokerd (by pid) and wait up to 10 s for it to exit (SIGKILL after that).
    /// Returns how it exited, or None when it had to be killed.
    pub fn stop(&mut self) -> Option<std::process::ExitStatus> {
        let mut child = self
            .child
            .take()
            .unwrap_or_else(|| panic!("brokerd is not running"));
        let pid = i32::try_from(child.id()).unwrap_or(i32::MAX);
        let _ = kill(Pid::from_raw(pid), Signal::SIGTERM);
        let exited = poll_until(Duration::from_secs(10), || child.try_wait().ok().flatten());
        if exited.is_none() {
            let _ = kill(Pid::from_raw(pid), Signal::SIGKILL);
            let _ = child.wait();
        }
        exited
    }

    /// Whether brokerd (the child this harness started) is running.
    pub fn is_running(&mut self) -> bool {
        match self.child.as_mut() {
            Some(child) => matches!(child.try_wait(), Ok(None)),
            None => false,
        }
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
