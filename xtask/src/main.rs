//! Developer and CI tasks for agent-broker, run as `cargo xtask <command>`.
//!
//! xtask is the one place that knows how the pieces are built: it installs what the build and the
//! tests need (Debian packages, rustup components, a `bpf-linker` under `target/ebpf-tools`),
//! builds the eBPF programs with nightly for `bpfel-unknown-none`, then builds, runs or tests the
//! host workspace. Every command is idempotent and prints each external command before running it.
//!
//! It must never write outside the workspace's `target/` directory, except for the Debian packages
//! and rustup components it installs, a directory named with `package --out` or `soak --out`
//! (and, for `fuzz`, cargo-fuzz itself, its build in `fuzz/target/` and the crashing inputs it
//! keeps in `fuzz/regressions/`), and it must never let a test be skipped silently: an ignored
//! test, or a privileged end-to-end suite that ran nothing, fails `cargo xtask test`.

mod bench;
mod build;
mod cmd;
mod demo;
mod fuzz;
mod names;
mod package;
mod paths;
mod run;
mod setup;
mod soak;
mod test;

use std::ffi::OsString;
use std::process::ExitCode;

use clap::{Parser, Subcommand};

#[derive(Parser)]
#[command(
    name = "cargo xtask",
    bin_name = "cargo xtask",
    about = "Developer and CI tasks for agent-broker"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Install what the build and the tests need: Debian packages, rustup components, bpf-linker.
    Setup,
    /// Build the eBPF programs, then the workspace's binaries (runs `setup` first).
    Build {
        /// Build the host binaries with the release profile.
        #[arg(long)]
        release: bool,
    },
    /// Build, then replace this process with `target/debug/brokerd` (needs root).
    Run {
        /// Arguments passed to brokerd, after `--`.
        #[arg(last = true)]
        brokerd_args: Vec<OsString>,
    },
    /// Run the README's end-to-end flow against the bundled test API, calling until Ctrl-C
    /// (needs root).
    Demo {
        /// Stop after this many calls.
        #[arg(long)]
        calls: Option<u32>,
    },
    /// Build, check formatting and lints, run unit/component tests, then the privileged
    /// end-to-end tests and a 5-minute soak (need root); fails if any test failed, was ignored,
    /// or none ran, or the soak failed.
    Test,
    /// Measure brokerd against the direct path, nginx and mitmproxy in one run; print the table
    /// and write target/bench/latest.json (needs root, about 5 minutes).
    Bench {
        /// Length of each throughput or latency measurement, in seconds.
        #[arg(long, default_value_t = bench::DEFAULT_SECONDS)]
        seconds: u64,
        /// Also record a perf profile of brokerd (target/bench/brokerd-profile.txt).
        #[arg(long)]
        profile: bool,
        /// Run only these workloads (comma-separated): keepalive1, keepalive32, newconn, h2,
        /// widearea, sse, bulk, idle, hostnames, micro, container, unprivileged, fairness, fleet,
        /// manyidle.
        /// The table then has only their rows.
        #[arg(long, value_delimiter = ',', value_parser = clap::builder::PossibleValuesParser::new(bench::WORKLOADS))]
        only: Vec<String>,
    },
    /// Build a Debian package of brokerd and brokerctl (binaries, hardened systemd unit, config,
    /// policy directory, man pages, shell completions) into target/package.
    Package {
        /// Package the brokerd and brokerctl already built in DIR (e.g. target/debug) instead of
        /// building the eBPF programs and the release binaries.
        #[arg(long, value_name = "DIR")]
        bin_dir: Option<std::path::PathBuf>,
        /// Write the package and its staging tree into DIR [default: target/package].
        #[arg(long, value_name = "DIR")]
        out: Option<std::path::PathBuf>,
        /// Compress with gzip -1 instead of xz: much faster, a larger package (for tests).
        #[arg(long)]
        fast_compression: bool,
    },
    /// The bench's streaming origin, which `bench` starts from the release build; runs until
    /// it is stopped.
    #[command(hide = true)]
    BenchOrigin {
        /// Address to listen on.
        #[arg(long)]
        listen: std::net::SocketAddr,
        /// The server certificate (PEM).
        #[arg(long)]
        cert: std::path::PathBuf,
        /// Its private key (PEM).
        #[arg(long)]
        key: std::path::PathBuf,
        /// A file holding the whole Authorization value requests must carry.
        #[arg(long)]
        authorization_file: std::path::PathBuf,
    },
    /// One agent of the bench's fleet row, which `bench` starts from the release build in each
    /// agent's cgroup: opens its connections, prints `fleet-ready`, waits for a line on stdin,
    /// loads them for the seconds given and prints what it measured.
    #[command(hide = true)]
    BenchFleetClient {
        /// Address to connect to (TLS, no SNI).
        #[arg(long)]
        connect: std::net::SocketAddr,
        /// Keep-alive connections, one request at a time on each.
        #[arg(long)]
        connections: u32,
        /// How long to load them once the gate opens.
        #[arg(long)]
        seconds: u64,
        /// The request's path.
        #[arg(long)]
        path: String,
        /// The whole Authorization value of every request.
        #[arg(long)]
        authorization: String,
    },
    /// Run mixed load against a real brokerd (debug build) for N minutes while sampling its
    /// memory, descriptors, tasks, pool, leaf cache, answered names and audit queue; write
    /// soak.csv, summary.json and soak.svg; fail when a gauge drifts upward after warm-up
    /// (needs root).
    Soak {
        /// How long the load runs, in minutes.
        #[arg(long, default_value_t = soak::CI_MINUTES)]
        minutes: u64,
        /// Write the CSV, summary and plot into DIR [default: target/soak].
        #[arg(long, value_name = "DIR")]
        out: Option<std::path::PathBuf>,
    },
    /// Draw a soak's plot again from its CSV (into CSV with the extension .svg, or --out).
    SoakPlot {
        /// The soak.csv a soak wrote.
        csv: std::path::PathBuf,
        /// Write the SVG here.
        #[arg(long, value_name = "FILE")]
        out: Option<std::path::PathBuf>,
        /// Shade this many seconds as warm-up [default: what the soak of that length used].
        #[arg(long, value_name = "SECONDS")]
        warm_up: Option<f64>,
    },
    /// Run the fuzz targets (cargo-fuzz, libFuzzer, nightly; installs cargo-fuzz if missing)
    /// for N minutes each; crashing inputs go to fuzz/regressions/NAME/, which `test` replays.
    Fuzz {
        /// Minutes per target.
        #[arg(long, default_value_t = fuzz::DEFAULT_MINUTES)]
        minutes: u64,
        /// Run only this target (a name of fuzz/fuzz_targets/*.rs).
        #[arg(long)]
        target: Option<String>,
    },
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let result = match cli.command {
        Command::Setup => setup::ensure(),
        Command::Build { release } => build::build(build::Profile::from_release_flag(release)),
        Command::Run { brokerd_args } => run::run(brokerd_args),
        Command::Demo { calls } => demo::demo(calls),
        Command::Test => test::test(),
        Command::Bench {
            seconds,
            profile,
            only,
        } => bench::bench(&bench::Options {
            seconds,
            profile,
            only,
        }),
        Command::Package {
            bin_dir,
            out,
            fast_compression,
        } => package::package(&package::Options {
            bin_dir,
            out,
            fast_compression,
        }),
        Command::BenchFleetClient {
            connect,
            connections,
            seconds,
            path,
            authorization,
        } => bench::fleet_client(&bench::FleetClientOptions {
            connect,
            connections,
            seconds,
            authorization,
            path,
        }),
        Command::BenchOrigin {
            listen,
            cert,
            key,
            authorization_file,
        } => bench::serve_origin(listen, cert, key, &authorization_file),
        Command::Fuzz { minutes, target } => fuzz::fuzz(minutes, target),
        Command::Soak { minutes, out } => soak::soak(&soak::Options { minutes, out }),
        Command::SoakPlot { csv, out, warm_up } => soak::plot_csv(&csv, out, warm_up),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(err) => {
            eprintln!("error: {err:#}");
            ExitCode::FAILURE
        }
    }
}

/// Whether this process has root's effective uid, which loading eBPF programs and the privileged
/// tests need.
fn running_as_root() -> bool {
    nix::unistd::geteuid().is_root()
}
