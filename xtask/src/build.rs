//! `cargo xtask build`: the eBPF programs first (brokerd embeds their object), then the host
//! workspace's binaries.

use anyhow::{Context, Result, bail};

use crate::{cmd, paths, setup};

/// The cargo profile the host binaries are built with. The eBPF object is always built with
/// `release`: the verifier rejects what unoptimised code does with the stack.
#[derive(Clone, Copy)]
pub enum Profile {
    Debug,
    Release,
}

impl Profile {
    pub fn from_release_flag(release: bool) -> Self {
        if release { Self::Release } else { Self::Debug }
    }

    /// The directory under `target/` the binaries land in.
    pub fn dir_name(self) -> &'static str {
        match self {
            Self::Debug => "debug",
            Self::Release => "release",
        }
    }
}

/// Installs what is missing, builds the eBPF object, then the host binaries.
pub fn build(profile: Profile) -> Result<()> {
    setup::ensure()?;
    build_ebpf().context("building the eBPF programs")?;

    let mut host = cmd::workspace_cargo()?;
    // The fuzz targets' crate enables brokerd's `fuzzing` feature: keep it out of the binaries.
    host.args([
        "build",
        "--workspace",
        "--exclude",
        "agent-broker-fuzz-targets",
        "--bins",
    ]);
    if let Profile::Release = profile {
        host.arg("--release");
    }
    cmd::run(&mut host).context("building the workspace")?;
    build_static_client(profile).context("building the statically linked test binaries")?;
    eprintln!(
        "build: binaries in {}",
        cmd::relative(&paths::target_dir().join(profile.dir_name()))
    );
    Ok(())
}

/// The end-to-end tests run one statically linked client (no dynamic loader, no libc from the
/// host), as an uncooperative agent binary would be. Only its final link differs from the
/// workspace build, so `cargo rustc` reuses every compiled dependency; the result is copied
/// aside because the next ordinary build relinks the same path dynamically.
fn build_static_client(profile: Profile) -> Result<()> {
    for bin in paths::STATIC_BINS {
        let mut link = cmd::workspace_cargo()?;
        link.args(["rustc", "--package", "agent-broker-tests", "--bin", bin]);
        if let Profile::Release = profile {
            link.arg("--release");
        }
        link.args(["--", "-C", "target-feature=+crt-static"]);
        cmd::run(&mut link)?;
        let built = paths::target_dir().join(profile.dir_name()).join(bin);
        let dest = paths::static_bin(bin);
        if let Some(dir) = dest.parent() {
            std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
        }
        // Copied beside it, then renamed over it: a running copy (a soak's agent) keeps its
        // file, where writing into it would fail with "Text file busy".
        let partial = dest.with_extension("partial");
        std::fs::copy(&built, &partial)
            .with_context(|| format!("copying {} to {}", built.display(), partial.display()))?;
        std::fs::rename(&partial, &dest)
            .with_context(|| format!("renaming {} to {}", partial.display(), dest.display()))?;
        eprintln!("build: static {bin} at {}", cmd::relative(&dest));
    }
    Ok(())
}

pub fn build_ebpf() -> Result<()> {
    // aya-ebpf selects the kernel's register layout for the host architecture through this cfg;
    // BTF lets the kernel check the maps and programs against their types.
    let rustflags = [
        format!("--cfg=bpf_target_arch=\"{}\"", std::env::consts::ARCH),
        "-Cdebuginfo=2".to_owned(),
        "-Clink-arg=--btf".to_owned(),
    ]
    .join("\x1f");

    let mut ebpf = cmd::ebpf_cargo()?;
    ebpf.env("CARGO_ENCODED_RUSTFLAGS", rustflags)
        .args([
            "build",
            "--release",
            "--target",
            "bpfel-unknown-none",
            "-Z",
            "build-std=core",
        ])
        .arg("--target-dir")
        .arg(paths::ebpf_target_dir());
    cmd::run(&mut ebpf)?;

    let object = paths::ebpf_object();
    if !object.is_file() {
        bail!(
            "the eBPF build succeeded but left no object at {}",
            object.display()
        );
    }
    eprintln!("build: eBPF object at {}", cmd::relative(&object));
    Ok(())
}
