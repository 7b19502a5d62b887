//! Everything a soak starts, on loopback only: the test API (`test-api`, h2 and http/1.1 over
//! TLS, SSE and a WebSocket echo) on 127.0.0.2, a DNS responder that gives the soak's names that
//! address (brokerd's `--dns-upstream`: the host's resolver is never asked), and brokerd with
//! the soak's policy, key and pins of its own. Agents run in cgroups below `agents/soak-PID`,
//! each tagged by `brokerctl run --create`. [`Lab::stop`] undoes all of it: it untags every
//! cgroup below that one, stops each process by pid, removes the pins and the cgroups.

use std::{
    fs,
    io::Read as _,
    net::{IpAddr, Ipv4Addr, SocketAddr, TcpListener},
    os::unix::fs::PermissionsExt as _,
    path::{Path, PathBuf},
    process::{Command, Stdio},
    sync::Mutex,
};

use anyhow::{Context as _, Result, bail};
use sha2::{Digest as _, Sha256};

use crate::{bench::process::Services, cmd, names};

/// The cgroup the soak's policy governs, with the soak's pid after it (two soaks never share
/// one); every agent runs in a cgroup below it.
const PARENT: &str = "agents/soak";
/// brokerd's bpffs pin directory, apart from the default one, also with the soak's pid after it.
const PIN_DIR: &str = "/sys/fs/bpf/agent-broker-soak";
/// Where the test API listens.
pub const API_IP: Ipv4Addr = Ipv4Addr::new(127, 0, 0, 2);
/// The name the key goes to (h1 and h2 keep-alive, SSE, WebSocket).
pub const API: &str = "api.soak.test";
/// A name whose rule has a low rate limit.
pub const LIMITED: &str = "limited.soak.test";
/// A name whose rule the policy reloads add and remove in turn.
pub const TOGGLED: &str = "toggle.soak.test";
/// A name no rule allows.
pub const DENIED: &str = "denied.soak.test";
/// The names short-lived agents look up through brokerd's DNS and call, each a leaf of its own.
pub const NAMES: usize = 16;
/// The name the key has in brokerd's vault.
pub const SECRET_NAME: &str = "SOAK_KEY";
/// The limited rule's rate: a burst of 12 requests sees both answers.
const LIMITED_RATE: &str = "rate = { per_second = 2, burst = 4 }";

/// The `i`-th of the short-lived agents' names.
pub fn name(i: usize) -> String {
    format!("n{i}.names.soak.test")
}

/// The running lab.
pub struct Lab {
    dir: PathBuf,
    bin: PathBuf,
    /// `agents/soak-PID`.
    parent: String,
    /// `/sys/fs/bpf/agent-broker-soak-PID`.
    pin_dir: String,
    /// Locked only to start, check and stop them (never while a load thread waits on it).
    services: Mutex<Services>,
    pub api_port: u16,
    brokerd_pid: Option<u32>,
    /// sha256 hex of `Bearer <key>` for every key the vault has held, newest last.
    keys: Mutex<Vec<String>>,
    /// Whether the toggled rule is in the policy now.
    toggled: Mutex<bool>,
}

impl Lab {
    /// A lab keeping its files in `dir` (which must exist, empty and private), running brokerd,
    /// brokerctl and test-api from `bin`.
    pub fn new(dir: &Path, bin: &Path) -> Result<Self> {
        let api_port = TcpListener::bind((IpAddr::V4(API_IP), 0))
            .and_then(|l| l.local_addr())
            .with_context(|| format!("finding a free port on {API_IP}"))?
            .port();
        Ok(Self {
            dir: dir.to_owned(),
            bin: bin.to_owned(),
            parent: format!("{PARENT}-{}", std::process::id()),
            pin_dir: format!("{PIN_DIR}-{}", std::process::id()),
            services: Mutex::new(Services::new(dir)),
            api_port,
            brokerd_pid: None,
            keys: Mutex::new(Vec::new()),
            toggled: Mutex::new(false),
        })
    }

    /// Starts the test API, the DNS responder and brokerd, and stores the first key.
    pub fn start(&mut self) -> Result<()> {
        let api_ca = self.dir.join("test-api-ca.pem");
        let api = SocketAddr::new(IpAddr::V4(API_IP), self.api_port);
        step(&format!(
            "test API on {api} (h2 and http/1.1, SSE, WebSocket)"
        ));
        let mut test_api = Command::new(self.bin.join("test-api"));
        test_api
            .args(["--listen", &api.to_string(), "--ca-out"])
            .arg(&api_ca);
        for name in all_names() {
            test_api.args(["--name", &name]);
        }
        self.services()?.start("test-api", test_api)?;
        self.services()?.wait_listening("the test API", api)?;
        self.services()?
            .wait_until("the test API to write its CA", || api_ca.is_file())?;

        let names: Vec<String> = all_names();
        let names: Vec<&str> = names.iter().map(String::as_str).collect();
        let resolver = names::serve(&names, API_IP)?;

        let policies = self.dir.join("policies");
        fs::create_dir_all(&policies)?;
        fs::write(
            policies.join("soak.toml"),
            policy(&self.parent, self.api_port, false),
        )?;
        step(&format!(
            "brokerd (pins in {}, log in {})",
            self.pin_dir,
            cmd::relative(&self.dir.join("brokerd.log"))
        ));
        let mut brokerd = Command::new(self.bin.join("brokerd"));
        brokerd
            .args(["--dns-upstream", &resolver.to_string()])
            .arg("--state-dir")
            .arg(self.dir.join("brokerd-state"))
            .arg("--run-dir")
            .arg(self.run_dir())
            .arg("--policy-dir")
            .arg(&policies)
            .args(["--pin-dir", &self.pin_dir])
            // A DNS port of its own: the default one may be another brokerd's.
            .args(["--dns-port", "0"])
            .args(["--listen", "127.0.0.1:0", "--listen", "[::1]:0"])
            .arg("--upstream-ca")
            .arg(&api_ca);
        let pid = self.services()?.start("brokerd", brokerd)?;
        self.brokerd_pid = Some(pid);
        let mut status = self.brokerctl();
        status
            .arg("status")
            .stdout(Stdio::null())
            .stderr(Stdio::null());
        self.services()?
            .wait_until("brokerd to answer on its control socket", || {
                status.status().is_ok_and(|s| s.success())
            })?;
        self.set_key("set")
    }

    /// Stores a new random key under [`SECRET_NAME`] (`verb`: `set` or `rotate`) and
    /// remembers its hash.
    fn set_key(&self, verb: &str) -> Result<()> {
        let mut random = [0u8; 16];
        fs::File::open("/dev/urandom")?.read_exact(&mut random)?;
        let key: String = random.iter().map(|b| format!("{b:02x}")).collect();
        let mut child = self
            .brokerctl()
            .args(["secret", verb, SECRET_NAME])
            .stdin(Stdio::piped())
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .with_context(|| format!("starting brokerctl secret {verb}"))?;
        if let Some(mut stdin) = child.stdin.take() {
            use std::io::Write as _;
            stdin.write_all(key.as_bytes())?;
        }
        let out = child.wait_with_output()?;
        if !out.status.success() {
            bail!(
                "brokerctl secret {verb} {SECRET_NAME} failed: {}",
                String::from_utf8_lossy(&out.stderr).trim()
            );
        }
        let hash = hex(&Sha256::digest(format!("Bearer {key}").as_bytes()));
        if let Ok(mut keys) = self.keys.lock() {
            keys.push(hash);
        }
        Ok(())
    }

    /// Rotates the key (a new random value through `brokerctl secret rotate`).
    pub fn rotate_key(&self) -> Result<()> {
        self.set_key("rotate")
    }

    /// Whether `hash` is the hash of `Bearer <a key the vault has held>`, and whether of the
    /// newest.
    pub fn key_hash(&self, hash: &str) -> (bool, bool) {
        self.keys.lock().map_or((false, false), |keys| {
            (
                keys.iter().any(|k| k == hash),
                keys.last().is_some_and(|k| k == hash),
            )
        })
    }

    /// Keys stored so far (the first and each rotation).
    pub fn keys_stored(&self) -> usize {
        self.keys.lock().map_or(0, |k| k.len())
    }

    /// Rewrites the policy with the toggled rule added or removed, and reloads it; returns
    /// whether the rule is now in.
    pub fn toggle_policy(&self) -> Result<bool> {
        let mut toggled = self
            .toggled
            .lock()
            .map_err(|_| anyhow::anyhow!("the toggle's lock is poisoned"))?;
        let next = !*toggled;
        let file = self.dir.join("policies").join("soak.toml");
        fs::write(&file, policy(&self.parent, self.api_port, next))
            .with_context(|| format!("writing {}", file.display()))?;
        let out = self
            .brokerctl()
            .args(["policy", "reload"])
            .output()
            .context("starting brokerctl policy reload")?;
        if !out.status.success() {
            bail!(
                "brokerctl policy reload failed: {}",
                String::from_utf8_lossy(&out.stderr).trim()
            );
        }
        *toggled = next;
        Ok(next)
    }

    /// The metrics text brokerd serves (`brokerctl metrics`).
    pub fn metrics(&self) -> Result<String> {
        let out = self
            .brokerctl()
            .arg("metrics")
            .stderr(Stdio::piped())
            .output()
            .context("starting brokerctl metrics")?;
        if !out.status.success() {
            bail!(
                "brokerctl metrics failed: {}",
                String::from_utf8_lossy(&out.stderr).trim()
            );
        }
        String::from_utf8(out.stdout).context("brokerctl metrics printed non-UTF-8")
    }

    /// Fails when brokerd or the test API has exited.
    pub fn check_running(&self) -> Result<()> {
        self.services()?.check_running()
    }

    fn services(&self) -> Result<std::sync::MutexGuard<'_, Services>> {
        self.services
            .lock()
            .map_err(|_| anyhow::anyhow!("the services' lock is poisoned"))
    }

    pub fn brokerd_pid(&self) -> Option<u32> {
        self.brokerd_pid
    }

    /// `brokerctl run` of `program` in the cgroup `sub` below the soak's (created and tagged).
    pub fn agent(&self, sub: &str, program: &Path) -> Command {
        let mut command = self.brokerctl();
        command
            .args([
                "run",
                "--cgroup",
                &format!("{}/{sub}", self.parent),
                "--create",
                "--",
            ])
            .arg(program);
        command
    }

    /// Untags the cgroup `sub` below the soak's and removes it (and any cgroup below it): the agent is
    /// gone.
    pub fn remove_agent(&self, sub: &str) -> Result<()> {
        let cgroup = format!("{}/{sub}", self.parent);
        let out = self
            .brokerctl()
            .args(["detach", "--cgroup", &cgroup])
            .output()
            .context("starting brokerctl detach")?;
        if !out.status.success() {
            bail!(
                "brokerctl detach --cgroup {cgroup} failed: {}",
                String::from_utf8_lossy(&out.stderr).trim()
            );
        }
        if let Some(mount) = cgroup2_mount() {
            remove_cgroup_tree(&mount.join(&cgroup))
                .with_context(|| format!("removing the cgroup {cgroup}"))?;
        }
        Ok(())
    }

    /// Untags every cgroup below the soak's, stops everything by pid, removes the pins and the
    /// cgroups.
    pub fn stop(&mut self) {
        step(&format!(
            "cleaning up: untag the cgroups below {}, stop what the soak started, remove {}",
            self.parent, self.pin_dir
        ));
        let mount = cgroup2_mount();
        if self.brokerd_pid.is_some()
            && let Some(mount) = &mount
            && let Ok(entries) = fs::read_dir(mount.join(&self.parent))
        {
            for entry in entries.flatten() {
                if entry.file_type().is_ok_and(|t| t.is_dir()) {
                    let cgroup = format!("{}/{}", self.parent, entry.file_name().to_string_lossy());
                    let _ = self
                        .brokerctl()
                        .args(["detach", "--cgroup", &cgroup])
                        .stdout(Stdio::null())
                        .stderr(Stdio::null())
                        .status();
                }
            }
        }
        if let Ok(mut services) = self.services.lock() {
            services.stop_all();
        }
        if Path::new(&self.pin_dir).exists() {
            let _ = fs::remove_dir_all(&self.pin_dir);
        }
        if let Some(mount) = &mount {
            // Every agent has exited by now; `agents` stays when something else uses it.
            let _ = remove_cgroup_tree(&mount.join(&self.parent));
            let _ = fs::remove_dir(mount.join("agents"));
        }
    }

    fn run_dir(&self) -> PathBuf {
        self.dir.join("brokerd-run")
    }

    fn brokerctl(&self) -> Command {
        let mut brokerctl = Command::new(self.bin.join("brokerctl"));
        brokerctl.arg("--run-dir").arg(self.run_dir());
        brokerctl
    }
}

/// Every name the test API's certificate and the DNS responder know.
fn all_names() -> Vec<String> {
    let mut names: Vec<String> = [API, LIMITED, TOGGLED].map(String::from).to_vec();
    names.extend((0..NAMES).map(name));
    names
}

/// The soak's policy for `parent` (and so every agent below it): the key injected for the
/// API, the short-lived agents' names and the limited name; the toggled name when `toggled`.
/// Its shares are far above what the load uses: the soak looks for leaks, not limits (the
/// limited rule's rate limit is the one limit it meets).
fn policy(parent: &str, port: u16, toggled: bool) -> String {
    let rule = |host: &str, extra: &str| {
        format!(
            "\n[[allow]]\nhost = \"{host}\"\nport = {port}\n{extra}\
             inject.headers = {{ authorization = \"Bearer {{secret:{SECRET_NAME}}}\" }}\n"
        )
    };
    let shares = "\n[shares]\nconnections = 100000\nnew_connections_per_second = 100000\n\
                  pending_handshakes = 100000\nrequests_in_flight = 100000\n\
                  dns_queries_per_second = 100000\n";
    let mut text = format!(
        "# Written by cargo xtask soak.\ncgroup = \"{parent}\"\n{shares}{}{}{}",
        rule(API, ""),
        rule("*.names.soak.test", ""),
        rule(LIMITED, &format!("{LIMITED_RATE}\n")),
    );
    if toggled {
        text.push_str(&rule(TOGGLED, ""));
    }
    text
}

/// Removes a cgroup and the cgroups below it, deepest first (only empty cgroups can go). A
/// cgroup already gone is no error.
fn remove_cgroup_tree(dir: &Path) -> std::io::Result<()> {
    let entries = match fs::read_dir(dir) {
        Ok(entries) => entries,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(()),
        Err(e) => return Err(e),
    };
    for entry in entries.flatten() {
        if entry.file_type().is_ok_and(|t| t.is_dir()) {
            remove_cgroup_tree(&entry.path())?;
        }
    }
    match fs::remove_dir(dir) {
        Err(e) if e.kind() != std::io::ErrorKind::NotFound => Err(e),
        _ => Ok(()),
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

/// Lower-case hex.
pub fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

/// Makes `dir` private to root (it holds the vault and the logs).
pub fn private_dir(dir: &Path) -> Result<()> {
    fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    fs::set_permissions(dir, fs::Permissions::from_mode(0o700))?;
    Ok(())
}

fn step(text: &str) {
    eprintln!("soak: {text}");
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_policy_injects_the_key_for_every_rule_and_toggles_one() {
        let off = policy("agents/soak-7", 9443, false);
        assert!(off.contains("cgroup = \"agents/soak-7\""));
        assert!(off.contains("host = \"api.soak.test\"\nport = 9443\n"));
        assert!(off.contains("host = \"*.names.soak.test\"\nport = 9443\n"));
        assert!(off.contains(&format!(
            "host = \"limited.soak.test\"\nport = 9443\n{LIMITED_RATE}\n"
        )));
        assert!(!off.contains(TOGGLED));
        assert!(!off.contains(DENIED));
        assert_eq!(off.matches("{secret:SOAK_KEY}").count(), 3);
        let on = policy("agents/soak-7", 9443, true);
        assert!(on.contains("host = \"toggle.soak.test\"\nport = 9443\n"));
        assert_eq!(on.matches("{secret:SOAK_KEY}").count(), 4);
    }

    #[test]
    fn the_names_cover_every_short_lived_agent() {
        let names = all_names();
        assert_eq!(names.len(), 3 + NAMES);
        assert!(names.contains(&"n15.names.soak.test".to_owned()));
        assert!(!names.iter().any(|n| n == DENIED));
    }
}
