//! Fixed events, a fixed clock, and text snapshots for the console tests.

use std::{env, fs, path::PathBuf};

use agent_broker_console::App;
use agent_broker_protocol::{AuditEvent, Decision, EventKind, Side};
use ratatui::buffer::Buffer;

/// 2024-06-01 12:00:00 UTC.
pub const T0: u64 = 1_717_243_200_000;

/// The console's clock in the tests: 30 s after `T0`.
pub const NOW: u64 = T0 + 30_000;

pub const RUN_DIR: &str = "/run/agent-broker";

fn call(seq: u64, offset_ms: u64, cgroup: &str, pid: u32, comm: &str) -> AuditEvent {
    AuditEvent {
        seq,
        time_ms: T0 + offset_ms,
        kind: Some(EventKind::Request),
        cgroup: Some(cgroup.into()),
        pid: Some(pid),
        comm: Some(comm.into()),
        decision: Some(Decision::Allow),
        ..AuditEvent::default()
    }
}

/// A demo's worth of calls and denials, oldest first.
pub fn events() -> Vec<AuditEvent> {
    vec![
        AuditEvent {
            seq: 1,
            time_ms: T0 + 100,
            kind: Some(EventKind::Attach),
            cgroup: Some("agents/demo".into()),
            ..AuditEvent::default()
        },
        AuditEvent {
            exe: Some("/usr/bin/curl".into()),
            original_dst: Some("127.0.0.1:443".parse().expect("addr")),
            sni: Some("api.openai.com".into()),
            method: Some("POST".into()),
            host: Some("api.openai.com".into()),
            path: Some("/v1/chat/completions".into()),
            status: Some(200),
            bytes_in: 512,
            bytes_out: 2048,
            latency_us: Some(182_345),
            rule: Some("demo.toml:3 allow[0]".into()),
            secrets: vec!["OPENAI_KEY".into()],
            ..call(2, 1_250, "agents/demo", 4242, "curl")
        },
        AuditEvent {
            kind: Some(EventKind::Denial),
            exe: Some("/usr/bin/python3.12".into()),
            original_dst: Some("127.0.0.1:443".parse().expect("addr")),
            sni: Some("api.github.com".into()),
            method: Some("DELETE".into()),
            host: Some("api.github.com".into()),
            path: Some("/repos/acme/widgets".into()),
            status: Some(403),
            latency_us: Some(640),
            decision: Some(Decision::Deny),
            rule: Some("demo.toml:9 deny (default)".into()),
            reason: Some("no rule allows DELETE api.github.com/repos/acme/widgets".into()),
            side: Some(Side::Agent),
            ..call(3, 4_020, "agents/demo", 4300, "python3")
        },
        AuditEvent {
            kind: Some(EventKind::TlsFailure),
            exe: Some("/usr/bin/node".into()),
            original_dst: Some("127.0.0.2:443".parse().expect("addr")),
            sni: Some("registry.npmjs.org".into()),
            decision: Some(Decision::Deny),
            reason: Some("agent rejected the broker certificate (unknown ca)".into()),
            side: Some(Side::Agent),
            ..call(4, 7_500, "agents/scraper/worker", 5001, "node")
        },
        AuditEvent {
            method: Some("GET".into()),
            host: Some("pypi.org".into()),
            path: Some("/simple/requests/".into()),
            status: Some(200),
            bytes_out: 10_240,
            latency_us: Some(850),
            rule: Some("scraper.toml:5 allow[1]".into()),
            ..call(5, 9_000, "agents/scraper/worker", 5002, "pip")
        },
        AuditEvent {
            kind: Some(EventKind::HandleMisuse),
            method: Some("GET".into()),
            host: Some("api.openai.com".into()),
            path: Some("/v1/models".into()),
            status: Some(403),
            decision: Some(Decision::Deny),
            reason: Some("handle h-7 is bound to agents/demo".into()),
            side: Some(Side::Agent),
            ..call(6, 12_000, "agents/scraper/worker", 5003, "python3")
        },
        AuditEvent {
            seq: 7,
            time_ms: T0 + 15_000,
            kind: Some(EventKind::PolicyReload),
            ..AuditEvent::default()
        },
        AuditEvent {
            method: Some("POST".into()),
            host: Some("api.anthropic.com".into()),
            path: Some("/v1/messages".into()),
            status: Some(502),
            bytes_in: 900,
            latency_us: Some(1_250_000),
            rule: Some("demo.toml:4 allow[1]".into()),
            reason: Some("upstream closed the connection".into()),
            secrets: vec!["ANTHROPIC_KEY".into()],
            side: Some(Side::Upstream),
            ..call(8, 21_000, "agents/demo", 4242, "curl")
        },
        AuditEvent {
            kind: Some(EventKind::Denial),
            original_dst: Some("127.0.0.3:5432".parse().expect("addr")),
            decision: Some(Decision::Deny),
            reason: Some("no rule for 127.0.0.3:5432 (not TLS or HTTP)".into()),
            side: Some(Side::Agent),
            ..call(9, 28_400, "agents/demo", 4400, "psql")
        },
    ]
}

/// A connected console holding [`events`], its clock at [`NOW`].
pub fn app() -> App {
    let mut app = App::new(RUN_DIR);
    app.apply(agent_broker_console::FeedMsg::Connected(None));
    app.tick(NOW);
    for e in events() {
        app.ingest(e);
    }
    app
}

/// The buffer as text, one line per row, trailing spaces cut.
pub fn buffer_text(buffer: &Buffer) -> String {
    let area = buffer.area;
    let mut out = String::new();
    for y in area.top()..area.bottom() {
        let mut line = String::new();
        for x in area.left()..area.right() {
            line.push_str(buffer[(x, y)].symbol());
        }
        out.push_str(line.trim_end());
        out.push('\n');
    }
    out
}

/// Compares `actual` with `tests/snapshots/NAME.txt`. A missing or different snapshot fails;
/// `UPDATE_SNAPSHOTS=1` writes the file instead (review the diff before committing it).
pub fn assert_snapshot(name: &str, actual: &str) {
    let path = PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("tests/snapshots")
        .join(format!("{name}.txt"));
    if env::var_os("UPDATE_SNAPSHOTS").is_some_and(|v| v == "1") {
        fs::write(&path, actual).expect("write snapshot");
        return;
    }
    let expected = match fs::read_to_string(&path) {
        Ok(s) => s,
        Err(e) => panic!(
            "snapshot {} is missing ({e}); run with UPDATE_SNAPSHOTS=1 to create it. Got:\n{actual}",
            path.display()
        ),
    };
    if expected != actual {
        let mut diff = String::new();
        let (exp, act): (Vec<&str>, Vec<&str>) =
            (expected.lines().collect(), actual.lines().collect());
        for i in 0..exp.len().max(act.len()) {
            let (e, a) = (exp.get(i).copied(), act.get(i).copied());
            if e != a {
                diff.push_str(&format!(
                    "line {:>3} expected: {}\nline {:>3} actual:   {}\n",
                    i + 1,
                    e.unwrap_or("<none>"),
                    i + 1,
                    a.unwrap_or("<none>")
                ));
            }
        }
        panic!(
            "snapshot {} differs (UPDATE_SNAPSHOTS=1 rewrites it):\n{diff}\nfull frame:\n{actual}",
            path.display()
        );
    }
}
