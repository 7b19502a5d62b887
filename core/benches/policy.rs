//! Micro-benchmark of the policy decision at 1,000 rules across 100 agents (target p99 ≤ 5 µs),
//! for `cargo xtask bench`.
//!
//! Prints `bench-metric NAME VALUE` lines that xtask reads. Run:
//! `cargo bench -p agent-broker-core --bench policy`.

use std::{
    hint::black_box,
    time::{Duration, Instant},
};

use agent_broker_core::policy::bench_policy;

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

fn main() -> Result<(), Box<dyn std::error::Error>> {
    policy_decisions()
}
