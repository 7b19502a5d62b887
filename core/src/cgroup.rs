//! cgroup v2: finding the mount, naming cgroups safely, and answering questions about them.
//!
//! The cgroup2 mount is discovered from `/proc/self/mountinfo`, never assumed: on hybrid hosts it
//! lives at `/sys/fs/cgroup/unified` or elsewhere. Operators name cgroups relative to that mount
//! (`agents/demo`); [`CgroupPath`] is the validated form of such a name.

use std::{
    fmt, fs, io,
    os::unix::fs::MetadataExt as _,
    path::{Path, PathBuf},
};

/// Errors of this module.
#[derive(Debug, thiserror::Error)]
pub enum CgroupError {
    #[error("no cgroup2 filesystem is mounted (looked in /proc/self/mountinfo)")]
    NoCgroup2Mount,
    #[error("cannot read {path}")]
    Read {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("invalid cgroup path {path:?}: {reason}")]
    InvalidPath { path: String, reason: &'static str },
    #[error("cgroup {0} does not exist (pass --create to create it)")]
    Missing(CgroupPath),
    #[error("cannot create cgroup {path}")]
    Create {
        path: CgroupPath,
        #[source]
        source: io::Error,
    },
    #[error("cannot move process {pid} into cgroup {path}")]
    Join {
        pid: u32,
        path: CgroupPath,
        #[source]
        source: io::Error,
    },
    #[error("process {pid} has no cgroup v2 membership in /proc/{pid}/cgroup")]
    NoMembership { pid: u32 },
}

/// The cgroup2 hierarchy as seen from this process's mount namespace.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct CgroupRoot {
    /// Where the cgroup2 filesystem is mounted.
    mount: PathBuf,
    /// The cgroup the mount shows at its top (mountinfo field 4), `/` unless the mount is a
    /// subtree (for example inside a cgroup namespace).
    mount_root: String,
}

impl CgroupRoot {
    /// Finds the cgroup2 mount from `/proc/self/mountinfo`.
    pub fn discover() -> Result<Self, CgroupError> {
        let path = Path::new("/proc/self/mountinfo");
        let text = fs::read_to_string(path).map_err(|source| CgroupError::Read {
            path: path.into(),
            source,
        })?;
        Self::from_mountinfo(&text).ok_or(CgroupError::NoCgroup2Mount)
    }

    /// Parses mountinfo text and returns the first cgroup2 mount.
    pub fn from_mountinfo(text: &str) -> Option<Self> {
        text.lines().find_map(|line| {
            let (left, right) = line.split_once(" - ")?;
            if right.split_whitespace().next()? != "cgroup2" {
                return None;
            }
            let fields: Vec<&str> = left.split_whitespace().collect();
            Some(Self {
                mount_root: unescape_mountinfo(fields.get(3)?),
                mount: PathBuf::from(unescape_mountinfo(fields.get(4)?)),
            })
        })
    }

    /// A root at an explicit mount point (tests).
    pub fn at(mount: impl Into<PathBuf>) -> Self {
        Self {
            mount: mount.into(),
            mount_root: "/".into(),
        }
    }

    /// Where the cgroup2 filesystem is mounted.
    pub fn mount(&self) -> &Path {
        &self.mount
    }

    /// The directory of a cgroup.
    pub fn dir(&self, cgroup: &CgroupPath) -> PathBuf {
        self.mount.join(&cgroup.0)
    }

    /// Whether the cgroup's directory exists.
    pub fn exists(&self, cgroup: &CgroupPath) -> bool {
        self.dir(cgroup).join("cgroup.procs").is_file()
    }

    /// Creates the cgroup (and missing parents).
    pub fn create(&self, cgroup: &CgroupPath) -> Result<(), CgroupError> {
        fs::create_dir_all(self.dir(cgroup)).map_err(|source| CgroupError::Create {
            path: cgroup.clone(),
            source,
        })
    }

    /// The cgroup id: the inode number of its directory, which is what
    /// `bpf_get_current_cgroup_id()` returns for tasks in it.
    pub fn id(&self, cgroup: &CgroupPath) -> Result<CgroupId, CgroupError> {
        let dir = self.dir(cgroup);
        if !self.exists(cgroup) {
            return Err(CgroupError::Missing(cgroup.clone()));
        }
        let meta = fs::metadata(&dir).map_err(|source| CgroupError::Read { path: dir, source })?;
        Ok(CgroupId(meta.ino()))
    }

    /// Finds the cgroup with `id` in the subtree rooted at `top` (inclusive).
    pub fn find_in_subtree(&self, top: &CgroupPath, id: CgroupId) -> Option<CgroupPath> {
        let mut stack = vec![top.clone()];
        while let Some(cg) = stack.pop() {
            let dir = self.dir(&cg);
            let Ok(meta) = fs::metadata(&dir) else {
                continue;
            };
            if meta.ino() == id.0 {
                return Some(cg);
            }
            let Ok(entries) = fs::read_dir(&dir) else {
                continue;
            };
            for entry in entries.flatten() {
                if entry.file_type().is_ok_and(|t| t.is_dir())
                    && let Some(name) = entry.file_name().to_str()
                {
                    stack.push(cg.child(name));
                }
            }
        }
        None
    }

    /// Number of processes in the cgroup and every cgroup below it.
    pub fn process_count(&self, cgroup: &CgroupPath) -> u64 {
        fn count(dir: &Path) -> u64 {
            let own = fs::read_to_string(dir.join("cgroup.procs"))
                .map(|s| s.lines().filter(|l| !l.trim().is_empty()).count() as u64)
                .unwrap_or(0);
            let children: u64 = fs::read_dir(dir)
                .into_iter()
                .flatten()
                .flatten()
                .filter(|e| e.file_type().is_ok_and(|t| t.is_dir()))
                .map(|e| count(&e.path()))
                .sum();
            own + children
        }
        count(&self.dir(cgroup))
    }

    /// The cgroup v2 a process belongs to, relative to this mount. `None` when the process's
    /// cgroup is outside what this mount shows.
    pub fn cgroup_of(&self, pid: u32) -> Result<Option<CgroupPath>, CgroupError> {
        let path = PathBuf::from(format!("/proc/{pid}/cgroup"));
        let text =
            fs::read_to_string(&path).map_err(|source| CgroupError::Read { path, source })?;
        let line = text
            .lines()
            .find_map(|l| l.strip_prefix("0::"))
            .ok_or(CgroupError::NoMembership { pid })?;
        // The path in /proc/PID/cgroup is relative to the cgroup namespace root; this mount
        // shows `mount_root` at its top.
        let rel = if self.mount_root == "/" {
            Some(line)
        } else {
            line.strip_prefix(self.mount_root.as_str())
        };
        Ok(rel.map(CgroupPath::from_kernel))
    }

    /// Moves a process into a cgroup.
    pub fn join(&self, cgroup: &CgroupPath, pid: u32) -> Result<(), CgroupError> {
        fs::write(self.dir(cgroup).join("cgroup.procs"), pid.to_string()).map_err(|source| {
            CgroupError::Join {
                pid,
                path: cgroup.clone(),
                source,
            }
        })
    }
}

/// Decodes mountinfo's octal escapes (`\040` for a space).
fn unescape_mountinfo(field: &str) -> String {
    let bytes = field.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        let octal = bytes
            .get(i + 1..i + 4)
            .filter(|d| bytes[i] == b'\\' && d.iter().all(|c| (b'0'..=b'7').contains(c)));
        match octal {
            Some(d) => {
                out.push((d[0] - b'0') << 6 | (d[1] - b'0') << 3 | (d[2] - b'0'));
                i += 4;
            }
            None => {
                out.push(bytes[i]);
                i += 1;
            }
        }
    }
    String::from_utf8_lossy(&out).into_owned()
}

/// A cgroup named relative to the cgroup2 mount, e.g. `agents/demo`. Never empty (the root
/// cannot be tagged), never contains `.` or `..` components, never absolute once parsed.
#[derive(Clone, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct CgroupPath(String);

impl CgroupPath {
    /// Validates an operator-supplied path. A leading `/` is accepted and means the same as
    /// none (the path is always relative to the cgroup2 mount).
    pub fn parse(raw: &str) -> Result<Self, CgroupError> {
        let invalid = |reason| CgroupError::InvalidPath {
            path: raw.to_string(),
            reason,
        };
        if raw.contains('\0') {
            return Err(invalid("contains a NUL byte"));
        }
        let mut parts = Vec::new();
        for part in raw.split('/') {
            match part {
                "" => continue,
                "." | ".." => return Err(invalid("`.` and `..` components are not allowed")),
                p => parts.push(p),
            }
        }
        if parts.is_empty() {
            return Err(invalid(
                "the root cgroup cannot be tagged; name a cgroup below it",
            ));
        }
        Ok(Self(parts.join("/")))
    }

    /// A path as the kernel prints it in /proc/PID/cgroup (`/` for the root, which this type
    /// otherwise refuses; [`CgroupPath::is_root`] tells).
    fn from_kernel(line: &str) -> Self {
        Self(line.trim_matches('/').to_string())
    }

    /// The root of the hierarchy, as the cgroup of a process (never as a tag target).
    pub fn is_root(&self) -> bool {
        self.0.is_empty()
    }

    /// The path relative to the mount, without a leading `/`.
    pub fn as_str(&self) -> &str {
        &self.0
    }

    /// A direct child of this cgroup.
    pub fn child(&self, name: &str) -> Self {
        if self.0.is_empty() {
            Self(name.to_string())
        } else {
            Self(format!("{}/{}", self.0, name))
        }
    }

    /// The parent cgroup; `None` for the root. A top-level cgroup's parent is the root.
    pub fn parent(&self) -> Option<Self> {
        if self.0.is_empty() {
            return None;
        }
        Some(match self.0.rsplit_once('/') {
            Some((parent, _)) => Self(parent.to_string()),
            None => Self(String::new()),
        })
    }

    /// Whether `self` is `other` or one of its ancestors (the root is everyone's ancestor).
    pub fn is_ancestor_or_self_of(&self, other: &CgroupPath) -> bool {
        self.0.is_empty()
            || other.0 == self.0
            || other
                .0
                .strip_prefix(self.0.as_str())
                .is_some_and(|rest| rest.starts_with('/'))
    }
}

impl fmt::Display for CgroupPath {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.0.is_empty() {
            f.write_str("/")
        } else {
            f.write_str(&self.0)
        }
    }
}

/// A cgroup v2 id, as `bpf_get_current_cgroup_id()` reports it.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct CgroupId(pub u64);

impl fmt::Display for CgroupId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        self.0.fmt(f)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const HYBRID: &str = "\
31 23 0:28 / /sys/fs/cgroup rw,relatime - tmpfs tmpfs rw,mode=755
32 31 0:29 / /sys/fs/cgroup/cpu rw,relatime - cgroup cgroup rw,cpu
41 31 0:38 / /sys/fs/cgroup/unified rw,relatime - cgroup2 cgroup2 rw
";

    #[test]
    fn finds_cgroup2_on_a_hybrid_host() {
        let root = CgroupRoot::from_mountinfo(HYBRID).expect("cgroup2 mount");
        assert_eq!(root.mount(), Path::new("/sys/fs/cgroup/unified"));
    }

    #[test]
    fn decodes_octal_escapes_in_mount_points() {
        let text = "41 31 0:38 / /mnt/my\\040cgroups rw - cgroup2 cgroup2 rw\n";
        let root = CgroupRoot::from_mountinfo(text).expect("cgroup2 mount");
        assert_eq!(root.mount(), Path::new("/mnt/my cgroups"));
    }

    #[test]
    fn no_cgroup2_mount_is_none() {
        let text = "32 31 0:29 / /sys/fs/cgroup/cpu rw - cgroup cgroup rw,cpu\n";
        assert!(CgroupRoot::from_mountinfo(text).is_none());
    }

    #[test]
    fn valid_paths_are_normalised() {
        for (raw, want) in [
            ("agents/demo", "agents/demo"),
            ("/agents/demo", "agents/demo"),
            ("agents//demo/", "agents/demo"),
        ] {
            assert_eq!(CgroupPath::parse(raw).expect(raw).as_str(), want);
        }
    }

    #[test]
    fn root_dot_and_dotdot_are_refused() {
        for raw in [
            "",
            "/",
            "//",
            ".",
            "..",
            "agents/../etc",
            "agents/./x",
            "a/..",
        ] {
            let err = CgroupPath::parse(raw).expect_err(raw).to_string();
            assert!(err.contains("invalid cgroup path"), "{raw}: {err}");
        }
    }

    #[test]
    fn ancestry() {
        let p = |s| CgroupPath::parse(s).expect(s);
        assert!(p("agents").is_ancestor_or_self_of(&p("agents/demo")));
        assert!(p("agents/demo").is_ancestor_or_self_of(&p("agents/demo")));
        assert!(!p("agents/demo").is_ancestor_or_self_of(&p("agents")));
        assert!(!p("agents/de").is_ancestor_or_self_of(&p("agents/demo")));
        assert!(CgroupPath::from_kernel("/").is_ancestor_or_self_of(&p("x")));
    }
}
