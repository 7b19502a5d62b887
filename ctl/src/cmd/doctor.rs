//! `brokerctl doctor`: what this host offers agent-broker, what is missing, and how to fix it.
//!
//! Each check reads the host (kernel version, BTF, mounts, sysctls, files) or asks brokerd
//! (`status`: the hooks it attached, the LSM layer, its hardening, processes in tagged cgroups
//! that lack the launcher's protections or hold sockets made outside them). Nothing is changed.

use std::{
    fs,
    os::unix::fs::MetadataExt as _,
    path::{Path, PathBuf},
    time::Duration,
};

use agent_broker_protocol::{
    AuditEvent, EventKind, LogFilter, OutsideSocket, Request, Response, StatusReport,
};
use serde::Serialize;

use agent_broker_core::cgroup::CgroupRoot;
use agent_broker_protocol::client::Client;

/// Check this host for what agent-broker needs: kernel and hooks, BTF, cgroup v2, bpffs,
/// Landlock, brokerd's tagged cgroups and pinned links, processes in them that lack the
/// launcher's protections (real root, capabilities...) or hold inet sockets made outside every
/// tagged cgroup (no hook sees those), netlink, the BPF LSM layer, brokerd's
/// hardening, the broker CA in the system store, agents' clients that refused the broker CA in
/// the last hour (per agent and program), master key and state dir permissions, and relevant
/// sysctls; and what `brokerctl run --unprivileged` needs: unprivileged user namespaces (a
/// probe, and the sysctls that turn them off), nftables and iproute2, the Landlock ABI. Run as
/// another user than root, the checks only root mode needs are warnings ("root mode:").
/// Prints what is missing and how to fix it; exits 1 if anything failed.
#[derive(Debug, clap::Args)]
pub struct Args {
    /// One JSON object per check.
    #[arg(long)]
    json: bool,
    /// brokerd's state directory (for the key file and directory checks) [default: root's
    /// /var/lib/agent-broker; another user's, that user's unprivileged brokerd's:
    /// $XDG_STATE_HOME/agent-broker or ~/.local/state/agent-broker].
    #[arg(long, value_name = "DIR")]
    state_dir: Option<PathBuf>,
}

/// Runs and prints every check; exits 1 if one failed.
pub fn run(run_dir: &Path, args: Args) {
    let euid = nix::unistd::geteuid().as_raw();
    let state_dir = args.state_dir.unwrap_or_else(|| {
        if euid == 0 {
            agent_broker_protocol::sandbox::Dirs::system().state
        } else {
            agent_broker_protocol::sandbox::Dirs::of_this_user(euid).state
        }
    });
    let checks = run_checks(&DoctorOptions {
        run_dir,
        state_dir: &state_dir,
    });
    if !print(&checks, args.json) {
        std::process::exit(1);
    }
}

/// How a check came out.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Level {
    Ok,
    /// Works, with a weaker guarantee or a gap worth knowing.
    Warn,
    /// A protection brokerd promises does not hold, or brokerd cannot run.
    Fail,
}

/// One check.
#[derive(Clone, Debug, Serialize)]
pub struct Check {
    pub name: &'static str,
    pub level: Level,
    /// What was found.
    pub found: String,
    /// How to fix it (empty when there is nothing to fix).
    pub fix: String,
}

fn check(
    name: &'static str,
    level: Level,
    found: impl Into<String>,
    fix: impl Into<String>,
) -> Check {
    Check {
        name,
        level,
        found: found.into(),
        fix: fix.into(),
    }
}

/// Where brokerd keeps its state and control socket.
pub struct DoctorOptions<'a> {
    pub run_dir: &'a Path,
    pub state_dir: &'a Path,
}

/// `6.18.44-fc` → (6, 18).
pub fn kernel_version(release: &str) -> Option<(u32, u32)> {
    let mut parts = release.split(['.', '-']);
    let major = parts.next()?.parse().ok()?;
    let minor = parts.next()?.parse().ok()?;
    Some((major, minor))
}

fn sysctl(name: &str) -> Option<String> {
    fs::read_to_string(format!("/proc/sys/{}", name.replace('.', "/")))
        .ok()
        .map(|s| s.trim().to_string())
}

/// Runs every check.
pub fn run_checks(opts: &DoctorOptions<'_>) -> Vec<Check> {
    let mut checks = Vec::new();
    let release = fs::read_to_string("/proc/sys/kernel/osrelease").unwrap_or_default();
    let release = release.trim();
    checks.push(match kernel_version(release) {
        Some(v) if v >= (6, 7) => check(
            "kernel",
            Level::Ok,
            format!("Linux {release}: every hook brokerd uses, AF_UNIX ones included"),
            "",
        ),
        Some(v) if v >= (5, 15) => check(
            "kernel",
            Level::Fail,
            format!("Linux {release}: no AF_UNIX cgroup hooks (6.7), brokerd refuses to start"),
            "use Linux 6.7 or later",
        ),
        _ => check(
            "kernel",
            Level::Fail,
            format!("Linux {release:?}: too old or unreadable"),
            "use Linux 6.7 or later",
        ),
    });
    checks.push(if Path::new("/sys/kernel/btf/vmlinux").exists() {
        check("btf", Level::Ok, "/sys/kernel/btf/vmlinux present", "")
    } else {
        check(
            "btf",
            Level::Warn,
            "no kernel BTF: the optional LSM layer cannot load",
            "a kernel built with CONFIG_DEBUG_INFO_BTF=y",
        )
    });
    let mountinfo = fs::read_to_string("/proc/self/mountinfo").unwrap_or_default();
    checks.push(match CgroupRoot::discover() {
        Ok(root) => {
            let nsdelegate = mountinfo.lines().any(|l| {
                l.contains(" - cgroup2 ") && l.split_whitespace().nth(4) == Some(&*root.mount().to_string_lossy()) && l.contains("nsdelegate")
            });
            check(
                "cgroup v2",
                Level::Ok,
                format!("mounted at {}{}", root.mount().display(), if nsdelegate { " (nsdelegate)" } else { " (without nsdelegate: the launcher's mount namespace keeps agents away from cgroupfs)" }),
                "",
            )
        }
        Err(e) => check("cgroup v2", Level::Fail, e.to_string(), "mount cgroup2 (e.g. mount -t cgroup2 none /sys/fs/cgroup/unified)"),
    });
    let v1_net = mountinfo
        .lines()
        .any(|l| l.contains(" - cgroup ") && (l.contains("net_cls") || l.contains("net_prio")));
    if v1_net {
        checks.push(check(
            "net_cls/net_prio (cgroup v1)",
            Level::Warn,
            "mounted: before Linux 5.15 this silently disabled cgroup2 socket matching",
            "on kernels before 5.15, unmount the v1 net_cls/net_prio hierarchies",
        ));
    }
    let bpffs = mountinfo
        .lines()
        .find(|l| l.contains(" - bpf "))
        .and_then(|l| l.split_whitespace().nth(4).map(str::to_string));
    checks.push(match bpffs {
        Some(at) => check("bpffs", Level::Ok, format!("mounted at {at}"), ""),
        None => check(
            "bpffs",
            Level::Warn,
            "not mounted",
            "brokerd mounts it at /sys/fs/bpf when it starts",
        ),
    });
    let lsms = fs::read_to_string("/sys/kernel/security/lsm").unwrap_or_default();
    checks.push(if lsms.split(',').any(|l| l.trim() == "landlock") {
        check(
            "landlock",
            Level::Ok,
            "active: brokerctl run confines agents' files, signals and abstract sockets",
            "",
        )
    } else {
        check(
            "landlock",
            Level::Warn,
            format!("not in the active LSMs ({})", lsms.trim()),
            "boot with lsm=...,landlock for the launcher's file system confinement",
        )
    });

    match status(opts.run_dir) {
        Ok(s) => {
            status_checks(&s, &mut checks);
            let pem = Client::connect(opts.run_dir)
                .ok()
                .and_then(|mut c| c.call(&Request::CaCert).ok());
            checks.push(match pem {
                Some(Response::CaCert { pem }) if system_store_has(&pem) => check("broker CA", Level::Ok, "in the system trust store", ""),
                Some(Response::CaCert { .. }) => check("broker CA", Level::Warn, "not in the system trust store: agents started another way than `brokerctl run` (which mounts a bundle with it) will fail TLS", "brokerctl ca install"),
                _ => check("broker CA", Level::Warn, "brokerd did not hand out its CA", ""),
            });
            match crate::control::call(opts.run_dir, &Request::SecretList) {
                Ok(Response::Secrets { secrets }) => {
                    checks.extend(credential_checks(&secrets));
                }
                _ => checks.push(check(
                    "credentials",
                    Level::Warn,
                    "brokerd did not list its secrets",
                    "",
                )),
            }
            match recent_tls_failures(opts.run_dir) {
                Ok(events) => checks.extend(handshake_checks(&events)),
                Err(e) => checks.push(check(
                    "TLS refusals",
                    Level::Warn,
                    format!("cannot read the audit log: {e:#}"),
                    "",
                )),
            }
        }
        Err(e) => checks.push(check(
            "brokerd",
            Level::Fail,
            format!("not reachable: {e:#}"),
            if nix::unistd::geteuid().is_root() {
                "start brokerd (cargo xtask run, or the brokerd binary as root)"
            } else {
                "start `brokerd --unprivileged` as this user (or point --run-dir at a brokerd's \
                 run directory)"
            },
        )),
    }

    let key = opts.state_dir.join("master.key");
    checks.push(match fs::metadata(&key) {
        Ok(m) if m.mode() & 0o077 != 0 => check(
            "master key",
            Level::Fail,
            format!(
                "{} is mode {:o}: group or others can read it",
                key.display(),
                m.mode() & 0o777
            ),
            format!("chmod 600 {}", key.display()),
        ),
        // brokerd reads a key file only when it is its own user's: root's, or (unprivileged)
        // the user's who runs doctor.
        Ok(m) if m.uid() != 0 && m.uid() != nix::unistd::geteuid().as_raw() => check(
            "master key",
            Level::Fail,
            format!("{} is owned by uid {}", key.display(), m.uid()),
            format!("chown root {}", key.display()),
        ),
        Ok(m) => check(
            "master key",
            Level::Ok,
            format!("{} is uid {}'s, mode 600", key.display(), m.uid()),
            "",
        ),
        Err(_) => check(
            "master key",
            Level::Ok,
            format!(
                "no {} (a systemd credential, or brokerd has not run yet)",
                key.display()
            ),
            "",
        ),
    });
    checks.push(match fs::metadata(opts.state_dir) {
        Ok(m) if m.mode() & 0o077 != 0 => check(
            "state dir",
            Level::Warn,
            format!(
                "{} is mode {:o}",
                opts.state_dir.display(),
                m.mode() & 0o777
            ),
            format!("chmod 700 {}", opts.state_dir.display()),
        ),
        Ok(_) => check(
            "state dir",
            Level::Ok,
            format!("{} is private", opts.state_dir.display()),
            "",
        ),
        Err(_) => check(
            "state dir",
            Level::Warn,
            format!("{} does not exist", opts.state_dir.display()),
            "start brokerd once (or pass --state-dir)",
        ),
    });

    checks.push(match sysctl("kernel.unprivileged_bpf_disabled").as_deref() {
        Some("0") => check("kernel.unprivileged_bpf_disabled", Level::Warn, "0: unprivileged processes may load BPF programs (the launcher's seccomp filter still refuses bpf())", "sysctl kernel.unprivileged_bpf_disabled=2"),
        Some(v) => check("kernel.unprivileged_bpf_disabled", Level::Ok, v.to_string(), ""),
        None => check("kernel.unprivileged_bpf_disabled", Level::Warn, "unreadable", ""),
    });
    checks.push(match sysctl("user.max_user_namespaces").as_deref() {
        Some("0") => check(
            "user.max_user_namespaces",
            Level::Warn,
            "0: `brokerctl run --userns` cannot work",
            "use --user UID, or sysctl user.max_user_namespaces=65536",
        ),
        Some(v) => check("user.max_user_namespaces", Level::Ok, v.to_string(), ""),
        None => check("user.max_user_namespaces", Level::Warn, "unreadable", ""),
    });
    checks.push(check(
        "kernel.io_uring_disabled",
        Level::Ok,
        format!(
            "{} (the launcher's seccomp filter refuses io_uring to agents either way)",
            sysctl("kernel.io_uring_disabled").unwrap_or_else(|| "absent".into())
        ),
        "",
    ));
    checks.push(check(
        "net.ipv4.ping_group_range",
        Level::Ok,
        format!(
            "{} (ping sockets are refused to agents by cgroup/sock_create either way)",
            sysctl("net.ipv4.ping_group_range")
                .unwrap_or_else(|| "absent".into())
                .replace('\t', " ")
        ),
        "",
    ));
    checks.push(match sysctl("kernel.yama.ptrace_scope") {
        Some(v) => check("kernel.yama.ptrace_scope", Level::Ok, v, ""),
        None => check("kernel.yama.ptrace_scope", Level::Ok, "no Yama: agents are kept from ptrace by their uid, the seccomp filter and brokerd being non-dumpable", ""),
    });
    let root = nix::unistd::geteuid().is_root();
    if !root {
        root_mode_only(&mut checks);
    }
    checks.extend(unprivileged_checks(root));
    checks
}

/// Checks that concern only root mode (eBPF, cgroups, root's state directory): for another
/// user a failure there says nothing about what they can run, so it is a warning, named so.
const ROOT_MODE_CHECKS: [&str; 8] = [
    "kernel",
    "btf",
    "cgroup v2",
    "bpffs",
    "master key",
    "state dir",
    "kernel.unprivileged_bpf_disabled",
    "net_cls/net_prio (cgroup v1)",
];

/// Turns the root-mode checks' failures into warnings marked "root mode:".
pub fn root_mode_only(checks: &mut [Check]) {
    for c in checks.iter_mut() {
        if ROOT_MODE_CHECKS.contains(&c.name) && c.level != Level::Ok {
            c.level = Level::Warn;
            c.found = format!("root mode: {}", c.found);
        }
    }
}

/// What `brokerctl run --unprivileged` needs from the host. Failures are failures for an
/// ordinary user (nothing else works for them) and warnings for root (root mode remains).
pub fn unprivileged_checks(root: bool) -> Vec<Check> {
    use crate::launcher::unprivileged as unpriv;
    let missing = if root { Level::Warn } else { Level::Fail };
    let mut checks = Vec::new();
    // Root may always unshare: probe as nobody, as an ordinary user would.
    let probe = unpriv::probe_namespaces(root.then_some(unpriv::ROOT_FALLBACK_ID));
    let who = if root {
        "uid 65534".to_string()
    } else {
        format!("uid {}", nix::unistd::geteuid())
    };
    let mut off = Vec::new();
    let mut fixes = Vec::new();
    if sysctl("user.max_user_namespaces").as_deref() == Some("0") {
        off.push("user.max_user_namespaces is 0");
        fixes.push("sysctl user.max_user_namespaces=65536");
    }
    if sysctl("kernel.unprivileged_userns_clone").as_deref() == Some("0") {
        off.push("kernel.unprivileged_userns_clone is 0");
        fixes.push("sysctl kernel.unprivileged_userns_clone=1");
    }
    if sysctl("kernel.apparmor_restrict_unprivileged_userns").as_deref() == Some("1") {
        off.push("kernel.apparmor_restrict_unprivileged_userns is 1 (Ubuntu 23.10+)");
        fixes.push(
            "an AppArmor profile for brokerctl with `userns,` (see docs/design/unprivileged.md), \
             or sysctl kernel.apparmor_restrict_unprivileged_userns=0",
        );
    }
    checks.push(match probe {
        Ok(()) => check(
            "unprivileged user namespaces",
            Level::Ok,
            format!("{who} can make user and network namespaces (brokerctl run --unprivileged)"),
            "",
        ),
        Err(e) => check(
            "unprivileged user namespaces",
            missing,
            format!(
                "{who} cannot make a user and network namespace: {e}{}{}",
                if off.is_empty() { "" } else { "; " },
                off.join(", ")
            ),
            if fixes.is_empty() {
                "allow unprivileged user namespaces (a container's seccomp profile may refuse \
                 unshare: run on the host or with a profile that allows it)"
                    .to_string()
            } else {
                fixes.join("; ")
            },
        ),
    });
    let path = std::env::var_os("PATH");
    checks.push(match unpriv::netfilter::NetTools::find(path.as_deref()) {
        Ok(tools) => check(
            "nftables (unprivileged mode)",
            Level::Ok,
            match &tools.firewall {
                unpriv::netfilter::Firewall::Nft(nft) => {
                    format!("{} and {}", nft.display(), tools.ip.display())
                }
                unpriv::netfilter::Firewall::IptablesNft { v4, v6 } => format!(
                    "no nft; {} and {} instead, and {}",
                    v4.display(),
                    v6.display(),
                    tools.ip.display()
                ),
            },
            "",
        ),
        Err(e) => check(
            "nftables (unprivileged mode)",
            missing,
            e.to_string(),
            "apt-get install nftables iproute2 (or dnf install nftables iproute)",
        ),
    });
    checks.push(match unpriv::landlock_abi() {
        Ok(abi) if abi >= 6 => check(
            "landlock ABI",
            Level::Ok,
            format!("{abi}: files, signals and abstract UNIX sockets are confined"),
            "",
        ),
        Ok(abi) => check(
            "landlock ABI",
            Level::Warn,
            format!(
                "{abi}: files are confined, signals and abstract UNIX sockets are not scoped \
                 (ABI 6, Linux 6.12); the sandbox's pid and network namespaces still hide \
                 other processes and the host's abstract sockets"
            ),
            "Linux 6.12 or later",
        ),
        Err(e) => check(
            "landlock ABI",
            Level::Warn,
            format!(
                "no Landlock ({e}): agents can write wherever their uid may (the unprivileged \
                 sandbox runs them as your own uid)"
            ),
            "a kernel with CONFIG_SECURITY_LANDLOCK=y booted with lsm=...,landlock",
        ),
    });
    checks
}

fn status(run_dir: &Path) -> anyhow::Result<StatusReport> {
    match crate::control::call(run_dir, &Request::Status)? {
        Response::Status(s) => Ok(s),
        other => Err(crate::control::unexpected(other)),
    }
}

/// How far back `doctor` looks for agents whose TLS clients refused the broker CA.
const TLS_REFUSALS_WINDOW: Duration = Duration::from_secs(3600);

/// The failed TLS handshakes with agents brokerd recorded in the last hour.
fn recent_tls_failures(run_dir: &Path) -> anyhow::Result<Vec<AuditEvent>> {
    let since = agent_broker_core::time::now_unix_ms()
        .saturating_sub(TLS_REFUSALS_WINDOW.as_millis() as u64);
    let request = Request::Logs {
        filter: LogFilter {
            denied_only: true,
            since_ms: Some(since),
            ..LogFilter::default()
        },
        follow: false,
    };
    let mut client = Client::connect(run_dir)?;
    let mut response = client.call(&request)?;
    let mut events = Vec::new();
    loop {
        match response {
            Response::Event { event } if event.kind == Some(EventKind::TlsFailure) => {
                events.push(event)
            }
            Response::Event { .. } => {}
            Response::EndOfLog => return Ok(events),
            other => return Err(crate::control::unexpected(other)),
        }
        response = client.next_streamed()?;
    }
}

/// One check per agent and program whose TLS client refused the broker CA: they hold their
/// own roots (reqwest with webpki-roots, Bun, a JVM) and need to be told, or passed through.
/// Credentials that are failing, or expired and not renewed: a request that needs one gets
/// 503 until it is fixed (`secret set` again, or the source repaired).
pub fn credential_checks(secrets: &[agent_broker_protocol::SecretInfo]) -> Vec<Check> {
    let mut checks = Vec::new();
    for s in secrets.iter().filter(|s| s.kind != "static") {
        let state = s.state.as_deref().unwrap_or_default();
        if let Some(why) = state.strip_prefix("failed: ") {
            checks.push(check(
                "credentials",
                Level::Fail,
                format!("{} ({}) is failing: {why}", s.name, s.kind),
                match s.kind.as_str() {
                    "exec" | "file" => "repair the source; brokerd tries again by itself",
                    _ if why.contains("retrying") => {
                        "brokerd tries again by itself; check the token endpoint"
                    }
                    _ => "store a new grant: brokerctl secret set NAME --kind ...",
                },
            ));
        } else if state == "expired" {
            checks.push(check(
                "credentials",
                Level::Warn,
                format!(
                    "{} ({}) holds an expired value; the next request fetches a new one",
                    s.name, s.kind
                ),
                "",
            ));
        }
    }
    if checks.is_empty() {
        let n = secrets.iter().filter(|s| s.kind != "static").count();
        checks.push(check(
            "credentials",
            Level::Ok,
            format!("{n} credential(s) that brokerd fetches, none failing"),
            "",
        ));
    }
    checks
}

fn handshake_checks(events: &[AuditEvent]) -> Vec<Check> {
    let by_client = agent_broker_protocol::tls_refusals_by_client(events);
    if by_client.is_empty() {
        return vec![check(
            "TLS refusals",
            Level::Ok,
            "no agent's client refused the broker CA in the last hour",
            "",
        )];
    }
    by_client
        .into_iter()
        .map(|((agent, comm), n)| {
            check(
                "TLS refusals",
                Level::Warn,
                format!(
                    "{agent}: {comm} failed {n} TLS handshake(s) with brokerd in the last hour \
                     (it likely does not trust the broker CA)"
                ),
                agent_broker_protocol::TLS_REFUSAL_FIX,
            )
        })
        .collect()
}

fn status_checks(s: &StatusReport, checks: &mut Vec<Check>) {
    checks.push(check(
        "brokerd",
        Level::Ok,
        format!(
            "up (pid {}), listening on {:?}, DNS on {:?}",
            s.pid, s.listeners, s.dns_listeners
        ),
        "",
    ));
    checks.push(if s.unprivileged {
        check(
            "mode",
            Level::Ok,
            format!(
                "unprivileged: no eBPF, no tagged cgroups; {} sandbox(es) of `brokerctl run \
                 --unprivileged` served",
                s.workloads.len()
            ),
            "",
        )
    } else {
        check(
            "hooks",
            Level::Ok,
            format!("{} per tagged cgroup: {}", s.hooks.len(), s.hooks.join(" ")),
            "",
        )
    });
    for c in &s.cgroups {
        let complete = c.links as usize == s.hooks.len();
        // A named tag is attached again under its name.
        let (agent, as_name) = match &c.name {
            Some(name) => (format!(" (agent {name})"), format!(" --as {name}")),
            None => (String::new(), String::new()),
        };
        checks.push(if complete {
            check(
                "tagged cgroup",
                Level::Ok,
                format!(
                    "{}{agent}: {} pinned links, {} processes",
                    c.path, c.links, c.processes
                ),
                "",
            )
        } else {
            check(
                "tagged cgroup",
                Level::Fail,
                format!("{}{agent}: {} of {} links", c.path, c.links, s.hooks.len()),
                format!(
                    "brokerctl detach --cgroup {0}; brokerctl attach --cgroup {0}{as_name}",
                    c.path
                ),
            )
        });
    }
    for p in &s.unprotected {
        checks.push(check(
            "unprotected process",
            if p.missing.iter().any(|m| m.contains("real root")) { Level::Fail } else { Level::Warn },
            format!("pid {} ({}) in {}: {}", p.pid, p.comm, p.cgroup, p.missing.join("; ")),
            "start agents with `brokerctl run` (unprivileged uid or user namespace, no capabilities, seccomp)",
        ));
    }
    outside_socket_checks(s, checks);
    checks.push(netlink_check(s));
    checks.push(if s.lsm.starts_with("active") {
        check("bpf lsm", Level::Ok, s.lsm.clone(), "")
    } else {
        check(
            "bpf lsm",
            Level::Ok,
            format!("optional, {}", s.lsm),
            "nothing brokerd promises depends on it; brokerd --require-lsm insists on it",
        )
    });
    let hardened = ["not dumpable", "no core dumps", "memory locked"]
        .iter()
        .all(|h| s.hardening.contains(h));
    checks.push(check(
        "brokerd hardening",
        if hardened { Level::Ok } else { Level::Warn },
        s.hardening.clone(),
        if hardened {
            ""
        } else {
            "see brokerd's log for the step that failed"
        },
    ));
}

/// One check per process in a tagged cgroup that holds inet sockets made outside every tagged
/// cgroup: failed when the kernel names the outside cgroup a socket was made in, a warning when
/// it cannot say (a socket neither bound nor connected yet).
pub fn outside_socket_checks(s: &StatusReport, checks: &mut Vec<Check>) {
    let mut pids: Vec<u32> = s.outside_sockets.iter().map(|o| o.pid).collect();
    pids.sort_unstable();
    pids.dedup();
    for pid in pids {
        let held: Vec<&OutsideSocket> = s.outside_sockets.iter().filter(|o| o.pid == pid).collect();
        let Some(first) = held.first() else {
            continue;
        };
        let known = held.iter().any(|o| o.socket_cgroup.is_some());
        let sockets: Vec<String> = held.iter().map(|o| describe_outside_socket(o)).collect();
        checks.push(check(
            "socket made outside",
            if known { Level::Fail } else { Level::Warn },
            format!(
                "pid {} ({}) in {} holds {} inet socket(s) made outside every tagged cgroup, \
                 which no hook redirects or filters: {}",
                pid,
                first.comm,
                first.cgroup,
                held.len(),
                sockets.join("; ")
            ),
            OUTSIDE_SOCKET_FIX,
        ));
    }
    if let Some(note) = &s.outside_sockets_note {
        checks.push(check(
            "socket made outside",
            Level::Warn,
            format!("the scan of tagged cgroups for sockets made outside was partial: {note}"),
            "",
        ));
    }
}

/// How to get rid of a socket made outside: nothing short of ending the process that holds it.
pub const OUTSIDE_SOCKET_FIX: &str = "end the process and start it again inside the cgroup \
     (`brokerctl run --cgroup PATH -- CMD`); a socket keeps the cgroup it was made in, so \
     moving a running process into a tagged cgroup never brings its sockets under the hooks";

/// One socket, as `status` and `doctor` print it: `fd 3 TCP ESTABLISHED 127.0.0.1:5000 ->
/// 127.0.0.1:8000, made in system.slice`.
pub fn describe_outside_socket(o: &OutsideSocket) -> String {
    let mut text = format!("fd {} {} {}", o.fd, o.protocol, o.state);
    match (o.local, o.remote) {
        (Some(l), Some(r)) => text.push_str(&format!(" {l} -> {r}")),
        (Some(l), None) => text.push_str(&format!(" {l}")),
        (None, Some(r)) => text.push_str(&format!(" -> {r}")),
        (None, None) => {}
    }
    match &o.socket_cgroup {
        Some(cg) => text.push_str(&format!(", made in {cg}")),
        None => text.push_str(", made where the kernel cannot say (neither bound nor connected)"),
    }
    text
}

/// AF_NETLINK (issue 13.13): the cgroup hooks cannot refuse it, so only the launcher's seccomp
/// filter (and the BPF LSM layer, where the kernel allows it) keeps agents from reading the
/// host's socket table through sock_diag. A warning naming every process in a tagged cgroup
/// without a seccomp filter.
pub fn netlink_check(s: &StatusReport) -> Check {
    let open: Vec<String> = s
        .unprotected
        .iter()
        .filter(|p| p.missing.iter().any(|m| m.contains("no seccomp filter")))
        .map(|p| format!("pid {} ({}) in {}", p.pid, p.comm, p.cgroup))
        .collect();
    let lsm = s.lsm.starts_with("active");
    let why = "cgroup/sock_create cannot refuse netlink sockets (the kernel runs it for AF_INET \
               and AF_INET6 sockets only)";
    if open.is_empty() || lsm {
        check(
            "netlink",
            Level::Ok,
            format!(
                "{why}; {}",
                if lsm {
                    "the BPF LSM layer refuses netlink families but NETLINK_ROUTE in tagged cgroups"
                } else {
                    "every process in a tagged cgroup has a seccomp filter (brokerctl run's \
                     refuses netlink families but NETLINK_ROUTE)"
                }
            ),
            "",
        )
    } else {
        check(
            "netlink",
            Level::Warn,
            format!(
                "{why}, and without a seccomp filter these can read the host's whole socket \
                 table through netlink sock_diag: {}",
                open.join(", ")
            ),
            "start agents with `brokerctl run` (its seccomp filter refuses netlink families but \
             NETLINK_ROUTE)",
        )
    }
}

/// Whether the system trust store holds `ca_pem` (for `doctor`'s CA check).
pub fn system_store_has(ca_pem: &str) -> bool {
    let needle: String = ca_pem
        .lines()
        .filter(|l| !l.starts_with("-----"))
        .collect::<Vec<_>>()
        .join("\n");
    [
        "/etc/ssl/certs/ca-certificates.crt",
        "/etc/pki/tls/certs/ca-bundle.crt",
    ]
    .iter()
    .filter_map(|p| fs::read_to_string(p).ok())
    .any(|bundle| !needle.is_empty() && bundle.contains(&needle))
}

/// Prints the checks as a table (or JSON lines); returns whether none failed.
pub fn print(checks: &[Check], json: bool) -> bool {
    for c in checks {
        if json {
            outln!("{}", serde_json::to_string(c).unwrap_or_default());
        } else {
            let level = match c.level {
                Level::Ok => "ok",
                Level::Warn => "WARN",
                Level::Fail => "FAIL",
            };
            outln!("{level:<5} {:<32} {}", c.name, c.found);
            if !c.fix.is_empty() && c.level != Level::Ok {
                outln!("{:<38}fix: {}", "", c.fix);
            }
        }
    }
    !checks.iter().any(|c| c.level == Level::Fail)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn handshake_refusals_are_named_per_agent_and_program() {
        let tls = |cgroup: &str, comm: &str| AuditEvent {
            kind: Some(EventKind::TlsFailure),
            cgroup: Some(cgroup.into()),
            comm: Some(comm.into()),
            ..AuditEvent::default()
        };
        let ok = handshake_checks(&[]);
        assert_eq!(ok.len(), 1);
        assert_eq!(ok[0].level, Level::Ok);
        let got = handshake_checks(&[
            tls("agents/a", "bun"),
            tls("agents/a", "bun"),
            tls("agents/b", "java"),
        ]);
        assert_eq!(got.len(), 2);
        assert!(
            got.iter()
                .all(|c| c.level == Level::Warn && !c.fix.is_empty())
        );
        assert!(
            got[0].found.starts_with("agents/a: bun failed 2 TLS"),
            "{}",
            got[0].found
        );
        assert!(
            got[1].found.starts_with("agents/b: java failed 1 TLS"),
            "{}",
            got[1].found
        );
    }

    fn report() -> StatusReport {
        StatusReport {
            version: "0".into(),
            pid: 1,
            listeners: Vec::new(),
            cgroup_root: "/sys/fs/cgroup".into(),
            pin_dir: "/sys/fs/bpf/agent-broker".into(),
            cgroups: Vec::new(),
            counters: agent_broker_protocol::Counters::default(),
            policy: agent_broker_protocol::PolicyStatus {
                dir: "/etc/agent-broker/policies".into(),
                files: 0,
                loaded_unix: 0,
                error: None,
            },
            dns_listeners: Vec::new(),
            hooks: Vec::new(),
            lsm: "not loaded: EPERM".into(),
            hardening: String::new(),
            unprotected: Vec::new(),
            outside_sockets: Vec::new(),
            outside_sockets_note: None,
            shares: Vec::new(),
            open_connections: 0,
            max_connections: 0,
            workloads: Vec::new(),
            audit_error: None,
            audit_dropped: 0,
            runtime: Default::default(),
            unprivileged: false,
        }
    }

    fn outside(pid: u32, fd: u32, made_in: Option<&str>) -> OutsideSocket {
        OutsideSocket {
            cgroup: "agents/a".into(),
            pid,
            comm: "python3".into(),
            fd,
            protocol: "TCP".into(),
            state: if made_in.is_some() {
                "ESTABLISHED"
            } else {
                "unlisted"
            }
            .into(),
            local: made_in.map(|_| "127.0.0.1:40000".parse().expect("addr")),
            remote: made_in.map(|_| "127.0.0.1:8000".parse().expect("addr")),
            socket_cgroup: made_in.map(str::to_string),
        }
    }

    #[test]
    fn sockets_made_outside_fail_doctor_once_per_process() {
        let mut s = report();
        let mut checks = Vec::new();
        outside_socket_checks(&s, &mut checks);
        assert!(checks.is_empty(), "{checks:?}");
        s.outside_sockets = vec![
            outside(10, 3, Some("/")),
            outside(10, 4, Some("system.slice/ssh.service")),
            outside(11, 5, None),
        ];
        s.outside_sockets_note = Some("stopped after 65536 descriptors (at pid 12)".into());
        outside_socket_checks(&s, &mut checks);
        assert_eq!(checks.len(), 3, "{checks:#?}");
        assert_eq!(checks[0].level, Level::Fail);
        assert!(
            checks[0]
                .found
                .starts_with("pid 10 (python3) in agents/a holds 2 inet socket(s)"),
            "{}",
            checks[0].found
        );
        assert!(
            checks[0]
                .found
                .contains("fd 3 TCP ESTABLISHED 127.0.0.1:40000 -> 127.0.0.1:8000, made in /"),
            "{}",
            checks[0].found
        );
        assert!(checks[0].found.contains("made in system.slice/ssh.service"));
        assert!(checks[0].fix.contains("brokerctl run"));
        // Where the kernel cannot say where it was made: a warning, not a failure.
        assert_eq!(checks[1].level, Level::Warn);
        assert!(
            checks[1]
                .found
                .contains("fd 5 TCP unlisted, made where the kernel cannot say"),
            "{}",
            checks[1].found
        );
        assert_eq!(checks[2].level, Level::Warn);
        assert!(checks[2].found.contains("partial"), "{}", checks[2].found);
    }

    #[test]
    fn netlink_warns_about_processes_without_seccomp_unless_the_lsm_refuses_it() {
        let mut s = report();
        let quiet = netlink_check(&s);
        assert_eq!(quiet.level, Level::Ok);
        assert!(quiet.found.contains("AF_INET and AF_INET6 sockets only"));
        s.unprotected = vec![
            agent_broker_protocol::ProcessProtections {
                cgroup: "agents/a".into(),
                pid: 7,
                comm: "sh".into(),
                missing: vec!["no seccomp filter (AF_VSOCK, ...)".into()],
            },
            agent_broker_protocol::ProcessProtections {
                cgroup: "agents/a".into(),
                pid: 8,
                comm: "curl".into(),
                missing: vec!["shares the host's mount namespace".into()],
            },
        ];
        let warned = netlink_check(&s);
        assert_eq!(warned.level, Level::Warn);
        assert!(
            warned.found.contains("pid 7 (sh) in agents/a"),
            "{}",
            warned.found
        );
        assert!(!warned.found.contains("pid 8"), "{}", warned.found);
        assert!(warned.fix.contains("brokerctl run"));
        s.lsm = "active: socket_create".into();
        assert_eq!(netlink_check(&s).level, Level::Ok);
    }

    #[test]
    fn failing_credentials_fail_doctor_and_static_ones_are_not_checked() {
        let info =
            |name: &str, kind: &str, state: Option<&str>| agent_broker_protocol::SecretInfo {
                name: name.into(),
                version: 1,
                created_unix: 0,
                updated_unix: 0,
                kind: kind.into(),
                source: None,
                state: state.map(str::to_owned),
                valid_until_unix: None,
                last_used_unix: None,
            };
        let ok = credential_checks(&[info("K", "static", None), info("T", "oauth", Some("valid"))]);
        assert_eq!(ok.len(), 1);
        assert_eq!(ok[0].level, Level::Ok);
        let bad = credential_checks(&[
            info(
                "T",
                "oauth",
                Some("failed: the token endpoint refused (400 invalid_grant)"),
            ),
            info("E", "exec", Some("expired")),
        ]);
        assert_eq!(bad.len(), 2);
        assert_eq!(bad[0].level, Level::Fail);
        assert!(bad[0].found.contains("invalid_grant") && bad[0].fix.contains("secret set"));
        assert_eq!(bad[1].level, Level::Warn);
    }

    #[test]
    fn root_mode_failures_are_warnings_for_other_users() {
        let mut checks = vec![
            check(
                "kernel",
                Level::Fail,
                "Linux 5.10",
                "use Linux 6.7 or later",
            ),
            check("brokerd", Level::Fail, "not reachable", "start it"),
            check("bpffs", Level::Ok, "mounted", ""),
        ];
        root_mode_only(&mut checks);
        assert_eq!(checks[0].level, Level::Warn);
        assert_eq!(checks[0].found, "root mode: Linux 5.10");
        assert_eq!(
            checks[1].level,
            Level::Fail,
            "brokerd is needed in both modes"
        );
        assert_eq!(checks[2].found, "mounted");
    }

    /// This host (CI installs nftables) can run the unprivileged sandbox: the probe runs as
    /// nobody when the test runs as root.
    #[test]
    fn on_this_host_the_unprivileged_mode_is_possible() {
        let checks = unprivileged_checks(nix::unistd::geteuid().is_root());
        let names: Vec<&str> = checks.iter().map(|c| c.name).collect();
        assert_eq!(
            names,
            [
                "unprivileged user namespaces",
                "nftables (unprivileged mode)",
                "landlock ABI"
            ]
        );
        for c in &checks[..2] {
            assert_eq!(c.level, Level::Ok, "{c:?}");
        }
    }

    #[test]
    fn kernel_versions_parse() {
        assert_eq!(kernel_version("6.18.44-fc-v669"), Some((6, 18)));
        assert_eq!(kernel_version("5.15.0-91-generic"), Some((5, 15)));
        assert_eq!(kernel_version("garbage"), None);
    }

    #[test]
    fn on_this_host_the_cgroup_check_finds_the_real_mount() {
        let dir = tempfile::tempdir().expect("tempdir");
        let checks = run_checks(&DoctorOptions {
            run_dir: dir.path(),
            state_dir: dir.path(),
        });
        let cgroup = checks
            .iter()
            .find(|c| c.name == "cgroup v2")
            .expect("cgroup check");
        let root = CgroupRoot::discover().expect("cgroup2");
        assert_eq!(cgroup.level, Level::Ok, "{cgroup:?}");
        assert!(
            cgroup.found.contains(&*root.mount().to_string_lossy()),
            "{cgroup:?}"
        );
        let brokerd = checks
            .iter()
            .find(|c| c.name == "brokerd")
            .expect("brokerd check");
        assert_eq!(
            brokerd.level,
            Level::Fail,
            "no brokerd runs in an empty run dir"
        );
        assert!(!brokerd.fix.is_empty());
    }

    #[test]
    fn a_group_readable_key_fails() {
        use std::os::unix::fs::PermissionsExt as _;
        let dir = tempfile::tempdir().expect("tempdir");
        let key = dir.path().join("master.key");
        fs::write(&key, [0u8; 32]).expect("key");
        fs::set_permissions(&key, fs::Permissions::from_mode(0o640)).expect("chmod");
        let checks = run_checks(&DoctorOptions {
            run_dir: dir.path(),
            state_dir: dir.path(),
        });
        let c = checks
            .iter()
            .find(|c| c.name == "master key")
            .expect("key check");
        assert_eq!(c.level, Level::Fail, "{c:?}");
        assert!(c.fix.contains("chmod 600"));
    }
}
