//! The AF_UNIX cgroup hooks (`cgroup/connect_unix`, `cgroup/sendmsg_unix`, Linux 6.7+).
//!
//! aya 0.14 has no attach types for them, so brokerd loads, attaches and pins these two programs
//! with the `bpf()` system call itself. Each is two instructions, `r0 = 0; exit`: a tagged
//! cgroup may not connect or send to any pathname or abstract AF_UNIX socket (the Docker socket,
//! D-Bus, systemd-resolved, `/dev/log`, another user's agent...), which are all deputies outside
//! the cgroup that could do the networking for it. `socketpair()` and pipes are unaffected: they
//! never name an address. Both hooks are needed: `connect_unix` alone does not see an unconnected
//! datagram `sendto()` to a path.
//!
//! Once pinned, a link is an ordinary bpffs object, so adopting and detaching them after a
//! restart goes through aya's [`PinnedLink`] like every other link.

use std::{
    ffi::CString,
    fs,
    os::{
        fd::{AsRawFd as _, FromRawFd as _, OwnedFd},
        unix::ffi::OsStrExt as _,
    },
    path::{Path, PathBuf},
};

use aya::programs::links::PinnedLink;

/// `enum bpf_attach_type` values from the kernel's uapi `bpf.h`.
const BPF_CGROUP_UNIX_CONNECT: u32 = 49;
const BPF_CGROUP_UNIX_SENDMSG: u32 = 50;
/// `enum bpf_prog_type`.
const BPF_PROG_TYPE_CGROUP_SOCK_ADDR: u32 = 18;
/// `enum bpf_cmd`.
const BPF_PROG_LOAD: libc::c_long = 5;
const BPF_OBJ_PIN: libc::c_long = 6;
const BPF_LINK_CREATE: libc::c_long = 28;

/// One AF_UNIX hook: its attach type and the pin file name under a tagged cgroup's link dir.
#[derive(Clone, Copy, Debug)]
pub struct UnixHook {
    pub name: &'static str,
    pub pin_name: &'static str,
    attach_type: u32,
}

/// The hooks, in attach order.
pub const UNIX_HOOKS: [UnixHook; 2] = [
    UnixHook {
        name: "connect_unix",
        pin_name: "connect_unix",
        attach_type: BPF_CGROUP_UNIX_CONNECT,
    },
    UnixHook {
        name: "sendmsg_unix",
        pin_name: "sendmsg_unix",
        attach_type: BPF_CGROUP_UNIX_SENDMSG,
    },
];

/// `r0 = 0` (BPF_ALU64 | BPF_MOV | BPF_K, dst r0, imm 0), then `exit` (BPF_JMP | BPF_EXIT).
const REFUSE_ALL: [u64; 2] = [insn(0xb7, 0), insn(0x95, 0)];

const fn insn(code: u8, imm: i32) -> u64 {
    // struct bpf_insn { u8 code; u8 dst_reg:4, src_reg:4; s16 off; s32 imm; }, little endian.
    (code as u64) | ((imm as u32 as u64) << 32)
}

/// The loaded programs (one fd per hook), attached to every newly tagged cgroup.
pub struct UnixPrograms {
    fds: Vec<(UnixHook, OwnedFd)>,
}

#[repr(C)]
#[derive(Default)]
struct ProgLoadAttr {
    prog_type: u32,
    insn_cnt: u32,
    insns: u64,
    license: u64,
    log_level: u32,
    log_size: u32,
    log_buf: u64,
    kern_version: u32,
    prog_flags: u32,
    prog_name: [u8; 16],
    prog_ifindex: u32,
    expected_attach_type: u32,
}

#[repr(C)]
#[derive(Default)]
struct LinkCreateAttr {
    prog_fd: u32,
    target_fd: u32,
    attach_type: u32,
    flags: u32,
    // The union that follows is unused for cgroup links; the kernel checks it is zero.
    _rest: [u64; 6],
}

#[repr(C)]
#[derive(Default)]
struct ObjPinAttr {
    pathname: u64,
    bpf_fd: u32,
    file_flags: u32,
    path_fd: i32,
    _pad: u32,
}

/// Runs the `bpf()` command `cmd` with `attr`; a new fd on success.
pub(super) fn bpf<T>(cmd: libc::c_long, attr: &mut T) -> std::io::Result<libc::c_long> {
    // SAFETY: `attr` is a #[repr(C)] prefix of `union bpf_attr` for `cmd`, valid for its size;
    // the kernel reads at most that many bytes (and requires the rest to be zero, which the
    // Default-initialised padding fields are).
    let r = unsafe {
        libc::syscall(
            libc::SYS_bpf,
            cmd,
            attr as *mut T as *mut libc::c_void,
            std::mem::size_of::<T>() as libc::c_uint,
        )
    };
    if r < 0 {
        Err(std::io::Error::last_os_error())
    } else {
        Ok(r)
    }
}

pub(super) fn owned(fd: libc::c_long) -> OwnedFd {
    // SAFETY: `fd` was just returned by bpf() and is owned by nobody else.
    unsafe { OwnedFd::from_raw_fd(fd as i32) }
}

/// Why an AF_UNIX hook could not be loaded, attached or pinned.
#[derive(Debug, thiserror::Error)]
pub enum UnixHookError {
    #[error(
        "cgroup/{hook}: cannot load ({source}); the AF_UNIX cgroup hooks need Linux 6.7 or later"
    )]
    Load {
        hook: &'static str,
        source: std::io::Error,
    },
    #[error("cgroup/{hook}: link_create: {source}")]
    Link {
        hook: &'static str,
        source: std::io::Error,
    },
    #[error("cgroup/{hook}: pin path {} contains NUL", .pin.display())]
    PinPath { hook: &'static str, pin: PathBuf },
    #[error("cgroup/{hook}: pin {}: {source}", .pin.display())]
    Pin {
        hook: &'static str,
        pin: PathBuf,
        source: std::io::Error,
    },
    #[error("cgroup/{hook}: reopen {}: {source}", .pin.display())]
    Reopen {
        hook: &'static str,
        pin: PathBuf,
        source: aya::programs::links::LinkError,
    },
}

impl UnixPrograms {
    /// Loads both programs. Fails on kernels without the AF_UNIX cgroup hooks (before 6.7),
    /// naming the hook.
    pub fn load() -> Result<Self, UnixHookError> {
        let license = c"GPL";
        let mut fds = Vec::new();
        for hook in UNIX_HOOKS {
            let mut name = [0u8; 16];
            let short = format!("ab_{}", hook.name);
            let n = short.len().min(15);
            name[..n].copy_from_slice(&short.as_bytes()[..n]);
            let mut attr = ProgLoadAttr {
                prog_type: BPF_PROG_TYPE_CGROUP_SOCK_ADDR,
                insn_cnt: REFUSE_ALL.len() as u32,
                insns: REFUSE_ALL.as_ptr() as u64,
                license: license.as_ptr() as u64,
                prog_name: name,
                expected_attach_type: hook.attach_type,
                ..Default::default()
            };
            let fd = bpf(BPF_PROG_LOAD, &mut attr).map_err(|source| UnixHookError::Load {
                hook: hook.name,
                source,
            })?;
            fds.push((hook, owned(fd)));
        }
        Ok(Self { fds })
    }

    /// Attaches both programs to `cgroup` as links and pins each at `<dir>/<pin_name>`.
    pub fn attach_and_pin(
        &self,
        cgroup: &fs::File,
        dir: &Path,
    ) -> Result<Vec<PinnedLink>, UnixHookError> {
        let mut pinned = Vec::new();
        for (hook, prog) in &self.fds {
            let result = (|| {
                let mut attr = LinkCreateAttr {
                    prog_fd: prog.as_raw_fd() as u32,
                    target_fd: cgroup.as_raw_fd() as u32,
                    attach_type: hook.attach_type,
                    ..Default::default()
                };
                let link = owned(bpf(BPF_LINK_CREATE, &mut attr).map_err(|source| {
                    UnixHookError::Link {
                        hook: hook.name,
                        source,
                    }
                })?);
                let pin = dir.join(hook.pin_name);
                let path = CString::new(pin.as_os_str().as_bytes()).map_err(|_| {
                    UnixHookError::PinPath {
                        hook: hook.name,
                        pin: pin.clone(),
                    }
                })?;
                let mut attr = ObjPinAttr {
                    pathname: path.as_ptr() as u64,
                    bpf_fd: link.as_raw_fd() as u32,
                    ..Default::default()
                };
                bpf(BPF_OBJ_PIN, &mut attr).map_err(|source| UnixHookError::Pin {
                    hook: hook.name,
                    pin: pin.clone(),
                    source,
                })?;
                // The pin holds the link now; `link` closing is fine.
                PinnedLink::from_pin(&pin).map_err(|source| UnixHookError::Reopen {
                    hook: hook.name,
                    pin,
                    source,
                })
            })();
            match result {
                Ok(link) => pinned.push(link),
                Err(e) => {
                    for link in pinned {
                        let _ = link.unpin();
                    }
                    return Err(e);
                }
            }
        }
        Ok(pinned)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_program_is_mov_r0_0_then_exit() {
        // Compared with the encoding `bpftool prog dump xlated` shows for `r0 = 0; exit`.
        assert_eq!(REFUSE_ALL[0].to_le_bytes(), [0xb7, 0, 0, 0, 0, 0, 0, 0]);
        assert_eq!(REFUSE_ALL[1].to_le_bytes(), [0x95, 0, 0, 0, 0, 0, 0, 0]);
    }

    #[test]
    fn attr_layouts_match_the_kernel() {
        // Offsets from `union bpf_attr` in include/uapi/linux/bpf.h.
        assert_eq!(std::mem::offset_of!(ProgLoadAttr, expected_attach_type), 68);
        assert_eq!(std::mem::offset_of!(ProgLoadAttr, prog_name), 48);
        assert_eq!(std::mem::offset_of!(LinkCreateAttr, attach_type), 8);
        assert_eq!(std::mem::offset_of!(ObjPinAttr, file_flags), 12);
    }
}
