//! brokerctl: the operator's command line for brokerd. See `brokerctl --help`.
//!
//! It talks to brokerd only through the control protocol (`agent_broker_protocol`), and never
//! prints a secret's value or takes one from its arguments. This file holds the top-level
//! arguments and the dispatch; each subcommand is a module of `cmd`, the hardened launcher
//! behind `brokerctl run` is `launcher`.

use std::{path::PathBuf, process::ExitCode};

use anyhow::Context as _;
use clap::{Parser, Subcommand};

// First: its output macros are used everywhere below.
#[macro_use]
mod print;
mod cmd;
mod control;
mod launcher;

/// Operator CLI for brokerd: tag cgroups so their connections go through the broker, start
/// agents inside them, and see what brokerd is doing.
///
/// Cgroup PATHs are relative to the cgroup2 mount (found from /proc/self/mountinfo), e.g.
/// agents/demo. The root, paths with `..`, and brokerd's own cgroup or its ancestors are refused.
#[derive(Debug, Parser)]
#[command(name = "brokerctl", version)]
struct Args {
    /// Run directory of the brokerd to talk to (where control.sock and sandbox.sock live)
    /// [default: /run/agent-broker for root; $XDG_RUNTIME_DIR/agent-broker, or
    /// /tmp/agent-broker-UID without it, for any other user].
    #[arg(long, value_name = "DIR", env = "AGENT_BROKER_RUN_DIR", default_value_os_t = default_run_dir(), hide_default_value = true, global = true)]
    run_dir: PathBuf,
    #[command(subcommand)]
    command: Command,
}

/// The subcommands, in the order `--help` lists them. Each one's help text is the doc comment
/// of its arguments, in its module.
#[derive(Debug, Subcommand)]
enum Command {
    Attach(cmd::attach::AttachArgs),
    Detach(cmd::attach::DetachArgs),
    Run(cmd::run::Args),
    Status(cmd::status::Args),
    #[command(subcommand)]
    Secret(cmd::secret::Command),
    #[command(subcommand)]
    Ca(cmd::ca::Command),
    #[command(subcommand)]
    Handle(cmd::handle::Command),
    #[command(subcommand)]
    Policy(cmd::policy::Command),
    #[command(subcommand)]
    Approve(cmd::approve::Command),
    /// Live console: brokered calls and denials as they happen (q to quit, ? for keys).
    Console,
    Doctor(cmd::doctor::Args),
    Logs(cmd::logs::Args),
    Connections(cmd::connections::Args),
    OciHook(cmd::oci_hook::Args),
    Metrics(cmd::metrics::Args),
    /// Write brokerctl's man pages and shell completions into DIR (for packaging).
    #[command(hide = true)]
    GenerateDocs {
        #[arg(value_name = "DIR")]
        dir: PathBuf,
    },
}

/// The run directory of this user's brokerd: root's is the system one, any other user's is
/// per user (so a non-root brokerctl finds a `brokerd --unprivileged` of the same user).
fn default_run_dir() -> PathBuf {
    agent_broker_protocol::sandbox::default_run_dir(
        nix::unistd::geteuid().as_raw(),
        std::env::var_os("XDG_RUNTIME_DIR").as_deref(),
    )
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
    let run_dir = &args.run_dir;
    match args.command {
        Command::Attach(a) => cmd::attach::attach(run_dir, a),
        Command::Detach(a) => cmd::attach::detach(run_dir, a),
        Command::Run(a) => cmd::run::run(run_dir, a),
        Command::Status(a) => cmd::status::run(run_dir, a),
        Command::Secret(c) => cmd::secret::run(run_dir, c),
        Command::Ca(c) => cmd::ca::run(run_dir, c),
        Command::Handle(c) => cmd::handle::run(run_dir, c),
        Command::Policy(c) => cmd::policy::run(run_dir, c),
        Command::Approve(c) => cmd::approve::run(run_dir, c),
        // The console is a crate of its own (agent-broker-console).
        Command::Console => Ok(agent_broker_console::run(run_dir)?),
        Command::Doctor(a) => {
            cmd::doctor::run(run_dir, a);
            Ok(())
        }
        Command::Logs(a) => cmd::logs::run(run_dir, a),
        Command::Connections(a) => cmd::connections::run(run_dir, a),
        Command::OciHook(a) => cmd::oci_hook::run(run_dir, a),
        Command::Metrics(a) => cmd::metrics::run(run_dir, a),
        Command::GenerateDocs { dir } => {
            let cmd = <Args as clap::CommandFactory>::command();
            agent_broker_protocol::docs::write(cmd, "1", &dir)
                .with_context(|| format!("cannot write the docs into {}", dir.display()))
        }
    }
}

#[cfg(test)]
mod tests {
    use clap::CommandFactory as _;

    /// clap's own consistency checks (conflicting names, bad defaults, misplaced `last`) over
    /// every subcommand, which otherwise only fail when that subcommand is parsed.
    #[test]
    fn the_command_line_is_well_formed() {
        super::Args::command().debug_assert();
    }

    /// `--shaped` is off unless asked for; `secret placeholder` takes a name.
    #[test]
    fn shaped_handles_and_placeholders_parse() {
        use super::{Args, Command, cmd};
        use clap::Parser as _;
        let mint = |extra: &[&str]| {
            let mut argv = vec![
                "brokerctl",
                "handle",
                "mint",
                "--cgroup",
                "a",
                "--secret",
                "K",
                "--host",
                "h.test",
            ];
            argv.extend_from_slice(extra);
            match Args::try_parse_from(argv).map(|a| a.command) {
                Ok(Command::Handle(cmd::handle::Command::Mint { shaped, .. })) => shaped,
                other => panic!("handle mint parsed as {other:?}"),
            }
        };
        assert!(!mint(&[]));
        assert!(mint(&["--shaped"]));
        assert!(matches!(
            Args::try_parse_from(["brokerctl", "secret", "placeholder", "GH_TOKEN"])
                .map(|a| a.command),
            Ok(Command::Secret(cmd::secret::Command::Placeholder { name })) if name == "GH_TOKEN"
        ));
        assert!(Args::try_parse_from(["brokerctl", "secret", "placeholder"]).is_err());
    }
}
