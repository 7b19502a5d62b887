//! Issue 17, part 4, against a real brokerd and the real kernel path: fairness, measured. One
//! agent floods, in turn, with thousands of half-open connections, a new-connection storm, h2
//! stream floods on many connections, and DNS floods; meanwhile another agent's calls (a DNS
//! query and an HTTPS GET on a new connection each) all succeed and their p99 stays within a
//! bound of its baseline, measured alone just before.
//!
//! The bounds are loose (p99 within 5x the baseline's plus 750 ms, p50 within 10x plus
//! 100 ms) because this runs on a small machine shared with other work, in a debug build, and
//! a p99 over a few seconds is one or two calls; without brokerd's defences an HTTP/2 stream
//! flood put the victim's p50 at 700 ms and a DNS flood lost its queries outright. The bench
//! row (`cargo xtask bench --only fairness`) measures the same in release against 2x. Each
//! flood must really have happened: the flooder reports what brokerd refused it, and brokerd's
//! share counters and audit records show its refusals.
//!
//! Both sides are the `fairness-load` binary of this package, run in the agents' cgroups.
//!
//! Needs root, cgroup v2 and BPF.
//!
//! Run as root: `cargo test -p agent-broker-tests --test fairness -- --test-threads=1`.

use std::{
    io::{BufRead as _, BufReader},
    process::{Child, Command, Stdio},
    time::Duration,
};

use agent_broker_tests::{
    spawn_in_cgroup, wait_with_timeout,
    world::{API, World, api_ip, rule},
};
use serde_json::Value;

/// The flooder's shares: small, so each flood is far past them.
const FLOODER_SHARES: &str = "[shares]\nconnections = 256\nnew_connections_per_second = 50\n\
                              pending_handshakes = 16\nrequests_in_flight = 32\n\
                              requests_per_second = 200\ndns_queries_per_second = 50\n";

/// How long the victim runs, alone and under each flood.
const VICTIM_SECONDS: u64 = 4;

/// How long a flood runs before the victim starts.
const SETTLE: Duration = Duration::from_secs(1);

fn world() -> World {
    let w = World::with_policies(|cg, api| {
        vec![
            (
                "agent".into(),
                format!(
                    "cgroup = \"{}\"\n{}",
                    cg.child("agent"),
                    rule(API, api.port(), true)
                ),
            ),
            (
                "flooder".into(),
                format!(
                    "cgroup = \"{}\"\n{}\n{FLOODER_SHARES}",
                    cg.child("flooder"),
                    rule(API, api.port(), true)
                ),
            ),
        ]
    });
    w.cg.create_child("agent");
    w.cg.create_child("flooder");
    w.broker.attach(w.cg.path());
    w
}

fn load_command(w: &World, mode: &str, args: &[String]) -> Command {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_fairness-load"));
    cmd.arg(mode)
        .args(args)
        .env("SSL_CERT_FILE", &w.broker_ca)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    cmd
}

fn target(w: &World) -> Vec<String> {
    vec![
        "--connect".into(),
        format!("{}:{}", api_ip(), w.api.port()),
        "--host".into(),
        API.into(),
        "--path".into(),
        "/hash".into(),
        "--header".into(),
        format!("authorization: Bearer {}", w.placeholder.expose()),
        "--resolver".into(),
        "127.0.0.53:53".into(),
    ]
}

fn report(out: &std::process::Output, what: &str) -> Value {
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{what} failed: {}\n{stdout}",
        String::from_utf8_lossy(&out.stderr)
    );
    let last = stdout.lines().last().unwrap_or_default();
    serde_json::from_str(last).unwrap_or_else(|e| panic!("no JSON from {what} ({e}): {stdout:?}"))
}

/// The victim's calls for [`VICTIM_SECONDS`]: its report.
fn victim(w: &World, what: &str) -> Value {
    let mut args = target(w);
    args.extend(["--seconds".into(), VICTIM_SECONDS.to_string()]);
    let child = spawn_in_cgroup(&w.agent, &mut load_command(w, "victim", &args));
    let out = wait_with_timeout(
        child,
        Duration::from_secs(VICTIM_SECONDS + 60),
        "the victim",
    );
    let r = report(&out, what);
    eprintln!("victim {what}: {r}");
    r
}

/// Starts a flood in the flooder's cgroup and returns once it says it is flooding.
fn start_flood(w: &World, mode: &str, extra: &[&str]) -> Child {
    let mut args = target(w);
    // The flood outlasts the victim's run, which starts once it has settled.
    args.extend(["--seconds".into(), (VICTIM_SECONDS + 3).to_string()]);
    args.extend(extra.iter().map(|s| s.to_string()));
    let mut child = spawn_in_cgroup(&w.cg.child("flooder"), &mut load_command(w, mode, &args));
    let mut line = String::new();
    let stdout = child.stdout.take().expect("stdout");
    let mut reader = BufReader::new(stdout);
    reader
        .read_line(&mut line)
        .expect("the flooder's first line");
    assert!(
        line.contains("\"flooding\":true"),
        "{mode}: the flooder did not start: {line:?}"
    );
    // Give the rest of its output back to the child's handle for wait_with_timeout.
    child.stdout = Some(reader.into_inner());
    // The victim measures the flood's steady state, not the flooder's start (its first burst
    // meets the shares' one-second bursts, and its own start-up competes for the CPU).
    std::thread::sleep(SETTLE);
    child
}

fn finish_flood(child: Child, mode: &str) -> Value {
    let out = wait_with_timeout(child, Duration::from_secs(VICTIM_SECONDS + 60), mode);
    let r = report(&out, mode);
    eprintln!("flood {mode}: {r}");
    r
}

fn n(v: &Value, path: &[&str]) -> u64 {
    let mut v = v;
    for p in path {
        v = &v[*p];
    }
    v.as_u64().unwrap_or(0)
}

fn ms(v: &Value, key: &str) -> f64 {
    v[key].as_f64().unwrap_or_else(|| panic!("no {key} in {v}"))
}

/// The flooder's refusals as `brokerctl status` counts them.
fn flooder_refused(w: &World) -> u64 {
    let flooder = w.cg.child("flooder");
    w.broker
        .status()
        .shares
        .iter()
        .find(|s| s.cgroup == flooder)
        .map_or(0, |s| s.refused)
}

#[test]
fn one_agent_flooding_in_every_way_leaves_another_served_within_its_latency_bound() {
    let w = world();
    let baseline = victim(&w, "alone");
    assert_eq!(n(&baseline, &["failures"]), 0, "alone: {baseline}");
    assert!(n(&baseline, &["calls"]) >= 5, "alone: {baseline}");
    let p99_bound = 5.0 * ms(&baseline, "p99_ms") + 750.0;
    let p50_bound = 10.0 * ms(&baseline, "p50_ms") + 100.0;

    let floods: [(&str, &[&str]); 4] = [
        ("half-open", &["--count", "3000"]),
        ("storm", &["--concurrency", "64"]),
        ("h2-flood", &["--connections", "8", "--streams", "100"]),
        ("dns-flood", &[]),
    ];
    let mut summary = Vec::new();
    for (mode, extra) in floods {
        let refused_before = flooder_refused(&w);
        let paced_before = w.broker.status().counters.connect_paced;
        let flood = start_flood(&w, mode, extra);
        let during = victim(&w, mode);
        let flooded = finish_flood(flood, mode);
        let refused = flooder_refused(&w) - refused_before;
        summary.push(format!(
            "{mode}: victim p99 {:.1} ms (alone {:.1} ms), flooder refused {refused}",
            ms(&during, "p99_ms"),
            ms(&baseline, "p99_ms")
        ));

        // Every one of the victim's calls succeeded, and in time.
        assert_eq!(n(&during, &["failures"]), 0, "{mode}: {during}");
        assert!(n(&during, &["calls"]) >= 3, "{mode}: {during}");
        assert!(
            ms(&during, "p99_ms") <= p99_bound,
            "{mode}: the victim's p99 {} ms is past {p99_bound:.0} ms (5x its p99 alone, {} ms, \
             plus 750 ms): {during}",
            ms(&during, "p99_ms"),
            ms(&baseline, "p99_ms")
        );
        assert!(
            ms(&during, "p50_ms") <= p50_bound,
            "{mode}: the victim's p50 {} ms is past {p50_bound:.0} ms (10x its p50 alone, {} \
             ms, plus 100 ms): {during}",
            ms(&during, "p50_ms"),
            ms(&baseline, "p50_ms")
        );

        // The flood happened, and brokerd refused it.
        match mode {
            "half-open" => {
                assert!(n(&flooded, &["opened"]) >= 1000, "{flooded}");
                // Only its pending handshakes stay open; brokerd closed the rest.
                assert!(n(&flooded, &["still_open"]) <= 16, "{flooded}");
                assert!(refused >= 500, "{mode}: {refused} refusals counted");
            }
            "storm" => {
                assert!(n(&flooded, &["closed_by_broker"]) >= 200, "{flooded}");
                assert!(refused >= 200, "{mode}: {refused} refusals counted");
                // Past the kernel's pace (2048 a second from one cgroup) its connects failed
                // before reaching brokerd at all.
                assert!(n(&flooded, &["connect_failed"]) >= 1000, "{flooded}");
                let paced = w.broker.status().counters.connect_paced - paced_before;
                assert!(
                    paced >= 1000,
                    "{mode}: {paced} connects paced in the kernel"
                );
            }
            "h2-flood" => {
                assert!(n(&flooded, &["statuses", "429"]) >= 100, "{flooded}");
                assert!(refused >= 100, "{mode}: {refused} refusals counted");
            }
            "dns-flood" => {
                assert!(n(&flooded, &["codes", "5"]) >= 500, "{flooded}");
                assert!(refused >= 500, "{mode}: {refused} refusals counted");
            }
            _ => unreachable!(),
        }
    }
    eprintln!("{}", summary.join("\n"));

    // The refusals are in the audit log, named by share.
    let flooder = w.cg.child("flooder");
    let records = w.broker.audit_records();
    for share in [
        "shares.new_connections_per_second",
        "shares.pending_handshakes",
        "shares.dns_queries_per_second",
    ] {
        assert!(
            records
                .iter()
                .any(|r| r.cgroup.as_deref() == Some(flooder.as_str())
                    && r.reason.as_deref().is_some_and(|s| s.contains(share))),
            "no refusal of the flooder naming {share}"
        );
    }
    // None of the victim's.
    assert!(
        !records
            .iter()
            .any(|r| r.cgroup.as_deref() == Some(w.agent.as_str())
                && r.reason.as_deref().is_some_and(|s| s.contains("shares."))),
        "the victim was refused for a share"
    );
}
