//! `cargo xtask fuzz`: runs the cargo-fuzz targets (`fuzz/fuzz_targets/*.rs`, libFuzzer, nightly)
//! for a few minutes each, keeps what they find, and prints per target its executions and
//! crashes.
//!
//! Each run starts from the target's committed seeds (`fuzz/corpus/NAME/`, read only) and a
//! working corpus under `target/fuzz/corpus/NAME/` that grows across runs, so the committed
//! corpus stays small. A crashing input is copied to `fuzz/regressions/NAME/`, which
//! `cargo xtask test` replays on stable (fuzz/targets/tests/replay.rs): it fails until the bug is
//! fixed, and then keeps it fixed.

use std::fs;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

use anyhow::{Context, Result, bail};

use crate::{cmd, paths};

/// Minutes per target when `--minutes` is not given.
pub const DEFAULT_MINUTES: u64 = 1;

fn fuzz_dir() -> PathBuf {
    paths::root().join("fuzz")
}

fn work_dir() -> PathBuf {
    paths::target_dir().join("fuzz")
}

/// The targets: the names of `fuzz/fuzz_targets/*.rs`, sorted.
pub fn targets() -> Result<Vec<String>> {
    let dir = fuzz_dir().join("fuzz_targets");
    let mut names = Vec::new();
    for entry in fs::read_dir(&dir).with_context(|| format!("reading {}", dir.display()))? {
        let path = entry?.path();
        if path.extension().is_some_and(|e| e == "rs")
            && let Some(stem) = path.file_stem().and_then(|s| s.to_str())
        {
            names.push(stem.to_string());
        }
    }
    names.sort();
    Ok(names)
}

/// `cargo +nightly` in `fuzz/`, with none of the host build's settings (cargo-fuzz sets its own
/// flags). It builds into cargo-fuzz's own `fuzz/target/` (ignored by git): the instrumented
/// build shares nothing with the host one.
fn fuzz_cargo() -> Result<Command> {
    let mut cmd = cmd::ebpf_cargo()?;
    cmd.current_dir(fuzz_dir());
    Ok(cmd)
}

/// Installs cargo-fuzz unless it runs already.
fn ensure_cargo_fuzz() -> Result<()> {
    let found = cmd::without_cargo_run_env("cargo")
        .args(["fuzz", "--version"])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .is_ok_and(|s| s.success());
    if !found {
        cmd::run(cmd::without_cargo_run_env("cargo").args(["install", "cargo-fuzz", "--locked"]))
            .context("installing cargo-fuzz")?;
    }
    Ok(())
}

/// What one target's run found.
struct Outcome {
    name: String,
    executions: Option<u64>,
    crashes: Vec<PathBuf>,
}

pub fn fuzz(minutes: u64, only: Option<String>) -> Result<()> {
    let all = targets()?;
    let selected: Vec<String> = match only {
        Some(name) if all.contains(&name) => vec![name],
        Some(name) => bail!("no fuzz target {name}; the targets are {}", all.join(", ")),
        None => all,
    };
    ensure_cargo_fuzz()?;
    cmd::run(fuzz_cargo()?.args(["fuzz", "build"])).context("building the fuzz targets")?;
    let seconds = (minutes * 60).max(1);
    let mut outcomes = Vec::new();
    for name in &selected {
        outcomes.push(run_target(name, seconds)?);
    }
    eprintln!();
    eprintln!("{:<14} {:>14} {:>8}", "target", "executions", "crashes");
    for o in &outcomes {
        let executions = o
            .executions
            .map_or_else(|| "?".to_string(), |n| n.to_string());
        eprintln!("{:<14} {:>14} {:>8}", o.name, executions, o.crashes.len());
    }
    let crashes: Vec<&PathBuf> = outcomes.iter().flat_map(|o| &o.crashes).collect();
    if !crashes.is_empty() {
        let list: Vec<String> = crashes.iter().map(|p| cmd::relative(p)).collect();
        bail!(
            "the fuzzers found {} crashing input(s), kept for `cargo xtask test` to replay: {}",
            crashes.len(),
            list.join(", ")
        );
    }
    Ok(())
}

fn run_target(name: &str, seconds: u64) -> Result<Outcome> {
    let work = work_dir();
    let corpus = work.join("corpus").join(name);
    let artifacts = work.join("artifacts").join(name);
    let logs = work.join("logs");
    for dir in [&corpus, &artifacts, &logs] {
        fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    }
    let seeds = fuzz_dir().join("corpus").join(name);
    let log_path = logs.join(format!("{name}.log"));
    let log =
        fs::File::create(&log_path).with_context(|| format!("creating {}", log_path.display()))?;
    let mut artifact_prefix = artifacts.clone().into_os_string();
    artifact_prefix.push("/");
    let mut run = fuzz_cargo()?;
    run.args(["fuzz", "run", name])
        .arg(&corpus)
        .arg(&seeds)
        .arg("--")
        .arg(format!("-max_total_time={seconds}"))
        .arg("-timeout=10")
        .arg("-rss_limit_mb=2048")
        .arg("-print_final_stats=1")
        .arg({
            let mut a = std::ffi::OsString::from("-artifact_prefix=");
            a.push(&artifact_prefix);
            a
        })
        .stdout(log.try_clone()?)
        .stderr(log);
    eprintln!(
        "fuzz: {name} for {seconds}s (log: {})",
        cmd::relative(&log_path)
    );
    // A crash makes libFuzzer exit non-zero: that is an outcome, not an error of this command.
    let status = run
        .status()
        .with_context(|| format!("running the fuzz target {name}"))?;
    let text = fs::read_to_string(&log_path).unwrap_or_default();
    let executions = text
        .lines()
        .filter_map(|l| l.strip_prefix("stat::number_of_executed_units:"))
        .filter_map(|n| n.trim().parse().ok())
        .next_back();
    let crashes = keep_crashes(name, &artifacts)?;
    if !status.success() && crashes.is_empty() {
        bail!(
            "the fuzz target {name} failed ({status}) without a crashing input; see {}",
            cmd::relative(&log_path)
        );
    }
    Ok(Outcome {
        name: name.to_string(),
        executions,
        crashes,
    })
}

/// Moves libFuzzer's findings (crash-, leak-, timeout-, oom- files) to `fuzz/regressions/NAME/`.
fn keep_crashes(name: &str, artifacts: &Path) -> Result<Vec<PathBuf>> {
    let kept_dir = fuzz_dir().join("regressions").join(name);
    let mut kept = Vec::new();
    for entry in fs::read_dir(artifacts)? {
        let path = entry?.path();
        let Some(file) = path.file_name().and_then(|f| f.to_str()) else {
            continue;
        };
        if ["crash-", "leak-", "timeout-", "oom-"]
            .iter()
            .any(|p| file.starts_with(p))
        {
            fs::create_dir_all(&kept_dir)?;
            let to = kept_dir.join(file);
            fs::copy(&path, &to).with_context(|| format!("keeping {}", path.display()))?;
            fs::remove_file(&path)?;
            kept.push(to);
        }
    }
    Ok(kept)
}
