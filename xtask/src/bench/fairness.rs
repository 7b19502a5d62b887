//! Issue 17's fairness rows: while one agent floods brokerd, another agent's calls must all
//! succeed with their p99 at most twice what it is alone.
//!
//! Both agents run `fairness-load` (tests/src/bin/fairness-load.rs, from the release build)
//! through `brokerctl run`: the bench agent (`agents/bench`) as the victim, each call a DNS query
//! for brokerd's own name (answered by brokerd, never forwarded) and a GET on a new TLS
//! connection to the origin through brokerd; the flooding agent (`agents/bench-flood`, default
//! shares) in turn with thousands of half-open connections, a new-connection storm, HTTP/2 stream
//! floods on many connections, and a DNS flood; last, for reference, an agent that calls nothing
//! and only burns CPU on as many threads as a flooder runs. The direct column holds the victim's p99 alone,
//! the brokerd column its p99 under the flood, so the target reads "at most 2x direct"; a failed
//! call marks the cell failed. What the flooder got (how much brokerd refused) is printed.

use std::{
    io::{BufRead as _, BufReader},
    path::Path,
    process::{Child, Stdio},
    time::Duration,
};

use anyhow::{Context as _, Result, bail};
use serde_json::Value;

use super::{
    lab::{FLOOD_CGROUP, Lab, Route},
    load::Launch,
    report::{Better::Lower, Cell, Column, Row, Target::TimesDirect},
    stopping,
    workloads::Settings,
};

/// The most the victim's p99 under a flood may be, as a multiple of its p99 alone.
const P99_TARGET: f64 = 2.0;

/// The floods, in the order they run: key, what the row calls it, extra arguments. The last is
/// no flood but the reference: an agent that only burns CPU on as many threads as a flooder
/// runs, so the table shows how much of a flood's cost is two agents sharing the machine's
/// CPUs rather than brokerd. Its row has no target.
const FLOODS: [(&str, &str, &[&str]); 5] = [
    (
        "half-open",
        "3000 half-open connections",
        &["--count", "3000"],
    ),
    (
        "storm",
        "a new-connection storm (128 at once)",
        &["--concurrency", "128"],
    ),
    (
        "h2-flood",
        "HTTP/2 stream floods (16 connections x 100 streams)",
        &["--connections", "16", "--streams", "100"],
    ),
    ("dns-flood", "a DNS flood", &[]),
    (
        "spin",
        "an agent burning 2 CPUs, no calls (reference: the machine's part)",
        &[],
    ),
];

/// The resolver address the agents send DNS to (redirected to brokerd, whatever it is).
const RESOLVER: &str = "127.0.0.53:53";

/// brokerd's own name: answered by brokerd itself, so no query leaves the machine.
const DNS_NAME: &str = "agent-broker.internal";

/// The fairness rows: one per flood.
pub fn rows(lab: &Lab, settings: &Settings) -> Result<Vec<Row>> {
    let endpoint = lab.endpoint(Column::Brokerd, Route::Local)?;
    let ca = lab.export_broker_ca()?;
    let program = lab.program("fairness-load");
    let seconds = settings.duration.as_secs().max(3);
    let target = vec![
        "--connect".to_owned(),
        endpoint.addr.to_string(),
        "--host".to_owned(),
        endpoint.addr.ip().to_string(),
        "--path".to_owned(),
        "/v1/whoami".to_owned(),
        "--header".to_owned(),
        format!("authorization: {}", endpoint.authorization),
        "--resolver".to_owned(),
        RESOLVER.to_owned(),
        "--dns-name".to_owned(),
        DNS_NAME.to_owned(),
    ];
    let victim_launch = endpoint.launch.clone();
    let flood_launch = lab.agent_launch(FLOOD_CGROUP);
    let run = Runner {
        program: &program,
        ca: &ca,
        target: &target,
    };

    eprintln!("bench: fairness: the victim alone ...");
    let alone = run.victim(&victim_launch, seconds)?;
    eprintln!("bench: fairness: the victim alone: {alone}");
    let (alone_p99, alone_failures) = p99_and_failures(&alone)?;

    let mut rows = Vec::new();
    for (key, what, extra) in FLOODS {
        if stopping() {
            bail!("interrupted");
        }
        let mut row = Row::new(
            format!("fairness: another agent's call p99 under {what} (direct: it alone)"),
            "ms",
            Lower,
        );
        if key != "spin" {
            row = row.with_targets(&[TimesDirect(P99_TARGET)]);
        }
        row.set(
            Column::Direct,
            Cell::Value {
                value: alone_p99,
                failures: alone_failures,
            },
        );
        eprintln!("bench: fairness: {what} ...");
        let flood = run.start_flood(&flood_launch, key, extra, seconds + 3)?;
        // The victim measures the flood's steady state, not the flooder's start.
        std::thread::sleep(Duration::from_secs(1));
        let during = run.victim(&victim_launch, seconds);
        let flooded = finish(flood, key);
        match (during, flooded) {
            (Ok(during), Ok(flooded)) => {
                eprintln!("bench: fairness: {what}: victim {during}, flooder {flooded}");
                let (p99, failures) = p99_and_failures(&during)?;
                row.set(
                    Column::Brokerd,
                    Cell::Value {
                        value: p99,
                        failures,
                    },
                );
            }
            (Err(e), _) | (_, Err(e)) => {
                row.set(Column::Brokerd, Cell::Failed(format!("{e:#}")));
            }
        }
        rows.push(row);
    }
    Ok(rows)
}

struct Runner<'a> {
    program: &'a Path,
    ca: &'a Path,
    target: &'a [String],
}

impl Runner<'_> {
    fn command(&self, launch: &Launch, mode: &str, seconds: u64) -> std::process::Command {
        let mut command = launch.command(self.program);
        command
            .arg(mode)
            .args(self.target)
            .args(["--seconds", &seconds.to_string()])
            .env("SSL_CERT_FILE", self.ca)
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped());
        command
    }

    fn victim(&self, launch: &Launch, seconds: u64) -> Result<Value> {
        let child = self
            .command(launch, "victim", seconds)
            .spawn()
            .context("starting the victim (fairness-load)")?;
        finish(child, "victim")
    }

    /// Starts a flood and returns once it says it is flooding.
    fn start_flood(
        &self,
        launch: &Launch,
        mode: &str,
        extra: &[&str],
        seconds: u64,
    ) -> Result<Child> {
        let mut child = self
            .command(launch, mode, seconds)
            .args(extra)
            .spawn()
            .with_context(|| format!("starting the {mode} flood (fairness-load)"))?;
        let stdout = child.stdout.take().context("the flooder's stdout")?;
        let mut reader = BufReader::new(stdout);
        let mut line = String::new();
        reader.read_line(&mut line)?;
        if !line.contains("\"flooding\":true") {
            let _ = child.kill();
            let _ = child.wait();
            bail!("the {mode} flood did not start: {line:?}");
        }
        child.stdout = Some(reader.into_inner());
        Ok(child)
    }
}

/// Waits for a fairness-load process (at most a minute past its run) and reads its report.
fn finish(mut child: Child, what: &str) -> Result<Value> {
    let deadline = std::time::Instant::now() + Duration::from_secs(90);
    loop {
        if child.try_wait()?.is_some() {
            break;
        }
        if std::time::Instant::now() > deadline {
            let _ = child.kill();
            let _ = child.wait();
            bail!("{what} did not finish in time");
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    let out = child.wait_with_output()?;
    let stdout = String::from_utf8_lossy(&out.stdout);
    if !out.status.success() {
        bail!(
            "{what} failed ({}): {}",
            out.status,
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    let last = stdout.lines().last().unwrap_or_default();
    serde_json::from_str(last).with_context(|| format!("{what}'s report: {stdout:?}"))
}

fn p99_and_failures(report: &Value) -> Result<(f64, u64)> {
    let p99 = report["p99_ms"]
        .as_f64()
        .with_context(|| format!("no p99_ms in {report}"))?;
    let failures = report["failures"].as_u64().unwrap_or(0);
    if report["calls"].as_u64().unwrap_or(0) == 0 {
        bail!("the victim made no call: {report}");
    }
    Ok((p99, failures))
}
