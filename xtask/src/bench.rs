//! `cargo xtask bench`: brokerd against the direct path and against the peers a user would pick
//! instead (nginx, mitmproxy), side by side in one run on this machine (issues 7 and 12).
//!
//! It builds in release, installs what it needs (wrk, h2load, nginx, openssl, python3; mitmproxy
//! from PyPI, whose column says "not installed" when that fails), starts a lab on loopback (see
//! [`lab`]) and sends the same requests four ways:
//!
//! - **direct**: the client outside any tagged cgroup, holding the real key (the floor);
//! - **brokerd**: the client inside the tagged cgroup `agents/bench` through `brokerctl run`,
//!   holding a placeholder, so the real eBPF redirect, TLS termination, policy, injection, audit
//!   and pooled upstream are measured;
//! - **nginx**: a TLS-terminating reverse proxy that sets the header, upstream keep-alive;
//! - **mitmproxy**: reverse mode with a header-setting addon.
//!
//! The SSE and bulk rows (issue 12) go to a streaming origin of the bench's own
//! ([`stream_origin`], run as `xtask bench-origin` from the release build) through direct,
//! brokerd and nginx (unbuffered) only.
//!
//! It prints one table (also written to `target/bench/latest.json`) with brokerd's ratios and the
//! issues' targets, cleans up everything it started, and fails when a direct, brokerd or nginx
//! measurement failed or saw a non-2xx answer, after printing the table. It never connects
//! anywhere but loopback.

mod clients;
mod fairness;
mod fleet;
mod lab;
mod load;
mod mitm;
mod nginx;
mod pki;
pub(crate) mod process;
mod relay;
mod report;
mod stream_origin;
mod tools;
mod workloads;

use std::{
    fs,
    os::unix::fs::PermissionsExt as _,
    sync::atomic::{AtomicBool, Ordering},
    time::{Duration, SystemTime, UNIX_EPOCH},
};

use anyhow::{Context as _, Result, bail};
use serde_json::json;

use crate::{
    build::{self, Profile},
    cmd, paths, running_as_root,
};

/// Set by SIGINT or SIGTERM: the bench stops at the next step and cleans up.
static STOP: AtomicBool = AtomicBool::new(false);

extern "C" fn on_signal(_: nix::libc::c_int) {
    STOP.store(true, Ordering::SeqCst);
}

/// Whether the bench has been asked to stop.
pub(crate) fn stopping() -> bool {
    STOP.load(Ordering::SeqCst)
}

/// How `cargo xtask bench` was asked to run.
pub struct Options {
    /// Length of each throughput or latency measurement.
    pub seconds: u64,
    /// Record a perf profile of brokerd during the 32-connection workload.
    pub profile: bool,
    /// Run only these workloads (keys of [`WORKLOADS`]); all when empty.
    pub only: Vec<String>,
}

pub use workloads::WORKLOADS;

pub use fleet::ClientOptions as FleetClientOptions;

/// `cargo xtask bench-fleet-client` (hidden): one agent of the fleet row; see [`fleet`].
pub fn fleet_client(options: &FleetClientOptions) -> Result<()> {
    fleet::run_client(options)
}

/// `cargo xtask bench-origin` (hidden): runs the streaming origin ([`stream_origin`]) until the
/// process is stopped. The bench starts it from the release build, so the direct path's floor is
/// not an unoptimised server.
pub fn serve_origin(
    listen: std::net::SocketAddr,
    cert: std::path::PathBuf,
    key: std::path::PathBuf,
    authorization_file: &std::path::Path,
) -> Result<()> {
    let authorization = fs::read_to_string(authorization_file)
        .with_context(|| format!("reading {}", authorization_file.display()))?;
    let origin = stream_origin::StreamOrigin::start(
        listen,
        &pki::CertFiles { cert, key },
        authorization.trim(),
    )?;
    eprintln!("bench-origin: listening on {}", origin.addr());
    loop {
        // SIGTERM (the bench stopping its services) ends the process.
        std::thread::park();
    }
}

/// Runs the bench; see the module documentation.
pub fn bench(options: &Options) -> Result<()> {
    if !running_as_root() {
        bail!("the bench starts brokerd and tags a cgroup, which need root: run it as root");
    }
    if !(1..=60).contains(&options.seconds) {
        bail!("--seconds must be between 1 and 60");
    }
    build::build(Profile::Release)?;
    let tools = tools::ensure(options.profile)?;
    catch_signals()?;
    let open_files = raise_open_files_limit();

    let out_dir = paths::target_dir().join("bench");
    let run_dir = out_dir.join("run");
    if run_dir.exists() {
        fs::remove_dir_all(&run_dir)
            .with_context(|| format!("removing the old {}", run_dir.display()))?;
    }
    fs::create_dir_all(&run_dir)?;
    fs::set_permissions(&run_dir, fs::Permissions::from_mode(0o700))?;
    lab::remove_stale_pins();

    let load_before = load_average();
    warn_if_busy(load_before);
    let started = std::time::Instant::now();
    let mut lab = lab::Lab::new(&run_dir, &paths::target_dir().join("release"))?;
    let settings = workloads::Settings {
        tools: &tools,
        duration: Duration::from_secs(options.seconds),
        profile: options.profile.then(|| out_dir.join("brokerd-profile.txt")),
        open_files,
        only: options.only.clone(),
    };
    let measured = lab
        .start(&tools)
        .and_then(|()| workloads::measure(&lab, &settings));
    lab.stop();
    let rows = match measured {
        Ok(rows) => rows,
        Err(e) => {
            eprintln!(
                "bench: logs kept in {} (the key there is a throwaway)",
                cmd::relative(&run_dir)
            );
            return Err(e);
        }
    };
    let _ = fs::remove_dir_all(&run_dir);

    let report = report::Report { rows };
    let table = report.markdown();
    println!("\n{table}");
    warn_if_busy(load_before);
    let json_path = out_dir.join("latest.json");
    let document = json!({
        "command": command_line(options),
        "generated_unix_seconds": SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map_or(0, |d| d.as_secs()),
        "took_seconds": started.elapsed().as_secs(),
        "seconds_per_measurement": options.seconds,
        "machine": machine(),
        // Before the lab started: the bench's own load would show in a later reading.
        "load_average_1min_before": load_before,
        "commit": commit(),
        "versions": {
            "wrk": tools::version_of(&tools.wrk, &["--version"]),
            "h2load": tools::version_of(&tools.h2load, &["--version"]),
            "nginx": tools::version_of(&tools.nginx, &["-v"]),
            "mitmproxy": tools.mitmdump.as_ref().map_or_else(
                |why| format!("not installed: {why}"),
                |m| tools::version_of(m, &["--version"]),
            ),
        },
        "rows": report.rows_json(),
        "table_markdown": table,
    });
    fs::write(&json_path, serde_json::to_string_pretty(&document)?)
        .with_context(|| format!("writing {}", json_path.display()))?;
    println!(
        "bench: wrote {} ({} s)",
        cmd::relative(&json_path),
        started.elapsed().as_secs()
    );
    let failures = report.failures();
    if !failures.is_empty() {
        bail!(
            "some measurements failed or saw failed requests:\n  {}",
            failures.join("\n  ")
        );
    }
    Ok(())
}

pub(crate) fn catch_signals() -> Result<()> {
    use nix::sys::signal::{SaFlags, SigAction, SigHandler, SigSet, Signal, sigaction};
    let action = SigAction::new(
        SigHandler::Handler(on_signal),
        SaFlags::empty(),
        SigSet::empty(),
    );
    // SAFETY: the handler only stores to an atomic, which is async-signal-safe.
    unsafe {
        sigaction(Signal::SIGINT, &action)?;
        sigaction(Signal::SIGTERM, &action)?;
    }
    Ok(())
}

/// Raises the soft limit on open files to the hard limit, for this process and the ones it
/// starts (the idle-connection workload holds 10,000 connections), and returns the new limit.
pub(crate) fn raise_open_files_limit() -> u64 {
    let mut limit = nix::libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: getrlimit and setrlimit only read and write the struct passed to them.
    unsafe {
        if nix::libc::getrlimit(nix::libc::RLIMIT_NOFILE, &mut limit) != 0 {
            return 1024;
        }
        let raised = nix::libc::rlimit {
            rlim_cur: limit.rlim_max,
            rlim_max: limit.rlim_max,
        };
        if nix::libc::setrlimit(nix::libc::RLIMIT_NOFILE, &raised) == 0 {
            limit = raised;
        }
    }
    limit.rlim_cur
}

fn command_line(options: &Options) -> String {
    let mut line = "cargo xtask bench".to_owned();
    if options.seconds != DEFAULT_SECONDS {
        line.push_str(&format!(" --seconds {}", options.seconds));
    }
    if options.profile {
        line.push_str(" --profile");
    }
    if !options.only.is_empty() {
        line.push_str(&format!(" --only {}", options.only.join(",")));
    }
    line
}

/// The default length of each measurement, in seconds.
pub const DEFAULT_SECONDS: u64 = 5;

/// The 1-minute load average, from /proc/loadavg.
fn load_average() -> Option<f64> {
    fs::read_to_string("/proc/loadavg")
        .ok()?
        .split_whitespace()
        .next()?
        .parse()
        .ok()
}

/// Says so when other work competes with the bench for CPU: its numbers are then noisy.
fn warn_if_busy(load: Option<f64>) {
    if let Some(load) = load.filter(|load| *load > 1.0) {
        eprintln!(
            "bench: WARNING: the machine is busy (1-minute load average {load:.1}); other work \
             competes with the measurements for CPU, so expect noisy numbers"
        );
    }
}

/// The workspace's commit, with `+dirty` when the work tree has changes: what was measured.
pub(crate) fn commit() -> String {
    let git = |args: &[&str]| {
        std::process::Command::new("git")
            .args(args)
            .current_dir(paths::root())
            .output()
            .ok()
            .filter(|out| out.status.success())
            .map(|out| String::from_utf8_lossy(&out.stdout).trim().to_owned())
    };
    match (
        git(&["rev-parse", "--short", "HEAD"]),
        git(&["status", "--porcelain"]),
    ) {
        (Some(head), Some(changes)) if !changes.is_empty() => format!("{head}+dirty"),
        (Some(head), _) => head,
        (None, _) => "unknown".to_owned(),
    }
}

/// What the numbers depend on: processor, core count, kernel.
pub(crate) fn machine() -> serde_json::Value {
    let cpuinfo = fs::read_to_string("/proc/cpuinfo").unwrap_or_default();
    let model = cpuinfo
        .lines()
        .find_map(|l| l.strip_prefix("model name"))
        .and_then(|l| l.split_once(':'))
        .map_or("unknown", |(_, m)| m.trim());
    json!({
        "cpu": model,
        "cpus": std::thread::available_parallelism().map_or(0, usize::from),
        "kernel": fs::read_to_string("/proc/sys/kernel/osrelease")
            .unwrap_or_default()
            .trim(),
    })
}
