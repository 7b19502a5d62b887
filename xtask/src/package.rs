//! `cargo xtask package`: a Debian package of brokerd and brokerctl, built with `dpkg-deb`.
//!
//! The package holds the two binaries, the hardened systemd unit, a default config file and policy
//! directory (conffiles), man pages and bash, zsh and fish completions, the copyright file and
//! maintainer scripts; everything but the binaries and the generated docs is a file of
//! `deploy/debian/`. The man pages and completions are written by the packaged binaries
//! themselves from their clap definitions (`brokerd --generate-docs`, `brokerctl generate-docs`,
//! both hidden), so they document exactly what is installed. Dependencies on shared libraries
//! come from `dpkg-shlibdeps`.
//!
//! By default the eBPF programs and the two binaries are built with the release profile first;
//! `--bin-dir` packages binaries already built there instead, and `--fast-compression` trades
//! size for time (the tests use both, on `target/debug`).
//! Everything is written below `--out` (default `target/package`).

use std::fs;
use std::io::Write as _;
use std::os::unix::fs::PermissionsExt as _;
use std::path::{Path, PathBuf};

use anyhow::{Context, Result, bail};

use crate::{build, cmd, paths, setup};

/// The package's name, also the name of its unit and of its directories.
const NAME: &str = "agent-broker";

/// The binaries installed in /usr/bin, each with the hidden command line that makes it write its
/// own man pages and completions into a directory (given last).
const BINARIES: [(&str, &[&str]); 2] = [
    ("brokerd", &["--generate-docs"]),
    ("brokerctl", &["generate-docs"]),
];

/// Files of `deploy/debian/` and where the package installs them, with their modes.
const FILES: [(&str, &str, u32); 6] = [
    (
        "agent-broker.service",
        "lib/systemd/system/agent-broker.service",
        0o644,
    ),
    ("brokerd.toml", "etc/agent-broker/brokerd.toml", 0o644),
    (
        "example.toml",
        "etc/agent-broker/policies/example.toml",
        0o644,
    ),
    ("copyright", "usr/share/doc/agent-broker/copyright", 0o644),
    (
        "../../README.md",
        "usr/share/doc/agent-broker/README.md",
        0o644,
    ),
    (
        "../../policies/README.md",
        "usr/share/doc/agent-broker/policies.md",
        0o644,
    ),
];

/// Files below /etc that dpkg keeps when the operator changed them.
const CONFFILES: [&str; 2] = [
    "/etc/agent-broker/brokerd.toml",
    "/etc/agent-broker/policies/example.toml",
];

/// Maintainer scripts of `deploy/debian/`.
const SCRIPTS: [&str; 3] = ["postinst", "prerm", "postrm"];

/// What `cargo xtask package` was asked for.
pub struct Options {
    /// Package the binaries in this directory instead of building them.
    pub bin_dir: Option<PathBuf>,
    /// Where the package (and its staging tree) goes.
    pub out: Option<PathBuf>,
    /// gzip -1 instead of dpkg-deb's default xz: seconds instead of minutes for debug binaries.
    pub fast_compression: bool,
}

/// Builds the binaries unless given, stages the package's tree and builds the `.deb`.
pub fn package(options: &Options) -> Result<()> {
    let bin_dir = match &options.bin_dir {
        Some(dir) => absolute(dir)?,
        None => {
            build_release().context("building the release binaries")?;
            paths::target_dir().join("release")
        }
    };
    let out = match &options.out {
        Some(dir) => absolute(dir)?,
        None => paths::target_dir().join("package"),
    };
    let version = env!("CARGO_PKG_VERSION");
    let arch = cmd::stdout_of(cmd::in_workspace("dpkg")?.arg("--print-architecture"))?
        .trim()
        .to_owned();
    let stage = out.join(format!("{NAME}_{version}_{arch}"));
    if stage.exists() {
        fs::remove_dir_all(&stage).with_context(|| format!("removing {}", stage.display()))?;
    }
    fs::create_dir_all(&stage).with_context(|| format!("creating {}", stage.display()))?;

    stage_binaries(&bin_dir, &stage)?;
    stage_docs(&stage, &out)?;
    let debian = paths::root().join("deploy/debian");
    for (from, to, mode) in FILES {
        install(&debian.join(from), &stage.join(to), mode)?;
    }
    let control_dir = stage.join("DEBIAN");
    for script in SCRIPTS {
        install(&debian.join(script), &control_dir.join(script), 0o755)?;
    }
    write_file(
        &control_dir.join("conffiles"),
        &format!("{}\n", CONFFILES.join("\n")),
    )?;
    let depends = shared_library_depends(&stage, &out)?;
    let control = control_file(version, &arch, &depends, installed_size_kib(&stage)?);
    write_file(&control_dir.join("control"), &control)?;
    // dpkg-deb insists on the modes of the control directory; every directory is 0755 whatever
    // the umask.
    set_dir_modes(&stage)?;

    let deb = out.join(format!("{NAME}_{version}_{arch}.deb"));
    let mut dpkg_deb = cmd::in_workspace("dpkg-deb")?;
    dpkg_deb.arg("--root-owner-group");
    if options.fast_compression {
        dpkg_deb.args(["-Zgzip", "-z1"]);
    }
    dpkg_deb.arg("--build").arg(&stage).arg(&deb);
    cmd::run(&mut dpkg_deb)?;
    eprintln!("package: {}", cmd::relative(&deb));
    Ok(())
}

/// The eBPF programs (brokerd embeds them), then brokerd and brokerctl with the release profile.
fn build_release() -> Result<()> {
    setup::ensure()?;
    build::build_ebpf().context("building the eBPF programs")?;
    let mut host = cmd::workspace_cargo()?;
    host.args([
        "build",
        "--release",
        "--package",
        "agent-broker",
        "--package",
        "agent-broker-ctl",
        "--bins",
    ]);
    cmd::run(&mut host)
}

fn absolute(path: &Path) -> Result<PathBuf> {
    std::path::absolute(path).with_context(|| format!("resolving {}", path.display()))
}

/// Copies the binaries into usr/bin without their debug sections (the release profile keeps line
/// tables for backtraces and perf; the package does not ship them).
fn stage_binaries(bin_dir: &Path, stage: &Path) -> Result<()> {
    for (bin, _) in BINARIES {
        let from = bin_dir.join(bin);
        if !from.is_file() {
            bail!(
                "{} not found: build it first (`cargo xtask build`), or leave out --bin-dir",
                from.display()
            );
        }
        let to = stage.join("usr/bin").join(bin);
        install(&from, &to, 0o755)?;
        cmd::run(cmd::in_workspace("strip")?.arg("--strip-debug").arg(&to))?;
    }
    Ok(())
}

/// Runs each staged binary's documentation generator, then installs its man pages (gzipped, in
/// the section their name ends with) and completions where bash-completion, zsh and fish look.
fn stage_docs(stage: &Path, out: &Path) -> Result<()> {
    let generated = out.join("docs");
    if generated.exists() {
        fs::remove_dir_all(&generated)
            .with_context(|| format!("removing {}", generated.display()))?;
    }
    for (bin, generate) in BINARIES {
        let dir = generated.join(bin);
        let mut run = cmd::in_workspace(stage.join("usr/bin").join(bin))?;
        run.args(generate).arg(&dir);
        cmd::run(&mut run).with_context(|| format!("generating the docs of {bin}"))?;

        let man = dir.join("man");
        let mut pages = 0;
        for entry in fs::read_dir(&man).with_context(|| format!("reading {}", man.display()))? {
            let page = entry?.path();
            let Some(section) = page.extension().and_then(|s| s.to_str()) else {
                bail!("man page {} has no section", page.display());
            };
            let Some(file_name) = page.file_name().and_then(|s| s.to_str()) else {
                bail!("man page {} has no UTF-8 name", page.display());
            };
            let to = stage
                .join("usr/share/man")
                .join(format!("man{section}"))
                .join(format!("{file_name}.gz"));
            gzip(&page, &to)?;
            pages += 1;
        }
        if pages == 0 {
            bail!("{bin} wrote no man page into {}", man.display());
        }

        let completions = dir.join("completions");
        for (generated_name, installed) in [
            (
                format!("{bin}.bash"),
                format!("usr/share/bash-completion/completions/{bin}"),
            ),
            (
                format!("_{bin}"),
                format!("usr/share/zsh/vendor-completions/_{bin}"),
            ),
            (
                format!("{bin}.fish"),
                format!("usr/share/fish/vendor_completions.d/{bin}.fish"),
            ),
        ] {
            install(
                &completions.join(generated_name),
                &stage.join(installed),
                0o644,
            )?;
        }
    }
    Ok(())
}

/// Writes `from` gzipped (maximum compression, no name or time in the header, as Debian wants
/// man pages) to `to`.
fn gzip(from: &Path, to: &Path) -> Result<()> {
    let text = fs::read(from).with_context(|| format!("reading {}", from.display()))?;
    let mut encoder = flate2::GzBuilder::new().write(Vec::new(), flate2::Compression::best());
    encoder.write_all(&text)?;
    let compressed = encoder.finish()?;
    create_parent(to)?;
    fs::write(to, compressed).with_context(|| format!("writing {}", to.display()))?;
    set_mode(to, 0o644)
}

/// The `Depends` of the binaries' shared libraries, as `dpkg-shlibdeps` finds them. It reads
/// `debian/control` from its working directory, so it runs in a scratch one holding a minimal one.
fn shared_library_depends(stage: &Path, out: &Path) -> Result<String> {
    let scratch = out.join("shlibdeps");
    write_file(
        &scratch.join("debian/control"),
        &format!("Source: {NAME}\n\nPackage: {NAME}\nArchitecture: any\n"),
    )?;
    let mut shlibdeps = cmd::in_workspace("dpkg-shlibdeps")?;
    shlibdeps.current_dir(&scratch).arg("-O");
    for (bin, _) in BINARIES {
        shlibdeps.arg(format!("-e{}", stage.join("usr/bin").join(bin).display()));
    }
    let printed = cmd::stdout_of(&mut shlibdeps).context(
        "finding the shared library dependencies (dpkg-shlibdeps is in the dpkg-dev package, \
         which `cargo xtask setup` installs)",
    )?;
    parse_shlibs_depends(&printed)
        .with_context(|| format!("dpkg-shlibdeps printed no shlibs:Depends: {printed:?}"))
}

/// The value of `shlibs:Depends=...` in dpkg-shlibdeps' output.
fn parse_shlibs_depends(printed: &str) -> Option<String> {
    printed
        .lines()
        .find_map(|line| line.strip_prefix("shlibs:Depends="))
        .map(|value| value.trim().to_owned())
        .filter(|value| !value.is_empty())
}

fn control_file(version: &str, arch: &str, depends: &str, installed_size_kib: u64) -> String {
    format!(
        "Package: {NAME}\n\
         Version: {version}\n\
         Architecture: {arch}\n\
         Maintainer: agent-broker maintainers <agent-broker@example.invalid>\n\
         Installed-Size: {installed_size_kib}\n\
         Depends: {depends}\n\
         Recommends: openssl\n\
         Section: admin\n\
         Priority: optional\n\
         Homepage: https://example.invalid/agent-broker\n\
         Description: credential broker that keeps API keys away from AI agents\n \
         brokerd receives every outbound TCP connection of the processes in the cgroups\n \
         it tags, through eBPF programs attached to them, decides each request by\n \
         policy, and writes the real credential from its encrypted vault into the\n \
         request; agents only ever hold a placeholder. brokerctl tags cgroups, starts\n \
         sandboxed agents inside them, manages secrets and shows the live console.\n"
    )
}

/// The staged tree's size in KiB, counting each file in whole KiB as dpkg's estimate does.
fn installed_size_kib(stage: &Path) -> Result<u64> {
    let mut total = 0;
    let mut pending = vec![stage.to_path_buf()];
    while let Some(dir) = pending.pop() {
        for entry in fs::read_dir(&dir).with_context(|| format!("reading {}", dir.display()))? {
            let entry = entry?;
            let path = entry.path();
            if path == stage.join("DEBIAN") {
                continue;
            }
            let meta = entry.metadata()?;
            if meta.is_dir() {
                pending.push(path);
            } else {
                total += meta.len().div_ceil(1024);
            }
        }
    }
    Ok(total)
}

/// Gives every directory of the tree mode 0755.
fn set_dir_modes(root: &Path) -> Result<()> {
    set_mode(root, 0o755)?;
    for entry in fs::read_dir(root).with_context(|| format!("reading {}", root.display()))? {
        let entry = entry?;
        if entry.file_type()?.is_dir() {
            set_dir_modes(&entry.path())?;
        }
    }
    Ok(())
}

fn install(from: &Path, to: &Path, mode: u32) -> Result<()> {
    create_parent(to)?;
    fs::copy(from, to)
        .with_context(|| format!("copying {} to {}", from.display(), to.display()))?;
    set_mode(to, mode)
}

fn write_file(path: &Path, text: &str) -> Result<()> {
    create_parent(path)?;
    fs::write(path, text).with_context(|| format!("writing {}", path.display()))?;
    set_mode(path, 0o644)
}

fn create_parent(path: &Path) -> Result<()> {
    if let Some(dir) = path.parent() {
        fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    }
    Ok(())
}

fn set_mode(path: &Path, mode: u32) -> Result<()> {
    fs::set_permissions(path, fs::Permissions::from_mode(mode))
        .with_context(|| format!("setting the mode of {}", path.display()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_depends_come_from_the_shlibs_line() {
        let printed = "shlibs:Depends=libc6 (>= 2.34), libgcc-s1 (>= 4.2)\n";
        assert_eq!(
            parse_shlibs_depends(printed).as_deref(),
            Some("libc6 (>= 2.34), libgcc-s1 (>= 4.2)")
        );
        assert_eq!(parse_shlibs_depends("shlibs:Depends=\n"), None);
        assert_eq!(parse_shlibs_depends(""), None);
    }

    #[test]
    fn the_control_file_is_well_formed() {
        let control = control_file("1.2.3", "amd64", "libc6 (>= 2.34)", 42);
        assert!(control.starts_with("Package: agent-broker\nVersion: 1.2.3\n"));
        assert!(control.contains("\nArchitecture: amd64\n"));
        assert!(control.contains("\nDepends: libc6 (>= 2.34)\n"));
        assert!(control.contains("\nInstalled-Size: 42\n"));
        // A continuation line of the description starts with one space; none is empty.
        let description = control
            .split_once("Description: ")
            .map(|(_, d)| d)
            .unwrap_or_default();
        for line in description.lines().skip(1) {
            assert!(line.starts_with(' ') && line.trim().len() > 1, "{line:?}");
        }
        assert!(control.ends_with('\n'));
    }
}
