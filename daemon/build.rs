//! Embeds the eBPF object built by `cargo xtask build` into brokerd.
use std::path::PathBuf;

fn main() {
    println!("cargo:rerun-if-env-changed=AGENT_BROKER_EBPF_OBJ");
    let obj = match std::env::var_os("AGENT_BROKER_EBPF_OBJ") {
        Some(p) => PathBuf::from(p),
        None => PathBuf::from(env!("CARGO_MANIFEST_DIR"))
            .join("../target/ebpf/bpfel-unknown-none/release/agent-broker"),
    };
    if !obj.is_file() {
        // A build script cannot build the eBPF object itself without the nightly toolchain and
        // bpf-linker; xtask owns that.
        panic!(
            "eBPF object not found at {}: run `cargo xtask build` first (it builds the eBPF \
             programs, installing the toolchain they need)",
            obj.display()
        );
    }
    println!("cargo:rerun-if-changed={}", obj.display());
    println!("cargo:rustc-env=AGENT_BROKER_EBPF_OBJ={}", obj.display());
}
