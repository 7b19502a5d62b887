//! Embeds the eBPF object built by `cargo xtask build` into brokerd.
//!
//! Without the object (a fresh clone, no nightly toolchain or bpf-linker) the build fails and
//! says how to get it, unless `AGENT_BROKER_EBPF_SKIP` is set (the repository's
//! `.cargo/config.toml` sets it for plain cargo): then brokerd is built without its programs, so
//! everything that needs no kernel path (unit and component tests, clippy) works on stable Rust
//! alone, and such a brokerd refuses to start capture with an error that says why. An object
//! named explicitly with `AGENT_BROKER_EBPF_OBJ` (as xtask does) must exist.
use std::path::PathBuf;

fn main() {
    println!("cargo:rerun-if-env-changed=AGENT_BROKER_EBPF_OBJ");
    println!("cargo:rerun-if-env-changed=AGENT_BROKER_EBPF_SKIP");
    println!("cargo::rustc-check-cfg=cfg(ebpf_object_skipped)");
    let explicit = std::env::var_os("AGENT_BROKER_EBPF_OBJ");
    let obj = match &explicit {
        Some(p) => PathBuf::from(p),
        None => PathBuf::from(env!("CARGO_MANIFEST_DIR"))
            .join("../target/ebpf/bpfel-unknown-none/release/agent-broker"),
    };
    println!("cargo:rerun-if-changed={}", obj.display());
    if obj.is_file() {
        println!("cargo:rustc-env=AGENT_BROKER_EBPF_OBJ={}", obj.display());
        return;
    }
    // An object named explicitly (xtask does) must exist: skipping it would hide a failed build.
    let skip =
        std::env::var_os("AGENT_BROKER_EBPF_SKIP").is_some_and(|v| !v.is_empty() && v != "0");
    if skip && explicit.is_none() {
        println!(
            "cargo:warning=building brokerd without its eBPF programs (AGENT_BROKER_EBPF_SKIP is \
             set): it cannot capture connections"
        );
        println!("cargo:rustc-cfg=ebpf_object_skipped");
        return;
    }
    // A build script cannot build the eBPF object itself without the nightly toolchain and
    // bpf-linker; xtask owns that.
    panic!(
        "eBPF object not found at {}: run `cargo xtask build` first (it builds the eBPF \
         programs, installing the toolchain they need), or set AGENT_BROKER_EBPF_SKIP=1 to build \
         brokerd without them (tests that need no kernel path still run; capture cannot start)",
        obj.display()
    );
}
