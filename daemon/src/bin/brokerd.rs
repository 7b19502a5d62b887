//! brokerd: the agent-broker daemon. See `brokerd --help`.

use std::{path::PathBuf, process::ExitCode};

use agent_broker::config::{Config, Settings};
use clap::Parser;

/// mimalloc instead of glibc's malloc: the request path allocates and frees many small buffers
/// (headers, TLS records, audit events) across threads, and glibc's malloc/free were about a
/// tenth of brokerd's CPU under load. Secrets are zeroized before their memory is freed whatever
/// the allocator, and brokerd's memory is locked (see `harden`).
#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

/// The agent-broker daemon: receives every outbound TCP connection of the cgroups tagged with
/// `brokerctl attach`, through eBPF programs that redirect them in the kernel.
///
/// Settings come from flags, over the TOML file given with --config, over embedded defaults.
/// Tagged cgroups stay redirected while brokerd is down: their connects fail with ECONNREFUSED
/// until it is back, and never go direct.
#[derive(Debug, Parser)]
#[command(name = "brokerd", version)]
struct Args {
    /// TOML config file with any of the settings below, by their names with underscores
    /// (`spin_us = 0`, `listen = ["127.0.0.1:15001"]`); flags override it.
    #[arg(long, value_name = "FILE")]
    config: Option<PathBuf>,
    #[command(flatten)]
    settings: Settings,
    /// Write brokerd's man page and shell completions into DIR and exit (for packaging).
    #[arg(long, value_name = "DIR", hide = true)]
    generate_docs: Option<PathBuf>,
}

fn main() -> ExitCode {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info")),
        )
        .with_writer(std::io::stderr)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .init();
    let args = Args::parse();
    if let Some(dir) = &args.generate_docs {
        let cmd = <Args as clap::CommandFactory>::command();
        return match agent_broker_protocol::docs::write(cmd, "8", dir) {
            Ok(()) => ExitCode::SUCCESS,
            Err(e) => {
                eprintln!("brokerd: cannot write the docs into {}: {e}", dir.display());
                ExitCode::FAILURE
            }
        };
    }
    let config = match load_config(args) {
        Ok(c) => c,
        Err(e) => {
            eprintln!("brokerd: {e:#}");
            return ExitCode::from(64); // EX_USAGE
        }
    };
    // The control plane (control socket, policy reloads, DNS, logs) needs little: one worker.
    // Proxied connections run on the per-core threads `daemon::run` starts.
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .enable_all()
        .build()
    {
        Ok(r) => r,
        Err(e) => {
            eprintln!("brokerd: cannot start the async runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    match runtime.block_on(agent_broker::daemon::run(config)) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("brokerd: {e:#}");
            ExitCode::FAILURE
        }
    }
}

fn load_config(args: Args) -> anyhow::Result<Config> {
    let file = match &args.config {
        Some(path) => Settings::load(path)?,
        None => Settings::default(),
    };
    Ok(Config::layer(args.settings, file)?)
}
