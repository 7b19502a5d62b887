//! `cargo xtask soak --minutes N`: mixed load against a real brokerd for N minutes, failing on
//! drift (issue 17, part 5).
//!
//! It starts a lab on loopback ([`lab`]: the test API, a DNS responder, brokerd from the debug
//! build), runs the load of [`load`] (h1 and h2 keep-alive, new connections, SSE, WebSockets,
//! denials, a rate limit, policy reloads, key rotations, short-lived agents in cgroups of their
//! own looking names up through brokerd's DNS), and samples brokerd's runtime gauges
//! ([`sample::GAUGES`]: resident memory, open descriptors, tasks, upstream pool, leaf cache,
//! answered-names table, audit queue, agent connections) every few seconds. It writes
//! `soak.csv`, `summary.json` and `soak.svg` ([`plot`]) into its output directory
//! (`target/soak` unless `--out`), then fails when a gauge drifts ([`drift`]: a steady rise after
//! warm-up, never a level), when more than [`MAX_FAILED`] of a kind's operations failed, or when a
//! kind of load never did what it is there for. It never connects anywhere but loopback.
//!
//! `cargo xtask test` runs a 5-minute soak ([`CI_MINUTES`]) after the end-to-end tests.

mod drift;
mod lab;
mod load;
mod plot;
mod sample;

use std::{
    fs,
    io::Write as _,
    path::{Path, PathBuf},
    sync::atomic::Ordering,
    thread,
    time::{Duration, Instant, SystemTime, UNIX_EPOCH},
};

use anyhow::{Context as _, Result, bail};
use serde_json::json;

use crate::{
    bench,
    build::{self, Profile},
    cmd, paths, running_as_root,
};

/// The soak `cargo xtask test` runs, in minutes.
pub const CI_MINUTES: u64 = 5;
/// The most operations of one kind that may fail, as a fraction (a busy machine may time out
/// one now and then; more is a fault).
const MAX_FAILED: f64 = 0.02;
/// The shortest warm-up: a debug brokerd's heap grows in steps for about two minutes, and its
/// pool holds a departed agent's connections for up to two (90 s idle, swept every 30 s).
const MIN_WARM_UP: Duration = Duration::from_secs(150);

/// How `cargo xtask soak` was asked to run.
pub struct Options {
    pub minutes: u64,
    /// Where the CSV, summary and plot go (default `target/soak`).
    pub out: Option<PathBuf>,
}

impl Options {
    /// The time left out of the drift rule: a quarter of the run, at least [`MIN_WARM_UP`]
    /// but never more than half.
    fn warm_up(&self) -> Duration {
        let run = Duration::from_secs(self.minutes * 60);
        (run / 4).max(MIN_WARM_UP.min(run / 2))
    }

    /// Every 2 s in short runs (enough samples per third), every 5 s in longer ones.
    fn interval(&self) -> Duration {
        if self.minutes <= 10 {
            Duration::from_secs(2)
        } else {
            Duration::from_secs(5)
        }
    }
}

/// `cargo xtask soak`: builds, then runs the soak.
pub fn soak(options: &Options) -> Result<()> {
    check_can_run(options)?;
    build::build(Profile::Debug)?;
    run(options)
}

/// Fails, saying why, when the soak cannot run here.
fn check_can_run(options: &Options) -> Result<()> {
    if !running_as_root() {
        bail!(
            "the soak starts brokerd and tags agent cgroups, which need root: run it as root \
             (it cannot run as uid {})",
            nix::unistd::geteuid()
        );
    }
    if !(1..=24 * 60).contains(&options.minutes) {
        bail!("--minutes must be between 1 and 1440");
    }
    Ok(())
}

/// Runs the soak on the binaries already built in `target/debug`.
pub fn run(options: &Options) -> Result<()> {
    check_can_run(options)?;
    let bin = paths::target_dir().join("debug");
    let programs = load::Programs {
        curl: find_program("curl")?,
        python3: find_program("python3")?,
        agent_client: paths::static_bin("agent-client"),
    };
    for needed in [
        bin.join("brokerd"),
        bin.join("brokerctl"),
        bin.join("test-api"),
        programs.agent_client.clone(),
    ] {
        if !needed.is_file() {
            bail!(
                "{} is missing: run `cargo xtask build` first",
                needed.display()
            );
        }
    }
    bench::catch_signals()?;
    bench::raise_open_files_limit();
    let out = options
        .out
        .clone()
        .unwrap_or_else(|| paths::target_dir().join("soak"));
    fs::create_dir_all(&out).with_context(|| format!("creating {}", out.display()))?;
    let run_dir = out.join("run");
    if run_dir.exists() {
        fs::remove_dir_all(&run_dir)
            .with_context(|| format!("removing the old {}", run_dir.display()))?;
    }
    lab::private_dir(&run_dir)?;

    let started_at = SystemTime::now();
    let mut lab = lab::Lab::new(&run_dir, &bin)?;
    let result = lab
        .start()
        .and_then(|()| soak_with(&lab, &programs, options, &out));
    lab.stop();
    match result {
        Ok(verdict) => {
            let elapsed = started_at.elapsed().unwrap_or_default();
            println!(
                "soak: wrote {}, summary.json and soak.svg ({} s)",
                cmd::relative(&out.join("soak.csv")),
                elapsed.as_secs()
            );
            if verdict.is_empty() {
                let _ = fs::remove_dir_all(&run_dir);
                Ok(())
            } else {
                eprintln!("soak: logs kept in {}", cmd::relative(&run_dir));
                bail!("the soak failed:\n  {}", verdict.join("\n  "))
            }
        }
        Err(e) => {
            eprintln!("soak: logs kept in {}", cmd::relative(&run_dir));
            Err(e)
        }
    }
}

/// Runs the load and the sampler, writes the outputs, and returns the problems found.
fn soak_with(
    lab: &lab::Lab,
    programs: &load::Programs,
    options: &Options,
    out: &Path,
) -> Result<Vec<String>> {
    let duration = Duration::from_secs(options.minutes * 60);
    let warm_up = options.warm_up();
    let interval = options.interval();
    let csv_path = out.join("soak.csv");
    let mut csv =
        fs::File::create(&csv_path).with_context(|| format!("creating {}", csv_path.display()))?;
    writeln!(csv, "{}", sample::csv_header())?;
    eprintln!(
        "soak: {} minutes of load, sampled every {} s, warm-up {} s; brokerd pid {}",
        options.minutes,
        interval.as_secs(),
        warm_up.as_secs(),
        lab.brokerd_pid().unwrap_or(0)
    );
    // What was built and runs, before anyone can commit meanwhile.
    let commit = bench::commit();
    let start = Instant::now();
    let until = start + duration;
    let mut samples = Vec::new();
    let load = load::Load::new(lab, programs, until);
    let sampled = thread::scope(|scope| -> Result<()> {
        let runner = scope.spawn(|| load.run());
        let sampling = sample_until(lab, &load, start, until, interval, &mut samples, &mut csv);
        // The load stops by itself at `until`; after an error it must stop now.
        if sampling.is_err() {
            interrupt();
        }
        let _ = runner.join();
        sampling
    });
    sampled?;
    let (mut document, problems) = summarize(&load, &samples, warm_up, options, lab);
    document["commit"] = json!(commit);
    let path = out.join("summary.json");
    fs::write(&path, serde_json::to_string_pretty(&document)?)
        .with_context(|| format!("writing {}", path.display()))?;
    let title = format!(
        "agent-broker soak: {} min, debug brokerd, commit {}",
        options.minutes, commit
    );
    plot::draw(
        &out.join("soak.svg"),
        &samples,
        warm_up.as_secs_f64(),
        &title,
    )?;
    Ok(problems)
}

/// Asks the load to stop at once (the soak's own error, not the user's Ctrl-C).
fn interrupt() {
    // SAFETY: raising a signal this process handles (bench::catch_signals) is sound.
    let _ = nix::sys::signal::raise(nix::sys::signal::Signal::SIGTERM);
}

/// Samples brokerd every `interval` until `until`, writing each row as it comes.
fn sample_until(
    lab: &lab::Lab,
    load: &load::Load<'_>,
    start: Instant,
    until: Instant,
    interval: Duration,
    samples: &mut Vec<sample::Sample>,
    csv: &mut fs::File,
) -> Result<()> {
    let mut next = start;
    let mut printed = start;
    while Instant::now() < until {
        if bench::stopping() {
            bail!("interrupted");
        }
        lab.check_running()?;
        let text = lab.metrics()?;
        let gauges = sample::gauges_from(&text)?;
        let (operations, failures) = load.totals();
        let row = sample::Sample {
            seconds: start.elapsed().as_secs_f64(),
            gauges,
            operations,
            failures,
        };
        writeln!(csv, "{}", sample::csv_line(&row))?;
        if printed.elapsed() >= Duration::from_secs(30) {
            printed = Instant::now();
            eprintln!(
                "soak: {:>5.0} s  rss {:.0} MiB  fds {}  tasks {}  pool {}  leaves {}  names {}  \
                 queue {}  operations {operations} ({failures} failed)",
                row.seconds,
                row.gauges[0],
                row.gauges[1],
                row.gauges[2],
                row.gauges[3],
                row.gauges[4],
                row.gauges[5],
                row.gauges[6],
            );
        }
        samples.push(row);
        next += interval;
        while Instant::now() < next.min(until) {
            if bench::stopping() {
                bail!("interrupted");
            }
            thread::sleep(Duration::from_millis(100));
        }
    }
    Ok(())
}

/// The summary document and the problems that fail the run.
fn summarize(
    load: &load::Load<'_>,
    samples: &[sample::Sample],
    warm_up: Duration,
    options: &Options,
    lab: &lab::Lab,
) -> (serde_json::Value, Vec<String>) {
    let mut problems = Vec::new();
    let times: Vec<f64> = samples.iter().map(|s| s.seconds).collect();
    let mut gauges = serde_json::Map::new();
    for (index, gauge) in sample::GAUGES.iter().enumerate() {
        let values: Vec<f64> = samples.iter().map(|s| s.gauges[index]).collect();
        let entry = match drift::judge(&times, &values, warm_up.as_secs_f64(), gauge.allowance) {
            Ok(verdict) => {
                eprintln!("soak: {:<16} {verdict}", gauge.column);
                if verdict.drifting {
                    problems.push(format!("{} drifts upward: {verdict}", gauge.column));
                }
                json!({
                    "what": gauge.what,
                    "first": values.first(),
                    "max": values.iter().copied().fold(f64::MIN, f64::max),
                    "last": values.last(),
                    "second_third_median": verdict.second_third_median,
                    "last_third_median": verdict.last_third_median,
                    "slope_per_hour": verdict.slope_per_hour,
                    "allowed_rise": verdict.allowed,
                    "drifting": verdict.drifting,
                })
            }
            Err(e) => {
                problems.push(format!("{}: {e}", gauge.column));
                json!({ "error": e.to_string() })
            }
        };
        gauges.insert(gauge.column.to_owned(), entry);
    }
    let mut kinds = serde_json::Map::new();
    for (kind, tally) in load::KINDS.iter().zip(&load.tallies) {
        let ok = tally.ok.load(Ordering::Relaxed);
        let failed = tally.failed.load(Ordering::Relaxed);
        let noted = tally.noted.load(Ordering::Relaxed);
        let errors = tally.errors.lock().map(|e| e.clone()).unwrap_or_default();
        if ok == 0 {
            problems.push(format!("{kind}: no operation succeeded ({failed} failed)"));
        } else if failed as f64 > MAX_FAILED * (ok + failed) as f64 {
            problems.push(format!(
                "{kind}: {failed} of {} operations failed (more than {:.0}%); first: {}",
                ok + failed,
                MAX_FAILED * 100.0,
                errors.first().map_or("", String::as_str)
            ));
        }
        match *kind {
            "rate limit" if ok > 0 && noted == 0 => {
                problems.push("rate limit: no request was ever refused with 429".into());
            }
            "h2 keep-alive" if ok > 0 && noted == 0 && lab.keys_stored() > 1 => {
                problems.push("h2 keep-alive: no call carried the newest key".into());
            }
            _ => {}
        }
        eprintln!("soak: {kind:<20} {ok} ok, {failed} failed");
        kinds.insert(
            (*kind).to_owned(),
            json!({ "ok": ok, "failed": failed, "noted": noted, "first_errors": errors }),
        );
    }
    let document = json!({
        "command": format!("cargo xtask soak --minutes {}", options.minutes),
        "generated_unix_seconds": SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map_or(0, |d| d.as_secs()),
        "machine": bench::machine(),
        "build": "debug",
        "minutes": options.minutes,
        "warm_up_seconds": warm_up.as_secs(),
        "samples": samples.len(),
        "keys_stored": lab.keys_stored(),
        "gauges": gauges,
        "load": kinds,
        "passed": problems.is_empty(),
        "problems": problems,
    });
    (document, problems)
}

/// `cargo xtask soak-plot CSV`: draws the plot of a soak's CSV again (next to it, or `svg`).
pub fn plot_csv(csv: &Path, svg: Option<PathBuf>, warm_up_seconds: Option<f64>) -> Result<()> {
    let samples = sample::read_csv(csv)?;
    let end = samples.last().map_or(0.0, |s| s.seconds);
    let minutes = (end / 60.0).round().max(1.0) as u64;
    let warm_up =
        warm_up_seconds.unwrap_or_else(|| Options { minutes, out: None }.warm_up().as_secs_f64());
    let svg = svg.unwrap_or_else(|| csv.with_extension("svg"));
    let title = format!("agent-broker soak: {minutes} min (from {})", csv.display());
    plot::draw(&svg, &samples, warm_up, &title)?;
    println!("soak-plot: wrote {}", svg.display());
    Ok(())
}

/// The first executable called `name` in the system directories (agents run as an
/// unprivileged uid, which cannot run a program under /root, such as a pyenv shim).
fn find_program(name: &str) -> Result<PathBuf> {
    ["/usr/bin", "/bin", "/usr/local/bin"]
        .iter()
        .map(|dir| Path::new(dir).join(name))
        .find(|p| p.is_file())
        .with_context(|| format!("{name} is not installed in /usr/bin (the soak's agents run it)"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn warm_up_is_half_of_a_short_run_and_a_quarter_of_a_long_one() {
        let warm_up = |minutes| Options { minutes, out: None }.warm_up().as_secs();
        assert_eq!(warm_up(5), 150);
        assert_eq!(warm_up(60), 900);
        assert_eq!(warm_up(1), 30);
        assert_eq!(warm_up(10), 150);
    }

    #[test]
    fn the_ci_soak_has_enough_samples_after_warm_up() {
        let options = Options {
            minutes: CI_MINUTES,
            out: None,
        };
        let after = options.minutes * 60 - options.warm_up().as_secs();
        assert!(after / options.interval().as_secs() >= 3 * drift::MIN_SAMPLES as u64);
    }
}
