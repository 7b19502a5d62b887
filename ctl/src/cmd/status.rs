//! `brokerctl status`: whether brokerd is up, what it listens on, what the kernel side counted,
//! the policy it runs, the tagged cgroups, and a warning naming every process in them that
//! holds an inet socket made outside them.

use std::path::Path;

use agent_broker_protocol::{Request, Response, StatusReport};

use crate::control::{call, unexpected};
use crate::print::{date, json_pretty};

/// Whether brokerd is up, its listeners, and the tagged cgroups with their process counts.
#[derive(Debug, clap::Args)]
pub struct Args {
    /// Print the status as JSON.
    #[arg(long)]
    json: bool,
}

pub fn run(run_dir: &Path, args: Args) -> anyhow::Result<()> {
    match call(run_dir, &Request::Status)? {
        Response::Status(status) if args.json => json_pretty(&status),
        Response::Status(status) => {
            print_status(&status);
            Ok(())
        }
        other => Err(unexpected(other)),
    }
}

/// The kernel programs' counters (root mode).
fn print_counters(c: &agent_broker_protocol::Counters) {
    outln!(
        "kernel         {} redirected, {} refused, {} not re-keyed",
        c.redirected,
        c.refused,
        c.rekey_failed
    );
    outln!(
        "               {} DNS redirected, {} UDP refused, {} sockets refused, {} binds refused",
        c.dns_redirected,
        c.udp_refused,
        c.socket_refused,
        c.bind_refused
    );
    outln!(
        "               {} egress and {} ingress packets dropped, {} from other netns refused",
        c.egress_dropped,
        c.ingress_dropped,
        c.netns_refused
    );
    outln!(
        "               {} connects refused past one cgroup's pace",
        c.connect_paced
    );
}

fn print_status(s: &StatusReport) {
    outln!("brokerd {} is up (pid {})", s.version, s.pid);
    let listeners: Vec<String> = s.listeners.iter().map(ToString::to_string).collect();
    outln!("listening on   {}", listeners.join(", "));
    if s.unprivileged {
        outln!(
            "mode           unprivileged: no eBPF, no tagged cgroups; agents are the sandboxes \
             of `brokerctl run --unprivileged`"
        );
    } else {
        outln!("cgroup2 mount  {}", s.cgroup_root);
        outln!("pin dir        {}", s.pin_dir);
    }
    if !s.dns_listeners.is_empty() {
        let dns: Vec<String> = s.dns_listeners.iter().map(ToString::to_string).collect();
        outln!("dns (udp)      {}", dns.join(", "));
    }
    if !s.hooks.is_empty() && !s.unprivileged {
        outln!("hooks          {}", s.hooks.join(" "));
    }
    if !s.lsm.is_empty() {
        outln!("bpf lsm        {}", s.lsm);
    }
    if !s.hardening.is_empty() {
        outln!("brokerd        {}", s.hardening);
    }
    for p in &s.unprotected {
        outln!(
            "unprotected    pid {} ({}) in {}: {}",
            p.pid,
            p.comm,
            p.cgroup,
            p.missing.join("; ")
        );
    }
    if !s.outside_sockets.is_empty() {
        outln!(
            "WARNING        processes in tagged cgroups hold inet sockets made outside them; no \
             hook redirects or filters those:"
        );
        for o in &s.outside_sockets {
            outln!(
                "  pid {} ({}) in {}: {}",
                o.pid,
                o.comm,
                o.cgroup,
                super::doctor::describe_outside_socket(o)
            );
        }
        outln!("  fix: {}", super::doctor::OUTSIDE_SOCKET_FIX);
    }
    if let Some(note) = &s.outside_sockets_note {
        outln!("socket scan    partial: {note}");
    }
    if !s.unprivileged {
        print_counters(&s.counters);
    }
    outln!(
        "policy         {} ({} file(s), loaded {})",
        s.policy.dir,
        s.policy.files,
        date(s.policy.loaded_unix)
    );
    if let Some(e) = &s.audit_error {
        outln!("audit error    the audit log cannot be written: {e}");
    }
    if s.audit_dropped > 0 {
        outln!(
            "audit dropped  {} records did not fit the queue",
            s.audit_dropped
        );
    }
    if let Some(e) = &s.policy.error {
        outln!("policy error   the newest files did not load, the previous policy is active: {e}");
    }
    let r = &s.runtime;
    outln!(
        "runtime        {} tasks, {} pooled upstream, {} cached leaves, {} answered names, {} audit queued, {:.1} MiB resident, {} fds",
        r.tasks,
        r.upstream_pool,
        r.leaf_cache,
        r.answered_names,
        r.audit_queue,
        r.rss_bytes as f64 / (1024.0 * 1024.0),
        r.open_fds
    );
    if s.max_connections > 0 {
        outln!(
            "connections    {} open, at most {} at once (from brokerd's file descriptor limit)",
            s.open_connections,
            s.max_connections
        );
    }
    if !s.shares.is_empty() {
        outln!(
            "{:<40} {:>13} {:>13} {:>13} {:>8} {:>8}",
            "AGENT SHARES (now/limit)",
            "CONNECTIONS",
            "HANDSHAKES",
            "REQUESTS",
            "REQ/S",
            "REFUSED"
        );
        for a in &s.shares {
            outln!(
                "{:<40} {:>13} {:>13} {:>13} {:>8} {:>8}",
                a.cgroup,
                format!("{}/{}", a.connections, a.connections_limit),
                format!("{}/{}", a.handshakes, a.handshakes_limit),
                format!("{}/{}", a.requests, a.requests_limit),
                a.requests_per_second_limit,
                a.refused
            );
        }
    }
    if !s.workloads.is_empty() {
        outln!(
            "{:<20} {:<30} {:<30} {:>8}  {:<10} LISTENERS",
            "WORKLOAD NETNS",
            "CGROUP",
            "TAG",
            "PID",
            "STATE"
        );
        for w in &s.workloads {
            let listeners: Vec<String> = w
                .listeners
                .iter()
                .chain(&w.dns_listeners)
                .map(|a| a.to_string())
                .collect();
            outln!(
                "{:<20} {:<30} {:<30} {:>8}  {:<10} {}",
                w.netns_cookie,
                w.cgroup,
                w.tag,
                w.pid,
                w.state,
                listeners.join(" ")
            );
        }
    }
    if s.unprivileged {
        if s.workloads.is_empty() {
            outln!("no sandboxes");
        }
        return;
    }
    if s.cgroups.is_empty() {
        outln!("no tagged cgroups");
        return;
    }
    outln!(
        "{:<40} {:>10} {:>10} {:>6}  {}",
        "AGENT",
        "ID",
        "PROCESSES",
        "LINKS",
        "TAGGED CGROUP"
    );
    for c in &s.cgroups {
        outln!(
            "{:<40} {:>10} {:>10} {:>6}  {}",
            c.name.as_deref().unwrap_or(&c.path),
            c.id,
            c.processes,
            c.links,
            c.path
        );
    }
}
