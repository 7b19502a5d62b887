//! Who is at the other end of a Unix socket, for both sides of brokerd's sockets.
//!
//! In the unprivileged mode (issue 19) brokerd, brokerctl and the agents all run as one uid, so
//! a uid says little. What a sandbox's agent cannot escape is its namespaces: it runs in a user
//! namespace nested in its sandbox's, at a deeper pid namespace level. So brokerd refuses
//! control and sandbox clients that are not in its own namespaces ([`same_namespaces`]), and
//! brokerctl refuses a brokerd that another user runs, or that a sandbox's agent runs
//! ([`check_server`]): a socket planted in a run directory (`/tmp/agent-broker-UID`, created
//! by whoever came first) gets neither a secret nor a sandbox.

use std::os::fd::AsRawFd;

/// The peer's credentials (`SO_PEERCRED`): pid, uid, gid, as this process's namespaces see
/// them.
pub fn credentials(socket: &impl AsRawFd) -> std::io::Result<(u32, u32, u32)> {
    let mut cred = libc::ucred {
        pid: 0,
        uid: 0,
        gid: 0,
    };
    let mut len = std::mem::size_of::<libc::ucred>() as libc::socklen_t;
    // SAFETY: getsockopt writes at most `len` bytes into `cred`, which we own.
    let r = unsafe {
        libc::getsockopt(
            socket.as_raw_fd(),
            libc::SOL_SOCKET,
            libc::SO_PEERCRED,
            (&raw mut cred).cast(),
            &raw mut len,
        )
    };
    if r != 0 {
        return Err(std::io::Error::last_os_error());
    }
    Ok((u32::try_from(cred.pid).unwrap_or(0), cred.uid, cred.gid))
}

/// The depth of process `pid`'s pid namespace (`NSpid` in its status: one id per level), read
/// whatever the process (the file is world-readable).
fn pid_namespace_depth(pid: &str) -> Option<usize> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    status
        .lines()
        .find_map(|l| l.strip_prefix("NSpid:"))
        .map(|ids| ids.split_whitespace().count())
}

/// Whether process `pid` runs in this process's namespaces, as far as this process's user can
/// tell: at the same pid namespace depth, and in the same user namespace where
/// `/proc/<pid>/ns/user` can be read (not for a process that made itself non-dumpable, as
/// brokerd and brokerctl do). False when its status cannot be read.
pub fn same_namespaces(pid: u32) -> bool {
    let theirs = pid_namespace_depth(&pid.to_string());
    if theirs.is_none() || theirs != pid_namespace_depth("self") {
        return false;
    }
    match (
        std::fs::read_link(format!("/proc/{pid}/ns/user")),
        std::fs::read_link("/proc/self/ns/user"),
    ) {
        (Ok(t), Ok(o)) => t == o,
        _ => true,
    }
}

/// Checks the process serving `socket` before anything is sent to it: root's, or this
/// process's user's in this process's namespaces (never another user's, never a sandboxed
/// agent's). Root trusts the brokerd whose run directory it names, whoever runs it.
pub fn check_server(socket: &impl AsRawFd) -> Result<(), String> {
    // SAFETY: geteuid cannot fail.
    let own = unsafe { libc::geteuid() };
    let (pid, uid, _) =
        credentials(socket).map_err(|e| format!("cannot read the server's credentials: {e}"))?;
    if own == 0 || uid == 0 {
        return Ok(());
    }
    if uid != own {
        return Err(format!(
            "the socket is served by uid {uid}, not by this user (uid {own}) or root: not this \
             user's brokerd (a socket someone else placed in the run directory?)"
        ));
    }
    if !same_namespaces(pid) {
        return Err(format!(
            "the socket is served by process {pid}, which runs in other namespaces than this \
             one (a sandboxed agent's?): not brokerd"
        ));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    /// This process is in its own namespaces; pid 0 names no process.
    #[test]
    fn a_process_is_in_its_own_namespaces() {
        assert!(same_namespaces(std::process::id()));
        assert!(!same_namespaces(0));
    }

    /// A server this process runs itself passes; its credentials are this process's.
    #[test]
    fn a_server_of_this_user_in_these_namespaces_is_trusted() {
        let (a, b) = std::os::unix::net::UnixStream::pair().expect("socketpair");
        let (pid, uid, _) = credentials(&a).expect("credentials");
        assert_eq!(pid, std::process::id());
        // SAFETY: geteuid cannot fail.
        assert_eq!(uid, unsafe { libc::geteuid() });
        assert_eq!(check_server(&b), Ok(()));
    }
}
