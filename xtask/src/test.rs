//! `cargo xtask test`: everything CI checks, in order, on a build that is known to be current:
//! formatting, clippy, unit and component tests, then the privileged end-to-end tests, then a
//! 5-minute soak (see [`crate::soak`]).
//!
//! Every step runs even when an earlier one failed, so one run reports every problem. The run
//! fails if any step failed, if any test was ignored, or if no privileged test passed: a test
//! that cannot run must fail, not pass silently.

use std::fmt;
use std::ops::AddAssign;
use std::process::Command;

use anyhow::{Result, bail};

use crate::build::{self, Profile};
use crate::{cmd, paths, running_as_root, soak};

/// The crate holding the privileged end-to-end tests.
const END_TO_END_PACKAGE: &str = "agent-broker-tests";

const NEEDS_ROOT: &str = "the privileged end-to-end tests need root (they load eBPF programs and \
                          attach them to cgroups); as another user they fail";

pub fn test() -> Result<()> {
    let as_root = running_as_root();
    if !as_root {
        eprintln!("warning: not running as root: {NEEDS_ROOT}");
    }
    let profile = Profile::Debug;
    build::build(profile)?;

    let mut problems = Vec::new();
    let mut check = |name: &str, mut command: Command| {
        if let Err(err) = cmd::run(&mut command) {
            eprintln!("error: {name}: {err:#}");
            problems.push(format!("{name} failed"));
        }
    };
    check("rustfmt (workspace)", cargo("fmt --all --check")?);
    check("rustfmt (eBPF programs)", ebpf_cargo("fmt --check")?);
    check(
        "clippy",
        cargo("clippy --workspace --all-targets -- -D warnings")?,
    );
    if let Err(err) = check_walls() {
        eprintln!("error: dependency walls: {err:#}");
        problems.push("dependency walls failed".to_owned());
    }

    // --no-fail-fast: one failing test binary must not hide the results of the others.
    // The workspace includes fuzz/targets, whose tests replay every fuzz corpus and crasher.
    let unit = run_tests(
        "unit and component tests",
        cargo(&format!(
            "test --no-fail-fast --workspace --exclude {END_TO_END_PACKAGE}"
        ))?,
        &mut problems,
    );
    let mut end_to_end_command = cargo(&format!(
        "test --no-fail-fast --package {END_TO_END_PACKAGE} -- --test-threads=1"
    ))?;
    end_to_end_command.env(
        "AGENT_BROKER_BIN_DIR",
        paths::target_dir().join(profile.dir_name()),
    );
    let battery_out = paths::target_dir().join("battery");
    let _ = std::fs::remove_dir_all(&battery_out);
    end_to_end_command
        .env(
            "AGENT_BROKER_STATIC_CLIENT",
            paths::static_bin("agent-client"),
        )
        .env(
            "AGENT_BROKER_ATTACK_BATTERY",
            paths::static_bin("attack-battery"),
        )
        .env("AGENT_BROKER_BATTERY_OUT", &battery_out);
    let end_to_end = run_tests(
        "privileged end-to-end tests",
        end_to_end_command,
        &mut problems,
    );
    print_battery_tables(&battery_out);

    // The 5-minute soak (about 5.2 minutes with its start and cleanup): mixed load against a
    // real brokerd, failing on a gauge that drifts upward (a leak) or on failed operations.
    // Without root it fails and says why, like the end-to-end tests.
    if let Err(err) = soak::run(&soak::Options {
        minutes: soak::CI_MINUTES,
        out: None,
    }) {
        eprintln!("error: soak: {err:#}");
        problems.push(format!("the {}-minute soak failed", soak::CI_MINUTES));
    }

    let total = unit + end_to_end;
    println!(
        "tests: {total} (unit/component {}, privileged end-to-end {})",
        unit.passed, end_to_end.passed
    );
    if total.ignored > 0 {
        problems.push(format!(
            "{} tests were ignored; every test must run",
            total.ignored
        ));
    }
    if end_to_end.passed == 0 {
        problems.push("no privileged end-to-end test passed".to_owned());
    }
    if problems.is_empty() {
        return Ok(());
    }
    if !as_root {
        problems.push(format!("not running as root: {NEEDS_ROOT}"));
    }
    bail!("{}", problems.join("; "))
}

/// Prints the attack battery's tables the bypass tests left (one per privilege tier).
fn print_battery_tables(dir: &std::path::Path) {
    let Ok(entries) = std::fs::read_dir(dir) else {
        println!("attack battery: no table was written (the bypass tests did not run)");
        return;
    };
    let mut files: Vec<_> = entries.flatten().map(|e| e.path()).collect();
    files.sort();
    for file in files {
        if let Ok(text) = std::fs::read_to_string(&file) {
            println!("\n{text}");
        }
    }
}

/// The host workspace's cargo with `args` (whitespace-separated).
fn cargo(args: &str) -> Result<Command> {
    let mut cargo = cmd::workspace_cargo()?;
    cargo.args(args.split_whitespace());
    Ok(cargo)
}

/// Which crates each package must never link (ARCHITECTURE.md's layout): the pure core builds
/// anywhere, the console and brokerctl talk to brokerd only through the protocol, and brokerd
/// carries none of the CLI's sandboxing or the console's UI.
const WALLS: &[(&str, &[&str])] = &[
    (
        "agent-broker-core",
        &["aya", "redb", "rustls", "tokio", "hyper"],
    ),
    (
        "agent-broker-protocol",
        &["aya", "redb", "rustls", "tokio", "hyper"],
    ),
    (
        "agent-broker-console",
        &["aya", "redb", "rustls", "tokio", "hyper"],
    ),
    ("agent-broker-ctl", &["aya", "redb", "rustls", "hyper"]),
    ("agent-broker", &["ratatui", "landlock", "seccompiler"]),
];

/// Checks [`WALLS`] against `cargo tree`: a forbidden crate anywhere in a package's normal
/// dependencies is an error naming the package and the crate.
fn check_walls() -> Result<()> {
    let mut breaches = Vec::new();
    for (package, forbidden) in WALLS {
        let mut tree = cargo(&format!(
            "tree --package {package} --edges normal --prefix none --format {{p}}"
        ))?;
        let output = tree.output()?;
        if !output.status.success() {
            bail!(
                "`cargo tree --package {package}` failed: {}",
                String::from_utf8_lossy(&output.stderr)
            );
        }
        let listed = String::from_utf8_lossy(&output.stdout);
        for name in *forbidden {
            if listed
                .lines()
                .any(|line| line.split_whitespace().next() == Some(name))
            {
                breaches.push(format!("{package} links {name}"));
            }
        }
    }
    if breaches.is_empty() {
        println!("dependency walls: hold ({} packages)", WALLS.len());
        return Ok(());
    }
    bail!("{}", breaches.join("; "))
}

/// The eBPF programs' cargo with `args` (whitespace-separated).
fn ebpf_cargo(args: &str) -> Result<Command> {
    let mut cargo = cmd::ebpf_cargo()?;
    cargo.args(args.split_whitespace());
    Ok(cargo)
}

/// Runs a `cargo test` command, streaming its output, and returns the counts its test binaries
/// reported. A failure to run or a non-zero exit is recorded in `problems`.
fn run_tests(name: &str, mut command: Command, problems: &mut Vec<String>) -> Counts {
    match cmd::run_and_capture_stdout(&mut command) {
        Ok((status, output)) => {
            if !status.success() {
                problems.push(format!("{name} failed ({status})"));
            }
            Counts::sum_of_libtest_results(&output)
        }
        Err(err) => {
            eprintln!("error: {name}: {err:#}");
            problems.push(format!("{name} could not run"));
            Counts::default()
        }
    }
}

/// Test counts as libtest reports them.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
struct Counts {
    passed: u64,
    failed: u64,
    ignored: u64,
}

impl Counts {
    /// Sums every `test result: ok. 3 passed; 0 failed; 1 ignored; ...` line in `output` (one per
    /// test binary and one per crate's doctests).
    fn sum_of_libtest_results(output: &str) -> Self {
        output
            .lines()
            .filter_map(Self::from_libtest_result)
            .fold(Self::default(), |sum, counts| sum + counts)
    }

    fn from_libtest_result(line: &str) -> Option<Self> {
        let (_, result) = line.split_once("test result: ")?;
        // After the verdict ("ok." or "FAILED.") come `; `-separated "<count> <what>" items.
        let (_, items) = result.split_once(". ")?;
        let mut counts = Self::default();
        for item in items.split(';') {
            let Some((count, what)) = item.trim().split_once(' ') else {
                continue;
            };
            let Ok(count) = count.parse() else {
                continue;
            };
            match what {
                "passed" => counts.passed = count,
                "failed" => counts.failed = count,
                "ignored" => counts.ignored = count,
                _ => {}
            }
        }
        Some(counts)
    }
}

impl std::ops::Add for Counts {
    type Output = Self;

    fn add(mut self, other: Self) -> Self {
        self += other;
        self
    }
}

impl AddAssign for Counts {
    fn add_assign(&mut self, other: Self) {
        self.passed += other.passed;
        self.failed += other.failed;
        self.ignored += other.ignored;
    }
}

impl fmt::Display for Counts {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "{} passed, {} failed, {} ignored",
            self.passed, self.failed, self.ignored
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sums_libtest_result_lines() {
        let output = "\
running 2 tests
test a ... ok
test b ... ok

test result: ok. 2 passed; 0 failed; 0 ignored; 0 measured; 0 filtered out; finished in 0.01s

test result: FAILED. 3 passed; 1 failed; 2 ignored; 0 measured; 0 filtered out; finished in 1.20s
test result: ok. 0 passed; 0 failed; 0 ignored; 0 measured; 0 filtered out; finished in 0.00s
";
        assert_eq!(
            Counts::sum_of_libtest_results(output),
            Counts {
                passed: 5,
                failed: 1,
                ignored: 2
            }
        );
    }

    #[test]
    fn ignores_lines_that_are_not_results() {
        assert_eq!(Counts::from_libtest_result("test a ... ok"), None);
        assert_eq!(
            Counts::sum_of_libtest_results("running 0 tests\n"),
            Counts::default()
        );
    }

    #[test]
    fn shows_the_summary_format() {
        let counts = Counts {
            passed: 42,
            failed: 0,
            ignored: 0,
        };
        assert_eq!(counts.to_string(), "42 passed, 0 failed, 0 ignored");
    }
}
