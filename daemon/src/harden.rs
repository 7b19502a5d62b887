//! brokerd's own hardening (THREAT-MODEL.md 5.5): the process that holds the real secrets.
//!
//! - not dumpable (`PR_SET_DUMPABLE` 0): no ptrace or `/proc/<pid>/mem|environ` access by
//!   processes of the same uid, and no core dump;
//! - `RLIMIT_CORE` 0: no core file even if something made it dumpable again;
//! - all memory locked (`mlockall`, on fault), so secret values never reach swap.
//!
//! Secret values are also zeroized when dropped (see [`agent_broker_core::secret`]).

/// What [`harden`] achieved, as `brokerctl status` shows it.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Hardening {
    pub not_dumpable: bool,
    pub no_core_dumps: bool,
    pub memory_locked: bool,
    /// Steps that failed, with the reason.
    pub failures: Vec<String>,
}

impl std::fmt::Display for Hardening {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let mut parts = Vec::new();
        if self.not_dumpable {
            parts.push("not dumpable".to_string());
        }
        if self.no_core_dumps {
            parts.push("no core dumps".to_string());
        }
        if self.memory_locked {
            parts.push("memory locked".to_string());
        }
        parts.extend(self.failures.iter().map(|f| format!("FAILED {f}")));
        write!(f, "{}", parts.join(", "))
    }
}

/// Applies the hardening to the calling process. Failures are reported, not fatal: brokerd is
/// still safer running than not (they are logged and shown by `brokerctl status`).
pub fn harden() -> Hardening {
    let mut h = Hardening::default();
    // SAFETY: plain prctl calls.
    unsafe {
        if libc::prctl(libc::PR_SET_DUMPABLE, 0, 0, 0, 0) == 0
            && libc::prctl(libc::PR_GET_DUMPABLE, 0, 0, 0, 0) == 0
        {
            h.not_dumpable = true;
        } else {
            h.failures.push(format!(
                "PR_SET_DUMPABLE: {}",
                std::io::Error::last_os_error()
            ));
        }
    }
    let zero = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: valid rlimit.
    if unsafe { libc::setrlimit(libc::RLIMIT_CORE, &zero) } == 0 {
        h.no_core_dumps = true;
    } else {
        h.failures
            .push(format!("RLIMIT_CORE: {}", std::io::Error::last_os_error()));
    }
    // SAFETY: plain system call; MCL_ONFAULT locks pages as they are touched instead of
    // populating every mapping up front.
    if unsafe { libc::mlockall(libc::MCL_CURRENT | libc::MCL_FUTURE | libc::MCL_ONFAULT) } == 0 {
        h.memory_locked = true;
    } else {
        h.failures
            .push(format!("mlockall: {}", std::io::Error::last_os_error()));
    }
    h
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_summary_names_what_held_and_what_failed() {
        let h = Hardening {
            not_dumpable: true,
            no_core_dumps: true,
            memory_locked: false,
            failures: vec!["mlockall: Operation not permitted".into()],
        };
        assert_eq!(
            h.to_string(),
            "not dumpable, no core dumps, FAILED mlockall: Operation not permitted"
        );
    }

    #[test]
    fn a_hardened_child_is_not_dumpable_and_has_no_core_limit() {
        // In a forked child, so the test process itself stays debuggable.
        let mut pipe = [0i32; 2];
        // SAFETY: valid out array.
        assert_eq!(unsafe { libc::pipe(pipe.as_mut_ptr()) }, 0);
        // SAFETY: fork in a test; the child only makes system calls and exits.
        let pid = unsafe { libc::fork() };
        if pid == 0 {
            let h = harden();
            let ok = h.not_dumpable && h.no_core_dumps;
            // SAFETY: write a byte to our pipe and exit.
            unsafe {
                libc::write(pipe[1], [u8::from(ok)].as_ptr() as *const libc::c_void, 1);
                libc::_exit(0);
            }
        }
        let mut byte = [0u8; 1];
        // SAFETY: parent side.
        unsafe {
            libc::close(pipe[1]);
            libc::read(pipe[0], byte.as_mut_ptr() as *mut libc::c_void, 1);
            libc::waitpid(pid, std::ptr::null_mut(), 0);
        }
        assert_eq!(byte[0], 1, "the child could not harden itself");
    }
}
