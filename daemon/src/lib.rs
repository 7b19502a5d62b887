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
pub mod config;
pub mod control;
pub mod daemon;
pub mod dns;
pub mod explain;
pub mod handle_store;
pub mod harden;
pub mod policy_store;
pub mod protections;
pub mod proxy;
pub mod scrub;
pub mod spin;
pub mod tls;
pub mod upstream;
pub mod vault;

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
