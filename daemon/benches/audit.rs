//! Micro-benchmark of the CPU a request spends handing its audit record to the writer (target
//! ≤ 2 µs), for `cargo xtask bench`.
//!
//! Prints a `bench-metric NAME VALUE` line that xtask reads. Run:
//! `cargo bench -p agent-broker --bench audit`.

use std::time::Instant;

use agent_broker::AuditLog;
use agent_broker_protocol::{AuditEvent, Decision, EventKind};

fn audit_record_cost() -> Result<(), Box<dyn std::error::Error>> {
    let dir = tempfile::tempdir()?;
    let (audit, writer) = AuditLog::open(dir.path(), Default::default())?.writer()?;
    let event = AuditEvent {
        time_ms: 1,
        kind: Some(EventKind::Request),
        cgroup: Some("agents/bench".into()),
        pid: Some(1),
        comm: Some("bench".into()),
        method: Some("GET".into()),
        host: Some("api.example.test".into()),
        path: Some("/v1/models".into()),
        status: Some(200),
        decision: Some(Decision::Allow),
        rule: Some("policies/bench.toml:3 allow[0]".into()),
        secrets: vec!["BENCH_KEY".into()],
        ..AuditEvent::default()
    };
    // The request path builds its event anyway; what it pays for the audit log is the hand-off.
    let n = 50_000u32;
    let built: Vec<AuditEvent> = (0..n).map(|_| event.clone()).collect();
    let start = Instant::now();
    for e in built {
        audit.record(e);
    }
    let per = start.elapsed() / n;
    audit.flush_and_stop()?;
    let _ = writer.join();
    println!(
        "bench-metric audit_cpu_us_per_request {:.3}",
        per.as_secs_f64() * 1e6
    );
    Ok(())
}

fn main() -> Result<(), Box<dyn std::error::Error>> {
    audit_record_cost()
}
