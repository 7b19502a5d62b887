//! Which of the launcher's protections a process lacks.
//!
//! `brokerctl run` starts agents unprivileged, in a private mount namespace without cgroupfs
//! and bpffs, with no capabilities, `no_new_privs` and a seccomp filter. A cgroup tagged with
//! `brokerctl attach` may hold processes started some other way; `brokerctl status` and
//! `brokerctl doctor` name what each of them lacks, because some gaps (real root above all) undo
//! the kernel hooks: real root can move itself out of the cgroup or detach the programs.

use std::{fs, path::Path};

use agent_broker_protocol::ProcessProtections;

/// What one process has, read from /proc.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Protections {
    pub pid: u32,
    pub comm: String,
    /// Effective uid (as the host sees it).
    pub uid: u32,
    /// Effective capabilities (hex, as /proc shows them).
    pub cap_eff: u64,
    pub no_new_privs: bool,
    /// seccomp mode: 0 none, 1 strict, 2 filter.
    pub seccomp: u32,
    /// In the host's (brokerd's) user namespace.
    pub host_userns: bool,
    /// In the host's (brokerd's) mount namespace.
    pub host_mountns: bool,
    /// A cgroup or cgroup2 file system is visible in its mount namespace.
    pub cgroupfs_visible: bool,
    /// A bpf file system is visible in its mount namespace.
    pub bpffs_visible: bool,
}

/// Parses the fields of /proc/<pid>/status this module needs.
pub fn parse_status(text: &str, p: &mut Protections) {
    for line in text.lines() {
        let Some((key, value)) = line.split_once(':') else {
            continue;
        };
        let value = value.trim();
        match key {
            "Name" => p.comm = value.to_string(),
            "Uid" => {
                p.uid = value
                    .split_whitespace()
                    .nth(1)
                    .and_then(|v| v.parse().ok())
                    .unwrap_or(u32::MAX)
            }
            "CapEff" => p.cap_eff = u64::from_str_radix(value, 16).unwrap_or(u64::MAX),
            "NoNewPrivs" => p.no_new_privs = value == "1",
            "Seccomp" => p.seccomp = value.parse().unwrap_or(0),
            _ => {}
        }
    }
}

/// Whether a mountinfo text shows a file system of one of `types`.
pub fn mounts_type(mountinfo: &str, types: &[&str]) -> bool {
    mountinfo.lines().any(|line| {
        line.split_once(" - ")
            .and_then(|(_, right)| right.split_whitespace().next())
            .is_some_and(|t| types.contains(&t))
    })
}

/// The namespaces of brokerd's parent when brokerd started (see [`remember_host_namespaces`]).
static PARENT_NAMESPACES: std::sync::OnceLock<Vec<(&'static str, std::path::PathBuf)>> =
    std::sync::OnceLock::new();

/// Remembers the user and mount namespaces of brokerd's parent, which stand for the host's
/// beside brokerd's own: brokerd may have a mount namespace of its own (the systemd unit's
/// ProtectSystem= and PrivateTmp= give it one, and its parent is then pid 1). Called once at
/// start, while the parent is still there.
pub fn remember_host_namespaces() {
    let parent = std::os::unix::process::parent_id();
    PARENT_NAMESPACES.get_or_init(|| {
        ["user", "mnt"]
            .into_iter()
            .filter_map(|ns| {
                fs::read_link(format!("/proc/{parent}/ns/{ns}"))
                    .ok()
                    .map(|link| (ns, link))
            })
            .collect()
    });
}

fn same_ns(pid: u32, ns: &str) -> bool {
    let Ok(theirs) = fs::read_link(format!("/proc/{pid}/ns/{ns}")) else {
        return false;
    };
    // brokerd's own namespaces stand for the host's (pid 1 may be an init of its own), and so
    // do its parent's.
    fs::read_link(format!("/proc/self/ns/{ns}")).is_ok_and(|own| own == theirs)
        || PARENT_NAMESPACES
            .get()
            .is_some_and(|parent| parent.iter().any(|(n, link)| *n == ns && *link == theirs))
}

/// Reads what `pid` has. Fails when the process is gone.
pub fn inspect(pid: u32) -> std::io::Result<Protections> {
    let mut p = Protections {
        pid,
        ..Default::default()
    };
    parse_status(&fs::read_to_string(format!("/proc/{pid}/status"))?, &mut p);
    p.host_userns = same_ns(pid, "user");
    p.host_mountns = same_ns(pid, "mnt");
    let mountinfo = fs::read_to_string(format!("/proc/{pid}/mountinfo")).unwrap_or_default();
    p.cgroupfs_visible = mounts_type(&mountinfo, &["cgroup", "cgroup2"]);
    p.bpffs_visible = mounts_type(&mountinfo, &["bpf"]);
    Ok(p)
}

impl Protections {
    /// The protections this process lacks, most serious first.
    pub fn missing(&self) -> Vec<String> {
        let mut m = Vec::new();
        if self.uid == 0 && self.host_userns {
            m.push(
                "runs as real root (uid 0 in the host user namespace): it can leave its cgroup \
                 and detach the programs"
                    .to_string(),
            );
        }
        if self.cap_eff != 0 {
            m.push(format!("has capabilities (CapEff={:016x})", self.cap_eff));
        }
        if self.cgroupfs_visible {
            m.push("sees cgroupfs (could move itself if it had the rights)".to_string());
        }
        if self.bpffs_visible {
            m.push("sees bpffs (the pinned links)".to_string());
        }
        if self.host_mountns {
            m.push("shares the host's mount namespace".to_string());
        }
        if !self.no_new_privs {
            m.push("no_new_privs not set (setuid binaries work)".to_string());
        }
        if self.seccomp == 0 {
            m.push(
                "no seccomp filter (AF_VSOCK, AF_PACKET, netlink sock_diag, ptrace, bpf are not \
                 refused)"
                    .to_string(),
            );
        }
        m
    }
}

/// Every process in `cgroup_dir` and below that lacks a protection, at most `limit` of them.
pub fn unprotected_in(cgroup_dir: &Path, cgroup: &str, limit: usize) -> Vec<ProcessProtections> {
    let mut out = Vec::new();
    let mut dirs = vec![(cgroup_dir.to_path_buf(), cgroup.to_string())];
    while let Some((dir, name)) = dirs.pop() {
        if let Ok(procs) = fs::read_to_string(dir.join("cgroup.procs")) {
            for pid in procs.lines().filter_map(|l| l.trim().parse::<u32>().ok()) {
                if out.len() >= limit {
                    return out;
                }
                if let Ok(p) = inspect(pid) {
                    let missing = p.missing();
                    if !missing.is_empty() {
                        out.push(ProcessProtections {
                            cgroup: name.clone(),
                            pid,
                            comm: p.comm,
                            missing,
                        });
                    }
                }
            }
        }
        if let Ok(entries) = fs::read_dir(&dir) {
            for e in entries.flatten() {
                if e.file_type().is_ok_and(|t| t.is_dir()) {
                    let child = format!("{name}/{}", e.file_name().to_string_lossy());
                    dirs.push((e.path(), child));
                }
            }
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn status_fields_are_read() {
        let mut p = Protections::default();
        parse_status(
            "Name:\tcurl\nUid:\t1000\t65534\t65534\t65534\nCapEff:\t0000000000000000\n\
             NoNewPrivs:\t1\nSeccomp:\t2\n",
            &mut p,
        );
        assert_eq!(p.comm, "curl");
        assert_eq!(p.uid, 65534, "the effective uid is the second field");
        assert_eq!(p.cap_eff, 0);
        assert!(p.no_new_privs);
        assert_eq!(p.seccomp, 2);
    }

    #[test]
    fn a_sandboxed_process_lacks_nothing_and_real_root_lacks_much() {
        let sandboxed = Protections {
            uid: 65534,
            no_new_privs: true,
            seccomp: 2,
            ..Default::default()
        };
        assert!(sandboxed.missing().is_empty(), "{:?}", sandboxed.missing());
        let root = Protections {
            uid: 0,
            cap_eff: 0x1ff_ffff_ffff,
            host_userns: true,
            host_mountns: true,
            cgroupfs_visible: true,
            bpffs_visible: true,
            ..Default::default()
        };
        let missing = root.missing();
        assert!(missing[0].contains("real root"), "{missing:?}");
        assert_eq!(missing.len(), 7, "{missing:?}");
    }

    #[test]
    fn this_test_process_is_inspected_as_what_it_is() {
        let me = inspect(std::process::id()).expect("inspect self");
        assert!(me.host_mountns && me.host_userns);
        // The tests run as root with capabilities (the privileged suite needs them).
        if me.uid == 0 {
            assert!(me.missing()[0].contains("real root"));
        }
    }

    #[test]
    fn mount_types_are_found_after_the_separator() {
        let text = "31 30 0:27 / /sys/fs/cgroup/unified rw - cgroup2 cgroup2 rw\n";
        assert!(mounts_type(text, &["cgroup2"]));
        assert!(!mounts_type(text, &["bpf"]));
    }
}
