//! The workloads of issue 7. Each sends the same requests through every column in turn, one
//! column at a time on the same machine, and turns what the clients report into rows of the
//! table. A column that is not running, or whose measurement fails, gets a cell saying so; only
//! an interruption stops the run.

use std::{
    fs,
    path::{Path, PathBuf},
    process::{Child, Command, Stdio},
    time::Duration,
};

use anyhow::{Context as _, Result, bail};

use super::{
    clients,
    lab::{Lab, Route},
    load::{self, Endpoint, WrkResult, WrkRun},
    process,
    report::{
        Better::{Higher, Lower},
        Cell, Column, Row,
        Target::{AtMost, BetterThanDirect, NoWorseThanNginx, TimesMitmproxy},
    },
    stopping,
    tools::Tools,
};
use crate::cmd;

/// Concurrent clients in the new-connection-per-request workloads.
const NEW_CONNECTION_CLIENTS: u32 = 8;
/// Connections timed one by one for the first-seen and cached host names.
const CONNECTIONS_TIMED: u32 = 200;
/// How many times better than mitmproxy brokerd must be, on every workload.
const MITMPROXY_FACTOR: f64 = 20.0;
/// The memory target per idle brokered connection, in KiB.
const IDLE_KIB_TARGET: f64 = 64.0;

/// What the workloads need besides the lab.
pub struct Settings<'a> {
    pub tools: &'a Tools,
    /// Length of each throughput or latency measurement.
    pub duration: Duration,
    /// Where to write a `perf` profile of brokerd during the 32-connection workload, if wanted.
    pub profile: Option<PathBuf>,
    /// The soft limit on open files, which bounds the idle-connection workloads.
    pub open_files: u64,
    /// Run only the workloads with these keys ([`WORKLOADS`]); all when empty.
    pub only: Vec<String>,
}

/// The workloads' keys, in the order they run, for `--only`.
pub const WORKLOADS: [&str; 8] = [
    "keepalive1",
    "keepalive32",
    "newconn",
    "h2",
    "widearea",
    "idle",
    "hostnames",
    "micro",
];

impl Settings<'_> {
    fn wanted(&self, key: &str) -> bool {
        debug_assert!(WORKLOADS.contains(&key), "{key}");
        self.only.is_empty() || self.only.iter().any(|k| k == key)
    }
}

/// Runs every workload and returns the table's rows.
pub fn measure(lab: &Lab, settings: &Settings) -> Result<Vec<Row>> {
    let tools = settings.tools;
    let mut rows = Vec::new();
    let keep_alive = |connections| WrkRun {
        connections,
        duration: settings.duration,
        new_connection_per_request: false,
    };
    let new_connection = WrkRun {
        connections: NEW_CONNECTION_CLIENTS,
        duration: settings.duration,
        new_connection_per_request: true,
    };

    // Mints brokerd's leaf for the address, fills every proxy's upstream pool and wakes the
    // interpreters, so the first measured workload does not pay for it.
    let warm_up = WrkRun {
        duration: Duration::from_secs(2),
        ..keep_alive(32)
    };
    wrk_each("warm-up", lab, settings, Route::Local, &warm_up, false)?;

    if settings.wanted("keepalive1") {
        let samples = wrk_each(
            "keep-alive, 1 connection",
            lab,
            settings,
            Route::Local,
            &keep_alive(1),
            false,
        )?;
        rows.push(fill(
            Row::new("keep-alive, 1 connection: p50", "µs", Lower)
                .with_targets(&[NoWorseThanNginx, TimesMitmproxy(MITMPROXY_FACTOR)]),
            &samples,
            |s| measured(s.wrk.p50_us, s.wrk.failures),
        ));
        rows.push(fill(
            Row::new("keep-alive, 1 connection: p99", "µs", Lower),
            &samples,
            |s| measured(s.wrk.p99_us, s.wrk.failures),
        ));
    }

    if settings.wanted("keepalive32") {
        let profile = settings.profile.is_some();
        let samples = wrk_each(
            "keep-alive, 32 connections",
            lab,
            settings,
            Route::Local,
            &keep_alive(32),
            profile,
        )?;
        rows.push(fill(
            Row::new("keep-alive, 32 connections", "req/s", Higher)
                .with_targets(&[NoWorseThanNginx, TimesMitmproxy(MITMPROXY_FACTOR)]),
            &samples,
            |s| measured(s.wrk.requests_per_second, s.wrk.failures),
        ));
        rows.push(fill(
            Row::new(
                "keep-alive, 32 connections: proxy CPU per request",
                "µs",
                Lower,
            ),
            &samples,
            WrkSample::cpu_cell,
        ));
    }

    if settings.wanted("newconn") {
        let samples = wrk_each(
            "new TLS connection per request",
            lab,
            settings,
            Route::Local,
            &new_connection,
            false,
        )?;
        rows.push(fill(
            Row::new(
                format!("new TLS connection per request ({NEW_CONNECTION_CLIENTS} clients)"),
                "conn/s",
                Higher,
            )
            .with_targets(&[NoWorseThanNginx, TimesMitmproxy(MITMPROXY_FACTOR)]),
            &samples,
            |s| measured(s.wrk.requests_per_second, s.wrk.failures),
        ));
        rows.push(fill(
            Row::new(
                "new TLS connection per request: proxy CPU per request",
                "µs",
                Lower,
            ),
            &samples,
            WrkSample::cpu_cell,
        ));
    }

    if settings.wanted("h2") {
        let samples = each_column(
            "HTTP/2, 32 streams",
            lab,
            Route::Local,
            &Column::ALL,
            |_, endpoint| load::h2load(&tools.h2load, endpoint, 32, settings.duration),
        )?;
        rows.push(fill(
            Row::new("HTTP/2, 1 connection x 32 streams", "req/s", Higher)
                .with_targets(&[TimesMitmproxy(MITMPROXY_FACTOR)]),
            &samples,
            |s| measured(s.requests_per_second, s.failures),
        ));
    }

    if settings.wanted("widearea") {
        let samples = wrk_each(
            "wide-area upstream",
            lab,
            settings,
            Route::WideArea,
            &new_connection,
            false,
        )?;
        rows.push(fill(
        Row::new(
            format!(
                "upstream 20 ms away, new connection per request ({NEW_CONNECTION_CLIENTS} clients)"
            ),
            "conn/s",
            Higher,
        )
        .with_targets(&[BetterThanDirect, TimesMitmproxy(MITMPROXY_FACTOR)]),
        &samples,
        |s| measured(s.wrk.requests_per_second, s.wrk.failures),
    ));
    }

    if settings.wanted("idle") {
        rows.extend(idle_memory(lab, settings)?);
    }
    if settings.wanted("hostnames") {
        rows.extend(host_names(lab, settings)?);
    }
    if settings.wanted("micro") {
        rows.extend(microbenchmarks());
    }
    Ok(rows)
}

/// One wrk run, and the CPU time the proxy spent on it.
#[derive(Debug)]
struct WrkSample {
    wrk: WrkResult,
    /// Proxy CPU time per request, in µs (none on the direct path).
    cpu_us_per_request: Option<f64>,
}

impl WrkSample {
    fn cpu_cell(&self) -> Cell {
        self.cpu_us_per_request
            .map_or(Cell::NotApplicable, Cell::value)
    }
}

/// Runs wrk through every column, charging each proxy the CPU time its process tree used.
/// `profile`: record brokerd with perf meanwhile.
fn wrk_each(
    what: &str,
    lab: &Lab,
    settings: &Settings,
    route: Route,
    run: &WrkRun,
    profile: bool,
) -> Result<Vec<(Column, Result<WrkSample, Cell>)>> {
    each_column(what, lab, route, &Column::ALL, |column, endpoint| {
        let pid = lab.proxy_pid(column);
        let cpu_before = pid.map(process::tree_cpu_seconds).transpose()?;
        let recording = match (&settings.profile, pid) {
            (Some(_), Some(pid)) if profile && column == Column::Brokerd => {
                start_profile(settings, pid, run.duration)
            }
            _ => None,
        };
        let wrk = load::wrk(&settings.tools.wrk, endpoint, run);
        if let (Some(recording), Some(out)) = (recording, &settings.profile) {
            finish_profile(settings, recording, out);
        }
        let wrk = wrk?;
        let cpu_after = pid.map(process::tree_cpu_seconds).transpose()?;
        let cpu_us_per_request = cpu_before
            .zip(cpu_after)
            .map(|(before, after)| (after - before) * 1e6 / wrk.requests as f64);
        Ok(WrkSample {
            wrk,
            cpu_us_per_request,
        })
    })
}

/// Runs `measure` for each of `columns` in turn, printing each result as it comes.
fn each_column<T: std::fmt::Debug>(
    what: &str,
    lab: &Lab,
    route: Route,
    columns: &[Column],
    mut measure: impl FnMut(Column, &Endpoint) -> Result<T>,
) -> Result<Vec<(Column, Result<T, Cell>)>> {
    let mut results = Vec::new();
    for &column in columns {
        if stopping() {
            bail!("interrupted");
        }
        eprintln!("bench: {what}: {} ...", column.name());
        let outcome = match lab.endpoint(column, route) {
            Err(_) if column == Column::Mitmproxy => Err(Cell::NotInstalled(
                lab.mitmproxy_missing().unwrap_or("not running").to_owned(),
            )),
            Err(e) => Err(Cell::Failed(format!("{e:#}"))),
            Ok(endpoint) => measure(column, &endpoint).map_err(|e| Cell::Failed(format!("{e:#}"))),
        };
        if stopping() {
            bail!("interrupted");
        }
        match &outcome {
            Ok(value) => eprintln!("bench: {what}: {}: {value:?}", column.name()),
            Err(cell) => eprintln!("bench: {what}: {}: {cell:?}", column.name()),
        }
        results.push((column, outcome));
    }
    Ok(results)
}

/// `row` with a cell per measured column, made by `cell`, or the reason it is missing.
fn fill<T>(mut row: Row, results: &[(Column, Result<T, Cell>)], cell: impl Fn(&T) -> Cell) -> Row {
    for (column, outcome) in results {
        row.set(
            *column,
            match outcome {
                Ok(value) => cell(value),
                Err(missing) => missing.clone(),
            },
        );
    }
    row
}

fn measured(value: f64, failures: u64) -> Cell {
    Cell::Value { value, failures }
}

/// Resident memory per idle connection at 1,000 and 10,000 open connections.
fn idle_memory(lab: &Lab, settings: &Settings) -> Result<Vec<Row>> {
    let mut rows = Vec::new();
    for (count, columns) in [
        (
            1_000,
            &[Column::Brokerd, Column::Nginx, Column::Mitmproxy][..],
        ),
        (10_000, &[Column::Brokerd, Column::Nginx][..]),
    ] {
        let what = format!("idle memory per connection, {} open", thousands(count));
        let mut row = Row::new(what.clone(), "KiB", Lower).with_targets(&[AtMost(IDLE_KIB_TARGET)]);
        // Each connection takes a descriptor in the client and one in the proxy; keep a margin for
        // everything else either has open.
        if settings.open_files < u64::from(count) + 1_000 {
            let why = format!(
                "the open-files limit ({}) is too low for {count} connections",
                settings.open_files
            );
            for column in columns {
                row.set(*column, Cell::NotMeasured(why.clone()));
            }
            rows.push(row);
            continue;
        }
        let samples = each_column(&what, lab, Route::Local, columns, |column, endpoint| {
            let pid = lab
                .proxy_pid(column)
                .context("no proxy process to measure")?;
            clients::idle_memory_per_connection(
                &settings.tools.python3,
                lab.dir(),
                endpoint,
                count,
                pid,
            )
        })?;
        row = fill(row, &samples, |kib| Cell::value(*kib));
        if !columns.contains(&Column::Mitmproxy) {
            row.set(
                Column::Mitmproxy,
                Cell::NotMeasured(format!(
                    "not at {}: opening that many connections through it takes minutes",
                    thousands(count)
                )),
            );
        }
        rows.push(row);
    }
    Ok(rows)
}

/// Time per new connection when the host name (SNI) is first seen, so brokerd mints a leaf
/// certificate (and opens an upstream connection for the new name), and when it is cached.
fn host_names(lab: &Lab, settings: &Settings) -> Result<Vec<Row>> {
    let python = &settings.tools.python3;
    let samples = each_column(
        "first-seen and cached host names",
        lab,
        Route::Local,
        &Column::ALL,
        |column, endpoint| {
            let first_seen = format!("h{{}}-{}.bench.test", column.name());
            let cold = clients::connect_times(
                python,
                lab.dir(),
                endpoint,
                &first_seen,
                CONNECTIONS_TIMED,
            )?;
            let cached = format!("cached-{}.bench.test", column.name());
            clients::connect_times(python, lab.dir(), endpoint, &cached, 1)?;
            let warm =
                clients::connect_times(python, lab.dir(), endpoint, &cached, CONNECTIONS_TIMED)?;
            Ok((cold, warm))
        },
    )?;
    let targets = [TimesMitmproxy(MITMPROXY_FACTOR)];
    Ok(vec![
        fill(
            Row::new("new connection, first-seen host name (median)", "ms", Lower)
                .with_targets(&targets),
            &samples,
            |(cold, _)| measured(cold.median_ms, cold.failures),
        ),
        fill(
            Row::new("new connection, cached host name (median)", "ms", Lower)
                .with_targets(&targets),
            &samples,
            |(_, warm)| measured(warm.median_ms, warm.failures),
        ),
    ])
}

/// The policy decision and audit rows, from in-process microbenchmarks of the policy engine
/// (`cargo bench -p agent-broker-core --bench policy`) and brokerd's audit writer
/// (`cargo bench -p agent-broker --features bench --bench audit`), reading the lines they print
/// as `bench-metric policy_decision_p99_us <value>` and `bench-metric audit_cpu_us_per_request
/// <value>`.
fn microbenchmarks() -> Vec<Row> {
    let metrics = [
        (
            "policy decision p99, 1,000 rules",
            "policy_decision_p99_us",
            5.0,
        ),
        ("audit CPU per request", "audit_cpu_us_per_request", 2.0),
    ];
    let report = run_microbenchmarks();
    metrics
        .iter()
        .map(|(workload, metric, limit)| {
            let mut row = Row::new(*workload, "µs", Lower).with_targets(&[AtMost(*limit)]);
            let cell = match &report {
                Ok(text) => bench_metric(text, metric).map_or_else(
                    || {
                        Cell::NotMeasured(format!(
                            "the microbenchmarks printed no `bench-metric {metric}` line"
                        ))
                    },
                    Cell::value,
                ),
                Err(why) => Cell::NotMeasured(why.clone()),
            };
            row.set(Column::Brokerd, cell);
            for column in [Column::Direct, Column::Nginx, Column::Mitmproxy] {
                row.set(column, Cell::NotApplicable);
            }
            row
        })
        .collect()
}

fn run_microbenchmarks() -> Result<String, String> {
    let mut report = String::new();
    for args in [
        "bench -p agent-broker-core --bench policy",
        "bench -p agent-broker --features bench --bench audit",
    ] {
        let mut bench = cmd::workspace_cargo().map_err(|e| format!("{e:#}"))?;
        bench.args(args.split_whitespace());
        match process::output_within(&mut bench, Duration::from_secs(300)) {
            Ok(out) if out.status.success() => report.push_str(&out.stdout),
            Ok(out) => return Err(format!("`cargo {args}` failed: {}", out.stderr_tail())),
            Err(e) => return Err(format!("{e:#}")),
        }
    }
    Ok(report)
}

/// The value of a `bench-metric <name> <value>` line.
fn bench_metric(report: &str, name: &str) -> Option<f64> {
    report.lines().find_map(|line| {
        let mut words = line.split_whitespace();
        (words.next()? == "bench-metric" && words.next()? == name)
            .then(|| words.next()?.parse().ok())?
    })
}

/// Starts `perf record` on `pid` for `duration`; None (with a message) when it cannot start.
fn start_profile(settings: &Settings, pid: u32, duration: Duration) -> Option<Child> {
    let perf = settings.tools.perf.as_ref()?;
    let data = settings.profile.as_ref()?.with_extension("data");
    let mut record = Command::new(perf);
    record
        .args(["record", "--freq=999", "--quiet", "-o"])
        .arg(&data)
        .args([
            "-p",
            &pid.to_string(),
            "--",
            "sleep",
            &duration.as_secs().to_string(),
        ])
        .stdout(Stdio::null())
        .stderr(Stdio::null());
    cmd::echo(&record);
    record
        .spawn()
        .map_err(|e| eprintln!("bench: cannot start perf: {e}"))
        .ok()
}

/// Waits for `perf record` and writes its flat profile (by library and symbol) to `out`.
fn finish_profile(settings: &Settings, mut recording: Child, out: &Path) {
    let _ = recording.wait();
    let Some(perf) = settings.tools.perf.as_ref() else {
        return;
    };
    let mut report = Command::new(perf);
    report
        .arg("report")
        .arg("-i")
        .arg(out.with_extension("data"))
        .args([
            "--stdio",
            "--no-children",
            "--sort=dso,symbol",
            "--percent-limit=0.7",
        ]);
    match process::output_within(&mut report, Duration::from_secs(120)) {
        Ok(text) if text.status.success() => match fs::write(out, trim_lines(&text.stdout)) {
            Ok(()) => eprintln!("bench: brokerd profile in {}", cmd::relative(out)),
            Err(e) => eprintln!("bench: cannot write {}: {e}", out.display()),
        },
        Ok(text) => eprintln!("bench: perf report failed: {}", text.stderr_tail()),
        Err(e) => eprintln!("bench: perf report: {e:#}"),
    }
}

/// `text` without the padding perf puts at the end of every line.
fn trim_lines(text: &str) -> String {
    text.lines()
        .map(|line| format!("{}\n", line.trim_end()))
        .collect()
}

fn thousands(n: u32) -> String {
    if n >= 1_000 && n.is_multiple_of(1_000) {
        format!("{},000", n / 1_000)
    } else {
        n.to_string()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_bench_metric_lines() {
        let report = "running 2 benches\nbench-metric policy_decision_p99_us 1.25\nbench-metric audit_cpu_us_per_request x\n";
        assert_eq!(bench_metric(report, "policy_decision_p99_us"), Some(1.25));
        assert_eq!(bench_metric(report, "audit_cpu_us_per_request"), None);
        assert_eq!(bench_metric(report, "other"), None);
    }

    #[test]
    fn names_thousands() {
        assert_eq!(thousands(1_000), "1,000");
        assert_eq!(thousands(10_000), "10,000");
        assert_eq!(thousands(200), "200");
    }
}
