//! Micro-benchmarks of the request path's pure parts, for `cargo xtask bench`:
//! the policy decision at 1,000 rules across 100 agents (target p99 ≤ 5 µs) and the CPU a
//! request spends handing its audit record to the writer (target ≤ 2 µs).
//!
//! Prints `bench-metric NAME VALUE` lines that xtask reads. Run:
//! `cargo bench -p agent-broker --bench decisions`.

use std::{
    hint::black_box,
    time::{Duration, Instant},
};

use agent_broker::{audit::AuditLog, policy::bench_policy};
use agent_broker_protocol::{AuditEvent, EventKind};

fn percentile(sorted: &[Duration], p: f64) -> Duration {
    let i = ((sorted.len() as f64 - 1.0) * p).round() as usize;
    sorted[i.min(sorted.len() - 1)]
}

fn policy_decisions() -> Result<(), Box<dyn std::error::Error>> {
    let (policy, requests) = bench_policy(1000, 100)?;
    // Warm up, then time each decision on its own.
    for r in requests.iter().cycle().take(20_000) {
        black_box(
            policy
                .decide_request(&r.cgroup, &r.request.info())
                .is_allow(),
        );
    }
    let mut samples = Vec::with_capacity(200_000);
    for r in requests.iter().cycle().take(200_000) {
        let info = r.request.info();
        let start = Instant::now();
        let allowed = black_box(policy.decide_request(&r.cgroup, &info).is_allow());
        samples.push(start.elapsed());
        assert_eq!(
            allowed, r.expect_allow,
            "the benchmark's requests must decide as built"
        );
    }
    samples.sort_unstable();
    let us = |d: Duration| d.as_secs_f64() * 1e6;
    println!(
        "policy decisions: {} requests over {} agents",
        samples.len(),
        100
    );
    println!(
        "bench-metric policy_decision_p50_us {:.3}",
        us(percentile(&samples, 0.50))
    );
    println!(
        "bench-metric policy_decision_p99_us {:.3}",
        us(percentile(&samples, 0.99))
    );
    Ok(())
}

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
        decision: Some("allow".into()),
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
    policy_decisions()?;
    audit_record_cost()
}
