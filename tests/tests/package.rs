//! Issue 16 part 4, the Debian package: `cargo xtask package --bin-dir` on the binaries already
//! built, then real dpkg-deb, systemd-analyze, man, bash, zsh and fish on what it made.
//!
//! Nothing is installed into the machine: the package is unpacked with `dpkg-deb -x` into a
//! scratch root under `target/package-test` (replaced by each run), its postinst runs in a mount
//! namespace of its own where that root's /etc is the /etc, and the packaged brokerd runs from
//! the scratch root under `setpriv` with exactly the capabilities its unit leaves it.
//!
//! Needs root (the mount namespace, brokerd), cgroup v2 and BPF; dpkg-deb and dpkg-shlibdeps
//! (dpkg-dev), systemd-analyze (systemd), man (man-db), zsh, fish, setpriv,
//! unshare and curl, all installed by `cargo xtask setup`.
//!
//! Run as root: `cargo test -p agent-broker-tests --test package -- --test-threads=1`.

use std::{
    ffi::OsString,
    fs,
    os::unix::fs::PermissionsExt as _,
    path::PathBuf,
    process::{Command, Output, Stdio},
    sync::OnceLock,
    time::Duration,
};

use agent_broker_protocol::{Request, Response};
use agent_broker_tests::{
    Broker, SHORT, TestCgroup, TestServer, bin, cgroup2_mount, require_privileges,
    run_with_timeout, spawn_in_cgroup, wait_with_timeout, workspace_dir,
};
use sha2::{Digest as _, Sha256};

const VERSION: &str = env!("CARGO_PKG_VERSION");

/// Files every package must hold, with their modes.
const EXPECTED: &[(&str, &str)] = &[
    ("./usr/bin/brokerd", "-rwxr-xr-x"),
    ("./usr/bin/brokerctl", "-rwxr-xr-x"),
    ("./lib/systemd/system/agent-broker.service", "-rw-r--r--"),
    ("./etc/agent-broker/brokerd.toml", "-rw-r--r--"),
    ("./etc/agent-broker/policies/example.toml", "-rw-r--r--"),
    ("./usr/share/man/man8/brokerd.8.gz", "-rw-r--r--"),
    ("./usr/share/man/man1/brokerctl.1.gz", "-rw-r--r--"),
    ("./usr/share/man/man1/brokerctl-attach.1.gz", "-rw-r--r--"),
    (
        "./usr/share/man/man1/brokerctl-secret-set.1.gz",
        "-rw-r--r--",
    ),
    (
        "./usr/share/bash-completion/completions/brokerd",
        "-rw-r--r--",
    ),
    (
        "./usr/share/bash-completion/completions/brokerctl",
        "-rw-r--r--",
    ),
    ("./usr/share/zsh/vendor-completions/_brokerd", "-rw-r--r--"),
    (
        "./usr/share/zsh/vendor-completions/_brokerctl",
        "-rw-r--r--",
    ),
    (
        "./usr/share/fish/vendor_completions.d/brokerd.fish",
        "-rw-r--r--",
    ),
    (
        "./usr/share/fish/vendor_completions.d/brokerctl.fish",
        "-rw-r--r--",
    ),
    ("./usr/share/doc/agent-broker/copyright", "-rw-r--r--"),
    ("./usr/share/doc/agent-broker/policies.md", "-rw-r--r--"),
];

/// The package, built once per test process, and where it was unpacked.
struct Package {
    deb: PathBuf,
    /// `dpkg-deb -x`: the files as they would be installed.
    root: PathBuf,
    /// `dpkg-deb -e`: control file, conffiles, maintainer scripts.
    control: PathBuf,
}

impl Package {
    fn unit(&self) -> PathBuf {
        self.root.join("lib/systemd/system/agent-broker.service")
    }

    fn man_pages(&self) -> Vec<PathBuf> {
        let mut pages = Vec::new();
        for section in ["man1", "man8"] {
            let dir = self.root.join("usr/share/man").join(section);
            for entry in fs::read_dir(&dir).unwrap_or_else(|e| panic!("{}: {e}", dir.display())) {
                pages.push(entry.unwrap_or_else(|e| panic!("{e}")).path());
            }
        }
        pages.sort();
        pages
    }
}

fn package() -> &'static Package {
    static PACKAGE: OnceLock<Package> = OnceLock::new();
    PACKAGE.get_or_init(build_package)
}

fn build_package() -> Package {
    let base = workspace_dir().join("target/package-test");
    if base.exists() {
        fs::remove_dir_all(&base).unwrap_or_else(|e| panic!("removing {}: {e}", base.display()));
    }
    let out = base.join("out");
    let brokerd = bin("brokerd");
    let bin_dir = brokerd.parent().unwrap_or_else(|| panic!("no dir"));
    let cargo = std::env::var_os("CARGO").unwrap_or_else(|| "cargo".into());
    let mut xtask = Command::new(cargo);
    xtask
        .current_dir(workspace_dir())
        .args(["xtask", "package", "--fast-compression", "--bin-dir"])
        .arg(bin_dir)
        .arg("--out")
        .arg(&out);
    let built = run_with_timeout(&mut xtask, Duration::from_secs(300));
    assert!(
        built.status.success(),
        "cargo xtask package failed ({}):\n{}{}",
        built.status,
        String::from_utf8_lossy(&built.stdout),
        String::from_utf8_lossy(&built.stderr)
    );
    let arch = stdout(Command::new("dpkg").arg("--print-architecture"))
        .trim()
        .to_owned();
    let deb = out.join(format!("agent-broker_{VERSION}_{arch}.deb"));
    assert!(
        deb.is_file(),
        "no {} after cargo xtask package",
        deb.display()
    );
    let root = base.join("root");
    let control = base.join("control");
    stdout(Command::new("dpkg-deb").arg("-x").arg(&deb).arg(&root));
    stdout(Command::new("dpkg-deb").arg("-e").arg(&deb).arg(&control));
    Package { deb, root, control }
}

/// Runs `cmd`, asserts it succeeded, returns its stdout.
fn stdout(cmd: &mut Command) -> String {
    let out = run_with_timeout(cmd, SHORT * 3);
    assert_success(&out, &format!("{cmd:?}"));
    String::from_utf8_lossy(&out.stdout).into_owned()
}

fn assert_success(out: &Output, what: &str) {
    assert!(
        out.status.success(),
        "{what} failed ({}):\nstdout:\n{}\nstderr:\n{}",
        out.status,
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}

fn field<'a>(control: &'a str, name: &str) -> &'a str {
    control
        .lines()
        .find_map(|l| l.strip_prefix(&format!("{name}: ")))
        .unwrap_or_else(|| panic!("no {name} in the control file:\n{control}"))
}

#[test]
fn the_package_describes_itself_and_holds_every_file_as_root() {
    require_privileges();
    let p = package();
    let info = stdout(Command::new("dpkg-deb").arg("--info").arg(&p.deb));
    let control = fs::read_to_string(p.control.join("control")).unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(field(&control, "Package"), "agent-broker");
    assert_eq!(field(&control, "Version"), VERSION);
    // From dpkg-shlibdeps: the binaries link glibc.
    assert!(
        field(&control, "Depends").contains("libc6 (>= "),
        "{control}"
    );
    assert_eq!(field(&control, "Recommends"), "openssl");
    let size: u64 = field(&control, "Installed-Size")
        .parse()
        .unwrap_or_else(|e| panic!("Installed-Size: {e}"));
    let binaries = fs::metadata(p.root.join("usr/bin/brokerd"))
        .map(|m| m.len())
        .unwrap_or(0);
    assert!(size * 1024 >= binaries, "Installed-Size {size} KiB");
    for script in ["postinst", "prerm", "postrm"] {
        assert!(
            info.contains(script),
            "dpkg-deb --info lists no {script}:\n{info}"
        );
        let mode = fs::metadata(p.control.join(script))
            .map(|m| m.permissions().mode() & 0o777)
            .unwrap_or(0);
        assert_eq!(mode, 0o755, "{script}");
    }
    let conffiles =
        fs::read_to_string(p.control.join("conffiles")).unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(
        conffiles,
        "/etc/agent-broker/brokerd.toml\n/etc/agent-broker/policies/example.toml\n"
    );

    let contents = stdout(Command::new("dpkg-deb").arg("--contents").arg(&p.deb));
    // `-rwxr-xr-x root/root   123 2026-01-01 00:00 ./usr/bin/brokerd`
    let entries: Vec<(&str, &str, &str)> = contents
        .lines()
        .filter_map(|l| {
            let words: Vec<&str> = l.split_whitespace().collect();
            (words.len() >= 6).then(|| (words[0], words[1], words[5]))
        })
        .collect();
    for (path, mode) in EXPECTED {
        assert!(
            entries
                .iter()
                .any(|(m, owner, p)| p == path && m == mode && *owner == "root/root"),
            "{path} ({mode}, root/root) is not in the package:\n{contents}"
        );
    }
    for (_, owner, path) in &entries {
        assert_eq!(*owner, "root/root", "{path}");
    }
    // The hidden documentation generators document nothing of their own.
    assert!(!contents.contains("generate-docs"), "{contents}");
    // The master key is made on the machine, never shipped.
    assert!(!contents.contains("master.key"), "{contents}");
}

/// dpkg itself unpacks the package into a scratch root with a dpkg database of its own (no
/// maintainer script runs: configuring would run postinst chrooted there), registers its
/// conffiles, and finds every unpacked file as the package's checksums say.
#[test]
fn dpkg_unpacks_it_into_a_scratch_root_and_registers_the_conffiles() {
    require_privileges();
    let p = package();
    let root = p.root.with_file_name("dpkg-root");
    if root.exists() {
        fs::remove_dir_all(&root).unwrap_or_else(|e| panic!("{e}"));
    }
    let db = root.join("var/lib/dpkg");
    for dir in ["info", "updates"] {
        fs::create_dir_all(db.join(dir)).unwrap_or_else(|e| panic!("{e}"));
    }
    fs::write(db.join("status"), "").unwrap_or_else(|e| panic!("{e}"));
    let dpkg = || {
        let mut cmd = Command::new("dpkg");
        cmd.arg(format!("--root={}", root.display()));
        cmd
    };
    // Dependencies (libc6, ...) are not in the empty database.
    stdout(dpkg().args(["--force-depends", "--unpack"]).arg(&p.deb));
    let status = stdout(dpkg().args(["--status", "agent-broker"]));
    assert_eq!(field(&status, "Status"), "install ok unpacked", "{status}");
    assert!(
        status.contains(" /etc/agent-broker/brokerd.toml ")
            && status.contains(" /etc/agent-broker/policies/example.toml "),
        "{status}"
    );
    let listed = stdout(dpkg().args(["--listfiles", "agent-broker"]));
    for path in [
        "/usr/bin/brokerd",
        "/lib/systemd/system/agent-broker.service",
        "/etc/agent-broker/policies/example.toml",
    ] {
        assert!(
            listed.lines().any(|l| l == path),
            "{path} not in:\n{listed}"
        );
        // A conffile waits as .dpkg-new until the package is configured.
        let unpacked = if path.starts_with("/etc/") {
            root.join(format!("{}.dpkg-new", &path[1..]))
        } else {
            root.join(&path[1..])
        };
        assert!(unpacked.is_file(), "{} not unpacked", unpacked.display());
    }
    // Every file matches its checksum; only the conffiles are not in place before configuring.
    assert_eq!(
        stdout(dpkg().args(["--verify", "agent-broker"])),
        "missing   c /etc/agent-broker/brokerd.toml\n\
         missing   c /etc/agent-broker/policies/example.toml\n"
    );
}

#[test]
fn the_packaged_binaries_answer_version_and_help() {
    require_privileges();
    let p = package();
    let brokerd = p.root.join("usr/bin/brokerd");
    let brokerctl = p.root.join("usr/bin/brokerctl");
    assert_eq!(
        stdout(Command::new(&brokerd).arg("--version")),
        format!("brokerd {VERSION}\n")
    );
    assert_eq!(
        stdout(Command::new(&brokerctl).arg("--version")),
        format!("brokerctl {VERSION}\n")
    );
    let help = stdout(Command::new(&brokerd).arg("--help"));
    assert!(help.contains("--master-key-credential"), "{help}");
    assert!(help.contains("--config <FILE>"), "{help}");
    assert!(!help.contains("generate-docs"), "{help}");
    let help = stdout(Command::new(&brokerctl).arg("--help"));
    for sub in ["attach", "run", "secret", "console", "status"] {
        assert!(
            help.lines().any(|l| l.trim_start().starts_with(sub)),
            "brokerctl --help lists no {sub}:\n{help}"
        );
    }
    assert!(!help.contains("generate-docs"), "{help}");
}

#[test]
fn the_unit_passes_systemd_analyze_verify_and_its_exposure_is_ok() {
    require_privileges();
    let p = package();
    // `--root` resolves the unit's dependencies (sysinit.target, ...) in the scratch root, so it
    // gets a copy of the machine's own units beside the package's; ExecStart= is checked against
    // the packaged brokerd there, and Documentation= (man:brokerd(8), man:brokerctl(1)) against
    // the packaged man pages.
    let units = p.root.join("usr/lib/systemd/system");
    if !units.exists() {
        let mut copy = Command::new("cp");
        copy.arg("-a")
            .arg("/usr/lib/systemd/system")
            .arg(p.root.join("usr/lib/systemd"));
        fs::create_dir_all(p.root.join("usr/lib/systemd")).unwrap_or_else(|e| panic!("{e}"));
        stdout(&mut copy);
    }
    let man_path = p.root.join("usr/share/man");
    let mut verify = Command::new("systemd-analyze");
    verify
        .arg("verify")
        .arg(format!("--root={}", p.root.display()))
        .arg("/lib/systemd/system/agent-broker.service")
        .env("MANPATH", &man_path);
    let out = run_with_timeout(&mut verify, SHORT * 3);
    assert_success(&out, "systemd-analyze verify");
    assert!(
        out.stderr.is_empty(),
        "systemd-analyze verify warned:\n{}",
        String::from_utf8_lossy(&out.stderr)
    );

    // The hardening as systemd scores it: 0 (sandboxed) to 10 (exposed); fail above 5.0.
    let mut security = Command::new("systemd-analyze");
    security
        .args(["security", "--offline=true", "--threshold=50"])
        .arg(format!("--root={}", p.root.display()))
        .arg("agent-broker.service");
    let out = run_with_timeout(&mut security, SHORT * 3);
    assert_success(&out, "systemd-analyze security --threshold=50");
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        text.contains("Overall exposure level for agent-broker.service"),
        "{text}"
    );
}

#[test]
fn every_man_page_renders_without_warnings() {
    require_privileges();
    let p = package();
    let pages = p.man_pages();
    let names: Vec<String> = pages
        .iter()
        .filter_map(|p| p.file_name().map(|n| n.to_string_lossy().into_owned()))
        .collect();
    for page in ["brokerd.8.gz", "brokerctl.1.gz", "brokerctl-run.1.gz"] {
        assert!(names.iter().any(|n| n == page), "no {page} in {names:?}");
    }
    // One page per visible subcommand, at every level (brokerctl secret set, ...).
    assert!(names.len() > 15, "{names:?}");
    for page in &pages {
        let mut man = Command::new("man");
        man.args(["--warnings", "-l"])
            .arg(page)
            .env("MANWIDTH", "100")
            .env("MANPAGER", "cat")
            .env("PAGER", "cat");
        let out = run_with_timeout(&mut man, SHORT * 3);
        assert_success(&out, &format!("man -l {}", page.display()));
        assert!(
            out.stderr.is_empty(),
            "man -l {} warned:\n{}",
            page.display(),
            String::from_utf8_lossy(&out.stderr)
        );
        let text = String::from_utf8_lossy(&out.stdout);
        let title = page
            .file_name()
            .and_then(|n| n.to_str())
            .and_then(|n| n.split('.').next())
            .unwrap_or_default();
        assert!(
            text.contains("NAME") && text.contains("SYNOPSIS") && text.contains(title),
            "man -l {} rendered:\n{text}",
            page.display()
        );
        // Every page another page refers to (SUBCOMMANDS: `brokerctl-secret-set(1)`) exists.
        for word in text.split_whitespace() {
            if let Some(name) = word
                .strip_suffix("(1)")
                .or_else(|| word.strip_suffix("(8)"))
                && (name.starts_with("brokerctl") || name.starts_with("brokerd"))
            {
                assert!(
                    names.iter().any(|n| n.split('.').next() == Some(name)),
                    "{} refers to {word}, which has no page: {names:?}",
                    page.display()
                );
            }
        }
    }
}

#[test]
fn the_completions_load_and_complete_subcommands_in_bash_zsh_and_fish() {
    require_privileges();
    let p = package();
    let bash_completion = p
        .root
        .join("usr/share/bash-completion/completions/brokerctl");
    // bash: the file loads without a message, registers a completion function, and that
    // function completes `brokerctl se` to `secret`.
    let script = format!(
        "set -e\nsource {file}\ncomplete -p brokerctl\n\
         COMP_WORDS=(brokerctl se); COMP_CWORD=1; COMP_LINE='brokerctl se'; COMP_POINT=12\n\
         func=$(complete -p brokerctl | sed -n 's/.*-F \\([^ ]*\\).*/\\1/p')\n\
         \"$func\" brokerctl se brokerctl\nprintf '%s\\n' \"${{COMPREPLY[@]}}\"\n",
        file = bash_completion.display()
    );
    let out = run_with_timeout(Command::new("bash").args(["--norc", "-c", &script]), SHORT);
    assert_success(&out, "bash completion");
    assert!(
        out.stderr.is_empty(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(text.lines().any(|l| l == "secret"), "{text}");
    assert!(!text.lines().any(|l| l == "generate-docs"), "{text}");
    let bash_brokerd = p.root.join("usr/share/bash-completion/completions/brokerd");
    let out = run_with_timeout(
        Command::new("bash").arg("--norc").arg("-c").arg(format!(
            "source {} && complete -p brokerd",
            bash_brokerd.display()
        )),
        SHORT,
    );
    assert_success(&out, "bash completion of brokerd");

    // zsh: both files parse.
    for name in ["_brokerd", "_brokerctl"] {
        let file = p.root.join("usr/share/zsh/vendor-completions").join(name);
        let out = run_with_timeout(Command::new("zsh").arg("-n").arg(&file), SHORT);
        assert_success(&out, &format!("zsh -n {}", file.display()));
    }

    // fish: the file loads, and fish completes `brokerctl se` to `secret`.
    let fish_file = p
        .root
        .join("usr/share/fish/vendor_completions.d/brokerctl.fish");
    let out = run_with_timeout(
        Command::new("fish")
            .arg("--no-config")
            .arg("-c")
            .arg(format!(
                "source {}; complete --do-complete 'brokerctl se'",
                fish_file.display()
            )),
        SHORT,
    );
    assert_success(&out, "fish completion");
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(text.lines().any(|l| l.starts_with("secret")), "{text}");
    let fish_brokerd = p
        .root
        .join("usr/share/fish/vendor_completions.d/brokerd.fish");
    let out = run_with_timeout(
        Command::new("fish")
            .arg("--no-config")
            .arg("-c")
            .arg(format!(
                "source {}; complete --do-complete 'brokerd --master-key'",
                fish_brokerd.display()
            )),
        SHORT,
    );
    assert_success(&out, "fish completion of brokerd");
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        text.lines()
            .any(|l| l.starts_with("--master-key-credential")),
        "{text}"
    );
}

#[test]
fn postinst_creates_a_private_master_key_once_and_keeps_it() {
    require_privileges();
    let p = package();
    let etc = p.root.join("etc");
    let key = etc.join("agent-broker/master.key");
    let _ = fs::remove_file(&key);
    // In a mount namespace of its own, the scratch root's /etc is /etc: the script writes
    // /etc/agent-broker/master.key as it would on a machine, and the machine's /etc is untouched.
    let run_postinst = |previous_version: &str| {
        let mut cmd = Command::new("unshare");
        cmd.args(["--mount", "--propagation", "private", "--", "sh", "-c"])
            .arg(r#"mount --bind "$1" /etc && sh "$2" configure "$3""#)
            .arg("sh")
            .arg(&etc)
            .arg(p.control.join("postinst"))
            .arg(previous_version);
        let out = run_with_timeout(&mut cmd, SHORT);
        assert_success(&out, "postinst configure");
        String::from_utf8_lossy(&out.stdout).into_owned()
    };
    let said = run_postinst("");
    assert!(said.contains("created the vault master key"), "{said}");
    let first = fs::read(&key).unwrap_or_else(|e| panic!("no master key after postinst: {e}"));
    assert_eq!(first.len(), 32, "the master key's length");
    let mode = fs::metadata(&key)
        .map(|m| m.permissions().mode() & 0o777)
        .unwrap_or(0);
    assert_eq!(mode, 0o600, "the master key's mode");
    // Run again (an upgrade): the key stays as it was.
    let said = run_postinst("0.0.1");
    assert!(!said.contains("created"), "{said}");
    let second = fs::read(&key).unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(
        Sha256::digest(&first),
        Sha256::digest(&second),
        "postinst replaced an existing master key"
    );
    fs::remove_file(&key).unwrap_or_else(|e| panic!("{e}"));
}

/// The capabilities the unit's `CapabilityBoundingSet=` leaves, as setpriv names them.
fn unit_capabilities(unit: &str) -> Vec<String> {
    let line = unit
        .lines()
        .find_map(|l| l.strip_prefix("CapabilityBoundingSet="))
        .unwrap_or_else(|| panic!("the unit sets no CapabilityBoundingSet:\n{unit}"));
    line.split_whitespace()
        .map(|c| {
            c.strip_prefix("CAP_")
                .unwrap_or_else(|| panic!("{c} is not a capability name"))
                .to_ascii_lowercase()
        })
        .collect()
}

/// Bit numbers of the capabilities the unit names (linux/capability.h).
fn capability_mask(names: &[String]) -> u64 {
    names
        .iter()
        .map(|n| match n.as_str() {
            "dac_override" => 1,
            "net_admin" => 12,
            "ipc_lock" => 14,
            "sys_ptrace" => 19,
            "perfmon" => 38,
            "bpf" => 39,
            other => panic!("the test does not know the bit of CAP_{other}"),
        })
        .fold(0, |mask, bit| mask | (1u64 << bit))
}

fn proc_status_field(pid: u32, name: &str) -> String {
    let status =
        fs::read_to_string(format!("/proc/{pid}/status")).unwrap_or_else(|e| panic!("{e}"));
    status
        .lines()
        .find_map(|l| l.strip_prefix(&format!("{name}:\t")))
        .unwrap_or_else(|| panic!("no {name} in /proc/{pid}/status"))
        .to_owned()
}

/// The packaged brokerd, started as its unit starts it (the packaged config file, the master key
/// as a systemd credential, no new privileges, only the unit's capabilities), brokers an agent's
/// call: the bounding set holds everything capture needs.
#[test]
fn the_packaged_brokerd_brokers_an_agent_with_only_the_units_capabilities() {
    require_privileges();
    let p = package();
    let unit = fs::read_to_string(p.unit()).unwrap_or_else(|e| panic!("{e}"));
    assert!(
        unit.contains(
            "ExecStart=/usr/bin/brokerd --config /etc/agent-broker/brokerd.toml \
             --master-key-credential"
        ),
        "{unit}"
    );
    assert!(
        unit.contains("LoadCredential=agent-broker-master-key:/etc/agent-broker/master.key"),
        "{unit}"
    );
    assert!(unit.contains("NoNewPrivileges=yes"), "{unit}");
    let caps = unit_capabilities(&unit);

    // What LoadCredential= gives brokerd: a directory with the key under the credential's name.
    let credentials = tempfile::tempdir().unwrap_or_else(|e| panic!("{e}"));
    let key_file = credentials.path().join("agent-broker-master-key");
    let mut key = [0u8; 32];
    getrandom::fill(&mut key).unwrap_or_else(|e| panic!("{e}"));
    fs::write(&key_file, key).unwrap_or_else(|e| panic!("{e}"));
    fs::set_permissions(&key_file, fs::Permissions::from_mode(0o400))
        .unwrap_or_else(|e| panic!("{e}"));

    let bounding = format!(
        "-all,{}",
        caps.iter()
            .map(|c| format!("+{c}"))
            .collect::<Vec<_>>()
            .join(",")
    );
    let brokerd = p.root.join("usr/bin/brokerd");
    // In a mount namespace of its own, as the unit's ProtectSystem= and PrivateTmp= give it.
    let command: Vec<OsString> = vec![
        "unshare".into(),
        "--mount".into(),
        "--propagation".into(),
        "slave".into(),
        "--".into(),
        "setpriv".into(),
        format!("--bounding-set={bounding}").into(),
        "--inh-caps=-all".into(),
        "--no-new-privs".into(),
        "--".into(),
        brokerd.into(),
        "--config".into(),
        p.root.join("etc/agent-broker/brokerd.toml").into(),
        "--master-key-credential".into(),
    ];

    let cg = TestCgroup::new();
    let agent = cg.child("packaged");
    let body = format!("hello from the package test {}\n", std::process::id());
    let http = TestServer::http("127.0.0.1:0", &body);
    let example = fs::read_to_string(p.root.join("etc/agent-broker/policies/example.toml"))
        .unwrap_or_else(|e| panic!("{e}"));
    let broker = Broker::builder()
        .command(&command)
        .env(
            "CREDENTIALS_DIRECTORY",
            &credentials.path().display().to_string(),
        )
        .policy("example", &example)
        .policy(
            "packaged",
            &format!(
                "cgroup = \"{agent}\"\n[[allow]]\nhost = \"{}\"\nport = {}\n",
                http.addr().ip(),
                http.addr().port()
            ),
        )
        .start();

    // brokerd runs with exactly the unit's capabilities, and no more can be gained.
    let mask = capability_mask(&caps);
    for field in ["CapBnd", "CapEff", "CapPrm"] {
        assert_eq!(
            u64::from_str_radix(&proc_status_field(broker.pid(), field), 16).unwrap_or(0),
            mask,
            "brokerd's {field}"
        );
    }
    assert_eq!(proc_status_field(broker.pid(), "NoNewPrivs"), "1");

    let status = broker.status();
    // CAP_IPC_LOCK: all of brokerd's memory is locked, and every hardening step held.
    assert!(
        status.hardening.contains("memory locked") && !status.hardening.contains("FAILED"),
        "{}",
        status.hardening
    );
    // The shipped example policy loads beside the test's, and says what it says.
    assert_eq!(
        (status.policy.files, status.policy.error.as_deref()),
        (2, None),
        "{:?}",
        status.policy
    );
    // What the README says of it: GET https://example.com/ is allowed, POST is not.
    for (method, allowed) in [("GET", true), ("POST", false)] {
        let request = Request::PolicyExplain {
            cgroup: "agents/example".into(),
            method: method.into(),
            url: "https://example.com/".into(),
        };
        match broker.request(&request) {
            Response::PolicyExplained { allowed: a, text } => {
                assert_eq!(a, allowed, "{method} https://example.com/: {text}")
            }
            other => panic!("policy explain answered {other:?}"),
        }
    }

    // The agent's cgroup is created by brokerd in a directory root has no write bit on, as in a
    // cgroup2 root mounted 0555: only CAP_DAC_OVERRIDE lets it.
    let parent = cgroup2_mount().join(cg.path());
    fs::set_permissions(&parent, fs::Permissions::from_mode(0o555))
        .unwrap_or_else(|e| panic!("{e}"));
    let url = format!("http://{}/", http.addr());
    let mut run = broker.ctl();
    run.args(["run", "--cgroup", &agent, "--create", "--"])
        .args(["curl", "-s", "--noproxy", "*", "--max-time", "5", &url])
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    let child = run.spawn().unwrap_or_else(|e| panic!("{run:?}: {e}"));
    let out = wait_with_timeout(child, SHORT * 2, "brokerctl run -- curl");
    fs::set_permissions(&parent, fs::Permissions::from_mode(0o755))
        .unwrap_or_else(|e| panic!("{e}"));
    assert!(
        out.status.success(),
        "brokerctl run -- curl failed ({}): {}\nbrokerd's log:\n{}",
        out.status,
        String::from_utf8_lossy(&out.stderr),
        broker.log()
    );
    assert_eq!(String::from_utf8_lossy(&out.stdout), body, "curl's output");
    let accepted = http.accepted();
    assert_eq!(accepted.len(), 1, "{accepted:?}");
    assert_eq!(
        accepted[0].owner,
        Some(broker.pid()),
        "the server should have been reached by the packaged brokerd: {accepted:?}"
    );

    // A process put into the agent's cgroup without the launcher, in the host's mount namespace:
    // brokerd, in a mount namespace of its own, still tells it shares the host's.
    assert_ne!(
        fs::read_link(format!("/proc/{}/ns/mnt", broker.pid())).ok(),
        fs::read_link("/proc/self/ns/mnt").ok(),
        "brokerd should run in a mount namespace of its own"
    );
    let mut sleep = Command::new("sleep");
    sleep.arg("30");
    let mut outsider = spawn_in_cgroup(&agent, &mut sleep);
    let listed = broker.status().unprotected;
    let _ = outsider.kill();
    let _ = outsider.wait();
    let entry = listed
        .iter()
        .find(|p| p.pid == outsider.id())
        .unwrap_or_else(|| panic!("the outsider is not listed as unprotected: {listed:?}"));
    assert!(
        entry
            .missing
            .iter()
            .any(|m| m == "shares the host's mount namespace"),
        "{entry:?}"
    );
}
