//! agent-broker's daemon library: everything `brokerd` and `brokerctl` are made of.
//!
//! Module map (see ARCHITECTURE.md): [`capture`] is the kernel path and the only user of aya;
//! [`cgroup`] names and inspects cgroups; [`accept`] takes redirected connections and resolves
//! their origin; [`proxy`] terminates TLS/HTTP and forwards authorized requests through
//! [`upstream`]; [`tls`] is the broker CA; [`control`] serves the Unix control socket and
//! [`client`] speaks to it; [`config`] layers flags over a file over defaults; [`daemon`] wires
//! them together.
//!
//! Never: let a tagged cgroup's connection through unrecorded, send a secret anywhere but the
//! hosts its rule binds it to over verified TLS, show a secret value to an agent or in any log or
//! reply, or answer control requests from inside a tagged cgroup.

pub mod accept;
pub mod answered;
pub mod audit;
pub mod audit_access;
pub mod authorize;
pub mod capture;
pub mod cgroup;
pub mod client;
pub mod config;
pub mod control;
pub mod daemon;
pub mod dns;
pub mod doctor;
pub mod explain;
pub mod handle;
pub mod handle_store;
pub mod harden;
pub mod inject;
pub mod launcher;
pub mod policy;
pub mod policy_store;
pub mod protections;
pub mod proxy;
pub mod scrub;
pub mod secret;
pub mod spin;
pub mod tls;
pub mod upstream;
pub mod vault;

/// An error and its sources, `outer: inner: innermost`, for messages that cross a process
/// boundary (control replies) where `{:#}` formatting of anyhow is not available.
pub fn error_chain(e: &(dyn std::error::Error + 'static)) -> String {
    let mut out = e.to_string();
    let mut source = e.source();
    while let Some(s) = source {
        out.push_str(": ");
        out.push_str(&s.to_string());
        source = s.source();
    }
    out
}

/// Writes a file through a temporary sibling, fsync and a rename, so a reader (or a crash)
/// never sees half of it. The file gets the default mode (umask applies).
pub fn write_file_atomically(path: &std::path::Path, bytes: &[u8]) -> std::io::Result<()> {
    use std::io::Write as _;
    let tmp = path.with_extension("tmp");
    let mut f = std::fs::File::create(&tmp)?;
    f.write_all(bytes)?;
    f.sync_all()?;
    std::fs::rename(&tmp, path)
}

/// Why an exclusive lock file could not be taken.
#[derive(Debug)]
pub(crate) enum LockFailure {
    /// Another process holds it.
    Held,
    /// The lock file could not be opened or locked.
    Io(std::io::Error),
}

/// Takes `path` (created 0600 if missing) as an exclusive `flock`, without waiting. Held for
/// as long as the returned value lives, so two processes never open the same store.
pub(crate) fn lock_exclusive(
    path: &std::path::Path,
) -> Result<nix::fcntl::Flock<std::fs::File>, LockFailure> {
    use std::os::unix::fs::OpenOptionsExt as _;
    let file = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .create(true)
        .truncate(false)
        .mode(0o600)
        .open(path)
        .map_err(LockFailure::Io)?;
    nix::fcntl::Flock::lock(file, nix::fcntl::FlockArg::LockExclusiveNonblock).map_err(
        |(_, errno)| {
            if errno == nix::errno::Errno::EWOULDBLOCK {
                LockFailure::Held
            } else {
                LockFailure::Io(errno.into())
            }
        },
    )
}
