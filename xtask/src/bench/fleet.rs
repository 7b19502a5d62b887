//! Issue 18's rows at fleet scale, each brokerd against nginx in the same run:
//!
//! - **fleet**: 100 agents, each holding 10 keep-alive connections, with 1,000 rules in the
//!   policy. Each agent is a cgroup of its own below `agents/bench-fleet`, tagged on its own by
//!   `brokerctl run --create` as an agent started that way would be, so brokerd knows 100
//!   agents (100 tags, 100 sets of shares, 100 names in the audit log). One policy file for
//!   `agents/bench-fleet` governs them all: 999 rules for other hosts and the origin's, in the
//!   middle. nginx gets the same 1,000 destinations as a `map` from the request's host to the
//!   Authorization value it sets, refusing a host not in it: one lookup per request in a
//!   1,000-entry table, as brokerd's policy is.
//! - **manyidle**: 9,900 idle TLS connections (one request each, then nothing: `idle.py`) held
//!   open through the proxy while 100 keep-alive connections (wrk) load it; the idle ones must
//!   still be open afterwards.
//!
//! The fleet's load is 100 client processes ([`client`], `xtask bench-fleet-client` from the
//! release build: one thread, 10 keep-alive connections each, as `wrk -t1 -c10`), every one
//! started in its agent's cgroup (`brokerctl run`) so its connections are that agent's. Each
//! opens its connections and makes one request on each, then waits at a gate until all 100
//! are ready, so they run the same seconds, and prints its whole latency histogram. Requests
//! per second are the sum over the processes (each over its own, common, seconds), and the
//! latency percentiles are those of the merged histograms: every request counts once, as if
//! one client had made them all, rather than a worst or an average of 100 p99s.

mod client;

pub use client::{ClientOptions, run as run_client};

use std::{
    collections::BTreeMap,
    fs,
    io::{BufRead as _, BufReader, Read as _, Write as _},
    os::unix::process::CommandExt as _,
    path::Path,
    process::{Child, Stdio},
    sync::mpsc,
    thread,
    time::{Duration, Instant},
};

use anyhow::{Context as _, Result, bail};
use nix::{
    sys::signal::{Signal, killpg},
    unistd::Pid,
};

use super::{
    clients,
    lab::{self, Lab, Route},
    load::{self, Endpoint, WrkResult, WrkRun},
    report::{
        Better::{Higher, Lower},
        Cell, Column, Row,
        Target::NoWorseThanNginx,
    },
    stopping,
    workloads::{Settings, each_column, fill, measured, thousands},
};
use crate::cmd;

/// The cgroup the fleet's agents are created below (not itself tagged).
pub const FLEET_PARENT: &str = "agents/bench-fleet";
/// Agents in the fleet row.
const AGENTS: usize = 100;
/// Keep-alive connections each agent holds.
const CONNECTIONS_PER_AGENT: u32 = 10;
/// Rules in the policy brokerd loads for the fleet, and entries in nginx's map.
const RULES: usize = 1_000;
/// The idle connections of the many-connections row.
const IDLE_CONNECTIONS: u32 = 9_900;
/// The active (keep-alive, loaded) connections of the many-connections row.
const ACTIVE_CONNECTIONS: u32 = 100;
/// The line each agent's client prints when it waits at the gate.
const READY: &str = "fleet-ready";
/// The line that carries an agent's counts: `fleet-summary <requests> <failures> <seconds>`.
const SUMMARY: &str = "fleet-summary";
/// The line that carries an agent's latency histogram: `fleet-latency <µs>:<count> ...`.
const LATENCY: &str = "fleet-latency";
/// The request every agent makes, as in the other rows.
const PATH: &str = "/v1/whoami";

/// The cgroup of agent `index` of the fleet.
pub fn agent_cgroup(index: usize) -> String {
    format!("{FLEET_PARENT}/a{index:03}")
}

/// The hosts of the fleet's 1,000 destinations, `real` (the origin as its clients name it) in
/// the middle: the others are exact names (`apiN.fleet.test`) and, one in four, wildcards
/// (`*.svcN.fleet.test`), none of which any request goes to.
pub fn fleet_hosts(real: &str) -> Vec<String> {
    let others = (0..RULES - 1).map(|i| {
        if i % 4 == 0 {
            format!("*.svc{i}.fleet.test")
        } else {
            format!("api{i}.fleet.test")
        }
    });
    let mut hosts: Vec<String> = others.collect();
    hosts.insert(RULES / 2, real.to_owned());
    hosts
}

/// brokerd's policy for the fleet's agents (every cgroup below `cgroup`): the bench agent's
/// shares and 1,000 rules that each inject the key, the origin's (by address, on
/// `origin_port`) among them; the others on port 443.
pub fn policy(cgroup: &str, origin_real_host: &str, origin_port: u16) -> String {
    let mut text = format!(
        "# Written by cargo xtask bench (the fleet row).\ncgroup = \"{cgroup}\"\n{}",
        lab::AGENT_SHARES
    );
    for host in fleet_hosts(origin_real_host) {
        let port = if host == origin_real_host {
            origin_port
        } else {
            443
        };
        text.push_str(&lab::injecting_rule(&host, port));
    }
    text
}

/// The fleet row and the many-connections row, as `--only` asked.
pub fn rows(lab: &Lab, settings: &Settings) -> Result<Vec<Row>> {
    let mut rows = Vec::new();
    if settings.wanted("fleet") {
        rows.extend(fleet(lab, settings)?);
    }
    if settings.wanted("manyidle") {
        rows.extend(many_idle(lab, settings)?);
    }
    Ok(rows)
}

fn fleet(lab: &Lab, settings: &Settings) -> Result<Vec<Row>> {
    let what = format!(
        "{AGENTS} agents x {CONNECTIONS_PER_AGENT} keep-alive connections, {} rules",
        thousands(RULES as u32)
    );
    let client = lab.program("xtask");
    let columns = [Column::Direct, Column::Brokerd, Column::Nginx];
    let samples = each_column(&what, lab, Route::Fleet, &columns, |column, endpoint| {
        let endpoints: Vec<Endpoint> = (0..AGENTS)
            .map(|i| match column {
                Column::Brokerd => Endpoint {
                    launch: lab.agent_launch(&agent_cgroup(i)),
                    ..endpoint.clone()
                },
                _ => endpoint.clone(),
            })
            .collect();
        let overflows_before = listen_overflows();
        let load = load_fleet(&client, &endpoints, settings.duration);
        let overflows = listen_overflows()
            .zip(overflows_before)
            .map(|(after, before)| after.saturating_sub(before));
        if column == Column::Brokerd {
            lab.remove_fleet_agents();
        }
        if let Ok(load) = &load {
            eprintln!(
                "bench: {what}: {}: {} agents made {} requests, p50 {} µs over all of them; \
                 accept queues overflowed {} times meanwhile (machine-wide)",
                column.name(),
                load.agents,
                load.requests,
                load.p50_us,
                overflows.map_or_else(|| "?".to_owned(), |n| n.to_string()),
            );
        }
        load
    })?;
    let not_measured = Cell::NotMeasured(format!(
        "not at {} connections: opening that many through it takes minutes",
        thousands(AGENTS as u32 * CONNECTIONS_PER_AGENT)
    ));
    let mut rate = fill(
        Row::new(what.clone(), "req/s", Higher).with_targets(&[NoWorseThanNginx]),
        &samples,
        |s: &FleetLoad| measured(s.requests_per_second, s.failures),
    );
    let mut p99 = fill(
        Row::new(format!("{what}: p99"), "µs", Lower).with_targets(&[NoWorseThanNginx]),
        &samples,
        |s: &FleetLoad| measured(s.p99_us, s.failures),
    );
    rate.set(Column::Mitmproxy, not_measured.clone());
    p99.set(Column::Mitmproxy, not_measured);
    Ok(vec![rate, p99])
}

/// How many times a connection found a listener's accept queue full, machine-wide
/// (`TcpExt: ListenOverflows` in /proc/net/netstat): the connection then waits for the
/// kernel to retry, a second or more, which would show in a row as the proxy's latency.
fn listen_overflows() -> Option<u64> {
    netstat_counter(
        &fs::read_to_string("/proc/net/netstat").ok()?,
        "TcpExt:",
        "ListenOverflows",
    )
}

/// A counter of /proc/net/netstat, whose groups are a line of names and a line of values.
fn netstat_counter(text: &str, group: &str, name: &str) -> Option<u64> {
    let mut lines = text.lines().filter(|line| line.starts_with(group));
    let names = lines.next()?;
    let values = lines.next()?;
    let index = names.split_whitespace().position(|n| n == name)?;
    values.split_whitespace().nth(index)?.parse().ok()
}

/// Runs one client per endpoint (each in its own process group), opens the gate once all are
/// ready, and merges what they report.
fn load_fleet(client: &Path, endpoints: &[Endpoint], duration: Duration) -> Result<FleetLoad> {
    let (ready_tx, ready_rx) = mpsc::channel();
    let mut agents = Running(Vec::new());
    for (index, endpoint) in endpoints.iter().enumerate() {
        if stopping() {
            bail!("interrupted");
        }
        let mut command = endpoint.launch.command(client);
        command
            .arg("bench-fleet-client")
            .arg("--connect")
            .arg(endpoint.addr.to_string())
            .arg("--connections")
            .arg(CONNECTIONS_PER_AGENT.to_string())
            .arg("--seconds")
            .arg(duration.as_secs().to_string())
            .arg("--path")
            .arg(PATH)
            .arg("--authorization")
            .arg(&endpoint.authorization)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .process_group(0);
        if index == 0 {
            cmd::echo(&command);
            eprintln!("bench: ... and {} more like it", endpoints.len() - 1);
        }
        let mut child = command
            .spawn()
            .with_context(|| format!("starting agent {index}'s client"))?;
        let stdout = child
            .stdout
            .take()
            .context("the client's stdout is not piped")?;
        let stderr = child
            .stderr
            .take()
            .context("the client's stderr is not piped")?;
        let ready_tx = ready_tx.clone();
        let stdout = thread::spawn(move || {
            let mut text = String::new();
            let mut reader = BufReader::new(stdout);
            let mut line = String::new();
            let mut gated = false;
            while reader.read_line(&mut line).is_ok_and(|n| n > 0) {
                if !gated && line.trim() == READY {
                    gated = true;
                    let _ = ready_tx.send((index, true));
                } else {
                    text.push_str(&line);
                }
                line.clear();
            }
            if !gated {
                let _ = ready_tx.send((index, false));
            }
            text
        });
        let stderr = thread::spawn(move || {
            let mut text = String::new();
            let _ = BufReader::new(stderr).read_to_string(&mut text);
            text
        });
        agents.0.push(Agent {
            child,
            stdout: Some(stdout),
            stderr: Some(stderr),
        });
    }
    drop(ready_tx);

    // Every agent's client started (through brokerctl run, which tags its cgroup first), opened
    // its connections and waits.
    let give_up = Instant::now() + Duration::from_secs(180);
    let mut ready = 0;
    while ready < endpoints.len() {
        match ready_rx.recv_timeout(Duration::from_millis(200)) {
            Ok((_, true)) => ready += 1,
            Ok((index, false)) => {
                let agent = &mut agents.0[index];
                let status = agent.child.wait()?;
                let stderr = agent.stderr_text();
                bail!(
                    "agent {index}'s client ended ({status}) before it was ready: {}",
                    tail(&stderr)
                );
            }
            Err(mpsc::RecvTimeoutError::Disconnected) => bail!("the agents' output readers ended"),
            Err(mpsc::RecvTimeoutError::Timeout) if stopping() => bail!("interrupted"),
            Err(mpsc::RecvTimeoutError::Timeout) if Instant::now() > give_up => {
                bail!(
                    "only {ready} of {} agents were ready within 180 s",
                    endpoints.len()
                )
            }
            Err(mpsc::RecvTimeoutError::Timeout) => {}
        }
    }
    for agent in &mut agents.0 {
        if let Some(mut stdin) = agent.child.stdin.take() {
            stdin
                .write_all(b"go\n")
                .context("opening an agent's gate")?;
        }
    }

    let give_up = Instant::now() + duration + Duration::from_secs(60);
    let mut runs = Vec::with_capacity(endpoints.len());
    for (index, agent) in agents.0.iter_mut().enumerate() {
        let status = loop {
            if let Some(status) = agent.child.try_wait()? {
                break status;
            }
            if stopping() {
                bail!("interrupted");
            }
            if Instant::now() > give_up {
                bail!("agent {index}'s client did not finish in time");
            }
            thread::sleep(Duration::from_millis(20));
        };
        let stdout = agent.stdout.take().map(|t| t.join().unwrap_or_default());
        let stdout = stdout.unwrap_or_default();
        if !status.success() {
            bail!(
                "agent {index}'s client failed ({status}): {}",
                tail(&agent.stderr_text())
            );
        }
        let line = |prefix: &str| {
            stdout
                .lines()
                .find_map(|line| line.strip_prefix(prefix))
                .with_context(|| format!("agent {index}'s client printed no {prefix} line"))
        };
        let summary = AgentSummary::parse(line(SUMMARY)?)?;
        let histogram = Histogram::parse(line(LATENCY)?)?;
        runs.push((summary, histogram));
    }
    Ok(FleetLoad::of(&runs))
}

/// One agent's client and the threads reading its output.
struct Agent {
    child: Child,
    stdout: Option<thread::JoinHandle<String>>,
    stderr: Option<thread::JoinHandle<String>>,
}

impl Agent {
    fn stderr_text(&mut self) -> String {
        self.stderr
            .take()
            .map(|t| t.join().unwrap_or_default())
            .unwrap_or_default()
    }
}

/// The agents' processes; any still running when this is dropped (an error, an interruption)
/// are killed with their process groups.
struct Running(Vec<Agent>);

impl Drop for Running {
    fn drop(&mut self) {
        for agent in &mut self.0 {
            if matches!(agent.child.try_wait(), Ok(None)) {
                if let Ok(pid) = i32::try_from(agent.child.id()) {
                    let _ = killpg(Pid::from_raw(pid), Signal::SIGKILL);
                }
                let _ = agent.child.wait();
            }
        }
    }
}

/// The last few lines of `text`, on one line.
fn tail(text: &str) -> String {
    let lines: Vec<&str> = text.lines().collect();
    lines[lines.len().saturating_sub(5)..].join(" | ")
}

/// What one agent's client counted.
#[derive(Debug, PartialEq)]
struct AgentSummary {
    requests: u64,
    failures: u64,
    seconds: f64,
}

impl AgentSummary {
    /// Reads `<requests> <failures> <seconds>`.
    fn parse(text: &str) -> Result<Self> {
        let words: Vec<&str> = text.split_whitespace().collect();
        let [requests, failures, seconds] = words.as_slice() else {
            bail!("not <requests> <failures> <seconds>: {text:?}");
        };
        Ok(Self {
            requests: requests.parse()?,
            failures: failures.parse()?,
            seconds: seconds.parse()?,
        })
    }
}

/// Latencies in µs and how many requests took each.
#[derive(Clone, Debug, Default, PartialEq)]
struct Histogram(BTreeMap<u64, u64>);

impl Histogram {
    /// Reads `<µs>:<count>` pairs separated by spaces.
    fn parse(text: &str) -> Result<Self> {
        let mut histogram = Self::default();
        for pair in text.split_whitespace() {
            let (value, count) = pair
                .split_once(':')
                .with_context(|| format!("not a <µs>:<count> pair: {pair:?}"))?;
            *histogram.0.entry(value.parse()?).or_default() += count.parse::<u64>()?;
        }
        Ok(histogram)
    }

    fn merge(&mut self, other: &Self) {
        for (value, count) in &other.0 {
            *self.0.entry(*value).or_default() += count;
        }
    }

    fn count(&self) -> u64 {
        self.0.values().sum()
    }

    /// The `p`th percentile by wrk's rule (the first latency whose cumulative count reaches
    /// `round(p / 100 * count + 0.5)`), as the other rows' p99s are wrk's.
    fn percentile(&self, p: f64) -> Option<u64> {
        let rank = ((p / 100.0) * self.count() as f64 + 0.5).round() as u64;
        let mut total = 0;
        self.0.iter().find_map(|(value, count)| {
            total += count;
            (total >= rank).then_some(*value)
        })
    }
}

/// What the fleet's client processes came to together.
#[derive(Debug)]
struct FleetLoad {
    agents: usize,
    requests: u64,
    /// The sum of each process's requests per second, over the same seconds.
    requests_per_second: f64,
    /// Percentiles of every request's latency, from the merged histograms.
    p50_us: f64,
    p99_us: f64,
    failures: u64,
}

impl FleetLoad {
    fn of(runs: &[(AgentSummary, Histogram)]) -> Self {
        let mut merged = Histogram::default();
        for (_, histogram) in runs {
            merged.merge(histogram);
        }
        let percentile = |p| merged.percentile(p).map_or(f64::NAN, |us| us as f64);
        Self {
            agents: runs.len(),
            requests: runs.iter().map(|(agent, _)| agent.requests).sum(),
            requests_per_second: runs
                .iter()
                .filter(|(agent, _)| agent.seconds > 0.0)
                .map(|(agent, _)| agent.requests as f64 / agent.seconds)
                .sum(),
            p50_us: percentile(50.0),
            p99_us: percentile(99.0),
            failures: runs.iter().map(|(agent, _)| agent.failures).sum(),
        }
    }
}

/// 9,900 idle connections held open through the proxy while 100 keep-alive connections load
/// it: the active ones' requests per second and p99.
fn many_idle(lab: &Lab, settings: &Settings) -> Result<Vec<Row>> {
    let total = IDLE_CONNECTIONS + ACTIVE_CONNECTIONS;
    let what = format!(
        "{} open connections, 1% active ({ACTIVE_CONNECTIONS} keep-alive)",
        thousands(total)
    );
    let mut rate = Row::new(what.clone(), "req/s", Higher).with_targets(&[NoWorseThanNginx]);
    let mut p99 = Row::new(format!("{what}: p99 of the active"), "µs", Lower)
        .with_targets(&[NoWorseThanNginx]);
    let columns = [Column::Brokerd, Column::Nginx];
    // Each connection takes a descriptor in the client and one in the proxy; keep a margin for
    // everything else either has open.
    if settings.open_files < u64::from(total) + 1_000 {
        let why = format!(
            "the open-files limit ({}) is too low for {total} connections",
            settings.open_files
        );
        for row in [&mut rate, &mut p99] {
            for column in columns {
                row.set(column, Cell::NotMeasured(why.clone()));
            }
        }
    } else {
        let run = WrkRun {
            connections: ACTIVE_CONNECTIONS,
            duration: settings.duration,
            new_connection_per_request: false,
        };
        let samples = each_column(&what, lab, Route::Local, &columns, |column, endpoint| {
            let mut idle = clients::IdleConnections::open(
                &settings.tools.python3,
                lab.dir(),
                endpoint,
                IDLE_CONNECTIONS,
            )?;
            if idle.held != IDLE_CONNECTIONS {
                let ceiling = match column {
                    Column::Brokerd => lab.proxy_pid(column).and_then(brokerd_ceiling),
                    _ => None,
                };
                bail!(
                    "idle.py opened {} of {IDLE_CONNECTIONS} idle connections ({} failed){}",
                    idle.held,
                    idle.failures,
                    ceiling.unwrap_or_default()
                );
            }
            let wrk = load::wrk(&settings.tools.wrk, endpoint, &run)?;
            let open = idle.still_open()?;
            if open < IDLE_CONNECTIONS {
                bail!(
                    "the proxy closed {} of the {IDLE_CONNECTIONS} idle connections while the \
                     active ones ran",
                    IDLE_CONNECTIONS - open
                );
            }
            Ok(wrk)
        })?;
        rate = fill(rate, &samples, |s: &WrkResult| {
            measured(s.requests_per_second, s.failures)
        });
        p99 = fill(p99, &samples, |s: &WrkResult| {
            measured(s.p99_us, s.failures)
        });
    }
    let direct = Cell::NotMeasured("no proxy holds the idle connections on the direct path".into());
    let mitmproxy = Cell::NotMeasured(format!(
        "not at {}: opening that many connections through it takes minutes",
        thousands(total)
    ));
    for row in [&mut rate, &mut p99] {
        row.set(Column::Direct, direct.clone());
        row.set(Column::Mitmproxy, mitmproxy.clone());
    }
    Ok(vec![rate, p99])
}

/// Why brokerd refused connections past some number: its connection ceiling, from its
/// open-files limit (`max_connections` in daemon/src/shares.rs: (RLIMIT_NOFILE - 256) / 2).
fn brokerd_ceiling(pid: u32) -> Option<String> {
    let limits = fs::read_to_string(format!("/proc/{pid}/limits")).ok()?;
    let nofile = open_files_limit(&limits)?;
    Some(format!(
        ": brokerd's open-files limit is {nofile}, so it serves at most ({nofile} - 256) / 2 = \
         {} connections at once",
        connection_ceiling(nofile)
    ))
}

/// The soft `Max open files` of a `/proc/<pid>/limits` text.
fn open_files_limit(limits: &str) -> Option<u64> {
    limits
        .lines()
        .find_map(|line| line.strip_prefix("Max open files"))?
        .split_whitespace()
        .next()?
        .parse()
        .ok()
}

/// brokerd's connection ceiling for an open-files limit (as `max_connections` computes it).
fn connection_ceiling(nofile: u64) -> u64 {
    (nofile.saturating_sub(256) / 2).max(16)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn agent(requests: u64, seconds: f64, failures: u64) -> AgentSummary {
        AgentSummary {
            requests,
            failures,
            seconds,
        }
    }

    #[test]
    fn reads_a_latency_histogram_and_takes_wrks_percentiles() -> Result<()> {
        // 100 requests: 1..=100 µs once each. wrk's rank for p99 is round(99 + 0.5) = 100.
        let text: Vec<String> = (1..=100).map(|us| format!("{us}:1")).collect();
        let histogram = Histogram::parse(&text.join(" "))?;
        assert_eq!(histogram.count(), 100);
        assert_eq!(histogram.percentile(99.0), Some(100));
        assert_eq!(histogram.percentile(50.0), Some(51));
        assert_eq!(Histogram::parse("120:3 120:2")?.0.get(&120), Some(&5));
        assert_eq!(Histogram::default().percentile(99.0), None);
        assert!(Histogram::parse("120").is_err());
        assert!(Histogram::parse("x:1").is_err());
        Ok(())
    }

    #[test]
    fn merges_the_agents_requests_rather_than_their_p99s() -> Result<()> {
        // One busy agent, fast (1,000 requests at 100 µs, 10 at 900 µs), and one idle agent,
        // slow (10 requests at 5,000 µs). Every request counts once: the pooled p99 is 900 µs,
        // not the slow agent's 5,000 (its worst) nor an average of the two p99s.
        let busy = Histogram::parse("100:1000 900:10")?;
        let slow = Histogram::parse("5000:10")?;
        let load = FleetLoad::of(&[(agent(1_010, 5.0, 0), busy), (agent(10, 5.0, 3), slow)]);
        assert_eq!(load.agents, 2);
        assert_eq!(load.requests, 1_020);
        assert!((load.requests_per_second - 204.0).abs() < 1e-9);
        assert_eq!(load.p99_us, 900.0);
        assert_eq!(load.p50_us, 100.0);
        assert_eq!(load.failures, 3);
        Ok(())
    }

    #[test]
    fn the_fleet_policy_has_1000_rules_and_the_origins_in_the_middle() {
        let policy = policy(FLEET_PARENT, "127.0.0.2", 9443);
        assert!(policy.contains("cgroup = \"agents/bench-fleet\"\n"));
        assert!(policy.contains("[shares]"));
        assert_eq!(policy.matches("[[allow]]").count(), RULES);
        assert_eq!(
            policy
                .matches("authorization = \"Bearer {secret:BENCH_KEY}\"")
                .count(),
            RULES
        );
        assert_eq!(
            policy
                .matches("host = \"127.0.0.2\"\nport = 9443\n")
                .count(),
            1
        );
        assert_eq!(policy.matches("port = 443\n").count(), RULES - 1);
        assert_eq!(policy.matches("host = \"*.svc").count(), 250);
        let hosts = fleet_hosts("127.0.0.1");
        assert_eq!(hosts.len(), RULES);
        assert_eq!(hosts[RULES / 2], "127.0.0.1");
        let mut unique = hosts.clone();
        unique.sort();
        unique.dedup();
        assert_eq!(unique.len(), RULES, "no host twice");
        // No fleet rule lets the key go to an address no resolver proves.
        assert!(!policy.contains("any_address"));
    }

    #[test]
    fn reads_an_agents_summary() -> Result<()> {
        assert_eq!(
            AgentSummary::parse(" 1200 3 5.000125")?,
            agent(1_200, 5.000_125, 3)
        );
        assert!(AgentSummary::parse("1200 3").is_err());
        assert!(AgentSummary::parse("1200 x 5.0").is_err());
        Ok(())
    }

    #[test]
    fn reads_a_netstat_counter() {
        let text = "TcpExt: SyncookiesSent ListenOverflows ListenDrops\nTcpExt: 0 7560 7561\n\
                    IpExt: InNoRoutes\nIpExt: 0\n";
        assert_eq!(
            netstat_counter(text, "TcpExt:", "ListenOverflows"),
            Some(7_560)
        );
        assert_eq!(netstat_counter(text, "TcpExt:", "Missing"), None);
        assert_eq!(netstat_counter(text, "MPTcpExt:", "ListenOverflows"), None);
    }

    #[test]
    fn names_each_agent_its_own_cgroup() {
        assert_eq!(agent_cgroup(7), "agents/bench-fleet/a007");
        let cgroups: std::collections::HashSet<String> = (0..AGENTS).map(agent_cgroup).collect();
        assert_eq!(cgroups.len(), AGENTS);
    }

    #[test]
    fn reads_brokerds_open_files_limit_and_ceiling() {
        let limits = "Limit                     Soft Limit           Hard Limit           Units     \n\
                      Max processes             7823                 7823                 processes \n\
                      Max open files            20000                20000                files     \n";
        assert_eq!(open_files_limit(limits), Some(20_000));
        assert_eq!(connection_ceiling(20_000), 9_872);
        assert_eq!(connection_ceiling(65_536), 32_640);
        assert_eq!(open_files_limit("Max processes 1 1 processes\n"), None);
    }
}
