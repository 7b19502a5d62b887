//! The workloads of issues 7 and 12. Each sends the same requests through every column in turn, one
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
        Target::{
            AddsAtMost, AtMost, BetterThanDirect, NoWorseThanNginx, TimesDirect, TimesMitmproxy,
            TimesNginx,
        },
    },
    stopping, stream_origin,
    tools::Tools,
};
use crate::cmd;

/// Concurrent clients in the new-connection-per-request workloads.
const NEW_CONNECTION_CLIENTS: u32 = 8;
/// Connections timed one by one for the first-seen and cached host names.
const CONNECTIONS_TIMED: u32 = 200;
/// How many times better than mitmproxy brokerd must be, on every workload.
const MITMPROXY_FACTOR: f64 = 20.0;
/// The most memory brokerd may hold per idle connection, as a multiple of nginx's (issue 18).
const IDLE_NGINX_FACTOR: f64 = 2.0;
/// The most a new connection for a first-seen host name may take, as a multiple of nginx's
/// time (issue 18): one leaf signature more than a cached name.
const FIRST_SEEN_NGINX_FACTOR: f64 = 1.25;
/// Timed event streams per column in the SSE workload (after one that warms the path up).
const SSE_RUNS: u32 = 5;
/// The most brokerd may add to the time to the first event and to the p99 event lag, in ms.
const SSE_ADDED_MS_TARGET: f64 = 1.0;
/// The size of each transfer in the bulk workload: 200 MB.
const BULK_BYTES: u64 = 200_000_000;
/// Timed transfers per direction and column in the bulk workload.
const BULK_RUNS: u32 = 3;
/// The fraction of the direct path's throughput brokerd must reach on bulk transfers.
const BULK_THROUGHPUT_TARGET: f64 = 0.8;
/// The most brokerd's resident memory may grow during the bulk transfers, in MiB.
const BULK_RSS_MIB_TARGET: f64 = 16.0;
/// Columns with a route to the streaming origin: issue 12 compares brokerd with the direct path
/// and with nginx there.
const STREAMING_COLUMNS: [Column; 3] = [Column::Direct, Column::Brokerd, Column::Nginx];

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

/// The most an agent in a container may add to the keep-alive p50 of the same agent on the host.
const CONTAINER_P50_TARGET: f64 = 1.10;
/// The most the unprivileged mode may add to the keep-alive p50 of the same agent in root mode
/// (issue 19).
const UNPRIVILEGED_P50_TARGET: f64 = 1.10;
/// Alternating rounds (host, container; root mode, unprivileged) in the paired rows; each
/// agent's p50 is the median of its rounds.
const CONTAINER_ROUNDS: usize = 3;

/// The workloads' keys, in the order they run, for `--only`.
pub const WORKLOADS: [&str; 15] = [
    "keepalive1",
    "keepalive32",
    "newconn",
    "h2",
    "widearea",
    "sse",
    "bulk",
    "idle",
    "hostnames",
    "micro",
    "container",
    "unprivileged",
    "fairness",
    "fleet",
    "manyidle",
];

impl Settings<'_> {
    pub(super) fn wanted(&self, key: &str) -> bool {
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
            )
            .with_targets(&[NoWorseThanNginx]),
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
                .with_targets(&[NoWorseThanNginx, TimesMitmproxy(MITMPROXY_FACTOR)]),
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

    if settings.wanted("sse") {
        rows.extend(event_stream(lab, settings)?);
    }
    if settings.wanted("bulk") {
        rows.extend(bulk(lab, settings)?);
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
    if settings.wanted("container") {
        rows.push(container_row(lab, settings)?);
    }
    if settings.wanted("unprivileged") {
        rows.push(unprivileged_row(lab, settings)?);
    }
    if settings.wanted("fairness") {
        rows.extend(super::fairness::rows(lab, settings)?);
    }
    rows.extend(super::fleet::rows(lab, settings)?);
    Ok(rows)
}

/// Issue 14's row: the keep-alive p50 of an agent in a container (a network namespace of its
/// own with only `lo`, served by brokerd's listeners there) against the same agent on the host,
/// both brokered, calling the origin through the same relay. The direct column holds the host
/// agent's p50 and the brokerd column the container agent's, so the target reads "at most 1.1x
/// direct".
fn container_row(lab: &Lab, settings: &Settings) -> Result<Row> {
    let row = Row::new(
        "keep-alive, 1 connection: p50, agent in a container (direct column: the host agent)",
        "µs",
        Lower,
    )
    .with_targets(&[TimesDirect(CONTAINER_P50_TARGET)]);
    paired_p50_row(
        row,
        "container row",
        ["host agent", "container agent"],
        lab.container_endpoints(),
        settings,
    )
}

/// Issue 19's row: the keep-alive p50 of the bench agent started by `brokerctl run
/// --unprivileged` and served by `brokerd --unprivileged` (no eBPF, no root), against the same
/// agent in its tagged cgroup served by the root brokerd, both calling the origin by address.
/// The direct column holds the root-mode agent's p50 and the brokerd column the unprivileged
/// one's, so the target reads "within 10% of root mode".
fn unprivileged_row(lab: &Lab, settings: &Settings) -> Result<Row> {
    let row = Row::new(
        "keep-alive, 1 connection: p50, unprivileged mode (direct column: root mode)",
        "µs",
        Lower,
    )
    .with_targets(&[TimesDirect(UNPRIVILEGED_P50_TARGET)]);
    paired_p50_row(
        row,
        "unprivileged row",
        ["root-mode agent", "unprivileged agent"],
        lab.unprivileged_endpoints(),
        settings,
    )
}

/// A row comparing two agents' keep-alive p50 in alternating rounds: the first in the direct
/// column, the second in brokerd's; each the median of its [`CONTAINER_ROUNDS`] rounds.
fn paired_p50_row(
    mut row: Row,
    what: &str,
    names: [&str; 2],
    endpoints: Result<[super::load::Endpoint; 2]>,
    settings: &Settings,
) -> Result<Row> {
    let [first, second] = match endpoints {
        Ok(endpoints) => endpoints,
        Err(e) => {
            row.set(Column::Brokerd, Cell::Failed(format!("{e:#}")));
            return Ok(row);
        }
    };
    let run = WrkRun {
        connections: 1,
        duration: settings.duration,
        new_connection_per_request: false,
    };
    let mut p50s: [Vec<f64>; 2] = [Vec::new(), Vec::new()];
    let mut failures = [0u64; 2];
    for round in 1..=CONTAINER_ROUNDS {
        for (i, (name, endpoint)) in [(names[0], &first), (names[1], &second)]
            .into_iter()
            .enumerate()
        {
            if stopping() {
                bail!("interrupted");
            }
            eprintln!("bench: {what}, round {round}: {name} ...");
            match load::wrk(&settings.tools.wrk, endpoint, &run) {
                Ok(wrk) => {
                    eprintln!("bench: {what}, round {round}: {name}: {wrk:?}");
                    p50s[i].push(wrk.p50_us);
                    failures[i] += wrk.failures;
                }
                Err(e) => {
                    let column = [Column::Direct, Column::Brokerd][i];
                    row.set(column, Cell::Failed(format!("{name}: {e:#}")));
                    return Ok(row);
                }
            }
        }
    }
    for (i, column) in [Column::Direct, Column::Brokerd].into_iter().enumerate() {
        row.set(column, measured(median(&mut p50s[i]), failures[i]));
    }
    Ok(row)
}

/// The median of `values` (NaN for none).
fn median(values: &mut [f64]) -> f64 {
    values.sort_by(f64::total_cmp);
    match values.len() {
        0 => f64::NAN,
        n if n % 2 == 1 => values[n / 2],
        n => (values[n / 2 - 1] + values[n / 2]) / 2.0,
    }
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
pub(super) fn each_column<T: std::fmt::Debug>(
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
pub(super) fn fill<T>(
    mut row: Row,
    results: &[(Column, Result<T, Cell>)],
    cell: impl Fn(&T) -> Cell,
) -> Row {
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

pub(super) fn measured(value: f64, failures: u64) -> Cell {
    Cell::Value { value, failures }
}

/// What one column's event streams came to.
#[derive(Debug)]
struct EventStreamSummary {
    /// The median time from sending the request to the first event, in ms.
    first_event_ms: f64,
    /// The 99th percentile over every event of every run of how late it arrived: its arrival
    /// after the request was sent less its place in the schedule (index x gap), in ms.
    p99_lag_ms: f64,
    /// The median of the same: the typical event's lag, which tells a p99 that noise pushed up
    /// from a path that delays every event.
    p50_lag_ms: f64,
    /// Streams that did not answer 200 with every event.
    failures: u64,
}

impl EventStreamSummary {
    fn of(times: &clients::EventTimes, gap: Duration) -> Result<Self> {
        let mut first: Vec<f64> = times
            .runs
            .iter()
            .filter_map(|r| r.first().copied())
            .collect();
        let mut lags: Vec<f64> = times
            .runs
            .iter()
            .flat_map(|run| {
                run.iter()
                    .enumerate()
                    .map(|(index, arrived)| arrived - gap.as_secs_f64() * index as f64)
            })
            .collect();
        if first.is_empty() {
            bail!("no stream arrived whole ({} failed)", times.failures);
        }
        Ok(Self {
            first_event_ms: percentile(&mut first, 50.0) * 1e3,
            p99_lag_ms: percentile(&mut lags, 99.0) * 1e3,
            p50_lag_ms: percentile(&mut lags, 50.0) * 1e3,
            failures: times.failures,
        })
    }
}

/// The `p`th percentile of `values` (nearest rank; `values` is sorted in place and not empty).
fn percentile(values: &mut [f64], p: f64) -> f64 {
    values.sort_by(f64::total_cmp);
    let rank = ((p / 100.0) * values.len() as f64).ceil() as usize;
    values
        .get(rank.clamp(1, values.len()) - 1)
        .copied()
        .unwrap_or(f64::NAN)
}

/// Issue 12's SSE row: a stream of [`stream_origin::EVENTS`] events [`stream_origin::EVENT_GAP`]
/// apart, timed per event, [`SSE_RUNS`] rounds of one stream per column (after one that warms each
/// path up), with the key injected (so brokerd scrubs the stream).
fn event_stream(lab: &Lab, settings: &Settings) -> Result<Vec<Row>> {
    let what = format!(
        "SSE, {} events {} ms apart",
        stream_origin::EVENTS,
        stream_origin::EVENT_GAP.as_millis()
    );
    let rounds = in_rounds(
        &what,
        lab,
        Route::Streaming,
        &STREAMING_COLUMNS,
        SSE_RUNS,
        |round, _, endpoint| {
            clients::event_times(
                &settings.tools.python3,
                lab.dir(),
                endpoint,
                round == 0,
                stream_origin::EVENTS,
            )
        },
    )?;
    let samples: PerColumn<EventStreamSummary> = rounds
        .into_iter()
        .map(|(column, outcome)| {
            let summary = outcome.and_then(|rounds| {
                let merged = clients::EventTimes {
                    failures: rounds.iter().map(|r| r.failures).sum(),
                    runs: rounds.into_iter().flat_map(|r| r.runs).collect(),
                };
                EventStreamSummary::of(&merged, stream_origin::EVENT_GAP)
                    .map_err(|e| Cell::Failed(format!("{e:#}")))
            });
            (column, summary)
        })
        .collect();
    let targets = [AddsAtMost(SSE_ADDED_MS_TARGET)];
    let mut rows = vec![
        fill(
            Row::new(format!("{what}: time to first event"), "ms", Lower).with_targets(&targets),
            &samples,
            |s| measured(s.first_event_ms, s.failures),
        ),
        fill(
            Row::new(format!("{what}: p99 event lag"), "ms", Lower).with_targets(&targets),
            &samples,
            |s| measured(s.p99_lag_ms, s.failures),
        ),
        fill(
            Row::new(format!("{what}: median event lag"), "ms", Lower),
            &samples,
            |s| measured(s.p50_lag_ms, s.failures),
        ),
    ];
    for row in &mut rows {
        row.set(Column::Mitmproxy, not_streamed());
    }
    Ok(rows)
}

/// One transfer of the bulk workload through one column, with the CPU time each process spent
/// on it.
#[derive(Debug)]
struct BulkTransfer {
    transfer: clients::Transfer,
    /// The proxy's CPU time meanwhile, in seconds (none on the direct path).
    proxy_cpu_seconds: Option<f64>,
    /// The streaming origin's.
    origin_cpu_seconds: Option<f64>,
}

/// One round of the bulk workload through one column: a download, then an upload.
#[derive(Debug)]
struct BulkRound {
    down: BulkTransfer,
    up: BulkTransfer,
}

/// Issue 12's bulk rows: [`BULK_BYTES`] down and up through each column, [`BULK_RUNS`] rounds
/// of one download and one upload per column (each on a connection of its own), with the key
/// injected (so brokerd scrubs the download); how much each proxy's resident memory peaks, over
/// all rounds, above where it was before the first; the CPU time per MB of each process on the
/// path (client, proxy, origin); and the throughput those CPU times allow on this machine's
/// cores, the ceiling that tells a slow path from a busy machine.
fn bulk(lab: &Lab, settings: &Settings) -> Result<Vec<Row>> {
    let megabytes = BULK_BYTES as f64 / 1e6;
    let what = format!("{megabytes:.0} MB transfers");
    let watches = STREAMING_COLUMNS
        .iter()
        .filter_map(|column| lab.proxy_pid(*column).map(|pid| (*column, pid)))
        .map(|(column, pid)| Ok((column, process::PeakRss::watch(pid)?)))
        .collect::<Result<Vec<_>>>()?;
    let origin = lab.streaming_origin_pid();
    let rounds = in_rounds(
        &what,
        lab,
        Route::Streaming,
        &STREAMING_COLUMNS,
        BULK_RUNS,
        |_, column, endpoint| {
            let proxy = lab.proxy_pid(column);
            let one = |direction: clients::Direction| -> Result<BulkTransfer> {
                let proxy_before = proxy.map(process::tree_cpu_seconds).transpose()?;
                let origin_before = origin.map(process::tree_cpu_seconds).transpose()?;
                let transfer = clients::transfer(
                    &settings.tools.python3,
                    lab.dir(),
                    endpoint,
                    BULK_BYTES,
                    direction,
                )?;
                let proxy_after = proxy.map(process::tree_cpu_seconds).transpose()?;
                let origin_after = origin.map(process::tree_cpu_seconds).transpose()?;
                let spent =
                    |before: Option<f64>, after: Option<f64>| before.zip(after).map(|(b, a)| a - b);
                Ok(BulkTransfer {
                    transfer,
                    proxy_cpu_seconds: spent(proxy_before, proxy_after),
                    origin_cpu_seconds: spent(origin_before, origin_after),
                })
            };
            Ok(BulkRound {
                down: one(clients::Direction::Down)?,
                up: one(clients::Direction::Up)?,
            })
        },
    );
    let mut growth = Vec::new();
    for (column, watch) in watches {
        growth.push((column, watch.growth_kib()?));
    }
    let cores = std::thread::available_parallelism().map_or(1, std::num::NonZero::get);
    let samples: PerColumn<BulkSummary> = rounds?
        .into_iter()
        .map(|(column, outcome)| {
            let summary = outcome.map(|rounds| {
                let of = |pick: fn(&BulkRound) -> &BulkTransfer| {
                    BulkDirection::of(rounds.iter().map(pick), megabytes, cores)
                };
                BulkSummary {
                    down: of(|r| &r.down),
                    up: of(|r| &r.up),
                    rss_growth_mib: growth
                        .iter()
                        .find(|(c, _)| *c == column)
                        .map(|(_, kib)| *kib as f64 / 1024.0),
                }
            });
            (column, summary)
        })
        .collect();
    let throughput = [TimesDirect(BULK_THROUGHPUT_TARGET)];
    let mut rows = Vec::new();
    for (way, pick) in [
        (
            "download",
            BulkSummary::down as fn(&BulkSummary) -> &BulkDirection,
        ),
        ("upload", BulkSummary::up),
    ] {
        rows.push(fill(
            Row::new(format!("{megabytes:.0} MB {way}"), "MB/s", Higher).with_targets(&throughput),
            &samples,
            |s| measured(pick(s).mb_per_second, pick(s).failures),
        ));
    }
    rows.push(fill(
        Row::new(
            format!("{megabytes:.0} MB down and up: proxy peak RSS growth"),
            "MiB",
            Lower,
        )
        .with_targets(&[AtMost(BULK_RSS_MIB_TARGET)]),
        &samples,
        |s| s.rss_growth_mib.map_or(Cell::NotApplicable, Cell::value),
    ));
    for (way, pick) in [
        (
            "download",
            BulkSummary::down as fn(&BulkSummary) -> &BulkDirection,
        ),
        ("upload", BulkSummary::up),
    ] {
        for (process, cpu) in [
            (
                "proxy",
                (|d| d.proxy_us_per_mb) as fn(&BulkDirection) -> Option<f64>,
            ),
            ("origin", |d| d.origin_us_per_mb),
            ("client", |d| d.client_us_per_mb),
        ] {
            rows.push(fill(
                Row::new(
                    format!("{megabytes:.0} MB {way}: {process} CPU per MB"),
                    "µs",
                    Lower,
                ),
                &samples,
                |s| cpu(pick(s)).map_or(Cell::NotApplicable, Cell::value),
            ));
        }
        rows.push(fill(
            Row::new(
                format!("{megabytes:.0} MB {way}: what that CPU allows on {cores} cores"),
                "MB/s",
                Higher,
            ),
            &samples,
            |s| {
                pick(s)
                    .ceiling_mb_per_second
                    .map_or(Cell::NotApplicable, Cell::value)
            },
        ));
    }
    for row in &mut rows {
        row.set(Column::Mitmproxy, not_streamed());
    }
    Ok(rows)
}

/// What one column's transfers one way came to.
#[derive(Debug)]
struct BulkDirection {
    /// From the median time.
    mb_per_second: f64,
    /// Transfers that did not arrive whole.
    failures: u64,
    /// CPU time per MB moved of each process on the path (none for a proxy on the direct path).
    client_us_per_mb: Option<f64>,
    proxy_us_per_mb: Option<f64>,
    origin_us_per_mb: Option<f64>,
    /// The most MB/s those CPU times allow on `cores` cores, each process using one at most (the
    /// client, the proxy's connection and the origin's are each on one thread):
    /// `min(1 / max(cpu), cores / sum(cpu))`. The kernel's loopback work is in the processes'
    /// system time.
    ceiling_mb_per_second: Option<f64>,
}

impl BulkDirection {
    fn of<'a>(
        transfers: impl Iterator<Item = &'a BulkTransfer>,
        megabytes: f64,
        cores: usize,
    ) -> Self {
        let transfers: Vec<&BulkTransfer> = transfers.collect();
        let mut seconds: Vec<f64> = transfers
            .iter()
            .filter_map(|t| t.transfer.seconds)
            .collect();
        let mb_per_second = if seconds.is_empty() {
            f64::NAN
        } else {
            megabytes / percentile(&mut seconds, 50.0)
        };
        // Over the transfers that arrived whole and were measured.
        let per_mb = |cpu: fn(&BulkTransfer) -> Option<f64>| {
            let measured: Vec<f64> = transfers
                .iter()
                .filter(|t| t.transfer.seconds.is_some())
                .filter_map(|t| cpu(t))
                .collect();
            (!measured.is_empty())
                .then(|| measured.iter().sum::<f64>() * 1e6 / (megabytes * measured.len() as f64))
        };
        let client_us_per_mb = per_mb(|t| t.transfer.client_cpu_seconds);
        let proxy_us_per_mb = per_mb(|t| t.proxy_cpu_seconds);
        let origin_us_per_mb = per_mb(|t| t.origin_cpu_seconds);
        let on_path: Vec<f64> = [client_us_per_mb, proxy_us_per_mb, origin_us_per_mb]
            .into_iter()
            .flatten()
            .collect();
        let ceiling_mb_per_second = (client_us_per_mb.is_some() && origin_us_per_mb.is_some())
            .then(|| cpu_bound_mb_per_second(&on_path, cores));
        Self {
            mb_per_second,
            failures: transfers.iter().map(|t| t.transfer.failures).sum(),
            client_us_per_mb,
            proxy_us_per_mb,
            origin_us_per_mb,
            ceiling_mb_per_second,
        }
    }
}

/// The most MB/s a pipeline of single-threaded processes can move on `cores` cores, given each
/// one's CPU µs per MB: no faster than its busiest process, nor than the cores can serve them
/// all.
fn cpu_bound_mb_per_second(us_per_mb: &[f64], cores: usize) -> f64 {
    let busiest = us_per_mb.iter().copied().fold(0.0, f64::max);
    let total: f64 = us_per_mb.iter().sum();
    (1e6 / busiest).min(cores as f64 * 1e6 / total)
}

/// One result per column: the value, or the cell saying why there is none.
type PerColumn<T> = Vec<(Column, Result<T, Cell>)>;

/// Runs `measure` in `rounds` rounds through each of `columns`, the columns taking turns within
/// a round, so a burst of other work on the machine weighs on every column alike rather than on
/// whichever was being measured. A column whose measurement fails sits out the later rounds and
/// keeps the failure.
fn in_rounds<T: std::fmt::Debug>(
    what: &str,
    lab: &Lab,
    route: Route,
    columns: &[Column],
    rounds: u32,
    mut measure: impl FnMut(u32, Column, &Endpoint) -> Result<T>,
) -> Result<PerColumn<Vec<T>>> {
    let mut results: PerColumn<Vec<T>> = columns.iter().map(|c| (*c, Ok(Vec::new()))).collect();
    for round in 0..rounds {
        let going: Vec<Column> = results
            .iter()
            .filter(|(_, outcome)| outcome.is_ok())
            .map(|(column, _)| *column)
            .collect();
        let label = format!("{what} (round {} of {rounds})", round + 1);
        let measured = each_column(&label, lab, route, &going, |column, endpoint| {
            measure(round, column, endpoint)
        })?;
        for (column, outcome) in measured {
            let Some((_, slot)) = results.iter_mut().find(|(c, _)| *c == column) else {
                continue;
            };
            match outcome {
                Ok(value) => {
                    if let Ok(values) = slot {
                        values.push(value);
                    }
                }
                Err(cell) => *slot = Err(cell),
            }
        }
    }
    Ok(results)
}

/// What one column's bulk transfers came to.
#[derive(Debug)]
struct BulkSummary {
    down: BulkDirection,
    up: BulkDirection,
    /// The proxy's peak resident memory above where it was before (none on the direct path).
    rss_growth_mib: Option<f64>,
}

impl BulkSummary {
    fn down(&self) -> &BulkDirection {
        &self.down
    }

    fn up(&self) -> &BulkDirection {
        &self.up
    }
}

/// The mitmproxy cell of the streaming rows.
fn not_streamed() -> Cell {
    Cell::NotMeasured(
        "no route to the streaming origin: issue 12 compares brokerd with direct and nginx on \
         the SSE and bulk rows"
            .into(),
    )
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
        let mut row =
            Row::new(what.clone(), "KiB", Lower).with_targets(&[TimesNginx(IDLE_NGINX_FACTOR)]);
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
    Ok(vec![
        fill(
            Row::new("new connection, first-seen host name (median)", "ms", Lower).with_targets(&[
                TimesNginx(FIRST_SEEN_NGINX_FACTOR),
                TimesMitmproxy(MITMPROXY_FACTOR),
            ]),
            &samples,
            |(cold, _)| measured(cold.median_ms, cold.failures),
        ),
        fill(
            Row::new("new connection, cached host name (median)", "ms", Lower)
                .with_targets(&[NoWorseThanNginx, TimesMitmproxy(MITMPROXY_FACTOR)]),
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

pub(super) fn thousands(n: u32) -> String {
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
    fn summarises_event_streams_by_schedule() -> Result<()> {
        let gap = Duration::from_millis(20);
        // Three runs of four events: each event arrives 2 ms after its scheduled time, but one.
        let times = clients::EventTimes {
            runs: vec![
                vec![0.002, 0.022, 0.042, 0.062],
                vec![0.003, 0.022, 0.042, 0.062],
                vec![0.002, 0.022, 0.042, 0.070],
            ],
            failures: 1,
        };
        let summary = EventStreamSummary::of(&times, gap)?;
        assert!((summary.first_event_ms - 2.0).abs() < 1e-9, "{summary:?}");
        assert!((summary.p99_lag_ms - 10.0).abs() < 1e-9, "{summary:?}");
        assert!((summary.p50_lag_ms - 2.0).abs() < 1e-9, "{summary:?}");
        assert_eq!(summary.failures, 1);
        let none = clients::EventTimes {
            runs: Vec::new(),
            failures: 5,
        };
        assert!(EventStreamSummary::of(&none, gap).is_err());
        Ok(())
    }

    #[test]
    fn the_cpu_bound_is_the_busiest_process_or_the_cores() {
        // 1,000 µs per MB at most: 1,000 MB/s, unless the cores run out first.
        let bound = cpu_bound_mb_per_second(&[1_000.0, 500.0], 2);
        assert!((bound - 1_000.0).abs() < 1e-9, "{bound}");
        // Three processes of 1,000 µs per MB on two cores: 3,000 µs of CPU per MB, 2 s a second.
        let bound = cpu_bound_mb_per_second(&[1_000.0, 1_000.0, 1_000.0], 2);
        assert!((bound - 2e6 / 3_000.0).abs() < 1e-9, "{bound}");
    }

    #[test]
    fn takes_nearest_rank_percentiles() {
        let mut values: Vec<f64> = (1..=100).rev().map(f64::from).collect();
        assert_eq!(percentile(&mut values, 99.0), 99.0);
        assert_eq!(percentile(&mut values, 50.0), 50.0);
        assert_eq!(percentile(&mut [7.0], 99.0), 7.0);
    }

    #[test]
    fn names_thousands() {
        assert_eq!(thousands(1_000), "1,000");
        assert_eq!(thousands(10_000), "10,000");
        assert_eq!(thousands(200), "200");
    }
}
