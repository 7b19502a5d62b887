//! `brokerctl approve`: the requests waiting for an operator's approval (a rule with
//! `approve = "ask"`, or a destination no rule allows under `on_unknown = "ask"`), and the
//! decisions: allow once, allow until a time, allow always (written into the agent's approvals
//! file in the policy directory), or deny. brokerd records who decided (`cli uid N`).

use std::{
    path::Path,
    time::{Duration, SystemTime, UNIX_EPOCH},
};

use agent_broker_protocol::{ApprovalDecision, PendingApproval, Request, Response};

use crate::control::{call, unexpected};
use crate::print::json_pretty;

/// Requests waiting for an operator's approval, and decisions about them.
#[derive(Debug, clap::Subcommand)]
pub enum Command {
    /// The requests waiting, oldest first: id, agent, pid, exe, method, host, path, the rule
    /// that asked, and how long until each is denied for want of a decision.
    List {
        #[arg(long)]
        json: bool,
    },
    /// Allow request ID: this request only; with --until, this agent's requests with the same
    /// method to the same host and port until then; with --always, for good (a rule, or a
    /// standing approval of the rule that asked, in the agent's approvals file; refused when
    /// the parent's policy does not allow it).
    Allow {
        id: u64,
        /// A duration from now (30m, 8h) or a time (2026-12-31T18:00:00Z).
        #[arg(long, value_name = "WHEN", value_parser = parse_until, conflicts_with = "always")]
        until: Option<u64>,
        #[arg(long)]
        always: bool,
    },
    /// Deny request ID; the agent is told the reason.
    Deny {
        id: u64,
        #[arg(long)]
        reason: Option<String>,
    },
}

/// `--until`: a duration from now or an RFC 3339 time, as Unix milliseconds.
fn parse_until(raw: &str) -> Result<u64, String> {
    let when = match humantime::parse_duration(raw) {
        Ok(d) => SystemTime::now() + d,
        Err(_) => humantime::parse_rfc3339_weak(raw).map_err(|_| {
            format!("{raw:?} is neither a duration (30m, 8h) nor a time (2026-12-31T18:00:00Z)")
        })?,
    };
    let ms = when
        .duration_since(UNIX_EPOCH)
        .map_err(|_| format!("{raw:?} is before 1970"))?
        .as_millis();
    u64::try_from(ms).map_err(|_| format!("{raw:?} is too far away"))
}

pub fn run(run_dir: &Path, command: Command) -> anyhow::Result<()> {
    let (id, decision) = match command {
        Command::List { json } => {
            return match call(run_dir, &Request::ApprovalList)? {
                Response::Approvals { pending } if json => json_pretty(&pending),
                Response::Approvals { pending } => {
                    print_list(&pending);
                    Ok(())
                }
                other => Err(unexpected(other)),
            };
        }
        Command::Allow {
            id,
            until: Some(until_ms),
            ..
        } => (id, ApprovalDecision::AllowUntil { until_ms }),
        Command::Allow { id, always, .. } => (
            id,
            if always {
                ApprovalDecision::AllowAlways
            } else {
                ApprovalDecision::AllowOnce
            },
        ),
        Command::Deny { id, reason } => (id, ApprovalDecision::Deny { reason }),
    };
    let request = Request::ApprovalDecide {
        id,
        decision,
        via: Some("cli".into()),
    };
    match call(run_dir, &request)? {
        Response::ApprovalDecided { id, outcome } => {
            outln!("#{id}: {outcome}");
            Ok(())
        }
        other => Err(unexpected(other)),
    }
}

fn print_list(pending: &[PendingApproval]) {
    if pending.is_empty() {
        outln!("no requests are waiting for approval");
        return;
    }
    let now = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64);
    outln!(
        "{:<5} {:<22} {:<8} {:<7} {:<32} {:<24} {:<8} WHY",
        "ID",
        "AGENT",
        "PID",
        "METHOD",
        "HOST",
        "PATH",
        "LEFT"
    );
    for p in pending {
        let left = Duration::from_millis(p.expires_ms.saturating_sub(now) / 1000 * 1000);
        let left = if p.held {
            humantime::format_duration(left).to_string()
        } else {
            format!("{} (filed)", humantime::format_duration(left))
        };
        let why = match (&p.rule, &p.agent_reason) {
            (_, Some(reason)) => format!("the agent says: {reason}"),
            (Some(rule), None) => format!("rule {rule} asks"),
            (None, None) => p.why.clone(),
        };
        outln!(
            "{:<5} {:<22} {:<8} {:<7} {:<32} {:<24} {:<8} {why}",
            p.id,
            p.agent,
            p.pid.map_or_else(|| "-".into(), |x| x.to_string()),
            p.method,
            format!("{}:{}", p.host, p.port),
            p.path,
            left
        );
        if let Some(exe) = &p.exe {
            outln!("      exe {exe}");
        }
    }
}
