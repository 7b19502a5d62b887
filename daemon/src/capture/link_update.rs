//! Swapping the program of an adopted link (`BPF_LINK_UPDATE`).
//!
//! Pinned links outlive brokerd, and a restarted brokerd adopts them. After an upgrade they
//! would keep running the earlier build's programs, which read the maps of that build's layout
//! (their pins removed at start, see `common::maps::LEGACY`): every connect of an adopted cgroup
//! would be recorded where this brokerd never looks, and refused at accept. So each adopted link
//! is switched to this build's program in place. The swap is atomic, so the cgroup is never
//! untagged meanwhile (detach-then-attach would leave a window). aya 0.14 has no call for it on
//! cgroup links; these are the kernel's own commands.

use std::{
    ffi::CString,
    io,
    os::{
        fd::{AsRawFd as _, BorrowedFd},
        unix::ffi::OsStrExt as _,
    },
    path::Path,
};

use super::unix_hooks::{bpf, owned};

const BPF_OBJ_GET: libc::c_long = 7;
const BPF_OBJ_GET_INFO_BY_FD: libc::c_long = 15;
const BPF_LINK_UPDATE: libc::c_long = 29;

/// `bpf_attr` for `BPF_OBJ_GET`.
#[repr(C)]
#[derive(Default)]
struct ObjGetAttr {
    pathname: u64,
    bpf_fd: u32,
    file_flags: u32,
    path_fd: i32,
    _pad: u32,
}

/// `bpf_attr` for `BPF_OBJ_GET_INFO_BY_FD`.
#[repr(C)]
#[derive(Default)]
struct InfoAttr {
    bpf_fd: u32,
    info_len: u32,
    info: u64,
}

/// The start of `struct bpf_link_info`: the kernel fills in as much as `info_len` asks for.
#[repr(C)]
#[derive(Default)]
struct LinkInfoHead {
    link_type: u32,
    id: u32,
    prog_id: u32,
    _pad: u32,
}

/// `bpf_attr` for `BPF_LINK_UPDATE`.
#[repr(C)]
#[derive(Default)]
struct LinkUpdateAttr {
    link_fd: u32,
    new_prog_fd: u32,
    flags: u32,
    old_prog_fd: u32,
}

/// Makes the link pinned at `pin` run `prog` (whose id is `prog_id`), unless it already does.
/// Returns whether it swapped.
pub(super) fn run_program(pin: &Path, prog: BorrowedFd<'_>, prog_id: u32) -> io::Result<bool> {
    let path = CString::new(pin.as_os_str().as_bytes()).map_err(io::Error::other)?;
    let mut attr = ObjGetAttr {
        pathname: path.as_ptr() as u64,
        ..Default::default()
    };
    let link = owned(bpf(BPF_OBJ_GET, &mut attr)?);
    let mut info = LinkInfoHead::default();
    let mut attr = InfoAttr {
        bpf_fd: link.as_raw_fd() as u32,
        info_len: std::mem::size_of::<LinkInfoHead>() as u32,
        info: &mut info as *mut LinkInfoHead as u64,
    };
    bpf(BPF_OBJ_GET_INFO_BY_FD, &mut attr)?;
    if info.prog_id == prog_id {
        return Ok(false);
    }
    let mut attr = LinkUpdateAttr {
        link_fd: link.as_raw_fd() as u32,
        new_prog_fd: prog.as_raw_fd() as u32,
        ..Default::default()
    };
    bpf(BPF_LINK_UPDATE, &mut attr)?;
    Ok(true)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn attr_layouts_match_the_kernel() {
        assert_eq!(std::mem::size_of::<ObjGetAttr>(), 24);
        assert_eq!(std::mem::size_of::<InfoAttr>(), 16);
        assert_eq!(std::mem::size_of::<LinkInfoHead>(), 16);
        assert_eq!(std::mem::size_of::<LinkUpdateAttr>(), 16);
    }
}
