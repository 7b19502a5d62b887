//! Running external commands: each is printed before it runs, and a failure names the command.
//!
//! xtask itself runs under `cargo run`, which sets variables describing the xtask package; the
//! nested cargo commands must not inherit those, and the eBPF build must not inherit anything that
//! configures the host build.

use std::ffi::{OsStr, OsString};
use std::io::{BufRead, BufReader, Read, Write};
use std::path::Path;
use std::process::{Command, Stdio};

use anyhow::{Context, Result, bail};

use crate::paths;

/// Variables `cargo run` sets for the xtask binary itself.
fn is_set_by_cargo_run(name: &str) -> bool {
    matches!(
        name,
        "CARGO"
            | "CARGO_MANIFEST_DIR"
            | "CARGO_MANIFEST_PATH"
            | "CARGO_PRIMARY_PACKAGE"
            | "CARGO_CRATE_NAME"
            | "CARGO_BIN_NAME"
    ) || name.starts_with("CARGO_PKG_")
}

/// Variables that configure how cargo compiles (flags, wrappers, targets, profiles). They are meant
/// for the host build; the eBPF build sets its own.
fn configures_a_build(name: &str) -> bool {
    let cargo_settings_kept = [
        "CARGO_HOME",
        "CARGO_TERM_",
        "CARGO_NET_",
        "CARGO_HTTP_",
        "CARGO_REGISTR",
    ];
    let is_cargo_setting = name.starts_with("CARGO")
        && !cargo_settings_kept
            .iter()
            .any(|kept| name.starts_with(kept));
    is_cargo_setting
        || matches!(
            name,
            "RUSTC" | "RUSTC_WRAPPER" | "RUSTC_WORKSPACE_WRAPPER" | "RUSTFLAGS" | "RUSTDOCFLAGS"
        )
}

/// Removes from `cmd`'s environment every inherited variable `unwanted` picks.
pub fn remove_inherited_env(cmd: &mut Command, unwanted: impl Fn(&str) -> bool) {
    for (name, _) in std::env::vars_os() {
        if name.to_str().is_some_and(&unwanted) {
            cmd.env_remove(name);
        }
    }
}

/// `PATH` with the bpf-linker tools directory in front.
fn path_with_tools() -> Result<OsString> {
    let inherited = std::env::var_os("PATH").unwrap_or_default();
    let dirs = std::iter::once(paths::tools_bin_dir()).chain(std::env::split_paths(&inherited));
    std::env::join_paths(dirs).context("building PATH with the bpf-linker tools directory")
}

/// A program run without the variables `cargo run` set for xtask.
pub fn without_cargo_run_env(program: impl AsRef<OsStr>) -> Command {
    let mut cmd = Command::new(program);
    remove_inherited_env(&mut cmd, is_set_by_cargo_run);
    cmd
}

/// A program run from the workspace root with bpf-linker on `PATH` and without the variables
/// `cargo run` set for xtask.
pub fn in_workspace(program: impl AsRef<OsStr>) -> Result<Command> {
    let mut cmd = without_cargo_run_env(program);
    cmd.current_dir(paths::root())
        .env("PATH", path_with_tools()?);
    Ok(cmd)
}

/// `cargo` for the host workspace: builds into the workspace's `target/` and points brokerd's
/// build script at the eBPF object.
pub fn workspace_cargo() -> Result<Command> {
    let mut cmd = in_workspace("cargo")?;
    cmd.env("CARGO_TARGET_DIR", paths::target_dir())
        .env("AGENT_BROKER_EBPF_OBJ", paths::ebpf_object());
    Ok(cmd)
}

/// `cargo +nightly` in the eBPF programs crate, with none of the host build's settings.
pub fn ebpf_cargo() -> Result<Command> {
    let mut cmd = in_workspace("cargo")?;
    remove_inherited_env(&mut cmd, configures_a_build);
    cmd.current_dir(paths::ebpf_crate_dir()).arg("+nightly");
    Ok(cmd)
}

/// Runs `cmd` with inherited stdio; fails unless it exits successfully.
pub fn run(cmd: &mut Command) -> Result<()> {
    let shown = echo(cmd);
    let status = cmd
        .status()
        .with_context(|| format!("starting `{shown}`"))?;
    if !status.success() {
        bail!("`{shown}` failed ({status})");
    }
    Ok(())
}

/// Runs `cmd` and returns its stdout; fails unless it exits successfully.
pub fn stdout_of(cmd: &mut Command) -> Result<String> {
    let shown = echo(cmd);
    let output = cmd
        .stderr(Stdio::inherit())
        .output()
        .with_context(|| format!("starting `{shown}`"))?;
    if !output.status.success() {
        bail!("`{shown}` failed ({})", output.status);
    }
    String::from_utf8(output.stdout).with_context(|| format!("`{shown}` printed non-UTF-8 output"))
}

/// Runs `cmd`, copying its stdout to ours as it comes and also returning it, lossily decoded.
/// Fails only if the command could not run; the caller judges the exit status.
pub fn run_and_capture_stdout(cmd: &mut Command) -> Result<(std::process::ExitStatus, String)> {
    let shown = echo(cmd);
    let mut child = cmd
        .stdout(Stdio::piped())
        .spawn()
        .with_context(|| format!("starting `{shown}`"))?;
    let pipe = child.stdout.take().context("child stdout was not piped")?;
    let copied = copy_and_capture(pipe);
    // Wait even if reading failed, so the child is not left behind.
    let status = child
        .wait()
        .with_context(|| format!("waiting for `{shown}`"))?;
    let captured = copied.with_context(|| format!("reading the output of `{shown}`"))?;
    Ok((status, captured))
}

/// Copies `pipe` to our stdout line by line and returns what it read, lossily decoded.
fn copy_and_capture(pipe: impl Read) -> std::io::Result<String> {
    let mut captured = String::new();
    let mut reader = BufReader::new(pipe);
    let mut line = Vec::new();
    let mut terminal = std::io::stdout();
    while reader.read_until(b'\n', &mut line)? > 0 {
        // Losing the terminal copy is no reason to stop the tests; the captured copy still counts.
        let _ = terminal.write_all(&line).and_then(|()| terminal.flush());
        captured.push_str(&String::from_utf8_lossy(&line));
        line.clear();
    }
    Ok(captured)
}

/// Values [`echo`] never shows (a bench's generated key passed to a client): see [`hide`].
static HIDDEN: std::sync::Mutex<Vec<String>> = std::sync::Mutex::new(Vec::new());

/// Makes [`echo`] show `value` as `<hidden>` wherever it appears in a command line, so a secret
/// handed to a program as an argument or variable is never printed.
pub fn hide(value: &str) {
    if value.is_empty() {
        return;
    }
    if let Ok(mut hidden) = HIDDEN.lock() {
        hidden.push(value.to_owned());
    }
}

/// `line` with every hidden value replaced.
fn masked(mut line: String) -> String {
    if let Ok(hidden) = HIDDEN.lock() {
        for value in hidden.iter() {
            line = line.replace(value.as_str(), "<hidden>");
        }
    }
    line
}

/// Prints `cmd` as a shell line (directory, variables it sets, program and arguments) and returns
/// it for error messages. `PATH` is left out: it is always the inherited one with
/// `target/ebpf-tools/bin` in front. Values given to [`hide`] show as `<hidden>`.
pub fn echo(cmd: &Command) -> String {
    let mut words = Vec::new();
    if let Some(dir) = cmd.get_current_dir().filter(|dir| *dir != paths::root()) {
        let dir = dir.strip_prefix(paths::root()).unwrap_or(dir);
        words.push(format!("cd {} &&", quote(dir.as_os_str())));
    }
    for (name, value) in cmd.get_envs() {
        if let Some(value) = value.filter(|_| name != "PATH") {
            words.push(format!("{}={}", name.to_string_lossy(), quote(value)));
        }
    }
    words.push(quote(cmd.get_program()));
    words.extend(cmd.get_args().map(quote));
    let shown = masked(words.join(" "));
    eprintln!("+ {shown}");
    shown
}

/// Quotes a word the way bash would need it, unless it is plainly safe: `'...'`, or `$'...'` when
/// it holds control characters (such as the `\x1f` separators of `CARGO_ENCODED_RUSTFLAGS`).
fn quote(word: &OsStr) -> String {
    let word = word.to_string_lossy();
    let plain = |c: char| c.is_ascii_alphanumeric() || "-_./=:+,@%".contains(c);
    if !word.is_empty() && word.chars().all(plain) {
        return word.into_owned();
    }
    if !word.chars().any(char::is_control) {
        return format!("'{}'", word.replace('\'', r"'\''"));
    }
    let mut quoted = String::from("$'");
    for c in word.chars() {
        match c {
            '\\' => quoted.push_str(r"\\"),
            '\'' => quoted.push_str(r"\'"),
            '\t' => quoted.push_str(r"\t"),
            '\n' => quoted.push_str(r"\n"),
            c if c.is_control() => quoted.push_str(&format!("\\x{:02x}", u32::from(c))),
            c => quoted.push(c),
        }
    }
    quoted.push('\'');
    quoted
}

/// Shows a path relative to the workspace root when it is inside it.
pub fn relative(path: &Path) -> String {
    path.strip_prefix(paths::root())
        .unwrap_or(path)
        .display()
        .to_string()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keeps_cargo_settings_that_are_not_about_compiling() {
        assert!(!configures_a_build("CARGO_HOME"));
        assert!(!configures_a_build("CARGO_TERM_COLOR"));
        assert!(!configures_a_build("CARGO_NET_OFFLINE"));
        assert!(!configures_a_build("CARGO_REGISTRIES_CRATES_IO_PROTOCOL"));
        assert!(!configures_a_build("RUSTUP_HOME"));
    }

    #[test]
    fn drops_settings_meant_for_the_host_build() {
        for name in [
            "CARGO",
            "CARGO_TARGET_DIR",
            "CARGO_BUILD_TARGET",
            "CARGO_ENCODED_RUSTFLAGS",
            "CARGO_PROFILE_RELEASE_DEBUG",
            "RUSTC",
            "RUSTC_WORKSPACE_WRAPPER",
            "RUSTFLAGS",
        ] {
            assert!(configures_a_build(name), "{name}");
        }
    }

    #[test]
    fn quotes_only_words_that_need_it() {
        assert_eq!(quote(OsStr::new("--target-dir")), "--target-dir");
        assert_eq!(quote(OsStr::new("a b")), "'a b'");
        assert_eq!(quote(OsStr::new("it's")), r"'it'\''s'");
        assert_eq!(quote(OsStr::new("a\u{1f}b\t'c\\")), r"$'a\x1fb\t\'c\\'");
    }
}

#[cfg(test)]
mod echo_tests {
    use super::*;

    #[test]
    fn hidden_values_never_show_in_an_echoed_command() {
        let value = "0123abcd-echo-test-value";
        hide(value);
        let mut cmd = Command::new("python3");
        cmd.arg(format!("Bearer {value}")).env("KEY", value);
        let shown = echo(&cmd);
        assert!(!shown.contains(value), "{shown}");
        assert!(shown.contains("'Bearer <hidden>'"), "{shown}");
        assert!(shown.contains("KEY=<hidden>"), "{shown}");
    }
}
