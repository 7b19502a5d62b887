//! cgroup v2 for tests: find the mount, make a throwaway cgroup, start processes inside it, ask
//! the kernel which programs are attached to it.

use std::{
    ffi::CString,
    fs,
    os::unix::{ffi::OsStrExt as _, io::AsRawFd as _, process::CommandExt as _},
    path::{Path, PathBuf},
    process::{Child, Command},
    sync::OnceLock,
    time::Duration,
};

use crate::{poll_until, unique_name};

/// The cgroup2 mount point, from /proc/self/mountinfo. On hybrid hosts it is not
/// /sys/fs/cgroup (here it is /sys/fs/cgroup/unified). Panics when there is none.
pub fn cgroup2_mount() -> &'static Path {
    static MOUNT: OnceLock<PathBuf> = OnceLock::new();
    MOUNT.get_or_init(|| {
        let text = fs::read_to_string("/proc/self/mountinfo")
            .unwrap_or_else(|e| panic!("cannot read /proc/self/mountinfo: {e}"));
        find_cgroup2(&text).unwrap_or_else(|| {
            panic!(
                "no cgroup2 filesystem is mounted (none in /proc/self/mountinfo); brokerd needs \
                 cgroup v2 (mount -t cgroup2 none /sys/fs/cgroup/unified)"
            )
        })
    })
}

/// The first cgroup2 mount point in a mountinfo text. Fields: `id parent maj:min root mountpoint
/// opts... - fstype source superopts`; the mount point has spaces etc. escaped as `\040`.
fn find_cgroup2(mountinfo: &str) -> Option<PathBuf> {
    mountinfo.lines().find_map(|line| {
        let (left, right) = line.split_once(" - ")?;
        if right.split_whitespace().next()? != "cgroup2" {
            return None;
        }
        let point = left.split_whitespace().nth(4)?;
        Some(PathBuf::from(unescape_octal(point)))
    })
}

fn unescape_octal(field: &str) -> String {
    let b = field.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        let octal = b
            .get(i + 1..i + 4)
            .filter(|d| d.iter().all(|c| (b'0'..=b'7').contains(c)));
        match (b[i], octal) {
            (b'\\', Some(d)) => {
                let v = d.iter().fold(0u32, |acc, c| acc * 8 + u32::from(c - b'0'));
                out.push(u8::try_from(v).unwrap_or(b'?'));
                i += 4;
            }
            (c, _) => {
                out.push(c);
                i += 1;
            }
        }
    }
    String::from_utf8_lossy(&out).into_owned()
}

/// Absolute directory of a cgroup given by its path relative to the cgroup2 mount.
pub fn cgroup_dir(rel: &str) -> PathBuf {
    cgroup2_mount().join(rel.trim_start_matches('/'))
}

/// The cgroup2 path of a process, relative to the mount (no leading slash; "" for the root).
pub fn cgroup_of(pid: u32) -> String {
    let text = fs::read_to_string(format!("/proc/{pid}/cgroup"))
        .unwrap_or_else(|e| panic!("cannot read /proc/{pid}/cgroup: {e}"));
    text.lines()
        .find_map(|l| l.strip_prefix("0::"))
        .unwrap_or_else(|| panic!("process {pid} has no cgroup2 entry in /proc/{pid}/cgroup"))
        .trim_start_matches('/')
        .to_string()
}

/// Spawns `cmd` with its process already inside the cgroup `rel` (relative to the mount): the
/// forked child writes "0" (itself) to `cgroup.procs` before exec, so the command never runs
/// outside the cgroup, not even for its first instruction.
pub fn spawn_in_cgroup(rel: &str, cmd: &mut Command) -> Child {
    let procs = cgroup_dir(rel).join("cgroup.procs");
    let procs_c = CString::new(procs.as_os_str().as_bytes())
        .unwrap_or_else(|e| panic!("cgroup path {} has a NUL byte: {e}", procs.display()));
    // SAFETY: the closure runs in the forked child before exec, where only async-signal-safe
    // calls are allowed: open, write and close are, and the path was allocated before the fork.
    unsafe {
        cmd.pre_exec(move || {
            let fd = libc::open(procs_c.as_ptr(), libc::O_WRONLY | libc::O_CLOEXEC);
            if fd < 0 {
                return Err(std::io::Error::last_os_error());
            }
            let n = libc::write(fd, b"0".as_ptr().cast(), 1);
            let err = std::io::Error::last_os_error();
            libc::close(fd);
            if n != 1 {
                return Err(err);
            }
            Ok(())
        });
    }
    cmd.spawn()
        .unwrap_or_else(|e| panic!("cannot start {cmd:?} in cgroup {rel}: {e}"))
}

/// A fresh cgroup directly under the cgroup2 mount, named `abtest-<pid>-<n>`.
///
/// Drop kills every process in it and below it (`cgroup.kill`), waits until it is empty, and
/// removes it and all its child cgroups, deepest first. The kernel detaches any eBPF link
/// attached to a removed cgroup.
pub struct TestCgroup {
    name: String,
}

impl TestCgroup {
    pub fn new() -> Self {
        let name = unique_name();
        let dir = cgroup_dir(&name);
        fs::create_dir(&dir).unwrap_or_else(|e| {
            panic!(
                "cannot create test cgroup {} (is cgroup2 writable by root here?): {e}",
                dir.display()
            )
        });
        Self { name }
    }

    /// Path relative to the cgroup2 mount, as brokerctl takes it.
    pub fn path(&self) -> &str {
        &self.name
    }

    /// Path of a (possibly not yet existing) cgroup below this one, e.g. `child("agent/sub")`.
    pub fn child(&self, sub: &str) -> String {
        format!("{}/{sub}", self.name)
    }

    /// Creates a cgroup below this one (and any missing parents) and returns its path.
    pub fn create_child(&self, sub: &str) -> String {
        let rel = self.child(sub);
        fs::create_dir_all(cgroup_dir(&rel))
            .unwrap_or_else(|e| panic!("cannot create cgroup {rel}: {e}"));
        rel
    }
}

impl Default for TestCgroup {
    fn default() -> Self {
        Self::new()
    }
}

impl Drop for TestCgroup {
    fn drop(&mut self) {
        let dir = cgroup_dir(&self.name);
        if !dir.exists() {
            return;
        }
        if let Err(e) = fs::write(dir.join("cgroup.kill"), "1") {
            eprintln!(
                "warning: cannot kill the processes of {}: {e}",
                dir.display()
            );
        }
        let emptied = poll_until(Duration::from_secs(5), || {
            let events = fs::read_to_string(dir.join("cgroup.events")).ok()?;
            events.lines().any(|l| l == "populated 0").then_some(())
        });
        if emptied.is_none() {
            eprintln!(
                "warning: processes are still running in {} after cgroup.kill",
                dir.display()
            );
        }
        remove_tree(&dir);
    }
}

/// rmdir a cgroup and its child cgroups, deepest first (cgroupfs only removes empty leaves).
fn remove_tree(dir: &Path) {
    if let Ok(entries) = fs::read_dir(dir) {
        for e in entries.flatten() {
            if e.file_type().map(|t| t.is_dir()).unwrap_or(false) {
                remove_tree(&e.path());
            }
        }
    }
    // A moment after the last process exits the kernel may still report the cgroup busy.
    let removed = poll_until(Duration::from_secs(5), || fs::remove_dir(dir).ok());
    if removed.is_none()
        && let Err(e) = fs::remove_dir(dir)
    {
        eprintln!("warning: cannot remove cgroup {}: {e}", dir.display());
    }
}

/// The hooks brokerd attaches to a tagged cgroup, as (name, `bpf_attach_type` from linux/bpf.h).
pub const HOOKS: [(&str, u32); 16] = [
    ("ingress", 0),
    ("egress", 1),
    ("sock_create", 2),
    ("sock_ops", 3),
    ("bind4", 8),
    ("bind6", 9),
    ("connect4", 10),
    ("connect6", 11),
    ("sendmsg4", 14),
    ("sendmsg6", 15),
    ("recvmsg4", 19),
    ("recvmsg6", 20),
    ("getpeername4", 29),
    ("getpeername6", 30),
    ("connect_unix", 49),
    ("sendmsg_unix", 50),
];

/// How many BPF programs are attached directly to the cgroup `rel`, per hook in [`HOOKS`]
/// (`BPF_PROG_QUERY` without `BPF_F_QUERY_EFFECTIVE`, so inherited programs do not count).
/// This is the kernel's own answer, independent of what brokerd reports.
pub fn attached_programs(rel: &str) -> Vec<(&'static str, u32)> {
    let dir =
        fs::File::open(cgroup_dir(rel)).unwrap_or_else(|e| panic!("cannot open cgroup {rel}: {e}"));
    HOOKS
        .iter()
        .map(|&(name, attach_type)| (name, prog_query_count(dir.as_raw_fd(), attach_type, rel)))
        .collect()
}

/// The `query` member of `union bpf_attr` (linux/bpf.h), up to `prog_attach_flags`.
#[repr(C)]
#[derive(Default)]
struct ProgQueryAttr {
    target_fd: u32,
    attach_type: u32,
    query_flags: u32,
    attach_flags: u32,
    prog_ids: u64,
    prog_cnt: u32,
    _pad: u32,
    prog_attach_flags: u64,
}

const BPF_PROG_QUERY: libc::c_long = 16;

fn prog_query_count(cgroup_fd: i32, attach_type: u32, rel: &str) -> u32 {
    let mut attr = ProgQueryAttr {
        target_fd: u32::try_from(cgroup_fd).unwrap_or(u32::MAX),
        attach_type,
        ..Default::default()
    };
    // SAFETY: bpf(BPF_PROG_QUERY) reads and writes only `attr`, which is a live, initialised
    // #[repr(C)] struct of the size passed; prog_ids is 0, so the kernel only returns the count.
    let rc = unsafe {
        libc::syscall(
            libc::SYS_bpf,
            BPF_PROG_QUERY,
            &mut attr as *mut ProgQueryAttr,
            std::mem::size_of::<ProgQueryAttr>(),
        )
    };
    assert!(
        rc == 0,
        "bpf(BPF_PROG_QUERY) on cgroup {rel}, attach type {attach_type}: {}",
        std::io::Error::last_os_error()
    );
    attr.prog_cnt
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn finds_cgroup2_on_a_hybrid_host_and_decodes_escapes() {
        let text = "\
25 1 0:22 / /sys/fs/cgroup ro - tmpfs tmpfs ro,mode=755
41 31 0:38 / /sys/fs/cgroup/un\\040ified rw,relatime shared:9 - cgroup2 cgroup2 rw
";
        assert_eq!(
            find_cgroup2(text),
            Some(PathBuf::from("/sys/fs/cgroup/un ified"))
        );
        assert_eq!(find_cgroup2("1 0 0:1 / / rw - ext4 /dev/vda rw\n"), None);
    }
}
