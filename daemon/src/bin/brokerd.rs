//! brokerd: the agent-broker daemon. See `brokerd --help`.

use std::{net::SocketAddr, path::PathBuf, process::ExitCode};

use agent_broker::config::{CliConfig, Config, FileConfig};
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
    /// TOML config file with any of: state_dir, run_dir, policy_dir, pin_dir, listen,
    /// upstream_ca, master_key_credential, audit_max_age_days, audit_max_records, dns_port,
    /// dns_upstream, require_lsm, spin_us.
    #[arg(long, value_name = "FILE")]
    config: Option<PathBuf>,
    /// State directory (vault, CA, audit log) [default: /var/lib/agent-broker].
    #[arg(long, value_name = "DIR")]
    state_dir: Option<PathBuf>,
    /// Run directory holding the control socket control.sock [default: /run/agent-broker].
    #[arg(long, value_name = "DIR")]
    run_dir: Option<PathBuf>,
    /// Policy directory [default: /etc/agent-broker/policies].
    #[arg(long, value_name = "DIR")]
    policy_dir: Option<PathBuf>,
    /// bpffs directory for pinned maps and links; bpffs is mounted at /sys/fs/bpf when needed
    /// [default: /sys/fs/bpf/agent-broker].
    #[arg(long, value_name = "DIR")]
    pin_dir: Option<PathBuf>,
    /// Loopback address for redirected connections; repeat for IPv4 and IPv6. All share one
    /// port; port 0 picks a free one [default: 127.0.0.1:15001 and [::1]:15001].
    #[arg(long, value_name = "ADDR")]
    listen: Vec<SocketAddr>,
    /// PEM file of a CA to trust for upstream servers, beside the system roots (repeatable).
    #[arg(long, value_name = "FILE")]
    upstream_ca: Vec<PathBuf>,
    /// Read the vault master key from the systemd credential `agent-broker-master-key`
    /// ($CREDENTIALS_DIRECTORY) instead of <state-dir>/master.key.
    #[arg(long)]
    master_key_credential: bool,
    /// Remove audit records older than DAYS [default: keep all].
    #[arg(long, value_name = "DAYS")]
    audit_max_age_days: Option<u64>,
    /// Keep at most N audit records, removing the oldest [default: keep all].
    #[arg(long, value_name = "N")]
    audit_max_records: Option<u64>,
    /// UDP port of the DNS listener, on the listen addresses: agents' DNS (to any resolver on
    /// port 53) is redirected there and answered only for names their policy allows; port 0
    /// picks a free one [default: 15053].
    #[arg(long, value_name = "PORT")]
    dns_port: Option<u16>,
    /// Resolver to forward allowed DNS queries to (repeatable) [default: the nameservers of
    /// /etc/resolv.conf].
    #[arg(long, value_name = "ADDR")]
    dns_upstream: Vec<SocketAddr>,
    /// Refuse to start unless the optional BPF LSM programs load (they add a socket-family and
    /// ptrace check in the kernel; many kernels do not allow them, and every protection brokerd
    /// promises holds without them).
    #[arg(long)]
    require_lsm: bool,
    /// After each request a proxy thread keeps polling its sockets for this long (µs) before
    /// it sleeps, so the upstream's answer and the agent's next request do not wait for a
    /// wake-up; 0 turns it off, at most 1000 [default: 100].
    #[arg(long, value_name = "MICROSECONDS")]
    spin_us: Option<u64>,
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
        Some(path) => FileConfig::load(path)?,
        None => FileConfig::default(),
    };
    let cli = CliConfig {
        state_dir: args.state_dir,
        run_dir: args.run_dir,
        policy_dir: args.policy_dir,
        pin_dir: args.pin_dir,
        listen: args.listen,
        upstream_ca: args.upstream_ca,
        master_key_credential: args.master_key_credential,
        audit_max_age_days: args.audit_max_age_days,
        audit_max_records: args.audit_max_records,
        dns_port: args.dns_port,
        dns_upstream: args.dns_upstream,
        require_lsm: args.require_lsm,
        spin_us: args.spin_us,
    };
    Ok(Config::layer(cli, file)?)
}
