//! `cargo xtask setup`: installs what the build and the tests need, doing nothing for what is
//! already there.
//!
//! - Debian packages the end-to-end tests run (clients, a JDK, `ip`, `ps`; `openssl`, which
//!   `brokerctl run` asks for the broker CA's subject hash; podman, runc and containerd for
//!   containers; dpkg-dev, systemd, man-db, zsh and fish for the Debian package and its test),
//!   through apt-get.
//! - rustup components: rustfmt and clippy for the host toolchain, rust-src (for `-Z build-std`)
//!   and rustfmt for nightly.
//! - bpf-linker, built into `target/ebpf-tools` against the nightly toolchain's own libLLVM:
//!   bpf-linker 0.13 needs LLVM 22, which Debian 12 does not ship, and the nightly's libLLVM is
//!   the very LLVM that emits the bitcode it links.

use std::fs;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

use anyhow::{Context, Result, bail};

use crate::{cmd, paths, running_as_root};

/// Debian packages the tests need.
const DEBIAN_PACKAGES: &[&str] = &[
    "curl",
    "python3",
    "nodejs",
    "iproute2",
    "ca-certificates",
    "openssl",
    "procps",
    "python3-venv",
    // The compatibility tests' git client and server (`git http-backend`), and Go's net/http.
    "git",
    "golang-go",
    // java.net.http (tests/tests/compat_jvm.rs): Debian's default JDK runtime, under
    // /usr/lib/jvm, world-readable; it runs a single source file without javac.
    "default-jre-headless",
    // Real containers and pods (tests/src/container.rs, tests/tests/containers.rs): podman with
    // runc, since Debian 12's crun refuses hybrid cgroup hierarchies; catatonit is the init
    // podman builds its pod infra image from when no registry is reachable (`kube play` fails
    // without it: "finding pause binary: exec: \"catatonit\": executable file not found").
    "podman",
    "runc",
    "catatonit",
    // containerd as a runtime of `attach --container` (tests/src/containerd.rs,
    // tests/tests/containerd.rs): containerd, its CLI ctr and the io.containerd.runc.v2 shim
    // (using the runc above). The package ships only a systemd unit (no init script): without
    // systemd, or with a policy-rc.d refusing starts, installing it starts nothing; where systemd
    // starts the system containerd, it does not meet the tests' own, which has its own config,
    // root, state and sockets in a temporary dir and a namespace of its own.
    "containerd",
    // The console driven in a real terminal (tests/tests/approvals.rs).
    "tmux",
    // The metrics test's scraper (tests/tests/metrics.rs): a real Prometheus, started by the
    // test with its own config, storage dir and loopback port. Where systemd runs, the package
    // starts its own service on :9090; the test needs none and meets none.
    "prometheus",
    // The Debian package (xtask/src/package.rs, tests/tests/package.rs): dpkg-shlibdeps finds its
    // library dependencies; the test checks the unit with systemd-analyze, renders the man pages
    // with man, and loads the completions in bash, zsh and fish.
    "dpkg-dev",
    "systemd",
    "man-db",
    "groff-base",
    "zsh",
    "fish",
    // The read-only audit disk test (tests/tests/faults.rs): mkfs.ext4 and e2fsck for an ext4
    // image on a loop device (mount's loop support is util-linux, always there).
    "e2fsprogs",
    // The unprivileged mode's redirect rules in the agent's network namespace
    // (ctl/src/launcher/unprivileged, tests/tests/unprivileged.rs): nft, and iptables-nft for
    // the fallback where nft is not installed; util-linux's setpriv runs brokerd and brokerctl
    // as uid 65534.
    "nftables",
    "iptables",
];

/// Debian packages installed when the configured apt sources have them, skipped otherwise.
const OPTIONAL_DEBIAN_PACKAGES: &[&str] = &["bpftool"];

/// The toolchain the eBPF programs build with (also pinned by `ebpf/programs/rust-toolchain.toml`).
const EBPF_TOOLCHAIN: &str = "nightly";

const BPF_LINKER_VERSION: &str = "0.13.0";
/// The bpf-linker feature naming the LLVM major version of the nightly toolchain's libLLVM.
const BPF_LINKER_LLVM_FEATURE: &str = "llvm-22";

/// Installs whatever is missing; quick when everything is present.
pub fn ensure() -> Result<()> {
    debian_packages().context("installing Debian packages")?;
    rustup_components().context("installing rustup components")?;
    bpf_linker().context("installing bpf-linker")?;
    eprintln!("setup: everything the build and the tests need is installed");
    Ok(())
}

fn debian_packages() -> Result<()> {
    let all: Vec<&str> = DEBIAN_PACKAGES
        .iter()
        .chain(OPTIONAL_DEBIAN_PACKAGES)
        .copied()
        .collect();
    let installed = installed_debian_packages(&all)?;
    let missing: Vec<&str> = all
        .into_iter()
        .filter(|p| !installed.iter().any(|i| i == p))
        .collect();
    if missing.is_empty() {
        return Ok(());
    }
    if !running_as_root() {
        bail!(
            "missing Debian packages {}: run `cargo xtask setup` as root, or install them with \
             `apt-get install {}`",
            missing.join(", "),
            missing.join(" ")
        );
    }
    cmd::run(apt_get()?.arg("update"))?;
    let mut to_install = Vec::new();
    for package in missing {
        if OPTIONAL_DEBIAN_PACKAGES.contains(&package) && !apt_has_package(package)? {
            eprintln!(
                "setup: optional package {package} is not available from the configured apt \
                 sources; skipping it"
            );
        } else {
            to_install.push(package);
        }
    }
    if !to_install.is_empty() {
        let mut install = apt_get()?;
        install
            .args(["install", "--yes", "--no-install-recommends"])
            .args(&to_install);
        cmd::run(&mut install)?;
    }
    Ok(())
}

/// Which of `packages` dpkg reports as installed.
fn installed_debian_packages(packages: &[&str]) -> Result<Vec<String>> {
    // dpkg-query exits non-zero when it knows nothing of a package, which is the answer "missing",
    // so its stdout is read whatever the exit status.
    let mut query = cmd::in_workspace("dpkg-query")?;
    query
        .args(["--show", "--showformat=${Package}\t${db:Status-Abbrev}\n"])
        .args(packages)
        .stderr(Stdio::null());
    let shown = cmd::echo(&query);
    let output = query
        .output()
        .with_context(|| format!("running `{shown}` (xtask setup supports Debian only)"))?;
    let stdout = String::from_utf8_lossy(&output.stdout);
    Ok(parse_installed(&stdout))
}

/// Reads `dpkg-query` lines of `package<TAB>status`, where a status whose second letter is `i`
/// means installed (as in `ii`, or `hi` for a held package).
fn parse_installed(dpkg_query_output: &str) -> Vec<String> {
    dpkg_query_output
        .lines()
        .filter_map(|line| line.split_once('\t'))
        .filter(|(_, status)| status.chars().nth(1) == Some('i'))
        .map(|(package, _)| package.to_owned())
        .collect()
}

fn apt_get() -> Result<Command> {
    let mut apt = cmd::in_workspace("apt-get")?;
    apt.env("DEBIAN_FRONTEND", "noninteractive");
    Ok(apt)
}

fn apt_has_package(package: &str) -> Result<bool> {
    let mut show = cmd::in_workspace("apt-cache")?;
    show.args(["show", package])
        .stdout(Stdio::null())
        .stderr(Stdio::null());
    let shown = cmd::echo(&show);
    let status = show
        .status()
        .with_context(|| format!("running `{shown}`"))?;
    Ok(status.success())
}

fn rustup_components() -> Result<()> {
    // No --toolchain: the host toolchain is whichever one runs xtask (rustup passes it down in
    // RUSTUP_TOOLCHAIN), normally the stable default.
    ensure_components(None, &["rustfmt", "clippy"])?;
    ensure_components(Some(EBPF_TOOLCHAIN), &["rust-src", "rustfmt"])
}

fn ensure_components(toolchain: Option<&str>, wanted: &[&str]) -> Result<()> {
    let rustup = |args: &[&str]| -> Result<Command> {
        let mut rustup = cmd::in_workspace("rustup")?;
        rustup.args(args);
        if let Some(toolchain) = toolchain {
            rustup.args(["--toolchain", toolchain]);
        }
        Ok(rustup)
    };
    let which = toolchain.unwrap_or("the host toolchain");
    let installed = cmd::stdout_of(&mut rustup(&["component", "list", "--installed"])?)
        .with_context(|| format!("listing the components of {which} (is it installed?)"))?;
    let missing: Vec<&str> = wanted
        .iter()
        .copied()
        .filter(|component| !has_component(&installed, component))
        .collect();
    if !missing.is_empty() {
        cmd::run(rustup(&["component", "add"])?.args(&missing))?;
    }
    Ok(())
}

/// Whether `rustup component list --installed` lists `component`, which it names either bare
/// (`rust-src`) or with the target appended (`rustfmt-x86_64-unknown-linux-gnu`).
fn has_component(installed: &str, component: &str) -> bool {
    installed.lines().any(|line| {
        line.strip_prefix(component)
            .is_some_and(|rest| rest.is_empty() || rest.starts_with('-'))
    })
}

fn bpf_linker() -> Result<()> {
    let linker = paths::tools_bin_dir().join("bpf-linker");
    if bpf_linker_is_usable(&linker) {
        return Ok(());
    }
    let tools = paths::tools_dir();
    let llvm_prefix = tools.join("llvm");
    link_nightly_libllvm(&llvm_prefix)?;
    // --force: a bpf-linker that no longer runs (its nightly libLLVM was updated away) is still
    // recorded as installed, and cargo would otherwise keep it.
    let mut install = cmd::in_workspace("cargo")?;
    cmd::remove_inherited_env(&mut install, |name| {
        matches!(name, "CARGO_TARGET_DIR" | "CARGO_BUILD_TARGET_DIR")
    });
    install
        .env("LLVM_PREFIX", &llvm_prefix)
        .args(["install", "--locked", "--force"])
        .arg(format!("bpf-linker@{BPF_LINKER_VERSION}"))
        .args([
            "--no-default-features",
            "--features",
            BPF_LINKER_LLVM_FEATURE,
            "--root",
        ])
        .arg(&tools);
    cmd::run(&mut install)?;
    if !bpf_linker_is_usable(&linker) {
        bail!("{} was installed but does not run", linker.display());
    }
    Ok(())
}

/// Whether `linker` exists, runs, and is the pinned version.
fn bpf_linker_is_usable(linker: &Path) -> bool {
    if !linker.is_file() {
        return false;
    }
    match cmd::stdout_of(Command::new(linker).arg("--version")) {
        Ok(version) => version
            .split_whitespace()
            .any(|word| word == BPF_LINKER_VERSION),
        Err(err) => {
            eprintln!("setup: {err:#}; reinstalling bpf-linker");
            false
        }
    }
}

/// Makes `prefix/lib` an LLVM prefix for bpf-linker's build: symlinks to the nightly toolchain's
/// libLLVM files, plus the plain `libLLVM.so` name the linker looks for.
fn link_nightly_libllvm(prefix: &Path) -> Result<()> {
    let sysroot_lib = nightly_sysroot()?.join("lib");
    let mut libraries: Vec<PathBuf> = fs::read_dir(&sysroot_lib)
        .with_context(|| format!("reading {}", sysroot_lib.display()))?
        .map(|entry| entry.map(|entry| entry.path()))
        .collect::<Result<_, _>>()
        .with_context(|| format!("reading {}", sysroot_lib.display()))?;
    libraries.retain(|path| file_name(path).starts_with("libLLVM"));
    libraries.sort();
    let Some(main_library) = libllvm_shared_library(&libraries) else {
        bail!("no libLLVM in {}", sysroot_lib.display());
    };

    let lib = prefix.join("lib");
    // Start afresh so links to an older nightly's libLLVM do not linger.
    if prefix.exists() {
        fs::remove_dir_all(prefix).with_context(|| format!("removing {}", prefix.display()))?;
    }
    fs::create_dir_all(&lib).with_context(|| format!("creating {}", lib.display()))?;
    for library in &libraries {
        symlink(library, &lib.join(file_name(library)))?;
    }
    symlink(main_library, &lib.join("libLLVM.so"))
}

fn nightly_sysroot() -> Result<PathBuf> {
    let mut rustc = cmd::in_workspace("rustc")?;
    rustc
        .arg(format!("+{EBPF_TOOLCHAIN}"))
        .args(["--print", "sysroot"]);
    let sysroot = cmd::stdout_of(&mut rustc).context("finding the nightly toolchain's sysroot")?;
    Ok(PathBuf::from(sysroot.trim()))
}

/// The shared library among the sysroot's libLLVM files: `libLLVM.so.<version>` if present, else
/// `libLLVM-<version>.so`.
fn libllvm_shared_library(libraries: &[PathBuf]) -> Option<&PathBuf> {
    let named = |pattern: fn(&str) -> bool| libraries.iter().find(|path| pattern(&file_name(path)));
    named(|name| name.starts_with("libLLVM.so."))
        .or_else(|| named(|name| name.starts_with("libLLVM-") && name.ends_with(".so")))
}

fn file_name(path: &Path) -> String {
    path.file_name()
        .unwrap_or_default()
        .to_string_lossy()
        .into_owned()
}

fn symlink(target: &Path, link: &Path) -> Result<()> {
    std::os::unix::fs::symlink(target, link)
        .with_context(|| format!("linking {} to {}", link.display(), target.display()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_installed_packages_from_dpkg_query() {
        let output = "curl\tii \nbpftool\trc \nnodejs\thi \npython3\tun \n";
        assert_eq!(parse_installed(output), ["curl", "nodejs"]);
    }

    #[test]
    fn finds_components_with_or_without_a_target_suffix() {
        let installed =
            "cargo-x86_64-unknown-linux-gnu\nrust-src\nrustfmt-x86_64-unknown-linux-gnu\n";
        assert!(has_component(installed, "rust-src"));
        assert!(has_component(installed, "rustfmt"));
        assert!(!has_component(installed, "clippy"));
        assert!(!has_component(installed, "rust-docs"));
    }

    #[test]
    fn prefers_the_versioned_libllvm_shared_object() {
        let libraries = [
            PathBuf::from("/s/lib/libLLVM-22-rust-1.97.0-nightly.so"),
            PathBuf::from("/s/lib/libLLVM.so.22.1-rust-1.97.0-nightly"),
        ];
        assert_eq!(libllvm_shared_library(&libraries), Some(&libraries[1]));
        assert_eq!(libllvm_shared_library(&libraries[..1]), Some(&libraries[0]));
        assert_eq!(libllvm_shared_library(&[]), None);
    }
}
