//! brokerctl: the operator's command line for brokerd. See `brokerctl --help`.

use std::{ffi::OsString, os::unix::process::CommandExt as _, path::PathBuf, process::ExitCode};

use agent_broker::{
    cgroup::{CgroupPath, CgroupRoot},
    client::Client,
    config::DEFAULT_RUN_DIR,
};
use agent_broker_protocol::{ConnectionRecord, Outcome, Request, Response, StatusReport};
use anyhow::{Context as _, bail};
use clap::{Parser, Subcommand};

/// Operator CLI for brokerd: tag cgroups so their connections go through the broker, start
/// agents inside them, and see what brokerd is doing.
///
/// Cgroup PATHs are relative to the cgroup2 mount (found from /proc/self/mountinfo), e.g.
/// agents/demo. The root, paths with `..`, and brokerd's own cgroup or its ancestors are refused.
#[derive(Debug, Parser)]
#[command(name = "brokerctl", version)]
struct Args {
    /// Run directory of the brokerd to talk to (where control.sock lives).
    #[arg(long, value_name = "DIR", env = "AGENT_BROKER_RUN_DIR", default_value = DEFAULT_RUN_DIR, global = true)]
    run_dir: PathBuf,
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Tag a cgroup: every TCP connection made inside it (and below it) goes to brokerd.
    Attach {
        /// cgroup path relative to the cgroup2 mount.
        #[arg(long, value_name = "PATH")]
        cgroup: String,
        /// Create the cgroup if it does not exist.
        #[arg(long)]
        create: bool,
    },
    /// Untag a cgroup: its connections are no longer redirected.
    Detach {
        /// cgroup path relative to the cgroup2 mount.
        #[arg(long, value_name = "PATH")]
        cgroup: String,
    },
    /// Start a command inside a tagged cgroup (tagging it first if needed).
    ///
    /// brokerctl asks brokerd to tag the cgroup, moves itself into it, and executes CMD, which
    /// keeps brokerctl's pid. If brokerd cannot be reached, CMD is not started.
    Run {
        /// cgroup path relative to the cgroup2 mount.
        #[arg(long, value_name = "PATH")]
        cgroup: String,
        /// Create the cgroup if it does not exist.
        #[arg(long)]
        create: bool,
        /// The command and its arguments.
        #[arg(required = true, last = true, value_name = "CMD")]
        command: Vec<OsString>,
    },
    /// Whether brokerd is up, its listeners, and the tagged cgroups with their process counts.
    Status {
        /// Print the status as JSON.
        #[arg(long)]
        json: bool,
    },
    /// The most recent connections brokerd accepted, oldest first.
    Connections {
        /// How many to show.
        #[arg(long, default_value_t = 20)]
        limit: usize,
        /// Print them as a JSON array.
        #[arg(long)]
        json: bool,
    },
}

fn main() -> ExitCode {
    let args = Args::parse();
    match run(args) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("brokerctl: {e:#}");
            ExitCode::FAILURE
        }
    }
}

fn run(args: Args) -> anyhow::Result<()> {
    match args.command {
        Command::Attach { cgroup, create } => {
            let path = CgroupPath::parse(&cgroup)?;
            let (tagged, already) = attach(&args.run_dir, &path, create)?;
            if already {
                println!("{} is already tagged", tagged.path);
            } else {
                println!("tagged {} (cgroup id {})", tagged.path, tagged.id);
            }
        }
        Command::Detach { cgroup } => {
            let path = CgroupPath::parse(&cgroup)?;
            match call(
                &args.run_dir,
                &Request::Detach {
                    cgroup: path.to_string(),
                },
            )? {
                Response::Detached { cgroup } => println!("untagged {cgroup}"),
                other => return Err(unexpected(other)),
            }
        }
        Command::Run {
            cgroup,
            create,
            command,
        } => {
            let path = CgroupPath::parse(&cgroup)?;
            attach(&args.run_dir, &path, create)?;
            let root = CgroupRoot::discover()?;
            root.join(&path, std::process::id())?;
            let (program, rest) = command.split_first().context("no command given")?;
            let err = std::process::Command::new(program).args(rest).exec();
            bail!("cannot execute {}: {err}", program.to_string_lossy());
        }
        Command::Status { json } => match call(&args.run_dir, &Request::Status)? {
            Response::Status(status) if json => {
                println!("{}", serde_json::to_string_pretty(&status)?)
            }
            Response::Status(status) => print_status(&status),
            other => return Err(unexpected(other)),
        },
        Command::Connections { limit, json } => {
            match call(&args.run_dir, &Request::Connections { limit })? {
                Response::Connections { connections } if json => {
                    println!("{}", serde_json::to_string_pretty(&connections)?)
                }
                Response::Connections { connections } => print_connections(&connections),
                other => return Err(unexpected(other)),
            }
        }
    }
    Ok(())
}

fn attach(
    run_dir: &std::path::Path,
    path: &CgroupPath,
    create: bool,
) -> anyhow::Result<(agent_broker_protocol::TaggedCgroup, bool)> {
    let request = Request::Attach {
        cgroup: path.to_string(),
        create,
    };
    match call(run_dir, &request)? {
        Response::Attached { cgroup, already } => Ok((cgroup, already)),
        other => Err(unexpected(other)),
    }
}

/// One request, one answer; an error answer becomes an error.
fn call(run_dir: &std::path::Path, request: &Request) -> anyhow::Result<Response> {
    let mut client = Client::connect(run_dir)?;
    match client.call(request)? {
        Response::Error { kind, message } => bail!("brokerd refused ({kind:?}): {message}"),
        other => Ok(other),
    }
}

fn unexpected(response: Response) -> anyhow::Error {
    anyhow::anyhow!("unexpected answer from brokerd: {response:?}")
}

fn print_status(s: &StatusReport) {
    println!("brokerd {} is up (pid {})", s.version, s.pid);
    let listeners: Vec<String> = s.listeners.iter().map(ToString::to_string).collect();
    println!("listening on   {}", listeners.join(", "));
    println!("cgroup2 mount  {}", s.cgroup_root);
    println!("pin dir        {}", s.pin_dir);
    println!(
        "kernel         {} redirected, {} refused, {} not re-keyed",
        s.counters.redirected, s.counters.refused, s.counters.rekey_failed
    );
    if s.cgroups.is_empty() {
        println!("no tagged cgroups");
        return;
    }
    println!(
        "{:<40} {:>10} {:>10} {:>6}",
        "TAGGED CGROUP", "ID", "PROCESSES", "LINKS"
    );
    for c in &s.cgroups {
        println!(
            "{:<40} {:>10} {:>10} {:>6}",
            c.path, c.id, c.processes, c.links
        );
    }
}

fn print_connections(records: &[ConnectionRecord]) {
    println!(
        "{:<14} {:<24} {:>8} {:<16} {:<28} OUTCOME",
        "TIME(ms)", "CGROUP", "PID", "COMM", "ORIGINAL DST"
    );
    for r in records {
        let outcome = match &r.outcome {
            Outcome::Relayed => "relayed".to_string(),
            Outcome::Refused { reason } => format!("refused: {reason}"),
        };
        match &r.origin {
            Some(o) => println!(
                "{:<14} {:<24} {:>8} {:<16} {:<28} {}",
                r.time_ms,
                o.cgroup,
                o.pid,
                o.comm,
                o.original_dst.to_string(),
                outcome
            ),
            None => println!(
                "{:<14} {:<24} {:>8} {:<16} {:<28} {}",
                r.time_ms,
                "?",
                "?",
                "?",
                r.peer.to_string(),
                outcome
            ),
        }
    }
}
