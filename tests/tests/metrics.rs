//! Metrics, end to end: brokerd started with `--metrics-addr` is scraped every second by a real
//! Prometheus (Debian's `prometheus` package, started by the test with its own config, storage
//! dir and loopback port), while curl in a tagged cgroup makes calls brokerd allows and calls
//! it denies; the counts Prometheus's HTTP API returns (`/api/v1/query`) must be the calls the
//! test made. `brokerctl metrics` prints the same exposition, and a metrics address that is not
//! loopback is refused at start.
//!
//! Needs root, cgroup v2 and BPF, curl, and /usr/bin/prometheus (`cargo xtask setup` installs
//! it).
//!
//! Run as root: `cargo test -p agent-broker-tests --test metrics -- --test-threads=1`.

use std::{
    fs,
    net::{SocketAddr, TcpListener},
    path::Path,
    process::{Child, Command, Stdio},
    time::{Duration, Instant},
};

use agent_broker_tests::{
    Broker, TestCa, TestCgroup, TestUpstream, UpstreamOptions,
    clients::{self, Call, Trust},
    require_privileges, run_with_timeout,
    world::{API, OTHER, TEST_API_IP, api_ip},
};

const PROMETHEUS: &str = "/usr/bin/prometheus";
/// Requests a minute the rate-limited rule allows, and how many the test sends past it.
const LIMIT: usize = 2;
const OVER_LIMIT: usize = 2;

/// brokerd's metrics listener, from the line it logs at start (it was given port 0).
fn metrics_addr(broker: &Broker) -> SocketAddr {
    let mut found = None;
    agent_broker_tests::wait_for(
        "brokerd logs its metrics address",
        Duration::from_secs(10),
        || {
            found = broker
                .log_of_last_start()
                .lines()
                .filter(|l| l.contains("serving metrics"))
                .find_map(|l| {
                    l.split_whitespace()
                        .find_map(|w| w.strip_prefix("addr="))
                        .and_then(|a| a.parse().ok())
                });
            found.is_some()
        },
    );
    found.unwrap_or_else(|| panic!("no metrics address in brokerd's log:\n{}", broker.log()))
}

/// A loopback port nothing listens on now.
fn free_port() -> u16 {
    let l = TcpListener::bind("127.0.0.1:0").expect("bind a free port");
    l.local_addr().expect("local addr").port()
}

/// curl (outside any tagged cgroup) for `url`: (status, body).
fn http_get(url: &str, extra: &[&str]) -> (u16, String) {
    let mut cmd = Command::new("curl");
    cmd.args([
        "-sS",
        "--noproxy",
        "*",
        "--max-time",
        "10",
        "-w",
        "\n%{http_code}",
    ])
    .args(extra)
    .arg(url);
    let out = run_with_timeout(&mut cmd, Duration::from_secs(15));
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    let (body, code) = text.rsplit_once('\n').unwrap_or(("", "0"));
    (code.trim().parse().unwrap_or(0), body.to_string())
}

/// A Prometheus of the test's own, scraping `target` every second; killed by pid on drop.
struct Prometheus {
    child: Child,
    addr: SocketAddr,
    dir: tempfile::TempDir,
}

impl Prometheus {
    fn start(target: SocketAddr) -> Self {
        assert!(
            Path::new(PROMETHEUS).is_file(),
            "{PROMETHEUS} is missing: install Debian's prometheus package (cargo xtask setup)"
        );
        let dir = tempfile::Builder::new()
            .prefix("abtest-prometheus-")
            .tempdir()
            .expect("temp dir");
        let config = dir.path().join("prometheus.yml");
        fs::write(
            &config,
            format!(
                "global:\n  scrape_interval: 1s\n  scrape_timeout: 1s\n  evaluation_interval: 1s\n\
                 scrape_configs:\n  - job_name: brokerd\n    static_configs:\n      - targets: ['{target}']\n"
            ),
        )
        .expect("write the prometheus config");
        let addr: SocketAddr = ([127, 0, 0, 1], free_port()).into();
        let log = fs::File::create(dir.path().join("prometheus.log")).expect("log file");
        let child = Command::new(PROMETHEUS)
            .arg(format!("--config.file={}", config.display()))
            .arg(format!(
                "--storage.tsdb.path={}",
                dir.path().join("data").display()
            ))
            .arg(format!("--web.listen-address={addr}"))
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .unwrap_or_else(|e| panic!("cannot start {PROMETHEUS}: {e}"));
        let p = Self { child, addr, dir };
        agent_broker_tests::wait_for("prometheus ready", Duration::from_secs(30), || {
            http_get(&format!("http://{}/-/ready", p.addr), &[]).0 == 200
        });
        p
    }

    fn log(&self) -> String {
        fs::read_to_string(self.dir.path().join("prometheus.log")).unwrap_or_default()
    }

    /// The value of an instant query returning one sample, None when it returns none.
    fn query(&self, query: &str) -> Option<f64> {
        let (status, body) = http_get(
            &format!("http://{}/api/v1/query", self.addr),
            &["--get", "--data-urlencode", &format!("query={query}")],
        );
        assert_eq!(status, 200, "query {query}: {body}\n{}", self.log());
        let v: serde_json::Value = serde_json::from_str(&body).expect("query answer is JSON");
        assert_eq!(v["status"], "success", "{query}: {body}");
        let result = v["data"]["result"].as_array().expect("a vector result");
        assert!(result.len() <= 1, "{query} returned several series: {body}");
        result.first().map(|s| {
            s["value"][1]
                .as_str()
                .and_then(|x| x.parse().ok())
                .unwrap_or_else(|| panic!("{query}: no value in {body}"))
        })
    }

    /// Polls `query` until it returns `want` (Prometheus scrapes every second); panics with the
    /// last answer after 30 s.
    fn wait_value(&self, query: &str, want: f64) {
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            let got = self.query(query);
            if got == Some(want) {
                return;
            }
            assert!(
                Instant::now() < deadline,
                "Prometheus: {query} = {got:?}, expected {want}\nprometheus log:\n{}",
                self.log()
            );
            std::thread::sleep(Duration::from_millis(500));
        }
    }
}

impl Drop for Prometheus {
    fn drop(&mut self) {
        let pid = nix::unistd::Pid::from_raw(i32::try_from(self.child.id()).unwrap_or(i32::MAX));
        let _ = nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGTERM);
        let deadline = Instant::now() + Duration::from_secs(10);
        while Instant::now() < deadline {
            if matches!(self.child.try_wait(), Ok(Some(_))) {
                return;
            }
            std::thread::sleep(Duration::from_millis(100));
        }
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// The value of one series in an exposition.
fn sample(text: &str, series: &str) -> Option<f64> {
    text.lines()
        .find_map(|l| l.strip_prefix(series)?.strip_prefix(' ')?.parse().ok())
}

#[test]
fn prometheus_scrapes_the_request_and_denial_counts_the_agent_made() {
    require_privileges();
    let cg = TestCgroup::new();
    let ca = TestCa::new("abtest metrics CA");
    let api = TestUpstream::start(&ca, UpstreamOptions::api());
    let agent = cg.child("agent");
    let broker = Broker::builder()
        .upstream_ca(ca.pem_path())
        .name(API, TEST_API_IP)
        .name(OTHER, TEST_API_IP)
        .policy(
            "agent.toml",
            &format!(
                "cgroup = \"{agent}\"\n\
                 [[allow]]\nhost = \"{API}\"\nport = {port}\npaths = [\"/hash\"]\n\
                 [[allow]]\nhost = \"{API}\"\nport = {port}\npaths = [\"/echo\"]\n\
                 rate = {{ per_minute = {LIMIT} }}\n",
                port = api.port()
            ),
        )
        .arg("--metrics-addr")
        .arg("127.0.0.1:0")
        .start();
    let target = metrics_addr(&broker);
    assert!(target.ip().is_loopback(), "{target}");
    let prometheus = Prometheus::start(target);
    prometheus.wait_value("up{job=\"brokerd\"}", 1.0);

    let trust = Trust::Env(broker.export_ca());
    const ALLOWED: usize = 5;
    const DENIED: usize = 3;
    let allowed = Call::new(API, api_ip(), api.port(), "/hash");
    let (run, reports) = clients::curl_repeat(&broker, &agent, &trust, &allowed, ALLOWED);
    for r in &reports {
        assert_eq!(r.status, 200, "{}\n{}", r.show(), run.show());
    }
    // other.example.test reaches the same API, but no rule names it.
    let denied = Call::new(OTHER, api_ip(), api.port(), "/hash");
    let (run, reports) = clients::curl_repeat(&broker, &agent, &trust, &denied, DENIED);
    for r in &reports {
        r.assert_denied(&agent, &run.show());
    }

    // The /echo rule allows LIMIT a minute: the calls past it get 429.
    let limited = Call::new(API, api_ip(), api.port(), "/echo");
    let (run, reports) =
        clients::curl_repeat(&broker, &agent, &trust, &limited, LIMIT + OVER_LIMIT);
    for (i, r) in reports.iter().enumerate() {
        if i < LIMIT {
            assert_eq!(r.status, 200, "{}\n{}", r.show(), run.show());
        } else {
            r.assert_limited(&agent, &run.show());
        }
    }
    // A request whose Host disagrees with its SNI: refused for its form.
    let mismatched = Call::new(API, api_ip(), api.port(), "/hash").header("host", OTHER);
    let (run, report) = clients::curl(&broker, &agent, &trust, &mismatched);
    report.assert_denied(&agent, &run.show());
    const ALLOWED_ALL: usize = ALLOWED + LIMIT;
    const DENIED_ALL: usize = DENIED + OVER_LIMIT + 1;

    let requests = |decision: &str| {
        format!("sum(agent_broker_requests_total{{agent=\"{agent}\",decision=\"{decision}\"}})")
    };
    prometheus.wait_value(&requests("allow"), ALLOWED_ALL as f64);
    prometheus.wait_value(&requests("deny"), DENIED_ALL as f64);
    prometheus.wait_value(
        &format!("sum(agent_broker_denials_total{{agent=\"{agent}\"}})"),
        DENIED_ALL as f64,
    );
    prometheus.wait_value(
        &format!("agent_broker_denials_total{{agent=\"{agent}\",reason=\"rate_limit\"}}"),
        OVER_LIMIT as f64,
    );
    prometheus.wait_value(
        &format!("agent_broker_denials_total{{agent=\"{agent}\",reason=\"request\"}}"),
        1.0,
    );
    prometheus.wait_value(
        &format!("agent_broker_limit_hits_total{{agent=\"{agent}\",limit=\"rate_limit\"}}"),
        OVER_LIMIT as f64,
    );
    // By label: the allowed calls under the rule's host and 2xx, the denied ones under
    // `other` (no rule names other.example.test) and the reason kind `policy`.
    prometheus.wait_value(
        &format!(
            "agent_broker_requests_total{{agent=\"{agent}\",host=\"{API}\",decision=\"allow\",status_class=\"2xx\"}}"
        ),
        ALLOWED_ALL as f64,
    );
    prometheus.wait_value(
        &format!(
            "agent_broker_requests_total{{agent=\"{agent}\",host=\"other\",decision=\"deny\",status_class=\"4xx\"}}"
        ),
        DENIED as f64,
    );
    prometheus.wait_value(
        &format!("agent_broker_denials_total{{agent=\"{agent}\",reason=\"policy\"}}"),
        DENIED as f64,
    );
    prometheus.wait_value(
        &format!("agent_broker_upstream_duration_seconds_count{{agent=\"{agent}\"}}"),
        ALLOWED_ALL as f64,
    );
    // The kernel's own counters: at least the two curl connections were redirected.
    let redirects = prometheus
        .query("agent_broker_ebpf_redirects_total{kind=\"connect\"}")
        .unwrap_or_else(|| panic!("no eBPF redirect counter\n{}", prometheus.log()));
    assert!(redirects >= 2.0, "eBPF redirects: {redirects}");
    let handshakes = prometheus
        .query("agent_broker_tls_handshakes_total{outcome=\"ok\"}")
        .unwrap_or_default();
    assert!(handshakes >= 2.0, "TLS handshakes: {handshakes}");
    // Only the counts the test made: wait two more scrapes and ask again.
    std::thread::sleep(Duration::from_secs(2));
    assert_eq!(
        prometheus.query(&requests("allow")),
        Some(ALLOWED_ALL as f64)
    );
    assert_eq!(prometheus.query(&requests("deny")), Some(DENIED_ALL as f64));

    // `brokerctl metrics`: the same exposition, through the control socket.
    let text = broker.ctl_ok(&["metrics"]);
    assert!(text.trim_end().ends_with("# EOF"), "{text}");
    assert_eq!(
        sample(
            &text,
            &format!(
                "agent_broker_requests_total{{agent=\"{agent}\",host=\"{API}\",decision=\"allow\",status_class=\"2xx\"}}"
            )
        ),
        Some(ALLOWED_ALL as f64),
        "{text}"
    );
    assert_eq!(
        sample(
            &text,
            &format!("agent_broker_denials_total{{agent=\"{agent}\",reason=\"policy\"}}")
        ),
        Some(DENIED as f64),
        "{text}"
    );
    assert!(
        sample(&text, "agent_broker_ebpf_redirects_total{kind=\"connect\"}")
            .is_some_and(|v| v >= 2.0),
        "{text}"
    );
    assert!(
        !text.contains("/hash") && !text.contains("/echo"),
        "no path is a label: {text}"
    );

    // The runtime gauges, in status and in the exposition: the tasks alive, a cached leaf
    // for each of the two names the agent dialed, brokerd's memory and descriptors.
    let runtime = broker.status().runtime;
    assert!(runtime.tasks > 0, "{runtime:?}");
    assert_eq!(runtime.leaf_cache, 2, "{runtime:?}");
    assert!(runtime.rss_bytes > 1 << 20, "{runtime:?}");
    assert!(runtime.open_fds > 3, "{runtime:?}");
    let text = broker.ctl_ok(&["metrics"]);
    assert!(
        sample(&text, "agent_broker_runtime_tasks").is_some_and(|v| v > 0.0),
        "{text}"
    );
    assert_eq!(
        sample(&text, "agent_broker_runtime_leaf_cache_entries"),
        Some(2.0),
        "{text}"
    );

    // The listener serves GET /metrics only.
    let (status, body) = http_get(&format!("http://{target}/metrics"), &[]);
    assert_eq!(status, 200, "{body}");
    assert!(body.contains("agent_broker_connections_open"), "{body}");
    assert_eq!(http_get(&format!("http://{target}/"), &[]).0, 404);
    assert_eq!(
        http_get(&format!("http://{target}/metrics"), &["-X", "POST"]).0,
        405
    );
}

#[test]
fn a_metrics_address_that_is_not_loopback_is_refused_at_start() {
    require_privileges();
    let mut broker = Broker::builder()
        .arg("--metrics-addr")
        .arg("0.0.0.0:0")
        .prepare();
    let err = broker
        .try_start()
        .expect_err("brokerd must refuse a metrics address that is not loopback");
    assert!(
        err.contains("invalid metrics address 0.0.0.0:0") && err.contains("loopback"),
        "{err}"
    );
}
