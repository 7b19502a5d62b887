//! Issue 17.2, below and around HTTP: TLS ClientHellos and records, compressed and lying
//! bodies from the upstream, and DNS floods, from inside an agent cgroup through the kernel's
//! redirect (`tests/src/attacker.py`).
//!
//! Each attack is checked four ways ([`attacker::attack`]): the attacker gets an error or a
//! bounded answer, brokerd's RSS and task count stay bounded, the other agent's call made
//! meanwhile is served with its key, and the audit log records the attacker with the reason.
//!
//! Needs root, cgroup v2 and BPF, python3 (/usr/bin/python3), curl and openssl.
//!
//! Run as root: `cargo test -p agent-broker-tests --test attacks_wire -- --test-threads=1`.

use std::{
    io::Write as _,
    net::IpAddr,
    process::{Command, Stdio},
    time::Duration,
};

use agent_broker_protocol::{Decision, EventKind, RequestOutcome, Side};
use agent_broker_tests::{
    attacker::{self, Gauges, attack},
    spawn_in_cgroup, wait_with_timeout,
    world::API,
};

/// How far brokerd's RSS may grow during one attack.
const RSS_GROWTH: u64 = 64 << 20;

fn statuses(report: &serde_json::Value) -> Vec<String> {
    report["statuses"]
        .as_array()
        .map(|a| {
            a.iter()
                .filter_map(|s| s.as_str().map(str::to_string))
                .collect()
        })
        .unwrap_or_default()
}

#[test]
fn hostile_tls_client_hellos_and_records() {
    let w = attacker::world(&[], "");

    // A ClientHello in 1-byte records: reassembled, the handshake completes, the request is
    // served (brokerd's SNI peek reads the first record only; the handshake has the name).
    attack(&w, "tls-split-hello", &[], RSS_GROWTH, "", |r| {
        assert_eq!(r["handshake"], true, "{r}");
        assert_eq!(statuses(r), vec!["200".to_string()], "{r}");
    });

    // A record flood before the handshake ends: refused, the connection closed.
    attack(
        &w,
        "tls-record-flood",
        &["records=20000"],
        RSS_GROWTH,
        "TLS handshake with the agent failed",
        |r| {
            assert_eq!(r["handshake"], false, "{r}");
            assert_eq!(r["closed"], true, "{r}");
        },
    );

    // SNI with bytes no host name may hold.
    let (_, record) = attack(
        &w,
        "tls-bad-sni",
        &[],
        RSS_GROWTH,
        "malformed TLS ClientHello",
        |r| {
            assert_eq!(r["handshake"], false, "{r}");
            assert_eq!(r["closed"], true, "{r}");
        },
    );
    assert_eq!(record.kind, Some(EventKind::TlsFailure), "{record:?}");

    // Renegotiation (TLS 1.2, openssl s_client's `R`): brokerd (rustls) never renegotiates
    // (it answers a warning alert, no_renegotiation); no second handshake happens. rustls
    // handles it below brokerd's code, so this one leaves no record of its own.
    let before = Gauges::now(&w.broker);
    let mut cmd = Command::new("openssl");
    cmd.args(["s_client", "-tls1_2", "-connect"])
        .arg(attacker::target(&w).to_string())
        .args(["-servername", API, "-CAfile"])
        .arg(&w.broker_ca)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    let mut child = spawn_in_cgroup(&attacker::attacker_cgroup(&w), &mut cmd);
    let mut stdin = child.stdin.take().expect("stdin");
    std::thread::sleep(Duration::from_millis(1000));
    let _ = stdin.write_all(b"R\n");
    std::thread::sleep(Duration::from_millis(1000));
    drop(stdin);
    // s_client ends when the connection does; a connection left open after the refusal is
    // closed by the test after a few seconds (its exit is then not judged).
    let ended =
        agent_broker_tests::poll_until(Duration::from_secs(5), || child.try_wait().ok().flatten());
    if ended.is_none() {
        let _ = child.kill();
    }
    let out = wait_with_timeout(child, Duration::from_secs(10), "openssl s_client");
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    let tail = &text[text.len().saturating_sub(1500)..];
    assert!(text.contains("RENEGOTIATING"), "{tail}");
    // s_client prints a line per certificate it verifies (the leaf and the CA): twice that
    // would be a second handshake.
    assert_eq!(
        text.matches("verify return:1").count(),
        2,
        "no second handshake: {tail}"
    );
    before.assert_bounded(
        &Gauges::now(&w.broker),
        RSS_GROWTH,
        attacker::TASK_GROWTH,
        "renegotiation",
    );
    attacker::assert_victim_served(&w, "after the renegotiation attempt");
}

#[test]
fn compression_bombs_undecodable_and_lying_bodies_from_the_upstream() {
    let w = attacker::world(&[], "");
    let get = |path: &str| format!("path={path}");

    // brotli is slow to make in a debug build: 8 MiB of zeros is bomb enough.
    for (coding, mb) in [("gzip", 64), ("br", 8)] {
        // MiBs of zeros in a few KiB: cut once it expands past 200 times.
        let (_, record) = attack(
            &w,
            "h1-get",
            &[
                &get(&format!("/attack/bomb?coding={coding}&mb={mb}")),
                "linger=5",
            ],
            RSS_GROWTH,
            "a compression bomb",
            |r| {
                // 502 when the bomb shows before the response head goes (it is decoded
                // ahead to the first piece), else a stream cut after the head.
                let first = statuses(r).first().cloned().unwrap_or_default();
                assert!(matches!(first.as_str(), "200" | "502"), "{r}");
                let received = r["received"].as_u64().unwrap_or(u64::MAX);
                assert!(
                    received < 8 << 20,
                    "{coding} bomb: {received} bytes reached the agent"
                );
            },
        );
        assert_eq!(record.outcome, Some(RequestOutcome::Failed), "{record:?}");
        assert_eq!(record.side, Some(Side::Upstream), "{record:?}");
    }

    // A body that is not what its Content-Encoding says: withheld, 502.
    attack(
        &w,
        "h1-get",
        &[&get("/attack/bomb?coding=gzip&garbage=1"), "linger=3"],
        RSS_GROWTH,
        "does not decode",
        |r| assert_eq!(statuses(r), vec!["502".to_string()], "{r}"),
    );
    // A coding brokerd does not know: withheld, 502.
    attack(
        &w,
        "h1-get",
        &[&get("/attack/bomb?coding=x-abtest"), "linger=3"],
        RSS_GROWTH,
        "is not one brokerd can decode",
        |r| assert_eq!(statuses(r), vec!["502".to_string()], "{r}"),
    );
    // Content-Length 1000 over 10 bytes: the agent's stream is cut, never complete. (A lying
    // length from the agent's side is `h1-short-body` in attacks_http1.rs.)
    let (_, record) = attack(
        &w,
        "h1-get",
        &[&get("/attack/lying-length"), "linger=3"],
        RSS_GROWTH,
        "cut",
        |r| {
            // The head goes with the first piece of the body (the scrubber may hold all ten
            // bytes back): either the connection closes before any answer or after a 200
            // whose body never ends. Never a complete response.
            assert!(statuses(r).iter().all(|s| s == "200"), "{r}");
            assert_eq!(r["closed"], true, "{r}");
        },
    );
    assert_eq!(record.outcome, Some(RequestOutcome::Failed), "{record:?}");
    assert_eq!(record.side, Some(Side::Upstream), "{record:?}");
}

#[test]
fn dns_floods_and_names_made_to_fill_the_answered_table() {
    let w = attacker::world(
        &[],
        "\n[[allow]]\nhost = \"*.flood.test\"\nport = 443\n\n[shares]\ndns_queries_per_second = 10000\n",
    );
    // Every name under flood.test answers an address of its own.
    w.broker
        .add_name("*.flood.test", IpAddr::from([0, 0, 0, 0]));
    let attacker = attacker::attacker_cgroup(&w);

    // A flood of names the policy does not allow: REFUSED, summed in the log.
    let seq = attacker::last_seq(&w.broker);
    let (report, record) = attack(
        &w,
        "dns-flood",
        &["n=5000", "suffix=exfil.example.test"],
        RSS_GROWTH,
        "",
        |r| {
            let codes = r["codes"].as_object().cloned().unwrap_or_default();
            assert!(codes.keys().all(|c| c == "5"), "only REFUSED: {r}");
        },
    );
    assert_eq!(record.decision, Some(Decision::Deny), "{record:?}");
    assert!(record.reason.is_some(), "{record:?}");
    let refused: Vec<_> = w
        .broker
        .audit_records()
        .into_iter()
        .filter(|r| {
            r.seq > seq
                && r.cgroup.as_deref() == Some(attacker.as_str())
                && r.kind == Some(EventKind::Dns)
        })
        .collect();
    assert!(
        refused.len() <= 20,
        "{} records for a 5000-query flood: {report}",
        refused.len()
    );

    // 6000 names under an allowed wildcard, each at an address of its own: brokerd's table of
    // answered names keeps 4096 of the attacker's, however many it resolves.
    let before = Gauges::now(&w.broker);
    let (report, record) = attack(
        &w,
        "dns-fill",
        &["n=6000", "batch=100", "suffix=flood.test", "linger=2"],
        RSS_GROWTH,
        "",
        |r| {
            let answered = r["codes"]["0"].as_u64().unwrap_or(0);
            assert!(answered > 4500, "most names answered: {r}");
        },
    );
    assert_eq!(record.kind, Some(EventKind::Dns), "{record:?}");
    let after = Gauges::now(&w.broker);
    assert!(
        after.answered_names <= 4096 + before.answered_names,
        "the table grew from {} to {} entries: {report}",
        before.answered_names,
        after.answered_names
    );
    assert!(
        after.answered_names >= 4096,
        "the attacker's answers are kept up to its bound: {}",
        after.answered_names
    );
}
