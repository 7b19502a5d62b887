//! `brokerctl connections`: the most recent connections brokerd accepted, with the agent each
//! came from and whether it was brokered or refused.

use std::path::Path;

use agent_broker_protocol::{ConnectionRecord, Outcome, Request, Response};

use crate::control::{call, unexpected};
use crate::print::json_pretty;

/// The most recent connections brokerd accepted, oldest first.
#[derive(Debug, clap::Args)]
pub struct Args {
    /// How many to show.
    #[arg(long, default_value_t = 20)]
    limit: usize,
    /// Print them as a JSON array.
    #[arg(long)]
    json: bool,
}

pub fn run(run_dir: &Path, args: Args) -> anyhow::Result<()> {
    match call(run_dir, &Request::Connections { limit: args.limit })? {
        Response::Connections { connections } if args.json => json_pretty(&connections),
        Response::Connections { connections } => {
            print_connections(&connections);
            Ok(())
        }
        other => Err(unexpected(other)),
    }
}

fn print_connections(records: &[ConnectionRecord]) {
    outln!(
        "{:<14} {:<24} {:>8} {:<16} {:<28} OUTCOME",
        "TIME(ms)",
        "CGROUP",
        "PID",
        "COMM",
        "ORIGINAL DST"
    );
    for r in records {
        let outcome = match &r.outcome {
            Outcome::Brokered => "brokered".to_string(),
            Outcome::Refused { reason } => format!("refused: {reason}"),
        };
        match &r.origin {
            Some(o) => outln!(
                "{:<14} {:<24} {:>8} {:<16} {:<28} {}",
                r.time_ms,
                o.cgroup,
                o.pid,
                o.comm,
                o.original_dst.to_string(),
                outcome
            ),
            None => outln!(
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
