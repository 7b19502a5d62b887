//! The load generators: wrk for HTTP/1.1 and h2load for HTTP/2, each run against one column's
//! endpoint, and the readers of what they print. Neither checks certificates, which the bench does
//! not need: every endpoint is on loopback and each path's own verification (brokerd's and
//! nginx's, upstream) is part of what is measured.

use std::{
    net::SocketAddr,
    path::{Path, PathBuf},
    process::Command,
    time::Duration,
};

use anyhow::{Context as _, Result, bail};

use super::process;

/// How a client program is started: as it is, or inside the tagged agent cgroup through
/// `brokerctl run`, which moves itself into the cgroup and executes the program, or the same
/// inside a network namespace of its own (`nsenter --net`), as an agent in a container.
#[derive(Clone)]
pub enum Launch {
    Outside,
    InAgentCgroup {
        brokerctl: PathBuf,
        run_dir: PathBuf,
        cgroup: String,
    },
    InNetns {
        netns: String,
        brokerctl: PathBuf,
        run_dir: PathBuf,
        cgroup: String,
    },
    /// In a sandbox of `brokerctl run --unprivileged` (issue 19), started as `uid`, served by
    /// the unprivileged brokerd of `run_dir` as the agent `name`.
    Unprivileged {
        uid: u32,
        brokerctl: PathBuf,
        run_dir: PathBuf,
        name: String,
    },
}

impl Launch {
    /// The command that runs `program`; the caller appends the program's arguments.
    pub fn command(&self, program: &Path) -> Command {
        match self {
            Self::Outside => Command::new(program),
            Self::InAgentCgroup {
                brokerctl,
                run_dir,
                cgroup,
            } => {
                let mut command = Command::new(brokerctl);
                command
                    .arg("--run-dir")
                    .arg(run_dir)
                    .args(["run", "--cgroup", cgroup, "--create", "--"])
                    .arg(program);
                command
            }
            Self::InNetns {
                netns,
                brokerctl,
                run_dir,
                cgroup,
            } => {
                // nsenter, not `ip netns exec`: that also remounts /sys for the namespace, which
                // hides the cgroup2 mount brokerctl looks for.
                let mut command = Command::new("nsenter");
                command
                    .arg(format!("--net=/run/netns/{netns}"))
                    .arg("--")
                    .arg(brokerctl)
                    .arg("--run-dir")
                    .arg(run_dir)
                    .args(["run", "--cgroup", cgroup, "--create", "--"])
                    .arg(program);
                command
            }
            Self::Unprivileged {
                uid,
                brokerctl,
                run_dir,
                name,
            } => {
                let id = uid.to_string();
                let mut command = Command::new("setpriv");
                command
                    .args(["--reuid", &id, "--regid", &id, "--clear-groups", "--"])
                    .arg(brokerctl)
                    .arg("--run-dir")
                    .arg(run_dir)
                    .args(["run", "--unprivileged", "--as", name, "--"])
                    .arg(program);
                command
            }
        }
    }
}

/// Where one column's client sends its requests, and what it holds.
#[derive(Clone)]
pub struct Endpoint {
    pub addr: SocketAddr,
    /// The Authorization value the client sends: the real key on the direct path, a placeholder
    /// wherever a proxy writes the real one.
    pub authorization: String,
    pub launch: Launch,
}

impl Endpoint {
    pub fn url(&self) -> String {
        format!("https://{}/v1/whoami", self.addr)
    }
}

/// One wrk run.
pub struct WrkRun {
    pub connections: u32,
    pub duration: Duration,
    /// Send `Connection: close`, so every request opens a new TCP and TLS connection.
    pub new_connection_per_request: bool,
}

/// What wrk reported.
#[derive(Debug, PartialEq)]
pub struct WrkResult {
    pub requests: u64,
    pub requests_per_second: f64,
    pub p50_us: f64,
    pub p99_us: f64,
    /// Responses with a status of 400 or more, plus socket errors: anything but a clean answer.
    pub failures: u64,
}

/// Runs wrk (one thread) against `endpoint`.
pub fn wrk(wrk: &Path, endpoint: &Endpoint, run: &WrkRun) -> Result<WrkResult> {
    let mut command = endpoint.launch.command(wrk);
    command
        .args(["--threads", "1", "--latency", "--timeout", "5s"])
        .arg(format!("--connections={}", run.connections))
        .arg(format!("--duration={}s", run.duration.as_secs()))
        .arg("--header")
        .arg(format!("Authorization: {}", endpoint.authorization));
    if run.new_connection_per_request {
        command.args(["--header", "Connection: close"]);
    }
    command.arg(endpoint.url());
    let out = process::output_within(&mut command, run.duration + Duration::from_secs(20))?;
    if !out.status.success() {
        bail!("wrk failed ({}): {}", out.status, out.stderr_tail());
    }
    parse_wrk(&out.stdout).with_context(|| format!("reading wrk's report:\n{}", out.stdout))
}

/// Reads wrk's `--latency` report.
fn parse_wrk(report: &str) -> Result<WrkResult> {
    let mut result = WrkResult {
        requests: 0,
        requests_per_second: 0.0,
        p50_us: f64::NAN,
        p99_us: f64::NAN,
        failures: 0,
    };
    for line in report.lines().map(str::trim) {
        let words: Vec<&str> = line.split_whitespace().collect();
        match words.as_slice() {
            ["50%", value] => result.p50_us = micros(value)?,
            ["99%", value] => result.p99_us = micros(value)?,
            [count, "requests", "in", ..] => result.requests = count.parse()?,
            ["Requests/sec:", value] => result.requests_per_second = value.parse()?,
            ["Non-2xx", "or", "3xx", "responses:", count] => {
                result.failures += count.parse::<u64>()?
            }
            ["Socket", "errors:", rest @ ..] => {
                // connect 0, read 0, write 0, timeout 0
                for count in rest.iter().skip(1).step_by(2) {
                    result.failures += count.trim_end_matches(',').parse::<u64>()?;
                }
            }
            _ => {}
        }
    }
    if result.requests == 0 || result.p50_us.is_nan() {
        bail!("no requests or no latency distribution in the report");
    }
    Ok(result)
}

/// A wrk duration such as `26.00us`, `1.20ms` or `2.00s`, in microseconds.
fn micros(value: &str) -> Result<f64> {
    let (number, scale) = if let Some(n) = value.strip_suffix("us") {
        (n, 1.0)
    } else if let Some(n) = value.strip_suffix("ms") {
        (n, 1e3)
    } else if let Some(n) = value.strip_suffix('s') {
        (n, 1e6)
    } else {
        bail!("unknown duration {value:?}");
    };
    Ok(number.parse::<f64>()? * scale)
}

/// What h2load reported.
#[derive(Debug, PartialEq)]
pub struct H2Result {
    pub requests_per_second: f64,
    pub succeeded: u64,
    /// Failed, errored or timed-out requests and 4xx/5xx responses.
    pub failures: u64,
}

/// Runs h2load with one connection and `streams` concurrent streams for `duration`.
pub fn h2load(
    h2load: &Path,
    endpoint: &Endpoint,
    streams: u32,
    duration: Duration,
) -> Result<H2Result> {
    let mut command = endpoint.launch.command(h2load);
    command
        .args(["--clients=1", "--threads=1"])
        .arg(format!("--max-concurrent-streams={streams}"))
        .arg(format!("--duration={}", duration.as_secs()))
        .arg("--header")
        .arg(format!("authorization: {}", endpoint.authorization))
        .arg(endpoint.url());
    let out = process::output_within(&mut command, duration + Duration::from_secs(20))?;
    if !out.status.success() {
        bail!("h2load failed ({}): {}", out.status, out.stderr_tail());
    }
    parse_h2load(&out.stdout).with_context(|| format!("reading h2load's report:\n{}", out.stdout))
}

/// Reads the summary lines of h2load's report.
fn parse_h2load(report: &str) -> Result<H2Result> {
    let mut rate = None;
    let mut succeeded = None;
    let mut failures = 0;
    for line in report.lines() {
        let words: Vec<&str> = line
            .split([' ', ','])
            .filter(|word| !word.is_empty())
            .collect();
        match words.as_slice() {
            ["finished", "in", _, per_second, "req/s", ..] => rate = Some(per_second.parse()?),
            ["requests:", rest @ ..] => {
                for pair in rest.chunks(2) {
                    if let [count, what] = pair {
                        match *what {
                            "succeeded" => succeeded = Some(count.parse()?),
                            "failed" | "errored" | "timeout" => failures += count.parse::<u64>()?,
                            _ => {}
                        }
                    }
                }
            }
            ["status", "codes:", rest @ ..] => {
                for pair in rest.chunks(2) {
                    if let [count, "4xx" | "5xx"] = pair {
                        failures += count.parse::<u64>()?;
                    }
                }
            }
            _ => {}
        }
    }
    let (Some(requests_per_second), Some(succeeded)) = (rate, succeeded) else {
        bail!("no `finished in` or `requests:` line in the report");
    };
    Ok(H2Result {
        requests_per_second,
        succeeded,
        failures,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    const WRK: &str = "Running 5s test @ https://127.0.0.2:18443/v1/whoami
  1 threads and 1 connections
  Thread Stats   Avg      Stdev     Max   +/- Stdev
    Latency    53.89us  253.88us   5.48ms   98.77%
    Req/Sec    32.33k     2.86k   35.63k    78.00%
  Latency Distribution
     50%   26.00us
     75%   30.00us
     90%   39.00us
     99%    1.20ms
  160813 requests in 5.00s, 33.43MB read
  Socket errors: connect 1, read 2, write 0, timeout 3
  Non-2xx or 3xx responses: 4
Requests/sec:  32156.54
Transfer/sec:      6.69MB
";

    #[test]
    fn reads_wrk_latency_rate_and_failures() -> Result<()> {
        let result = parse_wrk(WRK)?;
        assert_eq!(
            result,
            WrkResult {
                requests: 160_813,
                requests_per_second: 32156.54,
                p50_us: 26.0,
                p99_us: 1200.0,
                failures: 10,
            }
        );
        Ok(())
    }

    #[test]
    fn a_wrk_report_without_requests_is_an_error() {
        assert!(parse_wrk("Running 5s test @ x\n").is_err());
    }

    #[test]
    fn reads_h2load_summary() -> Result<()> {
        let report = "finished in 3.01s, 65601.00 req/s, 8.45MB/s
requests: 196803 total, 196835 started, 196803 done, 196800 succeeded, 2 failed, 1 errored, 0 timeout
status codes: 196800 2xx, 0 3xx, 5 4xx, 0 5xx
";
        assert_eq!(
            parse_h2load(report)?,
            H2Result {
                requests_per_second: 65601.0,
                succeeded: 196_800,
                failures: 8,
            }
        );
        Ok(())
    }

    #[test]
    fn runs_clients_in_the_agent_cgroup_through_brokerctl() {
        let launch = Launch::InAgentCgroup {
            brokerctl: PathBuf::from("/t/brokerctl"),
            run_dir: PathBuf::from("/t/run"),
            cgroup: "agents/bench".into(),
        };
        let command = launch.command(Path::new("/usr/bin/wrk"));
        let args: Vec<_> = command.get_args().collect();
        assert_eq!(command.get_program(), "/t/brokerctl");
        assert_eq!(
            args,
            [
                "--run-dir",
                "/t/run",
                "run",
                "--cgroup",
                "agents/bench",
                "--create",
                "--",
                "/usr/bin/wrk"
            ]
        );
    }
}
