//! The protocol attacker of issue 17.2 (`attacker.py`, standard-library python3): raw HTTP/2
//! frames and raw HTTP/1.1 bytes over TLS, from inside an agent cgroup, so the kernel redirects
//! its connection to brokerd as it does any agent's. It prints one JSON report of what came
//! back (see the script); [`run`] returns it, [`spawn`] leaves it running for the test to
//! sample brokerd meanwhile.
//!
//! Also here: [`Gauges`], brokerd's runtime gauges (`brokerctl status`), sampled before and
//! during an attack, so each test can assert brokerd's memory and task count stay bounded.

use std::{
    net::SocketAddr,
    path::Path,
    process::{Child, Command, Stdio},
    time::{Duration, Instant},
};

use agent_broker_protocol::{AuditEvent, EventKind, RequestOutcome};

use crate::{
    Broker,
    agent::agent_python,
    clients, spawn_in_cgroup, wait_with_timeout,
    world::{API, World, api_ip, rule},
};

/// The attacker script, run with `python3 -c`.
pub const ATTACKER_PY: &str = include_str!("attacker.py");

/// Starts `attack` from cgroup `rel` against `target` (an address the kernel redirects to
/// brokerd), TLS with `sni`, trusting `ca`; `args` are the script's `KEY=VALUE` options.
pub fn spawn(
    rel: &str,
    attack: &str,
    target: SocketAddr,
    sni: &str,
    ca: &Path,
    args: &[&str],
) -> Child {
    let mut cmd = Command::new(agent_python());
    cmd.arg("-c")
        .arg(ATTACKER_PY)
        .arg(attack)
        .arg(target.ip().to_string())
        .arg(target.port().to_string())
        .arg(ca)
        .arg(sni)
        .args(args)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    spawn_in_cgroup(rel, &mut cmd)
}

/// Waits for an attacker [`spawn`] started and returns its report; panics with its stderr
/// when it fails or prints no JSON.
pub fn report(child: Child, attack: &str, timeout: Duration) -> serde_json::Value {
    let out = wait_with_timeout(child, timeout, attack);
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "attacker {attack} failed ({}): {}\n{stdout}",
        out.status,
        String::from_utf8_lossy(&out.stderr)
    );
    let line = stdout.lines().last().unwrap_or_default();
    serde_json::from_str(line).unwrap_or_else(|e| {
        panic!(
            "attacker {attack} printed no report ({e}): {stdout}\n{}",
            String::from_utf8_lossy(&out.stderr)
        )
    })
}

/// [`spawn`], then [`report`]: the attack's report, with brokerd's gauges sampled every
/// 100 ms while it ran.
pub fn run(
    broker: &Broker,
    rel: &str,
    attack: &str,
    target: SocketAddr,
    sni: &str,
    ca: &Path,
    args: &[&str],
) -> (serde_json::Value, Gauges) {
    let mut child = spawn(rel, attack, target, sni, ca, args);
    let mut peak = Gauges::now(broker);
    let deadline = Instant::now() + Duration::from_secs(60);
    while matches!(child.try_wait(), Ok(None)) && Instant::now() < deadline {
        peak = peak.max(Gauges::now(broker));
        std::thread::sleep(Duration::from_millis(100));
    }
    let report = report(child, attack, Duration::from_secs(10));
    (report, peak.max(Gauges::now(broker)))
}

/// brokerd's resident memory and live tasks (`brokerctl status`, its runtime gauges).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Gauges {
    pub rss_bytes: u64,
    pub tasks: u64,
    pub answered_names: u64,
}

impl Gauges {
    pub fn now(broker: &Broker) -> Self {
        let runtime = broker.status().runtime;
        Self {
            rss_bytes: runtime.rss_bytes,
            tasks: runtime.tasks,
            answered_names: runtime.answered_names,
        }
    }

    /// The larger of each gauge.
    pub fn max(self, other: Self) -> Self {
        Self {
            rss_bytes: self.rss_bytes.max(other.rss_bytes),
            tasks: self.tasks.max(other.tasks),
            answered_names: self.answered_names.max(other.answered_names),
        }
    }

    /// Panics unless `peak` stayed within `rss_growth` bytes and `task_growth` tasks of
    /// `self` (the gauges before the attack); `what` names the attack.
    pub fn assert_bounded(&self, peak: &Self, rss_growth: u64, task_growth: u64, what: &str) {
        assert!(
            peak.rss_bytes <= self.rss_bytes + rss_growth,
            "{what}: brokerd's RSS grew from {} to {} bytes (bound: +{rss_growth})",
            self.rss_bytes,
            peak.rss_bytes
        );
        assert!(
            peak.tasks <= self.tasks + task_growth,
            "{what}: brokerd's tasks grew from {} to {} (bound: +{task_growth})",
            self.tasks,
            peak.tasks
        );
    }
}

/// The world of the attack tests: [`World`] with two agents below the tagged test cgroup,
/// `<cg>/agent` (the victim) and `<cg>/attacker`, each allowed the test API with the key
/// injected; `attacker_rule` is appended to the attacker's rule (e.g. `idle_timeout = "2s"`).
/// `args` are brokerd's extra arguments.
pub fn world(args: &[&str], attacker_rule: &str) -> World {
    let w = World::with_broker_args(crate::TestCa::new("abtest upstream CA"), args, |cg, api| {
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
                "attacker".into(),
                format!(
                    "cgroup = \"{}\"\n{}{attacker_rule}\n",
                    cg.child("attacker"),
                    rule(API, api.port(), true)
                ),
            ),
        ]
    });
    w.cg.create_child("agent");
    w.cg.create_child("attacker");
    w.broker.attach(w.cg.path());
    w
}

/// The address agents dial for the test API (the kernel redirects it to brokerd).
pub fn target(w: &World) -> SocketAddr {
    SocketAddr::new(api_ip(), w.api.port())
}

/// The attacker's cgroup in [`world`].
pub fn attacker_cgroup(w: &World) -> String {
    w.cg.child("attacker")
}

/// The victim's call (curl, inside `<cg>/agent`) gets its key injected: brokerd serves the
/// other agents during and after an attack.
pub fn assert_victim_served(w: &World, what: &str) {
    let (run, report) = clients::curl(&w.broker, &w.agent, &w.trust(), &w.call("/hash"));
    assert_eq!(
        report.status,
        200,
        "{what}: the victim was not served: {}\n{}",
        report.show(),
        run.show()
    );
    assert_eq!(
        report.json()["authorization_sha256"].as_str(),
        Some(w.injected_hash().as_str()),
        "{what}: the victim's key was not injected"
    );
    run.assert_no_secret(&w.secret);
}

/// The sequence number of the newest audit record (0 when there is none).
pub fn last_seq(broker: &Broker) -> u64 {
    broker
        .audit_records()
        .iter()
        .map(|r| r.seq)
        .max()
        .unwrap_or(0)
}

/// The first record of `cgroup` after `after` (a [`last_seq`]) whose reason contains
/// `reason` (empty: the record of how one of its requests ended, or of a DNS query, for an
/// attack brokerd answered as requests), waiting for it (a summed burst is written within a second or two); panics
/// naming `what` with the records there are.
pub fn wait_reason(
    broker: &Broker,
    cgroup: &str,
    after: u64,
    reason: &str,
    what: &str,
) -> AuditEvent {
    let found = crate::poll_until(Duration::from_secs(10), || {
        broker.audit_records().into_iter().find(|r| {
            r.seq > after
                && r.cgroup.as_deref() == Some(cgroup)
                && if reason.is_empty() {
                    r.outcome.is_some_and(|o| o != RequestOutcome::Forwarded)
                        || r.kind == Some(EventKind::Dns)
                } else {
                    r.reason.as_deref().is_some_and(|s| s.contains(reason))
                }
        })
    });
    found.unwrap_or_else(|| {
        let records: Vec<_> = broker
            .audit_records()
            .into_iter()
            .filter(|r| r.seq > after)
            .map(|r| format!("{:?} {:?} {:?} {:?}", r.kind, r.cgroup, r.status, r.reason))
            .collect();
        panic!("{what}: no record of {cgroup} with a reason containing {reason:?}; records since: {records:#?}")
    })
}

/// How many tasks brokerd may add during one attack: a few per request the limits let in (100
/// streams of one HTTP/2 connection at most), far below what a flood of thousands of streams,
/// frames or connections would make if it were not bounded. Measured: 100 admitted h2 streams
/// to an h2 upstream add 405 (hyper's stream task, and for each upstream connection the pool
/// opens, its driver, hyper's connection task and the request body's pipe), so 5 a request.
pub const TASK_GROWTH: u64 = 500;

/// One attack with the four checks of issue 17.2: `check` judges the attacker's report (an
/// error or a bounded answer), brokerd's RSS and tasks stay within `rss_growth` and
/// [`TASK_GROWTH`] tasks of where they were, the victim's call made while the attack runs (and one after) is served,
/// and the audit log has a record of the attacker whose reason contains `reason`. Returns the
/// report and that record.
pub fn attack(
    w: &World,
    attack: &str,
    args: &[&str],
    rss_growth: u64,
    reason: &str,
    check: impl FnOnce(&serde_json::Value),
) -> (serde_json::Value, AuditEvent) {
    let attacker = attacker_cgroup(w);
    let before = Gauges::now(&w.broker);
    let seq = last_seq(&w.broker);
    let mut child = spawn(&attacker, attack, target(w), API, &w.broker_ca, args);
    let started = Instant::now();
    let mut peak = before;
    std::thread::scope(|s| {
        let victim = s.spawn(|| assert_victim_served(w, &format!("{attack}, during it")));
        while matches!(child.try_wait(), Ok(None)) {
            peak = peak.max(Gauges::now(&w.broker));
            assert!(
                started.elapsed() < Duration::from_secs(60),
                "{attack}: the attacker ran for a minute"
            );
            std::thread::sleep(Duration::from_millis(100));
        }
        if let Err(panic) = victim.join() {
            std::panic::resume_unwind(panic);
        }
    });
    let report = report(child, attack, Duration::from_secs(10));
    peak = peak.max(Gauges::now(&w.broker));
    check(&report);
    before.assert_bounded(&peak, rss_growth, TASK_GROWTH, attack);
    assert_victim_served(w, &format!("{attack}, after it"));
    let record = wait_reason(&w.broker, &attacker, seq, reason, attack);
    (report, record)
}
