//! `brokerctl logs`: print (and follow) the audit log, filtered by cgroup, denials and age, as
//! a table or JSON lines; `logs verify` checks its hash chain. Records name secrets, never hold
//! their values.

use std::{
    path::Path,
    time::{SystemTime, UNIX_EPOCH},
};

use agent_broker_core::cgroup::CgroupPath;
use agent_broker_protocol::{
    AuditEvent, EventKind, LogFilter, Request, RequestOutcome, Response, client::Client,
};
use anyhow::bail;

use crate::control::{call, refused, unexpected};

/// The audit log: every brokered call, denial, TLS failure, handle misuse, attach, detach
/// and policy reload. Secrets appear by name only.
#[derive(Debug, clap::Args)]
#[command(args_conflicts_with_subcommands = true)]
pub struct Args {
    #[command(subcommand)]
    command: Option<Command>,
    /// Keep printing new records as they are written.
    #[arg(long, short)]
    follow: bool,
    /// Only records of this agent and those below it: a cgroup path, or an agent name given
    /// with `attach --as`.
    #[arg(long, value_name = "PATH")]
    cgroup: Option<String>,
    /// Only denials and failures.
    #[arg(long)]
    denied: bool,
    /// Only records since TIME: RFC 3339 (2026-11-23T10:00:00Z) or an age (15m, 2h, 1d).
    #[arg(long, value_name = "TIME", value_parser = parse_since)]
    since: Option<u64>,
    /// At most the newest N stored records (0: all).
    #[arg(long, default_value_t = 0)]
    limit: usize,
    /// One JSON object per line, for shipping to other systems.
    #[arg(long)]
    json: bool,
}

#[derive(Debug, clap::Subcommand)]
enum Command {
    /// Check the hash chain; names the first record that was edited, removed or reordered.
    Verify,
}

/// `--since`: an RFC 3339 time or an age, as Unix milliseconds (clap value parser).
fn parse_since(s: &str) -> Result<u64, String> {
    let now = SystemTime::now();
    let at = match humantime::parse_rfc3339_weak(s) {
        Ok(t) => t,
        Err(_) => {
            let age = humantime::parse_duration(s)
                .map_err(|_| format!("invalid time {s:?}: give RFC 3339 or an age like 15m"))?;
            now.checked_sub(age).ok_or("that age reaches before 1970")?
        }
    };
    at.duration_since(UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .map_err(|_| "times before 1970 are not supported".into())
}

pub fn run(run_dir: &Path, args: Args) -> anyhow::Result<()> {
    if let Some(Command::Verify) = args.command {
        return verify(run_dir);
    }
    let cgroup = match &args.cgroup {
        Some(c) => Some(CgroupPath::parse(c)?.to_string()),
        None => None,
    };
    let request = Request::Logs {
        filter: LogFilter {
            cgroup,
            denied_only: args.denied,
            since_ms: args.since,
            limit: args.limit,
        },
        follow: args.follow,
    };
    // Not `control::call`: the answer is a stream of records, ended by EndOfLog unless
    // following.
    let mut client = Client::connect(run_dir)?;
    let mut response = client.call(&request)?;
    if !args.json {
        outln!(
            "{:<8} {:<12} {:<22} {:>7} {:<12} {:<6} {:<24} {:<24} {:>6} {:<12} DETAIL",
            "SEQ",
            "TIME",
            "AGENT",
            "PID",
            "COMM",
            "METHOD",
            "HOST",
            "PATH",
            "STATUS",
            "SECRETS"
        );
    }
    // Handshake refusals, summed up per agent and program under the table.
    let mut tls_refusals = Vec::new();
    loop {
        match response {
            Response::Event { event } if args.json => {
                outln!("{}", serde_json::to_string(&event)?)
            }
            Response::Event { event } => {
                print_event(&event);
                if event.kind == Some(EventKind::TlsFailure) {
                    tls_refusals.push(event);
                }
            }
            Response::EndOfLog if !args.follow => {
                out!("{}", tls_refusal_summary(&tls_refusals));
                return Ok(());
            }
            Response::EndOfLog => {}
            Response::Error { kind, message } => return Err(refused(kind, &message)),
            other => return Err(unexpected(other)),
        }
        response = client.next_streamed()?;
    }
}

/// `logs verify`.
fn verify(run_dir: &Path) -> anyhow::Result<()> {
    match call(run_dir, &Request::LogsVerify)? {
        Response::Verified { report } => match report.first_bad {
            None => {
                outln!("audit log intact: {} record(s) verified", report.records);
                Ok(())
            }
            Some(bad) => bail!(
                "audit log tampered: record {} {} ({} record(s) checked)",
                bad.seq,
                bad.problem,
                report.records
            ),
        },
        other => Err(unexpected(other)),
    }
}

/// Under the table: which agents' programs failed the TLS handshake, how often, and the fix.
/// Empty when none did.
fn tls_refusal_summary(events: &[AuditEvent]) -> String {
    let by_client = agent_broker_protocol::tls_refusals_by_client(events);
    if by_client.is_empty() {
        return String::new();
    }
    let mut out = String::from("\nTLS handshakes refused by agents' clients:\n");
    for ((agent, comm), n) in by_client {
        out.push_str(&format!("  {agent}: {comm} x{n}\n"));
    }
    out.push_str(&format!(
        "  they likely do not trust the broker CA; fix: {}\n",
        agent_broker_protocol::TLS_REFUSAL_FIX
    ));
    out
}

/// One record as a table row.
fn print_event(e: &AuditEvent) {
    let time = agent_broker_core::time::utc_hms_millis(e.time_ms);
    outln!(
        "{:<8} {:<12} {:<22} {:>7} {:<12} {:<6} {:<24} {:<24} {:>6} {:<12} {}",
        e.seq,
        time,
        e.cgroup.as_deref().unwrap_or("-"),
        e.pid.map(|p| p.to_string()).unwrap_or_else(|| "-".into()),
        e.comm.as_deref().unwrap_or("-"),
        e.method.as_deref().unwrap_or("-"),
        e.host.as_deref().unwrap_or("-"),
        e.path.as_deref().unwrap_or("-"),
        e.status
            .map(|s| s.to_string())
            .unwrap_or_else(|| "-".into()),
        if e.secrets.is_empty() {
            "-".to_string()
        } else {
            e.secrets.join(",")
        },
        detail(e)
    );
}

/// The DETAIL column: kind (and, for a forwarded request, how far it got unless it completed),
/// decision, reason or rule, and the LLM tokens charged.
fn detail(e: &AuditEvent) -> String {
    let mut kind = e.kind.map(|k| k.to_string()).unwrap_or_default();
    if let Some(outcome) = e.outcome.filter(|o| *o != RequestOutcome::Completed) {
        kind = format!("{kind} {outcome}");
    }
    let mut detail = match (&e.decision, &e.reason) {
        (Some(d), Some(r)) => format!("{kind} {d}: {r}"),
        (Some(d), None) => format!("{kind} {d} {}", e.rule.as_deref().unwrap_or("")),
        (None, Some(r)) => format!("{kind}: {r}"),
        (None, None) => kind,
    };
    if let Some(path) = &e.cgroup_path {
        detail.push_str(&format!("; cgroup {path}"));
    }
    if let Some(tokens) = e.tokens {
        detail.push_str(&format!("; {tokens} tokens"));
        if let Some(how) = &e.tokens_estimated {
            detail.push_str(&format!(" estimated ({how})"));
        }
    }
    detail
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn handshake_refusals_are_summed_up_per_agent_and_program_with_the_fix() {
        assert_eq!(tls_refusal_summary(&[]), "");
        let tls = |cgroup: &str, comm: &str| AuditEvent {
            kind: Some(EventKind::TlsFailure),
            cgroup: Some(cgroup.into()),
            comm: Some(comm.into()),
            ..AuditEvent::default()
        };
        let summary = tls_refusal_summary(&[
            tls("agents/a", "bun"),
            tls("agents/b", "java"),
            tls("agents/a", "bun"),
        ]);
        assert!(
            summary.contains("  agents/a: bun x2\n  agents/b: java x1\n"),
            "{summary}"
        );
        assert!(
            summary.contains(agent_broker_protocol::TLS_REFUSAL_FIX),
            "{summary}"
        );
    }

    #[test]
    fn the_detail_says_how_far_a_request_got_and_what_it_was_charged() {
        let request = AuditEvent {
            kind: Some(EventKind::Request),
            decision: Some(agent_broker_protocol::Decision::Allow),
            rule: Some("a.toml allow[0]".into()),
            ..AuditEvent::default()
        };
        assert_eq!(detail(&request), "request allow a.toml allow[0]");
        let forwarded = AuditEvent {
            outcome: Some(RequestOutcome::Forwarded),
            ..request.clone()
        };
        assert_eq!(
            detail(&forwarded),
            "request forwarded allow a.toml allow[0]"
        );
        let completed = AuditEvent {
            outcome: Some(RequestOutcome::Completed),
            tokens: Some(42),
            ..request.clone()
        };
        assert_eq!(
            detail(&completed),
            "request allow a.toml allow[0]; 42 tokens"
        );
        let cancelled = AuditEvent {
            outcome: Some(RequestOutcome::Cancelled),
            reason: Some("the agent went away".into()),
            tokens: Some(9),
            tokens_estimated: Some("cut".into()),
            ..request
        };
        assert_eq!(
            detail(&cancelled),
            "request cancelled allow: the agent went away; 9 tokens estimated (cut)"
        );
    }

    #[test]
    fn since_takes_a_time_or_an_age() {
        assert_eq!(parse_since("1970-01-01T00:00:01Z"), Ok(1000));
        assert_eq!(parse_since("2026-11-23T10:00:00Z"), Ok(1_795_428_000_000));
        let now_ms = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .expect("clock after 1970")
            .as_millis() as u64;
        let ago = parse_since("15m").expect("an age");
        assert!(ago <= now_ms - 15 * 60 * 1000 && ago > now_ms - 16 * 60 * 1000);
        assert!(parse_since("yesterdayish").is_err());
        assert!(parse_since("99999999999d").is_err());
    }
}
