//! `cargo xtask demo`: the README's end-to-end flow against the bundled local test API, with a
//! freshly generated key, repeated until Ctrl-C so `brokerctl console` has something to show.
//!
//! Everything lives under `target/demo` (state, run and policy dirs) and
//! `/sys/fs/bpf/agent-broker-demo`, on its own port, so it does not disturb a brokerd started with
//! the defaults. On exit it untags the cgroup, stops what it started (by pid) and removes its pins.

use std::{
    fs,
    io::Read as _,
    net::Ipv4Addr,
    os::unix::{fs::PermissionsExt as _, process::CommandExt as _},
    path::{Path, PathBuf},
    process::{Child, Command, Stdio},
    sync::atomic::{AtomicBool, Ordering},
    thread,
    time::{Duration, Instant},
};

use anyhow::{Context as _, Result, bail};

use crate::{
    build::{self, Profile},
    cmd, names, paths, running_as_root,
};

/// The demo's agent cgroup (the shipped policies/demo.toml governs it).
const CGROUP: &str = "agents/demo";
/// Where the test API listens: the address policies/demo.toml allows (port 443 on
/// api.example.test), resolved by the agent with curl's --resolve.
const API_ADDR: &str = "127.0.0.2:443";
const BROKER_PORT: u16 = 15101;
const PIN_DIR: &str = "/sys/fs/bpf/agent-broker-demo";

static STOP: AtomicBool = AtomicBool::new(false);

extern "C" fn on_signal(_: nix::libc::c_int) {
    STOP.store(true, Ordering::SeqCst);
}

/// Runs the demo; `calls` limits the number of rounds (None: until Ctrl-C).
pub fn demo(calls: Option<u32>) -> Result<()> {
    if !running_as_root() {
        bail!("the demo starts brokerd, which must run as root (run `cargo xtask demo` as root)");
    }
    build::build(Profile::Debug)?;
    let bin = paths::target_dir().join("debug");
    let dir = paths::target_dir().join("demo");
    if dir.exists() {
        fs::remove_dir_all(&dir).with_context(|| format!("removing the old {}", dir.display()))?;
    }
    remove_pins(Path::new(PIN_DIR));
    for sub in ["policies", "state"] {
        fs::create_dir_all(dir.join(sub))?;
    }
    fs::set_permissions(&dir, fs::Permissions::from_mode(0o700))?;

    // SAFETY: the handler only stores to an atomic, which is async-signal-safe.
    unsafe {
        let action = nix::sys::signal::SigAction::new(
            nix::sys::signal::SigHandler::Handler(on_signal),
            nix::sys::signal::SaFlags::empty(),
            nix::sys::signal::SigSet::empty(),
        );
        nix::sys::signal::sigaction(nix::sys::signal::Signal::SIGINT, &action)?;
        nix::sys::signal::sigaction(nix::sys::signal::Signal::SIGTERM, &action)?;
    }

    let mut demo = Demo {
        bin,
        dir,
        children: Vec::new(),
    };
    let result = demo.run(calls);
    demo.cleanup();
    result
}

struct Demo {
    bin: PathBuf,
    dir: PathBuf,
    children: Vec<(&'static str, Child)>,
}

impl Demo {
    fn run(&mut self, calls: Option<u32>) -> Result<()> {
        let key = self.dir.join("demo.key");
        step(&format!(
            "1. generate a key (never printed) in {}",
            cmd::relative(&key)
        ));
        let mut random = [0u8; 18];
        fs::File::open("/dev/urandom")?.read_exact(&mut random)?;
        let hex: String = random.iter().map(|b| format!("{b:02x}")).collect();
        fs::write(&key, format!("demo-{hex}\n"))?;
        fs::set_permissions(&key, fs::Permissions::from_mode(0o600))?;

        let api_ca = self.dir.join("test-api-ca.pem");
        step(&format!(
            "2. start the local test API on {API_ADDR} (its own test CA)"
        ));
        let mut api = Command::new(self.bin.join("test-api"));
        api.args(["--listen", API_ADDR, "--ca-out"])
            .arg(&api_ca)
            .arg("--expect-bearer-file")
            .arg(&key);
        self.spawn("test-api", api, &self.dir.join("test-api.log"))?;
        self.wait_for(|| api_ca.is_file(), "the test API to write its CA")?;

        let policies = self.dir.join("policies");
        step("3. policy: policies/demo.toml (agents/demo may call api.example.test, key injected)");
        fs::copy(
            paths::root().join("policies/demo.toml"),
            policies.join("demo.toml"),
        )?;

        let run_dir = self.dir.join("run");
        step(&format!(
            "4. start brokerd on port {BROKER_PORT} (log: target/demo/brokerd.log)"
        ));
        // brokerd's resolver: the demo's names are the test API's, and the host's resolver is
        // never asked (a credential goes only to an address its name resolves to).
        let resolver = names::serve(
            &["api.example.test", "other.example.test"],
            Ipv4Addr::new(127, 0, 0, 2),
        )?;
        let mut brokerd = Command::new(self.bin.join("brokerd"));
        brokerd
            .args(["--dns-upstream", &resolver.to_string()])
            .arg("--state-dir")
            .arg(self.dir.join("state"))
            .arg("--run-dir")
            .arg(&run_dir)
            .arg("--policy-dir")
            .arg(&policies)
            .args(["--pin-dir", PIN_DIR])
            .args(["--listen", &format!("127.0.0.1:{BROKER_PORT}")])
            .args(["--listen", &format!("[::1]:{BROKER_PORT}")])
            .arg("--upstream-ca")
            .arg(&api_ca);
        self.spawn("brokerd", brokerd, &self.dir.join("brokerd.log"))?;
        let mut status = Self::brokerctl_in(&self.bin, &self.dir, &["status"]);
        self.wait_for(
            || status.output().is_ok_and(|o| o.status.success()),
            "brokerd to answer on its control socket",
        )?;

        step("5. store the key in brokerd's vault (from stdin) and export the broker CA");
        let stored = self
            .brokerctl(&["secret", "set", "EXAMPLE_KEY"])
            .stdin(fs::File::open(&key)?)
            .status()?;
        if !stored.success() {
            bail!("brokerctl secret set failed");
        }
        let broker_ca = self.dir.join("broker-ca.pem");
        let exported = self
            .brokerctl(&["ca", "export", "--out"])
            .arg(&broker_ca)
            .stdout(Stdio::null())
            .status()?;
        if !exported.success() {
            bail!("brokerctl ca export failed");
        }

        step(&format!(
            "6. the agent (curl in {CGROUP}) holds only a placeholder; calls every 2 s, Ctrl-C to stop.\n   \
             Watch: target/debug/brokerctl --run-dir {} connections   (or: console)",
            cmd::relative(&run_dir)
        ));
        let mut round = 0u32;
        while !STOP.load(Ordering::SeqCst) && calls.is_none_or(|n| round < n) {
            round += 1;
            let (host, note) = if round.is_multiple_of(3) {
                ("other.example.test", "no rule: expect 403")
            } else {
                ("api.example.test", "expect 200, key injected")
            };
            let out = self
                .brokerctl(&["run", "--cgroup", CGROUP, "--create", "--"])
                // No --cacert: brokerctl run mounts the system roots plus the broker CA over
                // the standard bundle paths, where curl looks by default.
                .args(["curl", "-s", "-w", "\n%{http_code}"])
                .args(["--resolve", &format!("{host}:443:127.0.0.2")])
                .args(["-H", "Authorization: Bearer placeholder"])
                .arg(format!("https://{host}/v1/whoami"))
                .output()?;
            let text = String::from_utf8_lossy(&out.stdout);
            let (body, code) = text.rsplit_once('\n').unwrap_or((&text, "?"));
            println!("   call {round} to {host} ({note}): HTTP {code} {body}");
            if calls == Some(round) {
                break;
            }
            sleep_unless_stopped(Duration::from_secs(2));
        }
        Ok(())
    }

    fn brokerctl(&self, args: &[&str]) -> Command {
        Self::brokerctl_in(&self.bin, &self.dir, args)
    }

    fn brokerctl_in(bin: &Path, dir: &Path, args: &[&str]) -> Command {
        let mut c = Command::new(bin.join("brokerctl"));
        c.arg("--run-dir").arg(dir.join("run")).args(args);
        c
    }

    /// Starts a child in its own process group (Ctrl-C reaches only xtask, which then stops
    /// the children in order), its output in `log`.
    fn spawn(&mut self, name: &'static str, mut command: Command, log: &Path) -> Result<()> {
        let out = fs::File::create(log)?;
        command
            .stdout(out.try_clone()?)
            .stderr(out)
            .stdin(Stdio::null())
            .process_group(0);
        let child = command
            .spawn()
            .with_context(|| format!("starting {name}"))?;
        self.children.push((name, child));
        Ok(())
    }

    fn wait_for(&mut self, mut ready: impl FnMut() -> bool, what: &str) -> Result<()> {
        let deadline = Instant::now() + Duration::from_secs(20);
        while !ready() {
            for (name, child) in &mut self.children {
                if let Ok(Some(status)) = child.try_wait() {
                    bail!(
                        "{name} exited ({status}) while waiting for {what}; see target/demo/{name}.log"
                    );
                }
            }
            if Instant::now() > deadline || STOP.load(Ordering::SeqCst) {
                bail!("timed out waiting for {what}");
            }
            thread::sleep(Duration::from_millis(100));
        }
        Ok(())
    }

    fn cleanup(&mut self) {
        step("cleaning up: untag agents/demo, stop brokerd and the test API, remove pins");
        let _ = self
            .brokerctl(&["detach", "--cgroup", CGROUP])
            .stdout(Stdio::null())
            .status();
        for (_, child) in self.children.iter_mut().rev() {
            if let Ok(pid) = i32::try_from(child.id()) {
                let _ = nix::sys::signal::kill(
                    nix::unistd::Pid::from_raw(pid),
                    nix::sys::signal::Signal::SIGTERM,
                );
            }
            let _ = child.wait();
        }
        remove_pins(Path::new(PIN_DIR));
        if let Some(mount) = cgroup2_mount() {
            // Only empty cgroups can be removed; the demo's curl processes have exited.
            let _ = fs::remove_dir(mount.join(CGROUP));
            let _ = fs::remove_dir(mount.join("agents"));
        }
    }
}

fn step(text: &str) {
    println!("demo: {text}");
}

fn sleep_unless_stopped(total: Duration) {
    let end = Instant::now() + total;
    while Instant::now() < end && !STOP.load(Ordering::SeqCst) {
        thread::sleep(Duration::from_millis(100));
    }
}

/// Removes a bpffs pin directory tree (which detaches pinned links).
fn remove_pins(dir: &Path) {
    if dir.exists() {
        let _ = fs::remove_dir_all(dir);
    }
}

/// The cgroup2 mount point, from /proc/self/mountinfo.
fn cgroup2_mount() -> Option<PathBuf> {
    let text = fs::read_to_string("/proc/self/mountinfo").ok()?;
    text.lines().find_map(|line| {
        let (left, right) = line.split_once(" - ")?;
        (right.split_whitespace().next()? == "cgroup2")
            .then(|| left.split_whitespace().nth(4).map(PathBuf::from))?
    })
}
