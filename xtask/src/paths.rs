//! Where things live in the workspace. xtask always uses the workspace's own `target/`, whatever
//! `CARGO_TARGET_DIR` says, so brokerd and the eBPF object are where the tests look for them.

use std::path::{Path, PathBuf};

/// The workspace root (the parent of the xtask crate).
pub fn root() -> &'static Path {
    let xtask = Path::new(env!("CARGO_MANIFEST_DIR"));
    xtask.parent().unwrap_or(xtask)
}

/// The workspace's `target/` directory.
pub fn target_dir() -> PathBuf {
    root().join("target")
}

/// Where `setup` installs bpf-linker and the libLLVM it links against.
pub fn tools_dir() -> PathBuf {
    target_dir().join("ebpf-tools")
}

/// The directory prepended to `PATH` so cargo finds bpf-linker.
pub fn tools_bin_dir() -> PathBuf {
    tools_dir().join("bin")
}

/// The eBPF programs crate, a workspace of its own built with nightly.
pub fn ebpf_crate_dir() -> PathBuf {
    root().join("ebpf").join("programs")
}

/// The eBPF programs' target directory, kept apart from the host one.
pub fn ebpf_target_dir() -> PathBuf {
    target_dir().join("ebpf")
}

/// The eBPF object that brokerd embeds (its build script reads `AGENT_BROKER_EBPF_OBJ`).
pub fn ebpf_object() -> PathBuf {
    ebpf_target_dir()
        .join("bpfel-unknown-none")
        .join("release")
        .join("agent-broker")
}

/// The test binaries `build` links statically: the HTTPS test client and the attack battery.
pub const STATIC_BINS: [&str; 2] = ["agent-client", "attack-battery"];

/// Where `build` copies the statically linked test binary `bin`.
pub fn static_bin(bin: &str) -> PathBuf {
    target_dir().join("static").join(bin)
}
