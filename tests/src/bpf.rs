//! A few raw `bpf()` calls, for tests that look at brokerd's pinned maps and links from outside:
//! create and pin a map or a cgroup connect4 link (to stand in for pins an earlier build left),
//! list a pinned map's entries, read which program a pinned link runs. The tests crate does not
//! link aya; these are the kernel's own commands, nothing more.

use std::{
    ffi::CString,
    io,
    os::fd::{FromRawFd as _, OwnedFd},
    os::unix::ffi::OsStrExt as _,
    path::Path,
};

use std::os::fd::AsRawFd as _;

const BPF_MAP_CREATE: libc::c_long = 0;
const BPF_MAP_LOOKUP_ELEM: libc::c_long = 1;
const BPF_MAP_GET_NEXT_KEY: libc::c_long = 4;
const BPF_OBJ_PIN: libc::c_long = 6;
const BPF_OBJ_GET: libc::c_long = 7;
const BPF_PROG_LOAD: libc::c_long = 5;
const BPF_OBJ_GET_INFO_BY_FD: libc::c_long = 15;
const BPF_LINK_CREATE: libc::c_long = 28;
const BPF_PROG_TYPE_CGROUP_SOCK_ADDR: u32 = 18;
const BPF_CGROUP_INET4_CONNECT: u32 = 10;
/// `BPF_MAP_TYPE_HASH`.
pub const MAP_TYPE_HASH: u32 = 1;
/// `BPF_MAP_TYPE_LRU_HASH`.
pub const MAP_TYPE_LRU_HASH: u32 = 9;

/// `union bpf_attr`, as bytes: every command here uses a prefix of it, the rest stays zero.
#[repr(C, align(8))]
struct Attr([u8; 128]);

impl Attr {
    fn new() -> Self {
        Self([0; 128])
    }
    fn u32_at(&mut self, offset: usize, v: u32) -> &mut Self {
        self.0[offset..offset + 4].copy_from_slice(&v.to_ne_bytes());
        self
    }
    fn u64_at(&mut self, offset: usize, v: u64) -> &mut Self {
        self.0[offset..offset + 8].copy_from_slice(&v.to_ne_bytes());
        self
    }
}

fn bpf(cmd: libc::c_long, attr: &mut Attr) -> io::Result<libc::c_long> {
    // SAFETY: `attr` is a valid, zero-padded bpf_attr of the size passed; pointers stored in it
    // point to buffers the caller keeps alive for the call.
    let r = unsafe {
        libc::syscall(
            libc::SYS_bpf,
            cmd,
            attr.0.as_mut_ptr(),
            std::mem::size_of::<Attr>(),
        )
    };
    if r < 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(r)
    }
}

fn fd_of(r: libc::c_long) -> io::Result<OwnedFd> {
    let fd = i32::try_from(r).map_err(|_| io::Error::other("bpf() returned no fd"))?;
    // SAFETY: the kernel just returned this new fd, owned by nobody else.
    Ok(unsafe { OwnedFd::from_raw_fd(fd) })
}

fn c_path(path: &Path) -> io::Result<CString> {
    CString::new(path.as_os_str().as_bytes()).map_err(io::Error::other)
}

/// Creates a map of `map_type` with these sizes and pins it at `path`.
pub fn create_pinned_map(
    path: &Path,
    map_type: u32,
    key_size: u32,
    value_size: u32,
    max_entries: u32,
) -> io::Result<()> {
    let mut attr = Attr::new();
    attr.u32_at(0, map_type)
        .u32_at(4, key_size)
        .u32_at(8, value_size)
        .u32_at(12, max_entries);
    let map = fd_of(bpf(BPF_MAP_CREATE, &mut attr)?)?;
    let name = c_path(path)?;
    let mut attr = Attr::new();
    attr.u64_at(0, name.as_ptr() as u64)
        .u32_at(8, map.as_raw_fd() as u32);
    bpf(BPF_OBJ_PIN, &mut attr).map(drop)
}

/// Every entry of the pinned map at `path`, as raw key and value bytes.
pub fn pinned_map_entries(
    path: &Path,
    key_size: usize,
    value_size: usize,
) -> io::Result<Vec<(Vec<u8>, Vec<u8>)>> {
    let name = c_path(path)?;
    let mut attr = Attr::new();
    attr.u64_at(0, name.as_ptr() as u64);
    let map = fd_of(bpf(BPF_OBJ_GET, &mut attr)?)?;
    let fd = map.as_raw_fd() as u32;
    let mut entries = Vec::new();
    let mut key: Option<Vec<u8>> = None;
    loop {
        let mut next = vec![0u8; key_size];
        let mut attr = Attr::new();
        attr.u32_at(0, fd)
            .u64_at(8, key.as_ref().map_or(0, |k| k.as_ptr() as u64))
            .u64_at(16, next.as_mut_ptr() as u64);
        match bpf(BPF_MAP_GET_NEXT_KEY, &mut attr) {
            Ok(_) => {}
            Err(e) if e.raw_os_error() == Some(libc::ENOENT) => return Ok(entries),
            Err(e) => return Err(e),
        }
        let mut value = vec![0u8; value_size];
        let mut attr = Attr::new();
        attr.u32_at(0, fd)
            .u64_at(8, next.as_ptr() as u64)
            .u64_at(16, value.as_mut_ptr() as u64);
        bpf(BPF_MAP_LOOKUP_ELEM, &mut attr)?;
        entries.push((next.clone(), value));
        key = Some(next);
    }
}

/// Attaches a `cgroup/connect4` program that allows every connect unchanged (`r0 = 1; exit`) to
/// the cgroup directory `cgroup` as a link, and pins the link at `pin`. Returns the program's id.
pub fn pin_allow_all_connect4_link(cgroup: &Path, pin: &Path) -> io::Result<u32> {
    // r0 = 1 (BPF_ALU64 | BPF_MOV | BPF_K), then exit (BPF_JMP | BPF_EXIT).
    let insns: [u8; 16] = [0xb7, 0, 0, 0, 1, 0, 0, 0, 0x95, 0, 0, 0, 0, 0, 0, 0];
    let license = c"GPL";
    let mut attr = Attr::new();
    attr.u32_at(0, BPF_PROG_TYPE_CGROUP_SOCK_ADDR)
        .u32_at(4, 2)
        .u64_at(8, insns.as_ptr() as u64)
        .u64_at(16, license.as_ptr() as u64)
        .u32_at(68, BPF_CGROUP_INET4_CONNECT);
    let prog = fd_of(bpf(BPF_PROG_LOAD, &mut attr)?)?;
    let dir = std::fs::File::open(cgroup)?;
    let mut attr = Attr::new();
    attr.u32_at(0, prog.as_raw_fd() as u32)
        .u32_at(4, dir.as_raw_fd() as u32)
        .u32_at(8, BPF_CGROUP_INET4_CONNECT);
    let link = fd_of(bpf(BPF_LINK_CREATE, &mut attr)?)?;
    let name = c_path(pin)?;
    let mut attr = Attr::new();
    attr.u64_at(0, name.as_ptr() as u64)
        .u32_at(8, link.as_raw_fd() as u32);
    bpf(BPF_OBJ_PIN, &mut attr)?;
    info_u32(&prog, 4)
}

/// The id of the program the link pinned at `pin` runs.
pub fn pinned_link_program_id(pin: &Path) -> io::Result<u32> {
    let name = c_path(pin)?;
    let mut attr = Attr::new();
    attr.u64_at(0, name.as_ptr() as u64);
    let link = fd_of(bpf(BPF_OBJ_GET, &mut attr)?)?;
    // struct bpf_link_info: type, id, prog_id.
    info_u32(&link, 8)
}

/// The u32 at `offset` of the object's `bpf_*_info`.
fn info_u32(fd: &OwnedFd, offset: usize) -> io::Result<u32> {
    let mut info = [0u8; 64];
    let mut attr = Attr::new();
    attr.u32_at(0, fd.as_raw_fd() as u32)
        .u32_at(4, info.len() as u32)
        .u64_at(8, info.as_mut_ptr() as u64);
    bpf(BPF_OBJ_GET_INFO_BY_FD, &mut attr)?;
    Ok(u32::from_ne_bytes([
        info[offset],
        info[offset + 1],
        info[offset + 2],
        info[offset + 3],
    ]))
}

/// The cookie of the network namespace the calling thread is in (`SO_NETNS_COOKIE`).
pub fn own_netns_cookie() -> io::Result<u64> {
    let socket = std::net::UdpSocket::bind("127.0.0.1:0")?;
    let mut cookie: u64 = 0;
    let mut len = std::mem::size_of::<u64>() as libc::socklen_t;
    // SAFETY: getsockopt writes at most `len` bytes into `cookie`, a valid u64.
    let r = unsafe {
        libc::getsockopt(
            socket.as_raw_fd(),
            libc::SOL_SOCKET,
            libc::SO_NETNS_COOKIE,
            &mut cookie as *mut u64 as *mut libc::c_void,
            &mut len,
        )
    };
    if r != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(cookie)
}
