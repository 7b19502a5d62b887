//! Where a tag's agent name (`attach --as`, see [`agent_broker_core::agent_name`]) is kept: an
//! empty directory `as=<encoded name>` in the tag's link pin directory on bpffs, beside the
//! pinned links.
//!
//! Kept there, the name lives exactly as long as the tag: it survives a brokerd restart with
//! the pins (the restarted brokerd adopts both), it goes with them when the cgroup is detached,
//! and a pin directory whose cgroup is gone (or was made again, with a new id) is removed with
//! its name. `mkdir` is atomic, so a crash leaves the name either whole or absent; it is made
//! before the first link is attached, so no link of a named tag is ever pinned without it.

use std::{fs, io, os::unix::fs::DirBuilderExt as _, path::Path};

use agent_broker_core::{agent_name, cgroup::CgroupPath};

/// The name entry's prefix.
const PREFIX: &str = "as=";

/// Longest encoded name that still fits one file name (255 bytes) with its prefix.
pub const MAX_ENCODED: usize = 255 - PREFIX.len();

/// Records `name` in the pin directory `dir` (which exists).
pub fn write(dir: &Path, name: &CgroupPath) -> io::Result<()> {
    let encoded = agent_name::encode(name);
    if encoded.len() > MAX_ENCODED {
        return Err(io::Error::new(
            io::ErrorKind::InvalidInput,
            format!("agent name {name} is too long (at most {MAX_ENCODED} bytes once encoded)"),
        ));
    }
    fs::DirBuilder::new()
        .mode(0o700)
        .create(dir.join(format!("{PREFIX}{encoded}")))
}

/// The name recorded in pin directory `dir`, if any. An entry that does not decode is an
/// error: the tag must not silently fall back to its path, which policies were not written for.
pub fn read(dir: &Path) -> io::Result<Option<CgroupPath>> {
    let mut found = None;
    for entry in fs::read_dir(dir)? {
        let entry = entry?;
        let file_name = entry.file_name();
        let Some(encoded) = file_name.to_str().and_then(|n| n.strip_prefix(PREFIX)) else {
            continue;
        };
        let name = agent_name::decode(encoded).ok_or_else(|| {
            io::Error::new(
                io::ErrorKind::InvalidData,
                format!("unreadable agent name entry {:?}", entry.path()),
            )
        })?;
        if found.replace(name).is_some() {
            return Err(io::Error::new(
                io::ErrorKind::InvalidData,
                format!("more than one agent name in {}", dir.display()),
            ));
        }
    }
    Ok(found)
}

/// Whether a pin directory entry is a name entry (removed with `rmdir`, not `unlink`).
pub fn is_name_entry(file_name: &std::ffi::OsStr) -> bool {
    file_name.to_str().is_some_and(|n| n.starts_with(PREFIX))
}

/// Removes every name entry of pin directory `dir`.
pub fn remove(dir: &Path) -> io::Result<()> {
    for entry in fs::read_dir(dir)?.flatten() {
        if is_name_entry(&entry.file_name()) {
            fs::remove_dir(entry.path())?;
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn p(s: &str) -> CgroupPath {
        CgroupPath::parse(s).expect(s)
    }

    #[test]
    fn a_name_round_trips_through_the_pin_directory_and_goes_with_remove() {
        let dir = tempfile::tempdir().expect("tempdir");
        assert_eq!(read(dir.path()).expect("read"), None);
        // Pins beside the name are not names.
        fs::write(dir.path().join("connect4"), b"").expect("pin stand-in");
        for name in ["agents/named", "a%b/c@d/e=f"] {
            write(dir.path(), &p(name)).expect("write");
            assert_eq!(read(dir.path()).expect("read"), Some(p(name)), "{name}");
            remove(dir.path()).expect("remove");
            assert_eq!(read(dir.path()).expect("read"), None);
        }
        assert!(dir.path().join("connect4").exists());
    }

    #[test]
    fn two_names_or_a_garbled_one_are_errors_not_the_path() {
        let dir = tempfile::tempdir().expect("tempdir");
        write(dir.path(), &p("agents/a")).expect("write");
        write(dir.path(), &p("agents/b")).expect("write");
        assert!(read(dir.path()).is_err());
        remove(dir.path()).expect("remove");
        fs::create_dir(dir.path().join("as=%zz")).expect("garbled");
        assert!(read(dir.path()).is_err());
    }

    #[test]
    fn an_overlong_name_is_refused() {
        let dir = tempfile::tempdir().expect("tempdir");
        // 199 bytes, 397 once its 99 slashes are encoded.
        let long = p(&"a/".repeat(100));
        let err = write(dir.path(), &long).expect_err("too long");
        assert!(err.to_string().contains("too long"), "{err}");
    }
}
